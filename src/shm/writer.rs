//! The daemon's side of the shared-memory file (DESIGN §7).
//!
//! # Ownership
//!
//! * [`ShmFile`] is owned by the daemon's main thread. It creates and publishes
//!   the file, updates the header (`heartbeat`, `mark_stopped`, `set_backend`)
//!   and the registrar block (`write_registrar`, `&mut self`: one writer), and
//!   hands out exactly one [`WorkerShm`] per worker, ever.
//! * [`WorkerShm`] is moved into its worker thread (it is `Send`, not `Sync`)
//!   and is the only writer of that worker's block, slots and string region.
//!   Its `Arc` of the mapping only keeps the memory alive; the hot path uses
//!   raw pointers computed once in [`ShmFile::worker`].
//!
//! # Publication
//!
//! [`ShmFile::create`] builds the file under a temporary name in the target's
//! directory (`O_EXCL`), sizes and pre-allocates it, maps it, writes every
//! header field with the magic last (Release), then `rename`s it over the
//! target. A reader therefore only ever opens a fully initialised file; a
//! reader that still maps a replaced file keeps the old inode and is unharmed.
//! A target that belongs to another live daemon (valid header, not stopped,
//! pid alive, fresh heartbeat) is refused instead of replaced.
//!
//! The file holds every contact URI, so it is published mode 0640
//! ([`crate::access::SHM_FILE_MODE`]) whatever the umask, and given to the
//! `shm_group` when one is set: both are applied to the temporary file,
//! before the rename, so no reader ever sees it more open, and the
//! monitoring group can read it from its first instant.
//!
//! # Hot path (per ping / per reply)
//!
//! `add`, `set`, `add_reject`, `record_rtt` are a Relaxed load + store (one
//! writer, so no read-modify-write instruction is needed); `write_slot` is a
//! seqlock write: sequence to odd, Release fence, Relaxed word stores,
//! sequence to even with Release. None of them allocates, locks or formats.
//! They `assert!` that the slot index is in range (a catastrophic caller bug:
//! writing another worker's slot).
//!
//! # Strings (control path only)
//!
//! Each worker's string region is managed by a private allocator: 52 size
//! classes (every multiple of 8 up to 128 bytes, then 4 per power of two up to
//! 64 KiB) with free lists in ordinary heap memory, a bump pointer, and
//! splitting of a larger free block when the bump pointer is exhausted. A freed
//! block's bytes are left untouched (a reader may still be copying them); when
//! a freed block is reused the worker's `str_epoch` goes odd around the
//! overwrite so readers can detect that the bytes they copied may belong to a
//! different contact (see `ShmReader::read_contact`). String bytes are stored
//! as 8-byte atomic words, blocks are 8-byte aligned and zero padded.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::{MmapOptions, MmapRaw};

use super::layout::{
    bucket_index, decode_record, decode_str_refs, encode_record, Counter, Geometry, Header,
    RegistrarBlock, RegistrarFigures, RegistrarStat, Slot, SlotRecord, StrRef, WorkerBlock,
    BACKEND_NAME_MAX, HIST_BUCKETS, INSTANCE_NAME_MAX, MAGIC_WORD, RECORD_WORDS, REJECT_COUNTERS,
    STR_LENS_WORD, STR_LEN_MAX, STR_OFFSETS_WORD, VERSION,
};
use super::reader::ShmReader;
use crate::access::{self, Group};

/// A file whose heartbeat is older than this is considered abandoned even if
/// its pid exists (the pid may have been reused).
pub const STALE_AFTER_MS: u64 = 5_000;

/// What [`ShmFile::create`] builds.
#[derive(Clone, Debug)]
pub struct ShmConfig {
    /// Typically `/dev/shm/kaping-<instance>`.
    pub path: PathBuf,
    pub workers: u32,
    pub slots_per_worker: u32,
    /// Rounded up to a multiple of 64.
    pub string_bytes_per_worker: u32,
    /// At most [`INSTANCE_NAME_MAX`] bytes, no NUL.
    pub instance: String,
    /// At most [`BACKEND_NAME_MAX`] bytes, no NUL (e.g. "io_uring", "mmsg").
    pub backend: String,
    /// `(K, N)` of `--shard K/N`; `None` when not sharded.
    pub shard: Option<(u32, u32)>,
    /// The group that may read the file (`shm_group`); `None`: the
    /// daemon's own group.
    pub group: Option<Group>,
}

/// The published shm file; owned by the daemon's main thread.
pub struct ShmFile {
    map: Arc<MmapRaw>,
    geom: Geometry,
    path: PathBuf,
    claimed: Box<[AtomicBool]>,
    /// Serialises `set_backend` callers so the names seqlock has one writer.
    names_lock: Mutex<()>,
}

/// Current wall-clock time in unix milliseconds (0 if the clock is before 1970).
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn check_name(what: &str, name: &str, max: usize) -> io::Result<()> {
    if name.len() > max {
        return Err(invalid(format!(
            "shm {what} name {name:?} is {} bytes, the limit is {max}",
            name.len()
        )));
    }
    if name.as_bytes().contains(&0) {
        return Err(invalid(format!(
            "shm {what} name {name:?} contains a NUL byte"
        )));
    }
    Ok(())
}

fn store_name(field: &[AtomicU8], name: &str) {
    let bytes = name.as_bytes();
    for (i, b) in field.iter().enumerate() {
        b.store(bytes.get(i).copied().unwrap_or(0), Ordering::Relaxed);
    }
}

/// Refuse to replace a file that a live daemon is still publishing.
fn check_not_live(path: &Path) -> io::Result<()> {
    let Ok(old) = ShmReader::open(path) else {
        return Ok(()); // missing, foreign or corrupt: nothing to protect
    };
    let h = old.header();
    if h.stopped || h.pid == std::process::id() || h.pid == 0 {
        return Ok(());
    }
    let age_ms = unix_now_ms().saturating_sub(h.heartbeat_ms);
    if age_ms >= STALE_AFTER_MS {
        return Ok(());
    }
    // SAFETY: kill with signal 0 only checks that the pid exists; it has no
    // memory-safety preconditions.
    let alive = unsafe { libc::kill(h.pid as libc::pid_t, 0) } == 0
        || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !alive {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "{} is in use by running kaping pid {} (instance {:?}, heartbeat {} ms ago); \
             stop it or choose another instance name",
            path.display(),
            h.pid,
            h.instance,
            age_ms
        ),
    ))
}

/// Reserve the file's blocks now so a full tmpfs fails here with ENOSPC
/// instead of raising SIGBUS on the first write to a page later.
fn preallocate(file: &File, len: u64, path: &Path) -> io::Result<()> {
    // SAFETY: the fd is open for writing and owned by `file` for the whole call.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        // File systems without fallocate: keep the sparse file from set_len.
        libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        e => Err(io::Error::new(
            io::Error::from_raw_os_error(e).kind(),
            format!(
                "cannot reserve {len} bytes for shm file {}: {}",
                path.display(),
                io::Error::from_raw_os_error(e)
            ),
        )),
    }
}

impl ShmFile {
    /// Create, initialise and publish the file at `cfg.path`, mode 0640 and
    /// of `cfg.group`, replacing a stale one atomically. Fails with
    /// `InvalidInput` for impossible sizes or names, `AddrInUse` if a live
    /// daemon owns the path, or the underlying I/O error; a failure to give
    /// the file its group or mode carries an [`access::AccessError`] (which
    /// names the `shm_group` setting) as its inner error.
    pub fn create(cfg: &ShmConfig) -> io::Result<ShmFile> {
        let geom = Geometry::new(
            cfg.workers,
            cfg.slots_per_worker,
            cfg.string_bytes_per_worker,
        )
        .map_err(|e| invalid(format!("shm file {}: {e}", cfg.path.display())))?;
        check_name("instance", &cfg.instance, INSTANCE_NAME_MAX)?;
        check_name("backend", &cfg.backend, BACKEND_NAME_MAX)?;
        check_not_live(&cfg.path)?;

        let file_name = cfg
            .path
            .file_name()
            .ok_or_else(|| invalid(format!("shm path {} has no file name", cfg.path.display())))?;
        let dir = match cfg.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let pid = std::process::id();
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".{pid}.{}.tmp", unix_now_ms()));
        let tmp = dir.join(tmp_name);

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(access::SHM_FILE_MODE)
            .open(&tmp)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("cannot create {}: {e}", tmp.display()))
            })?;
        let publish = || -> io::Result<MmapRaw> {
            // Named by its final path: that is the file the operator knows.
            access::set_group_and_mode(
                &file,
                "shm file",
                &cfg.path,
                access::SHM_FILE_MODE,
                cfg.group.as_ref(),
            )
            .map_err(|e| io::Error::new(e.kind(), e))?;
            file.set_len(geom.file_size)?;
            preallocate(&file, geom.file_size, &tmp)?;
            let map = MmapOptions::new()
                .len(geom.file_size as usize)
                .map_raw(&file)?;
            // A fresh file is all zeros: every slot is SLOT_FREE, every counter 0.
            init_header(&map, &geom, cfg, pid);
            fs::rename(&tmp, &cfg.path).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot rename {} to {}: {e}",
                        tmp.display(),
                        cfg.path.display()
                    ),
                )
            })?;
            Ok(map)
        };
        let map = publish().inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        Ok(ShmFile {
            map: Arc::new(map),
            geom,
            path: cfg.path.clone(),
            claimed: (0..geom.workers).map(|_| AtomicBool::new(false)).collect(),
            names_lock: Mutex::new(()),
        })
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is `geom.file_size >= size_of::<Header>()` bytes,
        // page aligned (mmap), and lives as long as `self.map`; Header holds
        // only atomics, so shared mutation by readers' loads is sound.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    /// The one writer handle for worker `w`.
    ///
    /// # Panics
    /// If `w >= workers` or worker `w`'s handle was already taken: two writers
    /// of one region would break the seqlock and the string allocator.
    pub fn worker(&self, w: u32) -> WorkerShm {
        assert!(
            w < self.geom.workers,
            "shm worker {w} out of range ({} workers)",
            self.geom.workers
        );
        assert!(
            !self.claimed[w as usize].swap(true, Ordering::AcqRel),
            "shm worker {w} handle already handed out; each region has one writer"
        );
        let base = self.map.as_mut_ptr();
        let g = &self.geom;
        // SAFETY (all four pointers): Geometry::new produced offsets that are
        // 64-byte aligned and, with their extents, lie within `file_size`
        // bytes, which is exactly the mapping's length (create); `w < workers`
        // was asserted above. The base is non-null (successful mmap).
        let (block, slots, strings) = unsafe {
            (
                NonNull::new_unchecked(base.add(g.worker_block_offset(w) as usize))
                    .cast::<WorkerBlock>(),
                NonNull::new_unchecked(base.add(g.slots_offset_of(w) as usize)).cast::<Slot>(),
                NonNull::new_unchecked(base.add(g.strings_offset_of(w) as usize))
                    .cast::<AtomicU64>(),
            )
        };
        WorkerShm {
            block,
            slots,
            slots_len: g.slots_per_worker,
            strings,
            string_words: g.string_bytes_per_worker / 8,
            worker: w,
            alloc: StrAlloc::new(g.string_bytes_per_worker),
            _map: Arc::clone(&self.map),
        }
    }

    /// Store the current unix ms as the heartbeat (call every second).
    pub fn heartbeat(&self) {
        self.header()
            .heartbeat_ms
            .store(unix_now_ms(), Ordering::Release);
    }

    /// Publish the registrar feed's figures (seqlock write: sequence to odd,
    /// Release fence, Relaxed word stores, sequence to even with Release).
    /// `&mut self` keeps it to one writer; the daemon calls it with the
    /// heartbeat while it runs the feed, and once more when it stops.
    pub fn write_registrar(&mut self, f: &RegistrarFigures) {
        let b = self.registrar_block();
        let seq = b.seq.load(Ordering::Relaxed);
        debug_assert!(
            seq.is_multiple_of(2),
            "registrar sequence {seq} odd outside a write"
        );
        b.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        // Orders the odd sequence before every word store below.
        fence(Ordering::Release);
        for (dst, &v) in b.words.iter().zip(&f.values) {
            dst.store(v, Ordering::Relaxed);
        }
        // Release: a reader that sees the even value sees every word.
        b.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    fn registrar_block(&self) -> &RegistrarBlock {
        assert!(
            self.geom.has_registrar(),
            "this layout has a registrar block"
        );
        // SAFETY: Geometry::new placed the block at a 64-byte aligned offset
        // with size_of::<RegistrarBlock>() bytes before file_size, the
        // mapping's length (create); atomics only.
        unsafe {
            &*(self
                .map
                .as_ptr()
                .add(self.geom.registrar_offset as usize)
                .cast::<RegistrarBlock>())
        }
    }

    /// Record a clean stop: readers then know a stale heartbeat is expected.
    pub fn mark_stopped(&self) {
        self.heartbeat();
        self.header().stopped.store(1, Ordering::Release);
    }

    /// Replace the backend name (e.g. after probing io_uring). Names longer
    /// than [`BACKEND_NAME_MAX`] bytes are truncated at a char boundary; NUL
    /// bytes end the name.
    pub fn set_backend(&self, name: &str) {
        let mut end = name.len().min(BACKEND_NAME_MAX);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let name = &name[..end];
        let _one_writer = self
            .names_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let h = self.header();
        let s = h.names_seq.load(Ordering::Relaxed);
        h.names_seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        store_name(&h.backend, name);
        h.names_seq.store(s.wrapping_add(2), Ordering::Release);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geom
    }
}

fn init_header(map: &MmapRaw, g: &Geometry, cfg: &ShmConfig, pid: u32) {
    use std::mem::size_of;
    // SAFETY: as in ShmFile::header: the mapping holds at least a Header at
    // offset 0, page aligned; nobody else maps the temp file yet.
    let h = unsafe { &*(map.as_ptr() as *const Header) };
    let r = Ordering::Relaxed;
    let now_ms = unix_now_ms();
    h.version.store(VERSION, r);
    h.header_size.store(size_of::<Header>() as u32, r);
    h.file_size.store(g.file_size, r);
    h.workers.store(g.workers, r);
    h.slots_per_worker.store(g.slots_per_worker, r);
    h.string_bytes_per_worker
        .store(g.string_bytes_per_worker, r);
    h.slot_size.store(size_of::<Slot>() as u32, r);
    h.worker_block_size
        .store(size_of::<WorkerBlock>() as u32, r);
    h.counter_count.store(Counter::COUNT as u32, r);
    h.reject_count.store(REJECT_COUNTERS as u32, r);
    h.hist_buckets.store(HIST_BUCKETS as u32, r);
    h.workers_offset.store(g.workers_offset, r);
    h.slots_offset.store(g.slots_offset, r);
    h.slots_stride.store(g.slots_stride, r);
    h.strings_offset.store(g.strings_offset, r);
    h.strings_stride.store(g.strings_stride, r);
    h.pid.store(pid, r);
    h.stopped.store(0, r);
    h.start_ms.store(now_ms, r);
    h.heartbeat_ms.store(now_ms, r);
    h.names_seq.store(0, r);
    store_name(&h.instance, &cfg.instance);
    store_name(&h.backend, &cfg.backend);
    let (index, count) = cfg.shard.unwrap_or((0, 0));
    h.shard_index.store(index, r);
    h.shard_count.store(count, r);
    h.registrar_offset.store(g.registrar_offset, r);
    h.registrar_block_size
        .store(size_of::<RegistrarBlock>() as u32, r);
    h.registrar_count.store(RegistrarStat::COUNT as u32, r);
    // Magic last: whoever sees it (Acquire) sees every field above.
    h.magic.store(MAGIC_WORD, Ordering::Release);
}

/// A string could not be placed in the worker's string region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmFull {
    pub worker: u32,
    pub requested_bytes: usize,
    pub capacity_bytes: u32,
    pub used_bytes: u64,
}

impl std::fmt::Display for ShmFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.requested_bytes > STR_LEN_MAX {
            write!(
                f,
                "string of {} bytes exceeds the shm string limit of {STR_LEN_MAX} bytes",
                self.requested_bytes
            )
        } else {
            write!(
                f,
                "shm string region of worker {} is full: {} of {} bytes in use, cannot place \
                 {} more; raise string_bytes_per_worker",
                self.worker, self.used_bytes, self.capacity_bytes, self.requested_bytes
            )
        }
    }
}

impl std::error::Error for ShmFull {}

// ---------------------------------------------------------------------------
// String allocator (writer-private state)
// ---------------------------------------------------------------------------

/// Size classes: every multiple of 8 up to 128 (16 classes), then 4 per power
/// of two in (2^p, 2^(p+1)] for p = 7..=15 (36 classes): at most 25% slack.
const CLASSES: usize = 16 + 9 * 4;

fn size_class(len: usize) -> usize {
    debug_assert!((1..=STR_LEN_MAX + 1).contains(&len));
    if len <= 128 {
        return len.div_ceil(8) - 1;
    }
    let p = (usize::BITS - 1 - (len - 1).leading_zeros()) as usize; // len in (2^p, 2^(p+1)]
    let step = 1usize << (p - 2);
    let sub = len.div_ceil(step) - 4; // 1..=4
    16 + (p - 7) * 4 + sub - 1
}

fn class_size(class: usize) -> usize {
    if class < 16 {
        return (class + 1) * 8;
    }
    let p = 7 + (class - 16) / 4;
    let sub = (class - 16) % 4 + 1;
    (1usize << p) + sub * (1usize << (p - 2))
}

/// Largest class whose size is `<= bytes` (bytes a positive multiple of 8).
fn class_at_most(bytes: usize) -> usize {
    let c = size_class(bytes.min(class_size(CLASSES - 1)));
    if class_size(c) > bytes {
        c - 1
    } else {
        c
    }
}

struct StrAlloc {
    free: Vec<Vec<u32>>,
    bump: u32,
    capacity: u32,
    /// One bit per 8-byte granule: set at the first granule of a live block.
    live: Vec<u64>,
    used: u64,
}

impl StrAlloc {
    fn new(capacity: u32) -> StrAlloc {
        StrAlloc {
            free: (0..CLASSES).map(|_| Vec::new()).collect(),
            bump: 0,
            capacity,
            live: vec![0; (capacity as usize / 8).div_ceil(64)],
            used: 0,
        }
    }

    fn live_bit(&mut self, offset: u32) -> (&mut u64, u64) {
        let g = (offset / 8) as usize;
        (&mut self.live[g / 64], 1u64 << (g % 64))
    }

    /// Returns the offset and whether it reuses freed bytes.
    fn alloc(&mut self, len: usize) -> Option<(u32, bool)> {
        let class = size_class(len);
        let size = class_size(class);
        let (offset, reused) = if let Some(off) = self.free[class].pop() {
            (off, true)
        } else if self.capacity - self.bump >= size as u32 {
            let off = self.bump;
            self.bump += size as u32;
            (off, false)
        } else {
            // Split the smallest larger free block; the remainder goes back
            // to the free lists in class-sized pieces (every multiple of 8
            // up to 128 is a class, so the split is exact).
            let bigger = (class + 1..CLASSES).find(|&c| !self.free[c].is_empty())?;
            let off = self.free[bigger].pop()?;
            let mut rest_at = off as usize + size;
            let mut rest = class_size(bigger) - size;
            while rest > 0 {
                let c = class_at_most(rest);
                self.free[c].push(rest_at as u32);
                rest_at += class_size(c);
                rest -= class_size(c);
            }
            (off, true)
        };
        let (word, bit) = self.live_bit(offset);
        debug_assert!(*word & bit == 0, "string block {offset} allocated twice");
        *word |= bit;
        self.used += size as u64;
        Some((offset, reused))
    }

    fn free(&mut self, r: StrRef, worker: u32) {
        let size = class_size(size_class(r.len as usize));
        assert!(
            r.offset.is_multiple_of(8) && r.offset as u64 + size as u64 <= self.bump as u64,
            "free_str({r:?}): not a string of worker {worker}"
        );
        let (word, bit) = self.live_bit(r.offset);
        assert!(
            *word & bit != 0,
            "free_str({r:?}): double free in worker {worker}"
        );
        *word &= !bit;
        self.used -= size as u64;
        self.free[size_class(r.len as usize)].push(r.offset);
    }
}

// ---------------------------------------------------------------------------
// Worker handle
// ---------------------------------------------------------------------------

/// The single writer of one worker's region. Move it into the worker thread.
pub struct WorkerShm {
    block: NonNull<WorkerBlock>,
    slots: NonNull<Slot>,
    slots_len: u32,
    strings: NonNull<AtomicU64>,
    string_words: u32,
    worker: u32,
    alloc: StrAlloc,
    /// Keeps the mapping alive; never touched on the hot path.
    _map: Arc<MmapRaw>,
}

// SAFETY: the pointers target a shared mapping kept alive by `_map`, whose
// content is only atomics; moving the handle to another thread moves the
// single-writer role with it. WorkerShm is deliberately not Sync: `&self`
// methods do load+store without RMW and rely on one thread at a time.
unsafe impl Send for WorkerShm {}

impl WorkerShm {
    #[inline]
    fn block(&self) -> &WorkerBlock {
        // SAFETY: `block` points at this worker's WorkerBlock inside the live
        // mapping (ShmFile::worker), aligned to 64; atomics only.
        unsafe { self.block.as_ref() }
    }

    #[inline]
    fn slot(&self, slot: u32) -> &Slot {
        assert!(
            slot < self.slots_len,
            "shm slot {slot} out of range for worker {} ({} slots)",
            self.worker,
            self.slots_len
        );
        // SAFETY: slot < slots_len (asserted above); the worker's slot array
        // of slots_len Slots lies inside the mapping (ShmFile::worker).
        unsafe { &*self.slots.as_ptr().add(slot as usize) }
    }

    #[inline]
    fn str_word(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < self.string_words as usize);
        // SAFETY: callers pass i < string_words (validated StrRef ranges or
        // blocks handed out by the allocator, which never exceed capacity);
        // the region of string_words words lies inside the mapping.
        unsafe { &*self.strings.as_ptr().add(i) }
    }

    pub fn worker_id(&self) -> u32 {
        self.worker
    }

    pub fn slots_len(&self) -> u32 {
        self.slots_len
    }

    #[inline]
    pub fn add(&self, c: Counter, n: u64) {
        let a = &self.block().counters[c.index()];
        a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    #[inline]
    pub fn set(&self, c: Counter, v: u64) {
        self.block().counters[c.index()].store(v, Ordering::Relaxed);
    }

    #[inline]
    pub fn get(&self, c: Counter) -> u64 {
        self.block().counters[c.index()].load(Ordering::Relaxed)
    }

    /// `index` is `wire::reply::Reject::index()`; out-of-range indexes are
    /// ignored in release builds.
    #[inline]
    pub fn add_reject(&self, index: usize, n: u64) {
        debug_assert!(index < REJECT_COUNTERS, "reject index {index}");
        if let Some(a) = self.block().rejects.get(index) {
            a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        }
    }

    #[inline]
    pub fn get_reject(&self, index: usize) -> u64 {
        self.block()
            .rejects
            .get(index)
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    #[inline]
    pub fn record_rtt(&self, rtt_us: u32) {
        let b = self.block();
        let bump = |a: &AtomicU64, n: u64| {
            a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed)
        };
        bump(&b.hist[bucket_index(rtt_us as u64)], 1);
        bump(&b.rtt_count, 1);
        bump(&b.rtt_sum_us, rtt_us as u64);
    }

    /// Publish `rec` in `slot` (seqlock write).
    #[inline]
    pub fn write_slot(&self, slot: u32, rec: &SlotRecord) {
        let words = encode_record(rec);
        let s = self.slot(slot);
        let seq = s.seq.load(Ordering::Relaxed);
        debug_assert!(
            seq.is_multiple_of(2),
            "slot {slot} sequence {seq} odd outside a write"
        );
        s.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        // Orders the odd sequence before every word store below.
        fence(Ordering::Release);
        for (dst, w) in s.words[..RECORD_WORDS].iter().zip(words) {
            dst.store(w, Ordering::Relaxed);
        }
        // Release: a reader that sees the even value sees every word.
        s.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// The record last written to `slot` (no retry: this is the only writer).
    #[inline]
    pub fn read_own_slot(&self, slot: u32) -> SlotRecord {
        let s = self.slot(slot);
        let mut words = [0u64; RECORD_WORDS];
        for (w, src) in words.iter_mut().zip(&s.words[..RECORD_WORDS]) {
            *w = src.load(Ordering::Relaxed);
        }
        decode_record(&words)
    }

    /// Asks the CPU for `slot`'s record ahead of a `read_own_slot` soon
    /// after (a hint: out-of-range slots are ignored).
    #[inline]
    pub fn prefetch_slot(&self, slot: u32) {
        if slot < self.slots_len {
            // wrapping_add: no dereference, so no bounds are promised here;
            // the check above keeps the hint inside the slot array anyway.
            let p = self.slots.as_ptr().wrapping_add(slot as usize);
            crate::cpu::prefetch(p.cast(), size_of::<Slot>());
        }
    }

    /// Asks the CPU for the URI and To text of `slot` ahead of a
    /// `read_own_str` soon after. Reads the slot's string references, so
    /// the slot itself should have been prefetched a little earlier.
    #[inline]
    pub fn prefetch_strings(&self, slot: u32) {
        if slot >= self.slots_len {
            return;
        }
        let words = &self.slot(slot).words;
        let (uri, aor) = decode_str_refs(
            words[STR_LENS_WORD].load(Ordering::Relaxed),
            words[STR_OFFSETS_WORD].load(Ordering::Relaxed),
        );
        for r in [uri, aor] {
            let word = (r.offset / 8) as usize;
            if word < self.string_words as usize {
                let p = self.strings.as_ptr().wrapping_add(word);
                crate::cpu::prefetch(p.cast(), r.len as usize);
            }
        }
    }

    /// Mark `slot` free (all fields zero). The strings it referenced are the
    /// caller's to free, after this call.
    #[inline]
    pub fn clear_slot(&self, slot: u32) {
        self.write_slot(slot, &SlotRecord::default());
    }

    fn store_str(&self, offset: u32, s: &[u8]) {
        let first = (offset / 8) as usize;
        for (i, chunk) in s.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.str_word(first + i)
                .store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
    }

    /// Copy `s` into the string region. Empty strings need no space and get
    /// `StrRef::default()`. Control path: may allocate privately.
    pub fn alloc_str(&mut self, s: &[u8]) -> Result<StrRef, ShmFull> {
        if s.is_empty() {
            return Ok(StrRef::default());
        }
        let full = |a: &StrAlloc| ShmFull {
            worker: self.worker,
            requested_bytes: s.len(),
            capacity_bytes: a.capacity,
            used_bytes: a.used,
        };
        if s.len() > STR_LEN_MAX {
            return Err(full(&self.alloc));
        }
        let Some((offset, reused)) = self.alloc.alloc(s.len()) else {
            return Err(full(&self.alloc));
        };
        let b = self.block();
        if reused {
            // Readers may still hold a StrRef to these bytes from a record
            // they read earlier: make the overwrite visible as an odd epoch.
            let e = b.str_epoch.load(Ordering::Relaxed);
            b.str_epoch.store(e.wrapping_add(1), Ordering::Relaxed);
            fence(Ordering::Release);
            self.store_str(offset, s);
            b.str_epoch.store(e.wrapping_add(2), Ordering::Release);
        } else {
            // Fresh bump memory: no published record has ever pointed here.
            self.store_str(offset, s);
        }
        b.str_used_bytes.store(self.alloc.used, Ordering::Relaxed);
        b.str_bump_bytes
            .store(self.alloc.bump as u64, Ordering::Relaxed);
        Ok(StrRef {
            offset,
            len: s.len() as u16,
        })
    }

    /// Return `r`'s block to the free lists. The bytes stay as they are until
    /// the block is reused.
    ///
    /// # Panics
    /// If `r` was not handed out by this worker's `alloc_str` or was already
    /// freed (another contact's string would be corrupted later).
    pub fn free_str(&mut self, r: StrRef) {
        if r.len == 0 {
            return;
        }
        self.alloc.free(r, self.worker);
        self.block()
            .str_used_bytes
            .store(self.alloc.used, Ordering::Relaxed);
    }

    /// Copy `r`'s bytes into `out` (cleared first). An out-of-range `r` yields
    /// an empty `out` (and a debug assertion).
    pub fn read_own_str(&self, r: StrRef, out: &mut Vec<u8>) {
        out.clear();
        let end = r.offset as u64 + r.len as u64;
        let ok = r.offset.is_multiple_of(8) && end <= self.string_words as u64 * 8;
        debug_assert!(
            ok,
            "read_own_str({r:?}) outside worker {}'s strings",
            self.worker
        );
        if !ok || r.len == 0 {
            return;
        }
        let first = (r.offset / 8) as usize;
        let words = (r.len as usize).div_ceil(8);
        for i in 0..words {
            out.extend_from_slice(
                &self
                    .str_word(first + i)
                    .load(Ordering::Relaxed)
                    .to_le_bytes(),
            );
        }
        out.truncate(r.len as usize);
    }

    /// Bytes of the string region in use (including size-class slack).
    pub fn string_bytes_used(&self) -> u64 {
        self.alloc.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_are_monotone_and_tight() {
        assert_eq!(size_class(1), 0);
        assert_eq!(size_class(8), 0);
        assert_eq!(size_class(9), 1);
        assert_eq!(size_class(128), 15);
        assert_eq!(size_class(129), 16);
        assert_eq!(class_size(16), 160);
        assert_eq!(size_class(STR_LEN_MAX), CLASSES - 1);
        assert_eq!(class_size(CLASSES - 1), 65536);
        let mut prev = 0;
        for c in 0..CLASSES {
            assert!(class_size(c) > prev);
            assert_eq!(class_size(c) % 8, 0);
            prev = class_size(c);
        }
        for len in 1..=STR_LEN_MAX {
            let c = size_class(len);
            let size = class_size(c);
            assert!(size >= len, "len {len} class {c} size {size}");
            assert!(
                c == 0 || class_size(c - 1) < len,
                "len {len} not in smallest class"
            );
            assert!(size <= len + len / 4 + 8, "len {len}: slack {}", size - len);
        }
        for bytes in (8..=70_000).step_by(8) {
            let c = class_at_most(bytes);
            assert!(class_size(c) <= bytes);
            assert!(c + 1 == CLASSES || class_size(c + 1) > bytes);
        }
    }

    #[test]
    fn allocator_reuses_and_splits() {
        let mut a = StrAlloc::new(1024);
        assert_eq!(a.alloc(100), Some((0, false))); // class 104
        assert_eq!(a.alloc(900), None); // class 1024 > 920 left, nothing free
        assert_eq!(a.alloc(500), Some((104, false))); // class 512, bump -> 616
        a.free(
            StrRef {
                offset: 104,
                len: 500,
            },
            0,
        );
        assert_eq!(a.alloc(450), Some((104, true))); // same class: reuse
        a.free(
            StrRef {
                offset: 104,
                len: 450,
            },
            0,
        );
        // Class 448 does not fit the 408 bump bytes left: split the 512 block,
        // its 64-byte remainder goes to the 64 class.
        assert_eq!(a.alloc(400), Some((104, true)));
        assert_eq!(a.alloc(60), Some((552, true)));
        assert_eq!(a.alloc(408), None);
        assert_eq!(a.alloc(200), Some((616, false))); // class 224 from the bump
        assert_eq!(a.used, 104 + 448 + 64 + 224);
    }

    #[test]
    fn split_remainder_is_carved_exactly() {
        let mut a = StrAlloc::new(1024);
        assert_eq!(a.alloc(1000), Some((0, false))); // class 1024
        a.free(
            StrRef {
                offset: 0,
                len: 1000,
            },
            0,
        );
        // 8 bytes from the 1024 block: remainder 1016 = 896 + 120.
        assert_eq!(a.alloc(8), Some((0, true)));
        assert_eq!(a.alloc(800), Some((8, true))); // class 896
        assert_eq!(a.alloc(120), Some((904, true)));
        assert_eq!(a.alloc(1), None);
        assert_eq!(a.used, 1024);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut a = StrAlloc::new(256);
        let (x, _) = a.alloc(10).unwrap();
        a.free(StrRef { offset: x, len: 10 }, 0);
        a.free(StrRef { offset: x, len: 10 }, 0);
    }
}
