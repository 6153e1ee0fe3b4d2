//! Hot-path costs of the shm contract: the worker's seqlock `write_slot`
//! (target ≤ 20 ns), a reader's `read_slot` through its own read-only
//! mapping, and the per-reply counter add + RTT histogram update.
//!
//! Run: `cargo bench --bench shm -- --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kaping::shm::layout::{Counter, SlotRecord, SLOT_UP};
use kaping::shm::reader::ShmReader;
use kaping::shm::writer::{ShmConfig, ShmFile};

const SLOTS: u32 = 1 << 16;

fn record(i: u32) -> SlotRecord {
    let mut r = SlotRecord {
        generation: i as u16,
        state: SLOT_UP,
        last_code: 200,
        sent: i,
        answered: i,
        rtt_last_us: 1200,
        rtt_min_us: 900,
        rtt_max_us: 40_000,
        srtt_us: 1300,
        rttvar_us: 250,
        interval_ms: 30_000,
        last_ping_ms: 1_700_000_000_000 + i as u64,
        last_reply_ms: 1_700_000_000_001 + i as u64,
        key_hash: 0x9e37_79b9_7f4a_7c15 ^ i as u64,
        ..SlotRecord::default()
    };
    r.set_socket_addr(std::net::SocketAddr::from(([192, 0, 2, i as u8], 5060)));
    r
}

fn bench_shm(c: &mut Criterion) {
    // Prefer tmpfs, where the daemon's file lives; fall back to the temp dir.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temp dir");
    let cfg = ShmConfig {
        path: dir.path().join("kaping-bench"),
        workers: 1,
        slots_per_worker: SLOTS,
        string_bytes_per_worker: 4096,
        instance: "bench".into(),
        backend: "bench".into(),
        shard: None,
        group: None,
    };
    let shm = ShmFile::create(&cfg).expect("create shm");
    let w = shm.worker(0);
    for s in 0..SLOTS {
        w.write_slot(s, &record(s)); // fault every page in
    }
    let reader = ShmReader::open(&cfg.path).expect("open shm");

    let mut g = c.benchmark_group("shm");
    g.throughput(Throughput::Elements(1));
    let rec = record(7);
    g.bench_function("write_slot/same", |b| {
        b.iter(|| w.write_slot(black_box(7), black_box(&rec)))
    });
    let mut s = 0u32;
    g.bench_function("write_slot/spread_64k", |b| {
        b.iter(|| {
            s = (s + 40_503) & (SLOTS - 1);
            w.write_slot(black_box(s), black_box(&rec))
        })
    });
    g.bench_function("read_slot/same", |b| {
        b.iter(|| reader.read_slot(0, black_box(7)))
    });
    g.bench_function("read_own_slot", |b| {
        b.iter(|| w.read_own_slot(black_box(7)))
    });
    let mut rtt = 0u32;
    g.bench_function("add+record_rtt", |b| {
        b.iter(|| {
            rtt = rtt.wrapping_add(7919) & 0xf_ffff;
            w.add(Counter::Matched, 1);
            w.record_rtt(black_box(rtt));
        })
    });
    g.finish();
}

criterion_group!(benches, bench_shm);
criterion_main!(benches);
