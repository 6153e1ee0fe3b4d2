//! `kaping-loadgen serve` over loopback: responses, source addresses, fates
//! agreeing with `contacts --fates`, noise options, raw echo, counters, stop.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_kaping-loadgen");

/// A running responder, stopped (stdin closed, then killed) on drop.
struct Server {
    child: Child,
    stdout: Option<ChildStdout>,
    addrs: Vec<SocketAddr>,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        Self::try_start(args).expect("serve did not start")
    }

    fn try_start(args: &[&str]) -> Result<Server, String> {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .args(["--stop-on-stdin-eof", "--json", "--seconds", "60"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut addrs = Vec::new();
        loop {
            let mut line = String::new();
            if err.read_line(&mut line).unwrap() == 0 {
                let _ = child.wait();
                return Err(format!("serve exited: {line}"));
            }
            let l = line.trim();
            if let Some(a) = l.strip_prefix("listening ") {
                addrs.push(a.parse().unwrap());
            } else if l == "ready" {
                break;
            } else if l.contains("error") {
                let _ = child.wait();
                return Err(l.to_string());
            }
        }
        let stdout = child.stdout.take();
        Ok(Server {
            child,
            stdout,
            addrs,
        })
    }

    fn port(&self) -> u16 {
        self.addrs[0].port()
    }

    /// Closes stdin and returns the counters JSON it prints.
    fn stop(mut self) -> serde_json::Value {
        drop(self.child.stdin.take());
        let mut out = String::new();
        self.stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "serve failed: {status}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

/// kaping's template shape (INTERFACES.md, src/wire/template.rs), by hand.
fn options(uri: &str, local: SocketAddr, token: &str, cseq: u32, aor: &str) -> String {
    format!(
        "OPTIONS {uri} SIP/2.0\r\n\
Via: SIP/2.0/UDP {local};branch=z9hG4bK{token}\r\n\
Max-Forwards: 70\r\n\
From: <sip:kaping@{ip}>;tag={token}\r\n\
To: <{aor}>\r\n\
Call-ID: {token}@{ip}\r\n\
CSeq: {cseq:010} OPTIONS\r\n\
Content-Length: 0\r\n\r\n",
        ip = local.ip()
    )
}

/// A 28-character token-alphabet string unique to `i`.
fn token(i: u32) -> String {
    format!("KPNGaaaaaaaaaaaaaaaa{i:08}")
}

/// Receives datagrams until `quiet` passes without one.
fn collect(sock: &UdpSocket, quiet: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let mut last = Instant::now();
    while last.elapsed() < quiet {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            got.push((buf[..n].to_vec(), from));
            last = Instant::now();
        }
    }
    got
}

fn header<'a>(resp: &'a str, name: &str) -> Vec<&'a str> {
    resp.split("\r\n")
        .filter_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(": ")))
        .collect()
}

#[test]
fn answers_kaping_options_from_the_pinged_address() {
    let server = Server::start(&["--listen", "0.0.0.0:0"]);
    let port = server.port();
    let sock = client();
    let local = sock.local_addr().unwrap();
    let mut tags = Vec::new();
    for (i, target) in ["127.0.0.6", "127.3.2.1", "127.0.0.6"].iter().enumerate() {
        let dest: SocketAddr = format!("{target}:{port}").parse().unwrap();
        let uri = format!("sip:u5@{dest}");
        let tok = token(i as u32);
        let req = options(&uri, local, &tok, 42 + i as u32, "sip:u5@example.com");
        sock.send_to(req.as_bytes(), dest).unwrap();
        let mut buf = [0u8; 4096];
        let (n, from) = sock.recv_from(&mut buf).expect("a response");
        assert_eq!(from, dest, "reply leaves from the pinged address");
        let resp = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(resp.starts_with("SIP/2.0 200 OK\r\n"), "{resp}");
        assert!(resp.ends_with("\r\nContent-Length: 0\r\n\r\n"), "{resp}");
        assert_eq!(
            header(resp, "Via"),
            [format!("SIP/2.0/UDP {local};branch=z9hG4bK{tok}")]
        );
        assert_eq!(
            header(resp, "From"),
            [format!("<sip:kaping@127.0.0.1>;tag={tok}")]
        );
        assert_eq!(header(resp, "Call-ID"), [format!("{tok}@127.0.0.1")]);
        assert_eq!(header(resp, "CSeq"), [format!("{:010} OPTIONS", 42 + i)]);
        assert_eq!(header(resp, "Content-Length"), ["0"]);
        let to = header(resp, "To");
        assert_eq!(to.len(), 1);
        let tag = to[0]
            .strip_prefix("<sip:u5@example.com>;tag=")
            .unwrap_or_else(|| panic!("To {:?}", to[0]));
        assert_eq!(tag.len(), 16);
        tags.push(tag.to_string());
    }
    assert_eq!(tags[0], tags[2], "the To tag is stable per contact");
    assert_ne!(tags[0], tags[1], "and differs between contacts");

    // rport (RFC 3581) and a foreign sent-by get received=/rport= filled in.
    let dest: SocketAddr = format!("127.0.0.9:{port}").parse().unwrap();
    let req = "OPTIONS sip:x@127.0.0.9 SIP/2.0\r\nv: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKr;rport\r\n\
f: <sip:a@b>;tag=1\r\nt: <sip:x@b>\r\ni: c1\r\nCSeq: 7 OPTIONS\r\n\r\n";
    sock.send_to(req.as_bytes(), dest).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let resp = std::str::from_utf8(&buf[..n]).unwrap();
    assert_eq!(
        header(resp, "Via"),
        [format!(
            "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKr;rport={};received=127.0.0.1",
            local.port()
        )]
    );

    // Garbage and responses are counted, not answered.
    sock.send_to(b"\x00\x01garbage", dest).unwrap();
    sock.send_to(b"SIP/2.0 200 OK\r\n\r\n", dest).unwrap();
    assert!(collect(&sock, Duration::from_millis(300)).is_empty());
    let c = server.stop();
    assert_eq!(c["received"], 6);
    assert_eq!(c["answered"], 4);
    assert_eq!(c["unparsable"], 2);
}

#[test]
fn fates_agree_with_the_contacts_file() {
    const N: u32 = 400;
    const PERIOD_MS: u64 = 3_600_000;
    let fate_args = [
        "--seed",
        "77",
        "--dead",
        "0.2",
        "--error",
        "0.15",
        "--error-code",
        "486",
        "--flap",
        "0.1",
        "--flap-period",
        "1h",
    ];
    let mut args = vec!["--listen", "0.0.0.0:0", "--threads", "2"];
    args.extend_from_slice(&fate_args);
    let server = Server::start(&args);
    let port = server.port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let fates_path = dir.path().join("fates.tsv");
    let mut cargs = vec![
        "contacts",
        "--count",
        "400",
        "--port",
        &port,
        "--fates",
        fates_path.to_str().unwrap(),
    ];
    cargs.extend_from_slice(&fate_args);
    let out = Command::new(BIN).args(&cargs).output().unwrap();
    assert!(out.status.success());
    let fates = std::fs::read_to_string(&fates_path).unwrap();

    let sock = client();
    let local = sock.local_addr().unwrap();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // uri -> expected code (None: silent); flapping contacts near a period
    // boundary are skipped, their state could change during the test.
    let mut expected: HashMap<u32, Option<u16>> = HashMap::new();
    let mut sent = 0u64;
    // Read concurrently: 400 replies overflow a default receive buffer.
    let reader = {
        let sock = sock.try_clone().unwrap();
        std::thread::spawn(move || collect(&sock, Duration::from_millis(700)))
    };
    for (i, line) in fates.lines().enumerate() {
        let (uri, fate) = line.split_once('\t').unwrap();
        let want = match fate {
            "ok" => Some(200),
            "dead" => None,
            "error:486" => Some(486),
            f => {
                let phase: u64 = f.strip_prefix("flap:").unwrap().parse().unwrap();
                let into = (now_ms + phase) % PERIOD_MS;
                if !(10_000..PERIOD_MS - 10_000).contains(&into) {
                    continue;
                }
                ((now_ms + phase) / PERIOD_MS)
                    .is_multiple_of(2)
                    .then_some(200)
            }
        };
        expected.insert(i as u32, want);
        let dest: SocketAddr = uri.rsplit_once('@').unwrap().1.parse().unwrap();
        let req = options(uri, local, &token(i as u32), 1, "sip:someone@example.com");
        sock.send_to(req.as_bytes(), dest).unwrap();
        sent += 1;
        if i % 64 == 63 {
            std::thread::sleep(Duration::from_millis(2)); // stay inside the socket buffers
        }
    }
    let mut got: HashMap<u32, u16> = HashMap::new();
    for (data, _) in reader.join().unwrap() {
        let resp = String::from_utf8(data).unwrap();
        let code: u16 = resp[8..11].parse().unwrap();
        let call_id = header(&resp, "Call-ID")[0];
        let i: u32 = call_id[20..28].parse().unwrap();
        assert!(got.insert(i, code).is_none(), "one reply per request");
    }
    let mut kinds = [0; 3];
    for (i, want) in &expected {
        assert_eq!(got.get(i).copied(), *want, "contact {i}");
        kinds[match want {
            None => 0,
            Some(200) => 1,
            _ => 2,
        }] += 1;
    }
    assert!(
        kinds.iter().all(|&k| k > 20),
        "every fate exercised: {kinds:?}"
    );
    assert!(expected.len() as u32 > N - 20);
    // Contacts skipped above (flapping near a period boundary) were never
    // sent, so the responder saw `sent`, not N, requests.
    assert_eq!(sent, expected.len() as u64);
    let c = server.stop();
    assert_eq!(c["received"], sent);
    assert_eq!(c["answered"], got.len() as u64);
    assert_eq!(c["errors_sent"], kinds[2] as u64);
    assert_eq!(
        c["dead_dropped"].as_u64().unwrap() + c["flap_silent"].as_u64().unwrap(),
        sent - got.len() as u64
    );
}

#[test]
fn raw_echo_echoes_from_the_pinged_address() {
    let server = Server::start(&["--listen", "0.0.0.0:0", "--raw-echo"]);
    let port = server.port();
    let sock = client();
    for (i, ip) in ["127.0.0.1", "127.44.1.200"].iter().enumerate() {
        let dest: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let payload = format!("not sip at all {i}");
        sock.send_to(payload.as_bytes(), dest).unwrap();
        let mut buf = [0u8; 256];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], payload.as_bytes());
        assert_eq!(from, dest);
    }
    let c = server.stop();
    assert_eq!(
        (c["received"].as_u64(), c["answered"].as_u64()),
        (Some(2), Some(2))
    );
}

#[test]
fn duplicates_malformed_loss_and_latency() {
    let sock = client();
    let local = sock.local_addr().unwrap();
    let send_n = |port: u16, n: u32| {
        for i in 0..n {
            let dest: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
            let req = options("sip:u1@127.0.0.2", local, &token(i), i, "sip:u1@x");
            sock.send_to(req.as_bytes(), dest).unwrap();
        }
    };

    let s = Server::start(&["--listen", "0.0.0.0:0", "--duplicate", "1"]);
    send_n(s.port(), 10);
    assert_eq!(collect(&sock, Duration::from_millis(300)).len(), 20);
    let c = s.stop();
    assert_eq!(
        (c["answered"].as_u64(), c["duplicates"].as_u64()),
        (Some(10), Some(10))
    );

    let s = Server::start(&["--listen", "0.0.0.0:0", "--malformed", "1"]);
    send_n(s.port(), 40);
    let got = collect(&sock, Duration::from_millis(300));
    assert_eq!(got.len(), 40);
    for (data, _) in &got {
        let text = String::from_utf8_lossy(data);
        let well_formed = text.ends_with("\r\n\r\n")
            && text.contains("\r\nFrom: <sip:kaping@127.0.0.1>;tag=KPNGaaaa");
        assert!(!well_formed, "a malformed reply is broken: {text:?}");
    }
    assert_eq!(s.stop()["malformed_sent"], 40);

    let s = Server::start(&["--listen", "0.0.0.0:0", "--loss", "1"]);
    send_n(s.port(), 10);
    assert!(collect(&sock, Duration::from_millis(300)).is_empty());
    assert_eq!(s.stop()["lost"], 10);

    let s = Server::start(&[
        "--listen",
        "0.0.0.0:0",
        "--latency",
        "80ms",
        "--latency-dist",
        "uniform:0ms..20ms",
    ]);
    let t0 = Instant::now();
    send_n(s.port(), 5);
    let mut buf = [0u8; 2048];
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for _ in 0..5 {
        sock.recv_from(&mut buf).expect("a delayed reply");
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(80), "{waited:?}");
        assert!(waited < Duration::from_millis(1000), "{waited:?}");
    }
    assert_eq!(s.stop()["delayed"], 5);
}

#[test]
fn several_ports_and_threads() {
    // Three consecutive free ports: try a few bases below the ephemeral
    // range (32768..), so no other test's port-0 responder can be joined
    // through SO_REUSEPORT (same user, same port: the kernel allows it).
    let mut server = None;
    for attempt in 0..20u16 {
        let base = 20000 + (std::process::id() % 10000) as u16 + attempt * 7;
        let spec = format!("0.0.0.0:{base}-{}", base + 2);
        if let Ok(s) = Server::try_start(&["--listen", &spec, "--threads", "2"]) {
            server = Some(s);
            break;
        }
    }
    let server = server.expect("three free ports");
    assert_eq!(server.addrs.len(), 3);
    let sock = client();
    let local = sock.local_addr().unwrap();
    for round in 0..3 {
        for (k, a) in server.addrs.iter().enumerate() {
            let dest: SocketAddr = format!("127.0.{k}.{}:{}", 10 + round, a.port())
                .parse()
                .unwrap();
            let req = options(
                &format!("sip:p{k}@{dest}"),
                local,
                &token(k as u32),
                1,
                "sip:p@x",
            );
            sock.send_to(req.as_bytes(), dest).unwrap();
            let mut buf = [0u8; 2048];
            let (_, from) = sock.recv_from(&mut buf).expect("reply on every port");
            assert_eq!(from, dest);
        }
        std::thread::sleep(Duration::from_millis(150)); // let the threads go idle
    }
    assert_eq!(server.stop()["answered"], 9);
}

#[test]
fn seconds_stops_it_and_prints_text_counters() {
    let t0 = Instant::now();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--seconds",
            "0.5",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for name in [
        "received",
        "answered",
        "dead_dropped",
        "lost",
        "errors_sent",
        "malformed_sent",
        "duplicates",
        "unparsable",
    ] {
        assert!(
            text.lines().any(|l| l == format!("{name} 0")),
            "{name} in {text}"
        );
    }
}

/// Runs `kaping-loadgen ARGS --json`, which must succeed; its report.
fn loadgen_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN).args(args).arg("--json").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ceiling_json(args: &[&str]) -> serde_json::Value {
    loadgen_json(&[&["ceiling"], args].concat())
}

/// Runs `kaping-loadgen ARGS`, which must fail and name `option` in its
/// error.
fn refused(args: &[&str], option: &str) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(option), "{args:?}: {err}");
}

#[test]
fn ceiling_reports_a_rate() {
    let r = ceiling_json(&["--contacts", "1000", "--seconds", "1", "--size", "200"]);
    assert!(r["round_trips_per_s"].as_u64().unwrap() > 1000, "{r}");
    assert!(r["echoed"].as_u64().unwrap() > 0);
    assert_eq!(r["responder"]["answered"], r["responder"]["received"]);
}

/// Paced, the raw sender keeps to the rate asked (not flat out), in the
/// rounds asked, and reports its CPU per round trip; one of the two options
/// alone is refused.
#[test]
fn ceiling_paces_the_raw_sender_in_rounds() {
    let r = ceiling_json(&[
        "--contacts",
        "1000",
        "--seconds",
        "2",
        "--size",
        "200",
        "--rate",
        "2000",
        "--round",
        "20ms",
    ]);
    assert_eq!(r["pace"]["rate"], 2000.0, "{r}");
    assert_eq!(r["pace"]["round"], 0.02, "{r}");
    // 2,000 a second, not the hundreds of thousands flat out; the first
    // second may start late by a round.
    let rate = r["round_trips_per_s"].as_u64().unwrap();
    assert!((1800..=2200).contains(&rate), "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert!(
        r["sender_cpu_us_per_round_trip"].as_f64().unwrap() > 0.0,
        "{r}"
    );

    refused(&["ceiling", "--seconds", "1", "--rate", "2000"], "--round");
}

/// `wake-cost` sleeps each length the number of times that fills the time
/// asked, both ways, and reports a CPU cost and a lateness for each; a
/// length of 0 is refused with the option named.
#[test]
fn wake_cost_measures_each_sleep_length() {
    let r = loadgen_json(&["wake-cost", "--sleeps", "1ms,5ms", "--seconds", "0.05"]);
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{r}");
    for (row, (ms, count)) in rows.iter().zip([(1.0, 50), (5.0, 10)]) {
        assert_eq!(row["sleep_ms"], ms, "{r}");
        assert_eq!(row["count"], count, "{r}");
        for k in ["nanosleep_cpu_us", "worker_cpu_us"] {
            assert!(row[k].as_f64().unwrap() > 0.0, "{k}: {r}");
        }
        for k in ["nanosleep_overshoot_us", "worker_overshoot_us"] {
            assert!(row[k].as_f64().unwrap() >= 0.0, "{k}: {r}");
        }
    }
    refused(&["wake-cost", "--sleeps", "1ms,0"], "--sleeps");
}

#[test]
fn ceiling_drives_the_sip_responder() {
    let r = ceiling_json(&["--sip", "--contacts", "500", "--seconds", "1"]);
    assert!(r["round_trips_per_s"].as_u64().unwrap() > 1000, "{r}");
    assert_eq!(r["responder"]["unparsable"], 0, "{r}");
    assert_eq!(r["responder"]["answered"], r["responder"]["received"]);
}

#[test]
fn answers_over_ipv6() {
    let Ok(sock) = UdpSocket::bind("[::1]:0") else {
        eprintln!("SKIP: no IPv6 loopback on this machine");
        return;
    };
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let server = Server::start(&["--listen", "[::]:0"]);
    let dest: SocketAddr = format!("[::1]:{}", server.port()).parse().unwrap();
    let local = sock.local_addr().unwrap();
    let req = options(&format!("sip:u0@{dest}"), local, &token(1), 1, "sip:u0@x");
    sock.send_to(req.as_bytes(), dest).unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).expect("a response over IPv6");
    assert_eq!(from, dest);
    let resp = std::str::from_utf8(&buf[..n]).unwrap();
    assert!(resp.starts_with("SIP/2.0 200 OK\r\n"), "{resp}");
    assert_eq!(
        header(resp, "Via"),
        [format!("SIP/2.0/UDP {local};branch=z9hG4bK{}", token(1))],
        "same host as the source: no received="
    );
    assert_eq!(server.stop()["answered"], 1);
}

#[test]
fn sigterm_and_sigint_stop_it_with_a_counter_report() {
    for signal in ["-TERM", "-INT"] {
        let mut server = Server::start(&["--listen", "127.0.0.1:0"]);
        let sock = client();
        let dest = server.addrs[0];
        let req = options(
            "sip:u1@127.0.0.1",
            sock.local_addr().unwrap(),
            &token(1),
            1,
            "sip:u1@x",
        );
        sock.send_to(req.as_bytes(), dest).unwrap();
        let mut buf = [0u8; 2048];
        sock.recv_from(&mut buf).expect("a response");
        // stdin stays open: only the signal can stop it.
        let pid = server.child.id().to_string();
        let t0 = Instant::now();
        let kill = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(kill.success());
        let mut out = String::new();
        server
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let status = server.child.wait().unwrap();
        assert!(status.success(), "{signal}: {status}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        let c: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(
            (c["received"].as_u64(), c["answered"].as_u64()),
            (Some(1), Some(1))
        );
    }
}
