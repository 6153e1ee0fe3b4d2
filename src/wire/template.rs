//! The keepalive request template: every fixed byte rendered once, the
//! per-contact strings and the per-ping fields written at send time.
//!
//! Owns: [`TemplateConfig`] (validated by [`Template::new`]), [`Template`]
//! (the fixed pieces of the request, built once per worker and local
//! socket), [`render`](Template::render) (copies the pieces and the
//! contact's own strings into a caller's staging buffer and returns the
//! [`Layout`] of the fixed-width fields), [`patch`] (writes the token and
//! the CSeq number there) and [`to_uri`] (AoR → To URI, add time).
//!
//! The request (DESIGN §2, Kamailio usrloc keepalive shape, RFC 3261 §8.1.1):
//! ```text
//! OPTIONS <r-uri> SIP/2.0
//! [Via: SIP/2.0/UDP <proxy>;branch=z9hG4bK.<token>;rport]   (sent as the proxy)
//! Via: SIP/2.0/UDP <host>:<port>;branch=z9hG4bK<token>;rport
//! [Route: <path>]
//! Max-Forwards: 70
//! From: <from-uri>;tag=<token>
//! To: <to-uri>
//! Call-ID: <token>@<host>
//! CSeq: <10 digits> OPTIONS
//! [Event: keep-alive]                   (NOTIFY only, as nat_traversal sends)
//! [extra headers]
//! Content-Length: 0
//! ```
//! every line ending in CRLF and the header block in an empty line.
//!
//! Sent as the proxy (DESIGN §10), the request leaves from the proxy's
//! address and carries the proxy's Via on top: the phone answers to the
//! proxy (RFC 3261 §18.2.2, RFC 3581), which finds no transaction for it,
//! removes its own Via and forwards the reply statelessly to the next one,
//! kaping's (§18.2.1 / §16.7 step 3 for a stateless proxy). The top branch
//! starts with [`PROXY_BRANCH_COOKIE`], `z9hG4bK.`: a '.' right after the
//! cookie, which Kamailio's own branches (hex digits there) never have, so
//! the divert program can tell kaping's replies from the proxy's by it.
//!
//! Invariants:
//! * Everything the template itself contributes is validated once in
//!   [`Template::new`]: the method and transport are RFC 3261 tokens, the
//!   From URI and local host parse, extra headers are `Name: value` lines
//!   with a token name and no CR/LF (no header injection), and none of them
//!   duplicates a header the template writes (§8.1.1: each exactly once).
//! * The contact's strings are validated at add time ([`check_contact`]):
//!   `uri` is already the R-URI ([`request_uri`]), `to` the To URI
//!   ([`to_uri`]); `render` copies them verbatim without scanning them
//!   (checked by `debug_assert!`).
//! * After `render`, the token and CSeq positions hold placeholders (valid
//!   token characters and digits), so the bytes always form a well-formed
//!   request; after [`patch`] they hold the ping's own values and no byte of
//!   an earlier patch survives (all fields are fixed width).
//! * Every offset in a [`Layout`] plus its field width is ≤ `Layout::len`
//!   ≤ 65535.
//!
//! Never: `render` and `patch` never allocate, never format and never panic
//! on a buffer they accept (`render` returns `TooLong` for a short buffer;
//! `patch` asserts the layout fits the buffer it is given, a programming
//! error otherwise). `Template::new`, [`check_contact`] and [`to_uri`]
//! allocate and run at start-up or add time only.
//!
//! Callers: the engine's worker (one `Template` per worker and local
//! socket; `render` + `patch` per ping), the contact loaders (`to_uri`,
//! `check_contact`), benches/wire.rs.

use crate::wire::token::{INSTANCE_LEN, TOKEN_LEN};
use crate::wire::uri::{self, first_path_hop, is_token, Host, SipUri, UriError};

/// Width of the CSeq number field: enough for any `u32`. Zero-padded digits
/// are a valid `CSeq = 1*DIGIT LWS Method` (RFC 3261 §20.16).
pub const CSEQ_WIDTH: usize = 10;

/// Longest request a [`Layout`] can describe (u16 offsets).
pub const REQUEST_LEN_MAX: usize = u16::MAX as usize;

/// RFC 3261 §8.1.1.5: the CSeq number MUST be below 2^31.
const CSEQ_MASK: u32 = 0x7fff_ffff;

/// What `render` leaves in token positions until `patch`: token characters,
/// so an unpatched request is still well-formed.
const TOKEN_PLACEHOLDER: [u8; TOKEN_LEN] = [b'x'; TOKEN_LEN];
const CSEQ_PLACEHOLDER: [u8; CSEQ_WIDTH] = [b'0'; CSEQ_WIDTH];

/// The magic cookie that marks an RFC 3261 branch (§8.1.1.7).
const BRANCH_COOKIE: &str = "z9hG4bK";

/// The cookie of the proxy's Via branch in a request sent as the proxy:
/// the RFC 3261 cookie and a '.', then the token.
pub const PROXY_BRANCH_COOKIE: &str = "z9hG4bK.";

/// Length of [`divert_marker`].
pub const DIVERT_MARKER_LEN: usize = PROXY_BRANCH_COOKIE.len() + INSTANCE_LEN;

/// What marks a reply to a ping sent as the proxy by this kaping instance:
/// the proxy's Via branch cookie and the token's instance prefix, found
/// at the top of the reply (the phone copies the Via first, §8.2.6.2).
pub fn divert_marker(prefix: &[u8; INSTANCE_LEN]) -> [u8; DIVERT_MARKER_LEN] {
    let mut m = [0u8; DIVERT_MARKER_LEN];
    m[..PROXY_BRANCH_COOKIE.len()].copy_from_slice(PROXY_BRANCH_COOKIE.as_bytes());
    m[PROXY_BRANCH_COOKIE.len()..].copy_from_slice(prefix);
    m
}

/// What every keepalive request of one worker and local socket shares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateConfig {
    /// Request method; default `OPTIONS`. `NOTIFY` adds `Event: keep-alive`.
    pub method: String,
    /// From URI (Kamailio `ka_from`); empty means `sip:kaping@<local_host>`.
    pub from_uri: String,
    /// Via sent-by host and Call-ID host: IPv4, IPv6 (with or without
    /// brackets) or a host name.
    pub local_host: String,
    pub local_port: u16,
    /// Via transport; default `UDP`. Written upper case.
    pub transport: String,
    /// Full `Name: value` lines, e.g. `User-Agent: kaping`.
    pub extra_headers: Vec<String>,
    pub max_forwards: u8,
    /// Sent as the proxy: the proxy's Via (host, port) goes on top of ours
    /// (DESIGN §10); `None` for kaping's own socket.
    pub proxy_via: Option<(String, u16)>,
}

impl Default for TemplateConfig {
    fn default() -> Self {
        TemplateConfig {
            method: "OPTIONS".to_owned(),
            from_uri: String::new(),
            local_host: "127.0.0.1".to_owned(),
            local_port: uri::SIP_PORT,
            transport: "UDP".to_owned(),
            extra_headers: Vec::new(),
            max_forwards: 70,
            proxy_via: None,
        }
    }
}

/// Why a template, contact or AoR was refused, or a buffer was too short.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("method {0:?} is not an RFC 3261 token")]
    Method(String),
    #[error("method {method} cannot be used for keepalives: {why}")]
    MethodUnsuitable { method: String, why: &'static str },
    #[error("from_uri {uri:?}: {error}")]
    FromUri { uri: String, error: UriError },
    #[error("from_uri {0:?} must not carry '?headers' (RFC 3261 §19.1.1)")]
    FromHeaders(String),
    #[error("local_host {host:?}: {error}")]
    LocalHost { host: String, error: UriError },
    #[error("local_port must not be 0")]
    LocalPort,
    #[error("transport {0:?} is not an RFC 3261 token")]
    Transport(String),
    #[error("extra header {index} ({line:?}): {why}")]
    ExtraHeader {
        index: usize,
        line: String,
        why: &'static str,
    },
    #[error("AoR {aor:?}: {why}")]
    Aor { aor: String, why: &'static str },
    #[error("AoR {aor:?} gives To URI {uri:?}: {error}")]
    AorUri {
        aor: String,
        uri: String,
        error: UriError,
    },
    #[error("contact {field} {text:?}: {why}")]
    Contact {
        field: &'static str,
        text: String,
        why: String,
    },
    #[error("request needs {needed} bytes but the buffer holds {have} (limit {REQUEST_LEN_MAX})")]
    TooLong { needed: usize, have: usize },
}

/// The per-contact strings a request is rendered with. Validate once with
/// [`check_contact`] when the contact is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContactText<'a> {
    /// The R-URI: the contact URI without `?headers` ([`request_uri`]),
    /// copied verbatim by `render`.
    pub uri: &'a str,
    /// The To URI, already normalized ([`to_uri`]).
    pub to: &'a str,
    /// The Path value, sent as `Route: <path>` (RFC 3327 §5.3).
    pub route: Option<&'a str>,
}

/// Where `render` put the fixed-width fields. Offsets are from the start
/// of the rendered request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Length of the whole request.
    pub len: u16,
    /// First byte of the token after `z9hG4bK` in the Via branch.
    pub branch_at: u16,
    /// First byte of the token in the proxy's Via branch (sent as the
    /// proxy); `branch_at` otherwise, so patching it is harmless.
    pub proxy_branch_at: u16,
    /// First byte of the token in the From tag.
    pub tag_at: u16,
    /// First byte of the token in the Call-ID.
    pub call_id_at: u16,
    /// First of the `CSEQ_WIDTH` CSeq digits.
    pub cseq_at: u16,
}

impl Layout {
    /// Whether every field lies inside the first `len` bytes: true for
    /// every layout `render` returns.
    pub fn is_consistent(&self) -> bool {
        let len = usize::from(self.len);
        [
            self.branch_at,
            self.proxy_branch_at,
            self.tag_at,
            self.call_id_at,
        ]
        .iter()
        .all(|&at| usize::from(at) + TOKEN_LEN <= len)
            && usize::from(self.cseq_at) + CSEQ_WIDTH <= len
    }
}

/// A piece of the template's fixed bytes: `bytes[start..end]`.
#[derive(Clone, Copy, Debug)]
struct Piece {
    start: usize,
    end: usize,
}

impl Piece {
    #[inline(always)]
    fn len(self) -> usize {
        self.end - self.start
    }
}

/// The fixed bytes of the request, in one allocation, cut into the pieces
/// that go between the contact's strings:
/// * no Path: `head` R-URI `via` `from` To-URI `tail`;
/// * Path:    `head` R-URI `via_route` Path `from_route` To-URI `tail`,
///
/// where `via_route` ends in `Route: ` and `from_route` starts with the
/// CRLF ending the Route line, so a Path costs one copy, not three.
#[derive(Clone, Debug)]
pub struct Template {
    bytes: Box<[u8]>,
    /// `METHOD ` (method and the space of the request line).
    head: Piece,
    /// ` SIP/2.0\r\n[proxy Via\r\n]Via: ...;branch=z9hG4bK<ph>;rport\r\n`.
    via: Piece,
    /// `via` followed by `Route: `.
    via_route: Piece,
    /// `Max-Forwards: N\r\nFrom: <uri>;tag=<ph>\r\nTo: <`.
    from: Piece,
    /// `\r\n` followed by `from`.
    from_route: Piece,
    /// `>\r\nCall-ID: <ph>@host\r\nCSeq: <ph> METHOD\r\n...Content-Length: 0\r\n\r\n`.
    tail: Piece,
    branch_in_via: usize,
    /// Where the proxy Via's token starts in `via` (= `branch_in_via`
    /// without one).
    proxy_branch_in_via: usize,
    tag_in_from: usize,
    call_id_in_tail: usize,
    cseq_in_tail: usize,
}

const ROUTE_PREFIX: &str = "Route: ";
const CRLF: &str = "\r\n";

/// Methods that cannot serve as a keepalive, and why.
const UNSUITABLE_METHODS: [(&str, &str); 3] = [
    ("ACK", "an ACK is never answered (RFC 3261 §17.1.1.3)"),
    (
        "CANCEL",
        "a CANCEL needs a pending INVITE and only ever gets 481",
    ),
    ("INVITE", "an INVITE would ring phones and create dialogs"),
];

/// Headers the template writes itself (full and compact names, §7.3.3);
/// an extra header with one of these names would duplicate it.
const OWN_HEADERS: [&str; 12] = [
    "Via",
    "v",
    "From",
    "f",
    "To",
    "t",
    "Call-ID",
    "i",
    "CSeq",
    "Max-Forwards",
    "Content-Length",
    "l",
];

impl Template {
    /// Validates `cfg` and renders every fixed byte. Allocates; start-up only.
    pub fn new(cfg: &TemplateConfig) -> Result<Template, TemplateError> {
        let method = cfg.method.as_str();
        if !is_token(method) {
            return Err(TemplateError::Method(cfg.method.clone()));
        }
        if let Some(&(_, why)) = UNSUITABLE_METHODS.iter().find(|(m, _)| *m == method) {
            return Err(TemplateError::MethodUnsuitable {
                method: cfg.method.clone(),
                why,
            });
        }
        let notify = method == "NOTIFY";

        let host = local_host_text(&cfg.local_host)?;
        if cfg.local_port == 0 {
            return Err(TemplateError::LocalPort);
        }
        if !is_token(&cfg.transport) {
            return Err(TemplateError::Transport(cfg.transport.clone()));
        }
        let transport = cfg.transport.to_ascii_uppercase();

        let from_uri = if cfg.from_uri.is_empty() {
            format!("sip:kaping@{host}")
        } else {
            cfg.from_uri.clone()
        };
        let parsed = SipUri::parse(&from_uri).map_err(|error| TemplateError::FromUri {
            uri: from_uri.clone(),
            error,
        })?;
        if !parsed.headers.is_empty() {
            return Err(TemplateError::FromHeaders(from_uri));
        }

        let mut extra = String::new();
        for (index, line) in cfg.extra_headers.iter().enumerate() {
            let header =
                normalize_header(line, notify).map_err(|why| TemplateError::ExtraHeader {
                    index,
                    line: line.clone(),
                    why,
                })?;
            extra.push_str(&header);
            extra.push_str("\r\n");
        }

        // Both placeholders are ASCII, so the lossy conversion is exact.
        let placeholder = String::from_utf8_lossy(&TOKEN_PLACEHOLDER);
        let cseq_placeholder = String::from_utf8_lossy(&CSEQ_PLACEHOLDER);

        let head = format!("{method} ");

        // §18.2.1/RFC 3581: `rport` asks the UAS to answer to the source
        // port, which is what lets a reply find us through NAT.
        let mut via_prefix = " SIP/2.0\r\n".to_owned();
        let mut proxy_branch_in_via = None;
        if let Some((proxy_host, proxy_port)) = &cfg.proxy_via {
            let proxy_host = local_host_text(proxy_host)?;
            if *proxy_port == 0 {
                return Err(TemplateError::LocalPort);
            }
            via_prefix.push_str(&format!(
                "Via: SIP/2.0/{transport} {proxy_host}:{proxy_port};branch={PROXY_BRANCH_COOKIE}"
            ));
            proxy_branch_in_via = Some(via_prefix.len());
            via_prefix.push_str(&format!("{placeholder};rport\r\n"));
        }
        via_prefix.push_str(&format!(
            "Via: SIP/2.0/{transport} {host}:{port};branch={BRANCH_COOKIE}",
            port = cfg.local_port
        ));
        let via = format!("{via_prefix}{placeholder};rport\r\n");

        // From and To in name-addr form: mandatory when the URI has
        // parameters (§20.10), harmless otherwise, and what Kamailio sends.
        let from_prefix = format!(
            "Max-Forwards: {mf}\r\nFrom: <{from_uri}>;tag=",
            mf = cfg.max_forwards
        );
        let from = format!("{from_prefix}{placeholder}\r\nTo: <");

        let call_id_prefix = ">\r\nCall-ID: ";
        let cseq_prefix = format!("{call_id_prefix}{placeholder}@{host}\r\nCSeq: ");
        let event = if notify { "Event: keep-alive\r\n" } else { "" };
        let tail = format!(
            "{cseq_prefix}{cseq_placeholder} {method}\r\n{event}{extra}Content-Length: 0\r\n\r\n"
        );

        let fixed_len = head.len() + via.len() + from.len() + tail.len();
        if fixed_len > REQUEST_LEN_MAX {
            return Err(TemplateError::TooLong {
                needed: fixed_len,
                have: REQUEST_LEN_MAX,
            });
        }
        let mut bytes = String::with_capacity(2 * fixed_len + ROUTE_PREFIX.len() + CRLF.len());
        let mut piece = |parts: &[&str]| {
            let start = bytes.len();
            parts.iter().for_each(|p| bytes.push_str(p));
            Piece {
                start,
                end: bytes.len(),
            }
        };
        let head = piece(&[&head]);
        let via_piece = piece(&[&via]);
        let via_route = piece(&[&via, ROUTE_PREFIX]);
        let from_piece = piece(&[&from]);
        let from_route = piece(&[CRLF, &from]);
        let tail_piece = piece(&[&tail]);
        Ok(Template {
            bytes: bytes.into_bytes().into_boxed_slice(),
            head,
            via: via_piece,
            via_route,
            from: from_piece,
            from_route,
            tail: tail_piece,
            branch_in_via: via_prefix.len(),
            proxy_branch_in_via: proxy_branch_in_via.unwrap_or(via_prefix.len()),
            tag_in_from: from_prefix.len(),
            call_id_in_tail: call_id_prefix.len(),
            cseq_in_tail: cseq_prefix.len(),
        })
    }

    /// The request method, as written in the request line and CSeq (what
    /// reply matching compares the CSeq method with).
    pub fn method(&self) -> &[u8] {
        &self.bytes[self.head.start..self.head.end - 1]
    }

    /// Length `render` will produce for `c`.
    #[inline]
    pub fn rendered_len(&self, c: &ContactText<'_>) -> usize {
        let fixed = self.head.len() + self.via.len() + self.from.len() + self.tail.len();
        let route = c
            .route
            .map_or(0, |r| ROUTE_PREFIX.len() + r.len() + CRLF.len());
        fixed + c.uri.len() + route + c.to.len()
    }

    #[inline(always)]
    fn piece(&self, p: Piece) -> &[u8] {
        &self.bytes[p.start..p.end]
    }

    /// Copies the fixed pieces and the contact's strings into `out` and
    /// returns where the token and CSeq go: 6 copies (7 with a Path), no
    /// scanning, no allocation, no formatting. Placeholders fill the token
    /// and CSeq fields until [`patch`]. Bytes of `out` past `Layout::len`
    /// are not touched.
    ///
    /// `c.uri` is copied verbatim as the R-URI: pass [`request_uri`] of the
    /// contact, computed once at add time ([`check_contact`] refuses a URI
    /// with `?headers`).
    ///
    /// Errors: `TooLong` when `out` is shorter than the request or the
    /// request would exceed [`REQUEST_LEN_MAX`].
    #[inline]
    pub fn render(&self, c: &ContactText<'_>, out: &mut [u8]) -> Result<Layout, TemplateError> {
        debug_assert!(
            check_contact(c).is_ok(),
            "contact text not validated: {c:?}"
        );
        let len = self.rendered_len(c);
        if len > out.len() || len > REQUEST_LEN_MAX {
            return Err(TemplateError::TooLong {
                needed: len,
                have: out.len(),
            });
        }
        let mut w = Cursor {
            out: &mut out[..len],
            pos: 0,
        };
        w.put(self.piece(self.head));
        w.put(c.uri.as_bytes());
        let branch_at = w.pos + self.branch_in_via;
        let proxy_branch_at = w.pos + self.proxy_branch_in_via;
        let tag_at = match c.route {
            None => {
                w.put(self.piece(self.via));
                w.pos + self.tag_in_from
            }
            Some(route) => {
                w.put(self.piece(self.via_route));
                w.put(route.as_bytes());
                w.pos + CRLF.len() + self.tag_in_from
            }
        };
        w.put(self.piece(if c.route.is_some() {
            self.from_route
        } else {
            self.from
        }));
        w.put(c.to.as_bytes());
        let call_id_at = w.pos + self.call_id_in_tail;
        let cseq_at = w.pos + self.cseq_in_tail;
        w.put(self.piece(self.tail));
        debug_assert_eq!(w.pos, len);

        // All offsets are < len ≤ REQUEST_LEN_MAX, checked above.
        let layout = Layout {
            len: len as u16,
            branch_at: branch_at as u16,
            proxy_branch_at: proxy_branch_at as u16,
            tag_at: tag_at as u16,
            call_id_at: call_id_at as u16,
            cseq_at: cseq_at as u16,
        };
        debug_assert!(layout.is_consistent(), "{layout:?}");
        Ok(layout)
    }
}

/// A write position in the staging buffer; `render` sizes the buffer first,
/// so no `put` can run past it.
struct Cursor<'b> {
    out: &'b mut [u8],
    pos: usize,
}

impl Cursor<'_> {
    #[inline(always)]
    fn put(&mut self, bytes: &[u8]) {
        self.out[self.pos..self.pos + bytes.len()].copy_from_slice(bytes);
        self.pos += bytes.len();
    }
}

/// Writes the ping's token into the Via branch, From tag and Call-ID, and
/// `cseq` (reduced below 2^31 as RFC 3261 §8.1.1.5 requires) as exactly
/// [`CSEQ_WIDTH`] zero-padded digits. Fixed widths: nothing of an earlier
/// patch survives. No formatting machinery, no allocation.
///
/// Panics if `layout` does not fit `buf` (a layout applied to a buffer it
/// was not rendered into: a programming error).
#[inline]
pub fn patch(buf: &mut [u8], layout: &Layout, token: &[u8; TOKEN_LEN], cseq: u32) {
    assert!(
        usize::from(layout.len) <= buf.len() && layout.is_consistent(),
        "layout {layout:?} does not fit a buffer of {} bytes",
        buf.len()
    );
    for at in [
        layout.branch_at,
        layout.proxy_branch_at,
        layout.tag_at,
        layout.call_id_at,
    ] {
        let at = usize::from(at);
        buf[at..at + TOKEN_LEN].copy_from_slice(token);
    }
    let at = usize::from(layout.cseq_at);
    write_digits(&mut buf[at..at + CSEQ_WIDTH], cseq & CSEQ_MASK);
}

/// The branch parameter of a Via that kaping wrote, up to the token.
const BRANCH_PARAM: &[u8] = b";branch=z9hG4bK";

/// The token of a request as an ICMP error quotes it (`io::IcmpError`):
/// the one after the branch cookie in the first header line, which is
/// always a Via kaping wrote (the proxy's, cookie `z9hG4bK.`, when sent as
/// the proxy; kaping's own otherwise; both carry the ping's token). Only
/// that line is searched: the request line holds the contact's URI, which
/// anyone who can register may fill with a `branch=` of their choosing.
///
/// `None` when the quote ends before the token (a router that quoted only
/// the UDP header, or a few bytes of payload) or is not shaped like a
/// request at all. The token is not verified here: the caller decodes it
/// with its key. Never panics, never allocates.
pub fn quoted_token(quote: &[u8]) -> Option<&[u8; TOKEN_LEN]> {
    let line_at = memchr::memmem::find(quote, CRLF.as_bytes())? + CRLF.len();
    let rest = &quote[line_at..];
    let line = match memchr::memmem::find(rest, CRLF.as_bytes()) {
        Some(end) => &rest[..end],
        None => rest,
    };
    let mut at = memchr::memmem::find(line, BRANCH_PARAM)? + BRANCH_PARAM.len();
    if line.get(at) == Some(&b'.') {
        // The proxy's cookie, `z9hG4bK.` (PROXY_BRANCH_COOKIE).
        at += 1;
    }
    line.get(at..at + TOKEN_LEN)?.try_into().ok()
}

/// Whether a quote in which [`quoted_token`] found no token may still be
/// the start of a request kaping sent with `method`, cut by whoever quoted
/// it before the token: empty (a router that quoted only the UDP header),
/// a prefix of the method and its space, or the start of such a request
/// that ends before its first header line does (the Via that carries the
/// token). A quote that goes on past that without a token (another
/// program's datagram, random bytes) is of no request kaping sent: an ICMP
/// error quoting it was made by someone who never saw kaping's datagram.
/// Never panics, never allocates.
pub fn quote_may_be_request(quote: &[u8], method: &[u8]) -> bool {
    let n = quote.len().min(method.len());
    if quote[..n] != method[..n] {
        return false;
    }
    match quote.get(method.len()) {
        None => return true,
        Some(b' ') => {}
        Some(_) => return false,
    }
    let Some(line_at) = memchr::memmem::find(quote, CRLF.as_bytes()) else {
        return true;
    };
    memchr::memmem::find(&quote[line_at + CRLF.len()..], CRLF.as_bytes()).is_none()
}

/// `"00" "01" ... "99"`: two digits per lookup.
const DIGIT_PAIRS: [[u8; 2]; 100] = {
    let mut t = [[0u8; 2]; 100];
    let mut i = 0;
    while i < 100 {
        t[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
        i += 1;
    }
    t
};

/// Right-aligned, zero-padded decimal. `u32::MAX` has 10 digits, so
/// `CSEQ_WIDTH` digits always hold the whole number. Five two-digit steps,
/// as two independent chains (high and low five digits), each `/ 100` a
/// multiply-shift: a few cycles of latency, no formatting machinery.
#[inline(always)]
fn write_digits(field: &mut [u8], n: u32) {
    debug_assert_eq!(field.len(), CSEQ_WIDTH);
    let (high, low) = field.split_at_mut(CSEQ_WIDTH / 2);
    write_5_digits(high, n / 100_000);
    write_5_digits(low, n % 100_000);
}

#[inline(always)]
fn write_5_digits(out: &mut [u8], v: u32) {
    debug_assert!(v < 100_000 && out.len() == 5);
    let (top, rest) = (v / 10_000, v % 10_000);
    out[0] = b'0' + top as u8;
    out[1..3].copy_from_slice(&DIGIT_PAIRS[(rest / 100) as usize]);
    out[3..5].copy_from_slice(&DIGIT_PAIRS[(rest % 100) as usize]);
}

/// The R-URI as sent: the contact URI minus any `?headers` part (headers
/// are not allowed in a Request-URI, RFC 3261 §19.1.1 table 1). `?` may
/// occur in the user part (`user-unreserved`) but nowhere after the `@`
/// before the headers, so the headers start at the first `?` after the last
/// `@`. No allocation; call it once when the contact is added and keep the
/// result (a prefix of the contact) as `ContactText::uri`.
#[inline]
pub fn request_uri(contact: &str) -> &str {
    let b = contact.as_bytes();
    // Common case first: no '?' at all, one scan.
    let Some(first) = memchr::memchr(b'?', b) else {
        return contact;
    };
    let from = memchr::memrchr(b'@', b).map_or(0, |at| at + 1);
    if first >= from {
        return &contact[..first];
    }
    match memchr::memchr(b'?', &b[from..]) {
        Some(q) => &contact[..from + q],
        None => contact,
    }
}

/// Validates a contact's strings when it is added, so that `render` may
/// copy them blindly: `uri` and `to` are SIP URIs without `?headers` (`uri`
/// being the R-URI, [`request_uri`] of the contact), `route` is a Path
/// value with a `<uri>` hop and no control characters (no header
/// injection).
pub fn check_contact(c: &ContactText<'_>) -> Result<(), TemplateError> {
    let refuse = |field: &'static str, text: &str, why: String| TemplateError::Contact {
        field,
        text: text.to_owned(),
        why,
    };
    let uri = SipUri::parse(c.uri).map_err(|e| refuse("uri", c.uri, e.to_string()))?;
    if !uri.headers.is_empty() {
        let why = "carries '?headers' (pass request_uri() of the contact)".to_owned();
        return Err(refuse("uri", c.uri, why));
    }
    let to = SipUri::parse(c.to).map_err(|e| refuse("to", c.to, e.to_string()))?;
    if !to.headers.is_empty() {
        return Err(refuse("to", c.to, "carries '?headers'".to_owned()));
    }
    if let Some(route) = c.route {
        if let Some(at) = route.bytes().position(|b| b.is_ascii_control()) {
            let why = format!("control character at byte {at} (header injection)");
            return Err(refuse("route", route, why));
        }
        let hop = first_path_hop(route).map_err(|e| refuse("route", route, e.to_string()))?;
        SipUri::parse(hop).map_err(|e| refuse("route", route, format!("first hop: {e}")))?;
    }
    Ok(())
}

/// AoR → To URI at add time (Kamailio `ka_domain`): `alice` + domain
/// `example.com` → `sip:alice@example.com`; `bob@x` → `sip:bob@x`; an AoR
/// that already is a `sip:`/`sips:` URI is kept. The result must parse as a
/// SIP URI without `?headers`. Allocates; not a hot path.
pub fn to_uri(aor: &str, domain: Option<&str>) -> Result<String, TemplateError> {
    let refuse = |why| TemplateError::Aor {
        aor: aor.to_owned(),
        why,
    };
    // Bytes, not chars: a prefix cut may fall inside a multi-byte char.
    let has_scheme = |p: &str| {
        aor.as_bytes()
            .get(..p.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(p.as_bytes()))
    };
    let uri = if has_scheme("sip:") || has_scheme("sips:") {
        aor.to_owned()
    } else if aor.contains(':') {
        return Err(refuse("not a sip:/sips: URI (only those can be pinged)"));
    } else if aor.contains('@') {
        format!("sip:{aor}")
    } else {
        match domain {
            Some(d) if !d.is_empty() => format!("sip:{aor}@{d}"),
            _ => return Err(refuse("has no domain and no default domain is set")),
        }
    };
    let parsed = SipUri::parse(&uri).map_err(|error| TemplateError::AorUri {
        aor: aor.to_owned(),
        uri: uri.clone(),
        error,
    })?;
    if !parsed.headers.is_empty() {
        return Err(refuse("To URI must not carry '?headers'"));
    }
    Ok(uri)
}

/// The host as written in Via sent-by and Call-ID: IPv6 in brackets
/// (RFC 3261 §25.1 `sent-by = host [ COLON port ]`, `host` uses
/// `IPv6reference`). A bare IPv6 address is accepted in configuration.
fn local_host_text(text: &str) -> Result<String, TemplateError> {
    if let Ok(v6) = text.parse::<std::net::Ipv6Addr>() {
        return Ok(format!("[{v6}]"));
    }
    match uri::parse_host(text) {
        Ok(Host::V4(a)) => Ok(a.to_string()),
        Ok(Host::V6(a)) => Ok(format!("[{a}]")),
        Ok(Host::Name(n)) => Ok(n.to_owned()),
        Err(error) => Err(TemplateError::LocalHost {
            host: text.to_owned(),
            error,
        }),
    }
}

/// Validates an extra header line and writes it as `Name: value`.
/// `message-header = field-name HCOLON field-value` (§7.3.1, §25.1:
/// `HCOLON = *( SP / HTAB ) ":" SWS`); a value must not contain CR or LF
/// (that would start a new header: injection) or other control characters.
fn normalize_header(line: &str, notify: bool) -> Result<String, &'static str> {
    let (name, value) = line
        .split_once(':')
        .ok_or("missing ':' after the header name")?;
    let name = name.trim_end_matches([' ', '\t']);
    if !is_token(name) {
        return Err("header name is not an RFC 3261 token");
    }
    if value.bytes().any(|b| b == b'\r' || b == b'\n') {
        return Err("contains CR or LF (header injection)");
    }
    if value.bytes().any(|b| b != b'\t' && b.is_ascii_control()) {
        return Err("contains a control character");
    }
    if OWN_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name)) {
        return Err("kaping writes this header itself (RFC 3261 §8.1.1: exactly once)");
    }
    if notify && (name.eq_ignore_ascii_case("Event") || name == "o" || name == "O") {
        return Err("NOTIFY keepalives already carry 'Event: keep-alive'");
    }
    match value.trim_matches([' ', '\t']) {
        "" => Ok(format!("{name}:")),
        value => Ok(format!("{name}: {value}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_fixed_width_and_zero_padded() {
        let mut f = [0xa5u8; CSEQ_WIDTH];
        write_digits(&mut f, 0);
        assert_eq!(&f, b"0000000000");
        write_digits(&mut f, 42);
        assert_eq!(&f, b"0000000042");
        write_digits(&mut f, u32::MAX);
        assert_eq!(&f, b"4294967295");
    }

    #[test]
    fn request_uri_strips_headers_but_not_user_question_marks() {
        assert_eq!(request_uri("sip:a@b;lr?x=y"), "sip:a@b;lr");
        assert_eq!(request_uri("sip:a?b@host"), "sip:a?b@host");
        assert_eq!(request_uri("sip:a?b@host?h=v"), "sip:a?b@host");
        assert_eq!(request_uri("sip:host?h=v"), "sip:host");
        assert_eq!(request_uri("sip:host"), "sip:host");
    }

    /// A request rendered from `cfg` and patched with `token`.
    fn request(cfg: &TemplateConfig, token: &[u8; TOKEN_LEN]) -> Vec<u8> {
        let t = Template::new(cfg).unwrap();
        let c = ContactText {
            // A contact that puts a branch of its own in its URI: the
            // request line is not searched.
            uri: "sip:alice@198.51.100.7:5062;branch=z9hG4bKAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            to: "sip:alice@example.org",
            route: Some("<sip:edge.example.org;lr>"),
        };
        let mut buf = [0xa5u8; 1400];
        let layout = t.render(&c, &mut buf).unwrap();
        patch(&mut buf, &layout, token, 7);
        buf[..usize::from(layout.len)].to_vec()
    }

    #[test]
    fn the_token_is_found_in_a_quoted_request_cut_anywhere_after_it() {
        let token = b"QUJDsZ0gAAAHAAAAAAEACWAa2Xyz";
        for cfg in [
            TemplateConfig::default(),
            TemplateConfig {
                proxy_via: Some(("203.0.113.10".to_owned(), 5060)),
                ..TemplateConfig::default()
            },
        ] {
            let req = request(&cfg, token);
            let cookie = memchr::memmem::find(&req, b"z9hG4bK").unwrap();
            // Where the first Via's token ends, proxy cookie or not.
            let first_at = memchr::memmem::find(&req, token).unwrap();
            assert!(first_at > cookie, "the token follows a Via cookie");
            for cut in 0..=req.len() {
                let got = quoted_token(&req[..cut]);
                if cut >= first_at + TOKEN_LEN {
                    assert_eq!(got, Some(token), "cut at {cut} of {}", req.len());
                } else {
                    assert_eq!(got, None, "cut at {cut}: token incomplete");
                }
            }
        }
    }

    /// Whatever a run's instance id, the token read from a quoted request
    /// is the one sent, as the proxy or not: no token starts with the '.'
    /// that marks the proxy's cookie (`TokenKey::new`), so `z9hG4bK.` is
    /// never read one character off (it was, for ids whose prefix began
    /// with '.': every ICMP error of such a run counted as forged).
    #[test]
    fn the_quoted_token_is_the_one_sent_whatever_its_first_character() {
        use crate::wire::token::{decode, encode, TokenFields, TokenKey};
        let fields = TokenFields {
            worker: 1,
            slot: 77,
            generation: 5,
            seq: 9,
            sent_us: 123_456,
        };
        for top in 0..64u32 {
            let key = TokenKey::new([3; 16], top << 18 | 0x0ABC);
            let mut token = [0u8; TOKEN_LEN];
            encode(&key, &fields, &mut token);
            for cfg in [
                TemplateConfig::default(),
                TemplateConfig {
                    proxy_via: Some(("203.0.113.10".to_owned(), 5060)),
                    ..TemplateConfig::default()
                },
            ] {
                let req = request(&cfg, &token);
                let got = quoted_token(&req);
                assert_eq!(got, Some(&token), "first character {top}");
                assert_eq!(decode(&key, got.unwrap()), Ok(fields));
            }
        }
    }

    #[test]
    fn quotes_without_a_kaping_via_give_no_token() {
        for q in [
            &b""[..],
            b"\0\0\0\0",
            b"\r\n",
            b"OPTIONS sip:a@b;branch=z9hG4bKAAAAAAAAAAAAAAAAAAAAAAAAAAAA SIP/2.0",
            b"OPTIONS sip:a@b SIP/2.0\r\nMax-Forwards: 70\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n",
        ] {
            assert_eq!(quoted_token(q), None, "{:?}", String::from_utf8_lossy(q));
        }
    }

    #[test]
    fn a_request_cut_before_its_token_may_be_ours_anything_else_is_not() {
        let token = b"QUJDsZ0gAAAHAAAAAAEACWAa2Xyz";
        let req = request(&TemplateConfig::default(), token);
        let token_at = memchr::memmem::find(&req, token).unwrap();
        for cut in 0..token_at + TOKEN_LEN {
            assert!(
                quote_may_be_request(&req[..cut], b"OPTIONS"),
                "cut at {cut}: {:?}",
                String::from_utf8_lossy(&req[..cut])
            );
        }
        for q in [
            &b"\xffrandom bytes, not a request"[..],
            b"OPTIONX sip:a@b SIP/2.0",
            b"OPTIONSsip:a@b SIP/2.0",
            b"NOTIFY sip:a@b SIP/2.0\r\n",
            b"\0\0\0\0",
            // A whole first header line, and no token in it.
            b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKshort\r\n",
            b"OPTIONS sip:a@b SIP/2.0\r\nMax-Forwards: 70\r\n",
        ] {
            assert!(
                !quote_may_be_request(q, b"OPTIONS"),
                "{:?}",
                String::from_utf8_lossy(q)
            );
        }
        assert!(quote_may_be_request(b"NOTIFY sip:a@b", b"NOTIFY"));
    }

    #[test]
    fn header_normalization() {
        assert_eq!(
            normalize_header("User-Agent:kaping 1.0 ", false).unwrap(),
            "User-Agent: kaping 1.0"
        );
        assert_eq!(normalize_header("X-A \t:  v", false).unwrap(), "X-A: v");
        assert!(normalize_header("Event: x", false).is_ok());
        assert!(normalize_header("Event: x", true).is_err());
        assert!(normalize_header("o: x", true).is_err());
        assert!(normalize_header("call-id: x", false).is_err());
        assert!(normalize_header("l: 5", false).is_err());
    }
}
