//! KDMQ messages: the SIP framing of Kamailio's `dmq` module.
//!
//! Owns: [`parse_message`] (requests and responses, borrowed views),
//! [`write_response`], [`write_request`], [`join_body`], [`parse_node_list`]
//! and the reject causes [`DmqReject`].
//!
//! Ground rules:
//! * Parsing never panics on any bytes and does bounded work: at most
//!   [`DATAGRAM_LEN_MAX`] bytes, [`HEADERS_MAX`] header lines,
//!   [`VIAS_MAX`] Via headers, [`NODES_MAX`] node lines. It allocates only
//!   the `Vec` of Via values (and, for node lists, the owned [`Node`]s).
//! * Header names are compared case-insensitively and the compact forms of
//!   RFC 3261 §7.3.3 (`v f t i l c`) are accepted. Lines may end in CRLF or
//!   a bare LF (Kamailio accepts both); folded header lines (§7.3.1) are
//!   rejected: Kamailio never folds, and unfolding would need a copy.
//! * Over UDP the body is what Content-Length says (§18.3, §20.14): a body
//!   shorter than announced is [`DmqReject::Truncated`], extra bytes are
//!   ignored, a missing Content-Length means "the rest of the datagram".
//! * Writers produce exactly the header set Kamailio's `dmq_send_message()`
//!   (`dmq_funcs.c`) produces and its `dmq_handle_message()` (`message.c`)
//!   reads; they never fail and only append to `out`.
//!
//! Callers: the DMQ node runtime (sockets, retransmissions, applying
//! changes) parses every datagram here and answers with [`write_response`].

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::wire::uri::{self, Host, SipUri};

/// The method of every DMQ request (`dmq_request_method` in `dmq.c`).
pub const METHOD: &str = "KDMQ";
/// Largest datagram accepted: the largest UDP payload. Kamailio's own
/// synthetic DMQ buffer is 65507 bytes (`DMQ_MSG_BUF_SIZE`, `message.c`).
pub const DATAGRAM_LEN_MAX: usize = 65_535;
/// Most header lines read in one message (Kamailio sends 9 or 10).
pub const HEADERS_MAX: usize = 64;
/// Most Via headers kept (a DMQ request crosses no proxy: Kamailio sends 1).
pub const VIAS_MAX: usize = 16;
/// Most lines in a node list (Kamailio's own DNS limit is `MAXDMQHOSTS` 30).
pub const NODES_MAX: usize = 256;
/// Longest node line (`MAXDMQURILEN` in `notification_peer.c`).
pub const NODE_LINE_LEN_MAX: usize = 255;
/// Content-Type of node lists (`dmq_notification_content_type`).
pub const CONTENT_TYPE_NODES: &str = "text/plain";
/// Content-Type of dmq_usrloc bodies (`usrloc_dmq_content_type`).
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// Channel (peer id) of the node list exchange.
pub const CHANNEL_NOTIFICATION: &str = "notification_peer";
/// Channel of dmq_usrloc.
pub const CHANNEL_USRLOC: &str = "usrloc";
/// RFC 3261 §8.1.1.7 magic cookie.
pub const BRANCH_COOKIE: &str = "z9hG4bK";

/// Why a datagram or node list was not accepted.
///
/// Discriminants are stable counter indexes: new variants are appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u8)]
pub enum DmqReject {
    #[error("datagram longer than {DATAGRAM_LEN_MAX} bytes")]
    Oversized = 0,
    #[error("datagram ends before the end of the headers or the announced body")]
    Truncated = 1,
    #[error("not a SIP request or response")]
    NotSip = 2,
    #[error("malformed request line or status line")]
    BadStartLine = 3,
    #[error("request method or CSeq method is not KDMQ")]
    NotKdmq = 4,
    #[error("request URI is not a sip: URI with a user part (the channel)")]
    BadRequestUri = 5,
    #[error("more than {HEADERS_MAX} header lines or {VIAS_MAX} Via headers")]
    TooManyHeaders = 6,
    #[error("header line without a name and a colon, or folded")]
    BadHeader = 7,
    #[error("a single-valued header appears twice")]
    DuplicateHeader = 8,
    #[error("no Via header")]
    NoVia = 9,
    #[error("malformed top Via")]
    BadVia = 10,
    #[error("no From header")]
    NoFrom = 11,
    #[error("malformed From header")]
    BadFrom = 12,
    #[error("no To header")]
    NoTo = 13,
    #[error("malformed To header")]
    BadTo = 14,
    #[error("no or empty Call-ID header")]
    NoCallId = 15,
    #[error("no CSeq header")]
    NoCSeq = 16,
    #[error("malformed CSeq header")]
    BadCSeq = 17,
    #[error("malformed Max-Forwards header")]
    BadMaxForwards = 18,
    #[error("malformed Content-Length header")]
    BadContentLength = 19,
    #[error("node line is not a sip: URI")]
    BadNodeUri = 20,
    #[error("node line has an unknown status")]
    BadNodeStatus = 21,
    #[error("more than {NODES_MAX} node lines")]
    TooManyNodes = 22,
}

impl DmqReject {
    /// Number of variants.
    pub const COUNT: usize = 23;

    /// Every variant, in index order.
    pub const ALL: [DmqReject; Self::COUNT] = [
        DmqReject::Oversized,
        DmqReject::Truncated,
        DmqReject::NotSip,
        DmqReject::BadStartLine,
        DmqReject::NotKdmq,
        DmqReject::BadRequestUri,
        DmqReject::TooManyHeaders,
        DmqReject::BadHeader,
        DmqReject::DuplicateHeader,
        DmqReject::NoVia,
        DmqReject::BadVia,
        DmqReject::NoFrom,
        DmqReject::BadFrom,
        DmqReject::NoTo,
        DmqReject::BadTo,
        DmqReject::NoCallId,
        DmqReject::NoCSeq,
        DmqReject::BadCSeq,
        DmqReject::BadMaxForwards,
        DmqReject::BadContentLength,
        DmqReject::BadNodeUri,
        DmqReject::BadNodeStatus,
        DmqReject::TooManyNodes,
    ];

    /// Stable counter index, `< DmqReject::COUNT`.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Stable snake_case name, for counters, metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            DmqReject::Oversized => "oversized",
            DmqReject::Truncated => "truncated",
            DmqReject::NotSip => "not_sip",
            DmqReject::BadStartLine => "bad_start_line",
            DmqReject::NotKdmq => "not_kdmq",
            DmqReject::BadRequestUri => "bad_request_uri",
            DmqReject::TooManyHeaders => "too_many_headers",
            DmqReject::BadHeader => "bad_header",
            DmqReject::DuplicateHeader => "duplicate_header",
            DmqReject::NoVia => "no_via",
            DmqReject::BadVia => "bad_via",
            DmqReject::NoFrom => "no_from",
            DmqReject::BadFrom => "bad_from",
            DmqReject::NoTo => "no_to",
            DmqReject::BadTo => "bad_to",
            DmqReject::NoCallId => "no_call_id",
            DmqReject::NoCSeq => "no_cseq",
            DmqReject::BadCSeq => "bad_cseq",
            DmqReject::BadMaxForwards => "bad_max_forwards",
            DmqReject::BadContentLength => "bad_content_length",
            DmqReject::BadNodeUri => "bad_node_uri",
            DmqReject::BadNodeStatus => "bad_node_status",
            DmqReject::TooManyNodes => "too_many_nodes",
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < DmqReject::COUNT {
        assert!(DmqReject::ALL[i].index() == i);
        i += 1;
    }
};

/// Request line or status line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartLine<'a> {
    /// `KDMQ sip:<channel>@host:port SIP/2.0`.
    Request {
        /// The whole Request-URI as sent.
        uri: &'a str,
        /// Its user part: the DMQ channel (peer id), e.g. `usrloc`.
        channel: &'a str,
    },
    /// `SIP/2.0 <status> <reason>`.
    Response { status: u16, reason: &'a str },
}

/// The top Via (RFC 3261 §20.42), parameters as given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Via<'a> {
    /// Transport token after `SIP/2.0/`, e.g. `UDP`.
    pub transport: &'a str,
    /// `host[:port]` as written.
    pub sent_by: &'a str,
    pub host: Host<'a>,
    pub port: Option<u16>,
    /// `branch` value (never checked for the magic cookie: Kamailio's is there).
    pub branch: Option<&'a str>,
    /// `received` value as written.
    pub received: Option<&'a str>,
    /// `None` absent, `Some(None)` the bare `;rport` flag, `Some(Some(p))` filled in.
    pub rport: Option<Option<u16>>,
}

/// A From or To header: `name-addr` or `addr-spec` plus its `tag`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameAddr<'a> {
    /// The whole header value, copied verbatim into responses.
    pub raw: &'a str,
    /// The URI (a valid `sip:`/`sips:` URI).
    pub uri: &'a str,
    /// `tag` parameter value, `None` when absent.
    pub tag: Option<&'a str>,
}

impl NameAddr<'_> {
    /// The node address the URI names when its host is an IP literal (port
    /// defaulting per RFC 3261 §19.1.2). Kamailio finds the sending node by
    /// comparing this host and port with its node list (`find_dmq_node_uri`).
    pub fn addr(&self) -> Option<SocketAddr> {
        let u = SipUri::parse(self.uri).ok()?;
        let ip = match u.host {
            Host::V4(a) => IpAddr::V4(a),
            Host::V6(a) => IpAddr::V6(a),
            Host::Name(_) => return None,
        };
        Some(SocketAddr::new(ip, u.port_or_default()))
    }
}

/// `CSeq: <number> <method>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CSeq<'a> {
    pub number: u32,
    pub method: &'a str,
}

/// A parsed KDMQ request or response borrowing the datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub start: StartLine<'a>,
    /// Every Via header value in order (a comma-joined value stays one entry).
    pub vias: Vec<&'a str>,
    /// The first Via value of `vias[0]`, parsed.
    pub via: Via<'a>,
    pub from: NameAddr<'a>,
    pub to: NameAddr<'a>,
    pub call_id: &'a str,
    pub cseq: CSeq<'a>,
    pub content_type: Option<&'a str>,
    pub max_forwards: Option<u8>,
    /// The body, exactly Content-Length bytes long.
    pub body: &'a [u8],
}

impl<'a> Message<'a> {
    /// The channel of a request, `None` for a response.
    pub fn channel(&self) -> Option<&'a str> {
        match self.start {
            StartLine::Request { channel, .. } => Some(channel),
            StartLine::Response { .. } => None,
        }
    }

    /// The status of a response, `None` for a request.
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartLine::Response { status, .. } => Some(status),
            StartLine::Request { .. } => None,
        }
    }
}

/// Which header a line carries, after compact forms are expanded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Name {
    Via,
    From,
    To,
    CallId,
    CSeq,
    ContentType,
    ContentLength,
    MaxForwards,
    Other,
}

fn header_name(n: &str) -> Name {
    const NAMES: [(&str, Name); 14] = [
        ("via", Name::Via),
        ("v", Name::Via),
        ("from", Name::From),
        ("f", Name::From),
        ("to", Name::To),
        ("t", Name::To),
        ("call-id", Name::CallId),
        ("i", Name::CallId),
        ("cseq", Name::CSeq),
        ("content-type", Name::ContentType),
        ("c", Name::ContentType),
        ("content-length", Name::ContentLength),
        ("l", Name::ContentLength),
        ("max-forwards", Name::MaxForwards),
    ];
    NAMES
        .iter()
        .find(|(s, _)| n.eq_ignore_ascii_case(s))
        .map_or(Name::Other, |&(_, h)| h)
}

/// Sets a single-valued header once; a second occurrence is a reject.
fn set_once<'a>(slot: &mut Option<&'a str>, v: &'a str) -> Result<(), DmqReject> {
    if slot.is_some() {
        return Err(DmqReject::DuplicateHeader);
    }
    *slot = Some(v);
    Ok(())
}

/// Parses one datagram as a KDMQ request or a response to one. Never panics.
///
/// Order of checks: size, start line, headers as walked (count, shape,
/// duplicates), the empty line, Content-Length against the datagram, then
/// Via, From, To, Call-ID, CSeq (KDMQ), Max-Forwards.
pub fn parse_message(datagram: &[u8]) -> Result<Message<'_>, DmqReject> {
    if datagram.len() > DATAGRAM_LEN_MAX {
        return Err(DmqReject::Oversized);
    }
    let mut pos = 0usize;
    let first = next_line(datagram, &mut pos).ok_or(DmqReject::Truncated)?;
    let first = std::str::from_utf8(first).map_err(|_| DmqReject::NotSip)?;
    if !header_safe(first) {
        return Err(DmqReject::BadStartLine);
    }
    let start = parse_start_line(first)?;

    let mut vias: Vec<&str> = Vec::new();
    let (mut from, mut to, mut call_id, mut cseq) = (None, None, None, None);
    let (mut ctype, mut clen, mut maxf) = (None, None, None);
    let mut lines = 0usize;
    let body_start = loop {
        let line = next_line(datagram, &mut pos).ok_or(DmqReject::Truncated)?;
        if line.is_empty() {
            break pos;
        }
        lines += 1;
        if lines > HEADERS_MAX {
            return Err(DmqReject::TooManyHeaders);
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(DmqReject::BadHeader);
        }
        let line = std::str::from_utf8(line).map_err(|_| DmqReject::BadHeader)?;
        // A stray CR (or other control byte) would be copied into responses.
        if !header_safe(line) {
            return Err(DmqReject::BadHeader);
        }
        let (name, value) = line.split_once(':').ok_or(DmqReject::BadHeader)?;
        let name = name.trim_end_matches([' ', '\t']);
        if !uri::is_token(name) {
            return Err(DmqReject::BadHeader);
        }
        let value = value.trim_matches([' ', '\t']);
        match header_name(name) {
            Name::Via => {
                if vias.len() == VIAS_MAX {
                    return Err(DmqReject::TooManyHeaders);
                }
                vias.push(value);
            }
            Name::From => set_once(&mut from, value)?,
            Name::To => set_once(&mut to, value)?,
            Name::CallId => set_once(&mut call_id, value)?,
            Name::CSeq => set_once(&mut cseq, value)?,
            Name::ContentType => set_once(&mut ctype, value)?,
            Name::ContentLength => set_once(&mut clen, value)?,
            Name::MaxForwards => set_once(&mut maxf, value)?,
            Name::Other => {}
        }
    };

    let rest = &datagram[body_start..];
    let body = match clen {
        None => rest,
        Some(v) => {
            let n = parse_decimal(v, u32::MAX as u64).ok_or(DmqReject::BadContentLength)? as usize;
            if n > DATAGRAM_LEN_MAX {
                return Err(DmqReject::Oversized);
            }
            rest.get(..n).ok_or(DmqReject::Truncated)?
        }
    };

    let top = vias.first().ok_or(DmqReject::NoVia)?;
    let via = parse_via(top.split(',').next().unwrap_or("")).ok_or(DmqReject::BadVia)?;
    let from = parse_name_addr(from.ok_or(DmqReject::NoFrom)?).ok_or(DmqReject::BadFrom)?;
    let to = parse_name_addr(to.ok_or(DmqReject::NoTo)?).ok_or(DmqReject::BadTo)?;
    let call_id = call_id
        .filter(|c| !c.is_empty())
        .ok_or(DmqReject::NoCallId)?;
    let cseq = parse_cseq(cseq.ok_or(DmqReject::NoCSeq)?)?;
    let max_forwards = match maxf {
        None => None,
        Some(v) => Some(parse_decimal(v, 255).ok_or(DmqReject::BadMaxForwards)? as u8),
    };
    Ok(Message {
        start,
        vias,
        via,
        from,
        to,
        call_id,
        cseq,
        content_type: ctype,
        max_forwards,
        body,
    })
}

/// The next line starting at `*pos` without its CRLF or LF, advancing past
/// the terminator; `None` when no terminator is left.
fn next_line<'a>(b: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let rest = b.get(*pos..)?;
    let nl = memchr::memchr(b'\n', rest)?;
    *pos += nl + 1;
    let line = &rest[..nl];
    Some(line.strip_suffix(b"\r").unwrap_or(line))
}

fn parse_start_line(line: &str) -> Result<StartLine<'_>, DmqReject> {
    if let Some(rest) = line.strip_prefix("SIP/2.0 ") {
        let b = rest.as_bytes();
        if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) {
            return Err(DmqReject::BadStartLine);
        }
        let status = (b[0] - b'0') as u16 * 100 + (b[1] - b'0') as u16 * 10 + (b[2] - b'0') as u16;
        if !(100..=699).contains(&status) || (b.len() > 3 && b[3] != b' ') {
            return Err(DmqReject::BadStartLine);
        }
        let reason = rest.get(4..).unwrap_or("");
        return Ok(StartLine::Response { status, reason });
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(ruri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(if line.contains("SIP/2.0") {
            DmqReject::BadStartLine
        } else {
            DmqReject::NotSip
        });
    };
    if version != "SIP/2.0" {
        return Err(DmqReject::NotSip);
    }
    if !uri::is_token(method) {
        return Err(DmqReject::BadStartLine);
    }
    if method != METHOD {
        return Err(DmqReject::NotKdmq);
    }
    let parsed = SipUri::parse(ruri).map_err(|_| DmqReject::BadRequestUri)?;
    let channel = parsed.user.ok_or(DmqReject::BadRequestUri)?;
    Ok(StartLine::Request { uri: ruri, channel })
}

/// Decimal without sign, at most `max`; `None` otherwise.
fn parse_decimal(s: &str, max: u64) -> Option<u64> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let v: u64 = s.parse().ok()?;
    (v <= max).then_some(v)
}

fn parse_cseq(v: &str) -> Result<CSeq<'_>, DmqReject> {
    let mut it = v.split([' ', '\t']).filter(|s| !s.is_empty());
    let (Some(n), Some(method), None) = (it.next(), it.next(), it.next()) else {
        return Err(DmqReject::BadCSeq);
    };
    // RFC 3261 §8.1.1.5: the sequence number is a 32-bit unsigned integer.
    let number = parse_decimal(n, u32::MAX as u64).ok_or(DmqReject::BadCSeq)? as u32;
    if method != METHOD {
        return Err(DmqReject::NotKdmq);
    }
    Ok(CSeq { number, method })
}

/// `SIP/2.0/UDP host[:port] *(;param)`, LWS allowed around `/` and `;`.
fn parse_via(v: &str) -> Option<Via<'_>> {
    let v = v.trim_matches([' ', '\t']);
    let (proto, rest) = v.split_once([' ', '\t'])?;
    let mut p = proto.split('/');
    let (Some(name), Some(ver), Some(transport), None) = (p.next(), p.next(), p.next(), p.next())
    else {
        return None;
    };
    if !name.eq_ignore_ascii_case("SIP") || ver != "2.0" || !uri::is_token(transport) {
        return None;
    }
    let mut params = rest.split(';');
    let sent_by = params.next()?.trim_matches([' ', '\t']);
    let (host_text, port) = split_host_port(sent_by)?;
    let host = uri::parse_host(host_text).ok()?;
    let mut via = Via {
        transport,
        sent_by,
        host,
        port,
        branch: None,
        received: None,
        rport: None,
    };
    for param in params {
        let param = param.trim_matches([' ', '\t']);
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim_end(), Some(v.trim_start())),
            None => (param, None),
        };
        if !uri::is_token(name) {
            return None;
        }
        if name.eq_ignore_ascii_case("branch") && via.branch.is_none() {
            via.branch = Some(value?);
        } else if name.eq_ignore_ascii_case("received") && via.received.is_none() {
            via.received = Some(value?);
        } else if name.eq_ignore_ascii_case("rport") && via.rport.is_none() {
            via.rport = Some(match value {
                None => None,
                Some(p) => Some(parse_decimal(p, 65_535).filter(|&p| p != 0)? as u16),
            });
        }
    }
    Some(via)
}

/// `host[:port]` with IPv6 in brackets.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if s.starts_with('[') {
        let close = s.find(']')?;
        let (h, rest) = s.split_at(close + 1);
        match rest.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if rest.is_empty() => (h, None),
            None => return None,
        }
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(parse_decimal(p, 65_535).filter(|&p| p != 0)? as u16),
    };
    Some((host, port))
}

/// From/To: `[display] <uri> *(;param)` or `uri *(;param)` (RFC 3261 §20.10:
/// without angle brackets, the first `;` starts the header parameters).
fn parse_name_addr(raw: &str) -> Option<NameAddr<'_>> {
    let (uri_text, params) = match raw.find('<') {
        Some(open) => {
            let close = open + raw[open..].find('>')?;
            (&raw[open + 1..close], &raw[close + 1..])
        }
        None => match raw.find(';') {
            Some(semi) => (&raw[..semi], &raw[semi..]),
            None => (raw, ""),
        },
    };
    let uri_text = uri_text.trim_matches([' ', '\t']);
    SipUri::parse(uri_text).ok()?;
    let mut tag = None;
    let params = params.trim_matches([' ', '\t']);
    if !params.is_empty() {
        let params = params.strip_prefix(';')?;
        for p in params.split(';') {
            let p = p.trim_matches([' ', '\t']);
            let (name, value) = match p.split_once('=') {
                Some((n, v)) => (n.trim_end(), Some(v.trim_start())),
                None => (p, None),
            };
            if !uri::is_token(name) {
                return None;
            }
            if name.eq_ignore_ascii_case("tag") {
                let v = value.filter(|v| uri::is_token(v))?;
                if tag.replace(v).is_some() {
                    return None;
                }
            }
        }
    }
    Some(NameAddr {
        raw,
        uri: uri_text,
        tag,
    })
}

/// Whether `s` can go into a header value: no CR, LF or other control byte.
fn header_safe(s: &str) -> bool {
    !s.bytes().any(|c| c < 0x20 && c != b'\t' || c == 0x7f)
}

/// Appends a response to `req` (RFC 3261 §8.2.6): every Via in order, From,
/// To (with `;tag=<to_tag>` added when it has none and `to_tag` is not
/// empty), Call-ID, CSeq, `Content-Length: 0`. Kamailio's tm matches it by
/// the top Via branch and CSeq method (RFC 3261 §17.1.3).
///
/// `reason` and `to_tag` are kaping's own text: a CR or LF in them would
/// split the response, so they are asserted free of control bytes.
pub fn write_response(req: &Message, code: u16, reason: &str, to_tag: &str, out: &mut Vec<u8>) {
    assert!((100..=699).contains(&code), "status {code} out of range");
    assert!(
        header_safe(reason) && header_safe(to_tag),
        "CR/LF in reason or tag"
    );
    let mut s = String::with_capacity(256);
    let _ = write!(s, "SIP/2.0 {code} {reason}\r\n");
    for via in &req.vias {
        let _ = write!(s, "Via: {via}\r\n");
    }
    let _ = write!(s, "From: {}\r\n", req.from.raw);
    if req.to.tag.is_none() && !to_tag.is_empty() {
        let _ = write!(s, "To: {};tag={to_tag}\r\n", req.to.raw);
    } else {
        let _ = write!(s, "To: {}\r\n", req.to.raw);
    }
    let _ = write!(s, "Call-ID: {}\r\n", req.call_id);
    let _ = write!(s, "CSeq: {} {}\r\n", req.cseq.number, req.cseq.method);
    s.push_str("Content-Length: 0\r\n\r\n");
    out.extend_from_slice(s.as_bytes());
}

/// What [`write_request`] sends.
#[derive(Clone, Copy, Debug)]
pub struct RequestSpec<'a> {
    /// DMQ channel (peer id): [`CHANNEL_NOTIFICATION`], [`CHANNEL_USRLOC`], ...
    pub channel: &'a str,
    /// The Kamailio node: Request-URI and To host.
    pub target: SocketAddr,
    /// kaping's node address: Via sent-by and From host. It must be the
    /// address in kaping's [`join_body`]: Kamailio looks the sender up by
    /// the From URI host and port, and a sync request from an unknown
    /// sender is answered by a broadcast to every node.
    pub local: SocketAddr,
    /// Via branch; the `z9hG4bK` cookie is prepended when missing.
    pub branch: &'a str,
    pub call_id: &'a str,
    pub from_tag: &'a str,
    pub cseq: u32,
    pub body: &'a [u8],
    /// [`CONTENT_TYPE_NODES`] or [`CONTENT_TYPE_JSON`].
    pub content_type: &'a str,
    /// Kamailio re-broadcasts a node list it learnt something from when
    /// Max-Forwards minus one is still positive (2 = tell the other nodes).
    pub max_forwards: u8,
}

/// `host:port` for a URI or Via, IPv6 in brackets, never a scope id.
fn host_port(a: SocketAddr) -> String {
    match a.ip() {
        IpAddr::V4(ip) => format!("{ip}:{}", a.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", a.port()),
    }
}

/// Appends a KDMQ request shaped as Kamailio's `dmq_send_message()` shapes
/// it: R-URI and To `sip:<channel>@<target>`, From
/// `sip:<channel>@<local>;tag=..`, `CSeq: n KDMQ`, Max-Forwards and
/// Content-Type, Content-Length and the body.
///
/// The caller's strings are asserted free of CR/LF (they are kaping's own).
pub fn write_request(r: &RequestSpec, out: &mut Vec<u8>) {
    assert!(
        [r.channel, r.branch, r.call_id, r.from_tag, r.content_type]
            .iter()
            .all(|s| header_safe(s) && !s.contains(' ')),
        "request field with a space or a control byte"
    );
    let target = host_port(r.target);
    let local = host_port(r.local);
    let cookie = if r.branch.starts_with(BRANCH_COOKIE) {
        ""
    } else {
        BRANCH_COOKIE
    };
    let mut s = String::with_capacity(320);
    let _ = write!(
        s,
        "{METHOD} sip:{ch}@{target} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {local};branch={cookie}{br}\r\n\
         From: <sip:{ch}@{local}>;tag={ft}\r\n\
         To: <sip:{ch}@{target}>\r\n\
         Call-ID: {cid}\r\n\
         CSeq: {cseq} {METHOD}\r\n\
         Max-Forwards: {mf}\r\n\
         Content-Type: {ct}\r\n\
         Content-Length: {len}\r\n\r\n",
        ch = r.channel,
        br = r.branch,
        ft = r.from_tag,
        cid = r.call_id,
        cseq = r.cseq,
        mf = r.max_forwards,
        ct = r.content_type,
        len = r.body.len(),
    );
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(r.body);
}

/// The body of a join (a `notification_peer` request): kaping's node line.
///
/// The CRLF is required: Kamailio's `extract_node_list()` drops the last
/// byte of a final line that has no line feed (`status=activ`, refused).
pub fn join_body(node: SocketAddr) -> String {
    format!("sip:{};status=active\r\n", host_port(node))
}

/// A node's state as Kamailio names it (`dmqnode.c`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeStatus {
    Active,
    NotActive,
    Disabled,
}

impl NodeStatus {
    /// The `status=` value.
    pub const fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Active => "active",
            NodeStatus::NotActive => "not_active",
            NodeStatus::Disabled => "disabled",
        }
    }
}

/// One line of a node list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The line, trimmed: `sip:host:port[;transport=..];status=..`.
    pub uri: String,
    /// Host and port when the host is an IP literal (Kamailio writes the
    /// host of its `server_address` as configured: a name stays a name).
    pub addr: Option<SocketAddr>,
    pub status: NodeStatus,
}

/// Parses a `notification_peer` body: one `sip:` URI per line, CRLF (or LF)
/// separated, `status=active|not_active|disabled` (absent = active, as
/// `set_default_dmq_node_params()` has it). Empty lines are skipped; a
/// status Kamailio does not know is a reject, as in `set_dmq_node_params()`.
/// Kamailio lists itself, and lists its own address twice when its
/// `notification_address` is its `server_address`: duplicates are kept.
pub fn parse_node_list(body: &[u8]) -> Result<Vec<Node>, DmqReject> {
    if body.len() > DATAGRAM_LEN_MAX {
        return Err(DmqReject::Oversized);
    }
    let mut nodes = Vec::new();
    for line in body.split(|&c| c == b'\n') {
        let line = line
            .iter()
            .rposition(|&c| !matches!(c, b'\r' | b'\0' | b' ' | b'\t'))
            .map_or(&line[..0], |end| &line[..=end]);
        if line.is_empty() {
            continue;
        }
        if nodes.len() == NODES_MAX {
            return Err(DmqReject::TooManyNodes);
        }
        if line.len() > NODE_LINE_LEN_MAX {
            return Err(DmqReject::BadNodeUri);
        }
        let text = std::str::from_utf8(line).map_err(|_| DmqReject::BadNodeUri)?;
        let u = SipUri::parse(text).map_err(|_| DmqReject::BadNodeUri)?;
        let status = match u.param("status") {
            None => NodeStatus::Active,
            Some(Some("active")) => NodeStatus::Active,
            Some(Some("not_active")) => NodeStatus::NotActive,
            Some(Some("disabled")) => NodeStatus::Disabled,
            Some(_) => return Err(DmqReject::BadNodeStatus),
        };
        let addr = match u.host {
            Host::V4(a) => Some(SocketAddr::new(IpAddr::V4(a), u.port_or_default())),
            Host::V6(a) => Some(SocketAddr::new(IpAddr::V6(a), u.port_or_default())),
            Host::Name(_) => None,
        };
        nodes.push(Node {
            uri: text.to_owned(),
            addr,
            status,
        });
    }
    Ok(nodes)
}
