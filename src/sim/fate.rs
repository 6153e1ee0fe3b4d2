//! What the responder does to each contact and each packet: stable
//! per-contact fates (dead, flapping, error code) and per-packet noise
//! (loss, latency, malformed and duplicate replies).
//!
//! Ownership: a [`FatePlan`] is built once (from the command line or by an
//! in-process user such as `kaping demo`) and shared read-only by the
//! contacts writer and every responder thread; each thread owns its own
//! [`Rng`]. The fate of a contact is a pure function of its Request-URI bytes
//! and the seed (SipHash-1-3 keyed with the seed), so `contacts --fates` can
//! write down, in advance and in another process, what the responder will do
//! with each contact.
//!
//! Fate bands: with `u` the contact hash mapped to `[0, 1)`, `u < dead` is
//! dead, then the next `error` is answered with `--error-code`, then the next
//! `flap` flaps; everything else answers normally. A flapping contact answers
//! during even periods of `(unix_ms + phase_ms) / period_ms` and is silent
//! during odd ones, `phase_ms` coming from the same hash: wall-clock based, so
//! every process agrees on who is silent at a given time.
//!
//! Never allocates and never panics on the per-packet path (`contact_hash`,
//! `fate`, `flap_answers`, `to_tag`, `Rng`, `LatencyDist::sample_ns`).
//! Callers: `contacts.rs` (fates file), `responder.rs` (per packet) and the
//! `kaping-loadgen` CLI (parsing durations and distributions).

use siphasher::sip::SipHasher13;

/// Width of the To tag the responder adds (RFC 3261 §8.2.6.2: a UAS adds a
/// tag to the To header of a response when the request had none).
pub const TAG_LEN: usize = 16;

/// Mixes the seed into the second SipHash key so `--seed 0` still gives a
/// keyed, well spread hash.
const KEY1_MIX: u64 = 0x6b61_7069_6e67_2d6c; // "kaping-l"

/// The stable, per-contact fate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Answers every request with 200 OK (subject to per-packet noise).
    Ok,
    /// Never answers.
    Dead,
    /// Answers with this status code.
    Error(u16),
    /// Alternates answering and silent periods, shifted by `phase_ms`.
    Flap { phase_ms: u64 },
}

/// The stable fractions and their parameters.
#[derive(Clone, Debug)]
pub struct FatePlan {
    hasher: SipHasher13,
    dead: f64,
    error: f64,
    flap: f64,
    error_code: u16,
    flap_period_ms: u64,
}

impl FatePlan {
    /// Validates the fractions (each in `[0, 1]`, sum ≤ 1), the error code
    /// (a final response, 200..=699) and the flap period (≥ 1 ms).
    pub fn new(
        seed: u64,
        dead: f64,
        error: f64,
        error_code: u16,
        flap: f64,
        flap_period_ms: u64,
    ) -> Result<FatePlan, String> {
        for (name, v) in [("--dead", dead), ("--error", error), ("--flap", flap)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} {v} is not a fraction in [0, 1]"));
            }
        }
        if dead + error + flap > 1.0 + 1e-9 {
            return Err(format!(
                "--dead {dead} + --error {error} + --flap {flap} exceed 1 (the fates are disjoint)"
            ));
        }
        if !(200..=699).contains(&error_code) {
            return Err(format!(
                "--error-code {error_code} is not a final response code (200..=699)"
            ));
        }
        if flap > 0.0 && flap_period_ms == 0 {
            return Err("--flap-period must be at least 1ms".to_string());
        }
        Ok(FatePlan {
            hasher: SipHasher13::new_with_keys(seed, seed ^ KEY1_MIX),
            dead,
            error,
            flap,
            error_code,
            flap_period_ms: flap_period_ms.max(1),
        })
    }

    /// The contact's hash: SipHash-1-3 of the exact Request-URI bytes.
    #[inline]
    pub fn contact_hash(&self, uri: &[u8]) -> u64 {
        self.hasher.hash(uri)
    }

    /// The fate a contact hash selects.
    #[inline]
    pub fn fate(&self, hash: u64) -> Fate {
        let u = unit(hash);
        if u < self.dead {
            Fate::Dead
        } else if u < self.dead + self.error {
            Fate::Error(self.error_code)
        } else if u < self.dead + self.error + self.flap {
            // An independent-looking phase: the low bits are not used by `unit`.
            Fate::Flap {
                phase_ms: mix(hash) % self.flap_period_ms,
            }
        } else {
            Fate::Ok
        }
    }

    /// Does a flapping contact with `phase_ms` answer at `unix_ms`?
    #[inline]
    pub fn flap_answers(&self, phase_ms: u64, unix_ms: u64) -> bool {
        (unix_ms.wrapping_add(phase_ms) / self.flap_period_ms).is_multiple_of(2)
    }
}

/// The To tag for a contact: lowercase hex of a mix of its hash (stable per
/// contact and seed, so every response to one contact carries the same tag).
#[inline]
pub fn to_tag(hash: u64) -> [u8; TAG_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let v = mix(hash ^ 0x746f_2d74_6167_0000); // "to-tag"
    let mut out = [0u8; TAG_LEN];
    for (i, b) in out.iter_mut().enumerate() {
        *b = HEX[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// Top 53 bits of `x` as a float in `[0, 1)`.
#[inline]
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// splitmix64's finalizer: a bijective scramble.
#[inline]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// wyrand: a small, fast per-thread generator for per-packet decisions.
/// Not cryptographic; it only has to look random to a benchmark.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(mix(seed ^ 0x9e37_79b9_7f4a_7c15))
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// A float in `[0, 1)`.
    #[inline]
    pub fn unit(&mut self) -> f64 {
        unit(self.next_u64())
    }

    /// True with probability `p`; draws nothing when `p` is 0, so disabled
    /// options cost one comparison.
    #[inline]
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift (Lemire), no division.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The random part of the reply delay, added to the fixed `--latency`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LatencyDist {
    /// No random part: every reply waits exactly the fixed latency.
    None,
    /// Uniform in `[lo_ns, hi_ns]`.
    Uniform { lo_ns: u64, hi_ns: u64 },
    /// Exponential with this mean, cut at [`EXP_CAP_MEANS`] means so the delay
    /// queue stays bounded in time.
    Exp { mean_ns: u64 },
}

/// The exponential tail is cut at this many means (e^-50: never reached in
/// practice, but a bound is a bound).
pub const EXP_CAP_MEANS: u64 = 50;

impl LatencyDist {
    /// `uniform:1ms..5ms` or `exp:3ms`.
    pub fn parse(s: &str) -> Result<LatencyDist, String> {
        if let Some(range) = s.strip_prefix("uniform:") {
            let (lo, hi) = range
                .split_once("..")
                .ok_or_else(|| format!("latency distribution {s:?}: expected uniform:LO..HI"))?;
            let (lo_ns, hi_ns) = (parse_duration_ns(lo)?, parse_duration_ns(hi)?);
            if lo_ns > hi_ns {
                return Err(format!("latency distribution {s:?}: LO is above HI"));
            }
            Ok(LatencyDist::Uniform { lo_ns, hi_ns })
        } else if let Some(mean) = s.strip_prefix("exp:") {
            Ok(LatencyDist::Exp {
                mean_ns: parse_duration_ns(mean)?,
            })
        } else {
            Err(format!(
                "latency distribution {s:?}: expected uniform:LO..HI or exp:MEAN"
            ))
        }
    }

    /// One delay drawn from the distribution, in nanoseconds.
    #[inline]
    pub fn sample_ns(&self, rng: &mut Rng) -> u64 {
        match *self {
            LatencyDist::None => 0,
            LatencyDist::Uniform { lo_ns, hi_ns } => lo_ns + rng.below(hi_ns - lo_ns + 1),
            LatencyDist::Exp { mean_ns } => {
                // Inverse transform; 1 - u is in (0, 1], so ln is finite.
                let x = -(mean_ns as f64) * (1.0 - rng.unit()).ln();
                (x as u64).min(mean_ns.saturating_mul(EXP_CAP_MEANS))
            }
        }
    }

    /// The largest delay it can produce.
    pub fn max_ns(&self) -> u64 {
        match *self {
            LatencyDist::None => 0,
            LatencyDist::Uniform { hi_ns, .. } => hi_ns,
            LatencyDist::Exp { mean_ns } => mean_ns.saturating_mul(EXP_CAP_MEANS),
        }
    }
}

/// `2ms`, `1.5s`, `250us`, `100ns`, `10min`, `1h`, `0`: a duration in
/// nanoseconds.
pub fn parse_duration_ns(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("duration {s:?}: expected a number and a unit (ns, us, ms, s)"))?;
    let scale = match unit {
        "" if value == 0.0 => 0.0,
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "min" => 60e9,
        "h" => 3600e9,
        _ => {
            return Err(format!(
                "duration {s:?}: unit {unit:?} is not one of ns, us, ms, s, min, h"
            ))
        }
    };
    let ns = value * scale;
    if !ns.is_finite() || ns > u64::MAX as f64 / 2.0 {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(ns.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration_ns("2ms"), Ok(2_000_000));
        assert_eq!(parse_duration_ns("1.5s"), Ok(1_500_000_000));
        assert_eq!(parse_duration_ns("250us"), Ok(250_000));
        assert_eq!(parse_duration_ns("0"), Ok(0));
        assert!(parse_duration_ns("5").is_err());
        assert!(parse_duration_ns("5 parsecs").is_err());
        assert!(parse_duration_ns("ms").is_err());
    }

    #[test]
    fn latency_distributions_parse_and_stay_in_range() {
        let u = LatencyDist::parse("uniform:1ms..5ms").unwrap();
        assert_eq!(
            u,
            LatencyDist::Uniform {
                lo_ns: 1_000_000,
                hi_ns: 5_000_000
            }
        );
        let e = LatencyDist::parse("exp:3ms").unwrap();
        assert!(LatencyDist::parse("uniform:5ms..1ms").is_err());
        assert!(LatencyDist::parse("normal:3ms").is_err());
        let mut rng = Rng::new(7);
        let mut sum = 0u64;
        for _ in 0..20_000 {
            let x = u.sample_ns(&mut rng);
            assert!((1_000_000..=5_000_000).contains(&x));
            let y = e.sample_ns(&mut rng);
            assert!(y <= e.max_ns());
            sum += y;
        }
        let mean = sum as f64 / 20_000.0;
        assert!((2.7e6..3.3e6).contains(&mean), "exp mean {mean}");
    }

    #[test]
    fn fates_are_stable_and_in_proportion() {
        let plan = FatePlan::new(42, 0.1, 0.2, 486, 0.05, 10_000).unwrap();
        let again = FatePlan::new(42, 0.1, 0.2, 486, 0.05, 10_000).unwrap();
        let other_seed = FatePlan::new(43, 0.1, 0.2, 486, 0.05, 10_000).unwrap();
        let (mut dead, mut err, mut flap, mut differs) = (0, 0, 0, 0);
        let n = 100_000;
        for i in 0..n {
            let uri = format!("sip:u{i}@127.0.0.1:5060");
            let h = plan.contact_hash(uri.as_bytes());
            let f = plan.fate(h);
            assert_eq!(f, again.fate(again.contact_hash(uri.as_bytes())));
            if f != other_seed.fate(other_seed.contact_hash(uri.as_bytes())) {
                differs += 1;
            }
            match f {
                Fate::Dead => dead += 1,
                Fate::Error(c) => {
                    assert_eq!(c, 486);
                    err += 1
                }
                Fate::Flap { phase_ms } => {
                    assert!(phase_ms < 10_000);
                    flap += 1
                }
                Fate::Ok => {}
            }
        }
        let near = |count: i32, p: f64| ((count as f64 / n as f64) - p).abs() < 0.01;
        assert!(near(dead, 0.1) && near(err, 0.2) && near(flap, 0.05));
        assert!(differs > n / 10, "the seed changes the fates");
    }

    #[test]
    fn flapping_alternates_by_period() {
        let plan = FatePlan::new(0, 0.0, 0.0, 503, 1.0, 1000).unwrap();
        assert!(plan.flap_answers(0, 0));
        assert!(plan.flap_answers(0, 999));
        assert!(!plan.flap_answers(0, 1000));
        assert!(plan.flap_answers(0, 2000));
        assert!(!plan.flap_answers(500, 500));
    }

    #[test]
    fn plans_are_validated() {
        assert!(FatePlan::new(0, 0.6, 0.6, 503, 0.0, 1).is_err());
        assert!(FatePlan::new(0, -0.1, 0.0, 503, 0.0, 1).is_err());
        assert!(FatePlan::new(0, 0.0, 0.1, 180, 0.0, 1).is_err());
        assert!(FatePlan::new(0, 0.0, 0.0, 503, 0.1, 0).is_err());
    }

    #[test]
    fn tags_are_hex_and_stable() {
        let a = to_tag(1);
        assert_eq!(a, to_tag(1));
        assert_ne!(a, to_tag(2));
        assert!(a.iter().all(|b| b.is_ascii_hexdigit()));
    }
}
