//! `kaping-loadgen reach`: can the proxy still reach each phone?
//!
//! For AoRs `sip:<prefix><i>@<domain>`, i in `0..count`, sends one OPTIONS
//! to the proxy (Max-Forwards 70, our own Via with `rport`), as a caller
//! would: the proxy looks the AoR up and relays the request to the
//! registered contact, through whatever NAT is in between. A phone answers
//! 200 with `Server: kaping-loadgen phone <user>` (see `phones.rs`); a
//! proxy that could not deliver answers 404 (no binding), 408 (the relayed
//! request timed out: the NAT dropped it) or 480, or nothing at all.
//!
//! Requests are paced at `rate` per second, retransmitted per timer E
//! (T1 = 500 ms doubling, capped at T2 = 4 s) and given up `timeout` after
//! the first send. Each is matched by its Call-ID (`reach-<run>-<i>@host`),
//! which names the AoR index, and must carry CSeq `1 OPTIONS`.
//!
//! One thread, one socket; one `String` per request sent. Caller:
//! `tools/loadgen.rs` (`reach` subcommand).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use kaping::io::udp::wait_readable;
use serde::Serialize;

use crate::phones::{T1, T2};
use crate::sipmsg::{self, host_text, hostport_text, BRANCH_COOKIE};

/// Longest sleep between looks at the timers.
const TICK: Duration = Duration::from_millis(20);

#[derive(Clone, Debug)]
pub struct ReachConfig {
    pub proxy: SocketAddr,
    pub count: u32,
    pub user_prefix: String,
    /// AoR domain; `None`: the proxy's host.
    pub domain: Option<String>,
    /// Local address; `None`: the one the kernel would use towards the proxy.
    pub bind: Option<IpAddr>,
    pub timeout: Duration,
    /// Requests started per second.
    pub rate: u32,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ReachReport {
    pub total: u32,
    /// 200 from the phone itself (its Server header names the AoR's user).
    pub reached: u32,
    /// Final responses by code (a 200 not from the phone counts under
    /// "200" but not in `reached`).
    pub by_code: BTreeMap<String, u32>,
    /// No final response within the timeout.
    pub no_answer: u32,
    /// 200s that did not carry the phone's mark.
    pub ok_not_by_phone: u32,
    pub retransmits: u64,
    pub stray_responses: u64,
    pub elapsed_ms: u64,
}

enum Probe {
    Waiting,
    Pending {
        first_sent: Instant,
        retx_at: Instant,
        retx_interval: Duration,
    },
    Done,
}

pub fn run(cfg: &ReachConfig) -> Result<ReachReport, String> {
    if cfg.rate == 0 {
        return Err("--rate must be at least 1".to_string());
    }
    let local_ip = match cfg.bind {
        Some(ip) => ip,
        None => sipmsg::source_towards(cfg.proxy)?,
    };
    let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0))
        .map_err(|e| format!("cannot bind {local_ip}: {e}"))?;
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let domain = cfg
        .domain
        .clone()
        .unwrap_or_else(|| host_text(cfg.proxy.ip()));
    let mut run_id = [0u8; 4];
    getrandom::fill(&mut run_id).map_err(|e| format!("no randomness: {e}"))?;
    let run_id = u32::from_le_bytes(run_id);
    let call_id_prefix = format!("reach-{run_id:08x}-");
    let call_id_host = format!("@{}", host_text(local_ip));

    let mut report = ReachReport {
        total: cfg.count,
        ..ReachReport::default()
    };
    let mut probes: Vec<Probe> = (0..cfg.count).map(|_| Probe::Waiting).collect();
    let mut next_to_send = 0u32;
    let mut open = cfg.count as usize;
    let start = Instant::now();
    let mut rx = vec![0u8; 8192];
    let fd = socket.as_raw_fd();
    let pace = Duration::from_secs(1) / cfg.rate;

    let request = |i: u32| -> String {
        let user = format!("{}{i}", cfg.user_prefix);
        let mut m = String::with_capacity(400);
        let _ = write!(
            m,
            "OPTIONS sip:{user}@{domain} SIP/2.0\r\n\
Via: SIP/2.0/UDP {local};branch={BRANCH_COOKIE}-{call_id_prefix}{i};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:reach@{host}>;tag={run_id:08x}{i}\r\n\
To: <sip:{user}@{domain}>\r\n\
Call-ID: {call_id_prefix}{i}{call_id_host}\r\n\
CSeq: 1 OPTIONS\r\n\
User-Agent: kaping-loadgen reach\r\n\
Content-Length: 0\r\n\r\n",
            local = hostport_text(local),
            host = host_text(local_ip),
        );
        m
    };

    while open > 0 {
        let now = Instant::now();
        // Start the requests due by now (paced).
        while next_to_send < cfg.count && start + pace * next_to_send <= now {
            let i = next_to_send;
            next_to_send += 1;
            let _ = socket.send_to(request(i).as_bytes(), cfg.proxy);
            probes[i as usize] = Probe::Pending {
                first_sent: now,
                retx_at: now + T1,
                retx_interval: T1,
            };
        }
        // Retransmit or give up.
        let mut next = now + TICK;
        if next_to_send < cfg.count {
            next = next.min(start + pace * next_to_send);
        }
        for (i, p) in probes.iter_mut().enumerate() {
            if let Probe::Pending {
                first_sent,
                retx_at,
                retx_interval,
            } = p
            {
                if now >= *first_sent + cfg.timeout {
                    report.no_answer += 1;
                    *p = Probe::Done;
                    open -= 1;
                    continue;
                }
                if now >= *retx_at {
                    let _ = socket.send_to(request(i as u32).as_bytes(), cfg.proxy);
                    report.retransmits += 1;
                    *retx_interval = (*retx_interval * 2).min(T2);
                    *retx_at = now + *retx_interval;
                }
                next = next.min(*retx_at).min(*first_sent + cfg.timeout);
            }
        }
        if open == 0 {
            break;
        }
        wait_readable(&[fd], next.saturating_duration_since(Instant::now()))
            .map_err(|e| format!("poll: {e}"))?;
        loop {
            let n = match socket.recv_from(&mut rx) {
                Ok((n, _)) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break, // an ICMP error: the timers decide
            };
            let Some((i, code, server_ok)) =
                match_response(&rx[..n], &call_id_prefix, &cfg.user_prefix)
            else {
                report.stray_responses += 1;
                continue;
            };
            let Some(p) = probes.get_mut(i as usize) else {
                report.stray_responses += 1;
                continue;
            };
            if !matches!(p, Probe::Pending { .. }) {
                continue; // a retransmitted final response
            }
            if code < 200 {
                // §17.1.2.2 Proceeding: retransmit at T2 from now on.
                if let Probe::Pending {
                    retx_at,
                    retx_interval,
                    ..
                } = p
                {
                    *retx_interval = T2;
                    *retx_at = Instant::now() + T2;
                }
                continue;
            }
            *report.by_code.entry(code.to_string()).or_default() += 1;
            if code == 200 {
                if server_ok {
                    report.reached += 1;
                } else {
                    report.ok_not_by_phone += 1;
                }
            }
            *p = Probe::Done;
            open -= 1;
        }
    }
    report.elapsed_ms = start.elapsed().as_millis() as u64;
    Ok(report)
}

/// A response to one of our probes: (AoR index, code, whether the Server
/// header is the phone's mark for that AoR).
fn match_response(d: &[u8], call_id_prefix: &str, user_prefix: &str) -> Option<(u32, u16, bool)> {
    let code = sipmsg::status_code(d)?;
    let msg = std::str::from_utf8(d).ok()?;
    let call_id = sipmsg::header(msg, "call-id", Some("i"))?;
    let rest = call_id.strip_prefix(call_id_prefix)?;
    let i: u32 = rest[..rest.find('@')?].parse().ok()?;
    if sipmsg::header(msg, "cseq", None).and_then(sipmsg::parse_cseq) != Some((1, "OPTIONS")) {
        return None;
    }
    let mark = format!("kaping-loadgen phone {user_prefix}{i}");
    let server_ok = sipmsg::header(msg, "server", None) == Some(mark.as_str());
    Some((i, code, server_ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_by_call_id_and_checks_the_mark() {
        let ok = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 203.0.113.10:4000;branch=z9hG4bK-x;rport=4000\r\n\
Call-ID: reach-0000abcd-17@203.0.113.10\r\nCSeq: 1 OPTIONS\r\nServer: kaping-loadgen phone p17\r\n\r\n";
        assert_eq!(
            match_response(ok, "reach-0000abcd-", "p"),
            Some((17, 200, true))
        );
        // Another phone's mark (a stale binding pointing elsewhere).
        let other = String::from_utf8_lossy(ok).replace("phone p17", "phone p18");
        assert_eq!(
            match_response(other.as_bytes(), "reach-0000abcd-", "p"),
            Some((17, 200, false))
        );
        let timeout = b"SIP/2.0 408 Request Timeout\r\nCall-ID: reach-0000abcd-3@h\r\nCSeq: 1 OPTIONS\r\n\r\n";
        assert_eq!(
            match_response(timeout, "reach-0000abcd-", "p"),
            Some((3, 408, false))
        );
        assert_eq!(match_response(timeout, "reach-ffffffff-", "p"), None);
        assert_eq!(
            match_response(b"OPTIONS sip:x SIP/2.0\r\n\r\n", "reach-", "p"),
            None
        );
    }
}
