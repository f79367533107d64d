//! Ownership of helper processes (QEMU, vhost-device-vsock, virtiofsd): each child runs in its
//! own process group, is reaped by one waiter task, is killed when its guard is dropped, and its
//! stderr is logged (rate-limited, lines cut at 4 KiB: see `console`) and kept (last lines,
//! bounded) for error messages.

use std::collections::VecDeque;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slog::{debug, info, warn, Logger};
use tokio::process::{ChildStdout, Command};
use tokio::sync::{mpsc, watch};

use crate::console::{read_lines, Record, STDERR_LIMITS};
use crate::{Error, Result};

/// Number of output lines kept per child (and of the guest console) for error messages.
pub const TAIL_LINES: usize = 40;

/// Bytes of those lines kept at most (lines are cut at 4 KiB by [`crate::console`]).
pub const TAIL_BYTES: usize = 32 * 1024;

/// Last lines of some output, shared between a reader task and error paths. Bounded by
/// [`TAIL_LINES`] and [`TAIL_BYTES`] (the newest line is always kept).
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<TailInner>>);

#[derive(Default)]
struct TailInner {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    /// Appends a line, dropping the oldest beyond the limits.
    pub fn push(&self, line: String) {
        let mut q = self.0.lock().unwrap();
        q.bytes += line.len();
        q.lines.push_back(line);
        while q.lines.len() > TAIL_LINES || (q.bytes > TAIL_BYTES && q.lines.len() > 1) {
            if let Some(old) = q.lines.pop_front() {
                q.bytes -= old.len();
            }
        }
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().lines.iter().cloned().collect()
    }

    /// Bytes of text kept.
    pub fn bytes(&self) -> usize {
        self.0.lock().unwrap().bytes
    }

    /// The kept lines joined for an error message (`(no output)` when empty).
    pub fn joined(&self) -> String {
        let lines = self.lines();
        if lines.is_empty() {
            "(no output)".into()
        } else {
            lines.join("\n")
        }
    }
}

/// A running child process owned by podvisor.
pub struct ChildProcess {
    name: &'static str,
    pid: u32,
    signal_tx: mpsc::UnboundedSender<nix::sys::signal::Signal>,
    status: watch::Receiver<Option<ExitStatus>>,
    stderr_tail: Tail,
}

impl ChildProcess {
    /// Spawns `cmd` in a new process group with stdin closed and stderr captured. Each stderr
    /// line is logged with key `pid_key` = pid. Returns the child's stdout when it was piped.
    pub fn spawn(
        name: &'static str,
        mut cmd: Command,
        program: &Path,
        fix: &str,
        log: &Logger,
        pid_key: &'static str,
    ) -> Result<(ChildProcess, Option<ChildStdout>)> {
        cmd.stdin(Stdio::null()).stderr(Stdio::piped()).process_group(0).kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            what: name,
            path: program.to_path_buf(),
            fix: fix.to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let stdout = child.stdout.take();
        let stderr_tail = Tail::default();
        if let Some(stderr) = child.stderr.take() {
            let tail = stderr_tail.clone();
            let log = log.new(slog::o!(pid_key => pid, "source" => name));
            // Kata's markers around a helper's relayed stderr, e.g.
            // `Start logging QEMU (qemuPid=123)` ... `Stop logging QEMU (qemuPid=123)`.
            info!(log, "Start logging {} ({}={})", name, pid_key, pid);
            tokio::spawn(async move {
                // Bounded: the guest can make these helpers print (see `console`).
                read_lines(stderr, STDERR_LIMITS, &tail, |r| match r {
                    Record::Line(line) => warn!(log, "{}", line),
                    Record::Suppressed(n) => warn!(
                        log,
                        "{}: suppressed {} stderr lines (more than {} lines/s)", name, n, STDERR_LIMITS.per_sec
                    ),
                })
                .await;
                info!(log, "Stop logging {} ({}={})", name, pid_key, pid);
            });
        }
        let (status_tx, status) = watch::channel(None);
        let (signal_tx, mut signal_rx) = mpsc::unbounded_channel();
        let wlog = log.clone();
        tokio::spawn(async move {
            // This task is the only one that reaps the child, so the pid stays valid for signals
            // sent from here until `wait` completes.
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    Some(sig) = signal_rx.recv() => {
                        // The whole group: helpers such as virtiofsd fork workers of their own.
                        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), sig);
                    }
                }
            };
            match status {
                Ok(s) => {
                    debug!(wlog, "child exited"; "name" => name, "pid" => pid, "status" => %s);
                    let _ = status_tx.send(Some(s));
                }
                Err(e) => {
                    warn!(wlog, "waiting for child failed"; "name" => name, "pid" => pid, "error" => %e);
                    let _ = status_tx.send(Some(std::os::unix::process::ExitStatusExt::from_raw(255 << 8)));
                }
            }
        });
        info!(log, "started {}", name; "pid" => pid);
        Ok((ChildProcess { name, pid, signal_tx, status, stderr_tail }, stdout))
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The program's role, e.g. `QEMU`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The exit status, if the child has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        *self.status.borrow()
    }

    /// Waits for the child to exit.
    pub async fn wait(&self) -> ExitStatus {
        let mut rx = self.status.clone();
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return s;
            }
            if rx.changed().await.is_err() {
                return (*rx.borrow()).unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(255 << 8));
            }
        }
    }

    /// Sends a signal unless the child has already exited.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if self.exited().is_none() {
            let _ = self.signal_tx.send(sig);
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once the child is reaped.
    pub async fn terminate(&self, grace: Duration) -> ExitStatus {
        use nix::sys::signal::Signal;
        self.signal(Signal::SIGTERM);
        match tokio::time::timeout(grace, self.wait()).await {
            Ok(s) => s,
            Err(_) => {
                self.signal(Signal::SIGKILL);
                self.wait().await
            }
        }
    }

    /// SIGKILL and reap.
    pub async fn kill(&self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        self.wait().await
    }

    /// A handle that waits for this child's exit without owning it (for a watcher task).
    pub fn exit_watch(&self) -> ExitWatch {
        ExitWatch { name: self.name, pid: self.pid, status: self.status.clone() }
    }

    /// Last stderr lines.
    pub fn stderr_tail(&self) -> &Tail {
        &self.stderr_tail
    }

    /// The error to report when this child exited while it was needed.
    pub fn died_early(&self, status: ExitStatus) -> Error {
        Error::DiedEarly {
            what: self.name,
            pid: self.pid,
            status: describe_status(status),
            tail: self.stderr_tail.joined(),
        }
    }
}

/// Waits for a [`ChildProcess`]'s exit (see [`ChildProcess::exit_watch`]).
#[derive(Clone)]
pub struct ExitWatch {
    /// The program's role, e.g. `virtiofsd`.
    pub name: &'static str,
    /// Its pid.
    pub pid: u32,
    status: watch::Receiver<Option<ExitStatus>>,
}

impl ExitWatch {
    /// Waits for the child to exit (at once if it has).
    pub async fn wait(&mut self) -> ExitStatus {
        loop {
            if let Some(s) = *self.status.borrow_and_update() {
                return s;
            }
            if self.status.changed().await.is_err() {
                return (*self.status.borrow())
                    .unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(255 << 8));
            }
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // The waiter task also holds the child with kill_on_drop; make sure it dies now.
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

/// `exit code N` or `killed by signal SIG`.
pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!(
            "killed by signal {}",
            nix::sys::signal::Signal::try_from(s).map(|s| s.as_str().to_string()).unwrap_or(s.to_string())
        ),
        _ => status.to_string(),
    }
}

/// Waits until `path` exists, failing early if `child` exits and after `timeout`.
pub async fn wait_for_path(path: &Path, child: &ChildProcess, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Some(status) = child.exited() {
            return Err(child.died_early(status));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("{} to create {}", child.name(), path.display()),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> Logger {
        Logger::root(slog::Discard, slog::o!())
    }

    #[tokio::test]
    async fn exit_status_and_stderr_are_kept() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo oops >&2; exit 7"]);
        let (child, _) = ChildProcess::spawn("test", cmd, Path::new("sh"), "", &log(), "pid").unwrap();
        let status = child.wait().await;
        assert_eq!(status.code(), Some(7));
        // The stderr reader may lag behind the waiter by a moment.
        for _ in 0..100 {
            if !child.stderr_tail().lines().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let err = child.died_early(status).to_string();
        assert!(err.contains("exit code 7") && err.contains("oops"), "{err}");
    }

    #[test]
    fn tail_is_bounded_in_lines_and_bytes() {
        let tail = Tail::default();
        for i in 0..1000 {
            tail.push(format!("line {i}"));
        }
        let lines = tail.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines.last().unwrap(), "line 999");
        for _ in 0..100 {
            tail.push("z".repeat(4096));
        }
        assert!(tail.bytes() <= TAIL_BYTES, "{}", tail.bytes());
        assert_eq!(tail.bytes(), tail.lines().iter().map(String::len).sum::<usize>());
        // The newest line stays even when it alone is over the byte limit.
        tail.push("w".repeat(TAIL_BYTES + 1));
        assert_eq!(tail.lines().len(), 1);
    }

    #[tokio::test]
    async fn a_flooding_helper_is_rate_limited_and_its_tail_bounded() {
        // 2000 lines of 20 000 bytes (40 MB) on stderr: lines are cut, the tail stays bounded,
        // the child is not blocked (its stderr is drained).
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"yes "$(head -c 20000 /dev/zero | tr '\0' x)" | head -n 2000 >&2; echo done >&2"#]);
        let (child, _) = ChildProcess::spawn("test", cmd, Path::new("sh"), "", &log(), "pid").unwrap();
        assert_eq!(child.wait().await.code(), Some(0));
        for _ in 0..500 {
            if child.stderr_tail().lines().last().map(String::as_str) == Some("done") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let lines = child.stderr_tail().lines();
        assert_eq!(lines.last().map(String::as_str), Some("done"), "{:?}", lines.len());
        assert!(child.stderr_tail().bytes() <= TAIL_BYTES);
        assert!(lines[0].ends_with("[line cut: 15904 more bytes]"), "{}", &lines[0][4000..]);
    }

    #[tokio::test]
    async fn terminate_escalates_to_sigkill() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; while :; do sleep 0.05; done"]);
        let (child, _) = ChildProcess::spawn("test", cmd, Path::new("sh"), "", &log(), "pid").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let status = child.terminate(Duration::from_millis(200)).await;
        assert_eq!(describe_status(status), "killed by signal SIGKILL");
    }

    #[tokio::test]
    async fn missing_program_names_it_and_the_fix() {
        let cmd = Command::new("/nonexistent/qemu");
        let err = ChildProcess::spawn("QEMU", cmd, Path::new("/nonexistent/qemu"), "install qemu", &log(), "qemuPid")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/qemu") && err.contains("install qemu"), "{err}");
    }
}
