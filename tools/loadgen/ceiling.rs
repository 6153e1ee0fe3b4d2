//! The raw UDP ceiling (`ceiling`): how many echoed round trips per second
//! this machine's loopback carries with batched system calls, with no SIP
//! work at all. kaping's own figures are judged against it.
//!
//! Ownership: this process owns one blaster socket (sending with `sendmmsg`
//! to N contact addresses across 127.0.0.0/8, the `contacts` mapping, and
//! receiving the echoes with `recvmmsg` in the same loop, so the run needs one
//! core here and one for the echo child) and the child process
//! `serve --raw-echo`, which it always stops: stdin is closed (the child runs
//! with `--stop-on-stdin-eof` and a `--seconds` backstop) and, should it
//! linger, it is killed, also when this function returns early.
//!
//! With `sip`, the child is a normal `serve` and the datagrams are OPTIONS
//! requests in kaping's template shape (one pre-rendered request per contact,
//! up to `SIP_REQUESTS_MAX` distinct ones): the figure is then the responder's
//! own SIP rate, the peer capacity kaping is benchmarked against.
//!
//! The window of datagrams in flight is bounded (`window`), so the figure is a
//! sustained rate, not a burst into socket buffers; echoes missing for
//! `STALL_MS` are written off as lost and the window reopens.
//! Caller: `main` (`ceiling` subcommand).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

use kaping::io::udp::{bind_udp, RecvBatch, SendBatch, SocketOptions};
use kaping::sim::contacts::push_uri;
use kaping::sim::{Layout, BATCH, DATAGRAM_MAX};
use serde::Serialize;

/// Echoes missing this long are written off and the window reopens (long
/// enough that a descheduled child on a busy machine does not trigger it).
const STALL_MS: u64 = 200;
/// Linux reports `/proc/PID/stat` times in USER_HZ ticks, 100 per second on
/// every architecture's ABI.
pub(crate) const USER_HZ: u64 = 100;

/// User + system CPU, in USER_HZ ticks, of the process or thread whose
/// `stat` file is `path` (`/proc/PID/stat`, `/proc/thread-self/stat`).
pub(crate) fn stat_cpu_ticks(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name: state is field 3,
    // utime and stime are fields 14 and 15 (1-based, proc(5)).
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}
/// Time on a CPU, ns, of the thread whose `schedstat` file is `path`
/// (`/proc/thread-self/schedstat`, `/proc/PID/task/TID/schedstat`): exact,
/// where `stat` counts 10 ms ticks, too coarse for a paced sender's few ms
/// a second.
pub(crate) fn schedstat_ns(path: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

fn thread_cpu_ns() -> Option<u64> {
    schedstat_ns("/proc/thread-self/schedstat".as_ref())
}

/// How long trailing echoes are awaited after the last second.
const DRAIN_MS: u64 = 100;
/// Distinct pre-rendered requests in `sip` mode (they cycle beyond this).
const SIP_REQUESTS_MAX: u64 = 65_536;
/// Grace given to the child to exit after stdin closes.
const CHILD_EXIT_MS: u64 = 5000;

#[derive(Clone, Debug)]
pub struct CeilingConfig {
    pub contacts: u64,
    pub seconds: u32,
    pub size: usize,
    pub window: usize,
    /// Drive a SIP `serve` with OPTIONS instead of a raw echo.
    pub sip: bool,
    /// Send at this rate instead of flat out (see [`Pace`]).
    pub pace: Option<Pace>,
}

/// The raw sender at an operating point: it wakes every `round`, receives
/// the echoes waiting and sends what fell due since the last round
/// (`rate` × elapsed), in `sendmmsg`/`recvmmsg` batches, then sleeps until
/// the next round. What the kernel charges per round trip at that rate,
/// with rounds as long as kaping's, and no SIP, timers or matching.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Pace {
    /// Round trips per second offered.
    pub rate: f64,
    #[serde(serialize_with = "serialize_secs")]
    pub round: Duration,
}

fn serialize_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[derive(Clone, Debug, Serialize)]
pub struct CeilingReport {
    pub contacts: u64,
    pub seconds: u32,
    pub size: usize,
    pub window: usize,
    pub sip: bool,
    pub pace: Option<Pace>,
    /// Median of the per-second echoed round-trip rates.
    pub round_trips_per_s: u64,
    pub min_per_s: u64,
    pub max_per_s: u64,
    pub per_second: Vec<u64>,
    pub sent: u64,
    pub echoed: u64,
    pub lost: u64,
    /// CPU seconds (user + system) the responder process used in its life.
    pub responder_cpu_s: Option<f64>,
    /// CPU of the sending thread (this one) per round trip while it
    /// blasted, µs (its schedstat, exact). Flat out it never sleeps, almost
    /// all of it in the kernel: what one datagram out and one in cost
    /// through UDP sockets on this machine, at most. Paced, it also pays
    /// its wake-ups and the colder paths of a sender that sleeps.
    pub sender_cpu_us_per_round_trip: Option<f64>,
    /// Datagrams the responder answered per CPU second it used: its
    /// capacity, independent of what else the machine was running.
    pub responder_answered_per_cpu_s: Option<u64>,
    /// The child's own counters (`serve --json`), when it reported them.
    pub responder: Option<serde_json::Value>,
}

/// The echo child; stopped on drop whatever happened.
struct EchoChild {
    child: Child,
    stderr: Option<BufReader<ChildStderr>>,
}

impl EchoChild {
    fn spawn(seconds: u32, sip: bool) -> Result<(EchoChild, u16), String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
        let backstop = (u64::from(seconds) + 30).to_string();
        let child = Command::new(exe)
            .args(["serve"])
            .args((!sip).then_some("--raw-echo"))
            .args([
                "--listen",
                "0.0.0.0:0",
                "--threads",
                "1",
                "--json",
                "--stop-on-stdin-eof",
                "--seconds",
                &backstop,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the echo responder: {e}"))?;
        let mut me = EchoChild {
            child,
            stderr: None,
        };
        let mut stderr = BufReader::new(
            me.child
                .stderr
                .take()
                .ok_or("the echo responder has no stderr")?,
        );
        let mut port = None;
        let mut line = String::new();
        loop {
            line.clear();
            match stderr.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    return Err(format!(
                        "the echo responder exited before it was ready (last line {:?})",
                        line.trim()
                    ))
                }
                Ok(_) => {}
            }
            let l = line.trim();
            if let Some(addr) = l.strip_prefix("listening ") {
                port = addr.parse::<SocketAddr>().ok().map(|a| a.port());
            } else if l == "ready" {
                break;
            } else {
                eprintln!("responder: {l}");
            }
        }
        me.stderr = Some(stderr);
        let port = port.ok_or("the echo responder did not say where it listens")?;
        Ok((me, port))
    }

    /// CPU seconds the child has used so far, from `/proc/PID/stat`.
    fn cpu_s(&self) -> Option<f64> {
        let ticks = stat_cpu_ticks(&format!("/proc/{}/stat", self.child.id()))?;
        Some(ticks as f64 / USER_HZ as f64)
    }

    /// Closes stdin, waits for the exit and returns the child's stdout.
    fn finish(&mut self) -> String {
        drop(self.child.stdin.take());
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        self.reap();
        out
    }

    fn reap(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_millis(CHILD_EXIT_MS);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
            }
        }
    }
}

impl Drop for EchoChild {
    fn drop(&mut self) {
        self.reap();
        drop(self.stderr.take());
    }
}

pub fn run(cfg: &CeilingConfig) -> Result<CeilingReport, String> {
    if cfg.contacts == 0 || cfg.seconds == 0 {
        return Err("--contacts and --seconds must be at least 1".to_string());
    }
    if cfg.size == 0 || cfg.size > DATAGRAM_MAX {
        return Err(format!("--size must be 1..={DATAGRAM_MAX} bytes"));
    }
    if cfg.window == 0 {
        return Err("--window must be at least 1".to_string());
    }
    let (mut child, port) = EchoChild::spawn(cfg.seconds, cfg.sip)?;
    let layout = Layout::new(port, 1, false)?;
    let opts = SocketOptions {
        recv_buffer_bytes: 8 << 20,
        send_buffer_bytes: 8 << 20,
        reuse_port: false,
        reuse_addr: false,
        pktinfo: false,
        timestamps: false,
        recv_errors: false,
        // As the daemon's sockets: the ceiling is for the same send path.
        dont_fragment: true,
        nonblocking: true,
    };
    let (sock, _) = bind_udp("0.0.0.0:0".parse().expect("literal address"), &opts)
        .map_err(|e| format!("cannot bind the blaster socket: {e}"))?;
    let fd = sock.as_raw_fd();
    let local = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or("the blaster socket has no address")?;
    let payloads = if cfg.sip {
        (0..cfg.contacts.min(SIP_REQUESTS_MAX))
            .map(|i| sip_request(&layout, i, local.port()))
            .collect()
    } else {
        vec![vec![b'k'; cfg.size]]
    };
    let buf_len = payloads.iter().map(Vec::len).max().unwrap_or(1);
    let mut send = SendBatch::new(BATCH, buf_len);
    let mut recv = RecvBatch::new(BATCH, DATAGRAM_MAX);

    let (mut sent, mut echoed, mut lost) = (0u64, 0u64, 0u64);
    let mut next = 0u64;
    let mut per_second = Vec::with_capacity(cfg.seconds as usize);
    let sender_ns0 = thread_cpu_ns();
    let start = Instant::now();
    let mut next_round = start;
    let mut tick = start + Duration::from_secs(1);
    let mut echoed_at_tick = 0u64;
    let mut last_progress = start;
    loop {
        let now = Instant::now();
        if now >= tick {
            per_second.push(echoed - echoed_at_tick);
            echoed_at_tick = echoed;
            tick += Duration::from_secs(1);
            if per_second.len() == cfg.seconds as usize {
                break;
            }
        }
        if let Some(pace) = cfg.pace {
            // Echoes first, as a worker reaps before it sends; then what
            // fell due, in full batches; then sleep until the next round.
            loop {
                let n = recv.recv(fd).unwrap_or(0);
                echoed += n as u64;
                if n < BATCH {
                    break;
                }
            }
            let due = (pace.rate * now.duration_since(start).as_secs_f64()) as u64;
            while sent < due {
                while sent + (send.pending() as u64) < due && !send.is_full() {
                    let dest = layout.addr(next % cfg.contacts);
                    next += 1;
                    send.push(
                        &payloads[(next % payloads.len() as u64) as usize],
                        &dest,
                        None,
                    );
                }
                let out = send.send(fd, |_, _| {}).sent as u64;
                if out == 0 {
                    break; // the socket is full: the rest next round
                }
                sent += out;
            }
            next_round += pace.round;
            let now = Instant::now();
            if next_round > now {
                std::thread::sleep(next_round - now);
            } else {
                next_round = now;
            }
            continue;
        }
        let in_flight = (sent + send.pending() as u64).saturating_sub(echoed + lost);
        let mut room = (cfg.window as u64).saturating_sub(in_flight);
        while room > 0 && !send.is_full() {
            let dest = layout.addr(next % cfg.contacts);
            next += 1;
            let payload = &payloads[(next % payloads.len() as u64) as usize];
            send.push(payload, &dest, None);
            room -= 1;
        }
        if send.pending() > 0 {
            sent += send.send(fd, |_, _| {}).sent as u64;
        }
        let n = recv.recv(fd).unwrap_or(0) as u64;
        echoed += n;
        if n > 0 {
            last_progress = now;
        } else if now.duration_since(last_progress) > Duration::from_millis(STALL_MS) {
            lost += sent.saturating_sub(echoed + lost);
            last_progress = now;
        }
    }
    let sender_cpu_us_per_round_trip = match (sender_ns0, thread_cpu_ns()) {
        (Some(t0), Some(t1)) if echoed > 0 => {
            Some(t1.saturating_sub(t0) as f64 / 1e3 / echoed as f64)
        }
        _ => None,
    };
    let drain_end = Instant::now() + Duration::from_millis(DRAIN_MS);
    while Instant::now() < drain_end {
        let n = recv.recv(fd).unwrap_or(0) as u64;
        echoed += n;
        if n == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let lost = sent.saturating_sub(echoed);
    let responder_cpu_s = child.cpu_s();
    let responder: Option<serde_json::Value> = serde_json::from_str(child.finish().trim()).ok();
    let answered = responder.as_ref().and_then(|r| r["answered"].as_u64());
    let responder_answered_per_cpu_s = match (answered, responder_cpu_s) {
        (Some(a), Some(cpu)) if cpu > 0.0 => Some((a as f64 / cpu) as u64),
        _ => None,
    };

    let mut sorted = per_second.clone();
    sorted.sort_unstable();
    Ok(CeilingReport {
        contacts: cfg.contacts,
        seconds: cfg.seconds,
        size: buf_len,
        window: cfg.window,
        sip: cfg.sip,
        pace: cfg.pace,
        round_trips_per_s: sorted[sorted.len() / 2],
        min_per_s: sorted[0],
        max_per_s: sorted[sorted.len() - 1],
        per_second,
        sent,
        echoed,
        lost,
        responder_cpu_s,
        sender_cpu_us_per_round_trip,
        responder_answered_per_cpu_s,
        responder,
    })
}

/// Contact `i`'s OPTIONS in kaping's template shape (DESIGN §2), with a
/// fixed-width token derived from `i`. Setup only: it allocates.
fn sip_request(layout: &Layout, i: u64, local_port: u16) -> Vec<u8> {
    let mut uri = Vec::new();
    push_uri(&mut uri, layout, i);
    let uri = String::from_utf8(uri).expect("ASCII URI");
    let token = format!("LGEN{i:024}");
    format!(
        "OPTIONS {uri} SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:{local_port};branch=z9hG4bK{token}\r\n\
Max-Forwards: 70\r\n\
From: <sip:kaping@127.0.0.1>;tag={token}\r\n\
To: <sip:u{i}@example.com>\r\n\
Call-ID: {token}@127.0.0.1\r\n\
CSeq: 0000000001 OPTIONS\r\n\
Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}
