//! The Grafana dashboard (`contrib/grafana/kaping.json`) and the recording
//! rules (`contrib/prometheus/kaping-rules.yml`) against each other and
//! against a live exporter, so a renamed metric or label breaks the build:
//!
//! * every query of the dashboard is a rule's `expr`, word for word, and
//!   every rule is a query of the dashboard;
//! * `promtool check rules` accepts the rules file (SKIP, printed, where
//!   promtool is missing; `.ci/run` fetches it);
//! * a real daemon pings 200 contacts answered by `kaping-loadgen serve` on
//!   loopback, with `--shard 0/1`, and `kaping-stat prometheus --listen`
//!   serves its figures: every metric a rule names is on the page, every
//!   `label="value"` matcher selects a sample, and every label a rule
//!   aggregates by is on some kaping sample (or is a label Prometheus adds
//!   or the `kaping_info` join brings).

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::free_ports;

const DASHBOARD: &str = "contrib/grafana/kaping.json";
const RULES: &str = "contrib/prometheus/kaping-rules.yml";

/// Labels a rule may group by that no exporter sample carries: Prometheus
/// adds `instance` (and `job`) at scrape time; `shard` comes from
/// `kaping_info` through `group_left`, checked on that metric below.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every `expr` of every panel, rows' nested panels included.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo(DASHBOARD)).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    fn walk(panels: &Value, out: &mut Vec<String>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let e = t["expr"].as_str().expect("every target has an expr");
                out.push(e.to_string());
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    assert!(!out.is_empty(), "no queries in {DASHBOARD}");
    out
}

/// `(record, expr)` of every rule. The file keeps each on one line
/// (`- record: NAME`, then `expr: '...'`), which is what this reads;
/// promtool checks that the whole file is valid.
fn rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo(RULES)).unwrap();
    let mut out = Vec::new();
    let mut record: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(r) = t.strip_prefix("- record:") {
            assert!(record.is_none(), "{RULES}:{}: record without expr", n + 1);
            record = Some(r.trim().to_string());
        } else if let Some(e) = t.strip_prefix("expr:") {
            let e = e.trim();
            let e = e
                .strip_prefix('\'')
                .and_then(|e| e.strip_suffix('\''))
                .unwrap_or_else(|| panic!("{RULES}:{}: write expr in single quotes", n + 1));
            let r = record
                .take()
                .unwrap_or_else(|| panic!("{RULES}:{}: expr without record", n + 1));
            out.push((r, e.to_string()));
        }
    }
    assert!(record.is_none(), "{RULES}: last record without expr");
    out
}

#[test]
fn every_dashboard_query_is_a_recording_rule() {
    let rules = rules();
    let mut names = BTreeSet::new();
    for (r, _) in &rules {
        assert!(names.insert(r.as_str()), "rule {r} recorded twice");
        assert!(r.contains(':'), "rule {r}: name it level:metric:operations");
    }
    let exprs: BTreeSet<&str> = rules.iter().map(|(_, e)| e.as_str()).collect();
    let dash = dashboard_exprs();
    let missing: Vec<&String> = dash
        .iter()
        .filter(|e| !exprs.contains(e.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "dashboard queries with no recording rule in {RULES}:\n{missing:#?}"
    );
    let shown: BTreeSet<&str> = dash.iter().map(String::as_str).collect();
    let unshown: Vec<&(String, String)> = rules
        .iter()
        .filter(|(_, e)| !shown.contains(e.as_str()))
        .collect();
    assert!(
        unshown.is_empty(),
        "rules no dashboard panel shows:\n{unshown:#?}"
    );
}

#[test]
fn promtool_accepts_the_rules() {
    if Command::new("promtool").arg("--version").output().is_err() {
        println!("SKIP promtool not installed");
        return;
    }
    let o = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo(RULES))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "promtool check rules {RULES}:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// What the rules refer to, read from their PromQL: metric names (every
/// `kaping_*` identifier), `metric{label="value"}` matchers, and the labels
/// of `by (...)` clauses.
#[derive(Default, Debug)]
struct Refs {
    metrics: BTreeSet<String>,
    matchers: BTreeSet<(String, String, String, String)>,
    by_labels: BTreeSet<String>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn refs(exprs: &[String]) -> Refs {
    let mut r = Refs::default();
    for e in exprs {
        let b = e.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let c = b[i] as char;
            if !(c.is_ascii_alphabetic() || c == '_') || (i > 0 && is_ident(b[i - 1] as char)) {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && is_ident(b[i] as char) {
                i += 1;
            }
            let word = &e[start..i];
            let rest = e[i..].trim_start();
            if word.starts_with("kaping_") {
                r.metrics.insert(word.to_string());
                if let Some(sel) = rest.strip_prefix('{') {
                    let sel = &sel[..sel.find('}').expect("closed selector")];
                    for m in sel.split(',') {
                        let (label, op, value) = ["!=", "=~", "!~", "="]
                            .iter()
                            .find_map(|op| m.split_once(op).map(|(l, v)| (l.trim(), *op, v.trim())))
                            .expect("a label matcher");
                        r.matchers.insert((
                            word.to_string(),
                            label.to_string(),
                            op.to_string(),
                            value.trim_matches('"').to_string(),
                        ));
                    }
                }
            } else if word == "by" || word == "on" || word == "group_left" {
                if let Some(list) = rest.strip_prefix('(') {
                    let list = &list[..list.find(')').unwrap()];
                    for l in list.split(',').map(str::trim).filter(|l| !l.is_empty()) {
                        r.by_labels.insert(l.to_string());
                    }
                }
            }
        }
    }
    r
}

/// One sample of the exposition: name and labels.
struct Sample {
    name: String,
    labels: HashMap<String, String>,
}

fn parse_page(page: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in page.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..end].to_string();
        let mut labels = HashMap::new();
        if line[end..].starts_with('{') {
            let body = &line[end + 1..line.rfind('}').unwrap()];
            // Label values here never hold a comma or an escaped quote.
            for kv in body.split(',').filter(|kv| !kv.is_empty()) {
                let (k, v) = kv.split_once('=').unwrap();
                labels.insert(k.to_string(), v.trim_matches('"').to_string());
            }
        }
        out.push(Sample { name, labels });
    }
    out
}

fn http_get(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Children killed when the test ends, however it ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The sum of every sample of `name` on the page.
fn value(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[test]
fn every_metric_the_rules_name_is_exported_by_a_live_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let serve_port = free_ports(1);
    let contacts = dir.path().join("contacts.txt");
    let status = Command::new(env!("CARGO_BIN_EXE_kaping-loadgen"))
        .args([
            "contacts",
            "--count",
            "200",
            "--port",
            &serve_port.to_string(),
        ])
        .arg("--out")
        .arg(&contacts)
        .status()
        .unwrap();
    assert!(status.success());
    let mut procs = Procs(Vec::new());
    procs.0.push(
        Command::new(env!("CARGO_BIN_EXE_kaping-loadgen"))
            .args(["serve", "--listen", &format!("0.0.0.0:{serve_port}")])
            .args(["--seconds", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(200));
    let shm = dir.path().join("shm");
    let bind_port = free_ports(2);
    procs.0.push(
        Command::new(env!("CARGO_BIN_EXE_kaping"))
            .arg("run")
            .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
            .arg("--contacts")
            .arg(&contacts)
            .arg("--shm")
            .arg(&shm)
            .args(["--events", "none", "--shard", "0/1"])
            .args(["--bind", &format!("127.0.0.1:{bind_port}")])
            .args(["--workers", "2", "--max-contacts", "4096"])
            .args(["--pin-workers", "false", "--interval", "1s"])
            .args(["--reply-timeout", "500ms", "--run-for", "60s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http_port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{http_port}");
    procs.0.push(
        Command::new(env!("CARGO_BIN_EXE_kaping-stat"))
            .arg("--shm")
            .arg(&shm)
            .args(["prometheus", "--listen", &addr])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // Until the daemon is up and every contact has answered at least once,
    // so the RTT histogram and the per-worker counters hold figures.
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        if let Some(page) = http_get(&addr) {
            if value(&page, "kaping_up") == 1.0
                && value(&page, "kaping_replies_matched_total") >= 200.0
                && value(&page, "kaping_rtt_seconds_count") > 0.0
            {
                break page;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the exporter on {addr} did not show 200 answered contacts within 30 s: {:?}",
            http_get(&addr)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let samples = parse_page(&page);

    let exprs: Vec<String> = rules().into_iter().map(|(_, e)| e).collect();
    let refs = refs(&exprs);
    assert!(refs.metrics.len() >= 10, "too few metrics read: {refs:?}");
    let names: BTreeSet<&str> = samples.iter().map(|s| s.name.as_str()).collect();
    let missing: Vec<&String> = refs
        .metrics
        .iter()
        .filter(|m| !names.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics the rules name that kaping-stat prometheus does not export: {missing:?}\n{page}"
    );
    for (metric, label, op, v) in &refs.matchers {
        let hit = samples.iter().any(|s| {
            s.name == *metric
                && match op.as_str() {
                    "=" => s.labels.get(label) == Some(v),
                    _ => s.labels.contains_key(label),
                }
        });
        assert!(
            hit,
            "{metric}{{{label}{op}\"{v}\"}}: no such sample (renamed label or value?)\n{page}"
        );
    }
    let exported: BTreeSet<&str> = samples
        .iter()
        .filter(|s| s.name.starts_with("kaping_"))
        .flat_map(|s| s.labels.keys().map(String::as_str))
        .collect();
    for l in &refs.by_labels {
        assert!(
            TARGET_LABELS.contains(&l.as_str()) || exported.contains(l.as_str()),
            "the rules group by '{l}', which no kaping sample carries\n{page}"
        );
    }
    // The per-shard rules join on kaping_info's shard label.
    assert!(
        samples
            .iter()
            .any(|s| s.name == "kaping_info"
                && s.labels.get("shard").map(String::as_str) == Some("0/1")),
        "kaping_info carries no shard=\"0/1\"\n{page}"
    );
    println!(
        "{} rules, {} metrics, {} matchers, {} grouping labels checked against a live exporter",
        exprs.len(),
        refs.metrics.len(),
        refs.matchers.len(),
        refs.by_labels.len()
    );
}
