//! One worker: a pinned thread that owns a shard of contacts and everything
//! its hot path touches — slab, timer wheel, request templates, token key,
//! shared-memory region, sockets and I/O backend. No locks, no shared
//! mutable state: the main thread talks to it through a command queue and
//! its waker; it talks back through the event queue and shared memory.
//!
//! Per contact there is exactly one timer, meaning either "next ping due"
//! or "reply deadline of the ping in flight". A round of the loop:
//!
//! 1. take commands (adds, stop);
//! 2. expire due timers in bounded batches: send pings (rendered into the
//!    backend's transmit buffers, token and CSeq patched in place) or count
//!    misses / retransmit;
//! 3. poll the backend until the next wheel deadline: every reply is matched
//!    statelessly from its From-tag (MAC, worker, slot, generation, seq,
//!    send time) and its RTT taken from the kernel receive timestamp; every ICMP
//!    destination unreachable from the sockets' error queues fails the ping
//!    it names at once (see "ICMP errors" below).
//!
//! The liveness record of each contact lives in its shared-memory slot (the
//! worker is its only writer and reads it back without the seqlock), so
//! per-contact memory in the worker is just the hot fields below.
//!
//! # ICMP errors
//!
//! A port or host unreachable (`IcmpError::is_unreachable`) counts as its
//! contact's miss at once, reason `unreachable`, without waiting for
//! `reply_timeout`; the ping is then settled like an answered one (its
//! deadline timer becomes the next ping's, so it never counts a second
//! miss, and a reply arriving after it is `late`). Which ping it is:
//!
//! * the quote carries the request's first lines (Linux quotes up to 576
//!   bytes of IPv4, more of IPv6): the Via branch token
//!   (`wire::template::quoted_token`) is decoded and MAC-checked like a
//!   reply's From-tag, and must name this worker's live slot and
//!   generation, a ping of it still in flight (any transmission), sent to
//!   the destination the error names;
//! * the quote carries no token (routers may quote only the 8-byte UDP
//!   header): every SIP contact at the error's destination with a ping in
//!   flight fails (`by_dest`: slot indexes hashed by destination, a few
//!   bytes per contact, compared against `Contact`'s own destination).
//!   Only a quote that may be kaping's request cut before its token counts
//!   so (`wire::template::quote_may_be_request`), or a NAT-only keepalive:
//!   one that goes on past that point without a token quotes a datagram
//!   kaping never sent, and counts as forged;
//! * a token names a ping in flight only with its send time too
//!   (`Contact::names_in_flight`), for ICMP errors as for replies: the
//!   16-bit sequence number alone wraps.
//!
//! An error that names nothing in flight, quotes a token that fails its
//! MAC or a datagram kaping never sent, is not a destination unreachable,
//! or concerns only NAT-only
//! keepalives (`null`, `crlf`: never in flight, their state says nothing)
//! changes nothing and is counted by cause (`Counter::IcmpUnmatched`,
//! `IcmpForged`, `IcmpOther`; `Unreachable` counts the ones that failed a
//! ping). With a shared port the kernel may queue the error on another
//! worker's socket (its reuseport choice for errors ignores the steering
//! program): it is handed to the owner, named by the token, or else by the
//! destination's shard (`io::steer::shard_of`). An error is handled when
//! its worker next polls: at once on loopback, where the kernel queues it
//! during the send; otherwise by the next tick with a ping due, and at the
//! latest after `POLL_MAX` (the io_uring backend does not end its sleep
//! for a single completion), plus as much again for a hand-over.
//!
//! Never allocates per packet; allocates per contact added and per state
//! change event.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam::channel::{Receiver, Sender, TryRecvError};
use crossbeam::queue::ArrayQueue;
use hashbrown::{DefaultHashBuilder, HashTable};

use crate::contact::KeepaliveKind;
use crate::engine::liveness::{Liveness, Policy, Reason, State, Transition};
use crate::engine::slab::{Handle, Slab};
use crate::engine::wheel::Wheel;
use crate::io::steer::shard_of;
use crate::io::waker::Waker;
use crate::io::{Backend, Datagram, Handler, IcmpError, WorkerSocket};
use crate::shm::layout::{Counter, SlotRecord};
use crate::shm::writer::WorkerShm;
use crate::wire::reply::{self, Match, Reject};
use crate::wire::template::{patch, quote_may_be_request, quoted_token, ContactText, Template};
use crate::wire::token::{self, TokenFields, TokenKey, TOKEN_LEN};

/// Due timers taken from the wheel per batch.
const DUE_BATCH: usize = 1024;
/// Datagrams queued before the worker hands them to the kernel. Small
/// enough that the few transmit buffers cycling through stay in the
/// core's cache (a round of 1,024 distinct buffers did not: rendering
/// into them missed), large enough that a system call serves many.
const SUBMIT_EVERY: usize = 64;
/// Longest sleep. A worker sleeps until its next timer deadline and is not
/// woken by each reply (RTTs come from kernel timestamps and lateness is
/// judged by them, so handling replies in batches at the next deadline
/// costs no accuracy); a command, a hand-off and an ICMP error end the
/// sleep at once (`io::udp::sleep_until_woken`). So this only bounds an
/// idle worker's sleep: it wakes 4 times a second.
const POLL_MAX: Duration = Duration::from_millis(250);
/// Pings a round should have before a worker sleeps past its next
/// deadline. At high rates every millisecond tick has that many due and
/// nothing changes; at low rates a worker sleeps until about that many
/// have fallen due, at most [`SLACK_MAX_MS`]: the pings then go out
/// together, a few ms late, instead of one wake-up per tick with a ping or
/// two. Their RTTs do not change (the token carries each ping's send time,
/// replies their kernel receive time), first pings stay spread over the
/// interval and the rate per second stays even. Larger rounds cost less
/// but send bursts that a single-threaded test responder answers later
/// (RTT p50 +35 % with 64 at 100,000/10 s; tuning.md, "Low rates").
const ROUND_PINGS: u64 = 16;
/// The longest a due ping waits for its round. Chosen by measurement
/// (tuning.md, "Low rates"): at 10,000 contacts every 30 s a worker spent
/// 38 µs of CPU a ping with rounds of up to 10 ms and 22 µs with 40 ms
/// (the kernel's paths run cold between rounds on a VM: the raw sender
/// paced the same way paid 27 and 13 µs); 25 rounds a second keep the
/// per-second send rate within a few per cent.
const SLACK_MAX_MS: u64 = 40;
/// How long a worker serving `pings_per_ms` lets its pings gather before
/// a round: the time [`ROUND_PINGS`] take to fall due, 1 to
/// [`SLACK_MAX_MS`] ms. Public for the bench, whose paced raw sender uses
/// the same rounds.
pub fn round_ms(pings_per_ms: f64) -> u64 {
    ((ROUND_PINGS as f64 / pings_per_ms).ceil() as u64).clamp(1, SLACK_MAX_MS)
}

/// The next contact's first-ping phase within `interval_ms`, from a Weyl
/// sequence (`state` steps by 2^64/φ from a random start), whose points
/// fill the interval evenly at every count: each new one lands in one of
/// the largest gaps. Independent random phases left one second of a 30 s
/// interval with ±10–15 % more or fewer pings than the next at 10,000
/// contacts (binomial spread: √333 on 333); these stay within a few.
fn next_phase(state: &mut u64, interval_ms: u32) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    ((u128::from(*state) * u128::from(interval_ms)) >> 64) as u64
}

/// First retransmission interval (RFC 3261 T1), doubling after each.
const T1_MS: u64 = 500;
/// Scratch capacity for one contact string (a request is at most
/// `io::TX_DATAGRAM_MAX` bytes, so no contact string is longer).
const TEXT_SCRATCH: usize = 2048;
/// Matched replies held back within one receive batch while what they
/// touch (slab entry, shm slot, wheel link) is fetched (see `cpu`).
const REPLY_BATCH: usize = 64;
/// Replies handed over between workers, per receiving worker.
pub const HANDOFF_QUEUE: usize = 4096;

/// How a worker is set up; built by the daemon, moved into the thread.
pub struct WorkerConfig {
    pub id: u8,
    pub key: TokenKey,
    /// Request template per socket (index = socket index in the backend).
    pub templates: Vec<Template>,
    /// The method we send, to check the CSeq of replies.
    pub method: Vec<u8>,
    pub capacity: u32,
    pub interval: Duration,
    pub jitter: Duration,
    pub reply_timeout: Duration,
    pub retries: u8,
    pub policy: Policy,
    /// This worker's share of the global pings-per-second cap; 0 = none.
    pub rate_limit: u64,
    /// Whether anyone reads state-change events (`events = "none"`: the
    /// worker does not build them).
    pub events: bool,
    pub seed: u64,
    /// Where to report contacts the worker dropped on its own (removed
    /// after `remove_after` misses, or refused), when the daemon keeps a
    /// registry of contacts (control socket on).
    pub gone: Option<Sender<Gone>>,
}

/// Settings a running worker takes on SIGHUP (`Command::Reconfigure`).
#[derive(Clone, Debug)]
pub struct LiveConfig {
    pub interval: Duration,
    pub jitter: Duration,
    pub reply_timeout: Duration,
    pub retries: u8,
    pub policy: Policy,
    pub rate_limit: u64,
    pub events: bool,
}

/// A contact a worker dropped without being asked (the registry forgets it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gone {
    pub worker: u8,
    pub handle: Handle,
}

impl WorkerConfig {
    /// Deadline of transmission number `tries` (1-based) of a ping: each
    /// retransmission waits T1·2^k, the last transmission reply_timeout.
    fn wait_ms(&self, tries: u8) -> u64 {
        if tries <= self.retries {
            T1_MS << (tries - 1)
        } else {
            self.reply_timeout.as_millis() as u64
        }
    }
}

/// A contact handed to a worker.
#[derive(Clone, Debug)]
pub struct NewContact {
    /// Request-URI.
    pub uri: String,
    /// To URI (AoR, normalized); `None` when it is the Request-URI itself
    /// (a contact without AoR), so the common case allocates one string.
    pub to: Option<String>,
    /// Path, sent as Route.
    pub route: Option<String>,
    pub dest: SocketAddr,
    /// Socket index in the worker's backend: kaping's own socket of the
    /// destination's family, or a source shared with a proxy.
    pub sock: u8,
    /// What is sent: the SIP request, or a NAT-only keepalive.
    pub keepalive: KeepaliveKind,
    pub interval: Option<Duration>,
    pub key_hash: u64,
    /// The slot and generation the daemon's registry chose (control socket
    /// on); `None`: the worker picks one.
    pub handle: Option<Handle>,
    /// Liveness carried over a restart: state, misses, counters and RTT
    /// figures are taken from it (the other fields are ignored).
    pub history: Option<SlotRecord>,
}

pub enum Command {
    Add(Vec<NewContact>),
    /// Operator removal (control socket): each contact stops being pinged
    /// and, with `report`, is reported Removed (reason `removed`); without,
    /// it is being replaced (an update that moves it). Stale handles are
    /// ignored (the worker dropped the contact itself meanwhile).
    Del {
        handles: Vec<Handle>,
        report: bool,
    },
    /// New live settings (SIGHUP).
    Reconfigure(Box<LiveConfig>),
    /// A new socket (a source shared with a proxy) and its request
    /// template; it takes the next socket index, the same in every worker.
    AddSocket(Box<(WorkerSocket, Template)>),
    /// Stop sending, wait for the replies in flight (up to their deadline),
    /// then return.
    Stop,
}

/// One state change, for the event stream.
#[derive(Clone, Debug)]
pub struct Event {
    pub time_ms: u64,
    pub worker: u8,
    pub slot: u32,
    pub uri: String,
    pub dest: SocketAddr,
    pub old: State,
    pub new: State,
    pub reason: Reason,
    pub rtt_us: Option<u32>,
    pub code: u16,
    pub misses: u16,
}

/// What one worker received for another (shared-port mode), passed to
/// its owner.
#[derive(Clone, Copy, Debug)]
pub enum Handoff {
    /// A reply, already MAC-checked.
    Reply { m: Match, rx_us: u32 },
    /// An ICMP unreachable whose quoted token (MAC-checked) names ping
    /// `seq`, sent at `sent_us`, of the owner's `slot` and `generation`,
    /// sent to `dest`.
    Unreachable {
        slot: u32,
        generation: u16,
        seq: u16,
        sent_us: u32,
        dest: SocketAddr,
    },
    /// An ICMP unreachable quoting no token, for `dest`, which the owner's
    /// shard holds.
    UnreachableAt { dest: SocketAddr },
}

/// The hand-off queues and wakers of all workers (shared-port mode).
#[derive(Clone)]
pub struct Peers {
    pub queues: Arc<[ArrayQueue<Handoff>]>,
    pub wakers: Arc<[Waker]>,
}

/// The hot per-contact record (64 bytes). Its liveness and its URI and To
/// text live in its shm slot and string region (the worker renders each
/// ping from there), so the text is held once, where readers see it.
struct Contact {
    /// The Path to send as Route (rare, so boxed).
    route: Option<Box<str>>,
    /// Destination address bytes (IPv4 in the first 4) and port: 18 bytes
    /// instead of a 32-byte `SocketAddr`, rebuilt at send time.
    dest_ip: [u8; 16],
    dest_port: u16,
    dest_v6: bool,
    /// Tick the current (or next) ping is due by the contact's schedule,
    /// not when it left: the next is due at anchor + interval, so a ping
    /// sent late (a busy worker, a rate cap) is late once and the contact
    /// keeps its phase instead of carrying the delay into every later
    /// interval (a stall would otherwise become a burst every interval).
    anchor_tick: u64,
    interval_ms: u32,
    /// Wall-clock µs (low 32 bits) of the latest transmission.
    sent_us: u32,
    /// Wall-clock µs (low 32 bits) of the first transmission of the ping
    /// in flight: with `sent_us`, the span in which every transmission of
    /// that ping, and so every token a reply to it may carry, was sent
    /// (see `Contact::names_in_flight`). Fits in what was padding.
    first_sent_us: u32,
    seq: u16,
    /// Transmissions of the ping in flight (0 = none in flight).
    tries: u8,
    sock: u8,
    /// Sub-µs parts of SRTT and RTTVAR (see `Liveness::estimator_fractions`).
    srtt_frac: u8,
    rttvar_frac: u8,
    /// The interval was set for this contact (else it follows the
    /// configured default, also after a reload).
    own_interval: bool,
    /// A transmission of the ping in flight failed with an earlier
    /// datagram's ICMP error after the backend's resends, and the ping was
    /// put off one tick instead of charged to the contact (`send_failed`);
    /// a second such failure of the same ping is charged. Cleared when the
    /// ping settles. Fits in what was padding.
    send_deferred: bool,
    /// What each ping is: the SIP request, or a NAT-only keepalive that
    /// is not answered (never in flight, state Unmonitored).
    keepalive: KeepaliveKind,
}

impl Contact {
    /// The ping in flight is over (answered, missed, or given up at a
    /// stop): no transmission is awaited, and the next ping starts with
    /// the benefit of the doubt again (`send_deferred`).
    fn settle(&mut self) {
        self.tries = 0;
        self.send_deferred = false;
    }

    fn dest_hash(&self, hasher: &DefaultHashBuilder) -> u64 {
        dest_hash(hasher, &self.dest_ip, self.dest_port, self.dest_v6)
    }

    fn has_dest(&self, ip: &[u8; 16], port: u16, v6: bool) -> bool {
        self.dest_port == port && self.dest_v6 == v6 && self.dest_ip == *ip
    }

    /// Whether a token's sequence number and send time name a
    /// transmission of the ping in flight (any of its retransmissions).
    ///
    /// The sequence number alone cannot say so: it is 16 bits and wraps
    /// after 65,536 transmissions (22 days at one ping every 30 s), so a
    /// genuine reply captured then and replayed now would fall in the
    /// in-flight window again, be believed and bring a Down contact back
    /// Up. The token's send time closes that: the latest transmission's
    /// token carries exactly `sent_us`, an earlier one's a time between
    /// `first_sent_us` and it. A replay from 65,536 pings ago would need
    /// the same low 32 bits of its send time in µs (they wrap every 71.6
    /// minutes) to within that span, which is zero wide without
    /// retransmissions. Two subtractions and compares; no state per ping.
    /// A wall clock stepped back between two transmissions of one ping
    /// makes a reply to the earlier one count as late, as `on_match`
    /// already counts one stepped back between send and receive.
    #[inline]
    fn names_in_flight(&self, seq: u16, sent_us: u32) -> bool {
        let age = self.seq.wrapping_sub(seq);
        if self.tries == 0 || age >= u16::from(self.tries) {
            return false;
        }
        let back_us = self.sent_us.wrapping_sub(sent_us);
        let span_us = self.sent_us.wrapping_sub(self.first_sent_us);
        (back_us == 0) == (age == 0) && back_us <= span_us
    }

    fn dest(&self) -> SocketAddr {
        if self.dest_v6 {
            SocketAddr::from((std::net::Ipv6Addr::from(self.dest_ip), self.dest_port))
        } else {
            let [a, b, c, d, ..] = self.dest_ip;
            SocketAddr::from(([a, b, c, d], self.dest_port))
        }
    }
}

/// Everything but the backend, so the backend can call back into it.
struct Core {
    cfg: WorkerConfig,
    slab: Slab<Contact>,
    wheel: Wheel,
    shm: WorkerShm,
    events: Sender<Event>,
    peers: Option<Peers>,
    start: Instant,
    /// Wall-clock µs at `start`, to turn ticks into wall time cheaply.
    start_wall_us: u64,
    rng: u64,
    /// Weyl sequence of first-ping phases (see `next_phase`).
    phase: u64,
    in_flight: u32,
    stopping: bool,
    /// Contacts per state, indexed by the shm state code.
    by_state: [u64; 6],
    bucket: TokenBucket,
    due: Vec<u32>,
    /// Matched replies of the current receive batch, settled at its end
    /// (capacity kept: no allocation).
    replies: Vec<(Match, u32)>,
    /// Scratch for a contact's URI and To text read back from the shm
    /// string region before rendering (capacity kept: no allocation).
    uri_scratch: Vec<u8>,
    to_scratch: Vec<u8>,
    /// Tick before which refusals are not logged again.
    refused_log_tick: u64,
    /// The slab's slots hashed by their contact's destination (several
    /// contacts may share one), for ICMP errors that quote no token. Sized
    /// for the slab's capacity at start: 4 bytes and a control byte per
    /// bucket, about 10 bytes per contact slot at full load (tuning.md
    /// "Memory per contact"). Kept equal to the slab's contents by
    /// `index_dest` (add) and `unindex_dest` (`remove`: deletion, an
    /// update that moves a contact, removal after misses).
    by_dest: HashTable<u32>,
    /// Seeded per process, so no one can choose destinations that collide.
    dest_hasher: DefaultHashBuilder,
    /// Slots one ICMP error fails (capacity kept: no allocation).
    icmp_slots: Vec<u32>,
}

/// Contacts at one destination an ICMP error is expected to find at most
/// without growing `icmp_slots` (more only cost a one-time allocation).
const ICMP_SLOTS: usize = 64;

/// What became of a due timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    Done,
    /// The backend's transmit pipeline is full: flush, then retry.
    NoRoom,
    /// Over the pings-per-second cap: retry next tick (flushing is no help).
    RateLimited,
}

/// Spends one token per ping; refilled by elapsed time.
struct TokenBucket {
    rate: u64,
    tokens: f64,
    last_tick: u64,
}

impl TokenBucket {
    fn take(&mut self, now_tick: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        if now_tick > self.last_tick {
            let add = (now_tick - self.last_tick) as f64 * self.rate as f64 / 1000.0;
            // Allow a burst of at most 10 ms worth of pings.
            self.tokens = (self.tokens + add).min((self.rate as f64 / 100.0).max(1.0));
            self.last_tick = now_tick;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Gives back a token taken for a ping that could not be sent.
    fn refund(&mut self) {
        if self.rate != 0 {
            self.tokens += 1.0;
        }
    }
}

/// When the ping after the one due at `anchor` is due: an interval later,
/// moved by `offset - jitter` (`offset` drawn from `0..=2 * jitter`). A
/// contact more than an interval behind (the worker was stalled or capped
/// for that long) skips the pings it missed instead of sending them back to
/// back, and keeps its phase.
fn next_due(anchor: u64, interval_ms: u32, jitter: u64, offset: u64, now: u64) -> u64 {
    let interval = u64::from(interval_ms.max(1));
    let mut base = anchor + interval;
    if base <= now {
        base += ((now - base) / interval + 1) * interval;
    }
    // Never before the next tick: a large jitter may not schedule a ping
    // in the past.
    (base + offset).saturating_sub(jitter).max(now + 1)
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn state_code(s: State) -> usize {
    s as u8 as usize
}

/// Shm record -> liveness: the published fields, typed, plus the
/// estimator's sub-µs fractions kept in the contact record.
fn liveness_of(rec: &SlotRecord, fractions: (u8, u8)) -> Liveness {
    let mut l = Liveness::new();
    l.state = match rec.state {
        2 => State::Up,
        3 => State::Down,
        4 => State::Removed,
        5 => State::Unmonitored,
        _ => State::Unknown,
    };
    l.misses = rec.misses;
    l.sent = rec.sent;
    l.answered = rec.answered;
    l.rtt_last_us = rec.rtt_last_us;
    l.rtt_min_us = rec.rtt_min_us;
    l.rtt_max_us = rec.rtt_max_us;
    l.srtt_us = rec.srtt_us;
    l.rttvar_us = rec.rttvar_us;
    l.last_code = rec.last_code;
    l.last_ping_ms = rec.last_ping_ms;
    l.last_reply_ms = rec.last_reply_ms;
    l.resume_estimator(fractions.0, fractions.1);
    l
}

fn store_liveness(rec: &mut SlotRecord, l: &Liveness) {
    rec.state = l.state as u8;
    rec.misses = l.misses;
    rec.sent = l.sent;
    rec.answered = l.answered;
    rec.rtt_last_us = l.rtt_last_us;
    rec.rtt_min_us = l.rtt_min_us;
    rec.rtt_max_us = l.rtt_max_us;
    rec.srtt_us = l.srtt_us;
    rec.rttvar_us = l.rttvar_us;
    rec.last_code = l.last_code;
    rec.last_ping_ms = l.last_ping_ms;
    rec.last_reply_ms = l.last_reply_ms;
}

/// Copies the liveness of a contact's previous life (a restart) into its
/// new slot record; the address, strings and generation stay the new ones.
fn restore_history(rec: &mut SlotRecord, h: &SlotRecord) {
    rec.state = match h.state {
        2 | 3 => h.state,
        _ => State::Unknown as u8,
    };
    rec.misses = h.misses;
    rec.sent = h.sent;
    rec.answered = h.answered;
    rec.rtt_last_us = h.rtt_last_us;
    rec.rtt_min_us = h.rtt_min_us;
    rec.rtt_max_us = h.rtt_max_us;
    rec.srtt_us = h.srtt_us;
    rec.rttvar_us = h.rttvar_us;
    rec.last_code = h.last_code;
    rec.last_ping_ms = h.last_ping_ms;
    rec.last_reply_ms = h.last_reply_ms;
}

fn dest_hash(hasher: &DefaultHashBuilder, ip: &[u8; 16], port: u16, v6: bool) -> u64 {
    use std::hash::BuildHasher;
    hasher.hash_one((ip, port, v6))
}

/// A destination as `Contact` keeps it (address bytes, port, IPv6), an
/// IPv4-mapped IPv6 address (an error read from an IPv6 socket about an
/// IPv4 datagram) as the IPv4 one.
fn dest_fields(addr: &SocketAddr) -> ([u8; 16], u16, bool) {
    if let SocketAddr::V6(a) = addr {
        if let Some(v4) = a.ip().to_ipv4_mapped() {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            return (b, a.port(), false);
        }
    }
    let (family, ip, port) = addr_fields(addr);
    (ip, port, family == 6)
}

/// Whether an ICMP error's quote may be (the start of) a NAT-only
/// keepalive kaping sent: four zero bytes, or CRLF CRLF.
fn is_keepalive_quote(quote: &[u8]) -> bool {
    [KeepaliveKind::Null, KeepaliveKind::Crlf]
        .iter()
        .any(|k| k.payload().is_some_and(|p| p.starts_with(quote)))
}

fn addr_fields(addr: &SocketAddr) -> (u8, [u8; 16], u16) {
    match addr {
        SocketAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.ip().octets());
            (4, b, a.port())
        }
        SocketAddr::V6(a) => (6, a.ip().octets(), a.port()),
    }
}

impl Core {
    fn now_tick(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn tick_to_wall_ms(&self, tick: u64) -> u64 {
        self.start_wall_us / 1000 + tick
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: phases and jitter need spread, not secrecy.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn set_state_gauges(&self) {
        self.shm.set(Counter::ContactsUnknown, self.by_state[1]);
        self.shm.set(Counter::ContactsUp, self.by_state[2]);
        self.shm.set(Counter::ContactsDown, self.by_state[3]);
        self.shm.set(Counter::ContactsRemoved, self.by_state[4]);
        self.shm.set(Counter::ContactsUnmonitored, self.by_state[5]);
    }

    fn add(&mut self, batch: Vec<NewContact>) {
        const _: () = assert!(
            std::mem::size_of::<Contact>() == 64,
            "per-contact memory budget"
        );
        let now = self.now_tick();
        for mut c in batch {
            let interval_ms = c.interval.unwrap_or(self.cfg.interval).as_millis().max(1) as u32;
            // The text goes to the shm string region, once: readers resolve
            // it there and the worker renders each ping from it. A To equal
            // to the URI shares its string.
            let Ok(uri_ref) = self.shm.alloc_str(c.uri.as_bytes()) else {
                self.refuse(&c, "the shared-memory string region is full");
                continue;
            };
            let to_ref = if c.to.as_ref().is_none_or(|t| *t == c.uri) {
                uri_ref
            } else if let Ok(r) = self
                .shm
                .alloc_str(c.to.as_deref().unwrap_or_default().as_bytes())
            {
                r
            } else {
                self.shm.free_str(uri_ref);
                self.refuse(&c, "the shared-memory string region is full");
                continue;
            };
            let (_, dest_ip, dest_port) = addr_fields(&c.dest);
            // First ping at a phase spread over the interval, so a bulk
            // load produces an even rate, not a burst (DESIGN §5).
            let first_tick = now + next_phase(&mut self.phase, interval_ms);
            let contact = Contact {
                route: c.route.take().map(String::into_boxed_str),
                dest_ip,
                dest_port,
                dest_v6: c.dest.is_ipv6(),
                anchor_tick: first_tick,
                interval_ms,
                sent_us: 0,
                first_sent_us: 0,
                seq: 0,
                tries: 0,
                sock: c.sock,
                srtt_frac: 0,
                rttvar_frac: 0,
                own_interval: c.interval.is_some(),
                send_deferred: false,
                keepalive: c.keepalive,
            };
            let handle = match c.handle {
                Some(h) => match self.slab.insert_at(h, contact) {
                    Ok(()) => h,
                    Err(e) => {
                        // The registry and this slab disagree: a bug, but
                        // one contact's, not the daemon's: say it, drop it.
                        self.shm.free_str(uri_ref);
                        if to_ref != uri_ref {
                            self.shm.free_str(to_ref);
                        }
                        self.refuse(&c, &format!("registry slot refused: {e}"));
                        continue;
                    }
                },
                // The daemon counts slots before sending, so a full slab
                // here is a bookkeeping bug, not an operator error.
                None => self
                    .slab
                    .insert(contact)
                    .expect("daemon sent more contacts than slots"),
            };
            self.index_dest(handle.slot);
            let (family, addr, port) = addr_fields(&c.dest);
            let mut rec = SlotRecord {
                generation: handle.generation,
                state: State::Unknown as u8,
                family,
                port,
                addr,
                interval_ms,
                key_hash: c.key_hash,
                uri: uri_ref,
                aor: to_ref,
                ..SlotRecord::default()
            };
            if let Some(h) = &c.history {
                restore_history(&mut rec, h);
            }
            if c.keepalive != KeepaliveKind::Sip {
                // No reply is expected: its liveness is never known, so it
                // is never shown Up (nor Down).
                rec.state = State::Unmonitored as u8;
            }
            self.shm.write_slot(handle.slot, &rec);
            self.by_state[rec.state as usize] += 1;
            self.wheel.insert(handle.slot, first_tick);
        }
        self.set_state_gauges();
    }

    /// A contact the worker cannot hold: counted and said (at most once a
    /// second, so a mass refusal cannot flood the log).
    fn refuse(&mut self, c: &NewContact, why: &str) {
        self.shm.add(Counter::SendErrors, 1);
        if let (Some(gone), Some(handle)) = (&self.cfg.gone, c.handle) {
            let _ = gone.send(Gone {
                worker: self.cfg.id,
                handle,
            });
        }
        let now = self.now_tick();
        if now >= self.refused_log_tick {
            self.refused_log_tick = now + 1000;
            eprintln!(
                "kaping: worker {}: contact {} not added: {why} (raise max_contacts to get more string space)",
                self.cfg.id, c.uri
            );
        }
    }

    fn remove(&mut self, handle: Handle) {
        self.wheel.cancel(handle.slot);
        if self.slab.get(handle).is_some() {
            self.unindex_dest(handle.slot);
        }
        if let Some(c) = self.slab.remove(handle) {
            if c.tries > 0 {
                self.in_flight -= 1;
            }
        }
        let rec = self.shm.read_own_slot(handle.slot);
        self.shm.free_str(rec.uri);
        if rec.aor != rec.uri {
            self.shm.free_str(rec.aor);
        }
        self.shm.clear_slot(handle.slot);
    }

    /// Adds `slot` (just inserted into the slab) to `by_dest`. The table
    /// was sized for the slab, so this does not allocate unless deletions
    /// left it too many tombstones to rehash in place.
    fn index_dest(&mut self, slot: u32) {
        let Some((_, c)) = self.slab.get_slot(slot) else {
            return;
        };
        let hash = c.dest_hash(&self.dest_hasher);
        let (slab, hasher) = (&self.slab, &self.dest_hasher);
        self.by_dest.insert_unique(hash, slot, |&s| {
            slab.get_slot(s).map_or(0, |(_, c)| c.dest_hash(hasher))
        });
        debug_assert_eq!(self.by_dest.len(), self.slab.len() as usize);
    }

    /// Takes `slot` (still in the slab) out of `by_dest`.
    fn unindex_dest(&mut self, slot: u32) {
        let Some((_, c)) = self.slab.get_slot(slot) else {
            return;
        };
        let hash = c.dest_hash(&self.dest_hasher);
        let found = self.by_dest.find_entry(hash, |&s| s == slot);
        debug_assert!(found.is_ok(), "slot {slot} missing from by_dest");
        if let Ok(e) = found {
            e.remove();
        }
    }

    /// An ICMP destination unreachable read from one of this worker's
    /// sockets (or handed over by a peer, `from_peer`: never handed on
    /// again). See "ICMP errors" in the module doc.
    fn on_unreachable(&mut self, dest: &SocketAddr, quote: &[u8], from_peer: bool) {
        let Some(tok) = quoted_token(quote) else {
            if quote_may_be_request(quote, &self.cfg.method) || is_keepalive_quote(quote) {
                // Cut before the token (a router quoting only the UDP
                // header), or a NAT-only keepalive: by destination.
                self.unreachable_at(dest, from_peer);
            } else {
                // A datagram kaping never sent (random bytes, another
                // program's): only its maker could have sent this error.
                self.shm.add(Counter::IcmpForged, 1);
            }
            return;
        };
        let Ok(f) = token::decode(&self.cfg.key, tok) else {
            // Shaped like our request, but no token of ours: anyone may
            // send an ICMP error quoting anything.
            self.shm.add(Counter::IcmpForged, 1);
            return;
        };
        if f.worker != self.cfg.id {
            self.hand_over_icmp(
                f.worker as usize,
                Handoff::Unreachable {
                    slot: f.slot,
                    generation: f.generation,
                    seq: f.seq,
                    sent_us: f.sent_us,
                    dest: *dest,
                },
                from_peer,
            );
            return;
        }
        self.unreachable_ping(f.slot, f.generation, f.seq, f.sent_us, dest);
    }

    /// The ICMP error's token names ping `seq`, sent at `sent_us`, of
    /// `slot`/`generation`: it fails if that ping is still in flight to
    /// `dest`.
    fn unreachable_ping(
        &mut self,
        slot: u32,
        generation: u16,
        seq: u16,
        sent_us: u32,
        dest: &SocketAddr,
    ) {
        let (ip, port, v6) = dest_fields(dest);
        let in_flight = self.slab.get_slot(slot).is_some_and(|(h, c)| {
            // Accept an error for any transmission of the ping in flight,
            // as `on_match` accepts a reply to any, and, as there, not one
            // replayed from a ping whose sequence number has wrapped.
            h.generation == generation
                && c.has_dest(&ip, port, v6)
                && c.names_in_flight(seq, sent_us)
        });
        if !in_flight {
            // The contact is gone, or the ping was answered, timed out or
            // failed by an earlier error (ICMP errors can be duplicated,
            // and replayed).
            self.shm.add(Counter::IcmpUnmatched, 1);
            return;
        }
        self.shm.add(Counter::Unreachable, 1);
        self.fail_ping(slot);
    }

    /// An ICMP unreachable quoting no token: every SIP contact at `dest`
    /// with a ping in flight fails (the error cannot say which).
    fn unreachable_at(&mut self, dest: &SocketAddr, from_peer: bool) {
        let (ip, port, v6) = dest_fields(dest);
        let hash = dest_hash(&self.dest_hasher, &ip, port, v6);
        self.icmp_slots.clear();
        let (mut known, mut unmonitored) = (false, false);
        for &slot in self.by_dest.iter_hash(hash) {
            let Some((_, c)) = self.slab.get_slot(slot) else {
                continue;
            };
            if !c.has_dest(&ip, port, v6) {
                // Another destination with the same hash.
                continue;
            }
            known = true;
            if c.keepalive != KeepaliveKind::Sip {
                unmonitored = true;
            } else if c.tries > 0 {
                self.icmp_slots.push(slot);
            }
        }
        if !self.icmp_slots.is_empty() {
            self.shm.add(Counter::Unreachable, 1);
            let slots = std::mem::take(&mut self.icmp_slots);
            for &slot in &slots {
                self.fail_ping(slot);
            }
            self.icmp_slots = slots;
        } else if !known && self.peers.is_some() {
            let n = self.peers.as_ref().map_or(1, |p| p.queues.len() as u32);
            let owner = shard_of(dest, n) as usize;
            if owner != self.cfg.id as usize {
                self.hand_over_icmp(owner, Handoff::UnreachableAt { dest: *dest }, from_peer);
            } else {
                self.shm.add(Counter::IcmpUnmatched, 1);
            }
        } else if unmonitored {
            // A NAT-only keepalive: never in flight, its state says nothing.
            self.shm.add(Counter::IcmpOther, 1);
        } else {
            self.shm.add(Counter::IcmpUnmatched, 1);
        }
    }

    /// Settles the ping in flight of `slot` as a miss (`miss` gives the
    /// reason: a timeout, an ICMP error): the contact's liveness moves, then
    /// it is dropped or its timer becomes the next ping's.
    fn settle_miss(
        &mut self,
        slot: u32,
        miss: impl FnOnce(&mut Liveness, &Policy) -> Option<Transition>,
    ) {
        let Some((handle, c)) = self.slab.get_slot_mut(slot) else {
            return;
        };
        debug_assert!(c.tries > 0, "slot {slot}: no ping in flight");
        c.settle();
        let (anchor, interval_ms) = (c.anchor_tick, c.interval_ms);
        self.in_flight -= 1;
        let state = self.update_liveness(handle, None, miss);
        if state == State::Removed {
            self.drop_contact(handle);
            return;
        }
        self.schedule_next(handle, anchor, interval_ms);
    }

    /// Settles the ping in flight of `slot` as a miss, reason
    /// `unreachable`, at once.
    fn fail_ping(&mut self, slot: u32) {
        self.settle_miss(slot, |l, p| l.on_unreachable(p));
    }

    /// Passes an ICMP error to worker `to` (shared-port mode); one a peer
    /// handed over is not handed on (the owner's view of it is final).
    fn hand_over_icmp(&mut self, to: usize, h: Handoff, from_peer: bool) {
        let pushed = match &self.peers {
            Some(peers) if !from_peer && to < peers.queues.len() => {
                let ok = peers.queues[to].push(h).is_ok();
                if ok {
                    peers.wakers[to].wake();
                }
                ok
            }
            _ => false,
        };
        if !pushed {
            // Port-per-worker: our socket sent no ping for another worker;
            // or the owner's queue is full.
            self.shm.add(Counter::IcmpUnmatched, 1);
        }
    }

    /// A contact dropped on the worker's own decision (remove_after): the
    /// daemon's registry, if any, is told.
    fn drop_contact(&mut self, handle: Handle) {
        self.remove(handle);
        if let Some(gone) = &self.cfg.gone {
            let _ = gone.send(Gone {
                worker: self.cfg.id,
                handle,
            });
        }
    }

    /// Operator removal: reported (if asked) as a transition to Removed
    /// (reason `removed`), then forgotten. A stale handle is ignored.
    fn delete(&mut self, handle: Handle, report: bool) {
        if self.slab.get(handle).is_none() {
            return;
        }
        let rec = self.shm.read_own_slot(handle.slot);
        let l = liveness_of(&rec, (0, 0));
        if report {
            let t = Transition {
                old: l.state,
                new: State::Removed,
                reason: Reason::Removed,
            };
            self.emit(handle, t, None, &l);
        }
        self.by_state[state_code(l.state)] -= 1;
        self.set_state_gauges();
        self.remove(handle);
    }

    /// Takes new live settings. Contacts that follow the default interval
    /// move to the new one from their next ping.
    fn reconfigure(&mut self, live: LiveConfig) {
        let new_ms = live.interval.as_millis().max(1) as u32;
        if live.interval != self.cfg.interval {
            let slots: Vec<u32> = self
                .slab
                .iter()
                .filter(|(_, c)| !c.own_interval)
                .map(|(h, _)| h.slot)
                .collect();
            for slot in slots {
                if let Some((_, c)) = self.slab.get_slot_mut(slot) {
                    c.interval_ms = new_ms;
                }
                let mut rec = self.shm.read_own_slot(slot);
                rec.interval_ms = new_ms;
                self.shm.write_slot(slot, &rec);
            }
        }
        self.bucket.rate = live.rate_limit;
        self.cfg.interval = live.interval;
        self.cfg.jitter = live.jitter;
        self.cfg.reply_timeout = live.reply_timeout;
        self.cfg.retries = live.retries;
        self.cfg.policy = live.policy;
        self.cfg.rate_limit = live.rate_limit;
        self.cfg.events = live.events;
    }

    fn emit(&self, handle: Handle, t: Transition, rtt_us: Option<u32>, l: &Liveness) {
        if !self.cfg.events {
            return;
        }
        let Some(c) = self.slab.get(handle) else {
            return;
        };
        // Events are rare (state changes): reading the URI back from the
        // string region and allocating it here is fine.
        let mut uri = Vec::new();
        self.shm
            .read_own_str(self.shm.read_own_slot(handle.slot).uri, &mut uri);
        let _ = self.events.send(Event {
            time_ms: wall_us() / 1000,
            worker: self.cfg.id,
            slot: handle.slot,
            uri: String::from_utf8_lossy(&uri).into_owned(),
            dest: c.dest(),
            old: t.old,
            new: t.new,
            reason: t.reason,
            rtt_us,
            code: l.last_code,
            misses: l.misses,
        });
    }

    /// Applies `f` to the liveness of `handle`, publishes it, and emits an
    /// event and updates gauges on a state change. Returns the new state.
    fn update_liveness(
        &mut self,
        handle: Handle,
        rtt_us: Option<u32>,
        f: impl FnOnce(&mut Liveness, &Policy) -> Option<Transition>,
    ) -> State {
        let rec = self.shm.read_own_slot(handle.slot);
        self.apply_liveness(handle, rec, rtt_us, f)
    }

    /// `update_liveness` for a caller that has just read the slot.
    fn apply_liveness(
        &mut self,
        handle: Handle,
        mut rec: SlotRecord,
        rtt_us: Option<u32>,
        f: impl FnOnce(&mut Liveness, &Policy) -> Option<Transition>,
    ) -> State {
        debug_assert_eq!(
            rec.generation, handle.generation,
            "slot {} owner",
            handle.slot
        );
        let Some(c) = self.slab.get_mut(handle) else {
            return State::Removed;
        };
        let mut l = liveness_of(&rec, (c.srtt_frac, c.rttvar_frac));
        let t = f(&mut l, &self.cfg.policy);
        (c.srtt_frac, c.rttvar_frac) = l.estimator_fractions();
        store_liveness(&mut rec, &l);
        self.shm.write_slot(handle.slot, &rec);
        if let Some(t) = t {
            self.by_state[state_code(t.old)] -= 1;
            self.by_state[state_code(t.new)] += 1;
            self.set_state_gauges();
            self.emit(handle, t, rtt_us, &l);
        }
        l.state
    }

    /// Asks the CPU for `slot`'s slab entry and shm record (see `cpu`).
    #[inline]
    fn prefetch_entry(&self, slot: u32) {
        self.slab.prefetch(slot);
        self.shm.prefetch_slot(slot);
    }

    /// Schedules the next ping of `handle` after the one due at `anchor`
    /// (see `Contact::anchor_tick`) and arms its timer.
    fn schedule_next(&mut self, handle: Handle, anchor: u64, interval_ms: u32) {
        let jitter = self.cfg.jitter.as_millis() as u64;
        let offset = if jitter == 0 {
            0
        } else {
            self.next_random() % (2 * jitter + 1)
        };
        let next = next_due(anchor, interval_ms, jitter, offset, self.wheel.now_tick());
        if let Some(c) = self.slab.get_mut(handle) {
            c.anchor_tick = next;
        }
        self.wheel.insert(handle.slot, next);
    }

    /// Renders, patches and queues one ping for `slot`, stamped `now_us`
    /// (wall clock, read once per few pings by `expire_due`). False when
    /// the backend has no room (the caller retries on a later tick).
    fn transmit(
        &mut self,
        backend: &mut dyn Backend,
        slot: u32,
        now_tick: u64,
        now_us: u64,
    ) -> bool {
        let Some((handle, c)) = self.slab.get_slot_mut(slot) else {
            return true;
        };
        let Some(buf) = backend.tx_buf(c.sock as usize) else {
            return false;
        };
        if let Some(payload) = c.keepalive.payload() {
            // A NAT-only keepalive: fixed bytes, nothing to match, so
            // nothing in flight; the next is due an interval on.
            buf[..payload.len()].copy_from_slice(payload);
            let (dest, sock) = (c.dest(), c.sock as usize);
            let (anchor, interval_ms) = (c.anchor_tick, c.interval_ms);
            backend.tx_commit(sock, payload.len(), &dest, slot);
            self.shm.add(Counter::Sent, 1);
            let now_ms = self.tick_to_wall_ms(now_tick);
            self.update_liveness(handle, None, |l, _| {
                l.on_sent(now_ms);
                None
            });
            self.schedule_next(handle, anchor, interval_ms);
            return true;
        }
        let template = &self.cfg.templates[c.sock as usize];
        let rec = self.shm.read_own_slot(slot);
        self.shm.read_own_str(rec.uri, &mut self.uri_scratch);
        self.shm.read_own_str(rec.aor, &mut self.to_scratch);
        // Written from `String`s by `add`, so valid UTF-8 (an ASCII fast
        // path: a few ns for a contact URI).
        let (Ok(uri), Ok(to)) = (
            std::str::from_utf8(&self.uri_scratch),
            std::str::from_utf8(&self.to_scratch),
        ) else {
            self.shm.add(Counter::SendErrors, 1);
            return true;
        };
        let text = ContactText {
            uri,
            to,
            route: c.route.as_deref(),
        };
        let layout = match template.render(&text, buf) {
            Ok(l) => l,
            Err(_) => {
                // Checked when the contact was added; a contact that no
                // longer fits is counted and skipped, never sent truncated.
                self.shm.add(Counter::SendErrors, 1);
                return true;
            }
        };
        c.seq = c.seq.wrapping_add(1);
        let sent_us = now_us as u32;
        c.sent_us = sent_us;
        if c.tries == 0 {
            c.first_sent_us = sent_us;
        }
        let fields = TokenFields {
            worker: self.cfg.id,
            slot,
            generation: handle.generation,
            seq: c.seq,
            sent_us,
        };
        let mut tok = [0u8; TOKEN_LEN];
        token::encode(&self.cfg.key, &fields, &mut tok);
        patch(buf, &layout, &tok, c.seq as u32);
        let dest = c.dest();
        let sock = c.sock as usize;
        if c.tries == 0 {
            self.in_flight += 1;
        }
        c.tries += 1;
        let tries = c.tries;
        backend.tx_commit(sock, layout.len as usize, &dest, slot);
        self.shm.add(Counter::Sent, 1);
        if tries > 1 {
            self.shm.add(Counter::Retries, 1);
        }
        let now_ms = self.tick_to_wall_ms(now_tick);
        // The slot was read above for the strings; nothing wrote it since.
        self.apply_liveness(handle, rec, None, |l, _| {
            l.on_sent(now_ms);
            None
        });
        let deadline = now_tick + self.cfg.wait_ms(tries);
        self.wheel.insert(slot, deadline);
        true
    }

    /// A timer fired: send the next ping, retransmit, or count a miss.
    fn expire(
        &mut self,
        backend: &mut dyn Backend,
        slot: u32,
        now_tick: u64,
        now_us: u64,
    ) -> Expiry {
        let Some((_, c)) = self.slab.get_slot(slot) else {
            return Expiry::Done;
        };
        let tries = c.tries;
        if tries == 0 {
            // Next ping due.
            if self.stopping {
                return Expiry::Done;
            }
            if !self.bucket.take(now_tick) {
                // Counted per deferral: a ping held back for several ticks
                // counts once per tick it waited.
                self.shm.add(Counter::RateLimited, 1);
                return Expiry::RateLimited;
            }
            if self.transmit(backend, slot, now_tick, now_us) {
                return Expiry::Done;
            }
            self.bucket.refund();
            return Expiry::NoRoom;
        }
        if tries <= self.cfg.retries {
            if !self.stopping {
                return if self.transmit(backend, slot, now_tick, now_us) {
                    Expiry::Done
                } else {
                    Expiry::NoRoom
                };
            }
            // Stopping: the retransmission we would have sent is not a miss
            // of the contact's; just stop waiting for it.
            self.in_flight -= 1;
            if let Some((_, c)) = self.slab.get_slot_mut(slot) {
                c.settle();
            }
            return Expiry::Done;
        }
        // No reply to any transmission of this ping: a miss.
        self.shm.add(Counter::TimedOut, 1);
        self.settle_miss(slot, |l, p| l.on_miss(p));
        Expiry::Done
    }

    /// A verified reply for one of this worker's contacts (`datagram` hands
    /// the others over; hand-offs arrive only at their owner).
    fn on_match(&mut self, m: Match, rx_us: u32) {
        debug_assert_eq!(m.worker, self.cfg.id, "reply for another worker");
        let Some((handle, c)) = self.slab.get_slot_mut(m.slot) else {
            self.shm.add(Counter::Stray, 1);
            return;
        };
        if handle.generation != m.generation {
            // The slot was freed (and maybe reused) since this ping.
            self.shm.add(Counter::Stray, 1);
            return;
        }
        // Accept a reply to any transmission of the ping in flight, and to
        // nothing else: a reply to an earlier ping, answered or timed out,
        // is late, and so is a genuine reply replayed later, however long
        // after (its sequence number may have wrapped back into the
        // window: `names_in_flight`).
        if !c.names_in_flight(m.seq, m.sent_us) {
            self.shm.add(Counter::Late, 1);
            return;
        }
        let rtt_us = rx_us.wrapping_sub(m.sent_us);
        if rtt_us > i32::MAX as u32 {
            // The wall clock stepped back between send and receive.
            self.shm.add(Counter::Late, 1);
            return;
        }
        // Judge lateness by the kernel's receive time, not by when this
        // (possibly busy) worker got to it: a reply after the deadline of
        // the latest transmission is late even if its timer has not fired.
        let since_last_us = rx_us.wrapping_sub(c.sent_us) as i32;
        if since_last_us > 0 && since_last_us as u64 > self.cfg.wait_ms(c.tries) * 1000 {
            self.shm.add(Counter::Late, 1);
            return;
        }
        c.settle();
        let (anchor, interval_ms) = (c.anchor_tick, c.interval_ms);
        self.in_flight -= 1;
        self.shm.add(Counter::Matched, 1);
        if !self.cfg.policy.alive.contains(m.status) {
            self.shm.add(Counter::ErrorReplies, 1);
        }
        self.shm.record_rtt(rtt_us);
        let now_ms = wall_us() / 1000;
        let state = self.update_liveness(handle, Some(rtt_us), |l, p| {
            l.on_reply(m.status, rtt_us, now_ms, p)
        });
        if state == State::Removed {
            self.drop_contact(handle);
            return;
        }
        self.schedule_next(handle, anchor, interval_ms);
    }

    fn hand_over(&mut self, m: Match, rx_us: u32) {
        let Some(peers) = &self.peers else {
            // Port-per-worker: a reply for another worker on our port was
            // mis-addressed by the peer; it is valid but not ours.
            self.shm.add(Counter::Stray, 1);
            return;
        };
        let to = m.worker as usize;
        if to >= peers.queues.len() {
            self.shm.add(Counter::Stray, 1);
            return;
        }
        if peers.queues[to].push(Handoff::Reply { m, rx_us }).is_ok() {
            peers.wakers[to].wake();
            self.shm.add(Counter::Handoff, 1);
        } else {
            self.shm.add(Counter::Stray, 1);
        }
    }

    fn take_handoffs(&mut self) {
        let me = self.cfg.id as usize;
        for _ in 0..HANDOFF_QUEUE {
            // `Handoff` is Copy: the borrow of `peers` ends with the pop, so
            // no Arc is cloned on this per-loop path.
            let Some(h) = self.peers.as_ref().and_then(|p| p.queues[me].pop()) else {
                break;
            };
            match h {
                Handoff::Reply { m, rx_us } => self.on_match(m, rx_us),
                Handoff::Unreachable {
                    slot,
                    generation,
                    seq,
                    sent_us,
                    dest,
                } => self.unreachable_ping(slot, generation, seq, sent_us, &dest),
                Handoff::UnreachableAt { dest } => self.unreachable_at(&dest, true),
            }
        }
    }
}

impl Handler for Core {
    fn datagram(&mut self, _sock: usize, d: &Datagram<'_>) {
        self.shm.add(Counter::Received, 1);
        let result = if d.truncated {
            Err(Reject::Oversized)
        } else {
            reply::match_reply(&self.cfg.key, &self.cfg.method, d.data)
        };
        match result {
            Ok(m) => {
                let rx_us = d.rx_ns.map_or_else(wall_us, |ns| ns / 1000) as u32;
                if m.worker != self.cfg.id {
                    self.hand_over(m, rx_us);
                    return;
                }
                // Held to the end of the batch while its lines arrive.
                self.prefetch_entry(m.slot);
                self.wheel.prefetch(m.slot);
                if self.replies.len() == REPLY_BATCH {
                    self.end_batch();
                }
                self.replies.push((m, rx_us));
            }
            Err(r) => {
                self.shm.add_reject(r.index(), 1);
                let counter = match r {
                    Reject::Forged => Counter::Forged,
                    Reject::Instance => Counter::Stray,
                    _ => Counter::ParseErrors,
                };
                self.shm.add(counter, 1);
            }
        }
    }

    fn end_batch(&mut self) {
        let mut replies = std::mem::take(&mut self.replies);
        for &(m, rx_us) in &replies {
            self.on_match(m, rx_us);
        }
        replies.clear();
        self.replies = replies;
    }

    fn send_failed(&mut self, tag: u32, err: &io::Error) {
        self.shm.add(Counter::SendErrors, 1);
        let Some((_, c)) = self.slab.get_slot_mut(tag) else {
            return;
        };
        if c.keepalive != KeepaliveKind::Sip || c.tries == 0 {
            // Counted above; an unmonitored contact's state says nothing,
            // and a ping already settled (an earlier transmission was
            // answered) has nothing left to fail.
            return;
        }
        if !c.send_deferred
            && err
                .raw_os_error()
                .is_some_and(crate::io::udp::is_async_icmp)
        {
            // Every send of it (the backend resends at once,
            // `udp::ICMP_RESENDS`) reported another datagram's ICMP error:
            // errors arriving faster than the sends between them (a flood
            // of forged ones, or many dead contacts at once). Nothing is
            // known about this contact, so nothing is charged to it: the
            // transmission is undone and the ping sent again next tick.
            // Once per ping: a second such failure is its own.
            c.send_deferred = true;
            c.tries -= 1;
            if c.tries == 0 {
                self.in_flight -= 1;
            }
            self.wheel.insert(tag, self.wheel.now_tick() + 1);
            return;
        }
        // The ping never left: a miss at once, reason `unreachable`,
        // settled as an ICMP error settles one, so that its timeout does
        // not count the same ping a second time.
        self.fail_ping(tag);
    }

    fn icmp(&mut self, e: &IcmpError<'_>) {
        if !e.is_unreachable() {
            // Time exceeded, packet too big...: nothing about liveness.
            self.shm.add(Counter::IcmpOther, 1);
            return;
        }
        self.on_unreachable(&e.dest, e.quote, false);
    }
}

/// The worker: a core plus its backend.
pub struct Worker<B: Backend> {
    core: Core,
    backend: B,
    commands: Receiver<Command>,
    /// The shortest sleep while nothing is due at once (see
    /// [`ROUND_PINGS`]), from the pings served in the last second.
    slack_ms: u64,
    rate_window_start: u64,
    rate_window_served: u64,
}

impl<B: Backend> Worker<B> {
    pub fn new(
        cfg: WorkerConfig,
        shm: WorkerShm,
        backend: B,
        commands: Receiver<Command>,
        events: Sender<Event>,
        peers: Option<Peers>,
    ) -> Worker<B> {
        let capacity = cfg.capacity;
        let rate = cfg.rate_limit;
        let seed = cfg.seed | 1;
        Worker {
            core: Core {
                slab: Slab::with_capacity(capacity),
                wheel: Wheel::new(capacity, 0),
                shm,
                events,
                peers,
                start: Instant::now(),
                start_wall_us: wall_us(),
                rng: seed,
                phase: seed.wrapping_mul(0x2545_F491_4F6C_DD1D),
                in_flight: 0,
                stopping: false,
                by_state: [0; 6],
                bucket: TokenBucket {
                    rate,
                    tokens: 0.0,
                    last_tick: 0,
                },
                due: Vec::with_capacity(DUE_BATCH),
                replies: Vec::with_capacity(REPLY_BATCH),
                uri_scratch: Vec::with_capacity(TEXT_SCRATCH),
                to_scratch: Vec::with_capacity(TEXT_SCRATCH),
                refused_log_tick: 0,
                by_dest: HashTable::with_capacity(capacity as usize),
                dest_hasher: DefaultHashBuilder::default(),
                icmp_slots: Vec::with_capacity(ICMP_SLOTS),
                cfg,
            },
            backend,
            commands,
            slack_ms: 1,
            rate_window_start: 0,
            rate_window_served: 0,
        }
    }

    /// Runs until a `Stop` command (or the command channel closing) and the
    /// replies in flight have arrived or timed out.
    pub fn run(mut self) -> io::Result<()> {
        let mut stop_deadline: Option<u64> = None;
        loop {
            loop {
                match self.commands.try_recv() {
                    Ok(Command::Add(batch)) => self.core.add(batch),
                    Ok(Command::Del { handles, report }) => {
                        for h in handles {
                            self.core.delete(h, report);
                        }
                    }
                    Ok(Command::Reconfigure(live)) => self.core.reconfigure(*live),
                    Ok(Command::AddSocket(add)) => {
                        let (socket, template) = *add;
                        let index = self.backend.add_socket(socket).map_err(|e| {
                            io::Error::other(format!(
                                "worker {}: cannot add a source socket: {e}",
                                self.core.cfg.id
                            ))
                        })?;
                        // Indexes are the daemon's: the same in every worker.
                        assert_eq!(index, self.core.cfg.templates.len(), "socket index");
                        self.core.cfg.templates.push(template);
                    }
                    Ok(Command::Stop) => self.begin_stop(&mut stop_deadline),
                    Err(TryRecvError::Empty) => break,
                    // The daemon is gone: stop as if asked.
                    Err(TryRecvError::Disconnected) => {
                        self.begin_stop(&mut stop_deadline);
                        break;
                    }
                }
            }
            self.core.take_handoffs();
            let now = self.core.now_tick();
            if let Some(deadline) = stop_deadline {
                if self.core.in_flight == 0 || now >= deadline {
                    self.backend.flush(&mut self.core)?;
                    return Ok(());
                }
            }
            let (more_due, served, deferred) = self.expire_due(now)?;
            self.track_rate(now, served);
            // Pings held back (no room, or the rate cap) are tried again at
            // the next tick: a longer sleep would waste the cap's tokens.
            let slack = if deferred { 1 } else { self.slack_ms };
            let timeout = if more_due {
                Duration::ZERO
            } else {
                match self.core.wheel.next_deadline() {
                    Some(t) if t <= now => Duration::ZERO,
                    Some(t) => Duration::from_millis((t - now).max(slack)).min(POLL_MAX),
                    None => POLL_MAX,
                }
            };
            self.backend.poll(timeout, &mut self.core)?;
        }
    }

    fn begin_stop(&mut self, stop_deadline: &mut Option<u64>) {
        if stop_deadline.is_none() {
            self.core.stopping = true;
            let longest = self.core.cfg.reply_timeout.as_millis() as u64 + 1;
            *stop_deadline = Some(self.core.now_tick() + longest);
        }
    }

    /// Sizes the rounds from the pings served over the last second: the
    /// time [`ROUND_PINGS`] take to fall due, 1 to [`SLACK_MAX_MS`] ms.
    fn track_rate(&mut self, now: u64, served: usize) {
        self.rate_window_served += served as u64;
        let elapsed = now.saturating_sub(self.rate_window_start);
        if elapsed >= 1000 {
            let per_ms = self.rate_window_served.max(1) as f64 / elapsed as f64;
            self.slack_ms = round_ms(per_ms);
            self.rate_window_start = now;
            self.rate_window_served = 0;
        }
    }

    /// Expires one bounded batch of due timers. Returns whether more are
    /// due (so the caller polls without sleeping), how many were served,
    /// and whether some were held back (no room, or the rate cap) for the
    /// next tick.
    fn expire_due(&mut self, now: u64) -> io::Result<(bool, usize, bool)> {
        let mut due = std::mem::take(&mut self.core.due);
        due.clear();
        let n = self.core.wheel.poll_expired(now, &mut due, DUE_BATCH);
        // The send time in each token is read once per CLOCK_EVERY pings,
        // not per ping: the datagrams leave at the next submit anyway, so a
        // ping is stamped at most a few tens of µs early (RTTs read that
        // much long), against a clock read per ping saved.
        const CLOCK_EVERY: usize = 32;
        let mut now_us = 0;
        let mut deferred = false;
        let mut served = 0usize;
        // Each due contact's entry, slot and text are cold (touched once
        // per interval): ask for them a few contacts ahead so the misses
        // overlap. The strings' place is read from the slot, so they are
        // asked for once the slot has had time to arrive.
        const AHEAD: usize = 8;
        for &slot in due.iter().take(2 * AHEAD) {
            self.core.prefetch_entry(slot);
        }
        for &slot in due.iter().take(AHEAD) {
            self.core.shm.prefetch_strings(slot);
        }
        for (i, &slot) in due.iter().enumerate() {
            if let Some(&ahead) = due.get(i + 2 * AHEAD) {
                self.core.prefetch_entry(ahead);
            }
            if let Some(&ahead) = due.get(i + AHEAD) {
                self.core.shm.prefetch_strings(ahead);
            }
            if deferred {
                // Out of room or over the rate cap: try again next tick.
                self.core.wheel.insert(slot, now + 1);
                continue;
            }
            if i % CLOCK_EVERY == 0 {
                now_us = wall_us();
            }
            let mut outcome = self.core.expire(&mut self.backend, slot, now, now_us);
            if outcome == Expiry::NoRoom {
                // Hand the queued datagrams to the kernel and try once more.
                self.backend.flush(&mut self.core)?;
                now_us = wall_us();
                outcome = self.core.expire(&mut self.backend, slot, now, now_us);
            }
            if outcome != Expiry::Done {
                deferred = true;
                self.core.wheel.insert(slot, now + 1);
            }
            served += 1;
            if served.is_multiple_of(SUBMIT_EVERY) {
                // Hand a round to the kernel while its transmit buffers are
                // still in cache, and get them back (LIFO) for the next.
                self.backend.flush(&mut self.core)?;
            }
        }
        self.core.due = due;
        Ok((n == DUE_BATCH && !deferred, served, deferred))
    }
}

#[cfg(test)]
mod tests {
    use super::next_due;

    /// The ICMP and reply paths of a core driven by hand: a backend that
    /// keeps what was sent, pings sent by `expire`, errors delivered by
    /// `Handler::icmp`, replies by `Handler::datagram`.
    mod icmp {
        use super::super::*;
        use crate::engine::liveness::AliveCodes;
        use crate::shm::writer::{ShmConfig, ShmFile};
        use crate::sim::request::{self, ReplyParams};
        use crate::wire::template::TemplateConfig;

        /// Keeps every committed datagram: (destination, bytes).
        #[derive(Default)]
        struct Sent {
            buf: Vec<u8>,
            out: Vec<(SocketAddr, Vec<u8>)>,
        }

        impl Backend for Sent {
            fn name(&self) -> &'static str {
                "test"
            }
            fn tx_buf(&mut self, _sock: usize) -> Option<&mut [u8]> {
                self.buf.resize(crate::io::TX_DATAGRAM_MAX, 0xa5);
                Some(&mut self.buf)
            }
            fn tx_commit(&mut self, _sock: usize, len: usize, dest: &SocketAddr, _tag: u32) {
                self.out.push((*dest, self.buf[..len].to_vec()));
            }
            fn flush(&mut self, _h: &mut dyn Handler) -> io::Result<()> {
                Ok(())
            }
            fn poll(&mut self, _t: Duration, _h: &mut dyn Handler) -> io::Result<()> {
                Ok(())
            }
            fn tx_pending(&self) -> usize {
                0
            }
            fn add_socket(&mut self, _s: WorkerSocket) -> io::Result<usize> {
                Err(io::Error::other("test backend"))
            }
        }

        struct Lab {
            core: Core,
            backend: Sent,
            events: Receiver<Event>,
            _shm: ShmFile,
            _dir: tempfile::TempDir,
        }

        const DOWN_AFTER: u16 = 2;

        fn new_lab() -> Lab {
            let dir = tempfile::tempdir().unwrap();
            let file = ShmFile::create(&ShmConfig {
                path: dir.path().join("shm"),
                workers: 1,
                slots_per_worker: 16,
                string_bytes_per_worker: 4096,
                instance: "t".into(),
                backend: "test".into(),
                shard: None,
                group: None,
            })
            .unwrap();
            let cfg = WorkerConfig {
                id: 0,
                key: TokenKey::new([7; 16], 42),
                templates: vec![Template::new(&TemplateConfig::default()).unwrap()],
                method: b"OPTIONS".to_vec(),
                capacity: 16,
                interval: Duration::from_secs(30),
                jitter: Duration::ZERO,
                reply_timeout: Duration::from_secs(5),
                retries: 0,
                policy: Policy {
                    down_after: DOWN_AFTER,
                    remove_after: 0,
                    alive: AliveCodes::any(),
                },
                rate_limit: 0,
                events: true,
                seed: 1,
                gone: None,
            };
            let (_cmd_tx, commands) = crossbeam::channel::unbounded();
            let (events_tx, events) = crossbeam::channel::unbounded();
            let worker = Worker::new(
                cfg,
                file.worker(0),
                Sent::default(),
                commands,
                events_tx,
                None,
            );
            Lab {
                core: worker.core,
                backend: worker.backend,
                events,
                _shm: file,
                _dir: dir,
            }
        }

        impl Lab {
            fn add(&mut self, dest: &str, keepalive: KeepaliveKind) -> u32 {
                let before: Vec<u32> = self.core.slab.iter().map(|(h, _)| h.slot).collect();
                let n = self.core.slab.len();
                self.core.add(vec![NewContact {
                    uri: format!("sip:u{n}@{dest}"),
                    to: None,
                    route: None,
                    dest: dest.parse().unwrap(),
                    sock: 0,
                    keepalive,
                    interval: None,
                    key_hash: 0,
                    handle: None,
                    history: None,
                }]);
                let (h, _) = self
                    .core
                    .slab
                    .iter()
                    .find(|(h, _)| !before.contains(&h.slot))
                    .unwrap();
                h.slot
            }

            /// Sends `slot`'s next ping; returns the datagram.
            fn ping(&mut self, slot: u32) -> (SocketAddr, Vec<u8>) {
                let now = self.core.now_tick();
                let out = self.core.expire(&mut self.backend, slot, now, wall_us());
                assert_eq!(out, Expiry::Done);
                self.backend.out.pop().expect("a datagram")
            }

            fn icmp(&mut self, dest: SocketAddr, quote: &[u8]) {
                self.icmp_kind(dest, (3, 3), quote);
            }

            fn icmp_kind(&mut self, dest: SocketAddr, kind: (u8, u8), quote: &[u8]) {
                self.core.icmp(&IcmpError {
                    dest,
                    errno: libc::ECONNREFUSED,
                    icmp6: false,
                    icmp_type: kind.0,
                    icmp_code: kind.1,
                    quote,
                });
            }

            fn rec(&self, slot: u32) -> SlotRecord {
                self.core.shm.read_own_slot(slot)
            }

            fn tries(&self, slot: u32) -> u8 {
                self.core.slab.get_slot(slot).unwrap().1.tries
            }

            /// `slot`'s ping in flight times out (its last transmission's
            /// deadline passed: a miss).
            fn time_out(&mut self, slot: u32) {
                assert!(self.tries(slot) > self.core.cfg.retries);
                let now = self.core.now_tick();
                let out = self.core.expire(&mut self.backend, slot, now, wall_us());
                assert_eq!((out, self.tries(slot)), (Expiry::Done, 0));
            }

            /// Makes `slot`'s next transmission carry sequence number
            /// `seq`, as 65,536 transmissions after the one that did would.
            fn wrap_seq_to(&mut self, slot: u32, seq: u16) {
                self.core.slab.get_slot_mut(slot).unwrap().1.seq = seq.wrapping_sub(1);
            }

            /// A reply received on the worker's socket, at once.
            fn deliver(&mut self, reply: &[u8]) {
                self.core.datagram(
                    0,
                    &Datagram {
                        data: reply,
                        from: None,
                        to: None,
                        rx_ns: None,
                        truncated: false,
                    },
                );
                self.core.end_batch();
            }

            /// (Matched, Late).
            fn replies(&self) -> (u64, u64) {
                (
                    self.core.shm.get(Counter::Matched),
                    self.core.shm.get(Counter::Late),
                )
            }

            /// (Unreachable, IcmpForged, IcmpUnmatched, IcmpOther).
            fn counts(&self) -> (u64, u64, u64, u64) {
                let g = |c| self.core.shm.get(c);
                (
                    g(Counter::Unreachable),
                    g(Counter::IcmpForged),
                    g(Counter::IcmpUnmatched),
                    g(Counter::IcmpOther),
                )
            }
        }

        /// A phone's 200 OK to `req`, as the simulated platform writes it
        /// (RFC 3261 §8.2.6.2: Via, From, To, Call-ID, CSeq copied).
        fn answer(req: &[u8]) -> Vec<u8> {
            let parsed = request::parse(req).expect("kaping's request parses");
            let mut buf = [0u8; 2048];
            let params = ReplyParams {
                code: 200,
                to_tag: &crate::sim::fate::to_tag(1),
                source: "127.0.0.1:5070".parse().unwrap(),
                malform: None,
            };
            let n = request::write_reply(&parsed, &params, &mut buf).unwrap();
            buf[..n].to_vec()
        }

        /// The sequence number a request's token carries.
        fn seq_of(lab: &Lab, req: &[u8]) -> u16 {
            let tok = quoted_token(req).unwrap();
            token::decode(&lab.core.cfg.key, tok).unwrap().seq
        }

        /// Distinct send times in µs for the pings that follow.
        fn next_us() {
            std::thread::sleep(Duration::from_millis(1));
        }

        #[test]
        fn a_replayed_reply_never_counts_as_an_answer_even_after_seq_wraps() {
            let mut lab = new_lab();
            let a = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            let (_, req1) = lab.ping(a);
            let reply1 = answer(&req1);
            lab.deliver(&reply1);
            assert_eq!(lab.replies(), (1, 0));
            assert_eq!(lab.rec(a).state, State::Up as u8);
            // Replayed while nothing is in flight, then while the next ping is.
            lab.deliver(&reply1);
            next_us();
            let (_, req2) = lab.ping(a);
            lab.deliver(&reply1);
            assert_eq!(lab.replies(), (1, 2));
            assert_eq!(lab.tries(a), 1, "the ping in flight is untouched");
            lab.deliver(&answer(&req2));
            assert_eq!(lab.replies(), (2, 2));
            // 65,536 transmissions later the sequence number is reply1's
            // again: only the token's send time tells the replay apart.
            next_us();
            lab.wrap_seq_to(a, seq_of(&lab, &req1));
            let (_, req3) = lab.ping(a);
            assert_eq!(seq_of(&lab, &req3), seq_of(&lab, &req1));
            lab.deliver(&reply1);
            assert_eq!(lab.replies(), (2, 3), "the replay is late");
            assert_eq!((lab.tries(a), lab.rec(a).answered), (1, 2));
            lab.deliver(&answer(&req3));
            assert_eq!(lab.replies(), (3, 3), "the genuine reply is believed");
            assert_eq!((lab.tries(a), lab.rec(a).answered), (0, 3));
        }

        #[test]
        fn a_reply_to_any_retransmission_counts_and_a_wrapped_replay_does_not() {
            let mut lab = new_lab();
            lab.core.cfg.retries = 2;
            let a = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            let (_, old) = lab.ping(a);
            let old_reply = answer(&old);
            lab.deliver(&old_reply);
            // Three transmissions in flight, the middle one with the old
            // reply's sequence number (wrapped).
            next_us();
            lab.wrap_seq_to(a, seq_of(&lab, &old).wrapping_sub(1));
            let (_, first) = lab.ping(a);
            next_us();
            let (_, middle) = lab.ping(a);
            next_us();
            lab.ping(a);
            assert_eq!(lab.tries(a), 3);
            assert_eq!(seq_of(&lab, &middle), seq_of(&lab, &old));
            lab.deliver(&old_reply);
            assert_eq!(
                lab.replies(),
                (1, 1),
                "a replay, not the middle one's reply"
            );
            assert_eq!(lab.tries(a), 3);
            // The first transmission's own reply is accepted.
            lab.deliver(&answer(&first));
            assert_eq!(lab.replies(), (2, 1));
            assert_eq!(lab.tries(a), 0);
        }

        #[test]
        fn a_replayed_reply_never_brings_a_down_contact_back_up() {
            let mut lab = new_lab();
            let a = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            let (_, req1) = lab.ping(a);
            let reply1 = answer(&req1);
            lab.deliver(&reply1);
            for _ in 0..DOWN_AFTER {
                next_us();
                lab.ping(a);
                lab.deliver(&reply1);
                lab.time_out(a);
            }
            assert_eq!(lab.rec(a).state, State::Down as u8);
            // In flight again, with reply1's sequence number.
            next_us();
            lab.wrap_seq_to(a, seq_of(&lab, &req1));
            lab.ping(a);
            lab.deliver(&reply1);
            let rec = lab.rec(a);
            assert_eq!((rec.state, rec.answered), (State::Down as u8, 1));
            assert_eq!(lab.replies(), (1, 1 + u64::from(DOWN_AFTER)));
            assert_eq!(lab.tries(a), 1);
            // Events: Unknown -> Up, Up -> Down, nothing after.
            let news: Vec<State> = lab.events.try_iter().map(|e| e.new).collect();
            assert_eq!(news, [State::Up, State::Down]);
        }

        #[test]
        fn an_icmp_error_quoting_what_kaping_never_sent_changes_nothing() {
            let mut lab = new_lab();
            let a = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            let (dest, old) = lab.ping(a);
            lab.deliver(&answer(&old));
            next_us();
            lab.wrap_seq_to(a, seq_of(&lab, &old));
            let (_, req) = lab.ping(a);
            // Not a request of kaping's: random bytes, another program's.
            lab.icmp(dest, b"\xff\x13 not a SIP request at all, long enough");
            lab.icmp(
                dest,
                b"REGISTER sip:example.org SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n",
            );
            assert_eq!(lab.counts(), (0, 2, 0, 0));
            // kaping's own request of 65,536 pings ago, replayed.
            lab.icmp(dest, &old);
            assert_eq!(lab.counts(), (0, 2, 1, 0));
            assert_eq!((lab.tries(a), lab.rec(a).misses), (1, 0), "still in flight");
            // The error about the ping in flight fails it.
            lab.icmp(dest, &req);
            assert_eq!(lab.counts(), (1, 2, 1, 0));
            assert_eq!((lab.tries(a), lab.rec(a).misses), (0, 1));
        }

        #[test]
        fn another_datagrams_icmp_error_on_a_send_puts_the_ping_off_once() {
            let mut lab = new_lab();
            let a = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
            lab.ping(a);
            lab.core.send_failed(a, &refused);
            // Not charged: undone, and due again next tick.
            assert_eq!((lab.tries(a), lab.rec(a).misses), (0, 0));
            assert_eq!(lab.core.in_flight, 0);
            assert!(lab.core.wheel.is_armed(a));
            // Its resend meets another such error: now it is charged.
            lab.ping(a);
            assert_eq!(lab.core.in_flight, 1);
            lab.core.send_failed(a, &refused);
            assert_eq!((lab.tries(a), lab.rec(a).misses), (0, 1));
            assert_eq!(lab.core.in_flight, 0);
            // The next ping gets the benefit of the doubt again.
            lab.ping(a);
            lab.core.send_failed(a, &refused);
            assert_eq!((lab.tries(a), lab.rec(a).misses), (0, 1));
            assert_eq!(lab.core.shm.get(Counter::SendErrors), 3);
        }

        #[test]
        fn a_failed_send_is_one_miss_not_two() {
            let mut lab = new_lab();
            let a = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            lab.ping(a);
            let refused = io::Error::from_raw_os_error(libc::EPERM);
            lab.core.send_failed(a, &refused);
            // Settled at once: no timeout will count it again.
            assert_eq!((lab.tries(a), lab.rec(a).misses), (0, 1));
            assert!(lab.core.wheel.is_armed(a), "next ping scheduled");
            assert_eq!(lab.core.in_flight, 0);
            // A second report of the same send changes nothing more.
            lab.core.send_failed(a, &refused);
            assert_eq!(lab.rec(a).misses, 1);
            assert_eq!(lab.core.shm.get(Counter::SendErrors), 2);
        }

        #[test]
        fn a_quoted_token_fails_its_ping_at_once_and_only_once() {
            let mut lab = new_lab();
            let a = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            let b = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            for round in 1..=DOWN_AFTER {
                let (dest, req) = lab.ping(a);
                lab.ping(b);
                assert_eq!(lab.core.in_flight, 2);
                // The kernel's quote: the first 520 bytes of the request.
                lab.icmp(dest, &req[..req.len().min(520)]);
                assert_eq!(lab.tries(a), 0, "settled");
                assert_eq!(lab.tries(b), 1, "the token names a, not b");
                assert_eq!(lab.core.in_flight, 1);
                assert_eq!(lab.rec(a).misses, round);
                assert!(lab.core.wheel.is_armed(a), "next ping scheduled");
                // The same error again (duplicated): nothing in flight.
                lab.icmp(dest, &req);
                assert_eq!(lab.rec(a).misses, round);
                assert_eq!(lab.counts(), (u64::from(round), 0, u64::from(round), 0));
                // Settle b by hand (as its reply would) for the next round.
                lab.core.slab.get_slot_mut(b).unwrap().1.tries = 0;
                lab.core.in_flight -= 1;
            }
            assert_eq!(lab.rec(a).state, State::Down as u8);
            assert_eq!(lab.rec(b).misses, 0, "b never failed");
            let e = lab.events.try_recv().expect("an event");
            assert_eq!(
                (e.slot, e.new, e.reason),
                (a, State::Down, Reason::Unreachable)
            );
        }

        #[test]
        fn a_token_that_fails_its_mac_changes_nothing() {
            let mut lab = new_lab();
            let a = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            let (dest, mut req) = lab.ping(a);
            // One character of the Via token changed: the MAC fails.
            let at = memchr::memmem::find(&req, b"branch=z9hG4bK").unwrap() + 14 + 10;
            req[at] = if req[at] == b'A' { b'B' } else { b'A' };
            lab.icmp(dest, &req);
            assert_eq!(lab.counts(), (0, 1, 0, 0));
            assert_eq!((lab.tries(a), lab.rec(a).misses), (1, 0), "still in flight");
            // A token from another run's key.
            let mut other = new_lab();
            other.core.cfg.key = TokenKey::new([8; 16], 42);
            let o = other.add("127.0.0.1:5070", KeepaliveKind::Sip);
            let (_, foreign) = other.ping(o);
            lab.icmp(dest, &foreign);
            assert_eq!(lab.counts(), (0, 2, 0, 0));
            assert_eq!(lab.tries(a), 1);
        }

        #[test]
        fn a_quote_without_token_fails_every_ping_in_flight_to_its_destination() {
            let mut lab = new_lab();
            let a = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            let b = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            let c = lab.add("127.0.0.1:5071", KeepaliveKind::Sip);
            let idle = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            let (dest, req) = lab.ping(a);
            lab.ping(b);
            lab.ping(c);
            // A router quoting 8 bytes of UDP header: no payload; or a few.
            lab.icmp(dest, b"");
            assert_eq!((lab.tries(a), lab.tries(b), lab.tries(c)), (0, 0, 1));
            assert_eq!((lab.rec(a).misses, lab.rec(b).misses), (1, 1));
            assert_eq!(lab.rec(idle).misses, 0, "nothing in flight: untouched");
            assert_eq!(lab.counts(), (1, 0, 0, 0), "one error, two misses");
            // Nothing in flight to that destination any more.
            lab.icmp(dest, &req[..8]);
            assert_eq!(lab.counts(), (1, 0, 1, 0));
            // A destination no contact has.
            lab.icmp("127.0.0.1:9".parse().unwrap(), b"");
            assert_eq!(lab.counts(), (1, 0, 2, 0));
            assert_eq!(lab.tries(c), 1);
            assert_eq!(lab.core.in_flight, 1);
        }

        #[test]
        fn other_icmp_and_unmonitored_contacts_change_nothing() {
            let mut lab = new_lab();
            let a = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            let n = lab.add("127.0.0.1:5072", KeepaliveKind::Null);
            let (dest, req) = lab.ping(a);
            let (ndest, nreq) = lab.ping(n);
            assert_eq!(nreq, [0u8; 4]);
            lab.icmp_kind(dest, (3, 4), &req); // fragmentation needed
            lab.icmp_kind(dest, (11, 0), &req); // time exceeded
            lab.icmp(ndest, &nreq);
            assert_eq!(lab.counts(), (0, 0, 0, 3));
            assert_eq!(lab.tries(a), 1);
            assert_eq!(lab.rec(n).state, State::Unmonitored as u8);
            assert_eq!(lab.rec(n).misses, 0);
        }

        #[test]
        fn the_destination_index_follows_the_slab() {
            let mut lab = new_lab();
            let a = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            let b = lab.add("[::1]:5070", KeepaliveKind::Sip);
            let c = lab.add("127.0.0.1:5070", KeepaliveKind::Sip);
            assert_eq!(lab.core.by_dest.len(), 3);
            let (da, _) = lab.ping(a);
            let (db, _) = lab.ping(b);
            // Removed (as an update that moves it does): no longer found.
            let ha = lab.core.slab.get_slot(a).unwrap().0;
            lab.core.delete(ha, false);
            assert_eq!(lab.core.by_dest.len(), 2);
            assert_eq!(lab.core.in_flight, 1);
            lab.icmp(da, b"");
            assert_eq!(lab.counts(), (0, 0, 1, 0));
            // The slot is reused for another destination.
            let d = lab.add("127.0.0.2:5070", KeepaliveKind::Sip);
            assert_eq!(d, a, "slot reused");
            assert_eq!(lab.core.by_dest.len(), 3);
            let (dd, _) = lab.ping(d);
            lab.icmp(da, b"");
            assert_eq!(lab.tries(d), 1, "the old destination does not find it");
            lab.icmp(dd, b"");
            assert_eq!(lab.tries(d), 0);
            // IPv6, and an IPv4-mapped address naming an IPv4 contact.
            lab.icmp(db, b"");
            assert_eq!(lab.tries(b), 0);
            lab.ping(c);
            lab.icmp("[::ffff:127.0.0.1]:5070".parse().unwrap(), b"");
            assert_eq!(lab.tries(c), 0);
            assert_eq!(lab.counts(), (3, 0, 2, 0));
            for slot in [b, c, d] {
                let h = lab.core.slab.get_slot(slot).unwrap().0;
                lab.core.delete(h, false);
            }
            assert!(lab.core.by_dest.is_empty());
        }
    }

    #[test]
    fn first_pings_fill_the_interval_evenly() {
        // 10,000 contacts every 30 s, from any start: each second of the
        // interval gets 333 ± a few first pings (random phases: ± ~50).
        for start in [1u64, 0xDEAD_BEEF, u64::MAX / 3] {
            let mut state = start;
            let mut per_second = [0u32; 30];
            for _ in 0..10_000 {
                let phase = super::next_phase(&mut state, 30_000);
                assert!(phase < 30_000);
                per_second[(phase / 1000) as usize] += 1;
            }
            let (min, max) = (per_second.iter().min(), per_second.iter().max());
            assert!(
                *min.unwrap() >= 330 && *max.unwrap() <= 337,
                "{per_second:?}"
            );
        }
    }

    #[test]
    fn next_ping_keeps_the_contacts_phase() {
        // Due at 1,000 every 30 s; the reply came at 1,200 (sent late):
        // the next is due at 31,000, not 31,200.
        assert_eq!(next_due(1_000, 30_000, 0, 0, 1_200), 31_000);
        // A timer that fired on time gives the same.
        assert_eq!(next_due(1_000, 30_000, 0, 0, 1_005), 31_000);
    }

    #[test]
    fn a_contact_far_behind_skips_missed_pings_and_keeps_its_phase() {
        // Due at 1,000 every 100 ms, now 1,350: 1,100, 1,200 and 1,300 were
        // missed; the next is 1,400, one interval's phase later.
        assert_eq!(next_due(1_000, 100, 0, 0, 1_350), 1_400);
        // Exactly on a missed due tick: the next one, not now.
        assert_eq!(next_due(1_000, 100, 0, 0, 1_100), 1_200);
    }

    #[test]
    fn jitter_moves_around_the_due_tick_but_never_into_the_past() {
        for offset in 0..=20 {
            let next = next_due(1_000, 30_000, 10, offset, 1_001);
            assert_eq!(next, 31_000 + offset - 10);
        }
        // Jitter larger than what is left of the wait: next tick at the
        // earliest.
        assert_eq!(next_due(1_000, 100, 500, 0, 1_050), 1_051);
    }
}
