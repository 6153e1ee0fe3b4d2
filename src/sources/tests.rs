use super::*;
use crate::contact::Resolver;
use std::net::SocketAddr;

fn write(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

/// Loads `path` with a sink that resolves destinations as the daemon does.
fn load_all(path: &Path, format: Format) -> (LoadReport, Vec<(ContactSpec, SocketAddr)>) {
    let mut resolver = Resolver::default();
    let mut got = Vec::new();
    let report = load(path, format, |spec| match spec.destination(&mut resolver) {
        Ok(addr) => {
            got.push((spec, addr));
            Verdict::Loaded
        }
        Err(e) => Verdict::Skip(e.to_string()),
    })
    .unwrap();
    (report, got)
}

#[test]
fn plain_lines_with_comments_destinations_and_errors() {
    let f = write(
        "# pinged by kaping\n\
         sip:alice@127.0.0.2:5060\n\
         \n\
         sip:bob@example.invalid 127.0.0.3:5070   # NATed, address known\r\n\
         sip:carol@127.0.0.4:99999\n\
         sip:dave@127.0.0.5 not-an-address\n\
         sip:erin@[::1]:5062\n\
         sip:frank@127.0.0.6 127.0.0.6:5060 extra\n",
    );
    let (report, got) = load_all(f.path(), Format::Auto);
    assert_eq!(report.format, Some(Format::Lines));
    assert_eq!(
        (report.loaded, report.skipped),
        (3, 3),
        "{:?}",
        report.problems
    );
    let p = f.path().display().to_string();
    assert!(
        report.problems[0].starts_with(&format!("{p}:5: contact URI:")),
        "{}",
        report.problems[0]
    );
    assert!(report.problems[1].starts_with(&format!("{p}:6: destination 'not-an-address'")));
    assert!(report.problems[2].starts_with(&format!("{p}:8: unexpected 'extra'")));
    assert_eq!(got[1].1, "127.0.0.3:5070".parse().unwrap());
    assert_eq!(got[2].1, "[::1]:5062".parse().unwrap());
    assert_eq!(
        report.to_string(),
        format!("{p}: 3 contacts loaded, 3 skipped")
    );
}

#[test]
fn json_lines_with_every_field() {
    let f = write(concat!(
        r#"{"uri":"sip:alice@127.0.0.2","aor":"alice@example.com","interval":15}"#,
        "\n",
        r#"{"uri":"sip:bob@10.9.9.9","received":"sip:127.0.0.3:41022","interval":"500ms","ruid":"r-1"}"#,
        "\n",
        r#"{"uri":"sip:carol@10.9.9.9","path":"<sip:127.0.0.4:5080;lr>","socket":"udp:127.0.0.1:5060"}"#,
        "\n",
        r#"{"uri":"sip:dan@10.9.9.9","send_to":"127.0.0.5:5999","received":"[not set]"}"#,
        "\n",
        r#"{"uri":"sip:erin@127.0.0.2","recieved":"sip:127.0.0.9"}"#,
        "\n",
        r#"{"uri":"sip:fay@127.0.0.2","interval":-3}"#,
        "\n",
        r#"{"uri":"sip:gus@127.0.0.2","interval":"3 fortnights"}"#,
        "\n",
        "{not json\n",
    ));
    let (report, got) = load_all(f.path(), Format::Auto);
    assert_eq!(report.format, Some(Format::Jsonl));
    assert_eq!(
        (report.loaded, report.skipped),
        (4, 4),
        "{:?}",
        report.problems
    );
    let dest: Vec<String> = got.iter().map(|(_, a)| a.to_string()).collect();
    assert_eq!(
        dest,
        [
            "127.0.0.2:5060",
            "127.0.0.3:41022",
            "127.0.0.4:5080",
            "127.0.0.5:5999"
        ]
    );
    assert_eq!(got[0].0.interval, Some(std::time::Duration::from_secs(15)));
    assert_eq!(
        got[1].0.interval,
        Some(std::time::Duration::from_millis(500))
    );
    assert_eq!(got[0].0.aor.as_deref(), Some("alice@example.com"));
    assert_eq!(got[1].0.ruid.as_deref(), Some("r-1"));
    assert_eq!(got[2].0.socket.as_deref(), Some("udp:127.0.0.1:5060"));
    assert_eq!(got[3].0.received, None, "[not set] means absent");
    assert!(
        report.problems[0].contains(":5: bad JSON: unknown field `recieved`"),
        "{}",
        report.problems[0]
    );
    assert!(
        report.problems[1].contains(":6: interval -3 is not a positive"),
        "{}",
        report.problems[1]
    );
    assert!(
        report.problems[2].contains(":7: interval: unknown unit"),
        "{}",
        report.problems[2]
    );
    assert!(
        report.problems[3].contains(":8: bad JSON"),
        "{}",
        report.problems[3]
    );
}

#[test]
fn kamailio_ul_dump_sample() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kamailio-ul-dump.json");
    let (report, got) = load_all(&path, Format::Auto);
    assert_eq!(report.format, Some(Format::UlDump));
    // alice over UDP (received set), alice over IPv6, bob behind a Path with
    // received=, bob over TLS (skipped: not pingable over UDP yet).
    assert_eq!(
        (report.loaded, report.skipped),
        (3, 1),
        "{:?}",
        report.problems
    );
    assert!(
        report.problems[0].contains("AoR 'bob@example.com' contact #2 (uloc-5e831144-158a-4)")
            && report.problems[0].contains("not supported"),
        "{}",
        report.problems[0]
    );
    let by_uri = |u: &str| got.iter().find(|(s, _)| s.uri.starts_with(u)).unwrap();
    let (alice, to) = by_uri("sip:alice-0x7fc281c1dd40@");
    assert_eq!(*to, "203.0.113.7:41022".parse().unwrap(), "received wins");
    assert_eq!(alice.aor.as_deref(), Some("alice"));
    assert_eq!(alice.socket.as_deref(), Some("udp:198.51.100.10:5060"));
    assert_eq!(alice.path, None);
    let (_, to) = by_uri("sip:alice@[2001:db8::42]");
    assert_eq!(*to, "[2001:db8::42]:5062".parse().unwrap());
    let (bob, to) = by_uri("sip:bob@10.0.0.5");
    assert_eq!(
        *to,
        "198.51.100.77:40332".parse().unwrap(),
        "Path hop's received="
    );
    assert!(bob
        .path
        .as_deref()
        .unwrap()
        .starts_with("<sip:edge1.example.com"));
}

#[test]
fn ul_dump_that_is_not_one_is_refused_whole() {
    let f = write(r#"{"jsonrpc":"2.0","error":{"code":500,"message":"No usrloc"},"id":1}"#);
    let err = load(f.path(), Format::UlDump, |_| Verdict::Loaded).unwrap_err();
    assert!(err.to_string().contains("RPC reply is an error"), "{err}");
    let f = write(r#"{"jsonrpc":"2.0","result":{"Domains":[{"Domain":{"AoRs":[{"Info":{}}]}}]}}"#);
    let err = load(f.path(), Format::UlDump, |_| Verdict::Loaded).unwrap_err();
    assert!(err.to_string().contains("missing field `AoR`"), "{err}");
}

#[test]
fn a_stopping_sink_ends_the_load_and_says_why() {
    let f = write("sip:a@127.0.0.2\nsip:b@127.0.0.3\nsip:c@127.0.0.4\n");
    let mut n = 0;
    let report = load(f.path(), Format::Lines, |_| {
        n += 1;
        if n == 2 {
            Verdict::Stop("contact slab full (capacity 1)".into())
        } else {
            Verdict::Loaded
        }
    })
    .unwrap();
    assert_eq!((report.loaded, report.skipped, n), (1, 1, 2));
    assert!(report
        .to_string()
        .ends_with("stopped: contact slab full (capacity 1)"));
}

#[test]
fn missing_file_names_the_path() {
    let err = load(Path::new("/nonexistent/contacts.txt"), Format::Auto, |_| {
        Verdict::Loaded
    })
    .unwrap_err();
    assert!(
        err.to_string().starts_with("/nonexistent/contacts.txt: "),
        "{err}"
    );
}

#[test]
fn json_lines_carry_the_source_and_keepalive_of_each_contact() {
    use crate::contact::{KeepaliveKind, PingSource};
    let f = write(concat!(
        r#"{"uri":"sip:a@127.0.0.2","source":"203.0.113.10:5060","keepalive":"null"}"#,
        "\n",
        r#"{"uri":"sip:b@127.0.0.2","source":"socket","socket":"udp:203.0.113.10:5060"}"#,
        "\n",
        r#"{"uri":"sip:c@127.0.0.2","source":"bind","keepalive":"crlf"}"#,
        "\n",
        r#"{"uri":"sip:d@127.0.0.2","source":"somewhere"}"#,
        "\n",
        r#"{"uri":"sip:e@127.0.0.2","keepalive":"stun"}"#,
        "\n",
    ));
    let (report, got) = load_all(f.path(), Format::Jsonl);
    assert_eq!(
        (report.loaded, report.skipped),
        (3, 2),
        "{:?}",
        report.problems
    );
    assert_eq!(
        got[0].0.source,
        Some(PingSource::Addr("203.0.113.10:5060".parse().unwrap()))
    );
    assert_eq!(got[0].0.keepalive, Some(KeepaliveKind::Null));
    assert_eq!(got[1].0.source, Some(PingSource::Socket));
    assert_eq!(got[1].0.keepalive, None);
    assert_eq!(
        (got[2].0.source, got[2].0.keepalive),
        (Some(PingSource::Bind), Some(KeepaliveKind::Crlf))
    );
    assert!(
        report.problems[0].contains(":4: source: socket 'somewhere'"),
        "{}",
        report.problems[0]
    );
    assert!(
        report.problems[1].contains(":5: keepalive: 'stun' is not one of"),
        "{}",
        report.problems[1]
    );
}
