//! Keepalive requests built by `Template::render` + `patch`, checked byte
//! by byte and by a strict RFC 3261 request parser written here (not the
//! crate's own reply parser): request line grammar, `name: value` headers,
//! CRLF line ends only, the mandatory headers of §8.1.1 exactly once,
//! CSeq method = request method, Via branch with the magic cookie,
//! Content-Length matching the (empty) body, blank line terminator.

use kaping::wire::template::{
    check_contact, divert_marker, patch, request_uri, to_uri, ContactText, Layout, Template,
    TemplateConfig, TemplateError, CSEQ_WIDTH, PROXY_BRANCH_COOKIE,
};
use kaping::wire::token::TOKEN_LEN;
use kaping::wire::uri::{first_path_hop, is_token, SipUri};
use proptest::prelude::*;

const FILL: u8 = 0xa5;
/// The token alphabet of wire::token: 64 RFC 3261 token characters.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.";

fn token(seed: u64) -> [u8; TOKEN_LEN] {
    let mut t = [0u8; TOKEN_LEN];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in &mut t {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = ALPHABET[(x % 64) as usize];
    }
    t
}

// ---------------------------------------------------------------------------
// A strict RFC 3261 request parser (test oracle).

#[derive(Debug)]
struct Request {
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
}

impl Request {
    /// Values of the header with full name `name` or compact form `compact`.
    fn all(&self, name: &str, compact: Option<&str>) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| {
                n.eq_ignore_ascii_case(name) || compact.is_some_and(|c| n.eq_ignore_ascii_case(c))
            })
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn one(&self, name: &str, compact: Option<&str>) -> Result<&str, String> {
        match self.all(name, compact).as_slice() {
            [v] => Ok(v),
            vs => Err(format!(
                "{name} appears {} times (want exactly 1)",
                vs.len()
            )),
        }
    }

    /// The branch of kaping's own Via: the only one, or the second under
    /// the proxy's when sent as the proxy.
    fn via_branch(&self) -> String {
        let vias = self.all("Via", Some("v"));
        param_of(vias.last().unwrap(), "branch").unwrap()
    }

    fn tag_of_from(&self) -> String {
        param_of(self.one("From", Some("f")).unwrap(), "tag").unwrap()
    }

    fn cseq_number(&self) -> u32 {
        let cseq = self.one("CSeq", None).unwrap();
        cseq.split(' ').next().unwrap().parse().unwrap()
    }
}

/// `;name=value` parameter after the main part of a header value.
fn param_of(value: &str, name: &str) -> Option<String> {
    let after = value.rsplit_once('>').map_or(value, |(_, p)| p);
    after.split(';').skip(1).find_map(|p| {
        let (n, v) = p.split_once('=')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// `name-addr = [ display-name ] LAQUOT addr-spec RAQUOT`; we send no
/// display name. Returns the URI and the parameters after `>`.
fn name_addr(value: &str) -> Result<(&str, &str), String> {
    let rest = value
        .strip_prefix('<')
        .ok_or_else(|| format!("{value:?}: not a <name-addr>"))?;
    let (uri, params) = rest
        .split_once('>')
        .ok_or_else(|| format!("{value:?}: unclosed <"))?;
    SipUri::parse(uri).map_err(|e| format!("{uri:?}: {e}"))?;
    for p in params.split(';').skip(1) {
        let name = p.split_once('=').map_or(p, |(n, _)| n);
        if !is_token(name) {
            return Err(format!("{value:?}: bad parameter {p:?}"));
        }
    }
    if !(params.is_empty() || params.starts_with(';')) {
        return Err(format!("{value:?}: junk after '>'"));
    }
    Ok((uri, params))
}

/// `word` of RFC 3261 §25.1 (Call-ID).
fn is_word(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~()<>:\\\"/[]?{}".contains(&b))
}

fn parse_strict(bytes: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("no blank line ending the header block")?;
    let mut lines = head.split("\r\n");
    for (i, line) in head.split("\r\n").enumerate() {
        if line.contains('\r') || line.contains('\n') {
            return Err(format!("line {i}: bare CR or LF"));
        }
        if line.starts_with([' ', '\t']) {
            return Err(format!("line {i}: folded header line"));
        }
    }

    // Request-Line = Method SP Request-URI SP SIP-Version CRLF (§7.1).
    let line = lines.next().ok_or("empty request")?;
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!(
            "request line {line:?} is not 'Method SP URI SP version'"
        ));
    };
    if !is_token(method) {
        return Err(format!("method {method:?} is not a token"));
    }
    let ruri = SipUri::parse(uri).map_err(|e| format!("Request-URI {uri:?}: {e}"))?;
    if !ruri.headers.is_empty() {
        return Err(format!("Request-URI {uri:?} carries headers (§19.1.1)"));
    }
    if version != "SIP/2.0" {
        return Err(format!("version {version:?}"));
    }

    // message-header = field-name HCOLON field-value CRLF (§7.3.1).
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("header line {line:?} has no ':'"))?;
        let name = name.trim_end_matches([' ', '\t']);
        if !is_token(name) {
            return Err(format!("header name {name:?} is not a token"));
        }
        if value.bytes().any(|b| b != b'\t' && b.is_ascii_control()) {
            return Err(format!("header {name}: control character in value"));
        }
        headers.push((name.to_owned(), value.trim_matches([' ', '\t']).to_owned()));
    }
    let req = Request {
        method: method.to_owned(),
        uri: uri.to_owned(),
        headers,
    };

    // §8.1.1: To, From, CSeq, Call-ID, Max-Forwards, Via; all exactly once
    // here (we send a single Via).
    let to = req.one("To", Some("t"))?;
    let (_, to_params) = name_addr(to)?;
    if param_of(to, "tag").is_some() || to_params.contains("tag=") {
        return Err("To of an out-of-dialog request has a tag".into());
    }
    let from = req.one("From", Some("f"))?;
    name_addr(from)?;
    let tag = param_of(from, "tag").ok_or("From without tag")?;
    if !is_token(&tag) {
        return Err(format!("From tag {tag:?} is not a token"));
    }

    let cseq = req.one("CSeq", None)?;
    let (number, cseq_method) = cseq
        .split_once(' ')
        .ok_or_else(|| format!("CSeq {cseq:?}"))?;
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("CSeq number {number:?} is not 1*DIGIT"));
    }
    let n: u64 = number.parse().map_err(|_| "CSeq number overflows")?;
    if n >= 1 << 31 {
        return Err(format!("CSeq number {n} ≥ 2^31 (§8.1.1.5)"));
    }
    if cseq_method != method {
        return Err(format!("CSeq method {cseq_method:?} != {method:?}"));
    }

    let call_id = req.one("Call-ID", Some("i"))?;
    let ok = match call_id.split_once('@') {
        Some((a, b)) => is_word(a) && is_word(b),
        None => is_word(call_id),
    };
    if !ok {
        return Err(format!("Call-ID {call_id:?} is not word[@word]"));
    }

    let mf = req.one("Max-Forwards", None)?;
    if mf.is_empty() || !mf.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("Max-Forwards {mf:?}"));
    }

    // One Via, or two when sent as the proxy (the proxy's on top).
    let vias = req.all("Via", Some("v"));
    if vias.is_empty() || vias.len() > 2 {
        return Err(format!(
            "{} Via headers (want 1, or 2 sent as the proxy)",
            vias.len()
        ));
    }
    for via in vias {
        let (proto, rest) = via.split_once(' ').ok_or_else(|| format!("Via {via:?}"))?;
        let transport = proto
            .strip_prefix("SIP/2.0/")
            .ok_or_else(|| format!("Via protocol {proto:?}"))?;
        if !is_token(transport) {
            return Err(format!("Via transport {transport:?}"));
        }
        let sent_by = rest.split(';').next().unwrap();
        let (host, port) = sent_by
            .rsplit_once(':')
            .ok_or_else(|| format!("Via sent-by {sent_by:?} without port"))?;
        kaping::wire::uri::parse_host(host).map_err(|e| format!("Via host {host:?}: {e}"))?;
        port.parse::<u16>()
            .map_err(|_| format!("Via port {port:?}"))?;
        for p in rest.split(';').skip(1) {
            let name = p.split_once('=').map_or(p, |(n, _)| n);
            if !is_token(name) {
                return Err(format!("Via parameter {p:?}"));
            }
        }
        let branch = param_of(via, "branch").ok_or("Via without branch")?;
        if !branch.starts_with("z9hG4bK") || !is_token(&branch) {
            return Err(format!("branch {branch:?} (§8.1.1.7)"));
        }
    }

    let cl = req.one("Content-Length", Some("l"))?;
    if cl.parse::<usize>() != Ok(body.len()) {
        return Err(format!(
            "Content-Length {cl:?} but body is {} bytes",
            body.len()
        ));
    }
    for route in req.all("Route", None) {
        let hop = first_path_hop(route).map_err(|e| format!("Route {route:?}: {e}"))?;
        SipUri::parse(hop).map_err(|e| format!("Route hop {hop:?}: {e}"))?;
    }
    Ok(req)
}

// ---------------------------------------------------------------------------
// Helpers.

fn template(cfg: &TemplateConfig) -> Template {
    Template::new(cfg).unwrap_or_else(|e| panic!("{cfg:?}: {e}"))
}

fn cfg(method: &str, local_host: &str) -> TemplateConfig {
    TemplateConfig {
        method: method.to_owned(),
        local_host: local_host.to_owned(),
        local_port: 5060,
        ..TemplateConfig::default()
    }
}

const ALICE: ContactText<'static> = ContactText {
    uri: "sip:alice-0x7fc281c1dd40@192.168.1.20:5060;transport=udp",
    to: "sip:alice@example.com",
    route: None,
};

const BOB_PATH: ContactText<'static> = ContactText {
    uri: "sip:bob@10.0.0.5:5060",
    to: "sip:bob@example.com",
    route: Some("<sip:edge1.example.com;lr;received=sip:198.51.100.77:40332>"),
};

const CAROL_V6: ContactText<'static> = ContactText {
    uri: "sip:alice@[2001:db8::42]:5062",
    to: "sip:alice@example.com",
    route: None,
};

/// Renders into a 0xa5-filled buffer, checks every byte of the request was
/// written and nothing after it, patches, strictly parses, and checks the
/// token and CSeq landed where the layout says.
fn render_patch_parse(
    t: &Template,
    c: &ContactText<'_>,
    tok: &[u8; TOKEN_LEN],
    cseq: u32,
) -> (Vec<u8>, Layout, Request) {
    let mut buf = vec![FILL; 2048];
    let layout = t.render(c, &mut buf).expect("render");
    let len = usize::from(layout.len);
    assert_eq!(len, t.rendered_len(c));
    assert!(!buf[..len].contains(&FILL), "unwritten byte in the request");
    assert!(
        buf[len..].iter().all(|&b| b == FILL),
        "render wrote past Layout::len"
    );
    // Unpatched, the placeholders already make a valid request.
    parse_strict(&buf[..len]).unwrap_or_else(|e| panic!("unpatched: {e}"));

    patch(&mut buf, &layout, tok, cseq);
    assert!(
        buf[len..].iter().all(|&b| b == FILL),
        "patch wrote past len"
    );
    let req = parse_strict(&buf[..len])
        .unwrap_or_else(|e| panic!("{e}\n{}", String::from_utf8_lossy(&buf[..len])));
    let tok_str = std::str::from_utf8(tok).unwrap();
    assert_eq!(req.via_branch(), format!("z9hG4bK{tok_str}"));
    assert_eq!(req.tag_of_from(), tok_str);
    let call_id = req.one("Call-ID", Some("i")).unwrap();
    assert_eq!(call_id.split_once('@').unwrap().0, tok_str);
    assert_eq!(req.cseq_number(), cseq & 0x7fff_ffff);
    let at = |a: u16| usize::from(a);
    assert_eq!(&buf[at(layout.branch_at)..][..TOKEN_LEN], tok);
    assert_eq!(&buf[at(layout.tag_at)..][..TOKEN_LEN], tok);
    assert_eq!(&buf[at(layout.call_id_at)..][..TOKEN_LEN], tok);
    assert_eq!(
        &buf[at(layout.branch_at) - 7..at(layout.branch_at)],
        b"z9hG4bK"
    );
    assert_eq!(&buf[at(layout.proxy_branch_at)..][..TOKEN_LEN], tok);
    let vias = req.all("Via", Some("v"));
    match vias.len() {
        1 => assert_eq!(layout.proxy_branch_at, layout.branch_at),
        2 => assert_eq!(
            param_of(vias[0], "branch").unwrap(),
            format!("z9hG4bK.{tok_str}")
        ),
        n => panic!("{n} Vias"),
    }
    assert_eq!(req.method.as_bytes(), t.method());
    buf.truncate(len);
    (buf, layout, req)
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn options_exact_bytes() {
    let t = template(&cfg("OPTIONS", "198.51.100.10"));
    let tok = *b"AAAAbbbbCCCCdddd0123456789-.";
    let (bytes, _, _) = render_patch_parse(&t, &ALICE, &tok, 42);
    let expected = "OPTIONS sip:alice-0x7fc281c1dd40@192.168.1.20:5060;transport=udp SIP/2.0\r\n\
        Via: SIP/2.0/UDP 198.51.100.10:5060;branch=z9hG4bKAAAAbbbbCCCCdddd0123456789-.;rport\r\n\
        Max-Forwards: 70\r\n\
        From: <sip:kaping@198.51.100.10>;tag=AAAAbbbbCCCCdddd0123456789-.\r\n\
        To: <sip:alice@example.com>\r\n\
        Call-ID: AAAAbbbbCCCCdddd0123456789-.@198.51.100.10\r\n\
        CSeq: 0000000042 OPTIONS\r\n\
        Content-Length: 0\r\n\
        \r\n";
    assert_eq!(String::from_utf8(bytes).unwrap(), expected);
}

#[test]
fn notify_with_route_and_extra_headers_exact_bytes() {
    let mut c = cfg("NOTIFY", "sip.example.net");
    c.from_uri = "sip:keepalive@example.net".to_owned();
    c.local_port = 5080;
    c.transport = "udp".to_owned();
    c.max_forwards = 16;
    c.extra_headers = vec!["User-Agent: kaping/0.1".to_owned(), "X-Ka:\t1 ".to_owned()];
    let t = template(&c);
    let tok = token(7);
    let ts = std::str::from_utf8(&tok).unwrap();
    let (bytes, _, req) = render_patch_parse(&t, &BOB_PATH, &tok, 1_234_567_890);
    let expected = format!(
        "NOTIFY sip:bob@10.0.0.5:5060 SIP/2.0\r\n\
        Via: SIP/2.0/UDP sip.example.net:5080;branch=z9hG4bK{ts};rport\r\n\
        Route: <sip:edge1.example.com;lr;received=sip:198.51.100.77:40332>\r\n\
        Max-Forwards: 16\r\n\
        From: <sip:keepalive@example.net>;tag={ts}\r\n\
        To: <sip:bob@example.com>\r\n\
        Call-ID: {ts}@sip.example.net\r\n\
        CSeq: 1234567890 NOTIFY\r\n\
        Event: keep-alive\r\n\
        User-Agent: kaping/0.1\r\n\
        X-Ka: 1\r\n\
        Content-Length: 0\r\n\
        \r\n"
    );
    assert_eq!(String::from_utf8(bytes).unwrap(), expected);
    assert_eq!(req.one("Event", Some("o")), Ok("keep-alive"));
}

#[test]
fn sent_as_the_proxy_the_proxys_via_goes_on_top_exact_bytes() {
    let mut c = cfg("OPTIONS", "203.0.113.10");
    c.local_port = 5070;
    c.proxy_via = Some(("203.0.113.10".to_owned(), 5060));
    let t = template(&c);
    let tok = *b"AAAAbbbbCCCCdddd0123456789-.";
    let (bytes, layout, _) = render_patch_parse(&t, &BOB_PATH, &tok, 7);
    let expected = "OPTIONS sip:bob@10.0.0.5:5060 SIP/2.0\r\n\
        Via: SIP/2.0/UDP 203.0.113.10:5060;branch=z9hG4bK.AAAAbbbbCCCCdddd0123456789-.;rport\r\n\
        Via: SIP/2.0/UDP 203.0.113.10:5070;branch=z9hG4bKAAAAbbbbCCCCdddd0123456789-.;rport\r\n\
        Route: <sip:edge1.example.com;lr;received=sip:198.51.100.77:40332>\r\n\
        Max-Forwards: 70\r\n\
        From: <sip:kaping@203.0.113.10>;tag=AAAAbbbbCCCCdddd0123456789-.\r\n\
        To: <sip:bob@example.com>\r\n\
        Call-ID: AAAAbbbbCCCCdddd0123456789-.@203.0.113.10\r\n\
        CSeq: 0000000007 OPTIONS\r\n\
        Content-Length: 0\r\n\
        \r\n";
    assert_eq!(String::from_utf8(bytes.clone()).unwrap(), expected);
    // The divert marker (cookie + instance prefix) is at the top, where
    // the divert program looks for it in the reply.
    let marker = divert_marker(b"AAAA");
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap();
    assert_eq!(
        at + PROXY_BRANCH_COOKIE.len(),
        usize::from(layout.proxy_branch_at)
    );
    assert!(at < 100, "marker at {at}");
    // IPv6 proxy addresses are bracketed.
    c.proxy_via = Some(("2001:db8:2::10".to_owned(), 5060));
    c.local_host = "2001:db8:2::10".to_owned();
    let (_, _, req) = render_patch_parse(&template(&c), &CAROL_V6, &token(3), 1);
    assert!(
        req.all("Via", None)[0].starts_with("SIP/2.0/UDP [2001:db8:2::10]:5060;branch=z9hG4bK.")
    );
    // A bad proxy host is refused like a bad local host.
    c.proxy_via = Some(("bad host".to_owned(), 5060));
    assert!(matches!(new_err(&c), TemplateError::LocalHost { .. }));
    c.proxy_via = Some(("203.0.113.10".to_owned(), 0));
    assert_eq!(new_err(&c), TemplateError::LocalPort);
}

#[test]
fn options_carries_no_event() {
    let t = template(&cfg("OPTIONS", "10.0.0.1"));
    let (_, _, req) = render_patch_parse(&t, &BOB_PATH, &token(1), 1);
    assert!(req.all("Event", Some("o")).is_empty());
    assert_eq!(req.all("Route", None).len(), 1);
}

#[test]
fn ipv6_local_host_is_bracketed_in_via_and_call_id() {
    for host in ["2001:db8::10", "[2001:db8::10]", "2001:DB8:0::10"] {
        let t = template(&cfg("OPTIONS", host));
        let tok = token(2);
        let (bytes, _, req) = render_patch_parse(&t, &CAROL_V6, &tok, 9);
        let via = req.one("Via", None).unwrap();
        assert!(
            via.starts_with("SIP/2.0/UDP [2001:db8::10]:5060;branch="),
            "{via}"
        );
        let call_id = req.one("Call-ID", None).unwrap();
        assert!(call_id.ends_with("@[2001:db8::10]"), "{call_id}");
        let from = req.one("From", None).unwrap();
        assert!(
            from.starts_with("<sip:kaping@[2001:db8::10]>;tag="),
            "{from}"
        );
        assert!(String::from_utf8(bytes)
            .unwrap()
            .starts_with("OPTIONS sip:alice@[2001:db8::42]:5062 SIP/2.0\r\n"));
    }
}

#[test]
fn every_shape_passes_the_strict_parser() {
    let hosts = ["127.0.0.1", "::1", "pinger-01.example.org.", "[fe80::1]"];
    let methods = ["OPTIONS", "NOTIFY", "INFO"];
    let extras: [&[&str]; 3] = [
        &[],
        &["User-Agent: kaping"],
        &["A: 1", "B-c.d: x y z", "E:"],
    ];
    let contacts = [
        ALICE,
        BOB_PATH,
        CAROL_V6,
        ContactText {
            uri: "sips:dave@pbx.example.com;transport=tls",
            to: "sips:dave@example.com",
            route: Some("<sip:a.example;lr>,<sip:b.example;lr>"),
        },
        ContactText {
            uri: "sip:%65ve@h;maddr=192.0.2.1",
            to: "sip:eve@example.com;user=phone",
            route: None,
        },
    ];
    let mut n = 0u32;
    for host in hosts {
        for method in methods {
            for extra in extras {
                let mut c = cfg(method, host);
                c.extra_headers = extra.iter().map(|s| s.to_string()).collect();
                let t = template(&c);
                for contact in &contacts {
                    n += 1;
                    let (_, _, req) = render_patch_parse(&t, contact, &token(n.into()), n);
                    assert_eq!(req.method, method);
                    assert_eq!(req.uri, contact.uri);
                    assert_eq!(
                        req.headers.len(),
                        7 + extra.len()
                            + usize::from(contact.route.is_some())
                            + usize::from(method == "NOTIFY")
                    );
                }
            }
        }
    }
}

#[test]
fn r_uri_is_the_contact_without_uri_headers() {
    let t = template(&TemplateConfig::default());
    let contact = "sip:al?ce@192.0.2.4;lr?Subject=x&Priority=urgent";
    let raw = ContactText {
        uri: contact,
        to: "sip:alice@example.com",
        route: None,
    };
    // The raw contact is refused at add time: headers are not allowed in a
    // Request-URI (RFC 3261 §19.1.1); request_uri() is what render takes.
    assert!(matches!(
        check_contact(&raw),
        Err(TemplateError::Contact { field: "uri", .. })
    ));
    let c = ContactText {
        uri: request_uri(contact),
        ..raw
    };
    assert_eq!(check_contact(&c), Ok(()));
    let (_, _, req) = render_patch_parse(&t, &c, &token(3), 3);
    assert_eq!(req.uri, "sip:al?ce@192.0.2.4;lr");
}

#[test]
fn patching_twice_leaves_no_stale_bytes() {
    let t = template(&cfg("OPTIONS", "10.1.1.1"));
    let mut buf = vec![FILL; 1024];
    let layout = t.render(&BOB_PATH, &mut buf).unwrap();
    patch(&mut buf, &layout, &token(10), 4_000_000_000);
    patch(&mut buf, &layout, &token(11), 5);

    let mut fresh = vec![FILL; 1024];
    let layout2 = t.render(&BOB_PATH, &mut fresh).unwrap();
    assert_eq!(layout, layout2);
    patch(&mut fresh, &layout2, &token(11), 5);
    assert_eq!(buf, fresh);
    let len = usize::from(layout.len);
    let text = String::from_utf8(buf[..len].to_vec()).unwrap();
    assert!(!text.contains(std::str::from_utf8(&token(10)).unwrap()));
    assert!(text.contains("CSeq: 0000000005 OPTIONS\r\n"));
}

#[test]
fn cseq_stays_below_2_pow_31() {
    let t = template(&TemplateConfig::default());
    for (cseq, text) in [
        (0u32, "0000000000"),
        (1, "0000000001"),
        (0x7fff_ffff, "2147483647"),
        (0x8000_0000, "0000000000"),
        (u32::MAX, "2147483647"),
    ] {
        let (bytes, layout, _) = render_patch_parse(&t, &ALICE, &token(4), cseq);
        let at = usize::from(layout.cseq_at);
        assert_eq!(&bytes[at..at + CSEQ_WIDTH], text.as_bytes());
    }
}

#[test]
fn short_buffer_is_too_long_and_untouched() {
    let t = template(&TemplateConfig::default());
    let need = t.rendered_len(&BOB_PATH);
    let mut buf = vec![FILL; need - 1];
    assert_eq!(
        t.render(&BOB_PATH, &mut buf),
        Err(TemplateError::TooLong {
            needed: need,
            have: need - 1
        })
    );
    assert!(buf.iter().all(|&b| b == FILL));
    let mut exact = vec![FILL; need];
    assert_eq!(
        usize::from(t.render(&BOB_PATH, &mut exact).unwrap().len),
        need
    );
}

#[test]
#[should_panic(expected = "does not fit")]
fn patch_refuses_a_layout_from_another_buffer() {
    let t = template(&TemplateConfig::default());
    let mut buf = vec![FILL; 1024];
    let layout = t.render(&BOB_PATH, &mut buf).unwrap();
    let mut short = vec![0u8; usize::from(layout.len) - 1];
    patch(&mut short, &layout, &token(1), 1);
}

#[test]
fn method_is_reported_for_reply_matching() {
    assert_eq!(template(&TemplateConfig::default()).method(), b"OPTIONS");
    assert_eq!(template(&cfg("NOTIFY", "h")).method(), b"NOTIFY");
}

fn new_err(c: &TemplateConfig) -> TemplateError {
    Template::new(c).expect_err(&format!("{c:?} must be refused"))
}

#[test]
fn injection_in_extra_headers_is_refused() {
    let bad = [
        "X-A: a\r\nVia: SIP/2.0/UDP evil",
        "X-A: a\nB: c",
        "X-A: a\rB: c",
        "X-A\r\n: y",
        "X-A: \0",
        "Bad Name: x",
        "Bad\tName: x",
        ": nameless",
        "no colon at all",
        " X-A: leading space",
        "Via: SIP/2.0/UDP 1.2.3.4",
        "call-id: dup",
        "i: dup",
        "Content-Length: 5",
        "l: 5",
        "CSeq: 1 OPTIONS",
        "Max-Forwards: 1",
        "To: <sip:x@y>",
        "f: <sip:x@y>",
        "Tö: umlaut",
    ];
    for line in bad {
        let c = TemplateConfig {
            extra_headers: vec!["User-Agent: ok".to_owned(), line.to_owned()],
            ..TemplateConfig::default()
        };
        match new_err(&c) {
            TemplateError::ExtraHeader { index: 1, .. } => {}
            e => panic!("{line:?}: {e}"),
        }
    }
    let mut c = cfg("NOTIFY", "h");
    c.extra_headers = vec!["Event: presence".to_owned()];
    assert!(matches!(new_err(&c), TemplateError::ExtraHeader { .. }));
    let e = new_err(&TemplateConfig {
        extra_headers: vec!["X: a\r\nY: b".to_owned()],
        ..TemplateConfig::default()
    });
    assert_eq!(
        e.to_string(),
        "extra header 0 (\"X: a\\r\\nY: b\"): contains CR or LF (header injection)"
    );
}

#[test]
fn injection_in_method_from_host_transport_is_refused() {
    for method in [
        "OPT\r\nIONS",
        "OPTIONS ",
        "",
        "OPTIONS\r\nVia: x",
        "OPT:IONS",
    ] {
        assert!(
            matches!(new_err(&cfg(method, "h")), TemplateError::Method(_)),
            "{method:?}"
        );
    }
    for method in ["ACK", "CANCEL", "INVITE"] {
        assert!(matches!(
            new_err(&cfg(method, "h")),
            TemplateError::MethodUnsuitable { .. }
        ));
    }
    for from in [
        "sip:a@b>\r\nX: y",
        "sip:a@b\r\n",
        "<sip:a@b>",
        "alice@example.com",
        "sip:a@b c",
    ] {
        let c = TemplateConfig {
            from_uri: from.to_owned(),
            ..TemplateConfig::default()
        };
        assert!(
            matches!(new_err(&c), TemplateError::FromUri { .. }),
            "{from:?}"
        );
    }
    let c = TemplateConfig {
        from_uri: "sip:a@b?Route=x".to_owned(),
        ..TemplateConfig::default()
    };
    assert!(matches!(new_err(&c), TemplateError::FromHeaders(_)));
    for host in ["1.2.3.4\r\nX: y", "", "host_name", "1.2.3.4:5060", "a b"] {
        assert!(
            matches!(
                new_err(&cfg("OPTIONS", host)),
                TemplateError::LocalHost { .. }
            ),
            "{host:?}"
        );
    }
    let mut c = TemplateConfig {
        transport: "UDP\r\n".to_owned(),
        ..TemplateConfig::default()
    };
    assert!(matches!(new_err(&c), TemplateError::Transport(_)));
    c.transport = "UDP".to_owned();
    c.local_port = 0;
    assert_eq!(new_err(&c), TemplateError::LocalPort);
}

#[test]
fn check_contact_guards_render() {
    assert_eq!(check_contact(&ALICE), Ok(()));
    assert_eq!(check_contact(&BOB_PATH), Ok(()));
    let bad = [
        ContactText {
            uri: "sip:a@b\r\nX: y",
            ..ALICE
        },
        ContactText {
            to: "sip:a@b>\r\nX: y",
            ..ALICE
        },
        ContactText {
            to: "sip:a@b?h=v",
            ..ALICE
        },
        ContactText {
            route: Some("<sip:e;lr>\r\nVia: x"),
            ..ALICE
        },
        ContactText {
            route: Some("sip:e;lr"),
            ..ALICE
        },
        ContactText {
            route: Some("<sip:e_x;lr>"),
            ..ALICE
        },
    ];
    for c in bad {
        assert!(
            matches!(check_contact(&c), Err(TemplateError::Contact { .. })),
            "{c:?}"
        );
    }
}

#[test]
fn aor_to_uri_like_kamailio_ka_domain() {
    assert_eq!(
        to_uri("alice", Some("example.com")).unwrap(),
        "sip:alice@example.com"
    );
    assert_eq!(
        to_uri("bob@x", Some("ignored.example")).unwrap(),
        "sip:bob@x"
    );
    assert_eq!(
        to_uri("bob@example.com", None).unwrap(),
        "sip:bob@example.com"
    );
    assert_eq!(
        to_uri("sip:carol@example.com", None).unwrap(),
        "sip:carol@example.com"
    );
    assert_eq!(
        to_uri("SIPS:dave@example.com:5061", None).unwrap(),
        "SIPS:dave@example.com:5061"
    );
    assert_eq!(
        to_uri("+4930123", Some("gw.example")).unwrap(),
        "sip:+4930123@gw.example"
    );
    for (aor, domain) in [
        ("alice", None),
        ("alice", Some("")),
        ("tel:+4930123", Some("example.com")),
        ("alice smith", Some("example.com")),
        ("alice", Some("exa mple.com")),
        ("@example.com", None),
        ("sip:carol@example.com?h=v", None),
        ("sip:", None),
        ("", Some("example.com")),
    ] {
        assert!(to_uri(aor, domain).is_err(), "{aor:?} {domain:?}");
    }
    let e = to_uri("alice", None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "AoR \"alice\": has no domain and no default domain is set"
    );
}

// ---------------------------------------------------------------------------
// Properties.

fn any_token() -> impl Strategy<Value = [u8; TOKEN_LEN]> {
    proptest::array::uniform28(proptest::sample::select(ALPHABET.to_vec()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Whatever the configuration strings, a template is either refused or
    /// renders requests the strict parser accepts with exactly the headers
    /// we expect: no injected line can survive validation.
    #[test]
    fn configuration_either_refused_or_wellformed(
        // Each field is valid three times in four, so that both refusals
        // and accepted templates are exercised (about a third accepted).
        method in prop_oneof![3 => "OPTIONS|NOTIFY|PING", 1 => "[A-Z\r\n :]{1,8}"],
        from in prop_oneof![3 => "sip:[a-z]{1,5}@[a-z]{1,5}\\.example", 1 => "sip:[a-z@.\r\n<> ]{1,12}"],
        host in prop_oneof![3 => "[a-z]{1,5}\\.example|10\\.[0-9]\\.0\\.1|::[0-9]", 1 => "[a-z0-9.:\\[\\]\r\n ]{1,12}"],
        extra in proptest::collection::vec(
            prop_oneof![3 => "X-[A-Za-z]{1,6}: [ -~]{0,12}", 1 => "[A-Za-z\\-: \t\r\n]{0,12}"],
            0..3,
        ),
        tok in any_token(),
        cseq in any::<u32>(),
    ) {
        let c = TemplateConfig {
            method,
            from_uri: from,
            local_host: host,
            extra_headers: extra.clone(),
            ..TemplateConfig::default()
        };
        if let Ok(t) = Template::new(&c) {
            let (_, _, req) = render_patch_parse(&t, &BOB_PATH, &tok, cseq);
            prop_assert_eq!(
                req.headers.len(),
                8 + extra.len() + usize::from(c.method == "NOTIFY")
            );
        }
    }

    #[test]
    fn any_token_and_cseq_patch_cleanly(
        tok1 in any_token(), tok2 in any_token(), c1 in any::<u32>(), c2 in any::<u32>()
    ) {
        let t = Template::new(&TemplateConfig::default()).unwrap();
        let mut buf = vec![FILL; 1024];
        let layout = t.render(&ALICE, &mut buf).unwrap();
        patch(&mut buf, &layout, &tok1, c1);
        patch(&mut buf, &layout, &tok2, c2);
        let (fresh, _, _) = render_patch_parse(&t, &ALICE, &tok2, c2);
        prop_assert_eq!(&buf[..fresh.len()], &fresh[..]);
    }
}
