//! Helpers shared by the tests that start daemons and responders.

use std::net::UdpSocket;

/// A base port such that `base..base+count` are free for UDP on the IPv4
/// wildcard address (checked, then released).
#[allow(dead_code)] // each test binary uses its share of these helpers
pub fn free_ports(count: u16) -> u16 {
    free_ports_on(count, false)
}

/// [`free_ports`] on the IPv6 wildcard when `v6`.
pub fn free_ports_on(count: u16, v6: bool) -> u16 {
    // Seeded by pid and wall clock: tests of one binary run in parallel,
    // and a second run of the same binary must not retry the same ports.
    let mut x = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
        ^ 0x9E37_79B9;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let base = 20_000 + (x % 40_000) as u16;
        let ok = (0..count).all(|i| {
            if v6 {
                UdpSocket::bind(("::", base + i)).is_ok()
            } else {
                UdpSocket::bind(("0.0.0.0", base + i)).is_ok()
            }
        });
        if ok {
            return base;
        }
    }
    panic!("no free port range of {count}");
}

/// A base port such that `base..base+count` are free for UDP on the IPv4
/// wildcard address, for ranges too long for [`free_ports`] (whose base
/// may lie within `count` of 65535).
#[allow(dead_code)]
pub fn free_port_range(count: u16) -> u16 {
    let top = 65_000 - count;
    assert!(top > 20_000, "no room for {count} ports above 20000");
    let mut x = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
        ^ 0x85EB_CA6B;
    for _ in 0..50 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let base = 20_000 + (x % u64::from(top - 20_000)) as u16;
        if (0..count).all(|i| UdpSocket::bind(("0.0.0.0", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no free port range of {count}");
}

/// Waits for `child` to exit; kills it (and fails the test) past `limit`.
#[allow(dead_code)] // each test binary uses its share of these helpers
pub fn wait_with_deadline(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process did not stop within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Waits for `child` (started with piped stdout and stderr) to exit;
/// kills it and fails the test, naming `what`, past `limit`. Returns its
/// status and what it printed.
#[allow(dead_code)]
pub fn output_within(
    mut child: std::process::Child,
    limit: std::time::Duration,
    what: &str,
) -> (std::process::ExitStatus, String, String) {
    use std::io::Read;
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} ran over {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut out).unwrap();
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    (status, out, err)
}

/// Whether the io_uring backend can run here; says SKIP when it cannot
/// (`backend` other than `uring` always can).
#[allow(dead_code)]
pub fn uring_available(backend: &str) -> bool {
    if backend == "uring" {
        if let Err(why) = kaping::io::uring::probe() {
            eprintln!("SKIP (uring): io_uring unavailable here: {why}");
            return false;
        }
    }
    true
}

/// A daemon's counters summed over its workers.
#[allow(dead_code)]
pub fn totals(shm: &kaping::shm::reader::ShmReader) -> [u64; kaping::shm::layout::Counter::COUNT] {
    let mut total = [0u64; kaping::shm::layout::Counter::COUNT];
    for w in 0..shm.header().workers {
        for (t, c) in total.iter_mut().zip(shm.counters(w)) {
            *t += c;
        }
    }
    total
}

/// The events a daemon wrote to `path` so far, one JSON value a line.
#[allow(dead_code)]
pub fn events(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A Debian Kamailio run by a test, in a process group of its own: TERM
/// then KILL to the whole group on drop (its children outlive the main
/// process otherwise), whatever the test did.
#[allow(dead_code)]
pub struct Kamailio {
    child: std::process::Child,
    pub dir: tempfile::TempDir,
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = std::process::Command::new("kill")
            .args(["-TERM", "--", &group])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

/// Starts Kamailio with `cfg` (its log in `dir/kamailio.log`) and waits
/// until it holds `listen`; `None` (after saying SKIP) when Kamailio is not
/// installed.
#[allow(dead_code)]
pub fn start_kamailio(cfg: &str, listen: std::net::SocketAddr) -> Option<Kamailio> {
    start_kamailio_sized(cfg, listen, 64, 8)
}

/// [`start_kamailio`] with `shm_mb` of shared memory (`-m`) and `pkg_mb`
/// of private memory per process (`-M`): a location table of 10,000s of
/// contacts, and the tm transactions of a full DMQ sync of them, do not fit
/// in the 64 MB the small tests give it.
#[allow(dead_code)]
pub fn start_kamailio_sized(
    cfg: &str,
    listen: std::net::SocketAddr,
    shm_mb: u32,
    pkg_mb: u32,
) -> Option<Kamailio> {
    use std::os::unix::process::CommandExt;
    if std::process::Command::new("kamailio")
        .arg("-v")
        .output()
        .is_err()
    {
        eprintln!("SKIP: kamailio is not installed (apt-get install kamailio)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kamailio.cfg");
    std::fs::write(&path, cfg).unwrap();
    let log = std::fs::File::create(dir.path().join("kamailio.log")).unwrap();
    let child = std::process::Command::new("kamailio")
        .arg("-f")
        .arg(&path)
        .args([
            "-DD",
            "-E",
            "-m",
            &shm_mb.to_string(),
            "-M",
            &pkg_mb.to_string(),
        ])
        .arg("-Y")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap();
    let k = Kamailio { child, dir };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if kaping::io::share::holders(listen, &[]).is_ok_and(|h| h.exact) {
            return Some(k);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!(
        "kamailio did not bind {listen}: {}",
        std::fs::read_to_string(k.dir.path().join("kamailio.log")).unwrap_or_default()
    );
}

/// One REGISTER of user `u<i>` (contact `sip:u<i>@127.0.0.1:<40000+i>`,
/// Call-ID `reg<i>@kaping-test`) to a registrar on loopback, answered 200.
#[allow(dead_code)]
pub fn register(kam: std::net::SocketAddr, i: u32, expires: u32, cseq: u32) {
    register_with(
        kam,
        i,
        &format!("<sip:u{i}@127.0.0.1:{}>", 40_000 + i),
        &format!("reg{i}@kaping-test"),
        "",
        expires,
        cseq,
    );
}

/// [`register`] with the Contact header's value, the Call-ID and extra
/// header lines (each ending in CRLF) given; fails the test unless 200.
#[allow(dead_code)]
pub fn register_with(
    kam: std::net::SocketAddr,
    i: u32,
    contact: &str,
    call_id: &str,
    extra: &str,
    expires: u32,
    cseq: u32,
) {
    let ua = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = ua.local_addr().unwrap().port();
    let msg = format!(
        "REGISTER sip:{kam} SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKreg{i}c{cseq}\r\n\
         From: <sip:u{i}@127.0.0.1>;tag=f{i}\r\n\
         To: <sip:u{i}@127.0.0.1>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} REGISTER\r\n\
         Contact: {contact}\r\n\
         {extra}\
         Expires: {expires}\r\n\
         Max-Forwards: 70\r\n\
         Content-Length: 0\r\n\r\n"
    );
    ua.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    ua.send_to(msg.as_bytes(), kam).unwrap();
    let mut buf = [0u8; 2048];
    let n = ua.recv(&mut buf).expect("no answer to REGISTER");
    assert!(
        buf[..n].starts_with(b"SIP/2.0 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}

/// `kaping ctl --json ARGS` against `sock`; fails the test with kaping's
/// words (and `daemon.err` beside the socket, if any) when it fails.
#[allow(dead_code)]
pub fn ctl(sock: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kaping"))
        .arg("ctl")
        .arg("--control")
        .arg(sock)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kaping ctl {args:?}: {}\ndaemon: {}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(sock.with_file_name("daemon.err")).unwrap_or_default(),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The kamailio.cfg lines kaping's DMQ feed needs, exactly as the README
/// quotes them (`KAM`: Kamailio's DMQ address, `NODE`: kaping's `--dmq`);
/// `readme_quotes_the_lines_the_tests_use` holds the two together.
#[allow(dead_code)]
pub const DMQ_LINES: &str = r#"loadmodule "dmq.so"
loadmodule "dmq_usrloc.so"
modparam("dmq", "server_address", "sip:KAM")
modparam("dmq", "notification_address", "sip:NODE")
modparam("dmq_usrloc", "enable", 1)
modparam("dmq_usrloc", "batch_msg_contacts", 50)
"#;

/// The line the README puts first in `request_route`.
#[allow(dead_code)]
pub const DMQ_ROUTE: &str = r#"if (method == "KDMQ") { dmq_handle_message(); exit; }"#;

/// Kamailio as a registrar on `kam` (UDP) with the feed's lines, kaping's
/// node at `node`, and `extra` (modules, parameters) before the routes.
#[allow(dead_code)]
pub fn registrar_cfg(kam: std::net::SocketAddr, node: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "#!KAMAILIO\ndebug=2\nlog_stderror=yes\nchildren=2\nauto_aliases=no\nlisten=udp:{kam}\n\
         loadmodule \"tm.so\"\nloadmodule \"sl.so\"\nloadmodule \"pv.so\"\n\
         loadmodule \"usrloc.so\"\nloadmodule \"registrar.so\"\n\
         modparam(\"registrar\", \"min_expires\", 1)\n{}{extra}\n\
         request_route {{\n\
         \t{DMQ_ROUTE}\n\
         \tif (method == \"REGISTER\") {{ if (!save(\"location\")) sl_reply_error(); exit; }}\n\
         \tsl_send_reply(\"404\", \"Not here\");\n}}\n",
        DMQ_LINES
            .replace("KAM", &kam.to_string())
            .replace("NODE", &node.to_string())
    )
}

/// Polls `keepalive.stats` on `sock` until `ok` holds; the last stats
/// otherwise.
#[allow(dead_code)]
pub fn wait_stats(
    sock: &std::path::Path,
    within: std::time::Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value, serde_json::Value> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let s = ctl(sock, &["keepalive.stats"]);
        if ok(&s) {
            return Ok(s);
        }
        if std::time::Instant::now() > deadline {
            return Err(s);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `promtool check metrics` on a Prometheus page; SKIP (printed) where
/// promtool is missing (`.ci/run` fetches it).
#[allow(dead_code)]
pub fn promtool_check(page: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    if Command::new("promtool").arg("--version").output().is_err() {
        println!("SKIP promtool not installed");
        return;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics: {}{}\n{page}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `kaping run` over loopback with one unpinned worker: contacts from
/// `dir/contacts.txt`, shm at `shm`, events to `events`, bound to `bind`;
/// its stdout discarded and its stderr piped (for the test's messages);
/// the caller adds the timing settings and spawns it.
#[allow(dead_code)]
pub fn loopback_daemon(
    dir: &std::path::Path,
    shm: &std::path::Path,
    events: &std::path::Path,
    bind: std::net::SocketAddrV4,
    backend: &str,
    max_contacts: u32,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kaping"));
    cmd.arg("run")
        .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
        .arg("--contacts")
        .arg(dir.join("contacts.txt"))
        .arg("--shm")
        .arg(shm)
        .arg("--events")
        .arg(events)
        .args(["--bind", &bind.to_string()])
        .args([
            "--workers",
            "1",
            "--max-contacts",
            &max_contacts.to_string(),
        ])
        .args(["--backend", backend, "--pin-workers", "false"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd
}
