//! Byte encodings shared by journal records and snapshot entries: the
//! checksum, the field encodings (`str`, `opt str`, `opt u32`), a contact, a
//! liveness history and an [`Op`] payload. The layouts are specified byte by
//! byte in the parent module's documentation; this file is their only
//! implementation.
//!
//! Encoding appends to a caller-owned `Vec<u8>` (the store's one reusable
//! buffer): it never allocates beyond growing that buffer. Decoding reads a
//! borrowed slice through [`Cursor`], never panics on hostile bytes (every
//! length is checked against what remains) and reports what was wrong as a
//! `&'static str` the caller places in a [`super::StateError`] with the file
//! and offset.

use super::{ContactRecord, History, Op};
use siphasher::sip::SipHasher13;

/// SipHash-1-3 keys of every checksum in the state directory: the ASCII of
/// "kaping-s" and "tate-v01" read as little-endian u64s. A checksum is not a
/// MAC here (the directory is trusted); the keys only make the function
/// concrete so a recovery tool can recompute it.
pub(super) const CHECKSUM_K0: u64 = u64::from_le_bytes(*b"kaping-s");
pub(super) const CHECKSUM_K1: u64 = u64::from_le_bytes(*b"tate-v01");

/// Encodes `None` in an `opt str` length field.
pub(super) const NONE_LEN: u32 = u32::MAX;

/// Op kinds (journal record byte 4).
pub(super) const KIND_ADD: u8 = 1;
pub(super) const KIND_DEL: u8 = 2;
pub(super) const KIND_FLUSH: u8 = 3;
/// An Add whose contact carries the `contact ext` fields.
pub(super) const KIND_ADD_EXT: u8 = 4;

/// Encoded size of a present [`History`] (without its presence byte).
pub(super) const HISTORY_LEN: usize = 1 + 2 + 4 * 7 + 2 + 8 + 8;

/// SipHash-1-3 of `bytes` with the directory's keys (no length prefix).
#[inline]
pub(super) fn checksum(bytes: &[u8]) -> u64 {
    SipHasher13::new_with_keys(CHECKSUM_K0, CHECKSUM_K1).hash(bytes)
}

/// A streaming checksum with the same keys (the snapshot trailer's chain).
pub(super) fn checksum_stream() -> SipHasher13 {
    SipHasher13::new_with_keys(CHECKSUM_K0, CHECKSUM_K1)
}

#[inline]
fn put_str(buf: &mut Vec<u8>, s: &str) {
    // Lengths above u32::MAX - 1 cannot reach here: records are bounded far
    // below that by `journal::RECORD_PAYLOAD_MAX` before encoding.
    debug_assert!(s.len() < NONE_LEN as usize, "string of {} bytes", s.len());
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

#[inline]
fn put_opt_str(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => put_str(buf, s),
        None => buf.extend_from_slice(&NONE_LEN.to_le_bytes()),
    }
}

#[inline]
fn put_opt_u32(buf: &mut Vec<u8>, v: Option<u32>) {
    match v {
        Some(v) => {
            buf.push(1);
            buf.extend_from_slice(&v.to_le_bytes());
        }
        None => buf.extend_from_slice(&[0, 0, 0, 0, 0]),
    }
}

/// Encoded size of a contact (for bounds checks before encoding).
pub(super) fn contact_len(c: &ContactRecord) -> usize {
    let opt = |s: &Option<String>| 4 + s.as_ref().map_or(0, |s| s.len());
    4 + c.uri.len() + opt(&c.aor) + opt(&c.received) + opt(&c.path) + 5 + opt(&c.owner)
}

/// Encoded size of a contact's ext fields.
pub(super) fn contact_ext_len(c: &ContactRecord) -> usize {
    let opt = |s: &Option<String>| 4 + s.as_ref().map_or(0, |s| s.len());
    opt(&c.socket) + opt(&c.source) + opt(&c.keepalive)
}

/// Appends a contact's ext fields: socket, source, keepalive.
pub(super) fn put_contact_ext(buf: &mut Vec<u8>, c: &ContactRecord) {
    put_opt_str(buf, c.socket.as_deref());
    put_opt_str(buf, c.source.as_deref());
    put_opt_str(buf, c.keepalive.as_deref());
}

/// Appends a contact: uri, aor, received, path, interval_ms, owner.
pub(super) fn put_contact(buf: &mut Vec<u8>, c: &ContactRecord) {
    put_str(buf, &c.uri);
    put_opt_str(buf, c.aor.as_deref());
    put_opt_str(buf, c.received.as_deref());
    put_opt_str(buf, c.path.as_deref());
    put_opt_u32(buf, c.interval_ms);
    put_opt_str(buf, c.owner.as_deref());
}

/// Appends a presence byte and, when present, the history fields.
pub(super) fn put_history(buf: &mut Vec<u8>, h: Option<&History>) {
    let Some(h) = h else {
        buf.push(0);
        return;
    };
    buf.push(1);
    buf.push(h.state);
    buf.extend_from_slice(&h.misses.to_le_bytes());
    for v in [
        h.sent,
        h.answered,
        h.rtt_last_us,
        h.rtt_min_us,
        h.rtt_max_us,
        h.srtt_us,
        h.rttvar_us,
    ] {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    buf.extend_from_slice(&h.last_code.to_le_bytes());
    buf.extend_from_slice(&h.last_ping_ms.to_le_bytes());
    buf.extend_from_slice(&h.last_reply_ms.to_le_bytes());
}

/// Appends a snapshot entry's registrar part (version 3): 0, or 1 and the
/// absolute expiry of a contact of the registrar feed.
pub(super) fn put_registrar(buf: &mut Vec<u8>, c: &ContactRecord) {
    match c.registrar_expires {
        Some(e) => {
            buf.push(1);
            buf.extend_from_slice(&e.to_le_bytes());
        }
        None => buf.push(0),
    }
}

/// The kind byte and encoded payload size of an op.
pub(super) fn op_kind_len(op: &Op) -> (u8, usize) {
    match op {
        Op::Add(c) if c.has_ext() => (KIND_ADD_EXT, contact_len(c) + contact_ext_len(c)),
        Op::Add(c) => (KIND_ADD, contact_len(c)),
        Op::Del { key } => (KIND_DEL, 4 + key.len()),
        Op::Flush { owner } => (KIND_FLUSH, 4 + owner.as_ref().map_or(0, |s| s.len())),
    }
}

/// Appends an op's payload (its kind goes in the record header).
pub(super) fn put_op(buf: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Add(c) => {
            debug_assert!(
                c.registrar_expires.is_none(),
                "contacts of the registrar feed are never journalled"
            );
            put_contact(buf, c);
            if c.has_ext() {
                put_contact_ext(buf, c);
            }
        }
        Op::Del { key } => put_str(buf, key),
        Op::Flush { owner } => put_opt_str(buf, owner.as_deref()),
    }
}

/// A bounds-checked reader over one record's or entry's bytes.
pub(super) struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Cursor<'a> {
        Cursor { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or("a field runs past the end of its record")?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self, len: u32) -> Result<String, &'static str> {
        let bytes = self.take(len as usize)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| "a text field is not valid UTF-8")
    }

    fn str(&mut self) -> Result<String, &'static str> {
        let len = self.u32()?;
        if len == NONE_LEN {
            return Err("a required text field is marked absent");
        }
        self.string(len)
    }

    fn opt_str(&mut self) -> Result<Option<String>, &'static str> {
        match self.u32()? {
            NONE_LEN => Ok(None),
            len => self.string(len).map(Some),
        }
    }

    fn opt_u32(&mut self) -> Result<Option<u32>, &'static str> {
        let flag = self.u8()?;
        let v = self.u32()?;
        match flag {
            0 if v == 0 => Ok(None),
            1 => Ok(Some(v)),
            _ => Err("a number field has a bad presence byte"),
        }
    }

    pub(super) fn contact(&mut self) -> Result<ContactRecord, &'static str> {
        let c = ContactRecord {
            uri: self.str()?,
            aor: self.opt_str()?,
            received: self.opt_str()?,
            path: self.opt_str()?,
            interval_ms: self.opt_u32()?,
            owner: self.opt_str()?,
            ..ContactRecord::default()
        };
        // The key joins AoR and URI with a newline, so neither may hold
        // one; kaping never writes one (found by fuzzing: a record that
        // did broke the key's invariant).
        if c.uri.contains('\n') || c.aor.as_deref().is_some_and(|a| a.contains('\n')) {
            return Err("a contact's URI or AoR contains a newline");
        }
        Ok(c)
    }

    /// The ext fields, into a contact read by [`Cursor::contact`].
    pub(super) fn contact_ext(&mut self, c: &mut ContactRecord) -> Result<(), &'static str> {
        c.socket = self.opt_str()?;
        c.source = self.opt_str()?;
        c.keepalive = self.opt_str()?;
        Ok(())
    }

    pub(super) fn history(&mut self) -> Result<Option<History>, &'static str> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(History {
                state: self.u8()?,
                misses: self.u16()?,
                sent: self.u32()?,
                answered: self.u32()?,
                rtt_last_us: self.u32()?,
                rtt_min_us: self.u32()?,
                rtt_max_us: self.u32()?,
                srtt_us: self.u32()?,
                rttvar_us: self.u32()?,
                last_code: self.u16()?,
                last_ping_ms: self.u64()?,
                last_reply_ms: self.u64()?,
            })),
            _ => Err("the history presence byte is neither 0 nor 1"),
        }
    }

    /// A snapshot entry's registrar part ([`put_registrar`]).
    pub(super) fn registrar(&mut self, c: &mut ContactRecord) -> Result<(), &'static str> {
        c.registrar_expires = match self.u8()? {
            0 => None,
            1 => Some(self.u32()?),
            _ => return Err("the registrar presence byte is neither 0 nor 1"),
        };
        Ok(())
    }

    pub(super) fn op(&mut self, kind: u8) -> Result<Op, &'static str> {
        match kind {
            KIND_ADD => self.contact().map(Op::Add),
            KIND_ADD_EXT => {
                let mut c = self.contact()?;
                self.contact_ext(&mut c)?;
                Ok(Op::Add(c))
            }
            KIND_DEL => Ok(Op::Del { key: self.str()? }),
            KIND_FLUSH => Ok(Op::Flush {
                owner: self.opt_str()?,
            }),
            _ => Err("unknown op kind (written by a newer kaping?)"),
        }
    }

    /// Fails unless every byte was consumed: a well-formed record has no
    /// slack, so leftover bytes mean the length or a field is wrong.
    pub(super) fn finish(&self) -> Result<(), &'static str> {
        if self.pos == self.bytes.len() {
            Ok(())
        } else {
            Err("the record has bytes after its last field")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_len_matches_encoding() {
        let mut buf = Vec::new();
        put_history(&mut buf, Some(&History::default()));
        assert_eq!(buf.len(), 1 + HISTORY_LEN);
    }

    #[test]
    fn contact_len_matches_encoding() {
        let c = ContactRecord {
            uri: "sip:alice@192.0.2.1:5060".into(),
            aor: Some("sip:alice@example.com".into()),
            received: None,
            path: Some("<sip:edge.example.com;lr>".into()),
            interval_ms: Some(30_000),
            owner: None,
            ..ContactRecord::default()
        };
        let mut buf = Vec::new();
        put_contact(&mut buf, &c);
        assert_eq!(buf.len(), contact_len(&c));
        let mut cur = Cursor::new(&buf);
        assert_eq!(cur.contact().unwrap(), c);
        cur.finish().unwrap();
    }

    #[test]
    fn an_add_with_ext_fields_is_kind_4_and_one_without_stays_kind_1() {
        let plain = ContactRecord {
            uri: "sip:alice@192.0.2.1:5060".into(),
            ..ContactRecord::default()
        };
        let ext = ContactRecord {
            socket: Some("udp:203.0.113.10:5060".into()),
            keepalive: Some("null".into()),
            ..plain.clone()
        };
        for (c, kind) in [(plain, KIND_ADD), (ext, KIND_ADD_EXT)] {
            let op = Op::Add(c);
            let (k, len) = op_kind_len(&op);
            assert_eq!(k, kind);
            let mut buf = Vec::new();
            put_op(&mut buf, &op);
            assert_eq!(buf.len(), len);
            let mut cur = Cursor::new(&buf);
            assert_eq!(cur.op(k).unwrap(), op);
            cur.finish().unwrap();
        }
    }

    #[test]
    fn decoding_truncated_bytes_fails_without_panicking() {
        let c = ContactRecord {
            uri: "sip:bob@198.51.100.7".into(),
            owner: Some("registrar-1".into()),
            ..Default::default()
        };
        let mut buf = Vec::new();
        put_contact(&mut buf, &c);
        put_history(&mut buf, Some(&History::default()));
        for cut in 0..buf.len() {
            let mut cur = Cursor::new(&buf[..cut]);
            let r = cur.contact().and_then(|_| cur.history());
            assert!(r.is_err(), "cut at {cut} decoded");
        }
    }
}
