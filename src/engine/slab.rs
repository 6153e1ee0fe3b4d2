//! The per-worker contact slab: a fixed-capacity arena addressed by
//! `(slot, generation)` handles.
//!
//! Ownership: each worker owns exactly one `Slab` (DESIGN §1 "Slabs"); nothing
//! else holds references into it. A contact's handle travels inside the ping's
//! token (RFC 3261 §8.1.1.3 From tag, §8.1.1.7 Via branch), so a reply names its
//! contact without any lookup table. The generation makes a reply for a
//! contact that was removed, and whose slot was reused, harmless: its handle
//! no longer matches and `get` returns `None`.
//!
//! Invariants:
//! * All storage is allocated once in [`Slab::with_capacity`]; the backing
//!   `Vec` never grows or reallocates afterwards. A full slab is an error
//!   value ([`SlabFull`]), never a reallocation.
//! * `capacity <= SLOT_CAPACITY_MAX` (2^24), so every slot fits the token's
//!   24-bit slot field.
//! * A slot's generation is bumped (wrapping `u16`) every time its value is
//!   removed, so a handle is valid from `insert` until the matching `remove`
//!   and never again, until the generation wraps (65,536 reuses of that
//!   one slot; see "Free list order" below).
//!
//! Free list order: freed slots are reused LIFO. The most recently freed slot
//! is the one most likely still in cache, and a single head index suffices
//! (no tail, no ring). The cost is that churn concentrates on few slots, which
//! brings the generation wrap closer for them: a stale handle can only alias
//! after the same slot has been removed 65,536 times while an old reply is
//! still in flight (a reply timeout of seconds), i.e. sustained removes in the
//! tens of thousands per second on one worker. Contacts are removed by the
//! control plane at far lower rates, and a stale reply must in addition carry
//! a valid MAC and the current ping sequence to be believed.
//!
//! Never-used slots are handed out by a bump index before the free list is
//! consulted, so a fresh slab does not touch (page in) memory it has not used.
//!
//! Never: allocates after `with_capacity`, blocks, or panics on a bad handle
//! (every lookup is checked and returns `Option`). The only panics are the
//! capacity check in `with_capacity` and an `unreachable!` guarding the
//! free-list invariant (the free list links vacant slots only).
//!
//! Callers: the worker (add/remove contact from its command ring; lookup on
//! every reply match and every wheel expiry).

use std::fmt;

/// The largest slab capacity: it matches the token's 24-bit slot field
/// (`wire::token::SLOT_MAX` = 2^24 - 1 is the largest slot index).
const SLOT_CAPACITY_MAX: u32 = 1 << 24;

/// Names one occupied slot at one point in its life. `Copy`, 8 bytes; it is
/// what the token carries (slot 24 bits, generation 16 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Handle {
    pub slot: u32,
    pub generation: u16,
}

/// Returned by [`Slab::insert`] when every slot is occupied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "contact slab full (capacity {capacity} contacts on this worker): \
     raise max_contacts or add workers, or remove contacts first"
)]
pub struct SlabFull {
    pub capacity: u32,
}

enum Entry<T> {
    Occupied {
        generation: u16,
        value: T,
    },
    /// `next_free` is the next slot of the free list, or `NIL`.
    Vacant {
        generation: u16,
        next_free: u32,
    },
}

const NIL: u32 = u32::MAX;

/// A fixed-capacity arena of `T` with generation-checked handles.
pub struct Slab<T> {
    entries: Vec<Entry<T>>,
    /// Head of the LIFO free list of vacant (previously used) slots, or `NIL`.
    free_head: u32,
    len: u32,
    capacity: u32,
    /// Filled by [`Slab::insert_at`]: slots are chosen by the caller and
    /// no free list is kept.
    placed: bool,
}

/// Why [`Slab::insert_at`] refused a handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("slot {slot} is beyond the slab's capacity {capacity}")]
    OutOfRange { slot: u32, capacity: u32 },
    #[error("slot {slot} is occupied")]
    Occupied { slot: u32 },
}

impl<T> Slab<T> {
    /// Allocates storage for `capacity` values, once.
    ///
    /// # Panics
    /// If `capacity` exceeds 2^24 (the token's slot field); configuration
    /// validation rejects such a value before a worker starts.
    pub fn with_capacity(capacity: u32) -> Slab<T> {
        assert!(
            capacity <= SLOT_CAPACITY_MAX,
            "slab capacity {capacity} exceeds the token's 24-bit slot space ({SLOT_CAPACITY_MAX})"
        );
        Slab {
            entries: Vec::with_capacity(capacity as usize),
            free_head: NIL,
            len: 0,
            capacity,
            placed: false,
        }
    }

    /// Stores `value` in a free slot and returns its handle. O(1), never
    /// allocates.
    pub fn insert(&mut self, value: T) -> Result<Handle, SlabFull> {
        debug_assert!(!self.placed, "insert on a slab filled by insert_at");
        if self.free_head != NIL {
            let slot = self.free_head;
            let entry = &mut self.entries[slot as usize];
            let Entry::Vacant {
                generation,
                next_free,
            } = *entry
            else {
                // The free list only ever links vacant entries.
                unreachable!("slab free list names occupied slot {slot}");
            };
            self.free_head = next_free;
            *entry = Entry::Occupied { generation, value };
            self.len += 1;
            return Ok(Handle { slot, generation });
        }
        let used = self.entries.len() as u32;
        if used == self.capacity {
            return Err(SlabFull {
                capacity: self.capacity,
            });
        }
        // Within the capacity reserved by `with_capacity`: no reallocation.
        debug_assert!(self.entries.len() < self.entries.capacity());
        self.entries.push(Entry::Occupied {
            generation: 0,
            value,
        });
        self.len += 1;
        Ok(Handle {
            slot: used,
            generation: 0,
        })
    }

    /// Stores `value` at the slot and generation `h` names, chosen by the
    /// caller: the daemon's control registry allocates the slots of its
    /// workers (in its own `Slab`) so it can answer with a contact's handle,
    /// and delete by it, without a round trip to the worker. The slot must
    /// be vacant; the generation is taken as given. O(1) (slots skipped
    /// below `slot` become vacant), never allocates.
    ///
    /// A slab is filled either by `insert` or by `insert_at`, never both:
    /// a placed slab keeps no free list.
    pub fn insert_at(&mut self, h: Handle, value: T) -> Result<(), PlaceError> {
        debug_assert!(
            self.placed || self.len == 0,
            "insert_at on a slab filled by insert"
        );
        self.placed = true;
        if h.slot >= self.capacity {
            return Err(PlaceError::OutOfRange {
                slot: h.slot,
                capacity: self.capacity,
            });
        }
        while self.entries.len() <= h.slot as usize {
            // Within the capacity reserved by `with_capacity`.
            self.entries.push(Entry::Vacant {
                generation: 0,
                next_free: NIL,
            });
        }
        let entry = &mut self.entries[h.slot as usize];
        if let Entry::Occupied { .. } = entry {
            return Err(PlaceError::Occupied { slot: h.slot });
        }
        *entry = Entry::Occupied {
            generation: h.generation,
            value,
        };
        self.len += 1;
        Ok(())
    }

    /// Removes and returns the value `h` names, bumping the slot's generation
    /// so `h` (and every copy of it) is stale from now on. A stale or unknown
    /// handle returns `None` and changes nothing.
    pub fn remove(&mut self, h: Handle) -> Option<T> {
        let entry = self.entries.get_mut(h.slot as usize)?;
        match entry {
            Entry::Occupied { generation, .. } if *generation == h.generation => {}
            _ => return None,
        }
        let vacant = Entry::Vacant {
            generation: h.generation.wrapping_add(1),
            next_free: if self.placed { NIL } else { self.free_head },
        };
        let Entry::Occupied { value, .. } = std::mem::replace(entry, vacant) else {
            unreachable!("checked occupied above");
        };
        if !self.placed {
            self.free_head = h.slot;
        }
        self.len -= 1;
        Some(value)
    }

    /// The value `h` names, if `h` is current.
    #[inline]
    pub fn get(&self, h: Handle) -> Option<&T> {
        match self.entries.get(h.slot as usize)? {
            Entry::Occupied { generation, value } if *generation == h.generation => Some(value),
            _ => None,
        }
    }

    /// The value `h` names, if `h` is current.
    #[inline]
    pub fn get_mut(&mut self, h: Handle) -> Option<&mut T> {
        match self.entries.get_mut(h.slot as usize)? {
            Entry::Occupied { generation, value } if *generation == h.generation => Some(value),
            _ => None,
        }
    }

    /// The current handle and value of an occupied slot, whatever its
    /// generation (the wheel knows slots, not handles).
    #[inline]
    pub fn get_slot(&self, slot: u32) -> Option<(Handle, &T)> {
        match self.entries.get(slot as usize)? {
            Entry::Occupied { generation, value } => Some((
                Handle {
                    slot,
                    generation: *generation,
                },
                value,
            )),
            Entry::Vacant { .. } => None,
        }
    }

    /// Asks the CPU for `slot`'s entry ahead of a `get_slot` soon after
    /// (a hint: out-of-range slots are ignored).
    #[inline]
    pub fn prefetch(&self, slot: u32) {
        if let Some(e) = self.entries.get(slot as usize) {
            crate::cpu::prefetch(
                (e as *const Entry<T>).cast(),
                std::mem::size_of::<Entry<T>>(),
            );
        }
    }

    /// Mutable form of [`Slab::get_slot`].
    #[inline]
    pub fn get_slot_mut(&mut self, slot: u32) -> Option<(Handle, &mut T)> {
        match self.entries.get_mut(slot as usize)? {
            Entry::Occupied { generation, value } => Some((
                Handle {
                    slot,
                    generation: *generation,
                },
                value,
            )),
            Entry::Vacant { .. } => None,
        }
    }

    /// Number of occupied slots.
    #[inline]
    pub fn len(&self) -> u32 {
        self.len
    }

    /// The fixed capacity chosen at `with_capacity`.
    #[inline]
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Occupied slots in slot order (not a hot-path operation: snapshots,
    /// shutdown, control-socket listings).
    pub fn iter(&self) -> impl Iterator<Item = (Handle, &T)> {
        self.iter_from(0)
    }

    /// Occupied slots from `first` on, in slot order (paged listings).
    pub fn iter_from(&self, first: u32) -> impl Iterator<Item = (Handle, &T)> {
        self.entries
            .iter()
            .enumerate()
            .skip(first as usize)
            .filter_map(|(slot, entry)| match entry {
                Entry::Occupied { generation, value } => Some((
                    Handle {
                        slot: slot as u32,
                        generation: *generation,
                    },
                    value,
                )),
                Entry::Vacant { .. } => None,
            })
    }
}

impl<T> fmt::Debug for Slab<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slab")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_is_only_a_hint_for_any_slot() {
        let mut s: Slab<u64> = Slab::with_capacity(4);
        let h = s.insert(42).unwrap();
        for slot in [0, h.slot, 3, 4, u32::MAX] {
            s.prefetch(slot);
        }
        assert_eq!(s.get(h), Some(&42));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn placed_slots_take_the_given_handle_and_refuse_occupied_or_out_of_range() {
        let mut s: Slab<u32> = Slab::with_capacity(8);
        let h = Handle {
            slot: 5,
            generation: 7,
        };
        s.insert_at(h, 50).unwrap();
        assert_eq!(s.get(h), Some(&50));
        assert_eq!(s.len(), 1);
        // Skipped slots are vacant, not occupied.
        assert!(s.get_slot(0).is_none() && s.get_slot(4).is_none());
        assert_eq!(s.insert_at(h, 51), Err(PlaceError::Occupied { slot: 5 }));
        assert_eq!(
            s.insert_at(
                Handle {
                    slot: 8,
                    generation: 0
                },
                1
            ),
            Err(PlaceError::OutOfRange {
                slot: 8,
                capacity: 8
            })
        );
        assert_eq!(s.remove(h), Some(50));
        assert!(s.get(h).is_none(), "removed handle is stale");
        // The placer chooses the next generation.
        let h2 = Handle {
            slot: 5,
            generation: 8,
        };
        s.insert_at(h2, 52).unwrap();
        assert!(s.get(h).is_none());
        assert_eq!(s.get(h2), Some(&52));
        assert_eq!(s.iter().count(), 1);
    }

    #[test]
    fn a_placed_slab_mirrors_an_allocating_one() {
        // The daemon allocates in its own slab and the worker places the
        // same handles: after any sequence both hold the same slots.
        let mut alloc: Slab<u32> = Slab::with_capacity(64);
        let mut placed: Slab<u32> = Slab::with_capacity(64);
        let mut live = Vec::new();
        let mut x = 12345u64;
        for i in 0..2000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if !x.is_multiple_of(3) || live.is_empty() {
                if let Ok(h) = alloc.insert(i) {
                    placed.insert_at(h, i).unwrap();
                    live.push(h);
                }
            } else {
                let h = live.swap_remove((x as usize / 3) % live.len());
                assert_eq!(alloc.remove(h), placed.remove(h));
            }
        }
        let a: Vec<_> = alloc.iter().map(|(h, v)| (h, *v)).collect();
        let p: Vec<_> = placed.iter().map(|(h, v)| (h, *v)).collect();
        assert_eq!(a, p);
    }

    #[test]
    fn insert_get_remove_round_trip() {
        let mut slab = Slab::with_capacity(4);
        assert!(slab.is_empty());
        let a = slab.insert("a").unwrap();
        let b = slab.insert("b").unwrap();
        assert_eq!((a.slot, a.generation), (0, 0));
        assert_eq!((b.slot, b.generation), (1, 0));
        assert_eq!(slab.len(), 2);
        assert_eq!(slab.get(a), Some(&"a"));
        *slab.get_mut(b).unwrap() = "B";
        assert_eq!(slab.get(b), Some(&"B"));
        assert_eq!(slab.remove(a), Some("a"));
        assert_eq!(slab.len(), 1);
        assert_eq!(slab.get(a), None);
        assert_eq!(slab.remove(a), None, "double remove is a no-op");
        assert_eq!(slab.len(), 1);
    }

    #[test]
    fn stale_handle_after_reuse_is_rejected() {
        let mut slab = Slab::with_capacity(2);
        let old = slab.insert(1u32).unwrap();
        assert_eq!(slab.remove(old), Some(1));
        let new = slab.insert(2u32).unwrap();
        // LIFO: the freed slot is reused at once, with the next generation.
        assert_eq!(new.slot, old.slot);
        assert_eq!(new.generation, old.generation + 1);
        assert_eq!(slab.get(old), None);
        assert_eq!(slab.get_mut(old), None);
        assert_eq!(slab.remove(old), None);
        assert_eq!(slab.get(new), Some(&2));
        // The slot lookup ignores generations and reports the current handle.
        assert_eq!(slab.get_slot(old.slot), Some((new, &2)));
    }

    #[test]
    fn unknown_slots_are_none_not_panics() {
        let mut slab: Slab<u8> = Slab::with_capacity(8);
        let h = Handle {
            slot: 5,
            generation: 0,
        };
        assert_eq!(slab.get(h), None);
        assert_eq!(slab.remove(h), None);
        assert!(slab.get_slot(7).is_none());
        assert!(slab.get_slot_mut(u32::MAX).is_none());
        let far = Handle {
            slot: u32::MAX,
            generation: 0,
        };
        assert_eq!(slab.get(far), None);
    }

    #[test]
    fn full_slab_reports_capacity_and_recovers_after_remove() {
        let mut slab = Slab::with_capacity(3);
        let handles: Vec<Handle> = (0..3).map(|i| slab.insert(i).unwrap()).collect();
        let err = slab.insert(99).unwrap_err();
        assert_eq!(err, SlabFull { capacity: 3 });
        let msg = err.to_string();
        assert!(
            msg.starts_with("contact slab full (capacity 3"),
            "operator message: {msg}"
        );
        assert!(msg.contains("max_contacts"), "says what to change: {msg}");
        assert_eq!(slab.len(), 3);
        slab.remove(handles[1]).unwrap();
        let h = slab.insert(7).unwrap();
        assert_eq!(h.slot, 1);
        assert_eq!(slab.get(h), Some(&7));
        assert!(slab.insert(8).is_err());
    }

    #[test]
    fn zero_capacity_is_always_full() {
        let mut slab = Slab::with_capacity(0);
        assert_eq!(slab.insert(()), Err(SlabFull { capacity: 0 }));
    }

    #[test]
    fn storage_never_reallocates() {
        let mut slab = Slab::with_capacity(1000);
        let ptr = slab.entries.as_ptr();
        let cap = slab.entries.capacity();
        let mut hs = Vec::new();
        for i in 0..1000u32 {
            hs.push(slab.insert(i).unwrap());
        }
        for h in hs.drain(..500) {
            slab.remove(h).unwrap();
        }
        for i in 0..500u32 {
            slab.insert(i).unwrap();
        }
        assert_eq!(slab.entries.as_ptr(), ptr);
        assert_eq!(slab.entries.capacity(), cap);
    }

    #[test]
    fn generation_wraps_and_stays_consistent() {
        let mut slab = Slab::with_capacity(1);
        let first = slab.insert(0u32).unwrap();
        let mut h = first;
        for i in 1..=(u16::MAX as u32 + 1) {
            assert_eq!(slab.remove(h), Some(i - 1));
            h = slab.insert(i).unwrap();
            assert_eq!(h.slot, 0);
            assert_eq!(h.generation, (i as u16), "generation wraps at 2^16");
        }
        // After exactly 2^16 reuses the generation is back to the first one:
        // the documented aliasing horizon of a u16 generation.
        assert_eq!(h.generation, first.generation);
        assert_eq!(slab.get(first), Some(&(u16::MAX as u32 + 1)));
        let prev = Handle {
            slot: 0,
            generation: u16::MAX,
        };
        assert_eq!(slab.get(prev), None);
    }

    #[test]
    fn iter_yields_occupied_in_slot_order() {
        let mut slab = Slab::with_capacity(5);
        let hs: Vec<Handle> = (0..5).map(|i| slab.insert(i * 10).unwrap()).collect();
        slab.remove(hs[1]).unwrap();
        slab.remove(hs[3]).unwrap();
        let seen: Vec<(u32, u16, i32)> = slab
            .iter()
            .map(|(h, v)| (h.slot, h.generation, *v))
            .collect();
        assert_eq!(seen, vec![(0, 0, 0), (2, 0, 20), (4, 0, 40)]);
        for (h, v) in slab.iter() {
            assert_eq!(slab.get(h), Some(v));
        }
    }

    #[test]
    fn free_list_is_lifo() {
        let mut slab = Slab::with_capacity(4);
        let hs: Vec<Handle> = (0..4).map(|i| slab.insert(i).unwrap()).collect();
        slab.remove(hs[0]).unwrap();
        slab.remove(hs[2]).unwrap();
        assert_eq!(slab.insert(9).unwrap().slot, 2);
        assert_eq!(slab.insert(9).unwrap().slot, 0);
        assert!(slab.insert(9).is_err());
    }

    #[test]
    #[should_panic(expected = "24-bit slot space")]
    fn capacity_beyond_token_slot_space_is_refused() {
        let _ = Slab::<u8>::with_capacity(SLOT_CAPACITY_MAX + 1);
    }

    #[test]
    fn largest_capacity_is_accepted() {
        let slab = Slab::<u8>::with_capacity(SLOT_CAPACITY_MAX);
        assert_eq!(slab.capacity(), 1 << 24);
    }

    #[test]
    fn random_ops_match_a_model() {
        use std::collections::HashMap;
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut slab = Slab::with_capacity(64);
        let mut model: HashMap<Handle, u64> = HashMap::new();
        let mut dead: Vec<Handle> = Vec::new();
        for _ in 0..20_000 {
            let r = next();
            match r % 3 {
                0 | 1 if r % 7 != 0 => {
                    let v = next();
                    match slab.insert(v) {
                        Ok(h) => {
                            assert!(model.insert(h, v).is_none(), "handle reused while live");
                        }
                        Err(SlabFull { capacity }) => {
                            assert_eq!(capacity, 64);
                            assert_eq!(model.len(), 64);
                        }
                    }
                }
                _ => {
                    if let Some(&h) = model.keys().nth((r >> 8) as usize % model.len().max(1)) {
                        assert_eq!(slab.remove(h), model.remove(&h));
                        dead.push(h);
                    }
                }
            }
            assert_eq!(slab.len() as usize, model.len());
            if let Some(&h) = dead.last() {
                if !model.contains_key(&h) {
                    assert_eq!(slab.get(h), None);
                }
            }
        }
        for (h, v) in &model {
            assert_eq!(slab.get(*h), Some(v));
        }
        assert_eq!(slab.iter().count(), model.len());
    }
}
