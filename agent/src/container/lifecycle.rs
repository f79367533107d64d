//! Container lifecycle RPCs: create, start, exec, pause, resume, remove; and the per-process
//! calls (signal, wait, stdio) that look a process up by container and exec id.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_protocol::{agent as pb, convert};
use libcontainer::oci_spec::runtime::Process;
use nix::sys::signal::Signal;
use slog::{info, warn};
use ttrpc::Code;

use super::process::describe;
use super::runtime::Op;
use super::{cgroup, device, spec, Container, Containers, Error, Lookup, Result, State, HELPER_TIMEOUT};
use crate::sandbox;

/// Removes what a failed create left: mounts, bundle, id reservation, empty cgroup parents.
struct CreateGuard<'a> {
    c: &'a Containers,
    id: String,
    storages: Vec<sandbox::Mounted>,
    bundle: Option<PathBuf>,
    cgroup: Option<PathBuf>,
    armed: bool,
}

impl Drop for CreateGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            sandbox::unmount_all(&self.storages);
            if let Some(b) = &self.bundle {
                let _ = std::fs::remove_dir_all(b);
            }
        }
        let mut inner = self.c.inner.lock().unwrap();
        inner.creating.remove(&self.id);
        if let Some(rel) = self.cgroup.as_ref().filter(|_| self.armed) {
            if inner.containers.is_empty() && inner.creating.is_empty() {
                cgroup::remove_empty_parents(&self.c.cgroup_root, rel);
            }
        }
    }
}

impl Containers {
    /// CreateContainer: mounts the container's storages, writes the bundle (the spec with the
    /// agent's rules applied) and creates the container with its init process waiting for
    /// StartContainer. Output is buffered from now on.
    pub async fn create_container(&self, req: &pb::CreateContainerRequest) -> Result<()> {
        let id = req.container_id.as_str();
        if !spec::valid_id(id) {
            return Err(Error::invalid(format!(
                "container_id: {id:?} is not a valid id ([A-Za-z0-9_.-], at most 256)"
            )));
        }
        if !req.exec_id.is_empty() && !spec::valid_id(&req.exec_id) {
            return Err(Error::invalid(format!("container {id}: exec_id {:?} is not a valid id", req.exec_id)));
        }
        let oci = req.OCI.as_ref().ok_or_else(|| Error::invalid(format!("container {id}: OCI: missing")))?;
        {
            let mut inner = self.inner.lock().unwrap();
            if inner.containers.contains_key(id) || !inner.creating.insert(id.to_string()) {
                return Err(Error::new(Code::ALREADY_EXISTS, format!("container {id} already exists")));
            }
        }
        let mut guard =
            CreateGuard { c: self, id: id.to_string(), storages: Vec::new(), bundle: None, cgroup: None, armed: true };
        for (i, d) in req.devices.iter().enumerate() {
            device::check(d, i).map_err(|e| Error::invalid(format!("container {id}: {e}")))?;
        }
        let join = self.join_for(id, req.sandbox_pidns)?;
        // Guest pull (image_guest_pull storages: the image is pulled here, see crate::image).
        let mut pause = false;
        for (i, s) in req.storages.iter().enumerate().filter(|(_, s)| s.driver == crate::image::DRIVER) {
            let puller = crate::image::Puller::guest().map_err(|e| Error::invalid(format!("container {id}: {e}")))?;
            let pulled = puller.mount(s, i, id).await.map_err(|e| Error::internal(format!("container {id}: {e}")))?;
            info!(self.log, "image pulled and mounted"; "container_id" => id, "image" => &s.source, "rootfs" => &s.mount_point);
            pause |= pulled.pause;
            guard.storages.push(pulled.mounted);
        }
        let others = sandbox::mount_storages_except_pulled(&req.storages)
            .map_err(|e| Error::invalid(format!("container {id}: {e}")))?;
        guard.storages.extend(others);

        let mut oci = convert::spec_from_grpc(oci).map_err(|e| Error::invalid(format!("container {id}: OCI.{e}")))?;
        if pause {
            // As Kata's agent: the sandbox container under guest pull runs the guest's pause.
            if let Some(p) = oci.process_mut().as_mut() {
                p.set_args(Some(vec![crate::image::pause::PAUSE_PATH.to_string()]));
            }
        }
        let cgroup_rel = spec::cgroup_path(&self.sandbox_id(), id);
        let facts = spec::normalize(&mut oci, &cgroup_rel, &join, &Self::path_exists)
            .map_err(|e| Error::invalid(format!("container {id}: {e}")))?;
        for note in &facts.notes {
            info!(self.log, "spec adjusted for the guest"; "container_id" => id, "change" => note);
        }
        for source in &facts.propagated_sources {
            sandbox::make_shared_mount(source).map_err(|e| Error::internal(format!("container {id}: {e}")))?;
        }
        self.apply_net_sysctls(id, &facts.net_sysctls)?;
        for d in &req.devices {
            let what = format!("container {id}: device {:?}", d.id);
            let found = device::PciSysfs::default()
                .wait_block_device(&d.vm_path, device::WAIT, &what)
                .await
                .map_err(|e| Error::new(Code::DEADLINE_EXCEEDED, e))?;
            info!(self.log, "block device found"; "container_id" => id, "device_id" => &d.id, "pci_path" => &d.vm_path,
                  "guest_device" => format!("/dev/{} ({}:{})", found.name, found.major, found.minor), "container_path" => &d.container_path);
            device::add_to_spec(&mut oci, &d.container_path, &found)
                .map_err(|e| Error::invalid(format!("{what}: {e}")))?;
        }
        let rootfs = oci.root().as_ref().map(|r| r.path().clone()).unwrap_or_else(|| PathBuf::from("/"));
        let console = oci.process().as_ref().and_then(console_size);
        let bundle = self.bundle_dir(id);
        let _ = std::fs::remove_dir_all(&bundle);
        guard.bundle = Some(bundle.clone());
        write_json(&bundle.join("config.json"), &oci).map_err(|e| Error::internal(format!("container {id}: {e}")))?;

        let cg = cgroup::Cgroup::new(&self.cgroup_root, &cgroup_rel);
        guard.cgroup = Some(cgroup_rel.clone());
        let bundle_for_op = bundle.clone();
        let init_exec = if req.exec_id.is_empty() { id.to_string() } else { req.exec_id.clone() };
        let spawned = self
            .spawn_process(id, &init_exec, facts.terminal, console, |console_socket| Op::Create {
                bundle: bundle_for_op,
                console_socket,
            })
            .await;
        let init = match spawned {
            Ok(p) => p,
            Err(e) => {
                // The helper may have left libcontainer state or a cgroup behind.
                let _ = self.runtime.call(&self.runtime.request(id, false, Op::Delete), None, HELPER_TIMEOUT).await;
                cg.kill_all();
                let _ = cg.remove();
                return Err(e);
            }
        };
        let container = Arc::new(Container {
            id: id.to_string(),
            rootfs,
            bundle,
            oom_kills: AtomicU64::new(cg.oom_kills().unwrap_or(0)),
            cgroup: cg,
            own_pid_ns: facts.own_pid_ns,
            storages: std::mem::take(&mut guard.storages),
            init,
            execs: Mutex::new(HashMap::new()),
            starting: Mutex::new(HashSet::new()),
            finished: Mutex::new(Default::default()),
            state: Mutex::new(State::Created),
            lifecycle: tokio::sync::RwLock::new(()),
        });
        guard.armed = false;
        info!(self.log, "container created"; "container_id" => id, "pid" => container.init.pid, "cgroup" => container.cgroup.rel.display().to_string());
        self.inner.lock().unwrap().containers.insert(id.to_string(), container);
        self.container_added();
        Ok(())
    }

    /// Writes `net.*` sysctls of a spec to the guest's network namespace (the pod's). Only as
    /// the guest's init: in test mode they would change the host's.
    fn apply_net_sysctls(&self, id: &str, sysctls: &[(String, String)]) -> Result<()> {
        if sysctls.is_empty() {
            return Ok(());
        }
        if nix::unistd::getpid().as_raw() != 1 {
            warn!(self.log, "net sysctls not applied: the agent is not the guest's init (test mode)"; "container_id" => id, "sysctls" => format!("{sysctls:?}"));
            return Ok(());
        }
        for (key, value) in sysctls {
            let file =
                spec::sysctl_file(key).map_err(|e| Error::invalid(format!("container {id}: OCI.Linux.Sysctl: {e}")))?;
            std::fs::write(&file, value).map_err(|e| {
                Error::invalid(format!(
                    "container {id}: OCI.Linux.Sysctl: {key}={value:?} for the pod's network ({}): {e}",
                    file.display()
                ))
            })?;
            info!(self.log, "net sysctl set for the pod"; "container_id" => id, "key" => key, "value" => value);
        }
        Ok(())
    }

    /// StartContainer: runs the created init.
    pub async fn start_container(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let _l = c.lifecycle.write().await;
        if c.state() != State::Created {
            return Err(Error::precondition(format!("container {id} was already started")));
        }
        if c.init.exit_status().is_some() {
            return Err(Error::precondition(format!("container {id}: the init process already exited")));
        }
        self.runtime
            .call(&self.runtime.request(id, false, Op::Start), None, HELPER_TIMEOUT)
            .await
            .map_err(|e| Error::helper(&format!("start container {id}"), e))?;
        c.set_state(State::Running);
        info!(self.log, "container started"; "container_id" => id);
        Ok(())
    }

    /// ExecProcess: runs a new process in the running container (runc exec). Exec into a
    /// paused container is refused (as Kata does).
    pub async fn exec_process(&self, req: &pb::ExecProcessRequest) -> Result<()> {
        let (id, exec_id) = (req.container_id.as_str(), req.exec_id.as_str());
        let c = self.get(id)?;
        if !spec::valid_id(exec_id) || exec_id == id || exec_id == c.init.exec_id {
            return Err(Error::invalid(format!("container {id}: exec_id {exec_id:?} is not a valid new exec id")));
        }
        let what = describe(id, exec_id);
        let process = req.process.as_ref().ok_or_else(|| Error::invalid(format!("{what}: process: missing")))?;
        let _l = c.lifecycle.read().await;
        match c.state() {
            State::Running if c.init.exit_status().is_none() => {}
            State::Paused => return Err(Error::precondition(format!("{what}: container {id} is paused"))),
            State::Created => return Err(Error::precondition(format!("{what}: container {id} is not started"))),
            State::Running => return Err(Error::precondition(format!("{what}: container {id} has stopped"))),
        }
        if c.execs.lock().unwrap().contains_key(exec_id) || !c.starting.lock().unwrap().insert(exec_id.to_string()) {
            return Err(Error::new(Code::ALREADY_EXISTS, format!("{what} already exists")));
        }
        let result = self.start_exec(&c, exec_id, &what, process).await;
        c.starting.lock().unwrap().remove(exec_id);
        result
    }

    async fn start_exec(
        &self,
        c: &Arc<Container>,
        exec_id: &str,
        what: &str,
        process: &agent_protocol::oci::Process,
    ) -> Result<()> {
        let id = c.id.as_str();
        let mut process =
            convert::process_from_grpc(process).map_err(|e| Error::invalid(format!("{what}: Process.{e}")))?;
        let terminal = spec::normalize_process(&mut process, &c.rootfs, "process")
            .map_err(|e| Error::invalid(format!("{what}: {e}")))?;
        let file = c.bundle.join(format!("exec-{}.json", self.next()));
        write_json(&file, &process).map_err(|e| Error::internal(format!("{what}: {e}")))?;
        let console = console_size(&process);
        let op_file = file.clone();
        let spawned = self
            .spawn_process(id, exec_id, terminal, console, |console_socket| Op::Exec {
                bundle: c.bundle.clone(),
                process: op_file,
                console_socket,
            })
            .await;
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_file(super::exec_seccomp::raised_copy(&file));
        let p = spawned?;
        c.finished.lock().unwrap().0.remove(exec_id);
        info!(self.log, "process started"; "container_id" => id, "exec_id" => exec_id, "pid" => p.pid);
        c.execs.lock().unwrap().insert(exec_id.to_string(), p);
        Ok(())
    }

    pub async fn pause_container(&self, id: &str) -> Result<()> {
        self.freeze(id, true).await
    }

    pub async fn resume_container(&self, id: &str) -> Result<()> {
        self.freeze(id, false).await
    }

    async fn freeze(&self, id: &str, pause: bool) -> Result<()> {
        let c = self.get(id)?;
        let _l = c.lifecycle.write().await;
        let (from, to, op, verb) = if pause {
            (State::Running, State::Paused, Op::Pause, "pause")
        } else {
            (State::Paused, State::Running, Op::Resume, "resume")
        };
        if c.state() != from || c.init.exit_status().is_some() {
            let now = if c.init.exit_status().is_some() {
                "stopped".to_string()
            } else {
                format!("{:?}", c.state()).to_lowercase()
            };
            return Err(Error::precondition(format!("cannot {verb} container {id}: it is {now}")));
        }
        self.runtime
            .call(&self.runtime.request(id, false, op), None, HELPER_TIMEOUT)
            .await
            .map_err(|e| Error::helper(&format!("{verb} container {id}"), e))?;
        c.set_state(to);
        info!(self.log, "container {verb}d"; "container_id" => id);
        Ok(())
    }

    /// RemoveContainer: SIGKILLs everything left in the container, waits (up to `timeout`;
    /// zero waits without limit), deletes libcontainer's state, the cgroup (and empty parents),
    /// the bundle and the container's storages. Readers get EOF.
    pub async fn remove_container(&self, id: &str, timeout: Duration) -> Result<()> {
        let c = self.get(id)?;
        let _l = c.lifecycle.write().await;
        if !self.inner.lock().unwrap().containers.get(id).is_some_and(|x| Arc::ptr_eq(x, &c)) {
            return Err(Error::not_found(format!("container {id} not found")));
        }
        let deadline = (!timeout.is_zero()).then(|| Instant::now() + timeout);
        loop {
            c.cgroup.kill_all();
            if c.init.exit_status().is_none() {
                // Not in the cgroup yet if creation stopped early; the pid is ours until reaped.
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.init.pid), Signal::SIGKILL);
            }
            let execs: Vec<_> = c.execs.lock().unwrap().values().cloned().collect();
            let all_exited = c.init.exit_status().is_some() && execs.iter().all(|p| p.exit_status().is_some());
            if all_exited && c.cgroup.procs().is_empty() {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Error::new(
                    Code::DEADLINE_EXCEEDED,
                    format!(
                        "container {id}: processes still running {}s after SIGKILL: {:?}",
                        timeout.as_secs(),
                        c.cgroup.procs()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.queue_oom_event(&c);
        if let Err(e) = self.runtime.call(&self.runtime.request(id, false, Op::Delete), None, HELPER_TIMEOUT).await {
            warn!(self.log, "libcontainer delete failed; removing by hand"; "container_id" => id, "error" => &e.message);
            let _ = std::fs::remove_dir_all(self.runtime.root.join(id));
        }
        let cg = c.cgroup.clone();
        let cgroup_error =
            tokio::task::spawn_blocking(move || cg.remove()).await.unwrap_or_else(|e| Err(e.to_string())).err();
        c.init.shutdown();
        for p in c.execs.lock().unwrap().drain() {
            p.1.shutdown();
        }
        for e in sandbox::unmount_all(&c.storages) {
            warn!(self.log, "RemoveContainer: {e}"; "container_id" => id);
        }
        let _ = std::fs::remove_dir_all(&c.bundle);
        {
            let mut inner = self.inner.lock().unwrap();
            inner.containers.remove(id);
            if inner.containers.is_empty() && inner.creating.is_empty() {
                cgroup::remove_empty_parents(&self.cgroup_root, &c.cgroup.rel);
            }
        }
        if let Some(e) = cgroup_error {
            return Err(Error::internal(format!("container {id} removed, but {e}")));
        }
        info!(self.log, "container removed"; "container_id" => id);
        Ok(())
    }

    // ------------------------------------------------------------------------ processes

    /// SignalProcess. exec_id empty or the container id: the init process (for SIGKILL
    /// without a pid namespace of its own, everything in the container's cgroup too). Signal 0
    /// sends nothing and checks that the process exists, as kill(2) does.
    pub fn signal_process(&self, id: &str, exec_id: &str, signal: u32) -> Result<()> {
        let c = self.get(id)?;
        let what = describe(id, exec_id);
        let sig = match signal {
            0 => None,
            n => Some(
                Signal::try_from(n as i32)
                    .map_err(|_| Error::invalid(format!("{what}: signal {signal} is not a valid signal")))?,
            ),
        };
        let p = match c.lookup(exec_id)? {
            Lookup::Live(p) => p,
            Lookup::Finished(_) => return Err(Error::not_found(format!("{what}: process already finished"))),
        };
        p.signal(&what, sig)?;
        if Arc::ptr_eq(&p, &c.init) && sig == Some(Signal::SIGKILL) && !c.own_pid_ns {
            c.cgroup.kill_all();
        }
        Ok(())
    }

    /// WaitProcess: the exit status (code, or 128 + signal); works after the exit too.
    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<i32> {
        let c = self.get(id)?;
        match c.lookup(exec_id)? {
            Lookup::Finished(status) => Ok(status),
            Lookup::Live(p) => {
                let status = p.wait().await;
                // An OOM-killed process: its event is ready before its status is returned.
                self.queue_oom_event(&c);
                c.collect(&p);
                Ok(status)
            }
        }
    }

    /// ReadStdout / ReadStderr: at least one byte, or empty at the end of the stream.
    pub async fn read_stream(&self, id: &str, exec_id: &str, stderr: bool, len: u32) -> Result<Vec<u8>> {
        let c = self.get(id)?;
        let p = match c.lookup(exec_id)? {
            Lookup::Live(p) => p,
            Lookup::Finished(_) => return Ok(Vec::new()),
        };
        let data = p.read(stderr, len).await;
        if data.is_empty() {
            c.collect(&p);
        }
        Ok(data)
    }

    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<u32> {
        let what = describe(id, exec_id);
        self.live(id, exec_id, &what)?.write_stdin(&what, data).await
    }

    /// CloseStdin; closing the stdin of a finished process is fine.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let what = describe(id, exec_id);
        match self.get(id)?.lookup(exec_id)? {
            Lookup::Live(p) => p.close_stdin(&what).await,
            Lookup::Finished(_) => Ok(()),
        }
    }

    pub fn resize_tty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let what = describe(id, exec_id);
        self.live(id, exec_id, &what)?.resize(&what, rows, cols)
    }

    /// A process still tracked; a finished one is FAILED_PRECONDITION.
    fn live(&self, id: &str, exec_id: &str, what: &str) -> Result<Arc<super::process::Process>> {
        match self.get(id)?.lookup(exec_id)? {
            Lookup::Live(p) => Ok(p),
            Lookup::Finished(_) => Err(Error::precondition(format!("{what}: process already finished"))),
        }
    }
}

/// `process.consoleSize` as (rows, columns).
fn console_size(process: &Process) -> Option<(u32, u32)> {
    let b = process.console_size()?;
    Some((u32::try_from(b.height()).ok()?, u32::try_from(b.width()).ok()?))
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> std::result::Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    }
    let bytes = serde_json::to_vec(value).map_err(|e| format!("encode {}: {e}", path.display()))?;
    std::fs::write(path, bytes).map_err(|e| format!("write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn console_size_is_rows_and_columns() {
        let p = |v| serde_json::from_value::<Process>(v).unwrap();
        let sized = p(json!({"cwd": "/", "user": {"uid": 0, "gid": 0}, "consoleSize": {"height": 24, "width": 80}}));
        assert_eq!(console_size(&sized), Some((24, 80)));
        assert_eq!(console_size(&p(json!({"cwd": "/", "user": {"uid": 0, "gid": 0}}))), None);
    }
}
