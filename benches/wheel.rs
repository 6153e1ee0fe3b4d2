//! Timer wheel and slab benchmarks.
//!
//! `wheel/steady`: the worker's steady state. N contacts pinged every 30 s,
//! first pings spread uniformly over the interval (DESIGN §5), warmed for one
//! full interval so the level occupancy is what a running worker has. Each
//! step advances 1 tick, expires the due batch and re-arms each expired index
//! at +30 s. Reported per timer: one insert + its share of cascades + one
//! expiry (the time of a run of ticks divided by the timers it expired).
//!
//! `wheel/rearm`: moving an armed timer to a random new deadline (what a
//! reply does to its contact's timeout), at the same occupancy.
//!
//! `slab/churn`: remove + insert at 50 % occupancy.
//!
//! Run: `cargo bench --bench wheel -- --measurement-time 3`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kaping::engine::slab::{Handle, Slab};
use kaping::engine::wheel::Wheel;
use std::hint::black_box;
use std::time::Instant;

const INTERVAL_TICKS: u64 = 30_000;
const OCCUPANCIES: [u32; 3] = [10_000, 100_000, 1_000_000];

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Steady {
    wheel: Wheel,
    now_tick: u64,
    out: Vec<u32>,
}

impl Steady {
    fn new(timers: u32) -> Steady {
        let start_tick = 1_000_000;
        let mut wheel = Wheel::new(timers, start_tick);
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for index in 0..timers {
            wheel.insert(index, start_tick + 1 + rng.next() % INTERVAL_TICKS);
        }
        let mut s = Steady {
            wheel,
            now_tick: start_tick,
            out: Vec::with_capacity(timers as usize),
        };
        for _ in 0..INTERVAL_TICKS {
            s.tick();
        }
        s
    }

    /// One worker loop turn: advance a tick, expire, re-arm. Returns the
    /// number of timers expired (and re-armed).
    #[inline]
    fn tick(&mut self) -> u64 {
        self.now_tick += 1;
        self.out.clear();
        let n = self
            .wheel
            .poll_expired(self.now_tick, &mut self.out, usize::MAX);
        let next = self.now_tick + INTERVAL_TICKS;
        for &index in &self.out {
            self.wheel.insert(index, next);
        }
        n as u64
    }
}

fn wheel_steady(c: &mut Criterion) {
    let mut group = c.benchmark_group("wheel/steady");
    group.throughput(Throughput::Elements(1));
    for &timers in &OCCUPANCIES {
        let mut s = Steady::new(timers);
        group.bench_function(BenchmarkId::from_parameter(timers), |b| {
            b.iter_custom(|iters| {
                let mut expired = 0u64;
                let start = Instant::now();
                while expired < iters {
                    expired += s.tick();
                }
                let elapsed = start.elapsed();
                // Per timer, scaled to the `iters` criterion asked for.
                elapsed.mul_f64(iters as f64 / expired as f64)
            })
        });
        assert_eq!(s.wheel.len(), timers);
    }
    group.finish();
}

fn wheel_rearm(c: &mut Criterion) {
    let mut group = c.benchmark_group("wheel/rearm");
    group.throughput(Throughput::Elements(1));
    for &timers in &OCCUPANCIES {
        let mut s = Steady::new(timers);
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        group.bench_function(BenchmarkId::from_parameter(timers), |b| {
            b.iter(|| {
                let r = rng.next();
                let index = (r % u64::from(timers)) as u32;
                let deadline = s.now_tick + 1 + (r >> 32) % INTERVAL_TICKS;
                s.wheel.insert(black_box(index), black_box(deadline));
            })
        });
    }
    group.finish();
}

fn slab_churn(c: &mut Criterion) {
    let mut group = c.benchmark_group("slab/churn");
    group.throughput(Throughput::Elements(1));
    for &capacity in &OCCUPANCIES {
        let mut slab: Slab<[u64; 8]> = Slab::with_capacity(capacity);
        let mut live: Vec<Handle> = (0..capacity / 2)
            .map(|i| slab.insert([u64::from(i); 8]).unwrap())
            .collect();
        let mut rng = XorShift(0xdead_beef_cafe_f00d);
        group.bench_function(BenchmarkId::from_parameter(capacity), |b| {
            b.iter(|| {
                let k = (rng.next() % live.len() as u64) as usize;
                let value = slab.remove(live[k]).unwrap();
                live[k] = slab.insert(black_box(value)).unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, wheel_steady, wheel_rearm, slab_churn);
criterion_main!(benches);
