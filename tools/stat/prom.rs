//! `kaping-stat prometheus`: the Prometheus text exposition format 0.0.4
//! rendered from a [`Snapshot`], and the smallest HTTP/1.1 server that can
//! serve it (std `TcpListener`, one thread, one request per connection).
//!
//! The file is opened afresh for every scrape: a restarted daemon publishes a
//! new file by `rename`, and a mapping of the old one would keep showing a
//! dead daemon forever. A file that cannot be opened yields `kaping_up 0` and
//! a comment saying why, so the exporter stays a reliable target while the
//! daemon is down.
//!
//! The RTT histogram is published with [`LE_BOUNDS_US`], ~20 operator-friendly
//! bounds. A log-linear bucket `[lo, hi)` is counted under the smallest bound
//! `le >= hi - 1`, so every sample counted under `le` really is `<= le`; a
//! bucket straddling a bound moves up to the next one (a bucket is at most
//! 6.25% wide, so the undercount at a bound is confined to that band).

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use kaping::shm::layout::{bucket_bounds, Counter, RegistrarFigures, RegistrarStat};
use kaping::shm::reader::ShmReader;
use kaping::wire::reply::Reject;

use super::snapshot::{open_error_line, Snapshot, WorkerFigures, STATES};

/// Upper bounds of the published RTT buckets, µs (then `+Inf`).
pub const LE_BOUNDS_US: [u64; 21] = [
    250, 500, 1_000, 2_000, 3_000, 5_000, 7_500, 10_000, 15_000, 20_000, 30_000, 50_000, 75_000,
    100_000, 150_000, 200_000, 300_000, 500_000, 1_000_000, 2_000_000, 5_000_000,
];

/// Event counters: (counter, metric name, help).
const COUNTERS: [(Counter, &str, &str); 14] = [
    (
        Counter::Sent,
        "kaping_pings_sent_total",
        "Pings handed to the kernel.",
    ),
    (
        Counter::Matched,
        "kaping_replies_matched_total",
        "Replies matched to a live ping.",
    ),
    (
        Counter::TimedOut,
        "kaping_pings_timed_out_total",
        "Pings that got no reply in time (after retries).",
    ),
    (
        Counter::Stray,
        "kaping_replies_stray_total",
        "Valid replies for a contact that no longer exists.",
    ),
    (
        Counter::Forged,
        "kaping_replies_forged_total",
        "Replies with our instance prefix but a bad MAC.",
    ),
    (
        Counter::Late,
        "kaping_replies_late_total",
        "Replies for a ping already timed out or answered, and genuine replies replayed later.",
    ),
    (
        Counter::ErrorReplies,
        "kaping_replies_error_status_total",
        "Replies whose status code is not in the alive set.",
    ),
    (
        Counter::ParseErrors,
        "kaping_parse_errors_total",
        "Datagrams that are not a parsable SIP response.",
    ),
    (
        Counter::SendErrors,
        "kaping_send_errors_total",
        "Failed sends.",
    ),
    (
        Counter::Unreachable,
        "kaping_icmp_unreachable_total",
        "ICMP unreachable errors that failed a ping in flight at once (a miss, reason unreachable).",
    ),
    (
        Counter::Retries,
        "kaping_retransmissions_total",
        "Ping retransmissions before a miss is counted.",
    ),
    (
        Counter::RateLimited,
        "kaping_pings_rate_limited_total",
        "Pings deferred by the pings-per-second cap.",
    ),
    (
        Counter::Received,
        "kaping_datagrams_received_total",
        "Datagrams received.",
    ),
    (
        Counter::Handoff,
        "kaping_replies_handed_off_total",
        "Replies received by a worker other than the owner.",
    ),
];

/// `kaping_icmp_ignored_total{cause}`: ICMP errors that changed no contact.
/// With `kaping_icmp_unreachable_total` they add up to every ICMP error read.
const ICMP_IGNORED: [(Counter, &str); 3] = [
    (Counter::IcmpForged, "forged"),
    (Counter::IcmpUnmatched, "unmatched"),
    (Counter::IcmpOther, "other"),
];

/// `kaping_registrar_changes_total{kind}`: what the feed did to kaping's
/// contacts.
const REGISTRAR_CHANGES: [(RegistrarStat, &str); 10] = [
    (RegistrarStat::Added, "added"),
    (RegistrarStat::Updated, "updated"),
    (RegistrarStat::Refreshed, "refreshed"),
    (RegistrarStat::Deleted, "deleted"),
    (RegistrarStat::DeleteUnknown, "delete_unknown"),
    (RegistrarStat::Moved, "moved"),
    (RegistrarStat::Expired, "expired"),
    (RegistrarStat::StaleAfterSync, "stale_after_sync"),
    (RegistrarStat::OtherShard, "other_shard"),
    (RegistrarStat::Refused, "refused"),
];

/// `kaping_registrar_dmq_discarded_total{cause}`: KDMQ the node did not apply.
const REGISTRAR_DISCARDED: [(RegistrarStat, &str); 4] = [
    (RegistrarStat::Duplicates, "duplicate"),
    (RegistrarStat::NotPeer, "not_peer"),
    (RegistrarStat::Rejected, "rejected"),
    (RegistrarStat::OtherChannels, "other_channel"),
];

/// The feed's single-series counters: (figure, metric name, help).
const REGISTRAR_COUNTERS: [(RegistrarStat, &str, &str); 9] = [
    (
        RegistrarStat::SyncsDone,
        "kaping_registrar_syncs_completed_total",
        "Full syncs from a registrar completed (answered, or taken as complete once its records stopped).",
    ),
    (
        RegistrarStat::Syncs,
        "kaping_registrar_sync_requests_total",
        "Full syncs kaping asked a registrar for.",
    ),
    (
        RegistrarStat::SyncRefused,
        "kaping_registrar_sync_requests_refused_total",
        "Sync requests a registrar answered with an error (asked again).",
    ),
    (
        RegistrarStat::SyncUnanswered,
        "kaping_registrar_sync_requests_unanswered_total",
        "Sync requests never answered, taken as complete once the records stopped.",
    ),
    (
        RegistrarStat::PeerRestarts,
        "kaping_registrar_peer_restarts_total",
        "Registrars found to have forgotten kaping (restarted) when it joined them again; each synced from again.",
    ),
    (
        RegistrarStat::Received,
        "kaping_registrar_dmq_datagrams_received_total",
        "Datagrams received on kaping's DMQ node socket.",
    ),
    (
        RegistrarStat::Requests,
        "kaping_registrar_dmq_requests_total",
        "KDMQ requests from peers and the nodes they announce.",
    ),
    (
        RegistrarStat::Changes,
        "kaping_registrar_dmq_records_received_total",
        "usrloc records received over DMQ.",
    ),
    (
        RegistrarStat::Joins,
        "kaping_registrar_dmq_joins_total",
        "DMQ peers joined.",
    ),
];

/// `kaping_registrar_removals_total{outcome}`: how each removal ended. Every
/// removal ends in exactly one of these (or is still queued), so the sum is
/// the removals decided.
const REGISTRAR_REMOVALS: [(RegistrarStat, &str); 4] = [
    (RegistrarStat::Removed, "removed"),
    (RegistrarStat::RemoveNotFound, "not_found"),
    (RegistrarStat::RemoveFailed, "failed"),
    (RegistrarStat::RemovalsWithheld, "withheld"),
];

/// Removal's single-series counters. Unanswered attempts are counted per
/// attempt (each is retried, then ends as one of the outcomes above), so
/// they have a family of their own rather than an `outcome`.
const REMOVAL_COUNTERS: [(RegistrarStat, &str, &str); 4] = [
    (
        RegistrarStat::RemovalsSent,
        "kaping_registrar_removals_sent_total",
        "Removals the guard let through to the registrar's RPC.",
    ),
    (
        RegistrarStat::RemoveUnanswered,
        "kaping_registrar_removal_attempts_unanswered_total",
        "Removal attempts the registrar did not answer (each retried).",
    ),
    (
        RegistrarStat::RemovalsConfirmed,
        "kaping_registrar_removals_confirmed_total",
        "Removals whose delete came back from the registrar over DMQ.",
    ),
    (
        RegistrarStat::GuardTrips,
        "kaping_registrar_removal_guard_trips_total",
        "Times the removal guard tripped and withheld removals.",
    ),
];

/// The exposition media type (format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

/// A label value escaped per the format: backslash, double quote, newline.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A float sample value: Go-parsable, `+Inf` for infinity.
fn float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

/// `le` text of a bound in µs, in seconds.
fn le_seconds(us: u64) -> String {
    float(us as f64 / 1e6)
}

/// Cumulative counts per [`LE_BOUNDS_US`] entry, then the total (`+Inf`).
pub fn aggregate(hist: &[u64]) -> ([u64; LE_BOUNDS_US.len()], u64) {
    let mut per = [0u64; LE_BOUNDS_US.len()];
    let mut total = 0u64;
    for (i, &c) in hist.iter().enumerate() {
        if c == 0 {
            continue;
        }
        total = total.wrapping_add(c);
        let (_, hi) = bucket_bounds(i);
        let max_value = hi - 1;
        if let Some(j) = LE_BOUNDS_US.iter().position(|&le| max_value <= le) {
            per[j] = per[j].wrapping_add(c);
        }
    }
    let mut acc = 0u64;
    for p in per.iter_mut() {
        acc = acc.wrapping_add(*p);
        *p = acc;
    }
    (per, total)
}

/// The metrics page for a file that could be opened.
pub fn render(s: &Snapshot) -> String {
    let h = &s.header;
    let mut o = String::with_capacity(8192 + s.workers.len() * 2048);
    family(
        &mut o,
        "kaping_up",
        "gauge",
        "1 if the daemon's heartbeat is fresh and it has not stopped.",
    );
    let _ = writeln!(o, "kaping_up {}", u8::from(s.liveness.running()));
    family(&mut o, "kaping_info", "gauge", "Daemon identity; always 1.");
    let _ = writeln!(
        o,
        "kaping_info{{instance=\"{}\",backend=\"{}\",pid=\"{}\",layout_version=\"{}\",shard=\"{}\"}} 1",
        escape_label(&h.instance),
        escape_label(&h.backend),
        h.pid,
        h.version,
        h.shard.map_or(String::new(), |(k, n)| format!("{k}/{n}"))
    );
    family(
        &mut o,
        "kaping_stopped",
        "gauge",
        "1 once the daemon has stopped cleanly.",
    );
    let _ = writeln!(o, "kaping_stopped {}", u8::from(h.stopped));
    if let Some(age) = s.heartbeat_age_ms {
        family(
            &mut o,
            "kaping_heartbeat_age_seconds",
            "gauge",
            "Seconds since the daemon's last heartbeat.",
        );
        let _ = writeln!(
            o,
            "kaping_heartbeat_age_seconds {}",
            float(age as f64 / 1e3)
        );
    }
    family(
        &mut o,
        "kaping_start_time_seconds",
        "gauge",
        "Unix time the daemon started.",
    );
    let _ = writeln!(
        o,
        "kaping_start_time_seconds {}",
        float(h.start_ms as f64 / 1e3)
    );
    family(&mut o, "kaping_workers", "gauge", "Worker threads.");
    let _ = writeln!(o, "kaping_workers {}", h.workers);
    family(
        &mut o,
        "kaping_contact_slots",
        "gauge",
        "Contact slots in the shared memory (capacity).",
    );
    let _ = writeln!(o, "kaping_contact_slots {}", s.capacity());

    family(
        &mut o,
        "kaping_contacts",
        "gauge",
        "Contacts by liveness state.",
    );
    for (i, w) in s.workers.iter().enumerate() {
        for (c, state) in STATES {
            let _ = writeln!(
                o,
                "kaping_contacts{{worker=\"{i}\",state=\"{state}\"}} {}",
                w.get(c)
            );
        }
    }
    for (c, name, help) in COUNTERS {
        family(&mut o, name, "counter", help);
        for (i, w) in s.workers.iter().enumerate() {
            let _ = writeln!(o, "{name}{{worker=\"{i}\"}} {}", w.get(c));
        }
    }
    family(
        &mut o,
        "kaping_icmp_ignored_total",
        "counter",
        "ICMP errors that changed no contact, by cause: forged (quoted token fails its MAC), unmatched (no ping in flight), other (not a destination unreachable).",
    );
    for (i, w) in s.workers.iter().enumerate() {
        for (c, cause) in ICMP_IGNORED {
            let _ = writeln!(
                o,
                "kaping_icmp_ignored_total{{worker=\"{i}\",cause=\"{cause}\"}} {}",
                w.get(c)
            );
        }
    }
    family(
        &mut o,
        "kaping_rejects_total",
        "counter",
        "Unparsable or foreign datagrams by cause.",
    );
    for (i, w) in s.workers.iter().enumerate() {
        for r in Reject::ALL {
            let _ = writeln!(
                o,
                "kaping_rejects_total{{worker=\"{i}\",reason=\"{}\"}} {}",
                r.name(),
                w.rejects[r.index()]
            );
        }
    }
    family(
        &mut o,
        "kaping_string_bytes_used",
        "gauge",
        "Bytes of a worker's URI/AoR string region in use.",
    );
    for (i, w) in s.workers.iter().enumerate() {
        let _ = writeln!(
            o,
            "kaping_string_bytes_used{{worker=\"{i}\"}} {}",
            w.string_bytes_used
        );
    }
    histogram(&mut o, &s.total);
    if let Some(r) = &s.registrar {
        registrar(&mut o, r);
    }
    o
}

/// The registrar feed's families; only for a daemon that runs the feed, and
/// the removal ones only with removal on.
fn registrar(o: &mut String, r: &RegistrarFigures) {
    family(
        o,
        "kaping_registrar_contacts",
        "gauge",
        "Contacts of the registrar feed kaping holds.",
    );
    let _ = writeln!(
        o,
        "kaping_registrar_contacts {}",
        r.get(RegistrarStat::Contacts)
    );
    family(
        o,
        "kaping_registrar_changes_total",
        "counter",
        "Contacts of the registrar feed by what happened to them in kaping.",
    );
    for (stat, kind) in REGISTRAR_CHANGES {
        let _ = writeln!(
            o,
            "kaping_registrar_changes_total{{kind=\"{kind}\"}} {}",
            r.get(stat)
        );
    }
    family(
        o,
        "kaping_registrar_dmq_discarded_total",
        "counter",
        "KDMQ datagrams the node did not apply, by cause.",
    );
    for (stat, cause) in REGISTRAR_DISCARDED {
        let _ = writeln!(
            o,
            "kaping_registrar_dmq_discarded_total{{cause=\"{cause}\"}} {}",
            r.get(stat)
        );
    }
    for (stat, name, help) in REGISTRAR_COUNTERS {
        family(o, name, "counter", help);
        let _ = writeln!(o, "{name} {}", r.get(stat));
    }
    if !r.flag(RegistrarStat::RemovalConfigured) {
        return;
    }
    family(
        o,
        "kaping_registrar_removals_total",
        "counter",
        "Removals of dead contacts from the registrar, by outcome.",
    );
    for (stat, outcome) in REGISTRAR_REMOVALS {
        let _ = writeln!(
            o,
            "kaping_registrar_removals_total{{outcome=\"{outcome}\"}} {}",
            r.get(stat)
        );
    }
    for (stat, name, help) in REMOVAL_COUNTERS {
        family(o, name, "counter", help);
        let _ = writeln!(o, "{name} {}", r.get(stat));
    }
    family(
        o,
        "kaping_registrar_removal_guard_tripped",
        "gauge",
        "1 while the removal guard withholds removals.",
    );
    let _ = writeln!(
        o,
        "kaping_registrar_removal_guard_tripped {}",
        u8::from(r.flag(RegistrarStat::GuardTripped))
    );
}

fn histogram(o: &mut String, t: &WorkerFigures) {
    family(
        o,
        "kaping_rtt_seconds",
        "histogram",
        "Round-trip time of matched replies.",
    );
    let (cumulative, total) = aggregate(&t.hist);
    for (le, c) in LE_BOUNDS_US.iter().zip(cumulative) {
        let _ = writeln!(
            o,
            "kaping_rtt_seconds_bucket{{le=\"{}\"}} {c}",
            le_seconds(*le)
        );
    }
    let _ = writeln!(o, "kaping_rtt_seconds_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(
        o,
        "kaping_rtt_seconds_sum {}",
        float(t.rtt_sum_us as f64 / 1e6)
    );
    // _count must equal the +Inf bucket: both come from the histogram (the
    // separate rtt_count word may be a sample ahead of or behind it).
    let _ = writeln!(o, "kaping_rtt_seconds_count {total}");
}

/// The page for `path` now: metrics, or `kaping_up 0` and why.
pub fn page(path: &Path) -> String {
    match ShmReader::open(path) {
        Ok(shm) => render(&Snapshot::take(&shm)),
        Err(e) => {
            let mut o = String::new();
            let _ = writeln!(o, "# {}", open_error_line(path, &e).replace('\n', " "));
            family(
                &mut o,
                "kaping_up",
                "gauge",
                "1 if the daemon's heartbeat is fresh and it has not stopped.",
            );
            let _ = writeln!(o, "kaping_up 0");
            o
        }
    }
}

/// Longest request head we read; scrapers send a few hundred bytes.
const REQUEST_HEAD_MAX: usize = 8192;
/// A client that stalls this long is dropped so the one thread moves on.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve `/metrics` forever on `listener`.
pub fn serve(listener: TcpListener, path: &Path) -> io::Result<()> {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                // One bad client must not stop the exporter.
                if let Err(e) = handle(stream, path) {
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::BrokenPipe
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::UnexpectedEof
                    ) {
                        eprintln!("kaping-stat: client: {e}");
                    }
                }
            }
            // EMFILE and friends: back off a little instead of spinning.
            Err(e) => {
                eprintln!("kaping-stat: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(())
}

fn handle(mut stream: TcpStream, path: &Path) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = [0u8; REQUEST_HEAD_MAX];
    let mut len = 0;
    let head_end = loop {
        if let Some(p) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if len == buf.len() {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"request head too large\n",
                false,
            );
        }
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        len += n;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target, version) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    if !version.starts_with("HTTP/1.") {
        return respond(
            &mut stream,
            "400 Bad Request",
            "text/plain",
            b"bad request\n",
            false,
        );
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            b"only GET and HEAD\n",
            false,
        );
    }
    // Scrapers may add a query string (e.g. ?name[]=...); it is ignored.
    let route = target.split('?').next().unwrap_or("");
    if route != "/metrics" {
        return respond(
            &mut stream,
            "404 Not Found",
            "text/plain",
            b"not found; metrics are at /metrics\n",
            head_only,
        );
    }
    let body = page(path);
    respond(
        &mut stream,
        "200 OK",
        CONTENT_TYPE,
        body.as_bytes(),
        head_only,
    )
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body)?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kaping::shm::layout::{bucket_index, HIST_BUCKETS};

    #[test]
    fn aggregation_is_cumulative_and_never_overstates_a_bound() {
        let mut h = vec![0u64; HIST_BUCKETS];
        for us in [
            0u64,
            249,
            250,
            251,
            496,
            999,
            1000,
            5_000_000,
            6_000_000,
            u32::MAX as u64,
        ] {
            h[bucket_index(us)] += 1;
        }
        let (cum, total) = aggregate(&h);
        assert_eq!(total, 10);
        assert!(cum.windows(2).all(|w| w[0] <= w[1]));
        // 249, 250 and 251 share bucket [248,256), whose max 255 > 250: only
        // 0 counts under 250 µs.
        assert_eq!(cum[0], 1);
        // Everything up to 5 s except 5_000_000's straddling bucket.
        assert_eq!(*cum.last().unwrap(), 7);
        for (j, &le) in LE_BOUNDS_US.iter().enumerate() {
            let exact: u64 = (0..HIST_BUCKETS)
                .filter(|&i| bucket_bounds(i).1 - 1 <= le)
                .map(|i| h[i])
                .sum();
            assert_eq!(cum[j], exact, "le {le}");
        }
    }

    /// Every registrar figure but the two "configured" flags is exported,
    /// exactly once.
    #[test]
    fn every_registrar_figure_has_one_series() {
        let mut seen: Vec<RegistrarStat> = REGISTRAR_CHANGES
            .iter()
            .chain(&REGISTRAR_DISCARDED)
            .chain(&REGISTRAR_REMOVALS)
            .map(|e| e.0)
            .chain(REGISTRAR_COUNTERS.iter().map(|e| e.0))
            .chain(REMOVAL_COUNTERS.iter().map(|e| e.0))
            .chain([RegistrarStat::Contacts, RegistrarStat::GuardTripped])
            .collect();
        let n = seen.len();
        seen.sort_by_key(|s| s.index());
        seen.dedup();
        assert_eq!(seen.len(), n, "a figure exported twice");
        let missing: Vec<_> = RegistrarStat::ALL
            .into_iter()
            .filter(|s| !seen.contains(s))
            .collect();
        assert_eq!(
            missing,
            [
                RegistrarStat::FeedConfigured,
                RegistrarStat::RemovalConfigured
            ]
        );
    }

    /// Every worker counter is exported exactly once: as a counter family,
    /// a cause of `kaping_icmp_ignored_total`, or a state of
    /// `kaping_contacts`.
    #[test]
    fn every_worker_counter_has_one_series() {
        let mut seen: Vec<Counter> = COUNTERS
            .iter()
            .map(|e| e.0)
            .chain(ICMP_IGNORED.iter().map(|e| e.0))
            .chain(STATES.iter().map(|e| e.0))
            .collect();
        let n = seen.len();
        seen.sort_by_key(|c| c.index());
        seen.dedup();
        assert_eq!(seen.len(), n, "a counter exported twice");
        assert_eq!(seen, Counter::ALL, "every counter exported");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(le_seconds(250), "0.00025");
        assert_eq!(le_seconds(1_000_000), "1");
    }
}
