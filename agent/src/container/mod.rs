//! Containers in the guest: the state the agent keeps per sandbox, container and process, and
//! the RPC logic behind `grpc.AgentService`'s container calls.
//!
//! * [`runtime`] / [`helper`]: libcontainer runs in a re-executed single-threaded helper.
//! * [`reaper`]: the only place that waits for children.
//! * [`process`]: one process (init or exec): stdio buffers, signal, wait.
//! * [`lifecycle`]: create / start / exec / pause / resume / remove.
//! * [`spec`], [`cgroup`]: the guest-local facts applied to the spec (the rule-owner list),
//!   cgroup paths, stats, limits.
//!
//! Layout on the guest's tmpfs (`run_dir`, `/run/podvisor` in the guest): `containers/` is
//! libcontainer's state, `bundles/<id>/config.json` the spec as run, `console/` the
//! console sockets of terminals being set up. Cgroups live at `/podvisor/<sandbox>/<id>`.
//!
//! A pod: CreateSandbox makes the shared IPC/UTS namespaces and `/dev/shm` (see
//! [`crate::sandbox`]); the container whose id is the sandbox id (created first) owns the pod's
//! pid namespace, which the others join when the pod shares it. Containers are created,
//! started, stopped and removed one by one while the pod lives.

pub mod cgroup;
pub mod device;
pub mod exec_seccomp;
pub mod helper;
mod lifecycle;
mod process;
pub mod reaper;
pub mod runtime;
pub mod spec;
pub mod stdio;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::agent as pb;
use slog::{info, warn, Logger};
use ttrpc::Code;

use crate::sandbox::{self, Mounted, SharedNamespaces};
use cgroup::Cgroup;
use process::Process;
use reaper::Reaper;
use runtime::{HelperError, Kind, Runtime};

/// A failed container RPC: a ttrpc code and a message naming the container or exec id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: Code,
    pub message: String,
}

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(Code::NOT_FOUND, m)
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(Code::INVALID_ARGUMENT, m)
    }
    pub fn precondition(m: impl Into<String>) -> Self {
        Self::new(Code::FAILED_PRECONDITION, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(Code::INTERNAL, m)
    }

    /// A helper failure, prefixed with what was being done.
    pub fn helper(what: &str, e: HelperError) -> Self {
        let code = match e.kind {
            Kind::NotFound => Code::NOT_FOUND,
            Kind::AlreadyExists => Code::ALREADY_EXISTS,
            Kind::InvalidArgument => Code::INVALID_ARGUMENT,
            Kind::FailedPrecondition => Code::FAILED_PRECONDITION,
            Kind::Internal => Code::INTERNAL,
        };
        Self::new(code, format!("{what}: {}", e.message))
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code, e.message))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// How long a helper may take (container creation on virtio-fs under TCG can be slow).
const HELPER_TIMEOUT: Duration = Duration::from_secs(120);
/// Finished exec processes remembered per container (exit status for late Wait/Read calls).
const FINISHED_EXECS: usize = 1024;
/// GetOOMEvent scans the containers' OOM counts at most once per this interval (a container
/// at its memory limit can change `memory.events` thousands of times a second).
const OOM_SCAN_GAP: Duration = Duration::from_millis(10);

/// Libcontainer's view of a created container, as far as the agent tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Created,
    Running,
    Paused,
}

/// One container.
pub struct Container {
    id: String,
    rootfs: PathBuf,
    bundle: PathBuf,
    cgroup: Cgroup,
    own_pid_ns: bool,
    storages: Vec<Mounted>,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Exec ids whose process is being started (reserved against a concurrent duplicate).
    starting: Mutex<HashSet<String>>,
    /// exec id → exit status of exec processes that finished and were fully consumed.
    finished: Mutex<(HashMap<String, i32>, VecDeque<String>)>,
    state: Mutex<State>,
    /// Held shared by exec, exclusively by start / pause / resume / remove.
    lifecycle: tokio::sync::RwLock<()>,
    oom_kills: AtomicU64,
}

impl Container {
    fn state(&self) -> State {
        *self.state.lock().unwrap()
    }

    fn set_state(&self, s: State) {
        *self.state.lock().unwrap() = s;
    }

    /// The process of `exec_id`: empty, the container id or the init's exec id name the init
    /// process; an exec process that finished and was fully consumed is `Finished`.
    fn lookup(&self, exec_id: &str) -> Result<Lookup> {
        if exec_id.is_empty() || exec_id == self.id || exec_id == self.init.exec_id {
            return Ok(Lookup::Live(self.init.clone()));
        }
        // `collect` moves an entry to `finished` while holding the `execs` lock.
        let execs = self.execs.lock().unwrap();
        if let Some(p) = execs.get(exec_id) {
            return Ok(Lookup::Live(p.clone()));
        }
        if let Some(status) = self.finished.lock().unwrap().0.get(exec_id) {
            return Ok(Lookup::Finished(*status));
        }
        Err(Error::not_found(format!("container {}: no process with exec id {exec_id}", self.id)))
    }

    /// Forgets an exec process once it exited, was waited for and both streams reached EOF
    /// (its status stays available for late calls).
    fn collect(&self, p: &Arc<Process>) {
        if Arc::ptr_eq(p, &self.init) {
            return;
        }
        let Some(status) = p.consumed() else { return };
        let mut execs = self.execs.lock().unwrap();
        if !execs.get(&p.exec_id).is_some_and(|cur| Arc::ptr_eq(cur, p)) {
            return;
        }
        // Recorded as finished before it leaves `execs`: a concurrent lookup always finds one.
        {
            let mut f = self.finished.lock().unwrap();
            f.0.insert(p.exec_id.clone(), status);
            f.1.retain(|id| id != &p.exec_id);
            f.1.push_back(p.exec_id.clone());
            while f.1.len() > FINISHED_EXECS {
                if let Some(old) = f.1.pop_front() {
                    f.0.remove(&old);
                }
            }
        }
        execs.remove(&p.exec_id);
        drop(execs);
        p.shutdown();
    }
}

/// A process found by exec id.
enum Lookup {
    Live(Arc<Process>),
    /// Exited, waited for, output drained: only its status is kept.
    Finished(i32),
}

struct SandboxState {
    id: String,
    storages: Vec<Mounted>,
    /// The pod's IPC and UTS namespaces.
    shared_ns: SharedNamespaces,
    /// CreateSandbox's `sandbox_pidns`: every container joins the sandbox container's pid ns.
    pidns: bool,
}

#[derive(Default)]
struct Inner {
    sandbox: Option<SandboxState>,
    containers: HashMap<String, Arc<Container>>,
    /// Ids being created (an entry reserves the id and keeps the cgroup parents alive).
    creating: HashSet<String>,
    /// OOM kills seen when a container was removed, not yet returned by GetOOMEvent.
    pending_oom: VecDeque<String>,
}

/// Every container of the sandbox.
pub struct Containers {
    log: Logger,
    runtime: Runtime,
    reaper: Arc<Reaper>,
    run_dir: PathBuf,
    cgroup_root: PathBuf,
    inner: Mutex<Inner>,
    counter: AtomicU64,
    /// Wakes GetOOMEvent when an OOM kill was queued in `pending_oom`.
    oom_queued: tokio::sync::Notify,
    /// Wakes GetOOMEvent when a container was added (its `memory.events` is to be watched).
    containers_added: tokio::sync::Notify,
    /// Set by DestroySandbox: GetOOMEvent stops waiting, so that the ttrpc server's graceful
    /// shutdown does not wait for it before the guest powers off.
    destroyed: AtomicBool,
}

impl Containers {
    /// `run_dir`: the agent's tmpfs directory (`/run/podvisor` in the guest). `debug`: the
    /// helpers log libcontainer's debug messages too.
    pub fn new(log: Logger, reaper: Arc<Reaper>, run_dir: PathBuf, debug: bool) -> Self {
        let runtime = Runtime::new(run_dir.join("containers"), reaper.clone(), log.clone(), debug);
        Self {
            log,
            runtime,
            reaper,
            run_dir,
            cgroup_root: PathBuf::from(cgroup::CGROUP_ROOT),
            inner: Mutex::new(Inner::default()),
            counter: AtomicU64::new(0),
            oom_queued: tokio::sync::Notify::new(),
            containers_added: tokio::sync::Notify::new(),
            destroyed: AtomicBool::new(false),
        }
    }

    fn next(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    fn get(&self, id: &str) -> Result<Arc<Container>> {
        self.inner
            .lock()
            .unwrap()
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("container {id} not found")))
    }

    fn sandbox_id(&self) -> String {
        self.inner.lock().unwrap().sandbox.as_ref().map(|s| s.id.clone()).unwrap_or_default()
    }

    // ---------------------------------------------------------------------------- sandbox

    /// CreateSandbox: storages, the pod's `/dev/shm` and its shared IPC and UTS namespaces
    /// (with the hostname). All or nothing; a second call fails with ALREADY_EXISTS.
    pub fn create_sandbox(&self, req: &pb::CreateSandboxRequest) -> Result<()> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(s) = &inner.sandbox {
            return Err(Error::new(Code::ALREADY_EXISTS, format!("sandbox {} already exists", s.id)));
        }
        if !req.sandbox_id.is_empty() && !spec::valid_id(&req.sandbox_id) {
            return Err(Error::invalid(format!("sandbox_id: {:?} is not a valid id", req.sandbox_id)));
        }
        let mut storages = req.storages.clone();
        let own_shm = !sandbox::has_shm_storage(&storages);
        if own_shm {
            storages.push(sandbox::default_shm_storage());
        }
        let mounted = sandbox::mount_storages(&storages).map_err(|e| {
            if e.contains(": mount ") {
                Error::internal(format!("CreateSandbox: {e}"))
            } else {
                Error::invalid(format!("CreateSandbox: {e}"))
            }
        })?;
        let undo = |mounted: &[Mounted]| {
            sandbox::unmount_all(mounted);
            sandbox::remove_empty_dirs(Path::new(sandbox::SANDBOX_SHM), Path::new("/run"));
        };
        let shared_ns = match sandbox::create_shared_namespaces(Path::new(sandbox::SHARED_NS_DIR), &req.hostname) {
            Ok(ns) => ns,
            Err(e) => {
                undo(&mounted);
                return Err(Error::internal(format!("CreateSandbox: the pod's IPC and UTS namespaces: {e}")));
            }
        };
        // The guest's own hostname too (console, containers without a UTS entry) — only as the
        // guest's init: in test mode this would rename the host.
        if nix::unistd::getpid().as_raw() == 1 {
            if let Err(e) = sandbox::set_hostname(&req.hostname) {
                sandbox::remove_shared_namespaces(&shared_ns);
                undo(&mounted);
                return Err(Error::internal(format!("CreateSandbox: {e}")));
            }
        }
        info!(self.log, "sandbox created"; "sandbox_id" => &req.sandbox_id, "hostname" => &req.hostname, "storages" => mounted.len(),
              "shm" => if own_shm { "tmpfs made by the agent" } else { "storage from the host" },
              "shared_namespaces" => sandbox::SHARED_NS_DIR, "sandbox_pidns" => req.sandbox_pidns);
        inner.sandbox =
            Some(SandboxState { id: req.sandbox_id.clone(), storages: mounted, shared_ns, pidns: req.sandbox_pidns });
        Ok(())
    }

    /// The namespaces container `id` joins: the pod's IPC and UTS namespaces, and the sandbox
    /// container's pid namespace when the pod shares one (`sandbox_pidns` of this request or of
    /// CreateSandbox) and that container exists and is not `id` itself.
    fn join_for(&self, id: &str, sandbox_pidns: bool) -> Result<spec::Join> {
        let inner = self.inner.lock().unwrap();
        let Some(sb) = &inner.sandbox else {
            if sandbox_pidns {
                warn!(self.log, "sandbox_pidns without CreateSandbox: the container gets its own pid namespace"; "container_id" => id);
            }
            return Ok(spec::Join::default());
        };
        let mut join =
            spec::Join { ipc: Some(sb.shared_ns.ipc.clone()), uts: Some(sb.shared_ns.uts.clone()), pid: None };
        if (sandbox_pidns || sb.pidns) && sb.id != id {
            match inner.containers.get(&sb.id) {
                Some(c) if c.init.exit_status().is_some() => {
                    return Err(Error::precondition(format!(
                        "container {id}: the pod shares its pid namespace, but the sandbox container {} has stopped",
                        sb.id
                    )))
                }
                Some(c) => join.pid = Some(PathBuf::from(format!("/proc/{}/ns/pid", c.init.pid))),
                None => {
                    warn!(self.log, "sandbox_pidns, but no sandbox container yet: the container gets its own pid namespace";
                          "container_id" => id, "sandbox_id" => &sb.id);
                }
            }
        }
        Ok(join)
    }

    /// DestroySandbox: removes every container (SIGKILL, wait, delete), the shared namespaces,
    /// unmounts the storages (the pod's `/dev/shm` included) and removes the cgroup parents.
    /// Errors are logged, never stop the teardown.
    pub async fn destroy_sandbox(&self) {
        self.destroyed.store(true, Ordering::Relaxed);
        self.oom_queued.notify_waiters();
        let ids: Vec<String> = self.inner.lock().unwrap().containers.keys().cloned().collect();
        let removals = ids.iter().map(|id| self.remove_container(id, Duration::from_secs(5)));
        for (id, r) in ids.iter().zip(futures::future::join_all(removals).await) {
            if let Err(e) = r {
                warn!(self.log, "DestroySandbox: removing a container failed"; "container_id" => id, "error" => &e.message);
            }
        }
        let sandbox = self.inner.lock().unwrap().sandbox.take();
        if let Some(s) = sandbox {
            for e in sandbox::remove_shared_namespaces(&s.shared_ns) {
                warn!(self.log, "DestroySandbox: {e}");
            }
            for e in sandbox::unmount_all(&s.storages).into_iter().chain(sandbox::remove_pod_ephemeral()) {
                warn!(self.log, "DestroySandbox: {e}");
            }
            sandbox::remove_empty_dirs(Path::new(sandbox::SANDBOX_SHM), Path::new("/run"));
            let parent = spec::cgroup_path(&s.id, "x");
            cgroup::remove_empty_parents(&self.cgroup_root, &parent);
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
        info!(self.log, "sandbox destroyed"; "containers" => ids.len());
    }

    // ---------------------------------------------------------------------------- queries

    /// StatsContainer.
    pub fn stats(&self, id: &str) -> Result<pb::StatsContainerResponse> {
        let c = self.get(id)?;
        Ok(pb::StatsContainerResponse { cgroup_stats: Some(c.cgroup.stats()).into(), ..Default::default() })
    }

    /// The processes of a container's cgroup as `ps` would list them (`json` or `table`).
    /// (Kata's current agent.proto has no ListProcesses RPC; kept for when it is wired.)
    #[allow(dead_code)]
    pub fn list_processes(&self, id: &str, format: &str) -> Result<Vec<u8>> {
        let c = self.get(id)?;
        cgroup::format_processes(&c.cgroup.procs(), format, &cgroup::comm)
            .map_err(|e| Error::invalid(format!("ListProcesses for container {id}: {e}")))
    }

    /// UpdateContainer: memory / CPU / pids (and other cgroup v2) limits.
    pub fn update(&self, id: &str, resources: &agent_protocol::oci::LinuxResources) -> Result<()> {
        let c = self.get(id)?;
        let wrapper = agent_protocol::oci::Spec {
            Linux: Some(agent_protocol::oci::Linux { Resources: Some(resources.clone()).into(), ..Default::default() })
                .into(),
            ..Default::default()
        };
        let spec = agent_protocol::convert::spec_from_grpc(&wrapper).map_err(|e| {
            Error::invalid(format!(
                "UpdateContainer {id}: resources.{}",
                e.to_string().trim_start_matches("Linux.Resources.")
            ))
        })?;
        let res = spec.linux().as_ref().and_then(|l| l.resources().clone()).unwrap_or_default();
        c.cgroup.update(&res).map_err(|e| Error::internal(format!("UpdateContainer {id}: {e}")))?;
        info!(self.log, "container resources updated"; "container_id" => id);
        Ok(())
    }

    /// GetOOMEvent: waits until a container's `memory.events` `oom_kill` count grows and
    /// returns that container's id. Counts are checked as soon as a process of a container is
    /// waited for (WaitProcess) and before a container is removed, so the event of an OOM-killed
    /// init is ready when its exit status is; otherwise whenever a container's `memory.events`
    /// changes (inotify, no polling; at most one scan per [`OOM_SCAN_GAP`]).
    /// After DestroySandbox, what is still queued is returned, then UNAVAILABLE.
    pub async fn next_oom(&self) -> Result<String> {
        let watch = cgroup::EventsWatch::new()
            .map_err(|e| Error::internal(format!("GetOOMEvent: cannot watch memory.events (inotify): {e}")))?;
        let mut last_scan: Option<tokio::time::Instant> = None;
        loop {
            let queued = self.oom_queued.notified();
            let added = self.containers_added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            if let Some(id) = self.inner.lock().unwrap().pending_oom.pop_front() {
                return Ok(id);
            }
            if self.destroyed.load(Ordering::Relaxed) {
                return Err(Error::new(Code::UNAVAILABLE, "GetOOMEvent: the sandbox was destroyed"));
            }
            if let Some(at) = last_scan {
                tokio::time::sleep_until(at + OOM_SCAN_GAP).await;
            }
            last_scan = Some(tokio::time::Instant::now());
            let containers: Vec<Arc<Container>> = self.inner.lock().unwrap().containers.values().cloned().collect();
            // Watch first, then read: a change between the two still wakes the next wait.
            for c in &containers {
                if let Err(e) = watch.add(&c.cgroup) {
                    warn!(self.log, "GetOOMEvent: cannot watch memory.events"; "container_id" => &c.id, "error" => %e);
                }
            }
            for c in containers {
                if self.oom_grew(&c) {
                    return Ok(c.id.clone());
                }
            }
            tokio::select! {
                _ = queued => {}
                _ = added => {}
                r = watch.changed() => {
                    if let Err(e) = r {
                        return Err(Error::internal(format!("GetOOMEvent: waiting for memory.events: {e}")));
                    }
                }
            }
        }
    }

    /// A container was added: a waiting GetOOMEvent watches its `memory.events` too.
    pub(super) fn container_added(&self) {
        self.containers_added.notify_waiters();
    }

    /// Whether the container's OOM kill count grew since last seen (then logged).
    fn oom_grew(&self, c: &Container) -> bool {
        let Some(n) = c.cgroup.oom_kills() else { return false };
        let grew = n > c.oom_kills.swap(n, Ordering::Relaxed);
        if grew {
            info!(self.log, "OOM kill in container"; "container_id" => &c.id, "oom_kill" => n);
        }
        grew
    }

    /// Queues an OOM event for GetOOMEvent if the container's count grew (a process of it
    /// exited, or it is being removed).
    fn queue_oom_event(&self, c: &Container) {
        if !self.oom_grew(c) {
            return;
        }
        {
            let mut inner = self.inner.lock().unwrap();
            inner.pending_oom.push_back(c.id.clone());
            while inner.pending_oom.len() > FINISHED_EXECS {
                inner.pending_oom.pop_front();
            }
        }
        self.oom_queued.notify_one();
    }

    fn bundle_dir(&self, id: &str) -> PathBuf {
        self.run_dir.join("bundles").join(id)
    }

    fn console_dir(&self) -> PathBuf {
        self.run_dir.join("console")
    }

    fn path_exists(p: &Path) -> bool {
        p.exists()
    }
}
