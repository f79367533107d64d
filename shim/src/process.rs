//! A process of a container as the shim tracks it (the init process or an exec), and the
//! pumps that copy its stdio between containerd's FIFOs and the agent's stream RPCs.
//!
//! Output ordering guarantee: the exit of a process is published only after its stdout and
//! stderr reached end of stream (bounded by [`OUTPUT_DRAIN`]), so nothing written just before
//! exit is lost. For a FIFO, "delivered" means read by the client, not just written into the
//! pipe: CRI-O's ExecSync closes its FIFOs as soon as `Wait` returns, without waiting for its
//! copy goroutines, so output still in the pipe then was lost (an empty stdout with exit 0).
//! The pump therefore waits, bounded by [`CONSUME_WAIT`], until the pipe is empty.

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

/// How long, after the last write, output may sit unread in a FIFO before the exit is published
/// anyway (a client that never reads must not hold the exit back).
pub const CONSUME_WAIT: Duration = Duration::from_secs(2);

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
        if !out.wait_consumed(CONSUME_WAIT).await {
            debug!(log, "output not read by the client within the bound"; "stream" => if stderr { "stderr" } else { "stdout" });
        }
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

    /// Waits until the client has read everything written (a FIFO's pipe is empty), at most
    /// `bound`; `true` when it has. A file is always consumed.
    async fn wait_consumed(&self, bound: Duration) -> bool {
        let OutputSink::Fifo(s) = self else { return true };
        wait_pipe_empty(std::os::fd::AsRawFd::as_raw_fd(s), bound).await
    }
}

/// Bytes written to a pipe and not yet read (`FIONREAD`); `None` when the fd cannot tell.
fn unread_bytes(fd: std::os::fd::RawFd) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which is live for the call.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    (r == 0).then_some(n.max(0) as usize)
}

/// Polls until the pipe behind `fd` is empty, at most `bound` (1 ms steps growing to 10 ms).
async fn wait_pipe_empty(fd: std::os::fd::RawFd, bound: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    let mut step = Duration::from_millis(1);
    loop {
        match unread_bytes(fd) {
            Some(0) | None => return true,
            Some(_) if tokio::time::Instant::now() >= deadline => return false,
            Some(_) => {}
        }
        tokio::time::sleep(step).await;
        step = (step * 2).min(Duration::from_millis(10));
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

    /// The pump's last step: the pipe must be empty (read by the client) before the exit can
    /// be published; a client that never reads holds it back only for the bound.
    #[tokio::test]
    async fn output_waits_until_the_client_read_it() {
        let dir = std::env::temp_dir().join(format!("podvisor-consume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("stdout");
        let _ = std::fs::remove_file(&fifo);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut out = open_output(fifo.to_str().unwrap()).await.unwrap();
        out.write_all(b"100000 100000\n").await.unwrap();
        assert!(!out.wait_consumed(Duration::from_millis(50)).await, "nothing has read it yet");

        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                let mut f = std::fs::File::open(&fifo).unwrap();
                std::thread::sleep(Duration::from_millis(100));
                let mut buf = [0u8; 64];
                std::io::Read::read(&mut f, &mut buf).unwrap()
            })
        };
        assert!(out.wait_consumed(Duration::from_secs(20)).await, "the reader took it");
        assert_eq!(reader.join().unwrap(), 14);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stdio_uris() {
        assert_eq!(strip_scheme("file:///tmp/x").unwrap(), PathBuf::from("/tmp/x"));
        assert_eq!(strip_scheme("/tmp/y").unwrap(), PathBuf::from("/tmp/y"));
        assert!(strip_scheme("binary:///bin/logger").unwrap_err().to_string().contains("not supported"));
    }
}
