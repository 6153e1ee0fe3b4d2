//! Randomized comparison of `engine::wheel::Wheel` with a reference model
//! (a `BTreeMap` ordered by `(deadline, index)`), through the public API only.
//!
//! Each seed runs phases of two kinds:
//! * small steps: the clock advances one tick per poll, so "fires exactly on
//!   its deadline tick" is checked directly;
//! * big jumps: the clock jumps by random amounts up to 2^44 ticks (about 550
//!   years), to `next_deadline`, or just short of it, so cascades through
//!   every level are exercised and "fires no later than the first poll with
//!   now >= deadline" is checked.
//!
//! Between polls, random inserts (past, near, far, level-boundary and
//! near-`u64::MAX` deadlines), re-inserts and cancels; some polls are limited
//! to a few entries, with cancels and re-arms of still-pending entries between
//! the limited calls. After every call: every returned index was armed and
//! due, nothing due is left behind by an unsaturated call, `len` and
//! `deadline` agree with the model, and `next_deadline` is never later than
//! the true earliest deadline (and is in the future when nothing is due, so a
//! worker sleeping until it would not spin).

use kaping::engine::wheel::Wheel;
use std::collections::BTreeMap;

const CAPACITY: u32 = 512;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Model {
    by_deadline: BTreeMap<(u64, u32), ()>,
    deadline: Vec<Option<u64>>,
}

impl Model {
    fn insert(&mut self, index: u32, d: u64) {
        self.cancel(index);
        self.deadline[index as usize] = Some(d);
        self.by_deadline.insert((d, index), ());
    }
    fn cancel(&mut self, index: u32) -> bool {
        match self.deadline[index as usize].take() {
            Some(d) => {
                self.by_deadline.remove(&(d, index));
                true
            }
            None => false,
        }
    }
    fn earliest(&self) -> Option<u64> {
        self.by_deadline.keys().next().map(|&(d, _)| d)
    }
}

struct Harness {
    rng: Rng,
    wheel: Wheel,
    model: Model,
    now: u64,
    out: Vec<u32>,
    fired: u64,
}

impl Harness {
    fn deadline(&mut self) -> u64 {
        let now = self.now;
        match self.rng.below(100) {
            0..=9 => now.saturating_sub(self.rng.below(1000)),
            10..=39 => now + self.rng.below(64),
            40..=64 => now + self.rng.below(5_000),
            65..=82 => now + self.rng.below(300_000),
            83..=90 => {
                // Exactly around a level boundary, seen from now.
                let level = 1 + self.rng.below(8) as u32;
                (now + (1u64 << (6 * level)) + self.rng.below(3)).saturating_sub(1)
            }
            91..=97 => now + self.rng.below(1 << 40),
            _ => u64::MAX - self.rng.below(1 << 20),
        }
    }

    fn random_op(&mut self) {
        let index = self.rng.below(CAPACITY as u64) as u32;
        if self.rng.below(4) == 0 {
            assert_eq!(self.wheel.cancel(index), self.model.cancel(index));
        } else {
            let d = self.deadline();
            self.wheel.insert(index, d);
            self.model.insert(index, d);
        }
    }

    /// Cancel or move an entry that is due right now (maybe sitting in the
    /// wheel's pending list after a limited poll).
    fn disturb_due(&mut self) {
        let due: Vec<u32> = self
            .model
            .by_deadline
            .range(..=(self.now, u32::MAX))
            .map(|(&(_, i), _)| i)
            .take(8)
            .collect();
        if due.is_empty() {
            return;
        }
        let index = due[self.rng.below(due.len() as u64) as usize];
        match self.rng.below(3) {
            0 => assert!(self.wheel.cancel(index) && self.model.cancel(index)),
            1 => {
                let d = self.now + 1 + self.rng.below(10_000);
                self.wheel.insert(index, d);
                self.model.insert(index, d);
            }
            _ => {
                let d = self.now.saturating_sub(self.rng.below(5));
                self.wheel.insert(index, d);
                self.model.insert(index, d);
            }
        }
    }

    /// One poll at `self.now` with `limit`; returns whether it was saturated.
    fn poll(&mut self, limit: usize, ctx: &str) -> bool {
        self.out.clear();
        let n = self.wheel.poll_expired(self.now, &mut self.out, limit);
        assert_eq!(n, self.out.len(), "{ctx}");
        assert!(n <= limit, "{ctx}");
        for &index in &self.out {
            let d = self.model.deadline[index as usize]
                .unwrap_or_else(|| panic!("{ctx}: index {index} fired but was not armed"));
            assert!(
                d <= self.now,
                "{ctx}: index {index} due {d} fired early at {}",
                self.now
            );
            assert!(
                !self.wheel.is_armed(index),
                "{ctx}: fired index still armed"
            );
            self.model.cancel(index);
            self.fired += 1;
        }
        let saturated = n == limit;
        if !saturated {
            if let Some(d) = self.model.earliest() {
                assert!(
                    d > self.now,
                    "{ctx}: an entry due {d} was not returned at {}",
                    self.now
                );
            }
            assert_eq!(self.wheel.now_tick(), self.now, "{ctx}");
        }
        self.check(ctx);
        saturated
    }

    fn poll_until_drained(&mut self, ctx: &str) {
        if self.rng.below(4) == 0 {
            let limit = 1 + self.rng.below(4) as usize;
            let mut calls = 0;
            while self.poll(limit, ctx) {
                if self.rng.below(2) == 0 {
                    self.disturb_due();
                }
                calls += 1;
                assert!(
                    calls <= CAPACITY as usize + 1,
                    "{ctx}: limited polls never end"
                );
            }
        } else {
            let saturated = self.poll(usize::MAX, ctx);
            assert!(!saturated);
        }
    }

    fn check(&mut self, ctx: &str) {
        assert_eq!(
            self.wheel.len() as usize,
            self.model.by_deadline.len(),
            "{ctx}: len"
        );
        let nd = self.wheel.next_deadline();
        match self.model.earliest() {
            None => assert_eq!(nd, None, "{ctx}: empty wheel has no deadline"),
            Some(d) => {
                let nd = nd.unwrap_or_else(|| panic!("{ctx}: next_deadline None, {d} armed"));
                assert!(
                    nd <= d,
                    "{ctx}: next_deadline {nd} later than earliest deadline {d}"
                );
                if d > self.wheel.now_tick() {
                    assert!(
                        nd > self.wheel.now_tick(),
                        "{ctx}: next_deadline {nd} not in the future with nothing due"
                    );
                }
            }
        }
        for _ in 0..4 {
            let i = self.rng.below(CAPACITY as u64) as u32;
            assert_eq!(
                self.wheel.deadline(i),
                self.model.deadline[i as usize],
                "{ctx}: deadline({i})"
            );
            assert_eq!(
                self.wheel.is_armed(i),
                self.model.deadline[i as usize].is_some()
            );
        }
    }
}

fn run(seed: u64, phases: usize) -> u64 {
    let mut rng = Rng(seed | 1);
    let start = match rng.below(3) {
        0 => 0,
        1 => rng.below(1 << 40),
        _ => (1u64 << 36) - rng.below(100), // just below a level-6 boundary
    };
    let mut h = Harness {
        rng,
        wheel: Wheel::new(CAPACITY, start),
        model: Model {
            by_deadline: BTreeMap::new(),
            deadline: vec![None; CAPACITY as usize],
        },
        now: start,
        out: Vec::with_capacity(CAPACITY as usize),
        fired: 0,
    };
    for phase in 0..phases {
        let small = phase % 2 == 0;
        let steps = if small { 400 } else { 60 };
        for step in 0..steps {
            let ctx = format!("seed {seed:#x} phase {phase} step {step}");
            for _ in 0..h.rng.below(5) {
                h.random_op();
            }
            h.check(&ctx);
            if small {
                h.now += 1;
            } else {
                let nd = h.wheel.next_deadline();
                // Never jump to the near-u64::MAX deadlines: the clock would
                // have nowhere left to go (they are covered in the unit tests).
                h.now = match (h.rng.below(4), nd.filter(|&t| t < 1 << 62)) {
                    (0, Some(t)) => t.max(h.now),
                    (1, Some(t)) => t.saturating_sub(1).max(h.now),
                    _ => {
                        let bits = h.rng.below(45) as u32;
                        h.now + h.rng.below(1u64 << bits) + 1
                    }
                };
            }
            h.poll_until_drained(&ctx);
        }
    }
    h.fired
}

#[test]
fn wheel_matches_reference_model() {
    let mut total = 0;
    for k in 0..24u64 {
        let seed = 0x51ce_2026_0000_0000 ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        total += run(seed, 10);
    }
    // The comparison must actually exercise expiry, not just insert/cancel.
    assert!(total > 10_000, "only {total} timers fired");
}

#[test]
fn wheel_matches_reference_model_long_run() {
    // One long run: state accumulates across many phases and huge jumps.
    let fired = run(0xdead_beef_cafe_f00d, 60);
    assert!(fired > 10_000, "only {fired} timers fired");
}
