//! The summary: text for an operator, one JSON object for scripts (field
//! list in the binary's module docs; names here are the stable contract).

use std::fmt::Write as _;
use std::path::Path;

use kaping::shm::layout::{Counter, RegistrarFigures, RegistrarStat, HIST_BUCKETS};
use kaping::timefmt::rfc3339_ms;
use kaping::wire::reply::Reject;
use serde_json::{json, Map, Value};

use super::snapshot::{
    rate, rtt_quantile_us, Liveness, Snapshot, WorkerFigures, EVENTS, HEARTBEAT_STALE_MS,
    QUANTILES, STATES,
};

pub use kaping::timefmt::grouped;

/// `1h 02m 03s` style.
pub fn human_duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h:02}h {m:02}m {s:02}s")
    } else if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{}.{}s", s, ms % 1000 / 100)
    }
}

/// An RTT in µs as milliseconds with enough digits.
pub fn ms(us: Option<u64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us < 10_000 => format!("{:.3} ms", us as f64 / 1000.0),
        Some(us) => format!("{:.1} ms", us as f64 / 1000.0),
    }
}

/// One line on whether the daemon is alive; figures follow whatever it says.
pub fn liveness_line(s: &Snapshot) -> String {
    let h = &s.header;
    match s.liveness {
        Liveness::Running => format!(
            "running (pid {}, heartbeat {} ms ago)",
            h.pid,
            s.heartbeat_age_ms.unwrap_or(0)
        ),
        Liveness::Stopped => format!(
            "NOT RUNNING: stopped cleanly {} ago (pid {}); figures are its last",
            human_duration_ms(s.heartbeat_age_ms.unwrap_or(0)),
            h.pid
        ),
        Liveness::Stale => format!(
            "NOT RUNNING: last heartbeat {} ago (older than {} s): pid {} crashed or hung; \
             figures are its last",
            human_duration_ms(s.heartbeat_age_ms.unwrap_or(0)),
            HEARTBEAT_STALE_MS / 1000,
            h.pid
        ),
        Liveness::NoHeartbeat => format!(
            "NOT RUNNING: no heartbeat ever written (pid {} died while starting?)",
            h.pid
        ),
    }
}

/// The text summary.
pub fn text(path: &Path, s: &Snapshot, before: Option<&Snapshot>) -> String {
    let h = &s.header;
    let t = &s.total;
    let mut o = String::new();
    let elapsed = before.map(|b| s.taken.duration_since(b.taken));
    let _ = writeln!(
        o,
        "kaping instance {:?} ({}): {}",
        h.instance,
        path.display(),
        liveness_line(s)
    );
    let _ = writeln!(
        o,
        "  up {} (since {}), backend {}, {} workers, {} slots{}",
        human_duration_ms(s.uptime_ms()),
        rfc3339_ms(h.start_ms),
        if h.backend.is_empty() {
            "-"
        } else {
            &h.backend
        },
        h.workers,
        grouped(s.capacity()),
        h.shard
            .map_or(String::new(), |(k, n)| format!(", shard {k} of {n}"))
    );
    let _ = writeln!(
        o,
        "contacts {}: up {}, down {}, unknown {}, removed {}{}",
        grouped(t.contacts()),
        grouped(t.get(Counter::ContactsUp)),
        grouped(t.get(Counter::ContactsDown)),
        grouped(t.get(Counter::ContactsUnknown)),
        grouped(t.get(Counter::ContactsRemoved)),
        match t.get(Counter::ContactsUnmonitored) {
            0 => String::new(),
            n => format!(
                ", unmonitored {} (NAT-only keepalives, liveness not known)",
                grouped(n)
            ),
        },
    );
    let _ = writeln!(o, "{:<15} {:>16} {:>12}", "events", "total", "per second");
    for (c, _, label) in EVENTS {
        let per_s = match (before, elapsed) {
            (Some(b), Some(e)) => format!("{:.1}", rate(&b.total, t, c, e)),
            _ => "-".into(),
        };
        let _ = writeln!(o, "  {label:<13} {:>16} {per_s:>12}", grouped(t.get(c)));
    }
    let _ = write!(o, "rtt");
    for (q, name) in QUANTILES {
        let _ = write!(o, "  {} {}", label(name), ms(rtt_quantile_us(&t.hist, q)));
    }
    let _ = writeln!(
        o,
        "  max {}  ({} samples, mean {})",
        ms(rtt_quantile_us(&t.hist, 1.0)),
        grouped(t.rtt_count),
        ms(t.rtt_sum_us.checked_div(t.rtt_count))
    );
    let _ = writeln!(
        o,
        "{:<6} {:>10} {:>10} {:>8} {:>8} {:>14} {:>14} {:>10} {:>10} {:>11} {:>11}",
        "worker",
        "contacts",
        "up",
        "down",
        "unknown",
        "sent",
        "matched",
        "timeouts",
        "sent/s",
        "rtt p50",
        "rtt p99"
    );
    for (i, w) in s.workers.iter().enumerate() {
        let per_s = match (before, elapsed) {
            (Some(b), Some(e)) => format!("{:.1}", rate(&b.workers[i], w, Counter::Sent, e)),
            _ => "-".into(),
        };
        let _ = writeln!(
            o,
            "{:<6} {:>10} {:>10} {:>8} {:>8} {:>14} {:>14} {:>10} {:>10} {:>11} {:>11}",
            i,
            grouped(w.contacts()),
            grouped(w.get(Counter::ContactsUp)),
            grouped(w.get(Counter::ContactsDown)),
            grouped(w.get(Counter::ContactsUnknown)),
            grouped(w.get(Counter::Sent)),
            grouped(w.get(Counter::Matched)),
            grouped(w.get(Counter::TimedOut)),
            per_s,
            ms(rtt_quantile_us(&w.hist, 0.5)),
            ms(rtt_quantile_us(&w.hist, 0.99)),
        );
    }
    let rejects: Vec<String> = Reject::ALL
        .iter()
        .filter(|r| t.rejects[r.index()] > 0)
        .map(|r| format!("{} {}", r.name(), grouped(t.rejects[r.index()])))
        .collect();
    if rejects.is_empty() {
        let _ = writeln!(o, "rejects: none");
    } else {
        let _ = writeln!(o, "rejects: {}", rejects.join(", "));
    }
    if let Some(r) = &s.registrar {
        registrar_text(&mut o, r);
    }
    o
}

/// The registrar feed in three lines: what it did to the contacts, the DMQ
/// node's health, and removal from the registrar with its guard.
fn registrar_text(o: &mut String, r: &RegistrarFigures) {
    use RegistrarStat as R;
    let g = |s: R| grouped(r.get(s));
    let _ = writeln!(
        o,
        "registrar feed: {} contacts; added {}, updated {}, refreshed {}, deleted {} \
         ({} unknown), moved {}, expired {}, dropped after a sync {}, other shards {}, refused {}",
        g(R::Contacts),
        g(R::Added),
        g(R::Updated),
        g(R::Refreshed),
        g(R::Deleted),
        g(R::DeleteUnknown),
        g(R::Moved),
        g(R::Expired),
        g(R::StaleAfterSync),
        g(R::OtherShard),
        g(R::Refused),
    );
    let _ = writeln!(
        o,
        "  dmq: syncs {} done of {} asked ({} refused, {} unanswered), peer restarts {}, joins {}, \
         requests {}, records {}, duplicates {}, not from a peer {}, rejected {}, \
         other channels {}",
        g(R::SyncsDone),
        g(R::Syncs),
        g(R::SyncRefused),
        g(R::SyncUnanswered),
        g(R::PeerRestarts),
        g(R::Joins),
        g(R::Requests),
        g(R::Changes),
        g(R::Duplicates),
        g(R::NotPeer),
        g(R::Rejected),
        g(R::OtherChannels),
    );
    if !r.flag(R::RemovalConfigured) {
        let _ = writeln!(o, "  removal: off (no registrar_rpc)");
        return;
    }
    let _ = writeln!(
        o,
        "  removal: guard {} ({} trips); sent {}, removed {} ({} confirmed over DMQ), not found {}, \
         failed {}, withheld {} ({} attempts unanswered)",
        if r.flag(R::GuardTripped) {
            "TRIPPED, removals withheld"
        } else {
            "ok"
        },
        g(R::GuardTrips),
        g(R::RemovalsSent),
        g(R::Removed),
        g(R::RemovalsConfirmed),
        g(R::RemoveNotFound),
        g(R::RemoveFailed),
        g(R::RemovalsWithheld),
        g(R::RemoveUnanswered),
    );
}

/// The `registrar` JSON object: every figure by its shm name, the flags as
/// booleans; null when the daemon does not run the feed.
fn registrar_json(r: Option<&RegistrarFigures>) -> Value {
    let Some(r) = r else {
        return Value::Null;
    };
    let mut m = Map::new();
    for s in RegistrarStat::ALL {
        let v = if s.is_flag() {
            r.flag(s).into()
        } else {
            r.get(s).into()
        };
        m.insert(s.name().into(), v);
    }
    Value::Object(m)
}

/// RTT figures of a histogram as `rtt_<q>_us` keys (null when empty).
fn rtt_fields(m: &mut Map<String, Value>, f: &WorkerFigures) {
    m.insert("rtt_samples".into(), f.rtt_count.into());
    m.insert("rtt_sum_us".into(), f.rtt_sum_us.into());
    m.insert(
        "rtt_mean_us".into(),
        f.rtt_sum_us.checked_div(f.rtt_count).into(),
    );
    for (q, name) in QUANTILES {
        m.insert(format!("rtt_{name}_us"), rtt_quantile_us(&f.hist, q).into());
    }
    m.insert("rtt_max_us".into(), rtt_quantile_us(&f.hist, 1.0).into());
}

/// Contacts by state and every event counter of `f`.
fn count_fields(m: &mut Map<String, Value>, f: &WorkerFigures) {
    m.insert("contacts".into(), f.contacts().into());
    for (c, key) in STATES {
        m.insert(key.into(), f.get(c).into());
    }
    for (c, key, _) in EVENTS {
        m.insert(key.into(), f.get(c).into());
    }
}

fn rates(before: &WorkerFigures, after: &WorkerFigures, s: &Snapshot, b: &Snapshot) -> Value {
    let e = s.taken.duration_since(b.taken);
    let mut m = Map::new();
    for (c, key, _) in EVENTS {
        let r = rate(before, after, c, e);
        // Two decimals are plenty and keep the output stable to read.
        m.insert(key.into(), json!((r * 100.0).round() / 100.0));
    }
    Value::Object(m)
}

/// The JSON summary object.
pub fn json(path: &Path, s: &Snapshot, before: Option<&Snapshot>) -> Value {
    let h = &s.header;
    let t = &s.total;
    let mut m = Map::new();
    m.insert("shm_path".into(), path.display().to_string().into());
    m.insert("instance".into(), h.instance.clone().into());
    m.insert(
        "shard".into(),
        h.shard.map_or(
            serde_json::Value::Null,
            |(k, n)| serde_json::json!({ "index": k, "count": n }),
        ),
    );
    m.insert("layout_version".into(), h.version.into());
    m.insert("pid".into(), h.pid.into());
    m.insert("backend".into(), h.backend.clone().into());
    m.insert("running".into(), s.liveness.running().into());
    m.insert("status".into(), s.liveness.name().into());
    m.insert("stopped".into(), h.stopped.into());
    m.insert("heartbeat_age_ms".into(), s.heartbeat_age_ms.into());
    m.insert("start_ms".into(), h.start_ms.into());
    m.insert("started_at".into(), rfc3339_ms(h.start_ms).into());
    m.insert("uptime_ms".into(), s.uptime_ms().into());
    m.insert("now_ms".into(), s.now_ms.into());
    m.insert("workers".into(), h.workers.into());
    m.insert("slots_per_worker".into(), h.slots_per_worker.into());
    m.insert("capacity".into(), s.capacity().into());
    count_fields(&mut m, t);
    rtt_fields(&mut m, t);
    let interval_ms = before.map(|b| s.taken.duration_since(b.taken).as_millis() as u64);
    m.insert("rate_interval_ms".into(), interval_ms.into());
    m.insert(
        "rates".into(),
        match before {
            Some(b) => rates(&b.total, t, s, b),
            None => Value::Null,
        },
    );
    let mut rej = Map::new();
    for r in Reject::ALL {
        rej.insert(r.name().into(), t.rejects[r.index()].into());
    }
    m.insert("rejects".into(), Value::Object(rej));
    m.insert("registrar".into(), registrar_json(s.registrar.as_ref()));
    let per_worker: Vec<Value> = s
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let mut wm = Map::new();
            wm.insert("worker".into(), i.into());
            count_fields(&mut wm, w);
            rtt_fields(&mut wm, w);
            wm.insert("string_bytes_used".into(), w.string_bytes_used.into());
            if let Some(b) = before {
                wm.insert("rates".into(), rates(&b.workers[i], w, s, b));
            }
            Value::Object(wm)
        })
        .collect();
    m.insert("per_worker".into(), per_worker.into());
    debug_assert_eq!(t.hist.len(), HIST_BUCKETS);
    Value::Object(m)
}

/// Text label of a quantile's JSON suffix (`p999` reads `p99.9`).
pub fn label(name: &str) -> &str {
    match name {
        "p999" => "p99.9",
        n => n,
    }
}
