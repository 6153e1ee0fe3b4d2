//! Reply steering for the shared-port mode (DESIGN §4): every worker's
//! socket joins one `SO_REUSEPORT` group on the same port, and a classic
//! BPF program picks, for each incoming datagram, the socket whose index is
//! `(source address ^ source port) % workers` — the same function that
//! sharded the contact to its worker ([`shard_of`]), so a reply normally
//! lands on the worker that sent the ping. The index is the order in which
//! the sockets joined the group, so sockets must be bound in worker order.
//!
//! The offsets assume option-less IPv4 and extension-less IPv6 headers (the
//! normal case for replies); anything else may land elsewhere and is handed
//! over between workers, and counted.

use std::io;
use std::mem::size_of;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::Socket;

/// Linux `SKF_NET_OFF`: negative offsets are relative to the network header.
const SKF_NET_OFF: i32 = -0x100000;

// Classic BPF opcodes (linux/filter.h).
const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_H: u16 = 0x08;
const BPF_ABS: u16 = 0x20;
const BPF_MISC: u16 = 0x07;
const BPF_TAX: u16 = 0x00;
const BPF_ALU: u16 = 0x04;
const BPF_XOR: u16 = 0xa0;
const BPF_MOD: u16 = 0x90;
const BPF_X: u16 = 0x08;
const BPF_K: u16 = 0x00;
const BPF_RET: u16 = 0x06;
const BPF_A: u16 = 0x10;

fn insn(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

/// The worker that owns contacts at `addr` (and receives their replies in
/// shared-port mode). IPv4: the 32-bit address; IPv6: its last 32 bits.
pub fn shard_of(addr: &SocketAddr, workers: u32) -> u32 {
    debug_assert!(workers > 0);
    let ip32 = match addr {
        SocketAddr::V4(a) => u32::from(*a.ip()),
        SocketAddr::V6(a) => {
            let o = a.ip().octets();
            u32::from_be_bytes([o[12], o[13], o[14], o[15]])
        }
    };
    (ip32 ^ addr.port() as u32) % workers
}

/// The six-instruction program of DESIGN §4 for the given family.
fn program(workers: u32, v6: bool) -> [libc::sock_filter; 6] {
    // IPv4: source address at 12, UDP source port at 20 (IHL = 5).
    // IPv6: last 32 bits of the source address at 8 + 12, port at 40.
    let (addr_off, port_off) = if v6 { (20, 40) } else { (12, 20) };
    [
        insn(BPF_LD | BPF_W | BPF_ABS, (SKF_NET_OFF + addr_off) as u32),
        insn(BPF_MISC | BPF_TAX, 0),
        insn(BPF_LD | BPF_H | BPF_ABS, (SKF_NET_OFF + port_off) as u32),
        insn(BPF_ALU | BPF_XOR | BPF_X, 0),
        insn(BPF_ALU | BPF_MOD | BPF_K, workers),
        insn(BPF_RET | BPF_A, 0),
    ]
}

/// Attaches the steering program to the reuseport group `socket` belongs
/// to (once for the whole group, after all its sockets are bound).
pub fn attach(socket: &Socket, workers: u32, v6: bool) -> io::Result<()> {
    assert!(workers > 0);
    let mut filter = program(workers, v6);
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `prog` and the `filter` array it points to live on this stack
    // frame for the whole call; the kernel copies the program in.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::udp::{bind_udp, RecvBatch, SocketOptions};
    use std::net::{IpAddr, UdpSocket};
    use std::time::{Duration, Instant};

    /// Sends from many source ports to a group of `n` sockets and checks
    /// each datagram arrived at socket `shard_of(source)`.
    fn steers(n: u32, v6: bool) {
        let any: SocketAddr = if v6 { "[::1]:0" } else { "127.0.0.1:0" }.parse().unwrap();
        let opts = SocketOptions {
            reuse_port: true,
            ..SocketOptions::default()
        };
        let (first, _) = bind_udp(any, &opts).unwrap();
        let group_addr = first.local_addr().unwrap().as_socket().unwrap();
        let mut socks = vec![first];
        for _ in 1..n {
            socks.push(bind_udp(group_addr, &opts).unwrap().0);
        }
        attach(&socks[0], n, v6).unwrap();

        let mut expected = Vec::new();
        for i in 0..64u32 {
            let s = UdpSocket::bind(any).unwrap();
            s.send_to(&i.to_be_bytes(), group_addr).unwrap();
            expected.push((i, shard_of(&s.local_addr().unwrap(), n)));
        }
        let mut landed = vec![None; expected.len()];
        let mut batch = RecvBatch::new(64, 16);
        let deadline = Instant::now() + Duration::from_secs(5);
        while landed.iter().any(Option::is_none) && Instant::now() < deadline {
            for (k, s) in socks.iter().enumerate() {
                let got = batch.recv(s.as_raw_fd()).unwrap();
                for j in 0..got {
                    let d = batch.get(j);
                    let i = u32::from_be_bytes(d.data.try_into().unwrap());
                    landed[i as usize] = Some(k as u32);
                    assert!(matches!(d.from.unwrap().ip(), IpAddr::V4(_)) != v6);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for (i, want) in expected {
            assert_eq!(landed[i as usize], Some(want), "datagram {i}");
        }
    }

    #[test]
    fn ipv4_replies_land_on_their_shard() {
        steers(2, false);
        steers(3, false);
    }

    #[test]
    fn ipv6_replies_land_on_their_shard() {
        if UdpSocket::bind("[::1]:0").is_err() {
            eprintln!("SKIP: no IPv6 loopback");
            return;
        }
        steers(2, true);
        steers(4, true);
    }
}
