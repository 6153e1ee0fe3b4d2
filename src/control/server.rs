//! The control socket's I/O: a UNIX stream listener and one thread per
//! connection (bounded by `control_max_connections`), framing JSON-RPC
//! messages (bounded by `control_max_request`) and handing them to the
//! daemon's main thread, which owns every contact and answers them in
//! order. A connection that subscribed also writes the event stream.
//!
//! The socket is created with mode 0660. A live socket at the path (another
//! daemon answers on it) refuses the start; a stale one (nobody listening)
//! is replaced; a path that is not a socket is never removed.
//!
//! Nothing here touches contacts; nothing here is on a packet path.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, Sender, TryRecvError};
use serde_json::Value;

use crate::control::rpc::{self, Frame, Framer, Message, RpcError};

/// How often a connection thread looks at its subscription and the stop
/// flag while no request arrives.
const READ_TICK: Duration = Duration::from_millis(50);
/// A client that does not read its responses for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Read size per `read` call.
const READ_CHUNK: usize = 64 << 10;
/// How long, and how many bytes, a refused stream is read and discarded
/// before it is closed (see `Connection::linger`).
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;
/// Events written per tick to one subscriber, so a fast event stream
/// cannot starve that connection's requests.
const EVENTS_PER_TICK: usize = 4096;

/// What a connection asks of the main thread.
pub struct Request {
    pub message: Message,
    /// Receives the answer (`None` bytes: only notifications, nothing to
    /// write).
    pub reply: Sender<Reply>,
}

/// The main thread's answer to one message.
#[derive(Default)]
pub struct Reply {
    /// One response or a batch array of them; `None` when all were
    /// notifications. The connection's thread serializes it, off the
    /// daemon's main thread.
    pub answer: Option<Value>,
    /// Set when the message subscribed this connection to events: each
    /// item is one event object as JSON text.
    pub subscription: Option<Receiver<Arc<str>>>,
}

/// Counters the daemon reports in `keepalive.stats`.
#[derive(Default)]
pub struct ServerStats {
    pub connections: AtomicUsize,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub messages: AtomicU64,
}

/// A running control socket.
pub struct ControlServer {
    path: PathBuf,
    /// The listening socket (a second handle to it), shut down to end the
    /// accept loop.
    listening: UnixListener,
    stop: Arc<AtomicBool>,
    listener: Option<JoinHandle<()>>,
    pub stats: Arc<ServerStats>,
}

#[derive(Clone, Copy)]
pub struct Limits {
    pub max_connections: u32,
    pub max_request: usize,
}

/// Binds the socket (see the module doc for what happens to an existing
/// path) and starts accepting. Requests go to `to_daemon`.
pub fn start(
    path: &Path,
    limits: Limits,
    to_daemon: Sender<Request>,
) -> Result<ControlServer, String> {
    prepare_path(path)?;
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot create control socket {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|e| {
        format!(
            "cannot set mode 0660 on control socket {}: {e}",
            path.display()
        )
    })?;
    let listening = listener
        .try_clone()
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(ServerStats::default());
    let thread = {
        let stop = stop.clone();
        let stats = stats.clone();
        std::thread::Builder::new()
            .name("kaping-ctl".into())
            .spawn(move || accept_loop(listener, limits, to_daemon, stop, stats))
            .map_err(|e| format!("cannot start the control thread: {e}"))?
    };
    Ok(ControlServer {
        path: path.to_path_buf(),
        listening,
        stop,
        listener: Some(thread),
        stats,
    })
}

/// Refuses a live socket or a non-socket at `path`; removes a stale socket.
fn prepare_path(path: &Path) -> Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("control socket {}: {e}", path.display())),
    };
    if !meta.file_type().is_socket() {
        return Err(format!(
            "control socket path {} exists and is not a socket: refusing to replace it",
            path.display()
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(format!(
            "control socket {} is in use by another running daemon (stop it, or choose another --control)",
            path.display()
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            eprintln!(
                "kaping: removing stale control socket {} (nobody listens on it)",
                path.display()
            );
            std::fs::remove_file(path).map_err(|e| {
                format!(
                    "cannot remove stale control socket {}: {e}",
                    path.display()
                )
            })
        }
        Err(e) => Err(format!("control socket {}: {e}", path.display())),
    }
}

impl ControlServer {
    /// Stops accepting, ends every connection thread (within a read tick)
    /// and removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept: shutting the listening socket down ends
        // it with an error. Not by connecting to the path: the file may be
        // gone, or another daemon's by now (seen: a stop that never ended).
        let _ = socket2::SockRef::from(&self.listening).shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.listener.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.listener.is_some() {
            self.shutdown();
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    limits: Limits,
    to_daemon: Sender<Request>,
    stop: Arc<AtomicBool>,
    stats: Arc<ServerStats>,
) {
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        threads.retain(|t| !t.is_finished());
        let Ok(mut stream) = conn else { continue };
        if stats.connections.load(Ordering::SeqCst) >= limits.max_connections as usize {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            let e = RpcError::new(
                rpc::TOO_MANY_CONNECTIONS,
                format!(
                    "too many connections: {} are open (control_max_connections)",
                    limits.max_connections
                ),
            );
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = write_line(&mut stream, &rpc::error_response(&Value::Null, &e));
            continue;
        }
        stats.connections.fetch_add(1, Ordering::SeqCst);
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let (to_daemon, stop, stats2) = (to_daemon.clone(), stop.clone(), stats.clone());
        let spawned = std::thread::Builder::new()
            .name("kaping-ctl-conn".into())
            .spawn(move || {
                let mut conn = Connection {
                    stream,
                    framer: Framer::new(limits.max_request),
                    to_daemon,
                    subscription: None,
                    stats: stats2.clone(),
                };
                conn.serve(&stop);
                stats2.connections.fetch_sub(1, Ordering::SeqCst);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(_) => {
                stats.connections.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

/// A read that ended for lack of input within the tick (or a signal), not
/// because the connection failed.
fn is_tick(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn write_line(stream: &mut UnixStream, v: &Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(v).expect("a Value always serializes");
    bytes.push(b'\n');
    stream.write_all(&bytes)
}

struct Connection {
    stream: UnixStream,
    framer: Framer,
    to_daemon: Sender<Request>,
    subscription: Option<Receiver<Arc<str>>>,
    stats: Arc<ServerStats>,
}

/// Whether a connection goes on after a step.
enum Next {
    Continue,
    Close,
}

impl Connection {
    fn serve(&mut self, stop: &AtomicBool) {
        if self.stream.set_read_timeout(Some(READ_TICK)).is_err()
            || self.stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
        {
            return;
        }
        let mut buf = vec![0u8; READ_CHUNK];
        while !stop.load(Ordering::SeqCst) {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    // The peer may have shut down only its sending side: it
                    // still reads why its last request went unanswered.
                    if let Some(why) = self.framer.truncated() {
                        let e = RpcError::new(rpc::PARSE_ERROR, why);
                        let _ =
                            write_line(&mut self.stream, &rpc::error_response(&Value::Null, &e));
                    }
                    return;
                }
                Ok(n) => {
                    self.framer.push(&buf[..n]);
                    if let Next::Close = self.handle_frames() {
                        return;
                    }
                }
                Err(e) if is_tick(&e) => {}
                Err(_) => return,
            }
            if let Next::Close = self.forward_events() {
                return;
            }
        }
    }

    fn handle_frames(&mut self) -> Next {
        loop {
            let frame = self.framer.next_frame();
            let failure = match frame {
                Frame::Value(r) => {
                    let text = self.framer.bytes(r.clone());
                    let message = match std::str::from_utf8(text) {
                        Ok(_) => rpc::parse_message(text),
                        Err(e) => Err(RpcError::new(
                            rpc::PARSE_ERROR,
                            format!(
                                "invalid UTF-8 at byte {} (byte {} of the request that began at \
                                 byte {})",
                                self.framer.offset(r.start + e.valid_up_to()),
                                e.valid_up_to(),
                                self.framer.offset(r.start)
                            ),
                        )),
                    };
                    match message {
                        Ok(m) => match self.ask(m) {
                            Next::Continue => continue,
                            Next::Close => return Next::Close,
                        },
                        Err(e) => e,
                    }
                }
                Frame::Incomplete => {
                    self.framer.compact();
                    return Next::Continue;
                }
                Frame::TooLarge => RpcError::new(
                    rpc::TOO_LARGE,
                    format!(
                        "request too large: over {} bytes (control_max_request); send smaller batches",
                        self.framer.max()
                    ),
                ),
                Frame::NotStructured(at) => RpcError::new(
                    rpc::INVALID_REQUEST,
                    format!("a message must be a JSON object or array (byte {at})"),
                ),
                Frame::TooDeep(at) => RpcError::new(
                    rpc::PARSE_ERROR,
                    format!(
                        "JSON nested deeper than {} levels at byte {at}",
                        rpc::MAX_DEPTH
                    ),
                ),
            };
            // The stream cannot be resynchronized after any of these.
            let _ = write_line(
                &mut self.stream,
                &rpc::error_response(&Value::Null, &failure),
            );
            self.linger();
            return Next::Close;
        }
    }

    /// A lingering close after a refused stream: the peer may still be
    /// writing the rest of an oversized request, and closing at once would
    /// fail its write (EPIPE) before it reads why. So: no more answers
    /// (shutdown of our side), then the rest of its input is read and
    /// discarded until it closes, bounded in time and bytes.
    fn linger(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let until = Instant::now() + LINGER_TIME;
        let mut left = LINGER_BYTES.max(self.framer.max());
        let mut buf = [0u8; 4096];
        while left > 0 && Instant::now() < until {
            match self.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => left = left.saturating_sub(n),
                Err(e) if is_tick(&e) => {}
                Err(_) => return,
            }
        }
    }

    /// Sends one message to the main thread and writes its answer.
    fn ask(&mut self, message: Message) -> Next {
        self.stats.messages.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel::bounded(1);
        if self.to_daemon.send(Request { message, reply: tx }).is_err() {
            return Next::Close; // the daemon is stopping
        }
        let Ok(reply) = rx.recv() else {
            return Next::Close;
        };
        if let Some(answer) = reply.answer {
            if write_line(&mut self.stream, &answer).is_err() {
                return Next::Close;
            }
        }

        if reply.subscription.is_some() {
            self.subscription = reply.subscription;
        }
        Next::Continue
    }

    /// Writes the events queued for a subscribed connection. The daemon
    /// drops a subscriber whose queue overflows; the client is told why.
    fn forward_events(&mut self) -> Next {
        let Some(sub) = &self.subscription else {
            return Next::Continue;
        };
        let mut out = Vec::new();
        let mut closed = false;
        for _ in 0..EVENTS_PER_TICK {
            match sub.try_recv() {
                Ok(event) => {
                    out.extend_from_slice(
                        br#"{"jsonrpc":"2.0","method":"keepalive.event","params":"#,
                    );
                    out.extend_from_slice(event.as_bytes());
                    out.extend_from_slice(b"}\n");
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed {
            let note = rpc::notification(
                "keepalive.unsubscribed",
                serde_json::json!({
                    "reason": "the event queue of this connection overflowed (the client read too slowly) or the daemon stopped"
                }),
            );
            out.extend_from_slice(note.to_string().as_bytes());
            out.push(b'\n');
        }
        if !out.is_empty() && self.stream.write_all(&out).is_err() {
            return Next::Close;
        }
        if closed {
            Next::Close
        } else {
            Next::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept loop ends on stop even when the socket's path no longer
    /// leads to it (deleted, or taken by another daemon meanwhile): once,
    /// a daemon stopped this way waited for its control thread forever.
    #[test]
    fn stop_ends_the_accept_loop_whatever_became_of_the_path() {
        let dir = tempfile::tempdir().unwrap();
        for replace in [false, true] {
            let path = dir.path().join("k.sock");
            let (tx, _rx) = channel::unbounded();
            let limits = Limits {
                max_connections: 4,
                max_request: 1 << 20,
            };
            let server = start(&path, limits, tx).unwrap();
            std::fs::remove_file(&path).unwrap();
            // Another listener at the same path, which would take the
            // wake-up connection.
            let _other = replace.then(|| UnixListener::bind(&path).unwrap());
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                server.stop();
                let _ = done_tx.send(());
            });
            assert!(
                done_rx.recv_timeout(Duration::from_secs(5)).is_ok(),
                "stop() did not return (path replaced: {replace})"
            );
            let _ = std::fs::remove_file(&path);
        }
    }
}
