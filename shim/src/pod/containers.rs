//! Containers: `Create` (rootfs, the VM, sharing files, block devices, the guest container),
//! `Delete`, `Pause` / `Resume`. Nothing a failed create made stays behind.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use agent_protocol::agent as pb;
use slog::{error, info, warn};

use super::vm::Vm;
use super::{detached, no_exit, Container, CreateRequest, Event, Pod, PodError, PodResult};
use crate::mounts;
use crate::process::{Exit, Process, Status};
use crate::spec;

impl Pod {
    /// `Create`: mounts the rootfs, boots the VM if needed, shares the rootfs and bind sources,
    /// and creates the container in the guest. Nothing is left behind on failure, also when
    /// the caller goes away meanwhile (the work runs in a task of its own).
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> PodResult<u32> {
        let pod = self.clone();
        detached(async move { pod.create_now(req).await }).await
    }

    async fn create_now(self: &Arc<Self>, req: CreateRequest) -> PodResult<u32> {
        if req.id.is_empty() {
            return Err(PodError::InvalidArgument("container id is empty".into()));
        }
        if self.containers.lock().unwrap().contains_key(&req.id) {
            return Err(PodError::AlreadyExists(format!("container {}", req.id)));
        }
        let oci = spec::load(&req.bundle).map_err(|e| PodError::InvalidArgument(e.to_string()))?;
        let binds = spec::host_binds(&oci).map_err(|e| PodError::InvalidArgument(e.to_string()))?;
        let mut req = req;
        let virtual_volume = super::remote::take_virtual_volume(&mut req.rootfs).map_err(PodError::InvalidArgument)?;
        let mounted_rootfs = if req.rootfs.is_empty() || virtual_volume.is_some() {
            None
        } else {
            let target = req.bundle.join("rootfs");
            mounts::mount_rootfs(&req.rootfs, &target).map_err(|e| {
                let _ = mounts::unmount_all(&target);
                PodError::Internal(format!("cannot mount the rootfs: {e}"))
            })?;
            Some(target)
        };
        let result = self.create_mounted(&req, oci, &binds, virtual_volume.as_ref()).await;
        match result {
            Ok(c) => {
                self.containers.lock().unwrap().insert(req.id.clone(), Arc::new(Container { mounted_rootfs, ..c }));
                let pid = self.vmm_pid();
                self.publish(Event::TaskCreate { container_id: req.id.clone(), bundle: req.bundle.clone(), pid });
                Ok(pid)
            }
            Err(e) => {
                if let Some(t) = &mounted_rootfs {
                    let _ = mounts::unmount_all(t);
                }
                if self.containers.lock().unwrap().is_empty() {
                    self.stop_vm_now().await;
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
        virtual_volume: Option<&super::remote::VirtualVolume>,
    ) -> PodResult<Container> {
        let host_root = spec::host_rootfs(&oci, &req.bundle, !req.rootfs.is_empty());
        let annotations = spec::annotations(&oci);
        let crio = annotations.get("io.container.manager").is_some_and(|m| m == "cri-o");
        let kind = crate::annotations::container_type(&annotations).unwrap_or("").to_string();
        if kind == "container" && !self.vm_exists() {
            return Err(PodError::FailedPrecondition(format!(
                "container {} belongs to sandbox {}, whose VM is not running; create the sandbox first",
                req.id, self.sandbox_id
            )));
        }
        let block_devices = spec::take_block_devices(&mut oci).map_err(|e| PodError::InvalidArgument(e.to_string()))?;
        let sandbox_pidns = kind == "container" && spec::joins_pid_namespace(&oci);
        let vm = self.ensure_vm(req.config_path.as_deref(), &oci, kind != "container").await?;
        let id = &req.id;
        let limits = crate::limits::Limits::of(oci.linux().as_ref().and_then(|l| l.resources().as_ref()));
        if kind == "container" {
            self.grow_for(&vm, id, &Default::default(), &limits).await?;
        }
        let (guest_root, sources, pulled, sync) = if let Some(remote) = &vm.remote {
            let agent = vm.sandbox.agent().clone();
            let files = self
                .remote_files(&agent, id, &annotations, virtual_volume, remote.force_guest_pull, host_root, binds)
                .await?;
            (files.guest_root, files.sources, files.storages, files.sync)
        } else {
            if virtual_volume.is_some() {
                return Err(PodError::InvalidArgument(
                    "the rootfs is a Kata virtual volume (image pulled in the guest), which podvisor supports for \
                     peer pods only; use the kata-remote runtime class, or turn off runtime_pull_image for this \
                     handler"
                        .into(),
                ));
            }
            let host_root = host_root.map_err(|e| PodError::InvalidArgument(e.to_string()))?;
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
                    return Err(PodError::Internal(format!("cannot share the container's files with the VM: {e}")));
                }
            };
            (guest_root, sources, Vec::new(), None)
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
        let mut ephemeral = ephemeral;
        ephemeral.extend(pulled);
        let (guest_spec, warnings) = spec::for_guest(oci, &guest_root, binds, &sources);
        for w in warnings {
            warn!(self.log, "{}", w; "container" => id);
        }
        let grpc = agent_protocol::convert::spec_to_grpc(&guest_spec);
        let agent = vm.sandbox.agent().clone();
        let (devices, plugged) = match self.plug_devices(&vm, id, &block_devices).await {
            Ok(d) => d,
            Err(e) => {
                if let Some(t) = &sync {
                    t.abort();
                }
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
            agent.create_container_within(creq, vm.create_timeout).await?;
            init.start_io(agent.clone(), &self.log).await.map_err(|e| PodError::InvalidArgument(e.to_string()))?;
            Ok::<_, PodError>(())
        }
        .await;
        let created = created.and_then(|()| {
            // A stop (Shutdown, SIGTERM) took the VM meanwhile: the container went with it.
            if self.is_current(&vm) {
                Ok(())
            } else {
                Err(PodError::FailedPrecondition(format!("the sandbox VM stopped while container {id} was created")))
            }
        });
        if let Err(e) = created {
            if let Some(t) = &sync {
                t.abort();
            }
            let _ = agent.remove_container(id).await;
            self.unplug_devices(&vm, &plugged).await;
            self.unshare(&vm, id);
            if !self.is_current(&vm) {
                // The stop removed the shared directory before this container's files left it.
                let _ = vm.shared.destroy();
            }
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
            sync,
        })
    }

    /// Hot-plugs the container's block devices as virtio-blk; returns the agent's device list
    /// and the hypervisor's ids (undone here on failure).
    async fn plug_devices(
        &self,
        vm: &Vm,
        id: &str,
        block: &[spec::BlockDevice],
    ) -> PodResult<(Vec<pb::Device>, Vec<String>)> {
        let (mut devices, mut plugged) = (Vec::new(), Vec::new());
        for b in block {
            let n = vm.next_device.fetch_add(1, Relaxed);
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
                    return Err(PodError::Internal(format!(
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

    /// `Delete`: an exec that ended, or a container whose init ended (or never started). The
    /// sandbox container, or the last container, takes the VM with it. Runs to its end even
    /// when the caller goes away.
    pub async fn delete(self: &Arc<Self>, id: &str, exec_id: &str) -> PodResult<(u32, Exit)> {
        let (pod, id, exec_id) = (self.clone(), id.to_string(), exec_id.to_string());
        detached(async move { pod.delete_now(&id, &exec_id).await }).await
    }

    async fn delete_now(&self, id: &str, exec_id: &str) -> PodResult<(u32, Exit)> {
        let c = self.container(id)?;
        let pid = self.vmm_pid();
        if !exec_id.is_empty() {
            let p = c.process(exec_id)?;
            if matches!(p.status(), Status::Running | Status::Paused) {
                return Err(PodError::FailedPrecondition(format!(
                    "exec {exec_id} of container {id} is still running; kill it first"
                )));
            }
            let exit = p.exit().unwrap_or_else(no_exit);
            c.execs.lock().unwrap().remove(exec_id);
            c.pending.lock().unwrap().remove(exec_id);
            return Ok((pid, exit));
        }
        if matches!(c.init.status(), Status::Running | Status::Paused) {
            return Err(PodError::FailedPrecondition(format!("container {id} is still running; kill it first")));
        }
        if let Some(t) = &c.sync {
            t.abort();
        }
        if let Ok(vm) = self.running_vm() {
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
        let exit = c.init.exit().unwrap_or_else(no_exit);
        let last = {
            let mut map = self.containers.lock().unwrap();
            map.remove(id);
            map.is_empty()
        };
        self.publish(Event::TaskDelete { container_id: id.into(), pid, exit });
        if last || id == self.sandbox_id {
            self.stop_vm_now().await;
        }
        info!(self.log, "container deleted"; "container" => id);
        Ok((pid, exit))
    }

    /// `Pause` / `Resume` of a container.
    pub async fn set_paused(&self, id: &str, paused: bool) -> PodResult<()> {
        let c = self.container(id)?;
        let want = if paused { Status::Running } else { Status::Paused };
        if c.init.status() != want {
            return Err(PodError::FailedPrecondition(format!("container {id} is {:?}, not {want:?}", c.init.status())));
        }
        let agent = self.agent()?;
        if paused {
            agent.pause_container(id).await?;
            c.init.set_status(Status::Paused);
            self.publish(Event::TaskPaused { container_id: id.into() });
        } else {
            agent.resume_container(id).await?;
            c.init.set_status(Status::Running);
            self.publish(Event::TaskResumed { container_id: id.into() });
        }
        Ok(())
    }
}
