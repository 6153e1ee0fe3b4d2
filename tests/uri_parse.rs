//! SIP URI parsing (RFC 3261 §19.1, §25.1) and keepalive destinations in
//! Kamailio's order, against the shapes of a real `ul.dump`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use kaping::wire::uri::{
    destination, destination_of, first_path_hop, parse_host, Destination, Host, Scheme, SipUri,
    Target, Transport, UriError, UriErrorKind, UriPart,
};
use proptest::prelude::*;

fn parse(s: &str) -> SipUri<'_> {
    SipUri::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
}

fn v4(s: &str) -> Host<'static> {
    Host::V4(s.parse().unwrap())
}

fn v6(s: &str) -> Host<'static> {
    Host::V6(s.parse().unwrap())
}

#[test]
fn plain_user_at_hostname() {
    let u = parse("sip:alice@example.com");
    assert_eq!(u.scheme, Scheme::Sip);
    assert_eq!(u.user, Some("alice"));
    assert_eq!(u.host, Host::Name("example.com"));
    assert_eq!(u.port, None);
    assert_eq!((u.params, u.headers), ("", ""));
    assert_eq!(u.transport(), Transport::Udp);
    assert_eq!(u.port_or_default(), 5060);
}

#[test]
fn scheme_is_case_insensitive_and_host_case_is_kept() {
    let u = parse("SIP:Alice@Example.COM:5070");
    assert_eq!(u.scheme, Scheme::Sip);
    assert_eq!(u.user, Some("Alice"));
    assert_eq!(u.host, Host::Name("Example.COM"));
    assert_eq!(u.port, Some(5070));
    assert_eq!(parse("SiPs:h").scheme, Scheme::Sips);
}

#[test]
fn sips_defaults_to_tls_and_5061() {
    let u = parse("sips:bob@10.0.0.1");
    assert_eq!(u.scheme, Scheme::Sips);
    assert_eq!(u.host, v4("10.0.0.1"));
    assert_eq!(u.transport(), Transport::Tls);
    assert_eq!(u.port_or_default(), 5061);
    assert_eq!(parse("sips:bob@10.0.0.1:6000").port_or_default(), 6000);
}

#[test]
fn transport_tls_on_sip_defaults_to_5061() {
    let u = parse("sip:bob@10.0.0.6;transport=tls");
    assert_eq!(u.transport(), Transport::Tls);
    assert_eq!(u.port_or_default(), 5061);
    assert_eq!(parse("sip:h;transport=TLS").port_or_default(), 5061);
    assert_eq!(parse("sip:h;transport=tcp").port_or_default(), 5060);
}

#[test]
fn transports_in_any_case() {
    let cases = [
        ("sip:h;transport=TCP", Transport::Tcp),
        ("sip:h;Transport=Udp", Transport::Udp),
        ("sip:h;TRANSPORT=sctp", Transport::Sctp),
        ("sip:h;transport=ws", Transport::Ws),
        ("sip:h;transport=WSS", Transport::Wss),
        ("sip:h;transport=tls", Transport::Tls),
        ("sip:h;transport=quic", Transport::Other),
        ("sips:h;transport=tcp", Transport::Tcp),
        ("sip:h;transport", Transport::Udp),
    ];
    for (s, t) in cases {
        assert_eq!(parse(s).transport(), t, "{s}");
    }
}

#[test]
fn ipv6_with_and_without_port() {
    let u = parse("sip:alice@[2001:db8::42]:5062");
    assert_eq!(u.host, v6("2001:db8::42"));
    assert_eq!(u.port, Some(5062));
    let u = parse("sip:[2001:db8::42]");
    assert_eq!(u.host, v6("2001:db8::42"));
    assert_eq!((u.user, u.port, u.port_or_default()), (None, None, 5060));
    let u = parse("sip:[::ffff:192.0.2.1];transport=udp");
    assert_eq!(u.host, v6("::ffff:192.0.2.1"));
    assert_eq!(u.params, ";transport=udp");
    assert_eq!(parse("sips:[::1]:5061").host, v6("::1"));
}

#[test]
fn ipv4_forms() {
    assert_eq!(parse("sip:1.2.3.4:65535").host, v4("1.2.3.4"));
    assert_eq!(parse("sip:1.2.3.4:65535").port, Some(65535));
    assert_eq!(parse("sip:255.255.255.255").host, v4("255.255.255.255"));
    // Leading zeros are decimal in the RFC 3261 grammar (1*3DIGIT).
    assert_eq!(parse("sip:001.002.010.004").host, v4("1.2.10.4"));
}

#[test]
fn hostname_forms() {
    assert_eq!(parse("sip:x").host, Host::Name("x"));
    assert_eq!(parse("sip:a1-b.c-d").host, Host::Name("a1-b.c-d"));
    assert_eq!(
        parse("sip:proxy.example.com.").host,
        Host::Name("proxy.example.com.")
    );
    assert_eq!(parse("sip:9a.example").host, Host::Name("9a.example"));
    assert_eq!(
        parse("sip:alice@pbx-01.EU.example.net:5080;lr").host,
        Host::Name("pbx-01.EU.example.net")
    );
}

#[test]
fn user_with_escapes_and_user_unreserved() {
    let u = parse("sip:%61lice%20smith@host");
    assert_eq!(u.user, Some("%61lice%20smith"));
    let u = parse("sip:+1-212-555-1212;phone-context=+1@gw.example.com;user=phone");
    assert_eq!(u.user, Some("+1-212-555-1212;phone-context=+1"));
    assert_eq!(u.host, Host::Name("gw.example.com"));
    assert_eq!(u.param("user"), Some(Some("phone")));
    let u = parse("sip:a&b=c+d$e,f?g/h-_.!~*'()@host");
    assert_eq!(u.user, Some("a&b=c+d$e,f?g/h-_.!~*'()"));
}

#[test]
fn password_is_accepted_and_dropped() {
    let u = parse("sip:alice:s%65cret&=+$,@host:5060");
    assert_eq!(u.user, Some("alice"));
    assert_eq!(u.port, Some(5060));
    assert_eq!(u.to_string(), "sip:alice@host:5060");
    assert_eq!(parse("sip:alice:@host").user, Some("alice"));
}

#[test]
fn params_are_raw_and_case_insensitive_by_name() {
    let u = parse("sip:a@h;LR;Transport=TCP;maddr=239.255.255.1;ttl=15;x=%41");
    assert_eq!(
        u.params,
        ";LR;Transport=TCP;maddr=239.255.255.1;ttl=15;x=%41"
    );
    assert_eq!(u.param("lr"), Some(None));
    assert_eq!(u.param("transport"), Some(Some("TCP")));
    assert_eq!(u.param("TRANSPORT"), Some(Some("TCP")));
    assert_eq!(u.param("maddr"), Some(Some("239.255.255.1")));
    assert_eq!(u.param("x"), Some(Some("%41")));
    assert_eq!(u.param("ttl"), Some(Some("15")));
    assert_eq!(u.param("t"), None);
    assert_eq!(u.param("l"), None);
    assert_eq!(u.transport(), Transport::Tcp);
    // First occurrence wins.
    assert_eq!(
        parse("sip:h;transport=tcp;transport=udp").transport(),
        Transport::Tcp
    );
}

#[test]
fn param_values_may_hold_uris_with_colons_and_brackets() {
    let u = parse("sip:edge1.example.com;lr;received=sip:198.51.100.77:40332");
    assert_eq!(u.param("received"), Some(Some("sip:198.51.100.77:40332")));
    let u = parse("sip:edge;received=sip:[2001:db8::1]:5060");
    assert_eq!(u.param("received"), Some(Some("sip:[2001:db8::1]:5060")));
}

#[test]
fn headers_are_raw() {
    let u = parse("sip:alice@host?subject=project%20x&priority=urgent");
    assert_eq!(u.headers, "?subject=project%20x&priority=urgent");
    assert_eq!(u.params, "");
    let u = parse("sip:alice@host;lr?h=");
    assert_eq!((u.params, u.headers), (";lr", "?h="));
}

#[test]
fn kamailio_dump_contacts_parse() {
    let u = parse("sip:alice-0x7fc281c1dd40@192.168.1.20:5060;transport=udp");
    assert_eq!(u.user, Some("alice-0x7fc281c1dd40"));
    assert_eq!(u.host, v4("192.168.1.20"));
    assert_eq!(u.port, Some(5060));
    assert_eq!(u.transport(), Transport::Udp);
    let u = parse("sip:bob@10.0.0.6:5061;transport=tls");
    assert_eq!((u.port_or_default(), u.transport()), (5061, Transport::Tls));
}

#[test]
fn display_writes_rfc_form() {
    let s = "SIPS:u@[2001:DB8::1]:5061;lr?a=b";
    assert_eq!(parse(s).to_string(), "sips:u@[2001:db8::1]:5061;lr?a=b");
    assert_eq!(parse("sip:h").to_string(), "sip:h");
}

#[test]
fn host_alone() {
    assert_eq!(parse_host("10.1.2.3"), Ok(v4("10.1.2.3")));
    assert_eq!(parse_host("[::1]"), Ok(v6("::1")));
    assert_eq!(
        parse_host("sip.example.org"),
        Ok(Host::Name("sip.example.org"))
    );
    assert_eq!(parse_host("::1").unwrap_err().kind, UriErrorKind::Ipv6Bare);
    assert_eq!(
        parse_host("h:5060"),
        Err(UriError {
            kind: UriErrorKind::Trailing,
            at: 1
        })
    );
    assert_eq!(parse_host("").unwrap_err().kind, UriErrorKind::HostEmpty);
}

/// Each malformed URI: the kind of error and the byte it points at.
const MALFORMED: &[(&str, UriErrorKind, usize)] = {
    use UriErrorKind::*;
    &[
        ("", Empty, 0),
        ("http://example.com", Scheme, 0),
        ("sip", Scheme, 0),
        ("tel:+1234", Scheme, 0),
        (" sip:host", Scheme, 0),
        ("sip:@host", UserEmpty, 4),
        ("sip::pw@host", UserEmpty, 4),
        ("sip:al ice@host", UserChar, 6),
        ("sip:al<ice@host", UserChar, 6),
        ("sip:al%4@host", Escape, 6),
        ("sip:al%zz@host", Escape, 6),
        ("sip:alice%@h", Escape, 9),
        ("sip:alice:p<w@host", PasswordChar, 11),
        ("sip:", HostEmpty, 4),
        ("sip:alice@", HostEmpty, 10),
        ("sip:alice@;lr", HostEmpty, 10),
        ("sip::5060", HostEmpty, 4),
        ("sip:exa_mple.com", HostChar, 7),
        ("sip:host]", HostChar, 8),
        ("sips:host\r\n", HostChar, 9),
        ("sip:alice@host@other", HostChar, 14),
        ("sip:example..com", HostLabel, 12),
        ("sip:.example.com", HostLabel, 4),
        ("sip:-example.com", HostLabel, 4),
        ("sip:example-.com", HostLabel, 11),
        ("sip:example.123", TopLabel, 12),
        ("sip:example.-com", HostLabel, 12),
        ("sip:1.2.3.256", Ipv4, 10),
        ("sip:1.2.3", Ipv4, 9),
        ("sip:1.2.3.4.5", Ipv4, 11),
        ("sip:1.2.3.4.", Ipv4, 11),
        ("sip:1..3.4", Ipv4, 6),
        ("sip:1.2.3.0004", Ipv4, 10),
        ("sip:[2001:db8::1", Ipv6Unclosed, 4),
        ("sip:[2001:db8:::1]", Ipv6, 5),
        ("sip:[1.2.3.4]", Ipv6, 5),
        ("sip:[]", Ipv6, 5),
        ("sip:2001:db8::1", Ipv6Bare, 4),
        ("sip:::1", Ipv6Bare, 4),
        ("sip:u@fe80::1:5060;lr", Ipv6Bare, 6),
        ("sip:host:", PortEmpty, 9),
        ("sip:host:;lr", PortEmpty, 9),
        ("sip:host:5x60", PortChar, 10),
        ("sip:host:-1", PortChar, 9),
        ("sip:host:5060x", PortChar, 13),
        ("sip:host:0", PortZero, 9),
        ("sip:host:00000", PortZero, 9),
        ("sip:host:65536", PortRange, 9),
        ("sip:host:99999999999999999999", PortRange, 9),
        ("sip:host;", ParamNameEmpty, 9),
        ("sip:host;=udp", ParamNameEmpty, 9),
        ("sip:host;a=b;;c", ParamNameEmpty, 13),
        ("sip:host;transport=", ParamValueEmpty, 19),
        ("sip:host;trans port=udp", ParamChar, 14),
        ("sip:host;a=b\"c", ParamChar, 12),
        ("sip:host;a=%g0", Escape, 11),
        ("sip:host?", HeaderNameEmpty, 9),
        ("sip:host?=x", HeaderNameEmpty, 9),
        ("sip:host?a=b&", HeaderNameEmpty, 13),
        ("sip:host?subject", HeaderValueMissing, 16),
        ("sip:host?a=b c", HeaderChar, 12),
        ("sip:host?a=b;c", HeaderChar, 12),
        ("sip:[::1]x", Trailing, 9),
        ("sip:[::1]]", Trailing, 9),
    ]
};

#[test]
fn malformed_uris_report_kind_and_offset() {
    assert!(MALFORMED.len() >= 20);
    for &(s, kind, at) in MALFORMED {
        let e = SipUri::parse(s).expect_err(s);
        assert_eq!(e, UriError { kind, at }, "{s:?}: got '{e}'");
        assert!(at <= s.len(), "{s:?}");
    }
}

#[test]
fn error_display_says_what_and_where() {
    let e = SipUri::parse("sip:alice@192.0.2.1:70000").unwrap_err();
    assert_eq!(e.to_string(), "port out of range (1..=65535) at byte 20");
    let e = SipUri::parse("sip:host:0").unwrap_err();
    assert_eq!(e.to_string(), "port 0 is not a usable port at byte 9");
    let e = SipUri::parse("sip:2001:db8::1").unwrap_err();
    assert_eq!(
        e.to_string(),
        "IPv6 address must be enclosed in '[' ']' at byte 4"
    );
}

// ---------------------------------------------------------------------------
// Path hops and destinations.

#[test]
fn first_hop_of_path_values() {
    let p = "<sip:edge1.example.com;lr;received=sip:198.51.100.77:40332>";
    assert_eq!(
        first_path_hop(p),
        Ok("sip:edge1.example.com;lr;received=sip:198.51.100.77:40332")
    );
    assert_eq!(
        first_path_hop("<sip:a.example;lr>,<sip:b.example;lr>"),
        Ok("sip:a.example;lr")
    );
    assert_eq!(
        first_path_hop("\"Edge <1>, \\\"EU\\\"\" <sip:e;lr>;x=y"),
        Ok("sip:e;lr")
    );
    assert_eq!(first_path_hop("Edge <sip:e>"), Ok("sip:e"));
    let e = first_path_hop("sip:edge;lr").unwrap_err();
    assert_eq!((e.kind, e.at), (UriErrorKind::PathNoHop, 11));
    let e = first_path_hop("  <sip:edge;lr").unwrap_err();
    assert_eq!((e.kind, e.at), (UriErrorKind::PathUnclosed, 2));
    let e = first_path_hop("\"<sip:x>\"").unwrap_err();
    assert_eq!(e.kind, UriErrorKind::PathNoHop);
}

fn addr(s: &str) -> Target {
    Target::Addr(s.parse::<SocketAddr>().unwrap())
}

fn dest(target: Target, transport: Transport) -> Destination {
    Destination { target, transport }
}

#[test]
fn dump_alice_nat_contact_goes_to_received() {
    let d = destination(
        "sip:alice-0x7fc281c1dd40@192.168.1.20:5060;transport=udp",
        Some("sip:203.0.113.7:41022"),
        None,
    );
    assert_eq!(d, Ok(dest(addr("203.0.113.7:41022"), Transport::Udp)));
}

#[test]
fn dump_alice_ipv6_contact_goes_to_contact() {
    let d = destination("sip:alice@[2001:db8::42]:5062", None, None);
    assert_eq!(d, Ok(dest(addr("[2001:db8::42]:5062"), Transport::Udp)));
}

#[test]
fn dump_bob_path_hop_received_parameter_wins() {
    let d = destination(
        "sip:bob@10.0.0.5:5060",
        None,
        Some("<sip:edge1.example.com;lr;received=sip:198.51.100.77:40332>"),
    );
    assert_eq!(d, Ok(dest(addr("198.51.100.77:40332"), Transport::Udp)));
}

#[test]
fn dump_bob_tls_received_keeps_its_transport() {
    let d = destination(
        "sip:bob@10.0.0.6:5061;transport=tls",
        Some("sip:198.51.100.78:52011;transport=tls"),
        None,
    );
    assert_eq!(d, Ok(dest(addr("198.51.100.78:52011"), Transport::Tls)));
}

#[test]
fn path_hop_without_received_is_the_next_hop() {
    let d = destination(
        "sip:bob@10.0.0.5",
        None,
        Some("<sip:edge1.example.com;lr>,<sip:core.example.com;lr>"),
    );
    let name = Target::Name {
        host: "edge1.example.com".to_owned(),
        port: 5060,
    };
    assert_eq!(d, Ok(dest(name, Transport::Udp)));
    let d = destination("sip:bob@10.0.0.5", None, Some("<sip:192.0.2.9:5070;lr>"));
    assert_eq!(d, Ok(dest(addr("192.0.2.9:5070"), Transport::Udp)));
}

#[test]
fn escaped_received_parameter_is_unescaped() {
    // Kamailio's add_path_received() escapes ';transport=tcp' into the value.
    let path = "<sip:edge;lr;received=sip:198.51.100.9:5070%3Btransport%3Dtcp>";
    let d = destination("sip:bob@10.0.0.5", None, Some(path));
    assert_eq!(d, Ok(dest(addr("198.51.100.9:5070"), Transport::Tcp)));
    let path = "<sip:edge;lr;received=sip:[2001:db8::9]:5080>";
    let d = destination("sip:bob@10.0.0.5", None, Some(path));
    assert_eq!(d, Ok(dest(addr("[2001:db8::9]:5080"), Transport::Udp)));
}

#[test]
fn received_beats_path_and_contact() {
    let d = destination(
        "sip:bob@10.0.0.5",
        Some("sip:203.0.113.1:1234"),
        Some("<sip:edge;lr;received=sip:198.51.100.77:40332>"),
    );
    assert_eq!(d, Ok(dest(addr("203.0.113.1:1234"), Transport::Udp)));
}

#[test]
fn empty_received_and_path_count_as_unset() {
    let d = destination("sips:carol@pbx.example.com", Some(""), Some(""));
    let name = Target::Name {
        host: "pbx.example.com".to_owned(),
        port: 5061,
    };
    assert_eq!(d, Ok(dest(name, Transport::Tls)));
}

#[test]
fn destination_errors_name_the_input_and_offset() {
    let e = destination_of("sip:bob@10.0.0.5:0", None, None).unwrap_err();
    assert_eq!(e.part, UriPart::Contact);
    assert_eq!(e.error.kind, UriErrorKind::PortZero);
    assert_eq!(
        e.to_string(),
        "contact: port 0 is not a usable port at byte 17"
    );

    let e = destination_of("sip:bob@h", Some("sip:203.0.113.7:4x"), None).unwrap_err();
    assert_eq!(e.part, UriPart::Received);
    assert_eq!((e.error.kind, e.error.at), (UriErrorKind::PortChar, 17));

    let e = destination_of("sip:bob@h", None, Some("sip:edge;lr")).unwrap_err();
    assert_eq!(
        (e.part, e.error.kind),
        (UriPart::Path, UriErrorKind::PathNoHop)
    );

    let e = destination_of("sip:bob@h", None, Some("<sip:ed_ge;lr>")).unwrap_err();
    assert_eq!((e.error.kind, e.error.at), (UriErrorKind::HostChar, 7));

    let e = destination_of("sip:bob@h", None, Some("<sip:edge;lr;received>")).unwrap_err();
    assert_eq!(
        (e.error.kind, e.error.at),
        (UriErrorKind::ReceivedEmpty, 13)
    );

    let p = "<sip:edge;received=sip:1.2.3.4:0>";
    let e = destination_of("sip:bob@h", None, Some(p)).unwrap_err();
    assert_eq!((e.error.kind, e.error.at), (UriErrorKind::PortZero, 31));

    // Offsets inside an escaped received value map back to the raw Path text.
    let p = "<sip:edge;received=sip:%31.2.3.4:x>";
    let e = destination_of("sip:bob@h", None, Some(p)).unwrap_err();
    assert_eq!((e.error.kind, e.error.at), (UriErrorKind::PortChar, 33));
    assert_eq!(&p[33..34], "x");

    let e = destination("not a uri", Some("sip:1.2.3.4"), None).unwrap_err();
    assert_eq!(e.kind, UriErrorKind::Scheme);
}

// ---------------------------------------------------------------------------
// Properties.

fn any_host() -> impl Strategy<Value = String> {
    let label = "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?";
    let top = "[a-zA-Z]([a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?";
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| Ipv4Addr::from(o).to_string()),
        any::<[u16; 8]>().prop_map(|s| format!("[{}]", Ipv6Addr::from(s))),
        (proptest::collection::vec(label, 0..3), top, any::<bool>()).prop_map(
            |(labels, top, dot)| {
                let mut h = String::new();
                for l in labels {
                    h.push_str(&l);
                    h.push('.');
                }
                h.push_str(&top);
                if dot {
                    h.push('.');
                }
                h
            }
        ),
    ]
}

const USER: &str = "([a-zA-Z0-9\\-_.!~*'()&=+$,;?/]|%[0-9a-fA-F]{2}){1,12}";
const PARAMCHARS: &str = "([a-zA-Z0-9\\-_.!~*'()\\[\\]/:&+$]|%[0-9a-fA-F]{2}){1,8}";
const HCHARS: &str = "([a-zA-Z0-9\\-_.!~*'()\\[\\]/?:+$]|%[0-9a-fA-F]{2}){1,8}";
const HVALUE: &str = "([a-zA-Z0-9\\-_.!~*'()\\[\\]/?:+$]|%[0-9a-fA-F]{2}){0,8}";

prop_compose! {
    fn any_uri()(
        sips in any::<bool>(),
        user in proptest::option::of(USER),
        password in proptest::option::of("[a-z0-9&=+$,]{0,6}"),
        host in any_host(),
        port in proptest::option::of(1u16..),
        params in proptest::collection::vec((PARAMCHARS, proptest::option::of(PARAMCHARS)), 0..4),
        headers in proptest::collection::vec((HCHARS, HVALUE), 0..3),
    ) -> (String, String, Option<String>, Option<u16>, String, String) {
        let mut s = String::from(if sips { "sips:" } else { "sip:" });
        if let Some(u) = &user {
            s.push_str(u);
            if let Some(pw) = &password {
                s.push(':');
                s.push_str(pw);
            }
            s.push('@');
        }
        s.push_str(&host);
        if let Some(p) = port {
            s.push_str(&format!(":{p}"));
        }
        let mut p = String::new();
        for (name, value) in params {
            p.push(';');
            p.push_str(&name);
            if let Some(v) = value {
                p.push('=');
                p.push_str(&v);
            }
        }
        s.push_str(&p);
        let mut h = String::new();
        for (i, (name, value)) in headers.into_iter().enumerate() {
            h.push(if i == 0 { '?' } else { '&' });
            h.push_str(&name);
            h.push('=');
            h.push_str(&value);
        }
        s.push_str(&h);
        (s, host, user, port, p, h)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_strings_never_panic(s in any::<String>()) {
        let _ = SipUri::parse(&s);
        let _ = first_path_hop(&s);
        let _ = parse_host(&s);
        let _ = destination(&s, Some(&s), Some(&s));
        let _ = destination("sip:h", None, Some(&s));
    }

    #[test]
    fn sip_like_strings_never_panic(s in "(sips?:)?[a-zA-Z0-9:;@?=&%\\[\\]<>.\\-_+ \"]{0,40}") {
        if let Ok(u) = SipUri::parse(&s) {
            let _ = (u.param("transport"), u.transport(), u.port_or_default());
            // Whatever parses must display to something that parses equal.
            let shown = u.to_string();
            prop_assert_eq!(SipUri::parse(&shown), Ok(u));
        }
        let _ = destination("sip:h", None, Some(&format!("<{s}>")));
        let _ = destination("sip:h", Some(&s), None);
    }

    #[test]
    fn generated_uris_parse_and_round_trip(
        (s, host, user, port, params, headers) in any_uri()
    ) {
        let u = SipUri::parse(&s).map_err(|e| TestCaseError::fail(format!("{s:?}: {e}")))?;
        prop_assert_eq!(u.scheme == Scheme::Sips, s.starts_with("sips:"));
        prop_assert_eq!(u.user, user.as_deref());
        prop_assert_eq!(u.host.to_string().to_ascii_lowercase(), host.to_ascii_lowercase());
        prop_assert_eq!(u.port, port);
        prop_assert_eq!(u.params, params.as_str());
        prop_assert_eq!(u.headers, headers.as_str());
        let shown = u.to_string();
        let again = SipUri::parse(&shown).map_err(|e| TestCaseError::fail(format!("{shown:?}: {e}")))?;
        prop_assert_eq!(again, u);
        prop_assert_eq!(again.to_string(), shown);
    }
}
