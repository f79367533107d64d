//! The kubelet's end of CRI streaming (`Exec`, `Attach`). The URL a CRI runtime returns is
//! served by containerd's streaming server, which speaks the Kubernetes remotecommand protocol;
//! this client uses its WebSocket form, subprotocol `v4.channel.k8s.io`: every binary message
//! starts with a channel byte — 0 stdin, 1 stdout, 2 stderr, 3 error (a `metav1.Status` JSON
//! when the command ends), 4 resize (`{"Width":w,"Height":h}`, TTY only).

use std::io::ErrorKind;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use tungstenite::{Message, WebSocket};

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;

/// How long one blocking read waits before the caller's deadline is checked again.
const POLL: Duration = Duration::from_millis(200);

/// One connected exec or attach stream and everything it has delivered so far.
pub struct Stream {
    ws: WebSocket<TcpStream>,
    url: String,
    /// Everything received on the stdout channel (a TTY's whole output).
    pub stdout: Vec<u8>,
    /// Everything received on the stderr channel.
    pub stderr: Vec<u8>,
    /// The error channel's final `metav1.Status`, once the command has ended.
    pub status: Option<serde_json::Value>,
    /// The server closed the connection.
    pub closed: bool,
}

impl Stream {
    /// Connects to an `http://host:port/exec/<token>` (or `/attach/`) URL.
    pub fn connect(url: &str) -> Result<Self, String> {
        let ws_url = url.replacen("http://", "ws://", 1);
        let addr = ws_url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .ok_or_else(|| format!("streaming URL {url:?} is not http://host:port/..."))?
            .to_string();
        let tcp = TcpStream::connect(&addr).map_err(|e| format!("connect to the streaming server {addr}: {e}"))?;
        let mut request = ws_url.as_str().into_client_request().map_err(|e| format!("request for {url}: {e}"))?;
        let headers = request.headers_mut();
        headers.insert("Sec-WebSocket-Protocol", HeaderValue::from_static("v4.channel.k8s.io"));
        headers.insert("Origin", HeaderValue::from_static("http://localhost"));
        let (ws, _response) =
            tungstenite::client::client(request, tcp).map_err(|e| format!("WebSocket handshake with {url}: {e}"))?;
        ws.get_ref().set_read_timeout(Some(POLL)).map_err(|e| format!("set_read_timeout: {e}"))?;
        Ok(Self { ws, url: url.to_string(), stdout: Vec::new(), stderr: Vec::new(), status: None, closed: false })
    }

    fn send(&mut self, channel: u8, data: &[u8]) -> Result<(), String> {
        let mut msg = Vec::with_capacity(data.len() + 1);
        msg.push(channel);
        msg.extend_from_slice(data);
        self.ws.send(Message::Binary(msg.into())).map_err(|e| format!("send on channel {channel} to {}: {e}", self.url))
    }

    /// Writes to the process's stdin.
    pub fn stdin(&mut self, data: &[u8]) -> Result<(), String> {
        self.send(STDIN, data)
    }

    /// Resizes the terminal (TTY streams only).
    pub fn resize(&mut self, width: u16, height: u16) -> Result<(), String> {
        self.send(RESIZE, format!(r#"{{"Width":{width},"Height":{height}}}"#).as_bytes())
    }

    /// Reads one message (or times out after `POLL`); false once the server has closed.
    fn read_once(&mut self) -> Result<bool, String> {
        if self.closed {
            return Ok(false);
        }
        match self.ws.read() {
            Ok(Message::Binary(data)) => {
                let Some((&channel, payload)) = data.split_first() else { return Ok(true) };
                match channel {
                    STDOUT => self.stdout.extend_from_slice(payload),
                    STDERR => self.stderr.extend_from_slice(payload),
                    ERROR if !payload.is_empty() => {
                        let status = serde_json::from_slice(payload).map_err(|e| {
                            format!("error channel of {}: {e}: {:?}", self.url, String::from_utf8_lossy(payload))
                        })?;
                        self.status = Some(status);
                    }
                    _ => {}
                }
                Ok(true)
            }
            Ok(Message::Close(_)) => {
                self.closed = true;
                Ok(false)
            }
            Ok(_) => Ok(true),
            Err(tungstenite::Error::Io(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Ok(true)
            }
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                self.closed = true;
                Ok(false)
            }
            Err(e) => Err(format!("read from {}: {e}", self.url)),
        }
    }

    /// Reads until `done` holds; the error names `what` and shows what arrived.
    pub fn read_until(&mut self, timeout: Duration, what: &str, done: impl Fn(&Self) -> bool) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if Instant::now() > deadline || !self.read_once()? && !done(self) {
                return Err(format!(
                    "{what}: not seen within {timeout:?} (closed: {}); stdout {:?}, stderr {:?}, status {:?}",
                    self.closed,
                    String::from_utf8_lossy(&self.stdout),
                    String::from_utf8_lossy(&self.stderr),
                    self.status
                ));
            }
        }
        Ok(())
    }

    /// Stdout so far, as text.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stderr so far, as text.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Reads to the end of the stream and returns the command's exit code.
    pub fn wait(&mut self, timeout: Duration) -> Result<i32, String> {
        self.read_until(timeout, "the end of the stream", |s| s.closed)?;
        match &self.status {
            Some(status) => exit_code(status),
            None => Err(format!("{} closed without a status on the error channel", self.url)),
        }
    }

    /// Closes the stream from the client's side (`kubectl attach` detaching).
    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.read_once(), Ok(true)) {}
    }
}

/// The exit code in a remotecommand `metav1.Status`: `Success` is 0, `NonZeroExitCode` carries
/// the code in `details.causes[reason=ExitCode].message`; anything else is an error.
pub fn exit_code(status: &serde_json::Value) -> Result<i32, String> {
    match status["status"].as_str() {
        Some("Success") => Ok(0),
        _ if status["reason"] == "NonZeroExitCode" => status["details"]["causes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["reason"] == "ExitCode")
            .and_then(|c| c["message"].as_str()?.parse().ok())
            .ok_or_else(|| format!("NonZeroExitCode status without an ExitCode cause: {status}")),
        _ => Err(format!("the stream failed: {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::exit_code;
    use serde_json::json;

    #[test]
    fn exit_codes_from_remotecommand_statuses() {
        assert_eq!(exit_code(&json!({"metadata": {}, "status": "Success"})), Ok(0));
        let failed = json!({
            "status": "Failure", "reason": "NonZeroExitCode",
            "message": "command terminated with non-zero exit code: 3",
            "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}
        });
        assert_eq!(exit_code(&failed), Ok(3));
        let broken = json!({"status": "Failure", "reason": "InternalError", "message": "boom"});
        assert!(exit_code(&broken).unwrap_err().contains("boom"));
        assert!(exit_code(&json!({"status": "Failure", "reason": "NonZeroExitCode"})).is_err());
    }
}
