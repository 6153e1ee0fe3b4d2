//! Reply matching against responses shaped like real user agents send them,
//! and against everything that must be rejected: requests, errors in every
//! position, every truncation, forgeries, garbage and random mutations.
//!
//! Fixtures are byte literals with `$TOKEN$` where the UA echoed our token
//! (Via branch, From tag, Call-ID, RFC 3261 §8.2.6.2); the tests substitute a
//! real token. Content-Length values are the real body lengths.

use kaping::wire::reply::{match_reply, parse, Match, Reject, REPLY_LEN_MAX};
use kaping::wire::token::{encode, TokenFields, TokenKey, TOKEN_LEN};
use proptest::prelude::*;

const SECRET: [u8; 16] = *b"0123456789abcdef";
const INSTANCE: u32 = 0x00_0ABC;
const FIELDS: TokenFields = TokenFields {
    worker: 7,
    slot: 1_234_567,
    generation: 513,
    seq: 65_000,
    sent_us: 3_000_000_123,
};
const METHOD: &[u8] = b"OPTIONS";
const PLACEHOLDER: &[u8] = b"$TOKEN$";

fn key() -> TokenKey {
    TokenKey::new(SECRET, INSTANCE)
}

fn token(key: &TokenKey, fields: &TokenFields) -> [u8; TOKEN_LEN] {
    let mut t = [0; TOKEN_LEN];
    encode(key, fields, &mut t);
    t
}

/// The fixture with every `$TOKEN$` replaced by `tok`.
fn fill(template: &str, tok: &[u8]) -> Vec<u8> {
    let t = template.as_bytes();
    let mut out = Vec::with_capacity(t.len() + 3 * TOKEN_LEN);
    let mut i = 0;
    while i < t.len() {
        if t[i..].starts_with(PLACEHOLDER) {
            out.extend_from_slice(tok);
            i += PLACEHOLDER.len();
        } else {
            out.push(t[i]);
            i += 1;
        }
    }
    out
}

fn filled(template: &str) -> Vec<u8> {
    fill(template, &token(&key(), &FIELDS))
}

fn expected(status: u16) -> Match {
    Match {
        worker: FIELDS.worker,
        slot: FIELDS.slot,
        generation: FIELDS.generation,
        seq: FIELDS.seq,
        sent_us: FIELDS.sent_us,
        status,
    }
}

// --- 2xx replies to our OPTIONS, as real UAs write them -------------------

const YEALINK_200: &str = concat!(
    "SIP/2.0 200 OK\r\n",
    "Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$TOKEN$;rport=5060;received=203.0.113.7\r\n",
    "From: <sip:kaping@10.0.0.5>;tag=$TOKEN$\r\n",
    "To: <sip:1001@pbx.example.com>;tag=1843902311\r\n",
    "Call-ID: $TOKEN$@10.0.0.5\r\n",
    "CSeq: 17 OPTIONS\r\n",
    "Contact: <sip:1001@192.168.1.23:5060>\r\n",
    "Accept: application/sdp\r\n",
    "Allow: INVITE, INFO, PRACK, ACK, BYE, CANCEL, OPTIONS, NOTIFY, REGISTER, SUBSCRIBE, REFER, PUBLISH, UPDATE, MESSAGE\r\n",
    "Accept-Language: en\r\n",
    "Supported: replaces\r\n",
    "User-Agent: Yealink SIP-T46S 66.86.0.15\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

const POLYCOM_200_SDP: &str = concat!(
    "SIP/2.0 200 OK\r\n",
    "Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$TOKEN$;rport=5060\r\n",
    "From: \"kaping\" <sip:kaping@10.0.0.5>;tag=$TOKEN$\r\n",
    "To: <sip:2002@pbx.example.com>;tag=ED8AC1C4-95A3C8A2\r\n",
    "CSeq: 17 OPTIONS\r\n",
    "Call-ID: $TOKEN$@10.0.0.5\r\n",
    "Contact: <sip:2002@192.168.1.40:5060>\r\n",
    "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, INFO, MESSAGE, SUBSCRIBE, NOTIFY, PRACK, UPDATE, REFER\r\n",
    "Supported: 100rel,replaces\r\n",
    "User-Agent: PolycomVVX-VVX_410-UA/5.9.5.0614\r\n",
    "Accept-Language: en\r\n",
    "Accept: application/sdp,application/cpim-pidf+xml,message/sipfrag\r\n",
    "Accept-Encoding: identity\r\n",
    "Content-Type: application/sdp\r\n",
    "Content-Length: 350\r\n",
    "\r\n",
    "v=0\r\n",
    "o=- 1714032113 1714032113 IN IP4 192.168.1.40\r\n",
    "s=Polycom IP Phone\r\n",
    "c=IN IP4 192.168.1.40\r\n",
    "t=0 0\r\n",
    "a=sendrecv\r\n",
    "m=audio 2222 RTP/AVP 9 102 0 8 18 127\r\n",
    "a=rtpmap:9 G722/8000\r\n",
    "a=rtpmap:102 G7221/16000\r\n",
    "a=fmtp:102 bitrate=32000\r\n",
    "a=rtpmap:0 PCMU/8000\r\n",
    "a=rtpmap:8 PCMA/8000\r\n",
    "a=rtpmap:18 G729/8000\r\n",
    "a=fmtp:18 annexb=no\r\n",
    "a=rtpmap:127 telephone-event/8000\r\n",
);

/// Cisco puts Content-Length before the remaining headers and sends Date.
const CISCO_200_SDP: &str = concat!(
    "SIP/2.0 200 OK\r\n",
    "Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$TOKEN$;received=10.0.0.5\r\n",
    "From: <sip:kaping@10.0.0.5>;tag=$TOKEN$\r\n",
    "To: <sip:3003@pbx.example.com>;tag=a0f849d3c7b3000b6f1a2b3c-5d6e7f80\r\n",
    "Call-ID: $TOKEN$@10.0.0.5\r\n",
    "Date: Tue, 14 Apr 2026 09:12:44 GMT\r\n",
    "CSeq: 17 OPTIONS\r\n",
    "Server: Cisco-CP8841/14.1.1\r\n",
    "Content-Type: application/sdp\r\n",
    "Content-Length: 541\r\n",
    "Allow: ACK,BYE,CANCEL,INVITE,NOTIFY,OPTIONS,REFER,REGISTER,UPDATE,SUBSCRIBE,INFO\r\n",
    "Allow-Events: kpml,dialog\r\n",
    "Supported: replaces,join,sdp-anat,norefersub,resource-priority,extended-refer,X-cisco-callinfo,X-cisco-serviceuri,X-cisco-escapecodes,X-cisco-service-control,X-cisco-srtp-fallback,X-cisco-monrec,X-cisco-config,X-cisco-sis-7.0.0,X-cisco-xsi-8.5.1\r\n",
    "Accept: application/sdp,multipart/mixed\r\n",
    "Accept-Encoding: identity\r\n",
    "Accept-Language: en\r\n",
    "\r\n",
    "v=0\r\n",
    "o=Cisco-SIPUA 8263 0 IN IP4 192.168.1.50\r\n",
    "s=SIP Call\r\n",
    "t=0 0\r\n",
    "m=audio 1 RTP/AVP 114 9 124 0 8 116 18 101\r\n",
    "c=IN IP4 192.168.1.50\r\n",
    "a=rtpmap:114 opus/48000/2\r\n",
    "a=fmtp:114 maxplaybackrate=16000;sprop-maxcapturerate=16000;maxaveragebitrate=64000;stereo=0;sprop-stereo=0;usedtx=0\r\n",
    "a=rtpmap:9 G722/8000\r\n",
    "a=rtpmap:124 iLBC/8000\r\n",
    "a=fmtp:124 mode=20\r\n",
    "a=rtpmap:0 PCMU/8000\r\n",
    "a=rtpmap:8 PCMA/8000\r\n",
    "a=rtpmap:116 iLBC/8000\r\n",
    "a=fmtp:116 mode=30\r\n",
    "a=rtpmap:18 G729/8000\r\n",
    "a=fmtp:18 annexb=yes\r\n",
    "a=rtpmap:101 telephone-event/8000\r\n",
    "a=fmtp:101 0-15\r\n",
    "a=sendrecv\r\n",
);

/// Asterisk chan_pjsip: Call-ID before From, two spaces in Content-Length.
const ASTERISK_200: &str = concat!(
    "SIP/2.0 200 OK\r\n",
    "Via: SIP/2.0/UDP 10.0.0.5:5060;rport=5060;received=10.0.0.5;branch=z9hG4bK$TOKEN$\r\n",
    "Call-ID: $TOKEN$@10.0.0.5\r\n",
    "From: <sip:kaping@10.0.0.5>;tag=$TOKEN$\r\n",
    "To: <sip:asterisk@10.0.0.9>;tag=z9hG4bK$TOKEN$\r\n",
    "CSeq: 17 OPTIONS\r\n",
    "Accept: application/dialog-info+xml, application/xpidf+xml, application/cpim-pidf+xml, application/simple-message-summary, application/pidf+xml, application/sdp, message/sipfrag;version=2.0\r\n",
    "Allow: OPTIONS, REGISTER, SUBSCRIBE, NOTIFY, PUBLISH, INVITE, ACK, BYE, CANCEL, UPDATE, PRACK, INFO, REFER, MESSAGE\r\n",
    "Supported: 100rel, timer, replaces, norefersub\r\n",
    "Accept-Encoding: text/plain\r\n",
    "Accept-Language: en\r\n",
    "Server: Asterisk PBX 20.5.0\r\n",
    "Content-Length:  0\r\n",
    "\r\n",
);

const FREESWITCH_200: &str = concat!(
    "SIP/2.0 200 OK\r\n",
    "Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$TOKEN$;rport=5060;received=10.0.0.5\r\n",
    "From: <sip:kaping@10.0.0.5>;tag=$TOKEN$\r\n",
    "To: <sip:1000@10.0.0.20>;tag=Q3vXe2K1mXFaH\r\n",
    "Call-ID: $TOKEN$@10.0.0.5\r\n",
    "CSeq: 17 OPTIONS\r\n",
    "Contact: <sip:10.0.0.20:5060>\r\n",
    "User-Agent: FreeSWITCH-mod_sofia/1.10.11-release~64bit\r\n",
    "Accept: application/sdp\r\n",
    "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, MESSAGE, INFO, UPDATE, REGISTER, REFER, NOTIFY, PUBLISH, SUBSCRIBE\r\n",
    "Supported: timer, path, replaces\r\n",
    "Allow-Events: talk, hold, conference, presence, as-feature-event, dialog, line-seize, call-info, sla, include-session-description, presence.winfo, message-summary, refer\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

const LINPHONE_200: &str = concat!(
    "SIP/2.0 200 Ok\r\n",
    "Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$TOKEN$;rport=5060;received=198.51.100.20\r\n",
    "From: <sip:kaping@10.0.0.5>;tag=$TOKEN$\r\n",
    "To: <sip:linphone@sip.example.org>;tag=xY1aZ~3f\r\n",
    "Call-ID: $TOKEN$@10.0.0.5\r\n",
    "CSeq: 17 OPTIONS\r\n",
    "User-Agent: Linphone-Desktop/5.2.4 (ubuntu) LinphoneSDK/5.3.38\r\n",
    "Supported: replaces, outbound, gruu, path\r\n",
    "Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY, MESSAGE, SUBSCRIBE, INFO, PRACK, UPDATE\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

const BARESIP_200_SDP: &str = concat!(
    "SIP/2.0 200 OK\r\n",
    "Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$TOKEN$;rport=5060;received=10.0.0.5\r\n",
    "Contact: <sip:alice-0x55d2@192.168.1.77:41233>\r\n",
    "To: <sip:alice@example.com>;tag=6a7c2f1e0b3d9a4c\r\n",
    "From: <sip:kaping@10.0.0.5>;tag=$TOKEN$\r\n",
    "Call-ID: $TOKEN$@10.0.0.5\r\n",
    "CSeq: 17 OPTIONS\r\n",
    "Allow: INVITE,ACK,BYE,CANCEL,OPTIONS,NOTIFY,SUBSCRIBE,INFO,MESSAGE,REFER,UPDATE\r\n",
    "Supported: replaces,norefersub\r\n",
    "User-Agent: baresip v3.10.1 (x86_64/linux)\r\n",
    "Content-Type: application/sdp\r\n",
    "Content-Length: 289\r\n",
    "\r\n",
    "v=0\r\n",
    "o=- 2890844526 2890844526 IN IP4 192.168.1.77\r\n",
    "s=-\r\n",
    "c=IN IP4 192.168.1.77\r\n",
    "t=0 0\r\n",
    "m=audio 10000 RTP/AVP 0 8 101\r\n",
    "a=rtpmap:0 PCMU/8000\r\n",
    "a=rtpmap:8 PCMA/8000\r\n",
    "a=rtpmap:101 telephone-event/8000\r\n",
    "a=fmtp:101 0-15\r\n",
    "a=sendrecv\r\n",
    "a=label:1\r\n",
    "a=ssrc:1587043224 cname:e0c1d3a4b5f6\r\n",
    "a=rtcp-rsize\r\n",
);

/// Compact forms (§7.3.3) and two proxies on the way back (two Via lines and
/// one comma-separated Via).
const COMPACT_200: &str = concat!(
    "SIP/2.0 200 OK\r\n",
    "v: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$TOKEN$;received=10.0.0.5\r\n",
    "v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK5e1a.7c2bd1f2000000000000000000000000.0,SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKx1\r\n",
    "f: <sip:kaping@10.0.0.5>;tag=$TOKEN$\r\n",
    "t: <sip:5005@example.com>;tag=8721\r\n",
    "i: $TOKEN$@10.0.0.5\r\n",
    "CSeq: 17 OPTIONS\r\n",
    "m: <sip:5005@192.168.7.7:5062;transport=udp>\r\n",
    "k: replaces\r\n",
    "l: 0\r\n",
    "\r\n",
);

/// Lowercase names, tabs in HCOLON, bare-LF line ends, no Content-Length.
const LOWERCASE_LF_200: &str = concat!(
    "sip/2.0 200 OK\n",
    "via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$TOKEN$\n",
    "from\t:\t<sip:kaping@10.0.0.5>\t;\ttag\t=\t$TOKEN$\t\n",
    "to: <sip:6006@example.com>;tag=1\n",
    "call-id: $TOKEN$@10.0.0.5\n",
    "cseq:\t17\tOPTIONS\n",
    "\n",
);

/// UPPERCASE names, a display name full of traps, a URI `tag` parameter and
/// folded From and CSeq (§7.3.1).
const UPPERCASE_FOLDED_200: &str = concat!(
    "SIP/2.0 200 OK\r\n",
    "VIA: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$TOKEN$\r\n",
    "FROM: \"Ping \\\"<bot>\\\"; tag=xyz\"\r\n",
    "   <sip:kaping@10.0.0.5;tag=not-this-one;lr>\r\n",
    "\t;x-info=\"a;tag=b\" ;TAG=$TOKEN$\r\n",
    "TO: <sip:7007@example.com>\r\n",
    "CALL-ID: $TOKEN$@10.0.0.5\r\n",
    "CSEQ: 17\r\n",
    " OPTIONS\r\n",
    "CONTENT-LENGTH: 0\r\n",
    "\r\n",
);

/// A From without angle brackets: every `;` parameter is a header parameter
/// (§20.10), as an SBC that rewrites From may send it.
const ADDR_SPEC_FROM_200: &str = concat!(
    "SIP/2.0 200 OK\r\n",
    "Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$TOKEN$\r\n",
    "From: sip:kaping@10.0.0.5;x=1;tag=$TOKEN$\r\n",
    "To: sip:8008@example.com;tag=99\r\n",
    "Call-ID: $TOKEN$@10.0.0.5\r\n",
    "CSeq: 17 OPTIONS\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

// --- error replies: still a sign of life, matched with their status --------

const NOT_FOUND_404: &str = concat!(
    "SIP/2.0 404 Not Found\r\n",
    "Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$TOKEN$;rport=5060;received=10.0.0.5\r\n",
    "From: <sip:kaping@10.0.0.5>;tag=$TOKEN$\r\n",
    "To: <sip:9999@10.0.0.9>;tag=as5f3a1c2d\r\n",
    "Call-ID: $TOKEN$@10.0.0.5\r\n",
    "CSeq: 17 OPTIONS\r\n",
    "Server: kamailio (5.7.4 (x86_64/linux))\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

const BUSY_486: &str = concat!(
    "SIP/2.0 486 Busy Here\r\n",
    "Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$TOKEN$\r\n",
    "From: <sip:kaping@10.0.0.5>;tag=$TOKEN$\r\n",
    "To: <sip:1001@pbx.example.com>;tag=3917366012\r\n",
    "Call-ID: $TOKEN$@10.0.0.5\r\n",
    "CSeq: 17 OPTIONS\r\n",
    "User-Agent: Grandstream GXP2170 1.0.11.64\r\n",
    "Warning: 399 192.168.1.60 \"DND enabled\"\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

const UNAVAILABLE_503: &str = concat!(
    "SIP/2.0 503 Service Unavailable\r\n",
    "Via: SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bK$TOKEN$;rport=5060\r\n",
    "From: <sip:kaping@10.0.0.5>;tag=$TOKEN$\r\n",
    "To: <sip:trunk@carrier.example.net>;tag=SDa5v1b01-1\r\n",
    "Call-ID: $TOKEN$@10.0.0.5\r\n",
    "CSeq: 17 OPTIONS\r\n",
    "Retry-After: 30\r\n",
    "Reason: Q.850;cause=41;text=\"Temporary failure\"\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

const MATCHING: [(&str, &str, u16); 14] = [
    ("yealink", YEALINK_200, 200),
    ("polycom", POLYCOM_200_SDP, 200),
    ("cisco", CISCO_200_SDP, 200),
    ("asterisk", ASTERISK_200, 200),
    ("freeswitch", FREESWITCH_200, 200),
    ("linphone", LINPHONE_200, 200),
    ("baresip", BARESIP_200_SDP, 200),
    ("compact", COMPACT_200, 200),
    ("lowercase_lf", LOWERCASE_LF_200, 200),
    ("uppercase_folded", UPPERCASE_FOLDED_200, 200),
    ("addr_spec_from", ADDR_SPEC_FROM_200, 200),
    ("404", NOT_FOUND_404, 404),
    ("486", BUSY_486, 486),
    ("503", UNAVAILABLE_503, 503),
];

// --- requests arriving on our port ------------------------------------------

const OPTIONS_REQUEST: &str = concat!(
    "OPTIONS sip:kaping@10.0.0.5:5060 SIP/2.0\r\n",
    "Via: SIP/2.0/UDP 192.168.1.23:5060;branch=z9hG4bK1967212379;rport\r\n",
    "From: <sip:1001@pbx.example.com>;tag=2140556237\r\n",
    "To: <sip:kaping@10.0.0.5>\r\n",
    "Call-ID: 1337802468@192.168.1.23\r\n",
    "CSeq: 1 OPTIONS\r\n",
    "Max-Forwards: 70\r\n",
    "User-Agent: Yealink SIP-T46S 66.86.0.15\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

const NOTIFY_REQUEST: &str = concat!(
    "NOTIFY sip:kaping@10.0.0.5 SIP/2.0\r\n",
    "Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bK$TOKEN$\r\n",
    "From: <sip:keepalive@10.0.0.9>;tag=$TOKEN$\r\n",
    "To: <sip:kaping@10.0.0.5>\r\n",
    "Call-ID: $TOKEN$@10.0.0.9\r\n",
    "CSeq: 102 NOTIFY\r\n",
    "Event: keep-alive\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

const INVITE_REQUEST: &str = concat!(
    "INVITE sip:1001@10.0.0.5 SIP/2.0\r\n",
    "Via: SIP/2.0/UDP 198.51.100.77:5071;branch=z9hG4bK-524287-1---0c2e3a1b9f6d5e4c;rport\r\n",
    "Max-Forwards: 70\r\n",
    "Contact: <sip:100@198.51.100.77:5071>\r\n",
    "To: <sip:1001@10.0.0.5>\r\n",
    "From: \"sipvicious\"<sip:100@1.1.1.1>;tag=6665386434633461313363340131333436363436353439\r\n",
    "Call-ID: 843612085719270412968752\r\n",
    "CSeq: 1 INVITE\r\n",
    "User-Agent: friendly-scanner\r\n",
    "Content-Length: 0\r\n",
    "\r\n",
);

fn check_fixture_content_length(name: &str, msg: &[u8]) {
    let text = std::str::from_utf8(msg).unwrap();
    let Some(body_at) = text.find("\r\n\r\n").map(|i| i + 4) else {
        return; // the LF-only fixture carries no Content-Length
    };
    for line in text[..body_at].lines() {
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower
            .strip_prefix("content-length:")
            .or(lower.strip_prefix("l:"))
        {
            assert_eq!(
                v.trim().parse::<usize>().unwrap(),
                msg.len() - body_at,
                "{name}"
            );
        }
    }
}

#[test]
fn real_replies_match_with_their_fields_and_status() {
    let k = key();
    for (name, template, status) in MATCHING {
        let msg = filled(template);
        check_fixture_content_length(name, &msg);
        assert!(msg.len() <= REPLY_LEN_MAX);
        assert_eq!(
            match_reply(&k, METHOD, &msg),
            Ok(expected(status)),
            "{name}"
        );
        let reply = parse(&msg).unwrap();
        assert_eq!(reply.from_tag, token(&k, &FIELDS), "{name}");
        assert_eq!(reply.cseq_method, METHOD, "{name}");
        assert_eq!(reply.status, status, "{name}");
    }
}

#[test]
fn every_prefix_of_every_real_reply_is_truncated() {
    let k = key();
    for (name, template, _) in MATCHING {
        let msg = filled(template);
        for len in 0..msg.len() {
            assert_eq!(
                match_reply(&k, METHOD, &msg[..len]),
                Err(Reject::Truncated),
                "{name} cut at {len}: {:?}",
                String::from_utf8_lossy(&msg[..len])
            );
        }
    }
}

#[test]
fn trailing_bytes_beyond_content_length_are_ignored() {
    // §18.3: bytes past Content-Length are discarded, the message stands.
    let mut msg = filled(YEALINK_200);
    msg.extend_from_slice(b"\r\n\r\n");
    assert_eq!(match_reply(&key(), METHOD, &msg), Ok(expected(200)));
}

#[test]
fn requests_are_rejected_as_requests() {
    let k = key();
    for (name, template) in [
        ("options", OPTIONS_REQUEST),
        ("notify", NOTIFY_REQUEST),
        ("invite", INVITE_REQUEST),
    ] {
        // Even a request carrying our own token in From is not a reply.
        assert_eq!(
            match_reply(&k, METHOD, &filled(template)),
            Err(Reject::Request),
            "{name}"
        );
    }
}

#[test]
fn forged_and_foreign_tokens() {
    let k = key();
    let good = token(&k, &FIELDS);

    // Valid structure, every character of the payload/MAC part altered in
    // turn to another alphabet character: the MAC catches all of them.
    for pos in 4..TOKEN_LEN {
        let mut forged = good;
        forged[pos] = if forged[pos] == b'A' { b'B' } else { b'A' };
        let msg = fill(YEALINK_200, &forged);
        assert_eq!(
            match_reply(&k, METHOD, &msg),
            Err(Reject::Forged),
            "pos {pos}"
        );
    }
    // A token made with another secret (another run, or an attacker).
    let other_run = token(&TokenKey::new(*b"fedcba9876543210", INSTANCE), &FIELDS);
    assert_eq!(
        match_reply(&k, METHOD, &fill(YEALINK_200, &other_run)),
        Err(Reject::Forged)
    );
    // Another kaping instance sharing the port.
    let other_instance = token(&TokenKey::new(SECRET, INSTANCE + 1), &FIELDS);
    assert_eq!(
        match_reply(&k, METHOD, &fill(YEALINK_200, &other_instance)),
        Err(Reject::Instance)
    );
    // Tags other UAs generate: not ours at all.
    for tag in [&b"as5f3a1c2d"[..], b"1843902311", b"", b"ED8AC1C4-95A3C8A2"] {
        assert_eq!(
            match_reply(&k, METHOD, &fill(YEALINK_200, tag)),
            Err(Reject::BadTag)
        );
    }
    let mut bad_alphabet = good;
    bad_alphabet[10] = b'_'; // a token char, but not in our alphabet
    assert_eq!(
        match_reply(&k, METHOD, &fill(YEALINK_200, &bad_alphabet)),
        Err(Reject::BadTag)
    );
}

/// Replaces the first occurrence of `from` in the filled Yealink reply.
fn yealink_with(from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8(filled(YEALINK_200)).unwrap();
    assert!(text.contains(from), "{from:?}");
    text.replacen(from, to, 1).into_bytes()
}

#[test]
fn header_level_rejections() {
    let k = key();
    let tok = String::from_utf8(token(&k, &FIELDS).to_vec()).unwrap();
    let from_line = format!("From: <sip:kaping@10.0.0.5>;tag={tok}\r\n");
    let cases: Vec<(Vec<u8>, Reject)> = vec![
        (yealink_with(&from_line, ""), Reject::NoFrom),
        (
            yealink_with(&from_line, &format!("{from_line}f: <sip:x@y>;tag=1\r\n")),
            Reject::DuplicateFrom,
        ),
        (
            yealink_with(&from_line, &format!("{from_line}FROM: <sip:x@y>\r\n")),
            Reject::DuplicateFrom,
        ),
        (yealink_with(";tag=", ";x="), Reject::NoTag),
        (
            yealink_with("<sip:kaping@10.0.0.5>;tag=", "<sip:kaping@10.0.0.5;tag="),
            Reject::BadHeader,
        ),
        (
            yealink_with(&format!("tag={tok}"), &format!("tag={tok};tag={tok}")),
            Reject::BadHeader,
        ),
        (yealink_with("CSeq: 17 OPTIONS\r\n", ""), Reject::NoCSeq),
        (
            yealink_with("CSeq: 17 OPTIONS\r\n", "c: 17 OPTIONS\r\n"),
            Reject::NoCSeq,
        ),
        (
            yealink_with("CSeq: 17 OPTIONS", "CSeq: 17 INVITE"),
            Reject::CSeqMethod,
        ),
        (
            yealink_with("CSeq: 17 OPTIONS", "CSeq: 17 options"),
            Reject::CSeqMethod,
        ),
        (
            yealink_with("CSeq: 17 OPTIONS", "CSeq: OPTIONS"),
            Reject::BadHeader,
        ),
        (
            yealink_with(
                "CSeq: 17 OPTIONS\r\n",
                "CSeq: 17 OPTIONS\r\nCSeq: 18 OPTIONS\r\n",
            ),
            Reject::BadHeader,
        ),
        (
            yealink_with("Content-Length: 0", "Content-Length: zero"),
            Reject::BadHeader,
        ),
        (
            yealink_with("Content-Length: 0", "Content-Length: 1"),
            Reject::Truncated,
        ),
        (
            yealink_with("Content-Length: 0", "Content-Length: 4096"),
            Reject::Oversized,
        ),
        (
            yealink_with("Content-Length: 0", "Content-Length: 18446744073709551616"),
            Reject::Oversized,
        ),
        (yealink_with("\r\n\r\n", "\r\n"), Reject::Truncated),
        (
            yealink_with("SIP/2.0 200 OK", "SIP/2.0 2OO OK"),
            Reject::BadStatus,
        ),
        (
            yealink_with("SIP/2.0 200 OK", "SIP/2.0 800 OK"),
            Reject::BadStatus,
        ),
        (
            yealink_with("SIP/2.0 200 OK", "SIP/2.1 200 OK"),
            Reject::NotSip,
        ),
    ];
    for (msg, want) in cases {
        assert_eq!(
            match_reply(&k, METHOD, &msg),
            Err(want),
            "{:?}",
            String::from_utf8_lossy(&msg)
        );
    }
    // Same reply, but we sent NOTIFY (nat_traversal style): method mismatch.
    assert_eq!(
        match_reply(&k, b"NOTIFY", &filled(YEALINK_200)),
        Err(Reject::CSeqMethod)
    );
}

#[test]
fn size_limits() {
    let k = key();
    let base = filled(YEALINK_200);
    // Pad with an ignored header up to exactly REPLY_LEN_MAX: still matches.
    let pad_len = REPLY_LEN_MAX - base.len() - "X-Pad: \r\n".len();
    let padded = yealink_with(
        "Content-Length: 0\r\n",
        &format!("X-Pad: {}\r\nContent-Length: 0\r\n", "p".repeat(pad_len)),
    );
    assert_eq!(padded.len(), REPLY_LEN_MAX);
    assert_eq!(match_reply(&k, METHOD, &padded), Ok(expected(200)));
    // One byte more is oversized, whatever it is.
    let mut over = padded;
    over.push(b'\n');
    assert_eq!(match_reply(&k, METHOD, &over), Err(Reject::Oversized));
    assert_eq!(
        match_reply(&k, METHOD, &vec![0u8; 65_507]),
        Err(Reject::Oversized)
    );
}

#[test]
fn garbage_is_not_sip() {
    let k = key();
    let cases: [&[u8]; 9] = [
        b"\r\n\r\n", // RFC 5626 CRLF keepalive
        b"\r\n",
        &[0, 0, 0, 0],                                   // nathelper UDP ping
        b"\x00\x01\x00\x00\x21\x12\xa4\x42abcdefghijkl", // STUN Binding request
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"SIP/2.0x200 OK",
        b"hello",
        b"\xff\xfe\xfd",
    ];
    for msg in cases {
        let got = match_reply(&k, METHOD, msg);
        assert_eq!(
            got,
            Err(Reject::NotSip),
            "{:?}",
            String::from_utf8_lossy(msg)
        );
    }
    // Without any LF, the start of a status line is a cut reply, not garbage.
    for msg in [&b""[..], b"S", b"sip/2", b"SIP/2.0", b"SIP/2.0 200 OK"] {
        assert_eq!(
            match_reply(&k, METHOD, msg),
            Err(Reject::Truncated),
            "{msg:?}"
        );
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn apply(msg: &mut Vec<u8>, m: &Mutation) {
    match *m {
        Mutation::Set(i, b) if !msg.is_empty() => {
            let i = i % msg.len();
            msg[i] = b;
        }
        Mutation::Insert(i, b) => msg.insert(i % (msg.len() + 1), b),
        Mutation::Remove(i) if !msg.is_empty() => {
            msg.remove(i % msg.len());
        }
        Mutation::Truncate(n) => msg.truncate(n % (msg.len() + 1)),
        _ => {}
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Bytes that matter to the parser are over-represented.
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(&b"\r\n \t:;<>\"\\=,tTaAgG0123456789"[..]),
    ];
    prop_oneof![
        (any::<usize>(), byte.clone()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), byte).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..5000)) {
        let k = key();
        let r = match_reply(&k, METHOD, &bytes);
        prop_assert!(r.is_err(), "random bytes matched: {:?}", r);
    }

    #[test]
    fn arbitrary_header_soup_never_panics(
        lines in prop::collection::vec(
            prop::sample::select(vec![
                "SIP/2.0 200 OK", "From: <sip:a@b>;tag=$TOKEN$", "f:\"x\"<sip:a@b;tag=1>;tag=$TOKEN$",
                "CSeq: 17 OPTIONS", "cseq:1\tOPTIONS", " OPTIONS", "\t;tag=$TOKEN$", "l: 0",
                "Content-Length: 3", "", "\"", "<", ">", ";tag=", "From:", "To: <sip:x@y>",
            ]),
            0..16,
        ),
        lf_only in any::<bool>(),
    ) {
        let eol = if lf_only { "\n" } else { "\r\n" };
        let msg = filled(&lines.join(eol));
        let k = key();
        if let Ok(m) = match_reply(&k, METHOD, &msg) {
            prop_assert_eq!(m, expected(m.status));
        }
    }

    #[test]
    fn mutated_replies_never_panic_and_never_change_fields(
        fixture in 0..MATCHING.len(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let k = key();
        let (_, template, _) = MATCHING[fixture];
        let mut msg = filled(template);
        for m in &mutations {
            apply(&mut msg, m);
        }
        if let Ok(m) = match_reply(&k, METHOD, &msg) {
            // Still matching means the token survived intact; the status is
            // the only field a mutation may have changed.
            prop_assert_eq!(parse(&msg).unwrap().from_tag, &token(&k, &FIELDS)[..]);
            prop_assert_eq!(m, expected(m.status));
            prop_assert!((100..=699).contains(&m.status));
        }
    }
}

/// The reply fuzz target starts from these fixtures: `fuzz/seeds/reply/`
/// holds each one filled with the fuzz key's token (the same key as here).
/// `KAPING_BLESS_SEEDS=1 cargo test --test reply_parse` rewrites them
/// after a fixture changes.
#[test]
fn fixtures_are_the_reply_fuzz_seeds() {
    assert_eq!(key().instance_id(), kaping::fuzzing::key().instance_id());
    assert_eq!(
        token(&key(), &FIELDS),
        token(&kaping::fuzzing::key(), &kaping::fuzzing::FIELDS)
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/reply");
    let requests = [
        ("options_request", OPTIONS_REQUEST),
        ("notify_request", NOTIFY_REQUEST),
        ("invite_request", INVITE_REQUEST),
    ];
    let bless = std::env::var_os("KAPING_BLESS_SEEDS").is_some();
    for (name, fixture) in MATCHING.iter().map(|(n, f, _)| (*n, *f)).chain(requests) {
        let path = dir.join(format!("{name}.sip"));
        let want = filled(fixture);
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (KAPING_BLESS_SEEDS=1 writes it)", path.display()));
        assert!(have == want, "{} differs from its fixture", path.display());
    }
}
