//! `replies = divert` needs CAP_BPF and CAP_NET_ADMIN only at start: once
//! its program is attached, kaping gives both up in every thread
//! (`src/io/caps.rs`), and keeps every other capability it had.
//!
//! As root, in a private network namespace (`unshare --net`: the program
//! attaches to that namespace's `lo` only), with a stand-in proxy socket
//! bound to 127.0.0.1:5060 with SO_REUSEADDR (python3), kaping runs with
//! `--source 127.0.0.1:5060 --replies divert`; after it says the program is
//! attached and the capabilities given up, the test reads `CapEff` and
//! `CapPrm` of the process (`/proc/PID/status`) and of each of its threads
//! (`/proc/PID/task/*/status`). Prints SKIP and passes without root,
//! `unshare`, `ip` or python3, or where the kernel refuses the program
//! (kaping's own "divert unavailable" line says why).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_NET_ADMIN: u32 = 12;
const CAP_BPF: u32 = 39;

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `CapEff` and `CapPrm` of a status file.
fn caps(status_path: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(status_path).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    Some((field("CapEff:")?, field("CapPrm:")?))
}

/// The daemon (and its namespace) ends with the test, however it ends.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bit(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

#[test]
fn divert_capabilities_are_given_up_by_every_thread_once_attached() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP divert capabilities: needs root (CAP_BPF, CAP_NET_ADMIN, unshare --net)");
        return;
    }
    for tool in ["unshare", "ip", "python3"] {
        if !have(tool) {
            println!("SKIP divert capabilities: {tool} not installed");
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let contacts = dir.path().join("contacts.txt");
    std::fs::write(&contacts, "sip:u1@127.0.0.2:5062\n").unwrap();
    let shm = dir.path().join("shm");
    // The proxy stand-in binds exactly 127.0.0.1:5060 with SO_REUSEADDR,
    // as share.rs requires of a proxy kaping pings as; then kaping replaces
    // the shell (same pid, so the test knows kaping's pid).
    let script = format!(
        r#"set -e
ip link set lo up
python3 -c 'import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 5060))
time.sleep(15)' &
sleep 0.5
exec {kaping} run --allow-destinations 127.0.0.0/8 --contacts {contacts} \
  --source 127.0.0.1:5060 --replies divert --divert-interface lo \
  --bind 127.0.0.1:15070 --workers 2 --pin-workers false --max-contacts 100 \
  --shm {shm} --events none --run-for 10s"#,
        kaping = env!("CARGO_BIN_EXE_kaping"),
        contacts = contacts.display(),
        shm = shm.display(),
    );
    let mut child = Kill(
        Command::new("unshare")
            .args(["--net", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let (tx, rx) = mpsc::channel();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let verdict = loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => {
                let done = line.contains("given up by all")
                    || line.contains("divert unavailable")
                    || line.contains("could not give up");
                log.push(line.clone());
                if done {
                    break line;
                }
            }
            Err(_) => break String::new(),
        }
    };
    let check = || -> Result<Vec<String>, String> {
        if verdict.contains("divert unavailable") {
            return Err(format!("SKIP divert capabilities: {verdict}"));
        }
        assert!(
            verdict.contains("given up by all"),
            "kaping did not say it gave the capabilities up:\n{}",
            log.join("\n")
        );
        let mut seen = Vec::new();
        let main = caps(&format!("/proc/{pid}/status")).expect("kaping still running");
        seen.push(("process".to_string(), main));
        for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let tid = entry.unwrap().file_name().into_string().unwrap();
            if let Some(c) = caps(&format!("/proc/{pid}/task/{tid}/status")) {
                seen.push((format!("thread {tid}"), c));
            }
        }
        assert!(seen.len() >= 3, "main thread and two workers: {seen:?}");
        let mut lines = Vec::new();
        for (who, (eff, prm)) in &seen {
            for (name, cap) in [("CAP_BPF", CAP_BPF), ("CAP_NET_ADMIN", CAP_NET_ADMIN)] {
                assert!(
                    !bit(*eff, cap) && !bit(*prm, cap),
                    "{who} still holds {name}: CapEff {eff:016x} CapPrm {prm:016x}"
                );
            }
            // Only those two: root keeps the rest (here, CAP_DAC_OVERRIDE).
            assert!(
                bit(*eff, CAP_DAC_OVERRIDE),
                "{who} lost more than the two: CapEff {eff:016x}"
            );
            lines.push(format!("{who}: CapEff {eff:016x} CapPrm {prm:016x}"));
        }
        Ok(lines)
    };
    let outcome = check();
    drop(child);
    match outcome {
        Ok(lines) => println!("{}", lines.join("\n")),
        Err(skip) => println!("{skip}"),
    }
}
