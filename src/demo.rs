//! `kaping demo`: the whole system on loopback in one command.
//!
//! Starts the simulated SIP platform ([`crate::sim::Responder`]) answering
//! for N contacts spread over 127.0.0.0/8 (a few percent dead by design),
//! starts a daemon that pings them, prints live figures every second read
//! from the shared-memory file exactly as `kaping-stat` would, and ends
//! with a summary. Everything it starts, it stops (threads, sockets, the
//! shm file).

use std::io::{self, IsTerminal, Write};
use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::config::{DurationValue, RawConfig, Settings};
use crate::contact::ContactSpec;
use crate::daemon::Daemon;
use crate::io::signal;
use crate::shm::layout::{percentile, Counter, HIST_BUCKETS};
use crate::shm::reader::ShmReader;
use crate::sim::{contact_uri, FatePlan, ListenSpec, Responder, ServeConfig};
use crate::sources::Verdict;
use crate::timefmt::grouped;

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Simulated contacts to ping.
    #[arg(long, default_value_t = 100_000)]
    pub contacts: u32,
    /// How long to run.
    #[arg(long, default_value = "20s")]
    pub duration: String,
    /// Fraction of contacts that never answer (they must end Down).
    #[arg(long, default_value_t = 0.03)]
    pub dead: f64,
    /// Latency the responder adds to every reply.
    #[arg(long, default_value = "2ms")]
    pub latency: String,
    /// Ping interval per contact.
    #[arg(long, default_value = "5s")]
    pub interval: String,
    /// Worker threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub workers: u32,
    /// auto | uring | mmsg
    #[arg(long, default_value = "auto")]
    pub backend: String,
}

/// Sums a counter or histogram over workers.
struct Figures {
    counters: [u64; Counter::COUNT],
    hist: Vec<u64>,
}

impl Figures {
    fn read(shm: &ShmReader) -> Figures {
        let mut counters = [0u64; Counter::COUNT];
        let mut hist = vec![0u64; HIST_BUCKETS];
        for w in 0..shm.header().workers {
            for (t, c) in counters.iter_mut().zip(shm.counters(w)) {
                *t += c;
            }
            for (t, c) in hist.iter_mut().zip(shm.histogram(w)) {
                *t += c;
            }
        }
        Figures { counters, hist }
    }

    fn get(&self, c: Counter) -> u64 {
        self.counters[c as usize]
    }

    fn pct_ms(&self, q: f64) -> String {
        percentile(&self.hist, q).map_or("-".into(), |us| format!("{:.2}", us as f64 / 1000.0))
    }
}

/// CPU seconds (user + system) used so far by this process's threads whose
/// name starts with `prefix` (from /proc; 0 where unavailable).
pub fn thread_cpu_seconds(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    // USER_HZ (clock ticks in /proc) is 100 on every Linux ABI we run on.
    let ticks_per_s = 100.0;
    let mut total = 0u64;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the ")" that closes the command name: state is #3,
        // utime #14 and stime #15 (1-based, proc(5)).
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.len() > 12 {
                total += f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
            }
        }
    }
    total as f64 / ticks_per_s
}

/// A base port with `count` consecutive free UDP ports on 127.0.0.1.
fn free_ports(count: u16) -> Result<u16, String> {
    let mut x = std::process::id() as u64 ^ 0x9E37_79B9_7F4A_7C15;
    for _ in 0..500 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let base = 20_000 + (x % 40_000) as u16;
        if (0..count).all(|i| UdpSocket::bind(("127.0.0.1", base + i)).is_ok()) {
            return Ok(base);
        }
    }
    Err(format!(
        "no {count} consecutive free UDP ports on 127.0.0.1"
    ))
}

pub fn run(args: DemoArgs) -> Result<(), String> {
    let duration =
        crate::duration::parse_duration(&args.duration).map_err(|e| format!("--duration: {e}"))?;
    let latency_ns = crate::sim::fate::parse_duration_ns(&args.latency)
        .map_err(|e| format!("--latency: {e}"))?;
    if args.contacts == 0 {
        return Err("--contacts must be at least 1".into());
    }
    signal::install_handlers().map_err(|e| format!("cannot install signal handlers: {e}"))?;

    // The simulated platform: one socket on 0.0.0.0:P answers for every
    // 127.a.b.c:P, from the address that was pinged.
    let plan = FatePlan::new(1, args.dead, 0.0, 503, 0.0, 1).map_err(|e| format!("--dead: {e}"))?;
    let mut serve = ServeConfig::new(vec![ListenSpec::parse("0.0.0.0:0")?], plan.clone());
    serve.noise.latency_ns = latency_ns;
    serve.recv_buffer_bytes = 16 << 20;
    serve.send_buffer_bytes = 16 << 20;
    let responder = Responder::spawn(serve)?;
    let port = responder.local_addrs()[0].port();

    let workers = if args.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get()) as u32
    } else {
        args.workers
    };
    let shm_path = PathBuf::from(format!("/dev/shm/kaping-demo-{}", std::process::id()));
    let bind_port = free_ports(workers as u16)?;
    let raw = RawConfig {
        instance: Some("demo".into()),
        workers: Some(workers),
        max_contacts: Some(args.contacts.max(1000)),
        backend: Some(args.backend.clone()),
        bind: Some(format!("127.0.0.1:{bind_port}")),
        shm: Some(shm_path.clone()),
        events: Some("none".into()),
        interval: Some(DurationValue::Text(args.interval.clone())),
        reply_timeout: Some(DurationValue::Text("1s".into())),
        down_after: Some(2),
        recv_buffer: Some(16 << 20),
        // The demo pings its own simulated phones on this host.
        allow_destinations: Some(vec!["127.0.0.0/8".into()]),
        send_buffer: Some(16 << 20),
        ..RawConfig::default()
    };
    let settings = Settings::from_raw(&raw).map_err(|e| e.to_string())?;
    let interval = settings.interval;
    let mut daemon = Daemon::start(settings).map_err(|e| e.to_string())?;

    let loaded_at = Instant::now();
    let mut expected_dead = 0u64;
    for i in 0..args.contacts as u64 {
        let uri = contact_uri(i, port, 1, false);
        if plan.fate(plan.contact_hash(uri.as_bytes())) == crate::sim::Fate::Dead {
            expected_dead += 1;
        }
        if let Verdict::Skip(why) | Verdict::Stop(why) = daemon.add(&ContactSpec::from_uri(uri)) {
            return Err(format!("contact {i}: {why}"));
        }
    }
    daemon.flush_adds();
    println!(
        "kaping demo: {} simulated contacts on 127.0.0.0/8:{port} ({} dead by design), {} ms latency, \
         interval {:?}, {workers} workers, backend {}; {} s, Ctrl-C to stop early",
        grouped(args.contacts as u64),
        grouped(expected_dead),
        latency_ns as f64 / 1e6,
        interval,
        daemon.backend,
        duration.as_secs()
    );
    println!(
        "loaded in {:.2} s; live figures from {}",
        loaded_at.elapsed().as_secs_f64(),
        shm_path.display()
    );

    let reader = ShmReader::open(&shm_path).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut last = Figures::read(&reader);
    let mut last_t = Instant::now();
    let live = io::stdout().is_terminal();
    // Worker threads end with the daemon: sample their CPU time while live,
    // from the first second on (loading the contacts is not pinging them).
    let mut cpu_base: Option<(f64, u64)> = None;
    let mut cpu = 0.0;
    let mut cpu_sent = 0;
    daemon
        .wait(Some(duration), || {
            let now = Figures::read(&reader);
            let (c, sent) = (thread_cpu_seconds("kaping-w"), now.get(Counter::Sent));
            let (c0, s0) = *cpu_base.get_or_insert((c, sent));
            (cpu, cpu_sent) = (c - c0, sent - s0);
            let dt = last_t.elapsed().as_secs_f64().max(1e-3);
            let rate = |c| (now.get(c) - last.get(c)) as f64 / dt;
            println!(
                "{:>4.0}s  sent {:>9}/s  matched {:>9}/s  up {:>9}  down {:>7}  unknown {:>9}  rtt p50 {} ms  p99 {} ms",
                started.elapsed().as_secs_f64(),
                grouped(rate(Counter::Sent) as u64),
                grouped(rate(Counter::Matched) as u64),
                grouped(now.get(Counter::ContactsUp)),
                grouped(now.get(Counter::ContactsDown)),
                grouped(now.get(Counter::ContactsUnknown)),
                now.pct_ms(0.5),
                now.pct_ms(0.99),
            );
            if live {
                let _ = io::stdout().flush();
            }
            last = now;
            last_t = Instant::now();
        })
        .map_err(|e| e.to_string())?;
    let ran = started.elapsed().as_secs_f64();
    let f = Figures::read(&reader);
    let served = responder.stop();
    drop(reader);
    let _ = std::fs::remove_file(&shm_path);

    let sent = f.get(Counter::Sent);
    let matched = f.get(Counter::Matched);
    let down = f.get(Counter::ContactsDown);
    println!();
    println!("summary after {ran:.1} s:");
    println!(
        "  pings sent        {:>11}  ({}/s)",
        grouped(sent),
        grouped((sent as f64 / ran) as u64)
    );
    println!(
        "  replies matched   {:>11}  ({:.1} % of pings; dead contacts never answer)",
        grouped(matched),
        100.0 * matched as f64 / sent.max(1) as f64
    );
    println!(
        "  contacts          up {}  down {} (of {} dead by design)  unknown {}",
        grouped(f.get(Counter::ContactsUp)),
        grouped(down),
        grouped(expected_dead),
        grouped(f.get(Counter::ContactsUnknown))
    );
    println!(
        "  RTT (kernel timestamps)  p50 {} ms  p90 {} ms  p99 {} ms  p99.9 {} ms  ({} ms injected)",
        f.pct_ms(0.5),
        f.pct_ms(0.9),
        f.pct_ms(0.99),
        f.pct_ms(0.999),
        latency_ns as f64 / 1e6
    );
    println!(
        "  timed out {}  late {}  stray {}  forged {}  unparsable {}  send errors {}",
        grouped(f.get(Counter::TimedOut)),
        grouped(f.get(Counter::Late)),
        grouped(f.get(Counter::Stray)),
        grouped(f.get(Counter::Forged)),
        grouped(f.get(Counter::ParseErrors)),
        grouped(f.get(Counter::SendErrors))
    );
    println!(
        "  responder         received {}  answered {}  silent (dead) {}",
        grouped(served.received),
        grouped(served.answered),
        grouped(served.dead_dropped)
    );
    if cpu > 0.0 && cpu_sent > 0 {
        println!(
            "  worker CPU        {cpu:.2} s for {} pings after loading = {:.2} µs per ping (user + system)",
            grouped(cpu_sent),
            cpu * 1e6 / cpu_sent as f64
        );
    }
    Ok(())
}
