//! Process resource limits that socket-heavy programs need raised.
//!
//! Owns [`raise_nofile_limit`]: one `getrlimit`/`setrlimit` pair, no state.
//! Callers: the load generator's `phones` (one UDP socket per simulated
//! phone: 10,000 phones need more descriptors than the usual soft limit of
//! 1024), before it binds anything. The daemon never calls it: its sockets
//! are a handful per worker.

use std::io;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, or to `wanted` if
/// that is lower, and never lowers it. Returns the soft limit in force
/// afterwards. An unprivileged process may always raise its soft limit up
/// to its hard limit (setrlimit(2)); past the hard limit it is the caller's
/// to say what to change.
pub fn raise_nofile_limit(wanted: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the
    // call; getrlimit writes nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let target = wanted.min(lim.rlim_max);
    if target <= lim.rlim_cur {
        return Ok(lim.rlim_cur);
    }
    let new = libc::rlimit {
        rlim_cur: target,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: `new` is a valid rlimit read during the call only; its soft
    // value is at most the hard value just read, which setrlimit accepts
    // from any process.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_lowers_and_never_passes_the_hard_limit() {
        let mut before = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut before) },
            0
        );
        // Asking for less than the soft limit changes nothing.
        assert_eq!(raise_nofile_limit(1).unwrap(), before.rlim_cur);
        // Asking for everything gives the hard limit.
        let got = raise_nofile_limit(u64::MAX).unwrap();
        assert_eq!(got, before.rlim_max);
    }
}
