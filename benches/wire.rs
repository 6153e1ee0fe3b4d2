//! Per-ping cost of building a keepalive request (DESIGN §2): `patch` alone
//! on an already rendered request, and `render` into a staging buffer plus
//! `patch` (what a worker pays per ping), for a typical NATed contact, a
//! contact with a Path, and batches of staging slots as a send batch fills
//! them. Target: ≤ 50 ns per packet.
//!
//! Run: `cargo bench --bench wire -- --measurement-time 3`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kaping::wire::template::{patch, ContactText, Template, TemplateConfig};
use kaping::wire::token::TOKEN_LEN;

/// A staging slot per packet: the largest request we expect, rounded up.
const SLOT_LEN: usize = 512;

const TYPICAL: ContactText<'static> = ContactText {
    uri: "sip:alice-0x7fc281c1dd40@192.168.1.20:5060;transport=udp",
    to: "sip:alice@example.com",
    route: None,
};

const WITH_PATH: ContactText<'static> = ContactText {
    uri: "sip:bob@10.0.0.5:5060",
    to: "sip:bob@example.com",
    route: Some("<sip:edge1.example.com;lr;received=sip:198.51.100.77:40332>"),
};

fn template() -> Template {
    let cfg = TemplateConfig {
        local_host: "198.51.100.10".to_owned(),
        local_port: 5060,
        extra_headers: vec!["User-Agent: kaping".to_owned()],
        ..TemplateConfig::default()
    };
    Template::new(&cfg).expect("valid template")
}

/// A token of token characters that changes with `n`, as a real one does.
fn token(n: u32) -> [u8; TOKEN_LEN] {
    let mut t = *b"AbCd0123456789-.efghIJKLmnop";
    t[TOKEN_LEN - 4..].copy_from_slice(&n.to_le_bytes().map(|b| b'A' + (b & 15)));
    t
}

fn bench_wire(c: &mut Criterion) {
    let t = template();
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(1));

    let mut buf = [0u8; SLOT_LEN];
    let layout = t.render(&TYPICAL, &mut buf).expect("fits");
    let tok = token(1);
    group.bench_function("patch", |b| {
        let mut cseq = 0u32;
        b.iter(|| {
            cseq = cseq.wrapping_add(1);
            patch(
                black_box(&mut buf),
                black_box(&layout),
                black_box(&tok),
                cseq,
            );
        })
    });

    // Reference point: copying a whole pre-rendered request (what storing
    // one request per contact would cost per ping, before patching). It
    // also calibrates the machine: render cannot beat one memcpy of its
    // output.
    let whole = buf;
    let whole_len = usize::from(layout.len);
    let mut copy = [0u8; SLOT_LEN];
    group.bench_function("baseline/memcpy-request", |b| {
        b.iter(|| {
            black_box(&mut copy)[..whole_len]
                .copy_from_slice(&black_box(&whole)[..black_box(whole_len)]);
        })
    });

    for (name, contact) in [("render+patch", TYPICAL), ("render+patch/path", WITH_PATH)] {
        let mut buf = [0u8; SLOT_LEN];
        group.bench_function(name, |b| {
            let mut cseq = 0u32;
            b.iter(|| {
                cseq = cseq.wrapping_add(1);
                let layout = t
                    .render(black_box(&contact), black_box(&mut buf))
                    .expect("fits");
                patch(&mut buf, &layout, black_box(&tok), cseq);
                layout.len
            })
        });
    }
    group.finish();

    // A send batch: render + patch into consecutive staging slots.
    let mut group = c.benchmark_group("wire/batch");
    for batch_len in [16usize, 64, 256] {
        let mut staging = vec![0u8; batch_len * SLOT_LEN];
        let tokens: Vec<[u8; TOKEN_LEN]> = (0..batch_len as u32).map(token).collect();
        group.throughput(Throughput::Elements(batch_len as u64));
        group.bench_with_input(
            BenchmarkId::new("render+patch", batch_len),
            &batch_len,
            |b, _| {
                let mut cseq = 0u32;
                b.iter(|| {
                    let mut bytes = 0usize;
                    for (slot, tok) in staging.chunks_exact_mut(SLOT_LEN).zip(&tokens) {
                        cseq = cseq.wrapping_add(1);
                        let layout = t.render(black_box(&TYPICAL), slot).expect("fits");
                        patch(slot, &layout, tok, cseq);
                        bytes += usize::from(layout.len);
                    }
                    bytes
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench_wire);
criterion_main!(benches);
