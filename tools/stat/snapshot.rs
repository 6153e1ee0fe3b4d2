//! One consistent-enough copy of everything the header and the worker blocks
//! publish, summed over workers, plus the liveness verdict and the rates
//! between two snapshots.
//!
//! A snapshot never touches the contact slots: contacts by state come from the
//! per-worker state gauges (`Counter::Contacts*`), so a summary costs a few
//! kilobytes of loads whatever the slot count. Counters are read one by one
//! with Relaxed loads while the workers keep counting, so two figures of one
//! snapshot may be a few events apart; every figure is monotonic between
//! snapshots except the gauges. The registrar feed's figures (layout version
//! 3) are one seqlock read of their block, so they agree with each other.

use std::path::Path;
use std::time::{Duration, Instant};

use kaping::shm::layout::{
    percentile, Counter, RegistrarFigures, RegistrarStat, HIST_BUCKETS, REJECT_COUNTERS,
};
use kaping::shm::reader::{HeaderInfo, ShmReader};
use kaping::shm::writer::unix_now_ms;

/// A heartbeat older than this means the daemon is not running (it beats
/// every second; 3 s tolerates two missed beats on a loaded machine).
pub const HEARTBEAT_STALE_MS: u64 = 3_000;

/// The quantiles every view shows, with their JSON suffix.
pub const QUANTILES: [(f64, &str); 4] =
    [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p999")];

/// Whether the daemon behind the file is alive, and if not why we think so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Heartbeat younger than [`HEARTBEAT_STALE_MS`] and not stopped.
    Running,
    /// The daemon marked the file stopped on a clean exit.
    Stopped,
    /// The heartbeat is older than [`HEARTBEAT_STALE_MS`]: crashed or hung.
    Stale,
    /// The daemon never wrote a heartbeat (it died while starting).
    NoHeartbeat,
}

impl Liveness {
    pub fn of(h: &HeaderInfo, heartbeat_age_ms: Option<u64>) -> Liveness {
        if h.stopped {
            return Liveness::Stopped;
        }
        match heartbeat_age_ms {
            None => Liveness::NoHeartbeat,
            Some(age) if age > HEARTBEAT_STALE_MS => Liveness::Stale,
            Some(_) => Liveness::Running,
        }
    }

    /// Stable name (JSON `status`).
    pub fn name(self) -> &'static str {
        match self {
            Liveness::Running => "running",
            Liveness::Stopped => "stopped",
            Liveness::Stale => "stale",
            Liveness::NoHeartbeat => "no_heartbeat",
        }
    }

    pub fn running(self) -> bool {
        self == Liveness::Running
    }
}

/// The event counters (not the state gauges), in display order, with their
/// JSON key and the label the text views print.
pub const EVENTS: [(Counter, &str, &str); 17] = [
    (Counter::Sent, "sent", "sent"),
    (Counter::Matched, "matched", "matched"),
    (Counter::TimedOut, "timeouts", "timed out"),
    (Counter::Stray, "stray", "stray"),
    (Counter::Forged, "forged", "forged"),
    (Counter::Late, "late", "late"),
    (Counter::ErrorReplies, "error_replies", "error replies"),
    (Counter::ParseErrors, "parse_errors", "parse errors"),
    (Counter::SendErrors, "send_errors", "send errors"),
    (Counter::Unreachable, "unreachable", "unreachable"),
    (Counter::Retries, "retries", "retries"),
    (Counter::RateLimited, "rate_limited", "rate limited"),
    (Counter::Received, "received", "received"),
    (Counter::Handoff, "handoff", "handed off"),
    (Counter::IcmpForged, "icmp_forged", "icmp forged"),
    (Counter::IcmpUnmatched, "icmp_unmatched", "icmp no match"),
    (Counter::IcmpOther, "icmp_other", "icmp other"),
];

/// The state gauges with their JSON key.
pub const STATES: [(Counter, &str); 5] = [
    (Counter::ContactsUnknown, "unknown"),
    (Counter::ContactsUp, "up"),
    (Counter::ContactsDown, "down"),
    (Counter::ContactsRemoved, "removed"),
    (Counter::ContactsUnmonitored, "unmonitored"),
];

/// One worker's published figures.
#[derive(Clone, Debug)]
pub struct WorkerFigures {
    pub counters: [u64; Counter::COUNT],
    pub rejects: [u64; REJECT_COUNTERS],
    pub hist: Vec<u64>,
    pub rtt_count: u64,
    pub rtt_sum_us: u64,
    pub string_bytes_used: u64,
}

impl WorkerFigures {
    pub fn get(&self, c: Counter) -> u64 {
        self.counters[c.index()]
    }

    /// Live contacts: Unknown + Up + Down + Unmonitored (Removed slots are
    /// on their way out).
    pub fn contacts(&self) -> u64 {
        self.get(Counter::ContactsUnknown)
            + self.get(Counter::ContactsUp)
            + self.get(Counter::ContactsDown)
            + self.get(Counter::ContactsUnmonitored)
    }
}

/// Everything but the slots, at one instant.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub header: HeaderInfo,
    pub taken: Instant,
    /// Unix ms when the snapshot was taken.
    pub now_ms: u64,
    pub heartbeat_age_ms: Option<u64>,
    pub liveness: Liveness,
    pub workers: Vec<WorkerFigures>,
    /// Sums over workers.
    pub total: WorkerFigures,
    /// The registrar feed's figures when the daemon runs the feed (`--dmq`);
    /// `None` without it, for a version 2 file (no block), or when the block
    /// stayed mid-write (a daemon killed while writing it).
    pub registrar: Option<RegistrarFigures>,
}

impl Snapshot {
    pub fn take(shm: &ShmReader) -> Snapshot {
        let header = shm.header();
        let heartbeat_age_ms = shm.heartbeat_age_ms();
        let liveness = Liveness::of(&header, heartbeat_age_ms);
        let mut total = WorkerFigures {
            counters: [0; Counter::COUNT],
            rejects: [0; REJECT_COUNTERS],
            hist: vec![0; HIST_BUCKETS],
            rtt_count: 0,
            rtt_sum_us: 0,
            string_bytes_used: 0,
        };
        let workers: Vec<WorkerFigures> = (0..header.workers)
            .map(|w| {
                let (rtt_count, rtt_sum_us) = shm.rtt_totals(w);
                WorkerFigures {
                    counters: shm.counters(w),
                    rejects: shm.rejects(w),
                    hist: shm.histogram(w),
                    rtt_count,
                    rtt_sum_us,
                    string_bytes_used: shm.string_bytes_used(w),
                }
            })
            .collect();
        for wf in &workers {
            add_into(&mut total.counters, &wf.counters);
            add_into(&mut total.rejects, &wf.rejects);
            add_into(&mut total.hist, &wf.hist);
            total.rtt_count = total.rtt_count.wrapping_add(wf.rtt_count);
            total.rtt_sum_us = total.rtt_sum_us.wrapping_add(wf.rtt_sum_us);
            total.string_bytes_used += wf.string_bytes_used;
        }
        let registrar = shm
            .registrar()
            .ok()
            .flatten()
            .filter(|f| f.flag(RegistrarStat::FeedConfigured));
        Snapshot {
            header,
            registrar,
            taken: Instant::now(),
            now_ms: unix_now_ms(),
            heartbeat_age_ms,
            liveness,
            workers,
            total,
        }
    }

    /// Open `path` and snapshot it twice `interval` apart when the daemon is
    /// running (rates need two samples); once otherwise, or if `interval` is 0.
    pub fn sample(
        path: &Path,
        interval: Duration,
    ) -> Result<(ShmReader, Snapshot, Option<Snapshot>), String> {
        let shm = ShmReader::open(path).map_err(|e| open_error_line(path, &e))?;
        let first = Snapshot::take(&shm);
        if interval.is_zero() || !first.liveness.running() {
            return Ok((shm, first, None));
        }
        std::thread::sleep(interval);
        let second = Snapshot::take(&shm);
        Ok((shm, second, Some(first)))
    }

    pub fn uptime_ms(&self) -> u64 {
        let end = if self.liveness.running() {
            self.now_ms
        } else {
            // A dead daemon's uptime ended with its last heartbeat.
            self.header.heartbeat_ms.max(self.header.start_ms)
        };
        end.saturating_sub(self.header.start_ms)
    }

    /// Slot capacity of the file.
    pub fn capacity(&self) -> u64 {
        self.header.workers as u64 * self.header.slots_per_worker as u64
    }
}

fn add_into(total: &mut [u64], part: &[u64]) {
    for (t, p) in total.iter_mut().zip(part) {
        *t = t.wrapping_add(*p);
    }
}

/// RTT quantile `q` in µs of a histogram; `None` when it is empty.
pub fn rtt_quantile_us(hist: &[u64], q: f64) -> Option<u64> {
    percentile(hist, q)
}

/// Per-second rate of counter `c` between `before` and `after` (which may be
/// a worker or the total). A counter that went backwards (the file was
/// replaced by a restarted daemon) rates 0.
pub fn rate(before: &WorkerFigures, after: &WorkerFigures, c: Counter, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    after.get(c).saturating_sub(before.get(c)) as f64 / secs
}

/// The one-line error for a file that cannot be opened, naming the path and
/// what to do.
pub fn open_error_line(path: &Path, e: &kaping::shm::reader::OpenError) -> String {
    use kaping::shm::reader::OpenError;
    match e {
        OpenError::Missing(_) => format!(
            "{}: no such file: the kaping daemon is not running (or runs under another \
             instance name); use --shm PATH or --instance NAME",
            path.display()
        ),
        OpenError::Io(_, io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            permission_line(path)
        }
        OpenError::Io(..) => e.to_string(),
        _ => format!("{}: {e}", path.display()),
    }
}

/// Why this user may not read the file, and who may: the daemon creates it
/// mode 0640, readable by its owner and its group (`shm_group`, else the
/// daemon's own group). The file is stat'ed for the figures, which needs
/// no read permission.
fn permission_line(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        // Not even stat: a directory on the way may not be entered.
        return format!(
            "cannot read {}: permission denied (a directory on its path may not be \
             entered); run as a user who can, or use --shm to name a file elsewhere",
            path.display()
        );
    };
    let mode = meta.mode() & 0o7777;
    let owner = kaping::access::user_name(meta.uid()).unwrap_or_else(|| meta.uid().to_string());
    let group = kaping::access::group_name(meta.gid()).unwrap_or_else(|| meta.gid().to_string());
    let who = if mode & 0o040 != 0 {
        format!("run as the owner or a member of group '{group}' (the daemon's shm_group setting)")
    } else {
        format!("run as the owner ('{owner}') or root")
    };
    format!(
        "cannot read {}: permission denied (mode {mode:04o}, owner {owner}, group {group}); {who}",
        path.display()
    )
}
