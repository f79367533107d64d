//! The debug console (Kata's `agent.debug_console`): when the kernel command line holds
//! `agent.debug_console`, the agent listens on vsock port 1026 (`agent.debug_console_vport=N`
//! changes it) and gives each connection a `/bin/sh` (busybox in the initrd) on a new pty whose
//! session it leads. Off unless asked for: nothing listens otherwise.
//!
//! Bounded: at most [`MAX_SESSIONS`] shells at once (a further connection is told so and
//! closed). A session ends when the peer closes (every process of the shell's session is killed
//! with SIGKILL, the shell is reaped) or when the shell and everything holding its terminal are gone.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use slog::{info, warn, Logger};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::container::reaper::Reaper;

/// Kata's default debug console port.
pub const DEFAULT_PORT: u32 = 1026;
/// Concurrent shells at most.
pub const MAX_SESSIONS: usize = 4;
/// A session with no input from the peer for this long is ended. A safety net: vhost-device-vsock
/// 0.3.0 does not always pass a host-side close on to the guest when several connections are
/// open, and such a session would otherwise hold its slot until the VM stops.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The shell (busybox's, linked at build time by guest-image/build.sh).
pub const SHELL: &str = "/bin/sh";
/// The shell's environment.
const ENV: &[&str] = &["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/", "TERM=vt100"];

/// The debug console port when the kernel command line enables it (the last
/// `agent.debug_console_vport=` wins, as kernel parameters do); `None` when it is off.
pub fn port_from_cmdline(cmdline: &str) -> Result<Option<u32>, String> {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    if !words.contains(&"agent.debug_console") {
        return Ok(None);
    }
    match words.iter().rev().find_map(|w| w.strip_prefix("agent.debug_console_vport=")) {
        None => Ok(Some(DEFAULT_PORT)),
        Some(p) => match p.parse::<u32>() {
            Ok(port) if port > 0 => Ok(Some(port)),
            _ => Err(format!(
                "agent.debug_console_vport={p}: not a vsock port; use a number from 1 to 4294967295 (Kata's default is {DEFAULT_PORT})"
            )),
        },
    }
}

/// Listens on vsock `port` (any CID) and serves shells until the agent exits.
pub fn start(log: Logger, reaper: Arc<Reaper>, port: u32) -> Result<(), String> {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
    let listener = tokio_vsock::VsockListener::bind(addr)
        .map_err(|e| format!("debug console: listen on vsock port {port}: {e}"))?;
    info!(log, "debug console listening"; "port" => port, "shell" => SHELL);
    let active = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (mut stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(log, "debug console: accept failed"; "error" => %e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if active.fetch_add(1, Ordering::SeqCst) >= MAX_SESSIONS {
                active.fetch_sub(1, Ordering::SeqCst);
                warn!(log, "debug console: too many sessions; connection refused"; "peer" => %peer);
                let msg = format!("debug console: {MAX_SESSIONS} sessions already open; close one first\r\n");
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(msg.as_bytes())).await;
                continue;
            }
            let (log, reaper, active) = (log.clone(), reaper.clone(), active.clone());
            tokio::spawn(async move {
                info!(log, "debug console: session opened"; "peer" => %peer);
                let spawn = |slave: RawFd| reaper.spawn(|| fork_shell(slave));
                match session(stream, spawn, IDLE_TIMEOUT).await {
                    Ok(status) => {
                        info!(log, "debug console: session closed"; "peer" => %peer, "shell_status" => status)
                    }
                    Err(e) => warn!(log, "debug console: session failed"; "peer" => %peer, "error" => %e),
                }
                active.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Ok(())
}

/// The pty master, non-blocking, driven by tokio.
struct Master(AsyncFd<OwnedFd>);

impl Master {
    async fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => return Ok(n),
                // EIO: every slave fd is closed (the shell and its children are gone).
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let mut ready = self.0.writable().await?;
            match ready.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(std::io::Error::from)) {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// One shell on a new pty, relayed to `stream` until either side ends or the peer sends nothing
/// for `idle`; returns the shell's status (Kata's: exit code, or 128 + signal). `spawn` starts
/// the shell on the given slave fd and returns its pid and exit status receiver.
pub async fn session<S, F>(stream: S, spawn: F, idle: Duration) -> Result<i32, String>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    F: FnOnce(RawFd) -> std::io::Result<(i32, tokio::sync::oneshot::Receiver<i32>)>,
{
    let size = nix::pty::Winsize { ws_row: 24, ws_col: 80, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(Some(&size), None).map_err(|e| format!("openpty: {e}"))?;
    for fd in [&pty.master, &pty.slave] {
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
            .map_err(|e| format!("pty: {e}"))?;
    }
    let flags = nix::fcntl::OFlag::from_bits_truncate(
        nix::fcntl::fcntl(pty.master.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).map_err(|e| format!("pty: {e}"))?,
    );
    nix::fcntl::fcntl(pty.master.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags | nix::fcntl::OFlag::O_NONBLOCK))
        .map_err(|e| format!("pty: {e}"))?;
    let (pid, exit) = spawn(pty.slave.as_raw_fd()).map_err(|e| format!("start {SHELL}: {e}"))?;
    // Only the shell holds the slave now: its exit (and its children's) ends the master's reads.
    drop(pty.slave);
    // SAFETY: the OwnedFd is moved into the AsyncFd, so its fd stays open and the same until
    // the AsyncFd is dropped.
    let master = unsafe { AsyncFd::register(pty.master) }.map_err(|e| format!("pty: {}", e.into_parts().1))?;
    let master = Arc::new(Master(master));
    let (mut rd, mut wr) = tokio::io::split(stream);
    let m = master.clone();
    let mut input = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(idle, rd.read(&mut buf)).await {
                // Idle for too long, closed, or broken.
                Err(_) | Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => {
                    if m.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let m = master.clone();
    let mut output = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        loop {
            match m.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if wr.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = wr.shutdown().await;
    });
    // Whichever side ends first ends the session.
    tokio::select! {
        _ = &mut input => {}
        _ = &mut output => {}
    }
    kill_session(pid);
    let status = tokio::time::timeout(Duration::from_secs(10), exit).await;
    input.abort();
    output.abort();
    match status {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(_)) => Err(format!("shell {pid}: exit status lost")),
        Err(_) => Err(format!("shell {pid}: not reaped within 10s of SIGKILL")),
    }
}

/// SIGKILLs every process of the session `sid` leads (the shell and its jobs, which an
/// interactive shell puts in process groups of their own).
fn kill_session(sid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(sid), nix::sys::signal::Signal::SIGKILL);
    let Ok(all) = procfs::process::all_processes() else { return };
    for p in all.flatten() {
        if p.stat().is_ok_and(|st| st.session == sid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Forks `/bin/sh` as a session leader whose controlling terminal and stdio are `slave`.
pub fn fork_shell(slave: RawFd) -> std::io::Result<i32> {
    let path = CString::new(SHELL).expect("no NUL");
    let argv0 = CString::new("sh").expect("no NUL");
    let env: Vec<CString> = ENV.iter().map(|e| CString::new(*e).expect("no NUL")).collect();
    let argv = [argv0.as_ptr(), std::ptr::null()];
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: fork in a multi-threaded process; the child only makes async-signal-safe calls on
    // memory prepared before the fork, and ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: child side, see above.
        unsafe {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            if libc::setsid() < 0 || libc::ioctl(slave, libc::TIOCSCTTY as _, 0) < 0 {
                libc::_exit(126);
            }
            for fd in 0..3 {
                if libc::dup2(slave, fd) < 0 {
                    libc::_exit(126);
                }
            }
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_only_by_the_kernel_parameter() {
        assert_eq!(port_from_cmdline("console=ttyS0 quiet"), Ok(None));
        assert_eq!(port_from_cmdline("agent.debug_console_vport=1026"), Ok(None));
        assert_eq!(port_from_cmdline("agent.debug_console quiet"), Ok(Some(1026)));
        assert_eq!(port_from_cmdline("agent.debug_console agent.debug_console_vport=2000"), Ok(Some(2000)));
        assert_eq!(
            port_from_cmdline("agent.debug_console_vport=2000 agent.debug_console agent.debug_console_vport=3"),
            Ok(Some(3))
        );
        let e = port_from_cmdline("agent.debug_console agent.debug_console_vport=x").unwrap_err();
        assert!(e.contains("agent.debug_console_vport=x") && e.contains("1026"), "{e}");
    }

    /// Spawns the host's /bin/sh (busybox in the guest) and reaps it with a pid-specific
    /// waitpid, so no other test's children are touched.
    fn host_spawn(slave: RawFd) -> std::io::Result<(i32, tokio::sync::oneshot::Receiver<i32>)> {
        let pid = fork_shell(slave)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let st = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
            let _ = tx.send(crate::container::reaper::exit_status(st).unwrap().1);
        });
        Ok((pid, rx))
    }

    async fn read_until(s: &mut tokio::net::UnixStream, needle: &str) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(&got).contains(needle) {
            let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} in {:?}", String::from_utf8_lossy(&got)))
                .unwrap();
            assert!(n > 0, "EOF before {needle:?}: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn shell_runs_on_a_pty_and_ends_when_it_exits() {
        let (mut host, agent) = tokio::net::UnixStream::pair().unwrap();
        let s = tokio::spawn(session(agent, host_spawn, IDLE_TIMEOUT));
        host.write_all(b"tty; echo \"path $PATH\"; exit 3\n").await.unwrap();
        let out = read_until(&mut host, "path /usr/local/sbin").await;
        assert!(out.contains("/dev/pts/"), "a pty is the shell's terminal: {out}");
        let status = tokio::time::timeout(Duration::from_secs(10), s).await.unwrap().unwrap().unwrap();
        assert_eq!(status, 3);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).await.unwrap();
    }

    #[tokio::test]
    async fn peer_closing_kills_and_reaps_the_shell() {
        let (mut host, agent) = tokio::net::UnixStream::pair().unwrap();
        let s = tokio::spawn(session(agent, host_spawn, IDLE_TIMEOUT));
        host.write_all(b"printf 'st%sed %s\\n' art $$; sleep 1000 & sleep 1000\n").await.unwrap();
        let out = read_until(&mut host, "started ").await;
        let pid: i32 = out.split("started ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let session_id = stat.rsplit(')').next().unwrap().split_whitespace().nth(3).unwrap().to_string();
        assert_eq!(session_id, pid.to_string(), "the shell leads its own session: {stat}");
        drop(host);
        let status = tokio::time::timeout(Duration::from_secs(10), s).await.unwrap().unwrap().unwrap();
        assert_eq!(status, 128 + libc::SIGKILL);
        assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(), "shell {pid} is gone");
        // The sleeps (a background job in its own process group, and a foreground one) were in
        // the shell's session and got the SIGKILL too.
        let sleepers = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                .filter(|st| st.contains("(sleep)"))
                .filter(|st| {
                    let f: Vec<&str> = st.rsplit(')').next().unwrap().split_whitespace().collect();
                    f[3] == pid.to_string() && f[0] != "Z"
                })
                .count()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sleepers() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(sleepers(), 0, "no process of session {pid} survives");
    }

    #[tokio::test]
    async fn an_idle_peer_ends_the_session() {
        let (mut host, agent) = tokio::net::UnixStream::pair().unwrap();
        let started = std::time::Instant::now();
        let s = tokio::spawn(session(agent, host_spawn, Duration::from_millis(500)));
        host.write_all(b"printf 'st%sed\\n' art\n").await.unwrap();
        read_until(&mut host, "started").await;
        let status = tokio::time::timeout(Duration::from_secs(10), s).await.unwrap().unwrap().unwrap();
        assert_eq!(status, 128 + libc::SIGKILL, "killed, not exited");
        assert!(started.elapsed() >= Duration::from_millis(500));
        // The connection stays open on the peer's side; the session still ended.
        drop(host);
    }
}
