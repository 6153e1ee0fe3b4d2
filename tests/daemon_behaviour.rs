//! End to end over loopback: the liveness behaviour an operator relies on,
//! one setting at a time. `kaping-loadgen serve` plays a SIP platform whose
//! contacts have known fates (dead, answering with an error code, flapping),
//! `kaping run` pings them, and each test checks the exact outcome in the
//! events file and the shared-memory file:
//!
//! - `alive_codes`: a 503 keeps a contact Up by default (any response proves
//!   it alive, as nathelper does) and takes it Down with `error_reply` when
//!   only 2xx count;
//! - `remove_after`: a dead contact goes Down, then Removed, its slot freed
//!   and it is no longer pinged;
//! - `retries`: retransmissions (T1 doubling, RFC 3261 §17.1.2.2) hide
//!   request loss that takes contacts Down without them;
//! - flapping contacts produce alternating, valid transitions;
//! - a per-contact interval from a JSON-lines file overrides the default;
//! - `rate_limit` caps pings per second;
//! - the process: SIGTERM stops it cleanly, start-up failures are one clear
//!   message and a non-zero exit.
//!
//! Each test is small (≤ 2,000 contacts), bounded in time and serialized
//! (the machine has two cores); nothing leaves loopback.

mod common;
use common::{free_ports, wait_with_deadline};
use std::collections::HashMap;
use std::io::Read;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kaping::shm::layout::{Counter, SlotRecord, SLOT_DOWN, SLOT_UNKNOWN, SLOT_UP};
use kaping::shm::reader::ShmReader;
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn kaping() -> &'static str {
    env!("CARGO_BIN_EXE_kaping")
}

fn loadgen() -> &'static str {
    env!("CARGO_BIN_EXE_kaping-loadgen")
}

/// One scenario: a temporary directory, a contacts file with its fates, and
/// the responder answering for them.
struct Lab {
    dir: tempfile::TempDir,
    /// URI -> fate word (`ok`, `dead`, `error:<code>`, `flap:<phase_ms>`).
    fates: HashMap<String, String>,
    serve: Option<Child>,
}

/// Fate options given identically to `contacts` and `serve`, so the fates
/// file says what the responder will do.
const SEED: &str = "11";

impl Lab {
    /// Writes `count` contacts with the fates of `fate_args`, and starts the
    /// responder with the same fates plus `serve_args`.
    fn new(count: u32, fate_args: &[&str], serve_args: &[&str]) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let serve_port = free_ports(1);
        let status = Command::new(loadgen())
            .args(["contacts", "--count", &count.to_string()])
            .args(["--port", &serve_port.to_string(), "--seed", SEED])
            .args(fate_args)
            .arg("--out")
            .arg(dir.path().join("contacts.txt"))
            .arg("--fates")
            .arg(dir.path().join("fates.txt"))
            .status()
            .unwrap();
        assert!(status.success());
        let fates: HashMap<String, String> = std::fs::read_to_string(dir.path().join("fates.txt"))
            .unwrap()
            .lines()
            .map(|l| {
                let (uri, fate) = l.split_once('\t').unwrap();
                (uri.to_string(), fate.to_string())
            })
            .collect();
        assert_eq!(fates.len(), count as usize);
        let serve = Command::new(loadgen())
            .args(["serve", "--listen", &format!("0.0.0.0:{serve_port}")])
            .args(["--seed", SEED, "--seconds", "60", "--json"])
            .args(fate_args)
            .args(serve_args)
            .arg("--stop-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The responder binds before it reads anything; give it that long.
        std::thread::sleep(Duration::from_millis(200));
        Lab {
            dir,
            fates,
            serve: Some(serve),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn count_fate(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.fates.values().filter(|f| pred(f)).count()
    }

    /// `kaping run` on the contacts file with `args` (which must include
    /// `--run-for`), waited for; returns its stderr. Panics unless it exits 0.
    fn run_daemon(&self, contacts: &Path, workers: u16, args: &[&str]) -> String {
        let mut child = self.daemon(contacts, workers, args).spawn().unwrap();
        let status = wait_with_deadline(&mut child, Duration::from_secs(30));
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert!(status.success(), "kaping run failed: {stderr}");
        stderr
    }

    fn daemon(&self, contacts: &Path, workers: u16, args: &[&str]) -> Command {
        let bind_port = free_ports(workers);
        let mut cmd = Command::new(kaping());
        cmd.arg("run")
            .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
            .arg("--contacts")
            .arg(contacts)
            .arg("--shm")
            .arg(self.path("shm"))
            .arg("--events")
            .arg(self.path("events.jsonl"))
            .args(["--bind", &format!("127.0.0.1:{bind_port}")])
            .args(["--workers", &workers.to_string(), "--max-contacts", "4096"])
            .args(["--pin-workers", "false"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Stops the responder and returns its counters.
    fn stop_serve(&mut self) -> Value {
        let mut serve = self.serve.take().expect("responder running");
        drop(serve.stdin.take());
        wait_with_deadline(&mut serve, Duration::from_secs(10));
        let mut out = String::new();
        serve
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        serde_json::from_str(out.trim()).unwrap()
    }

    /// Events per URI, in file order (each worker writes one contact's
    /// events in order; the main thread keeps each worker's order).
    fn events(&self) -> HashMap<String, Vec<Value>> {
        let text = std::fs::read_to_string(self.path("events.jsonl")).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "torn last line");
        let mut by_uri: HashMap<String, Vec<Value>> = HashMap::new();
        for line in text.lines() {
            let e: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            let uri = e["uri"].as_str().unwrap().to_string();
            assert!(self.fates.contains_key(&uri), "event for unknown {uri}");
            by_uri.entry(uri).or_default().push(e);
        }
        by_uri
    }

    fn shm(&self) -> Shm {
        Shm(ShmReader::open(&self.path("shm")).unwrap())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut s) = self.serve.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

struct Shm(ShmReader);

impl Shm {
    /// Counters summed over workers.
    fn totals(&self) -> [u64; Counter::COUNT] {
        let mut total = [0u64; Counter::COUNT];
        for w in 0..self.0.header().workers {
            for (t, c) in total.iter_mut().zip(self.0.counters(w)) {
                *t += c;
            }
        }
        total
    }

    /// Every occupied slot by URI: (worker, slot, record).
    fn contacts(&self) -> HashMap<String, (u32, u32, SlotRecord)> {
        let h = self.0.header();
        let (mut uri, mut aor) = (Vec::new(), Vec::new());
        let mut out = HashMap::new();
        for w in 0..h.workers {
            for slot in 0..h.slots_per_worker {
                if let Some(rec) = self.0.read_contact(w, slot, &mut uri, &mut aor) {
                    let u = String::from_utf8(uri.clone()).unwrap();
                    assert!(out.insert(u.clone(), (w, slot, rec)).is_none(), "{u} twice");
                }
            }
        }
        out
    }
}

fn c(total: &[u64; Counter::COUNT], k: Counter) -> u64 {
    total[k as usize]
}

fn field<'a>(e: &'a Value, k: &str) -> &'a str {
    e[k].as_str().unwrap_or("")
}

/// Checks that a contact's events form a valid chain: the first leaves
/// Unknown, each starts where the previous ended, none is a self-loop, and
/// the reason fits the new state.
fn assert_valid_chain(uri: &str, events: &[Value]) {
    let mut state = "unknown";
    for e in events {
        assert_eq!(field(e, "old"), state, "{uri}: broken chain at {e}");
        let new = field(e, "new");
        assert_ne!(new, state, "{uri}: self transition {e}");
        match new {
            "up" => assert_eq!(field(e, "reason"), "reply", "{e}"),
            "down" | "removed" => assert!(
                ["timeout", "error_reply", "unreachable"].contains(&field(e, "reason")),
                "{e}"
            ),
            other => panic!("{uri}: transition to {other}: {e}"),
        }
        state = new;
    }
}

// --- 1. alive_codes ---------------------------------------------------------

/// 30 % of contacts answer 503. Returns the lab after the run.
fn error_503_run(alive_codes: Option<&str>) -> Lab {
    let mut lab = Lab::new(600, &["--error", "0.3", "--error-code", "503"], &[]);
    let mut args = vec!["--interval", "1s", "--reply-timeout", "300ms"];
    args.extend(["--down-after", "2", "--run-for", "3500ms"]);
    if let Some(codes) = alive_codes {
        args.extend(["--alive-codes", codes]);
    }
    lab.run_daemon(&lab.path("contacts.txt"), 2, &args);
    lab.stop_serve();
    lab
}

#[test]
fn alive_codes_any_keeps_503_contacts_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = error_503_run(None);
    let errors = lab.count_fate(|f| f == "error:503");
    assert!((120..240).contains(&errors), "{errors} error contacts");

    let events = lab.events();
    assert_eq!(events.len(), lab.fates.len(), "one contact, one event");
    for (uri, fate) in &lab.fates {
        let ev = &events[uri];
        assert_eq!(ev.len(), 1, "{uri}: {ev:?}");
        let e = &ev[0];
        assert_eq!(
            (field(e, "old"), field(e, "new"), field(e, "reason")),
            ("unknown", "up", "reply"),
            "{e}"
        );
        let code = if fate == "error:503" { 503 } else { 200 };
        assert_eq!(e["code"], code, "{e}");
    }
    let shm = lab.shm();
    let t = shm.totals();
    assert_eq!(c(&t, Counter::ContactsUp), lab.fates.len() as u64);
    assert_eq!(c(&t, Counter::ContactsDown), 0);
    assert_eq!(c(&t, Counter::TimedOut), 0);
    for (uri, (_, _, rec)) in shm.contacts() {
        assert_eq!(rec.state, SLOT_UP, "{uri}");
        assert_eq!(rec.misses, 0, "{uri}");
        let code = if lab.fates[&uri] == "error:503" {
            503
        } else {
            200
        };
        assert_eq!(rec.last_code, code, "{uri}");
    }
}

#[test]
fn alive_codes_2xx_takes_503_contacts_down() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = error_503_run(Some("200-299"));
    let events = lab.events();
    assert_eq!(events.len(), lab.fates.len());
    for (uri, fate) in &lab.fates {
        let ev = &events[uri];
        assert_eq!(ev.len(), 1, "{uri}: {ev:?}");
        let e = &ev[0];
        if fate == "error:503" {
            // Answered, but not alive: a miss each time, Down after exactly
            // down_after of them, without ever being Up.
            assert_eq!(
                (field(e, "old"), field(e, "new"), field(e, "reason")),
                ("unknown", "down", "error_reply"),
                "{e}"
            );
            assert_eq!(e["misses"], 2, "{e}");
            assert_eq!(e["code"], 503, "{e}");
        } else {
            assert_eq!(
                (field(e, "old"), field(e, "new"), field(e, "reason")),
                ("unknown", "up", "reply"),
                "{e}"
            );
        }
    }
    let errors = lab.count_fate(|f| f == "error:503") as u64;
    let shm = lab.shm();
    let t = shm.totals();
    assert_eq!(c(&t, Counter::ContactsDown), errors);
    assert_eq!(c(&t, Counter::ContactsUp), lab.fates.len() as u64 - errors);
    // Error replies are answers, not timeouts.
    assert_eq!(c(&t, Counter::TimedOut), 0);
    for (uri, (_, _, rec)) in shm.contacts() {
        if lab.fates[&uri] == "error:503" {
            assert_eq!(rec.state, SLOT_DOWN, "{uri}");
            assert_eq!(rec.last_code, 503, "{uri}");
            assert!(rec.misses >= 2, "{uri}: {rec:?}");
            assert_eq!(rec.answered, rec.sent, "{uri}: every ping answered");
        } else {
            assert_eq!((rec.state, rec.last_code), (SLOT_UP, 200), "{uri}");
        }
    }
}

#[test]
fn alive_codes_error_replies_are_counted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = error_503_run(Some("200-299"));
    let shm = lab.shm();
    let answered_503: u64 = shm
        .contacts()
        .iter()
        .filter(|(uri, _)| lab.fates[*uri] == "error:503")
        .map(|(_, (_, _, rec))| rec.answered as u64)
        .sum();
    assert!(answered_503 > 0);
    assert_eq!(c(&shm.totals(), Counter::ErrorReplies), answered_503);
}

// --- 2. remove_after --------------------------------------------------------

#[test]
fn remove_after_drops_dead_contacts_and_frees_their_slots() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new(500, &["--dead", "0.2"], &[]);
    let dead = lab.count_fate(|f| f == "dead");
    assert!((60..140).contains(&dead), "{dead} dead");
    let live = lab.fates.len() - dead;
    lab.run_daemon(
        &lab.path("contacts.txt"),
        2,
        &[
            "--interval",
            "1s",
            "--reply-timeout",
            "300ms",
            "--down-after",
            "1",
            "--remove-after",
            "2",
            "--run-for",
            "3500ms",
        ],
    );
    let responder = lab.stop_serve();

    let events = lab.events();
    assert_eq!(events.len(), lab.fates.len());
    let shm = lab.shm();
    let slots = shm.contacts();
    for (uri, fate) in &lab.fates {
        let ev = &events[uri];
        assert_valid_chain(uri, ev);
        if fate == "dead" {
            let chain: Vec<_> = ev
                .iter()
                .map(|e| (field(e, "old"), field(e, "new"), field(e, "reason")))
                .collect();
            assert_eq!(
                chain,
                [
                    ("unknown", "down", "timeout"),
                    ("down", "removed", "timeout")
                ],
                "{uri}"
            );
            assert_eq!(
                (ev[0]["misses"].as_u64(), ev[1]["misses"].as_u64()),
                (Some(1), Some(2))
            );
            // The slot named by the event is free now.
            let (w, slot) = (
                ev[1]["worker"].as_u64().unwrap(),
                ev[1]["slot"].as_u64().unwrap(),
            );
            let (mut u, mut a) = (Vec::new(), Vec::new());
            assert!(
                shm.0
                    .read_contact(w as u32, slot as u32, &mut u, &mut a)
                    .is_none(),
                "{uri}: slot {w}/{slot} still occupied"
            );
            assert!(!slots.contains_key(uri), "{uri} still in shm");
        } else {
            assert_eq!(ev.len(), 1, "{uri}: {ev:?}");
            assert_eq!(
                (field(&ev[0], "new"), field(&ev[0], "reason")),
                ("up", "reply")
            );
            let (_, _, rec) = slots[uri];
            assert_eq!((rec.state, rec.misses), (SLOT_UP, 0), "{uri}");
        }
    }
    assert_eq!(slots.len(), live, "only live contacts keep a slot");
    let t = shm.totals();
    assert_eq!(c(&t, Counter::ContactsRemoved), dead as u64);
    assert_eq!(c(&t, Counter::ContactsDown), 0);
    assert_eq!(c(&t, Counter::ContactsUp), live as u64);
    assert_eq!(c(&t, Counter::TimedOut), 2 * dead as u64);
    // A removed contact is pinged no more: exactly two pings each, and the
    // responder saw nothing else.
    let live_sent: u64 = slots.values().map(|(_, _, r)| r.sent as u64).sum();
    assert_eq!(c(&t, Counter::Sent), live_sent + 2 * dead as u64);
    assert_eq!(responder["received"].as_u64(), Some(c(&t, Counter::Sent)));
}

// --- 3. retries -------------------------------------------------------------

/// 400 contacts whose responder drops half the requests at random.
fn lossy_run(args: &[&str]) -> Lab {
    let mut lab = Lab::new(400, &[], &["--loss", "0.5"]);
    lab.run_daemon(&lab.path("contacts.txt"), 2, args);
    lab.stop_serve();
    lab
}

#[test]
fn retries_keep_lossy_contacts_up() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A ping is 3 transmissions (T1 = 500 ms, then 1 s, then reply_timeout
    // 500 ms: 2 s in all, within the 4 s interval); all three are lost with
    // probability 1/8. In 9 s each contact completes at most two pings, so
    // with down_after 3 no contact may go Down however unlucky.
    let lab = lossy_run(&[
        "--retries",
        "2",
        "--interval",
        "4s",
        "--reply-timeout",
        "500ms",
        "--down-after",
        "3",
        "--run-for",
        "9s",
    ]);
    let events = lab.events();
    for (uri, ev) in &events {
        assert_eq!(ev.len(), 1, "{uri}: {ev:?}");
        assert_eq!(
            (
                field(&ev[0], "old"),
                field(&ev[0], "new"),
                field(&ev[0], "reason")
            ),
            ("unknown", "up", "reply"),
            "{uri}"
        );
    }
    // A contact stays Unknown only if every transmission of both its pings
    // was lost (1/64) or its first ping came too late to be retried: 90 %
    // of 400 is ~16 standard deviations below the ~97 % expected.
    assert!(events.len() >= 360, "{} of 400 Up", events.len());

    let shm = lab.shm();
    let t = shm.totals();
    let (matched, missed) = (c(&t, Counter::Matched), c(&t, Counter::TimedOut));
    let retries = c(&t, Counter::Retries);
    // Each completed ping retransmits once with p 1/2 and twice with p 1/4:
    // 0.75 per ping; and is missed with p 1/8 (1/2 without retries).
    let pings = (matched + missed) as f64;
    assert!(pings >= 600.0, "{matched} matched + {missed} missed");
    let per_ping = retries as f64 / pings;
    assert!(
        (0.55..0.95).contains(&per_ping),
        "{retries} retries for {pings} pings"
    );
    let miss_rate = missed as f64 / pings;
    assert!(miss_rate < 0.22, "{missed} missed of {pings} pings");
    assert_eq!(c(&t, Counter::ContactsDown), 0);
    for (uri, (_, _, rec)) in shm.contacts() {
        if rec.answered > 0 {
            assert_eq!(rec.state, SLOT_UP, "{uri}: {rec:?}");
        } else {
            assert_eq!(rec.state, SLOT_UNKNOWN, "{uri}: {rec:?}");
        }
        assert!(rec.misses < 3, "{uri}: {rec:?}");
    }
}

#[test]
fn without_retries_the_same_loss_takes_contacts_down() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // One transmission per ping, lost with p 1/2, and one miss is Down: of
    // 400 contacts, the number whose first ping is lost is Binomial(400, 1/2)
    // (mean 200, sd 10); 120..280 is 8 sd either way.
    let lab = lossy_run(&[
        "--interval",
        "4s",
        "--reply-timeout",
        "500ms",
        "--down-after",
        "1",
        "--run-for",
        "5s",
    ]);
    let events = lab.events();
    let mut first_down = 0;
    for (uri, ev) in &events {
        assert_valid_chain(uri, ev);
        if field(&ev[0], "new") == "down" {
            first_down += 1;
            assert_eq!(field(&ev[0], "reason"), "timeout", "{uri}");
            assert_eq!(ev[0]["misses"], 1, "{uri}");
        }
    }
    assert!(
        (120..280).contains(&first_down),
        "{first_down} of 400 down at once"
    );
    let t = lab.shm().totals();
    assert_eq!(c(&t, Counter::Retries), 0);
}

// --- 4. flapping ------------------------------------------------------------

#[test]
fn flapping_contacts_alternate_up_and_down() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new(500, &["--flap", "0.2", "--flap-period", "2s"], &[]);
    let flapping = lab.count_fate(|f| f.starts_with("flap:"));
    assert!((60..140).contains(&flapping), "{flapping} flapping");
    lab.run_daemon(
        &lab.path("contacts.txt"),
        2,
        &[
            "--interval",
            "500ms",
            "--reply-timeout",
            "200ms",
            "--down-after",
            "2",
            "--run-for",
            "9s",
        ],
    );
    lab.stop_serve();
    let events = lab.events();
    let mut long_chains = 0;
    let mut most = 0;
    for (uri, fate) in &lab.fates {
        let ev = &events[uri];
        assert_valid_chain(uri, ev);
        if fate.starts_with("flap:") {
            // 2 s answering, 2 s silent: Down within 1 s of silence (two
            // missed 500 ms pings), Up at the first answer. In 9 s at least
            // two silent periods start, so every flapping contact changes
            // state several times.
            assert!(ev.len() >= 3, "{uri}: {} events", ev.len());
            long_chains += 1;
            most = most.max(ev.len());
            for e in ev.iter().filter(|e| field(e, "new") == "down") {
                assert_eq!(
                    (field(e, "reason"), e["misses"].as_u64()),
                    ("timeout", Some(2))
                );
            }
        } else {
            assert_eq!(ev.len(), 1, "{uri}: a steady contact flapped: {ev:?}");
            assert_eq!(field(&ev[0], "new"), "up", "{uri}");
        }
    }
    assert_eq!(long_chains, flapping);
    // 9 s of 2 s periods: at most 3 silent periods, so at most 7 events.
    assert!(most <= 7, "{most} events for one contact");
}

// --- 5. per-contact interval ------------------------------------------------

#[test]
fn per_contact_interval_overrides_the_default() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new(200, &[], &[]);
    // Half the contacts every 300 ms, the others at the default 3 s.
    let text = std::fs::read_to_string(lab.path("contacts.txt")).unwrap();
    let mut jsonl = String::new();
    let mut fast = HashMap::new();
    for (i, uri) in text.lines().enumerate() {
        let rec = if i % 2 == 0 {
            serde_json::json!({"uri": uri, "interval": "300ms"})
        } else {
            serde_json::json!({"uri": uri})
        };
        fast.insert(uri.to_string(), i % 2 == 0);
        jsonl.push_str(&rec.to_string());
        jsonl.push('\n');
    }
    std::fs::write(lab.path("contacts.jsonl"), jsonl).unwrap();
    let stderr = lab.run_daemon(
        &lab.path("contacts.jsonl"),
        2,
        &[
            "--interval",
            "3s",
            "--reply-timeout",
            "200ms",
            "--run-for",
            "4s",
        ],
    );
    assert!(
        stderr.contains("200 contacts loaded, 0 skipped"),
        "{stderr}"
    );
    lab.stop_serve();
    let slots = lab.shm().contacts();
    assert_eq!(slots.len(), 200);
    let (mut fast_min, mut slow_max) = (u32::MAX, 0);
    for (uri, (_, _, rec)) in &slots {
        assert_eq!(rec.state, SLOT_UP, "{uri}");
        if fast[uri] {
            assert_eq!(rec.interval_ms, 300, "{uri}");
            fast_min = fast_min.min(rec.sent);
        } else {
            assert_eq!(rec.interval_ms, 3000, "{uri}");
            slow_max = slow_max.max(rec.sent);
        }
    }
    // 4 s at 300 ms, first ping within 300 ms: 13 or 14 pings (10 leaves
    // room for a loaded machine); at 3 s: one or two.
    assert!(fast_min >= 10, "fast contacts sent {fast_min}");
    assert!((1..=2).contains(&slow_max), "slow contacts sent {slow_max}");
    assert!(fast_min >= 5 * slow_max);
}

// --- 6. rate_limit ----------------------------------------------------------

/// 2,000 contacts due every second (2,000 pings/s asked) under a 500/s cap.
/// Returns (pings per second measured over the steady part, final totals).
fn rate_limited_run() -> (f64, [u64; Counter::COUNT]) {
    let mut lab = Lab::new(2000, &[], &[]);
    let mut child = lab
        .daemon(
            &lab.path("contacts.txt"),
            2,
            &[
                "--interval",
                "1s",
                "--reply-timeout",
                "300ms",
                "--rate-limit",
                "500",
                "--run-for",
                "5s",
            ],
        )
        .spawn()
        .unwrap();
    let started = Instant::now();
    // Measure from 1 s to 4 s in: past the start, before the stop.
    let sent_at = |at: Duration| -> (Instant, u64) {
        std::thread::sleep(at.saturating_sub(started.elapsed()));
        let shm = Shm(ShmReader::open(&lab.path("shm")).unwrap());
        (Instant::now(), c(&shm.totals(), Counter::Sent))
    };
    let (t0, s0) = sent_at(Duration::from_secs(1));
    let (t1, s1) = sent_at(Duration::from_secs(4));
    let status = wait_with_deadline(&mut child, Duration::from_secs(20));
    assert!(status.success());
    lab.stop_serve();
    let rate = (s1 - s0) as f64 / (t1 - t0).as_secs_f64();
    eprintln!("{} pings in {:?}: {rate:.0}/s", s1 - s0, t1 - t0);
    (rate, lab.shm().totals())
}

#[test]
fn rate_limit_caps_pings_per_second() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (rate, t) = rate_limited_run();
    assert!(
        (375.0..=625.0).contains(&rate),
        "{rate:.0} pings/s under a 500/s cap"
    );
    // Over the whole 5 s run (plus the drain) not more than the cap allows.
    assert!(
        c(&t, Counter::Sent) <= 5 * 500 * 5 / 4,
        "{} sent",
        c(&t, Counter::Sent)
    );
    // Deferred pings are sent late, not lost: nothing timed out.
    assert_eq!(c(&t, Counter::TimedOut), 0);
    assert_eq!(c(&t, Counter::ContactsDown), 0);
}

#[test]
fn rate_limit_deferrals_are_counted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (rate, t) = rate_limited_run();
    assert!(rate < 1000.0, "{rate:.0}/s: the cap did defer pings");
    assert!(c(&t, Counter::RateLimited) > 0);
}

// --- 7. the process ---------------------------------------------------------

#[test]
fn sigterm_stops_cleanly_within_reply_timeout() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::new(300, &["--dead", "0.1"], &[]);
    let mut child = lab
        .daemon(
            &lab.path("contacts.txt"),
            2,
            &[
                "--interval",
                "1s",
                "--reply-timeout",
                "500ms",
                "--down-after",
                "1",
            ],
        )
        .spawn()
        .unwrap();
    // Every contact has had a ping answered or missed by 1.5 s.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(child.try_wait().unwrap().is_none(), "exited on its own");
    let sent = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = wait_with_deadline(&mut child, Duration::from_secs(10));
    let took = sent.elapsed();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{status}: {stderr}");
    assert!(took < Duration::from_millis(2500), "stopped in {took:?}");
    lab.stop_serve();

    let shm = lab.shm();
    assert!(shm.0.header().stopped, "shm not marked stopped");
    let t = shm.totals();
    let events = lab.events();
    assert_eq!(events.len(), lab.fates.len(), "an event for every contact");
    let (mut up, mut down) = (0, 0);
    for (uri, ev) in &events {
        assert_eq!(ev.len(), 1, "{uri}: {ev:?}");
        let want = if lab.fates[uri] == "dead" {
            "down"
        } else {
            "up"
        };
        assert_eq!(field(&ev[0], "new"), want, "{uri}");
        if want == "up" {
            up += 1;
        } else {
            down += 1;
        }
    }
    // The file holds every change the workers published.
    assert_eq!(
        (c(&t, Counter::ContactsUp), c(&t, Counter::ContactsDown)),
        (up, down)
    );
    assert_eq!(down as usize, lab.count_fate(|f| f == "dead"));
}

/// Runs `kaping run` with `args` and expects it to refuse to start; returns
/// stderr.
fn refused(dir: &Path, args: &[&str]) -> String {
    let mut child = Command::new(kaping())
        .arg("run")
        .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
        .arg("--shm")
        .arg(dir.join("shm"))
        .args([
            "--events",
            "none",
            "--max-contacts",
            "1024",
            "--pin-workers",
            "false",
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_deadline(&mut child, Duration::from_secs(10));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "started: {stderr}");
    assert_eq!(status.code(), Some(1), "{status}: {stderr}");
    stderr
}

#[test]
fn port_in_use_is_one_line_naming_the_address() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let port = free_ports(1);
    let holder = UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let stderr = refused(dir.path(), &["--bind", &addr, "--workers", "1"]);
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(&addr) && lines[0].contains("in use"),
        "{stderr}"
    );
    drop(holder);
}

#[test]
fn invalid_interval_names_the_setting() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let bind = format!("127.0.0.1:{}", free_ports(1));
    let stderr = refused(dir.path(), &["--bind", &bind, "--interval", "5ms"]);
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("interval") && lines[0].contains("5ms"),
        "{stderr}"
    );
    // Refused before anything was created.
    assert!(!dir.path().join("shm").exists());
}

#[test]
fn missing_contacts_file_names_the_path() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-contacts.txt");
    let bind = format!("127.0.0.1:{}", free_ports(1));
    let stderr = refused(
        dir.path(),
        &[
            "--bind",
            &bind,
            "--workers",
            "1",
            "--contacts",
            missing.to_str().unwrap(),
        ],
    );
    let last = stderr.lines().last().unwrap_or("");
    assert!(last.contains(missing.to_str().unwrap()), "{stderr}");
}

#[test]
fn missing_contacts_file_leaves_no_live_looking_shm() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-contacts.txt");
    let bind = format!("127.0.0.1:{}", free_ports(1));
    refused(
        dir.path(),
        &[
            "--bind",
            &bind,
            "--workers",
            "1",
            "--contacts",
            missing.to_str().unwrap(),
        ],
    );
    let shm = dir.path().join("shm");
    if shm.exists() {
        let h = ShmReader::open(&shm).unwrap().header();
        assert!(h.stopped, "refused start left {h:?}");
    }
}
