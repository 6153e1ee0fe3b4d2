//! `--shard K/N` (DESIGN §11): N instances fed the same contacts hold
//! disjoint sets whose union is every contact, say which shard they are
//! (kaping-stat, Prometheus), and refuse another shard's contact on the
//! control socket with the owner named. Loopback only; nothing is
//! answered (the contacts' liveness does not matter here).

mod common;
use common::{free_ports, wait_with_deadline};

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kaping::contact::shard_of;
use kaping::shm::reader::ShmReader;

const CONTACTS: u32 = 3_000;

fn kaping() -> &'static str {
    env!("CARGO_BIN_EXE_kaping")
}

/// Runs one instance of shard `k` of `n` over `contacts`; returns its stderr.
fn run_shard(dir: &Path, contacts: &Path, k: u32, n: u32) -> String {
    let mut child = Command::new(kaping())
        .arg("run")
        .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
        .arg("--contacts")
        .arg(contacts)
        .arg("--shm")
        .arg(dir.join(format!("shard{k}.shm")))
        .args([
            "--bind",
            &format!("127.0.0.1:{}", free_ports(1)),
            "--workers",
            "1",
        ])
        .args([
            "--shard",
            &format!("{k}/{n}"),
            "--events",
            "none",
            "--run-for",
            "1s",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_deadline(&mut child, Duration::from_secs(30));
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    err
}

/// The (AoR, URI) of every contact in a shm file.
fn held(shm: &Path) -> HashSet<String> {
    let r = ShmReader::open(shm).unwrap();
    let (mut uri, mut aor) = (Vec::new(), Vec::new());
    let mut out = HashSet::new();
    for w in 0..r.header().workers {
        for s in 0..r.header().slots_per_worker {
            if r.read_contact(w, s, &mut uri, &mut aor).is_some() {
                out.insert(String::from_utf8(uri.clone()).unwrap());
            }
        }
    }
    out
}

#[test]
fn two_shards_hold_disjoint_sets_whose_union_is_every_contact() {
    let dir = tempfile::tempdir().unwrap();
    let contacts = dir.path().join("contacts.jsonl");
    let mut text = String::new();
    let mut all = HashSet::new();
    for i in 0..CONTACTS {
        let uri = format!("sip:p{i}@127.0.{}.{}:{}", i / 250, 1 + i % 250, 20_000 + i);
        text.push_str(&format!("{{\"uri\":\"{uri}\",\"aor\":\"p{i}\"}}\n"));
        all.insert(uri);
    }
    std::fs::write(&contacts, text).unwrap();
    let e0 = run_shard(dir.path(), &contacts, 0, 2);
    let e1 = run_shard(dir.path(), &contacts, 1, 2);
    let (s0, s1) = (
        held(&dir.path().join("shard0.shm")),
        held(&dir.path().join("shard1.shm")),
    );
    assert!(s0.is_disjoint(&s1));
    assert_eq!(s0.union(&s1).cloned().collect::<HashSet<_>>(), all);
    // Each near half, and exactly the contacts the shard function names.
    assert!((1300..1700).contains(&s0.len()), "{}", s0.len());
    for (i, uri) in (0..CONTACTS).map(|i| {
        (
            i,
            format!("sip:p{i}@127.0.{}.{}:{}", i / 250, 1 + i % 250, 20_000 + i),
        )
    }) {
        let owner = shard_of(Some(&format!("p{i}")), &uri, 2);
        assert_eq!(s0.contains(&uri), owner == 0, "{uri}");
    }
    assert!(
        e0.contains(&format!(
            "{} contacts loaded, 0 skipped, {} left to other shards",
            s0.len(),
            s1.len()
        )),
        "{e0}"
    );
    assert!(e1.contains("left to other shards"), "{e1}");
    // kaping-stat says which shard a file is, in text, JSON and Prometheus.
    let stat = env!("CARGO_BIN_EXE_kaping-stat");
    let shm0 = dir.path().join("shard0.shm");
    let out = Command::new(stat).arg("--shm").arg(&shm0).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("shard 0 of 2"), "{text}");
    let out = Command::new(stat)
        .arg("--shm")
        .arg(&shm0)
        .args(["--json", "--interval", "0"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["shard"], serde_json::json!({"index": 0, "count": 2}));
    let out = Command::new(stat)
        .arg("--shm")
        .arg(dir.path().join("shard1.shm"))
        .args(["prometheus", "--once"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("shard=\"1/2\""), "{text}");
}

#[test]
fn the_control_socket_refuses_another_shards_contact_naming_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let mut child = Command::new(kaping())
        .arg("run")
        .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
        .arg("--control")
        .arg(&sock)
        .arg("--shm")
        .arg(dir.path().join("k.shm"))
        .args([
            "--bind",
            &format!("127.0.0.1:{}", free_ports(1)),
            "--workers",
            "1",
        ])
        .args(["--shard", "1/3", "--events", "none", "--run-for", "20s"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // One contact of each shard.
    let pick = |want: u32| {
        (0..)
            .map(|i| format!("sip:c{i}@127.0.0.9:5060"))
            .find(|u| shard_of(None, u, 3) == want)
            .unwrap()
    };
    let add = |uri: &str| {
        Command::new(kaping())
            .arg("ctl")
            .arg("--control")
            .arg(&sock)
            .args(["keepalive.add", uri])
            .output()
            .unwrap()
    };
    let mine = add(&pick(1));
    assert!(
        mine.status.success(),
        "{}",
        String::from_utf8_lossy(&mine.stderr)
    );
    let other = add(&pick(2));
    assert!(!other.status.success());
    let e = String::from_utf8_lossy(&other.stderr);
    assert!(
        e.contains("belongs to shard 2/3; this instance keeps shard 1/3"),
        "{e}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
