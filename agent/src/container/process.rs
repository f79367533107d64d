//! One container process (the init or an exec'd one): how it is started through a helper with
//! pipes or a terminal, and its stdio, signals and exit status afterwards.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::runtime::Op;
use super::stdio::{self, OutputBuffer, Pipes, Stdin};
use super::{Containers, Error, Result, HELPER_TIMEOUT};

/// A started process of a container.
pub struct Process {
    pub exec_id: String,
    pub pid: i32,
    exit: watch::Receiver<Option<i32>>,
    stdin: tokio::sync::Mutex<Option<Stdin>>,
    stdout: Arc<OutputBuffer>,
    stderr: Arc<OutputBuffer>,
    /// The PTY master (terminal processes).
    tty: Option<OwnedFd>,
    pumps: Mutex<Vec<JoinHandle<()>>>,
    waited: AtomicBool,
}

/// What describes the process for error messages: `container c1 exec e1`.
pub fn describe(cid: &str, exec_id: &str) -> String {
    if exec_id.is_empty() || exec_id == cid {
        format!("container {cid}")
    } else {
        format!("container {cid} exec {exec_id}")
    }
}

impl Process {
    /// The exit status, once the process was reaped.
    pub fn exit_status(&self) -> Option<i32> {
        *self.exit.borrow()
    }

    /// Waits for the exit; Kata's status (exit code, or 128 + signal).
    pub async fn wait(&self) -> i32 {
        let mut rx = self.exit.clone();
        let status = match rx.wait_for(Option::is_some).await {
            Ok(s) => s.unwrap_or(255),
            Err(_) => self.exit_status().unwrap_or(255),
        };
        self.waited.store(true, Ordering::Relaxed);
        status
    }

    /// Exited, waited for, and both streams handed their end to a reader: the status.
    pub fn consumed(&self) -> Option<i32> {
        let s = self.exit_status()?;
        (self.waited.load(Ordering::Relaxed) && self.stdout.eof_read() && self.stderr.eof_read()).then_some(s)
    }

    /// Sends `sig` (None: only checks that the process exists, kill(2)'s signal 0). A process
    /// already reaped (or gone) is NOT_FOUND "process already finished".
    pub fn signal(&self, what: &str, sig: Option<Signal>) -> Result<()> {
        let finished = || Error::not_found(format!("{what}: process already finished"));
        if self.exit_status().is_some() {
            return Err(finished());
        }
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::ESRCH) => Err(finished()),
            Err(e) => {
                Err(Error::internal(format!("{what}: kill({}, {}): {e}", self.pid, sig.map_or("0", |s| s.as_str()))))
            }
        }
    }

    /// Output: blocks until data or the end (empty).
    pub async fn read(&self, stderr: bool, len: u32) -> Vec<u8> {
        let buf = if stderr { &self.stderr } else { &self.stdout };
        buf.read(len as usize).await
    }

    pub async fn write_stdin(&self, what: &str, data: &[u8]) -> Result<u32> {
        let guard = self.stdin.lock().await;
        let stdin = guard.as_ref().ok_or_else(|| Error::precondition(format!("{what}: stdin is closed")))?;
        match stdin.write_all(data).await {
            Ok(n) => Ok(n as u32),
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) || e.raw_os_error() == Some(libc::EIO) => {
                Err(Error::precondition(format!("{what}: the process no longer reads its stdin")))
            }
            Err(e) => Err(Error::internal(format!("{what}: write stdin: {e}"))),
        }
    }

    /// End of input: the pipe is closed; a terminal gets ^D. Closing twice is fine.
    pub async fn close_stdin(&self, what: &str) -> Result<()> {
        let taken = self.stdin.lock().await.take();
        if let Some(stdin) = taken {
            stdin.close().await.map_err(|e| Error::internal(format!("{what}: close stdin: {e}")))?;
        }
        Ok(())
    }

    pub fn resize(&self, what: &str, rows: u32, cols: u32) -> Result<()> {
        let master =
            self.tty.as_ref().ok_or_else(|| Error::precondition(format!("{what}: the process has no terminal")))?;
        stdio::set_winsize(master, rows, cols).map_err(|e| Error::internal(format!("{what}: TIOCSWINSZ: {e}")))
    }

    /// Stops the pumps and ends the streams (readers get EOF); drops stdin.
    pub fn shutdown(&self) {
        for p in self.pumps.lock().unwrap().drain(..) {
            p.abort();
        }
        self.stdout.close();
        self.stderr.close();
        if let Ok(mut s) = self.stdin.try_lock() {
            s.take();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        for p in self.pumps.lock().unwrap().drain(..) {
            p.abort();
        }
    }
}

/// How the process's stdio is set up.
enum Io {
    Pipes(Pipes),
    Tty { socket: PathBuf, listener: tokio::net::UnixListener },
}

impl Containers {
    /// Runs the helper operation `op` (Create or Exec, given the console socket if any) and
    /// wraps the process it reports. Output is buffered from here on.
    pub(super) async fn spawn_process(
        &self,
        cid: &str,
        exec_id: &str,
        terminal: bool,
        console_size: Option<(u32, u32)>,
        op: impl FnOnce(Option<PathBuf>) -> Op,
    ) -> Result<Arc<Process>> {
        let what = describe(cid, exec_id);
        let io = if terminal {
            let dir = self.console_dir();
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::internal(format!("{what}: mkdir {}: {e}", dir.display())))?;
            let socket = dir.join(format!("{}.sock", self.next()));
            let _ = std::fs::remove_file(&socket);
            let listener = tokio::net::UnixListener::bind(&socket)
                .map_err(|e| Error::internal(format!("{what}: console socket {}: {e}", socket.display())))?;
            Io::Tty { socket, listener }
        } else {
            Io::Pipes(Pipes::new().map_err(|e| Error::internal(format!("{what}: stdio pipes: {e}")))?)
        };
        let started = Instant::now();
        let (reply, parts) = match io {
            Io::Pipes(p) => {
                let req = self.runtime.request(cid, true, op(None));
                let reply = self.runtime.call(&req, Some(p.child), HELPER_TIMEOUT).await;
                (reply, Ok((None, p.stdin, Some(p.stdout), Some(p.stderr))))
            }
            Io::Tty { socket, listener } => {
                let req = self.runtime.request(cid, false, op(Some(socket.clone())));
                // The terminal is received (and sized) while the helper still runs: an exec'd
                // process is already running when the helper answers.
                let accept = tokio::spawn(async move {
                    let m = receive_master(&listener).await?;
                    if let Some((rows, cols)) = console_size {
                        let _ = stdio::set_winsize(&m, rows, cols);
                    }
                    Ok(m)
                });
                let reply = self.runtime.call(&req, None, HELPER_TIMEOUT).await;
                let master = if reply.is_ok() {
                    match tokio::time::timeout(Duration::from_secs(10), accept).await {
                        Ok(Ok(Ok(m))) => Ok(m),
                        Ok(Ok(Err(e))) => Err(e),
                        _ => Err("the container did not send its terminal within 10s".to_string()),
                    }
                } else {
                    accept.abort();
                    Err(String::new())
                };
                let _ = std::fs::remove_file(&socket);
                let parts = master.and_then(|m| {
                    let writer = stdio::dup_cloexec(&m).map_err(|e| format!("dup terminal: {e}"))?;
                    Ok((Some(m), writer, None, None))
                });
                (reply, parts)
            }
        };
        let reply = reply.map_err(|e| Error::helper(&what, e))?;
        let pid = reply.pid.ok_or_else(|| Error::internal(format!("{what}: the runtime helper reported no pid")))?;
        let exit = self.reaper.claim(pid, started);
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            // A dropped sender only happens if the claim is withdrawn; report 255 then.
            let status = exit.await.unwrap_or(255);
            let _ = tx.send(Some(status));
        });
        let (master, stdin_fd, out, err) = match parts {
            Ok(p) => p,
            Err(e) => {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
                return Err(Error::internal(format!("{what}: terminal: {e}")));
            }
        };
        let tty = master.is_some();
        let stdout = Arc::new(OutputBuffer::default());
        let stderr = Arc::new(if tty { OutputBuffer::ended() } else { OutputBuffer::default() });
        let mut pumps = Vec::new();
        let out_fd = match master.as_ref() {
            Some(m) => Some(stdio::dup_cloexec(m).and_then(|fd| stdio::set_nonblocking(&fd).map(|_| fd))),
            None => out.map(Ok),
        };
        for (fd, buf) in [(out_fd, &stdout), (err.map(Ok), &stderr)] {
            match fd {
                Some(Ok(fd)) => pumps.push(tokio::spawn(stdio::pump(fd, buf.clone()))),
                Some(Err(e)) => return Err(Error::internal(format!("{what}: terminal: {e}"))),
                None => {}
            }
        }
        let stdin = Stdin::new(stdin_fd, tty).map_err(|e| Error::internal(format!("{what}: stdin: {e}")))?;
        Ok(Arc::new(Process {
            exec_id: exec_id.to_string(),
            pid,
            exit: rx,
            stdin: tokio::sync::Mutex::new(Some(stdin)),
            stdout,
            stderr,
            tty: master,
            pumps: Mutex::new(pumps),
            waited: AtomicBool::new(false),
        }))
    }
}

/// Accepts the container's connection on the console socket and receives the PTY master it
/// sends with SCM_RIGHTS (runc's console-socket protocol).
async fn receive_master(listener: &tokio::net::UnixListener) -> std::result::Result<OwnedFd, String> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let (stream, _) = listener.accept().await.map_err(|e| format!("accept on console socket: {e}"))?;
    loop {
        stream.readable().await.map_err(|e| format!("console socket: {e}"))?;
        let got = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut buf = [0u8; 4096];
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(std::io::Error::from)?;
            let mut fd = None;
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    // SAFETY: fds received with SCM_RIGHTS are new descriptors owned by us.
                    let mut owned: Vec<OwnedFd> = fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }).collect();
                    if !owned.is_empty() {
                        fd = Some(owned.swap_remove(0));
                    }
                }
            }
            Ok((msg.bytes, fd))
        });
        match got {
            Ok((_, Some(fd))) => {
                stdio::set_nonblocking(&fd).map_err(|e| format!("terminal: {e}"))?;
                return Ok(fd);
            }
            Ok((0, None)) => return Err("console socket closed without a terminal".into()),
            Ok((_, None)) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("console socket: {e}")),
        }
    }
}
