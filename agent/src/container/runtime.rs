//! The agent's side of the runtime helper protocol.
//!
//! libcontainer forks and clones inside the calling process, which is unsafe in the
//! multi-threaded agent (a reproduced deadlock), so every libcontainer operation runs in a
//! fresh single-threaded helper: the agent re-executes itself (`/proc/self/exe __runtime
//! <request JSON>`), hands the container's stdio over as fds 3, 4 and 5, and reads exactly one
//! JSON [`Reply`] line from the helper's stdout. The helper is forked through the
//! [`Reaper`], which owns its exit status; container processes it creates are re-parented to
//! the agent when it exits.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slog::{debug, warn, Logger};
use tokio::io::AsyncBufReadExt;

use super::reaper::Reaper;

/// argv[1] of a helper invocation.
pub const HELPER_ARG: &str = "__runtime";

/// One libcontainer operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Create the container from `<bundle>/config.json`; its init waits for `Start`.
    Create {
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
    },
    Start,
    /// Run the process of `process` (a process.json) in the running container whose bundle
    /// (`config.json`, for its seccomp filter) is `bundle`.
    Exec {
        bundle: PathBuf,
        process: PathBuf,
        console_socket: Option<PathBuf>,
    },
    Pause,
    Resume,
    /// Remove libcontainer's state and the container's cgroup (killing what is left).
    Delete,
}

/// A helper invocation: `op` on container `id` in the state directory `root`. With `stdio`,
/// the helper passes its fds 3, 4, 5 as the process's stdin, stdout, stderr.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    pub root: PathBuf,
    pub id: String,
    pub stdio: bool,
    /// libcontainer logs at debug level (the agent runs with `agent.log=debug`).
    #[serde(default)]
    pub debug: bool,
    #[serde(flatten)]
    pub op: Op,
}

/// Error classes, mapped to ttrpc codes by the agent.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    #[default]
    Internal,
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
}

/// The helper's one line of output.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    /// The process created (`Create`, `Exec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(default)]
    pub kind: Kind,
    /// libcontainer's log lines (warnings and errors), for the agent's log.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub log: String,
}

/// A failed helper call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperError {
    pub kind: Kind,
    pub message: String,
}

/// Spawns helpers.
pub struct Runtime {
    /// libcontainer's state directory (tmpfs).
    pub root: PathBuf,
    reaper: Arc<Reaper>,
    log: Logger,
    debug: bool,
}

impl Runtime {
    pub fn new(root: PathBuf, reaper: Arc<Reaper>, log: Logger, debug: bool) -> Self {
        Self { root, reaper, log, debug }
    }

    pub fn request(&self, id: &str, stdio: bool, op: Op) -> Request {
        Request { root: self.root.clone(), id: id.to_string(), stdio, debug: self.debug, op }
    }

    /// Runs one helper and returns its reply. `stdio` fds become the helper's 3, 4, 5.
    pub async fn call(
        &self,
        req: &Request,
        stdio: Option<[OwnedFd; 3]>,
        timeout: Duration,
    ) -> Result<Reply, HelperError> {
        let internal = |message: String| HelperError { kind: Kind::Internal, message };
        let json = serde_json::to_string(req).map_err(|e| internal(format!("encode helper request: {e}")))?;
        let argv =
            [CString::new("kata-agent").unwrap(), CString::new(HELPER_ARG).unwrap(), CString::new(json).unwrap()];
        let exe = CString::new(std::path::Path::new("/proc/self/exe").as_os_str().as_bytes()).unwrap();
        let (out_r, out_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| internal(format!("pipe: {e}")))?;
        let null: OwnedFd =
            std::fs::File::open("/dev/null").map_err(|e| internal(format!("open /dev/null: {e}")))?.into();
        let reaper = self.reaper.clone();
        // The fds move into the blocking task and close there once the child has its copies
        // (the agent must not keep the child's ends, or it would never see end of file).
        let (pid, exit) = tokio::task::spawn_blocking(move || {
            let stdio_raw = stdio.as_ref().map(|f| [f[0].as_raw_fd(), f[1].as_raw_fd(), f[2].as_raw_fd()]);
            let r = reaper.spawn(|| fork_exec(&exe, &argv, null.as_raw_fd(), out_w.as_raw_fd(), stdio_raw));
            drop((stdio, null, out_w));
            r
        })
        .await
        .map_err(|e| internal(format!("start runtime helper: {e}")))?
        .map_err(|e| internal(format!("start runtime helper: {e}")))?;
        let what = format!("{:?} of container {}", op_name(&req.op), req.id);

        let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(out_r)
            .map_err(|e| internal(format!("helper pipe: {e}")))?;
        let mut line = String::new();
        let read = tokio::time::timeout(timeout, tokio::io::BufReader::new(rx).read_line(&mut line)).await;
        if read.is_err() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            return Err(internal(format!(
                "runtime helper for {what} gave no answer within {}s; killed",
                timeout.as_secs()
            )));
        }
        let status = match tokio::time::timeout(Duration::from_secs(10), exit).await {
            Ok(Ok(s)) => Some(s),
            _ => None,
        };
        let reply: Reply = match serde_json::from_str(line.trim()) {
            Ok(r) => r,
            Err(_) => {
                return Err(internal(format!(
                    "runtime helper for {what} exited (status {status:?}) without a result; output {line:?}"
                )))
            }
        };
        if !reply.log.is_empty() {
            let lines: Vec<&str> = reply.log.lines().collect();
            debug!(self.log, "libcontainer log"; "op" => &what, "lines" => format!("{lines:?}"));
        }
        if reply.ok {
            return Ok(reply);
        }
        warn!(self.log, "runtime helper failed"; "op" => &what, "error" => &reply.error, "log" => &reply.log);
        Err(HelperError { kind: reply.kind, message: reply.error })
    }
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Create { .. } => "create",
        Op::Start => "start",
        Op::Exec { .. } => "exec",
        Op::Pause => "pause",
        Op::Resume => "resume",
        Op::Delete => "delete",
    }
}

/// Forks and executes the helper. Between fork and exec the child only calls async-signal-safe
/// functions (fcntl, dup2, sigprocmask, signal, execv, write, _exit) on data prepared before.
fn fork_exec(
    exe: &CString,
    argv: &[CString; 3],
    null: RawFd,
    stdout: RawFd,
    stdio: Option<[RawFd; 3]>,
) -> std::io::Result<i32> {
    let argv_ptrs: [*const libc::c_char; 4] = [argv[0].as_ptr(), argv[1].as_ptr(), argv[2].as_ptr(), std::ptr::null()];
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut sources = [null, stdout, -1, -1, -1];
    if let Some(s) = stdio {
        sources[2..].copy_from_slice(&s);
    }
    let err_w_raw = err_w.as_raw_fd();
    // SAFETY: fork in a multi-threaded process; the child below only makes async-signal-safe
    // calls and never returns into Rust code that allocates or locks.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: child side, see above.
        unsafe { child_after_fork(exe, &argv_ptrs, &sources, err_w_raw) }
    }
    drop(err_w);
    // The child's copy of err_w closes on exec: EOF = exec succeeded; 4 bytes = its errno.
    let mut errno = [0u8; 4];
    let mut got = 0;
    let mut file = std::fs::File::from(err_r);
    while got < 4 {
        match std::io::Read::read(&mut file, &mut errno[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if got == 4 {
        // The child exits 127; the reaper collects it.
        return Err(std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
    }
    Ok(pid)
}

unsafe fn child_after_fork(exe: &CString, argv: &[*const libc::c_char; 4], sources: &[RawFd; 5], err_w: RawFd) -> ! {
    let fail = |err_w: RawFd| -> ! {
        let e = *libc::__errno_location();
        let bytes = e.to_ne_bytes();
        libc::write(err_w, bytes.as_ptr().cast(), 4);
        libc::_exit(127)
    };
    // Move every source above the targets first, so no dup2 overwrites a source still needed.
    let mut high = [-1; 5];
    for (i, fd) in sources.iter().enumerate() {
        if *fd >= 0 {
            high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64);
            if high[i] < 0 {
                fail(err_w);
            }
        }
    }
    let targets = [0, 1, 3, 4, 5];
    for (i, fd) in high.iter().enumerate() {
        if *fd >= 0 && libc::dup2(*fd, targets[i]) < 0 {
            fail(err_w);
        }
    }
    let mut set: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut set);
    libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    libc::execv(exe.as_ptr(), argv.as_ptr());
    fail(err_w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_reply_round_trip_as_one_line() {
        let req = Request {
            root: "/run/podvisor/containers".into(),
            id: "c1".into(),
            stdio: true,
            debug: false,
            op: Op::Create { bundle: "/run/podvisor/bundles/c1".into(), console_socket: None },
        };
        let json = serde_json::to_string(&req).unwrap();
        assert!(!json.contains('\n'));
        assert!(json.contains(r#""op":"create""#), "{json}");
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
        let reply = Reply { ok: false, error: "boom".into(), kind: Kind::FailedPrecondition, ..Default::default() };
        let back: Reply = serde_json::from_str(&serde_json::to_string(&reply).unwrap()).unwrap();
        assert_eq!(back, reply);
        let minimal: Reply = serde_json::from_str(r#"{"ok":true,"pid":5}"#).unwrap();
        assert_eq!((minimal.ok, minimal.pid, minimal.kind), (true, Some(5), Kind::Internal));
    }
}
