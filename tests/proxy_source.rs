//! Pinging as the proxy (DESIGN §10) over loopback, with Debian's Kamailio
//! as the proxy whose port kaping shares.
//!
//! Kamailio listens on `127.0.0.1:P` exactly (with `SO_REUSEADDR`, as it
//! always does); `kaping-loadgen serve` answers for simulated contacts
//! across 127.0.0.0/8, to the address each request came from; kaping runs
//! with `--source 127.0.0.1:P`. Each ping therefore leaves as Kamailio's
//! address, the reply goes to Kamailio, and Kamailio, which has no
//! transaction for it, forwards it statelessly to the second Via: kaping's
//! own socket (`replies = relay`). The tests check what an operator would:
//! every live contact Up, every dead one Down, every ping seen by the
//! responder as coming from `P`, nothing stray or forged; and that the
//! cases kaping must refuse are refused with the reason.
//!
//! The NAT itself (a phone that only a datagram from `P` reaches) is proven
//! in `nat_proxy.rs` with network namespaces; these run on any machine
//! with Kamailio installed (they skip with a message without it). Every
//! process is killed on drop; nothing leaves loopback.

mod common;
use common::{ctl, free_ports, start_kamailio, wait_with_deadline, Kamailio};

use std::collections::HashMap;
use std::io::Read;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kaping::shm::layout::{Counter, SLOT_DOWN, SLOT_UNMONITORED, SLOT_UP};
use kaping::shm::reader::ShmReader;

const CONTACTS: u32 = 1_000;
const DEAD: &str = "0.05";

static SERIAL: Mutex<()> = Mutex::new(());

fn kaping() -> &'static str {
    env!("CARGO_BIN_EXE_kaping")
}

fn loadgen() -> &'static str {
    env!("CARGO_BIN_EXE_kaping-loadgen")
}

/// A child process killed (and reaped) on drop, even when a test fails.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kamailio_binary() -> Option<PathBuf> {
    ["/usr/sbin/kamailio", "/usr/local/sbin/kamailio"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Kamailio as a stateless reply forwarder on `127.0.0.1:port`: it drops
/// every request and forwards every reply it has no transaction for to
/// the next Via, its core's default (`forward_reply`).
fn start_forwarder(port: u16) -> Option<Kamailio> {
    let cfg = format!(
        "#!KAMAILIO\n\
         debug=1\nlog_stderror=yes\nchildren=1\nauto_aliases=no\n\
         listen=udp:127.0.0.1:{port}\n\
         request_route {{\n    drop;\n}}\n"
    );
    start_kamailio(&cfg, format!("127.0.0.1:{port}").parse().unwrap())
}

struct Lab {
    dir: tempfile::TempDir,
    proxy_port: u16,
    fates: HashMap<String, String>,
    _kamailio: Option<Kamailio>,
    serve: Option<Proc>,
}

impl Lab {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Writes the contacts, starts Kamailio (unless `no_proxy`) and the
/// responder. `None` (after saying why) where Kamailio is missing.
fn lab(no_proxy: bool) -> Option<Lab> {
    if !no_proxy && kamailio_binary().is_none() {
        eprintln!("SKIP: kamailio is not installed (apt-get install kamailio)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let serve_port = free_ports(1);
    let contacts = Command::new(loadgen())
        .args(["contacts", "--count", &CONTACTS.to_string()])
        .args([
            "--port",
            &serve_port.to_string(),
            "--dead",
            DEAD,
            "--seed",
            "11",
        ])
        .arg("--out")
        .arg(p("contacts.txt"))
        .arg("--fates")
        .arg(p("fates.txt"))
        .status()
        .unwrap();
    assert!(contacts.success());
    let fates: HashMap<String, String> = std::fs::read_to_string(p("fates.txt"))
        .unwrap()
        .lines()
        .map(|l| {
            let (u, f) = l.split_once('\t').unwrap();
            (u.to_string(), f.to_string())
        })
        .collect();
    let proxy_port = free_ports(1);
    let kamailio = if no_proxy {
        None
    } else {
        Some(start_forwarder(proxy_port)?)
    };
    let serve = Command::new(loadgen())
        .args(["serve", "--listen", &format!("0.0.0.0:{serve_port}")])
        .args(["--dead", DEAD, "--seed", "11", "--seconds", "40", "--json"])
        .arg("--stop-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    Some(Lab {
        dir,
        proxy_port,
        fates,
        _kamailio: kamailio,
        serve: Some(Proc(serve)),
    })
}

/// Runs kaping with `args` for a few seconds; returns its stderr.
fn run_kaping(lab: &Lab, contacts: &Path, args: &[&str]) -> String {
    let bind = format!("127.0.0.1:{}", free_ports(2));
    let mut daemon = Command::new(kaping())
        .arg("run")
        .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
        .arg("--contacts")
        .arg(contacts)
        .arg("--shm")
        .arg(lab.path("shm"))
        .arg("--events")
        .arg(lab.path("events.jsonl"))
        .args(["--bind", &bind, "--workers", "2"])
        .args(["--interval", "1s", "--reply-timeout", "400ms"])
        .args(["--down-after", "2", "--run-for", "4s"])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_deadline(&mut daemon, Duration::from_secs(40));
    let mut stderr = String::new();
    daemon
        .stderr
        .as_mut()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "kaping run failed: {stderr}");
    stderr
}

/// Stops the responder and returns its counters.
fn responder_counters(lab: &mut Lab) -> serde_json::Value {
    let mut serve = lab.serve.take().unwrap();
    drop(serve.0.stdin.take());
    wait_with_deadline(&mut serve.0, Duration::from_secs(10));
    let mut out = String::new();
    serve
        .0
        .stdout
        .as_mut()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    serde_json::from_str(out.trim()).unwrap()
}

fn totals(shm: &ShmReader) -> [u64; Counter::COUNT] {
    let mut total = [0u64; Counter::COUNT];
    for w in 0..shm.header().workers {
        for (t, c) in total.iter_mut().zip(shm.counters(w)) {
            *t += c;
        }
    }
    total
}

/// Every live contact Up, every dead one Down, nothing stray or forged.
fn assert_all_decided(lab: &Lab) -> [u64; Counter::COUNT] {
    let shm = ShmReader::open(&lab.path("shm")).unwrap();
    let h = shm.header();
    let (mut uri, mut aor) = (Vec::new(), Vec::new());
    let mut seen = 0;
    for w in 0..h.workers {
        for slot in 0..h.slots_per_worker {
            let Some(rec) = shm.read_contact(w, slot, &mut uri, &mut aor) else {
                continue;
            };
            let uri = String::from_utf8(uri.clone()).unwrap();
            seen += 1;
            if lab.fates[&uri] == "dead" {
                assert_eq!(rec.state, SLOT_DOWN, "{uri}: {rec:?}");
            } else {
                assert_eq!(rec.state, SLOT_UP, "{uri}: {rec:?}");
                assert_eq!(rec.last_code, 200, "{uri}");
            }
        }
    }
    assert_eq!(seen, CONTACTS);
    let t = totals(&shm);
    let c = |k: Counter| t[k as usize];
    assert_eq!(c(Counter::Forged), 0);
    assert_eq!(c(Counter::Stray), 0);
    assert_eq!(c(Counter::ParseErrors), 0);
    assert_eq!(c(Counter::SendErrors), 0);
    t
}

#[test]
fn pings_leave_as_kamailio_and_it_relays_the_replies() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab(false) else { return };
    let source = format!("127.0.0.1:{}", lab.proxy_port);
    let stderr = run_kaping(
        &lab,
        &lab.path("contacts.txt"),
        &["--source", &source, "--replies", "relay"],
    );
    assert!(
        stderr.contains(&format!(
            "pinging as {source} (sharing the proxy's port), replies: relay"
        )),
        "{stderr}"
    );
    let t = assert_all_decided(&lab);
    let responder = responder_counters(&mut lab);
    // The responder answered every ping to where it came from: Kamailio.
    // Every answer reached kaping through it (matched, or late after the
    // stop), none lost.
    assert_eq!(
        responder["received"].as_u64().unwrap(),
        t[Counter::Sent as usize]
    );
    assert_eq!(
        responder["answered"].as_u64().unwrap(),
        t[Counter::Matched as usize] + t[Counter::Late as usize],
        "{responder}"
    );
}

#[test]
fn each_contact_leaves_from_its_registration_socket() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab(false) else { return };
    // JSON lines as a registrar would hand them over: half the contacts
    // carry Kamailio's socket, half none (they use source_default), plus
    // ones kaping must refuse, each with its reason.
    let mut jsonl = String::new();
    let uris: Vec<String> = std::fs::read_to_string(lab.path("contacts.txt"))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    for (i, uri) in uris.iter().enumerate() {
        if i % 2 == 0 {
            jsonl.push_str(&format!(
                "{{\"uri\":\"{uri}\",\"aor\":\"u{i}\",\"socket\":\"udp:127.0.0.1:{}\"}}\n",
                lab.proxy_port
            ));
        } else {
            jsonl.push_str(&format!("{{\"uri\":\"{uri}\",\"aor\":\"u{i}\"}}\n"));
        }
    }
    jsonl.push_str("{\"uri\":\"sip:x@127.0.0.9:5060\",\"socket\":\"tcp:127.0.0.1:5060\"}\n");
    jsonl.push_str("{\"uri\":\"sip:y@127.0.0.9:5060\",\"socket\":\"udp:192.0.2.1:5060\"}\n");
    let contacts = lab.path("contacts.jsonl");
    std::fs::write(&contacts, jsonl).unwrap();
    let source = format!("127.0.0.1:{}", lab.proxy_port);
    let stderr = run_kaping(
        &lab,
        &contacts,
        &["--source", "socket", "--source-default", &source],
    );
    assert!(
        stderr.contains(&format!("{CONTACTS} contacts loaded, 2 skipped")),
        "{stderr}"
    );
    assert!(
        stderr.contains("protocol tcp cannot carry kaping's pings"),
        "{stderr}"
    );
    assert!(
        stderr.contains("source 192.0.2.1:5060: 192.0.2.1 is not an address of this host"),
        "{stderr}"
    );
    assert_all_decided(&lab);
    // A user-only AoR takes the registrar's host as its domain (Kamailio
    // with use_domain off): the To of every ping is sip:u<i>@127.0.0.1.
    let shm = ShmReader::open(&lab.path("shm")).unwrap();
    let (mut uri, mut aor) = (Vec::new(), Vec::new());
    let rec = (0..shm.header().slots_per_worker)
        .find_map(|s| shm.read_contact(0, s, &mut uri, &mut aor))
        .unwrap();
    let to = String::from_utf8(aor.clone()).unwrap();
    assert!(
        to.starts_with("sip:u") && to.ends_with("@127.0.0.1"),
        "{to} {rec:?}"
    );
    let _ = responder_counters(&mut lab);
}

#[test]
fn with_the_proxy_down_replies_reach_the_shared_socket_and_only_tokens_count() {
    // No Kamailio: kaping warns that nothing holds the port, and the
    // replies (sent to P) reach its own shared socket, where they match
    // by token. Junk sent to P is counted and answered by nobody.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab(true) else { return };
    let source = format!("127.0.0.1:{}", lab.proxy_port);
    let junk = std::thread::spawn({
        let source = source.clone();
        move || {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            for _ in 0..20 {
                s.send_to(
                    b"REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKx\r\n\r\n",
                    &source,
                )
                .unwrap();
            }
            let mut buf = [0u8; 512];
            s.recv_from(&mut buf).is_err()
        }
    });
    let stderr = run_kaping(&lab, &lab.path("contacts.txt"), &["--source", &source]);
    assert!(stderr.contains("nothing is bound to"), "{stderr}");
    assert!(junk.join().unwrap(), "kaping answered a request");
    let shm = ShmReader::open(&lab.path("shm")).unwrap();
    let t = totals(&shm);
    assert!(t[Counter::ParseErrors as usize] >= 20, "junk counted");
    assert_eq!(t[Counter::Forged as usize], 0);
    assert_eq!(
        t[Counter::ContactsUp as usize] + t[Counter::ContactsDown as usize],
        CONTACTS as u64
    );
    let live = lab.fates.values().filter(|f| *f != "dead").count() as u64;
    assert_eq!(t[Counter::ContactsUp as usize], live);
    let _ = responder_counters(&mut lab);
}

#[test]
fn nat_only_keepalives_are_sent_and_never_shown_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab(false) else { return };
    let source = format!("127.0.0.1:{}", lab.proxy_port);
    run_kaping(
        &lab,
        &lab.path("contacts.txt"),
        &["--source", &source, "--keepalive", "null"],
    );
    let shm = ShmReader::open(&lab.path("shm")).unwrap();
    let t = totals(&shm);
    assert_eq!(t[Counter::ContactsUnmonitored as usize], CONTACTS as u64);
    assert_eq!(t[Counter::ContactsUp as usize], 0);
    assert_eq!(t[Counter::ContactsDown as usize], 0);
    assert_eq!(t[Counter::Matched as usize], 0);
    let (mut uri, mut aor) = (Vec::new(), Vec::new());
    for w in 0..shm.header().workers {
        for s in 0..shm.header().slots_per_worker {
            if let Some(rec) = shm.read_contact(w, s, &mut uri, &mut aor) {
                assert_eq!(rec.state, SLOT_UNMONITORED);
                assert!(rec.sent >= 3, "{rec:?}");
            }
        }
    }
    // No state-change events: nothing was learnt.
    let events = std::fs::read_to_string(lab.path("events.jsonl")).unwrap();
    assert_eq!(events.lines().count(), 0, "{events}");
    // The responder got 4-byte datagrams it could not parse, and answered
    // none of them.
    let responder = responder_counters(&mut lab);
    assert_eq!(responder["answered"].as_u64(), Some(0), "{responder}");
    assert_eq!(
        responder["received"].as_u64(),
        Some(t[Counter::Sent as usize]),
        "{responder}"
    );
}

#[test]
fn a_proxy_socket_that_cannot_be_shared_stops_the_start_with_the_reason() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // What a start with `--source SOURCE` says, failing.
    let refused = |source: &str| {
        let out = Command::new(kaping())
            .arg("run")
            .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
            .arg("--shm")
            .arg(dir.path().join("shm"))
            .args(["--bind", &format!("127.0.0.1:{}", free_ports(2))])
            .args(["--workers", "2", "--source", source, "--run-for", "1s"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{source} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Held without SO_REUSEADDR.
    let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
    let stderr = refused(&plain.local_addr().unwrap().to_string());
    assert!(
        stderr.contains("setting 'source': cannot share") && stderr.contains("SO_REUSEADDR"),
        "{stderr}"
    );
    // Held on the wildcard address.
    let wildcard = UdpSocket::bind("0.0.0.0:0").unwrap();
    let stderr = refused(&format!(
        "127.0.0.1:{}",
        wildcard.local_addr().unwrap().port()
    ));
    assert!(stderr.contains("the wildcard address"), "{stderr}");
    // IPv6 source without an IPv6 socket of kaping's own.
    let out = Command::new(kaping())
        .args(["run", "--source", "[::1]:5060", "--run-for", "1s"])
        .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("setting 'source': [::1]:5060 is IPv6 but kaping has no IPv6 socket"),
        "{stderr}"
    );
}

/// Starts a daemon with a control socket and state directory; waits for
/// the socket.
fn start_controlled(lab: &Lab, bind: &str, args: &[&str]) -> Proc {
    let sock = lab.path("ctl.sock");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new(kaping())
        .arg("run")
        .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
        .arg("--control")
        .arg(&sock)
        .arg("--state-dir")
        .arg(lab.path("state"))
        .arg("--shm")
        .arg(lab.path("shm"))
        .args(["--events", "none", "--bind", bind, "--workers", "2"])
        .args([
            "--interval",
            "1s",
            "--reply-timeout",
            "400ms",
            "--down-after",
            "2",
        ])
        .args(["--run-for", "60s"])
        .args(args)
        .stderr(std::fs::File::create(lab.path("daemon.err")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Proc(child)
}

fn stop(mut p: Proc) {
    // SIGTERM: a clean stop writes the final snapshot.
    // SAFETY-free: `kill` from the command line.
    let _ = Command::new("kill")
        .args(["-TERM", &p.0.id().to_string()])
        .status();
    assert!(wait_with_deadline(&mut p.0, Duration::from_secs(20)).success());
}

#[test]
fn contacts_added_at_run_time_keep_their_socket_across_a_restart() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab(false) else { return };
    // Ten live contacts, as a registrar would add them with their socket.
    let live: Vec<String> = std::fs::read_to_string(lab.path("contacts.txt"))
        .unwrap()
        .lines()
        .filter(|u| lab.fates[*u] != "dead")
        .take(10)
        .map(str::to_owned)
        .collect();
    let socket = format!("udp:127.0.0.1:{}", lab.proxy_port);
    let mut jsonl = String::new();
    for (i, u) in live.iter().enumerate() {
        jsonl.push_str(&format!(
            "{{\"uri\":\"{u}\",\"aor\":\"u{i}\",\"socket\":\"{socket}\"}}\n"
        ));
    }
    std::fs::write(lab.path("add.jsonl"), jsonl).unwrap();
    let bind = format!("127.0.0.1:{}", free_ports(2));
    let sock = lab.path("ctl.sock");
    let daemon = start_controlled(&lab, &bind, &["--source", "socket"]);
    ctl(
        &sock,
        &[
            "keepalive.add",
            "--file",
            lab.path("add.jsonl").to_str().unwrap(),
        ],
    );
    // One with an explicit source and a NAT-only keepalive, by flags.
    let extra = &lab
        .fates
        .iter()
        .find(|(u, f)| *f != "dead" && !live.contains(u))
        .unwrap()
        .0
        .clone();
    let source = format!("127.0.0.1:{}", lab.proxy_port);
    ctl(
        &sock,
        &[
            "keepalive.add",
            extra,
            "--source",
            &source,
            "--keepalive",
            "crlf",
        ],
    );
    // A bad source is refused with the reason, and nothing is added.
    let out = Command::new(kaping())
        .arg("ctl")
        .arg("--control")
        .arg(&sock)
        .args([
            "keepalive.add",
            "sip:z@127.0.0.9:5060",
            "--source",
            "nowhere",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("source: socket 'nowhere'"), "{e}");
    std::thread::sleep(Duration::from_secs(3));
    let check = |when: &str| {
        for (i, u) in live.iter().enumerate() {
            let c = ctl(&sock, &["keepalive.get", u, "--aor", &format!("u{i}")]);
            assert_eq!(c["state"], "up", "{when}: {c}");
            assert_eq!(c["socket"], socket.as_str(), "{when}: {c}");
        }
        let c = ctl(&sock, &["keepalive.get", extra]);
        assert_eq!(
            (c["state"].as_str(), c["keepalive"].as_str()),
            (Some("unmonitored"), Some("crlf")),
            "{when}: {c}"
        );
        assert_eq!(c["ping_source"], source.as_str(), "{when}: {c}");
    };
    check("before the restart");
    stop(daemon);
    // Restarted from its state directory: same sockets, same sources.
    let daemon = start_controlled(&lab, &bind, &["--source", "socket"]);
    std::thread::sleep(Duration::from_secs(3));
    check("after the restart");
    stop(daemon);
    let _ = responder_counters(&mut lab);
}

#[test]
fn the_proxy_bench_reports_each_mode_against_bind_in_one_run() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if kamailio_binary().is_none() {
        eprintln!("SKIP: kamailio is not installed (apt-get install kamailio)");
        return;
    }
    // Small and short: the report's shape and its bookkeeping, not speed
    // (tuning.md has the figures, from release builds).
    let out = Command::new(loadgen())
        .args(["proxy-bench", "--contacts", "2000", "--interval", "1s"])
        .args([
            "--seconds",
            "2",
            "--warmup",
            "1",
            "--modes",
            "bind,relay",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let modes = r["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 2, "{r}");
    let (bind, relay) = (&modes[0], &modes[1]);
    assert_eq!(
        (bind["mode"].as_str(), relay["mode"].as_str()),
        (Some("bind"), Some("relay"))
    );
    for m in modes {
        let answered = m["answered_per_s"].as_f64().unwrap();
        assert!((1500.0..2500.0).contains(&answered), "{m}");
        assert!(m["kaping_cpu_us_per_ping"].as_f64().unwrap() > 0.0, "{m}");
    }
    assert!(bind["kaping_over_bind"].is_null());
    assert!(relay["kaping_over_bind"].as_f64().unwrap() > 0.0);
    assert!(
        relay["replies"].as_str().unwrap().starts_with("relay"),
        "{relay}"
    );
    // Kamailio works only when the replies go through it.
    assert!(
        relay["kamailio_cpu_us_per_ping"].as_f64().unwrap() > 0.0,
        "{relay}"
    );
    assert!(
        bind["kamailio_cpu_ms_per_s"].as_f64().unwrap()
            < relay["kamailio_cpu_ms_per_s"].as_f64().unwrap(),
        "{r}"
    );
}
