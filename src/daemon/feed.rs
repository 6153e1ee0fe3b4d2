//! The registrar feed applied (DESIGN §11): what the DMQ node
//! ([`crate::registrar::node`]) learns of Kamailio's location table
//! becomes kaping's contacts, on the main thread, through the same upsert
//! and removal as the control socket.
//!
//! * An upsert (action 1) adds the contact, or updates it in place keeping
//!   its liveness, keyed as usrloc keys it: (AoR, contact URI), and its
//!   record id (`ruid`). Its absolute `expires` is kept in the registry
//!   entry; a refresh that changes nothing else only moves that. A record
//!   whose contact URI changed (same ruid, a phone registering again from
//!   a new address) replaces the contact kaping had under that ruid: the
//!   old address is no longer registered (counted `moved`).
//! * A delete (action 2) removes it, found by (AoR, contact URI) or else by
//!   ruid (reported `removed`); a delete for a contact kaping does not
//!   hold changes nothing.
//! * Expiry is not replicated by Kamailio: every [`EXPIRY_SWEEP`] the
//!   contacts of the feed past their `expires` are removed. They are found
//!   in a min-heap of (expiry, location), one item per contact, rescheduled
//!   lazily: a refresh that moves the expiry later changes only the entry,
//!   and the item, once due, is pushed again with the entry's new expiry;
//!   only an expiry moved earlier (or a new location) pushes an item. So a
//!   sweep costs the contacts due, not a scan of a million (12 bytes a
//!   contact).
//! * A full sync (after joining, or when a registrar restarted) opens a new
//!   epoch; every record it brings is stamped with it. Once the sync is
//!   complete and `dmq_grace` has passed, the feed's contacts it did not
//!   refresh are removed: the registrar no longer has them.
//! * Contacts of other shards (`--shard`) are left out.
//!
//! Never blocks: the feed is drained with `try_recv` in the main loop.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam::channel::{self, Receiver};

use super::control::{UpsertError, Upserted};
use super::{err, Daemon, DaemonError};
use crate::control::registry::{Loc, Source};
use crate::engine::slab::Handle;
use crate::registrar::node::{Feed, Node};
use crate::registrar::rpc::{Removal, Remover};
use crate::registrar::usrloc::{Action, Change};
use crate::shm::layout::{RegistrarFigures, RegistrarStat};
use crate::state::ContactRecord;

/// How often expired contacts of the feed are looked for.
const EXPIRY_SWEEP: Duration = Duration::from_secs(1);
/// How long the main loop lets feed items gather once one woke it: a
/// change waits at most this much longer, and changes that come together
/// (a burst of REGISTERs, a sync) cost one round of the loop and one wake
/// of each worker instead of one each (measured: `kaping-loadgen
/// dmq-bench`, tuning.md).
pub(super) const FEED_GATHER: Duration = Duration::from_millis(2);
/// Feed items applied per main-loop round (the control socket is served
/// between rounds).
const APPLY_MAX: usize = 10_000;

/// What the feed did, for stats and the log.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct FeedStats {
    pub added: u64,
    pub updated: u64,
    pub refreshed: u64,
    pub deleted: u64,
    pub delete_unknown: u64,
    /// Contacts replaced by a record of the same ruid with another URI.
    pub moved: u64,
    pub expired: u64,
    pub stale_after_sync: u64,
    pub other_shard: u64,
    pub refused: u64,
    pub syncs_done: u64,
}

pub(super) struct FeedState {
    /// Stopped (its thread joined) when the daemon drops the feed.
    node: Node,
    rx: Receiver<Feed>,
    /// The current full-sync epoch (1 from the first sync on).
    epoch: u32,
    /// After a sync completed: when to remove the contacts it did not
    /// refresh, and the epoch they must have reached.
    sweep_stale: Option<(Instant, u32)>,
    last_expiry_sweep: Instant,
    pub stats: FeedStats,
    /// The first refusal's reason, logged once a second at most.
    refused_log: Option<Instant>,
    /// `registrar_rpc`: removes dead contacts from the registrar.
    remover: Option<Remover>,
    pub guard: Guard,
    /// When contacts of the feed expire: (unix s, worker, slot,
    /// generation), earliest first; see the module documentation.
    expiry: BinaryHeap<Reverse<(u32, u8, u32, u16)>>,
    /// Items taken off the channel while the main loop waited on it.
    stashed: Vec<Feed>,
}

/// The removal guard (DESIGN §11): removals wait until the end of their
/// window (one `interval` from the first of them); then all of them are
/// made, or, when they are more than `remove_max_fraction` of the feed's
/// contacts, none (an outage on kaping's side looks exactly like that).
/// After a trip the next window's removals are withheld too (the outage's
/// stragglers), and removals resume after it.
#[derive(Debug)]
pub(super) struct Guard {
    window_start: Instant,
    held: Vec<Removal>,
    pub tripped: bool,
    pub trips: u64,
    pub withheld: u64,
    pub sent: u64,
    /// Removals sent whose delete has not come back over DMQ yet (at most
    /// [`AWAIT_MAX`], oldest forgotten first).
    awaiting: std::collections::HashSet<(String, String)>,
    awaiting_order: std::collections::VecDeque<(String, String)>,
    /// Removals confirmed by the registrar's delete over DMQ.
    pub confirmed: u64,
}

/// Removals remembered until the registrar's delete confirms them.
const AWAIT_MAX: usize = 65_536;

impl Guard {
    fn await_delete(&mut self, r: &Removal) {
        let key = (r.aor.clone(), r.contact.clone());
        if self.awaiting_order.len() == AWAIT_MAX {
            if let Some(old) = self.awaiting_order.pop_front() {
                self.awaiting.remove(&old);
            }
        }
        self.awaiting_order.push_back(key.clone());
        self.awaiting.insert(key);
    }

    /// A delete over DMQ of a contact kaping no longer holds: one of its
    /// removals, confirmed?
    fn confirms(&mut self, aor: &str, contact: &str) -> bool {
        self.awaiting
            .remove(&(aor.to_string(), contact.to_string()))
    }
}

fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Daemon {
    /// Starts the DMQ node when `dmq` is set (after the contacts file and
    /// the state directory were read: the feed then updates those).
    pub fn start_registrar_feed(&mut self) -> Result<(), DaemonError> {
        let Some(local) = self.settings.dmq else {
            return Ok(());
        };
        let (tx, rx) = channel::unbounded();
        let node = Node::start(local, self.settings.dmq_peers.clone(), tx)
            .map_err(|e| err(format!("setting 'dmq': cannot bind {local}: {e}")))?;
        eprintln!(
            "kaping: DMQ node sip:{} joining {}",
            node.local,
            self.settings
                .dmq_peers
                .iter()
                .map(|p| format!("sip:{p}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if node.recv_clamped {
            eprintln!(
                "kaping: DMQ socket receive buffer clamped by the kernel to {} of {} bytes: \
                 a full sync's burst may overflow it and wait for Kamailio's retransmissions; \
                 raise net.core.rmem_max or grant CAP_NET_ADMIN",
                node.recv_buffer_bytes / 2,
                crate::registrar::node::RECV_BUFFER_BYTES
            );
        }
        self.feed = Some(FeedState {
            node,
            rx,
            epoch: 0,
            sweep_stale: None,
            last_expiry_sweep: Instant::now(),
            stats: FeedStats::default(),
            refused_log: None,
            remover: None,
            guard: Guard {
                window_start: Instant::now(),
                held: Vec::new(),
                tripped: false,
                trips: 0,
                withheld: 0,
                sent: 0,
                awaiting: std::collections::HashSet::new(),
                awaiting_order: std::collections::VecDeque::new(),
                confirmed: 0,
            },
            stashed: Vec::new(),
            expiry: BinaryHeap::new(),
        });
        // Contacts restored from the state directory expire too.
        let restored: Vec<(Loc, u32)> = self
            .ctl
            .registry
            .iter()
            .flat_map(|r| r.iter_from(0))
            .filter(|(_, e)| e.source == Source::Registrar)
            .map(|(loc, e)| (loc, e.expires_s))
            .collect();
        for (loc, expires_s) in restored {
            self.schedule_expiry(loc, expires_s);
        }
        if let Some(rpc) = self.settings.registrar_rpc.clone() {
            let remover = Remover::start(
                rpc.clone(),
                self.settings.registrar_table.clone(),
                self.settings.remove_rate,
            )
            .map_err(|e| err(format!("setting 'registrar_rpc': {e}")))?;
            eprintln!(
                "kaping: dead contacts of the feed are removed from table '{}' through {} (at most {:.1} % of them per interval)",
                self.settings.registrar_table,
                rpc.display(),
                self.settings.remove_max_fraction * 100.0
            );
            self.feed.as_mut().expect("feed").remover = Some(remover);
        }
        Ok(())
    }

    /// Contacts of the feed the workers dropped after `remove_after`
    /// misses: held for the guard's window.
    pub(super) fn feed_removals(&mut self, gone: Vec<Removal>) {
        if let Some(f) = self.feed.as_mut() {
            if f.remover.is_some() {
                // The window opens with its first removal, so the contacts
                // an outage drops over one interval (their pings are spread
                // over it) are judged together, not split at a boundary
                // with the first few let through.
                if f.guard.held.is_empty() {
                    f.guard.window_start = Instant::now();
                }
                f.guard.held.extend(gone);
            }
        }
    }

    /// Ends the guard's window when it is due: makes the held removals, or
    /// none of them.
    fn guard_window(&mut self) {
        let interval = self.settings.interval;
        let fraction = self.settings.remove_max_fraction;
        let registered = self.feed_contacts();
        let Some(f) = self.feed.as_mut() else {
            return;
        };
        if f.remover.is_none() || f.guard.window_start.elapsed() < interval {
            return;
        }
        f.guard.window_start = Instant::now();
        let held = std::mem::take(&mut f.guard.held);
        let n = held.len() as u64;
        // Of the contacts there were: those still held and those dropped.
        let limit = ((registered + n) as f64 * fraction).floor().max(1.0) as u64;
        let line = if n > limit {
            f.guard.withheld += n;
            let first = !f.guard.tripped;
            f.guard.tripped = true;
            if first {
                f.guard.trips += 1;
            }
            eprintln!(
                "kaping: removal guard: {n} contacts stopped answering within {interval:?}, more than \
                 {limit} ({:.1} % of {}): none is removed from the registrar (an outage on this side \
                 would look the same); they expire there by themselves",
                fraction * 100.0,
                registered + n
            );
            first.then_some(("tripped", n, limit))
        } else if f.guard.tripped {
            // The window after a trip: under the limit, so removals resume
            // from the next window on; but these are the outage's
            // stragglers (contacts whose misses ran a little later) and are
            // withheld with the rest.
            f.guard.tripped = false;
            f.guard.withheld += n;
            eprintln!(
                "kaping: removal guard: the rate fell back ({n} in {interval:?}, withheld with the \
                 others); removals resume"
            );
            Some(("resumed", n, limit))
        } else {
            f.guard.sent += n;
            if let Some(r) = &f.remover {
                for removal in held {
                    f.guard.await_delete(&removal);
                    r.remove(removal);
                }
            }
            None
        };
        if let (Some((state, n, limit)), Some(out)) = (line, self.events_out.as_mut()) {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let _ = writeln!(
                out,
                "{}",
                serde_json::json!({
                    "time": crate::timefmt::rfc3339_ms(now_ms),
                    "time_ms": now_ms,
                    "event": "removal_guard",
                    "state": state,
                    "removals": n,
                    "limit": limit,
                })
            );
            let _ = out.flush();
        }
    }

    /// The feed's channel, to wait on (a clone: the receiver stays here).
    pub(super) fn feed_receiver(&self) -> Option<Receiver<Feed>> {
        self.feed.as_ref().map(|f| f.rx.clone())
    }

    /// Sleeps until a feed item arrives (kept for `drain_feed`) or
    /// `timeout` passes.
    pub(super) fn wait_feed(&mut self, rx: &Receiver<Feed>, timeout: Duration) {
        if let Ok(item) = rx.recv_timeout(timeout) {
            self.stash_feed(item);
            std::thread::sleep(FEED_GATHER);
        }
    }

    /// An item taken off the channel while waiting, applied first.
    pub(super) fn stash_feed(&mut self, item: Feed) {
        if let Some(f) = self.feed.as_mut() {
            f.stashed.push(item);
        }
    }

    /// Applies what the node sent since the last round, and the sweeps
    /// that are due.
    pub(super) fn drain_feed(&mut self) {
        let Some(feed) = self.feed.as_mut() else {
            return;
        };
        let mut items = std::mem::take(&mut feed.stashed);
        while items.len() < APPLY_MAX {
            match feed.rx.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        for item in items {
            match item {
                Feed::Changes(changes) => {
                    for c in changes {
                        self.apply_change(c);
                    }
                }
                Feed::SyncStarted { peer } => {
                    let f = self.feed.as_mut().expect("feed");
                    f.epoch += 1;
                    eprintln!("kaping: DMQ: full sync from sip:{peer} (epoch {})", f.epoch);
                }
                Feed::SyncDone { peer } => {
                    let grace = self.settings.dmq_grace;
                    let f = self.feed.as_mut().expect("feed");
                    f.stats.syncs_done += 1;
                    f.sweep_stale = Some((Instant::now() + grace, f.epoch));
                    eprintln!(
                        "kaping: DMQ: full sync from sip:{peer} complete; contacts it did not refresh go in {grace:?}"
                    );
                }
            }
        }
        self.flush_adds();
        self.feed_sweeps();
        self.guard_window();
    }

    fn apply_change(&mut self, c: Change) {
        let aor = (!c.aor.is_empty()).then_some(c.aor);
        match c.action {
            Action::Delete => {
                let found = self
                    .registry_find(aor.as_deref(), &c.contact)
                    .or_else(|| self.registry_find_ruid(aor.as_deref(), &c.ruid));
                let f = self.feed.as_mut().expect("feed");
                match found {
                    Some(loc) => {
                        f.stats.deleted += 1;
                        self.remove_contact(loc);
                    }
                    None if f.guard.confirms(aor.as_deref().unwrap_or(""), &c.contact) => {
                        f.guard.confirmed += 1
                    }
                    None => f.stats.delete_unknown += 1,
                }
            }
            Action::Upsert => {
                let rec = ContactRecord {
                    uri: c.contact,
                    aor,
                    received: c.received,
                    path: c.path,
                    socket: c.socket,
                    ..ContactRecord::default()
                };
                let uri = rec.uri.clone();
                let expires_s = u32::try_from(c.expires).unwrap_or(u32::MAX);
                // The same record under another URI: that address is gone.
                let moved = self
                    .registry_find_ruid(rec.aor.as_deref(), &c.ruid)
                    .filter(|&loc| self.registry_find(rec.aor.as_deref(), &rec.uri) != Some(loc));
                if let Some(loc) = moved {
                    self.remove_contact(loc);
                    self.feed.as_mut().expect("feed").stats.moved += 1;
                }
                let result = self.upsert(rec, Source::Registrar);
                let f = self.feed.as_mut().expect("feed");
                let epoch = f.epoch;
                match result {
                    Ok(placed) => {
                        match placed.status {
                            Upserted::Added => f.stats.added += 1,
                            Upserted::Updated => f.stats.updated += 1,
                            Upserted::Unchanged => f.stats.refreshed += 1,
                        }
                        let mut earlier = false;
                        if let Some(e) = self.registry_entry_mut(placed.loc) {
                            // A new location (added, updated) has no item
                            // yet; a refresh needs one only when it expires
                            // sooner than before (see the module docs).
                            earlier = placed.status != Upserted::Unchanged
                                || e.expires_s == 0
                                || expires_s < e.expires_s;
                            e.expires_s = expires_s;
                            e.sync_epoch = epoch;
                        }
                        if earlier {
                            self.schedule_expiry(placed.loc, expires_s);
                        }
                        if let Some(reg) = self.ctl.registry.as_mut() {
                            reg.set_ruid(placed.loc, &c.ruid);
                        }
                    }
                    Err(UpsertError::OtherShard { .. }) => f.stats.other_shard += 1,
                    Err(e) => {
                        f.stats.refused += 1;
                        let now = Instant::now();
                        if f.refused_log.is_none_or(|t| now >= t) {
                            f.refused_log = Some(now + Duration::from_secs(1));
                            eprintln!("kaping: DMQ: contact {uri} not pinged: {e}");
                        }
                    }
                }
            }
        }
    }

    /// Files a contact of the feed under its expiry (0: never expires).
    fn schedule_expiry(&mut self, loc: Loc, expires_s: u32) {
        if expires_s == 0 {
            return;
        }
        if let Some(f) = self.feed.as_mut() {
            let h = loc.handle;
            f.expiry
                .push(Reverse((expires_s, loc.worker, h.slot, h.generation)));
        }
    }

    /// The contacts of the feed whose expiry has come, from the heap.
    fn take_expired(&mut self, now_s: u64) -> Vec<Loc> {
        let mut expired = Vec::new();
        let Some(f) = self.feed.as_mut() else {
            return expired;
        };
        let Some(reg) = self.ctl.registry.as_ref() else {
            return expired;
        };
        while let Some(&Reverse((at, worker, slot, generation))) = f.expiry.peek() {
            if u64::from(at) > now_s {
                break;
            }
            f.expiry.pop();
            let loc = Loc {
                worker,
                handle: Handle { slot, generation },
            };
            // Gone (or its slot reused: another generation), or no longer
            // the feed's: nothing to do.
            let Some(e) = reg.get(loc).filter(|e| e.source == Source::Registrar) else {
                continue;
            };
            if e.expires_s == 0 || e.expires_s < at {
                // Never expires now, or filed again under its earlier time.
                continue;
            }
            if u64::from(e.expires_s) <= now_s {
                expired.push(loc);
            } else {
                // Refreshed since it was filed: file it under its new time.
                f.expiry
                    .push(Reverse((e.expires_s, worker, slot, generation)));
            }
        }
        expired
    }

    /// Removes expired contacts of the feed, and after a completed sync
    /// (and its grace) the ones it did not refresh.
    fn feed_sweeps(&mut self) {
        let now = Instant::now();
        let Some(f) = self.feed.as_mut() else {
            return;
        };
        let stale = match f.sweep_stale {
            Some((at, epoch)) if now >= at => {
                f.sweep_stale = None;
                Some(epoch)
            }
            _ => None,
        };
        if stale.is_none() && now.duration_since(f.last_expiry_sweep) < EXPIRY_SWEEP {
            return;
        }
        f.last_expiry_sweep = now;
        let now_s = unix_s();
        let expired = self.take_expired(now_s);
        let Some(reg) = self.ctl.registry.as_ref() else {
            return;
        };
        // The only full scan: once per completed sync.
        let unrefreshed: Vec<Loc> = match stale {
            Some(epoch) => reg
                .iter_from(0)
                .filter(|(_, e)| {
                    // The expired ones are in `expired` already.
                    let due = e.expires_s != 0 && u64::from(e.expires_s) <= now_s;
                    e.source == Source::Registrar && e.sync_epoch < epoch && !due
                })
                .map(|(loc, _)| loc)
                .collect(),
            None => Vec::new(),
        };
        let f = self.feed.as_mut().expect("feed");
        f.stats.expired += expired.len() as u64;
        f.stats.stale_after_sync += unrefreshed.len() as u64;
        if !unrefreshed.is_empty() {
            eprintln!(
                "kaping: DMQ: {} contacts the registrar no longer has are dropped",
                unrefreshed.len()
            );
        }
        for loc in expired.into_iter().chain(unrefreshed) {
            self.remove_contact(loc);
        }
        self.flush_adds();
    }

    /// The removal figures (`registrar_rpc`): `(name, value)` pairs, and
    /// whether the guard holds removals back now.
    pub(super) fn removal_stats(&self) -> Option<(bool, [(&'static str, u64); 8])> {
        let f = self.feed.as_ref()?;
        let r = f.remover.as_ref()?;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        Some((
            f.guard.tripped,
            [
                ("removals_sent", f.guard.sent),
                ("removals_withheld", f.guard.withheld),
                ("guard_trips", f.guard.trips),
                ("removed", g(&r.counters.removed)),
                ("remove_not_found", g(&r.counters.not_found)),
                ("remove_failed", g(&r.counters.failed)),
                ("remove_unanswered", g(&r.counters.unanswered)),
                ("removals_confirmed", f.guard.confirmed),
            ],
        ))
    }

    /// The feed's figures, for `keepalive.stats` and the stop line.
    pub(super) fn feed_stats(
        &self,
    ) -> Option<(
        FeedStats,
        [(&'static str, u64); crate::registrar::node::NodeCounters::COUNT],
    )> {
        let f = self.feed.as_ref()?;
        Some((f.stats, f.node.counters.snapshot()))
    }
}

impl Daemon {
    /// Contacts of the registrar feed kaping holds.
    fn feed_contacts(&self) -> u64 {
        self.ctl
            .registry
            .as_ref()
            .map_or(0, |r| r.count(Source::Registrar) as u64)
    }

    /// The feed's figures as the shm registrar block publishes them (for
    /// `kaping-stat`); `None` without the feed.
    pub(super) fn registrar_figures(&self) -> Option<RegistrarFigures> {
        use std::sync::atomic::Ordering::Relaxed;
        let f = self.feed.as_ref()?;
        let n = &f.node.counters;
        let st = &f.stats;
        let mut out = RegistrarFigures::default();
        for (s, v) in [
            (RegistrarStat::Added, st.added),
            (RegistrarStat::Updated, st.updated),
            (RegistrarStat::Refreshed, st.refreshed),
            (RegistrarStat::Deleted, st.deleted),
            (RegistrarStat::DeleteUnknown, st.delete_unknown),
            (RegistrarStat::Moved, st.moved),
            (RegistrarStat::Expired, st.expired),
            (RegistrarStat::StaleAfterSync, st.stale_after_sync),
            (RegistrarStat::OtherShard, st.other_shard),
            (RegistrarStat::Refused, st.refused),
            (RegistrarStat::SyncsDone, st.syncs_done),
            (RegistrarStat::Received, n.received.load(Relaxed)),
            (RegistrarStat::Requests, n.requests.load(Relaxed)),
            (RegistrarStat::Duplicates, n.duplicates.load(Relaxed)),
            (RegistrarStat::NotPeer, n.not_peer.load(Relaxed)),
            (RegistrarStat::Rejected, n.rejected.load(Relaxed)),
            (RegistrarStat::Changes, n.changes.load(Relaxed)),
            (RegistrarStat::Joins, n.joins.load(Relaxed)),
            (RegistrarStat::Syncs, n.syncs.load(Relaxed)),
            (RegistrarStat::OtherChannels, n.other_channels.load(Relaxed)),
            (RegistrarStat::SyncRefused, n.sync_refused.load(Relaxed)),
            (RegistrarStat::PeerRestarts, n.peer_restarts.load(Relaxed)),
            (
                RegistrarStat::SyncUnanswered,
                n.sync_unanswered.load(Relaxed),
            ),
            (RegistrarStat::Contacts, self.feed_contacts()),
            (RegistrarStat::FeedConfigured, 1),
        ] {
            out.set(s, v);
        }
        if let Some(r) = &f.remover {
            let c = &r.counters;
            for (s, v) in [
                (RegistrarStat::RemovalsSent, f.guard.sent),
                (RegistrarStat::RemovalsWithheld, f.guard.withheld),
                (RegistrarStat::GuardTrips, f.guard.trips),
                (RegistrarStat::Removed, c.removed.load(Relaxed)),
                (RegistrarStat::RemoveNotFound, c.not_found.load(Relaxed)),
                (RegistrarStat::RemoveFailed, c.failed.load(Relaxed)),
                (RegistrarStat::RemoveUnanswered, c.unanswered.load(Relaxed)),
                (RegistrarStat::RemovalsConfirmed, f.guard.confirmed),
                (RegistrarStat::GuardTripped, u64::from(f.guard.tripped)),
                (RegistrarStat::RemovalConfigured, 1),
            ] {
                out.set(s, v);
            }
        }
        Some(out)
    }

    /// Writes the feed's figures into the shm file (with the heartbeat, and
    /// once more when stopping); nothing without the feed, whose block then
    /// stays zero.
    pub(super) fn publish_registrar(&mut self) {
        if let Some(f) = self.registrar_figures() {
            self.shm.write_registrar(&f);
        }
    }
}
