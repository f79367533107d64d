//! Fakes for the service core: a provider whose "VMM" is a `sleep` child and whose "agent" is a
//! mutual-TLS echo server on 127.0.0.N built from the user data it is given; a recording pod
//! tunnel; an rcgen TLS issuer.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use podvisor_remote_hypervisor::config::{parse_env, Config};
use podvisor_remote_hypervisor::interfaces::{PodTunnel, PodvmTls, TlsIssuer, TunnelSpec, TunnelState};
use podvisor_remote_hypervisor::provider::{Instance, InstanceRequest, InstanceType, Provider, ProviderError};
use podvisor_remote_hypervisor::service::{Core, Deps};
use podvisor_remote_hypervisor::state::ProcessRef;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static NEXT_IP: AtomicU8 = AtomicU8::new(2);

/// 127.0.0.N, unique within the test process (so parallel tests' agents never collide).
pub fn next_ip() -> IpAddr {
    let n = NEXT_IP.fetch_add(1, Ordering::SeqCst);
    assert!(n < 250, "fake provider ran out of loopback addresses");
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

pub struct FakeVm {
    pub instance: Instance,
    child: Option<std::process::Child>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl FakeVm {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }
}

#[derive(Default)]
pub struct FakeProvider {
    pub vms: Mutex<HashMap<String, FakeVm>>,
    pub requests: Mutex<Vec<InstanceRequest>>,
    pub deleted: Mutex<Vec<String>>,
    /// create_instance fails.
    pub fail_create: AtomicBool,
    /// The agent never listens.
    pub no_agent: AtomicBool,
    /// create_instance waits for this to be notified (when set).
    pub gate: Mutex<Option<Arc<tokio::sync::Notify>>>,
    pub agent_port: u16,
}

impl FakeProvider {
    pub fn new(agent_port: u16) -> Arc<FakeProvider> {
        Arc::new(FakeProvider { agent_port, ..Default::default() })
    }

    pub fn vmm_of(&self, sandbox: &str) -> Option<ProcessRef> {
        let vms = self.vms.lock().unwrap();
        let vm = vms.values().find(|v| v.instance.sandbox_id == sandbox)?;
        Some(ProcessRef { pid: vm.instance.vmm_pid?, start_time: vm.instance.vmm_start_time? })
    }

    /// Kills a podvm's "VMM" behind the service's back.
    pub fn crash(&self, sandbox: &str) {
        let mut vms = self.vms.lock().unwrap();
        if let Some(vm) = vms.values_mut().find(|v| v.instance.sandbox_id == sandbox) {
            vm.kill();
        }
    }

    pub fn count(&self) -> usize {
        self.vms.lock().unwrap().len()
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[async_trait]
impl Provider for FakeProvider {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn instance_types(&self) -> Vec<InstanceType> {
        [("small", 1, 512), ("medium", 2, 1024), ("large", 4, 2048)]
            .iter()
            .map(|(n, c, m)| InstanceType { name: n.to_string(), vcpus: *c, memory_mib: *m })
            .collect()
    }
    fn worker_address(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(172, 31, 250, 1))
    }
    async fn create_instance(&self, req: InstanceRequest) -> Result<Instance, ProviderError> {
        self.requests.lock().unwrap().push(req.clone());
        let gate = self.gate.lock().unwrap().clone();
        if let Some(g) = gate {
            g.notified().await;
        }
        if self.fail_create.load(Ordering::SeqCst) {
            return Err(ProviderError("fake: out of capacity".into()));
        }
        let child = std::process::Command::new("sleep")
            .arg("1000")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| ProviderError(e.to_string()))?;
        let vmm = ProcessRef::of(child.id()).unwrap();
        let ip = next_ip();
        let server = if self.no_agent.load(Ordering::SeqCst) {
            None
        } else {
            let addr = SocketAddr::new(ip, self.agent_port);
            let listener =
                tokio::net::TcpListener::bind(addr).await.map_err(|e| ProviderError(format!("{addr}: {e}")))?;
            Some(tokio::spawn(echo_agent(listener, req.user_data.tls.clone())))
        };
        let instance = Instance {
            id: format!("fake-{}", req.sandbox_id),
            sandbox_id: req.sandbox_id.clone(),
            ip,
            vmm_pid: Some(vmm.pid),
            vmm_start_time: Some(vmm.start_time),
            tags: req.tags.clone(),
        };
        self.vms
            .lock()
            .unwrap()
            .insert(instance.id.clone(), FakeVm { instance: instance.clone(), child: Some(child), server });
        Ok(instance)
    }
    async fn delete_instance(&self, instance: &Instance) -> Result<(), ProviderError> {
        if let Some(mut vm) = self.vms.lock().unwrap().remove(&instance.id) {
            vm.kill();
        }
        self.deleted.lock().unwrap().push(instance.id.clone());
        Ok(())
    }
    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError> {
        Ok(self.vms.lock().unwrap().values().map(|v| v.instance.clone()).collect())
    }
}

/// The podvm agent's TLS side: TLS 1.3 with the user data's server certificate, client
/// certificates required and chained to the user data's CA; echoes what it reads.
pub async fn echo_agent(listener: tokio::net::TcpListener, tls: podvisor_remote_hypervisor::provider::AgentTls) {
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(tls.ca_cert.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let chain: Vec<_> = CertificateDer::pem_slice_iter(tls.server_cert.as_bytes()).map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_slice(tls.server_key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((tcp, _)) = listener.accept().await else { return };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(mut s) = acceptor.accept(tcp).await else { return };
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
}

#[derive(Default)]
pub struct FakeTunnel {
    pub setups: Mutex<Vec<TunnelSpec>>,
    pub teardowns: Mutex<Vec<TunnelSpec>>,
    pub fail_setup: AtomicBool,
}

#[async_trait]
impl PodTunnel for FakeTunnel {
    async fn pod_mac(&self, _netns: &Path) -> Result<String, String> {
        Ok("aa:bb:cc:dd:ee:01".into())
    }
    async fn setup(&self, spec: &TunnelSpec) -> Result<TunnelState, String> {
        if self.fail_setup.load(Ordering::SeqCst) {
            return Err("fake: cannot create vxlan device".into());
        }
        self.setups.lock().unwrap().push(spec.clone());
        Ok(TunnelState { spec: spec.clone(), devices: vec![format!("vx{}", spec.vni), "vxlan0".into()] })
    }
    async fn teardown(&self, state: &TunnelState) -> Result<(), String> {
        self.teardowns.lock().unwrap().push(state.spec.clone());
        Ok(())
    }
}

impl FakeTunnel {
    /// Tunnels set up and not torn down.
    pub fn live(&self) -> usize {
        let down = self.teardowns.lock().unwrap();
        self.setups.lock().unwrap().iter().filter(|s| !down.contains(s)).count()
    }
}

/// A fresh CA per podvm, made with rcgen (ECDSA P-256).
pub struct RcgenIssuer;

impl TlsIssuer for RcgenIssuer {
    fn issue(&self, podvm_name: &str) -> Result<PodvmTls, String> {
        let server_name = podvisor_remote_hypervisor::tlsclient::PODVM_SERVER_NAME;
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        let e = |e: rcgen::Error| e.to_string();
        let ca_key = KeyPair::generate().map_err(e)?;
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, format!("podvm test CA {podvm_name}"));
        let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
        let server_key = KeyPair::generate().map_err(e)?;
        let mut sp = CertificateParams::new(vec![server_name.to_owned()]).map_err(e)?;
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = sp.signed_by(&server_key, &ca_cert, &ca_key).map_err(e)?;
        let client_key = KeyPair::generate().map_err(e)?;
        let mut cp = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        cp.distinguished_name.push(DnType::CommonName, "podvisor-remote-hypervisor");
        let client = cp.signed_by(&client_key, &ca_cert, &ca_key).map_err(e)?;
        Ok(PodvmTls {
            ca_cert: ca_cert.pem(),
            server_cert: server.pem(),
            server_key: server_key.serialize_pem(),
            client_cert: client.pem(),
            client_key: client_key.serialize_pem(),
        })
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub provider: Arc<FakeProvider>,
    pub tunnel: Arc<FakeTunnel>,
    pub env: String,
}

impl Harness {
    pub fn new(env: &str) -> Harness {
        let port = free_port();
        Harness {
            dir: tempfile::tempdir().unwrap(),
            provider: FakeProvider::new(port),
            tunnel: Arc::new(FakeTunnel::default()),
            env: env.to_owned(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("podvms")
    }

    pub fn sbs_dir(&self) -> PathBuf {
        self.dir.path().join("sbs")
    }

    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("peer-pods-cm.env")
    }

    /// A core over the fakes (a new one per call: a "restarted service").
    pub fn core(&self) -> Arc<Core> {
        let path = self.config_file();
        std::fs::write(&path, &self.env).unwrap();
        let mut cfg = Config::from_env(&path, &parse_env(&path, &self.env).unwrap()).unwrap();
        cfg.state_dir = self.state_dir();
        cfg.socket = self.dir.path().join("hypervisor.sock");
        let deps = Deps {
            provider: self.provider.clone(),
            tls: Arc::new(RcgenIssuer),
            tunnel: self.tunnel.clone(),
            proxy_exe: PathBuf::from(env!("CARGO_BIN_EXE_podvisor-remote-hypervisor")),
            sbs_dir: self.sbs_dir(),
            agent_port: self.provider.agent_port,
            owner: "test-node".into(),
            log: slog::Logger::root(slog::Discard, slog::o!()),
        };
        Core::new(cfg, deps).unwrap()
    }

    /// Makes the sandbox look claimed by a live shim: a listening `shim-monitor.sock`.
    pub fn claim(&self, id: &str) -> std::os::unix::net::UnixListener {
        let d = self.sbs_dir().join(id);
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::net::UnixListener::bind(d.join("shim-monitor.sock")).unwrap()
    }
}

pub fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Sends `ping` through a pod's agent.sock and expects it echoed by the fake agent.
pub async fn ping(sock: &Path) -> Result<(), String> {
    let mut s = tokio::net::UnixStream::connect(sock).await.map_err(|e| format!("{}: {e}", sock.display()))?;
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .map_err(|_| "no echo within 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    if &buf == b"ping" {
        Ok(())
    } else {
        Err(format!("echo {buf:?}"))
    }
}

/// Waits (up to 10 s, a failure cap, not a speed check) for `cond`.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < end, "{what}: not within 10 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Processes whose command line mentions `path` (the proxies of a test's state dir).
pub fn processes_mentioning(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().into_owned();
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .filter(|pid| ProcessRef::of(*pid).is_some_and(|p| p.alive()))
        .collect()
}
