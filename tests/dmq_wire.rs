//! The DMQ wire layer against a real Kamailio (Debian 5.6.3 when written):
//! the test is a passive DMQ node on a plain `UdpSocket` that uses only
//! `kaping::registrar` to read and write. It answers Kamailio's start-up
//! node list and sync request, joins, asks for a sync, and follows 20
//! REGISTERs (action 1) and 5 unREGISTERs (action 2).
//!
//! Skips (and says so) when `kamailio` is not installed. Kamailio runs in
//! its own process group, killed as a whole on drop.

mod common;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kaping::registrar::dmq::{self, Message, RequestSpec, StartLine};
use kaping::registrar::usrloc::{self, Action, Change, UsrlocMsg};

/// What kamailio.cfg needs for kaping to be a DMQ node (README quotes it).
/// `KAM` is Kamailio's own address, `NODE` kaping's.
const DMQ_CFG_BLOCK: &str = r#"
# --- kaping: DMQ node (begin) ---
loadmodule "dmq.so"
loadmodule "dmq_usrloc.so"
modparam("dmq", "server_address", "sip:KAM")
modparam("dmq", "notification_address", "sip:NODE")
modparam("dmq_usrloc", "enable", 1)
# in request_route, first:  if (method == "KDMQ") { dmq_handle_message(); exit; }
# --- kaping: DMQ node (end) ---
"#;

fn config(kam: SocketAddr, node: SocketAddr) -> String {
    let block = DMQ_CFG_BLOCK
        .replace("KAM", &kam.to_string())
        .replace("NODE", &node.to_string());
    format!(
        r#"#!KAMAILIO
debug=2
log_stderror=yes
children=2
auto_aliases=no
listen=udp:{kam}
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "pv.so"
loadmodule "usrloc.so"
loadmodule "registrar.so"
{block}
request_route {{
	if (method == "KDMQ") {{ dmq_handle_message(); exit; }}
	if (method == "REGISTER") {{ if (!save("location")) sl_reply_error(); exit; }}
	sl_send_reply("404", "Not here");
}}
"#
    )
}

/// Kamailio in its own process group; TERM then KILL to the group on drop.
struct Kamailio {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The children may outlive the main process: always KILL the group.
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

fn start_kamailio(kam: SocketAddr, node: SocketAddr) -> Option<Kamailio> {
    if Command::new("kamailio").arg("-v").output().is_err() {
        eprintln!("SKIP: kamailio is not installed");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kamailio.cfg");
    std::fs::write(&cfg, config(kam, node)).unwrap();
    let log = std::fs::File::create(dir.path().join("kamailio.log")).unwrap();
    let child = Command::new("kamailio")
        .arg("-f")
        .arg(&cfg)
        .args(["-DD", "-E", "-w"])
        .arg(dir.path())
        .arg("-Y")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap();
    Some(Kamailio { child, _dir: dir })
}

/// The node: one socket, answers every KDMQ request with 200.
struct Node {
    sock: UdpSocket,
    addr: SocketAddr,
    kam: SocketAddr,
    cseq: u32,
}

enum Event {
    Request {
        channel: String,
        body: Vec<u8>,
    },
    Response {
        status: u16,
        call_id: String,
        body: Vec<u8>,
    },
}

impl Node {
    fn send(&mut self, channel: &str, body: &[u8], content_type: &str, max_forwards: u8) -> String {
        self.cseq += 1;
        let call_id = format!("{}-{}@kaping", self.cseq, std::process::id());
        let mut out = Vec::new();
        dmq::write_request(
            &RequestSpec {
                channel,
                target: self.kam,
                local: self.addr,
                branch: &format!("kp{}", self.cseq),
                call_id: &call_id,
                from_tag: "kpnode",
                cseq: self.cseq,
                body,
                content_type,
                max_forwards,
            },
            &mut out,
        );
        self.sock.send_to(&out, self.kam).unwrap();
        call_id
    }

    /// The next KDMQ message; requests are answered 200 before returning.
    fn next(&mut self, deadline: Instant) -> Option<Event> {
        let mut buf = vec![0u8; 65_536];
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let Ok((n, from)) = self.sock.recv_from(&mut buf) else {
                continue;
            };
            let m: Message = dmq::parse_message(&buf[..n])
                .unwrap_or_else(|e| panic!("{}: {}", e.name(), String::from_utf8_lossy(&buf[..n])));
            match m.start {
                StartLine::Request { channel, .. } => {
                    let mut out = Vec::new();
                    dmq::write_response(&m, 200, "OK", "kpnode", &mut out);
                    self.sock.send_to(&out, from).unwrap();
                    return Some(Event::Request {
                        channel: channel.to_owned(),
                        body: m.body.to_vec(),
                    });
                }
                StartLine::Response { status, .. } => {
                    return Some(Event::Response {
                        status,
                        call_id: m.call_id.to_owned(),
                        body: m.body.to_vec(),
                    })
                }
            }
        }
    }

    /// Collects usrloc changes until `want` returns true or the deadline.
    fn changes_until(
        &mut self,
        deadline: Instant,
        got: &mut Vec<Change>,
        mut want: impl FnMut(&[Change]) -> bool,
    ) {
        while !want(got) {
            match self.next(deadline) {
                None => return,
                Some(Event::Request { channel, body }) if channel == "usrloc" => {
                    match usrloc::parse_body(&body).unwrap() {
                        UsrlocMsg::Changes(c) => got.extend(c),
                        UsrlocMsg::SyncRequest => {}
                    }
                }
                Some(_) => {}
            }
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn kaping_follows_kamailio_over_dmq() {
    let base = common::free_ports(2);
    let kam: SocketAddr = format!("127.0.0.1:{base}").parse().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", base + 1).parse().unwrap();
    let mut node = Node {
        sock: UdpSocket::bind(addr).unwrap(),
        addr,
        kam,
        cseq: 0,
    };
    let Some(_kamailio) = start_kamailio(kam, addr) else {
        return;
    };
    let started = Instant::now();

    // 1. Kamailio asks its notification_address (us) for the node list,
    //    then, once answered, asks every node for a sync: a passive node
    //    answers 200 (done in `next`) and sends nothing.
    let deadline = Instant::now() + Duration::from_secs(6);
    let (mut listed, mut sync_asked) = (false, false);
    while !(listed && sync_asked) {
        match node
            .next(deadline)
            .expect("no start-up node list and sync request")
        {
            Event::Request { channel, body } if channel == dmq::CHANNEL_NOTIFICATION => {
                let nodes = dmq::parse_node_list(&body).unwrap();
                listed = nodes.iter().any(|n| n.addr == Some(kam));
            }
            Event::Request { channel, body } if channel == dmq::CHANNEL_USRLOC => {
                sync_asked = usrloc::parse_body(&body).unwrap() == UsrlocMsg::SyncRequest;
                assert_eq!(body, usrloc::sync_request_body());
            }
            _ => {}
        }
    }

    // 2. Join (also how kaping gets in when Kamailio started first).
    let join = dmq::join_body(addr);
    let call_id = node.send(
        dmq::CHANNEL_NOTIFICATION,
        join.as_bytes(),
        dmq::CONTENT_TYPE_NODES,
        1,
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match node.next(deadline).expect("no answer to the join") {
            Event::Response {
                status,
                call_id: c,
                body,
            } if c == call_id => {
                assert_eq!(status, 200);
                let nodes = dmq::parse_node_list(&body).unwrap();
                assert!(nodes.iter().any(|n| n.addr == Some(addr)), "we are listed");
                assert!(
                    nodes.iter().any(|n| n.addr == Some(kam)),
                    "Kamailio lists itself"
                );
                break;
            }
            _ => {}
        }
    }

    // 3. 20 REGISTERs arrive live as action 1.
    let t0 = now();
    for i in 0..20 {
        common::register(kam, i, 300, 1);
    }
    let mut live = Vec::new();
    node.changes_until(Instant::now() + Duration::from_secs(4), &mut live, |c| {
        c.len() >= 20
    });
    assert_eq!(live.len(), 20, "live inserts");
    let mut ruids = HashMap::new();
    for c in &live {
        assert_eq!(c.action, Action::Upsert);
        let i: u32 = c.aor.strip_prefix('u').unwrap().parse().unwrap();
        assert_eq!(c.contact, format!("sip:u{i}@127.0.0.1:{}", 40_000 + i));
        assert!(
            (t0 + 299..=now() + 301).contains(&c.expires),
            "absolute expires {}",
            c.expires
        );
        assert_eq!(
            c.callid.as_deref(),
            Some(format!("reg{i}@kaping-test").as_str())
        );
        ruids.insert(c.aor.clone(), c.ruid.clone());
    }
    assert_eq!(ruids.len(), 20);

    // 4. Our sync request: every contact again, then the 200.
    let call_id = node.send(
        dmq::CHANNEL_USRLOC,
        usrloc::sync_request_body(),
        dmq::CONTENT_TYPE_JSON,
        1,
    );
    let deadline = Instant::now() + Duration::from_secs(4);
    let (mut synced, mut answered) = (Vec::new(), false);
    while !(answered && synced.len() >= 20) {
        match node.next(deadline).expect("sync incomplete") {
            Event::Request { channel, body } if channel == dmq::CHANNEL_USRLOC => {
                let UsrlocMsg::Changes(c) = usrloc::parse_body(&body).unwrap() else {
                    panic!("sync request in a sync answer")
                };
                synced.extend(c);
            }
            Event::Response {
                status, call_id: c, ..
            } if c == call_id => {
                assert_eq!(status, 200);
                answered = true;
            }
            _ => {}
        }
    }
    for c in &synced {
        assert_eq!(c.action, Action::Upsert);
        assert_eq!(
            ruids.get(&c.aor),
            Some(&c.ruid),
            "sync carries the live ruid"
        );
    }

    // 5. 5 unREGISTERs arrive as action 2 with the same ruid.
    for i in 0..5 {
        common::register(kam, i, 0, 2);
    }
    let mut gone = Vec::new();
    node.changes_until(Instant::now() + Duration::from_secs(4), &mut gone, |c| {
        c.len() >= 5
    });
    assert_eq!(gone.len(), 5, "deletes");
    for c in &gone {
        assert_eq!(c.action, Action::Delete);
        assert_eq!(ruids.get(&c.aor), Some(&c.ruid));
    }
    eprintln!(
        "dmq_wire: {} live upserts, {} synced, {} deletes in {:?}",
        live.len(),
        synced.len(),
        gone.len(),
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}
