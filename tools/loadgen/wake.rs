//! What one sleep and wake-up costs a thread on this host (`wake-cost`).
//!
//! At low rates a worker's cost per ping is dominated by its wake-ups: it
//! sleeps between rounds and pays, each round, the system call, the switch
//! away and back and the paths gone cold meanwhile, whatever it then does.
//! On bare metal that is a few µs; in a virtual machine the timer and the
//! idle exits can make it ten times more. This measures it on the host at
//! hand, so an operator can tell what kaping's low-rate figures will be
//! (tuning.md, "Low rates").
//!
//! For each sleep length, a thread sleeps that long `count` times, two
//! ways, and its own CPU time is read from its schedstat (exact, in ns)
//! before and after:
//! * `nanosleep`: `std::thread::sleep`, the plainest sleep there is (the
//!   raw sender of `ceiling --rate` sleeps so);
//! * `worker`: a kaping worker's sleep (`io::udp::sleep_until_woken`: `ppoll`
//!   on an eventfd and the error queues of an IPv4 and an IPv6 UDP socket),
//!   with nothing arriving.
//!
//! The process has a second thread (idle) while it measures, as kaping
//! does: some kernel paths take a cheaper route in a single-threaded one.
//! Caller: `main` (`wake-cost` subcommand).

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kaping::io::udp::{bind_udp, sleep_until_woken, Datagram, IcmpError, SocketOptions};
use kaping::io::waker::Waker;
use kaping::io::Handler;
use serde::Serialize;

use crate::ceiling::schedstat_ns;

#[derive(Clone, Debug)]
pub struct WakeConfig {
    pub sleeps: Vec<Duration>,
    /// Time spent sleeping per sleep length and way (the count follows).
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct WakeRow {
    pub sleep_ms: f64,
    pub count: u64,
    /// Thread CPU per sleep-and-wake, µs.
    pub nanosleep_cpu_us: f64,
    pub worker_cpu_us: f64,
    /// Wall time a sleep took beyond what was asked, µs (mean).
    pub nanosleep_overshoot_us: f64,
    pub worker_overshoot_us: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct WakeReport {
    pub rows: Vec<WakeRow>,
}

/// Nothing arrives on the sockets; an ICMP error would only be counted.
struct Quiet {
    errors: u64,
}

impl Handler for Quiet {
    fn datagram(&mut self, _sock: usize, _d: &Datagram<'_>) {}
    fn send_failed(&mut self, _tag: u32, _err: &io::Error) {}
    fn icmp(&mut self, _e: &IcmpError<'_>) {
        self.errors += 1;
    }
}

fn thread_cpu_ns() -> Result<u64, String> {
    schedstat_ns("/proc/thread-self/schedstat".as_ref())
        .ok_or_else(|| "cannot read /proc/thread-self/schedstat".to_string())
}

/// Runs `sleep` `count` times; (CPU µs per call, mean overshoot µs).
fn measure(
    count: u64,
    asked: Duration,
    mut sleep: impl FnMut() -> Result<(), String>,
) -> Result<(f64, f64), String> {
    let cpu0 = thread_cpu_ns()?;
    let t0 = Instant::now();
    for _ in 0..count {
        sleep()?;
    }
    let wall = t0.elapsed();
    let cpu = thread_cpu_ns()?.saturating_sub(cpu0);
    let per_call = cpu as f64 / 1e3 / count as f64;
    let overshoot = (wall.as_secs_f64() / count as f64 - asked.as_secs_f64()).max(0.0) * 1e6;
    Ok((per_call, overshoot))
}

pub fn run(cfg: &WakeConfig) -> Result<WakeReport, String> {
    if cfg.sleeps.is_empty() || cfg.sleeps.iter().any(Duration::is_zero) {
        return Err("--sleeps must list one or more lengths above 0".to_string());
    }
    if !(cfg.seconds.is_finite() && cfg.seconds > 0.0) {
        return Err("--seconds must be above 0".to_string());
    }
    let opts = SocketOptions::default();
    let mut sockets = Vec::new();
    for addr in ["127.0.0.1:0", "[::1]:0"] {
        let addr: SocketAddr = addr.parse().expect("literal address");
        // A host without IPv6 measures with the IPv4 socket alone.
        if let Ok((s, _)) = bind_udp(addr, &opts) {
            sockets.push(s);
        }
    }
    if sockets.is_empty() {
        return Err("cannot bind a UDP socket on loopback".to_string());
    }
    let waker = Waker::new().map_err(|e| format!("cannot create an eventfd: {e}"))?;
    // The idle second thread: parked until the measurement ends.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let idle = std::thread::spawn(move || {
        let _ = stop_rx.recv();
    });
    let mut quiet = Quiet { errors: 0 };
    let mut rows = Vec::with_capacity(cfg.sleeps.len());
    let result = (|| -> Result<(), String> {
        for &asked in &cfg.sleeps {
            let count = ((cfg.seconds / asked.as_secs_f64()).round() as u64).max(1);
            let (nanosleep_cpu_us, nanosleep_overshoot_us) = measure(count, asked, || {
                std::thread::sleep(asked);
                Ok(())
            })?;
            let (worker_cpu_us, worker_overshoot_us) = measure(count, asked, || {
                sleep_until_woken(&sockets, &waker, asked, &mut quiet)
                    .map_err(|e| format!("ppoll: {e}"))
            })?;
            rows.push(WakeRow {
                sleep_ms: asked.as_secs_f64() * 1e3,
                count,
                nanosleep_cpu_us,
                worker_cpu_us,
                nanosleep_overshoot_us,
                worker_overshoot_us,
            });
        }
        Ok(())
    })();
    drop(stop_tx);
    let _ = idle.join();
    result?;
    if quiet.errors > 0 {
        return Err(format!(
            "{} ICMP errors reached the idle sockets: not a quiet measurement",
            quiet.errors
        ));
    }
    Ok(WakeReport { rows })
}

pub fn print_text(r: &WakeReport, out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "thread CPU per sleep and wake-up (its schedstat), and how late the wake-up came:"
    )?;
    writeln!(
        out,
        "{:>9} {:>7} {:>17} {:>14} {:>18} {:>15}",
        "sleep",
        "count",
        "CPU nanosleep µs",
        "CPU worker µs",
        "late nanosleep µs",
        "late worker µs"
    )?;
    for row in &r.rows {
        writeln!(
            out,
            "{:>7}ms {:>7} {:>17.2} {:>14.2} {:>18.0} {:>15.0}",
            row.sleep_ms,
            row.count,
            row.nanosleep_cpu_us,
            row.worker_cpu_us,
            row.nanosleep_overshoot_us,
            row.worker_overshoot_us
        )?;
    }
    Ok(())
}
