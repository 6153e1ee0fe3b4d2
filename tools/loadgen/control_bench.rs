//! The control-socket benchmark (`control-bench`): how fast contacts can be
//! added and deleted through `keepalive.add`/`keepalive.del` batches with
//! durability on, and what that traffic does to the ping rate.
//!
//! What it runs and measures, in order:
//! 1. a `serve` responder child and a kaping daemon child on loopback, the
//!    daemon with `--control <tmp>/ctl.sock --state-dir <dir>` (so every
//!    acknowledged change is journalled and fsync'd first) and `--contacts N`
//!    simulated contacts from a file;
//! 2. once the daemon pings: a warm-up, then the ping rate with no control
//!    traffic (`baseline`), from the shared-memory counters;
//! 3. `--adds` new contacts (addresses after the file's, answered by the
//!    same responder) pushed through one connection as JSON-RPC arrays of
//!    `--batch` `keepalive.add`, one batch at a time: adds/s end to end,
//!    per-batch latency (write to answer parsed) p50/p99/max, and the ping
//!    rate in that window against the baseline;
//! 4. the same contacts deleted in batches of `keepalive.del`: dels/s, the
//!    same latencies and ping-rate ratio.
//!
//! The added contacts get their own long interval (`--add-interval`, 1 h by
//! default) so that the ping rate during the adds is the file contacts'
//! service under control traffic, not the new contacts' extra load.
//!
//! Durability costs what the state directory's file system makes fsync
//! cost: the state directory is on the system temp dir by default (not
//! /dev/shm, where fsync is free), can be chosen with `--state-dir`, and its
//! file system type is reported.
//!
//! Ownership: the two children are stopped and reaped by their guards'
//! `Drop` (see `bench.rs`), the temporary directories removed by theirs, on
//! success and every error path; each child also has its own backstop
//! (`--seconds`, `--run-for`). Setup and once-per-phase sampling only:
//! allocation is free here. Caller: `main` (`control-bench` subcommand).

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use kaping::control::client::{CallError, Client};
use kaping::shm::layout::Counter;
use kaping::shm::reader::ShmReader;
use kaping::sim::contacts::{contact_uri, V4_ADDRS};
use kaping::sim::Layout;
use serde::Serialize;
use serde_json::{json, Value};

use crate::bench::{
    cpu_ticks, daemon_command, free_ports, kaping_binary, loadavg, spawn_responder, wait_loaded,
    write_footer, DaemonArgs, Guarded, Sample, Started, TempDir, LOAD_TIMEOUT_BASE_S,
    LOAD_TIMEOUT_PER_MILLION_S, MESSAGES_MAX, USER_HZ,
};

/// Slab headroom over contacts + adds: the daemon places each contact on a
/// worker by its destination, so the per-worker shares are not exactly even.
const SLAB_HEADROOM: f64 = 1.25;
/// How long the daemon may take to send its first ping after loading, and
/// to open its control socket.
const FIRST_PING_TIMEOUT_S: u64 = 30;
/// Backstop of the children beyond the expected run: loading, warm-up,
/// baseline, plus this floor and a worst case of 1,000 changes per second.
const BACKSTOP_FLOOR_S: u64 = 300;
const BACKSTOP_CHANGES_PER_S: u64 = 1000;
/// Per-batch answer timeout (a batch of 10,000 with fsync takes well under
/// a second; this only catches a daemon that stopped answering).
const BATCH_TIMEOUT_S: u64 = 120;
/// `owner` of every contact the bench adds (so `flush --owner` can clean up
/// after an interrupted run on a kept daemon).
const OWNER: &str = "control-bench";

#[derive(Clone, Debug)]
pub struct ControlBenchConfig {
    /// Contacts loaded from the file (pinged throughout).
    pub contacts: u64,
    /// Contacts added, then deleted, through the socket.
    pub adds: u64,
    /// Requests per JSON-RPC batch.
    pub batch: usize,
    /// Connections sending batches at once (each one batch at a time).
    pub connections: usize,
    pub workers: Option<u32>,
    pub backend: String,
    /// Ping interval of the file contacts.
    pub interval: Duration,
    /// Ping interval given to the added contacts.
    pub add_interval: Duration,
    pub latency_ns: u64,
    pub kaping: Option<PathBuf>,
    pub warmup: Duration,
    /// Length of the no-control-traffic ping-rate measurement.
    pub baseline: Duration,
    /// Parent of the daemon's state directory (default: the system temp dir).
    pub state_parent: Option<PathBuf>,
    pub responder_threads: usize,
    pub max_contacts: Option<u32>,
}

/// Everything `control-bench` measured. Field names are a stable contract
/// for scripts (`--json`); new fields are appended, none renamed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ControlBenchReport {
    pub contacts: u64,
    pub adds: u64,
    pub batch: usize,
    pub connections: usize,
    pub workers: u32,
    pub backend: String,
    pub interval_s: f64,
    pub add_interval_s: f64,
    pub state_dir: String,
    /// File system type of the state directory (`ext4`, `tmpfs`, ...).
    pub state_fs: String,
    pub load_seconds: f64,
    pub baseline: PingRates,
    pub add: PhaseReport,
    /// `keepalive.stats` contacts.total once the adds are acknowledged.
    pub contacts_after_adds: Option<u64>,
    /// Journal commits (fsyncs) the adds took, from `keepalive.stats`.
    pub journal_commits_for_adds: Option<u64>,
    pub del: PhaseReport,
    pub contacts_after_dels: Option<u64>,
    pub journal_commits_for_dels: Option<u64>,
    pub daemon_messages: Vec<String>,
    pub loadavg_before: String,
    pub loadavg_after: String,
}

/// Pings over a window, from the shm counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PingRates {
    pub window_s: f64,
    pub sent_per_s: f64,
    pub matched_per_s: f64,
    pub timed_out: u64,
    pub late: u64,
    /// Daemon CPU (user + system) over the window, in cores.
    pub daemon_cpu_cores: f64,
}

/// One phase of control traffic (adds or deletes).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseReport {
    pub requests: u64,
    pub batches: u64,
    pub ok: u64,
    pub failed: u64,
    /// The first refusal, as the daemon worded it.
    pub first_error: Option<String>,
    pub seconds: f64,
    pub per_s: f64,
    pub batch_p50_us: u64,
    pub batch_p99_us: u64,
    pub batch_max_us: u64,
    /// The ping rate while the phase ran.
    pub pings: PingRates,
    /// `pings.sent_per_s ÷ baseline.sent_per_s`.
    pub ping_ratio: f64,
    /// This process's CPU over the phase, in cores (building, encoding and
    /// decoding the batches): is the client the limit?
    pub client_cpu_cores: f64,
}

/// A directory removed with everything in it on drop.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Nearest-rank percentile of sorted values (`q` in 0..=1); 0 when empty.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The file system type of the mount holding `path`, from a mounts table
/// (`/proc/self/mounts` format: device, mount point, type, ...): the
/// longest mount point that is a prefix of `path`.
fn fs_type_in(mounts: &str, path: &Path) -> Option<String> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, kind) = (f.next()?, f.next()?, f.next()?);
            // Spaces in mount points are written as \040.
            let point = point.replace("\\040", " ");
            path.starts_with(&point)
                .then(|| (point.len(), kind.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, kind)| kind)
}

fn fs_type(path: &Path) -> String {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|m| fs_type_in(&m, &path))
        .unwrap_or_else(|| "unknown".to_string())
}

/// Shm counters and daemon CPU at one instant.
struct Mark {
    sample: Sample,
    cpu_ticks: u64,
}

impl Mark {
    fn take(shm: &ShmReader, pid: u32) -> Mark {
        Mark {
            sample: Sample::read(shm),
            cpu_ticks: cpu_ticks(pid).unwrap_or(0),
        }
    }

    fn rates_since(&self, earlier: &Mark) -> PingRates {
        let window_s = self
            .sample
            .at
            .duration_since(earlier.sample.at)
            .as_secs_f64()
            .max(1e-6);
        let d = |c| self.sample.since(&earlier.sample, c);
        PingRates {
            window_s,
            sent_per_s: d(Counter::Sent) as f64 / window_s,
            matched_per_s: d(Counter::Matched) as f64 / window_s,
            timed_out: d(Counter::TimedOut),
            late: d(Counter::Late),
            daemon_cpu_cores: self.cpu_ticks.saturating_sub(earlier.cpu_ticks) as f64
                / USER_HZ as f64
                / window_s,
        }
    }
}

/// What one connection's share of a phase came to.
#[derive(Default)]
struct Share {
    latencies_us: Vec<u64>,
    batches: u64,
    requests: u64,
    ok: u64,
    failed: u64,
    first_error: Option<String>,
}

/// Sends `method` for every index of `indexes`, `batch` per JSON-RPC array.
/// Batch k goes to connection k mod N; each connection sends its next batch
/// once its previous one is answered (as N registrar processes would, each
/// with its own socket), all at once. Measures the whole.
fn run_phase(
    clients: &mut [Client],
    shm: &ShmReader,
    daemon_pid: u32,
    method: &'static str,
    indexes: std::ops::Range<u64>,
    batch: usize,
    params: impl Fn(u64) -> Value + Sync,
) -> Result<PhaseReport, String> {
    let n = clients.len() as u64;
    let batches = (indexes.end - indexes.start).div_ceil(batch as u64);
    let before = Mark::take(shm, daemon_pid);
    let own_ticks = || cpu_ticks(std::process::id()).unwrap_or(0);
    let client_ticks = own_ticks();
    let started = Instant::now();
    let params = &params;
    let shares: Vec<Result<Share, String>> = thread::scope(|scope| {
        let handles: Vec<_> = clients
            .iter_mut()
            .enumerate()
            .map(|(c, client)| {
                let indexes = indexes.clone();
                scope.spawn(move || {
                    let mut sh = Share::default();
                    let mut calls: Vec<(&str, Value)> = Vec::with_capacity(batch);
                    for k in (c as u64..batches).step_by(n as usize) {
                        let first = indexes.start + k * batch as u64;
                        let end = (first + batch as u64).min(indexes.end);
                        calls.clear();
                        calls.extend((first..end).map(|i| (method, params(i))));
                        let sent_at = Instant::now();
                        let results = client.batch(&calls).map_err(|e| {
                            format!(
                                "{method} batch {} of connection {c} (after {} acknowledged): {}",
                                sh.batches + 1,
                                sh.ok,
                                e.describe(method, None)
                            )
                        })?;
                        sh.latencies_us.push(sent_at.elapsed().as_micros() as u64);
                        sh.batches += 1;
                        sh.requests += end - first;
                        for res in results {
                            match res {
                                Ok(_) => sh.ok += 1,
                                Err(e) => {
                                    sh.failed += 1;
                                    if sh.first_error.is_none() {
                                        sh.first_error = Some(e.to_string());
                                    }
                                }
                            }
                        }
                    }
                    Ok(sh)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a client thread panicked".to_string()))
            })
            .collect()
    });
    let elapsed = started.elapsed();
    let after = Mark::take(shm, daemon_pid);
    let mut r = PhaseReport::default();
    let mut latencies_us = Vec::with_capacity(batches as usize);
    for sh in shares {
        let sh = sh?;
        latencies_us.extend(sh.latencies_us);
        r.batches += sh.batches;
        r.requests += sh.requests;
        r.ok += sh.ok;
        r.failed += sh.failed;
        if r.first_error.is_none() {
            r.first_error = sh.first_error;
        }
    }
    latencies_us.sort_unstable();
    r.seconds = elapsed.as_secs_f64();
    r.per_s = r.requests as f64 / r.seconds.max(1e-9);
    r.batch_p50_us = percentile(&latencies_us, 0.50);
    r.batch_p99_us = percentile(&latencies_us, 0.99);
    r.batch_max_us = latencies_us.last().copied().unwrap_or(0);
    r.pings = after.rates_since(&before);
    r.client_cpu_cores =
        own_ticks().saturating_sub(client_ticks) as f64 / USER_HZ as f64 / r.seconds.max(1e-9);
    Ok(r)
}

/// `contacts.total` and `control.journal_commits` of `keepalive.stats`
/// (either may be missing from an older daemon: `None`).
fn stats_figures(client: &mut Client) -> Result<(Option<u64>, Option<u64>), String> {
    let s = client
        .call("keepalive.stats", Value::Null)
        .map_err(|e| e.describe("keepalive.stats", None))?;
    Ok((
        s.pointer("/contacts/total").and_then(Value::as_u64),
        s.pointer("/control/journal_commits")
            .and_then(Value::as_u64),
    ))
}

/// Waits until the daemon's control socket accepts a connection.
fn connect(path: &Path, daemon: &mut Guarded) -> Result<Client, String> {
    let deadline = Instant::now() + Duration::from_secs(FIRST_PING_TIMEOUT_S);
    loop {
        match Client::connect(path) {
            Ok(c) => return Ok(c),
            Err(CallError::Connect { .. }) if Instant::now() < deadline => {
                daemon.check_alive()?;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

pub fn run(cfg: &ControlBenchConfig) -> Result<ControlBenchReport, String> {
    if cfg.contacts == 0 || cfg.adds == 0 || cfg.batch == 0 || cfg.connections == 0 {
        return Err("--contacts, --adds, --batch and --connections must be at least 1".to_string());
    }
    if cfg.contacts + cfg.adds > V4_ADDRS {
        return Err(format!(
            "--contacts + --adds is limited to {V4_ADDRS} (distinct loopback addresses)"
        ));
    }
    let workers = match cfg.workers {
        Some(0) => return Err("--workers must be at least 1".to_string()),
        Some(w) => w,
        None => (thread::available_parallelism().map_or(2, |n| n.get() as u32) / 2).max(1),
    };
    let max_contacts = match cfg.max_contacts {
        Some(m) => m,
        None => {
            let want = ((cfg.contacts + cfg.adds) as f64 * SLAB_HEADROOM).ceil();
            if want > f64::from(u32::MAX) {
                return Err("--contacts + --adds is too large for one daemon".to_string());
            }
            want as u32
        }
    };
    let kaping = kaping_binary(cfg.kaping.as_deref())?;
    let loadavg_before = loadavg();
    let dir = TempDir::create(None)?;
    let state_parent = cfg.state_parent.clone().unwrap_or_else(std::env::temp_dir);
    let state = RemoveOnDrop(state_parent.join(format!(
        "kaping-control-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    )));
    fs::create_dir_all(&state.0)
        .map_err(|e| format!("cannot create {}: {e}", state.0.display()))?;
    let state_fs = fs_type(&state.0);
    let (responder_port, bind_port) = free_ports(workers as u16)?;

    let contacts_path = dir.0.join("contacts.txt");
    let layout = Layout::new(responder_port, 1, false)?;
    let file = File::create(&contacts_path)
        .map_err(|e| format!("cannot create {}: {e}", contacts_path.display()))?;
    let mut out = BufWriter::new(file);
    kaping::sim::write_contacts(&layout, cfg.contacts, &mut out, None)
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write contacts: {e}"))?;
    drop(out);

    let load_timeout = Duration::from_secs(
        LOAD_TIMEOUT_BASE_S + LOAD_TIMEOUT_PER_MILLION_S * cfg.contacts.div_ceil(1_000_000),
    );
    let backstop_s = load_timeout.as_secs()
        + cfg.warmup.as_secs()
        + cfg.baseline.as_secs()
        + BACKSTOP_FLOOR_S
        + 2 * cfg.adds / BACKSTOP_CHANGES_PER_S;

    let mut responder = spawn_responder(
        responder_port,
        cfg.responder_threads,
        cfg.latency_ns,
        backstop_s,
    )?;

    let shm_path = dir.0.join("kaping.shm");
    let socket = dir.0.join("ctl.sock");
    let reply_timeout = (cfg.interval / 4).min(Duration::from_secs(1));
    let mut run = daemon_command(&DaemonArgs {
        kaping: &kaping,
        contacts: &contacts_path,
        shm: &shm_path,
        bind_port,
        workers,
        backend: &cfg.backend,
        interval: cfg.interval,
        reply_timeout,
        instance: "control-bench",
        max_contacts,
        run_for: Duration::from_secs(backstop_s),
        events: None,
    });
    run.arg("--control")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state.0);
    eprintln!(
        "control-bench: {} contacts pinged every {:.3} s, {workers} workers, backend {}; state in {} ({state_fs}) ...",
        cfg.contacts,
        cfg.interval.as_secs_f64(),
        cfg.backend,
        state.0.display()
    );
    let mut daemon = Guarded::spawn("daemon", run)?;
    let daemon_pid = daemon.pid();
    let Started {
        load_seconds,
        backend,
        mut messages,
        ..
    } = wait_loaded(&mut daemon, load_timeout, cfg.contacts)?;
    let shm = ShmReader::open(&shm_path)
        .map_err(|e| format!("cannot open {}: {e}", shm_path.display()))?;
    let backend = backend.unwrap_or_else(|| shm.header().backend);
    let mut clients = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections {
        let mut c = connect(&socket, &mut daemon)?;
        c.set_timeout(Some(Duration::from_secs(BATCH_TIMEOUT_S)))
            .map_err(|e| e.to_string())?;
        clients.push(c);
    }

    // Pinging, then steady, then the baseline with no control traffic.
    let first_ping_by = Instant::now() + Duration::from_secs(FIRST_PING_TIMEOUT_S);
    while Sample::read(&shm).get(Counter::Sent) == 0 {
        daemon.check_alive()?;
        if Instant::now() > first_ping_by {
            return Err(format!(
                "the daemon sent no ping within {FIRST_PING_TIMEOUT_S} s of loading"
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(cfg.warmup);
    let base0 = Mark::take(&shm, daemon_pid);
    thread::sleep(cfg.baseline);
    let baseline = Mark::take(&shm, daemon_pid).rates_since(&base0);
    daemon.check_alive()?;
    responder.check_alive()?;

    let added = cfg.contacts..cfg.contacts + cfg.adds;
    let port = responder_port;
    let add_interval_s = cfg.add_interval.as_secs_f64();
    let (_, commits0) = stats_figures(&mut clients[0])?;
    eprintln!(
        "control-bench: baseline {:.0} pings/s; adding {} contacts in batches of {} ...",
        baseline.sent_per_s, cfg.adds, cfg.batch
    );
    let mut add = run_phase(
        &mut clients,
        &shm,
        daemon_pid,
        "keepalive.add",
        added.clone(),
        cfg.batch,
        |i| json!({"uri": contact_uri(i, port, 1, false), "interval": add_interval_s, "owner": OWNER}),
    )?;
    let (contacts_after_adds, commits1) = stats_figures(&mut clients[0])?;
    daemon.check_alive()?;
    eprintln!("control-bench: {:.0} adds/s; deleting them ...", add.per_s);
    let mut del = run_phase(
        &mut clients,
        &shm,
        daemon_pid,
        "keepalive.del",
        added,
        cfg.batch,
        |i| json!({"uri": contact_uri(i, port, 1, false)}),
    )?;
    let (contacts_after_dels, commits2) = stats_figures(&mut clients[0])?;
    daemon.check_alive()?;
    drop(clients);

    let ratio = |r: &PingRates| {
        if baseline.sent_per_s > 0.0 {
            r.sent_per_s / baseline.sent_per_s
        } else {
            0.0
        }
    };
    add.ping_ratio = ratio(&add.pings);
    del.ping_ratio = ratio(&del.pings);

    daemon.stop(true);
    responder.stop(false);
    messages.extend(
        daemon
            .lines
            .try_iter()
            .take(MESSAGES_MAX.saturating_sub(messages.len())),
    );
    drop(shm);

    let delta = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
    Ok(ControlBenchReport {
        contacts: cfg.contacts,
        adds: cfg.adds,
        batch: cfg.batch,
        connections: cfg.connections,
        workers,
        backend,
        interval_s: cfg.interval.as_secs_f64(),
        add_interval_s,
        state_dir: state.0.display().to_string(),
        state_fs,
        load_seconds,
        baseline,
        add,
        contacts_after_adds,
        journal_commits_for_adds: delta(commits0, commits1),
        del,
        contacts_after_dels,
        journal_commits_for_dels: delta(commits1, commits2),
        daemon_messages: messages,
        loadavg_before,
        loadavg_after: loadavg(),
    })
}

fn opt(v: Option<u64>) -> String {
    v.map_or("-".to_string(), |v| v.to_string())
}

/// The readable report.
pub fn print_text(r: &ControlBenchReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "kaping control-bench: {} contacts pinged every {:.3} s, {} workers, backend {}; {} adds then dels in batches of {} over {} connection{}",
        r.contacts,
        r.interval_s,
        r.workers,
        r.backend,
        r.adds,
        r.batch,
        r.connections,
        if r.connections == 1 { "" } else { "s" }
    )?;
    writeln!(
        out,
        "  state dir           {} ({}){}",
        r.state_dir,
        r.state_fs,
        if r.state_fs == "tmpfs" || r.state_fs == "ramfs" {
            ": fsync is free here, durability cost NOT measured (use --state-dir on a disk)"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "  baseline            {:>10.0} pings/s  ({:.0} matched/s, daemon {:.2} cores, {:.1} s without control traffic)",
        r.baseline.sent_per_s, r.baseline.matched_per_s, r.baseline.daemon_cpu_cores, r.baseline.window_s
    )?;
    for (name, p, after, commits) in [
        (
            "adds",
            &r.add,
            r.contacts_after_adds,
            r.journal_commits_for_adds,
        ),
        (
            "dels",
            &r.del,
            r.contacts_after_dels,
            r.journal_commits_for_dels,
        ),
    ] {
        writeln!(
            out,
            "  {name:<19} {:>10.0} /s  ({} in {:.2} s, {} batches; batch latency p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms)",
            p.per_s,
            p.requests,
            p.seconds,
            p.batches,
            p.batch_p50_us as f64 / 1000.0,
            p.batch_p99_us as f64 / 1000.0,
            p.batch_max_us as f64 / 1000.0
        )?;
        writeln!(
            out,
            "    pings meanwhile   {:>10.0} /s  = {:.3} of the baseline  (timed out {}, late {}, daemon {:.2} cores)",
            p.pings.sent_per_s, p.ping_ratio, p.pings.timed_out, p.pings.late, p.pings.daemon_cpu_cores
        )?;
        writeln!(
            out,
            "    acknowledged      {} ok, {} refused; journal commits {}; contacts after {}; client {:.2} cores",
            p.ok,
            p.failed,
            opt(commits),
            opt(after),
            p.client_cpu_cores
        )?;
        if let Some(e) = &p.first_error {
            writeln!(out, "    first refusal     {e}")?;
        }
    }
    write_footer(out, &r.daemon_messages, &r.loadavg_before, &r.loadavg_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[7], 0.99), 7);
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
    }

    #[test]
    fn the_state_dir_file_system_is_the_longest_mount_prefix() {
        let mounts = "\
/dev/sda1 / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
tmpfs /dev/shm tmpfs rw 0 0
/dev/sdb1 /tmp/disk\\040space xfs rw 0 0
";
        let t = |p: &str| fs_type_in(mounts, Path::new(p));
        assert_eq!(t("/var/lib/kaping").as_deref(), Some("ext4"));
        assert_eq!(t("/tmp/kaping-x").as_deref(), Some("tmpfs"));
        assert_eq!(t("/tmp/disk space/k").as_deref(), Some("xfs"));
        // A path prefix is a whole component: /tmpx is on /.
        assert_eq!(t("/tmpx").as_deref(), Some("ext4"));
        assert_eq!(fs_type_in("", Path::new("/x")), None);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let cfg = ControlBenchConfig {
            contacts: 10,
            adds: V4_ADDRS,
            batch: 1000,
            connections: 1,
            workers: Some(1),
            backend: "auto".into(),
            interval: Duration::from_secs(5),
            add_interval: Duration::from_secs(3600),
            latency_ns: 0,
            kaping: Some(PathBuf::from("/nonexistent/kaping")),
            warmup: Duration::ZERO,
            baseline: Duration::from_secs(1),
            state_parent: None,
            responder_threads: 1,
            max_contacts: None,
        };
        assert!(run(&cfg)
            .unwrap_err()
            .contains("distinct loopback addresses"));
        let cfg = ControlBenchConfig {
            adds: 10,
            batch: 0,
            ..cfg
        };
        assert!(run(&cfg).unwrap_err().contains("at least 1"));
        let cfg = ControlBenchConfig {
            batch: 10,
            connections: 0,
            ..cfg
        };
        assert!(run(&cfg).unwrap_err().contains("at least 1"));
        let cfg = ControlBenchConfig {
            connections: 2,
            ..cfg
        };
        assert!(run(&cfg)
            .unwrap_err()
            .contains("no kaping daemon at /nonexistent/kaping"));
    }

    #[test]
    fn the_text_report_names_every_figure() {
        let phase = |per_s: f64| PhaseReport {
            requests: 200_000,
            batches: 200,
            ok: 200_000,
            failed: 0,
            first_error: None,
            seconds: 200_000.0 / per_s,
            per_s,
            batch_p50_us: 8_000,
            batch_p99_us: 15_500,
            batch_max_us: 20_000,
            pings: PingRates {
                window_s: 1.6,
                sent_per_s: 39_000.0,
                matched_per_s: 39_000.0,
                timed_out: 0,
                late: 0,
                daemon_cpu_cores: 0.9,
            },
            ping_ratio: 0.975,
            client_cpu_cores: 0.1,
        };
        let mut del = phase(150_000.0);
        del.failed = 1;
        del.first_error = Some("keepalive.del sip:x: not found (code -32002)".into());
        let r = ControlBenchReport {
            contacts: 200_000,
            adds: 200_000,
            batch: 1000,
            connections: 1,
            workers: 1,
            backend: "uring".into(),
            interval_s: 5.0,
            add_interval_s: 3600.0,
            state_dir: "/tmp/kaping-control-bench-1-2".into(),
            state_fs: "tmpfs".into(),
            baseline: PingRates {
                window_s: 3.0,
                sent_per_s: 40_000.0,
                matched_per_s: 40_000.0,
                timed_out: 0,
                late: 0,
                daemon_cpu_cores: 0.4,
            },
            add: phase(125_000.0),
            contacts_after_adds: Some(400_000),
            journal_commits_for_adds: Some(200),
            del,
            contacts_after_dels: Some(200_000),
            ..ControlBenchReport::default()
        };
        let mut out = Vec::new();
        print_text(&r, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("durability cost NOT measured"), "{text}");
        assert!(text.contains("  adds                    125000 /s  (200000 in 1.60 s, 200 batches; batch latency p50 8.00 ms  p99 15.50 ms  max 20.00 ms)"), "{text}");
        assert!(
            text.contains("    pings meanwhile        39000 /s  = 0.975 of the baseline"),
            "{text}"
        );
        assert!(
            text.contains("journal commits 200; contacts after 400000"),
            "{text}"
        );
        assert!(
            text.contains("journal commits -; contacts after 200000"),
            "{text}"
        );
        assert!(
            text.contains("    first refusal     keepalive.del sip:x: not found (code -32002)"),
            "{text}"
        );
        // The JSON report carries the same figures under stable names.
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["add"]["per_s"], 125_000.0);
        assert_eq!(v["del"]["failed"], 1);
        assert_eq!(v["baseline"]["sent_per_s"], 40_000.0);
    }
}
