//! Seqlock stress: one writer thread rewrites slots (and, on re-adds, their
//! strings) as fast as it can while several reader threads, each with its own
//! read-only mapping of the file, read continuously for about two seconds.
//!
//! Every field of a record is derived from two numbers the record itself
//! carries (`v` in `last_ping_ms`, the contact generation `g`), and `key_hash`
//! is a checksum of all other words, so a record mixing words of two writes
//! can never pass the check. Strings are derived from `(slot, g)`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kaping::shm::layout::{
    bucket_index, encode_record, Counter, SlotRecord, StrRef, HIST_BUCKETS, SLOT_DOWN, SLOT_UP,
};
use kaping::shm::reader::ShmReader;
use kaping::shm::writer::{ShmConfig, ShmFile};

/// Few slots, so readers often land on the slot being written.
const SLOTS: u32 = 8;
const READERS: usize = 3;
const RUN: Duration = Duration::from_secs(2);

fn checksum(r: &SlotRecord) -> u64 {
    let mut words = encode_record(r);
    words[10] = 0; // key_hash itself
    words.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &w| {
        (h ^ w).wrapping_mul(0x100_0000_01b3).rotate_left(29)
    })
}

/// The record for write `v` of contact generation `g` in `slot`.
fn record_for(slot: u32, v: u64, g: u16, uri: StrRef, aor: StrRef) -> SlotRecord {
    let mut r = SlotRecord {
        generation: g,
        state: if v.is_multiple_of(3) {
            SLOT_DOWN
        } else {
            SLOT_UP
        },
        family: if v.is_multiple_of(2) { 4 } else { 6 },
        port: (v * 3) as u16,
        last_code: 100 + (v % 600) as u16,
        misses: (v >> 3) as u16,
        addr: std::array::from_fn(|i| (v as u8).wrapping_add(i as u8 * 17)),
        sent: v as u32,
        answered: (v >> 1) as u32,
        rtt_last_us: (v * 7) as u32,
        rtt_min_us: (v * 11) as u32,
        rtt_max_us: (v * 13) as u32,
        srtt_us: (v * 17) as u32,
        rttvar_us: (v * 19) as u32,
        interval_ms: slot,
        last_ping_ms: v * 1000,
        last_reply_ms: v * 1000 + 1 + slot as u64,
        key_hash: 0,
        uri,
        aor,
    };
    r.key_hash = checksum(&r);
    r
}

fn uri_for(slot: u32, g: u16) -> Vec<u8> {
    // Lengths vary with g so several size classes are recycled.
    let pad = "x".repeat((g as usize * 7) % 90);
    format!("sip:user{slot}-{g}@192.0.2.{slot}:5060;ob;p={pad}").into_bytes()
}

fn aor_for(slot: u32, g: u16) -> Vec<u8> {
    format!("user{slot}-{g}@example.org").into_bytes()
}

/// Panics on any record that is not exactly one the writer wrote to `slot`.
fn check(slot: u32, r: &SlotRecord) {
    let v = r.last_ping_ms / 1000;
    let want = record_for(slot, v, r.generation, r.uri, r.aor);
    assert_eq!(*r, want, "torn or foreign record in slot {slot}");
    assert_eq!(
        r.uri.len as usize,
        uri_for(slot, r.generation).len(),
        "slot {slot}"
    );
    assert_eq!(
        r.aor.len as usize,
        aor_for(slot, r.generation).len(),
        "slot {slot}"
    );
}

#[derive(Default, Debug)]
struct ReaderStats {
    reads: u64,
    live: u64,
    contacts: u64,
}

#[test]
fn readers_never_see_a_torn_record() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ShmConfig {
        path: dir.path().join("kaping-stress"),
        workers: 1,
        slots_per_worker: SLOTS,
        string_bytes_per_worker: 64 * 1024,
        instance: "stress".into(),
        backend: "test".into(),
        shard: None,
        group: None,
    };
    let shm = ShmFile::create(&cfg).unwrap();
    let mut w = shm.worker(0);
    let stop = Arc::new(AtomicBool::new(false));

    let readers: Vec<_> = (0..READERS)
        .map(|i| {
            let path = cfg.path.clone();
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let r = ShmReader::open(&path).unwrap();
                let mut st = ReaderStats::default();
                let (mut uri, mut aor, mut s) = (Vec::new(), Vec::new(), Vec::new());
                let mut slot = i as u32;
                let mut last_sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    slot = (slot * 37 + 11) % SLOTS;
                    st.reads += 1;
                    if st.reads % 2 == 0 {
                        if let Some(rec) = r.read_slot(0, slot) {
                            check(slot, &rec);
                            st.live += 1;
                            // A verified record's StrRef is in range, so
                            // read_str succeeds; its content is only checked
                            // via read_contact, since this StrRef may be stale.
                            assert!(r.read_str(0, rec.uri, &mut s), "slot {slot}");
                            assert_eq!(s.len(), rec.uri.len as usize);
                        }
                    } else if let Some(rec) = r.read_contact(0, slot, &mut uri, &mut aor) {
                        check(slot, &rec);
                        assert_eq!(uri, uri_for(slot, rec.generation), "slot {slot} uri");
                        assert_eq!(aor, aor_for(slot, rec.generation), "slot {slot} aor");
                        st.live += 1;
                        st.contacts += 1;
                    }
                    // Single-writer counters only grow.
                    let sent = r.counters(0)[Counter::Sent.index()];
                    assert!(
                        sent >= last_sent,
                        "Sent went backwards: {last_sent} -> {sent}"
                    );
                    last_sent = sent;
                }
                st
            })
        })
        .collect();

    // Writer: the worker thread's role, on this thread.
    let mut gens = [0u16; SLOTS as usize];
    let mut refs: [Option<(StrRef, StrRef)>; SLOTS as usize] = [None; SLOTS as usize];
    let (mut writes, mut readds, mut clears, mut rtt_sum) = (0u64, 0u64, 0u64, 0u64);
    let mut v = 0u64;
    let started = Instant::now();
    while started.elapsed() < RUN {
        for _ in 0..256 {
            v += 1;
            let slot = ((v * 2_654_435_761) >> 7) as u32 % SLOTS;
            let i = slot as usize;
            if v.is_multiple_of(61) {
                // Contact removed: clear first, then free its strings.
                w.clear_slot(slot);
                if let Some((u, a)) = refs[i].take() {
                    w.free_str(u);
                    w.free_str(a);
                }
                clears += 1;
            } else {
                if refs[i].is_none() || v.is_multiple_of(16) {
                    // (Re-)added contact: new generation, new strings.
                    gens[i] = gens[i].wrapping_add(1);
                    let u = w.alloc_str(&uri_for(slot, gens[i])).unwrap();
                    let a = w.alloc_str(&aor_for(slot, gens[i])).unwrap();
                    let rec = record_for(slot, v, gens[i], u, a);
                    w.write_slot(slot, &rec);
                    if let Some((ou, oa)) = refs[i].replace((u, a)) {
                        w.free_str(ou);
                        w.free_str(oa);
                    }
                    readds += 1;
                } else {
                    // Liveness updates: a burst of rewrites of one slot with
                    // precomputed records keeps the writer inside write_slot
                    // most of the time, maximising overlap with readers.
                    let (u, a) = refs[i].unwrap();
                    let burst: [SlotRecord; 4] = std::array::from_fn(|k| {
                        record_for(slot, v + k as u64 * 1_000_003, gens[i], u, a)
                    });
                    for _ in 0..8 {
                        for rec in &burst {
                            w.write_slot(slot, rec);
                        }
                    }
                    w.write_slot(slot, &record_for(slot, v, gens[i], u, a));
                    writes += 32;
                }
                assert_eq!(w.read_own_slot(slot).last_ping_ms, v * 1000);
            }
            writes += 1;
            w.add(Counter::Sent, 1);
            w.add_reject((v % 16) as usize, 1);
            let rtt = (v % 200_000) as u32;
            w.record_rtt(rtt);
            rtt_sum += rtt as u64;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let stats: Vec<ReaderStats> = readers.into_iter().map(|h| h.join().unwrap()).collect();

    println!(
        "writer: {writes} slot writes ({readds} with new strings, {clears} clears) in {:?}",
        started.elapsed()
    );
    for (i, st) in stats.iter().enumerate() {
        println!("reader {i}: {st:?}");
        assert!(
            st.reads > 0 && st.live > 0 && st.contacts > 0,
            "reader {i} made no progress"
        );
    }

    // After the writer stops, the reader sees exactly what it wrote.
    let r = ShmReader::open(&cfg.path).unwrap();
    assert_eq!(r.counters(0)[Counter::Sent.index()], v);
    let rejects = r.rejects(0);
    for (k, &n) in rejects.iter().enumerate() {
        assert_eq!(
            n,
            v / 16 + u64::from((k as u64) <= v % 16 && k != 0),
            "reject {k}"
        );
    }
    assert_eq!(r.rtt_totals(0), (v, rtt_sum));
    let hist = r.histogram(0);
    assert_eq!(hist.len(), HIST_BUCKETS);
    assert_eq!(hist.iter().sum::<u64>(), v);
    let mut want = vec![0u64; HIST_BUCKETS];
    for x in 1..=v {
        want[bucket_index(x % 200_000)] += 1;
    }
    assert_eq!(hist, want);
    let (mut uri, mut aor) = (Vec::new(), Vec::new());
    for slot in 0..SLOTS {
        let i = slot as usize;
        let got = r.read_contact(0, slot, &mut uri, &mut aor);
        assert_eq!(got, refs[i].map(|_| w.read_own_slot(slot)), "slot {slot}");
        if let Some(rec) = got {
            check(slot, &rec);
            assert_eq!(rec.generation, gens[i]);
            assert_eq!(uri, uri_for(slot, gens[i]));
            assert_eq!(aor, aor_for(slot, gens[i]));
        }
    }
}
