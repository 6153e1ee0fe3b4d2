//! The responder's SIP bytes: a minimal request parser and the response
//! writer (RFC 3261 §8.2.6), both borrowing and allocation-free.
//!
//! `parse` finds the request line and the five headers a response copies
//! (Via, From, To, Call-ID, CSeq; names case-insensitive, compact forms
//! `v`/`f`/`t`/`i` accepted, RFC 3261 §7.3.3), honouring header folding
//! (§7.3.1: a line starting with SP/HT continues the previous header).
//! Everything else is skipped. `write_reply` builds the response into a
//! caller's buffer: status line, every Via in order (the top one gains
//! `received=` when its sent-by differs from the packet source, §18.2.1, and a
//! value for an empty `rport` plus `received=`, RFC 3581 §4), From, To (with a
//! tag added when it has none, §8.2.6.2), Call-ID, CSeq, `Content-Length: 0`.
//!
//! Invariants: never allocates, never panics on any input (every index is
//! checked; a buffer too small yields `None`), never reads past the datagram.
//! This is deliberately not `crate::wire`: the wire module parses the
//! *responses* kaping receives; this parses the *requests* a simulated phone
//! receives, tolerating any well-formed shape (not only kaping's template).
//! Caller: `responder.rs`, once per received datagram.

use std::net::{IpAddr, SocketAddr};

use memchr::{memchr, memchr2};

use super::fate::TAG_LEN;

/// Via header values kept per request; more is refused as unparsable (a
/// keepalive crosses at most a few proxies).
pub const VIA_MAX: usize = 16;

/// Why a datagram was not answered as a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unparsable {
    /// Not a request line (`METHOD SP URI SP SIP/2.0`).
    RequestLine,
    /// A response (`SIP/2.0 ...`): never answered (RFC 3261 §18.1.2).
    Response,
    /// A header line without a colon, or folding before any header.
    HeaderLine,
    /// The datagram ends before the empty line that closes the headers.
    Truncated,
    /// More than [`VIA_MAX`] Via header lines.
    TooManyVias,
    /// Two From, To, Call-ID or CSeq headers (§20: they appear once).
    DuplicateHeader,
    /// No Via (or an empty one): nowhere to send the response (§18.2.2).
    NoVia,
    /// One of the headers every response copies (§8.2.6.2) is missing.
    NoFrom,
    NoTo,
    NoCallId,
    NoCSeq,
}

/// The parts of a request a response needs, borrowed from the datagram.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub method: &'a [u8],
    pub uri: &'a [u8],
    vias: [&'a [u8]; VIA_MAX],
    via_count: usize,
    pub from: &'a [u8],
    pub to: &'a [u8],
    pub call_id: &'a [u8],
    pub cseq: &'a [u8],
}

impl<'a> Request<'a> {
    /// Via header values in message order (one entry per header line; a line
    /// may hold several comma-separated via-parms).
    pub fn vias(&self) -> &[&'a [u8]] {
        &self.vias[..self.via_count]
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Via,
    From,
    To,
    CallId,
    CSeq,
    Other,
}

fn classify(name: &[u8]) -> Kind {
    match name.len() {
        1 => match name[0].to_ascii_lowercase() {
            b'v' => Kind::Via,
            b'f' => Kind::From,
            b't' => Kind::To,
            b'i' => Kind::CallId,
            _ => Kind::Other,
        },
        2 if name.eq_ignore_ascii_case(b"to") => Kind::To,
        3 if name.eq_ignore_ascii_case(b"via") => Kind::Via,
        4 if name.eq_ignore_ascii_case(b"from") => Kind::From,
        4 if name.eq_ignore_ascii_case(b"cseq") => Kind::CSeq,
        7 if name.eq_ignore_ascii_case(b"call-id") => Kind::CallId,
        _ => Kind::Other,
    }
}

#[inline]
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_ws(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|&b| !is_ws(b)).map_or(start, |e| e + 1);
    &s[start..end.max(start)]
}

/// The next line from `pos`: (start, end without CR LF, start of the next).
/// `None` when no LF follows.
#[inline]
fn next_line(d: &[u8], pos: usize) -> Option<(usize, usize, usize)> {
    let nl = pos + memchr(b'\n', d.get(pos..)?)?;
    let end = if nl > pos && d[nl - 1] == b'\r' {
        nl - 1
    } else {
        nl
    };
    Some((pos, end, nl + 1))
}

/// RFC 3261 §25.1 `token` characters (method names).
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
        )
}

/// Parses a request; see the module docs for what is kept.
pub fn parse(d: &[u8]) -> Result<Request<'_>, Unparsable> {
    let (s, e, mut pos) = next_line(d, 0).ok_or(Unparsable::Truncated)?;
    let line = &d[s..e];
    if line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"SIP/") {
        return Err(Unparsable::Response);
    }
    let sp1 = memchr(b' ', line).ok_or(Unparsable::RequestLine)?;
    let method = &line[..sp1];
    let rest = &line[sp1 + 1..];
    let sp2 = memchr(b' ', rest).ok_or(Unparsable::RequestLine)?;
    let uri = &rest[..sp2];
    if method.is_empty() || !method.iter().all(|&b| is_token(b)) || uri.is_empty() {
        return Err(Unparsable::RequestLine);
    }
    if !rest[sp2 + 1..].eq_ignore_ascii_case(b"SIP/2.0") {
        return Err(Unparsable::RequestLine);
    }

    let mut req = Request {
        method,
        uri,
        vias: [&[]; VIA_MAX],
        via_count: 0,
        from: &[],
        to: &[],
        call_id: &[],
        cseq: &[],
    };
    let mut seen = [false; 4]; // From, To, Call-ID, CSeq
                               // The header being read: kind, value start, value end (it grows while
                               // folded continuation lines follow).
    let mut current: Option<(Kind, usize, usize)> = None;
    loop {
        let (s, e, next) = next_line(d, pos).ok_or(Unparsable::Truncated)?;
        pos = next;
        if s < e && (d[s] == b' ' || d[s] == b'\t') {
            // §7.3.1 folding: extend the current value over this line.
            match current.as_mut() {
                Some(cur) => {
                    if !trim(&d[s..e]).is_empty() {
                        cur.2 = e;
                    }
                }
                None => return Err(Unparsable::HeaderLine),
            }
            continue;
        }
        if let Some((kind, vs, ve)) = current.take() {
            commit(&mut req, &mut seen, kind, trim(&d[vs..ve]))?;
        }
        if s == e {
            break; // the empty line ending the headers
        }
        let line = &d[s..e];
        let colon = memchr(b':', line).ok_or(Unparsable::HeaderLine)?;
        let name = trim(&line[..colon]);
        if name.is_empty() {
            return Err(Unparsable::HeaderLine);
        }
        current = Some((classify(name), s + colon + 1, e));
    }
    if req.via_count == 0 {
        return Err(Unparsable::NoVia);
    }
    let missing = [
        Unparsable::NoFrom,
        Unparsable::NoTo,
        Unparsable::NoCallId,
        Unparsable::NoCSeq,
    ];
    for (present, err) in seen.iter().zip(missing) {
        if !present {
            return Err(err);
        }
    }
    Ok(req)
}

fn commit<'a>(
    req: &mut Request<'a>,
    seen: &mut [bool; 4],
    kind: Kind,
    value: &'a [u8],
) -> Result<(), Unparsable> {
    let (index, slot) = match kind {
        Kind::Via => {
            if req.via_count == VIA_MAX {
                return Err(Unparsable::TooManyVias);
            }
            if value.is_empty() {
                return Err(Unparsable::NoVia);
            }
            req.vias[req.via_count] = value;
            req.via_count += 1;
            return Ok(());
        }
        Kind::From => (0, &mut req.from),
        Kind::To => (1, &mut req.to),
        Kind::CallId => (2, &mut req.call_id),
        Kind::CSeq => (3, &mut req.cseq),
        Kind::Other => return Ok(()),
    };
    if seen[index] {
        return Err(Unparsable::DuplicateHeader);
    }
    seen[index] = true;
    *slot = value;
    Ok(())
}

/// How a reply is deliberately broken (`--malformed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malform {
    /// Cut to half its length: no empty line, no Content-Length.
    Truncated,
    /// The From header is left out.
    NoFrom,
    /// One character of the From tag is changed (kaping's MAC must fail).
    BadTag,
}

/// What the response says beyond what it copies.
#[derive(Clone, Copy, Debug)]
pub struct ReplyParams<'a> {
    pub code: u16,
    /// Added to To when the request's To has no tag.
    pub to_tag: &'a [u8; TAG_LEN],
    /// Where the request came from (`received`/`rport`).
    pub source: SocketAddr,
    pub malform: Option<Malform>,
}

/// A bounded writer over a caller's buffer; overflow sticks.
struct Out<'b> {
    buf: &'b mut [u8],
    len: usize,
    overflow: bool,
}

impl Out<'_> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        match self.buf.get_mut(self.len..end) {
            Some(dst) if !self.overflow => {
                dst.copy_from_slice(bytes);
                self.len = end;
            }
            _ => self.overflow = true,
        }
    }

    fn put_u64(&mut self, n: u64) {
        self.put(super::contacts::decimal(n, &mut [0u8; 20]));
    }

    fn put_hex16(&mut self, n: u16) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; 4];
        let mut at = digits.len();
        let mut n = n;
        loop {
            at -= 1;
            digits[at] = HEX[(n & 0xf) as usize];
            n >>= 4;
            if n == 0 {
                break;
            }
        }
        self.put(&digits[at..]);
    }

    /// An IP address as RFC 3261 `received` wants it: dotted quad, or the
    /// uncompressed eight-group IPv6 form (valid RFC 4291 text, no brackets).
    fn put_ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                for (k, o) in v4.octets().iter().enumerate() {
                    if k > 0 {
                        self.put(b".");
                    }
                    self.put_u64(u64::from(*o));
                }
            }
            IpAddr::V6(v6) => {
                for (k, seg) in v6.segments().iter().enumerate() {
                    if k > 0 {
                        self.put(b":");
                    }
                    self.put_hex16(*seg);
                }
            }
        }
    }
}

/// The reason phrase for a status code (RFC 3261 §21), by class when the
/// code is not one of the usual ones.
pub fn reason(code: u16) -> &'static [u8] {
    let usual: Option<&'static [u8]> = match code {
        100 => Some(b"Trying"),
        180 => Some(b"Ringing"),
        200 => Some(b"OK"),
        202 => Some(b"Accepted"),
        301 => Some(b"Moved Permanently"),
        302 => Some(b"Moved Temporarily"),
        400 => Some(b"Bad Request"),
        401 => Some(b"Unauthorized"),
        403 => Some(b"Forbidden"),
        404 => Some(b"Not Found"),
        405 => Some(b"Method Not Allowed"),
        408 => Some(b"Request Timeout"),
        480 => Some(b"Temporarily Unavailable"),
        481 => Some(b"Call/Transaction Does Not Exist"),
        483 => Some(b"Too Many Hops"),
        486 => Some(b"Busy Here"),
        488 => Some(b"Not Acceptable Here"),
        500 => Some(b"Server Internal Error"),
        501 => Some(b"Not Implemented"),
        502 => Some(b"Bad Gateway"),
        503 => Some(b"Service Unavailable"),
        504 => Some(b"Server Time-out"),
        600 => Some(b"Busy Everywhere"),
        603 => Some(b"Decline"),
        604 => Some(b"Does Not Exist Anywhere"),
        _ => None,
    };
    usual.unwrap_or(match code / 100 {
        1 => b"Provisional",
        2 => b"Success",
        3 => b"Redirection",
        4 => b"Client Error",
        5 => b"Server Error",
        _ => b"Global Failure",
    })
}

/// Offset just past the first via-parm of a Via value: the first comma not
/// inside a quoted string.
fn first_via_parm_end(value: &[u8]) -> usize {
    let mut quoted = false;
    for (i, &b) in value.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b',' if !quoted => return i,
            _ => {}
        }
    }
    value.len()
}

/// The range of a header parameter's value (`tag`, `rport`, ...) in a
/// `;`-separated parameter list starting at `from`; `Some((at, at))` for a
/// parameter without `=value`.
fn find_param(s: &[u8], from: usize, name: &[u8]) -> Option<(usize, usize)> {
    let mut pos = from;
    while pos < s.len() {
        let semi = pos + memchr(b';', &s[pos..])?;
        let start = semi + 1;
        let end = start + memchr2(b';', b',', &s[start..]).unwrap_or(s.len() - start);
        let seg = &s[start..end];
        let (n, has_value) = match memchr(b'=', seg) {
            Some(eq) => (&seg[..eq], Some(eq)),
            None => (seg, None),
        };
        if trim(n).eq_ignore_ascii_case(name) {
            return Some(match has_value {
                Some(eq) => {
                    let v = &seg[eq + 1..];
                    let lead = v.iter().position(|&b| !is_ws(b)).unwrap_or(v.len());
                    let t = trim(v);
                    let vs = start + eq + 1 + lead;
                    (vs, vs + t.len())
                }
                None => {
                    // Point just after the trimmed name: where `=value` goes.
                    let lead = seg.iter().position(|&b| !is_ws(b)).unwrap_or(0);
                    let at = start + lead + trim(n).len();
                    (at, at)
                }
            });
        }
        if end < s.len() && s[end] == b',' {
            return None;
        }
        pos = end;
    }
    None
}

/// Where the header parameters of a From/To value start (after `>` for a
/// name-addr, after the URI for an addr-spec: RFC 3261 §20.10 says an
/// addr-spec's `;` parameters are header parameters).
fn header_params_start(value: &[u8]) -> usize {
    match memchr(b'<', value) {
        Some(lt) => memchr(b'>', &value[lt..]).map_or(value.len(), |gt| lt + gt + 1),
        None => memchr(b';', value).unwrap_or(value.len()),
    }
}

/// The From/To tag value range, if any.
pub fn tag_range(value: &[u8]) -> Option<(usize, usize)> {
    find_param(value, header_params_start(value), b"tag").filter(|(s, e)| s < e)
}

/// The host of a via-parm's sent-by (`SIP/2.0/UDP host[:port]`), brackets
/// stripped; `None` when it cannot be found.
fn sent_by_host(parm: &[u8]) -> Option<&[u8]> {
    let head = &parm[..memchr(b';', parm).unwrap_or(parm.len())];
    let slash = memchr::memrchr(b'/', head)?;
    let after = &head[slash + 1..];
    let transport_end = after.iter().position(|&b| is_ws(b)).unwrap_or(after.len());
    let sent_by = trim(&after[transport_end..]);
    if let Some(v6) = sent_by.strip_prefix(b"[") {
        return Some(&v6[..memchr(b']', v6)?]);
    }
    Some(&sent_by[..memchr(b':', sent_by).unwrap_or(sent_by.len())])
}

/// The top Via value with `rport`/`received` filled in (see module docs).
fn write_top_via(out: &mut Out<'_>, value: &[u8], source: SocketAddr) {
    let parm_end = first_via_parm_end(value);
    let parm = trim(&value[..parm_end]);
    let parm_end = parm.len(); // trim only removes trailing space here: values are pre-trimmed
    let rport = find_param(parm, 0, b"rport");
    let has_received = find_param(parm, 0, b"received").is_some();

    let mut ip_text = [0u8; 48];
    let ip_len = {
        let mut o = Out {
            buf: &mut ip_text,
            len: 0,
            overflow: false,
        };
        o.put_ip(source.ip());
        o.len
    };
    // §18.2.1: `received` when the sent-by is a name or another address.
    // Compared as addresses (std's parser does not allocate), so `[::1]`
    // and the uncompressed form written below are the same host.
    let differs = sent_by_host(parm)
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| h.parse::<IpAddr>().ok())
        .is_none_or(|ip| ip != source.ip());
    match rport {
        Some((at, end)) if at == end => {
            out.put(&parm[..at]);
            out.put(b"=");
            out.put_u64(u64::from(source.port()));
            out.put(&parm[at..]);
        }
        _ => out.put(parm),
    }
    let empty_rport = matches!(rport, Some((at, end)) if at == end);
    if (differs || empty_rport) && !has_received {
        out.put(b";received=");
        out.put(&ip_text[..ip_len]);
    }
    out.put(&value[parm_end..]);
}

/// Writes the response to `req` into `buf`; returns its length, or `None`
/// when `buf` is too small.
pub fn write_reply(req: &Request<'_>, p: &ReplyParams<'_>, buf: &mut [u8]) -> Option<usize> {
    let mut out = Out {
        buf,
        len: 0,
        overflow: false,
    };
    // §7.2 Status-Line.
    out.put(b"SIP/2.0 ");
    out.put_u64(u64::from(p.code));
    out.put(b" ");
    out.put(reason(p.code));
    out.put(b"\r\n");
    // §8.2.6.2: Via headers copied in order; the top one gets received/rport.
    for (k, via) in req.vias().iter().enumerate() {
        out.put(b"Via: ");
        if k == 0 {
            write_top_via(&mut out, via, p.source);
        } else {
            out.put(via);
        }
        out.put(b"\r\n");
    }
    if p.malform != Some(Malform::NoFrom) {
        out.put(b"From: ");
        let from_at = out.len;
        out.put(req.from);
        if p.malform == Some(Malform::BadTag) {
            match tag_range(req.from) {
                Some((s, _)) if !out.overflow => {
                    let b = &mut out.buf[from_at + s];
                    *b = if *b == b'x' { b'y' } else { b'x' };
                }
                _ => out.put(b";tag=kaping-loadgen-bad-tag"),
            }
        }
        out.put(b"\r\n");
    }
    out.put(b"To: ");
    out.put(req.to);
    if tag_range(req.to).is_none() {
        out.put(b";tag=");
        out.put(p.to_tag);
    }
    out.put(b"\r\nCall-ID: ");
    out.put(req.call_id);
    out.put(b"\r\nCSeq: ");
    out.put(req.cseq);
    out.put(b"\r\nContent-Length: 0\r\n\r\n");
    if out.overflow {
        return None;
    }
    if p.malform == Some(Malform::Truncated) {
        return Some(out.len / 2);
    }
    Some(out.len)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPTIONS: &[u8] = b"OPTIONS sip:u7@127.0.0.8:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabcdefghijklmnopqrstuvwxyzAB\r\n\
Max-Forwards: 70\r\n\
From: <sip:kaping@10.0.0.1>;tag=abcdefghijklmnopqrstuvwxyzAB\r\n\
To: <sip:u7@example.com>\r\n\
Call-ID: abcdefghijklmnopqrstuvwxyzAB@10.0.0.1\r\n\
CSeq: 0000000042 OPTIONS\r\n\
Content-Length: 0\r\n\r\n";

    fn reply(req: &[u8], params: ReplyParams<'_>) -> String {
        let r = parse(req).unwrap();
        let mut buf = [0xa5u8; 2048];
        let n = write_reply(&r, &params, &mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn params(tag: &[u8; TAG_LEN]) -> ReplyParams<'_> {
        ReplyParams {
            code: 200,
            to_tag: tag,
            source: "10.0.0.1:5060".parse().unwrap(),
            malform: None,
        }
    }

    #[test]
    fn parses_kaping_options() {
        let r = parse(OPTIONS).unwrap();
        assert_eq!(r.method, b"OPTIONS");
        assert_eq!(r.uri, b"sip:u7@127.0.0.8:5060");
        assert_eq!(r.vias().len(), 1);
        assert_eq!(r.cseq, b"0000000042 OPTIONS");
        assert_eq!(r.call_id, b"abcdefghijklmnopqrstuvwxyzAB@10.0.0.1");
        assert_eq!(r.to, b"<sip:u7@example.com>");
    }

    #[test]
    fn answers_with_copied_headers_and_a_to_tag() {
        let tag = *b"0123456789abcdef";
        let text = reply(OPTIONS, params(&tag));
        assert_eq!(
            text,
            "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKabcdefghijklmnopqrstuvwxyzAB\r\n\
From: <sip:kaping@10.0.0.1>;tag=abcdefghijklmnopqrstuvwxyzAB\r\n\
To: <sip:u7@example.com>;tag=0123456789abcdef\r\n\
Call-ID: abcdefghijklmnopqrstuvwxyzAB@10.0.0.1\r\n\
CSeq: 0000000042 OPTIONS\r\n\
Content-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn compact_forms_folding_and_several_vias() {
        let req = b"OPTIONS sip:a@127.0.0.2 SIP/2.0\r\n\
v: SIP/2.0/UDP proxy.example.com;branch=z9hG4bK1;rport, SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK0\r\n\
VIA : SIP/2.0/UDP 10.0.0.7\r\n ;branch=z9hG4bKold\r\n\
f: \"Ping\" <sip:p@x>;tag=t1\r\n\
t: sip:a@x;tag=already\r\n\
i: cid\r\n\
cseq:   1 OPTIONS  \r\n\r\n";
        let tag = *b"0123456789abcdef";
        let mut p = params(&tag);
        p.source = "192.0.2.4:40000".parse().unwrap();
        let text = reply(req, p);
        assert_eq!(
            text,
            "SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP proxy.example.com;branch=z9hG4bK1;rport=40000;received=192.0.2.4, SIP/2.0/UDP 10.0.0.9;branch=z9hG4bK0\r\n\
Via: SIP/2.0/UDP 10.0.0.7\r\n ;branch=z9hG4bKold\r\n\
From: \"Ping\" <sip:p@x>;tag=t1\r\n\
To: sip:a@x;tag=already\r\n\
Call-ID: cid\r\n\
CSeq: 1 OPTIONS\r\n\
Content-Length: 0\r\n\r\n"
        );
    }

    #[test]
    fn received_is_added_for_a_foreign_sent_by_and_ipv6() {
        let req = b"OPTIONS sip:a@[::1] SIP/2.0\r\nVia: SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKx\r\n\
From: <sip:p@x>;tag=t\r\nTo: <sip:a@x>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n\r\n";
        let tag = *b"0123456789abcdef";
        let mut p = params(&tag);
        p.source = "[2001:db8::2]:5060".parse().unwrap();
        let text = reply(req, p);
        assert!(text.contains(
            "Via: SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bKx;received=2001:db8:0:0:0:0:0:2\r\n"
        ));
    }

    #[test]
    fn malformed_variants() {
        let tag = *b"0123456789abcdef";
        let mut p = params(&tag);
        p.malform = Some(Malform::NoFrom);
        assert!(!reply(OPTIONS, p).contains("From:"));
        p.malform = Some(Malform::BadTag);
        assert!(reply(OPTIONS, p)
            .contains("From: <sip:kaping@10.0.0.1>;tag=xbcdefghijklmnopqrstuvwxyzAB\r\n"));
        p.malform = Some(Malform::Truncated);
        let full = reply(OPTIONS, params(&tag));
        assert_eq!(reply(OPTIONS, p), full[..full.len() / 2]);
        p.code = 503;
        p.malform = None;
        assert!(reply(OPTIONS, p).starts_with("SIP/2.0 503 Service Unavailable\r\n"));
    }

    #[test]
    fn refuses_what_it_cannot_answer() {
        let cases: &[(&[u8], Unparsable)] = &[
            (b"", Unparsable::Truncated),
            (b"SIP/2.0 200 OK\r\n\r\n", Unparsable::Response),
            (b"OPTIONS sip:a SIP/3.0\r\n\r\n", Unparsable::RequestLine),
            (b"OPTIONS\r\n\r\n", Unparsable::RequestLine),
            (
                b"OPTIONS sip:a SIP/2.0\r\nVia: x\r\n",
                Unparsable::Truncated,
            ),
            (
                b"OPTIONS sip:a SIP/2.0\r\nnocolon\r\n\r\n",
                Unparsable::HeaderLine,
            ),
            (
                b"OPTIONS sip:a SIP/2.0\r\n folded\r\n\r\n",
                Unparsable::HeaderLine,
            ),
            (
                b"OPTIONS sip:a SIP/2.0\r\nFrom: a\r\n\r\n",
                Unparsable::NoVia,
            ),
            (
                b"OPTIONS sip:a SIP/2.0\r\nVia: v\r\nFrom: a\r\nf: b\r\n\r\n",
                Unparsable::DuplicateHeader,
            ),
            (
                b"OPTIONS sip:a SIP/2.0\r\nVia: v\r\nFrom: a\r\nTo: b\r\nCSeq: 1 OPTIONS\r\n\r\n",
                Unparsable::NoCallId,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse(input).err(),
                Some(*want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn a_short_buffer_is_refused_not_overrun() {
        let r = parse(OPTIONS).unwrap();
        let tag = *b"0123456789abcdef";
        let mut buf = [0u8; 64];
        assert_eq!(write_reply(&r, &params(&tag), &mut buf), None);
    }

    #[test]
    fn never_panics_on_mutations() {
        // Every prefix and every single-byte corruption of a real request.
        let tag = *b"0123456789abcdef";
        let mut buf = [0u8; 4096];
        for cut in 0..OPTIONS.len() {
            if let Ok(r) = parse(&OPTIONS[..cut]) {
                let _ = write_reply(&r, &params(&tag), &mut buf);
            }
        }
        let mut m = OPTIONS.to_vec();
        for i in 0..m.len() {
            for b in [b'\r', b'\n', b' ', b';', b',', b'<', b'>', b'"', b'[', 0] {
                let old = m[i];
                m[i] = b;
                if let Ok(r) = parse(&m) {
                    let _ = write_reply(&r, &params(&tag), &mut buf);
                }
                m[i] = old;
            }
        }
    }
}
