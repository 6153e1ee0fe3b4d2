//! `kaping run`: the main thread of the daemon (DESIGN §1).
//!
//! It validates nothing itself (that is `config`), and touches no packet:
//! it creates the shared-memory file and the sockets, starts one pinned
//! worker per CPU with its own backend, loads contacts and shards them by
//! destination hash, then writes events and the heartbeat until SIGINT or
//! SIGTERM. On stop it lets workers drain the replies in flight, flushes
//! events, marks the shm file stopped and returns.
//!
//! Errors that prevent starting (a port in use, a missing permission, an
//! unreadable contacts file) come back as one clear line.

mod control;
mod feed;

use std::collections::HashSet;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender};
use crossbeam::queue::ArrayQueue;
use socket2::Socket;

use crate::access::AccessError;
use crate::config::Replies;
use crate::config::{BackendChoice, EventsTo, RawConfig, Settings, Steering};
use crate::contact::{parse_socket, ContactError, ContactSpec, PingSource, Resolver};
use crate::control::registry::{Entry, Registry, Source};
use crate::control::server::{ControlServer, Request};
use crate::engine::liveness::{Policy, Reason, State};
use crate::engine::slab::Handle;
use crate::engine::worker::{
    Command, Event, Gone, NewContact, Peers, Worker, WorkerConfig, HANDOFF_QUEUE,
};
use crate::io::divert::{interface_indexes, Divert, DivertSpec};
use crate::io::mmsg::MmsgBackend;
use crate::io::share::{bind_shared, check_shareable, socket_inode};
use crate::io::udp::{bind_udp, SocketOptions};
use crate::io::uring::{self, UringBackend};
use crate::io::waker::Waker;
use crate::io::{signal, steer, WorkerSocket, MAX_SOCKETS, TX_DATAGRAM_MAX};
use crate::shm::layout::SlotRecord;
use crate::shm::reader::ShmReader;
use crate::shm::writer::{ShmConfig, ShmFile};
use crate::sources::{self, LoadReport, Verdict};
use crate::state::{ContactRecord, History, Op, SnapshotStats, StateError, Store};
use crate::wire::template::{
    check_contact, divert_marker, request_uri, to_uri, ContactText, Template, TemplateConfig,
    DIVERT_MARKER_LEN,
};
use crate::wire::token::TokenKey;
use crate::wire::uri::SipUri;

/// Commands (batches) queued per worker before the sender waits.
const COMMAND_QUEUE: usize = 4;
/// Contacts sent to a worker per command.
const ADD_BATCH: usize = 4096;
/// Bytes of URI + To text reserved per slot in shared memory (the region
/// is sized at start; real contact URIs with parameters often pass 100
/// bytes). Only pages in use are resident.
const STRING_BYTES_PER_SLOT: u32 = 256;
/// The main loop's longest sleep. Control requests and the registrar feed
/// wake it at once; signals, the workers' events and notices, and the
/// once-a-second heartbeat are looked at each round, so a stop or an event
/// waits at most this long. At 20 ms the idle loop cost 4 ms of CPU a
/// second on the development VM (50 wake-ups), at 100 ms 0.8 ms.
const MAIN_ROUND: Duration = Duration::from_millis(100);

/// A failure to start or run, as one line for the operator.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DaemonError(pub String);

fn err(msg: impl Into<String>) -> DaemonError {
    DaemonError(msg.into())
}

/// What `run` reports when it returns.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub backend: &'static str,
    pub load: Option<LoadReport>,
}

struct WorkerHandle {
    commands: Sender<Command>,
    waker: Waker,
    thread: JoinHandle<io::Result<()>>,
    /// Contacts sent to it so far (its slab holds `capacity`), when the
    /// worker allocates its own slots (no registry).
    count: u32,
    pending: Vec<NewContact>,
    /// Deletions not yet sent. Adds and deletions are sent in the order
    /// they were made (a switch of kind flushes the other).
    pending_dels: Vec<Handle>,
    pending_dels_report: bool,
}

/// What the control socket and the durable state need (all `None` /
/// empty when neither `control` nor `state_dir` is set).
#[derive(Default)]
struct ControlPlane {
    /// Every contact by key; also allocates the workers' slots.
    registry: Option<Registry>,
    store: Option<Store>,
    server: Option<ControlServer>,
    requests: Option<Receiver<Request>>,
    gone: Option<Receiver<Gone>>,
    /// Slots read back for get/list/stats/snapshots.
    reader: Option<ShmReader>,
    subscribers: Vec<Sender<std::sync::Arc<str>>>,
    /// Journal ops made since the last commit (gone notices).
    uncommitted: Vec<Op>,
    /// Histories handed to workers (restored or kept by an update) that a
    /// worker may not have published in shared memory yet. A snapshot taken
    /// before it has uses these, not "no history"; each is dropped within
    /// a second of its slot being published (or its contact gone).
    pending_history: std::collections::HashMap<crate::control::registry::Loc, History>,
    /// Set when a journal commit failed: changes are refused from then on.
    journal_failed: Option<String>,
    snapshot_running: Option<JoinHandle<Result<SnapshotStats, StateError>>>,
    last_snapshot: Option<Instant>,
    stats: ControlStats,
}

#[derive(Default, Debug, Clone, Copy)]
struct ControlStats {
    requests: u64,
    adds: u64,
    updates: u64,
    dels: u64,
    commits: u64,
    journal_records: u64,
    subscribers_dropped: u64,
    snapshots: u64,
}

/// Where the running configuration came from, to read it again on SIGHUP.
pub struct ReloadSource {
    pub config: Option<std::path::PathBuf>,
    /// Command-line flags (they keep overriding the file).
    pub overrides: RawConfig,
}

/// A running daemon: workers started, contacts loaded. [`Daemon::wait`]
/// runs the main loop until a stop signal.
pub struct Daemon {
    settings: Settings,
    shm: ShmFile,
    workers: Vec<WorkerHandle>,
    events_rx: Receiver<Event>,
    events_out: Option<Box<dyn Write + Send>>,
    capacity: u32,
    /// Which address families have a socket: [v4, v6] -> socket index.
    family_sock: [Option<u8>; 2],
    /// Each worker's own bound address per family [v4, v6]: where the
    /// replies to pings sent as a proxy are relayed to.
    own_addrs: Vec<[Option<SocketAddr>; 2]>,
    /// Sources shared with a proxy (DESIGN §10): the socket index they got
    /// (the same in every worker), or why they cannot be used (kept, so a
    /// million contacts naming one bad socket probe it once).
    sources: std::collections::HashMap<SocketAddr, Result<u8, String>>,
    socket_options: SocketOptions,
    /// Inodes of kaping's own shared sockets (not foreign holders of a
    /// proxy's port).
    own_inodes: Vec<u64>,
    /// `replies = divert`: the program per proxy port, or why it could not
    /// be attached (those replies are relayed by the proxy instead).
    diverts: std::collections::HashMap<u16, Result<Divert, String>>,
    /// What marks this instance's replies for the divert program.
    divert_marker: [u8; DIVERT_MARKER_LEN],
    /// CAP_BPF and CAP_NET_ADMIN were given up once the start was complete
    /// (`io::caps`): no further divert program can be attached.
    divert_caps_dropped: bool,
    /// Worker 0's template per socket index, to size requests at add time.
    template_check: Vec<Template>,
    seen: HashSet<u64>,
    resolver: Resolver,
    pub backend: &'static str,
    ctl: ControlPlane,
    reload: Option<ReloadSource>,
    started: Instant,
    /// The registrar feed (`dmq`), when on.
    feed: Option<feed::FeedState>,
}

fn key_hash(uri: &str, dest: &SocketAddr) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    uri.hash(&mut h);
    dest.hash(&mut h);
    h.finish()
}

/// Host for Via/Call-ID of a socket bound to `addr`.
fn advertise_for(settings: &Settings, addr: &SocketAddr) -> String {
    if settings.advertise_explicit {
        return settings.advertise.clone();
    }
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".into(),
        IpAddr::V6(ip) if ip.is_unspecified() => "::1".into(),
        ip => ip.to_string(),
    }
}

fn bind_error(addr: SocketAddr, worker: u32, e: io::Error) -> DaemonError {
    let hint = match e.kind() {
        io::ErrorKind::AddrInUse => {
            " (another process holds this port: stop it or choose another --bind)"
        }
        io::ErrorKind::PermissionDenied => " (ports below 1024 need CAP_NET_BIND_SERVICE)",
        io::ErrorKind::AddrNotAvailable => " (this address is not configured on any interface)",
        _ => "",
    };
    err(format!("cannot bind {addr} for worker {worker}: {e}{hint}"))
}

impl Daemon {
    /// Creates shm, sockets and workers. Nothing is pinged until contacts
    /// are added.
    pub fn start(settings: Settings) -> Result<Daemon, DaemonError> {
        let n = settings.workers;
        let per_worker = settings.max_contacts.div_ceil(n);
        if per_worker > crate::wire::token::SLOT_MAX + 1 {
            return Err(err(format!(
                "max_contacts {} over {n} workers is more than {} per worker: add workers",
                settings.max_contacts,
                crate::wire::token::SLOT_MAX + 1
            )));
        }
        let shm = ShmFile::create(&ShmConfig {
            path: settings.shm.clone(),
            workers: n,
            slots_per_worker: per_worker,
            string_bytes_per_worker: per_worker.saturating_mul(STRING_BYTES_PER_SLOT),
            instance: settings.instance.clone(),
            backend: "starting".into(),
            shard: settings.shard,
            group: settings.shm_group.clone(),
        })
        .map_err(|e| {
            // A group or mode kaping could not give the file already names
            // the setting and the file: say that first.
            if e.get_ref().is_some_and(|inner| inner.is::<AccessError>()) {
                return err(e.to_string());
            }
            err(format!(
                "cannot create shared memory {}: {e}",
                settings.shm.display()
            ))
        })?;

        // Sockets, in worker order (shared-port steering indexes the
        // reuseport group by join order).
        let mut binds: Vec<SocketAddr> = Vec::new();
        let mut family_sock = [None, None];
        for b in [settings.bind, settings.bind6].into_iter().flatten() {
            family_sock[b.is_ipv6() as usize] = Some(binds.len() as u8);
            binds.push(b);
        }
        let shared = settings.steering == Steering::SharedPort;
        let opts = SocketOptions {
            recv_buffer_bytes: settings.recv_buffer,
            send_buffer_bytes: settings.send_buffer,
            reuse_port: shared,
            reuse_addr: false,
            pktinfo: false,
            timestamps: true,
            recv_errors: true,
            dont_fragment: true,
            nonblocking: true,
        };
        let mut sockets: Vec<Vec<Socket>> = (0..n).map(|_| Vec::new()).collect();
        let mut own_addrs: Vec<[Option<SocketAddr>; 2]> = vec![[None, None]; n as usize];
        let mut clamp_reported = false;
        for (i, &b) in binds.iter().enumerate() {
            let mut first_port = b.port();
            for w in 0..n {
                let mut addr = b;
                if !shared {
                    addr.set_port(b.port() + w as u16);
                } else if w > 0 {
                    addr.set_port(first_port);
                }
                let (s, report) = bind_udp(addr, &opts).map_err(|e| bind_error(addr, w, e))?;
                if w == 0 && shared {
                    first_port = s
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .map_or(b.port(), |a| a.port());
                }
                if (report.recv_clamped || report.send_clamped) && !clamp_reported {
                    clamp_reported = true;
                    eprintln!(
                        "kaping: socket buffers clamped by the kernel (receive {} of {} bytes, send {} of {}): \
                         raise net.core.rmem_max / wmem_max or grant CAP_NET_ADMIN",
                        report.recv_buffer_bytes, settings.recv_buffer, report.send_buffer_bytes, settings.send_buffer
                    );
                }
                own_addrs[w as usize][b.is_ipv6() as usize] =
                    s.local_addr().ok().and_then(|a| a.as_socket());
                sockets[w as usize].push(s);
            }
            if shared && n > 1 {
                steer::attach(&sockets[0][i], n, b.is_ipv6()).map_err(|e| {
                    err(format!("cannot attach the reply-steering BPF program: {e}"))
                })?;
            }
        }

        let key = TokenKey::random(instance_id(&settings.instance))
            .map_err(|e| err(format!("cannot get random bytes for the token key: {e}")))?;
        let templates_for = |socks: &[Socket]| -> Result<Vec<Template>, DaemonError> {
            socks
                .iter()
                .map(|s| {
                    let local = s
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .expect("bound socket");
                    let cfg = TemplateConfig {
                        local_host: advertise_for(&settings, &local),
                        local_port: local.port(),
                        ..settings.template.clone()
                    };
                    Template::new(&cfg).map_err(|e| err(format!("request template: {e}")))
                })
                .collect()
        };
        let template_check = templates_for(&sockets[0])?;

        let (events_tx, events_rx) = channel::unbounded();
        let wakers: Vec<Waker> = (0..n)
            .map(|_| Waker::new())
            .collect::<io::Result<_>>()
            .map_err(|e| err(format!("cannot create eventfd: {e}")))?;
        // Replies may land on another worker's socket in shared-port mode,
        // and when sent as a proxy (a diverted reply, or one that reached
        // the shared port while the proxy was down): hand them over.
        let peers = (n > 1).then(|| Peers {
            queues: (0..n)
                .map(|_| ArrayQueue::new(HANDOFF_QUEUE))
                .collect::<Vec<_>>()
                .into(),
            wakers: wakers.clone().into(),
        });
        let policy = Policy {
            down_after: settings.down_after,
            remove_after: settings.remove_after,
            alive: settings.alive_codes,
        };
        let with_registry =
            settings.control.is_some() || settings.state_dir.is_some() || settings.dmq.is_some();
        let (gone_tx, gone_rx) = if with_registry {
            let (tx, rx) = channel::unbounded();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let backend_name = match settings.backend {
            BackendChoice::Mmsg => "mmsg",
            BackendChoice::Uring => {
                uring::probe().map_err(|why| err(format!("backend uring: {why}")))?;
                "uring"
            }
            BackendChoice::Auto => match uring::probe() {
                Ok(()) => "uring",
                Err(why) => {
                    eprintln!("kaping: {why}; using the sendmmsg/recvmmsg backend");
                    "mmsg"
                }
            },
        };
        shm.set_backend(backend_name);
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let rate_share = if settings.rate_limit == 0 {
            0
        } else {
            settings.rate_limit.div_ceil(n as u64)
        };
        let mut workers = Vec::with_capacity(n as usize);
        for (w, socks) in sockets.into_iter().enumerate() {
            let templates = templates_for(&socks)?;
            let cfg = WorkerConfig {
                id: w as u8,
                key: key.clone(),
                templates,
                method: settings.template.method.as_bytes().to_vec(),
                capacity: per_worker,
                interval: settings.interval,
                jitter: settings.jitter,
                reply_timeout: settings.reply_timeout,
                retries: settings.retries,
                policy,
                rate_limit: rate_share,
                events: events_wanted(&settings),
                gone: gone_tx.clone(),
                seed: key_hash(
                    &settings.instance,
                    &SocketAddr::from(([0, 0, 0, 0], w as u16)),
                ) ^ std::process::id() as u64,
            };
            // Bounded: while loading, the main thread waits for the worker
            // instead of building up every contact in memory (the freed
            // heap would stay resident), so memory per contact does not
            // depend on how far ahead the loader ran.
            let (tx, rx) = channel::bounded(COMMAND_QUEUE);
            let shm_w = shm.worker(w as u32);
            let waker = wakers[w].clone();
            let events = events_tx.clone();
            let peers = peers.clone();
            let core = if settings.pin_workers {
                cores.get(w % cores.len().max(1)).copied()
            } else {
                None
            };
            let thread = std::thread::Builder::new()
                .name(format!("kaping-w{w}"))
                .spawn(move || {
                    if let Some(core) = core {
                        if !core_affinity::set_for_current(core) {
                            eprintln!(
                                "kaping: worker {w}: could not pin to CPU {} (continuing unpinned)",
                                core.id
                            );
                        }
                    }
                    let socks = socks
                        .into_iter()
                        .map(|socket| WorkerSocket { socket, src: None })
                        .collect();
                    if backend_name == "uring" {
                        let backend = UringBackend::new(socks, waker)?;
                        Worker::new(cfg, shm_w, backend, rx, events, peers).run()
                    } else {
                        let backend = MmsgBackend::new(socks, waker)?;
                        Worker::new(cfg, shm_w, backend, rx, events, peers).run()
                    }
                })
                .map_err(|e| err(format!("cannot start worker thread: {e}")))?;
            workers.push(WorkerHandle {
                commands: tx,
                waker: wakers[w].clone(),
                thread,
                count: 0,
                pending: Vec::with_capacity(ADD_BATCH),
                pending_dels: Vec::new(),
                pending_dels_report: true,
            });
        }
        drop(events_tx);
        drop(gone_tx);

        let events_out = open_events(&settings.events)?;
        eprintln!(
            "kaping: instance '{}', {n} workers, backend {backend_name}, {} steering, {} slots per worker, shm {}",
            settings.instance,
            if shared { "shared-port" } else { "port-per-worker" },
            per_worker,
            settings.shm.display()
        );
        shm.heartbeat();
        let mut ctl = ControlPlane {
            gone: gone_rx,
            ..ControlPlane::default()
        };
        if with_registry {
            ctl.registry = Some(Registry::new(n, per_worker));
            ctl.reader = Some(ShmReader::open(&settings.shm).map_err(|e| {
                err(format!(
                    "cannot read back shared memory {}: {e}",
                    settings.shm.display()
                ))
            })?);
        }
        let initial_sources: Vec<SocketAddr> = match settings.source {
            PingSource::Addr(a) => Some(a),
            _ => None,
        }
        .into_iter()
        .chain(settings.source_default)
        .collect();
        let mut daemon = Daemon {
            settings,
            shm,
            workers,
            events_rx,
            events_out,
            capacity: per_worker,
            family_sock,
            own_addrs,
            sources: std::collections::HashMap::new(),
            socket_options: opts,
            own_inodes: Vec::new(),
            diverts: std::collections::HashMap::new(),
            divert_marker: divert_marker(key.instance_prefix()),
            divert_caps_dropped: false,
            template_check,
            seen: HashSet::new(),
            resolver: Resolver::default(),
            backend: backend_name,
            ctl,
            reload: None,
            started: Instant::now(),
            feed: None,
        };
        // A configured source that cannot be used stops the start: one line
        // that says why and what to do.
        for a in initial_sources {
            let setting = if PingSource::Addr(a) == daemon.settings.source {
                "source"
            } else {
                "source_default"
            };
            daemon
                .source_sock(a)
                .map_err(|why| err(format!("setting '{setting}': {why}")))?;
        }
        Ok(daemon)
    }

    /// The socket index of source `addr` (DESIGN §10), opening it in every
    /// worker on first use: a wildcard socket on the proxy's port beside the
    /// proxy's own, whose datagrams leave as `addr`, with the request
    /// template that carries the proxy's Via on top of the worker's.
    fn source_sock(&mut self, addr: SocketAddr) -> Result<u8, String> {
        if let Some(known) = self.sources.get(&addr) {
            return known.clone();
        }
        let opened = self.open_source(addr);
        match &opened {
            Ok(_) => {
                let replies = self.divert_replies(addr.port());
                eprintln!(
                    "kaping: pinging as {addr} (sharing the proxy's port), replies: {replies}"
                );
            }
            Err(why) => eprintln!("kaping: cannot ping as {addr}: {why}"),
        }
        self.sources.insert(addr, opened.clone());
        opened
    }

    /// Whether a contact is this instance's (always, unless `--shard`).
    pub(crate) fn in_shard(&self, aor: Option<&str>, uri: &str) -> bool {
        self.settings
            .shard
            .is_none_or(|(k, n)| crate::contact::shard_of(aor, uri, n) == k)
    }

    /// With `replies = divert`, attaches the divert program for replies to
    /// `proxy_port` (once per port) and says how replies come back. Any
    /// failure falls back to relay, which needs nothing: every request
    /// carries kaping's own Via under the proxy's.
    fn divert_replies(&mut self, proxy_port: u16) -> &'static str {
        if self.settings.replies != Replies::Divert {
            return "relay (the proxy forwards them)";
        }
        if !self.diverts.contains_key(&proxy_port) {
            let attached = self.attach_divert(proxy_port);
            match &attached {
                Ok(d) => {
                    let names = interface_names(&d.attached());
                    eprintln!(
                        "kaping: divert: replies to port {proxy_port} are handed to kaping by a tc-ingress program on {names} (the proxy spends nothing on them)"
                    );
                    for (index, why) in d.skipped() {
                        eprintln!("kaping: divert: interface {index} left out: {why}");
                    }
                }
                Err(why) => eprintln!(
                    "kaping: divert unavailable ({why}); replies to port {proxy_port} are relayed by the proxy instead"
                ),
            }
            self.diverts.insert(proxy_port, attached);
        }
        match self.diverts[&proxy_port] {
            Ok(_) => "divert",
            Err(_) => "relay (divert unavailable)",
        }
    }

    fn attach_divert(&self, proxy_port: u16) -> Result<Divert, String> {
        if self.divert_caps_dropped {
            return Err(
                "CAP_BPF and CAP_NET_ADMIN were given up once the ports known at start were diverted; restart kaping to divert this port too"
                    .into(),
            );
        }
        let all = interface_indexes().map_err(|e| format!("cannot list interfaces: {e}"))?;
        let ifindexes: Vec<u32> = if self.settings.divert_interfaces.is_empty() {
            all.iter().map(|(i, _)| *i).collect()
        } else {
            self.settings
                .divert_interfaces
                .iter()
                .map(|name| {
                    all.iter()
                        .find(|(_, n)| n == name)
                        .map(|(i, _)| *i)
                        .ok_or_else(|| {
                            format!("setting 'divert_interfaces': no interface '{name}'")
                        })
                })
                .collect::<Result<_, _>>()?
        };
        // Worker 0's own sockets receive the diverted replies (and hand a
        // reply for another worker over); a wildcard bind means "the
        // reply's own destination", the proxy's address, which it serves.
        let own = self.own_addrs[0];
        let target = own[0].unwrap_or_else(|| {
            // No IPv4 socket: nothing to look up for IPv4 (no_socket).
            SocketAddr::from(([0, 0, 0, 0], own[1].map_or(0, |a| a.port())))
        });
        let spec = DivertSpec {
            ifindexes: &ifindexes,
            proxy_port,
            target,
            target6: own[1],
            marker: &self.divert_marker,
        };
        Divert::attach(&spec).map_err(|e| e.to_string())
    }

    fn open_source(&mut self, addr: SocketAddr) -> Result<u8, String> {
        let index = self.template_check.len();
        if index >= MAX_SOCKETS {
            return Err(format!(
                "kaping sends from at most {} sources",
                MAX_SOCKETS - 2
            ));
        }
        let family = addr.is_ipv6() as usize;
        if self.own_addrs.iter().any(|a| a[family].is_none()) {
            let (fam, setting) = if addr.is_ipv6() {
                ("IPv6", "bind6")
            } else {
                ("IPv4", "bind")
            };
            return Err(format!(
                "no {fam} socket of kaping's own to receive the replies on (set {setting})"
            ));
        }
        if let Some(warning) = check_shareable(addr, &self.own_inodes)? {
            eprintln!("kaping: source {addr}: {warning}");
        }
        let mut per_worker = Vec::with_capacity(self.workers.len());
        for own in &self.own_addrs {
            let own = own[family].expect("checked above");
            let (socket, _) = bind_shared(addr, &self.socket_options)?;
            self.own_inodes.extend(socket_inode(&socket));
            // The relayed reply comes to the worker's own port; on the
            // proxy's host, the proxy's address reaches a wildcard bind.
            let host = if self.settings.advertise_explicit {
                self.settings.advertise.clone()
            } else if own.ip().is_unspecified() {
                addr.ip().to_string()
            } else {
                own.ip().to_string()
            };
            let template = Template::new(&TemplateConfig {
                local_host: host,
                local_port: own.port(),
                proxy_via: Some((addr.ip().to_string(), addr.port())),
                ..self.settings.template.clone()
            })
            .map_err(|e| format!("request template: {e}"))?;
            per_worker.push((
                WorkerSocket {
                    socket,
                    src: Some(addr.ip()),
                },
                template,
            ));
        }
        self.template_check.push(per_worker[0].1.clone());
        for (w, add) in self.workers.iter_mut().zip(per_worker) {
            // Queued adds go first; a contact of this source comes after.
            Self::send_pending(w);
            Self::send_dels(w);
            w.waker.wake();
            let _ = w.commands.send(Command::AddSocket(Box::new(add)));
            w.waker.wake();
        }
        Ok(index as u8)
    }

    /// Where to read the configuration again on SIGHUP.
    pub fn set_reload_source(&mut self, source: ReloadSource) {
        self.reload = Some(source);
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Validates one contact (from the contacts file) and queues it for
    /// its worker.
    pub fn add(&mut self, spec: &ContactSpec) -> Verdict {
        if !self.in_shard(spec.aor.as_deref(), &spec.uri) {
            return Verdict::OtherShard;
        }
        if let Some(reg) = &self.ctl.registry {
            if reg.find(spec.aor.as_deref(), &spec.uri).is_some() {
                return Verdict::Skip(format!(
                    "duplicate of an earlier contact ({}{})",
                    spec.uri,
                    spec.aor
                        .as_deref()
                        .map(|a| format!(" of {a}"))
                        .unwrap_or_default()
                ));
            }
            return match self.place(spec, record_of(spec), Source::File, None) {
                Ok(_) => Verdict::Loaded,
                Err(Refusal::Bad(m)) => Verdict::Skip(m),
                Err(Refusal::Full(m)) => Verdict::Stop(m),
            };
        }
        let p = match self.prepare(spec) {
            Ok(p) => p,
            Err(m) => return Verdict::Skip(m),
        };
        let hash = p.contact.key_hash;
        if !self.seen.insert(hash) {
            return Verdict::Skip(format!(
                "duplicate of an earlier contact ({} to {})",
                spec.uri, p.contact.dest
            ));
        }
        if self.workers[p.worker].count >= self.capacity {
            self.seen.remove(&hash);
            // Fatal: the slab was sized at start; the operator must choose.
            return Verdict::Stop(self.full_message(p.worker));
        }
        self.workers[p.worker].count += 1;
        self.queue_add(p.worker, p.contact);
        Verdict::Loaded
    }

    fn full_message(&self, w: usize) -> String {
        format!(
            "contact slab full: worker {w} holds its {} contacts (max_contacts {} over {} workers); \
             raise max_contacts",
            self.capacity, self.settings.max_contacts, self.settings.workers
        )
    }

    /// Registers a contact whose key is not present and queues it for its
    /// worker in the slot the registry chose.
    fn place(
        &mut self,
        spec: &ContactSpec,
        rec: ContactRecord,
        source: Source,
        history: Option<SlotRecord>,
    ) -> Result<crate::control::registry::Loc, Refusal> {
        let p = self.prepare(spec).map_err(Refusal::Bad)?;
        self.place_prepared(p, rec, source, history)
    }

    /// [`Daemon::place`] for a contact already checked by `prepare`.
    fn place_prepared(
        &mut self,
        mut p: Prepared,
        rec: ContactRecord,
        source: Source,
        history: Option<SlotRecord>,
    ) -> Result<crate::control::registry::Loc, Refusal> {
        if rec.text_len() > crate::control::registry::TEXT_MAX {
            return Err(Refusal::Bad(format!(
                "its parameters hold {} bytes of text, over the {} a contact may have",
                rec.text_len(),
                crate::control::registry::TEXT_MAX
            )));
        }
        let reg = self
            .ctl
            .registry
            .as_mut()
            .expect("place needs the registry");
        let entry = Entry {
            rec: crate::control::registry::PackedRecord::new(&rec),
            source,
            dest: p.contact.dest,
            expires_s: 0,
            sync_epoch: 0,
            ruid: 0,
        };
        let Ok(loc) = reg.insert(p.worker as u8, entry) else {
            return Err(Refusal::Full(self.full_message(p.worker)));
        };
        p.contact.handle = Some(loc.handle);
        if let Some(h) = &history {
            self.ctl.pending_history.insert(loc, history_of(h));
        }
        p.contact.history = history;
        self.queue_add(p.worker, p.contact);
        Ok(loc)
    }

    /// Checks a contact and builds what its worker needs; the error is the
    /// reason, for the operator.
    fn prepare(&mut self, spec: &ContactSpec) -> Result<Prepared, String> {
        // Parsed once for the destination and the To header.
        let contact_uri = SipUri::parse(&spec.uri).map_err(|e| ContactError::Uri(e).to_string())?;
        let dest = spec
            .destination_parsed(&contact_uri, &mut self.resolver)
            .map_err(|e| e.to_string())?;
        // Every source comes through here: file, control, DMQ, reload.
        self.settings
            .destinations
            .check(dest)
            .map_err(|why| format!("destination {dest} refused: {why}"))?;
        // Where its pings leave from (DESIGN §10): never silently from
        // another address than the one asked for.
        let source = match spec.source.unwrap_or(self.settings.source) {
            PingSource::Bind => None,
            PingSource::Addr(a) => Some(a),
            PingSource::Socket => match &spec.socket {
                Some(s) => Some(parse_socket(s)?),
                None => self.settings.source_default,
            },
        };
        let sock = match source {
            None => {
                let Some(sock) = self.family_sock[dest.is_ipv6() as usize] else {
                    let (fam, setting) = if dest.is_ipv6() {
                        ("IPv6", "bind6")
                    } else {
                        ("IPv4", "bind")
                    };
                    return Err(format!(
                        "{fam} destination {dest} but no {fam} socket (set {setting})"
                    ));
                };
                sock
            }
            Some(a) if a.is_ipv6() != dest.is_ipv6() => {
                return Err(format!(
                    "source {a} and destination {dest} are of different address families"
                ))
            }
            Some(a) => self
                .source_sock(a)
                .map_err(|why| format!("source {a}: {why}"))?,
        };
        // To header: the AoR, else the contact URI without parameters. A
        // user-only AoR (Kamailio with use_domain off) takes `domain`
        // (Kamailio ka_domain), else the registrar's host (the address
        // pings leave from as the proxy), else the contact's host.
        let to = match &spec.aor {
            Some(aor) => {
                let domain = match (&self.settings.domain, source) {
                    (Some(d), _) => d.clone(),
                    (None, Some(a)) => host_text(a.ip()),
                    (None, None) => contact_uri.host.to_string(),
                };
                to_uri(aor, Some(&domain)).map_err(|e| format!("AoR '{aor}': {e}"))?
            }
            None => strip_params(&spec.uri, &contact_uri),
        };
        let uri = request_uri(&spec.uri).to_string();
        let text = ContactText {
            uri: &uri,
            to: &to,
            route: spec.path.as_deref(),
        };
        check_contact(&text).map_err(|e| e.to_string())?;
        let len = self.template_check[sock as usize].rendered_len(&text);
        // Port digits differ between workers: keep a margin of 5 bytes × 2.
        if len + 10 > TX_DATAGRAM_MAX
            || uri.len() > u16::MAX as usize
            || to.len() > u16::MAX as usize
        {
            return Err(format!(
                "request would be {len} bytes, over the {TX_DATAGRAM_MAX}-byte UDP limit"
            ));
        }
        let worker = steer::shard_of(&dest, self.settings.workers) as usize;
        let key_hash = key_hash(&spec.uri, &dest);
        let to = (to != uri).then_some(to);
        Ok(Prepared {
            worker,
            contact: NewContact {
                uri,
                to,
                route: spec.path.clone(),
                dest,
                sock,
                keepalive: spec.keepalive.unwrap_or(self.settings.keepalive),
                interval: spec.interval,
                key_hash,
                handle: None,
                history: None,
            },
        })
    }

    fn queue_add(&mut self, w: usize, contact: NewContact) {
        let worker = &mut self.workers[w];
        Self::send_dels(worker);
        worker.pending.push(contact);
        if worker.pending.len() >= ADD_BATCH {
            Self::send_pending(worker);
        }
    }

    /// Queues the removal of a contact from its worker (after any add
    /// queued before it). `report`: emit a Removed event.
    fn queue_del(&mut self, w: usize, handle: Handle, report: bool) {
        let worker = &mut self.workers[w];
        Self::send_pending(worker);
        if worker.pending_dels_report != report {
            Self::send_dels(worker);
            worker.pending_dels_report = report;
        }
        worker.pending_dels.push(handle);
        if worker.pending_dels.len() >= ADD_BATCH {
            Self::send_dels(worker);
        }
    }

    fn send_pending(worker: &mut WorkerHandle) {
        if !worker.pending.is_empty() {
            let batch = std::mem::take(&mut worker.pending);
            // Wake first: if the queue is full, the worker must be awake to
            // drain it while we wait.
            worker.waker.wake();
            let _ = worker.commands.send(Command::Add(batch));
            worker.waker.wake();
        }
    }

    fn send_dels(worker: &mut WorkerHandle) {
        if !worker.pending_dels.is_empty() {
            let handles = std::mem::take(&mut worker.pending_dels);
            worker.waker.wake();
            let _ = worker.commands.send(Command::Del {
                handles,
                report: worker.pending_dels_report,
            });
            worker.waker.wake();
        }
    }

    /// Sends every queued change to its worker.
    pub fn flush_adds(&mut self) {
        for w in &mut self.workers {
            Self::send_pending(w);
            Self::send_dels(w);
        }
    }

    /// Loads the configured contacts file, if any.
    pub fn load_contacts(&mut self) -> Result<Option<LoadReport>, DaemonError> {
        let Some(path) = self.settings.contacts.clone() else {
            return Ok(None);
        };
        let format = self.settings.contacts_format;
        let started = Instant::now();
        let report =
            sources::load(&path, format, |spec| self.add(&spec)).map_err(|e| err(e.to_string()))?;
        self.flush_adds();
        // Duplicates are a load-time concern (the control socket keeps its
        // own index): give the set's memory back.
        self.seen = HashSet::new();
        // A stopped load ends with its reason as the error line (it is the
        // last problem, with its place); the others were skipped.
        let stopped_at = report
            .stopped
            .as_ref()
            .and_then(|_| report.problems.last().cloned());
        let skipped = report.problems.len() - usize::from(stopped_at.is_some());
        for p in &report.problems[..skipped] {
            eprintln!("kaping: skipped {p}");
        }
        if let Some(place) = stopped_at {
            return Err(err(place));
        }
        if report.skipped > report.problems.len() {
            eprintln!(
                "kaping: ... and {} more skipped",
                report.skipped - report.problems.len()
            );
        }
        eprintln!(
            "kaping: {report} in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        Ok(Some(report))
    }

    /// Writes pending events (to the events output and to control-socket
    /// subscribers); returns how many.
    pub fn drain_events(&mut self) -> usize {
        let mut n = 0;
        while let Ok(e) = self.events_rx.try_recv() {
            n += 1;
            let line: std::sync::Arc<str> = event_json(&e).into();
            if let Some(out) = &mut self.events_out {
                let _ = writeln!(out, "{line}");
            }
            if !self.ctl.subscribers.is_empty() {
                self.publish(&line);
            }
        }
        if n > 0 {
            if let Some(out) = &mut self.events_out {
                let _ = out.flush();
            }
        }
        n
    }

    /// A worker thread that ended on its own (error or panic) is fatal.
    fn check_workers(&self) -> Result<(), DaemonError> {
        for (i, w) in self.workers.iter().enumerate() {
            if w.thread.is_finished() {
                return Err(err(format!("worker {i} stopped unexpectedly")));
            }
        }
        Ok(())
    }

    /// Runs the main loop until SIGINT/SIGTERM or `until` elapses, then
    /// stops everything in order.
    pub fn wait(
        mut self,
        until: Option<Duration>,
        mut tick: impl FnMut(),
    ) -> Result<(), DaemonError> {
        self.drop_divert_capabilities();
        let started = Instant::now();
        let mut last_beat = Instant::now();
        let result = loop {
            if signal::stop_requested() || until.is_some_and(|u| started.elapsed() >= u) {
                break Ok(());
            }
            if signal::take_reload() {
                self.reload();
            }
            if let Err(e) = self.check_workers() {
                break Err(e);
            }
            self.drain_events();
            self.drain_feed();
            if last_beat.elapsed() >= Duration::from_secs(1) {
                self.publish_registrar();
                self.shm.heartbeat();
                tick();
                last_beat = Instant::now();
                self.maybe_snapshot();
            }
            // Serves control requests as they come; otherwise sleeps.
            self.serve_control(MAIN_ROUND);
        };
        self.stop()?;
        result
    }

    /// Once the start is complete (contacts loaded, control socket and
    /// registrar feed open) and a divert program is attached, gives up the
    /// two capabilities divert needed (issue 15: only at start): a bug in
    /// the packet path can then no longer load programs or reconfigure the
    /// network. A failure is logged, not fatal: kaping runs as it would
    /// have before.
    fn drop_divert_capabilities(&mut self) {
        if !self.diverts.values().any(Result::is_ok) {
            return;
        }
        match crate::io::caps::drop_divert_capabilities() {
            Ok(crate::io::caps::Dropped::NotHeld) => {}
            Ok(crate::io::caps::Dropped::Threads(n)) => {
                self.divert_caps_dropped = true;
                eprintln!(
                    "kaping: divert attached; CAP_BPF and CAP_NET_ADMIN given up by all {n} threads (a port first seen from now on is relayed)"
                );
            }
            Err(why) => eprintln!("kaping: could not give up CAP_BPF and CAP_NET_ADMIN: {why}"),
        }
    }

    /// Stops workers (they drain in-flight replies up to reply_timeout),
    /// flushes events and marks the shm file stopped.
    pub fn stop(mut self) -> Result<(), DaemonError> {
        // No new changes from here on.
        if let Some(server) = self.ctl.server.take() {
            server.stop();
        }
        for (port, d) in &self.diverts {
            if let Ok(d) = d {
                let c = d.counters();
                eprintln!(
                    "kaping: divert on port {port}: {} replies handed to kaping, {} datagrams left to the proxy, {} marked but without a kaping socket, {} refused by the kernel",
                    c.diverted, c.passed, c.no_socket, c.assign_failed
                );
            }
        }
        self.flush_adds();
        for w in &self.workers {
            let _ = w.commands.send(Command::Stop);
            w.waker.wake();
        }
        let mut failure = None;
        for (i, w) in std::mem::take(&mut self.workers).into_iter().enumerate() {
            match w.thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = Some(err(format!("worker {i}: {e}"))),
                Err(_) => failure = Some(err(format!("worker {i} panicked"))),
            }
        }
        self.drain_events();
        self.final_snapshot();
        self.publish_registrar();
        self.shm.heartbeat();
        self.shm.mark_stopped();
        failure.map_or(Ok(()), Err)
    }

    pub fn shm(&self) -> &ShmFile {
        &self.shm
    }
}

/// The events output a setting names (`None`: nobody reads them).
fn open_events(to: &EventsTo) -> Result<Option<Box<dyn Write + Send>>, DaemonError> {
    Ok(match to {
        EventsTo::None => None,
        EventsTo::Stdout => Some(Box::new(BufWriter::new(io::stdout()))),
        EventsTo::File(p) => Some(Box::new(BufWriter::new(
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| err(format!("cannot open events file {}: {e}", p.display())))?,
        ))),
    })
}

/// A contact checked and ready for its worker.
struct Prepared {
    worker: usize,
    contact: NewContact,
}

/// Why a contact was not registered.
enum Refusal {
    /// The contact itself is wrong (URI, destination, size).
    Bad(String),
    /// Its worker's slab is full.
    Full(String),
}

/// The durable record of a contact read from a file.
fn record_of(spec: &ContactSpec) -> ContactRecord {
    ContactRecord {
        uri: spec.uri.clone(),
        aor: spec.aor.clone(),
        received: spec
            .received
            .clone()
            .or_else(|| spec.send_to.map(|d| format!("sip:{d}"))),
        path: spec.path.clone(),
        interval_ms: spec
            .interval
            .map(|d| d.as_millis().min(u32::MAX as u128) as u32),
        owner: None,
        socket: spec.socket.clone(),
        source: spec.source.map(|s| s.to_string()),
        keepalive: spec.keepalive.map(|k| k.name().to_string()),
        registrar_expires: None,
    }
}

/// The contact a durable record describes. A `received` given as a bare
/// `IP:port` is read as the SIP URI `sip:IP:port`. A `source` or
/// `keepalive` that does not parse is refused (never pinged otherwise
/// than asked).
fn spec_of(rec: &ContactRecord) -> Result<ContactSpec, String> {
    let source = match rec.source.as_deref() {
        None => None,
        Some(s) => Some(s.parse().map_err(|e| format!("source: {e}"))?),
    };
    let keepalive = match rec.keepalive.as_deref() {
        None => None,
        Some(k) => Some(k.parse().map_err(|e| format!("keepalive: {e}"))?),
    };
    Ok(ContactSpec {
        uri: rec.uri.clone(),
        aor: rec.aor.clone(),
        received: rec.received.as_ref().map(|r| {
            if r.starts_with("sip:") || r.starts_with("sips:") {
                r.clone()
            } else {
                format!("sip:{r}")
            }
        }),
        path: rec.path.clone(),
        interval: rec.interval_ms.map(|ms| Duration::from_millis(ms as u64)),
        socket: rec.socket.clone(),
        source,
        keepalive,
        ..ContactSpec::default()
    })
}

/// Whether workers build state-change events: someone reads them (the
/// events output, or control-socket subscribers).
fn events_wanted(settings: &Settings) -> bool {
    settings.events != EventsTo::None || settings.control.is_some()
}

/// The liveness part of a slot, for snapshots.
fn history_of(rec: &SlotRecord) -> History {
    History {
        state: rec.state,
        misses: rec.misses,
        sent: rec.sent,
        answered: rec.answered,
        rtt_last_us: rec.rtt_last_us,
        rtt_min_us: rec.rtt_min_us,
        rtt_max_us: rec.rtt_max_us,
        srtt_us: rec.srtt_us,
        rttvar_us: rec.rttvar_us,
        last_code: rec.last_code,
        last_ping_ms: rec.last_ping_ms,
        last_reply_ms: rec.last_reply_ms,
    }
}

/// A restored history as the slot fields the worker copies.
fn slot_of(h: &History) -> SlotRecord {
    SlotRecord {
        state: h.state,
        misses: h.misses,
        sent: h.sent,
        answered: h.answered,
        rtt_last_us: h.rtt_last_us,
        rtt_min_us: h.rtt_min_us,
        rtt_max_us: h.rtt_max_us,
        srtt_us: h.srtt_us,
        rttvar_us: h.rttvar_us,
        last_code: h.last_code,
        last_ping_ms: h.last_ping_ms,
        last_reply_ms: h.last_reply_ms,
        ..SlotRecord::default()
    }
}

/// A stable 24-bit instance id: a hash of the instance name and this run's
/// start time, so replies to a previous run are told apart from forgeries.
fn instance_id(instance: &str) -> u32 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    instance.hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    (h.finish() & 0xFF_FFFF) as u32
}

/// Interface names for a log line.
fn interface_names(indexes: &[u32]) -> String {
    let all = interface_indexes().unwrap_or_default();
    indexes
        .iter()
        .map(|i| {
            all.iter()
                .find(|(j, _)| j == i)
                .map_or_else(|| format!("#{i}"), |(_, n)| n.clone())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// An address as the host of a SIP URI (IPv6 in brackets, RFC 3261 §25.1).
fn host_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// `scheme:user@host:port` of a parsed URI, without parameters or headers.
fn strip_params(text: &str, uri: &SipUri<'_>) -> String {
    let cut = text.len() - uri.params.len() - uri.headers.len();
    text[..cut].trim().to_string()
}

fn state_name(s: State) -> &'static str {
    match s {
        State::Unknown => "unknown",
        State::Up => "up",
        State::Down => "down",
        State::Removed => "removed",
        State::Unmonitored => "unmonitored",
    }
}

fn reason_name(r: Reason) -> &'static str {
    match r {
        Reason::Reply => "reply",
        Reason::Timeout => "timeout",
        Reason::ErrorReply => "error_reply",
        Reason::Unreachable => "unreachable",
        Reason::Removed => "removed",
    }
}

/// One event as a JSON line (DESIGN §6: time, contact, old, new, reason, rtt).
pub fn event_json(e: &Event) -> String {
    let mut v = serde_json::json!({
        "time": crate::timefmt::rfc3339_ms(e.time_ms),
        "time_ms": e.time_ms,
        "uri": e.uri,
        "dest": e.dest.to_string(),
        "worker": e.worker,
        "slot": e.slot,
        "old": state_name(e.old),
        "new": state_name(e.new),
        "reason": reason_name(e.reason),
        "misses": e.misses,
    });
    if let Some(rtt) = e.rtt_us {
        v["rtt_us"] = rtt.into();
    }
    if e.code != 0 {
        v["code"] = e.code.into();
    }
    v.to_string()
}
