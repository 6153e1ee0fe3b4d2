//! Everything that touches the kernel's network stack.
//!
//! * `udp`: batched UDP system calls (`recvmmsg`/`sendmmsg`) and the socket
//!   options kaping needs (receive timestamps, packet info, error queues,
//!   large buffers) behind a small safe API; the load generator uses it too.
//! * [`Backend`]: the one small seam between a worker and its I/O. Two
//!   implementations: `uring` (io_uring, the default) and `mmsg` (the
//!   fallback where io_uring is refused). A third (AF_XDP) would implement
//!   the same trait without touching the worker.
//! * `steer`: the shared-port reply steering (SO_REUSEPORT + classic BPF).
//! * `share`: sharing a SIP proxy's port, so pings leave as the proxy.
//! * `divert`: the tc-ingress eBPF program that hands kaping's replies,
//!   sent to the proxy's port, to kaping's own socket (DESIGN §10).
//! * `waker`, `signal`: how a sleeping worker or the main loop is told
//!   something happened.
//! * `caps`: giving up CAP_BPF and CAP_NET_ADMIN in every thread once the
//!   divert program is attached.
//! * `limits`: raising the open-file limit for the load generator's
//!   socket-per-phone simulations.
//!
//! This is one of the two modules where `unsafe` is allowed (the other is
//! `shm`): each block names the invariant that makes it sound.
#![allow(unsafe_code)]

pub mod caps;
pub mod divert;
pub mod limits;
pub mod mmsg;
pub mod share;
pub mod signal;
pub mod steer;
pub mod udp;
pub mod uring;
pub mod waker;

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

pub use udp::{Datagram, IcmpError};

/// Sockets a worker may have: kaping's own (one per address family) and
/// one per source address shared with a proxy (DESIGN §10). A contact
/// names its socket by a `u8` index.
pub const MAX_SOCKETS: usize = 16;

/// One socket of a worker, as handed to its backend.
pub struct WorkerSocket {
    pub socket: socket2::Socket,
    /// Every datagram sent on this socket leaves from this address
    /// (`IP_PKTINFO` / `IPV6_PKTINFO`): a wildcard-bound socket sharing a
    /// proxy's port sends as the proxy. `None`: the address it is bound to.
    pub src: Option<std::net::IpAddr>,
}

/// Largest datagram a worker sends (a rendered request is checked against
/// it when the contact is added).
pub const TX_DATAGRAM_MAX: usize = 1400;

/// Receive buffer per datagram: room for any reply up to
/// `wire::reply::REPLY_LEN_MAX` plus one byte, so an oversized one is seen
/// as such (and also flagged truncated by the kernel).
pub const RX_DATAGRAM_MAX: usize = 4097;

/// What a backend delivers to its worker.
pub trait Handler {
    /// A datagram arrived on the worker's socket number `sock`.
    fn datagram(&mut self, sock: usize, d: &Datagram<'_>);
    /// The kernel refused the datagram committed with `tag`.
    fn send_failed(&mut self, tag: u32, err: &io::Error);
    /// An ICMP error arrived about a datagram sent on one of the worker's
    /// sockets (or claims to: the quote is whatever the sender put there).
    fn icmp(&mut self, e: &IcmpError<'_>);
    /// The datagrams of one receive batch have all been handed over: a
    /// handler that holds them back (to fetch what they touch ahead of
    /// use) finishes them here. Backends call it after every batch, before
    /// returning or sleeping.
    fn end_batch(&mut self) {}
}

/// A worker's I/O: its sockets (one per address family it serves), a
/// transmit pipeline and the receive path. Owned by one worker thread.
pub trait Backend: Send {
    fn name(&self) -> &'static str;
    /// Space for the next datagram to leave on socket `sock`
    /// (`TX_DATAGRAM_MAX` bytes), or `None` while the pipeline is full:
    /// `flush` or `poll` first.
    fn tx_buf(&mut self, sock: usize) -> Option<&mut [u8]>;
    /// Queues the `len` bytes written into the last `tx_buf(sock)` for
    /// `dest`; `tag` comes back in `Handler::send_failed` if the kernel
    /// refuses it.
    fn tx_commit(&mut self, sock: usize, len: usize, dest: &SocketAddr, tag: u32);
    /// Hands queued datagrams to the kernel without waiting for input.
    fn flush(&mut self, h: &mut dyn Handler) -> io::Result<()>;
    /// Flushes, delivers what has arrived, sleeps up to `timeout`, and
    /// delivers what arrived meanwhile. Single replies do not end the sleep
    /// (the worker handles them in batches at its next deadline); a wake-up,
    /// an ICMP error or a full batch of input may.
    fn poll(&mut self, timeout: Duration, h: &mut dyn Handler) -> io::Result<()>;
    /// Datagrams committed but not yet accepted by the kernel.
    fn tx_pending(&self) -> usize;
    /// Adds a socket (a new source shared with a proxy) and starts
    /// receiving on it; returns its index. At most [`MAX_SOCKETS`].
    fn add_socket(&mut self, s: WorkerSocket) -> io::Result<usize>;
}
