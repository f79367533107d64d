//! The QEMU driver: one value per VM. It owns the run directory
//! (`<run_root>/<sandbox id>/`: `qmp.sock`, and for hybrid vsock `vhost.sock` and `hvsock`), the
//! QEMU process and the vhost-device-vsock daemon, and it watches QMP for a guest that stops.
//! With a pod network, QEMU runs in the pod netns with the taps, which are torn down once QEMU
//! is gone.

pub mod cmdline;
mod hotplug;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use slog::{info, warn, Logger};
use tokio::sync::{watch, Mutex};

use crate::config::QemuConfig;
use crate::host::{self, AccelChoice, HostFacts};
use crate::network::PodNetwork;
use crate::process::{describe_status, wait_for_path, ChildProcess, Tail};
use crate::qmp::Qmp;
use crate::{
    io_err, AgentChannel, Capabilities, Device, DeviceAddress, Error, ExitInfo, Hypervisor, MemoryMiB, Result,
};
use cmdline::{NicDevice, VmSpec, VsockDevice};

/// Default parent of the per-VM run directories.
pub const DEFAULT_RUN_ROOT: &str = "/run/kata-containers/vm";

/// The agent's vsock port (Kata's).
pub const AGENT_PORT: u32 = 1024;

/// Longest unix socket path (sun_path is 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How long helpers may take to create their sockets.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// The fd number of the vhost-vsock fd in QEMU.
const VHOST_VSOCK_FD: RawFd = 3;

/// The fd number of the first tap in QEMU (`tap<N>_kata` gets `TAP_FD_BASE + N`).
pub const TAP_FD_BASE: RawFd = 4;

/// Most guest NICs per VM.
pub const MAX_NICS: usize = 16;

/// Where the VM is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
enum VmState {
    NotStarted,
    Running,
    Paused,
    /// The guest stopped on its own (internal error, panic) or a helper died; QEMU may live on.
    Failed(String),
    /// QEMU is gone.
    Exited(ExitInfo),
}

/// The VM's helper processes and QMP session: handles only, behind a plain mutex that is held
/// just to copy or replace them and never across an await, so that fast reads (`pids`, the QMP
/// handle for pause/resume/hot-plug) never wait for slow work.
#[derive(Default, Clone)]
struct Procs {
    qemu: Option<Arc<ChildProcess>>,
    vsockd: Option<Arc<ChildProcess>>,
    virtiofsd: Option<Arc<ChildProcess>>,
    qmp: Option<Arc<Qmp>>,
    vhost_fd: Option<Arc<OwnedFd>>,
}

/// Start/stop bookkeeping. Its lock serializes start and stop (both slow); nothing else takes it.
#[derive(Default)]
struct Lifecycle {
    stopping: bool,
}

/// A QEMU virtual machine.
pub struct Qemu {
    id: String,
    config: QemuConfig,
    run_dir: PathBuf,
    log: Logger,
    facts: HostFacts,
    channel: AgentChannel,
    console: Tail,
    /// Host directory shared with the guest over virtio-fs, if any.
    shared_dir: Option<PathBuf>,
    /// The pod network: QEMU runs in its netns with its taps.
    network: Option<Arc<PodNetwork>>,
    /// Guest CID on the kernel vsock path (0 until started).
    vsock_cid: AtomicU32,
    state: watch::Sender<VmState>,
    /// The monitor task runs (it publishes QEMU's exit).
    monitored: AtomicBool,
    /// Set by `stop`: a start in progress gives up instead of booting on.
    stop_requested: watch::Sender<bool>,
    procs: std::sync::Mutex<Procs>,
    lifecycle: Mutex<Lifecycle>,
    /// What has been hot-plugged; its lock makes hot-plugs (which wait for the guest for up to
    /// seconds) one at a time. Only hot-plug calls take it.
    hotplug: Mutex<hotplug::State>,
}

impl Qemu {
    /// A VM for sandbox `id` with its run directory under [`DEFAULT_RUN_ROOT`].
    pub fn new(id: &str, config: QemuConfig, log: Logger) -> Qemu {
        Self::with_run_root(id, config, log, Path::new(DEFAULT_RUN_ROOT))
    }

    /// As [`Qemu::new`] with another parent directory for the run directory.
    pub fn with_run_root(id: &str, config: QemuConfig, log: Logger, run_root: &Path) -> Qemu {
        let facts = HostFacts::probe();
        let run_dir = run_root.join(id);
        let channel = if facts.vhost_vsock {
            // The CID is chosen at start; 0 until then.
            AgentChannel::Vsock { cid: 0, port: AGENT_PORT }
        } else {
            AgentChannel::HybridVsock { uds: run_dir.join("hvsock"), port: AGENT_PORT }
        };
        let log = log.new(slog::o!("subsystem" => "qemu", "sandbox" => id.to_string()));
        Qemu {
            id: id.to_string(),
            config,
            run_dir,
            log,
            facts,
            channel,
            console: Tail::default(),
            shared_dir: None,
            network: None,
            vsock_cid: AtomicU32::new(0),
            state: watch::channel(VmState::NotStarted).0,
            monitored: AtomicBool::new(false),
            stop_requested: watch::channel(false).0,
            procs: std::sync::Mutex::new(Procs::default()),
            lifecycle: Mutex::new(Lifecycle::default()),
            hotplug: Mutex::new(hotplug::State::default()),
        }
    }

    /// Shares `dir` with the guest over virtio-fs (tag `kataShared`), served by one virtiofsd
    /// started with the VM (`virtio_fs_daemon`, `virtio_fs_cache`, `virtio_fs_extra_args`).
    /// Mounts made below `dir` after the start reach the guest only if `dir` is a shared mount.
    pub fn with_shared_dir(mut self, dir: impl Into<PathBuf>) -> Qemu {
        self.shared_dir = Some(dir.into());
        self
    }

    /// Runs QEMU inside the pod's network namespace with one virtio-net NIC per tap of `network`
    /// (the veth's MAC, `vhost=on` only when `/dev/vhost-net` exists). The VM owns it from now
    /// on: its taps and tc filters are torn down once QEMU is gone, on every path (stop,
    /// cleanup, failed start, QEMU killed).
    pub fn with_network(mut self, network: PodNetwork) -> Qemu {
        self.network = Some(Arc::new(network));
        self
    }

    /// The per-VM run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The QEMU pid, once started.
    pub async fn qemu_pid(&self) -> Option<u32> {
        self.procs().qemu.as_ref().map(|q| q.pid())
    }

    /// The QMP session, once started (for tests and diagnostics).
    pub async fn qmp(&self) -> Result<Arc<Qmp>> {
        self.procs().qmp.clone().ok_or_else(|| Error::InvalidRequest("the VM is not running".into()))
    }

    /// The process handles (never held across an await).
    fn procs(&self) -> std::sync::MutexGuard<'_, Procs> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes what a start has launched so far visible to `pids`, `stop` and the hot-plugs.
    fn publish(&self, staged: &Procs) {
        *self.procs() = staged.clone();
    }

    fn spec(&self, accel: AccelChoice, vsock: VsockDevice) -> VmSpec {
        VmSpec::from_config(&self.id, &self.config, accel, vsock, self.run_dir.join("qmp.sock"))
    }

    fn check_files(&self) -> Result<()> {
        for (key, path) in [("kernel", &self.config.kernel), ("initrd", &self.config.initrd)] {
            if !path.is_file() {
                return Err(Error::Host(format!(
                    "guest {key} {} does not exist; build it with `make guest-image` (and `make install`) \
                     or fix `{key}` in [hypervisor.qemu]",
                    path.display()
                )));
            }
        }
        if host::find_program(&self.config.path).is_none() {
            return Err(Error::Host(format!(
                "QEMU binary {} not found or not executable; install qemu-system-x86 or fix `path` in [hypervisor.qemu]",
                self.config.path.display()
            )));
        }
        for name in ["qmp.sock", "vhost.sock", "hvsock_1025"] {
            let p = self.run_dir.join(name);
            if p.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(Error::Host(format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter sandbox id or run root",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    /// Boots the VM, recording each process in `inner` as soon as it exists (the caller
    /// publishes and, on failure, stops them).
    async fn start_inner(&self, inner: &mut Procs) -> Result<()> {
        // KVM is "usable" only once a vCPU has run guest code: where the cheap facts allow KVM,
        // run the probe (about a millisecond; bounded) and read KVM_CAP_MAX_VCPUS.
        let mut facts = self.facts.clone();
        if self.config.accelerator != crate::config::Accelerator::Tcg && facts.kvm_usable().is_ok() {
            let probe = tokio::task::spawn_blocking(|| crate::kvm_probe::probe(KVM_PROBE_TIMEOUT))
                .await
                .map_err(|e| Error::Host(format!("the KVM probe thread failed: {e}")))?;
            facts.kvm_probe = Some(probe.result.clone());
            facts.kvm_max_vcpus = probe.max_vcpus;
            info!(self.log, "KVM probe: {}", host::describe_probe(&probe));
        }
        let accel = AccelChoice::choose(self.config.accelerator, &facts).map_err(Error::Host)?;
        match &accel {
            AccelChoice::Kvm => info!(self.log, "using KVM"),
            AccelChoice::Tcg { reason } => {
                info!(self.log, "using TCG (software emulation) because {}", reason; "accelerator" => "tcg")
            }
        }
        let vsock = if self.facts.vhost_vsock {
            let (fd, cid) = open_vhost_vsock()?;
            inner.vhost_fd = Some(Arc::new(fd));
            self.vsock_cid.store(cid, Ordering::Relaxed);
            info!(self.log, "agent channel: vhost-vsock"; "cid" => cid);
            VsockDevice::Kernel { cid, vhostfd: Some(VHOST_VSOCK_FD) }
        } else {
            let daemon = host::find_program(&self.config.vhost_user_vsock_daemon).ok_or_else(|| {
                Error::Host(format!(
                    "no /dev/vhost-vsock and vhost_user_vsock_daemon {:?} was not found; install it with \
                     `cargo install --locked vhost-device-vsock` or set the path in [hypervisor.qemu]",
                    self.config.vhost_user_vsock_daemon
                ))
            })?;
            let socket = self.run_dir.join("vhost.sock");
            let AgentChannel::HybridVsock { uds, .. } = &self.channel else { unreachable!() };
            let mut cmd = tokio::process::Command::new(&daemon);
            cmd.arg("--guest-cid").arg("3").arg("--socket").arg(&socket).arg("--uds-path").arg(uds);
            cmd.stdout(std::process::Stdio::null());
            let (child, _) = ChildProcess::spawn(
                "vhost-device-vsock",
                cmd,
                &daemon,
                "install it with `cargo install --locked vhost-device-vsock`",
                &self.log,
                "vsockdPid",
            )?;
            self.record_pid("vhost-device-vsock", child.pid());
            let child = Arc::new(child);
            inner.vsockd = Some(child.clone());
            self.publish(inner);
            wait_for_path(&socket, &child, SOCKET_WAIT).await?;
            info!(self.log, "agent channel: hybrid vsock"; "uds" => %uds.display());
            VsockDevice::VhostUser { socket }
        };
        let mut spec = self.spec(accel, vsock);
        let (max_vcpus, clamped) = host::clamp_max_vcpus(spec.max_vcpus, &spec.accel, facts.kvm_max_vcpus);
        if let Some(why) = clamped {
            warn!(self.log, "{}", why);
            spec.max_vcpus = max_vcpus.max(spec.vcpus);
        }
        if let Some(dir) = &self.shared_dir {
            spec.virtio_fs = Some(self.start_virtiofsd(inner, dir).await?);
        }
        // Fds QEMU inherits: (our fd, its number in QEMU).
        let mut fds: Vec<(RawFd, RawFd)> = Vec::new();
        if let Some(fd) = &inner.vhost_fd {
            fds.push((fd.as_raw_fd(), VHOST_VSOCK_FD));
        }
        let mut netns = None;
        if let Some(net) = &self.network {
            let taps = net.taps();
            if taps.len() > MAX_NICS {
                return Err(Error::InvalidRequest(format!(
                    "the pod has {} interfaces; at most {MAX_NICS} are supported",
                    taps.len()
                )));
            }
            let vhost = Path::new("/dev/vhost-net").exists();
            for (i, (fd, mac)) in taps.into_iter().enumerate() {
                let number = TAP_FD_BASE + i as RawFd;
                fds.push((fd, number));
                spec.nics.push(NicDevice { fd: number, mac, vhost });
            }
            netns = Some(net.netns_fd());
            info!(self.log, "pod network"; "netns" => %net.netns_path().display(), "nics" => spec.nics.len(), "vhost_net" => vhost);
        }
        // No hot-plug runs before the VM is Running, so this lock is free.
        *self.hotplug.lock().await = hotplug::State::new(&spec);
        let mut cmd = tokio::process::Command::new(&self.config.path);
        cmd.args(spec.args()).stdout(std::process::Stdio::piped());
        if !fds.is_empty() || netns.is_some() {
            // SAFETY: child_setup makes only async-signal-safe calls (setns, fcntl, dup2) and
            // does not allocate; it runs in the child between fork and exec.
            unsafe {
                cmd.pre_exec(move || child_setup(netns, &fds));
            }
        }
        info!(self.log, "launching QEMU"; "path" => %self.config.path.display(), "args" => spec.args().join(" "));
        let (qemu, stdout) = ChildProcess::spawn(
            "QEMU",
            cmd,
            &self.config.path,
            "install qemu-system-x86 or fix `path` in [hypervisor.qemu]",
            &self.log,
            "qemuPid",
        )?;
        self.record_pid("qemu", qemu.pid());
        let qemu = Arc::new(qemu);
        inner.qemu = Some(qemu.clone());
        if let Some(out) = stdout {
            crate::console::spawn_console_reader(
                out,
                self.console.clone(),
                self.log.new(slog::o!("source" => "console")),
            );
        }
        let qmp_path = self.run_dir.join("qmp.sock");
        self.publish(inner);
        wait_for_path(&qmp_path, &qemu, SOCKET_WAIT).await?;
        // QEMU binds the socket before it listens: a refused connection right after the file
        // appears is retried (a loaded host widens that window) until QEMU answers or dies.
        let connect = async {
            let deadline = tokio::time::Instant::now() + SOCKET_WAIT;
            loop {
                match Qmp::connect(&qmp_path, Duration::from_secs(10)).await {
                    Err(crate::qmp::QmpError::Disconnected(m))
                        if tokio::time::Instant::now() < deadline && m.contains("connect ") =>
                    {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    r => return r,
                }
            }
        };
        let qmp = tokio::select! {
            r = connect => Arc::new(r?),
            s = qemu.wait() => return Err(qemu.died_early(s)),
        };
        inner.qmp = Some(qmp.clone());
        self.publish(inner);
        let status = qmp.execute("query-status", None).await?;
        if status["running"] != serde_json::Value::Bool(true) {
            return Err(Error::VmFailed(format!("QEMU reports status {} right after start", status["status"])));
        }
        info!(self.log, "VM started"; "qemuPid" => qemu.pid(), "qemu_version" => &qmp.version);
        self.state.send_replace(VmState::Running);
        // A dead virtiofsd or vsock daemon leaves QEMU running without the device (the guest
        // blocks on it): a failure of the VM. On a normal stop QEMU exits first.
        for mut helper in inner.virtiofsd.iter().chain(inner.vsockd.iter()).map(|h| h.exit_watch()) {
            let (state, qemu, log) = (self.state.clone(), qemu.clone(), self.log.clone());
            tokio::spawn(async move {
                let status = helper.wait().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                if qemu.exited().is_none() && !matches!(*state.borrow(), VmState::Exited(_)) {
                    let why = format!("{} (pid {}) exited: {}", helper.name, helper.pid, describe_status(status));
                    warn!(log, "a VM helper died"; "helper" => helper.name, "pid" => helper.pid, "status" => describe_status(status));
                    state.send_replace(VmState::Failed(format!("{why}; the VM cannot work without it")));
                }
            });
        }
        self.spawn_monitor(qemu, qmp);
        Ok(())
    }

    /// Starts virtiofsd for `dir` and waits for its vhost-user socket.
    async fn start_virtiofsd(&self, inner: &mut Procs, dir: &Path) -> Result<PathBuf> {
        let daemon = host::find_program(&self.config.virtio_fs_daemon).ok_or_else(|| {
            Error::Host(format!(
                "virtio_fs_daemon {} not found or not executable; install it with \
                 `cargo install --locked --root /usr/local virtiofsd` or fix virtio_fs_daemon in [hypervisor.qemu]",
                self.config.virtio_fs_daemon.display()
            ))
        })?;
        let socket = self.run_dir.join("vfs.sock");
        let mut cmd = tokio::process::Command::new(&daemon);
        cmd.arg("--socket-path").arg(&socket).arg("--shared-dir").arg(dir);
        cmd.arg("--cache").arg(&self.config.virtio_fs_cache);
        // Mounts below a shared directory (a hostPath with a tmpfs in it, a propagated mount)
        // are separate mounts in the guest too: they keep their own read-only flag, and
        // inode numbers of two file systems never collide.
        if !self.config.virtio_fs_extra_args.iter().any(|a| a == "--announce-submounts") {
            cmd.arg("--announce-submounts");
        }
        // Its own log lines go to the journal as identifier `virtiofsd` (when there is one);
        // stderr is relayed into our log as well.
        cmd.arg("--syslog");
        cmd.args(&self.config.virtio_fs_extra_args);
        cmd.stdout(std::process::Stdio::null());
        let (child, _) = ChildProcess::spawn(
            "virtiofsd",
            cmd,
            &daemon,
            "install it with `cargo install --locked --root /usr/local virtiofsd` or fix virtio_fs_daemon",
            &self.log,
            "virtiofsdPid",
        )?;
        self.record_pid("virtiofsd", child.pid());
        let child = Arc::new(child);
        inner.virtiofsd = Some(child.clone());
        self.publish(inner);
        wait_for_path(&socket, &child, SOCKET_WAIT).await?;
        info!(self.log, "sharing a directory over virtio-fs"; "dir" => %dir.display(), "cache" => &self.config.virtio_fs_cache);
        Ok(socket)
    }

    /// Appends `<name> <pid>` to `<run dir>/pids`, so that a later `delete` can find the
    /// processes of a shim that died ([`kill_leftovers`]).
    fn record_pid(&self, name: &str, pid: u32) {
        if let Err(e) = record_pid(&self.run_dir, name, pid) {
            warn!(self.log, "cannot record pid"; "file" => %self.run_dir.join(PIDS_FILE).display(), "error" => %e);
        }
    }

    /// Watches QEMU's exit and QMP events; turns them into state changes.
    fn spawn_monitor(&self, qemu: Arc<ChildProcess>, qmp: Arc<Qmp>) {
        self.monitored.store(true, Ordering::Release);
        let state = self.state.clone();
        let log = self.log.clone();
        let console = self.console.clone();
        let mut events = qmp.subscribe();
        tokio::spawn(async move {
            let mut qmp_open = true;
            loop {
                tokio::select! {
                    status = qemu.wait() => {
                        // Give the stderr reader a moment to deliver QEMU's last words.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let info = exit_info(&qemu, status, &console);
                        info!(log, "QEMU exited"; "status" => describe_status(status));
                        state.send_replace(VmState::Exited(info));
                        return;
                    }
                    ev = events.recv(), if qmp_open => {
                        let ev = match ev {
                            Ok(ev) => ev,
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                            // QMP is gone (QEMU is exiting): only its exit is left to watch.
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                qmp_open = false;
                                continue;
                            }
                        };
                        match ev.name.as_str() {
                            "STOP" => {
                                let status = qmp.execute("query-status", None).await.ok();
                                let status = status.as_ref().and_then(|s| s["status"].as_str()).unwrap_or("unknown").to_string();
                                if status != "paused" && status != "running" {
                                    warn!(log, "guest stopped"; "status" => &status);
                                    state.send_replace(VmState::Failed(format!(
                                        "QEMU stopped the guest: status {status}; last console lines:\n{}",
                                        console.joined()
                                    )));
                                }
                            }
                            "GUEST_PANICKED" => {
                                state.send_replace(VmState::Failed(format!(
                                    "the guest kernel panicked: {}; last console lines:\n{}",
                                    ev.data, console.joined()
                                )));
                            }
                            _ => {}
                        }
                    }
                }
            }
        });
    }

    /// Stops QEMU and the helpers. Runs under the lifecycle lock only: pids, hot-plugs and the
    /// rest go on meanwhile (a hot-plug waiting for the guest fails once QMP closes).
    async fn stop_processes(&self, life: &mut Lifecycle) {
        life.stopping = true;
        let Procs { qemu, vsockd, virtiofsd, qmp, vhost_fd } = self.procs().clone();
        if let Some(qemu) = qemu.clone() {
            if qemu.exited().is_none() {
                if let Some(qmp) = &qmp {
                    let _ = tokio::time::timeout(Duration::from_secs(1), qmp.execute("quit", None)).await;
                    if tokio::time::timeout(Duration::from_secs(2), qemu.wait()).await.is_err() {
                        warn!(self.log, "QEMU did not quit; killing it"; "qemuPid" => qemu.pid());
                        qemu.kill().await;
                    }
                } else {
                    // Stopped before QMP answered (a boot cut short): SIGTERM is QEMU's quit.
                    qemu.terminate(Duration::from_secs(2)).await;
                }
            }
        }
        // virtiofsd exits by itself when QEMU disconnects; vhost-device-vsock does not.
        for d in virtiofsd.iter().chain(vsockd.iter()) {
            d.terminate(Duration::from_secs(2)).await;
        }
        drop((qmp, vhost_fd));
        {
            let mut procs = self.procs();
            procs.qmp = None;
            procs.vhost_fd = None;
        }
        self.wait_qemu_gone(qemu.as_deref()).await;
        // QEMU holds copies of the tap fds: only now do the taps go with ours.
        if let Some(net) = self.network.clone() {
            match tokio::task::spawn_blocking(move || net.teardown()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(self.log, "pod network teardown failed"; "error" => %e),
                Err(e) => warn!(self.log, "pod network teardown failed"; "error" => %e),
            }
        }
        for name in ["qmp.sock", "vhost.sock", "hvsock", "vfs.sock", PIDS_FILE] {
            let _ = std::fs::remove_file(self.run_dir.join(name));
        }
    }

    /// Waits until the monitor has published QEMU's exit (or publishes it itself).
    async fn wait_qemu_gone(&self, qemu: Option<&ChildProcess>) {
        if let Some(qemu) = qemu {
            // The monitor (if the boot got that far) publishes Exited; wait for it so that
            // wait_exit callers see the end.
            if self.monitored.load(Ordering::Acquire) {
                let mut rx = self.state.subscribe();
                let exited = rx.wait_for(|s| matches!(s, VmState::Exited(_)));
                let _ = tokio::time::timeout(Duration::from_secs(2), exited).await;
            }
            if !matches!(*self.state.borrow(), VmState::Exited(_)) {
                let status = qemu.wait().await;
                self.state.send_replace(VmState::Exited(exit_info(qemu, status, &self.console)));
            }
        } else {
            self.state.send_replace(VmState::Exited(ExitInfo {
                code: None,
                signal: None,
                message: "never started".into(),
            }));
        }
    }

    async fn running_qmp(&self) -> Result<Arc<Qmp>> {
        match &*self.state.borrow() {
            VmState::Running | VmState::Paused => {}
            other => return Err(Error::InvalidRequest(format!("the VM is not running ({other:?})"))),
        }
        self.qmp().await
    }
}

fn exit_info(qemu: &ChildProcess, status: std::process::ExitStatus, console: &Tail) -> ExitInfo {
    use std::os::unix::process::ExitStatusExt;
    ExitInfo {
        code: status.code(),
        signal: status.signal(),
        message: format!(
            "QEMU (pid {}) exited: {}; last QEMU messages:\n{}\nlast console lines:\n{}",
            qemu.pid(),
            describe_status(status),
            qemu.stderr_tail().joined(),
            console.joined()
        ),
    }
}

/// In the child between fork and exec: enters the netns, then gives each `(fd, number)` its
/// number. Every source is first copied above all target numbers (close-on-exec), so no dup2
/// can clobber a source not yet copied. Async-signal-safe: syscalls only, no allocation.
fn child_setup(netns: Option<RawFd>, fds: &[(RawFd, RawFd)]) -> std::io::Result<()> {
    // SAFETY (all calls): plain syscalls on fds that stay open in the child until exec.
    if let Some(ns) = netns {
        if unsafe { libc::setns(ns, libc::CLONE_NEWNET) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let above = fds.iter().map(|(_, to)| *to).max().unwrap_or(0) + 1;
    let mut tmp = [-1 as RawFd; MAX_NICS + 1];
    if fds.len() > tmp.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    for (i, (from, _)) in fds.iter().enumerate() {
        tmp[i] = unsafe { libc::fcntl(*from, libc::F_DUPFD_CLOEXEC, above) };
        if tmp[i] < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for (i, (_, to)) in fds.iter().enumerate() {
        if unsafe { libc::dup2(tmp[i], *to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The time bound of the KVM probe made before a VM starts under KVM.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// File in the run directory listing `<name> <pid> <start time> <session>` of every helper
/// process (each the leader of its own process group), for [`kill_leftovers`].
const PIDS_FILE: &str = "pids";

/// Appends `<name> <pid> <start time> <session id>` of a helper that leads its own process group
/// to `<run_dir>/pids`. The start time (clock ticks after boot, `/proc/<pid>/stat` field 22)
/// tells the process from a later one that got the same pid; the session tells the group's
/// members from strangers once the leader is gone.
pub fn record_pid(run_dir: &Path, name: &str, pid: u32) -> std::io::Result<()> {
    use std::io::Write;
    let line = match proc_stat(pid) {
        Some(st) => format!("{name} {pid} {} {}", st.starttime, st.session),
        None => format!("{name} {pid}"),
    };
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join(PIDS_FILE))
        .and_then(|mut f| writeln!(f, "{line}"))
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcStat {
    zombie: bool,
    pgrp: i32,
    session: i32,
    starttime: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_proc_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses `/proc/<pid>/stat`; the command name (field 2) may hold spaces and parentheses, so
/// fields are counted after its last `)`.
fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let f: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    // f[0] is field 3 (state), so field n is f[n - 3].
    Some(ProcStat {
        zombie: matches!(*f.first()?, "Z" | "X"),
        pgrp: f.get(2)?.parse().ok()?,
        session: f.get(3)?.parse().ok()?,
        starttime: f.get(19)?.parse().ok()?,
    })
}

/// Every process on the host with its stat.
fn all_processes() -> Vec<(u32, ProcStat)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, proc_stat(pid)?)))
        .collect()
}

/// One line of the pids file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PidRecord {
    pid: u32,
    /// Start time and session (absent in records of older shims).
    identity: Option<(u64, i32)>,
}

fn parse_pid_record(line: &str) -> Option<PidRecord> {
    let mut f = line.split_whitespace().skip(1);
    let pid = f.next()?.parse().ok().filter(|p| *p > 1)?;
    let identity = match (f.next().and_then(|s| s.parse().ok()), f.next().and_then(|s| s.parse().ok())) {
        (Some(start), Some(session)) => Some((start, session)),
        _ => None,
    };
    Some(PidRecord { pid, identity })
}

/// Kills what a VM left behind when its owner died without stopping it (a shim killed with
/// SIGKILL), as the live path does: for every helper listed in `<run_dir>/pids`, its whole
/// process group (virtiofsd and others fork workers of their own). A recycled pid is never hit:
/// the group is killed only while its leader is the very process recorded (same pid and start
/// time). When the leader is gone, its group number cannot have been reused while members
/// remain, and the members are killed one by one if they are in the dead shim's session and
/// younger than the leader. Records without start time (older shims) are trusted only while the
/// process's command line names the run directory. Then the run directory is removed. Returns
/// the pids that were killed.
pub fn kill_leftovers(run_dir: &Path) -> Result<Vec<u32>> {
    use nix::sys::signal::{kill, killpg, Signal};
    use nix::unistd::Pid;
    let listed = match std::fs::read_to_string(run_dir.join(PIDS_FILE)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(format!("read {}", run_dir.join(PIDS_FILE).display()))(e)),
    };
    let records: Vec<PidRecord> = listed.lines().filter_map(parse_pid_record).collect();
    let needle = run_dir.as_os_str().as_encoded_bytes();
    let names_run_dir = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
    };
    let mut killed = Vec::new();
    let mut groups = Vec::new();
    let processes = if records.is_empty() { Vec::new() } else { all_processes() };
    for rec in &records {
        let leader = processes.iter().find(|(p, _)| *p == rec.pid).map(|(_, st)| *st);
        let ours = match (rec.identity, leader) {
            (Some((start, _)), Some(st)) => st.starttime == start,
            (None, Some(_)) => names_run_dir(rec.pid),
            (_, None) => false,
        };
        let members = processes.iter().filter(|(_, st)| st.pgrp == rec.pid as i32 && !st.zombie);
        if ours && leader.is_some_and(|st| st.pgrp == rec.pid as i32) {
            if killpg(Pid::from_raw(rec.pid as i32), Signal::SIGKILL).is_ok() {
                killed.extend(members.map(|(p, _)| *p));
                groups.push(rec.pid as i32);
            }
        } else if ours {
            // Left its group (helpers never do): the process alone.
            if kill(Pid::from_raw(rec.pid as i32), Signal::SIGKILL).is_ok() {
                killed.push(rec.pid);
            }
        } else if let (Some((start, session)), None) = (rec.identity, leader) {
            for (pid, _) in members.filter(|(_, st)| st.session == session && st.starttime >= start) {
                if kill(Pid::from_raw(*pid as i32), Signal::SIGKILL).is_ok() {
                    killed.push(*pid);
                }
            }
        }
    }
    // They are not our children: wait until they are gone (or zombies of their reaper).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let alive = || {
        killed.iter().any(|p| process_running(*p))
            || (!groups.is_empty() && all_processes().iter().any(|(_, st)| !st.zombie && groups.contains(&st.pgrp)))
    };
    while alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    killed.sort_unstable();
    killed.dedup();
    match std::fs::remove_dir_all(run_dir) {
        Ok(()) => Ok(killed),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(killed),
        Err(e) => Err(io_err(format!("remove run directory {}", run_dir.display()))(e)),
    }
}

/// A process exists and is not a zombie.
fn process_running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|st| !st.zombie)
}

/// Opens `/dev/vhost-vsock` and claims a free guest CID on it (as Kata does); the fd is then
/// handed to QEMU, so nobody else can take the CID in between.
fn open_vhost_vsock() -> Result<(OwnedFd, u32)> {
    nix::ioctl_write_ptr!(vhost_vsock_set_guest_cid, 0xAF, 0x60, u64);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/vhost-vsock")
        .map_err(io_err("open /dev/vhost-vsock"))?;
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0)
            ^ std::process::id();
    for i in 0..1000u32 {
        let cid = 3 + (seed.wrapping_add(i.wrapping_mul(2_654_435_761)) % 0x7fff_0000) as u64;
        // SAFETY: the ioctl reads one u64 from the pointer, which lives across the call.
        match unsafe { vhost_vsock_set_guest_cid(file.as_raw_fd(), &cid) } {
            Ok(_) => return Ok((file.into(), cid as u32)),
            Err(nix::errno::Errno::EADDRINUSE) => continue,
            Err(e) => return Err(Error::Host(format!("VHOST_VSOCK_SET_GUEST_CID on /dev/vhost-vsock failed: {e}"))),
        }
    }
    Err(Error::Host("no free vsock guest CID found after 1000 tries".into()))
}

#[async_trait]
impl Hypervisor for Qemu {
    async fn prepare(&self) -> Result<()> {
        self.check_files()?;
        std::fs::create_dir_all(&self.run_dir)
            .map_err(io_err(format!("create run directory {}", self.run_dir.display())))?;
        Ok(())
    }

    async fn start(&self) -> Result<()> {
        let mut life = self.lifecycle.lock().await;
        if self.procs().qemu.is_some() {
            return Err(Error::InvalidRequest("the VM was already started".into()));
        }
        if life.stopping || *self.stop_requested.borrow() {
            return Err(Error::InvalidRequest("the VM was stopped; a stopped VM cannot be started again".into()));
        }
        // A stop during the boot ends it at once instead of waiting for it.
        let mut stop_requested = self.stop_requested.subscribe();
        let mut staged = Procs::default();
        let result = tokio::select! {
            r = self.start_inner(&mut staged) => r,
            _ = stop_requested.wait_for(|s| *s) => Err(Error::VmFailed("the VM was stopped while it started".into())),
        };
        self.publish(&staged);
        drop(staged);
        if let Err(e) = result {
            // QEMU fails to start when a helper it connects to died: name the helper first.
            let dead_helper = {
                let procs = self.procs();
                procs.virtiofsd.iter().chain(procs.vsockd.iter()).find_map(|h| {
                    h.exited().map(|s| format!("{} (pid {}) exited: {}", h.name(), h.pid(), describe_status(s)))
                })
            };
            // Nothing of a failed start survives: processes, sockets, run directory.
            self.stop_processes(&mut life).await;
            let _ = std::fs::remove_dir_all(&self.run_dir);
            // A QEMU that exited says more than "connection lost".
            if let VmState::Exited(info) = &*self.state.borrow() {
                if !matches!(e, Error::Host(_) | Error::Spawn { .. }) {
                    let helper = dead_helper.map(|h| format!("{h}; ")).unwrap_or_default();
                    return Err(Error::VmFailed(format!("{helper}{e}; {}", info.message)));
                }
            }
            if let Some(h) = dead_helper {
                return Err(Error::VmFailed(format!("{h}; {e}")));
            }
            return Err(e);
        }
        Ok(())
    }

    async fn stop(&self) -> Result<()> {
        self.stop_requested.send_replace(true);
        let mut life = self.lifecycle.lock().await;
        if life.stopping && matches!(*self.state.borrow(), VmState::Exited(_)) {
            return Ok(());
        }
        info!(self.log, "stopping VM");
        self.stop_processes(&mut life).await;
        Ok(())
    }

    async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.state.subscribe();
        let state = rx.wait_for(|s| matches!(s, VmState::Exited(_))).await.map(|s| s.clone());
        match state {
            Ok(VmState::Exited(info)) => info,
            _ => ExitInfo { code: None, signal: None, message: "driver dropped".into() },
        }
    }

    async fn wait_failure(&self) -> String {
        let mut rx = self.state.subscribe();
        let state = rx.wait_for(|s| matches!(s, VmState::Failed(_) | VmState::Exited(_))).await.map(|s| s.clone());
        match state {
            Ok(VmState::Failed(m)) => m,
            Ok(VmState::Exited(info)) => info.message,
            _ => "driver dropped".into(),
        }
    }

    async fn pause(&self) -> Result<()> {
        self.running_qmp().await?.execute("stop", None).await?;
        self.state.send_replace(VmState::Paused);
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        self.running_qmp().await?.execute("cont", None).await?;
        self.state.send_replace(VmState::Running);
        Ok(())
    }

    async fn resize_memory(&self, total: MemoryMiB) -> Result<MemoryMiB> {
        let qmp = self.running_qmp().await?;
        self.hotplug.lock().await.resize_memory(&qmp, total, &self.log).await
    }

    async fn resize_vcpus(&self, count: u32) -> Result<u32> {
        let qmp = self.running_qmp().await?;
        self.hotplug.lock().await.resize_vcpus(&qmp, count).await
    }

    async fn add_device(&self, device: Device) -> Result<DeviceAddress> {
        let qmp = self.running_qmp().await?;
        self.hotplug.lock().await.add_device(&qmp, device).await
    }

    async fn remove_device(&self, id: &str) -> Result<()> {
        let qmp = self.running_qmp().await?;
        self.hotplug.lock().await.remove_device(&qmp, id).await
    }

    async fn pids(&self) -> Vec<u32> {
        let procs = self.procs();
        procs.qemu.iter().chain(procs.vsockd.iter()).chain(procs.virtiofsd.iter()).map(|c| c.pid()).collect()
    }

    fn helper_pids(&self) -> crate::HelperPids {
        let procs = self.procs();
        crate::HelperPids {
            vmm: procs.qemu.as_ref().map(|c| c.pid()),
            virtiofsd: procs.virtiofsd.as_ref().map(|c| c.pid()),
            vsockd: procs.vsockd.as_ref().map(|c| c.pid()),
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            memory_hotplug: true,
            vcpu_hotplug: true,
            block_device_hotplug: true,
            fs_sharing: self.shared_dir.is_some(),
            hybrid_vsock: matches!(self.channel, AgentChannel::HybridVsock { .. }),
        }
    }

    fn agent_channel(&self) -> AgentChannel {
        match &self.channel {
            AgentChannel::Vsock { port, .. } => {
                AgentChannel::Vsock { cid: self.vsock_cid.load(Ordering::Relaxed), port: *port }
            }
            other => other.clone(),
        }
    }

    fn console_tail(&self) -> Vec<String> {
        self.console.lines()
    }

    async fn cleanup(&self) -> Result<()> {
        self.stop().await?;
        match std::fs::remove_dir_all(&self.run_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("remove run directory {}", self.run_dir.display()))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    fn log() -> Logger {
        Logger::root(slog::Discard, slog::o!())
    }

    impl Qemu {
        async fn attach_for_test(&self, qemu: Arc<ChildProcess>, qmp: Arc<Qmp>, spec: &VmSpec) {
            *self.hotplug.lock().await = hotplug::State::new(spec);
            self.publish(&Procs { qemu: Some(qemu.clone()), qmp: Some(qmp.clone()), ..Procs::default() });
            self.state.send_replace(VmState::Running);
            self.spawn_monitor(qemu, qmp);
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("podvisor-qemu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A QMP peer that answers every command with success (and `quit` by closing, as QEMU does)
    /// but never sends an event: a guest that never acknowledges a hot-plug. Each command name
    /// it receives is sent on the returned channel.
    fn silent_guest_qmp(sock: &Path) -> tokio::sync::mpsc::UnboundedReceiver<String> {
        let listener = tokio::net::UnixListener::bind(sock).unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"capabilities\": []}}\r\n").await.unwrap();
            while let Ok(Some(line)) = lines.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let command = v["execute"].as_str().unwrap_or("").to_string();
                let value = match command.as_str() {
                    "query-status" => serde_json::json!({"status": "running", "running": true}),
                    _ => serde_json::json!({}),
                };
                let reply = serde_json::json!({"return": value, "id": v["id"]});
                let _ = w.write_all(format!("{reply}\r\n").as_bytes()).await;
                let quit = command == "quit";
                let _ = tx.send(command);
                if quit {
                    return;
                }
            }
        });
        rx
    }

    /// A VM whose "QEMU" is a sleeping process and whose QMP peer is [`silent_guest_qmp`].
    async fn vm_with_silent_guest(name: &str) -> (Arc<Qemu>, tokio::sync::mpsc::UnboundedReceiver<String>, PathBuf) {
        let dir = scratch(name);
        let config = QemuConfig { default_memory: 256, default_maxmemory: 1024, ..QemuConfig::default() };
        let vm = Qemu::with_run_root("vm", config, log(), &dir);
        std::fs::create_dir_all(vm.run_dir()).unwrap();
        let sock = dir.join("fake-qmp.sock");
        let commands = silent_guest_qmp(&sock);
        let qmp = Arc::new(Qmp::connect(&sock, Duration::from_secs(5)).await.unwrap());
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("1000");
        let (qemu, _) = ChildProcess::spawn("QEMU", cmd, Path::new("sleep"), "", &vm.log, "qemuPid").unwrap();
        let spec = vm.spec(AccelChoice::Tcg { reason: "test".into() }, VsockDevice::Kernel { cid: 3, vhostfd: None });
        vm.attach_for_test(Arc::new(qemu), qmp, &spec).await;
        vm.console.push("guest says hi".into());
        (Arc::new(vm), commands, dir)
    }

    /// While a memory hot-plug waits for a guest acknowledgement that never comes, the fast
    /// calls answer at once: pids, the QEMU pid, the console tail, the state, a QMP command
    /// (pause). Then stop ends the VM without waiting for the hot-plug, which fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fast_calls_answer_while_a_hotplug_waits_for_the_guest() {
        let (vm, mut commands, dir) = vm_with_silent_guest("hotplug-wait").await;
        let plug = tokio::spawn({
            let vm = vm.clone();
            async move { vm.resize_memory(MemoryMiB(384)).await }
        });
        // Once device_add is answered the hot-plug waits for ACPI_DEVICE_OST.
        while commands.recv().await.as_deref() != Some("device_add") {}
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!plug.is_finished(), "the hot-plug should be waiting for the guest");
        let fast = Duration::from_millis(100);
        let started = std::time::Instant::now();
        let pids = tokio::time::timeout(fast, vm.pids()).await.expect("pids() waited for the hot-plug");
        let pids_took = started.elapsed();
        assert_eq!(pids.len(), 1, "{pids:?}");
        let qemu_pid = tokio::time::timeout(fast, vm.qemu_pid()).await.expect("qemu_pid() waited for the hot-plug");
        assert_eq!(qemu_pid, Some(pids[0]));
        assert_eq!(vm.console_tail(), vec!["guest says hi".to_string()]);
        tokio::time::timeout(fast, vm.pause()).await.expect("pause waited for the hot-plug").unwrap();
        tokio::time::timeout(fast, vm.resume()).await.expect("resume waited for the hot-plug").unwrap();
        eprintln!("pids() during a blocked hot-plug took {pids_took:?}");
        assert!(!plug.is_finished(), "the hot-plug should still be waiting for the guest");
        // stop does not wait for the hot-plug either; QMP closing ends the hot-plug's wait.
        tokio::time::timeout(Duration::from_secs(5), vm.stop()).await.expect("stop waited for the hot-plug").unwrap();
        let err = tokio::time::timeout(Duration::from_secs(2), plug).await.expect("the hot-plug outlived QMP").unwrap();
        assert!(err.is_err(), "{err:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A block device QEMU accepted stays recorded even when its address cannot be found, so
    /// its id and root port are not handed out again while QEMU still has it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_device_qemu_accepted_stays_recorded_when_the_lookup_fails() {
        let (vm, _commands, dir) = vm_with_silent_guest("device-lookup").await;
        let image = dir.join("disk.img");
        std::fs::write(&image, vec![0u8; 4096]).unwrap();
        let dev = Device::Block { id: "blk0".into(), path: image.clone(), read_only: true };
        let err = vm.add_device(dev.clone()).await.unwrap_err().to_string();
        assert!(err.contains("query-pci does not list it"), "{err}");
        let again = vm.add_device(dev).await.unwrap_err().to_string();
        assert!(again.contains("blk0 is already in use"), "{again}");
        vm.stop().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (a) b (c) S 1 4242 99 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0";
        let st = parse_proc_stat(line).unwrap();
        assert_eq!(st, ProcStat { zombie: false, pgrp: 4242, session: 99, starttime: 123456 });
        assert!(parse_proc_stat("4242 (x) Z 1 2").is_none(), "too short");
        assert_eq!(parse_pid_record("qemu 77 123456 99"), Some(PidRecord { pid: 77, identity: Some((123456, 99)) }));
        assert_eq!(parse_pid_record("qemu 77"), Some(PidRecord { pid: 77, identity: None }));
        assert_eq!(parse_pid_record("qemu 1 5 5"), None, "never pid 1");
        assert_eq!(parse_pid_record("qemu x"), None);
    }

    fn group_members(pgrp: u32) -> Vec<u32> {
        all_processes().into_iter().filter(|(_, st)| st.pgrp == pgrp as i32 && !st.zombie).map(|(p, _)| p).collect()
    }

    fn wait_for_members(pgrp: u32, n: usize) -> Vec<u32> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let members = group_members(pgrp);
            if members.len() >= n {
                return members;
            }
            assert!(std::time::Instant::now() < deadline, "group {pgrp} has {members:?}, expected {n} members");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A group whose leader exits at once and leaves a `sleep` behind in its group.
    fn orphaned_group() -> (u32, ProcStat) {
        use std::os::unix::process::CommandExt;
        let mut sh = std::process::Command::new("sh")
            .args(["-c", "sleep 1000 & read x"])
            .stdin(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = sh.id();
        let st = proc_stat(pid).unwrap();
        wait_for_members(pid, 2);
        drop(sh.stdin.take());
        sh.wait().unwrap();
        assert_eq!(group_members(pid).len(), 1, "the sleep outlives its leader");
        (pid, st)
    }

    /// `delete` after a dead shim kills each recorded helper's whole process group (children
    /// and grandchildren), and the members of a group whose leader is gone; it leaves alone a
    /// process that got a recorded pid later, and a group of another session.
    #[test]
    fn leftovers_are_killed_by_process_group_and_recycled_pids_are_spared() {
        use std::os::unix::process::CommandExt;
        let dir = scratch("leftovers");
        let run_dir = dir.join("vm");
        std::fs::create_dir_all(&run_dir).unwrap();
        // A helper with two children (grandchildren of this test).
        let mut helper = std::process::Command::new("sh")
            .args(["-c", "sleep 1000 & sleep 1000 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        record_pid(&run_dir, "virtiofsd", helper.id()).unwrap();
        let helper_group = wait_for_members(helper.id(), 3);
        // A helper that died and left a child in its group.
        let (orphaned, orphaned_st) = orphaned_group();
        let mut text = std::fs::read_to_string(run_dir.join(PIDS_FILE)).unwrap();
        text.push_str(&format!("vhost-device-vsock {orphaned} {} {}\n", orphaned_st.starttime, orphaned_st.session));
        std::fs::write(run_dir.join(PIDS_FILE), text).unwrap();
        let orphan = group_members(orphaned);
        // A stranger's group whose leader is gone: recorded with another session.
        let (foreign, foreign_st) = orphaned_group();
        // A process that got a recorded pid later: another start time.
        let mut recycled = std::process::Command::new("sleep").arg("1000").process_group(0).spawn().unwrap();
        let rst = proc_stat(recycled.id()).unwrap();
        let mut text = std::fs::read_to_string(run_dir.join(PIDS_FILE)).unwrap();
        text.push_str(&format!("qemu {} {} {}\n", recycled.id(), rst.starttime + 1, rst.session));
        text.push_str(&format!("qemu {foreign} {} {}\n", foreign_st.starttime, foreign_st.session + 1));
        std::fs::write(run_dir.join(PIDS_FILE), text).unwrap();

        let killed = kill_leftovers(&run_dir).unwrap();

        let status = helper.wait().unwrap();
        let survivors: Vec<u32> = helper_group.iter().chain(&orphan).copied().filter(|p| process_running(*p)).collect();
        let recycled_alive = process_running(recycled.id());
        let foreign_alive = !group_members(foreign).is_empty();
        let _ = recycled.kill();
        let _ = recycled.wait();
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(foreign as i32), nix::sys::signal::Signal::SIGKILL);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(survivors.is_empty(), "still running: {survivors:?}");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        for p in helper_group.iter().chain(&orphan) {
            assert!(killed.contains(p), "{p} not reported in {killed:?}");
        }
        assert!(recycled_alive, "a process that got a recorded pid later was killed");
        assert!(foreign_alive, "a group of another session was killed");
        assert!(!run_dir.exists());
    }

    /// A boot that waits (a "QEMU" that never opens its QMP socket) holds no lock that `pids`
    /// needs, and `stop` ends it at once instead of waiting for the boot's timeout; nothing of it
    /// is left running.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_cuts_a_boot_short_and_pids_answer_meanwhile() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("boot-stop");
        let fake = dir.join("fake-qemu");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 1000\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let vm = Arc::new(Qemu::with_run_root("vm", QemuConfig { path: fake, ..QemuConfig::default() }, log(), &dir));
        std::fs::create_dir_all(vm.run_dir()).unwrap();
        let start = tokio::spawn({
            let vm = vm.clone();
            async move { vm.start().await }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let qemu_pid = loop {
            if let Some(pid) = vm.qemu_pid().await {
                break pid;
            }
            assert!(!start.is_finished(), "the start ended early: {:?}", start.await);
            assert!(std::time::Instant::now() < deadline, "the fake QEMU never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let pids =
            tokio::time::timeout(Duration::from_millis(100), vm.pids()).await.expect("pids() waited for the boot");
        assert!(pids.contains(&qemu_pid), "{pids:?}");
        assert!(!start.is_finished(), "the boot should be waiting for qmp.sock");
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), vm.stop()).await.expect("stop waited for the boot").unwrap();
        let stop_took = started.elapsed();
        let err = tokio::time::timeout(Duration::from_secs(1), start).await.expect("the boot went on").unwrap();
        let err = err.expect_err("a stopped boot must fail").to_string();
        assert!(err.contains("stopped while it started"), "{err}");
        eprintln!("stop during a boot took {stop_took:?}");
        for pid in pids {
            assert!(!process_running(pid), "pid {pid} survived the stop");
        }
        assert!(vm.start().await.is_err(), "a stopped VM must not start again");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
