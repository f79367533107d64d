//! The `qemu` provider: each podvm is a local QEMU (like cloud-api-adaptor's libvirt provider)
//! booting our guest image with a virtio-net NIC on a tap of the podvm bridge, its user data as
//! fw_cfg `opt/io.podvisor/podvm`, no vsock. QEMU runs in its own session so that it outlives a
//! service restart; it is found again by the markers on its command line ([`cmdline`]).
//!
//! Files in the podvm's run directory: `podvm.json` (user data, mode 0600), `console.log` (the
//! serial console, QEMU's stdout), `qemu.log` (QEMU's stderr), `qmp.sock`, `qemu-instance.json`
//! (the [`Instance`], for `list_instances` after QEMU died). Logs are bounded to
//! [`LOG_LIMIT`] bytes by a task that checks every [`LOG_CHECK`] while the service runs.

pub mod cmdline;
mod procfs;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hypervisor::config::Accelerator;
use hypervisor::host::{AccelChoice, HostFacts};

use crate::net::bridge::{self, Bridge};
use crate::provider::{Instance, InstanceRequest, InstanceType, Provider, ProviderError, UnderlayNetwork};
use cmdline::PodvmSpec;

/// Default guest kernel.
pub const DEFAULT_KERNEL: &str = "/usr/share/kata-containers/vmlinux.container";
/// Default guest initrd.
pub const DEFAULT_INITRD: &str = "/usr/share/kata-containers/kata-containers-initrd.img";
/// Default QEMU binary.
pub const DEFAULT_QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// Port of the worker's registry that podvms may pull from over plain HTTP.
pub const WORKER_REGISTRY_PORT: u16 = 5000;
/// Most bytes kept in `console.log` / `qemu.log`.
pub const LOG_LIMIT: u64 = 1 << 20;
/// How often the logs are checked.
pub const LOG_CHECK: Duration = Duration::from_secs(2);
/// How long QEMU may take to open its QMP socket.
const START_WAIT: Duration = Duration::from_secs(20);
/// How long a killed QEMU may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Most bytes of user data the agent reads from fw_cfg.
pub const USER_DATA_MAX: usize = 64 * 1024;
/// The instance record in the run directory.
const INSTANCE_FILE: &str = "qemu-instance.json";
/// Files of ours in the run directory.
const FILES: &[&str] = &["podvm.json", "console.log", "qemu.log", "qmp.sock", INSTANCE_FILE];

/// The built-in instance types.
pub fn builtin_instance_types() -> Vec<InstanceType> {
    [("small", 1, 512), ("medium", 2, 1024), ("large", 4, 2048)]
        .into_iter()
        .map(|(n, c, m)| InstanceType { name: n.into(), vcpus: c, memory_mib: m })
        .collect()
}

fn perr(s: impl Into<String>) -> ProviderError {
    ProviderError(s.into())
}

/// Settings of the qemu provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSettings {
    /// `QEMU_PATH` (default [`DEFAULT_QEMU`]).
    pub qemu: PathBuf,
    /// `QEMU_PODVM_KERNEL`.
    pub kernel: PathBuf,
    /// `QEMU_PODVM_INITRD`.
    pub initrd: PathBuf,
    /// `QEMU_BRIDGE` / `QEMU_BRIDGE_CIDR`.
    pub bridge: Bridge,
    /// `QEMU_ACCEL`.
    pub accel: Accelerator,
    /// `<bridge address>:5000` plus `INSECURE_REGISTRIES`.
    pub insecure_registries: Vec<String>,
    /// `QEMU_DEBUG=true`: verbose guest.
    pub debug: bool,
    /// Parent of the run directories (`/run/peerpod/podvms`): a podvm's is `<run_root>/<sandbox id>`.
    pub run_root: PathBuf,
    /// The service's `podvisor.io/owner` tag value: podvms carrying another owner are not ours.
    pub owner: String,
}

impl QemuSettings {
    /// Reads the provider's keys from the service's settings (`env`, the env file's values).
    /// Errors name the key and the fix.
    pub fn from_env(env: &BTreeMap<String, String>, run_root: PathBuf, owner: String) -> Result<Self, ProviderError> {
        let get = |k: &str| env.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let bridge = Bridge::parse(
            get("QEMU_BRIDGE").unwrap_or(bridge::DEFAULT_BRIDGE),
            get("QEMU_BRIDGE_CIDR").unwrap_or(bridge::DEFAULT_BRIDGE_CIDR),
        )
        .map_err(|e| perr(e.0))?;
        let accel = match get("QEMU_ACCEL").unwrap_or("auto") {
            "auto" => Accelerator::Auto,
            "kvm" => Accelerator::Kvm,
            "tcg" => Accelerator::Tcg,
            other => return Err(perr(format!("QEMU_ACCEL={other:?} is not one of auto, kvm, tcg"))),
        };
        let mut insecure_registries = vec![format!("{}:{WORKER_REGISTRY_PORT}", bridge.address)];
        for r in get("INSECURE_REGISTRIES").unwrap_or("").split(',').map(str::trim).filter(|r| !r.is_empty()) {
            if r.contains(char::is_whitespace) || r.contains('/') {
                return Err(perr(format!("INSECURE_REGISTRIES: {r:?} is not a host[:port]")));
            }
            if !insecure_registries.iter().any(|x| x == r) {
                insecure_registries.push(r.to_string());
            }
        }
        let debug = match get("QEMU_DEBUG").unwrap_or("false") {
            "true" => true,
            "false" => false,
            other => return Err(perr(format!("QEMU_DEBUG={other:?} is not true or false"))),
        };
        if owner.is_empty() {
            return Err(perr("the qemu provider needs a non-empty owner (the podvisor.io/owner tag)"));
        }
        Ok(QemuSettings {
            qemu: get("QEMU_PATH").unwrap_or(DEFAULT_QEMU).into(),
            kernel: get("QEMU_PODVM_KERNEL").unwrap_or(DEFAULT_KERNEL).into(),
            initrd: get("QEMU_PODVM_INITRD").unwrap_or(DEFAULT_INITRD).into(),
            bridge,
            accel,
            insecure_registries,
            debug,
            run_root,
            owner,
        })
    }
}

/// The qemu provider.
pub struct QemuProvider {
    inner: Arc<Inner>,
}

struct Inner {
    settings: QemuSettings,
    accel: AccelChoice,
    /// Addresses of creations in flight (not yet visible as processes).
    reserved: Mutex<BTreeSet<IpAddr>>,
}

impl std::fmt::Debug for QemuProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuProvider")
            .field("settings", &self.inner.settings)
            .field("accel", &self.inner.accel)
            .finish()
    }
}

impl QemuProvider {
    /// Checks the files and the accelerator. Starts the log bounding task when called inside a
    /// tokio runtime.
    pub fn new(settings: QemuSettings) -> Result<QemuProvider, ProviderError> {
        for (key, path) in [
            ("QEMU_PATH", &settings.qemu),
            ("QEMU_PODVM_KERNEL", &settings.kernel),
            ("QEMU_PODVM_INITRD", &settings.initrd),
        ] {
            if !path.is_file() {
                return Err(perr(format!(
                    "{key}={}: no such file; install it or point {key} at it in the service's env file",
                    path.display()
                )));
            }
        }
        let facts = if settings.accel == Accelerator::Tcg {
            HostFacts::probe()
        } else {
            HostFacts::probe_with_kvm(Duration::from_secs(2)).0
        };
        let accel =
            AccelChoice::choose(settings.accel, &facts).map_err(|e| perr(e.replace("accelerator", "QEMU_ACCEL")))?;
        let p = Arc::new(Inner { settings, accel, reserved: Mutex::new(BTreeSet::new()) });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&p);
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(LOG_CHECK).await;
                    let Some(p) = weak.upgrade() else { return };
                    let root = p.settings.run_root.clone();
                    drop(p);
                    let _ = tokio::task::spawn_blocking(move || bound_logs(&root)).await;
                }
            });
        }
        Ok(QemuProvider { inner: p })
    }

    /// The settings.
    pub fn settings(&self) -> &QemuSettings {
        &self.inner.settings
    }

    /// The accelerator podvms run under.
    pub fn accel(&self) -> &AccelChoice {
        &self.inner.accel
    }
}

impl Inner {
    fn run_dir(&self, sandbox_id: &str) -> PathBuf {
        self.settings.run_root.join(sandbox_id)
    }

    /// Live podvm QEMU processes of our owner, and recorded instances whose QEMU is gone.
    fn scan(&self) -> Vec<Instance> {
        let mut out: BTreeMap<String, Instance> = BTreeMap::new();
        for (pid, argv) in procfs::cmdlines() {
            let Some((name, sandbox_id, ip, _)) = cmdline::parse_markers(&argv, &self.settings.owner) else {
                continue;
            };
            let Some(stat) = procfs::stat(pid).filter(|s| s.state != 'Z') else { continue };
            let tags = read_record(&self.run_dir(&sandbox_id)).map(|i| i.tags).unwrap_or_else(|| {
                BTreeMap::from([
                    ("podvisor.io/owner".into(), self.settings.owner.clone()),
                    ("podvisor.io/sandbox-id".into(), sandbox_id.clone()),
                ])
            });
            out.insert(
                sandbox_id.clone(),
                Instance {
                    id: name,
                    sandbox_id,
                    ip: IpAddr::V4(ip),
                    vmm_pid: Some(pid),
                    vmm_start_time: Some(stat.start_time),
                    tags,
                },
            );
        }
        if let Ok(dirs) = std::fs::read_dir(&self.settings.run_root) {
            for d in dirs.flatten() {
                if let Some(mut i) = read_record(&d.path()) {
                    if i.tags.get("podvisor.io/owner") == Some(&self.settings.owner) && !out.contains_key(&i.sandbox_id)
                    {
                        (i.vmm_pid, i.vmm_start_time) = (None, None); // its QEMU is gone
                        out.insert(i.sandbox_id.clone(), i);
                    }
                }
            }
        }
        out.into_values().collect()
    }

    fn create_blocking(&self, req: &InstanceRequest, ip: Ipv4Addr) -> Result<Instance, ProviderError> {
        let s = &self.settings;
        let want_dir = self.run_dir(&req.sandbox_id);
        if req.run_dir != want_dir {
            return Err(perr(format!(
                "run directory {} is not {} (<run root>/<sandbox id>)",
                req.run_dir.display(),
                want_dir.display()
            )));
        }
        if req.instance_type.vcpus == 0 || req.instance_type.memory_mib < 128 {
            return Err(perr(format!("instance type {:?} is too small for a podvm", req.instance_type)));
        }
        std::fs::create_dir_all(&req.run_dir).map_err(|e| perr(format!("create {}: {e}", req.run_dir.display())))?;
        let mac = bridge::podvm_mac(ip);
        let mut user_data = req.user_data.clone();
        user_data.network = Some(UnderlayNetwork {
            mac: mac.clone(),
            address: s.bridge.podvm_cidr(ip),
            gateway: s.bridge.address.to_string(),
        });
        let json = serde_json::to_vec(&user_data).map_err(|e| perr(format!("serialize the user data: {e}")))?;
        if json.len() > USER_DATA_MAX {
            return Err(perr(format!(
                "the user data of podvm {} is {} bytes; the agent reads at most {USER_DATA_MAX}",
                req.name,
                json.len()
            )));
        }
        write_private(&cmdline::user_data_path(&req.run_dir), &json)?;

        bridge::ensure_bridge(&s.bridge).map_err(|e| perr(e.0))?;
        let tap_name = s.bridge.tap_name(ip);
        let tap = bridge::create_tap(&s.bridge, &tap_name).map_err(|e| perr(e.0))?;

        let spec = PodvmSpec {
            name: req.name.clone(),
            sandbox_id: req.sandbox_id.clone(),
            owner: s.owner.clone(),
            accel: self.accel.clone(),
            vcpus: req.instance_type.vcpus,
            memory_mib: req.instance_type.memory_mib,
            kernel: s.kernel.clone(),
            initrd: s.initrd.clone(),
            insecure_registries: s.insecure_registries.clone(),
            debug: s.debug,
            ip,
            mac,
            run_dir: req.run_dir.clone(),
        };
        let (pid, start_time) = spawn_qemu(&s.qemu, &spec, tap)?;
        let instance = Instance {
            id: req.name.clone(),
            sandbox_id: req.sandbox_id.clone(),
            ip: IpAddr::V4(ip),
            vmm_pid: Some(pid),
            vmm_start_time: Some(start_time),
            tags: req.tags.clone(),
        };
        let record = serde_json::to_vec(&instance).map_err(|e| perr(format!("serialize the instance: {e}")))?;
        write_private(&req.run_dir.join(INSTANCE_FILE), &record)?;
        Ok(instance)
    }

    fn delete_blocking(&self, instance: &Instance) -> Result<(), ProviderError> {
        if let (Some(pid), Some(start)) = (instance.vmm_pid, instance.vmm_start_time) {
            if procfs::stat(pid).is_some_and(|st| st.start_time == start && st.state != 'Z')
                && procfs::cmdline(pid).is_some_and(|a| {
                    cmdline::parse_markers(&a, &self.settings.owner).is_some_and(|m| m.1 == instance.sandbox_id)
                })
            {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
                let deadline = Instant::now() + KILL_WAIT;
                while procfs::stat(pid).is_some_and(|st| st.start_time == start && st.state != 'Z') {
                    if Instant::now() > deadline {
                        return Err(perr(format!(
                            "QEMU of podvm {} (pid {pid}) survived SIGKILL for {KILL_WAIT:?}",
                            instance.id
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        // The tap is not persistent: it went with QEMU's fd. (Deleting `ppt<N>` by name could hit
        // a newer podvm that got the same address after this one died.)
        let dir = self.run_dir(&instance.sandbox_id);
        for f in FILES {
            match std::fs::remove_file(dir.join(f)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(perr(format!("remove {}: {e}", dir.join(f).display()))),
            }
        }
        Ok(())
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), ProviderError> {
    let w = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
        f.write_all(data)
    };
    w().map_err(|e| perr(format!("write {}: {e}", path.display())))
}

fn read_record(run_dir: &Path) -> Option<Instance> {
    let path = run_dir.join(INSTANCE_FILE);
    if std::fs::metadata(&path).ok()?.len() > 64 * 1024 {
        return None;
    }
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Truncates `console.log` and `qemu.log` of every run directory under `root` that outgrew
/// [`LOG_LIMIT`] (QEMU writes them with `O_APPEND`, so it carries on at the new end).
pub fn bound_logs(root: &Path) {
    let Ok(dirs) = std::fs::read_dir(root) else { return };
    for d in dirs.flatten() {
        for f in ["console.log", "qemu.log"] {
            let path = d.path().join(f);
            if std::fs::metadata(&path).is_ok_and(|m| m.len() > LOG_LIMIT) {
                if let Ok(mut file) = std::fs::OpenOptions::new().write(true).open(&path) {
                    let _ = file.set_len(0);
                    let _ = writeln!(file, "[podvisor: {f} truncated after {LOG_LIMIT} bytes]");
                }
            }
        }
    }
}

/// `true` when QEMU's QMP socket at `path` sends its greeting within a second.
fn qmp_greets(path: &Path) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(path) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            return false;
        }
        got.extend_from_slice(&buf[..n]);
        if got.contains(&b'\n') || got.len() > 4096 {
            return got.windows(3).any(|w| w == b"QMP");
        }
    }
    false
}

/// Starts QEMU in its own session with the tap as fd [`cmdline::TAP_FD`], stdout appending to
/// `console.log`, stderr to `qemu.log`; waits until its QMP socket exists. Returns pid and start
/// time. A thread reaps it while this process lives; after a restart init does.
fn spawn_qemu(qemu: &Path, spec: &PodvmSpec, tap: OwnedFd) -> Result<(u32, u64), ProviderError> {
    let dir = &spec.run_dir;
    let open_log = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.join(name))
            .map_err(|e| perr(format!("open {}: {e}", dir.join(name).display())))
    };
    let (console, stderr) = (open_log("console.log")?, open_log("qemu.log")?);
    let qmp = cmdline::qmp_path(dir);
    let _ = std::fs::remove_file(&qmp);
    let mut cmd = std::process::Command::new(qemu);
    cmd.args(spec.args()).stdin(std::process::Stdio::null()).stdout(console).stderr(stderr);
    let tap_fd = tap.as_raw_fd();
    // SAFETY: setsid, fcntl and dup2 are async-signal-safe syscalls on fds open in the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if tap_fd == cmdline::TAP_FD {
                let flags = libc::fcntl(tap_fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(tap_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(tap_fd, cmdline::TAP_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child =
        cmd.spawn().map_err(|e| perr(format!("start QEMU ({}): {e}; is QEMU_PATH right?", qemu.display())))?;
    drop(tap); // QEMU holds the only copy now: the tap goes when QEMU does
    let pid = child.id();
    let deadline = Instant::now() + START_WAIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read(dir.join("qemu.log")).unwrap_or_default();
            let tail = String::from_utf8_lossy(&log[log.len().saturating_sub(2048)..]).into_owned();
            return Err(perr(format!("QEMU for podvm {} exited at start ({status}): {}", spec.name, tail.trim())));
        }
        // The QMP greeting comes from the main loop, i.e. once the machine is built: QEMU
        // that fails at initialization closes the connection instead.
        if qmp.exists() && qmp_greets(&qmp) {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(perr(format!(
                "QEMU for podvm {} did not open {} within {START_WAIT:?}",
                spec.name,
                qmp.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Some(stat) = procfs::stat(pid) else {
        let _ = child.wait();
        return Err(perr(format!("QEMU for podvm {} (pid {pid}) vanished at start", spec.name)));
    };
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok((pid, stat.start_time))
}

#[async_trait]
impl Provider for QemuProvider {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn instance_types(&self) -> Vec<InstanceType> {
        builtin_instance_types()
    }

    fn worker_address(&self) -> IpAddr {
        IpAddr::V4(self.inner.settings.bridge.address)
    }

    async fn create_instance(&self, req: InstanceRequest) -> Result<Instance, ProviderError> {
        let inner = self.inner.clone();
        blocking(move || inner.create(req)).await
    }

    async fn delete_instance(&self, instance: &Instance) -> Result<(), ProviderError> {
        let (inner, instance) = (self.inner.clone(), instance.clone());
        blocking(move || inner.delete_blocking(&instance)).await
    }

    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        let inner = self.inner.clone();
        blocking(move || Ok(inner.scan())).await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ProviderError> + Send + 'static,
) -> Result<T, ProviderError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(perr(format!("qemu provider task failed: {e}"))))
}

impl Inner {
    fn create(&self, req: InstanceRequest) -> Result<Instance, ProviderError> {
        // Pick an address: not in use by a podvm of ours (live or recorded), not reserved by a
        // creation in flight, not with a tap left by anyone.
        let ip = {
            let live = self.scan();
            if let Some(i) = live.iter().find(|i| i.sandbox_id == req.sandbox_id && i.vmm_pid.is_some()) {
                return Err(perr(format!(
                    "sandbox {} already has podvm {} (QEMU pid {}); delete it first",
                    req.sandbox_id,
                    i.id,
                    i.vmm_pid.unwrap_or(0)
                )));
            }
            let mut used: BTreeSet<IpAddr> = live.into_iter().map(|i| i.ip).collect();
            let mut reserved = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
            used.extend(reserved.iter().copied());
            loop {
                let ip = self.settings.bridge.allocate(&used).map_err(|e| perr(e.0))?;
                if bridge::link_exists(&self.settings.bridge.tap_name(ip)).map_err(|e| perr(e.0))? {
                    used.insert(IpAddr::V4(ip));
                    continue;
                }
                reserved.insert(IpAddr::V4(ip));
                break ip;
            }
        };
        let result = self.create_blocking(&req, ip);
        if result.is_err() {
            // Leaves nothing: the tap went with its fd; our files go.
            for f in FILES {
                let _ = std::fs::remove_file(req.run_dir.join(f));
            }
        }
        self.reserved.lock().unwrap_or_else(|e| e.into_inner()).remove(&IpAddr::V4(ip));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn settings_defaults_and_keys() {
        let s = QemuSettings::from_env(&BTreeMap::new(), "/run/pp".into(), "node".into()).unwrap();
        assert_eq!(s.kernel, PathBuf::from(DEFAULT_KERNEL));
        assert_eq!(s.bridge.name, "podvisor-pp0");
        assert_eq!(s.insecure_registries, ["172.31.250.1:5000"]);
        assert_eq!(s.accel, Accelerator::Auto);
        let s = QemuSettings::from_env(
            &env(&[
                ("QEMU_ACCEL", "tcg"),
                ("INSECURE_REGISTRIES", " 172.31.250.1:5000, reg:81 ,"),
                ("QEMU_BRIDGE_CIDR", "10.1.0.1/16"),
            ]),
            "/run/pp".into(),
            "node".into(),
        )
        .unwrap();
        assert_eq!(s.insecure_registries, ["10.1.0.1:5000", "172.31.250.1:5000", "reg:81"]);
        assert_eq!(s.accel, Accelerator::Tcg);
        let e = QemuSettings::from_env(&env(&[("QEMU_ACCEL", "hvf")]), "/r".into(), "n".into()).unwrap_err().0;
        assert!(e.contains("QEMU_ACCEL=\"hvf\""), "{e}");
        let e = QemuSettings::from_env(&env(&[("QEMU_BRIDGE_CIDR", "x")]), "/r".into(), "n".into()).unwrap_err().0;
        assert!(e.contains("QEMU_BRIDGE_CIDR"), "{e}");
    }

    #[test]
    fn missing_image_is_named() {
        let mut s = QemuSettings::from_env(&BTreeMap::new(), "/r".into(), "n".into()).unwrap();
        s.qemu = "/bin/sh".into();
        s.kernel = "/nonexistent/vmlinux".into();
        let e = QemuProvider::new(s).unwrap_err().0;
        assert!(e.contains("QEMU_PODVM_KERNEL=/nonexistent/vmlinux"), "{e}");
    }

    #[test]
    fn instance_types() {
        let t = builtin_instance_types();
        let got: Vec<_> = t.iter().map(|t| (t.name.as_str(), t.vcpus, t.memory_mib)).collect();
        assert_eq!(got, [("small", 1, 512), ("medium", 2, 1024), ("large", 4, 2048)]);
    }

    #[test]
    fn logs_are_bounded() {
        let root = std::env::temp_dir().join(format!("podvisor-logs-{}", std::process::id()));
        std::fs::create_dir_all(root.join("sb")).unwrap();
        std::fs::write(root.join("sb/console.log"), vec![b'x'; LOG_LIMIT as usize + 1]).unwrap();
        std::fs::write(root.join("sb/qemu.log"), b"small").unwrap();
        bound_logs(&root);
        let c = std::fs::read_to_string(root.join("sb/console.log")).unwrap();
        let q = std::fs::read_to_string(root.join("sb/qemu.log")).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert!(c.starts_with("[podvisor: console.log truncated") && c.len() < 100, "{c}");
        assert_eq!(q, "small");
    }
}
