//! Contact files: plain lines, JSON lines, and the JSON reply of Kamailio's
//! `ul.dump` RPC.
//!
//! Loaders stream: each contact is handed to a sink as soon as it is read, so
//! a million contacts never sit in one big vector. A malformed record is
//! reported with its place (`file:line`, or the AoR and contact within a
//! `ul.dump`) and skipped; the report counts what was loaded and skipped.
//! Control path only: allocation and blocking I/O are fine here.

mod jsonl;
mod lines;
mod uldump;

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::contact::ContactSpec;

/// How many problems a report keeps verbatim; the rest are only counted.
pub const PROBLEMS_KEPT: usize = 100;

/// Progress is shown on a terminal every this many records.
const PROGRESS_EVERY: usize = 100_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Decide from the first bytes of the file.
    Auto,
    /// `sip:uri [ip:port]` per line; `#` starts a comment.
    Lines,
    /// One JSON object per line: `uri`, `aor`, `received`, `path`, `socket`,
    /// `interval`, `send_to`.
    Jsonl,
    /// The JSON reply of Kamailio's `ul.dump` (or its `result` member).
    UlDump,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Format::Auto),
            "lines" => Ok(Format::Lines),
            "jsonl" => Ok(Format::Jsonl),
            "uldump" | "ul.dump" => Ok(Format::UlDump),
            other => Err(format!(
                "unknown contacts format '{other}' (auto, lines, jsonl, uldump)"
            )),
        }
    }
}

/// Where a record came from, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    Line(usize),
    /// AoR and 1-based index of the contact under it, with its ruid if any.
    UlContact {
        aor: String,
        index: usize,
        ruid: Option<String>,
    },
}

/// What the sink says about one contact.
#[derive(Debug)]
pub enum Verdict {
    Loaded,
    /// Not loaded, for this reason; loading goes on.
    Skip(String),
    /// Not loaded: another shard's contact (`--shard K/N`); not a problem.
    OtherShard,
    /// Loading must stop (e.g. no room left anywhere).
    Stop(String),
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub path: PathBuf,
    pub format: Option<Format>,
    pub loaded: usize,
    pub skipped: usize,
    /// Left to the other shards (`--shard K/N`).
    pub other_shards: usize,
    /// The first [`PROBLEMS_KEPT`] problems, each `place: why`.
    pub problems: Vec<String>,
    /// Set when the sink stopped the load.
    pub stopped: Option<String>,
}

impl LoadReport {
    fn skip(&mut self, place: &Place, why: &str) {
        self.skipped += 1;
        if self.problems.len() < PROBLEMS_KEPT {
            let p = self.path.display();
            self.problems.push(match place {
                Place::Line(n) => format!("{p}:{n}: {why}"),
                Place::UlContact { aor, index, ruid } => match ruid {
                    Some(r) => format!("{p}: AoR '{aor}' contact #{index} ({r}): {why}"),
                    None => format!("{p}: AoR '{aor}' contact #{index}: {why}"),
                },
            });
        }
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} contacts loaded, {} skipped",
            self.path.display(),
            self.loaded,
            self.skipped
        )?;
        if self.other_shards > 0 {
            write!(f, ", {} left to other shards", self.other_shards)?;
        }
        if let Some(why) = &self.stopped {
            write!(f, "; stopped: {why}")?;
        }
        Ok(())
    }
}

/// Error that prevents reading the file at all.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {why}")]
    Format { path: PathBuf, why: String },
}

/// Feeds every contact of `path` to `sink`; returns what happened.
pub fn load(
    path: &Path,
    format: Format,
    sink: impl FnMut(ContactSpec) -> Verdict,
) -> Result<LoadReport, LoadError> {
    let io_err = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    load_from(BufReader::with_capacity(1 << 20, file), path, format, sink)
}

/// [`load`] from any reader; `path` names it in messages. The fuzz targets
/// feed bytes through here, so they run exactly what a file goes through.
pub fn load_from(
    mut reader: impl BufRead,
    path: &Path,
    format: Format,
    mut sink: impl FnMut(ContactSpec) -> Verdict,
) -> Result<LoadReport, LoadError> {
    let io_err = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let format = match format {
        Format::Auto => detect(reader.fill_buf().map_err(io_err)?),
        f => f,
    };
    let mut report = LoadReport {
        path: path.to_path_buf(),
        format: Some(format),
        ..LoadReport::default()
    };
    let mut progress = Progress::new(path);
    let mut on_record =
        |spec: Result<ContactSpec, String>, place: Place, report: &mut LoadReport| {
            progress.tick(report.loaded + report.skipped + report.other_shards);
            match spec.map(&mut sink) {
                Ok(Verdict::Loaded) => {
                    report.loaded += 1;
                    true
                }
                Ok(Verdict::OtherShard) => {
                    report.other_shards += 1;
                    true
                }
                Ok(Verdict::Skip(why)) | Err(why) => {
                    report.skip(&place, &why);
                    true
                }
                Ok(Verdict::Stop(why)) => {
                    report.skip(&place, &why);
                    report.stopped = Some(why);
                    false
                }
            }
        };
    match format {
        Format::Lines => {
            for_each_line(&mut reader, path, |n, line| match lines::parse(line) {
                None => true,
                Some(spec) => on_record(spec, Place::Line(n), &mut report),
            })?;
        }
        Format::Jsonl => {
            for_each_line(&mut reader, path, |n, line| match jsonl::parse(line) {
                None => true,
                Some(spec) => on_record(spec, Place::Line(n), &mut report),
            })?;
        }
        Format::UlDump => {
            let mut text = Vec::new();
            reader.read_to_end(&mut text).map_err(io_err)?;
            uldump::parse(&text, |spec, place| on_record(spec, place, &mut report)).map_err(
                |why| LoadError::Format {
                    path: path.to_path_buf(),
                    why,
                },
            )?;
        }
        Format::Auto => unreachable!("detect() never returns Auto"),
    }
    progress.done(report.loaded + report.skipped);
    Ok(report)
}

/// `ul.dump` replies are one JSON document; JSON lines start with `{` on
/// every line; anything else is the plain line format.
fn detect(head: &[u8]) -> Format {
    let text = String::from_utf8_lossy(&head[..head.len().min(4096)]);
    let first = text.trim_start();
    if !first.starts_with('{') {
        return Format::Lines;
    }
    if text.contains("\"Domains\"") || text.contains("\"jsonrpc\"") {
        Format::UlDump
    } else {
        Format::Jsonl
    }
}

/// Calls `f(line_number, line)` for each line (1-based, without the line
/// end) until it returns false. Invalid UTF-8 is replaced, so the record
/// fails its own validation with a message instead of aborting the load.
fn for_each_line(
    reader: &mut impl BufRead,
    path: &Path,
    mut f: impl FnMut(usize, &str) -> bool,
) -> Result<(), LoadError> {
    let mut buf = Vec::with_capacity(512);
    let mut n = 0;
    loop {
        buf.clear();
        let read = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| LoadError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if read == 0 {
            return Ok(());
        }
        n += 1;
        let line = String::from_utf8_lossy(&buf);
        if !f(n, line.trim_end_matches(['\n', '\r'])) {
            return Ok(());
        }
    }
}

/// A one-line progress counter, drawn only when stderr is a terminal.
struct Progress {
    name: String,
    started: Instant,
    enabled: bool,
}

impl Progress {
    fn new(path: &Path) -> Progress {
        Progress {
            name: path.display().to_string(),
            started: Instant::now(),
            enabled: io::stderr().is_terminal(),
        }
    }

    fn tick(&mut self, records: usize) {
        if self.enabled && records > 0 && records.is_multiple_of(PROGRESS_EVERY) {
            let rate = records as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            let _ = write!(
                io::stderr(),
                "\rloading {}: {records} contacts ({rate:.0}/s)",
                self.name
            );
        }
    }

    fn done(&mut self, records: usize) {
        if self.enabled && records >= PROGRESS_EVERY {
            let _ = writeln!(
                io::stderr(),
                "\rloading {}: {records} contacts in {:.2} s",
                self.name,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

/// Kamailio writes `[not set]` for empty fields; empty strings mean the same.
fn optional(s: Option<&str>) -> Option<String> {
    match s.map(str::trim) {
        None | Some("") | Some("[not set]") => None,
        Some(v) => Some(v.to_string()),
    }
}

#[cfg(test)]
mod tests;
