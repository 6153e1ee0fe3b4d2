//! Manual pages and shell completions, generated from the clap definitions
//! of kaping's three programs, so they never disagree with `--help`.
//!
//! Owns [`generate`]: one call writes every page and completion script of
//! one program under a directory. Callers: the hidden `gen-docs DIR`
//! subcommand of `kaping`, `kaping-stat` and `kaping-loadgen`, which
//! `contrib/deb-assets` runs after the release build to fill the Debian
//! package. Never called by the daemon; nothing here runs on a hot path.
//!
//! Layout written (the paths the package installs them from):
//!
//! | file | installed as |
//! |---|---|
//! | `DIR/man/NAME.1`, `DIR/man/NAME-SUB.1` (one per visible subcommand) | `/usr/share/man/man1/` |
//! | `DIR/completions/NAME.bash` | `/usr/share/bash-completion/completions/NAME` |
//! | `DIR/completions/_NAME` | `/usr/share/zsh/vendor-completions/_NAME` |
//! | `DIR/completions/NAME.fish` | `/usr/share/fish/vendor_completions.d/NAME.fish` |
//!
//! Hidden subcommands (`gen-docs` itself) get no page, as clap_mangen skips
//! them.

use std::io;
use std::path::Path;

use clap_complete::Shell;

/// Writes `cmd`'s manual pages under `dir/man` and its bash, zsh and fish
/// completions under `dir/completions`, creating both directories.
pub fn generate(mut cmd: clap::Command, dir: &Path) -> io::Result<()> {
    let name = cmd.get_name().to_string();
    let version = cmd.get_version().unwrap_or_default().to_string();
    let man_dir = dir.join("man");
    let completions_dir = dir.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&completions_dir)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, &completions_dir)?;
    }
    // The page footer names the program and version it documents; no date,
    // so two builds of one version give the same bytes.
    write_pages(cmd, &man_dir, &format!("kaping {version}"))
}

/// One page per command and visible subcommand, named as clap_mangen names
/// them (`kaping-run.1`, `kaping-ctl-keepalive.add.1`). Written here rather
/// than with `clap_mangen::generate_to` so every page carries the same
/// footer and clap's `help` subcommands get none.
fn write_pages(cmd: clap::Command, dir: &Path, source: &str) -> io::Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    fn walk(cmd: clap::Command, dir: &Path, source: &str) -> io::Result<()> {
        // clap's generated `help` subcommands (at every level) get no page.
        let subs = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help");
        for sub in subs.cloned() {
            walk(sub, dir, source)?;
        }
        clap_mangen::Man::new(cmd)
            .source(source.to_string())
            .manual("kaping manual".to_string())
            .generate_to(dir)?;
        Ok(())
    }
    walk(cmd, dir, source)
}
