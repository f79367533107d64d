//! The remote hypervisor driver (Kata's `[hypervisor.remote]`, peer pods): the VM is a podvm
//! that a remote hypervisor service (podvisor-remote-hypervisor, or upstream cloud-api-adaptor)
//! creates elsewhere. The shim speaks Kata's `remote.Hypervisor` ttrpc API to the service's unix
//! socket (`CreateVM` in [`Hypervisor::prepare`], `StartVM` in [`Hypervisor::start`], `StopVM`
//! in [`Hypervisor::stop`]) and reaches the agent at the `agentSocketPath` the service returns, a
//! plain unix socket (Kata's `remote://` scheme) that the service proxies to the podvm.
//!
//! The driver holds one idle connection to that socket while the podvm runs: the service closes
//! it when the podvm dies, which is how a dead podvm becomes [`Hypervisor::wait_failure`].
//! A podvm's size is fixed by its instance type: memory, vCPU and device hot-plug, pause and
//! resume answer with an error that says so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use agent_protocol::hypervisor as pb;
use agent_protocol::hypervisor_ttrpc::HypervisorClient;
use async_trait::async_trait;
use slog::{info, warn, Logger};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use toml::Value;

use crate::config::ConfigError;
use crate::{AgentChannel, Capabilities, Device, DeviceAddress, Error, ExitInfo, Hypervisor, MemoryMiB, Result};

/// Kata's default service socket.
pub const DEFAULT_SOCKET: &str = "/run/peerpod/hypervisor.sock";

/// Kata's annotation keys the driver sends in `CreateVM` (the values are the configuration's,
/// after the pod's own annotations were applied).
pub mod annotation {
    /// The pod's name (from the sandbox's OCI annotations).
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
    /// The pod's namespace.
    pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
    /// The instance type (Kata reuses the machine type key).
    pub const MACHINE_TYPE: &str = "io.katacontainers.config.hypervisor.machine_type";
    /// vCPUs.
    pub const DEFAULT_VCPUS: &str = "io.katacontainers.config.hypervisor.default_vcpus";
    /// Memory in MiB.
    pub const DEFAULT_MEMORY: &str = "io.katacontainers.config.hypervisor.default_memory";
    /// The podvm image.
    pub const IMAGE: &str = "io.katacontainers.config.hypervisor.image";
    /// GPUs.
    pub const DEFAULT_GPUS: &str = "io.katacontainers.config.hypervisor.default_gpus";
    /// GPU model.
    pub const DEFAULT_GPU_MODEL: &str = "io.katacontainers.config.hypervisor.default_gpu_model";
    /// CRI-O's names of the pod's name and namespace.
    pub const CRIO_NAME: &str = "io.kubernetes.cri-o.KubeName";
    /// CRI-O's pod namespace.
    pub const CRIO_NAMESPACE: &str = "io.kubernetes.cri-o.Namespace";
}

/// Settings of the remote driver, from `[hypervisor.remote]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteConfig {
    /// `remote_hypervisor_socket`.
    pub socket: PathBuf,
    /// `remote_hypervisor_timeout` (seconds in the file): how long `StartVM` may take.
    pub timeout: Duration,
    /// `default_vcpus`, passed to the service; 0 (the default) lets it choose
    /// (`PODVM_INSTANCE_TYPE`).
    pub default_vcpus: u32,
    /// `default_memory` (MiB), passed to the service; 0 (the default) lets it choose.
    pub default_memory: u64,
    /// `machine_type`: the instance type; empty lets the service choose.
    pub machine_type: String,
    /// `image`: the podvm image; empty lets the service choose.
    pub image: String,
    /// `default_gpus`.
    pub default_gpus: u32,
    /// `default_gpu_model`.
    pub default_gpu_model: String,
    /// `enable_annotations`: which of the sizing annotations (`machine_type`, `default_vcpus`,
    /// `default_memory`; regular expressions, as for QEMU) a pod may set.
    pub enable_annotations: Vec<String>,
    /// `shared_fs`: always `none`.
    pub shared_fs: String,
    /// The sandbox's OCI annotations (filled per pod by the shim, not from the file): the pod's
    /// name and namespace for `CreateVM`.
    pub pod_annotations: HashMap<String, String>,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            timeout: Duration::from_secs(600),
            default_vcpus: 0,
            default_memory: 0,
            machine_type: String::new(),
            image: String::new(),
            default_gpus: 0,
            default_gpu_model: String::new(),
            shared_fs: "none".into(),
            enable_annotations: Vec::new(),
            pod_annotations: HashMap::new(),
        }
    }
}

/// Keys of Kata's `[hypervisor.remote]` that podvisor accepts without acting on them.
const REMOTE_KEYS_IGNORED: &[&str] = &[
    "path",
    "kernel",
    "initrd",
    "valid_hypervisor_paths",
    "disable_guest_selinux",
    "disable_selinux",
    "default_maxvcpus",
    "default_maxmemory",
    "kernel_params",
    "guest_hook_path",
    "msize_9p",
    "enable_debug",
    "default_bridges",
    "memory_slots",
    "block_device_driver",
    "disable_block_device_use",
];

impl RemoteConfig {
    /// Reads `[hypervisor.remote]` of `file`.
    pub fn from_table(
        table: &toml::Table,
        file: &Path,
        warnings: &mut Vec<String>,
    ) -> std::result::Result<Self, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: file.into(),
            section: "hypervisor.remote".into(),
            key: key.into(),
            message,
        };
        let mut c = RemoteConfig::default();
        for (key, value) in table {
            match (key.as_str(), value) {
                ("remote_hypervisor_socket", Value::String(s)) if s.starts_with('/') => c.socket = s.into(),
                ("remote_hypervisor_socket", v) => {
                    return Err(err(key, format!("{v} is not an absolute path; Kata's default is {DEFAULT_SOCKET}")))
                }
                ("remote_hypervisor_timeout", Value::Integer(s)) if (1..=86_400).contains(s) => {
                    c.timeout = Duration::from_secs(*s as u64)
                }
                ("remote_hypervisor_timeout", v) => {
                    return Err(err(key, format!("{v} is not valid; use whole seconds from 1 to 86400 (default 600)")))
                }
                ("default_vcpus", Value::Integer(n)) if (0..=1024).contains(n) => c.default_vcpus = *n as u32,
                ("default_memory", Value::Integer(n)) if *n == 0 || (64..=4_194_304).contains(n) => {
                    c.default_memory = *n as u64
                }
                ("default_gpus", Value::Integer(n)) if (0..=64).contains(n) => c.default_gpus = *n as u32,
                ("default_vcpus" | "default_memory" | "default_gpus", v) => {
                    let range = match key.as_str() {
                        "default_vcpus" => "0 to 1024 (0: the service's PODVM_INSTANCE_TYPE)",
                        "default_memory" => "0 or 64 to 4194304 MiB (0: the service's PODVM_INSTANCE_TYPE)",
                        _ => "0 to 64",
                    };
                    return Err(err(key, format!("{v} is not valid; use a whole number from {range}")));
                }
                ("machine_type", Value::String(s)) => c.machine_type = s.clone(),
                ("image", Value::String(s)) => c.image = s.clone(),
                ("default_gpu_model", Value::String(s)) => c.default_gpu_model = s.clone(),
                ("shared_fs", Value::String(s)) if s == "none" => c.shared_fs = s.clone(),
                ("shared_fs", v) => {
                    return Err(err(
                        key,
                        format!("{v}: a podvm shares no file system with the node; use shared_fs = \"none\""),
                    ))
                }
                ("enable_annotations", Value::Array(items)) => {
                    c.enable_annotations = items
                        .iter()
                        .map(|i| i.as_str().map(str::to_string))
                        .collect::<Option<_>>()
                        .ok_or_else(|| err(key, "expected an array of strings".into()))?
                }
                ("enable_annotations", v) => return Err(err(key, format!("expected an array of strings, found {v}"))),
                ("machine_type" | "image" | "default_gpu_model", v) => {
                    return Err(err(key, format!("expected a string, found {v}")))
                }
                (k, _) if REMOTE_KEYS_IGNORED.contains(&k) => warnings.push(format!(
                    "{}: [hypervisor.remote] {key}: Kata key not used by podvisor; ignored",
                    file.display()
                )),
                _ => warnings.push(format!(
                    "{}: [hypervisor.remote] {key}: unknown key; ignored (check the spelling)",
                    file.display()
                )),
            }
        }
        Ok(c)
    }

    /// The annotations of `CreateVM`, as Kata's shim builds them: the pod's name and namespace
    /// from `oci_annotations`, then the sizing keys.
    pub fn create_annotations(&self, oci_annotations: &HashMap<String, String>) -> HashMap<String, String> {
        let get = |keys: &[&str]| keys.iter().find_map(|k| oci_annotations.get(*k)).cloned().unwrap_or_default();
        let mut a = HashMap::new();
        a.insert(annotation::SANDBOX_NAME.into(), get(&[annotation::SANDBOX_NAME, annotation::CRIO_NAME]));
        a.insert(
            annotation::SANDBOX_NAMESPACE.into(),
            get(&[annotation::SANDBOX_NAMESPACE, annotation::CRIO_NAMESPACE]),
        );
        a.insert(annotation::MACHINE_TYPE.into(), self.machine_type.clone());
        a.insert(annotation::DEFAULT_VCPUS.into(), self.default_vcpus.to_string());
        a.insert(annotation::DEFAULT_MEMORY.into(), self.default_memory.to_string());
        a.insert(annotation::IMAGE.into(), self.image.clone());
        a.insert(annotation::DEFAULT_GPUS.into(), self.default_gpus.to_string());
        a.insert(annotation::DEFAULT_GPU_MODEL.into(), self.default_gpu_model.clone());
        a
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    New,
    Created { agent_socket: PathBuf },
    Running { agent_socket: PathBuf },
    Gone(ExitInfo),
}

/// One podvm, driven through the remote hypervisor service.
pub struct Remote {
    id: String,
    config: RemoteConfig,
    annotations: HashMap<String, String>,
    netns: Option<PathBuf>,
    log: Logger,
    phase: watch::Sender<Phase>,
    watch: Mutex<Option<tokio::task::JoinHandle<()>>>,
    last_channel: Mutex<PathBuf>,
}

impl Remote {
    /// The podvm of sandbox `id`; `oci_annotations` are the sandbox's (for the pod's name and
    /// namespace), `netns` its network namespace path (the service builds the tunnel there).
    pub fn new(
        id: &str,
        config: RemoteConfig,
        oci_annotations: &HashMap<String, String>,
        netns: Option<PathBuf>,
        log: Logger,
    ) -> Remote {
        let annotations = config.create_annotations(oci_annotations);
        Remote {
            id: id.into(),
            config,
            annotations,
            netns,
            log,
            phase: watch::channel(Phase::New).0,
            watch: Mutex::new(None),
            last_channel: Mutex::new(PathBuf::new()),
        }
    }

    /// A client on a fresh connection to the service: each call dials anew, so a restarted
    /// service is simply reached again.
    async fn client(&self) -> Result<HypervisorClient> {
        let path = self.config.socket.clone();
        let stream = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
            Error::Host(format!(
                "cannot reach the remote hypervisor service at {} ({e}); start it \
                 (podvisor-remote-hypervisor, or cloud-api-adaptor) or set [hypervisor.remote] \
                 remote_hypervisor_socket to where it listens",
                path.display()
            ))
        })?;
        let client = ttrpc::asynchronous::Client::new(ttrpc::asynchronous::transport::Socket::new(stream));
        Ok(HypervisorClient::new(client))
    }

    fn rpc_error(&self, call: &str, e: ttrpc::Error) -> Error {
        let detail = match e {
            ttrpc::Error::RpcStatus(s) => s.message().to_string(),
            other => other.to_string(),
        };
        Error::VmFailed(format!(
            "remote hypervisor service ({}): {call} for sandbox {}: {detail}",
            self.config.socket.display(),
            self.id
        ))
    }

    fn context(timeout: Duration) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(timeout.as_nanos().min(i64::MAX as u128) as i64)
    }

    /// The service's version (`Version`), for `kata-runtime check`.
    pub async fn service_version(socket: &Path, timeout: Duration) -> Result<String> {
        let r = Remote::new(
            "check",
            RemoteConfig { socket: socket.into(), ..Default::default() },
            &HashMap::new(),
            None,
            Logger::root(slog::Discard, slog::o!()),
        );
        let client = r.client().await?;
        let mut req = pb::VersionRequest::new();
        req.version = env!("CARGO_PKG_VERSION").into();
        let resp = tokio::time::timeout(timeout, client.version(Self::context(timeout), &req))
            .await
            .map_err(|_| Error::Timeout { what: format!("Version from {}", socket.display()), after: timeout })?
            .map_err(|e| r.rpc_error("Version", e))?;
        Ok(resp.version)
    }

    fn gone(&self, message: String) {
        self.phase.send_if_modified(|p| {
            if matches!(p, Phase::Gone(_)) {
                return false;
            }
            *p = Phase::Gone(ExitInfo { code: None, signal: None, message: message.clone() });
            true
        });
    }

    /// Holds one idle connection to the agent socket; its end is the podvm's end.
    fn start_watch(&self, socket: PathBuf, stream: tokio::net::UnixStream) {
        let phase = self.phase.clone();
        let log = self.log.clone();
        let id = self.id.clone();
        let task = tokio::spawn(async move {
            let mut stream = stream;
            let mut buf = [0u8; 64];
            // The agent never writes on a connection that sent no request; anything it does
            // send is read and dropped (bounded buffer), until EOF or an error.
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
            let message = format!(
                "the podvm of sandbox {id} is gone: the remote hypervisor service closed its agent socket {}",
                socket.display()
            );
            warn!(log, "{}", message);
            phase.send_if_modified(|p| {
                if matches!(p, Phase::Gone(_)) {
                    return false;
                }
                *p = Phase::Gone(ExitInfo { code: None, signal: None, message: message.clone() });
                true
            });
        });
        *self.watch.lock().unwrap() = Some(task);
    }

    fn unsupported(what: &str) -> Error {
        Error::InvalidRequest(format!(
            "{what} is not supported by the remote hypervisor: a podvm's size and devices are fixed by its \
             instance type when it is created (choose it with the io.katacontainers.config.hypervisor.machine_type \
             annotation, or default_vcpus / default_memory)"
        ))
    }
}

#[async_trait]
impl Hypervisor for Remote {
    async fn prepare(&self) -> Result<()> {
        if let Some(ns) = &self.netns {
            std::fs::metadata(ns).map_err(crate::io_err(format!("network namespace {}", ns.display())))?;
        }
        let client = self.client().await?;
        let mut req = pb::CreateVMRequest::new();
        req.id = self.id.clone();
        req.annotations = self.annotations.clone();
        req.networkNamespacePath = self.netns.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let timeout = Duration::from_secs(60).min(self.config.timeout);
        let resp = client.create_vm(Self::context(timeout), &req).await.map_err(|e| self.rpc_error("CreateVM", e))?;
        if resp.agentSocketPath.is_empty() || !resp.agentSocketPath.starts_with('/') || resp.agentSocketPath.len() > 107
        {
            // Created on the far side: undo it there before failing (StopVM is sent only for a
            // podvm the driver knows was created).
            self.phase.send_replace(Phase::Created { agent_socket: PathBuf::new() });
            let _ = self.stop().await;
            return Err(Error::VmFailed(format!(
                "remote hypervisor service: CreateVM for sandbox {} answered agentSocketPath {:?}, which is not an \
                 absolute unix socket path; the service is incompatible",
                self.id, resp.agentSocketPath
            )));
        }
        let agent_socket = PathBuf::from(&resp.agentSocketPath);
        info!(self.log, "podvm created"; "agent_socket" => %agent_socket.display(), "service" => %self.config.socket.display());
        *self.last_channel.lock().unwrap() = agent_socket.clone();
        self.phase.send_replace(Phase::Created { agent_socket });
        Ok(())
    }

    async fn start(&self) -> Result<()> {
        let agent_socket = match &*self.phase.borrow() {
            Phase::Created { agent_socket } => agent_socket.clone(),
            other => return Err(Error::InvalidRequest(format!("start: the podvm is not created ({other:?})"))),
        };
        let client = self.client().await?;
        let mut req = pb::StartVMRequest::new();
        req.id = self.id.clone();
        let started = client.start_vm(Self::context(self.config.timeout), &req).await;
        if let Err(e) = started {
            let err = self.rpc_error("StartVM", e);
            let _ = self.stop().await;
            return Err(err);
        }
        let stream = match tokio::net::UnixStream::connect(&agent_socket).await {
            Ok(s) => s,
            Err(e) => {
                let _ = self.stop().await;
                return Err(Error::VmFailed(format!(
                    "the podvm of sandbox {} started but its agent socket {} refuses connections: {e}",
                    self.id,
                    agent_socket.display()
                )));
            }
        };
        self.phase.send_replace(Phase::Running { agent_socket: agent_socket.clone() });
        self.start_watch(agent_socket, stream);
        info!(self.log, "podvm started");
        Ok(())
    }

    async fn stop(&self) -> Result<()> {
        if let Some(task) = self.watch.lock().unwrap().take() {
            task.abort();
        }
        let was_new = matches!(&*self.phase.borrow(), Phase::New);
        if was_new {
            self.gone("the podvm was never created".into());
            return Ok(());
        }
        let result = async {
            let client = self.client().await?;
            let mut req = pb::StopVMRequest::new();
            req.id = self.id.clone();
            client
                .stop_vm(Self::context(Duration::from_secs(60)), &req)
                .await
                .map_err(|e| self.rpc_error("StopVM", e))
                .map(|_| ())
        }
        .await;
        self.gone(format!("the podvm of sandbox {} was stopped", self.id));
        result
    }

    async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.phase.subscribe();
        match rx.wait_for(|p| matches!(p, Phase::Gone(_))).await.map(|p| p.clone()) {
            Ok(Phase::Gone(info)) => info,
            _ => ExitInfo { code: None, signal: None, message: "driver dropped".into() },
        }
    }

    async fn wait_failure(&self) -> String {
        self.wait_exit().await.message
    }

    async fn pause(&self) -> Result<()> {
        Err(Self::unsupported("pausing a podvm"))
    }

    async fn resume(&self) -> Result<()> {
        Err(Self::unsupported("resuming a podvm"))
    }

    async fn resize_memory(&self, _total: MemoryMiB) -> Result<MemoryMiB> {
        Err(Self::unsupported("memory hot-plug"))
    }

    async fn resize_vcpus(&self, _count: u32) -> Result<u32> {
        Err(Self::unsupported("vCPU hot-plug"))
    }

    async fn add_device(&self, device: Device) -> Result<DeviceAddress> {
        Err(Self::unsupported(&format!("hot-plugging device {}", device.id())))
    }

    async fn remove_device(&self, id: &str) -> Result<()> {
        Err(Self::unsupported(&format!("removing device {id}")))
    }

    /// The podvm runs elsewhere; as Kata's remote driver, the shim's own process stands for the
    /// VMM (the task pid the container managers see).
    async fn pids(&self) -> Vec<u32> {
        vec![std::process::id()]
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    fn agent_channel(&self) -> AgentChannel {
        AgentChannel::Unix { path: self.last_channel.lock().unwrap().clone() }
    }

    fn console_tail(&self) -> Vec<String> {
        vec![format!(
            "(the podvm's console is kept by the remote hypervisor service at {}, not by the shim)",
            self.config.socket.display()
        )]
    }

    async fn cleanup(&self) -> Result<()> {
        self.stop().await
    }
}

/// The check of a peer-pod node (`kata-runtime check`, the shim's `check`): the node runs no VM
/// itself; what matters is that the remote hypervisor service answers. Returns whether it does,
/// and the report (socket, version or the error with its fix).
pub fn check(remote: &RemoteConfig) -> (bool, String) {
    let mut text = format!("hypervisor: remote (peer pods), service socket {}\n", remote.socket.display());
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return (false, format!("{text}FAIL: cannot start a runtime: {e}\n")),
    };
    match rt.block_on(Remote::service_version(&remote.socket, Duration::from_secs(5))) {
        Ok(version) => {
            text.push_str(&format!("remote hypervisor service: reachable, version {version:?}\n"));
            text.push_str("PASS: this node can run peer pods (their podvms run where the service puts them)\n");
            (true, text)
        }
        Err(e) => {
            text.push_str(&format!("remote hypervisor service: {e}\n"));
            text.push_str("FAIL: peer pods cannot start on this node until the service answers\n");
            (false, text)
        }
    }
}

/// Asks the service at `socket` to stop the podvm of sandbox `id`; for the shim's `delete` after
/// a dead shim, which has no driver left. Unknown ids are fine for the service.
pub async fn stop_podvm(socket: &Path, id: &str, timeout: Duration) -> Result<()> {
    let r = Remote::new(
        id,
        RemoteConfig { socket: socket.into(), ..Default::default() },
        &HashMap::new(),
        None,
        Logger::root(slog::Discard, slog::o!()),
    );
    r.phase.send_replace(Phase::Created { agent_socket: PathBuf::new() });
    tokio::time::timeout(timeout, r.stop())
        .await
        .map_err(|_| Error::Timeout { what: format!("StopVM of {id} at {}", socket.display()), after: timeout })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_protocol::hypervisor_ttrpc::{create_hypervisor, Hypervisor as Service};
    use std::sync::Arc;
    use ttrpc::asynchronous::TtrpcContext;

    /// A service that records calls and serves an "agent" socket it can close.
    struct Fake {
        calls: Arc<Mutex<Vec<String>>>,
        agent_socket: PathBuf,
        fail_start: bool,
        bad_socket: bool,
        listener: Arc<Mutex<Option<std::os::unix::net::UnixListener>>>,
        accepted: Arc<Mutex<Vec<std::os::unix::net::UnixStream>>>,
    }

    #[async_trait]
    impl Service for Fake {
        async fn create_vm(&self, _: &TtrpcContext, req: pb::CreateVMRequest) -> ttrpc::Result<pb::CreateVMResponse> {
            let mut keys: Vec<_> = req.annotations.keys().cloned().collect();
            keys.sort();
            self.calls.lock().unwrap().push(format!(
                "CreateVM {} {} [{}]",
                req.id,
                req.networkNamespacePath,
                keys.join(",")
            ));
            let _ = std::fs::remove_file(&self.agent_socket);
            let l = std::os::unix::net::UnixListener::bind(&self.agent_socket).unwrap();
            *self.listener.lock().unwrap() = Some(l);
            let mut resp = pb::CreateVMResponse::new();
            resp.agentSocketPath =
                if self.bad_socket { "relative.sock".into() } else { self.agent_socket.display().to_string() };
            Ok(resp)
        }
        async fn start_vm(&self, _: &TtrpcContext, req: pb::StartVMRequest) -> ttrpc::Result<pb::StartVMResponse> {
            self.calls.lock().unwrap().push(format!("StartVM {}", req.id));
            if self.fail_start {
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::RESOURCE_EXHAUSTED,
                    "peer pod limit reached: PEERPODS_LIMIT_PER_NODE=2",
                )));
            }
            // Accept the driver's watch connection in the background.
            let l = self.listener.lock().unwrap().as_ref().unwrap().try_clone().unwrap();
            let accepted = self.accepted.clone();
            std::thread::spawn(move || {
                if let Ok((s, _)) = l.accept() {
                    accepted.lock().unwrap().push(s);
                }
            });
            Ok(pb::StartVMResponse::new())
        }
        async fn stop_vm(&self, _: &TtrpcContext, req: pb::StopVMRequest) -> ttrpc::Result<pb::StopVMResponse> {
            self.calls.lock().unwrap().push(format!("StopVM {}", req.id));
            Ok(pb::StopVMResponse::new())
        }
        async fn version(&self, _: &TtrpcContext, _: pb::VersionRequest) -> ttrpc::Result<pb::VersionResponse> {
            let mut r = pb::VersionResponse::new();
            r.version = "fake 1".into();
            Ok(r)
        }
    }

    struct Running {
        dir: PathBuf,
        socket: PathBuf,
        calls: Arc<Mutex<Vec<String>>>,
        accepted: Arc<Mutex<Vec<std::os::unix::net::UnixStream>>>,
        _server: ttrpc::asynchronous::Server,
    }

    async fn serve(name: &str, fail_start: bool) -> Running {
        serve_with(name, fail_start, false).await
    }

    async fn serve_with(name: &str, fail_start: bool, bad_socket: bool) -> Running {
        let dir = std::env::temp_dir().join(format!("podvisor-remote-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("hypervisor.sock");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            calls: calls.clone(),
            agent_socket: dir.join("agent.sock"),
            fail_start,
            bad_socket,
            listener: Arc::new(Mutex::new(None)),
            accepted: accepted.clone(),
        };
        let mut server = ttrpc::asynchronous::Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .unwrap()
            .register_service(create_hypervisor(Arc::new(fake)));
        server.start().await.unwrap();
        Running { dir, socket, calls, accepted, _server: server }
    }

    fn remote(socket: &Path) -> Remote {
        let mut oci = HashMap::new();
        oci.insert(annotation::CRIO_NAME.to_string(), "web".to_string());
        let config = RemoteConfig { socket: socket.into(), machine_type: "small".into(), ..Default::default() };
        Remote::new("sb1", config, &oci, None, Logger::root(slog::Discard, slog::o!()))
    }

    #[test]
    fn create_annotations_are_katas() {
        let mut oci = HashMap::new();
        oci.insert(annotation::SANDBOX_NAME.to_string(), "web".to_string());
        oci.insert(annotation::SANDBOX_NAMESPACE.to_string(), "ns".to_string());
        let a = RemoteConfig { default_vcpus: 2, default_memory: 1024, ..Default::default() }.create_annotations(&oci);
        assert_eq!(a[annotation::SANDBOX_NAME], "web");
        assert_eq!(a[annotation::SANDBOX_NAMESPACE], "ns");
        assert_eq!(a[annotation::DEFAULT_VCPUS], "2");
        assert_eq!(a[annotation::DEFAULT_MEMORY], "1024");
        assert_eq!(a.len(), 8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lifecycle_calls_the_service_in_order_and_a_closed_agent_socket_is_the_podvms_end() {
        let s = serve("life", false).await;
        let vm = remote(&s.socket);
        vm.prepare().await.unwrap();
        assert_eq!(vm.agent_channel(), AgentChannel::Unix { path: s.dir.join("agent.sock") });
        vm.start().await.unwrap();
        // The agent connection works through the returned socket.
        let _agent = vm.agent_channel().connect(Duration::from_secs(2)).await.unwrap();
        // The service closes the podvm's connections: the driver reports the VM gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while s.accepted.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the watch connection never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.accepted.lock().unwrap().clear();
        let why = tokio::time::timeout(Duration::from_secs(5), vm.wait_failure()).await.expect("failure seen");
        assert!(why.contains("sb1") && why.contains("agent socket"), "{why}");
        vm.stop().await.unwrap();
        let calls = s.calls.lock().unwrap().clone();
        assert_eq!(calls[0].split(' ').take(2).collect::<Vec<_>>(), ["CreateVM", "sb1"]);
        assert!(calls[0].contains("io.kubernetes.cri.sandbox-name"), "{calls:?}");
        assert_eq!(&calls[1..], ["StartVM sb1", "StopVM sb1"]);
        assert!(vm
            .resize_memory(MemoryMiB(4096))
            .await
            .unwrap_err()
            .to_string()
            .contains("not supported by the remote hypervisor"));
        assert!(vm.pause().await.is_err());
        std::fs::remove_dir_all(&s.dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_start_is_undone_on_the_service_and_names_its_reason() {
        let s = serve("refused", true).await;
        let vm = remote(&s.socket);
        vm.prepare().await.unwrap();
        let err = vm.start().await.unwrap_err().to_string();
        assert!(err.contains("StartVM") && err.contains("PEERPODS_LIMIT_PER_NODE=2"), "{err}");
        assert_eq!(s.calls.lock().unwrap().last().unwrap(), "StopVM sb1");
        std::fs::remove_dir_all(&s.dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_node_check_reports_the_services_version_or_its_absence() {
        let s = serve("check", false).await;
        let ok = RemoteConfig { socket: s.socket.clone(), ..Default::default() };
        let (passed, text) = std::thread::spawn(move || check(&ok)).join().unwrap();
        assert!(passed && text.contains("version \"fake 1\"") && text.contains("PASS"), "{text}");
        let gone = RemoteConfig { socket: s.dir.join("nothing.sock"), ..Default::default() };
        let (passed, text) = std::thread::spawn(move || check(&gone)).join().unwrap();
        assert!(!passed && text.contains("nothing.sock") && text.contains("FAIL"), "{text}");
        std::fs::remove_dir_all(&s.dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unusable_agent_socket_is_refused_and_the_podvm_stopped() {
        let s = serve_with("badsock", false, true).await;
        let vm = remote(&s.socket);
        let err = vm.prepare().await.unwrap_err().to_string();
        assert!(err.contains("relative.sock") && err.contains("incompatible"), "{err}");
        assert_eq!(s.calls.lock().unwrap().last().unwrap(), "StopVM sb1", "the created podvm is not left");
        std::fs::remove_dir_all(&s.dir).unwrap();
    }

    #[tokio::test]
    async fn a_missing_service_names_the_socket_and_the_fix() {
        let vm = remote(Path::new("/nonexistent/peerpod/hypervisor.sock"));
        let err = vm.prepare().await.unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent/peerpod/hypervisor.sock") && err.contains("remote_hypervisor_socket"),
            "{err}"
        );
        // Never created: stop is a no-op.
        vm.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn version_and_stop_podvm_for_a_dead_shim() {
        let s = serve("version", false).await;
        assert_eq!(Remote::service_version(&s.socket, Duration::from_secs(5)).await.unwrap(), "fake 1");
        stop_podvm(&s.socket, "gone", Duration::from_secs(5)).await.unwrap();
        assert_eq!(s.calls.lock().unwrap().last().unwrap(), "StopVM gone");
        std::fs::remove_dir_all(&s.dir).unwrap();
    }
}
