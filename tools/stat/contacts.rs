//! Walking the contact slots: lookup (`get`), streaming (`dump`) and the
//! bounded worst-K lists of `top`.
//!
//! Every walk is a loop over `(worker, slot)` reading one seqlocked slot at a
//! time into a stack copy; nothing proportional to the slot count is ever
//! allocated. Strings are copied into two reused buffers, and only for slots
//! that need them (a `dump`, a lookup by text, the K contacts `top` shows).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Write};
use std::net::SocketAddr;

use kaping::shm::layout::{
    SlotRecord, SLOT_DOWN, SLOT_REMOVED, SLOT_UNKNOWN, SLOT_UNMONITORED, SLOT_UP,
};
use kaping::shm::reader::ShmReader;
use kaping::timefmt::rfc3339_ms;
use serde_json::{json, Value};

/// A contact's record with its text, as read in one seqlock pass.
pub struct Contact {
    pub worker: u32,
    pub slot: u32,
    pub rec: SlotRecord,
    pub uri: String,
    pub aor: String,
}

pub fn state_name(state: u8) -> &'static str {
    match state {
        SLOT_UNKNOWN => "unknown",
        SLOT_UP => "up",
        SLOT_DOWN => "down",
        SLOT_REMOVED => "removed",
        SLOT_UNMONITORED => "unmonitored",
        _ => "invalid",
    }
}

/// Pings without an answer (`sent - answered`), not counting the latest ping
/// while it may still be in flight (sent after the last reply): a healthy
/// contact between its ping and the reply has lost nothing. A contact whose
/// latest ping already timed out is under-counted by that one ping until its
/// next ping, which is fine for ranking and for the JSON figure alike.
pub fn unanswered(r: &SlotRecord) -> u32 {
    // A ping still in flight (sent after the last reply) is not lost yet.
    let in_flight = u32::from(r.last_ping_ms > r.last_reply_ms && r.sent > r.answered);
    r.sent.saturating_sub(r.answered).saturating_sub(in_flight)
}

fn time_or_null(ms: u64) -> Value {
    if ms == 0 {
        Value::Null
    } else {
        Value::String(rfc3339_ms(ms))
    }
}

fn opt_str(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_owned())
    }
}

impl Contact {
    /// The JSON object of one contact (fields documented in the binary's docs).
    pub fn to_json(&self) -> Value {
        let r = &self.rec;
        json!({
            "worker": self.worker,
            "slot": self.slot,
            "generation": r.generation,
            "state": state_name(r.state),
            "uri": opt_str(&self.uri),
            "aor": opt_str(&self.aor),
            "addr": r.socket_addr().map(|a| a.to_string()),
            "rtt_last_us": r.rtt_last_us,
            "rtt_min_us": r.rtt_min_us,
            "rtt_max_us": r.rtt_max_us,
            "srtt_us": r.srtt_us,
            "rttvar_us": r.rttvar_us,
            "misses": r.misses,
            "sent": r.sent,
            "answered": r.answered,
            "unanswered": unanswered(r),
            "last_code": r.last_code,
            "interval_ms": r.interval_ms,
            "last_ping_ms": r.last_ping_ms,
            "last_ping": time_or_null(r.last_ping_ms),
            "last_reply_ms": r.last_reply_ms,
            "last_reply": time_or_null(r.last_reply_ms),
            "key_hash": format!("{:016x}", r.key_hash),
        })
    }

    /// One tab-separated `dump` line: worker, slot, state, address, srtt µs,
    /// last RTT µs, misses, sent, answered, last code, URI, AoR (`-` for none).
    pub fn write_line(&self, out: &mut impl Write) -> io::Result<()> {
        let r = &self.rec;
        let addr = r.socket_addr();
        writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.worker,
            self.slot,
            state_name(r.state),
            Dash(addr),
            r.srtt_us,
            r.rtt_last_us,
            r.misses,
            r.sent,
            r.answered,
            r.last_code,
            if self.uri.is_empty() { "-" } else { &self.uri },
            if self.aor.is_empty() { "-" } else { &self.aor },
        )
    }

    /// The multi-line `get` record.
    pub fn write_record(&self, out: &mut impl Write) -> io::Result<()> {
        let r = &self.rec;
        let when = |ms: u64| {
            if ms == 0 {
                "never".to_owned()
            } else {
                rfc3339_ms(ms)
            }
        };
        writeln!(out, "contact     {}", or_dash(&self.uri))?;
        writeln!(out, "  aor       {}", or_dash(&self.aor))?;
        writeln!(out, "  address   {}", Dash(r.socket_addr()))?;
        writeln!(out, "  state     {}", state_name(r.state))?;
        writeln!(
            out,
            "  rtt       last {} us, min {} us, max {} us, srtt {} us, rttvar {} us",
            r.rtt_last_us, r.rtt_min_us, r.rtt_max_us, r.srtt_us, r.rttvar_us
        )?;
        writeln!(
            out,
            "  pings     sent {}, answered {}, misses {} (consecutive)",
            r.sent, r.answered, r.misses
        )?;
        writeln!(out, "  last code {}", r.last_code)?;
        writeln!(out, "  interval  {} ms", r.interval_ms)?;
        writeln!(out, "  last ping {}", when(r.last_ping_ms))?;
        writeln!(out, "  last reply {}", when(r.last_reply_ms))?;
        writeln!(
            out,
            "  slot      worker {} slot {} generation {} key hash {:016x}",
            self.worker, self.slot, r.generation, r.key_hash
        )
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

struct Dash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for Dash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Call `f` with every live contact (record and strings), in slot order.
/// Stops early and returns the error if `f` fails (e.g. a closed pipe).
pub fn for_each_contact<E>(
    shm: &ShmReader,
    mut f: impl FnMut(&Contact) -> Result<(), E>,
) -> Result<(), E> {
    let g = *shm.geometry();
    let mut uri = Vec::with_capacity(256);
    let mut aor = Vec::with_capacity(256);
    let mut c = Contact {
        worker: 0,
        slot: 0,
        rec: SlotRecord::default(),
        uri: String::new(),
        aor: String::new(),
    };
    for w in 0..g.workers {
        for slot in 0..g.slots_per_worker {
            let Some(rec) = shm.read_contact(w, slot, &mut uri, &mut aor) else {
                continue;
            };
            c.worker = w;
            c.slot = slot;
            c.rec = rec;
            set_lossy(&mut c.uri, &uri);
            set_lossy(&mut c.aor, &aor);
            f(&c)?;
        }
    }
    Ok(())
}

fn set_lossy(out: &mut String, bytes: &[u8]) {
    out.clear();
    out.push_str(&String::from_utf8_lossy(bytes));
}

/// What `get` looks for.
pub enum Key<'a> {
    /// Matches the contact's destination address.
    Addr(SocketAddr),
    /// Matches the URI or the AoR exactly.
    Text(&'a str),
}

impl<'a> Key<'a> {
    pub fn parse(s: &'a str) -> Key<'a> {
        match s.parse::<SocketAddr>() {
            Ok(a) => Key::Addr(a),
            Err(_) => Key::Text(s),
        }
    }
}

/// Every contact matching `key`. An address lookup reads no strings except
/// those of the matches.
pub fn find(shm: &ShmReader, key: &Key<'_>) -> Vec<Contact> {
    let g = *shm.geometry();
    let mut found = Vec::new();
    let (mut uri, mut aor) = (Vec::new(), Vec::new());
    for w in 0..g.workers {
        for slot in 0..g.slots_per_worker {
            if let Key::Addr(a) = key {
                match shm.read_slot(w, slot) {
                    Some(r) if r.socket_addr() == Some(*a) => {}
                    _ => continue,
                }
            }
            let Some(rec) = shm.read_contact(w, slot, &mut uri, &mut aor) else {
                continue;
            };
            let hit = match key {
                Key::Addr(a) => rec.socket_addr() == Some(*a),
                Key::Text(t) => uri == t.as_bytes() || aor == t.as_bytes(),
            };
            if hit {
                found.push(Contact {
                    worker: w,
                    slot,
                    rec,
                    uri: String::from_utf8_lossy(&uri).into_owned(),
                    aor: String::from_utf8_lossy(&aor).into_owned(),
                });
            }
        }
    }
    found
}

/// The `k` largest entries by key seen so far: a min-heap of at most `k`
/// elements, so a scan of any size costs `O(n log k)` time and `O(k)` memory.
pub struct TopK<K: Ord> {
    k: usize,
    heap: BinaryHeap<Reverse<(K, u32, u32)>>,
}

impl<K: Ord + Copy> TopK<K> {
    pub fn new(k: usize) -> TopK<K> {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// Offer `(key, worker, slot)`; kept only while among the `k` largest.
    pub fn offer(&mut self, key: K, worker: u32, slot: u32) {
        if self.k == 0 {
            return;
        }
        if self.heap.len() < self.k {
            self.heap.push(Reverse((key, worker, slot)));
        } else if let Some(mut min) = self.heap.peek_mut() {
            if key > min.0 .0 {
                *min = Reverse((key, worker, slot));
            }
        }
    }

    /// `(key, worker, slot)`, largest first.
    pub fn into_sorted(self) -> Vec<(K, u32, u32)> {
        // into_sorted_vec is ascending by Reverse, i.e. descending by key.
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(e)| e)
            .collect()
    }
}

/// What one pass over the slots gathers for `top`.
pub struct Worst {
    /// By smoothed RTT (µs); only contacts that have one.
    pub by_rtt: Vec<(u32, u32, u32)>,
    /// By `(misses, unanswered)`.
    pub by_loss: Vec<((u16, u32), u32, u32)>,
    /// Down contacts, the longest unanswered first (by misses).
    pub down: Vec<((u16, u32), u32, u32)>,
    pub down_count: u64,
    pub live_count: u64,
}

/// One pass over every slot keeping only `k` entries per list.
pub fn scan_worst(shm: &ShmReader, k: usize) -> Worst {
    let g = *shm.geometry();
    let mut by_rtt = TopK::new(k);
    let mut by_loss = TopK::new(k);
    let mut down = TopK::new(k);
    let (mut down_count, mut live_count) = (0u64, 0u64);
    for w in 0..g.workers {
        for slot in 0..g.slots_per_worker {
            let Some(r) = shm.read_slot(w, slot) else {
                continue;
            };
            if r.state == SLOT_REMOVED {
                continue;
            }
            live_count += 1;
            if r.answered > 0 {
                by_rtt.offer(r.srtt_us, w, slot);
            }
            let loss = (r.misses, unanswered(&r));
            if loss > (0, 0) {
                by_loss.offer(loss, w, slot);
            }
            if r.state == SLOT_DOWN {
                down_count += 1;
                down.offer(loss, w, slot);
            }
        }
    }
    Worst {
        by_rtt: by_rtt.into_sorted(),
        by_loss: by_loss.into_sorted(),
        down: down.into_sorted(),
        down_count,
        live_count,
    }
}

/// Re-read one listed contact with its strings (it may have changed or gone
/// since the scan; then it is skipped).
pub fn resolve(shm: &ShmReader, worker: u32, slot: u32) -> Option<Contact> {
    let (mut uri, mut aor) = (Vec::new(), Vec::new());
    let rec = shm.read_contact(worker, slot, &mut uri, &mut aor)?;
    Some(Contact {
        worker,
        slot,
        rec,
        uri: String::from_utf8_lossy(&uri).into_owned(),
        aor: String::from_utf8_lossy(&aor).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use kaping::shm::layout::SlotRecord as Rec;

    #[test]
    fn a_ping_in_flight_is_not_lost() {
        let mut r = Rec {
            sent: 10,
            answered: 9,
            last_ping_ms: 2_000,
            last_reply_ms: 1_000,
            ..Rec::default()
        };
        assert_eq!(super::unanswered(&r), 0, "the tenth ping is in flight");
        r.last_reply_ms = 2_001;
        r.answered = 8;
        assert_eq!(
            super::unanswered(&r),
            2,
            "answered after the last ping: two lost"
        );
        let dead = Rec {
            sent: 5,
            answered: 0,
            last_ping_ms: 9_000,
            ..Rec::default()
        };
        assert_eq!(super::unanswered(&dead), 4);
    }

    use super::*;

    #[test]
    fn top_k_keeps_the_largest_in_order() {
        let mut t = TopK::new(3);
        for (i, v) in [5u32, 1, 9, 7, 3, 9, 2].into_iter().enumerate() {
            t.offer(v, 0, i as u32);
        }
        let got: Vec<u32> = t.into_sorted().into_iter().map(|e| e.0).collect();
        assert_eq!(got, vec![9, 9, 7]);
        let mut none = TopK::new(0);
        none.offer(1u32, 0, 0);
        assert!(none.into_sorted().is_empty());
    }
}
