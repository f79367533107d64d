//! Pod networking end to end: a pod netns with a veth whose peer lives in another netns, a VM
//! booted into it (tap + tc redirects, QEMU in the netns), the guest configured by the agent and
//! answering ping from the peer; and nothing of it left afterwards, on every path.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use podvisor_shim::config::{AgentConfig, Config};
use podvisor_shim::sandbox::Sandbox;
use podvisor_tests::*;

/// Runs a command; panics with its stderr when it fails.
fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pod netns (`eth0` = 10.200.<x>.2/24, default route via .1, one permanent neighbour) and a
/// peer netns (`veth0` = 10.200.<x>.1/24) joined by a veth pair; both deleted on drop, and the
/// shared directory with them.
struct Netns {
    pod: String,
    peer: String,
    x: u32,
    shared: PathBuf,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let ns = Netns {
            pod: format!("podvisor-nt-{pid}-{n}"),
            peer: format!("podvisor-np-{pid}-{n}"),
            x: n + 1,
            shared: std::env::temp_dir().join(format!("podvisor-nt-share-{pid}-{n}")),
        };
        std::fs::create_dir_all(&ns.shared).unwrap();
        let (pod, peer, x) = (ns.pod.as_str(), ns.peer.as_str(), ns.x);
        run(&["ip", "netns", "add", pod]);
        run(&["ip", "netns", "add", peer]);
        run(&["ip", "link", "add", "eth0", "netns", pod, "type", "veth", "peer", "name", "veth0", "netns", peer]);
        run(&["ip", "-n", peer, "addr", "add", &format!("10.200.{x}.1/24"), "dev", "veth0"]);
        run(&["ip", "-n", peer, "link", "set", "veth0", "up"]);
        run(&["ip", "-n", peer, "link", "set", "lo", "up"]);
        run(&["ip", "-n", pod, "addr", "add", &format!("10.200.{x}.2/24"), "dev", "eth0"]);
        run(&["ip", "-n", pod, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", pod, "link", "set", "lo", "up"]);
        run(&["ip", "-n", pod, "route", "add", "default", "via", &format!("10.200.{x}.1")]);
        run(&[
            "ip",
            "-n",
            pod,
            "neigh",
            "add",
            &format!("10.200.{x}.9"),
            "lladdr",
            "02:00:00:00:00:09",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.pod)
    }

    /// The pod veth's MAC.
    fn mac(&self) -> String {
        let json: serde_json::Value =
            serde_json::from_str(&run(&["ip", "-n", &self.pod, "-j", "link", "show", "dev", "eth0"])).unwrap();
        json[0]["address"].as_str().unwrap().to_string()
    }

    /// `ip link` and `tc qdisc show` of the pod netns.
    fn links_and_qdiscs(&self) -> (String, String) {
        (run(&["ip", "-n", &self.pod, "link"]), run(&["tc", "-n", &self.pod, "qdisc", "show"]))
    }

    /// Taps and ingress qdiscs are gone; the veth is still there.
    fn assert_clean(&self) {
        let (links, qdiscs) = self.links_and_qdiscs();
        assert!(!links.contains("tap") && links.contains("eth0@"), "pod netns links after stop:\n{links}");
        assert!(!qdiscs.contains("ingress"), "pod netns qdiscs after stop:\n{qdiscs}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.shared);
    }
}

fn config() -> Config {
    Config {
        file: "/dev/null".into(),
        hypervisor: test_config(),
        remote: None,
        agent: AgentConfig { dial_timeout: Duration::from_secs(60), ..Default::default() },
        runtime: Default::default(),
        warnings: Vec::new(),
    }
}

/// The inode of a namespace file, to compare namespaces.
fn ns_inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

/// Fails the enclosing check with a message (so the VM is still shut down before the test fails).
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_network_reaches_the_guest_and_is_removed_after_stop() {
    let ns = Netns::new();
    let id = unique_id("net");
    let log = logger();
    let sb = Sandbox::boot_pod_with_network(&id, &config(), &ns.shared, "nettest", Some(&ns.path()), &log)
        .await
        .expect("boot");
    let pids = sb.vm().pids().await;
    let checked = check_pod_network(&sb, &ns, pids[0]).await;
    sb.shutdown().await.expect("shutdown");
    checked.unwrap();
    ns.assert_clean();
    assert_nothing_left(&id, &pids);
}

/// The taps and filters exist, QEMU is in the pod netns, the guest has the veth's MAC, address
/// and routes, and the peer can ping it.
async fn check_pod_network(sb: &Sandbox, ns: &Netns, qemu_pid: u32) -> Result<(), String> {
    let qemu_netns = ns_inode(&PathBuf::from(format!("/proc/{qemu_pid}/ns/net")));
    ensure!(qemu_netns == ns_inode(&ns.path()), "QEMU does not run in the pod netns");
    let (links, qdiscs) = ns.links_and_qdiscs();
    ensure!(links.contains("tap0_kata"), "no tap0_kata in the pod netns:\n{links}");
    ensure!(
        qdiscs.matches("qdisc ingress").count() == 2,
        "not one ingress qdisc on each of eth0 and tap0_kata:\n{qdiscs}"
    );

    let (x, mac) = (ns.x, ns.mac());
    let interfaces = sb.agent().list_interfaces().await.map_err(|e| e.to_string())?;
    let Some(eth0) = interfaces.iter().find(|i| i.hwAddr == mac) else {
        return Err(format!("no guest NIC with MAC {mac}: {interfaces:?}"));
    };
    ensure!((eth0.name.as_str(), eth0.mtu) == ("eth0", 1500), "{eth0:?}");
    let want = format!("10.200.{x}.2");
    ensure!(eth0.IPAddresses.iter().any(|a| a.address == want && a.mask == "24"), "{want}/24 missing: {eth0:?}");
    let routes = sb.agent().list_routes().await.map_err(|e| e.to_string())?;
    let gateway = format!("10.200.{x}.1");
    ensure!(
        routes.iter().any(|r| r.dest.is_empty() && r.gateway == gateway && r.device == "eth0"),
        "no default route: {routes:?}"
    );
    ensure!(
        routes.iter().any(|r| r.dest == format!("10.200.{x}.0/24") && r.device == "eth0"),
        "no subnet route: {routes:?}"
    );

    // iputils' ping when installed, else busybox's (busybox-static is a test dependency).
    let mut ping = vec!["ip", "netns", "exec", &ns.peer];
    if hypervisor::host::find_program(Path::new("ping")).is_none() {
        ping.push("busybox");
    }
    ping.extend(["ping", "-c", "3", "-W", "5", &want]);
    let out = Command::new(ping[0]).args(&ping[1..]).output().map_err(|e| format!("{ping:?}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "{ping:?} failed:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    let summary: Vec<&str> = text.lines().filter(|l| l.contains("min/avg/max") || l.contains("packets")).collect();
    eprintln!("ping from the peer netns: {}", summary.join("; "));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_qemu_still_leaves_no_tap_or_filter() {
    let ns = Netns::new();
    let id = unique_id("netkill");
    let log = logger();
    let sb = Sandbox::boot_pod_with_network(&id, &config(), &ns.shared, "nettest", Some(&ns.path()), &log)
        .await
        .expect("boot");
    let pids = sb.vm().pids().await;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0] as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    tokio::time::timeout(Duration::from_secs(10), sb.vm().wait_exit()).await.expect("exit reported");
    sb.shutdown().await.expect("cleanup after a dead QEMU");
    ns.assert_clean();
    assert_nothing_left(&id, &pids);
}

#[tokio::test]
async fn failed_boot_leaves_no_tap_or_filter() {
    let ns = Netns::new();
    let id = unique_id("netfail");
    let mut config = config();
    let bogus = std::env::temp_dir().join(format!("{id}-not-a-kernel"));
    std::fs::write(&bogus, b"not a kernel").unwrap();
    config.hypervisor.kernel = bogus.clone();
    let err =
        Sandbox::boot_pod_with_network(&id, &config, &ns.shared, "nettest", Some(&ns.path()), &logger()).await.err();
    std::fs::remove_file(&bogus).unwrap();
    let err = err.expect("must fail").to_string();
    assert!(err.contains("QEMU"), "{err}");
    ns.assert_clean();
    assert_nothing_left(&id, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_netns_boots_without_a_nic() {
    let id = unique_id("nonet");
    let shared = std::env::temp_dir().join(format!("{id}-share"));
    std::fs::create_dir_all(&shared).unwrap();
    let sb = Sandbox::boot_pod_with_network(&id, &config(), &shared, "nonet", None, &logger()).await.expect("boot");
    let pids = sb.vm().pids().await;
    let interfaces = sb.agent().list_interfaces().await.expect("ListInterfaces");
    let names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["lo"], "{interfaces:?}");
    sb.shutdown().await.expect("shutdown");
    std::fs::remove_dir_all(&shared).unwrap();
    assert_nothing_left(&id, &pids);
}

#[tokio::test]
async fn missing_netns_is_named_and_nothing_is_left() {
    let id = unique_id("nonetns");
    let shared = std::env::temp_dir().join(format!("{id}-share"));
    std::fs::create_dir_all(&shared).unwrap();
    let missing = format!("/var/run/netns/podvisor-nt-missing-{}", std::process::id());
    let err =
        Sandbox::boot_pod_with_network(&id, &config(), &shared, "x", Some(Path::new(&missing)), &logger()).await.err();
    std::fs::remove_dir_all(&shared).unwrap();
    let err = err.expect("must fail").to_string();
    assert!(err.contains(&missing) && err.contains("network namespace"), "{err}");
    assert_nothing_left(&id, &[]);
}
