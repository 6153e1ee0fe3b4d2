//! The registrar feed's figures in the shared-memory file, end to end: a
//! Debian Kamailio registrar with `dmq` + `dmq_usrloc` and a jsonrpcs
//! datagram socket on loopback, REGISTERs sent to it, `kaping run --dmq ...
//! --registrar-rpc ...` as a passive node, and what `kaping-stat --json`,
//! `kaping-stat prometheus --once` and the text summary then show:
//!
//! 1. the contacts the full sync brought (`added`), the completed sync and
//!    the node's health; contacts on ports nobody listens on are dropped by
//!    kaping and removed from Kamailio, each removal counted by outcome; the
//!    figures agree with the control socket's `keepalive.stats`;
//! 2. when every contact falls silent at once the guard trips: the
//!    withheld removals and the tripped gauge show.
//!
//! Skips with a message where Kamailio is missing; runs `promtool check
//! metrics` on the page where promtool is installed. Kamailio's process
//! group and kaping are stopped on drop; nothing leaves 127.0.0.1; every
//! wait is bounded.

mod common;
use common::{ctl, free_ports, promtool_check, register, start_kamailio};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kaping::shm::layout::RegistrarStat;
use serde_json::Value;

/// Kamailio as registrar with the feed's lines (as in the README) and a
/// jsonrpcs datagram socket at `rpc` for kaping's removals.
fn config(kam: SocketAddr, node: SocketAddr, rpc: &Path) -> String {
    common::registrar_cfg(
        kam,
        node,
        &format!(
            "loadmodule \"jsonrpcs.so\"\nmodparam(\"jsonrpcs\", \"transport\", 4)\n\
             modparam(\"jsonrpcs\", \"dgram_socket\", \"{}\")\n",
            rpc.display()
        ),
    )
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Kamailio and a kaping node following it, with removal on.
struct Setup {
    _kamailio: common::Kamailio,
    _daemon: Daemon,
    dir: tempfile::TempDir,
    shm: PathBuf,
    sock: PathBuf,
}

impl Setup {
    /// Kamailio, `dead` contacts registered on ports nobody listens on
    /// (users `u<first>`..), then kaping pinging every `interval` (also the
    /// removal guard's window) with `extra` flags; `None` when Kamailio is
    /// not installed.
    fn start(first: u32, dead: u32, interval: &str, extra: &[&str]) -> Option<Setup> {
        let base = free_ports(3);
        let kam: SocketAddr = format!("127.0.0.1:{base}").parse().unwrap();
        let node: SocketAddr = format!("127.0.0.1:{}", base + 1).parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let rpc = dir.path().join("kamailio_rpc.sock");
        let kamailio = start_kamailio(&config(kam, node, &rpc), kam)?;
        for i in first..first + dead {
            register(kam, i, 120, 1);
        }
        let sock = dir.path().join("k.sock");
        let shm = dir.path().join("k.shm");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kaping"));
        cmd.arg("run")
            .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
            .arg("--control")
            .arg(&sock)
            .arg("--shm")
            .arg(&shm)
            .args(["--instance", "regstat", "--dmq", &format!("sip:{node}")])
            .args(["--dmq-peer", &format!("sip:{kam}")])
            .args(["--bind", &format!("127.0.0.1:{}", base + 2)])
            .args([
                "--workers",
                "1",
                "--interval",
                interval,
                "--reply-timeout",
                "300ms",
            ])
            .args(["--events", "none", "--run-for", "60s"])
            .args(["--registrar-rpc", &format!("unix:{}", rpc.display())])
            .args(["--down-after", "1", "--remove-after", "2"])
            .args(extra)
            .stderr(std::fs::File::create(dir.path().join("k.log")).unwrap())
            .stdout(Stdio::null());
        let daemon = Daemon(cmd.spawn().unwrap());
        let started = Instant::now();
        while !(sock.exists() && shm.exists()) && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Setup {
            _kamailio: kamailio,
            _daemon: daemon,
            dir,
            shm,
            sock,
        })
    }

    fn kaping_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("k.log")).unwrap_or_default()
    }

    /// `kaping-stat --shm <file> ARGS`, which must succeed.
    fn stat(&self, args: &[&str]) -> String {
        let o = Command::new(env!("CARGO_BIN_EXE_kaping-stat"))
            .arg("--shm")
            .arg(&self.shm)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "kaping-stat {args:?}: {}\nkaping: {}",
            String::from_utf8_lossy(&o.stderr),
            self.kaping_log()
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn stat_json(&self) -> Value {
        serde_json::from_str(&self.stat(&["--json", "--interval", "0"])).unwrap()
    }

    /// Polls `kaping-stat --json` until `ok` holds of its `registrar`
    /// object; fails the test with the last one (and kaping's log) after
    /// `within`.
    fn wait_registrar(&self, within: Duration, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.stat_json();
            if ok(&v["registrar"]) {
                return v["registrar"].clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "{what} not seen within {within:?}: {v}\nkaping: {}",
                    self.kaping_log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is not a number: {v}"))
}

/// `series` → value of an exposition page (its grammar is `stat_cli`'s and
/// promtool's business; here only the figures matter).
fn metrics(page: &str) -> HashMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

#[test]
fn kaping_stat_shows_the_feed_and_each_removal_outcome() {
    const DEAD: u64 = 12;
    // --remove-max-fraction 1: the guard lets every removal through.
    let Some(k) = Setup::start(6000, DEAD as u32, "1s", &["--remove-max-fraction", "1"]) else {
        return;
    };
    // The sync brings the 12 contacts; none answers (ICMP port
    // unreachable), kaping drops each after 2 misses, and Kamailio removes
    // every one of them when asked.
    let r = k.wait_registrar(Duration::from_secs(25), "every removal made", |r| {
        r["added"] == DEAD && r["removed"] == DEAD && r["contacts"] == 0
    });
    assert_eq!(r["feed_configured"], true, "{r}");
    assert_eq!(r["removal_configured"], true, "{r}");
    assert_eq!(r["guard_tripped"], false, "{r}");
    assert!(n(&r, "syncs_done") >= 1, "{r}");
    assert!(n(&r, "syncs") >= 1 && n(&r, "joins") >= 1, "{r}");
    assert!(n(&r, "changes") >= DEAD && n(&r, "requests") >= DEAD, "{r}");
    assert_eq!(n(&r, "removals_sent"), DEAD, "{r}");
    for key in [
        "removals_withheld",
        "guard_trips",
        "remove_not_found",
        "remove_failed",
        "not_peer",
        "rejected",
        "refused",
    ] {
        assert_eq!(n(&r, key), 0, "{key}: {r}");
    }

    // The shm figures are the control socket's: once both have settled,
    // every figure keepalive.stats also has agrees (the shm lags up to 1 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let shm = k.stat_json()["registrar"].clone();
        let control = ctl(&k.sock, &["keepalive.stats"])["registrar"].clone();
        let differ: Vec<&str> = RegistrarStat::ALL
            .iter()
            .map(|s| s.name())
            .filter(|name| control.get(*name).is_some() && shm[*name] != control[*name])
            .collect();
        let shared = RegistrarStat::ALL
            .iter()
            .filter(|s| control.get(s.name()).is_some())
            .count();
        assert!(
            shared >= 25,
            "keepalive.stats names {shared} figures: {control}"
        );
        if differ.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{differ:?} differ: shm {shm}\nkeepalive.stats {control}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let page = k.stat(&["prometheus", "--once"]);
    let m = metrics(&page);
    for (series, value) in [
        (
            "kaping_registrar_changes_total{kind=\"added\"}",
            DEAD as f64,
        ),
        (
            "kaping_registrar_removals_total{outcome=\"removed\"}",
            DEAD as f64,
        ),
        (
            "kaping_registrar_removals_total{outcome=\"not_found\"}",
            0.0,
        ),
        ("kaping_registrar_removals_total{outcome=\"failed\"}", 0.0),
        ("kaping_registrar_removals_total{outcome=\"withheld\"}", 0.0),
        ("kaping_registrar_removals_sent_total", DEAD as f64),
        ("kaping_registrar_removal_guard_tripped", 0.0),
        ("kaping_registrar_contacts", 0.0),
        (
            "kaping_registrar_dmq_discarded_total{cause=\"not_peer\"}",
            0.0,
        ),
    ] {
        assert_eq!(m.get(series), Some(&value), "{series}\n{page}");
    }
    assert!(m["kaping_registrar_syncs_completed_total"] >= 1.0, "{page}");
    assert!(
        m["kaping_registrar_dmq_records_received_total"] >= DEAD as f64,
        "{page}"
    );
    promtool_check(&page);

    let text = k.stat(&["--interval", "0"]);
    println!("{text}");
    assert!(
        text.contains(&format!(
            "\n  removal: guard ok (0 trips); sent {DEAD}, removed {DEAD} ("
        )) && text.contains(" confirmed over DMQ), not found 0, failed 0, withheld 0"),
        "{text}"
    );
    let feed = text
        .lines()
        .find(|l| l.starts_with("registrar feed: "))
        .unwrap_or_else(|| panic!("no registrar section: {text}"));
    assert!(feed.contains(&format!("added {DEAD},")), "{feed}");
}

#[test]
fn a_tripped_guard_shows_in_kaping_stat() {
    const DEAD: u64 = 10;
    // All contacts silent at once, as kaping's own outage would look: far
    // more than the default 5 %, so the guard withholds their removals. It
    // stays tripped only until a window (one interval) ends with few enough
    // removals, even none; a 3 s interval keeps it tripped across several
    // of kaping's once-a-second publications.
    let Some(k) = Setup::start(7000, DEAD as u32, "3s", &[]) else {
        return;
    };
    // Each view must show the guard tripped while it is: all three polled.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut json, mut page, mut text) = (None, None, None);
    while json.is_none() || page.is_none() || text.is_none() {
        assert!(
            Instant::now() < deadline,
            "the tripped guard not shown in every view within 30 s: json {json:?}, \
             prometheus {page:?}, text {text:?}\nkaping: {}",
            k.kaping_log()
        );
        let r = k.stat_json()["registrar"].clone();
        if json.is_none() && r["guard_tripped"] == true {
            json = Some(r);
        }
        let p = k.stat(&["prometheus", "--once"]);
        if page.is_none() && metrics(&p).get("kaping_registrar_removal_guard_tripped") == Some(&1.0)
        {
            page = Some(p);
        }
        let t = k.stat(&["--interval", "0"]);
        if text.is_none() && t.contains("\n  removal: guard TRIPPED, removals withheld (") {
            text = Some(t);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (r, page, text) = (json.unwrap(), page.unwrap(), text.unwrap());
    println!("{text}");
    assert!(n(&r, "syncs_done") >= 1, "{r}");
    assert!(n(&r, "guard_trips") >= 1, "{r}");
    // A trip needs more than one removal in a window (the limit is at least 1).
    assert!(n(&r, "removals_withheld") >= 2, "{r}");
    let m = metrics(&page);
    assert_eq!(
        m.get("kaping_registrar_changes_total{kind=\"added\"}"),
        Some(&(DEAD as f64)),
        "{page}"
    );
    assert!(
        m["kaping_registrar_removals_total{outcome=\"withheld\"}"] >= 2.0,
        "{page}"
    );
    assert!(
        m["kaping_registrar_removal_guard_trips_total"] >= 1.0,
        "{page}"
    );
    promtool_check(&page);

    // In the end every dead contact's removal was decided: withheld, or (a
    // straggler in a later window, once the guard resumed) sent and made.
    let r = k.wait_registrar(Duration::from_secs(20), "every removal decided", |r| {
        let g = |k: &str| r[k].as_u64().unwrap_or(0);
        g("removals_withheld") + g("removals_sent") == DEAD
            && g("removed") + g("remove_not_found") + g("remove_failed") == g("removals_sent")
    });
    assert_eq!(n(&r, "added"), DEAD, "{r}");
    assert_eq!(n(&r, "remove_failed"), 0, "{r}");
}
