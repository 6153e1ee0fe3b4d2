//! Simulated contacts: the mapping from a contact index to its address, and
//! the writer of contacts files (and of the fates the responder will give
//! them).
//!
//! Mapping (shared with `ceiling`, and what a benchmark of kaping relies on):
//! contact `i` (0-based) is `sip:u<i>@<addr>:<port>` with
//! `port = P + i % K` and, for IPv4, address index `j = i / K` mapped to
//! `127.a.b.c` with `c = 1 + j % 254`, `b = (j / 254) % 256`,
//! `a = (j / 65024) % 256`: host bytes .0 and .255 are skipped (they look like
//! network/broadcast addresses to some tools), 127.0.0.1 is the first address,
//! and 16,646,144 addresses × K ports are distinct before the mapping wraps
//! (user parts stay distinct regardless). For IPv6 every contact is on
//! `[::1]`, spread over the K ports only. The whole of 127.0.0.0/8 is local on
//! Linux, so one socket bound to 0.0.0.0:P receives for every 127.a.b.c:P.
//!
//! Writing never formats per line: digits are produced into a stack array and
//! lines are appended to a 1 MiB buffer flushed with one `write_all`.
//! [`contact_uri`] and [`contact_addr`] are the one-contact forms for
//! in-process users (`kaping demo` builds its contact list with them); they
//! are setup code (`contact_uri` allocates its `String`).
//! Callers: `kaping-loadgen` (`contacts` subcommand, `ceiling` destinations)
//! and `kaping demo`.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::fate::{Fate, FatePlan};

/// Distinct IPv4 addresses the mapping uses before wrapping.
pub const V4_ADDRS: u64 = 254 * 256 * 256;

/// Flush threshold of the output buffers.
const BUF_BYTES: usize = 1 << 20;

/// Where contacts live: base port, number of ports, family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub base_port: u16,
    pub ports: u16,
    pub ipv6: bool,
}

impl Layout {
    /// Contacts on ports `base_port..base_port + ports`, on [::1] with
    /// `ipv6`, over 127.0.0.0/8 otherwise. Refuses port 0 and a range that
    /// leaves the port space.
    pub fn new(base_port: u16, ports: u16, ipv6: bool) -> Result<Layout, String> {
        if base_port == 0 {
            return Err("--port must be a real port (1..=65535)".to_string());
        }
        if ports == 0 || u32::from(base_port) + u32::from(ports) - 1 > 65535 {
            return Err(format!(
                "--ports {ports} from --port {base_port} leaves the port range"
            ));
        }
        Ok(Layout {
            base_port,
            ports,
            ipv6,
        })
    }

    /// The address of contact `i`.
    #[inline]
    pub fn addr(&self, i: u64) -> SocketAddr {
        let port = self.base_port + (i % u64::from(self.ports)) as u16;
        let ip = if self.ipv6 {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(ipv4_for(i / u64::from(self.ports)))
        };
        SocketAddr::new(ip, port)
    }
}

/// The `j`-th address of 127.0.0.0/8 in the mapping above.
#[inline]
pub fn ipv4_for(j: u64) -> Ipv4Addr {
    let j = j % V4_ADDRS;
    let c = 1 + (j % 254) as u8;
    let b = ((j / 254) % 256) as u8;
    let a = (j / (254 * 256)) as u8;
    Ipv4Addr::new(127, a, b, c)
}

/// The decimal digits of `n`, written at the end of `buf` (no allocation,
/// no formatting machinery; shared with the reply writer of `request`).
#[inline]
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[at..]
}

/// Appends the decimal digits of `n`.
#[inline]
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(decimal(n, &mut [0u8; 20]));
}

/// Appends the URI of contact `i`.
#[inline]
pub fn push_uri(out: &mut Vec<u8>, layout: &Layout, i: u64) {
    out.extend_from_slice(b"sip:u");
    push_u64(out, i);
    out.push(b'@');
    let addr = layout.addr(i);
    match addr.ip() {
        IpAddr::V4(ip) => {
            for (k, o) in ip.octets().iter().enumerate() {
                if k > 0 {
                    out.push(b'.');
                }
                push_u64(out, u64::from(*o));
            }
        }
        // The mapping only ever uses ::1.
        IpAddr::V6(_) => out.extend_from_slice(b"[::1]"),
    }
    out.push(b':');
    push_u64(out, u64::from(addr.port()));
}

/// The URI of contact `i` among contacts on `ports` ports from `port`
/// (`sip:u<i>@127.a.b.c:P`, or `sip:u<i>@[::1]:P` with `ipv6`): exactly the
/// line `kaping-loadgen contacts` writes for it.
///
/// # Panics
/// When `port` is 0, `ports` is 0 or the ports leave the port space (the
/// same cases [`Layout::new`] refuses): the caller's configuration is wrong.
pub fn contact_uri(i: u64, port: u16, ports: u16, ipv6: bool) -> String {
    let layout = Layout::new(port, ports, ipv6).unwrap_or_else(|e| panic!("contact_uri: {e}"));
    let mut out = Vec::with_capacity(40);
    push_uri(&mut out, &layout, i);
    // push_uri writes ASCII only: digits, dots, brackets, `sip:u`, `@`, `:`.
    String::from_utf8(out).expect("contact URIs are ASCII")
}

/// The address contact `i` is pinged at (the host and port of
/// [`contact_uri`]); panics in the same cases.
pub fn contact_addr(i: u64, port: u16, ports: u16, ipv6: bool) -> SocketAddr {
    Layout::new(port, ports, ipv6)
        .unwrap_or_else(|e| panic!("contact_addr: {e}"))
        .addr(i)
}

/// Appends the fate word written to the fates file.
fn push_fate(out: &mut Vec<u8>, fate: Fate) {
    match fate {
        Fate::Ok => out.extend_from_slice(b"ok"),
        Fate::Dead => out.extend_from_slice(b"dead"),
        Fate::Error(code) => {
            out.extend_from_slice(b"error:");
            push_u64(out, u64::from(code));
        }
        Fate::Flap { phase_ms } => {
            out.extend_from_slice(b"flap:");
            push_u64(out, phase_ms);
        }
    }
}

/// Writes `count` contact URIs, one per line, to `out`; with `fates`, also
/// `uri<TAB>fate` lines (`ok`, `dead`, `error:<code>`, `flap:<phase_ms>`).
pub fn write_contacts(
    layout: &Layout,
    count: u64,
    out: &mut dyn Write,
    mut fates: Option<(&FatePlan, &mut dyn Write)>,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(BUF_BYTES + 256);
    let mut fate_buf = Vec::with_capacity(if fates.is_some() { BUF_BYTES + 256 } else { 0 });
    for i in 0..count {
        let start = buf.len();
        push_uri(&mut buf, layout, i);
        if let Some((plan, _)) = &fates {
            let uri = &buf[start..];
            fate_buf.extend_from_slice(uri);
            fate_buf.push(b'\t');
            push_fate(&mut fate_buf, plan.fate(plan.contact_hash(uri)));
            fate_buf.push(b'\n');
        }
        buf.push(b'\n');
        if buf.len() >= BUF_BYTES {
            out.write_all(&buf)?;
            buf.clear();
        }
        if fate_buf.len() >= BUF_BYTES {
            if let Some((_, w)) = fates.as_mut() {
                w.write_all(&fate_buf)?;
            }
            fate_buf.clear();
        }
    }
    out.write_all(&buf)?;
    out.flush()?;
    if let Some((_, w)) = fates.as_mut() {
        w.write_all(&fate_buf)?;
        w.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_skips_network_and_broadcast_bytes() {
        assert_eq!(ipv4_for(0), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(ipv4_for(253), Ipv4Addr::new(127, 0, 0, 254));
        assert_eq!(ipv4_for(254), Ipv4Addr::new(127, 0, 1, 1));
        assert_eq!(ipv4_for(254 * 256), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(ipv4_for(V4_ADDRS - 1), Ipv4Addr::new(127, 255, 255, 254));
        assert_eq!(ipv4_for(V4_ADDRS), Ipv4Addr::new(127, 0, 0, 1));
    }

    #[test]
    fn ports_vary_fastest() {
        let l = Layout::new(5060, 3, false).unwrap();
        assert_eq!(l.addr(0), "127.0.0.1:5060".parse().unwrap());
        assert_eq!(l.addr(2), "127.0.0.1:5062".parse().unwrap());
        assert_eq!(l.addr(3), "127.0.0.2:5060".parse().unwrap());
        let v6 = Layout::new(5060, 2, true).unwrap();
        assert_eq!(v6.addr(5), "[::1]:5061".parse().unwrap());
        assert!(Layout::new(65535, 2, false).is_err());
        assert!(Layout::new(0, 1, false).is_err());
    }

    #[test]
    fn one_contact_forms_match_the_file() {
        let mut file = Vec::new();
        let layout = Layout::new(5070, 3, false).unwrap();
        write_contacts(&layout, 1000, &mut file, None).unwrap();
        let text = String::from_utf8(file).unwrap();
        for (i, line) in text.lines().enumerate() {
            assert_eq!(contact_uri(i as u64, 5070, 3, false), line);
            let addr = contact_addr(i as u64, 5070, 3, false);
            assert!(line.ends_with(&format!("@{addr}")), "{line} vs {addr}");
        }
        assert_eq!(contact_uri(3, 6000, 2, true), "sip:u3@[::1]:6001");
    }

    #[test]
    #[should_panic(expected = "contact_uri")]
    fn contact_uri_refuses_a_bad_layout() {
        contact_uri(0, 65535, 2, false);
    }

    #[test]
    fn uris_match_the_formatted_text() {
        for (layout, i) in [
            (Layout::new(5060, 1, false).unwrap(), 0u64),
            (Layout::new(5060, 7, false).unwrap(), 123_456_789),
            (Layout::new(40000, 3, true).unwrap(), 10),
        ] {
            let mut buf = Vec::new();
            push_uri(&mut buf, &layout, i);
            let addr = layout.addr(i);
            let host = match addr.ip() {
                IpAddr::V4(ip) => ip.to_string(),
                IpAddr::V6(ip) => format!("[{ip}]"),
            };
            assert_eq!(
                String::from_utf8(buf).unwrap(),
                format!("sip:u{i}@{host}:{}", addr.port())
            );
        }
    }
}
