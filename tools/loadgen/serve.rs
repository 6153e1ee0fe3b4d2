//! The responder (`serve`): threads that answer every SIP request from the
//! exact address that was pinged, with configurable fates and noise.
//!
//! Ownership: each thread owns one socket per listen port (all threads join
//! each port's `SO_REUSEPORT` group, so the kernel spreads contacts over
//! threads), one [`RecvBatch`], one [`SendBatch`] per socket, a scratch
//! buffer, a [`DelayQueue`], its [`Rng`] and its [`Counters`]. Nothing is
//! shared between threads but the read-only configuration and the stop flag;
//! counters are summed after the threads are joined.
//!
//! Per datagram: no allocation, no system call, no formatting. System calls
//! are per batch (one `recvmmsg` per socket, one `sendmmsg` per socket with
//! replies). A thread with nothing to do blocks in the kernel (a `MSG_PEEK`
//! with `SO_RCVTIMEO` for a single socket; helper threads that peek and unpark
//! it for several) until a datagram arrives or the next delayed reply is due,
//! so an idle responder costs nothing and adds no polling delay.
//!
//! Caution: with `--threads` > 1 the sockets join a `SO_REUSEPORT` group,
//! and Linux lets any process of the same user join it by binding the same
//! port with the option set; such a process would silently take a share of
//! the traffic. Give each responder its own ports.
//!
//! Delayed replies (`--latency`, `--latency-dist`) are copied into a
//! preallocated slot pool ordered by a min-heap of due times preallocated to
//! the same capacity: a bounded timer structure, flushed on time; a reply
//! that finds the pool full is sent at once and counted (`delay_overflow`).
//!
//! Caller: `main` (`serve` subcommand) and, as a child process, `ceiling`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, Thread};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kaping::io::udp::{bind_udp, RecvBatch, SendBatch, SocketOptions};
use serde::Serialize;
use socket2::Socket;

use crate::fate::{to_tag, Fate, FatePlan, LatencyDist, Rng};
use crate::sip::{self, Malform, ReplyParams};

/// Datagrams per `recvmmsg`/`sendmmsg`.
pub const BATCH: usize = 64;
/// Largest datagram handled; a longer one arrives truncated and is unparsable
/// (RFC 3261 §18.1.1 keeps UDP requests under the path MTU anyway).
pub const DATAGRAM_MAX: usize = 2048;
/// Longest a thread blocks before looking at the stop flag again.
const IDLE_MAX_NS: u64 = 100_000_000;
/// Below this wait, yielding beats arming a kernel timeout.
const SPIN_NS: u64 = 20_000;
/// Longest reply delay accepted: held replies occupy pool slots, so a delay
/// this long would only measure the pool size.
const DELAY_MAX_NS: u64 = 60_000_000_000;
/// `sendmmsg` rounds tried on a full socket buffer before the rest of a
/// batch is dropped and counted.
const SEND_RETRIES: u32 = 1000;

/// One `--listen` argument: an address and the last port of its range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenSpec {
    pub addr: SocketAddr,
    pub last_port: u16,
}

impl ListenSpec {
    /// `0.0.0.0:5060`, `0.0.0.0:5060-5069`, `[::]:5060-5061`, `127.0.0.1:0`.
    pub fn parse(s: &str) -> Result<ListenSpec, String> {
        let colon = s
            .rfind(':')
            .ok_or_else(|| format!("--listen {s:?}: expected ADDR:PORT[-LASTPORT]"))?;
        let (host, ports) = (&s[..colon], &s[colon + 1..]);
        let (first, last) = match ports.split_once('-') {
            Some((a, b)) => (a, Some(b)),
            None => (ports, None),
        };
        let ip: IpAddr = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("--listen {s:?}: {host:?} is not an IP address"))?;
        let port: u16 = first
            .parse()
            .map_err(|_| format!("--listen {s:?}: bad port {first:?}"))?;
        let last_port = match last {
            None => port,
            Some(l) => {
                let l: u16 = l
                    .parse()
                    .map_err(|_| format!("--listen {s:?}: bad last port {l:?}"))?;
                if l < port || port == 0 {
                    return Err(format!(
                        "--listen {s:?}: the range must be PORT-LASTPORT with 0 < PORT <= LASTPORT"
                    ));
                }
                l
            }
        };
        Ok(ListenSpec {
            addr: SocketAddr::new(ip, port),
            last_port,
        })
    }
}

/// Per-packet noise (not stable per contact).
#[derive(Clone, Copy, Debug)]
pub struct Noise {
    pub loss: f64,
    pub malformed: f64,
    pub duplicate: f64,
    pub latency_ns: u64,
    pub dist: LatencyDist,
}

impl Noise {
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("--loss", self.loss),
            ("--malformed", self.malformed),
            ("--duplicate", self.duplicate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} {v} is not a fraction in [0, 1]"));
            }
        }
        if self.latency_ns.saturating_add(self.dist.max_ns()) > DELAY_MAX_NS {
            return Err(format!(
                "--latency plus --latency-dist can reach {} ms; the limit is {} ms",
                self.latency_ns.saturating_add(self.dist.max_ns()) / 1_000_000,
                DELAY_MAX_NS / 1_000_000
            ));
        }
        Ok(())
    }

    fn delays(&self) -> bool {
        self.latency_ns > 0 || self.dist != LatencyDist::None
    }
}

/// Everything `serve` needs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: Vec<ListenSpec>,
    pub threads: usize,
    pub raw_echo: bool,
    pub plan: FatePlan,
    pub noise: Noise,
    pub seed: u64,
    pub seconds: Option<f64>,
    pub stop_on_stdin_eof: bool,
    pub recv_buffer_bytes: usize,
    pub send_buffer_bytes: usize,
    /// Delayed replies each thread can hold.
    pub delay_slots: usize,
}

/// What a responder did. `answered` counts requests that got a response
/// (including error codes and malformed ones); `duplicates` counts the extra
/// copies sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub received: u64,
    pub answered: u64,
    pub dead_dropped: u64,
    pub flap_silent: u64,
    pub lost: u64,
    pub errors_sent: u64,
    pub malformed_sent: u64,
    pub duplicates: u64,
    pub unparsable: u64,
    pub acks_ignored: u64,
    pub delayed: u64,
    pub delay_overflow: u64,
    pub send_errors: u64,
    pub send_dropped: u64,
    pub pending_at_exit: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        for (a, b) in self.fields_mut().into_iter().zip(o.fields()) {
            *a += b.1;
        }
    }

    /// Names and values in declaration order (the text report).
    pub fn fields(&self) -> [(&'static str, u64); 15] {
        [
            ("received", self.received),
            ("answered", self.answered),
            ("dead_dropped", self.dead_dropped),
            ("flap_silent", self.flap_silent),
            ("lost", self.lost),
            ("errors_sent", self.errors_sent),
            ("malformed_sent", self.malformed_sent),
            ("duplicates", self.duplicates),
            ("unparsable", self.unparsable),
            ("acks_ignored", self.acks_ignored),
            ("delayed", self.delayed),
            ("delay_overflow", self.delay_overflow),
            ("send_errors", self.send_errors),
            ("send_dropped", self.send_dropped),
            ("pending_at_exit", self.pending_at_exit),
        ]
    }

    fn fields_mut(&mut self) -> [&mut u64; 15] {
        [
            &mut self.received,
            &mut self.answered,
            &mut self.dead_dropped,
            &mut self.flap_silent,
            &mut self.lost,
            &mut self.errors_sent,
            &mut self.malformed_sent,
            &mut self.duplicates,
            &mut self.unparsable,
            &mut self.acks_ignored,
            &mut self.delayed,
            &mut self.delay_overflow,
            &mut self.send_errors,
            &mut self.send_dropped,
            &mut self.pending_at_exit,
        ]
    }
}

/// A delayed reply's metadata; its bytes live in the pool slot of the same
/// index.
#[derive(Clone, Copy, Debug)]
struct Delayed {
    len: u16,
    sock: u16,
    copies: u8,
    dest: SocketAddr,
    src: Option<IpAddr>,
}

/// Bounded timer structure for delayed replies: a slot pool plus a min-heap
/// of `(due_ns, slot)`, both allocated to `capacity` up front. The heap never
/// holds more entries than there are slots, so it never reallocates.
struct DelayQueue {
    heap: BinaryHeap<Reverse<(u64, u32)>>,
    free: Vec<u32>,
    bytes: Box<[u8]>,
    meta: Box<[Delayed]>,
}

impl DelayQueue {
    fn new(capacity: usize) -> DelayQueue {
        assert!(capacity <= u32::MAX as usize);
        let blank = Delayed {
            len: 0,
            sock: 0,
            copies: 0,
            dest: SocketAddr::from(([0, 0, 0, 0], 0)),
            src: None,
        };
        DelayQueue {
            heap: BinaryHeap::with_capacity(capacity),
            free: (0..capacity as u32).rev().collect(),
            bytes: vec![0u8; capacity * DATAGRAM_MAX].into_boxed_slice(),
            meta: vec![blank; capacity].into_boxed_slice(),
        }
    }

    fn len(&self) -> usize {
        self.heap.len()
    }

    /// Queues a reply; false when the pool is full.
    fn push(&mut self, due_ns: u64, data: &[u8], meta: Delayed) -> bool {
        debug_assert!(data.len() <= DATAGRAM_MAX && usize::from(meta.len) == data.len());
        let Some(slot) = self.free.pop() else {
            return false;
        };
        let at = slot as usize * DATAGRAM_MAX;
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self.meta[slot as usize] = meta;
        debug_assert!(self.heap.len() < self.heap.capacity());
        self.heap.push(Reverse((due_ns, slot)));
        true
    }

    fn next_due_ns(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((due, _))| *due)
    }

    /// Pops the earliest reply if it is due at `now_ns`.
    fn pop_due(&mut self, now_ns: u64) -> Option<u32> {
        match self.heap.peek() {
            Some(Reverse((due, _))) if *due <= now_ns => self.heap.pop().map(|Reverse((_, s))| s),
            _ => None,
        }
    }

    fn get(&self, slot: u32) -> (&Delayed, &[u8]) {
        let m = &self.meta[slot as usize];
        let at = slot as usize * DATAGRAM_MAX;
        (m, &self.bytes[at..at + usize::from(m.len)])
    }

    fn release(&mut self, slot: u32) {
        debug_assert!(self.free.len() < self.free.capacity());
        self.free.push(slot);
    }
}

/// Wakes a thread that serves several sockets: one helper per socket blocks
/// in `MSG_PEEK` while the worker is idle and unparks it when data arrives.
struct Doorbell {
    worker: Thread,
    /// Bumped each time the worker goes idle; helpers wait for a new epoch
    /// before peeking again (so they sleep while the worker is busy).
    idle_epoch: Mutex<u64>,
    idle: Condvar,
}

fn doorbell_helper(bell: Arc<Doorbell>, sock: Socket, stop: Arc<AtomicBool>) {
    let _ = sock.set_read_timeout(Some(Duration::from_nanos(IDLE_MAX_NS)));
    let mut seen = 0u64;
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    while !stop.load(Ordering::Relaxed) {
        {
            let mut epoch = bell.idle_epoch.lock().unwrap_or_else(|e| e.into_inner());
            while *epoch == seen && !stop.load(Ordering::Relaxed) {
                epoch = bell
                    .idle
                    .wait_timeout(epoch, Duration::from_nanos(IDLE_MAX_NS))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            seen = *epoch;
        }
        // Blocks until a datagram is queued (or the timeout, to see `stop`).
        while !stop.load(Ordering::Relaxed) {
            match sock.peek(&mut byte) {
                Ok(_) => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => break,
            }
        }
        bell.worker.unpark();
    }
}

struct Worker {
    index: usize,
    socks: Vec<Socket>,
    sends: Vec<SendBatch>,
    recv: RecvBatch,
    scratch: Box<[u8]>,
    delay: DelayQueue,
    rng: Rng,
    counters: Counters,
    cfg: Arc<ServeConfig>,
    stop: Arc<AtomicBool>,
    epoch: Instant,
    /// The `SO_RCVTIMEO` currently set on the single socket.
    timeout_ns: u64,
    bell: Option<Arc<Doorbell>>,
}

impl Worker {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn run(mut self) -> Counters {
        if self.socks.len() > 1 {
            let bell = Arc::new(Doorbell {
                worker: thread::current(),
                idle_epoch: Mutex::new(0),
                idle: Condvar::new(),
            });
            for (k, s) in self.socks.iter().enumerate() {
                match s.try_clone() {
                    Ok(dup) => {
                        let (b, stop) = (bell.clone(), self.stop.clone());
                        let spawned = thread::Builder::new()
                            .name(format!("serve-{}-bell-{k}", self.index))
                            .spawn(move || doorbell_helper(b, dup, stop));
                        if let Err(e) = spawned {
                            eprintln!("kaping-loadgen: cannot start a doorbell thread: {e}");
                        }
                    }
                    Err(e) => eprintln!("kaping-loadgen: cannot dup a socket: {e}"),
                }
            }
            self.bell = Some(bell);
        }
        while !self.stop.load(Ordering::Relaxed) {
            let now_ns = self.now_ns();
            let mut busy = self.flush_delayed(now_ns);
            for k in 0..self.socks.len() {
                busy |= self.serve_socket(k);
            }
            for k in 0..self.socks.len() {
                self.flush_sends(k);
            }
            if !busy {
                self.idle_wait();
            }
        }
        self.counters.pending_at_exit +=
            self.delay.len() as u64 + self.sends.iter().map(|s| s.pending() as u64).sum::<u64>();
        if let Some(bell) = &self.bell {
            bell.idle.notify_all();
        }
        self.counters
    }

    /// Blocks until a datagram arrives or the next delayed reply is due.
    fn idle_wait(&mut self) {
        let now_ns = self.now_ns();
        let wait_ns = self
            .delay
            .next_due_ns()
            .map_or(IDLE_MAX_NS, |due| due.saturating_sub(now_ns))
            .min(IDLE_MAX_NS);
        if wait_ns < SPIN_NS {
            thread::yield_now();
            return;
        }
        match &self.bell {
            None => {
                // Re-arm the timeout only when it changes enough to matter.
                if wait_ns.abs_diff(self.timeout_ns) > wait_ns / 8
                    && self.socks[0]
                        .set_read_timeout(Some(Duration::from_nanos(wait_ns)))
                        .is_ok()
                {
                    self.timeout_ns = wait_ns;
                }
                let mut byte = [MaybeUninit::<u8>::uninit(); 1];
                let _ = self.socks[0].peek(&mut byte);
            }
            Some(bell) => {
                {
                    let mut epoch = bell.idle_epoch.lock().unwrap_or_else(|e| e.into_inner());
                    *epoch += 1;
                }
                bell.idle.notify_all();
                thread::park_timeout(Duration::from_nanos(wait_ns));
            }
        }
    }

    /// Sends every delayed reply that is due; true if any was.
    fn flush_delayed(&mut self, now_ns: u64) -> bool {
        let mut any = false;
        while let Some(slot) = self.delay.pop_due(now_ns) {
            any = true;
            let (m, _) = self.delay.get(slot);
            let (sock, copies, dest, src) = (usize::from(m.sock), m.copies, m.dest, m.src);
            for _ in 0..copies {
                if self.sends[sock].is_full() {
                    self.flush_sends(sock);
                }
                let (_, data) = self.delay.get(slot);
                if !self.sends[sock].push(data, &dest, src) {
                    self.counters.send_dropped += 1;
                }
            }
            self.delay.release(slot);
        }
        any
    }

    /// Sends what socket `k`'s batch holds; retries a full socket buffer a
    /// bounded number of times, then drops and counts the rest.
    fn flush_sends(&mut self, k: usize) {
        let fd = self.socks[k].as_raw_fd();
        let mut rounds = 0;
        let mut errors = 0u64;
        while self.sends[k].pending() > 0 {
            let out = self.sends[k].send(fd, |_, _| errors += 1);
            if out.blocked == 0 {
                break;
            }
            rounds += 1;
            if rounds == SEND_RETRIES {
                self.counters.send_dropped += out.blocked as u64;
                self.sends[k].clear();
                break;
            }
            thread::yield_now();
        }
        self.counters.send_errors += errors;
    }

    /// One `recvmmsg` on socket `k` and the replies; true if it got datagrams.
    fn serve_socket(&mut self, k: usize) -> bool {
        let fd = self.socks[k].as_raw_fd();
        let n = match self.recv.recv(fd) {
            Ok(n) => n,
            Err(_) => return true, // a transient error: look again at once
        };
        if n == 0 {
            return false;
        }
        let now_ns = self.now_ns();
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for i in 0..n {
            self.counters.received += 1;
            let d = self.recv.get(i);
            let Some(from) = d.from else {
                self.counters.unparsable += 1;
                continue;
            };
            // The pinged address (IP_PKTINFO): the reply leaves from it.
            let src = d.to;
            let (len, copies, delay_ns) = if self.cfg.raw_echo {
                if d.truncated {
                    self.counters.unparsable += 1;
                    continue;
                }
                self.scratch[..d.data.len()].copy_from_slice(d.data);
                (d.data.len(), 1, 0)
            } else {
                match answer(
                    &self.cfg,
                    &mut self.rng,
                    &mut self.counters,
                    d.data,
                    d.truncated,
                    from,
                    unix_ms,
                    &mut self.scratch,
                ) {
                    Some(r) => r,
                    None => continue,
                }
            };
            self.counters.answered += 1;
            self.counters.duplicates += u64::from(copies - 1);
            let reply = &self.scratch[..len];
            if delay_ns > 0 {
                let meta = Delayed {
                    len: len as u16,
                    sock: k as u16,
                    copies,
                    dest: from,
                    src,
                };
                if self.delay.push(now_ns + delay_ns, reply, meta) {
                    self.counters.delayed += 1;
                    continue;
                }
                self.counters.delay_overflow += 1;
            }
            for _ in 0..copies {
                if self.sends[k].is_full() {
                    self.flush_sends(k);
                }
                if !self.sends[k].push(&self.scratch[..len], &from, src) {
                    self.counters.send_dropped += 1;
                }
            }
        }
        true
    }
}

/// Decides and writes the reply to one request into `scratch`; returns
/// `(length, copies, delay_ns)` or `None` when nothing is to be sent (the
/// reason is counted).
#[allow(clippy::too_many_arguments)]
#[inline]
fn answer(
    cfg: &ServeConfig,
    rng: &mut Rng,
    c: &mut Counters,
    data: &[u8],
    truncated: bool,
    from: SocketAddr,
    unix_ms: u64,
    scratch: &mut [u8],
) -> Option<(usize, u8, u64)> {
    if truncated {
        c.unparsable += 1;
        return None;
    }
    let req = match sip::parse(data) {
        Ok(r) => r,
        Err(_) => {
            c.unparsable += 1;
            return None;
        }
    };
    // RFC 3261 §17.1.1.3 / §17.2.1: an ACK is never answered.
    if req.method == b"ACK" {
        c.acks_ignored += 1;
        return None;
    }
    let hash = cfg.plan.contact_hash(req.uri);
    let code = match cfg.plan.fate(hash) {
        Fate::Dead => {
            c.dead_dropped += 1;
            return None;
        }
        Fate::Flap { phase_ms } if !cfg.plan.flap_answers(phase_ms, unix_ms) => {
            c.flap_silent += 1;
            return None;
        }
        Fate::Error(code) => code,
        Fate::Ok | Fate::Flap { .. } => 200,
    };
    let noise = &cfg.noise;
    if rng.chance(noise.loss) {
        c.lost += 1;
        return None;
    }
    let tag = to_tag(hash);
    let malform = if rng.chance(noise.malformed) {
        c.malformed_sent += 1;
        match rng.below(4) {
            0 => {
                // Garbage: random bytes that cannot be mistaken for SIP.
                let len = 16 + rng.below(240) as usize;
                for chunk in scratch[..len].chunks_mut(8) {
                    let r = rng.next_u64().to_le_bytes();
                    chunk.copy_from_slice(&r[..chunk.len()]);
                }
                scratch[0] = 0xff;
                if code != 200 {
                    c.errors_sent += 1;
                }
                return Some((len, copies(rng, noise), delay_ns(rng, noise)));
            }
            1 => Some(Malform::Truncated),
            2 => Some(Malform::NoFrom),
            _ => Some(Malform::BadTag),
        }
    } else {
        None
    };
    let params = ReplyParams {
        code,
        to_tag: &tag,
        source: from,
        malform,
    };
    let Some(len) = sip::write_reply(&req, &params, scratch) else {
        c.unparsable += 1; // the response would not fit a datagram
        return None;
    };
    if code != 200 {
        c.errors_sent += 1;
    }
    Some((len, copies(rng, noise), delay_ns(rng, noise)))
}

#[inline]
fn copies(rng: &mut Rng, noise: &Noise) -> u8 {
    if rng.chance(noise.duplicate) {
        2
    } else {
        1
    }
}

#[inline]
fn delay_ns(rng: &mut Rng, noise: &Noise) -> u64 {
    noise.latency_ns + noise.dist.sample_ns(rng)
}

/// Binds every socket: for each listen port, one socket per thread in one
/// `SO_REUSEPORT` group. Returns the sockets per thread and the bound
/// addresses (port 0 resolved).
fn bind_all(cfg: &ServeConfig) -> Result<(Vec<Vec<Socket>>, Vec<SocketAddr>), String> {
    let opts = SocketOptions {
        recv_buffer_bytes: cfg.recv_buffer_bytes,
        send_buffer_bytes: cfg.send_buffer_bytes,
        reuse_port: cfg.threads > 1,
        pktinfo: true,
        timestamps: false,
        recv_errors: false,
        // Blocking, so the idle MSG_PEEK waits; recvmmsg/sendmmsg pass
        // MSG_DONTWAIT and never block.
        nonblocking: false,
    };
    let mut per_thread: Vec<Vec<Socket>> = (0..cfg.threads).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    let mut clamp_reported = false;
    for spec in &cfg.listen {
        for port in spec.addr.port()..=spec.last_port {
            let mut addr = SocketAddr::new(spec.addr.ip(), port);
            for (t, socks) in per_thread.iter_mut().enumerate() {
                let (sock, report) =
                    bind_udp(addr, &opts).map_err(|e| format!("cannot bind {addr}: {e}"))?;
                if t == 0 {
                    // Port 0: the other threads join the port the kernel chose.
                    addr = sock
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .unwrap_or(addr);
                    bound.push(addr);
                }
                if (report.recv_clamped || report.send_clamped) && !clamp_reported {
                    clamp_reported = true;
                    eprintln!(
                        "kaping-loadgen: socket buffers clamped by the kernel (rcvbuf {} sndbuf {} bytes); raise net.core.rmem_max/wmem_max",
                        report.recv_buffer_bytes, report.send_buffer_bytes
                    );
                }
                socks.push(sock);
            }
        }
    }
    assert!(
        bound.len() <= usize::from(u16::MAX),
        "too many listen ports"
    );
    Ok((per_thread, bound))
}

/// Runs the responder until `--seconds` elapse or stdin closes (with
/// `--stop-on-stdin-eof`); prints `listening ADDR` lines and `ready` on
/// stderr once every socket is bound. Returns the summed counters.
pub fn run(cfg: ServeConfig) -> Result<Counters, String> {
    if cfg.threads == 0 {
        return Err("--threads must be at least 1".to_string());
    }
    if cfg.listen.is_empty() {
        return Err("at least one --listen ADDR[-LASTPORT] is needed".to_string());
    }
    cfg.noise.validate()?;
    let delay_slots = if cfg.noise.delays() && !cfg.raw_echo {
        if cfg.delay_slots == 0 {
            return Err("--latency needs --delay-slots > 0".to_string());
        }
        cfg.delay_slots
    } else {
        0
    };
    let (per_thread, bound) = bind_all(&cfg)?;
    for a in &bound {
        eprintln!("listening {a}");
    }
    eprintln!("ready");

    let cfg = Arc::new(cfg);
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for (index, socks) in per_thread.into_iter().enumerate() {
        let sends = socks
            .iter()
            .map(|_| SendBatch::new(BATCH, DATAGRAM_MAX))
            .collect();
        let worker = Worker {
            index,
            socks,
            sends,
            recv: RecvBatch::new(BATCH, DATAGRAM_MAX),
            scratch: vec![0u8; DATAGRAM_MAX].into_boxed_slice(),
            delay: DelayQueue::new(delay_slots),
            rng: Rng::new(cfg.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            counters: Counters::default(),
            cfg: cfg.clone(),
            stop: stop.clone(),
            epoch: Instant::now(),
            timeout_ns: 0,
            bell: None,
        };
        let h = thread::Builder::new()
            .name(format!("serve-{index}"))
            .spawn(move || worker.run())
            .map_err(|e| format!("cannot start thread: {e}"))?;
        handles.push(h);
    }

    if cfg.stop_on_stdin_eof {
        let stop = stop.clone();
        // Detached: it may still be blocked in read when the process exits.
        let _ = thread::Builder::new()
            .name("stdin-eof".to_string())
            .spawn(move || {
                let mut sink = [0u8; 256];
                let mut stdin = io::stdin().lock();
                while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
                stop.store(true, Ordering::Relaxed);
            });
    }
    let deadline = cfg
        .seconds
        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    while !stop.load(Ordering::Relaxed) {
        let mut nap = Duration::from_millis(20);
        if let Some(d) = deadline {
            let now = Instant::now();
            if now >= d {
                break;
            }
            nap = nap.min(d - now);
        }
        thread::sleep(nap);
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = Counters::default();
    for h in handles {
        match h.join() {
            Ok(c) => total.add(&c),
            Err(_) => return Err("a responder thread panicked".to_string()),
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs_parse() {
        assert_eq!(
            ListenSpec::parse("0.0.0.0:5060").unwrap(),
            ListenSpec {
                addr: "0.0.0.0:5060".parse().unwrap(),
                last_port: 5060
            }
        );
        assert_eq!(
            ListenSpec::parse("[::]:5060-5069").unwrap(),
            ListenSpec {
                addr: "[::]:5060".parse().unwrap(),
                last_port: 5069
            }
        );
        assert!(ListenSpec::parse("0.0.0.0:5060-5000").is_err());
        assert!(ListenSpec::parse("0.0.0.0:0-5").is_err());
        assert!(ListenSpec::parse("localhost:5060").is_err());
        assert!(ListenSpec::parse("5060").is_err());
    }

    #[test]
    fn delay_queue_releases_in_due_order_and_is_bounded() {
        let mut q = DelayQueue::new(3);
        let capacity = q.heap.capacity();
        let meta = |len| Delayed {
            len,
            sock: 0,
            copies: 1,
            dest: "127.0.0.1:1".parse().unwrap(),
            src: None,
        };
        assert!(q.push(30, b"c", meta(1)));
        assert!(q.push(10, b"a", meta(1)));
        assert!(q.push(20, b"bb", meta(2)));
        assert!(!q.push(5, b"d", meta(1)), "full");
        assert_eq!(q.next_due_ns(), Some(10));
        assert_eq!(q.pop_due(9), None);
        let mut got = Vec::new();
        while let Some(s) = q.pop_due(25) {
            got.push(q.get(s).1.to_vec());
            q.release(s);
        }
        assert_eq!(got, vec![b"a".to_vec(), b"bb".to_vec()]);
        assert!(q.push(1, b"e", meta(1)));
        assert_eq!(q.len(), 2);
        assert_eq!(q.heap.capacity(), capacity, "never reallocated");
    }

    #[test]
    fn counters_add_fieldwise() {
        let mut a = Counters {
            received: 1,
            pending_at_exit: 2,
            ..Counters::default()
        };
        a.add(&a.clone());
        assert_eq!((a.received, a.pending_at_exit, a.answered), (2, 4, 0));
    }
}
