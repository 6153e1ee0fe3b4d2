//! Who may read kaping's files: the modes it creates them with, the group it
//! gives them to (`shm_group`, `state_group`), and the user and group
//! database look-ups those need.
//!
//! The shared-memory file and the state directory hold every contact URI,
//! that is, subscribers' identities and addresses, so only their owner (the
//! daemon's user) and one group may read them:
//!
//! | what | mode | group |
//! |---|---|---|
//! | shm file | [`SHM_FILE_MODE`] 0640 | `shm_group`, else the daemon's |
//! | state directory | [`STATE_DIR_MODE`] 0750 | `state_group`, else the daemon's |
//! | files in it (journal, snapshots, their temp files, `lock`) | [`STATE_FILE_MODE`] 0640 | `state_group`, else the daemon's |
//!
//! # Callers
//!
//! The config resolves a group setting once ([`Group::resolve`], at start
//! and at each reload); the shm writer and the state store call
//! [`set_group_and_mode`] on each file they create, before it is used;
//! `kaping-stat` names a file's owner and group ([`user_name`],
//! [`group_name`]) when it may not read it. Nothing here runs per ping or
//! per commit (a journal segment is created once per snapshot).
//!
//! # Guarantees
//!
//! * A file gets exactly the mode asked for, whatever the umask: the umask
//!   only removes bits at creation (077 would leave the monitoring group
//!   nothing), so the mode is set again with `fchmod` once the file exists.
//! * The group is changed with `fchown(fd, -1, gid)` (owner unchanged)
//!   before the mode is set: an unprivileged `chown` may clear set-id bits,
//!   so this order leaves the mode exact.
//! * Both act on the open descriptor, never on the path again, so a file
//!   replaced in between is never touched.
//! * A failure to give a file to a group names the setting, the group and,
//!   for `EPERM`, why and what to do.
//!
//! `unsafe` here is only the libc calls into the user and group database
//! (`getgrnam_r`, `getgrgid_r`, `getpwuid_r`) and `geteuid`; each block says
//! what makes it sound.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::fmt;
use std::fs::{File, Permissions};
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The shared-memory file: owner read-write, group read.
pub const SHM_FILE_MODE: u32 = 0o640;
/// The state directory: owner all, group list and enter.
pub const STATE_DIR_MODE: u32 = 0o750;
/// Every file in the state directory.
pub const STATE_FILE_MODE: u32 = 0o640;

/// First size of the buffer the `get*_r` calls fill (names, member lists).
const LOOKUP_BUFFER_START: usize = 1024;
/// A group whose entry needs more than this (a member list of tens of
/// thousands of users) is reported as a lookup error rather than grown for.
const LOOKUP_BUFFER_MAX: usize = 1 << 20;

/// A group a setting names, resolved through the group database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The setting that named it (`shm_group`, `state_group`): every error
    /// about this group names it.
    pub setting: &'static str,
    pub gid: u32,
    /// Its name in the group database; `None` for a numeric gid that has no
    /// entry (containers often use bare gids).
    pub name: Option<String>,
}

impl Group {
    /// Resolves `text`, a group name or a numeric gid, as chown(1) does: a
    /// name first, then, if no group has that name and it is all digits, a
    /// gid. A name the group database does not know is refused with the
    /// reason.
    pub fn resolve(setting: &'static str, text: &str) -> Result<Group, String> {
        if text.is_empty() {
            return Err("empty: give a group name or a numeric gid".into());
        }
        let Ok(c_name) = CString::new(text) else {
            return Err(format!("{text:?} contains a NUL byte"));
        };
        match group_by_name(&c_name) {
            Ok(Some((gid, name))) => {
                return Ok(Group {
                    setting,
                    gid,
                    name: Some(name),
                })
            }
            Ok(None) => {}
            Err(e) => return Err(format!("cannot look up group '{text}': {e}")),
        }
        if text.bytes().all(|b| b.is_ascii_digit()) {
            let gid: u32 = text
                .parse()
                .map_err(|_| format!("gid {text} is out of range"))?;
            if gid == u32::MAX {
                return Err(format!(
                    "gid {gid} is (gid_t)-1, which chown reads as \"leave the group unchanged\""
                ));
            }
            return Ok(Group {
                setting,
                gid,
                name: group_name(gid),
            });
        }
        Err(format!(
            "no group named '{text}' on this host (the group database, /etc/group or another \
             NSS source, has none); create it (groupadd {text}) or give an existing group's \
             name or numeric gid"
        ))
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "'{name}' (gid {})", self.gid),
            None => write!(f, "gid {}", self.gid),
        }
    }
}

/// Why a file could not be given its group or mode.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(
        "setting '{}': cannot give {what} {} to group {group}: {source}{hint}",
        group.setting,
        path.display()
    )]
    Chown {
        what: &'static str,
        path: PathBuf,
        group: Group,
        #[source]
        source: io::Error,
        /// What to do about it, starting with "; " (empty when nothing
        /// useful can be said).
        hint: String,
    },
    #[error("cannot set mode {mode:04o} on {what} {}: {source}", path.display())]
    Chmod {
        what: &'static str,
        path: PathBuf,
        mode: u32,
        #[source]
        source: io::Error,
    },
}

impl AccessError {
    /// The `io::ErrorKind` of the failed call, for callers that return
    /// `io::Error`.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            AccessError::Chown { source, .. } | AccessError::Chmod { source, .. } => source.kind(),
        }
    }
}

/// Gives `file` (open, `what` at `path`, which only names it in errors) to
/// `group` when one is set, then sets exactly `mode`. The caller must own
/// the file (it just created it) or be privileged.
pub fn set_group_and_mode(
    file: &File,
    what: &'static str,
    path: &Path,
    mode: u32,
    group: Option<&Group>,
) -> Result<(), AccessError> {
    if let Some(group) = group {
        std::os::unix::fs::fchown(file, None, Some(group.gid)).map_err(|source| {
            let hint = if source.raw_os_error() == Some(libc::EPERM) {
                format!(
                    "; kaping runs as {}, which is not a member of that group and lacks \
                     CAP_CHOWN (root has it): add the user to the group (and restart kaping's \
                     service or session so the membership applies), run kaping as root, or \
                     unset {}",
                    current_user(),
                    group.setting
                )
            } else {
                String::new()
            };
            AccessError::Chown {
                what,
                path: path.to_path_buf(),
                group: group.clone(),
                source,
                hint,
            }
        })?;
    }
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(|source| AccessError::Chmod {
            what,
            path: path.to_path_buf(),
            mode,
            source,
        })
}

/// The effective user, for messages: `uid 1000 ('kaping')`.
pub fn current_user() -> String {
    // SAFETY: geteuid has no preconditions and cannot fail (POSIX).
    let uid = unsafe { libc::geteuid() };
    describe_user(uid)
}

/// `uid N ('name')`, or `uid N` when the user database has no entry.
pub fn describe_user(uid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("uid {uid} ('{name}')"),
        None => format!("uid {uid}"),
    }
}

/// The name of user `uid`; `None` when there is no entry (or the lookup
/// failed: callers only use it in messages, with the number as fallback).
pub fn user_name(uid: u32) -> Option<String> {
    lookup(|buf, len| {
        let mut entry = MaybeUninit::<libc::passwd>::uninit();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `entry` is writable storage for one passwd, `buf` is
        // writable for `len` bytes and `result` for one pointer; all three
        // outlive the call. getpwuid_r is the reentrant variant: it writes
        // only through these pointers.
        let rc = unsafe { libc::getpwuid_r(uid, entry.as_mut_ptr(), buf, len, &mut result) };
        if rc != 0 || result.is_null() {
            return (rc, None);
        }
        // SAFETY: a non-null `result` points at `entry`, which the call
        // initialised; its `pw_name` is a NUL-terminated string inside
        // `buf`, which is still alive and unmodified here.
        let name = unsafe { CStr::from_ptr((*result).pw_name) };
        (0, Some(name.to_string_lossy().into_owned()))
    })
    .ok()
    .flatten()
}

/// The name of group `gid`; `None` when there is no entry (or the lookup
/// failed, as for [`user_name`]).
pub fn group_name(gid: u32) -> Option<String> {
    lookup(|buf, len| {
        let mut entry = MaybeUninit::<libc::group>::uninit();
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in user_name: every pointer names live, writable
        // storage of the size given, for the duration of the call.
        let rc = unsafe { libc::getgrgid_r(gid, entry.as_mut_ptr(), buf, len, &mut result) };
        if rc != 0 || result.is_null() {
            return (rc, None);
        }
        // SAFETY: a non-null `result` points at the initialised `entry`,
        // whose `gr_name` is NUL-terminated inside the live `buf`.
        let name = unsafe { CStr::from_ptr((*result).gr_name) };
        (0, Some(name.to_string_lossy().into_owned()))
    })
    .ok()
    .flatten()
}

/// The gid and name of the group called `name`; `Ok(None)` when there is
/// none.
fn group_by_name(name: &CStr) -> io::Result<Option<(u32, String)>> {
    lookup(|buf, len| {
        let mut entry = MaybeUninit::<libc::group>::uninit();
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: `name` is NUL-terminated (a CStr); the other pointers
        // name live, writable storage of the size given, for the duration
        // of the call.
        let rc =
            unsafe { libc::getgrnam_r(name.as_ptr(), entry.as_mut_ptr(), buf, len, &mut result) };
        if rc != 0 || result.is_null() {
            return (rc, None);
        }
        // SAFETY: a non-null `result` points at the initialised `entry`,
        // whose `gr_name` is NUL-terminated inside the live `buf`.
        let (gid, found) = unsafe { ((*result).gr_gid, CStr::from_ptr((*result).gr_name)) };
        (0, Some((gid, found.to_string_lossy().into_owned())))
    })
}

/// Runs one `get*_r` call, `call(buffer, buffer_len) -> (rc, found)`,
/// growing the buffer on `ERANGE`. "No such entry" is `Ok(None)`: glibc
/// reports it as rc 0 and a null result, other libcs (and some NSS modules)
/// as `ENOENT`, `ESRCH`, `EBADF` or `EPERM` (getgrnam_r(3)).
fn lookup<T>(
    mut call: impl FnMut(*mut libc::c_char, usize) -> (libc::c_int, Option<T>),
) -> io::Result<Option<T>> {
    let mut buf: Vec<libc::c_char> = vec![0; LOOKUP_BUFFER_START];
    loop {
        let (rc, found) = call(buf.as_mut_ptr(), buf.len());
        match rc {
            0 => return Ok(found),
            libc::ERANGE if buf.len() < LOOKUP_BUFFER_MAX => {
                let len = buf.len() * 2;
                buf.resize(len, 0);
            }
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// Runs `f` with the process umask set to `mask`, then puts the old one
/// back. The umask is process-wide: callers are tests whose assertions hold
/// under any umask (kaping sets its modes exactly); a lock keeps two of them
/// from restoring each other's mask.
#[cfg(test)]
pub(crate) fn with_umask<R>(mask: u32, f: impl FnOnce() -> R) -> R {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: umask only swaps the process's file-creation mask; it takes
    // no pointers and cannot fail.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let result = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn names_and_numbers_resolve_as_chown_does() {
        // Every Linux host has root, gid 0.
        let root = Group::resolve("shm_group", "root").unwrap();
        assert_eq!((root.gid, root.name.as_deref()), (0, Some("root")));
        assert_eq!(root.to_string(), "'root' (gid 0)");
        assert_eq!(Group::resolve("shm_group", "0").unwrap(), root);
        // A gid with no entry is taken as is.
        let bare = Group::resolve("state_group", "4000000000").unwrap();
        assert_eq!((bare.gid, bare.name.as_deref()), (4_000_000_000, None));
        assert_eq!(bare.to_string(), "gid 4000000000");
        assert_eq!(group_name(0).as_deref(), Some("root"));
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }

    #[test]
    fn unknown_and_impossible_groups_are_refused_with_the_reason() {
        let e = Group::resolve("shm_group", "kaping-no-such-group").unwrap_err();
        assert!(
            e.contains("no group named 'kaping-no-such-group'")
                && e.contains("groupadd kaping-no-such-group"),
            "{e}"
        );
        let e = Group::resolve("shm_group", "4294967295").unwrap_err();
        assert!(e.contains("(gid_t)-1"), "{e}");
        let e = Group::resolve("shm_group", "99999999999").unwrap_err();
        assert!(e.contains("out of range"), "{e}");
        assert!(Group::resolve("shm_group", "").is_err());
        assert!(Group::resolve("shm_group", "a\0b").is_err());
    }

    #[test]
    fn the_mode_is_exact_and_the_group_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        file.set_permissions(Permissions::from_mode(0o777)).unwrap();
        // Our own egid: every user may give its file to its own group.
        let own = std::fs::metadata(&path).unwrap().gid();
        let group = Group {
            setting: "state_group",
            gid: own,
            name: None,
        };
        set_group_and_mode(&file, "test file", &path, 0o640, Some(&group)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o640, own));
    }
}
