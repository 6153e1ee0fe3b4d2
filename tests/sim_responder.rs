//! `kaping::sim::Responder` in-process, as `kaping demo` uses it: a few
//! hundred OPTIONS to contacts spread over 127.0.0.0/8 with dead and error
//! fates; every reply checked against the fate the plan predicts, and the
//! counters `stop` returns checked against what the client saw.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use kaping::sim::{
    contact_addr, contact_uri, Counters, Fate, FatePlan, ListenSpec, Responder, ServeConfig,
};

const CONTACTS: u64 = 300;

/// An OPTIONS in kaping's template shape; the Call-ID carries `i`.
fn options(uri: &str, local: SocketAddr, i: u64) -> String {
    format!(
        "OPTIONS {uri} SIP/2.0\r\n\
Via: SIP/2.0/UDP {local};branch=z9hG4bKsim{i:08}\r\n\
Max-Forwards: 70\r\n\
From: <sip:kaping@127.0.0.1>;tag=sim{i:08}\r\n\
To: <{uri}>\r\n\
Call-ID: sim{i:08}@127.0.0.1\r\n\
CSeq: 0000000001 OPTIONS\r\n\
Content-Length: 0\r\n\r\n"
    )
}

#[test]
fn answers_in_process_with_dead_and_error_fates() {
    let plan = FatePlan::new(11, 0.25, 0.25, 486, 0.0, 1000).unwrap();
    let mut cfg = ServeConfig::new(vec![ListenSpec::parse("0.0.0.0:0").unwrap()], plan.clone());
    cfg.threads = 2;
    let responder = Responder::spawn(cfg).unwrap();
    let port = responder.local_addrs()[0].port();

    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let local = sock.local_addr().unwrap();
    // Read concurrently: 300 replies can overflow a default receive buffer.
    let reader = {
        let sock = sock.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            let mut last = Instant::now();
            while last.elapsed() < Duration::from_millis(500) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    got.push((String::from_utf8(buf[..n].to_vec()).unwrap(), from));
                    last = Instant::now();
                }
            }
            got
        })
    };

    let mut expected: HashMap<u64, (SocketAddr, Option<u16>)> = HashMap::new();
    for i in 0..CONTACTS {
        let uri = contact_uri(i, port, 1, false);
        let dest = contact_addr(i, port, 1, false);
        let code = match plan.fate(plan.contact_hash(uri.as_bytes())) {
            Fate::Ok => Some(200),
            Fate::Error(code) => Some(code),
            Fate::Dead => None,
            Fate::Flap { .. } => unreachable!("no flapping in this plan"),
        };
        expected.insert(i, (dest, code));
        sock.send_to(options(&uri, local, i).as_bytes(), dest)
            .unwrap();
        if i % 64 == 63 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert_eq!(
        contact_addr(254, port, 1, false).ip().to_string(),
        "127.0.1.1"
    );

    let mut got: HashMap<u64, u16> = HashMap::new();
    for (resp, from) in reader.join().unwrap() {
        let i: u64 = resp
            .split("\r\n")
            .find_map(|l| l.strip_prefix("Call-ID: sim"))
            .and_then(|rest| rest.get(..8))
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("no Call-ID in {resp:?}"));
        let code: u16 = resp[8..11].parse().unwrap();
        let (dest, want) = expected[&i];
        assert_eq!(from, dest, "contact {i} answers from the pinged address");
        assert_eq!(Some(code), want, "contact {i}: {resp}");
        assert!(resp.contains(&format!(
            "\r\nFrom: <sip:kaping@127.0.0.1>;tag=sim{i:08}\r\n"
        )));
        assert!(resp.ends_with("\r\nContent-Length: 0\r\n\r\n"));
        assert!(got.insert(i, code).is_none(), "one reply per request");
    }
    let dead = expected.values().filter(|(_, c)| c.is_none()).count() as u64;
    let errors = expected.values().filter(|(_, c)| *c == Some(486)).count() as u64;
    assert!(dead > 40 && errors > 40, "dead {dead}, errors {errors}");
    assert_eq!(
        got.len() as u64,
        CONTACTS - dead,
        "every live contact answered"
    );

    let live = responder.counters();
    let c = responder.stop();
    assert_eq!(live, c, "all published before stop");
    assert_eq!(
        c,
        Counters {
            received: CONTACTS,
            answered: CONTACTS - dead,
            dead_dropped: dead,
            errors_sent: errors,
            ..Counters::default()
        }
    );
}

#[test]
fn dropping_a_responder_stops_it() {
    let plan = FatePlan::new(0, 0.0, 0.0, 503, 0.0, 1000).unwrap();
    let cfg = ServeConfig::new(vec![ListenSpec::parse("127.0.0.1:0").unwrap()], plan);
    let responder = Responder::spawn(cfg).unwrap();
    let addr = responder.local_addrs()[0];
    drop(responder);
    // The sockets were closed with the threads: the port can be bound again.
    UdpSocket::bind(addr).expect("port released on drop");
}
