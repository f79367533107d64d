//! The agent in podvm mode (peer pods) in a real VM: our guest image booted by QEMU (TCG) with
//! `agent.podvm`, no vsock, one virtio-net NIC on a tap in a test bridge, and the user data
//! (generated here: a CA, server and client certificates) delivered with `-fw_cfg`. From the
//! host: mutual TLS to the podvm's 15150, the agent's ttrpc API over it, refusals of clients
//! without a certificate or with one of another CA, `pvm0` and `vxlan0` as the user data asks,
//! the shim's UpdateInterface/UpdateRoutes on the tunnel leaving `pvm0` alone.
//!
//! Needs root, `qemu-system-x86_64`, `ip` and the guest image (`make guest-image`); a missing
//! one fails the test naming it. Uses the bridge subnet 172.31.251.0/24 (the remote hypervisor
//! service's default is 172.31.250.0/24).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_protocol::agent::{
    ListInterfacesRequest, ListRoutesRequest, Routes, UpdateInterfaceRequest, UpdateRoutesRequest,
};
use agent_protocol::agent_ttrpc::AgentServiceClient;
use agent_protocol::health::CheckRequest;
use agent_protocol::health_ttrpc::HealthClient;
use agent_protocol::types::{IPAddress, Interface, Route};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BRIDGE_IP: &str = "172.31.251.1";
const PODVM_IP: &str = "172.31.251.10";
const PODVM_MAC: &str = "52:54:00:fb:00:0a";
const POD_MAC: &str = "aa:bb:cc:fb:00:0b";
const PORT: u16 = 15150;

fn need(ok: bool, what: &str) {
    assert!(ok, "missing prerequisite: {what}");
}

fn which(bin: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ip(args: &str) -> Result<String, String> {
    let out = Command::new("ip").args(args.split_whitespace()).output().map_err(|e| format!("ip {args}: {e}"))?;
    if !out.status.success() {
        return Err(format!("ip {args}: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Everything the test creates on the host; removed on drop (also when the test fails).
struct Host {
    bridge: String,
    tap: String,
    dir: PathBuf,
    qemu: Option<Child>,
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            let _ = q.kill();
            let _ = q.wait();
        }
        let _ = ip(&format!("link del {}", self.tap));
        let _ = ip(&format!("link del {}", self.bridge));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
    other_cert: String,
    other_key: String,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(issuer: &CertifiedIssuer<'static, KeyPair>, name: &str, san_ip: Option<IpAddr>) -> (String, String) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    if let Some(ip) = san_ip {
        p.subject_alt_names = vec![SanType::IpAddress(ip)];
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki() -> Pki {
    let ca1 = ca("podvm-test CA");
    let (server_cert, server_key) = leaf(&ca1, "podvm", Some(PODVM_IP.parse().unwrap()));
    let (client_cert, client_key) = leaf(&ca1, "podvisor-remote-hypervisor", None);
    let ca2 = ca("another CA");
    let (other_cert, other_key) = leaf(&ca2, "podvisor-remote-hypervisor", None);
    Pki { ca: ca1.pem(), server_cert, server_key, client_cert, client_key, other_cert, other_key }
}

#[allow(deprecated)] // ring's provider, as the agent and the service use (no aws-lc)
fn connector(ca: &str, client: Option<(&str, &str)>) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some((c, k)) => b
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn dial(ca: &str, client: Option<(&str, &str)>) -> Result<Tls, String> {
    let addr = SocketAddr::new(PODVM_IP.parse().unwrap(), PORT);
    let tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect {addr}: timed out"))?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let name = ServerName::IpAddress(PODVM_IP.parse::<IpAddr>().unwrap().into());
    tokio::time::timeout(Duration::from_secs(30), connector(ca, client).connect(name, tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|e| format!("TLS handshake: {e}"))
}

/// A refused client: the handshake fails, or (TLS 1.3: the client's side completes before the
/// server checked its certificate) the first read ends in an alert or EOF.
async fn refused(ca: &str, client: Option<(&str, &str)>) -> String {
    let mut s = match dial(ca, client).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    // A well-formed ttrpc request would be answered; the server must not even read it.
    let _ = s.write_all(&[0, 0, 0, 0, 0, 0, 0, 1, 1, 0]).await;
    let mut b = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(15), s.read(&mut b)).await {
        Ok(Ok(0)) => "closed".into(),
        Ok(Ok(n)) => panic!("a refused client read {n} bytes from the agent"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("a refused client's connection stayed open for 15 s"),
    }
}

fn console(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("console.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podvm_agent_serves_mutual_tls_and_sets_up_its_network() {
    need(nix::unistd::geteuid().is_root(), "root (the test creates a bridge and a tap)");
    need(which("qemu-system-x86_64"), "qemu-system-x86_64 (apt-get install qemu-system-x86)");
    need(which("ip"), "ip (apt-get install iproute2)");
    let kernel = podvisor_tests::guest_asset("vmlinux.container");
    let initrd = podvisor_tests::guest_asset("kata-containers-initrd.img");
    need(kernel.exists() && initrd.exists(), &format!("the guest image {} (make guest-image)", initrd.display()));
    let routes = ip("-4 route show").unwrap();
    need(
        !routes.contains("172.31.251."),
        &format!("a free 172.31.251.0/24 on this host; it is routed already:\n{routes}"),
    );

    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("podvisor-podvm-agent-{pid}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut host = Host { bridge: format!("pvmtb{pid}"), tap: format!("pvmtt{pid}"), dir: dir.clone(), qemu: None };
    host.bridge.truncate(15);
    host.tap.truncate(15);
    ip(&format!("link add {} type bridge", host.bridge)).unwrap();
    ip(&format!("addr add {BRIDGE_IP}/24 dev {}", host.bridge)).unwrap();
    ip(&format!("link set {} up", host.bridge)).unwrap();
    ip(&format!("tuntap add dev {} mode tap", host.tap)).unwrap();
    ip(&format!("link set {} master {} up", host.tap, host.bridge)).unwrap();

    let pki = pki();
    let user_data = serde_json::json!({
        "version": 1,
        "network": { "mac": PODVM_MAC, "address": format!("{PODVM_IP}/24"), "gateway": BRIDGE_IP },
        "listen_port": PORT,
        "tls": { "ca_cert": pki.ca, "server_cert": pki.server_cert, "server_key": pki.server_key },
        "tunnel": { "type": "vxlan", "vni": 555123, "remote": BRIDGE_IP, "port": 4789, "pod_mac": POD_MAC, "mtu": 1450 }
    });
    let ud = dir.join("user-data.json");
    std::fs::write(&ud, user_data.to_string()).unwrap();
    let params = format!(
        "{} agent.log=debug agent.podvm agent.insecure_registries=172.31.251.1:5000",
        hypervisor::qemu::cmdline::BASE_KERNEL_PARAMS
    );
    let log = std::fs::File::create(dir.join("qemu.log")).unwrap();
    let started = Instant::now();
    host.qemu = Some(
        Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-machine", "q35", "-m", "512M", "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", dir.join("console.log").display()))
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &params])
            .arg("-netdev")
            .arg(format!("tap,id=n0,ifname={},script=no,downscript=no,vhost=off", host.tap))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=n0,mac={PODVM_MAC}"))
            .arg("-fw_cfg")
            .arg(format!("name=opt/io.podvisor/podvm,file={}", ud.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn qemu-system-x86_64"),
    );

    // The agent answers mutual TLS once it configured pvm0 and listens.
    let tls = loop {
        if let Some(status) = host.qemu.as_mut().unwrap().try_wait().unwrap() {
            panic!(
                "QEMU exited ({status}) before the agent listened.\nqemu: {}\nconsole:\n{}",
                std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default(),
                console(&dir)
            );
        }
        match dial(&pki.ca, Some((&pki.client_cert, &pki.client_key))).await {
            Ok(s) => break s,
            Err(e) if started.elapsed() > Duration::from_secs(120) => {
                panic!(
                    "the podvm agent did not answer on {PODVM_IP}:{PORT} within 120 s: {e}\nconsole:\n{}",
                    console(&dir)
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    };
    eprintln!("podvm agent reachable over mutual TLS after {:?}", started.elapsed());

    let client = ttrpc::asynchronous::Client::new(ttrpc::asynchronous::transport::Socket::new(tls));
    let ctx = || ttrpc::context::with_timeout(20_000_000_000);
    let health = HealthClient::new(client.clone());
    let agent = AgentServiceClient::new(client.clone());
    let status = health.check(ctx(), &CheckRequest::new()).await.expect("grpc.Health/Check over mutual TLS");
    assert_eq!(status.status.enum_value(), Ok(agent_protocol::health::health_check_response::ServingStatus::SERVING));

    let ifaces = agent.list_interfaces(ctx(), &ListInterfacesRequest::new()).await.expect("ListInterfaces").Interfaces;
    let find = |name: &str| ifaces.iter().find(|i| i.name == name).cloned();
    let pvm0 = find("pvm0").unwrap_or_else(|| panic!("no pvm0: {ifaces:?}"));
    assert_eq!(pvm0.hwAddr, PODVM_MAC);
    assert!(pvm0.IPAddresses.iter().any(|a| a.address == PODVM_IP && a.mask == "24"), "{pvm0:?}");
    let vxlan0 = find("vxlan0").unwrap_or_else(|| panic!("no vxlan0: {ifaces:?}"));
    assert_eq!((vxlan0.hwAddr.as_str(), vxlan0.mtu, vxlan0.type_.as_str()), (POD_MAC, 1450, "vxlan"), "{vxlan0:?}");
    assert!(vxlan0.IPAddresses.iter().all(|a| a.family.enum_value() != Ok(agent_protocol::types::IPFamily::v4)));
    assert!(vxlan0.raw_flags & 1 != 0, "vxlan0 is up: {vxlan0:?}");
    let routes = agent.list_routes(ctx(), &ListRoutesRequest::new()).await.expect("ListRoutes").Routes;
    assert!(routes.iter().all(|r| !r.dest.is_empty()), "no default route before the pod's: {routes:?}");
    assert!(routes.iter().any(|r| r.dest == "172.31.251.0/24" && r.device == "pvm0"), "{routes:?}");

    // What the shim does next: the pod interface by MAC (named eth0, the pod IP), its routes.
    let req = UpdateInterfaceRequest {
        interface: Some(Interface {
            name: "eth0".into(),
            hwAddr: POD_MAC.into(),
            mtu: 1450,
            IPAddresses: vec![IPAddress { address: "10.88.7.5".into(), mask: "24".into(), ..Default::default() }],
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let eth0 = agent.update_interface(ctx(), &req).await.expect("UpdateInterface on the tunnel");
    assert_eq!((eth0.name.as_str(), eth0.hwAddr.as_str()), ("eth0", POD_MAC));
    let route = |dest: &str, gw: &str, scope| Route {
        dest: dest.into(),
        gateway: gw.into(),
        device: "eth0".into(),
        scope,
        ..Default::default()
    };
    let req = UpdateRoutesRequest {
        routes: Some(Routes {
            Routes: vec![route("10.88.7.0/24", "", 253), route("", "10.88.7.1", 0)],
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let routes = agent.update_routes(ctx(), &req).await.expect("UpdateRoutes on the tunnel").Routes;
    assert!(routes.iter().any(|r| r.dest.is_empty() && r.gateway == "10.88.7.1" && r.device == "eth0"), "{routes:?}");
    assert!(
        routes.iter().any(|r| r.dest == "172.31.251.0/24" && r.device == "pvm0"),
        "pvm0 keeps its route: {routes:?}"
    );
    // The pod may not take the underlay.
    let bad = UpdateRoutesRequest {
        routes: Some(Routes {
            Routes: vec![Route {
                dest: "10.0.0.0/8".into(),
                gateway: BRIDGE_IP.into(),
                device: "pvm0".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let e = agent.update_routes(ctx(), &bad).await.expect_err("a route on pvm0 is refused").to_string();
    assert!(e.contains("pvm0") && e.contains("underlay"), "{e}");
    // The agent still answers on the same connection after the pod's network changed.
    health.check(ctx(), &CheckRequest::new()).await.expect("Health/Check after UpdateRoutes");

    // Clients without a certificate of the podvm's CA are refused, and the agent keeps serving.
    // The server's TLS alert names the reason (a mere close could also be ttrpc dropping the
    // probe's bytes, so it would not prove the refusal).
    let e = refused(&pki.ca, None).await;
    assert!(e.contains("CertificateRequired"), "no client certificate: {e}");
    let e = refused(&pki.ca, Some((&pki.other_cert, &pki.other_key))).await;
    assert!(e.contains("UnknownCA") || e.contains("BadCertificate"), "client certificate of another CA: {e}");
    let second = dial(&pki.ca, Some((&pki.client_cert, &pki.client_key))).await.expect("a second mutual-TLS client");
    let c2 = ttrpc::asynchronous::Client::new(ttrpc::asynchronous::transport::Socket::new(second));
    HealthClient::new(c2).check(ctx(), &CheckRequest::new()).await.expect("Health/Check on a second connection");

    // The TLS key is not left in sysfs.
    let out = console(&dir);
    assert!(out.contains("qemu_fw_cfg unloaded"), "qemu_fw_cfg was not unloaded:\n{out}");
    assert!(!out.contains("FATAL"), "{out}");

    // DestroySandbox powers the podvm off.
    let _ = agent.destroy_sandbox(ctx(), &Default::default()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let q = host.qemu.as_mut().unwrap();
    while q.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "QEMU still runs 30 s after DestroySandbox");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(host);
    assert!(ip("link show").unwrap().lines().all(|l| !l.contains(&format!("pvmtb{pid}"))), "bridge left behind");
    assert!(!dir.exists());
}
