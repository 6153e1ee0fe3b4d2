//! kaping: a standalone SIP keepalive pinger (see DESIGN.md).
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod engine;
pub mod io;
pub mod shm;
pub mod sim;
pub mod wire;
