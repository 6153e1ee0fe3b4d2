//! Removing dead contacts from the registrar (DESIGN §11): Kamailio's
//! `ul.rm_contact <table> <AoR> <contact>` over its jsonrpcs datagram
//! socket (`modparam("jsonrpcs", "transport", 4)`, `dgram_socket`; stock
//! configs open `/run/kamailio/kamailio_rpc.sock`).
//!
//! One thread owns the client socket, bound to an abstract address of its
//! own (Kamailio answers to the sender's address; nothing is left on disk),
//! and sends the removals it is handed at most `rate` per second, one at a
//! time, each answered before the next: a removal refused for lack of an
//! answer is tried again with a doubling pause, [`TRIES`] times in all.
//! The outcome of each is counted. Whether to remove at all (the guard
//! against an outage on kaping's side) is the daemon's decision, made
//! before anything reaches this thread.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};

/// Attempts per removal.
pub const TRIES: u32 = 3;
/// How long an answer is waited for.
const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// One contact to remove from the registrar's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removal {
    pub aor: String,
    pub contact: String,
}

/// Outcomes, shared with the daemon for stats.
#[derive(Debug, Default)]
pub struct RemoverCounters {
    /// Kamailio removed the contact.
    pub removed: AtomicU64,
    /// Kamailio no longer had it (404): gone already.
    pub not_found: AtomicU64,
    /// Refused with another error, or unanswered after every try.
    pub failed: AtomicU64,
    /// Attempts that got no answer (each retried).
    pub unanswered: AtomicU64,
}

/// The remover thread. Dropping it stops the thread (removals not yet
/// sent are dropped; the contacts expire in the registrar by themselves).
pub struct Remover {
    tx: Option<Sender<Removal>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub counters: Arc<RemoverCounters>,
}

impl Remover {
    pub fn start(rpc: PathBuf, table: String, rate: u32) -> io::Result<Remover> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("kaping-rpc-{}-{n}", std::process::id());
        let socket = UnixDatagram::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)?;
        socket.set_read_timeout(Some(ANSWER_WAIT))?;
        let (tx, rx) = channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(RemoverCounters::default());
        let (stop2, counters2) = (stop.clone(), counters.clone());
        let thread = std::thread::Builder::new()
            .name("kaping-rpc".into())
            .spawn(move || run(socket, &rpc, &table, rate.max(1), rx, &stop2, &counters2))?;
        Ok(Remover {
            tx: Some(tx),
            stop,
            thread: Some(thread),
            counters,
        })
    }

    pub fn remove(&self, r: Removal) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(r);
        }
    }
}

impl Drop for Remover {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The JSON-RPC request of one removal.
pub fn rm_contact_request(table: &str, r: &Removal, id: u64) -> String {
    serde_json::json!({
        "jsonrpc": "2.0",
        "method": "ul.rm_contact",
        "params": [table, r.aor, r.contact],
        "id": id,
    })
    .to_string()
}

/// What an answer says: `Ok(true)` removed, `Ok(false)` not found (404),
/// `Err` any other error, with its text.
pub fn rm_contact_outcome(answer: &[u8]) -> Result<bool, String> {
    let v: serde_json::Value =
        serde_json::from_slice(answer).map_err(|e| format!("not JSON: {e}"))?;
    match v.get("error") {
        None => Ok(true),
        Some(e) if e["code"] == 404 => Ok(false),
        Some(e) => Err(e.to_string()),
    }
}

fn run(
    socket: UnixDatagram,
    rpc: &Path,
    table: &str,
    rate: u32,
    rx: Receiver<Removal>,
    stop: &AtomicBool,
    c: &RemoverCounters,
) {
    let gap = Duration::from_secs(1) / rate;
    let mut next = Instant::now();
    let mut id = 0u64;
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let r = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut pause = Duration::from_millis(250);
        for attempt in 1..=TRIES {
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            next = Instant::now() + gap;
            id += 1;
            let request = rm_contact_request(table, &r, id);
            let answered = socket
                .send_to(request.as_bytes(), rpc)
                .and_then(|_| socket.recv(&mut buf));
            match answered {
                Ok(n) => {
                    match rm_contact_outcome(&buf[..n]) {
                        Ok(true) => c.removed.fetch_add(1, Ordering::Relaxed),
                        Ok(false) => c.not_found.fetch_add(1, Ordering::Relaxed),
                        Err(_) => c.failed.fetch_add(1, Ordering::Relaxed),
                    };
                    break;
                }
                Err(_) => {
                    c.unanswered.fetch_add(1, Ordering::Relaxed);
                    if attempt == TRIES || stop.load(Ordering::Relaxed) {
                        c.failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    std::thread::sleep(pause);
                    pause *= 2;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_as_kamailio_writes_them() {
        let r = Removal {
            aor: "p26".into(),
            contact: "sip:p26@192.0.2.2:5062".into(),
        };
        let req: serde_json::Value =
            serde_json::from_str(&rm_contact_request("location", &r, 7)).unwrap();
        assert_eq!(req["method"], "ul.rm_contact");
        assert_eq!(
            req["params"],
            serde_json::json!(["location", "p26", "sip:p26@192.0.2.2:5062"])
        );
        // Kamailio 5.6.3's answers, as its jsonrpcs datagram socket sends them.
        let ok = b"{\n\t\"jsonrpc\":\t\"2.0\",\n\t\"result\":\t\"ok\",\n\t\"id\":\t7\n}";
        assert_eq!(rm_contact_outcome(ok), Ok(true));
        let gone = b"{\n\t\"jsonrpc\":\t\"2.0\",\n\t\"error\":\t{\n\t\t\"code\":\t404,\n\t\t\"message\":\t\"AOR not found\"\n\t},\n\t\"id\":\t1\n}";
        assert_eq!(rm_contact_outcome(gone), Ok(false));
        let bad = b"{\"jsonrpc\":\"2.0\",\"error\":{\"code\":500,\"message\":\"x\"},\"id\":1}";
        assert!(rm_contact_outcome(bad).is_err());
        assert!(rm_contact_outcome(b"garbage").is_err());
    }
}
