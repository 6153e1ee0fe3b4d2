//! ICMP errors tied to their contact, end to end over loopback (issue 13,
//! part 3), on both backends:
//!
//! - contacts on 127.0.0.1 ports where nothing listens: the kernel answers
//!   every ping with an ICMP port unreachable, and each ping fails at once
//!   (reason `unreachable`), so the contacts are Down after `down_after`
//!   pings, each transition within a millisecond of its ping (2 ms of
//!   stamp rounding; the reply timeout is 1.5 s: only the error queue can
//!   explain that), with a port per worker, and with two workers sharing
//!   one port (where the kernel may queue an error on the other worker's
//!   socket: the error ends that worker's sleep and it hands the error
//!   over, waking the owner);
//! - forged ICMP errors, sent from a raw socket to kaping's socket about a
//!   contact that answers, one quoting a request whose token is bogus, one
//!   quoting only the 8-byte UDP header while no ping is in flight, change
//!   no contact and are counted by cause. Raw sockets need CAP_NET_RAW: the
//!   test says SKIP when it is not permitted.
//!
//! Every test is bounded in time, serialized (two cores) and stays on
//! 127.0.0.1.

mod common;
use common::{events, free_ports, loopback_daemon, totals, uring_available, wait_with_deadline};
use std::collections::HashMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kaping::shm::layout::{Counter, SlotRecord, SLOT_DOWN, SLOT_UP};
use kaping::shm::reader::ShmReader;
use kaping::sim::icmp::{port_unreachable, raw_socket};

static SERIAL: Mutex<()> = Mutex::new(());

fn kaping() -> &'static str {
    env!("CARGO_BIN_EXE_kaping")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Every occupied slot by URI.
fn contacts(shm: &ShmReader) -> HashMap<String, SlotRecord> {
    let h = shm.header();
    let (mut uri, mut aor) = (Vec::new(), Vec::new());
    let mut out = HashMap::new();
    for w in 0..h.workers {
        for slot in 0..h.slots_per_worker {
            if let Some(rec) = shm.read_contact(w, slot, &mut uri, &mut aor) {
                out.insert(String::from_utf8(uri.clone()).unwrap(), rec);
            }
        }
    }
    out
}

/// Ports on 127.0.0.1 where nothing listens, held for the test: each
/// socket is bound there and connected to the discard port, so it accepts
/// datagrams from 127.0.0.1:9 only and the kernel answers kaping's with a
/// port unreachable; yet no other process (a responder of a test running
/// beside this one) can bind the port meanwhile, as it could a closed one.
fn dead_ports(n: usize) -> Vec<UdpSocket> {
    (0..n)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect("127.0.0.1:9").unwrap();
            s
        })
        .collect()
}

const DOWN_AFTER: u64 = 2;

/// Contacts on dead ports go Down after DOWN_AFTER pings, each failing
/// at once on the ICMP port unreachable.
///
/// `lag_max_ms`: how long after its ping a Down event may come. With a
/// port per worker, the kernel queues the error on the sender's socket
/// during the send on loopback, and the worker reads it in the same poll.
/// With a shared port the error may land on the other worker's socket: an
/// error pending on a socket ends that worker's sleep, and the hand-off
/// wakes the owner, on both backends.
fn dead_ports_go_down_at_once(backend: &str, steering: &str, workers: u16, lag_max_ms: i64) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !uring_available(backend) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let held = dead_ports(12);
    let uris: Vec<String> = held
        .iter()
        .enumerate()
        .map(|(i, s)| format!("sip:dead{i}@{}", s.local_addr().unwrap()))
        .collect();
    std::fs::write(dir.path().join("contacts.txt"), uris.join("\n") + "\n").unwrap();
    let bind_port = free_ports(workers);
    let shm_path = dir.path().join("shm");
    let events_path = dir.path().join("events.jsonl");
    let mut child = Command::new(kaping())
        .arg("run")
        .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
        .arg("--contacts")
        .arg(dir.path().join("contacts.txt"))
        .arg("--shm")
        .arg(&shm_path)
        .arg("--events")
        .arg(&events_path)
        .args(["--bind", &format!("127.0.0.1:{bind_port}")])
        .args(["--workers", &workers.to_string(), "--max-contacts", "64"])
        .args(["--backend", backend, "--steering", steering])
        .args(["--pin-workers", "false"])
        // First pings within the first 2 s, the second 2 s later; without
        // the error queue, nothing could fail before 1.5 s after a ping.
        .args([
            "--interval",
            "2s",
            "--jitter",
            "0",
            "--reply-timeout",
            "1.5s",
        ])
        .args(["--retries", "0", "--down-after", &DOWN_AFTER.to_string()])
        .args(["--run-for", "5s"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // While it runs: each contact's send time of the ping that took it
    // Down, read from the same seqlocked record that shows it Down (the
    // next ping is 2 s later, so polling every few ms sees it).
    let mut down_ping_ms: HashMap<String, u64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut reader = None;
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        if reader.is_none() {
            reader = ShmReader::open(&shm_path).ok();
        }
        if let Some(shm) = &reader {
            for (uri, rec) in contacts(shm) {
                // Not after the next ping has left (sent one more).
                if rec.state == SLOT_DOWN
                    && u64::from(rec.misses) == DOWN_AFTER
                    && u64::from(rec.sent) == DOWN_AFTER
                {
                    down_ping_ms.entry(uri).or_insert(rec.last_ping_ms);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(3));
    }
    let status = wait_with_deadline(&mut child, Duration::from_secs(20));
    drop(held);
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "kaping run failed: {stderr}");

    let shm = ShmReader::open(&shm_path).unwrap();
    assert_eq!(shm.header().backend, backend, "the backend asked for");
    let recs = contacts(&shm);
    assert_eq!(recs.len(), uris.len());
    for uri in &uris {
        let rec = &recs[uri];
        assert_eq!(rec.state, SLOT_DOWN, "{uri}: {rec:?}");
        assert!(u64::from(rec.misses) >= DOWN_AFTER, "{uri}: {rec:?}");
        assert_eq!(rec.misses as u32, rec.sent, "{uri}: every ping missed");
        assert_eq!(rec.answered, 0, "{uri}");
    }
    let t = totals(&shm);
    let sent = t[Counter::Sent as usize];
    assert!(sent >= DOWN_AFTER * uris.len() as u64, "sent {sent}");
    // Every ping failed by its ICMP error, none by its timeout, and no
    // error was left unmatched (with a shared port, those queued on the
    // other worker's socket were handed to the owner).
    let attributed = t[Counter::Unreachable as usize] == sent
        && t[Counter::TimedOut as usize] == 0
        && [
            Counter::IcmpForged,
            Counter::IcmpUnmatched,
            Counter::IcmpOther,
        ]
        .iter()
        .all(|&c| t[c as usize] == 0);
    assert!(
        attributed,
        "every ping's error read and matched: sent {sent}, unreachable {}, timed out {}, \
         forged {}, unmatched {}, other {}; counters {t:?}; daemon stderr: {stderr}",
        t[Counter::Unreachable as usize],
        t[Counter::TimedOut as usize],
        t[Counter::IcmpForged as usize],
        t[Counter::IcmpUnmatched as usize],
        t[Counter::IcmpOther as usize],
    );

    // One event per contact: Unknown -> Down, reason unreachable, within
    // a millisecond of its ping. Both stamps are whole ms and the ping's
    // is taken at the start of the worker's tick, before it renders and
    // sends: 2 ms of slack for the rounding, no more.
    let evs = events(&events_path);
    assert_eq!(evs.len(), uris.len(), "{evs:?}");
    let mut lags = Vec::new();
    for e in &evs {
        let uri = e["uri"].as_str().unwrap();
        assert_eq!(
            (e["old"].as_str(), e["new"].as_str(), e["reason"].as_str()),
            (Some("unknown"), Some("down"), Some("unreachable")),
            "{e}"
        );
        let ping_ms = *down_ping_ms
            .get(uri)
            .unwrap_or_else(|| panic!("{uri}: never seen Down after {DOWN_AFTER} pings"));
        let lag = e["time_ms"].as_u64().unwrap() as i64 - ping_ms as i64;
        lags.push(lag);
    }
    lags.sort_unstable();
    eprintln!("{backend}/{steering}: ms from the Down ping to its event: {lags:?}");
    // One straggler of up to 10 ms is let through: a VM may deschedule the
    // worker for a few ms (seen once in ~20 runs here). A broken path
    // shows in every contact: the ping's timeout (1.5 s), or the worker's
    // round (up to 40 ms).
    let n = lags.len();
    assert!(
        lags[0] >= 0 && lags[n - 2] <= lag_max_ms && lags[n - 1] <= 10,
        "each ping fails within {lag_max_ms} ms of being sent (one within 10): {lags:?}"
    );
}

#[test]
fn dead_ports_go_down_at_once_uring() {
    dead_ports_go_down_at_once("uring", "port-per-worker", 2, 2);
}

#[test]
fn dead_ports_go_down_at_once_mmsg() {
    dead_ports_go_down_at_once("mmsg", "port-per-worker", 2, 2);
}

#[test]
fn dead_ports_go_down_at_once_uring_shared_port() {
    dead_ports_go_down_at_once("uring", "shared-port", 2, 2);
}

#[test]
fn dead_ports_go_down_at_once_mmsg_shared_port() {
    dead_ports_go_down_at_once("mmsg", "shared-port", 2, 2);
}

// ---------------------------------------------------------------------------
// Forged errors
// ---------------------------------------------------------------------------

/// Answers every request on `sock` with a 200 OK (Via, From, To, Call-ID
/// and CSeq copied, RFC 3261 §8.2.6.2) until `stop`.
fn answer(sock: UdpSocket, stop: Arc<AtomicBool>) {
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let req = String::from_utf8_lossy(&buf[..n]);
        let mut resp = String::from("SIP/2.0 200 OK\r\n");
        for line in req.split("\r\n").skip(1) {
            let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
            if ["via", "from", "to", "call-id", "cseq"].contains(&name.as_str()) {
                resp.push_str(line);
                resp.push_str("\r\n");
            }
        }
        resp.push_str("Content-Length: 0\r\n\r\n");
        let _ = sock.send_to(resp.as_bytes(), from);
    }
}

/// A raw ICMP socket, or `None` (said) when the process may not open one.
fn raw_icmp_socket() -> Option<socket2::Socket> {
    match raw_socket() {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("SKIP: {e}");
            None
        }
    }
}

fn send_raw(sock: &socket2::Socket, msg: &[u8]) {
    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    assert_eq!(sock.send_to(msg, &to.into()).unwrap(), msg.len());
}

fn forged_errors_change_nothing(backend: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !uring_available(backend) {
        return;
    }
    let Some(raw) = raw_icmp_socket() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let phone = UdpSocket::bind("127.0.0.1:0").unwrap();
    let phone_addr = match phone.local_addr().unwrap() {
        SocketAddr::V4(a) => a,
        a => panic!("{a}"),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let responder = {
        let stop = stop.clone();
        std::thread::spawn(move || answer(phone, stop))
    };
    let uri = format!("sip:phone@{phone_addr}");
    std::fs::write(dir.path().join("contacts.txt"), format!("{uri}\n")).unwrap();
    let bind_port = free_ports(1);
    let kaping_addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, bind_port);
    let shm_path = dir.path().join("shm");
    let events_path = dir.path().join("events.jsonl");
    let mut child = loopback_daemon(
        dir.path(),
        &shm_path,
        &events_path,
        kaping_addr,
        backend,
        16,
    )
    .args([
        "--interval",
        "1s",
        "--jitter",
        "0",
        "--reply-timeout",
        "500ms",
    ])
    .args(["--retries", "0", "--down-after", "1"])
    .args(["--run-for", "4s"])
    .spawn()
    .unwrap();

    // Wait until the phone has answered a ping and the next is far off:
    // no ping is in flight while the errors arrive (down_after 1: one
    // believed error would take it Down).
    let deadline = Instant::now() + Duration::from_secs(10);
    let shm = loop {
        assert!(Instant::now() < deadline, "kaping never answered");
        if let Ok(shm) = ShmReader::open(&shm_path) {
            let rec = contacts(&shm).get(&uri).copied();
            if let Some(r) = rec {
                let since_ping = now_ms().saturating_sub(r.last_ping_ms);
                if r.state == SLOT_UP && r.last_reply_ms >= r.last_ping_ms && since_ping < 600 {
                    break shm;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // 1. A request shaped like kaping's, token bogus (right alphabet, wrong MAC).
    let bogus = format!(
        "OPTIONS {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {kaping_addr};branch=z9hG4bKAAAAAAAAAAAAAAAAAAAAAAAAAAAA;rport\r\nMax-Forwards: 70\r\n"
    );
    send_raw(
        &raw,
        &port_unreachable(kaping_addr, phone_addr, bogus.as_bytes()),
    );
    // 2. Only the UDP header (an RFC 792 router's quote), no ping in flight.
    send_raw(&raw, &port_unreachable(kaping_addr, phone_addr, b""));
    drop(raw);
    // Both are counted, by cause, well before the next ping.
    let deadline = Instant::now() + Duration::from_millis(300);
    let counted = |shm: &ShmReader| {
        let t = totals(shm);
        (
            t[Counter::IcmpForged as usize],
            t[Counter::IcmpUnmatched as usize],
        )
    };
    while counted(&shm) != (1, 1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(counted(&shm), (1, 1), "forged, unmatched");

    let status = wait_with_deadline(&mut child, Duration::from_secs(20));
    stop.store(true, Ordering::Relaxed);
    responder.join().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "kaping run failed: {stderr}");

    let shm = ShmReader::open(&shm_path).unwrap();
    let rec = contacts(&shm)[&uri];
    assert_eq!(rec.state, SLOT_UP, "{rec:?}");
    assert_eq!(rec.misses, 0, "{rec:?}");
    assert_eq!(rec.answered, rec.sent, "{rec:?}");
    let t = totals(&shm);
    assert_eq!(t[Counter::Unreachable as usize], 0, "{t:?}");
    assert_eq!(t[Counter::IcmpForged as usize], 1, "{t:?}");
    assert_eq!(t[Counter::IcmpUnmatched as usize], 1, "{t:?}");
    assert_eq!(t[Counter::IcmpOther as usize], 0, "{t:?}");
    // One event: Unknown -> Up; nothing after the errors.
    let evs = events(&events_path);
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["new"], "up");
}

#[test]
fn forged_errors_change_nothing_uring() {
    forged_errors_change_nothing("uring");
}

#[test]
fn forged_errors_change_nothing_mmsg() {
    forged_errors_change_nothing("mmsg");
}
