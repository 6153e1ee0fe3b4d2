//! kaping: a standalone SIP keepalive pinger (see DESIGN.md).
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod contact;
pub mod daemon;
pub mod duration;
pub mod engine;
pub mod io;
pub mod shm;
pub mod sources;
pub mod timefmt;
pub mod wire;
