//! Reply matching: from one raw UDP datagram to a [`Match`] or a counted
//! [`Reject`].
//!
//! This module owns the decision "is this datagram an answer to one of our
//! pings, and to which one". It parses only what that decision needs:
//!
//! * the status line `SIP/2.0 NNN reason` (RFC 3261 §7.2); requests (§7.1)
//!   are recognised and rejected as [`Reject::Request`];
//! * the header section up to the empty line (§7.3, §7.5), honouring header
//!   folding (§7.3.1) and `HCOLON = *( SP / HTAB ) ":" SWS` (§25.1);
//! * From (`From` or compact `f`, §7.3.3, §20.20) and its `tag` header
//!   parameter (§19.3), never a `tag` URI parameter inside `<...>`, with
//!   display names (quoted ones with escapes included) skipped;
//! * the CSeq method (§20.16; CSeq has no compact form);
//! * Content-Length (`l`, §20.14), only to reject a datagram whose body is
//!   shorter than announced (§18.3).
//!
//! Then [`token::decode`] verifies the From tag: the MAC makes the match
//! trustworthy, so the parser can be lenient where leniency costs nothing
//! (bare LF line ends, headers it does not read) and strict where ambiguity
//! would matter (a second From, a second `tag`, a `tag` inside the URI).
//!
//! # Guarantees
//!
//! * [`parse`] and [`match_reply`] never panic, never allocate and never
//!   format, whatever the input. Every index is bounded by the datagram
//!   length; the tests feed every prefix of real replies and random mutations.
//! * The work is linear in the datagram length and capped by
//!   [`REPLY_LEN_MAX`]: one pass of a single LF searcher over the header
//!   section (no per-line search restart), a one-byte classification per
//!   line, plus a scan of the From, CSeq and Content-Length values. About
//!   2,200 instructions for a typical 450-byte 200 OK, token check included.
//! * Each [`Reject`] has a stable index below 16, the index of its counter in
//!   the shared-memory reject array.
//!
//! Worker-id and generation checks are not done here: the engine owns the
//! slab and does them with the returned [`Match`].
//!
//! Called by the engine's receive path, once per received datagram.

use memchr::{memchr, memchr2, memchr3};

use crate::wire::token::{self, TokenError, TokenKey};

/// Largest datagram considered; anything longer is [`Reject::Oversized`].
/// Replies to OPTIONS are a few hundred bytes, 1-2 kB with an SDP body.
pub const REPLY_LEN_MAX: usize = 4096;

/// Why a datagram was not accepted as a reply to one of our pings.
///
/// Discriminants are the stable counter indexes ([`Reject::index`]): new
/// variants are appended, never inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u8)]
pub enum Reject {
    /// Longer than [`REPLY_LEN_MAX`], or announcing a body that would make it so.
    #[error("datagram longer than {REPLY_LEN_MAX} bytes")]
    Oversized = 0,
    /// Ends before the status line, the empty line after the headers or the
    /// Content-Length announced body.
    #[error("datagram ends before the end of the SIP message")]
    Truncated = 1,
    /// Neither a SIP response nor a SIP request.
    #[error("not a SIP message")]
    NotSip = 2,
    /// A SIP request, not a response.
    #[error("SIP request, not a response")]
    Request = 3,
    /// `SIP/2.0 ` not followed by a status code 100-699 and a space.
    #[error("malformed status code in the status line")]
    BadStatus = 4,
    /// No From header.
    #[error("response without a From header")]
    NoFrom = 5,
    /// More than one From header.
    #[error("response with more than one From header")]
    DuplicateFrom = 6,
    /// From has no `tag` header parameter.
    #[error("From header without a tag parameter")]
    NoTag = 7,
    /// The From tag is not a token of ours: wrong length or alphabet.
    #[error("From tag is not a kaping token")]
    BadTag = 8,
    /// No CSeq header.
    #[error("response without a CSeq header")]
    NoCSeq = 9,
    /// CSeq names another method than the one we send.
    #[error("CSeq method is not the method kaping sends")]
    CSeqMethod = 10,
    /// The token belongs to another kaping instance.
    #[error("From tag belongs to another kaping instance")]
    Instance = 11,
    /// The token's MAC does not verify: forged, corrupted or from another run.
    #[error("From tag MAC does not verify (forged or corrupted)")]
    Forged = 12,
    /// A header this parser reads (From, CSeq, Content-Length) is malformed
    /// or, for CSeq and Content-Length, repeated; or From has two `tag`s.
    #[error("malformed or repeated From, CSeq or Content-Length header")]
    BadHeader = 13,
}

impl Reject {
    /// Number of variants; at most 16 (the shared memory reserves 16 counters).
    pub const COUNT: usize = 14;

    /// Every variant, in index order.
    pub const ALL: [Reject; Self::COUNT] = [
        Reject::Oversized,
        Reject::Truncated,
        Reject::NotSip,
        Reject::Request,
        Reject::BadStatus,
        Reject::NoFrom,
        Reject::DuplicateFrom,
        Reject::NoTag,
        Reject::BadTag,
        Reject::NoCSeq,
        Reject::CSeqMethod,
        Reject::Instance,
        Reject::Forged,
        Reject::BadHeader,
    ];

    /// Stable counter index, `< Reject::COUNT`.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Stable snake_case name, for counters, metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Reject::Oversized => "oversized",
            Reject::Truncated => "truncated",
            Reject::NotSip => "not_sip",
            Reject::Request => "request",
            Reject::BadStatus => "bad_status",
            Reject::NoFrom => "no_from",
            Reject::DuplicateFrom => "duplicate_from",
            Reject::NoTag => "no_tag",
            Reject::BadTag => "bad_tag",
            Reject::NoCSeq => "no_cseq",
            Reject::CSeqMethod => "cseq_method",
            Reject::Instance => "instance",
            Reject::Forged => "forged",
            Reject::BadHeader => "bad_header",
        }
    }
}

const _: () = {
    assert!(Reject::COUNT <= 16, "shm reserves 16 reject counters");
    let mut i = 0;
    while i < Reject::COUNT {
        assert!(Reject::ALL[i].index() == i);
        i += 1;
    }
};

impl From<TokenError> for Reject {
    fn from(e: TokenError) -> Reject {
        match e {
            TokenError::Length | TokenError::Alphabet => Reject::BadTag,
            TokenError::Instance => Reject::Instance,
            TokenError::Mac => Reject::Forged,
        }
    }
}

/// What [`parse`] extracts; slices borrow the datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply<'a> {
    /// Status code, 100..=699.
    pub status: u16,
    /// Value of the From `tag` header parameter (possibly empty, never checked
    /// here to be a token).
    pub from_tag: &'a [u8],
    /// CSeq method, a non-empty RFC 3261 token (case-sensitive, §7.1).
    pub cseq_method: &'a [u8],
}

/// A verified reply to one of our pings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    /// Worker that sent the ping; the engine checks it is the receiving one.
    pub worker: u8,
    /// Slab slot of the contact.
    pub slot: u32,
    /// Slab generation at send time; the engine checks it is still current.
    pub generation: u16,
    /// Ping sequence number.
    pub seq: u16,
    /// Low 32 bits of the µs send time (RTT by wrapping subtraction).
    pub sent_us: u32,
    /// Response status code, 100..=699.
    pub status: u16,
}

/// Parses a datagram as a SIP response, extracting status, From tag and CSeq
/// method. Never panics or allocates.
///
/// When several causes apply, the first in this order is reported: size
/// (Oversized), status line (Truncated, NotSip, Request, BadStatus), header
/// section as it is walked (Truncated, DuplicateFrom, BadHeader for a
/// repeated CSeq or Content-Length), Content-Length against the body
/// (BadHeader, Oversized, Truncated), then From (NoFrom, BadHeader, NoTag)
/// and CSeq (NoCSeq, BadHeader).
pub fn parse(datagram: &[u8]) -> Result<Reply<'_>, Reject> {
    if datagram.len() > REPLY_LEN_MAX {
        return Err(Reject::Oversized);
    }
    // SIP lines are short (30-40 bytes), so the cost of finding LFs is the
    // per-search setup, not the bytes: one iterator over the whole datagram
    // replaces a `memchr` call per line. SSE2 (the x86_64 baseline) beats
    // AVX2 here, whose wider blocks only add setup for such short runs.
    #[cfg(target_arch = "x86_64")]
    if let Some(sse2) = memchr::arch::x86_64::sse2::memchr::One::new(b'\n') {
        return parse_lines(datagram, sse2.iter(datagram));
    }
    parse_lines(datagram, memchr::memchr_iter(b'\n', datagram))
}

/// What the first byte of a header-section line says about it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LineStart {
    /// Cannot start a header [`parse`] reads (most lines), nor end the
    /// section: skipped without looking further.
    Other,
    /// `c`, `f`, `l` in either case: possibly CSeq, From, Content-Length.
    Candidate,
    /// CR or LF: possibly the empty line ending the section (§7.5).
    End,
}

const LINE_START: [LineStart; 256] = {
    let mut t = [LineStart::Other; 256];
    t[b'c' as usize] = LineStart::Candidate;
    t[b'C' as usize] = LineStart::Candidate;
    t[b'f' as usize] = LineStart::Candidate;
    t[b'F' as usize] = LineStart::Candidate;
    t[b'l' as usize] = LineStart::Candidate;
    t[b'L' as usize] = LineStart::Candidate;
    t[b'\r' as usize] = LineStart::End;
    t[b'\n' as usize] = LineStart::End;
    t
};

/// [`parse`] after the size check, given an iterator over the indexes of
/// every LF of `d` in increasing order.
///
/// The header section is walked line by line, one LF per step. A header we
/// read is "open" from its first line until a line that does not start with
/// SP or HTAB follows (§7.3.1): its value runs to that last LF, folded lines
/// (whose CR LF count as whitespace) included. The order of checks is that
/// of the original line-by-line walk: a second From is reported when its
/// first line is seen, a second CSeq or Content-Length when its value ends.
#[inline(always)]
fn parse_lines(d: &[u8], mut lfs: impl Iterator<Item = usize>) -> Result<Reply<'_>, Reject> {
    let Some(status_lf) = lfs.next() else {
        return Err(if is_status_line_start(d) {
            Reject::Truncated
        } else {
            Reject::NotSip
        });
    };
    let status = parse_status_line(trim_cr(&d[..status_lf]))?;

    let mut from: Option<&[u8]> = None;
    let mut cseq: Option<&[u8]> = None;
    let mut content_length: Option<&[u8]> = None;
    // The header being read (which one, where its value starts), while its
    // value may still continue on folded lines.
    let mut open: Option<(HeaderName, usize)> = None;
    let mut line_at = status_lf + 1;
    let body_at = loop {
        let Some(lf) = lfs.next() else {
            return Err(Reject::Truncated);
        };
        debug_assert!(line_at <= lf && lf < d.len(), "line {line_at}..{lf}");
        let line = &d[line_at..lf];
        line_at = lf + 1;
        if open.is_none() {
            // `line` is never empty here except for the empty line itself:
            // its LF is then `d[lf]`, so looking at `d[lf - len]` is safe.
            match LINE_START[usize::from(d[lf - line.len()])] {
                LineStart::Other => continue,
                LineStart::End => {
                    if line.is_empty() || line == b"\r" {
                        break lf + 1; // the empty line (§7.5)
                    }
                    continue;
                }
                LineStart::Candidate => {
                    let Some((name, value_at)) = header_of(line) else {
                        continue;
                    };
                    if name == HeaderName::From && from.is_some() {
                        return Err(Reject::DuplicateFrom);
                    }
                    open = Some((name, lf - line.len() + value_at));
                }
            }
        }
        // A header is open: does the next line continue it (§7.3.1)?
        if let Some((name, value_at)) = open {
            if matches!(d.get(lf + 1), Some(b' ' | b'\t')) {
                continue;
            }
            open = None;
            let slot = match name {
                HeaderName::From => &mut from,
                HeaderName::CSeq => &mut cseq,
                HeaderName::ContentLength => &mut content_length,
            };
            if slot.replace(&d[value_at..lf]).is_some() {
                return Err(Reject::BadHeader);
            }
        }
    };

    if let Some(value) = content_length {
        let announced = parse_content_length(value).ok_or(Reject::BadHeader)?;
        if body_at.saturating_add(announced) > REPLY_LEN_MAX {
            return Err(Reject::Oversized);
        }
        // §18.3: a datagram shorter than its Content-Length is discarded.
        // Extra bytes beyond it are ignored.
        if announced > d.len() - body_at {
            return Err(Reject::Truncated);
        }
    }
    let from_tag = parse_from_tag(from.ok_or(Reject::NoFrom)?)?;
    let cseq_method = parse_cseq_method(cseq.ok_or(Reject::NoCSeq)?)?;
    Ok(Reply {
        status,
        from_tag,
        cseq_method,
    })
}

/// [`parse`], then check the CSeq method against `method` (the method we
/// send, e.g. `b"OPTIONS"`; compared case-sensitively, §7.1) and verify the
/// From tag with [`token::decode`]. Never panics or allocates.
pub fn match_reply(key: &TokenKey, method: &[u8], datagram: &[u8]) -> Result<Match, Reject> {
    let reply = parse(datagram)?;
    // Inline byte compare: a 7-byte method does not deserve a `memcmp` call.
    let same_method = reply.cseq_method.len() == method.len()
        && reply.cseq_method.iter().zip(method).all(|(a, b)| a == b);
    if !same_method {
        return Err(Reject::CSeqMethod);
    }
    let f = token::decode(key, reply.from_tag)?;
    Ok(Match {
        worker: f.worker,
        slot: f.slot,
        generation: f.generation,
        seq: f.seq,
        sent_us: f.sent_us,
        status: reply.status,
    })
}

/// `SIP-Version SP`, compared case-insensitively (§7.1: "SIP" is a literal
/// of the ABNF, hence case-insensitive).
const VERSION_SP: &[u8; 8] = b"SIP/2.0 ";
/// `SP SIP-Version` ending a request line.
const SP_VERSION: &[u8; 8] = b" SIP/2.0";

/// The bytes we have could be the start of a status line (used when the
/// datagram holds no LF at all: a response cut short is Truncated, anything
/// else NotSip).
fn is_status_line_start(d: &[u8]) -> bool {
    let n = d.len().min(VERSION_SP.len());
    d[..n].eq_ignore_ascii_case(&VERSION_SP[..n])
}

/// `Status-Line = SIP-Version SP Status-Code SP Reason-Phrase CRLF` (§7.2).
/// A missing reason phrase (and its SP) is tolerated; the code must be
/// 100..=699 (§21).
fn parse_status_line(line: &[u8]) -> Result<u16, Reject> {
    let Some(rest) = strip_prefix_ignore_case(line, VERSION_SP) else {
        return Err(if is_request_line(line) {
            Reject::Request
        } else {
            Reject::NotSip
        });
    };
    let (code, after) = match rest {
        [a, b, c] => ([*a, *b, *c], None),
        [a, b, c, after, ..] => ([*a, *b, *c], Some(*after)),
        _ => return Err(Reject::BadStatus),
    };
    if after.is_some_and(|b| b != b' ') {
        return Err(Reject::BadStatus);
    }
    let [a, b, c] = code.map(|x| x.wrapping_sub(b'0'));
    if !(1..=6).contains(&a) || b > 9 || c > 9 {
        return Err(Reject::BadStatus);
    }
    Ok(u16::from(a) * 100 + u16::from(b) * 10 + u16::from(c))
}

/// `Request-Line = Method SP Request-URI SP SIP-Version CRLF` (§7.1).
fn is_request_line(line: &[u8]) -> bool {
    let line = trim_end_wsp(line);
    line.len() > SP_VERSION.len()
        && is_token_char(line[0])
        && line[line.len() - SP_VERSION.len()..].eq_ignore_ascii_case(SP_VERSION)
}

/// The headers [`parse`] reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HeaderName {
    From,
    CSeq,
    ContentLength,
}

/// Recognises `header-name HCOLON` at the start of `line` for the headers
/// [`parse`] reads, returning the offset just past the colon.
///
/// Header names are case-insensitive (§7.3.1); compact forms per §7.3.3 (`f`
/// From, `l` Content-Length; `c` is Content-Type: CSeq has no compact form).
/// `HCOLON = *( SP / HTAB ) ":" SWS` (§25.1), so a name is followed only by
/// SP, HTAB or `:`; requiring that is what tells `From` from `Froms`.
///
/// Names are compared as words with `| 0x20`: for the lowercase letters of
/// these names the only bytes that map onto them are that letter in either
/// case, so the comparison is exact (the `-` of `content-length`, which CR
/// would also match, is checked separately). No byte loop, no `memchr`: this
/// runs on every header line starting with `c`, `f` or `l`.
#[inline]
fn header_of(line: &[u8]) -> Option<(HeaderName, usize)> {
    const LOWER4: u32 = 0x2020_2020;
    const LOWER8: u64 = 0x2020_2020_2020_2020;
    let first = *line.first()? | 0x20;
    let (name, name_len) = match first {
        b'f' | b'l' if matches!(line.get(1), Some(b' ' | b'\t' | b':')) => (
            if first == b'f' {
                HeaderName::From
            } else {
                HeaderName::ContentLength
            },
            1,
        ),
        b'f' | b'c' => {
            let &[a, b, c, d, ..] = line else {
                return None;
            };
            let w = u32::from_le_bytes([a, b, c, d]) | LOWER4;
            if w == u32::from_le_bytes(*b"from") {
                (HeaderName::From, 4)
            } else if w == u32::from_le_bytes(*b"cseq") {
                (HeaderName::CSeq, 4)
            } else if w == u32::from_le_bytes(*b"cont") {
                let &[n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11, n12, n13, ..] = line else {
                    return None;
                };
                let head = u64::from_le_bytes([n0, n1, n2, n3, n4, n5, n6, n7]);
                let tail = u64::from_le_bytes([n6, n7, n8, n9, n10, n11, n12, n13]);
                if n7 != b'-'
                    || head | LOWER8 != u64::from_le_bytes(*b"content-")
                    || tail | LOWER8 != u64::from_le_bytes(*b"t-length")
                {
                    return None;
                }
                (HeaderName::ContentLength, 14)
            } else {
                return None;
            }
        }
        _ => return None,
    };
    let mut i = name_len;
    while let Some(b' ' | b'\t') = line.get(i) {
        i += 1;
    }
    // A name we read not followed by HCOLON is another header (or a broken
    // line): the caller skips it like any line it does not read.
    (line.get(i) == Some(&b':')).then_some((name, i + 1))
}

/// The `tag` header parameter of a From value (§20.20, §25.1):
///
/// ```text
/// from-spec    = ( name-addr / addr-spec ) *( SEMI from-param )
/// name-addr    = [ display-name ] LAQUOT addr-spec RAQUOT
/// display-name = *(token LWS) / quoted-string
/// ```
///
/// With `<...>`, parameters inside the brackets belong to the URI and are
/// skipped whole; without, every `;` parameter is a header parameter (§20.10).
///
/// The shape UAs echo back is tried first ([`from_tag_fast`]); anything else
/// goes through the full grammar ([`parse_from_tag_full`]), which gives the
/// same answer for that shape.
#[inline]
fn parse_from_tag(v: &[u8]) -> Result<&[u8], Reject> {
    match from_tag_fast(v) {
        Some(tag) => Ok(tag),
        None => parse_from_tag_full(v),
    }
}

/// The tag of a From value of the exact shape
/// `LWS [quoted-string LWS] "<" uri ">;tag=" value LWS`, where `value` is
/// non-empty, does not start with `"` and holds no byte at or below SP and
/// no `;`; `None` for any other shape (the caller then runs the full
/// grammar).
///
/// For that shape the full grammar takes the same steps: the display name
/// is skipped as a quoted-string, the first `>` after `<` closes the URI,
/// the one parameter is `tag`, its unquoted value runs to the trailing LWS.
/// So the answer is the same, found with one `memchr` for `>` and one pass
/// over the value instead of the general parameter loop.
#[inline]
fn from_tag_fast(v: &[u8]) -> Option<&[u8]> {
    let v = trim_end_lws(v);
    let mut i = skip_lws(v, 0);
    if v.get(i) == Some(&b'"') {
        i = skip_lws(v, skip_quoted_string(v, i).ok()?);
    }
    if v.get(i) != Some(&b'<') {
        return None;
    }
    let uri_at = i + 1;
    let close = uri_at + memchr(b'>', v.get(uri_at..)?)?;
    let [b';', t, a, g, b'=', value @ ..] = v.get(close + 1..)? else {
        return None;
    };
    // A fold without early exit: the compiler turns it into 16-byte vector
    // compares, where `all` would test byte by byte.
    let stops = value
        .iter()
        .fold(0u8, |acc, &b| acc | u8::from(b <= b' ' || b == b';'));
    let plain_value = stops == 0 && value.first().is_some_and(|&b| b != b'"');
    ([*t, *a, *g].eq_ignore_ascii_case(b"tag") && plain_value).then_some(value)
}

/// [`parse_from_tag`] by the full grammar.
fn parse_from_tag_full(v: &[u8]) -> Result<&[u8], Reject> {
    let mut i = skip_lws(v, 0);
    if i == v.len() {
        return Err(Reject::BadHeader);
    }
    // Find where the header parameters start: after the `>` of a name-addr,
    // or at the first `;` of an addr-spec. A `"` starts a quoted display name
    // whose content (which may hold `<`, `;`, `tag=`) is skipped.
    let params_at = loop {
        // `<` first is the form UAs echo back (`<uri>;tag=`): no search.
        let j = if v.get(i) == Some(&b'<') {
            i
        } else {
            match memchr3(b'"', b'<', b';', v.get(i..).unwrap_or_default()) {
                Some(k) => i + k,
                None => return Err(Reject::NoTag),
            }
        };
        match v[j] {
            b'"' => i = skip_quoted_string(v, j)?,
            b'<' => match memchr(b'>', &v[j + 1..]) {
                Some(close) => break j + 1 + close + 1,
                None => return Err(Reject::BadHeader),
            },
            _ => break j,
        }
    };

    // `*( SEMI from-param )`, SEMI = SWS ";" SWS, EQUAL = SWS "=" SWS.
    let mut tag: Option<&[u8]> = None;
    let mut p = params_at;
    loop {
        p = skip_lws(v, p);
        match v.get(p) {
            None => break,
            Some(b';') => p = skip_lws(v, p + 1),
            Some(_) => return Err(Reject::BadHeader),
        }
        let name_at = p;
        p = skip_token(v, p);
        if p == name_at {
            return Err(Reject::BadHeader);
        }
        let name = &v[name_at..p];
        p = skip_lws(v, p);
        let mut value: &[u8] = &[];
        if v.get(p) == Some(&b'=') {
            p = skip_lws(v, p + 1);
            let value_at = p;
            p = if v.get(p) == Some(&b'"') {
                skip_quoted_string(v, p)?
            } else {
                // gen-value = token / host / quoted-string: runs to the next
                // whitespace or `;` (a host may hold `[`, `]`, `:`).
                skip_while(v, p, &PARAM_VALUE_CHARS)
            };
            value = &v[value_at..p];
        }
        if name.eq_ignore_ascii_case(b"tag") && tag.replace(value).is_some() {
            return Err(Reject::BadHeader);
        }
    }
    tag.ok_or(Reject::NoTag)
}

/// `CSeq = "CSeq" HCOLON 1*DIGIT LWS Method` (§20.16). The number is at
/// most 10 digits (it is below 2**31, §8.1.1.5); returns the method.
fn parse_cseq_method(v: &[u8]) -> Result<&[u8], Reject> {
    let digits_at = skip_lws(v, 0);
    let mut i = digits_at;
    while i < v.len() && v[i].is_ascii_digit() {
        i += 1;
    }
    if i == digits_at || i - digits_at > 10 {
        return Err(Reject::BadHeader);
    }
    let method_at = skip_lws(v, i);
    if method_at == i {
        return Err(Reject::BadHeader);
    }
    let method_end = skip_token(v, method_at);
    if method_end == method_at || skip_lws(v, method_end) != v.len() {
        return Err(Reject::BadHeader);
    }
    Ok(&v[method_at..method_end])
}

/// `Content-Length = ( "Content-Length" / "l" ) HCOLON 1*DIGIT` (§20.14).
/// Saturates instead of overflowing: any huge value is "too long" anyway.
fn parse_content_length(v: &[u8]) -> Option<usize> {
    let digits_at = skip_lws(v, 0);
    let mut i = digits_at;
    let mut n: usize = 0;
    while i < v.len() && v[i].is_ascii_digit() {
        n = n
            .saturating_mul(10)
            .saturating_add(usize::from(v[i] - b'0'));
        i += 1;
    }
    (i != digits_at && skip_lws(v, i) == v.len()).then_some(n)
}

/// Index just past the closing `"` of the quoted-string opening at `at`
/// (§25.1: `quoted-pair = "\" ...` escapes any one byte).
fn skip_quoted_string(v: &[u8], at: usize) -> Result<usize, Reject> {
    debug_assert_eq!(v.get(at), Some(&b'"'));
    let mut i = at + 1;
    loop {
        let Some(k) = memchr2(b'"', b'\\', v.get(i..).unwrap_or_default()) else {
            return Err(Reject::BadHeader);
        };
        let j = i + k;
        if v[j] == b'"' {
            return Ok(j + 1);
        }
        i = j + 2; // skip the escaped byte; `get` above copes with i > len
    }
}

/// LWS inside a logical header: SP, HTAB and the CR LF of folds (§7.3.1).
#[inline]
fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

#[inline]
fn skip_lws(v: &[u8], mut i: usize) -> usize {
    while i < v.len() && is_lws(v[i]) {
        i += 1;
    }
    i
}

#[inline]
fn skip_token(v: &[u8], i: usize) -> usize {
    skip_while(v, i, &TOKEN_CHARS)
}

/// Index of the first byte at or after `i` that is not in `set` (or the end).
#[inline]
fn skip_while(v: &[u8], i: usize, set: &[bool; 256]) -> usize {
    match v.get(i..) {
        Some(rest) => {
            i + rest
                .iter()
                .position(|&b| !set[usize::from(b)])
                .unwrap_or(rest.len())
        }
        None => v.len(),
    }
}

/// Bytes of an unquoted generic-param value: anything up to LWS or `;`.
const PARAM_VALUE_CHARS: [bool; 256] = {
    let mut t = [true; 256];
    t[b' ' as usize] = false;
    t[b'\t' as usize] = false;
    t[b'\r' as usize] = false;
    t[b'\n' as usize] = false;
    t[b';' as usize] = false;
    t
};

/// `token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")` (§25.1).
const TOKEN_CHARS: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            );
        b += 1;
    }
    t
};

#[inline]
fn is_token_char(b: u8) -> bool {
    TOKEN_CHARS[usize::from(b)]
}

/// Lines end with CRLF (§7.5); a bare LF is accepted, so a trailing CR is
/// dropped here.
#[inline]
fn trim_cr(line: &[u8]) -> &[u8] {
    match line {
        [rest @ .., b'\r'] => rest,
        _ => line,
    }
}

/// `s` without trailing LWS bytes (SP, HTAB, CR, LF).
#[inline]
fn trim_end_lws(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t' | b'\r' | b'\n'] = s {
        s = rest;
    }
    s
}

#[inline]
fn trim_end_wsp(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[inline]
fn strip_prefix_ignore_case<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    match s.split_at_checked(prefix.len()) {
        Some((head, rest)) if head.eq_ignore_ascii_case(prefix) => Some(rest),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag_of(from_value: &str) -> Result<&[u8], Reject> {
        parse_from_tag(from_value.as_bytes())
    }

    #[test]
    fn reject_indexes_names_and_messages_are_stable_and_distinct() {
        const { assert!(Reject::COUNT <= 16) };
        for (i, r) in Reject::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
            let name = r.name();
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
            assert!(!r.to_string().is_empty());
            for other in &Reject::ALL[..i] {
                assert_ne!(other.name(), name);
            }
        }
        assert_eq!(Reject::NotSip.name(), "not_sip");
        assert_eq!(Reject::CSeqMethod.name(), "cseq_method");
        assert_eq!(Reject::Oversized.index(), 0);
        assert_eq!(Reject::Forged.index(), 12);
    }

    #[test]
    fn token_errors_map_to_rejects() {
        assert_eq!(Reject::from(TokenError::Length), Reject::BadTag);
        assert_eq!(Reject::from(TokenError::Alphabet), Reject::BadTag);
        assert_eq!(Reject::from(TokenError::Instance), Reject::Instance);
        assert_eq!(Reject::from(TokenError::Mac), Reject::Forged);
    }

    #[test]
    fn from_tag_forms() {
        let ok = |v: &str, want: &str| assert_eq!(tag_of(v), Ok(want.as_bytes()), "{v:?}");
        ok("<sip:kaping@10.0.0.5>;tag=abc", "abc");
        ok(" <sip:kaping@10.0.0.5>;tag=abc\r", "abc");
        ok("sip:kaping@10.0.0.5;tag=abc", "abc"); // §20.10: no brackets
        ok("sip:a@b;x=1;TAG=abc;lr", "abc");
        ok("<sip:a@b;tag=uri;lr>;tag=abc", "abc");
        ok("<sip:a@b> ; Tag = abc ; x = \"y;tag=no\"", "abc");
        ok("<sip:a@b>;x=\"y;tag=no\";tag=abc", "abc");
        ok("Alice Smith <sip:a@b>;tag=abc", "abc");
        ok("\"Alice\" <sip:a@b>;tag=abc", "abc");
        ok(
            "\"A \\\"q\\\" <x>; tag=no\" <sip:a@b;tag=no>;tag=abc",
            "abc",
        );
        ok("\"a\\\\\"<sip:a@b>;tag=abc", "abc"); // escaped backslash then closing quote
        ok("\"Alice\"\r\n <sip:a@b>\r\n\t;tag=abc", "abc"); // folded
        ok("<sip:a@b>;tagx=no;xtag=no;tag=abc", "abc");
        ok(
            "<sip:a@[2001:db8::1]:5060>;maddr=[2001:db8::2];tag=abc",
            "abc",
        );
        ok("<sip:a@b>;tag=", "");
        ok("<sip:a@b>;tag", "");
    }

    #[test]
    fn from_tag_rejections() {
        let err = |v: &str, want: Reject| assert_eq!(tag_of(v), Err(want), "{v:?}");
        err("<sip:a@b;tag=uri>", Reject::NoTag);
        err("<sip:a@b>;x=1", Reject::NoTag);
        err("sip:a@b", Reject::NoTag);
        err("\"x;tag=no\" <sip:a@b>", Reject::NoTag);
        err("", Reject::BadHeader);
        err(" \r\n ", Reject::BadHeader);
        err("\"unterminated <sip:a@b>;tag=abc", Reject::BadHeader);
        err("\"ends in escape\\", Reject::BadHeader);
        err("<sip:a@b;tag=abc", Reject::BadHeader);
        err("<sip:a@b>;tag=a;tag=b", Reject::BadHeader);
        err("<sip:a@b>;tag=a, <sip:c@d>;tag=b", Reject::BadHeader);
        err("<sip:a@b> garbage;tag=abc", Reject::BadHeader);
        err("<sip:a@b>;;tag=abc", Reject::BadHeader);
        err("<sip:a@b>;x=\"open;tag=abc", Reject::BadHeader);
    }

    #[test]
    fn cseq_forms() {
        fn ok(v: &str) -> Result<&[u8], Reject> {
            parse_cseq_method(v.as_bytes())
        }
        assert_eq!(ok(" 1 OPTIONS"), Ok(&b"OPTIONS"[..]));
        assert_eq!(ok("1\tOPTIONS\r"), Ok(&b"OPTIONS"[..]));
        assert_eq!(ok(" 4294967295 \r\n NOTIFY "), Ok(&b"NOTIFY"[..]));
        assert_eq!(ok(" 1 options"), Ok(&b"options"[..]));
        for bad in [
            "",
            " OPTIONS",
            " 1",
            " 1OPTIONS",
            " 12345678901 OPTIONS",
            " 1 OPT IONS",
            "x1 OPTIONS",
        ] {
            assert_eq!(ok(bad), Err(Reject::BadHeader), "{bad:?}");
        }
    }

    #[test]
    fn content_length_forms() {
        assert_eq!(parse_content_length(b" 0"), Some(0));
        assert_eq!(parse_content_length(b"  0\r"), Some(0));
        assert_eq!(parse_content_length(b"\t312 "), Some(312));
        assert_eq!(
            parse_content_length(b" 99999999999999999999999999"),
            Some(usize::MAX)
        );
        for bad in [&b""[..], b" ", b" -1", b" 1 2", b" 0x10", b" 12a"] {
            assert_eq!(parse_content_length(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"SIP/2.0 200 OK"), Ok(200));
        assert_eq!(parse_status_line(b"sip/2.0 486 Busy Here"), Ok(486));
        assert_eq!(parse_status_line(b"SIP/2.0 100"), Ok(100));
        assert_eq!(parse_status_line(b"SIP/2.0 699 "), Ok(699));
        for bad in [
            &b"SIP/2.0 099 x"[..],
            b"SIP/2.0 700 x",
            b"SIP/2.0 20 OK",
            b"SIP/2.0 2000 OK",
        ] {
            assert_eq!(parse_status_line(bad), Err(Reject::BadStatus), "{bad:?}");
        }
        for bad in [
            &b"SIP/2.0 2x0 OK"[..],
            b"SIP/2.0 200\tOK",
            b"SIP/2.0 ",
            b"SIP/2.0  200 OK",
        ] {
            assert_eq!(parse_status_line(bad), Err(Reject::BadStatus), "{bad:?}");
        }
        assert_eq!(
            parse_status_line(b"OPTIONS sip:a@b SIP/2.0"),
            Err(Reject::Request)
        );
        assert_eq!(
            parse_status_line(b"NOTIFY sip:a@b sip/2.0 "),
            Err(Reject::Request)
        );
        for bad in [
            &b""[..],
            b"SIP/2.0",
            b"SIP/3.0 200 OK",
            b"HTTP/1.1 200 OK",
            b" SIP/2.0",
        ] {
            assert_eq!(parse_status_line(bad), Err(Reject::NotSip), "{bad:?}");
        }
    }

    #[test]
    fn header_names_and_hcolon() {
        use HeaderName::*;
        type Case = (&'static [u8], Option<(HeaderName, usize)>);
        let cases: [Case; 20] = [
            (b"From: x", Some((From, 5))),
            (b"FROM:x", Some((From, 5))),
            (b"fRoM \t : x", Some((From, 8))),
            (b"f:x", Some((From, 2))),
            (b"F :x", Some((From, 3))),
            (b"CSeq: 1 OPTIONS", Some((CSeq, 5))),
            (b"cseq\t:1 OPTIONS", Some((CSeq, 6))),
            (b"Content-Length: 0", Some((ContentLength, 15))),
            (b"CONTENT-LENGTH:0", Some((ContentLength, 15))),
            (b"l: 0", Some((ContentLength, 2))),
            (b"c: application/sdp", None), // Content-Type, not CSeq
            (b"Contact: <sip:a@b>", None),
            (b"Call-ID: x", None),
            (b"Content-Type: x", None),
            (b"Content_Length: 0", None),
            (b"Froms: x", None),
            (b"From x", None),
            (b"From", None),
            (b" From: x", None), // a continuation line
            (b"", None),
        ];
        for (line, want) in cases {
            let got = header_of(line);
            assert!(got == want, "{:?}", String::from_utf8_lossy(line));
        }
    }

    /// Folding (§7.3.1): a header's value runs over its continuation lines,
    /// a fold cut before its LF is a truncated reply, and a bare-LF line end
    /// ends the value like CR LF.
    #[test]
    fn folded_values_and_truncated_folds() {
        // From's value is the whole folded header (`a`, `b`, `c`: no tag),
        // and the lines after it are headers again.
        let d = b"SIP/2.0 200 OK\r\nFrom: a\r\n b\r\n\tc\r\nTo: x\r\nCSeq: 1 OPTIONS\r\n\r\n";
        assert_eq!(parse(d), Err(Reject::NoTag));
        let d = b"SIP/2.0 200 OK\r\nFrom: a\r\n b\r\n\tc;tag=t\r\nCSeq: 1 OPTIONS\r\n\r\n";
        assert_eq!(parse(d).map(|r| r.from_tag), Ok(&b"t"[..]));

        let folded = b"SIP/2.0 200 OK\r\nFrom: <sip:a@b>\r\n ;tag=x\r\nCSeq: 1 OPTIONS\r\n\r\n";
        assert_eq!(parse(folded).map(|r| r.from_tag), Ok(&b"x"[..]));
        let lf_only = b"SIP/2.0 200 OK\nFrom: <sip:a@b>;tag=x\nCSeq: 1 OPTIONS\n\n";
        assert_eq!(parse(lf_only).map(|r| r.from_tag), Ok(&b"x"[..]));
        for cut in [
            &b"SIP/2.0 200 OK\r\nFrom: <sip:a@b>;tag=x\r\n b"[..],
            b"SIP/2.0 200 OK\r\nFrom: <sip:a@b>;tag=x\r\n",
            b"SIP/2.0 200 OK\r\nCSeq: 1 OPTIONS\r\n\tOPTIONS",
        ] {
            assert_eq!(parse(cut), Err(Reject::Truncated), "{cut:?}");
        }
        // A repeated CSeq is reported when its value ends, even when the
        // datagram ends right there; a fold cut short is truncation first.
        let dup = b"SIP/2.0 200 OK\r\nCSeq: 1 OPTIONS\r\nCSeq: 2 OPTIONS\r\n";
        assert_eq!(parse(dup), Err(Reject::BadHeader));
        let dup_cut = b"SIP/2.0 200 OK\r\nCSeq: 1 OPTIONS\r\nCSeq: 2 OPTIONS\r\n x";
        assert_eq!(parse(dup_cut), Err(Reject::Truncated));
        // A second From is reported as soon as its first line is complete.
        let dup_from = b"SIP/2.0 200 OK\r\nFrom: <sip:a@b>;tag=x\r\nf: y\r\n z";
        assert_eq!(parse(dup_from), Err(Reject::DuplicateFrom));
    }

    /// The fast From path answers exactly as the full grammar whenever it
    /// answers, and it does answer for the shapes UAs send.
    #[test]
    fn from_tag_fast_path_agrees_with_the_full_grammar() {
        let values = [
            " <sip:kaping@10.0.0.5>;tag=abc\r",
            "<sip:kaping@10.0.0.5>;tag=abc",
            " \"kaping\" <sip:kaping@10.0.0.5>;TAG=abc\r",
            "\"a \\\" <b>\"\t<sip:a@b;tag=no>;tag=abc \r\n ",
            " <sip:a@b>;tag=abc\r\n\t",
        ];
        for v in values {
            let fast = from_tag_fast(v.as_bytes());
            assert_eq!(fast, Some(&b"abc"[..]), "{v:?}");
            assert_eq!(parse_from_tag_full(v.as_bytes()), Ok(&b"abc"[..]), "{v:?}");
        }
        // Shapes left to the full grammar (or rejected by it).
        for v in [
            "<sip:a@b>;tag=",
            "<sip:a@b>;tag",
            "<sip:a@b>;tag=\"q\"",
            "<sip:a@b> ;tag=abc",
            "<sip:a@b>; tag=abc",
            "<sip:a@b>;tag =abc",
            "<sip:a@b>;tag=a b",
            "<sip:a@b>;tag=a;x=1",
            "<sip:a@b>;tag=a\x01b",
            "<sip:a@b>;x=1;tag=abc",
            "sip:a@b;tag=abc",
            "Alice <sip:a@b>;tag=abc",
            "\"x\" y <sip:a@b>;tag=abc",
            "\"unterminated <sip:a@b>;tag=abc",
            "<sip:a@b;tag=abc",
            "",
            " \r\n ",
        ] {
            assert_eq!(from_tag_fast(v.as_bytes()), None, "{v:?}");
        }
    }
}
