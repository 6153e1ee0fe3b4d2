//! Sharing a SIP proxy's UDP port, so that pings leave as from the proxy
//! (DESIGN §10).
//!
//! A phone behind a NAT registered through the proxy at `P:5060`; a NAT
//! with address-and-port-dependent filtering (RFC 4787 §5: Linux conntrack,
//! most home routers) admits only datagrams from `P:5060` through that
//! binding. kaping cannot bind `P:5060` itself without taking the proxy's
//! traffic, but it can share the port:
//!
//! * The proxy binds its exact address with `SO_REUSEADDR` (Kamailio does,
//!   for every `listen`). kaping binds the **wildcard** address on the same
//!   port, also with `SO_REUSEADDR`: Linux allows two such sockets (both
//!   set the option), needs no privilege and no same-user rule for it, and
//!   delivers every datagram addressed to `P:5060` to the exactly bound
//!   socket, the better match (the proxy keeps its traffic).
//! * Each datagram kaping sends names its source `P` in an `IP_PKTINFO` /
//!   `IPV6_PKTINFO` control message, so it leaves as `P:5060`.
//!
//! What cannot be shared, and is refused with the reason and what to do:
//! a proxy bound to the wildcard address on that port (two wildcard
//! sockets: either could get the proxy's traffic), a proxy socket without
//! `SO_REUSEADDR` (the kernel refuses kaping's bind), and an address that
//! is not this host's. The holders of a port are read from
//! `/proc/net/udp` and `/proc/net/udp6` of kaping's network namespace.
//!
//! kaping's shared socket receives what reaches the port and matches no
//! exact socket (all of it while the proxy is down); the worker accepts
//! only datagrams bearing its token, so it answers nothing and acts on
//! nothing else (they are counted and dropped).
//!
//! Control path only: runs at start (and when a new source appears).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use socket2::Socket;

use super::udp::{bind_udp, SocketOptions, SocketReport};

/// Who holds a UDP port in this network namespace (unconnected sockets).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holders {
    /// A socket is bound to exactly the address asked about.
    pub exact: bool,
    /// A socket is bound to the wildcard address of the family (or, for an
    /// IPv4 address, to `[::]`, which may be dual-stack).
    pub wildcard: bool,
}

/// Reads who holds `addr`'s port from `/proc/net/udp{,6}`, leaving out
/// the sockets whose inodes are in `own` (kaping's own shared sockets: a
/// proxy listening on two addresses with one port gets one source each).
pub fn holders(addr: SocketAddr, own: &[u64]) -> io::Result<Holders> {
    let mut h = Holders::default();
    for (path, v6) in [("/proc/net/udp", false), ("/proc/net/udp6", true)] {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            // No IPv6 in this kernel: nothing holds an IPv6 port.
            Err(e) if v6 && e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for (local, remote_zero, inode) in text.lines().skip(1).filter_map(parse_proc_line) {
            if local.port() != addr.port() || !remote_zero || own.contains(&inode) {
                continue;
            }
            if local.ip() == addr.ip() {
                h.exact = true;
            } else if local.ip().is_unspecified() && (local.is_ipv6() || !addr.is_ipv6()) {
                // [::] may take IPv4 too (no IPV6_V6ONLY); 0.0.0.0 never
                // takes IPv6.
                h.wildcard = true;
            }
        }
    }
    Ok(h)
}

/// One line of `/proc/net/udp{,6}`: the local address, whether the remote
/// address is zero (an unconnected socket), and the socket's inode. The
/// kernel prints each 32-bit word of an address with `%08X` as the machine
/// reads the network order bytes, and the port in host order.
fn parse_proc_line(line: &str) -> Option<(SocketAddr, bool, u64)> {
    let fields: Vec<&str> = line.split_whitespace().take(10).collect();
    let local = parse_proc_addr(fields.get(1)?)?;
    let remote = parse_proc_addr(fields.get(2)?)?;
    // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
    let inode = fields.get(9)?.parse().ok()?;
    Some((
        local,
        remote.ip().is_unspecified() && remote.port() == 0,
        inode,
    ))
}

/// The inode of a socket, as `/proc/net/udp` lists it.
pub fn socket_inode(s: &Socket) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd())).ok()?;
    let text = link.to_str()?;
    text.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn parse_proc_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Checks that kaping can send as `addr`: the address is this host's and
/// its port is not held by a wildcard socket (other than kaping's own, the
/// inodes in `own`). Returns a warning when nothing holds the address yet
/// (kaping would then receive what is sent there, and answer none of it,
/// until the proxy starts). Call it once per source, before opening its
/// sockets.
pub fn check_shareable(addr: SocketAddr, own: &[u64]) -> Result<Option<String>, String> {
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(format!(
            "{addr}: give the proxy's own address and port to send as"
        ));
    }
    if let Err(e) = UdpSocket::bind(SocketAddr::new(addr.ip(), 0)) {
        return Err(if e.kind() == io::ErrorKind::AddrNotAvailable {
            format!(
                "{} is not an address of this host (kaping can only send as a proxy on the same host)",
                addr.ip()
            )
        } else {
            format!("cannot use {}: {e}", addr.ip())
        });
    }
    let h = holders(addr, own).map_err(|e| format!("cannot read /proc/net/udp: {e}"))?;
    if h.wildcard {
        let any = if addr.is_ipv6() { "[::]" } else { "0.0.0.0" };
        return Err(format!(
            "a process binds {any}:{port} (the wildcard address), so kaping cannot share port {port} \
             without taking some of its traffic: make the proxy listen on its own address \
             (Kamailio: listen=udp:{addr})",
            port = addr.port()
        ));
    }
    Ok((!h.exact).then(|| {
        format!(
            "nothing is bound to {addr} yet: until the proxy starts, kaping receives what is sent \
             there (and answers none of it)"
        )
    }))
}

/// Binds one of kaping's sockets sharing `addr`'s port: the wildcard
/// address of `addr`'s family on that port, with `SO_REUSEADDR`. Datagrams
/// sent on it must name `addr.ip()` as their source (`WorkerSocket::src`).
/// A proxy socket without `SO_REUSEADDR` makes the kernel refuse, and the
/// error says so.
pub fn bind_shared(
    addr: SocketAddr,
    opts: &SocketOptions,
) -> Result<(Socket, SocketReport), String> {
    let wildcard = match addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port())),
    };
    let opts = SocketOptions {
        reuse_addr: true,
        reuse_port: false,
        ..opts.clone()
    };
    bind_udp(wildcard, &opts).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => format!(
            "cannot share {addr}: the socket holding it does not set SO_REUSEADDR \
             (Kamailio's do; another program must set it, or pings cannot leave as {addr})"
        ),
        _ => format!("cannot bind {wildcard} to send as {addr}: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_lines_are_read_in_the_kernels_byte_order() {
        // 127.0.0.1:5060 on a little-endian machine, and [::1]:5062.
        let v4 = if cfg!(target_endian = "little") {
            "  12: 0100007F:13C4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0"
        } else {
            "  12: 7F000001:13C4 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0"
        };
        assert_eq!(
            parse_proc_line(v4),
            Some(("127.0.0.1:5060".parse().unwrap(), true, 1))
        );
        let one = if cfg!(target_endian = "little") {
            "01000000"
        } else {
            "00000001"
        };
        let v6 = format!(
            "  3: 000000000000000000000000{one}:13C6 00000000000000000000000000000000:0000 07 0 0 0 0 0 77 2 0 0"
        );
        assert_eq!(
            parse_proc_line(&v6),
            Some(("[::1]:5062".parse().unwrap(), true, 77))
        );
        assert_eq!(parse_proc_line("  sl  local_address rem_address"), None);
    }

    /// A proxy's socket as Kamailio opens it: exact address, SO_REUSEADDR.
    fn proxy_socket(addr: SocketAddr) -> UdpSocket {
        let opts = SocketOptions {
            reuse_addr: true,
            nonblocking: false,
            ..SocketOptions::default()
        };
        bind_udp(addr, &opts).unwrap().0.into()
    }

    #[test]
    fn a_port_held_exactly_with_reuseaddr_is_shared_and_the_proxy_keeps_its_traffic() {
        let proxy = proxy_socket("127.0.0.61:0".parse().unwrap());
        let addr = proxy.local_addr().unwrap();
        let h = holders(addr, &[]).unwrap();
        assert!(h.exact && !h.wildcard, "{h:?}");
        assert_eq!(check_shareable(addr, &[]), Ok(None));
        let (kaping, _) = bind_shared(addr, &SocketOptions::default()).unwrap();
        let kaping: UdpSocket = kaping.into();
        // Inbound to the proxy's address goes to the proxy's exact socket.
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(b"register", addr).unwrap();
        let mut buf = [0u8; 16];
        proxy
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let (n, _) = proxy.recv_from(&mut buf).unwrap();
        assert_eq!(n, 8);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            kaping.recv_from(&mut buf).is_err(),
            "kaping's shared socket must not get the proxy's traffic"
        );
        // And kaping sends as the proxy: the peer sees the proxy's address.
        let mut send = super::super::udp::SendBatch::new(1, 16);
        let to = peer.local_addr().unwrap();
        assert!(send.push(b"ping", &to, Some(addr.ip())));
        use std::os::fd::AsRawFd;
        let out = send.send(kaping.as_raw_fd(), |_, e| panic!("send: {e}"));
        assert_eq!(out.sent, 1);
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"ping"[..], addr));
    }

    #[test]
    fn a_proxy_on_two_addresses_with_one_port_gives_two_sources() {
        let a = proxy_socket("127.0.0.81:0".parse().unwrap());
        let port = a.local_addr().unwrap().port();
        let b = proxy_socket(format!("127.0.0.82:{port}").parse().unwrap());
        let (first, second) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        assert_eq!(check_shareable(first, &[]), Ok(None));
        let (mine, _) = bind_shared(first, &SocketOptions::default()).unwrap();
        // kaping's own wildcard socket on the port is not a foreign holder.
        let own = [socket_inode(&mine).expect("an inode")];
        assert_eq!(check_shareable(second, &own), Ok(None));
        let e = check_shareable(second, &[]).unwrap_err();
        assert!(e.contains("wildcard"), "{e}");
        bind_shared(second, &SocketOptions::default()).unwrap();
    }

    #[test]
    fn a_wildcard_holder_is_refused_with_what_to_do() {
        let wildcard = proxy_socket("0.0.0.0:0".parse().unwrap());
        let port = wildcard.local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let e = check_shareable(addr, &[]).unwrap_err();
        assert!(
            e.contains("wildcard") && e.contains("listen=udp:127.0.0.1"),
            "{e}"
        );
    }

    #[test]
    fn a_holder_without_reuseaddr_is_refused_by_the_kernel_and_said() {
        let plain = UdpSocket::bind("127.0.0.62:0").unwrap();
        let addr = plain.local_addr().unwrap();
        assert_eq!(check_shareable(addr, &[]), Ok(None));
        let e = bind_shared(addr, &SocketOptions::default()).unwrap_err();
        assert!(e.contains("SO_REUSEADDR"), "{e}");
    }

    #[test]
    fn foreign_and_unheld_addresses() {
        // A documentation address is no address of this host.
        let e = check_shareable("192.0.2.1:5060".parse().unwrap(), &[]).unwrap_err();
        assert!(e.contains("not an address of this host"), "{e}");
        // A free port: allowed, with a warning.
        let free = UdpSocket::bind("127.0.0.63:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let w = check_shareable(free, &[]).unwrap().expect("a warning");
        assert!(w.contains("nothing is bound"), "{w}");
    }
}

/// Both backends, sending on a socket added at run time that shares a
/// proxy's port: every datagram leaves as the proxy, and a datagram
/// arriving on the shared port (the proxy down) reaches the handler.
#[cfg(test)]
mod backend_tests {
    use std::net::{SocketAddr, UdpSocket};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::io::mmsg::MmsgBackend;
    use crate::io::uring::{self, UringBackend};
    use crate::io::waker::Waker;
    use crate::io::{Backend, Datagram, Handler, IcmpError, WorkerSocket};

    #[derive(Default)]
    struct Collect {
        got: Vec<(usize, Vec<u8>)>,
    }

    impl Handler for Collect {
        fn datagram(&mut self, sock: usize, d: &Datagram<'_>) {
            self.got.push((sock, d.data.to_vec()));
        }
        fn send_failed(&mut self, tag: u32, err: &io::Error) {
            panic!("send {tag} failed: {err}");
        }
        fn icmp(&mut self, _e: &IcmpError<'_>) {}
    }

    fn sends_as_the_proxy(backend: &mut dyn Backend, v6: bool) {
        let (proxy_ip, any) = if v6 {
            ("[::1]", "[::1]")
        } else {
            ("127.0.0.71", "127.0.0.1")
        };
        let proxy = UdpSocket::bind(format!("{proxy_ip}:0")).unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        // Learn a free port, then bind it as Kamailio does: exact address,
        // SO_REUSEADDR.
        drop(proxy);
        let proxy: UdpSocket = bind_udp(
            proxy_addr,
            &SocketOptions {
                reuse_addr: true,
                nonblocking: false,
                ..SocketOptions::default()
            },
        )
        .unwrap()
        .0
        .into();
        let (socket, _) = bind_shared(proxy_addr, &SocketOptions::default()).unwrap();
        let index = backend
            .add_socket(WorkerSocket {
                socket,
                src: Some(proxy_addr.ip()),
            })
            .unwrap();
        let phone = UdpSocket::bind(format!("{any}:0")).unwrap();
        phone
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let to = phone.local_addr().unwrap();
        let mut h = Collect::default();
        for i in 0..3u8 {
            let buf = backend.tx_buf(index).expect("room");
            buf[..5].copy_from_slice(&[b'p', b'i', b'n', b'g', b'0' + i]);
            backend.tx_commit(index, 5, &to, u32::from(i));
        }
        backend.flush(&mut h).unwrap();
        let mut buf = [0u8; 64];
        for i in 0..3u8 {
            let (n, from) = phone.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[b'p', b'i', b'n', b'g', b'0' + i]);
            assert_eq!(from, proxy_addr, "the ping leaves as the proxy");
        }
        // The phone answers the proxy: the proxy's exact socket gets it.
        phone.send_to(b"reply", proxy_addr).unwrap();
        proxy
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let (n, _) = proxy.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"reply");
        // The proxy goes away: what reaches its port now reaches kaping's
        // shared socket, and the handler (which checks tokens) sees it.
        drop(proxy);
        phone.send_to(b"while-down", proxy_addr).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.got.is_empty() && Instant::now() < deadline {
            backend.poll(Duration::from_millis(5), &mut h).unwrap();
        }
        assert_eq!(h.got, vec![(index, b"while-down".to_vec())]);
    }

    fn own_socket(v6: bool) -> WorkerSocket {
        let addr: SocketAddr = if v6 { "[::1]:0" } else { "127.0.0.1:0" }.parse().unwrap();
        WorkerSocket {
            socket: bind_udp(addr, &SocketOptions::default()).unwrap().0,
            src: None,
        }
    }

    fn ipv6() -> bool {
        UdpSocket::bind("[::1]:0").is_ok()
    }

    #[test]
    fn mmsg_sends_as_the_proxy() {
        for v6 in [false, true] {
            if v6 && !ipv6() {
                eprintln!("SKIP: no IPv6 loopback");
                continue;
            }
            let mut b = MmsgBackend::new(vec![own_socket(v6)], Waker::new().unwrap()).unwrap();
            sends_as_the_proxy(&mut b, v6);
        }
    }

    #[test]
    fn uring_sends_as_the_proxy() {
        if let Err(why) = uring::probe() {
            eprintln!("SKIP: {why}");
            return;
        }
        for v6 in [false, true] {
            if v6 && !ipv6() {
                eprintln!("SKIP: no IPv6 loopback");
                continue;
            }
            let mut b = UringBackend::new(vec![own_socket(v6)], Waker::new().unwrap()).unwrap();
            sends_as_the_proxy(&mut b, v6);
        }
    }
}
