//! The ping token: a fixed-width, MAC-protected identifier that makes reply
//! matching stateless.
//!
//! Every ping carries the same 28-character token three times: as the From
//! `tag` (RFC 3261 §19.3), as the suffix of the Via `branch` after the
//! `z9hG4bK` magic cookie (§8.1.1.7) and as the local part of the Call-ID
//! (§8.1.1.4). A UAS copies From (tag included) and CSeq into its response
//! (§8.2.6.2), so the tag alone tells us which contact answered, which ping it
//! answers and when that ping left, without any per-ping table.
//!
//! # Format
//!
//! ```text
//!  0    4                 12                20              28
//!  +----+------------------+------------------+---------------+
//!  |IIII| hi: 8 chars      | lo: 8 chars      | MAC: 8 chars  |
//!  +----+------------------+------------------+---------------+
//!   |     hi  = worker (8) ‖ slot (24) ‖ generation (16)   48 bits
//!   |     lo  = seq (16) ‖ sent_us (32)                     48 bits
//!   |     MAC = SipHash-2-4 (48 bits)                       48 bits
//!   instance prefix: the 24-bit instance id, 4 × 6 bits
//! ```
//!
//! Every 48-bit word is written as 8 characters of 6 bits, most significant
//! first, over [`ALPHABET`]: 64 characters that are all RFC 3261 `token`
//! characters (§25.1), so the token is valid unquoted in a tag, a branch and
//! a Call-ID `word`. (Equivalently: the 18 bytes `payload ‖ MAC` in base64
//! bit order.) Since the alphabet has exactly 64 symbols, the character ↔
//! 6-bit mapping is a bijection: any change of a character either leaves the
//! alphabet ([`TokenError::Alphabet`]) or changes payload or MAC bits
//! ([`TokenError::Mac`], except with probability 2⁻⁴⁸).
//!
//! The MAC is the low 48 bits of SipHash-2-4, keyed with the 128-bit per-run
//! secret, over the 16 bytes `instance prefix ‖ hi ‖ lo` (big-endian). A reply forged
//! without the secret is believed with probability 2⁻⁴⁸ per attempt; a reply
//! for another kaping instance sharing the port fails the prefix check before
//! any hashing.
//!
//! # Invariants and guarantees
//!
//! * [`encode`] and [`decode`] never allocate, never format and never panic;
//!   their cost is one SipHash of 16 bytes plus 24 table lookups (tens of
//!   ns, about 250 instructions for `decode`). Both work on 48-bit words in
//!   registers, never on byte arrays that are then re-read as words
//!   (store-forwarding stalls).
//! * The MAC is computed by [`siphash24_2words`], SipHash-2-4 specialised to
//!   its fixed 16-byte message: two compression blocks and the length block,
//!   no buffering. Tests pin it against the `siphasher` crate for random keys
//!   and messages, so it is SipHash-2-4 exactly, not a weaker variant.
//! * `decode(key, encode(key, f)) == Ok(f)` for every field value (slots are
//!   24-bit: `encode` keeps the low 24 bits of `slot`, and debug builds assert
//!   that nothing was lost).
//! * The token says nothing about whether the worker id or generation is
//!   current: the engine checks them against its slab.
//!
//! Called by the engine's send path (`encode`, once per ping) and by
//! [`crate::wire::reply::match_reply`] (`decode`, once per reply).

use std::fmt;

/// Length of a token in bytes: instance prefix plus payload and MAC.
pub const TOKEN_LEN: usize = 28;
/// Length of the instance prefix at the start of every token.
pub const INSTANCE_LEN: usize = 4;
/// Largest slot a token can carry: slots are 24-bit.
pub const SLOT_MAX: u32 = (1 << 24) - 1;
/// Number of distinct worker ids a token can carry: worker ids are 8-bit.
pub const WORKERS_MAX: usize = 256;

/// Bits per encoded word (`hi`, `lo`, MAC) and characters per word.
const WORD_BITS: u32 = 48;
const WORD_CHARS: usize = 8;
const WORD_MASK: u64 = (1 << WORD_BITS) - 1;
const INSTANCE_MASK: u32 = (1 << 24) - 1;

const _: () = assert!(WORD_CHARS as u32 * 6 == WORD_BITS);
const _: () = assert!(INSTANCE_LEN + 3 * WORD_CHARS == TOKEN_LEN);

/// The alphabet: 64 RFC 3261 `token` characters (A-Z a-z 0-9 '-' '.'), 6 bits
/// each; index = value.
pub const ALPHABET: [u8; 64] = *b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.";

/// Marks a byte outside [`ALPHABET`] in [`DECODE`]; its high bit is what
/// [`decode`] tests once for all 24 characters.
const INVALID: u8 = 0xFF;

/// Byte → 6-bit value, or [`INVALID`]. Built at compile time from [`ALPHABET`].
const DECODE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// The per-run key: the SipHash key derived from the 128-bit secret and this
/// instance's encoded prefix.
///
/// Cheap to clone (every worker holds a copy). `Debug` never prints the secret.
#[derive(Clone)]
pub struct TokenKey {
    /// SipHash-2-4 state `v0..v3` after keying (the key itself is not kept).
    sip_init: [u64; 4],
    prefix: [u8; INSTANCE_LEN],
    instance_id: u32,
}

impl TokenKey {
    /// A key from a 128-bit secret and an instance id, of which only the low
    /// 24 bits are used (the prefix holds 4 × 6 bits).
    ///
    /// No token starts with '.': an id whose prefix would is taken as the
    /// id one step below in its first character ('.' becomes '-'), and
    /// [`TokenKey::instance_id`] says which. Right after the branch cookie
    /// `z9hG4bK`, a '.' marks the proxy's branch
    /// (`template::PROXY_BRANCH_COOKIE`, DESIGN §10): a token starting with
    /// one would be read one character off from a quoted request, and every
    /// ICMP error of that run counted as forged (one daemon start in 64,
    /// its instance id being random; seen in `tests/icmp.rs`).
    pub fn new(secret: [u8; 16], instance_id: u32) -> TokenKey {
        let mut instance_id = instance_id & INSTANCE_MASK;
        if instance_id >> 18 == 63 {
            // ALPHABET[63] is '.'; ALPHABET[62] is '-'.
            instance_id ^= 1 << 18;
        }
        let prefix = [
            ALPHABET[(instance_id >> 18) as usize & 63],
            ALPHABET[(instance_id >> 12) as usize & 63],
            ALPHABET[(instance_id >> 6) as usize & 63],
            ALPHABET[instance_id as usize & 63],
        ];
        TokenKey {
            sip_init: sip_init(&secret),
            prefix,
            instance_id,
        }
    }

    /// A key with a fresh secret from the operating system's CSPRNG
    /// (`getrandom(2)`). The secret lives only in this process: tokens from a
    /// previous run, or from anyone who never saw this secret, do not verify.
    pub fn random(instance_id: u32) -> std::io::Result<TokenKey> {
        let mut secret = [0u8; 16];
        getrandom::fill(&mut secret).map_err(|e| match e.raw_os_error() {
            Some(errno) => std::io::Error::from_raw_os_error(errno),
            None => std::io::Error::other(format!("getrandom failed: {e}")),
        })?;
        Ok(TokenKey::new(secret, instance_id))
    }

    /// The 4 characters every token of this instance starts with.
    pub fn instance_prefix(&self) -> &[u8; INSTANCE_LEN] {
        &self.prefix
    }

    /// The instance id (its low 24 bits, as encoded in the prefix).
    pub fn instance_id(&self) -> u32 {
        self.instance_id
    }

    /// 48-bit MAC over the 16 bytes `prefix ‖ hi ‖ lo` (big-endian).
    ///
    /// SipHash reads its message as little-endian words, so the two words of
    /// the big-endian message are its halves byte-swapped: the same bytes
    /// the hasher would see, without ever storing them.
    #[inline]
    fn mac(&self, hi: u64, lo: u64) -> u64 {
        let msg = u128::from(u32::from_be_bytes(self.prefix)) << 96
            | u128::from(hi) << 48
            | u128::from(lo);
        let m0 = ((msg >> 64) as u64).swap_bytes();
        let m1 = (msg as u64).swap_bytes();
        siphash24_2words(&self.sip_init, m0, m1) & WORD_MASK
    }
}

/// SipHash-2-4 initial state for a 128-bit key (`k0`, `k1` little-endian,
/// as in the reference implementation and the `siphasher` crate).
fn sip_init(key: &[u8; 16]) -> [u64; 4] {
    let k = u128::from_le_bytes(*key);
    let (k0, k1) = (k as u64, (k >> 64) as u64);
    [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ]
}

/// One SipRound on the state `v0..v3`.
#[inline(always)]
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

/// SipHash-2-4 of the 16-byte message whose little-endian words are `m0`,
/// `m1`: 2 rounds per message word, the final block (length 16 in its top
/// byte, no tail bytes) and 4 finalisation rounds. Exactly what a generic
/// SipHash-2-4 computes over those 16 bytes, minus its buffering.
#[inline]
fn siphash24_2words(init: &[u64; 4], m0: u64, m1: u64) -> u64 {
    const LAST_BLOCK: u64 = 16 << 56;
    let mut v = *init;
    for m in [m0, m1, LAST_BLOCK] {
        v[3] ^= m;
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^= m;
    }
    v[2] ^= 0xff;
    for _ in 0..4 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey")
            .field("instance_id", &self.instance_id)
            .field("prefix", &String::from_utf8_lossy(&self.prefix))
            .finish_non_exhaustive()
    }
}

/// What a token carries besides the instance prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenFields {
    /// Worker that sent the ping (and owns the contact).
    pub worker: u8,
    /// Slab slot of the contact; at most [`SLOT_MAX`].
    pub slot: u32,
    /// Slab generation of the slot when the ping was sent.
    pub generation: u16,
    /// Ping sequence number of the contact (wrapping).
    pub seq: u16,
    /// Low 32 bits of the monotonic send time in µs (wraps every 71 minutes;
    /// RTT is computed with wrapping subtraction).
    pub sent_us: u32,
}

/// Why a byte string is not a valid token for this key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not exactly [`TOKEN_LEN`] bytes.
    #[error("token is not {TOKEN_LEN} bytes long")]
    Length,
    /// The instance prefix is not this instance's.
    #[error("token belongs to another kaping instance (instance prefix mismatch)")]
    Instance,
    /// A byte outside the token alphabet.
    #[error("token contains a byte outside the token alphabet")]
    Alphabet,
    /// The MAC does not verify: forged, corrupted or from another run.
    #[error("token MAC does not verify (forged, corrupted or from another run)")]
    Mac,
}

/// Encodes `fields` for `key` into `out`. Never allocates or panics.
#[inline]
pub fn encode(key: &TokenKey, fields: &TokenFields, out: &mut [u8; TOKEN_LEN]) {
    debug_assert!(
        fields.slot <= SLOT_MAX,
        "slot {} does not fit in 24 bits",
        fields.slot
    );
    let hi = u64::from(fields.worker) << 40
        | u64::from(fields.slot & SLOT_MAX) << 16
        | u64::from(fields.generation);
    let lo = u64::from(fields.seq) << 32 | u64::from(fields.sent_us);
    let mac = key.mac(hi, lo);
    let (prefix, rest) = out.split_at_mut(INSTANCE_LEN);
    prefix.copy_from_slice(&key.prefix);
    for (chars, word) in rest.chunks_exact_mut(WORD_CHARS).zip([hi, lo, mac]) {
        for (i, c) in chars.iter_mut().enumerate() {
            let shift = WORD_BITS - 6 * (i as u32 + 1);
            *c = ALPHABET[(word >> shift) as usize & 63];
        }
    }
}

/// Decodes and verifies a token. Never allocates or panics.
///
/// Checks, in order: length, instance prefix, alphabet, MAC. The alphabet of
/// all 24 characters is checked with one test after the lookups, not one
/// branch per character.
#[inline]
pub fn decode(key: &TokenKey, token: &[u8]) -> Result<TokenFields, TokenError> {
    let Ok(token) = <&[u8; TOKEN_LEN]>::try_from(token) else {
        return Err(TokenError::Length);
    };
    let [p0, p1, p2, p3, rest @ ..] = token;
    // One 32-bit compare, not a byte-slice comparison.
    if u32::from_le_bytes([*p0, *p1, *p2, *p3]) != u32::from_le_bytes(key.prefix) {
        return Err(TokenError::Instance);
    }
    let (hi, bad_hi) = decode_word(&rest[..WORD_CHARS]);
    let (lo, bad_lo) = decode_word(&rest[WORD_CHARS..2 * WORD_CHARS]);
    let (mac, bad_mac) = decode_word(&rest[2 * WORD_CHARS..]);
    // Valid entries are 0..=63; only INVALID has the high bit.
    if (bad_hi | bad_lo | bad_mac) & 0x80 != 0 {
        return Err(TokenError::Alphabet);
    }
    if mac != key.mac(hi, lo) {
        return Err(TokenError::Mac);
    }
    Ok(TokenFields {
        worker: (hi >> 40) as u8,
        slot: (hi >> 16) as u32 & SLOT_MAX,
        generation: hi as u16,
        seq: (lo >> 32) as u16,
        sent_us: lo as u32,
    })
}

/// The instance id a token's prefix carries (what [`TokenKey::new`] was
/// given, its low 24 bits), or `None` when the prefix is not 4 alphabet
/// characters. Unverified: anyone can read it off a reply, so it only
/// lets a forger get past the instance check to the MAC (the tests and
/// the flood bench do exactly that).
pub fn instance_of(token: &[u8]) -> Option<u32> {
    token.get(..INSTANCE_LEN)?.iter().try_fold(0u32, |id, &c| {
        let v = DECODE[c as usize];
        (v != INVALID).then_some(id << 6 | u32::from(v))
    })
}

/// The 48-bit value of 8 token characters, and the OR of their [`DECODE`]
/// entries (high bit set if any character is outside the alphabet; the value
/// is then meaningless). A fixed-size loop that the compiler unrolls: 8 table
/// lookups, no branch.
#[inline(always)]
fn decode_word(chars: &[u8]) -> (u64, u8) {
    debug_assert_eq!(chars.len(), WORD_CHARS);
    let mut word = 0u64;
    let mut invalid = 0u8;
    for &c in &chars[..WORD_CHARS] {
        let v = DECODE[usize::from(c)];
        invalid |= v;
        word = word << 6 | u64::from(v);
    }
    (word & WORD_MASK, invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: [u8; 16] = *b"kaping-test-key!";
    const FIELDS: TokenFields = TokenFields {
        worker: 3,
        slot: 0x00AB_CDEF,
        generation: 0xBEEF,
        seq: 4242,
        sent_us: 0xDEAD_BEEF,
    };

    fn key() -> TokenKey {
        TokenKey::new(SECRET, 0x12_3456)
    }

    fn token_of(key: &TokenKey, fields: &TokenFields) -> [u8; TOKEN_LEN] {
        let mut out = [0xA5; TOKEN_LEN];
        encode(key, fields, &mut out);
        out
    }

    /// RFC 3261 §25.1: token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
    fn is_rfc3261_token_char(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
    }

    #[test]
    fn alphabet_is_64_distinct_token_chars_and_table_inverts_it() {
        for (i, &c) in ALPHABET.iter().enumerate() {
            assert!(
                is_rfc3261_token_char(c),
                "{:?} is not a token char",
                c as char
            );
            assert_eq!(DECODE[usize::from(c)], i as u8);
        }
        let valid = DECODE.iter().filter(|&&v| v != INVALID).count();
        assert_eq!(valid, 64, "the alphabet has duplicates");
    }

    #[test]
    fn the_prefix_names_the_instance_and_nothing_more() {
        let tok = token_of(&key(), &FIELDS);
        assert_eq!(instance_of(&tok), Some(0x12_3456));
        // Another secret with that id: the same prefix, another MAC.
        let other = TokenKey::new([9; 16], instance_of(&tok).unwrap());
        let forged = token_of(&other, &FIELDS);
        assert_eq!(forged[..INSTANCE_LEN], tok[..INSTANCE_LEN]);
        assert_eq!(decode(&key(), &forged), Err(TokenError::Mac));
        assert_eq!(instance_of(b"AB"), None);
        assert_eq!(instance_of(b"AB!D"), None);
    }

    #[test]
    fn round_trip_fixed_and_extremes() {
        let k = key();
        let all_ones = TokenFields {
            worker: u8::MAX,
            slot: SLOT_MAX,
            generation: u16::MAX,
            seq: u16::MAX,
            sent_us: u32::MAX,
        };
        let zero = TokenFields {
            worker: 0,
            slot: 0,
            generation: 0,
            seq: 0,
            sent_us: 0,
        };
        for f in [FIELDS, all_ones, zero] {
            let t = token_of(&k, &f);
            assert_eq!(&t[..INSTANCE_LEN], k.instance_prefix());
            assert_eq!(decode(&k, &t), Ok(f));
        }
    }

    /// A first '.' would read as the proxy's branch cookie `z9hG4bK.`: it
    /// becomes '-', the id says so, and every other first character stays.
    #[test]
    fn no_token_starts_with_a_dot() {
        for id in [0xFC_0000, 0xFF_FFFF, 0xFD_2345] {
            let k = TokenKey::new(SECRET, id);
            assert_eq!(k.instance_prefix()[0], b'-', "{id:#x}");
            assert_eq!(k.instance_id(), id ^ (1 << 18));
            assert_eq!(instance_of(k.instance_prefix()), Some(k.instance_id()));
            let t = token_of(&k, &FIELDS);
            assert_eq!(t[0], b'-');
            assert_eq!(decode(&k, &t), Ok(FIELDS));
        }
        for top in 0..63u32 {
            let k = TokenKey::new(SECRET, top << 18 | 0x1234);
            assert_eq!(k.instance_prefix()[0], ALPHABET[top as usize]);
            assert_eq!(k.instance_id(), top << 18 | 0x1234);
        }
    }

    #[test]
    fn instance_prefix_encodes_the_low_24_bits_most_significant_first() {
        assert_eq!(TokenKey::new(SECRET, 0).instance_prefix(), b"AAAA");
        assert_eq!(TokenKey::new(SECRET, 1).instance_prefix(), b"AAAB");
        assert_eq!(TokenKey::new(SECRET, 64).instance_prefix(), b"AABA");
        // The first character is never the cookie's dot (below).
        assert_eq!(TokenKey::new(SECRET, 0xFF_FFFF).instance_prefix(), b"-...");
        assert_eq!(TokenKey::new(SECRET, 0xF7_FFFF).instance_prefix(), b"9...");
        // Bits above 24 are ignored.
        assert_eq!(
            TokenKey::new(SECRET, 0xFF00_0001).instance_prefix(),
            b"AAAB"
        );
        assert_eq!(TokenKey::new(SECRET, 0xFF00_0001).instance_id(), 1);
    }

    /// Pins the wire format (bit layout, alphabet, MAC input): changing any of
    /// them must be a deliberate decision that updates this vector. Checked by
    /// hand: instance 0x123456 = 000100 100011 010001 010110 = "EjRW"; payload
    /// 03 AB CD | EF BE EF | 10 92 DE | AD BE EF = "A6vN" "777v" "EJLe" "rb7v";
    /// the last 8 characters are the MAC.
    #[test]
    fn known_answer() {
        let t = token_of(&key(), &FIELDS);
        assert_eq!(
            std::str::from_utf8(&t).unwrap(),
            "EjRWA6vN777vEJLerb7v1inxaJZx"
        );
    }

    #[test]
    fn every_single_byte_alteration_fails() {
        let k = key();
        let good = token_of(&k, &FIELDS);
        let mut checked = 0;
        for pos in 0..TOKEN_LEN {
            for byte in 0..=255u8 {
                if byte == good[pos] {
                    continue;
                }
                let mut bad = good;
                bad[pos] = byte;
                let expected = if pos < INSTANCE_LEN {
                    TokenError::Instance
                } else if ALPHABET.contains(&byte) {
                    TokenError::Mac
                } else {
                    TokenError::Alphabet
                };
                assert_eq!(
                    decode(&k, &bad),
                    Err(expected),
                    "pos {pos} byte {byte:#04x}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, TOKEN_LEN * 255);
    }

    #[test]
    fn wrong_key_fails_with_mac() {
        let t = token_of(&key(), &FIELDS);
        let mut other_secret = SECRET;
        other_secret[15] ^= 1;
        assert_eq!(
            decode(&TokenKey::new(other_secret, 0x12_3456), &t),
            Err(TokenError::Mac)
        );
    }

    #[test]
    fn other_instance_fails_with_instance() {
        let t = token_of(&key(), &FIELDS);
        assert_eq!(
            decode(&TokenKey::new(SECRET, 0x12_3457), &t),
            Err(TokenError::Instance)
        );
        // Same secret, other instance, even a prefix rewritten to ours: the MAC
        // covers the prefix.
        let other = TokenKey::new(SECRET, 0x65_4321);
        let mut t2 = token_of(&other, &FIELDS);
        assert_eq!(decode(&key(), &t2), Err(TokenError::Instance));
        t2[..INSTANCE_LEN].copy_from_slice(key().instance_prefix());
        assert_eq!(decode(&key(), &t2), Err(TokenError::Mac));
    }

    #[test]
    fn wrong_length_fails() {
        let k = key();
        let t = token_of(&k, &FIELDS);
        for len in 0..TOKEN_LEN {
            assert_eq!(decode(&k, &t[..len]), Err(TokenError::Length), "len {len}");
        }
        let mut long = [b'A'; 2 * TOKEN_LEN];
        long[..TOKEN_LEN].copy_from_slice(&t);
        for len in TOKEN_LEN + 1..=long.len() {
            assert_eq!(
                decode(&k, &long[..len]),
                Err(TokenError::Length),
                "len {len}"
            );
        }
    }

    #[test]
    fn random_keys_differ() {
        let a = TokenKey::random(7).expect("getrandom");
        let b = TokenKey::random(7).expect("getrandom");
        assert_eq!(a.instance_prefix(), b.instance_prefix());
        let ta = token_of(&a, &FIELDS);
        assert_eq!(decode(&a, &ta), Ok(FIELDS));
        assert_eq!(decode(&b, &ta), Err(TokenError::Mac));
    }

    #[test]
    fn debug_does_not_print_the_secret() {
        let s = format!("{:?}", key());
        assert!(s.contains("instance_id"), "{s}");
        assert!(!s.contains("hasher") && !s.contains("k0"), "{s}");
    }

    /// The reference: `siphasher`'s generic SipHash-2-4 over the same bytes.
    fn reference_sip(secret: &[u8; 16], msg: &[u8; 16]) -> u64 {
        siphasher::sip::SipHasher24::new_with_key(secret).hash(msg)
    }

    #[test]
    fn siphash_matches_the_reference_vectors() {
        // The SipHash paper's key 00..0f and its 16-byte message 00..0f:
        // the 17th entry of the reference `vectors.h` (0x3f2acc7f57c29bdb).
        let key: [u8; 16] = std::array::from_fn(|i| i as u8);
        let msg: [u8; 16] = std::array::from_fn(|i| i as u8);
        let m0 = u64::from_le_bytes(msg[..8].try_into().unwrap());
        let m1 = u64::from_le_bytes(msg[8..].try_into().unwrap());
        assert_eq!(
            siphash24_2words(&sip_init(&key), m0, m1),
            0x3f2a_cc7f_57c2_9bdb
        );
        assert_eq!(reference_sip(&key, &msg), 0x3f2a_cc7f_57c2_9bdb);
    }

    proptest! {
        /// The specialised SipHash is SipHash-2-4, bit for bit.
        #[test]
        fn siphash_2words_equals_siphasher(secret in any::<[u8; 16]>(), msg in any::<[u8; 16]>()) {
            let m0 = u64::from_le_bytes(msg[..8].try_into().unwrap());
            let m1 = u64::from_le_bytes(msg[8..].try_into().unwrap());
            prop_assert_eq!(siphash24_2words(&sip_init(&secret), m0, m1), reference_sip(&secret, &msg));
        }

        /// The MAC is the low 48 bits of SipHash-2-4 over the big-endian
        /// bytes `prefix ‖ hi ‖ lo`, as the module documentation says.
        #[test]
        fn mac_is_siphash_of_the_documented_bytes(
            secret in any::<[u8; 16]>(),
            instance in any::<u32>(),
            hi in 0..=WORD_MASK,
            lo in 0..=WORD_MASK,
        ) {
            let k = TokenKey::new(secret, instance);
            let mut msg = [0u8; 16];
            msg[..4].copy_from_slice(k.instance_prefix());
            msg[4..10].copy_from_slice(&hi.to_be_bytes()[2..]);
            msg[10..].copy_from_slice(&lo.to_be_bytes()[2..]);
            prop_assert_eq!(k.mac(hi, lo), reference_sip(&secret, &msg) & WORD_MASK);
        }

        #[test]
        fn round_trip_any_fields(
            secret in any::<[u8; 16]>(),
            instance in any::<u32>(),
            worker in any::<u8>(),
            slot in 0..=SLOT_MAX,
            generation in any::<u16>(),
            seq in any::<u16>(),
            sent_us in any::<u32>(),
        ) {
            let k = TokenKey::new(secret, instance);
            let f = TokenFields { worker, slot, generation, seq, sent_us };
            let t = token_of(&k, &f);
            prop_assert!(t.iter().all(|&b| is_rfc3261_token_char(b)));
            prop_assert_eq!(&t[..INSTANCE_LEN], k.instance_prefix());
            prop_assert_eq!(decode(&k, &t), Ok(f));
        }

        #[test]
        fn arbitrary_bytes_never_decode(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let k = key();
            let mut token = bytes.clone();
            // Give most inputs the right length and prefix so the MAC is exercised.
            if token.len() >= TOKEN_LEN {
                token.truncate(TOKEN_LEN);
                token[..INSTANCE_LEN].copy_from_slice(k.instance_prefix());
            }
            prop_assert!(decode(&k, &token).is_err());
        }
    }
}
