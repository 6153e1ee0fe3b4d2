//! The io_uring backend (DESIGN §4), one ring per worker, built on the
//! worker's own thread and never shared.
//!
//! * Sends: each datagram is rendered straight into one of `TX_SLOTS`
//!   transmit slots (buffer + destination, and a msghdr for kernels before
//!   6.1), and an SQE naming the slot is queued; one `io_uring_enter`
//!   submits a whole round. The slot is returned to the free list only when
//!   its CQE is reaped. From Linux 6.1 the SQE is a `Send` carrying the
//!   destination (sendto), which spares the kernel copying and parsing a
//!   msghdr and an iovec per datagram; before, a `SendMsg`. A socket that
//!   sends as a proxy's address (`WorkerSocket::src`) always uses
//!   `SendMsg`: its msghdr names the socket's `IP_PKTINFO` control message,
//!   written once when the socket is added.
//! * Receives: one multishot `RecvMsg` per socket with a provided-buffer
//!   ring of `RX_BUFS` buffers, so one armed SQE keeps delivering datagrams
//!   (name, control messages with the kernel timestamp, payload) until it
//!   is cancelled or runs out of buffers; it is re-armed when a CQE comes
//!   without `IORING_CQE_F_MORE`. Since it also ends on a pending ICMP
//!   error and on an empty datagram, which anyone can send in floods, the
//!   socket is first read with plain `recvmmsg` calls (`udp::drain_socket`,
//!   the mmsg backend's receive) whenever it ends.
//! * Completion work: from Linux 6.1 the ring is `SINGLE_ISSUER |
//!   DEFER_TASKRUN | TASKRUN_FLAG`. The kernel then never interrupts the
//!   worker to run io_uring work at its system-call exits: the multishot
//!   receive's work (one task-work item per socket, which receives up to
//!   32 datagrams per run, the kernel's `MULTISHOT_MAX_RETRY`, and then
//!   queues itself again) waits until the worker enters the ring with
//!   `IORING_ENTER_GETEVENTS`, and one such enter runs it once. So `poll`
//!   enters again while the kernel's `IORING_SQ_TASKRUN` flag says work is
//!   pending, reaping (and handing buffers back) between rounds, up to
//!   `DRAIN_ROUNDS` rounds: a full socket is drained in batches instead of
//!   32 datagrams per loop (which starved the receive path: replies piled
//!   up in the socket while the worker kept sending). Older kernels get
//!   `COOP_TASKRUN`, where that work runs at every system-call exit.
//! * Waiting (deferred task running): the round's SQEs are submitted, then
//!   the worker sleeps in `ppoll` on its waker and its sockets' errors
//!   until its next wheel deadline (`io::udp::sleep_until_woken`, shared
//!   with the mmsg backend), and one GETEVENTS enter runs the receive work
//!   that gathered meanwhile. Replies never end the sleep: they wait in the
//!   socket's receive buffer (32 MiB by default) and are handled in a batch
//!   (their RTT comes from the kernel timestamp, so waiting costs no
//!   accuracy); a command or hand-off and an ICMP error end it at once. An
//!   `io_uring_enter` wait could not do both: with deferred task running
//!   only `WAKE_BATCH` completions, a signal or its timeout end it. The
//!   drain then goes on only while its rounds find batches (`DRAIN_MIN`),
//!   so replies trickling in during a drain do not cost an enter each; one
//!   that used all its rounds and still found batches skips the next sleep
//!   (a flood is read as fast as it comes, not a drain per round).
//! * Waiting (cooperative, before 6.1): `io_uring_enter` with a timeout,
//!   returning early once `WAKE_BATCH` completions are ready (a burst is
//!   drained before the provided buffers run out); a `Read` on the
//!   worker's eventfd stays armed and consumes wake-ups.
//!
//! The invariant every `unsafe` block below relies on: **memory named by an
//! SQE (transmit slot, receive msghdr, provided buffers, the eventfd word)
//! is allocated once in `new`, never moved or freed before the ring is
//! dropped, and never touched by Rust code between the SQE's submission and
//! the reaping of its CQE** (for provided buffers: between giving the
//! buffer to the ring and getting it back in a CQE). The ring is dropped
//! before that memory (field order), and dropping the ring makes the kernel
//! cancel every request.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{self, BufRingEntry, Fd, Fixed, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, EnterFlags, IoUring};
use socket2::Socket;

use super::udp::{
    drain_socket, is_async_icmp, parse_control, read_errors, sleep_until_woken,
    sockaddr_from_bytes, sockaddr_from_std, write_src_cmsg, CmsgBuf, Datagram, RecvBatch,
};
use super::waker::Waker;
use super::{Backend, Handler, WorkerSocket, MAX_SOCKETS, RX_DATAGRAM_MAX, TX_DATAGRAM_MAX};

/// Datagrams per plain `recvmmsg` after a multishot receive ended
/// (`UringBackend::rx_sync`).
const RX_SYNC_BATCH: usize = 64;
/// Transmit slots: datagrams in flight at once.
pub const TX_SLOTS: usize = 1024;
/// Provided receive buffers (a power of two).
pub const RX_BUFS: usize = 1024;
/// Submission queue entries; the completion queue is twice as large.
const SQ_ENTRIES: u32 = 2048;
/// Completions that end a sleep early (well below RX_BUFS, so a burst is
/// drained before the provided buffers run out).
const WAKE_BATCH: usize = 256;
/// Enter-and-reap rounds per `poll` while deferred work is pending: each
/// round receives up to 32 datagrams per socket (the kernel's multishot
/// batch), so 32 rounds take up to `RX_BUFS` replies, as many as a worker
/// round sends (`DUE_BATCH`), and bound how long a flood of input can hold
/// up sending.
const DRAIN_ROUNDS: usize = 32;
/// Datagrams a drain round must have received for the drain to go on. A
/// run of a multishot receive takes up to 32 datagrams from a socket
/// (`MULTISHOT_MAX_RETRY`, Linux 6.6+; fewer were seen on 6.18) before it
/// queues itself again; a round with only a few found the socket empty,
/// and what trickles in after waits for the next wake-up.
const DRAIN_MIN: usize = 8;
/// Buffer group id of the provided-buffer ring.
const BGID: u16 = 0;
/// Room reserved in each receive buffer for the source address and the
/// control messages (pktinfo + timestamp), as the msghdr template says.
const NAME_LEN: usize = 128;
const CONTROL_LEN: usize = 128;
/// `io_uring_recvmsg_out` header at the start of each receive buffer.
const RECVMSG_OUT_LEN: usize = 16;
const RX_BUF_LEN: usize = RECVMSG_OUT_LEN + NAME_LEN + CONTROL_LEN + RX_DATAGRAM_MAX;

// user_data: the kind in the top 8 bits, an index in the low 32.
const KIND_SHIFT: u32 = 56;
const UD_TX: u64 = 1 << KIND_SHIFT;
const UD_RX: u64 = 2 << KIND_SHIFT;
const UD_WAKE: u64 = 3 << KIND_SHIFT;
const UD_CANCEL: u64 = 4 << KIND_SHIFT;

/// Anonymous page-aligned memory shared with the kernel, addressed only
/// through raw pointers so no Rust reference ever covers bytes the kernel
/// may be using.
struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

impl Region {
    fn new(len: usize) -> io::Result<Region> {
        // SAFETY: an anonymous private mapping with no address hint has no
        // preconditions; MAP_FAILED is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region {
            ptr: NonNull::new(p.cast()).expect("mmap returned null"),
            len,
        })
    }

    fn at(&self, offset: usize) -> *mut u8 {
        assert!(offset <= self.len);
        // SAFETY: offset is within the mapping (checked above).
        unsafe { self.ptr.as_ptr().add(offset) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; the ring that
        // could use this memory has been dropped first (field order).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One transmit slot's kernel-visible state. `hdr` and `iov` serve the
/// `SendMsg` of kernels before 6.1 only; a `Send` names `addr` directly.
#[repr(C)]
struct TxSlot {
    hdr: libc::msghdr,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
    addr_len: libc::socklen_t,
    len: u32,
}

pub struct UringBackend {
    // Field order matters: the ring drops first, cancelling every request
    // before the memory below is freed.
    ring: IoUring,
    /// `TX_SLOTS` × `TX_DATAGRAM_MAX` payload bytes.
    tx_bufs: Region,
    /// `TX_SLOTS` × `TxSlot`.
    tx_meta: Region,
    tx_free: Vec<u16>,
    tx_tags: Vec<u32>,
    tx_sock: Vec<u8>,
    /// Sends of each slot the socket buffer refused (it is queued again
    /// up to `ICMP_RESENDS` times; one failed by an earlier datagram's
    /// ICMP error is sent again at once, `resend_now`).
    tx_retried: Vec<u8>,
    tx_in_flight: usize,
    /// SQEs pushed but not yet submitted.
    unsubmitted: usize,
    /// `RX_BUFS` × `RX_BUF_LEN` provided buffers.
    rx_bufs: Region,
    /// The provided-buffer ring: `RX_BUFS` × 16-byte entries.
    rx_ring: Region,
    rx_tail: u16,
    /// One msghdr template per possible socket (`MAX_SOCKETS`, allocated
    /// once so adding a socket moves none), alive while its multishot
    /// receive is armed.
    rx_hdrs: Box<[libc::msghdr]>,
    rx_armed: Vec<bool>,
    /// Plain `recvmmsg` batches for a socket whose multishot receive ended
    /// (`reap`); never named by an SQE.
    rx_sync: RecvBatch,
    /// Per possible socket: the `IP_PKTINFO` control message naming its
    /// source address and its length (0: no source, plain sends). Written
    /// when the socket is added, before any SQE names it; read-only after.
    src_cmsgs: Box<[CmsgBuf]>,
    src_cmsg_lens: [usize; MAX_SOCKETS],
    /// `DEFER_TASKRUN` (Linux 6.1+): completion work runs only when we
    /// enter with GETEVENTS, and sends carry their destination (`Send`).
    deferred: bool,
    /// The last drain ended with input still waiting (`drain`).
    behind: bool,
    wake_word: Box<u64>,
    sockets: Vec<Socket>,
    waker: Waker,
}

// SAFETY: the raw pointers (in Regions, msghdrs) point only into memory this
// struct owns; it is used by one thread at a time (a worker owns it), and
// moving it between threads moves the ownership of that memory with it.
unsafe impl Send for UringBackend {}

/// Why io_uring cannot be used here, for the log line.
pub fn probe() -> Result<(), String> {
    let (ring, _) = build_ring(8).map_err(explain)?;
    let region = Region::new(4096).map_err(|e| e.to_string())?;
    // SAFETY: the region is page-aligned, 4096 bytes hold 256 entries of 16
    // bytes, ≥ the 8 we register; it outlives the registration (we
    // unregister before it drops).
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(region.at(0) as u64, 8, 7, 0)
            .map_err(|e| format!("provided-buffer rings unsupported (kernel < 5.19?): {e}"))?;
    }
    let _ = ring.submitter().unregister_buf_ring(7);
    Ok(())
}

fn explain(e: io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no io_uring (ENOSYS)".into(),
        Some(libc::EPERM) => {
            "io_uring is refused (EPERM): kernel.io_uring_disabled is set, or a seccomp profile blocks it".into()
        }
        Some(libc::ENOMEM) => "io_uring cannot lock memory (ENOMEM): raise the memlock limit (ulimit -l)".into(),
        _ => format!("io_uring setup failed: {e}"),
    }
}

/// The ring and whether it defers completion work (`DEFER_TASKRUN`).
fn build_ring(entries: u32) -> io::Result<(IoUring, bool)> {
    // Linux 6.1: completion work runs only inside our GETEVENTS enters, in
    // batches, instead of interrupting the worker at every system-call
    // exit; TASKRUN_FLAG tells us when some is pending. Then single issuer
    // and cooperative task running (Linux 6.0/5.19); then a plain ring.
    let deferred = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_cqsize(entries * 2)
        .build(entries);
    if let Ok(ring) = deferred {
        return Ok((ring, true));
    }
    IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_cqsize(entries * 2)
        .build(entries)
        .or_else(|_| IoUring::builder().setup_cqsize(entries * 2).build(entries))
        .map(|ring| (ring, false))
}

impl UringBackend {
    /// Builds the ring on the calling thread (the worker's) and arms the
    /// receives and the waker.
    pub fn new(sockets: Vec<WorkerSocket>, waker: Waker) -> io::Result<UringBackend> {
        let (ring, deferred) = build_ring(SQ_ENTRIES).map_err(|e| io::Error::other(explain(e)))?;
        let tx_bufs = Region::new(TX_SLOTS * TX_DATAGRAM_MAX)?;
        let tx_meta = Region::new(TX_SLOTS * std::mem::size_of::<TxSlot>())?;
        let rx_bufs = Region::new(RX_BUFS * RX_BUF_LEN)?;
        let rx_ring = Region::new(RX_BUFS * std::mem::size_of::<BufRingEntry>())?;
        // SAFETY: rx_ring is page-aligned (mmap) and holds RX_BUFS entries;
        // it stays registered until the ring is dropped, and it is dropped
        // after the ring (field order).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(rx_ring.at(0) as u64, RX_BUFS as u16, BGID, 0)
                .map_err(|e| {
                    io::Error::other(format!("cannot register the receive buffer ring: {e}"))
                })?;
        }
        // Registered files: SQEs name sockets by index, sparing the kernel
        // an fd-table lookup and reference count per operation. The table
        // has a place for every socket a worker may get; `add_socket`
        // fills them in.
        ring.submitter()
            .register_files_sparse(MAX_SOCKETS as u32)
            .map_err(|e| io::Error::other(format!("cannot register sockets with io_uring: {e}")))?;
        // SAFETY: msghdr is a plain C struct, valid when zeroed.
        let mut rx_hdrs: Box<[libc::msghdr]> = (0..MAX_SOCKETS)
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for h in rx_hdrs.iter_mut() {
            h.msg_namelen = NAME_LEN as libc::socklen_t;
            h.msg_controllen = CONTROL_LEN;
        }
        let mut b = UringBackend {
            ring,
            tx_bufs,
            tx_meta,
            tx_free: (0..TX_SLOTS as u16).rev().collect(),
            tx_tags: vec![0; TX_SLOTS],
            tx_sock: vec![0; TX_SLOTS],
            tx_retried: vec![0; TX_SLOTS],
            tx_in_flight: 0,
            unsubmitted: 0,
            rx_bufs,
            rx_ring,
            rx_tail: 0,
            rx_hdrs,
            rx_armed: Vec::with_capacity(MAX_SOCKETS),
            rx_sync: RecvBatch::new(RX_SYNC_BATCH, RX_DATAGRAM_MAX),
            src_cmsgs: vec![CmsgBuf::default(); MAX_SOCKETS].into_boxed_slice(),
            src_cmsg_lens: [0; MAX_SOCKETS],
            deferred,
            behind: false,
            wake_word: Box::new(0),
            sockets: Vec::with_capacity(MAX_SOCKETS),
            waker,
        };
        for bid in 0..RX_BUFS as u16 {
            b.give_rx_buffer(bid);
        }
        b.publish_rx_tail();
        for s in sockets {
            b.add_socket(s)?;
        }
        if !b.deferred {
            // Deferred mode sleeps in ppoll on the waker itself; a read
            // armed here could consume a wake-up between that sleep's
            // checks and leave a command waiting for the timeout.
            b.arm_wake()?;
        }
        b.submit()?;
        Ok(b)
    }

    fn tx_slot(&self, slot: u16) -> *mut TxSlot {
        self.tx_meta
            .at(slot as usize * std::mem::size_of::<TxSlot>())
            .cast()
    }

    fn tx_payload(&self, slot: u16) -> *mut u8 {
        self.tx_bufs.at(slot as usize * TX_DATAGRAM_MAX)
    }

    /// Puts provided buffer `bid` back at the ring's tail (published by
    /// `publish_rx_tail`).
    fn give_rx_buffer(&mut self, bid: u16) {
        let mask = RX_BUFS as u16 - 1;
        let index = (self.rx_tail & mask) as usize;
        // SAFETY: index < RX_BUFS, so the entry lies inside rx_ring; the
        // kernel does not read entries at or past the published tail, and
        // buffer `bid` is ours (its CQE was reaped, or it was never given).
        unsafe {
            let entry = &mut *self
                .rx_ring
                .at(index * std::mem::size_of::<BufRingEntry>())
                .cast::<BufRingEntry>();
            entry.set_addr(self.rx_bufs.at(bid as usize * RX_BUF_LEN) as u64);
            entry.set_len(RX_BUF_LEN as u32);
            entry.set_bid(bid);
        }
        self.rx_tail = self.rx_tail.wrapping_add(1);
    }

    fn publish_rx_tail(&mut self) {
        // SAFETY: the tail lives in the first entry's reserved field; the
        // kernel reads it concurrently, so it is written with a Release
        // atomic store after the entries it covers.
        unsafe {
            let tail =
                BufRingEntry::tail(self.rx_ring.at(0).cast::<BufRingEntry>()) as *const AtomicU16;
            (*tail).store(self.rx_tail, Ordering::Release);
        }
    }

    fn push(&mut self, sqe: squeue::Entry) -> io::Result<()> {
        // SAFETY (for callers): every SQE built in this file names memory
        // owned by self that stays put until its CQE (module invariant).
        loop {
            let pushed = unsafe { self.ring.submission().push(&sqe) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            // Submission queue full: hand it to the kernel and retry.
            self.submit()?;
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => {
                self.unsubmitted = 0;
                Ok(())
            }
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn arm_recv(&mut self, sock: usize) -> io::Result<()> {
        let hdr: *const libc::msghdr = &self.rx_hdrs[sock];
        let sqe = opcode::RecvMsgMulti::new(Fixed(sock as u32), hdr, BGID)
            .build()
            .user_data(UD_RX | sock as u64);
        self.push(sqe)?;
        self.rx_armed[sock] = true;
        Ok(())
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let word: *mut u64 = &mut *self.wake_word;
        let sqe = opcode::Read::new(Fd(self.waker.as_raw_fd()), word.cast(), 8)
            .build()
            .user_data(UD_WAKE);
        self.push(sqe)
    }

    fn push_send(&mut self, slot: u16) -> io::Result<()> {
        let index = self.tx_sock[slot as usize] as usize;
        let sock = Fixed(index as u32);
        let meta = self.tx_slot(slot);
        let sqe = if self.deferred && self.src_cmsg_lens[index] == 0 {
            // SAFETY: the slot's metadata was written by tx_commit and has
            // no SQE in flight (it is being queued now, or its CQE was
            // reaped for a resend), so reading it races with nothing.
            let (addr, addr_len, len) = unsafe {
                (
                    std::ptr::addr_of!((*meta).addr).cast::<libc::sockaddr>(),
                    (*meta).addr_len,
                    (*meta).len,
                )
            };
            opcode::Send::new(sock, self.tx_payload(slot), len)
                .dest_addr(addr)
                .dest_addr_len(addr_len)
                .build()
        } else {
            opcode::SendMsg::new(sock, meta.cast::<libc::msghdr>()).build()
        };
        self.push(sqe.user_data(UD_TX | slot as u64))
    }

    /// Sends slot `slot` again with a plain system call, at once, after
    /// its SQE failed on an earlier datagram's ICMP error (`IP_RECVERR`
    /// reports a pending error on the next send, which consumes it), up to
    /// `ICMP_RESENDS` times while that is what it meets. At once, not as a
    /// new SQE: a flood of ICMP errors sets a new one every few µs, and a
    /// resend queued for the next submission met one almost every time
    /// (seen: 1,000 pings a second never sent, each charged to its contact,
    /// under 160,000 forged errors a second); the mmsg backend retries the
    /// same way (`SendBatch::send`). Returns the last result as a CQE
    /// would: bytes sent, or `-errno`.
    fn resend_now(&self, slot: u16) -> i32 {
        let fd = self.sockets[self.tx_sock[slot as usize] as usize].as_raw_fd();
        let meta = self.tx_slot(slot);
        let index = self.tx_sock[slot as usize] as usize;
        let mut res = -libc::ECONNREFUSED;
        for _ in 0..super::udp::ICMP_RESENDS {
            // SAFETY: the slot's CQE was reaped and no SQE names it, so its
            // payload and metadata (written by tx_commit) are ours to read;
            // the call only reads them, for their true lengths. The msghdr
            // is complete whenever push_send would use SendMsg (no Send
            // opcode, or a source control message); else addr/len are.
            let rc = unsafe {
                if self.deferred && self.src_cmsg_lens[index] == 0 {
                    libc::sendto(
                        fd,
                        self.tx_payload(slot).cast(),
                        (*meta).len as usize,
                        libc::MSG_DONTWAIT,
                        std::ptr::addr_of!((*meta).addr).cast(),
                        (*meta).addr_len,
                    )
                } else {
                    libc::sendmsg(fd, std::ptr::addr_of!((*meta).hdr), libc::MSG_DONTWAIT)
                }
            };
            if rc >= 0 {
                return rc as i32;
            }
            res = -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if !is_async_icmp(-res) {
                break;
            }
        }
        res
    }

    /// Reaps every completion; returns how many datagrams were received.
    fn reap(&mut self, h: &mut dyn Handler) -> io::Result<usize> {
        let mut received = 0;
        let mut rearm_recv = [false; MAX_SOCKETS];
        let mut rearm_wake = false;
        let mut resend: [u16; 64] = [0; 64];
        let mut resend_len = 0;
        let mut returned = false;
        loop {
            // Copy CQEs out in chunks so the queue borrow ends before the
            // handler runs.
            let mut batch: [(u64, i32, u32); 64] = [(0, 0, 0); 64];
            let mut n = 0;
            {
                let mut cq = self.ring.completion();
                cq.sync();
                for cqe in &mut cq {
                    batch[n] = (cqe.user_data(), cqe.result(), cqe.flags());
                    n += 1;
                    if n == batch.len() {
                        break;
                    }
                }
            }
            if n == 0 {
                break;
            }
            for &(ud, res, flags) in &batch[..n] {
                let index = (ud & 0xFFFF_FFFF) as usize;
                match ud & (0xFF << KIND_SHIFT) {
                    UD_TX => {
                        let slot = index as u16;
                        let mut res = res;
                        if res < 0 && is_async_icmp(-res) {
                            // An ICMP error for an earlier datagram was
                            // reported on this send (which took it off
                            // the socket); the slot is intact. Read the
                            // errors, then send again at once.
                            let fd = self.sockets[self.tx_sock[index] as usize].as_raw_fd();
                            read_errors(fd, 64, |e| h.icmp(e));
                            res = self.resend_now(slot);
                        }
                        if res == -libc::EAGAIN
                            && self.tx_retried[index] < super::udp::ICMP_RESENDS
                            && resend_len < resend.len()
                        {
                            // The socket buffer is full: the ring waits for
                            // room.
                            self.tx_retried[index] += 1;
                            resend[resend_len] = slot;
                            resend_len += 1;
                            continue;
                        }
                        if res < 0 {
                            h.send_failed(self.tx_tags[index], &io::Error::from_raw_os_error(-res));
                        }
                        self.tx_in_flight -= 1;
                        self.tx_free.push(slot);
                    }
                    UD_RX => {
                        let sock = index;
                        if !cqueue::more(flags) {
                            rearm_recv[sock] = true;
                        }
                        if let Some(bid) = cqueue::buffer_select(flags) {
                            if res >= 0 {
                                self.deliver(sock, bid, res as usize, h);
                                received += 1;
                            }
                            self.give_rx_buffer(bid);
                            returned = true;
                        }
                        if !cqueue::more(flags) && res != -libc::ECANCELED {
                            // The multishot receive ended with datagrams
                            // likely still queued: on a pending ICMP error
                            // (a failed receive), on an empty datagram
                            // (Linux ends a multishot receive on one), or
                            // out of buffers. Under a flood of either the
                            // next one comes before a re-armed receive runs
                            // (reading an error also sets the next queued
                            // one), so the socket is read here with plain
                            // calls, which read errors between receives and
                            // take empty datagrams like any, until the
                            // receive is armed again. Seen without: replies
                            // read after their timeout under 200,000 forged
                            // ICMP errors a second, and 100,000 datagrams a
                            // second dropped by a full socket under a flood
                            // of truncated replies, every 400th empty.
                            let fd = self.sockets[sock].as_raw_fd();
                            received += drain_socket(&mut self.rx_sync, sock, fd, h);
                        }
                    }
                    UD_WAKE => {
                        rearm_wake = true;
                    }
                    _ => debug_assert!(false, "unknown user_data {ud:#x}"),
                }
            }
            h.end_batch();
        }
        if returned {
            self.publish_rx_tail();
        }
        for &slot in &resend[..resend_len] {
            self.push_send(slot)?;
        }
        for (sock, &again) in rearm_recv.iter().enumerate().take(self.sockets.len()) {
            if again {
                self.arm_recv(sock)?;
            }
        }
        if rearm_wake {
            self.arm_wake()?;
        }
        Ok(received)
    }

    /// Hands the datagram in provided buffer `bid` to the handler.
    fn deliver(&self, sock: usize, bid: u16, len: usize, h: &mut dyn Handler) {
        let len = len.min(RX_BUF_LEN);
        // SAFETY: the kernel returned buffer `bid` in this CQE with `len`
        // bytes written; it is ours until give_rx_buffer, and nothing else
        // references it.
        let buf =
            unsafe { std::slice::from_raw_parts(self.rx_bufs.at(bid as usize * RX_BUF_LEN), len) };
        let Ok(out) = RecvMsgOut::parse(buf, &self.rx_hdrs[sock]) else {
            return;
        };
        let (to, rx_ns) = parse_control(out.control_data());
        let d = Datagram {
            data: out.payload_data(),
            from: sockaddr_from_bytes(out.name_data()),
            to,
            rx_ns,
            truncated: out.is_payload_truncated(),
        };
        h.datagram(sock, &d);
    }

    /// Deferred mode: while the last round received a batch (`DRAIN_MIN`
    /// datagrams or more: more may wait in the socket) and
    /// `IORING_SQ_TASKRUN` says completion work is pending, runs more rounds
    /// of one GETEVENTS enter and a reap, up to `DRAIN_ROUNDS`. Each round
    /// returns the provided buffers it used, so the drain does not run them
    /// out. A round that found the socket nearly empty ends the drain:
    /// replies trickling in meanwhile wait for the next wake-up instead of
    /// costing an enter each (seen: two enters per ping at 10k pings/s).
    ///
    /// A drain that used all its rounds and still found batches leaves
    /// `behind` set: the socket holds more than a round takes, and the next
    /// `poll` does not sleep (the mmsg backend does not sleep either while
    /// its receives find datagrams). Without, a flood of small datagrams
    /// was read at `DRAIN_ROUNDS` batches per worker round, about 100,000
    /// a second with the worker mostly asleep, and the socket dropped the
    /// rest, genuine replies with them (contacts went Down by timeout).
    fn drain(&mut self, mut received: usize, h: &mut dyn Handler) -> io::Result<()> {
        self.behind = false;
        if !self.deferred {
            return Ok(());
        }
        for _ in 0..DRAIN_ROUNDS {
            if received < DRAIN_MIN || !self.ring.submission().taskrun() {
                return Ok(());
            }
            self.enter_getevents()?;
            received = self.reap(h)?;
        }
        self.behind = received >= DRAIN_MIN;
        Ok(())
    }

    /// Submits what is queued and runs one round of deferred completion
    /// work, without waiting.
    fn enter_getevents(&mut self) -> io::Result<()> {
        let queued = self.ring.submission().len() as u32;
        // SAFETY: no argument structure is passed; the SQEs being submitted
        // name memory that stays put until their CQEs (module invariant).
        let r = unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                queued,
                0,
                EnterFlags::GETEVENTS.bits(),
                None,
            )
        };
        match r {
            Ok(_) => {
                self.unsubmitted = 0;
                Ok(())
            }
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Sleeps until `timeout` (submitting what is queued first).
    ///
    /// Deferred task running: in `ppoll` on the waker and the sockets'
    /// errors ([`sleep_until_woken`]), then one GETEVENTS enter runs the
    /// receive work that gathered meanwhile. Replies never end this sleep
    /// (they are handled in a batch at its end; their RTT comes from the
    /// kernel timestamp), while a command or hand-off (the waker) and an
    /// ICMP error end it at once: waiting in `io_uring_enter` could do
    /// neither, as only `WAKE_BATCH` completions, a signal or the timeout
    /// end such a wait (a wake-up only makes the kernel count again).
    ///
    /// Cooperative task running (before Linux 6.1): in `io_uring_enter`
    /// until `WAKE_BATCH` completions are ready (a burst of replies is
    /// drained before the provided buffers run out) or the timeout.
    fn wait(&mut self, timeout: Duration, h: &mut dyn Handler) -> io::Result<()> {
        if self.deferred {
            self.submit()?;
            sleep_until_woken(&self.sockets, &self.waker, timeout, h)?;
            // Nothing arrived (an idle worker's wake-up): no enter.
            if !self.ring.submission().taskrun() {
                return Ok(());
            }
            return self.enter_getevents();
        }
        let ts = Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let args = SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(WAKE_BATCH, &args) {
            Ok(_) => {
                self.unsubmitted = 0;
                Ok(())
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                self.unsubmitted = 0;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for UringBackend {
    /// The kernel tears a ring down asynchronously once its last reference
    /// is gone, and the sockets registered with it close only then: a
    /// daemon restarted at once found its own ports still bound (seen:
    /// ~100 ms on Linux 6.18). So the requests in flight are cancelled and
    /// reaped, and the sockets unregistered, before anything is dropped:
    /// the ports are free when the worker returns.
    fn drop(&mut self) {
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(UD_CANCEL);
        // SAFETY: a cancel SQE names no memory.
        if unsafe { self.ring.submission().push(&cancel) }.is_ok() {
            let _ = self.ring.submit();
        }
        // Bounded: completions of cancelled requests arrive at once.
        for _ in 0..64 {
            let pending = self.tx_in_flight > 0 || self.rx_armed.iter().any(|&a| a);
            if !pending {
                break;
            }
            let ts = Timespec::new().nsec(2_000_000);
            let args = SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            let mut cq = self.ring.completion();
            cq.sync();
            for cqe in &mut cq {
                let ud = cqe.user_data();
                let index = (ud & 0xFFFF_FFFF) as usize;
                match ud & (0xFF << KIND_SHIFT) {
                    UD_TX => self.tx_in_flight = self.tx_in_flight.saturating_sub(1),
                    UD_RX if !cqueue::more(cqe.flags()) => {
                        if let Some(armed) = self.rx_armed.get_mut(index) {
                            *armed = false;
                        }
                    }
                    _ => {}
                }
            }
        }
        let _ = self.ring.submitter().unregister_files();
    }
}

impl Backend for UringBackend {
    fn name(&self) -> &'static str {
        "uring"
    }

    fn tx_buf(&mut self, _sock: usize) -> Option<&mut [u8]> {
        let slot = *self.tx_free.last()?;
        // SAFETY: a slot on the free list has no SQE in flight, so its
        // payload bytes are ours alone; the slice lives as long as the
        // &mut self borrow, which ends before tx_commit submits it.
        Some(unsafe { std::slice::from_raw_parts_mut(self.tx_payload(slot), TX_DATAGRAM_MAX) })
    }

    fn tx_commit(&mut self, sock: usize, len: usize, dest: &SocketAddr, tag: u32) {
        let slot = self.tx_free.pop().expect("tx_commit without a tx_buf");
        assert!(len <= TX_DATAGRAM_MAX);
        let i = slot as usize;
        self.tx_tags[i] = tag;
        self.tx_sock[i] = sock as u8;
        self.tx_retried[i] = 0;
        let payload = self.tx_payload(slot);
        // SAFETY: the slot is off the free list and has no SQE in flight, so
        // its metadata is ours to write; the msghdr points at the slot's own
        // iovec, address and payload, which stay put until its CQE.
        unsafe {
            let meta = &mut *self.tx_slot(slot);
            let addr_len = sockaddr_from_std(dest, &mut meta.addr);
            meta.addr_len = addr_len;
            meta.len = len as u32;
            let cmsg_len = self.src_cmsg_lens[sock];
            if !self.deferred || cmsg_len != 0 {
                meta.iov = libc::iovec {
                    iov_base: payload.cast(),
                    iov_len: len,
                };
                meta.hdr = std::mem::zeroed();
                meta.hdr.msg_name = (&mut meta.addr as *mut libc::sockaddr_storage).cast();
                meta.hdr.msg_namelen = addr_len;
                meta.hdr.msg_iov = &mut meta.iov;
                meta.hdr.msg_iovlen = 1;
                if cmsg_len != 0 {
                    // The socket's own control message: allocated once for
                    // MAX_SOCKETS sockets, never written after add_socket,
                    // so the kernel may read it while this SQE is in flight.
                    meta.hdr.msg_control = self.src_cmsgs[sock].0.as_ptr() as *mut libc::c_void;
                    meta.hdr.msg_controllen = cmsg_len;
                }
            }
        }
        self.tx_in_flight += 1;
        if self.push_send(slot).is_err() {
            // The ring refused even after a submit: report, free the slot.
            self.tx_in_flight -= 1;
            self.tx_free.push(slot);
        }
    }

    fn flush(&mut self, h: &mut dyn Handler) -> io::Result<()> {
        self.submit()?;
        self.reap(h)?;
        Ok(())
    }

    /// A sleeping poll submits the round's sends and sleeps (`wait`); a
    /// zero-timeout one submits and runs the deferred receive work in one
    /// GETEVENTS enter. Either way the reap that follows finds the replies,
    /// and the drain goes on while rounds find batches.
    fn poll(&mut self, timeout: Duration, h: &mut dyn Handler) -> io::Result<()> {
        if !timeout.is_zero() && !self.behind {
            self.wait(timeout, h)?;
        } else if self.deferred && (self.unsubmitted > 0 || self.ring.submission().taskrun()) {
            self.enter_getevents()?;
        } else {
            self.submit()?;
        }
        let received = self.reap(h)?;
        self.drain(received, h)?;
        self.submit()
    }

    fn tx_pending(&self) -> usize {
        self.tx_in_flight
    }

    fn add_socket(&mut self, s: WorkerSocket) -> io::Result<usize> {
        let index = self.sockets.len();
        if index == MAX_SOCKETS {
            return Err(io::Error::other(format!(
                "a worker has at most {MAX_SOCKETS} sockets"
            )));
        }
        self.ring
            .submitter()
            .register_files_update(index as u32, &[s.socket.as_raw_fd()])
            .map_err(|e| {
                io::Error::other(format!("cannot register a socket with io_uring: {e}"))
            })?;
        // No SQE names this index yet: its control message and receive
        // header are ours to write.
        self.src_cmsg_lens[index] = match s.src {
            Some(ip) => write_src_cmsg(&mut self.src_cmsgs[index], ip),
            None => 0,
        };
        self.sockets.push(s.socket);
        self.rx_armed.push(false);
        self.arm_recv(index)?;
        self.submit()?;
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::udp::{bind_udp, SocketOptions};
    use crate::io::IcmpError;
    use std::net::UdpSocket;
    use std::time::Instant;

    /// (socket, payload, source, kernel receive time) of one datagram.
    type Received = (usize, Vec<u8>, Option<SocketAddr>, Option<u64>);

    #[derive(Default)]
    struct Collect {
        got: Vec<Received>,
        failed: Vec<u32>,
        /// (destination, quote) of each ICMP error.
        icmp: Vec<(SocketAddr, Vec<u8>)>,
    }

    impl Handler for Collect {
        fn datagram(&mut self, sock: usize, d: &Datagram<'_>) {
            self.got.push((sock, d.data.to_vec(), d.from, d.rx_ns));
        }
        fn send_failed(&mut self, tag: u32, _err: &io::Error) {
            self.failed.push(tag);
        }
        fn icmp(&mut self, e: &IcmpError<'_>) {
            self.icmp.push((e.dest, e.quote.to_vec()));
        }
    }

    /// A backend over one socket of kaping's own.
    fn ring_of(socket: socket2::Socket, waker: Waker) -> UringBackend {
        UringBackend::new(vec![WorkerSocket { socket, src: None }], waker).unwrap()
    }

    fn require_uring() -> bool {
        match probe() {
            Ok(()) => true,
            Err(why) => {
                eprintln!("SKIP: {why}");
                false
            }
        }
    }

    #[test]
    fn sends_and_receives_through_the_ring() {
        if !require_uring() {
            return;
        }
        let (sock, _) =
            bind_udp("127.0.0.1:0".parse().unwrap(), &SocketOptions::default()).unwrap();
        let local = sock.local_addr().unwrap().as_socket().unwrap();
        let mut b = ring_of(sock, Waker::new().unwrap());
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer_addr = peer.local_addr().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut h = Collect::default();

        // More datagrams than transmit slots: the pipeline must recycle.
        let total = TX_SLOTS * 3;
        let mut sent = 0;
        let mut echoed = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 64];
        while (sent < total || echoed < total) && Instant::now() < deadline {
            // Keep what the plain peer socket holds within its default
            // receive buffer; the ring itself recycles all TX_SLOTS.
            while sent < total && sent - echoed < 128 {
                let Some(out) = b.tx_buf(0) else { break };
                let msg = format!("d{sent}");
                out[..msg.len()].copy_from_slice(msg.as_bytes());
                b.tx_commit(0, msg.len(), &peer_addr, sent as u32);
                sent += 1;
            }
            b.flush(&mut h).unwrap();
            // Echo what the peer got back to the ring's socket.
            peer.set_nonblocking(true).unwrap();
            while let Ok((n, from)) = peer.recv_from(&mut buf) {
                assert_eq!(from, local);
                peer.send_to(&buf[..n], local).unwrap();
                echoed += 1;
            }
            b.poll(Duration::from_millis(1), &mut h).unwrap();
        }
        let t = Instant::now() + Duration::from_secs(5);
        while h.got.len() < total && Instant::now() < t {
            b.poll(Duration::from_millis(10), &mut h).unwrap();
        }
        assert_eq!(
            h.got.len(),
            total,
            "every echo received through the multishot receive"
        );
        assert!(h.failed.is_empty());
        assert_eq!(b.tx_pending(), 0, "every transmit slot completed");
        let mut seen = vec![false; total];
        for (sock, data, from, rx_ns) in &h.got {
            assert_eq!(*sock, 0);
            assert_eq!(*from, Some(peer_addr));
            assert!(rx_ns.is_some(), "kernel timestamp in the control data");
            let i: usize = std::str::from_utf8(&data[1..]).unwrap().parse().unwrap();
            seen[i] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }

    /// Polls with a 5 s timeout; returns how long the sleep lasted.
    fn long_poll(b: &mut UringBackend, h: &mut Collect) -> Duration {
        let start = Instant::now();
        b.poll(Duration::from_secs(5), h).unwrap();
        start.elapsed()
    }

    /// The worker's sleep contract: single replies do not end a sleep
    /// (they are handled in a batch at the deadline); a burst does only on
    /// a cooperative ring (WAKE_BATCH completions); with deferred task
    /// running a wake-up ends it at once and is consumed.
    #[test]
    fn sleeps_until_the_deadline_or_a_full_batch() {
        if !require_uring() {
            return;
        }
        // A daemon-sized receive buffer: the burst below must not overflow it.
        let opts = SocketOptions {
            recv_buffer_bytes: 4 << 20,
            ..SocketOptions::default()
        };
        let (sock, _) = bind_udp("127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let local = sock.local_addr().unwrap().as_socket().unwrap();
        let waker = Waker::new().unwrap();
        let mut b = ring_of(sock, waker.clone());
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut h = Collect::default();

        for i in 0..10u8 {
            peer.send_to(&[i], local).unwrap();
        }
        let start = Instant::now();
        b.poll(Duration::from_millis(150), &mut h).unwrap();
        assert!(
            start.elapsed() >= Duration::from_millis(100),
            "a few replies do not end the sleep"
        );
        assert_eq!(h.got.len(), 10, "but they are all delivered when it ends");

        // A burst arriving during the sleep.
        let burst = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            for i in 0..WAKE_BATCH + 20 {
                peer.send_to(&(i as u32).to_be_bytes(), local).unwrap();
            }
        });
        let start = Instant::now();
        if b.deferred {
            // Deferred task running counts work items (one per socket), not
            // datagrams, towards the batch: the burst waits in the socket
            // until the timeout, and is drained then.
            b.poll(Duration::from_millis(300), &mut h).unwrap();
            assert!(
                start.elapsed() >= Duration::from_millis(250),
                "a burst does not end a deferred sleep"
            );
            assert_eq!(h.got.len(), 10 + WAKE_BATCH + 20, "drained at its end");
        } else {
            b.poll(Duration::from_secs(5), &mut h).unwrap();
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "a full batch ends the sleep"
            );
        }
        burst.join().unwrap();
        b.poll(Duration::from_millis(50), &mut h).unwrap();
        assert_eq!(h.got.len(), 10 + WAKE_BATCH + 20);

        if !b.deferred {
            return; // a cooperative ring's sleep ends at WAKE_BATCH or its timeout
        }
        // A wake-up ends the sleep at once (a command or hand-off must not
        // wait for the deadline) and is consumed; the next ends the next.
        for _ in 0..2 {
            let w = waker.clone();
            let wake = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                w.wake();
            });
            let slept = long_poll(&mut b, &mut h);
            wake.join().unwrap();
            assert!(
                slept >= Duration::from_millis(25) && slept < Duration::from_secs(2),
                "a wake-up ends the sleep: slept {slept:?}"
            );
            assert!(!waker.drain(), "the sleep consumed the wake-up");
        }
        // One that came while the worker was awake ends its next sleep.
        waker.wake();
        let slept = long_poll(&mut b, &mut h);
        assert!(slept < Duration::from_secs(2), "{slept:?}");
    }

    /// More datagrams waiting than there are provided buffers: the drain
    /// hands buffers back between rounds, and a multishot receive that
    /// still runs out (`ENOBUFS`) is re-armed, so every datagram arrives,
    /// once, within a few zero-timeout polls.
    #[test]
    fn drains_more_datagrams_than_provided_buffers() {
        if !require_uring() {
            return;
        }
        let opts = SocketOptions {
            recv_buffer_bytes: 8 << 20,
            ..SocketOptions::default()
        };
        let (sock, _) = bind_udp("127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let local = sock.local_addr().unwrap().as_socket().unwrap();
        let mut b = ring_of(sock, Waker::new().unwrap());
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut h = Collect::default();
        let total = 2 * RX_BUFS + 100;
        for i in 0..total {
            peer.send_to(&(i as u32).to_be_bytes(), local).unwrap();
        }
        let mut polls = 0;
        while h.got.len() < total && polls < 20 {
            b.poll(Duration::ZERO, &mut h).unwrap();
            polls += 1;
        }
        assert_eq!(h.got.len(), total, "after {polls} polls");
        let mut seen = vec![false; total];
        for (_, data, _, _) in &h.got {
            let i = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
            assert!(!seen[i], "datagram {i} delivered twice");
            seen[i] = true;
        }
        if b.deferred {
            // DRAIN_ROUNDS rounds of 32 datagrams per poll.
            assert!(
                polls <= total.div_ceil(DRAIN_ROUNDS * 32) + 2,
                "{polls} polls"
            );
        }
    }

    #[test]
    fn icmp_port_unreachable_is_reported() {
        if !require_uring() {
            return;
        }
        let dead = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (sock, _) =
            bind_udp("127.0.0.1:0".parse().unwrap(), &SocketOptions::default()).unwrap();
        let mut b = ring_of(sock, Waker::new().unwrap());
        let mut h = Collect::default();
        let out = b.tx_buf(0).unwrap();
        out[..4].copy_from_slice(b"ping");
        b.tx_commit(0, 4, &dead, 7);
        // One long sleep: the error pending on the socket ends it, it does
        // not wait for the deadline.
        let slept = long_poll(&mut b, &mut h);
        assert_eq!(h.icmp.len(), 1, "{:?} after {slept:?}", h.icmp);
        if !b.deferred {
            return; // a cooperative ring finds the error in its receive
        }
        assert!(
            slept < Duration::from_secs(2),
            "the error ended the sleep: {slept:?}"
        );
        assert_eq!(h.icmp[0], (dead, b"ping".to_vec()), "destination and quote");
        // And a second error a second sleep.
        let out = b.tx_buf(0).unwrap();
        out[..5].copy_from_slice(b"ping2");
        b.tx_commit(0, 5, &dead, 8);
        let slept = long_poll(&mut b, &mut h);
        assert!(slept < Duration::from_secs(2), "{slept:?}");
        assert_eq!(h.icmp.len(), 2, "{:?}", h.icmp);
    }
}
