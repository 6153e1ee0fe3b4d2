//! Durable contacts: the journal and snapshots behind the control socket
//! (`--state-dir DIR`).
//!
//! Every change the control socket accepts (`keepalive.add`, `.del`,
//! `.flush`) is an [`Op`]. The control server hands each request's or
//! batch's ops to [`Store::commit`], which appends them to the journal as
//! checksummed, sequence-numbered records with **one write and one
//! fdatasync** (group commit) before the server acknowledges anything. From
//! time to time the daemon calls [`Store::begin_snapshot`], which rotates to
//! a new journal segment and returns a [`SnapshotJob`]; the daemon runs
//! [`SnapshotJob::write`] on a background thread with its view of every
//! contact and its liveness history while commits go on into the new
//! segment. On start, [`Store::open`] restores the newest snapshot plus the
//! newer journal records.
//!
//! # Ownership and threads
//!
//! One [`Store`] per directory, owned by the control server's thread, held
//! under an exclusive `flock` on `DIR/lock` for its lifetime (the kernel
//! drops the lock when the process dies, however it dies). A
//! [`SnapshotJob`] is `Send` and touches only files the store no longer
//! writes: the snapshot it creates and the segments and snapshots it covers.
//! At most one job is outstanding ([`StateError::SnapshotBusy`]).
//!
//! # Guarantees
//!
//! * `commit` returns `Ok` only after the records are on disk (fdatasync).
//!   On error nothing is acknowledged: the caller answers -32006 and does not
//!   apply the change. A failed write is cut back off the file; a failed
//!   fdatasync (whose page-cache state the kernel no longer vouches for) or a
//!   failed cut fails every later commit ([`StateError::Failed`]) until a
//!   restart recovers the journal from disk.
//! * `commit` allocates nothing beyond the store's one reusable encoding
//!   buffer, and never panics.
//! * A crash at any instant leaves a directory that restores to every
//!   acknowledged change: snapshots become visible only by rename after an
//!   fsync, journal segments are created the same way, and covered files are
//!   deleted only after the covering snapshot and its directory entry are
//!   durable.
//! * Restore never skips damage silently: a torn last record (a write that
//!   was never acknowledged) is cut off with a warning; anything else — a bad
//!   record with data after it, a bad record in an older segment, a missing
//!   segment, a bad snapshot — refuses to start with an error naming the
//!   file, byte offset, record number and what the operator can do.
//!
//! # Who may read it
//!
//! The directory is created 0750 and every file in it 0640, whatever the
//! umask, and given to `state_group` when one is set
//! ([`Store::open_with_group`]). An existing directory more open than 0750
//! is tightened at open with a warning, or refused when kaping may not
//! change it; see `dir`'s module doc.
//!
//! # Restore
//!
//! 1. Files named `*.tmp` are unfinished snapshots or segments: removed.
//! 2. The newest `snapshot-S.snap` (largest S) is read; any fault is an error
//!    (older snapshots are not tried: they may predate deletions).
//! 3. Journal segments are taken from the newest one whose first sequence
//!    number is ≤ S+1; older ones are fully covered by the snapshot.
//!    Records are replayed in sequence order (each must carry exactly the
//!    previous number + 1, across segments too), skipping those ≤ S, onto a
//!    map keyed by [`contact_key`]: `Add` of a new key appends it; `Add` of
//!    an existing key replaces its parameters and keeps its position and its
//!    history; `Del` removes; `Flush` removes all contacts, or one owner's.
//!    In the newest segment only, a bad tail is a torn write, cut off with a
//!    warning: fewer bytes left than a record header; a record running past
//!    end of file; a record whose checksum (header or whole) fails and that
//!    ends exactly at end of file; or nothing but zero bytes from the record
//!    on (the file grew but the data never reached the disk). Everything else
//!    is corruption (see `journal::scan`).
//! 4. Covered segments and older snapshots (left by a crash during a
//!    snapshot's clean-up) are deleted, after syncing the snapshot and the
//!    directory.
//! 5. Appends continue in the newest segment (a new one is created when
//!    there is none).
//!
//! # On-disk format (version 1)
//!
//! All integers are little-endian. `checksum(bytes)` is SipHash-1-3 (the
//! variant Rust's std uses) with keys k0 = `0x732d_676e_6970_616b` and
//! k1 = `0x3130_762d_6574_6174` (the ASCII "kaping-s" and "tate-v01" read
//! as little-endian u64s) over exactly those bytes, no length prefix; the
//! 8-byte result is stored little-endian.
//!
//! Files in `DIR` (sequence numbers in names are 20-digit zero-padded
//! decimal, so names sort in order):
//!
//! | name | content |
//! |---|---|
//! | `lock` | `pid N`, informational; the `flock` on it is the lock |
//! | `journal-F.log` | a journal segment whose first record has sequence F |
//! | `snapshot-S.snap` | every contact after applying records 1..=S |
//! | `*.tmp` | a file being written; never read, removed on open |
//!
//! Field encodings used below:
//!
//! * `str`: u32 byte length, then that many bytes of UTF-8.
//! * `opt str`: u32 byte length, `0xFFFF_FFFF` meaning absent (no bytes
//!   follow), then the UTF-8 bytes.
//! * `opt u32`: u8 presence (0 or 1), then u32 value (0 when absent):
//!   always 5 bytes.
//! * `contact`: `uri` str, `aor` opt str, `received` opt str, `path` opt str,
//!   `interval_ms` opt u32, `owner` opt str.
//! * `contact ext`: `socket` opt str, `source` opt str, `keepalive` opt str
//!   (how a contact is pinged as the proxy; added after version 1: journal
//!   kind 4, snapshot version 2).
//! * `history`: u8 presence (0 or 1); when 1, 49 bytes follow: `state` u8,
//!   `misses` u16, `sent` u32, `answered` u32, `rtt_last_us` u32,
//!   `rtt_min_us` u32, `rtt_max_us` u32, `srtt_us` u32, `rttvar_us` u32,
//!   `last_code` u16, `last_ping_ms` u64, `last_reply_ms` u64.
//! * `registrar`: u8 presence (0 or 1); when 1, `expires` u32 follows: the
//!   contact came from the registrar feed (DMQ), and its registration ends
//!   then (unix seconds, 0 = permanent). Snapshot version 3 only; never in
//!   the journal.
//!
//! ## Journal segment `journal-F.log`
//!
//! Header, 32 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KAPJRNL\0` |
//! | 8 | 4 | version = 1 |
//! | 12 | 4 | zero |
//! | 16 | 8 | F, the first record's sequence number |
//! | 24 | 8 | checksum of bytes 0..24 |
//!
//! Then records back to back, each:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | payload length L (at most 16 MiB) |
//! | 4 | 1 | kind: 1 Add, 2 Del, 3 Flush, 4 Add with ext |
//! | 5 | 3 | zero |
//! | 8 | 8 | sequence number (F for the first record, then +1 each) |
//! | 16 | 8 | checksum of bytes 0..16 (the header alone, so a damaged length is caught before it is used) |
//! | 24 | L | payload: Add = `contact`; Add with ext = `contact` then `contact ext` (written only when one of its fields is present, so a journal without them stays readable by older kapings); Del = `str` key ([`contact_key`]); Flush = `opt str` owner (absent = all) |
//! | 24+L | 8 | checksum of bytes 0..24+L |
//!
//! A commit is one contiguous run of records. The file ends after the last
//! record: there is no segment trailer, so a recovery tool reads records
//! until end of file.
//!
//! ## Snapshot `snapshot-S.snap`
//!
//! Header, 64 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KAPSNAP\0` |
//! | 8 | 4 | version = 3 (versions 1 and 2 are read too: their entries have no `registrar`, and version 1's no `contact ext`) |
//! | 12 | 4 | zero |
//! | 16 | 8 | S, the last journal sequence number it covers |
//! | 24 | 8 | N, the number of entries |
//! | 32 | 8 | creation time, Unix milliseconds (informational) |
//! | 40 | 16 | zero |
//! | 56 | 8 | checksum of bytes 0..56 |
//!
//! Then N entries, each:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | body length E |
//! | 4 | E | `contact`, `contact ext` (version 2 on), `history`, then `registrar` (version 3 on) |
//! | 4+E | 8 | checksum of bytes 0..4+E |
//!
//! Then the trailer, 24 bytes, ending the file:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KAPSEND\0` |
//! | 8 | 8 | N again |
//! | 16 | 8 | chain checksum: one SipHash-1-3 stream over the 64 header bytes, then each entry's 8 checksum bytes in order, then trailer bytes 0..16 |
//!
//! The chain binds the entries' order and number to the file, so a
//! truncated, spliced or reordered snapshot is refused even when every entry
//! is intact.

mod codec;
mod dir;
#[doc(hidden)]
pub mod fuzz;
mod journal;
mod snapshot;
#[cfg(test)]
mod tests;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::access::{AccessError, Group};
use dir::io_err;

/// The identity of a contact: `"{aor}\n{uri}"` (aor empty when absent).
/// Neither part may contain a newline; the control server rejects such
/// params before they get here.
pub fn contact_key(aor: Option<&str>, uri: &str) -> String {
    debug_assert!(
        !uri.contains('\n') && !aor.is_some_and(|a| a.contains('\n')),
        "newline in a contact key part: {aor:?} {uri:?}"
    );
    let aor = aor.unwrap_or("");
    let mut key = String::with_capacity(aor.len() + 1 + uri.len());
    key.push_str(aor);
    key.push('\n');
    key.push_str(uri);
    key
}

/// A contact's durable parameters, as `keepalive.add` gave them.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ContactRecord {
    pub uri: String,
    pub aor: Option<String>,
    pub received: Option<String>,
    pub path: Option<String>,
    pub interval_ms: Option<u32>,
    pub owner: Option<String>,
    /// The socket the contact registered on (`udp:IP:PORT`).
    pub socket: Option<String>,
    /// Where its pings leave from, as given (`bind`, `socket`, `IP:PORT`).
    pub source: Option<String>,
    /// What is sent, as given (`sip`, `null`, `crlf`).
    pub keepalive: Option<String>,
    /// Contacts of the registrar feed only, in snapshots only (never in
    /// the journal: the feed, not the journal, is their source of truth):
    /// their absolute expiry, unix seconds, 0 = permanent. Restored, they
    /// are pinged with their history until the feed's first sync confirms
    /// or drops them.
    pub registrar_expires: Option<u32>,
}

impl ContactRecord {
    /// Whether any field of the extended encoding is present (kind 4 in
    /// the journal; snapshots of version 2 on always carry them).
    pub fn has_ext(&self) -> bool {
        self.socket.is_some() || self.source.is_some() || self.keepalive.is_some()
    }

    /// Bytes of text over all its fields.
    pub fn text_len(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, |s| s.len());
        self.uri.len()
            + opt(&self.aor)
            + opt(&self.received)
            + opt(&self.path)
            + opt(&self.owner)
            + opt(&self.socket)
            + opt(&self.source)
            + opt(&self.keepalive)
    }
}

impl ContactRecord {
    /// [`contact_key`] of this contact.
    pub fn key(&self) -> String {
        contact_key(self.aor.as_deref(), &self.uri)
    }
}

/// Liveness to carry over a restart (the shm slot's fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct History {
    /// shm SLOT_* code (1 unknown, 2 up, 3 down).
    pub state: u8,
    pub misses: u16,
    pub sent: u32,
    pub answered: u32,
    pub rtt_last_us: u32,
    pub rtt_min_us: u32,
    pub rtt_max_us: u32,
    pub srtt_us: u32,
    pub rttvar_us: u32,
    pub last_code: u16,
    pub last_ping_ms: u64,
    pub last_reply_ms: u64,
}

/// One durable change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Adds or replaces (same key) a contact.
    Add(ContactRecord),
    /// Deletes by key (`contact_key(aor, uri)`).
    Del { key: String },
    /// Deletes every contact (owner None) or every contact of one owner.
    Flush { owner: Option<String> },
}

/// What [`Store::open`] found.
#[derive(Debug, Default)]
pub struct Restored {
    /// Every durable contact, with its history when the snapshot had one;
    /// snapshot order, then journal order for newer keys.
    pub contacts: Vec<(ContactRecord, Option<History>)>,
    /// Operator-facing warnings (a torn last record ignored, ...), one line each.
    pub warnings: Vec<String>,
    pub snapshot_contacts: u64,
    pub journal_records: u64,
}

/// Every way the store can fail. Messages are one line for the operator:
/// they name the file, and for damage the byte offset, the record (journal:
/// 1-based index in the segment; snapshot: 1-based entry) and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state directory {} is in use by another kaping ({}flock held on {}/lock); \
         stop that daemon or give this one another --state-dir",
        dir.display(),
        if holder.is_empty() { String::new() } else { format!("{holder}, ") },
        dir.display()
    )]
    Locked { dir: PathBuf, holder: String },
    #[error(
        "journal {} is corrupt at byte offset {offset}, record {record}: {what}. {action}",
        file.display()
    )]
    CorruptJournal {
        file: PathBuf,
        offset: u64,
        record: u64,
        what: String,
        action: String,
    },
    #[error("journal {} does not follow on: {what}. {action}", file.display())]
    JournalGap {
        file: PathBuf,
        what: String,
        action: String,
    },
    #[error(
        "snapshot {} is unusable at byte offset {offset}, entry {entry}: {what}. kaping does \
         not fall back to older state silently: restore this file from a backup, or move it \
         out of the state directory to restore from older files (the journal segments it \
         covered were deleted, so a gap is then reported and the contacts it alone held are lost)",
        file.display()
    )]
    BadSnapshot {
        file: PathBuf,
        offset: u64,
        entry: u64,
        what: String,
    },
    #[error("a journal record of {bytes} bytes exceeds the maximum of {max}; nothing was written")]
    RecordTooLarge { bytes: usize, max: usize },
    #[error(
        "journal {} failed earlier ({reason}); no change can be made durable until kaping \
         restarts and recovers the journal from disk",
        file.display()
    )]
    Failed { file: PathBuf, reason: String },
    #[error("a snapshot is still being written; begin the next one after it finishes")]
    SnapshotBusy,
    /// A state file or the directory could not be given its mode or group.
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(
        "state directory {} is mode {mode:04o}: other users can read or change the contacts \
         it holds, and kaping, running as {user}, may not set it to {wanted:04o} ({source}). \
         It belongs to {owner}: have that user run `chmod {wanted:o} {}`, or give kaping a \
         state directory of its own",
        dir.display(),
        dir.display()
    )]
    DirTooOpen {
        dir: PathBuf,
        mode: u32,
        wanted: u32,
        owner: String,
        user: String,
        #[source]
        source: std::io::Error,
    },
}

/// The durable store of one state directory. See the module docs.
pub struct Store {
    dir: PathBuf,
    /// Held for the flock; released when the store drops.
    _lock: File,
    segment: File,
    segment_path: PathBuf,
    segment_first_seq: u64,
    /// Bytes of the active segment known durable; the next write goes here.
    segment_len: u64,
    /// Sequence number of the next record.
    next_seq: u64,
    journal_records: u64,
    commits: u64,
    /// The one reusable encoding buffer.
    buf: Vec<u8>,
    /// Set when the segment's state is no longer known: no commit succeeds.
    failed: Option<String>,
    /// True while a SnapshotJob is alive.
    snapshot_busy: Arc<AtomicBool>,
    /// `state_group`: every file created is given to it.
    group: Option<Group>,
}

/// Sizes the encoding buffer is cut back to after a huge batch, so one
/// 16 MiB request does not pin 16 MiB for the daemon's lifetime.
const BUF_KEEP: usize = 4 << 20;

/// The restore map: contacts in first-added order, a liveness flag per
/// entry (deleted ones are compacted out in place at the end, so restoring
/// a million contacts copies none), an index by key.
#[derive(Default)]
struct Replay {
    entries: Vec<(ContactRecord, Option<History>)>,
    live: Vec<bool>,
    dead: usize,
    /// hashbrown's default hasher: several times faster than std's SipHash
    /// on a million ~70-byte keys, and the keys come from our own files.
    index: hashbrown::HashMap<String, usize>,
}

impl Replay {
    fn push(&mut self, contact: ContactRecord, history: Option<History>) {
        match self.index.entry(contact.key()) {
            // A snapshot never holds a key twice; if one did, the later
            // entry wins, as a later Add would.
            hashbrown::hash_map::Entry::Occupied(e) => self.entries[*e.get()] = (contact, history),
            hashbrown::hash_map::Entry::Vacant(e) => {
                e.insert(self.entries.len());
                self.entries.push((contact, history));
                self.live.push(true);
            }
        }
    }

    fn kill(&mut self, i: usize) {
        debug_assert!(self.live[i], "entry {i} deleted twice");
        self.live[i] = false;
        self.dead += 1;
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Add(contact) => match self.index.get(&contact.key()) {
                // Same key: new parameters, same position, same history.
                Some(&i) => self.entries[i].0 = contact,
                None => self.push(contact, None),
            },
            Op::Del { key } => {
                if let Some(i) = self.index.remove(&key) {
                    self.kill(i);
                }
            }
            Op::Flush { owner: None } => *self = Replay::default(),
            Op::Flush { owner: Some(owner) } => {
                for i in 0..self.entries.len() {
                    let contact = &self.entries[i].0;
                    if self.live[i] && contact.owner.as_deref() == Some(owner.as_str()) {
                        self.index.remove(&contact.key());
                        self.kill(i);
                    }
                }
            }
        }
    }

    fn into_contacts(mut self) -> Vec<(ContactRecord, Option<History>)> {
        if self.dead > 0 {
            let mut live = self.live.iter();
            self.entries
                .retain(|_| *live.next().expect("one flag per entry"));
        }
        self.entries
    }
}

fn gap_action() -> String {
    "A journal segment or snapshot is missing, so acknowledged changes cannot be \
     replayed in order. Put the missing file back; or, to start from what is here, move \
     the files before the gap out of the state directory (the changes they held are lost)"
        .to_owned()
}

impl Store {
    /// [`Store::open_with_group`] with no `state_group`: the directory and
    /// its files stay of the daemon's own group.
    pub fn open(dir: &Path) -> Result<(Store, Restored), StateError> {
        Store::open_with_group(dir, None)
    }

    /// Creates DIR if missing (0750) or tightens it (see the module doc);
    /// takes an exclusive flock on DIR/lock (a second daemon on the same
    /// dir: error naming the dir); restores snapshot + journal. The
    /// directory and every file in it, existing or created later, are
    /// given to `group` (`state_group`) when one is set.
    pub fn open_with_group(
        dir: &Path,
        group: Option<&Group>,
    ) -> Result<(Store, Restored), StateError> {
        let mut warnings = Vec::new();
        dir::prepare(dir, group, &mut warnings)?;
        let lock = dir::lock(dir, group)?;
        let listing = dir::list(dir)?;
        dir::restrict_files(dir, &listing, group, &mut warnings)?;

        for temp in &listing.temps {
            fs::remove_file(temp).map_err(|e| io_err(temp, "remove unfinished file", e))?;
            warnings.push(format!(
                "{}: removed an unfinished file (a snapshot or segment creation was \
                 interrupted; the previous state files are intact)",
                temp.display()
            ));
        }

        let mut replay = Replay::default();
        let mut snapshot_contacts = 0;
        let mut base_seq = 0;
        if let Some((seq, path)) = listing.snapshots.last() {
            snapshot_contacts = snapshot::read(path, *seq, |c, h| replay.push(c, h))?;
            base_seq = *seq;
        }

        // Segments older than the newest one starting at or before base+1
        // hold only records the snapshot covers.
        let segments = &listing.segments;
        let first_needed = segments
            .iter()
            .rposition(|(first, _)| *first <= base_seq + 1)
            .unwrap_or(0);
        let (covered, needed) = segments.split_at(first_needed);

        let mut journal_records = 0u64;
        let mut expected: Option<u64> = None;
        let mut last_end = 0u64;
        for (i, (first, path)) in needed.iter().enumerate() {
            match expected {
                None if *first > base_seq + 1 => {
                    return Err(StateError::JournalGap {
                        file: path.clone(),
                        what: format!(
                            "it starts at record {first} but {} covers only records up to \
                             {base_seq}; records {}..{first} are missing",
                            listing.snapshots.last().map_or(
                                "no snapshot".to_owned(),
                                |(_, p)| format!("snapshot {}", p.display())
                            ),
                            base_seq + 1
                        ),
                        action: gap_action(),
                    });
                }
                Some(e) if *first != e => {
                    return Err(StateError::JournalGap {
                        file: path.clone(),
                        what: format!(
                            "it starts at record {first} but the previous segment ends \
                             before record {e}"
                        ),
                        action: gap_action(),
                    });
                }
                _ => {}
            }
            let is_last = i + 1 == needed.len();
            let scan = journal::scan(path, *first, is_last, |seq, op| {
                if seq > base_seq {
                    replay.apply(op);
                    journal_records += 1;
                }
            })?;
            if let Some(torn) = &scan.torn {
                let cut = File::options()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(torn.offset).and_then(|()| f.sync_all()));
                cut.map_err(|e| io_err(path, "cut off the torn last record", e))?;
                warnings.push(format!(
                    "{}: ignored a torn last record at byte offset {} (record {}, sequence \
                     {}: {}); it was never acknowledged. Truncated the file to {} bytes",
                    path.display(),
                    torn.offset,
                    torn.record,
                    scan.next_seq,
                    torn.why,
                    torn.offset
                ));
            }
            expected = Some(scan.next_seq);
            last_end = scan.end;
        }

        // Clean-up a crash interrupted: only once the snapshot that covers
        // these files is itself durable, including its directory entry (a
        // crash between its rename and the directory fsync leaves it visible
        // now but not necessarily on disk).
        let older_snapshots = &listing.snapshots[..listing.snapshots.len().saturating_sub(1)];
        if !covered.is_empty() || !older_snapshots.is_empty() {
            if let Some((_, path)) = listing.snapshots.last() {
                File::open(path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| io_err(path, "fsync snapshot", e))?;
            }
            dir::sync_dir(dir)?;
            let stale = covered.iter().chain(older_snapshots).map(|(_, p)| p);
            let mut removed = 0;
            for path in stale {
                fs::remove_file(path).map_err(|e| io_err(path, "remove covered file", e))?;
                removed += 1;
            }
            dir::sync_dir(dir)?;
            warnings.push(format!(
                "{}: removed {removed} file(s) the newest snapshot covers (an earlier \
                 snapshot's clean-up was interrupted)",
                dir.display()
            ));
        }

        let next_seq = expected.unwrap_or(base_seq + 1).max(base_seq + 1);
        let (segment, segment_path, segment_first_seq, segment_len) = match needed.last() {
            Some((first, path)) if expected == Some(next_seq) => {
                let file = File::options()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| io_err(path, "open journal segment", e))?;
                (file, path.clone(), *first, last_end)
            }
            _ => {
                let (file, path) = journal::create_segment(dir, next_seq, group)?;
                (file, path, next_seq, journal::SEGMENT_HEADER_LEN)
            }
        };

        let store = Store {
            dir: dir.to_path_buf(),
            _lock: lock,
            segment,
            segment_path,
            segment_first_seq,
            segment_len,
            next_seq,
            journal_records,
            commits: 0,
            buf: Vec::with_capacity(64 << 10),
            failed: None,
            snapshot_busy: Arc::new(AtomicBool::new(false)),
            group: group.cloned(),
        };
        let restored = Restored {
            contacts: replay.into_contacts(),
            warnings,
            snapshot_contacts,
            journal_records,
        };
        Ok((store, restored))
    }

    /// Appends the ops as checksummed records and makes them durable: one
    /// write and one fdatasync for the whole slice (group commit). On error
    /// nothing may be acknowledged (the caller answers -32006).
    pub fn commit(&mut self, ops: &[Op]) -> Result<(), StateError> {
        if let Some(reason) = &self.failed {
            return Err(StateError::Failed {
                file: self.segment_path.clone(),
                reason: reason.clone(),
            });
        }
        if ops.is_empty() {
            return Ok(());
        }
        self.buf.clear();
        let mut seq = self.next_seq;
        for op in ops {
            journal::encode_record(&mut self.buf, seq, op)?;
            seq += 1;
        }
        // pwrite at the tracked end, not O_APPEND: after a failed write the
        // next commit overwrites whatever part of it landed.
        if let Err(e) = self.segment.write_all_at(&self.buf, self.segment_len) {
            if let Err(cut) = self.segment.set_len(self.segment_len) {
                self.failed = Some(format!(
                    "a write failed ({e}) and cutting it back off failed ({cut})"
                ));
            }
            return Err(io_err(&self.segment_path, "append journal records", e));
        }
        if let Err(e) = self.segment.sync_data() {
            // After a failed fdatasync the kernel may have dropped the dirty
            // pages and cleared the error: a retry could "succeed" without
            // the data on disk. Only a restart, reading the disk, knows.
            self.failed = Some(format!("fdatasync failed: {e}"));
            return Err(io_err(&self.segment_path, "fdatasync", e));
        }
        self.segment_len += self.buf.len() as u64;
        self.journal_records += seq - self.next_seq;
        self.next_seq = seq;
        self.commits += 1;
        if self.buf.capacity() > BUF_KEEP {
            self.buf = Vec::with_capacity(64 << 10);
        }
        Ok(())
    }

    /// Records committed since the last snapshot began.
    pub fn journal_records(&self) -> u64 {
        self.journal_records
    }

    /// Successful non-empty [`Store::commit`] calls since open (each one
    /// write and one fdatasync): the `journal_commits` statistic.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Starts a compaction: rotates to a new journal segment (so commits
    /// continue) and returns a job covering everything committed so far.
    ///
    /// The contacts later passed to [`SnapshotJob::write`] must be the
    /// caller's view after exactly the commits made before this call: take
    /// it on the committing thread, between commits. At most one job at a
    /// time ([`StateError::SnapshotBusy`]); dropping a job unwritten is
    /// harmless (its segments stay until a later snapshot covers them).
    pub fn begin_snapshot(&mut self) -> Result<SnapshotJob, StateError> {
        if let Some(reason) = &self.failed {
            return Err(StateError::Failed {
                file: self.segment_path.clone(),
                reason: reason.clone(),
            });
        }
        if self.snapshot_busy.load(Ordering::Acquire) {
            return Err(StateError::SnapshotBusy);
        }
        let covered_seq = self.next_seq - 1;
        // An empty active segment already starts after everything covered.
        if self.segment_first_seq != self.next_seq {
            let (file, path) =
                journal::create_segment(&self.dir, self.next_seq, self.group.as_ref())?;
            self.segment = file;
            self.segment_path = path;
            self.segment_first_seq = self.next_seq;
            self.segment_len = journal::SEGMENT_HEADER_LEN;
        }
        self.journal_records = 0;
        self.snapshot_busy.store(true, Ordering::Release);
        Ok(SnapshotJob {
            dir: self.dir.clone(),
            covered_seq,
            busy: Arc::clone(&self.snapshot_busy),
            group: self.group.clone(),
        })
    }
}

/// `Send`: the daemon runs it on a background thread.
pub struct SnapshotJob {
    dir: PathBuf,
    covered_seq: u64,
    busy: Arc<AtomicBool>,
    group: Option<Group>,
}

/// What [`SnapshotJob::write`] did.
#[derive(Debug)]
pub struct SnapshotStats {
    pub contacts: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Where [`SnapshotJob::write_until`] stops: crash simulation for tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JobStop {
    At(snapshot::Stop),
    /// The snapshot is durable; only the first covered file was deleted.
    #[cfg_attr(not(test), allow(dead_code))]
    AfterFirstDelete,
}

impl SnapshotJob {
    /// Writes every contact (the caller's view at `begin_snapshot` time)
    /// to a temp file, fsync, rename, fsync dir, then deletes the journal
    /// segments and older snapshots it covers.
    pub fn write(
        self,
        contacts: &[(ContactRecord, Option<History>)],
    ) -> Result<SnapshotStats, StateError> {
        let stats = self.write_until(contacts, JobStop::At(snapshot::Stop::Never))?;
        Ok(stats.expect("no stop point in production"))
    }

    /// The last sequence number the snapshot covers.
    pub fn covered_seq(&self) -> u64 {
        self.covered_seq
    }

    fn write_until(
        &self,
        contacts: &[(ContactRecord, Option<History>)],
        stop: JobStop,
    ) -> Result<Option<SnapshotStats>, StateError> {
        let start = Instant::now();
        let snapshot_stop = match stop {
            JobStop::At(s) => s,
            JobStop::AfterFirstDelete => snapshot::Stop::Never,
        };
        let Some(written) = snapshot::write(
            &self.dir,
            self.covered_seq,
            contacts,
            self.group.as_ref(),
            snapshot_stop,
        )?
        else {
            return Ok(None);
        };
        // The snapshot and its name are durable: what it covers can go.
        let listing = dir::list(&self.dir)?;
        let stale = listing
            .segments
            .iter()
            .filter(|(first, _)| *first <= self.covered_seq)
            .chain(
                listing
                    .snapshots
                    .iter()
                    .filter(|(s, _)| *s < self.covered_seq),
            )
            .map(|(_, p)| p);
        let mut removed = 0;
        for path in stale {
            debug_assert_ne!(path, &written.path);
            fs::remove_file(path).map_err(|e| io_err(path, "remove covered file", e))?;
            removed += 1;
            if stop == JobStop::AfterFirstDelete {
                return Ok(None);
            }
        }
        if removed > 0 {
            // Not needed for correctness (a resurrected covered file is
            // removed again on open), but keeps the directory tidy after a
            // crash.
            dir::sync_dir(&self.dir)?;
        }
        Ok(Some(SnapshotStats {
            contacts: contacts.len() as u64,
            bytes: written.bytes,
            elapsed: start.elapsed(),
        }))
    }
}

impl Drop for SnapshotJob {
    fn drop(&mut self) {
        self.busy.store(false, Ordering::Release);
    }
}

// The daemon moves the job to its snapshot thread.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<SnapshotJob>();
};
