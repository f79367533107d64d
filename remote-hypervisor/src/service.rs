//! The service core: `remote.Hypervisor` (CreateVM, StartVM, StopVM, Version) over ttrpc, the
//! per-pod state machine, the node limit, instance types, and garbage collection on restart.
//!
//! Locking: one `std::sync::Mutex` over the pod table, held only to read or flip a pod's phase,
//! never across an await. Slow work (creating a podvm, waiting for its agent, deleting it) runs
//! with the pod in `Starting`/`Stopping`; a StopVM that finds its pod `Starting` cancels the start
//! and waits only for that pod.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::hypervisor as pb;
use agent_protocol::hypervisor_ttrpc;
use async_trait::async_trait;
use slog::{error, info, warn};
use tokio::sync::watch;

use crate::config::Config;
use crate::interfaces::{PodTunnel, TlsIssuer, TunnelSpec};
use crate::provider::{AgentTls, InstanceRequest, InstanceType, Provider, Tunnel, UserData};
use crate::state::{self, Phase, PodState, ProcessRef};
use crate::tlsclient::{self, AgentTlsClient};

/// Annotation: the instance type name.
pub const ANNO_MACHINE_TYPE: &str = "io.katacontainers.config.hypervisor.machine_type";
/// Annotation: vCPUs wanted.
pub const ANNO_VCPUS: &str = "io.katacontainers.config.hypervisor.default_vcpus";
/// Annotation: memory wanted (MiB).
pub const ANNO_MEMORY: &str = "io.katacontainers.config.hypervisor.default_memory";
/// Annotation: the pod's name (CRI).
pub const ANNO_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
/// Tag: the sandbox a podvm serves.
pub const TAG_SANDBOX_ID: &str = "podvisor.io/sandbox-id";
/// Tag: the node service that owns a podvm.
pub const TAG_OWNER: &str = "podvisor.io/owner";
/// The agent's TLS port in the podvm.
pub const AGENT_PORT: u16 = 15150;
/// The first VXLAN id handed out.
pub const VNI_BASE: u32 = 555001;
/// StartVM's bound when the request carries none.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(600);
/// MTU of the podvm's tunnel device (1500 minus VXLAN's 50 bytes).
pub const TUNNEL_MTU: u32 = 1450;

/// What the core is built from besides its settings.
#[derive(Clone)]
pub struct Deps {
    /// Where podvms come from.
    pub provider: Arc<dyn Provider>,
    /// TLS material per podvm.
    pub tls: Arc<dyn TlsIssuer>,
    /// The worker side of the pod tunnel.
    pub tunnel: Arc<dyn PodTunnel>,
    /// The binary run as `<exe> proxy ...` (normally this very binary).
    pub proxy_exe: PathBuf,
    /// Kata's per-sandbox directory holding `<id>/shim-monitor.sock` (`/run/vc/sbs`).
    pub sbs_dir: PathBuf,
    /// The agent's TLS port in podvms (15150).
    pub agent_port: u16,
    /// Value of the owner tag (this node).
    pub owner: String,
    /// Logger.
    pub log: slog::Logger,
}

/// A request the service refuses or fails; maps onto a ttrpc status code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Bad request.
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown sandbox.
    #[error("{0}")]
    NotFound(String),
    /// The node limit.
    #[error("{0}")]
    LimitReached(String),
    /// Wrong phase.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Provider, tunnel, TLS, proxy or timeout failures.
    #[error("{0}")]
    Failed(String),
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> ttrpc::Error {
        use ttrpc::Code;
        let code = match &e {
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::LimitReached(_) => Code::RESOURCE_EXHAUSTED,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Failed(_) => Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

struct Entry {
    state: PodState,
    /// Set by StopVM to cancel a start.
    cancel: Arc<AtomicBool>,
    /// While a start or stop runs: resolves (sender dropped) when it is over.
    busy: Option<watch::Receiver<()>>,
}

/// What a restart found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Sandboxes kept (claimed by a live shim, processes alive).
    pub reattached: Vec<String>,
    /// Sandboxes whose podvm and state were destroyed.
    pub destroyed: Vec<String>,
    /// Provider instance ids deleted without a state dir.
    pub orphans: Vec<String>,
}

/// The service core.
pub struct Core {
    cfg: Config,
    deps: Deps,
    allowed: Vec<InstanceType>,
    default_type: InstanceType,
    pods: Mutex<HashMap<String, Entry>>,
}

/// Picks the instance type for a pod: the machine_type annotation names it; else the vCPU and
/// memory annotations pick the smallest allowed type that fits both; else the default.
pub fn choose_instance_type(
    annotations: &BTreeMap<String, String>,
    allowed: &[InstanceType],
    default: &InstanceType,
) -> Result<InstanceType, Error> {
    let names = || allowed.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ");
    if let Some(name) = annotations.get(ANNO_MACHINE_TYPE).map(|s| s.trim()).filter(|s| !s.is_empty()) {
        return allowed.iter().find(|t| t.name == name).cloned().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "instance type {name:?} (annotation {ANNO_MACHINE_TYPE}) is not allowed on this node; use one of: {} (PODVM_INSTANCE_TYPES)",
                names()
            ))
        });
    }
    let number = |key: &str| -> Result<Option<u64>, Error> {
        match annotations.get(key).map(|s| s.trim()).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(v) => v
                .parse::<u64>()
                .map(Some)
                .map_err(|_| Error::InvalidArgument(format!("annotation {key}={v:?}: write a whole number"))),
        }
    };
    // 0 is "not asked" (Kata's shim sends its configuration's values, 0 when unset).
    let (vcpus, memory) = (number(ANNO_VCPUS)?.filter(|n| *n > 0), number(ANNO_MEMORY)?.filter(|n| *n > 0));
    if vcpus.is_none() && memory.is_none() {
        return Ok(default.clone());
    }
    let (vcpus, memory) = (vcpus.unwrap_or(0), memory.unwrap_or(0));
    allowed
        .iter()
        .filter(|t| u64::from(t.vcpus) >= vcpus && t.memory_mib >= memory)
        .min_by_key(|t| (t.vcpus, t.memory_mib))
        .cloned()
        .ok_or_else(|| {
            let sizes = allowed.iter().map(|t| format!("{} {}/{} MiB", t.name, t.vcpus, t.memory_mib)).collect::<Vec<_>>();
            Error::InvalidArgument(format!(
                "no allowed instance type has {vcpus} vCPUs and {memory} MiB (annotations {ANNO_VCPUS}, {ANNO_MEMORY}); allowed: {}; ask for less or allow a larger type in PODVM_INSTANCE_TYPES",
                sizes.join(", ")
            ))
        })
}

/// `podvm-<pod name>-<first 8 of id>`, lower case, `[a-z0-9-]`, at most 63 characters.
pub fn instance_name(pod_name: Option<&str>, sandbox_id: &str) -> String {
    let clean = |s: &str| -> String {
        let mut out = String::new();
        for c in s.chars() {
            let c = c.to_ascii_lowercase();
            let c = if c.is_ascii_alphanumeric() { c } else { '-' };
            if !(c == '-' && out.ends_with('-')) {
                out.push(c);
            }
        }
        out.trim_matches('-').to_owned()
    };
    let short: String = clean(sandbox_id).chars().filter(|c| *c != '-').take(8).collect();
    let pod = clean(pod_name.unwrap_or(""));
    let pod: String = pod.chars().take(63 - "podvm-".len() - 1 - short.len()).collect();
    let pod = pod.trim_end_matches('-');
    if pod.is_empty() {
        format!("podvm-{short}")
    } else {
        format!("podvm-{pod}-{short}")
    }
}

fn validate_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "sandbox id {id:?} is not valid: use 1 to 128 letters, digits, '-', '_' or '.'"
        )))
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Failed(format!("{what}: {e}"))
}

impl Core {
    /// Builds the core; fails when the instance-type settings do not match the provider.
    pub fn new(cfg: Config, deps: Deps) -> Result<Arc<Core>, String> {
        let (allowed, default_type) = cfg.allowed_types(&deps.provider.instance_types()).map_err(|e| e.to_string())?;
        Ok(Arc::new(Core { cfg, deps, allowed, default_type, pods: Mutex::new(HashMap::new()) }))
    }

    fn pods(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        state::pod_dir(&self.cfg.state_dir, id)
    }

    /// Podvms counted against the limit (every phase, reattached ones included).
    pub fn count(&self) -> usize {
        self.pods().len()
    }

    /// The phase of a sandbox's podvm, if the service knows it.
    pub fn phase(&self, id: &str) -> Option<Phase> {
        self.pods().get(id).map(|e| e.state.phase)
    }

    /// `Version`.
    pub fn version(&self) -> String {
        format!("podvisor-remote-hypervisor {}", env!("CARGO_PKG_VERSION"))
    }

    /// `CreateVM`: validates, enforces the limit, picks the size, records the request. Nothing
    /// runs yet. Returns the agent socket path.
    pub fn create_vm(&self, id: &str, annotations: BTreeMap<String, String>, netns: &str) -> Result<PathBuf, Error> {
        validate_id(id)?;
        if !netns.is_empty() && !Path::new(netns).is_absolute() {
            return Err(Error::InvalidArgument(format!("networkNamespacePath {netns:?} is not an absolute path")));
        }
        let instance_type = choose_instance_type(&annotations, &self.allowed, &self.default_type)?;
        let name = instance_name(annotations.get(ANNO_SANDBOX_NAME).map(String::as_str), id);
        let dir = self.run_dir(id);
        let st = {
            let mut pods = self.pods();
            if let Some(e) = pods.get(id) {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox {id} already has a podvm ({:?}); StopVM it first",
                    e.state.phase
                )));
            }
            let limit = self.cfg.limit_per_node as usize;
            if pods.len() >= limit {
                return Err(Error::LimitReached(format!(
                    "peer pod limit reached: PEERPODS_LIMIT_PER_NODE={limit} podvms already run on this node; delete a peer pod or raise PEERPODS_LIMIT_PER_NODE in {}",
                    self.cfg.config_file.display()
                )));
            }
            let used: BTreeSet<u32> = pods.values().map(|e| e.state.vni).collect();
            let vni = (VNI_BASE..).find(|v| !used.contains(v)).expect("a free VNI");
            let st = PodState {
                version: 1,
                sandbox_id: id.to_owned(),
                phase: Phase::Created,
                name,
                instance_type,
                netns: netns.to_owned(),
                vni,
                annotations,
                instance: None,
                tunnel: None,
                proxy: None,
            };
            pods.insert(
                id.to_owned(),
                Entry { state: st.clone(), cancel: Arc::new(AtomicBool::new(false)), busy: None },
            );
            st
        };
        let made =
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).and_then(|_| state::write(&dir, &st));
        if let Err(e) = made {
            self.pods().remove(id);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(failed(&format!("cannot write the state of sandbox {id} in {}", dir.display()), e));
        }
        info!(self.deps.log, "podvm created"; "sandbox" => id, "name" => &st.name, "type" => &st.instance_type.name, "vni" => st.vni);
        Ok(crate::proxy::socket_path(&dir))
    }

    /// `StartVM`: creates the podvm, the tunnel and the proxy, and returns once the agent
    /// answers TLS (within `timeout`). On any failure everything of the pod is undone and the pod
    /// is forgotten.
    pub async fn start_vm(self: &Arc<Self>, id: &str, timeout: Duration) -> Result<(), Error> {
        let (st, cancel, done) = {
            let mut pods = self.pods();
            let Some(e) = pods.get_mut(id) else {
                return Err(Error::NotFound(format!("no podvm for sandbox {id}: call CreateVM first")));
            };
            match e.state.phase {
                Phase::Running => return Ok(()),
                Phase::Starting => {
                    return Err(Error::FailedPrecondition(format!("sandbox {id}: StartVM is already in progress")))
                }
                Phase::Stopping => {
                    return Err(Error::FailedPrecondition(format!("sandbox {id}: StopVM is in progress")))
                }
                Phase::Created => {}
            }
            let (tx, rx) = watch::channel(());
            e.state.phase = Phase::Starting;
            e.busy = Some(rx);
            (e.state.clone(), e.cancel.clone(), tx)
        };
        // The work runs in its own task: a caller that goes away (ttrpc timeout) must not drop
        // it halfway; it either finishes or undoes itself.
        let core = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut st = st;
            let result = match core.start_steps(&mut st, &cancel, deadline).await {
                Ok(()) if !cancel.load(Ordering::SeqCst) => Ok(()),
                Ok(()) => Err(Error::Failed(format!("sandbox {id}: StopVM arrived while StartVM ran"))),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => {
                    let mut pods = core.pods();
                    if let Some(e) = pods.get_mut(&id) {
                        e.state = st;
                        e.busy = None;
                    }
                    drop(pods);
                    drop(done);
                    info!(core.deps.log, "podvm running"; "sandbox" => &id);
                    Ok(())
                }
                Err(e) => {
                    warn!(core.deps.log, "StartVM failed; undoing"; "sandbox" => &id, "error" => %e);
                    let undo = core.destroy(&st).await;
                    core.pods().remove(&id);
                    drop(done);
                    match undo {
                        Ok(()) => Err(e),
                        Err(u) => Err(Error::Failed(format!("{e} (cleanup also failed: {u})"))),
                    }
                }
            }
        })
        .await
        .map_err(|e| Error::Failed(format!("StartVM task: {e}")))?
    }

    fn save(&self, st: &PodState) -> Result<(), Error> {
        let dir = self.run_dir(&st.sandbox_id);
        state::write(&dir, st).map_err(|e| failed(&format!("cannot write {}/state.json", dir.display()), e))
    }

    async fn start_steps(
        &self,
        st: &mut PodState,
        cancel: &AtomicBool,
        deadline: tokio::time::Instant,
    ) -> Result<(), Error> {
        let id = st.sandbox_id.clone();
        let check = || {
            if cancel.load(Ordering::SeqCst) {
                Err(Error::Failed(format!("sandbox {id}: StopVM arrived while StartVM ran")))
            } else {
                Ok(())
            }
        };
        let run_dir = self.run_dir(&id);
        let tls_dir = run_dir.join("tls");
        st.phase = Phase::Starting;
        self.save(st)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tls_dir)
            .map_err(|e| failed(&format!("cannot create {}", tls_dir.display()), e))?;
        let pod_mac = if st.netns.is_empty() {
            None
        } else {
            Some(
                self.deps
                    .tunnel
                    .pod_mac(Path::new(&st.netns))
                    .await
                    .map_err(|e| failed(&format!("cannot read eth0's MAC in the pod netns {}", st.netns), e))?,
            )
        };
        let server_name = tlsclient::PODVM_SERVER_NAME;
        let issuer = self.deps.tls.clone();
        let name = st.name.clone();
        let tls = tokio::task::spawn_blocking(move || issuer.issue(&name))
            .await
            .map_err(|e| failed("TLS material", e))?
            .map_err(|e| failed("cannot make the podvm's TLS material", e))?;
        let write = |file: &str, body: &str, mode: u32| -> Result<(), Error> {
            use std::io::Write;
            let p = tls_dir.join(file);
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&p)
                .and_then(|mut f| f.write_all(body.as_bytes()))
                .map_err(|e| failed(&format!("cannot write {}", p.display()), e))
        };
        write(tlsclient::CA_FILE, &tls.ca_cert, 0o644)?;
        write(tlsclient::CLIENT_CERT_FILE, &tls.client_cert, 0o644)?;
        write(tlsclient::CLIENT_KEY_FILE, &tls.client_key, 0o600)?;
        write(tlsclient::SERVER_NAME_FILE, server_name, 0o644)?;
        let client = AgentTlsClient::load(&tls_dir).map_err(|e| failed("TLS client", e))?;
        let user_data = UserData {
            version: 1,
            network: None,
            listen_port: self.deps.agent_port,
            tls: AgentTls { ca_cert: tls.ca_cert.clone(), server_cert: tls.server_cert, server_key: tls.server_key },
            tunnel: pod_mac.map(|pod_mac| Tunnel {
                kind: self.cfg.tunnel_type.clone(),
                vni: st.vni,
                remote: self.deps.provider.worker_address().to_string(),
                port: self.cfg.vxlan_port,
                pod_mac,
                mtu: TUNNEL_MTU,
            }),
            registry_auth: self.cfg.registry_auth.clone(),
        };
        let mut tags = self.cfg.tags.clone();
        tags.insert(TAG_SANDBOX_ID.into(), id.clone());
        tags.insert(TAG_OWNER.into(), self.deps.owner.clone());
        check()?;
        let req = InstanceRequest {
            sandbox_id: id.clone(),
            name: st.name.clone(),
            instance_type: st.instance_type.clone(),
            root_volume_gb: self.cfg.root_volume_gb,
            tags,
            user_data,
            run_dir: run_dir.clone(),
        };
        let instance = self.deps.provider.create_instance(req).await.map_err(|e| {
            failed(&format!("provider {} cannot create podvm {}", self.deps.provider.name(), st.name), e)
        })?;
        st.instance = Some(instance.clone());
        self.save(st)?;
        check()?;
        if !st.netns.is_empty() {
            let spec = TunnelSpec {
                netns: PathBuf::from(&st.netns),
                vni: st.vni,
                remote: instance.ip,
                port: self.cfg.vxlan_port,
            };
            let t = self.deps.tunnel.setup(&spec).await.map_err(|e| failed("cannot set up the pod tunnel", e))?;
            st.tunnel = Some(t);
            self.save(st)?;
        }
        let vmm = match (instance.vmm_pid, instance.vmm_start_time) {
            (Some(pid), Some(start_time)) => Some(ProcessRef { pid, start_time }),
            _ => None,
        };
        let target = SocketAddr::new(instance.ip, self.deps.agent_port);
        let mut last = String::from("not tried");
        loop {
            check()?;
            if vmm.is_some_and(|p| !p.alive()) {
                return Err(Error::Failed(format!("podvm {} exited before its agent answered on {target}", st.name)));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(Error::Failed(format!(
                    "podvm {}: the agent did not answer TLS on {target} within the StartVM timeout (last error: {last})",
                    st.name
                )));
            }
            match client.connect(target, (deadline - now).min(Duration::from_secs(2))).await {
                Ok(_) => break,
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        check()?;
        let proxy = self.spawn_proxy(&run_dir, target, vmm).await?;
        st.proxy = Some(proxy);
        self.save(st)?;
        let sock = crate::proxy::socket_path(&run_dir);
        let ready_by = tokio::time::Instant::now() + Duration::from_secs(5);
        while !sock.exists() {
            if !proxy.alive() {
                let log = std::fs::read_to_string(run_dir.join("proxy.log")).unwrap_or_default();
                return Err(Error::Failed(format!("the proxy exited at start: {}", log.trim())));
            }
            if tokio::time::Instant::now() >= ready_by {
                return Err(Error::Failed(format!("the proxy did not create {} within 5 s", sock.display())));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        st.phase = Phase::Running;
        self.save(st)?;
        Ok(())
    }

    async fn spawn_proxy(
        &self,
        run_dir: &Path,
        target: SocketAddr,
        vmm: Option<ProcessRef>,
    ) -> Result<ProcessRef, Error> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(run_dir.join("proxy.log")).map_err(|e| failed("proxy.log", e))?;
        let mut cmd = std::process::Command::new(&self.deps.proxy_exe);
        cmd.arg("proxy")
            .arg("--socket")
            .arg(crate::proxy::socket_path(run_dir))
            .arg("--target")
            .arg(target.to_string())
            .arg("--tls-dir")
            .arg(run_dir.join("tls"));
        if let Some(v) = vmm {
            cmd.arg("--vmm-pid").arg(v.pid.to_string()).arg("--vmm-start-time").arg(v.start_time.to_string());
        }
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(log);
        // SAFETY: setsid is async-signal-safe; the proxy gets its own session so that it
        // outlives a service restart.
        unsafe {
            cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
        }
        let mut child =
            cmd.spawn().map_err(|e| failed(&format!("cannot start the proxy {}", self.deps.proxy_exe.display()), e))?;
        let pid = child.id();
        let p = ProcessRef::of(pid).ok_or_else(|| Error::Failed(format!("the proxy (pid {pid}) exited at once")))?;
        // Reap it when it exits while we live (it outlives us otherwise).
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(p)
    }

    /// Destroys what `st` records: proxy, tunnel, instance, then the state dir. Keeps going past
    /// errors; returns them joined.
    async fn destroy(&self, st: &PodState) -> Result<(), String> {
        let mut errors = Vec::new();
        if let Some(p) = &st.proxy {
            state::terminate(p, Duration::from_secs(2)).await;
        }
        if let Some(t) = &st.tunnel {
            if let Err(e) = self.deps.tunnel.teardown(t).await {
                errors.push(format!("tunnel: {e}"));
            }
        }
        if let Some(i) = &st.instance {
            if let Err(e) = self.deps.provider.delete_instance(i).await {
                errors.push(format!("provider {} cannot delete podvm {}: {e}", self.deps.provider.name(), i.id));
            }
        }
        let dir = self.run_dir(&st.sandbox_id);
        if errors.is_empty() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    errors.push(format!("cannot remove {}: {e}", dir.display()));
                }
            }
            Ok(())
        } else {
            // Keep the state so that StopVM or the next start retries.
            let mut left = st.clone();
            left.phase = Phase::Stopping;
            left.proxy = None;
            let _ = state::write(&dir, &left);
            Err(errors.join("; "))
        }
    }

    /// `StopVM`: destroys the podvm, proxy, tunnel and state. Unknown ids are fine.
    pub async fn stop_vm(&self, id: &str) -> Result<(), Error> {
        let (st, done) = loop {
            let wait = {
                let mut pods = self.pods();
                let Some(e) = pods.get_mut(id) else { return Ok(()) };
                match (&e.state.phase, &e.busy) {
                    (Phase::Starting, Some(rx)) | (Phase::Stopping, Some(rx)) => {
                        e.cancel.store(true, Ordering::SeqCst);
                        rx.clone()
                    }
                    _ => {
                        let (tx, rx) = watch::channel(());
                        e.state.phase = Phase::Stopping;
                        e.busy = Some(rx);
                        break (e.state.clone(), tx);
                    }
                }
            };
            let mut wait = wait;
            let _ = wait.changed().await;
        };
        let result = self.destroy(&st).await;
        let mut pods = self.pods();
        match result {
            Ok(()) => {
                pods.remove(id);
                drop(pods);
                drop(done);
                info!(self.deps.log, "podvm stopped"; "sandbox" => id);
                Ok(())
            }
            Err(e) => {
                if let Some(entry) = pods.get_mut(id) {
                    entry.state.proxy = None;
                    entry.busy = None;
                }
                drop(pods);
                drop(done);
                error!(self.deps.log, "StopVM failed"; "sandbox" => id, "error" => &e);
                Err(Error::Failed(format!("sandbox {id}: {e}; StopVM again to retry")))
            }
        }
    }

    fn claimed(&self, id: &str) -> bool {
        std::os::unix::net::UnixStream::connect(self.deps.sbs_dir.join(id).join("shim-monitor.sock")).is_ok()
    }

    /// On start: keeps podvms claimed by a live shim whose processes live, destroys every other
    /// one with a state dir, and deletes the provider's podvms of this owner that nothing keeps.
    pub async fn recover(&self) -> Recovery {
        let mut report = Recovery::default();
        let mut kept_instances = BTreeSet::new();
        // List first: a provider may find its podvms through files in the run dirs, which the
        // loop below removes. Dirs without a usable state are removed only after the orphans.
        let listed = self.deps.provider.list_instances().await;
        let mut leftovers = Vec::new();
        let entries = match std::fs::read_dir(&self.cfg.state_dir) {
            Ok(rd) => rd.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()).collect::<Vec<_>>(),
            Err(_) => Vec::new(),
        };
        for dir in entries {
            let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let st = match state::read(&dir) {
                Ok(s) if s.sandbox_id == id => s,
                Ok(s) => {
                    warn!(self.deps.log, "state dir names another sandbox; removing it"; "dir" => %dir.display(), "sandbox" => &s.sandbox_id);
                    leftovers.push(dir);
                    report.destroyed.push(id);
                    continue;
                }
                Err(e) => {
                    warn!(self.deps.log, "unreadable podvm state; removing it (the provider listing catches its podvm)"; "error" => e);
                    leftovers.push(dir);
                    report.destroyed.push(id);
                    continue;
                }
            };
            let alive = match st.phase {
                Phase::Created => true,
                Phase::Running => {
                    let vmm_ok = match st.instance.as_ref().map(|i| (i.vmm_pid, i.vmm_start_time)) {
                        Some((Some(pid), Some(start_time))) => ProcessRef { pid, start_time }.alive(),
                        Some(_) => true,
                        None => false,
                    };
                    vmm_ok && st.proxy.is_some_and(|p| p.alive()) && crate::proxy::socket_path(&dir).exists()
                }
                Phase::Starting | Phase::Stopping => false,
            };
            let claimed = self.claimed(&id);
            if claimed && alive {
                if let Some(i) = &st.instance {
                    kept_instances.insert(i.id.clone());
                }
                info!(self.deps.log, "reattached podvm"; "sandbox" => &id, "phase" => ?st.phase);
                self.pods()
                    .insert(id.clone(), Entry { state: st, cancel: Arc::new(AtomicBool::new(false)), busy: None });
                report.reattached.push(id);
            } else {
                info!(self.deps.log, "destroying podvm no live sandbox claims"; "sandbox" => &id, "claimed" => claimed, "alive" => alive);
                if let Some(i) = &st.instance {
                    kept_instances.insert(i.id.clone()); // handled here, not as an orphan
                }
                if let Err(e) = self.destroy(&st).await {
                    error!(self.deps.log, "cannot destroy podvm"; "sandbox" => &id, "error" => e);
                    if let Some(i) = &st.instance {
                        kept_instances.remove(&i.id);
                    }
                }
                report.destroyed.push(id);
            }
        }
        match listed {
            Ok(list) => {
                for i in list {
                    let ours = i.tags.get(TAG_OWNER).is_none_or(|o| *o == self.deps.owner);
                    if !ours || kept_instances.contains(&i.id) {
                        continue;
                    }
                    info!(self.deps.log, "deleting orphan podvm"; "instance" => &i.id, "sandbox" => &i.sandbox_id);
                    match self.deps.provider.delete_instance(&i).await {
                        Ok(()) => report.orphans.push(i.id),
                        Err(e) => {
                            error!(self.deps.log, "cannot delete orphan podvm"; "instance" => &i.id, "error" => %e)
                        }
                    }
                }
            }
            Err(e) => error!(self.deps.log, "cannot list podvms for garbage collection"; "error" => %e),
        }
        for dir in leftovers {
            let _ = std::fs::remove_dir_all(&dir);
        }
        report
    }
}

/// The ttrpc face of [`Core`].
pub struct HypervisorService(pub Arc<Core>);

#[async_trait]
impl hypervisor_ttrpc::Hypervisor for HypervisorService {
    async fn create_vm(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: pb::CreateVMRequest,
    ) -> ttrpc::Result<pb::CreateVMResponse> {
        let annotations: BTreeMap<String, String> = req.annotations.into_iter().collect();
        let path = self.0.create_vm(&req.id, annotations, &req.networkNamespacePath)?;
        Ok(pb::CreateVMResponse { agentSocketPath: path.to_string_lossy().into_owned(), ..Default::default() })
    }

    async fn start_vm(
        &self,
        ctx: &ttrpc::r#async::TtrpcContext,
        req: pb::StartVMRequest,
    ) -> ttrpc::Result<pb::StartVMResponse> {
        let timeout =
            if ctx.timeout_nano > 0 { Duration::from_nanos(ctx.timeout_nano as u64) } else { DEFAULT_START_TIMEOUT };
        self.0.start_vm(&req.id, timeout).await?;
        Ok(pb::StartVMResponse::default())
    }

    async fn stop_vm(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        req: pb::StopVMRequest,
    ) -> ttrpc::Result<pb::StopVMResponse> {
        self.0.stop_vm(&req.id).await?;
        Ok(pb::StopVMResponse::default())
    }

    async fn version(
        &self,
        _ctx: &ttrpc::r#async::TtrpcContext,
        _req: pb::VersionRequest,
    ) -> ttrpc::Result<pb::VersionResponse> {
        Ok(pb::VersionResponse { version: self.0.version(), ..Default::default() })
    }
}

/// A running ttrpc server on the service socket.
pub struct Listening {
    server: ttrpc::r#async::Server,
    socket: PathBuf,
}

impl Listening {
    /// Stops serving and removes the socket. Podvms keep running.
    pub async fn shutdown(mut self) {
        let _ = self.server.shutdown().await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Binds `socket` (refusing one a live service holds) and serves `core` on it.
pub async fn listen(core: Arc<Core>, socket: &Path) -> Result<Listening, String> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Err(format!(
            "{} is in use: another remote hypervisor service runs; stop it or pass another --socket",
            socket.display()
        ));
    }
    let _ = std::fs::remove_file(socket);
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let service = hypervisor_ttrpc::create_hypervisor(Arc::new(HypervisorService(core)));
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?
        .register_service(service);
    server.start().await.map_err(|e| format!("cannot serve on {}: {e}", socket.display()))?;
    Ok(Listening { server, socket: socket.to_owned() })
}

/// The address of this host in the owner tag: its hostname.
pub fn default_owner() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn types() -> Vec<InstanceType> {
        [("small", 1, 512), ("medium", 2, 1024), ("large", 4, 2048)]
            .iter()
            .map(|(n, c, m)| InstanceType { name: n.to_string(), vcpus: *c, memory_mib: *m })
            .collect()
    }

    #[test]
    fn instance_type_selection_table() {
        let all = types();
        let default = all[1].clone();
        let a = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()
        };
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [InstanceType], Result<&'a str, &'a str>);
        let cases: &[Case] = &[
            (&[], &all, Ok("medium")),
            (&[(ANNO_MACHINE_TYPE, "large")], &all, Ok("large")),
            (&[(ANNO_MACHINE_TYPE, "  "), (ANNO_VCPUS, "1")], &all, Ok("small")),
            (&[(ANNO_MACHINE_TYPE, "large"), (ANNO_VCPUS, "1")], &all, Ok("large")),
            (&[(ANNO_VCPUS, "2")], &all, Ok("medium")),
            (&[(ANNO_MEMORY, "513")], &all, Ok("medium")),
            (&[(ANNO_VCPUS, "1"), (ANNO_MEMORY, "2048")], &all, Ok("large")),
            (&[(ANNO_VCPUS, "3")], &all, Ok("large")),
            (&[(ANNO_VCPUS, "2")], &all[..1], Err("no allowed instance type has 2 vCPUs")),
            (&[(ANNO_MEMORY, "4096")], &all, Err("allowed: small 1/512 MiB")),
            (&[(ANNO_MACHINE_TYPE, "huge")], &all, Err("\"huge\" (annotation io.katacontainers.config.hypervisor.machine_type) is not allowed on this node; use one of: small, medium, large")),
            (&[(ANNO_MACHINE_TYPE, "large")], &all[..2], Err("use one of: small, medium")),
            (&[(ANNO_VCPUS, "two")], &all, Err("default_vcpus=\"two\": write a whole number")),
            (&[(ANNO_VCPUS, "0"), (ANNO_MEMORY, "0")], &all, Ok("medium")),
        ];
        for (annos, allowed, want) in cases {
            let got = choose_instance_type(&a(annos), allowed, &default);
            match (want, got) {
                (Ok(n), Ok(t)) => assert_eq!(&t.name, n, "{annos:?}"),
                (Err(m), Err(e)) => assert!(e.to_string().contains(m), "{annos:?}: {e}"),
                (w, g) => panic!("{annos:?}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn instance_names() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(instance_name(Some("nginx"), id), "podvm-nginx-01234567");
        assert_eq!(instance_name(Some("My_Pod.x"), id), "podvm-my-pod-x-01234567");
        assert_eq!(instance_name(None, id), "podvm-01234567");
        let long = instance_name(Some(&"a".repeat(200)), id);
        assert!(long.len() <= 63 && long.ends_with("-01234567"), "{long}");
    }
}
