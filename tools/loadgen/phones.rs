//! `kaping-loadgen phones`: simulated SIP phones (UAs) that behave as real
//! ones do behind a NAT: each has its own UDP socket, registers through a
//! registrar, keeps its registration fresh, and answers whatever requests
//! reach it (kaping's keepalives, a proxy's relayed OPTIONS).
//!
//! Phone `i` (0-based) is AoR `sip:<prefix><i>@<domain>` on `--bind` at
//! port `--port + i`, Contact `sip:<prefix><i>@<bind>:<port>`.
//!
//! * Registration (RFC 3261 §10.2): REGISTER with a fresh branch and
//!   `rport` (RFC 3581), From/To the AoR, one Call-ID per phone, CSeq
//!   increasing, `Expires: --expires`; retransmitted per timer E (T1 =
//!   500 ms doubling, capped at T2 = 4 s; at T2 once a provisional came)
//!   until timer F (64 × T1). A 2xx schedules the refresh at a random
//!   0.5–0.8 of the granted expiry (the Contact's `expires`, else the
//!   Expires header); a non-2xx final or a timeout is counted and retried
//!   after `REGISTER_RETRY`. First registrations are spread over `--ramp`.
//! * Requests (RFC 3261 §8.2.6): every request but ACK is answered from
//!   the phone's own socket, built by `kaping::sim::request` (Vias copied
//!   in order, `received`/`rport` on the top one, From/To + tag/Call-ID/
//!   CSeq copied, `Content-Length: 0`) plus `Server: kaping-loadgen phone
//!   <user>`, the mark `reach` looks for. INVITE gets 486 (a phone without
//!   media cannot accept a call), everything else 200. The response goes
//!   where §18.2.2 and RFC 3581 say (`sipmsg::reply_destination`), or to the
//!   packet's source with `--reply-to-source`.
//! * Keepalives (CRLF, the 4-byte NUL datagram) are counted and ignored.
//!
//! Threads: phones are sharded [`PHONES_PER_THREAD`] to a thread (the limit
//! of `kaping::io::udp::wait_readable`); a thread owns its phones' sockets
//! and state, sleeps in one `ppoll` until a socket is readable or a timer
//! is due, and never shares anything but the stop flag and one progress
//! counter. It allocates per registration and per answered request (a few
//! small strings), which 1,000s of phones at keepalive rates do not notice.
//! Caller: `tools/loadgen.rs` (`phones` subcommand).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kaping::io::udp::wait_readable;
use kaping::sim::fate::{to_tag, TAG_LEN};
use kaping::sim::request::{self, ReplyParams};
use kaping::sim::Rng;
use serde::Serialize;

use crate::sipmsg::{self, hostport_text, BRANCH_COOKIE};

/// Phones per thread: `wait_readable` takes at most 64 descriptors.
pub const PHONES_PER_THREAD: usize = 64;

/// RFC 3261 §17.1.1.1 T1 and T2.
pub const T1: Duration = Duration::from_millis(500);
pub const T2: Duration = Duration::from_secs(4);
/// RFC 3261 §17.1.2.2 timer F: a non-INVITE transaction gives up here.
const TIMER_F: Duration = Duration::from_secs(32);

/// Wait before a REGISTER that failed or timed out is tried again.
const REGISTER_RETRY: Duration = Duration::from_secs(5);

/// Longest sleep of a phone thread before it looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// Largest datagram a phone reads or writes.
const DATAGRAM_MAX: usize = 8192;

/// Descriptors beyond one per phone: stdio, the allocator's, the threads'.
const FDS_SPARE: u64 = 64;

/// What `phones` is told to do.
#[derive(Clone, Debug)]
pub struct PhonesConfig {
    pub count: u32,
    pub bind: IpAddr,
    pub port: u16,
    pub user_prefix: String,
    /// AoR domain; `None`: the registrar's host.
    pub domain: Option<String>,
    /// Where REGISTERs go; `None`: the phones do not register.
    pub register: Option<SocketAddr>,
    pub expires: u32,
    pub ramp: Duration,
    pub reply_to_source: bool,
    /// Seed of the branches and refresh spreads (0: from the OS).
    pub seed: u64,
}

/// Counters of one phone thread, summed over threads at the end.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub phones: u32,
    /// Phones whose latest REGISTER transaction ended in a 2xx.
    pub registered: u32,
    /// Phones that had at least one 2xx to a REGISTER.
    pub ever_registered: u32,
    pub register_sent: u64,
    pub register_retransmits: u64,
    pub register_ok: u64,
    /// Non-2xx final responses to REGISTER (401/407 are not handled).
    pub register_failed: u64,
    pub register_timeouts: u64,
    /// Requests received, by method.
    pub requests: BTreeMap<String, u64>,
    pub replies_sent: u64,
    pub reply_send_errors: u64,
    /// CRLF / NUL keepalive datagrams received (and ignored).
    pub keepalives: u64,
    /// Datagrams that were neither a request we could answer, a response,
    /// nor a keepalive.
    pub unparsable: u64,
    /// Responses that matched no REGISTER in flight.
    pub stray_responses: u64,
    /// Phones that received at least one request.
    pub phones_with_requests: u32,
    /// Per phone, with `--per-phone`: user, registered, requests and the
    /// age of its last request at the end (ms; null if none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_phone: Vec<PhoneSummary>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PhoneSummary {
    pub user: String,
    pub port: u16,
    pub registered: bool,
    pub requests: u64,
    pub last_request_age_ms: Option<u64>,
}

impl Summary {
    fn add(&mut self, o: Summary) {
        self.phones += o.phones;
        self.registered += o.registered;
        self.ever_registered += o.ever_registered;
        self.register_sent += o.register_sent;
        self.register_retransmits += o.register_retransmits;
        self.register_ok += o.register_ok;
        self.register_failed += o.register_failed;
        self.register_timeouts += o.register_timeouts;
        for (m, n) in o.requests {
            *self.requests.entry(m).or_default() += n;
        }
        self.replies_sent += o.replies_sent;
        self.reply_send_errors += o.reply_send_errors;
        self.keepalives += o.keepalives;
        self.unparsable += o.unparsable;
        self.stray_responses += o.stray_responses;
        self.phones_with_requests += o.phones_with_requests;
        self.per_phone.extend(o.per_phone);
    }

    /// `name value` lines, as `serve` prints its counters.
    pub fn print_text(&self, out: &mut dyn io::Write) -> io::Result<()> {
        writeln!(out, "phones {}", self.phones)?;
        writeln!(out, "registered {}", self.registered)?;
        writeln!(out, "ever_registered {}", self.ever_registered)?;
        writeln!(out, "register_sent {}", self.register_sent)?;
        writeln!(out, "register_retransmits {}", self.register_retransmits)?;
        writeln!(out, "register_ok {}", self.register_ok)?;
        writeln!(out, "register_failed {}", self.register_failed)?;
        writeln!(out, "register_timeouts {}", self.register_timeouts)?;
        for (m, n) in &self.requests {
            writeln!(out, "requests.{m} {n}")?;
        }
        writeln!(out, "replies_sent {}", self.replies_sent)?;
        writeln!(out, "reply_send_errors {}", self.reply_send_errors)?;
        writeln!(out, "keepalives {}", self.keepalives)?;
        writeln!(out, "unparsable {}", self.unparsable)?;
        writeln!(out, "stray_responses {}", self.stray_responses)?;
        writeln!(out, "phones_with_requests {}", self.phones_with_requests)?;
        for p in &self.per_phone {
            let age = p
                .last_request_age_ms
                .map_or_else(|| "-".to_string(), |a| a.to_string());
            writeln!(
                out,
                "phone {} port {} registered {} requests {} last_request_age_ms {age}",
                p.user, p.port, p.registered, p.requests
            )?;
        }
        Ok(())
    }
}

/// A REGISTER transaction in flight.
struct Pending {
    branch: String,
    cseq: u32,
    retx_at: Instant,
    retx_interval: Duration,
    give_up_at: Instant,
}

struct Phone {
    user: String,
    socket: UdpSocket,
    local: SocketAddr,
    contact: String,
    call_id: String,
    from_tag: String,
    to_tag: [u8; TAG_LEN],
    server: String,
    cseq: u32,
    next_register: Option<Instant>,
    pending: Option<Pending>,
    registered: bool,
    ever_registered: bool,
    requests: u64,
    last_request: Option<Instant>,
    rng: Rng,
}

/// What every phone of a thread shares (read only).
struct Common {
    register: Option<SocketAddr>,
    /// `sip:<domain>` (RFC 3261 §10.2: the Request-URI names the domain).
    register_ruri: String,
    domain: String,
    expires: u32,
    reply_to_source: bool,
    per_phone: bool,
}

/// Running phones: their threads and what they report.
pub struct Phones {
    threads: Vec<JoinHandle<Summary>>,
    stop: Arc<AtomicBool>,
    ever_registered: Arc<AtomicU32>,
    first: SocketAddr,
    last: SocketAddr,
}

impl Phones {
    /// Binds every phone's socket (so a port in use fails here, before any
    /// thread starts) and starts the phone threads.
    pub fn spawn(cfg: &PhonesConfig, per_phone: bool) -> Result<Phones, String> {
        if cfg.count == 0 {
            return Err("--count must be at least 1".to_string());
        }
        if cfg.bind.is_unspecified() {
            return Err(
                "--bind must be the phones' own address (it goes into Via and Contact)".into(),
            );
        }
        if u32::from(cfg.port) + cfg.count - 1 > u32::from(u16::MAX) {
            return Err(format!(
                "--port {} + --count {} goes past port 65535",
                cfg.port, cfg.count
            ));
        }
        if let Some(r) = cfg.register {
            if r.is_ipv4() != cfg.bind.is_ipv4() {
                return Err(format!(
                    "--register {r} and --bind {} are different address families",
                    cfg.bind
                ));
            }
        }
        let domain = match (&cfg.domain, cfg.register) {
            (Some(d), _) => d.clone(),
            (None, Some(r)) => sipmsg::host_text(r.ip()),
            (None, None) => sipmsg::host_text(cfg.bind),
        };
        let seed = if cfg.seed == 0 {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).map_err(|e| format!("no randomness: {e}"))?;
            u64::from_le_bytes(b) | 1
        } else {
            cfg.seed
        };
        let common = Arc::new(Common {
            register: cfg.register,
            register_ruri: format!("sip:{domain}"),
            domain,
            expires: cfg.expires,
            reply_to_source: cfg.reply_to_source,
            per_phone,
        });

        // One descriptor per phone, plus the process's own few: 10,000
        // phones need more than the usual soft limit of 1024.
        let fds_wanted = u64::from(cfg.count) + FDS_SPARE;
        let fds = kaping::io::limits::raise_nofile_limit(fds_wanted)
            .map_err(|e| format!("cannot read or raise RLIMIT_NOFILE: {e}"))?;
        if fds < fds_wanted {
            return Err(format!(
                "{} phones need {fds_wanted} open files; the hard limit allows {fds} \
                 (raise it: ulimit -Hn, or LimitNOFILE= in a unit)",
                cfg.count
            ));
        }

        let start = Instant::now();
        let mut phones = Vec::with_capacity(cfg.count as usize);
        for i in 0..cfg.count {
            let local = SocketAddr::new(cfg.bind, cfg.port + i as u16);
            let socket = UdpSocket::bind(local)
                .map_err(|e| format!("cannot bind phone {i} {local}: {e}"))?;
            socket
                .set_nonblocking(true)
                .map_err(|e| format!("{local}: {e}"))?;
            let user = format!("{}{i}", cfg.user_prefix);
            let mut rng = Rng::new(seed ^ (u64::from(i) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let ramp_offset = cfg.ramp.mul_f64(f64::from(i) / f64::from(cfg.count));
            phones.push(Phone {
                contact: format!("sip:{user}@{}", hostport_text(local)),
                call_id: format!("{:016x}-{user}@{}", seed, sipmsg::host_text(cfg.bind)),
                from_tag: format!("{:016x}", rng.next_u64()),
                to_tag: to_tag(seed ^ u64::from(i)),
                server: format!("kaping-loadgen phone {user}"),
                user,
                socket,
                local,
                cseq: 0,
                next_register: cfg.register.map(|_| start + ramp_offset),
                pending: None,
                registered: false,
                ever_registered: false,
                requests: 0,
                last_request: None,
                rng,
            });
        }
        let first = phones[0].local;
        let last = phones[phones.len() - 1].local;

        let stop = Arc::new(AtomicBool::new(false));
        let ever_registered = Arc::new(AtomicU32::new(0));
        let mut threads = Vec::new();
        let mut rest = phones;
        let mut k = 0;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(PHONES_PER_THREAD));
            let shard = std::mem::replace(&mut rest, tail);
            let (common, stop, progress) = (common.clone(), stop.clone(), ever_registered.clone());
            let handle = thread::Builder::new()
                .name(format!("phones-{k}"))
                .spawn(move || run_shard(shard, &common, &stop, &progress))
                .map_err(|e| format!("cannot start a phone thread: {e}"))?;
            threads.push(handle);
            k += 1;
        }
        Ok(Phones {
            threads,
            stop,
            ever_registered,
            first,
            last,
        })
    }

    /// Phones that have been registered at least once so far.
    pub fn ever_registered(&self) -> u32 {
        self.ever_registered.load(Ordering::Relaxed)
    }

    /// The first and last phone's address.
    pub fn range(&self) -> (SocketAddr, SocketAddr) {
        (self.first, self.last)
    }

    /// Stops every thread and sums their counters.
    pub fn stop(self) -> Summary {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Summary::default();
        for t in self.threads {
            match t.join() {
                Ok(s) => total.add(s),
                Err(_) => eprintln!("kaping-loadgen: a phone thread panicked"),
            }
        }
        total
    }
}

fn run_shard(
    mut phones: Vec<Phone>,
    common: &Common,
    stop: &AtomicBool,
    progress: &AtomicU32,
) -> Summary {
    let mut s = Summary {
        phones: phones.len() as u32,
        ..Summary::default()
    };
    let fds: Vec<_> = phones.iter().map(|p| p.socket.as_raw_fd()).collect();
    let mut rx = vec![0u8; DATAGRAM_MAX];
    let mut tx = Vec::with_capacity(DATAGRAM_MAX);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let mut next = now + STOP_CHECK;
        for p in phones.iter_mut() {
            if let Some(at) = p.timers(now, common, &mut tx, &mut s) {
                next = next.min(at);
            }
        }
        let ready = match wait_readable(&fds, next.saturating_duration_since(Instant::now())) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("kaping-loadgen: phones: poll failed: {e}");
                break;
            }
        };
        for (k, p) in phones.iter_mut().enumerate() {
            if ready & (1 << k) == 0 {
                continue;
            }
            loop {
                match p.socket.recv_from(&mut rx) {
                    Ok((n, from)) => {
                        let was = p.ever_registered;
                        p.datagram(&rx[..n], from, common, &mut tx, &mut s);
                        if p.ever_registered && !was {
                            progress.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // ICMP errors (port unreachable from a REGISTER) surface
                    // here on Linux; the transaction's timers handle them.
                    Err(_) => break,
                }
            }
        }
    }
    let end = Instant::now();
    for p in &phones {
        s.registered += u32::from(p.registered);
        s.ever_registered += u32::from(p.ever_registered);
        s.phones_with_requests += u32::from(p.requests > 0);
        if common.per_phone {
            s.per_phone.push(PhoneSummary {
                user: p.user.clone(),
                port: p.local.port(),
                registered: p.registered,
                requests: p.requests,
                last_request_age_ms: p
                    .last_request
                    .map(|t| end.duration_since(t).as_millis() as u64),
            });
        }
    }
    s
}

impl Phone {
    /// Runs the registration timers due at `now`; returns the next instant
    /// this phone needs attention.
    fn timers(
        &mut self,
        now: Instant,
        common: &Common,
        tx: &mut Vec<u8>,
        s: &mut Summary,
    ) -> Option<Instant> {
        let registrar = common.register?;
        if let Some(p) = self.pending.as_mut() {
            if now >= p.give_up_at {
                // Timer F: the transaction failed (RFC 3261 §17.1.2.2).
                s.register_timeouts += 1;
                self.pending = None;
                self.registered = false;
                self.next_register = Some(now + REGISTER_RETRY);
            } else if now >= p.retx_at {
                let cseq = p.cseq;
                let branch = p.branch.clone();
                p.retx_interval = (p.retx_interval * 2).min(T2);
                p.retx_at = now + p.retx_interval;
                self.write_register(tx, common, &branch, cseq);
                let _ = self.socket.send_to(tx, registrar);
                s.register_retransmits += 1;
            }
        }
        if self.pending.is_none() && self.next_register.is_some_and(|at| now >= at) {
            self.cseq += 1;
            let branch = format!("{BRANCH_COOKIE}-{:016x}-{}", self.rng.next_u64(), self.cseq);
            self.write_register(tx, common, &branch, self.cseq);
            let _ = self.socket.send_to(tx, registrar);
            s.register_sent += 1;
            self.pending = Some(Pending {
                branch,
                cseq: self.cseq,
                retx_at: now + T1,
                retx_interval: T1,
                give_up_at: now + TIMER_F,
            });
            self.next_register = None;
        }
        match &self.pending {
            Some(p) => Some(p.retx_at.min(p.give_up_at)),
            None => self.next_register,
        }
    }

    fn write_register(&self, tx: &mut Vec<u8>, common: &Common, branch: &str, cseq: u32) {
        let mut m = String::with_capacity(512);
        let _ = write!(
            m,
            "REGISTER {ruri} SIP/2.0\r\n\
Via: SIP/2.0/UDP {local};branch={branch};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:{user}@{domain}>;tag={tag}\r\n\
To: <sip:{user}@{domain}>\r\n\
Call-ID: {call_id}\r\n\
CSeq: {cseq} REGISTER\r\n\
Contact: <{contact}>\r\n\
Expires: {expires}\r\n\
User-Agent: {server}\r\n\
Content-Length: 0\r\n\r\n",
            ruri = common.register_ruri,
            local = hostport_text(self.local),
            user = self.user,
            domain = common.domain,
            tag = self.from_tag,
            call_id = self.call_id,
            contact = self.contact,
            expires = common.expires,
            server = self.server,
        );
        tx.clear();
        tx.extend_from_slice(m.as_bytes());
    }

    fn datagram(
        &mut self,
        d: &[u8],
        from: SocketAddr,
        common: &Common,
        tx: &mut Vec<u8>,
        s: &mut Summary,
    ) {
        if sipmsg::is_keepalive(d) {
            s.keepalives += 1;
            return;
        }
        if let Some(code) = sipmsg::status_code(d) {
            self.response(code, d, common, s);
            return;
        }
        let req = match request::parse(d) {
            Ok(r) => r,
            Err(_) => {
                s.unparsable += 1;
                return;
            }
        };
        let method = String::from_utf8_lossy(req.method);
        *s.requests.entry(method.into_owned()).or_default() += 1;
        self.requests += 1;
        self.last_request = Some(Instant::now());
        if req.method == b"ACK" {
            return; // §17.1.1.3: never answered
        }
        // The top via-parm: the first element of the first Via line.
        let top = std::str::from_utf8(req.vias()[0])
            .ok()
            .and_then(|v| sipmsg::split_list(v).first().copied())
            .and_then(sipmsg::parse_via);
        let Some(top) = top else {
            s.unparsable += 1;
            return;
        };
        let dest = sipmsg::reply_destination(&top, from, common.reply_to_source);
        let code = if req.method == b"INVITE" { 486 } else { 200 };
        tx.clear();
        tx.resize(DATAGRAM_MAX, 0);
        let params = ReplyParams {
            code,
            to_tag: &self.to_tag,
            source: from,
            malform: None,
        };
        let Some(n) = request::write_reply(&req, &params, tx) else {
            s.unparsable += 1;
            return;
        };
        // The writer ends with the empty line: put our Server header before it.
        tx.truncate(n - 2);
        tx.extend_from_slice(b"Server: ");
        tx.extend_from_slice(self.server.as_bytes());
        tx.extend_from_slice(b"\r\n\r\n");
        match self.socket.send_to(tx, dest) {
            Ok(_) => s.replies_sent += 1,
            Err(_) => s.reply_send_errors += 1,
        }
    }

    fn response(&mut self, code: u16, d: &[u8], common: &Common, s: &mut Summary) {
        let Ok(msg) = std::str::from_utf8(d) else {
            s.unparsable += 1;
            return;
        };
        let matches = self.pending.as_ref().is_some_and(|p| {
            sipmsg::header(msg, "call-id", Some("i")) == Some(self.call_id.as_str())
                && sipmsg::header(msg, "cseq", None).and_then(sipmsg::parse_cseq)
                    == Some((p.cseq, "REGISTER"))
                && sipmsg::top_via(msg).and_then(|v| v.branch) == Some(p.branch.as_str())
        });
        if !matches {
            s.stray_responses += 1;
            return;
        }
        let now = Instant::now();
        if code < 200 {
            // §17.1.2.2 Proceeding: keep retransmitting, at T2.
            if let Some(p) = self.pending.as_mut() {
                p.retx_interval = T2;
                p.retx_at = now + T2;
            }
            return;
        }
        self.pending = None;
        if (200..300).contains(&code) {
            // A registrar that says nothing granted what was asked.
            let granted = sipmsg::granted_expires(msg, &self.contact).unwrap_or(common.expires);
            if granted > 0 {
                s.register_ok += 1;
                self.registered = true;
                self.ever_registered = true;
                let frac = 0.5 + 0.3 * self.rng.unit();
                self.next_register =
                    Some(now + Duration::from_secs(u64::from(granted)).mul_f64(frac));
                return;
            }
            // Expires 0: not registered after all.
        }
        s.register_failed += 1;
        self.registered = false;
        self.next_register = Some(now + REGISTER_RETRY);
    }
}
