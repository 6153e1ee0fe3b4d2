//! The registrar feed, wire layer: kaping as a passive node on Kamailio's
//! DMQ bus (`dmq` + `dmq_usrloc`), following the location table live.
//!
//! Owns the bytes only: [`dmq`] (KDMQ requests and responses, node lists)
//! and [`usrloc`] (the JSON bodies of location changes). The node runtime
//! (sockets, timers, retransmissions, applying changes) is built on top.
//!
//! Ground rules:
//! * No I/O, no clock, no `unsafe`. Parsers never panic on any bytes and do
//!   bounded work (64 KiB datagrams, named limits on headers, nodes,
//!   records and field lengths); every reject has a stable `name()` for
//!   counters. Writers only append to a `Vec<u8>`.
//! * Everything here was checked against Debian's Kamailio 5.6.3 on
//!   loopback; the captured bytes are the fixtures in `tests/data/dmq/`,
//!   and `tests/dmq_wire.rs` runs the whole exchange against a real
//!   Kamailio.
//!
//! # The protocol
//!
//! Every DMQ message is a SIP request `KDMQ sip:<channel>@<node host:port>`
//! over UDP, sent statefully by Kamailio's tm (retransmitted from T1 =
//! 500 ms until a final response, 408 after `fr_timer`). The channel (the
//! R-URI user, the "peer id") selects the handler: `notification_peer`
//! (node lists, `notification_peer.c`), `usrloc` (`dmq_usrloc/usrloc_sync.c`)
//! and others (`htable`, `dialog`, ...; an unknown one is answered
//! `404 User Not Found`). There is no separate ping channel: pings are
//! `notification_peer` requests. Headers, as Kamailio 5.6.3 sends them
//! (`dmq_send_message()` in `dmq_funcs.c`):
//!
//! ```text
//! KDMQ sip:usrloc@127.0.0.1:5071 SIP/2.0
//! Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK0b4c.eaa788c6000000000000000000000000.0
//! To: <sip:usrloc@127.0.0.1:5071>
//! From: <sip:usrloc@127.0.0.1:5070>;tag=17e38db12cb64994c952f0bfdfeab491-2e22cc0b
//! CSeq: 10 KDMQ
//! Call-ID: 45fe1d1f3e7ab5ee-23439@127.0.0.1
//! Content-Length: 12
//! User-Agent: kamailio (5.6.3 (x86_64/linux))
//! Max-Forwards: 1
//! Content-Type: application/json
//!
//! {"action":3}
//! ```
//!
//! From and To are `sip:<channel>@<server_address host:port>` of sender and
//! receiver; the receiver finds the sending node by the From host and port
//! (`find_dmq_node_uri`), so kaping's From must carry the address it joined
//! with. The message sequence, kaping `K` at 127.0.0.1:5071, Kamailio `R`
//! at 127.0.0.1:5070 (`server_address`):
//!
//! ```text
//!  K                                                               R
//!  |-- KDMQ sip:notification_peer@R  (join)  ----------------------->|
//!  |   Max-Forwards: 2, Content-Type: text/plain                     |
//!  |   sip:127.0.0.1:5071;status=active\r\n   (CRLF is required)    |
//!  |<- 200 OK, Content-Type: text/plain, the node list in the body --|
//!  |   sip:127.0.0.1:5071;status=active\r\n                         |
//!  |   sip:127.0.0.1:5070;status=active\r\n   (one line per node    |
//!  |                         Kamailio knows, itself included)        |
//!  |<- KDMQ sip:notification_peer@K  (only when K was new and the    |
//!  |   join's Max-Forwards was >= 2: the list re-broadcast to every  |
//!  |   active node, Max-Forwards: 1)                                 |
//!  |-- 200 OK (Content-Length: 0) ---------------------------------->|
//!  |                                                                 |
//!  |-- KDMQ sip:usrloc@R  {"action":3}  (kaping's sync request) ---->|
//!  |<- KDMQ sip:usrloc@K  one per contact: {"action":1,...}, or with  |
//!  |   batch_msg_contacts > 1: {"multi":{"1":{...},"2":{...}}}       |
//!  |-- 200 OK each ------------------------------------------------->|
//!  |<- 200 OK to the sync request (after the last contact is sent) --|
//!  |                                                                 |
//!  |<- KDMQ sip:usrloc@K  {"action":1,...} per REGISTER (insert or   |
//!  |   refresh), {"action":2,...} per unREGISTER; no message when a  |
//!  |   contact merely expires                                        |
//!  |-- 200 OK ------------------------------------------------------>|
//!  |                                                                 |
//!  |<- KDMQ sip:notification_peer@K  every ping_interval (60 s):     |
//!  |   Max-Forwards: 1, body = R's node list                         |
//!  |-- 200 OK (Content-Length: 0) ---------------------------------->|
//! ```
//!
//! When Kamailio's `notification_address` names kaping instead, Kamailio
//! opens with its own `notification_peer` request (Max-Forwards: 2) at
//! start and, once kaping answered 200, its sync request `{"action":3}`
//! on `usrloc` (its init callback, `usrloc_dmq_request_sync`): a passive
//! node answers 200 and sends nothing back.
//!
//! Who defines what, in Kamailio's `src/modules/`: the KDMQ framing
//! `dmq/dmq_funcs.c` (`dmq_send_message`, `build_uri_str`, `ping_servers`),
//! request dispatch and status codes `dmq/message.c`, node lists and their
//! CRLF quirk `dmq/notification_peer.c` (`extract_node_list`,
//! `build_notification_body`), node line grammar and statuses
//! `dmq/dmqnode.c` (`build_node_str`, `dmq_get_status_int`), the JSON
//! `dmq_usrloc/usrloc_sync.c`.

pub mod dmq;
pub mod node;
pub mod rpc;
pub mod usrloc;

#[cfg(test)]
mod tests;
