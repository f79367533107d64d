//! The `Hypervisor` trait that the sandbox layer drives, and its QEMU implementation.
//!
//! The crate depends on nothing else of podvisor. Pure logic (configuration, the QEMU command
//! line, QMP framing, the accelerator choice) is synchronous and unit-tested; tokio is used only at
//! the I/O edges (child processes, the QMP socket, the agent channel).

#![deny(missing_docs)]

pub mod config;
pub mod console;
pub mod host;
pub mod kvm_probe;
pub mod network;
pub mod process;
pub mod qemu;
pub mod qmp;
pub mod remote;
pub mod vsock;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;

pub use config::{Accelerator, ConfigError, QemuConfig};
pub use host::{AccelChoice, HostCheck};
pub use network::{GuestNetwork, InternetworkingModel, NetworkError, PodNetwork};
pub use qemu::Qemu;
pub use remote::{Remote, RemoteConfig};
pub use vsock::AgentChannel;

/// An amount of memory in MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemoryMiB(pub u64);

impl MemoryMiB {
    /// The amount in bytes.
    pub fn bytes(self) -> u64 {
        self.0 << 20
    }
}

impl std::fmt::Display for MemoryMiB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} MiB", self.0)
    }
}

/// Errors of the hypervisor layer. Each names what failed and, where one exists, the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The host cannot run the VM as configured.
    #[error("host check failed: {0}")]
    Host(String),
    /// A helper binary (QEMU, vhost-device-vsock) could not be started.
    #[error("cannot start {what} ({path}): {source}; {fix}")]
    Spawn {
        /// Which program.
        what: &'static str,
        /// The path that was executed.
        path: PathBuf,
        /// How to fix it.
        fix: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A helper process exited while it was needed.
    #[error("{what} (pid {pid}) died early: {status}; last output:\n{tail}")]
    DiedEarly {
        /// Which program.
        what: &'static str,
        /// Its pid.
        pid: u32,
        /// Its exit status.
        status: String,
        /// The last lines it printed.
        tail: String,
    },
    /// The VM stopped or failed while booting or running.
    #[error("the VM failed: {0}")]
    VmFailed(String),
    /// A QMP command failed.
    #[error("QMP: {0}")]
    Qmp(#[from] qmp::QmpError),
    /// The operation does not fit the VM's state or limits.
    #[error("{0}")]
    InvalidRequest(String),
    /// A timeout expired while waiting for something.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        after: Duration,
    },
    /// File-system or socket operations on the run directory failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Helper to wrap an `io::Error` with a description of what was being done.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// What a driver can do, reported by [`Hypervisor::capabilities`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Memory can be added while the guest runs.
    pub memory_hotplug: bool,
    /// vCPUs can be added and removed while the guest runs.
    pub vcpu_hotplug: bool,
    /// Block devices can be added while the guest runs.
    pub block_device_hotplug: bool,
    /// The guest can share host directories (virtio-fs).
    pub fs_sharing: bool,
    /// The agent channel is hybrid vsock (unix socket + `CONNECT` handshake).
    pub hybrid_vsock: bool,
}

/// A device that can be added to a running VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// A host block device or image file, exposed to the guest as virtio-blk.
    Block {
        /// Unique id of the device inside this VM (also the QMP node and device name).
        id: String,
        /// Host path of the block device or image file.
        path: PathBuf,
        /// Expose it read-only.
        read_only: bool,
    },
}

impl Device {
    /// The id used to remove the device again.
    pub fn id(&self) -> &str {
        match self {
            Device::Block { id, .. } => id,
        }
    }
}

/// Where a hot-added device shows up for the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAddress {
    /// The PCI path as Kata's agent expects it (`<bridge slot>/<device slot>`, hex).
    pub pci_path: String,
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code of the VMM process, if it exited normally.
    pub code: Option<i32>,
    /// Signal that killed the VMM process, if any.
    pub signal: Option<i32>,
    /// Human-readable description including the VMM's last messages.
    pub message: String,
}

/// The VM's host processes by role (for per-process metrics); `None` for a role not running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HelperPids {
    /// The VMM (QEMU).
    pub vmm: Option<u32>,
    /// The virtio-fs daemon.
    pub virtiofsd: Option<u32>,
    /// The vhost-user vsock daemon (hybrid vsock only).
    pub vsockd: Option<u32>,
}

/// The hypervisor layer as the sandbox sees it: one VM per value.
///
/// Methods take `&self`; implementations keep their own state behind locks so that a failure
/// watch (`wait_exit`) can run while other calls are in flight.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// Checks the host and the configuration and creates the run directory. Nothing runs yet.
    async fn prepare(&self) -> Result<()>;
    /// Starts the helper daemons and the VM. Returns once the VMM answers its control channel;
    /// fails at once (with the VMM's own message) if it exits or stops the guest meanwhile.
    async fn start(&self) -> Result<()>;
    /// Stops the VM and every helper; idempotent.
    async fn stop(&self) -> Result<()>;
    /// Waits until the VM is gone, whoever stopped it, and says how it ended.
    async fn wait_exit(&self) -> ExitInfo;
    /// Resolves with a description as soon as the VM fails (VMM exit, guest stopped by an
    /// internal error, guest panic). Used to race boot-time waits against a dead VM.
    async fn wait_failure(&self) -> String;
    /// Pauses all vCPUs.
    async fn pause(&self) -> Result<()>;
    /// Resumes after [`Hypervisor::pause`].
    async fn resume(&self) -> Result<()>;
    /// Grows guest memory to `total`; returns the new total (rounded to the hotplug granule).
    async fn resize_memory(&self, total: MemoryMiB) -> Result<MemoryMiB>;
    /// Sets the number of vCPUs; returns the new count.
    async fn resize_vcpus(&self, count: u32) -> Result<u32>;
    /// Hot-adds a device.
    async fn add_device(&self, device: Device) -> Result<DeviceAddress>;
    /// Hot-removes a device added with [`Hypervisor::add_device`].
    async fn remove_device(&self, id: &str) -> Result<()>;
    /// Pids of the VMM and of its helper daemons.
    async fn pids(&self) -> Vec<u32>;
    /// The same pids by role; never waits. The default knows none.
    fn helper_pids(&self) -> HelperPids {
        HelperPids::default()
    }
    /// What this driver supports on this host.
    fn capabilities(&self) -> Capabilities;
    /// How to reach the agent inside the guest.
    fn agent_channel(&self) -> AgentChannel;
    /// The last lines the guest printed on its console.
    fn console_tail(&self) -> Vec<String>;
    /// Removes the run directory and anything else left on the host; idempotent. Implies stop.
    async fn cleanup(&self) -> Result<()>;
}
