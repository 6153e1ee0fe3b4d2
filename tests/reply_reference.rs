//! Differential test: the optimised `reply::parse` against the line-by-line
//! parser it replaced (kept here verbatim as the reference model, like the
//! simple model of a timer wheel). Every datagram, valid or not, must get
//! the same answer from both: the same `Reply` or the same `Reject`. This
//! is what lets the fast paths (one LF iterator per datagram, the `<uri>;tag=`
//! From shortcut) exist without weakening any behaviour.

use kaping::wire::reply::{parse, Reject, Reply};
use proptest::prelude::*;

/// The parser as it was before the single-pass rewrite (commit 15fdecc),
/// unchanged but for visibility.
#[allow(clippy::all)]
mod reference {
    use kaping::wire::reply::{Reject, Reply, REPLY_LEN_MAX};
    use memchr::{memchr, memchr2, memchr3};

    /// Parses a datagram as a SIP response, extracting status, From tag and CSeq
    /// method. Never panics or allocates.
    ///
    /// When several causes apply, the first in this order is reported: size
    /// (Oversized), status line (Truncated, NotSip, Request, BadStatus), header
    /// section as it is walked (Truncated, DuplicateFrom, BadHeader for a
    /// repeated CSeq or Content-Length), Content-Length against the body
    /// (BadHeader, Oversized, Truncated), then From (NoFrom, BadHeader, NoTag)
    /// and CSeq (NoCSeq, BadHeader).
    pub(crate) fn parse(datagram: &[u8]) -> Result<Reply<'_>, Reject> {
        let d = datagram;
        if d.len() > REPLY_LEN_MAX {
            return Err(Reject::Oversized);
        }
        let Some(status_lf) = memchr(b'\n', d) else {
            return Err(if is_status_line_start(d) {
                Reject::Truncated
            } else {
                Reject::NotSip
            });
        };
        let status = parse_status_line(trim_cr(&d[..status_lf]))?;

        // Header section (§7.3): one `memchr` per physical line.
        let mut from: Option<&[u8]> = None;
        let mut cseq: Option<&[u8]> = None;
        let mut content_length: Option<&[u8]> = None;
        let mut pos = status_lf + 1;
        let body_at = loop {
            let Some(k) = memchr(b'\n', &d[pos..]) else {
                return Err(Reject::Truncated);
            };
            let lf = pos + k;
            let line = &d[pos..lf];
            // Only a line whose first byte can start a name we read is looked at
            // further: that also skips continuation lines (first byte SP/HTAB)
            // of headers we ignore, and the empty line falls out of the same test.
            let Some((name, value_at)) = header_of(line) else {
                if line.is_empty() || line == b"\r" {
                    break lf + 1; // the empty line (§7.5)
                }
                pos = lf + 1;
                continue;
            };
            let slot = match name {
                HeaderName::From if from.is_some() => return Err(Reject::DuplicateFrom),
                HeaderName::From => &mut from,
                HeaderName::CSeq => &mut cseq,
                HeaderName::ContentLength => &mut content_length,
            };
            // The value runs to the end of the logical header: folded lines
            // (§7.3.1) are part of it, and their CR LF count as whitespace.
            let end = logical_header_end(d, lf)?;
            if slot.replace(&d[pos + value_at..end]).is_some() {
                return Err(Reject::BadHeader);
            }
            pos = end + 1;
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
                    let &[n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11, n12, n13, ..] = line
                    else {
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

    /// Index of the LF that ends the logical header whose first line ends at
    /// `lf`: a following line starting with SP or HTAB continues it (§7.3.1).
    fn logical_header_end(d: &[u8], mut lf: usize) -> Result<usize, Reject> {
        while let Some(&next) = d.get(lf + 1) {
            if next != b' ' && next != b'\t' {
                break;
            }
            match memchr(b'\n', &d[lf + 1..]) {
                Some(k) => lf += 1 + k,
                None => return Err(Reject::Truncated),
            }
        }
        Ok(lf)
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
    fn parse_from_tag(v: &[u8]) -> Result<&[u8], Reject> {
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
}

/// Stands in for a token: the differential test compares parsing, not MACs.
const TAG: &str = "EjRWA6vN777vEJLerb7v1inxaJZx";

/// Replies in the shapes UAs send (From as `<uri>;tag=`, with a quoted or a
/// token display name, compact, folded, LF-only, with a body) and a request.
const FIXTURES: [&str; 8] = [
    "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$T$;rport=5060\r\n\
     From: <sip:kaping@10.0.0.5>;tag=$T$\r\nTo: <sip:1001@pbx.example.com>;tag=1843902311\r\n\
     Call-ID: $T$@10.0.0.5\r\nCSeq: 17 OPTIONS\r\nContact: <sip:1001@192.168.1.23:5060>\r\n\
     Allow: INVITE, INFO, PRACK, ACK, BYE, CANCEL, OPTIONS, NOTIFY, REFER, UPDATE\r\n\
     User-Agent: Yealink SIP-T46S 66.86.0.15\r\nContent-Length: 0\r\n\r\n",
    "SIP/2.0 200 OK\r\nv: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$T$\r\n\
     f: <sip:kaping@10.0.0.5>;tag=$T$\r\nt: <sip:5005@example.com>;tag=8721\r\ni: $T$@10.0.0.5\r\n\
     CSeq: 17 OPTIONS\r\nl: 0\r\n\r\n",
    "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$T$\r\n\
     From: \"kaping\" <sip:kaping@10.0.0.5>;tag=$T$\r\nCSeq: 17 OPTIONS\r\nCall-ID: $T$@10.0.0.5\r\n\
     Content-Type: application/sdp\r\nContent-Length: 13\r\n\r\nv=0\r\ns=x\r\nt=0",
    "SIP/2.0 486 Busy Here\r\nFrom: Kaping Pinger <sip:kaping@10.0.0.5;transport=udp>\r\n \
     ;tag=$T$\r\nCSeq:\t17\r\n\tOPTIONS\r\nContent-Length:  0 \r\n\r\n",
    "SIP/2.0 200 OK\nFrom: sip:kaping@10.0.0.5;tag=$T$;x=1\nCSeq: 17 OPTIONS\n\n",
    "SIP/2.0 404 Not Found\r\nFROM : \"a \\\"b\\\" <c>;tag=no\" <sip:k@h;tag=no>;tag=$T$\r\n\
     cseq: 1 OPTIONS\r\nL: 0\r\n\r\n",
    "SIP/2.0 200 OK\r\nFrom: <sip:kaping@10.0.0.5>;TAG = $T$ \r\nCSeq: 17 OPTIONS\r\n\r\n",
    "OPTIONS sip:kaping@10.0.0.5:5060 SIP/2.0\r\nFrom: <sip:1001@pbx.example.com>;tag=2140556237\r\n\
     CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
];

fn fixture(i: usize) -> Vec<u8> {
    FIXTURES[i].replace("$T$", TAG).into_bytes()
}

fn same(msg: &[u8]) -> Result<(), TestCaseError> {
    let want: Result<Reply<'_>, Reject> = reference::parse(msg);
    prop_assert_eq!(parse(msg), want, "{:?}", String::from_utf8_lossy(msg));
    Ok(())
}

#[test]
fn fixtures_parse_as_before() {
    for i in 0..FIXTURES.len() {
        let msg = fixture(i);
        same(&msg).unwrap();
        if i + 1 < FIXTURES.len() {
            assert_eq!(parse(&msg).map(|r| r.from_tag), Ok(TAG.as_bytes()), "{i}");
        }
        for len in 0..msg.len() {
            same(&msg[..len]).unwrap();
        }
    }
}

/// Every single-byte replacement by a byte that matters to the parser, at
/// every position of every fixture.
#[test]
fn every_single_byte_edit_parses_as_before() {
    for i in 0..FIXTURES.len() {
        let msg = fixture(i);
        for pos in 0..msg.len() {
            for &b in b"\r\n \t:;<>\"\\=,tTaAgG0fFlLcC\x00" {
                let mut m = msg.clone();
                m[pos] = b;
                same(&m).unwrap();
                let mut ins = msg.clone();
                ins.insert(pos, b);
                same(&ins).unwrap();
            }
            let mut del = msg.clone();
            del.remove(pos);
            same(&del).unwrap();
        }
    }
}

#[derive(Clone, Debug)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(&b"\r\n \t:;<>\"\\=,tTaAgG0123456789fFlLcC"[..]),
    ];
    prop_oneof![
        (any::<usize>(), byte.clone()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), byte).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Remove),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply(msg: &mut Vec<u8>, e: &Edit) {
    match *e {
        Edit::Set(i, b) if !msg.is_empty() => {
            let i = i % msg.len();
            msg[i] = b;
        }
        Edit::Insert(i, b) => msg.insert(i % (msg.len() + 1), b),
        Edit::Remove(i) if !msg.is_empty() => {
            msg.remove(i % msg.len());
        }
        Edit::Truncate(n) => msg.truncate(n % (msg.len() + 1)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn mutated_fixtures_parse_as_before(
        i in 0..FIXTURES.len(),
        edits in prop::collection::vec(edit(), 1..8),
    ) {
        let mut msg = fixture(i);
        for e in &edits {
            apply(&mut msg, e);
        }
        same(&msg)?;
    }

    #[test]
    fn header_soup_parses_as_before(
        lines in prop::collection::vec(
            prop::sample::select(vec![
                "SIP/2.0 200 OK", "From: <sip:a@b>;tag=$T$", "f:\"x\"<sip:a@b;tag=1>;tag=$T$",
                "From: \"q\\\"\" <sip:a@b>;tag=$T$", "f: <sip:a@b>;tag=\"$T$\"",
                "From: <sip:a@b>;tag=$T$;tag=x", "From:<sip:a@b>;tag=$T$ ", "From: <sip:a@b>",
                "CSeq: 17 OPTIONS", "cseq:1\tOPTIONS", " OPTIONS", "\t;tag=$T$", " ", "\t",
                "l: 0", "Content-Length: 3", "Content-Length: 0", "", "\r", "\"", "<", ">",
                ";tag=", "From:", "To: <sip:x@y>", "Call-ID: x", "Contact: <sip:c@d>",
                "Froms: x", "abc",
            ]),
            0..16,
        ),
        lf_only in any::<bool>(),
    ) {
        let eol = if lf_only { "\n" } else { "\r\n" };
        let msg = lines.join(eol).replace("$T$", TAG);
        same(msg.as_bytes())?;
    }

    #[test]
    fn arbitrary_bytes_parse_as_before(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        same(&bytes)?;
    }
}
