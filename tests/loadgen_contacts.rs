//! `kaping-loadgen contacts`: output shape, distinctness, fates file, errors.

use std::collections::HashSet;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_kaping-loadgen");

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run kaping-loadgen")
}

#[test]
fn writes_distinct_uris_over_127_slash_8() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("contacts.txt");
    let out = run(&[
        "contacts",
        "--count",
        "70000",
        "--port",
        "5070",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 70000);
    assert_eq!(lines[0], "sip:u0@127.0.0.1:5070");
    assert_eq!(lines[253], "sip:u253@127.0.0.254:5070");
    assert_eq!(lines[254], "sip:u254@127.0.1.1:5070");
    assert_eq!(lines[65024], "sip:u65024@127.1.0.1:5070");
    let mut hosts = HashSet::new();
    for (i, line) in lines.iter().enumerate() {
        let rest = line
            .strip_prefix(&format!("sip:u{i}@"))
            .unwrap_or_else(|| panic!("line {i}: {line}"));
        let (host, port) = rest.rsplit_once(':').unwrap();
        assert_eq!(port, "5070");
        let ip: std::net::Ipv4Addr = host.parse().unwrap();
        let o = ip.octets();
        assert_eq!(o[0], 127);
        assert!(o[3] != 0 && o[3] != 255, "{ip}");
        assert!(hosts.insert(ip), "address {ip} repeated");
    }
}

#[test]
fn ports_and_ipv6() {
    let out = run(&[
        "contacts", "--count", "5", "--port", "6000", "--ports", "2", "--ipv6",
    ]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "sip:u0@[::1]:6000\nsip:u1@[::1]:6001\nsip:u2@[::1]:6000\nsip:u3@[::1]:6001\nsip:u4@[::1]:6000\n"
    );
    let out = run(&["contacts", "--count", "4", "--port", "6000", "--ports", "2"]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "sip:u0@127.0.0.1:6000\nsip:u1@127.0.0.1:6001\nsip:u2@127.0.0.2:6000\nsip:u3@127.0.0.2:6001\n"
    );
}

#[test]
fn fates_file_matches_contacts_and_proportions() {
    let dir = tempfile::tempdir().unwrap();
    let fates = dir.path().join("fates.tsv");
    let out = run(&[
        "contacts",
        "--count",
        "20000",
        "--dead",
        "0.1",
        "--error",
        "0.05",
        "--error-code",
        "480",
        "--flap",
        "0.02",
        "--seed",
        "9",
        "--fates",
        fates.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let contacts = String::from_utf8(out.stdout).unwrap();
    let fates = std::fs::read_to_string(&fates).unwrap();
    let (mut dead, mut error, mut flap) = (0, 0, 0);
    for (c, f) in contacts.lines().zip(fates.lines()) {
        let (uri, fate) = f.split_once('\t').unwrap();
        assert_eq!(uri, c);
        match fate {
            "ok" => {}
            "dead" => dead += 1,
            "error:480" => error += 1,
            f if f.starts_with("flap:") => {
                let phase: u64 = f[5..].parse().unwrap();
                assert!(phase < 10_000);
                flap += 1
            }
            other => panic!("unknown fate {other}"),
        }
    }
    assert_eq!(fates.lines().count(), 20000);
    assert!((1700..2300).contains(&dead), "dead {dead}");
    assert!((800..1200).contains(&error), "error {error}");
    assert!((250..550).contains(&flap), "flap {flap}");
}

#[test]
fn bad_options_fail_with_a_message() {
    for args in [
        &[
            "contacts", "--count", "1", "--port", "65535", "--ports", "2",
        ][..],
        &[
            "contacts", "--count", "1", "--dead", "0.7", "--error", "0.7",
        ][..],
        &["contacts", "--count", "1", "--error-code", "99"][..],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("error:"));
    }
}
