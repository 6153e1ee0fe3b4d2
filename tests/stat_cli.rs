//! `kaping-stat` against a shm file written by the library writer with known
//! figures: every mode (summary text and JSON, get, dump, Prometheus once and
//! over HTTP), the daemon's liveness verdicts, and the refusals (missing
//! file, a file this user may not read, other layout version, foreign file).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::mem::offset_of;
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod common;
use common::promtool_check;

use kaping::shm::layout::{
    bucket_index, percentile, Counter, Header, RegistrarFigures, RegistrarStat, SlotRecord,
    HEADER_SIZE, HIST_BUCKETS, SLOT_DOWN, SLOT_REMOVED, SLOT_UNKNOWN, SLOT_UP, VERSION,
};
use kaping::shm::reader::ShmReader;
use kaping::shm::writer::{unix_now_ms, ShmConfig, ShmFile, WorkerShm};
use kaping::timefmt::rfc3339_ms;
use kaping::wire::reply::Reject;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_kaping-stat");
const PING_MS: u64 = 1_700_000_000_000;

/// One contact of the fixture: (worker, slot, state, uri, aor, addr, srtt µs, misses, sent, answered).
type Spec = (
    u32,
    u32,
    u8,
    &'static str,
    &'static str,
    &'static str,
    u32,
    u16,
    u32,
    u32,
);

/// Alice has two devices (one AoR, two contacts); slots have gaps.
const CONTACTS: [Spec; 8] = [
    (
        0,
        0,
        SLOT_UP,
        "sip:alice@198.51.100.1:5060",
        "sip:alice@example.com",
        "198.51.100.1:5060",
        1_000,
        0,
        100,
        100,
    ),
    (
        0,
        1,
        SLOT_UP,
        "sip:alice@198.51.100.2:5062;transport=udp",
        "sip:alice@example.com",
        "198.51.100.2:5062",
        1_200,
        0,
        100,
        99,
    ),
    (
        0,
        2,
        SLOT_UP,
        "sip:bob@198.51.100.3:5060",
        "sip:bob@example.com",
        "198.51.100.3:5060",
        2_500,
        0,
        80,
        80,
    ),
    (
        0,
        5,
        SLOT_DOWN,
        "sip:carol@198.51.100.4:5060",
        "sip:carol@example.com",
        "198.51.100.4:5060",
        0,
        7,
        50,
        43,
    ),
    (
        0,
        9,
        SLOT_UNKNOWN,
        "sip:dave@[2001:db8::5]:5080",
        "sip:dave@example.com",
        "[2001:db8::5]:5080",
        0,
        0,
        1,
        0,
    ),
    (
        1,
        0,
        SLOT_UP,
        "sip:erin@203.0.113.6:5060",
        "sip:erin@example.com",
        "203.0.113.6:5060",
        40_000,
        0,
        60,
        60,
    ),
    (
        1,
        3,
        SLOT_UP,
        "sip:frank@203.0.113.7:5060",
        "sip:frank@example.com",
        "203.0.113.7:5060",
        3_100,
        1,
        60,
        58,
    ),
    (
        1,
        4,
        SLOT_REMOVED,
        "sip:gone@203.0.113.8:5060",
        "sip:gone@example.com",
        "203.0.113.8:5060",
        900,
        0,
        10,
        10,
    ),
];

/// Counter values per worker: (counter, worker 0, worker 1).
const COUNTS: [(Counter, u64, u64); 15] = [
    (Counter::Sent, 1_000, 500),
    (Counter::Matched, 900, 480),
    (Counter::TimedOut, 50, 20),
    (Counter::Stray, 3, 0),
    (Counter::Forged, 2, 1),
    (Counter::ParseErrors, 4, 0),
    (Counter::SendErrors, 1, 0),
    (Counter::Late, 5, 2),
    (Counter::ErrorReplies, 7, 0),
    (Counter::Received, 920, 483),
    (Counter::Retries, 30, 10),
    (Counter::ContactsUp, 3, 2),
    (Counter::ContactsDown, 1, 0),
    (Counter::ContactsUnknown, 1, 0),
    (Counter::ContactsRemoved, 0, 1),
];

/// RTT samples per worker: (µs, how many).
const RTTS: [&[(u32, u32)]; 2] = [
    &[(100, 10), (1_000, 100), (2_500, 40), (6_000_000, 1)],
    &[(3_000, 50), (40_000, 9), (300_000, 1)],
];
const RTT_SAMPLES: u64 = 211;

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    shm: ShmFile,
    workers: Vec<WorkerShm>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kaping-test");
    let shm = ShmFile::create(&ShmConfig {
        path: path.clone(),
        workers: 2,
        slots_per_worker: 16,
        string_bytes_per_worker: 4096,
        instance: "edge-1".into(),
        backend: "io_uring".into(),
        shard: None,
        group: None,
    })
    .unwrap();
    let mut ws = [shm.worker(0), shm.worker(1)];
    for (c, a, b) in COUNTS {
        ws[0].set(c, a);
        ws[1].set(c, b);
    }
    ws[0].add_reject(Reject::NotSip.index(), 3);
    ws[0].add_reject(Reject::BadTag.index(), 1);
    ws[1].add_reject(Reject::Forged.index(), 1);
    for (w, samples) in RTTS.iter().enumerate() {
        for &(us, n) in *samples {
            for _ in 0..n {
                ws[w].record_rtt(us);
            }
        }
    }
    for (w, slot, state, uri, aor, addr, srtt, misses, sent, answered) in CONTACTS {
        let ws = &mut ws[w as usize];
        let mut r = SlotRecord {
            generation: 3,
            state,
            last_code: if state == SLOT_DOWN { 408 } else { 200 },
            misses,
            sent,
            answered,
            rtt_last_us: srtt + 10,
            rtt_min_us: srtt / 2,
            rtt_max_us: srtt * 2,
            srtt_us: srtt,
            rttvar_us: srtt / 4,
            interval_ms: 30_000,
            last_ping_ms: PING_MS + slot as u64,
            last_reply_ms: if answered > 0 { PING_MS + 5 } else { 0 },
            key_hash: 0xabcd_0000 + slot as u64,
            uri: ws.alloc_str(uri.as_bytes()).unwrap(),
            aor: ws.alloc_str(aor.as_bytes()).unwrap(),
            ..SlotRecord::default()
        };
        r.set_socket_addr(addr.parse().unwrap());
        ws.write_slot(slot, &r);
    }
    shm.heartbeat();
    Fixture {
        _dir: dir,
        path,
        shm,
        workers: ws.into(),
    }
}

/// The registrar figures the fixture publishes when the feed is on: every
/// figure a different number (11, 22, 33, ... by index), 1,234 contacts, and
/// the guard tripped when `removal` is on.
fn registrar_figures(removal: bool) -> RegistrarFigures {
    let mut r = RegistrarFigures::default();
    for s in RegistrarStat::ALL {
        if !s.is_gauge() && (removal || s.index() < RegistrarStat::RemovalsSent.index()) {
            r.set(s, 11 * (s.index() as u64 + 1));
        }
    }
    r.set(RegistrarStat::Contacts, 1_234);
    r.set(RegistrarStat::FeedConfigured, 1);
    r.set(RegistrarStat::RemovalConfigured, u64::from(removal));
    r.set(RegistrarStat::GuardTripped, u64::from(removal));
    r
}

/// Rewrites `path` as the version 2 file the same daemon wrote before the
/// registrar block existed: version 2, the header's tail zero, no block.
fn make_version_2(path: &Path) {
    let g = *ShmReader::open(path).unwrap().geometry();
    patch(path, offset_of!(Header, version), &2u32.to_ne_bytes());
    // Version 2 had fewer counters (the ICMP ones came in version 4).
    patch(
        path,
        offset_of!(Header, counter_count),
        &(Counter::count_in_version(2) as u32).to_ne_bytes(),
    );
    let tail = offset_of!(Header, registrar_offset);
    patch(path, tail, &vec![0u8; HEADER_SIZE - tail]);
    patch(
        path,
        offset_of!(Header, file_size),
        &g.registrar_offset.to_ne_bytes(),
    );
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(g.registrar_offset)
        .unwrap();
}

fn expected_hist() -> Vec<u64> {
    let mut h = vec![0u64; HIST_BUCKETS];
    for samples in RTTS {
        for &(us, n) in samples {
            h[bucket_index(us as u64)] += n as u64;
        }
    }
    h
}

fn total(c: Counter) -> u64 {
    COUNTS
        .iter()
        .find(|e| e.0 == c)
        .map_or(0, |&(_, a, b)| a + b)
}

fn stat(path: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--shm")
        .arg(path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok_stdout(path: &Path, args: &[&str]) -> String {
    let o = stat(path, args);
    assert!(
        o.status.success(),
        "kaping-stat {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn json_of(path: &Path, args: &[&str]) -> Value {
    let out = ok_stdout(path, args);
    assert_eq!(out.lines().count(), 1, "one JSON object on one line: {out}");
    serde_json::from_str(&out).unwrap()
}

fn patch(path: &Path, offset: usize, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset as u64).unwrap();
}

/// The error line of a failing run (exactly one line, non-zero exit).
fn error_line(path: &Path, args: &[&str]) -> String {
    let o = stat(path, args);
    assert_eq!(o.status.code(), Some(1), "{args:?} must fail with status 1");
    assert!(o.stdout.is_empty());
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "one error line: {err}");
    err
}

#[test]
fn summary_text_shows_every_figure() {
    let f = fixture();
    let out = ok_stdout(&f.path, &["--interval", "0"]);
    println!("{out}");
    let first = out.lines().next().unwrap();
    assert!(
        first.contains("\"edge-1\"") && first.contains("running"),
        "{out}"
    );
    assert!(
        first.contains(&format!("pid {}", std::process::id())),
        "{out}"
    );
    assert!(
        out.contains("backend io_uring, 2 workers, 32 slots"),
        "{out}"
    );
    assert!(
        out.contains("contacts 7: up 5, down 1, unknown 1, removed 1"),
        "{out}"
    );
    let row = |label: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.trim_start().starts_with(label) && l.starts_with("  "))
            .unwrap_or_else(|| panic!("no {label} row in {out}"))
            .trim_start()[label.len()..]
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(row("sent"), ["1,500", "-"]);
    assert_eq!(row("matched"), ["1,380", "-"]);
    assert_eq!(row("timed out"), ["70", "-"]);
    assert_eq!(row("stray"), ["3", "-"]);
    assert_eq!(row("forged"), ["3", "-"]);
    assert_eq!(row("late"), ["7", "-"]);
    assert_eq!(row("parse errors"), ["4", "-"]);
    assert_eq!(row("send errors"), ["1", "-"]);
    assert_eq!(row("error replies"), ["7", "-"]);
    assert_eq!(row("retries"), ["40", "-"]);
    assert_eq!(row("received"), ["1,403", "-"]);

    let h = expected_hist();
    let rtt = out.lines().find(|l| l.starts_with("rtt")).unwrap();
    for (q, name) in [
        (0.5, "p50"),
        (0.9, "p90"),
        (0.99, "p99"),
        (0.999, "p99.9"),
        (1.0, "max"),
    ] {
        let us = percentile(&h, q).unwrap();
        let shown = if us < 10_000 {
            format!("{name} {:.3} ms", us as f64 / 1000.0)
        } else {
            format!("{name} {:.1} ms", us as f64 / 1000.0)
        };
        assert!(rtt.contains(&shown), "{shown} in {rtt}");
    }
    assert!(rtt.contains("(211 samples"), "{rtt}");

    let worker = |w: &str| -> Vec<String> {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(w))
            .unwrap_or_else(|| panic!("no worker {w} row in {out}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    // worker contacts up down unknown sent matched timeouts sent/s ...
    assert_eq!(
        worker("0")[1..8],
        ["5", "3", "1", "1", "1,000", "900", "50"]
    );
    assert_eq!(worker("1")[1..8], ["2", "2", "0", "0", "500", "480", "20"]);
    assert!(
        out.contains("rejects: not_sip 3, bad_tag 1, forged 1"),
        "{out}"
    );
    // No feed, no registrar section.
    assert!(!out.contains("registrar"), "{out}");
}

#[test]
fn summary_json_has_every_field_with_its_value() {
    let f = fixture();
    let v = json_of(&f.path, &["--json", "--interval", "0"]);
    let n = |k: &str| {
        v[k].as_u64()
            .unwrap_or_else(|| panic!("{k} is not a number: {v}"))
    };
    assert_eq!(v["running"], true);
    assert_eq!(v["status"], "running");
    assert_eq!(v["stopped"], false);
    assert_eq!(v["instance"], "edge-1");
    assert_eq!(v["backend"], "io_uring");
    assert_eq!(n("pid"), std::process::id() as u64);
    assert!(n("heartbeat_age_ms") < 3_000);
    assert_eq!(n("workers"), 2);
    assert_eq!(n("slots_per_worker"), 16);
    assert_eq!(n("capacity"), 32);
    assert_eq!(n("contacts"), 7);
    assert_eq!(n("up"), 5);
    assert_eq!(n("down"), 1);
    assert_eq!(n("unknown"), 1);
    assert_eq!(n("removed"), 1);
    assert_eq!(n("sent"), 1_500);
    assert_eq!(n("matched"), 1_380);
    assert_eq!(n("timeouts"), 70);
    assert_eq!(n("stray"), 3);
    assert_eq!(n("forged"), 3);
    assert_eq!(n("late"), 7);
    assert_eq!(n("parse_errors"), 4);
    assert_eq!(n("send_errors"), 1);
    assert_eq!(n("error_replies"), 7);
    assert_eq!(n("received"), 1_403);
    assert_eq!(n("retries"), 40);
    assert_eq!(n("unreachable"), 0);
    assert_eq!(n("rtt_samples"), RTT_SAMPLES);
    let h = expected_hist();
    assert_eq!(n("rtt_p50_us"), percentile(&h, 0.5).unwrap());
    assert_eq!(n("rtt_p90_us"), percentile(&h, 0.9).unwrap());
    assert_eq!(n("rtt_p99_us"), percentile(&h, 0.99).unwrap());
    assert_eq!(n("rtt_p999_us"), percentile(&h, 0.999).unwrap());
    assert_eq!(n("rtt_max_us"), percentile(&h, 1.0).unwrap());
    let sum: u64 = RTTS
        .iter()
        .flat_map(|s| s.iter())
        .map(|&(us, c)| us as u64 * c as u64)
        .sum();
    assert_eq!(n("rtt_sum_us"), sum);
    assert_eq!(n("rtt_mean_us"), sum / RTT_SAMPLES);
    assert_eq!(v["rates"], Value::Null);
    assert_eq!(v["rate_interval_ms"], Value::Null);
    assert_eq!(v["rejects"]["not_sip"], 3);
    assert_eq!(v["rejects"]["bad_tag"], 1);
    assert_eq!(v["rejects"]["forged"], 1);
    assert_eq!(v["rejects"]["truncated"], 0);
    assert_eq!(v["rejects"].as_object().unwrap().len(), Reject::COUNT);
    let pw = v["per_worker"].as_array().unwrap();
    assert_eq!(pw.len(), 2);
    for (w, o) in pw.iter().enumerate() {
        assert_eq!(o["worker"], w);
        for (c, a, b) in COUNTS {
            let key = match c {
                Counter::TimedOut => "timeouts",
                Counter::ContactsUp => "up",
                Counter::ContactsDown => "down",
                Counter::ContactsUnknown => "unknown",
                Counter::ContactsRemoved => "removed",
                c => c.name(),
            };
            assert_eq!(o[key], [a, b][w], "worker {w} {key}");
        }
        let samples: u32 = RTTS[w].iter().map(|e| e.1).sum();
        assert_eq!(o["rtt_samples"], samples);
        assert!(o["string_bytes_used"].as_u64().unwrap() > 0);
    }
    assert_eq!(pw[0]["contacts"], 5);
    assert_eq!(pw[1]["contacts"], 2);
    assert_eq!(v["layout_version"], VERSION);
    assert_eq!(v["registrar"], Value::Null, "no feed: {v}");
}

#[test]
fn the_registrar_feed_shows_in_every_view() {
    let mut f = fixture();
    f.shm.write_registrar(&registrar_figures(true));
    let out = ok_stdout(&f.path, &["--interval", "0"]);
    println!("{out}");
    let lines: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("registrar feed:"))
        .collect();
    assert_eq!(
        lines,
        [
            "registrar feed: 1,234 contacts; added 11, updated 22, refreshed 33, deleted 44 \
             (55 unknown), moved 66, expired 77, dropped after a sync 88, other shards 99, refused 110",
            "  dmq: syncs 121 done of 209 asked (231 refused, 242 unanswered), peer restarts 253, \
             joins 198, requests 143, records 187, duplicates 154, not from a peer 165, rejected 176, \
             other channels 220",
            "  removal: guard TRIPPED, removals withheld (286 trips); sent 264, removed 297 \
             (341 confirmed over DMQ), not found 308, failed 319, withheld 275 (330 attempts unanswered)",
        ],
        "{out}"
    );

    let v = json_of(&f.path, &["--json", "--interval", "0"]);
    let r = v["registrar"].as_object().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(r.len(), RegistrarStat::COUNT);
    let want = registrar_figures(true);
    for s in RegistrarStat::ALL {
        if s.is_flag() {
            assert_eq!(r[s.name()], Value::Bool(want.flag(s)), "{}", s.name());
        } else {
            assert_eq!(r[s.name()], want.get(s), "{}", s.name());
        }
    }
    assert_eq!(r["removed"], want.get(RegistrarStat::Removed));
    assert_eq!(r["guard_tripped"], true);
    assert_eq!(r["contacts"], 1_234);

    use RegistrarStat as R;
    let m = parse_metrics(&ok_stdout(&f.path, &["prometheus", "--once"]));
    for (series, stat) in [
        ("kaping_registrar_contacts", R::Contacts),
        ("kaping_registrar_changes_total{kind=\"added\"}", R::Added),
        (
            "kaping_registrar_changes_total{kind=\"delete_unknown\"}",
            R::DeleteUnknown,
        ),
        ("kaping_registrar_changes_total{kind=\"moved\"}", R::Moved),
        (
            "kaping_registrar_changes_total{kind=\"refused\"}",
            R::Refused,
        ),
        ("kaping_registrar_syncs_completed_total", R::SyncsDone),
        ("kaping_registrar_sync_requests_total", R::Syncs),
        (
            "kaping_registrar_sync_requests_refused_total",
            R::SyncRefused,
        ),
        (
            "kaping_registrar_sync_requests_unanswered_total",
            R::SyncUnanswered,
        ),
        ("kaping_registrar_peer_restarts_total", R::PeerRestarts),
        ("kaping_registrar_dmq_datagrams_received_total", R::Received),
        ("kaping_registrar_dmq_requests_total", R::Requests),
        ("kaping_registrar_dmq_records_received_total", R::Changes),
        ("kaping_registrar_dmq_joins_total", R::Joins),
        (
            "kaping_registrar_dmq_discarded_total{cause=\"duplicate\"}",
            R::Duplicates,
        ),
        (
            "kaping_registrar_dmq_discarded_total{cause=\"not_peer\"}",
            R::NotPeer,
        ),
        (
            "kaping_registrar_dmq_discarded_total{cause=\"rejected\"}",
            R::Rejected,
        ),
        (
            "kaping_registrar_dmq_discarded_total{cause=\"other_channel\"}",
            R::OtherChannels,
        ),
        ("kaping_registrar_removals_sent_total", R::RemovalsSent),
        (
            "kaping_registrar_removals_total{outcome=\"withheld\"}",
            R::RemovalsWithheld,
        ),
        (
            "kaping_registrar_removals_total{outcome=\"removed\"}",
            R::Removed,
        ),
        (
            "kaping_registrar_removals_total{outcome=\"not_found\"}",
            R::RemoveNotFound,
        ),
        (
            "kaping_registrar_removals_total{outcome=\"failed\"}",
            R::RemoveFailed,
        ),
        (
            "kaping_registrar_removal_attempts_unanswered_total",
            R::RemoveUnanswered,
        ),
        ("kaping_registrar_removal_guard_trips_total", R::GuardTrips),
        (
            "kaping_registrar_removals_confirmed_total",
            R::RemovalsConfirmed,
        ),
        ("kaping_registrar_removal_guard_tripped", R::GuardTripped),
    ] {
        assert_eq!(m.get(series), Some(&(want.get(stat) as f64)), "{series}");
    }
    assert_eq!(
        m.keys()
            .filter(|k| k.starts_with("kaping_registrar_"))
            .count(),
        10 + 4 + 9 + 4 + 4 + 2,
        "one series per figure"
    );
}

#[test]
fn a_feed_without_removal_shows_no_removal_figures() {
    let mut f = fixture();
    f.shm.write_registrar(&registrar_figures(false));
    let out = ok_stdout(&f.path, &["--interval", "0"]);
    assert!(
        out.contains("registrar feed: 1,234 contacts; added 11,"),
        "{out}"
    );
    assert!(
        out.contains("\n  removal: off (no registrar_rpc)\n"),
        "{out}"
    );
    let v = json_of(&f.path, &["--json", "--interval", "0"]);
    assert_eq!(v["registrar"]["removal_configured"], false, "{v}");
    assert_eq!(v["registrar"]["removed"], 0, "{v}");
    let page = ok_stdout(&f.path, &["prometheus", "--once"]);
    let m = parse_metrics(&page);
    assert_eq!(m["kaping_registrar_changes_total{kind=\"added\"}"], 11.0);
    assert!(!page.contains("removal"), "{page}");
}

#[test]
fn a_version_2_file_is_read_without_registrar_figures() {
    let mut f = fixture();
    // Whatever the block held goes with it.
    f.shm.write_registrar(&registrar_figures(true));
    make_version_2(&f.path);
    let v = json_of(&f.path, &["--json", "--interval", "0"]);
    assert_eq!(v["layout_version"], 2);
    assert_eq!(v["registrar"], Value::Null, "{v}");
    assert_eq!(v["sent"], 1_500);
    assert_eq!(v["contacts"], 7);
    let out = ok_stdout(&f.path, &["--interval", "0"]);
    assert!(out.contains("contacts 7: up 5"), "{out}");
    assert!(!out.contains("registrar"), "{out}");
    let page = ok_stdout(&f.path, &["prometheus", "--once"]);
    assert!(page.contains("layout_version=\"2\""), "{page}");
    assert!(!page.contains("kaping_registrar_"), "{page}");
    let dump = ok_stdout(&f.path, &["dump"]);
    assert_eq!(dump.lines().count(), CONTACTS.len(), "{dump}");
}

#[test]
fn rates_come_from_two_samples() {
    let mut f = fixture();
    let stop = AtomicBool::new(false);
    let w0 = f.workers.remove(0);
    let v = std::thread::scope(|s| {
        let (stop, shm) = (&stop, &f.shm);
        s.spawn(move || {
            // ~1000 pings a second while kaping-stat samples.
            while !stop.load(Ordering::Relaxed) {
                w0.add(Counter::Sent, 1);
                shm.heartbeat();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let v = json_of(&f.path, &["--json", "--interval", "500ms"]);
        stop.store(true, Ordering::Relaxed);
        v
    });
    let interval = v["rate_interval_ms"].as_u64().unwrap();
    assert!((500..2_000).contains(&interval), "{interval}");
    let sent_rate = v["rates"]["sent"].as_f64().unwrap();
    // Sleeps of 1 ms run long under load: anything from 50/s to 1000/s.
    assert!(sent_rate > 50.0 && sent_rate <= 1_100.0, "{sent_rate}");
    assert_eq!(v["rates"]["matched"].as_f64(), Some(0.0));
    assert!(v["per_worker"][0]["rates"]["sent"].as_f64().unwrap() > 50.0);
    assert_eq!(v["per_worker"][1]["rates"]["sent"].as_f64(), Some(0.0));
}

#[test]
fn get_finds_every_matching_contact() {
    let f = fixture();
    // By AoR: both of Alice's devices, each as a full record.
    let out = ok_stdout(&f.path, &["get", "sip:alice@example.com"]);
    assert_eq!(out.matches("contact     ").count(), 2, "{out}");
    assert!(
        out.contains("contact     sip:alice@198.51.100.1:5060"),
        "{out}"
    );
    assert!(
        out.contains("contact     sip:alice@198.51.100.2:5062;transport=udp"),
        "{out}"
    );
    assert!(out.contains("address   198.51.100.2:5062"), "{out}");
    assert!(out.contains("state     up"), "{out}");
    assert!(
        out.contains(
            "rtt       last 1010 us, min 500 us, max 2000 us, srtt 1000 us, rttvar 250 us"
        ),
        "{out}"
    );
    assert!(
        out.contains("pings     sent 100, answered 99, misses 0"),
        "{out}"
    );
    assert!(out.contains("last code 200"), "{out}");
    assert!(
        out.contains(&format!("last ping {}", rfc3339_ms(PING_MS + 1))),
        "{out}"
    );
    assert!(out.contains("last reply 2023-11-14T22:13:20.005Z"), "{out}");

    // By URI, as JSON: exactly one.
    let out = ok_stdout(&f.path, &["get", "sip:carol@198.51.100.4:5060", "--json"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    let c: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(c["state"], "down");
    assert_eq!(c["worker"], 0);
    assert_eq!(c["slot"], 5);
    assert_eq!(c["generation"], 3);
    assert_eq!(c["aor"], "sip:carol@example.com");
    assert_eq!(c["addr"], "198.51.100.4:5060");
    assert_eq!(c["misses"], 7);
    assert_eq!(c["sent"], 50);
    assert_eq!(c["answered"], 43);
    assert_eq!(c["unanswered"], 7);
    assert_eq!(c["last_code"], 408);
    assert_eq!(c["srtt_us"], 0);
    assert_eq!(c["interval_ms"], 30_000);
    assert_eq!(c["last_ping_ms"], PING_MS + 5);
    assert_eq!(c["last_ping"], rfc3339_ms(PING_MS + 5));
    assert_eq!(c["last_reply"], "2023-11-14T22:13:20.005Z");
    assert_eq!(c["key_hash"], "00000000abcd0005");

    // By address, IPv6 included; a never-answered contact has a null reply time.
    let c: Value = serde_json::from_str(&ok_stdout(
        &f.path,
        &["get", "[2001:db8::5]:5080", "--json"],
    ))
    .unwrap();
    assert_eq!(c["uri"], "sip:dave@[2001:db8::5]:5080");
    assert_eq!(c["state"], "unknown");
    assert_eq!(c["last_reply"], Value::Null);
    let c: Value =
        serde_json::from_str(&ok_stdout(&f.path, &["--json", "get", "203.0.113.7:5060"])).unwrap();
    assert_eq!(c["uri"], "sip:frank@203.0.113.7:5060");
    assert_eq!(c["worker"], 1);

    let err = error_line(&f.path, &["get", "sip:nobody@example.com"]);
    assert!(
        err.contains("no contact matches \"sip:nobody@example.com\""),
        "{err}"
    );
}

#[test]
fn dump_streams_every_contact() {
    let f = fixture();
    let out = ok_stdout(&f.path, &["dump"]);
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), CONTACTS.len(), "{out}");
    for (line, spec) in lines.iter().zip(CONTACTS) {
        let (w, slot, _, uri, aor, addr, srtt, misses, sent, answered) = spec;
        assert_eq!(line.len(), 12, "{line:?}");
        assert_eq!(line[0], w.to_string());
        assert_eq!(line[1], slot.to_string());
        assert_eq!(line[3], addr);
        assert_eq!(line[4], srtt.to_string());
        assert_eq!(line[6], misses.to_string());
        assert_eq!(line[7], sent.to_string());
        assert_eq!(line[8], answered.to_string());
        assert_eq!(line[10], uri);
        assert_eq!(line[11], aor);
    }
    let states: Vec<&str> = lines.iter().map(|l| l[2]).collect();
    assert_eq!(
        states,
        ["up", "up", "up", "down", "unknown", "up", "up", "removed"]
    );

    let out = ok_stdout(&f.path, &["dump", "--json"]);
    let objs: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objs.len(), CONTACTS.len());
    for (o, spec) in objs.iter().zip(CONTACTS) {
        assert_eq!(o["worker"], spec.0);
        assert_eq!(o["slot"], spec.1);
        assert_eq!(o["uri"], spec.3);
        assert_eq!(o["aor"], spec.4);
        assert_eq!(o["addr"], spec.5);
    }
}

/// Parses an exposition page; checks the grammar of every line and returns
/// `name{labels}` → value.
fn parse_metrics(page: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed = HashMap::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(
                typed.insert(name.to_owned(), kind.to_owned()).is_none(),
                "TYPE twice: {line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line:?}");
                for pair in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = pair.split_once('=').unwrap();
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{line:?}"
                    );
                    assert!(
                        v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                        "{line:?}"
                    );
                }
            }
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| typed.get(*b).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(typed.contains_key(base), "sample before its TYPE: {line:?}");
        let v: f64 = if value == "+Inf" {
            f64::INFINITY
        } else {
            value
                .parse()
                .unwrap_or_else(|_| panic!("bad value {line:?}"))
        };
        assert!(
            samples.insert(series.to_owned(), v).is_none(),
            "duplicate series {line:?}"
        );
    }
    samples
}

fn check_prometheus_page(page: &str, up: f64) {
    let m = parse_metrics(page);
    assert_eq!(m["kaping_up"], up);
    assert_eq!(m["kaping_workers"], 2.0);
    assert_eq!(m["kaping_contact_slots"], 32.0);
    assert_eq!(m["kaping_pings_sent_total{worker=\"0\"}"], 1_000.0);
    assert_eq!(m["kaping_pings_sent_total{worker=\"1\"}"], 500.0);
    assert_eq!(m["kaping_replies_matched_total{worker=\"0\"}"], 900.0);
    assert_eq!(m["kaping_pings_timed_out_total{worker=\"1\"}"], 20.0);
    assert_eq!(m["kaping_replies_stray_total{worker=\"0\"}"], 3.0);
    assert_eq!(m["kaping_replies_forged_total{worker=\"1\"}"], 1.0);
    assert_eq!(m["kaping_contacts{worker=\"0\",state=\"up\"}"], 3.0);
    assert_eq!(m["kaping_contacts{worker=\"0\",state=\"down\"}"], 1.0);
    assert_eq!(m["kaping_contacts{worker=\"1\",state=\"removed\"}"], 1.0);
    assert_eq!(
        m["kaping_rejects_total{worker=\"0\",reason=\"not_sip\"}"],
        3.0
    );
    assert_eq!(
        m[&format!(
            "kaping_info{{instance=\"edge-1\",backend=\"io_uring\",pid=\"{}\",layout_version=\"{VERSION}\",shard=\"\"}}",
            std::process::id()
        )],
        1.0
    );
    for (c, name) in [
        (Counter::Sent, "kaping_pings_sent_total"),
        (Counter::Late, "kaping_replies_late_total"),
    ] {
        let sum: f64 = (0..2)
            .map(|w| m[&format!("{name}{{worker=\"{w}\"}}")])
            .sum();
        assert_eq!(sum, total(c) as f64);
    }
    // The histogram: cumulative, +Inf equal to _count equal to the samples.
    let mut buckets: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, &v)| {
            let le = k
                .strip_prefix("kaping_rtt_seconds_bucket{le=\"")?
                .strip_suffix("\"}")?;
            Some((
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                },
                v,
            ))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    assert!(buckets.len() >= 15, "{buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "not cumulative: {buckets:?}"
    );
    assert_eq!(
        buckets.last().unwrap(),
        &(f64::INFINITY, RTT_SAMPLES as f64)
    );
    assert_eq!(m["kaping_rtt_seconds_count"], RTT_SAMPLES as f64);
    let sum_us: u64 = RTTS
        .iter()
        .flat_map(|s| s.iter())
        .map(|&(us, c)| us as u64 * c as u64)
        .sum();
    assert!((m["kaping_rtt_seconds_sum"] - sum_us as f64 / 1e6).abs() < 1e-6);
    // Every sample counted under a bound really is <= it.
    let samples: Vec<u32> = RTTS
        .iter()
        .flat_map(|s| s.iter())
        .flat_map(|&(us, c)| std::iter::repeat_n(us, c as usize))
        .collect();
    for &(le, count) in &buckets {
        let at_most = samples.iter().filter(|&&us| us as f64 / 1e6 <= le).count() as f64;
        assert!(count <= at_most, "le {le}: {count} > {at_most}");
    }
    // 100 µs, 1 ms and 2.5 ms samples fall well inside their bounds.
    let at = |le: f64| buckets.iter().find(|b| b.0 == le).unwrap().1;
    assert_eq!(at(0.00025), 10.0);
    assert_eq!(at(0.002), 110.0);
    assert_eq!(at(0.003), 150.0);
    assert_eq!(at(0.005), 200.0);
    assert_eq!(at(5.0), 210.0);
}

#[test]
fn prometheus_once_is_well_formed_and_exact() {
    let mut f = fixture();
    let page = ok_stdout(&f.path, &["prometheus", "--once"]);
    check_prometheus_page(&page, 1.0);
    assert!(!page.contains("kaping_registrar_"), "no feed: {page}");
    promtool_check(&page);
    // With the feed and removal on, every registrar family is linted too.
    f.shm.write_registrar(&registrar_figures(true));
    let page = ok_stdout(&f.path, &["prometheus", "--once"]);
    check_prometheus_page(&page, 1.0);
    assert!(
        page.contains("kaping_registrar_removals_total{outcome=\"removed\"} 297"),
        "{page}"
    );
    promtool_check(&page);
}

fn http_get(addr: &str, target: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(body.len(), len);
    (head.to_owned(), body.to_owned())
}

#[test]
fn prometheus_http_serves_metrics_and_404() {
    let f = fixture();
    let mut child = Command::new(BIN)
        .arg("--shm")
        .arg(&f.path)
        .args(["prometheus", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("kaping-stat: serving http://")
        .and_then(|r| r.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let result = std::panic::catch_unwind(|| {
        let (head, body) = http_get(&addr, "/metrics");
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(
            head.contains("Content-Type: text/plain; version=0.0.4"),
            "{head}"
        );
        check_prometheus_page(&body, 1.0);
        let (head, _) = http_get(&addr, "/");
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        let (head, _) = http_get(&addr, "/metricsx");
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        // A scrape after the daemon stopped shows it.
        f.shm.mark_stopped();
        let (_, body) = http_get(&addr, "/metrics?x=1");
        let m = parse_metrics(&body);
        assert_eq!(m["kaping_up"], 0.0);
        assert_eq!(m["kaping_stopped"], 1.0);
        // A vanished file: kaping_up 0 and why, not an error page.
        std::fs::remove_file(&f.path).unwrap();
        let (head, body) = http_get(&addr, "/metrics");
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert_eq!(parse_metrics(&body)["kaping_up"], 0.0);
        assert!(body.contains("no such file"), "{body}");
    });
    child.kill().unwrap();
    child.wait().unwrap();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn a_stale_heartbeat_means_not_running_but_figures_remain() {
    let f = fixture();
    let old = unix_now_ms() - 12_000;
    patch(
        &f.path,
        offset_of!(Header, heartbeat_ms),
        &old.to_ne_bytes(),
    );
    // With a dead daemon there is nothing to rate: no second sample, no wait.
    let t0 = std::time::Instant::now();
    let v = json_of(&f.path, &["--json", "--interval", "5s"]);
    assert!(t0.elapsed() < Duration::from_secs(4));
    assert_eq!(v["running"], false);
    assert_eq!(v["status"], "stale");
    assert!(v["heartbeat_age_ms"].as_u64().unwrap() >= 12_000);
    assert_eq!(v["rates"], Value::Null);
    assert_eq!(v["sent"], 1_500);
    assert_eq!(v["contacts"], 7);
    let out = ok_stdout(&f.path, &["--interval", "0"]);
    let first = out.lines().next().unwrap();
    assert!(first.contains("NOT RUNNING: last heartbeat 12."), "{first}");
    assert!(first.contains("crashed or hung"), "{first}");
    assert!(out.contains("contacts 7: up 5"), "{out}");
    let m = parse_metrics(&ok_stdout(&f.path, &["prometheus", "--once"]));
    assert_eq!(m["kaping_up"], 0.0);
    assert!(m["kaping_heartbeat_age_seconds"] >= 12.0);
}

#[test]
fn a_stopped_daemon_is_reported_as_stopped() {
    let f = fixture();
    f.shm.mark_stopped();
    let v = json_of(&f.path, &["--json"]);
    assert_eq!(v["running"], false);
    assert_eq!(v["status"], "stopped");
    assert_eq!(v["stopped"], true);
    assert_eq!(v["matched"], 1_380);
    let out = ok_stdout(&f.path, &[]);
    assert!(
        out.lines()
            .next()
            .unwrap()
            .contains("NOT RUNNING: stopped cleanly"),
        "{out}"
    );
}

#[test]
fn a_daemon_that_never_beat_is_not_running() {
    let f = fixture();
    patch(
        &f.path,
        offset_of!(Header, heartbeat_ms),
        &0u64.to_ne_bytes(),
    );
    let v = json_of(&f.path, &["--json"]);
    assert_eq!(v["status"], "no_heartbeat");
    assert_eq!(v["heartbeat_age_ms"], Value::Null);
    assert_eq!(v["running"], false);
}

/// The arguments of every view that opens the shm file.
const EVERY_VIEW: [&[&str]; 5] = [
    &[],
    &["--json"],
    &["dump"],
    &["get", "x"],
    &["prometheus", "--once"],
];

#[test]
fn a_missing_file_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kaping-nothere");
    for args in EVERY_VIEW {
        let err = error_line(&path, args);
        assert!(err.starts_with("kaping-stat: "), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(
            err.contains("not running") && err.contains("--shm"),
            "{err}"
        );
    }
    // Without --shm the default instance path is named.
    let o = Command::new(BIN)
        .args(["--instance", "no-such-instance-for-test"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(
        err.contains("/dev/shm/kaping-no-such-instance-for-test"),
        "{err}"
    );
}

/// uid and gid of `nobody`/`nogroup` on Debian, the unprivileged user the
/// permission test runs kaping-stat as.
const NOBODY: u32 = 65_534;

/// kaping-stat run as `nobody` (uid and gid 65534, no supplementary groups:
/// std clears them when root drops to another uid).
fn stat_as_nobody(path: &Path, args: &[&str]) -> std::io::Result<Output> {
    use std::os::unix::process::CommandExt;
    Command::new(BIN)
        .arg("--shm")
        .arg(path)
        .args(args)
        .stdin(Stdio::null())
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
}

#[test]
fn a_user_who_may_not_read_the_file_is_told_who_may() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let f = fixture();
    let dir = f.path.parent().unwrap();
    if std::fs::metadata(dir).unwrap().uid() != 0 {
        println!("SKIP: needs root to run kaping-stat as another user");
        return;
    }
    // nobody must reach the file (a tempdir is 0700) and run the binary.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let probe = match stat_as_nobody(Path::new("/nonexistent"), &["--version"]) {
        Ok(o) if o.status.success() => o,
        other => {
            println!(
                "SKIP: nobody cannot run {BIN} (its directories are not open to it): {other:?}"
            );
            return;
        }
    };
    drop(probe);
    let root_group = kaping::access::group_name(0).unwrap_or_else(|| "0".into());
    for args in EVERY_VIEW {
        let o = stat_as_nobody(&f.path, args).unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?} must fail with status 1");
        assert!(o.stdout.is_empty());
        let err = String::from_utf8(o.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "one error line: {err}");
        let says = format!(
            "kaping-stat: cannot read {}: permission denied (mode 0640, owner root, group \
             {root_group}); run as the owner or a member of group '{root_group}' (the daemon's \
             shm_group setting)\n",
            f.path.display()
        );
        assert_eq!(err, says, "{args:?}");
    }

    // Given to nobody's group (shm_group), the same user reads it.
    let shared = dir.join("kaping-shared");
    let group = kaping::access::Group {
        setting: "shm_group",
        gid: NOBODY,
        name: None,
    };
    let shm = ShmFile::create(&ShmConfig {
        path: shared.clone(),
        workers: 1,
        slots_per_worker: 4,
        string_bytes_per_worker: 256,
        instance: "shared".into(),
        backend: "mmsg".into(),
        shard: None,
        group: Some(group),
    })
    .unwrap();
    shm.heartbeat();
    let meta = std::fs::metadata(&shared).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o640, NOBODY));
    let o = stat_as_nobody(&shared, &["--json"]).unwrap();
    assert!(
        o.status.success(),
        "a member of shm_group reads the file: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["instance"], "shared");
}

#[test]
fn another_layout_version_or_a_foreign_file_is_refused() {
    let f = fixture();
    let copy = f.path.with_file_name("kaping-copy");
    std::fs::copy(&f.path, &copy).unwrap();
    patch(&copy, offset_of!(Header, version), &99u32.to_ne_bytes());
    for args in [
        &[][..],
        &["top"],
        &["dump", "--json"],
        &["prometheus", "--once"],
    ] {
        let err = error_line(&copy, args);
        assert!(err.contains("layout version 99"), "{err}");
        assert!(err.contains(&copy.display().to_string()), "{err}");
    }
    let foreign = f.path.with_file_name("not-kaping");
    std::fs::write(&foreign, vec![0x5a; 4096]).unwrap();
    let err = error_line(&foreign, &[]);
    assert!(err.contains("not a kaping shm file"), "{err}");
    std::fs::write(&foreign, b"tiny").unwrap();
    let err = error_line(&foreign, &["--json"]);
    assert!(err.contains("too small"), "{err}");
}

#[test]
fn top_draws_the_lists_and_restores_the_terminal_on_q() {
    // top needs a terminal: util-linux `script` gives it a pseudo-terminal.
    if Command::new("script").arg("--version").output().is_err() {
        println!("SKIP script (util-linux) not installed");
        return;
    }
    let f = fixture();
    let typescript = f.path.with_file_name("typescript");
    let cmd = format!(
        "stty cols 160 rows 50; {BIN} --shm '{}' top --interval 200ms",
        f.path.display()
    );
    let mut child = Command::new("script")
        .args(["-qfec", &cmd])
        .arg(&typescript)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Let it draw a few frames (rates appear from the second), then quit.
    std::thread::sleep(Duration::from_millis(1_500));
    stdin.write_all(b"q").unwrap();
    stdin.flush().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("top did not quit on q");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    assert!(status.success(), "{status}");
    let screen = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    // Entered and left the alternate screen (ratatui::restore ran).
    let enter = screen
        .find("\x1b[?1049h")
        .expect("alternate screen entered");
    let leave = screen.rfind("\x1b[?1049l").expect("alternate screen left");
    assert!(enter < leave);
    for text in [
        "worst",
        "down:",
        "edge-1",
        "running",
        "carol@198.51.100.4",
        "erin@203.0.113.6",
    ] {
        assert!(screen.contains(text), "{text:?} not drawn");
    }
}
