//! The simulated platform's responder: threads that answer every SIP request
//! from the exact address that was pinged, with configurable fates and noise.
//! [`Responder::spawn`] runs it in-process (`kaping demo`); `kaping-loadgen
//! serve` is a thin command line over the same call.
//!
//! Ownership: each thread owns one socket per listen port (all threads join
//! each port's `SO_REUSEPORT` group, so the kernel spreads contacts over
//! threads), one [`RecvBatch`], one [`SendBatch`] per socket, a scratch
//! buffer, a [`DelayQueue`], its [`Rng`] and its [`Counters`]. Shared between
//! threads are only the read-only configuration, the stop flag, one eventfd
//! [`Waker`] (written once, by [`Responder::stop`]) and one cache-line padded
//! block of atomics per thread into which that thread alone publishes its
//! counters after every round of batches ([`Responder::counters`] sums them).
//!
//! Per datagram: no allocation, no system call, no formatting. System calls
//! are per batch: one `recvmmsg` per readable socket, one `sendmmsg` per
//! socket with replies. A thread with nothing to receive sleeps in one
//! `ppoll` ([`wait_readable`]) over all its sockets and the waker, until a
//! datagram arrives, the earliest delayed reply is due, or it is stopped; so
//! an idle responder costs nothing, adds no polling delay and stops at once.
//! A socket whose last `recvmmsg` filled a whole batch is read again without
//! polling (more is very likely queued); one that returned less is drained
//! and waits for `ppoll` to report it again. Hence at most
//! [`SOCKETS_PER_THREAD_MAX`] listen ports (`ppoll` here takes 64
//! descriptors, one of which is the waker).
//!
//! Stopping: in-process users call [`Responder::stop`] (or drop the
//! responder); the process-wide signal flag is never consulted here, so a
//! demo's responder does not stop because the daemon half got SIGINT before
//! it printed its summary. The CLI maps its signals to `stop` itself.
//!
//! Caution: with `threads` > 1 the sockets join a `SO_REUSEPORT` group,
//! and Linux lets any process of the same user join it by binding the same
//! port with the option set; such a process would silently take a share of
//! the traffic. Give each responder its own ports.
//!
//! Delayed replies (`latency_ns`, `dist`) are copied into a preallocated slot
//! pool ordered by a min-heap of due times preallocated to the same capacity:
//! a bounded timer structure, flushed on time; a reply that finds the pool
//! full is sent at once and counted (`delay_overflow`).
//!
//! Never panics on any input datagram; never allocates after `spawn`.
//! Callers: `kaping demo` and `kaping-loadgen serve` (also as the child of
//! `kaping-loadgen ceiling`).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam::utils::CachePadded;
use serde::Serialize;
use socket2::Socket;

use super::fate::{to_tag, Fate, FatePlan, LatencyDist, Rng};
use super::request::{self, Malform, ReplyParams};
use crate::io::udp::{bind_udp, wait_readable, RecvBatch, SendBatch, SocketOptions, SocketReport};
use crate::io::waker::Waker;

/// Datagrams per `recvmmsg`/`sendmmsg`.
pub const BATCH: usize = 64;
/// Largest datagram handled; a longer one arrives truncated and is unparsable
/// (RFC 3261 §18.1.1 keeps UDP requests under the path MTU anyway).
pub const DATAGRAM_MAX: usize = 2048;
/// Sockets one thread serves: one per listen port, all waited on in one
/// `ppoll` of at most 64 descriptors together with the waker.
pub const SOCKETS_PER_THREAD_MAX: usize = 63;
/// Longest a thread sleeps without looking at the stop flag: a backstop only,
/// since `stop` also wakes it through the eventfd.
const IDLE_MAX_NS: u64 = 100_000_000;
/// Below this wait for a delayed reply, `ppoll` is called with a zero
/// timeout (a timer this short would only add the kernel's timer slack).
const SPIN_NS: u64 = 20_000;
/// Longest reply delay accepted: held replies occupy pool slots, so a delay
/// this long would only measure the pool size.
const DELAY_MAX_NS: u64 = 60_000_000_000;
/// `sendmmsg` rounds tried on a full socket buffer before the rest of a
/// batch is dropped and counted.
const SEND_RETRIES: u32 = 1000;
/// Number of fields of [`Counters`].
const COUNTER_FIELDS: usize = 15;

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

/// Per-packet noise (not stable per contact). The default is none.
#[derive(Clone, Copy, Debug)]
pub struct Noise {
    /// Fraction of requests dropped at random.
    pub loss: f64,
    /// Fraction of replies replaced by a malformed variant.
    pub malformed: f64,
    /// Fraction of replies sent twice.
    pub duplicate: f64,
    /// Fixed delay added to every reply.
    pub latency_ns: u64,
    /// Random delay added on top.
    pub dist: LatencyDist,
}

impl Default for Noise {
    fn default() -> Noise {
        Noise {
            loss: 0.0,
            malformed: 0.0,
            duplicate: 0.0,
            latency_ns: 0,
            dist: LatencyDist::None,
        }
    }
}

impl Noise {
    /// Fractions in `[0, 1]`; the longest delay at most 60 s.
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

/// Everything a responder needs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Addresses and port ranges to answer on (port 0: the kernel picks).
    pub listen: Vec<ListenSpec>,
    /// Responder threads, each with its own socket per port.
    pub threads: usize,
    /// Echo every datagram back unparsed (the raw UDP ceiling).
    pub raw_echo: bool,
    /// Stable per-contact fates.
    pub plan: FatePlan,
    /// Per-packet noise.
    pub noise: Noise,
    /// Seed of the per-thread generators (thread `t` mixes in `t`).
    pub seed: u64,
    /// Requested `SO_RCVBUF` per socket, bytes (0: the kernel default).
    pub recv_buffer_bytes: usize,
    /// Requested `SO_SNDBUF` per socket, bytes (0: the kernel default).
    pub send_buffer_bytes: usize,
    /// Delayed replies each thread can hold ([`DATAGRAM_MAX`] bytes each,
    /// allocated only when the noise delays replies).
    pub delay_slots: usize,
}

impl ServeConfig {
    /// One thread answering on `listen` with the fates of `plan`, no noise,
    /// 4 MiB socket buffers and 16384 delay slots (the CLI's defaults).
    pub fn new(listen: Vec<ListenSpec>, plan: FatePlan) -> ServeConfig {
        ServeConfig {
            listen,
            threads: 1,
            raw_echo: false,
            plan,
            noise: Noise::default(),
            seed: 0,
            recv_buffer_bytes: 4 << 20,
            send_buffer_bytes: 4 << 20,
            delay_slots: 16384,
        }
    }
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
    /// Adds `o` field by field.
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

/// One thread's published counters: stored by that thread alone after each
/// round of batches (plain relaxed stores of its private totals, no
/// read-modify-write), loaded by [`Responder::counters`]. Padded to its own
/// cache lines so publishing never contends with another thread's block.
struct LiveCounters([AtomicU64; COUNTER_FIELDS]);

impl LiveCounters {
    fn new() -> LiveCounters {
        LiveCounters(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    #[inline]
    fn publish(&self, c: &Counters) {
        for (slot, (_, value)) in self.0.iter().zip(c.fields()) {
            slot.store(value, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> Counters {
        let mut c = Counters::default();
        for (dst, slot) in c.fields_mut().into_iter().zip(&self.0) {
            *dst = slot.load(Ordering::Relaxed);
        }
        c
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

/// What one thread owns (see the module docs).
struct Worker {
    socks: Vec<Socket>,
    /// The sockets' descriptors followed by the waker's: the `ppoll` set.
    fds: Vec<RawFd>,
    sends: Vec<SendBatch>,
    recv: RecvBatch,
    scratch: Box<[u8]>,
    delay: DelayQueue,
    rng: Rng,
    counters: Counters,
    cfg: Arc<ServeConfig>,
    stop: Arc<AtomicBool>,
    live: Arc<[CachePadded<LiveCounters>]>,
    index: usize,
    epoch: Instant,
}

impl Worker {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn run(mut self) -> Counters {
        let socks = self.socks.len();
        debug_assert!(socks <= SOCKETS_PER_THREAD_MAX && self.fds.len() == socks + 1);
        let all: u64 = (1u64 << socks) - 1;
        // Sockets to read without polling first: all of them at start (they
        // may have queued datagrams while the threads were being started),
        // then those whose last read filled a batch.
        let mut ready = all;
        let mut published = self.counters;
        while !self.stop.load(Ordering::Acquire) {
            if ready == 0 {
                ready = self.wait(all);
            }
            self.flush_delayed(self.now_ns());
            let mut bits = ready;
            while bits != 0 {
                let k = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if self.serve_socket(k) < BATCH {
                    ready &= !(1u64 << k);
                }
            }
            for k in 0..socks {
                if self.sends[k].pending() > 0 {
                    self.flush_sends(k);
                }
            }
            if self.counters != published {
                published = self.counters;
                self.live[self.index].publish(&published);
            }
        }
        self.counters.pending_at_exit +=
            self.delay.len() as u64 + self.sends.iter().map(|s| s.pending() as u64).sum::<u64>();
        self.live[self.index].publish(&self.counters);
        self.counters
    }

    /// Sleeps in one `ppoll` over every socket and the waker until a datagram
    /// arrives, the earliest delayed reply is due, or `stop` wakes it;
    /// returns the readable sockets (the waker's bit removed: the loop looks
    /// at the stop flag itself).
    fn wait(&mut self, all: u64) -> u64 {
        let wait_ns = match self.delay.next_due_ns() {
            Some(due) => {
                let left = due.saturating_sub(self.now_ns());
                if left < SPIN_NS {
                    0
                } else {
                    left.min(IDLE_MAX_NS)
                }
            }
            None => IDLE_MAX_NS,
        };
        match wait_readable(&self.fds, Duration::from_nanos(wait_ns)) {
            Ok(mask) => mask & all,
            // EINVAL/ENOMEM cannot be caused by a datagram; read every
            // socket (recvmmsg will tell) after a pause, rather than spin.
            Err(_) => {
                thread::sleep(Duration::from_millis(1));
                all
            }
        }
    }

    /// Sends every delayed reply that is due.
    fn flush_delayed(&mut self, now_ns: u64) {
        while let Some(slot) = self.delay.pop_due(now_ns) {
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

    /// One `recvmmsg` on socket `k` and the replies; returns how many
    /// datagrams it got (`BATCH`: more may be queued).
    fn serve_socket(&mut self, k: usize) -> usize {
        let fd = self.socks[k].as_raw_fd();
        let n = match self.recv.recv(fd) {
            Ok(n) => n,
            // A transient error: ppoll reports the socket again if it is
            // still readable.
            Err(_) => return 0,
        };
        if n == 0 {
            return 0;
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
        n
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
    let req = match request::parse(data) {
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
    let Some(len) = request::write_reply(&req, &params, scratch) else {
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
/// `SO_REUSEPORT` group. Returns the sockets per thread, the bound addresses
/// (port 0 resolved) and the first socket whose buffers the kernel clamped.
type Bound = (Vec<Vec<Socket>>, Vec<SocketAddr>, Option<SocketReport>);

fn bind_all(cfg: &ServeConfig) -> Result<Bound, String> {
    let opts = SocketOptions {
        recv_buffer_bytes: cfg.recv_buffer_bytes,
        send_buffer_bytes: cfg.send_buffer_bytes,
        reuse_port: cfg.threads > 1,
        reuse_addr: false,
        pktinfo: true,
        timestamps: false,
        recv_errors: false,
        // Same socket treatment as the daemon's, so the bench compares like with like.
        dont_fragment: true,
        // Threads sleep in ppoll, never in a socket call.
        nonblocking: true,
    };
    let mut per_thread: Vec<Vec<Socket>> = (0..cfg.threads).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    let mut clamped = None;
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
                if (report.recv_clamped || report.send_clamped) && clamped.is_none() {
                    clamped = Some(report);
                }
                socks.push(sock);
            }
        }
    }
    Ok((per_thread, bound, clamped))
}

/// A running responder: its threads, bound sockets and published counters.
/// Dropping it stops and joins the threads, as [`Responder::stop`] does.
pub struct Responder {
    addrs: Vec<SocketAddr>,
    clamped: Option<SocketReport>,
    stop: Arc<AtomicBool>,
    waker: Waker,
    live: Arc<[CachePadded<LiveCounters>]>,
    threads: Vec<JoinHandle<Counters>>,
}

impl Responder {
    /// Validates `cfg`, binds every socket, starts the threads and returns at
    /// once. Datagrams arriving before a thread runs wait in the socket
    /// buffers, so a caller may start sending as soon as this returns.
    pub fn spawn(cfg: ServeConfig) -> Result<Responder, String> {
        if cfg.threads == 0 {
            return Err("--threads must be at least 1".to_string());
        }
        if cfg.listen.is_empty() {
            return Err("at least one --listen ADDR[-LASTPORT] is needed".to_string());
        }
        let ports: usize = cfg
            .listen
            .iter()
            .map(|s| usize::from(s.last_port - s.addr.port()) + 1)
            .sum();
        if ports > SOCKETS_PER_THREAD_MAX {
            return Err(format!(
                "--listen covers {ports} ports; one responder serves at most {SOCKETS_PER_THREAD_MAX}"
            ));
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
        let waker = Waker::new().map_err(|e| format!("cannot create an eventfd: {e}"))?;
        let (per_thread, addrs, clamped) = bind_all(&cfg)?;

        let cfg = Arc::new(cfg);
        let live: Arc<[CachePadded<LiveCounters>]> = (0..cfg.threads)
            .map(|_| CachePadded::new(LiveCounters::new()))
            .collect();
        // Built before any thread starts, so an early return below drops it
        // and Drop stops and joins the threads already running.
        let mut me = Responder {
            addrs,
            clamped,
            stop: Arc::new(AtomicBool::new(false)),
            waker,
            live,
            threads: Vec::with_capacity(cfg.threads),
        };
        for (index, socks) in per_thread.into_iter().enumerate() {
            let mut fds: Vec<RawFd> = socks.iter().map(|s| s.as_raw_fd()).collect();
            fds.push(me.waker.as_raw_fd());
            let sends = socks
                .iter()
                .map(|_| SendBatch::new(BATCH, DATAGRAM_MAX))
                .collect();
            let worker = Worker {
                socks,
                fds,
                sends,
                recv: RecvBatch::new(BATCH, DATAGRAM_MAX),
                scratch: vec![0u8; DATAGRAM_MAX].into_boxed_slice(),
                delay: DelayQueue::new(delay_slots),
                rng: Rng::new(cfg.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                counters: Counters::default(),
                cfg: cfg.clone(),
                stop: me.stop.clone(),
                live: me.live.clone(),
                index,
                epoch: Instant::now(),
            };
            let handle = thread::Builder::new()
                .name(format!("sim-responder-{index}"))
                .spawn(move || worker.run())
                .map_err(|e| format!("cannot start a responder thread: {e}"))?;
            me.threads.push(handle);
        }
        Ok(me)
    }

    /// The bound addresses, one per listen port in `listen` order (port 0
    /// resolved to the port the kernel chose).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// What the kernel granted for the first socket whose buffers came out
    /// smaller than asked (raise `net.core.rmem_max`/`wmem_max`), if any.
    pub fn clamped_buffers(&self) -> Option<SocketReport> {
        self.clamped
    }

    /// A live snapshot: each thread's totals as of its last round of batches
    /// (each field is exact at that instant; fields of a busy thread may be
    /// a batch apart from one another). `pending_at_exit` is 0 until `stop`.
    pub fn counters(&self) -> Counters {
        let mut total = Counters::default();
        for l in self.live.iter() {
            total.add(&l.snapshot());
        }
        total
    }

    /// Stops the threads (they wake at once through the eventfd), joins them
    /// and returns the exact final counters, summed.
    ///
    /// # Panics
    /// Re-raises the panic of a responder thread that panicked (a bug: no
    /// input datagram can make one panic).
    pub fn stop(mut self) -> Counters {
        self.halt();
        let mut total = Counters::default();
        for h in std::mem::take(&mut self.threads) {
            match h.join() {
                Ok(c) => total.add(&c),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        total
    }

    fn halt(&self) {
        self.stop.store(true, Ordering::Release);
        // Never drained: every thread's ppoll sees it readable from now on.
        self.waker.wake();
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.halt();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
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

    fn loopback_config() -> ServeConfig {
        let plan = FatePlan::new(1, 0.0, 0.0, 503, 0.0, 1000).unwrap();
        ServeConfig::new(vec![ListenSpec::parse("127.0.0.1:0").unwrap()], plan)
    }

    #[test]
    fn spawn_refuses_what_one_thread_cannot_wait_on() {
        let mut cfg = loopback_config();
        cfg.listen = vec![ListenSpec::parse("127.0.0.1:20000-20063").unwrap()];
        let err = Responder::spawn(cfg).err().expect("64 ports refused");
        assert!(err.contains("64 ports"), "{err}");
        let mut cfg = loopback_config();
        cfg.threads = 0;
        assert!(Responder::spawn(cfg).is_err());
        let mut cfg = loopback_config();
        cfg.noise.loss = 1.5;
        assert!(Responder::spawn(cfg).is_err());
    }

    #[test]
    fn stop_wakes_idle_threads_at_once() {
        let mut cfg = loopback_config();
        cfg.threads = 3;
        let r = Responder::spawn(cfg).unwrap();
        assert_eq!(r.local_addrs().len(), 1);
        assert_ne!(r.local_addrs()[0].port(), 0, "port 0 resolved");
        thread::sleep(Duration::from_millis(30)); // let every thread go to sleep
        let t = Instant::now();
        let c = r.stop();
        // The ppoll backstop is IDLE_MAX_NS (100 ms); the waker beats it.
        assert!(t.elapsed() < Duration::from_millis(80), "{:?}", t.elapsed());
        assert_eq!(c, Counters::default());
    }

    #[test]
    fn live_counters_follow_and_match_the_final_ones() {
        let r = Responder::spawn(loopback_config()).unwrap();
        let dest = r.local_addrs()[0];
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..5 {
            client.send_to(b"not a request\r\n\r\n", dest).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.counters().received < 5 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        let live = r.counters();
        assert_eq!((live.received, live.unparsable), (5, 5));
        assert_eq!(r.stop(), live, "nothing pending: final equals live");
    }
}
