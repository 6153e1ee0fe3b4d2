//! The state directory itself: its exclusive lock, its file names, listing
//! them, and the directory fsync that makes creations, renames and deletions
//! durable (a file's own fsync does not cover its directory entry).
//!
//! Called by [`super::Store::open`] (lock, listing, clean-up) and by the
//! journal and snapshot writers (names, `sync_dir`). Never called on a
//! per-commit path.

use super::StateError;
use std::fs::{self, File, TryLockError};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The lock file: held with an exclusive `flock` for the store's lifetime.
/// It holds "pid N" for the operator; the lock, not the text, is what
/// excludes a second daemon, and the kernel releases it when the process
/// dies however it dies, so there is no stale-lock case to handle.
pub(super) const LOCK_FILE: &str = "lock";

const JOURNAL_PREFIX: &str = "journal-";
const JOURNAL_SUFFIX: &str = ".log";
const SNAPSHOT_PREFIX: &str = "snapshot-";
const SNAPSHOT_SUFFIX: &str = ".snap";
/// Suffix of a file being written: it becomes durable state only by rename.
pub(super) const TEMP_SUFFIX: &str = ".tmp";
/// Sequence numbers in names are zero-padded decimal, so names sort in
/// sequence order.
const SEQ_DIGITS: usize = 20;

pub(super) fn journal_name(first_seq: u64) -> String {
    format!("{JOURNAL_PREFIX}{first_seq:0SEQ_DIGITS$}{JOURNAL_SUFFIX}")
}

pub(super) fn snapshot_name(covered_seq: u64) -> String {
    format!("{SNAPSHOT_PREFIX}{covered_seq:0SEQ_DIGITS$}{SNAPSHOT_SUFFIX}")
}

fn parse_seq(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

pub(super) fn io_err(path: &Path, action: &'static str, source: std::io::Error) -> StateError {
    StateError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Takes the directory's exclusive lock (non-blocking).
///
/// `File::try_lock` is `flock(LOCK_EX | LOCK_NB)` without `unsafe`; it is
/// stable since Rust 1.89, so the crate's `rust-version` must be at least
/// 1.89 (Cargo.toml still says 1.82: the lead owns that line).
#[allow(clippy::incompatible_msrv)]
pub(super) fn lock(dir: &Path) -> Result<File, StateError> {
    let path = dir.join(LOCK_FILE);
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_err(&path, "open the lock file", e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            // Best effort: the text only helps the operator find the holder.
            let _ = file.read_to_string(&mut holder);
            return Err(StateError::Locked {
                dir: dir.to_path_buf(),
                holder: holder.trim().to_owned(),
            });
        }
        Err(TryLockError::Error(e)) => return Err(io_err(&path, "lock", e)),
    }
    // Informational only, so it is not synced.
    let written = file
        .set_len(0)
        .and_then(|()| writeln!(&file, "pid {}", std::process::id()));
    written.map_err(|e| io_err(&path, "write the lock file", e))?;
    Ok(file)
}

/// Makes the directory's entries (creations, renames, deletions) durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, "fsync the directory", e))
}

/// The state files found in a directory, each list sorted by sequence.
#[derive(Debug, Default)]
pub(super) struct Listing {
    /// (first sequence number, path) of each journal segment.
    pub segments: Vec<(u64, PathBuf)>,
    /// (covered sequence number, path) of each snapshot.
    pub snapshots: Vec<(u64, PathBuf)>,
    /// Unfinished snapshot or segment files (never renamed into place).
    pub temps: Vec<PathBuf>,
}

pub(super) fn list(dir: &Path) -> Result<Listing, StateError> {
    let mut listing = Listing::default();
    let entries = fs::read_dir(dir).map_err(|e| io_err(dir, "list", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, "list", e))?;
        let name = entry.file_name();
        // Names that are not UTF-8 are not ours: leave them alone.
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if let Some(seq) = parse_seq(name, JOURNAL_PREFIX, JOURNAL_SUFFIX) {
            listing.segments.push((seq, path));
        } else if let Some(seq) = parse_seq(name, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX) {
            listing.snapshots.push((seq, path));
        } else if let Some(stem) = name.strip_suffix(TEMP_SUFFIX) {
            if parse_seq(stem, JOURNAL_PREFIX, JOURNAL_SUFFIX).is_some()
                || parse_seq(stem, SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX).is_some()
            {
                listing.temps.push(path);
            }
        }
    }
    listing.segments.sort();
    listing.snapshots.sort();
    listing.temps.sort();
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_by_sequence() {
        assert_eq!(journal_name(1), "journal-00000000000000000001.log");
        assert_eq!(
            parse_seq(&journal_name(u64::MAX), JOURNAL_PREFIX, JOURNAL_SUFFIX),
            Some(u64::MAX)
        );
        assert_eq!(
            parse_seq(&snapshot_name(42), SNAPSHOT_PREFIX, SNAPSHOT_SUFFIX),
            Some(42)
        );
        assert!(journal_name(9) < journal_name(10));
        assert_eq!(
            parse_seq("journal-12.log", JOURNAL_PREFIX, JOURNAL_SUFFIX),
            None
        );
        assert_eq!(
            parse_seq(
                "journal-0000000000000000000x.log",
                JOURNAL_PREFIX,
                JOURNAL_SUFFIX
            ),
            None
        );
    }
}
