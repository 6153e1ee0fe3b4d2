//! JSON-RPC 2.0 (<https://www.jsonrpc.org/specification>) as the control
//! socket speaks it: framing of a byte stream into JSON values, requests
//! and batches, responses and the error codes of kaping's methods.
//!
//! Framing: a client writes JSON values (a request object or a batch
//! array), usually one per line; values may also follow each other with no
//! separator, or span lines (pretty-printed). [`Framer`] finds where each
//! top-level value ends with a linear scan that survives being fed a value
//! in pieces (it remembers depth, string and escape state), so a 16 MiB
//! batch arriving in 64 KiB reads costs one pass, not one parse per read.
//! A value longer than the configured bound is refused before it is held.
//!
//! Reading requests: the methods a registrar sends by the thousand
//! (`keepalive.add`, `del`, `get`) are read straight from the text into
//! their fields ([`fast`]), without building a `serde_json::Value` tree
//! (a map and a string per member: most of a batch's parse time). Anything
//! the fast reader does not accept as plainly valid goes through the
//! `Value` reader, which alone words the errors, so both agree by
//! construction on what is refused and why.
//!
//! This is the control path: it allocates per request, never per packet.

use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

/// JSON-RPC 2.0 predefined codes.
pub const PARSE_ERROR: i32 = -32700;
pub const INVALID_REQUEST: i32 = -32600;
pub const METHOD_NOT_FOUND: i32 = -32601;
pub const INVALID_PARAMS: i32 = -32602;
pub const INTERNAL_ERROR: i32 = -32603;
/// kaping's codes (the -32000..-32099 "server error" range).
pub const BAD_CONTACT: i32 = -32001;
pub const NOT_FOUND: i32 = -32002;
pub const SLAB_FULL: i32 = -32003;
pub const TOO_LARGE: i32 = -32004;
pub const TOO_MANY_CONNECTIONS: i32 = -32005;
pub const NOT_DURABLE: i32 = -32006;
/// The contact belongs to another instance's shard (`--shard K/N`).
pub const OTHER_SHARD: i32 = -32007;

/// An error answer.
#[derive(Clone, Debug, PartialEq)]
pub struct RpcError {
    pub code: i32,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i32, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    pub fn invalid_params(message: impl Into<String>) -> RpcError {
        RpcError::new(INVALID_PARAMS, message)
    }

    /// Reads an `error` member; `None` when it is not a JSON-RPC error object.
    pub(crate) fn from_value(v: &Value) -> Option<RpcError> {
        let code = i32::try_from(v.get("code")?.as_i64()?).ok()?;
        let message = v.get("message")?.as_str()?.to_string();
        Some(RpcError {
            code,
            message,
            data: v.get("data").cloned(),
        })
    }

    /// The operator's line for this error, naming the method and what it
    /// was about (`keepalive.del sip:x: not found (code -32002)`). The
    /// server's messages usually say both already; they are not repeated.
    pub fn describe(&self, method: &str, target: Option<&str>) -> String {
        if self.message.starts_with(method) {
            return self.to_string();
        }
        match target {
            Some(t) => format!("{method} {t}: {self}"),
            None => format!("{method}: {self}"),
        }
    }

    fn to_value(&self) -> Value {
        let mut e = json!({ "code": self.code, "message": self.message });
        if let Some(d) = &self.data {
            e["data"] = d.clone();
        }
        e
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

/// One request of a message.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// `None` for a notification (no "id" member): it gets no response.
    pub id: Option<Value>,
    pub method: String,
    /// `Null` when absent, else an object or an array. Empty (taken) when
    /// `args` holds them read.
    pub params: Value,
    /// The params of the methods a registrar sends by the thousand
    /// (`keepalive.add`, `keepalive.del`), read into their fields by the
    /// connection's thread, so the daemon's main thread, which every
    /// connection shares, only applies them.
    pub args: Option<Result<Args, RpcError>>,
}

/// Read params of `keepalive.add` and the `keepalive.del`/`get` key.
#[derive(Clone, Debug, PartialEq)]
pub enum Args {
    Add(AddArgs),
    Key { uri: String, aor: Option<String> },
}

/// `keepalive.add` params, checked for type; the daemon checks the rest.
#[derive(Clone, Debug, PartialEq)]
pub struct AddArgs {
    pub uri: String,
    pub aor: Option<String>,
    pub received: Option<String>,
    pub path: Option<String>,
    pub interval: Option<std::time::Duration>,
    pub owner: Option<String>,
    /// The socket the contact registered on (`udp:IP:PORT`).
    pub socket: Option<String>,
    /// Where its pings leave from (`bind`, `socket`, `IP:PORT`).
    pub source: Option<String>,
    /// What is sent (`sip`, `null`, `crlf`).
    pub keepalive: Option<String>,
}

/// Positional order of the `keepalive.add` params.
pub const ADD_PARAMS: &[&str] = &[
    "uri",
    "aor",
    "received",
    "path",
    "interval",
    "owner",
    "socket",
    "source",
    "keepalive",
];
/// Positional order of a contact's key (`del`, `get`).
pub const KEY_PARAMS: &[&str] = &["uri", "aor"];

impl Args {
    /// Whether `method`'s params are read into [`Args`].
    pub fn reads(method: &str) -> bool {
        matches!(method, "keepalive.add" | "keepalive.del" | "keepalive.get")
    }

    /// Reads the params of one of the methods [`Args::reads`].
    pub fn read(method: &str, params: Value) -> Result<Args, RpcError> {
        match method {
            "keepalive.add" => AddArgs::read(params).map(Args::Add),
            "keepalive.del" => Args::read_key(params, "keepalive.del"),
            _ => Args::read_key(params, "keepalive.get"),
        }
    }

    fn read_key(params: Value, method: &'static str) -> Result<Args, RpcError> {
        let mut p = Params::new(params, method, KEY_PARAMS)?;
        Ok(Args::Key {
            uri: p.req_str("uri")?,
            aor: p.opt_str("aor")?,
        })
    }
}

impl AddArgs {
    pub fn read(params: Value) -> Result<AddArgs, RpcError> {
        let mut p = Params::new(params, "keepalive.add", ADD_PARAMS)?;
        Ok(AddArgs {
            uri: p.req_str("uri")?,
            aor: p.opt_str("aor")?,
            received: p.opt_str("received")?,
            path: p.opt_str("path")?,
            interval: p.opt_duration("interval")?,
            owner: p.opt_str("owner")?,
            socket: p.opt_str("socket")?,
            source: p.opt_str("source")?,
            keepalive: p.opt_str("keepalive")?,
        })
    }
}

/// A message: one request, or a batch. Entries that are not valid requests
/// are kept in place as their error, so responses keep the batch's order.
#[derive(Clone, Debug, PartialEq)]
// One message is read and handled at a time, never stored in bulk: the
// size of a single call beside a batch's pointer costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Message {
    Single(Result<Call, RpcError>),
    Batch(Vec<Result<Call, RpcError>>),
}

/// Reads one request object.
fn call_of(v: Value) -> Result<Call, RpcError> {
    let Value::Object(mut o) = v else {
        return Err(RpcError::new(
            INVALID_REQUEST,
            "a request must be a JSON object",
        ));
    };
    if o.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(RpcError::new(
            INVALID_REQUEST,
            "missing \"jsonrpc\": \"2.0\"",
        ));
    }
    let id = match o.remove("id") {
        None => None,
        Some(id @ (Value::Null | Value::Number(_) | Value::String(_))) => Some(id),
        Some(_) => {
            return Err(RpcError::new(
                INVALID_REQUEST,
                "\"id\" must be a string, a number or null",
            ))
        }
    };
    let method = match o.remove("method") {
        Some(Value::String(m)) => m,
        _ => {
            return Err(RpcError::new(
                INVALID_REQUEST,
                "\"method\" must be a string",
            ))
        }
    };
    let params = match o.remove("params") {
        None => Value::Null,
        Some(p @ (Value::Object(_) | Value::Array(_))) => p,
        Some(_) => {
            return Err(RpcError::new(
                INVALID_REQUEST,
                "\"params\" must be an object or an array",
            ))
        }
    };
    let (params, args) = if Args::reads(&method) {
        (Value::Null, Some(Args::read(&method, params)))
    } else {
        (params, None)
    };
    Ok(Call {
        id,
        method,
        params,
        args,
    })
}

/// Interprets one framed JSON text. A syntax error is `Err` (the caller
/// answers `PARSE_ERROR` and closes: the stream cannot be resynchronized).
pub fn parse_message(text: &[u8]) -> Result<Message, RpcError> {
    if let Some(m) = fast::message(text) {
        return Ok(m);
    }
    parse_message_values(text)
}

/// The fast reader alone: `None` where it declines (the fuzz target checks
/// that whatever it accepts, the `Value` reader reads the same).
#[doc(hidden)]
pub fn parse_message_fast(text: &[u8]) -> Option<Message> {
    fast::message(text)
}

/// [`parse_message`] through a `Value` tree: every input, every error.
pub fn parse_message_values(text: &[u8]) -> Result<Message, RpcError> {
    let v: Value = serde_json::from_slice(text)
        .map_err(|e| RpcError::new(PARSE_ERROR, format!("invalid JSON: {e}")))?;
    Ok(match v {
        Value::Array(items) if items.is_empty() => {
            Message::Single(Err(RpcError::new(INVALID_REQUEST, "empty batch")))
        }
        Value::Array(items) => Message::Batch(items.into_iter().map(call_of).collect()),
        other => Message::Single(call_of(other)),
    })
}

/// A success response (one line of JSON, no newline).
pub fn response(id: &Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

/// An error response; `id` is `Null` when the request's id is unknown.
pub fn error_response(id: &Value, e: &RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": e.to_value() })
}

/// A notification from server to client (subscriptions).
pub fn notification(method: &str, params: Value) -> Value {
    json!({ "jsonrpc": "2.0", "method": method, "params": params })
}

/// Named parameters of a call, whether given as an object or by position
/// (`order` names the positions). Unknown names are refused, so a typo is
/// an error, not a silently ignored setting.
pub struct Params {
    map: Map<String, Value>,
    method: &'static str,
}

impl Params {
    pub fn new(params: Value, method: &'static str, order: &[&str]) -> Result<Params, RpcError> {
        let map = match params {
            Value::Null => Map::new(),
            Value::Object(m) => {
                if let Some(k) = m.keys().find(|k| !order.contains(&k.as_str())) {
                    return Err(RpcError::invalid_params(format!(
                        "{method}: unknown parameter \"{k}\" (expected {})",
                        if order.is_empty() {
                            "none".to_string()
                        } else {
                            order.join(", ")
                        }
                    )));
                }
                m
            }
            Value::Array(items) => {
                if items.len() > order.len() {
                    return Err(RpcError::invalid_params(format!(
                        "{method}: {} positional parameters, at most {} ({})",
                        items.len(),
                        order.len(),
                        order.join(", ")
                    )));
                }
                order
                    .iter()
                    .zip(items)
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.to_string(), v))
                    .collect()
            }
            _ => {
                return Err(RpcError::invalid_params(
                    "params must be an object or an array",
                ))
            }
        };
        Ok(Params { map, method })
    }

    /// An optional string parameter (null = absent). Newlines are refused:
    /// they cannot appear in SIP header values and would break the key.
    pub fn opt_str(&mut self, name: &str) -> Result<Option<String>, RpcError> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => {
                let s = s.trim();
                if s.contains(['\r', '\n', '\0']) {
                    return Err(RpcError::invalid_params(format!(
                        "{}: \"{name}\" contains a line break or NUL",
                        self.method
                    )));
                }
                Ok((!s.is_empty()).then(|| s.to_string()))
            }
            Some(other) => Err(RpcError::invalid_params(format!(
                "{}: \"{name}\" must be a string, not {other}",
                self.method
            ))),
        }
    }

    pub fn req_str(&mut self, name: &str) -> Result<String, RpcError> {
        self.opt_str(name)?.ok_or_else(|| {
            RpcError::invalid_params(format!("{}: \"{name}\" is required", self.method))
        })
    }

    /// An optional non-negative integer parameter.
    pub fn opt_u64(&mut self, name: &str) -> Result<Option<u64>, RpcError> {
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                RpcError::invalid_params(format!(
                    "{}: \"{name}\" must be a non-negative integer, not {v}",
                    self.method
                ))
            }),
        }
    }

    /// An optional duration: seconds as a number, or text ("30s", "500ms").
    pub fn opt_duration(&mut self, name: &str) -> Result<Option<std::time::Duration>, RpcError> {
        let bad =
            |why: String| RpcError::invalid_params(format!("{}: \"{name}\": {why}", self.method));
        match self.map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_f64().map(positive_seconds) {
                Some(Some(d)) => Ok(Some(d)),
                _ => Err(bad(format!(
                    "{n} is not a positive number of seconds up to ten years"
                ))),
            },
            Some(Value::String(s)) => crate::duration::parse_duration(&s)
                .map(Some)
                .map_err(|e| bad(e.to_string())),
            Some(other) => Err(bad(format!(
                "must be seconds or a duration text, not {other}"
            ))),
        }
    }
}

/// The fast reader: requests read from borrowed text in one pass, no
/// `Value` tree. Returns `None` for anything it does not accept as plainly
/// valid (any serde error, an unknown or duplicate member, a type it does
/// not expect); the caller then reads the same text through `Value`s, which
/// says what is wrong. It must never accept what the `Value` reader
/// refuses, nor read a field differently (tests compare the two).
mod fast {
    use super::*;
    use serde::de::{self, MapAccess, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer};
    use std::borrow::Cow;
    use std::fmt;

    /// A request object's members. Others are ignored, as the `Value`
    /// reader ignores them. Names and the strings kept are borrowed from
    /// the text (serde's `Cow<str>` would allocate each); one with escapes
    /// cannot be, and goes the `Value` way.
    #[derive(Default)]
    struct WireCall<'a> {
        jsonrpc: Option<&'a str>,
        id: Option<&'a RawValue>,
        method: Option<&'a str>,
        params: WireParams<'a>,
    }

    impl<'de: 'a, 'a> Deserialize<'de> for WireCall<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = WireCall<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a request object")
                }
                // Only `visit_map`: a request written as an array is refused
                // (a derived struct would also take a sequence).
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                    let mut w = WireCall::default();
                    let mut seen = [false; 4];
                    while let Some(k) = m.next_key::<&'de str>()? {
                        let i = match k {
                            "jsonrpc" => 0,
                            "id" => 1,
                            "method" => 2,
                            "params" => 3,
                            _ => {
                                m.next_value::<de::IgnoredAny>()?;
                                continue;
                            }
                        };
                        if std::mem::replace(&mut seen[i], true) {
                            return Err(de::Error::custom("duplicate member"));
                        }
                        match i {
                            0 => w.jsonrpc = Some(m.next_value()?),
                            1 => w.id = Some(m.next_value()?),
                            2 => w.method = Some(m.next_value()?),
                            _ => w.params = m.next_value()?,
                        }
                    }
                    Ok(w)
                }
            }
            d.deserialize_map(V)
        }
    }

    /// A parameter value of the read methods.
    enum Param<'a> {
        Null,
        Str(Cow<'a, str>),
        Num(f64),
    }

    impl<'de: 'a, 'a> Deserialize<'de> for Param<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Param<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("null, a string or a number")
                }
                fn visit_unit<E>(self) -> Result<Param<'de>, E> {
                    Ok(Param::Null)
                }
                fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Param<'de>, E> {
                    Ok(Param::Str(Cow::Borrowed(v)))
                }
                fn visit_str<E>(self, v: &str) -> Result<Param<'de>, E> {
                    Ok(Param::Str(Cow::Owned(v.to_string())))
                }
                fn visit_string<E>(self, v: String) -> Result<Param<'de>, E> {
                    Ok(Param::Str(Cow::Owned(v)))
                }
                fn visit_u64<E>(self, v: u64) -> Result<Param<'de>, E> {
                    Ok(Param::Num(v as f64))
                }
                fn visit_i64<E>(self, v: i64) -> Result<Param<'de>, E> {
                    Ok(Param::Num(v as f64))
                }
                fn visit_f64<E>(self, v: f64) -> Result<Param<'de>, E> {
                    Ok(Param::Num(v))
                }
            }
            d.deserialize_any(V)
        }
    }

    /// The params of add/del/get by name or by position (`ADD_PARAMS`
    /// order, whose first two are `KEY_PARAMS`). Absent: all `None`.
    #[derive(Default)]
    struct WireParams<'a> {
        values: [Option<Param<'a>>; 9],
        /// Positional params given (0 when by name).
        positional: usize,
        /// Whether the member was present (`{}`/`[]` included).
        present: bool,
    }

    impl<'de: 'a, 'a> Deserialize<'de> for WireParams<'a> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = WireParams<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("the params of keepalive.add, del or get")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                    let mut p = WireParams {
                        present: true,
                        ..WireParams::default()
                    };
                    while let Some(k) = m.next_key::<&'de str>()? {
                        let i = ADD_PARAMS
                            .iter()
                            .position(|n| *n == k)
                            .ok_or_else(|| de::Error::custom("unknown"))?;
                        if p.values[i].is_some() {
                            return Err(de::Error::custom("duplicate"));
                        }
                        p.values[i] = Some(m.next_value()?);
                    }
                    Ok(p)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
                    let mut p = WireParams {
                        present: true,
                        ..WireParams::default()
                    };
                    while let Some(v) = s.next_element::<Param<'de>>()? {
                        let slot = p
                            .values
                            .get_mut(p.positional)
                            .ok_or_else(|| de::Error::custom("too many"))?;
                        *slot = Some(v);
                        p.positional += 1;
                    }
                    Ok(p)
                }
            }
            d.deserialize_any(V)
        }
    }

    pub(super) fn message(text: &[u8]) -> Option<Message> {
        // One UTF-8 check of the whole text, not one per string read.
        let text = std::str::from_utf8(text).ok()?;
        let first = text.bytes().find(|b| !b.is_ascii_whitespace())?;
        Some(match first {
            b'[' => {
                let calls: Vec<WireCall> = serde_json::from_str(text).ok()?;
                if calls.is_empty() {
                    return None;
                }
                Message::Batch(
                    calls
                        .into_iter()
                        .map(|w| call(w).map(Ok))
                        .collect::<Option<_>>()?,
                )
            }
            b'{' => Message::Single(Ok(call(serde_json::from_str(text).ok()?)?)),
            _ => return None,
        })
    }

    /// One request, if it is a plainly valid one of the read methods (or
    /// one without params).
    fn call(w: WireCall) -> Option<Call> {
        if w.jsonrpc != Some("2.0") {
            return None;
        }
        let id = match w.id {
            None => None,
            Some(raw) => match raw.get().as_bytes().first()? {
                b'n' | b'"' | b'-' | b'0'..=b'9' => Some(serde_json::from_str(raw.get()).ok()?),
                _ => return None,
            },
        };
        let method = w.method?.to_string();
        let args = if Args::reads(&method) {
            Some(Ok(args(&method, w.params)?))
        } else if w.params.present {
            return None; // other methods' params are read as `Value`s
        } else {
            None
        };
        Some(Call {
            id,
            method,
            params: Value::Null,
            args,
        })
    }

    /// An optional string parameter as `Params::opt_str` reads it, or
    /// `None` when that would refuse it.
    fn opt_str(p: Option<Param<'_>>) -> Option<Option<String>> {
        match p {
            None | Some(Param::Null) => Some(None),
            Some(Param::Str(s)) => {
                let s = s.trim();
                if s.contains(['\r', '\n', '\0']) {
                    return None;
                }
                Some((!s.is_empty()).then(|| s.to_string()))
            }
            Some(Param::Num(_)) => None,
        }
    }

    /// `interval` as `Params::opt_duration` reads it.
    fn opt_duration(p: Option<Param<'_>>) -> Option<Option<std::time::Duration>> {
        match p {
            None | Some(Param::Null) => Some(None),
            Some(Param::Num(s)) => positive_seconds(s).map(Some),
            Some(Param::Str(s)) => crate::duration::parse_duration(&s).ok().map(Some),
        }
    }

    fn args(method: &str, p: WireParams) -> Option<Args> {
        let [uri, aor, received, path, interval, owner, socket, source, keepalive] = p.values;
        if method == "keepalive.add" {
            return Some(Args::Add(AddArgs {
                uri: opt_str(uri)??,
                aor: opt_str(aor)?,
                received: opt_str(received)?,
                path: opt_str(path)?,
                interval: opt_duration(interval)?,
                owner: opt_str(owner)?,
                socket: opt_str(socket)?,
                source: opt_str(source)?,
                keepalive: opt_str(keepalive)?,
            }));
        }
        // A key: only `uri` and `aor`.
        if p.positional > KEY_PARAMS.len()
            || [
                &received, &path, &interval, &owner, &socket, &source, &keepalive,
            ]
            .iter()
            .any(|v| v.is_some())
        {
            return None;
        }
        Some(Args::Key {
            uri: opt_str(uri)??,
            aor: opt_str(aor)?,
        })
    }
}

/// A JSON number of seconds as an interval: positive, at most ten years.
fn positive_seconds(s: f64) -> Option<std::time::Duration> {
    crate::duration::from_seconds(s).ok().filter(|_| s > 0.0)
}

/// The deepest nesting of arrays and objects a request may have. kaping's
/// requests need 4 (a batch, a call, its params, a value); the bound is
/// checked while a value arrives, so 100,000 `[` are refused at the 65th.
pub const MAX_DEPTH: u32 = 64;

/// Splits a byte stream into top-level JSON texts, incrementally.
pub struct Framer {
    buf: Vec<u8>,
    /// Stream offset of `buf[0]` (bytes already dropped by `compact`), so
    /// errors say where in the stream they are.
    base: u64,
    /// Bytes of `buf` already scanned.
    scanned: usize,
    /// Start of the value being scanned (after leading whitespace).
    start: Option<usize>,
    depth: u32,
    in_string: bool,
    escape: bool,
    max: usize,
}

/// What [`Framer::next_frame`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete value: `buf[range]`.
    Value(std::ops::Range<usize>),
    /// Need more bytes.
    Incomplete,
    /// The value being received is longer than the bound.
    TooLarge,
    /// Not a JSON object or array at the top level; the stream offset of
    /// the byte that starts it.
    NotStructured(u64),
    /// Nested deeper than [`MAX_DEPTH`]; the stream offset of the bracket
    /// that went too deep.
    TooDeep(u64),
}

impl Framer {
    pub fn new(max: usize) -> Framer {
        Framer {
            buf: Vec::new(),
            base: 0,
            scanned: 0,
            start: None,
            depth: 0,
            in_string: false,
            escape: false,
            max,
        }
    }

    /// The bound on one value's size.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Bytes received but not yet returned as a value.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn bytes(&self, r: std::ops::Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// The stream offset (from the connection's first byte) of `buf[i]`.
    pub fn offset(&self, i: usize) -> u64 {
        self.base + i as u64
    }

    /// At end of stream: what is wrong when a value was left unfinished,
    /// `None` when the stream ended between values.
    pub fn truncated(&self) -> Option<String> {
        let start = self.start?;
        let received = self.buf.len() - start;
        let inside = if self.in_string {
            ", inside a string"
        } else {
            ""
        };
        Some(format!(
            "the connection ended inside a JSON value: it began at byte {}, {received} bytes \
             of it arrived, {} bracket(s) still open{inside}",
            self.offset(start),
            self.depth
        ))
    }

    /// Drops the bytes of values already returned. Call after handling
    /// the values of one read.
    pub fn compact(&mut self) {
        let keep_from = self.start.unwrap_or(self.scanned);
        if keep_from > 0 {
            self.buf.drain(..keep_from);
            self.base += keep_from as u64;
            self.scanned -= keep_from;
            if let Some(s) = &mut self.start {
                *s -= keep_from;
            }
        }
    }

    /// Finds the next complete value.
    pub fn next_frame(&mut self) -> Frame {
        let mut i = self.scanned;
        while i < self.buf.len() {
            let b = self.buf[i];
            i += 1;
            let Some(start) = self.start else {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => continue,
                    b'{' | b'[' => {
                        self.start = Some(i - 1);
                        self.depth = 1;
                        continue;
                    }
                    _ => {
                        self.scanned = i;
                        return Frame::NotStructured(self.offset(i - 1));
                    }
                }
            };
            // Checked on every byte, strings included, so a value is
            // refused while it arrives, before it is held whole.
            if i - start > self.max {
                self.scanned = i;
                return Frame::TooLarge;
            }
            if self.in_string {
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth > MAX_DEPTH {
                        self.scanned = i;
                        return Frame::TooDeep(self.offset(i - 1));
                    }
                }
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        self.start = None;
                        self.scanned = i;
                        return Frame::Value(start..i);
                    }
                }
                _ => {}
            }
        }
        self.scanned = i;
        match self.start {
            Some(start) if self.buf.len() - start > self.max => Frame::TooLarge,
            _ => Frame::Incomplete,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(chunks: &[&[u8]], max: usize) -> Vec<Result<String, Frame>> {
        let mut f = Framer::new(max);
        let mut out = Vec::new();
        for c in chunks {
            f.push(c);
            loop {
                match f.next_frame() {
                    Frame::Value(r) => {
                        out.push(Ok(String::from_utf8(f.bytes(r).to_vec()).unwrap()))
                    }
                    Frame::Incomplete => break,
                    other => {
                        out.push(Err(other));
                        return out;
                    }
                }
            }
            f.compact();
        }
        out
    }

    #[test]
    fn values_are_found_whole_whatever_the_chunking() {
        let text = br#" {"a":"x}]\"{","b":[1,{"c":2}]}
[{"jsonrpc":"2.0"}]{"z":1}
"#;
        let want = vec![
            Ok(r#"{"a":"x}]\"{","b":[1,{"c":2}]}"#.to_string()),
            Ok(r#"[{"jsonrpc":"2.0"}]"#.to_string()),
            Ok(r#"{"z":1}"#.to_string()),
        ];
        assert_eq!(frames(&[text], 1 << 20), want);
        // Every split point, and byte by byte.
        for cut in 0..text.len() {
            assert_eq!(
                frames(&[&text[..cut], &text[cut..]], 1 << 20),
                want,
                "cut {cut}"
            );
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(frames(&bytes, 1 << 20), want);
    }

    #[test]
    fn oversized_and_scalar_values_are_refused() {
        let big = format!("{{\"a\":\"{}\"}}", "x".repeat(100));
        assert_eq!(frames(&[big.as_bytes()], 50), vec![Err(Frame::TooLarge)]);
        // Refused while still arriving, before the whole value is held.
        assert_eq!(
            frames(&[&big.as_bytes()[..60]], 50),
            vec![Err(Frame::TooLarge)]
        );
        assert_eq!(frames(&[b"  42\n"], 50), vec![Err(Frame::NotStructured(2))]);
    }

    #[test]
    fn nesting_is_bounded_while_it_arrives() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let ok = deep(MAX_DEPTH as usize);
        assert_eq!(frames(&[ok.as_bytes()], 1 << 20), vec![Ok(ok.clone())]);
        // Refused at the bracket past the bound, not when the value ends.
        let flood = "[".repeat(100_000);
        assert_eq!(
            frames(&[b"{\"a\":1} ", flood.as_bytes()], 1 << 20),
            vec![
                Ok("{\"a\":1}".to_string()),
                Err(Frame::TooDeep(8 + MAX_DEPTH as u64))
            ]
        );
        // Brackets inside strings are text.
        let quoted = format!("{{\"a\":\"{}\"}}", "[".repeat(1000));
        assert_eq!(
            frames(&[quoted.as_bytes()], 1 << 20),
            vec![Ok(quoted.clone())]
        );
    }

    #[test]
    fn an_unfinished_value_at_eof_is_described() {
        let mut f = Framer::new(1 << 10);
        f.push(br#"{"a":1} {"b":[1,"x"#);
        assert_eq!(f.next_frame(), Frame::Value(0..7));
        assert_eq!(f.next_frame(), Frame::Incomplete);
        f.compact();
        let why = f.truncated().unwrap();
        assert!(
            why.contains("began at byte 8")
                && why.contains("10 bytes")
                && why.contains("2 bracket(s) still open, inside a string"),
            "{why}"
        );
        let mut done = Framer::new(1 << 10);
        done.push(b"{}\n  ");
        assert_eq!(done.next_frame(), Frame::Value(0..2));
        assert_eq!(done.next_frame(), Frame::Incomplete);
        assert_eq!(done.truncated(), None);
    }

    #[test]
    fn compact_keeps_a_partial_value() {
        let mut f = Framer::new(1 << 10);
        f.push(br#"{"a":1}{"b":"#);
        assert_eq!(f.next_frame(), Frame::Value(0..7));
        assert_eq!(f.next_frame(), Frame::Incomplete);
        f.compact();
        assert_eq!(f.buffered(), 5);
        f.push(b"2}");
        let Frame::Value(r) = f.next_frame() else {
            panic!()
        };
        assert_eq!(f.bytes(r), br#"{"b":2}"#);
    }

    /// The fast reader accepts only what the `Value` reader accepts, and
    /// reads it the same; what it declines, the `Value` reader words.
    #[test]
    fn fast_reader_agrees_with_the_value_reader() {
        let accepted = [
            r#"{"jsonrpc":"2.0","id":1,"method":"keepalive.add","params":{"uri":" sip:a@1.2.3.4 ","aor":null,"interval":"30s","owner":"r1"}}"#,
            r#"{"jsonrpc":"2.0","id":"x","method":"keepalive.add","params":["sip:a@h",null,"1.2.3.4:5060",null,15]}"#,
            r#"{"jsonrpc":"2.0","id":2,"method":"keepalive.add","params":{"uri":"sip:a@h","socket":"udp:203.0.113.10:5060","source":"socket","keepalive":"crlf"}}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"keepalive.add","params":["sip:a@h",null,null,null,null,null,"udp:203.0.113.10:5060","bind","null"]}"#,
            r#"{"method":"keepalive.del","params":{"uri":"sip:\u0061@h","aor":"a@h"},"jsonrpc":"2.0","id":null}"#,
            r#"{"jsonrpc":"2.0","method":"keepalive.get","params":["sip:a@h"],"extra":[1,2]}"#,
            r#"{"jsonrpc":"2.0","id":4,"method":"keepalive.stats"}"#,
            r#"[{"jsonrpc":"2.0","id":1,"method":"keepalive.add","params":{"uri":"sip:b@h","aor":""}},
                {"jsonrpc":"2.0","id":2,"method":"keepalive.del","params":{"uri":"sip:b@h"}}]"#,
        ];
        for t in accepted {
            let fast = fast::message(t.as_bytes()).unwrap_or_else(|| panic!("declined: {t}"));
            assert_eq!(Ok(fast), parse_message_values(t.as_bytes()), "{t}");
        }
        let declined = [
            // Params of the other methods are read as `Value`s.
            r#"{"jsonrpc":"2.0","id":-3,"method":"keepalive.list","params":{"limit":5}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"keepalive.add","params":{"uri":"sip:a@h","x":1}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"keepalive.add","params":{"uri":5}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"keepalive.add","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"keepalive.add"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"keepalive.add","params":["a","b","c","d",1,"f","g","h","i","j"]}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"keepalive.add","params":{"uri":"sip:a@h","interval":-1}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"keepalive.add","params":{"uri":"sip:a@h\r\nX: y"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"keepalive.del","params":{"uri":"a","uri":"b"}}"#,
            r#"{"jsonrpc":"2.0","id":[1],"method":"keepalive.del","params":{"uri":"a"}}"#,
            r#"{"jsonrpc":"1.0","id":1,"method":"keepalive.del","params":{"uri":"a"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":7}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"keepalive.list","params":3}"#,
            r#"[["2.0",1,"keepalive.del",{"uri":"a"}]]"#,
            r#"[{"jsonrpc":"2.0","id":1,"method":"keepalive.stats"}, 1]"#,
            r#"[]"#,
        ];
        for t in declined {
            assert_eq!(fast::message(t.as_bytes()), None, "accepted: {t}");
            // And the full reader still answers it (an error in place).
            assert!(parse_message(t.as_bytes()).is_ok(), "{t}");
        }
    }

    #[test]
    fn requests_batches_and_invalid_entries() {
        let m = parse_message(
            br#"{"jsonrpc":"2.0","id":7,"method":"keepalive.add","params":["sip:a@1.2.3.4"]}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            Message::Single(Ok(Call {
                id: Some(json!(7)),
                method: "keepalive.add".into(),
                params: Value::Null,
                args: Some(Ok(Args::Add(AddArgs {
                    uri: "sip:a@1.2.3.4".into(),
                    aor: None,
                    received: None,
                    path: None,
                    interval: None,
                    owner: None,
                    socket: None,
                    source: None,
                    keepalive: None,
                }))),
            }))
        );
        // Bad params of a method read on the connection's thread stay the
        // call's own error; other methods keep their params for the daemon.
        let m = parse_message(
            br#"[{"jsonrpc":"2.0","id":1,"method":"keepalive.del","params":{"uri":"sip:a@h","x":1}},
                 {"jsonrpc":"2.0","id":2,"method":"keepalive.list","params":{"limit":5}}]"#,
        )
        .unwrap();
        let Message::Batch(items) = m else { panic!() };
        let del = items[0].as_ref().unwrap();
        let err = del.args.as_ref().unwrap().as_ref().unwrap_err();
        assert_eq!(err.code, INVALID_PARAMS);
        assert!(
            err.message.contains("unknown parameter \"x\""),
            "{}",
            err.message
        );
        let list = items[1].as_ref().unwrap();
        assert_eq!(
            (list.params.clone(), list.args.is_none()),
            (json!({"limit": 5}), true)
        );
        let m = parse_message(
            br#"[{"jsonrpc":"2.0","method":"x"}, 1, {"jsonrpc":"1.0","id":1,"method":"y"}]"#,
        )
        .unwrap();
        let Message::Batch(items) = m else { panic!() };
        assert_eq!(items.len(), 3);
        assert_eq!(items[0].as_ref().unwrap().id, None, "a notification");
        assert_eq!(items[1].as_ref().unwrap_err().code, INVALID_REQUEST);
        assert_eq!(items[2].as_ref().unwrap_err().code, INVALID_REQUEST);
        assert_eq!(
            parse_message(b"[]").unwrap(),
            Message::Single(Err(RpcError::new(INVALID_REQUEST, "empty batch")))
        );
        assert_eq!(parse_message(b"{nope").unwrap_err().code, PARSE_ERROR);
        let bad = parse_message(br#"{"jsonrpc":"2.0","id":1,"method":"m","params":3}"#).unwrap();
        assert!(matches!(bad, Message::Single(Err(e)) if e.code == INVALID_REQUEST));
    }

    #[test]
    fn params_by_name_or_position_refuse_unknown_and_mistyped() {
        let order = ["uri", "aor", "interval"];
        let mut p = Params::new(json!(["sip:a@h", null, 30]), "m", &order).unwrap();
        assert_eq!(p.req_str("uri").unwrap(), "sip:a@h");
        assert_eq!(p.opt_str("aor").unwrap(), None);
        assert_eq!(
            p.opt_duration("interval").unwrap(),
            Some(std::time::Duration::from_secs(30))
        );
        let mut p = Params::new(
            json!({"uri": " sip:a@h ", "interval": "500ms"}),
            "m",
            &order,
        )
        .unwrap();
        assert_eq!(p.req_str("uri").unwrap(), "sip:a@h");
        assert_eq!(
            p.opt_duration("interval").unwrap(),
            Some(std::time::Duration::from_millis(500))
        );
        let e = Params::new(json!({"url": "x"}), "m", &order).err().unwrap();
        assert!(e.message.contains("unknown parameter \"url\""), "{e}");
        let e = Params::new(json!([1, 2, 3, 4]), "m", &order).err().unwrap();
        assert_eq!(e.code, INVALID_PARAMS);
        let mut p = Params::new(json!({"uri": 5}), "m", &order).unwrap();
        assert!(p
            .req_str("uri")
            .unwrap_err()
            .message
            .contains("must be a string"));
        let mut p = Params::new(json!({"uri": "a\nb"}), "m", &order).unwrap();
        assert!(p.req_str("uri").is_err());
        let mut p = Params::new(json!({}), "m", &order).unwrap();
        assert!(p.req_str("uri").unwrap_err().message.contains("required"));
        let mut p = Params::new(json!({"interval": -1}), "m", &order).unwrap();
        assert!(p.opt_duration("interval").is_err());
    }
}
