//! The qemu provider with real QEMU under TCG (root: bridge, tap). The guest image is the
//! worktree's `build/guest/` unless `QEMU_PODVM_KERNEL` / `QEMU_PODVM_INITRD` are set in the
//! test's environment.
//!
//! - `podvm_boots_and_is_deleted_cleanly`: QEMU runs detached with our command line (all RAM a
//!   shared memfd, virtio-net on a tap of the bridge with vhost=off, no vsock, the user data as
//!   fw_cfg), the kernel boots with `agent.podvm`, `list_instances` finds it by owner, and
//!   `delete_instance` leaves no process, tap or file.
//! - `podvm_agent_answers_mutual_tls`: the agent in the podvm (podvm mode) completes a TLS 1.3
//!   handshake on 15150 with the service's client certificate, and refuses a client of another
//!   CA. Needs an agent with podvm mode in the guest image.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use podvisor_remote_hypervisor::provider::{Instance, InstanceRequest, InstanceType, Provider, UserData};
use podvisor_remote_hypervisor::qemu::{QemuProvider, QemuSettings};
use podvisor_remote_hypervisor::tls;

/// The tests run one at a time: taps are named by the podvm's host number (`ppt<N>`), so two
/// test bridges handing out the same first address would race for one tap name (one service
/// per node never does).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Everything one test makes; removed on drop (QEMU killed by pid + start time, bridge deleted).
struct Env {
    tag: String,
    run_root: PathBuf,
    bridge: String,
    provider: QemuProvider,
    made: Vec<Instance>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for i in &self.made {
            if let (Some(pid), Some(start)) = (i.vmm_pid, i.vmm_start_time) {
                if start_time(pid) == Some(start) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let _ = std::fs::remove_dir_all(&self.run_root);
        let _ = podvisor_remote_hypervisor::net::bridge::delete_link(&self.bridge);
    }
}

fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f[0] == "Z" {
        return None;
    }
    f.get(19)?.parse().ok()
}

fn image(key: &str, file: &str) -> PathBuf {
    let p = std::env::var_os(key)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest").join(file));
    assert!(p.is_file(), "guest image {} is missing: run `make guest-image` (or set {key})", p.display());
    p
}

/// `subnet` is the third octet of 172.31.x.1/24, distinct per test.
fn env(name: &str, subnet: u8) -> Env {
    assert!(nix::unistd::geteuid().is_root(), "this test needs root (bridge, tap)");
    let tag = format!("{}{name}", std::process::id() % 100000);
    let run_root = PathBuf::from(format!("/run/podvisor-test-qemu-{tag}"));
    let bridge = format!("pvq{tag}");
    let settings = QemuSettings::from_env(
        &[
            ("QEMU_BRIDGE", bridge.clone()),
            ("QEMU_BRIDGE_CIDR", format!("172.31.{subnet}.1/24")),
            ("QEMU_ACCEL", "tcg".into()),
            ("QEMU_DEBUG", "true".into()),
            ("INSECURE_REGISTRIES", format!("172.31.{subnet}.1:5555")),
            ("QEMU_PODVM_KERNEL", image("QEMU_PODVM_KERNEL", "vmlinux.container").display().to_string()),
            ("QEMU_PODVM_INITRD", image("QEMU_PODVM_INITRD", "kata-containers-initrd.img").display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        run_root.clone(),
        format!("test-{tag}"),
    )
    .unwrap();
    let provider = QemuProvider::new(settings).unwrap();
    Env { tag, run_root, bridge, provider, made: Vec::new() }
}

fn request(e: &Env, material: &tls::PodvmTls) -> InstanceRequest {
    let sandbox_id = format!("{}0123456789abcdef", e.tag);
    let name = format!("podvm-test-{}", &sandbox_id[..8]);
    InstanceRequest {
        sandbox_id: sandbox_id.clone(),
        name,
        instance_type: InstanceType { name: "small".into(), vcpus: 1, memory_mib: 512 },
        root_volume_gb: 6,
        tags: BTreeMap::from([
            ("podvisor.io/owner".to_string(), format!("test-{}", e.tag)),
            ("podvisor.io/sandbox-id".to_string(), sandbox_id.clone()),
            ("team".to_string(), "qa".to_string()),
        ]),
        user_data: UserData {
            version: 1,
            network: None,
            listen_port: 15150,
            tls: material.agent_tls(),
            tunnel: None,
            registry_auth: None,
        },
        run_dir: e.run_root.join(&sandbox_id),
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn console(run_dir: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(run_dir.join("console.log")).unwrap_or_default()).into_owned()
}

/// Deletes and checks that nothing is left.
async fn delete_and_check(e: &Env, i: &Instance, run_dir: &Path, tap: &str) {
    e.provider.delete_instance(i).await.unwrap();
    assert_eq!(start_time(i.vmm_pid.unwrap()), None, "QEMU is gone");
    wait_for("the tap to go", Duration::from_secs(5), || !Path::new("/sys/class/net").join(tap).exists());
    for f in ["podvm.json", "console.log", "qemu.log", "qmp.sock", "qemu-instance.json"] {
        assert!(!run_dir.join(f).exists(), "{f} is removed");
    }
    e.provider.delete_instance(i).await.expect("idempotent");
    assert!(e.provider.list_instances().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podvm_boots_and_is_deleted_cleanly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut e = env("b", 248);
    let material = tls::generate_unaddressed("podvm-test").unwrap();
    let req = request(&e, &material);
    let run_dir = req.run_dir.clone();
    let started = Instant::now();
    let i = e.provider.create_instance(req.clone()).await.unwrap();
    e.made.push(i.clone());
    eprintln!("create_instance: {:?} -> {} pid {:?}", started.elapsed(), i.ip, i.vmm_pid);

    let IpAddr::V4(ip) = i.ip else { panic!("{i:?}") };
    assert_eq!(ip.octets()[..3], [172, 31, 248], "{ip}");
    assert_eq!(i.tags.get("team").map(String::as_str), Some("qa"));
    let pid = i.vmm_pid.unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let qemu_log = std::fs::read_to_string(run_dir.join("qemu.log")).unwrap_or_default();
    assert_eq!(start_time(pid), i.vmm_start_time, "QEMU runs; qemu.log: {qemu_log}\nconsole: {}", console(&run_dir));

    // Own session, so a service restart does not take it down.
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid as i32))).unwrap();
    assert_eq!(sid.as_raw(), pid as i32, "QEMU leads its own session");

    // User data: network filled in, private.
    let ud_path = run_dir.join("podvm.json");
    assert_eq!(std::fs::metadata(&ud_path).unwrap().permissions().mode() & 0o777, 0o600);
    let ud: UserData = serde_json::from_slice(&std::fs::read(&ud_path).unwrap()).unwrap();
    let net = ud.network.as_ref().unwrap();
    assert_eq!(net.address, format!("{ip}/24"));
    assert_eq!(net.gateway, "172.31.248.1");
    assert_eq!(ud.tls, material.agent_tls());

    // The command line.
    let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    for want in [
        "memory-backend-memfd,id=mem0,size=512M,share=on",
        &format!("-netdev tap,id=net0,fd=3,vhost=off -device virtio-net-pci,id=nic0,netdev=net0,mac={}", net.mac),
        &format!("-fw_cfg name=opt/io.podvisor/podvm,file={}", ud_path.display()),
        "agent.podvm agent.insecure_registries=172.31.248.1:5000,172.31.248.1:5555",
        "accel=tcg",
    ] {
        assert!(argv.contains(want), "{want:?} in {argv}");
    }
    assert!(!argv.contains("vsock"), "no vsock: {argv}");

    // The tap is on the bridge.
    let tap = format!("ppt{}", ip.octets()[3]);
    let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).unwrap();
    assert_eq!(master.file_name().unwrap().to_str(), Some(e.bridge.as_str()));

    // A second podvm for the same sandbox is refused, and leaves the first alone.
    let e2 = e.provider.create_instance(req.clone()).await.unwrap_err().0;
    assert!(e2.contains("already has podvm"), "{e2}");
    assert!(ud_path.exists());

    // Listed by owner, with what create returned; another owner sees nothing.
    let listed = e.provider.list_instances().await.unwrap();
    assert_eq!(listed, vec![i.clone()]);
    let mut other = e.provider.settings().clone();
    other.owner = "someone-else".into();
    assert!(QemuProvider::new(other).unwrap().list_instances().await.unwrap().is_empty());

    // The kernel boots with our parameters; the console goes to console.log.
    wait_for("the kernel to boot", Duration::from_secs(120), || console(&run_dir).contains("Linux version"));
    let c = console(&run_dir);
    assert!(c.contains("agent.podvm"), "the kernel command line holds agent.podvm:\n{c}");
    eprintln!("console after boot ({} bytes):\n{}", c.len(), &c[c.len().saturating_sub(3000)..]);

    // A new provider (the service restarted) finds it and deletes it.
    let restarted = QemuProvider::new(e.provider.settings().clone()).unwrap();
    assert_eq!(restarted.list_instances().await.unwrap(), vec![i.clone()]);
    e.provider = restarted;
    delete_and_check(&e, &i, &run_dir, &tap).await;
    e.made.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_podvms_get_distinct_addresses_and_taps() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut e = env("c", 246);
    let material = tls::generate_unaddressed("podvm-test").unwrap();
    let mut a = request(&e, &material);
    let mut b = a.clone();
    for (r, suffix) in [(&mut a, "a"), (&mut b, "b")] {
        r.sandbox_id = format!("{}{suffix}", r.sandbox_id);
        r.name = format!("{}-{suffix}", r.name);
        r.run_dir = e.run_root.join(&r.sandbox_id);
    }
    let (ra, rb) = tokio::join!(e.provider.create_instance(a.clone()), e.provider.create_instance(b.clone()));
    let (ia, ib) = (ra.unwrap(), rb.unwrap());
    e.made.extend([ia.clone(), ib.clone()]);
    assert_ne!(ia.ip, ib.ip);
    let mut listed = e.provider.list_instances().await.unwrap();
    listed.sort_by(|x, y| x.sandbox_id.cmp(&y.sandbox_id));
    assert_eq!(listed, vec![ia.clone(), ib.clone()]);
    for (i, r) in [(&ia, &a), (&ib, &b)] {
        wait_for("the kernel to boot", Duration::from_secs(120), || console(&r.run_dir).contains("Linux version"));
        let IpAddr::V4(v4) = i.ip else { unreachable!() };
        let tap = format!("ppt{}", v4.octets()[3]);
        e.provider.delete_instance(i).await.unwrap();
        assert_eq!(start_time(i.vmm_pid.unwrap()), None);
        wait_for("the tap to go", Duration::from_secs(5), || !Path::new("/sys/class/net").join(&tap).exists());
    }
    assert!(e.provider.list_instances().await.unwrap().is_empty());
    e.made.clear();
}

fn handshake(ip: IpAddr, client: &tls::ClientTls) -> Result<(), String> {
    let sock = TcpStream::connect_timeout(&(ip, 15150).into(), Duration::from_secs(2)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn =
        rustls::ClientConnection::new(client.client_config().map_err(|e| e.to_string())?, tls::podvm_server_name())
            .map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    s.flush().map_err(|e| e.to_string())?;
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| format!("handshake: {e}"))?;
    }
    // The server verifies our certificate after its Finished; a refusal shows on the first read.
    s.sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => Ok(()),
        Ok(n) => Err(format!("the agent sent {n} bytes or closed unasked")),
        Err(e) => Err(format!("after the handshake: {e}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podvm_agent_answers_mutual_tls() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut e = env("t", 247);
    let material = tls::generate_unaddressed("podvm-test").unwrap();
    let req = request(&e, &material);
    let run_dir = req.run_dir.clone();
    let started = Instant::now();
    let i = e.provider.create_instance(req).await.unwrap();
    e.made.push(i.clone());
    let client = Arc::new(material.client());
    let deadline = Instant::now() + Duration::from_secs(300);
    while let Err(last) = handshake(i.ip, &client) {
        assert!(
            start_time(i.vmm_pid.unwrap()) == i.vmm_start_time,
            "the podvm's QEMU exited before its agent answered on 15150 (is podvm mode in the guest image?); console:\n{}",
            console(&run_dir)
        );
        assert!(
            Instant::now() < deadline,
            "no TLS handshake with the agent on {}:15150 within 300 s (last error: {last}); console:\n{}",
            i.ip,
            console(&run_dir)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("mutual TLS with the podvm agent {:?} after create_instance was called", started.elapsed());
    let foreign = tls::generate_unaddressed("other").unwrap();
    let mut wrong = foreign.client();
    wrong.ca_cert_pem = material.ca_cert_pem.clone();
    assert!(handshake(i.ip, &wrong).is_err(), "a client certificate of another CA is refused");
    let tap = match i.ip {
        IpAddr::V4(v4) => format!("ppt{}", v4.octets()[3]),
        IpAddr::V6(_) => unreachable!(),
    };
    delete_and_check(&e, &i, &run_dir, &tap).await;
    e.made.clear();
}
