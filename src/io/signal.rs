//! Turning SIGINT/SIGTERM/SIGHUP into flags that loops poll.
//!
//! The handlers only store to static atomics (async-signal-safe); no
//! allocation, no locks, nothing else runs in signal context. Installed with
//! `SA_RESTART` cleared so a blocking system call returns `EINTR` and the
//! caller re-checks the flags promptly.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_reload(_: libc::c_int) {
    RELOAD.store(true, Ordering::SeqCst);
}

fn install(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the
    // handler is an `extern "C" fn(c_int)` that only touches atomics, which
    // is async-signal-safe; `sigaction` reads `action` during the call only.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as usize;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Routes SIGINT and SIGTERM to [`stop_requested`], SIGHUP to
/// [`take_reload`]. Idempotent.
pub fn install_handlers() -> io::Result<()> {
    install(libc::SIGINT, on_stop)?;
    install(libc::SIGTERM, on_stop)?;
    install(libc::SIGHUP, on_reload)
}

/// True once SIGINT or SIGTERM arrived (or [`request_stop`] was called).
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Asks every loop polling [`stop_requested`] to stop, as a signal would.
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}

/// True once per SIGHUP received since the last call.
pub fn take_reload() -> bool {
    RELOAD.swap(false, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_set_the_flags() {
        install_handlers().unwrap();
        assert!(!take_reload());
        // SAFETY: raise() delivers the signal to this thread synchronously;
        // the handler installed above only stores to an atomic.
        unsafe { libc::raise(libc::SIGHUP) };
        assert!(take_reload());
        assert!(!take_reload(), "reload is consumed once");
        // SAFETY: as above; without our handler SIGTERM would end the test
        // process, so reaching the assertion proves the handler is in place.
        unsafe { libc::raise(libc::SIGTERM) };
        assert!(stop_requested());
    }
}
