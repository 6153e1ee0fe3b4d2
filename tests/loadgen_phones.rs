//! `kaping-loadgen phones` on loopback against a registrar played by the
//! test: the REGISTER a phone sends (RFC 3261 §10.2), its retransmission
//! (timer E), the refresh before the granted expiry, and the responses it
//! gives to requests, sent where RFC 3261 §18.2.2 and RFC 3581 say.
//! No root, no namespaces: the NAT lab (`nat_proxy.rs`) is where the phones
//! meet a real registrar and a NAT.

mod common;
use common::free_ports;
use std::io::Read;
use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn loadgen() -> &'static str {
    env!("CARGO_BIN_EXE_kaping-loadgen")
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn recv_text(sock: &UdpSocket) -> Option<(String, std::net::SocketAddr)> {
    let mut buf = [0u8; 4096];
    let (n, from) = sock.recv_from(&mut buf).ok()?;
    Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}

/// 200 OK to a REGISTER, granting `expires` to its Contact.
fn ok_to_register(reg: &str, expires: u32) -> String {
    let via = header(reg, "Via").unwrap();
    let contact = header(reg, "Contact").unwrap();
    format!(
        "SIP/2.0 200 OK\r\nVia: {via};received=127.0.0.1\r\nFrom: {}\r\nTo: {};tag=reg\r\n\
Call-ID: {}\r\nCSeq: {}\r\nContact: {contact};expires={expires}\r\nContent-Length: 0\r\n\r\n",
        header(reg, "From").unwrap(),
        header(reg, "To").unwrap(),
        header(reg, "Call-ID").unwrap(),
        header(reg, "CSeq").unwrap(),
    )
}

fn branch(msg: &str) -> &str {
    let via = header(msg, "Via").unwrap();
    via.split(';')
        .find_map(|p| p.strip_prefix("branch="))
        .unwrap()
}

#[test]
fn phones_register_refresh_and_answer_per_rfc3261_and_3581() {
    let registrar = UdpSocket::bind("127.0.0.1:0").unwrap();
    registrar
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let reg_port = registrar.local_addr().unwrap().port();
    let port = free_ports(2);
    let mut child = Command::new(loadgen())
        .args(["phones", "--count", "2", "--bind", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .args(["--register", &format!("sip:127.0.0.1:{reg_port}")])
        .args(["--domain", "example.com", "--ramp", "0", "--expires", "60"])
        .args(["--stop-on-stdin-eof", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // Phone 0's first REGISTER goes unanswered: it must come again after
    // T1 (500 ms) with the same branch and CSeq. Phone 1 is answered at once.
    let mut first_p0: Option<(String, Instant)> = None;
    let mut p0_registered_at = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while p0_registered_at.is_none() && Instant::now() < deadline {
        let (reg, from) = recv_text(&registrar).expect("a REGISTER");
        assert!(
            reg.starts_with("REGISTER sip:example.com SIP/2.0\r\n"),
            "{reg}"
        );
        let user = if reg.contains("<sip:p0@") { "p0" } else { "p1" };
        let phone_port = if user == "p0" { port } else { port + 1 };
        assert_eq!(from.port(), phone_port);
        assert_eq!(
            header(&reg, "Contact"),
            Some(format!("<sip:{user}@127.0.0.1:{phone_port}>").as_str())
        );
        assert_eq!(
            header(&reg, "To"),
            Some(format!("<sip:{user}@example.com>").as_str())
        );
        assert!(header(&reg, "From").unwrap().contains(";tag="));
        assert_eq!(header(&reg, "Expires"), Some("60"));
        assert_eq!(header(&reg, "Max-Forwards"), Some("70"));
        let via = header(&reg, "Via").unwrap();
        assert!(via.starts_with(&format!(
            "SIP/2.0/UDP 127.0.0.1:{phone_port};branch=z9hG4bK"
        )));
        assert!(via.ends_with(";rport"), "{via}");
        if user == "p1" {
            registrar
                .send_to(ok_to_register(&reg, 60).as_bytes(), from)
                .unwrap();
            continue;
        }
        match &first_p0 {
            None => first_p0 = Some((reg, Instant::now())),
            Some((first, at)) => {
                // Timer E: the same transaction, about T1 later.
                let gap = at.elapsed();
                assert!(
                    gap >= Duration::from_millis(400) && gap < Duration::from_millis(1500),
                    "{gap:?}"
                );
                assert_eq!(branch(&reg), branch(first));
                assert_eq!(header(&reg, "CSeq"), header(first, "CSeq"));
                // Grant 2 s: the refresh must come 1.0..1.6 s later.
                registrar
                    .send_to(ok_to_register(&reg, 2).as_bytes(), from)
                    .unwrap();
                p0_registered_at = Some(Instant::now());
            }
        }
    }
    let (first, _) = first_p0.expect("phone 0 registered");
    let registered_at = p0_registered_at.expect("phone 0 retransmitted");
    let refresh = loop {
        let (reg, from) = recv_text(&registrar).expect("a refresh");
        if reg.contains("<sip:p0@") {
            registrar
                .send_to(ok_to_register(&reg, 60).as_bytes(), from)
                .unwrap();
            break reg;
        }
    };
    let after = registered_at.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2000),
        "refresh after {after:?}"
    );
    assert_eq!(header(&refresh, "Call-ID"), header(&first, "Call-ID"));
    assert_ne!(branch(&refresh), branch(&first));
    let cseq = |m: &str| -> u32 {
        header(m, "CSeq")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(cseq(&refresh), cseq(&first) + 1);

    // Requests to phone 1. `a` sends; `b` is the port its Via names.
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
    }
    let b_port = b.local_addr().unwrap().port();
    let phone1 = format!("127.0.0.1:{}", port + 1);
    let options = |rport: &str, n: u32| {
        format!(
            "OPTIONS sip:p1@127.0.0.1:{} SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:{b_port};branch=z9hG4bK.t{n}{rport}\r\n\
Via: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK.second\r\n\
Max-Forwards: 70\r\nFrom: <sip:kaping@127.0.0.1>;tag=f{n}\r\nTo: <sip:p1@example.com>\r\n\
Call-ID: c{n}@127.0.0.1\r\nCSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n",
            port + 1
        )
    };
    // RFC 3581: `rport` sends the response to the source (a), not to the
    // Via's port (b).
    a.send_to(options(";rport", 1).as_bytes(), &phone1).unwrap();
    let (resp, from) = recv_text(&a).expect("the response at the source port");
    assert_eq!(from.to_string(), phone1);
    assert!(resp.starts_with("SIP/2.0 200 OK\r\n"), "{resp}");
    let a_port = a.local_addr().unwrap().port();
    let vias: Vec<&str> = resp.lines().filter(|l| l.starts_with("Via:")).collect();
    assert_eq!(
        vias,
        [
            format!(
                "Via: SIP/2.0/UDP 127.0.0.1:{b_port};branch=z9hG4bK.t1;rport={a_port};received=127.0.0.1"
            )
            .as_str(),
            "Via: SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK.second"
        ]
    );
    assert_eq!(header(&resp, "Server"), Some("kaping-loadgen phone p1"));
    assert!(header(&resp, "To")
        .unwrap()
        .starts_with("<sip:p1@example.com>;tag="));
    assert_eq!(header(&resp, "CSeq"), Some("1 OPTIONS"));
    assert_eq!(header(&resp, "Call-ID"), Some("c1@127.0.0.1"));
    assert_eq!(header(&resp, "Content-Length"), Some("0"));
    // §18.2.2 without rport: the sent-by (the source's IP) at the Via's port.
    a.send_to(options("", 2).as_bytes(), &phone1).unwrap();
    let (resp, _) = recv_text(&b).expect("the response at the Via port");
    assert_eq!(header(&resp, "CSeq"), Some("2 OPTIONS"));
    // A keepalive is counted, never answered.
    a.send_to(b"\r\n\r\n", &phone1).unwrap();
    a.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(recv_text(&a).is_none());

    drop(child.stdin.take());
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(child.wait().unwrap().success());
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["phones"], 2);
    assert_eq!(v["registered"], 2);
    assert!(v["register_retransmits"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["requests"]["OPTIONS"], 2);
    assert_eq!(v["replies_sent"], 2);
    assert_eq!(v["keepalives"], 1);
    assert_eq!(v["unparsable"], 0);
}
