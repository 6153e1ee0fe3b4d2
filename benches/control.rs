//! Control-socket request reading: one JSON-RPC batch of 1,000
//! `keepalive.add` (as `kaping ctl keepalive.add --file` and registrars
//! send them), read into calls. Reported per request.
//!
//! `control/read_batch/fast`: what the connection thread runs
//! (`parse_message`: the borrowed-text reader). `control/read_batch/values`:
//! the same batch read through a `serde_json::Value` tree, the reader every
//! input falls back to (the cost the fast reader saves).
//!
//! Run: `cargo bench --bench control -- --measurement-time 3`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kaping::control::rpc::{parse_message, parse_message_values, Message};
use serde_json::json;
use std::hint::black_box;

const BATCH: usize = 1000;

fn batch_text() -> Vec<u8> {
    let calls: Vec<_> = (0..BATCH)
        .map(|i| {
            json!({"jsonrpc": "2.0", "id": i, "method": "keepalive.add", "params": {
                "uri": format!("sip:user{i}@10.{}.{}.{}:5060;transport=udp", i >> 16 & 255, i >> 8 & 255, i & 255),
                "aor": format!("user{i}@example.com"),
                "received": format!("sip:192.0.2.{}:{}", i & 255, 1024 + i),
                "interval": 30.0,
                "owner": "registrar-1",
            }})
        })
        .collect();
    serde_json::to_vec(&calls).unwrap()
}

fn read_batch(c: &mut Criterion) {
    let text = batch_text();
    match parse_message(&text).unwrap() {
        Message::Batch(calls) => assert!(calls
            .iter()
            .all(|c| matches!(c, Ok(c) if matches!(c.args, Some(Ok(_)))))),
        Message::Single(_) => panic!("a batch"),
    }
    let mut g = c.benchmark_group("control/read_batch");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("fast", |b| b.iter(|| parse_message(black_box(&text))));
    g.bench_function("values", |b| {
        b.iter(|| parse_message_values(black_box(&text)))
    });
    g.finish();
}

criterion_group!(benches, read_batch);
criterion_main!(benches);
