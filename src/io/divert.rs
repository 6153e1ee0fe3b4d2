//! The "divert" reply path (DESIGN §10): a tc-ingress eBPF classifier that
//! hands kaping's replies to kaping's own UDP socket before the proxy's
//! socket sees them, so the proxy spends nothing per ping.
//!
//! kaping sends its OPTIONS as the proxy (source `P:5060`), so the phone's
//! 200 OK comes back to `P:5060`, where the proxy's exact-bound socket wins
//! the kernel's socket lookup. This module owns a small program, written
//! here as eBPF instructions (no compiler, no loader library: raw `bpf(2)`),
//! that runs on every packet entering the given interfaces, looks for
//! kaping's marker near the start of the UDP payload — `z9hG4bK.` and the
//! 4-character instance prefix that open every kaping Via branch
//! (`wire::token`; RFC 3261 §8.1.1.7: a UAS copies the Via into its
//! response) — and on a hit assigns the packet to kaping's socket with
//! `bpf_sk_assign` (Linux 5.7). The stack then delivers it there as if its
//! own lookup had found that socket.
//!
//! Ownership: a [`Divert`] owns the program (one per link-layer header
//! length among its interfaces), one tcx link per interface and the counter
//! map, all as file descriptors. Dropping it closes them, links first, which
//! detaches the program; a process that dies detaches the same way (bpf_link
//! semantics: nothing is pinned, nothing outlives the process).
//!
//! Callers: the daemon at start when `replies = divert` (attach is the only
//! privileged step), then [`Divert::counters`] for its reports.
//!
//! # Ground rules
//!
//! * The program never drops, redirects or rewrites a packet. Its one side
//!   effect is the socket assignment of a marked reply; every path returns
//!   `TCX_NEXT`, which hands the packet to the next tcx program on the
//!   interface (or the legacy tc filters, or the stack) exactly as if this
//!   one were not there. (`TC_ACT_OK` would mean the same for the packet but
//!   would end the chain: programs attached after ours would never run.)
//! * Anything that is not an exact match goes to the proxy untouched: not
//!   addressed to this host (`pkt_type`), not IPv4/IPv6, IPv4 with options or
//!   fragmented, IPv6 with an extension header, not UDP, not to
//!   `proxy_port`, a payload shorter than the marker, a marker not wholly
//!   inside the first [`WINDOW_LEN`] bytes of the payload, no kaping socket
//!   found, `bpf_sk_assign` refused. IPv6 is not inspected at all when
//!   [`DivertSpec::target6`] is `None`.
//! * A marked reply goes to the socket the kernel's own UDP lookup finds for
//!   (reply source address:port → target address:port). When the target's
//!   address is unspecified, the reply's own destination address is used,
//!   so a wildcard-bound socket or one bound to the proxy's address is
//!   found; a socket bound to another address is not (counted `no_socket`).
//! * If kaping's receive sockets form an `SO_REUSEPORT` group, the group's
//!   selection — including the classic BPF steering of `steer` — runs again
//!   on the assigned packet (`inet_steal_sock`, Linux 6.5), so each reply
//!   still lands on the worker that sent the ping.
//! * The program keeps no state between packets. Besides the socket
//!   assignment, the only thing it writes is the counter map
//!   ([`DivertCounters`]), and only for datagrams to `proxy_port`.
//!
//! # The program
//!
//! `L2` is the interface's link-layer header length (14 for Ethernet and
//! loopback, 0 for layer-3 devices such as tun or WireGuard): at tc ingress
//! the packet data starts at the link-layer header, and `__sk_buff` does not
//! say how long it is, so the length is baked in and one program is loaded
//! per length. `m` is the marker length, `W` = [`WINDOW_LEN`].
//!
//! ```text
//! entry    r6 = skb
//!          skb->pkt_type != PACKET_HOST                          → next
//!          skb->protocol == IPv4 → v4;  == IPv6 → v6 (only with target6);  else → next
//! v4       peek, when data + L2 + 28 <= data_end (headers linear):
//!            byte [L2 + 9] != UDP or half [L2 + 22] != proxy port → next
//!          skb_load_bytes(skb, L2, fp-308, 28) != 0               → next
//!          ver/IHL != 0x45, proto != UDP, MF|offset != 0, dport != proxy port → next
//!          fp-296 .. fp-284 is now saddr daddr sport dport: the lookup tuple;
//!          *(u32 *)(fp-292) = target address (only if specified)
//!          *(u16 *)(fp-286) = target port
//!          r9 = 12 (tuple size), r7 = L2 + 28 (payload offset),
//!          r8 = UDP length (network order)                        → payload
//! v6       the same with 48 bytes copied to fp-304: next header at 6,
//!          dport at 42, tuple fp-296 .. fp-260 (36 bytes), r9 = 36
//! payload  r8 = be16(r8) - 8 (payload length); r8 s< m            → passed
//!          r8 < W                                                 → short
//!          r8 = W;  r0 = skb_load_bytes(skb, r7, fp-256, W)       → loaded
//! short    skb_load_bytes(skb, 0xffffffff, fp-256, W)  (fails: clears the window)
//!          r0 = skb_load_bytes(skb, r7, fp-256, r8)
//! loaded   r0 != 0                                                → passed
//! scan[i]  for i = 0 ..= W - m, each 2m instructions:
//!          byte fp-256+i+k != marker[k], k = 0 .. m-2             → scan[i+1]
//!          byte fp-256+i+m-1 == marker[m-1]                       → hit
//! passed   r9 = PASSED                                            → count
//! hit      r0 = sk_lookup_udp(skb, fp-296, r9, CURRENT_NETNS, 0)
//!          r0 == NULL: r9 = NO_SOCKET                             → count
//!          r8 = r0;  r0 = sk_assign(skb, r8, 0)
//!          r9 = r0 == 0 ? DIVERTED : ASSIGN_FAILED;  sk_release(r8)
//! count    *(u32 *)(fp-304) = r9;  r0 = map_lookup_elem(counters, fp-304)
//!          r0 != NULL: atomic *(u64 *)r0 += 1
//! next     return TCX_NEXT
//! ```
//!
//! The stack frame, 308 of the 512 bytes the verifier allows. The headers
//! are copied so that their address and port fields land on the lookup
//! tuple: IPv4 (RFC 791, no options) and IPv6 (RFC 8200), each followed by
//! UDP (RFC 768), carry source address, destination address, source port
//! and destination port in the order of `struct bpf_sock_tuple` with
//! nothing between them, so the tuple is built in place.
//!
//! ```text
//!  from fp   IPv4 path                       IPv6 path
//!  -308      IPv4 header bytes 0..12
//!  -304      (counter key at -304..-300)     IPv6 header bytes 0..8 (counter key at -304..-300)
//!  -296      tuple: saddr daddr sport dport  tuple: saddr (16) daddr (16) sport dport
//!  -284      UDP length, checksum            (tuple)
//!  -260                                      UDP length, checksum
//!  -256      payload window, W = 256 bytes   payload window
//! ```
//!
//! The scan is unrolled: `W - m + 1` blocks of `2m` instructions, one per
//! start position, about 6,000 instructions in all for a 12-byte marker. A
//! block whose position does not hold the marker's first byte costs two
//! instructions (load, compare); the compare chain goes on only at the
//! marker's first byte, for kaping's a `z`, which in SIP text means a Via
//! branch. A full 256-byte miss is about 500 instructions and two helper
//! calls (headers, window); a packet that is not UDP to the proxy port,
//! with its headers in the linear area, costs 14 instructions and no helper
//! call at all.
//!
//! Measured with `BPF_PROG_TEST_RUN` (`cargo test --lib
//! io::divert::tests::program_cost -- --nocapture`, best of 5 rounds of
//! 100,000 runs, three invocations; 2-vCPU AMD EPYC VM, Linux 6.18, loaded
//! with CAP_BPF and CAP_NET_ADMIN only), less the 31 ns the harness takes
//! to run a program that only returns: TCP, or UDP to another port, 2-4
//! ns; a CRLF keepalive to the proxy about 30 ns; a 200 OK without the
//! marker 170-200 ns; a 120-byte datagram without it (the short path)
//! about 240 ns; a marked reply 155-175 ns up to the lookup (the test run
//! has no socket to find). The proxy spends microseconds on each SIP
//! message it parses.
//!
//! # What the verifier must see
//!
//! * Every stack access is `r10` plus a constant inside the 308-byte frame;
//!   stack pointers passed to helpers are `r10` plus a constant, with a size
//!   the verifier can bound. There are no loops (every jump goes forward,
//!   which `Asm::finish` asserts) and no variable stack offsets, so there is
//!   nothing to prove about an index, and nothing that needs CAP_PERFMON.
//! * The window length passed to `bpf_skb_load_bytes` (an `ARG_CONST_SIZE`)
//!   is the constant `W`, or `r8` in `[m, W - 1]`: the signed `r8 s< m`
//!   check gives the lower bound (a negative length from a lying UDP header
//!   included), `r8 < W` the upper, so the write stays inside the window.
//!   With the constant size the verifier lets the helper fill uninitialized
//!   stack and marks the window written. With a variable size it does not
//!   take the helper's write on trust: the buffer must already be
//!   initialized (unless the loader has CAP_PERFMON), hence the clearing
//!   load on the short path. A failing `bpf_skb_load_bytes` clears its
//!   whole buffer (the `ARG_PTR_TO_UNINIT_MEM` contract: fill every byte or
//!   clear them), and an offset above INT_MAX always fails. At run time the
//!   clearing also means the window past a short payload is zero, never
//!   stale bytes of an earlier packet, and since the marker has no zero
//!   byte it can only match inside the payload: no bound check per start
//!   position.
//! * No instruction stores into stack bytes nothing has written yet: the
//!   helpers fill the header copies and the window, and the few stores
//!   (target address and port, counter key) overwrite copied header bytes.
//!   Without CAP_PERFMON the verifier puts a speculation barrier (Spectre
//!   v4) after every store into a not yet written stack slot: with 32
//!   stores zeroing the window instead of the clearing load, the short
//!   path measured about 400 ns instead of about 270 (290 with
//!   CAP_PERFMON, which removes the barriers).
//! * Header bytes are read only after the helper wrote them (28 or 48
//!   bytes); the peek reads packet data only below the `data_end` bound
//!   its comparison proved.
//! * The lookup tuple is complete (12 or 36 bytes) before the call, and its
//!   size is `r9`, a constant on each path (12 from `v4`, 36 from `v6`).
//!   The tuple is built before the scan, so the hit path needs no family
//!   branch (a branch whose outcome the verifier knows would make it walk
//!   the other side speculatively without CAP_PERFMON, where the other
//!   family's header bytes were never written).
//! * The socket reference from `bpf_sk_lookup_udp` is null-checked before
//!   use and released on the only path that holds it; the map value is
//!   null-checked before the 8-byte atomic add (8-aligned: the value is one
//!   `u64`).
//!
//! The tests load the program for marker lengths 4, 12 and 16, both header
//! lengths and every target form, with CAP_BPF and CAP_NET_ADMIN only, and
//! show the refusal of a program whose short path lets any length through.
//!
//! # Privileges and failure
//!
//! [`Divert::attach`] needs CAP_BPF (map and program) and CAP_NET_ADMIN (a
//! `SCHED_CLS` program, the tcx link) — nothing else, and only while it
//! runs: the descriptors keep everything alive afterwards, so the daemon may
//! drop both capabilities once attached. tcx needs Linux 6.6. On any failure
//! nothing stays attached (what was attached is detached again) and the
//! error says why in one line; the caller falls back to relay (DESIGN §10).

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bytes at the start of the UDP payload searched for the marker. The
/// marker counts only when it lies wholly inside them.
pub const WINDOW_LEN: usize = 256;
/// Shortest marker accepted.
pub const MARKER_LEN_MIN: usize = 4;
/// Longest marker accepted.
pub const MARKER_LEN_MAX: usize = 16;

/// Interfaces, ports and marker of one divert attachment.
#[derive(Clone, Copy, Debug)]
pub struct DivertSpec<'a> {
    /// Interfaces to attach to (ingress), by index in this thread's network
    /// namespace.
    pub ifindexes: &'a [u32],
    /// Destination port of the replies to inspect (the proxy's, 5060).
    pub proxy_port: u16,
    /// kaping's receive socket for IPv4 replies. An unspecified address
    /// (`0.0.0.0` or `[::]`) means the reply's own destination address; a
    /// specified IPv6 address must be IPv4-mapped. The port must not be
    /// `proxy_port` when the address is unspecified (the lookup would find
    /// the proxy's own socket).
    pub target: SocketAddr,
    /// kaping's receive socket for IPv6 replies (unspecified address: the
    /// reply's destination). `None`: IPv6 replies are not inspected.
    pub target6: Option<SocketAddr>,
    /// The marker: `MARKER_LEN_MIN..=MARKER_LEN_MAX` bytes, none of them
    /// zero.
    pub marker: &'a [u8],
}

/// How many datagrams to `proxy_port` ended each way, summed over every
/// interface of one [`Divert`] since it was attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DivertCounters {
    /// Marked replies handed to kaping's socket.
    pub diverted: u64,
    /// Datagrams inspected and left to the proxy: no marker in the window
    /// (or a payload shorter than the marker).
    pub passed: u64,
    /// Marked replies left to the proxy because no socket matched the
    /// lookup (kaping's socket closed, or bound to another address).
    pub no_socket: u64,
    /// Marked replies left to the proxy because `bpf_sk_assign` refused
    /// the socket.
    pub assign_failed: u64,
}

/// Why [`Divert::attach`] failed; `Display` is one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum DivertError {
    #[error("divert settings: {0}")]
    Spec(String),
    #[error("divert needs CAP_BPF and CAP_NET_ADMIN: {op} refused: {err}")]
    Permission {
        op: &'static str,
        #[source]
        err: io::Error,
    },
    #[error(
        "bpf(2) is unavailable (a seccomp profile, or a kernel without CONFIG_BPF_SYSCALL): {0}"
    )]
    Unavailable(#[source] io::Error),
    #[error("the kernel's verifier rejected the divert program ({err}): {log_tail}")]
    Verifier {
        log_tail: String,
        #[source]
        err: io::Error,
    },
    #[error("kernel lacks tcx (Linux 6.6+): attaching to interface {ifindex} failed: {err}")]
    NoTcx {
        ifindex: u32,
        #[source]
        err: io::Error,
    },
    #[error("interface {ifindex}: {reason}")]
    Interface { ifindex: u32, reason: String },
    #[error("no interface divert can attach to: {0}")]
    NoInterface(String),
    #[error("divert: {op}: {err}")]
    Sys {
        op: &'static str,
        #[source]
        err: io::Error,
    },
}

/// An attached divert program. Dropping it detaches it.
#[derive(Debug)]
pub struct Divert {
    // Field order is drop order: the links (which detach the program) go
    // first, then the programs, then the map they use.
    links: Vec<(u32, OwnedFd)>,
    progs: Vec<OwnedFd>,
    counters: OwnedFd,
    skipped: Vec<(u32, String)>,
}

impl Divert {
    /// Validates `spec`, loads the program and attaches it with tcx to the
    /// ingress of every interface in `spec.ifindexes` (after any tcx program
    /// already there). Interfaces whose link type has no known header length
    /// (tunnels other than tun/WireGuard, InfiniBand, CAN, ...) are skipped
    /// and listed by [`Divert::skipped`]; it fails when none is left, or on
    /// any other error, with nothing left attached.
    pub fn attach(spec: &DivertSpec<'_>) -> Result<Divert, DivertError> {
        let plan = Plan::new(spec)?;
        let mut ifindexes = spec.ifindexes.to_vec();
        ifindexes.sort_unstable();
        ifindexes.dedup();
        let mut usable = Vec::new();
        let mut skipped = Vec::new();
        for ifindex in ifindexes {
            let (name, link_type) = link_type(ifindex).map_err(|err| DivertError::Interface {
                ifindex,
                reason: err.to_string(),
            })?;
            match link_header_len(link_type) {
                Some(l2) => usable.push((ifindex, l2)),
                None => skipped.push((
                    ifindex,
                    format!("{name}: link type {link_type} has no known header length"),
                )),
            }
        }
        if usable.is_empty() {
            let why: Vec<String> = skipped.iter().map(|(_, s)| s.clone()).collect();
            return Err(DivertError::NoInterface(why.join("; ")));
        }

        let counters = create_counter_map()?;
        let mut divert = Divert {
            links: Vec::new(),
            progs: Vec::new(),
            counters,
            skipped,
        };
        // One program per link-layer header length, shared by its interfaces.
        let mut prog_of_l2: BTreeMap<u8, usize> = BTreeMap::new();
        for (ifindex, l2) in usable {
            let at = match prog_of_l2.get(&l2) {
                Some(&at) => at,
                None => {
                    let insns = program(&plan, l2, divert.counters.as_raw_fd());
                    divert.progs.push(load_program(&insns)?);
                    prog_of_l2.insert(l2, divert.progs.len() - 1);
                    divert.progs.len() - 1
                }
            };
            // On error `divert` drops here, detaching what was attached.
            let link = link_tcx_ingress(&divert.progs[at], ifindex)?;
            divert.links.push((ifindex, link));
        }
        Ok(divert)
    }

    /// The counters, summed over all interfaces. A counter that cannot be
    /// read (which would be a kernel bug: the map lives as long as `self`)
    /// reads as 0.
    pub fn counters(&self) -> DivertCounters {
        let read = |key: u32| lookup_u64(&self.counters, key).unwrap_or(0);
        DivertCounters {
            diverted: read(COUNTER_DIVERTED),
            passed: read(COUNTER_PASSED),
            no_socket: read(COUNTER_NO_SOCKET),
            assign_failed: read(COUNTER_ASSIGN_FAILED),
        }
    }

    /// The interfaces the program is attached to.
    pub fn attached(&self) -> Vec<u32> {
        self.links.iter().map(|(ifindex, _)| *ifindex).collect()
    }

    /// The interfaces left out, with the reason (for the daemon's log).
    pub fn skipped(&self) -> &[(u32, String)] {
        &self.skipped
    }
}

/// Every interface of this thread's network namespace, as (index, name),
/// ordered by index.
pub fn interface_indexes() -> io::Result<Vec<(u32, String)>> {
    // SAFETY: `if_nameindex` returns a heap array ending with a zero entry,
    // or null with errno set; it asks netlink, so it sees this thread's
    // network namespace.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut at = list;
    loop {
        // SAFETY: `at` walks the array up to and including its zero entry,
        // which ends the walk; each name is a NUL-terminated string owned by
        // the array, copied before the array is freed.
        let entry = unsafe { &*at };
        if entry.if_index == 0 || entry.if_name.is_null() {
            break;
        }
        // SAFETY: see above.
        let name = unsafe { CStr::from_ptr(entry.if_name) };
        out.push((entry.if_index, name.to_string_lossy().into_owned()));
        // SAFETY: the entry was not the terminator, so the next one exists.
        at = unsafe { at.add(1) };
    }
    // SAFETY: `list` came from `if_nameindex` and is freed once.
    unsafe { libc::if_freenameindex(list) };
    out.sort_unstable_by_key(|(index, _)| *index);
    Ok(out)
}

// ---------------------------------------------------------------------------
// Settings

/// Where a lookup's destination address comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LookupDst<A> {
    /// The reply's own destination address (the target's was unspecified).
    Packet,
    Fixed(A),
}

/// The validated settings the program is built from.
#[derive(Clone, Debug)]
struct Plan {
    proxy_port: u16,
    marker: Vec<u8>,
    v4_dst: LookupDst<Ipv4Addr>,
    v4_port: u16,
    v6: Option<(LookupDst<Ipv6Addr>, u16)>,
}

impl Plan {
    fn new(spec: &DivertSpec<'_>) -> Result<Plan, DivertError> {
        let bad = |s: String| Err(DivertError::Spec(s));
        let m = spec.marker.len();
        if !(MARKER_LEN_MIN..=MARKER_LEN_MAX).contains(&m) {
            return bad(format!(
                "the marker is {m} bytes; it must be {MARKER_LEN_MIN} to {MARKER_LEN_MAX}"
            ));
        }
        if spec.marker.contains(&0) {
            // The window past a short payload is zero-filled; a marker
            // without a zero byte cannot match there.
            return bad("the marker contains a zero byte".into());
        }
        if spec.ifindexes.is_empty() {
            return bad("no interface given".into());
        }
        if spec.proxy_port == 0 {
            return bad("proxy_port is 0".into());
        }
        let v4_dst = match spec.target.ip() {
            IpAddr::V4(a) if a.is_unspecified() => LookupDst::Packet,
            IpAddr::V4(a) => LookupDst::Fixed(a),
            IpAddr::V6(a) if a.is_unspecified() => LookupDst::Packet,
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => LookupDst::Fixed(v4),
                None => {
                    return bad(format!(
                        "target {} is an IPv6 address, which IPv4 replies cannot reach \
                         (give an IPv4 or unspecified address; IPv6 replies use target6)",
                        spec.target
                    ))
                }
            },
        };
        check_target_port(
            "target",
            spec.target,
            spec.proxy_port,
            v4_dst == LookupDst::Packet,
        )?;
        let v6 = match spec.target6 {
            None => None,
            Some(t @ SocketAddr::V4(_)) => {
                return bad(format!("target6 {t} is not an IPv6 address"));
            }
            Some(SocketAddr::V6(t)) => {
                let dst = if t.ip().is_unspecified() {
                    LookupDst::Packet
                } else if t.ip().to_ipv4_mapped().is_some() {
                    return bad(format!(
                        "target6 {t} is IPv4-mapped, which IPv6 replies cannot reach"
                    ));
                } else {
                    LookupDst::Fixed(*t.ip())
                };
                check_target_port(
                    "target6",
                    SocketAddr::V6(t),
                    spec.proxy_port,
                    dst == LookupDst::Packet,
                )?;
                Some((dst, t.port()))
            }
        };
        Ok(Plan {
            proxy_port: spec.proxy_port,
            marker: spec.marker.to_vec(),
            v4_dst,
            v4_port: spec.target.port(),
            v6,
        })
    }
}

fn check_target_port(
    what: &str,
    target: SocketAddr,
    proxy_port: u16,
    unspecified: bool,
) -> Result<(), DivertError> {
    if target.port() == 0 {
        return Err(DivertError::Spec(format!("{what} {target} has port 0")));
    }
    if unspecified && target.port() == proxy_port {
        return Err(DivertError::Spec(format!(
            "{what} {target}: with an unspecified address the port must differ from \
             proxy_port {proxy_port}, or the lookup finds the proxy's own socket"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// eBPF instructions (include/uapi/linux/bpf.h, bpf_common.h)

/// One eBPF instruction, as `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// `dst_reg:4, src_reg:4` bit fields, in the host's bit-field order.
    regs: u8,
    off: i16,
    imm: i32,
}

const _: () = assert!(size_of::<Insn>() == 8);

impl Insn {
    fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        debug_assert!(dst <= R10 && src <= R10, "dst {dst} src {src}");
        let regs = if cfg!(target_endian = "little") {
            dst | (src << 4)
        } else {
            (dst << 4) | src
        };
        Insn {
            code,
            regs,
            off,
            imm,
        }
    }

    #[cfg(test)]
    fn dst(&self) -> u8 {
        if cfg!(target_endian = "little") {
            self.regs & 0xf
        } else {
            self.regs >> 4
        }
    }

    #[cfg(test)]
    fn src(&self) -> u8 {
        if cfg!(target_endian = "little") {
            self.regs >> 4
        } else {
            self.regs & 0xf
        }
    }
}

// Instruction classes.
const BPF_LD: u8 = 0x00;
const BPF_LDX: u8 = 0x01;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_ALU: u8 = 0x04;
const BPF_JMP: u8 = 0x05;
const BPF_ALU64: u8 = 0x07;
// Sizes.
const BPF_W: u8 = 0x00;
const BPF_H: u8 = 0x08;
const BPF_B: u8 = 0x10;
const BPF_DW: u8 = 0x18;
// Modes.
const BPF_IMM: u8 = 0x00;
const BPF_MEM: u8 = 0x60;
const BPF_ATOMIC: u8 = 0xc0;
// Operand source.
const BPF_K: u8 = 0x00;
const BPF_X: u8 = 0x08;
// ALU operations.
const BPF_ADD: u8 = 0x00;
const BPF_SUB: u8 = 0x10;
const BPF_AND: u8 = 0x50;
const BPF_MOV: u8 = 0xb0;
const BPF_END: u8 = 0xd0;
const BPF_TO_BE: u8 = 0x08;
// Jumps.
const BPF_JA: u8 = 0x00;
const BPF_JEQ: u8 = 0x10;
const BPF_JGT: u8 = 0x20;
const BPF_JNE: u8 = 0x50;
const BPF_CALL: u8 = 0x80;
const BPF_EXIT: u8 = 0x90;
const BPF_JLT: u8 = 0xa0;
const BPF_JSLT: u8 = 0xc0;
/// `src_reg` of a 64-bit immediate load that names a map by fd.
const BPF_PSEUDO_MAP_FD: u8 = 1;

// Registers. r0 holds helper results and scratch, r1-r5 helper arguments
// (clobbered by every call), r6-r9 survive calls, r10 is the frame pointer.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;
const R10: u8 = 10;
/// The `__sk_buff` context, for every helper that takes it.
const REG_SKB: u8 = 6;
/// Offset of the UDP payload from the packet data (link-layer header).
const REG_PAYLOAD_OFF: u8 = 7;
/// The UDP length, then the payload window length.
const REG_WINDOW: u8 = 8;
/// After a hit: the socket found by the lookup (the same register as
/// `REG_WINDOW`, which the hit path no longer needs).
const REG_SK: u8 = 8;
/// Up to the lookup: the tuple size, 12 (IPv4) or 36 (IPv6).
const REG_TUPLE_LEN: u8 = 9;
/// From the end of the scan: which counter to bump (same register).
const REG_COUNTER: u8 = 9;
const REG_FP: u8 = R10;

// Helper ids (`enum bpf_func_id`).
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_SKB_LOAD_BYTES: i32 = 26;
const HELPER_SK_LOOKUP_UDP: i32 = 85;
const HELPER_SK_RELEASE: i32 = 86;
const HELPER_SK_ASSIGN: i32 = 124;
/// `BPF_F_CURRENT_NETNS`: look up in the skb device's namespace.
const CURRENT_NETNS: i32 = -1;
/// An offset `bpf_skb_load_bytes` refuses (above INT_MAX as a u32): the
/// load fails and clears its buffer.
const FAILING_OFFSET: i32 = -1;
/// `TCX_NEXT` (= `TC_ACT_UNSPEC`): no verdict, the next program decides.
const TCX_NEXT: i32 = -1;

// `struct __sk_buff` fields (u32 each).
const SKB_PKT_TYPE: i16 = 4;
const SKB_PROTOCOL: i16 = 16;
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;
/// `PACKET_HOST`: addressed to this host.
const PACKET_HOST: i32 = 0;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: i32 = 17;

// IPv4 header (RFC 791), without options.
const IP4_VER_IHL: i16 = 0;
const IP4_FRAG: i16 = 6;
const IP4_PROTO: i16 = 9;
const IP4_SADDR: i16 = 12;
const IP4_DADDR: i16 = 16;
const IP4_HDR_LEN: i16 = 20;
/// Version 4, header length 5 words: no options.
const IP4_VER_IHL_PLAIN: i32 = 0x45;
/// More-fragments flag and fragment offset.
const IP4_FRAG_MASK: u16 = 0x3fff;
// IPv6 header (RFC 8200).
const IP6_VER: i16 = 0;
const IP6_NEXT_HEADER: i16 = 6;
const IP6_SADDR: i16 = 8;
const IP6_DADDR: i16 = 24;
const IP6_HDR_LEN: i16 = 40;
const IP6_VER_MASK: i32 = 0xf0;
const IP6_VER_6: i32 = 0x60;
// UDP header (RFC 768).
const UDP_SPORT: i16 = 0;
const UDP_DPORT: i16 = 2;
const UDP_LEN: i16 = 4;
const UDP_HDR_LEN: i16 = 8;

// `struct bpf_sock_tuple`.
const TUPLE4_SADDR: i16 = 0;
const TUPLE4_DADDR: i16 = 4;
const TUPLE4_SPORT: i16 = 8;
const TUPLE4_DPORT: i16 = 10;
const TUPLE4_LEN: i32 = 12;
const TUPLE6_SADDR: i16 = 0;
const TUPLE6_DADDR: i16 = 16;
const TUPLE6_SPORT: i16 = 32;
const TUPLE6_DPORT: i16 = 34;
const TUPLE6_LEN: i32 = 36;

// The stack frame, as offsets from r10 (see the module doc). The headers
// are copied so that their address and port fields land on the lookup
// tuple: RFC 791/768 and RFC 8200/768 put source address, destination
// address, source port and destination port in the order of
// `struct bpf_sock_tuple`, with nothing between them (no IPv4 options), so
// the tuple is built in place by overwriting the destination port (and the
// address, for a fixed target).
const STACK_WINDOW: i16 = -(WINDOW_LEN as i16);
const STACK_TUPLE: i16 = -296;
/// Where the IPv4 + UDP header copy starts: saddr lands on the tuple.
const STACK_HDR4: i16 = STACK_TUPLE - IP4_SADDR;
/// Where the IPv6 + UDP header copy starts: saddr lands on the tuple.
const STACK_HDR6: i16 = STACK_TUPLE - IP6_SADDR;
/// The counter key: inside both header copies (bytes the helper wrote),
/// before the tuple, dead by the time the counter is bumped.
const STACK_KEY: i16 = STACK_HDR6;
const STACK_SIZE: usize = 308;
const HDR4_LEN: i16 = IP4_HDR_LEN + UDP_HDR_LEN;
const HDR6_LEN: i16 = IP6_HDR_LEN + UDP_HDR_LEN;

const _: () = assert!(STACK_HDR4 as isize == -(STACK_SIZE as isize));
const _: () = assert!(STACK_HDR4 + HDR4_LEN <= STACK_WINDOW);
const _: () = assert!(STACK_HDR6 + HDR6_LEN <= STACK_WINDOW);
const _: () = assert!(STACK_KEY >= STACK_HDR4 && STACK_KEY + 4 <= STACK_TUPLE);
const _: () = assert!(STACK_TUPLE % 4 == 0 && STACK_KEY % 4 == 0 && STACK_WINDOW % 8 == 0);
// The header fields are the tuple's fields.
const _: () = assert!(STACK_HDR4 + IP4_SADDR == STACK_TUPLE + TUPLE4_SADDR);
const _: () = assert!(STACK_HDR6 + IP6_SADDR == STACK_TUPLE + TUPLE6_SADDR);
const _: () = assert!(IP4_DADDR - IP4_SADDR == TUPLE4_DADDR);
const _: () = assert!(IP4_HDR_LEN + UDP_SPORT - IP4_SADDR == TUPLE4_SPORT);
const _: () = assert!(IP4_HDR_LEN + UDP_DPORT - IP4_SADDR == TUPLE4_DPORT);
const _: () = assert!(IP6_DADDR - IP6_SADDR == TUPLE6_DADDR);
const _: () = assert!(IP6_HDR_LEN + UDP_SPORT - IP6_SADDR == TUPLE6_SPORT);
const _: () = assert!(IP6_HDR_LEN + UDP_DPORT - IP6_SADDR == TUPLE6_DPORT);

// Counter map keys.
const COUNTER_DIVERTED: u32 = 0;
const COUNTER_PASSED: u32 = 1;
const COUNTER_NO_SOCKET: u32 = 2;
const COUNTER_ASSIGN_FAILED: u32 = 3;
const COUNTERS: u32 = 4;

/// The value a 16-bit load of these network-order bytes yields on this host.
fn raw16(v: u16) -> i32 {
    i32::from(u16::from_ne_bytes(v.to_be_bytes()))
}

/// The value a 32-bit load of these network-order bytes yields on this host.
fn raw32(bytes: [u8; 4]) -> i32 {
    i32::from_ne_bytes(bytes)
}

/// A forward jump target.
#[derive(Clone, Copy, Debug)]
struct Label(usize);

/// A tiny assembler: emits instructions and patches forward jumps.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    targets: Vec<Option<usize>>,
    jumps: Vec<(usize, Label)>,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.targets.push(None);
        Label(self.targets.len() - 1)
    }

    /// Binds `l` to the next instruction.
    fn bind(&mut self, l: Label) {
        assert!(self.targets[l.0].is_none(), "label bound twice");
        self.targets[l.0] = Some(self.insns.len());
    }

    fn emit(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn::new(code, dst, src, off, imm));
    }

    fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.emit(BPF_ALU64 | BPF_MOV | BPF_K, dst, 0, 0, imm);
    }

    fn mov_reg(&mut self, dst: u8, src: u8) {
        self.emit(BPF_ALU64 | BPF_MOV | BPF_X, dst, src, 0, 0);
    }

    fn add_imm(&mut self, dst: u8, imm: i32) {
        self.emit(BPF_ALU64 | BPF_ADD | BPF_K, dst, 0, 0, imm);
    }

    fn sub_imm(&mut self, dst: u8, imm: i32) {
        self.emit(BPF_ALU64 | BPF_SUB | BPF_K, dst, 0, 0, imm);
    }

    fn and_imm(&mut self, dst: u8, imm: i32) {
        self.emit(BPF_ALU64 | BPF_AND | BPF_K, dst, 0, 0, imm);
    }

    /// Network (big-endian) 16-bit value to host order, zero-extended.
    fn be16(&mut self, dst: u8) {
        self.emit(BPF_ALU | BPF_END | BPF_TO_BE, dst, 0, 0, 16);
    }

    /// `dst = *(size *)(src + off)`
    fn ldx(&mut self, size: u8, dst: u8, src: u8, off: i16) {
        self.emit(BPF_LDX | size | BPF_MEM, dst, src, off, 0);
    }

    /// `*(size *)(dst + off) = imm`
    fn st_imm(&mut self, size: u8, dst: u8, off: i16, imm: i32) {
        self.emit(BPF_ST | size | BPF_MEM, dst, 0, off, imm);
    }

    /// `*(size *)(dst + off) = src`
    fn stx(&mut self, size: u8, dst: u8, off: i16, src: u8) {
        self.emit(BPF_STX | size | BPF_MEM, dst, src, off, 0);
    }

    /// `*(u64 *)(dst + off) += src`, atomically.
    fn atomic_add64(&mut self, dst: u8, off: i16, src: u8) {
        self.emit(
            BPF_STX | BPF_DW | BPF_ATOMIC,
            dst,
            src,
            off,
            i32::from(BPF_ADD),
        );
    }

    /// `dst = map named by fd` (two instruction slots).
    fn ld_map_fd(&mut self, dst: u8, fd: RawFd) {
        self.emit(BPF_LD | BPF_DW | BPF_IMM, dst, BPF_PSEUDO_MAP_FD, 0, fd);
        self.emit(0, 0, 0, 0, 0);
    }

    /// `dst = r10 + off`: a pointer into the frame.
    fn stack_ptr(&mut self, dst: u8, off: i16) {
        self.mov_reg(dst, REG_FP);
        self.add_imm(dst, i32::from(off));
    }

    fn call(&mut self, helper: i32) {
        self.emit(BPF_JMP | BPF_CALL, 0, 0, 0, helper);
    }

    fn exit(&mut self) {
        self.emit(BPF_JMP | BPF_EXIT, 0, 0, 0, 0);
    }

    fn jmp_imm(&mut self, op: u8, dst: u8, imm: i32, to: Label) {
        self.jumps.push((self.insns.len(), to));
        self.emit(BPF_JMP | op | BPF_K, dst, 0, 0, imm);
    }

    fn jmp_reg(&mut self, op: u8, dst: u8, src: u8, to: Label) {
        self.jumps.push((self.insns.len(), to));
        self.emit(BPF_JMP | op | BPF_X, dst, src, 0, 0);
    }

    fn ja(&mut self, to: Label) {
        self.jmp_imm(BPF_JA, 0, 0, to);
    }

    /// Resolves the jumps. Every jump goes forward: the program has no
    /// loop, which is what lets the verifier walk it without bounds to
    /// prove.
    fn finish(mut self) -> Vec<Insn> {
        for &(at, label) in &self.jumps {
            let to = self.targets[label.0].expect("jump to an unbound label");
            assert!(
                to > at && to < self.insns.len(),
                "jump {at} -> {to} not forward"
            );
            let off = to - at - 1;
            self.insns[at].off = i16::try_from(off).expect("jump too long");
        }
        self.insns
    }
}

/// The program for interfaces whose link-layer header is `l2` bytes, as
/// drawn in the module doc, counting into the map `counters_fd`.
fn program(plan: &Plan, l2: u8, counters_fd: RawFd) -> Vec<Insn> {
    let l2 = i16::from(l2);
    let marker = &plan.marker;
    let m = marker.len();
    let port = raw16(plan.proxy_port);
    let mut a = Asm::default();
    let next = a.label();
    let passed = a.label();
    let count = a.label();
    let hit = a.label();
    let v4 = a.label();
    let v6 = a.label();
    let payload = a.label();

    // entry. Verifier: r1 is the context; context fields are read at their
    // fixed offsets, which a SCHED_CLS program may read.
    a.mov_reg(REG_SKB, R1);
    a.ldx(BPF_W, R0, REG_SKB, SKB_PKT_TYPE);
    a.jmp_imm(BPF_JNE, R0, PACKET_HOST, next);
    a.ldx(BPF_W, R0, REG_SKB, SKB_PROTOCOL);
    a.jmp_imm(BPF_JEQ, R0, raw16(ETH_P_IP), v4);
    if plan.v6.is_some() {
        a.jmp_imm(BPF_JEQ, R0, raw16(ETH_P_IPV6), v6);
    }
    a.ja(next);

    // v4.
    a.bind(v4);
    peek(
        &mut a,
        l2,
        HDR4_LEN,
        IP4_PROTO,
        IP4_HDR_LEN + UDP_DPORT,
        port,
        next,
    );
    copy_headers(&mut a, l2, STACK_HDR4, HDR4_LEN, next);
    // Verifier: every load below reads bytes the helper wrote (< 28), and
    // the stores write into them, so the tuple's 12 bytes are initialized.
    a.ldx(BPF_B, R0, REG_FP, STACK_HDR4 + IP4_VER_IHL);
    a.jmp_imm(BPF_JNE, R0, IP4_VER_IHL_PLAIN, next);
    a.ldx(BPF_B, R0, REG_FP, STACK_HDR4 + IP4_PROTO);
    a.jmp_imm(BPF_JNE, R0, IPPROTO_UDP, next);
    a.ldx(BPF_H, R0, REG_FP, STACK_HDR4 + IP4_FRAG);
    a.and_imm(R0, raw16(IP4_FRAG_MASK));
    a.jmp_imm(BPF_JNE, R0, 0, next);
    a.ldx(BPF_H, R0, REG_FP, STACK_HDR4 + IP4_HDR_LEN + UDP_DPORT);
    a.jmp_imm(BPF_JNE, R0, port, next);
    if let LookupDst::Fixed(addr) = plan.v4_dst {
        let daddr = STACK_TUPLE + TUPLE4_DADDR;
        a.st_imm(BPF_W, REG_FP, daddr, raw32(addr.octets()));
    }
    let dport = STACK_TUPLE + TUPLE4_DPORT;
    a.st_imm(BPF_H, REG_FP, dport, raw16(plan.v4_port));
    a.mov_imm(REG_TUPLE_LEN, TUPLE4_LEN);
    a.mov_imm(REG_PAYLOAD_OFF, i32::from(l2 + HDR4_LEN));
    a.ldx(
        BPF_H,
        REG_WINDOW,
        REG_FP,
        STACK_HDR4 + IP4_HDR_LEN + UDP_LEN,
    );
    a.ja(payload);

    // v6: the same steps with the IPv6 offsets.
    a.bind(v6);
    if let Some((v6_dst, v6_port)) = plan.v6 {
        let dport_off = IP6_HDR_LEN + UDP_DPORT;
        peek(&mut a, l2, HDR6_LEN, IP6_NEXT_HEADER, dport_off, port, next);
        copy_headers(&mut a, l2, STACK_HDR6, HDR6_LEN, next);
        a.ldx(BPF_B, R0, REG_FP, STACK_HDR6 + IP6_VER);
        a.and_imm(R0, IP6_VER_MASK);
        a.jmp_imm(BPF_JNE, R0, IP6_VER_6, next);
        a.ldx(BPF_B, R0, REG_FP, STACK_HDR6 + IP6_NEXT_HEADER);
        a.jmp_imm(BPF_JNE, R0, IPPROTO_UDP, next);
        a.ldx(BPF_H, R0, REG_FP, STACK_HDR6 + dport_off);
        a.jmp_imm(BPF_JNE, R0, port, next);
        if let LookupDst::Fixed(addr) = v6_dst {
            for (word, bytes) in addr.octets().chunks_exact(4).enumerate() {
                let bytes: [u8; 4] = bytes.try_into().expect("chunks of 4");
                let daddr = STACK_TUPLE + TUPLE6_DADDR + 4 * word as i16;
                a.st_imm(BPF_W, REG_FP, daddr, raw32(bytes));
            }
        }
        let dport = STACK_TUPLE + TUPLE6_DPORT;
        a.st_imm(BPF_H, REG_FP, dport, raw16(v6_port));
        a.mov_imm(REG_TUPLE_LEN, TUPLE6_LEN);
        a.mov_imm(REG_PAYLOAD_OFF, i32::from(l2 + HDR6_LEN));
        a.ldx(
            BPF_H,
            REG_WINDOW,
            REG_FP,
            STACK_HDR6 + IP6_HDR_LEN + UDP_LEN,
        );
    }

    // payload. Verifier: after the signed check r8 >= m. A datagram that
    // fills the window loads it with the constant size W: the helper's
    // write covers the whole window, uninitialized or not. A shorter one
    // loads r8 in [m, W - 1] bytes; a variable size makes the verifier
    // treat the window as read too, so it must be initialized first: the
    // short path zeroes it with a load that must fail (an offset above
    // INT_MAX), since a failing `bpf_skb_load_bytes` clears its whole
    // buffer (the ARG_PTR_TO_UNINIT_MEM contract: fill every byte or clear
    // them). 32 stores would do the same, but without CAP_PERFMON the
    // verifier puts a speculation barrier after each first store to a
    // stack slot (Spectre v4; see the module doc). Either way the write
    // [fp-256, fp-256 + r8) stays in the window.
    a.bind(payload);
    a.be16(REG_WINDOW);
    a.sub_imm(REG_WINDOW, i32::from(UDP_HDR_LEN));
    a.jmp_imm(BPF_JSLT, REG_WINDOW, m as i32, passed);
    let short = a.label();
    let loaded = a.label();
    a.jmp_imm(BPF_JLT, REG_WINDOW, WINDOW_LEN as i32, short);
    a.mov_imm(REG_WINDOW, WINDOW_LEN as i32);
    load_window(&mut a, None, None);
    a.ja(loaded);
    a.bind(short);
    load_window(&mut a, Some(FAILING_OFFSET), None);
    load_window(&mut a, None, Some(REG_WINDOW));
    a.bind(loaded);
    a.jmp_imm(BPF_JNE, R0, 0, passed);

    // scan. Verifier: constant stack offsets inside the window (i + k <
    // W), forward jumps only. Runtime: past a short payload the window is
    // zero, and the marker has no zero byte, so it matches only inside
    // the payload; no bound check per start position is needed.
    for i in 0..=(WINDOW_LEN - m) {
        let next_start = a.label();
        for (k, &byte) in marker.iter().enumerate() {
            a.ldx(BPF_B, R0, REG_FP, STACK_WINDOW + (i + k) as i16);
            if k + 1 < m {
                a.jmp_imm(BPF_JNE, R0, i32::from(byte), next_start);
            } else {
                a.jmp_imm(BPF_JEQ, R0, i32::from(byte), hit);
            }
        }
        a.bind(next_start);
    }

    // passed: no marker in the window.
    a.bind(passed);
    a.mov_imm(REG_COUNTER, COUNTER_PASSED as i32);
    a.ja(count);

    // hit. Verifier: the tuple is fully written and r3 = r9 is 12 or 36 on
    // each path; r0 is a socket or NULL and is checked before use; the
    // reference is released on the one path that holds it.
    a.bind(hit);
    a.mov_reg(R1, REG_SKB);
    a.stack_ptr(R2, STACK_TUPLE);
    a.mov_reg(R3, REG_TUPLE_LEN);
    a.mov_imm(R4, CURRENT_NETNS);
    a.mov_imm(R5, 0);
    a.call(HELPER_SK_LOOKUP_UDP);
    let found = a.label();
    a.jmp_imm(BPF_JNE, R0, 0, found);
    a.mov_imm(REG_COUNTER, COUNTER_NO_SOCKET as i32);
    a.ja(count);
    a.bind(found);
    a.mov_reg(REG_SK, R0);
    a.mov_reg(R1, REG_SKB);
    a.mov_reg(R2, REG_SK);
    a.mov_imm(R3, 0);
    a.call(HELPER_SK_ASSIGN);
    a.mov_imm(REG_COUNTER, COUNTER_DIVERTED as i32);
    let assigned = a.label();
    a.jmp_imm(BPF_JEQ, R0, 0, assigned);
    a.mov_imm(REG_COUNTER, COUNTER_ASSIGN_FAILED as i32);
    a.bind(assigned);
    a.mov_reg(R1, REG_SK);
    a.call(HELPER_SK_RELEASE);

    // count. Verifier: the key is written before the lookup reads it; the
    // value pointer is null-checked; the value is one aligned u64.
    a.bind(count);
    a.stx(BPF_W, REG_FP, STACK_KEY, REG_COUNTER);
    a.ld_map_fd(R1, counters_fd);
    a.stack_ptr(R2, STACK_KEY);
    a.call(HELPER_MAP_LOOKUP_ELEM);
    a.jmp_imm(BPF_JEQ, R0, 0, next);
    a.mov_imm(R1, 1);
    a.atomic_add64(R0, 0, R1);

    // next.
    a.bind(next);
    a.mov_imm(R0, TCX_NEXT);
    a.exit();
    a.finish()
}

/// The cheap pre-filter: when the first `hdr_len` bytes after the
/// link-layer header are in the linear area, look at the protocol and the
/// destination port in place and leave without any helper call if they are
/// not UDP to the proxy port. Otherwise (headers not linear) fall through
/// to the copy, which checks everything.
///
/// Verifier: r2 = data and r3 = data_end are packet pointers; after
/// `r2 + l2 + hdr_len > r3` is false, reads below that bound are proven.
fn peek(
    a: &mut Asm,
    l2: i16,
    hdr_len: i16,
    proto_off: i16,
    dport_off: i16,
    port: i32,
    next: Label,
) {
    let copy = a.label();
    a.ldx(BPF_W, R2, REG_SKB, SKB_DATA);
    a.ldx(BPF_W, R3, REG_SKB, SKB_DATA_END);
    a.mov_reg(R0, R2);
    a.add_imm(R0, i32::from(l2 + hdr_len));
    a.jmp_reg(BPF_JGT, R0, R3, copy);
    a.ldx(BPF_B, R0, R2, l2 + proto_off);
    a.jmp_imm(BPF_JNE, R0, IPPROTO_UDP, next);
    a.ldx(BPF_H, R0, R2, l2 + dport_off);
    a.jmp_imm(BPF_JNE, R0, port, next);
    a.bind(copy);
}

/// `bpf_skb_load_bytes(skb, offset, window, len)`: `offset` the payload
/// offset or the constant `offset_imm`, `len` the constant `WINDOW_LEN` or
/// the register `len_reg`.
fn load_window(a: &mut Asm, offset_imm: Option<i32>, len_reg: Option<u8>) {
    a.mov_reg(R1, REG_SKB);
    match offset_imm {
        Some(imm) => a.mov_imm(R2, imm),
        None => a.mov_reg(R2, REG_PAYLOAD_OFF),
    }
    a.stack_ptr(R3, STACK_WINDOW);
    match len_reg {
        Some(reg) => a.mov_reg(R4, reg),
        None => a.mov_imm(R4, WINDOW_LEN as i32),
    }
    a.call(HELPER_SKB_LOAD_BYTES);
}

/// Copies the IP and UDP headers to `to` in the frame.
///
/// Verifier: r3 = r10 + `to` and the constant size `hdr_len` keep the
/// helper's write below the window (the const asserts on the frame).
fn copy_headers(a: &mut Asm, l2: i16, to: i16, hdr_len: i16, next: Label) {
    a.mov_reg(R1, REG_SKB);
    a.mov_imm(R2, i32::from(l2));
    a.stack_ptr(R3, to);
    a.mov_imm(R4, i32::from(hdr_len));
    a.call(HELPER_SKB_LOAD_BYTES);
    a.jmp_imm(BPF_JNE, R0, 0, next);
}

// ---------------------------------------------------------------------------
// bpf(2)

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_PROG_LOAD: u32 = 5;
const BPF_LINK_CREATE: u32 = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
/// Verifier log level: every instruction walked (asked for only after a
/// rejection, to show why).
const BPF_LOG_LEVEL1: u32 = 1;
/// Verifier log level: statistics only.
#[cfg(test)]
const BPF_LOG_STATS: u32 = 4;
/// Verifier log buffer after a rejection. Since Linux 6.4 the log keeps
/// its tail when it overflows, and the tail says why.
const VERIFIER_LOG_BYTES: usize = 1 << 20;
/// Lines of the verifier log quoted in the error.
const VERIFIER_LOG_LINES: usize = 4;
const OBJ_NAME: &[u8] = b"kaping_divert";
/// The program uses no GPL-only helper, so it carries the project's license.
const LICENSE: &CStr = c"Apache-2.0";

/// The prefix of `union bpf_attr` that `BPF_MAP_CREATE` reads.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// The prefix of `union bpf_attr` that `BPF_MAP_*_ELEM` reads.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The prefix of `union bpf_attr` that `BPF_PROG_LOAD` reads.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The prefix of `union bpf_attr` that `BPF_LINK_CREATE` reads for tcx.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

const _: () = assert!(size_of::<MapCreateAttr>() == 44);
const _: () = assert!(size_of::<MapElemAttr>() == 32);
const _: () = assert!(size_of::<ProgLoadAttr>() == 72);
const _: () = assert!(size_of::<LinkCreateAttr>() == 32);

fn obj_name() -> [u8; 16] {
    let mut name = [0u8; 16];
    name[..OBJ_NAME.len()].copy_from_slice(OBJ_NAME);
    name
}

/// `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
///
/// Every pointer stored in `attr` must point to memory valid for what
/// `cmd` does with it (reads of the instructions, license and key; writes
/// of the log buffer and the value) for the duration of the call.
unsafe fn sys_bpf<T>(cmd: u32, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live repr(C) prefix of `union bpf_attr` of
    // exactly `size_of::<T>()` bytes (the kernel zero-fills the rest); the
    // pointers inside it are the caller's obligation (see above).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut T,
            size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Wraps a new descriptor returned by `bpf(2)`.
fn owned_fd(rc: libc::c_long) -> OwnedFd {
    let fd = RawFd::try_from(rc).expect("bpf(2) returned a descriptor out of range");
    // SAFETY: the kernel just created `fd` for us (close-on-exec) and
    // nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Maps an errno from `op` to the error the operator should see.
fn bpf_error(op: &'static str, err: io::Error) -> DivertError {
    match err.raw_os_error() {
        Some(libc::EPERM) => DivertError::Permission { op, err },
        Some(libc::ENOSYS) => DivertError::Unavailable(err),
        _ => DivertError::Sys { op, err },
    }
}

/// The counter map: an array of `COUNTERS` u64, bumped with atomic adds. A
/// per-CPU array would avoid the shared cache line, but only datagrams to
/// the proxy port touch it (SIP rates, not packet rates), and a plain array
/// needs no knowledge of the possible-CPU count to read.
fn create_counter_map() -> Result<OwnedFd, DivertError> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: size_of::<u32>() as u32,
        value_size: size_of::<u64>() as u32,
        max_entries: COUNTERS,
        map_name: obj_name(),
        ..MapCreateAttr::default()
    };
    // SAFETY: this command reads no pointer.
    let rc = unsafe { sys_bpf(BPF_MAP_CREATE, &mut attr) };
    rc.map(owned_fd)
        .map_err(|e| bpf_error("bpf(BPF_MAP_CREATE)", e))
}

fn lookup_u64(map: &OwnedFd, key: u32) -> io::Result<u64> {
    let mut value = 0u64;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: &key as *const u32 as u64,
        value: &mut value as *mut u64 as u64,
        ..MapElemAttr::default()
    };
    // SAFETY: `key` (4 bytes, the map's key size) and `value` (8 bytes, its
    // value size) live on this frame for the whole call.
    unsafe { sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) }?;
    Ok(value)
}

/// Loads attempted before an EAGAIN (an interrupted verifier) is final.
const LOAD_TRIES: u32 = 5;

/// Loads `insns` as a tcx-ingress classifier, with the verifier log at
/// `log_level` into `log` (empty: no log).
fn try_load(insns: &[Insn], log_level: u32, log: &mut [u8]) -> io::Result<OwnedFd> {
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: u32::try_from(insns.len()).expect("program size"),
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        prog_name: obj_name(),
        expected_attach_type: BPF_TCX_INGRESS,
        ..ProgLoadAttr::default()
    };
    if !log.is_empty() {
        attr.log_level = log_level;
        attr.log_size = u32::try_from(log.len()).expect("log size");
        attr.log_buf = log.as_mut_ptr() as u64;
    }
    // SAFETY: `insns`, `LICENSE` and `log` outlive the call; the kernel
    // reads `insn_cnt` instructions and writes at most `log_size` bytes.
    unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) }.map(owned_fd)
}

/// Loads the program; on a rejection, loads it again with the verifier log
/// on to say why.
fn load_program(insns: &[Insn]) -> Result<OwnedFd, DivertError> {
    const OP: &str = "bpf(BPF_PROG_LOAD)";
    // The verifier gives up with EAGAIN when a signal is pending on the
    // loading thread, and TIF_NOTIFY_SIGNAL counts (task work queued to
    // it, as io_uring does): seen in the daemon, never in a quiet thread.
    // The return to user space runs that work, so a retry goes through;
    // libbpf retries the same way.
    let mut tries = 0;
    let first = loop {
        tries += 1;
        match try_load(insns, 0, &mut []) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < LOAD_TRIES => continue,
            other => break other,
        }
    };
    match first {
        Ok(fd) => Ok(fd),
        Err(err) if matches!(err.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) => {
            Err(bpf_error(OP, err))
        }
        Err(err) => {
            let mut log = vec![0u8; VERIFIER_LOG_BYTES];
            // The second attempt fails the same way (or with ENOSPC when the
            // log overflowed); only its log matters.
            let _ = try_load(insns, BPF_LOG_LEVEL1, &mut log);
            Err(DivertError::Verifier {
                log_tail: log_tail(&log),
                err,
            })
        }
    }
}

/// The last lines of a verifier log, joined into one line.
fn log_tail(log: &[u8]) -> String {
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return "(no verifier log)".into();
    }
    lines[lines.len().saturating_sub(VERIFIER_LOG_LINES)..].join(" | ")
}

/// Attaches `prog` with tcx at the end of the ingress chain of `ifindex`.
fn link_tcx_ingress(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd, DivertError> {
    const OP: &str = "bpf(BPF_LINK_CREATE)";
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_TCX_INGRESS,
        ..LinkCreateAttr::default()
    };
    // SAFETY: this command reads no pointer (relative_fd 0, no flags).
    match unsafe { sys_bpf(BPF_LINK_CREATE, &mut attr) } {
        Ok(rc) => Ok(owned_fd(rc)),
        Err(err) => Err(match err.raw_os_error() {
            Some(libc::EINVAL) => DivertError::NoTcx { ifindex, err },
            Some(libc::ENODEV) => DivertError::Interface {
                ifindex,
                reason: "no such interface".into(),
            },
            _ => bpf_error(OP, err),
        }),
    }
}

// ---------------------------------------------------------------------------
// Interfaces

const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_NONE: u16 = 0xfffe;
/// Ethernet header: two addresses and the EtherType (a VLAN tag the NIC
/// stripped is not in the data; one it did not strip makes the protocol
/// 802.1Q, which the program passes).
const ETH_HLEN: u8 = 14;

/// The link-layer header length the packet data starts with at tc ingress,
/// for the link types whose drivers are known to set it so: Ethernet and
/// loopback (`eth_type_trans`), and the header-less layer-3 devices (tun,
/// WireGuard, raw-IP modems). Other types (IP tunnels, InfiniBand, CAN...)
/// are left out rather than guessed.
fn link_header_len(link_type: u16) -> Option<u8> {
    match link_type {
        ARPHRD_ETHER | ARPHRD_LOOPBACK => Some(ETH_HLEN),
        ARPHRD_NONE | ARPHRD_RAWIP => Some(0),
        _ => None,
    }
}

/// A datagram socket for interface ioctls, in this thread's namespace.
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is new and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The name and `ARPHRD_*` link type of interface `ifindex`.
fn link_type(ifindex: u32) -> io::Result<(String, u16)> {
    let sock = ioctl_socket()?;
    // SAFETY: `ifreq` is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_ifru.ifru_ifindex = ifindex as libc::c_int;
    // SAFETY: SIOCGIFNAME reads the index and writes the NUL-terminated
    // name into `req`, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFNAME, &mut req) } < 0 {
        let err = io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::ENODEV) {
            io::Error::new(io::ErrorKind::NotFound, "no such interface")
        } else {
            err
        });
    }
    // SAFETY: the kernel wrote a NUL-terminated name of at most IFNAMSIZ
    // bytes (the array is IFNAMSIZ long).
    let name = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: SIOCGIFHWADDR reads the name and writes the hardware address
    // (a sockaddr whose family is the link type) into `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just wrote the `ifru_hwaddr` member.
    let link_type = unsafe { req.ifr_ifru.ifru_hwaddr.sa_family };
    Ok((name, link_type))
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Protocol, Socket, Type};
    use std::collections::HashMap;
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    const MARKER: &[u8] = b"z9hG4bK.AbCd";
    const PROXY_PORT: u16 = 5060;

    // ---- privileges, namespaces -------------------------------------------

    const CAP_NET_ADMIN: u32 = 12;
    const CAP_BPF: u32 = 39;
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }

    /// Leaves only `caps` in this thread's effective set (capabilities are
    /// per thread; the test thread exits afterwards).
    fn keep_only_caps(caps: &[u32]) {
        let mut hdr = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: version-3 capget writes two `CapData` records.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
        assert_eq!(rc, 0, "capget: {}", io::Error::last_os_error());
        let mut effective = [0u32; 2];
        for &cap in caps {
            effective[(cap / 32) as usize] |= 1 << (cap % 32);
        }
        for (d, e) in data.iter_mut().zip(effective) {
            d.effective = e & d.permitted;
        }
        // SAFETY: version-3 capset reads two `CapData` records; pid 0 is
        // this thread.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
        assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Sets interface `name` up, in this thread's namespace.
    fn set_link_up(name: &str) -> io::Result<()> {
        let sock = ioctl_socket()?;
        // SAFETY: plain data, zeroes valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read the name and read/write the
        // flags in `req`, which lives across both calls.
        unsafe {
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
                return Err(io::Error::last_os_error());
            }
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Runs `f` on a new thread in a network namespace of its own, with
    /// `lo` up, and only CAP_BPF and CAP_NET_ADMIN effective. The namespace
    /// goes away with the thread (and everything in it), whether `f`
    /// returns or panics; the host's interfaces are never touched. `None`
    /// when namespaces cannot be made here (the caller skips).
    fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let thread = std::thread::spawn(move || {
            // SAFETY: unshare(CLONE_NEWNET) moves only this thread into a new
            // namespace; nothing here holds a socket from the old one.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "SKIP: cannot create a network namespace: {}",
                    io::Error::last_os_error()
                );
                return None;
            }
            set_link_up("lo").expect("bring lo up in the test namespace");
            keep_only_caps(&[CAP_BPF, CAP_NET_ADMIN]);
            Some(f())
        });
        match thread.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    fn require_root(test: &str) -> bool {
        if !is_root() {
            eprintln!(
                "SKIP {test}: needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN for unshare)"
            );
        }
        is_root()
    }

    // ---- the program, without the kernel ----------------------------------

    fn plan(marker: &[u8], target6: bool) -> Plan {
        let ifindexes = [1];
        let spec = DivertSpec {
            ifindexes: &ifindexes,
            proxy_port: PROXY_PORT,
            target: "0.0.0.0:5070".parse().unwrap(),
            target6: target6.then(|| "[::]:5070".parse().unwrap()),
            marker,
        };
        Plan::new(&spec).unwrap()
    }

    fn is_jump(i: &Insn) -> bool {
        let class = i.code & 0x07;
        let op = i.code & 0xf0;
        class == BPF_JMP && op != BPF_CALL && op != BPF_EXIT
    }

    #[test]
    fn program_shape() {
        for m in MARKER_LEN_MIN..=MARKER_LEN_MAX {
            let marker: Vec<u8> = (0..m).map(|k| b'a' + k as u8).collect();
            for target6 in [false, true] {
                let insns = program(&plan(&marker, target6), ETH_HLEN, 3);
                // Jumps go forward and land inside the program.
                for (pc, i) in insns.iter().enumerate() {
                    if is_jump(i) {
                        assert!(i.off >= 0, "backward jump at {pc}");
                        assert!(pc + 1 + (i.off as usize) < insns.len(), "jump out at {pc}");
                    }
                    // Stack accesses: r10 + constant inside the frame.
                    let class = i.code & 0x07;
                    let fp_base = match class {
                        BPF_LDX => i.src() == REG_FP,
                        BPF_ST | BPF_STX => i.dst() == REG_FP,
                        _ => false,
                    };
                    if fp_base {
                        let off = i32::from(i.off);
                        assert!(
                            off >= -(STACK_SIZE as i32) && off < 0,
                            "frame access {off} at {pc}"
                        );
                    }
                }
                assert_eq!(insns.last().unwrap().code, BPF_JMP | BPF_EXIT);
                // The scan: W - m + 1 blocks of 2m (one load per byte).
                let marker_loads = insns
                    .iter()
                    .filter(|i| {
                        i.code == BPF_LDX | BPF_B | BPF_MEM
                            && i.src() == REG_FP
                            && i.off >= STACK_WINDOW
                    })
                    .count();
                assert_eq!(marker_loads, (WINDOW_LEN - m + 1) * m);
                let calls = |h: i32| {
                    insns
                        .iter()
                        .filter(|i| i.code == BPF_JMP | BPF_CALL && i.imm == h)
                        .count()
                };
                assert_eq!(calls(HELPER_SK_LOOKUP_UDP), 1);
                assert_eq!(calls(HELPER_SK_ASSIGN), 1);
                assert_eq!(calls(HELPER_SK_RELEASE), 1);
                assert_eq!(calls(HELPER_SKB_LOAD_BYTES), if target6 { 5 } else { 4 });
            }
        }
    }

    #[test]
    fn bad_settings_are_readable_errors() {
        let ifindexes = [1];
        let good = DivertSpec {
            ifindexes: &ifindexes,
            proxy_port: PROXY_PORT,
            target: "0.0.0.0:5070".parse().unwrap(),
            target6: None,
            marker: MARKER,
        };
        let cases: Vec<(DivertSpec, &str)> = vec![
            (
                DivertSpec {
                    marker: b"z9h",
                    ..good
                },
                "marker is 3 bytes",
            ),
            (
                DivertSpec {
                    marker: &[b'x'; 17],
                    ..good
                },
                "marker is 17 bytes",
            ),
            (
                DivertSpec {
                    marker: b"z9h\0G4bK",
                    ..good
                },
                "zero byte",
            ),
            (
                DivertSpec {
                    ifindexes: &[],
                    ..good
                },
                "no interface",
            ),
            (
                DivertSpec {
                    proxy_port: 0,
                    ..good
                },
                "proxy_port is 0",
            ),
            (
                DivertSpec {
                    target: "0.0.0.0:5060".parse().unwrap(),
                    ..good
                },
                "finds the proxy's own socket",
            ),
            (
                DivertSpec {
                    target: "[2001:db8::1]:5070".parse().unwrap(),
                    ..good
                },
                "IPv4 replies cannot reach",
            ),
            (
                DivertSpec {
                    target6: Some("127.0.0.1:5070".parse().unwrap()),
                    ..good
                },
                "not an IPv6 address",
            ),
        ];
        for (spec, want) in cases {
            let err = Divert::attach(&spec).expect_err(want);
            let line = err.to_string();
            assert!(matches!(err, DivertError::Spec(_)), "{line}");
            assert!(line.contains(want), "{line:?} lacks {want:?}");
            assert!(!line.contains('\n'), "{line:?}");
            eprintln!("{line}");
        }
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let log = b"0: (bf) r6 = r1\n1: (61) r0 = *(u32 *)(r6 +4)\n\nR4 unbounded memory access\nprocessed 9 insns\n\0garbage";
        assert_eq!(
            log_tail(log),
            "0: (bf) r6 = r1 | 1: (61) r0 = *(u32 *)(r6 +4) | R4 unbounded memory access | processed 9 insns"
        );
        assert_eq!(log_tail(&[0; 8]), "(no verifier log)");
    }

    // ---- the program in the kernel ----------------------------------------

    /// Loads the program for each marker length, header length and target
    /// form, with only CAP_BPF and CAP_NET_ADMIN, and prints the verifier's
    /// statistics.
    #[test]
    fn verifier_accepts_the_program() {
        if !require_root("verifier_accepts_the_program") {
            return;
        }
        let loaded = in_fresh_netns(|| {
            let map = create_counter_map().expect("counter map");
            let mut loaded = 0;
            for m in [MARKER_LEN_MIN, 12, MARKER_LEN_MAX] {
                let marker: Vec<u8> = MARKER.iter().copied().cycle().take(m).collect();
                for l2 in [0, ETH_HLEN] {
                    for (target, target6) in [
                        ("0.0.0.0:5070", Some("[::]:5070")),
                        ("127.0.0.1:5070", Some("[::1]:5070")),
                        ("0.0.0.0:5070", None),
                    ] {
                        let ifindexes = [1];
                        let spec = DivertSpec {
                            ifindexes: &ifindexes,
                            proxy_port: PROXY_PORT,
                            target: target.parse().unwrap(),
                            target6: target6.map(|t| t.parse().unwrap()),
                            marker: &marker,
                        };
                        let insns = program(&Plan::new(&spec).unwrap(), l2, map.as_raw_fd());
                        let mut log = vec![0u8; 4096];
                        if let Err(e) = try_load(&insns, BPF_LOG_STATS, &mut log) {
                            let why = load_program(&insns).err().map(|e| e.to_string());
                            panic!("m={m} l2={l2} {target} {target6:?}: {e}: {why:?}");
                        }
                        let stats = log_tail(&log);
                        eprintln!(
                            "m={m:2} l2={l2:2} {target} {target6:?}: {} insns; {stats}",
                            insns.len()
                        );
                        loaded += 1;
                    }
                }
            }
            loaded
        });
        match loaded {
            Some(n) => assert_eq!(n, 18),
            None => eprintln!("SKIP: verifier_accepts_the_program"),
        }
    }

    /// When the check that sends a datagram shorter than the window to the
    /// short path lets any length through, that path's size has no upper
    /// bound: the verifier must refuse the program, and the error must
    /// quote why.
    #[test]
    fn verifier_refuses_an_unbounded_window() {
        if !require_root("verifier_refuses_an_unbounded_window") {
            return;
        }
        let err = in_fresh_netns(|| {
            let map = create_counter_map().expect("counter map");
            let mut insns = program(&plan(MARKER, true), ETH_HLEN, map.as_raw_fd());
            let at = insns
                .iter()
                .position(|i| {
                    i.code == BPF_JMP | BPF_JLT | BPF_K
                        && i.dst() == REG_WINDOW
                        && i.imm == WINDOW_LEN as i32
                })
                .expect("the window check");
            insns[at].imm = i32::MAX;
            load_program(&insns).expect_err("an unbounded size must be refused")
        });
        let Some(err) = err else {
            eprintln!("SKIP: verifier_refuses_an_unbounded_window");
            return;
        };
        let line = err.to_string();
        eprintln!("{line}");
        assert!(matches!(err, DivertError::Verifier { .. }), "{line}");
        assert!(
            line.contains("stack R3"),
            "the log tail names the window access: {line}"
        );
        assert!(!line.contains('\n'));
    }

    /// Without any capability, attach fails with the readable error, and
    /// nothing is attached.
    #[test]
    fn without_capabilities_attach_says_what_is_needed() {
        if !require_root("without_capabilities_attach_says_what_is_needed") {
            return;
        }
        let out = in_fresh_netns(|| {
            keep_only_caps(&[]);
            let ifindexes = [1];
            let spec = DivertSpec {
                ifindexes: &ifindexes,
                proxy_port: PROXY_PORT,
                target: "0.0.0.0:5070".parse().unwrap(),
                target6: None,
                marker: MARKER,
            };
            Divert::attach(&spec).map(|_| ()).unwrap_err()
        });
        let Some(err) = out else { return };
        let line = err.to_string();
        eprintln!("{line}");
        assert!(matches!(err, DivertError::Permission { .. }), "{line}");
        assert!(line.contains("needs CAP_BPF and CAP_NET_ADMIN"), "{line}");
    }

    /// `BPF_PROG_TEST_RUN`'s part of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct TestRunAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        /// Explicit, so it is zero: the kernel refuses nonzero bytes past
        /// the fields it knows.
        _pad: u32,
    }

    const BPF_PROG_TEST_RUN: u32 = 10;
    const COST_REPEAT: u32 = 100_000;
    /// Rounds of `COST_REPEAT` runs; the best round is reported (the
    /// machine's noise only ever adds).
    const COST_ROUNDS: u32 = 5;

    /// An Ethernet frame from 127.0.0.1:40000 to 127.0.0.1:`dport` with IP
    /// protocol `proto` and `payload` (checksums are not looked at).
    fn frame(proto: u8, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        let total = (20 + 8 + payload.len()) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
        f.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1]);
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// Mean run time of `prog` on `frame`, in ns, over `COST_REPEAT` runs
    /// (the kernel's own timing of BPF_PROG_TEST_RUN), and its return value.
    fn test_run(prog: &OwnedFd, frame: &[u8]) -> io::Result<(u32, i32)> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut attr = TestRunAttr {
            prog_fd: prog.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: COST_REPEAT,
            ..TestRunAttr::default()
        };
        // SAFETY: `frame` (read) and `out` (written, `data_size_out` bytes)
        // live across the call.
        unsafe { sys_bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
        Ok((attr.duration, attr.retval as i32))
    }

    /// What the program costs per packet, by path. Prints the figures (no
    /// bound is asserted: they depend on the machine) and checks that every
    /// path returns `TCX_NEXT`. The marked reply finds no socket here (the
    /// test run has none), so its figure includes the failed lookup.
    #[test]
    fn program_cost() {
        if !require_root("program_cost") {
            return;
        }
        let ran = in_fresh_netns(|| {
            let map = create_counter_map().expect("counter map");
            let insns = program(&plan(MARKER, true), ETH_HLEN, map.as_raw_fd());
            let prog = load_program(&insns).unwrap_or_else(|e| panic!("{e}"));
            eprintln!(
                "program of {} instructions, marker of {}",
                insns.len(),
                MARKER.len()
            );
            // The harness's own cost per run: a program that only returns.
            let mut empty = Asm::default();
            empty.mov_imm(R0, TCX_NEXT);
            empty.exit();
            let empty = load_program(&empty.finish()).unwrap_or_else(|e| panic!("{e}"));
            let reply = reply_200("AbCd", "127.0.0.1");
            let other = reply_200("WxYz", "127.0.0.1");
            let cases = [
                (
                    "(harness: a program that only returns)",
                    frame(6, PROXY_PORT, &other),
                ),
                ("TCP segment", frame(6, PROXY_PORT, &other)),
                ("UDP to another port", frame(17, 9999, &other)),
                (
                    "UDP to the proxy, CRLF keepalive",
                    frame(17, PROXY_PORT, b"\r\n\r\n"),
                ),
                (
                    "UDP to the proxy, short, no marker",
                    frame(17, PROXY_PORT, &other[..120]),
                ),
                ("UDP to the proxy, no marker", frame(17, PROXY_PORT, &other)),
                (
                    "UDP to the proxy, marked reply",
                    frame(17, PROXY_PORT, &reply),
                ),
            ];
            for (at, (name, f)) in cases.iter().enumerate() {
                let prog = if at == 0 { &empty } else { &prog };
                let mut best = u32::MAX;
                for _ in 0..COST_ROUNDS {
                    let (ns, ret) = test_run(prog, f).unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert_eq!(ret, TCX_NEXT, "{name}");
                    best = best.min(ns);
                }
                let ns = best;
                eprintln!("{name:40} {ns:5} ns/packet");
            }
            let mut c = DivertCounters::default();
            let read = |key| lookup_u64(&map, key).unwrap();
            c.passed = read(COUNTER_PASSED);
            c.no_socket = read(COUNTER_NO_SOCKET);
            let runs = u64::from(COST_REPEAT * COST_ROUNDS);
            assert_eq!(c.passed, 3 * runs, "{c:?}");
            assert_eq!(c.no_socket, runs, "{c:?}");
        });
        if ran.is_none() {
            eprintln!("SKIP: program_cost");
        }
    }

    #[test]
    fn interfaces_of_a_fresh_namespace() {
        if !require_root("interfaces_of_a_fresh_namespace") {
            return;
        }
        let out = in_fresh_netns(|| {
            let list = interface_indexes().unwrap();
            let lo = link_type(1).unwrap();
            let none = link_type(4242).unwrap_err();
            let attach = Divert::attach(&DivertSpec {
                ifindexes: &[4242],
                proxy_port: PROXY_PORT,
                target: "0.0.0.0:5070".parse().unwrap(),
                target6: None,
                marker: MARKER,
            })
            .unwrap_err();
            (list, lo, none, attach.to_string())
        });
        let Some((list, lo, none, attach)) = out else {
            return;
        };
        assert!(list.contains(&(1, "lo".to_string())), "{list:?}");
        assert_eq!(lo, ("lo".to_string(), ARPHRD_LOOPBACK));
        assert_eq!(none.kind(), io::ErrorKind::NotFound);
        assert_eq!(attach, "interface 4242: no such interface");
    }

    // ---- behaviour on loopback --------------------------------------------

    /// A UDP socket bound to `addr`, non-blocking; `reuse_addr` as Kamailio
    /// binds its listening sockets.
    fn udp(addr: &str, reuse_addr: bool) -> UdpSocket {
        let addr: SocketAddr = addr.parse().unwrap();
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).unwrap();
        if addr.is_ipv6() {
            s.set_only_v6(true).unwrap();
        }
        s.set_reuse_address(reuse_addr).unwrap();
        s.bind(&addr.into()).unwrap();
        s.set_nonblocking(true).unwrap();
        s.into()
    }

    /// `len` bytes of SIP-looking text whose Via branches carry another
    /// instance's prefix (so the scan meets many near-misses), with
    /// `marker` written at `at`.
    fn datagram(len: usize, marker_at: Option<(usize, &[u8])>) -> Vec<u8> {
        let filler =
            b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK.WxYzabcdefgh\r\n";
        let mut d: Vec<u8> = filler.iter().copied().cycle().take(len).collect();
        if let Some((at, marker)) = marker_at {
            d[at..at + marker.len()].copy_from_slice(marker);
        }
        d
    }

    /// A phone's 200 OK to a kaping OPTIONS whose token starts with
    /// `instance`.
    fn reply_200(instance: &str, ip: &str) -> Vec<u8> {
        let token = format!("{instance}hhhhhhhhllllllllmmmmmmmm");
        format!(
            "SIP/2.0 200 OK\r\n\
             Via: SIP/2.0/UDP {ip}:5060;rport=5060;branch=z9hG4bK.{token}\r\n\
             Via: SIP/2.0/UDP {ip}:5070;branch=z9hG4bK.{token}\r\n\
             From: <sip:ping@{ip}>;tag={token}\r\n\
             To: <sip:alice@{ip}>;tag=8d3f1e\r\n\
             Call-ID: {token}@kaping\r\n\
             CSeq: 1 OPTIONS\r\n\
             Server: Yealink SIP-T46U 108.86.0.20\r\n\
             Content-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    /// One datagram to send: from its own socket (so its source port names
    /// it), to `to`, and the socket it must arrive at.
    struct Case {
        name: String,
        payload: Vec<u8>,
        to: SocketAddr,
        expect: &'static str,
    }

    fn case(name: impl Into<String>, payload: Vec<u8>, to: &str, expect: &'static str) -> Case {
        Case {
            name: name.into(),
            payload,
            to: to.parse().unwrap(),
            expect,
        }
    }

    /// Sends every case and waits (at most 5 s) until each has arrived at
    /// one of `sockets`; returns where each went, by case name.
    fn deliver(
        cases: &[Case],
        sockets: &[(&'static str, &UdpSocket)],
    ) -> HashMap<String, &'static str> {
        let mut by_port = HashMap::new();
        let mut senders = Vec::new();
        for c in cases {
            let from = if c.to.is_ipv6() {
                "[::1]:0"
            } else {
                "127.0.0.1:0"
            };
            let s = UdpSocket::bind(from).unwrap();
            by_port.insert(
                s.local_addr().unwrap().port(),
                (c.name.clone(), c.payload.clone()),
            );
            s.send_to(&c.payload, c.to).unwrap();
            senders.push(s);
        }
        collect(&by_port, sockets)
    }

    /// Waits (at most 5 s) until every datagram of `by_port` (source port
    /// → case name and payload) has arrived at one of `sockets`; returns
    /// where each went, by case name.
    fn collect(
        by_port: &HashMap<u16, (String, Vec<u8>)>,
        sockets: &[(&'static str, &UdpSocket)],
    ) -> HashMap<String, &'static str> {
        let mut landed = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 2048];
        while landed.len() < by_port.len() && Instant::now() < deadline {
            for (name, s) in sockets {
                while let Ok((n, from)) = s.recv_from(&mut buf) {
                    let (case, payload) = &by_port[&from.port()];
                    assert_eq!(&buf[..n], &payload[..], "{case}: payload changed");
                    assert!(landed.insert(case.clone(), *name).is_none(), "{case} twice");
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        landed
    }

    fn check(cases: &[Case], landed: &HashMap<String, &'static str>) {
        let mut wrong = Vec::new();
        for c in cases {
            let got = landed.get(&c.name).copied().unwrap_or("nowhere");
            if got != c.expect {
                wrong.push(format!("{}: at {got}, expected {}", c.name, c.expect));
            }
        }
        assert!(wrong.is_empty(), "misdelivered:\n{}", wrong.join("\n"));
    }

    const LO: u32 = 1;

    /// The behaviour test: marked replies reach kaping's socket, everything
    /// else the proxy's, on IPv4 and IPv6; with kaping's socket gone they
    /// reach the proxy (counted); after the drop the program is gone.
    #[test]
    fn diverts_marked_replies_on_loopback() {
        if !require_root("diverts_marked_replies_on_loopback") {
            return;
        }
        let ran = in_fresh_netns(|| {
            let proxy = udp("127.0.0.1:5060", true);
            let other = udp("127.0.0.1:5061", true);
            let kaping = udp("0.0.0.0:5070", false);
            let proxy6 = udp("[::1]:5060", true);
            let kaping6 = udp("[::]:5070", false);
            let divert = Divert::attach(&DivertSpec {
                ifindexes: &[LO],
                proxy_port: PROXY_PORT,
                target: "0.0.0.0:5070".parse().unwrap(),
                target6: Some("[::]:5070".parse().unwrap()),
                marker: MARKER,
            })
            .unwrap_or_else(|e| panic!("attach: {e}"));
            assert_eq!(divert.attached(), vec![LO]);
            assert!(divert.skipped().is_empty());

            let m = MARKER.len();
            let w = WINDOW_LEN;
            let p4 = "127.0.0.1:5060";
            let p6 = "[::1]:5060";
            let near = |k: usize| {
                let mut v = MARKER.to_vec();
                v[k] ^= 0x20;
                v
            };
            let (near0, near_mid, near_last) = (near(0), near(m / 2), near(m - 1));
            let mut cases = vec![
                case(
                    "marker at 0",
                    datagram(300, Some((0, MARKER))),
                    p4,
                    "kaping",
                ),
                case(
                    "marker at 37",
                    datagram(300, Some((37, MARKER))),
                    p4,
                    "kaping",
                ),
                case("real 200 OK", reply_200("AbCd", "127.0.0.1"), p4, "kaping"),
                case(
                    "marker at W-m",
                    datagram(400, Some((w - m, MARKER))),
                    p4,
                    "kaping",
                ),
                case(
                    "marker at W-m, len W",
                    datagram(w, Some((w - m, MARKER))),
                    p4,
                    "kaping",
                ),
                case(
                    "marker ends a short datagram",
                    datagram(40, Some((40 - m, MARKER))),
                    p4,
                    "kaping",
                ),
                case("datagram is the marker", MARKER.to_vec(), p4, "kaping"),
                case(
                    "marker after a partial match",
                    [&b"SIP/2.0 200 OK\r\nVia: z9hG4bK."[..], MARKER, b"\r\n"].concat(),
                    p4,
                    "kaping",
                ),
                case(
                    "another instance's 200 OK",
                    reply_200("WxYz", "127.0.0.1"),
                    p4,
                    "proxy",
                ),
                case("no marker", datagram(600, None), p4, "proxy"),
                case(
                    "marker at W-m+1",
                    datagram(400, Some((w - m + 1, MARKER))),
                    p4,
                    "proxy",
                ),
                case(
                    "marker at W+10",
                    datagram(400, Some((w + 10, MARKER))),
                    p4,
                    "proxy",
                ),
                case(
                    "near miss, first byte",
                    datagram(300, Some((20, &near0))),
                    p4,
                    "proxy",
                ),
                case(
                    "near miss, middle byte",
                    datagram(300, Some((20, &near_mid))),
                    p4,
                    "proxy",
                ),
                case(
                    "near miss, last byte",
                    datagram(300, Some((20, &near_last))),
                    p4,
                    "proxy",
                ),
                case(
                    "truncated marker",
                    datagram(40, Some((40 - m + 1, &MARKER[..m - 1]))),
                    p4,
                    "proxy",
                ),
                case("marker minus a byte", MARKER[..m - 1].to_vec(), p4, "proxy"),
                case("empty", Vec::new(), p4, "proxy"),
                case("one byte", b"z".to_vec(), p4, "proxy"),
                case(
                    "marked, to another port",
                    datagram(300, Some((37, MARKER))),
                    "127.0.0.1:5061",
                    "other",
                ),
                case("v6 real 200 OK", reply_200("AbCd", "::1"), p6, "kaping6"),
                case(
                    "v6 marker at W-m",
                    datagram(400, Some((w - m, MARKER))),
                    p6,
                    "kaping6",
                ),
                case(
                    "v6 another instance",
                    reply_200("WxYz", "::1"),
                    p6,
                    "proxy6",
                ),
                case(
                    "v6 marker at W-m+1",
                    datagram(400, Some((w - m + 1, MARKER))),
                    p6,
                    "proxy6",
                ),
                case("v6 empty", Vec::new(), p6, "proxy6"),
            ];
            // Many short and long datagrams, marked at every possible start:
            // all diverted. (Stale window bytes from the long ones must not
            // make the short unmarked ones that follow match.)
            for at in (0..=w - m).step_by(17) {
                cases.push(case(
                    format!("sweep: marker at {at}"),
                    datagram(w + 40, Some((at, MARKER))),
                    p4,
                    "kaping",
                ));
                cases.push(case(
                    format!("sweep: short after {at}"),
                    datagram(at.min(w - m) / 2 + m, None),
                    p4,
                    "proxy",
                ));
            }
            let sockets = [
                ("proxy", &proxy),
                ("other", &other),
                ("kaping", &kaping),
                ("proxy6", &proxy6),
                ("kaping6", &kaping6),
            ];
            let landed = deliver(&cases, &sockets);
            check(&cases, &landed);
            let diverted = cases
                .iter()
                .filter(|c| c.expect.starts_with("kaping"))
                .count() as u64;
            let passed = cases
                .iter()
                .filter(|c| c.expect.starts_with("proxy"))
                .count() as u64;
            let counters = divert.counters();
            eprintln!("after {} datagrams: {counters:?}", cases.len());
            assert_eq!(
                counters,
                DivertCounters {
                    diverted,
                    passed,
                    no_socket: 0,
                    assign_failed: 0
                }
            );

            // kaping's socket gone: its replies go to the proxy, counted.
            drop(kaping);
            let gone = [case(
                "marked, kaping closed",
                reply_200("AbCd", "127.0.0.1"),
                p4,
                "proxy",
            )];
            check(
                &gone,
                &deliver(&gone, &[("proxy", &proxy), ("other", &other)]),
            );
            assert_eq!(divert.counters().no_socket, 1);

            // Detached: marked replies reach the proxy again.
            drop(divert);
            let after = [
                case(
                    "marked, after drop",
                    reply_200("AbCd", "127.0.0.1"),
                    p4,
                    "proxy",
                ),
                case(
                    "v6 marked, after drop",
                    reply_200("AbCd", "::1"),
                    p6,
                    "proxy6",
                ),
            ];
            check(
                &after,
                &deliver(
                    &after,
                    &[
                        ("proxy", &proxy),
                        ("proxy6", &proxy6),
                        ("kaping6", &kaping6),
                    ],
                ),
            );
        });
        if ran.is_none() {
            eprintln!("SKIP: diverts_marked_replies_on_loopback");
        }
    }

    /// A tun (layer-3, no link header) or tap (Ethernet) device in this
    /// thread's namespace, up, allowed to receive packets for 127.0.0.0/8
    /// (`route_localnet`), so that packets written to it arrive through the
    /// full receive path of a real interface (route lookup included), not
    /// loopback's shortcut.
    struct Tun {
        file: std::fs::File,
        ifindex: u32,
        mac: [u8; 6],
    }

    fn tun(name: &str, tap: bool) -> Tun {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("/dev/net/tun");
        // SAFETY: plain data, zeroes valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        let kind = if tap { libc::IFF_TAP } else { libc::IFF_TUN };
        req.ifr_ifru.ifru_flags = (kind | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads the name and flags in `req`, which lives
        // across the call; the device lives as long as `file`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", io::Error::last_os_error());
        set_link_up(name).unwrap();
        // This namespace's sysctl (the device exists nowhere else).
        std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{name}/route_localnet"),
            "1",
        )
        .unwrap();
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert_ne!(ifindex, 0);
        let sock = ioctl_socket().unwrap();
        // SAFETY: SIOCGIFHWADDR reads the name and writes the address into
        // `req`; the union member read is the one it wrote.
        let mac = unsafe {
            assert_eq!(
                libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req),
                0
            );
            let data = req.ifr_ifru.ifru_hwaddr.sa_data;
            std::array::from_fn(|k| data[k] as u8)
        };
        Tun { file, ifindex, mac }
    }

    /// An IPv4 + UDP packet (UDP checksum 0: none, as RFC 768 allows).
    fn ipv4_udp(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
        let total = (20 + 8 + payload.len()) as u16;
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
        p.extend_from_slice(&src.0);
        p.extend_from_slice(&dst.0);
        let mut sum: u32 = p
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        p.extend_from_slice(&src.1.to_be_bytes());
        p.extend_from_slice(&dst.1.to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    /// On a tun device (no link-layer header, the `L2 = 0` program) and a
    /// tap device (Ethernet, `L2 = 14`), packets written to the device
    /// arrive through the whole receive path: marked ones reach kaping's
    /// socket, the rest the proxy's.
    #[test]
    fn diverts_on_tun_and_tap_devices() {
        if !require_root("diverts_on_tun_and_tap_devices") {
            return;
        }
        let ran = in_fresh_netns(|| {
            use std::io::Write;
            let proxy = udp("127.0.0.1:5060", true);
            let kaping = udp("0.0.0.0:5070", false);
            let sockets = [("proxy", &proxy), ("kaping", &kaping)];
            for tap in [false, true] {
                let dev = tun(if tap { "kdivtap0" } else { "kdivtun0" }, tap);
                let divert = Divert::attach(&DivertSpec {
                    ifindexes: &[dev.ifindex],
                    proxy_port: PROXY_PORT,
                    target: "0.0.0.0:5070".parse().unwrap(),
                    target6: None,
                    marker: MARKER,
                })
                .unwrap_or_else(|e| panic!("attach: {e}"));
                let cases = [
                    ("marked reply", reply_200("AbCd", "127.0.0.1"), "kaping"),
                    ("short marked", datagram(40, Some((20, MARKER))), "kaping"),
                    ("another instance", reply_200("WxYz", "127.0.0.1"), "proxy"),
                    ("short, no marker", datagram(40, None), "proxy"),
                ];
                let mut by_port = HashMap::new();
                for (k, (name, payload, _)) in cases.iter().enumerate() {
                    let sport = 40000 + k as u16;
                    let mut packet = ipv4_udp(
                        ([127, 0, 0, 2], sport),
                        ([127, 0, 0, 1], PROXY_PORT),
                        payload,
                    );
                    if tap {
                        let mut frame = dev.mac.to_vec();
                        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
                        frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
                        frame.append(&mut packet);
                        packet = frame;
                    }
                    (&dev.file).write_all(&packet).unwrap();
                    by_port.insert(sport, (name.to_string(), payload.clone()));
                }
                let landed = collect(&by_port, &sockets);
                let cases: Vec<Case> = cases
                    .into_iter()
                    .map(|(name, payload, expect)| case(name, payload, "127.0.0.1:5060", expect))
                    .collect();
                check(&cases, &landed);
                let counters = divert.counters();
                eprintln!("{}: {counters:?}", if tap { "tap" } else { "tun" });
                assert_eq!((counters.diverted, counters.passed), (2, 2));
            }
        });
        if ran.is_none() {
            eprintln!("SKIP: diverts_on_tun_and_tap_devices");
        }
    }

    /// With a specified target address the lookup uses it: a socket bound to
    /// that address is found; with an unspecified target, a socket bound to
    /// an address other than the reply's destination is not (`no_socket`),
    /// and the reply goes to the proxy.
    #[test]
    fn target_address_decides_the_lookup() {
        if !require_root("target_address_decides_the_lookup") {
            return;
        }
        let ran = in_fresh_netns(|| {
            let proxy = udp("127.0.0.1:5060", true);
            let kaping = udp("127.0.0.2:5070", false);
            let sockets = [("proxy", &proxy), ("kaping", &kaping)];
            let p4 = "127.0.0.1:5060";
            for (target, expect, no_socket) in [
                ("127.0.0.2:5070", "kaping", 0),
                ("0.0.0.0:5070", "proxy", 1),
                ("127.0.0.3:5070", "proxy", 1),
            ] {
                let divert = Divert::attach(&DivertSpec {
                    ifindexes: &[LO],
                    proxy_port: PROXY_PORT,
                    target: target.parse().unwrap(),
                    target6: None,
                    marker: MARKER,
                })
                .unwrap();
                let cases = [case(
                    format!("target {target}"),
                    reply_200("AbCd", "127.0.0.1"),
                    p4,
                    expect,
                )];
                check(&cases, &deliver(&cases, &sockets));
                assert_eq!(divert.counters().no_socket, no_socket, "target {target}");
            }
        });
        if ran.is_none() {
            eprintln!("SKIP: target_address_decides_the_lookup");
        }
    }

    /// kaping's workers share one port in an SO_REUSEPORT group steered by
    /// `steer`'s classic BPF: a diverted reply still lands on the socket the
    /// steering picks for its source (the group's selection runs again
    /// after `bpf_sk_assign`).
    #[test]
    fn reuseport_steering_still_applies() {
        if !require_root("reuseport_steering_still_applies") {
            return;
        }
        let ran = in_fresh_netns(|| {
            use crate::io::steer;
            use crate::io::udp::{bind_udp, SocketOptions};
            const WORKERS: u32 = 3;
            let proxy = udp("127.0.0.1:5060", true);
            let opts = SocketOptions {
                reuse_port: true,
                nonblocking: true,
                ..SocketOptions::default()
            };
            let group: Vec<UdpSocket> = (0..WORKERS)
                .map(|_| {
                    bind_udp("0.0.0.0:5070".parse().unwrap(), &opts)
                        .unwrap()
                        .0
                        .into()
                })
                .collect();
            steer::attach(&Socket::from(group[0].try_clone().unwrap()), WORKERS, false).unwrap();
            let divert = Divert::attach(&DivertSpec {
                ifindexes: &[LO],
                proxy_port: PROXY_PORT,
                target: "0.0.0.0:5070".parse().unwrap(),
                target6: None,
                marker: MARKER,
            })
            .unwrap();
            let names = ["worker0", "worker1", "worker2"];
            let mut sockets = vec![("proxy", &proxy)];
            sockets.extend(names.iter().copied().zip(group.iter()));
            // Send from 24 sockets and work out, from each source port,
            // which worker the steering must pick.
            let mut senders = Vec::new();
            let mut want = HashMap::new();
            for _ in 0..24 {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                let src = s.local_addr().unwrap();
                want.insert(src.port(), names[steer::shard_of(&src, WORKERS) as usize]);
                s.send_to(&reply_200("AbCd", "127.0.0.1"), "127.0.0.1:5060")
                    .unwrap();
                senders.push(s);
            }
            let mut landed = HashMap::new();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = [0u8; 2048];
            while landed.len() < want.len() && Instant::now() < deadline {
                for (name, s) in &sockets {
                    while let Ok((_, from)) = s.recv_from(&mut buf) {
                        landed.insert(from.port(), *name);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(landed, want);
            let used: std::collections::HashSet<_> = want.values().collect();
            assert!(used.len() > 1, "the sources should spread over workers");
            assert_eq!(divert.counters().diverted, 24);
        });
        if ran.is_none() {
            eprintln!("SKIP: reuseport_steering_still_applies");
        }
    }
}
