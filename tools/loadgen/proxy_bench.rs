//! `kaping-loadgen proxy-bench`: what pinging as the proxy (DESIGN §10)
//! costs kaping and the proxy, measured in one run.
//!
//! A Kamailio (Debian's, found on the PATH or given) listens on
//! `127.0.0.1:P` as a plain stateless forwarder; the `serve` responder
//! answers for N simulated contacts over 127.0.0.0/8, to the address each
//! request came from. kaping then runs once per mode, on the same contacts
//! at the same rate, one after the other:
//!
//! * `bind`: kaping's own socket (the replies never touch Kamailio);
//! * `relay`: `--source 127.0.0.1:P`: every reply reaches Kamailio, which
//!   forwards it statelessly to kaping's Via;
//! * `divert`: the same with `--replies divert`: the tc-ingress program
//!   hands the replies to kaping before Kamailio's socket sees them (needs
//!   CAP_BPF and CAP_NET_ADMIN; attaching to `lo` changes the host's
//!   loopback path, so run the bench inside a network namespace of its
//!   own, see tuning.md).
//!
//! Before the first mode, Kamailio's idle CPU is measured for as long as
//! one mode. The modes then run in turn, `--rounds` times over (bind,
//! relay, divert, bind, relay, ...), so drift on a shared machine falls on
//! every mode alike. For each mode, medians over the rounds: kaping's CPU
//! per answered ping, Kamailio's CPU (all its processes: one process
//! group) per ping and per second, and kaping's CPU per ping over the
//! `bind` mode's of the same run.
//!
//! No unsafe: signals go through the `kill` command.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kaping::shm::layout::Counter;
use kaping::shm::reader::ShmReader;
use kaping::sim::Layout;
use serde::Serialize;

use crate::bench::{
    cpu_ticks, daemon_command, free_ports, kaping_binary, spawn_responder, wait_loaded, DaemonArgs,
    Guarded, Sample, TempDir, USER_HZ,
};

pub struct ProxyBenchConfig {
    pub contacts: u64,
    pub interval: Duration,
    pub seconds: u32,
    pub warmup: Duration,
    pub modes: Vec<String>,
    pub rounds: u32,
    pub workers: u32,
    pub backend: String,
    pub kaping: Option<PathBuf>,
    pub kamailio: Option<PathBuf>,
    /// Kamailio's UDP receiver processes (`children`).
    pub kamailio_children: u32,
}

#[derive(Debug, Serialize)]
pub struct ModeReport {
    pub mode: String,
    /// How replies came back, as kaping said it at start.
    pub replies: String,
    pub pings_per_s: f64,
    pub answered_per_s: f64,
    pub kaping_cpu_us_per_ping: f64,
    pub kamailio_cpu_us_per_ping: f64,
    pub kamailio_cpu_ms_per_s: f64,
    /// Kamailio's CPU per second above its idle level.
    pub kamailio_cpu_ms_per_s_over_idle: f64,
    /// kaping's CPU per answered ping over the bind mode's of the same
    /// run; `None` for bind itself (or when bind was not run).
    pub kaping_over_bind: Option<f64>,
    pub timeouts: u64,
    /// kaping's CPU per answered ping of each round.
    pub kaping_cpu_us_per_ping_rounds: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct ProxyBenchReport {
    pub rounds: u32,
    pub contacts: u64,
    pub interval_s: f64,
    pub offered_per_s: f64,
    pub workers: u32,
    pub backend: String,
    pub kamailio_children: u32,
    pub kamailio_idle_cpu_ms_per_s: f64,
    pub modes: Vec<ModeReport>,
}

/// Kamailio as a stateless reply forwarder (no modules: the core forwards
/// every reply it has no transaction for to the next Via).
fn kamailio_config(port: u16, children: u32) -> String {
    format!(
        "#!KAMAILIO\ndebug=0\nlog_stderror=yes\nchildren={children}\nauto_aliases=no\n\
         dns=no\nrev_dns=no\ndisable_tcp=yes\nlisten=udp:127.0.0.1:{port}\n\
         request_route {{\n    drop;\n}}\n"
    )
}

/// Kamailio in its own process group, stopped with the group.
struct Kamailio {
    child: Child,
}

impl Kamailio {
    fn start(bin: &Path, dir: &Path, port: u16, children: u32) -> Result<Kamailio, String> {
        let cfg = dir.join("kamailio.cfg");
        fs::write(&cfg, kamailio_config(port, children))
            .map_err(|e| format!("cannot write {}: {e}", cfg.display()))?;
        let child = Command::new(bin)
            .arg("-f")
            .arg(&cfg)
            .args(["-DD", "-E", "-m", "64", "-M", "8", "-Y"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let k = Kamailio { child };
        let addr = format!("127.0.0.1:{port}").parse().expect("address");
        let ready_by = Instant::now() + Duration::from_secs(10);
        while Instant::now() < ready_by {
            if kaping::io::share::holders(addr, &[]).is_ok_and(|h| h.exact) {
                return Ok(k);
            }
            thread::sleep(Duration::from_millis(20));
        }
        Err(format!("kamailio did not bind {addr}"))
    }

    /// CPU ticks of every process in Kamailio's group.
    fn cpu_ticks(&self) -> u64 {
        let group = self.child.id();
        let Ok(dir) = fs::read_dir("/proc") else {
            return 0;
        };
        dir.filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| process_group(pid) == Some(group))
            .filter_map(cpu_ticks)
            .sum()
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

/// Field 5 of `/proc/PID/stat`: the process group.
fn process_group(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: state, ppid, pgrp.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

fn find_kamailio(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    [
        "/usr/sbin/kamailio",
        "/usr/local/sbin/kamailio",
        "/sbin/kamailio",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .ok_or_else(|| "no kamailio found (apt-get install kamailio, or --kamailio PATH)".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn ms(ticks: u64) -> f64 {
    ticks as f64 * 1000.0 / USER_HZ as f64
}

pub fn run(cfg: &ProxyBenchConfig) -> Result<ProxyBenchReport, String> {
    if cfg.contacts == 0 || cfg.seconds == 0 || cfg.workers == 0 || cfg.rounds == 0 {
        return Err("--contacts, --seconds, --rounds and --workers must be at least 1".into());
    }
    for m in &cfg.modes {
        if !matches!(m.as_str(), "bind" | "relay" | "divert") {
            return Err(format!("mode '{m}' is not one of bind, relay, divert"));
        }
    }
    let kaping = kaping_binary(cfg.kaping.as_deref())?;
    let kamailio_bin = find_kamailio(cfg.kamailio.as_deref())?;
    let dir = TempDir::create(None)?;
    // The daemon's ports, then Kamailio's: one free range.
    let (responder_port, bind_port) = free_ports(cfg.workers as u16 + 1)?;
    let proxy_port = bind_port + cfg.workers as u16;

    let contacts_path = dir.0.join("contacts.txt");
    let layout = Layout::new(responder_port, 1, false)?;
    let mut out = BufWriter::new(
        File::create(&contacts_path)
            .map_err(|e| format!("cannot create {}: {e}", contacts_path.display()))?,
    );
    kaping::sim::write_contacts(&layout, cfg.contacts, &mut out, None)
        .map_err(|e| format!("cannot write contacts: {e}"))?;
    out.flush().map_err(|e| e.to_string())?;
    drop(out);

    let per_mode = cfg.warmup + Duration::from_secs(u64::from(cfg.seconds));
    let runs = cfg.modes.len() as u64 * u64::from(cfg.rounds);
    let backstop_s = 60 + (per_mode.as_secs() + 30) * (runs + 1);
    let kamailio = Kamailio::start(&kamailio_bin, &dir.0, proxy_port, cfg.kamailio_children)?;
    let mut responder = spawn_responder(responder_port, 1, 0, backstop_s)?;

    // Kamailio doing nothing, for as long as a mode is measured.
    let k0 = kamailio.cpu_ticks();
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(u64::from(cfg.seconds)));
    let idle_ms_per_s = ms(kamailio.cpu_ticks().saturating_sub(k0)) / t0.elapsed().as_secs_f64();

    let source = format!("127.0.0.1:{proxy_port}");
    let reply_timeout = (cfg.interval / 2).min(Duration::from_secs(1));
    let mut runs = Vec::new();
    let order = (0..cfg.rounds).flat_map(|_| cfg.modes.iter());
    for (i, mode) in order.enumerate() {
        let shm_path = dir.0.join(format!("kaping-{mode}.shm"));
        let mut run = daemon_command(&DaemonArgs {
            kaping: &kaping,
            contacts: &contacts_path,
            shm: &shm_path,
            bind_port,
            workers: cfg.workers,
            backend: &cfg.backend,
            interval: cfg.interval,
            reply_timeout,
            instance: &format!("proxybench{i}"),
            max_contacts: cfg.contacts as u32,
            run_for: per_mode + Duration::from_secs(10),
            events: None,
        });
        if mode != "bind" {
            run.args(["--source", &source, "--replies", mode]);
        }
        eprintln!(
            "proxy-bench: {mode}: {} contacts every {:.3} s ...",
            cfg.contacts,
            cfg.interval.as_secs_f64()
        );
        let mut daemon = Guarded::spawn("daemon", run)?;
        let started = wait_loaded(&mut daemon, Duration::from_secs(120), cfg.contacts)?;
        let replies = if mode == "bind" {
            "kaping's own socket".to_string()
        } else {
            started
                .messages
                .iter()
                .find_map(|m| m.split_once("replies: ").map(|(_, r)| r.to_string()))
                .unwrap_or_else(|| "?".into())
        };
        let shm = ShmReader::open(&shm_path)
            .map_err(|e| format!("cannot open {}: {e}", shm_path.display()))?;
        thread::sleep(cfg.warmup);
        daemon.check_alive()?;
        responder.check_alive()?;
        let (c0, k0, s0) = (
            cpu_ticks(daemon.pid()).ok_or("cannot read the daemon's CPU time")?,
            kamailio.cpu_ticks(),
            Sample::read(&shm),
        );
        thread::sleep(Duration::from_secs(u64::from(cfg.seconds)));
        let (c1, k1, s1) = (
            cpu_ticks(daemon.pid()).ok_or("cannot read the daemon's CPU time")?,
            kamailio.cpu_ticks(),
            Sample::read(&shm),
        );
        daemon.stop(true);
        let secs = s1.at.duration_since(s0.at).as_secs_f64();
        let sent = s1.since(&s0, Counter::Sent) as f64;
        let matched = s1.since(&s0, Counter::Matched).max(1) as f64;
        let k_ms = ms(k1.saturating_sub(k0));
        runs.push(ModeReport {
            mode: mode.clone(),
            replies,
            pings_per_s: sent / secs,
            answered_per_s: matched / secs,
            kaping_cpu_us_per_ping: ms(c1.saturating_sub(c0)) * 1000.0 / matched,
            kamailio_cpu_us_per_ping: k_ms * 1000.0 / matched,
            kamailio_cpu_ms_per_s: k_ms / secs,
            kamailio_cpu_ms_per_s_over_idle: k_ms / secs - idle_ms_per_s,
            kaping_over_bind: None,
            timeouts: s1.since(&s0, Counter::TimedOut),
            kaping_cpu_us_per_ping_rounds: Vec::new(),
        });
    }
    // Medians per mode over the rounds.
    let mut modes: Vec<ModeReport> = Vec::new();
    for mode in &cfg.modes {
        let of: Vec<&ModeReport> = runs.iter().filter(|r| &r.mode == mode).collect();
        let med = |f: fn(&ModeReport) -> f64| median(of.iter().map(|r| f(r)).collect());
        modes.push(ModeReport {
            mode: mode.clone(),
            replies: of[0].replies.clone(),
            pings_per_s: med(|r| r.pings_per_s),
            answered_per_s: med(|r| r.answered_per_s),
            kaping_cpu_us_per_ping: med(|r| r.kaping_cpu_us_per_ping),
            kamailio_cpu_us_per_ping: med(|r| r.kamailio_cpu_us_per_ping),
            kamailio_cpu_ms_per_s: med(|r| r.kamailio_cpu_ms_per_s),
            kamailio_cpu_ms_per_s_over_idle: med(|r| r.kamailio_cpu_ms_per_s_over_idle),
            kaping_over_bind: None,
            timeouts: of.iter().map(|r| r.timeouts).sum(),
            kaping_cpu_us_per_ping_rounds: of.iter().map(|r| r.kaping_cpu_us_per_ping).collect(),
        });
    }
    let bind = modes
        .iter()
        .find(|m| m.mode == "bind")
        .map(|m| m.kaping_cpu_us_per_ping);
    if let Some(bind) = bind {
        for m in modes.iter_mut().filter(|m| m.mode != "bind") {
            m.kaping_over_bind = Some(m.kaping_cpu_us_per_ping / bind);
        }
    }
    responder.stop(false);
    drop(kamailio);
    Ok(ProxyBenchReport {
        rounds: cfg.rounds,
        contacts: cfg.contacts,
        interval_s: cfg.interval.as_secs_f64(),
        offered_per_s: cfg.contacts as f64 / cfg.interval.as_secs_f64(),
        workers: cfg.workers,
        backend: cfg.backend.clone(),
        kamailio_children: cfg.kamailio_children,
        kamailio_idle_cpu_ms_per_s: idle_ms_per_s,
        modes,
    })
}

pub fn print_text(r: &ProxyBenchReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "{} contacts every {:.3} s ({:.0} pings/s offered), {} workers, backend {}, Kamailio children {}; medians of {} rounds",
        r.contacts, r.interval_s, r.offered_per_s, r.workers, r.backend, r.kamailio_children, r.rounds
    )?;
    writeln!(
        out,
        "Kamailio idle: {:.2} ms CPU per second",
        r.kamailio_idle_cpu_ms_per_s
    )?;
    writeln!(
        out,
        "{:<7} {:>10} {:>10} {:>14} {:>11} {:>16} {:>16} {:>9}  replies",
        "mode",
        "pings/s",
        "answered/s",
        "kaping us/ping",
        "x bind",
        "Kamailio us/ping",
        "Kamailio ms/s",
        "timeouts"
    )?;
    for m in &r.modes {
        writeln!(
            out,
            "{:<7} {:>10.0} {:>10.0} {:>14.2} {:>11} {:>16.2} {:>16.1} {:>9}  {}",
            m.mode,
            m.pings_per_s,
            m.answered_per_s,
            m.kaping_cpu_us_per_ping,
            m.kaping_over_bind
                .map_or("-".to_string(), |x| format!("{x:.3}")),
            m.kamailio_cpu_us_per_ping,
            m.kamailio_cpu_ms_per_s,
            m.timeouts,
            m.replies
        )?;
    }
    for m in &r.modes {
        let rounds: Vec<String> = m
            .kaping_cpu_us_per_ping_rounds
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect();
        writeln!(
            out,
            "kaping us/ping by round, {}: {}",
            m.mode,
            rounds.join(" ")
        )?;
    }
    Ok(())
}
