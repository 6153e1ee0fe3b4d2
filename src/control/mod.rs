//! The control interface: JSON-RPC 2.0 over a UNIX stream socket
//! (`rpc` framing and messages, `server` I/O threads, `registry` the
//! daemon's index of contacts, `client` for `kaping ctl` and tools).

pub mod client;
pub mod registry;
pub mod rpc;
pub mod server;
