//! The pod's VM: booted by the first container (which decides its shape), stopped by the
//! sandbox container's delete, the last delete or Shutdown. A boot can be cancelled by a stop.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex};

use hypervisor::Hypervisor;
use slog::{error, info, warn};
use tokio::sync::Notify;

use super::{detached, Event, Pod, PodError, PodResult};
use crate::agent::Agent;
use crate::config::Config;
use crate::host_cgroup::SandboxCgroup;
use crate::mounts::SharedDir;
use crate::sandbox::Sandbox;
use crate::spec;

/// The pod's VM as the fast calls see it.
pub(super) enum VmSlot {
    /// No VM.
    Down,
    /// A boot is under way; notifying the handle cancels it.
    Booting(Arc<Notify>),
    /// Running.
    Up(Arc<Vm>),
}

/// A running VM and what the pod keeps with it.
pub(super) struct Vm {
    pub(super) sandbox: Sandbox,
    pub(super) shared: SharedDir,
    /// The VMM's pid, read once at boot.
    pub(super) vmm_pid: u32,
    /// The pod's host cgroup the shim and the VM's processes run in (`sandbox_cgroup_only`).
    cgroup: Mutex<Option<SandboxCgroup>>,
    /// Boot memory (MiB) plus what was hot-plugged for containers.
    pub(super) memory_mib: Mutex<u64>,
    /// Boot vCPUs plus those hot-plugged for containers' CPU limits.
    pub(super) vcpus: Mutex<u32>,
    /// `default_maxvcpus` resolved against the host: the hot-plug ceiling.
    pub(super) max_vcpus: u32,
    /// The container manager sized the VM (sandbox annotations): no per-container hotplug.
    pub(super) sized_by_manager: bool,
    /// Held while a Create grows the VM, so that concurrent Creates do not both read the same
    /// `memory_mib` / `vcpus` and lose one container's share.
    pub(super) growing: tokio::sync::Mutex<()>,
    /// Hot-plugged devices so far (for unique ids).
    pub(super) next_device: AtomicU32,
    /// Whether the limit of Bidirectional propagation was logged (once per pod).
    pub(super) told_bidirectional: AtomicBool,
    /// A peer pod's VM (`[hypervisor.remote]`): files are copied or pulled, never shared.
    pub(super) remote: Option<RemoteShape>,
    /// `[runtime] create_container_timeout`: the deadline of CreateContainer in the guest.
    pub(super) create_timeout: std::time::Duration,
}

/// What a peer pod's containers need to know of its configuration.
pub(super) struct RemoteShape {
    /// `[runtime] experimental_force_guest_pull`.
    pub(super) force_guest_pull: bool,
}

impl Pod {
    /// The running VM (never waits: a booting VM is not running yet).
    pub(super) fn running_vm(&self) -> PodResult<Arc<Vm>> {
        match &*self.vm.lock().unwrap() {
            VmSlot::Up(vm) => Ok(vm.clone()),
            _ => Err(PodError::FailedPrecondition("the sandbox VM is not running".into())),
        }
    }

    /// Whether `vm` is still the pod's VM (a stop may have taken it meanwhile).
    pub(super) fn is_current(&self, vm: &Arc<Vm>) -> bool {
        matches!(&*self.vm.lock().unwrap(), VmSlot::Up(v) if Arc::ptr_eq(v, vm))
    }

    /// Whether a VM runs or boots.
    pub(super) fn vm_exists(&self) -> bool {
        !matches!(&*self.vm.lock().unwrap(), VmSlot::Down)
    }

    fn load_config(&self, from_request: Option<&str>) -> PodResult<Config> {
        let path = from_request.or(self.config_path_env.as_deref()).map(Path::new);
        crate::config::load(path).map_err(|e| PodError::InvalidArgument(e.to_string()))
    }

    /// Boots the VM unless it runs. The first container (the pod's sandbox container for CRI)
    /// decides its shape: configuration, `io.katacontainers.config.*` and sandbox-sizing
    /// annotations, hostname, network namespace. A [`Pod::stop_vm`] meanwhile cancels the boot;
    /// either way a failed boot leaves nothing behind. Without `may_boot` (a container of a
    /// CRI pod) only a VM that runs, or that was booting and came up, will do.
    pub(super) async fn ensure_vm(
        self: &Arc<Self>,
        config_path: Option<&str>,
        oci: &oci_spec::runtime::Spec,
        may_boot: bool,
    ) -> PodResult<Arc<Vm>> {
        let _boot = self.boot.lock().await;
        if let Ok(vm) = self.running_vm() {
            return Ok(vm);
        }
        if !may_boot {
            return Err(PodError::FailedPrecondition(format!(
                "the VM of sandbox {} is not running; create the sandbox first",
                self.sandbox_id
            )));
        }
        let shared_with_node = spec::host_namespaces(oci);
        if !shared_with_node.is_empty() {
            let options: Vec<&str> = shared_with_node.iter().map(|h| h.option).collect();
            let evidence: Vec<&str> = shared_with_node.iter().map(|h| h.evidence.as_str()).collect();
            return Err(PodError::InvalidArgument(format!(
                "the pod asks for {} ({}): a pod in a VM has its own kernel, network stack, IPC and process \
                 table and cannot share the node's; remove {} from the pod spec, or run the pod with a runc \
                 RuntimeClass",
                options.join(", "),
                evidence.join("; "),
                options.iter().map(|o| format!("{o}: true")).collect::<Vec<_>>().join(", ")
            )));
        }
        let mut config = self.load_config(config_path)?;
        let mut pod_annotations = spec::annotations(oci);
        if let Some(remote) = config.remote.as_mut() {
            // The podvm's size: the instance type and sizing annotations go to the remote
            // hypervisor service as they are (an instance type is not a QEMU machine type).
            crate::annotations::apply_remote(&mut pod_annotations, remote).map_err(PodError::InvalidArgument)?;
            remote.pod_annotations = spec::annotations(oci);
        }
        let applied =
            crate::annotations::apply(&pod_annotations, &mut config.hypervisor).map_err(PodError::InvalidArgument)?;
        // The agent policy: base64 of a Rego document (as in Kata); an empty value sets none.
        let policy = applied
            .agent_policy
            .as_deref()
            .map(crate::annotations::decode_agent_policy)
            .transpose()
            .map_err(PodError::InvalidArgument)?
            .filter(|p| !p.is_empty());
        let hostname = oci.hostname().clone().unwrap_or_default();
        let netns = spec::netns_path(oci);
        let shared = SharedDir::new(&self.sandbox_id).with_log(self.log.clone());
        let cancel = Arc::new(Notify::new());
        *self.vm.lock().unwrap() = VmSlot::Booting(cancel.clone());
        let mut cgroup = None;
        let mut created: Option<Arc<dyn Hypervisor>> = None;
        let booted = {
            let work = async {
                shared.create().map_err(|e| PodError::Internal(e.to_string()))?;
                if let Some(remote) = &config.remote {
                    crate::cleanup::record_remote(shared.sandbox_dir(), &remote.socket)
                        .map_err(|e| PodError::Internal(format!("cannot record the remote hypervisor socket: {e}")))?;
                }
                cgroup = self.enter_sandbox_cgroup(&config, oci, &shared)?;
                // A remote hypervisor builds the pod's network itself (the tunnel in this
                // namespace): it gets the path whatever the internetworking model (Kata's
                // configuration-remote.toml requires "none").
                let netns = netns.as_deref().filter(|_| {
                    config.remote.is_some()
                        || config.runtime.internetworking_model == hypervisor::InternetworkingModel::TcFilter
                });
                let boot_error = |e| PodError::Internal(format!("cannot start the sandbox VM: {e}"));
                let (vm, guest_network) = self
                    .backend
                    .create_vm(&self.sandbox_id, &config, shared.root(), netns, &self.log)
                    .await
                    .map_err(boot_error)?;
                created = Some(vm.clone());
                let sandbox = Sandbox::start_pod(
                    self.backend.as_ref(),
                    &self.sandbox_id,
                    vm,
                    guest_network,
                    &config,
                    &hostname,
                    &self.log,
                )
                .await
                .map_err(boot_error)?;
                // The policy is in force before any container is created; a refused policy
                // stops the VM.
                if let Some(policy) = &policy {
                    if let Err(e) = sandbox.agent().set_policy(policy).await {
                        if let Err(c) = sandbox.shutdown().await {
                            warn!(self.log, "stopping the VM after a refused agent policy failed"; "error" => %c);
                        }
                        let refused =
                            matches!(&e, crate::agent::AgentError::Status { code: ttrpc::Code::INVALID_ARGUMENT, .. });
                        let msg = format!("annotation {}: {e}", crate::annotations::AGENT_POLICY_ANNOTATION);
                        return Err(if refused { PodError::InvalidArgument(msg) } else { PodError::Internal(msg) });
                    }
                    info!(self.log, "agent policy set"; "bytes" => policy.len());
                }
                Ok(sandbox)
            };
            tokio::select! {
                r = work => r,
                _ = cancel.notified() => Err(PodError::FailedPrecondition(
                    "the pod is stopping: the sandbox VM's boot was cancelled".into(),
                )),
            }
        };
        let sandbox = match booted {
            Ok(s) => s,
            Err(e) => {
                // Whatever the boot had made: the VM (cleanup is idempotent: a failed start
                // already did it), the host cgroup, the shared directory.
                if let Some(vm) = created {
                    if let Err(c) = vm.cleanup().await {
                        warn!(self.log, "cleanup of the VM failed"; "error" => %c);
                    }
                }
                remove_cgroup(&self.log, cgroup.take());
                if let Err(c) = shared.destroy() {
                    warn!(self.log, "cleanup of the shared directory failed"; "error" => %c);
                }
                *self.vm.lock().unwrap() = VmSlot::Down;
                return Err(e);
            }
        };
        let vmm_pid = sandbox.vm().pids().await.first().copied().unwrap_or(0);
        let agent = sandbox.agent().clone();
        let vm = Arc::new(Vm {
            sandbox,
            shared,
            vmm_pid,
            cgroup: Mutex::new(cgroup),
            memory_mib: Mutex::new(config.hypervisor.default_memory),
            vcpus: Mutex::new(config.hypervisor.default_vcpus),
            max_vcpus: config.hypervisor.max_vcpus(hypervisor::host::host_cpus()),
            sized_by_manager: applied.sized_by_manager || config.remote.is_some(),
            create_timeout: config.runtime.create_container_timeout,
            remote: config.remote.as_ref().map(|_| RemoteShape { force_guest_pull: config.runtime.force_guest_pull }),
            growing: tokio::sync::Mutex::new(()),
            next_device: AtomicU32::new(0),
            told_bidirectional: AtomicBool::new(false),
        });
        *self.vm.lock().unwrap() = VmSlot::Up(vm.clone());
        self.spawn_oom_watch(agent);
        Ok(vm)
    }

    /// Makes the pod's host cgroup at the sandbox's `linux.cgroupsPath` and moves the shim into
    /// it, so that QEMU and its helpers start there (`[runtime] sandbox_cgroup_only`).
    fn enter_sandbox_cgroup(
        &self,
        config: &Config,
        oci: &oci_spec::runtime::Spec,
        shared: &SharedDir,
    ) -> PodResult<Option<SandboxCgroup>> {
        if !config.runtime.sandbox_cgroup_only {
            return Ok(None);
        }
        let value = oci.linux().as_ref().and_then(|l| l.cgroups_path().clone()).unwrap_or_default();
        let value = value.to_string_lossy();
        let Some(rel) =
            crate::host_cgroup::relative_path(&value).map_err(|e| PodError::InvalidArgument(e.to_string()))?
        else {
            return Ok(None);
        };
        let mut cgroup = SandboxCgroup::create(&rel, shared.sandbox_dir()).map_err(|e| {
            PodError::Internal(format!("{e} (set [runtime] sandbox_cgroup_only = false to run without)"))
        })?;
        if let Err(e) = cgroup.enter() {
            remove_cgroup(&self.log, Some(cgroup));
            return Err(PodError::Internal(e.to_string()));
        }
        info!(self.log, "the shim and the VM run in the pod's host cgroup"; "cgroup" => %rel.display());
        Ok(Some(cgroup))
    }

    /// Stops the VM and removes the shared directory and the host cgroup; cancels a boot under
    /// way (and waits for its cleanup); idempotent. Runs to its end even when the caller goes
    /// away (`Shutdown` cancelled by a client timeout).
    pub async fn stop_vm(self: &Arc<Self>) {
        let pod = self.clone();
        let _ = detached(async move {
            pod.stop_vm_now().await;
            Ok(())
        })
        .await;
    }

    /// [`Pod::stop_vm`] in the caller's task (for work that already runs detached).
    pub(super) async fn stop_vm_now(&self) {
        if let VmSlot::Booting(cancel) = &*self.vm.lock().unwrap() {
            cancel.notify_one();
        }
        let _boot = self.boot.lock().await;
        let vm = match std::mem::replace(&mut *self.vm.lock().unwrap(), VmSlot::Down) {
            VmSlot::Up(vm) => vm,
            _ => return,
        };
        // Off kata-monitor's list at once: a stopped pod is not scraped (the server itself ends
        // with the daemon).
        if let Err(e) = crate::monitor::remove_dir(&self.sandbox_id) {
            warn!(self.log, "cannot remove the metrics socket's directory"; "error" => %e);
        }
        if let Err(e) = vm.sandbox.shutdown().await {
            error!(self.log, "stopping the VM failed"; "error" => %e);
        }
        let cgroup = vm.cgroup.lock().unwrap().take();
        if let Some(Err(e)) = cgroup.map(SandboxCgroup::remove) {
            error!(self.log, "removing the host cgroup failed"; "error" => %e);
        }
        if let Err(e) = vm.shared.destroy() {
            error!(self.log, "removing the shared directory failed"; "error" => %e);
        }
    }

    /// Publishes OOM kills reported by the agent (and writes `<bundle>/oom` for CRI-O). The guest
    /// is not trusted: ids of containers this pod does not have are dropped, and answers are
    /// taken at most every [`OOM_EVENT_INTERVAL`], so a guest answering in a tight loop cannot
    /// flood the log or the event stream.
    fn spawn_oom_watch(self: &Arc<Self>, agent: Arc<dyn Agent>) {
        let pod = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut dropped = 0u64;
            // Ends when the VM is gone (the RPC fails) or the pod is dropped.
            while let Ok(id) = agent.get_oom_event().await {
                let next = tokio::time::Instant::now() + OOM_EVENT_INTERVAL;
                let Some(pod) = pod.upgrade() else { return };
                match pod.container(&id) {
                    Ok(c) => {
                        warn!(pod.log, "container OOM-killed in the guest"; "container" => &id);
                        if c.crio {
                            if let Err(e) = std::fs::write(c.bundle.join("oom"), b"") {
                                warn!(pod.log, "cannot write the oom file"; "container" => &id, "error" => %e);
                            }
                        }
                        pod.publish(Event::TaskOom { container_id: id });
                    }
                    Err(_) => {
                        dropped += 1;
                        if dropped.is_power_of_two() {
                            warn!(pod.log, "the agent reported OOM kills of containers this pod does not have; dropped";
                                "container" => id.chars().take(80).collect::<String>(), "dropped" => dropped);
                        }
                    }
                }
                drop(pod);
                tokio::time::sleep_until(next).await;
            }
        });
    }
}

/// The shortest time between two OOM answers the shim takes from the agent.
pub(super) const OOM_EVENT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

fn remove_cgroup(log: &slog::Logger, cgroup: Option<SandboxCgroup>) {
    if let Some(Err(c)) = cgroup.map(SandboxCgroup::remove) {
        warn!(log, "cleanup of the host cgroup failed"; "error" => %c);
    }
}
