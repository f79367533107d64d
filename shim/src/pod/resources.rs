//! The VM's size as containers' limits ask for it (hot-plugged vCPUs and memory), `Update`
//! (in-place resize) and `Stats`. The hot-plug lock (`Vm::growing`) is only ever taken here:
//! a hot-plug that waits holds up other resizes, never the fast calls.

use std::sync::Arc;

use agent_protocol::agent as pb;
use slog::{info, warn};

use super::vm::Vm;
use super::{detached, Pod, PodError, PodResult};
use crate::limits::Limits;
use crate::process::Status;

impl Pod {
    /// Grows the VM by what a container's limits go beyond what was reserved for it so far:
    /// its CPU limit as vCPUs, its memory limit as hot-plugged memory, so that the guest can
    /// hold and run what the container may use (unless the container manager sized the VM for
    /// the whole pod). Like Kata, what was added stays until the VM stops.
    pub(super) async fn grow_for(&self, vm: &Vm, id: &str, reserved: &Limits, wanted: &Limits) -> PodResult<()> {
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
            PodError::Internal(format!(
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
    async fn grow_vcpus(&self, vm: &Vm, cpus: u32, id: &str) -> PodResult<()> {
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
            PodError::Internal(format!(
                "cannot hot-plug {} vCPUs for container {id} (CPU limit {cpus}): {e}",
                want - current
            ))
        })?;
        *vm.vcpus.lock().unwrap() = total;
        info!(self.log, "vCPUs added for a container"; "container" => id, "total_vcpus" => total);
        Ok(())
    }

    /// `Update` (in-place resize): a raised CPU or memory limit first grows the VM by what goes
    /// beyond what was reserved for the container, then the guest cgroup takes the new limits;
    /// a lowered one only lowers the guest cgroup's.
    /// Runs to its end even when the caller goes away (what was hot-plugged stays counted).
    pub async fn update(self: &Arc<Self>, id: &str, resources: &oci_spec::runtime::LinuxResources) -> PodResult<()> {
        let (pod, id, resources) = (self.clone(), id.to_string(), resources.clone());
        detached(async move { pod.update_now(&id, &resources).await }).await
    }

    async fn update_now(&self, id: &str, resources: &oci_spec::runtime::LinuxResources) -> PodResult<()> {
        let c = self.container(id)?;
        let vm = self.running_vm()?;
        let wanted = Limits::of(Some(resources));
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
    pub async fn stats(&self, id: &str) -> PodResult<pb::StatsContainerResponse> {
        let c = self.container(id)?;
        let answer = match self.agent() {
            Ok(agent) => agent.stats_container(id).await.map_err(PodError::from),
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
}
