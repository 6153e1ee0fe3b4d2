//! Per-contact liveness: state machine, miss counting and RTT statistics
//! (DESIGN §6).
//!
//! Ownership: one `Liveness` per contact, stored in the worker's slab entry
//! and mutated only by that worker; the worker copies the public fields into
//! the contact's shared-memory slot after every change and turns every
//! returned [`Transition`] into an event.
//!
//! States: `Unknown → Up ⇄ Down → Removed`, plus `Unknown → Down` (a contact
//! that never answers) and `Unknown/Up → Removed` when `remove_after` is not
//! above `down_after`.
//! * Any *alive* reply (its status code is in [`Policy::alive`]) makes the
//!   contact Up and clears the consecutive-miss count.
//! * A miss is a ping with no reply within the reply timeout (after
//!   retries), an ICMP unreachable, or a reply whose status code is not alive
//!   (an "error reply": it still proves the path works, so it updates RTT
//!   and `last_code`, but the contact is not serving). RFC 3261 §21 gives
//!   every final response class a meaning; which ones mean "alive" is policy,
//!   and the default (any response, as Kamailio's nathelper) treats even a
//!   `503` or `404` as proof that a SIP stack answered.
//! * `down_after` consecutive misses → Down (0 behaves as 1: a contact cannot
//!   be down before it missed once); `remove_after` consecutive misses →
//!   Removed (0 = never), like the Kamailio keepalive module's
//!   `delete_counter`. Removed is terminal: later replies and misses change
//!   nothing, so a straggling reply cannot resurrect a removed contact in the
//!   published record.
//!
//! RTT statistics follow RFC 6298 §2 (SRTT and RTTVAR, α = 1/8, β = 1/4),
//! computed with shifts on fixed-point values that keep 8 fractional bits of
//! a microsecond. Linux keeps SRTT×8 and RTTVAR×4 in integer units; with the
//! room of a `u64` we keep 2^-8 µs, so the truncation of each update (below
//! 2^-8 µs, accumulating to under 2^-5 µs in the filter) is invisible once the
//! public `srtt_us`/`rttvar_us` are rounded to whole microseconds. The RTO of
//! RFC 6298 is not computed: kaping's reply timeout is a fixed policy, and
//! every retry carries its own token, so samples are never ambiguous (Karn).
//!
//! Never: allocates, panics or formats in `on_*` (all arithmetic saturates or
//! wraps deliberately). `AliveCodes::parse` allocates for its error text; it
//! runs at configuration time only.

use std::fmt;

/// A contact's liveness state. The values are the shm slot state codes
/// (`shm::layout::SLOT_UNKNOWN` … `SLOT_REMOVED`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Unknown = 1,
    Up = 2,
    Down = 3,
    Removed = 4,
    /// Kept open by NAT-only keepalives: pinged, liveness not known. Never
    /// changes (no reply is expected, so none is waited for).
    Unmonitored = 5,
}

impl State {
    /// Lower-case name for events, logs and `kaping-stat`.
    pub fn name(self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Up => "up",
            State::Down => "down",
            State::Removed => "removed",
            State::Unmonitored => "unmonitored",
        }
    }
}

/// SIP status codes span 100..=699 (RFC 3261 §7.2: a 3-digit code whose
/// first digit is the class, §21 defines classes 1xx to 6xx).
const CODE_MIN: u16 = 100;
const CODE_MAX: u16 = 699;
const CODE_COUNT: usize = (CODE_MAX - CODE_MIN + 1) as usize;
const CODE_WORDS: usize = CODE_COUNT.div_ceil(64);

/// The set of reply status codes that mean "alive": a bitset over
/// 100..=699, `Copy`, 80 bytes, O(1) `contains`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AliveCodes {
    bits: [u64; CODE_WORDS],
}

/// Why an alive-codes specification was refused. Items are numbered from 1
/// in the order they appear between commas.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AliveCodesError {
    #[error(
        "alive reply codes: empty specification (use \"any\" or a list such as \"200-299,404\")"
    )]
    Empty,
    #[error("alive reply codes: item {item} is empty (stray comma?)")]
    EmptyItem { item: usize },
    #[error("alive reply codes: item {item}: {text:?} is not a status code (expected digits, e.g. 200, or a range 200-299)")]
    NotANumber { item: usize, text: String },
    #[error("alive reply codes: item {item}: {text} is outside the SIP status code range 100-699")]
    OutOfRange { item: usize, text: String },
    #[error(
        "alive reply codes: item {item}: range {low}-{high} runs backwards (write {high}-{low})"
    )]
    ReversedRange { item: usize, low: u16, high: u16 },
}

impl AliveCodes {
    /// Every status code is alive: any response proves a SIP stack answered
    /// (nathelper's behaviour, and kaping's default).
    pub fn any() -> Self {
        let mut codes = AliveCodes {
            bits: [0; CODE_WORDS],
        };
        codes.insert_range(CODE_MIN, CODE_MAX);
        codes
    }

    /// Parses `"any"` (case-insensitive) or a comma-separated list of codes
    /// and inclusive ranges, e.g. `"200-299,404,486"`. Whitespace around
    /// items and around `-` is ignored.
    pub fn parse(spec: &str) -> Result<Self, AliveCodesError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(AliveCodesError::Empty);
        }
        if spec.eq_ignore_ascii_case("any") {
            return Ok(Self::any());
        }
        let mut codes = AliveCodes {
            bits: [0; CODE_WORDS],
        };
        for (i, raw) in spec.split(',').enumerate() {
            let item = i + 1;
            let text = raw.trim();
            if text.is_empty() {
                return Err(AliveCodesError::EmptyItem { item });
            }
            let (low, high) = match text.split_once('-') {
                Some((lo, hi)) => (parse_code(item, lo.trim())?, parse_code(item, hi.trim())?),
                None => {
                    let code = parse_code(item, text)?;
                    (code, code)
                }
            };
            if low > high {
                return Err(AliveCodesError::ReversedRange { item, low, high });
            }
            codes.insert_range(low, high);
        }
        Ok(codes)
    }

    /// Whether `code` counts as alive. Codes outside 100..=699 never do.
    #[inline]
    pub fn contains(&self, code: u16) -> bool {
        if !(CODE_MIN..=CODE_MAX).contains(&code) {
            return false;
        }
        let bit = (code - CODE_MIN) as usize;
        self.bits[bit / 64] & (1u64 << (bit % 64)) != 0
    }

    /// Whether every code is alive.
    pub fn is_any(&self) -> bool {
        *self == Self::any()
    }

    fn insert_range(&mut self, low: u16, high: u16) {
        debug_assert!(CODE_MIN <= low && low <= high && high <= CODE_MAX);
        for code in low..=high {
            let bit = (code - CODE_MIN) as usize;
            self.bits[bit / 64] |= 1u64 << (bit % 64);
        }
    }
}

fn parse_code(item: usize, text: &str) -> Result<u16, AliveCodesError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AliveCodesError::NotANumber {
            item,
            text: text.to_owned(),
        });
    }
    match text.parse::<u16>() {
        Ok(code) if (CODE_MIN..=CODE_MAX).contains(&code) => Ok(code),
        _ => Err(AliveCodesError::OutOfRange {
            item,
            text: text.to_owned(),
        }),
    }
}

impl Default for AliveCodes {
    fn default() -> Self {
        Self::any()
    }
}

/// Renders the canonical specification: `any`, or sorted codes and ranges
/// (`200-299,404`), which `parse` accepts back.
impl fmt::Display for AliveCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            return f.write_str("any");
        }
        let mut first = true;
        let mut code = CODE_MIN;
        while code <= CODE_MAX {
            if !self.contains(code) {
                code += 1;
                continue;
            }
            let low = code;
            while code < CODE_MAX && self.contains(code + 1) {
                code += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if low == code {
                write!(f, "{low}")?;
            } else {
                write!(f, "{low}-{code}")?;
            }
            code += 1;
        }
        Ok(())
    }
}

impl fmt::Debug for AliveCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AliveCodes({self})")
    }
}

/// How replies and misses move the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Consecutive misses that make a contact Down (0 behaves as 1).
    pub down_after: u16,
    /// Consecutive misses that make a contact Removed; 0 = never.
    pub remove_after: u16,
    /// Reply codes that mean alive; others are error replies (misses).
    pub alive: AliveCodes,
}

/// What caused a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// An alive reply.
    Reply,
    /// No reply within the reply timeout (after retries).
    Timeout,
    /// A reply whose status code is not alive.
    ErrorReply,
    /// ICMP port/host unreachable for the contact's address.
    Unreachable,
    /// Removed by the operator (control socket, reload), not by misses.
    Removed,
}

impl Reason {
    /// Lower-case name for events and logs.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Reply => "reply",
            Reason::Timeout => "timeout",
            Reason::ErrorReply => "error_reply",
            Reason::Unreachable => "unreachable",
            Reason::Removed => "removed",
        }
    }
}

/// A state change, to be published as an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub old: State,
    pub new: State,
    pub reason: Reason,
}

/// Fractional bits of the fixed-point SRTT/RTTVAR (module docs).
const RTT_FRAC_BITS: u32 = 8;

/// One contact's liveness record. The public fields are what the shm slot
/// publishes; the fixed-point RTT estimator state is private.
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    pub state: State,
    /// Consecutive misses (saturating).
    pub misses: u16,
    /// Pings sent (wrapping).
    pub sent: u32,
    /// Replies received, alive or not (wrapping).
    pub answered: u32,
    pub rtt_last_us: u32,
    pub rtt_min_us: u32,
    pub rtt_max_us: u32,
    /// RFC 6298 SRTT, rounded to µs; 0 until the first sample.
    pub srtt_us: u32,
    /// RFC 6298 RTTVAR, rounded to µs; 0 until the first sample.
    pub rttvar_us: u32,
    /// Status code of the last reply; 0 before any.
    pub last_code: u16,
    pub last_ping_ms: u64,
    pub last_reply_ms: u64,
    /// SRTT in 2^-8 µs; meaningful once `has_rtt`.
    srtt_fp: u64,
    /// RTTVAR in 2^-8 µs; meaningful once `has_rtt`.
    rttvar_fp: u64,
    has_rtt: bool,
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new()
    }
}

impl Liveness {
    /// A contact that has not been pinged yet: Unknown, no samples.
    pub fn new() -> Liveness {
        Liveness {
            state: State::Unknown,
            misses: 0,
            sent: 0,
            answered: 0,
            rtt_last_us: 0,
            rtt_min_us: 0,
            rtt_max_us: 0,
            srtt_us: 0,
            rttvar_us: 0,
            last_code: 0,
            last_ping_ms: 0,
            last_reply_ms: 0,
            srtt_fp: 0,
            rttvar_fp: 0,
            has_rtt: false,
        }
    }

    /// A ping left for this contact at wall-clock `now_ms`.
    #[inline]
    pub fn on_sent(&mut self, now_ms: u64) {
        self.sent = self.sent.wrapping_add(1);
        self.last_ping_ms = now_ms;
    }

    /// A reply with status `code` arrived `rtt_us` after its ping. Alive codes
    /// make the contact Up; others count as a miss ([`Reason::ErrorReply`]).
    /// Either way the RTT sample and `last_code` are recorded. A Removed
    /// contact is left untouched.
    #[inline]
    pub fn on_reply(
        &mut self,
        code: u16,
        rtt_us: u32,
        now_ms: u64,
        p: &Policy,
    ) -> Option<Transition> {
        if self.state == State::Removed {
            return None;
        }
        self.answered = self.answered.wrapping_add(1);
        self.last_code = code;
        self.last_reply_ms = now_ms;
        self.sample_rtt(rtt_us);
        if !p.alive.contains(code) {
            return self.miss(p, Reason::ErrorReply);
        }
        self.misses = 0;
        self.move_to(State::Up, Reason::Reply)
    }

    /// No reply within the reply timeout, after retries.
    #[inline]
    pub fn on_miss(&mut self, p: &Policy) -> Option<Transition> {
        self.miss(p, Reason::Timeout)
    }

    /// ICMP unreachable for the contact's address: counts as a miss at once,
    /// without waiting for the reply timeout.
    #[inline]
    pub fn on_unreachable(&mut self, p: &Policy) -> Option<Transition> {
        self.miss(p, Reason::Unreachable)
    }

    /// The sub-µs parts of the RTT estimator (SRTT, RTTVAR), which the
    /// published µs fields round away. A worker that keeps only the
    /// published fields (the shm slot) saves these two bytes beside them and
    /// hands them back to [`Liveness::resume_estimator`], so no precision is
    /// lost between samples.
    pub fn estimator_fractions(&self) -> (u8, u8) {
        ((self.srtt_fp & 0xff) as u8, (self.rttvar_fp & 0xff) as u8)
    }

    /// Rebuilds the private estimator state of a record whose public fields
    /// were restored from a published copy, given the fractions that
    /// [`Liveness::estimator_fractions`] returned when it was published.
    pub fn resume_estimator(&mut self, srtt_frac: u8, rttvar_frac: u8) {
        // round_fp rounds half up: a fraction >= 1/2 was rounded into the µs.
        let unround = |us: u32, frac: u8| -> u64 {
            let floor = u64::from(us).saturating_sub(u64::from(frac >= 0x80));
            (floor << RTT_FRAC_BITS) | u64::from(frac)
        };
        // Every reply takes an RTT sample, so any answer means the estimator
        // has started (the counter wraps only after 2^32 replies; the
        // extremes are non-zero after any non-zero sample).
        self.has_rtt = self.answered != 0 || self.rtt_max_us != 0;
        self.srtt_fp = unround(self.srtt_us, srtt_frac);
        self.rttvar_fp = unround(self.rttvar_us, rttvar_frac);
    }

    /// The operator removed the contact: Removed with [`Reason::Removed`],
    /// unless it already was.
    pub fn on_removed(&mut self) -> Option<Transition> {
        self.move_to(State::Removed, Reason::Removed)
    }

    fn miss(&mut self, p: &Policy, reason: Reason) -> Option<Transition> {
        if self.state == State::Removed {
            return None;
        }
        self.misses = self.misses.saturating_add(1);
        if p.remove_after != 0 && self.misses >= p.remove_after {
            self.move_to(State::Removed, reason)
        } else if self.misses >= p.down_after.max(1) {
            self.move_to(State::Down, reason)
        } else {
            None
        }
    }

    #[inline]
    fn move_to(&mut self, new: State, reason: Reason) -> Option<Transition> {
        let old = self.state;
        if old == new {
            return None;
        }
        debug_assert_ne!(old, State::Removed, "Removed is terminal");
        self.state = new;
        Some(Transition { old, new, reason })
    }

    /// RFC 6298 §2.2 (first sample) and §2.3 (later samples), in 2^-8 µs.
    #[inline]
    fn sample_rtt(&mut self, rtt_us: u32) {
        let r = u64::from(rtt_us) << RTT_FRAC_BITS; // < 2^40: no overflow below
        self.rtt_last_us = rtt_us;
        if !self.has_rtt {
            self.has_rtt = true;
            self.rtt_min_us = rtt_us;
            self.rtt_max_us = rtt_us;
            // SRTT <- R, RTTVAR <- R/2
            self.srtt_fp = r;
            self.rttvar_fp = r >> 1;
        } else {
            self.rtt_min_us = self.rtt_min_us.min(rtt_us);
            self.rtt_max_us = self.rtt_max_us.max(rtt_us);
            // RTTVAR <- (1 - 1/4) RTTVAR + 1/4 |SRTT - R'|, with the old SRTT,
            // then SRTT <- (1 - 1/8) SRTT + 1/8 R'.
            let delta = self.srtt_fp.abs_diff(r);
            self.rttvar_fp = self.rttvar_fp - (self.rttvar_fp >> 2) + (delta >> 2);
            self.srtt_fp = self.srtt_fp - (self.srtt_fp >> 3) + (r >> 3);
        }
        self.srtt_us = round_fp(self.srtt_fp);
        self.rttvar_us = round_fp(self.rttvar_fp);
    }
}

/// 2^-8 µs fixed point to whole µs, rounding half up. Both estimators are
/// convex combinations of samples below 2^32 µs, so the result fits a `u32`;
/// `min` only guards the rounding of the very top value.
#[inline]
fn round_fp(fp: u64) -> u32 {
    ((fp + (1 << (RTT_FRAC_BITS - 1))) >> RTT_FRAC_BITS).min(u64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(down_after: u16, remove_after: u16) -> Policy {
        Policy {
            down_after,
            remove_after,
            alive: AliveCodes::parse("200-299").unwrap(),
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Ev {
        Reply(u16),
        Timeout,
        Unreachable,
        OperatorRemove,
    }

    #[test]
    fn state_values_match_shm_slot_codes() {
        assert_eq!(State::Unknown as u8, 1);
        assert_eq!(State::Up as u8, 2);
        assert_eq!(State::Down as u8, 3);
        assert_eq!(State::Removed as u8, 4);
    }

    /// (state, misses, event, down_after, remove_after) ->
    /// (state, misses, transition as (old, new, reason)).
    type Row = (
        State,
        u16,
        Ev,
        u16,
        u16,
        State,
        u16,
        Option<(State, State, Reason)>,
    );

    #[test]
    fn every_transition() {
        use Ev::*;
        use Reason as R;
        use State::*;
        #[rustfmt::skip]
        let table: &[Row] = &[
            (Unknown, 0, Reply(200), 3, 0, Up, 0, Some((Unknown, Up, R::Reply))),
            (Unknown, 0, Timeout, 3, 0, Unknown, 1, None),
            (Unknown, 2, Timeout, 3, 0, Down, 3, Some((Unknown, Down, R::Timeout))),
            (Unknown, 2, Unreachable, 3, 0, Down, 3, Some((Unknown, Down, R::Unreachable))),
            (Unknown, 2, Reply(503), 3, 0, Down, 3, Some((Unknown, Down, R::ErrorReply))),
            (Unknown, 0, Reply(503), 3, 0, Unknown, 1, None),
            (Unknown, 0, Timeout, 0, 0, Down, 1, Some((Unknown, Down, R::Timeout))),
            (Unknown, 0, Timeout, 3, 1, Removed, 1, Some((Unknown, Removed, R::Timeout))),
            (Up, 0, Reply(200), 3, 0, Up, 0, None),
            (Up, 2, Reply(299), 3, 0, Up, 0, None),
            (Up, 1, Timeout, 3, 0, Up, 2, None),
            (Up, 0, Timeout, 1, 0, Down, 1, Some((Up, Down, R::Timeout))),
            (Up, 2, Reply(404), 3, 0, Down, 3, Some((Up, Down, R::ErrorReply))),
            (Up, 2, Unreachable, 3, 0, Down, 3, Some((Up, Down, R::Unreachable))),
            (Up, 1, Timeout, 3, 2, Removed, 2, Some((Up, Removed, R::Timeout))),
            (Up, 0, OperatorRemove, 3, 0, Removed, 0, Some((Up, Removed, R::Removed))),
            (Down, 3, Reply(200), 3, 0, Up, 0, Some((Down, Up, R::Reply))),
            (Down, 3, Reply(180), 3, 0, Down, 4, None),
            (Down, 3, Timeout, 3, 5, Down, 4, None),
            (Down, 3, Timeout, 3, 0, Down, 4, None),
            (Down, 4, Timeout, 3, 5, Removed, 5, Some((Down, Removed, R::Timeout))),
            (Down, 4, Unreachable, 3, 5, Removed, 5, Some((Down, Removed, R::Unreachable))),
            (Down, 4, Reply(500), 3, 5, Removed, 5, Some((Down, Removed, R::ErrorReply))),
            (Down, u16::MAX, Timeout, 3, 0, Down, u16::MAX, None),
            (Down, 9, OperatorRemove, 3, 0, Removed, 9, Some((Down, Removed, R::Removed))),
            (Unknown, 0, OperatorRemove, 3, 0, Removed, 0, Some((Unknown, Removed, R::Removed))),
            (Removed, 5, Reply(200), 3, 5, Removed, 5, None),
            (Removed, 5, Timeout, 3, 5, Removed, 5, None),
            (Removed, 5, Unreachable, 3, 5, Removed, 5, None),
            (Removed, 5, OperatorRemove, 3, 5, Removed, 5, None),
        ];
        for (row, &(state, misses, ev, down, remove, want_state, want_misses, want_t)) in
            table.iter().enumerate()
        {
            let p = policy(down, remove);
            let mut l = Liveness {
                state,
                misses,
                ..Liveness::new()
            };
            let t = match ev {
                Reply(code) => l.on_reply(code, 1000, 5, &p),
                Timeout => l.on_miss(&p),
                Unreachable => l.on_unreachable(&p),
                OperatorRemove => l.on_removed(),
            };
            let want_t = want_t.map(|(old, new, reason)| Transition { old, new, reason });
            assert_eq!(
                (l.state, l.misses, t),
                (want_state, want_misses, want_t),
                "row {row}: {state:?} misses {misses} + {ev:?} (down_after {down}, remove_after {remove})"
            );
        }
    }

    #[test]
    fn default_policy_any_code_is_alive() {
        let p = Policy {
            down_after: 2,
            remove_after: 0,
            alive: AliveCodes::any(),
        };
        let mut l = Liveness::new();
        assert_eq!(l.on_miss(&p), None);
        let t = l.on_reply(503, 900, 10, &p).unwrap();
        assert_eq!(
            (t.old, t.new, t.reason),
            (State::Unknown, State::Up, Reason::Reply)
        );
        assert_eq!(l.misses, 0);
    }

    #[test]
    fn counters_codes_and_times_are_recorded() {
        let p = policy(2, 0);
        let mut l = Liveness::new();
        l.on_sent(1_000);
        l.on_sent(2_000);
        assert_eq!((l.sent, l.last_ping_ms), (2, 2_000));
        l.on_reply(486, 700, 2_001, &p);
        assert_eq!((l.answered, l.last_code, l.last_reply_ms), (1, 486, 2_001));
        assert_eq!(l.misses, 1, "a non-alive reply is a miss");
        assert_eq!(l.rtt_last_us, 700, "but its RTT still counts");
        l.on_reply(200, 300, 3_000, &p);
        l.on_reply(200, 900, 4_000, &p);
        assert_eq!((l.rtt_min_us, l.rtt_max_us, l.rtt_last_us), (300, 900, 900));
        assert_eq!(l.answered, 3);
        // A Removed record is frozen.
        l.on_removed();
        let before = (l.answered, l.last_code, l.rtt_last_us, l.misses);
        assert_eq!(l.on_reply(200, 5, 9_000, &p), None);
        assert_eq!((l.answered, l.last_code, l.rtt_last_us, l.misses), before);
    }

    #[test]
    fn rfc6298_first_and_second_sample_exact() {
        let p = policy(1, 0);
        let mut l = Liveness::new();
        l.on_reply(200, 100_000, 0, &p);
        // §2.2: SRTT = R, RTTVAR = R/2.
        assert_eq!((l.srtt_us, l.rttvar_us), (100_000, 50_000));
        l.on_reply(200, 200_000, 0, &p);
        // §2.3: RTTVAR = 3/4 * 50000 + 1/4 * |100000 - 200000| = 62500
        //       SRTT   = 7/8 * 100000 + 1/8 * 200000 = 112500
        assert_eq!((l.srtt_us, l.rttvar_us), (112_500, 62_500));
        // An odd first sample keeps its half microsecond internally.
        let mut l = Liveness::new();
        l.on_reply(200, 3, 0, &p);
        assert_eq!(l.rttvar_fp, 3 << (RTT_FRAC_BITS - 1));
        assert_eq!(l.rttvar_us, 2, "1.5 µs rounds half up");
    }

    #[test]
    fn rfc6298_matches_float_reference() {
        let p = policy(1, 0);
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for run in 0..50 {
            let mut l = Liveness::new();
            let (mut srtt, mut rttvar) = (0f64, 0f64);
            for i in 0..2_000 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let r: u32 = match rng % 100 {
                    0 => u32::MAX - (rng >> 40) as u32,      // absurd outlier
                    1..=5 => (rng >> 20) as u32 % 5_000_000, // spikes up to 5 s
                    _ => 20_000 + (rng >> 20) as u32 % (1_000 + run * 1_000), // jitter
                };
                l.on_reply(200, r, 0, &p);
                let rf = f64::from(r);
                if i == 0 {
                    srtt = rf;
                    rttvar = rf / 2.0;
                } else {
                    rttvar = 0.75 * rttvar + 0.25 * (srtt - rf).abs();
                    srtt = 0.875 * srtt + 0.125 * rf;
                }
                assert!(
                    (f64::from(l.srtt_us) - srtt).abs() <= 0.55,
                    "run {run} sample {i}: srtt {} vs {srtt}",
                    l.srtt_us
                );
                assert!(
                    (f64::from(l.rttvar_us) - rttvar).abs() <= 0.55,
                    "run {run} sample {i}: rttvar {} vs {rttvar}",
                    l.rttvar_us
                );
            }
        }
    }

    #[test]
    fn rtt_extremes_do_not_overflow() {
        let p = policy(1, 0);
        let mut l = Liveness::new();
        for _ in 0..100 {
            l.on_reply(200, u32::MAX, 0, &p);
        }
        assert_eq!((l.srtt_us, l.rttvar_us), (u32::MAX, 0));
        l.on_reply(200, 0, 0, &p);
        assert_eq!(l.rtt_min_us, 0);
        let mut l = Liveness::new();
        l.on_reply(200, 0, 0, &p);
        assert_eq!(
            (l.srtt_us, l.rttvar_us, l.rtt_min_us, l.rtt_max_us),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn alive_codes_parse() {
        let any = AliveCodes::parse("any").unwrap();
        assert_eq!(any, AliveCodes::any());
        assert_eq!(AliveCodes::parse("  ANY ").unwrap(), any);
        assert!(any.contains(100) && any.contains(699) && any.contains(404));
        assert!(!any.contains(99) && !any.contains(700) && !any.contains(0));
        assert!(!any.contains(u16::MAX));

        let c = AliveCodes::parse("200-299,404,486").unwrap();
        for code in 0..=800u16 {
            let want = (200..=299).contains(&code) || code == 404 || code == 486;
            assert_eq!(c.contains(code), want, "code {code}");
        }
        assert_eq!(AliveCodes::parse(" 200 - 299 , 404,486 ").unwrap(), c);
        assert_eq!(AliveCodes::parse("100-699").unwrap(), any);
        assert_eq!(
            AliveCodes::parse("404-404").unwrap(),
            AliveCodes::parse("404").unwrap()
        );
        assert_eq!(AliveCodes::default(), any);
    }

    #[test]
    fn alive_codes_errors_are_precise() {
        use AliveCodesError as E;
        let cases: &[(&str, E)] = &[
            ("", E::Empty),
            ("   ", E::Empty),
            ("200,,404", E::EmptyItem { item: 2 }),
            ("200,", E::EmptyItem { item: 2 }),
            (",200", E::EmptyItem { item: 1 }),
            (
                "2x0",
                E::NotANumber {
                    item: 1,
                    text: "2x0".into(),
                },
            ),
            (
                "200,ok",
                E::NotANumber {
                    item: 2,
                    text: "ok".into(),
                },
            ),
            (
                "200-",
                E::NotANumber {
                    item: 1,
                    text: "".into(),
                },
            ),
            (
                "-299",
                E::NotANumber {
                    item: 1,
                    text: "".into(),
                },
            ),
            (
                "200-2-3",
                E::NotANumber {
                    item: 1,
                    text: "2-3".into(),
                },
            ),
            (
                "+200",
                E::NotANumber {
                    item: 1,
                    text: "+200".into(),
                },
            ),
            (
                "99",
                E::OutOfRange {
                    item: 1,
                    text: "99".into(),
                },
            ),
            (
                "200,700",
                E::OutOfRange {
                    item: 2,
                    text: "700".into(),
                },
            ),
            (
                "100-99999999",
                E::OutOfRange {
                    item: 1,
                    text: "99999999".into(),
                },
            ),
            (
                "300-200",
                E::ReversedRange {
                    item: 1,
                    low: 300,
                    high: 200,
                },
            ),
            (
                "anything",
                E::NotANumber {
                    item: 1,
                    text: "anything".into(),
                },
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(AliveCodes::parse(spec).as_ref(), Err(want), "spec {spec:?}");
        }
        assert_eq!(
            E::OutOfRange {
                item: 2,
                text: "700".into()
            }
            .to_string(),
            "alive reply codes: item 2: 700 is outside the SIP status code range 100-699"
        );
        assert_eq!(
            E::ReversedRange {
                item: 1,
                low: 300,
                high: 200
            }
            .to_string(),
            "alive reply codes: item 1: range 300-200 runs backwards (write 200-300)"
        );
        assert!(E::EmptyItem { item: 2 }
            .to_string()
            .contains("item 2 is empty"));
    }

    #[test]
    fn alive_codes_display_round_trips() {
        for spec in ["any", "200-299,404,486", "100", "100-199,600-699", "699"] {
            let c = AliveCodes::parse(spec).unwrap();
            assert_eq!(c.to_string(), spec);
            assert_eq!(AliveCodes::parse(&c.to_string()).unwrap(), c);
        }
        assert_eq!(
            AliveCodes::parse("486,200-250,251-299")
                .unwrap()
                .to_string(),
            "200-299,486"
        );
    }

    #[test]
    fn names() {
        assert_eq!(State::Down.name(), "down");
        assert_eq!(Reason::ErrorReply.name(), "error_reply");
    }

    #[test]
    fn resuming_from_published_fields_loses_nothing() {
        let p = Policy {
            down_after: 3,
            remove_after: 0,
            alive: AliveCodes::any(),
        };
        let mut exact = Liveness::new();
        let mut copied = Liveness::new();
        let mut fractions = (0, 0);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..5000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let rtt = 200 + (x % 5000) as u32;
            exact.on_reply(200, rtt, u64::from(i), &p);
            // What a worker does: rebuild from the published fields.
            let mut l = Liveness::new();
            l.state = copied.state;
            l.answered = copied.answered;
            l.rtt_last_us = copied.rtt_last_us;
            l.rtt_min_us = copied.rtt_min_us;
            l.rtt_max_us = copied.rtt_max_us;
            l.srtt_us = copied.srtt_us;
            l.rttvar_us = copied.rttvar_us;
            l.resume_estimator(fractions.0, fractions.1);
            l.on_reply(200, rtt, u64::from(i), &p);
            fractions = l.estimator_fractions();
            copied = l;
            assert_eq!(
                (copied.srtt_us, copied.rttvar_us),
                (exact.srtt_us, exact.rttvar_us),
                "sample {i}"
            );
        }
    }
}
