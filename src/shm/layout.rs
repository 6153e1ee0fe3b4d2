//! The shared-memory contract (DESIGN §7): the one `#[repr(C)]` layout shared by
//! the daemon (`shm::writer`) and every reader (`shm::reader`, `kaping-stat`).
//!
//! # File layout
//!
//! ```text
//! offset 0                 Header            (size_of::<Header>(), 64-byte aligned)
//! workers_offset           WorkerBlock × W   (counters, reject counters, RTT histogram)
//! slots_offset             Slot × S × W      (worker w's slots at slots_offset + w·slots_stride)
//! strings_offset           bytes × B × W     (worker w's strings at strings_offset + w·strings_stride)
//! registrar_offset         RegistrarBlock    (version 3: the registrar feed's figures)
//! file_size                end of file
//! ```
//!
//! Every offset and stride is a pure function of `(workers, slots_per_worker,
//! string_bytes_per_worker)` ([`Geometry::new`]); the header records them so a
//! reader can verify them against that function and the file length before it
//! trusts a single byte. Every region starts on a 64-byte cache line, so one
//! worker's writes never share a line with another worker's data.
//!
//! # Versions
//!
//! Version 3 appended the [`RegistrarBlock`] after the string regions and
//! three header fields in what was the header's tail padding; nothing before
//! it moved. A version 2 file is therefore a version 3 file without the
//! block: same 256-byte header (those three fields zero), same offsets,
//! `file_size` ending at the strings. Readers accept both
//! ([`VERSION_READ_MIN`]..=[`VERSION`], [`Geometry::for_version`]); a version 2
//! file simply has no registrar figures.
//!
//! Version 4 appended three counters ([`Counter::IcmpForged`],
//! [`Counter::IcmpUnmatched`], [`Counter::IcmpOther`]) into what was padding
//! of the counter words: the [`WorkerBlock`] keeps its size and every offset,
//! and a version 2 or 3 file reads with them zero
//! ([`Counter::count_in_version`]).
//!
//! # Invariants
//!
//! * Everything a reader looks at is an atomic (`AtomicU8/U32/U64`): other
//!   processes read while the daemon writes, so no field is ever accessed as
//!   plain memory once the file is published. Readers only perform atomic
//!   *loads* of at most 8 bytes, which Rust guarantees to work on a read-only
//!   mapping on 64-bit targets (see `std::sync::atomic`, "Atomic accesses to
//!   read-only memory").
//! * One writer per worker region (the owning worker thread) and one writer of
//!   the header (the daemon's main thread); any number of readers.
//! * A [`Slot`] is exactly 128 bytes: word 0 is the seqlock sequence (odd while
//!   a write is in progress), words 1..=[`RECORD_WORDS`] hold the
//!   [`SlotRecord`] packed by the pure [`encode_record`] / [`decode_record`].
//!   A zero-filled slot decodes to state [`SLOT_FREE`], so a fresh file holds
//!   only free slots.
//! * Any change to these types or to the encoding bumps [`VERSION`].
//!
//! # What never happens here
//!
//! Nothing in this file blocks or panics, and nothing allocates except
//! `name_from_bytes` (readers only): `bucket_index`, `bucket_bounds`,
//! `encode_record` and `decode_record` are on per-reply paths; `percentile`
//! is for readers.

use std::mem::{align_of, offset_of, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8};

/// First 8 bytes of every kaping shm file.
pub const MAGIC: [u8; 8] = *b"KAPINGSH";
/// [`MAGIC`] as the native-endian word stored in [`Header::magic`].
pub const MAGIC_WORD: u64 = u64::from_ne_bytes(MAGIC);
/// Layout version; bumped on any change to this file's types or encodings.
pub const VERSION: u32 = 4;
/// The oldest layout version readers still open (see "Versions" above).
pub const VERSION_READ_MIN: u32 = 2;

/// Slot states. The values match `engine::liveness::State` (`Unknown = 1` ..).
pub const SLOT_FREE: u8 = 0;
pub const SLOT_UNKNOWN: u8 = 1;
pub const SLOT_UP: u8 = 2;
pub const SLOT_DOWN: u8 = 3;
pub const SLOT_REMOVED: u8 = 4;
/// Kept open by NAT-only keepalives (`null`, `crlf`): pinged, but no reply
/// is expected, so whether it is alive is not known.
pub const SLOT_UNMONITORED: u8 = 5;

/// Worker ids are 8 bits in the token (`wire::token::WORKERS_MAX`).
pub const WORKERS_MAX: u32 = 256;
/// Slots are 24 bits in the token (`wire::token::SLOT_MAX + 1`).
pub const SLOTS_PER_WORKER_MAX: u32 = 1 << 24;
/// A [`StrRef`] length is a `u16`.
pub const STR_LEN_MAX: usize = u16::MAX as usize;
/// Instance name bytes in the header (UTF-8, NUL-padded, no NUL inside).
pub const INSTANCE_NAME_MAX: usize = 64;
/// Backend name bytes in the header (UTF-8, NUL-padded, no NUL inside).
pub const BACKEND_NAME_MAX: usize = 32;
/// Alignment of every region.
pub const CACHE_LINE: usize = 64;

/// Per-worker event counters. The discriminant is the index into
/// [`WorkerBlock::counters`]; new counters are appended (and bump [`VERSION`]).
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Pings handed to the kernel.
    Sent,
    /// Replies whose token decoded and whose slot/generation/seq matched a live ping.
    Matched,
    /// Pings that got no reply within `reply_timeout` (after retries).
    TimedOut,
    /// Valid-MAC replies for a contact that no longer exists (stale generation).
    Stray,
    /// Replies carrying our instance prefix but a bad MAC.
    Forged,
    /// Datagrams that are not a parsable SIP response (counted in detail by the reject counters).
    ParseErrors,
    /// Failed sends (errno from the kernel).
    SendErrors,
    /// ICMP destination-unreachable errors tied to a ping in flight, each
    /// counted as its contact's miss at once (reason `unreachable`). One per
    /// error, however many contacts share the destination it names.
    Unreachable,
    /// Replies that arrived at a worker other than the owner and were handed over.
    Handoff,
    /// Datagrams received.
    Received,
    /// Replies for a ping that had already timed out or been answered,
    /// and genuine replies replayed later (a reply counts only for a
    /// transmission of the ping in flight, named by the token's sequence
    /// number and send time).
    Late,
    /// Retransmissions before a miss is counted (T1 doubling, RFC 3261 §17.1.2.2 style).
    Retries,
    /// Contacts currently in state Unknown (gauge).
    ContactsUnknown,
    /// Contacts currently Up (gauge).
    ContactsUp,
    /// Contacts currently Down (gauge).
    ContactsDown,
    /// Contacts currently Removed (gauge).
    ContactsRemoved,
    /// Replies whose status code is not in the configured "alive" set.
    ErrorReplies,
    /// Times a due ping was held back by the global pings-per-second cap
    /// (once per tick it waited).
    RateLimited,
    /// Contacts currently kept open by NAT-only keepalives, liveness not
    /// known (gauge).
    ContactsUnmonitored,
    // ICMP errors that changed nothing (version 4), by cause; with
    // `Unreachable` they add up to every ICMP error read.
    /// ICMP errors quoting a request whose token fails its MAC or names
    /// another instance, or a datagram that is no request of kaping's at
    /// all (it goes on past where the token would be, without one): not a
    /// datagram kaping sent.
    IcmpForged,
    /// ICMP unreachable errors that name no ping in flight: the quoted
    /// token's contact is gone or its ping already settled (answered, timed
    /// out, failed by an earlier error), or, quoting no token, no contact
    /// at the destination has a ping in flight.
    IcmpUnmatched,
    /// ICMP errors that say nothing about liveness: not a destination
    /// unreachable (time exceeded, fragmentation needed / packet too big,
    /// parameter problem), or about a NAT-only keepalive (`null`, `crlf`).
    IcmpOther,
}

impl Counter {
    pub const COUNT: usize = 22;
    pub const ALL: [Counter; Counter::COUNT] = [
        Counter::Sent,
        Counter::Matched,
        Counter::TimedOut,
        Counter::Stray,
        Counter::Forged,
        Counter::ParseErrors,
        Counter::SendErrors,
        Counter::Unreachable,
        Counter::Handoff,
        Counter::Received,
        Counter::Late,
        Counter::Retries,
        Counter::ContactsUnknown,
        Counter::ContactsUp,
        Counter::ContactsDown,
        Counter::ContactsRemoved,
        Counter::ErrorReplies,
        Counter::RateLimited,
        Counter::ContactsUnmonitored,
        Counter::IcmpForged,
        Counter::IcmpUnmatched,
        Counter::IcmpOther,
    ];

    /// Stable snake_case name (Prometheus label / JSON key).
    pub fn name(self) -> &'static str {
        match self {
            Counter::Sent => "sent",
            Counter::Matched => "matched",
            Counter::TimedOut => "timed_out",
            Counter::Stray => "stray",
            Counter::Forged => "forged",
            Counter::ParseErrors => "parse_errors",
            Counter::SendErrors => "send_errors",
            Counter::Unreachable => "unreachable",
            Counter::Handoff => "handoff",
            Counter::Received => "received",
            Counter::Late => "late",
            Counter::Retries => "retries",
            Counter::ContactsUnknown => "contacts_unknown",
            Counter::ContactsUp => "contacts_up",
            Counter::ContactsDown => "contacts_down",
            Counter::ContactsRemoved => "contacts_removed",
            Counter::ErrorReplies => "error_replies",
            Counter::RateLimited => "rate_limited",
            Counter::ContactsUnmonitored => "contacts_unmonitored",
            Counter::IcmpForged => "icmp_forged",
            Counter::IcmpUnmatched => "icmp_unmatched",
            Counter::IcmpOther => "icmp_other",
        }
    }

    /// Index into [`WorkerBlock::counters`].
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }

    /// Counters a file of layout `version` holds: the first this many of
    /// [`Counter::ALL`]; the words after them are padding, zero in such a
    /// file, so a reader shows the newer counters as 0.
    pub const fn count_in_version(version: u32) -> usize {
        if version >= 4 {
            22
        } else {
            19
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < Counter::COUNT {
        assert!(Counter::ALL[i] as usize == i);
        i += 1;
    }
    assert!(Counter::IcmpOther as usize == Counter::COUNT - 1);
    assert!(Counter::count_in_version(3) < Counter::COUNT);
    assert!(Counter::count_in_version(VERSION) == Counter::COUNT);
};

/// Counter words per worker, padded to whole cache lines.
pub const COUNTER_WORDS: usize = round_up(Counter::COUNT, CACHE_LINE / 8);
/// Reject counters per worker, indexed by `wire::reply::Reject::index()`.
pub const REJECT_COUNTERS: usize = 16;

// ---------------------------------------------------------------------------
// RTT histogram: log-linear microsecond buckets (HdrHistogram style).
//
// Values 0..16 µs get one bucket each; each power of two [2^p, 2^(p+1)) for
// p = 4..=31 is split into 16 equal sub-buckets of width 2^(p-4), so a bucket's
// width is at most 1/16 = 6.25% of its lower bound; one last bucket holds
// everything ≥ 2^32 µs (71 minutes, beyond any u32 RTT).
// ---------------------------------------------------------------------------

/// log2 of the sub-buckets per power of two.
pub const HIST_SUB_BITS: u32 = 4;
/// Sub-buckets per power of two.
pub const HIST_SUB: usize = 1 << HIST_SUB_BITS;
/// First value of the overflow bucket.
pub const HIST_OVERFLOW_US: u64 = 1 << 32;
/// Number of histogram buckets: 16 exact + 28 groups × 16 + 1 overflow.
pub const HIST_BUCKETS: usize = HIST_SUB + (32 - HIST_SUB_BITS as usize) * HIST_SUB + 1;

/// The bucket holding `us`. Never panics.
#[inline]
pub fn bucket_index(us: u64) -> usize {
    if us < HIST_SUB as u64 {
        return us as usize;
    }
    if us >= HIST_OVERFLOW_US {
        return HIST_BUCKETS - 1;
    }
    let p = 63 - us.leading_zeros(); // HIST_SUB_BITS..=31
    let sub = ((us >> (p - HIST_SUB_BITS)) as usize) & (HIST_SUB - 1);
    HIST_SUB + (p - HIST_SUB_BITS) as usize * HIST_SUB + sub
}

/// Half-open range `[lo, hi)` of values in bucket `i`; the overflow bucket (and
/// any `i` past it) is `[2^32, u64::MAX)`. Never panics.
#[inline]
pub fn bucket_bounds(i: usize) -> (u64, u64) {
    if i < HIST_SUB {
        return (i as u64, i as u64 + 1);
    }
    if i >= HIST_BUCKETS - 1 {
        return (HIST_OVERFLOW_US, u64::MAX);
    }
    let group = (i - HIST_SUB) / HIST_SUB;
    let sub = ((i - HIST_SUB) % HIST_SUB) as u64;
    let p = group as u32 + HIST_SUB_BITS;
    let width = 1u64 << (p - HIST_SUB_BITS);
    let lo = (1u64 << p) + sub * width;
    (lo, lo + width)
}

/// The `q` quantile (`0.0..=1.0`, nearest-rank definition) of a histogram
/// whose entry `i` counts bucket `i`. Returns the middle of the bucket holding
/// the sample of rank `ceil(q·n)`, so the answer is within half a bucket
/// (≤ 3.125%) of the exact sample percentile; the overflow bucket answers its
/// lower bound. `None` for an empty histogram or `q` outside `0..=1` / NaN.
pub fn percentile(hist: &[u64], q: f64) -> Option<u64> {
    if !(0.0..=1.0).contains(&q) {
        return None;
    }
    let total: u64 = hist.iter().fold(0u64, |a, &c| a.saturating_add(c));
    if total == 0 {
        return None;
    }
    // Nearest rank: the smallest rank r with r >= q·n, at least 1.
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0u64;
    for (i, &c) in hist.iter().enumerate() {
        seen = seen.saturating_add(c);
        if seen >= rank {
            let (lo, hi) = bucket_bounds(i);
            if i >= HIST_BUCKETS - 1 {
                return Some(lo);
            }
            return Some(lo + (hi - 1 - lo) / 2);
        }
    }
    None // unreachable: seen reaches total >= rank
}

// ---------------------------------------------------------------------------
// Contact slots
// ---------------------------------------------------------------------------

/// A string in a worker's string region: `len` bytes at byte `offset` of that
/// region. `len == 0` means "no string" whatever the offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StrRef {
    pub offset: u32,
    pub len: u16,
}

/// The published liveness record of one contact (DESIGN §6, §7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotRecord {
    pub generation: u16,
    /// One of the `SLOT_*` codes.
    pub state: u8,
    /// 0 = no address, 4 = IPv4 in `addr[..4]`, 6 = IPv6.
    pub family: u8,
    pub port: u16,
    pub last_code: u16,
    pub misses: u16,
    pub addr: [u8; 16],
    pub sent: u32,
    pub answered: u32,
    pub rtt_last_us: u32,
    pub rtt_min_us: u32,
    pub rtt_max_us: u32,
    pub srtt_us: u32,
    pub rttvar_us: u32,
    pub interval_ms: u32,
    /// Unix ms.
    pub last_ping_ms: u64,
    /// Unix ms.
    pub last_reply_ms: u64,
    pub key_hash: u64,
    /// The contact URI (the Request-URI of every ping).
    pub uri: StrRef,
    /// The address-of-record as the To URI of every ping (a user-only AoR
    /// with `domain` added). The same `StrRef` as `uri` when they are equal.
    pub aor: StrRef,
}

impl SlotRecord {
    /// The destination address, if `family` names one.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip = match self.family {
            4 => IpAddr::V4(Ipv4Addr::new(
                self.addr[0],
                self.addr[1],
                self.addr[2],
                self.addr[3],
            )),
            6 => IpAddr::V6(Ipv6Addr::from(self.addr)),
            _ => return None,
        };
        Some(SocketAddr::new(ip, self.port))
    }

    /// Store `a` in `family`, `addr` and `port`.
    pub fn set_socket_addr(&mut self, a: SocketAddr) {
        self.addr = [0; 16];
        match a.ip() {
            IpAddr::V4(v4) => {
                self.family = 4;
                self.addr[..4].copy_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.family = 6;
                self.addr = v6.octets();
            }
        }
        self.port = a.port();
    }
}

/// 64-bit words per slot (word 0 = sequence).
pub const SLOT_WORDS: usize = 16;
/// Words 1..=RECORD_WORDS carry the record; the rest are reserved (zero).
pub const RECORD_WORDS: usize = 12;

/// One contact's published record: 128 bytes, two cache lines.
#[repr(C, align(64))]
pub struct Slot {
    /// Seqlock sequence: odd while the owning worker is writing.
    pub seq: AtomicU64,
    /// `words[..RECORD_WORDS]` = [`encode_record`]; the rest reserved.
    pub words: [AtomicU64; SLOT_WORDS - 1],
}

const _: () = assert!(size_of::<Slot>() == 128);
const _: () = assert!(align_of::<Slot>() == CACHE_LINE);
const _: () = assert!(RECORD_WORDS < SLOT_WORDS);

/// Pack a record into words (little-endian field order within each word).
///
/// ```text
/// w0  generation:16 | state:8 | family:8 | port:16 | last_code:16
/// w1  misses:16 | uri.len:16 | aor.len:16 | 0:16
/// w2  addr[0..8]           w3  addr[8..16]
/// w4  sent | answered<<32  w5  rtt_last_us | rtt_min_us<<32
/// w6  rtt_max_us | srtt_us<<32                w7  rttvar_us | interval_ms<<32
/// w8  last_ping_ms         w9  last_reply_ms    w10 key_hash
/// w11 uri.offset | aor.offset<<32
/// ```
#[inline]
pub fn encode_record(r: &SlotRecord) -> [u64; RECORD_WORDS] {
    let lo_hi = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
    let mut a0 = [0u8; 8];
    let mut a1 = [0u8; 8];
    a0.copy_from_slice(&r.addr[..8]);
    a1.copy_from_slice(&r.addr[8..]);
    [
        r.generation as u64
            | (r.state as u64) << 16
            | (r.family as u64) << 24
            | (r.port as u64) << 32
            | (r.last_code as u64) << 48,
        r.misses as u64 | (r.uri.len as u64) << 16 | (r.aor.len as u64) << 32,
        u64::from_le_bytes(a0),
        u64::from_le_bytes(a1),
        lo_hi(r.sent, r.answered),
        lo_hi(r.rtt_last_us, r.rtt_min_us),
        lo_hi(r.rtt_max_us, r.srtt_us),
        lo_hi(r.rttvar_us, r.interval_ms),
        r.last_ping_ms,
        r.last_reply_ms,
        r.key_hash,
        lo_hi(r.uri.offset, r.aor.offset),
    ]
}

/// The record words holding the URI and To string lengths (word 1, bits
/// 16..48, beside the misses) and offsets (word 11, low and high halves).
pub const STR_LENS_WORD: usize = 1;
pub const STR_OFFSETS_WORD: usize = 11;

/// Inverse of [`encode_record`]; total (any words decode to some record).
#[inline]
pub fn decode_record(w: &[u64; RECORD_WORDS]) -> SlotRecord {
    let (uri, aor) = decode_str_refs(w[STR_LENS_WORD], w[STR_OFFSETS_WORD]);
    let lo = |x: u64| x as u32;
    let hi = |x: u64| (x >> 32) as u32;
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&w[2].to_le_bytes());
    addr[8..].copy_from_slice(&w[3].to_le_bytes());
    SlotRecord {
        generation: w[0] as u16,
        state: (w[0] >> 16) as u8,
        family: (w[0] >> 24) as u8,
        port: (w[0] >> 32) as u16,
        last_code: (w[0] >> 48) as u16,
        misses: w[1] as u16,
        addr,
        sent: lo(w[4]),
        answered: hi(w[4]),
        rtt_last_us: lo(w[5]),
        rtt_min_us: hi(w[5]),
        rtt_max_us: lo(w[6]),
        srtt_us: hi(w[6]),
        rttvar_us: lo(w[7]),
        interval_ms: hi(w[7]),
        last_ping_ms: w[8],
        last_reply_ms: w[9],
        key_hash: w[10],
        uri,
        aor,
    }
}

/// The URI and To string references of a record, from its two words that
/// hold them (for a reader that wants only where the text is).
#[inline]
pub fn decode_str_refs(lens: u64, offsets: u64) -> (StrRef, StrRef) {
    let uri = StrRef {
        offset: offsets as u32,
        len: (lens >> 16) as u16,
    };
    let aor = StrRef {
        offset: (offsets >> 32) as u32,
        len: (lens >> 32) as u16,
    };
    (uri, aor)
}

// ---------------------------------------------------------------------------
// Per-worker block
// ---------------------------------------------------------------------------

/// One worker's counters and RTT histogram; written only by that worker.
#[repr(C, align(64))]
pub struct WorkerBlock {
    /// Indexed by [`Counter::index`]; words past `Counter::COUNT` are padding.
    pub counters: [AtomicU64; COUNTER_WORDS],
    /// Indexed by `wire::reply::Reject::index()`.
    pub rejects: [AtomicU64; REJECT_COUNTERS],
    /// Number of RTT samples recorded.
    pub rtt_count: AtomicU64,
    /// Sum of all recorded RTTs in µs.
    pub rtt_sum_us: AtomicU64,
    /// String-region reuse sequence: odd while the writer overwrites bytes of
    /// a previously freed string (see `shm::writer`), so a reader can tell
    /// that bytes it copied may belong to another contact.
    pub str_epoch: AtomicU64,
    /// Bytes of the string region currently allocated (incl. size-class slack).
    pub str_used_bytes: AtomicU64,
    /// High-water mark of the string region's bump pointer.
    pub str_bump_bytes: AtomicU64,
    pub reserved: [AtomicU64; 3],
    /// RTT histogram, [`bucket_index`] of the RTT in µs.
    pub hist: [AtomicU64; HIST_BUCKETS],
}

const _: () = assert!(size_of::<WorkerBlock>().is_multiple_of(CACHE_LINE));
const _: () = assert!(offset_of!(WorkerBlock, rejects) % CACHE_LINE == 0);
const _: () = assert!(offset_of!(WorkerBlock, hist) % CACHE_LINE == 0);
const _: () = assert!(Counter::COUNT <= COUNTER_WORDS);

// ---------------------------------------------------------------------------
// Registrar block (version 3)
// ---------------------------------------------------------------------------

/// The registrar feed's figures (DESIGN §11: `--dmq`, `--registrar-rpc`),
/// published by the daemon's main thread about once a second with the
/// heartbeat. The discriminant is the index into [`RegistrarBlock::words`];
/// new entries are appended (and bump [`VERSION`]). Counters are totals since
/// the daemon started; the entries documented as gauges are current values,
/// the three flags 0 or 1. With no feed configured the whole block stays zero.
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegistrarStat {
    // What the feed did to kaping's contacts (`daemon::feed`).
    /// Contacts added from the feed.
    Added,
    /// Contacts updated in place (liveness kept).
    Updated,
    /// Records that changed nothing but the expiry.
    Refreshed,
    /// Contacts deleted by the registrar.
    Deleted,
    /// Deletes of a contact kaping did not hold.
    DeleteUnknown,
    /// Contacts replaced by a record of the same ruid with another URI.
    Moved,
    /// Contacts removed when their own `expires` passed.
    Expired,
    /// Contacts dropped after a full sync that did not refresh them.
    StaleAfterSync,
    /// Records left to another shard (`--shard`).
    OtherShard,
    /// Records kaping could not ping (bad URI, full slab, ...).
    Refused,
    /// Full syncs completed.
    SyncsDone,
    // The DMQ node (`registrar::node::NodeCounters`).
    /// Datagrams received on the node's socket.
    Received,
    /// KDMQ requests from peers and the nodes they announce.
    Requests,
    /// Retransmitted requests (answered again, not applied).
    Duplicates,
    /// KDMQ from an address that is neither a peer nor announced (unanswered).
    NotPeer,
    /// Datagrams or bodies that do not parse, or are too large.
    Rejected,
    /// usrloc records received.
    Changes,
    /// Peers joined.
    Joins,
    /// Full syncs asked for.
    Syncs,
    /// Requests on other DMQ channels (answered, ignored).
    OtherChannels,
    /// Sync requests answered with an error (asked again).
    SyncRefused,
    /// Sync requests never answered, taken as complete once the records stopped.
    SyncUnanswered,
    /// Peers found to have forgotten kaping (restarted), synced from again.
    PeerRestarts,
    // Removal from the registrar (`--registrar-rpc`, `registrar::rpc`).
    /// Removals the guard let through to the registrar.
    RemovalsSent,
    /// Removals the guard withheld.
    RemovalsWithheld,
    /// Times the guard tripped.
    GuardTrips,
    /// Removals the registrar confirmed.
    Removed,
    /// Removals of a contact the registrar no longer had.
    RemoveNotFound,
    /// Removals refused with another error, or unanswered after every try.
    RemoveFailed,
    /// Removal attempts that got no answer (each retried; per attempt, not per removal).
    RemoveUnanswered,
    /// Removals whose delete came back from the registrar over DMQ.
    RemovalsConfirmed,
    // Gauges.
    /// Contacts of the feed kaping holds (gauge).
    Contacts,
    /// 1 while the removal guard withholds removals (gauge).
    GuardTripped,
    /// 1 when the daemon runs the feed (`--dmq`).
    FeedConfigured,
    /// 1 when removal from the registrar is on (`--registrar-rpc`).
    RemovalConfigured,
}

impl RegistrarStat {
    pub const COUNT: usize = 35;
    pub const ALL: [RegistrarStat; RegistrarStat::COUNT] = [
        RegistrarStat::Added,
        RegistrarStat::Updated,
        RegistrarStat::Refreshed,
        RegistrarStat::Deleted,
        RegistrarStat::DeleteUnknown,
        RegistrarStat::Moved,
        RegistrarStat::Expired,
        RegistrarStat::StaleAfterSync,
        RegistrarStat::OtherShard,
        RegistrarStat::Refused,
        RegistrarStat::SyncsDone,
        RegistrarStat::Received,
        RegistrarStat::Requests,
        RegistrarStat::Duplicates,
        RegistrarStat::NotPeer,
        RegistrarStat::Rejected,
        RegistrarStat::Changes,
        RegistrarStat::Joins,
        RegistrarStat::Syncs,
        RegistrarStat::OtherChannels,
        RegistrarStat::SyncRefused,
        RegistrarStat::SyncUnanswered,
        RegistrarStat::PeerRestarts,
        RegistrarStat::RemovalsSent,
        RegistrarStat::RemovalsWithheld,
        RegistrarStat::GuardTrips,
        RegistrarStat::Removed,
        RegistrarStat::RemoveNotFound,
        RegistrarStat::RemoveFailed,
        RegistrarStat::RemoveUnanswered,
        RegistrarStat::RemovalsConfirmed,
        RegistrarStat::Contacts,
        RegistrarStat::GuardTripped,
        RegistrarStat::FeedConfigured,
        RegistrarStat::RemovalConfigured,
    ];

    /// Stable snake_case name (JSON key): the same words as the `registrar`
    /// object of `keepalive.stats` where that has the figure.
    pub fn name(self) -> &'static str {
        match self {
            RegistrarStat::Added => "added",
            RegistrarStat::Updated => "updated",
            RegistrarStat::Refreshed => "refreshed",
            RegistrarStat::Deleted => "deleted",
            RegistrarStat::DeleteUnknown => "delete_unknown",
            RegistrarStat::Moved => "moved",
            RegistrarStat::Expired => "expired",
            RegistrarStat::StaleAfterSync => "stale_after_sync",
            RegistrarStat::OtherShard => "other_shard",
            RegistrarStat::Refused => "refused",
            RegistrarStat::SyncsDone => "syncs_done",
            RegistrarStat::Received => "received",
            RegistrarStat::Requests => "requests",
            RegistrarStat::Duplicates => "duplicates",
            RegistrarStat::NotPeer => "not_peer",
            RegistrarStat::Rejected => "rejected",
            RegistrarStat::Changes => "changes",
            RegistrarStat::Joins => "joins",
            RegistrarStat::Syncs => "syncs",
            RegistrarStat::OtherChannels => "other_channels",
            RegistrarStat::SyncRefused => "sync_refused",
            RegistrarStat::SyncUnanswered => "sync_unanswered",
            RegistrarStat::PeerRestarts => "peer_restarts",
            RegistrarStat::RemovalsSent => "removals_sent",
            RegistrarStat::RemovalsWithheld => "removals_withheld",
            RegistrarStat::GuardTrips => "guard_trips",
            RegistrarStat::Removed => "removed",
            RegistrarStat::RemoveNotFound => "remove_not_found",
            RegistrarStat::RemoveFailed => "remove_failed",
            RegistrarStat::RemoveUnanswered => "remove_unanswered",
            RegistrarStat::RemovalsConfirmed => "removals_confirmed",
            RegistrarStat::Contacts => "contacts",
            RegistrarStat::GuardTripped => "guard_tripped",
            RegistrarStat::FeedConfigured => "feed_configured",
            RegistrarStat::RemovalConfigured => "removal_configured",
        }
    }

    /// A current value rather than a total (the flags included).
    pub fn is_gauge(self) -> bool {
        matches!(
            self,
            RegistrarStat::Contacts
                | RegistrarStat::GuardTripped
                | RegistrarStat::FeedConfigured
                | RegistrarStat::RemovalConfigured
        )
    }

    /// A gauge that is only ever 0 or 1 (JSON shows it as a bool).
    pub fn is_flag(self) -> bool {
        self.is_gauge() && self != RegistrarStat::Contacts
    }

    /// Index into [`RegistrarBlock::words`] and [`RegistrarFigures::values`].
    #[inline]
    pub fn index(self) -> usize {
        self as usize
    }
}

const _: () = {
    let mut i = 0;
    while i < RegistrarStat::COUNT {
        assert!(RegistrarStat::ALL[i] as usize == i);
        i += 1;
    }
    assert!(RegistrarStat::RemovalConfigured as usize == RegistrarStat::COUNT - 1);
};

/// Value words of the registrar block: the sequence word plus these fill
/// whole cache lines; words past `RegistrarStat::COUNT` are reserved (zero).
pub const REGISTRAR_WORDS: usize = round_up(RegistrarStat::COUNT + 1, CACHE_LINE / 8) - 1;

/// The registrar figures, one `u64` per [`RegistrarStat`]: what the daemon
/// publishes and what a reader gets back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegistrarFigures {
    pub values: [u64; RegistrarStat::COUNT],
}

impl Default for RegistrarFigures {
    fn default() -> Self {
        RegistrarFigures {
            values: [0; RegistrarStat::COUNT],
        }
    }
}

impl RegistrarFigures {
    #[inline]
    pub fn get(&self, s: RegistrarStat) -> u64 {
        self.values[s.index()]
    }

    #[inline]
    pub fn set(&mut self, s: RegistrarStat, v: u64) {
        self.values[s.index()] = v;
    }

    /// A flag entry (`GuardTripped`, `FeedConfigured`, `RemovalConfigured`).
    #[inline]
    pub fn flag(&self, s: RegistrarStat) -> bool {
        self.get(s) != 0
    }
}

/// The registrar figures in the file: a seqlock over [`REGISTRAR_WORDS`]
/// words, written only by the daemon's main thread (`ShmFile::write_registrar`,
/// which takes `&mut`), read by anyone (`ShmReader::registrar`) as the slots
/// are: sequence, words, fence, sequence again.
#[repr(C, align(64))]
pub struct RegistrarBlock {
    /// Seqlock sequence: odd while the daemon rewrites the words.
    pub seq: AtomicU64,
    /// Indexed by [`RegistrarStat::index`]; the rest reserved.
    pub words: [AtomicU64; REGISTRAR_WORDS],
}

const _: () = assert!(size_of::<RegistrarBlock>().is_multiple_of(CACHE_LINE));
const _: () = assert!(size_of::<RegistrarBlock>() == (REGISTRAR_WORDS + 1) * 8);
const _: () = assert!(RegistrarStat::COUNT <= REGISTRAR_WORDS);

// ---------------------------------------------------------------------------
// Header
// ---------------------------------------------------------------------------

/// The file header. The geometry fields are written once before the file is
/// published (renamed into place); `heartbeat_ms`, `stopped` and `backend`
/// change afterwards, the latter under the `names_seq` seqlock.
#[repr(C, align(64))]
pub struct Header {
    /// [`MAGIC_WORD`], stored last (Release) when the file is initialised.
    pub magic: AtomicU64,
    pub version: AtomicU32,
    /// `size_of::<Header>()`.
    pub header_size: AtomicU32,
    pub file_size: AtomicU64,
    pub workers: AtomicU32,
    pub slots_per_worker: AtomicU32,
    /// Already rounded up to a whole cache line.
    pub string_bytes_per_worker: AtomicU32,
    /// `size_of::<Slot>()`.
    pub slot_size: AtomicU32,
    /// `size_of::<WorkerBlock>()`.
    pub worker_block_size: AtomicU32,
    /// `Counter::COUNT`.
    pub counter_count: AtomicU32,
    /// `REJECT_COUNTERS`.
    pub reject_count: AtomicU32,
    /// `HIST_BUCKETS`.
    pub hist_buckets: AtomicU32,
    pub workers_offset: AtomicU64,
    pub slots_offset: AtomicU64,
    pub slots_stride: AtomicU64,
    pub strings_offset: AtomicU64,
    pub strings_stride: AtomicU64,
    pub pid: AtomicU32,
    /// 1 once the daemon has stopped cleanly.
    pub stopped: AtomicU32,
    /// Unix ms.
    pub start_ms: AtomicU64,
    /// Unix ms; updated every second by the daemon.
    pub heartbeat_ms: AtomicU64,
    /// Seqlock over `backend` (odd while it is rewritten).
    pub names_seq: AtomicU64,
    /// UTF-8, NUL-padded; written once before publication.
    pub instance: [AtomicU8; INSTANCE_NAME_MAX],
    /// UTF-8, NUL-padded; under `names_seq`.
    pub backend: [AtomicU8; BACKEND_NAME_MAX],
    /// `--shard K/N`: this instance's shard K (version 2).
    pub shard_index: AtomicU32,
    /// N; 0 when the instance is not sharded (version 2).
    pub shard_count: AtomicU32,
    /// Byte offset of the [`RegistrarBlock`] (version 3; 0 in version 2).
    pub registrar_offset: AtomicU64,
    /// `size_of::<RegistrarBlock>()` (version 3; 0 in version 2).
    pub registrar_block_size: AtomicU32,
    /// `RegistrarStat::COUNT` (version 3; 0 in version 2).
    pub registrar_count: AtomicU32,
}

/// The header of versions 2 and 3: the registrar fields took tail padding,
/// so a version 2 header reads as a version 3 one with them zero.
pub const HEADER_SIZE: usize = 256;

const _: () = assert!(offset_of!(Header, magic) == 0);
const _: () = assert!(size_of::<Header>().is_multiple_of(CACHE_LINE));
const _: () = assert!(size_of::<Header>() == HEADER_SIZE);
const _: () = assert!(offset_of!(Header, shard_count) + 4 == offset_of!(Header, registrar_offset));

/// Why a geometry is impossible.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("worker count {0} is out of range (1..={max})", max = WORKERS_MAX)]
    Workers(u32),
    #[error("slots per worker {0} is out of range (0..={max})", max = SLOTS_PER_WORKER_MAX)]
    Slots(u32),
    #[error("string bytes per worker {0} is too large (max {max})", max = STRING_BYTES_MAX)]
    StringBytes(u32),
    #[error("total shm size does not fit in this address space")]
    TooLarge,
}

/// Largest `string_bytes_per_worker` (after rounding it stays a `u32`).
pub const STRING_BYTES_MAX: u32 = u32::MAX - (CACHE_LINE as u32 - 1);

/// Where everything is, derived from the three sizes alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub workers: u32,
    pub slots_per_worker: u32,
    /// Rounded up to a multiple of [`CACHE_LINE`].
    pub string_bytes_per_worker: u32,
    pub workers_offset: u64,
    pub slots_offset: u64,
    pub slots_stride: u64,
    pub strings_offset: u64,
    pub strings_stride: u64,
    /// Byte offset of the [`RegistrarBlock`]; 0 for a version 2 file, which
    /// has none.
    pub registrar_offset: u64,
    pub file_size: u64,
}

impl Geometry {
    /// The geometry of a file of this build's [`VERSION`].
    pub fn new(
        workers: u32,
        slots_per_worker: u32,
        string_bytes_per_worker: u32,
    ) -> Result<Geometry, GeometryError> {
        Geometry::for_version(VERSION, workers, slots_per_worker, string_bytes_per_worker)
    }

    /// The geometry of a file of layout `version` (caller checks it is within
    /// [`VERSION_READ_MIN`]..=[`VERSION`]): version 2 ends after the strings,
    /// version 3 appends the [`RegistrarBlock`] there.
    pub fn for_version(
        version: u32,
        workers: u32,
        slots_per_worker: u32,
        string_bytes_per_worker: u32,
    ) -> Result<Geometry, GeometryError> {
        if workers == 0 || workers > WORKERS_MAX {
            return Err(GeometryError::Workers(workers));
        }
        if slots_per_worker > SLOTS_PER_WORKER_MAX {
            return Err(GeometryError::Slots(slots_per_worker));
        }
        if string_bytes_per_worker > STRING_BYTES_MAX {
            return Err(GeometryError::StringBytes(string_bytes_per_worker));
        }
        let strings = round_up(string_bytes_per_worker as usize, CACHE_LINE) as u64;
        let w = workers as u64;
        // Bounded: 256 × (2^24 × 128 + 2^32 + block) < 2^41, no overflow in u64.
        let workers_offset = size_of::<Header>() as u64;
        let slots_offset = workers_offset + w * size_of::<WorkerBlock>() as u64;
        let slots_stride = slots_per_worker as u64 * size_of::<Slot>() as u64;
        let strings_offset = slots_offset + w * slots_stride;
        let strings_end = strings_offset + w * strings;
        let (registrar_offset, file_size) = if version >= 3 {
            (
                strings_end,
                strings_end + size_of::<RegistrarBlock>() as u64,
            )
        } else {
            (0, strings_end)
        };
        if usize::try_from(file_size).is_err() {
            return Err(GeometryError::TooLarge);
        }
        Ok(Geometry {
            workers,
            slots_per_worker,
            string_bytes_per_worker: strings as u32,
            workers_offset,
            slots_offset,
            slots_stride,
            strings_offset,
            strings_stride: strings,
            registrar_offset,
            file_size,
        })
    }

    /// Whether the file has a [`RegistrarBlock`] (version 3 on).
    #[inline]
    pub fn has_registrar(&self) -> bool {
        self.registrar_offset != 0
    }

    /// Byte offset of worker `w`'s [`WorkerBlock`] (caller checks `w < workers`).
    #[inline]
    pub fn worker_block_offset(&self, w: u32) -> u64 {
        self.workers_offset + w as u64 * size_of::<WorkerBlock>() as u64
    }

    /// Byte offset of worker `w`'s first [`Slot`].
    #[inline]
    pub fn slots_offset_of(&self, w: u32) -> u64 {
        self.slots_offset + w as u64 * self.slots_stride
    }

    /// Byte offset of worker `w`'s string region.
    #[inline]
    pub fn strings_offset_of(&self, w: u32) -> u64 {
        self.strings_offset + w as u64 * self.strings_stride
    }
}

/// `x` rounded up to a multiple of the power of two `to`.
pub const fn round_up(x: usize, to: usize) -> usize {
    (x + to - 1) & !(to - 1)
}

/// Decode a NUL-padded name field into `out` (lossy UTF-8).
pub fn name_from_bytes(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_cover_everything_contiguously() {
        assert_eq!(HIST_BUCKETS, 465);
        let mut expect_lo = 0u64;
        for i in 0..HIST_BUCKETS {
            let (lo, hi) = bucket_bounds(i);
            assert_eq!(lo, expect_lo, "bucket {i} starts where {} ended", i - 1);
            assert!(hi > lo);
            assert_eq!(bucket_index(lo), i);
            assert_eq!(bucket_index(hi - 1), i, "bucket {i} [{lo},{hi})");
            if i < HIST_BUCKETS - 1 {
                // ≤ 6.25% relative width everywhere past the exact range.
                assert!(
                    (hi - lo) * 16 <= lo.max(16),
                    "bucket {i} [{lo},{hi}) too wide"
                );
            }
            expect_lo = hi;
        }
        assert_eq!(expect_lo, u64::MAX);
        assert_eq!(bucket_index(u64::MAX), HIST_BUCKETS - 1);
        assert_eq!(bucket_index(u32::MAX as u64), HIST_BUCKETS - 2);
        assert_eq!(
            bucket_bounds(HIST_BUCKETS + 7),
            bucket_bounds(HIST_BUCKETS - 1)
        );
    }

    #[test]
    fn exact_small_values() {
        for us in 0..16u64 {
            assert_eq!(bucket_bounds(bucket_index(us)), (us, us + 1));
        }
        assert_eq!(bucket_index(16), 16);
        assert_eq!(bucket_index(31), 31);
        assert_eq!(bucket_index(32), 32);
        assert_eq!(bucket_index(33), 32);
        assert_eq!(bucket_bounds(32), (32, 34));
    }

    #[test]
    fn percentile_edges() {
        let mut h = vec![0u64; HIST_BUCKETS];
        assert_eq!(percentile(&h, 0.5), None);
        h[bucket_index(1000)] = 10;
        let (lo, hi) = bucket_bounds(bucket_index(1000));
        let p = percentile(&h, 0.5).unwrap();
        assert!(lo <= p && p < hi);
        assert_eq!(percentile(&h, 0.0), percentile(&h, 1.0));
        assert_eq!(percentile(&h, 1.5), None);
        assert_eq!(percentile(&h, -0.1), None);
        assert_eq!(percentile(&h, f64::NAN), None);
        h[HIST_BUCKETS - 1] = 1;
        assert_eq!(percentile(&h, 1.0), Some(HIST_OVERFLOW_US));
        assert_eq!(percentile(&[0, 0, 3], 0.99), Some(2));
    }

    /// Nearest-rank percentile of a sorted sample.
    fn exact(sorted: &[u64], q: f64) -> u64 {
        let n = sorted.len() as u64;
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        sorted[(rank - 1) as usize]
    }

    proptest! {
        #[test]
        fn bucket_contains_value(us in any::<u64>()) {
            let (lo, hi) = bucket_bounds(bucket_index(us));
            prop_assert!(lo <= us && (us < hi || hi == u64::MAX));
        }

        #[test]
        fn percentile_within_bucket_error(
            // Log-uniform RTT-like samples from 0 µs to ~1 h.
            samples in prop::collection::vec((0u32..32, any::<u32>()), 1..400),
            q in prop::sample::select(vec![0.0, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0]),
        ) {
            let mut xs: Vec<u64> = samples
                .iter()
                .map(|&(bits, r)| if bits == 0 { 0 } else { (r as u64) & ((1u64 << bits) - 1) })
                .collect();
            let mut h = vec![0u64; HIST_BUCKETS];
            for &x in &xs {
                h[bucket_index(x)] += 1;
            }
            xs.sort_unstable();
            let want = exact(&xs, q);
            let got = percentile(&h, q).unwrap();
            let err = got.abs_diff(want);
            // Half a bucket: ≤ 3.125% of the value (exact below 16 µs).
            prop_assert!(err * 32 <= want, "q={} want={} got={}", q, want, got);
        }

        #[test]
        fn record_round_trip(
            g in any::<u16>(), st in 0u8..=4, fam in prop::sample::select(vec![0u8, 4, 6]),
            port in any::<u16>(), code in any::<u16>(), misses in any::<u16>(),
            addr in any::<[u8; 16]>(), u32s in any::<[u32; 8]>(), u64s in any::<[u64; 3]>(),
            uo in any::<u32>(), ul in any::<u16>(), ao in any::<u32>(), al in any::<u16>(),
        ) {
            let r = SlotRecord {
                generation: g, state: st, family: fam, port, last_code: code, misses, addr,
                sent: u32s[0], answered: u32s[1], rtt_last_us: u32s[2], rtt_min_us: u32s[3],
                rtt_max_us: u32s[4], srtt_us: u32s[5], rttvar_us: u32s[6], interval_ms: u32s[7],
                last_ping_ms: u64s[0], last_reply_ms: u64s[1], key_hash: u64s[2],
                uri: StrRef { offset: uo, len: ul }, aor: StrRef { offset: ao, len: al },
            };
            prop_assert_eq!(decode_record(&encode_record(&r)), r);
        }
    }

    #[test]
    fn zero_words_are_a_free_slot() {
        let r = decode_record(&[0; RECORD_WORDS]);
        assert_eq!(r, SlotRecord::default());
        assert_eq!(r.state, SLOT_FREE);
        assert_eq!(encode_record(&SlotRecord::default()), [0; RECORD_WORDS]);
    }

    #[test]
    fn every_field_lands_in_its_own_bits() {
        // Setting one field to all-ones must change only that field on decode.
        let base = SlotRecord::default();
        let one = |f: &dyn Fn(&mut SlotRecord)| {
            let mut r = base;
            f(&mut r);
            assert_eq!(decode_record(&encode_record(&r)), r);
            r
        };
        one(&|r| r.generation = u16::MAX);
        one(&|r| r.state = u8::MAX);
        one(&|r| r.family = u8::MAX);
        one(&|r| r.port = u16::MAX);
        one(&|r| r.last_code = u16::MAX);
        one(&|r| r.misses = u16::MAX);
        one(&|r| r.uri.len = u16::MAX);
        one(&|r| r.aor.len = u16::MAX);
        one(&|r| r.uri.offset = u32::MAX);
        one(&|r| r.aor.offset = u32::MAX);
        one(&|r| r.interval_ms = u32::MAX);
        // Reserved bits of word 1 stay zero.
        let w = encode_record(&SlotRecord {
            misses: u16::MAX,
            uri: StrRef {
                offset: 0,
                len: u16::MAX,
            },
            aor: StrRef {
                offset: 0,
                len: u16::MAX,
            },
            ..base
        });
        assert_eq!(w[1] >> 48, 0);
    }

    #[test]
    fn socket_addr_round_trip() {
        let mut r = SlotRecord::default();
        assert_eq!(r.socket_addr(), None);
        for a in ["192.0.2.7:5060", "[2001:db8::1]:5061"] {
            let a: SocketAddr = a.parse().unwrap();
            r.set_socket_addr(a);
            assert_eq!(r.socket_addr(), Some(a));
            assert_eq!(decode_record(&encode_record(&r)).socket_addr(), Some(a));
        }
    }

    #[test]
    fn geometry_is_aligned_and_bounded() {
        let g = Geometry::new(3, 1000, 100).unwrap();
        assert_eq!(g.string_bytes_per_worker, 128);
        for off in [
            g.workers_offset,
            g.slots_offset,
            g.strings_offset,
            g.file_size,
        ] {
            assert_eq!(off % CACHE_LINE as u64, 0);
        }
        assert_eq!(g.slots_offset_of(2) + g.slots_stride, g.strings_offset);
        assert_eq!(
            g.strings_offset_of(2) + g.strings_stride,
            g.registrar_offset
        );
        assert_eq!(g.registrar_offset % CACHE_LINE as u64, 0);
        assert_eq!(
            g.registrar_offset + size_of::<RegistrarBlock>() as u64,
            g.file_size
        );
        assert_eq!(Geometry::new(0, 1, 1), Err(GeometryError::Workers(0)));
        assert_eq!(Geometry::new(257, 1, 1), Err(GeometryError::Workers(257)));
        assert_eq!(
            Geometry::new(1, SLOTS_PER_WORKER_MAX + 1, 1),
            Err(GeometryError::Slots(SLOTS_PER_WORKER_MAX + 1))
        );
        assert!(Geometry::new(1, 1, u32::MAX).is_err());
        let big = Geometry::new(WORKERS_MAX, SLOTS_PER_WORKER_MAX, STRING_BYTES_MAX).unwrap();
        assert!(big.file_size < 1 << 41);
    }

    #[test]
    fn version_2_is_version_3_without_the_registrar_block() {
        for (w, s, b) in [(1, 0, 0), (3, 1000, 100), (256, 7, 4096)] {
            let v3 = Geometry::new(w, s, b).unwrap();
            let v2 = Geometry::for_version(2, w, s, b).unwrap();
            assert!(v3.has_registrar() && !v2.has_registrar());
            assert_eq!(v2.registrar_offset, 0);
            // Nothing before the block moved.
            assert_eq!(
                (v2.workers_offset, v2.slots_offset, v2.strings_offset),
                (v3.workers_offset, v3.slots_offset, v3.strings_offset)
            );
            assert_eq!(v2.file_size, v3.registrar_offset);
            assert_eq!(
                v3.file_size - v2.file_size,
                size_of::<RegistrarBlock>() as u64
            );
        }
        // The header keeps version 2's size, the new fields in its tail.
        assert_eq!(size_of::<Header>(), HEADER_SIZE);
        assert!(offset_of!(Header, registrar_count) + 4 <= HEADER_SIZE);
        assert_eq!(VERSION_READ_MIN, 2);
        assert_eq!(VERSION, 4);
    }

    #[test]
    fn version_4_counters_took_padding_and_moved_nothing() {
        // Every version has the same geometry: the new counters sit in
        // words that were padding.
        for version in VERSION_READ_MIN..=VERSION {
            let g = Geometry::for_version(version, 3, 100, 4096).unwrap();
            let v3 = Geometry::for_version(3.max(version), 3, 100, 4096).unwrap();
            assert_eq!(g.slots_offset, v3.slots_offset, "version {version}");
        }
        assert_eq!(Counter::count_in_version(2), 19);
        assert_eq!(Counter::count_in_version(3), 19);
        assert_eq!(Counter::count_in_version(4), Counter::COUNT);
        assert_eq!(COUNTER_WORDS, 24, "the counter words did not grow");
        assert_eq!(
            Counter::ALL[Counter::count_in_version(3) - 1],
            Counter::ContactsUnmonitored,
            "version 3's last counter"
        );
    }

    #[test]
    fn registrar_stats_have_unique_names_and_fit_the_block() {
        let mut names: Vec<_> = RegistrarStat::ALL.iter().map(|s| s.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), RegistrarStat::COUNT);
        assert_eq!(REGISTRAR_WORDS, 39);
        assert_eq!(size_of::<RegistrarBlock>(), 320);
        let gauges: Vec<_> = RegistrarStat::ALL
            .iter()
            .filter(|s| s.is_gauge())
            .map(|s| s.name())
            .collect();
        assert_eq!(
            gauges,
            [
                "contacts",
                "guard_tripped",
                "feed_configured",
                "removal_configured"
            ]
        );
        let flags = RegistrarStat::ALL.iter().filter(|s| s.is_flag()).count();
        assert_eq!(flags, 3);
        let mut f = RegistrarFigures::default();
        f.set(RegistrarStat::RemovalConfigured, 1);
        f.set(RegistrarStat::Added, 7);
        assert!(f.flag(RegistrarStat::RemovalConfigured));
        assert!(!f.flag(RegistrarStat::FeedConfigured));
        assert_eq!(f.get(RegistrarStat::Added), 7);
        assert_eq!(f.values[RegistrarStat::COUNT - 1], 1);
    }

    #[test]
    fn counter_names_are_unique() {
        let mut names: Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Counter::COUNT);
    }

    #[test]
    fn name_field_decoding() {
        assert_eq!(name_from_bytes(b"io_uring\0\0\0"), "io_uring");
        assert_eq!(name_from_bytes(b"full"), "full");
    }
}
