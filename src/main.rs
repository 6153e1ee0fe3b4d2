//! `kaping`: the daemon (`run`), the demo (`demo`) and `ctl`, the control
//! client. Every failure to start is one line on stderr and a non-zero exit.

/// The control plane allocates per request (JSON values, contact records)
/// on several threads and frees across them; glibc's malloc spent a fifth
/// of the daemon's main thread on that (fastbin consolidation, see
/// tuning.md). The packet path allocates nothing, so is unaffected.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Gives freed memory back to the system. Loading hands a million contact
/// records from the main thread to the workers, which free them; mimalloc
/// keeps such cross-thread frees on the owning (main) thread's lists until
/// that thread allocates again, which it seldom does once loaded: ~70 B per
/// contact stayed resident (measured at 1M, tuning.md). Called from the
/// main loop's once-a-second tick; with nothing to release it is a walk
/// over the main thread's pages.
fn release_freed_memory() {
    // SAFETY: mi_collect takes no pointers and may be called at any time
    // from any thread; it only touches the calling thread's heap and the
    // abandoned segments, under mimalloc's own synchronisation.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use kaping::config::{DurationValue, RawConfig, Settings};
use kaping::daemon::{Daemon, ReloadSource};
use kaping::io::signal;

#[derive(Parser)]
#[command(
    name = "kaping",
    version,
    about = "SIP keepalive pinger for millions of contacts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pinger daemon.
    Run(Box<RunArgs>),
    /// Self-contained demo: a simulated SIP platform on loopback, N contacts
    /// (a few dead), live figures, a summary.
    Demo(kaping::demo::DemoArgs),
    /// Talk to a running daemon over its control socket (JSON-RPC).
    Ctl(kaping::control::client::CtlArgs),
    /// Write the manual pages and shell completions under DIR (packaging).
    #[command(hide = true)]
    GenDocs { dir: PathBuf },
}

/// Flags of `kaping run`; each overrides the same-named setting of the
/// config file (see kaping.example.toml for what each means).
#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Contacts file (SIP URI per line, JSON lines, or Kamailio ul.dump JSON).
    #[arg(long)]
    contacts: Option<PathBuf>,
    #[arg(long, value_name = "auto|lines|jsonl|uldump")]
    contacts_format: Option<String>,
    /// Shared-memory file read by kaping-stat.
    #[arg(long)]
    shm: Option<PathBuf>,
    /// Group that may read the shared-memory file (kaping-stat users).
    #[arg(long, value_name = "NAME|GID")]
    shm_group: Option<String>,
    /// Local IPv4 (or IPv6) address; first port of the range in port-per-worker mode.
    #[arg(long, value_name = "IP:PORT")]
    bind: Option<String>,
    #[arg(long, value_name = "[IPv6]:PORT")]
    bind6: Option<String>,
    #[arg(long, value_name = "port-per-worker|shared-port")]
    steering: Option<String>,
    #[arg(long)]
    advertise: Option<String>,
    #[arg(long)]
    workers: Option<u32>,
    #[arg(long)]
    max_contacts: Option<u32>,
    #[arg(long, value_name = "auto|uring|mmsg")]
    backend: Option<String>,
    #[arg(long)]
    instance: Option<String>,
    /// "-" for stdout, "none", or a file.
    #[arg(long)]
    events: Option<String>,
    #[arg(long)]
    interval: Option<DurationValue>,
    #[arg(long)]
    jitter: Option<DurationValue>,
    #[arg(long)]
    reply_timeout: Option<DurationValue>,
    #[arg(long)]
    retries: Option<u8>,
    #[arg(long)]
    down_after: Option<u16>,
    #[arg(long)]
    remove_after: Option<u16>,
    #[arg(long)]
    alive_codes: Option<String>,
    #[arg(long)]
    rate_limit: Option<u64>,
    #[arg(long)]
    method: Option<String>,
    #[arg(long)]
    from: Option<String>,
    #[arg(long)]
    domain: Option<String>,
    #[arg(long = "extra-header")]
    extra_headers: Vec<String>,
    #[arg(long)]
    recv_buffer: Option<u64>,
    #[arg(long)]
    send_buffer: Option<u64>,
    #[arg(long)]
    pin_workers: Option<bool>,
    /// Where pings leave from: kaping's own socket (bind), each contact's
    /// registration socket (socket), or the proxy's address (IP:PORT).
    #[arg(long, value_name = "bind|socket|IP:PORT")]
    source: Option<String>,
    /// Source of contacts without a registration socket when --source socket.
    #[arg(long, value_name = "IP:PORT")]
    source_default: Option<String>,
    /// How replies to pings sent as the proxy reach kaping.
    #[arg(long, value_name = "relay|divert")]
    replies: Option<String>,
    /// Interfaces the divert program attaches to (default: all).
    #[arg(long = "divert-interface", value_name = "NAME")]
    divert_interfaces: Vec<String>,
    /// What is sent: the SIP request, or a NAT-only keepalive (null, crlf).
    #[arg(long, value_name = "sip|null|crlf")]
    keepalive: Option<String>,
    /// Keep only the contacts of shard K of N (several hosts split one
    /// registrar's contacts by a stable hash of each contact's key).
    #[arg(long, value_name = "K/N")]
    shard: Option<String>,
    /// kaping's own DMQ node address (sip:IP:PORT): follow Kamailio's
    /// location table live as a passive DMQ node.
    #[arg(long, value_name = "sip:IP:PORT")]
    dmq: Option<String>,
    /// Destinations that may be pinged (CIDR, comma-separated); loopback
    /// must be named here to be pinged.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    allow_destinations: Vec<String>,
    /// Destinations never pinged (CIDR, comma-separated).
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    deny_destinations: Vec<String>,
    /// A Kamailio DMQ node to join (its server_address); repeatable.
    #[arg(long = "dmq-peer", value_name = "sip:IP:PORT")]
    dmq_peers: Vec<String>,
    #[arg(long)]
    dmq_grace: Option<DurationValue>,
    /// Kamailio's jsonrpcs datagram socket (unix:PATH): feed contacts that
    /// reach remove_after are removed from the registrar there.
    #[arg(long, value_name = "unix:PATH")]
    registrar_rpc: Option<String>,
    #[arg(long)]
    registrar_table: Option<String>,
    #[arg(long)]
    remove_max_fraction: Option<f64>,
    #[arg(long)]
    remove_rate: Option<u32>,
    /// UNIX socket path of the JSON-RPC control interface (`kaping ctl`).
    #[arg(long)]
    control: Option<PathBuf>,
    #[arg(long)]
    control_max_connections: Option<u32>,
    #[arg(long)]
    control_max_request: Option<u64>,
    /// Directory of the journal and snapshots of contacts added at runtime.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Group that may read the state directory and its files.
    #[arg(long, value_name = "NAME|GID")]
    state_group: Option<String>,
    #[arg(long)]
    snapshot_interval: Option<DurationValue>,
    /// Stop by itself after this long (for tests and benchmarks).
    #[arg(long)]
    run_for: Option<DurationValue>,
}

impl RunArgs {
    fn overrides(&self) -> RawConfig {
        RawConfig {
            instance: self.instance.clone(),
            workers: self.workers,
            max_contacts: self.max_contacts,
            backend: self.backend.clone(),
            bind: self.bind.clone(),
            bind6: self.bind6.clone(),
            steering: self.steering.clone(),
            advertise: self.advertise.clone(),
            shm: self.shm.clone(),
            shm_group: self.shm_group.clone(),
            events: self.events.clone(),
            contacts: self.contacts.clone(),
            contacts_format: self.contacts_format.clone(),
            recv_buffer: self.recv_buffer,
            send_buffer: self.send_buffer,
            pin_workers: self.pin_workers,
            source: self.source.clone(),
            source_default: self.source_default.clone(),
            replies: self.replies.clone(),
            divert_interfaces: (!self.divert_interfaces.is_empty())
                .then(|| self.divert_interfaces.clone()),
            keepalive: self.keepalive.clone(),
            shard: self.shard.clone(),
            dmq: self.dmq.clone(),
            dmq_peer: (!self.dmq_peers.is_empty()).then(|| self.dmq_peers.clone()),
            allow_destinations: (!self.allow_destinations.is_empty())
                .then(|| self.allow_destinations.clone()),
            deny_destinations: (!self.deny_destinations.is_empty())
                .then(|| self.deny_destinations.clone()),
            dmq_grace: self.dmq_grace.clone(),
            registrar_rpc: self.registrar_rpc.clone(),
            registrar_table: self.registrar_table.clone(),
            remove_max_fraction: self.remove_max_fraction,
            remove_rate: self.remove_rate,
            method: self.method.clone(),
            from: self.from.clone(),
            domain: self.domain.clone(),
            extra_headers: (!self.extra_headers.is_empty()).then(|| self.extra_headers.clone()),
            interval: self.interval.clone(),
            jitter: self.jitter.clone(),
            reply_timeout: self.reply_timeout.clone(),
            retries: self.retries,
            down_after: self.down_after,
            remove_after: self.remove_after,
            alive_codes: self.alive_codes.clone(),
            rate_limit: self.rate_limit,
            control: self.control.clone(),
            control_max_connections: self.control_max_connections,
            control_max_request: self.control_max_request,
            state_dir: self.state_dir.clone(),
            state_group: self.state_group.clone(),
            snapshot_interval: self.snapshot_interval.clone(),
        }
    }
}

fn run(args: RunArgs) -> Result<(), String> {
    let mut raw = match &args.config {
        Some(path) => RawConfig::from_file(path).map_err(|e| e.to_string())?,
        None => RawConfig::default(),
    };
    raw.overlay(&args.overrides());
    let settings = Settings::from_raw(&raw).map_err(|e| e.to_string())?;
    let run_for = match &args.run_for {
        Some(v) => Some(
            kaping::duration::parse_duration(match v {
                DurationValue::Text(t) => t,
                DurationValue::Seconds(_) => unreachable!("flags parse as text"),
            })
            .map_err(|e| format!("--run-for: {e}"))?,
        ),
        None => None,
    };
    // Refuse an unreadable contacts file before creating anything (shm file,
    // sockets, workers): one line, nothing left behind.
    if let Some(path) = &settings.contacts {
        std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    signal::install_handlers().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let mut daemon = Daemon::start(settings).map_err(|e| e.to_string())?;
    daemon.set_reload_source(ReloadSource {
        config: args.config.clone(),
        overrides: args.overrides(),
    });
    let ready = daemon
        .restore_state()
        .and_then(|()| daemon.load_contacts().map(drop))
        .and_then(|()| daemon.start_control())
        .and_then(|()| daemon.start_registrar_feed());
    if let Err(e) = ready {
        // Stop the workers and mark the shm file stopped before failing.
        let _ = daemon.stop();
        return Err(e.to_string());
    }
    daemon
        .wait(run_for, release_freed_memory)
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Demo(args) => kaping::demo::run(args),
        Command::Ctl(args) => kaping::control::client::run(args),
        Command::GenDocs { dir } => {
            use clap::CommandFactory;
            kaping::docgen::generate(Cli::command(), &dir)
                .map_err(|e| format!("gen-docs {}: {e}", dir.display()))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kaping: {e}");
            ExitCode::FAILURE
        }
    }
}
