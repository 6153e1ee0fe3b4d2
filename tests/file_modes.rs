//! Who may read what the daemon leaves on disk, end to end through
//! `kaping run`: the shm file is 0640 and the state directory 0750 with
//! 0640 files whatever the umask; `shm_group` and `state_group` give them to
//! a group; an unknown group, a group kaping may not use and a state
//! directory open to others that kaping may not tighten each stop the start
//! with one line naming the setting or the directory.
//!
//! Everything runs on loopback. Cases that need another user or group run
//! only as root and print SKIP otherwise.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

mod common;
use common::free_ports;

/// uid and gid of `nobody`/`nogroup` on Debian.
const NOBODY: u32 = 65_534;

/// How a test runs the daemon.
#[derive(Clone, Copy, Default)]
struct As {
    /// The umask the daemon starts with; `None`: the test's own.
    umask: Option<u32>,
    /// Run as nobody (uid and gid 65534, no supplementary groups).
    nobody: bool,
}

/// `kaping run` for one second with its shm file at `dir/shm`, then
/// `args`; waits for it to exit.
fn run(dir: &Path, how: As, args: &[&str]) -> Output {
    let port = free_ports(1);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kaping"));
    cmd.arg("run")
        .args(["--allow-destinations", "127.0.0.0/8,::1/128"])
        .arg("--shm")
        .arg(dir.join("shm"))
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .args(["--workers", "1", "--pin-workers", "false"])
        .args(["--max-contacts", "100", "--events", "none"])
        .args(["--run-for", "1s"])
        .args(args)
        .stdin(Stdio::null());
    if let Some(mask) = how.umask {
        // SAFETY: the closure runs in the child between fork and exec, where
        // only async-signal-safe calls are allowed: umask is one, and the
        // closure allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(mask as libc::mode_t);
                Ok(())
            });
        }
    }
    if how.nobody {
        // std drops the supplementary groups when root changes uid.
        cmd.uid(NOBODY).gid(NOBODY);
    }
    cmd.output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ran(out: &Output) {
    assert!(out.status.success(), "kaping failed: {}", stderr(out));
}

/// The single `kaping: ` line a refused start prints.
fn refused(out: &Output) -> String {
    assert!(!out.status.success(), "kaping started: {}", stderr(out));
    let err = stderr(out);
    let lines: Vec<_> = err
        .lines()
        .filter(|l| l.contains("setting '") || l.contains("state directory"))
        .collect();
    assert_eq!(lines.len(), 1, "one line says why: {err}");
    lines[0].to_owned()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().mode() & 0o7777
}

fn gid(path: &Path) -> u32 {
    fs::metadata(path).unwrap().gid()
}

/// Every file of the state directory, with its mode and gid.
fn state_files(state: &Path) -> Vec<(String, u32, u32)> {
    let mut all: Vec<_> = fs::read_dir(state)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, meta.mode() & 0o7777, meta.gid())
        })
        .collect();
    all.sort();
    all
}

/// True when the tests run as root (a fresh temp dir is root's).
fn root(dir: &Path) -> bool {
    fs::metadata(dir).unwrap().uid() == 0
}

#[test]
fn the_shm_file_is_0640_and_the_state_0750_and_0640_under_any_umask() {
    for mask in [0o000, 0o077] {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let how = As {
            umask: Some(mask),
            ..As::default()
        };
        ran(&run(
            dir.path(),
            how,
            &["--state-dir", state.to_str().unwrap()],
        ));
        assert_eq!(mode(&dir.path().join("shm")), 0o640, "umask {mask:03o}");
        assert_eq!(mode(&state), 0o750, "umask {mask:03o}");
        let files = state_files(&state);
        // The lock, the journal segment and the snapshot of the clean stop.
        assert_eq!(files.len(), 3, "{files:?}");
        for (name, file_mode, _) in files {
            assert_eq!(file_mode, 0o640, "{name}, umask {mask:03o}");
        }
    }
}

#[test]
fn a_state_dir_open_to_others_is_tightened_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    fs::create_dir(&state).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o777)).unwrap();
    let out = run(
        dir.path(),
        As::default(),
        &["--state-dir", state.to_str().unwrap()],
    );
    ran(&out);
    assert_eq!(mode(&state), 0o750);
    let err = stderr(&out);
    let warning = format!(
        "kaping: state: {}: the state directory was mode 0777 (open to every local user, \
         writable by its group); set it to 0750",
        state.display()
    );
    assert!(err.contains(&warning), "{err}");
}

#[test]
fn shm_group_and_state_group_get_the_files() {
    let dir = tempfile::tempdir().unwrap();
    if !root(dir.path()) {
        println!("SKIP: giving files to a group other than kaping's own needs root");
        return;
    }
    let state = dir.path().join("state");
    // A name for one, a number for the other.
    let group = kaping::access::group_name(NOBODY).expect("gid 65534 has a name");
    let out = run(
        dir.path(),
        As::default(),
        &[
            "--shm-group",
            &group,
            "--state-dir",
            state.to_str().unwrap(),
            "--state-group",
            "65534",
        ],
    );
    ran(&out);
    let shm = dir.path().join("shm");
    assert_eq!((mode(&shm), gid(&shm)), (0o640, NOBODY));
    assert_eq!((mode(&state), gid(&state)), (0o750, NOBODY));
    let files = state_files(&state);
    assert_eq!(files.len(), 3, "{files:?}");
    for (name, file_mode, file_gid) in files {
        assert_eq!((file_mode, file_gid), (0o640, NOBODY), "{name}");
    }
}

#[test]
fn an_unknown_group_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let line = refused(&run(
        dir.path(),
        As::default(),
        &["--shm-group", "kaping-no-such-group"],
    ));
    assert!(
        line.starts_with("kaping: setting 'shm_group': no group named 'kaping-no-such-group'"),
        "{line}"
    );
    let line = refused(&run(
        dir.path(),
        As::default(),
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--state-group",
            "kaping-no-such-group",
        ],
    ));
    assert!(
        line.starts_with("kaping: setting 'state_group': no group named 'kaping-no-such-group'"),
        "{line}"
    );
    // Refused before anything was created.
    assert!(!dir.path().join("shm").exists());
    assert!(!state.exists());
}

/// A directory nobody may write in, under a temp dir it may enter; `None`
/// (after printing SKIP) unless root, and unless nobody can run kaping.
fn open_to_nobody(dir: &Path) -> Option<std::path::PathBuf> {
    if !root(dir) {
        println!("SKIP: running kaping as another user needs root");
        return None;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    let open = dir.join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let probe = Command::new(env!("CARGO_BIN_EXE_kaping"))
        .arg("--version")
        .uid(NOBODY)
        .gid(NOBODY)
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        println!("SKIP: nobody cannot run the kaping binary here: {probe:?}");
        return None;
    }
    Some(open)
}

#[test]
fn a_group_kaping_may_not_use_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let Some(open) = open_to_nobody(dir.path()) else {
        return;
    };
    let nobody = As {
        nobody: true,
        ..As::default()
    };
    // nobody is no member of root's group and has no CAP_CHOWN.
    let line = refused(&run(&open, nobody, &["--shm-group", "0"]));
    let says = format!(
        "kaping: setting 'shm_group': cannot give shm file {} to group",
        open.join("shm").display()
    );
    assert!(line.starts_with(&says), "{line}");
    assert!(
        line.contains("Operation not permitted")
            && line.contains("uid 65534")
            && line.contains("not a member of that group")
            && line.contains("unset shm_group"),
        "{line}"
    );
    // Nothing is left under a temporary name.
    assert_eq!(fs::read_dir(&open).unwrap().count(), 0);

    let state = open.join("state");
    let line = refused(&run(
        &open,
        nobody,
        &["--state-dir", state.to_str().unwrap(), "--state-group", "0"],
    ));
    assert!(
        line.starts_with("kaping: setting 'state_group': cannot give state directory"),
        "{line}"
    );
}

#[test]
fn a_state_dir_open_to_others_that_kaping_may_not_tighten_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some(open) = open_to_nobody(dir.path()) else {
        return;
    };
    // `open` is root's and 0777: nobody may write in it but not chmod it.
    let nobody = As {
        nobody: true,
        ..As::default()
    };
    let line = refused(&run(
        &open,
        nobody,
        &["--state-dir", open.to_str().unwrap()],
    ));
    let says = format!(
        "kaping: state directory {} is mode 0777: other users can read or change the contacts \
         it holds, and kaping, running as uid 65534",
        open.display()
    );
    assert!(line.starts_with(&says), "{line}");
    assert!(
        line.contains("may not set it to 0750")
            && line.contains("It belongs to uid 0")
            && line.contains(&format!("`chmod 750 {}`", open.display())),
        "{line}"
    );
    assert_eq!(mode(&open), 0o777, "left as it was");
}
