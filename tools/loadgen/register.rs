//! `kaping-loadgen register`: fills (or empties) a registrar's location
//! table fast, as many phones registering at once would, without running
//! the phones.
//!
//! For users `<prefix><i>`, i in `first..first+count`, sends one REGISTER
//! (RFC 3261 §10.2) each to the registrar: AoR `sip:<prefix><i>@<domain>`,
//! `Contact: <sip:<prefix><i>@<contact address of i>>`, `Expires:
//! --expires` (0 removes the binding, §10.2.2). The contact address of `i`
//! is `--contact` advanced by `i` ports, wrapping to the next IP address
//! past port 65535: for `i < 65536 - port` it is exactly the address
//! `phones --port` gives phone `i`, so this command can unregister (or
//! re-register) phones that `phones` registered, and it can name
//! 1,000,000 distinct contacts on 127.0.0.0/8.
//!
//! Every REGISTER is a transaction of its own: a Call-ID
//! `reg-<run>-<i>@host` (new per run, so a later run with `--expires 0`
//! is never taken as a retransmission of this one: usrloc compares CSeq
//! only within a Call-ID), CSeq 1, a branch naming the run and `i`.
//! Requests start at `--rate` per second, at most `--window` unanswered at
//! once (so a registrar's socket buffer is never the limit being
//! measured), are retransmitted per timer E (T1 = 500 ms doubling, capped
//! at T2 = 4 s) and given up `--timeout` after the first send. A final
//! response is matched by its Call-ID and `CSeq: 1 REGISTER`; 2xx counts
//! as done, anything else by its code.
//!
//! One thread, one socket; one `String` per request sent, a byte of state
//! per user and a map of at most `--window` transactions in flight.
//! Caller: `tools/loadgen.rs` (`register` subcommand).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use kaping::io::udp::wait_readable;
use serde::Serialize;

use crate::phones::{T1, T2};
use crate::sipmsg::{self, host_text, hostport_text, BRANCH_COOKIE};

/// Longest wait between looks at the retransmission timers.
const TICK: Duration = Duration::from_millis(5);
/// Receive buffer asked for: a window of 200s arriving together.
const RECV_BUFFER_BYTES: usize = 8 << 20;
/// Largest response read (a registrar lists every binding of the AoR).
const DATAGRAM_MAX: usize = 65_536;
/// Progress lines on stderr this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct RegisterConfig {
    pub registrar: SocketAddr,
    pub first: u32,
    pub count: u32,
    pub user_prefix: String,
    /// AoR domain; `None`: the registrar's host.
    pub domain: Option<String>,
    /// Contact address of user `first + 0`'s index 0 (see the module doc).
    pub contact: SocketAddr,
    /// Local address; `None`: the kernel's choice towards the registrar.
    pub bind: Option<IpAddr>,
    pub expires: u32,
    /// Requests started per second.
    pub rate: u32,
    /// Most requests unanswered at once.
    pub window: u32,
    pub timeout: Duration,
    /// Print a progress line to stderr every second.
    pub progress: bool,
    /// A kaping's shm file: measure the lag from each REGISTER to kaping.
    pub watch_shm: Option<std::path::PathBuf>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RegisterReport {
    pub total: u32,
    pub expires: u32,
    /// Final 2xx responses.
    pub ok: u32,
    /// Final responses by code (2xx included).
    pub by_code: BTreeMap<String, u32>,
    /// No final response within the timeout.
    pub no_answer: u32,
    /// With `watch_shm`: from a REGISTER's send to kaping's workers holding
    /// the change (the k-th change is taken as held once the count moved
    /// by k: changes are applied in order), ms; the changes never seen
    /// within 5 s of the last answer are counted in `lag_unseen`.
    pub lag_p50_ms: Option<f64>,
    pub lag_p99_ms: Option<f64>,
    pub lag_max_ms: Option<f64>,
    pub lag_unseen: u32,
    pub retransmits: u64,
    pub stray_responses: u64,
    pub elapsed_ms: u64,
    /// `ok` per second of `elapsed_ms`.
    pub ok_per_s: f64,
}

/// The contact address of index `i`: `base` advanced by `i` ports,
/// wrapping past 65535 to the next address at `base`'s port. `None` when
/// the address space runs out.
pub fn contact_addr(base: SocketAddr, i: u32) -> Option<SocketAddr> {
    let port0 = u32::from(base.port());
    let span = 65_536 - port0;
    let port = (port0 + i % span) as u16;
    let step = i / span;
    let ip = match base.ip() {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(u32::from(v4).checked_add(step)?)),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(
            u128::from(v6).checked_add(u128::from(step))?,
        )),
    };
    Some(SocketAddr::new(ip, port))
}

struct Pending {
    first_sent: Instant,
    retx_at: Instant,
    retx_interval: Duration,
}

pub fn run(cfg: &RegisterConfig) -> Result<RegisterReport, String> {
    if cfg.rate == 0 || cfg.window == 0 {
        return Err("--rate and --window must be at least 1".to_string());
    }
    if cfg.contact.port() == 0 {
        return Err("--contact needs a port (1-65535)".to_string());
    }
    let last = cfg
        .first
        .checked_add(cfg.count.saturating_sub(1))
        .ok_or("--first + --count is past 2^32")?;
    if contact_addr(cfg.contact, last).is_none() {
        return Err(format!(
            "--contact {} has no room for {} contacts from index {}",
            cfg.contact, cfg.count, cfg.first
        ));
    }
    let local_ip = match cfg.bind {
        Some(ip) => ip,
        None => sipmsg::source_towards(cfg.registrar)?,
    };
    let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0))
        .map_err(|e| format!("cannot bind {local_ip}: {e}"))?;
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    // Best effort: the window is what keeps drops away.
    let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(RECV_BUFFER_BYTES);
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let domain = cfg
        .domain
        .clone()
        .unwrap_or_else(|| host_text(cfg.registrar.ip()));
    let mut run_id = [0u8; 4];
    getrandom::fill(&mut run_id).map_err(|e| format!("no randomness: {e}"))?;
    let run_id = u32::from_le_bytes(run_id);
    let call_id_prefix = format!("reg-{run_id:08x}-");
    let call_id_host = format!("@{}", host_text(local_ip));

    let request = |i: u32| -> String {
        let user = format!("{}{i}", cfg.user_prefix);
        let contact = contact_addr(cfg.contact, i).expect("checked above");
        let mut m = String::with_capacity(512);
        let _ = write!(
            m,
            "REGISTER sip:{domain} SIP/2.0\r\n\
Via: SIP/2.0/UDP {local};branch={BRANCH_COOKIE}-{call_id_prefix}{i};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:{user}@{domain}>;tag={run_id:08x}{i}\r\n\
To: <sip:{user}@{domain}>\r\n\
Call-ID: {call_id_prefix}{i}{call_id_host}\r\n\
CSeq: 1 REGISTER\r\n\
Contact: <sip:{user}@{contact}>\r\n\
Expires: {expires}\r\n\
User-Agent: kaping-loadgen register\r\n\
Content-Length: 0\r\n\r\n",
            local = hostport_text(local),
            contact = hostport_text(contact),
            expires = cfg.expires,
        );
        m
    };

    let mut report = RegisterReport {
        total: cfg.count,
        expires: cfg.expires,
        ..RegisterReport::default()
    };
    // Per user: answered (or given up) yet.
    let mut done = vec![false; cfg.count as usize];
    let mut pending: HashMap<u32, Pending> = HashMap::with_capacity(cfg.window as usize);
    let mut started = 0u32;
    let mut open = cfg.count;
    let start = Instant::now();
    let mut next_tick = start;
    let mut next_progress = start + PROGRESS_EVERY;
    let mut rx = vec![0u8; DATAGRAM_MAX];
    let fd = socket.as_raw_fd();
    // The shm watcher: every change of kaping's held count, timed.
    let watch = match &cfg.watch_shm {
        Some(path) => {
            let shm = kaping::shm::reader::ShmReader::open(path)
                .map_err(|e| format!("--watch-shm {}: {e}", path.display()))?;
            let base = crate::dmq_bench::held(&shm);
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stop2 = stop.clone();
            let sampler = std::thread::spawn(move || {
                let mut seen: Vec<(Instant, u64)> = Vec::new();
                let mut last = base;
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = crate::dmq_bench::held(&shm);
                    if n != last {
                        seen.push((Instant::now(), n));
                        last = n;
                    }
                    std::thread::sleep(Duration::from_micros(500));
                }
                seen
            });
            Some((base, stop, sampler))
        }
        None => None,
    };
    let mut sent_at: Vec<Option<Instant>> = vec![None; cfg.count as usize];
    let due =
        |k: u32| start + Duration::from_nanos(u64::from(k) * 1_000_000_000 / u64::from(cfg.rate));

    while open > 0 {
        let now = Instant::now();
        while started < cfg.count && pending.len() < cfg.window as usize && due(started) <= now {
            let i = cfg.first + started;
            started += 1;
            let _ = socket.send_to(request(i).as_bytes(), cfg.registrar);
            sent_at[(i - cfg.first) as usize] = Some(now);
            pending.insert(
                i,
                Pending {
                    first_sent: now,
                    retx_at: now + T1,
                    retx_interval: T1,
                },
            );
        }
        if now >= next_tick {
            next_tick = now + TICK;
            pending.retain(|&i, p| {
                if now >= p.first_sent + cfg.timeout {
                    report.no_answer += 1;
                    done[(i - cfg.first) as usize] = true;
                    open -= 1;
                    return false;
                }
                if now >= p.retx_at {
                    let _ = socket.send_to(request(i).as_bytes(), cfg.registrar);
                    report.retransmits += 1;
                    p.retx_interval = (p.retx_interval * 2).min(T2);
                    p.retx_at = now + p.retx_interval;
                }
                true
            });
            if open == 0 {
                break;
            }
        }
        if cfg.progress && now >= next_progress {
            next_progress = now + PROGRESS_EVERY;
            eprintln!(
                "register: {} of {} answered 2xx, {} in flight, {:.1} s",
                report.ok,
                cfg.count,
                pending.len(),
                start.elapsed().as_secs_f64()
            );
        }
        let mut wake = next_tick;
        if started < cfg.count && pending.len() < cfg.window as usize {
            wake = wake.min(due(started));
        }
        wait_readable(&[fd], wake.saturating_duration_since(Instant::now()))
            .map_err(|e| format!("poll: {e}"))?;
        loop {
            let n = match socket.recv_from(&mut rx) {
                Ok((n, _)) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break, // an ICMP error: the timers decide
            };
            let Some((i, code)) = match_response(&rx[..n], &call_id_prefix) else {
                report.stray_responses += 1;
                continue;
            };
            if code < 200 {
                // §17.1.2.2 Proceeding: retransmit at T2 from now on.
                if let Some(p) = pending.get_mut(&i) {
                    p.retx_interval = T2;
                    p.retx_at = Instant::now() + T2;
                }
                continue;
            }
            if pending.remove(&i).is_none() {
                // A retransmitted final response, or not ours.
                if !(cfg.first..cfg.first.saturating_add(cfg.count)).contains(&i)
                    || !done[(i - cfg.first) as usize]
                {
                    report.stray_responses += 1;
                }
                continue;
            }
            done[(i - cfg.first) as usize] = true;
            open -= 1;
            *report.by_code.entry(code.to_string()).or_default() += 1;
            if (200..300).contains(&code) {
                report.ok += 1;
            }
        }
    }
    let elapsed = start.elapsed();
    report.elapsed_ms = elapsed.as_millis() as u64;
    report.ok_per_s = f64::from(report.ok) / elapsed.as_secs_f64().max(1e-9);
    if let Some((base, stop, sampler)) = watch {
        // Give kaping the time to take the last changes in.
        std::thread::sleep(Duration::from_secs(5));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = sampler.join().map_err(|_| "the shm watcher panicked")?;
        let mut lags: Vec<f64> = Vec::with_capacity(cfg.count as usize);
        let mut j = 0;
        for (k, sent) in sent_at.iter().enumerate() {
            let Some(sent) = sent else { continue };
            let moved = |n: u64| {
                let d = if cfg.expires > 0 {
                    n.saturating_sub(base)
                } else {
                    base.saturating_sub(n)
                };
                d > k as u64
            };
            while j < seen.len() && !moved(seen[j].1) {
                j += 1;
            }
            match seen.get(j) {
                Some(&(at, _)) => {
                    lags.push(at.saturating_duration_since(*sent).as_secs_f64() * 1e3)
                }
                None => report.lag_unseen += 1,
            }
        }
        lags.sort_by(f64::total_cmp);
        report.lag_p50_ms = crate::dmq_bench::sorted_percentile(&lags, 0.50);
        report.lag_p99_ms = crate::dmq_bench::sorted_percentile(&lags, 0.99);
        report.lag_max_ms = lags.last().copied();
    }
    Ok(report)
}

/// A final or provisional response to one of our REGISTERs: (user index,
/// code).
fn match_response(d: &[u8], call_id_prefix: &str) -> Option<(u32, u16)> {
    let code = sipmsg::status_code(d)?;
    let msg = std::str::from_utf8(d).ok()?;
    let call_id = sipmsg::header(msg, "call-id", Some("i"))?;
    let rest = call_id.strip_prefix(call_id_prefix)?;
    let i: u32 = rest[..rest.find('@')?].parse().ok()?;
    if sipmsg::header(msg, "cseq", None).and_then(sipmsg::parse_cseq) != Some((1, "REGISTER")) {
        return None;
    }
    Some((i, code))
}

pub fn print_text(r: &RegisterReport, out: &mut dyn io::Write) -> io::Result<()> {
    let codes: Vec<String> = r.by_code.iter().map(|(c, n)| format!("{c}:{n}")).collect();
    writeln!(
        out,
        "registered {} of {} (expires {}) in {} ms ({:.0}/s); final codes {}; no answer {}; retransmits {}; stray {}",
        r.ok,
        r.total,
        r.expires,
        r.elapsed_ms,
        r.ok_per_s,
        if codes.is_empty() { "-".to_string() } else { codes.join(" ") },
        r.no_answer,
        r.retransmits,
        r.stray_responses
    )?;
    if let (Some(p50), Some(p99), Some(max)) = (r.lag_p50_ms, r.lag_p99_ms, r.lag_max_ms) {
        writeln!(
            out,
            "lag to kaping: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; {} changes not seen",
            r.lag_unseen
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contact_addresses_follow_phones_then_wrap_to_the_next_address() {
        let base: SocketAddr = "127.0.0.1:65530".parse().unwrap();
        assert_eq!(contact_addr(base, 0), Some(base));
        assert_eq!(
            contact_addr(base, 5),
            Some("127.0.0.1:65535".parse().unwrap())
        );
        assert_eq!(
            contact_addr(base, 6),
            Some("127.0.0.2:65530".parse().unwrap())
        );
        assert_eq!(
            contact_addr(base, 13),
            Some("127.0.0.3:65531".parse().unwrap())
        );
        let top: SocketAddr = "255.255.255.255:65535".parse().unwrap();
        assert_eq!(contact_addr(top, 1), None);
        let v6: SocketAddr = "[::1]:65535".parse().unwrap();
        assert_eq!(contact_addr(v6, 1), Some("[::2]:65535".parse().unwrap()));
        // 1,000,000 contacts from port 10000 stay inside 127.0.0.0/8.
        let b: SocketAddr = "127.0.0.1:10000".parse().unwrap();
        assert_eq!(
            contact_addr(b, 999_999),
            Some("127.0.0.19:10351".parse().unwrap())
        );
    }

    #[test]
    fn matches_final_responses_by_call_id_and_cseq() {
        let ok = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:4000;branch=z9hG4bK-x;rport=4000\r\n\
Call-ID: reg-0000abcd-17@127.0.0.1\r\nCSeq: 1 REGISTER\r\nContact: <sip:u17@127.0.0.1:5079>;expires=60\r\n\r\n";
        assert_eq!(match_response(ok, "reg-0000abcd-"), Some((17, 200)));
        assert_eq!(match_response(ok, "reg-ffffffff-"), None);
        let other_cseq = String::from_utf8_lossy(ok).replace("1 REGISTER", "2 REGISTER");
        assert_eq!(match_response(other_cseq.as_bytes(), "reg-0000abcd-"), None);
        let busy = b"SIP/2.0 500 Server Internal Error\r\nCall-ID: reg-0000abcd-3@h\r\nCSeq: 1 REGISTER\r\n\r\n";
        assert_eq!(match_response(busy, "reg-0000abcd-"), Some((3, 500)));
        assert_eq!(
            match_response(b"REGISTER sip:x SIP/2.0\r\n\r\n", "reg-"),
            None
        );
    }
}
