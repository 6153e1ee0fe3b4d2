//! The read-only side of the shared-memory file (DESIGN §7), used by
//! `kaping-stat`, tests and anything else that watches a running daemon.
//!
//! # Invariants
//!
//! * The file is mapped `PROT_READ` (memmap2 `MmapRaw` read-only, so no
//!   `&[u8]` over memory another process mutates is ever formed). The reader
//!   never writes and never locks: a reader can neither disturb nor stall the
//!   daemon.
//! * Nothing is trusted before [`ShmReader::open`] has checked magic, version,
//!   every size this build depends on, and that every offset equals what
//!   [`Geometry::new`] derives from the three sizes and fits in the file. The
//!   validated geometry is copied into the reader and never re-read, so a
//!   later change of the header cannot steer the reader out of bounds.
//! * Every access is an atomic load of ≤ 8 bytes. Rust guarantees only
//!   *Relaxed* loads on read-only memory, so Acquire is obtained with a Relaxed
//!   load followed by `fence(Acquire)` (same synchronisation, same code on
//!   x86-64 and aarch64).
//! * Slots are read under the seqlock: s1 = sequence (Relaxed + Acquire
//!   fence), odd → retry; words Relaxed; `fence(Acquire)`; s2 = sequence; s1 ≠
//!   s2 → retry. Retries spin [`SPIN_RETRIES`] times, then yield, and give up
//!   after [`READ_GIVE_UP`] (a daemon that died mid-write leaves an odd
//!   sequence forever).
//! * Strings are read under the worker's `str_epoch` (see `shm::writer`):
//!   [`ShmReader::read_contact`] brackets slot and string reads by it, so the
//!   strings returned are the ones the returned record pointed to.
//!
//! The one hazard outside our control: if some other process truncates the
//! file while it is mapped, access raises SIGBUS. The daemon never does;
//! it replaces the file by `rename`, which leaves existing mappings intact.

#[cfg(not(target_pointer_width = "64"))]
compile_error!(
    "shm::reader relies on 8-byte atomic loads being valid on read-only memory (64-bit targets)"
);

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::{MmapOptions, MmapRaw};

use super::layout::{
    decode_record, name_from_bytes, Counter, Geometry, Header, Slot, SlotRecord, StrRef,
    WorkerBlock, HIST_BUCKETS, MAGIC_WORD, RECORD_WORDS, REJECT_COUNTERS, SLOT_FREE, VERSION,
};
use super::writer::unix_now_ms;

/// Seqlock retries that only spin before the reader starts yielding.
pub const SPIN_RETRIES: u32 = 64;
/// A slot or string that stays busy this long is reported as unreadable.
pub const READ_GIVE_UP: Duration = Duration::from_millis(100);

/// Why a file could not be opened as a kaping shm file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}: no such file (is the kaping daemon running with this instance name?)")]
    Missing(PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] io::Error),
    #[error("file is too small for a kaping shm file (truncated?)")]
    TooSmall,
    #[error("not a kaping shm file (bad magic)")]
    BadMagic,
    #[error(
        "kaping shm layout version {found}, but this reader knows version {expected}; \
         use the kaping-stat built with the running daemon"
    )]
    Version { found: u32, expected: u32 },
    #[error("corrupt kaping shm file: {0}")]
    Corrupt(String),
}

/// A slot or string stayed mid-write for [`READ_GIVE_UP`]: the daemon is
/// stalled or died while writing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("shm record stayed busy (writer stalled or died mid-write)")]
pub struct Busy;

/// A plain copy of the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderInfo {
    pub version: u32,
    pub workers: u32,
    pub slots_per_worker: u32,
    pub string_bytes_per_worker: u32,
    pub file_size: u64,
    pub pid: u32,
    /// Unix ms.
    pub start_ms: u64,
    /// Unix ms.
    pub heartbeat_ms: u64,
    pub stopped: bool,
    pub instance: String,
    pub backend: String,
    /// `(K, N)` of the daemon's `--shard K/N`; `None` when not sharded.
    pub shard: Option<(u32, u32)>,
}

/// Spin, then yield, then give up.
struct Backoff {
    tries: u32,
    started: Option<Instant>,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            tries: 0,
            started: None,
        }
    }

    /// Wait a little before the next retry; `Err(Busy)` once it is hopeless.
    fn snooze(&mut self) -> Result<(), Busy> {
        self.tries += 1;
        if self.tries <= SPIN_RETRIES {
            std::hint::spin_loop();
            return Ok(());
        }
        let started = *self.started.get_or_insert_with(Instant::now);
        if started.elapsed() >= READ_GIVE_UP {
            return Err(Busy);
        }
        std::thread::yield_now();
        Ok(())
    }
}

/// Acquire load usable on read-only memory.
#[inline]
fn load_acquire(a: &AtomicU64) -> u64 {
    let v = a.load(Ordering::Relaxed);
    fence(Ordering::Acquire);
    v
}

/// One attempt at a consistent copy of a slot's record words.
#[inline]
fn try_copy(slot: &Slot) -> Option<[u64; RECORD_WORDS]> {
    let s1 = load_acquire(&slot.seq);
    if s1 & 1 == 1 {
        return None;
    }
    let mut words = [0u64; RECORD_WORDS];
    for (w, src) in words.iter_mut().zip(&slot.words[..RECORD_WORDS]) {
        *w = src.load(Ordering::Relaxed);
    }
    // Orders the word loads before the second sequence load.
    fence(Ordering::Acquire);
    let s2 = slot.seq.load(Ordering::Relaxed);
    (s1 == s2).then_some(words)
}

/// A read-only view of a kaping shm file.
pub struct ShmReader {
    map: MmapRaw,
    geom: Geometry,
    path: PathBuf,
}

fn check_eq(what: &str, found: u64, expected: u64) -> Result<(), OpenError> {
    if found == expected {
        Ok(())
    } else {
        Err(OpenError::Corrupt(format!(
            "{what} is {found}, expected {expected}"
        )))
    }
}

impl ShmReader {
    /// Map `path` read-only and validate it completely.
    pub fn open(path: &Path) -> Result<ShmReader, OpenError> {
        let io_err = |e: io::Error| {
            if e.kind() == io::ErrorKind::NotFound {
                OpenError::Missing(path.to_path_buf())
            } else {
                OpenError::Io(path.to_path_buf(), e)
            }
        };
        let file = File::open(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        if len < size_of::<Header>() as u64 {
            return Err(OpenError::TooSmall);
        }
        let len = usize::try_from(len)
            .map_err(|_| OpenError::Corrupt(format!("file length {len} exceeds address space")))?;
        let map = MmapOptions::new()
            .len(len)
            .map_raw_read_only(&file)
            .map_err(io_err)?;
        // SAFETY: the mapping is `len >= size_of::<Header>()` bytes (checked
        // above), page aligned, and owned by `map` for this borrow; Header
        // holds only atomics and we only load from it.
        let h = unsafe { &*(map.as_ptr() as *const Header) };
        if load_acquire(&h.magic) != MAGIC_WORD {
            return Err(OpenError::BadMagic);
        }
        let version = h.version.load(Ordering::Relaxed);
        if version != VERSION {
            return Err(OpenError::Version {
                found: version,
                expected: VERSION,
            });
        }
        let r = Ordering::Relaxed;
        // Sizes this build's types depend on: a mismatch means the layout
        // changed without a version bump.
        check_eq(
            "header size",
            h.header_size.load(r) as u64,
            size_of::<Header>() as u64,
        )?;
        check_eq(
            "slot size",
            h.slot_size.load(r) as u64,
            size_of::<Slot>() as u64,
        )?;
        check_eq(
            "worker block size",
            h.worker_block_size.load(r) as u64,
            size_of::<WorkerBlock>() as u64,
        )?;
        check_eq(
            "counter count",
            h.counter_count.load(r) as u64,
            Counter::COUNT as u64,
        )?;
        check_eq(
            "reject counter count",
            h.reject_count.load(r) as u64,
            REJECT_COUNTERS as u64,
        )?;
        check_eq(
            "histogram buckets",
            h.hist_buckets.load(r) as u64,
            HIST_BUCKETS as u64,
        )?;
        let (workers, slots, strings) = (
            h.workers.load(r),
            h.slots_per_worker.load(r),
            h.string_bytes_per_worker.load(r),
        );
        let g = Geometry::new(workers, slots, strings)
            .map_err(|e| OpenError::Corrupt(format!("impossible sizes: {e}")))?;
        check_eq(
            "string bytes per worker",
            strings as u64,
            g.string_bytes_per_worker as u64,
        )?;
        check_eq("workers offset", h.workers_offset.load(r), g.workers_offset)?;
        check_eq("slots offset", h.slots_offset.load(r), g.slots_offset)?;
        check_eq("slots stride", h.slots_stride.load(r), g.slots_stride)?;
        check_eq("strings offset", h.strings_offset.load(r), g.strings_offset)?;
        check_eq("strings stride", h.strings_stride.load(r), g.strings_stride)?;
        check_eq("recorded file size", h.file_size.load(r), g.file_size)?;
        if (len as u64) < g.file_size {
            return Err(OpenError::TooSmall);
        }
        check_eq("file length", len as u64, g.file_size)?;
        Ok(ShmReader {
            map,
            geom: g,
            path: path.to_path_buf(),
        })
    }

    fn hdr(&self) -> &Header {
        // SAFETY: validated in open: the mapping (owned by self) holds a
        // Header at offset 0, page aligned; atomics only, loads only.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn block(&self, w: u32) -> &WorkerBlock {
        assert!(
            w < self.geom.workers,
            "shm worker {w} out of range ({} workers)",
            self.geom.workers
        );
        // SAFETY: w < workers (asserted); open verified that the worker
        // blocks at geom offsets (64-byte aligned) lie within the mapping.
        unsafe {
            &*(self
                .map
                .as_ptr()
                .add(self.geom.worker_block_offset(w) as usize)
                as *const WorkerBlock)
        }
    }

    fn slot(&self, w: u32, slot: u32) -> Option<&Slot> {
        if w >= self.geom.workers || slot >= self.geom.slots_per_worker {
            return None;
        }
        let off = self.geom.slots_offset_of(w) + slot as u64 * size_of::<Slot>() as u64;
        // SAFETY: w and slot are in range (checked above); open verified the
        // slot regions lie within the mapping; Slot is 64-byte aligned there.
        Some(unsafe { &*(self.map.as_ptr().add(off as usize) as *const Slot) })
    }

    /// Word `i` of worker `w`'s string region (caller checks both ranges).
    fn str_word(&self, w: u32, i: usize) -> &AtomicU64 {
        debug_assert!(w < self.geom.workers && i < self.geom.string_bytes_per_worker as usize / 8);
        let off = self.geom.strings_offset_of(w) as usize + i * 8;
        // SAFETY: callers validate w < workers and the word index against the
        // region size; open verified the string regions lie within the mapping.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The validated geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geom
    }

    /// A plain copy of the header; the backend name is read under its seqlock.
    pub fn header(&self) -> HeaderInfo {
        let h = self.hdr();
        let r = Ordering::Relaxed;
        let mut backend = [0u8; super::layout::BACKEND_NAME_MAX];
        let mut backoff = Backoff::new();
        loop {
            let s1 = load_acquire(&h.names_seq);
            for (b, a) in backend.iter_mut().zip(&h.backend) {
                *b = a.load(r);
            }
            fence(Ordering::Acquire);
            let s2 = h.names_seq.load(r);
            // A name is cosmetic: after giving up, show what was read.
            if (s1 & 1 == 0 && s1 == s2) || backoff.snooze().is_err() {
                break;
            }
        }
        let instance: Vec<u8> = h.instance.iter().map(|a| a.load(r)).collect();
        HeaderInfo {
            version: h.version.load(r),
            workers: self.geom.workers,
            slots_per_worker: self.geom.slots_per_worker,
            string_bytes_per_worker: self.geom.string_bytes_per_worker,
            file_size: self.geom.file_size,
            pid: h.pid.load(r),
            start_ms: h.start_ms.load(r),
            heartbeat_ms: h.heartbeat_ms.load(r),
            stopped: h.stopped.load(r) != 0,
            instance: name_from_bytes(&instance),
            backend: name_from_bytes(&backend),
            shard: match h.shard_count.load(r) {
                0 => None,
                n => Some((h.shard_index.load(r), n)),
            },
        }
    }

    /// Milliseconds since the last heartbeat (0 if it is in the future);
    /// `None` if the daemon never wrote one.
    pub fn heartbeat_age_ms(&self) -> Option<u64> {
        match self.hdr().heartbeat_ms.load(Ordering::Relaxed) {
            0 => None,
            hb => Some(unix_now_ms().saturating_sub(hb)),
        }
    }

    /// # Panics
    /// If `w >= workers`.
    pub fn counters(&self, w: u32) -> [u64; Counter::COUNT] {
        let b = self.block(w);
        std::array::from_fn(|i| b.counters[i].load(Ordering::Relaxed))
    }

    /// # Panics
    /// If `w >= workers`.
    pub fn rejects(&self, w: u32) -> [u64; REJECT_COUNTERS] {
        let b = self.block(w);
        std::array::from_fn(|i| b.rejects[i].load(Ordering::Relaxed))
    }

    /// The RTT histogram, [`HIST_BUCKETS`] entries.
    ///
    /// # Panics
    /// If `w >= workers`.
    pub fn histogram(&self, w: u32) -> Vec<u64> {
        self.block(w)
            .hist
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    /// `(sample count, sum of RTTs in µs)` of worker `w`'s histogram.
    ///
    /// # Panics
    /// If `w >= workers`.
    pub fn rtt_totals(&self, w: u32) -> (u64, u64) {
        let b = self.block(w);
        (
            b.rtt_count.load(Ordering::Relaxed),
            b.rtt_sum_us.load(Ordering::Relaxed),
        )
    }

    /// Bytes of worker `w`'s string region in use.
    ///
    /// # Panics
    /// If `w >= workers`.
    pub fn string_bytes_used(&self, w: u32) -> u64 {
        self.block(w).str_used_bytes.load(Ordering::Relaxed)
    }

    /// Seqlock read: `Ok(None)` for a free slot, `Err(Busy)` if the slot stayed
    /// mid-write for [`READ_GIVE_UP`]. Out-of-range `w`/`slot` read as free.
    pub fn try_read_slot(&self, w: u32, slot: u32) -> Result<Option<SlotRecord>, Busy> {
        let Some(s) = self.slot(w, slot) else {
            return Ok(None);
        };
        let mut backoff = Backoff::new();
        loop {
            if let Some(words) = try_copy(s) {
                let rec = decode_record(&words);
                return Ok((rec.state != SLOT_FREE).then_some(rec));
            }
            backoff.snooze()?;
        }
    }

    /// The record in `slot` of worker `w`; `None` if the slot is free, out of
    /// range, or stayed busy (see [`ShmReader::try_read_slot`]).
    pub fn read_slot(&self, w: u32, slot: u32) -> Option<SlotRecord> {
        self.try_read_slot(w, slot).ok().flatten()
    }

    fn str_range_ok(&self, w: u32, r: StrRef) -> bool {
        w < self.geom.workers
            && r.offset.is_multiple_of(8)
            && r.offset as u64 + r.len as u64 <= self.geom.string_bytes_per_worker as u64
    }

    fn copy_str(&self, w: u32, r: StrRef, out: &mut Vec<u8>) {
        out.clear();
        let first = (r.offset / 8) as usize;
        for i in 0..(r.len as usize).div_ceil(8) {
            let word = self.str_word(w, first + i).load(Ordering::Relaxed);
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.truncate(r.len as usize);
    }

    /// Copy string `r` of worker `w` into `out`. `false` (and `out` empty) if
    /// `r` lies outside the region or the region stayed busy.
    ///
    /// The copy is consistent with the string region at one instant, but a
    /// `StrRef` taken from an earlier `read_slot` may have been freed and
    /// reused since; use [`ShmReader::read_contact`] for a record and its
    /// strings from the same instant.
    pub fn read_str(&self, w: u32, r: StrRef, out: &mut Vec<u8>) -> bool {
        out.clear();
        if !self.str_range_ok(w, r) {
            return false;
        }
        if r.len == 0 {
            return true;
        }
        let epoch = &self.block(w).str_epoch;
        let mut backoff = Backoff::new();
        loop {
            let e1 = load_acquire(epoch);
            if e1 & 1 == 0 {
                self.copy_str(w, r, out);
                fence(Ordering::Acquire);
                if epoch.load(Ordering::Relaxed) == e1 {
                    return true;
                }
            }
            if backoff.snooze().is_err() {
                out.clear();
                return false;
            }
        }
    }

    /// A slot's record together with its URI and AoR text, all from the same
    /// instant: the slot read and both string copies are bracketed by the
    /// worker's string-reuse epoch, so no string can have been recycled for
    /// another contact in between. `None` if free, out of range or busy.
    /// Strings whose `StrRef` is out of range come back empty.
    pub fn read_contact(
        &self,
        w: u32,
        slot: u32,
        uri: &mut Vec<u8>,
        aor: &mut Vec<u8>,
    ) -> Option<SlotRecord> {
        let s = self.slot(w, slot)?;
        let epoch = &self.block(w).str_epoch;
        let mut backoff = Backoff::new();
        loop {
            let e1 = load_acquire(epoch);
            if e1 & 1 == 0 {
                if let Some(words) = try_copy(s) {
                    let rec = decode_record(&words);
                    if rec.state == SLOT_FREE {
                        uri.clear();
                        aor.clear();
                        return None;
                    }
                    for (r, out) in [(rec.uri, &mut *uri), (rec.aor, &mut *aor)] {
                        if self.str_range_ok(w, r) {
                            self.copy_str(w, r, out);
                        } else {
                            out.clear();
                        }
                    }
                    fence(Ordering::Acquire);
                    if epoch.load(Ordering::Relaxed) == e1 {
                        return Some(rec);
                    }
                }
            }
            if backoff.snooze().is_err() {
                uri.clear();
                aor.clear();
                return None;
            }
        }
    }
}
