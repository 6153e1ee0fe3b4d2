//! An eventfd that wakes a worker sleeping in its backend's poll: the main
//! thread pushes commands (or another worker hands over a reply), then
//! calls [`Waker::wake`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Cloneable handle to one worker's eventfd.
#[derive(Clone, Debug)]
pub struct Waker {
    fd: Arc<OwnedFd>,
}

impl Waker {
    pub fn new() -> io::Result<Waker> {
        // SAFETY: eventfd has no memory-safety preconditions; a non-negative
        // result is a fresh descriptor that we alone own from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a valid descriptor owned by nobody else.
        Ok(Waker {
            fd: Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }),
        })
    }

    /// Makes the next (or current) poll of the owning worker return.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64, as eventfd requires. A
        // failure can only be EAGAIN (counter saturated: already awake).
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Clears pending wake-ups; returns true if there were any.
    pub fn drain(&self) -> bool {
        let mut n: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; non-blocking.
        let rc = unsafe { libc::read(self.fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
        rc == 8
    }
}

impl AsRawFd for Waker {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_then_drain() {
        let w = Waker::new().unwrap();
        assert!(!w.drain());
        w.clone().wake();
        w.wake();
        assert!(w.drain());
        assert!(!w.drain());
    }
}
