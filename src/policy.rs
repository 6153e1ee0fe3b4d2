//! Which destinations kaping may ping.
//!
//! A contact comes from a file, the control socket, a registrar over DMQ or
//! a reload, and any of them can carry a typo or a hostile address. A
//! keepalive sent to a broadcast or multicast address reaches every host
//! of a segment; one sent to loopback reaches the host's own services. So
//! every destination passes [`DestinationPolicy::check`] before it is
//! pinged, whatever its source (the daemon's single admission path), and a
//! refused contact is reported with the reason like any other bad contact.
//!
//! The rules, in order:
//! 1. never: port 0, unspecified (`0.0.0.0/8`, `::`), the limited broadcast
//!    `255.255.255.255`, multicast (`224.0.0.0/4`, `ff00::/8`) and IPv6
//!    link-local (`fe80::/10`: it needs an interface no contact names);
//! 2. `deny_destinations`: refused when any entry contains it;
//! 3. loopback (`127.0.0.0/8`, `::1`): refused unless an entry of
//!    `allow_destinations` that lies itself within loopback contains it. A
//!    broad entry such as `0.0.0.0/0` does not let loopback through: it
//!    has to be named;
//! 4. `allow_destinations`, when not empty: refused unless an entry
//!    contains it.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are judged as the IPv4
//! address they carry. Control path only: one check per contact added.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// An address prefix: `192.0.2.0/24`, `2001:db8::/32`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Whether `ip` (already unmapped) lies within this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => prefix_eq(&net.octets(), &a.octets(), self.len),
            (IpAddr::V6(net), IpAddr::V6(a)) => prefix_eq(&net.octets(), &a.octets(), self.len),
            _ => false,
        }
    }

    /// Whether every address of this prefix is loopback.
    fn is_loopback(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => self.len >= 8 && a.is_loopback(),
            IpAddr::V6(a) => self.len == 128 && a.is_loopback(),
        }
    }
}

fn prefix_eq(net: &[u8], a: &[u8], len: u8) -> bool {
    let (bytes, bits) = ((len / 8) as usize, len % 8);
    if net[..bytes] != a[..bytes] {
        return false;
    }
    bits == 0 || {
        let mask = 0xffu8 << (8 - bits);
        net[bytes] & mask == a[bytes] & mask
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    /// `ADDR/LEN` or a bare address (the prefix of that one address).
    /// Host bits set under the mask are refused: `192.0.2.1/24` is more
    /// likely a typo than a wish for `192.0.2.0/24`.
    fn from_str(s: &str) -> Result<Cidr, String> {
        let t = s.trim();
        let (addr_text, len_text) = match t.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (t, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("'{t}': '{addr_text}' is not an IPv4 or IPv6 address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len_text {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("'{t}': prefix length '{l}' is not 0 to {max}")),
            },
        };
        let cidr = Cidr { addr, len };
        let network = cidr.network();
        if network != addr {
            return Err(format!(
                "'{t}' has bits set beyond its /{len} prefix; the network is {network}/{len}"
            ));
        }
        Ok(cidr)
    }
}

impl Cidr {
    fn network(&self) -> IpAddr {
        fn mask(bytes: &mut [u8], len: u8) {
            for (i, b) in bytes.iter_mut().enumerate() {
                let keep = (len as usize).saturating_sub(i * 8).min(8) as u32;
                *b &= (0xffu16 << (8 - keep)) as u8;
            }
        }
        match self.addr {
            IpAddr::V4(a) => {
                let mut o = a.octets();
                mask(&mut o, self.len);
                IpAddr::V4(Ipv4Addr::from(o))
            }
            IpAddr::V6(a) => {
                let mut o = a.octets();
                mask(&mut o, self.len);
                IpAddr::V6(Ipv6Addr::from(o))
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Why a destination is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("port 0 cannot be sent to")]
    PortZero,
    #[error("an unspecified address cannot be sent to")]
    Unspecified,
    #[error("a broadcast address: every host of the segment would get the pings")]
    Broadcast,
    #[error("a multicast address: every member of the group would get the pings")]
    Multicast,
    #[error("an IPv6 link-local address: no contact names the interface it needs")]
    LinkLocal,
    #[error(
        "a loopback address (this host); to ping it, name it in allow_destinations, e.g. \"{0}\""
    )]
    Loopback(&'static str),
    #[error("within deny_destinations entry {0}")]
    Denied(Cidr),
    #[error("not within any allow_destinations entry")]
    NotAllowed,
}

impl Refused {
    /// A short name for counters and events.
    pub fn name(&self) -> &'static str {
        match self {
            Refused::PortZero => "port_zero",
            Refused::Unspecified => "unspecified",
            Refused::Broadcast => "broadcast",
            Refused::Multicast => "multicast",
            Refused::LinkLocal => "link_local",
            Refused::Loopback(_) => "loopback",
            Refused::Denied(_) => "denied",
            Refused::NotAllowed => "not_allowed",
        }
    }
}

/// `allow_destinations` and `deny_destinations`, and the fixed rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestinationPolicy {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

impl DestinationPolicy {
    /// Reads the two lists; an error names the setting and the entry.
    pub fn new(
        allow: &[String],
        deny: &[String],
    ) -> Result<DestinationPolicy, (&'static str, String)> {
        let read = |setting: &'static str, list: &[String]| {
            list.iter()
                .map(|e| e.parse::<Cidr>().map_err(|why| (setting, why)))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(DestinationPolicy {
            allow: read("allow_destinations", allow)?,
            deny: read("deny_destinations", deny)?,
        })
    }

    /// The policy the tests and the demo use: loopback allowed (and
    /// nothing else needed).
    pub fn loopback() -> DestinationPolicy {
        DestinationPolicy {
            allow: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            deny: Vec::new(),
        }
    }

    /// Whether kaping may ping `dest`; the rules are in the module doc.
    pub fn check(&self, dest: SocketAddr) -> Result<(), Refused> {
        let ip = match dest.ip() {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
            v4 => v4,
        };
        if dest.port() == 0 {
            return Err(Refused::PortZero);
        }
        match ip {
            IpAddr::V4(a) => {
                if a.octets()[0] == 0 {
                    return Err(Refused::Unspecified);
                }
                if a.is_broadcast() {
                    return Err(Refused::Broadcast);
                }
                if a.is_multicast() {
                    return Err(Refused::Multicast);
                }
            }
            IpAddr::V6(a) => {
                if a.is_unspecified() {
                    return Err(Refused::Unspecified);
                }
                if a.is_multicast() {
                    return Err(Refused::Multicast);
                }
                if a.segments()[0] & 0xffc0 == 0xfe80 {
                    return Err(Refused::LinkLocal);
                }
            }
        }
        if let Some(d) = self.deny.iter().find(|d| d.contains(ip)) {
            return Err(Refused::Denied(*d));
        }
        if ip.is_loopback() {
            let named = self.allow.iter().any(|a| a.is_loopback() && a.contains(ip));
            if !named {
                let example = if ip.is_ipv4() {
                    "127.0.0.0/8"
                } else {
                    "::1/128"
                };
                return Err(Refused::Loopback(example));
            }
            return Ok(());
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|a| a.contains(ip)) {
            return Err(Refused::NotAllowed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> DestinationPolicy {
        let s = |l: &[&str]| l.iter().map(|e| e.to_string()).collect::<Vec<_>>();
        DestinationPolicy::new(&s(allow), &s(deny)).unwrap()
    }

    fn check(p: &DestinationPolicy, dest: &str) -> Result<(), &'static str> {
        p.check(dest.parse().unwrap()).map_err(|r| r.name())
    }

    #[test]
    fn fixed_refusals_hold_whatever_the_lists_say() {
        let everything = policy(&["0.0.0.0/0", "::/0"], &[]);
        for (dest, why) in [
            ("255.255.255.255:5060", "broadcast"),
            ("224.0.0.1:5060", "multicast"),
            ("239.255.255.250:1900", "multicast"),
            ("0.0.0.0:5060", "unspecified"),
            ("0.1.2.3:5060", "unspecified"),
            ("[::]:5060", "unspecified"),
            ("[ff02::1]:5060", "multicast"),
            ("[fe80::1]:5060", "link_local"),
            ("[febf::1]:5060", "link_local"),
            ("[::ffff:255.255.255.255]:5060", "broadcast"),
            ("[::ffff:224.0.0.9]:5060", "multicast"),
            ("192.0.2.1:0", "port_zero"),
            ("127.0.0.1:5060", "loopback"),
            ("[::1]:5060", "loopback"),
            ("[::ffff:127.0.0.1]:5060", "loopback"),
        ] {
            assert_eq!(check(&everything, dest), Err(why), "{dest}");
            assert_eq!(
                check(&DestinationPolicy::default(), dest),
                Err(why),
                "{dest}"
            );
        }
        // Link-local IPv4 and private space are ordinary destinations.
        for dest in [
            "169.254.1.1:5060",
            "10.0.0.1:5060",
            "192.0.2.1:5060",
            "[2001:db8::1]:5060",
            "[fec0::1]:5060",
        ] {
            assert_eq!(check(&DestinationPolicy::default(), dest), Ok(()), "{dest}");
        }
    }

    #[test]
    fn loopback_only_when_named() {
        let lo = DestinationPolicy::loopback();
        assert_eq!(check(&lo, "127.0.0.1:5060"), Ok(()));
        assert_eq!(check(&lo, "127.9.8.7:5060"), Ok(()));
        assert_eq!(check(&lo, "[::1]:5060"), Ok(()));
        assert_eq!(check(&lo, "[::ffff:127.0.0.1]:5060"), Ok(()));
        // The loopback allowance makes allow non-empty: others are out.
        assert_eq!(check(&lo, "192.0.2.1:5060"), Err("not_allowed"));
        let one = policy(&["127.0.0.1", "0.0.0.0/0"], &[]);
        assert_eq!(check(&one, "127.0.0.1:5060"), Ok(()));
        assert_eq!(check(&one, "127.0.0.2:5060"), Err("loopback"));
        assert_eq!(check(&one, "198.51.100.1:5060"), Ok(()));
        let msg = DestinationPolicy::default()
            .check("127.0.0.1:5060".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("allow_destinations") && msg.contains("127.0.0.0/8"),
            "{msg}"
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = policy(
            &["192.0.2.0/24", "2001:db8::/32"],
            &["192.0.2.128/25", "2001:db8:bad::/48"],
        );
        assert_eq!(check(&p, "192.0.2.1:5060"), Ok(()));
        assert_eq!(check(&p, "192.0.2.200:5060"), Err("denied"));
        assert_eq!(check(&p, "198.51.100.1:5060"), Err("not_allowed"));
        assert_eq!(check(&p, "[2001:db8::1]:5060"), Ok(()));
        assert_eq!(check(&p, "[2001:db8:bad::1]:5060"), Err("denied"));
        assert_eq!(check(&p, "[::ffff:192.0.2.200]:5060"), Err("denied"));
        let why = p
            .check("192.0.2.200:1".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert_eq!(why, "within deny_destinations entry 192.0.2.128/25");
        // Deny alone: everything else goes.
        let d = policy(&[], &["203.0.113.0/24"]);
        assert_eq!(check(&d, "203.0.113.9:5060"), Err("denied"));
        assert_eq!(check(&d, "198.51.100.1:5060"), Ok(()));
    }

    #[test]
    fn prefixes_are_read_strictly() {
        let c = |s: &str| s.parse::<Cidr>();
        assert_eq!(c("192.0.2.0/24").unwrap().to_string(), "192.0.2.0/24");
        assert_eq!(c(" 192.0.2.7 ").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(c("::/0").unwrap().to_string(), "::/0");
        assert_eq!(c("2001:db8::/29").unwrap().to_string(), "2001:db8::/29");
        let e = c("192.0.2.1/24").unwrap_err();
        assert!(e.contains("192.0.2.0/24"), "{e}");
        assert!(c("2001:db8::/33").is_ok());
        assert!(c("2001:db9::/31").unwrap_err().contains("2001:db8::/31"));
        for bad in [
            "192.0.2.0/33",
            "::/129",
            "192.0.2.0/",
            "host.example/24",
            "192.0.2.0/x",
            "",
        ] {
            assert!(c(bad).is_err(), "{bad}");
        }
        // Odd prefix lengths match bit by bit.
        let p = c("198.51.100.64/27").unwrap();
        assert!(p.contains("198.51.100.95".parse().unwrap()));
        assert!(!p.contains("198.51.100.96".parse().unwrap()));
        assert!(!p.contains("198.51.100.63".parse().unwrap()));
        let all = c("0.0.0.0/0").unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        assert!(!all.contains("::1".parse().unwrap()));
        let errs = DestinationPolicy::new(&[], &["nope".to_string()]).unwrap_err();
        assert_eq!(errs.0, "deny_destinations");
    }
}
