//! `kaping-stat`: reads a running (or dead) kaping daemon's shared-memory
//! file (DESIGN §7) read-only and shows it: a summary, a live `top` view, the
//! record of one contact, a dump of all of them, and Prometheus metrics.
//!
//! It only ever maps the file read-only through `kaping::shm::reader`, so it
//! can neither disturb nor stall the daemon; any number can run at once.
//! This binary contains no `unsafe`.
//!
//! # Usage
//!
//! ```text
//! kaping-stat [--shm PATH | --instance NAME] [--json] [--interval DUR]      summary
//! kaping-stat top        [--interval DUR]             live view (q, Esc, Ctrl-C quit)
//! kaping-stat get KEY    [--json]                     every contact whose URI or AoR is
//!                                                     KEY, or whose address is KEY (ip:port)
//! kaping-stat dump       [--json]                     every contact, one line / object each
//! kaping-stat prometheus --listen ADDR | --once       /metrics over HTTP, or printed once
//! ```
//!
//! The file is `--shm PATH`, else `/dev/shm/kaping-<--instance>` (default
//! instance `default`). The summary samples the counters twice `--interval`
//! apart (default 1 s) for per-second rates; `--interval 0` samples once and
//! shows no rates; a daemon that is not running is sampled once.
//!
//! The daemon is *running* when it has not marked the file stopped and its
//! heartbeat (written every second) is at most 3 s old. Otherwise the summary
//! says why (`stopped` cleanly, `stale` heartbeat: crashed or hung, or
//! `no_heartbeat`) and still shows the last figures.
//!
//! A daemon that runs the registrar feed (`--dmq`) adds a `registrar feed`
//! section to the summary: what the feed did to the contacts, the DMQ node's
//! health, and removal from the registrar with its guard.
//!
//! Exit status: 0 on success (whatever the daemon's state); 1 with one line on
//! stderr when the file is missing, may not be read by this user, is not a
//! kaping file, of a layout version this build does not read (it reads 2 and
//! 3) or corrupt, or when `get` finds nothing; 2 for usage errors.
//!
//! The daemon creates the file mode 0640: its owner and its group (the
//! daemon's `shm_group` setting, else its own group) may read it. Anyone
//! else gets one line naming the file's mode, owner and group and who may
//! read it:
//!
//! ```text
//! kaping-stat: cannot read /dev/shm/kaping-default: permission denied (mode 0640, owner kaping, group kaping); run as the owner or a member of group 'kaping' (the daemon's shm_group setting)
//! ```
//!
//! # Summary JSON (`kaping-stat --json`)
//!
//! One object; names are stable, new fields may be added. Counters are totals
//! since the daemon started, summed over workers.
//!
//! | field | meaning |
//! |---|---|
//! | `shm_path`, `instance`, `layout_version`, `pid`, `backend` | which file and daemon |
//! | `running` | bool: heartbeat fresh (≤ 3 s) and not stopped |
//! | `status` | `running`, `stopped`, `stale` or `no_heartbeat` |
//! | `stopped` | bool: the daemon marked the file stopped on a clean exit |
//! | `heartbeat_age_ms` | ms since the last heartbeat; null if none was ever written |
//! | `start_ms`, `started_at` | daemon start, Unix ms and RFC 3339 |
//! | `uptime_ms` | run time (up to the last heartbeat for a dead daemon) |
//! | `now_ms` | Unix ms when the figures were read |
//! | `workers`, `slots_per_worker`, `capacity` | geometry; capacity = workers × slots |
//! | `contacts` | live contacts: `unknown` + `up` + `down` |
//! | `up`, `down`, `unknown`, `removed` | contacts by state (the daemon's gauges) |
//! | `sent` | pings handed to the kernel |
//! | `matched` | replies matched to a live ping |
//! | `timeouts` | pings unanswered within the reply timeout (after retries) |
//! | `stray` | valid replies for a contact that no longer exists |
//! | `forged` | replies with our instance prefix but a bad MAC |
//! | `late` | replies for a ping already timed out or answered, and genuine replies replayed later |
//! | `error_replies` | replies whose status is not in the alive set |
//! | `parse_errors` | datagrams that are not a parsable SIP response |
//! | `send_errors` | failed sends |
//! | `unreachable` | ICMP unreachable errors that failed a ping in flight at once (a miss, reason `unreachable`) |
//! | `retries` | retransmissions before a miss is counted |
//! | `rate_limited` | pings deferred by the pings-per-second cap |
//! | `received` | datagrams received |
//! | `handoff` | replies received by a worker other than the owner |
//! | `icmp_forged` | ICMP errors quoting a token that fails its MAC, or a datagram that is no request of kaping's: not sent by kaping, ignored |
//! | `icmp_unmatched` | ICMP unreachable errors naming no ping in flight (contact gone, ping settled, or no contact at the destination), ignored |
//! | `icmp_other` | ICMP errors that say nothing about liveness (time exceeded, packet too big, ...; NAT-only keepalives), ignored |
//! | `rtt_samples`, `rtt_sum_us`, `rtt_mean_us` | RTT sample count, sum and mean (µs) |
//! | `rtt_p50_us`, `rtt_p90_us`, `rtt_p99_us`, `rtt_p999_us`, `rtt_max_us` | RTT quantiles from the histogram (µs, within 3.2%); null without samples |
//! | `rate_interval_ms` | time between the two samples; null if sampled once |
//! | `rates` | object: per-second rate of every event counter above (`sent`, `matched`, `timeouts`, ...); null if sampled once |
//! | `rejects` | object: datagrams rejected by cause (`not_sip`, `bad_tag`, `forged`, ...) |
//! | `per_worker` | array, one object per worker: `worker`, the contact and event fields above, the `rtt_*` fields, `string_bytes_used`, and `rates` when sampled twice |
//! | `registrar` | the registrar feed (`--dmq`), null when the daemon does not run it (or the file is of layout version 2): one key per figure of the shm registrar block (`kaping::shm::layout::RegistrarStat` names: `added`, `updated`, `refreshed`, `deleted`, `delete_unknown`, `expired`, `stale_after_sync`, `other_shard`, `refused`, `syncs_done`; the DMQ node's `received`, `requests`, `duplicates`, `not_peer`, `rejected`, `changes`, `joins`, `syncs`, `other_channels`, `sync_refused`, `sync_unanswered`; removal's `removals_sent`, `removals_withheld`, `guard_trips`, `removed`, `remove_not_found`, `remove_failed`, `remove_unanswered`; the gauge `contacts`), and the booleans `guard_tripped`, `feed_configured`, `removal_configured` |
//!
//! # Contact JSON (`get --json`, `dump --json`: one object per line)
//!
//! `worker`, `slot`, `generation`, `state` (`unknown`, `up`, `down`,
//! `removed`), `uri`, `aor` (null if none), `addr` (`ip:port` or null),
//! `rtt_last_us`, `rtt_min_us`, `rtt_max_us`, `srtt_us`, `rttvar_us`,
//! `misses` (consecutive), `sent`, `answered`, `unanswered` (sent − answered),
//! `last_code`, `interval_ms`, `last_ping_ms`, `last_ping`, `last_reply_ms`,
//! `last_reply` (RFC 3339, null if never), `key_hash` (16 hex digits).
//!
//! The text `dump` line is tab-separated: worker, slot, state, address,
//! srtt µs, last RTT µs, misses, sent, answered, last code, URI, AoR (`-` when
//! absent).
//!
//! # Prometheus metrics
//!
//! `kaping_up`, `kaping_info{instance,backend,pid,layout_version}`,
//! `kaping_stopped`, `kaping_heartbeat_age_seconds`,
//! `kaping_start_time_seconds`, `kaping_workers`, `kaping_contact_slots`,
//! `kaping_contacts{worker,state}`, counters per `worker`:
//! `kaping_pings_sent_total`, `kaping_replies_matched_total`,
//! `kaping_pings_timed_out_total`, `kaping_replies_stray_total`,
//! `kaping_replies_forged_total`, `kaping_replies_late_total`,
//! `kaping_replies_error_status_total`, `kaping_parse_errors_total`,
//! `kaping_send_errors_total`, `kaping_icmp_unreachable_total`,
//! `kaping_retransmissions_total`, `kaping_pings_rate_limited_total`,
//! `kaping_datagrams_received_total`, `kaping_replies_handed_off_total`,
//! `kaping_icmp_ignored_total{worker,cause}` (`forged`, `unmatched`, `other`),
//! `kaping_rejects_total{worker,reason}`, `kaping_string_bytes_used{worker}`,
//! and the histogram `kaping_rtt_seconds` (all workers, 21 bounds from 250 µs
//! to 5 s). While the file cannot be opened the page is `kaping_up 0`.
//!
//! A daemon that runs the registrar feed adds `kaping_registrar_contacts`,
//! `kaping_registrar_changes_total{kind}` (`added`, `updated`, `refreshed`,
//! `deleted`, `delete_unknown`, `expired`, `stale_after_sync`, `other_shard`,
//! `refused`), `kaping_registrar_syncs_completed_total`,
//! `kaping_registrar_sync_requests_total`,
//! `kaping_registrar_sync_requests_refused_total`,
//! `kaping_registrar_sync_requests_unanswered_total`,
//! `kaping_registrar_dmq_datagrams_received_total`,
//! `kaping_registrar_dmq_requests_total`,
//! `kaping_registrar_dmq_records_received_total`,
//! `kaping_registrar_dmq_joins_total` and
//! `kaping_registrar_dmq_discarded_total{cause}` (`duplicate`, `not_peer`,
//! `rejected`, `other_channel`); with removal on (`registrar_rpc`) also
//! `kaping_registrar_removals_total{outcome}` (`removed`, `not_found`,
//! `failed`, `withheld`), `kaping_registrar_removals_sent_total`,
//! `kaping_registrar_removal_attempts_unanswered_total`,
//! `kaping_registrar_removal_guard_trips_total` and the gauge
//! `kaping_registrar_removal_guard_tripped`.
#![forbid(unsafe_code)]

#[path = "stat/contacts.rs"]
mod contacts;
#[path = "stat/prom.rs"]
mod prom;
#[path = "stat/snapshot.rs"]
mod snapshot;
#[path = "stat/summary.rs"]
mod summary;
#[path = "stat/top.rs"]
mod top;

use std::io::{self, BufWriter, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kaping::shm::reader::ShmReader;

use contacts::{find, for_each_contact, Key};
use snapshot::{open_error_line, Snapshot};

#[derive(Parser, Debug)]
#[command(
    name = "kaping-stat",
    version,
    about = "Shows what a kaping daemon publishes in its shared memory"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Args, Debug)]
struct Global {
    /// The shared-memory file [default: /dev/shm/kaping-<instance>].
    #[arg(long, global = true, value_name = "PATH")]
    shm: Option<PathBuf>,
    /// Instance name of the daemon (ignored with --shm).
    #[arg(long, global = true, default_value = "default", value_name = "NAME")]
    instance: String,
    /// JSON output (summary: one object; get and dump: one object per line).
    #[arg(long, global = true)]
    json: bool,
    /// Rate sampling interval of the summary, refresh period of top (0: no rates).
    #[arg(long, global = true, default_value = "1s", value_name = "DUR")]
    interval: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Daemon state, contacts, counters with rates, RTT percentiles (the default).
    Summary,
    /// Live full-screen view; q, Esc or Ctrl-C quits.
    Top,
    /// Every contact whose URI or AoR equals KEY, or whose address is KEY (ip:port).
    Get {
        #[arg(value_name = "KEY")]
        key: String,
    },
    /// Every contact, one line (or JSON object) each.
    Dump,
    /// Prometheus text exposition (format 0.0.4) on /metrics, or once to stdout.
    Prometheus {
        /// Address to serve on, e.g. 127.0.0.1:9632 ([::]:9632 for all).
        #[arg(long, value_name = "ADDR", required_unless_present = "once")]
        listen: Option<String>,
        /// Print the metrics once to stdout and exit.
        #[arg(long, conflicts_with = "listen")]
        once: bool,
    },
    /// Write the manual pages and shell completions under DIR (packaging).
    #[command(hide = true)]
    GenDocs { dir: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kaping-stat: {e}");
            ExitCode::FAILURE
        }
    }
}

fn open(path: &Path) -> Result<ShmReader, String> {
    ShmReader::open(path).map_err(|e| open_error_line(path, &e))
}

/// Write errors on stdout: a closed pipe (`| head`) ends the output quietly.
fn out_err(e: io::Error) -> Option<String> {
    (e.kind() != io::ErrorKind::BrokenPipe).then(|| format!("stdout: {e}"))
}

fn finish(r: io::Result<()>) -> Result<ExitCode, String> {
    match r.map_err(out_err) {
        Ok(()) | Err(None) => Ok(ExitCode::SUCCESS),
        Err(Some(e)) => Err(e),
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let g = cli.global;
    let path = g
        .shm
        .clone()
        .unwrap_or_else(|| kaping::config::default_shm_path(&g.instance));
    let interval =
        kaping::duration::parse_duration(&g.interval).map_err(|e| format!("--interval: {e}"))?;
    match cli.cmd.unwrap_or(Cmd::Summary) {
        Cmd::GenDocs { dir } => {
            use clap::CommandFactory;
            kaping::docgen::generate(Cli::command(), &dir)
                .map_err(|e| format!("gen-docs {}: {e}", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Summary => {
            let (_shm, snap, before) = Snapshot::sample(&path, interval)?;
            let mut out = io::stdout().lock();
            let r = if g.json {
                let v = summary::json(&path, &snap, before.as_ref());
                writeln!(out, "{v}")
            } else {
                out.write_all(summary::text(&path, &snap, before.as_ref()).as_bytes())
            };
            finish(r.and_then(|()| out.flush()))
        }
        Cmd::Top => {
            let refresh = if interval.is_zero() {
                Duration::from_secs(1)
            } else {
                interval
            };
            top::run(&path, refresh)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Get { key } => {
            let shm = open(&path)?;
            let found = find(&shm, &Key::parse(&key));
            if found.is_empty() {
                return Err(format!(
                    "no contact matches {key:?} (by URI, AoR or ip:port) in {}",
                    path.display()
                ));
            }
            let mut out = io::stdout().lock();
            let r = found.iter().enumerate().try_for_each(|(i, c)| {
                if g.json {
                    writeln!(out, "{}", c.to_json())
                } else {
                    if i > 0 {
                        writeln!(out)?;
                    }
                    c.write_record(&mut out)
                }
            });
            finish(r.and_then(|()| out.flush()))
        }
        Cmd::Dump => {
            let shm = open(&path)?;
            let mut out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
            let r = for_each_contact(&shm, |c| {
                if g.json {
                    serde_json::to_writer(&mut out, &c.to_json()).map_err(io::Error::from)?;
                    out.write_all(b"\n")
                } else {
                    c.write_line(&mut out)
                }
            });
            finish(r.and_then(|()| out.flush()))
        }
        Cmd::Prometheus { listen, once } => {
            if once {
                // Unlike the server, a one-shot run reports a bad file as an error.
                let shm = open(&path)?;
                let page = prom::render(&Snapshot::take(&shm));
                let mut out = io::stdout().lock();
                return finish(out.write_all(page.as_bytes()).and_then(|()| out.flush()));
            }
            let addr = listen.expect("clap requires --listen without --once");
            let listener =
                TcpListener::bind(&addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let local = listener
                .local_addr()
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            if let Err(e) = ShmReader::open(&path) {
                eprintln!(
                    "kaping-stat: warning: {} (serving kaping_up 0 until it appears)",
                    open_error_line(&path, &e)
                );
            }
            eprintln!("kaping-stat: serving http://{local}/metrics");
            prom::serve(listener, &path).map_err(|e| format!("http: {e}"))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
