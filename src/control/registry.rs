//! The daemon's index of every contact when the control socket is on:
//! key (AoR, contact URI) → where the contact lives (worker, slot,
//! generation), and what the operator said about it (the durable record).
//!
//! The registry also *allocates* the slots of every worker (in its own
//! [`Slab`] per worker, mirrored by the worker's slab through
//! `Slab::insert_at`), so an add is answered with its slot at once and a
//! delete is sent by handle, without a round trip to the worker. A contact
//! the worker drops on its own (remove_after, a refusal) comes back as a
//! `Gone` notice and is forgotten here.
//!
//! Owned by the daemon's main thread; nothing here is on a packet path.
//! The hash index stores 8-byte locations, not keys: the key is compared in
//! the slab entry it points to, so each key's text is held once.

use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::net::SocketAddr;

use hashbrown::HashTable;

use crate::engine::slab::{Handle, Slab, SlabFull};
use crate::state::ContactRecord;

/// Where a contact came from: the contacts file (read again at each start,
/// never journalled) or the control socket (journalled, snapshotted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    File,
    Control,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Control => "control",
        }
    }
}

/// One contact as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub rec: ContactRecord,
    pub source: Source,
    /// The resolved destination (for listings and to see whether an
    /// update moves the contact).
    pub dest: SocketAddr,
}

/// Where a contact lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Loc {
    pub worker: u8,
    pub handle: Handle,
}

impl Loc {
    /// A listing cursor: worker in the high bits, slot in the low 24.
    pub fn cursor(&self) -> u64 {
        ((self.worker as u64) << 24) | self.handle.slot as u64
    }
}

pub struct Registry {
    slabs: Vec<Slab<Entry>>,
    /// Each location with its key's hash: growing the table rehashes from
    /// the stored hash, without reading a million entries' strings (that
    /// took ~100 ms at a million, stalling the control socket).
    index: HashTable<(u64, Loc)>,
    hasher: RandomState,
}

impl Registry {
    pub fn new(workers: u32, slots_per_worker: u32) -> Registry {
        Registry {
            slabs: (0..workers)
                .map(|_| Slab::with_capacity(slots_per_worker))
                .collect(),
            index: HashTable::new(),
            hasher: RandomState::new(),
        }
    }

    fn hash(hasher: &RandomState, aor: Option<&str>, uri: &str) -> u64 {
        let mut h = hasher.build_hasher();
        aor.unwrap_or("").hash(&mut h);
        uri.hash(&mut h);
        h.finish()
    }

    fn entry_of<'a>(slabs: &'a [Slab<Entry>], loc: &Loc) -> Option<&'a Entry> {
        slabs.get(loc.worker as usize)?.get(loc.handle)
    }

    /// The contact with this key.
    pub fn find(&self, aor: Option<&str>, uri: &str) -> Option<Loc> {
        let hash = Self::hash(&self.hasher, aor, uri);
        self.index
            .find(hash, |(h, loc)| {
                *h == hash
                    && Self::entry_of(&self.slabs, loc)
                        .is_some_and(|e| e.rec.uri == uri && e.rec.aor.as_deref() == aor)
            })
            .map(|&(_, loc)| loc)
    }

    pub fn get(&self, loc: Loc) -> Option<&Entry> {
        Self::entry_of(&self.slabs, &loc)
    }

    /// Stores a contact whose key is not present, in a slot of `worker`.
    pub fn insert(&mut self, worker: u8, entry: Entry) -> Result<Loc, SlabFull> {
        debug_assert!(
            self.find(entry.rec.aor.as_deref(), &entry.rec.uri)
                .is_none(),
            "key already present"
        );
        let hash = Self::hash(&self.hasher, entry.rec.aor.as_deref(), &entry.rec.uri);
        let handle = self.slabs[worker as usize].insert(entry)?;
        let loc = Loc { worker, handle };
        self.index.insert_unique(hash, (hash, loc), |&(h, _)| h);
        Ok(loc)
    }

    /// Forgets a contact. A stale location returns `None` and changes
    /// nothing.
    pub fn remove(&mut self, loc: Loc) -> Option<Entry> {
        let e = Self::entry_of(&self.slabs, &loc)?;
        let hash = Self::hash(&self.hasher, e.rec.aor.as_deref(), &e.rec.uri);
        if let Ok(found) = self.index.find_entry(hash, |&(_, l)| l == loc) {
            found.remove();
        }
        self.slabs[loc.worker as usize].remove(loc.handle)
    }

    /// Contacts held, over all workers.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether `worker` has a free slot.
    pub fn has_room(&self, worker: u8) -> bool {
        let s = &self.slabs[worker as usize];
        s.len() < s.capacity()
    }

    pub fn capacity(&self, worker: u8) -> u32 {
        self.slabs[worker as usize].capacity()
    }

    /// Contacts in (worker, slot) order starting at `cursor` (see
    /// [`Loc::cursor`]).
    pub fn iter_from(&self, cursor: u64) -> impl Iterator<Item = (Loc, &Entry)> {
        let first_worker = (cursor >> 24) as usize;
        let first_slot = (cursor & 0xFF_FFFF) as u32;
        self.slabs
            .iter()
            .enumerate()
            .skip(first_worker)
            .flat_map(move |(w, slab)| {
                let from = if w == first_worker { first_slot } else { 0 };
                slab.iter_from(from).map(move |(handle, e)| {
                    (
                        Loc {
                            worker: w as u8,
                            handle,
                        },
                        e,
                    )
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn entry(aor: Option<&str>, uri: &str) -> Entry {
        Entry {
            rec: ContactRecord {
                uri: uri.into(),
                aor: aor.map(Into::into),
                ..ContactRecord::default()
            },
            source: Source::Control,
            dest: "127.0.0.1:5060".parse().unwrap(),
        }
    }

    #[test]
    fn the_key_is_aor_and_uri() {
        let mut r = Registry::new(2, 4);
        let a = r.insert(0, entry(None, "sip:1@10.0.0.1")).unwrap();
        let b = r
            .insert(1, entry(Some("sip:1@a.example"), "sip:1@10.0.0.1"))
            .unwrap();
        assert_ne!(a, b);
        assert_eq!(r.find(None, "sip:1@10.0.0.1"), Some(a));
        assert_eq!(r.find(Some("sip:1@a.example"), "sip:1@10.0.0.1"), Some(b));
        assert_eq!(r.find(Some("sip:1@b.example"), "sip:1@10.0.0.1"), None);
        assert_eq!(r.len(), 2);
        assert!(r.remove(a).is_some());
        assert!(r.remove(a).is_none(), "stale after removal");
        assert_eq!(r.find(None, "sip:1@10.0.0.1"), None);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn full_worker_is_reported_and_listing_pages_in_slot_order() {
        let mut r = Registry::new(2, 3);
        for i in 0..3 {
            r.insert(1, entry(None, &format!("sip:{i}@h"))).unwrap();
        }
        assert!(!r.has_room(1));
        assert!(r.insert(1, entry(None, "sip:x@h")).is_err());
        r.insert(0, entry(None, "sip:z@h")).unwrap();
        let all: Vec<_> = r
            .iter_from(0)
            .map(|(l, e)| (l.cursor(), e.rec.uri.clone()))
            .collect();
        assert_eq!(
            all,
            vec![
                (0, "sip:z@h".to_string()),
                (1 << 24, "sip:0@h".to_string()),
                ((1 << 24) + 1, "sip:1@h".to_string()),
                ((1 << 24) + 2, "sip:2@h".to_string()),
            ]
        );
        let rest: Vec<_> = r
            .iter_from((1 << 24) + 1)
            .map(|(l, _)| l.cursor())
            .collect();
        assert_eq!(rest, vec![(1 << 24) + 1, (1 << 24) + 2]);
    }

    #[test]
    fn random_operations_match_a_model() {
        let mut r = Registry::new(3, 50);
        let mut model: HashMap<String, Loc> = HashMap::new();
        let mut x = 99u64;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let uri = format!("sip:{}@h", x % 40);
            let aor = x.is_multiple_of(3).then_some("sip:a@d");
            let key = crate::state::contact_key(aor, &uri);
            match (x >> 8) % 2 {
                0 if !model.contains_key(&key) => {
                    let w = ((x >> 16) % 3) as u8;
                    if let Ok(loc) = r.insert(w, entry(aor, &uri)) {
                        model.insert(key, loc);
                    }
                }
                _ => {
                    if let Some(loc) = model.remove(&key) {
                        assert_eq!(r.remove(loc).unwrap().rec.uri, uri);
                    }
                }
            }
            assert_eq!(r.len(), model.len());
        }
        for (key, loc) in &model {
            let (aor, uri) = key.split_once('\n').unwrap();
            let aor = (!aor.is_empty()).then_some(aor);
            assert_eq!(r.find(aor, uri), Some(*loc));
        }
    }
}
