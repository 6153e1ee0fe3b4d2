//! Giving up `CAP_BPF` and `CAP_NET_ADMIN` once the divert program is
//! attached (issue 15: "divert needs them only at start").
//!
//! Owns [`drop_divert_capabilities`]. Caller: the daemon, once, when its
//! start is complete (contacts loaded, control socket and registrar feed
//! opened) and at least one divert program is attached. Never called on a
//! hot path; never called by a process that holds neither capability.
//!
//! Ground rules:
//!
//! * Capabilities are a property of each **thread** (capset(2) changes only
//!   the calling thread), and kaping's workers and service threads were
//!   started before the program was attached. So the calling thread drops
//!   its own, then every other thread of the process is sent
//!   [`drop_signal`] and drops its own in the handler, with nothing but
//!   raw `prctl`/`capget`/`capset` system calls (async-signal-safe), as
//!   glibc does for `setuid` across threads. A thread started after that
//!   inherits the reduced sets from its creator.
//! * Only the two bits are cleared, from the effective, permitted and
//!   inheritable sets and the ambient set (what systemd's
//!   `AmbientCapabilities=` raised); every other capability a thread holds
//!   (root's, when run as root) is left as it was. Clearing bits is always
//!   permitted, so a thread's drop cannot fail for lack of privilege.
//! * The bounding set is lowered too where the process may
//!   (`CAP_SETPCAP`, i.e. root); the service has no `CAP_SETPCAP`, and
//!   with the permitted set cleared and `NoNewPrivileges=yes` there is no
//!   way back either way.
//! * Success is checked, not assumed: every thread's `CapEff`/`CapPrm` in
//!   `/proc/self/task/*/status` must lack both bits, else an error says
//!   which thread kept them.
//! * The handler stays installed afterwards (a late duplicate signal finds
//!   nothing left to drop); kaping's other signal handlers clear
//!   `SA_RESTART` already, so every blocking call in kaping tolerates the
//!   `EINTR` the signal may cause.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// `CAP_NET_ADMIN` and `CAP_BPF` (linux/capability.h); `CAP_BPF` is in the
/// second 32-bit word of the v3 sets.
const CAP_NET_ADMIN: u32 = 12;
const CAP_BPF: u32 = 39;
const DROPPED: [u32; 2] = [CAP_NET_ADMIN, CAP_BPF];
/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// How long the other threads get to run their handler, per round.
const ROUND_WAIT: Duration = Duration::from_millis(500);
/// Rounds of signalling (a thread started during a round by a thread that
/// had not dropped yet is caught by the next).
const ROUNDS: usize = 4;

/// Threads that ran the handler (for the caller's wait).
static HANDLED: AtomicU32 = AtomicU32::new(0);

#[repr(C)]
#[derive(Clone, Copy, Default)]
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

/// The signal other threads receive: the highest real-time signal, which
/// neither glibc (it reserves the lowest) nor kaping uses otherwise.
pub fn drop_signal() -> libc::c_int {
    libc::SIGRTMAX()
}

/// The two bits as masks of word 0 and word 1 of a v3 set.
fn masks() -> [u32; 2] {
    let mut m = [0u32; 2];
    for cap in DROPPED {
        m[(cap / 32) as usize] |= 1 << (cap % 32);
    }
    m
}

/// Clears the two capabilities from the calling thread's ambient,
/// effective, permitted and inheritable sets. Only raw system calls on
/// stack memory: safe to run in a signal handler. Returns 0 or an errno.
fn drop_in_this_thread() -> i32 {
    for cap in DROPPED {
        // SAFETY: PR_CAP_AMBIENT_LOWER takes integers only; lowering an
        // ambient capability needs no privilege. EINVAL (a kernel without
        // ambient sets, or CAP_BPF unknown to it) leaves nothing to lower.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_LOWER as libc::c_ulong,
                cap as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
    }
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes one header and two CapData (v3) into memory
    // that lives on this stack frame across the call; pid 0 is this thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return errno();
    }
    let m = masks();
    for (word, mask) in data.iter_mut().zip(m) {
        word.effective &= !mask;
        word.permitted &= !mask;
        word.inheritable &= !mask;
    }
    // SAFETY: capset reads the header and two CapData from this frame;
    // the new sets are the old ones with bits cleared, which the kernel
    // accepts from any thread (new permitted ⊆ old permitted, effective ⊆
    // permitted, inheritable only lowered).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return errno();
    }
    0
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

extern "C" fn on_drop_signal(_: libc::c_int) {
    // Preserve the interrupted code's errno: the calls below may set it.
    // SAFETY: __errno_location returns this thread's errno slot, valid for
    // the thread's lifetime.
    let saved = unsafe { *libc::__errno_location() };
    let _ = drop_in_this_thread();
    HANDLED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

fn install_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is "no flags, empty mask"; the handler
    // makes only raw system calls and touches an atomic (async-signal-
    // safe); sigaction reads `action` during the call only.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int) = on_drop_signal;
        action.sa_sigaction = handler as usize;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(drop_signal(), &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Thread ids of this process, from `/proc/self/task`.
fn tasks() -> io::Result<Vec<i32>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        if let Some(tid) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(tid);
        }
    }
    Ok(out)
}

/// A thread's `CapEff` and `CapPrm` (hex masks), or None once it exited.
fn thread_caps(tid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    Some((field("CapEff:")?, field("CapPrm:")?))
}

fn holds_dropped(caps: u64) -> bool {
    DROPPED.iter().any(|c| caps & (1u64 << c) != 0)
}

/// True when some thread of this process holds `CAP_BPF` or
/// `CAP_NET_ADMIN` in its effective or permitted set.
pub fn any_thread_holds_divert_capabilities() -> bool {
    tasks().unwrap_or_default().into_iter().any(|tid| {
        thread_caps(tid).is_some_and(|(eff, prm)| holds_dropped(eff) || holds_dropped(prm))
    })
}

/// What [`drop_divert_capabilities`] did, for the log line.
#[derive(Debug, PartialEq, Eq)]
pub enum Dropped {
    /// No thread held either capability: nothing done.
    NotHeld,
    /// Every thread (this many) gave both up.
    Threads(usize),
}

/// Drops `CAP_BPF` and `CAP_NET_ADMIN` from every thread of the process
/// (see the module's ground rules). An error names the thread that kept
/// them or the call that failed.
pub fn drop_divert_capabilities() -> Result<Dropped, String> {
    if !any_thread_holds_divert_capabilities() {
        return Ok(Dropped::NotHeld);
    }
    install_handler().map_err(|e| format!("sigaction: {e}"))?;
    let rc = drop_in_this_thread();
    if rc != 0 {
        return Err(format!("capset: {}", io::Error::from_raw_os_error(rc)));
    }
    // SAFETY: getpid and gettid take no arguments and cannot fail.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    for _ in 0..ROUNDS {
        let holders: Vec<i32> = tasks()
            .map_err(|e| format!("/proc/self/task: {e}"))?
            .into_iter()
            .filter(|&tid| tid != me)
            .filter(|&tid| {
                thread_caps(tid).is_some_and(|(eff, prm)| holds_dropped(eff) || holds_dropped(prm))
            })
            .collect();
        if holders.is_empty() {
            let threads = tasks().map(|t| t.len()).unwrap_or(0);
            // Lower the bounding set where allowed (root); EPERM (the
            // service: no CAP_SETPCAP) leaves it, harmlessly (see above).
            for cap in DROPPED {
                // SAFETY: integers only.
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            }
            return Ok(Dropped::Threads(threads));
        }
        let before = HANDLED.load(Ordering::SeqCst);
        let mut sent = 0u32;
        for &tid in &holders {
            // SAFETY: tgkill takes integers; a thread that exited since the
            // scan yields ESRCH, which is fine (it holds nothing now).
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, drop_signal()) } == 0 {
                sent += 1;
            }
        }
        let deadline = Instant::now() + ROUND_WAIT;
        while HANDLED.load(Ordering::SeqCst).wrapping_sub(before) < sent
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let kept: Vec<String> = tasks()
        .unwrap_or_default()
        .into_iter()
        .filter(|&tid| {
            thread_caps(tid).is_some_and(|(eff, prm)| holds_dropped(eff) || holds_dropped(prm))
        })
        .map(|tid| tid.to_string())
        .collect();
    if kept.is_empty() {
        Ok(Dropped::Threads(tasks().map(|t| t.len()).unwrap_or(0)))
    } else {
        Err(format!(
            "threads {} kept CAP_BPF/CAP_NET_ADMIN after {ROUNDS} rounds",
            kept.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_name_the_two_bits() {
        assert_eq!(masks(), [1 << 12, 1 << (39 - 32)]);
        assert!(holds_dropped(1 << 12));
        assert!(holds_dropped(1 << 39));
        assert!(!holds_dropped(!((1u64 << 12) | (1u64 << 39))));
    }
}
