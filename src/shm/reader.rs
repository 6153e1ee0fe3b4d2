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
//! * The registrar block (layout version 3) is read under its own seqlock
//!   the same way ([`ShmReader::registrar`]); a version 2 file, which has
//!   none, opens as well and answers `None`.
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
    decode_record, name_from_bytes, Counter, Geometry, Header, RegistrarBlock, RegistrarFigures,
    RegistrarStat, Slot, SlotRecord, StrRef, WorkerBlock, HIST_BUCKETS, MAGIC_WORD, RECORD_WORDS,
    REJECT_COUNTERS, SLOT_FREE, VERSION, VERSION_READ_MIN,
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
        "kaping shm layout version {found}, but this reader knows versions {min} to {expected}; \
         use the kaping-stat built with the running daemon",
        min = VERSION_READ_MIN
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
        if !(VERSION_READ_MIN..=VERSION).contains(&version) {
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
        // Older layouts hold fewer counters in the same words (the rest
        // padding, zero): `counters` shows those as 0.
        check_eq(
            "counter count",
            h.counter_count.load(r) as u64,
            Counter::count_in_version(version) as u64,
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
        let g = Geometry::for_version(version, workers, slots, strings)
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
        // Version 2 has no block; its header's tail (where these fields are
        // now) was padding and is not looked at.
        if g.has_registrar() {
            check_eq(
                "registrar offset",
                h.registrar_offset.load(r),
                g.registrar_offset,
            )?;
            check_eq(
                "registrar block size",
                h.registrar_block_size.load(r) as u64,
                size_of::<RegistrarBlock>() as u64,
            )?;
            check_eq(
                "registrar figure count",
                h.registrar_count.load(r) as u64,
                RegistrarStat::COUNT as u64,
            )?;
        }
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

    fn registrar_block(&self) -> Option<&RegistrarBlock> {
        if !self.geom.has_registrar() {
            return None;
        }
        // SAFETY: open verified (through Geometry::for_version and the file
        // length) that a version 3 file holds the block at this 64-byte
        // aligned offset inside the mapping; atomics only, loads only.
        Some(unsafe {
            &*(self
                .map
                .as_ptr()
                .add(self.geom.registrar_offset as usize)
                .cast::<RegistrarBlock>())
        })
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

    /// The registrar feed's figures, consistent with one write of the
    /// daemon (seqlock read). `Ok(None)` for a version 2 file, which has no
    /// registrar block; `Err(Busy)` if the block stayed mid-write for
    /// [`READ_GIVE_UP`]. A daemon without the feed leaves every figure 0,
    /// `FeedConfigured` included.
    pub fn registrar(&self) -> Result<Option<RegistrarFigures>, Busy> {
        let Some(b) = self.registrar_block() else {
            return Ok(None);
        };
        let mut backoff = Backoff::new();
        loop {
            let s1 = load_acquire(&b.seq);
            if s1 & 1 == 0 {
                let mut f = RegistrarFigures::default();
                for (v, src) in f.values.iter_mut().zip(&b.words) {
                    *v = src.load(Ordering::Relaxed);
                }
                // Orders the word loads before the second sequence load.
                fence(Ordering::Acquire);
                if b.seq.load(Ordering::Relaxed) == s1 {
                    return Ok(Some(f));
                }
            }
            backoff.snooze()?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::layout::{HEADER_SIZE, REGISTRAR_WORDS};
    use crate::shm::writer::{ShmConfig, ShmFile};
    use std::fs::OpenOptions;
    use std::mem::offset_of;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn create(dir: &Path) -> (PathBuf, ShmFile) {
        let path = dir.join("kaping-reader-test");
        let shm = ShmFile::create(&ShmConfig {
            path: path.clone(),
            workers: 2,
            slots_per_worker: 4,
            string_bytes_per_worker: 128,
            instance: "t".into(),
            backend: "mmsg".into(),
            shard: None,
            group: None,
        })
        .unwrap();
        (path, shm)
    }

    fn patch(path: &Path, offset: usize, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, offset as u64).unwrap();
    }

    /// Turns a fresh file into the version 3 file the same daemon settings
    /// produced: the counters of version 4 were padding (zero), the header
    /// said so in its counter count.
    fn make_version_3(path: &Path) {
        patch(path, offset_of!(Header, version), &3u32.to_ne_bytes());
        patch(
            path,
            offset_of!(Header, counter_count),
            &(Counter::count_in_version(3) as u32).to_ne_bytes(),
        );
    }

    /// Turns a fresh file into the version 2 file the same daemon settings
    /// produced: version 3's, no block at the end, the header's tail zero
    /// (it was padding).
    fn make_version_2(path: &Path) {
        let r = ShmReader::open(path).unwrap();
        let g = *r.geometry();
        drop(r);
        make_version_3(path);
        patch(path, offset_of!(Header, version), &2u32.to_ne_bytes());
        let tail = offset_of!(Header, registrar_offset);
        patch(path, tail, &vec![0u8; HEADER_SIZE - tail]);
        patch(
            path,
            offset_of!(Header, file_size),
            &g.registrar_offset.to_ne_bytes(),
        );
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(g.registrar_offset).unwrap();
    }

    fn figures(k: u64) -> RegistrarFigures {
        RegistrarFigures {
            values: std::array::from_fn(|i| k * 1000 + i as u64),
        }
    }

    #[test]
    fn registrar_figures_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut shm) = create(dir.path());
        let r = ShmReader::open(&path).unwrap();
        // A fresh file: every figure 0, the feed not configured.
        let zero = r.registrar().unwrap().unwrap();
        assert_eq!(zero, RegistrarFigures::default());
        assert!(!zero.flag(RegistrarStat::FeedConfigured));
        let mut f = figures(3);
        f.set(RegistrarStat::FeedConfigured, 1);
        shm.write_registrar(&f);
        assert_eq!(r.registrar(), Ok(Some(f)));
        // A second reader maps the same bytes.
        let r2 = ShmReader::open(&path).unwrap();
        assert_eq!(r2.registrar(), Ok(Some(f)));
        assert_eq!(r2.header().version, VERSION);
    }

    #[test]
    fn a_version_2_file_opens_without_registrar_figures() {
        let dir = tempfile::tempdir().unwrap();
        let (path, shm) = create(dir.path());
        let w = shm.worker(1);
        w.set(Counter::Sent, 42);
        shm.mark_stopped();
        drop(w);
        drop(shm);
        make_version_2(&path);
        let r = ShmReader::open(&path).expect("version 2 opens");
        assert_eq!(r.header().version, 2);
        assert!(!r.geometry().has_registrar());
        assert_eq!(r.registrar(), Ok(None));
        assert_eq!(r.counters(1)[Counter::Sent.index()], 42);
        assert!(r.header().stopped);
    }

    #[test]
    fn a_version_3_file_opens_with_the_newer_counters_zero() {
        let dir = tempfile::tempdir().unwrap();
        let (path, shm) = create(dir.path());
        shm.worker(0).set(Counter::Unreachable, 5);
        drop(shm);
        make_version_3(&path);
        let r = ShmReader::open(&path).expect("version 3 opens");
        assert_eq!(r.header().version, 3);
        let c = r.counters(0);
        assert_eq!(c[Counter::Unreachable.index()], 5);
        for k in [
            Counter::IcmpForged,
            Counter::IcmpUnmatched,
            Counter::IcmpOther,
        ] {
            assert_eq!(c[k.index()], 0, "{k:?}");
        }
        // A version 3 header that claims version 4's counters is refused.
        patch(
            &path,
            offset_of!(Header, counter_count),
            &(Counter::COUNT as u32).to_ne_bytes(),
        );
        let msg = ShmReader::open(&path).err().unwrap().to_string();
        assert!(msg.contains("counter count"), "{msg}");
    }

    #[test]
    fn versions_outside_the_readable_range_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, shm) = create(dir.path());
        drop(shm);
        for v in [VERSION_READ_MIN - 1, VERSION + 1] {
            patch(&path, offset_of!(Header, version), &v.to_ne_bytes());
            match ShmReader::open(&path) {
                Err(OpenError::Version { found, expected }) => {
                    assert_eq!((found, expected), (v, VERSION));
                }
                other => panic!("version {v}: {:?}", other.map(|_| ())),
            }
        }
        let msg = ShmReader::open(&path).err().unwrap().to_string();
        assert!(msg.contains("knows versions 2 to 4"), "{msg}");
    }

    #[test]
    fn a_bad_registrar_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, shm) = create(dir.path());
        drop(shm);
        let good = ShmReader::open(&path).unwrap().geometry().registrar_offset;
        for (offset, bytes, says) in [
            (
                offset_of!(Header, registrar_offset),
                (good + 64).to_ne_bytes().to_vec(),
                "registrar offset",
            ),
            (
                offset_of!(Header, registrar_block_size),
                64u32.to_ne_bytes().to_vec(),
                "registrar block size",
            ),
            (
                offset_of!(Header, registrar_count),
                (RegistrarStat::COUNT as u32 + 1).to_ne_bytes().to_vec(),
                "registrar figure count",
            ),
        ] {
            let (path, shm) = create(dir.path());
            drop(shm);
            patch(&path, offset, &bytes);
            match ShmReader::open(&path) {
                Err(OpenError::Corrupt(m)) => assert!(m.contains(says), "{m}"),
                other => panic!("{says}: {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn a_block_left_mid_write_is_busy_not_torn() {
        let dir = tempfile::tempdir().unwrap();
        let (path, shm) = create(dir.path());
        let off = shm.geometry().registrar_offset as usize;
        drop(shm);
        // What a daemon killed inside write_registrar leaves.
        patch(&path, off, &1u64.to_ne_bytes());
        let r = ShmReader::open(&path).unwrap();
        let t = std::time::Instant::now();
        assert_eq!(r.registrar(), Err(Busy));
        assert!(t.elapsed() >= READ_GIVE_UP);
    }

    /// One writer rewrites the block as fast as it can with every value
    /// derived from one k; readers must only ever see one k per read, and
    /// never an older k than they saw before.
    #[test]
    fn concurrent_reads_never_see_a_mix_of_two_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut shm) = create(dir.path());
        shm.write_registrar(&figures(0));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (path, stop) = (path.clone(), stop.clone());
                std::thread::spawn(move || {
                    let r = ShmReader::open(&path).unwrap();
                    let (mut reads, mut last_k) = (0u64, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        let f = r.registrar().unwrap().unwrap();
                        let k = f.values[0] / 1000;
                        assert_eq!(f, figures(k), "a read mixed two writes");
                        assert!(k >= last_k, "k went back from {last_k} to {k}");
                        last_k = k;
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        let started = std::time::Instant::now();
        let mut k = 0u64;
        while started.elapsed() < Duration::from_millis(300) {
            k += 1;
            shm.write_registrar(&figures(k));
        }
        stop.store(true, Ordering::Relaxed);
        for t in readers {
            assert!(t.join().unwrap() > 0);
        }
        assert!(k > 1000, "only {k} writes");
        // Reserved words past the figures stay zero.
        let b = ShmReader::open(&path).unwrap();
        let blk = b.registrar_block().unwrap();
        for w in &blk.words[RegistrarStat::COUNT..REGISTRAR_WORDS] {
            assert_eq!(w.load(Ordering::Relaxed), 0);
        }
    }
}
