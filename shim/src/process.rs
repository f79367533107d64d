//! A process of a container as the shim tracks it (the init process or an exec), and the
//! pumps that copy its stdio between containerd's FIFOs and the agent's stream RPCs.
//!
//! Output ordering guarantee: the exit of a process is published only after its stdout and
//! stderr reached end of stream (bounded by [`OUTPUT_DRAIN`]), so nothing written just before
//! exit is lost.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use slog::{debug, warn, Logger};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::agent::Agent;

/// How long output may keep flowing after the process exited (background children holding
/// the pipe open).
pub const OUTPUT_DRAIN: Duration = Duration::from_secs(5);

/// Life-cycle state, as containerd's `Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Frozen (init process of a paused container).
    Paused,
    /// Exited.
    Stopped,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status (128 + signal when killed by one).
    pub code: u32,
    /// When.
    pub at: SystemTime,
}

/// containerd's stdio for a process: FIFO paths (or empty).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stdio {
    /// stdin FIFO.
    pub stdin: String,
    /// stdout FIFO or file.
    pub stdout: String,
    /// stderr FIFO or file.
    pub stderr: String,
    /// A terminal: stdout carries both streams, there is no stderr.
    pub terminal: bool,
}

/// One process.
pub struct Process {
    /// The container it runs in.
    pub container_id: String,
    /// The exec id; empty for the init process.
    pub exec_id: String,
    /// Its stdio.
    pub stdio: Stdio,
    status: Mutex<Status>,
    exit: watch::Sender<Option<Exit>>,
    stdin_closed: Arc<Notify>,
    output: Mutex<Vec<JoinHandle<()>>>,
}

impl Process {
    /// A new process in state `Created`.
    pub fn new(container_id: &str, exec_id: &str, stdio: Stdio) -> Arc<Process> {
        Arc::new(Process {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            stdio,
            status: Mutex::new(Status::Created),
            exit: watch::channel(None).0,
            stdin_closed: Arc::new(Notify::new()),
            output: Mutex::new(Vec::new()),
        })
    }

    /// The exec id the agent knows the process by (Kata: the container id for init).
    pub fn agent_exec_id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    /// The current state.
    pub fn status(&self) -> Status {
        *self.status.lock().unwrap()
    }

    /// Sets the state (a stopped process stays stopped).
    pub fn set_status(&self, s: Status) {
        let mut cur = self.status.lock().unwrap();
        if *cur != Status::Stopped {
            *cur = s;
        }
    }

    /// The exit, once the process has exited.
    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                return Exit { code: 255, at: SystemTime::now() };
            }
        }
    }

    /// Records the exit (first one wins).
    pub fn set_exit(&self, code: u32) -> Exit {
        *self.status.lock().unwrap() = Status::Stopped;
        let mut exit = Exit { code, at: SystemTime::now() };
        self.exit.send_if_modified(|e| match e {
            Some(old) => {
                exit = *old;
                false
            }
            None => {
                *e = Some(exit);
                true
            }
        });
        exit
    }

    /// Closes the process's stdin once what was written so far is delivered (`CloseIO`).
    pub fn close_stdin(&self) {
        self.stdin_closed.notify_one();
    }

    /// Starts copying stdio between containerd's FIFOs and the agent. Output pumps are kept
    /// so that [`Process::drain_output`] can wait for them.
    pub async fn start_io(self: &Arc<Self>, agent: Arc<dyn Agent>, log: &Logger) -> std::io::Result<()> {
        let mut handles = Vec::new();
        let streams = [(&self.stdio.stdout, false), (&self.stdio.stderr, true)];
        for (path, is_stderr) in streams {
            if path.is_empty() || (is_stderr && self.stdio.terminal) {
                continue;
            }
            let out = open_output(path).await?;
            let (agent, p, log) = (agent.clone(), self.clone(), log.clone());
            handles.push(tokio::spawn(async move { p.pump_output(agent, out, is_stderr, log).await }));
        }
        *self.output.lock().unwrap() = handles;
        if !self.stdio.stdin.is_empty() {
            let input = open_input(&self.stdio.stdin)?;
            let (p, log) = (self.clone(), log.clone());
            tokio::spawn(async move { p.pump_input(agent, input, log).await });
        }
        Ok(())
    }

    async fn pump_output(&self, agent: Arc<dyn Agent>, mut out: OutputSink, stderr: bool, log: Logger) {
        let (cid, eid) = (self.container_id.as_str(), self.agent_exec_id());
        loop {
            match agent.read_stream(cid, eid, stderr).await {
                Ok(data) if data.is_empty() => break,
                Ok(data) => {
                    if let Err(e) = out.write_all(&data).await {
                        warn!(log, "cannot deliver output; discarding the rest"; "stream" => if stderr { "stderr" } else { "stdout" }, "error" => %e);
                        break;
                    }
                }
                Err(e) => {
                    debug!(log, "output stream ended"; "error" => %e);
                    break;
                }
            }
        }
        let _ = out.flush().await;
    }

    async fn pump_input(&self, agent: Arc<dyn Agent>, mut input: tokio::net::unix::pipe::Receiver, log: Logger) {
        let (cid, eid) = (self.container_id.clone(), self.agent_exec_id().to_string());
        let mut buf = vec![0u8; 32 * 1024];
        let mut closing = false;
        loop {
            let n = if closing {
                // CloseIO: take what is already in the FIFO, then stop. A plain non-blocking
                // read(2): tokio's try_read reports WouldBlock until it has seen readiness,
                // even with data in the pipe.
                let fd = std::os::fd::AsRawFd::as_raw_fd(&input);
                // SAFETY: reads into a live buffer of the given length from an fd we own.
                let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                r.max(0) as usize
            } else {
                tokio::select! {
                    r = input.read(&mut buf) => r.unwrap_or(0),
                    _ = self.stdin_closed.notified() => { closing = true; continue; }
                }
            };
            if n == 0 {
                if closing {
                    break;
                }
                // Opened read-write, a FIFO never reports end of stream: wait for CloseIO.
                self.stdin_closed.notified().await;
                closing = true;
                continue;
            }
            let mut sent = 0;
            while sent < n {
                match agent.write_stdin(&cid, &eid, buf[sent..n].to_vec()).await {
                    Ok(0) | Err(_) => {
                        debug!(log, "stdin no longer accepted");
                        return;
                    }
                    Ok(k) => sent += k as usize,
                }
            }
        }
        if let Err(e) = agent.close_stdin(&cid, &eid).await {
            debug!(log, "CloseStdin failed"; "error" => %e);
        }
    }

    /// Waits until all output is delivered, at most [`OUTPUT_DRAIN`].
    pub async fn drain_output(&self) {
        let handles = std::mem::take(&mut *self.output.lock().unwrap());
        let all = futures_join(handles);
        let _ = tokio::time::timeout(OUTPUT_DRAIN, all).await;
    }
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

/// Where output goes: a FIFO (containerd, CRI-O) or a regular file.
enum OutputSink {
    Fifo(tokio::net::unix::pipe::Sender),
    File(tokio::fs::File),
}

impl OutputSink {
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            OutputSink::Fifo(s) => s.write_all(data).await,
            OutputSink::File(f) => f.write_all(data).await,
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            OutputSink::Fifo(s) => s.flush().await,
            OutputSink::File(f) => f.flush().await,
        }
    }
}

fn strip_scheme(path: &str) -> std::io::Result<PathBuf> {
    if let Some(p) = path.strip_prefix("file://") {
        return Ok(PathBuf::from(p));
    }
    if path.contains("://") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("stdio URI {path:?} is not supported; use a FIFO or file:// path"),
        ));
    }
    Ok(PathBuf::from(path))
}

async fn open_output(path: &str) -> std::io::Result<OutputSink> {
    let p = strip_scheme(path)?;
    let is_fifo =
        std::fs::metadata(&p).map(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type())).unwrap_or(false);
    if is_fifo {
        // Read-write: opening never blocks and never fails for a reader that comes later.
        let s = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(&p)
            .map_err(|e| std::io::Error::new(e.kind(), format!("open stdio FIFO {}: {e}", p.display())))?;
        Ok(OutputSink::Fifo(s))
    } else {
        let f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("open stdio file {}: {e}", p.display())))?;
        Ok(OutputSink::File(f))
    }
}

fn open_input(path: &str) -> std::io::Result<tokio::net::unix::pipe::Receiver> {
    let p = strip_scheme(path)?;
    tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(&p)
        .map_err(|e| std::io::Error::new(e.kind(), format!("open stdin FIFO {}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exit_is_recorded_once_and_wakes_waiters() {
        let p = Process::new("c", "", Stdio::default());
        assert_eq!(p.agent_exec_id(), "c");
        p.set_status(Status::Running);
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait().await })
        };
        let first = p.set_exit(3);
        let second = p.set_exit(9);
        assert_eq!(first, second);
        assert_eq!(waiter.await.unwrap().code, 3);
        assert_eq!(p.status(), Status::Stopped);
        p.set_status(Status::Running);
        assert_eq!(p.status(), Status::Stopped, "a stopped process stays stopped");
    }

    #[test]
    fn stdio_uris() {
        assert_eq!(strip_scheme("file:///tmp/x").unwrap(), PathBuf::from("/tmp/x"));
        assert_eq!(strip_scheme("/tmp/y").unwrap(), PathBuf::from("/tmp/y"));
        assert!(strip_scheme("binary:///bin/logger").unwrap_err().to_string().contains("not supported"));
    }
}
