//! End to end over loopback: `kaping-loadgen serve` answers for 20,000
//! simulated contacts (5 % of them dead), `kaping run` pings them, and the
//! test checks what an operator would: every live contact Up with an RTT
//! consistent with the injected latency, every dead one Down after exactly
//! `down_after` misses, one event per change, nothing stray or forged, and
//! the shared-memory figures agreeing with each other, with the events and
//! with what the responder saw.
//!
//! Every combination of backend (io_uring, mmsg), steering (port per
//! worker, shared port) and family (IPv4 across 127.0.0.0/8, IPv6 on ::1)
//! runs. Runs are serialized (the machine has two cores) and bounded in
//! time; nothing leaves loopback.

mod common;
use common::{free_ports_on, wait_with_deadline};
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kaping::shm::layout::{Counter, SLOT_DOWN, SLOT_UP};
use kaping::shm::reader::ShmReader;

const CONTACTS: u32 = 20_000;
const DEAD: f64 = 0.05;
const LATENCY_MS: u64 = 3;
const DOWN_AFTER: u16 = 2;
const WORKERS: u32 = 2;
/// IPv6 contacts all live on ::1, so they differ by port.
const V6_PORTS: u16 = 16;

static SERIAL: Mutex<()> = Mutex::new(());

fn kaping() -> &'static str {
    env!("CARGO_BIN_EXE_kaping")
}

fn loadgen() -> &'static str {
    env!("CARGO_BIN_EXE_kaping-loadgen")
}

struct Run {
    v6: bool,
    backend: &'static str,
    steering: &'static str,
}

fn read_fates(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let (uri, fate) = l.split_once('\t').unwrap();
            (uri.to_string(), fate.to_string())
        })
        .collect()
}

fn run(r: Run) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if r.v6 && UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIP: no IPv6 loopback on this machine");
        return;
    }
    if r.backend == "uring" {
        if let Err(why) = kaping::io::uring::probe() {
            eprintln!("SKIP ({}): io_uring unavailable here: {why}", r.backend);
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let seed = "7";
    let dead = DEAD.to_string();

    // Contacts and their fates, from the same options the responder gets.
    let ports = if r.v6 { V6_PORTS } else { 1 };
    let serve_port = free_ports_on(ports, r.v6);
    let mut contacts = Command::new(loadgen());
    contacts.args([
        "contacts",
        "--count",
        &CONTACTS.to_string(),
        "--port",
        &serve_port.to_string(),
    ]);
    contacts
        .args(["--dead", &dead, "--seed", seed, "--out"])
        .arg(p("contacts.txt"));
    contacts.arg("--fates").arg(p("fates.txt"));
    if r.v6 {
        contacts.args(["--ipv6", "--ports", &V6_PORTS.to_string()]);
    }
    assert!(contacts.status().unwrap().success());
    let fates = read_fates(&p("fates.txt"));
    assert_eq!(fates.len(), CONTACTS as usize);
    let dead_count = fates.values().filter(|f| *f == "dead").count();
    assert!(dead_count > 500 && dead_count < 1500, "{dead_count} dead");

    let listen = if r.v6 {
        format!("[::1]:{}-{}", serve_port, serve_port + V6_PORTS - 1)
    } else {
        format!("0.0.0.0:{serve_port}")
    };
    let mut serve = Command::new(loadgen())
        .args([
            "serve", "--listen", &listen, "--dead", &dead, "--seed", seed,
        ])
        .args([
            "--latency",
            &format!("{LATENCY_MS}ms"),
            "--seconds",
            "30",
            "--json",
        ])
        .arg("--stop-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let bind_port = free_ports_on(WORKERS as u16, r.v6);
    let bind = if r.v6 {
        format!("[::1]:{bind_port}")
    } else {
        format!("127.0.0.1:{bind_port}")
    };
    let started = Instant::now();
    let mut daemon = Command::new(kaping())
        .arg("run")
        .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
        .arg("--contacts")
        .arg(p("contacts.txt"))
        .arg("--shm")
        .arg(p("shm"))
        .arg("--events")
        .arg(p("events.jsonl"))
        .args(["--bind", &bind, "--workers", &WORKERS.to_string()])
        .args(["--backend", r.backend, "--steering", r.steering])
        .args(["--interval", "2s", "--reply-timeout", "400ms"])
        .args(["--down-after", &DOWN_AFTER.to_string(), "--run-for", "6s"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_deadline(&mut daemon, Duration::from_secs(60));
    let mut stderr = String::new();
    std::io::Read::read_to_string(daemon.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "kaping run failed: {stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "stopped late: {:?}",
        started.elapsed()
    );
    assert!(
        stderr.contains(&format!("backend {}", r.backend)),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{CONTACTS} contacts loaded, 0 skipped")),
        "{stderr}"
    );

    // The responder's own view: stop it and read its counters.
    drop(serve.stdin.take());
    wait_with_deadline(&mut serve, Duration::from_secs(10));
    let mut out = String::new();
    std::io::Read::read_to_string(serve.stdout.as_mut().unwrap(), &mut out).unwrap();
    let responder: serde_json::Value = serde_json::from_str(out.trim()).unwrap();

    // Events: exactly one per contact, Unknown -> Up for live ones,
    // Unknown -> Down after exactly DOWN_AFTER misses for dead ones.
    let events = std::fs::read_to_string(p("events.jsonl")).unwrap();
    let mut by_uri: HashMap<String, serde_json::Value> = HashMap::new();
    for line in events.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        let uri = e["uri"].as_str().unwrap().to_string();
        assert!(
            by_uri.insert(uri.clone(), e).is_none(),
            "two events for {uri}"
        );
    }
    assert_eq!(by_uri.len(), CONTACTS as usize, "one event per contact");
    for (uri, fate) in &fates {
        let e = &by_uri[uri];
        assert_eq!(e["old"], "unknown", "{e}");
        if fate == "dead" {
            assert_eq!(
                (e["new"].as_str(), e["reason"].as_str()),
                (Some("down"), Some("timeout")),
                "{e}"
            );
            assert_eq!(e["misses"], DOWN_AFTER, "{e}");
        } else {
            assert_eq!(
                (e["new"].as_str(), e["reason"].as_str()),
                (Some("up"), Some("reply")),
                "{e}"
            );
            // Never below the injected latency; below the reply timeout
            // since it matched (a loaded machine may delay a few replies).
            let rtt = e["rtt_us"].as_u64().unwrap();
            assert!((LATENCY_MS * 1000..400_000).contains(&rtt), "{e}");
        }
    }

    // Shared memory: readable after the daemon stopped, marked stopped.
    let shm = ShmReader::open(&p("shm")).unwrap();
    let h = shm.header();
    assert!(h.stopped);
    assert_eq!((h.workers, h.backend.as_str()), (WORKERS, r.backend));
    let mut total = [0u64; Counter::COUNT];
    let mut hist_count = 0u64;
    for w in 0..h.workers {
        for (t, c) in total.iter_mut().zip(shm.counters(w)) {
            *t += c;
        }
        hist_count += shm.histogram(w).iter().sum::<u64>();
    }
    let c = |k: Counter| total[k as usize];
    assert_eq!(c(Counter::Stray), 0, "stray replies");
    assert_eq!(c(Counter::Forged), 0, "forged replies");
    assert_eq!(c(Counter::ParseErrors), 0, "unparsable replies");
    assert_eq!(c(Counter::SendErrors), 0, "send errors");
    assert_eq!(
        c(Counter::ContactsUp),
        (CONTACTS as usize - dead_count) as u64
    );
    assert_eq!(c(Counter::ContactsDown), dead_count as u64);
    assert_eq!(c(Counter::ContactsUnknown), 0);
    assert_eq!(
        hist_count,
        c(Counter::Matched),
        "one RTT sample per matched reply"
    );
    if r.steering == "port-per-worker" {
        assert_eq!(c(Counter::Handoff), 0);
    }
    // Every ping reached the responder and every answer was matched.
    assert_eq!(
        responder["received"].as_u64().unwrap(),
        c(Counter::Sent),
        "{responder}"
    );
    assert_eq!(
        responder["answered"].as_u64().unwrap(),
        c(Counter::Matched) + c(Counter::Late),
        "{responder}"
    );

    // Per-contact slots agree with the counters and the events.
    let (mut sent, mut answered, mut up, mut down) = (0u64, 0u64, 0usize, 0usize);
    let mut srtts = Vec::with_capacity(CONTACTS as usize);
    let (mut uri, mut aor) = (Vec::new(), Vec::new());
    for w in 0..h.workers {
        for slot in 0..h.slots_per_worker {
            let Some(rec) = shm.read_contact(w, slot, &mut uri, &mut aor) else {
                continue;
            };
            let uri = String::from_utf8(uri.clone()).unwrap();
            let fate = &fates[&uri];
            sent += rec.sent as u64;
            answered += rec.answered as u64;
            let dest: SocketAddr = uri.rsplit_once('@').unwrap().1.parse().unwrap();
            assert_eq!(rec.socket_addr(), Some(dest), "{uri}");
            if fate == "dead" {
                assert_eq!(rec.state, SLOT_DOWN, "{uri}");
                assert!(rec.misses >= DOWN_AFTER, "{uri}: {rec:?}");
                assert_eq!(rec.answered, 0, "{uri}");
                down += 1;
            } else {
                assert_eq!(rec.state, SLOT_UP, "{uri}");
                assert!(rec.srtt_us >= LATENCY_MS as u32 * 1000, "{uri}: {rec:?}");
                assert!(rec.rtt_min_us >= LATENCY_MS as u32 * 1000, "{uri}: {rec:?}");
                assert_eq!(rec.last_code, 200);
                srtts.push(rec.srtt_us as u64);
                up += 1;
            }
        }
    }
    assert_eq!((up, down), (CONTACTS as usize - dead_count, dead_count));
    // Typical RTT: the injected latency plus loopback and scheduling.
    srtts.sort_unstable();
    let median = srtts[srtts.len() / 2];
    assert!(
        median < LATENCY_MS * 1000 + 50_000,
        "median SRTT {median} µs for {LATENCY_MS} ms injected"
    );
    assert_eq!(sent, c(Counter::Sent));
    assert_eq!(answered, c(Counter::Matched));
}

#[test]
fn ipv4_uring_port_per_worker() {
    run(Run {
        v6: false,
        backend: "uring",
        steering: "port-per-worker",
    });
}

#[test]
fn ipv4_uring_shared_port() {
    run(Run {
        v6: false,
        backend: "uring",
        steering: "shared-port",
    });
}

#[test]
fn ipv4_mmsg_port_per_worker() {
    run(Run {
        v6: false,
        backend: "mmsg",
        steering: "port-per-worker",
    });
}

#[test]
fn ipv4_mmsg_shared_port() {
    run(Run {
        v6: false,
        backend: "mmsg",
        steering: "shared-port",
    });
}

#[test]
fn ipv6_uring_shared_port() {
    run(Run {
        v6: true,
        backend: "uring",
        steering: "shared-port",
    });
}

#[test]
fn ipv6_mmsg_port_per_worker() {
    run(Run {
        v6: true,
        backend: "mmsg",
        steering: "port-per-worker",
    });
}
