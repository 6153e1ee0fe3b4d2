//! The flood bench (`flood`): kaping pinging N contacts on loopback while
//! datagrams it never asked for arrive at its ports as fast as this machine
//! can send them, one kind at a time; what each costs kaping, where each
//! datagram went, and that none of them changed any contact.
//!
//! What it runs, in order:
//! 1. a SIP responder in this process (`kaping::sim::Responder`, all
//!    contacts answer after `latency`) for the N contacts, and a capturing
//!    responder (`kaping::sim::capture`) for `captured` more, which keeps a
//!    copy of the first replies it sends each of them; a kaping daemon
//!    child pinging all N + `captured` every `interval`, its events to a
//!    file;
//! 2. settling: once every captured contact has answered, the first `down`
//!    of them fall silent, and the run waits until they are Down and every
//!    other contact is Up;
//! 3. for each kind, a quiet window of `seconds` (kaping's CPU with no
//!    flood), then `seconds` of flood: one thread here sends the kind's
//!    datagrams with `sendmmsg` batches flat out at kaping's ports, then
//!    waits until kaping's socket queues are empty. Kinds:
//!    * `random`: random bytes of random length;
//!    * `truncated`: every prefix of genuine replies (as captured);
//!    * `forged`: genuine replies whose token (Via branch, From tag,
//!      Call-ID) is replaced by one of the right shape and instance prefix
//!      but another key's MAC, naming random slots;
//!    * `replay`: the captured genuine replies sent again, from the
//!      contact's address, long after their pings were answered, the Down
//!      contacts' among them;
//!    * `icmp`: ICMP port unreachables (a raw socket: root or CAP_NET_RAW;
//!      skipped with the reason otherwise) quoting UDP datagrams from
//!      kaping's port to contact addresses that kaping never sent: random
//!      payloads, and requests shaped like kaping's with another key's
//!      token.
//!
//! What it reports per kind, and where each figure comes from:
//! * datagrams sent (the sender's `sendmmsg` counts) and what became of
//!   them: kaping's shm counters by cause (`received` is the sum of
//!   `matched`, `late`, `stray`, `forged`, `parse_errors` and `handoff`,
//!   with the reject causes; the `icmp_*` and `unreachable` counters), the
//!   kernel's drops
//!   for kaping's sockets (`/proc/net/udp` drops column: receive buffer
//!   full), its backlog drops (`/proc/net/softnet_stat`), and for ICMP the
//!   errors it received (`/proc/net/snmp` Icmp InDestUnreachs); the
//!   closure: flood datagrams + genuine replies sent − received − dropped,
//!   0 but for datagrams in flight at the window's edges (ICMP errors the
//!   kernel could not queue because kaping's error queue was full are
//!   counted by no kernel counter: the ICMP closure names them);
//! * kaping's CPU per flood datagram: its threads' CPU time
//!   (`/proc/PID/task/*/schedstat`) over the flood minus that of the quiet
//!   window before it (scaled to the same length), ÷ the flood datagrams
//!   it counted;
//! * state changes: the daemon's events with a time inside the flood
//!   window, and the contacts by state before and after (must be 0 and
//!   equal); per captured contact, replies kaping counted as answers
//!   (its slot's `answered`) against the genuine replies the capture sent
//!   it (never more), and the Down ones still Down with no new answer;
//!   kaping's `matched` against every genuine reply sent (never more);
//! * resident memory before and after (`VmRSS`, within 1 %), and the pings
//!   kaping sent each second of the flood against the offered rate
//!   (contacts ÷ interval, within ±5 %).
//!
//! Ownership: the daemon child is stopped and reaped by its guard, the
//! temporary directory (contacts, shm and events files, under
//! /dev/shm/kaping-bench-*) removed by its guard, the responders and the
//! sender thread stopped and joined, on success, on every error path and
//! on SIGINT/SIGTERM (checked between steps and every second). Every phase
//! is bounded in time and the daemon has its own backstop (`--run-for`).
//! Loopback only: every address is in 127.0.0.0/8. Setup and
//! once-a-second sampling allocate freely; the sender's loop allocates
//! nothing. Caller: `main` (`flood` subcommand).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kaping::io::signal;
use kaping::io::udp::{bind_udp, SendBatch, SocketOptions};
use kaping::shm::layout::{percentile, Counter, SlotRecord, SLOT_DOWN};
use kaping::shm::reader::ShmReader;
use kaping::sim::capture::{reply_token, with_token, Capture, CaptureConfig, Captured};
use kaping::sim::contacts::{contact_addr, contact_uri, V4_ADDRS};
use kaping::sim::fate::Rng;
use kaping::sim::{
    icmp, FatePlan, LatencyDist, Layout, ListenSpec, Noise, Responder, ServeConfig, BATCH,
    DATAGRAM_MAX,
};
use kaping::wire::reply::Reject;
use kaping::wire::template::{patch, ContactText, Template, TemplateConfig};
use kaping::wire::token::{self, TokenFields, TokenKey, TOKEN_LEN};
use serde::Serialize;

use crate::bench::{
    cpu_ns, daemon_command, free_ports, kaping_binary, loadavg, memory, wait_loaded, write_footer,
    DaemonArgs, Guarded, Sample, Started, TempDir, LOAD_TIMEOUT_BASE_S, LOAD_TIMEOUT_PER_MILLION_S,
    RESPONDER_BUFFER_BYTES,
};

/// Replies the capture keeps per contact (its first ones).
const KEEP_PER_CONTACT: usize = 2;
/// Distinct datagrams prepared per kind (cycled through while flooding).
const POOL_MAX: usize = 8192;
/// Genuine replies whose prefixes make the truncated flood.
const TRUNCATED_SOURCES: usize = 64;
/// Longest random datagram (below loopback's MTU and kaping's buffers).
const RANDOM_LEN_MAX: usize = 1400;
/// Linux quotes at most 576 bytes of IPv4 in an ICMP error: 548 of payload
/// after the IP and UDP headers (RFC 1812 §4.3.2.3).
const ICMP_QUOTE_MAX: usize = 576 - 20 - 8;
/// kaping's `--down-after` in the benches (`daemon_command`).
const DOWN_AFTER: u32 = 3;
/// Longest wait for kaping's socket queues to empty after a flood.
const DRAIN_MAX: Duration = Duration::from_secs(15);
/// How often the settling and draining loops look again.
const POLL: Duration = Duration::from_millis(100);
/// Allowed spread of the per-second ping rate around the offered rate,
/// and of resident memory (the targets).
const RATE_TOLERANCE: f64 = 0.05;
const RSS_TOLERANCE: f64 = 0.01;
/// The daemon's backstop beyond the planned run.
const RUN_FOR_MARGIN_S: u64 = 120;

/// A flood kind; see the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Random,
    Truncated,
    Forged,
    Replay,
    Icmp,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Random,
        Kind::Truncated,
        Kind::Forged,
        Kind::Replay,
        Kind::Icmp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Random => "random",
            Kind::Truncated => "truncated",
            Kind::Forged => "forged",
            Kind::Replay => "replay",
            Kind::Icmp => "icmp",
        }
    }

    pub fn parse(s: &str) -> Result<Kind, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s.trim())
            .ok_or_else(|| {
                format!("unknown flood kind '{s}' (random, truncated, forged, replay, icmp)")
            })
    }
}

#[derive(Clone, Debug)]
pub struct FloodConfig {
    pub contacts: u64,
    pub interval: Duration,
    /// Seconds of each flood, and of the quiet window before it.
    pub seconds: u32,
    pub kinds: Vec<Kind>,
    /// Contacts answered by the capture (whose replies are replayed).
    pub captured: u64,
    /// Of those, how many fall silent and go Down before the floods.
    pub down: u64,
    pub workers: u32,
    pub backend: String,
    pub latency_ns: u64,
    pub kaping: Option<PathBuf>,
    pub dir: Option<PathBuf>,
    pub seed: u64,
}

/// What one flood kind did. Field names are a stable contract for
/// scripts (`--json`); new fields are appended, none renamed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KindReport {
    pub kind: String,
    /// Why the kind did not run (no raw socket), else null.
    pub skipped: Option<String>,
    pub window_s: f64,
    /// Flood datagrams the kernel took from the sender, and refused.
    pub sent: u64,
    pub send_failed: u64,
    pub sent_per_s: f64,
    /// The window: from the flood's start to kaping's queues drained
    /// after it (Unix ms).
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    /// Distinct datagrams cycled through.
    pub pool: usize,
    /// Genuine replies sent to kaping in the window (both responders).
    pub genuine_replies: u64,
    /// kaping's `received` (UDP kinds) or ICMP errors read (icmp).
    pub received: u64,
    /// Datagrams kaping counted that were not genuine answers: its
    /// received − matched (UDP kinds), its ICMP counters (icmp).
    pub absorbed: u64,
    pub absorbed_per_s: f64,
    /// Growth of every shm event counter over the window, by name.
    pub counters: BTreeMap<String, u64>,
    /// Growth of the reply reject counters (`parse_errors` and `forged`
    /// by cause), by name.
    pub rejects: BTreeMap<String, u64>,
    /// Datagrams the kernel dropped at kaping's sockets (receive buffer
    /// full) and in its backlog queue; UDP RcvbufErrors machine-wide.
    pub kernel_socket_drops: u64,
    pub kernel_backlog_drops: u64,
    pub kernel_udp_rcvbuf_errors: u64,
    /// ICMP destination unreachables the kernel received (icmp).
    pub kernel_icmp_in_dest_unreachs: u64,
    /// UDP: flood + genuine − received − dropped (datagrams in flight at
    /// the edges). ICMP: errors the kernel received − errors kaping read
    /// (not queued: kaping's error queue was full; no kernel counter).
    pub unaccounted: i64,
    /// kaping's CPU over the flood and over the quiet window before it.
    pub cpu_s_flood: f64,
    pub cpu_s_quiet: f64,
    pub cpu_cores_flood: f64,
    pub cpu_us_per_datagram: Option<f64>,
    /// State-change events with a time inside the flood window.
    pub state_changes: u64,
    /// Contacts (up, down, unknown) before and after.
    pub contacts_before: [u64; 3],
    pub contacts_after: [u64; 3],
    /// Captured contacts whose answered count exceeds the genuine replies
    /// they gave (must be 0), and the Down ones still Down and unanswered.
    pub captured_over_genuine: u64,
    pub down_still_down: u64,
    /// RTT percentiles of the replies matched in the window (kernel
    /// receive stamps), and of the quiet window before it.
    pub rtt_p50_us: Option<u64>,
    pub rtt_p99_us: Option<u64>,
    pub quiet_rtt_p50_us: Option<u64>,
    pub quiet_rtt_p99_us: Option<u64>,
    /// kaping's matched over the window, and its total against every
    /// genuine reply ever sent (matched ≤ genuine).
    pub matched: u64,
    pub matched_total: u64,
    pub genuine_total: u64,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub rss_change: f64,
    /// Pings kaping sent each second of the flood, and the extremes over
    /// the offered rate; the same for the quiet window.
    pub pings_per_second: Vec<u64>,
    pub rate_min_over_offered: f64,
    pub rate_max_over_offered: f64,
    pub quiet_pings_per_second: Vec<u64>,
    /// The checks this kind failed (empty: all held).
    pub failures: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FloodReport {
    pub contacts: u64,
    pub captured: u64,
    pub down: u64,
    pub workers: u32,
    pub backend: String,
    pub interval_s: f64,
    pub reply_timeout_s: f64,
    pub offered_per_s: f64,
    pub seconds: u32,
    pub latency_us: f64,
    pub load_seconds: f64,
    pub settle_seconds: f64,
    pub kinds: Vec<KindReport>,
    /// The main responder's counters at the end.
    pub responder: serde_json::Value,
    pub daemon_messages: Vec<String>,
    pub loadavg_before: String,
    pub loadavg_after: String,
    /// Every kind's failed checks, prefixed by its name.
    pub failures: Vec<String>,
}

/// One datagram of a flood: bytes, where to, and from which local
/// address (`IP_PKTINFO`), if a particular one.
struct Item {
    bytes: Vec<u8>,
    dest: SocketAddr,
    src: Option<IpAddr>,
}

/// What the run holds while the floods go on.
struct Lab<'a> {
    shm: &'a ShmReader,
    daemon_pid: u32,
    /// kaping's ports (worker i's is the i-th) and the main contacts'.
    ports: Vec<u16>,
    responder_port: u16,
    responder: &'a Responder,
    capture: &'a Capture,
    /// Each captured contact's shm slot (worker, slot), by index.
    slots: Vec<(u32, u32)>,
}

/// Everything read at one edge of a window.
struct Edge {
    sample: Sample,
    rejects: [u64; Reject::COUNT],
    cpu_ns: u64,
    rss: u64,
    kernel: Kernel,
    /// Genuine replies sent so far by both responders.
    genuine: u64,
    unix_ms: u64,
    captured: Vec<Captured>,
    slots: Vec<SlotRecord>,
}

impl Lab<'_> {
    fn edge(&self) -> Edge {
        // kaping's counters first, the replies sent after: whatever kaping
        // matched had been sent by then, so matched ≤ genuine holds exactly.
        let sample = Sample::read(self.shm);
        let slots = self
            .slots
            .iter()
            .map(|&(w, s)| self.shm.read_slot(w, s).unwrap_or_default())
            .collect();
        let mut rejects = [0u64; Reject::COUNT];
        for w in 0..self.shm.header().workers {
            for (t, r) in rejects.iter_mut().zip(self.shm.rejects(w)) {
                *t += r;
            }
        }
        let captured = self.capture.snapshot();
        let r = self.responder.counters();
        let genuine = r.answered + r.duplicates - r.send_dropped
            + captured.iter().map(|c| c.replies).sum::<u64>();
        Edge {
            sample,
            rejects,
            cpu_ns: cpu_ns(self.daemon_pid).unwrap_or(0),
            rss: memory(self.daemon_pid).rss,
            kernel: Kernel::read(&self.ports),
            genuine,
            unix_ms: unix_ms(),
            captured,
            slots,
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The kernel's figures for kaping's sockets and the machine.
#[derive(Clone, Copy, Debug, Default)]
struct Kernel {
    /// `/proc/net/udp`: kaping's sockets' drops and queued bytes (the
    /// receive queue and the error queue: `sk_rmem_alloc`).
    socket_drops: u64,
    queued_bytes: u64,
    /// `/proc/net/softnet_stat`, second column, summed over CPUs.
    backlog_drops: u64,
    /// `/proc/net/snmp`: Udp RcvbufErrors, Icmp InDestUnreachs.
    udp_rcvbuf_errors: u64,
    icmp_in_dest_unreachs: u64,
}

impl Kernel {
    fn read(ports: &[u16]) -> Kernel {
        let mut k = Kernel::default();
        for file in ["/proc/net/udp", "/proc/net/udp6"] {
            let text = fs::read_to_string(file).unwrap_or_default();
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref ptr drops
                let (Some(local), Some(queues), Some(drops)) = (f.get(1), f.get(4), f.last())
                else {
                    continue;
                };
                let port = local
                    .rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
                if !port.is_some_and(|p| ports.contains(&p)) {
                    continue;
                }
                k.socket_drops += drops.parse::<u64>().unwrap_or(0);
                k.queued_bytes += queues
                    .split_once(':')
                    .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
                    .unwrap_or(0);
            }
        }
        let softnet = fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default();
        k.backlog_drops = softnet
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter_map(|d| u64::from_str_radix(d, 16).ok())
            .sum();
        let snmp = fs::read_to_string("/proc/net/snmp").unwrap_or_default();
        k.udp_rcvbuf_errors = snmp_field(&snmp, "Udp:", "RcvbufErrors");
        k.icmp_in_dest_unreachs = snmp_field(&snmp, "Icmp:", "InDestUnreachs");
        k
    }
}

/// A field of `/proc/net/snmp`: a header line and a value line per
/// protocol, both starting with `proto`.
fn snmp_field(text: &str, proto: &str, name: &str) -> u64 {
    let mut lines = text.lines().filter(|l| l.starts_with(proto));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Sleeps `d` in steps, failing when SIGINT or SIGTERM arrived.
fn nap(d: Duration) -> Result<(), String> {
    let until = Instant::now() + d;
    loop {
        if signal::stop_requested() {
            return Err("interrupted".to_string());
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        thread::sleep(left.min(POLL));
    }
}

/// Waits until `done` holds, looking every `POLL`; fails with `what` after
/// `limit`, or when the daemon exited.
fn wait_until(
    daemon: &mut Guarded,
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Result<(), String> {
    let until = Instant::now() + limit;
    while !done() {
        daemon.check_alive()?;
        if Instant::now() >= until {
            return Err(format!("{what} within {} s", limit.as_secs()));
        }
        nap(POLL)?;
    }
    Ok(())
}

pub fn run(cfg: &FloodConfig) -> Result<FloodReport, String> {
    if cfg.contacts == 0 || cfg.seconds == 0 || cfg.workers == 0 || cfg.interval.is_zero() {
        return Err("--contacts, --seconds, --workers and --interval must be above 0".to_string());
    }
    if cfg.captured == 0 || cfg.down >= cfg.captured {
        return Err("--captured must be at least 1 and more than --down".to_string());
    }
    let total = cfg.contacts + cfg.captured;
    if total > V4_ADDRS || total > u64::from(u32::MAX) {
        return Err(format!(
            "--contacts + --captured is limited to {V4_ADDRS} (distinct loopback addresses)"
        ));
    }
    signal::install_handlers().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let kaping = kaping_binary(cfg.kaping.as_deref())?;
    let loadavg_before = loadavg();
    let dir = TempDir::create(cfg.dir.as_deref())?;
    let (responder_port, bind_port) = free_ports(cfg.workers as u16)?;
    let ports: Vec<u16> = (0..cfg.workers as u16).map(|w| bind_port + w).collect();

    let responder = Responder::spawn(ServeConfig {
        listen: vec![ListenSpec::parse(&format!("0.0.0.0:{responder_port}"))?],
        threads: 1,
        raw_echo: false,
        plan: FatePlan::new(cfg.seed, 0.0, 0.0, 503, 0.0, 10_000)?,
        noise: Noise {
            latency_ns: cfg.latency_ns,
            dist: LatencyDist::None,
            ..Noise::default()
        },
        seed: cfg.seed,
        recv_buffer_bytes: RESPONDER_BUFFER_BYTES,
        send_buffer_bytes: RESPONDER_BUFFER_BYTES,
        delay_slots: 16384,
    })?;
    // Captured contacts take the addresses after the responder's.
    let capture = Capture::spawn(CaptureConfig {
        first: cfg.contacts,
        count: cfg.captured,
        keep: KEEP_PER_CONTACT,
    })?;

    let contacts_path = dir.0.join("contacts.txt");
    write_contacts(&contacts_path, cfg.contacts, responder_port, &capture)?;

    let reply_timeout = (cfg.interval / 2).min(Duration::from_secs(1));
    let load_timeout = Duration::from_secs(
        LOAD_TIMEOUT_BASE_S + LOAD_TIMEOUT_PER_MILLION_S * total.div_ceil(1_000_000),
    );
    let settle_limit = cfg.interval * (DOWN_AFTER + 3) + Duration::from_secs(30);
    let plan_s = load_timeout
        + settle_limit
        + Duration::from_secs(u64::from(cfg.seconds) * 2 * cfg.kinds.len() as u64)
        + DRAIN_MAX * cfg.kinds.len() as u32;
    let shm_path = dir.0.join("kaping.shm");
    let events_path = dir.0.join("events.jsonl");
    let run = daemon_command(&DaemonArgs {
        kaping: &kaping,
        contacts: &contacts_path,
        shm: &shm_path,
        bind_port,
        workers: cfg.workers,
        backend: &cfg.backend,
        interval: cfg.interval,
        reply_timeout,
        instance: "flood",
        max_contacts: if cfg.workers == 1 {
            total as u32
        } else {
            // Contacts go to workers by address hash: not exactly even.
            (total as f64 * 1.25) as u32
        },
        run_for: plan_s + Duration::from_secs(RUN_FOR_MARGIN_S),
        events: Some(&events_path),
    });
    let offered = total as f64 / cfg.interval.as_secs_f64();
    eprintln!(
        "flood: {} + {} captured contacts, interval {:.3} s (offered {offered:.0}/s), {} workers, backend {} ...",
        cfg.contacts,
        cfg.captured,
        cfg.interval.as_secs_f64(),
        cfg.workers,
        cfg.backend
    );
    let mut daemon = Guarded::spawn("daemon", run)?;
    let daemon_pid = daemon.pid();
    let Started {
        load_seconds,
        backend,
        mut messages,
        ..
    } = wait_loaded(&mut daemon, load_timeout, total)?;
    let shm = ShmReader::open(&shm_path)
        .map_err(|e| format!("cannot open {}: {e}", shm_path.display()))?;
    let backend = backend.unwrap_or_else(|| shm.header().backend);

    // Settling: every captured contact answers once; the first `down` then
    // fall silent and go Down; everyone else is Up.
    let settle_start = Instant::now();
    eprintln!(
        "flood: settling (every contact pinged and answered, {} Down) ...",
        cfg.down
    );
    wait_until(
        &mut daemon,
        settle_limit,
        "not every captured contact answered",
        || capture.snapshot().iter().all(|c| c.replies > 0),
    )?;
    for i in 0..cfg.down {
        capture.silence(i);
    }
    wait_until(
        &mut daemon,
        settle_limit,
        "the contacts did not settle (all Up but the silenced, which are Down)",
        || {
            let s = Sample::read(&shm);
            s.get(Counter::ContactsDown) == cfg.down
                && s.get(Counter::ContactsUp) == total - cfg.down
        },
    )?;
    let settle_seconds = settle_start.elapsed().as_secs_f64();
    let lab = Lab {
        slots: find_slots(&shm, &capture)?,
        shm: &shm,
        daemon_pid,
        ports,
        responder_port,
        responder: &responder,
        capture: &capture,
    };
    // The events of settling (every first Up) are not the floods'.
    let events_from = fs::metadata(&events_path).map_or(0, |m| m.len());

    let mut kinds = Vec::new();
    for &kind in &cfg.kinds {
        daemon.check_alive()?;
        kinds.push(run_kind(cfg, &lab, kind, offered)?);
    }
    daemon.check_alive()?;
    // Events are written by the daemon's main thread a moment after they
    // happen: give it that moment before counting them.
    nap(Duration::from_secs(1))?;
    count_events(&events_path, events_from, &mut kinds)?;

    daemon.stop(true);
    let responder_counters = responder.stop();
    drop(capture);
    messages.extend(daemon.lines.try_iter().take(20));
    drop(shm);

    let mut failures = Vec::new();
    for k in &mut kinds {
        if k.skipped.is_none() {
            check_kind(k);
        }
        failures.extend(k.failures.iter().map(|f| format!("{}: {f}", k.kind)));
    }
    Ok(FloodReport {
        contacts: cfg.contacts,
        captured: cfg.captured,
        down: cfg.down,
        workers: cfg.workers,
        backend,
        interval_s: cfg.interval.as_secs_f64(),
        reply_timeout_s: reply_timeout.as_secs_f64(),
        offered_per_s: offered,
        seconds: cfg.seconds,
        latency_us: cfg.latency_ns as f64 / 1e3,
        load_seconds,
        settle_seconds,
        kinds,
        responder: serde_json::to_value(responder_counters).unwrap_or_default(),
        daemon_messages: messages,
        loadavg_before,
        loadavg_after: loadavg(),
        failures,
    })
}

/// The contacts file: the responder's `contacts` (`kaping-loadgen
/// contacts`), then the captured ones.
fn write_contacts(
    path: &Path,
    contacts: u64,
    responder_port: u16,
    capture: &Capture,
) -> Result<(), String> {
    let failed = |e: io::Error| format!("cannot write {}: {e}", path.display());
    let mut out = BufWriter::new(File::create(path).map_err(failed)?);
    kaping::sim::write_contacts(
        &Layout::new(responder_port, 1, false)?,
        contacts,
        &mut out,
        None,
    )
    .map_err(failed)?;
    for i in 0..capture.count() {
        writeln!(out, "{}", capture.uri(i)).map_err(failed)?;
    }
    out.flush().map_err(failed)
}

/// Each captured contact's (worker, slot).
fn find_slots(shm: &ShmReader, capture: &Capture) -> Result<Vec<(u32, u32)>, String> {
    capture
        .slots_in(shm)
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            s.ok_or_else(|| {
                format!(
                    "captured contact {} is not in the shm file",
                    capture.uri(i as u64)
                )
            })
        })
        .collect()
}

/// The per-second ping counts of a window of `seconds` from now.
fn pings_each_second(lab: &Lab, seconds: u32) -> Result<Vec<u64>, String> {
    let start = Sample::read(lab.shm);
    let mut last = start.clone();
    let mut out = Vec::with_capacity(seconds as usize);
    for k in 1..=seconds {
        let due = start.at + Duration::from_secs(u64::from(k));
        nap(due.saturating_duration_since(Instant::now()))?;
        let now = Sample::read(lab.shm);
        out.push(now.since(&last, Counter::Sent));
        last = now;
    }
    Ok(out)
}

fn run_kind(cfg: &FloodConfig, lab: &Lab, kind: Kind, offered: f64) -> Result<KindReport, String> {
    let mut report = KindReport {
        kind: kind.name().to_string(),
        ..KindReport::default()
    };
    let pool = match build_pool(kind, cfg, lab) {
        Ok(pool) => pool,
        Err(Skip(why)) => {
            eprintln!("flood: {}: SKIP: {why}", kind.name());
            report.skipped = Some(why);
            return Ok(report);
        }
    };
    report.pool = pool.items.len();
    eprintln!(
        "flood: {}: quiet {} s, then flood {} s ({} distinct datagrams) ...",
        kind.name(),
        cfg.seconds,
        cfg.seconds,
        pool.items.len()
    );
    // The quiet window: kaping's CPU without the flood.
    let quiet_start = Instant::now();
    let quiet_cpu0 = cpu_ns(lab.daemon_pid).unwrap_or(0);
    let quiet_first = Sample::read(lab.shm);
    report.quiet_pings_per_second = pings_each_second(lab, cfg.seconds)?;
    let quiet_hist = Sample::read(lab.shm).hist_since(&quiet_first);
    report.quiet_rtt_p50_us = percentile(&quiet_hist, 0.5);
    report.quiet_rtt_p99_us = percentile(&quiet_hist, 0.99);
    let quiet_s = quiet_start.elapsed().as_secs_f64();
    let quiet_cpu_s = cpu_ns(lab.daemon_pid)
        .unwrap_or(0)
        .saturating_sub(quiet_cpu0) as f64
        / 1e9;

    let before = lab.edge();
    let start = Instant::now();
    let until = start + Duration::from_secs(u64::from(cfg.seconds));
    let stop = AtomicBool::new(false);
    let (blasted, pings) = thread::scope(|scope| {
        let sender = scope.spawn(|| blast(pool.fd(), &pool.items, until, &stop));
        let pings = pings_each_second(lab, cfg.seconds);
        // Interrupted: the sender stops at once.
        stop.store(true, Ordering::Relaxed);
        (sender.join(), pings)
    });
    let blasted = blasted.map_err(|_| "the sender thread panicked".to_string())?;
    report.pings_per_second = pings?;
    let flood_s = start.elapsed().as_secs_f64();
    // What the flood left in kaping's queues is part of it.
    let drain_until = Instant::now() + DRAIN_MAX;
    while Kernel::read(&lab.ports).queued_bytes > 0 && Instant::now() < drain_until {
        nap(Duration::from_millis(10))?;
    }
    let after = lab.edge();
    let window_s = start.elapsed().as_secs_f64();

    report.window_s = window_s;
    report.sent = blasted.sent;
    report.send_failed = blasted.failed;
    report.sent_per_s = blasted.sent as f64 / flood_s;
    fill_counts(&mut report, kind, &before, &after);
    report.absorbed_per_s = report.absorbed as f64 / window_s;
    report.cpu_s_flood = after.cpu_ns.saturating_sub(before.cpu_ns) as f64 / 1e9;
    report.cpu_s_quiet = quiet_cpu_s;
    report.cpu_cores_flood = report.cpu_s_flood / window_s;
    let extra_s = report.cpu_s_flood - quiet_cpu_s * window_s / quiet_s;
    report.cpu_us_per_datagram =
        (report.absorbed > 0).then(|| extra_s.max(0.0) * 1e6 / report.absorbed as f64);
    // State-change events are counted once the run is over (`count_events`).
    report.window_start_ms = before.unix_ms;
    report.window_end_ms = after.unix_ms;
    let gauges = |e: &Edge| {
        [
            e.sample.get(Counter::ContactsUp),
            e.sample.get(Counter::ContactsDown),
            e.sample.get(Counter::ContactsUnknown),
        ]
    };
    report.contacts_before = gauges(&before);
    report.contacts_after = gauges(&after);
    report.captured_over_genuine = after
        .slots
        .iter()
        .zip(&after.captured)
        .filter(|(rec, c)| u64::from(rec.answered) > c.replies)
        .count() as u64;
    report.down_still_down = (0..cfg.down as usize)
        .filter(|&i| {
            after.slots[i].state == SLOT_DOWN && after.slots[i].answered == before.slots[i].answered
        })
        .count() as u64;
    let hist = after.sample.hist_since(&before.sample);
    report.rtt_p50_us = percentile(&hist, 0.5);
    report.rtt_p99_us = percentile(&hist, 0.99);
    report.matched = after.sample.since(&before.sample, Counter::Matched);
    report.matched_total = after.sample.get(Counter::Matched);
    report.genuine_total = after.genuine;
    report.rss_before_bytes = before.rss;
    report.rss_after_bytes = after.rss;
    report.rss_change = if before.rss > 0 {
        after.rss as f64 / before.rss as f64 - 1.0
    } else {
        0.0
    };
    let (min, max) = report
        .pings_per_second
        .iter()
        .fold((u64::MAX, 0), |(lo, hi), &n| (lo.min(n), hi.max(n)));
    report.rate_min_over_offered = min as f64 / offered;
    report.rate_max_over_offered = max as f64 / offered;
    Ok(report)
}

/// The counters, the kernel's figures and the closure of one window.
fn fill_counts(r: &mut KindReport, kind: Kind, before: &Edge, after: &Edge) {
    for c in Counter::ALL {
        if matches!(
            c,
            Counter::ContactsUnknown
                | Counter::ContactsUp
                | Counter::ContactsDown
                | Counter::ContactsRemoved
                | Counter::ContactsUnmonitored
        ) {
            continue;
        }
        r.counters
            .insert(c.name().to_string(), after.sample.since(&before.sample, c));
    }
    for reject in Reject::ALL {
        let n = after.rejects[reject.index()].saturating_sub(before.rejects[reject.index()]);
        if n > 0 {
            r.rejects.insert(reject.name().to_string(), n);
        }
    }
    let grew = |c: Counter| after.sample.since(&before.sample, c);
    let (kb, ka) = (before.kernel, after.kernel);
    r.kernel_socket_drops = ka.socket_drops.saturating_sub(kb.socket_drops);
    r.kernel_backlog_drops = ka.backlog_drops.saturating_sub(kb.backlog_drops);
    r.kernel_udp_rcvbuf_errors = ka.udp_rcvbuf_errors.saturating_sub(kb.udp_rcvbuf_errors);
    r.kernel_icmp_in_dest_unreachs = ka
        .icmp_in_dest_unreachs
        .saturating_sub(kb.icmp_in_dest_unreachs);
    r.genuine_replies = after.genuine.saturating_sub(before.genuine);
    if kind == Kind::Icmp {
        r.received = grew(Counter::Unreachable)
            + grew(Counter::IcmpForged)
            + grew(Counter::IcmpUnmatched)
            + grew(Counter::IcmpOther);
        r.absorbed = r.received;
        r.unaccounted = r.kernel_icmp_in_dest_unreachs as i64 - r.received as i64;
    } else {
        r.received = grew(Counter::Received);
        r.absorbed = r.received.saturating_sub(grew(Counter::Matched));
        r.unaccounted = (r.sent + r.genuine_replies) as i64
            - r.received as i64
            - (r.kernel_socket_drops + r.kernel_backlog_drops) as i64;
    }
}

/// The checks of one kind (the conditions), into `failures`.
fn check_kind(r: &mut KindReport) {
    let mut f = Vec::new();
    if r.state_changes > 0 {
        f.push(format!("{} contacts changed state", r.state_changes));
    }
    if r.contacts_before != r.contacts_after {
        f.push(format!(
            "contacts (up, down, unknown) {:?} -> {:?}",
            r.contacts_before, r.contacts_after
        ));
    }
    if r.captured_over_genuine > 0 {
        f.push(format!(
            "{} captured contacts counted more answers than they gave",
            r.captured_over_genuine
        ));
    }
    if r.matched_total > r.genuine_total {
        f.push(format!(
            "{} answers counted, {} genuine replies sent",
            r.matched_total, r.genuine_total
        ));
    }
    if r.rss_change.abs() > RSS_TOLERANCE {
        f.push(format!(
            "resident memory changed {:+.2} % (allowed ±{} %)",
            r.rss_change * 100.0,
            RSS_TOLERANCE * 100.0
        ));
    }
    if (r.rate_min_over_offered - 1.0).abs() > RATE_TOLERANCE
        || (r.rate_max_over_offered - 1.0).abs() > RATE_TOLERANCE
    {
        f.push(format!(
            "pings per second {:.3}..{:.3} of the offered rate (allowed ±{} %)",
            r.rate_min_over_offered,
            r.rate_max_over_offered,
            RATE_TOLERANCE * 100.0
        ));
    }
    r.failures = f;
}

/// Counts the state-change events of each flood window, from `from` bytes
/// into the events file on.
fn count_events(path: &Path, from: u64, kinds: &mut [KindReport]) -> Result<(), String> {
    let failed = |e: io::Error| format!("cannot read {}: {e}", path.display());
    let mut file = File::open(path).map_err(failed)?;
    file.seek(SeekFrom::Start(from)).map_err(failed)?;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(failed)?;
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let Some(at) = event["time_ms"].as_u64() else {
            continue;
        };
        for k in kinds.iter_mut() {
            if k.skipped.is_none() && (k.window_start_ms..=k.window_end_ms).contains(&at) {
                k.state_changes += 1;
            }
        }
    }
    Ok(())
}

/// Why a kind cannot run here.
struct Skip(String);

/// A kind's datagrams and the socket they leave from.
struct Pool {
    items: Vec<Item>,
    sock: socket2::Socket,
}

impl Pool {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// Every kept genuine reply: (contact index, where it went, bytes).
fn kept_replies(capture: &Capture) -> Vec<(u64, SocketAddr, Vec<u8>)> {
    capture
        .snapshot()
        .into_iter()
        .enumerate()
        .flat_map(|(i, c)| c.kept.into_iter().map(move |(to, b)| (i as u64, to, b)))
        .collect()
}

/// A token of this instance's shape and prefix naming a random ping of a
/// random slot, whose MAC is another key's.
fn forged_token(key: &TokenKey, rng: &mut Rng, workers: u32, slots: u32) -> [u8; TOKEN_LEN] {
    let fields = TokenFields {
        worker: rng.below(u64::from(workers)) as u8,
        slot: rng.below(u64::from(slots.max(1))) as u32,
        generation: rng.below(4) as u16,
        seq: rng.next_u64() as u16,
        sent_us: rng.next_u64() as u32,
    };
    let mut tok = [0u8; TOKEN_LEN];
    token::encode(key, &fields, &mut tok);
    tok
}

fn udp_sender() -> Result<socket2::Socket, Skip> {
    let opts = SocketOptions {
        send_buffer_bytes: RESPONDER_BUFFER_BYTES,
        timestamps: false,
        recv_errors: false,
        ..SocketOptions::default()
    };
    bind_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), &opts)
        .map(|(s, _)| s)
        .map_err(|e| Skip(format!("cannot bind the sender's socket: {e}")))
}

fn build_pool(kind: Kind, cfg: &FloodConfig, lab: &Lab) -> Result<Pool, Skip> {
    let mut rng = Rng::new(cfg.seed ^ 0xF100D ^ kind as u64);
    let kept = kept_replies(lab.capture);
    let Some(instance) = kept
        .iter()
        .find_map(|(_, _, b)| reply_token(b).and_then(|t| token::instance_of(&t)))
    else {
        return Err(Skip("no genuine reply was captured".to_string()));
    };
    let mut secret = [0u8; 16];
    for chunk in secret.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let other_key = TokenKey::new(secret, instance);
    let h = lab.shm.header();
    let kaping_at =
        |w: usize| SocketAddr::from((Ipv4Addr::LOCALHOST, lab.ports[w % lab.ports.len()]));
    let mut items = Vec::new();
    match kind {
        Kind::Random => {
            for k in 0..POOL_MAX {
                let len = 1 + rng.below(RANDOM_LEN_MAX as u64) as usize;
                let bytes = (0..len).map(|_| rng.next_u64() as u8).collect();
                items.push(Item {
                    bytes,
                    dest: kaping_at(k),
                    src: None,
                });
            }
        }
        Kind::Truncated => {
            for (i, to, reply) in kept
                .iter()
                .step_by(KEEP_PER_CONTACT)
                .take(TRUNCATED_SOURCES)
            {
                for len in 0..reply.len() {
                    items.push(Item {
                        bytes: reply[..len].to_vec(),
                        dest: *to,
                        src: Some(lab.capture.addr(*i).ip()),
                    });
                }
            }
        }
        Kind::Forged => {
            for k in 0..POOL_MAX {
                let (i, to, reply) = &kept[k % kept.len()];
                let forged = forged_token(&other_key, &mut rng, h.workers, h.slots_per_worker);
                let Some(bytes) = with_token(reply, &forged) else {
                    continue;
                };
                items.push(Item {
                    bytes,
                    dest: *to,
                    src: Some(lab.capture.addr(*i).ip()),
                });
            }
        }
        Kind::Replay => {
            for (i, to, reply) in &kept {
                items.push(Item {
                    bytes: reply.clone(),
                    dest: *to,
                    src: Some(lab.capture.addr(*i).ip()),
                });
            }
        }
        Kind::Icmp => {
            let sock = icmp::raw_socket().map_err(|e| Skip(e.to_string()))?;
            let responder_port = lab.responder_port;
            for k in 0..POOL_MAX {
                let w = k % lab.ports.len();
                let from = SocketAddrV4::new(Ipv4Addr::LOCALHOST, lab.ports[w]);
                let index = rng.below(cfg.contacts);
                let SocketAddr::V4(to) = contact_addr(index, responder_port, 1, false) else {
                    continue;
                };
                let payload = if k % 2 == 0 {
                    let len = 16 + rng.below(ICMP_QUOTE_MAX as u64 - 16) as usize;
                    (0..len).map(|_| rng.next_u64() as u8).collect()
                } else {
                    kaping_like_request(
                        &contact_uri(index, responder_port, 1, false),
                        lab.ports[w],
                        &forged_token(&other_key, &mut rng, h.workers, h.slots_per_worker),
                    )
                    .map_err(Skip)?
                };
                items.push(Item {
                    bytes: icmp::port_unreachable(from, to, &payload),
                    dest: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                    src: None,
                });
            }
            return Ok(Pool { items, sock });
        }
    }
    if items.is_empty() {
        return Err(Skip("no datagram could be made".to_string()));
    }
    Ok(Pool {
        items,
        sock: udp_sender()?,
    })
}

/// The request kaping would send `uri` from `port`, as far as an ICMP
/// error quotes it, with `tok` as its token.
fn kaping_like_request(uri: &str, port: u16, tok: &[u8; TOKEN_LEN]) -> Result<Vec<u8>, String> {
    let template = Template::new(&TemplateConfig {
        local_host: "127.0.0.1".to_string(),
        local_port: port,
        ..TemplateConfig::default()
    })
    .map_err(|e| format!("request template: {e}"))?;
    let mut buf = vec![0u8; DATAGRAM_MAX];
    let layout = template
        .render(
            &ContactText {
                uri,
                to: uri,
                route: None,
            },
            &mut buf,
        )
        .map_err(|e| format!("request template: {e}"))?;
    patch(&mut buf, &layout, tok, 1);
    buf.truncate(usize::from(layout.len).min(ICMP_QUOTE_MAX));
    Ok(buf)
}

/// What the sender did.
struct Blasted {
    sent: u64,
    failed: u64,
}

/// Sends `items` round and round in `sendmmsg` batches until `until` or
/// `stop`: the flood's one sender thread. No allocation in the loop.
fn blast(fd: RawFd, items: &[Item], until: Instant, stop: &AtomicBool) -> Blasted {
    let mut batch = SendBatch::new(BATCH, DATAGRAM_MAX);
    let (mut sent, mut failed) = (0u64, 0u64);
    let mut next = 0usize;
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        while !batch.is_full() {
            let it = &items[next];
            next = (next + 1) % items.len();
            batch.push(&it.bytes, &it.dest, it.src);
        }
        let out = batch.send(fd, |_, _| {});
        sent += out.sent as u64;
        failed += out.failed as u64;
    }
    batch.clear();
    Blasted { sent, failed }
}

/// The readable report.
pub fn print_text(r: &FloodReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "kaping flood: {} contacts + {} captured ({} Down), {} workers, backend {}, interval {:.3} s (offered {:.0} pings/s), reply timeout {:.3} s, latency {} us",
        r.contacts, r.captured, r.down, r.workers, r.backend, r.interval_s, r.offered_per_s, r.reply_timeout_s, r.latency_us
    )?;
    writeln!(
        out,
        "  loaded in {:.2} s, settled in {:.1} s; each kind: {} s quiet, then {} s of flood",
        r.load_seconds, r.settle_seconds, r.seconds, r.seconds
    )?;
    for k in &r.kinds {
        if let Some(why) = &k.skipped {
            writeln!(out, "flood {}: SKIPPED: {why}", k.kind)?;
            continue;
        }
        let nonzero = |m: &BTreeMap<String, u64>| {
            let parts: Vec<String> = m
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(n, v)| format!("{n} {v}"))
                .collect();
            if parts.is_empty() {
                "-".to_string()
            } else {
                parts.join("  ")
            }
        };
        writeln!(
            out,
            "flood {}: {} datagrams sent in {:.1} s ({:.0}/s, {} refused; {} distinct); kaping absorbed {:.0}/s",
            k.kind, k.sent, k.window_s, k.sent_per_s, k.send_failed, k.pool, k.absorbed_per_s
        )?;
        writeln!(out, "  kaping counted      {}", nonzero(&k.counters))?;
        writeln!(out, "  rejects by cause    {}", nonzero(&k.rejects))?;
        if k.kind == Kind::Icmp.name() {
            writeln!(
                out,
                "  closure             kernel received {} ICMP unreachables, kaping read {}: {} not queued (error queue full; no kernel counter)",
                k.kernel_icmp_in_dest_unreachs, k.received, k.unaccounted
            )?;
        } else {
            writeln!(
                out,
                "  closure             sent {} + genuine {} = received {} + socket drops {} + backlog drops {} {:+} (in flight at the edges); Udp RcvbufErrors +{}",
                k.sent, k.genuine_replies, k.received, k.kernel_socket_drops, k.kernel_backlog_drops, k.unaccounted, k.kernel_udp_rcvbuf_errors
            )?;
        }
        writeln!(
            out,
            "  kaping CPU          {:.2} s in the flood ({:.2} cores), {:.2} s quiet: {} us per flood datagram",
            k.cpu_s_flood,
            k.cpu_cores_flood,
            k.cpu_s_quiet,
            k.cpu_us_per_datagram
                .map_or("-".to_string(), |v| format!("{v:.3}"))
        )?;
        writeln!(
            out,
            "  state changes       {} events; contacts (up, down, unknown) {:?} -> {:?}; captured over genuine {}; Down still Down {} of {}",
            k.state_changes, k.contacts_before, k.contacts_after, k.captured_over_genuine, k.down_still_down, r.down
        )?;
        writeln!(
            out,
            "  answers             {} matched in the window of {} genuine replies; {} of {} ever",
            k.matched, k.genuine_replies, k.matched_total, k.genuine_total
        )?;
        let us = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        writeln!(
            out,
            "  RTT                 p50 {} us  p99 {} us (quiet before: p50 {} us  p99 {} us)",
            us(k.rtt_p50_us),
            us(k.rtt_p99_us),
            us(k.quiet_rtt_p50_us),
            us(k.quiet_rtt_p99_us)
        )?;
        writeln!(
            out,
            "  resident memory     {:.1} -> {:.1} MiB ({:+.3} %)",
            k.rss_before_bytes as f64 / 1048576.0,
            k.rss_after_bytes as f64 / 1048576.0,
            k.rss_change * 100.0
        )?;
        writeln!(
            out,
            "  pings per second    {:.3}..{:.3} of offered: {:?} (quiet before: {:?})",
            k.rate_min_over_offered,
            k.rate_max_over_offered,
            k.pings_per_second,
            k.quiet_pings_per_second
        )?;
        for f in &k.failures {
            writeln!(out, "  FAILED: {f}")?;
        }
    }
    write_footer(out, &r.daemon_messages, &r.loadavg_before, &r.loadavg_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_fields_are_found_by_name() {
        let text = "Icmp: InMsgs InErrors InCsumErrors InDestUnreachs\nIcmp: 10 0 0 7\nUdp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\nUdp: 5 1 2 3 4\n";
        assert_eq!(snmp_field(text, "Icmp:", "InDestUnreachs"), 7);
        assert_eq!(snmp_field(text, "Udp:", "RcvbufErrors"), 4);
        assert_eq!(snmp_field(text, "Udp:", "Nope"), 0);
    }

    #[test]
    fn kinds_parse_by_name() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.name()), Ok(k));
        }
        assert!(Kind::parse("flood").is_err());
    }
}
