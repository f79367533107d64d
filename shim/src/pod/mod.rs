//! One pod as the shim daemon sees it: the VM (booted by the first container), the shared
//! directory, and the containers with their processes. Task RPCs land here (through
//! `service.rs`), so every rule about states and cleanup lives in this module. It speaks
//! podvisor's own types: [`PodError`] and [`Event`]; `service.rs` maps them to containerd's.
//!
//! - `vm.rs`: the VM's life cycle (boot, cancel, stop) and the OOM watch.
//! - `containers.rs`: create (rootfs, sharing, devices), delete, pause/resume.
//! - `processes.rs`: start, exec, kill, and the ordering of a process's output and its exit.
//! - `resources.rs`: growing the VM for containers' limits, `Update`, `Stats`.
//!
//! Locks: the slot naming the VM is a plain mutex never held across an await, so `State`,
//! `Connect`, `Pids`, `Stats` and signal-0 `Kill` answer at once while a VM boots or a hot-plug
//! waits; boot and stop take a separate async lock that only they need. The mutating RPCs run
//! in a task of their own ([`detached`]): a caller that goes away (a client timeout drops the
//! request) cannot cut a create or a delete in half and skip its cleanup.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use slog::Logger;
use tokio::sync::Notify;

use crate::agent::{Agent, AgentError};
use crate::mounts::MountSpec;
use crate::process::{Exit, Process, Stdio};
use crate::sandbox::VmBackend;

mod containers;
mod processes;
mod remote;
mod resources;
mod vm;

#[cfg(test)]
pub(crate) mod fakes;
#[cfg(test)]
mod tests;

use vm::VmSlot;

/// Why a pod operation failed; `service.rs` maps each kind to containerd's error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodError {
    /// No such container or exec.
    #[error("{0}: not found")]
    NotFound(String),
    /// The id is taken.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// The request does not fit the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// Refused by the agent policy in the guest.
    #[error("{0}")]
    PermissionDenied(String),
    /// Anything else, with its cause.
    #[error("{0}")]
    Internal(String),
}

impl From<AgentError> for PodError {
    fn from(e: AgentError) -> Self {
        match &e {
            AgentError::Status { code: ttrpc::Code::NOT_FOUND, .. } => PodError::NotFound(e.to_string()),
            AgentError::Status { code: ttrpc::Code::INVALID_ARGUMENT, .. } => PodError::InvalidArgument(e.to_string()),
            AgentError::Status { code: ttrpc::Code::FAILED_PRECONDITION, .. } => {
                PodError::FailedPrecondition(e.to_string())
            }
            AgentError::Status { code: ttrpc::Code::ALREADY_EXISTS, .. } => PodError::AlreadyExists(e.to_string()),
            AgentError::Status { code: ttrpc::Code::PERMISSION_DENIED, .. } => {
                PodError::PermissionDenied(e.to_string())
            }
            _ => PodError::Internal(e.to_string()),
        }
    }
}

/// Result of pod operations.
pub type PodResult<T> = Result<T, PodError>;

/// What happened to a task, in the pod's terms; `service.rs` turns each into containerd's
/// `/tasks/*` event. `pid` is the VMM's, as Kata reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A container was created.
    TaskCreate {
        /// Container id.
        container_id: String,
        /// Its bundle.
        bundle: PathBuf,
        /// The task pid.
        pid: u32,
    },
    /// A container's init process started.
    TaskStart {
        /// Container id.
        container_id: String,
        /// The task pid.
        pid: u32,
    },
    /// A process exited: its output was delivered before this event.
    TaskExit {
        /// Container id.
        container_id: String,
        /// The exec id, or the container id for the init process.
        id: String,
        /// The task pid.
        pid: u32,
        /// Status and time.
        exit: Exit,
    },
    /// A container was OOM-killed in the guest.
    TaskOom {
        /// Container id.
        container_id: String,
    },
    /// An exec was registered.
    TaskExecAdded {
        /// Container id.
        container_id: String,
        /// Exec id.
        exec_id: String,
    },
    /// An exec started.
    TaskExecStarted {
        /// Container id.
        container_id: String,
        /// Exec id.
        exec_id: String,
        /// The task pid.
        pid: u32,
    },
    /// A container was paused.
    TaskPaused {
        /// Container id.
        container_id: String,
    },
    /// A container was resumed.
    TaskResumed {
        /// Container id.
        container_id: String,
    },
    /// A container was deleted.
    TaskDelete {
        /// Container id.
        container_id: String,
        /// The task pid.
        pid: u32,
        /// How its init process ended.
        exit: Exit,
    },
}

/// Where the pod's events go. Must not block: called with no lock held, from any task.
pub trait EventSink: Send + Sync {
    /// Takes one event.
    fn publish(&self, event: Event);
}

/// What `Create` needs from the request.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    /// Container id.
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// Rootfs mounts (containerd); empty from CRI-O and `ctr run --rootfs`.
    pub rootfs: Vec<MountSpec>,
    /// stdio.
    pub stdio: Stdio,
    /// `config_path` from the runtime options, if any.
    pub config_path: Option<String>,
}

/// A container.
pub struct Container {
    /// Its id.
    pub id: String,
    /// Its bundle.
    pub bundle: PathBuf,
    /// The init process.
    pub init: Arc<Process>,
    /// Exec'd processes by exec id.
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Execs registered by `Exec` and not started yet: their OCI process.
    pending: Mutex<HashMap<String, agent_protocol::oci::Process>>,
    /// `<bundle>/rootfs` when the shim mounted it.
    mounted_rootfs: Option<PathBuf>,
    /// CRI-O wants OOM kills as a `<bundle>/oom` file.
    crio: bool,
    /// Ids of block devices hot-plugged for this container.
    devices: Vec<String>,
    /// What the VM was grown by for this container's limits so far (the highest asked).
    reserved: Mutex<crate::limits::Limits>,
    /// Peer pods: the task copying changed bind sources into the podvm again.
    sync: Option<tokio::task::AbortHandle>,
}

impl Container {
    /// The process `exec_id` names (empty: init).
    pub fn process(&self, exec_id: &str) -> PodResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| PodError::NotFound(format!("exec {exec_id} of container {}", self.id)))
    }
}

/// The pod served by this shim daemon.
pub struct Pod {
    /// The sandbox id (the first container's id, or the pod's sandbox annotation).
    pub sandbox_id: String,
    log: Logger,
    events: Arc<dyn EventSink>,
    backend: Arc<dyn VmBackend>,
    /// The VM, or the cancel handle of its boot; never locked across an await.
    vm: Mutex<VmSlot>,
    /// Held by a boot and by a stop (only): serializes them.
    boot: tokio::sync::Mutex<()>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Notified when the daemon should exit (Shutdown with no container left).
    pub exit: Arc<Notify>,
    config_path_env: Option<String>,
}

impl Pod {
    /// A pod with no VM yet, whose VMs come from `backend` and whose events go to `events`.
    pub fn new(
        sandbox_id: &str,
        events: Arc<dyn EventSink>,
        backend: Arc<dyn VmBackend>,
        log: Logger,
        config_path_env: Option<String>,
    ) -> Pod {
        Pod {
            sandbox_id: sandbox_id.into(),
            log,
            events,
            backend,
            vm: Mutex::new(VmSlot::Down),
            boot: tokio::sync::Mutex::new(()),
            containers: Mutex::new(HashMap::new()),
            exit: Arc::new(Notify::new()),
            config_path_env,
        }
    }

    /// The container `id`.
    pub fn container(&self, id: &str) -> PodResult<Arc<Container>> {
        self.containers.lock().unwrap().get(id).cloned().ok_or_else(|| PodError::NotFound(format!("container {id}")))
    }

    /// The process `exec_id` of container `id`.
    pub fn process(&self, id: &str, exec_id: &str) -> PodResult<Arc<Process>> {
        self.container(id)?.process(exec_id)
    }

    /// The agent of the running VM.
    pub fn agent(&self) -> PodResult<Arc<dyn Agent>> {
        Ok(self.running_vm()?.sandbox.agent().clone())
    }

    /// The VMM's pid (reported as the task pid, as Kata does); 0 without a running VM. Never
    /// waits.
    pub fn vmm_pid(&self) -> u32 {
        self.running_vm().map(|vm| vm.vmm_pid).unwrap_or(0)
    }

    /// What the metrics endpoint needs of the running VM, or `None` while none runs. Takes
    /// the slot and container locks only to copy handles: the scrape's guest round trips run
    /// with no pod lock held.
    pub fn monitor_view(&self) -> Option<crate::monitor::VmView> {
        let vm = self.running_vm().ok()?;
        Some(crate::monitor::VmView {
            vm: vm.sandbox.vm().clone(),
            agent: vm.sandbox.agent().clone(),
            containers: self.container_ids(),
        })
    }

    /// Whether no container is left.
    pub fn is_empty(&self) -> bool {
        self.containers.lock().unwrap().is_empty()
    }

    /// Ids of the containers (for `delete` and diagnostics).
    pub fn container_ids(&self) -> Vec<String> {
        self.containers.lock().unwrap().keys().cloned().collect()
    }

    fn publish(&self, event: Event) {
        self.events.publish(event);
    }
}

/// Runs `work` in a task of its own and waits for it: if the caller's future is dropped (the
/// RPC was cancelled), the work still runs to its end, cleanup included.
async fn detached<T: Send + 'static>(work: impl Future<Output = PodResult<T>> + Send + 'static) -> PodResult<T> {
    tokio::spawn(work).await.map_err(|e| PodError::Internal(format!("the operation's task failed: {e}")))?
}

/// `now` as an exit time when a process left none.
fn no_exit() -> Exit {
    Exit { code: 0, at: SystemTime::now() }
}
