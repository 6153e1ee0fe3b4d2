//! The `sendmmsg`/`recvmmsg` backend: the fallback where io_uring is not
//! allowed (old kernels, `kernel.io_uring_disabled`, container seccomp
//! profiles), and selectable with `backend = "mmsg"`.
//!
//! One [`SendBatch`] per socket collects the datagrams of a worker round;
//! `flush` sends them in as few system calls as the kernel allows. Input is
//! drained with `recvmmsg` in bounded rounds; when nothing is ready the
//! worker sleeps in `ppoll` on its sockets and its waker, with a timeout
//! equal to its next timer deadline.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use socket2::Socket;

use super::udp::{drain_socket, sleep_until_woken, RecvBatch, SendBatch};
use super::waker::Waker;
use super::{Backend, Handler, WorkerSocket, MAX_SOCKETS, RX_DATAGRAM_MAX, TX_DATAGRAM_MAX};

/// Datagrams per `sendmmsg`/`recvmmsg` call.
pub const BATCH: usize = 64;
/// Datagrams queued per socket before the worker must flush.
pub const TX_QUEUE: usize = 256;

pub struct MmsgBackend {
    sockets: Vec<Socket>,
    tx: Vec<SendBatch>,
    /// `tx_tags[sock][i]`: the tag of datagram `i` of `tx[sock]`.
    tx_tags: Vec<Vec<u32>>,
    rx: RecvBatch,
    waker: Waker,
}

impl MmsgBackend {
    /// Takes ownership of the worker's sockets (non-blocking, bound).
    pub fn new(sockets: Vec<WorkerSocket>, waker: Waker) -> io::Result<MmsgBackend> {
        let mut b = MmsgBackend {
            tx: Vec::with_capacity(MAX_SOCKETS),
            tx_tags: Vec::with_capacity(MAX_SOCKETS),
            rx: RecvBatch::new(BATCH, RX_DATAGRAM_MAX),
            sockets: Vec::with_capacity(MAX_SOCKETS),
            waker,
        };
        for s in sockets {
            b.add_socket(s)?;
        }
        Ok(b)
    }

    /// Drains up to `RX_ROUNDS` batches from each socket; returns how many
    /// datagrams were delivered.
    fn receive(&mut self, h: &mut dyn Handler) -> usize {
        let mut delivered = 0;
        for sock in 0..self.sockets.len() {
            let fd = self.sockets[sock].as_raw_fd();
            delivered += drain_socket(&mut self.rx, sock, fd, h);
        }
        delivered
    }

    fn socket_fd(&self, sock: usize) -> RawFd {
        self.sockets[sock].as_raw_fd()
    }
}

impl Backend for MmsgBackend {
    fn name(&self) -> &'static str {
        "mmsg"
    }

    fn tx_buf(&mut self, sock: usize) -> Option<&mut [u8]> {
        self.tx[sock].next_buf()
    }

    fn tx_commit(&mut self, sock: usize, len: usize, dest: &SocketAddr, tag: u32) {
        // A source shared with a proxy is written into the batch once.
        self.tx[sock].commit(len, dest, None);
        self.tx_tags[sock].push(tag);
    }

    fn flush(&mut self, h: &mut dyn Handler) -> io::Result<()> {
        for sock in 0..self.sockets.len() {
            if self.tx[sock].pending() == 0 {
                continue;
            }
            let fd = self.socket_fd(sock);
            let tags = &self.tx_tags[sock];
            self.tx[sock].send(fd, |i, err| h.send_failed(tags[i], &err));
            if self.tx[sock].pending() == 0 {
                self.tx_tags[sock].clear();
            }
        }
        Ok(())
    }

    fn poll(&mut self, timeout: Duration, h: &mut dyn Handler) -> io::Result<()> {
        self.flush(h)?;
        if self.receive(h) > 0 || timeout.is_zero() {
            return Ok(());
        }
        // Datagrams still queued (socket buffer full): wake soon to retry.
        let timeout = if self.tx_pending() > 0 {
            timeout.min(Duration::from_millis(1))
        } else {
            timeout
        };
        sleep_until_woken(&self.sockets, &self.waker, timeout, h)
    }

    fn tx_pending(&self) -> usize {
        self.tx.iter().map(SendBatch::pending).sum()
    }

    fn add_socket(&mut self, s: WorkerSocket) -> io::Result<usize> {
        if self.sockets.len() == MAX_SOCKETS {
            return Err(io::Error::other(format!(
                "a worker has at most {MAX_SOCKETS} sockets"
            )));
        }
        self.tx.push(match s.src {
            Some(ip) => SendBatch::with_source(TX_QUEUE, TX_DATAGRAM_MAX, ip),
            None => SendBatch::new(TX_QUEUE, TX_DATAGRAM_MAX),
        });
        self.tx_tags.push(Vec::with_capacity(TX_QUEUE));
        self.sockets.push(s.socket);
        Ok(self.sockets.len() - 1)
    }
}
