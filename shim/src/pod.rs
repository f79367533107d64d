//! One pod as the shim daemon sees it: the VM (booted by the first container), the shared
//! directory, and the containers with their processes. Task RPCs land here (through
//! `service.rs`), so every rule about states and cleanup lives in this file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use agent_protocol::agent as pb;
use containerd_shim_protos::events::task as ev;
use slog::{error, info, warn, Logger};
use tokio::sync::Notify;

use crate::agent::Agent;
use crate::config::Config;
use crate::events::Publisher;
use crate::mounts::{self, MountSpec, SharedDir};
use crate::process::{Exit, Process, Status, Stdio};
use crate::sandbox::Sandbox;
use crate::spec;

/// Errors of task operations; `service.rs` maps each kind to containerd's error code.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
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
    /// Not supported by a VM runtime.
    #[error("{0}")]
    NotImplemented(String),
    /// Refused by the agent policy in the guest.
    #[error("{0}")]
    PermissionDenied(String),
    /// Anything else, with its cause.
    #[error("{0}")]
    Internal(String),
}

impl From<crate::agent::AgentError> for TaskError {
    fn from(e: crate::agent::AgentError) -> Self {
        use crate::agent::AgentError;
        match &e {
            AgentError::Status { code: ttrpc::Code::NOT_FOUND, .. } => TaskError::NotFound(e.to_string()),
            AgentError::Status { code: ttrpc::Code::INVALID_ARGUMENT, .. } => TaskError::InvalidArgument(e.to_string()),
            AgentError::Status { code: ttrpc::Code::FAILED_PRECONDITION, .. } => {
                TaskError::FailedPrecondition(e.to_string())
            }
            AgentError::Status { code: ttrpc::Code::ALREADY_EXISTS, .. } => TaskError::AlreadyExists(e.to_string()),
            AgentError::Status { code: ttrpc::Code::PERMISSION_DENIED, .. } => {
                TaskError::PermissionDenied(e.to_string())
            }
            _ => TaskError::Internal(e.to_string()),
        }
    }
}

/// Result of task operations.
pub type TaskResult<T> = Result<T, TaskError>;

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
}

impl Container {
    /// The process `exec_id` names (empty: init).
    pub fn process(&self, exec_id: &str) -> TaskResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| TaskError::NotFound(format!("exec {exec_id} of container {}", self.id)))
    }
}

struct Vm {
    sandbox: Sandbox,
    shared: SharedDir,
    /// The pod's host cgroup the shim and the VM's processes run in (`sandbox_cgroup_only`).
    cgroup: Mutex<Option<crate::host_cgroup::SandboxCgroup>>,
    /// Boot memory (MiB) plus what was hot-plugged for containers.
    memory_mib: Mutex<u64>,
    /// Boot vCPUs plus those hot-plugged for containers' CPU limits.
    vcpus: Mutex<u32>,
    /// `default_maxvcpus` resolved against the host: the hot-plug ceiling.
    max_vcpus: u32,
    /// The container manager sized the VM (sandbox annotations): no per-container hotplug.
    sized_by_manager: bool,
    /// Held while a Create grows the VM, so that concurrent Creates do not both read the same
    /// `memory_mib` / `vcpus` and lose one container's share.
    growing: tokio::sync::Mutex<()>,
    /// Hot-plugged devices so far (for unique ids).
    next_device: std::sync::atomic::AtomicU32,
    /// Whether the limit of Bidirectional propagation was logged (once per pod).
    told_bidirectional: std::sync::atomic::AtomicBool,
}

/// The pod served by this shim daemon.
pub struct Pod {
    /// The sandbox id (the first container's id, or the pod's sandbox annotation).
    pub sandbox_id: String,
    log: Logger,
    events: Publisher,
    vm: tokio::sync::Mutex<Option<Arc<Vm>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Notified when the daemon should exit (Shutdown with no container left).
    pub exit: Arc<Notify>,
    config_path_env: Option<String>,
}

impl Pod {
    /// A pod with no VM yet.
    pub fn new(sandbox_id: &str, events: Publisher, log: Logger, config_path_env: Option<String>) -> Pod {
        Pod {
            sandbox_id: sandbox_id.into(),
            log,
            events,
            vm: tokio::sync::Mutex::new(None),
            containers: Mutex::new(HashMap::new()),
            exit: Arc::new(Notify::new()),
            config_path_env,
        }
    }

    /// The events publisher.
    pub fn events(&self) -> &Publisher {
        &self.events
    }

    /// The container `id`.
    pub fn container(&self, id: &str) -> TaskResult<Arc<Container>> {
        self.containers.lock().unwrap().get(id).cloned().ok_or_else(|| TaskError::NotFound(format!("container {id}")))
    }

    /// The process `exec_id` of container `id`.
    pub fn process(&self, id: &str, exec_id: &str) -> TaskResult<Arc<Process>> {
        self.container(id)?.process(exec_id)
    }

    async fn running_vm(&self) -> TaskResult<Arc<Vm>> {
        self.vm
            .lock()
            .await
            .clone()
            .ok_or_else(|| TaskError::FailedPrecondition("the sandbox VM is not running".into()))
    }

    /// The agent of the running VM.
    pub async fn agent(&self) -> TaskResult<Arc<dyn Agent>> {
        Ok(self.running_vm().await?.sandbox.agent().clone())
    }

    /// The VMM's pid (reported as the task pid, as Kata does); 0 without a VM.
    pub async fn vmm_pid(&self) -> u32 {
        match self.vm.lock().await.as_ref() {
            Some(vm) => vm.sandbox.vm().pids().await.first().copied().unwrap_or(0),
            None => 0,
        }
    }

    fn load_config(&self, from_request: Option<&str>) -> TaskResult<Config> {
        let path = from_request.or(self.config_path_env.as_deref()).map(Path::new);
        crate::config::load(path).map_err(|e| TaskError::InvalidArgument(e.to_string()))
    }

    /// Boots the VM unless it runs. The first container (the pod's sandbox container for CRI)
    /// decides its shape: configuration, `io.katacontainers.config.*` and sandbox-sizing
    /// annotations, hostname, network namespace.
    async fn ensure_vm(self: &Arc<Self>, req: &CreateRequest, oci: &oci_spec::runtime::Spec) -> TaskResult<Arc<Vm>> {
        let mut guard = self.vm.lock().await;
        if let Some(vm) = guard.as_ref() {
            return Ok(vm.clone());
        }
        let shared_with_node = spec::host_namespaces(oci);
        if !shared_with_node.is_empty() {
            let options: Vec<&str> = shared_with_node.iter().map(|h| h.option).collect();
            let evidence: Vec<&str> = shared_with_node.iter().map(|h| h.evidence.as_str()).collect();
            return Err(TaskError::InvalidArgument(format!(
                "the pod asks for {} ({}): a pod in a VM has its own kernel, network stack, IPC and process \
                 table and cannot share the node's; remove {} from the pod spec, or run the pod with a runc \
                 RuntimeClass",
                options.join(", "),
                evidence.join("; "),
                options.iter().map(|o| format!("{o}: true")).collect::<Vec<_>>().join(", ")
            )));
        }
        let mut config = self.load_config(req.config_path.as_deref())?;
        let applied = crate::annotations::apply(&spec::annotations(oci), &mut config.hypervisor)
            .map_err(TaskError::InvalidArgument)?;
        // The agent policy: base64 of a Rego document (as in Kata); an empty value sets none.
        let policy = applied
            .agent_policy
            .as_deref()
            .map(crate::annotations::decode_agent_policy)
            .transpose()
            .map_err(TaskError::InvalidArgument)?
            .filter(|p| !p.is_empty());
        let hostname = oci.hostname().clone().unwrap_or_default();
        let netns = spec::netns_path(oci);
        let shared = SharedDir::new(&self.sandbox_id);
        let mut cgroup = None;
        let booted = async {
            shared.create().map_err(|e| TaskError::Internal(e.to_string()))?;
            cgroup = self.enter_sandbox_cgroup(&config, oci, &shared)?;
            let netns = netns
                .as_deref()
                .filter(|_| config.runtime.internetworking_model == hypervisor::InternetworkingModel::TcFilter);
            Sandbox::boot_pod_with_network(&self.sandbox_id, &config, shared.root(), &hostname, netns, &self.log)
                .await
                .map_err(|e| TaskError::Internal(format!("cannot start the sandbox VM: {e}")))
        }
        .await;
        let sandbox = match booted {
            Ok(s) => s,
            Err(e) => {
                if let Some(Err(c)) = cgroup.take().map(crate::host_cgroup::SandboxCgroup::remove) {
                    warn!(self.log, "cleanup of the host cgroup failed"; "error" => %c);
                }
                if let Err(c) = shared.destroy() {
                    warn!(self.log, "cleanup of the shared directory failed"; "error" => %c);
                }
                return Err(e);
            }
        };
        // The policy is in force before any container is created; a refused policy stops the VM.
        if let Some(policy) = &policy {
            if let Err(e) = sandbox.agent().set_policy(policy).await {
                if let Err(c) = sandbox.shutdown().await {
                    warn!(self.log, "stopping the VM after a refused agent policy failed"; "error" => %c);
                }
                if let Some(Err(c)) = cgroup.take().map(crate::host_cgroup::SandboxCgroup::remove) {
                    warn!(self.log, "cleanup of the host cgroup failed"; "error" => %c);
                }
                if let Err(c) = shared.destroy() {
                    warn!(self.log, "cleanup of the shared directory failed"; "error" => %c);
                }
                let refused =
                    matches!(&e, crate::agent::AgentError::Status { code: ttrpc::Code::INVALID_ARGUMENT, .. });
                let msg = format!("annotation {}: {e}", crate::annotations::AGENT_POLICY_ANNOTATION);
                return Err(if refused { TaskError::InvalidArgument(msg) } else { TaskError::Internal(msg) });
            }
            info!(self.log, "agent policy set"; "bytes" => policy.len());
        }
        let vm = Arc::new(Vm {
            sandbox,
            shared,
            cgroup: Mutex::new(cgroup),
            memory_mib: Mutex::new(config.hypervisor.default_memory),
            vcpus: Mutex::new(config.hypervisor.default_vcpus),
            max_vcpus: config.hypervisor.max_vcpus(hypervisor::host::host_cpus()),
            sized_by_manager: applied.sized_by_manager,
            growing: tokio::sync::Mutex::new(()),
            next_device: std::sync::atomic::AtomicU32::new(0),
            told_bidirectional: std::sync::atomic::AtomicBool::new(false),
        });
        *guard = Some(vm.clone());
        self.spawn_oom_watch(vm.sandbox.agent().clone());
        Ok(vm)
    }

    /// Makes the pod's host cgroup at the sandbox's `linux.cgroupsPath` and moves the shim into
    /// it, so that QEMU and its helpers start there (`[runtime] sandbox_cgroup_only`).
    fn enter_sandbox_cgroup(
        &self,
        config: &Config,
        oci: &oci_spec::runtime::Spec,
        shared: &SharedDir,
    ) -> TaskResult<Option<crate::host_cgroup::SandboxCgroup>> {
        if !config.runtime.sandbox_cgroup_only {
            return Ok(None);
        }
        let value = oci.linux().as_ref().and_then(|l| l.cgroups_path().clone()).unwrap_or_default();
        let value = value.to_string_lossy();
        let Some(rel) =
            crate::host_cgroup::relative_path(&value).map_err(|e| TaskError::InvalidArgument(e.to_string()))?
        else {
            return Ok(None);
        };
        let mut cgroup = crate::host_cgroup::SandboxCgroup::create(&rel, shared.sandbox_dir()).map_err(|e| {
            TaskError::Internal(format!("{e} (set [runtime] sandbox_cgroup_only = false to run without)"))
        })?;
        cgroup.enter().map_err(|e| TaskError::Internal(e.to_string()))?;
        info!(self.log, "the shim and the VM run in the pod's host cgroup"; "cgroup" => %rel.display());
        Ok(Some(cgroup))
    }

    /// Grows the VM by what a container's limits go beyond what was reserved for it so far:
    /// its CPU limit as vCPUs, its memory limit as hot-plugged memory, so that the guest can
    /// hold and run what the container may use (unless the container manager sized the VM for
    /// the whole pod). Like Kata, what was added stays until the VM stops.
    async fn grow_for(
        &self,
        vm: &Vm,
        id: &str,
        reserved: &crate::limits::Limits,
        wanted: &crate::limits::Limits,
    ) -> TaskResult<()> {
        if vm.sized_by_manager {
            return Ok(());
        }
        let (cpus, bytes) = reserved.growth_to(wanted);
        if cpus == 0 && bytes == 0 {
            return Ok(());
        }
        let _growing = vm.growing.lock().await;
        if cpus > 0 {
            self.grow_vcpus(vm, cpus, id).await?;
        }
        if bytes == 0 {
            return Ok(());
        }
        let want = *vm.memory_mib.lock().unwrap() + bytes.div_ceil(1 << 20);
        let total = vm.sandbox.resize_memory(hypervisor::MemoryMiB(want)).await.map_err(|e| {
            TaskError::Internal(format!(
                "cannot hot-plug {} MiB of memory for container {id} (limit {} bytes): {e}",
                bytes.div_ceil(1 << 20),
                wanted.memory.unwrap_or(0)
            ))
        })?;
        *vm.memory_mib.lock().unwrap() = total.0;
        info!(self.log, "guest memory grown for a container"; "container" => id, "total_mib" => total.0);
        Ok(())
    }

    /// Adds `cpus` vCPUs for a container, up to `max_vcpus` (beyond it the container shares what
    /// there is, with a warning naming the key that raises the ceiling).
    async fn grow_vcpus(&self, vm: &Vm, cpus: u32, id: &str) -> TaskResult<()> {
        let current = *vm.vcpus.lock().unwrap();
        let want = current.saturating_add(cpus);
        if want > vm.max_vcpus {
            warn!(self.log, "a container's CPU limit goes beyond default_maxvcpus; the VM stays at its ceiling";
                "container" => id, "limit_cpus" => cpus, "max_vcpus" => vm.max_vcpus);
        }
        let want = want.min(vm.max_vcpus);
        if want <= current {
            return Ok(());
        }
        let total = vm.sandbox.grow_vcpus(current, want).await.map_err(|e| {
            // Some vCPUs may have been added before the failure: never ask for fewer than `want`
            // later, since a smaller count would unplug vCPUs other containers got.
            *vm.vcpus.lock().unwrap() = want;
            TaskError::Internal(format!(
                "cannot hot-plug {} vCPUs for container {id} (CPU limit {cpus}): {e}",
                want - current
            ))
        })?;
        *vm.vcpus.lock().unwrap() = total;
        info!(self.log, "vCPUs added for a container"; "container" => id, "total_vcpus" => total);
        Ok(())
    }

    /// `Create`: mounts the rootfs, boots the VM if needed, shares the rootfs and bind sources,
    /// and creates the container in the guest. Nothing is left behind on failure.
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> TaskResult<u32> {
        if req.id.is_empty() {
            return Err(TaskError::InvalidArgument("container id is empty".into()));
        }
        if self.containers.lock().unwrap().contains_key(&req.id) {
            return Err(TaskError::AlreadyExists(format!("container {}", req.id)));
        }
        let oci = spec::load(&req.bundle).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let binds = spec::host_binds(&oci).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let mounted_rootfs = if req.rootfs.is_empty() {
            None
        } else {
            let target = req.bundle.join("rootfs");
            mounts::mount_rootfs(&req.rootfs, &target).map_err(|e| {
                let _ = mounts::unmount_all(&target);
                TaskError::Internal(format!("cannot mount the rootfs: {e}"))
            })?;
            Some(target)
        };
        let result = self.create_mounted(&req, oci, &binds).await;
        match result {
            Ok(c) => {
                self.containers.lock().unwrap().insert(req.id.clone(), Arc::new(Container { mounted_rootfs, ..c }));
                let pid = self.vmm_pid().await;
                self.events.publish(
                    containerd_shim_protos::topics::TASK_CREATE_EVENT_TOPIC,
                    ev::TaskCreate {
                        container_id: req.id.clone(),
                        bundle: req.bundle.display().to_string(),
                        pid,
                        ..Default::default()
                    },
                );
                Ok(pid)
            }
            Err(e) => {
                if let Some(t) = &mounted_rootfs {
                    let _ = mounts::unmount_all(t);
                }
                if self.containers.lock().unwrap().is_empty() {
                    self.stop_vm().await;
                }
                Err(e)
            }
        }
    }

    async fn create_mounted(
        self: &Arc<Self>,
        req: &CreateRequest,
        mut oci: oci_spec::runtime::Spec,
        binds: &[spec::HostBind],
    ) -> TaskResult<Container> {
        let host_root = spec::host_rootfs(&oci, &req.bundle, !req.rootfs.is_empty())
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let annotations = spec::annotations(&oci);
        let crio = annotations.get("io.container.manager").is_some_and(|m| m == "cri-o");
        let kind = crate::annotations::container_type(&annotations).unwrap_or("").to_string();
        if kind == "container" && self.vm.lock().await.is_none() {
            return Err(TaskError::FailedPrecondition(format!(
                "container {} belongs to sandbox {}, whose VM is not running; create the sandbox first",
                req.id, self.sandbox_id
            )));
        }
        let block_devices =
            spec::take_block_devices(&mut oci).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let sandbox_pidns = kind == "container" && spec::joins_pid_namespace(&oci);
        let vm = self.ensure_vm(req, &oci).await?;
        let id = &req.id;
        let limits = crate::limits::Limits::of(oci.linux().as_ref().and_then(|l| l.resources().as_ref()));
        if kind == "container" {
            self.grow_for(&vm, id, &Default::default(), &limits).await?;
        }
        let shared = async {
            let root = vm.shared.share(&format!("{id}/rootfs"), &host_root, mounts::ReadOnly::No)?;
            let mut sources = Vec::new();
            for b in binds {
                if b.propagation != spec::Propagation::Private {
                    sources.push(vm.shared.share_for_pod(&b.source, b.read_only)?);
                    if b.propagation == spec::Propagation::Bidirectional && !vm.told_bidirectional.swap(true, Relaxed) {
                        info!(self.log, "mounts made in the pod under a Bidirectional volume reach its other containers \
                            but stay in the VM: the host does not see them (mounts made on the host do reach the pod)";
                            "container" => id, "host_path" => %b.source.display());
                    }
                    continue;
                }
                let base =
                    b.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into());
                sources.push(vm.shared.share(&format!("{id}-mounts/{}-{base}", b.index), &b.source, b.read_only)?);
            }
            Ok::<_, mounts::MountError>((root, sources))
        }
        .await;
        let (guest_root, sources) = match shared {
            Ok(v) => v,
            Err(e) => {
                self.unshare(&vm, id);
                return Err(TaskError::Internal(format!("cannot share the container's files with the VM: {e}")));
            }
        };
        // Memory-backed emptyDirs: a guest tmpfs per volume, mounted by the first container.
        let ephemeral: Vec<pb::Storage> = oci
            .mounts()
            .iter()
            .flatten()
            .filter_map(spec::ephemeral_target)
            .map(|mount_point| pb::Storage {
                driver: "ephemeral".into(),
                source: "tmpfs".into(),
                fstype: "tmpfs".into(),
                mount_point,
                ..Default::default()
            })
            .collect();
        let (guest_spec, warnings) = spec::for_guest(oci, &guest_root, binds, &sources);
        for w in warnings {
            warn!(self.log, "{}", w; "container" => id);
        }
        let grpc = agent_protocol::convert::spec_to_grpc(&guest_spec);
        let agent = vm.sandbox.agent().clone();
        let (devices, plugged) = match self.plug_devices(&vm, id, &block_devices).await {
            Ok(d) => d,
            Err(e) => {
                self.unshare(&vm, id);
                return Err(e);
            }
        };
        let creq = pb::CreateContainerRequest {
            container_id: id.clone(),
            exec_id: id.clone(),
            OCI: Some(grpc).into(),
            devices,
            storages: ephemeral,
            sandbox_pidns,
            ..Default::default()
        };
        let init = Process::new(id, "", req.stdio.clone());
        let created = async {
            agent.create_container(creq).await?;
            init.start_io(agent.clone(), &self.log).await.map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
            Ok::<_, TaskError>(())
        }
        .await;
        if let Err(e) = created {
            let _ = agent.remove_container(id).await;
            self.unplug_devices(&vm, &plugged).await;
            self.unshare(&vm, id);
            return Err(e);
        }
        info!(self.log, "container created"; "container" => id);
        Ok(Container {
            id: id.clone(),
            bundle: req.bundle.clone(),
            init,
            execs: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            mounted_rootfs: None,
            crio,
            devices: plugged,
            reserved: Mutex::new(if kind == "container" { limits } else { Default::default() }),
        })
    }

    /// Hot-plugs the container's block devices as virtio-blk; returns the agent's device list
    /// and the hypervisor's ids (undone here on failure).
    async fn plug_devices(
        &self,
        vm: &Vm,
        id: &str,
        block: &[spec::BlockDevice],
    ) -> TaskResult<(Vec<pb::Device>, Vec<String>)> {
        let (mut devices, mut plugged) = (Vec::new(), Vec::new());
        for b in block {
            let n = vm.next_device.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dev_id = format!("blk{n}");
            let dev = hypervisor::Device::Block { id: dev_id.clone(), path: b.host_path.clone(), read_only: false };
            match vm.sandbox.vm().add_device(dev).await {
                Ok(addr) => {
                    info!(self.log, "block device hot-plugged"; "container" => id, "host" => %b.host_path.display(), "pci_path" => &addr.pci_path);
                    plugged.push(dev_id.clone());
                    devices.push(pb::Device {
                        id: dev_id,
                        type_: "blk".into(),
                        vm_path: addr.pci_path,
                        container_path: b.container_path.display().to_string(),
                        ..Default::default()
                    });
                }
                Err(e) => {
                    self.unplug_devices(vm, &plugged).await;
                    return Err(TaskError::Internal(format!(
                        "cannot hot-plug block device {} for {} in container {id}: {e}",
                        b.host_path.display(),
                        b.container_path.display()
                    )));
                }
            }
        }
        Ok((devices, plugged))
    }

    async fn unplug_devices(&self, vm: &Vm, ids: &[String]) {
        for d in ids {
            if let Err(e) = vm.sandbox.vm().remove_device(d).await {
                warn!(self.log, "cannot hot-unplug a block device"; "device" => d, "error" => %e);
            }
        }
    }

    fn unshare(&self, vm: &Vm, id: &str) {
        for prefix in [id.to_string(), format!("{id}-mounts")] {
            if let Err(e) = vm.shared.unshare(&prefix) {
                warn!(self.log, "cannot remove shared files"; "container" => id, "error" => %e);
            }
        }
    }

    /// `Start`: the init process (container) or an exec registered by `Exec`.
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> TaskResult<u32> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        if p.status() != Status::Created {
            return Err(TaskError::FailedPrecondition(format!(
                "process {} of container {id} was already started",
                p.agent_exec_id()
            )));
        }
        let agent = self.agent().await?;
        if exec_id.is_empty() {
            agent.start_container(id).await?;
        } else {
            let process = c
                .pending
                .lock()
                .unwrap()
                .remove(exec_id)
                .ok_or_else(|| TaskError::NotFound(format!("exec {exec_id}")))?;
            let req = pb::ExecProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                process: Some(process).into(),
                ..Default::default()
            };
            agent.exec_process(req).await?;
            p.start_io(agent.clone(), &self.log).await.map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        }
        p.set_status(Status::Running);
        let pid = self.vmm_pid().await;
        self.spawn_waiter(agent, c.clone(), p.clone(), pid);
        if exec_id.is_empty() {
            self.events.publish(
                containerd_shim_protos::topics::TASK_START_EVENT_TOPIC,
                ev::TaskStart { container_id: id.into(), pid, ..Default::default() },
            );
        } else {
            self.events.publish(
                containerd_shim_protos::topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                ev::TaskExecStarted { container_id: id.into(), exec_id: exec_id.into(), pid, ..Default::default() },
            );
        }
        Ok(pid)
    }

    /// Waits in the guest for the process to exit, delivers its output, records and publishes
    /// the exit.
    fn spawn_waiter(self: &Arc<Self>, agent: Arc<dyn Agent>, c: Arc<Container>, p: Arc<Process>, pid: u32) {
        let pod = self.clone();
        tokio::spawn(async move {
            let code = match agent.wait_process(&p.container_id, p.agent_exec_id()).await {
                Ok(s) => s as u32,
                Err(e) => {
                    warn!(pod.log, "WaitProcess failed; reporting exit 255"; "container" => &c.id, "exec" => &p.exec_id, "error" => %e);
                    255
                }
            };
            p.drain_output().await;
            let exit = p.set_exit(code);
            info!(pod.log, "process exited"; "container" => &c.id, "exec" => &p.exec_id, "exit_status" => code);
            pod.events.publish(
                containerd_shim_protos::topics::TASK_EXIT_EVENT_TOPIC,
                ev::TaskExit {
                    container_id: c.id.clone(),
                    id: if p.exec_id.is_empty() { c.id.clone() } else { p.exec_id.clone() },
                    pid,
                    exit_status: exit.code,
                    exited_at: Some(crate::service::timestamp(exit.at)).into(),
                    ..Default::default()
                },
            );
        });
    }

    /// Publishes OOM kills reported by the agent (and writes `<bundle>/oom` for CRI-O).
    fn spawn_oom_watch(self: &Arc<Self>, agent: Arc<dyn Agent>) {
        let pod = Arc::downgrade(self);
        tokio::spawn(async move {
            // Ends when the VM is gone (the RPC fails) or the pod is dropped.
            while let Ok(id) = agent.get_oom_event().await {
                let Some(pod) = pod.upgrade() else { return };
                if id.is_empty() {
                    continue;
                }
                warn!(pod.log, "container OOM-killed in the guest"; "container" => &id);
                if let Ok(c) = pod.container(&id) {
                    if c.crio {
                        if let Err(e) = std::fs::write(c.bundle.join("oom"), b"") {
                            warn!(pod.log, "cannot write the oom file"; "container" => &id, "error" => %e);
                        }
                    }
                }
                pod.events.publish(
                    containerd_shim_protos::topics::TASK_OOM_EVENT_TOPIC,
                    ev::TaskOOM { container_id: id, ..Default::default() },
                );
            }
        });
    }

    /// `Exec`: registers a process to start with `Start`.
    pub fn exec(&self, id: &str, exec_id: &str, stdio: Stdio, process: agent_protocol::oci::Process) -> TaskResult<()> {
        if exec_id.is_empty() {
            return Err(TaskError::InvalidArgument("exec id is empty".into()));
        }
        let c = self.container(id)?;
        if c.init.status() != Status::Running {
            return Err(TaskError::FailedPrecondition(format!(
                "container {id} is not running ({:?})",
                c.init.status()
            )));
        }
        let mut execs = c.execs.lock().unwrap();
        if execs.contains_key(exec_id) {
            return Err(TaskError::AlreadyExists(format!("exec {exec_id} in container {id}")));
        }
        execs.insert(exec_id.into(), Process::new(id, exec_id, stdio));
        c.pending.lock().unwrap().insert(exec_id.into(), process);
        self.events.publish(
            containerd_shim_protos::topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            ev::TaskExecAdded { container_id: id.into(), exec_id: exec_id.into(), ..Default::default() },
        );
        Ok(())
    }

    /// `Kill`: a signal to a process (`all`: the container's init takes its pid namespace down).
    /// Signal 0 asks "does it exist?", as kill(2) does: yes while it was created or runs, no
    /// (NotFound) once it exited; the guest answers for a running one.
    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32) -> TaskResult<()> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        let finished = || {
            TaskError::NotFound(format!("process {} of container {id}: process already finished", p.agent_exec_id()))
        };
        match p.status() {
            Status::Stopped if signal == 0 => return Err(finished()),
            // CRI-O fails StopContainer on any Kill error, containerd tolerates NotFound: to
            // CRI-O a signal to a process that already exited is delivered to nobody, as runc
            // treats it.
            Status::Stopped if c.crio => return Ok(()),
            Status::Stopped => return Err(finished()),
            Status::Created if signal == 0 => return Ok(()),
            Status::Created if exec_id.is_empty() => {
                // Never started: there is nothing to signal; the container ends here.
                let agent = self.agent().await?;
                agent.remove_container(id).await?;
                let exit = p.set_exit(128 + signal);
                self.publish_exit(id, &p, exit).await;
                return Ok(());
            }
            Status::Created => {
                return Err(TaskError::FailedPrecondition(format!("exec {exec_id} of container {id} was not started")))
            }
            _ => {}
        }
        let agent = self.agent().await?;
        match agent.signal_process(id, p.agent_exec_id(), signal).await {
            Ok(()) => Ok(()),
            Err(_) if p.exit().is_some() && c.crio && signal != 0 => Ok(()),
            Err(e) if p.exit().is_some() => Err(TaskError::NotFound(format!("{e}: process already finished"))),
            Err(e) => Err(e.into()),
        }
    }

    /// `Update` (in-place resize): a raised CPU or memory limit first grows the VM by what goes
    /// beyond what was reserved for the container, then the guest cgroup takes the new limits;
    /// a lowered one only lowers the guest cgroup's.
    pub async fn update(&self, id: &str, resources: &oci_spec::runtime::LinuxResources) -> TaskResult<()> {
        let c = self.container(id)?;
        let vm = self.running_vm().await?;
        let wanted = crate::limits::Limits::of(Some(resources));
        let reserved = *c.reserved.lock().unwrap();
        if id != self.sandbox_id {
            self.grow_for(&vm, id, &reserved, &wanted).await?;
            *c.reserved.lock().unwrap() = reserved.max(&wanted);
        }
        let mut linux = oci_spec::runtime::Linux::default();
        linux.set_resources(Some(resources.clone()));
        let mut spec = oci_spec::runtime::Spec::default();
        spec.set_linux(Some(linux));
        let grpc = agent_protocol::convert::spec_to_grpc(&spec).Linux.take().unwrap_or_default().Resources;
        let req = pb::UpdateContainerRequest { container_id: id.into(), resources: grpc, ..Default::default() };
        vm.sandbox.agent().update_container(req).await?;
        info!(self.log, "container resources updated"; "container" => id,
            "memory_limit" => wanted.memory.unwrap_or(0), "cpu_limit" => wanted.cpus.unwrap_or(0));
        Ok(())
    }

    /// `Stats`: the container's guest cgroup statistics. A container whose init exited has
    /// nothing left to measure: its statistics are empty (CRI-O's stats loop cannot take an
    /// error for a container it still lists).
    pub async fn stats(&self, id: &str) -> TaskResult<pb::StatsContainerResponse> {
        let c = self.container(id)?;
        let agent = self.agent().await;
        let answer = match agent {
            Ok(agent) => agent.stats_container(id).await.map_err(TaskError::from),
            Err(e) => Err(e),
        };
        match answer {
            Ok(stats) => Ok(stats),
            Err(e) if c.init.status() == Status::Stopped => {
                info!(self.log, "no statistics of an exited container"; "container" => id, "error" => %e);
                Ok(pb::StatsContainerResponse::new())
            }
            Err(e) => Err(e),
        }
    }

    async fn publish_exit(&self, id: &str, p: &Process, exit: Exit) {
        let pid = self.vmm_pid().await;
        self.events.publish(
            containerd_shim_protos::topics::TASK_EXIT_EVENT_TOPIC,
            ev::TaskExit {
                container_id: id.into(),
                id: if p.exec_id.is_empty() { id.into() } else { p.exec_id.clone() },
                pid,
                exit_status: exit.code,
                exited_at: Some(crate::service::timestamp(exit.at)).into(),
                ..Default::default()
            },
        );
    }

    /// `Delete`: an exec that ended, or a container whose init ended (or never started). The
    /// sandbox container, or the last container, takes the VM with it.
    pub async fn delete(&self, id: &str, exec_id: &str) -> TaskResult<(u32, Exit)> {
        let c = self.container(id)?;
        let pid = self.vmm_pid().await;
        if !exec_id.is_empty() {
            let p = c.process(exec_id)?;
            if matches!(p.status(), Status::Running | Status::Paused) {
                return Err(TaskError::FailedPrecondition(format!(
                    "exec {exec_id} of container {id} is still running; kill it first"
                )));
            }
            let exit = p.exit().unwrap_or(Exit { code: 0, at: std::time::SystemTime::now() });
            c.execs.lock().unwrap().remove(exec_id);
            c.pending.lock().unwrap().remove(exec_id);
            return Ok((pid, exit));
        }
        if matches!(c.init.status(), Status::Running | Status::Paused) {
            return Err(TaskError::FailedPrecondition(format!("container {id} is still running; kill it first")));
        }
        if let Ok(vm) = self.running_vm().await {
            if let Err(e) = vm.sandbox.agent().remove_container(id).await {
                warn!(self.log, "RemoveContainer failed"; "container" => id, "error" => %e);
            }
            self.unplug_devices(&vm, &c.devices).await;
            self.unshare(&vm, id);
        }
        if let Some(root) = &c.mounted_rootfs {
            if let Err(e) = mounts::unmount_all(root) {
                error!(self.log, "cannot unmount the rootfs"; "container" => id, "error" => %e);
            }
        }
        let exit = c.init.exit().unwrap_or(Exit { code: 0, at: std::time::SystemTime::now() });
        let last = {
            let mut map = self.containers.lock().unwrap();
            map.remove(id);
            map.is_empty()
        };
        self.events.publish(
            containerd_shim_protos::topics::TASK_DELETE_EVENT_TOPIC,
            ev::TaskDelete {
                container_id: id.into(),
                pid,
                exit_status: exit.code,
                exited_at: Some(crate::service::timestamp(exit.at)).into(),
                ..Default::default()
            },
        );
        if last || id == self.sandbox_id {
            self.stop_vm().await;
        }
        info!(self.log, "container deleted"; "container" => id);
        Ok((pid, exit))
    }

    /// Stops the VM and removes the shared directory; idempotent.
    pub async fn stop_vm(&self) {
        let Some(vm) = self.vm.lock().await.take() else { return };
        if let Err(e) = vm.sandbox.shutdown().await {
            error!(self.log, "stopping the VM failed"; "error" => %e);
        }
        let cgroup = vm.cgroup.lock().unwrap().take();
        if let Some(Err(e)) = cgroup.map(crate::host_cgroup::SandboxCgroup::remove) {
            error!(self.log, "removing the host cgroup failed"; "error" => %e);
        }
        if let Err(e) = vm.shared.destroy() {
            error!(self.log, "removing the shared directory failed"; "error" => %e);
        }
    }

    /// `Pause` / `Resume` of a container.
    pub async fn set_paused(&self, id: &str, paused: bool) -> TaskResult<()> {
        let c = self.container(id)?;
        let want = if paused { Status::Running } else { Status::Paused };
        if c.init.status() != want {
            return Err(TaskError::FailedPrecondition(format!(
                "container {id} is {:?}, not {want:?}",
                c.init.status()
            )));
        }
        let agent = self.agent().await?;
        if paused {
            agent.pause_container(id).await?;
            c.init.set_status(Status::Paused);
            self.events.publish(
                containerd_shim_protos::topics::TASK_PAUSED_EVENT_TOPIC,
                ev::TaskPaused { container_id: id.into(), ..Default::default() },
            );
        } else {
            agent.resume_container(id).await?;
            c.init.set_status(Status::Running);
            self.events.publish(
                containerd_shim_protos::topics::TASK_RESUMED_EVENT_TOPIC,
                ev::TaskResumed { container_id: id.into(), ..Default::default() },
            );
        }
        Ok(())
    }

    /// Whether no container is left.
    pub fn is_empty(&self) -> bool {
        self.containers.lock().unwrap().is_empty()
    }

    /// Ids of the containers (for `delete` and diagnostics).
    pub fn container_ids(&self) -> Vec<String> {
        self.containers.lock().unwrap().keys().cloned().collect()
    }
}
