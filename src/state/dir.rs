//! The state directory itself: who may read it (mode and group), its
//! exclusive lock, its file names, listing them, and the directory fsync
//! that makes creations, renames and deletions durable (a file's own fsync
//! does not cover its directory entry).
//!
//! Called by [`super::Store::open`] (access, lock, listing, clean-up) and by
//! the journal and snapshot writers (names, `sync_dir`, [`new_file`]). Never
//! called on a per-commit path.
//!
//! # Who may read it
//!
//! The directory is 0750 and every file kaping creates in it 0640
//! ([`crate::access`]), whatever the umask, and of `state_group` when one is
//! set. At open, an existing directory more open than that (group write, or
//! any access for other users) is tightened to 0750 with a restore warning;
//! when kaping may not change it (it belongs to another user) the start is
//! refused, naming the directory, its mode, its owner and the command that
//! fixes it ([`StateError::DirTooOpen`]): the operator asked for durable
//! state, and silently keeping subscribers' identities world-readable is not
//! a choice kaping makes for them. State files found with another mode or
//! group (left by an older kaping, which made them 0644) are set to 0640 and
//! the group the same way.

use super::StateError;
use crate::access::{self, Group, STATE_DIR_MODE, STATE_FILE_MODE};
use std::fs::{self, DirBuilder, File, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
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

/// Permission bits no state directory may have: group write, and every
/// bit of other users.
const DIR_TOO_OPEN: u32 = 0o027;
/// What `state_group` needs on the directory: list and enter.
const DIR_GROUP_READ: u32 = 0o050;

/// Creates the state directory 0750 (with its missing parents, 0750 too),
/// or tightens an existing one (see the module doc); in both cases gives it
/// to `group`. Adds a line to `warnings` for each change to an existing one.
pub(super) fn prepare(
    dir: &Path,
    group: Option<&Group>,
    warnings: &mut Vec<String>,
) -> Result<(), StateError> {
    let not_dir = || {
        io_err(
            dir,
            "use it as the state directory",
            io::Error::from(io::ErrorKind::NotADirectory),
        )
    };
    let created = match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => false,
        Ok(_) => return Err(not_dir()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(STATE_DIR_MODE)
                .create(dir)
                .map_err(|e| io_err(dir, "create the state directory", e))?;
            true
        }
        Err(e) => return Err(io_err(dir, "stat the state directory", e)),
    };
    // From here on through one descriptor: a directory swapped in at the
    // path meanwhile is either this one or refused, never half-handled.
    let handle = File::open(dir).map_err(|e| io_err(dir, "open the state directory", e))?;
    let meta = handle
        .metadata()
        .map_err(|e| io_err(dir, "stat the state directory", e))?;
    if !meta.is_dir() {
        return Err(not_dir());
    }
    if created {
        access::set_group_and_mode(&handle, "state directory", dir, STATE_DIR_MODE, group)?;
        return Ok(());
    }
    let mode = meta.mode() & 0o7777;
    let group_read = if group.is_some() { DIR_GROUP_READ } else { 0 };
    // Set-id and sticky bits are the operator's (a setgid directory is a
    // common way to share one): kept.
    let wanted = (mode & !DIR_TOO_OPEN) | group_read;
    let regroup = group.filter(|g| g.gid != meta.gid());
    if wanted == mode && regroup.is_none() {
        return Ok(());
    }
    if let Err(e) = access::set_group_and_mode(&handle, "state directory", dir, wanted, regroup) {
        return Err(match e {
            access::AccessError::Chmod { source, .. } if mode & DIR_TOO_OPEN != 0 => {
                StateError::DirTooOpen {
                    dir: dir.to_path_buf(),
                    mode,
                    wanted,
                    owner: access::describe_user(meta.uid()),
                    user: access::current_user(),
                    source,
                }
            }
            e => e.into(),
        });
    }
    if wanted != mode {
        let mut why = Vec::new();
        if mode & 0o007 != 0 {
            why.push("open to every local user".to_owned());
        }
        if mode & 0o020 != 0 {
            why.push("writable by its group".to_owned());
        }
        if let Some(g) = group.filter(|_| mode & DIR_GROUP_READ != DIR_GROUP_READ) {
            why.push(format!("not readable by the {}, {g}", g.setting));
        }
        warnings.push(format!(
            "{}: the state directory was mode {mode:04o} ({}); set it to {wanted:04o}: it holds \
             every contact URI",
            dir.display(),
            why.join(", ")
        ));
    }
    Ok(())
}

/// Gives a state file kaping just created its mode and group: called on
/// every file created in the directory, before anything is written to it.
pub(super) fn new_file(file: &File, path: &Path, group: Option<&Group>) -> Result<(), StateError> {
    access::set_group_and_mode(file, "state file", path, STATE_FILE_MODE, group)?;
    Ok(())
}

/// Sets every journal segment and snapshot of `listing` to mode 0640 and
/// `group`, where they differ; one warning names those that were more open.
pub(super) fn restrict_files(
    dir: &Path,
    listing: &Listing,
    group: Option<&Group>,
    warnings: &mut Vec<String>,
) -> Result<(), StateError> {
    let mut were_open = Vec::new();
    let files = listing.segments.iter().chain(&listing.snapshots);
    for (_, path) in files {
        let file = File::open(path).map_err(|e| io_err(path, "open state file", e))?;
        let meta = file
            .metadata()
            .map_err(|e| io_err(path, "stat state file", e))?;
        let mode = meta.mode() & 0o7777;
        let regroup = group.filter(|g| g.gid != meta.gid());
        if mode == STATE_FILE_MODE && regroup.is_none() {
            continue;
        }
        access::set_group_and_mode(&file, "state file", path, STATE_FILE_MODE, regroup)?;
        if mode & !STATE_FILE_MODE != 0 {
            let name = path.file_name().unwrap_or(path.as_os_str());
            were_open.push(format!("{} {mode:04o}", name.to_string_lossy()));
        }
    }
    if !were_open.is_empty() {
        const NAMED_MAX: usize = 3;
        let more = were_open.len().saturating_sub(NAMED_MAX);
        warnings.push(format!(
            "{}: set {} state file(s) readable or writable beyond owner and group to mode \
             0640 ({}{})",
            dir.display(),
            were_open.len(),
            were_open[..were_open.len().min(NAMED_MAX)].join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    Ok(())
}

/// Takes the directory's exclusive lock (non-blocking).
///
/// `File::try_lock` is `flock(LOCK_EX | LOCK_NB)` without `unsafe`; it is
/// stable since Rust 1.89, so the crate's `rust-version` must be at least
/// 1.89 (Cargo.toml still says 1.82: the lead owns that line).
#[allow(clippy::incompatible_msrv)]
pub(super) fn lock(dir: &Path, group: Option<&Group>) -> Result<File, StateError> {
    let path = dir.join(LOCK_FILE);
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(STATE_FILE_MODE)
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
    // Only once it is ours: the lock file of a running daemon is left alone.
    new_file(&file, &path, group)?;
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
