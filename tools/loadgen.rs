//! `kaping-loadgen`: the bundled responder and load generator (DESIGN §8).
//!
//! * `contacts` writes N simulated contacts spread over 127.0.0.0/8 (or
//!   `[::1]`) and ports, and optionally the fate `serve` will give each one.
//! * `serve` answers every SIP request from the exact address that was pinged,
//!   with configurable latency, loss, dead and flapping contacts, error codes,
//!   malformed and duplicate replies, and reports its counters.
//! * `ceiling` measures the raw UDP round-trip ceiling of the machine against
//!   a `serve --raw-echo` child.
//! * `bench` runs a `serve` child and a kaping daemon child on loopback and
//!   reports kaping's rates, RTT, CPU and memory next to that ceiling,
//!   measured in the same run.
//! * `control-bench` runs the same pair with the daemon's control socket and
//!   durable state on, and measures adds and deletes per second through the
//!   socket in JSON-RPC batches, and their effect on the ping rate.
//! * `phones` plays N SIP phones as real ones behave behind a NAT: one
//!   socket each, registering through a registrar and answering every
//!   request from their own address (the NAT lab, `tests/nat_proxy.rs`).
//! * `reach` asks a proxy to relay one OPTIONS to each of those AoRs and
//!   counts how many phones answered.
//! * `register` fills or empties a registrar's location table: one
//!   REGISTER per user of a range, paced, without running phones (the
//!   registrar-feed tests and the full-sync measurement against Kamailio).
//! * `flood` runs kaping against the responder while datagrams it never
//!   asked for (random bytes, truncated and forged replies, genuine replies
//!   replayed, forged ICMP errors) arrive at its ports flat out, and
//!   reports where each went, what it cost and that no contact changed.
//! * `wake-cost` measures what one sleep and wake-up costs a thread on this
//!   host, which sets kaping's cost per ping at low rates.
//!
//! The simulated platform itself lives in the library (`kaping::sim`), so
//! `kaping demo` runs the very same responder in-process; this binary is its
//! command line: flags, the stop conditions of `serve` and the reports.
//!
//! This binary contains no `unsafe`: every system call goes through
//! `kaping::io`, socket2 or std. `serve` and `phones` stop on `--seconds`,
//! on stdin EOF (`--stop-on-stdin-eof`) or on SIGINT/SIGTERM/SIGHUP, and
//! then print their counters.
#![forbid(unsafe_code)]

#[path = "loadgen/bench.rs"]
mod bench;
#[path = "loadgen/ceiling.rs"]
mod ceiling;
#[path = "loadgen/control_bench.rs"]
mod control_bench;
#[path = "loadgen/dmq_bench.rs"]
mod dmq_bench;
#[path = "loadgen/flood.rs"]
mod flood;
#[path = "loadgen/phones.rs"]
mod phones;
#[path = "loadgen/proxy_bench.rs"]
mod proxy_bench;
#[path = "loadgen/reach.rs"]
mod reach;
#[path = "loadgen/register.rs"]
mod register;
#[path = "loadgen/sipmsg.rs"]
mod sipmsg;
#[path = "loadgen/wake.rs"]
mod wake;

/// As in `kaping`: the control bench's client builds and parses a JSON
/// batch per round trip; the responder and the ceiling allocate nothing
/// per packet, so are unaffected.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use kaping::io::signal;
use kaping::sim::{
    parse_duration_ns, FatePlan, LatencyDist, Layout, ListenSpec, Noise, Responder, ServeConfig,
};

/// How often `serve` looks at its stop conditions (the threads never do:
/// they are stopped through `Responder::stop`).
const STOP_CHECK_MS: u64 = 20;

#[derive(Parser, Debug)]
#[command(
    name = "kaping-loadgen",
    version,
    about = "kaping's bundled SIP responder and load generator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write a contacts file: one SIP URI per line, sip:u<i>@127.a.b.c:P.
    Contacts(ContactsArgs),
    /// Answer SIP requests on loopback (or anywhere) from the pinged address.
    Serve(ServeArgs),
    /// Measure the raw UDP echo ceiling against a `serve --raw-echo` child.
    Ceiling(CeilingArgs),
    /// End-to-end benchmark: a responder and a kaping daemon on loopback,
    /// against the raw UDP ceiling measured in the same run.
    Bench(BenchArgs),
    /// What pinging as the proxy costs kaping and the proxy: kaping beside
    /// a Kamailio in bind, relay and divert modes, one after the other.
    ProxyBench(ProxyBenchArgs),
    /// What following a registrar over DMQ costs kaping: a full sync and
    /// live changes, with this program as the Kamailio node.
    DmqBench(DmqBenchArgs),
    /// Control-socket benchmark: adds and deletes through JSON-RPC batches
    /// with durability on, and their effect on the ping rate.
    ControlBench(ControlBenchArgs),
    /// Floods and replays: kaping pinging N contacts while random bytes,
    /// truncated and forged replies, replayed genuine replies and forged
    /// ICMP errors arrive at its ports flat out, one kind at a time.
    ///
    /// Reports per kind where every datagram went (kaping's counters by
    /// cause, the kernel's drops), kaping's CPU per flood datagram, its
    /// memory and per-second ping rate, and that no contact changed state
    /// and no replay counted as an answer. Exits 2 when a check fails.
    Flood(FloodArgs),
    /// What one sleep and wake-up costs a thread on this host: the CPU a
    /// worker pays per round at low rates whatever it does in the round
    /// (a few µs on bare metal, far more in some virtual machines).
    WakeCost(WakeCostArgs),
    /// Simulated SIP phones: one socket each, registering and answering
    /// every request as real phones behind a NAT do.
    Phones(PhonesArgs),
    /// Send one OPTIONS per AoR through a proxy and count the phones that
    /// answered.
    Reach(ReachArgs),
    /// Register (or, with --expires 0, unregister) users <prefix><first> ..
    /// <prefix><first+count-1> at a registrar, paced, and count the 2xx.
    ///
    /// User i's contact is --contact advanced by i ports (wrapping to the
    /// next IP address past 65535): from index 0 exactly the contacts
    /// `phones --bind IP --port P` registers, so this can unregister phones.
    /// Prints its report, then exits 2 when any REGISTER did not end in a
    /// 2xx.
    Register(RegisterArgs),
    /// Write the manual pages and shell completions under DIR (packaging).
    #[command(hide = true)]
    GenDocs { dir: PathBuf },
}

/// The stable, per-contact fates: shared by `contacts --fates` and `serve`,
/// which must be given the same values to agree.
#[derive(Args, Debug, Clone)]
struct FateArgs {
    /// Seed of the per-contact hash (and of the per-packet generator).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fraction of contacts that never answer.
    #[arg(long, default_value_t = 0.0)]
    dead: f64,
    /// Fraction of contacts answered with --error-code.
    #[arg(long, default_value_t = 0.0)]
    error: f64,
    /// Status code of the error contacts.
    #[arg(long, default_value_t = 503)]
    error_code: u16,
    /// Fraction of contacts alternating answering and silent periods.
    #[arg(long, default_value_t = 0.0)]
    flap: f64,
    /// Length of each answering or silent period of a flapping contact.
    #[arg(long = "flap-period", value_name = "DURATION", default_value = "10s", value_parser = parse_duration_ns)]
    flap_period_ns: u64,
}

impl FateArgs {
    fn plan(&self) -> Result<FatePlan, String> {
        FatePlan::new(
            self.seed,
            self.dead,
            self.error,
            self.error_code,
            self.flap,
            self.flap_period_ns / 1_000_000,
        )
    }
}

#[derive(Args, Debug)]
struct ContactsArgs {
    /// Number of contacts.
    #[arg(long)]
    count: u64,
    /// First port the contacts listen on.
    #[arg(long, default_value_t = 5060)]
    port: u16,
    /// Spread contacts over ports P..P+K-1 (the port varies fastest).
    #[arg(long, default_value_t = 1)]
    ports: u16,
    /// All contacts on [::1] instead of 127.0.0.0/8.
    #[arg(long)]
    ipv6: bool,
    /// Output file (default: stdout).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write `uri<TAB>fate` lines (ok, dead, error:<code>, flap:<phase_ms>).
    #[arg(long)]
    fates: Option<PathBuf>,
    #[command(flatten)]
    fate: FateArgs,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// ADDR:PORT[-LASTPORT] to answer on; repeatable. 0.0.0.0:P answers for every 127.a.b.c:P.
    #[arg(long, required = true, value_parser = ListenSpec::parse)]
    listen: Vec<ListenSpec>,
    /// Responder threads (each with its own SO_REUSEPORT socket per port).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Echo every datagram back unparsed (the raw UDP ceiling).
    #[arg(long)]
    raw_echo: bool,
    /// Fixed delay added to every reply.
    #[arg(long = "latency", value_name = "DURATION", default_value = "0", value_parser = parse_duration_ns)]
    latency_ns: u64,
    /// Random delay added on top: uniform:LO..HI or exp:MEAN.
    #[arg(long, value_parser = LatencyDist::parse)]
    latency_dist: Option<LatencyDist>,
    /// Fraction of requests dropped at random.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Fraction of replies replaced by a malformed variant.
    #[arg(long, default_value_t = 0.0)]
    malformed: f64,
    /// Fraction of replies sent twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Stop after this many seconds.
    #[arg(long)]
    seconds: Option<f64>,
    /// Stop when stdin reaches end of file.
    #[arg(long)]
    stop_on_stdin_eof: bool,
    /// Print the counters as one JSON object.
    #[arg(long)]
    json: bool,
    /// Requested SO_RCVBUF per socket, bytes.
    #[arg(long, default_value_t = 4 << 20)]
    rcvbuf: usize,
    /// Requested SO_SNDBUF per socket, bytes.
    #[arg(long, default_value_t = 4 << 20)]
    sndbuf: usize,
    /// Delayed replies each thread can hold (2 KiB each).
    #[arg(long, default_value_t = 16384)]
    delay_slots: usize,
    #[command(flatten)]
    fate: FateArgs,
}

#[derive(Args, Debug)]
struct CeilingArgs {
    /// Distinct destination addresses across 127.0.0.0/8.
    #[arg(long, default_value_t = 10_000)]
    contacts: u64,
    /// Measured seconds (one rate per second; the median is reported).
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Datagram size in bytes.
    #[arg(long, default_value_t = 420)]
    size: usize,
    /// Datagrams in flight at most.
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// Send kaping-shaped OPTIONS to a SIP `serve` child instead of raw
    /// datagrams to an echo: the responder's own rate (--size is then the
    /// request size).
    #[arg(long)]
    sip: bool,
    /// Send at this many round trips per second instead of flat out, in
    /// rounds of `--round`: the raw sender at an operating point (what
    /// `bench` measures at kaping's rounds as `paced_sender_*`).
    #[arg(long, requires = "round")]
    rate: Option<f64>,
    /// With `--rate`: how long the sender sleeps between rounds (it then
    /// receives the echoes waiting and sends what fell due), e.g. 40ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ns, requires = "rate")]
    round: Option<u64>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Simulated contacts the daemon pings (all answer).
    #[arg(long)]
    contacts: u64,
    /// Measured seconds (one sample of the daemon's counters per second).
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Daemon workers (default: half the online CPUs; the responder, like
    /// the echo side of the raw ceiling, gets the other half).
    #[arg(long)]
    workers: Option<u32>,
    /// Daemon backend: auto | uring | mmsg.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Delay the responder adds to every reply.
    #[arg(long = "latency", value_name = "DURATION", default_value = "1ms", value_parser = parse_duration_ns)]
    latency_ns: u64,
    /// Ping interval per contact (default: offer 0.9 × the measured ceiling).
    #[arg(long = "interval", value_name = "DURATION", value_parser = parse_duration_ns)]
    interval_ns: Option<u64>,
    /// The kaping binary (default: `kaping` next to this program).
    #[arg(long)]
    kaping: Option<PathBuf>,
    /// Seconds between the end of loading and the first sample.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Seconds of the raw-ceiling measurement before the daemon starts.
    #[arg(long, default_value_t = 5)]
    ceiling_seconds: u32,
    /// Responder threads.
    #[arg(long, default_value_t = 1)]
    responder_threads: usize,
    /// Daemon slab capacity (default: exactly --contacts).
    #[arg(long)]
    max_contacts: Option<u32>,
    /// Where the contacts file and the daemon's shm file go (default:
    /// /dev/shm, else the system temp dir), e.g. a tmpfs mounted with other
    /// options than /dev/shm's.
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct DmqBenchArgs {
    /// Contacts of the full sync.
    #[arg(long, default_value_t = 100_000)]
    contacts: u64,
    /// Records per sync message (dmq_usrloc's batch_msg_contacts).
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// Sync messages sent before their 200s.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Live changes per second after the sync.
    #[arg(long, default_value_t = 3000)]
    rate: u64,
    /// Seconds of live changes.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Daemon workers.
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// The kaping binary (default: `kaping` next to this program).
    #[arg(long)]
    kaping: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ProxyBenchArgs {
    /// Simulated contacts (all answer).
    #[arg(long, default_value_t = 100_000)]
    contacts: u64,
    /// Ping interval per contact.
    #[arg(long = "interval", value_name = "DURATION", default_value = "10s", value_parser = parse_duration_ns)]
    interval_ns: u64,
    /// Measured seconds per mode (and of Kamailio idle, first).
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    /// Seconds between a daemon's load and its measurement.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Modes, in order: bind, relay, divert.
    #[arg(long, value_delimiter = ',', default_value = "bind,relay,divert")]
    modes: Vec<String>,
    /// Times every mode runs, in turn (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Daemon workers.
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// Daemon backend: auto | uring | mmsg.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// The kaping binary (default: `kaping` next to this program).
    #[arg(long)]
    kaping: Option<PathBuf>,
    /// The kamailio binary (default: /usr/sbin/kamailio).
    #[arg(long)]
    kamailio: Option<PathBuf>,
    /// Kamailio's UDP receiver processes.
    #[arg(long, default_value_t = 1)]
    kamailio_children: u32,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ControlBenchArgs {
    /// Contacts the daemon loads from a file and pings throughout.
    #[arg(long, default_value_t = 200_000)]
    contacts: u64,
    /// Contacts added (then deleted) through the control socket.
    #[arg(long, default_value_t = 200_000)]
    adds: u64,
    /// Requests per JSON-RPC batch.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Daemon workers (default: half the online CPUs).
    #[arg(long)]
    workers: Option<u32>,
    /// Daemon backend: auto | uring | mmsg.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Ping interval of the file contacts.
    #[arg(long = "interval", value_name = "DURATION", default_value = "5s", value_parser = parse_duration_ns)]
    interval_ns: u64,
    /// Ping interval of the added contacts (long: they barely add pings, so
    /// the ping rate shows the control traffic's effect alone).
    #[arg(long = "add-interval", value_name = "DURATION", default_value = "1h", value_parser = parse_duration_ns)]
    add_interval_ns: u64,
    /// Delay the responder adds to every reply.
    #[arg(long = "latency", value_name = "DURATION", default_value = "1ms", value_parser = parse_duration_ns)]
    latency_ns: u64,
    /// The kaping binary (default: `kaping` next to this program).
    #[arg(long)]
    kaping: Option<PathBuf>,
    /// Seconds between the first ping and the baseline.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Seconds of ping-rate measurement without control traffic.
    #[arg(long, default_value_t = 3.0)]
    baseline: f64,
    /// Where to create the daemon's state directory (default: the system
    /// temp dir; fsync cost depends on this file system).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Responder threads.
    #[arg(long, default_value_t = 1)]
    responder_threads: usize,
    /// Connections sending batches at once, each one batch at a time (as
    /// several registrar processes would).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Daemon slab capacity (default: (contacts + adds) × 1.25).
    #[arg(long)]
    max_contacts: Option<u32>,
}

#[derive(Args, Debug)]
struct WakeCostArgs {
    /// Sleep lengths to measure, each one after the other.
    #[arg(long, value_name = "DURATIONS", value_delimiter = ',', default_value = "1ms,2ms,10ms,40ms,100ms", value_parser = parse_duration_ns)]
    sleeps: Vec<u64>,
    /// Seconds spent sleeping per length and way (the count follows).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct FloodArgs {
    /// Simulated contacts the daemon pings (all answer).
    #[arg(long, default_value_t = 1_000_000)]
    contacts: u64,
    /// Ping interval per contact.
    #[arg(long = "interval", value_name = "DURATION", default_value = "30s", value_parser = parse_duration_ns)]
    interval_ns: u64,
    /// Seconds of each flood kind, and of the quiet window before it.
    #[arg(long, default_value_t = 60)]
    seconds: u32,
    /// Flood kinds, in order: random, truncated, forged, replay, icmp.
    #[arg(long, value_delimiter = ',', default_value = "random,truncated,forged,replay,icmp", value_parser = flood::Kind::parse)]
    kinds: Vec<flood::Kind>,
    /// Contacts more, answered by a capturing responder whose genuine
    /// replies the replay flood sends again.
    #[arg(long, default_value_t = 1000)]
    captured: u64,
    /// Of the captured contacts, how many fall silent after answering and
    /// are Down before the floods (their replies are replayed too).
    #[arg(long, default_value_t = 100)]
    down: u64,
    /// Daemon workers.
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// Daemon backend: auto | uring | mmsg.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Delay the responder adds to every reply.
    #[arg(long = "latency", value_name = "DURATION", default_value = "1ms", value_parser = parse_duration_ns)]
    latency_ns: u64,
    /// The kaping binary (default: `kaping` next to this program).
    #[arg(long)]
    kaping: Option<PathBuf>,
    /// Where the contacts, shm and events files go (default: /dev/shm,
    /// else the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seed of the flood datagrams.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct PhonesArgs {
    /// Number of phones.
    #[arg(long)]
    count: u32,
    /// The phones' address (IPv4 or IPv6; it goes into Via and Contact).
    #[arg(long)]
    bind: std::net::IpAddr,
    /// Port of phone 0; phone i listens on port + i.
    #[arg(long, default_value_t = 5062)]
    port: u16,
    /// Phone i's user part is <prefix><i>.
    #[arg(long, default_value = "p")]
    user_prefix: String,
    /// AoR domain (default: the registrar's host).
    #[arg(long)]
    domain: Option<String>,
    /// Register every phone at this registrar: sip:IP[:PORT].
    #[arg(long, value_name = "SIP-URI", value_parser = sipmsg::parse_sip_addr)]
    register: Option<std::net::SocketAddr>,
    /// Expires asked for in REGISTER, seconds.
    #[arg(long, default_value_t = 60)]
    expires: u32,
    /// First registrations are spread over this long.
    #[arg(long = "ramp", value_name = "DURATION", default_value = "1s", value_parser = parse_duration_ns)]
    ramp_ns: u64,
    /// Send every response to the packet's source IP:port, whatever the
    /// top Via says (what many real phones do).
    #[arg(long)]
    reply_to_source: bool,
    /// Seed of branches and refresh times (default: random).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop after this many seconds.
    #[arg(long)]
    seconds: Option<f64>,
    /// Stop when stdin reaches end of file.
    #[arg(long)]
    stop_on_stdin_eof: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Add one entry per phone to the summary (registered, requests, age of
    /// the last request).
    #[arg(long)]
    per_phone: bool,
}

#[derive(Args, Debug)]
struct ReachArgs {
    /// The proxy that relays to the registered phones: sip:IP[:PORT].
    #[arg(long, value_name = "SIP-URI", value_parser = sipmsg::parse_sip_addr)]
    proxy: std::net::SocketAddr,
    /// AoRs <prefix>0 .. <prefix><count-1>.
    #[arg(long)]
    count: u32,
    #[arg(long, default_value = "p")]
    user_prefix: String,
    /// AoR domain (default: the proxy's host).
    #[arg(long)]
    domain: Option<String>,
    /// Local address (default: the kernel's choice towards the proxy).
    #[arg(long)]
    bind: Option<std::net::IpAddr>,
    /// Give up on a request this long after its first send.
    #[arg(long = "timeout", value_name = "DURATION", default_value = "4s", value_parser = parse_duration_ns)]
    timeout_ns: u64,
    /// Requests started per second.
    #[arg(long, default_value_t = 2000)]
    rate: u32,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RegisterArgs {
    /// The registrar: sip:IP[:PORT].
    #[arg(long, value_name = "SIP-URI", value_parser = sipmsg::parse_sip_addr)]
    registrar: std::net::SocketAddr,
    /// Number of users (REGISTERs).
    #[arg(long)]
    count: u32,
    /// Index of the first user.
    #[arg(long, default_value_t = 0)]
    first: u32,
    /// User i's user part is <prefix><i> (phones' default: p).
    #[arg(long, default_value = "p")]
    user_prefix: String,
    /// AoR domain (default: the registrar's host).
    #[arg(long)]
    domain: Option<String>,
    /// Contact address of index 0 (IP:PORT); index i is PORT + i, wrapping
    /// to the next IP address past 65535.
    #[arg(long, default_value = "127.0.0.1:5062")]
    contact: std::net::SocketAddr,
    /// Local address (default: the kernel's choice towards the registrar).
    #[arg(long)]
    bind: Option<std::net::IpAddr>,
    /// Expires asked for, seconds; 0 removes the bindings.
    #[arg(long, default_value_t = 3600)]
    expires: u32,
    /// REGISTERs started per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u32,
    /// Most REGISTERs unanswered at once.
    #[arg(long, default_value_t = 256)]
    window: u32,
    /// Give up on a REGISTER this long after its first send.
    #[arg(long = "timeout", value_name = "DURATION", default_value = "8s", value_parser = parse_duration_ns)]
    timeout_ns: u64,
    /// A progress line on stderr every second.
    #[arg(long)]
    progress: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// The shm file of a kaping following this registrar (`--dmq`): report
    /// the lag from each REGISTER's send to kaping's workers holding one
    /// more (or, with --expires 0, one fewer) contact.
    #[arg(long, value_name = "PATH")]
    watch_shm: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Contacts(a) => run_contacts(a),
        Cmd::Serve(a) => run_serve(a),
        Cmd::Ceiling(a) => run_ceiling(a),
        Cmd::Bench(a) => run_bench(a),
        Cmd::ProxyBench(a) => run_proxy_bench(a),
        Cmd::DmqBench(a) => dmq_bench::run(&dmq_bench::DmqBenchConfig {
            contacts: a.contacts,
            batch: a.batch,
            window: a.window,
            rate: a.rate,
            seconds: a.seconds,
            workers: a.workers,
            kaping: a.kaping,
        })
        .and_then(|report| print_report(&report, a.json, dmq_bench::print_text)),
        Cmd::ControlBench(a) => run_control_bench(a),
        Cmd::Flood(a) => run_flood(a),
        Cmd::WakeCost(a) => wake::run(&wake::WakeConfig {
            sleeps: a.sleeps.into_iter().map(Duration::from_nanos).collect(),
            seconds: a.seconds,
        })
        .and_then(|report| print_report(&report, a.json, wake::print_text)),
        Cmd::Phones(a) => run_phones(a),
        Cmd::Reach(a) => run_reach(a),
        Cmd::Register(a) => run_register(a),
        Cmd::GenDocs { dir } => {
            use clap::CommandFactory;
            kaping::docgen::generate(Cli::command(), &dir)
                .map_err(|e| format!("gen-docs {}: {e}", dir.display()))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kaping-loadgen: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn create(path: &PathBuf) -> Result<BufWriter<File>, String> {
    File::create(path)
        .map(BufWriter::new)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))
}

fn run_contacts(a: ContactsArgs) -> Result<(), String> {
    let layout = Layout::new(a.port, a.ports, a.ipv6)?;
    let plan = a.fate.plan()?;
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(create(p)?),
        None => Box::new(io::stdout().lock()),
    };
    let mut fates_file = match &a.fates {
        Some(p) => Some(create(p)?),
        None => None,
    };
    let fates = fates_file.as_mut().map(|w| (&plan, w as &mut dyn Write));
    kaping::sim::write_contacts(&layout, a.count, &mut out, fates)
        .map_err(|e| format!("cannot write contacts: {e}"))
}

fn run_serve(a: ServeArgs) -> Result<(), String> {
    let cfg = ServeConfig {
        listen: a.listen,
        threads: a.threads,
        raw_echo: a.raw_echo,
        plan: a.fate.plan()?,
        noise: Noise {
            loss: a.loss,
            malformed: a.malformed,
            duplicate: a.duplicate,
            latency_ns: a.latency_ns,
            dist: a.latency_dist.unwrap_or(LatencyDist::None),
        },
        seed: a.fate.seed,
        recv_buffer_bytes: a.rcvbuf,
        send_buffer_bytes: a.sndbuf,
        delay_slots: a.delay_slots,
    };
    // Before the threads start, so none of them is the one interrupted.
    signal::install_handlers().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let responder = Responder::spawn(cfg)?;
    if let Some(report) = responder.clamped_buffers() {
        eprintln!(
            "kaping-loadgen: socket buffers clamped by the kernel (rcvbuf {} sndbuf {} bytes); raise net.core.rmem_max/wmem_max",
            report.recv_buffer_bytes, report.send_buffer_bytes
        );
    }
    for addr in responder.local_addrs() {
        eprintln!("listening {addr}");
    }
    eprintln!("ready");

    wait_for_stop(a.seconds, a.stop_on_stdin_eof, || {})?;
    let counters = responder.stop();

    let mut out = io::stdout().lock();
    if a.json {
        let text = serde_json::to_string(&counters).map_err(|e| e.to_string())?;
        writeln!(out, "{text}").map_err(|e| e.to_string())?;
    } else {
        for (name, value) in counters.fields() {
            writeln!(out, "{name} {value}").map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Returns when `seconds` have passed, stdin closed (with
/// `stop_on_stdin_eof`), or SIGINT/SIGTERM/SIGHUP arrived (the handlers
/// must be installed); calls `tick` every `STOP_CHECK_MS`.
fn wait_for_stop(
    seconds: Option<f64>,
    stop_on_stdin_eof: bool,
    mut tick: impl FnMut(),
) -> Result<(), String> {
    let stdin_closed = Arc::new(AtomicBool::new(false));
    if stop_on_stdin_eof {
        let closed = stdin_closed.clone();
        // Detached: it may still be blocked in read when the process exits.
        thread::Builder::new()
            .name("stdin-eof".to_string())
            .spawn(move || {
                let mut sink = [0u8; 256];
                let mut stdin = io::stdin().lock();
                loop {
                    match stdin.read(&mut sink) {
                        Ok(n) if n > 0 => {}
                        // SIGHUP (or SIGINT, seen by the loop below) cut the read short.
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        _ => break,
                    }
                }
                closed.store(true, Ordering::Relaxed);
            })
            .map_err(|e| format!("cannot start the stdin thread: {e}"))?;
    }
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    // SIGHUP ends it too, as it did by default before handlers existed.
    while !signal::stop_requested()
        && !signal::take_reload()
        && !stdin_closed.load(Ordering::Relaxed)
    {
        tick();
        let mut nap = Duration::from_millis(STOP_CHECK_MS);
        if let Some(d) = deadline {
            let now = Instant::now();
            if now >= d {
                break;
            }
            nap = nap.min(d - now);
        }
        thread::sleep(nap);
    }
    Ok(())
}

fn run_ceiling(a: CeilingArgs) -> Result<(), String> {
    let report = ceiling::run(&ceiling::CeilingConfig {
        contacts: a.contacts,
        seconds: a.seconds,
        size: a.size,
        window: a.window,
        sip: a.sip,
        pace: match (a.rate, a.round) {
            (Some(rate), Some(round)) if rate > 0.0 && round > 0 => Some(ceiling::Pace {
                rate,
                round: Duration::from_nanos(round),
            }),
            (Some(_), Some(_)) => return Err("--rate and --round must be above 0".to_string()),
            _ => None,
        },
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        println!(
            "{}: {} echoed round trips/s (median of {} one-second rates; min {}, max {})",
            if report.sip {
                "sip responder"
            } else {
                "raw udp ceiling"
            },
            report.round_trips_per_s,
            report.seconds,
            report.min_per_s,
            report.max_per_s
        );
        println!(
            "{} contacts, {}-byte datagrams, window {}: sent {}, echoed {}, lost {}",
            report.contacts, report.size, report.window, report.sent, report.echoed, report.lost
        );
        if let (Some(cpu), Some(rate)) =
            (report.responder_cpu_s, report.responder_answered_per_cpu_s)
        {
            println!("responder used {cpu:.2} CPU s: {rate} answered per responder CPU second");
        }
        match (report.sender_cpu_us_per_round_trip, report.pace) {
            (Some(us), None) => println!(
                "sender used {us:.2} CPU us per round trip (flat out, almost all in the kernel)"
            ),
            (Some(us), Some(p)) => println!(
                "sender used {us:.2} CPU us per round trip (paced at {:.0}/s in {} ms rounds)",
                p.rate,
                p.round.as_secs_f64() * 1e3
            ),
            (None, _) => {}
        }
    }
    Ok(())
}

/// A bench report on stdout: one JSON object, or the readable text.
fn print_report<R: serde::Serialize>(
    report: &R,
    json: bool,
    text: fn(&R, &mut dyn Write) -> io::Result<()>,
) -> Result<(), String> {
    let mut out = io::stdout().lock();
    if json {
        let line = serde_json::to_string(report).map_err(|e| e.to_string())?;
        writeln!(out, "{line}").map_err(|e| e.to_string())
    } else {
        text(report, &mut out).map_err(|e| e.to_string())
    }
}

fn run_bench(a: BenchArgs) -> Result<(), String> {
    if !(a.warmup.is_finite() && a.warmup >= 0.0) {
        return Err("--warmup must be a number of seconds, 0 or more".to_string());
    }
    let report = bench::run(&bench::BenchConfig {
        contacts: a.contacts,
        seconds: a.seconds,
        workers: a.workers,
        backend: a.backend,
        latency_ns: a.latency_ns,
        interval: a.interval_ns.map(Duration::from_nanos),
        kaping: a.kaping,
        warmup: Duration::from_secs_f64(a.warmup),
        ceiling_seconds: a.ceiling_seconds,
        responder_threads: a.responder_threads,
        max_contacts: a.max_contacts,
        dir: a.dir,
    })?;
    print_report(&report, a.json, bench::print_text)
}

fn run_proxy_bench(a: ProxyBenchArgs) -> Result<(), String> {
    if !(a.warmup.is_finite() && a.warmup >= 0.0) || a.interval_ns == 0 {
        return Err("--warmup must be 0 or more seconds and --interval above zero".to_string());
    }
    let report = proxy_bench::run(&proxy_bench::ProxyBenchConfig {
        contacts: a.contacts,
        interval: Duration::from_nanos(a.interval_ns),
        seconds: a.seconds,
        warmup: Duration::from_secs_f64(a.warmup),
        modes: a.modes,
        rounds: a.rounds,
        workers: a.workers,
        backend: a.backend,
        kaping: a.kaping,
        kamailio: a.kamailio,
        kamailio_children: a.kamailio_children,
    })?;
    print_report(&report, a.json, proxy_bench::print_text)
}

fn run_control_bench(a: ControlBenchArgs) -> Result<(), String> {
    let seconds = |name: &str, v: f64| {
        if v.is_finite() && v >= 0.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(format!("--{name} must be a number of seconds, 0 or more"))
        }
    };
    let baseline = seconds("baseline", a.baseline)?;
    if baseline.is_zero() || a.interval_ns == 0 || a.add_interval_ns == 0 {
        return Err("--baseline, --interval and --add-interval must be more than zero".to_string());
    }
    let report = control_bench::run(&control_bench::ControlBenchConfig {
        contacts: a.contacts,
        adds: a.adds,
        batch: a.batch as usize,
        connections: a.connections,
        workers: a.workers,
        backend: a.backend,
        interval: Duration::from_nanos(a.interval_ns),
        add_interval: Duration::from_nanos(a.add_interval_ns),
        latency_ns: a.latency_ns,
        kaping: a.kaping,
        warmup: seconds("warmup", a.warmup)?,
        baseline,
        state_parent: a.state_dir,
        responder_threads: a.responder_threads,
        max_contacts: a.max_contacts,
    })?;
    print_report(&report, a.json, control_bench::print_text)
}

fn run_flood(a: FloodArgs) -> Result<(), String> {
    let report = flood::run(&flood::FloodConfig {
        contacts: a.contacts,
        interval: Duration::from_nanos(a.interval_ns),
        seconds: a.seconds,
        kinds: a.kinds,
        captured: a.captured,
        down: a.down,
        workers: a.workers,
        backend: a.backend,
        latency_ns: a.latency_ns,
        kaping: a.kaping,
        dir: a.dir,
        seed: a.seed,
    })?;
    print_report(&report, a.json, flood::print_text)?;
    if !report.failures.is_empty() {
        return Err(format!(
            "{} checks failed: {}",
            report.failures.len(),
            report.failures.join("; ")
        ));
    }
    Ok(())
}

fn run_phones(a: PhonesArgs) -> Result<(), String> {
    let cfg = phones::PhonesConfig {
        count: a.count,
        bind: a.bind,
        port: a.port,
        user_prefix: a.user_prefix,
        domain: a.domain,
        register: a.register,
        expires: a.expires,
        ramp: Duration::from_nanos(a.ramp_ns),
        reply_to_source: a.reply_to_source,
        seed: a.seed,
    };
    // Before the threads start, so none of them is the one interrupted.
    signal::install_handlers().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let phones = phones::Phones::spawn(&cfg, a.per_phone)?;
    let (first, last) = phones.range();
    eprintln!("listening {first} .. {last}");
    eprintln!("ready");
    // One line when every phone has registered once (what a test waits for).
    let mut announced = cfg.register.is_none();
    wait_for_stop(a.seconds, a.stop_on_stdin_eof, || {
        if !announced && phones.ever_registered() >= cfg.count {
            announced = true;
            eprintln!("registered {}", cfg.count);
        }
    })?;
    let summary = phones.stop();
    let mut out = io::stdout().lock();
    if a.json {
        let text = serde_json::to_string(&summary).map_err(|e| e.to_string())?;
        writeln!(out, "{text}").map_err(|e| e.to_string())
    } else {
        summary.print_text(&mut out).map_err(|e| e.to_string())
    }
}

fn run_register(a: RegisterArgs) -> Result<(), String> {
    let report = register::run(&register::RegisterConfig {
        registrar: a.registrar,
        first: a.first,
        count: a.count,
        user_prefix: a.user_prefix,
        domain: a.domain,
        contact: a.contact,
        bind: a.bind,
        expires: a.expires,
        rate: a.rate,
        window: a.window,
        timeout: Duration::from_nanos(a.timeout_ns),
        progress: a.progress,
        watch_shm: a.watch_shm,
    })?;
    print_report(&report, a.json, register::print_text)?;
    if report.ok < report.total {
        return Err(format!(
            "{} of {} REGISTERs did not end in a 2xx",
            report.total - report.ok,
            report.total
        ));
    }
    Ok(())
}

fn run_reach(a: ReachArgs) -> Result<(), String> {
    let report = reach::run(&reach::ReachConfig {
        proxy: a.proxy,
        count: a.count,
        user_prefix: a.user_prefix,
        domain: a.domain,
        bind: a.bind,
        timeout: Duration::from_nanos(a.timeout_ns),
        rate: a.rate,
    })?;
    let mut out = io::stdout().lock();
    if a.json {
        let text = serde_json::to_string(&report).map_err(|e| e.to_string())?;
        writeln!(out, "{text}").map_err(|e| e.to_string())
    } else {
        let codes: Vec<String> = report
            .by_code
            .iter()
            .map(|(c, n)| format!("{c}:{n}"))
            .collect();
        writeln!(
            out,
            "reached {} of {} ({:.1} %); final codes {}; no answer {}; 200 not from the phone {}; {} ms",
            report.reached,
            report.total,
            100.0 * f64::from(report.reached) / f64::from(report.total.max(1)),
            if codes.is_empty() { "-".to_string() } else { codes.join(" ") },
            report.no_answer,
            report.ok_not_by_phone,
            report.elapsed_ms
        )
        .map_err(|e| e.to_string())
    }
}
