//! Fuzz entry points for the state readers (driven from `crate::fuzzing`).
//!
//! Each call writes the input as one file of a fresh state directory on
//! tmpfs and opens a [`Store`] on it: the restore path exactly as the
//! daemon runs it (listing, snapshot, journal scan, torn-tail cut). The
//! first byte picks how the rest is laid out:
//! * even: the file's bytes verbatim (framing, checksums, torn tails);
//! * odd: chunks framed with correct headers and checksums, so mutations
//!   reach the record and entry decoders behind the checksums.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{dir, journal, snapshot, Store};

/// A journal segment's bytes, or payloads framed into records.
pub fn journal(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut out = journal::segment_header(1).to_vec();
        for (i, (kind, payload)) in chunks(rest).enumerate() {
            let start = out.len();
            journal::put_record_header(&mut out, payload.len(), kind, 1 + i as u64);
            out.extend_from_slice(payload);
            journal::seal_record(&mut out, start);
        }
        out
    };
    open_with(&dir::journal_name(seq_at_16(&bytes)), &bytes);
}

/// A snapshot's bytes, or entry bodies framed into a snapshot of the
/// version the mode byte names (1 to 3).
pub fn snapshot(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let version = 1 + u32::from(mode >> 1) % snapshot::SNAPSHOT_VERSION;
        let bodies: Vec<&[u8]> = chunks(rest).map(|(_, b)| b).collect();
        let count = bodies.len() as u64;
        let (header, mut framing) = snapshot::Framing::start(0, count, version);
        let mut out = header.to_vec();
        let mut entry = Vec::new();
        for body in bodies {
            entry.clear();
            entry.extend_from_slice(&[0; 4]);
            entry.extend_from_slice(body);
            framing.seal(&mut entry);
            out.extend_from_slice(&entry);
        }
        out.extend_from_slice(&framing.finish(count));
        out
    };
    open_with(&dir::snapshot_name(seq_at_16(&bytes)), &bytes);
}

/// The sequence number both headers hold at bytes 16..24 (a segment's
/// first record, a snapshot's last covered one), so the file is named as
/// its header says and the reader gets past that check.
fn seq_at_16(bytes: &[u8]) -> u64 {
    bytes
        .get(16..24)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()))
}

/// `[kind][len: u16 LE][len bytes]...`; a short last chunk takes what is
/// left.
fn chunks(mut rest: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (&kind, tail) = rest.split_first()?;
        let len = match tail {
            [a, b, ..] => u16::from_le_bytes([*a, *b]) as usize,
            _ => 0,
        };
        let tail = tail.get(2..).unwrap_or_default();
        let (payload, next) = tail.split_at(len.min(tail.len()));
        rest = next;
        Some((kind, payload))
    })
}

/// Writes `bytes` as `name` in a fresh directory, opens a store there and
/// removes the directory.
fn open_with(name: &str, bytes: &[u8]) {
    static N: AtomicU64 = AtomicU64::new(0);
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!(
        "kaping-fuzz-state-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o750)
        .create(&dir)
        .expect("create the fuzz state directory");
    std::fs::write(dir.join(name), bytes).expect("write the fuzz state file");
    // Errors are the reader's answers; a panic is the finding.
    let opened = Store::open(&dir);
    drop(opened);
    let _ = std::fs::remove_dir_all(&dir);
}
