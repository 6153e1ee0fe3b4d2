//! Journal segments: creating one (temp, fsync, rename, fsync dir), encoding
//! a batch of records into the store's reusable buffer, and scanning a
//! segment on restore with the torn-tail rules. The byte layouts are in the
//! parent module's documentation.
//!
//! Encoding ([`encode_record`]) runs on every commit: it appends to the one
//! buffer the store owns and allocates nothing else. Scanning runs once, at
//! open, and reports every problem with the file, byte offset and record
//! number; it never modifies the file (the caller truncates a torn tail).

use super::codec::{self, Cursor};
use super::dir::{self, io_err};
use super::{Op, StateError};
use crate::access::{Group, STATE_FILE_MODE};
use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub(super) const SEGMENT_MAGIC: [u8; 8] = *b"KAPJRNL\0";
pub(super) const SEGMENT_VERSION: u32 = 1;
/// Segment header: magic, version, zero, first sequence number, checksum.
pub(super) const SEGMENT_HEADER_LEN: u64 = 32;
/// Record header: payload length, kind, three zero bytes, sequence number,
/// header checksum.
pub(super) const RECORD_HEADER_LEN: usize = 24;
/// The checksum after each record's payload.
pub(super) const RECORD_TRAILER_LEN: usize = 8;
/// Largest payload accepted, both when writing and when reading. The control
/// socket bounds a request at 16 MiB, so no single op can legitimately be
/// larger; a bigger length in a header whose checksum passed means a bug.
pub(super) const RECORD_PAYLOAD_MAX: usize = 16 << 20;

const SCAN_BUFFER: usize = 1 << 20;

/// Creates segment `first_seq` atomically: its header is written and synced
/// under a temp name (mode 0640, of `group`), then renamed into place and the
/// directory synced, so a segment file that exists always has a complete
/// header. Returns the open file (read + write) and its path.
pub(super) fn create_segment(
    dir: &Path,
    first_seq: u64,
    group: Option<&Group>,
) -> Result<(File, PathBuf), StateError> {
    let path = dir.join(dir::journal_name(first_seq));
    let temp = dir.join(format!(
        "{}{}",
        dir::journal_name(first_seq),
        dir::TEMP_SUFFIX
    ));
    let header = segment_header(first_seq);
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(STATE_FILE_MODE)
        .open(&temp)
        .map_err(|e| io_err(&temp, "create journal segment", e))?;
    dir::new_file(&file, &temp, group)?;
    file.write_all(&header)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err(&temp, "write journal segment header", e))?;
    fs::rename(&temp, &path)
        .map_err(|e| io_err(&path, "rename the new journal segment into place", e))?;
    dir::sync_dir(dir)?;
    Ok((file, path))
}

/// The header of segment `first_seq`: magic, version, zero, first
/// sequence number, checksum.
pub(super) fn segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    header[0..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&first_seq.to_le_bytes());
    let check = codec::checksum(&header[..24]);
    header[24..32].copy_from_slice(&check.to_le_bytes());
    header
}

/// Appends one record (header, payload, checksum) for `op` with sequence
/// number `seq`. Allocates nothing beyond growing `buf`.
pub(super) fn encode_record(buf: &mut Vec<u8>, seq: u64, op: &Op) -> Result<(), StateError> {
    let (kind, payload_len) = codec::op_kind_len(op);
    if payload_len > RECORD_PAYLOAD_MAX {
        return Err(StateError::RecordTooLarge {
            bytes: payload_len,
            max: RECORD_PAYLOAD_MAX,
        });
    }
    let start = buf.len();
    buf.reserve(RECORD_HEADER_LEN + payload_len + RECORD_TRAILER_LEN);
    put_record_header(buf, payload_len, kind, seq);
    codec::put_op(buf, op);
    debug_assert_eq!(
        buf.len() - start,
        RECORD_HEADER_LEN + payload_len,
        "payload length disagrees with op_kind_len"
    );
    seal_record(buf, start);
    Ok(())
}

/// A record's header: payload length, kind, three zero bytes, sequence
/// number and the checksum of those.
pub(super) fn put_record_header(buf: &mut Vec<u8>, payload_len: usize, kind: u8, seq: u64) {
    let start = buf.len();
    buf.extend_from_slice(&(payload_len as u32).to_le_bytes());
    buf.extend_from_slice(&[kind, 0, 0, 0]);
    buf.extend_from_slice(&seq.to_le_bytes());
    let header_check = codec::checksum(&buf[start..start + 16]);
    buf.extend_from_slice(&header_check.to_le_bytes());
}

/// Appends the checksum of the record that starts at `start`.
pub(super) fn seal_record(buf: &mut Vec<u8>, start: usize) {
    let check = codec::checksum(&buf[start..]);
    buf.extend_from_slice(&check.to_le_bytes());
}

/// A record at the end of the newest segment that was never completely
/// written (so never acknowledged): the caller truncates the file to
/// `offset`.
#[derive(Debug)]
pub(super) struct Torn {
    pub offset: u64,
    /// 1-based index of the torn record in its segment.
    pub record: u64,
    pub why: &'static str,
}

/// What a scan found.
#[derive(Debug)]
pub(super) struct Scan {
    /// Sequence number the next record after this segment must carry.
    pub next_seq: u64,
    /// Byte offset just past the last good record.
    pub end: u64,
    pub torn: Option<Torn>,
}

/// What an operator can do about a damaged journal.
fn corrupt_action(path: &Path, offset: u64) -> String {
    format!(
        "Every record from here on is unreadable, so kaping refuses to start rather than \
         lose acknowledged changes silently. Keep a copy of the state directory; to start \
         with the records before this point only, run `truncate -s {offset} {}` and move \
         any newer journal-*.log segments out of the directory (the changes they held are lost)",
        path.display()
    )
}

fn corrupt(path: &Path, offset: u64, record: u64, what: impl Into<String>) -> StateError {
    StateError::CorruptJournal {
        file: path.to_path_buf(),
        offset,
        record,
        what: what.into(),
        action: corrupt_action(path, offset),
    }
}

/// True when every byte of `file` from `offset` on is zero: a file extended
/// by a write whose data never reached the disk (a power loss after the size
/// update, before the data). Such a tail was never synced, so never
/// acknowledged.
fn zero_from(file: &File, mut offset: u64, len: u64) -> Result<bool, std::io::Error> {
    let mut chunk = vec![0u8; 64 << 10];
    while offset < len {
        let n = ((len - offset) as usize).min(chunk.len());
        file.read_exact_at(&mut chunk[..n], offset)?;
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        offset += n as u64;
    }
    Ok(true)
}

/// Reads segment `path` (named for `name_seq`), calling `apply(seq, op)` for
/// every good record in order.
///
/// `is_last` says whether this is the newest segment: only there can a bad
/// tail be a torn write. The rules (each record is checked in this order):
///
/// 1. fewer bytes than a record header remain → torn;
/// 2. the header checksum fails → torn if every remaining byte is zero or
///    the stored length still ends the record exactly at end of file (as in
///    rule 4), else corruption (a bad header's length cannot be trusted to
///    find the next record);
/// 3. the record runs past end of file → torn;
/// 4. the record checksum fails → torn if the record ends exactly at end of
///    file or every remaining byte is zero, else corruption;
/// 5. a wrong sequence number, nonzero reserved bytes or an undecodable
///    payload under a good checksum → corruption (a bug, or a newer format).
///
/// In a segment that is not the newest, every torn case is corruption.
pub(super) fn scan(
    path: &Path,
    name_seq: u64,
    is_last: bool,
    mut apply: impl FnMut(u64, Op),
) -> Result<Scan, StateError> {
    let file = File::open(path).map_err(|e| io_err(path, "open journal segment", e))?;
    let file_len = file
        .metadata()
        .map_err(|e| io_err(path, "stat journal segment", e))?
        .len();
    let mut reader = BufReader::with_capacity(SCAN_BUFFER, &file);
    let read_err = |e| io_err(path, "read journal segment", e);

    // The header: created atomically (see create_segment), so a short or
    // bad header is never a torn write.
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    if file_len < SEGMENT_HEADER_LEN {
        return Err(corrupt(
            path,
            0,
            0,
            format!("the segment header is truncated ({file_len} of 32 bytes)"),
        ));
    }
    reader.read_exact(&mut header).map_err(read_err)?;
    if header[0..8] != SEGMENT_MAGIC {
        return Err(corrupt(
            path,
            0,
            0,
            "bad magic: not a kaping journal segment",
        ));
    }
    if u64::from_le_bytes(header[24..32].try_into().unwrap()) != codec::checksum(&header[..24]) {
        return Err(corrupt(path, 24, 0, "segment header checksum mismatch"));
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
    if version != SEGMENT_VERSION {
        return Err(corrupt(
            path,
            8,
            0,
            format!("format version {version}, this kaping reads version {SEGMENT_VERSION}"),
        ));
    }
    let first_seq = u64::from_le_bytes(header[16..24].try_into().unwrap());
    if first_seq != name_seq {
        return Err(corrupt(
            path,
            16,
            0,
            format!(
                "the header says the first record is {first_seq}, the file name says {name_seq}"
            ),
        ));
    }

    let mut offset = SEGMENT_HEADER_LEN;
    let mut seq = first_seq;
    let mut record = 1u64;
    let mut body = Vec::new();
    let torn = |offset, record, why| Torn {
        offset,
        record,
        why,
    };
    let zero_tail = |offset| zero_from(&file, offset, file_len).map_err(read_err);
    let not_last = "this is not the newest segment, so its end cannot be a torn write";
    let found_torn = loop {
        let remaining = file_len - offset;
        if remaining == 0 {
            break None;
        }
        if remaining < RECORD_HEADER_LEN as u64 {
            if is_last {
                break Some(torn(offset, record, "an incomplete record header"));
            }
            return Err(corrupt(
                path,
                offset,
                record,
                format!("an incomplete record header; {not_last}"),
            ));
        }
        let mut rh = [0u8; RECORD_HEADER_LEN];
        reader.read_exact(&mut rh).map_err(read_err)?;
        let header_check = u64::from_le_bytes(rh[16..24].try_into().unwrap());
        if header_check != codec::checksum(&rh[..16]) {
            if is_last && zero_tail(offset)? {
                break Some(torn(offset, record, "zero bytes where a record should be"));
            }
            // A damaged header whose length still spans exactly to end of
            // file is the final record's checksum failing (rule 4). A
            // damaged length points elsewhere, and is corruption.
            let claimed = u32::from_le_bytes(rh[0..4].try_into().unwrap()) as u64;
            if is_last && (RECORD_HEADER_LEN + RECORD_TRAILER_LEN) as u64 + claimed == remaining {
                break Some(torn(
                    offset,
                    record,
                    "the last record's header checksum fails",
                ));
            }
            return Err(corrupt(
                path,
                offset,
                record,
                "record header checksum mismatch",
            ));
        }
        let payload_len = u32::from_le_bytes(rh[0..4].try_into().unwrap()) as usize;
        if payload_len > RECORD_PAYLOAD_MAX {
            return Err(corrupt(
                path,
                offset,
                record,
                format!("payload length {payload_len} exceeds the maximum {RECORD_PAYLOAD_MAX}"),
            ));
        }
        let total = (RECORD_HEADER_LEN + payload_len + RECORD_TRAILER_LEN) as u64;
        if total > remaining {
            if is_last {
                break Some(torn(offset, record, "a record that runs past end of file"));
            }
            return Err(corrupt(
                path,
                offset,
                record,
                format!("a record that runs past end of file; {not_last}"),
            ));
        }
        body.clear();
        body.extend_from_slice(&rh);
        body.resize(total as usize, 0);
        reader
            .read_exact(&mut body[RECORD_HEADER_LEN..])
            .map_err(read_err)?;
        let (covered, stored) = body.split_at(total as usize - RECORD_TRAILER_LEN);
        if u64::from_le_bytes(stored.try_into().unwrap()) != codec::checksum(covered) {
            if is_last && (total == remaining || zero_tail(offset)?) {
                break Some(torn(offset, record, "the last record's checksum fails"));
            }
            return Err(corrupt(path, offset, record, "record checksum mismatch"));
        }
        if rh[5..8] != [0, 0, 0] {
            return Err(corrupt(
                path,
                offset,
                record,
                "nonzero reserved header bytes",
            ));
        }
        let record_seq = u64::from_le_bytes(rh[8..16].try_into().unwrap());
        if record_seq != seq {
            return Err(corrupt(
                path,
                offset,
                record,
                format!("sequence number {record_seq}, expected {seq}"),
            ));
        }
        let mut cur = Cursor::new(&covered[RECORD_HEADER_LEN..]);
        let op = cur
            .op(rh[4])
            .and_then(|op| cur.finish().map(|()| op))
            .map_err(|what| corrupt(path, offset, record, format!("sequence {seq}: {what}")))?;
        apply(seq, op);
        offset += total;
        seq += 1;
        record += 1;
    };
    Ok(Scan {
        next_seq: seq,
        end: found_torn.as_ref().map_or(offset, |t| t.offset),
        torn: found_torn,
    })
}
