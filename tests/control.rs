//! The control socket and durable state, end to end over loopback: a
//! `kaping run --control --state-dir` daemon pinging contacts that
//! `kaping-loadgen serve` answers, driven through raw JSON-RPC 2.0 over the
//! UNIX socket.
//!
//! - every method, batches, notifications and each error code;
//! - the socket's own rules: mode 0660, a stale socket replaced, a live
//!   one or a non-socket refused, bounded request size and connections;
//! - subscriptions stream state changes;
//! - durability: contacts acknowledged and then `kill -9` at random moments
//!   are all present after a restart, with the liveness of the last
//!   snapshot; a torn final journal record is ignored with a warning; a
//!   corrupt snapshot is refused with a clear error; a restart spreads the
//!   first pings over the interval;
//! - SIGHUP applies live settings and names those needing a restart.
//!
//! Serialized (the machine has two cores), bounded in time, loopback only.

mod common;
use common::free_ports;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kaping::shm::layout::Counter;
use kaping::shm::reader::ShmReader;
use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A JSON-RPC connection.
struct Rpc {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Rpc {
    fn connect(path: &Path) -> Rpc {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Rpc {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
            next_id: 1,
        }
    }

    fn send_raw(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
    }

    /// The next line, parsed; `None` at end of stream.
    fn read(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))),
            Err(e) => panic!("read: {e}"),
        }
    }

    /// A call; `Ok(result)` or `Err(error object)`.
    fn call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        self.send_raw(
            &json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string(),
        );
        let r = self.read().expect("a response");
        assert_eq!(r["jsonrpc"], "2.0");
        assert_eq!(r["id"], id, "{r}");
        match r.get("error") {
            Some(e) => Err(e.clone()),
            None => Ok(r["result"].clone()),
        }
    }

    fn code(&mut self, method: &str, params: Value) -> i64 {
        let e = self.call(method, params).expect_err("an error");
        assert!(
            e["message"].as_str().is_some_and(|m| m.len() > 10),
            "a clear message: {e}"
        );
        e["code"].as_i64().unwrap()
    }

    /// Sends a batch; returns the responses in order.
    fn batch(&mut self, calls: &[(&str, Value)]) -> Vec<Value> {
        let items: Vec<Value> = calls
            .iter()
            .map(|(m, p)| {
                let id = self.next_id;
                self.next_id += 1;
                json!({"jsonrpc": "2.0", "id": id, "method": m, "params": p})
            })
            .collect();
        self.send_raw(&Value::Array(items).to_string());
        match self.read().expect("a batch response") {
            Value::Array(rs) => rs,
            other => panic!("not a batch response: {other}"),
        }
    }

    /// Every contact, following the list cursor.
    fn list_all(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = json!(0);
        loop {
            let page = self
                .call("keepalive.list", json!({"cursor": cursor, "limit": 10000}))
                .unwrap();
            out.extend(page["contacts"].as_array().unwrap().iter().cloned());
            if page["next"].is_null() {
                return out;
            }
            cursor = page["next"].clone();
        }
    }
}

/// A responder and a place for the daemon's files.
struct Lab {
    dir: tempfile::TempDir,
    serve_port: u16,
    serve: Child,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let serve_port = free_ports(1);
        let serve = Command::new(env!("CARGO_BIN_EXE_kaping-loadgen"))
            .args(["serve", "--listen", &format!("0.0.0.0:{serve_port}")])
            .args(["--seconds", "120", "--stop-on-stdin-eof"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        Lab {
            dir,
            serve_port,
            serve,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Distinct answered contact number `i`.
    fn uri(&self, i: u32) -> String {
        format!(
            "sip:u{i}@127.{}.{}.{}:{}",
            (i >> 16) & 0xFF,
            (i >> 8) & 0xFF,
            (i & 0xFF).max(1),
            self.serve_port
        )
    }

    /// `kaping run` on this lab's control socket, 2 unpinned workers.
    fn run_command(&self, shm: &str) -> Command {
        let port = free_ports(2);
        let mut c = Command::new(env!("CARGO_BIN_EXE_kaping"));
        c.arg("run")
            .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
            .arg("--control")
            .arg(self.path("ctl.sock"))
            .arg("--shm")
            .arg(self.path(shm))
            .args(["--bind", &format!("127.0.0.1:{port}")])
            .args(["--workers", "2", "--pin-workers", "false"])
            .args(["--events", "none"]);
        c
    }

    fn daemon(&self, args: &[&str]) -> Daemon {
        let child = self
            .run_command("shm")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child,
            socket: self.path("ctl.sock"),
        };
        d.wait_ready();
        d
    }

    fn durable(&self, args: &[&str]) -> Daemon {
        let state = self.path("state");
        let mut all = vec!["--state-dir", state.to_str().unwrap()];
        all.extend_from_slice(args);
        self.daemon(&all)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.serve.kill();
        let _ = self.serve.wait();
    }
}

struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("daemon exited {status}: {}", self.stderr());
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("control socket never came up");
    }

    fn rpc(&self) -> Rpc {
        Rpc::connect(&self.socket)
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// SIGTERM, waits, returns stderr; panics unless it exits 0.
    fn stop(mut self) -> String {
        self.signal("-TERM");
        let status = wait(&mut self.child, Duration::from_secs(20));
        let err = self.stderr();
        assert!(status.success(), "daemon failed: {err}");
        err
    }

    /// `kill -9`: no chance to write anything more.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "process did not stop in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `kaping run` expecting it to fail at start; returns stderr.
fn fails_to_start(lab: &Lab, args: &[&str]) -> String {
    let out = lab
        .run_command("shm2")
        .args(["--run-for", "3"])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "expected a failure to start");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn every_method_batches_and_errors() {
    let _g = serial();
    let lab = Lab::new();
    // 4 slots per worker, to reach "slab full".
    let d = lab.daemon(&[
        "--max-contacts",
        "8",
        "--interval",
        "1",
        "--reply-timeout",
        "0.5",
    ]);
    let mode = std::fs::metadata(lab.path("ctl.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "socket mode");
    let mut c = d.rpc();
    let a = lab.uri(1);
    let r = c
        .call(
            "keepalive.add",
            json!({"uri": a, "owner": "reg-a", "interval": "2s"}),
        )
        .unwrap();
    assert_eq!(r["status"], "added");
    assert_eq!(r["uri"], a.as_str());
    // Same parameters: unchanged; new parameters: updated, same key.
    let r = c
        .call(
            "keepalive.add",
            json!({"uri": a, "owner": "reg-a", "interval": 2}),
        )
        .unwrap();
    assert_eq!(r["status"], "unchanged");
    let r = c
        .call(
            "keepalive.add",
            json!({"uri": a, "owner": "reg-b", "interval": 2}),
        )
        .unwrap();
    assert_eq!(r["status"], "updated");
    // Positional params; an AoR makes a different key for the same URI.
    let b = lab.uri(2);
    assert_eq!(
        c.call("keepalive.add", json!([b])).unwrap()["status"],
        "added"
    );
    let r = c
        .call("keepalive.add", json!([b, "sip:bob@example.com"]))
        .unwrap();
    assert_eq!(r["status"], "added");
    assert_eq!(r["aor"], "sip:bob@example.com");
    // Let them be pinged.
    std::thread::sleep(Duration::from_millis(2500));
    let g = c.call("keepalive.get", json!({"uri": a})).unwrap();
    assert_eq!(g["state"], "up", "{g}");
    assert_eq!(g["owner"], "reg-b");
    assert_eq!(g["interval_ms"], 2000);
    assert_eq!(g["source"], "control");
    assert!(g["srtt_us"].as_u64().unwrap() > 0 && g["answered"].as_u64().unwrap() >= 1);
    assert!(g["last_reply"].as_str().unwrap().ends_with('Z'));
    let g = c
        .call(
            "keepalive.get",
            json!({"uri": b, "aor": "sip:bob@example.com"}),
        )
        .unwrap();
    assert_eq!(g["aor"], "sip:bob@example.com");
    // list: pages of 1 cover everything once.
    let mut seen = Vec::new();
    let mut cursor = json!(0);
    loop {
        let page = c
            .call("keepalive.list", json!({"cursor": cursor, "limit": 1}))
            .unwrap();
        assert_eq!(page["total"], 3);
        seen.extend(
            page["contacts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["uri"].clone()),
        );
        if page["next"].is_null() {
            break;
        }
        cursor = page["next"].clone();
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    let up = c.call("keepalive.list", json!({"state": "up"})).unwrap();
    assert_eq!(up["contacts"].as_array().unwrap().len(), 3);
    let mine = c.call("keepalive.list", json!({"owner": "reg-b"})).unwrap();
    assert_eq!(mine["contacts"].as_array().unwrap().len(), 1);
    // stats
    let s = c.call("keepalive.stats", json!({})).unwrap();
    assert_eq!(s["contacts"]["total"], 3);
    assert_eq!(s["contacts"]["up"], 3);
    assert!(s["pings"]["matched"].as_u64().unwrap() >= 3);
    assert_eq!(s["pings"]["forged"], 0);
    assert!(s["rtt_us"]["p50"].as_u64().is_some());
    assert_eq!(s["control"]["durable"], false, "no state_dir");

    // Errors, each with its code and a message.
    assert_eq!(c.code("keepalive.nope", json!({})), -32601);
    assert_eq!(c.code("keepalive.add", json!({"url": a})), -32602);
    assert_eq!(c.code("keepalive.add", json!({})), -32602);
    assert_eq!(c.code("keepalive.add", json!({"uri": 7})), -32602);
    assert_eq!(
        c.code("keepalive.add", json!({"uri": a, "interval": "0.001"})),
        -32602
    );
    assert_eq!(c.code("keepalive.list", json!({"limit": 0})), -32602);
    assert_eq!(
        c.code("keepalive.list", json!({"state": "sideways"})),
        -32602
    );
    assert_eq!(c.code("keepalive.add", json!({"uri": "sip:"})), -32001);
    assert_eq!(
        c.code("keepalive.add", json!({"uri": "http://example.com/"})),
        -32001
    );
    assert_eq!(
        c.code(
            "keepalive.add",
            json!({"uri": "sip:a@127.0.0.1:5060;transport=tcp"})
        ),
        -32001
    );
    assert_eq!(
        c.code("keepalive.add", json!({"uri": "sip:a@[::1]:5060"})),
        -32001
    );
    assert_eq!(c.code("keepalive.del", json!({"uri": lab.uri(99)})), -32002);
    assert_eq!(c.code("keepalive.get", json!({"uri": lab.uri(99)})), -32002);
    assert_eq!(
        c.code(
            "keepalive.get",
            json!({"uri": b, "aor": "sip:carol@example.com"})
        ),
        -32002
    );

    // A batch: results in order, one error among them; slab full once the
    // 8 slots (4 per worker) are taken.
    let calls: Vec<(&str, Value)> = (10..50)
        .map(|i| ("keepalive.add", json!({"uri": lab.uri(i)})))
        .collect();
    let rs = c.batch(&calls);
    assert_eq!(rs.len(), 40);
    let added = rs
        .iter()
        .filter(|r| r["result"]["status"] == "added")
        .count();
    let full: Vec<&Value> = rs.iter().filter(|r| r["error"]["code"] == -32003).collect();
    assert_eq!(added, 5, "8 slots, 3 taken");
    assert_eq!(full.len(), 35);
    assert!(full[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("slab full"));
    let ids: Vec<u64> = rs.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "batch order kept");

    // A mixed batch with a notification (no response for it) and an
    // invalid entry (an error in its place).
    c.send_raw(
        &json!([
            {"jsonrpc": "2.0", "method": "keepalive.stats"},
            {"jsonrpc": "2.0", "id": "x", "method": "keepalive.get", "params": [a]},
            {"id": 5}
        ])
        .to_string(),
    );
    let rs = c.read().unwrap();
    let rs = rs.as_array().unwrap();
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0]["id"], "x");
    assert_eq!(rs[1]["error"]["code"], -32600);
    // Only notifications: no response at all; the next call still matches.
    c.send_raw(r#"[{"jsonrpc":"2.0","method":"keepalive.stats"}]"#);
    c.send_raw(r#"{"jsonrpc":"2.0","method":"keepalive.stats"}"#);
    assert!(c.call("keepalive.stats", json!([])).is_ok());
    c.send_raw("[]");
    assert_eq!(c.read().unwrap()["error"]["code"], -32600);
    c.send_raw(r#"{"jsonrpc":"2.0","id":1}"#);
    assert_eq!(c.read().unwrap()["error"]["code"], -32600);

    // Subscribe on a second connection; a delete here is an event there.
    let mut sub = d.rpc();
    assert_eq!(
        sub.call("keepalive.subscribe", json!({})).unwrap()["subscribed"],
        true
    );
    assert_eq!(c.call("keepalive.del", json!([a])).unwrap()["deleted"], 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = sub.read().expect("event stream open");
        assert_eq!(n["method"], "keepalive.event");
        if n["params"]["uri"] == a.as_str() {
            assert_eq!(n["params"]["new"], "removed");
            assert_eq!(n["params"]["reason"], "removed");
            break;
        }
        assert!(Instant::now() < deadline);
    }
    // flush by owner, then everything.
    let r = c
        .call("keepalive.flush", json!({"owner": "nobody"}))
        .unwrap();
    assert_eq!(r["deleted"], 0);
    let r = c.call("keepalive.flush", json!({})).unwrap();
    assert_eq!(r["deleted"], 7);
    assert_eq!(c.list_all().len(), 0);

    // Framing errors close the connection after one error response.
    let mut bad = d.rpc();
    bad.send_raw("{\"jsonrpc\": nope}");
    assert_eq!(bad.read().unwrap()["error"]["code"], -32700);
    assert!(bad.read().is_none(), "closed after a parse error");
    let mut bad = d.rpc();
    bad.send_raw("42");
    assert_eq!(bad.read().unwrap()["error"]["code"], -32600);
    assert!(bad.read().is_none());
    drop((c, sub));
    d.stop();
}

#[test]
fn socket_limits_and_ownership() {
    let _g = serial();
    let lab = Lab::new();
    // A stale socket (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(lab.path("ctl.sock")).unwrap());
    assert!(lab.path("ctl.sock").exists());
    let d = lab.daemon(&[
        "--control-max-request",
        "2048",
        "--control-max-connections",
        "2",
    ]);
    // A second daemon on the same socket is refused.
    let err = fails_to_start(&lab, &[]);
    assert!(err.contains("in use by another running daemon"), "{err}");
    // Request too large.
    let mut c = d.rpc();
    let big = json!({"jsonrpc": "2.0", "id": 1, "method": "keepalive.add",
        "params": {"uri": format!("sip:{}@127.0.0.1", "x".repeat(3000))}});
    c.send_raw(&big.to_string());
    let r = c.read().unwrap();
    assert_eq!(r["error"]["code"], -32004, "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("control_max_request"));
    assert!(c.read().is_none(), "closed");
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    // Too many connections: the third of max 2 gets one error and is closed.
    let mut c1 = d.rpc();
    let mut c2 = d.rpc();
    assert!(c1.call("keepalive.stats", json!({})).is_ok());
    assert!(c2.call("keepalive.stats", json!({})).is_ok());
    let mut c3 = d.rpc();
    let r = c3.read().unwrap();
    assert_eq!(r["error"]["code"], -32005, "{r}");
    assert!(c3.read().is_none());
    drop((c1, c2, c3));
    d.stop();
    assert!(!lab.path("ctl.sock").exists(), "socket removed on stop");
    // A path that is not a socket is never replaced.
    std::fs::write(lab.path("ctl.sock"), "precious").unwrap();
    let err = fails_to_start(&lab, &[]);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(
        std::fs::read_to_string(lab.path("ctl.sock")).unwrap(),
        "precious"
    );
}

/// Adds in batches until `stop` or `total`; returns the acknowledged URIs.
fn add_until_killed(socket: PathBuf, uris: Vec<String>, batch: usize) -> Vec<String> {
    let mut acked = Vec::new();
    let Ok(s) = UnixStream::connect(&socket) else {
        return acked;
    };
    let mut c = Rpc {
        reader: BufReader::new(s.try_clone().unwrap()),
        writer: s,
        next_id: 1,
    };
    for chunk in uris.chunks(batch) {
        let items: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(i, u)| json!({"jsonrpc": "2.0", "id": i, "method": "keepalive.add", "params": [u]}))
            .collect();
        if c.writer
            .write_all(format!("{}\n", Value::Array(items)).as_bytes())
            .is_err()
        {
            break;
        }
        let mut line = String::new();
        match c.reader.read_line(&mut line) {
            Ok(n) if n > 0 => {}
            _ => break, // killed before answering: not acknowledged
        }
        let rs: Vec<Value> = serde_json::from_str(&line).unwrap();
        for r in rs {
            assert!(r.get("error").is_none(), "{r}");
            acked.push(chunk[r["id"].as_u64().unwrap() as usize].clone());
        }
    }
    acked
}

#[test]
fn kill_9_never_loses_an_acknowledged_contact() {
    let _g = serial();
    let lab = Lab::new();
    let mut x = std::process::id() as u64 | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // First: 10,000 contacts, all answered and Up, and a snapshot that
    // holds their liveness (snapshot_interval 1 s).
    let first: Vec<String> = (0..10_000).map(|i| lab.uri(i)).collect();
    let first_set: HashSet<&str> = first.iter().map(String::as_str).collect();
    // Interval 5 s: up to 50,000 contacts by the last run stay a light
    // load for a debug build on a busy 2-core machine, so a contact turns
    // Down only if the daemon really lost its history, not because replies
    // queued past the timeout (seen once at interval 1 s: 9,793 Up).
    let args = [
        "--interval",
        "5",
        "--reply-timeout",
        "2",
        "--snapshot-interval",
        "1",
    ];
    let d = lab.durable(&args);
    let acked = add_until_killed(d.socket.clone(), first.clone(), 1000);
    assert_eq!(acked.len(), 10_000);
    let mut all: HashSet<String> = acked.into_iter().collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = d.rpc().call("keepalive.stats", json!({})).unwrap();
        if s["contacts"]["up"] == 10_000 && s["control"]["snapshots"].as_u64().unwrap() >= 1 {
            // One more snapshot period so the latest holds every Up.
            std::thread::sleep(Duration::from_millis(2500));
            break;
        }
        assert!(Instant::now() < deadline, "never all up: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut d = Some(d);
    // Then, several times: adds streaming in, kill -9 at a random moment.
    for run in 0..4u32 {
        let daemon = d.take().unwrap_or_else(|| lab.durable(&args));
        let uris: Vec<String> = (0..10_000)
            .map(|i| lab.uri(10_000 + run * 10_000 + i))
            .collect();
        let socket = daemon.socket.clone();
        let adder = std::thread::spawn(move || add_until_killed(socket, uris, 500));
        std::thread::sleep(Duration::from_millis(50 + next() % 700));
        daemon.kill9();
        let acked = adder.join().unwrap();
        all.extend(acked);
        // Restart: every acknowledged contact is there.
        let back = lab.durable(&args);
        let listed = back.rpc().list_all();
        let present: HashSet<String> = listed
            .iter()
            .map(|c| c["uri"].as_str().unwrap().to_string())
            .collect();
        let missing: Vec<&String> = all.iter().filter(|u| !present.contains(*u)).collect();
        assert!(
            missing.is_empty(),
            "run {run}: {} acknowledged contacts lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(3)]
        );
        // Their liveness came back from the snapshot: none of the first
        // 10,000 starts over as Unknown (all were Up when first
        // snapshotted; a reply lost to a loaded machine since may have
        // turned a few Down, which is liveness kept too).
        let state_of_first = |want: &str| {
            listed
                .iter()
                .filter(|c| c["state"] == want && first_set.contains(c["uri"].as_str().unwrap()))
                .count()
        };
        assert_eq!(state_of_first("unknown"), 0, "run {run}: liveness restored");
        assert!(
            state_of_first("up") >= 9_900,
            "run {run}: {} up",
            state_of_first("up")
        );
        d = Some(back);
    }
    d.unwrap().stop();
}

/// The newest journal and snapshot files of a state directory.
fn newest(dir: &Path, kind: &str) -> PathBuf {
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(kind))
        .map(|p| (std::fs::metadata(&p).unwrap().modified().unwrap(), p))
        .collect();
    files.sort();
    files
        .pop()
        .unwrap_or_else(|| panic!("no {kind} file in {}", dir.display()))
        .1
}

#[test]
fn torn_journal_tail_is_ignored_and_a_corrupt_snapshot_refused() {
    let _g = serial();
    let lab = Lab::new();
    let d = lab.durable(&["--snapshot-interval", "3600"]);
    let mut c = d.rpc();
    for i in 0..50 {
        assert_eq!(
            c.call("keepalive.add", json!([lab.uri(i)])).unwrap()["status"],
            "added"
        );
    }
    drop(c);
    d.kill9();
    // The last record half-written, as a crash during write leaves it.
    let journal = newest(&lab.path("state"), "journal");
    let len = std::fs::metadata(&journal).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .unwrap();
    f.set_len(len - 7).unwrap();
    drop(f);
    let mut d = lab.durable(&[]);
    let listed = d.rpc().list_all();
    assert_eq!(listed.len(), 49, "everything before the torn record");
    let err = {
        // Stop to read stderr: the warning was printed at start.
        d.signal("-TERM");
        wait(&mut d.child, Duration::from_secs(20));
        d.stderr()
    };
    assert!(err.to_lowercase().contains("torn"), "a warning: {err}");
    drop(d);
    // The clean stop wrote a snapshot; damage it.
    let snap = newest(&lab.path("state"), "snapshot");
    let mut bytes = std::fs::read(&snap).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5A;
    std::fs::write(&snap, &bytes).unwrap();
    let _ = std::fs::remove_file(lab.path("ctl.sock"));
    let state = lab.path("state");
    let err = fails_to_start(&lab, &["--state-dir", state.to_str().unwrap()]);
    assert!(err.contains("snapshot"), "{err}");
    assert!(
        err.contains(&snap.file_name().unwrap().to_string_lossy().to_string()),
        "names the file: {err}"
    );
}

#[test]
fn a_restart_spreads_first_pings_over_the_interval() {
    let _g = serial();
    let lab = Lab::new();
    let args = ["--interval", "2", "--reply-timeout", "0.5"];
    let d = lab.durable(&args);
    let uris: Vec<String> = (0..4000).map(|i| lab.uri(i)).collect();
    assert_eq!(add_until_killed(d.socket.clone(), uris, 1000).len(), 4000);
    d.stop();
    let d = lab.durable(&args);
    let shm = ShmReader::open(&lab.path("shm")).unwrap();
    let sent = || -> u64 {
        (0..2)
            .map(|w| shm.counters(w)[Counter::Sent as usize])
            .sum()
    };
    // Pings per 200 ms over the first interval.
    let mut per_tick = Vec::new();
    let mut last = sent();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(200));
        let now = sent();
        per_tick.push(now - last);
        last = now;
    }
    let total: u64 = per_tick.iter().sum();
    assert!(
        total >= 3000,
        "most contacts pinged in the first interval: {per_tick:?}"
    );
    let max = *per_tick.iter().max().unwrap();
    // Even: no 200 ms tick gets more than a quarter (an even spread gives
    // a tenth; a burst would put nearly all into the first).
    assert!(max <= total / 4, "spread, not a burst: {per_tick:?}");
    d.stop();
}

#[test]
fn sighup_applies_live_settings_and_names_the_rest() {
    let _g = serial();
    let lab = Lab::new();
    let config = lab.path("kaping.toml");
    std::fs::write(&config, "interval = \"2s\"\nreply_timeout = \"500ms\"\n").unwrap();
    let d = lab.daemon(&["--config", config.to_str().unwrap()]);
    let mut c = d.rpc();
    let a = lab.uri(1);
    c.call("keepalive.add", json!([a])).unwrap();
    assert_eq!(
        c.call("keepalive.get", json!([a])).unwrap()["interval_ms"],
        2000
    );
    std::fs::write(
        &config,
        "interval = \"1s\"\nreply_timeout = \"300ms\"\ndown_after = 5\nrecv_buffer = 1048576\n",
    )
    .unwrap();
    d.signal("-HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        c.call("keepalive.get", json!([a])).unwrap()["interval_ms"],
        1000
    );
    // The worker took it: the shm slot shows the new interval.
    let shm = ShmReader::open(&lab.path("shm")).unwrap();
    let slot = (0..2)
        .flat_map(|w| (0..16).map(move |s| (w, s)))
        .find_map(|(w, s)| shm.read_slot(w, s))
        .unwrap();
    assert_eq!(slot.interval_ms, 1000);
    // A bad file is refused and changes nothing.
    std::fs::write(&config, "interval = \"soon\"\n").unwrap();
    d.signal("-HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.call("keepalive.get", json!([a])).unwrap()["interval_ms"],
        1000
    );
    drop(c);
    let err = d.stop();
    assert!(err.contains("applied interval 2s -> 1s"), "{err}");
    assert!(err.contains("reply_timeout 500ms -> 300ms"), "{err}");
    assert!(err.contains("down_after 3 -> 5"), "{err}");
    assert!(
        err.contains("needing a restart (not applied): recv_buffer"),
        "{err}"
    );
    assert!(
        err.contains("configuration not reloaded") && err.contains("interval"),
        "{err}"
    );
}

/// The destination policy holds on every path a contact takes: the file
/// at start (refused lines named file:line with the reason), the control
/// socket, and a SIGHUP that tightens it (contacts it now refuses stop
/// being pinged). Loopback is refused unless named.
#[test]
fn destination_policy_holds_on_every_path() {
    let _g = serial();
    let lab = Lab::new();
    let contacts = lab.path("contacts.txt");
    let good = lab.uri(1);
    std::fs::write(
        &contacts,
        format!(
            "{good}\nsip:b@255.255.255.255:5060\nsip:m@224.0.0.1:5060\nsip:v6@[ff02::1]:5060\n\
             sip:ll@[fe80::1]:5060\nsip:d@127.0.0.99:5060\nsip:z@0.0.0.0:5060\n\
             sip:s@192.0.2.1:5060 127.0.0.99:5060\n"
        ),
    )
    .unwrap();
    let config = lab.path("kaping.toml");
    std::fs::write(&config, "deny_destinations = [\"127.0.0.99\"]\n").unwrap();
    let d = lab.daemon(&[
        "--config",
        config.to_str().unwrap(),
        "--contacts",
        contacts.to_str().unwrap(),
    ]);
    let mut c = d.rpc();
    assert_eq!(c.call("keepalive.get", json!([good])).unwrap()["uri"], good);

    // The control socket: the URI's host, `received` and Path decide the
    // destination, and each is checked.
    for (params, why) in [
        (json!(["sip:x@255.255.255.255"]), "a broadcast address"),
        (json!(["sip:x@[ff05::2]:5060"]), "a multicast address"),
        (
            json!({"uri": "sip:x@192.0.2.9", "received": "sip:224.0.0.1:5060"}),
            "a multicast address",
        ),
        (
            json!({"uri": "sip:x@192.0.2.9", "path": "<sip:127.0.0.99:5060;lr>"}),
            "within deny_destinations entry 127.0.0.99/32",
        ),
        // Not named in allow_destinations (this lab allows loopback only).
        (
            json!(["sip:x@198.51.100.7"]),
            "not within any allow_destinations",
        ),
    ] {
        let e = c.call("keepalive.add", params.clone()).unwrap_err();
        let msg = e["message"].as_str().unwrap();
        assert!(
            msg.contains("refused") && msg.contains(why),
            "{params}: {e}"
        );
    }
    assert_eq!(
        c.call("keepalive.stats", json!([])).unwrap()["contacts"]["total"],
        1
    );

    // A SIGHUP that denies the good contact's address removes it.
    let second = lab.uri(2);
    c.call("keepalive.add", json!([second])).unwrap();
    std::fs::write(
        &config,
        "deny_destinations = [\"127.0.0.99\", \"127.0.0.1/32\"]\n",
    )
    .unwrap();
    d.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.call("keepalive.get", json!([good])).is_ok() {
        assert!(Instant::now() < deadline, "{good} still pinged");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        c.call("keepalive.get", json!([second])).unwrap()["uri"],
        second
    );
    let e = c.call("keepalive.add", json!([good])).unwrap_err();
    assert!(
        e["message"].as_str().unwrap().contains("127.0.0.1/32"),
        "{e}"
    );
    drop(c);
    let err = d.stop();
    let f = contacts.display();
    for (line, why) in [
        (2, "255.255.255.255:5060 refused: a broadcast address"),
        (3, "224.0.0.1:5060 refused: a multicast address"),
        (4, "[ff02::1]:5060 refused: a multicast address"),
        (5, "[fe80::1]:5060 refused: an IPv6 link-local address"),
        (
            6,
            "127.0.0.99:5060 refused: within deny_destinations entry 127.0.0.99/32",
        ),
        (7, "0.0.0.0:5060 refused: an unspecified address"),
        (8, "127.0.0.99:5060 refused: within deny_destinations"),
    ] {
        let want = format!("{f}:{line}: destination {why}");
        assert!(err.contains(&want), "want {want:?} in: {err}");
    }
    assert!(
        err.contains("deny_destinations [127.0.0.99/32] -> [127.0.0.99/32, 127.0.0.1/32]"),
        "{err}"
    );
    assert!(
        err.contains(&format!("SIGHUP: removed {good}: destination 127.0.0.1:")),
        "{err}"
    );

    // Without allow_destinations, loopback is refused, and says how to
    // allow it.
    let out = Command::new(env!("CARGO_BIN_EXE_kaping"))
        .arg("run")
        .arg("--contacts")
        .arg(&contacts)
        .args(["--bind", &format!("127.0.0.1:{}", free_ports(1))])
        .args([
            "--workers",
            "1",
            "--pin-workers",
            "false",
            "--events",
            "none",
        ])
        .arg("--shm")
        .arg(lab.path("shm3"))
        .args(["--run-for", "0.5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{f}:1: destination 127.0.0.1:{} refused: a loopback address (this host); to ping \
             it, name it in allow_destinations, e.g. \"127.0.0.0/8\"",
            lab.serve_port
        )),
        "{err}"
    );
}

/// Streams that cannot be read on are answered -32700 with where, before
/// the close: a value cut by EOF, nesting past the bound, invalid UTF-8.
/// The daemon goes on serving.
#[test]
fn broken_framing_is_answered_with_where() {
    let _g = serial();
    let lab = Lab::new();
    let d = lab.daemon(&[]);
    let answer = |bytes: &[u8], shut: bool| {
        let mut c = d.rpc();
        c.writer.write_all(bytes).unwrap();
        if shut {
            c.writer.shutdown(std::net::Shutdown::Write).unwrap();
        }
        let mut got = Vec::new();
        while let Some(v) = c.read() {
            got.push(v);
        }
        got
    };
    let ok = r#"{"jsonrpc":"2.0","id":1,"method":"keepalive.stats"}"#;
    let error = |got: &[Value]| {
        let last = got.last().expect("an answer");
        assert_eq!(last["error"]["code"], -32700, "{last}");
        assert_eq!(last["id"], Value::Null);
        last["error"]["message"].as_str().unwrap().to_string()
    };

    // A value cut by EOF after a good one: the good one is answered.
    let cut = format!("{ok}\n{{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"keepalive.ad");
    let got = answer(cut.as_bytes(), true);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0]["id"], 1);
    let why = error(&got);
    let began = ok.len() + 1;
    assert!(
        why.contains(&format!(
            "ended inside a JSON value: it began at byte {began}"
        )) && why.contains("1 bracket(s) still open, inside a string"),
        "{why}"
    );

    // 100,000 nested '[': refused at the first one too deep, while the
    // rest is still arriving.
    let deep = "[".repeat(100_000);
    let why = error(&answer(deep.as_bytes(), true));
    assert_eq!(why, "JSON nested deeper than 64 levels at byte 64");

    // Invalid UTF-8 inside a string.
    let mut bad = br#"{"jsonrpc":"2.0","id":3,"method":"keepalive.add","params":["sip:"#.to_vec();
    let at = bad.len();
    bad.extend_from_slice(b"\xff\xfe@127.0.0.1\"]}\n");
    let why = error(&answer(&bad, false));
    assert_eq!(
        why,
        format!("invalid UTF-8 at byte {at} (byte {at} of the request that began at byte 0)")
    );

    // The daemon is unaffected.
    let mut c = d.rpc();
    assert_eq!(
        c.call("keepalive.stats", json!({})).unwrap()["contacts"]["total"],
        0
    );
    drop(c);
    d.stop();
}
