//! Forged ICMP errors, for the tests and the flood bench: an ICMPv4
//! destination unreachable (RFC 792) quoting a UDP datagram that was never
//! sent, as anyone able to send raw packets could make one, and the raw
//! socket to send it from.
//!
//! What the kernel does with one: it finds the UDP socket the quoted
//! datagram names (local = the quote's source, remote = its destination),
//! queues the error on that socket's error queue when the socket asked for
//! them (`IP_RECVERR`, as kaping's do) and sets the socket's pending error.
//! kaping then decides from the quoted payload which ping, if any, it
//! concerns (`engine::worker`, "ICMP errors").
//!
//! [`port_unreachable`] builds the whole ICMP message (type 3, code 3, both
//! checksums right) into a new `Vec`: setup code, called once per message
//! of a pool, never per packet sent. [`raw_socket`] needs `CAP_NET_RAW`
//! (root); its error says so. No `unsafe`: socket2 makes the call.
//! Callers: `tests/icmp.rs`, `tests/flood.rs`, `kaping-loadgen flood`.

use std::io;
use std::net::SocketAddrV4;

use socket2::{Domain, Protocol, Socket, Type};

/// ICMP type Destination Unreachable and its code Port Unreachable.
const DEST_UNREACH: u8 = 3;
const PORT_UNREACH: u8 = 3;
/// IPv4 header without options, UDP header.
const IP_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
/// The quoted datagram's TTL and protocol (UDP).
const QUOTED_TTL: u8 = 64;
const PROTO_UDP: u8 = 17;

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP port unreachable (type 3, code 3) quoting a UDP datagram from
/// `from` to `to` whose payload is `payload`: the ICMP header, the quoted
/// IPv4 header (checksummed) and UDP header, then the payload as far as it
/// is given (a router may quote only the UDP header: pass an empty one).
/// Send it to the address of `from` from a [`raw_socket`].
pub fn port_unreachable(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut ip = [0u8; IP_HEADER_LEN];
    ip[0] = 0x45; // version 4, 5 words
    let total = (IP_HEADER_LEN + UDP_HEADER_LEN + payload.len()) as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = QUOTED_TTL;
    ip[9] = PROTO_UDP;
    ip[12..16].copy_from_slice(&from.ip().octets());
    ip[16..20].copy_from_slice(&to.ip().octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut udp = [0u8; UDP_HEADER_LEN];
    udp[0..2].copy_from_slice(&from.port().to_be_bytes());
    udp[2..4].copy_from_slice(&to.port().to_be_bytes());
    udp[4..6].copy_from_slice(&((UDP_HEADER_LEN + payload.len()) as u16).to_be_bytes());
    let mut msg = Vec::with_capacity(8 + IP_HEADER_LEN + UDP_HEADER_LEN + payload.len());
    msg.extend_from_slice(&[DEST_UNREACH, PORT_UNREACH, 0, 0, 0, 0, 0, 0]);
    msg.extend_from_slice(&ip);
    msg.extend_from_slice(&udp);
    msg.extend_from_slice(payload);
    let c = checksum(&msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    msg
}

/// A raw ICMPv4 socket (the kernel writes the IP header), or the reason
/// there is none: opening one needs `CAP_NET_RAW`.
pub fn raw_socket() -> io::Result<Socket> {
    Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("a raw ICMP socket needs CAP_NET_RAW (root): {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_checksums_to_zero_and_quotes_what_it_was_given() {
        let from = "127.0.0.1:40000".parse().unwrap();
        let to = "127.1.2.3:5060".parse().unwrap();
        let msg = port_unreachable(from, to, b"OPTIONS sip:x");
        assert_eq!(&msg[..2], &[3, 3]);
        // A checksum over data that includes its own checksum is 0.
        assert_eq!(checksum(&msg), 0);
        assert_eq!(checksum(&msg[8..28]), 0, "quoted IPv4 header");
        assert_eq!(&msg[20..24], &[127, 0, 0, 1]);
        assert_eq!(&msg[24..28], &[127, 1, 2, 3]);
        assert_eq!(u16::from_be_bytes([msg[28], msg[29]]), 40000);
        assert_eq!(u16::from_be_bytes([msg[30], msg[31]]), 5060);
        assert_eq!(&msg[36..], b"OPTIONS sip:x");
        // An odd length is padded with a zero byte for the sum.
        assert_eq!(checksum(&[0xff]), !0xff00);
    }
}
