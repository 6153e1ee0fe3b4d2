//! `kaping-loadgen dmq-bench`: what following a registrar over DMQ costs
//! kaping (DESIGN §11), with this program as the Kamailio node.
//!
//! The bench binds a DMQ node of its own and starts `kaping run --dmq ...
//! --dmq-peer <the bench>`. It answers kaping's join with its node list,
//! and kaping's sync request with `--contacts` records in KDMQ messages of
//! `--batch` records each (`{"multi":{...}}`, as dmq_usrloc's
//! `batch_msg_contacts` makes them), at most `--window` unanswered at once
//! (Kamailio's tm sends them asynchronously and retransmits from 500 ms),
//! then answers the sync request. Then it sends `--rate` new registrations
//! per second (one record per KDMQ, as live changes come) for `--seconds`.
//!
//! Measured, from kaping's shared memory (the contacts its workers hold,
//! sampled every millisecond) and `/proc`: the full sync's duration and
//! kaping's CPU over it, per contact; in the live phase, the lag from
//! each change leaving the bench to its contact being held by a worker
//! (median, p99, max), and kaping's CPU per change.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use kaping::registrar::dmq::{self, RequestSpec};
use kaping::shm::layout::Counter;
use kaping::shm::reader::ShmReader;
use kaping::sim::contacts::contact_uri;
use serde::Serialize;

use crate::bench::{cpu_ticks, free_ports, kaping_binary, Guarded, TempDir, USER_HZ};

pub struct DmqBenchConfig {
    pub contacts: u64,
    pub batch: usize,
    pub window: usize,
    pub rate: u64,
    pub seconds: u64,
    pub workers: u32,
    pub kaping: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct DmqBenchReport {
    pub contacts: u64,
    pub batch: usize,
    pub workers: u32,
    pub sync_s: f64,
    pub sync_contacts_per_s: f64,
    pub sync_cpu_us_per_contact: f64,
    pub live_rate: u64,
    pub live_changes: u64,
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    pub live_cpu_us_per_change: f64,
}

/// The `p` quantile (0..=1) of sorted values; `None` when empty.
pub(crate) fn sorted_percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    Some(sorted[((sorted.len() as f64 * p) as usize).min(last)])
}

/// Contacts held by kaping's workers (every state), from shm.
pub(crate) fn held(shm: &ShmReader) -> u64 {
    (0..shm.header().workers)
        .map(|w| {
            let c = shm.counters(w);
            [
                Counter::ContactsUnknown,
                Counter::ContactsUp,
                Counter::ContactsDown,
                Counter::ContactsUnmonitored,
            ]
            .iter()
            .map(|k| c[k.index()])
            .sum::<u64>()
        })
        .sum()
}

struct Peer {
    sock: UdpSocket,
    me: SocketAddr,
    kaping: SocketAddr,
    next: u32,
    out: Vec<u8>,
    buf: Vec<u8>,
}

impl Peer {
    fn send(&mut self, body: &[u8]) -> String {
        self.next += 1;
        let call_id = format!("bench-{}", self.next);
        self.out.clear();
        dmq::write_request(
            &RequestSpec {
                channel: dmq::CHANNEL_USRLOC,
                target: self.kaping,
                local: self.me,
                branch: &format!("b{}", self.next),
                call_id: &call_id,
                from_tag: "bench",
                cseq: self.next,
                body,
                content_type: dmq::CONTENT_TYPE_JSON,
                max_forwards: 1,
            },
            &mut self.out,
        );
        let _ = self.sock.send_to(&self.out, self.kaping);
        call_id
    }

    /// Handles one datagram from kaping: answers its requests (join: our
    /// node list; sync request: remembered), counts its responses.
    /// Returns (responses seen, a sync request's bytes if one came).
    fn poll(&mut self, wait: Duration) -> (usize, Option<Vec<u8>>) {
        let _ = self
            .sock
            .set_read_timeout(Some(wait.max(Duration::from_micros(100))));
        let Ok((n, from)) = self.sock.recv_from(&mut self.buf) else {
            return (0, None);
        };
        let bytes = self.buf[..n].to_vec();
        let Ok(m) = dmq::parse_message(&bytes) else {
            return (0, None);
        };
        if m.status().is_some() {
            return (1, None);
        }
        let mut sync = None;
        self.out.clear();
        match m.channel() {
            Some(dmq::CHANNEL_NOTIFICATION) => {
                // The join: 200 with the node list as the body.
                let list = format!("{}{}", dmq::join_body(from), dmq::join_body(self.me));
                let mut resp = Vec::new();
                dmq::write_response(&m, 200, "OK", "benchtag", &mut resp);
                let text = String::from_utf8_lossy(&resp).replace(
                    "Content-Length: 0\r\n\r\n",
                    &format!(
                        "Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{list}",
                        list.len()
                    ),
                );
                self.out.extend_from_slice(text.as_bytes());
            }
            _ => {
                if m.body == kaping::registrar::usrloc::sync_request_body() {
                    sync = Some(bytes.clone());
                } else {
                    dmq::write_response(&m, 200, "OK", "benchtag", &mut self.out);
                }
            }
        }
        if !self.out.is_empty() {
            let _ = self.sock.send_to(&self.out, from);
        }
        (0, sync)
    }
}

fn record(i: u64, port: u16, expires: u64) -> String {
    let uri = contact_uri(i, port, 1, false);
    format!(
        "{{\"action\":1,\"aor\":\"u{i}\",\"ruid\":\"bench-{i}\",\"c\":\"{uri}\",\"received\":\"\",\
         \"path\":\"\",\"callid\":\"c{i}\",\"user_agent\":\"bench\",\"instance\":\"\",\"expires\":{expires},\
         \"cseq\":1,\"flags\":0,\"cflags\":0,\"q\":-1,\"last_modified\":0,\"methods\":4294967295,\
         \"reg_id\":0,\"server_id\":0}}"
    )
}

pub fn run(cfg: &DmqBenchConfig) -> Result<DmqBenchReport, String> {
    let kaping = kaping_binary(cfg.kaping.as_deref())?;
    let dir = TempDir::create(None)?;
    let (contact_port, base) = free_ports(3)?;
    let me: SocketAddr = format!("127.0.0.1:{base}").parse().expect("addr");
    let node: SocketAddr = format!("127.0.0.1:{}", base + 1).parse().expect("addr");
    let sock = UdpSocket::bind(me).map_err(|e| format!("cannot bind {me}: {e}"))?;
    let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(16 << 20);
    let mut peer = Peer {
        sock,
        me,
        kaping: node,
        next: 0,
        out: Vec::new(),
        buf: vec![0u8; 65_536],
    };
    let shm_path = dir.0.join("kaping.shm");
    let total = cfg.contacts + cfg.rate * cfg.seconds;
    let mut run = Command::new(&kaping);
    run.args([
        "run",
        "--allow-destinations",
        "127.0.0.0/8,::1/128",
        "--shm",
    ])
    .arg(&shm_path)
    .args([
        "--dmq",
        &format!("sip:{node}"),
        "--dmq-peer",
        &format!("sip:{me}"),
    ])
    .args(["--bind", &format!("127.0.0.1:{}", base + 2)])
    .args(["--workers", &cfg.workers.to_string()])
    .args(["--max-contacts", &(total + 1024).to_string()])
    // Pings are not what is measured: one an hour.
    .args([
        "--interval",
        "3600s",
        "--events",
        "none",
        "--instance",
        "dmqbench",
    ])
    .args(["--run-for", &format!("{}s", 600 + cfg.seconds)]);
    let mut daemon = Guarded::spawn("daemon", run)?;
    let pid = daemon.pid();
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3600;

    // Join, then the sync request.
    let deadline = Instant::now() + Duration::from_secs(30);
    let sync_req = loop {
        if Instant::now() > deadline {
            daemon.check_alive()?;
            return Err("kaping sent no sync request within 30 s".into());
        }
        if let (_, Some(s)) = peer.poll(Duration::from_millis(50)) {
            break s;
        }
    };
    let shm = ShmReader::open(&shm_path).map_err(|e| format!("cannot open the shm: {e}"))?;

    // The full sync: batches, a window of unanswered ones.
    let cpu0 = cpu_ticks(pid).ok_or("cannot read kaping's CPU")?;
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut outstanding = 0usize;
    while sent < cfg.contacts {
        while outstanding >= cfg.window {
            let (r, _) = peer.poll(Duration::from_millis(5));
            outstanding = outstanding.saturating_sub(r);
            if t0.elapsed() > Duration::from_secs(600) {
                return Err("the sync stalled".into());
            }
        }
        let n = (cfg.batch as u64).min(cfg.contacts - sent) as usize;
        let mut body = String::from("{\"multi\":{");
        for k in 0..n {
            if k > 0 {
                body.push(',');
            }
            body.push_str(&format!(
                "\"{}\":{}",
                k + 1,
                record(sent + k as u64, contact_port, expires)
            ));
        }
        body.push_str("}}");
        peer.send(body.as_bytes());
        sent += n as u64;
        outstanding += 1;
        let (r, _) = peer.poll(Duration::ZERO);
        outstanding = outstanding.saturating_sub(r);
    }
    // Sync complete: answer kaping's sync request.
    if let Ok(m) = dmq::parse_message(&sync_req) {
        let mut resp = Vec::new();
        dmq::write_response(&m, 200, "OK", "benchtag", &mut resp);
        let _ = peer.sock.send_to(&resp, node);
    }
    while held(&shm) < cfg.contacts {
        let _ = peer.poll(Duration::from_millis(1));
        if t0.elapsed() > Duration::from_secs(600) {
            return Err(format!(
                "kaping holds {} of {} after 600 s",
                held(&shm),
                cfg.contacts
            ));
        }
    }
    let sync_s = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks(pid).ok_or("cannot read kaping's CPU")?;
    let sync_cpu_s = (cpu1 - cpu0) as f64 / USER_HZ as f64;

    // Live changes at `rate`: each a new contact; its lag is the time until
    // kaping holds it (sampled every millisecond).
    thread::sleep(Duration::from_millis(500));
    let base_held = held(&shm);
    let cpu2 = cpu_ticks(pid).ok_or("cannot read kaping's CPU")?;
    let n = cfg.rate * cfg.seconds;
    let mut sent_at: Vec<Instant> = Vec::with_capacity(n as usize);
    let mut lags: Vec<f64> = Vec::with_capacity(n as usize);
    let start = Instant::now();
    let gap = Duration::from_secs(1).as_secs_f64() / cfg.rate.max(1) as f64;
    let mut i = 0u64;
    while (lags.len() as u64) < n {
        let now = Instant::now();
        while i < n && start + Duration::from_secs_f64(i as f64 * gap) <= now {
            peer.send(record(cfg.contacts + i, contact_port, expires).as_bytes());
            sent_at.push(Instant::now());
            i += 1;
        }
        let _ = peer.poll(Duration::from_micros(200));
        let have = held(&shm).saturating_sub(base_held);
        let t = Instant::now();
        while (lags.len() as u64) < have.min(i) {
            let k = lags.len();
            lags.push(t.duration_since(sent_at[k]).as_secs_f64() * 1000.0);
        }
        if start.elapsed() > Duration::from_secs(cfg.seconds + 60) {
            return Err(format!("{} of {n} live changes applied", lags.len()));
        }
    }
    let cpu3 = cpu_ticks(pid).ok_or("cannot read kaping's CPU")?;
    daemon.stop(true);
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| sorted_percentile(&lags, p).unwrap_or(0.0);
    Ok(DmqBenchReport {
        contacts: cfg.contacts,
        batch: cfg.batch,
        workers: cfg.workers,
        sync_s,
        sync_contacts_per_s: cfg.contacts as f64 / sync_s,
        sync_cpu_us_per_contact: sync_cpu_s * 1e6 / cfg.contacts.max(1) as f64,
        live_rate: cfg.rate,
        live_changes: n,
        lag_p50_ms: pct(0.5),
        lag_p99_ms: pct(0.99),
        lag_max_ms: *lags.last().unwrap_or(&0.0),
        live_cpu_us_per_change: (cpu3 - cpu2) as f64 / USER_HZ as f64 * 1e6 / n.max(1) as f64,
    })
}

pub fn print_text(r: &DmqBenchReport, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "full sync: {} contacts in {:.2} s ({:.0}/s, batches of {}), kaping CPU {:.2} us per contact ({} workers)",
        r.contacts, r.sync_s, r.sync_contacts_per_s, r.batch, r.sync_cpu_us_per_contact, r.workers
    )?;
    writeln!(
        out,
        "live: {} changes at {}/s: lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; kaping CPU {:.2} us per change",
        r.live_changes, r.live_rate, r.lag_p50_ms, r.lag_p99_ms, r.lag_max_ms, r.live_cpu_us_per_change
    )
}
