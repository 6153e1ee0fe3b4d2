//! The daemon's side of the control socket and of durable state: methods
//! (`keepalive.*`), group commit, restore, snapshots, SIGHUP reload.
//!
//! Everything here runs on the main thread, which owns the registry and
//! the store. A round takes every request queued by the connection threads
//! (up to `GROUP_MAX`), applies them in arrival order, writes their journal
//! records with one fdatasync, and only then answers: an acknowledged
//! change is on disk. If the journal cannot be written the changes of that
//! round are still active (they were sent to the workers) but answered
//! `NOT_DURABLE`, and further changes are refused until a restart: after a
//! failed fsync the file's state is unknown (PostgreSQL's "fsyncgate"), so
//! retrying is not safe.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, RecvTimeoutError, TrySendError};
use serde_json::{json, Value};

use super::{err, history_of, slot_of, spec_of, Daemon, DaemonError, Refusal};
use crate::config::{EventsTo, RawConfig, Settings};
use crate::control::registry::{Entry, Loc, Source};
use crate::control::rpc::{self, Call, Message, Params, RpcError};
use crate::control::server::{self, Reply, Request};
use crate::engine::liveness::Policy;
use crate::engine::worker::{Command, LiveConfig};
use crate::shm::layout::{percentile, Counter, SlotRecord};
use crate::sources::PROBLEMS_KEPT;
use crate::state::{ContactRecord, Op, Store};
use crate::timefmt::rfc3339_ms;

/// Requests handled per round (and so per journal commit).
const GROUP_MAX: usize = 256;
/// Events queued per subscriber before it is dropped as too slow.
const SUBSCRIBER_QUEUE: usize = 1 << 16;
/// Largest page of `keepalive.list`.
const LIST_MAX: u64 = 10_000;
const LIST_DEFAULT: u64 = 1_000;
/// Journal records that trigger a snapshot before `snapshot_interval`
/// (bounds the journal, and so the time a restart takes to replay it).
const SNAPSHOT_RECORDS: u64 = 1_000_000;

/// What a call did, to decide its answer after the commit.
struct Outcome {
    id: Option<Value>,
    result: Result<Value, RpcError>,
    /// A change that must be durable before it is acknowledged.
    mutated: bool,
}

fn state_of(rec: &SlotRecord) -> &'static str {
    match rec.state {
        2 => "up",
        3 => "down",
        4 => "removed",
        5 => "unmonitored",
        _ => "unknown",
    }
}

fn opt_time(ms: u64) -> Value {
    if ms == 0 {
        Value::Null
    } else {
        rfc3339_ms(ms).into()
    }
}

impl Daemon {
    /// Restores the contacts of `state_dir` (snapshot + journal) and queues
    /// them for their workers, each with its liveness history; first pings
    /// are spread over the interval like any add.
    pub fn restore_state(&mut self) -> Result<(), DaemonError> {
        let Some(dir) = self.settings.state_dir.clone() else {
            return Ok(());
        };
        let started = Instant::now();
        let (store, restored) = Store::open_with_group(&dir, self.settings.state_group.as_ref())
            .map_err(|e| err(e.to_string()))?;
        for w in &restored.warnings {
            eprintln!("kaping: state: {w}");
        }
        let total = restored.contacts.len();
        let mut skipped = 0usize;
        let mut other_shards = 0usize;
        // Contacts of the registrar feed: pinged again with their history
        // until the feed's first full sync refreshes them or, once it is
        // complete, drops them (they are of sync epoch 0). Expired ones
        // and, without `dmq`, all of them are left out.
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (mut fed, mut fed_dropped) = (0usize, 0usize);
        for (rec, history) in restored.contacts {
            let registered = rec.registrar_expires;
            if let Some(expires) = registered {
                if self.settings.dmq.is_none() || (expires != 0 && u64::from(expires) <= now_s) {
                    fed_dropped += 1;
                    continue;
                }
            }
            if !self.in_shard(rec.aor.as_deref(), &rec.uri) {
                // Another instance's now (the shard setting changed): not
                // pinged here, and left out of the next snapshot.
                other_shards += 1;
                continue;
            }
            let key_taken = self
                .ctl
                .registry
                .as_ref()
                .is_some_and(|r| r.find(rec.aor.as_deref(), &rec.uri).is_some());
            if key_taken {
                continue;
            }
            let history = history.as_ref().map(slot_of);
            let source = if registered.is_some() {
                Source::Registrar
            } else {
                Source::Control
            };
            let placed = spec_of(&rec)
                .map_err(Refusal::Bad)
                .and_then(|spec| self.place(&spec, rec.clone(), source, history));
            match placed {
                Ok(loc) => {
                    if let (Some(expires), Some(e)) = (registered, self.registry_entry_mut(loc)) {
                        e.expires_s = expires;
                        e.sync_epoch = 0;
                        fed += 1;
                    }
                }
                Err(Refusal::Bad(why)) => {
                    skipped += 1;
                    eprintln!(
                        "kaping: state: contact {} cannot be pinged with this configuration: {why} \
                         (left out; it is dropped from the next snapshot unless added again)",
                        rec.uri
                    );
                }
                Err(Refusal::Full(why)) => {
                    return Err(err(format!("restoring {}: {why}", dir.display())))
                }
            }
        }
        self.flush_adds();
        self.ctl.store = Some(store);
        self.ctl.last_snapshot = Some(Instant::now());
        if fed + fed_dropped > 0 {
            eprintln!(
                "kaping: state: {fed} contacts of the registrar feed restored with their liveness \
                 until its first sync confirms them{}",
                if fed_dropped == 0 {
                    String::new()
                } else if self.settings.dmq.is_none() {
                    format!("; {fed_dropped} left out: no 'dmq' feed is configured")
                } else {
                    format!("; {fed_dropped} expired ones left out")
                }
            );
        }
        eprintln!(
            "kaping: restored {} contacts from {} (snapshot {}, journal {} records{}) in {:.2} s",
            total - skipped - other_shards - fed_dropped,
            dir.display(),
            restored.snapshot_contacts,
            restored.journal_records,
            match (skipped, other_shards) {
                (0, 0) => String::new(),
                (s, 0) => format!(", {s} left out"),
                (0, o) => format!(", {o} left to other shards"),
                (s, o) => format!(", {s} left out, {o} left to other shards"),
            },
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Opens the control socket, if configured.
    pub fn start_control(&mut self) -> Result<(), DaemonError> {
        let Some(path) = self.settings.control.clone() else {
            return Ok(());
        };
        if self.settings.state_dir.is_none() {
            eprintln!(
                "kaping: control socket without state_dir: contacts added at runtime are lost on restart"
            );
        }
        let (tx, rx) = channel::unbounded();
        let server = server::start(
            &path,
            server::Limits {
                max_connections: self.settings.control_max_connections,
                max_request: self.settings.control_max_request,
            },
            tx,
        )
        .map_err(err)?;
        eprintln!("kaping: control socket {}", path.display());
        self.ctl.server = Some(server);
        self.ctl.requests = Some(rx);
        Ok(())
    }

    /// Waits up to `timeout` for control requests and serves them; also
    /// takes the workers' `Gone` notices and commits what they changed.
    pub(super) fn serve_control(&mut self, timeout: Duration) {
        self.take_gone();
        // The registrar feed wakes the loop too: its changes are applied
        // as they come, not at the next timeout.
        let feed = self.feed_receiver();
        let Some(rx) = self.ctl.requests.clone() else {
            self.commit_pending();
            match feed {
                Some(f) => self.wait_feed(&f, timeout),
                None => std::thread::sleep(timeout),
            }
            return;
        };
        let first = match feed {
            None => rx.recv_timeout(timeout),
            Some(f) => crossbeam::select! {
                recv(rx) -> r => r.map_err(|_| RecvTimeoutError::Disconnected),
                recv(f) -> item => {
                    if let Ok(item) = item {
                        self.stash_feed(item);
                    }
                    self.commit_pending();
                    // Let the changes that come with it gather: one round
                    // (and one wake of each worker) for all of them.
                    std::thread::sleep(super::feed::FEED_GATHER);
                    return;
                }
                default(timeout) => Err(RecvTimeoutError::Timeout),
            },
        };
        let first = match first {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                self.commit_pending();
                return;
            }
        };
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        self.serve_group(group);
    }

    fn serve_group(&mut self, group: Vec<Request>) {
        /// One request's outcomes, whether it was a batch, and the event
        /// stream a `keepalive.subscribe` in it opened.
        type Answer = (Vec<Outcome>, bool, Option<channel::Receiver<Arc<str>>>);
        let mut answers: Vec<Answer> = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        for req in group {
            self.ctl.stats.requests += 1;
            let mut sub = None;
            let (calls, batch) = match req.message {
                Message::Single(c) => (vec![c], false),
                Message::Batch(cs) => (cs, true),
            };
            let outcomes = calls
                .into_iter()
                .map(|c| match c {
                    Ok(call) => self.dispatch(call, &mut sub),
                    Err(e) => Outcome {
                        id: Some(Value::Null),
                        result: Err(e),
                        mutated: false,
                    },
                })
                .collect();
            answers.push((outcomes, batch, sub));
            replies.push(req.reply);
        }
        // Workers get their changes now; the answers wait for the journal.
        self.flush_adds();
        let failure = self.commit_pending();
        for ((outcomes, batch, subscription), reply) in answers.into_iter().zip(replies) {
            let mut values: Vec<Value> = outcomes
                .into_iter()
                .filter_map(|o| {
                    let id = o.id?;
                    let result = match (&failure, o.mutated, o.result) {
                        (Some(f), true, Ok(_)) => Err(RpcError::new(rpc::NOT_DURABLE, f.clone())),
                        (_, _, r) => r,
                    };
                    Some(match result {
                        Ok(v) => rpc::response(&id, v),
                        Err(e) => rpc::error_response(&id, &e),
                    })
                })
                .collect();
            // Serialized (and freed) by the connection's thread.
            let answer = match (batch, values.len()) {
                (_, 0) => None,
                (false, _) => Some(values.remove(0)),
                (true, _) => Some(Value::Array(values)),
            };
            let _ = reply.send(Reply {
                answer,
                subscription,
            });
        }
    }

    /// Writes the journal records made since the last commit (one write,
    /// one fdatasync). Returns the failure, for the answers, if it failed.
    fn commit_pending(&mut self) -> Option<String> {
        if self.ctl.uncommitted.is_empty() {
            return None;
        }
        let ops = std::mem::take(&mut self.ctl.uncommitted);
        let Some(store) = &mut self.ctl.store else {
            return None; // not durable by configuration (no state_dir)
        };
        match store.commit(&ops) {
            Ok(()) => {
                self.ctl.stats.commits += 1;
                self.ctl.stats.journal_records += ops.len() as u64;
                None
            }
            Err(e) => {
                let msg = format!(
                    "the state journal could not be written ({e}): the change is active but NOT durable; \
                     changes are refused until the daemon is restarted"
                );
                eprintln!("kaping: {msg}");
                self.ctl.journal_failed = Some(msg.clone());
                Some(msg)
            }
        }
    }

    /// Forgets the contacts workers dropped on their own (remove_after);
    /// a durable one is journalled as deleted.
    fn take_gone(&mut self) {
        let (Some(gone), Some(reg)) = (&self.ctl.gone, &mut self.ctl.registry) else {
            return;
        };
        let mut registered = Vec::new();
        while let Ok(g) = gone.try_recv() {
            let loc = Loc {
                worker: g.worker,
                handle: g.handle,
            };
            if let Some(e) = reg.remove(loc) {
                match e.source {
                    Source::Control => self.ctl.uncommitted.push(Op::Del { key: e.rec.key() }),
                    // Dropped after remove_after misses: the registrar
                    // should forget it too (under the removal guard).
                    Source::Registrar => registered.push(crate::registrar::rpc::Removal {
                        aor: e.rec.aor().unwrap_or_default().to_string(),
                        contact: e.rec.uri().to_string(),
                    }),
                    Source::File => {}
                }
            }
        }
        if !registered.is_empty() {
            self.feed_removals(registered);
        }
    }

    fn dispatch(
        &mut self,
        mut call: Call,
        sub: &mut Option<channel::Receiver<Arc<str>>>,
    ) -> Outcome {
        let id = call.id.take();
        let mutating = matches!(
            call.method.as_str(),
            "keepalive.add" | "keepalive.del" | "keepalive.flush"
        );
        let result = if mutating && self.ctl.journal_failed.is_some() {
            Err(RpcError::new(
                rpc::NOT_DURABLE,
                self.ctl.journal_failed.clone().unwrap_or_default(),
            ))
        } else {
            // `args` is read for add/del/get by the connection's thread;
            // read here when a call was made some other way.
            let args = |call: Call| {
                call.args
                    .unwrap_or_else(|| rpc::Args::read(&call.method, call.params))
            };
            match call.method.as_str() {
                "keepalive.add" => args(call).and_then(|a| self.rpc_add(a)),
                "keepalive.del" => args(call).and_then(|a| self.rpc_del(a)),
                "keepalive.get" => args(call).and_then(|a| self.rpc_get(a)),
                "keepalive.list" => self.rpc_list(call.params),
                "keepalive.flush" => self.rpc_flush(call.params),
                "keepalive.stats" => self.rpc_stats(call.params),
                "keepalive.subscribe" => self.rpc_subscribe(call.params, sub),
                other => Err(RpcError::new(
                    rpc::METHOD_NOT_FOUND,
                    format!(
                        "method not found: '{other}' (methods: keepalive.add, keepalive.del, keepalive.get, \
                         keepalive.list, keepalive.flush, keepalive.stats, keepalive.subscribe)"
                    ),
                )),
            }
        };
        Outcome {
            id,
            mutated: mutating && result.is_ok(),
            result,
        }
    }

    pub(super) fn registry_entry_mut(&mut self, loc: Loc) -> Option<&mut Entry> {
        self.ctl.registry.as_mut()?.get_mut(loc)
    }

    pub(super) fn registry_find(&self, aor: Option<&str>, uri: &str) -> Option<Loc> {
        self.ctl.registry.as_ref()?.find(aor, uri)
    }

    /// The registrar contact of `aor` with usrloc record id `ruid`.
    pub(super) fn registry_find_ruid(&self, aor: Option<&str>, ruid: &str) -> Option<Loc> {
        self.ctl.registry.as_ref()?.find_ruid(aor, ruid)
    }

    fn rpc_add(&mut self, args: rpc::Args) -> Result<Value, RpcError> {
        let rpc::Args::Add(rpc::AddArgs {
            uri,
            aor,
            received,
            path,
            interval,
            owner,
            socket,
            source,
            keepalive,
        }) = args
        else {
            return Err(RpcError::invalid_params("keepalive.add: not add params"));
        };
        if let Some(iv) = interval {
            if iv < Duration::from_millis(10) || iv <= self.settings.reply_timeout {
                return Err(RpcError::invalid_params(format!(
                    "keepalive.add: interval {iv:?} must be at least 10ms and longer than reply_timeout {:?}",
                    self.settings.reply_timeout
                )));
            }
        }
        let rec = ContactRecord {
            uri,
            aor,
            received,
            path,
            interval_ms: interval.map(|d| d.as_millis().min(u32::MAX as u128) as u32),
            owner,
            socket,
            source,
            keepalive,
            registrar_expires: None,
        };
        let (uri, aor) = (rec.uri.clone(), rec.aor.clone());
        let op = Op::Add(rec.clone());
        let done = self.upsert(rec, Source::Control).map_err(|e| match e {
            UpsertError::OtherShard { owner, index, count } => RpcError::new(
                rpc::OTHER_SHARD,
                format!(
                    "keepalive.add {uri}: the contact belongs to shard {owner}/{count}; this instance keeps shard {index}/{count}"
                ),
            ),
            UpsertError::Params(why) => {
                RpcError::invalid_params(format!("keepalive.add {uri}: {why}"))
            }
            UpsertError::Bad(why) => {
                RpcError::new(rpc::BAD_CONTACT, format!("keepalive.add {uri}: {why}"))
            }
            UpsertError::Full { worker } => self.slab_full(worker, &uri),
        })?;
        let status = match done.status {
            Upserted::Unchanged => "unchanged",
            Upserted::Added => {
                self.ctl.uncommitted.push(op);
                self.ctl.stats.adds += 1;
                "added"
            }
            Upserted::Updated => {
                self.ctl.uncommitted.push(op);
                self.ctl.stats.updates += 1;
                "updated"
            }
        };
        Ok(json!({
            "status": status, "uri": uri, "aor": aor,
            "worker": done.loc.worker, "slot": done.loc.handle.slot,
        }))
    }

    /// Adds a contact, or replaces the parameters of the one with the same
    /// key (AoR, URI) keeping its liveness history, on behalf of `source`.
    /// A bad update leaves the contact as it was. The caller journals.
    pub(super) fn upsert(
        &mut self,
        rec: ContactRecord,
        source: Source,
    ) -> Result<Placed, UpsertError> {
        let existing = self.registry_find(rec.aor.as_deref(), &rec.uri);
        if let Some(loc) = existing {
            let e = self.registry_entry(loc);
            if e.rec.is(&rec) && e.source == source {
                return Ok(Placed {
                    status: Upserted::Unchanged,
                    loc,
                });
            }
        }
        if let Some((index, count)) = self.settings.shard {
            let owner = crate::contact::shard_of(rec.aor.as_deref(), &rec.uri, count);
            if owner != index {
                return Err(UpsertError::OtherShard {
                    owner,
                    index,
                    count,
                });
            }
        }
        let spec = spec_of(&rec).map_err(UpsertError::Params)?;
        // Check the new form before touching the old one.
        let prepared = self.prepare(&spec).map_err(UpsertError::Bad)?;
        let mut history = None;
        if let Some(old) = existing {
            let reg = self.ctl.registry.as_ref().expect("registry");
            if prepared.worker != old.worker as usize && !reg.has_room(prepared.worker as u8) {
                return Err(UpsertError::Full {
                    worker: prepared.worker,
                });
            }
            history = self.read_slot(old).map(|s| slot_of(&history_of(&s)));
            self.ctl.registry.as_mut().expect("registry").remove(old);
            self.queue_del(old.worker as usize, old.handle, false);
        }
        let worker = prepared.worker;
        let loc = match self.place_prepared(prepared, rec, source, history) {
            Ok(loc) => loc,
            Err(Refusal::Bad(why)) => return Err(UpsertError::Bad(why)),
            Err(Refusal::Full(_)) => return Err(UpsertError::Full { worker }),
        };
        Ok(Placed {
            status: if existing.is_some() {
                Upserted::Updated
            } else {
                Upserted::Added
            },
            loc,
        })
    }

    fn slab_full(&self, worker: usize, uri: &str) -> RpcError {
        RpcError::new(
            rpc::SLAB_FULL,
            format!(
                "keepalive.add {uri}: slab full: worker {worker} holds its {} contacts \
                 (max_contacts {} over {} workers); delete contacts or restart with a larger max_contacts",
                self.capacity, self.settings.max_contacts, self.settings.workers
            ),
        )
    }

    fn registry_entry(&self, loc: Loc) -> &Entry {
        self.ctl
            .registry
            .as_ref()
            .and_then(|r| r.get(loc))
            .expect("a location just found is current")
    }

    /// The slot of a contact, if it is still the same contact.
    fn read_slot(&self, loc: Loc) -> Option<SlotRecord> {
        let rec = self
            .ctl
            .reader
            .as_ref()?
            .read_slot(loc.worker as u32, loc.handle.slot)?;
        (rec.generation == loc.handle.generation).then_some(rec)
    }

    /// What a listing says of a contact's liveness: its slot, or, until its
    /// worker publishes it, the history it was restored or updated with.
    fn liveness_of(&self, loc: Loc) -> Option<SlotRecord> {
        self.read_slot(loc)
            .or_else(|| self.ctl.pending_history.get(&loc).map(slot_of))
    }

    fn key_of(args: rpc::Args, method: &str) -> Result<(String, Option<String>), RpcError> {
        match args {
            rpc::Args::Key { uri, aor } => Ok((uri, aor)),
            rpc::Args::Add(_) => Err(RpcError::invalid_params(format!(
                "{method}: not key params"
            ))),
        }
    }

    fn not_found(method: &str, uri: &str, aor: Option<&str>) -> RpcError {
        RpcError::new(
            rpc::NOT_FOUND,
            match aor {
                Some(a) => format!("{method} {uri} (AoR {a}): not found"),
                None => format!("{method} {uri}: not found"),
            },
        )
    }

    fn rpc_del(&mut self, args: rpc::Args) -> Result<Value, RpcError> {
        let (uri, aor) = Self::key_of(args, "keepalive.del")?;
        let loc = self
            .registry_find(aor.as_deref(), &uri)
            .ok_or_else(|| Self::not_found("keepalive.del", &uri, aor.as_deref()))?;
        self.remove_contact(loc);
        self.ctl.stats.dels += 1;
        Ok(json!({ "deleted": 1, "uri": uri, "aor": aor }))
    }

    pub(super) fn remove_contact(&mut self, loc: Loc) {
        let Some(e) = self.ctl.registry.as_mut().and_then(|r| r.remove(loc)) else {
            return;
        };
        self.queue_del(loc.worker as usize, loc.handle, true);
        if e.source == Source::Control {
            self.ctl.uncommitted.push(Op::Del { key: e.rec.key() });
        }
    }

    fn contact_json(&self, loc: Loc, e: &Entry, slot: Option<&SlotRecord>) -> Value {
        let mut v = json!({
            "uri": e.rec.uri(),
            "aor": e.rec.aor(),
            "received": e.rec.received(),
            "path": e.rec.path(),
            "owner": e.rec.owner(),
            "socket": e.rec.socket(),
            "ping_source": e.rec.ping_source(),
            "keepalive": e.rec.keepalive(),
            "dest": e.dest.to_string(),
            "worker": loc.worker,
            "slot": loc.handle.slot,
            "source": e.source.name(),
        });
        let interval_ms = e
            .rec
            .interval_ms()
            .unwrap_or(self.settings.interval.as_millis() as u32);
        v["interval_ms"] = interval_ms.into();
        // The same keys whether or not the worker has published the contact
        // yet (queued for its worker, not yet in shared memory) or answered
        // it: figures that do not exist yet are null, never a made-up 0.
        let answered = slot.is_some_and(|s| s.answered > 0);
        let rtt = |f: fn(&SlotRecord) -> u32| slot.filter(|_| answered).map(f);
        let fields = json!({
            "state": slot.map_or("unknown", state_of),
            "misses": slot.map_or(0, |s| s.misses),
            "sent": slot.map_or(0, |s| s.sent),
            "answered": slot.map_or(0, |s| s.answered),
            "rtt_last_us": rtt(|s| s.rtt_last_us),
            "rtt_min_us": rtt(|s| s.rtt_min_us),
            "rtt_max_us": rtt(|s| s.rtt_max_us),
            "srtt_us": rtt(|s| s.srtt_us),
            "rttvar_us": rtt(|s| s.rttvar_us),
            "last_code": slot.map(|s| s.last_code).filter(|&c| c != 0),
            "last_ping": slot.map_or(Value::Null, |s| opt_time(s.last_ping_ms)),
            "last_reply": slot.map_or(Value::Null, |s| opt_time(s.last_reply_ms)),
        });
        if let (Value::Object(dst), Value::Object(src)) = (&mut v, fields) {
            dst.extend(src);
        }
        v
    }

    fn rpc_get(&mut self, args: rpc::Args) -> Result<Value, RpcError> {
        let (uri, aor) = Self::key_of(args, "keepalive.get")?;
        let loc = self
            .registry_find(aor.as_deref(), &uri)
            .ok_or_else(|| Self::not_found("keepalive.get", &uri, aor.as_deref()))?;
        let slot = self.liveness_of(loc);
        Ok(self.contact_json(loc, self.registry_entry(loc), slot.as_ref()))
    }

    fn rpc_list(&mut self, params: Value) -> Result<Value, RpcError> {
        let mut p = Params::new(
            params,
            "keepalive.list",
            &["cursor", "limit", "owner", "state"],
        )?;
        let cursor = p.opt_u64("cursor")?.unwrap_or(0);
        let limit = p.opt_u64("limit")?.unwrap_or(LIST_DEFAULT);
        if !(1..=LIST_MAX).contains(&limit) {
            return Err(RpcError::invalid_params(format!(
                "keepalive.list: limit {limit} is not within 1..={LIST_MAX}"
            )));
        }
        let owner = p.opt_str("owner")?;
        let state = p.opt_str("state")?;
        if let Some(s) = &state {
            if !["unknown", "up", "down"].contains(&s.as_str()) {
                return Err(RpcError::invalid_params(format!(
                    "keepalive.list: state '{s}' is not one of unknown, up, down"
                )));
            }
        }
        let Some(reg) = &self.ctl.registry else {
            return Ok(json!({ "contacts": [], "next": null, "total": 0 }));
        };
        let mut contacts = Vec::new();
        let mut next = Value::Null;
        for (loc, e) in reg.iter_from(cursor) {
            if owner.is_some() && e.rec.owner() != owner.as_deref() {
                continue;
            }
            let slot = self.liveness_of(loc);
            if let Some(want) = &state {
                if slot.as_ref().map_or("unknown", state_of) != want {
                    continue;
                }
            }
            if contacts.len() as u64 == limit {
                next = loc.cursor().into();
                break;
            }
            contacts.push(self.contact_json(loc, e, slot.as_ref()));
        }
        Ok(json!({ "contacts": contacts, "next": next, "total": reg.len() }))
    }

    fn rpc_flush(&mut self, params: Value) -> Result<Value, RpcError> {
        let mut p = Params::new(params, "keepalive.flush", &["owner"])?;
        let owner = p.opt_str("owner")?;
        let locs: Vec<Loc> = match &self.ctl.registry {
            Some(reg) => reg
                .iter_from(0)
                .filter(|(_, e)| owner.is_none() || e.rec.owner() == owner.as_deref())
                .map(|(l, _)| l)
                .collect(),
            None => Vec::new(),
        };
        for &loc in &locs {
            if let Some(e) = self.ctl.registry.as_mut().and_then(|r| r.remove(loc)) {
                let _ = e;
                self.queue_del(loc.worker as usize, loc.handle, true);
            }
        }
        self.ctl.uncommitted.push(Op::Flush {
            owner: owner.clone(),
        });
        self.ctl.stats.dels += locs.len() as u64;
        Ok(json!({ "deleted": locs.len(), "owner": owner }))
    }

    fn rpc_stats(&mut self, params: Value) -> Result<Value, RpcError> {
        Params::new(params, "keepalive.stats", &[])?;
        let n = self.settings.workers;
        let mut counters = [0u64; Counter::COUNT];
        let mut hist: Vec<u64> = Vec::new();
        if let Some(r) = &self.ctl.reader {
            for w in 0..n {
                for (t, c) in counters.iter_mut().zip(r.counters(w)) {
                    *t += c;
                }
                let h = r.histogram(w);
                if hist.is_empty() {
                    hist = h;
                } else {
                    for (t, c) in hist.iter_mut().zip(h) {
                        *t += c;
                    }
                }
            }
        }
        let get = |c: Counter| counters[c as usize];
        let mut pings = serde_json::Map::new();
        for c in Counter::ALL {
            if !c.name().starts_with("contacts_") {
                pings.insert(c.name().into(), get(c).into());
            }
        }
        let s = &self.ctl.stats;
        let server = self.ctl.server.as_ref().map(|srv| &srv.stats);
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let registrar = self.feed_stats().map(|(f, node)| {
            let mut m = serde_json::Map::new();
            for (k, v) in node {
                m.insert(k.into(), v.into());
            }
            for (k, v) in [
                ("added", f.added),
                ("updated", f.updated),
                ("refreshed", f.refreshed),
                ("deleted", f.deleted),
                ("delete_unknown", f.delete_unknown),
                ("moved", f.moved),
                ("expired", f.expired),
                ("stale_after_sync", f.stale_after_sync),
                ("other_shard", f.other_shard),
                ("refused", f.refused),
                ("syncs_done", f.syncs_done),
            ] {
                m.insert(k.into(), v.into());
            }
            if let Some((tripped, removals)) = self.removal_stats() {
                m.insert(
                    "removal_guard".into(),
                    if tripped { "tripped" } else { "ok" }.into(),
                );
                for (k, v) in removals {
                    m.insert(k.into(), v.into());
                }
            }
            Value::Object(m)
        });
        Ok(json!({
            "registrar": registrar,
            "contacts": {
                "total": self.ctl.registry.as_ref().map_or(0, |r| r.len()),
                "unknown": get(Counter::ContactsUnknown),
                "up": get(Counter::ContactsUp),
                "down": get(Counter::ContactsDown),
                "removed": get(Counter::ContactsRemoved),
                "unmonitored": get(Counter::ContactsUnmonitored),
            },
            "pings": pings,
            "rtt_us": {
                "p50": percentile(&hist, 0.5),
                "p90": percentile(&hist, 0.9),
                "p99": percentile(&hist, 0.99),
            },
            "control": {
                "connections": server.map_or(0, |st| st.connections.load(std::sync::atomic::Ordering::Relaxed)),
                "connections_accepted": server.map_or(0, |st| load(&st.accepted)),
                "connections_refused": server.map_or(0, |st| load(&st.refused)),
                "requests": s.requests,
                "adds": s.adds,
                "updates": s.updates,
                "dels": s.dels,
                "subscribers": self.ctl.subscribers.len(),
                "subscribers_dropped": s.subscribers_dropped,
                "durable": self.ctl.store.is_some() && self.ctl.journal_failed.is_none(),
                "journal_commits": s.commits,
                "journal_records": s.journal_records,
                "snapshots": s.snapshots,
                "snapshot_age_s": self.ctl.last_snapshot.map(|t| t.elapsed().as_secs()),
            },
            "uptime_s": self.started.elapsed().as_secs(),
            "workers": n,
            "backend": self.backend,
            "instance": self.settings.instance,
        }))
    }

    fn rpc_subscribe(
        &mut self,
        params: Value,
        sub: &mut Option<channel::Receiver<Arc<str>>>,
    ) -> Result<Value, RpcError> {
        Params::new(params, "keepalive.subscribe", &[])?;
        if sub.is_none() {
            let (tx, rx) = channel::bounded(SUBSCRIBER_QUEUE);
            self.ctl.subscribers.push(tx);
            *sub = Some(rx);
        }
        Ok(json!({ "subscribed": true }))
    }

    /// Hands one event (as JSON text) to every subscriber; one that is too
    /// slow (its queue is full) or gone is dropped.
    pub(super) fn publish(&mut self, event: &Arc<str>) {
        let before = self.ctl.subscribers.len();
        self.ctl
            .subscribers
            .retain(|s| match s.try_send(event.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            });
        self.ctl.stats.subscribers_dropped += (before - self.ctl.subscribers.len()) as u64;
    }

    /// Starts a snapshot when one is due and none is running; reports a
    /// finished one.
    pub(super) fn maybe_snapshot(&mut self) {
        self.settle_pending_history();
        if let Some(job) = &self.ctl.snapshot_running {
            if !job.is_finished() {
                return;
            }
            let job = self.ctl.snapshot_running.take().expect("checked");
            self.report_snapshot(job.join());
        }
        let Some(store) = &self.ctl.store else {
            return;
        };
        let records = store.journal_records();
        let due = self
            .ctl
            .last_snapshot
            .is_none_or(|t| t.elapsed() >= self.settings.snapshot_interval);
        // Liveness and RTT history change without any journal record, so
        // a due snapshot is taken while there are contacts even if none
        // came or went: a restart then resumes from recent liveness.
        let contacts = self.ctl.registry.as_ref().is_some_and(|r| !r.is_empty());
        if !((due && (records > 0 || contacts)) || records >= SNAPSHOT_RECORDS) {
            return;
        }
        let Some(store) = &mut self.ctl.store else {
            return;
        };
        let job = match store.begin_snapshot() {
            Ok(j) => j,
            Err(e) => {
                eprintln!("kaping: state: cannot begin a snapshot: {e}");
                self.ctl.last_snapshot = Some(Instant::now());
                return;
            }
        };
        let contacts = self.durable_contacts();
        self.ctl.last_snapshot = Some(Instant::now());
        let spawned = std::thread::Builder::new()
            .name("kaping-snapshot".into())
            .spawn(move || job.write(&contacts));
        match spawned {
            Ok(t) => self.ctl.snapshot_running = Some(t),
            Err(e) => eprintln!("kaping: state: cannot start the snapshot thread: {e}"),
        }
    }

    fn report_snapshot(
        &mut self,
        r: std::thread::Result<Result<crate::state::SnapshotStats, crate::state::StateError>>,
    ) {
        match r {
            Ok(Ok(st)) => {
                self.ctl.stats.snapshots += 1;
                eprintln!(
                    "kaping: state: snapshot of {} contacts ({} bytes) in {:.2} s",
                    st.contacts,
                    st.bytes,
                    st.elapsed.as_secs_f64()
                );
            }
            Ok(Err(e)) => eprintln!("kaping: state: snapshot failed (the journal still holds every change): {e}"),
            Err(_) => eprintln!("kaping: state: the snapshot thread panicked (the journal still holds every change)"),
        }
    }

    /// Forgets the pending histories whose slot its worker has published
    /// (shared memory holds them now) or whose contact is gone. Runs every
    /// second, so after a restore of a million contacts the copies last
    /// about as long as the workers take to apply them.
    fn settle_pending_history(&mut self) {
        if self.ctl.pending_history.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.ctl.pending_history);
        pending.retain(|&loc, _| {
            self.ctl
                .registry
                .as_ref()
                .is_some_and(|r| r.get(loc).is_some())
                && self.read_slot(loc).is_none()
        });
        self.ctl.pending_history = pending;
    }

    /// Every contact added through the control socket, and every contact of
    /// the registrar feed (with its expiry), with its liveness. A contact
    /// whose worker has not published it yet (just restored, or updated)
    /// gets the history it was handed with.
    fn durable_contacts(&mut self) -> Vec<(ContactRecord, Option<crate::state::History>)> {
        self.settle_pending_history();
        let Some(reg) = &self.ctl.registry else {
            return Vec::new();
        };
        reg.iter_from(0)
            .filter(|(_, e)| e.source != Source::File)
            .map(|(loc, e)| {
                let history = self
                    .read_slot(loc)
                    .map(|s| history_of(&s))
                    .or_else(|| self.ctl.pending_history.get(&loc).copied());
                let mut rec = e.rec.record();
                if e.source == Source::Registrar {
                    rec.registrar_expires = Some(e.expires_s);
                }
                (rec, history)
            })
            .collect()
    }

    /// Last step of a clean stop (workers have stopped, so histories are
    /// final): a snapshot, so the next start restores today's liveness and
    /// has no journal to replay.
    pub(super) fn final_snapshot(&mut self) {
        self.take_gone();
        self.commit_pending();
        if let Some(job) = self.ctl.snapshot_running.take() {
            let r = job.join();
            self.report_snapshot(r);
        }
        let contacts = self.durable_contacts();
        let Some(store) = &mut self.ctl.store else {
            return;
        };
        if self.ctl.journal_failed.is_some() {
            return;
        }
        match store.begin_snapshot() {
            Ok(job) => {
                let r = job.write(&contacts);
                self.report_snapshot(Ok(r));
            }
            Err(e) => eprintln!("kaping: state: cannot write the final snapshot: {e}"),
        }
    }

    /// SIGHUP: reads the configuration again and applies what can change
    /// live; says what changed and what needs a restart.
    pub(super) fn reload(&mut self) {
        let Some(src) = &self.reload else {
            eprintln!("kaping: SIGHUP: no configuration source to reload");
            return;
        };
        let mut raw = match &src.config {
            Some(path) => match RawConfig::from_file(path) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("kaping: SIGHUP: configuration not reloaded: {e}");
                    return;
                }
            },
            None => RawConfig::default(),
        };
        raw.overlay(&src.overrides);
        let new = match Settings::from_raw(&raw) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kaping: SIGHUP: configuration not reloaded: {e}");
                return;
            }
        };
        let (live, restart) = self.settings.diff(&new);
        if live.is_empty() && restart.is_empty() {
            eprintln!("kaping: SIGHUP: configuration reloaded, nothing changed");
            return;
        }
        if !live.is_empty() {
            if new.events != self.settings.events {
                match super::open_events(&new.events) {
                    Ok(out) => self.events_out = out,
                    Err(e) => {
                        eprintln!("kaping: SIGHUP: configuration not reloaded: {e}");
                        return;
                    }
                }
            }
            let n = self.settings.workers as u64;
            let live_cfg = LiveConfig {
                interval: new.interval,
                jitter: new.jitter,
                reply_timeout: new.reply_timeout,
                retries: new.retries,
                policy: Policy {
                    down_after: new.down_after,
                    remove_after: new.remove_after,
                    alive: new.alive_codes,
                },
                rate_limit: if new.rate_limit == 0 {
                    0
                } else {
                    new.rate_limit.div_ceil(n)
                },
                events: super::events_wanted(&new),
            };
            for w in &self.workers {
                w.waker.wake();
                let _ = w
                    .commands
                    .send(Command::Reconfigure(Box::new(live_cfg.clone())));
                w.waker.wake();
            }
            let changes: Vec<String> = live
                .iter()
                .map(|name| describe(name, &self.settings, &new))
                .collect();
            self.settings.interval = new.interval;
            self.settings.jitter = new.jitter;
            self.settings.reply_timeout = new.reply_timeout;
            self.settings.retries = new.retries;
            self.settings.down_after = new.down_after;
            self.settings.remove_after = new.remove_after;
            self.settings.alive_codes = new.alive_codes;
            self.settings.alive_codes_text = new.alive_codes_text.clone();
            self.settings.rate_limit = new.rate_limit;
            self.settings.events = new.events.clone();
            eprintln!("kaping: SIGHUP: applied {}", changes.join(", "));
            if self.settings.destinations != new.destinations {
                self.settings.destinations = new.destinations.clone();
                self.enforce_destinations();
            }
        }
        if !restart.is_empty() {
            eprintln!(
                "kaping: SIGHUP: changed but needing a restart (not applied): {}",
                restart.join(", ")
            );
        }
    }

    /// After a reload changed the destination policy: every contact it now
    /// refuses stops being pinged (removed, with its reason), whatever its
    /// source. Contacts added later are checked as they come.
    fn enforce_destinations(&mut self) {
        let Some(registry) = &self.ctl.registry else {
            eprintln!(
                "kaping: SIGHUP: the destination policy applies to contacts added from now on; \
                 the ones loaded at start are re-checked at the next restart (kaping keeps no \
                 list of them without control or state_dir)"
            );
            return;
        };
        let policy = &self.settings.destinations;
        let refused: Vec<(Loc, String)> = registry
            .iter_from(0)
            .filter_map(|(loc, e)| {
                let why = policy.check(e.dest).err()?;
                Some((
                    loc,
                    format!("{}: destination {} refused: {why}", e.rec.uri(), e.dest),
                ))
            })
            .collect();
        for (_, what) in refused.iter().take(PROBLEMS_KEPT) {
            eprintln!("kaping: SIGHUP: removed {what}");
        }
        if refused.len() > PROBLEMS_KEPT {
            eprintln!(
                "kaping: SIGHUP: removed {} more contacts the destination policy refuses",
                refused.len() - PROBLEMS_KEPT
            );
        }
        for (loc, _) in refused {
            self.remove_contact(loc);
        }
    }
}

/// "name old -> new" for the reload report.
fn describe(name: &str, old: &Settings, new: &Settings) -> String {
    let pair = match name {
        "interval" => (format!("{:?}", old.interval), format!("{:?}", new.interval)),
        "jitter" => (format!("{:?}", old.jitter), format!("{:?}", new.jitter)),
        "reply_timeout" => (
            format!("{:?}", old.reply_timeout),
            format!("{:?}", new.reply_timeout),
        ),
        "retries" => (old.retries.to_string(), new.retries.to_string()),
        "down_after" => (old.down_after.to_string(), new.down_after.to_string()),
        "remove_after" => (old.remove_after.to_string(), new.remove_after.to_string()),
        "alive_codes" => (old.alive_codes_text.clone(), new.alive_codes_text.clone()),
        "rate_limit" => (old.rate_limit.to_string(), new.rate_limit.to_string()),
        "events" => (events_name(&old.events), events_name(&new.events)),
        "allow_destinations" => (
            prefixes(&old.destinations.allow),
            prefixes(&new.destinations.allow),
        ),
        "deny_destinations" => (
            prefixes(&old.destinations.deny),
            prefixes(&new.destinations.deny),
        ),
        _ => return name.to_string(),
    };
    format!("{name} {} -> {}", pair.0, pair.1)
}

fn prefixes(list: &[crate::policy::Cidr]) -> String {
    let items: Vec<String> = list.iter().map(|c| c.to_string()).collect();
    format!("[{}]", items.join(", "))
}

fn events_name(e: &EventsTo) -> String {
    match e {
        EventsTo::None => "none".into(),
        EventsTo::Stdout => "stdout".into(),
        EventsTo::File(p) => p.display().to_string(),
    }
}

/// What an upsert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Upserted {
    Unchanged,
    Added,
    Updated,
}

/// An upserted contact and where it lives.
#[derive(Clone, Copy, Debug)]
pub(super) struct Placed {
    pub status: Upserted,
    pub loc: Loc,
}

/// Why an upsert was refused (the contact stays as it was).
#[derive(Debug)]
pub(super) enum UpsertError {
    /// Another instance's contact (`--shard`).
    OtherShard { owner: u32, index: u32, count: u32 },
    /// A parameter does not parse (`source`, `keepalive`).
    Params(String),
    /// The contact cannot be pinged (URI, destination, source, size).
    Bad(String),
    /// Its worker's slab is full.
    Full { worker: usize },
}

impl std::fmt::Display for UpsertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpsertError::OtherShard {
                owner,
                index,
                count,
            } => write!(f, "shard {owner}'s contact, this is shard {index}/{count}"),
            UpsertError::Params(why) | UpsertError::Bad(why) => f.write_str(why),
            UpsertError::Full { worker } => write!(f, "worker {worker} has no free slot"),
        }
    }
}
