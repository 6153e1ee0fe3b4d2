//! Daemon configuration: a TOML file, overridden by command-line flags,
//! validated once into [`Settings`] before anything starts.
//!
//! Every setting is documented in `kaping.example.toml` at the top of the
//! repository; this module and that file list the same names. An invalid
//! value is refused with the setting's name and the reason, and an unknown
//! name is refused too (a typo must not silently fall back to a default).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::access::Group;
use crate::contact::{parse_shard, parse_socket, KeepaliveKind, PingSource};
use crate::duration::parse_duration;
use crate::engine::liveness::AliveCodes;
use crate::policy::DestinationPolicy;
use crate::sources::Format;
use crate::wire::template::{TemplateConfig, TemplateError};

/// A duration in the file: a number of seconds or a string with a unit.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum DurationValue {
    Seconds(f64),
    Text(String),
}

impl DurationValue {
    fn parse(&self, setting: &'static str) -> Result<Duration, ConfigError> {
        match self {
            DurationValue::Seconds(s) => crate::duration::from_seconds(*s)
                .map_err(|e| ConfigError::invalid(setting, format!("{s} is not a duration: {e}"))),
            DurationValue::Text(t) => {
                parse_duration(t).map_err(|e| ConfigError::invalid(setting, e))
            }
        }
    }
}

impl std::str::FromStr for DurationValue {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s)?; // refuse early, with clap naming the flag
        Ok(DurationValue::Text(s.to_string()))
    }
}

/// The raw settings as written in the file or on the command line. `None`
/// means "not given here".
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub instance: Option<String>,
    pub workers: Option<u32>,
    pub max_contacts: Option<u32>,
    pub backend: Option<String>,
    pub bind: Option<String>,
    pub bind6: Option<String>,
    pub steering: Option<String>,
    pub advertise: Option<String>,
    pub shm: Option<PathBuf>,
    pub shm_group: Option<String>,
    pub events: Option<String>,
    pub contacts: Option<PathBuf>,
    pub contacts_format: Option<String>,
    pub allow_destinations: Option<Vec<String>>,
    pub deny_destinations: Option<Vec<String>>,
    pub recv_buffer: Option<u64>,
    pub send_buffer: Option<u64>,
    pub pin_workers: Option<bool>,
    pub source: Option<String>,
    pub source_default: Option<String>,
    pub replies: Option<String>,
    pub divert_interfaces: Option<Vec<String>>,
    pub keepalive: Option<String>,
    pub shard: Option<String>,
    pub dmq: Option<String>,
    pub dmq_peer: Option<Vec<String>>,
    pub dmq_grace: Option<DurationValue>,
    pub registrar_rpc: Option<String>,
    pub registrar_table: Option<String>,
    pub remove_max_fraction: Option<f64>,
    pub remove_rate: Option<u32>,

    pub method: Option<String>,
    pub from: Option<String>,
    pub domain: Option<String>,
    pub extra_headers: Option<Vec<String>>,
    pub interval: Option<DurationValue>,
    pub jitter: Option<DurationValue>,
    pub reply_timeout: Option<DurationValue>,
    pub retries: Option<u8>,
    pub down_after: Option<u16>,
    pub remove_after: Option<u16>,
    pub alive_codes: Option<String>,
    pub rate_limit: Option<u64>,

    pub control: Option<PathBuf>,
    pub control_max_connections: Option<u32>,
    pub control_max_request: Option<u64>,
    pub state_dir: Option<PathBuf>,
    pub state_group: Option<String>,
    pub snapshot_interval: Option<DurationValue>,
}

macro_rules! overlay {
    ($dst:ident, $src:ident, $($field:ident),*) => {
        $( if $src.$field.is_some() { $dst.$field = $src.$field.clone(); } )*
    };
}

impl RawConfig {
    /// Reads a TOML file; errors name the file and the offending setting.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        Self::from_toml(&text).map_err(|why| ConfigError::File {
            path: path.to_path_buf(),
            why,
        })
    }

    pub fn from_toml(text: &str) -> Result<RawConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Settings given in `other` replace ours (command line over file).
    pub fn overlay(&mut self, other: &RawConfig) {
        overlay!(
            self,
            other,
            instance,
            workers,
            max_contacts,
            backend,
            bind,
            bind6,
            steering,
            advertise,
            shm,
            shm_group,
            events,
            contacts,
            contacts_format,
            allow_destinations,
            deny_destinations,
            recv_buffer,
            send_buffer,
            pin_workers,
            source,
            source_default,
            replies,
            divert_interfaces,
            keepalive,
            shard,
            dmq,
            dmq_peer,
            dmq_grace,
            registrar_rpc,
            registrar_table,
            remove_max_fraction,
            remove_rate,
            method,
            from,
            domain,
            extra_headers,
            interval,
            jitter,
            reply_timeout,
            retries,
            down_after,
            remove_after,
            alive_codes,
            rate_limit,
            control,
            control_max_connections,
            control_max_request,
            state_dir,
            state_group,
            snapshot_interval
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("setting '{setting}': {why}")]
    Invalid { setting: &'static str, why: String },
}

impl ConfigError {
    fn invalid(setting: &'static str, why: impl Into<String>) -> ConfigError {
        debug_assert!(SETTINGS.contains(&setting), "unknown setting {setting}");
        ConfigError::Invalid {
            setting,
            why: why.into(),
        }
    }
}

/// Every setting's name, as in the file, on the command line (with dashes)
/// and in error messages; `kaping.example.toml` documents each one.
pub const SETTINGS: &[&str] = &[
    "instance",
    "workers",
    "max_contacts",
    "backend",
    "bind",
    "bind6",
    "steering",
    "advertise",
    "shm",
    "shm_group",
    "events",
    "contacts",
    "contacts_format",
    "allow_destinations",
    "deny_destinations",
    "recv_buffer",
    "send_buffer",
    "pin_workers",
    "source",
    "source_default",
    "replies",
    "divert_interfaces",
    "keepalive",
    "shard",
    "dmq",
    "dmq_peer",
    "dmq_grace",
    "registrar_rpc",
    "registrar_table",
    "remove_max_fraction",
    "remove_rate",
    "method",
    "from",
    "domain",
    "extra_headers",
    "interval",
    "jitter",
    "reply_timeout",
    "retries",
    "down_after",
    "remove_after",
    "alive_codes",
    "rate_limit",
    "control",
    "control_max_connections",
    "control_max_request",
    "state_dir",
    "state_group",
    "snapshot_interval",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring, falling back to mmsg when the kernel refuses it.
    Auto,
    Uring,
    Mmsg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Steering {
    /// Worker `i` owns local port `bind.port + i`.
    PortPerWorker,
    /// All workers share `bind`'s port; the kernel steers replies by source
    /// address hash (SO_REUSEPORT + classic BPF).
    SharedPort,
}

/// How replies to pings sent as the proxy reach kaping (DESIGN §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replies {
    /// The request carries a second Via naming kaping's receive socket;
    /// the proxy finds no transaction for the reply and forwards it there
    /// statelessly (one forward per ping on the proxy).
    Relay,
    /// A tc-ingress eBPF program hands replies bearing kaping's marker to
    /// kaping's socket before the proxy sees them (needs CAP_BPF and
    /// CAP_NET_ADMIN at start; falls back to relay, saying why).
    Divert,
}

impl Replies {
    pub fn name(self) -> &'static str {
        match self {
            Replies::Relay => "relay",
            Replies::Divert => "divert",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventsTo {
    None,
    Stdout,
    File(PathBuf),
}

/// Validated settings: everything typed, every cross-setting rule checked.
#[derive(Clone, Debug)]
pub struct Settings {
    pub instance: String,
    pub workers: u32,
    pub max_contacts: u32,
    pub backend: BackendChoice,
    pub bind: Option<SocketAddr>,
    pub bind6: Option<SocketAddr>,
    pub steering: Steering,
    pub advertise: String,
    /// `advertise` was given; otherwise each socket advertises its own
    /// bound address (loopback for a wildcard bind).
    pub advertise_explicit: bool,
    pub shm: PathBuf,
    /// The group that may read the shm file; `None`: the daemon's own.
    pub shm_group: Option<Group>,
    pub events: EventsTo,
    pub contacts: Option<PathBuf>,
    pub contacts_format: Format,
    /// Which destinations may be pinged (`allow_destinations`,
    /// `deny_destinations` and the fixed rules).
    pub destinations: DestinationPolicy,
    pub recv_buffer: usize,
    pub send_buffer: usize,
    pub pin_workers: bool,
    /// Where pings leave from, unless a contact says otherwise.
    pub source: PingSource,
    /// The source of a contact without a registration socket when the
    /// source is `socket`; `None`: kaping's own socket.
    pub source_default: Option<SocketAddr>,
    pub replies: Replies,
    /// Interfaces the divert program attaches to; empty = every interface.
    pub divert_interfaces: Vec<String>,
    pub keepalive: KeepaliveKind,
    /// `(K, N)`: keep only the contacts of shard K of N (DESIGN §11).
    pub shard: Option<(u32, u32)>,
    /// kaping's DMQ node address (DESIGN §11); `None`: no registrar feed.
    pub dmq: Option<SocketAddr>,
    /// The Kamailio DMQ nodes to join.
    pub dmq_peers: Vec<SocketAddr>,
    /// After a full sync, contacts of the feed it did not refresh are
    /// dropped once this has passed.
    pub dmq_grace: Duration,
    /// Kamailio's jsonrpcs datagram socket: contacts of the feed that
    /// reach `remove_after` are removed there (`ul.rm_contact`).
    pub registrar_rpc: Option<PathBuf>,
    pub registrar_table: String,
    /// The guard: more removals than this share of the feed's contacts
    /// within one interval, and none is made.
    pub remove_max_fraction: f64,
    /// Removals per second at most.
    pub remove_rate: u32,
    pub template: TemplateConfig,
    pub domain: Option<String>,
    pub interval: Duration,
    pub jitter: Duration,
    pub reply_timeout: Duration,
    pub retries: u8,
    pub down_after: u16,
    pub remove_after: u16,
    pub alive_codes: AliveCodes,
    pub alive_codes_text: String,
    pub rate_limit: u64,
    /// UNIX socket of the JSON-RPC control interface; `None` = no control.
    pub control: Option<PathBuf>,
    pub control_max_connections: u32,
    pub control_max_request: usize,
    /// Directory of the journal and snapshots; `None` = not durable.
    pub state_dir: Option<PathBuf>,
    /// The group that may read the state directory and its files; `None`:
    /// the daemon's own.
    pub state_group: Option<Group>,
    pub snapshot_interval: Duration,
}

impl Settings {
    /// Compares the settings a SIGHUP can change in a running daemon
    /// (`LIVE_SETTINGS`) and names the others that differ (they need a
    /// restart). Returns (changed live, needing restart).
    pub fn diff(&self, new: &Settings) -> (Vec<&'static str>, Vec<&'static str>) {
        let mut live = Vec::new();
        let mut restart = Vec::new();
        macro_rules! cmp {
            ($list:ident, $($field:ident),*) => {
                $( if self.$field != new.$field { $list.push(stringify!($field)); } )*
            };
        }
        cmp!(
            live,
            interval,
            jitter,
            reply_timeout,
            retries,
            down_after,
            remove_after
        );
        if self.alive_codes_text != new.alive_codes_text {
            live.push("alive_codes");
        }
        cmp!(live, rate_limit, events);
        if self.destinations.allow != new.destinations.allow {
            live.push("allow_destinations");
        }
        if self.destinations.deny != new.destinations.deny {
            live.push("deny_destinations");
        }
        cmp!(
            restart,
            instance,
            workers,
            max_contacts,
            backend,
            bind,
            bind6,
            steering,
            advertise,
            shm,
            shm_group,
            contacts,
            contacts_format,
            destinations,
            recv_buffer,
            send_buffer,
            pin_workers,
            source,
            source_default,
            replies,
            divert_interfaces,
            keepalive,
            shard,
            dmq,
            dmq_peers,
            dmq_grace,
            registrar_rpc,
            registrar_table,
            remove_max_fraction,
            remove_rate,
            domain,
            control,
            control_max_connections,
            control_max_request,
            state_dir,
            state_group,
            destinations,
            snapshot_interval
        );
        if self.template.method != new.template.method {
            restart.push("method");
        }
        if self.template.from_uri != new.template.from_uri {
            restart.push("from");
        }
        if self.template.extra_headers != new.template.extra_headers {
            restart.push("extra_headers");
        }
        (live, restart)
    }
}

/// Defaults, as documented in kaping.example.toml.
pub mod defaults {
    pub const INSTANCE: &str = "default";
    pub const MAX_CONTACTS: u32 = 1_000_000;
    pub const BIND: &str = "0.0.0.0:5070";
    pub const INTERVAL_S: u64 = 30;
    pub const REPLY_TIMEOUT_MS: u64 = 2000;
    pub const DOWN_AFTER: u16 = 3;
    pub const RECV_BUFFER: u64 = 32 << 20;
    pub const SEND_BUFFER: u64 = 8 << 20;
    /// Workers are identified by 8 bits in the token.
    pub const WORKERS_MAX: u32 = 256;
    pub const CONTROL_MAX_CONNECTIONS: u32 = 64;
    pub const CONTROL_MAX_REQUEST: u64 = 16 << 20;
    pub const SNAPSHOT_INTERVAL_S: u64 = 300;
    pub const DMQ_GRACE_S: u64 = 30;
    pub const REMOVE_MAX_FRACTION: f64 = 0.05;
    pub const REMOVE_RATE: u32 = 100;
}

/// The shared-memory path a given instance uses by default.
pub fn default_shm_path(instance: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm/kaping-{instance}"))
}

impl Settings {
    /// Validates `raw` (file + flags already overlaid).
    pub fn from_raw(raw: &RawConfig) -> Result<Settings, ConfigError> {
        let instance = raw
            .instance
            .clone()
            .unwrap_or_else(|| defaults::INSTANCE.into());
        if instance.is_empty()
            || instance.len() > 32
            || !instance
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::invalid(
                "instance",
                format!("'{instance}' must be 1-32 characters of letters, digits, '-' or '_'"),
            ));
        }
        let online = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let workers = match raw.workers.unwrap_or(0) {
            0 => online.min(defaults::WORKERS_MAX),
            n if n > defaults::WORKERS_MAX => {
                return Err(ConfigError::invalid(
                    "workers",
                    format!(
                        "{n} is more than the {} a token can name",
                        defaults::WORKERS_MAX
                    ),
                ))
            }
            n => n,
        };
        let max_contacts = raw.max_contacts.unwrap_or(defaults::MAX_CONTACTS);
        if max_contacts == 0 {
            return Err(ConfigError::invalid("max_contacts", "must be at least 1"));
        }
        let backend = match raw.backend.as_deref().unwrap_or("auto") {
            "auto" => BackendChoice::Auto,
            "uring" | "io_uring" => BackendChoice::Uring,
            "mmsg" => BackendChoice::Mmsg,
            other => {
                return Err(ConfigError::invalid(
                    "backend",
                    format!("'{other}' is not one of auto, uring, mmsg"),
                ))
            }
        };
        let bind = parse_bind("bind", raw.bind.as_deref().unwrap_or(defaults::BIND), false)?;
        let bind6 = parse_bind("bind6", raw.bind6.as_deref().unwrap_or(""), true)?;
        // `bind` may itself be IPv6 when there is no IPv4 side at all.
        let (bind, bind6) = match (bind, bind6) {
            (Some(b), None) if b.is_ipv6() => (None, Some(b)),
            (Some(b), Some(_)) if b.is_ipv6() => {
                return Err(ConfigError::invalid(
                    "bind",
                    "IPv6 in both bind and bind6; give bind an IPv4 address",
                ))
            }
            other => other,
        };
        if bind.is_none() && bind6.is_none() {
            return Err(ConfigError::invalid(
                "bind",
                "no local address: set bind and/or bind6",
            ));
        }
        let steering = match raw.steering.as_deref().unwrap_or("port-per-worker") {
            "port-per-worker" => Steering::PortPerWorker,
            "shared-port" => Steering::SharedPort,
            other => {
                return Err(ConfigError::invalid(
                    "steering",
                    format!("'{other}' is not one of port-per-worker, shared-port"),
                ))
            }
        };
        if steering == Steering::PortPerWorker {
            for (name, b) in [("bind", bind), ("bind6", bind6)] {
                if let Some(b) = b {
                    if b.port() == 0 {
                        return Err(ConfigError::invalid(
                            name,
                            "port 0: port-per-worker needs a fixed first port",
                        ));
                    }
                    if b.port() as u32 + workers - 1 > u16::MAX as u32 {
                        return Err(ConfigError::invalid(
                            name,
                            format!(
                                "ports {}..{} do not fit for {workers} workers",
                                b.port(),
                                b.port() as u32 + workers - 1
                            ),
                        ));
                    }
                }
            }
        }
        let local = bind.or(bind6).expect("checked above");
        let advertise = match raw.advertise.as_deref() {
            Some(a) if !a.is_empty() => a.to_string(),
            _ if local.ip().is_unspecified() => {
                if local.is_ipv6() {
                    "::1".into()
                } else {
                    "127.0.0.1".into()
                }
            }
            _ => local.ip().to_string(),
        };
        let shm = raw
            .shm
            .clone()
            .unwrap_or_else(|| default_shm_path(&instance));
        let events = match raw.events.as_deref() {
            None | Some("-") => EventsTo::Stdout,
            Some("") | Some("none") => EventsTo::None,
            Some(p) => EventsTo::File(PathBuf::from(p)),
        };
        let contacts_format: Format = raw
            .contacts_format
            .as_deref()
            .unwrap_or("auto")
            .parse()
            .map_err(|e: String| ConfigError::invalid("contacts_format", e))?;
        let buffer = |name, v: Option<u64>, d| -> Result<usize, ConfigError> {
            let v = v.unwrap_or(d);
            if v > i32::MAX as u64 {
                return Err(ConfigError::invalid(
                    name,
                    format!("{v} bytes is more than the kernel accepts"),
                ));
            }
            Ok(v as usize)
        };
        let recv_buffer = buffer("recv_buffer", raw.recv_buffer, defaults::RECV_BUFFER)?;
        let send_buffer = buffer("send_buffer", raw.send_buffer, defaults::SEND_BUFFER)?;

        let source: PingSource = match raw.source.as_deref() {
            None | Some("") => PingSource::Bind,
            Some(t) => t.parse().map_err(|e| ConfigError::invalid("source", e))?,
        };
        let source_default = match raw.source_default.as_deref() {
            None | Some("") => None,
            Some(t) => {
                Some(parse_socket(t).map_err(|e| ConfigError::invalid("source_default", e))?)
            }
        };
        // A ping sent as the proxy has its reply relayed (or diverted) to
        // kaping's own socket of the same family: there must be one.
        for (setting, addr) in [
            (
                "source",
                if let PingSource::Addr(a) = source {
                    Some(a)
                } else {
                    None
                },
            ),
            ("source_default", source_default),
        ] {
            let Some(a) = addr else { continue };
            let (have, family, needs) = if a.is_ipv6() {
                (bind6.is_some(), "IPv6", "bind6")
            } else {
                (bind.is_some(), "IPv4", "bind")
            };
            if !have {
                return Err(ConfigError::invalid(
                    setting,
                    format!("{a} is {family} but kaping has no {family} socket to receive the replies on (set {needs})"),
                ));
            }
        }
        let replies = match raw.replies.as_deref().unwrap_or("relay") {
            "relay" => Replies::Relay,
            "divert" => Replies::Divert,
            other => {
                return Err(ConfigError::invalid(
                    "replies",
                    format!("'{other}' is not one of relay, divert"),
                ))
            }
        };
        let divert_interfaces = raw.divert_interfaces.clone().unwrap_or_default();
        if let Some(bad) = divert_interfaces
            .iter()
            .find(|i| i.is_empty() || i.len() > 15 || i.contains(['/', ' ']))
        {
            return Err(ConfigError::invalid(
                "divert_interfaces",
                format!("'{bad}' is not an interface name"),
            ));
        }
        let keepalive: KeepaliveKind = raw
            .keepalive
            .as_deref()
            .unwrap_or("sip")
            .parse()
            .map_err(|e| ConfigError::invalid("keepalive", e))?;

        let shard = match raw.shard.as_deref() {
            None | Some("") => None,
            Some(t) => Some(parse_shard(t).map_err(|e| ConfigError::invalid("shard", e))?),
        };

        let destinations = DestinationPolicy::new(
            raw.allow_destinations.as_deref().unwrap_or_default(),
            raw.deny_destinations.as_deref().unwrap_or_default(),
        )
        .map_err(|(setting, why)| ConfigError::invalid(setting, why))?;

        let dmq = match raw.dmq.as_deref() {
            None | Some("") => None,
            Some(t) => Some(parse_sip_addr(t).map_err(|e| ConfigError::invalid("dmq", e))?),
        };
        let dmq_peers = raw
            .dmq_peer
            .iter()
            .flatten()
            .filter(|p| !p.is_empty())
            .map(|p| parse_sip_addr(p).map_err(|e| ConfigError::invalid("dmq_peer", e)))
            .collect::<Result<Vec<_>, _>>()?;
        if dmq.is_some() && dmq_peers.is_empty() {
            return Err(ConfigError::invalid(
                "dmq_peer",
                "dmq is set but no Kamailio node to join: give its dmq server_address (sip:IP:PORT)",
            ));
        }
        if dmq.is_none() && !dmq_peers.is_empty() {
            return Err(ConfigError::invalid(
                "dmq",
                "dmq_peer is set but not kaping's own node address: give dmq = \"sip:IP:PORT\"",
            ));
        }
        let dmq_grace = raw
            .dmq_grace
            .as_ref()
            .map_or(Ok(Duration::from_secs(defaults::DMQ_GRACE_S)), |v| {
                v.parse("dmq_grace")
            })?;

        let registrar_rpc = match raw.registrar_rpc.as_deref() {
            None | Some("") => None,
            Some(t) => {
                let path = t.strip_prefix("unix:").unwrap_or(t);
                if !path.starts_with('/') {
                    return Err(ConfigError::invalid(
                        "registrar_rpc",
                        format!(
                            "'{t}' is not unix:/absolute/path (Kamailio's jsonrpcs dgram_socket)"
                        ),
                    ));
                }
                Some(PathBuf::from(path))
            }
        };
        if registrar_rpc.is_some() && dmq.is_none() {
            return Err(ConfigError::invalid(
                "registrar_rpc",
                "removes contacts of the registrar feed: set dmq and dmq_peer too",
            ));
        }
        let registrar_table = raw
            .registrar_table
            .clone()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "location".into());
        if !registrar_table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(ConfigError::invalid(
                "registrar_table",
                format!("'{registrar_table}' is not a usrloc table name"),
            ));
        }
        let remove_max_fraction = raw
            .remove_max_fraction
            .unwrap_or(defaults::REMOVE_MAX_FRACTION);
        if !(remove_max_fraction > 0.0 && remove_max_fraction <= 1.0) {
            return Err(ConfigError::invalid(
                "remove_max_fraction",
                format!("{remove_max_fraction} is not within (0, 1]"),
            ));
        }
        let remove_rate = raw.remove_rate.unwrap_or(defaults::REMOVE_RATE);
        if remove_rate == 0 {
            return Err(ConfigError::invalid(
                "remove_rate",
                "must be at least 1 per second",
            ));
        }

        let method = raw.method.clone().unwrap_or_else(|| "OPTIONS".into());
        let advertise_in_uri = match advertise.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{advertise}]"),
            _ => advertise.clone(),
        };
        let from = match raw.from.as_deref() {
            Some(f) if !f.is_empty() => f.to_string(),
            _ => format!("sip:kaping@{advertise_in_uri}"),
        };
        let template = TemplateConfig {
            method,
            from_uri: from,
            local_host: advertise.clone(),
            local_port: local.port(),
            extra_headers: raw.extra_headers.clone().unwrap_or_default(),
            ..TemplateConfig::default()
        };
        // Template::new validates method, from, headers and host; do it now
        // so a bad value is reported by setting name before anything starts.
        if let Err(e) = crate::wire::template::Template::new(&template) {
            return Err(ConfigError::invalid(template_setting(&e), e.to_string()));
        }
        let domain = raw.domain.clone().filter(|d| !d.is_empty());
        if let Some(d) = &domain {
            crate::wire::template::to_uri("x", Some(d))
                .map_err(|e| ConfigError::invalid("domain", e.to_string()))?;
        }

        let interval = raw
            .interval
            .as_ref()
            .map_or(Ok(Duration::from_secs(defaults::INTERVAL_S)), |v| {
                v.parse("interval")
            })?;
        if interval < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                "interval",
                format!("{interval:?} is below the 10 ms minimum"),
            ));
        }
        let jitter = raw
            .jitter
            .as_ref()
            .map_or(Ok(Duration::ZERO), |v| v.parse("jitter"))?;
        if jitter >= interval {
            return Err(ConfigError::invalid(
                "jitter",
                format!("{jitter:?} must be below interval {interval:?}"),
            ));
        }
        let reply_timeout = raw
            .reply_timeout
            .as_ref()
            .map_or(Ok(Duration::from_millis(defaults::REPLY_TIMEOUT_MS)), |v| {
                v.parse("reply_timeout")
            })?;
        if reply_timeout < Duration::from_millis(1) {
            return Err(ConfigError::invalid(
                "reply_timeout",
                "must be at least 1ms",
            ));
        }
        if reply_timeout >= interval {
            return Err(ConfigError::invalid(
                "reply_timeout",
                format!("{reply_timeout:?} must be shorter than interval {interval:?} (one ping in flight per contact)"),
            ));
        }
        let retries = raw.retries.unwrap_or(0);
        if retries > 6 {
            return Err(ConfigError::invalid(
                "retries",
                format!("{retries} is more than 6"),
            ));
        }
        // Retransmission k waits T1·2^k (RFC 3261 §17.1.2.2), the last
        // transmission reply_timeout: the whole ping must end before the next.
        let window = Duration::from_millis(500 * ((1u64 << retries) - 1)) + reply_timeout;
        if retries > 0 && window >= interval {
            return Err(ConfigError::invalid(
                "retries",
                format!(
                    "{retries} retransmissions (500ms doubling) plus reply_timeout take {window:?}, \
                     not shorter than interval {interval:?}"
                ),
            ));
        }
        let down_after = raw.down_after.unwrap_or(defaults::DOWN_AFTER);
        if down_after == 0 {
            return Err(ConfigError::invalid(
                "down_after",
                "must be at least 1 miss",
            ));
        }
        let remove_after = raw.remove_after.unwrap_or(0);
        if remove_after != 0 && remove_after < down_after {
            return Err(ConfigError::invalid(
                "remove_after",
                format!("{remove_after} must be 0 (never) or at least down_after ({down_after})"),
            ));
        }
        let alive_codes_text = raw.alive_codes.clone().unwrap_or_else(|| "any".into());
        let alive_codes = AliveCodes::parse(&alive_codes_text)
            .map_err(|e| ConfigError::invalid("alive_codes", e.to_string()))?;
        let control_max_connections = raw
            .control_max_connections
            .unwrap_or(defaults::CONTROL_MAX_CONNECTIONS);
        if !(1..=4096).contains(&control_max_connections) {
            return Err(ConfigError::invalid(
                "control_max_connections",
                format!("{control_max_connections} is not within 1..=4096"),
            ));
        }
        let control_max_request = raw
            .control_max_request
            .unwrap_or(defaults::CONTROL_MAX_REQUEST);
        if !(1024..=1 << 30).contains(&control_max_request) {
            return Err(ConfigError::invalid(
                "control_max_request",
                format!("{control_max_request} bytes is not within 1 KiB..1 GiB"),
            ));
        }
        let control_max_request = control_max_request as usize;
        let snapshot_interval = raw.snapshot_interval.as_ref().map_or(
            Ok(Duration::from_secs(defaults::SNAPSHOT_INTERVAL_S)),
            |v| v.parse("snapshot_interval"),
        )?;
        if snapshot_interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "snapshot_interval",
                format!("{snapshot_interval:?} is below the 1 s minimum"),
            ));
        }
        let shm_group = parse_group("shm_group", raw.shm_group.as_deref())?;
        let state_dir = raw.state_dir.clone().filter(|p| !p.as_os_str().is_empty());
        let state_group = parse_group("state_group", raw.state_group.as_deref())?;
        if state_group.is_some() && state_dir.is_none() {
            return Err(ConfigError::invalid(
                "state_group",
                "set, but state_dir is not: there is no state directory to give to the group",
            ));
        }
        Ok(Settings {
            instance,
            workers,
            max_contacts,
            backend,
            bind,
            bind6,
            steering,
            advertise,
            advertise_explicit: raw.advertise.as_deref().is_some_and(|a| !a.is_empty()),
            shm,
            shm_group,
            events,
            contacts: raw.contacts.clone(),
            contacts_format,
            destinations,
            recv_buffer,
            send_buffer,
            pin_workers: raw.pin_workers.unwrap_or(true),
            source,
            source_default,
            replies,
            divert_interfaces,
            keepalive,
            shard,
            dmq,
            dmq_peers,
            dmq_grace,
            registrar_rpc,
            registrar_table,
            remove_max_fraction,
            remove_rate,
            template,
            domain,
            interval,
            jitter,
            reply_timeout,
            retries,
            down_after,
            remove_after,
            alive_codes,
            alive_codes_text,
            rate_limit: raw.rate_limit.unwrap_or(0),
            control: raw.control.clone().filter(|p| !p.as_os_str().is_empty()),
            control_max_connections,
            control_max_request,
            state_dir,
            state_group,
            snapshot_interval,
        })
    }
}

/// Which setting a template error is about.
fn template_setting(e: &TemplateError) -> &'static str {
    match e {
        TemplateError::Method(_) | TemplateError::MethodUnsuitable { .. } => "method",
        TemplateError::FromUri { .. } | TemplateError::FromHeaders(_) => "from",
        TemplateError::ExtraHeader { .. } => "extra_headers",
        TemplateError::LocalHost { .. } => "advertise",
        TemplateError::LocalPort => "bind",
        _ => "advertise",
    }
}

/// A group setting (`shm_group`, `state_group`): a name or a numeric gid,
/// resolved now so a group that does not exist stops kaping at start (or
/// fails a reload) rather than at the first file it creates. Empty or
/// absent: `None`.
fn parse_group(setting: &'static str, text: Option<&str>) -> Result<Option<Group>, ConfigError> {
    match text {
        None | Some("") => Ok(None),
        Some(t) => Group::resolve(setting, t)
            .map(Some)
            .map_err(|why| ConfigError::invalid(setting, why)),
    }
}

/// A DMQ node address: `sip:IP:PORT` as Kamailio's `server_address`
/// writes it, or a bare `IP:PORT` (IPv6 in brackets).
fn parse_sip_addr(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    let bare = t.strip_prefix("sip:").unwrap_or(t);
    bare.parse()
        .map_err(|_| format!("'{t}' is not sip:IP:PORT (IPv6 as sip:[addr]:port)"))
}

fn parse_bind(
    setting: &'static str,
    s: &str,
    v6_only: bool,
) -> Result<Option<SocketAddr>, ConfigError> {
    if s.is_empty() {
        return Ok(None);
    }
    let addr: SocketAddr = s.parse().map_err(|_| {
        ConfigError::invalid(
            setting,
            format!("'{s}' is not IP:PORT (IPv6 as [addr]:port)"),
        )
    })?;
    if v6_only && addr.is_ipv4() {
        return Err(ConfigError::invalid(
            setting,
            format!("'{s}' is not an IPv6 address"),
        ));
    }
    Ok(Some(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> Result<Settings, ConfigError> {
        Settings::from_raw(&RawConfig::from_toml(toml).unwrap())
    }

    fn err(toml: &str) -> String {
        settings(toml).unwrap_err().to_string()
    }

    #[test]
    fn the_example_config_is_valid_and_complete() {
        let text = include_str!("../kaping.example.toml");
        let raw = RawConfig::from_toml(text).unwrap();
        Settings::from_raw(&raw).unwrap();
        // Every setting is documented there (commented out or not).
        for name in SETTINGS {
            assert!(
                text.contains(&format!("\n{name} =")) || text.contains(&format!("\n# {name} =")),
                "{name}"
            );
        }
    }

    #[test]
    fn defaults() {
        let s = settings("").unwrap();
        assert_eq!(s.interval, Duration::from_secs(30));
        assert_eq!(s.reply_timeout, Duration::from_secs(2));
        assert_eq!(s.down_after, 3);
        assert_eq!(s.bind, Some("0.0.0.0:5070".parse().unwrap()));
        assert_eq!(s.advertise, "127.0.0.1");
        assert_eq!(s.template.from_uri, "sip:kaping@127.0.0.1");
        assert_eq!(s.shm, PathBuf::from("/dev/shm/kaping-default"));
        assert_eq!(s.events, EventsTo::Stdout);
        assert!(s.workers >= 1);
    }

    #[test]
    fn control_settings_are_checked_and_reload_diff_sorts_live_from_restart() {
        let s = settings("control = \"/tmp/k.sock\"\nstate_dir = \"/tmp/k\"").unwrap();
        assert_eq!(s.control, Some(PathBuf::from("/tmp/k.sock")));
        assert_eq!(s.control_max_connections, 64);
        assert_eq!(s.snapshot_interval, Duration::from_secs(300));
        assert!(err("control_max_connections = 0").contains("control_max_connections"));
        assert!(err("control_max_request = 10").contains("control_max_request"));
        assert!(err("snapshot_interval = \"10ms\"").contains("snapshot_interval"));
        let new = settings(
            "control = \"/tmp/k.sock\"\nstate_dir = \"/tmp/k\"\ninterval = 10\nrate_limit = 5\nworkers = 7\nmethod = \"NOTIFY\"",
        )
        .unwrap();
        let (live, restart) = s.diff(&new);
        assert_eq!(live, vec!["interval", "rate_limit"]);
        assert_eq!(restart, vec!["workers", "method"]);
        assert_eq!(s.diff(&s.clone()), (vec![], vec![]));
    }

    #[test]
    fn durations_take_seconds_or_units() {
        let s = settings("interval = 0.5\nreply_timeout = \"200ms\"").unwrap();
        assert_eq!(s.interval, Duration::from_millis(500));
        assert_eq!(s.reply_timeout, Duration::from_millis(200));
    }

    #[test]
    fn flags_override_the_file() {
        let mut raw = RawConfig::from_toml("interval = \"10s\"\ndown_after = 5").unwrap();
        raw.overlay(&RawConfig {
            interval: Some(DurationValue::Text("5s".into())),
            ..RawConfig::default()
        });
        let s = Settings::from_raw(&raw).unwrap();
        assert_eq!(s.interval, Duration::from_secs(5));
        assert_eq!(s.down_after, 5);
    }

    #[test]
    fn bad_settings_are_named() {
        for (toml, starts) in [
            ("intervall = 3", "unknown field `intervall`"),
            (
                "interval = \"3 fortnights\"",
                "setting 'interval': unknown unit",
            ),
            ("interval = \"5ms\"", "setting 'interval':"),
            (
                "reply_timeout = \"40s\"",
                "setting 'reply_timeout': 40s must be shorter",
            ),
            ("workers = 300", "setting 'workers':"),
            (
                "backend = \"dpdk\"",
                "setting 'backend': 'dpdk' is not one of",
            ),
            (
                "bind = \"localhost\"",
                "setting 'bind': 'localhost' is not IP:PORT",
            ),
            ("bind6 = \"127.0.0.1:5\"", "setting 'bind6':"),
            ("steering = \"magic\"", "setting 'steering':"),
            ("down_after = 0", "setting 'down_after':"),
            (
                "interval = 3\nretries = 2",
                "setting 'retries': 2 retransmissions",
            ),
            (
                "down_after = 3\nremove_after = 2",
                "setting 'remove_after':",
            ),
            ("alive_codes = \"2xx\"", "setting 'alive_codes':"),
            ("method = \"OPT IONS\"", "setting 'method':"),
            (
                "extra_headers = [\"X-A: 1\\r\\nX-B: 2\"]",
                "setting 'extra_headers':",
            ),
            ("instance = \"a/b\"", "setting 'instance':"),
            ("contacts_format = \"csv\"", "setting 'contacts_format':"),
            (
                "bind = \"0.0.0.0:65535\"\nworkers = 2",
                "setting 'bind': ports",
            ),
        ] {
            let e = if toml.contains("intervall") {
                RawConfig::from_toml(toml).unwrap_err()
            } else {
                err(toml)
            };
            assert!(e.contains(starts), "{toml:?} gave {e:?}");
        }
    }

    #[test]
    fn source_replies_and_keepalive_settings() {
        let s = settings("").unwrap();
        assert_eq!(s.source, PingSource::Bind);
        assert_eq!(
            (s.replies, s.keepalive),
            (Replies::Relay, KeepaliveKind::Sip)
        );
        let s = settings(
            "source = \"socket\"\nsource_default = \"udp:203.0.113.10:5060\"\nreplies = \"divert\"\n\
             divert_interfaces = [\"eth0\"]\nkeepalive = \"crlf\"",
        )
        .unwrap();
        assert_eq!(s.source, PingSource::Socket);
        assert_eq!(s.source_default, Some("203.0.113.10:5060".parse().unwrap()));
        assert_eq!(s.replies, Replies::Divert);
        assert_eq!(s.divert_interfaces, vec!["eth0".to_string()]);
        assert_eq!(s.keepalive, KeepaliveKind::Crlf);
        let s = settings("source = \"203.0.113.10:5060\"").unwrap();
        assert_eq!(
            s.source,
            PingSource::Addr("203.0.113.10:5060".parse().unwrap())
        );
        for (toml, says) in [
            (
                "source = \"proxy\"",
                "setting 'source': socket 'proxy' is not",
            ),
            (
                "source = \"tcp:203.0.113.10:5060\"",
                "setting 'source': socket 'tcp:203.0.113.10:5060': protocol tcp",
            ),
            (
                "source = \"0.0.0.0:5060\"",
                "setting 'source': socket '0.0.0.0:5060': a wildcard",
            ),
            (
                "source_default = \"203.0.113.10\"",
                "setting 'source_default':",
            ),
            (
                "source = \"[2001:db8::1]:5060\"",
                "setting 'source': [2001:db8::1]:5060 is IPv6 but kaping has no IPv6 socket",
            ),
            (
                "bind = \"[::]:5070\"\nsource_default = \"203.0.113.10:5060\"",
                "setting 'source_default': 203.0.113.10:5060 is IPv4 but kaping has no IPv4 socket",
            ),
            (
                "replies = \"bounce\"",
                "setting 'replies': 'bounce' is not one of relay, divert",
            ),
            (
                "divert_interfaces = [\"a/b\"]",
                "setting 'divert_interfaces':",
            ),
            (
                "keepalive = \"stun\"",
                "setting 'keepalive': 'stun' is not one of sip, null, crlf",
            ),
        ] {
            let e = err(toml);
            assert!(e.contains(says), "{toml:?} gave {e:?}");
        }
        // An IPv6 source with an IPv6 socket of kaping's own is fine.
        settings("bind6 = \"[::]:5070\"\nsource = \"[2001:db8::1]:5060\"").unwrap();
    }

    #[test]
    fn registrar_feed_settings() {
        let s = settings(
            "dmq = \"sip:127.0.0.1:5071\"\ndmq_peer = [\"sip:127.0.0.1:5070\", \"[::1]:5070\"]\n\
             registrar_rpc = \"unix:/run/kamailio/kamailio_rpc.sock\"\nshard = \"1/4\"",
        )
        .unwrap();
        assert_eq!(s.dmq, Some("127.0.0.1:5071".parse().unwrap()));
        assert_eq!(s.dmq_peers.len(), 2);
        assert_eq!(s.dmq_grace, Duration::from_secs(30));
        assert_eq!(
            s.registrar_rpc,
            Some(PathBuf::from("/run/kamailio/kamailio_rpc.sock"))
        );
        assert_eq!(s.registrar_table, "location");
        assert_eq!((s.remove_max_fraction, s.remove_rate), (0.05, 100));
        assert_eq!(s.shard, Some((1, 4)));
        for (toml, says) in [
            ("dmq = \"sip:127.0.0.1:5071\"", "setting 'dmq_peer': dmq is set but no Kamailio node"),
            ("dmq_peer = [\"sip:127.0.0.1:5070\"]", "setting 'dmq': dmq_peer is set"),
            ("dmq = \"sip:kamailio.local\"", "setting 'dmq': 'sip:kamailio.local' is not sip:IP:PORT"),
            (
                "dmq = \"sip:127.0.0.1:5071\"\ndmq_peer = [\"sip:x\"]",
                "setting 'dmq_peer':",
            ),
            ("registrar_rpc = \"unix:/r.sock\"", "setting 'registrar_rpc': removes contacts of the registrar feed"),
            (
                "dmq = \"sip:127.0.0.1:5071\"\ndmq_peer = [\"sip:127.0.0.1:5070\"]\nregistrar_rpc = \"r.sock\"",
                "setting 'registrar_rpc': 'r.sock' is not unix:/absolute/path",
            ),
            ("remove_max_fraction = 0", "setting 'remove_max_fraction':"),
            ("remove_max_fraction = 1.5", "setting 'remove_max_fraction':"),
            ("remove_rate = 0", "setting 'remove_rate':"),
            ("registrar_table = \"loc;drop\"", "setting 'registrar_table':"),
            ("shard = \"3/3\"", "setting 'shard': shard 3 of 3"),
        ] {
            let e = err(toml);
            assert!(e.contains(says), "{toml:?} gave {e:?}");
        }
    }

    #[test]
    fn group_settings_resolve_names_and_gids_and_refuse_unknown_names() {
        let s =
            settings("shm_group = \"root\"\nstate_dir = \"/tmp/k\"\nstate_group = \"0\"").unwrap();
        let root = |setting| Group {
            setting,
            gid: 0,
            name: Some("root".into()),
        };
        assert_eq!(s.shm_group, Some(root("shm_group")));
        assert_eq!(s.state_group, Some(root("state_group")));
        let s = settings("shm_group = \"\"").unwrap();
        assert_eq!((s.shm_group, s.state_group), (None, None));
        for (toml, says) in [
            (
                "shm_group = \"kaping-no-such-group\"",
                "setting 'shm_group': no group named 'kaping-no-such-group'",
            ),
            (
                "state_dir = \"/tmp/k\"\nstate_group = \"kaping-no-such-group\"",
                "setting 'state_group': no group named 'kaping-no-such-group'",
            ),
            (
                "state_group = \"root\"",
                "setting 'state_group': set, but state_dir is not",
            ),
        ] {
            let e = err(toml);
            assert!(e.contains(says), "{toml:?} gave {e:?}");
        }
        // A new group needs a restart: the files already exist.
        let old = settings("").unwrap();
        let new = settings("shm_group = \"root\"").unwrap();
        assert_eq!(old.diff(&new), (vec![], vec!["shm_group"]));
    }

    #[test]
    fn ipv6_only_bind() {
        let s = settings("bind = \"[::1]:5090\"").unwrap();
        assert_eq!(
            (s.bind, s.bind6),
            (None, Some("[::1]:5090".parse().unwrap()))
        );
        assert_eq!(s.advertise, "::1");
        assert_eq!(s.template.from_uri, "sip:kaping@[::1]");
    }
}
