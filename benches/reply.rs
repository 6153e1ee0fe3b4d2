//! Per-reply cost of the receive path: `reply::match_reply` on realistic
//! datagrams (target: ≤ 150 ns for a ~450-byte 200 OK), and the token
//! `encode` / `decode` pair it is built on.
//!
//! Run: `cargo bench --bench reply -- --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kaping::wire::reply::{match_reply, Reject};
use kaping::wire::token::{decode, encode, TokenFields, TokenKey, TOKEN_LEN};

const FIELDS: TokenFields = TokenFields {
    worker: 3,
    slot: 777_777,
    generation: 9,
    seq: 1234,
    sent_us: 4_000_000_000,
};

/// A Yealink-style 200 OK to our OPTIONS, about 450 bytes; `{t}` is our
/// token.
fn yealink_200(t: &str) -> Vec<u8> {
    format!(
        "SIP/2.0 200 OK\r\n\
         Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK{t};rport=5060\r\n\
         From: <sip:kaping@10.0.0.5>;tag={t}\r\n\
         To: <sip:1001@pbx.example.com>;tag=1843902311\r\n\
         Call-ID: {t}@10.0.0.5\r\n\
         CSeq: 17 OPTIONS\r\n\
         Contact: <sip:1001@192.168.1.23:5060>\r\n\
         Allow: INVITE, INFO, PRACK, ACK, BYE, CANCEL, OPTIONS, NOTIFY, REFER, UPDATE\r\n\
         Accept-Language: en\r\n\
         User-Agent: Yealink SIP-T46S 66.86.0.15\r\n\
         Content-Length: 0\r\n\
         \r\n"
    )
    .into_bytes()
}

/// Compact headers, From after two Vias: the short end of real replies.
fn compact_200(t: &str) -> Vec<u8> {
    format!(
        "SIP/2.0 200 OK\r\n\
         v: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK{t};received=10.0.0.5\r\n\
         v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK5e1a.7c2bd1f2000000000000000000000000.0\r\n\
         f: <sip:kaping@10.0.0.5>;tag={t}\r\n\
         t: <sip:5005@example.com>;tag=8721\r\n\
         i: {t}@10.0.0.5\r\n\
         CSeq: 17 OPTIONS\r\n\
         l: 0\r\n\
         \r\n"
    )
    .into_bytes()
}

/// A Polycom-style 200 OK with its SDP capabilities body (§11.2).
fn polycom_200_sdp(t: &str) -> Vec<u8> {
    let body = "v=0\r\no=- 1714032113 1714032113 IN IP4 192.168.1.40\r\ns=Polycom IP Phone\r\n\
                c=IN IP4 192.168.1.40\r\nt=0 0\r\na=sendrecv\r\nm=audio 2222 RTP/AVP 9 102 0 8 18 127\r\n\
                a=rtpmap:9 G722/8000\r\na=rtpmap:102 G7221/16000\r\na=fmtp:102 bitrate=32000\r\n\
                a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:18 G729/8000\r\n\
                a=fmtp:18 annexb=no\r\na=rtpmap:127 telephone-event/8000\r\n";
    format!(
        "SIP/2.0 200 OK\r\n\
         Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK{t};rport=5060\r\n\
         From: \"kaping\" <sip:kaping@10.0.0.5>;tag={t}\r\n\
         To: <sip:2002@pbx.example.com>;tag=ED8AC1C4-95A3C8A2\r\n\
         CSeq: 17 OPTIONS\r\n\
         Call-ID: {t}@10.0.0.5\r\n\
         Contact: <sip:2002@192.168.1.40:5060>\r\n\
         Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, INFO, MESSAGE, SUBSCRIBE, NOTIFY, PRACK, UPDATE, REFER\r\n\
         Supported: 100rel,replaces\r\n\
         User-Agent: PolycomVVX-VVX_410-UA/5.9.5.0614\r\n\
         Accept-Language: en\r\n\
         Accept: application/sdp,application/cpim-pidf+xml,message/sipfrag\r\n\
         Accept-Encoding: identity\r\n\
         Content-Type: application/sdp\r\n\
         Content-Length: {}\r\n\
         \r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn bench_match_reply(c: &mut Criterion) {
    let key = TokenKey::new(*b"bench-secret-key", 0x00_BEEF);
    let mut tok = [0u8; TOKEN_LEN];
    encode(&key, &FIELDS, &mut tok);
    let t = std::str::from_utf8(&tok).expect("token is ASCII");

    let mut forged_tok = tok;
    forged_tok[TOKEN_LEN - 1] = if tok[TOKEN_LEN - 1] == b'A' {
        b'B'
    } else {
        b'A'
    };
    let forged = yealink_200(std::str::from_utf8(&forged_tok).expect("ASCII"));
    let request = b"OPTIONS sip:kaping@10.0.0.5:5060 SIP/2.0\r\n\
        Via: SIP/2.0/UDP 192.168.1.23:5060;branch=z9hG4bK1967212379;rport\r\n\
        From: <sip:1001@pbx.example.com>;tag=2140556237\r\n\
        To: <sip:kaping@10.0.0.5>\r\nCall-ID: 1337802468@192.168.1.23\r\nCSeq: 1 OPTIONS\r\n\
        Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        .to_vec();

    let cases: [(&str, Vec<u8>, Result<u16, Reject>); 5] = [
        ("yealink_200", yealink_200(t), Ok(200)),
        ("compact_200", compact_200(t), Ok(200)),
        ("polycom_200_sdp", polycom_200_sdp(t), Ok(200)),
        ("forged_200", forged, Err(Reject::Forged)),
        ("request", request, Err(Reject::Request)),
    ];

    let mut group = c.benchmark_group("match_reply");
    for (name, datagram, want) in &cases {
        // A bench of the wrong path measures nothing: check the outcome first.
        let got = match_reply(&key, b"OPTIONS", datagram).map(|m| m.status);
        assert_eq!(&got, want, "{name}");
        group.throughput(Throughput::Bytes(datagram.len() as u64));
        group.bench_function(format!("{name}_{}B", datagram.len()), |b| {
            b.iter(|| match_reply(black_box(&key), b"OPTIONS", black_box(datagram)))
        });
    }
    group.finish();
}

fn bench_token(c: &mut Criterion) {
    let key = TokenKey::new(*b"bench-secret-key", 0x00_BEEF);
    let mut tok = [0u8; TOKEN_LEN];
    encode(&key, &FIELDS, &mut tok);
    assert_eq!(decode(&key, &tok), Ok(FIELDS));

    let mut group = c.benchmark_group("token");
    group.bench_function("encode", |b| {
        let mut out = [0u8; TOKEN_LEN];
        b.iter(|| {
            encode(black_box(&key), black_box(&FIELDS), &mut out);
            black_box(&out);
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| decode(black_box(&key), black_box(&tok)))
    });
    group.finish();
}

criterion_group!(benches, bench_match_reply, bench_token);
criterion_main!(benches);
