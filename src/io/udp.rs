//! Batched UDP on Linux: `recvmmsg`/`sendmmsg` with packet info, kernel
//! receive timestamps and the ICMP error queue, behind a safe API.
//!
//! Ownership: a [`RecvBatch`] or [`SendBatch`] owns every buffer the kernel
//! reads or writes during its system call (payloads, addresses, control
//! messages, iovecs, headers). They are allocated once in `new` and never
//! resized, so the raw pointers written into the headers before each call
//! stay valid for the duration of that call. The headers are rebuilt at every
//! call from `&mut self`, so no pointer outlives the borrow that made it.
//!
//! Never allocates after construction; never blocks unless the socket is
//! blocking; every `unsafe` block states what makes it sound.
//!
//! Callers: the load generator (`tools/loadgen.rs`) and the `mmsg` worker
//! backend.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};

use super::waker::Waker;
use super::{Handler, MAX_SOCKETS};

/// Room for the control messages we ask for on receive: one packet-info
/// record (IPv6's is the larger, 20 bytes) and one `timespec`, each with a
/// 16-byte header and alignment padding, plus slack.
const CMSG_SPACE: usize = 128;

/// Control-message buffer with the alignment `cmsghdr` requires.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct CmsgBuf(pub(crate) [u8; CMSG_SPACE]);

impl Default for CmsgBuf {
    fn default() -> Self {
        CmsgBuf([0; CMSG_SPACE])
    }
}

/// Options applied by [`bind_udp`].
#[derive(Clone, Debug)]
pub struct SocketOptions {
    /// Requested `SO_RCVBUF` in bytes; 0 leaves the kernel default.
    pub recv_buffer_bytes: usize,
    /// Requested `SO_SNDBUF` in bytes; 0 leaves the kernel default.
    pub send_buffer_bytes: usize,
    /// Join a `SO_REUSEPORT` group (one shared port for several workers).
    pub reuse_port: bool,
    /// Set `SO_REUSEADDR`: share a port with another socket that sets it
    /// too (a proxy's, see `share`).
    pub reuse_addr: bool,
    /// Ask for `IP_PKTINFO` / `IPV6_RECVPKTINFO`: the local address each
    /// datagram was sent to, so a reply can leave from it.
    pub pktinfo: bool,
    /// Ask for `SO_TIMESTAMPNS`: the kernel's receive time of each datagram.
    pub timestamps: bool,
    /// Set `IP_RECVERR` / `IPV6_RECVERR`: ICMP errors are queued with the
    /// destination they concern and read with [`read_errors`].
    pub recv_errors: bool,
    /// Send with the Don't Fragment bit and ignore the path-MTU cache
    /// (`IP_PMTUDISC_PROBE`). Keepalives are far below any MTU; with DF set
    /// the kernel numbers IP IDs from a per-socket counter instead of
    /// hashing into its global ID table for every datagram.
    pub dont_fragment: bool,
    pub nonblocking: bool,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            recv_buffer_bytes: 0,
            send_buffer_bytes: 0,
            reuse_port: false,
            reuse_addr: false,
            pktinfo: false,
            timestamps: true,
            recv_errors: true,
            dont_fragment: true,
            nonblocking: true,
        }
    }
}

/// What the kernel granted; buffer sizes as `getsockopt` reports them (the
/// kernel doubles the request to account for its bookkeeping).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketReport {
    pub recv_buffer_bytes: usize,
    pub send_buffer_bytes: usize,
    /// The kernel gave less than asked (raise `net.core.rmem_max`/`wmem_max`
    /// or run with `CAP_NET_ADMIN`, which lets us use `SO_RCVBUFFORCE`).
    pub recv_clamped: bool,
    pub send_clamped: bool,
}

/// Creates a UDP socket bound to `addr` with `opts` applied.
///
/// Buffer sizes are first tried with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE`
/// (which ignore `net.core.rmem_max` but need `CAP_NET_ADMIN`) and then with
/// the plain options; a clamped result is reported, not an error.
pub fn bind_udp(addr: SocketAddr, opts: &SocketOptions) -> io::Result<(Socket, SocketReport)> {
    let domain = Domain::for_address(addr);
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    let fd = socket.as_raw_fd();
    let v6 = addr.is_ipv6();
    if v6 {
        socket.set_only_v6(true)?;
    }
    if opts.reuse_port {
        socket.set_reuse_port(true)?;
    }
    if opts.reuse_addr {
        socket.set_reuse_address(true)?;
    }
    if opts.recv_buffer_bytes > 0 {
        let want = clamp_c_int(opts.recv_buffer_bytes);
        if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, want).is_err() {
            socket.set_recv_buffer_size(opts.recv_buffer_bytes)?;
        }
    }
    if opts.send_buffer_bytes > 0 {
        let want = clamp_c_int(opts.send_buffer_bytes);
        if setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want).is_err() {
            socket.set_send_buffer_size(opts.send_buffer_bytes)?;
        }
    }
    if opts.pktinfo {
        if v6 {
            setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
        } else {
            setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
        }
    }
    if opts.timestamps {
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
    }
    if opts.recv_errors {
        if v6 {
            setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)?;
        } else {
            setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVERR, 1)?;
        }
    }
    if opts.dont_fragment {
        if v6 {
            setsockopt_int(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_PROBE,
            )?;
        } else {
            setsockopt_int(
                fd,
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_PROBE,
            )?;
        }
    }
    socket.set_nonblocking(opts.nonblocking)?;
    socket.bind(&addr.into())?;

    let recv = socket.recv_buffer_size()?;
    let send = socket.send_buffer_size()?;
    let report = SocketReport {
        recv_buffer_bytes: recv,
        send_buffer_bytes: send,
        recv_clamped: opts.recv_buffer_bytes > 0 && recv < opts.recv_buffer_bytes,
        send_clamped: opts.send_buffer_bytes > 0 && send < opts.send_buffer_bytes,
    };
    Ok((socket, report))
}

fn clamp_c_int(n: usize) -> libc::c_int {
    n.min(libc::c_int::MAX as usize) as libc::c_int
}

/// `setsockopt` for an `int`-valued option.
pub fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` lives on this stack frame for the whole call and its
    // exact size is passed; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Writes `addr` into `out` as a C socket address; returns its length.
pub fn sockaddr_from_std(addr: &SocketAddr, out: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned
            // for every sockaddr_* type (that is its purpose), and `out` is a
            // valid, exclusive reference.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((out as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Reads a C socket address written by the kernel; `None` for families
/// other than IPv4/IPv6 or a length too short for the family.
pub fn sockaddr_to_std(
    storage: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    let len = len as usize;
    match storage.ss_family as libc::c_int {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, the
            // length covers it, and sockaddr_storage is aligned for it.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// One received datagram, borrowed from its [`RecvBatch`].
#[derive(Clone, Copy, Debug)]
pub struct Datagram<'a> {
    pub data: &'a [u8],
    /// The sender; `None` if the kernel gave an address we do not handle.
    pub from: Option<SocketAddr>,
    /// The local address the datagram was sent to (needs `pktinfo`).
    pub to: Option<IpAddr>,
    /// Kernel receive time, CLOCK_REALTIME ns (needs `timestamps`).
    pub rx_ns: Option<u64>,
    /// The datagram was longer than the buffer and was cut.
    pub truncated: bool,
}

/// Preallocated state for receiving up to `capacity` datagrams per call.
pub struct RecvBatch {
    buf_len: usize,
    bufs: Box<[u8]>,
    names: Box<[libc::sockaddr_storage]>,
    cmsgs: Box<[CmsgBuf]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    /// Datagrams filled by the last `recv`.
    len: usize,
}

// SAFETY: the raw pointers inside `iovs` and `hdrs` only ever point into this
// struct's own heap buffers and are rewritten before every system call; they
// are never dereferenced by Rust code, so moving the batch to another thread
// moves everything they point to along with it.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// `capacity` datagrams of at most `buf_len` bytes each.
    pub fn new(capacity: usize, buf_len: usize) -> RecvBatch {
        assert!(capacity > 0 && buf_len > 0);
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for
        // which all-zero bytes are a valid value.
        let (names, iovs, hdrs) = unsafe {
            (
                vec![zeroed::<libc::sockaddr_storage>(); capacity].into_boxed_slice(),
                vec![zeroed::<libc::iovec>(); capacity].into_boxed_slice(),
                vec![zeroed::<libc::mmsghdr>(); capacity].into_boxed_slice(),
            )
        };
        RecvBatch {
            buf_len,
            bufs: vec![0u8; capacity * buf_len].into_boxed_slice(),
            names,
            cmsgs: vec![CmsgBuf([0; CMSG_SPACE]); capacity].into_boxed_slice(),
            iovs,
            hdrs,
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Number of datagrams the last `recv` filled.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One `recvmmsg` call. On a non-blocking socket with nothing queued it
    /// returns `Ok(0)`. An error (such as a pending ICMP error reported by
    /// `IP_RECVERR`) is returned as is; the caller drains [`read_errors`].
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.len = 0;
        let capacity = self.capacity();
        for i in 0..capacity {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i * self.buf_len..].as_mut_ptr().cast(),
                iov_len: self.buf_len,
            };
            let hdr = &mut self.hdrs[i].msg_hdr;
            hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.cmsgs[i].0.as_mut_ptr().cast();
            hdr.msg_controllen = CMSG_SPACE;
            hdr.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points into buffers owned by `self` that
        // outlive this call (they are only freed with `self`, which is
        // mutably borrowed here), with lengths matching their allocations.
        let rc = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                capacity as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(err);
        }
        self.len = rc as usize;
        Ok(self.len)
    }

    /// The `i`-th datagram of the last `recv` (`i < len()`).
    pub fn get(&self, i: usize) -> Datagram<'_> {
        assert!(i < self.len, "datagram {i} of {}", self.len);
        let hdr = &self.hdrs[i];
        let data_len = (hdr.msg_len as usize).min(self.buf_len);
        let data = &self.bufs[i * self.buf_len..i * self.buf_len + data_len];
        let from = sockaddr_to_std(&self.names[i], hdr.msg_hdr.msg_namelen);
        let (to, rx_ns) = parse_cmsgs(&hdr.msg_hdr);
        Datagram {
            data,
            from,
            to,
            rx_ns,
            truncated: hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        }
    }
}

/// Extracts packet info and the receive timestamp from a received header.
fn parse_cmsgs(msg: &libc::msghdr) -> (Option<IpAddr>, Option<u64>) {
    if msg.msg_control.is_null() || msg.msg_controllen == 0 {
        return (None, None);
    }
    // SAFETY: after a successful receive, msg_control points into the
    // batch's own CmsgBuf and msg_controllen (never more than CMSG_SPACE,
    // the length we passed in) is how much the kernel wrote there.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            msg.msg_control.cast::<u8>(),
            msg.msg_controllen.min(CMSG_SPACE),
        )
    };
    parse_control(bytes)
}

/// Walks a control-message buffer as the kernel lays it out (`cmsghdr`:
/// `size_t len, int level, int type`, data 8-aligned) and extracts packet
/// info and the `SO_TIMESTAMPNS` receive time. Safe code over bytes, shared
/// by the mmsg and io_uring receive paths; malformed lengths end the walk.
pub fn parse_control(bytes: &[u8]) -> (Option<IpAddr>, Option<u64>) {
    const HDR: usize = size_of::<libc::cmsghdr>();
    let align = |n: usize| (n + size_of::<usize>() - 1) & !(size_of::<usize>() - 1);
    let word = |b: &[u8], at: usize| i32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let mut to = None;
    let mut rx_ns = None;
    let mut at = 0;
    while at + HDR <= bytes.len() {
        let len = usize::from_ne_bytes(
            bytes[at..at + size_of::<usize>()]
                .try_into()
                .expect("usize"),
        );
        if len < HDR || at + len > bytes.len() {
            break;
        }
        let level = word(bytes, at + size_of::<usize>());
        let kind = word(bytes, at + size_of::<usize>() + 4);
        let data = &bytes[at + align(HDR)..at + len];
        match (level, kind) {
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) if data.len() >= 16 => {
                let sec = i64::from_ne_bytes(data[..8].try_into().expect("8 bytes"));
                let nsec = i64::from_ne_bytes(data[8..16].try_into().expect("8 bytes"));
                rx_ns = Some(sec as u64 * 1_000_000_000 + nsec as u64);
            }
            (libc::IPPROTO_IP, libc::IP_PKTINFO) if data.len() >= 12 => {
                // struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
                let o: [u8; 4] = data[8..12].try_into().expect("4 bytes");
                to = Some(IpAddr::V4(Ipv4Addr::from(o)));
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) if data.len() >= 16 => {
                let o: [u8; 16] = data[..16].try_into().expect("16 bytes");
                to = Some(IpAddr::V6(Ipv6Addr::from(o)));
            }
            _ => {}
        }
        at += align(len);
    }
    (to, rx_ns)
}

/// A socket address as raw `sockaddr_in`/`sockaddr_in6` bytes (as io_uring
/// hands them back), parsed without casting.
pub fn sockaddr_from_bytes(b: &[u8]) -> Option<SocketAddr> {
    if b.len() < 2 {
        return None;
    }
    let family = u16::from_ne_bytes([b[0], b[1]]) as libc::c_int;
    match family {
        libc::AF_INET if b.len() >= 8 => {
            let port = u16::from_be_bytes([b[2], b[3]]);
            let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        libc::AF_INET6 if b.len() >= 28 => {
            let port = u16::from_be_bytes([b[2], b[3]]);
            let flowinfo = u32::from_ne_bytes(b[4..8].try_into().ok()?);
            let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&b[8..24]).ok()?);
            let scope = u32::from_ne_bytes(b[24..28].try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(ip, port, flowinfo, scope)))
        }
        _ => None,
    }
}

/// Outcome of [`SendBatch::send`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendOutcome {
    /// Datagrams the kernel accepted.
    pub sent: usize,
    /// Datagrams refused with an error other than "would block"; the error of
    /// each is reported through the callback given to `send`.
    pub failed: usize,
    /// Datagrams left queued because the socket buffer is full.
    pub blocked: usize,
}

/// Preallocated state for sending up to `capacity` datagrams per call.
///
/// Fill with [`SendBatch::next_buf`] + [`SendBatch::commit`], then
/// [`SendBatch::send`]. Each datagram may name its source address
/// (`IP_PKTINFO`), which is how a responder bound to 0.0.0.0 answers from the
/// exact address that was pinged.
pub struct SendBatch {
    buf_len: usize,
    bufs: Box<[u8]>,
    lens: Box<[usize]>,
    dests: Box<[libc::sockaddr_storage]>,
    dest_lens: Box<[libc::socklen_t]>,
    cmsgs: Box<[CmsgBuf]>,
    cmsg_lens: Box<[usize]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    /// Committed datagrams; `[head, len)` are still to be sent.
    len: usize,
    head: usize,
    /// [`SendBatch::with_source`]: every control buffer already names the
    /// source, and this is its length (0: none).
    source_len: usize,
}

// SAFETY: as for RecvBatch: the pointers in `iovs`/`hdrs` point only into
// this struct's own heap buffers and are rewritten before every call.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new(capacity: usize, buf_len: usize) -> SendBatch {
        assert!(capacity > 0 && buf_len > 0);
        // SAFETY: plain C structs for which all-zero bytes are valid.
        let (dests, iovs, hdrs) = unsafe {
            (
                vec![zeroed::<libc::sockaddr_storage>(); capacity].into_boxed_slice(),
                vec![zeroed::<libc::iovec>(); capacity].into_boxed_slice(),
                vec![zeroed::<libc::mmsghdr>(); capacity].into_boxed_slice(),
            )
        };
        SendBatch {
            buf_len,
            bufs: vec![0u8; capacity * buf_len].into_boxed_slice(),
            lens: vec![0; capacity].into_boxed_slice(),
            dests,
            dest_lens: vec![0; capacity].into_boxed_slice(),
            cmsgs: vec![CmsgBuf([0; CMSG_SPACE]); capacity].into_boxed_slice(),
            cmsg_lens: vec![0; capacity].into_boxed_slice(),
            iovs,
            hdrs,
            len: 0,
            head: 0,
            source_len: 0,
        }
    }

    /// A batch whose every datagram leaves from `src` (a socket sharing a
    /// proxy's port): the control messages are written once, here, not
    /// per datagram. Commit with `src = None`.
    pub fn with_source(capacity: usize, buf_len: usize, src: IpAddr) -> SendBatch {
        let mut b = SendBatch::new(capacity, buf_len);
        for c in b.cmsgs.iter_mut() {
            b.source_len = write_src_cmsg(c, src);
        }
        b
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Datagrams committed and not yet sent.
    pub fn pending(&self) -> usize {
        self.len - self.head
    }

    pub fn is_full(&self) -> bool {
        self.len == self.capacity()
    }

    /// The buffer the next datagram is written into, or `None` when the
    /// batch is full (send it first).
    pub fn next_buf(&mut self) -> Option<&mut [u8]> {
        if self.is_full() {
            return None;
        }
        let start = self.len * self.buf_len;
        Some(&mut self.bufs[start..start + self.buf_len])
    }

    /// Commits the datagram written into `next_buf()`: `len` bytes to `dest`,
    /// leaving from `src` if given (must be a local address of `dest`'s family).
    pub fn commit(&mut self, len: usize, dest: &SocketAddr, src: Option<IpAddr>) {
        assert!(!self.is_full(), "commit on a full SendBatch");
        assert!(
            len <= self.buf_len,
            "datagram of {len} bytes > buffer {}",
            self.buf_len
        );
        let i = self.len;
        self.lens[i] = len;
        self.dest_lens[i] = sockaddr_from_std(dest, &mut self.dests[i]);
        debug_assert!(
            src.is_none() || self.source_len == 0,
            "a per-datagram source on a batch with a fixed one"
        );
        self.cmsg_lens[i] = match src {
            None => self.source_len,
            Some(ip) => write_src_cmsg(&mut self.cmsgs[i], ip),
        };
        self.len += 1;
    }

    /// Copies `data` into the batch and commits it. Returns false when full.
    pub fn push(&mut self, data: &[u8], dest: &SocketAddr, src: Option<IpAddr>) -> bool {
        match self.next_buf() {
            Some(buf) if data.len() <= buf.len() => {
                buf[..data.len()].copy_from_slice(data);
                self.commit(data.len(), dest, src);
                true
            }
            _ => false,
        }
    }

    /// Sends everything committed with as few `sendmmsg` calls as the kernel
    /// allows. A datagram the kernel refuses is skipped and reported through
    /// `on_error(index_in_batch, error)`; one refused because an earlier ICMP
    /// error was pending on the socket (`IP_RECVERR` reports it on the next
    /// send) is retried once. On "would block" the rest stays queued for the
    /// next call. The batch is empty again when `pending() == 0`.
    pub fn send(&mut self, fd: RawFd, mut on_error: impl FnMut(usize, io::Error)) -> SendOutcome {
        let mut out = SendOutcome::default();
        let (mut retried_at, mut retries) = (usize::MAX, 0u8);
        while self.head < self.len {
            let n = self.len - self.head;
            for i in self.head..self.len {
                let start = i * self.buf_len;
                self.iovs[i] = libc::iovec {
                    iov_base: self.bufs[start..].as_mut_ptr().cast(),
                    iov_len: self.lens[i],
                };
                let hdr = &mut self.hdrs[i].msg_hdr;
                hdr.msg_name = (&mut self.dests[i] as *mut libc::sockaddr_storage).cast();
                hdr.msg_namelen = self.dest_lens[i];
                hdr.msg_iov = &mut self.iovs[i];
                hdr.msg_iovlen = 1;
                if self.cmsg_lens[i] == 0 {
                    hdr.msg_control = std::ptr::null_mut();
                    hdr.msg_controllen = 0;
                } else {
                    hdr.msg_control = self.cmsgs[i].0.as_mut_ptr().cast();
                    hdr.msg_controllen = self.cmsg_lens[i];
                }
                hdr.msg_flags = 0;
            }
            // SAFETY: headers [head, len) point into buffers owned by `self`
            // (mutably borrowed for the call) with lengths within their
            // allocations; the kernel only reads them.
            let rc = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[self.head..].as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if rc > 0 {
                self.head += rc as usize;
                out.sent += rc as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock {
                break;
            }
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if is_async_icmp_error(&err) {
                if retried_at != self.head {
                    (retried_at, retries) = (self.head, 0);
                }
                if retries < ICMP_RESENDS {
                    // The error belongs to an earlier datagram (the kernel
                    // reports a queued ICMP error on the next send and
                    // clears it): this one was not sent; send it again.
                    retries += 1;
                    continue;
                }
            }
            on_error(self.head, err);
            out.failed += 1;
            self.head += 1;
        }
        out.blocked = self.len - self.head;
        if self.head == self.len {
            self.head = 0;
            self.len = 0;
        }
        out
    }

    /// Drops everything still queued.
    pub fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }
}

/// How many times a datagram is sent again when its send reports an
/// earlier datagram's ICMP error. With many dead contacts the errors come
/// close together (seen: a live contact's ping failing on its one resend,
/// charged to it as a miss, while 100 dead contacts drew errors).
pub(crate) const ICMP_RESENDS: u8 = 4;

fn is_async_icmp_error(err: &io::Error) -> bool {
    err.raw_os_error().is_some_and(is_async_icmp)
}

/// Whether a send's errno is an earlier datagram's ICMP error the kernel
/// reported on it (IP_RECVERR), not this datagram's own failure.
pub(crate) fn is_async_icmp(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN
    )
}

/// Writes an `IP_PKTINFO`/`IPV6_PKTINFO` control message naming `src` as the
/// source address; returns the control length.
pub(crate) fn write_src_cmsg(buf: &mut CmsgBuf, src: IpAddr) -> usize {
    buf.0.fill(0);
    // SAFETY: a msghdr whose control buffer is `buf` (CMSG_SPACE bytes,
    // 8-aligned) is built on the stack only to drive the CMSG_* macros;
    // CMSG_SPACE of either pktinfo struct (at most 40 bytes) fits, so
    // CMSG_FIRSTHDR is non-null and the writes stay inside `buf`.
    unsafe {
        let mut msg: libc::msghdr = zeroed();
        msg.msg_control = buf.0.as_mut_ptr().cast();
        msg.msg_controllen = CMSG_SPACE;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        debug_assert!(!cmsg.is_null());
        match src {
            IpAddr::V4(ip) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(ip.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
                libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize
            }
            IpAddr::V6(ip) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
                libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) as usize
            }
        }
    }
}

/// Sleeps until one of `fds` is readable (or has an error pending) or
/// `timeout` passes; returns a bitmask of the ready descriptors (bit i for
/// `fds[i]`, at most 64). An interrupted wait returns 0.
pub fn wait_readable(fds: &[RawFd], timeout: std::time::Duration) -> io::Result<u64> {
    assert!(
        fds.len() <= 64,
        "wait_readable takes at most 64 descriptors"
    );
    let mut with_events = [(-1, 0i16); 64];
    for (w, &fd) in with_events.iter_mut().zip(fds) {
        *w = (fd, libc::POLLIN);
    }
    wait_fds(&with_events[..fds.len()], timeout)
}

/// A worker's sleep (both backends): until `timeout`, a wake-up of
/// `waker` (consumed), or an error pending on a socket, whose ICMP errors
/// are then read and handed to `h`. Sockets are polled for errors only:
/// datagrams wait in the socket buffer until the caller drains them, so
/// replies are handled in a batch at the deadline while a command, a
/// hand-off or an ICMP error is handled at once.
pub fn sleep_until_woken(
    sockets: &[Socket],
    waker: &Waker,
    timeout: std::time::Duration,
    h: &mut dyn Handler,
) -> io::Result<()> {
    let n = sockets.len();
    assert!(n <= MAX_SOCKETS, "{n} sockets");
    let mut fds = [(-1, 0i16); MAX_SOCKETS + 1];
    for (f, s) in fds.iter_mut().zip(sockets) {
        *f = (s.as_raw_fd(), 0);
    }
    fds[n] = (waker.as_raw_fd(), libc::POLLIN);
    let ready = wait_fds(&fds[..n + 1], timeout)?;
    if ready & (1 << n) != 0 {
        waker.drain();
    }
    for (i, &(fd, _)) in fds[..n].iter().enumerate() {
        if ready & (1 << i) != 0 {
            read_errors(fd, ERRORS_PER_WAKE, |e| h.icmp(e));
        }
    }
    Ok(())
}

/// ICMP errors read per socket when an error ends a sleep.
const ERRORS_PER_WAKE: usize = 64;

/// `recvmmsg` calls per socket per [`drain_socket`], so sends are never
/// starved.
pub const RX_ROUNDS: usize = 16;
/// ICMP errors read per failed receive in [`drain_socket`].
const ERRORS_PER_RECEIVE: usize = 64;

/// Receives what socket `sock` (descriptor `fd`) holds with up to
/// [`RX_ROUNDS`] `recvmmsg` calls into `rx`, handing each batch to `h`;
/// returns how many datagrams were delivered. A call that fails on a
/// pending ICMP error (`IP_RECVERR` reports one on the next receive, and
/// again while the error queue holds more) reads the errors and goes on,
/// so a flood of errors delays the datagrams queued behind it by a few
/// system calls, never by a poll. The mmsg backend's receive path, and the
/// io_uring backend's after such an error ended its multishot receive.
pub fn drain_socket(rx: &mut RecvBatch, sock: usize, fd: RawFd, h: &mut dyn Handler) -> usize {
    let mut delivered = 0;
    for _ in 0..RX_ROUNDS {
        match rx.recv(fd) {
            Ok(0) => break,
            Ok(n) => {
                for i in 0..n {
                    h.datagram(sock, &rx.get(i));
                }
                h.end_batch();
                delivered += n;
                if n < rx.capacity() {
                    break;
                }
            }
            Err(_) => {
                // A pending ICMP error (IP_RECVERR) is reported by the
                // receive call; its details are on the error queue.
                read_errors(fd, ERRORS_PER_RECEIVE, |e| h.icmp(e));
            }
        }
    }
    delivered
}

/// `ppoll` over `(fd, events)` pairs (at most 64): sleeps until one has
/// `events` or an error/hang-up (always reported), or `timeout` passes.
/// Returns the bitmask of descriptors with anything to report; an
/// interrupted wait returns 0.
pub fn wait_fds(fds: &[(RawFd, i16)], timeout: std::time::Duration) -> io::Result<u64> {
    assert!(fds.len() <= 64, "wait_fds takes at most 64 descriptors");
    let mut polls = [libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    }; 64];
    for (p, &(fd, events)) in polls.iter_mut().zip(fds) {
        *p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
    }
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the first fds.len() entries of `polls` are initialised and
    // `ts` is valid; both live across the call.
    let rc = unsafe {
        libc::ppoll(
            polls.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(err)
        };
    }
    let mut ready = 0u64;
    for (i, p) in polls[..fds.len()].iter().enumerate() {
        if p.revents != 0 {
            ready |= 1 << i;
        }
    }
    Ok(ready)
}

/// One ICMP error read from a socket's error queue, with the part of the
/// offending datagram the ICMP message quoted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError<'a> {
    /// The destination of the datagram that provoked it.
    pub dest: SocketAddr,
    /// errno-style cause (ECONNREFUSED for port unreachable, EHOSTUNREACH...).
    pub errno: i32,
    /// An ICMPv6 message (`SO_EE_ORIGIN_ICMP6`), else ICMPv4.
    pub icmp6: bool,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// The UDP payload of the offending datagram as far as the ICMP message
    /// quoted it: Linux quotes up to 576 bytes of IPv4 (RFC 1812 §4.3.2.3)
    /// and up to the 1280-byte minimum MTU of IPv6 (RFC 4443 §2.4), so a
    /// kaping request arrives with its first lines; an RFC 792 router quotes
    /// only the 8-byte UDP header, which leaves this empty. Cut to
    /// [`QUOTE_MAX`]. Untrusted: anyone can send an ICMP error quoting
    /// anything.
    pub quote: &'a [u8],
}

/// ICMPv4 Destination Unreachable (RFC 792) and its Fragmentation Needed code.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// ICMPv6 Destination Unreachable (RFC 4443 §3.1).
const ICMP6_DST_UNREACH: u8 = 1;

impl IcmpError<'_> {
    /// Whether the datagram could not be delivered to its destination: an
    /// ICMPv4 Destination Unreachable other than Fragmentation Needed (a
    /// path-MTU signal, not the contact's absence), or any ICMPv6
    /// Destination Unreachable. Port unreachable (nothing listens: the phone
    /// is gone), host and network unreachable, administratively prohibited.
    /// Time Exceeded, Parameter Problem and Packet Too Big are not.
    pub fn is_unreachable(&self) -> bool {
        if self.icmp6 {
            self.icmp_type == ICMP6_DST_UNREACH
        } else {
            self.icmp_type == ICMP_DEST_UNREACH && self.icmp_code != ICMP_FRAG_NEEDED
        }
    }
}

/// Bytes of an error's quote kept ([`IcmpError::quote`]): any datagram a
/// worker sends fits, so no quote the kernel hands back is ever cut by us.
pub const QUOTE_MAX: usize = super::TX_DATAGRAM_MAX;

/// Drains up to `limit` entries of the socket's error queue
/// (`MSG_ERRQUEUE`, filled when `recv_errors` is set), calling `f` for each
/// ICMP error; returns how many entries were read. The quote is read into
/// a stack buffer of [`QUOTE_MAX`] bytes: no allocation.
pub fn read_errors(fd: RawFd, limit: usize, mut f: impl FnMut(&IcmpError<'_>)) -> usize {
    let mut read = 0;
    let mut payload = [0u8; QUOTE_MAX];
    while read < limit {
        // SAFETY: plain C structs, valid when zeroed.
        let mut name: libc::sockaddr_storage = unsafe { zeroed() };
        let mut cbuf = CmsgBuf([0; CMSG_SPACE]);
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = CMSG_SPACE;
        // SAFETY: every pointer in `msg` refers to a local that outlives the
        // call, with its true length.
        let rc = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if rc < 0 {
            break;
        }
        read += 1;
        let Some(dest) = sockaddr_to_std(&name, msg.msg_namelen) else {
            continue;
        };
        // recvmsg returns the bytes copied (at most the buffer; MSG_TRUNC in
        // msg_flags says the quote was longer).
        let quote = &payload[..(rc as usize).min(QUOTE_MAX)];
        // SAFETY: the kernel filled msg_control/msg_controllen in the call
        // above; the CMSG walk stays inside `cbuf`; IP_RECVERR/IPV6_RECVERR
        // payloads start with a sock_extended_err, read unaligned.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                let c = &*cmsg;
                let is_err = (c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_RECVERR)
                    || (c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_RECVERR);
                if is_err {
                    let ee = std::ptr::read_unaligned(
                        libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>(),
                    );
                    if ee.ee_origin == libc::SO_EE_ORIGIN_ICMP
                        || ee.ee_origin == libc::SO_EE_ORIGIN_ICMP6
                    {
                        f(&IcmpError {
                            dest,
                            errno: ee.ee_errno as i32,
                            icmp6: ee.ee_origin == libc::SO_EE_ORIGIN_ICMP6,
                            icmp_type: ee.ee_type,
                            icmp_code: ee.ee_code,
                            quote,
                        });
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn loopback(v6: bool) -> SocketAddr {
        if v6 {
            "[::1]:0".parse().unwrap()
        } else {
            "127.0.0.1:0".parse().unwrap()
        }
    }

    /// An owned copy of a received datagram.
    struct Got {
        data: Vec<u8>,
        from: Option<SocketAddr>,
        to: Option<IpAddr>,
        rx_ns: Option<u64>,
        truncated: bool,
    }

    fn recv_until(batch: &mut RecvBatch, fd: RawFd, want: usize) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.len() < want && Instant::now() < deadline {
            let n = batch.recv(fd).unwrap();
            for i in 0..n {
                let d = batch.get(i);
                got.push(Got {
                    data: d.data.to_vec(),
                    from: d.from,
                    to: d.to,
                    rx_ns: d.rx_ns,
                    truncated: d.truncated,
                });
            }
            if n == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        got
    }

    fn round_trip(v6: bool) {
        let opts = SocketOptions {
            pktinfo: true,
            ..SocketOptions::default()
        };
        let (rx, _) = bind_udp(loopback(v6), &opts).unwrap();
        let (tx, _) = bind_udp(loopback(v6), &opts).unwrap();
        let rx_addr = rx.local_addr().unwrap().as_socket().unwrap();
        let tx_addr = tx.local_addr().unwrap().as_socket().unwrap();

        let mut send = SendBatch::new(16, 512);
        for i in 0..40u32 {
            if send.is_full() {
                let out = send.send(tx.as_raw_fd(), |i, e| panic!("send {i}: {e}"));
                assert_eq!(out.failed, 0);
            }
            let payload = format!("datagram {i}");
            assert!(send.push(payload.as_bytes(), &rx_addr, None));
        }
        send.send(tx.as_raw_fd(), |i, e| panic!("send {i}: {e}"));
        assert_eq!(send.pending(), 0);

        let mut batch = RecvBatch::new(8, 512);
        let got = recv_until(&mut batch, rx.as_raw_fd(), 40);
        assert_eq!(got.len(), 40);
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        for (i, d) in got.iter().enumerate() {
            assert_eq!(d.data, format!("datagram {i}").as_bytes());
            assert_eq!(d.from, Some(tx_addr));
            assert_eq!(d.to, Some(rx_addr.ip()), "pktinfo destination");
            let rx_ns = d.rx_ns.expect("kernel timestamp");
            assert!(
                rx_ns <= before && before - rx_ns < 10_000_000_000,
                "timestamp {rx_ns} vs {before}"
            );
            assert!(!d.truncated);
        }
    }

    #[test]
    fn batches_round_trip_ipv4() {
        round_trip(false);
    }

    #[test]
    fn batches_round_trip_ipv6() {
        if std::net::UdpSocket::bind("[::1]:0").is_err() {
            eprintln!("SKIP: no IPv6 loopback on this machine");
            return;
        }
        round_trip(true);
    }

    #[test]
    fn source_address_is_chosen_per_datagram() {
        // A responder bound to 0.0.0.0 answers from the address that was
        // pinged: the whole 127/8 is local, so any 127.x.y.z is a valid source.
        let opts = SocketOptions {
            pktinfo: true,
            ..SocketOptions::default()
        };
        let (rx, _) = bind_udp(loopback(false), &opts).unwrap();
        let (tx, _) = bind_udp("0.0.0.0:0".parse().unwrap(), &opts).unwrap();
        let rx_addr = rx.local_addr().unwrap().as_socket().unwrap();
        let tx_port = tx.local_addr().unwrap().as_socket().unwrap().port();
        let mut send = SendBatch::new(4, 64);
        let sources: [Ipv4Addr; 3] = [
            [127, 0, 0, 9].into(),
            [127, 1, 2, 3].into(),
            [127, 200, 0, 1].into(),
        ];
        for s in sources {
            assert!(send.push(b"x", &rx_addr, Some(IpAddr::V4(s))));
        }
        let out = send.send(tx.as_raw_fd(), |i, e| panic!("send {i}: {e}"));
        assert_eq!(out.sent, 3);
        let mut batch = RecvBatch::new(4, 64);
        let got = recv_until(&mut batch, rx.as_raw_fd(), 3);
        let froms: Vec<_> = got.iter().map(|d| d.from.unwrap()).collect();
        for (s, from) in sources.iter().zip(froms) {
            assert_eq!(from, SocketAddr::new(IpAddr::V4(*s), tx_port));
        }
    }

    #[test]
    fn oversized_datagram_is_flagged_truncated() {
        let (rx, _) = bind_udp(loopback(false), &SocketOptions::default()).unwrap();
        let (tx, _) = bind_udp(loopback(false), &SocketOptions::default()).unwrap();
        let rx_addr = rx.local_addr().unwrap().as_socket().unwrap();
        let mut send = SendBatch::new(1, 2000);
        assert!(send.push(&[b'a'; 1500], &rx_addr, None));
        send.send(tx.as_raw_fd(), |i, e| panic!("send {i}: {e}"));
        let mut batch = RecvBatch::new(1, 100);
        let got = recv_until(&mut batch, rx.as_raw_fd(), 1);
        assert_eq!(got[0].data.len(), 100);
        assert!(got[0].truncated);
    }

    /// What `read_errors` reported, owned.
    #[derive(Debug)]
    struct Seen {
        dest: SocketAddr,
        errno: i32,
        icmp6: bool,
        kind: (u8, u8),
        unreachable: bool,
        quote: Vec<u8>,
    }

    /// Sends `payload` to a port nobody listens on and returns the errors
    /// read back from the sender's error queue.
    fn provoke_port_unreachable(v6: bool, payload: &[u8]) -> (SocketAddr, Vec<Seen>) {
        // A port nobody listens on: bind one, learn its number, close it.
        let dead = {
            let s = std::net::UdpSocket::bind(loopback(v6)).unwrap();
            s.local_addr().unwrap()
        };
        let (tx, _) = bind_udp(loopback(v6), &SocketOptions::default()).unwrap();
        let mut send = SendBatch::new(1, 2048);
        assert!(send.push(payload, &dead, None));
        send.send(tx.as_raw_fd(), |_, _| {});
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while seen.is_empty() && Instant::now() < deadline {
            read_errors(tx.as_raw_fd(), 8, |e| {
                seen.push(Seen {
                    dest: e.dest,
                    errno: e.errno,
                    icmp6: e.icmp6,
                    kind: (e.icmp_type, e.icmp_code),
                    unreachable: e.is_unreachable(),
                    quote: e.quote.to_vec(),
                })
            });
            std::thread::sleep(Duration::from_millis(1));
        }
        (dead, seen)
    }

    #[test]
    fn port_unreachable_is_read_from_the_error_queue() {
        let (dead, seen) = provoke_port_unreachable(false, b"ping");
        assert_eq!(seen.len(), 1, "one ICMP port unreachable: {seen:?}");
        assert_eq!(seen[0].dest, dead);
        assert_eq!(seen[0].errno, libc::ECONNREFUSED);
        assert_eq!(seen[0].kind, (3, 3), "ICMP dest unreachable / port");
        assert!(!seen[0].icmp6 && seen[0].unreachable);
        assert_eq!(seen[0].quote, b"ping", "the quoted UDP payload");
    }

    #[test]
    fn the_quote_holds_a_requests_first_hundreds_of_bytes() {
        // A 1,000-byte datagram. An ICMPv4 error is at most 576 bytes: its
        // own IP (20) and ICMP (8) headers, the quoted IP (20) and UDP (8)
        // headers, then at most 520 bytes of payload. ICMPv6 errors may
        // fill the 1280-byte minimum MTU, so the whole datagram comes back.
        let payload: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let (_, seen) = provoke_port_unreachable(false, &payload);
        assert_eq!(seen.len(), 1, "{seen:?}");
        let q = &seen[0].quote;
        assert!(
            q.len() >= 500 && q.len() < payload.len(),
            "IPv4 quote {} bytes",
            q.len()
        );
        assert_eq!(q[..], payload[..q.len()]);
        let (dead6, seen6) = provoke_port_unreachable(true, &payload);
        assert_eq!(seen6.len(), 1, "{seen6:?}");
        assert_eq!(seen6[0].dest, dead6);
        assert!(seen6[0].icmp6 && seen6[0].unreachable);
        assert_eq!(seen6[0].kind, (1, 4), "ICMPv6 dest unreachable / port");
        assert_eq!(seen6[0].quote, payload, "IPv6 quotes the whole datagram");
    }

    #[test]
    fn only_destination_unreachable_counts_as_unreachable() {
        let e = |icmp6, icmp_type, icmp_code| IcmpError {
            dest: "127.0.0.1:1".parse().unwrap(),
            errno: 0,
            icmp6,
            icmp_type,
            icmp_code,
            quote: &[],
        };
        for code in [0, 1, 2, 3, 9, 10, 13] {
            assert!(e(false, 3, code).is_unreachable(), "v4 code {code}");
        }
        assert!(!e(false, 3, 4).is_unreachable(), "fragmentation needed");
        assert!(!e(false, 11, 0).is_unreachable(), "time exceeded");
        assert!(!e(false, 12, 0).is_unreachable(), "parameter problem");
        for code in 0..=6 {
            assert!(e(true, 1, code).is_unreachable(), "v6 code {code}");
        }
        assert!(!e(true, 2, 0).is_unreachable(), "packet too big");
        assert!(!e(true, 3, 0).is_unreachable(), "time exceeded");
        // The same type numbers in the other family mean something else.
        assert!(!e(true, 3, 3).is_unreachable());
        assert!(!e(false, 1, 4).is_unreachable());
    }

    #[test]
    fn pending_icmp_error_does_not_eat_the_next_datagram() {
        let dead = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let (rx, _) = bind_udp(loopback(false), &SocketOptions::default()).unwrap();
        let rx_addr = rx.local_addr().unwrap().as_socket().unwrap();
        let (tx, _) = bind_udp(loopback(false), &SocketOptions::default()).unwrap();
        let mut send = SendBatch::new(4, 16);
        assert!(send.push(b"dead", &dead, None));
        send.send(tx.as_raw_fd(), |_, _| {});
        std::thread::sleep(Duration::from_millis(50)); // let the ICMP error arrive
        assert!(send.push(b"live", &rx_addr, None));
        let mut errors = 0;
        let out = send.send(tx.as_raw_fd(), |_, _| errors += 1);
        assert_eq!((out.sent, errors), (1, 0));
        let mut batch = RecvBatch::new(4, 16);
        let got = recv_until(&mut batch, rx.as_raw_fd(), 1);
        assert_eq!(got[0].data, b"live");
    }

    #[test]
    fn wait_readable_reports_which_socket() {
        let (a, _) = bind_udp(loopback(false), &SocketOptions::default()).unwrap();
        let (b, _) = bind_udp(loopback(false), &SocketOptions::default()).unwrap();
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        let t = Instant::now();
        assert_eq!(wait_readable(&fds, Duration::from_millis(20)).unwrap(), 0);
        assert!(
            t.elapsed() >= Duration::from_millis(15),
            "slept for the timeout"
        );
        let b_addr = b.local_addr().unwrap().as_socket().unwrap();
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .send_to(b"x", b_addr)
            .unwrap();
        assert_eq!(wait_readable(&fds, Duration::from_secs(5)).unwrap(), 0b10);
    }

    #[test]
    fn sockaddr_conversions_round_trip() {
        for s in [
            "127.0.0.1:5060",
            "10.1.2.3:1",
            "[::1]:5062",
            "[2001:db8::42]:65535",
        ] {
            let a: SocketAddr = s.parse().unwrap();
            // SAFETY: sockaddr_storage is a plain C struct, valid when zeroed.
            let mut st: libc::sockaddr_storage = unsafe { zeroed() };
            let len = sockaddr_from_std(&a, &mut st);
            assert_eq!(sockaddr_to_std(&st, len), Some(a));
            // SAFETY: `st` is initialised and `len` bytes of it were written.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&st as *const libc::sockaddr_storage).cast::<u8>(),
                    len as usize,
                )
            };
            assert_eq!(sockaddr_from_bytes(bytes), Some(a));
        }
    }
}
