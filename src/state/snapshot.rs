//! Snapshot files: writing one from the caller's contact list and reading
//! one back on restore. The byte layout is in the parent module's
//! documentation.
//!
//! Writing runs on the daemon's background thread (it owns nothing the
//! commit path uses): it streams entries through one reusable entry buffer
//! and a 1 MiB `BufWriter`, then syncs and renames. Reading validates every
//! entry checksum, the count and the trailer chain; any failure is a
//! [`StateError::BadSnapshot`] naming the file, byte offset and entry, never
//! a silent fallback to older state.

use super::codec::{self, Cursor};
use super::dir::{self, io_err};
use super::{ContactRecord, History, StateError};
use crate::access::{Group, STATE_FILE_MODE};
use std::fs::{self, File};
use std::hash::Hasher;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub(super) const SNAPSHOT_MAGIC: [u8; 8] = *b"KAPSNAP\0";
pub(super) const TRAILER_MAGIC: [u8; 8] = *b"KAPSEND\0";
/// 1: contacts and histories; 2: + socket, source, keepalive; 3: + the
/// registrar part (contacts of the registrar feed and their expiry).
pub(super) const SNAPSHOT_VERSION: u32 = 3;
pub(super) const HEADER_LEN: usize = 64;
pub(super) const TRAILER_LEN: usize = 24;
/// Largest entry body accepted when reading: a contact is bounded by the
/// journal's record limit plus its history.
const ENTRY_MAX: usize = super::journal::RECORD_PAYLOAD_MAX + 1 + codec::HISTORY_LEN + 5;
const IO_BUFFER: usize = 1 << 20;

/// Where [`write`] stops early: test-only crash simulation. `Never` in
/// production.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stop {
    Never,
    /// Half the entries written to the temp file, nothing synced.
    #[cfg_attr(not(test), allow(dead_code))]
    TempPartial,
    /// Temp file complete and synced, not renamed.
    #[cfg_attr(not(test), allow(dead_code))]
    TempSynced,
    /// Renamed into place, directory not synced.
    #[cfg_attr(not(test), allow(dead_code))]
    Renamed,
}

/// The snapshot [`write`] made durable.
pub(super) struct Written {
    pub path: PathBuf,
    pub bytes: u64,
}

fn bad(path: &Path, offset: u64, entry: u64, what: impl Into<String>) -> StateError {
    StateError::BadSnapshot {
        file: path.to_path_buf(),
        offset,
        entry,
        what: what.into(),
    }
}

/// A snapshot's framing as it is written: the header, each entry's length
/// and checksum, and the trailer whose checksum chains the header, every
/// entry's checksum and the trailer's own first half.
pub(super) struct Framing {
    chain: siphasher::sip::SipHasher13,
}

impl Framing {
    /// The header of a snapshot of `count` entries covering `covered_seq`.
    pub(super) fn start(covered_seq: u64, count: u64, version: u32) -> ([u8; HEADER_LEN], Framing) {
        let created_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut header = [0u8; HEADER_LEN];
        header[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
        header[8..12].copy_from_slice(&version.to_le_bytes());
        header[16..24].copy_from_slice(&covered_seq.to_le_bytes());
        header[24..32].copy_from_slice(&count.to_le_bytes());
        header[32..40].copy_from_slice(&created_ms.to_le_bytes());
        let check = codec::checksum(&header[..56]);
        header[56..64].copy_from_slice(&check.to_le_bytes());
        let mut chain = codec::checksum_stream();
        chain.write(&header);
        (header, Framing { chain })
    }

    /// `entry` is 4 placeholder bytes and the entry's body: writes the
    /// body's length into them and appends the checksum.
    pub(super) fn seal(&mut self, entry: &mut Vec<u8>) {
        let body_len = (entry.len() - 4) as u32;
        entry[0..4].copy_from_slice(&body_len.to_le_bytes());
        let check = codec::checksum(entry);
        entry.extend_from_slice(&check.to_le_bytes());
        self.chain.write(&check.to_le_bytes());
    }

    pub(super) fn finish(mut self, count: u64) -> [u8; TRAILER_LEN] {
        let mut trailer = [0u8; TRAILER_LEN];
        trailer[0..8].copy_from_slice(&TRAILER_MAGIC);
        trailer[8..16].copy_from_slice(&count.to_le_bytes());
        self.chain.write(&trailer[..16]);
        trailer[16..24].copy_from_slice(&self.chain.finish().to_le_bytes());
        trailer
    }
}

/// Writes snapshot `covered_seq`: temp file (mode 0640, of `group`), fsync,
/// rename, fsync dir. On error the temp file is removed (best effort: open
/// removes any left).
pub(super) fn write(
    dir: &Path,
    covered_seq: u64,
    contacts: &[(ContactRecord, Option<History>)],
    group: Option<&Group>,
    stop: Stop,
) -> Result<Option<Written>, StateError> {
    let temp = dir.join(format!(
        "{}{}",
        dir::snapshot_name(covered_seq),
        dir::TEMP_SUFFIX
    ));
    let written = write_temp_and_rename(dir, &temp, covered_seq, contacts, group, stop);
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

fn write_temp_and_rename(
    dir: &Path,
    temp: &Path,
    covered_seq: u64,
    contacts: &[(ContactRecord, Option<History>)],
    group: Option<&Group>,
    stop: Stop,
) -> Result<Option<Written>, StateError> {
    let path = dir.join(dir::snapshot_name(covered_seq));
    let file = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(STATE_FILE_MODE)
        .open(temp)
        .map_err(|e| io_err(temp, "create snapshot temp file", e))?;
    dir::new_file(&file, temp, group)?;
    let mut out = BufWriter::with_capacity(IO_BUFFER, file);
    let werr = |e| io_err(temp, "write snapshot temp file", e);

    let count = contacts.len() as u64;
    let (header, mut framing) = Framing::start(covered_seq, count, SNAPSHOT_VERSION);
    out.write_all(&header).map_err(werr)?;
    let mut bytes = HEADER_LEN as u64;

    let mut entry = Vec::with_capacity(512);
    for (i, (contact, history)) in contacts.iter().enumerate() {
        if stop == Stop::TempPartial && i == contacts.len() / 2 {
            return Ok(None);
        }
        entry.clear();
        entry.extend_from_slice(&[0; 4]);
        codec::put_contact(&mut entry, contact);
        codec::put_contact_ext(&mut entry, contact);
        codec::put_history(&mut entry, history.as_ref());
        codec::put_registrar(&mut entry, contact);
        let body_len = entry.len() - 4;
        if body_len > ENTRY_MAX {
            // Cannot come from a contact that went through the journal.
            return Err(StateError::RecordTooLarge {
                bytes: body_len,
                max: ENTRY_MAX,
            });
        }
        framing.seal(&mut entry);
        out.write_all(&entry).map_err(werr)?;
        bytes += entry.len() as u64;
    }

    let trailer = framing.finish(count);
    out.write_all(&trailer).map_err(werr)?;
    bytes += TRAILER_LEN as u64;

    let file = out.into_inner().map_err(|e| werr(e.into_error()))?;
    file.sync_all()
        .map_err(|e| io_err(temp, "fsync snapshot temp file", e))?;
    drop(file);
    if stop == Stop::TempSynced {
        return Ok(None);
    }
    fs::rename(temp, &path).map_err(|e| io_err(&path, "rename the snapshot into place", e))?;
    if stop == Stop::Renamed {
        return Ok(None);
    }
    dir::sync_dir(dir)?;
    Ok(Some(Written { path, bytes }))
}

/// Reads snapshot `path` (named for `name_seq`), calling `push` for every
/// entry in file order. Returns the number of entries.
pub(super) fn read(
    path: &Path,
    name_seq: u64,
    mut push: impl FnMut(ContactRecord, Option<History>),
) -> Result<u64, StateError> {
    let file = File::open(path).map_err(|e| io_err(path, "open snapshot", e))?;
    let file_len = file
        .metadata()
        .map_err(|e| io_err(path, "stat snapshot", e))?
        .len();
    let mut reader = BufReader::with_capacity(IO_BUFFER, file);
    let rerr = |e| io_err(path, "read snapshot", e);

    if file_len < (HEADER_LEN + TRAILER_LEN) as u64 {
        return Err(bad(
            path,
            0,
            0,
            format!("the file is {file_len} bytes, shorter than an empty snapshot"),
        ));
    }
    let mut header = [0u8; HEADER_LEN];
    reader.read_exact(&mut header).map_err(rerr)?;
    if header[0..8] != SNAPSHOT_MAGIC {
        return Err(bad(path, 0, 0, "bad magic: not a kaping snapshot"));
    }
    if u64::from_le_bytes(header[56..64].try_into().unwrap()) != codec::checksum(&header[..56]) {
        return Err(bad(path, 56, 0, "header checksum mismatch"));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
    // Version 1 entries have no `contact ext`; both are read.
    if !(1..=SNAPSHOT_VERSION).contains(&version) {
        return Err(bad(
            path,
            8,
            0,
            format!("format version {version}, this kaping reads versions 1 to {SNAPSHOT_VERSION}"),
        ));
    }
    let with_ext = version >= 2;
    let with_registrar = version >= 3;
    let covered_seq = u64::from_le_bytes(header[16..24].try_into().unwrap());
    if covered_seq != name_seq {
        return Err(bad(
            path,
            16,
            0,
            format!("the header covers sequence {covered_seq}, the file name says {name_seq}"),
        ));
    }
    let count = u64::from_le_bytes(header[24..32].try_into().unwrap());
    let mut chain = codec::checksum_stream();
    chain.write(&header);

    let entries_end = file_len - TRAILER_LEN as u64;
    let mut offset = HEADER_LEN as u64;
    let mut entry = Vec::with_capacity(512);
    for n in 1..=count {
        if entries_end - offset < 4 + 8 {
            return Err(bad(
                path,
                offset,
                n,
                format!("the file ends before entry {n} of {count} (truncated?)"),
            ));
        }
        let mut len = [0u8; 4];
        reader.read_exact(&mut len).map_err(rerr)?;
        let body_len = u32::from_le_bytes(len) as usize;
        let total = 4 + body_len as u64 + 8;
        if body_len > ENTRY_MAX || total > entries_end - offset {
            return Err(bad(
                path,
                offset,
                n,
                format!("entry length {body_len} runs past the end of the entries"),
            ));
        }
        entry.clear();
        entry.extend_from_slice(&len);
        entry.resize(total as usize, 0);
        reader.read_exact(&mut entry[4..]).map_err(rerr)?;
        let (covered, stored) = entry.split_at(total as usize - 8);
        let check = codec::checksum(covered);
        if u64::from_le_bytes(stored.try_into().unwrap()) != check {
            return Err(bad(path, offset, n, "entry checksum mismatch"));
        }
        chain.write(&check.to_le_bytes());
        let mut cur = Cursor::new(&covered[4..]);
        let (contact, history) = cur
            .contact()
            .and_then(|mut c| {
                if with_ext {
                    cur.contact_ext(&mut c)?;
                }
                Ok(c)
            })
            .and_then(|c| Ok((c, cur.history()?)))
            .and_then(|(mut c, h)| {
                if with_registrar {
                    cur.registrar(&mut c)?;
                }
                Ok((c, h))
            })
            .and_then(|ch| cur.finish().map(|()| ch))
            .map_err(|what| bad(path, offset, n, what))?;
        push(contact, history);
        offset += total;
    }
    if offset != entries_end {
        return Err(bad(
            path,
            offset,
            count,
            format!(
                "{} unexpected bytes after the {count} entries the header announces",
                entries_end - offset
            ),
        ));
    }
    let mut trailer = [0u8; TRAILER_LEN];
    reader.read_exact(&mut trailer).map_err(rerr)?;
    if trailer[0..8] != TRAILER_MAGIC {
        return Err(bad(path, offset, count, "bad trailer magic"));
    }
    if trailer[8..16] != count.to_le_bytes() {
        return Err(bad(
            path,
            offset + 8,
            count,
            "the trailer's count differs from the header's",
        ));
    }
    chain.write(&trailer[..16]);
    if u64::from_le_bytes(trailer[16..24].try_into().unwrap()) != chain.finish() {
        return Err(bad(path, offset + 16, count, "trailer checksum mismatch"));
    }
    Ok(count)
}
