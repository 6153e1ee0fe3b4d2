//! The shm file as a whole: every field written by the daemon side comes back
//! through an independent read-only mapping; broken files are refused with
//! the right error; a replaced file does not disturb a reader of the old one.

use std::fs::{self, OpenOptions};
use std::mem::offset_of;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kaping::shm::layout::{
    bucket_index, percentile, Counter, Header, SlotRecord, StrRef, HIST_BUCKETS, REJECT_COUNTERS,
    SLOT_DOWN, SLOT_UP, STR_LEN_MAX, VERSION,
};
use kaping::shm::reader::{OpenError, ShmReader};
use kaping::shm::writer::{unix_now_ms, ShmConfig, ShmFile, ShmFull};

fn cfg(dir: &Path) -> ShmConfig {
    ShmConfig {
        path: dir.join("kaping-test"),
        workers: 2,
        slots_per_worker: 8,
        string_bytes_per_worker: 256,
        instance: "edge-1".into(),
        backend: "mmsg".into(),
        shard: None,
        group: None,
    }
}

fn record(seed: u32, uri: StrRef, aor: StrRef) -> SlotRecord {
    let mut r = SlotRecord {
        generation: 7 + seed as u16,
        state: if seed.is_multiple_of(2) {
            SLOT_UP
        } else {
            SLOT_DOWN
        },
        family: 0,
        port: 0,
        last_code: 200 + seed as u16,
        misses: seed as u16,
        addr: [0; 16],
        sent: 1000 + seed,
        answered: 990 + seed,
        rtt_last_us: 1234 + seed,
        rtt_min_us: 800,
        rtt_max_us: 90_000,
        srtt_us: 1500,
        rttvar_us: 300,
        interval_ms: 30_000,
        last_ping_ms: 1_700_000_000_000 + seed as u64,
        last_reply_ms: 1_700_000_000_001 + seed as u64,
        key_hash: 0xdead_beef_0000_0000 | seed as u64,
        uri,
        aor,
    };
    let addr = if seed.is_multiple_of(2) {
        "198.51.100.23:5060"
    } else {
        "[2001:db8::42]:5080"
    };
    r.set_socket_addr(addr.parse().unwrap());
    r
}

#[test]
fn every_field_round_trips_through_a_reader() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path());
    let shm = ShmFile::create(&c).unwrap();
    assert_eq!(shm.path(), c.path);
    shm.set_backend("io_uring");
    let mut w0 = shm.worker(0);
    let w1 = shm.worker(1);

    for (i, &ctr) in Counter::ALL.iter().enumerate() {
        w0.add(ctr, 10 + i as u64);
        w0.add(ctr, 1);
        w1.set(ctr, 1000 + i as u64);
        assert_eq!(w0.get(ctr), 11 + i as u64);
    }
    for i in 0..REJECT_COUNTERS {
        w1.add_reject(i, i as u64 * 3);
        assert_eq!(w1.get_reject(i), i as u64 * 3);
    }
    let rtts = [0u32, 1, 15, 16, 999, 1000, 25_000, u32::MAX];
    for &r in &rtts {
        w0.record_rtt(r);
    }

    let uri = w0
        .alloc_str(b"sip:alice@198.51.100.23:5060;transport=udp")
        .unwrap();
    let aor = w0.alloc_str(b"alice@example.com").unwrap();
    let empty = w0.alloc_str(b"").unwrap();
    assert_eq!(empty, StrRef::default());
    let rec0 = record(0, uri, aor);
    let rec1 = record(1, StrRef::default(), StrRef::default());
    w0.write_slot(3, &rec0);
    w0.write_slot(7, &rec1);
    assert_eq!(w0.read_own_slot(3), rec0);
    let mut own = Vec::new();
    w0.read_own_str(uri, &mut own);
    assert_eq!(own, b"sip:alice@198.51.100.23:5060;transport=udp");

    let r = ShmReader::open(&c.path).unwrap();
    let h = r.header();
    assert_eq!(h.version, VERSION);
    assert_eq!((h.workers, h.slots_per_worker), (2, 8));
    assert_eq!(h.string_bytes_per_worker, 256);
    assert_eq!(h.pid, std::process::id());
    assert_eq!(h.instance, "edge-1");
    assert_eq!(h.backend, "io_uring");
    assert!(!h.stopped);
    assert!(h.start_ms > 0 && h.heartbeat_ms >= h.start_ms);
    assert!(r.heartbeat_age_ms().unwrap() < 60_000);

    let c0 = r.counters(0);
    let c1 = r.counters(1);
    for (i, &ctr) in Counter::ALL.iter().enumerate() {
        assert_eq!(c0[ctr.index()], 11 + i as u64, "{}", ctr.name());
        assert_eq!(c1[ctr.index()], 1000 + i as u64, "{}", ctr.name());
    }
    assert_eq!(r.rejects(0), [0; REJECT_COUNTERS]);
    let rj = r.rejects(1);
    for (i, &v) in rj.iter().enumerate() {
        assert_eq!(v, i as u64 * 3);
    }

    let hist = r.histogram(0);
    assert_eq!(hist.len(), HIST_BUCKETS);
    assert_eq!(hist.iter().sum::<u64>(), rtts.len() as u64);
    for &x in &rtts {
        assert!(hist[bucket_index(x as u64)] >= 1);
    }
    let sum: u64 = rtts.iter().map(|&x| x as u64).sum();
    assert_eq!(r.rtt_totals(0), (rtts.len() as u64, sum));
    assert_eq!(r.rtt_totals(1), (0, 0));
    let p50 = percentile(&hist, 0.5).unwrap();
    assert!((15..=17).contains(&p50), "p50 {p50}");

    assert_eq!(r.read_slot(0, 3), Some(rec0));
    assert_eq!(r.read_slot(0, 7), Some(rec1));
    assert_eq!(r.read_slot(0, 7).unwrap().socket_addr(), rec1.socket_addr());
    assert_eq!(r.read_slot(0, 0), None, "never written: free");
    assert_eq!(r.read_slot(1, 3), None, "worker 1 has its own slots");
    assert_eq!(r.read_slot(0, 8), None, "out of range slot");
    assert_eq!(r.read_slot(2, 0), None, "out of range worker");

    let (mut u, mut a) = (Vec::new(), Vec::new());
    assert_eq!(r.read_contact(0, 3, &mut u, &mut a), Some(rec0));
    assert_eq!(u, b"sip:alice@198.51.100.23:5060;transport=udp");
    assert_eq!(a, b"alice@example.com");
    assert_eq!(r.read_contact(0, 7, &mut u, &mut a), Some(rec1));
    assert!(u.is_empty() && a.is_empty());
    let mut s = Vec::new();
    assert!(r.read_str(0, aor, &mut s));
    assert_eq!(s, b"alice@example.com");
    assert!(r.read_str(0, StrRef::default(), &mut s) && s.is_empty());
    assert!(
        !r.read_str(
            0,
            StrRef {
                offset: 250,
                len: 8
            },
            &mut s
        ),
        "past the region"
    );
    assert!(
        !r.read_str(0, StrRef { offset: 3, len: 1 }, &mut s),
        "misaligned"
    );
    assert!(!r.read_str(5, aor, &mut s), "no such worker");
    assert!(r.string_bytes_used(0) >= 43 + 17);

    w0.clear_slot(3);
    w0.free_str(uri);
    w0.free_str(aor);
    assert_eq!(r.read_slot(0, 3), None);
    assert_eq!(w0.read_own_slot(3), SlotRecord::default());

    shm.heartbeat();
    shm.mark_stopped();
    assert!(r.header().stopped);
}

#[test]
fn prefetch_hints_change_nothing_and_take_any_slot() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path());
    let shm = ShmFile::create(&c).unwrap();
    let mut w = shm.worker(0);
    let uri = w.alloc_str(b"sip:bob@192.0.2.7:5060").unwrap();
    let aor = w.alloc_str(b"bob@example.com").unwrap();
    let rec = record(5, uri, aor);
    w.write_slot(2, &rec);
    // A record whose string references point past the region (as a
    // corrupt or foreign one might): the hint must stay inside, or skip.
    let far = StrRef {
        offset: u32::MAX - 7,
        len: u16::MAX,
    };
    let wild = record(6, far, far);
    w.write_slot(4, &wild);
    for slot in [0, 2, 4, 7, 8, 1_000, u32::MAX] {
        w.prefetch_slot(slot);
        w.prefetch_strings(slot);
    }
    assert_eq!(w.read_own_slot(2), rec);
    assert_eq!(w.read_own_slot(4), wild);
    let mut own = Vec::new();
    w.read_own_str(uri, &mut own);
    assert_eq!(own, b"sip:bob@192.0.2.7:5060");
    w.read_own_str(aor, &mut own);
    assert_eq!(own, b"bob@example.com");
}

#[test]
fn string_region_full_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let shm = ShmFile::create(&cfg(dir.path())).unwrap();
    let mut w = shm.worker(1);
    let long = vec![b'x'; 200];
    let first = w.alloc_str(&long).unwrap();
    let err: ShmFull = w.alloc_str(&long).unwrap_err();
    assert_eq!(err.worker, 1);
    assert_eq!(err.requested_bytes, 200);
    let msg = err.to_string();
    assert!(
        msg.contains("worker 1") && msg.contains("string_bytes_per_worker"),
        "{msg}"
    );
    // Freeing makes room again.
    w.free_str(first);
    assert_eq!(w.alloc_str(&long).unwrap(), first);
    let huge = vec![b'y'; STR_LEN_MAX + 1];
    let msg = w.alloc_str(&huge).unwrap_err().to_string();
    assert!(msg.contains("65535"), "{msg}");
}

#[test]
#[should_panic(expected = "already handed out")]
fn one_writer_per_worker() {
    let dir = tempfile::tempdir().unwrap();
    let shm = ShmFile::create(&cfg(dir.path())).unwrap();
    let _a = shm.worker(0);
    let _b = shm.worker(0);
}

#[test]
#[should_panic(expected = "out of range")]
fn slot_out_of_range_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let shm = ShmFile::create(&cfg(dir.path())).unwrap();
    shm.worker(0).write_slot(8, &SlotRecord::default());
}

#[test]
fn bad_configs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (mutate, needle) in [
        (
            Box::new(|c: &mut ShmConfig| c.workers = 0) as Box<dyn Fn(&mut ShmConfig)>,
            "worker count 0",
        ),
        (
            Box::new(|c: &mut ShmConfig| c.slots_per_worker = (1 << 24) + 1),
            "slots per worker",
        ),
        (
            Box::new(|c: &mut ShmConfig| c.instance = "x".repeat(65)),
            "instance name",
        ),
        (
            Box::new(|c: &mut ShmConfig| c.backend = "a\0b".into()),
            "NUL",
        ),
    ] {
        let mut c = cfg(dir.path());
        mutate(&mut c);
        let err = ShmFile::create(&c).err().expect("must fail");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains(needle), "{err}");
    }
    assert!(!dir.path().join("kaping-test").exists());
}

fn patch(path: &Path, offset: usize, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset as u64).unwrap();
}

fn open_err(path: &Path) -> OpenError {
    ShmReader::open(path).err().expect("open must fail")
}

/// A published file whose daemon handle is gone, so the test can damage it.
fn published(dir: &Path) -> PathBuf {
    let c = cfg(dir);
    let shm = ShmFile::create(&c).unwrap();
    shm.mark_stopped();
    c.path
}

#[test]
fn reader_refuses_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    match open_err(&missing) {
        OpenError::Missing(p) => assert_eq!(p, missing),
        e => panic!("{e}"),
    }
    assert!(open_err(&missing).to_string().contains("no such file"));

    let empty = dir.path().join("empty");
    fs::write(&empty, b"").unwrap();
    assert!(matches!(open_err(&empty), OpenError::TooSmall));

    let foreign = dir.path().join("foreign");
    fs::write(&foreign, vec![0x5a; 8192]).unwrap();
    assert!(matches!(open_err(&foreign), OpenError::BadMagic));
    assert!(open_err(&foreign)
        .to_string()
        .contains("not a kaping shm file"));

    let path = published(dir.path());
    ShmReader::open(&path).expect("intact file opens");

    // Wrong version.
    patch(&path, offset_of!(Header, version), &99u32.to_ne_bytes());
    match open_err(&path) {
        OpenError::Version { found, expected } => assert_eq!((found, expected), (99, VERSION)),
        e => panic!("{e}"),
    }
    assert!(open_err(&path).to_string().contains("version 99"));
    patch(&path, offset_of!(Header, version), &VERSION.to_ne_bytes());

    // Corrupt offset.
    patch(
        &path,
        offset_of!(Header, slots_offset),
        &12345u64.to_ne_bytes(),
    );
    match open_err(&path) {
        OpenError::Corrupt(m) => assert!(m.contains("slots offset is 12345"), "{m}"),
        e => panic!("{e}"),
    }
    let path = published(dir.path());

    // Impossible sizes.
    patch(&path, offset_of!(Header, workers), &0u32.to_ne_bytes());
    match open_err(&path) {
        OpenError::Corrupt(m) => assert!(m.contains("worker count 0"), "{m}"),
        e => panic!("{e}"),
    }
    let path = published(dir.path());

    // Truncated (the daemon never does this; a damaged file must not be trusted).
    let len = fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 64)
        .unwrap();
    assert!(matches!(open_err(&path), OpenError::TooSmall));
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(100)
        .unwrap();
    assert!(matches!(open_err(&path), OpenError::TooSmall));

    // Longer than the header says.
    let path = published(dir.path());
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len + 4096)
        .unwrap();
    match open_err(&path) {
        OpenError::Corrupt(m) => assert!(m.contains("file length"), "{m}"),
        e => panic!("{e}"),
    }

    // Magic cleared (as before the writer's final store).
    let path = published(dir.path());
    patch(&path, 0, &[0; 8]);
    assert!(matches!(open_err(&path), OpenError::BadMagic));
}

#[test]
fn replacing_the_file_leaves_old_readers_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path());
    let old = ShmFile::create(&c).unwrap();
    let w_old = old.worker(0);
    w_old.add(Counter::Sent, 5);
    w_old.write_slot(1, &record(0, StrRef::default(), StrRef::default()));
    let r_old = ShmReader::open(&c.path).unwrap();

    // A restarted daemon (here: same pid) publishes a new, larger file.
    c.slots_per_worker = 16;
    c.instance = "edge-2".into();
    let new = ShmFile::create(&c).unwrap();
    let w_new = new.worker(0);
    w_new.write_slot(1, &record(1, StrRef::default(), StrRef::default()));
    drop(w_old);
    drop(old);

    // The old mapping still reads the old inode, untouched.
    assert_eq!(r_old.header().instance, "edge-1");
    assert_eq!(r_old.header().slots_per_worker, 8);
    assert_eq!(r_old.counters(0)[Counter::Sent.index()], 5);
    assert_eq!(
        r_old.read_slot(0, 1),
        Some(record(0, StrRef::default(), StrRef::default()))
    );

    let r_new = ShmReader::open(&c.path).unwrap();
    assert_eq!(r_new.header().instance, "edge-2");
    assert_eq!(r_new.header().slots_per_worker, 16);
    assert_eq!(r_new.counters(0)[Counter::Sent.index()], 0);
    assert_eq!(
        r_new.read_slot(0, 1),
        Some(record(1, StrRef::default(), StrRef::default()))
    );

    // No temporary files are left behind.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("kaping-test")]);
}

#[test]
fn a_live_daemons_file_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path());
    let shm = ShmFile::create(&c).unwrap();
    // Pretend the file belongs to pid 1 (always exists) with a fresh heartbeat.
    patch(&c.path, offset_of!(Header, pid), &1u32.to_ne_bytes());
    shm.heartbeat();
    let err = ShmFile::create(&c).err().expect("must refuse");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("pid 1"), "{err}");

    // Once its heartbeat is stale it may be replaced.
    let stale = unix_now_ms() - 60_000;
    patch(
        &c.path,
        offset_of!(Header, heartbeat_ms),
        &stale.to_ne_bytes(),
    );
    ShmFile::create(&c).expect("stale file is replaced");

    // A cleanly stopped daemon's file may be replaced at once.
    let shm = ShmFile::create(&c).unwrap();
    patch(&c.path, offset_of!(Header, pid), &1u32.to_ne_bytes());
    shm.mark_stopped();
    ShmFile::create(&c).expect("stopped file is replaced");
}

/// Sets the process umask, returning the old one. The umask is process-wide:
/// only the mode test calls it, and every other test here holds whatever
/// the umask is (the writer sets its file's mode exactly).
fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask only swaps the process's file-creation mask; it takes
    // no pointers and cannot fail.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

#[test]
fn the_file_is_0640_whatever_the_umask_and_of_shm_group() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path());
    // 000 would make it world-readable, 077 unreadable by the group.
    for mask in [0o000, 0o077, 0o022] {
        let old = set_umask(mask);
        let created = ShmFile::create(&c);
        set_umask(old);
        drop(created.unwrap());
        let mode = fs::metadata(&c.path).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o640, "umask {mask:03o}");
    }

    // shm_group: a group other than the process's own needs root (or
    // membership); root gives the file to nogroup.
    let own = fs::metadata(&c.path).unwrap();
    if own.uid() != 0 {
        println!("SKIP: giving the file to another group needs root");
        return;
    }
    let group = kaping::access::Group::resolve("shm_group", "65534").unwrap();
    assert_ne!(group.gid, own.gid());
    let shm = ShmFile::create(&ShmConfig {
        group: Some(group),
        ..cfg(dir.path())
    })
    .unwrap();
    let meta = fs::metadata(shm.path()).unwrap();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o640, 0, 65_534)
    );
    // No temporary file is left behind either way.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("kaping-test")]);
}
