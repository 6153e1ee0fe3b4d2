//! The NAT lab: does a keepalive keep a phone behind a NAT reachable?
//! (DESIGN §10, "Beside the proxy".)
//!
//! Each test builds three network namespaces of its own (named with the
//! test's pid and a counter) and a real registrar:
//!
//! ```text
//!  phones ns               nat ns                                 proxy ns
//!  192.0.2.2/24  ------ 192.0.2.1 | 203.0.113.2  ---------------- 203.0.113.10/24
//!  2001:db8:1::2/64 --- 2001:db8:1::1 | 2001:db8:2::1 ----------- 2001:db8:2::10/64
//!  kaping-loadgen       nftables: IPv4 masquerade on the outside;  Kamailio (registrar,
//!    phones (N UAs)     forward policy drop but established/       udp :5060 v4 + v6)
//!                       related and new from the inside (v4+v6),   kaping
//!                       UDP conntrack timeout NAT_TIMEOUT          kaping-loadgen reach
//! ```
//!
//! The NAT filters by address *and* port, as Linux conntrack and most home
//! routers do: a datagram from the proxy reaches a phone only while the
//! binding the phone opened towards `203.0.113.10:5060` lives, and only
//! from that address and port. The proxy knows nothing of 192.0.2.0/24; for
//! IPv6 it routes 2001:db8:1::/64 via the filter (filtered, not translated).
//!
//! A scenario: Kamailio starts; N phones register through the NAT; the
//! registrar's `ul.dump` (over the jsonrpcs FIFO) becomes kaping's contacts
//! file; kaping (if the scenario has one) pings them for three NAT timeouts;
//! then `kaping-stat` says what kaping thinks (Up/Down) and
//! `kaping-loadgen reach` asks Kamailio to relay one OPTIONS to every AoR
//! and counts the phones that answered. The two controls hold today:
//! without kaping, and with kaping pinging from its own port 5070, every
//! binding expires and nothing is reachable. With kaping as the proxy
//! (`--source`, in both reply modes and over IPv6) every phone is Up and
//! reachable, and Kamailio's own counters show what the replies cost it:
//! one stateless forward each in `relay` mode, none in `divert` mode.
//!
//! Needs root, `ip` (iproute2), `nft` and `kamailio` (with the tm, sl, rr,
//! pv, maxfwd, textops, siputils, xlog, sanity, usrloc, registrar,
//! nathelper and jsonrpcs modules); without them a test prints `SKIP:` and
//! returns. Only documentation addresses are used and nothing is routed out
//! of the namespaces. Scenarios run one at a time (timing matters: the NAT
//! timeout is seconds); a [`Lab`] guard kills every process it started and
//! deletes its namespaces even when a test fails. `KAPING_NAT_PHONES` sets
//! the number of phones (default 200; the acceptance run uses 1000).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// UDP conntrack timeout in the NAT namespace (both `udp_timeout` and
/// `udp_timeout_stream`), seconds.
const NAT_TIMEOUT_S: u64 = 3;
/// How long kaping pings (or nothing happens) before the checks: three NAT
/// timeouts and a second, so every binding not kept open has expired.
const SETTLE: Duration = Duration::from_secs(3 * NAT_TIMEOUT_S + 1);
/// Default number of phones (`KAPING_NAT_PHONES` overrides).
const PHONES_DEFAULT: u32 = 200;
/// First phone's port.
const PHONE_PORT: u16 = 40000;
/// The AoR domain (RFC 2606 name, never resolved: the registrar keys
/// contacts by user only, and the relayed request goes to the contact).
const DOMAIN: &str = "natlab.example";
const PROXY_V4: &str = "203.0.113.10";
const PROXY_V6: &str = "2001:db8:2::10";
const PHONES_V4: &str = "192.0.2.2";
const PHONES_V6: &str = "2001:db8:1::2";
/// kaping's own port (its `--bind`).
const KAPING_PORT: u16 = 5070;

/// One lab at a time.
static SERIAL: Mutex<()> = Mutex::new(());
/// Distinguishes the labs of one test process.
static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

fn kaping_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kaping")
}
fn loadgen_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kaping-loadgen")
}
fn stat_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kaping-stat")
}

fn phones_count() -> u32 {
    std::env::var("KAPING_NAT_PHONES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &u32| n > 0 && n <= 20_000)
        .unwrap_or(PHONES_DEFAULT)
}

// ---------------------------------------------------------------------------
// Environment checks

/// `name` on PATH or in the sbin directories (CI's PATH may lack them).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

struct Tools {
    ip: PathBuf,
    nft: PathBuf,
    kamailio: PathBuf,
    sysctl: PathBuf,
    mkfifo: PathBuf,
    kill: PathBuf,
}

/// The tools the lab needs, or the reason it cannot run here.
fn tools() -> Result<Tools, String> {
    if !is_root() {
        return Err("not root (network namespaces and nftables need it)".into());
    }
    let need = |n: &str| find_tool(n).ok_or_else(|| format!("`{n}` not installed"));
    Ok(Tools {
        ip: need("ip")?,
        nft: need("nft")?,
        kamailio: need("kamailio")?,
        sysctl: need("sysctl")?,
        mkfifo: need("mkfifo")?,
        kill: need("kill")?,
    })
}

fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

// ---------------------------------------------------------------------------
// The lab

/// A process the lab started, with where its output went.
struct Proc {
    name: &'static str,
    child: Child,
}

/// Three namespaces, their links and rules, and every process started in
/// them. Dropping it kills the processes and deletes the namespaces.
struct Lab {
    tools: Tools,
    /// Namespace names: phones, nat, proxy.
    ns: [String; 3],
    dir: tempfile::TempDir,
    procs: Vec<Proc>,
    phones_stdin: Option<ChildStdin>,
    phones_stdout: Option<std::process::ChildStdout>,
    phones_stderr: Arc<Mutex<Vec<String>>>,
    rpc_seq: u32,
    started: Instant,
}

const PHONES: usize = 0;
const NAT: usize = 1;
const PROXY: usize = 2;

impl Lab {
    /// Builds the namespaces and the NAT. An error starting with `SKIP: `
    /// means this machine cannot (no namespaces, no nftables or conntrack
    /// in the kernel); any other is a failure.
    fn build(tools: Tools) -> Result<Lab, String> {
        sweep_stale(&tools);
        let pid = std::process::id();
        let k = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let ns = [
            format!("kpnat-ph-{pid}-{k}"),
            format!("kpnat-nat-{pid}-{k}"),
            format!("kpnat-px-{pid}-{k}"),
        ];
        let lab = Lab {
            tools,
            ns,
            dir: tempfile::Builder::new()
                .prefix("kaping-natlab")
                .tempdir()
                .map_err(|e| e.to_string())?,
            procs: Vec::new(),
            phones_stdin: None,
            phones_stdout: None,
            phones_stderr: Arc::new(Mutex::new(Vec::new())),
            rpc_seq: 0,
            started: Instant::now(),
        };
        // Interface names: at most 15 bytes; pid in hex keeps them short.
        let tag = format!("{pid:x}{k}");
        let (ph, nin, nout, px) = (
            format!("kph{tag}"),
            format!("kin{tag}"),
            format!("kout{tag}"),
            format!("kpx{tag}"),
        );
        for n in &lab.ns {
            lab.ip(&["netns", "add", n])
                .map_err(|e| format!("SKIP: cannot create a network namespace: {e}"))?;
        }
        let [ns_ph, ns_nat, ns_px] = &lab.ns;
        lab.ip(&["link", "add", &ph, "type", "veth", "peer", "name", &nin])?;
        lab.ip(&["link", "set", &ph, "netns", ns_ph])?;
        lab.ip(&["link", "set", &nin, "netns", ns_nat])?;
        lab.ip(&["link", "add", &px, "type", "veth", "peer", "name", &nout])?;
        lab.ip(&["link", "set", &px, "netns", ns_px])?;
        lab.ip(&["link", "set", &nout, "netns", ns_nat])?;
        let addrs: [(&str, &str, &[&str]); 4] = [
            (ns_ph, &ph, &["192.0.2.2/24", "2001:db8:1::2/64"]),
            (ns_nat, &nin, &["192.0.2.1/24", "2001:db8:1::1/64"]),
            (ns_nat, &nout, &["203.0.113.2/24", "2001:db8:2::1/64"]),
            (ns_px, &px, &["203.0.113.10/24", "2001:db8:2::10/64"]),
        ];
        for (n, dev, list) in addrs {
            // No duplicate address detection on these point-to-point links,
            // for the link-local addresses too: while it runs (a second or
            // two after link up) neighbour discovery stalls and the first
            // burst of IPv6 REGISTERs is dropped.
            let dad = format!("net.ipv6.conf.{dev}.accept_dad=0");
            let sysctl = lab.tools.sysctl.to_string_lossy().into_owned();
            run(Command::new(&lab.tools.ip).args(["netns", "exec", n, &sysctl, "-qw", &dad]))?;
            for a in list {
                // nodad: an address still in duplicate detection cannot be bound.
                let mut args = vec!["-n", n, "addr", "add", a, "dev", dev];
                if a.contains(':') {
                    args.push("nodad");
                }
                lab.ip(&args)?;
            }
            lab.ip(&["-n", n, "link", "set", dev, "up"])?;
        }
        for n in &lab.ns {
            lab.ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        lab.ip(&["-n", ns_ph, "route", "add", "default", "via", "192.0.2.1"])?;
        lab.ip(&[
            "-n",
            ns_ph,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:1::1",
        ])?;
        // The proxy knows the NAT's public address only (on-link); for IPv6
        // the phones' prefix is routed via the filter, not translated.
        lab.ip(&[
            "-n",
            ns_px,
            "-6",
            "route",
            "add",
            "2001:db8:1::/64",
            "via",
            "2001:db8:2::1",
        ])?;
        let timeout = NAT_TIMEOUT_S.to_string();
        let sysctl = lab.tools.sysctl.to_string_lossy().into_owned();
        lab.ns_exec(
            NAT,
            &[
                &sysctl,
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                &format!("net.netfilter.nf_conntrack_udp_timeout={timeout}"),
                &format!("net.netfilter.nf_conntrack_udp_timeout_stream={timeout}"),
            ],
        )
        .map_err(|e| format!("SKIP: no forwarding or conntrack in this kernel: {e}"))?;
        // A home router: forwards what the inside starts and the answers to
        // it, nothing else; masquerades IPv4; and does not answer
        // unsolicited UDP on its public address (silently dropped, as most
        // do, rather than an ICMP error).
        let rules = format!(
            "table inet kaping_natlab {{
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{nout}\" meta l4proto udp ct state new drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"{nin}\" oifname \"{nout}\" ct state new accept
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{nout}\" meta nfproto ipv4 masquerade
  }}
}}
"
        );
        let rules_path = lab.path("nat.nft");
        fs::write(&rules_path, rules).map_err(|e| e.to_string())?;
        let nft = lab.tools.nft.to_string_lossy().into_owned();
        lab.ns_exec(NAT, &[&nft, "-f", &rules_path.to_string_lossy()])
            .map_err(|e| {
                format!("SKIP: nftables rules refused (no nf_tables/NAT in the kernel?): {e}")
            })?;
        Ok(lab)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ip(&self, args: &[&str]) -> Result<Output, String> {
        run(Command::new(&self.tools.ip).args(args))
    }

    fn ns_cmd(&self, ns: usize, program: &str) -> Command {
        let mut c = Command::new(&self.tools.ip);
        c.args(["netns", "exec", &self.ns[ns], program]);
        c
    }

    fn ns_exec(&self, ns: usize, argv: &[&str]) -> Result<Output, String> {
        run(self.ns_cmd(ns, argv[0]).args(&argv[1..]))
    }

    fn log(&self, what: &str) {
        eprintln!("[{:6.2} s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// Writes kamailio.cfg, checks it, starts Kamailio in the proxy
    /// namespace and waits until its RPC FIFO answers.
    fn start_kamailio(&mut self) -> Result<(), String> {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let cfg = KAMAILIO_CFG
            .replace("@DIR@", &dir)
            .replace("@PROXY_V4@", PROXY_V4)
            .replace("@PROXY_V6@", PROXY_V6);
        let cfg_path = self.path("kamailio.cfg");
        fs::write(&cfg_path, cfg).map_err(|e| e.to_string())?;
        let kam = self.tools.kamailio.to_string_lossy().into_owned();
        let check = Command::new(&kam)
            .args(["-c", "-f"])
            .arg(&cfg_path)
            .output()
            .map_err(|e| e.to_string())?;
        if !check.status.success() {
            let text = String::from_utf8_lossy(&check.stderr).into_owned();
            if text.contains("could not find module") || text.contains("failed to load module") {
                return Err(format!("SKIP: a Kamailio module is missing: {text}"));
            }
            panic!("kamailio.cfg does not check: {text}");
        }
        let log = File::create(self.path("kamailio.log")).map_err(|e| e.to_string())?;
        let child = self
            .ns_cmd(PROXY, &kam)
            .args([
                "-f",
                &cfg_path.to_string_lossy(),
                "-DD",
                "-E",
                "-m",
                "64",
                "-M",
                "32",
            ])
            .args([
                "-Y",
                &dir,
                "-P",
                &self.path("kamailio.pid").to_string_lossy(),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start kamailio: {e}"))?;
        self.procs.push(Proc {
            name: "kamailio",
            child,
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.path("rpc.fifo").exists() {
                if let Ok(v) = self.rpc("core.version") {
                    self.log(&format!("kamailio up: {}", v["result"]));
                    return Ok(());
                }
            }
            if let Some(st) = self.procs.last_mut().and_then(|p| p.child.try_wait().ok()?) {
                return Err(format!(
                    "kamailio exited ({st}): {}",
                    self.tail("kamailio.log")
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "kamailio's FIFO did not answer within 10 s: {}",
                    self.tail("kamailio.log")
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// One JSON-RPC call over jsonrpcs' FIFO transport: the request names
    /// a reply FIFO (`reply_name`, no dots or slashes) that Kamailio opens
    /// in `fifo_reply_dir` and writes the whole reply to, then closes.
    fn rpc(&mut self, method: &str) -> Result<Value, String> {
        self.rpc_with(method, "[]")
    }

    /// [`Lab::rpc`] with `params` (a JSON array).
    fn rpc_with(&mut self, method: &str, params: &str) -> Result<Value, String> {
        self.rpc_seq += 1;
        let reply_name = format!("reply{}", self.rpc_seq);
        let reply_path = self.path(&reply_name);
        run(Command::new(&self.tools.mkfifo).arg(&reply_path))?;
        // Kamailio opens the reply FIFO non-blocking and gives up after a
        // few tries if nobody reads: the reader is in place (blocked in
        // open, which counts as a reader) before the request is written.
        let (tx, rx) = mpsc::channel();
        let reader_path = reply_path.clone();
        thread::spawn(move || {
            let r = File::open(&reader_path).and_then(|mut f| {
                let mut s = String::new();
                f.read_to_string(&mut s).map(|_| s)
            });
            let _ = tx.send(r);
        });
        thread::sleep(Duration::from_millis(20));
        let request = format!(
            "{{\"jsonrpc\":\"2.0\",\"method\":\"{method}\",\"params\":{params},\"reply_name\":\"{reply_name}\",\"id\":{}}}\n",
            self.rpc_seq
        );
        let written = OpenOptions::new()
            .write(true)
            .open(self.path("rpc.fifo"))
            .and_then(|mut f| f.write_all(request.as_bytes()));
        let result = match written {
            Err(e) => Err(format!("cannot write to kamailio's FIFO: {e}")),
            Ok(()) => match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(text)) => serde_json::from_str::<Value>(&text)
                    .map_err(|e| format!("{method}: not JSON ({e}): {text:.200}")),
                Ok(Err(e)) => Err(format!("{method}: reading the reply: {e}")),
                Err(_) => Err(format!("{method}: no reply within 10 s")),
            },
        };
        if result.is_err() {
            // Unblock the reader thread (an open for writing completes its
            // open; closing gives it end of file).
            let _ = OpenOptions::new().write(true).open(&reply_path);
        }
        let _ = fs::remove_file(&reply_path);
        let v = result?;
        if v.get("error").is_some() {
            return Err(format!("{method}: {}", v["error"]));
        }
        Ok(v)
    }

    /// Starts `count` phones in the phones namespace registering at the
    /// proxy, and waits until every one has registered.
    fn start_phones(&mut self, count: u32, v6: bool) -> Result<(), String> {
        let (bind, registrar) = if v6 {
            (PHONES_V6, format!("sip:[{PROXY_V6}]:5060"))
        } else {
            (PHONES_V4, format!("sip:{PROXY_V4}:5060"))
        };
        let mut child = self
            .ns_cmd(PHONES, loadgen_bin())
            .args(["phones", "--count", &count.to_string(), "--bind", bind])
            .args(["--port", &PHONE_PORT.to_string(), "--register", &registrar])
            // Long registrations: no refresh during a scenario, so nothing
            // but the keepalives under test touches the NAT bindings.
            .args(["--expires", "600", "--ramp", "500ms", "--domain", DOMAIN])
            .args(["--stop-on-stdin-eof", "--json", "--per-phone"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start phones: {e}"))?;
        self.phones_stdin = child.stdin.take();
        self.phones_stdout = child.stdout.take();
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let keep = self.phones_stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        self.procs.push(Proc {
            name: "phones",
            child,
        });
        let want = format!("registered {count}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == want => break,
                Ok(_) => {}
                Err(_) => {
                    return Err(format!(
                        "phones did not all register within 20 s: {:?}",
                        self.phones_stderr.lock().unwrap()
                    ))
                }
            }
        }
        self.log(&format!("{count} phones registered"));
        Ok(())
    }

    /// Stops the phones (stdin EOF) and returns their JSON summary.
    fn stop_phones(&mut self) -> Result<Value, String> {
        drop(self.phones_stdin.take());
        let mut text = String::new();
        if let Some(mut out) = self.phones_stdout.take() {
            out.read_to_string(&mut text).map_err(|e| e.to_string())?;
        }
        if let Some(p) = self.procs.iter_mut().find(|p| p.name == "phones") {
            wait_with_deadline(&mut p.child, Duration::from_secs(10))?;
        }
        serde_json::from_str(text.trim()).map_err(|e| format!("phones summary ({e}): {text:.300}"))
    }

    /// Kamailio's location table, written where kaping will read it.
    fn dump_contacts(&mut self) -> Result<(PathBuf, Vec<UlContact>), String> {
        let v = self.rpc("ul.dump")?;
        let path = self.path("ul.dump.json");
        fs::write(&path, serde_json::to_vec_pretty(&v).expect("json"))
            .map_err(|e| e.to_string())?;
        Ok((path, ul_contacts(&v)))
    }

    /// Starts kaping in the proxy namespace with the contacts in `dump`.
    fn start_kaping(&mut self, dump: &Path, count: u32, extra: &[String]) -> Result<(), String> {
        let mut cmd = self.ns_cmd(PROXY, kaping_bin());
        cmd.args(["run", "--contacts", &dump.to_string_lossy()])
            .args(["--contacts-format", "uldump"])
            .args(["--shm", &self.path("kaping.shm").to_string_lossy()])
            .args(["--events", &self.path("events.jsonl").to_string_lossy()])
            .args(["--interval", "1s", "--reply-timeout", "500ms"])
            .args(["--workers", "1", "--domain", DOMAIN])
            .args(["--max-contacts", &(count + 64).to_string()])
            .args(["--instance", &format!("natlab{}", std::process::id())])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(self.path("kaping.log")).map_err(|e| e.to_string())?);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start kaping: {e}"))?;
        self.procs.push(Proc {
            name: "kaping",
            child,
        });
        // Up once the shared-memory file is readable.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.kaping_stat().is_ok() {
                self.log(&format!("kaping running: {}", extra.join(" ")));
                return Ok(());
            }
            if let Some(st) = self
                .procs
                .iter_mut()
                .find(|p| p.name == "kaping")
                .and_then(|p| p.child.try_wait().ok()?)
            {
                return Err(format!("kaping exited ({st}): {}", self.tail("kaping.log")));
            }
            if Instant::now() > deadline {
                return Err(format!("kaping did not start: {}", self.tail("kaping.log")));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn kaping_stat(&self) -> Result<Value, String> {
        let out = run(Command::new(stat_bin())
            .args(["--shm", &self.path("kaping.shm").to_string_lossy()])
            // One sample: no rates, no second-long wait.
            .args(["--json", "--interval", "0"]))?;
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// SIGTERM to kaping (clean stop) and its exit status.
    fn stop_kaping(&mut self) -> Result<(), String> {
        let Some(p) = self.procs.iter_mut().find(|p| p.name == "kaping") else {
            return Ok(());
        };
        let pid = p.child.id().to_string();
        let _ = Command::new(&self.tools.kill)
            .args(["-TERM", &pid])
            .status();
        let st = wait_with_deadline(&mut p.child, Duration::from_secs(10))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("kaping exited {st}: {}", self.tail("kaping.log")))
        }
    }

    /// `kaping-loadgen reach` from the proxy namespace through Kamailio.
    fn reach(&self, count: u32, v6: bool) -> Result<Value, String> {
        let (proxy, bind) = if v6 {
            (format!("sip:[{PROXY_V6}]:5060"), PROXY_V6)
        } else {
            (format!("sip:{PROXY_V4}:5060"), PROXY_V4)
        };
        let out = run(self
            .ns_cmd(PROXY, loadgen_bin())
            .args(["reach", "--proxy", &proxy, "--count", &count.to_string()])
            .args([
                "--domain",
                DOMAIN,
                "--bind",
                bind,
                "--timeout",
                "4s",
                "--json",
            ]))?;
        let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        self.log(&format!("reach: {v}"));
        Ok(v)
    }

    fn tail(&self, file: &str) -> String {
        let text = fs::read_to_string(self.path(file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!(
            "\n--- {file} (last lines) ---\n{}",
            lines[from..].join("\n")
        )
    }

    /// What to look at when a check fails.
    fn diagnostics(&self) -> String {
        let conntrack = self
            .ns_exec(
                NAT,
                &["sh", "-c", "cat /proc/sys/net/netfilter/nf_conntrack_count"],
            )
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let phones: Vec<String> = self.phones_stderr.lock().unwrap().clone();
        format!(
            "{}{}\n--- phones stderr ---\n{}\n--- nat conntrack entries: {conntrack}",
            self.tail("kamailio.log"),
            self.tail("kaping.log"),
            phones.join("\n")
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for p in self.procs.iter_mut().rev() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        for n in &self.ns {
            kill_ns_processes(&self.tools, n);
            let _ = Command::new(&self.tools.ip)
                .args(["netns", "del", n])
                .status();
        }
    }
}

/// SIGKILL to every process still in namespace `ns` (Kamailio's children
/// after its main process was killed): only processes this lab started
/// live there.
fn kill_ns_processes(tools: &Tools, ns: &str) {
    let Ok(out) = Command::new(&tools.ip).args(["netns", "pids", ns]).output() else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if pid.parse::<u32>().is_ok() {
            let _ = Command::new(&tools.kill).args(["-KILL", pid]).status();
        }
    }
}

/// Deletes the namespaces of labs whose test process is gone (killed before
/// its guard ran), so they do not pile up.
fn sweep_stale(tools: &Tools) {
    let Ok(out) = Command::new(&tools.ip).args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix("kpnat-") else {
            continue;
        };
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                kill_ns_processes(tools, name);
                let _ = Command::new(&tools.ip)
                    .args(["netns", "del", name])
                    .status();
            }
        }
    }
}

fn wait_with_deadline(
    child: &mut Child,
    limit: Duration,
) -> Result<std::process::ExitStatus, String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("process did not stop within {limit:?}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// One contact of `ul.dump`.
#[derive(Debug)]
struct UlContact {
    aor: String,
    address: String,
    received: Option<String>,
    socket: Option<String>,
}

fn ul_contacts(v: &Value) -> Vec<UlContact> {
    let text = |c: &Value, k: &str| {
        c[k].as_str()
            .filter(|s| *s != "[not set]" && !s.is_empty())
            .map(str::to_string)
    };
    let mut out = Vec::new();
    for d in v["result"]["Domains"].as_array().into_iter().flatten() {
        for a in d["Domain"]["AoRs"].as_array().into_iter().flatten() {
            let aor = a["Info"]["AoR"].as_str().unwrap_or_default().to_string();
            for c in a["Info"]["Contacts"].as_array().into_iter().flatten() {
                let c = &c["Contact"];
                out.push(UlContact {
                    aor: aor.clone(),
                    address: text(c, "Address").unwrap_or_default(),
                    received: text(c, "Received"),
                    socket: text(c, "Socket"),
                });
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Kamailio

/// The registrar. Stateless for everything but relayed requests; no NAT
/// pinging of its own (`natping_interval` 0: kaping is the pinger under
/// test); replies that match no transaction (kaping's relayed 200s) are
/// forwarded statelessly by the core to the next Via, which is the default
/// as long as no `onreply_route` drops them. `@DIR@` holds the runtime
/// files: pid file, FIFO, reply FIFOs.
const KAMAILIO_CFG: &str = r#"#!KAMAILIO
# kaping NAT lab registrar (tests/nat_proxy.rs), written per run.
debug=2
log_stderror=yes
fork=yes
children=2
auto_aliases=no
disable_tcp=yes
enable_sctp=no
dns=no
rev_dns=no
use_dns_cache=no
listen=udp:@PROXY_V4@:5060
listen=udp:[@PROXY_V6@]:5060

loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "xlog.so"
loadmodule "sanity.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
loadmodule "nathelper.so"
loadmodule "jsonrpcs.so"
loadmodule "kex.so"

# RPC over a FIFO only (no ctl, no http); replies go to FIFOs in @DIR@/.
modparam("jsonrpcs", "transport", 2)
modparam("jsonrpcs", "fifo_name", "@DIR@/rpc.fifo")
modparam("jsonrpcs", "fifo_reply_dir", "@DIR@/")
# A relayed request the NAT swallowed is answered 408 after 2 s.
modparam("tm", "fr_timer", 2000)
modparam("usrloc", "db_mode", 0)
# fix_nated_register() stores the source as the contact's Received.
modparam("nathelper", "received_avp", "$avp(RECEIVED)")
modparam("registrar", "received_avp", "$avp(RECEIVED)")
# No NAT pinging by Kamailio: kaping does it.
modparam("nathelper", "natping_interval", 0)

request_route {
	if (!mf_process_maxfwd_header("10")) {
		sl_send_reply("483", "Too Many Hops");
		exit;
	}
	if (!sanity_check("17895", "7")) {
		xlog("L_NOTICE", "sanity check failed: $rm from $si:$sp\n");
		exit;
	}
	# Behind a NAT: the Via's address (2) or port (16) is not the source.
	if (nat_uac_test("18")) {
		force_rport();
		if (is_method("REGISTER")) {
			fix_nated_register();
		} else {
			fix_nated_contact();
		}
	}
	if (is_method("REGISTER")) {
		if (!save("location")) {
			sl_reply_error();
		}
		exit;
	}
	if ($rU == $null) {
		sl_send_reply("404", "No user");
		exit;
	}
	# Sets the R-URI to the contact, the destination to its Received and
	# the outgoing socket to the one it registered on.
	if (!lookup("location")) {
		sl_send_reply("404", "Not Found");
		exit;
	}
	if (!t_relay()) {
		sl_reply_error();
	}
	exit;
}
"#;

// ---------------------------------------------------------------------------
// Scenarios

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// Every phone Up in kaping and reachable through the proxy.
    AllUpAllReachable,
    /// Every phone Down in kaping (if kaping runs) and none reachable.
    AllDownNoneReachable,
}

struct Scenario {
    name: &'static str,
    v6: bool,
    /// kaping's flags beyond the common ones; `None`: no kaping.
    kaping: Option<Vec<String>>,
    expect: Expect,
    /// Check right after registering that every phone is reachable (the
    /// lab itself works) before waiting for the bindings to expire.
    fresh_check: bool,
    /// What the replies to kaping's pings cost Kamailio.
    proxy: ProxyWork,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProxyWork {
    /// Not checked (no kaping as the proxy).
    Any,
    /// replies = relay: Kamailio forwards (statelessly) every reply.
    RelaysEveryReply,
    /// replies = divert: the replies never reach Kamailio.
    SeesNoReply,
}

impl Lab {
    /// Kamailio's count of replies it forwarded statelessly
    /// (`core:fwd_replies`), from `stats.get_statistics`.
    fn fwd_replies(&mut self) -> Result<u64, String> {
        let v = self.rpc_with("stats.get_statistics", r#"["core:"]"#)?;
        let text = v["result"].to_string();
        let at = text
            .find("fwd_replies = ")
            .ok_or_else(|| format!("no fwd_replies in {v}"))?;
        text[at + "fwd_replies = ".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .map_err(|e| format!("fwd_replies in {v}: {e}"))
    }
}

fn run_scenario(s: Scenario) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tools = match tools() {
        Ok(t) => t,
        Err(why) => {
            eprintln!("SKIP: {}: {why}", s.name);
            return;
        }
    };
    let n = phones_count();
    let mut lab = match Lab::build(tools) {
        Ok(l) => l,
        Err(why) => match why.strip_prefix("SKIP: ") {
            Some(skip) => {
                eprintln!("SKIP: {}: {skip}", s.name);
                return;
            }
            None => panic!("{}: building the lab: {why}", s.name),
        },
    };
    lab.log(&format!("{}: lab {:?}, {n} phones", s.name, lab.ns));
    if let Err(why) = lab.start_kamailio() {
        if let Some(skip) = why.strip_prefix("SKIP: ") {
            eprintln!("SKIP: {}: {skip}", s.name);
            return;
        }
        panic!("{}: {why}", s.name);
    }
    let t_phones = Instant::now();
    lab.start_phones(n, s.v6)
        .unwrap_or_else(|e| panic!("{}: {e}{}", s.name, lab.diagnostics()));
    let (dump, contacts) = lab
        .dump_contacts()
        .unwrap_or_else(|e| panic!("{}: {e}{}", s.name, lab.diagnostics()));
    check_contacts(&s, n, &contacts);
    lab.log(&format!(
        "ul.dump: {} contacts, e.g. {:?}",
        contacts.len(),
        contacts.first()
    ));

    if s.fresh_check {
        let r = lab.reach(n, s.v6).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            r["reached"].as_u64(),
            Some(u64::from(n)),
            "{}: right after registering every phone must be reachable (the lab works): {r}{}",
            s.name,
            lab.diagnostics()
        );
    }

    if let Some(extra) = &s.kaping {
        lab.start_kaping(&dump, n, extra)
            .unwrap_or_else(|e| panic!("{}: {e}{}", s.name, lab.diagnostics()));
        lab.log(&format!(
            "kaping started {:.2} s after the first REGISTER",
            t_phones.elapsed().as_secs_f64()
        ));
    }
    thread::sleep(SETTLE);
    lab.log(&format!("waited {SETTLE:?} (three NAT timeouts)"));

    if s.kaping.is_some() {
        let st = lab.kaping_stat().unwrap_or_else(|e| panic!("{e}"));
        let (up, down, unknown) = (
            st["up"].as_u64().unwrap_or(0),
            st["down"].as_u64().unwrap_or(0),
            st["unknown"].as_u64().unwrap_or(0),
        );
        lab.log(&format!(
            "kaping: up {up} down {down} unknown {unknown}, sent {} matched {} timeouts {}",
            st["sent"], st["matched"], st["timeouts"]
        ));
        let want = match s.expect {
            Expect::AllUpAllReachable => (u64::from(n), 0, 0),
            Expect::AllDownNoneReachable => (0, u64::from(n), 0),
        };
        assert_eq!(
            (up, down, unknown),
            want,
            "{}: kaping's states (up, down, unknown){}",
            s.name,
            lab.diagnostics()
        );
    }

    if s.proxy != ProxyWork::Any {
        let st = lab.kaping_stat().unwrap_or_else(|e| panic!("{e}"));
        let matched = st["matched"].as_u64().unwrap_or(0);
        let forwarded = lab.fwd_replies().unwrap_or_else(|e| panic!("{e}"));
        lab.log(&format!(
            "Kamailio forwarded {forwarded} replies statelessly; kaping matched {matched}"
        ));
        match s.proxy {
            ProxyWork::RelaysEveryReply => assert!(
                forwarded >= matched,
                "{}: Kamailio relayed {forwarded} of {matched} replies",
                s.name
            ),
            ProxyWork::SeesNoReply => {
                assert!(matched >= u64::from(n), "{}: matched {matched}", s.name);
                assert_eq!(
                    forwarded,
                    0,
                    "{}: Kamailio forwarded replies; kaping said: {}",
                    s.name,
                    lab.tail("kaping.log")
                );
            }
            ProxyWork::Any => {}
        }
    }

    let r = lab.reach(n, s.v6).unwrap_or_else(|e| panic!("{e}"));
    let reached = r["reached"].as_u64().unwrap_or(0);
    match s.expect {
        Expect::AllUpAllReachable => assert_eq!(
            reached,
            u64::from(n),
            "{}: every phone must stay reachable: {r}{}",
            s.name,
            lab.diagnostics()
        ),
        Expect::AllDownNoneReachable => {
            assert_eq!(
                reached,
                0,
                "{}: no phone may be reachable once its binding expired: {r}{}",
                s.name,
                lab.diagnostics()
            );
            // Kamailio still had every registration and relayed: the NAT
            // dropped the request (408), not a missing binding (404).
            assert_eq!(
                r["by_code"]["408"].as_u64(),
                Some(u64::from(n)),
                "{}: Kamailio must have relayed and timed out: {r}{}",
                s.name,
                lab.diagnostics()
            );
        }
    }

    lab.stop_kaping()
        .unwrap_or_else(|e| panic!("{}: {e}", s.name));
    let phones = lab
        .stop_phones()
        .unwrap_or_else(|e| panic!("{}: {e}{}", s.name, lab.diagnostics()));
    lab.log(&format!(
        "phones: registered {} (REGISTER sent {}, retransmitted {}) requests {} replies {} keepalives {} unparsable {}",
        phones["registered"],
        phones["register_sent"],
        phones["register_retransmits"],
        phones["requests"],
        phones["replies_sent"],
        phones["keepalives"],
        phones["unparsable"]
    ));
    assert_eq!(phones["registered"].as_u64(), Some(u64::from(n)));
    assert_eq!(phones["register_failed"].as_u64(), Some(0));
    if s.expect == Expect::AllUpAllReachable && s.kaping.is_some() {
        // Every phone heard kaping's OPTIONS (and reach's relayed one).
        assert_eq!(
            phones["phones_with_requests"].as_u64(),
            Some(u64::from(n)),
            "{}: {phones}",
            s.name
        );
    }
    lab.log(&format!("{}: passed", s.name));
}

fn check_contacts(s: &Scenario, n: u32, contacts: &[UlContact]) {
    assert_eq!(
        contacts.len(),
        n as usize,
        "{}: one contact per phone",
        s.name
    );
    let socket = if s.v6 {
        format!("udp:[{PROXY_V6}]:5060")
    } else {
        format!("udp:{PROXY_V4}:5060")
    };
    for c in contacts {
        assert!(c.aor.starts_with('p'), "{c:?}");
        assert_eq!(c.socket.as_deref(), Some(socket.as_str()), "{c:?}");
        if s.v6 {
            // Not translated: the contact is the phone's own address.
            assert!(c.address.contains(PHONES_V6), "{c:?}");
            assert_eq!(c.received, None, "{c:?}");
        } else {
            // fix_nated_register: the NAT's public address and mapped port.
            let r = c.received.as_deref().unwrap_or_default();
            assert!(r.starts_with("sip:203.0.113.2:"), "{c:?}");
        }
    }
}

fn kaping_flags(flags: &[&str]) -> Option<Vec<String>> {
    Some(flags.iter().map(|s| s.to_string()).collect())
}

/// Control 1: nobody keeps the bindings open; after three NAT timeouts no
/// phone is reachable through the proxy.
#[test]
fn control_no_keepalive_bindings_expire() {
    run_scenario(Scenario {
        name: "control: no kaping",
        v6: false,
        kaping: None,
        expect: Expect::AllDownNoneReachable,
        fresh_check: true,
        proxy: ProxyWork::Any,
    });
}

/// Control 2: kaping pings from its own port (5070, today's behaviour): the
/// NAT admits only the proxy's 5060, so every ping is dropped, every phone
/// is Down, and the bindings expire as if kaping were not there.
#[test]
fn control_kaping_own_port_cannot_keep_bindings() {
    let bind = format!("{PROXY_V4}:{KAPING_PORT}");
    let flags = ["--bind", &bind, "--source", "bind"]
        .map(str::to_string)
        .to_vec();
    run_scenario(Scenario {
        name: "control: kaping --source bind",
        v6: false,
        kaping: Some(flags),
        expect: Expect::AllDownNoneReachable,
        fresh_check: true,
        proxy: ProxyWork::Any,
    });
}

/// Control 3, IPv6: no translation, but the same stateful filter closes
/// the pinholes; without keepalives nothing is reachable.
#[test]
fn control_ipv6_no_keepalive_pinholes_close() {
    run_scenario(Scenario {
        name: "control: IPv6, no kaping",
        v6: true,
        kaping: None,
        expect: Expect::AllDownNoneReachable,
        fresh_check: true,
        proxy: ProxyWork::Any,
    });
}

/// kaping as the proxy, replies relayed by Kamailio (stateless forward of
/// a reply whose top Via is its own to the second Via, kaping's).
#[test]
fn kaping_as_proxy_relay_keeps_bindings() {
    run_scenario(Scenario {
        name: "kaping --source 203.0.113.10:5060 --replies relay",
        v6: false,
        kaping: kaping_flags(&[
            "--bind",
            "203.0.113.10:5070",
            "--source",
            "203.0.113.10:5060",
            "--replies",
            "relay",
        ]),
        expect: Expect::AllUpAllReachable,
        fresh_check: false,
        proxy: ProxyWork::RelaysEveryReply,
    });
}

/// kaping as the proxy, the source taken per contact from ul.dump's
/// `Socket` (`udp:203.0.113.10:5060`).
#[test]
fn kaping_as_proxy_socket_from_uldump_keeps_bindings() {
    run_scenario(Scenario {
        name: "kaping --source socket --replies relay",
        v6: false,
        kaping: kaping_flags(&[
            "--bind",
            "203.0.113.10:5070",
            "--source",
            "socket",
            "--replies",
            "relay",
        ]),
        expect: Expect::AllUpAllReachable,
        fresh_check: false,
        proxy: ProxyWork::RelaysEveryReply,
    });
}

/// kaping as the proxy, replies diverted to kaping before Kamailio sees
/// them (tc-ingress eBPF; falls back to relay where it cannot attach, so
/// the outcome is the same either way).
#[test]
fn kaping_as_proxy_divert_keeps_bindings() {
    run_scenario(Scenario {
        name: "kaping --source 203.0.113.10:5060 --replies divert",
        v6: false,
        kaping: kaping_flags(&[
            "--bind",
            "203.0.113.10:5070",
            "--source",
            "203.0.113.10:5060",
            "--replies",
            "divert",
        ]),
        expect: Expect::AllUpAllReachable,
        fresh_check: false,
        proxy: ProxyWork::SeesNoReply,
    });
}

/// IPv6: phones at 2001:db8:1::2 behind the stateful filter (no
/// translation); kaping as the proxy on [2001:db8:2::10]:5060.
#[test]
fn kaping_as_proxy_ipv6_keeps_pinholes() {
    run_scenario(Scenario {
        name: "kaping --source [2001:db8:2::10]:5060 (IPv6)",
        v6: true,
        kaping: kaping_flags(&[
            "--source",
            "[2001:db8:2::10]:5060",
            "--bind6",
            "[2001:db8:2::10]:5070",
            "--replies",
            "relay",
        ]),
        expect: Expect::AllUpAllReachable,
        fresh_check: false,
        proxy: ProxyWork::RelaysEveryReply,
    });
}
