//! The DMQ feed's hot path on the node thread: one KDMQ request as
//! Kamailio 5.6.3 sends a live change (`tests/data/dmq/upsert.sip`), and a
//! sync batch of 50 records (`batch_msg_contacts = 50`), read into changes.
//!
//! `registrar/usrloc/*/fast`: [`parse_body`], the one-pass reader the node
//! runs. `.../values`: the same body through a `serde_json::Value` tree
//! (the reference reader), the cost the one-pass reader saves.
//! `registrar/kdmq/upsert`: the SIP framing ([`parse_message`]) and body.
//!
//! Run: `cargo bench --bench registrar -- --measurement-time 3`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kaping::registrar::dmq::parse_message;
use kaping::registrar::usrloc::{parse_body, parse_body_values, UsrlocMsg};
use std::hint::black_box;

const UPSERT: &[u8] = include_bytes!("../tests/data/dmq/upsert.sip");

fn batch_of(n: usize, one: &serde_json::Value) -> Vec<u8> {
    let multi: serde_json::Map<String, serde_json::Value> = (1..=n)
        .map(|i| {
            let mut r = one.clone();
            r["ruid"] = format!("uloc-6751c1e8-5b1-{i}").into();
            r["c"] = format!("sip:u{i}@192.0.2.{}:{}", i % 250, 5060 + i).into();
            (i.to_string(), r)
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "multi": multi })).unwrap()
}

fn usrloc(c: &mut Criterion) {
    let msg = parse_message(UPSERT).unwrap();
    let single = msg.body.to_vec();
    let one: serde_json::Value = serde_json::from_slice(&single).unwrap();
    let batch = batch_of(50, &one);
    for (name, body, records) in [("single", &single, 1u64), ("batch50", &batch, 50)] {
        assert!(matches!(parse_body(body), Ok(UsrlocMsg::Changes(c)) if c.len() as u64 == records));
        assert_eq!(parse_body(body), parse_body_values(body));
        let mut g = c.benchmark_group(format!("registrar/usrloc/{name}"));
        g.throughput(Throughput::Elements(records));
        g.bench_function("fast", |b| b.iter(|| parse_body(black_box(body))));
        g.bench_function("values", |b| b.iter(|| parse_body_values(black_box(body))));
        g.finish();
    }
    let mut g = c.benchmark_group("registrar/kdmq");
    g.throughput(Throughput::Elements(1));
    g.bench_function("upsert", |b| {
        b.iter(|| {
            let m = parse_message(black_box(UPSERT)).unwrap();
            parse_body(m.body)
        })
    });
    g.finish();
}

criterion_group!(benches, usrloc);
criterion_main!(benches);
