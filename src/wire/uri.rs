//! SIP URIs: parsing (RFC 3261 §19.1, grammar of §25.1) and the choice of
//! where a keepalive for a contact is sent.
//!
//! Owns: [`SipUri`] (a borrowed view of a `sip:`/`sips:` URI), [`Host`],
//! [`Transport`], [`UriError`], and [`destination`], which applies Kamailio's
//! next-hop order (usrloc `ul_keepalive.c`: `received`, else the first Path
//! hop, else the contact) including the `received=` parameter that Kamailio's
//! path module writes on its own Path hop (`add_path_received()`).
//!
//! Invariants:
//! * A `SipUri` returned by [`SipUri::parse`] borrows its input; every field
//!   holds text the §25.1 grammar accepts: `params` is either `""` or starts
//!   with `;` and holds well-formed `uri-parameter`s, `headers` is either `""`
//!   or starts with `?` and holds well-formed `header`s. Escapes (`%HH`) are
//!   validated and kept raw.
//! * Every error carries the byte offset (into the string that was parsed) of
//!   the first byte the grammar does not accept, and a kind saying what was
//!   expected there.
//!
//! Never: parsing never allocates and never panics on any input (a property
//! test feeds arbitrary strings). Only [`destination`] allocates (the
//! `String` of an unresolved host name, the unescaped `received=` value): it
//! runs when a contact is added, not per packet. Nothing here resolves names
//! or does I/O.
//!
//! Callers: the contact loaders and the control socket (add time), and
//! `wire::template` (local host validation, `to_uri`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Default port of `sip:` URIs (RFC 3261 §19.1.2).
pub const SIP_PORT: u16 = 5060;
/// Default port of `sips:` URIs and of `transport=tls` (RFC 3261 §19.1.2).
pub const SIPS_PORT: u16 = 5061;

/// URI scheme. Compared case-insensitively when parsed (RFC 3261 §19.1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    Sip,
    Sips,
}

impl Scheme {
    /// Lower-case scheme name without the colon.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Sip => "sip",
            Scheme::Sips => "sips",
        }
    }
}

/// Value of the `transport` URI parameter (RFC 3261 §19.1.1, RFC 7118 for
/// `ws`/`wss`). Unknown values are `Other`: the grammar allows any token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
    Sctp,
    Ws,
    Wss,
    Other,
}

impl Transport {
    /// Maps a `transport=` value, case-insensitively ("TCP" and "tcp" are
    /// the same transport, RFC 3261 §19.1.4).
    pub fn from_param(value: &str) -> Transport {
        const NAMES: [(&str, Transport); 6] = [
            ("udp", Transport::Udp),
            ("tcp", Transport::Tcp),
            ("tls", Transport::Tls),
            ("sctp", Transport::Sctp),
            ("ws", Transport::Ws),
            ("wss", Transport::Wss),
        ];
        NAMES
            .iter()
            .find(|(name, _)| value.eq_ignore_ascii_case(name))
            .map_or(Transport::Other, |&(_, t)| t)
    }
}

/// The `host` of a SIP URI (RFC 3261 §25.1: `hostname / IPv4address / IPv6reference`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host<'a> {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    /// A host name exactly as written (case kept, optional trailing dot kept).
    Name(&'a str),
}

impl fmt::Display for Host<'_> {
    /// The URI form: IPv6 in brackets (`IPv6reference`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::V4(a) => write!(f, "{a}"),
            Host::V6(a) => write!(f, "[{a}]"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// A parsed `sip:`/`sips:` URI borrowing its text. A password in the
/// userinfo is accepted (RFC 3261 §19.1.1 allows it, while advising against
/// it) and dropped: nothing here needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SipUri<'a> {
    pub scheme: Scheme,
    /// Raw user part (escapes kept), `None` when the URI has no userinfo.
    pub user: Option<&'a str>,
    pub host: Host<'a>,
    /// Explicit port; never `Some(0)`.
    pub port: Option<u16>,
    /// Raw `;a=b;c` including the leading `;`, or `""`.
    pub params: &'a str,
    /// Raw `?h=v&...` including the leading `?`, or `""`.
    pub headers: &'a str,
}

/// What the grammar rejected. The `Display` text is what an operator reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum UriErrorKind {
    #[error("empty URI")]
    Empty,
    #[error("scheme is not 'sip:' or 'sips:'")]
    Scheme,
    #[error("empty user before '@'")]
    UserEmpty,
    #[error("character not allowed in user part")]
    UserChar,
    #[error("character not allowed in password")]
    PasswordChar,
    #[error("bad escape ('%' must be followed by two hex digits)")]
    Escape,
    #[error("missing host")]
    HostEmpty,
    #[error("character not allowed in host name")]
    HostChar,
    #[error("empty host name label or '-' at the edge of a label")]
    HostLabel,
    #[error("top-level host name label must start with a letter")]
    TopLabel,
    #[error("bad IPv4 address")]
    Ipv4,
    #[error("bad IPv6 address")]
    Ipv6,
    #[error("'[' of an IPv6 reference is not closed by ']'")]
    Ipv6Unclosed,
    #[error("IPv6 address must be enclosed in '[' ']'")]
    Ipv6Bare,
    #[error("empty port after ':'")]
    PortEmpty,
    #[error("port is not a decimal number")]
    PortChar,
    #[error("port 0 is not a usable port")]
    PortZero,
    #[error("port out of range (1..=65535)")]
    PortRange,
    #[error("empty parameter name")]
    ParamNameEmpty,
    #[error("empty parameter value after '='")]
    ParamValueEmpty,
    #[error("character not allowed in URI parameter")]
    ParamChar,
    #[error("empty header name")]
    HeaderNameEmpty,
    #[error("URI header without '=value'")]
    HeaderValueMissing,
    #[error("character not allowed in URI header")]
    HeaderChar,
    #[error("unexpected character after host")]
    Trailing,
    #[error("Path value has no '<uri>' hop")]
    PathNoHop,
    #[error("'<' of a Path hop is not closed by '>'")]
    PathUnclosed,
    #[error("received parameter of a Path hop has no value")]
    ReceivedEmpty,
}

/// A URI (or Path value) the grammar rejects: what and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{kind} at byte {at}")]
pub struct UriError {
    pub kind: UriErrorKind,
    /// Byte offset into the parsed string of the first rejected byte (the
    /// string length when something is missing at the end).
    pub at: usize,
}

fn err<T>(kind: UriErrorKind, at: usize) -> Result<T, UriError> {
    Err(UriError { kind, at })
}

// ---------------------------------------------------------------------------
// Character classes of RFC 3261 §25.1, one table lookup per byte.

const ALNUM: u8 = 1 << 0;
/// `unreserved = alphanum / mark`, `mark = - _ . ! ~ * ' ( )`.
const UNRESERVED: u8 = 1 << 1;
/// `user-unreserved = & = + $ , ; ? /`.
const USER_UNRESERVED: u8 = 1 << 2;
/// Extra password characters: `& = + $ ,`.
const PASSWORD_EXTRA: u8 = 1 << 3;
/// `param-unreserved = [ ] / : & + $`.
const PARAM_UNRESERVED: u8 = 1 << 4;
/// `hnv-unreserved = [ ] / ? : + $`.
const HNV_UNRESERVED: u8 = 1 << 5;
/// `token = 1*(alphanum / - . ! % * _ + ` ' ~)`.
const TOKEN: u8 = 1 << 6;

const fn mark_all(mut t: [u8; 256], chars: &[u8], flag: u8) -> [u8; 256] {
    let mut i = 0;
    while i < chars.len() {
        t[chars[i] as usize] |= flag;
        i += 1;
    }
    t
}

const CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        if b.is_ascii_alphanumeric() {
            t[c] |= ALNUM | UNRESERVED | TOKEN;
        }
        c += 1;
    }
    t = mark_all(t, b"-_.!~*'()", UNRESERVED);
    t = mark_all(t, b"&=+$,;?/", USER_UNRESERVED);
    t = mark_all(t, b"&=+$,", PASSWORD_EXTRA);
    t = mark_all(t, b"[]/:&+$", PARAM_UNRESERVED);
    t = mark_all(t, b"[]/?:+$", HNV_UNRESERVED);
    t = mark_all(t, b"-.!%*_+`'~", TOKEN);
    t
};

#[inline]
fn class(b: u8, flags: u8) -> bool {
    CLASS[b as usize] & flags != 0
}

/// Whether `s` is a non-empty RFC 3261 `token` (§25.1): method names,
/// header names, transport names, tags.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| class(b, TOKEN))
}

/// Validates `b[start..end]` as a run of bytes in `allowed` or `escaped`
/// (`"%" HEXDIG HEXDIG`); `bad` is the kind reported for a stray byte.
fn check_run(
    b: &[u8],
    start: usize,
    end: usize,
    allowed: u8,
    bad: UriErrorKind,
) -> Result<(), UriError> {
    let mut i = start;
    while i < end {
        let c = b[i];
        if c == b'%' {
            let hex = |j: usize| j < end && b[j].is_ascii_hexdigit();
            if !(hex(i + 1) && hex(i + 2)) {
                return err(UriErrorKind::Escape, i);
            }
            i += 3;
        } else if class(c, allowed) {
            i += 1;
        } else {
            return err(bad, i);
        }
    }
    Ok(())
}

/// Index of the first byte at or after `from` that is in `stops`, or `b.len()`.
fn find_any(b: &[u8], from: usize, stops: &[u8]) -> usize {
    b[from..]
        .iter()
        .position(|c| stops.contains(c))
        .map_or(b.len(), |p| from + p)
}

// ---------------------------------------------------------------------------
// Host.

/// Parses a whole string as an RFC 3261 `host`: `IPv4address`,
/// `IPv6reference` (`[...]`, contents checked by std) or `hostname`. Used by
/// the template to validate the configured local host. Error offsets are
/// into `s`.
pub fn parse_host(s: &str) -> Result<Host<'_>, UriError> {
    let (host, end) = parse_host_at(s, 0, s.len())?;
    if end != s.len() {
        return err(UriErrorKind::Trailing, end);
    }
    Ok(host)
}

/// Parses the host starting at `start`; the host ends at `limit` or at the
/// first `:` `;` `?` (outside brackets). Returns the host and the index after it.
fn parse_host_at(s: &str, start: usize, limit: usize) -> Result<(Host<'_>, usize), UriError> {
    let b = &s.as_bytes()[..limit];
    if start >= b.len() {
        return err(UriErrorKind::HostEmpty, start);
    }
    if b[start] == b'[' {
        let Some(close) = b[start..].iter().position(|&c| c == b']') else {
            return err(UriErrorKind::Ipv6Unclosed, start);
        };
        let close = start + close;
        let inner = &s[start + 1..close];
        let Ok(addr) = inner.parse::<Ipv6Addr>() else {
            return err(UriErrorKind::Ipv6, start + 1);
        };
        return Ok((Host::V6(addr), close + 1));
    }
    let end = find_any(b, start, b":;?");
    // An IPv6 address without brackets would otherwise surface as a
    // confusing "bad port"; two colons before any parameter give it away.
    if end < b.len() && b[end] == b':' {
        let rest = find_any(b, end + 1, b";?");
        if b[end + 1..rest].contains(&b':') {
            return err(UriErrorKind::Ipv6Bare, start);
        }
    }
    if end == start {
        return err(UriErrorKind::HostEmpty, start);
    }
    let text = &b[start..end];
    if text.iter().all(|&c| c.is_ascii_digit() || c == b'.') {
        return parse_ipv4(b, start, end).map(|a| (Host::V4(a), end));
    }
    check_hostname(b, start, end)?;
    Ok((Host::Name(&s[start..end]), end))
}

/// `IPv4address = 1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT "." 1*3DIGIT`, each ≤ 255.
/// Written out rather than `Ipv4Addr::from_str` because std rejects leading
/// zeros, which the RFC 3261 grammar allows (and means decimal).
fn parse_ipv4(b: &[u8], start: usize, end: usize) -> Result<Ipv4Addr, UriError> {
    let mut octets = [0u8; 4];
    let mut i = start;
    for (n, octet) in octets.iter_mut().enumerate() {
        let part_start = i;
        let mut value: u32 = 0;
        while i < end && b[i].is_ascii_digit() {
            if i - part_start == 3 {
                return err(UriErrorKind::Ipv4, part_start);
            }
            value = value * 10 + u32::from(b[i] - b'0');
            i += 1;
        }
        if i == part_start || value > 255 {
            return err(UriErrorKind::Ipv4, part_start);
        }
        *octet = value as u8;
        if n < 3 {
            if i >= end || b[i] != b'.' {
                return err(UriErrorKind::Ipv4, i);
            }
            i += 1;
        }
    }
    if i != end {
        return err(UriErrorKind::Ipv4, i);
    }
    Ok(Ipv4Addr::from(octets))
}

/// `hostname = *( domainlabel "." ) toplabel [ "." ]`,
/// `domainlabel = alphanum / alphanum *( alphanum / "-" ) alphanum`,
/// `toplabel = ALPHA / ALPHA *( alphanum / "-" ) alphanum`.
fn check_hostname(b: &[u8], start: usize, end: usize) -> Result<(), UriError> {
    // The optional trailing dot of a fully qualified name.
    let names_end = if end - start > 1 && b[end - 1] == b'.' {
        end - 1
    } else {
        end
    };
    let mut label_start = start;
    let mut i = start;
    loop {
        if i == names_end || b[i] == b'.' {
            if i == label_start {
                return err(UriErrorKind::HostLabel, i);
            }
            if b[label_start] == b'-' {
                return err(UriErrorKind::HostLabel, label_start);
            }
            if b[i - 1] == b'-' {
                return err(UriErrorKind::HostLabel, i - 1);
            }
            if i == names_end {
                if !b[label_start].is_ascii_alphabetic() {
                    return err(UriErrorKind::TopLabel, label_start);
                }
                return Ok(());
            }
            label_start = i + 1;
        } else if !class(b[i], ALNUM) && b[i] != b'-' {
            return err(UriErrorKind::HostChar, i);
        }
        i += 1;
    }
}

// ---------------------------------------------------------------------------
// URI.

impl<'a> SipUri<'a> {
    /// Parses `SIP-URI` / `SIPS-URI` (RFC 3261 §19.1.1, §25.1). Never
    /// allocates, never panics.
    pub fn parse(s: &'a str) -> Result<SipUri<'a>, UriError> {
        let b = s.as_bytes();
        if b.is_empty() {
            return err(UriErrorKind::Empty, 0);
        }
        let (scheme, mut i) = if starts_with_ci(b, b"sip:") {
            (Scheme::Sip, 4)
        } else if starts_with_ci(b, b"sips:") {
            (Scheme::Sips, 5)
        } else {
            return err(UriErrorKind::Scheme, 0);
        };

        // userinfo = ( user / telephone-subscriber ) [ ":" password ] "@".
        // '@' may appear nowhere else in a valid URI (not in host, paramchar
        // or hnv chars), so the first '@' ends the userinfo.
        let mut user = None;
        if let Some(rel) = b[i..].iter().position(|&c| c == b'@') {
            let at = i + rel;
            let colon = b[i..at].iter().position(|&c| c == b':').map(|p| i + p);
            let user_end = colon.unwrap_or(at);
            if user_end == i {
                return err(UriErrorKind::UserEmpty, i);
            }
            check_run(
                b,
                i,
                user_end,
                UNRESERVED | USER_UNRESERVED,
                UriErrorKind::UserChar,
            )?;
            if let Some(colon) = colon {
                check_run(
                    b,
                    colon + 1,
                    at,
                    UNRESERVED | PASSWORD_EXTRA,
                    UriErrorKind::PasswordChar,
                )?;
            }
            user = Some(&s[i..user_end]);
            i = at + 1;
        }

        let (host, next) = parse_host_at(s, i, b.len())?;
        i = next;

        let mut port = None;
        if i < b.len() && b[i] == b':' {
            let (p, next) = parse_port(b, i + 1)?;
            port = Some(p);
            i = next;
        }

        let params_start = i;
        while i < b.len() && b[i] == b';' {
            i = parse_param(b, i + 1)?;
        }
        let params = &s[params_start..i];

        let headers_start = i;
        if i < b.len() && b[i] == b'?' {
            i = parse_headers(b, i + 1)?;
        }
        let headers = &s[headers_start..i];

        if i != b.len() {
            return err(UriErrorKind::Trailing, i);
        }
        Ok(SipUri {
            scheme,
            user,
            host,
            port,
            params,
            headers,
        })
    }

    /// The value of URI parameter `name` (compared case-insensitively,
    /// RFC 3261 §19.1.4): `None` if absent, `Some(None)` for a flag such as
    /// `;lr`, `Some(Some(value))` otherwise (value raw, escapes kept).
    /// The first occurrence wins.
    pub fn param(&self, name: &str) -> Option<Option<&'a str>> {
        let params: &'a str = self.params;
        params
            .split(';')
            .skip(1)
            .find_map(|p| match p.split_once('=') {
                Some((n, v)) if n.eq_ignore_ascii_case(name) => Some(Some(v)),
                None if p.eq_ignore_ascii_case(name) => Some(None),
                _ => None,
            })
    }

    /// The transport the URI asks for: its `transport=` parameter, else
    /// TLS for `sips:` and UDP for `sip:` (RFC 3261 §19.1.2; §26.2.2 for
    /// sips over TLS). A valueless `;transport` counts as absent.
    pub fn transport(&self) -> Transport {
        match self.param("transport") {
            Some(Some(v)) => Transport::from_param(v),
            _ => match self.scheme {
                Scheme::Sip => Transport::Udp,
                Scheme::Sips => Transport::Tls,
            },
        }
    }

    /// The explicit port, else 5061 for `sips:` or `transport=tls`, else
    /// 5060 (RFC 3261 §19.1.2). Resolution (NAPTR/SRV, RFC 3263) is not done
    /// here: a name is sent to at this port once it is resolved.
    pub fn port_or_default(&self) -> u16 {
        match self.port {
            Some(p) => p,
            None if self.scheme == Scheme::Sips || self.transport() == Transport::Tls => SIPS_PORT,
            None => SIP_PORT,
        }
    }
}

impl fmt::Display for SipUri<'_> {
    /// Writes the URI back in RFC 3261 form (scheme lower case, IPv6 in
    /// brackets, password dropped); parsing the output gives an equal value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.scheme.as_str())?;
        f.write_str(":")?;
        if let Some(user) = self.user {
            write!(f, "{user}@")?;
        }
        write!(f, "{}", self.host)?;
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        f.write_str(self.params)?;
        f.write_str(self.headers)
    }
}

fn starts_with_ci(b: &[u8], prefix: &[u8]) -> bool {
    b.len() >= prefix.len() && b[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// `port = 1*DIGIT`, restricted to 1..=65535. `start` is just after ':'.
fn parse_port(b: &[u8], start: usize) -> Result<(u16, usize), UriError> {
    let end = find_any(b, start, b";?");
    if end == start {
        return err(UriErrorKind::PortEmpty, start);
    }
    let mut value: u32 = 0;
    for (i, &c) in b.iter().enumerate().take(end).skip(start) {
        if !c.is_ascii_digit() {
            return err(UriErrorKind::PortChar, i);
        }
        // Saturate instead of overflowing on absurdly long digit runs.
        value = (value * 10 + u32::from(c - b'0')).min(1 << 20);
    }
    match u16::try_from(value) {
        Ok(0) => err(UriErrorKind::PortZero, start),
        Ok(p) => Ok((p, end)),
        Err(_) => err(UriErrorKind::PortRange, start),
    }
}

/// `uri-parameter = pname [ "=" pvalue ]`, `pname = pvalue = 1*paramchar`.
/// `start` is just after ';'; returns the index of the byte ending it.
fn parse_param(b: &[u8], start: usize) -> Result<usize, UriError> {
    let end = find_any(b, start, b";?");
    let eq = b[start..end]
        .iter()
        .position(|&c| c == b'=')
        .map(|p| start + p);
    let name_end = eq.unwrap_or(end);
    if name_end == start {
        return err(UriErrorKind::ParamNameEmpty, start);
    }
    let paramchar = UNRESERVED | PARAM_UNRESERVED;
    check_run(b, start, name_end, paramchar, UriErrorKind::ParamChar)?;
    if let Some(eq) = eq {
        if eq + 1 == end {
            return err(UriErrorKind::ParamValueEmpty, end);
        }
        check_run(b, eq + 1, end, paramchar, UriErrorKind::ParamChar)?;
    }
    Ok(end)
}

/// `headers = "?" header *( "&" header )`, `header = hname "=" hvalue`,
/// `hname = 1*( hnv-unreserved / unreserved / escaped )`, `hvalue = *( ... )`.
/// `start` is just after '?'; headers run to the end of the URI.
fn parse_headers(b: &[u8], start: usize) -> Result<usize, UriError> {
    let hchar = UNRESERVED | HNV_UNRESERVED;
    let mut i = start;
    loop {
        let end = find_any(b, i, b"&");
        let eq = b[i..end].iter().position(|&c| c == b'=').map(|p| i + p);
        if eq == Some(i) || end == i {
            return err(UriErrorKind::HeaderNameEmpty, i);
        }
        let Some(eq) = eq else {
            check_run(b, i, end, hchar, UriErrorKind::HeaderChar)?;
            return err(UriErrorKind::HeaderValueMissing, end);
        };
        check_run(b, i, eq, hchar, UriErrorKind::HeaderChar)?;
        check_run(b, eq + 1, end, hchar, UriErrorKind::HeaderChar)?;
        if end == b.len() {
            return Ok(end);
        }
        i = end + 1;
    }
}

// ---------------------------------------------------------------------------
// Path and destination.

/// The URI inside the first `<...>` of a Path or Route value (RFC 3327 §4:
/// `path-value = name-addr *( SEMI rr-param )`, so hops are always in angle
/// brackets). A display name, quoted or not, may precede the `<`. The URI
/// itself is not validated here. Offsets are into `path`.
pub fn first_path_hop(path: &str) -> Result<&str, UriError> {
    let b = path.as_bytes();
    let mut in_quote = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' if in_quote => i += 1,
            b'"' => in_quote = !in_quote,
            b'<' if !in_quote => {
                let Some(close) = b[i + 1..].iter().position(|&c| c == b'>') else {
                    return err(UriErrorKind::PathUnclosed, i);
                };
                return Ok(&path[i + 1..i + 1 + close]);
            }
            _ => {}
        }
        i += 1;
    }
    err(UriErrorKind::PathNoHop, b.len())
}

/// Where a ping is sent. `Name(host)` is returned unresolved; resolution
/// (RFC 3263) is not done here.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

/// The next hop of a keepalive and the transport its URI asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub target: Target,
    pub transport: Transport,
}

/// Which input of [`destination_of`] an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UriPart {
    Contact,
    Received,
    Path,
}

impl fmt::Display for UriPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UriPart::Contact => "contact",
            UriPart::Received => "received",
            UriPart::Path => "path",
        })
    }
}

/// A [`UriError`] together with the input it is about: offsets are into
/// that input (for the `received=` value of a Path hop: into the Path).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{part}: {error}")]
pub struct DestinationError {
    pub part: UriPart,
    pub error: UriError,
}

/// Kamailio's order: `received` if set, else the first Path hop (honouring
/// a `received=` parameter on that hop, as Kamailio's path module does),
/// else the contact. See [`destination_of`]; this drops which input failed.
pub fn destination(
    contact: &str,
    received: Option<&str>,
    path: Option<&str>,
) -> Result<Destination, UriError> {
    destination_of(contact, received, path).map_err(|e| e.error)
}

/// The next hop of a keepalive for a contact, in Kamailio's order
/// (usrloc `ul_ka_urecord()`):
/// 1. `received` (the NAT source address the REGISTER came from, itself a
///    URI such as `sip:203.0.113.7:41022`) when set;
/// 2. else the first Path hop (RFC 3327); when that hop carries a
///    `received=` URI parameter — which Kamailio's `add_path_received()`
///    writes, escaped, and its `path_rr_callback()` turns into the dst URI —
///    the unescaped value of that parameter;
/// 3. else the contact URI.
///
/// The transport is the one the chosen URI asks for (as Kamailio takes
/// `duri.proto`). The contact is always validated, since it is the R-URI
/// of every ping. Empty `received`/`path` strings count as unset, like
/// Kamailio's `len > 0` checks; placeholders such as `[not set]` are the
/// loader's business. Allocates; runs at add time only.
pub fn destination_of(
    contact: &str,
    received: Option<&str>,
    path: Option<&str>,
) -> Result<Destination, DestinationError> {
    let contact_uri = SipUri::parse(contact).map_err(|error| DestinationError {
        part: UriPart::Contact,
        error,
    })?;
    destination_of_parsed(&contact_uri, received, path)
}

/// [`destination_of`] for a contact URI the caller has already parsed (the
/// daemon parses each contact once for all it needs).
pub fn destination_of_parsed(
    contact_uri: &SipUri<'_>,
    received: Option<&str>,
    path: Option<&str>,
) -> Result<Destination, DestinationError> {
    let on = |part| move |error| DestinationError { part, error };
    if let Some(received) = received.filter(|r| !r.is_empty()) {
        let uri = SipUri::parse(received).map_err(on(UriPart::Received))?;
        return Ok(destination_from_uri(&uri));
    }
    if let Some(path) = path.filter(|p| !p.is_empty()) {
        return path_destination(path).map_err(on(UriPart::Path));
    }
    Ok(destination_from_uri(contact_uri))
}

fn path_destination(path: &str) -> Result<Destination, UriError> {
    let hop = first_path_hop(path)?;
    let hop_at = offset_in(path, hop);
    let hop_uri = SipUri::parse(hop).map_err(|e| UriError {
        kind: e.kind,
        at: hop_at + e.at,
    })?;
    match hop_uri.param("received") {
        None => Ok(destination_from_uri(&hop_uri)),
        Some(None) => {
            // Point at the valueless `received` flag itself.
            let flag = hop_uri
                .params
                .split(';')
                .find(|p| p.eq_ignore_ascii_case("received"))
                .unwrap_or(hop_uri.params);
            err(UriErrorKind::ReceivedEmpty, offset_in(path, flag))
        }
        Some(Some(raw)) => {
            let raw_at = offset_in(path, raw);
            // The path module escapes the value (`%3Btransport%3Dtcp`);
            // its rr callback unescapes it before use.
            let value = unescape(raw).map_err(|rel| UriError {
                kind: UriErrorKind::Escape,
                at: raw_at + rel,
            })?;
            let uri = SipUri::parse(&value).map_err(|e| UriError {
                kind: e.kind,
                at: raw_at + raw_offset(raw, e.at),
            })?;
            Ok(destination_from_uri(&uri))
        }
    }
}

fn destination_from_uri(uri: &SipUri<'_>) -> Destination {
    let port = uri.port_or_default();
    let target = match uri.host {
        Host::V4(a) => Target::Addr(SocketAddr::new(IpAddr::V4(a), port)),
        Host::V6(a) => Target::Addr(SocketAddr::new(IpAddr::V6(a), port)),
        Host::Name(n) => Target::Name {
            host: n.to_owned(),
            port,
        },
    };
    Destination {
        target,
        transport: uri.transport(),
    }
}

/// Byte offset of `part` inside `whole`; `part` must be a subslice.
fn offset_in(whole: &str, part: &str) -> usize {
    let offset = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    debug_assert!(offset <= whole.len(), "not a subslice");
    offset.min(whole.len())
}

/// Percent-decodes `s` (already validated `%HH` escapes); `Err(offset)` if
/// the result is not UTF-8.
fn unescape(s: &str) -> Result<String, usize> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(hex_val(b[i + 1]) << 4 | hex_val(b[i + 2]));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|e| raw_offset(s, e.utf8_error().valid_up_to()))
}

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

/// Maps an offset in the unescaped form of `raw` back to `raw`.
fn raw_offset(raw: &str, decoded_at: usize) -> usize {
    let b = raw.as_bytes();
    let (mut i, mut d) = (0, 0);
    while i < b.len() && d < decoded_at {
        i += if b[i] == b'%' { 3 } else { 1 };
        d += 1;
    }
    i.min(b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_table_matches_rfc_sets() {
        for b in 0u8..=255 {
            let unreserved = b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b);
            assert_eq!(class(b, UNRESERVED), unreserved, "byte {b:#x}");
            let token = b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b);
            assert_eq!(class(b, TOKEN), token, "byte {b:#x}");
        }
    }

    #[test]
    fn unescape_maps_offsets_back() {
        assert_eq!(unescape("a%3Bb").unwrap(), "a;b");
        assert_eq!(raw_offset("a%3Bb", 2), 4);
        assert_eq!(unescape("%ff").unwrap_err(), 0);
    }
}
