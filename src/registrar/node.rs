//! The DMQ node runtime: kaping as a passive member of Kamailio's DMQ bus
//! (DESIGN §11), on top of the wire layer ([`super::dmq`], [`super::usrloc`]).
//!
//! One thread owns one UDP socket bound to kaping's node address and does
//! all the protocol work; what it learns goes to the daemon's main thread
//! as [`Feed`] items over a channel. Ground rules:
//!
//! * **Every KDMQ request from a known node is answered at once**: 200,
//!   or 400 for a usrloc body that does not parse (as Kamailio answers).
//!   Kamailio's tm retransmits from T1 = 500 ms until a final response,
//!   and an unanswered ping makes kaping an inactive node.
//! * **Retransmissions are duplicates**: a request whose (Call-ID, CSeq)
//!   was seen among the last [`SEEN_MAX`] is answered 200 again and not
//!   handed on.
//! * **Only peers and the nodes they announce are heard**: a request from
//!   any other address is counted (`not_peer`) and dropped unanswered.
//! * **Join, then sync**: kaping joins every configured peer
//!   (`notification_peer`, Max-Forwards 2 so the other registrars learn
//!   it), retrying with backoff until answered, and asks the first peer
//!   that answers for a full sync (`{"action":3}` on `usrloc`). Kamailio
//!   answers the sync request only after it sent every record, so its 200
//!   ([`Feed::SyncDone`]) means the sync is complete; it is not
//!   retransmitted eagerly (each copy would start another full sync), only
//!   after [`SYNC_TIMEOUT`].
//! * **Restarts**: a joined peer is joined again every [`REJOIN_EVERY`] (a
//!   restarted Kamailio forgets kaping unless its `notification_address`
//!   names it). A peer that asks kaping for a sync has just started: kaping
//!   asks it for one in turn ([`Feed::SyncStarted`]), and the daemon drops
//!   the contacts the new sync did not refresh once its grace period ends.
//!   A peer that had forgotten kaping (restarted with nobody to tell it of
//!   kaping, or having taken kaping for inactive, so its changes since
//!   never came) says so when kaping joins it again: Kamailio broadcasts a
//!   node list to every node when a join brings it a new node, and it does
//!   so before answering the join. A node list from a peer while kaping's
//!   join to it is in flight ([`JOIN_ECHO`]) therefore means the peer did
//!   not know kaping, and kaping syncs from it (counted: `peer_restarts`).
//!
//! Never blocks the main thread; bounded memory (the duplicate window, the
//! node set of at most [`super::dmq::NODES_MAX`] per list).

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::Sender;

use crate::io::udp::{bind_udp, SocketOptions};

use super::dmq::{self, Message, RequestSpec, CHANNEL_NOTIFICATION, CHANNEL_USRLOC};
use super::usrloc::{self, Change, UsrlocMsg};

/// Requests remembered to recognise retransmissions.
pub const SEEN_MAX: usize = 4096;
/// First join retry; doubling up to [`JOIN_RETRY_MAX`].
const JOIN_RETRY_FIRST: Duration = Duration::from_millis(500);
const JOIN_RETRY_MAX: Duration = Duration::from_secs(8);
/// A joined peer is joined again this often (Kamailio's default
/// `ping_interval` is 60 s).
pub const REJOIN_EVERY: Duration = Duration::from_secs(30);
/// A node list from a peer within this long after kaping's (re)join left,
/// before its answer, is the peer telling every node of kaping as new.
pub const JOIN_ECHO: Duration = Duration::from_secs(2);
/// A sync request unanswered this long is sent again.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(120);
/// A sync request left unanswered this long after the peer's last record
/// is taken as complete (seen: with two nodes syncing at once, Kamailio
/// 5.6.3 sends one of them every record but never its 200).
pub const SYNC_QUIET: Duration = Duration::from_secs(2);
/// A refused sync request is asked again after this.
pub const SYNC_RETRY: Duration = Duration::from_secs(2);
/// How long the thread sleeps in `recv` at most (bounds how late a stop
/// or a timer is seen).
const POLL: Duration = Duration::from_millis(50);
/// Receive buffer asked for on the node's socket. A full sync arrives as
/// one burst: Kamailio's dmq worker hands every record to tm at once
/// (10,000 KDMQ of ~700 bytes within ~100 ms; with `batch_msg_contacts`,
/// datagrams of up to 60 kB), far faster than the thread parses them
/// while it shares two cores with Kamailio. In the kernel's default
/// `rmem_default` (208 kB, ~150 such datagrams by their truesize) the rest
/// were dropped and came back only with tm's retransmissions, 0.5, 1, 2
/// and then every 4 s: a sync of 10,000 contacts took 20 s. 32 MB holds
/// the burst of a 10,000-contact sync even for a debug build; it costs
/// memory only while a backlog is queued.
pub const RECV_BUFFER_BYTES: usize = 32 << 20;

/// What the node tells the daemon.
#[derive(Debug)]
pub enum Feed {
    /// Location changes, in the order the peer sent them.
    Changes(Vec<Change>),
    /// kaping asked `peer` for a full sync (after joining it, or because
    /// it restarted): records refreshed from now on belong to that sync.
    SyncStarted { peer: SocketAddr },
    /// `peer` answered the sync request: every record was sent.
    SyncDone { peer: SocketAddr },
}

/// Counters, shared with the daemon for stats.
#[derive(Debug, Default)]
pub struct NodeCounters {
    pub received: AtomicU64,
    pub requests: AtomicU64,
    pub duplicates: AtomicU64,
    pub not_peer: AtomicU64,
    pub rejected: AtomicU64,
    pub changes: AtomicU64,
    pub joins: AtomicU64,
    pub syncs: AtomicU64,
    pub other_channels: AtomicU64,
    /// Sync requests answered with an error (asked again).
    pub sync_refused: AtomicU64,
    /// Sync requests never answered, taken as complete once the peer's
    /// records stopped for `SYNC_QUIET`.
    pub sync_unanswered: AtomicU64,
    /// Peers found to have forgotten kaping (restarted): synced again.
    pub peer_restarts: AtomicU64,
}

impl NodeCounters {
    /// How many counters [`NodeCounters::snapshot`] gives.
    pub const COUNT: usize = 12;

    /// `(name, value)` of every counter.
    pub fn snapshot(&self) -> [(&'static str, u64); Self::COUNT] {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("received", g(&self.received)),
            ("requests", g(&self.requests)),
            ("duplicates", g(&self.duplicates)),
            ("not_peer", g(&self.not_peer)),
            ("rejected", g(&self.rejected)),
            ("changes", g(&self.changes)),
            ("joins", g(&self.joins)),
            ("syncs", g(&self.syncs)),
            ("other_channels", g(&self.other_channels)),
            ("sync_refused", g(&self.sync_refused)),
            ("sync_unanswered", g(&self.sync_unanswered)),
            ("peer_restarts", g(&self.peer_restarts)),
        ]
    }
}

/// A running node. Dropping it stops the thread.
pub struct Node {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub counters: Arc<NodeCounters>,
    pub local: SocketAddr,
    /// The receive buffer the kernel granted (as `getsockopt` reports it:
    /// twice the usable size) and whether it is less than
    /// [`RECV_BUFFER_BYTES`] (`net.core.rmem_max`, no `CAP_NET_ADMIN`).
    pub recv_buffer_bytes: usize,
    pub recv_clamped: bool,
}

impl Node {
    /// Binds `local` (kaping's node address, as the peers will reach it)
    /// and starts joining `peers`.
    pub fn start(
        local: SocketAddr,
        peers: Vec<SocketAddr>,
        feed: Sender<Feed>,
    ) -> io::Result<Node> {
        let opts = SocketOptions {
            recv_buffer_bytes: RECV_BUFFER_BYTES,
            timestamps: false,
            recv_errors: false,
            dont_fragment: false,
            nonblocking: false,
            ..SocketOptions::default()
        };
        let (socket, report) = bind_udp(local, &opts)?;
        let socket = UdpSocket::from(socket);
        socket.set_read_timeout(Some(POLL))?;
        let local = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(NodeCounters::default());
        let mut state = State::new(socket, local, peers, feed, counters.clone());
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kaping-dmq".into())
            .spawn(move || state.run(&stop2))?;
        Ok(Node {
            stop,
            thread: Some(thread),
            counters,
            local,
            recv_buffer_bytes: report.recv_buffer_bytes,
            recv_clamped: report.recv_clamped,
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Peer {
    addr: SocketAddr,
    joined: bool,
    next_join: Instant,
    join_wait: Duration,
    join_call_id: String,
    /// When the join in flight (sent, not answered yet) left.
    join_sent: Option<Instant>,
    /// A sync request in flight: its Call-ID and when it left.
    sync: Option<(String, Instant)>,
    /// Whether kaping has had a full sync from this peer since it joined.
    synced: bool,
    /// A sync request refused (a non-2xx final answer, e.g. the peer busy
    /// with another node's sync) is asked again then.
    sync_retry: Option<Instant>,
    /// When this peer last sent kaping location records.
    last_record: Option<Instant>,
}

struct State {
    socket: UdpSocket,
    local: SocketAddr,
    peers: Vec<Peer>,
    /// Nodes the peers announced: they may send to kaping too.
    known: HashSet<SocketAddr>,
    seen: VecDeque<(String, u32)>,
    seen_set: HashSet<(String, u32)>,
    feed: Sender<Feed>,
    counters: Arc<NodeCounters>,
    /// Call-IDs, branches and CSeqs of kaping's own requests.
    next_id: u64,
    tag: String,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl State {
    fn new(
        socket: UdpSocket,
        local: SocketAddr,
        peers: Vec<SocketAddr>,
        feed: Sender<Feed>,
        counters: Arc<NodeCounters>,
    ) -> State {
        let now = Instant::now();
        let run = std::process::id();
        State {
            peers: peers
                .into_iter()
                .map(|addr| Peer {
                    addr,
                    joined: false,
                    next_join: now,
                    join_wait: JOIN_RETRY_FIRST,
                    join_call_id: String::new(),
                    join_sent: None,
                    sync: None,
                    synced: false,
                    sync_retry: None,
                    last_record: None,
                })
                .collect(),
            known: HashSet::new(),
            seen: VecDeque::with_capacity(SEEN_MAX),
            seen_set: HashSet::with_capacity(SEEN_MAX),
            feed,
            counters,
            next_id: 1,
            tag: format!("kaping{run}"),
            socket,
            local,
            buf: vec![0u8; dmq::DATAGRAM_LEN_MAX + 1],
            out: Vec::with_capacity(1024),
        }
    }

    fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            self.timers();
            match self.socket.recv_from(&mut self.buf) {
                Ok((n, from)) => {
                    self.counters.received.fetch_add(1, Ordering::Relaxed);
                    if n > dmq::DATAGRAM_LEN_MAX {
                        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let datagram = std::mem::take(&mut self.buf);
                    self.datagram(&datagram[..n], from);
                    self.buf = datagram;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                // An ICMP error from an earlier send (a peer down): the
                // join retries cover it.
                Err(_) => {}
            }
        }
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn send_request(
        &mut self,
        to: SocketAddr,
        channel: &str,
        body: &[u8],
        content_type: &str,
        max_forwards: u8,
    ) -> String {
        let id = self.new_id();
        let call_id = format!("{}-{id}@kaping", self.tag);
        let branch = format!("kp{}x{id}", self.tag);
        self.out.clear();
        dmq::write_request(
            &RequestSpec {
                channel,
                target: to,
                local: self.local,
                branch: &branch,
                call_id: &call_id,
                from_tag: &self.tag,
                cseq: (id & 0x7fff_ffff) as u32,
                body,
                content_type,
                max_forwards,
            },
            &mut self.out,
        );
        let _ = self.socket.send_to(&self.out, to);
        call_id
    }

    /// Joins and sync requests that are due.
    fn timers(&mut self) {
        let now = Instant::now();
        for i in 0..self.peers.len() {
            if now >= self.peers[i].next_join {
                let to = self.peers[i].addr;
                let body = dmq::join_body(self.local);
                let call_id = self.send_request(
                    to,
                    CHANNEL_NOTIFICATION,
                    body.as_bytes(),
                    dmq::CONTENT_TYPE_NODES,
                    2,
                );
                let p = &mut self.peers[i];
                p.join_call_id = call_id;
                p.join_sent = Some(now);
                if p.joined {
                    p.next_join = now + REJOIN_EVERY;
                } else {
                    p.next_join = now + p.join_wait;
                    p.join_wait = (p.join_wait * 2).min(JOIN_RETRY_MAX);
                }
            }
            if let Some((_, sent)) = &self.peers[i].sync {
                let sent = *sent;
                let quiet = self.peers[i]
                    .last_record
                    .is_some_and(|t| t > sent && now.duration_since(t) >= SYNC_QUIET);
                if quiet {
                    self.counters
                        .sync_unanswered
                        .fetch_add(1, Ordering::Relaxed);
                    let p = &mut self.peers[i];
                    p.sync = None;
                    p.synced = true;
                    let _ = self.feed.send(Feed::SyncDone { peer: p.addr });
                } else if now.duration_since(sent) >= SYNC_TIMEOUT {
                    self.ask_sync(i);
                }
            }
            if self.peers[i].sync_retry.is_some_and(|at| now >= at) {
                self.peers[i].sync_retry = None;
                self.ask_sync(i);
            }
        }
    }

    fn ask_sync(&mut self, i: usize) {
        let to = self.peers[i].addr;
        let call_id = self.send_request(
            to,
            CHANNEL_USRLOC,
            usrloc::sync_request_body(),
            dmq::CONTENT_TYPE_JSON,
            1,
        );
        self.peers[i].sync = Some((call_id, Instant::now()));
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        let _ = self.feed.send(Feed::SyncStarted { peer: to });
    }

    fn peer_index(&self, from: SocketAddr) -> Option<usize> {
        self.peers.iter().position(|p| p.addr == from)
    }

    fn datagram(&mut self, bytes: &[u8], from: SocketAddr) {
        let msg = match dmq::parse_message(bytes) {
            Ok(m) => m,
            Err(_) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let heard = self.peer_index(from).is_some() || self.known.contains(&from);
        if !heard {
            // Unanswered: nothing is said to a stranger.
            self.counters.not_peer.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match msg.status() {
            Some(status) => self.response(&msg, status, from),
            None => self.request(&msg, from),
        }
    }

    fn response(&mut self, msg: &Message<'_>, status: u16, from: SocketAddr) {
        let Some(i) = self.peer_index(from) else {
            return;
        };
        if msg.call_id == self.peers[i].join_call_id {
            if !(200..300).contains(&status) {
                return;
            }
            if let Ok(nodes) = dmq::parse_node_list(msg.body) {
                self.learn(&nodes);
            }
            let p = &mut self.peers[i];
            let first = !p.joined;
            p.joined = true;
            p.join_sent = None;
            p.join_wait = JOIN_RETRY_FIRST;
            p.next_join = Instant::now() + REJOIN_EVERY;
            if first {
                self.counters.joins.fetch_add(1, Ordering::Relaxed);
            }
            // One full sync is enough: the bus replicates every registrar's
            // changes to kaping. Ask the first peer that answers.
            if first && !self.peers.iter().any(|p| p.synced || p.sync.is_some()) {
                self.ask_sync(i);
            }
            return;
        }
        if self.peers[i]
            .sync
            .as_ref()
            .is_some_and(|(c, _)| c == msg.call_id)
            && status >= 200
        {
            self.peers[i].sync = None;
            if (200..300).contains(&status) {
                self.peers[i].synced = true;
                let _ = self.feed.send(Feed::SyncDone { peer: from });
            } else {
                self.counters.sync_refused.fetch_add(1, Ordering::Relaxed);
                // Records are idempotent: asking again costs a resend.
                self.peers[i].sync_retry = Some(Instant::now() + SYNC_RETRY);
            }
        }
    }

    fn learn(&mut self, nodes: &[dmq::Node]) {
        for n in nodes {
            if let Some(a) = n.addr {
                if a != self.local && self.known.len() < 4 * dmq::NODES_MAX {
                    self.known.insert(a);
                }
            }
        }
    }

    fn answer(&mut self, msg: &Message<'_>, code: u16, reason: &str, to: SocketAddr) {
        self.out.clear();
        let tag = self.tag.clone();
        dmq::write_response(msg, code, reason, &tag, &mut self.out);
        let _ = self.socket.send_to(&self.out, to);
    }

    fn request(&mut self, msg: &Message<'_>, from: SocketAddr) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let key = (msg.call_id.to_string(), msg.cseq.number);
        if self.seen_set.contains(&key) {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            self.answer(msg, 200, "OK", from);
            return;
        }
        if self.seen.len() == SEEN_MAX {
            if let Some(old) = self.seen.pop_front() {
                self.seen_set.remove(&old);
            }
        }
        self.seen.push_back(key.clone());
        self.seen_set.insert(key);
        match msg.channel() {
            Some(CHANNEL_USRLOC) => match usrloc::parse_body(msg.body) {
                Ok(UsrlocMsg::SyncRequest) => {
                    self.answer(msg, 200, "OK", from);
                    // A peer asks when it starts: its table may differ from
                    // what kaping holds. Sync from it in turn.
                    if let Some(i) = self.peer_index(from) {
                        if self.peers[i].sync.is_none() {
                            self.ask_sync(i);
                        }
                    }
                }
                Ok(UsrlocMsg::Changes(changes)) => {
                    self.answer(msg, 200, "OK", from);
                    if let Some(i) = self.peer_index(from) {
                        self.peers[i].last_record = Some(Instant::now());
                    }
                    self.counters
                        .changes
                        .fetch_add(changes.len() as u64, Ordering::Relaxed);
                    if !changes.is_empty() {
                        let _ = self.feed.send(Feed::Changes(changes));
                    }
                }
                Err(_) => {
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    self.answer(msg, 400, "Bad Request", from);
                }
            },
            Some(CHANNEL_NOTIFICATION) => {
                self.answer(msg, 200, "OK", from);
                match dmq::parse_node_list(msg.body) {
                    Ok(nodes) => self.learn(&nodes),
                    Err(_) => {
                        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // A peer that announces itself without knowing kaping (a
                // restart): join it again now rather than at the next round.
                let mine = dmq::join_body(self.local);
                let listed = msg
                    .body
                    .windows(mine.len().saturating_sub(2))
                    .any(|w| w == &mine.as_bytes()[..mine.len() - 2]);
                if let Some(i) = self.peer_index(from) {
                    if !listed {
                        self.peers[i].next_join = Instant::now();
                    }
                    // Kaping's join to it in flight: the peer is telling
                    // every node that kaping is new to it. It forgot kaping
                    // and may hold changes kaping never got: sync from it.
                    let p = &self.peers[i];
                    let echo =
                        p.joined && listed && p.join_sent.is_some_and(|t| t.elapsed() < JOIN_ECHO);
                    if echo {
                        self.peers[i].join_sent = None;
                        self.counters.peer_restarts.fetch_add(1, Ordering::Relaxed);
                        if self.peers[i].sync.is_none() {
                            self.ask_sync(i);
                        }
                    }
                }
            }
            _ => {
                // htable, dialog, ...: not kaping's business.
                self.counters.other_channels.fetch_add(1, Ordering::Relaxed);
                self.answer(msg, 200, "OK", from);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam::channel;

    /// A fake peer driving the node's state machine directly.
    struct Bench {
        st: State,
        peer: UdpSocket,
        rx: channel::Receiver<Feed>,
        buf: Vec<u8>,
    }

    impl Bench {
        fn new() -> Bench {
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let local = socket.local_addr().unwrap();
            let (tx, rx) = channel::unbounded();
            let st = State::new(
                socket,
                local,
                vec![peer.local_addr().unwrap()],
                tx,
                Arc::new(NodeCounters::default()),
            );
            Bench {
                st,
                peer,
                rx,
                buf: vec![0; 65536],
            }
        }

        /// The next request the node sent the peer: (channel, datagram).
        fn next_request(&mut self) -> (String, Vec<u8>) {
            let n = self.peer.recv(&mut self.buf).expect("the node sent");
            let m = dmq::parse_message(&self.buf[..n]).unwrap();
            assert!(m.status().is_none(), "a request");
            (m.channel().unwrap().to_string(), self.buf[..n].to_vec())
        }

        /// The peer answers `req` with `code`.
        fn answer(&mut self, req: &[u8], code: u16) {
            let m = dmq::parse_message(req).unwrap();
            let mut out = Vec::new();
            dmq::write_response(&m, code, "OK", "peer", &mut out);
            let from = self.peer.local_addr().unwrap();
            self.st.datagram(&out, from);
        }

        /// The peer sends the node a node list naming it (as Kamailio
        /// broadcasts one when a join brought it a new node); the node's
        /// 200 is read off.
        fn node_list(&mut self, cseq: u32) {
            let from = self.peer.local_addr().unwrap();
            let body = dmq::join_body(self.st.local);
            let mut out = Vec::new();
            dmq::write_request(
                &RequestSpec {
                    channel: CHANNEL_NOTIFICATION,
                    target: self.st.local,
                    local: from,
                    branch: &format!("z9hG4bKnl{cseq}"),
                    call_id: &format!("nl{cseq}"),
                    from_tag: "peer",
                    cseq,
                    body: body.as_bytes(),
                    content_type: dmq::CONTENT_TYPE_NODES,
                    max_forwards: 1,
                },
                &mut out,
            );
            self.st.datagram(&out, from);
            let n = self.peer.recv(&mut self.buf).unwrap();
            let m = dmq::parse_message(&self.buf[..n]).unwrap();
            assert_eq!(m.status(), Some(200));
        }

        fn rejoin(&mut self) -> Vec<u8> {
            self.st.peers[0].next_join = Instant::now();
            self.st.timers();
            let (channel, join) = self.next_request();
            assert_eq!(channel, CHANNEL_NOTIFICATION);
            join
        }

        fn syncs(&self) -> u64 {
            self.st.counters.syncs.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn a_peer_that_learns_kaping_anew_on_a_rejoin_is_synced_from_again() {
        let mut b = Bench::new();
        // Join, then the one full sync.
        b.st.timers();
        let (channel, join) = b.next_request();
        assert_eq!(channel, CHANNEL_NOTIFICATION);
        b.node_list(1); // Kamailio's broadcast on a first join: expected
        b.answer(&join, 200);
        let (channel, sync) = b.next_request();
        assert_eq!(channel, CHANNEL_USRLOC);
        b.answer(&sync, 200);
        assert_eq!(b.syncs(), 1);
        assert!(matches!(b.rx.try_recv(), Ok(Feed::SyncStarted { .. })));
        assert!(matches!(b.rx.try_recv(), Ok(Feed::SyncDone { .. })));

        // A rejoin the peer knew of already: no broadcast, no sync.
        let join = b.rejoin();
        b.answer(&join, 200);
        // Its periodic node list (a ping) outside a join: no sync either.
        b.node_list(2);
        assert_eq!(b.syncs(), 1);
        assert_eq!(b.st.counters.peer_restarts.load(Ordering::Relaxed), 0);

        // A rejoin that was news to the peer: its broadcast arrives before
        // its answer, and kaping syncs from it again.
        let join = b.rejoin();
        b.node_list(3);
        assert_eq!(b.st.counters.peer_restarts.load(Ordering::Relaxed), 1);
        assert_eq!(b.syncs(), 2);
        let (channel, _) = b.next_request();
        assert_eq!(channel, CHANNEL_USRLOC);
        b.answer(&join, 200);
        // A second copy of the broadcast (retransmitted) changes nothing.
        b.node_list(4);
        assert_eq!(b.syncs(), 2);
    }
}
