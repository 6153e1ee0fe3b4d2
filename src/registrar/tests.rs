//! Tests of the DMQ wire layer against the bytes Kamailio 5.6.3 sent
//! (`tests/data/dmq/`, see its README).

use std::net::SocketAddr;

use super::dmq::*;
use super::usrloc::*;

macro_rules! fixture {
    ($name:literal) => {
        (
            $name,
            include_bytes!(concat!("../../tests/data/dmq/", $name)) as &[u8],
        )
    };
}

const FIXTURES: [(&str, &[u8]); 14] = [
    fixture!("notify-startup.sip"),
    fixture!("sync-request.sip"),
    fixture!("kaping-join.sip"),
    fixture!("join-response.sip"),
    fixture!("notify-broadcast.sip"),
    fixture!("ping.sip"),
    fixture!("upsert.sip"),
    fixture!("delete.sip"),
    fixture!("sync-single.sip"),
    fixture!("sync-response.sip"),
    fixture!("sync-multi-2.sip"),
    fixture!("sync-multi-4.sip"),
    fixture!("response-404.sip"),
    fixture!("response-400.sip"),
];

fn fixture(name: &str) -> &'static [u8] {
    FIXTURES.iter().find(|(n, _)| *n == name).unwrap().1
}

fn kam() -> SocketAddr {
    "127.0.0.1:5070".parse().unwrap()
}

fn node() -> SocketAddr {
    "127.0.0.1:5071".parse().unwrap()
}

#[test]
fn every_fixture_parses_and_its_body_too() {
    for (name, bytes) in FIXTURES {
        let m = parse_message(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.cseq.method, "KDMQ", "{name}");
        assert_eq!(m.cseq.number, 10, "{name}");
        match (m.channel(), m.content_type) {
            (Some("notification_peer"), Some("text/plain")) => {
                let nodes = parse_node_list(m.body).unwrap();
                // The sender always lists itself.
                assert!(nodes.iter().any(|n| n.addr == m.from.addr()), "{name}");
                assert!(nodes.iter().all(|n| n.status == NodeStatus::Active));
            }
            (Some("usrloc"), Some("application/json")) => {
                parse_body(m.body).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            (None, Some("text/plain")) => {
                let nodes = parse_node_list(m.body).unwrap();
                assert_eq!(nodes.len(), 3, "{name}");
            }
            (None, None) => assert!(m.body.is_empty(), "{name}"),
            other => panic!("{name}: unexpected {other:?}"),
        }
    }
}

#[test]
fn kamailio_request_fields() {
    let m = parse_message(fixture("sync-request.sip")).unwrap();
    assert_eq!(
        m.start,
        StartLine::Request {
            uri: "sip:usrloc@127.0.0.1:5071",
            channel: "usrloc"
        }
    );
    assert_eq!(m.vias.len(), 1);
    assert_eq!(m.via.transport, "UDP");
    assert_eq!(m.via.sent_by, "127.0.0.1:5070");
    assert_eq!(m.via.port, Some(5070));
    assert_eq!(
        m.via.branch,
        Some("z9hG4bK0b4c.eaa788c6000000000000000000000000.0")
    );
    assert_eq!(m.via.rport, None);
    assert_eq!(m.from.uri, "sip:usrloc@127.0.0.1:5070");
    assert_eq!(m.from.addr(), Some(kam()));
    assert_eq!(
        m.from.tag,
        Some("17e38db12cb64994c952f0bfdfeab491-2e22cc0b")
    );
    assert_eq!(m.to.uri, "sip:usrloc@127.0.0.1:5071");
    assert_eq!(m.to.tag, None);
    assert_eq!(m.call_id, "45fe1d1f3e7ab5ee-23439@127.0.0.1");
    assert_eq!(m.max_forwards, Some(1));
    assert_eq!(m.body, sync_request_body());
    assert_eq!(parse_body(m.body), Ok(UsrlocMsg::SyncRequest));

    let m = parse_message(fixture("notify-startup.sip")).unwrap();
    assert_eq!(m.max_forwards, Some(2));
    assert_eq!(m.channel(), Some("notification_peer"));
}

#[test]
fn kamailio_responses() {
    let m = parse_message(fixture("response-404.sip")).unwrap();
    assert_eq!(
        m.start,
        StartLine::Response {
            status: 404,
            reason: "User Not Found"
        }
    );
    assert_eq!(m.status(), Some(404));
    assert_eq!(
        parse_message(fixture("response-400.sip")).unwrap().status(),
        Some(400)
    );
    let m = parse_message(fixture("join-response.sip")).unwrap();
    assert_eq!(m.status(), Some(200));
    assert!(m.to.tag.is_some());
    let nodes = parse_node_list(m.body).unwrap();
    assert_eq!(
        nodes.iter().map(|n| n.uri.as_str()).collect::<Vec<_>>(),
        [
            "sip:127.0.0.1:5071;status=active",
            "sip:127.0.0.1:5070;status=active",
            "sip:127.0.0.1:5070;status=active"
        ]
    );
}

#[test]
fn usrloc_records() {
    let m = parse_message(fixture("upsert.sip")).unwrap();
    let UsrlocMsg::Changes(c) = parse_body(m.body).unwrap() else {
        panic!("not changes")
    };
    assert_eq!(
        c,
        [Change {
            action: Action::Upsert,
            aor: "u0".into(),
            ruid: "uloc-6b11476c-5b8e-1".into(),
            contact: "sip:u0@127.0.0.1:40000".into(),
            received: None,
            path: None,
            socket: None,
            expires: 1_796_294_813,
            callid: Some("reg0@t".into()),
            cseq: 1,
            flags: 0,
            cflags: 0,
            q: -1,
            last_modified: 1_796_294_513,
            server_id: 0,
            user_agent: Some("capture".into()),
            instance: None,
            reg_id: 0,
            methods: u32::MAX,
        }]
    );
    let m = parse_message(fixture("delete.sip")).unwrap();
    let UsrlocMsg::Changes(d) = parse_body(m.body).unwrap() else {
        panic!("not changes")
    };
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].action, Action::Delete);
    assert_eq!(d[0].ruid, c[0].ruid);

    for (name, n, first) in [("sync-multi-2.sip", 2, "u2"), ("sync-multi-4.sip", 4, "u6")] {
        let m = parse_message(fixture(name)).unwrap();
        let UsrlocMsg::Changes(c) = parse_body(m.body).unwrap() else {
            panic!("not changes")
        };
        assert_eq!(c.len(), n, "{name}");
        assert_eq!(c[0].aor, first, "{name}: batch order kept");
        assert!(c
            .iter()
            .all(|c| c.action == Action::Upsert && c.expires > 0));
    }
}

#[test]
fn usrloc_newer_fields_and_order() {
    let body = br#"{"multi":{"10":{"action":2,"aor":"b","ruid":"r10"},
        "2":{"action":1,"aor":"a","ruid":"r2","c":"sip:a@h","expires":0,
             "sockname":"udp:10.0.0.1:5060","future":{"x":[1,2]},"q":1000}}}"#;
    let UsrlocMsg::Changes(c) = parse_body(body).unwrap() else {
        panic!("not changes")
    };
    assert_eq!(c[0].ruid, "r2");
    assert_eq!(c[0].socket.as_deref(), Some("udp:10.0.0.1:5060"));
    assert_eq!(c[0].expires, 0, "permanent");
    assert_eq!(c[0].q, 1000);
    assert_eq!(c[1].ruid, "r10");
    assert_eq!(c[1].contact, "");
    assert_eq!(
        parse_body(br#"{"action":0}"#),
        Ok(UsrlocMsg::Changes(vec![]))
    );
}

#[test]
fn every_usrloc_reject() {
    let long = format!(
        r#"{{"action":1,"aor":"{}","ruid":"r","c":"sip:h","expires":1}}"#,
        "a".repeat(FIELD_LEN_MAX + 1)
    );
    let many = format!(
        r#"{{"multi":{{{}}}}}"#,
        (0..=CHANGES_MAX)
            .map(|i| format!(r#""{i}":{{"action":0}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let cases: Vec<(Vec<u8>, UsrlocReject)> = vec![
        (vec![b' '; BODY_LEN_MAX + 1], UsrlocReject::Oversized),
        (b"{\"action\":3".to_vec(), UsrlocReject::NotJson),
        (b"[1]".to_vec(), UsrlocReject::NotObject),
        (br#"{"multi":[1]}"#.to_vec(), UsrlocReject::BadBatch),
        (br#"{"multi":{"1":5}}"#.to_vec(), UsrlocReject::BadBatch),
        (many.into_bytes(), UsrlocReject::TooManyChanges),
        (br#"{"action":4}"#.to_vec(), UsrlocReject::UnknownAction),
        (
            br#"{"multi":{"1":{"action":3}}}"#.to_vec(),
            UsrlocReject::SyncInBatch,
        ),
        (
            br#"{"aor":"a"}"#.to_vec(),
            UsrlocReject::MissingField("action"),
        ),
        (
            br#"{"action":1,"ruid":"r","c":"sip:h","expires":1}"#.to_vec(),
            UsrlocReject::MissingField("aor"),
        ),
        (
            br#"{"action":2,"aor":"a","ruid":""}"#.to_vec(),
            UsrlocReject::MissingField("ruid"),
        ),
        (
            br#"{"action":1,"aor":"a","ruid":"r","expires":1}"#.to_vec(),
            UsrlocReject::MissingField("c"),
        ),
        (
            br#"{"action":1,"aor":"a","ruid":"r","c":"sip:h"}"#.to_vec(),
            UsrlocReject::MissingField("expires"),
        ),
        (
            br#"{"action":1,"aor":"a","ruid":"r","c":"sip:h","expires":-1}"#.to_vec(),
            UsrlocReject::BadField("expires"),
        ),
        (
            br#"{"action":1,"aor":"a","ruid":"r","c":"sip:h","expires":1,"cseq":4294967296}"#
                .to_vec(),
            UsrlocReject::BadField("cseq"),
        ),
        (
            br#"{"action":1,"aor":"a","ruid":"r","c":"sip:h","expires":1,"q":0.5}"#.to_vec(),
            UsrlocReject::BadField("q"),
        ),
        (
            br#"{"action":1,"aor":7,"ruid":"r","c":"sip:h","expires":1}"#.to_vec(),
            UsrlocReject::BadField("aor"),
        ),
        (
            br#"{"action":"1"}"#.to_vec(),
            UsrlocReject::BadField("action"),
        ),
        (long.into_bytes(), UsrlocReject::FieldTooLong("aor")),
    ];
    let mut names = std::collections::HashSet::new();
    for (body, want) in cases {
        assert_eq!(
            parse_body(&body),
            Err(want),
            "{}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        names.insert(want.name());
    }
    assert_eq!(names.len(), 10, "every cause has its own name and a case");
}

/// A request as Kamailio sends it, with `(from, to)` replaced in the text.
fn edit(name: &str, from: &str, to: &str) -> Vec<u8> {
    String::from_utf8(fixture(name).to_vec())
        .unwrap()
        .replacen(from, to, 1)
        .into_bytes()
}

#[test]
fn every_dmq_reject() {
    let s = "sync-request.sip";
    let mut oversized = fixture(s).to_vec();
    oversized.resize(DATAGRAM_LEN_MAX + 1, b' ');
    let many_headers = edit(
        s,
        "CSeq:",
        &format!("{}CSeq:", "X-A: 1\r\n".repeat(HEADERS_MAX)),
    );
    let cases: Vec<(Vec<u8>, DmqReject)> = vec![
        (oversized, DmqReject::Oversized),
        (
            fixture(s)[..fixture(s).len() - 1].to_vec(),
            DmqReject::Truncated,
        ),
        (b"hello world\r\n\r\n".to_vec(), DmqReject::NotSip),
        (
            edit(
                s,
                "KDMQ sip:usrloc@127.0.0.1:5071 SIP/2.0",
                "KDMQ  sip:usrloc@127.0.0.1:5071 SIP/2.0",
            ),
            DmqReject::BadStartLine,
        ),
        (
            edit("sync-response.sip", "SIP/2.0 200 OK", "SIP/2.0 20x OK"),
            DmqReject::BadStartLine,
        ),
        (edit(s, "KDMQ sip:", "OPTIONS sip:"), DmqReject::NotKdmq),
        (
            edit(s, "CSeq: 10 KDMQ", "CSeq: 10 OPTIONS"),
            DmqReject::NotKdmq,
        ),
        (
            edit(s, "sip:usrloc@127.0.0.1:5071 SIP", "sip:127.0.0.1:5071 SIP"),
            DmqReject::BadRequestUri,
        ),
        (many_headers, DmqReject::TooManyHeaders),
        (
            edit(s, "CSeq: 10 KDMQ", "CSeq 10 KDMQ"),
            DmqReject::BadHeader,
        ),
        (
            edit(s, "CSeq: 10 KDMQ\r\n", "CSeq: 10\r\n KDMQ\r\n"),
            DmqReject::BadHeader,
        ),
        (
            edit(
                s,
                "From: <sip:usrloc@127.0.0.1:5070>",
                "From: <sip:usrloc@127.0.0.1:5070>;x=\ry",
            ),
            DmqReject::BadHeader,
        ),
        (
            edit(s, "CSeq: 10 KDMQ", "CSeq: 10 KDMQ\r\ncseq: 11 KDMQ"),
            DmqReject::DuplicateHeader,
        ),
        (edit(s, "Via:", "X-Via:"), DmqReject::NoVia),
        (
            edit(
                s,
                "SIP/2.0/UDP 127.0.0.1:5070",
                "SIP/2.0/UDP 127.0.0.1:99999",
            ),
            DmqReject::BadVia,
        ),
        (edit(s, "From:", "X-From:"), DmqReject::NoFrom),
        (
            edit(s, "From: <sip:usrloc@", "From: <http:usrloc@"),
            DmqReject::BadFrom,
        ),
        (edit(s, "To:", "X-To:"), DmqReject::NoTo),
        (
            edit(
                s,
                "To: <sip:usrloc@127.0.0.1:5071>",
                "To: <sip:usrloc@127.0.0.1:5071>;tag=a;tag=b",
            ),
            DmqReject::BadTo,
        ),
        (
            edit(s, "Call-ID: 45fe1d1f3e7ab5ee-23439@127.0.0.1", "Call-ID: "),
            DmqReject::NoCallId,
        ),
        (edit(s, "CSeq:", "X-CSeq:"), DmqReject::NoCSeq),
        (
            edit(s, "CSeq: 10 KDMQ", "CSeq: ten KDMQ"),
            DmqReject::BadCSeq,
        ),
        (
            edit(s, "Max-Forwards: 1", "Max-Forwards: 256"),
            DmqReject::BadMaxForwards,
        ),
        (
            edit(s, "Content-Length: 12", "Content-Length: -12"),
            DmqReject::BadContentLength,
        ),
    ];
    let mut names = std::collections::HashSet::new();
    for (bytes, want) in cases {
        assert_eq!(
            parse_message(&bytes).map(|_| ()),
            Err(want),
            "{}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
        );
        names.insert(want.name());
    }
    let long = format!("sip:{}.example:5060\r\n", "a".repeat(NODE_LINE_LEN_MAX));
    let many = "sip:10.0.0.1:5060\r\n".repeat(NODES_MAX + 1);
    for (body, want) in [
        (&b"http://x\r\n"[..], DmqReject::BadNodeUri),
        (long.as_bytes(), DmqReject::BadNodeUri),
        (
            &b"sip:10.0.0.1:5060;status=activ\r\n"[..],
            DmqReject::BadNodeStatus,
        ),
        (many.as_bytes(), DmqReject::TooManyNodes),
    ] {
        assert_eq!(parse_node_list(body), Err(want));
        names.insert(want.name());
    }
    assert_eq!(names.len(), DmqReject::COUNT, "every cause has a case");
    for (i, r) in DmqReject::ALL.iter().enumerate() {
        assert_eq!(r.index(), i);
    }
}

#[test]
fn every_truncation_of_every_fixture_is_rejected() {
    for (name, bytes) in FIXTURES {
        for n in 0..bytes.len() {
            assert!(parse_message(&bytes[..n]).is_err(), "{name} cut at {n}");
        }
        let m = parse_message(bytes).unwrap();
        for n in 0..m.body.len() {
            let _ = parse_node_list(&m.body[..n]);
            if m.content_type == Some(CONTENT_TYPE_JSON) {
                assert!(parse_body(&m.body[..n]).is_err(), "{name} body cut at {n}");
            }
        }
    }
}

#[test]
fn compact_forms_lf_and_missing_content_length() {
    let text = "KDMQ sip:usrloc@10.0.0.2 SIP/2.0\n\
                v: SIP/2.0/UDP [2001:db8::1]:5062 ;rport=5062 ;received=10.9.9.9;branch=z9hG4bKx\n\
                v: SIP/2.0/UDP 10.0.0.9;branch=z9hG4bKy\n\
                f: sip:usrloc@[2001:db8::1]:5062;tag=abc\n\
                t: \"R\" <sip:usrloc@10.0.0.2>\n\
                i: cid\n\
                CSEQ: 7 KDMQ\n\
                c: application/json\n\
                \n\
                {\"action\":3}";
    let m = parse_message(text.as_bytes()).unwrap();
    assert_eq!(m.vias.len(), 2);
    assert_eq!(m.via.port, Some(5062));
    assert_eq!(m.via.rport, Some(Some(5062)));
    assert_eq!(m.via.received, Some("10.9.9.9"));
    assert_eq!(m.from.tag, Some("abc"));
    assert_eq!(m.from.addr(), Some("[2001:db8::1]:5062".parse().unwrap()));
    assert_eq!(m.to.uri, "sip:usrloc@10.0.0.2");
    assert_eq!(m.to.addr(), Some("10.0.0.2:5060".parse().unwrap()));
    assert_eq!(m.max_forwards, None);
    assert_eq!(m.body, sync_request_body());
}

#[test]
fn write_request_round_trips() {
    for (target, local) in [
        (kam(), node()),
        (
            "[2001:db8::5]:5070".parse().unwrap(),
            "[2001:db8::9]:5071".parse().unwrap(),
        ),
    ] {
        let body = join_body(local);
        let spec = RequestSpec {
            channel: CHANNEL_NOTIFICATION,
            target,
            local,
            branch: "abc123",
            call_id: "c1@kaping",
            from_tag: "t1",
            cseq: 42,
            body: body.as_bytes(),
            content_type: CONTENT_TYPE_NODES,
            max_forwards: 2,
        };
        let mut out = vec![0xa5];
        write_request(&spec, &mut out);
        assert_eq!(out[0], 0xa5, "appends");
        let m = parse_message(&out[1..]).unwrap();
        assert_eq!(m.channel(), Some(CHANNEL_NOTIFICATION));
        assert_eq!(m.via.branch, Some("z9hG4bKabc123"));
        assert_eq!(m.from.addr(), Some(local));
        assert_eq!(m.from.tag, Some("t1"));
        assert_eq!(m.to.addr(), Some(target));
        assert_eq!(m.to.tag, None);
        assert_eq!(m.call_id, "c1@kaping");
        assert_eq!(
            m.cseq,
            CSeq {
                number: 42,
                method: "KDMQ"
            }
        );
        assert_eq!(m.max_forwards, Some(2));
        assert_eq!(m.content_type, Some(CONTENT_TYPE_NODES));
        assert_eq!(m.body, body.as_bytes());
        let nodes = parse_node_list(m.body).unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].addr, Some(local));
        assert_eq!(nodes[0].status, NodeStatus::Active);
    }
}

#[test]
fn join_matches_what_kamailio_accepted() {
    assert_eq!(join_body(node()), "sip:127.0.0.1:5071;status=active\r\n");
    let m = parse_message(fixture("kaping-join.sip")).unwrap();
    assert_eq!(m.body, join_body(node()).as_bytes());
    let v6: SocketAddr = "[::1]:5071".parse().unwrap();
    assert_eq!(join_body(v6), "sip:[::1]:5071;status=active\r\n");
}

#[test]
fn response_copies_the_transaction_keys() {
    for name in ["sync-request.sip", "upsert.sip", "ping.sip"] {
        let req = parse_message(fixture(name)).unwrap();
        let mut out = Vec::new();
        write_response(&req, 200, "OK", "kaping1", &mut out);
        let r = parse_message(&out).unwrap();
        assert_eq!(r.status(), Some(200));
        assert_eq!(r.vias, req.vias);
        assert_eq!(r.via.branch, req.via.branch);
        assert_eq!(r.from, req.from);
        assert_eq!(r.to.uri, req.to.uri);
        assert_eq!(r.to.tag, Some("kaping1"));
        assert_eq!(r.call_id, req.call_id);
        assert_eq!(r.cseq, req.cseq);
        assert!(r.body.is_empty());
        assert!(out.ends_with(b"Content-Length: 0\r\n\r\n"));
    }
    // A To that already has a tag keeps it.
    let req = parse_message(fixture("sync-response.sip")).unwrap();
    let mut out = Vec::new();
    write_response(&req, 200, "OK", "other", &mut out);
    assert_eq!(parse_message(&out).unwrap().to.tag, req.to.tag);
}

proptest::proptest! {
    #[test]
    fn hostile_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
        let _ = parse_message(&bytes);
        let _ = parse_node_list(&bytes);
        let _ = parse_body(&bytes);
    }

    #[test]
    fn mutated_fixtures_never_panic(idx in 0usize..14, pos in 0usize..2000, byte in proptest::num::u8::ANY) {
        let mut b = FIXTURES[idx].1.to_vec();
        let p = pos % b.len();
        b[p] = byte;
        if let Ok(m) = parse_message(&b) {
            let _ = parse_node_list(m.body);
            let _ = parse_body(m.body);
            let mut out = Vec::new();
            write_response(&m, 200, "OK", "t", &mut out);
            proptest::prop_assert!(parse_message(&out).is_ok());
        }
    }
}

/// A JSON value of any type a hostile or broken peer could put where a
/// record field goes.
fn any_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    use serde_json::{json, Value};
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (0u64..5).prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        Just(json!(-1)),
        Just(json!(1.5)),
        Just(json!("")),
        "[a-z:@.0-9]{1,12}".prop_map(Value::String),
        Just(Value::String("x".repeat(FIELD_LEN_MAX + 1))),
        Just(Value::String("esc\"aped\\\n\u{e9}".into())),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,3}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A record: some of the fields Kamailio sends, with values of any type,
/// mostly of the right one.
fn any_record() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};
    let names: Vec<&'static str> = FIELDS.iter().copied().chain(["other"]).collect();
    let field = (0usize..names.len(), any_value(), 0u8..4).prop_map(move |(i, v, good)| {
        let v = match (good, names[i]) {
            (0, _) => v,
            (_, "action") => json!(good % 4),
            (_, "aor" | "ruid" | "c" | "callid") => json!(format!("{}-{good}", names[i])),
            (_, "expires" | "cseq" | "flags" | "q") => json!(good),
            _ => v,
        };
        (names[i].to_string(), v)
    });
    proptest::collection::vec(field, 0..12)
        .prop_map(|fields| Value::Object(fields.into_iter().collect::<Map<_, _>>()))
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(2000))]

    /// The one-pass reader says exactly what the `Value` tree reader says,
    /// for single records, batches and what is neither.
    #[test]
    fn the_fast_usrloc_reader_agrees_with_the_value_reader(
        record in any_record(),
        batch in proptest::collection::vec(("[0-9]{1,2}|x", any_record()), 0..5),
        shape in 0u8..4,
        junk in any_value(),
    ) {
        let body = match shape {
            0 => record,
            1 => serde_json::json!({ "multi": batch.into_iter().collect::<serde_json::Map<_, _>>(), "action": 1 }),
            2 => serde_json::json!({ "multi": junk }),
            _ => junk,
        };
        let text = serde_json::to_vec(&body).unwrap();
        proptest::prop_assert_eq!(parse_body(&text), parse_body_values(&text), "{}", body);
    }
}

#[test]
fn the_fast_usrloc_reader_agrees_on_every_fixture_and_edge() {
    let mut bodies: Vec<Vec<u8>> = FIXTURES
        .iter()
        .filter_map(|(_, f)| parse_message(f).ok().map(|m| m.body.to_vec()))
        .collect();
    for b in [
        &br#"{"action":1,"aor":"a","ruid":"r","c":"sip:a@h","expires":5,"aor":"b"}"#[..],
        br#"{"\u0061ction":3}"#,
        br#"{"multi":{"2":{"action":1,"aor":"a","ruid":"r2","c":"sip:b@h","expires":1},"1":{"action":2,"aor":"a","ruid":"r1"},"1":{"action":1,"aor":"a","ruid":"r1","c":"sip:a@h","expires":1}}}"#,
        br#"{"multi":null}"#,
        br#"{"multi":[]}"#,
        br#"{"multi":{"1":3}}"#,
        br#"[{"action":3}]"#,
        br#""action""#,
        br#"{"action":3} x"#,
        br#"{"action":1,"aor":"a","ruid":"r","c":"sip:a@h","expires":18446744073709551616}"#,
        br#"{"action":1,"aor":"a","ruid":"r","c":"sip:a@h","expires":1,"q":-1000}"#,
        br#"{"action":1,"aor":"a","ruid":"r","c":"sip:a@h","expires":1,"q":9223372036854775808}"#,
    ] {
        bodies.push(b.to_vec());
    }
    let mut deep = Vec::new();
    deep.extend_from_slice(br#"{"action":1,"x":"#);
    deep.extend(std::iter::repeat_n(b'[', 200));
    bodies.push(deep);
    let big: serde_json::Map<String, serde_json::Value> = (0..CHANGES_MAX + 1)
        .map(|i| (i.to_string(), serde_json::json!({"action": 0})))
        .collect();
    bodies.push(serde_json::to_vec(&serde_json::json!({ "multi": big })).unwrap());
    for b in &bodies {
        assert_eq!(
            parse_body(b),
            parse_body_values(b),
            "{}",
            String::from_utf8_lossy(b)
        );
    }
}
