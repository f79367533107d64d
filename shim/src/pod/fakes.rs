//! Test doubles for the pod core: a [`FakeHypervisor`] whose "VMM" is a real child process
//! (so a leak is a process that stays), a [`FakeAgent`] that plays the guest's processes, and
//! a [`FakeBackend`] that hands them to the pod and keeps them for the test to inspect. Both
//! fakes can fail any step, block a step until released, or die.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agent_protocol::{agent as pb, types};
use async_trait::async_trait;
use hypervisor::{AgentChannel, Capabilities, Device, DeviceAddress, ExitInfo, Hypervisor, MemoryMiB};
use slog::Logger;
use tokio::sync::{mpsc, watch};

use super::{Event, EventSink};
use crate::agent::{Agent, AgentError, GuestDetails};
use crate::config::Config;
use crate::sandbox::{BootError, VmBackend};

/// What the fakes should do; shared by every VM and agent a [`FakeBackend`] makes.
#[derive(Default)]
pub struct Script {
    /// Hypervisor steps that fail: "prepare", "start", "resize_memory", "add_device".
    pub vm_fails: HashSet<&'static str>,
    /// Hypervisor steps that never finish while the VM lives: "start", "resize_memory".
    pub vm_blocks: HashSet<&'static str>,
    /// Agent RPCs (by their Kata name, e.g. "CreateContainer") that fail.
    pub agent_fails: HashSet<&'static str>,
}

/// A VM whose VMM is `sleep 600`: started by `start`, killed and reaped by `stop`/`cleanup`.
pub struct FakeHypervisor {
    script: Arc<Mutex<Script>>,
    run_dir: PathBuf,
    child: Mutex<Option<std::process::Child>>,
    /// The pid the child had (for the leak check after it was reaped).
    pub vmm_pid: Mutex<Option<u32>>,
    /// Every memory total (MiB) and vCPU count asked for, in order: "mem N", "cpus N".
    pub resizes: Mutex<Vec<String>>,
    stopped: watch::Sender<bool>,
}

impl FakeHypervisor {
    fn new(script: Arc<Mutex<Script>>, run_dir: PathBuf) -> FakeHypervisor {
        FakeHypervisor {
            script,
            run_dir,
            child: Mutex::new(None),
            vmm_pid: Mutex::new(None),
            resizes: Mutex::default(),
            stopped: watch::channel(false).0,
        }
    }

    fn fails(&self, step: &str) -> bool {
        self.script.lock().unwrap().vm_fails.contains(step)
    }

    fn blocks(&self, step: &str) -> bool {
        self.script.lock().unwrap().vm_blocks.contains(step)
    }

    /// Resolves once the VM was stopped.
    async fn until_stopped(&self) {
        let mut rx = self.stopped.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Whether the VM holds anything on the host: a live VMM or its run directory.
    pub fn holds_anything(&self) -> Option<String> {
        if self.child.lock().unwrap().is_some() {
            return Some(format!("VMM pid {:?} still runs", self.vmm_pid.lock().unwrap()));
        }
        if self.run_dir.exists() {
            return Some(format!("run directory {} still exists", self.run_dir.display()));
        }
        None
    }

    /// Whether the VM was started and not yet stopped.
    pub fn running(&self) -> bool {
        self.child.lock().unwrap().is_some()
    }

    /// Kills and reaps the VMM, removes the run directory.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
        self.stopped.send_replace(true);
    }
}

fn vm_error(step: &str) -> hypervisor::Error {
    hypervisor::Error::VmFailed(format!("injected failure of {step}"))
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    async fn prepare(&self) -> hypervisor::Result<()> {
        if self.fails("prepare") {
            return Err(vm_error("prepare"));
        }
        std::fs::create_dir_all(&self.run_dir).map_err(|e| hypervisor::Error::VmFailed(e.to_string()))
    }

    async fn start(&self) -> hypervisor::Result<()> {
        let child = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .map_err(|e| hypervisor::Error::VmFailed(format!("cannot run sleep, the fake VMM: {e}")))?;
        *self.vmm_pid.lock().unwrap() = Some(child.id());
        *self.child.lock().unwrap() = Some(child);
        if self.fails("start") {
            return Err(vm_error("start"));
        }
        if self.blocks("start") {
            self.until_stopped().await;
            return Err(hypervisor::Error::VmFailed("stopped while starting".into()));
        }
        Ok(())
    }

    async fn stop(&self) -> hypervisor::Result<()> {
        self.kill();
        Ok(())
    }

    async fn wait_exit(&self) -> ExitInfo {
        self.until_stopped().await;
        ExitInfo { code: Some(0), signal: None, message: "stopped".into() }
    }

    async fn wait_failure(&self) -> String {
        std::future::pending().await
    }

    async fn pause(&self) -> hypervisor::Result<()> {
        Ok(())
    }

    async fn resume(&self) -> hypervisor::Result<()> {
        Ok(())
    }

    async fn resize_memory(&self, total: MemoryMiB) -> hypervisor::Result<MemoryMiB> {
        self.resizes.lock().unwrap().push(format!("mem {}", total.0));
        if self.fails("resize_memory") {
            return Err(vm_error("resize_memory"));
        }
        if self.blocks("resize_memory") {
            self.until_stopped().await;
            return Err(hypervisor::Error::VmFailed("the VM stopped during the hot-plug".into()));
        }
        Ok(total)
    }

    async fn resize_vcpus(&self, count: u32) -> hypervisor::Result<u32> {
        self.resizes.lock().unwrap().push(format!("cpus {count}"));
        Ok(count)
    }

    async fn add_device(&self, _device: Device) -> hypervisor::Result<DeviceAddress> {
        if self.fails("add_device") {
            return Err(vm_error("add_device"));
        }
        Ok(DeviceAddress { pci_path: "02/00".into() })
    }

    async fn remove_device(&self, _id: &str) -> hypervisor::Result<()> {
        Ok(())
    }

    fn helper_pids(&self) -> hypervisor::HelperPids {
        hypervisor::HelperPids { vmm: *self.vmm_pid.lock().unwrap(), ..Default::default() }
    }

    async fn pids(&self) -> Vec<u32> {
        self.vmm_pid.lock().unwrap().iter().copied().collect()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn agent_channel(&self) -> AgentChannel {
        AgentChannel::Vsock { cid: 3, port: 1024 }
    }

    fn console_tail(&self) -> Vec<String> {
        Vec::new()
    }

    async fn cleanup(&self) -> hypervisor::Result<()> {
        self.kill();
        Ok(())
    }
}

/// How a step the test holds ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Waiting.
    Held,
    /// Let through.
    Pass,
    /// Let through with an error.
    Fail,
}

/// A guest process: its state, watched by the calls that wait on it.
type Proc = Arc<watch::Sender<ProcState>>;

#[derive(Default)]
struct ProcState {
    stdout: VecDeque<Vec<u8>>,
    exit: Option<i32>,
}

/// The guest side: containers and processes, driven by the test.
pub struct FakeAgent {
    script: Arc<Mutex<Script>>,
    /// Its VM, which `DestroySandbox` powers off as the guest does.
    vm: Arc<FakeHypervisor>,
    /// Set when the VM stopped or the test killed the agent: every call fails from then on.
    dead: watch::Receiver<bool>,
    kill_switch: watch::Sender<bool>,
    holds: watch::Sender<HashMap<&'static str, Hold>>,
    procs: Mutex<HashMap<(String, String), Proc>>,
    oom_tx: mpsc::UnboundedSender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    /// Every call by name, in order, with its arguments where they matter.
    pub calls: Mutex<Vec<String>>,
    in_flight: AtomicUsize,
    /// Each chunk of output is handed out after this delay (output that trails the exit).
    pub output_delay: Mutex<Duration>,
    /// What `GetMetrics` answers, and after how long.
    pub metrics_answer: Mutex<(String, Duration)>,
    /// The storages of each CreateContainer: `<container> <driver> <source> <mount point>`.
    pub storages: Mutex<Vec<String>>,
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FakeAgent {
    fn new(
        script: Arc<Mutex<Script>>,
        vm: Arc<FakeHypervisor>,
        holds: watch::Sender<HashMap<&'static str, Hold>>,
    ) -> FakeAgent {
        let (kill_switch, dead) = watch::channel(false);
        // The agent dies with its VM.
        let mut stopped = vm.stopped.subscribe();
        let switch = kill_switch.clone();
        tokio::spawn(async move {
            let _ = stopped.wait_for(|s| *s).await;
            switch.send_replace(true);
        });
        let (oom_tx, oom_rx) = mpsc::unbounded_channel();
        FakeAgent {
            script,
            vm,
            dead,
            kill_switch,
            holds,
            procs: Mutex::new(HashMap::new()),
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
            calls: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            output_delay: Mutex::new(Duration::ZERO),
            metrics_answer: Mutex::default(),
            storages: Mutex::default(),
        }
    }

    /// The agent dies (connection lost): every call, also the blocked ones, fails.
    pub fn die(&self) {
        self.kill_switch.send_replace(true);
    }

    /// Calls under way.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The process `exec_id` (the container id for init) of `cid` writes `data` to stdout.
    pub fn output(&self, cid: &str, exec_id: &str, data: &[u8]) {
        self.proc(cid, exec_id).expect("no such process").send_modify(|s| s.stdout.push_back(data.to_vec()));
    }

    /// The process exits with `code`.
    pub fn exit(&self, cid: &str, exec_id: &str, code: i32) {
        self.proc(cid, exec_id).expect("no such process").send_modify(|s| {
            s.exit.get_or_insert(code);
        });
    }

    /// The guest reports an OOM kill of `cid`.
    pub fn oom(&self, cid: &str) {
        let _ = self.oom_tx.send(cid.to_string());
    }

    /// Whether the calls so far include one starting with `prefix`.
    pub fn called(&self, prefix: &str) -> bool {
        self.calls.lock().unwrap().iter().any(|c| c.starts_with(prefix))
    }

    fn proc(&self, cid: &str, eid: &str) -> Option<Proc> {
        self.procs.lock().unwrap().get(&(cid.to_string(), eid.to_string())).cloned()
    }

    /// Records the call, fails it when the script says so or the agent is dead, waits while
    /// the test holds it.
    async fn enter(&self, rpc: &'static str, detail: String) -> Result<InFlight<'_>, AgentError> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(&self.in_flight);
        self.calls.lock().unwrap().push(if detail.is_empty() { rpc.to_string() } else { format!("{rpc} {detail}") });
        if *self.dead.borrow() {
            return Err(lost(rpc));
        }
        let mut holds = self.holds.subscribe();
        let mut dead = self.dead.clone();
        let released = tokio::select! {
            r = holds.wait_for(|h| h.get(rpc) != Some(&Hold::Held)) => r.map(|h| h.get(rpc).copied()).ok().flatten(),
            _ = dead.wait_for(|d| *d) => return Err(lost(rpc)),
        };
        if released == Some(Hold::Fail) || self.script.lock().unwrap().agent_fails.contains(rpc) {
            return Err(AgentError::Status { rpc, code: ttrpc::Code::INTERNAL, message: "injected failure".into() });
        }
        Ok(guard)
    }

    /// Waits until `f` holds for the process, or the agent dies.
    async fn until<T>(
        &self,
        rpc: &'static str,
        p: &watch::Sender<ProcState>,
        mut f: impl FnMut(&mut ProcState) -> Option<T>,
    ) -> Result<T, AgentError> {
        let mut rx = p.subscribe();
        let mut dead = self.dead.clone();
        loop {
            let mut out = None;
            p.send_if_modified(|s| {
                out = f(s);
                false
            });
            if let Some(v) = out {
                return Ok(v);
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(lost(rpc)) },
                _ = dead.wait_for(|d| *d) => return Err(lost(rpc)),
            }
        }
    }

    fn add_proc(&self, cid: &str, eid: &str) {
        self.procs.lock().unwrap().insert((cid.into(), eid.into()), Arc::new(watch::channel(ProcState::default()).0));
    }
}

fn lost(rpc: &'static str) -> AgentError {
    AgentError::Rpc { rpc, message: "connection lost".into() }
}

fn not_found(rpc: &'static str, what: String) -> AgentError {
    AgentError::Status { rpc, code: ttrpc::Code::NOT_FOUND, message: format!("{what}: not found") }
}

#[async_trait]
impl Agent for FakeAgent {
    async fn check(&self) -> Result<(), AgentError> {
        self.enter("Check", String::new()).await.map(drop)
    }
    async fn version(&self) -> Result<String, AgentError> {
        self.enter("Version", String::new()).await?;
        Ok("fake".into())
    }
    async fn guest_details(&self) -> Result<GuestDetails, AgentError> {
        self.enter("GetGuestDetails", String::new()).await?;
        Ok(GuestDetails { mem_block_size_bytes: 128 << 20, agent_version: "fake".into(), mem_hotplug_probe: false })
    }
    async fn online_cpu_mem(&self, nb_cpus: u32, cpu_only: bool) -> Result<(), AgentError> {
        self.enter("OnlineCPUMem", format!("{nb_cpus} {cpu_only}")).await.map(drop)
    }
    async fn set_guest_time(&self, _now: SystemTime) -> Result<(), AgentError> {
        self.enter("SetGuestDateTime", String::new()).await.map(drop)
    }
    async fn metrics(&self) -> Result<String, AgentError> {
        let _call = self.enter("GetMetrics", String::new()).await?;
        let (text, delay) = self.metrics_answer.lock().unwrap().clone();
        tokio::time::sleep(delay).await;
        Ok(text)
    }
    async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        self.enter("DestroySandbox", String::new()).await?;
        self.vm.kill();
        Ok(())
    }
    async fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> Result<(), AgentError> {
        self.enter("CreateSandbox", req.hostname).await.map(drop)
    }
    async fn create_container(&self, req: pb::CreateContainerRequest) -> Result<(), AgentError> {
        let _call = self.enter("CreateContainer", req.container_id.clone()).await?;
        for st in &req.storages {
            self.storages
                .lock()
                .unwrap()
                .push(format!("{} {} {} {}", req.container_id, st.driver, st.source, st.mount_point));
        }
        self.add_proc(&req.container_id, &req.container_id);
        Ok(())
    }
    async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        self.enter("StartContainer", container_id.into()).await.map(drop)
    }
    async fn remove_container(&self, container_id: &str) -> Result<(), AgentError> {
        let _call = self.enter("RemoveContainer", container_id.into()).await?;
        let mut procs = self.procs.lock().unwrap();
        for ((cid, _), p) in procs.iter() {
            if cid == container_id {
                p.send_modify(|s| {
                    s.exit.get_or_insert(137);
                });
            }
        }
        procs.retain(|(cid, _), _| cid != container_id);
        Ok(())
    }
    async fn exec_process(&self, req: pb::ExecProcessRequest) -> Result<(), AgentError> {
        let _call = self.enter("ExecProcess", format!("{} {}", req.container_id, req.exec_id)).await?;
        self.add_proc(&req.container_id, &req.exec_id);
        Ok(())
    }
    async fn signal_process(&self, container_id: &str, exec_id: &str, signal: u32) -> Result<(), AgentError> {
        let _call = self.enter("SignalProcess", format!("{container_id} {exec_id} {signal}")).await?;
        let p =
            self.proc(container_id, exec_id).ok_or_else(|| not_found("SignalProcess", format!("process {exec_id}")))?;
        if p.borrow().exit.is_some() {
            return Err(not_found("SignalProcess", format!("process {exec_id} (exited)")));
        }
        if signal != 0 {
            p.send_modify(|s| {
                s.exit.get_or_insert(128 + signal as i32);
            });
        }
        Ok(())
    }
    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<i32, AgentError> {
        let _call = self.enter("WaitProcess", format!("{container_id} {exec_id}")).await?;
        let p =
            self.proc(container_id, exec_id).ok_or_else(|| not_found("WaitProcess", format!("process {exec_id}")))?;
        self.until("WaitProcess", &p, |s| s.exit).await
    }
    async fn read_stream(&self, container_id: &str, exec_id: &str, stderr: bool) -> Result<Vec<u8>, AgentError> {
        let _call = self.enter(if stderr { "ReadStderr" } else { "ReadStdout" }, String::new()).await?;
        let Some(p) = self.proc(container_id, exec_id) else { return Ok(Vec::new()) };
        if stderr {
            return self.until("ReadStderr", &p, |s| s.exit.map(|_| Vec::new())).await;
        }
        let chunk = self
            .until("ReadStdout", &p, |s| match s.stdout.pop_front() {
                Some(chunk) => Some(chunk),
                None if s.exit.is_some() => Some(Vec::new()),
                None => None,
            })
            .await?;
        let delay = *self.output_delay.lock().unwrap();
        if !chunk.is_empty() && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(chunk)
    }
    async fn write_stdin(&self, _container_id: &str, _exec_id: &str, data: Vec<u8>) -> Result<u32, AgentError> {
        self.enter("WriteStdin", String::new()).await?;
        Ok(data.len() as u32)
    }
    async fn close_stdin(&self, _container_id: &str, _exec_id: &str) -> Result<(), AgentError> {
        self.enter("CloseStdin", String::new()).await.map(drop)
    }
    async fn tty_win_resize(&self, _: &str, _: &str, _: u32, _: u32) -> Result<(), AgentError> {
        self.enter("TtyWinResize", String::new()).await.map(drop)
    }
    async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        self.enter("PauseContainer", container_id.into()).await.map(drop)
    }
    async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        self.enter("ResumeContainer", container_id.into()).await.map(drop)
    }
    async fn stats_container(&self, container_id: &str) -> Result<pb::StatsContainerResponse, AgentError> {
        self.enter("StatsContainer", container_id.into()).await?;
        Ok(pb::StatsContainerResponse::new())
    }
    async fn update_container(&self, req: pb::UpdateContainerRequest) -> Result<(), AgentError> {
        self.enter("UpdateContainer", req.container_id).await.map(drop)
    }
    async fn get_oom_event(&self) -> Result<String, AgentError> {
        let _call = self.enter("GetOOMEvent", String::new()).await?;
        let mut rx = self.oom_rx.lock().await;
        let mut dead = self.dead.clone();
        tokio::select! {
            id = rx.recv() => id.ok_or_else(|| lost("GetOOMEvent")),
            _ = dead.wait_for(|d| *d) => Err(lost("GetOOMEvent")),
        }
    }
    async fn update_interface(&self, interface: types::Interface) -> Result<types::Interface, AgentError> {
        self.enter("UpdateInterface", String::new()).await?;
        Ok(interface)
    }
    async fn update_routes(&self, routes: Vec<types::Route>) -> Result<Vec<types::Route>, AgentError> {
        self.enter("UpdateRoutes", String::new()).await?;
        Ok(routes)
    }
    async fn add_arp_neighbors(&self, _: Vec<types::ARPNeighbor>) -> Result<(), AgentError> {
        self.enter("AddARPNeighbors", String::new()).await.map(drop)
    }
    async fn list_interfaces(&self) -> Result<Vec<types::Interface>, AgentError> {
        self.enter("ListInterfaces", String::new()).await?;
        Ok(Vec::new())
    }
    async fn list_routes(&self) -> Result<Vec<types::Route>, AgentError> {
        self.enter("ListRoutes", String::new()).await?;
        Ok(Vec::new())
    }
    async fn set_policy(&self, _policy: &str) -> Result<(), AgentError> {
        self.enter("SetPolicy", String::new()).await.map(drop)
    }
    async fn copy_file(&self, req: pb::CopyFileRequest) -> Result<(), AgentError> {
        let data = if req.data.len() <= 64 { String::from_utf8_lossy(&req.data).into_owned() } else { String::new() };
        self.enter("CopyFile", format!("{} {:o} {data}", req.path, req.file_mode)).await.map(drop)
    }
}

/// Makes fake VMs and agents under `dir` and keeps every one for the test.
pub struct FakeBackend {
    /// What the fakes do.
    pub script: Arc<Mutex<Script>>,
    dir: PathBuf,
    holds: watch::Sender<HashMap<&'static str, Hold>>,
    /// Every VM made, in order.
    pub vms: Mutex<Vec<Arc<FakeHypervisor>>>,
    /// Every agent connected, in order.
    pub agents: Mutex<Vec<Arc<FakeAgent>>>,
}

impl FakeBackend {
    /// A backend whose VMs keep their run directories under `dir`.
    pub fn new(dir: &Path) -> FakeBackend {
        FakeBackend {
            script: Arc::default(),
            dir: dir.to_path_buf(),
            holds: watch::channel(HashMap::new()).0,
            vms: Mutex::default(),
            agents: Mutex::default(),
        }
    }

    /// Agent RPC `rpc` waits from now on until [`FakeBackend::release`].
    pub fn hold(&self, rpc: &'static str) {
        self.holds.send_modify(|h| {
            h.insert(rpc, Hold::Held);
        });
    }

    /// Lets the held `rpc` through (`Hold::Pass`) or fails it (`Hold::Fail`).
    pub fn release(&self, rpc: &'static str, how: Hold) {
        self.holds.send_modify(|h| {
            h.insert(rpc, how);
        });
    }

    /// The last agent connected.
    pub fn agent(&self) -> Arc<FakeAgent> {
        self.agents.lock().unwrap().last().cloned().expect("no agent was connected")
    }

    /// The last VM made.
    pub fn vm(&self) -> Arc<FakeHypervisor> {
        self.vms.lock().unwrap().last().cloned().expect("no VM was made")
    }
}

#[async_trait]
impl VmBackend for FakeBackend {
    async fn create_vm(
        &self,
        id: &str,
        _config: &Config,
        _shared_dir: &Path,
        _netns: Option<&Path>,
        _log: &Logger,
    ) -> Result<(Arc<dyn Hypervisor>, Option<hypervisor::GuestNetwork>), BootError> {
        let n = self.vms.lock().unwrap().len();
        let vm = Arc::new(FakeHypervisor::new(self.script.clone(), self.dir.join(format!("vm-{id}-{n}"))));
        self.vms.lock().unwrap().push(vm.clone());
        Ok((vm, None))
    }

    async fn connect_agent(
        &self,
        vm: &dyn Hypervisor,
        _dial_timeout: Duration,
        _log: &Logger,
    ) -> Result<Arc<dyn Agent>, AgentError> {
        let fake = self.vm();
        assert!(
            std::ptr::addr_eq(fake.as_ref() as *const FakeHypervisor, vm as *const dyn Hypervisor),
            "agent of another VM"
        );
        let agent = Arc::new(FakeAgent::new(self.script.clone(), fake, self.holds.clone()));
        self.agents.lock().unwrap().push(agent.clone());
        Ok(agent)
    }
}

/// Records the pod's events; `on_event` runs as each arrives (to see what was true then).
#[derive(Default)]
pub struct RecordingSink {
    /// Every event, in order.
    pub events: Mutex<Vec<Event>>,
    /// Runs on each event before it is recorded.
    #[allow(clippy::type_complexity)]
    pub on_event: Mutex<Option<Box<dyn Fn(&Event) + Send + Sync>>>,
}

impl EventSink for RecordingSink {
    fn publish(&self, event: Event) {
        if let Some(f) = &*self.on_event.lock().unwrap() {
            f(&event);
        }
        self.events.lock().unwrap().push(event);
    }
}
