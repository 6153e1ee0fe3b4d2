//! The control client against a mock server: a `UnixListener` thread that
//! answers canned JSON-RPC responses (ISSUE5 §2) and records what it was
//! sent. Covers the `Client` framing (split answers, notifications between
//! answers, bounded lines, timeouts, hang-ups), batches (ids out of order,
//! a refusal of the whole batch), and `kaping ctl` itself: error lines and
//! exit codes, list paging, `add --file` batching and its error places,
//! subscribe, `call`, and the readable renderings.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kaping::control::client::{CallError, Client};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_kaping");

/// What the mock does with one received value: write anything (or nothing)
/// to the stream; `false` closes the connection.
type Handler = dyn Fn(&Value, &mut UnixStream) -> bool + Send + Sync;

struct Mock {
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// Every value received, in order.
    log: Arc<Mutex<Vec<Value>>>,
    thread: Option<JoinHandle<()>>,
}

impl Mock {
    /// Serves `connections` connections one after the other.
    fn start(
        connections: usize,
        handler: impl Fn(&Value, &mut UnixStream) -> bool + Send + Sync + 'static,
    ) -> Mock {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let log = log.clone();
            thread::spawn(move || {
                for _ in 0..connections {
                    let Ok((stream, _)) = listener.accept() else {
                        return;
                    };
                    let mut writer = stream.try_clone().unwrap();
                    for line in BufReader::new(stream).lines() {
                        let Ok(line) = line else { break };
                        let v: Value =
                            serde_json::from_str(&line).expect("the client sends JSON lines");
                        log.lock().unwrap().push(v.clone());
                        if !handler(&v, &mut writer) {
                            break;
                        }
                    }
                }
            })
        };
        Mock {
            _dir: dir,
            path,
            log,
            thread: Some(thread),
        }
    }

    /// Waits for the server thread and returns what it received.
    fn finish(mut self) -> Vec<Value> {
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// Answers every request of `msg` (one object or a batch) with `f`.
fn answer(msg: &Value, f: impl Fn(&str, &Value) -> Result<Value, (i32, String)>) -> Value {
    let one = |req: &Value| {
        let id = req["id"].clone();
        match f(
            req["method"].as_str().unwrap(),
            req.get("params").unwrap_or(&Value::Null),
        ) {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err((code, message)) => {
                json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
            }
        }
    };
    match msg {
        Value::Array(items) => Value::Array(items.iter().map(one).collect()),
        req => one(req),
    }
}

/// Writes one answer line. A client that hung up (on purpose, as in the
/// bounded-buffer test) is not the mock's failure.
fn send(s: &mut UnixStream, v: &Value) {
    let _ = writeln!(s, "{v}");
}

fn ctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("ctl")
        .arg("--control")
        .arg(sock)
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn contact(i: u64) -> Value {
    json!({
        "uri": format!("sip:u{i}@127.0.0.{}:5060", 1 + i % 250), "aor": null, "received": null,
        "path": null, "owner": null, "interval_ms": 30000, "dest": format!("127.0.0.{}:5060", 1 + i % 250),
        "worker": 0, "slot": i, "state": if i.is_multiple_of(3) { "down" } else { "up" }, "misses": 0,
        "sent": 4, "answered": 4, "rtt_last_us": 800, "rtt_min_us": 700, "rtt_max_us": 900,
        "srtt_us": 810, "rttvar_us": 40, "last_code": 200, "last_ping": null, "last_reply": null,
        "source": "control"
    })
}

#[test]
fn a_call_is_one_line_and_its_answer_may_arrive_in_pieces_after_a_notification() {
    let mock = Mock::start(1, |req, s| {
        // A subscriber's event first, then the answer in two writes.
        send(
            s,
            &json!({"jsonrpc": "2.0", "method": "keepalive.event", "params": {"uri": "sip:e@h"}}),
        );
        let text = answer(req, |_, _| Ok(json!({"deleted": 1, "uri": "sip:a@h"}))).to_string();
        let (a, b) = text.split_at(text.len() / 2);
        let _ = s.write_all(a.as_bytes());
        s.flush().unwrap();
        thread::sleep(Duration::from_millis(50));
        let _ = s.write_all(format!("{b}\n").as_bytes());
        true
    });
    let mut c = Client::connect(&mock.path).unwrap();
    let r = c.call("keepalive.del", json!({"uri": "sip:a@h"})).unwrap();
    assert_eq!(r, json!({"deleted": 1, "uri": "sip:a@h"}));
    let r = c.call("keepalive.stats", Value::Null).unwrap();
    assert_eq!(r["deleted"], 1);
    // The notifications that came before each answer are kept, in order.
    let n = c.next_notification().unwrap().unwrap();
    assert_eq!(n["params"]["uri"], "sip:e@h");
    assert!(c.next_notification().unwrap().is_some());
    drop(c);
    let log = mock.finish();
    assert_eq!(
        log[0],
        json!({"jsonrpc": "2.0", "id": 1, "method": "keepalive.del", "params": {"uri": "sip:a@h"}})
    );
    // No params: no "params" member at all.
    assert_eq!(
        log[1],
        json!({"jsonrpc": "2.0", "id": 2, "method": "keepalive.stats"})
    );
}

#[test]
fn an_error_answer_leaves_the_connection_usable() {
    let mock = Mock::start(1, |req, s| {
        let a = answer(req, |m, _| match m {
            "keepalive.get" => Err((-32002, "keepalive.get sip:x: not found".into())),
            _ => Ok(json!({"subscribed": true})),
        });
        send(s, &a);
        true
    });
    let mut c = Client::connect(&mock.path).unwrap();
    match c.call("keepalive.get", json!({"uri": "sip:x"})) {
        Err(CallError::Rpc(e)) => {
            assert_eq!(e.code, -32002);
            assert_eq!(e.message, "keepalive.get sip:x: not found");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.call("keepalive.subscribe", Value::Null).unwrap(),
        json!({"subscribed": true})
    );
    drop(c);
    mock.finish();
}

#[test]
fn batch_answers_are_matched_by_id_whatever_their_order() {
    let mock = Mock::start(1, |req, s| {
        let mut a = answer(req, |_, p| {
            let uri = p["uri"].as_str().unwrap();
            if uri.contains("bad") {
                Err((-32001, format!("keepalive.add {uri}: bad contact URI")))
            } else {
                Ok(json!({"status": "added", "uri": uri}))
            }
        });
        a.as_array_mut().unwrap().reverse();
        send(s, &a);
        true
    });
    let mut c = Client::connect(&mock.path).unwrap();
    let calls: Vec<(&str, Value)> = ["sip:a@h", "sip:bad", "sip:c@h"]
        .iter()
        .map(|u| ("keepalive.add", json!({"uri": u})))
        .collect();
    let r = c.batch(&calls).unwrap();
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].as_ref().unwrap()["uri"], "sip:a@h");
    assert_eq!(r[1].as_ref().unwrap_err().code, -32001);
    assert_eq!(r[2].as_ref().unwrap()["uri"], "sip:c@h");
    // An empty batch is not sent (the server would refuse it).
    assert!(c.batch::<&str>(&[]).unwrap().is_empty());
    drop(c);
    let log = mock.finish();
    assert_eq!(log.len(), 1);
    let sent = log[0].as_array().unwrap();
    assert_eq!(sent.len(), 3);
    let ids: Vec<u64> = sent.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 3]);
}

#[test]
fn a_batch_refused_as_a_whole_is_one_error() {
    let mock = Mock::start(1, |_, s| {
        send(
            s,
            &json!({"jsonrpc": "2.0", "id": null,
            "error": {"code": -32004, "message": "request of 17000000 bytes is over control_max_request (16777216)"}}),
        );
        false
    });
    let mut c = Client::connect(&mock.path).unwrap();
    match c.batch(&[("keepalive.add", json!({"uri": "sip:a@h"}))]) {
        Err(CallError::Rpc(e)) => assert_eq!(e.code, -32004),
        other => panic!("{other:?}"),
    }
    drop(c);
    mock.finish();
}

#[test]
fn missing_or_duplicate_batch_answers_are_protocol_errors() {
    let mock = Mock::start(1, |req, s| {
        let mut a = answer(req, |_, _| Ok(json!({})));
        let first = a[0].clone();
        a.as_array_mut().unwrap()[1] = first;
        send(s, &a);
        true
    });
    let mut c = Client::connect(&mock.path).unwrap();
    let calls = [
        ("keepalive.get", json!({"uri": "a"})),
        ("keepalive.get", json!({"uri": "b"})),
    ];
    let e = c.batch(&calls).unwrap_err();
    assert!(e.to_string().contains("two answers for id 1"), "{e}");
    // Out of step: refused from now on rather than misread.
    let e = c.call("keepalive.stats", Value::Null).unwrap_err();
    assert!(e.to_string().contains("reconnect"), "{e}");
    drop(c);
    mock.finish();
}

#[test]
fn answers_are_read_into_a_bounded_buffer() {
    let mock = Mock::start(1, |req, s| {
        send(s, &answer(req, |_, _| Ok(json!("x".repeat(10_000)))));
        true
    });
    let mut c = Client::connect(&mock.path).unwrap();
    c.set_response_max(1000);
    match c.call("keepalive.stats", Value::Null) {
        Err(CallError::TooLarge { max, .. }) => assert_eq!(max, 1000),
        other => panic!("{other:?}"),
    }
    drop(c);
    mock.finish();
}

#[test]
fn hang_ups_and_silence_are_named() {
    // Closed before answering.
    let mock = Mock::start(1, |_, _| false);
    let mut c = Client::connect(&mock.path).unwrap();
    let e = c.call("keepalive.stats", Value::Null).unwrap_err();
    assert!(
        matches!(e, CallError::Closed { partial: false, .. }),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("the daemon closed the connection"),
        "{e}"
    );
    drop(c);
    mock.finish();

    // Closed in the middle of an answer.
    let mock = Mock::start(1, |_, s| {
        let _ = s.write_all(br#"{"jsonrpc":"2.0","id":1,"res"#);
        false
    });
    let mut c = Client::connect(&mock.path).unwrap();
    let e = c.call("keepalive.stats", Value::Null).unwrap_err();
    assert!(
        matches!(e, CallError::Closed { partial: true, .. }),
        "{e:?}"
    );
    drop(c);
    mock.finish();

    // No answer at all within the timeout.
    let mock = Mock::start(1, |_, _| true);
    let mut c = Client::connect(&mock.path).unwrap();
    c.set_timeout(Some(Duration::from_millis(200))).unwrap();
    let e = c.call("keepalive.stats", Value::Null).unwrap_err();
    assert!(matches!(e, CallError::Timeout { .. }), "{e:?}");
    drop(c);
    mock.finish();

    // Not JSON.
    let mock = Mock::start(1, |_, s| {
        let _ = s.write_all(b"hello\n");
        true
    });
    let mut c = Client::connect(&mock.path).unwrap();
    let e = c.call("keepalive.stats", Value::Null).unwrap_err();
    assert!(
        e.to_string().contains("invalid JSON from the daemon"),
        "{e}"
    );
    drop(c);
    mock.finish();
}

#[test]
fn an_absent_or_dead_socket_names_the_path_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.sock");
    let o = ctl(&missing, &["keepalive.stats"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        format!(
            "kaping: no control socket at {0}: is the daemon running with `kaping run --control {0}`?\n",
            missing.display()
        )
    );
    // A socket file nobody listens on (a daemon killed with -9).
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let o = ctl(&stale, &["keepalive.list"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.starts_with(&format!("kaping: nothing listens on {}", stale.display())),
        "{err}"
    );
    assert!(err.contains("kaping run --control"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn ctl_errors_are_one_line_with_the_code_and_exit_1() {
    let mock = Mock::start(1, |req, s| {
        send(
            s,
            &answer(req, |_, p| {
                Err((
                    -32002,
                    format!("keepalive.del {}: not found", p["uri"].as_str().unwrap()),
                ))
            }),
        );
        true
    });
    let o = ctl(&mock.path, &["keepalive.del", "sip:x"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "kaping: keepalive.del sip:x: not found (code -32002)\n"
    );
    assert_eq!(stdout(&o), "");
    mock.finish();
}

#[test]
fn ctl_add_del_get_flush_send_their_params_and_print_results() {
    let mock = Mock::start(5, |req, s| {
        send(
            s,
            &answer(req, |m, p| {
                Ok(match m {
                    "keepalive.add" => {
                        json!({"status": "added", "uri": p["uri"], "aor": p["aor"], "worker": 1, "slot": 42})
                    }
                    "keepalive.del" => json!({"deleted": 1, "uri": p["uri"]}),
                    "keepalive.get" => contact(7),
                    "keepalive.flush" => json!({"deleted": 12345}),
                    _ => return Err((-32601, format!("{m}: method not found"))),
                })
            }),
        );
        true
    });
    let o = ctl(
        &mock.path,
        &[
            "keepalive.add",
            "sip:alice@192.0.2.1:5060",
            "--aor",
            "sip:alice@example.com",
            "--received",
            "203.0.113.7:41022",
            "--path",
            "<sip:198.51.100.9;lr>",
            "--interval",
            "30s",
            "--owner",
            "reg1",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "added sip:alice@192.0.2.1:5060 (AoR sip:alice@example.com): worker 1, slot 42\n"
    );
    let o = ctl(
        &mock.path,
        &[
            "del",
            "sip:alice@192.0.2.1:5060",
            "--aor",
            "sip:alice@example.com",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v, json!({"deleted": 1, "uri": "sip:alice@192.0.2.1:5060"}));
    let o = ctl(&mock.path, &["keepalive.get", "sip:u7@127.0.0.8:5060"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.starts_with("uri:        sip:u7@127.0.0.8:5060\n"),
        "{text}"
    );
    assert!(
        text.contains("rtt:        last 0.800 ms, srtt 0.810 ms,"),
        "{text}"
    );
    let o = ctl(&mock.path, &["keepalive.flush", "--owner", "reg1"]);
    assert_eq!(stdout(&o), "deleted 12,345 contacts of reg1\n");
    let o = ctl(&mock.path, &["keepalive.flush"]);
    assert_eq!(stdout(&o), "deleted 12,345 contacts\n");
    let log = mock.finish();
    assert_eq!(
        log[0]["params"],
        json!({"uri": "sip:alice@192.0.2.1:5060", "aor": "sip:alice@example.com",
               "received": "203.0.113.7:41022", "path": "<sip:198.51.100.9;lr>",
               "interval": 30.0, "owner": "reg1"})
    );
    assert_eq!(
        log[1]["params"],
        json!({"uri": "sip:alice@192.0.2.1:5060", "aor": "sip:alice@example.com"})
    );
    assert_eq!(log[2]["params"], json!({"uri": "sip:u7@127.0.0.8:5060"}));
    assert_eq!(log[3]["params"], json!({"owner": "reg1"}));
    assert_eq!(log[4]["params"], json!({}));
}

/// A mock holding `n` contacts, paging them `page` at a time whatever limit
/// is asked (a server may return fewer than asked).
fn list_mock(n: u64, page: u64, connections: usize) -> Mock {
    Mock::start(connections, move |req, s| {
        send(
            s,
            &answer(req, |_, p| {
                let cursor = p.get("cursor").and_then(Value::as_u64).unwrap_or(0);
                let limit = p["limit"].as_u64().unwrap().min(page);
                let end = (cursor + limit).min(n);
                let contacts: Vec<Value> = (cursor..end).map(contact).collect();
                let next = if end < n { json!(end) } else { Value::Null };
                Ok(json!({"contacts": contacts, "next": next, "total": n}))
            }),
        );
        true
    })
}

#[test]
fn list_follows_next_until_null_and_prints_one_object() {
    let mock = list_mock(25, 10, 2);
    let o = ctl(&mock.path, &["keepalive.list", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["total"], 25);
    let uris: Vec<&str> = v["contacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["uri"].as_str().unwrap())
        .collect();
    assert_eq!(uris.len(), 25);
    assert_eq!(uris[24], "sip:u24@127.0.0.25:5060");

    let o = ctl(&mock.path, &["list", "--state", "up", "--owner", "reg1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 27, "{text}");
    assert!(lines[0].starts_with("STATE"), "{text}");
    assert!(
        lines[1].starts_with("down      0.810 ms  200   127.0.0.1:5060"),
        "{text}"
    );
    assert_eq!(lines[26], "25 contacts: 16 up, 9 down, 0 unknown");
    let log = mock.finish();
    let cursors: Vec<Option<u64>> = log.iter().map(|r| r["params"]["cursor"].as_u64()).collect();
    assert_eq!(
        cursors,
        [None, Some(10), Some(20), None, Some(10), Some(20)]
    );
    assert!(log.iter().all(|r| r["params"]["limit"] == 10_000));
    assert_eq!(log[3]["params"]["state"], "up");
    assert_eq!(log[3]["params"]["owner"], "reg1");
}

#[test]
fn list_with_limit_is_one_page_with_its_next_cursor() {
    let mock = list_mock(25, 10, 2);
    let o = ctl(
        &mock.path,
        &["keepalive.list", "--limit", "5", "--cursor", "10", "--json"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["contacts"].as_array().unwrap().len(), 5);
    assert_eq!(v["next"], 15);
    let o = ctl(&mock.path, &["keepalive.list", "--limit", "5"]);
    let text = stdout(&o);
    assert!(
        text.ends_with("5 contacts: 3 up, 2 down, 0 unknown\n(25 in all; next page: --cursor 5)\n"),
        "{text}"
    );
    let log = mock.finish();
    assert_eq!(log[0]["params"], json!({"cursor": 10, "limit": 5}));
    // --limit is bounded by the protocol's maximum before anything is sent.
    let o = ctl(
        Path::new("/nonexistent"),
        &["keepalive.list", "--limit", "10001"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

#[test]
fn a_cursor_that_does_not_advance_is_refused() {
    let mock = Mock::start(1, |req, s| {
        send(
            s,
            &answer(req, |_, _| {
                Ok(json!({"contacts": [contact(1)], "next": 3, "total": 9}))
            }),
        );
        true
    });
    let o = ctl(&mock.path, &["keepalive.list"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("returned cursor 3 again"),
        "{}",
        stderr(&o)
    );
    let log = mock.finish();
    assert_eq!(log.len(), 2);
}

#[test]
fn add_file_sends_batches_and_names_refusals_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("contacts.txt");
    let mut text = String::from("# 2,503 contacts, one unreadable\n");
    let mut bad_lines = Vec::new();
    for i in 0..2503u64 {
        if i == 5 {
            text.push_str("sip:broken@192.0.2.1 not-an-address\n");
            continue;
        }
        if i == 1500 || i == 2501 {
            bad_lines.push(text.lines().count() + 1);
            text.push_str(&format!("sip:bad{i}@192.0.2.1\n"));
            continue;
        }
        if i == 2000 {
            text.push_str("\n   # a comment\n");
        }
        text.push_str(&format!("sip:u{i}@192.0.2.1 198.51.100.7:5062\n"));
    }
    std::fs::write(&file, text).unwrap();
    let mock = Mock::start(2, |req, s| {
        send(
            s,
            &answer(req, |_, p| {
                let uri = p["uri"].as_str().unwrap();
                if uri.contains("bad") {
                    Err((
                        -32001,
                        format!("keepalive.add {uri}: unsupported transport"),
                    ))
                } else if uri.ends_with("u7@192.0.2.1") {
                    Ok(json!({"status": "updated", "uri": uri}))
                } else {
                    Ok(json!({"status": "added", "uri": uri}))
                }
            }),
        );
        true
    });
    let f = file.display().to_string();
    let o = ctl(
        &mock.path,
        &[
            "keepalive.add",
            "--file",
            &f,
            "--owner",
            "reg1",
            "--interval",
            "20s",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with(&format!("{f}: 2,502 contacts sent in 3 batches in ")),
        "{out}"
    );
    assert!(
        lines[0].ends_with(": 2,499 added, 1 updated, 0 unchanged, 2 failed"),
        "{out}"
    );
    assert_eq!(
        lines[1],
        format!(
            "  {f}:{}: keepalive.add sip:bad1500@192.0.2.1: unsupported transport (code -32001)",
            bad_lines[0]
        )
    );
    assert_eq!(
        lines[2],
        format!(
            "  {f}:{}: keepalive.add sip:bad2501@192.0.2.1: unsupported transport (code -32001)",
            bad_lines[1]
        )
    );
    assert_eq!(lines[3], format!("{f}: 1 record not sent (unreadable):"));
    assert!(
        lines[4].starts_with(&format!("  {f}:7: destination 'not-an-address'")),
        "{out}"
    );
    assert_eq!(
        stderr(&o),
        format!(
            "kaping: {f}: 3 of 2,503 contacts not added (2 refused by the daemon, 1 unreadable)\n"
        )
    );

    // --json: the summary as one object; batches of --batch.
    let o = ctl(
        &mock.path,
        &[
            "add", "--file", &f, "--batch", "1000", "--format", "lines", "--json",
        ],
    );
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["sent"], 2502);
    assert_eq!(v["batches"], 3);
    assert_eq!(v["failed"], 2);
    assert_eq!(v["skipped"], 1);
    assert_eq!(v["errors"][0]["code"], -32001);
    assert_eq!(v["errors"][0]["place"], format!("{f}:{}", bad_lines[0]));

    let log = mock.finish();
    let sizes: Vec<usize> = log.iter().map(|m| m.as_array().unwrap().len()).collect();
    assert_eq!(sizes, [1000, 1000, 502, 1000, 1000, 502]);
    let first = &log[0][0];
    assert_eq!(first["method"], "keepalive.add");
    // The plain format's second field is where pings go: `received`.
    assert_eq!(
        first["params"],
        json!({"uri": "sip:u0@192.0.2.1", "received": "198.51.100.7:5062", "interval": 20.0, "owner": "reg1"})
    );
    assert!(log[3][0]["params"].get("owner").is_none());
}

#[test]
fn add_file_from_a_ul_dump_names_contacts_by_aor() {
    let dump = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kamailio-ul-dump.json");
    let mock = Mock::start(1, |req, s| {
        send(
            s,
            &answer(req, |_, p| {
                Err((
                    -32003,
                    format!("keepalive.add {}: slab full", p["uri"].as_str().unwrap()),
                ))
            }),
        );
        true
    });
    let o = ctl(
        &mock.path,
        &["keepalive.add", "--file", dump.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.lines().nth(1).unwrap().contains(": AoR '"), "{out}");
    assert!(out.contains("slab full (code -32003)"), "{out}");
    let log = mock.finish();
    assert!(log[0]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["params"]["aor"].is_string()));
}

#[test]
fn subscribe_prints_each_event_as_it_comes() {
    let mock = Mock::start(2, |req, s| {
        send(s, &answer(req, |_, _| Ok(json!({"subscribed": true}))));
        for (old, new) in [("unknown", "up"), ("up", "down")] {
            send(
                s,
                &json!({"jsonrpc": "2.0", "method": "keepalive.event", "params": {
                    "time": "2026-01-01T00:00:00.000Z", "time_ms": 1767225600000u64,
                    "uri": "sip:a@192.0.2.1", "dest": "192.0.2.1:5060", "worker": 0, "slot": 3,
                    "old": old, "new": new, "reason": if new == "up" { "reply" } else { "timeout" },
                    "misses": if new == "up" { 0 } else { 3 }, "rtt_us": 1500}}),
            );
        }
        false
    });
    let o = ctl(&mock.path, &["keepalive.subscribe", "--json"]);
    // The daemon went away: that ends the subscription with an error.
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("closed the subscription"),
        "{}",
        stderr(&o)
    );
    let events: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["new"], "down");
    let o = ctl(&mock.path, &["subscribe"]);
    let text = stdout(&o);
    assert_eq!(
        text.lines().nth(1).unwrap(),
        "2026-01-01T00:00:00.000Z  sip:a@192.0.2.1  up -> down  timeout, rtt 1.500 ms, misses 3  192.0.2.1:5060 (worker 0, slot 3)"
    );
    mock.finish();
}

#[test]
fn call_sends_any_method_with_raw_params() {
    let mock = Mock::start(2, |req, s| {
        send(
            s,
            &answer(req, |m, p| Ok(json!({"method": m, "params": p}))),
        );
        true
    });
    let o = ctl(
        &mock.path,
        &[
            "call",
            "keepalive.get",
            r#"["sip:a@h", "sip:aor@h"]"#,
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        v,
        json!({"method": "keepalive.get", "params": ["sip:a@h", "sip:aor@h"]})
    );
    let o = ctl(&mock.path, &["call", "keepalive.stats"]);
    assert!(
        stdout(&o).starts_with("{\n  \"method\": \"keepalive.stats\""),
        "{}",
        stdout(&o)
    );
    mock.finish();
    let o = ctl(Path::new("/nonexistent"), &["call", "x", "42"]);
    assert_eq!(
        stderr(&o),
        "kaping: params must be a JSON object or array, not 42\n"
    );
}

#[test]
fn stats_read_as_grouped_figures() {
    let mock = Mock::start(1, |req, s| {
        send(
            s,
            &answer(req, |_, _| {
                Ok(json!({
                    "contacts": {"total": 200_000, "unknown": 0, "up": 199_990, "down": 10},
                    "pings": {"sent": 4_000_000, "matched": 3_999_000, "timed_out": 1000, "late": 0, "stray": 0, "forged": 0},
                    "rtt_us": {"p50": 800, "p90": 1200, "p99": 3000},
                    "control": {"connections": 1, "requests": 201, "adds": 200_000, "dels": 0,
                                "journal_commits": 200, "journal_records": 200_000, "snapshot_age_s": 4},
                    "uptime_s": 90, "workers": 2, "backend": "uring"
                }))
            }),
        );
        true
    });
    let o = ctl(&mock.path, &["keepalive.stats"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.starts_with("contacts  total 200,000  up 199,990  down 10  unknown 0\n"),
        "{text}"
    );
    assert!(
        text.contains("\nrtt       p50 0.800 ms  p90 1.200 ms  p99 3.000 ms\n"),
        "{text}"
    );
    assert!(
        text.ends_with("daemon    uptime 1 m 30 s  workers 2  backend uring\n"),
        "{text}"
    );
    mock.finish();
}
