//! The end-to-end benchmark (`bench`): a SIP responder and a kaping daemon on
//! loopback, measured from the outside, next to the raw UDP ceiling of the
//! same machine measured in the same run.
//!
//! What it reports, and where each figure comes from:
//! * the raw ceiling: [`crate::ceiling`] (an echo child and a `sendmmsg`/
//!   `recvmmsg` blaster in this process) with datagrams the size of kaping's
//!   real request, rendered by `kaping::wire::template` exactly as the daemon
//!   renders it for these contacts;
//! * pings sent and replies matched per second, the evenness of the send
//!   rate, RTT percentiles, timeouts, late, stray and forged replies: the
//!   daemon's shared-memory file (`ShmReader`), sampled once a second over
//!   the measured window, after loading and a warm-up;
//! * CPU per answered ping: the daemon's utime + stime (`/proc/PID/stat`)
//!   over the window ÷ replies matched in it; resident memory:
//!   `/proc/PID/status` once loading and warm-up are over.
//!
//! Ownership: this function owns three child processes (the echo child,
//! briefly, inside `ceiling::run`; the `serve` responder; the daemon) and a
//! temporary directory (contacts file, shm file). Every child is stopped and
//! reaped by its guard's `Drop` (stdin EOF, then SIGTERM through the `kill`
//! command, then SIGKILL) and the directory is removed by its guard's `Drop`,
//! on success and on every error path. Each child also carries its own
//! backstop (`--seconds`, `--run-for`) so none can outlive a killed bench.
//!
//! The responder runs in its own process so its CPU time is never counted as
//! the daemon's. Nothing here is on a per-packet path: it is setup and
//! once-a-second sampling, and allocates freely.
//! Caller: `main` (`bench` subcommand).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use kaping::shm::layout::{percentile, Counter, HIST_BUCKETS};
use kaping::shm::reader::ShmReader;
use kaping::sim::contacts::{contact_uri, V4_ADDRS};
use kaping::sim::{Layout, DATAGRAM_MAX};
use kaping::wire::template::{request_uri, ContactText, Template, TemplateConfig};
use serde::Serialize;

use crate::ceiling;

pub(crate) use crate::ceiling::USER_HZ;
/// Share of the measured ceiling the default interval offers.
const OFFERED_SHARE: f64 = 0.9;
/// Datagrams in flight in the ceiling run (the `ceiling` default).
const CEILING_WINDOW: usize = 1024;
/// Socket buffers asked of the responder (the daemon keeps its defaults).
pub(crate) const RESPONDER_BUFFER_BYTES: usize = 16 << 20;
/// The daemon runs this much longer than warm-up + window, so it is still
/// pinging when the last sample is taken (it is stopped before then).
const RUN_FOR_MARGIN_S: f64 = 10.0;
/// How long loading may take: a floor plus a generous per-contact budget
/// (the daemon loads about a million contacts per second or two).
pub(crate) const LOAD_TIMEOUT_BASE_S: u64 = 60;
pub(crate) const LOAD_TIMEOUT_PER_MILLION_S: u64 = 60;
/// Grace given to a child between stdin EOF, SIGTERM and SIGKILL.
const CHILD_EXIT_MS: u64 = 5000;
/// How long a child has to say it is ready.
pub(crate) const READY_TIMEOUT_S: u64 = 30;
/// Contacts sampled to average the request size over.
const SIZE_SAMPLES: u64 = 1024;
/// Daemon stderr lines kept for the report (warnings, clamped buffers).
pub(crate) const MESSAGES_MAX: usize = 20;

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub contacts: u64,
    pub seconds: u32,
    /// Daemon workers; `None`: half the online CPUs (the responder gets the
    /// other half, as the echo side of the raw ceiling does).
    pub workers: Option<u32>,
    pub backend: String,
    pub latency_ns: u64,
    /// Ping interval; `None`: offer `OFFERED_SHARE` of the ceiling.
    pub interval: Option<Duration>,
    /// The daemon binary; `None`: `kaping` next to this executable.
    pub kaping: Option<PathBuf>,
    pub warmup: Duration,
    pub ceiling_seconds: u32,
    pub responder_threads: usize,
    /// Daemon slab capacity; `None`: exactly `contacts`.
    pub max_contacts: Option<u32>,
    /// Directory for the contacts and shm files; `None`: `TempDir`'s default.
    pub dir: Option<PathBuf>,
}

/// Everything `bench` measured. Field names are a stable contract for
/// scripts (`--json`); new fields are appended, none renamed.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub contacts: u64,
    pub workers: u32,
    pub backend: String,
    pub seconds: u32,
    pub warmup_s: f64,
    /// Bytes of the OPTIONS request kaping sends to these contacts (mean over
    /// a sample, rendered by the daemon's own template code); the ceiling's
    /// datagram size.
    pub request_bytes: usize,
    /// Raw UDP echo round trips per second (median of one-second rates).
    pub ceiling_rtps: u64,
    pub ceiling_min_per_s: u64,
    pub ceiling_max_per_s: u64,
    pub interval_s: f64,
    pub reply_timeout_s: f64,
    /// contacts ÷ interval: the rate the configuration asks for.
    pub offered_per_s: f64,
    pub load_seconds: f64,
    pub loaded: u64,
    pub skipped: u64,
    pub window_s: f64,
    pub sent: u64,
    pub matched: u64,
    pub sent_per_s: f64,
    pub matched_per_s: f64,
    pub match_ratio: f64,
    pub ratio_to_ceiling: f64,
    pub rate_max_over_mean: f64,
    pub rate_min_over_mean: f64,
    pub sent_per_second: Vec<u64>,
    pub matched_per_second: Vec<u64>,
    pub latency_us: f64,
    pub rtt_p50_us: Option<u64>,
    pub rtt_p90_us: Option<u64>,
    pub rtt_p99_us: Option<u64>,
    pub rtt_p999_us: Option<u64>,
    pub timed_out: u64,
    pub late: u64,
    pub stray: u64,
    pub forged: u64,
    pub parse_errors: u64,
    pub send_errors: u64,
    pub error_replies: u64,
    pub rate_limited: u64,
    pub contacts_up: u64,
    pub contacts_down: u64,
    pub contacts_unknown: u64,
    /// Daemon CPU seconds (user + system) over the window.
    pub cpu_s: f64,
    /// Cores the daemon kept busy over the window.
    pub cpu_cores: f64,
    pub cpu_us_per_answered: Option<f64>,
    pub cpu_us_per_sent: Option<f64>,
    /// The raw ceiling's sender CPU per round trip in the same run (see
    /// `CeilingReport`), and kaping's CPU per answered ping over it.
    pub ceiling_sender_cpu_us_per_round_trip: Option<f64>,
    pub cpu_over_raw_sender: Option<f64>,
    /// The raw sender paced at the offered rate, in rounds as long as a
    /// worker's (`ceiling::Pace`), in the same run: its CPU per round trip,
    /// and kaping's CPU per answered ping over it.
    pub paced_sender_cpu_us_per_round_trip: Option<f64>,
    pub paced_round_ms: u64,
    pub cpu_over_paced_sender: Option<f64>,
    /// Responder CPU over the window, in cores (is the peer the limit?).
    pub responder_cpu_cores: f64,
    pub rss_bytes: u64,
    pub rss_anon_bytes: u64,
    pub rss_shmem_bytes: u64,
    pub rss_file_bytes: u64,
    pub rss_peak_bytes: u64,
    pub rss_per_contact_bytes: f64,
    pub rss_anon_per_contact_bytes: f64,
    pub rss_shmem_per_contact_bytes: f64,
    /// Mean length of a contact URI's text (the part of a contact's memory
    /// that is its own data; everything beyond it is kaping's overhead).
    pub uri_bytes_per_contact: f64,
    /// The responder's own counters (`serve --json`).
    pub responder: Option<serde_json::Value>,
    /// Daemon stderr lines other than the startup and load lines.
    pub daemon_messages: Vec<String>,
    /// `/proc/loadavg` at the start and the end of the run.
    pub loadavg_before: String,
    pub loadavg_after: String,
}

/// A temporary directory removed with everything in it on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// Under `base`, else /dev/shm when it exists (tmpfs: the daemon's shm
    /// file is then where it would live in production), else the system
    /// temp dir.
    pub(crate) fn create(base: Option<&Path>) -> Result<TempDir, String> {
        let shm = Path::new("/dev/shm");
        let base = if let Some(base) = base {
            base.to_path_buf()
        } else if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!("kaping-bench-{}-{nanos}", std::process::id()));
        fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process stopped and reaped on drop, with its stderr lines
/// forwarded to a channel by a reader thread.
pub(crate) struct Guarded {
    name: &'static str,
    child: Child,
    pub(crate) lines: Receiver<String>,
}

impl Guarded {
    pub(crate) fn spawn(name: &'static str, mut cmd: Command) -> Result<Guarded, String> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the {name}: {e}"))?;
        let stderr = child.stderr.take();
        let (tx, lines) = mpsc::channel();
        if let Some(stderr) = stderr {
            // Ends at the child's exit (EOF) or when the receiver is gone.
            thread::Builder::new()
                .name(format!("{name}-stderr"))
                .spawn(move || {
                    for line in BufReader::new(stderr).lines() {
                        let Ok(line) = line else { break };
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| format!("cannot start the {name}'s stderr reader: {e}"))?;
        }
        Ok(Guarded { name, child, lines })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the child has already exited.
    pub(crate) fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                let last: Vec<String> = self.lines.try_iter().collect();
                Err(format!(
                    "the {} exited early ({status}){}",
                    self.name,
                    last.last()
                        .map_or(String::new(), |l| format!(": {}", l.trim()))
                ))
            }
            Err(e) => Err(format!("cannot watch the {}: {e}", self.name)),
        }
    }

    /// Waits for the next stderr line.
    pub(crate) fn next_line(&mut self, deadline: Instant) -> Result<String, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => {
                Err(format!("the {} did not get ready in time", self.name))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let _ = self.child.wait();
                Err(format!("the {} exited before it was ready", self.name))
            }
        }
    }

    fn wait_until(&mut self, deadline: Instant) -> bool {
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return true,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => return false,
            }
        }
    }

    /// Asks the child to stop (stdin EOF, then SIGTERM), SIGKILLs it if it
    /// lingers, and returns what it printed on stdout.
    pub(crate) fn stop(&mut self, terminate: bool) -> String {
        drop(self.child.stdin.take());
        if terminate && matches!(self.child.try_wait(), Ok(None)) {
            // No unsafe in this binary: the `kill` command sends the signal.
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // stdout is drained on a thread so a child blocked writing a large
        // report cannot deadlock the wait.
        let reader = self.child.stdout.take().map(|mut out| {
            thread::spawn(move || {
                let mut text = String::new();
                let _ = out.read_to_string(&mut text);
                text
            })
        });
        if !self.wait_until(Instant::now() + Duration::from_millis(CHILD_EXIT_MS)) {
            eprintln!("kaping-loadgen: the {} did not stop; killing it", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        reader.and_then(|r| r.join().ok()).unwrap_or_default()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop(true);
        }
    }
}

/// A `Write` that counts bytes and lines on the way through.
struct Counting<W: Write> {
    inner: W,
    bytes: u64,
    lines: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        self.lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A free port on 0.0.0.0 (the responder's) and a base of `count`
/// consecutive free ports on 127.0.0.1 (the daemon's, one per worker), all
/// five digits so the request size does not depend on which were found.
pub(crate) fn free_ports(count: u16) -> Result<(u16, u16), String> {
    let mut x = u64::from(std::process::id()) ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        20_000 + (x % 40_000) as u16
    };
    let responder = (0..500)
        .map(|_| next())
        .find(|&p| UdpSocket::bind(("0.0.0.0", p)).is_ok())
        .ok_or("no free UDP port for the responder")?;
    for _ in 0..500 {
        let base = next();
        let range = base..base + count;
        if !range.contains(&responder)
            && range
                .clone()
                .all(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok())
        {
            return Ok((responder, base));
        }
    }
    Err(format!(
        "no {count} consecutive free UDP ports on 127.0.0.1"
    ))
}

/// The mean size of the request the daemon renders for these contacts: its
/// default template (From `sip:kaping@127.0.0.1`, Via and Call-ID host
/// 127.0.0.1, the bind port), the R-URI and the To URI both being the
/// contact URI (no AoR in a plain URI file).
fn request_bytes(contacts: u64, responder_port: u16, bind_port: u16) -> Result<usize, String> {
    let template = Template::new(&TemplateConfig {
        local_host: "127.0.0.1".to_string(),
        local_port: bind_port,
        ..TemplateConfig::default()
    })
    .map_err(|e| format!("request template: {e}"))?;
    let samples = contacts.min(SIZE_SAMPLES);
    let mut total = 0usize;
    for k in 0..samples {
        let uri = contact_uri(k * contacts / samples, responder_port, 1, false);
        let uri = request_uri(&uri);
        total += template.rendered_len(&ContactText {
            uri,
            to: uri,
            route: None,
        });
    }
    Ok(total.div_ceil(samples as usize))
}

/// utime + stime of a process, in ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    ceiling::stat_cpu_ticks(&format!("/proc/{pid}/stat"))
}

/// CPU time of a process, ns: its threads' time on a CPU summed
/// (`/proc/PID/task/*/schedstat`, exact), where `/proc/PID/stat` counts in
/// 10 ms ticks: at 10,000 contacts every 30 s a 10-second window holds
/// only a few dozen of them. Threads that exit inside the window are not
/// counted (the daemon's live as long as it does).
pub(crate) fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        // None: the thread exited meanwhile.
        total += ceiling::schedstat_ns(&path).unwrap_or(0);
    }
    Some(total)
}

/// Memory figures of `/proc/PID/status`, bytes.
#[derive(Default, Clone, Copy)]
pub(crate) struct Memory {
    pub(crate) rss: u64,
    anon: u64,
    file: u64,
    shmem: u64,
    peak: u64,
}

pub(crate) fn memory(pid: u32) -> Memory {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mut m = Memory::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kib: u64 = value
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap_or(0);
        let slot = match key {
            "VmRSS" => &mut m.rss,
            "RssAnon" => &mut m.anon,
            "RssFile" => &mut m.file,
            "RssShmem" => &mut m.shmem,
            "VmHWM" => &mut m.peak,
            _ => continue,
        };
        *slot = kib * 1024;
    }
    m
}

pub(crate) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Counters and RTT histogram summed over workers.
#[derive(Clone)]
pub(crate) struct Sample {
    counters: [u64; Counter::COUNT],
    hist: Vec<u64>,
    pub(crate) at: Instant,
}

impl Sample {
    pub(crate) fn read(shm: &ShmReader) -> Sample {
        let mut counters = [0u64; Counter::COUNT];
        let mut hist = vec![0u64; HIST_BUCKETS];
        for w in 0..shm.header().workers {
            for (t, c) in counters.iter_mut().zip(shm.counters(w)) {
                *t += c;
            }
            for (t, c) in hist.iter_mut().zip(shm.histogram(w)) {
                *t += c;
            }
        }
        Sample {
            counters,
            hist,
            at: Instant::now(),
        }
    }

    pub(crate) fn get(&self, c: Counter) -> u64 {
        self.counters[c.index()]
    }

    /// Growth of counter `c` since `earlier`.
    pub(crate) fn since(&self, earlier: &Sample, c: Counter) -> u64 {
        self.get(c).saturating_sub(earlier.get(c))
    }

    /// The RTT histogram of the samples taken since `earlier`.
    pub(crate) fn hist_since(&self, earlier: &Sample) -> Vec<u64> {
        self.hist
            .iter()
            .zip(&earlier.hist)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect()
    }
}

/// `kaping: PATH: N contacts loaded, K skipped in X.XX s` → (N, K, X).
pub(crate) fn parse_load_line(line: &str) -> Option<(u64, u64, f64)> {
    let rest = line.strip_prefix("kaping: ")?;
    // The path may hold anything, ": " included: anchor on the counts.
    let (head, rest) = rest.split_once(" contacts loaded, ")?;
    let loaded = head.rsplit_once(' ').map_or(head, |(_, n)| n);
    let (skipped, rest) = rest.split_once(" skipped")?;
    let seconds = rest.rsplit_once(" in ")?.1.strip_suffix(" s")?;
    Some((
        loaded.trim().parse().ok()?,
        skipped.trim().parse().ok()?,
        seconds.trim().parse().ok()?,
    ))
}

/// `... backend NAME, ...` of the daemon's startup line.
pub(crate) fn parse_backend(line: &str) -> Option<String> {
    let at = line.find(" backend ")? + " backend ".len();
    let name = line[at..].split([',', ' ']).next()?;
    Some(name.to_string())
}

pub(crate) fn duration_flag(d: Duration) -> String {
    format!("{}us", d.as_micros().max(1))
}

/// The daemon a bench runs: `--kaping PATH`, else `kaping` beside this
/// program (both built by `cargo build --release`).
pub(crate) fn kaping_binary(given: Option<&Path>) -> Result<PathBuf, String> {
    let kaping = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find own binary: {e}"))?
            .with_file_name("kaping"),
    };
    if !kaping.is_file() {
        return Err(format!(
            "no kaping daemon at {} (build it, or give --kaping PATH)",
            kaping.display()
        ));
    }
    Ok(kaping)
}

/// Starts the `serve` responder child on `0.0.0.0:port` and waits until it
/// says it is ready. `backstop_s`: it stops by itself after that long.
pub(crate) fn spawn_responder(
    port: u16,
    threads: usize,
    latency_ns: u64,
    backstop_s: u64,
) -> Result<Guarded, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let mut serve = Command::new(exe);
    serve.args([
        "serve",
        "--listen",
        &format!("0.0.0.0:{port}"),
        "--threads",
        &threads.to_string(),
        "--latency",
        &format!("{latency_ns}ns"),
        "--rcvbuf",
        &RESPONDER_BUFFER_BYTES.to_string(),
        "--sndbuf",
        &RESPONDER_BUFFER_BYTES.to_string(),
        "--stop-on-stdin-eof",
        "--json",
        "--seconds",
        &backstop_s.to_string(),
    ]);
    let mut responder = Guarded::spawn("responder", serve)?;
    let ready_by = Instant::now() + Duration::from_secs(READY_TIMEOUT_S);
    loop {
        let line = responder.next_line(ready_by)?;
        if line.trim() == "ready" {
            return Ok(responder);
        }
        if !line.starts_with("listening ") {
            eprintln!("responder: {}", line.trim());
        }
    }
}

/// What the benches give every daemon they start.
pub(crate) struct DaemonArgs<'a> {
    pub kaping: &'a Path,
    pub contacts: &'a Path,
    pub shm: &'a Path,
    pub bind_port: u16,
    pub workers: u32,
    pub backend: &'a str,
    pub interval: Duration,
    pub reply_timeout: Duration,
    pub instance: &'a str,
    pub max_contacts: u32,
    /// `--run-for` (its own backstop).
    pub run_for: Duration,
    /// Where the daemon writes its state-change events (`None`: nowhere).
    pub events: Option<&'a Path>,
}

/// The `kaping run` command of a bench (more flags may be added).
pub(crate) fn daemon_command(a: &DaemonArgs) -> Command {
    let mut run = Command::new(a.kaping);
    run.args([
        "run",
        "--allow-destinations",
        "127.0.0.0/8,::1/128",
        "--contacts",
    ])
    .arg(a.contacts)
    .arg("--shm")
    .arg(a.shm)
    .args([
        "--bind",
        &format!("127.0.0.1:{}", a.bind_port),
        "--workers",
        &a.workers.to_string(),
        "--backend",
        a.backend,
        "--interval",
        &duration_flag(a.interval),
        "--reply-timeout",
        &duration_flag(a.reply_timeout),
        "--down-after",
        "3",
        "--instance",
        a.instance,
        "--max-contacts",
        &a.max_contacts.to_string(),
        "--run-for",
        &format!("{:.3}s", a.run_for.as_secs_f64()),
    ]);
    match a.events {
        Some(path) => run.arg("--events").arg(path),
        None => run.args(["--events", "none"]),
    };
    run
}

/// A bench daemon's start, from its stderr: the load summary, the backend
/// it named, and its other lines (bounded).
pub(crate) struct Started {
    pub loaded: u64,
    pub skipped: u64,
    pub load_seconds: f64,
    pub backend: Option<String>,
    pub messages: Vec<String>,
}

/// Reads the daemon's lines until it reports its contacts loaded, and
/// refuses a start that did not load all `expected`. A daemon that refuses
/// its flags says why on stderr: that line is kept in the error.
pub(crate) fn wait_loaded(
    daemon: &mut Guarded,
    load_timeout: Duration,
    expected: u64,
) -> Result<Started, String> {
    let load_by = Instant::now() + load_timeout;
    let mut backend = None;
    let mut messages: Vec<String> = Vec::new();
    loop {
        let said = messages
            .iter()
            .find(|m| m.contains("error"))
            .or(messages.last());
        let line = daemon.next_line(load_by).map_err(|e| match said {
            Some(last) => format!("{e}: {last}"),
            None => e,
        })?;
        if let Some((loaded, skipped, load_seconds)) = parse_load_line(&line) {
            if skipped > 0 || loaded != expected {
                return Err(format!(
                    "the daemon loaded {loaded} of {expected} contacts ({skipped} skipped){}",
                    messages
                        .first()
                        .map_or(String::new(), |m| format!(": {m} (raise --max-contacts?)"))
                ));
            }
            return Ok(Started {
                loaded,
                skipped,
                load_seconds,
                backend,
                messages,
            });
        }
        if line.contains(" workers, backend ") {
            backend = parse_backend(&line);
        } else if messages.len() < MESSAGES_MAX {
            messages.push(line);
        }
    }
}

pub fn run(cfg: &BenchConfig) -> Result<BenchReport, String> {
    if cfg.contacts == 0 || cfg.seconds == 0 || cfg.ceiling_seconds == 0 {
        return Err("--contacts, --seconds and --ceiling-seconds must be at least 1".to_string());
    }
    if cfg.contacts > V4_ADDRS || cfg.contacts > u64::from(u32::MAX) {
        return Err(format!(
            "--contacts is limited to {V4_ADDRS} (distinct loopback addresses)"
        ));
    }
    let workers = match cfg.workers {
        Some(0) => return Err("--workers must be at least 1".to_string()),
        Some(w) => w,
        // The raw ceiling gives one core to each role (sender, echo); the
        // comparison is fair only if kaping and the responder split the
        // machine the same way: half the CPUs each.
        None => (thread::available_parallelism().map_or(2, |n| n.get() as u32) / 2).max(1),
    };
    let kaping = kaping_binary(cfg.kaping.as_deref())?;
    let loadavg_before = loadavg();
    let dir = TempDir::create(cfg.dir.as_deref())?;
    let (responder_port, bind_port) = free_ports(workers as u16)?;

    // The contacts, and how many bytes of URI text each one is.
    let contacts_path = dir.0.join("contacts.txt");
    let layout = Layout::new(responder_port, 1, false)?;
    let file = File::create(&contacts_path)
        .map_err(|e| format!("cannot create {}: {e}", contacts_path.display()))?;
    let mut out = Counting {
        inner: BufWriter::new(file),
        bytes: 0,
        lines: 0,
    };
    kaping::sim::write_contacts(&layout, cfg.contacts, &mut out, None)
        .map_err(|e| format!("cannot write contacts: {e}"))?;
    // Every line is a URI and its newline.
    let uri_bytes_per_contact = (out.bytes - out.lines) as f64 / cfg.contacts as f64;
    drop(out);

    // The raw ceiling, with datagrams of the size kaping will send.
    let size = request_bytes(cfg.contacts, responder_port, bind_port)?.min(DATAGRAM_MAX);
    eprintln!(
        "bench: raw UDP ceiling for {} s with {size}-byte datagrams ...",
        cfg.ceiling_seconds
    );
    let ceiling = ceiling::run(&ceiling::CeilingConfig {
        contacts: cfg.contacts,
        seconds: cfg.ceiling_seconds,
        size,
        window: CEILING_WINDOW,
        sip: false,
        pace: None,
    })?;
    if ceiling.round_trips_per_s == 0 {
        return Err("the raw ceiling measured 0 round trips/s".to_string());
    }
    let interval = match cfg.interval {
        Some(i) => i,
        None => Duration::from_secs_f64(
            cfg.contacts as f64 / (OFFERED_SHARE * ceiling.round_trips_per_s as f64),
        )
        .max(Duration::from_millis(10)),
    };
    // The raw sender again at the offered rate, in rounds as long as a
    // worker's: what the kernel charges per round trip at this operating
    // point (wake-ups, paths gone cold between rounds), next to what it
    // charges flat out.
    let offered = cfg.contacts as f64 / interval.as_secs_f64();
    let per_worker_ms = offered / workers as f64 / 1000.0;
    let pace = ceiling::Pace {
        rate: offered,
        round: Duration::from_millis(kaping::engine::worker::round_ms(per_worker_ms)),
    };
    eprintln!(
        "bench: raw sender paced at {offered:.0}/s in {} ms rounds for {} s ...",
        pace.round.as_millis(),
        cfg.ceiling_seconds
    );
    let paced = ceiling::run(&ceiling::CeilingConfig {
        contacts: cfg.contacts,
        seconds: cfg.ceiling_seconds,
        size,
        window: CEILING_WINDOW,
        sip: false,
        pace: Some(pace),
    })?;
    // Half the interval, at most 1 s: at these rates the one responder
    // thread is as busy as the worker and replies wait in its socket for
    // up to ~90 ms (measured), which a quarter of a 0.33 s interval (100k
    // contacts) did not cover: they were counted late or timed out.
    let reply_timeout = (interval / 2).min(Duration::from_secs(1));

    // Backstops: long enough for the whole run, short enough that a killed
    // bench leaves nothing behind for long.
    let load_timeout = Duration::from_secs(
        LOAD_TIMEOUT_BASE_S + LOAD_TIMEOUT_PER_MILLION_S * cfg.contacts.div_ceil(1_000_000),
    );
    let run_for_s = cfg.warmup.as_secs_f64() + f64::from(cfg.seconds) + RUN_FOR_MARGIN_S;
    let backstop_s = load_timeout.as_secs_f64() + run_for_s + 30.0;

    let mut responder = spawn_responder(
        responder_port,
        cfg.responder_threads,
        cfg.latency_ns,
        backstop_s.ceil() as u64,
    )?;

    let shm_path = dir.0.join("kaping.shm");
    let run = daemon_command(&DaemonArgs {
        kaping: &kaping,
        contacts: &contacts_path,
        shm: &shm_path,
        bind_port,
        workers,
        backend: &cfg.backend,
        interval,
        reply_timeout,
        instance: "bench",
        max_contacts: cfg.max_contacts.unwrap_or(cfg.contacts as u32),
        run_for: Duration::from_secs_f64(run_for_s),
        events: None,
    });
    eprintln!(
        "bench: {} contacts, interval {:.3} s (offered {:.0}/s), {workers} workers, backend {} ...",
        cfg.contacts,
        interval.as_secs_f64(),
        cfg.contacts as f64 / interval.as_secs_f64(),
        cfg.backend
    );
    let mut daemon = Guarded::spawn("daemon", run)?;
    let daemon_pid = daemon.pid();
    let Started {
        loaded,
        skipped,
        load_seconds,
        backend,
        mut messages,
    } = wait_loaded(&mut daemon, load_timeout, cfg.contacts)?;
    let shm = ShmReader::open(&shm_path)
        .map_err(|e| format!("cannot open {}: {e}", shm_path.display()))?;
    let backend = backend.unwrap_or_else(|| shm.header().backend);

    thread::sleep(cfg.warmup);
    daemon.check_alive()?;
    responder.check_alive()?;
    let mem = memory(daemon_pid);
    let cpu0 = cpu_ns(daemon_pid).ok_or("cannot read the daemon's CPU time")?;
    let resp_cpu0 = cpu_ns(responder.pid()).unwrap_or(0);
    let first = Sample::read(&shm);
    let mut last = first.clone();
    let (mut sent_rates, mut matched_rates) = (Vec::new(), Vec::new());
    let mut sent_per_second = Vec::new();
    let mut matched_per_second = Vec::new();
    for k in 1..=cfg.seconds {
        let due = first.at + Duration::from_secs(u64::from(k));
        thread::sleep(due.saturating_duration_since(Instant::now()));
        let now = Sample::read(&shm);
        let dt = now.at.duration_since(last.at).as_secs_f64().max(1e-3);
        let (sent, matched) = (
            now.since(&last, Counter::Sent),
            now.since(&last, Counter::Matched),
        );
        sent_per_second.push(sent);
        matched_per_second.push(matched);
        sent_rates.push(sent as f64 / dt);
        matched_rates.push(matched as f64 / dt);
        last = now;
        daemon.check_alive()?;
    }
    let cpu1 = cpu_ns(daemon_pid).ok_or("cannot read the daemon's CPU time")?;
    let resp_cpu1 = cpu_ns(responder.pid()).unwrap_or(resp_cpu0);
    let end = last;
    let window_s = end.at.duration_since(first.at).as_secs_f64();

    // Stop the daemon first (its in-flight pings then drain into a live
    // responder), then the responder, which prints its counters.
    daemon.stop(true);
    let responder_out = responder.stop(false);
    let responder_counters: Option<serde_json::Value> =
        serde_json::from_str(responder_out.trim()).ok();
    messages.extend(
        daemon
            .lines
            .try_iter()
            .take(MESSAGES_MAX.saturating_sub(messages.len())),
    );
    drop(shm);

    let hist = end.hist_since(&first);
    let sent = end.since(&first, Counter::Sent);
    let matched = end.since(&first, Counter::Matched);
    let sent_per_s = sent as f64 / window_s;
    let matched_per_s = matched as f64 / window_s;
    let max_rate = sent_rates.iter().copied().fold(0.0, f64::max);
    let min_rate = sent_rates.iter().copied().fold(f64::INFINITY, f64::min);
    let cpu_s = cpu1.saturating_sub(cpu0) as f64 / 1e9;
    let per = |n: u64| (n > 0).then(|| cpu_s * 1e6 / n as f64);
    let n = cfg.contacts as f64;
    Ok(BenchReport {
        contacts: cfg.contacts,
        workers,
        backend,
        seconds: cfg.seconds,
        warmup_s: cfg.warmup.as_secs_f64(),
        request_bytes: size,
        ceiling_rtps: ceiling.round_trips_per_s,
        ceiling_min_per_s: ceiling.min_per_s,
        ceiling_max_per_s: ceiling.max_per_s,
        interval_s: interval.as_secs_f64(),
        reply_timeout_s: reply_timeout.as_secs_f64(),
        offered_per_s: n / interval.as_secs_f64(),
        load_seconds,
        loaded,
        skipped,
        window_s,
        sent,
        matched,
        sent_per_s,
        matched_per_s,
        match_ratio: if sent > 0 {
            matched as f64 / sent as f64
        } else {
            0.0
        },
        ratio_to_ceiling: sent_per_s / ceiling.round_trips_per_s as f64,
        rate_max_over_mean: if sent_per_s > 0.0 {
            max_rate / sent_per_s
        } else {
            0.0
        },
        rate_min_over_mean: if sent_per_s > 0.0 {
            min_rate / sent_per_s
        } else {
            0.0
        },
        sent_per_second,
        matched_per_second,
        latency_us: cfg.latency_ns as f64 / 1e3,
        rtt_p50_us: percentile(&hist, 0.5),
        rtt_p90_us: percentile(&hist, 0.9),
        rtt_p99_us: percentile(&hist, 0.99),
        rtt_p999_us: percentile(&hist, 0.999),
        timed_out: end.since(&first, Counter::TimedOut),
        late: end.since(&first, Counter::Late),
        stray: end.since(&first, Counter::Stray),
        forged: end.since(&first, Counter::Forged),
        parse_errors: end.since(&first, Counter::ParseErrors),
        send_errors: end.since(&first, Counter::SendErrors),
        error_replies: end.since(&first, Counter::ErrorReplies),
        rate_limited: end.since(&first, Counter::RateLimited),
        contacts_up: end.get(Counter::ContactsUp),
        contacts_down: end.get(Counter::ContactsDown),
        contacts_unknown: end.get(Counter::ContactsUnknown),
        cpu_s,
        cpu_cores: cpu_s / window_s,
        cpu_us_per_answered: per(matched),
        cpu_us_per_sent: per(sent),
        ceiling_sender_cpu_us_per_round_trip: ceiling.sender_cpu_us_per_round_trip,
        cpu_over_raw_sender: per(matched)
            .zip(ceiling.sender_cpu_us_per_round_trip)
            .filter(|&(_, raw)| raw > 0.0)
            .map(|(ours, raw)| ours / raw),
        paced_sender_cpu_us_per_round_trip: paced.sender_cpu_us_per_round_trip,
        paced_round_ms: pace.round.as_millis() as u64,
        cpu_over_paced_sender: per(matched)
            .zip(paced.sender_cpu_us_per_round_trip)
            .filter(|&(_, raw)| raw > 0.0)
            .map(|(ours, raw)| ours / raw),
        responder_cpu_cores: resp_cpu1.saturating_sub(resp_cpu0) as f64 / 1e9 / window_s,
        rss_bytes: mem.rss,
        rss_anon_bytes: mem.anon,
        rss_shmem_bytes: mem.shmem,
        rss_file_bytes: mem.file,
        rss_peak_bytes: mem.peak,
        rss_per_contact_bytes: mem.rss as f64 / n,
        rss_anon_per_contact_bytes: mem.anon as f64 / n,
        rss_shmem_per_contact_bytes: mem.shmem as f64 / n,
        uri_bytes_per_contact,
        responder: responder_counters,
        daemon_messages: messages,
        loadavg_before,
        loadavg_after: loadavg(),
    })
}

/// The readable report.
pub fn print_text(r: &BenchReport, out: &mut dyn Write) -> io::Result<()> {
    let us = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    writeln!(
        out,
        "kaping bench: {} contacts, {} workers, backend {}, interval {:.3} s, reply timeout {:.3} s, latency {} us",
        r.contacts, r.workers, r.backend, r.interval_s, r.reply_timeout_s, r.latency_us
    )?;
    writeln!(
        out,
        "  raw UDP ceiling     {:>10} round trips/s  ({}-byte datagrams, min {} max {})",
        r.ceiling_rtps, r.request_bytes, r.ceiling_min_per_s, r.ceiling_max_per_s
    )?;
    writeln!(
        out,
        "  loaded              {} contacts in {:.2} s; measured {:.1} s after {:.1} s warm-up",
        r.loaded, r.load_seconds, r.window_s, r.warmup_s
    )?;
    writeln!(
        out,
        "  pings sent          {:>10.0} /s  (offered {:.0}/s; {:.3} of the ceiling)",
        r.sent_per_s, r.offered_per_s, r.ratio_to_ceiling
    )?;
    writeln!(
        out,
        "  replies matched     {:>10.0} /s  (match ratio {:.4})",
        r.matched_per_s, r.match_ratio
    )?;
    writeln!(
        out,
        "  send rate evenness  max/mean {:.3}  min/mean {:.3}  per second: {:?}",
        r.rate_max_over_mean, r.rate_min_over_mean, r.sent_per_second
    )?;
    writeln!(
        out,
        "  RTT (kernel stamps) p50 {} us  p90 {} us  p99 {} us  p99.9 {} us  ({} us injected)",
        us(r.rtt_p50_us),
        us(r.rtt_p90_us),
        us(r.rtt_p99_us),
        us(r.rtt_p999_us),
        r.latency_us
    )?;
    writeln!(
        out,
        "  daemon CPU          {:.2} s = {:.2} cores: {} us per answered ping, {} us per ping sent",
        r.cpu_s,
        r.cpu_cores,
        opt(r.cpu_us_per_answered),
        opt(r.cpu_us_per_sent)
    )?;
    writeln!(
        out,
        "  raw sender CPU      {} us per round trip (flat out, almost all in the kernel); kaping {} x that",
        opt(r.ceiling_sender_cpu_us_per_round_trip),
        opt(r.cpu_over_raw_sender)
    )?;
    writeln!(
        out,
        "  raw sender, paced   {} us per round trip (at the offered rate, {} ms rounds); kaping {} x that",
        opt(r.paced_sender_cpu_us_per_round_trip),
        r.paced_round_ms,
        opt(r.cpu_over_paced_sender)
    )?;
    writeln!(
        out,
        "  daemon memory       RSS {:.1} MiB = {:.0} B/contact (anon {:.0}, shm {:.0}; file {:.1} MiB, peak {:.1} MiB); URI text {:.1} B/contact",
        r.rss_bytes as f64 / 1048576.0,
        r.rss_per_contact_bytes,
        r.rss_anon_per_contact_bytes,
        r.rss_shmem_per_contact_bytes,
        r.rss_file_bytes as f64 / 1048576.0,
        r.rss_peak_bytes as f64 / 1048576.0,
        r.uri_bytes_per_contact
    )?;
    writeln!(
        out,
        "  in the window       timed out {}  late {}  stray {}  forged {}  unparsable {}  send errors {}  error replies {}  rate-limited {}",
        r.timed_out, r.late, r.stray, r.forged, r.parse_errors, r.send_errors, r.error_replies, r.rate_limited
    )?;
    writeln!(
        out,
        "  contacts at the end up {}  down {}  unknown {}; responder {:.2} cores",
        r.contacts_up, r.contacts_down, r.contacts_unknown, r.responder_cpu_cores
    )?;
    write_footer(out, &r.daemon_messages, &r.loadavg_before, &r.loadavg_after)
}

/// The last lines of a bench's readable report: what the daemon said and
/// how loaded the machine was (figures from a loaded machine are suspect).
pub(crate) fn write_footer(
    out: &mut dyn Write,
    daemon_messages: &[String],
    loadavg_before: &str,
    loadavg_after: &str,
) -> io::Result<()> {
    for m in daemon_messages {
        writeln!(out, "  daemon said: {m}")?;
    }
    writeln!(
        out,
        "  load average before: {loadavg_before}  after: {loadavg_after}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_daemon_lines() {
        assert_eq!(
            parse_load_line(
                "kaping: /dev/shm/x/contacts.txt: 1000000 contacts loaded, 0 skipped in 1.93 s"
            ),
            Some((1_000_000, 0, 1.93))
        );
        assert_eq!(
            parse_load_line(
                "kaping: a: b.txt: 5 contacts loaded, 2 skipped; stopped: full in 0.01 s"
            ),
            Some((5, 2, 0.01))
        );
        assert_eq!(parse_load_line("kaping: skipped line 3"), None);
        assert_eq!(
            parse_backend(
                "kaping: instance 'bench', 2 workers, backend uring, port-per-worker steering"
            ),
            Some("uring".to_string())
        );
    }

    #[test]
    fn request_size_is_the_rendered_size() {
        // Checked against the wire: `kaping run` with 5-digit bind port sent
        // `sip:u500@127.0.2.247:41234` (26 bytes) a 338-byte OPTIONS, i.e.
        // 286 fixed bytes plus the URI twice (R-URI and To).
        let uri = contact_uri(0, 41234, 1, false);
        assert_eq!(request_bytes(1, 41234, 31234).unwrap(), 286 + 2 * uri.len());
        // The mean over many contacts lies between the shortest and longest.
        let mean = request_bytes(100_000, 41234, 31234).unwrap();
        let longest = 286 + 2 * contact_uri(99_999, 41234, 1, false).len();
        assert!(mean > 286 + 2 * uri.len() && mean <= longest, "{mean}");
    }
}
