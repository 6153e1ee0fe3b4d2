//! A responder that keeps what it answers: genuine replies to kaping's
//! pings, captured where they are made, for replaying later (the replay
//! flood of `kaping-loadgen flood`, `tests/flood.rs`).
//!
//! It plays contacts `first .. first + count` of the contact mapping
//! (`contacts::ipv4_for`: `127.a.b.c`), all on the one port it binds on
//! 0.0.0.0, and answers every request to one of them with a 200 OK written
//! by the simulated platform's writer (`request::write_reply`, RFC 3261
//! §8.2.6.2), from the address that was pinged (`IP_PKTINFO`), as the main
//! [`Responder`](super::Responder) does. Per contact it counts the replies
//! sent, which are the only genuine answers the contact ever gives, and
//! keeps a copy of the first [`CaptureConfig::keep`] of them, byte for
//! byte as sent. A contact can be silenced ([`Capture::silence`]): from
//! then on its requests are counted and left unanswered, so kaping sees it
//! go Down while its earlier replies are still in hand.
//!
//! Ownership: one thread owns the socket and its batches; the counts and
//! copies live behind one mutex, taken once per received batch by that
//! thread and by callers' snapshots. This is a tool for a few thousand
//! contacts at one ping per interval, not a fast path: it allocates a
//! copy per kept reply. It never panics on any input datagram, and stops
//! (and is joined) on [`Capture::stop`] or drop. [`reply_token`] and
//! [`with_token`] find and replace the token of a kept reply (forged
//! replies of the right shape).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::contacts::{contact_uri, ipv4_for, V4_ADDRS};
use super::fate::to_tag;
use super::request::{self, ReplyParams};
use super::responder::{BATCH, DATAGRAM_MAX};
use crate::io::udp::{bind_udp, wait_readable, RecvBatch, SendBatch, SocketOptions};
use crate::io::waker::Waker;
use crate::shm::reader::ShmReader;
use crate::wire::token::TOKEN_LEN;

/// Socket buffers asked for (the kernel may give less: it only means a
/// burst of pings waits, never a wrong count).
const BUFFER_BYTES: usize = 4 << 20;
/// Attempts at a batch the socket buffer would not take at once.
const SEND_ROUNDS: usize = 100;
/// Longest sleep without looking at the stop flag (a backstop: `stop`
/// wakes the thread through its eventfd).
const IDLE_MAX: Duration = Duration::from_millis(100);

/// Which contacts, and how many replies of each to keep.
#[derive(Clone, Copy, Debug)]
pub struct CaptureConfig {
    /// Index of the first contact (its address is `ipv4_for(first)`).
    pub first: u64,
    pub count: u64,
    /// Replies kept per contact: its first ones.
    pub keep: usize,
}

/// One contact as the capture saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    /// Replies sent to its pings: every genuine answer it gave.
    pub replies: u64,
    /// Requests left unanswered because it was silenced.
    pub ignored: u64,
    pub silenced: bool,
    /// Its first replies, byte for byte as sent, each with where it was
    /// sent (the pinging socket's address).
    pub kept: Vec<(SocketAddr, Vec<u8>)>,
}

struct Shared {
    contacts: Mutex<Vec<Captured>>,
    /// Datagrams that were no request to one of these contacts.
    foreign: Mutex<u64>,
}

/// The running capture; see the module doc.
pub struct Capture {
    cfg: CaptureConfig,
    port: u16,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    /// Binds 0.0.0.0 on a port the kernel chooses and starts answering.
    pub fn spawn(cfg: CaptureConfig) -> Result<Capture, String> {
        if cfg.count == 0 || cfg.first + cfg.count > V4_ADDRS {
            return Err(format!(
                "capture: contacts {}..{} leave the {V4_ADDRS} loopback addresses",
                cfg.first,
                cfg.first + cfg.count
            ));
        }
        let opts = SocketOptions {
            recv_buffer_bytes: BUFFER_BYTES,
            send_buffer_bytes: BUFFER_BYTES,
            pktinfo: true,
            timestamps: false,
            ..SocketOptions::default()
        };
        let (sock, _) = bind_udp(SocketAddr::from(([0, 0, 0, 0], 0)), &opts)
            .map_err(|e| format!("capture: cannot bind a UDP socket: {e}"))?;
        let port = sock
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| a.port())
            .ok_or("capture: the socket has no port")?;
        let shared = Arc::new(Shared {
            contacts: Mutex::new(vec![Captured::default(); cfg.count as usize]),
            foreign: Mutex::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let waker = Arc::new(Waker::new().map_err(|e| format!("capture: eventfd: {e}"))?);
        let thread = {
            let (shared, stop, waker) = (shared.clone(), stop.clone(), waker.clone());
            thread::Builder::new()
                .name("sim-capture".to_string())
                .spawn(move || serve(cfg, &sock, &shared, &stop, &waker))
                .map_err(|e| format!("capture: cannot start its thread: {e}"))?
        };
        Ok(Capture {
            cfg,
            port,
            shared,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    /// The port every captured contact is on.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn count(&self) -> u64 {
        self.cfg.count
    }

    /// Contact `index`'s URI (`sip:u<first+index>@127.a.b.c:port`).
    pub fn uri(&self, index: u64) -> String {
        contact_uri(self.cfg.first + index, self.port, 1, false)
    }

    /// Contact `index`'s address.
    pub fn addr(&self, index: u64) -> SocketAddr {
        SocketAddr::from((ipv4_for(self.cfg.first + index), self.port))
    }

    /// The index of the captured contact at `ip`, if it is one.
    pub fn index_of(&self, ip: IpAddr) -> Option<u64> {
        index_of(&self.cfg, ip)
    }

    /// Where a daemon's shared-memory file holds each captured contact:
    /// `(worker, slot)` by index, `None` for one it does not hold (a scan
    /// of every slot: setup, not per packet).
    pub fn slots_in(&self, shm: &ShmReader) -> Vec<Option<(u32, u32)>> {
        let h = shm.header();
        let mut slots = vec![None; self.cfg.count as usize];
        for w in 0..h.workers {
            for s in 0..h.slots_per_worker {
                let Some(addr) = shm.read_slot(w, s).and_then(|r| r.socket_addr()) else {
                    continue;
                };
                if addr.port() != self.port {
                    continue;
                }
                if let Some(i) = self.index_of(addr.ip()) {
                    slots[i as usize] = Some((w, s));
                }
            }
        }
        slots
    }

    /// From now on contact `index` answers nothing.
    pub fn silence(&self, index: u64) {
        if let Some(c) = lock(&self.shared.contacts).get_mut(index as usize) {
            c.silenced = true;
        }
    }

    /// Every contact as of now, in index order.
    pub fn snapshot(&self) -> Vec<Captured> {
        lock(&self.shared.contacts).clone()
    }

    /// Datagrams received that were no request to a captured contact.
    pub fn foreign(&self) -> u64 {
        *lock(&self.shared.foreign)
    }

    /// Stops and joins the thread; returns the final snapshot.
    pub fn stop(mut self) -> Vec<Captured> {
        self.halt();
        self.snapshot()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake();
        if let Some(t) = self.thread.take() {
            // A panic here is a bug of this module; the snapshot stays valid
            // (the mutex is taken poisoned-or-not by `lock`).
            let _ = t.join();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The ping token a reply to kaping carries: the characters after its own
/// Via's branch cookie (the same token is the From tag and the Call-ID's
/// local part, `wire::token`).
pub fn reply_token(reply: &[u8]) -> Option<[u8; TOKEN_LEN]> {
    const COOKIE: &[u8] = b";branch=z9hG4bK";
    let at = memchr::memmem::find(reply, COOKIE)? + COOKIE.len();
    reply.get(at..at + TOKEN_LEN)?.try_into().ok()
}

/// `reply` with every copy of its token (Via branch, From tag, Call-ID)
/// replaced by `token`: the same reply naming another ping, or carrying
/// another key's MAC. `None` when `reply` carries no token.
pub fn with_token(reply: &[u8], token: &[u8; TOKEN_LEN]) -> Option<Vec<u8>> {
    let old = reply_token(reply)?;
    let mut out = reply.to_vec();
    let mut from = 0;
    while let Some(at) = memchr::memmem::find(&out[from..], &old) {
        out[from + at..from + at + TOKEN_LEN].copy_from_slice(token);
        from += at + TOKEN_LEN;
    }
    Some(out)
}

/// The mutex's data, whether or not a panicking holder poisoned it (every
/// update leaves it consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The index of the contact at `ip`, if it is one of `cfg`'s: the inverse
/// of `ipv4_for`.
fn index_of(cfg: &CaptureConfig, ip: IpAddr) -> Option<u64> {
    let IpAddr::V4(v4) = ip else { return None };
    let [o0, a, b, c] = v4.octets();
    if o0 != 127 || c == 0 || c == 255 {
        return None;
    }
    let j = u64::from(a) * 254 * 256 + u64::from(b) * 254 + u64::from(c - 1);
    let i = j.checked_sub(cfg.first)?;
    (i < cfg.count).then_some(i)
}

/// The thread: receive a batch, answer it under one lock, send.
fn serve(
    cfg: CaptureConfig,
    sock: &socket2::Socket,
    shared: &Shared,
    stop: &AtomicBool,
    waker: &Waker,
) {
    let fd = sock.as_raw_fd();
    let fds = [fd, waker.as_raw_fd()];
    let mut recv = RecvBatch::new(BATCH, DATAGRAM_MAX);
    let mut send = SendBatch::new(BATCH, DATAGRAM_MAX);
    let mut scratch = vec![0u8; DATAGRAM_MAX];
    while !stop.load(Ordering::Acquire) {
        // An error (none is expected: no ICMP comes back to a responder)
        // counts as nothing received.
        let n = recv.recv(fd).unwrap_or_default();
        if n == 0 {
            let _ = wait_readable(&fds, IDLE_MAX);
            continue;
        }
        let mut foreign = 0u64;
        {
            let mut contacts = lock(&shared.contacts);
            for i in 0..n {
                let d = recv.get(i);
                let (Some(from), Some(to)) = (d.from, d.to) else {
                    foreign += 1;
                    continue;
                };
                let Some(index) = index_of(&cfg, to) else {
                    foreign += 1;
                    continue;
                };
                let Ok(req) = request::parse(d.data) else {
                    foreign += 1;
                    continue;
                };
                let c = &mut contacts[index as usize];
                if c.silenced {
                    c.ignored += 1;
                    continue;
                }
                let params = ReplyParams {
                    code: 200,
                    to_tag: &to_tag(cfg.first + index),
                    source: from,
                    malform: None,
                };
                let Some(len) = request::write_reply(&req, &params, &mut scratch) else {
                    foreign += 1;
                    continue;
                };
                c.replies += 1;
                if c.kept.len() < cfg.keep {
                    c.kept.push((from, scratch[..len].to_vec()));
                }
                if send.is_full() {
                    flush(&mut send, fd);
                }
                send.push(&scratch[..len], &from, Some(to));
            }
        }
        flush(&mut send, fd);
        if foreign > 0 {
            *lock(&shared.foreign) += foreign;
        }
    }
}

/// Sends the batch; a full socket buffer is retried a few times, then
/// what is left is dropped (loopback never keeps it full for long).
fn flush(send: &mut SendBatch, fd: std::os::fd::RawFd) {
    for _ in 0..SEND_ROUNDS {
        if send.send(fd, |_, _| {}).blocked == 0 {
            return;
        }
        thread::yield_now();
    }
    send.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_maps_back_to_its_index() {
        let cfg = CaptureConfig {
            first: 70_000,
            count: 1000,
            keep: 1,
        };
        for i in [0u64, 1, 253, 254, 999] {
            assert_eq!(index_of(&cfg, IpAddr::V4(ipv4_for(70_000 + i))), Some(i));
        }
        assert_eq!(index_of(&cfg, IpAddr::V4(ipv4_for(69_999))), None);
        assert_eq!(index_of(&cfg, IpAddr::V4(ipv4_for(71_000))), None);
        assert_eq!(index_of(&cfg, "10.0.0.1".parse().unwrap()), None);
        assert_eq!(index_of(&cfg, "::1".parse().unwrap()), None);
    }
}
