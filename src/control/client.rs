//! The control socket's client: [`Client`] (JSON-RPC 2.0 over a UNIX stream
//! socket, ISSUE5 §2) and `kaping ctl`, the command line built on it.
//!
//! Wire contract (what the server guarantees and this client relies on):
//! every request or batch we write is one JSON value followed by `\n`; the
//! server answers each with exactly one JSON value followed by `\n`, in
//! order. A connection that subscribed (`keepalive.subscribe`) also carries
//! server notifications (`{"method":"keepalive.event",..}`, no `id`) between
//! responses; they are set aside while a response is awaited and handed out
//! by [`Client::next_notification`].
//!
//! Invariants:
//! * One request (or batch) in flight at a time: `call` and `batch` write,
//!   then read until their own response. Responses are matched by `id`
//!   (batch responses may come in any order, JSON-RPC 2.0 §6).
//! * Every response line is read into a buffer bounded by
//!   [`RESPONSE_MAX_BYTES`] (settable): a runaway peer costs at most that
//!   much memory, never an unbounded allocation.
//! * After a transport or framing error the connection is out of step with
//!   the server, so the client refuses further calls instead of misreading
//!   a later answer as the response to a new request. A JSON-RPC error
//!   answer ([`CallError::Rpc`]) leaves the connection usable.
//! * Nothing here panics on what the server sends: every field is read as
//!   an `Option` and a malformed answer is a [`CallError::Protocol`].
//!
//! Callers: `kaping ctl` ([`run`], wired in `main.rs`), the control
//! benchmark (`kaping-loadgen control-bench`) and the control tests. This is
//! the control path: it allocates and blocks freely; no packet path ever
//! reaches it.
//!
//! Contact files (`keepalive.add --file`) are read with the daemon's own
//! loader ([`crate::sources::load`]) and sent as batches; the mapping of a
//! [`ContactSpec`] to `keepalive.add` params is [`add_params`]: an explicit
//! destination (`send_to`, the second field of a plain line) becomes
//! `received`, which the daemon sends to before Path and the URI — the
//! same order as for the contacts file. `socket` (the registrar's local
//! socket in `ul.dump`) has no counterpart in the protocol and is not sent.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::contact::ContactSpec;
use crate::sources::{self, Format, LoadReport, Verdict};
use crate::timefmt::grouped;

/// Longest response line accepted. A full `keepalive.list` page (10,000
/// contacts of ~700 bytes) is about 7 MB; a 16 MiB batch of `keepalive.get`
/// could answer several times its size, hence the margin.
pub const RESPONSE_MAX_BYTES: usize = 64 << 20;
/// `keepalive.list` page size when following `next` (the protocol maximum:
/// fewest round trips).
pub const LIST_PAGE_MAX: u64 = 10_000;
/// `keepalive.add --file` batch size by default.
pub const BATCH_DEFAULT: usize = 1000;
/// Notifications kept while a response is awaited; older ones are dropped
/// (and counted) so a subscriber that only calls cannot grow without bound.
pub const PENDING_NOTIFICATIONS_MAX: usize = 65_536;
/// Failed adds of a `--file` run shown with their place; the rest are counted.
const ERRORS_SHOWN: usize = 5;
/// Loader problems (unparsable records) shown; the rest are counted.
const PROBLEMS_SHOWN: usize = 5;
/// Environment variable naming the control socket when `--control` is absent.
pub const CONTROL_ENV: &str = "KAPING_CONTROL";

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

pub use super::rpc::RpcError;

/// Why a call produced no result.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The socket could not be reached; the message says what to do.
    #[error("{}", connect_hint(.path, .source))]
    Connect { path: PathBuf, source: io::Error },
    #[error("control socket {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("control socket {}: no answer within {:.1} s", .path.display(), .after.as_secs_f64())]
    Timeout { path: PathBuf, after: Duration },
    #[error("control socket {}: the daemon closed the connection{}", .path.display(), if *.partial { " in the middle of an answer" } else { "" })]
    Closed { path: PathBuf, partial: bool },
    #[error("control socket {}: an answer is longer than {max} bytes", .path.display())]
    TooLarge { path: PathBuf, max: usize },
    /// The server said something that is not a JSON-RPC answer to our request.
    #[error("control socket {}: {why}", .path.display())]
    Protocol { path: PathBuf, why: String },
    /// The server answered with a JSON-RPC error.
    #[error("{0}")]
    Rpc(RpcError),
}

impl CallError {
    /// The operator's line: an RPC error names the method and its target.
    pub fn describe(&self, method: &str, target: Option<&str>) -> String {
        match self {
            CallError::Rpc(e) => e.describe(method, target),
            other => other.to_string(),
        }
    }
}

fn connect_hint(path: &Path, e: &io::Error) -> String {
    let p = path.display();
    match e.kind() {
        io::ErrorKind::NotFound => format!(
            "no control socket at {p}: is the daemon running with `kaping run --control {p}`?"
        ),
        io::ErrorKind::ConnectionRefused => format!(
            "nothing listens on {p} (left behind by a stopped daemon?): start it with `kaping run --control {p}`"
        ),
        io::ErrorKind::PermissionDenied => format!(
            "{p}: permission denied (the control socket is mode 0660: run as the daemon's user or a member of its group)"
        ),
        _ => format!("cannot connect to {p}: {e} (is the daemon running with `kaping run --control {p}`?)"),
    }
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

/// One request of a message, serialized without copying its params.
#[derive(Serialize)]
struct Request<'a> {
    jsonrpc: &'static str,
    id: u64,
    method: &'a str,
    #[serde(skip_serializing_if = "no_params")]
    params: &'a Value,
}

fn no_params(p: &&Value) -> bool {
    p.is_null()
}

/// A connection to the control socket.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    response_max: usize,
    timeout: Option<Duration>,
    /// Notifications that arrived while a response was awaited.
    pending: VecDeque<Value>,
    dropped_notifications: u64,
    /// Reused for each outgoing message and each incoming line.
    out: Vec<u8>,
    line: Vec<u8>,
    /// Set by a transport or framing error: the stream is out of step.
    broken: bool,
}

impl Client {
    /// Connects to the daemon's control socket.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, CallError> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path).map_err(|source| CallError::Connect {
            path: path.clone(),
            source,
        })?;
        let writer = stream.try_clone().map_err(|source| CallError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Client {
            path,
            reader: BufReader::with_capacity(64 << 10, stream),
            writer,
            next_id: 1,
            response_max: RESPONSE_MAX_BYTES,
            timeout: None,
            pending: VecDeque::new(),
            dropped_notifications: 0,
            out: Vec::with_capacity(4096),
            line: Vec::with_capacity(4096),
            broken: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bounds each wait for an answer (and each write); `None`: wait forever
    /// (a subscriber waiting for events).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), CallError> {
        let io = |source| CallError::Io {
            path: self.path.clone(),
            source,
        };
        self.writer.set_read_timeout(timeout).map_err(io)?;
        self.writer.set_write_timeout(timeout).map_err(io)?;
        self.timeout = timeout;
        Ok(())
    }

    /// The longest answer line accepted (default [`RESPONSE_MAX_BYTES`]).
    pub fn set_response_max(&mut self, bytes: usize) {
        self.response_max = bytes;
    }

    /// Notifications dropped because more than
    /// [`PENDING_NOTIFICATIONS_MAX`] were waiting.
    pub fn dropped_notifications(&self) -> u64 {
        self.dropped_notifications
    }

    /// Calls `method`; `params` `Null` sends none.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, CallError> {
        self.usable()?;
        let id = self.take_ids(1);
        self.out.clear();
        let req = Request {
            jsonrpc: "2.0",
            id,
            method,
            params: &params,
        };
        if let Err(e) = serde_json::to_writer(&mut self.out, &req) {
            return Err(self.protocol(format!("cannot encode the request: {e}")));
        }
        self.out.push(b'\n');
        self.send()?;
        let v = self.read_response()?;
        let Value::Object(mut o) = v else {
            return Err(self.protocol(format!("expected a response object, got {}", brief(&v))));
        };
        match o.get("id") {
            Some(Value::Number(n)) if n.as_u64() == Some(id) => {}
            // A connection-level refusal (too many connections, request too
            // large, parse error) carries a null id.
            Some(Value::Null) if o.contains_key("error") => {}
            other => {
                let got = other.map_or("none".to_string(), |v| v.to_string());
                return Err(self.protocol(format!("response id {got}, expected {id}")));
            }
        }
        match outcome(&mut o) {
            Some(Ok(result)) => Ok(result),
            Some(Err(e)) => Err(CallError::Rpc(e)),
            None => Err(self.protocol(format!(
                "a response without \"result\" or a valid \"error\": {}",
                brief(&Value::Object(o))
            ))),
        }
    }

    /// Sends `calls` as one JSON-RPC batch (one array, one write) and returns
    /// each call's outcome in the order given. An empty slice sends nothing.
    /// `Err` means the batch as a whole got no per-call answers (transport
    /// failure, or one error for the whole message such as -32004).
    pub fn batch<M: AsRef<str>>(
        &mut self,
        calls: &[(M, Value)],
    ) -> Result<Vec<Result<Value, RpcError>>, CallError> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        self.usable()?;
        let first = self.take_ids(calls.len() as u64);
        self.out.clear();
        self.out.push(b'[');
        for (i, (method, params)) in calls.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            let req = Request {
                jsonrpc: "2.0",
                id: first + i as u64,
                method: method.as_ref(),
                params,
            };
            if let Err(e) = serde_json::to_writer(&mut self.out, &req) {
                return Err(self.protocol(format!("cannot encode request {i}: {e}")));
            }
        }
        self.out.extend_from_slice(b"]\n");
        self.send()?;
        let v = self.read_response()?;
        let items = match v {
            Value::Array(items) => items,
            // One error for the whole message (empty batch, too large, ...).
            Value::Object(mut o) if o.get("id").is_some_and(Value::is_null) => {
                return match outcome(&mut o) {
                    Some(Err(e)) => Err(CallError::Rpc(e)),
                    _ => Err(self.protocol("a non-array answer to a batch".to_string())),
                };
            }
            other => {
                return Err(self.protocol(format!(
                    "expected an array answering the batch, got {}",
                    brief(&other)
                )))
            }
        };
        let mut results: Vec<Option<Result<Value, RpcError>>> = Vec::new();
        results.resize_with(calls.len(), || None);
        for item in items {
            let Value::Object(mut o) = item else {
                return Err(self.protocol(format!("a batch answer entry is {}", brief(&item))));
            };
            let id = o.get("id").cloned().unwrap_or(Value::Null);
            let index = id
                .as_u64()
                .and_then(|id| id.checked_sub(first))
                .filter(|&k| k < calls.len() as u64);
            let Some(index) = index else {
                // Our entries are always well formed, so an entry the server
                // could not attribute is a refusal of the message.
                if let Some(Err(e)) = outcome(&mut o) {
                    return Err(CallError::Rpc(e));
                }
                return Err(self.protocol(format!("a batch answer with unknown id {id}")));
            };
            let slot = &mut results[index as usize];
            if slot.is_some() {
                return Err(self.protocol(format!("two answers for id {id}")));
            }
            *slot = match outcome(&mut o) {
                Some(r) => Some(r),
                None => return Err(self.protocol(format!("answer {id} has no result or error"))),
            };
        }
        let mut out = Vec::with_capacity(results.len());
        for (k, r) in results.into_iter().enumerate() {
            match r {
                Some(r) => out.push(r),
                None => {
                    return Err(self.protocol(format!(
                        "no answer for request {} ({})",
                        first + k as u64,
                        calls[k].0.as_ref()
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The next server notification (for a subscriber, each is a
    /// `keepalive.event`), waiting for one if none is queued; `None` when
    /// the daemon closed the connection.
    pub fn next_notification(&mut self) -> Result<Option<Value>, CallError> {
        if let Some(v) = self.pending.pop_front() {
            return Ok(Some(v));
        }
        self.usable()?;
        match self.read_value()? {
            None => Ok(None),
            Some(v) if is_notification(&v) => Ok(Some(v)),
            Some(v) => Err(self.protocol(format!("an answer nobody asked for: {}", brief(&v)))),
        }
    }

    fn take_ids(&mut self, n: u64) -> u64 {
        let first = self.next_id;
        self.next_id += n;
        first
    }

    fn usable(&self) -> Result<(), CallError> {
        if self.broken {
            return Err(CallError::Protocol {
                path: self.path.clone(),
                why: "the connection was left out of step by an earlier error; reconnect".into(),
            });
        }
        Ok(())
    }

    fn protocol(&mut self, why: String) -> CallError {
        self.broken = true;
        CallError::Protocol {
            path: self.path.clone(),
            why,
        }
    }

    fn io_error(&mut self, e: io::Error, partial: bool) -> CallError {
        self.broken = true;
        let path = self.path.clone();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CallError::Timeout {
                path,
                after: self.timeout.unwrap_or_default(),
            },
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => CallError::Closed { path, partial },
            _ => CallError::Io { path, source: e },
        }
    }

    /// Writes `self.out`. When the server hangs up mid-write it may have
    /// said why first (request too large: -32004); that answer is returned.
    fn send(&mut self) -> Result<(), CallError> {
        let Err(e) = self.writer.write_all(&self.out) else {
            return Ok(());
        };
        let err = self.io_error(e, false);
        if matches!(err, CallError::Closed { .. }) {
            if let Ok(Some(Value::Object(mut o))) = self.read_value() {
                if let Some(Err(e)) = outcome(&mut o) {
                    return Err(CallError::Rpc(e));
                }
            }
        }
        Err(err)
    }

    /// Reads until a value that is not a notification; EOF is an error.
    fn read_response(&mut self) -> Result<Value, CallError> {
        loop {
            match self.read_value()? {
                None => {
                    self.broken = true;
                    return Err(CallError::Closed {
                        path: self.path.clone(),
                        partial: false,
                    });
                }
                Some(v) if is_notification(&v) => {
                    if self.pending.len() == PENDING_NOTIFICATIONS_MAX {
                        self.pending.pop_front();
                        self.dropped_notifications += 1;
                    }
                    self.pending.push_back(v);
                }
                Some(v) => return Ok(v),
            }
        }
    }

    /// The next non-blank line as JSON; `None` at a clean EOF.
    fn read_value(&mut self) -> Result<Option<Value>, CallError> {
        loop {
            if !self.read_line()? {
                return Ok(None);
            }
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return match serde_json::from_slice(&self.line) {
                Ok(v) => Ok(Some(v)),
                Err(e) => Err(self.protocol(format!("invalid JSON from the daemon: {e}"))),
            };
        }
    }

    /// One `\n`-terminated line into `self.line` (without the `\n`), at most
    /// `response_max` bytes; false at EOF before any byte.
    fn read_line(&mut self) -> Result<bool, CallError> {
        self.line.clear();
        loop {
            let buf = match self.reader.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let partial = !self.line.is_empty();
                    return Err(self.io_error(e, partial));
                }
            };
            if buf.is_empty() {
                if self.line.is_empty() {
                    return Ok(false);
                }
                self.broken = true;
                return Err(CallError::Closed {
                    path: self.path.clone(),
                    partial: true,
                });
            }
            let (take, done) = match memchr::memchr(b'\n', buf) {
                Some(i) => (i, true),
                None => (buf.len(), false),
            };
            if self.line.len() + take > self.response_max {
                self.broken = true;
                return Err(CallError::TooLarge {
                    path: self.path.clone(),
                    max: self.response_max,
                });
            }
            self.line.extend_from_slice(&buf[..take]);
            self.reader.consume(take + usize::from(done));
            if done {
                return Ok(true);
            }
        }
    }
}

fn is_notification(v: &Value) -> bool {
    v.get("id").is_none() && v.get("method").is_some()
}

/// `Ok(result)` or `Err(error)` of a response object; `None` when it has
/// neither (or a malformed error).
fn outcome(o: &mut Map<String, Value>) -> Option<Result<Value, RpcError>> {
    if let Some(e) = o.get("error") {
        return RpcError::from_value(e).map(Err);
    }
    o.remove("result").map(Ok)
}

/// A value shortened for an error message.
fn brief(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// `kaping ctl`: talk to a running daemon.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The daemon's control socket (`kaping run --control PATH`); default:
    /// $KAPING_CONTROL.
    #[arg(long, global = true, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Print the JSON result instead of the readable form.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long to wait for each answer.
    #[arg(long, global = true, value_name = "DURATION", default_value = "60s", value_parser = parse_positive_duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub method: Method,
}

/// One subcommand per method (ISSUE5 §2), plus `call` for anything else.
#[derive(Subcommand, Debug)]
pub enum Method {
    /// Add a contact, or replace the parameters of the same AoR + URI (a
    /// NAT rebinding) keeping its history; or every contact of --file.
    #[command(name = "keepalive.add", visible_alias = "add")]
    Add(AddArgs),
    /// Delete a contact.
    #[command(name = "keepalive.del", visible_alias = "del")]
    Del(KeyArgs),
    /// Show a contact: parameters, state, counters, RTTs.
    #[command(name = "keepalive.get", visible_alias = "get")]
    Get(KeyArgs),
    /// List contacts (all of them, page after page, unless --limit).
    #[command(name = "keepalive.list", visible_alias = "list")]
    List(ListArgs),
    /// Delete every contact, or every contact of one owner.
    #[command(name = "keepalive.flush", visible_alias = "flush")]
    Flush(FlushArgs),
    /// The daemon's figures: contacts, pings, RTT, control traffic.
    #[command(name = "keepalive.stats", visible_alias = "stats")]
    Stats,
    /// Print state changes as they happen, until interrupted.
    #[command(name = "keepalive.subscribe", visible_alias = "subscribe")]
    Subscribe,
    /// Call any method with raw JSON params; prints the raw result.
    Call(CallArgs),
}

#[derive(Args, Debug)]
pub struct AddArgs {
    /// Contact URI (the Request-URI of every ping).
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    pub uri: Option<String>,
    /// Address-of-record (To header; part of the contact's identity).
    #[arg(long, conflicts_with = "file")]
    pub aor: Option<String>,
    /// NAT source to send pings to: IP:port or sip:IP:port;transport=udp.
    #[arg(long, conflicts_with = "file")]
    pub received: Option<String>,
    /// Path header value (the first hop is sent to, as a Route).
    #[arg(long, conflicts_with = "file")]
    pub path: Option<String>,
    /// Ping interval (`30s`, `500ms`; plain numbers are seconds). With
    /// --file: for the contacts that have none of their own.
    #[arg(long, value_parser = parse_positive_duration)]
    pub interval: Option<Duration>,
    /// Owner (e.g. the registrar), for `list --owner` and `flush --owner`.
    #[arg(long)]
    pub owner: Option<String>,
    /// The socket the contact registered on (`udp:IP:PORT`), used by
    /// `--source socket`.
    #[arg(long, conflicts_with = "file")]
    pub socket: Option<String>,
    /// Where its pings leave from: bind, socket, or IP:PORT (the proxy's).
    #[arg(long, conflicts_with = "file")]
    pub source: Option<String>,
    /// What is sent: sip, null or crlf.
    #[arg(long, conflicts_with = "file")]
    pub keepalive: Option<String>,
    /// Add every contact of this file (lines, jsonl or Kamailio ul.dump).
    #[arg(long, value_name = "CONTACTS")]
    pub file: Option<PathBuf>,
    /// Format of --file: auto, lines, jsonl, uldump.
    #[arg(long, requires = "file")]
    pub format: Option<Format>,
    /// Adds per JSON-RPC batch with --file (default 1000).
    #[arg(long, requires = "file", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch: Option<u32>,
}

#[derive(Args, Debug)]
pub struct KeyArgs {
    /// Contact URI.
    pub uri: String,
    /// Address-of-record the contact was added with.
    #[arg(long)]
    pub aor: Option<String>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// One page of at most N contacts (1..=10000) instead of all of them.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=LIST_PAGE_MAX))]
    pub limit: Option<u64>,
    /// Start at this cursor (the `next` of a previous page).
    #[arg(long)]
    pub cursor: Option<u64>,
    /// Only this owner's contacts.
    #[arg(long)]
    pub owner: Option<String>,
    /// Only contacts in this state.
    #[arg(long, value_parser = ["unknown", "up", "down"])]
    pub state: Option<String>,
}

#[derive(Args, Debug)]
pub struct FlushArgs {
    /// Only this owner's contacts (default: every contact).
    #[arg(long)]
    pub owner: Option<String>,
}

#[derive(Args, Debug)]
pub struct CallArgs {
    /// Method name, e.g. keepalive.get.
    pub method: String,
    /// Params: a JSON object or array; `-` reads them from stdin.
    pub params: Option<String>,
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = crate::duration::parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than zero".to_string());
    }
    Ok(d)
}

/// What stops a `kaping ctl` run.
enum Failure {
    /// One line for stderr.
    Msg(String),
    /// Writing stdout failed (a closed pipe ends the run quietly).
    Output(io::Error),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Output(e)
    }
}

impl From<String> for Failure {
    fn from(s: String) -> Failure {
        Failure::Msg(s)
    }
}

/// `kaping ctl`: the whole command. `Err` is one line for stderr (main
/// prefixes `kaping: ` and exits 1).
pub fn run(args: CtlArgs) -> Result<(), String> {
    let path = match &args.control {
        Some(p) => p.clone(),
        None => match std::env::var_os(CONTROL_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => {
                return Err(format!(
                    "which daemon? give --control PATH (the daemon's `kaping run --control PATH`) or set {CONTROL_ENV}"
                ))
            }
        },
    };
    // Read `call -` params before connecting: a slow stdin must not hold a
    // connection slot.
    let call_params = match &args.method {
        Method::Call(c) => Some(call_params(c.params.as_deref())?),
        _ => None,
    };
    let mut client = Client::connect(&path).map_err(|e| e.to_string())?;
    client
        .set_timeout(Some(args.timeout))
        .map_err(|e| e.to_string())?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match dispatch(&mut client, &args, call_params, &mut out) {
        Ok(()) => out.flush().or_else(quiet_pipe).map_err(|e| e.to_string()),
        Err(Failure::Msg(m)) => {
            let _ = out.flush();
            Err(m)
        }
        Err(Failure::Output(e)) => quiet_pipe(e).map_err(|e| format!("stdout: {e}")),
    }
}

/// A reader that went away (`| head`) is not an error.
fn quiet_pipe(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(e)
    }
}

fn call_params(text: Option<&str>) -> Result<Value, String> {
    let text = match text {
        None => return Ok(Value::Null),
        Some("-") => {
            let mut s = String::new();
            io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| format!("cannot read params from stdin: {e}"))?;
            s
        }
        Some(t) => t.to_string(),
    };
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("params are not valid JSON: {e}"))?;
    match v {
        Value::Object(_) | Value::Array(_) | Value::Null => Ok(v),
        other => Err(format!(
            "params must be a JSON object or array, not {}",
            brief(&other)
        )),
    }
}

fn dispatch(
    client: &mut Client,
    args: &CtlArgs,
    call_params: Option<Value>,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let json = args.json;
    match &args.method {
        Method::Add(a) => match &a.file {
            Some(file) => add_file(client, a, file, json, out),
            None => {
                let uri = a.uri.as_deref().unwrap_or_default();
                let mut p = Map::new();
                p.insert("uri".into(), uri.into());
                put_opt(&mut p, "aor", a.aor.as_deref());
                put_opt(&mut p, "received", a.received.as_deref());
                put_opt(&mut p, "path", a.path.as_deref());
                if let Some(i) = a.interval {
                    p.insert("interval".into(), json!(i.as_secs_f64()));
                }
                put_opt(&mut p, "owner", a.owner.as_deref());
                put_opt(&mut p, "socket", a.socket.as_deref());
                put_opt(&mut p, "source", a.source.as_deref());
                put_opt(&mut p, "keepalive", a.keepalive.as_deref());
                let r = client
                    .call("keepalive.add", Value::Object(p))
                    .map_err(|e| e.describe("keepalive.add", Some(uri)))?;
                print_result(out, json, &r, |out| render_add(&r, out))
            }
        },
        Method::Del(k) => {
            let r = client
                .call("keepalive.del", key_params(k))
                .map_err(|e| e.describe("keepalive.del", Some(&k.uri)))?;
            print_result(out, json, &r, |out| {
                let n = r.get("deleted").and_then(Value::as_u64).unwrap_or(0);
                let uri = r.get("uri").and_then(Value::as_str).unwrap_or(&k.uri);
                writeln!(out, "deleted {uri} ({n} contact{})", plural(n))
            })
        }
        Method::Get(k) => {
            let r = client
                .call("keepalive.get", key_params(k))
                .map_err(|e| e.describe("keepalive.get", Some(&k.uri)))?;
            print_result(out, json, &r, |out| render_contact(&r, out))
        }
        Method::List(l) => list(client, l, json, out),
        Method::Flush(f) => {
            let mut p = Map::new();
            put_opt(&mut p, "owner", f.owner.as_deref());
            let r = client
                .call("keepalive.flush", Value::Object(p))
                .map_err(|e| e.describe("keepalive.flush", f.owner.as_deref()))?;
            print_result(out, json, &r, |out| {
                let n = r.get("deleted").and_then(Value::as_u64).unwrap_or(0);
                match &f.owner {
                    Some(o) => writeln!(out, "deleted {} contact{} of {o}", grouped(n), plural(n)),
                    None => writeln!(out, "deleted {} contact{}", grouped(n), plural(n)),
                }
            })
        }
        Method::Stats => {
            let r = client
                .call("keepalive.stats", Value::Null)
                .map_err(|e| e.describe("keepalive.stats", None))?;
            print_result(out, json, &r, |out| render_stats(&r, out))
        }
        Method::Subscribe => subscribe(client, json, out),
        Method::Call(c) => {
            let params = call_params.unwrap_or(Value::Null);
            let r = client
                .call(&c.method, params)
                .map_err(|e| e.describe(&c.method, None))?;
            if json {
                writeln!(out, "{r}")?;
            } else {
                let text = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
                writeln!(out, "{text}")?;
            }
            Ok(())
        }
    }
}

fn print_result(
    out: &mut dyn Write,
    json: bool,
    r: &Value,
    human: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), Failure> {
    if json {
        writeln!(out, "{r}")?;
    } else {
        human(out)?;
    }
    Ok(())
}

fn put_opt(p: &mut Map<String, Value>, name: &str, v: Option<&str>) {
    if let Some(v) = v {
        p.insert(name.to_string(), v.into());
    }
}

fn key_params(k: &KeyArgs) -> Value {
    let mut p = Map::new();
    p.insert("uri".into(), k.uri.as_str().into());
    put_opt(&mut p, "aor", k.aor.as_deref());
    Value::Object(p)
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

// ---------------------------------------------------------------------------
// keepalive.list
// ---------------------------------------------------------------------------

fn list(client: &mut Client, l: &ListArgs, json: bool, out: &mut dyn Write) -> Result<(), Failure> {
    let params = |cursor: Option<u64>, limit: u64| {
        let mut p = Map::new();
        if let Some(c) = cursor {
            p.insert("cursor".into(), c.into());
        }
        p.insert("limit".into(), limit.into());
        put_opt(&mut p, "owner", l.owner.as_deref());
        put_opt(&mut p, "state", l.state.as_deref());
        Value::Object(p)
    };
    let fail = |e: CallError| Failure::Msg(e.describe("keepalive.list", None));
    if let Some(limit) = l.limit {
        // One page: the raw result (with its `next`) is what a script pages with.
        let r = client
            .call("keepalive.list", params(l.cursor, limit))
            .map_err(fail)?;
        if json {
            writeln!(out, "{r}")?;
            return Ok(());
        }
        let mut printer = ListPrinter::new(false);
        printer.page(page_contacts(&r).map_err(Failure::Msg)?, out)?;
        printer.finish(out)?;
        let total = r.get("total").and_then(Value::as_u64);
        match (r.get("next").and_then(Value::as_u64), total) {
            (Some(next), Some(t)) => {
                writeln!(out, "({} in all; next page: --cursor {next})", grouped(t))?
            }
            (Some(next), None) => writeln!(out, "(next page: --cursor {next})")?,
            _ => {}
        }
        return Ok(());
    }
    let mut printer = ListPrinter::new(json);
    let mut cursor = l.cursor;
    loop {
        let r = client
            .call("keepalive.list", params(cursor, LIST_PAGE_MAX))
            .map_err(fail)?;
        printer.page(page_contacts(&r).map_err(Failure::Msg)?, out)?;
        match r.get("next") {
            None | Some(Value::Null) => break,
            Some(next) => {
                let Some(next) = next.as_u64() else {
                    return Err(Failure::Msg(format!(
                        "keepalive.list: the daemon's next cursor is {next}, not an integer"
                    )));
                };
                if Some(next) == cursor {
                    return Err(Failure::Msg(format!(
                        "keepalive.list: the daemon returned cursor {next} again (listing would never end)"
                    )));
                }
                cursor = Some(next);
            }
        }
    }
    printer.finish(out)?;
    Ok(())
}

fn page_contacts(r: &Value) -> Result<&[Value], String> {
    r.get("contacts")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .ok_or_else(|| {
            format!(
                "keepalive.list: an answer without \"contacts\": {}",
                brief(r)
            )
        })
}

/// Prints contacts page after page: as one JSON object
/// (`{"contacts":[...],"total":N}`, streamed so a million contacts are never
/// held at once), or as a table whose columns widen as longer values come.
struct ListPrinter {
    json: bool,
    count: u64,
    /// unknown, up, down, other.
    states: [u64; 4],
    widths: [usize; LIST_COLUMNS.len()],
    header_done: bool,
}

const LIST_COLUMNS: [&str; 7] = ["STATE", "SRTT", "CODE", "DEST", "URI", "AOR", "OWNER"];
/// Starting widths: the longest state, a 3-decimal RTT, a status code and
/// an IPv4 destination, so pages usually line up with the first one.
const LIST_WIDTHS: [usize; 7] = [7, 9, 4, 21, 3, 3, 5];

impl ListPrinter {
    fn new(json: bool) -> ListPrinter {
        ListPrinter {
            json,
            count: 0,
            states: [0; 4],
            widths: LIST_WIDTHS,
            header_done: false,
        }
    }

    fn page(&mut self, contacts: &[Value], out: &mut dyn Write) -> io::Result<()> {
        if self.json {
            for c in contacts {
                let sep = if self.count == 0 {
                    "{\"contacts\":["
                } else {
                    ","
                };
                write!(out, "{sep}{c}")?;
                self.count += 1;
            }
            return Ok(());
        }
        let rows: Vec<[String; LIST_COLUMNS.len()]> = contacts.iter().map(list_row).collect();
        for row in &rows {
            for (w, cell) in self.widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        if !self.header_done && !rows.is_empty() {
            self.write_row(&LIST_COLUMNS.map(str::to_string), out)?;
            self.header_done = true;
        }
        for (row, c) in rows.iter().zip(contacts) {
            self.write_row(row, out)?;
            let k = match c.get("state").and_then(Value::as_str) {
                Some("unknown") => 0,
                Some("up") => 1,
                Some("down") => 2,
                _ => 3,
            };
            self.states[k] += 1;
            self.count += 1;
        }
        Ok(())
    }

    fn write_row(&self, row: &[String; LIST_COLUMNS.len()], out: &mut dyn Write) -> io::Result<()> {
        let mut line = String::new();
        let last = row.len() - 1;
        for (i, (cell, w)) in row.iter().zip(self.widths).enumerate() {
            if i == last {
                line.push_str(cell);
            } else if i == 1 {
                // Figures are right-aligned.
                line.push_str(&format!("{cell:>w$}  "));
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())
    }

    fn finish(&mut self, out: &mut dyn Write) -> io::Result<()> {
        if self.json {
            if self.count == 0 {
                write!(out, "{{\"contacts\":[")?;
            }
            return writeln!(out, "],\"total\":{}}}", self.count);
        }
        let [unknown, up, down, other] = self.states;
        write!(
            out,
            "{} contact{}: {} up, {} down, {} unknown",
            grouped(self.count),
            plural(self.count),
            grouped(up),
            grouped(down),
            grouped(unknown)
        )?;
        if other > 0 {
            write!(out, ", {} other", grouped(other))?;
        }
        writeln!(out)
    }
}

fn list_row(c: &Value) -> [String; LIST_COLUMNS.len()] {
    let s = |k: &str| text(c.get(k));
    let srtt = if answered(c) {
        ms_text(c.get("srtt_us").and_then(Value::as_u64))
    } else {
        "-".to_string()
    };
    let code = match c.get("last_code").and_then(Value::as_u64) {
        Some(0) | None => "-".to_string(),
        Some(code) => code.to_string(),
    };
    [
        s("state"),
        srtt,
        code,
        s("dest"),
        s("uri"),
        s("aor"),
        s("owner"),
    ]
}

// ---------------------------------------------------------------------------
// Human rendering
// ---------------------------------------------------------------------------

/// A field for people: `-` for null or absent, strings bare, the rest as JSON.
fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) if s.is_empty() => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Microseconds as milliseconds, 3 decimals below 10 ms (as kaping-stat).
pub fn ms_text(us: Option<u64>) -> String {
    match us {
        None => "-".to_string(),
        Some(us) if us < 10_000 => format!("{:.3} ms", us as f64 / 1000.0),
        Some(us) => format!("{:.1} ms", us as f64 / 1000.0),
    }
}

/// Seconds as `3 d 04 h`, `1 h 02 m`, `5 m 07 s` or `42 s`.
pub fn span_text(s: u64) -> String {
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d} d {h:02} h")
    } else if h > 0 {
        format!("{h} h {m:02} m")
    } else if m > 0 {
        format!("{m} m {sec:02} s")
    } else {
        format!("{sec} s")
    }
}

/// A figure named `key`: units follow the key's suffix (`_us` → ms, `_ms`,
/// `_s` → a time span), counts get thousands separators.
fn figure(key: &str, v: &Value) -> String {
    let Some(n) = v.as_u64() else {
        return match v.as_f64() {
            Some(f) => format!("{f:.3}"),
            None => text(Some(v)),
        };
    };
    if key.ends_with("_us") || key.starts_with('p') && key[1..].bytes().all(|b| b.is_ascii_digit())
    {
        ms_text(Some(n))
    } else if key.ends_with("_ms") {
        format!("{} ms", grouped(n))
    } else if key.ends_with("_s") {
        span_text(n)
    } else {
        grouped(n)
    }
}

/// `journal_commits` → `journal commits`, `snapshot_age_s` → `snapshot age`.
fn label(key: &str) -> String {
    let bare = ["_us", "_ms", "_s"]
        .iter()
        .find_map(|u| key.strip_suffix(u))
        .unwrap_or(key);
    bare.replace('_', " ")
}

/// `"added sip:x (worker 0, slot 17)"`.
fn render_add(r: &Value, out: &mut dyn Write) -> io::Result<()> {
    let status = r.get("status").and_then(Value::as_str).unwrap_or("done");
    write!(out, "{status} {}", text(r.get("uri")))?;
    if let Some(aor) = r.get("aor").and_then(Value::as_str) {
        write!(out, " (AoR {aor})")?;
    }
    match (
        r.get("worker").and_then(Value::as_u64),
        r.get("slot").and_then(Value::as_u64),
    ) {
        (Some(w), Some(s)) => writeln!(out, ": worker {w}, slot {s}"),
        _ => writeln!(out),
    }
}

fn answered(c: &Value) -> bool {
    c.get("answered").and_then(Value::as_u64).unwrap_or(0) > 0
}

/// A contact object as `key: value` lines, RTTs in ms; fields this version
/// does not know are listed at the end as they are.
pub fn render_contact(c: &Value, out: &mut dyn Write) -> io::Result<()> {
    let Some(o) = c.as_object() else {
        return writeln!(out, "{c}");
    };
    let u = |k: &str| o.get(k).and_then(Value::as_u64);
    let line =
        |out: &mut dyn Write, k: &str, v: String| writeln!(out, "{:<11} {v}", format!("{k}:"));
    line(out, "uri", text(o.get("uri")))?;
    line(out, "aor", text(o.get("aor")))?;
    let mut state = text(o.get("state"));
    if let Some(m) = u("misses").filter(|&m| m > 0) {
        state.push_str(&format!(" ({m} missed in a row)"));
    }
    line(out, "state", state)?;
    let mut dest = text(o.get("dest"));
    if let (Some(w), Some(s)) = (u("worker"), u("slot")) {
        dest.push_str(&format!(" (worker {w}, slot {s})"));
    }
    line(out, "dest", dest)?;
    line(out, "received", text(o.get("received")))?;
    line(out, "path", text(o.get("path")))?;
    line(out, "owner", text(o.get("owner")))?;
    line(out, "source", text(o.get("source")))?;
    // How it is pinged as the proxy: shown when set.
    for (key, label) in [
        ("socket", "socket"),
        ("ping_source", "pings from"),
        ("keepalive", "keepalive"),
    ] {
        if o.get(key).is_some_and(|v| !v.is_null()) {
            line(out, label, text(o.get(key)))?;
        }
    }
    if let Some(i) = u("interval_ms") {
        let v = if i % 1000 == 0 {
            format!("{} s", grouped(i / 1000))
        } else {
            format!("{:.3} s", i as f64 / 1000.0)
        };
        line(out, "interval", v)?;
    }
    if let (Some(sent), Some(ans)) = (u("sent"), u("answered")) {
        let mut v = format!("sent {}, answered {}", grouped(sent), grouped(ans));
        if sent > 0 {
            v.push_str(&format!(" ({:.1}%)", ans as f64 * 100.0 / sent as f64));
        }
        line(out, "pings", v)?;
    }
    match u("last_code") {
        Some(code) if code > 0 => line(out, "last code", code.to_string())?,
        _ => line(out, "last code", "-".to_string())?,
    }
    if answered(c) {
        line(
            out,
            "rtt",
            format!(
                "last {}, srtt {}, rttvar {}, min {}, max {}",
                ms_text(u("rtt_last_us")),
                ms_text(u("srtt_us")),
                ms_text(u("rttvar_us")),
                ms_text(u("rtt_min_us")),
                ms_text(u("rtt_max_us"))
            ),
        )?;
    } else {
        line(out, "rtt", "- (no reply yet)".to_string())?;
    }
    line(out, "last ping", text(o.get("last_ping")))?;
    line(out, "last reply", text(o.get("last_reply")))?;
    const SHOWN: [&str; 26] = [
        "uri",
        "aor",
        "state",
        "misses",
        "dest",
        "worker",
        "slot",
        "received",
        "path",
        "owner",
        "source",
        "socket",
        "ping_source",
        "keepalive",
        "interval_ms",
        "sent",
        "answered",
        "last_code",
        "rtt_last_us",
        "srtt_us",
        "rttvar_us",
        "rtt_min_us",
        "rtt_max_us",
        "last_ping",
        "last_reply",
        "generation",
    ];
    for (k, v) in o.iter().filter(|(k, _)| !SHOWN.contains(&k.as_str())) {
        line(out, k, figure(k, v))?;
    }
    Ok(())
}

/// `keepalive.stats` as one line of grouped figures per section.
pub fn render_stats(r: &Value, out: &mut dyn Write) -> io::Result<()> {
    let Some(o) = r.as_object() else {
        return writeln!(out, "{r}");
    };
    // Known sections and, inside each, the figures that matter first.
    const SECTIONS: [(&str, &str, &[&str]); 4] = [
        ("contacts", "contacts", &["total", "up", "down", "unknown"]),
        (
            "pings",
            "pings",
            &["sent", "matched", "timed_out", "late", "stray", "forged"],
        ),
        ("rtt_us", "rtt", &["p50", "p90", "p99"]),
        (
            "control",
            "control",
            &[
                "connections",
                "requests",
                "adds",
                "dels",
                "journal_commits",
                "journal_records",
                "snapshot_age_s",
            ],
        ),
    ];
    let section =
        |out: &mut dyn Write, name: &str, key: &str, m: &Map<String, Value>, first: &[&str]| {
            let unit_us = key.ends_with("_us");
            let mut pairs = Vec::new();
            let ordered = first
                .iter()
                .filter_map(|k| m.get_key_value(*k))
                .chain(m.iter().filter(|(k, _)| !first.contains(&k.as_str())));
            for (k, v) in ordered {
                let value = if unit_us {
                    v.as_u64()
                        .map_or_else(|| text(Some(v)), |n| ms_text(Some(n)))
                } else {
                    figure(k, v)
                };
                pairs.push(format!("{} {value}", label(k)));
            }
            writeln!(out, "{name:<10}{}", pairs.join("  "))
        };
    for (key, name, first) in SECTIONS {
        if let Some(Value::Object(m)) = o.get(key) {
            section(out, name, key, m, first)?;
        }
    }
    for (k, v) in o {
        if let Value::Object(m) = v {
            if !SECTIONS.iter().any(|(key, _, _)| key == k) {
                section(out, &label(k), k, m, &[])?;
            }
        }
    }
    let scalars: Vec<String> = ["uptime_s", "workers", "backend"]
        .iter()
        .filter_map(|k| o.get_key_value(*k))
        .chain(o.iter().filter(|(k, v)| {
            !v.is_object() && !["uptime_s", "workers", "backend"].contains(&k.as_str())
        }))
        .map(|(k, v)| format!("{} {}", label(k), figure(k, v)))
        .collect();
    if !scalars.is_empty() {
        writeln!(out, "{:<10}{}", "daemon", scalars.join("  "))?;
    }
    Ok(())
}

/// One event (the params of a `keepalive.event` notification) as a line:
/// `TIME  URI  old -> new  reason[, rtt X ms][, code N][, misses M]  DEST (worker W, slot S)`.
pub fn event_line(e: &Value) -> String {
    let u = |k: &str| e.get(k).and_then(Value::as_u64);
    let mut s = format!(
        "{}  {}  {} -> {}  {}",
        text(e.get("time")),
        text(e.get("uri")),
        text(e.get("old")),
        text(e.get("new")),
        text(e.get("reason"))
    );
    if let Some(rtt) = u("rtt_us") {
        s.push_str(&format!(", rtt {}", ms_text(Some(rtt))));
    }
    if let Some(code) = u("code") {
        s.push_str(&format!(", code {code}"));
    }
    if let Some(m) = u("misses").filter(|&m| m > 0) {
        s.push_str(&format!(", misses {m}"));
    }
    s.push_str(&format!("  {}", text(e.get("dest"))));
    if let (Some(w), Some(sl)) = (u("worker"), u("slot")) {
        s.push_str(&format!(" (worker {w}, slot {sl})"));
    }
    s
}

fn subscribe(client: &mut Client, json: bool, out: &mut dyn Write) -> Result<(), Failure> {
    client
        .call("keepalive.subscribe", Value::Null)
        .map_err(|e| e.describe("keepalive.subscribe", None))?;
    // Events come when contacts change state: wait as long as it takes.
    client
        .set_timeout(None)
        .map_err(|e| e.describe("keepalive.subscribe", None))?;
    if !json {
        eprintln!(
            "kaping: subscribed to {}; state changes follow (Ctrl-C to stop)",
            client.path().display()
        );
    }
    loop {
        let n = client
            .next_notification()
            .map_err(|e| e.describe("keepalive.subscribe", None))?;
        let Some(n) = n else {
            return Err(Failure::Msg(format!(
                "{}: the daemon closed the subscription",
                client.path().display()
            )));
        };
        if n.get("method").and_then(Value::as_str) != Some("keepalive.event") {
            continue;
        }
        let event = n.get("params").unwrap_or(&Value::Null);
        if json {
            writeln!(out, "{event}")?;
        } else {
            writeln!(out, "{}", event_line(event))?;
        }
        // Each line as it happens, also into a pipe.
        out.flush()?;
    }
}

// ---------------------------------------------------------------------------
// keepalive.add --file
// ---------------------------------------------------------------------------

/// `keepalive.add` params for a contact read from a file.
pub fn add_params(spec: &ContactSpec, owner: Option<&str>, interval: Option<Duration>) -> Value {
    let mut p = Map::new();
    p.insert("uri".into(), spec.uri.as_str().into());
    put_opt(&mut p, "aor", spec.aor.as_deref());
    // An explicit destination outranks `received` in the loader's order;
    // the protocol's `received` is that "send here" address.
    match spec.send_to {
        Some(addr) => {
            p.insert("received".into(), addr.to_string().into());
        }
        None => put_opt(&mut p, "received", spec.received.as_deref()),
    }
    put_opt(&mut p, "path", spec.path.as_deref());
    if let Some(i) = spec.interval.or(interval) {
        p.insert("interval".into(), json!(i.as_secs_f64()));
    }
    put_opt(&mut p, "owner", owner);
    put_opt(&mut p, "socket", spec.socket.as_deref());
    let source = spec.source.map(|s| s.to_string());
    put_opt(&mut p, "source", source.as_deref());
    put_opt(&mut p, "keepalive", spec.keepalive.map(|k| k.name()));
    Value::Object(p)
}

/// An add the daemon refused.
#[derive(Clone, Debug, PartialEq)]
pub struct FailedAdd {
    /// 1-based position among the contacts the loader handed over.
    pub ordinal: u64,
    pub uri: String,
    pub aor: Option<String>,
    pub ruid: Option<String>,
    pub error: RpcError,
    /// `file:line` (or the ul.dump AoR and contact) once located.
    pub place: String,
}

/// What `keepalive.add --file` did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FileAddSummary {
    pub file: String,
    pub format: String,
    pub sent: u64,
    pub batches: u64,
    pub added: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub failed: u64,
    /// Records the loader could not parse (never sent).
    pub skipped: u64,
    pub seconds: f64,
    pub adds_per_s: f64,
    /// The first failures: `{place, code, message}`.
    pub errors: Vec<Value>,
    /// The first loader problems, `file:line: why`.
    pub problems: Vec<String>,
}

/// Sends every contact of `path` as `keepalive.add` batches of `batch_len`
/// (at least 1; a zero is a caller bug and panics).
/// `Err` only when the run could not go on (transport failure, unreadable
/// file); refused contacts are counted in the summary.
pub fn add_from_file(
    client: &mut Client,
    path: &Path,
    format: Format,
    batch_len: usize,
    owner: Option<&str>,
    interval: Option<Duration>,
) -> Result<(FileAddSummary, Vec<FailedAdd>), String> {
    assert!(batch_len > 0, "a batch holds at least one add");
    let started = Instant::now();
    let mut sender = BatchSender {
        client,
        batch_len,
        calls: Vec::with_capacity(batch_len),
        ruids: Vec::with_capacity(batch_len),
        sent: 0,
        summary: FileAddSummary::default(),
        failures: Vec::new(),
    };
    let mut fatal = None;
    let report = sources::load(path, format, |spec| {
        sender
            .calls
            .push(("keepalive.add", add_params(&spec, owner, interval)));
        sender.ruids.push(spec.ruid);
        if sender.calls.len() >= sender.batch_len {
            if let Err(e) = sender.flush() {
                fatal = Some(e.clone());
                return Verdict::Stop(e);
            }
        }
        Verdict::Loaded
    })
    .map_err(|e| e.to_string())?;
    if let Some(e) = fatal {
        return Err(e);
    }
    sender.flush()?;
    let BatchSender {
        mut summary,
        mut failures,
        ..
    } = sender;
    let format = report.format.unwrap_or(format);
    locate_failures(path, format, &report, &mut failures);
    summary.file = path.display().to_string();
    summary.format = format_name(format).to_string();
    summary.skipped = report.skipped as u64;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.adds_per_s = summary.sent as f64 / summary.seconds.max(1e-9);
    summary.errors = failures
        .iter()
        .map(|f| json!({"place": f.place, "code": f.error.code, "message": f.error.message}))
        .collect();
    summary.problems = report
        .problems
        .iter()
        .take(PROBLEMS_SHOWN)
        .cloned()
        .collect();
    Ok((summary, failures))
}

struct BatchSender<'a> {
    client: &'a mut Client,
    batch_len: usize,
    calls: Vec<(&'static str, Value)>,
    ruids: Vec<Option<String>>,
    sent: u64,
    summary: FileAddSummary,
    failures: Vec<FailedAdd>,
}

impl BatchSender<'_> {
    fn flush(&mut self) -> Result<(), String> {
        if self.calls.is_empty() {
            return Ok(());
        }
        let results = self.client.batch(&self.calls).map_err(|e| {
            format!(
                "after {} acknowledged adds: {}",
                self.summary.added + self.summary.updated + self.summary.unchanged,
                e.describe("keepalive.add", None)
            )
        })?;
        self.summary.batches += 1;
        for (k, r) in results.into_iter().enumerate() {
            self.sent += 1;
            match r {
                Ok(v) => match v.get("status").and_then(Value::as_str) {
                    Some("updated") => self.summary.updated += 1,
                    Some("unchanged") => self.summary.unchanged += 1,
                    _ => self.summary.added += 1,
                },
                Err(error) => {
                    self.summary.failed += 1;
                    if self.failures.len() < ERRORS_SHOWN {
                        let p = &self.calls[k].1;
                        let s = |n: &str| p.get(n).and_then(Value::as_str).map(str::to_string);
                        self.failures.push(FailedAdd {
                            ordinal: self.sent,
                            uri: s("uri").unwrap_or_default(),
                            aor: s("aor"),
                            ruid: self.ruids[k].take(),
                            error,
                            place: String::new(),
                        });
                    }
                }
            }
        }
        self.summary.sent = self.sent;
        self.calls.clear();
        self.ruids.clear();
        Ok(())
    }
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Auto => "auto",
        Format::Lines => "lines",
        Format::Jsonl => "jsonl",
        Format::UlDump => "uldump",
    }
}

/// Names where each failed contact is in the file. The loader hands over
/// contacts in file order, one per record line that parsed; a record line
/// is a line with a URI before any `#` (plain format) or a non-blank line
/// (JSON lines). Lines the loader refused are in its report (`file:N: ..`),
/// so the k-th contact is the k-th record line not among them — exact as
/// long as the report kept every refusal (at most `PROBLEMS_KEPT`); beyond
/// that the contact is named by its position instead. `ul.dump` contacts
/// are named by AoR and URI (and ruid), as the loader names them.
fn locate_failures(path: &Path, format: Format, report: &LoadReport, failures: &mut [FailedAdd]) {
    if failures.is_empty() {
        return;
    }
    let p = path.display().to_string();
    let by_position = |f: &mut FailedAdd| f.place = format!("{p}: contact #{}", f.ordinal);
    match format {
        Format::UlDump | Format::Auto => {
            for f in failures.iter_mut() {
                f.place = match (&f.aor, &f.ruid) {
                    (Some(a), Some(r)) => format!("{p}: AoR '{a}' contact {} ({r})", f.uri),
                    (Some(a), None) => format!("{p}: AoR '{a}' contact {}", f.uri),
                    _ => format!("{p}: contact {}", f.uri),
                };
            }
            return;
        }
        Format::Lines | Format::Jsonl => {}
    }
    // Only parse refusals are in the report here (the sink never refuses).
    let refused: Vec<usize> = report
        .problems
        .iter()
        .filter_map(|m| {
            m.strip_prefix(&p)?
                .strip_prefix(':')?
                .split(':')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    if refused.len() != report.skipped {
        failures.iter_mut().for_each(by_position);
        return;
    }
    let Ok(file) = File::open(path) else {
        failures.iter_mut().for_each(by_position);
        return;
    };
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let (mut line_no, mut ordinal) = (0usize, 0u64);
    let mut next = 0;
    while next < failures.len() {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        line_no += 1;
        let line = String::from_utf8_lossy(&buf);
        let is_record = match format {
            Format::Lines => line.split('#').next().is_some_and(|c| !c.trim().is_empty()),
            _ => !line.trim().is_empty(),
        };
        if !is_record || refused.binary_search(&line_no).is_ok() {
            continue;
        }
        ordinal += 1;
        while next < failures.len() && failures[next].ordinal == ordinal {
            failures[next].place = format!("{p}:{line_no}");
            next += 1;
        }
    }
    failures[next..].iter_mut().for_each(by_position);
}

fn add_file(
    client: &mut Client,
    a: &AddArgs,
    file: &Path,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let batch_len = a.batch.map_or(BATCH_DEFAULT, |b| b as usize);
    let (summary, failures) = add_from_file(
        client,
        file,
        a.format.unwrap_or(Format::Auto),
        batch_len,
        a.owner.as_deref(),
        a.interval,
    )?;
    if json {
        let text = serde_json::to_string(&summary).map_err(|e| e.to_string())?;
        writeln!(out, "{text}")?;
    } else {
        render_file_summary(&summary, &failures, out)?;
    }
    if summary.failed > 0 || summary.skipped > 0 {
        return Err(Failure::Msg(format!(
            "{}: {} of {} contacts not added ({} refused by the daemon, {} unreadable)",
            summary.file,
            grouped(summary.failed + summary.skipped),
            grouped(summary.sent + summary.skipped),
            grouped(summary.failed),
            grouped(summary.skipped)
        )));
    }
    Ok(())
}

/// The readable summary of `keepalive.add --file`.
pub fn render_file_summary(
    s: &FileAddSummary,
    failures: &[FailedAdd],
    out: &mut dyn Write,
) -> io::Result<()> {
    writeln!(
        out,
        "{}: {} contacts sent in {} batch{} in {:.2} s ({}/s): {} added, {} updated, {} unchanged, {} failed",
        s.file,
        grouped(s.sent),
        grouped(s.batches),
        if s.batches == 1 { "" } else { "es" },
        s.seconds,
        grouped(s.adds_per_s as u64),
        grouped(s.added),
        grouped(s.updated),
        grouped(s.unchanged),
        grouped(s.failed)
    )?;
    for f in failures {
        writeln!(
            out,
            "  {}: {}",
            f.place,
            f.error.describe("keepalive.add", Some(&f.uri))
        )?;
    }
    if s.failed > failures.len() as u64 {
        writeln!(
            out,
            "  ... and {} more refused",
            grouped(s.failed - failures.len() as u64)
        )?;
    }
    if s.skipped > 0 {
        writeln!(
            out,
            "{}: {} record{} not sent (unreadable):",
            s.file,
            grouped(s.skipped),
            plural(s.skipped)
        )?;
        for p in &s.problems {
            writeln!(out, "  {p}")?;
        }
        if s.skipped > s.problems.len() as u64 {
            writeln!(
                out,
                "  ... and {} more",
                grouped(s.skipped - s.problems.len() as u64)
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(f: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> String {
        let mut out = Vec::new();
        f(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn rpc_errors_name_the_method_once() {
        let e = RpcError {
            code: -32002,
            message: "keepalive.del sip:x: not found".into(),
            data: None,
        };
        assert_eq!(
            e.describe("keepalive.del", Some("sip:x")),
            "keepalive.del sip:x: not found (code -32002)"
        );
        let e = RpcError {
            code: -32002,
            message: "not found".into(),
            data: None,
        };
        assert_eq!(
            e.describe("keepalive.del", Some("sip:x")),
            "keepalive.del sip:x: not found (code -32002)"
        );
        assert_eq!(
            e.describe("keepalive.stats", None),
            "keepalive.stats: not found (code -32002)"
        );
        assert_eq!(
            RpcError::from_value(&json!({"code": 1.5, "message": "x"})),
            None
        );
        assert_eq!(RpcError::from_value(&json!({"code": 5})), None);
    }

    #[test]
    fn connect_errors_say_what_to_do() {
        let p = Path::new("/run/kaping/ctl.sock");
        let m = connect_hint(p, &io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(
            m,
            "no control socket at /run/kaping/ctl.sock: is the daemon running with `kaping run --control /run/kaping/ctl.sock`?"
        );
        let m = connect_hint(p, &io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(
            m.starts_with("nothing listens on /run/kaping/ctl.sock"),
            "{m}"
        );
        assert!(
            m.contains("kaping run --control /run/kaping/ctl.sock"),
            "{m}"
        );
        let m = connect_hint(p, &io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(m.contains("0660"), "{m}");
    }

    #[test]
    fn figures_for_people() {
        assert_eq!(ms_text(Some(1234)), "1.234 ms");
        assert_eq!(ms_text(Some(12_345)), "12.3 ms");
        assert_eq!(ms_text(None), "-");
        assert_eq!(span_text(42), "42 s");
        assert_eq!(span_text(3 * 60 + 7), "3 m 07 s");
        assert_eq!(span_text(3600 + 120), "1 h 02 m");
        assert_eq!(span_text(3 * 86_400 + 4 * 3600), "3 d 04 h");
        assert_eq!(figure("sent", &json!(1_234_567)), "1,234,567");
        assert_eq!(figure("snapshot_age_s", &json!(75)), "1 m 15 s");
        assert_eq!(figure("rtt_last_us", &json!(800)), "0.800 ms");
        assert_eq!(figure("p99", &json!(2500)), "2.500 ms");
        assert_eq!(figure("backend", &json!("uring")), "uring");
        assert_eq!(label("journal_commits"), "journal commits");
        assert_eq!(label("snapshot_age_s"), "snapshot age");
    }

    fn contact() -> Value {
        json!({
            "uri": "sip:alice@198.51.100.1:5060", "aor": "sip:alice@example.com",
            "received": null, "path": null, "owner": "reg1", "interval_ms": 30000,
            "dest": "198.51.100.1:5060", "worker": 1, "slot": 17, "state": "up",
            "misses": 0, "sent": 10, "answered": 9, "rtt_last_us": 1234,
            "rtt_min_us": 900, "rtt_max_us": 20_500, "srtt_us": 1300, "rttvar_us": 100,
            "last_code": 200, "last_ping": "2026-01-01T00:00:00.000Z",
            "last_reply": "2026-01-01T00:00:00.001Z", "source": "control",
            "extra_field": 5
        })
    }

    #[test]
    fn a_contact_reads_as_key_value_lines() {
        let text = render(|o| render_contact(&contact(), o));
        let want = "\
uri:        sip:alice@198.51.100.1:5060
aor:        sip:alice@example.com
state:      up
dest:       198.51.100.1:5060 (worker 1, slot 17)
received:   -
path:       -
owner:      reg1
source:     control
interval:   30 s
pings:      sent 10, answered 9 (90.0%)
last code:  200
rtt:        last 1.234 ms, srtt 1.300 ms, rttvar 0.100 ms, min 0.900 ms, max 20.5 ms
last ping:  2026-01-01T00:00:00.000Z
last reply: 2026-01-01T00:00:00.001Z
extra_field: 5
";
        assert_eq!(text, want);
        let mut silent = contact();
        silent["answered"] = json!(0);
        silent["state"] = json!("down");
        silent["misses"] = json!(3);
        silent["last_code"] = json!(0);
        let text = render(|o| render_contact(&silent, o));
        assert!(
            text.contains("state:      down (3 missed in a row)\n"),
            "{text}"
        );
        assert!(text.contains("rtt:        - (no reply yet)\n"), "{text}");
        assert!(text.contains("last code:  -\n"), "{text}");
    }

    #[test]
    fn stats_read_as_grouped_sections() {
        let stats = json!({
            "contacts": {"total": 1_000_000, "unknown": 500, "up": 999_000, "down": 500},
            "pings": {"sent": 12_345_678, "matched": 12_000_000, "timed_out": 345_678,
                      "late": 0, "stray": 1, "forged": 0, "rate_limited": 2},
            "rtt_us": {"p50": 1234, "p90": 2000, "p99": 15_000},
            "control": {"connections": 1, "requests": 2000, "adds": 200_000, "dels": 0,
                        "journal_commits": 200, "journal_records": 200_000, "snapshot_age_s": 12},
            "uptime_s": 3720, "workers": 2, "backend": "uring"
        });
        let text = render(|o| render_stats(&stats, o));
        let want = "\
contacts  total 1,000,000  up 999,000  down 500  unknown 500
pings     sent 12,345,678  matched 12,000,000  timed out 345,678  late 0  stray 1  forged 0  rate limited 2
rtt       p50 1.234 ms  p90 2.000 ms  p99 15.0 ms
control   connections 1  requests 2,000  adds 200,000  dels 0  journal commits 200  journal records 200,000  snapshot age 12 s
daemon    uptime 1 h 02 m  workers 2  backend uring
";
        assert_eq!(text, want);
    }

    #[test]
    fn list_table_aligns_and_json_streams_one_object() {
        let mut a = contact();
        let mut b = contact();
        b["uri"] = json!("sip:bob-with-a-longer-name@198.51.100.2:5060");
        b["aor"] = Value::Null;
        b["state"] = json!("unknown");
        b["answered"] = json!(0);
        b["owner"] = Value::Null;
        a["srtt_us"] = json!(25_000);
        let mut p = ListPrinter::new(false);
        let text = render(|o| {
            p.page(&[a.clone()], o)?;
            p.page(&[b.clone()], o)?;
            p.finish(o)
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            lines[0],
            "STATE         SRTT  CODE  DEST                   URI                          AOR                    OWNER"
        );
        assert_eq!(
            lines[1],
            "up         25.0 ms  200   198.51.100.1:5060      sip:alice@198.51.100.1:5060  sip:alice@example.com  reg1"
        );
        // A longer URI on a later page widens its own column from there on.
        assert_eq!(
            lines[2],
            "unknown          -  200   198.51.100.1:5060      sip:bob-with-a-longer-name@198.51.100.2:5060  -                      -"
        );
        assert_eq!(lines[3], "2 contacts: 1 up, 0 down, 1 unknown");

        let mut p = ListPrinter::new(true);
        let text = render(|o| {
            p.page(&[a.clone()], o)?;
            p.page(&[], o)?;
            p.page(&[b.clone()], o)?;
            p.finish(o)
        });
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["total"], 2);
        assert_eq!(v["contacts"].as_array().unwrap().len(), 2);
        assert_eq!(v["contacts"][1]["uri"], b["uri"]);
        let mut p = ListPrinter::new(true);
        let text = render(|o| p.finish(o));
        assert_eq!(text, "{\"contacts\":[],\"total\":0}\n");
    }

    #[test]
    fn events_read_as_one_line() {
        let e = json!({"time": "2026-01-01T00:00:00.000Z", "time_ms": 1, "uri": "sip:a@h",
            "dest": "192.0.2.1:5060", "worker": 0, "slot": 3, "old": "unknown", "new": "up",
            "reason": "reply", "misses": 0, "rtt_us": 1500, "code": 200});
        assert_eq!(
            event_line(&e),
            "2026-01-01T00:00:00.000Z  sip:a@h  unknown -> up  reply, rtt 1.500 ms, code 200  192.0.2.1:5060 (worker 0, slot 3)"
        );
    }

    #[test]
    fn file_contacts_become_add_params() {
        let mut spec = ContactSpec::from_uri("sip:a@192.0.2.1");
        spec.aor = Some("sip:a@example.com".into());
        spec.received = Some("sip:203.0.113.7:41022".into());
        spec.path = Some("<sip:198.51.100.9;lr>".into());
        spec.socket = Some("udp:10.0.0.1:5060".into());
        let p = add_params(&spec, Some("reg1"), Some(Duration::from_secs(30)));
        assert_eq!(
            p,
            json!({"uri": "sip:a@192.0.2.1", "aor": "sip:a@example.com",
                   "received": "sip:203.0.113.7:41022", "path": "<sip:198.51.100.9;lr>",
                   "interval": 30.0, "owner": "reg1", "socket": "udp:10.0.0.1:5060"})
        );
        // An explicit destination is where pings go: it wins over received;
        // the contact's own interval wins over the default.
        spec.send_to = Some("[2001:db8::1]:5062".parse().unwrap());
        spec.interval = Some(Duration::from_millis(500));
        let p = add_params(&spec, None, Some(Duration::from_secs(30)));
        assert_eq!(p["received"], "[2001:db8::1]:5062");
        assert_eq!(p["interval"], 0.5);
        assert!(p.get("owner").is_none());
    }

    #[test]
    fn call_params_must_be_structured() {
        assert_eq!(call_params(None).unwrap(), Value::Null);
        assert_eq!(
            call_params(Some(r#"{"uri":"x"}"#)).unwrap(),
            json!({"uri": "x"})
        );
        assert_eq!(call_params(Some(r#"["x"]"#)).unwrap(), json!(["x"]));
        assert!(call_params(Some("3"))
            .unwrap_err()
            .contains("object or array"));
        assert!(call_params(Some("{"))
            .unwrap_err()
            .contains("not valid JSON"));
    }

    #[test]
    fn failures_are_located_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.txt");
        std::fs::write(
            &path,
            "# header\nsip:a@192.0.2.1\n\nsip:b@192.0.2.2 nonsense\nsip:c@192.0.2.3 # note\n  # only a comment\nsip:d@192.0.2.4\n",
        )
        .unwrap();
        let p = path.display().to_string();
        let report = LoadReport {
            path: path.clone(),
            format: Some(Format::Lines),
            loaded: 3,
            skipped: 1,
            other_shards: 0,
            problems: vec![format!("{p}:4: destination 'nonsense' is not ip:port")],
            stopped: None,
        };
        let failed = |ordinal: u64, uri: &str| FailedAdd {
            ordinal,
            uri: uri.into(),
            aor: None,
            ruid: None,
            error: RpcError {
                code: -32001,
                message: "bad".into(),
                data: None,
            },
            place: String::new(),
        };
        let mut f = vec![failed(2, "sip:c@192.0.2.3"), failed(3, "sip:d@192.0.2.4")];
        locate_failures(&path, Format::Lines, &report, &mut f);
        assert_eq!(f[0].place, format!("{p}:5"));
        assert_eq!(f[1].place, format!("{p}:7"));
        // More refusals than the report kept: positions, not guessed lines.
        let mut lossy = report;
        lossy.skipped = 2;
        let mut f = vec![failed(2, "sip:c@192.0.2.3")];
        locate_failures(&path, Format::Lines, &lossy, &mut f);
        assert_eq!(f[0].place, format!("{p}: contact #2"));
    }
}
