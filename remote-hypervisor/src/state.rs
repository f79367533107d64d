//! `<state dir>/<sandbox id>/state.json`: what a restarted service needs to reattach to a podvm
//! or destroy it, and the process identity helpers (pid + start time) it relies on.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::interfaces::TunnelState;
use crate::provider::{Instance, InstanceType};

/// Where a podvm is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// CreateVM answered; nothing runs.
    Created,
    /// StartVM is at work.
    Starting,
    /// The agent answered; the proxy serves `agent.sock`.
    Running,
    /// StopVM is at work.
    Stopping,
}

/// A process known by pid and start time, so a recycled pid is never taken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// Its pid.
    pub pid: u32,
    /// `/proc/<pid>/stat` field 22 (clock ticks since boot).
    pub start_time: u64,
}

impl ProcessRef {
    /// The live process `pid`, if it exists.
    pub fn of(pid: u32) -> Option<ProcessRef> {
        start_time(pid).map(|start_time| ProcessRef { pid, start_time })
    }

    /// Whether this very process still runs (a zombie does not count).
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time) && !is_zombie(self.pid)
    }
}

/// The state file of one podvm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodState {
    /// Format version: 1.
    pub version: u32,
    /// The sandbox id.
    pub sandbox_id: String,
    /// Where it is.
    pub phase: Phase,
    /// `podvm-<pod name>-<8 of id>`.
    pub name: String,
    /// The chosen size.
    pub instance_type: InstanceType,
    /// `networkNamespacePath` (empty: no tunnel).
    pub netns: String,
    /// The VXLAN id reserved for it.
    pub vni: u32,
    /// CreateVM's annotations.
    pub annotations: BTreeMap<String, String>,
    /// The podvm, once created.
    #[serde(default)]
    pub instance: Option<Instance>,
    /// The worker side of the tunnel, once made.
    #[serde(default)]
    pub tunnel: Option<TunnelState>,
    /// The proxy process, once started.
    #[serde(default)]
    pub proxy: Option<ProcessRef>,
}

/// Writes `state.json` in `dir` atomically (temporary file, fsync, rename).
pub fn write(dir: &Path, state: &PodState) -> std::io::Result<()> {
    let tmp = dir.join(".state.json.tmp");
    let body = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join("state.json"))
}

/// Reads `state.json` in `dir`; at most 1 MiB.
pub fn read(dir: &Path) -> Result<PodState, String> {
    let path = dir.join("state.json");
    let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > 1 << 20 {
        return Err(format!("{}: {} bytes, more than 1 MiB", path.display(), meta.len()));
    }
    let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// `<state dir>/<id>`.
pub fn pod_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join(id)
}

fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// `/proc/<pid>/stat` field 22, the start time in clock ticks since boot.
pub fn start_time(pid: u32) -> Option<u64> {
    // After the comm, fields start at 3 (state): field 22 is index 19.
    stat_fields(pid)?.get(19)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    stat_fields(pid).and_then(|f| f.first().cloned()).is_some_and(|s| s == "Z" || s == "X")
}

/// Sends SIGTERM to `p` if it is still that process, waits up to `grace` for it to go, then
/// SIGKILL. Returns when it is gone (or was never there).
pub async fn terminate(p: &ProcessRef, grace: std::time::Duration) {
    if !p.alive() {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(p.pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    while p.alive() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if p.alive() {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while p.alive() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_identity() {
        let me = ProcessRef::of(std::process::id()).unwrap();
        assert!(me.alive());
        let other = ProcessRef { pid: me.pid, start_time: me.start_time + 1 };
        assert!(!other.alive(), "a different start time is another process");
    }

    #[test]
    fn state_round_trip_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let s = PodState {
            version: 1,
            sandbox_id: "abc".into(),
            phase: Phase::Created,
            name: "podvm-x-abc".into(),
            instance_type: InstanceType { name: "small".into(), vcpus: 1, memory_mib: 512 },
            netns: String::new(),
            vni: 555001,
            annotations: BTreeMap::new(),
            instance: None,
            tunnel: None,
            proxy: None,
        };
        write(dir.path(), &s).unwrap();
        assert_eq!(read(dir.path()).unwrap(), s);
        assert!(!dir.path().join(".state.json.tmp").exists());
        std::fs::write(dir.path().join("state.json"), "{").unwrap();
        assert!(read(dir.path()).unwrap_err().contains("state.json"));
    }
}
