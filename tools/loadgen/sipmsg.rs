//! SIP text helpers for the simulated phones (`phones`) and the
//! reachability probe (`reach`): reading responses, Via parameters, the
//! RFC 3261 §18.2.2 / RFC 3581 §4 rule of where a response goes, and the
//! text form of addresses in SIP (IPv6 in brackets).
//!
//! The requests a phone receives are parsed, and their 200 OK written, by
//! `kaping::sim::request` (the responder's allocation-free parser and
//! §8.2.6 writer); this module adds what that one does not cover: parsing
//! *responses* (a phone reads the answers to its REGISTERs, `reach` the
//! answers to its OPTIONS) and choosing the response's destination.
//!
//! Nothing here does I/O or panics on any input; the helpers borrow from
//! the datagram and allocate only where they return a `String`. They run a
//! few times per registration or probe, never in a hot loop of their own.
//! Callers: `phones.rs`, `reach.rs`.

use std::net::{IpAddr, SocketAddr, UdpSocket};

/// RFC 3261 §19.1.2: the default port of `sip:` over UDP.
pub const SIP_PORT: u16 = 5060;

/// RFC 3261 §8.1.1.7: every branch we generate starts with the magic cookie.
pub const BRANCH_COOKIE: &str = "z9hG4bK";

/// The kernel's choice of source address towards `dest` (a connected UDP
/// socket's; no packet is sent).
pub fn source_towards(dest: SocketAddr) -> Result<IpAddr, String> {
    let any: SocketAddr = if dest.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let probe = UdpSocket::bind(any).map_err(|e| e.to_string())?;
    probe
        .connect(dest)
        .map_err(|e| format!("no route to {dest}: {e}"))?;
    Ok(probe.local_addr().map_err(|e| e.to_string())?.ip())
}

/// `ip` as a SIP host: IPv6 in brackets (RFC 3261 §25.1 `IPv6reference`).
pub fn host_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// `addr` as SIP `hostport`.
pub fn hostport_text(addr: SocketAddr) -> String {
    format!("{}:{}", host_text(addr.ip()), addr.port())
}

/// The address of a `sip:IP[:PORT]` URI (or a bare `IP[:PORT]`), as the
/// `--register` and `--proxy` flags take it; no name resolution.
pub fn parse_sip_addr(s: &str) -> Result<SocketAddr, String> {
    let bare = s
        .strip_prefix("sip:")
        .or_else(|| s.strip_prefix("SIP:"))
        .unwrap_or(s);
    let bare = bare.split(';').next().unwrap_or(bare);
    if let Ok(a) = bare.parse::<SocketAddr>() {
        return Ok(a);
    }
    let host = bare.trim_start_matches('[').trim_end_matches(']');
    host.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, SIP_PORT))
        .map_err(|_| format!("'{s}': expected sip:IP[:PORT] (an IP address, no host names)"))
}

/// The status code of a response (`SIP/2.0 200 OK`), or `None` for
/// anything else (a request, garbage).
pub fn status_code(msg: &[u8]) -> Option<u16> {
    let rest = msg.strip_prefix(b"SIP/2.0 ")?;
    let digits = rest.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|&b| b != b' ') {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The header block of a message (after the start line, up to the empty
/// line); `None` when the message has no empty line.
fn header_block(msg: &str) -> Option<&str> {
    let start = msg.find('\n')? + 1;
    let rest = &msg[start..];
    let end = rest
        .find("\r\n\r\n")
        .map(|e| e + 2)
        .or_else(|| rest.find("\n\n").map(|e| e + 1))?;
    Some(&rest[..end])
}

/// The values of every header named `long` or its compact form `compact`
/// (RFC 3261 §7.3.3), case-insensitive, in message order; folded lines
/// (§7.3.1) stay part of their header's value.
pub fn header_values<'a>(msg: &'a str, long: &str, compact: Option<&str>) -> Vec<&'a str> {
    let Some(block) = header_block(msg) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // (value start, value end) of the header being read.
    let mut current: Option<(usize, usize)> = None;
    let mut pos = 0;
    while pos < block.len() {
        let line_end = block[pos..].find('\n').map_or(block.len(), |e| pos + e);
        let line = block[pos..line_end].trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let Some(cur) = current.as_mut() {
                cur.1 = pos + line.len();
            }
        } else {
            if let Some((s, e)) = current.take() {
                out.push(block[s..e].trim());
            }
            if let Some(colon) = line.find(':') {
                let name = line[..colon].trim();
                let wanted = name.eq_ignore_ascii_case(long)
                    || compact.is_some_and(|c| name.eq_ignore_ascii_case(c));
                if wanted {
                    current = Some((pos + colon + 1, pos + line.len()));
                }
            }
        }
        pos = line_end + 1;
    }
    if let Some((s, e)) = current.take() {
        out.push(block[s..e].trim());
    }
    out
}

/// The first value of a header (see [`header_values`]).
pub fn header<'a>(msg: &'a str, long: &str, compact: Option<&str>) -> Option<&'a str> {
    header_values(msg, long, compact).into_iter().next()
}

/// Splits a header value into its comma-separated elements (several Vias or
/// Contacts on one line), ignoring commas inside quotes and `<...>`.
pub fn split_list(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut quoted, mut angle, mut start) = (false, false, 0);
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                out.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(value[start..].trim());
    out.retain(|s| !s.is_empty());
    out
}

/// The `;name[=value]` parameters of `s` (whatever precedes the first `;`
/// is skipped), each as
/// `(name, Some(value))` or `(name, None)`; values unquoted.
pub fn params(s: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    s.split(';').skip(1).filter_map(|p| {
        let p = p.trim();
        if p.is_empty() {
            return None;
        }
        Some(match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        })
    })
}

/// One via-parm (RFC 3261 §20.42), borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Via<'a> {
    /// sent-by host, brackets stripped for IPv6.
    pub host: &'a str,
    pub port: Option<u16>,
    pub branch: Option<&'a str>,
    /// `rport` present: `Some(None)` bare (as a client sends it),
    /// `Some(Some(v))` with the value a server filled in.
    pub rport: Option<Option<&'a str>>,
    pub received: Option<&'a str>,
}

/// Parses one via-parm: `SIP/2.0/UDP host[:port] *(;param)`.
pub fn parse_via(parm: &str) -> Option<Via<'_>> {
    let head_end = parm.find(';').unwrap_or(parm.len());
    let head = parm[..head_end].trim();
    let slash = head.rfind('/')?;
    let after = head[slash + 1..].trim_start();
    let sent_by = after[after.find(char::is_whitespace)?..].trim();
    let (host, port) = if let Some(v6) = sent_by.strip_prefix('[') {
        let close = v6.find(']')?;
        let port = match v6[close + 1..].strip_prefix(':') {
            Some(p) => Some(p.trim().parse().ok()?),
            None => None,
        };
        (&v6[..close], port)
    } else {
        match sent_by.split_once(':') {
            Some((h, p)) => (h, Some(p.trim().parse().ok()?)),
            None => (sent_by, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let mut via = Via {
        host,
        port,
        branch: None,
        rport: None,
        received: None,
    };
    for (name, value) in params(&parm[head_end..]) {
        if name.eq_ignore_ascii_case("branch") {
            via.branch = value;
        } else if name.eq_ignore_ascii_case("rport") {
            via.rport = Some(value);
        } else if name.eq_ignore_ascii_case("received") {
            via.received = value;
        }
    }
    Some(via)
}

/// The top via-parm of a message: the first element of its first Via.
pub fn top_via(msg: &str) -> Option<Via<'_>> {
    let first = header(msg, "via", Some("v"))?;
    parse_via(split_list(first).first()?)
}

/// Where the response to a request goes, given its top via-parm as the
/// request carried it and the packet's source address.
///
/// RFC 3261 §18.2.2 (unreliable transport, no `maddr`): to the address in
/// `received` at the sent-by port (default 5060); RFC 3261 §18.2.1 adds
/// `received` whenever the sent-by host is not the source IP, so the IP is
/// the source's unless the sent-by *is* the source. RFC 3581 §4: a `rport`
/// parameter sends it to the source IP *and* port instead. With
/// `to_source` the rule is skipped and the source gets it, as many real
/// phones do. (`maddr` is not honoured: no multicast here.)
pub fn reply_destination(via: &Via<'_>, source: SocketAddr, to_source: bool) -> SocketAddr {
    if to_source || via.rport.is_some() {
        return source;
    }
    let ip = via
        .received
        .and_then(|r| r.trim_matches(['[', ']']).parse::<IpAddr>().ok())
        .unwrap_or_else(|| {
            // The sent-by host itself only when it is the source; a name or
            // another address means `received` = the source IP (§18.2.1).
            match via.host.parse::<IpAddr>() {
                Ok(ip) if ip == source.ip() => ip,
                _ => source.ip(),
            }
        });
    SocketAddr::new(ip, via.port.unwrap_or(SIP_PORT))
}

/// The number and method of a CSeq value (`42 REGISTER`).
pub fn parse_cseq(value: &str) -> Option<(u32, &str)> {
    let mut it = value.split_whitespace();
    let n = it.next()?.parse().ok()?;
    Some((n, it.next()?))
}

/// The URI of a Contact element (`<sip:...>;params` or a bare addr-spec).
pub fn contact_uri(elem: &str) -> &str {
    match (elem.find('<'), elem.find('>')) {
        (Some(l), Some(r)) if l < r => &elem[l + 1..r],
        _ => elem.split(';').next().unwrap_or(elem).trim(),
    }
}

/// The `expires` a registrar granted `my_contact` in a 2xx to REGISTER
/// (RFC 3261 §10.2.4: the Contact's `expires` parameter, else the Expires
/// header); `None` when the response says neither.
pub fn granted_expires(msg: &str, my_contact: &str) -> Option<u32> {
    let contacts: Vec<&str> = header_values(msg, "contact", Some("m"))
        .into_iter()
        .flat_map(split_list)
        .collect();
    let mine = contacts
        .iter()
        .find(|c| contact_uri(c).eq_ignore_ascii_case(my_contact))
        // A registrar that rewrote our Contact (fix_nated_contact on a
        // REGISTER) still lists one binding: take it.
        .or(if contacts.len() == 1 {
            contacts.first()
        } else {
            None
        });
    if let Some(c) = mine {
        // Parameters follow the `>` of a name-addr, or the first `;` of a
        // bare addr-spec (§20.10).
        let tail = match c.rfind('>') {
            Some(r) => &c[r + 1..],
            None => c.find(';').map_or("", |i| &c[i..]),
        };
        for (n, v) in params(tail) {
            if n.eq_ignore_ascii_case("expires") {
                if let Some(e) = v.and_then(|v| v.parse().ok()) {
                    return Some(e);
                }
            }
        }
    }
    header(msg, "expires", None).and_then(|v| v.trim().parse().ok())
}

/// True for the keepalives a UA ignores (RFC 5626 §3.5.1 CRLF, and the
/// 4-byte NUL datagram some pingers and SBCs send): only CR, LF or NUL.
pub fn is_keepalive(d: &[u8]) -> bool {
    !d.is_empty() && d.len() <= 8 && d.iter().all(|&b| matches!(b, b'\r' | b'\n' | 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rport_sends_to_the_source_ip_and_port() {
        // RFC 3581 §4: kaping as the proxy, seen through the NAT.
        let via = parse_via("SIP/2.0/UDP 203.0.113.10:5060;branch=z9hG4bK.x;rport").unwrap();
        assert_eq!(via.rport, Some(None));
        let s = src("203.0.113.10:5060");
        assert_eq!(reply_destination(&via, s, false), s);
        // Even when the sent-by names another address and port.
        let via = parse_via("SIP/2.0/UDP 10.0.0.1:5070;rport;branch=z9hG4bK1").unwrap();
        let s = src("198.51.100.7:40123");
        assert_eq!(reply_destination(&via, s, false), s);
    }

    #[test]
    fn without_rport_the_via_port_is_used() {
        // §18.2.2: sent-by is the source: that host at the Via port.
        let via = parse_via("SIP/2.0/UDP 203.0.113.10:5070;branch=z9hG4bK1").unwrap();
        assert_eq!(
            reply_destination(&via, src("203.0.113.10:40000"), false),
            src("203.0.113.10:5070")
        );
        // Another address: `received` (the source IP) at the Via port.
        let via = parse_via("SIP/2.0/UDP 192.0.2.99:5080;branch=z9hG4bK1").unwrap();
        assert_eq!(
            reply_destination(&via, src("203.0.113.2:40000"), false),
            src("203.0.113.2:5080")
        );
        // A host name: the same.
        let via = parse_via("SIP/2.0/UDP proxy.example.com:5080;branch=z9hG4bK1").unwrap();
        assert_eq!(
            reply_destination(&via, src("203.0.113.2:40000"), false),
            src("203.0.113.2:5080")
        );
    }

    #[test]
    fn the_port_defaults_to_5060() {
        let via = parse_via("SIP/2.0/UDP 203.0.113.10;branch=z9hG4bK1").unwrap();
        assert_eq!(via.port, None);
        assert_eq!(
            reply_destination(&via, src("203.0.113.10:33333"), false),
            src("203.0.113.10:5060")
        );
        let via = parse_via("SIP/2.0/UDP [2001:db8:2::10];branch=z9hG4bK1").unwrap();
        assert_eq!(via.host, "2001:db8:2::10");
        assert_eq!(
            reply_destination(&via, src("[2001:db8:2::10]:33333"), false),
            src("[2001:db8:2::10]:5060")
        );
    }

    #[test]
    fn received_already_present_wins_and_to_source_overrides() {
        let via =
            parse_via("SIP/2.0/UDP 192.0.2.2:5062;received=198.51.100.1;branch=z9hG4bK1").unwrap();
        assert_eq!(
            reply_destination(&via, src("203.0.113.2:40000"), false),
            src("198.51.100.1:5062")
        );
        let via = parse_via("SIP/2.0/UDP 192.0.2.99:5080;branch=z9hG4bK1").unwrap();
        let s = src("203.0.113.2:40000");
        assert_eq!(reply_destination(&via, s, true), s);
    }

    #[test]
    fn ipv6_via_and_params() {
        let via = parse_via(
            "SIP/2.0/UDP [2001:db8:2::10]:5060;branch=z9hG4bK.abc;rport=41000;received=2001:db8:1::2",
        )
        .unwrap();
        assert_eq!(via.host, "2001:db8:2::10");
        assert_eq!(via.port, Some(5060));
        assert_eq!(via.branch, Some("z9hG4bK.abc"));
        assert_eq!(via.rport, Some(Some("41000")));
        assert_eq!(via.received, Some("2001:db8:1::2"));
        assert!(parse_via("SIP/2.0/UDP").is_none());
        assert!(parse_via("SIP/2.0/UDP host:notaport").is_none());
        assert!(parse_via("garbage").is_none());
    }

    const REG_200: &str = "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP 192.0.2.2:41000;branch=z9hG4bK-1;rport=41000;received=203.0.113.2\r\n\
From: <sip:p1@203.0.113.10>;tag=abc\r\n\
To: <sip:p1@203.0.113.10>;tag=def\r\n\
Call-ID: reg-p1@192.0.2.2\r\n\
CSeq: 3 REGISTER\r\n\
Contact: <sip:other@192.0.2.2:5>;expires=10, <sip:p1@192.0.2.2:41000>;expires=600;received=\"sip:203.0.113.2:41000\"\r\n\
Server: kamailio (5.6.3 (x86_64/linux))\r\n\
Content-Length: 0\r\n\r\n";

    #[test]
    fn reads_a_register_response() {
        assert_eq!(status_code(REG_200.as_bytes()), Some(200));
        assert_eq!(status_code(b"OPTIONS sip:a SIP/2.0\r\n"), None);
        assert_eq!(status_code(b"SIP/2.0 20 OK\r\n"), None);
        assert_eq!(
            parse_cseq(header(REG_200, "cseq", None).unwrap()),
            Some((3, "REGISTER"))
        );
        assert_eq!(
            header(REG_200, "call-id", Some("i")),
            Some("reg-p1@192.0.2.2")
        );
        let via = top_via(REG_200).unwrap();
        assert_eq!(via.branch, Some("z9hG4bK-1"));
        assert_eq!(via.received, Some("203.0.113.2"));
        assert_eq!(
            granted_expires(REG_200, "sip:p1@192.0.2.2:41000"),
            Some(600)
        );
        // No matching contact and several listed: the Expires header.
        let other = REG_200.replace("Server:", "Expires: 90\r\nServer:");
        assert_eq!(granted_expires(&other, "sip:nobody@192.0.2.2:1"), Some(90));
    }

    #[test]
    fn headers_compact_folded_and_lists() {
        let msg = "SIP/2.0 200 OK\r\nv: SIP/2.0/UDP a:1;branch=z9hG4bKa, SIP/2.0/UDP b:2\r\n\
Via: SIP/2.0/UDP c:3\r\n  ;branch=z9hG4bKc\r\nSERVER: kaping-loadgen phone p3\r\n\r\n";
        let vias = header_values(msg, "via", Some("v"));
        assert_eq!(vias.len(), 2);
        assert_eq!(split_list(vias[0]).len(), 2);
        assert_eq!(top_via(msg).unwrap().host, "a");
        let folded = parse_via(vias[1]).unwrap();
        assert_eq!(folded.branch, Some("z9hG4bKc"));
        assert_eq!(header(msg, "server", None), Some("kaping-loadgen phone p3"));
        assert_eq!(header("no empty line\r\nVia: x\r\n", "via", None), None);
    }

    #[test]
    fn addresses_and_keepalives() {
        assert_eq!(
            parse_sip_addr("sip:203.0.113.10:5060").unwrap(),
            src("203.0.113.10:5060")
        );
        assert_eq!(
            parse_sip_addr("sip:[2001:db8:2::10]").unwrap(),
            src("[2001:db8:2::10]:5060")
        );
        assert!(parse_sip_addr("sip:proxy.example.com").is_err());
        assert_eq!(hostport_text(src("[2001:db8::1]:5")), "[2001:db8::1]:5");
        assert!(is_keepalive(b"\0\0\0\0"));
        assert!(is_keepalive(b"\r\n\r\n"));
        assert!(!is_keepalive(b""));
        assert!(!is_keepalive(b"OPTIONS"));
    }
}
