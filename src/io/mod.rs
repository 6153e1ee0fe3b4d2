//! Everything that touches the kernel's network stack.
//!
//! `udp` wraps the batched UDP system calls (`recvmmsg`/`sendmmsg`) and the
//! socket options kaping needs (receive timestamps, packet info, error
//! queues, large buffers) behind a small safe API. The load generator and
//! the `mmsg` worker backend are built on it.
//!
//! This is one of the two modules where `unsafe` is allowed (the other is
//! `shm`): each block names the invariant that makes it sound.
#![allow(unsafe_code)]

pub mod signal;
pub mod udp;
