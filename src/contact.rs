//! The contact model: what a contact file, Kamailio's `ul.dump` or (later)
//! the control socket tells us about one SIP contact, and how that becomes
//! the address a ping is sent to.
//!
//! This is the control path: it allocates freely and may block on DNS. The
//! worker never sees a `ContactSpec`; it gets the resolved address and the
//! strings its request template needs.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::wire::uri::{self, Target, Transport, UriError, UriPart};

/// One contact as given by its source. Strings are kept as given (after
/// trimming) so that what we report back is what the operator wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContactSpec {
    /// The Contact URI; it is also the Request-URI of every ping.
    pub uri: String,
    /// Address-of-record (To header); derived from `uri` when absent.
    pub aor: Option<String>,
    /// Kamailio `received`: the source address the REGISTER came from.
    pub received: Option<String>,
    /// The Path header value stored with the registration (sent as Route).
    pub path: Option<String>,
    /// The local socket the contact registered on (`udp:198.51.100.10:5060`).
    pub socket: Option<String>,
    /// Per-contact ping interval, overriding the configured one.
    pub interval: Option<Duration>,
    /// Explicit destination (`ip:port`), overriding received/Path/URI.
    pub send_to: Option<SocketAddr>,
    /// Kamailio's record id, kept to name the contact in reports.
    pub ruid: Option<String>,
    /// Where this contact's pings leave from, overriding the `source`
    /// setting (DESIGN §10).
    pub source: Option<PingSource>,
    /// What is sent, overriding the `keepalive` setting.
    pub keepalive: Option<KeepaliveKind>,
}

/// Where a contact's pings leave from (DESIGN §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PingSource {
    /// kaping's own socket (`bind` / `bind6`): replies come straight back.
    Bind,
    /// The socket the contact registered on (ul.dump `Socket`, `socket`);
    /// a contact without one uses `source_default`, else `bind`.
    Socket,
    /// This address, shared with the proxy that owns it: the pings leave
    /// as from the registrar, so NATs that filter by address and port let
    /// them through.
    Addr(SocketAddr),
}

impl std::str::FromStr for PingSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "bind" => Ok(PingSource::Bind),
            "socket" => Ok(PingSource::Socket),
            other => parse_socket(other).map(PingSource::Addr),
        }
    }
}

impl std::fmt::Display for PingSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PingSource::Bind => f.write_str("bind"),
            PingSource::Socket => f.write_str("socket"),
            PingSource::Addr(a) => write!(f, "{a}"),
        }
    }
}

/// What a ping is (DESIGN §2): a SIP request that proves the contact
/// alive, or a NAT-only keepalive that keeps its binding open and proves
/// nothing (no reply is expected, so its liveness is never known).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeepaliveKind {
    /// The configured SIP request (`method`), matched and timed.
    #[default]
    Sip,
    /// Four zero bytes: nathelper's UDP ping.
    Null,
    /// `CRLF CRLF`: the RFC 5626 §3.5.1 double-CRLF ping (without waiting
    /// for the pong).
    Crlf,
}

impl KeepaliveKind {
    pub fn name(self) -> &'static str {
        match self {
            KeepaliveKind::Sip => "sip",
            KeepaliveKind::Null => "null",
            KeepaliveKind::Crlf => "crlf",
        }
    }

    /// The datagram of a NAT-only keepalive; `None` for `Sip`.
    pub fn payload(self) -> Option<&'static [u8]> {
        match self {
            KeepaliveKind::Sip => None,
            KeepaliveKind::Null => Some(&[0, 0, 0, 0]),
            KeepaliveKind::Crlf => Some(b"\r\n\r\n"),
        }
    }
}

impl std::str::FromStr for KeepaliveKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "sip" => Ok(KeepaliveKind::Sip),
            "null" => Ok(KeepaliveKind::Null),
            "crlf" => Ok(KeepaliveKind::Crlf),
            other => Err(format!("'{other}' is not one of sip, null, crlf")),
        }
    }
}

/// SipHash-1-3 keys of [`shard_of`]: the ASCII of "kaping-s" and
/// "hard-v01" read as little-endian u64s. Fixed forever: every instance,
/// of any version, on any host, must put a contact in the same shard.
const SHARD_K0: u64 = u64::from_le_bytes(*b"kaping-s");
const SHARD_K1: u64 = u64::from_le_bytes(*b"hard-v01");

/// Which of `count` shards a contact belongs to (`--shard K/N`, DESIGN
/// §11): SipHash-1-3 with [`SHARD_K0`]/[`SHARD_K1`] over the bytes of its
/// key as usrloc knows it, the AoR (empty when absent), a newline and the
/// contact URI, taken modulo `count`. It depends on nothing else (no
/// order, count or host), so N instances fed the same contacts hold
/// disjoint sets whose union is every contact.
pub fn shard_of(aor: Option<&str>, uri: &str, count: u32) -> u32 {
    use std::hash::Hasher;
    debug_assert!(count > 0);
    let mut h = siphasher::sip::SipHasher13::new_with_keys(SHARD_K0, SHARD_K1);
    h.write(aor.unwrap_or("").as_bytes());
    h.write(b"\n");
    h.write(uri.as_bytes());
    (h.finish() % u64::from(count.max(1))) as u32
}

/// `K/N` of `--shard`: 1 ≤ N ≤ [`SHARDS_MAX`], K < N.
pub fn parse_shard(text: &str) -> Result<(u32, u32), String> {
    let (k, n) = text
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("'{text}' is not K/N (this instance's shard K of N, e.g. 0/2)"))?;
    let (Ok(k), Ok(n)) = (k.trim().parse::<u32>(), n.trim().parse::<u32>()) else {
        return Err(format!("'{text}' is not K/N with whole numbers"));
    };
    if n == 0 || n > SHARDS_MAX {
        return Err(format!("{n} shards: give 1 to {SHARDS_MAX}"));
    }
    if k >= n {
        return Err(format!(
            "shard {k} of {n}: shards are numbered 0 to {}",
            n - 1
        ));
    }
    Ok((k, n))
}

/// Most shards one registrar's contacts may be split into.
pub const SHARDS_MAX: u32 = 1024;

/// A local socket as Kamailio names it (`udp:198.51.100.10:5060`,
/// `udp:[2001:db8::1]:5060`) or a bare `IP:PORT`. Only UDP sockets can
/// carry kaping's pings; any other protocol is refused with the reason.
pub fn parse_socket(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    let (proto, addr) = match t.split_once(':') {
        Some((p, rest)) if p.chars().all(|c| c.is_ascii_alphabetic()) && !p.is_empty() => {
            (Some(p), rest)
        }
        _ => (None, t),
    };
    if let Some(p) = proto {
        if !p.eq_ignore_ascii_case("udp") {
            return Err(format!(
                "socket '{t}': protocol {p} cannot carry kaping's pings (UDP only)"
            ));
        }
    }
    // Kamailio may follow the address with " advertise ..." or a name.
    let addr = addr.split_whitespace().next().unwrap_or("");
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|_| format!("socket '{t}' is not [udp:]IP:PORT (IPv6 as [addr]:port)"))?;
    if parsed.port() == 0 {
        return Err(format!("socket '{t}': port 0"));
    }
    if parsed.ip().is_unspecified() {
        return Err(format!(
            "socket '{t}': a wildcard address names no source (give the proxy's own address)"
        ));
    }
    Ok(parsed)
}

/// Why a contact cannot be pinged.
#[derive(Debug, thiserror::Error)]
pub enum ContactError {
    #[error("contact URI: {0}")]
    Uri(UriError),
    #[error("{field}: {source}")]
    Field {
        field: &'static str,
        source: UriError,
    },
    #[error("transport {0:?} is not supported yet (kaping pings over UDP)")]
    Transport(Transport),
    #[error("cannot resolve host '{host}': {why}")]
    Resolve { host: String, why: String },
}

impl ContactSpec {
    /// A contact known only by its URI.
    pub fn from_uri(uri: impl Into<String>) -> ContactSpec {
        ContactSpec {
            uri: uri.into(),
            ..ContactSpec::default()
        }
    }

    /// The address pings go to, in Kamailio's order (explicit destination,
    /// `received`, first Path hop, the contact itself), with host names
    /// resolved through `resolver`. Only UDP is pingable for now.
    pub fn destination(&self, resolver: &mut Resolver) -> Result<SocketAddr, ContactError> {
        // Validate the URI even when another field decides the destination:
        // it is the Request-URI of every ping.
        let contact = uri::SipUri::parse(&self.uri).map_err(ContactError::Uri)?;
        self.destination_parsed(&contact, resolver)
    }

    /// [`ContactSpec::destination`] with `self.uri` already parsed.
    pub fn destination_parsed(
        &self,
        contact: &uri::SipUri<'_>,
        resolver: &mut Resolver,
    ) -> Result<SocketAddr, ContactError> {
        let transport = contact.transport();
        if transport != Transport::Udp {
            return Err(ContactError::Transport(transport));
        }
        if let Some(addr) = self.send_to {
            return Ok(addr);
        }
        let dest =
            uri::destination_of_parsed(contact, self.received.as_deref(), self.path.as_deref())
                .map_err(|e| match e.part {
                    UriPart::Contact => ContactError::Uri(e.error),
                    UriPart::Received => ContactError::Field {
                        field: "received",
                        source: e.error,
                    },
                    UriPart::Path => ContactError::Field {
                        field: "path",
                        source: e.error,
                    },
                })?;
        if dest.transport != Transport::Udp {
            return Err(ContactError::Transport(dest.transport));
        }
        match dest.target {
            Target::Addr(addr) => Ok(addr),
            Target::Name { host, port } => resolver.resolve(&host, port),
        }
    }
}

/// Resolves host names once each (a million contacts usually name a
/// handful of hosts), preferring IPv4 answers unless told otherwise.
#[derive(Debug, Default)]
pub struct Resolver {
    cache: HashMap<(String, u16), Result<SocketAddr, String>>,
    pub prefer_ipv6: bool,
}

impl Resolver {
    pub fn resolve(&mut self, host: &str, port: u16) -> Result<SocketAddr, ContactError> {
        let prefer_ipv6 = self.prefer_ipv6;
        let entry = self
            .cache
            .entry((host.to_ascii_lowercase(), port))
            .or_insert_with(|| {
                let addrs: Vec<SocketAddr> = (host, port)
                    .to_socket_addrs()
                    .map_err(|e| e.to_string())?
                    .collect();
                addrs
                    .iter()
                    .find(|a| a.is_ipv6() == prefer_ipv6)
                    .or(addrs.first())
                    .copied()
                    .ok_or_else(|| "no address".to_string())
            });
        entry.clone().map_err(|why| ContactError::Resolve {
            host: host.to_string(),
            why,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(spec: &ContactSpec) -> Result<SocketAddr, ContactError> {
        spec.destination(&mut Resolver::default())
    }

    #[test]
    fn destination_follows_kamailio_order() {
        let mut c = ContactSpec::from_uri("sip:alice@192.0.2.1:5070");
        assert_eq!(dest(&c).unwrap(), "192.0.2.1:5070".parse().unwrap());
        c.path = Some("<sip:198.51.100.9:5080;lr>".into());
        assert_eq!(dest(&c).unwrap(), "198.51.100.9:5080".parse().unwrap());
        c.received = Some("sip:203.0.113.7:41022".into());
        assert_eq!(dest(&c).unwrap(), "203.0.113.7:41022".parse().unwrap());
        c.send_to = Some("127.0.0.5:5060".parse().unwrap());
        assert_eq!(dest(&c).unwrap(), "127.0.0.5:5060".parse().unwrap());
    }

    #[test]
    fn sockets_are_read_as_kamailio_writes_them() {
        assert_eq!(
            parse_socket("udp:198.51.100.10:5060").unwrap(),
            "198.51.100.10:5060".parse().unwrap()
        );
        assert_eq!(
            parse_socket("UDP:[2001:db8::1]:5062").unwrap(),
            "[2001:db8::1]:5062".parse().unwrap()
        );
        assert_eq!(
            parse_socket("203.0.113.1:5060").unwrap(),
            "203.0.113.1:5060".parse().unwrap()
        );
        assert_eq!(
            parse_socket("udp:203.0.113.1:5060 advertise 198.51.100.1:5060").unwrap(),
            "203.0.113.1:5060".parse().unwrap()
        );
        for (bad, says) in [
            ("tcp:203.0.113.1:5060", "protocol tcp"),
            ("tls:203.0.113.1:5061", "protocol tls"),
            ("udp:0.0.0.0:5060", "wildcard"),
            ("udp:203.0.113.1", "not [udp:]IP:PORT"),
            ("udp:203.0.113.1:0", "port 0"),
            ("", "not [udp:]IP:PORT"),
        ] {
            let e = parse_socket(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        assert_eq!("bind".parse::<PingSource>().unwrap(), PingSource::Bind);
        assert_eq!("socket".parse::<PingSource>().unwrap(), PingSource::Socket);
        assert_eq!(
            "203.0.113.1:5060"
                .parse::<PingSource>()
                .unwrap()
                .to_string(),
            "203.0.113.1:5060"
        );
        assert_eq!(
            "crlf".parse::<KeepaliveKind>().unwrap().payload(),
            Some(&b"\r\n\r\n"[..])
        );
        assert!("ping".parse::<KeepaliveKind>().is_err());
    }

    #[test]
    fn shards_are_stable_disjoint_and_cover_every_contact() {
        // Pinned values: a change here would move contacts between hosts.
        assert_eq!(shard_of(Some("alice"), "sip:alice@192.0.2.1:5060", 1), 0);
        let pinned: Vec<u32> = (0..8)
            .map(|i| shard_of(Some(&format!("u{i}")), &format!("sip:u{i}@192.0.2.{i}"), 4))
            .collect();
        assert_eq!(pinned, [1, 3, 3, 3, 2, 2, 1, 0]);
        // Spread: 10,000 contacts over 4 shards, each within 10 % of 2,500.
        let mut counts = [0u32; 4];
        for i in 0..10_000 {
            counts[shard_of(
                Some(&format!("p{i}")),
                &format!("sip:p{i}@203.0.113.2:{}", 1024 + i),
                4,
            ) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (2250..2750).contains(&c)),
            "{counts:?}"
        );
        // The AoR is part of the key: absent and empty are the same key.
        assert_eq!(
            shard_of(None, "sip:x@h", 7),
            shard_of(Some(""), "sip:x@h", 7)
        );
        assert_eq!(parse_shard("1/2"), Ok((1, 2)));
        assert_eq!(parse_shard(" 0 / 1 "), Ok((0, 1)));
        for bad in ["2/2", "0/0", "1", "a/b", "0/5000", "-1/2"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_names_resolve_once() {
        let mut r = Resolver::default();
        let c = ContactSpec::from_uri("sip:bob@localhost:5099");
        let a = c.destination(&mut r).unwrap();
        assert!(a.ip().is_loopback() && a.port() == 5099, "{a}");
        assert_eq!(r.cache.len(), 1);
        c.destination(&mut r).unwrap();
        assert_eq!(r.cache.len(), 1);
    }

    #[test]
    fn unpingable_contacts_say_why() {
        let e = dest(&ContactSpec::from_uri(
            "sip:bob@10.0.0.6:5061;transport=tls",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
        let e = dest(&ContactSpec::from_uri("sip:bob@10.0.0.6:99999")).unwrap_err();
        assert!(e.to_string().starts_with("contact URI:"), "{e}");
        let mut c = ContactSpec::from_uri("sip:bob@10.0.0.6");
        c.received = Some("sip:203.0.113.7:0".into());
        let e = dest(&c).unwrap_err();
        assert!(e.to_string().starts_with("received:"), "{e}");
        let e = dest(&ContactSpec::from_uri("sip:x@no-such-host.invalid")).unwrap_err();
        assert!(e.to_string().contains("cannot resolve"), "{e}");
    }
}
