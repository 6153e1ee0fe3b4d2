//! The simulated SIP platform: a responder that plays millions of phones on
//! loopback, and the contact mapping that names them.
//!
//! * `fate`: what happens to each contact (stable: dead, flapping, error
//!   code) and to each packet (noise: loss, latency, malformed and duplicate
//!   replies); a pure function of the Request-URI and a seed, so another
//!   process can predict it.
//! * `request`: the minimal request parser and response writer
//!   (RFC 3261 §8.2.6), borrowing and allocation-free.
//! * `responder`: [`Responder`], threads answering every request from the
//!   exact address that was pinged (`IP_PKTINFO`), batched 64 datagrams per
//!   system call, sleeping in one `ppoll` over all their sockets.
//! * `contacts`: contact `i` is `sip:u<i>@127.a.b.c:P` ([`contact_uri`]);
//!   the whole of 127.0.0.0/8 is local on Linux, so one socket bound to
//!   0.0.0.0:P answers for every 127.a.b.c:P.
//! * `capture`: a small responder that keeps copies of the genuine replies
//!   it sends, and can fall silent per contact (replay floods).
//! * `icmp`: forged ICMP port unreachables quoting datagrams never sent,
//!   and the raw socket to send them from (tests, ICMP floods).
//!
//! Users: `kaping demo` runs a [`Responder`] in-process next to the daemon's
//! workers; `kaping-loadgen` (tools/) is a command line over this module
//! (`contacts`, `serve`, `ceiling`). Nothing here is on the daemon's own data
//! path, and nothing here uses `unsafe`: every system call goes through
//! `crate::io`.
//!
//! In-process use:
//! ```no_run
//! use kaping::sim::{contact_uri, FatePlan, ListenSpec, Responder, ServeConfig};
//! let plan = FatePlan::new(7, 0.1, 0.05, 503, 0.0, 10_000)?; // 10% dead, 5% 503
//! let r = Responder::spawn(ServeConfig::new(vec![ListenSpec::parse("0.0.0.0:0")?], plan))?;
//! let port = r.local_addrs()[0].port();
//! let first = contact_uri(0, port, 1, false); // "sip:u0@127.0.0.1:<port>"
//! # let _ = first;
//! // ... ping, watching r.counters() ...
//! let totals = r.stop();
//! println!("answered {}", totals.answered);
//! # Ok::<(), String>(())
//! ```

pub mod capture;
pub mod contacts;
pub mod fate;
pub mod icmp;
pub mod request;
pub mod responder;

pub use contacts::{contact_addr, contact_uri, write_contacts, Layout};
pub use fate::{parse_duration_ns, Fate, FatePlan, LatencyDist, Rng};
pub use responder::{
    Counters, ListenSpec, Noise, Responder, ServeConfig, BATCH, DATAGRAM_MAX,
    SOCKETS_PER_THREAD_MAX,
};
