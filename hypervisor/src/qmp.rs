//! A small QMP client on serde_json: greeting and capabilities handshake, commands matched to
//! replies by `id`, and asynchronous events broadcast to subscribers.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

/// QMP errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QmpError {
    /// QEMU answered a command with an error.
    #[error("{command} failed: {class}: {desc}")]
    Command {
        /// The command name.
        command: String,
        /// QMP error class, e.g. `GenericError`.
        class: String,
        /// QEMU's message.
        desc: String,
    },
    /// The socket closed or broke; QEMU has most likely exited.
    #[error("connection to QEMU's QMP socket lost ({0}); QEMU has probably exited")]
    Disconnected(String),
    /// A message could not be understood.
    #[error("malformed QMP message: {0}")]
    Protocol(String),
    /// QEMU did not answer in time.
    #[error("{0} got no answer within {1:?}")]
    Timeout(String, Duration),
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting, with QEMU's version.
    Greeting {
        /// `major.minor.micro`.
        version: String,
    },
    /// A successful reply.
    Return {
        /// The `id` we sent.
        id: Option<u64>,
        /// The returned value.
        value: Value,
    },
    /// An error reply.
    Error {
        /// The `id` we sent.
        id: Option<u64>,
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// An asynchronous event.
    Event(Event),
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name, e.g. `STOP`.
    pub name: String,
    /// Event data (`null` when absent).
    pub data: Value,
}

/// Parses one line of QMP output.
pub fn parse_message(line: &str) -> Result<Message, QmpError> {
    let v: Value = serde_json::from_str(line).map_err(|e| QmpError::Protocol(format!("{e}: {line}")))?;
    let id = v.get("id").and_then(Value::as_u64);
    if let Some(qmp) = v.get("QMP") {
        let ver = &qmp["version"]["qemu"];
        return Ok(Message::Greeting { version: format!("{}.{}.{}", ver["major"], ver["minor"], ver["micro"]) });
    }
    if let Some(value) = v.get("return") {
        return Ok(Message::Return { id, value: value.clone() });
    }
    if let Some(err) = v.get("error") {
        return Ok(Message::Error {
            id,
            class: err["class"].as_str().unwrap_or("unknown").to_string(),
            desc: err["desc"].as_str().unwrap_or("").to_string(),
        });
    }
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        return Ok(Message::Event(Event {
            name: name.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
        }));
    }
    Err(QmpError::Protocol(line.to_string()))
}

/// Serializes a command with an id, as one line.
pub fn encode_command(id: u64, command: &str, arguments: Option<Value>) -> String {
    let mut v = json!({ "execute": command, "id": id });
    if let Some(a) = arguments {
        v["arguments"] = a;
    }
    let mut s = v.to_string();
    s.push('\n');
    s
}

type Pending = Arc<Mutex<Option<HashMap<u64, (String, oneshot::Sender<Result<Value, QmpError>>)>>>>;

/// The event sender; `None` once the connection is gone, so that subscribers see `Closed`.
type Events = Arc<Mutex<Option<broadcast::Sender<Event>>>>;

/// A connected, negotiated QMP session. Commands may run concurrently from many tasks (replies
/// are matched by id); none waits for another except while its line is written.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: Events,
    /// QEMU's version from the greeting.
    pub version: String,
    timeout: Duration,
}

impl Qmp {
    /// Connects to `path`, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| QmpError::Disconnected(format!("connect {}: {e}", path.display())))?;
        Qmp::from_stream(stream, timeout).await
    }

    /// Reads the greeting and negotiates capabilities on a connected stream (the fuzz tests use
    /// one end of a socket pair).
    pub async fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(timeout, lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout("QMP greeting".into(), timeout))?
            .map_err(|e| QmpError::Disconnected(e.to_string()))?
            .ok_or_else(|| QmpError::Disconnected("closed before the greeting".into()))?;
        let version = match parse_message(&greeting)? {
            Message::Greeting { version } => version,
            other => return Err(QmpError::Protocol(format!("expected greeting, got {other:?}"))),
        };
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let events: Events = Arc::new(Mutex::new(Some(broadcast::channel(64).0)));
        let reader_pending = pending.clone();
        let reader_events = events.clone();
        tokio::spawn(async move {
            let reason = loop {
                match lines.next_line().await {
                    Ok(Some(line)) => match parse_message(&line) {
                        Ok(Message::Return { id: Some(id), value }) => {
                            complete(&reader_pending, id, |_| Ok(value));
                        }
                        Ok(Message::Error { id: Some(id), class, desc }) => {
                            complete(&reader_pending, id, |command| Err(QmpError::Command { command, class, desc }));
                        }
                        Ok(Message::Event(e)) => {
                            if let Some(tx) = reader_events.lock().unwrap().as_ref() {
                                let _ = tx.send(e);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => {}
                    },
                    Ok(None) => break "end of stream".to_string(),
                    Err(e) => break e.to_string(),
                }
            };
            // Fail everything in flight, refuse new commands, and end every event subscription
            // (a wait for a guest acknowledgement ends now, not at its timeout).
            reader_events.lock().unwrap().take();
            if let Some(map) = reader_pending.lock().unwrap().take() {
                for (_, (_, tx)) in map {
                    let _ = tx.send(Err(QmpError::Disconnected(reason.clone())));
                }
            }
        });
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            events,
            version,
            timeout,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Subscribes to events that arrive from now on. Once the connection is gone the receiver
    /// reports `Closed`.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        match self.events.lock().unwrap().as_ref() {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut guard = self.pending.lock().unwrap();
            let map = guard.as_mut().ok_or_else(|| QmpError::Disconnected("connection closed".into()))?;
            map.insert(id, (command.to_string(), tx));
        }
        let line = encode_command(id, command, arguments);
        // A QEMU that stops reading must not hold every other command behind this write.
        let write = async {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.forget(id);
                return Err(QmpError::Disconnected(e.to_string()));
            }
            Err(_) => {
                self.forget(id);
                return Err(QmpError::Timeout(command.to_string(), self.timeout));
            }
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(QmpError::Disconnected("reader stopped".into())),
            Err(_) => {
                self.forget(id);
                Err(QmpError::Timeout(command.to_string(), self.timeout))
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Some(map) = self.pending.lock().unwrap().as_mut() {
            map.remove(&id);
        }
    }
}

fn complete(pending: &Pending, id: u64, result: impl FnOnce(String) -> Result<Value, QmpError>) {
    let entry = pending.lock().unwrap().as_mut().and_then(|m| m.remove(&id));
    if let Some((command, tx)) = entry {
        let _ = tx.send(result(command));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_message_kind() {
        let g = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;
        assert_eq!(parse_message(g).unwrap(), Message::Greeting { version: "7.2.22".into() });
        assert_eq!(
            parse_message(r#"{"return": {}, "id": 4}"#).unwrap(),
            Message::Return { id: Some(4), value: json!({}) }
        );
        assert_eq!(
            parse_message(r#"{"id": 5, "error": {"class": "GenericError", "desc": "no slot"}}"#).unwrap(),
            Message::Error { id: Some(5), class: "GenericError".into(), desc: "no slot".into() }
        );
        let e = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#;
        assert_eq!(parse_message(e).unwrap(), Message::Event(Event { name: "STOP".into(), data: Value::Null }));
        assert!(matches!(parse_message("{\"x\":1}"), Err(QmpError::Protocol(_))));
        assert!(matches!(parse_message("not json"), Err(QmpError::Protocol(_))));
    }

    #[test]
    fn commands_are_one_line_with_id() {
        let line = encode_command(7, "device_add", Some(json!({"driver": "pc-dimm", "id": "dimm0"})));
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["execute"], "device_add");
        assert_eq!(v["id"], 7);
        assert_eq!(v["arguments"]["driver"], "pc-dimm");
        assert!(encode_command(1, "quit", None).find("arguments").is_none());
    }

    /// A scripted QMP server on a socketpair-like unix listener.
    #[tokio::test]
    async fn handshake_commands_errors_events_and_disconnect() {
        let dir = std::env::temp_dir().join(format!("podvisor-qmp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": []}}\r\n").await.unwrap();
            while let Some(line) = lines.next_line().await.unwrap() {
                let v: Value = serde_json::from_str(&line).unwrap();
                let id = v["id"].clone();
                let reply = match v["execute"].as_str().unwrap() {
                    "qmp_capabilities" => json!({"return": {}, "id": id}),
                    "query-status" => {
                        w.write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\r\n").await.unwrap();
                        json!({"return": {"status": "internal-error", "running": false}, "id": id})
                    }
                    "bad" => {
                        json!({"error": {"class": "CommandNotFound", "desc": "The command bad has not been found"}, "id": id})
                    }
                    _ => break,
                };
                w.write_all(format!("{reply}\r\n").as_bytes()).await.unwrap();
            }
        });
        let qmp = Qmp::connect(&sock, Duration::from_secs(5)).await.unwrap();
        assert_eq!(qmp.version, "7.2.0");
        let mut events = qmp.subscribe();
        let status = qmp.execute("query-status", None).await.unwrap();
        assert_eq!(status["status"], "internal-error");
        assert_eq!(events.recv().await.unwrap().name, "STOP");
        let err = qmp.execute("bad", None).await.unwrap_err();
        assert!(err.to_string().contains("bad failed: CommandNotFound"), "{err}");
        let err = qmp.execute("quit", None).await.unwrap_err();
        assert!(matches!(err, QmpError::Disconnected(_)), "{err}");
        // Event waits end with the connection, as do subscriptions made after it.
        assert_eq!(events.recv().await.unwrap_err(), broadcast::error::RecvError::Closed);
        assert_eq!(qmp.subscribe().recv().await.unwrap_err(), broadcast::error::RecvError::Closed);
        server.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A command QEMU never answers does not hold up the others.
    #[tokio::test]
    async fn commands_run_concurrently() {
        let dir = std::env::temp_dir().join(format!("podvisor-qmp-conc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": []}}\r\n").await.unwrap();
            while let Ok(Some(line)) = lines.next_line().await {
                let v: Value = serde_json::from_str(&line).unwrap();
                if v["execute"] != "hang" {
                    let reply = json!({"return": {"status": "running"}, "id": v["id"]});
                    w.write_all(format!("{reply}\r\n").as_bytes()).await.unwrap();
                }
            }
        });
        let qmp = Arc::new(Qmp::connect(&sock, Duration::from_secs(30)).await.unwrap());
        let hung = tokio::spawn({
            let qmp = qmp.clone();
            async move { qmp.execute("hang", None).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let status = tokio::time::timeout(Duration::from_millis(100), qmp.execute("query-status", None))
            .await
            .expect("a command waited for an unanswered one")
            .unwrap();
        assert_eq!(status["status"], "running");
        assert!(!hung.is_finished());
        hung.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
