//! JSON lines: one object per line with `uri` and optional `aor`,
//! `received`, `path`, `socket`, `interval` (seconds, or a string such as
//! "30s"), `send_to` (`ip:port`), `ruid`, `source` (`bind`, `socket` or
//! `IP:PORT`) and `keepalive` (`sip`, `null`, `crlf`). Unknown fields are refused so a
//! typo (`recieved`) does not silently change where pings go.

use serde::Deserialize;

use crate::contact::{ContactSpec, KeepaliveKind, PingSource};
use crate::duration::parse_duration;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    uri: String,
    aor: Option<String>,
    received: Option<String>,
    path: Option<String>,
    socket: Option<String>,
    interval: Option<Interval>,
    send_to: Option<String>,
    ruid: Option<String>,
    source: Option<String>,
    keepalive: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Interval {
    Seconds(f64),
    Text(String),
}

/// `None` for a blank line.
pub(super) fn parse(line: &str) -> Option<Result<ContactSpec, String>> {
    if line.trim().is_empty() {
        return None;
    }
    Some(parse_record(line))
}

fn parse_record(line: &str) -> Result<ContactSpec, String> {
    let r: Record = serde_json::from_str(line).map_err(|e| format!("bad JSON: {e}"))?;
    let interval = match r.interval {
        None => None,
        Some(Interval::Seconds(s)) => match crate::duration::from_seconds(s) {
            Ok(d) if s > 0.0 => Some(d),
            _ => {
                return Err(format!(
                    "interval {s} is not a positive number of seconds up to ten years"
                ))
            }
        },
        Some(Interval::Text(t)) => Some(parse_duration(&t).map_err(|e| format!("interval: {e}"))?),
    };
    let send_to = match r.send_to.as_deref() {
        None => None,
        Some(s) => Some(
            s.parse()
                .map_err(|_| format!("send_to '{s}' is not ip:port (IPv6 as [addr]:port)"))?,
        ),
    };
    let source = match r.source.as_deref() {
        None => None,
        Some(s) => Some(
            s.parse::<PingSource>()
                .map_err(|e| format!("source: {e}"))?,
        ),
    };
    let keepalive = match r.keepalive.as_deref() {
        None => None,
        Some(k) => Some(
            k.parse::<KeepaliveKind>()
                .map_err(|e| format!("keepalive: {e}"))?,
        ),
    };
    Ok(ContactSpec {
        uri: r.uri.trim().to_string(),
        aor: super::optional(r.aor.as_deref()),
        received: super::optional(r.received.as_deref()),
        path: super::optional(r.path.as_deref()),
        socket: super::optional(r.socket.as_deref()),
        interval,
        send_to,
        ruid: super::optional(r.ruid.as_deref()),
        source,
        keepalive,
    })
}
