//! The sandbox layer: one VM and the agent inside it. Boot is all-or-nothing: on any failure
//! the VM, its helpers and its run directory are gone before the error is returned.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hypervisor::{Hypervisor, MemoryMiB, Qemu};
use slog::{info, warn, Logger};

use crate::agent::{Agent, AgentError, KataAgent};
use crate::config::Config;

/// Why a sandbox could not boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The hypervisor layer failed.
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    /// The agent did not come up.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// A running pod VM with a connected agent.
pub struct Sandbox {
    id: String,
    vm: Arc<dyn Hypervisor>,
    agent: Arc<dyn Agent>,
    log: Logger,
}

impl Sandbox {
    /// Boots a QEMU VM for `id` as `config` says and waits for its agent.
    pub async fn boot(id: &str, config: &Config, log: &Logger) -> Result<Sandbox, BootError> {
        let log = log.new(slog::o!("sandbox" => id.to_string()));
        for w in &config.warnings {
            warn!(log, "{}", w);
        }
        let vm: Arc<dyn Hypervisor> = Arc::new(Qemu::new(id, config.hypervisor.clone(), log.clone()));
        Self::boot_with(id, vm, config.agent.dial_timeout, &log).await
    }

    /// Boots a pod VM for `id` that shares `shared_dir` with the guest over virtio-fs, and has
    /// the agent mount it at [`crate::mounts::GUEST_SHARED`] (`CreateSandbox`).
    pub async fn boot_pod(id: &str, config: &Config, shared_dir: &std::path::Path, hostname: &str, log: &Logger) -> Result<Sandbox, BootError> {
        let log = log.new(slog::o!("sandbox" => id.to_string()));
        for w in &config.warnings {
            warn!(log, "{}", w);
        }
        let vm = Qemu::new(id, config.hypervisor.clone(), log.clone()).with_shared_dir(shared_dir);
        let vm: Arc<dyn Hypervisor> = Arc::new(vm);
        let sandbox = Self::boot_with(id, vm, config.agent.dial_timeout, &log).await?;
        let storage = agent_protocol::agent::Storage {
            driver: "virtio-fs".into(),
            source: hypervisor::qemu::cmdline::VIRTIO_FS_TAG.into(),
            fstype: "virtiofs".into(),
            mount_point: format!("{}/", crate::mounts::GUEST_SHARED),
            ..Default::default()
        };
        let req = agent_protocol::agent::CreateSandboxRequest {
            hostname: hostname.into(),
            storages: vec![storage],
            sandbox_id: id.into(),
            ..Default::default()
        };
        if let Err(e) = sandbox.agent.create_sandbox(req).await {
            let _ = sandbox.shutdown().await;
            return Err(e.into());
        }
        Ok(sandbox)
    }

    /// Boots `vm` (not yet prepared) and connects to its agent within `dial_timeout`.
    pub async fn boot_with(id: &str, vm: Arc<dyn Hypervisor>, dial_timeout: Duration, log: &Logger) -> Result<Sandbox, BootError> {
        let result = async {
            vm.prepare().await?;
            vm.start().await?;
            let agent = KataAgent::dial(vm.as_ref(), dial_timeout, log).await?;
            if let Err(e) = agent.set_guest_time(SystemTime::now()).await {
                warn!(log, "could not set the guest clock"; "error" => %e);
            }
            Ok::<_, BootError>(agent)
        }
        .await;
        match result {
            Ok(agent) => Ok(Sandbox { id: id.to_string(), vm, agent: Arc::new(agent), log: log.clone() }),
            Err(e) => {
                if let Err(c) = vm.cleanup().await {
                    warn!(log, "cleanup after failed boot failed"; "error" => %c);
                }
                Err(e)
            }
        }
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The hypervisor layer.
    pub fn vm(&self) -> &Arc<dyn Hypervisor> {
        &self.vm
    }

    /// The agent.
    pub fn agent(&self) -> &Arc<dyn Agent> {
        &self.agent
    }

    /// Grows guest memory to `total` and has the guest online it; returns the new total.
    pub async fn resize_memory(&self, total: MemoryMiB) -> Result<MemoryMiB, BootError> {
        let new = self.vm.resize_memory(total).await?;
        self.agent.online_cpu_mem(0, false).await?;
        Ok(new)
    }

    /// Asks the guest to shut down, then stops the VM and removes everything on the host.
    pub async fn shutdown(&self) -> Result<(), hypervisor::Error> {
        match tokio::time::timeout(Duration::from_secs(5), self.agent.destroy_sandbox()).await {
            Ok(Ok(())) => {
                // The guest powers off by itself; give it a moment before stop() forces it.
                let _ = tokio::time::timeout(Duration::from_secs(3), self.vm.wait_exit()).await;
            }
            Ok(Err(e)) => warn!(self.log, "DestroySandbox failed; stopping the VM anyway"; "error" => %e),
            Err(_) => warn!(self.log, "DestroySandbox got no answer; stopping the VM anyway"),
        }
        self.vm.cleanup().await?;
        info!(self.log, "sandbox stopped");
        Ok(())
    }
}
