//! kaping: a standalone SIP keepalive pinger for millions of contacts.
//!
//! The architecture is in DESIGN.md; in brief, leaves first:
//!
//! * [`wire`]: SIP bytes only (URIs, the request template patched in place,
//!   the MAC'd From-tag token, the stateless reply matcher). No I/O.
//! * [`engine`]: a worker's building blocks (slab, timer wheel, liveness)
//!   and the worker loop itself.
//! * [`io`]: the kernel: batched UDP, the io_uring and mmsg backends behind
//!   one trait, reply steering, the divert program (replies handed to
//!   kaping before the proxy sees them), wake-ups and signals.
//! * [`shm`]: the shared-memory contract between the daemon and readers.
//! * [`config`], [`contact`], [`sources`], [`daemon`]: `kaping run`.
//! * [`access`]: who may read kaping's files (modes, `shm_group`,
//!   `state_group`, the user and group database).
//! * [`registrar`]: the registrar feed: Kamailio's DMQ bus (KDMQ
//!   messages, node lists, dmq_usrloc change records). No I/O.
//! * [`sim`]: the simulated SIP platform (responder, contact plans) used by
//!   the load generator, the demo and the tests.
//!
//! `unsafe` is denied here and allowed only in `io`, `shm`, `cpu` (the
//! prefetch hint) and `access` (the libc user and group database calls),
//! where every block states the invariant that makes it sound.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod access;
pub mod config;
pub mod contact;
pub mod control;
pub mod cpu;
pub mod daemon;
pub mod demo;
pub mod docgen;
pub mod duration;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod policy;
pub mod registrar;
pub mod shm;
pub mod sim;
pub mod sources;
pub mod state;
pub mod timefmt;
pub mod wire;
