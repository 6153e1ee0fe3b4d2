//! Entry points of the fuzz targets (`fuzz/fuzz_targets/*.rs`), one per
//! parser that takes input from the network or from other programs.
//!
//! Each function takes arbitrary bytes and must neither panic nor hang;
//! where the parsers have a property to hold, it is asserted here, so the
//! fuzzer finds wrong answers as well as crashes:
//! * [`reply`]: a reply the matcher accepts also parses, with a status in
//!   range;
//! * [`uri`]: a URI's written form parses back to the same value; a contact
//!   the template accepts renders into a request a strict reader takes
//!   whole, whose answer the matcher matches to the right contact;
//! * [`control`]: the fast request reader agrees with the `Value` reader
//!   wherever it answers, whatever the chunking of the stream;
//! * [`dmq`]: the fast dmq_usrloc body reader agrees with the `Value`
//!   reader.
//!
//! `cargo test` runs every seed (`fuzz/seeds/`) and every input that once
//! failed (`fuzz/regressions/`) through these functions
//! (`tests/fuzz_inputs.rs`).

use std::io::Cursor;
use std::net::SocketAddr;
use std::path::Path;

use crate::control::rpc::{self, Frame, Framer};
use crate::registrar::{dmq as kdmq, rpc as registrar_rpc, usrloc};
use crate::sim::request as sim_request;
use crate::sources::{self, Format, Verdict};
use crate::wire::reply;
use crate::wire::template::{self, ContactText, Template, TemplateConfig};
use crate::wire::token::{encode, TokenFields, TokenKey, TOKEN_LEN};
use crate::wire::uri::{self, SipUri};

/// The key the reply seeds were made with (the reply tests' key), so
/// mutations of a seed keep a token that verifies.
pub fn key() -> TokenKey {
    TokenKey::new(*b"0123456789abcdef", 0x00_0ABC)
}

/// The token fields of the reply seeds.
pub const FIELDS: TokenFields = TokenFields {
    worker: 7,
    slot: 1_234_567,
    generation: 513,
    seq: 65_000,
    sent_us: 3_000_000_123,
};

/// A target's entry point.
pub type Target = fn(&[u8]);

/// The targets, by the name of their seed and regression directories.
pub const TARGETS: &[(&str, Target)] = &[
    ("reply", reply),
    ("uri", uri),
    ("contacts_lines", contacts_lines),
    ("contacts_jsonl", contacts_jsonl),
    ("contacts_uldump", contacts_uldump),
    ("control", control),
    ("journal", journal),
    ("snapshot", snapshot),
    ("dmq", dmq),
];

/// The reply matcher, the reply parser and the ICMP quote reader.
pub fn reply(data: &[u8]) {
    let parsed = reply::parse(data);
    let key = key();
    for method in [&b"OPTIONS"[..], b"NOTIFY"] {
        if let Ok(m) = reply::match_reply(&key, method, data) {
            assert!(parsed.is_ok(), "matched but does not parse");
            assert!((100..=699).contains(&m.status), "status {}", m.status);
            assert_eq!(
                (m.worker, m.slot, m.generation, m.seq, m.sent_us),
                (
                    FIELDS.worker,
                    FIELDS.slot,
                    FIELDS.generation,
                    FIELDS.seq,
                    FIELDS.sent_us
                ),
                "a verified token carries other fields than the seeds'"
            );
        }
    }
    let _ = template::quoted_token(data);
}

/// The URI parser, destinations, the AoR and contact checks, and the
/// template they feed. Lines: contact, received, path, AoR.
pub fn uri(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let contact = lines.next().unwrap_or_default();
    let received = lines.next().filter(|s| !s.is_empty());
    let path = lines.next().filter(|s| !s.is_empty());
    let aor = lines.next().filter(|s| !s.is_empty());

    for s in [Some(contact), received, path].into_iter().flatten() {
        if let Ok(u) = SipUri::parse(s) {
            let written = u.to_string();
            let again = SipUri::parse(&written)
                .unwrap_or_else(|e| panic!("{s:?} wrote {written:?}, which fails: {e}"));
            assert_eq!(u, again, "{s:?} wrote {written:?}");
        }
        let _ = uri::parse_host(s);
        let _ = uri::first_path_hop(s);
    }
    let _ = uri::destination_of(contact, received, path);

    let request_uri = template::request_uri(contact);
    let to = match aor {
        Some(a) => match template::to_uri(a, Some("example.com")) {
            Ok(t) => t,
            Err(_) => return,
        },
        None => request_uri.to_owned(),
    };
    let c = ContactText {
        uri: request_uri,
        to: &to,
        route: path,
    };
    if template::check_contact(&c).is_ok() {
        ping_round_trip(&c);
    }
}

/// A contact the checks let through renders into a request that a strict
/// reader (the simulated phone's) takes whole, and the phone's answer
/// matches back to the contact.
fn ping_round_trip(c: &ContactText<'_>) {
    thread_local! {
        static TEMPLATE: Template = Template::new(&TemplateConfig::default())
            .expect("the default template");
    }
    TEMPLATE.with(|t| {
        let mut buf = vec![0u8; t.rendered_len(c)];
        let Ok(layout) = t.render(c, &mut buf) else {
            return; // longer than a request may be
        };
        let mut token = [0u8; TOKEN_LEN];
        encode(&key(), &FIELDS, &mut token);
        template::patch(&mut buf, &layout, &token, 17);
        let request = &buf[..layout.len as usize];
        let req = sim_request::parse(request).unwrap_or_else(|e| {
            panic!(
                "{c:?} rendered a request the phone refuses ({e:?}): {:?}",
                String::from_utf8_lossy(request)
            )
        });
        let source: SocketAddr = "192.0.2.1:5060".parse().unwrap();
        let params = sim_request::ReplyParams {
            code: 200,
            to_tag: b"fuzz000000000000",
            source,
            malform: None,
        };
        let mut answer = vec![0u8; request.len() + 512];
        let n = sim_request::write_reply(&req, &params, &mut answer).expect("room for the reply");
        let m = reply::match_reply(&key(), b"OPTIONS", &answer[..n]).unwrap_or_else(|e| {
            panic!(
                "{c:?}: the answer to our own request does not match ({e:?}): {:?}",
                String::from_utf8_lossy(&answer[..n])
            )
        });
        assert_eq!((m.slot, m.seq, m.status), (FIELDS.slot, FIELDS.seq, 200));
    });
}

fn contacts(data: &[u8], format: Format) {
    let sink = |spec: crate::contact::ContactSpec| {
        // What the daemon checks next, without name resolution.
        match uri::destination_of(&spec.uri, spec.received.as_deref(), spec.path.as_deref()) {
            Ok(_) => Verdict::Loaded,
            Err(e) => Verdict::Skip(e.to_string()),
        }
    };
    let report = sources::load_from(Cursor::new(data), Path::new("fuzz"), format, sink);
    if let Ok(r) = report {
        assert!(r.problems.len() <= sources::PROBLEMS_KEPT);
        assert!(r.problems.len() <= r.skipped);
    }
}

/// The plain contact file format (format detection included).
pub fn contacts_lines(data: &[u8]) {
    contacts(data, Format::Lines);
    contacts(data, Format::Auto);
}

/// JSON lines contact files.
pub fn contacts_jsonl(data: &[u8]) {
    contacts(data, Format::Jsonl);
}

/// Kamailio `ul.dump` replies.
pub fn contacts_uldump(data: &[u8]) {
    contacts(data, Format::UlDump);
}

/// The control socket's stream: framing (chunked as the first byte says)
/// and the request readers.
pub fn control(data: &[u8]) {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = (chunk as usize).max(1);
    let mut framer = Framer::new(64 << 10);
    for piece in stream.chunks(chunk) {
        framer.push(piece);
        loop {
            match framer.next_frame() {
                Frame::Value(r) => {
                    let text = framer.bytes(r);
                    let slow = rpc::parse_message_values(text);
                    if let Some(fast) = rpc::parse_message_fast(text) {
                        assert_eq!(
                            Ok(&fast),
                            slow.as_ref(),
                            "{:?}",
                            String::from_utf8_lossy(text)
                        );
                    }
                    let _ = rpc::parse_message(text);
                }
                Frame::Incomplete => break,
                _ => return, // the connection is answered and closed
            }
        }
        framer.compact();
    }
}

/// Journal segments (see `state::fuzz`).
pub fn journal(data: &[u8]) {
    crate::state::fuzz::journal(data);
}

/// Snapshots (see `state::fuzz`).
pub fn snapshot(data: &[u8]) {
    crate::state::fuzz::snapshot(data);
}

/// KDMQ datagrams and what they carry: dmq_usrloc bodies, node lists. The
/// first byte says whether the rest is a datagram or a bare body; the
/// body is also read as a Kamailio JSON-RPC answer.
pub fn dmq(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let body = if mode & 1 == 0 {
        match kdmq::parse_message(rest) {
            Ok(m) => {
                let _ = (m.from.addr(), m.to.addr(), m.channel(), m.status());
                m.body
            }
            Err(_) => return,
        }
    } else {
        rest
    };
    let fast = usrloc::parse_body(body);
    let slow = usrloc::parse_body_values(body);
    // The one known difference: a number out of f64's range in a member
    // kaping does not read is skipped by the fast reader and refused by
    // the tree (serde_json checks a number's range only when it keeps it).
    let lenient = fast.is_ok()
        && serde_json::from_slice::<serde_json::Value>(body)
            .is_err_and(|e| e.to_string().starts_with("number out of range"));
    if (fast.is_ok() || slow.is_ok()) && !lenient {
        assert_eq!(fast, slow, "{:?}", String::from_utf8_lossy(body));
    }
    let _ = kdmq::parse_node_list(body);
    let _ = registrar_rpc::rm_contact_outcome(body);
}
