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
//! The hash index stores locations with their key's hash (16 bytes), not
//! keys: the key is compared in the slab entry it points to, so each key's
//! text is held once, in the entry's [`PackedRecord`].
//!
//! Contacts of the registrar feed are also found by their usrloc record id
//! (`ruid`), as usrloc finds them: a contact whose URI changed under the
//! same ruid (a phone re-registering from a new address) is then replaced,
//! not kept beside the new one. The second index holds the ruid's keyed
//! hash with the location (16 bytes a contact, no text); the entry keeps
//! the hash, and a hit must also have the same AoR, so a false match needs
//! two different ruids of one AoR to collide in 64 random-keyed bits.

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
    /// Kamailio's location table, followed over DMQ (`registrar::node`).
    Registrar,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Control => "control",
            Source::Registrar => "registrar",
        }
    }
}

/// A contact's parameters ([`ContactRecord`]) in one allocation: the
/// registry holds one per contact, a million or more, and five `String`s
/// with their `Option`s cost 128 bytes before any text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedRecord {
    /// uri, aor, received, path, owner, socket, source, keepalive, back
    /// to back.
    text: Box<str>,
    /// End of each of the eight in `text` (the text is under 64 KiB:
    /// [`TEXT_MAX`], checked when the contact is prepared).
    ends: [u16; FIELDS],
    /// Bit i: field i is present (the uri always is).
    present: u8,
    interval_ms: Option<u32>,
}

/// Text fields of a [`PackedRecord`].
const FIELDS: usize = 8;

/// Longest text of a contact's parameters together, bytes. A request is
/// at most `io::TX_DATAGRAM_MAX`, so a pingable contact is far below it.
pub const TEXT_MAX: usize = 16 * 1024;

impl PackedRecord {
    pub fn new(r: &ContactRecord) -> PackedRecord {
        let fields: [Option<&str>; FIELDS] = [
            Some(r.uri.as_str()),
            r.aor.as_deref(),
            r.received.as_deref(),
            r.path.as_deref(),
            r.owner.as_deref(),
            r.socket.as_deref(),
            r.source.as_deref(),
            r.keepalive.as_deref(),
        ];
        let mut text = String::with_capacity(fields.iter().flatten().map(|f| f.len()).sum());
        let mut ends = [0u16; FIELDS];
        let mut present = 0u8;
        for (i, f) in fields.iter().enumerate() {
            if let Some(f) = f {
                text.push_str(f);
                present |= 1 << i;
            }
            // Checked against TEXT_MAX when the contact was prepared.
            ends[i] = u16::try_from(text.len()).expect("a contact's text is under TEXT_MAX");
        }
        PackedRecord {
            text: text.into_boxed_str(),
            ends,
            present,
            interval_ms: r.interval_ms,
        }
    }

    fn field(&self, i: usize) -> Option<&str> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        (self.present & (1 << i) != 0).then(|| &self.text[start..self.ends[i] as usize])
    }

    pub fn uri(&self) -> &str {
        self.field(0).unwrap_or("")
    }
    pub fn aor(&self) -> Option<&str> {
        self.field(1)
    }
    pub fn received(&self) -> Option<&str> {
        self.field(2)
    }
    pub fn path(&self) -> Option<&str> {
        self.field(3)
    }
    pub fn owner(&self) -> Option<&str> {
        self.field(4)
    }
    pub fn socket(&self) -> Option<&str> {
        self.field(5)
    }
    /// The `source` given for this contact (`bind`, `socket`, `IP:PORT`).
    pub fn ping_source(&self) -> Option<&str> {
        self.field(6)
    }
    pub fn keepalive(&self) -> Option<&str> {
        self.field(7)
    }
    pub fn interval_ms(&self) -> Option<u32> {
        self.interval_ms
    }

    /// [`ContactRecord::key`].
    pub fn key(&self) -> String {
        crate::state::contact_key(self.aor(), self.uri())
    }

    pub fn record(&self) -> ContactRecord {
        let owned = |f: Option<&str>| f.map(str::to_string);
        ContactRecord {
            uri: self.uri().to_string(),
            aor: owned(self.aor()),
            received: owned(self.received()),
            path: owned(self.path()),
            interval_ms: self.interval_ms,
            owner: owned(self.owner()),
            socket: owned(self.socket()),
            source: owned(self.ping_source()),
            keepalive: owned(self.keepalive()),
            registrar_expires: None,
        }
    }

    /// Whether `r` holds the same parameters.
    pub fn is(&self, r: &ContactRecord) -> bool {
        self.uri() == r.uri
            && self.aor() == r.aor.as_deref()
            && self.received() == r.received.as_deref()
            && self.path() == r.path.as_deref()
            && self.owner() == r.owner.as_deref()
            && self.socket() == r.socket.as_deref()
            && self.ping_source() == r.source.as_deref()
            && self.keepalive() == r.keepalive.as_deref()
            && self.interval_ms == r.interval_ms
    }
}

/// One contact as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub rec: PackedRecord,
    pub source: Source,
    /// The resolved destination (for listings and to see whether an
    /// update moves the contact).
    pub dest: SocketAddr,
    /// Registrar contacts: absolute expiry, unix seconds (0 = never);
    /// 0 for the others. Sits in the entry's padding.
    pub expires_s: u32,
    /// Registrar contacts: the full sync that last refreshed it (see
    /// `Daemon::apply_feed`).
    pub sync_epoch: u32,
    /// Registrar contacts: the keyed hash of their usrloc `ruid` (0: none),
    /// set by [`Registry::set_ruid`].
    pub ruid: u64,
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
    /// Registrar contacts by ruid: (ruid hash, location).
    ruids: HashTable<(u64, Loc)>,
    hasher: RandomState,
    /// Contacts held, by [`Source`] (file, control, registrar).
    by_source: [usize; 3],
}

impl Registry {
    pub fn new(workers: u32, slots_per_worker: u32) -> Registry {
        Registry {
            slabs: (0..workers)
                .map(|_| Slab::with_capacity(slots_per_worker))
                .collect(),
            index: HashTable::new(),
            ruids: HashTable::new(),
            hasher: RandomState::new(),
            by_source: [0; 3],
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
                        .is_some_and(|e| e.rec.uri() == uri && e.rec.aor() == aor)
            })
            .map(|&(_, loc)| loc)
    }

    pub fn get(&self, loc: Loc) -> Option<&Entry> {
        Self::entry_of(&self.slabs, &loc)
    }

    /// The entry of `loc`, to refresh its expiry (never its key).
    pub fn get_mut(&mut self, loc: Loc) -> Option<&mut Entry> {
        self.slabs[loc.worker as usize].get_mut(loc.handle)
    }

    /// Stores a contact whose key is not present, in a slot of `worker`.
    pub fn insert(&mut self, worker: u8, entry: Entry) -> Result<Loc, SlabFull> {
        debug_assert!(
            self.find(entry.rec.aor(), entry.rec.uri()).is_none(),
            "key already present"
        );
        let hash = Self::hash(&self.hasher, entry.rec.aor(), entry.rec.uri());
        let source = entry.source as usize;
        let handle = self.slabs[worker as usize].insert(entry)?;
        self.by_source[source] += 1;
        let loc = Loc { worker, handle };
        self.index.insert_unique(hash, (hash, loc), |&(h, _)| h);
        Ok(loc)
    }

    /// Forgets a contact. A stale location returns `None` and changes
    /// nothing.
    pub fn remove(&mut self, loc: Loc) -> Option<Entry> {
        let e = Self::entry_of(&self.slabs, &loc)?;
        let hash = Self::hash(&self.hasher, e.rec.aor(), e.rec.uri());
        if let Ok(found) = self.index.find_entry(hash, |&(_, l)| l == loc) {
            found.remove();
        }
        if e.ruid != 0 {
            if let Ok(found) = self.ruids.find_entry(e.ruid, |&(_, l)| l == loc) {
                found.remove();
            }
        }
        self.by_source[e.source as usize] -= 1;
        self.slabs[loc.worker as usize].remove(loc.handle)
    }

    fn ruid_hash(&self, ruid: &str) -> u64 {
        // 0 means "none" in an entry.
        self.hasher.hash_one(ruid).max(1)
    }

    /// The registrar contact of AoR `aor` with usrloc record id `ruid`.
    pub fn find_ruid(&self, aor: Option<&str>, ruid: &str) -> Option<Loc> {
        if ruid.is_empty() {
            return None;
        }
        let hash = self.ruid_hash(ruid);
        self.ruids
            .find(hash, |(h, loc)| {
                *h == hash && Self::entry_of(&self.slabs, loc).is_some_and(|e| e.rec.aor() == aor)
            })
            .map(|&(_, loc)| loc)
    }

    /// Files the contact at `loc` under usrloc record id `ruid` (empty:
    /// under none), in place of the one it had. Another contact filed
    /// under the same ruid and AoR loses it (the caller replaces that one).
    pub fn set_ruid(&mut self, loc: Loc, ruid: &str) {
        let hash = if ruid.is_empty() {
            0
        } else {
            self.ruid_hash(ruid)
        };
        let Some(e) = Self::entry_of(&self.slabs, &loc) else {
            return;
        };
        let old = e.ruid;
        if old == hash {
            return;
        }
        if old != 0 {
            if let Ok(found) = self.ruids.find_entry(old, |&(_, l)| l == loc) {
                found.remove();
            }
        }
        if hash != 0 {
            let aor = e.rec.aor();
            let slabs = &self.slabs;
            if let Ok(found) = self.ruids.find_entry(hash, |(h, l)| {
                *h == hash && Self::entry_of(slabs, l).is_some_and(|o| o.rec.aor() == aor)
            }) {
                let ((_, other), _) = found.remove();
                if let Some(o) = self.slabs[other.worker as usize].get_mut(other.handle) {
                    o.ruid = 0;
                }
            }
            self.ruids.insert_unique(hash, (hash, loc), |&(h, _)| h);
        }
        if let Some(e) = self.slabs[loc.worker as usize].get_mut(loc.handle) {
            e.ruid = hash;
        }
    }

    /// Contacts held that came from `source`.
    pub fn count(&self, source: Source) -> usize {
        self.by_source[source as usize]
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
            rec: PackedRecord::new(&ContactRecord {
                uri: uri.into(),
                aor: aor.map(Into::into),
                ..ContactRecord::default()
            }),
            source: Source::Control,
            dest: "127.0.0.1:5060".parse().unwrap(),
            expires_s: 0,
            sync_epoch: 0,
            ruid: 0,
        }
    }

    #[test]
    fn registrar_contacts_are_found_by_ruid_within_their_aor() {
        let mut r = Registry::new(1, 8);
        let a = r
            .insert(0, entry(Some("u1"), "sip:u1@10.0.0.1:5060"))
            .unwrap();
        let b = r
            .insert(0, entry(Some("u2"), "sip:u2@10.0.0.2:5060"))
            .unwrap();
        r.set_ruid(a, "uloc-1");
        r.set_ruid(b, "uloc-2");
        assert_eq!(r.find_ruid(Some("u1"), "uloc-1"), Some(a));
        assert_eq!(r.find_ruid(Some("u2"), "uloc-1"), None, "another AoR");
        assert_eq!(r.find_ruid(Some("u1"), ""), None);
        // A new record id for the same contact replaces the old one.
        r.set_ruid(a, "uloc-3");
        assert_eq!(r.find_ruid(Some("u1"), "uloc-1"), None);
        assert_eq!(r.find_ruid(Some("u1"), "uloc-3"), Some(a));
        // The contact's URI changed under its ruid: the new one takes it.
        let a2 = r
            .insert(0, entry(Some("u1"), "sip:u1@10.0.0.9:5060"))
            .unwrap();
        r.set_ruid(a2, "uloc-3");
        assert_eq!(r.find_ruid(Some("u1"), "uloc-3"), Some(a2));
        assert_eq!(r.get(a).unwrap().ruid, 0);
        // Removal forgets the ruid; a reused slot does not inherit it.
        assert!(r.remove(a2).is_some());
        assert_eq!(r.find_ruid(Some("u1"), "uloc-3"), None);
        let c = r
            .insert(0, entry(Some("u1"), "sip:u1@10.0.0.7:5060"))
            .unwrap();
        assert_eq!(r.find_ruid(Some("u1"), "uloc-3"), None);
        r.set_ruid(c, "");
        assert!(r.remove(b).is_some());
        assert_eq!(r.find_ruid(Some("u2"), "uloc-2"), None);
    }

    #[test]
    fn a_packed_record_gives_back_what_it_was_given() {
        let full = ContactRecord {
            uri: "sip:alice@192.0.2.10:5060;transport=udp".into(),
            aor: Some("alice@example.com".into()),
            received: Some("203.0.113.7:41022".into()),
            path: Some("<sip:edge.example;lr>".into()),
            interval_ms: Some(30_000),
            owner: Some("registrar-1".into()),
            socket: Some("udp:203.0.113.10:5060".into()),
            source: Some("socket".into()),
            keepalive: Some("crlf".into()),
            registrar_expires: None,
        };
        // Absent and empty differ; neighbours never bleed into each other.
        let sparse = ContactRecord {
            uri: "sip:b@h".into(),
            received: Some(String::new()),
            owner: Some("o".into()),
            ..ContactRecord::default()
        };
        for r in [full, sparse, ContactRecord::default()] {
            let p = PackedRecord::new(&r);
            assert_eq!(p.record(), r);
            assert!(p.is(&r));
            assert_eq!(p.key(), r.key());
            let mut other = r.clone();
            other.interval_ms = Some(1);
            assert!(!p.is(&other));
        }
        assert!(std::mem::size_of::<PackedRecord>() <= 48);
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
            .map(|(l, e)| (l.cursor(), e.rec.uri().to_string()))
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
                        assert_eq!(r.remove(loc).unwrap().rec.uri(), uri);
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
