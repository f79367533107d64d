//! Peer pods (runtime class `kata-remote`) for end-to-end tests: the remote hypervisor service
//! `podvisor-remote-hypervisor` as a private daemon ([`RemoteHypervisor`]: env file, socket and
//! podvm state directory under `/tmp/podvisor-pp-<pid>-<n>/`, provider `qemu` booting the built
//! guest image), the shim configuration for it ([`remote_kata_config`], from
//! `configs/configuration-remote.toml`), and [`PeerPods`]: a private registry holding the
//! busybox test image, the service, and a private containerd (CRI) or CRI-O with a `kata-remote`
//! handler next to the usual `kata` one (the project's `configs/containerd-kata-remote.toml` and
//! `configs/crio-50-kata-remote.conf` with the test's paths), so that a peer pod and a local pod
//! run on the same node.
//!
//! [`wire`] holds a hand-written codec of ttrpc frames and the few protobuf messages of Kata's
//! remote hypervisor API, for the wire compatibility tests (written from the protocol's
//! definition, independent of the `ttrpc` and `protobuf` crates the shim and the service use).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::cri::{proto, Cri, CriExtras, Manager, Pod};
use crate::registry::TestRegistry;
use crate::{leaks, registry};

/// The CRI runtime handler (and RuntimeClass) of peer pods.
pub const HANDLER: &str = "kata-remote";
/// The service binary's name.
pub const SERVICE: &str = "podvisor-remote-hypervisor";
/// The prefix of every private service directory.
pub const DIR_PREFIX: &str = "/tmp/podvisor-pp-";
/// The text of the service's limit error (its start; the contract's wording).
pub const LIMIT_MESSAGE: &str = "peer pod limit reached: PEERPODS_LIMIT_PER_NODE=";

/// The newer of `target/{release,debug}/<name>` (`$PODVISOR_<VAR>` overrides); panics with the
/// build command when neither exists.
fn built_binary(name: &str, env: &str, build: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env}={} does not exist", p.display());
        return p;
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| crate::workspace().join("target"));
    let mut found: Vec<(PathBuf, std::time::SystemTime)> = ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join(name))
        .filter_map(|p| fs::metadata(&p).and_then(|m| m.modified()).ok().map(|t| (p, t)))
        .collect();
    found.sort_by_key(|(_, t)| *t);
    match found.pop() {
        Some((p, _)) => p,
        None => panic!("{}/{{release,debug}}/{name} is missing: run `{build}` first", target.display()),
    }
}

/// The service binary: `$PODVISOR_REMOTE_HYPERVISOR` or the newer of
/// `target/{release,debug}/podvisor-remote-hypervisor`.
pub fn service_binary() -> PathBuf {
    built_binary(SERVICE, "PODVISOR_REMOTE_HYPERVISOR", "cargo build -p podvisor-remote-hypervisor")
}

/// The agent binary for test mode on the host: `$PODVISOR_TEST_AGENT` or the release build the
/// guest image is made from (`target/x86_64-unknown-linux-gnu/release/kata-agent`).
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PODVISOR_TEST_AGENT").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let p = crate::workspace().join("target/x86_64-unknown-linux-gnu/release/kata-agent");
    assert!(p.is_file(), "the agent binary {} is missing: run `make guest-image` (or `make agent`) first", p.display());
    p
}

/// The shim configuration for peer pods: `configs/configuration-remote.toml` with
/// `remote_hypervisor_socket` set to `socket`, then changed by `edit`.
pub fn remote_kata_config(socket: &Path, edit: impl FnOnce(&mut toml::Table)) -> String {
    let src = crate::workspace().join("configs/configuration-remote.toml");
    let text = fs::read_to_string(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let mut config: toml::Table = text.parse().unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    remote_section(&mut config).insert("remote_hypervisor_socket".into(), socket.display().to_string().into());
    edit(&mut config);
    format!("# Written by podvisor-tests from {}\n{}", src.display(), toml::to_string(&config).expect("serialize"))
}

/// The `[hypervisor.remote]` table of a configuration.
pub fn remote_section(config: &mut toml::Table) -> &mut toml::Table {
    let hv = config.entry("hypervisor").or_insert_with(|| toml::Value::Table(Default::default()));
    let hv = hv.as_table_mut().expect("[hypervisor] is a table");
    let r = hv.entry("remote").or_insert_with(|| toml::Value::Table(Default::default()));
    r.as_table_mut().expect("[hypervisor.remote] is a table")
}

/// What the service is started with (its env file, shaped like the manual's `peer-pods-cm`).
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// `PEERPODS_LIMIT_PER_NODE`.
    pub limit: u32,
    /// `INSECURE_REGISTRIES` (plain-HTTP registries the podvms may pull from).
    pub insecure_registries: Vec<String>,
    /// Further `KEY=value` lines.
    pub extra: Vec<(String, String)>,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings { limit: 10, insecure_registries: Vec::new(), extra: Vec::new() }
    }
}

/// The env file text: `CLOUD_PROVIDER=qemu`, the limit, the instance type `small`, the built
/// guest image as the podvm image, the insecure registries and `extra`.
pub fn env_file_text(settings: &ServiceSettings) -> String {
    let mut lines = vec![
        "# Written by podvisor-tests (peerpods.rs), shaped like the manual's peer-pods-cm.".to_string(),
        "CLOUD_PROVIDER=qemu".into(),
        format!("PEERPODS_LIMIT_PER_NODE={}", settings.limit),
        "PODVM_INSTANCE_TYPE=small".into(),
        format!("QEMU_PODVM_KERNEL={}", crate::guest_asset("vmlinux.container").display()),
        format!("QEMU_PODVM_INITRD={}", crate::guest_asset("kata-containers-initrd.img").display()),
    ];
    if !settings.insecure_registries.is_empty() {
        lines.push(format!("INSECURE_REGISTRIES={}", settings.insecure_registries.join(",")));
    }
    lines.extend(settings.extra.iter().map(|(k, v)| format!("{k}={v}")));
    lines.join("\n") + "\n"
}

/// What the service keeps of one podvm (`<state dir>/<sandbox id>/state.json`), read without
/// assuming more of its layout than the contract says: pids are the numbers under keys ending
/// in `pid`, host devices the strings under keys naming a tap or VXLAN device.
#[derive(Debug, Clone)]
pub struct PodvmState {
    /// The sandbox id (the directory's name).
    pub id: String,
    /// `<state dir>/<id>`.
    pub dir: PathBuf,
    /// `state.json` as read.
    pub json: serde_json::Value,
}

impl PodvmState {
    fn walk<'a>(v: &'a serde_json::Value, key: &str, out: &mut Vec<(String, &'a serde_json::Value)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    Self::walk(v, &format!("{key}.{k}"), out);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    Self::walk(v, &format!("{key}[{i}]"), out);
                }
            }
            other => out.push((key.to_ascii_lowercase(), other)),
        }
    }

    fn leaves(&self) -> Vec<(String, &serde_json::Value)> {
        let mut out = Vec::new();
        Self::walk(&self.json, "", &mut out);
        out
    }

    /// Every `(key, pid)` of the state.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.leaves()
            .into_iter()
            .filter(|(k, _)| k.ends_with("pid"))
            .filter_map(|(k, v)| v.as_u64().map(|p| (k, p as u32)))
            .collect()
    }

    /// The VMM's (QEMU's) pid.
    pub fn vmm_pid(&self) -> Option<u32> {
        let pids = self.pids();
        pids.iter()
            .find(|(k, _)| k.contains("qemu") || k.contains("vmm"))
            .or_else(|| pids.iter().find(|(k, _)| !k.contains("proxy")))
            .map(|(_, p)| *p)
    }

    /// The per-pod proxy's pid.
    pub fn proxy_pid(&self) -> Option<u32> {
        self.pids().into_iter().find(|(k, _)| k.contains("proxy")).map(|(_, p)| p)
    }

    /// Host network devices of the podvm (tap, VXLAN; `tunnel.devices` in the service's
    /// state) named in the state.
    pub fn devices(&self) -> Vec<String> {
        self.leaves()
            .into_iter()
            .filter(|(k, _)| k.contains("tap") || k.contains("vxlan") || k.contains("device"))
            .filter_map(|(_, v)| v.as_str().map(String::from))
            // The pod-side names live in the pod's network namespace, not on the host.
            .filter(|s| !s.is_empty() && !s.contains('/') && s != "vxlan0" && s != "eth0")
            .collect()
    }

    /// The podvm's IP on the bridge.
    pub fn podvm_ip(&self) -> Option<String> {
        self.leaves()
            .into_iter()
            .find(|(k, v)| k.ends_with("ip") && v.as_str().is_some_and(|s| s.parse::<std::net::IpAddr>().is_ok()))
            .and_then(|(_, v)| v.as_str().map(String::from))
    }

    /// The proxy's socket (`agentSocketPath`).
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// What is still there of this podvm after it should have been destroyed: its directory,
    /// live processes (its pids, anything naming the sandbox id), host devices.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        if self.dir.exists() {
            found.push(format!("podvm state directory {}", self.dir.display()));
        }
        for (what, pid) in self.pids() {
            if crate::alive(pid) {
                found.push(format!("podvm process {pid} ({what}): {}", cmdline(pid)));
            }
        }
        for p in leaks::processes() {
            if leaks::mentions(&p.cmdline, &self.id) && (p.argv0.contains("qemu") || p.cmdline.contains(SERVICE)) {
                found.push(format!("process {} naming podvm {}: {}", p.pid, self.id, p.cmdline));
            }
        }
        for d in self.devices() {
            if Path::new("/sys/class/net").join(&d).exists() {
                found.push(format!("host network device {d} of podvm {}", self.id));
            }
        }
        found.sort();
        found.dedup();
        found
    }
}

fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline")).map(|b| String::from_utf8_lossy(&b).replace('\0', " ")).unwrap_or_default()
}

/// A private `podvisor-remote-hypervisor serve` (see the module documentation).
pub struct RemoteHypervisor {
    dir: PathBuf,
    binary: PathBuf,
    child: Option<Child>,
    settings: ServiceSettings,
    /// Sandbox ids of podvms seen, for the leak check on drop.
    seen: std::sync::Mutex<BTreeMap<String, PodvmState>>,
    /// [`LOCK_FILE`], locked for its life (dropped after the teardown).
    _lock: fs::File,
}

/// Serializes services across tests and test processes: they share the bridge `podvisor-pp0`
/// and its addresses (two services would hand out the same podvm IPs).
pub const LOCK_FILE: &str = "/tmp/podvisor-pp.lock";

fn lock_exclusive() -> Result<fs::File, String> {
    use std::os::fd::AsRawFd;
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .map_err(|e| format!("{LOCK_FILE}: {e}"))?;
    let t = Instant::now();
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!("flock {LOCK_FILE}: {}", std::io::Error::last_os_error()));
    }
    if t.elapsed() > Duration::from_secs(1) {
        eprintln!("waited {:.1} s for another peer pod service to finish ({LOCK_FILE})", t.elapsed().as_secs_f64());
    }
    Ok(f)
}

impl RemoteHypervisor {
    /// Starts one (panics with its log on failure).
    pub fn start(settings: ServiceSettings) -> Self {
        Self::try_start(settings).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Writes the env file and starts the service; waits until its socket accepts.
    pub fn try_start(settings: ServiceSettings) -> Result<Self, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let binary = service_binary();
        let lock = lock_exclusive()?;
        leaks::reap_stale_dirs(DIR_PREFIX, |p| p.argv0.contains(SERVICE) || p.argv0.contains("qemu-system"));
        let dir = PathBuf::from(format!("{DIR_PREFIX}{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("podvms")).map_err(|e| format!("{}: {e}", dir.display()))?;
        let env = dir.join("peer-pods-cm.env");
        fs::write(&env, env_file_text(&settings)).map_err(|e| format!("{}: {e}", env.display()))?;
        let mut me = RemoteHypervisor { dir, binary, child: None, settings, seen: Default::default(), _lock: lock };
        me.spawn()?;
        Ok(me)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .map_err(|e| format!("{}: {e}", self.log_file().display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let _ = fs::remove_file(self.socket());
        let mut cmd = Command::new(&self.binary);
        cmd.arg("serve")
            .arg("--config")
            .arg(self.env_file())
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .current_dir(&self.dir)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; the service goes when the thread that started it
        // does (a crashed test). Its podvms outlive it by design (own sessions); teardown
        // removes them.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| format!("{}: {e}", self.binary.display()))?;
        let log_file = self.log_file();
        let logs = || crate::containerd::log_tail(&log_file, 40);
        let r = crate::wait_for_socket(&mut child, &self.socket(), SERVICE, Duration::from_secs(30), logs);
        if let Err(e) = r {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        self.child = Some(child);
        Ok(())
    }

    /// Its private directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The env file (`--config`).
    pub fn env_file(&self) -> PathBuf {
        self.dir.join("peer-pods-cm.env")
    }

    /// The ttrpc socket (`--socket`).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("hypervisor.sock")
    }

    /// The podvm state directory (`--state-dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("podvms")
    }

    /// Its log (stdout and stderr).
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("service.log")
    }

    /// The log's tail for assertion messages.
    pub fn logs_tail(&self, n: usize) -> String {
        crate::containerd::log_tail(&self.log_file(), n)
    }

    /// The settings it was started with.
    pub fn settings(&self) -> &ServiceSettings {
        &self.settings
    }

    /// The service's pid (None while stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The podvms in its state directory (each recorded for the leak check on drop).
    pub fn podvms(&self) -> Vec<PodvmState> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.state_dir()).into_iter().flatten().flatten() {
            if let Some(s) = self.podvm(&e.file_name().to_string_lossy()) {
                out.push(s);
            }
        }
        out
    }

    /// The podvm of sandbox `id`, if its state directory has a readable `state.json`.
    pub fn podvm(&self, id: &str) -> Option<PodvmState> {
        let dir = self.state_dir().join(id);
        let json = fs::read(dir.join("state.json")).ok().and_then(|b| serde_json::from_slice(&b).ok())?;
        let s = PodvmState { id: id.into(), dir, json };
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(id.into(), s.clone());
        Some(s)
    }

    /// Where the console and QEMU logs of podvm `id` are kept after the service removed its
    /// run directory ([`Self::keep_logs`]).
    pub fn saved_logs(&self, id: &str) -> PathBuf {
        self.dir.join("saved").join(id)
    }

    /// Copies podvm `id`'s `console.log`, `qemu.log` and `proxy.log` to [`Self::saved_logs`] every 200 ms
    /// while its run directory exists (the service removes it with the podvm), so that a
    /// failure can show why a podvm died.
    pub fn keep_logs(&self, id: &str) {
        let (src, dst) = (self.state_dir().join(id), self.saved_logs(id));
        let _ = fs::create_dir_all(&dst);
        std::thread::spawn(move || {
            let mut seen = false;
            for _ in 0..(30 * 60 * 5) {
                if !src.exists() {
                    if seen {
                        return;
                    }
                } else {
                    seen = true;
                    for f in ["console.log", "qemu.log", "proxy.log"] {
                        if let Ok(b) = fs::read(src.join(f)) {
                            let _ = fs::write(dst.join(f), b);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    }

    /// The last `n` lines of the kept console log of podvm `id`.
    pub fn podvm_console_tail(&self, id: &str, n: usize) -> String {
        let p = self.saved_logs(id).join("console.log");
        let text = fs::read_to_string(&p).unwrap_or_else(|e| format!("({}: {e})", p.display()));
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- last {n} lines of podvm {id}'s console ---\n{}\n---",
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }

    /// Waits (up to 10 s) until the podvm of `id` has a state with a live VMM.
    pub fn wait_podvm(&self, id: &str) -> PodvmState {
        self.keep_logs(id);
        crate::poll(Duration::from_secs(10), &format!("podvm state of sandbox {id}"), || {
            let s = self
                .podvm(id)
                .ok_or_else(|| format!("no {}/{id}/state.json\n{}", self.state_dir().display(), self.logs_tail(20)))?;
            match s.vmm_pid() {
                Some(p) if crate::alive(p) => Ok(s),
                other => Err(format!("VMM pid {other:?} not alive in {}", s.json)),
            }
        })
    }

    /// Stops the service with `signal` (SIGTERM: a clean stop; SIGKILL: a crash); its podvms
    /// run on. Returns what went wrong (it had exited, or ignored SIGTERM for 10 s).
    pub fn stop_with(&mut self, signal: nix::sys::signal::Signal) -> Vec<String> {
        let Some(mut child) = self.child.take() else { return vec![] };
        let log = self.log_file();
        crate::signal_daemon(&mut child, SERVICE, signal, || crate::containerd::log_tail(&log, 30))
    }

    /// Starts it again on the same env file, socket and state directory (after
    /// [`Self::stop_with`]).
    pub fn start_again(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Err("the service is still running".into());
        }
        self.spawn()
    }

    /// SIGTERM, then a new process on the same files, as `systemctl restart` does.
    pub fn restart(&mut self) -> Result<(), String> {
        let problems = self.stop_with(nix::sys::signal::Signal::SIGTERM);
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        self.start_again()
    }

    /// Stops the service, destroys whatever podvm is left (kills its processes, deletes its
    /// devices and directory) and removes the private directory; returns what had to be
    /// cleaned up, and problems.
    pub fn teardown(&mut self) -> Vec<String> {
        let mut problems = self.stop_with(nix::sys::signal::Signal::SIGTERM);
        let _ = self.podvms();
        let seen: Vec<PodvmState> = self.seen.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for s in seen {
            let left = s.leftovers();
            if left.is_empty() {
                continue;
            }
            for (_, pid) in s.pids() {
                if crate::alive(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            for d in s.devices() {
                let _ = Command::new("ip").args(["link", "del", &d]).output();
            }
            problems.push(format!("podvm {} was left behind: {}", s.id, left.join("; ")));
        }
        let d = self.dir.to_string_lossy().into_owned();
        for p in leaks::processes() {
            if leaks::mentions(&p.cmdline, &d) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), nix::sys::signal::Signal::SIGKILL);
                problems.push(format!("process {} naming {d} was left behind: {}", p.pid, p.cmdline));
            }
        }
        leaks::unmount_under(&self.dir);
        let _ = leaks::remove_tree(&self.dir);
        problems
    }
}

impl Drop for RemoteHypervisor {
    fn drop(&mut self) {
        let problems = self.teardown();
        if !problems.is_empty() && !std::thread::panicking() {
            panic!("remote hypervisor service teardown:\n  {}", problems.join("\n  "));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The CRI side.

/// `runtime.v1.ImageSpec` with the fields PullImage needs (the shared messages lack
/// `runtime_handler`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageSpec {
    /// The image reference.
    #[prost(string, tag = "1")]
    pub image: String,
    /// Annotations.
    #[prost(map = "string, string", tag = "2")]
    pub annotations: std::collections::HashMap<String, String>,
    /// What the user wrote.
    #[prost(string, tag = "18")]
    pub user_specified_image: String,
    /// The runtime handler the image is for (CRI-O: `runtime_pull_image` handlers).
    #[prost(string, tag = "19")]
    pub runtime_handler: String,
}

/// `runtime.v1.PullImageRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageRequest {
    /// The image.
    #[prost(message, optional, tag = "1")]
    pub image: Option<PullImageSpec>,
    /// The pull secret's credentials (the kubelet's, from the pod's imagePullSecrets).
    #[prost(message, optional, tag = "2")]
    pub auth: Option<AuthConfig>,
    /// The pod the image is for (the kubelet always sends it).
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<proto::PodSandboxConfig>,
}

/// `runtime.v1.AuthConfig`, user and password only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthConfig {
    /// User.
    #[prost(string, tag = "1")]
    pub username: String,
    /// Password.
    #[prost(string, tag = "2")]
    pub password: String,
}

/// `runtime.v1.PullImageResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageResponse {
    /// The image reference the manager resolved.
    #[prost(string, tag = "1")]
    pub image_ref: String,
}

/// The configuration a manager gets for peer pods: the project's `kata-remote` snippets with
/// the test's paths, and `registry` as a plain-HTTP registry.
pub fn cri_extras(remote_config: &Path, runtime_root: &Path, registry_host: &str) -> Result<CriExtras, String> {
    let ws = crate::workspace();
    let read = |p: &str| fs::read_to_string(ws.join(p)).map_err(|e| format!("{p}: {e}"));
    // containerd: the snippet as shipped, ConfigPath replaced; its tables are its own, so it is
    // appended to the test's configuration as text.
    let ctd = read("configs/containerd-kata-remote.toml")?;
    let parsed: toml::Table = ctd.parse().map_err(|e| format!("configs/containerd-kata-remote.toml: {e}"))?;
    let shipped_path = parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"][HANDLER]["options"]
        ["ConfigPath"]
        .as_str()
        .ok_or("configs/containerd-kata-remote.toml has no kata-remote ConfigPath")?
        .to_string();
    let ctd = ctd.replace(&format!("\"{shipped_path}\""), &format!("\"{}\"", remote_config.display()));
    let containerd_config = format!(
        "\n# configs/containerd-kata-remote.toml with the test's ConfigPath (peerpods.rs)\n{ctd}\n\
         [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{registry_host}\"]\n  \
         endpoint = [\"http://{registry_host}\"]\n"
    );
    // CRI-O: the drop-in as shipped with the three paths changed (a runtime table is replaced
    // as a whole, so it is rewritten, not overridden).
    let shipped = read("configs/crio-50-kata-remote.conf")?;
    let mut t: toml::Table = shipped.parse().map_err(|e| format!("configs/crio-50-kata-remote.conf: {e}"))?;
    let h = t
        .get_mut("crio")
        .and_then(|v| v.get_mut("runtime"))
        .and_then(|v| v.get_mut("runtimes"))
        .and_then(|v| v.get_mut(HANDLER))
        .and_then(|v| v.as_table_mut())
        .ok_or("configs/crio-50-kata-remote.conf has no [crio.runtime.runtimes.kata-remote]")?;
    h.insert("runtime_path".into(), crate::containerd::shim_binary().display().to_string().into());
    h.insert("runtime_config_path".into(), remote_config.display().to_string().into());
    h.insert("runtime_root".into(), runtime_root.display().to_string().into());
    let crio_drop_in = format!(
        "# configs/crio-50-kata-remote.conf with the test's paths (peerpods.rs)\n{}",
        toml::to_string(&t).map_err(|e| e.to_string())?
    );
    let crio_registries = format!("\n[[registry]]\nlocation = \"{registry_host}\"\ninsecure = true\n");
    Ok(CriExtras { containerd_config, crio_drop_in, crio_registries })
}

/// A node with peer pods: a private registry with the busybox image, the service, and a
/// container manager with handlers `kata` and `kata-remote` (see the module documentation).
/// Dropped in this order: the manager (removing pods still there), the service (failing on a
/// podvm left behind), the registry.
pub struct PeerPods {
    /// The container manager and its CRI.
    pub cri: Cri,
    /// The remote hypervisor service.
    pub service: RemoteHypervisor,
    /// The registry the podvms pull from.
    pub registry: TestRegistry,
    remote_config: PathBuf,
    /// The registry wants credentials: the kubelet sends them with PullImage, the service puts
    /// them in the podvms' user data (`REGISTRY_AUTH_FILE`).
    private_registry: bool,
}

impl PeerPods {
    /// Starts a node for `manager` whose service allows `limit` podvms.
    pub fn start(manager: Manager, limit: u32) -> Self {
        Self::try_start(manager, limit).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::start`] that returns errors.
    pub fn try_start(manager: Manager, limit: u32) -> Result<Self, String> {
        Self::try_start_opts(manager, limit, false)
    }

    /// [`Self::start`] with a registry that requires credentials: the kubelet's PullImage
    /// carries them, and the service's `REGISTRY_AUTH_FILE` gives them to every podvm.
    pub fn start_with_private_registry(manager: Manager) -> Self {
        Self::try_start_opts(manager, 10, true).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start_opts(manager: Manager, limit: u32, private_registry: bool) -> Result<Self, String> {
        manager.available()?;
        let registry = if private_registry { TestRegistry::try_start_with_auth()? } else { TestRegistry::try_start()? };
        registry.push_busybox()?;
        let mut extra = vec![];
        if private_registry {
            let file = registry.dir().join("auth.json");
            fs::write(&file, registry.auth_json()).map_err(|e| format!("{}: {e}", file.display()))?;
            extra.push(("REGISTRY_AUTH_FILE".to_string(), file.display().to_string()));
        }
        let settings = ServiceSettings { limit, insecure_registries: vec![registry.podvm_host()], extra };
        let service = RemoteHypervisor::try_start(settings)?;
        let remote_config = service.dir().join("configuration-remote.toml");
        let text = remote_kata_config(&service.socket(), |c| {
            // The smallest podvm (1 vCPU, 512 MiB): the shim always sends its default_vcpus and
            // default_memory (2048 MiB would pick `large`), an explicit instance type wins.
            remote_section(c).insert("machine_type".into(), "small".into());
            let agent = c.entry("agent").or_insert_with(|| toml::Value::Table(Default::default()));
            if let Some(k) = agent.as_table_mut().and_then(|a| a.get_mut("kata")).and_then(|k| k.as_table_mut()) {
                k.insert("enable_debug".into(), true.into());
            }
        });
        fs::write(&remote_config, text).map_err(|e| format!("{}: {e}", remote_config.display()))?;
        let runtime_root = service.dir().join("vc-remote");
        fs::create_dir_all(&runtime_root).map_err(|e| format!("{}: {e}", runtime_root.display()))?;
        let extras = cri_extras(&remote_config, &runtime_root, &registry.podvm_host())?;
        let cri = Cri::try_start_with(manager, &extras)?;
        Ok(PeerPods { cri, service, registry, remote_config, private_registry })
    }

    /// The shim configuration of the `kata-remote` handler.
    pub fn remote_config(&self) -> &Path {
        &self.remote_config
    }

    /// The busybox image as podvms pull it.
    pub fn image(&self) -> String {
        self.registry.podvm_reference()
    }

    /// Logs of the manager (shim included), the service and the registry, for failures.
    pub fn logs(&self) -> String {
        format!("{}\n{}\n{}", self.cri.logs(), self.service.logs_tail(30), self.registry.logs_tail(10))
    }

    /// `RunPodSandbox` with handler `kata-remote`.
    pub fn try_run_remote_pod(&self, name: &str) -> Result<Pod, String> {
        let config = self.cri.pod_config(name);
        self.cri.try_run_pod_with_handler(&config, HANDLER).map_err(|e| format!("{e}\n{}", self.service.logs_tail(30)))
    }

    /// [`Self::try_run_remote_pod`], panicking with the logs.
    pub fn run_remote_pod(&self, name: &str) -> Pod {
        self.try_run_remote_pod(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The kubelet's `PullImage` of the podvm image for `pod` (with its sandbox configuration
    /// and runtime handler, as the kubelet sends them); returns the image ref.
    pub fn pull_image(&self, pod: &Pod, handler: &str) -> Result<String, String> {
        let image = self.image();
        let req = PullImageRequest {
            image: Some(PullImageSpec {
                image: image.clone(),
                user_specified_image: image.clone(),
                runtime_handler: handler.into(),
                ..Default::default()
            }),
            auth: self.private_registry.then(|| AuthConfig {
                username: crate::registry::AUTH_USER.into(),
                password: crate::registry::AUTH_PASSWORD.into(),
            }),
            sandbox_config: Some(pod.config.clone()),
        };
        let resp: PullImageResponse = self
            .cri
            .block_on(self.cri.client().call("/runtime.v1.ImageService/PullImage", req))
            .map_err(|e| format!("PullImage {image}: {e}\n{}", self.logs()))?;
        Ok(resp.image_ref)
    }

    /// A busybox container configuration whose image is the registry's ([`Self::image`]).
    pub fn container_config(&self, name: &str, args: &[&str]) -> proto::ContainerConfig {
        let mut c = self.cri.container_config(name, args);
        let image = self.image();
        c.image = Some(proto::ImageSpec { image: image.clone(), user_specified_image: image, ..Default::default() });
        c
    }

    /// PullImage, CreateContainer and StartContainer of `config` in peer pod `pod`, as the
    /// kubelet does; returns the container id and the time the pull took. A failure shows the
    /// manager's, the service's and the podvm console's logs.
    pub fn run_container(&self, pod: &Pod, config: &proto::ContainerConfig) -> (String, Duration) {
        let t = Instant::now();
        self.pull_image(pod, HANDLER)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.service.podvm_console_tail(&pod.id, 30)));
        let pulled = t.elapsed();
        self.cri.prepare_container(&pod.config, config);
        let fail = |what: &str, e: String| -> ! {
            panic!("{what}: {e}\n{}\n{}", self.logs(), self.service.podvm_console_tail(&pod.id, 40))
        };
        let id = self
            .cri
            .block_on(self.cri.client().create_container(&pod.id, config, &pod.config))
            .unwrap_or_else(|e| fail("CreateContainer", e));
        self.cri.adopt_container(&pod.id, &id);
        self.cri.block_on(self.cri.client().start_container(&id)).unwrap_or_else(|e| fail("StartContainer", e));
        (id, pulled)
    }

    /// Removes peer pod `pod` through the CRI (the harness's checks included) and asserts that
    /// its podvm is gone: no state directory, no VMM or proxy process, no host device, no
    /// agent socket.
    pub fn remove_pod(&self, pod: &Pod, podvm: &PodvmState) {
        self.cri.remove_pod(pod);
        let left = leaks::settle(leaks::GRACE, || podvm.leftovers());
        assert!(
            left.is_empty(),
            "the podvm of removed pod {} is left:\n  {}\n{}",
            pod.id,
            left.join("\n  "),
            self.logs()
        );
        assert!(!podvm.agent_socket().exists(), "{} is left", podvm.agent_socket().display());
    }
}

/// The host's network device names.
pub fn host_links() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The bridge address podvms reach the worker at (the registry's host).
pub fn bridge_address() -> &'static str {
    registry::BRIDGE_ADDRESS
}

// ---------------------------------------------------------------------------------------------
// The wire: ttrpc frames and protobuf by hand.

/// A hand-written codec of ttrpc frames and of the protobuf messages of Kata's remote
/// hypervisor API, from the protocols' definitions:
///
/// - a frame is a 10-byte header (u32 big-endian payload length, u32 big-endian stream id, u8
///   type: 1 request, 2 response; u8 flags) and the payload;
/// - a request payload is `ttrpc.Request{service = 1, method = 2, payload = 3, timeout_nano =
///   4, metadata = 5 (KeyValue{key = 1, value = 2})}`; a response payload is
///   `ttrpc.Response{status = 1 (google.rpc.Status{code = 1, message = 2}), payload = 2}`;
/// - `remote.CreateVMRequest{id = 1, annotations = 2 (map entries {key = 1, value = 2}),
///   networkNamespacePath = 3}` → `CreateVMResponse{agentSocketPath = 1}`; `StartVMRequest`,
///   `StopVMRequest{id = 1}`; `VersionRequest`/`VersionResponse{version = 1}`.
pub mod wire {
    use std::collections::BTreeMap;
    use std::io::{Read, Write};

    /// Frame type of a request.
    pub const REQUEST: u8 = 1;
    /// Frame type of a response.
    pub const RESPONSE: u8 = 2;
    /// The largest payload accepted (ttrpc's default limit, 4 MiB).
    pub const MAX_PAYLOAD: usize = 4 << 20;

    /// One ttrpc frame.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Frame {
        /// Stream id (odd: client-initiated).
        pub stream: u32,
        /// [`REQUEST`] or [`RESPONSE`] (others are passed through).
        pub kind: u8,
        /// Flags.
        pub flags: u8,
        /// The payload.
        pub payload: Vec<u8>,
    }

    /// Reads one frame; `Ok(None)` at a clean end of stream.
    pub fn read_frame(r: &mut impl Read) -> std::io::Result<Option<Frame>> {
        let mut h = [0u8; 10];
        let mut got = 0;
        while got < h.len() {
            match r.read(&mut h[got..])? {
                0 if got == 0 => return Ok(None),
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => got += n,
            }
        }
        let len = u32::from_be_bytes(h[0..4].try_into().unwrap()) as usize;
        if len > MAX_PAYLOAD {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {len} bytes")));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        Ok(Some(Frame { stream: u32::from_be_bytes(h[4..8].try_into().unwrap()), kind: h[8], flags: h[9], payload }))
    }

    /// Writes one frame.
    pub fn write_frame(w: &mut impl Write, f: &Frame) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(10 + f.payload.len());
        out.extend_from_slice(&(f.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&f.stream.to_be_bytes());
        out.push(f.kind);
        out.push(f.flags);
        out.extend_from_slice(&f.payload);
        w.write_all(&out)
    }

    /// A protobuf field value: a varint, or length-delimited bytes (fixed-width fields are
    /// kept as their bytes).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Value {
        /// Wire type 0.
        Varint(u64),
        /// Wire type 2 (strings, bytes, messages, map entries).
        Bytes(Vec<u8>),
        /// Wire types 1 and 5.
        Fixed(Vec<u8>),
    }

    fn varint(b: &[u8], at: &mut usize) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*at).ok_or("truncated varint")?;
            *at += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    /// Decodes a message into `(field number, value)` in wire order.
    pub fn decode(b: &[u8]) -> Result<Vec<(u32, Value)>, String> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < b.len() {
            let key = varint(b, &mut at)?;
            let (field, wt) = ((key >> 3) as u32, key & 7);
            let v = match wt {
                0 => Value::Varint(varint(b, &mut at)?),
                2 => {
                    let len = varint(b, &mut at)? as usize;
                    let end = at.checked_add(len).filter(|e| *e <= b.len()).ok_or("truncated field")?;
                    let v = b[at..end].to_vec();
                    at = end;
                    Value::Bytes(v)
                }
                1 | 5 => {
                    let n = if wt == 1 { 8 } else { 4 };
                    let end = at.checked_add(n).filter(|e| *e <= b.len()).ok_or("truncated fixed field")?;
                    let v = b[at..end].to_vec();
                    at = end;
                    Value::Fixed(v)
                }
                other => return Err(format!("field {field}: unsupported wire type {other}")),
            };
            out.push((field, v));
        }
        Ok(out)
    }

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// Appends a length-delimited field.
    pub fn put_bytes(out: &mut Vec<u8>, field: u32, data: &[u8]) {
        put_varint(out, (u64::from(field) << 3) | 2);
        put_varint(out, data.len() as u64);
        out.extend_from_slice(data);
    }

    /// Appends a varint field.
    pub fn put_uint(out: &mut Vec<u8>, field: u32, v: u64) {
        put_varint(out, u64::from(field) << 3);
        put_varint(out, v);
    }

    /// The last string of field `n` (proto3: the last one wins), or "".
    pub fn string(fields: &[(u32, Value)], n: u32) -> String {
        fields
            .iter()
            .rev()
            .find_map(|(f, v)| match v {
                Value::Bytes(b) if *f == n => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Every bytes value of field `n`.
    pub fn all_bytes(fields: &[(u32, Value)], n: u32) -> Vec<Vec<u8>> {
        fields
            .iter()
            .filter_map(|(f, v)| match v {
                Value::Bytes(b) if *f == n => Some(b.clone()),
                _ => None,
            })
            .collect()
    }

    /// A decoded `ttrpc.Request`.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct Request {
        /// `remote.Hypervisor`, `grpc.AgentService`, ...
        pub service: String,
        /// `CreateVM`, ...
        pub method: String,
        /// The method's request message.
        pub payload: Vec<u8>,
        /// `timeout_nano` (0: none).
        pub timeout_nano: i64,
        /// Metadata (key, value).
        pub metadata: Vec<(String, String)>,
    }

    /// Decodes a request frame's payload.
    pub fn decode_request(payload: &[u8]) -> Result<Request, String> {
        let f = decode(payload)?;
        let mut r = Request { service: string(&f, 1), method: string(&f, 2), ..Default::default() };
        r.payload = all_bytes(&f, 3).pop().unwrap_or_default();
        r.timeout_nano = f
            .iter()
            .rev()
            .find_map(|(n, v)| match v {
                Value::Varint(x) if *n == 4 => Some(*x as i64),
                _ => None,
            })
            .unwrap_or(0);
        for kv in all_bytes(&f, 5) {
            let kv = decode(&kv)?;
            r.metadata.push((string(&kv, 1), string(&kv, 2)));
        }
        Ok(r)
    }

    /// Encodes a request (the client side of the wire test against the service).
    pub fn encode_request(service: &str, method: &str, payload: &[u8], timeout_nano: u64) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, 1, service.as_bytes());
        put_bytes(&mut out, 2, method.as_bytes());
        put_bytes(&mut out, 3, payload);
        if timeout_nano > 0 {
            put_uint(&mut out, 4, timeout_nano);
        }
        out
    }

    /// Encodes a response: `Ok(payload)` or `Err((code, message))` as a `google.rpc.Status`.
    pub fn encode_response(result: Result<&[u8], (u32, &str)>) -> Vec<u8> {
        let mut out = Vec::new();
        match result {
            Ok(payload) => {
                put_bytes(&mut out, 1, &[]);
                put_bytes(&mut out, 2, payload);
            }
            Err((code, message)) => {
                let mut status = Vec::new();
                put_uint(&mut status, 1, u64::from(code));
                put_bytes(&mut status, 2, message.as_bytes());
                put_bytes(&mut out, 1, &status);
            }
        }
        out
    }

    /// A decoded `ttrpc.Response`: `Ok(payload)` or `Err((code, message))`.
    pub fn decode_response(payload: &[u8]) -> Result<Result<Vec<u8>, (u64, String)>, String> {
        let f = decode(payload)?;
        if let Some(status) = all_bytes(&f, 1).pop() {
            let s = decode(&status)?;
            let code = s
                .iter()
                .rev()
                .find_map(|(n, v)| match v {
                    Value::Varint(x) if *n == 1 => Some(*x),
                    _ => None,
                })
                .unwrap_or(0);
            if code != 0 {
                return Ok(Err((code, string(&s, 2))));
            }
        }
        Ok(Ok(all_bytes(&f, 2).pop().unwrap_or_default()))
    }

    /// A decoded `remote.CreateVMRequest`.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct CreateVm {
        /// `id`.
        pub id: String,
        /// `annotations`.
        pub annotations: BTreeMap<String, String>,
        /// `networkNamespacePath`.
        pub network_namespace_path: String,
    }

    /// Decodes `remote.CreateVMRequest`.
    pub fn decode_create_vm(payload: &[u8]) -> Result<CreateVm, String> {
        let f = decode(payload)?;
        let mut c = CreateVm { id: string(&f, 1), network_namespace_path: string(&f, 3), ..Default::default() };
        for entry in all_bytes(&f, 2) {
            let e = decode(&entry)?;
            c.annotations.insert(string(&e, 1), string(&e, 2));
        }
        Ok(c)
    }

    /// Encodes `remote.CreateVMRequest`.
    pub fn encode_create_vm(c: &CreateVm) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, 1, c.id.as_bytes());
        for (k, v) in &c.annotations {
            let mut e = Vec::new();
            put_bytes(&mut e, 1, k.as_bytes());
            put_bytes(&mut e, 2, v.as_bytes());
            put_bytes(&mut out, 2, &e);
        }
        if !c.network_namespace_path.is_empty() {
            put_bytes(&mut out, 3, c.network_namespace_path.as_bytes());
        }
        out
    }

    /// A message of one string field 1 (`StartVMRequest`, `StopVMRequest`, `VersionRequest`,
    /// `CreateVMResponse`, `VersionResponse`).
    pub fn encode_string1(s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if !s.is_empty() {
            put_bytes(&mut out, 1, s.as_bytes());
        }
        out
    }

    /// Field 1 of a message as a string.
    pub fn decode_string1(payload: &[u8]) -> Result<String, String> {
        Ok(string(&decode(payload)?, 1))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn frames_round_trip_and_oversized_ones_are_refused() {
            let f = Frame { stream: 3, kind: REQUEST, flags: 0, payload: b"abc".to_vec() };
            let mut buf = Vec::new();
            write_frame(&mut buf, &f).unwrap();
            assert_eq!(&buf[..10], &[0, 0, 0, 3, 0, 0, 0, 3, 1, 0]);
            assert_eq!(read_frame(&mut buf.as_slice()).unwrap(), Some(f));
            assert_eq!(read_frame(&mut [].as_slice()).unwrap(), None);
            let big = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 1, 0];
            assert!(read_frame(&mut big.as_slice()).is_err());
            assert!(read_frame(&mut [0u8, 0, 0].as_slice()).is_err());
        }

        #[test]
        fn requests_and_messages_round_trip() {
            let c = CreateVm {
                id: "sb".into(),
                annotations: [("a".to_string(), "1".to_string()), ("b".into(), "".into())].into(),
                network_namespace_path: "/var/run/netns/x".into(),
            };
            let req = encode_request("remote.Hypervisor", "CreateVM", &encode_create_vm(&c), 5);
            let r = decode_request(&req).unwrap();
            assert_eq!((r.service.as_str(), r.method.as_str(), r.timeout_nano), ("remote.Hypervisor", "CreateVM", 5));
            assert_eq!(decode_create_vm(&r.payload).unwrap(), c);
            assert_eq!(decode_response(&encode_response(Ok(b"xy"))).unwrap(), Ok(b"xy".to_vec()));
            assert_eq!(decode_response(&encode_response(Err((2, "no")))).unwrap(), Err((2, "no".to_string())));
            assert_eq!(decode_string1(&encode_string1("v")).unwrap(), "v");
            // A message written by the protobuf crate the shim uses decodes the same.
            let mut m = agent_protocol::hypervisor::CreateVMRequest::new();
            m.id = "sb".into();
            let _ = m.annotations.insert("a".into(), "1".into());
            m.networkNamespacePath = "/n".into();
            let bytes = protobuf::Message::write_to_bytes(&m).unwrap();
            let d = decode_create_vm(&bytes).unwrap();
            assert_eq!(
                (d.id.as_str(), d.annotations["a"].as_str(), d.network_namespace_path.as_str()),
                ("sb", "1", "/n")
            );
            assert!(decode(&[0x0a, 0x05, 1]).is_err(), "a truncated field is an error");
        }
    }
}
