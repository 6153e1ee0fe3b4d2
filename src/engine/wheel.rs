//! The per-worker hierarchical timer wheel: when each contact's next ping (or
//! reply timeout) is due.
//!
//! Ownership: each worker owns one `Wheel`, sized to its contact slab. An
//! armed timer is named by its slab slot (`index`); the wheel owns the
//! intrusive list links of every slot in one `Vec<Link>` column (the slab's
//! "wheel column"), so arming a timer never allocates and the slab entries
//! stay free of wheel bookkeeping. One index has at most one timer; arming it
//! again moves it.
//!
//! Callers: the worker, on every contact add/remove (insert/cancel), after
//! every send (re-arm at the next interval or the reply timeout) and in its
//! event loop (`next_deadline` to size the io_uring wait, `poll_expired` to
//! collect due contacts in bounded batches).
//!
//! # Ground rules
//!
//! * Time is a `u64` tick count, 1 tick = 1 ms, on the worker's monotonic
//!   clock. The wheel has advanced to [`Wheel::now_tick`]; it only moves
//!   forward (an earlier `now_tick` passed to `poll_expired` does not move
//!   it back).
//! * A timer never fires early: `poll_expired(now)` returns an index only if
//!   its deadline is `<= now`. A timer never fires late: it is returned by
//!   the first `poll_expired(now)` with `now >= deadline`, unless that call
//!   already returned `limit` indexes, in which case it comes out of the next
//!   call first (due entries wait in a "pending" list; nothing is lost).
//! * A deadline `<= now_tick()` at `insert` is due at once: the next poll
//!   returns it, whatever `now` that poll is given.
//! * Cancelling or re-arming an index removes it from wherever it is,
//!   including the pending list, so a cancelled or moved timer never comes out
//!   stale, even between two limited polls.
//! * Order: due entries come out tick by tick (all of an earlier tick before
//!   any of a later one reached by the same poll), in no particular order
//!   within a tick; an entry armed with a past deadline joins what is due now.
//! * Every `u64` deadline is exact, up to `u64::MAX`. With 64 slots per level
//!   each level covers 6 more bits of the deadline; 11 levels cover all 64
//!   bits (the top level uses 16 of its slots), so there is no overflow list
//!   and no clamping: a deadline five years (or five million years) away lands
//!   in its slot and cascades down to fire on its exact tick. Tokio stops at
//!   6 levels (about 2.2 years) and clamps beyond; the 5 extra levels cost us
//!   5 more bitmap words to test, and only when every lower level is empty.
//!
//! # Levels
//!
//! An armed timer whose deadline is later than `now_tick` sits in the level of
//! the most significant bit in which its deadline differs from `now_tick` (6
//! bits per level), in the slot given by the deadline's 6 bits of that level.
//! As the wheel advances to the start of an occupied slot of level `L > 0`,
//! the slot's timers are *cascaded*: re-inserted relative to the new
//! `now_tick`, into a lower level (or the pending list if due). Each timer is
//! therefore touched at most once per level below its starting level.
//!
//! | Level | Slot width        | Level range       |
//! |-------|-------------------|-------------------|
//! | 0     | 1 ms              | 64 ms             |
//! | 1     | 64 ms             | ~ 4 s             |
//! | 2     | ~ 4 s             | ~ 4 min           |
//! | 3     | ~ 4 min           | ~ 4.7 h           |
//! | 4     | ~ 4.7 h           | ~ 12.4 days       |
//! | 5     | ~ 12.4 days       | ~ 2.2 years       |
//! | 6     | ~ 2.2 years       | ~ 139 years       |
//! | 7     | ~ 139 years       | ~ 8,900 years     |
//! | 8     | ~ 8,900 years     | ~ 571,000 years   |
//! | 9     | ~ 571,000 years   | ~ 36.5 M years    |
//! | 10    | ~ 36.5 M years    | rest of `u64` (~ 585 M years, 16 slots) |
//!
//! # Data structure
//!
//! Each level is 64 slots of list heads plus a `u64` occupied bitmap (bit
//! `s` set iff slot `s` is non-empty); the next occupied slot at or after
//! the current one is `occupied.rotate_right(now_slot).trailing_zeros()`, as
//! in tokio and the Linux kernel (LWN 646056). The lists are doubly linked through `u32`
//! indexes into the link column (`NIL` ends a list), so insert and cancel are
//! O(1) with no pointers and no `unsafe`. A link does not record which list it
//! is in: by the invariant below, the list follows from the deadline and
//! `now_tick`, which keeps a link at 16 bytes (16 MiB per million contacts).
//!
//! Lanes: each slot (and the pending list) is split into 4 lists, index `i`
//! always in lane `i % 4`. A cascade or an expiry batch is a walk along
//! linked lists, and with a million contacts the column (16 MiB) is far out
//! of cache, so each step is a cache miss whose address depends on the
//! previous one. Walking the 4 lanes round-robin gives the CPU 4 independent
//! chains whose misses overlap: in the steady-state bench at 1M timers this
//! cut the cost per timer by 2.4x (8 lanes gained nothing more). Insert and
//! cancel stay O(1): an index's lane is fixed, so its list is still known.
//!
//! Invariant: an armed entry with `deadline > now_tick` is in slot
//! `slot_for(deadline, level_for(now_tick, deadline))`; an armed entry with
//! `deadline <= now_tick` is in the pending list. Advancing `now_tick` to the
//! start of the earliest occupied slot, cascading it, and (when nothing more
//! is due) jumping to `now` preserves it, because no occupied slot is ever
//! skipped.
//!
//! # `next_deadline`
//!
//! It is a safe lower bound, exact in the common case: the start of the
//! earliest occupied slot, found with at most 11 bitmap tests. A level-0 slot
//! holds one tick, so when the earliest timer is less than 64 ms away
//! (always, with thousands of contacts per second) the value is exact. When
//! the earliest timer sits in a higher level, the value is the start of its
//! slot; the worker wakes there, `poll_expired` cascades the slot, returns
//! nothing, and the next `next_deadline` is closer: at most one early wake per
//! level, never a late one. Making it exact would mean scanning the slot's
//! list, O(n) per call. While due entries wait (after a limited poll, or an
//! insert with a past deadline) it returns a lower bound of their deadlines,
//! `<= now_tick()`: "poll now".
//!
//! # Never
//!
//! No allocation after [`Wheel::new`] (16 bytes per index for the column
//! plus 11 KiB of list heads, once; `poll_expired` pushes into the
//! caller's `Vec`; reserve `limit` in it once and it never grows), no
//! `unsafe`, no blocking, no I/O. Panics only on a caller bug: `insert` with
//! an index outside the capacity (an `assert!`, since the slab guarantees
//! slots below its capacity and a wrong index would corrupt the lists).

use std::fmt;

/// Bits of the deadline each level resolves.
const LEVEL_BITS: u32 = 6;
/// Slots per level (2^LEVEL_BITS).
const LEVEL_SLOTS: usize = 1 << LEVEL_BITS;
const SLOT_MASK: u64 = (LEVEL_SLOTS as u64) - 1;
/// ceil(64 / 6): enough levels for every `u64` deadline (see module docs).
const LEVELS: usize = 64_usize.div_ceil(LEVEL_BITS as usize);

/// Lists per slot (and pending lists). An index always uses lane
/// `index % LANES`. Walking a slot's lanes in turn gives the CPU `LANES`
/// independent chains of loads, so cache misses during a cascade or an
/// expiry batch overlap instead of queueing one behind the other (module
/// docs, "Lanes").
const LANES: usize = 4;
const LANE_MASK: u32 = LANES as u32 - 1;
const EMPTY_LANES: [u32; LANES] = [NIL; LANES];

/// End of a list (in `next`), or "I am the head of my list" (in `prev`).
const NIL: u32 = u32::MAX;
/// `prev` value of an index that is not armed.
const UNARMED: u32 = u32::MAX - 1;
/// The largest capacity: indexes must stay below both sentinels.
const CAPACITY_MAX: u32 = UNARMED;

/// One index's place in the wheel: 16 bytes.
#[derive(Clone, Copy, Debug)]
struct Link {
    next: u32,
    /// `NIL` for a list head, `UNARMED` when not armed.
    prev: u32,
    deadline_tick: u64,
}

const UNARMED_LINK: Link = Link {
    next: NIL,
    prev: UNARMED,
    deadline_tick: 0,
};

/// The level an entry due at `deadline` belongs to, seen from `elapsed`
/// (`deadline > elapsed`): the level of the highest bit where they differ.
#[inline]
fn level_for(elapsed: u64, deadline: u64) -> usize {
    debug_assert!(
        deadline > elapsed,
        "level_for({elapsed}, {deadline}) of a due entry"
    );
    // OR-ing the level-0 bits keeps `leading_zeros` <= 58, so level 0 is
    // chosen for any difference confined to them.
    let masked = (elapsed ^ deadline) | SLOT_MASK;
    let significant = 63 - masked.leading_zeros();
    (significant / LEVEL_BITS) as usize
}

/// The slot of `deadline` within `level`.
#[inline]
fn slot_for(deadline: u64, level: usize) -> usize {
    ((deadline >> (level as u32 * LEVEL_BITS)) & SLOT_MASK) as usize
}

/// The next slot to process: where, and the tick its range starts at.
#[derive(Clone, Copy, Debug)]
struct Expiration {
    level: usize,
    slot: usize,
    start_tick: u64,
}

/// A hierarchical timer wheel over indexes `0..capacity` (module docs).
pub struct Wheel {
    /// The link column: one entry per index, allocated once.
    links: Vec<Link>,
    /// List heads per level, slot and lane; `occupied` bit set iff any lane
    /// of the slot is non-empty.
    heads: [[[u32; LANES]; LEVEL_SLOTS]; LEVELS],
    occupied: [u64; LEVELS],
    /// Heads (per lane) of the due entries not yet returned
    /// (`deadline <= elapsed`).
    pending: [u32; LANES],
    /// A lower bound of the deadlines in `pending` (`u64::MAX` when empty):
    /// lowered on every push, reset when the list empties, left as is on a
    /// cancel (still a lower bound), so `next_deadline` stays O(1).
    pending_min_tick: u64,
    /// The tick the wheel has advanced to.
    elapsed: u64,
    /// Armed indexes.
    len: u32,
}

impl Wheel {
    /// A wheel for indexes `0..capacity`, at tick `now_tick`. Allocates the
    /// link column (16 bytes per index) once.
    ///
    /// # Panics
    /// If `capacity` is `u32::MAX - 1` or more (two values are list sentinels;
    /// slabs are limited to 2^24 anyway).
    pub fn new(capacity: u32, now_tick: u64) -> Wheel {
        assert!(
            capacity < CAPACITY_MAX,
            "wheel capacity {capacity} collides with the list sentinels"
        );
        Wheel {
            links: vec![UNARMED_LINK; capacity as usize],
            heads: [[EMPTY_LANES; LEVEL_SLOTS]; LEVELS],
            occupied: [0; LEVELS],
            pending: EMPTY_LANES,
            pending_min_tick: u64::MAX,
            elapsed: now_tick,
            len: 0,
        }
    }

    /// Asks the CPU for `index`'s link ahead of an `insert` soon after (a
    /// hint: out-of-range indices are ignored).
    #[inline]
    pub fn prefetch(&self, index: u32) {
        if let Some(link) = self.links.get(index as usize) {
            crate::cpu::prefetch((link as *const Link).cast(), std::mem::size_of::<Link>());
        }
    }

    /// Arms `index` to fire at `deadline_tick`, moving it if it was already
    /// armed. A deadline `<= now_tick()` is due at the next poll. O(1).
    ///
    /// # Panics
    /// If `index >= capacity` (a caller bug: slab slots are below capacity).
    #[inline]
    pub fn insert(&mut self, index: u32, deadline_tick: u64) {
        assert!(
            (index as usize) < self.links.len(),
            "wheel index {index} out of range (capacity {})",
            self.links.len()
        );
        if self.links[index as usize].prev == UNARMED {
            self.len += 1;
        } else {
            self.unlink(index);
        }
        self.push(index, deadline_tick);
    }

    /// Disarms `index`; `false` if it was not armed (or is out of range).
    /// O(1). A cancelled index is never returned by `poll_expired`, even if it
    /// was already due.
    #[inline]
    pub fn cancel(&mut self, index: u32) -> bool {
        if !self.is_armed(index) {
            return false;
        }
        self.unlink(index);
        self.links[index as usize] = UNARMED_LINK;
        self.len -= 1;
        true
    }

    #[inline]
    pub fn is_armed(&self, index: u32) -> bool {
        self.links
            .get(index as usize)
            .is_some_and(|l| l.prev != UNARMED)
    }

    /// The deadline `index` is armed for.
    #[inline]
    pub fn deadline(&self, index: u32) -> Option<u64> {
        self.links
            .get(index as usize)
            .filter(|l| l.prev != UNARMED)
            .map(|l| l.deadline_tick)
    }

    /// The tick the wheel has advanced to. It can lag the `now` of the last
    /// poll when that poll hit its `limit` with more work due.
    #[inline]
    pub fn now_tick(&self) -> u64 {
        self.elapsed
    }

    /// The earliest tick at which something may be due, never later than the
    /// earliest armed deadline: exact when the earliest timer is within 64
    /// ticks, otherwise the start of its slot (see module docs). `Some(t)`
    /// with `t <= now_tick()` means due entries are waiting (`t` is then a
    /// lower bound of their deadlines); `None` means nothing is armed. O(1).
    #[inline]
    pub fn next_deadline(&self) -> Option<u64> {
        if self.pending != EMPTY_LANES {
            debug_assert!(self.pending_min_tick <= self.elapsed);
            return Some(self.pending_min_tick);
        }
        self.next_expiration().map(|e| e.start_tick)
    }

    /// Advances to `now_tick` and appends up to `limit` due indexes to `out`
    /// (disarming them); returns how many. Due entries beyond `limit` are
    /// returned by the next call, before anything else. Does not allocate if
    /// `out` has room for `limit` more elements.
    pub fn poll_expired(&mut self, now_tick: u64, out: &mut Vec<u32>, limit: usize) -> usize {
        let now_tick = now_tick.max(self.elapsed);
        let mut count = 0;
        loop {
            // Pop one entry per lane per round: the lanes' loads overlap.
            'drain: while count < limit && self.pending != EMPTY_LANES {
                for lane in 0..LANES {
                    if count == limit {
                        break 'drain;
                    }
                    let index = self.pending[lane];
                    if index == NIL {
                        continue;
                    }
                    let link = self.links[index as usize];
                    debug_assert!(
                        link.deadline_tick <= self.elapsed,
                        "pending index {index} due at {} but wheel is at {}",
                        link.deadline_tick,
                        self.elapsed
                    );
                    self.pending[lane] = link.next;
                    if link.next != NIL {
                        self.links[link.next as usize].prev = NIL;
                    }
                    self.links[index as usize] = UNARMED_LINK;
                    self.len -= 1;
                    out.push(index);
                    count += 1;
                }
            }
            if self.pending == EMPTY_LANES {
                self.pending_min_tick = u64::MAX;
                if self.elapsed == now_tick {
                    // Every entry left in the wheel is due after `elapsed`:
                    // done, without another bitmap scan (the common case of
                    // one poll per tick).
                    return count;
                }
            }
            if count == limit {
                // Anything still due stays pending (or in its slot) for the
                // next call; the wheel does not run ahead of what it returns.
                return count;
            }
            match self.next_expiration() {
                Some(e) if e.start_tick <= now_tick => self.process(e),
                _ => {
                    // Nothing occupied up to `now_tick`: jumping there skips
                    // no occupied slot, so the list invariant holds.
                    self.elapsed = now_tick;
                    return count;
                }
            }
        }
    }

    /// Armed indexes.
    #[inline]
    pub fn len(&self) -> u32 {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of indexes this wheel serves (the slab capacity).
    #[inline]
    pub fn capacity(&self) -> u32 {
        self.links.len() as u32
    }

    /// The earliest occupied slot. The lowest non-empty level holds it: a
    /// level-`L` entry is due within the current level-`L+1` slot, every
    /// higher-level entry in a later one.
    #[inline]
    fn next_expiration(&self) -> Option<Expiration> {
        for level in 0..LEVELS {
            let occupied = self.occupied[level];
            if occupied == 0 {
                continue;
            }
            let shift = level as u32 * LEVEL_BITS;
            // rotate_right takes its count modulo 64: the low 6 bits of
            // `elapsed >> shift` are the current slot of this level.
            let now_slot = (self.elapsed >> shift) as u32;
            let distance = occupied.rotate_right(now_slot).trailing_zeros();
            let slot = ((now_slot + distance) as u64 & SLOT_MASK) as usize;
            let level_start = if level + 1 < LEVELS {
                self.elapsed & !((1u64 << (shift + LEVEL_BITS)) - 1)
            } else {
                // The top level's range exceeds u64: it starts at 0.
                0
            };
            let start_tick = level_start + ((slot as u64) << shift);
            debug_assert!(
                start_tick > self.elapsed,
                "occupied slot {slot} of level {level} starts at {start_tick}, behind the wheel at {}",
                self.elapsed
            );
            return Some(Expiration {
                level,
                slot,
                start_tick,
            });
        }
        None
    }

    /// Advances to the start of slot `e` and empties it: due entries go to
    /// pending, the rest cascade to lower levels. Called only with the
    /// pending list empty.
    fn process(&mut self, e: Expiration) {
        debug_assert_eq!(self.pending, EMPTY_LANES);
        self.elapsed = e.start_tick;
        let mut cursor = self.heads[e.level][e.slot];
        self.heads[e.level][e.slot] = EMPTY_LANES;
        self.occupied[e.level] &= !(1u64 << e.slot);
        if e.level == 0 {
            // A level-0 slot is one tick: the whole slot is due at
            // `start_tick`. Splice its lanes in, O(1); their links stay valid.
            self.pending = cursor;
            self.pending_min_tick = e.start_tick;
            return;
        }
        // Walk the lanes in turn, one entry each per round, so the
        // (independent) loads of the lanes' next entries overlap. An entry
        // stays in its lane, so pushing it never touches another cursor.
        while cursor != EMPTY_LANES {
            for index in cursor.iter_mut() {
                if *index != NIL {
                    let i = *index;
                    *index = self.cascade_one(i, e.level);
                }
            }
        }
    }

    /// Re-inserts `index`, taken from a slot of `from_level` being processed,
    /// relative to the new `elapsed`; returns the next index of its old list.
    #[inline]
    fn cascade_one(&mut self, index: u32, from_level: usize) -> u32 {
        let link = self.links[index as usize];
        debug_assert!(link.deadline_tick >= self.elapsed);
        debug_assert!(
            link.deadline_tick == self.elapsed
                || level_for(self.elapsed, link.deadline_tick) < from_level,
            "cascade of index {index} (deadline {}) from level {from_level} does not descend",
            link.deadline_tick,
        );
        self.push(index, link.deadline_tick);
        link.next
    }

    /// Links `index` (currently unlinked) at the head of the list its deadline
    /// belongs to.
    #[inline]
    fn push(&mut self, index: u32, deadline_tick: u64) {
        let lane = (index & LANE_MASK) as usize;
        let head = if deadline_tick <= self.elapsed {
            self.pending_min_tick = self.pending_min_tick.min(deadline_tick);
            &mut self.pending[lane]
        } else {
            let level = level_for(self.elapsed, deadline_tick);
            let slot = slot_for(deadline_tick, level);
            self.occupied[level] |= 1u64 << slot;
            &mut self.heads[level][slot][lane]
        };
        let old = std::mem::replace(head, index);
        self.links[index as usize] = Link {
            next: old,
            prev: NIL,
            deadline_tick,
        };
        if old != NIL {
            self.links[old as usize].prev = index;
        }
    }

    /// Unlinks armed `index` from its list, leaving its link stale (the
    /// caller re-pushes or clears it).
    #[inline]
    fn unlink(&mut self, index: u32) {
        let Link {
            next,
            prev,
            deadline_tick,
        } = self.links[index as usize];
        debug_assert_ne!(prev, UNARMED, "unlink of unarmed index {index}");
        if prev == NIL {
            // The head of its list: which list follows from the invariant.
            let lane = (index & LANE_MASK) as usize;
            if deadline_tick <= self.elapsed {
                debug_assert_eq!(self.pending[lane], index);
                self.pending[lane] = next;
                if self.pending == EMPTY_LANES {
                    self.pending_min_tick = u64::MAX;
                }
            } else {
                let level = level_for(self.elapsed, deadline_tick);
                let slot = slot_for(deadline_tick, level);
                let heads = &mut self.heads[level][slot];
                debug_assert_eq!(heads[lane], index);
                heads[lane] = next;
                if *heads == EMPTY_LANES {
                    self.occupied[level] &= !(1u64 << slot);
                }
            }
        } else {
            self.links[prev as usize].next = next;
        }
        if next != NIL {
            self.links[next as usize].prev = prev;
        }
    }
}

impl fmt::Debug for Wheel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wheel")
            .field("now_tick", &self.elapsed)
            .field("len", &self.len)
            .field("capacity", &self.links.len())
            .field("pending", &(self.pending != EMPTY_LANES))
            .field("occupied", &self.occupied)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YEAR_MS: u64 = 365 * 24 * 3600 * 1000;

    #[test]
    fn prefetch_is_only_a_hint_for_any_index() {
        let mut w = Wheel::new(4, 0);
        w.insert(1, 10);
        for index in [0, 1, 3, 4, u32::MAX] {
            w.prefetch(index);
        }
        assert_eq!(w.deadline(1), Some(10));
        assert_eq!(w.len(), 1);
    }

    fn poll_all(w: &mut Wheel, now: u64) -> Vec<u32> {
        let mut out = Vec::new();
        w.poll_expired(now, &mut out, usize::MAX);
        out.sort_unstable();
        out
    }

    /// Drives the wheel as a worker does (sleep until `next_deadline`, poll)
    /// and checks that every entry fires at exactly its deadline and that no
    /// wake-up is later than the earliest deadline. Returns the wake count.
    fn drive_exact(w: &mut Wheel, deadlines: &[(u32, u64)]) -> usize {
        let mut remaining: Vec<(u32, u64)> = deadlines.to_vec();
        let mut out = Vec::new();
        let mut wakes = 0;
        while let Some(t) = w.next_deadline() {
            let earliest = remaining.iter().map(|&(_, d)| d).min().unwrap();
            assert!(
                t <= earliest.max(w.now_tick()),
                "next_deadline {t} is later than the earliest deadline {earliest}"
            );
            let t = t.max(w.now_tick());
            out.clear();
            w.poll_expired(t, &mut out, usize::MAX);
            wakes += 1;
            for &index in &out {
                let pos = remaining
                    .iter()
                    .position(|&(i, _)| i == index)
                    .unwrap_or_else(|| panic!("index {index} fired twice or was never armed"));
                let (_, d) = remaining.swap_remove(pos);
                assert_eq!(t, d, "index {index} due {d} fired at {t}");
            }
            for &(i, d) in &remaining {
                assert!(d > t, "index {i} due {d} did not fire at {t}");
            }
            assert!(wakes < 10_000, "runaway");
        }
        assert!(remaining.is_empty(), "never fired: {remaining:?}");
        assert_eq!(w.len(), 0);
        wakes
    }

    fn boundary_offsets() -> Vec<u64> {
        let mut offsets = vec![1, 2, 3, 62, 63, 64, 65, 66, 127, 128, 129];
        for level in 1..LEVELS as u32 {
            let b = 1u64 << (level * LEVEL_BITS);
            for o in [b - 1, b, b + 1, 2 * b - 1, 2 * b, 2 * b + 1] {
                if o.checked_add(1 << 20).is_some() {
                    offsets.push(o);
                }
            }
            // The last tick of the level's range.
            if let Some(o) = b.checked_mul(63).and_then(|x| x.checked_add(b - 1)) {
                offsets.push(o);
            }
        }
        offsets.sort_unstable();
        offsets.dedup();
        offsets
    }

    #[test]
    fn level_for_matches_the_level_table() {
        assert_eq!(LEVELS, 11);
        assert_eq!(level_for(0, 1), 0);
        assert_eq!(level_for(0, 63), 0);
        assert_eq!(level_for(0, 64), 1);
        assert_eq!(level_for(0, 4095), 1);
        assert_eq!(level_for(0, 4096), 2);
        assert_eq!(level_for(63, 64), 1, "crossing a slot boundary by one tick");
        assert_eq!(level_for(0, 1 << 36), 6);
        assert_eq!(level_for(0, u64::MAX), 10);
        assert_eq!(slot_for(u64::MAX, 10), 15, "top level uses 16 slots");
        assert_eq!(level_for(0, 5 * YEAR_MS), 6);
    }

    #[test]
    fn every_level_boundary_fires_exactly_one_at_a_time() {
        for base in [0u64, 1, 63, 4095, 123_456_789, (1 << 36) - 5, 1 << 50] {
            for &off in &boundary_offsets() {
                let Some(d) = base.checked_add(off) else {
                    continue;
                };
                let mut w = Wheel::new(4, base);
                w.insert(2, d);
                assert_eq!(w.deadline(2), Some(d));
                let nd = w.next_deadline().unwrap();
                assert!(
                    nd <= d && nd > base,
                    "base {base} off {off}: next_deadline {nd}"
                );
                // Polling one tick short never fires it, even straight from base.
                assert_eq!(
                    poll_all(&mut w, d - 1),
                    Vec::<u32>::new(),
                    "base {base} off {off}"
                );
                assert_eq!(poll_all(&mut w, d), vec![2], "base {base} off {off}");
                assert!(!w.is_armed(2));
                assert_eq!(w.next_deadline(), None);
            }
        }
    }

    #[test]
    fn every_level_boundary_fires_exactly_together_worker_style() {
        for base in [0u64, 17, 4095, 987_654_321] {
            let mut w = Wheel::new(1024, base);
            let mut deadlines = Vec::new();
            for (i, &off) in boundary_offsets().iter().enumerate() {
                let Some(d) = base.checked_add(off) else {
                    continue;
                };
                w.insert(i as u32, d);
                deadlines.push((i as u32, d));
            }
            assert_eq!(w.len() as usize, deadlines.len());
            let wakes = drive_exact(&mut w, &deadlines);
            // One wake per distinct deadline plus at most one early wake per
            // level a timer cascades through.
            assert!(wakes <= deadlines.len() * LEVELS, "{wakes} wakes");
        }
    }

    #[test]
    fn tick_by_tick_around_the_first_boundaries() {
        // Poll every single tick and check each fires on exactly its tick.
        let base = 1000;
        let mut w = Wheel::new(8, base);
        let offs = [63u64, 64, 65, 4095, 4096, 4097];
        for (i, &o) in offs.iter().enumerate() {
            w.insert(i as u32, base + o);
        }
        for t in base + 1..=base + 4200 {
            let fired = poll_all(&mut w, t);
            let expect: Vec<u32> = offs
                .iter()
                .enumerate()
                .filter(|&(_, &o)| base + o == t)
                .map(|(i, _)| i as u32)
                .collect();
            assert_eq!(fired, expect, "tick {t}");
        }
        assert!(w.is_empty());
    }

    #[test]
    fn five_years_away_fires_on_its_tick() {
        let now = 1_732_000_000_000u64; // a wall-clock-ms-sized tick count
        let d = now + 5 * YEAR_MS + 12_345;
        let mut w = Wheel::new(2, now);
        w.insert(1, d);
        assert!(drive_exact(&mut w, &[(1, d)]) <= LEVELS + 1);
        let mut w = Wheel::new(2, now);
        w.insert(1, d);
        assert!(poll_all(&mut w, now + 5 * YEAR_MS).is_empty());
        assert!(poll_all(&mut w, d - 1).is_empty());
        assert_eq!(poll_all(&mut w, d), vec![1]);
    }

    #[test]
    fn deadlines_at_the_end_of_time() {
        let mut w = Wheel::new(4, u64::MAX - 200);
        w.insert(0, u64::MAX);
        w.insert(1, u64::MAX - 1);
        w.insert(2, u64::MAX - 64);
        drive_exact(
            &mut w,
            &[(0, u64::MAX), (1, u64::MAX - 1), (2, u64::MAX - 64)],
        );
        let mut w = Wheel::new(2, 0);
        w.insert(0, u64::MAX);
        assert!(poll_all(&mut w, u64::MAX - 1).is_empty());
        assert_eq!(poll_all(&mut w, u64::MAX), vec![0]);
    }

    #[test]
    fn past_and_present_deadlines_fire_at_the_next_poll() {
        let mut w = Wheel::new(4, 10_000);
        w.insert(0, 10_000);
        w.insert(1, 5);
        w.insert(2, 0);
        assert_eq!(w.next_deadline(), Some(0)); // the earliest past deadline
                                                // Same `now`: the wheel does not need to advance to return them.
        assert_eq!(poll_all(&mut w, 10_000), vec![0, 1, 2]);
        // A poll with an older `now` does not move the wheel back.
        w.insert(3, 10_001);
        assert!(poll_all(&mut w, 9_000).is_empty());
        assert_eq!(w.now_tick(), 10_000);
        assert_eq!(poll_all(&mut w, 10_001), vec![3]);
    }

    #[test]
    fn cancel_and_rearm() {
        let mut w = Wheel::new(8, 0);
        assert!(!w.cancel(3));
        assert!(!w.cancel(99), "out of range cancel is false, not a panic");
        assert!(!w.is_armed(99));
        assert_eq!(w.deadline(99), None);
        for i in 0..8 {
            w.insert(i, 100);
        }
        assert!(w.cancel(3));
        assert!(!w.cancel(3));
        assert_eq!(w.len(), 7);
        w.insert(4, 5000); // re-arm later
        w.insert(5, 50); // re-arm earlier
        assert_eq!(w.len(), 7);
        assert_eq!(poll_all(&mut w, 50), vec![5]);
        assert_eq!(poll_all(&mut w, 100), vec![0, 1, 2, 6, 7]);
        assert_eq!(poll_all(&mut w, 4999), Vec::<u32>::new());
        assert_eq!(poll_all(&mut w, 5000), vec![4]);
        assert!(w.is_empty());
    }

    #[test]
    fn cancel_heads_middles_and_tails_keeps_slots_consistent() {
        // Cancel in every list position, then make sure the rest still fire
        // and the occupied bit is cleared with the last one.
        let mut w = Wheel::new(16, 0);
        for i in [1, 5, 9, 13] {
            w.insert(i, 300); // one lane: pushed front, list 13 9 5 1
        }
        w.insert(0, 300); // other lanes of the same slot
        w.insert(2, 300);
        assert!(w.cancel(13)); // head
        assert!(w.cancel(5)); // middle
        assert!(w.cancel(1)); // tail
        assert_eq!(poll_all(&mut w, 300), vec![0, 2, 9]);
        let mut w = Wheel::new(1, 0);
        w.insert(0, 300);
        assert!(w.cancel(0));
        assert_eq!(w.next_deadline(), None, "occupied bit cleared");
        assert_eq!(w.occupied, [0; LEVELS]);
    }

    #[test]
    fn limit_batches_and_never_returns_stale_entries() {
        let mut w = Wheel::new(100, 0);
        for i in 0..100 {
            w.insert(i, 10 + (i as u64 % 3));
        }
        w.insert(99, 1_000); // moved away before it is due
        let mut out = Vec::with_capacity(100);
        assert_eq!(w.poll_expired(20, &mut out, 10), 10);
        assert_eq!(out.len(), 10);
        // Some of the still-due entries are now sitting in the pending list:
        // cancel one, re-arm another later, re-arm a third still due.
        let due: Vec<u32> = (0..99).filter(|i| w.is_armed(*i)).collect();
        assert_eq!(due.len(), 89);
        let (c, later, still) = (due[0], due[1], due[2]);
        assert!(w.cancel(c));
        w.insert(later, 500);
        w.insert(still, 15);
        let mut calls = 1;
        while w.poll_expired(20, &mut out, 10) == 10 {
            calls += 1;
        }
        assert_eq!(calls, 9, "87 remaining due entries in batches of 10");
        let mut seen = out.clone();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), out.len(), "no index returned twice");
        assert_eq!(out.len(), 97);
        assert!(!out.contains(&c) && !out.contains(&later) && !out.contains(&99));
        assert!(out.contains(&still));
        assert_eq!(w.now_tick(), 20);
        assert_eq!(poll_all(&mut w, 500), vec![later]);
        assert_eq!(poll_all(&mut w, 1_000), vec![99]);
    }

    #[test]
    fn limited_poll_does_not_run_ahead() {
        let mut w = Wheel::new(4, 0);
        w.insert(0, 5);
        w.insert(1, 5);
        w.insert(2, 900);
        let mut out = Vec::new();
        assert_eq!(w.poll_expired(1_000, &mut out, 1), 1);
        // One of the tick-5 entries is still pending; the wheel stays at 5.
        assert_eq!(w.now_tick(), 5);
        assert_eq!(w.next_deadline(), Some(5));
        assert_eq!(
            w.poll_expired(1_000, &mut out, 0),
            0,
            "limit 0 returns nothing"
        );
        assert_eq!(w.poll_expired(1_000, &mut out, 1), 1);
        assert_eq!(w.poll_expired(1_000, &mut out, 1), 1);
        let mut sorted = out.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2]);
        assert_eq!(w.poll_expired(1_000, &mut out, 1), 0);
        assert_eq!(w.now_tick(), 1_000);
    }

    #[test]
    fn next_deadline_is_exact_within_level_zero_and_a_bound_above() {
        let mut w = Wheel::new(4, 100);
        assert_eq!(w.next_deadline(), None);
        w.insert(0, 120);
        assert_eq!(w.next_deadline(), Some(120), "level 0: exact");
        w.cancel(0);
        w.insert(1, 100 + 5000 + 7);
        // Level 2 slot start: 4096 * floor(5107 / 4096) = 4096.
        assert_eq!(w.next_deadline(), Some(4096));
        assert!(poll_all(&mut w, 4096).is_empty());
        // Cascaded to level 1: slot start of 64-tick granularity.
        assert_eq!(w.next_deadline(), Some(5056));
        assert!(poll_all(&mut w, 5056).is_empty());
        assert_eq!(w.next_deadline(), Some(5107));
        assert_eq!(poll_all(&mut w, 5107), vec![1]);
    }

    #[test]
    fn reinsert_from_expiry_at_interval_keeps_period() {
        // The worker's steady state: expire, re-arm at +interval.
        let interval = 30_000;
        let mut w = Wheel::new(64, 0);
        for i in 0..64u32 {
            w.insert(i, 1 + (i as u64) * 469);
        }
        let mut next_due: Vec<u64> = (0..64).map(|i| 1 + i * 469).collect();
        let mut out = Vec::new();
        for t in 1..=200_000u64 {
            out.clear();
            w.poll_expired(t, &mut out, usize::MAX);
            for &i in &out {
                assert_eq!(next_due[i as usize], t, "index {i}");
                next_due[i as usize] = t + interval;
                w.insert(i, t + interval);
            }
        }
        assert_eq!(w.len(), 64);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn insert_out_of_range_is_a_bug() {
        Wheel::new(4, 0).insert(4, 10);
    }

    #[test]
    fn link_is_sixteen_bytes() {
        assert_eq!(std::mem::size_of::<Link>(), 16);
    }
}
