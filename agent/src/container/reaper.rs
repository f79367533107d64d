//! The one reaper of the agent: every `waitpid` in this process happens here.
//!
//! The agent's children are runtime helpers (`kata-agent __runtime ...`), and — once a helper
//! exits — the container processes it created, which the kernel re-parents to the agent (PID 1
//! in the guest, a child subreaper in test mode). Nothing else may wait for children: no
//! `tokio::process`, no `std::process::Child::wait`. Helpers are forked by [`Reaper::spawn`],
//! which registers the pid before the reaper can see its exit; container processes are claimed
//! with [`Reaper::claim`] once a helper reports their pid, and an exit seen before that claim is
//! kept ("unclaimed") until it is claimed or expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use slog::{debug, error, Logger};
use tokio::sync::oneshot;

/// How long an exit nobody claimed is kept (a container pid is claimed within milliseconds of
/// its helper's reply; older entries are orphans nobody will ask about).
const UNCLAIMED_TTL: Duration = Duration::from_secs(120);
/// At most this many unclaimed exits are kept (oldest dropped first).
const UNCLAIMED_MAX: usize = 4096;

/// Kata's process status: the exit code, or 128 + the signal number when killed by a signal.
pub fn exit_status(status: WaitStatus) -> Option<(i32, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), 128 + sig as i32)),
        _ => None,
    }
}

#[derive(Default)]
struct Inner {
    waiters: HashMap<i32, oneshot::Sender<i32>>,
    unclaimed: HashMap<i32, (i32, Instant)>,
}

/// Owns all `waitpid(-1)` calls; hands out exit statuses by pid.
#[derive(Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Watches SIGCHLD and reaps every exited child. Registering the signal stream happens
    /// before this returns, so no exit after this call is missed.
    pub fn start(self: &Arc<Self>, log: Logger) -> Result<(), String> {
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
            .map_err(|e| format!("cannot watch SIGCHLD: {e}"))?;
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.reap_all(&log);
                if sigchld.recv().await.is_none() {
                    error!(log, "SIGCHLD stream ended; children will no longer be reaped");
                    return;
                }
            }
        });
        Ok(())
    }

    /// One pass of non-blocking `waitpid(-1)` until no exited child is left.
    fn reap_all(&self, log: &Logger) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    if let Some((pid, code)) = exit_status(status) {
                        debug!(log, "reaped"; "pid" => pid, "status" => code);
                        self.deliver(pid, code, Instant::now());
                    }
                }
            }
        }
    }

    fn deliver(&self, pid: i32, status: i32, now: Instant) {
        let mut inner = self.inner.lock().unwrap();
        if let Some(tx) = inner.waiters.remove(&pid) {
            // A dropped receiver means nobody cares any more; that is fine.
            let _ = tx.send(status);
            return;
        }
        inner.unclaimed.retain(|_, (_, at)| now.duration_since(*at) < UNCLAIMED_TTL);
        if inner.unclaimed.len() >= UNCLAIMED_MAX {
            if let Some(oldest) = inner.unclaimed.iter().min_by_key(|(_, (_, at))| *at).map(|(p, _)| *p) {
                inner.unclaimed.remove(&oldest);
            }
        }
        inner.unclaimed.insert(pid, (status, now));
    }

    /// The exit status of `pid`, a process the agent will inherit or already reaped. An exit
    /// reaped before `not_before` belongs to an earlier process with the same pid and is dropped.
    pub fn claim(&self, pid: i32, not_before: Instant) -> oneshot::Receiver<i32> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock().unwrap();
        match inner.unclaimed.remove(&pid) {
            Some((status, at)) if at >= not_before => {
                let _ = tx.send(status);
            }
            _ => {
                inner.waiters.insert(pid, tx);
            }
        }
        rx
    }

    /// Runs `fork` (which creates a child and returns its pid) with the reaper locked, so the
    /// child's exit is delivered to the returned receiver even if it exits at once.
    pub fn spawn(&self, fork: impl FnOnce() -> std::io::Result<i32>) -> std::io::Result<(i32, oneshot::Receiver<i32>)> {
        let mut inner = self.inner.lock().unwrap();
        let pid = fork()?;
        let (tx, rx) = oneshot::channel();
        inner.unclaimed.remove(&pid);
        inner.waiters.insert(pid, tx);
        Ok((pid, rx))
    }

    #[cfg(test)]
    fn unclaimed_len(&self) -> usize {
        self.inner.lock().unwrap().unclaimed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    #[test]
    fn status_is_code_or_128_plus_signal() {
        assert_eq!(exit_status(WaitStatus::Exited(Pid::from_raw(7), 3)), Some((7, 3)));
        assert_eq!(exit_status(WaitStatus::Signaled(Pid::from_raw(7), Signal::SIGKILL, false)), Some((7, 137)));
        assert_eq!(exit_status(WaitStatus::StillAlive), None);
    }

    #[test]
    fn exit_before_claim_is_kept_and_delivered() {
        let r = Reaper::default();
        let t0 = Instant::now();
        r.deliver(42, 3, Instant::now());
        let mut rx = r.claim(42, t0);
        assert_eq!(rx.try_recv().unwrap(), 3);
        assert_eq!(r.unclaimed_len(), 0);
    }

    #[test]
    fn claim_before_exit_waits() {
        let r = Reaper::default();
        let mut rx = r.claim(43, Instant::now());
        assert!(rx.try_recv().is_err());
        r.deliver(43, 137, Instant::now());
        assert_eq!(rx.try_recv().unwrap(), 137);
    }

    #[test]
    fn stale_exit_of_an_earlier_pid_owner_is_ignored() {
        let r = Reaper::default();
        r.deliver(44, 1, Instant::now());
        std::thread::sleep(Duration::from_millis(2));
        let mut rx = r.claim(44, Instant::now());
        assert!(rx.try_recv().is_err(), "the stale status must not be handed out");
        r.deliver(44, 0, Instant::now());
        assert_eq!(rx.try_recv().unwrap(), 0);
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let r = Reaper::default();
        let now = Instant::now();
        for pid in 0..(UNCLAIMED_MAX as i32 + 10) {
            r.deliver(pid, 0, now);
        }
        assert_eq!(r.unclaimed_len(), UNCLAIMED_MAX);
    }
}
