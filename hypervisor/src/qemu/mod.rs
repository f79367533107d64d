//! The QEMU driver: one value per VM. It owns the run directory
//! (`<run_root>/<sandbox id>/`: `qmp.sock`, and for hybrid vsock `vhost.sock` and `hvsock`), the
//! QEMU process and the vhost-device-vsock daemon, and it watches QMP for a guest that stops.
//! With a pod network, QEMU runs in the pod netns with the taps, which are torn down once QEMU
//! is gone.

pub mod cmdline;
mod hotplug;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use slog::{info, warn, Logger};
use tokio::io::{AsyncBufReadExt, BufReader};
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

/// Processes and hotplug bookkeeping, behind one lock.
#[derive(Default)]
struct Inner {
    qemu: Option<Arc<ChildProcess>>,
    vsockd: Option<ChildProcess>,
    virtiofsd: Option<ChildProcess>,
    qmp: Option<Arc<Qmp>>,
    vhost_fd: Option<OwnedFd>,
    hotplug: hotplug::State,
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
    inner: Mutex<Inner>,
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
            inner: Mutex::new(Inner::default()),
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
        self.inner.lock().await.qemu.as_ref().map(|q| q.pid())
    }

    /// The QMP session, once started (for tests and diagnostics).
    pub async fn qmp(&self) -> Result<Arc<Qmp>> {
        self.inner.lock().await.qmp.clone().ok_or_else(|| Error::InvalidRequest("the VM is not running".into()))
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

    async fn start_inner(&self, inner: &mut Inner) -> Result<()> {
        let accel = AccelChoice::choose(self.config.accelerator, &self.facts).map_err(Error::Host)?;
        match &accel {
            AccelChoice::Kvm => info!(self.log, "using KVM"),
            AccelChoice::Tcg { reason } => {
                info!(self.log, "using TCG (software emulation) because {}", reason; "accelerator" => "tcg")
            }
        }
        let vsock = if self.facts.vhost_vsock {
            let (fd, cid) = open_vhost_vsock()?;
            inner.vhost_fd = Some(fd);
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
            let ready = wait_for_path(&socket, &child, SOCKET_WAIT).await;
            inner.vsockd = Some(child);
            ready?;
            info!(self.log, "agent channel: hybrid vsock"; "uds" => %uds.display());
            VsockDevice::VhostUser { socket }
        };
        let mut spec = self.spec(accel, vsock);
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
        inner.hotplug = hotplug::State::new(&spec);
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
            let tail = self.console.clone();
            let log = self.log.new(slog::o!("source" => "console"));
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let line = line.trim_end_matches('\r').to_string();
                    info!(log, "reading guest console"; "vmconsole" => &line);
                    tail.push(line);
                }
            });
        }
        let qmp_path = self.run_dir.join("qmp.sock");
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
        let status = qmp.execute("query-status", None).await?;
        if status["running"] != serde_json::Value::Bool(true) {
            return Err(Error::VmFailed(format!("QEMU reports status {} right after start", status["status"])));
        }
        info!(self.log, "VM started"; "qemuPid" => qemu.pid(), "qemu_version" => &qmp.version);
        self.state.send_replace(VmState::Running);
        // A dead virtiofsd or vsock daemon leaves QEMU running without the device (the guest
        // blocks on it): a failure of the VM. On a normal stop QEMU exits first.
        for mut helper in inner.virtiofsd.iter().chain(inner.vsockd.iter()).map(ChildProcess::exit_watch) {
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
    async fn start_virtiofsd(&self, inner: &mut Inner, dir: &Path) -> Result<PathBuf> {
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
        let ready = wait_for_path(&socket, &child, SOCKET_WAIT).await;
        inner.virtiofsd = Some(child);
        ready?;
        info!(self.log, "sharing a directory over virtio-fs"; "dir" => %dir.display(), "cache" => &self.config.virtio_fs_cache);
        Ok(socket)
    }

    /// Appends `<name> <pid>` to `<run dir>/pids`, so that a later `delete` can find the
    /// processes of a shim that died ([`kill_leftovers`]).
    fn record_pid(&self, name: &str, pid: u32) {
        use std::io::Write;
        let path = self.run_dir.join(PIDS_FILE);
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{name} {pid}"));
        if let Err(e) = written {
            warn!(self.log, "cannot record pid"; "file" => %path.display(), "error" => %e);
        }
    }

    /// Watches QEMU's exit and QMP events; turns them into state changes.
    fn spawn_monitor(&self, qemu: Arc<ChildProcess>, qmp: Arc<Qmp>) {
        let state = self.state.clone();
        let log = self.log.clone();
        let console = self.console.clone();
        let mut events = qmp.subscribe();
        tokio::spawn(async move {
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
                    ev = events.recv() => {
                        let Ok(ev) = ev else { continue };
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

    async fn stop_processes(&self, inner: &mut Inner) {
        inner.stopping = true;
        if let Some(qemu) = inner.qemu.clone() {
            if qemu.exited().is_none() {
                if let Some(qmp) = &inner.qmp {
                    let _ = tokio::time::timeout(Duration::from_secs(1), qmp.execute("quit", None)).await;
                }
                if tokio::time::timeout(Duration::from_secs(2), qemu.wait()).await.is_err() {
                    warn!(self.log, "QEMU did not quit; killing it"; "qemuPid" => qemu.pid());
                    qemu.kill().await;
                }
            }
        }
        // virtiofsd exits by itself when QEMU disconnects; vhost-device-vsock does not.
        for d in inner.virtiofsd.iter().chain(inner.vsockd.iter()) {
            d.terminate(Duration::from_secs(2)).await;
        }
        inner.qmp = None;
        inner.vhost_fd = None;
        self.wait_qemu_gone(inner).await;
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
    async fn wait_qemu_gone(&self, inner: &Inner) {
        if let Some(qemu) = &inner.qemu {
            // The monitor publishes Exited; wait for it so that wait_exit callers see the end.
            let mut rx = self.state.subscribe();
            let _ =
                tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|s| matches!(s, VmState::Exited(_)))).await;
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

/// File in the run directory listing `<name> <pid>` of every helper process.
const PIDS_FILE: &str = "pids";

/// Kills what a VM left behind when its owner died without stopping it (a shim killed with
/// SIGKILL): every process listed in `<run_dir>/pids` whose command line still names the run
/// directory (so a recycled pid is never hit), then the run directory itself. Returns the pids
/// that were killed.
pub fn kill_leftovers(run_dir: &Path) -> Result<Vec<u32>> {
    let listed = match std::fs::read_to_string(run_dir.join(PIDS_FILE)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(format!("read {}", run_dir.join(PIDS_FILE).display()))(e)),
    };
    let needle = run_dir.as_os_str().as_encoded_bytes();
    let mut killed = Vec::new();
    for pid in listed.lines().filter_map(|l| l.split_whitespace().nth(1)?.parse::<u32>().ok()) {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            let p = nix::unistd::Pid::from_raw(pid as i32);
            if nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL).is_ok() {
                killed.push(pid);
            }
        }
    }
    // They are not our children: wait until they are gone (or zombies of their reaper).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while killed.iter().any(|p| process_running(*p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    match std::fs::remove_dir_all(run_dir) {
        Ok(()) => Ok(killed),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(killed),
        Err(e) => Err(io_err(format!("remove run directory {}", run_dir.display()))(e)),
    }
}

/// A process exists and is not a zombie.
fn process_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
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
        let mut inner = self.inner.lock().await;
        if inner.qemu.is_some() {
            return Err(Error::InvalidRequest("the VM was already started".into()));
        }
        if let Err(e) = self.start_inner(&mut inner).await {
            // QEMU fails to start when a helper it connects to died: name the helper first.
            let dead_helper = inner.virtiofsd.iter().chain(inner.vsockd.iter()).find_map(|h| {
                h.exited().map(|s| format!("{} (pid {}) exited: {}", h.name(), h.pid(), describe_status(s)))
            });
            // Nothing of a failed start survives: processes, sockets, run directory.
            self.stop_processes(&mut inner).await;
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
        let mut inner = self.inner.lock().await;
        if inner.stopping && matches!(*self.state.borrow(), VmState::Exited(_)) {
            return Ok(());
        }
        info!(self.log, "stopping VM");
        self.stop_processes(&mut inner).await;
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
        let mut inner = self.inner.lock().await;
        inner.hotplug.resize_memory(&qmp, total, &self.log).await
    }

    async fn resize_vcpus(&self, count: u32) -> Result<u32> {
        let qmp = self.running_qmp().await?;
        let mut inner = self.inner.lock().await;
        inner.hotplug.resize_vcpus(&qmp, count).await
    }

    async fn add_device(&self, device: Device) -> Result<DeviceAddress> {
        let qmp = self.running_qmp().await?;
        let mut inner = self.inner.lock().await;
        inner.hotplug.add_device(&qmp, device).await
    }

    async fn remove_device(&self, id: &str) -> Result<()> {
        let qmp = self.running_qmp().await?;
        let mut inner = self.inner.lock().await;
        inner.hotplug.remove_device(&qmp, id).await
    }

    async fn pids(&self) -> Vec<u32> {
        let inner = self.inner.lock().await;
        inner
            .qemu
            .iter()
            .map(|c| c.pid())
            .chain(inner.vsockd.iter().chain(inner.virtiofsd.iter()).map(|c| c.pid()))
            .collect()
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
