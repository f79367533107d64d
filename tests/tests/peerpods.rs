//! Peer pods (issue 12): pods with runtime class `kata-remote` whose VM (a "podvm") is created by
//! the remote hypervisor service `podvisor-remote-hypervisor` (provider `qemu`: a local QEMU on
//! the bridge `podvisor-pp0`, 172.31.250.1/24), reached by the shim through the service's
//! per-pod proxy, with the image pulled inside the podvm from a private registry.
//!
//! Prerequisites (each missing one fails the test naming it): `make guest-image`, `cargo build
//! -p podvisor-shim -p podvisor-remote-hypervisor`, Debian's `docker-registry` and `skopeo`,
//! containerd, CRI-O 1.36 (`../shared/tools/cri-o`). Run one at a time:
//! `cargo test -p podvisor-tests --test peerpods -- <name> --test-threads=1`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use podvisor_tests::containerd::TestContainerd;
use podvisor_tests::cri::{cri_log_lines, links_in_netns, proto, ConfigMapVolume, Manager, Pod};
use podvisor_tests::peerpods::{self, wire, PeerPods, RemoteHypervisor, ServiceSettings, HANDLER, LIMIT_MESSAGE};
use podvisor_tests::registry::TestRegistry;
use podvisor_tests::{image, on_both_managers, poll};

/// A container that logs a line, serves `pong-<name>` over HTTP on 8080 (busybox httpd) and
/// sleeps until SIGTERM.
fn server_args(name: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "mkdir -p /www && echo pong-{name} > /www/index.html && httpd -p 8080 -h /www && echo started-{name} && \
             trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
        ),
    ]
}

const SLEEPER: &[&str] = &["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"];

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn host_kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim().to_string()
}

/// An HTTP GET of `/index.html` on `ip:8080` from the host.
fn http_get(ip: &str) -> Result<String, String> {
    let addr: SocketAddr = format!("{ip}:8080").parse().map_err(|e| format!("{ip}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text)
}

on_both_managers!(
    peer_pod_runs_pulls_in_the_podvm_and_leaves_nothing_containerd,
    peer_pod_runs_pulls_in_the_podvm_and_leaves_nothing_crio,
    peer_pod_runs_pulls_in_the_podvm_and_leaves_nothing
);
/// A `kata-remote` pod: its podvm runs (QEMU of the service, proxy socket, VXLAN tunnel in the
/// pod's network namespace); the image is pulled inside the podvm from the registry (blob GETs
/// from the podvm's address); the container runs in the podvm's kernel, exec and logs work; the
/// pod IP answers from the worker and from a `kata` pod on the same node; a configMap update is
/// seen in the podvm within 2 s; removing the pod removes the podvm, its processes, devices,
/// state directory and sockets.
fn peer_pod_runs_pulls_in_the_podvm_and_leaves_nothing(m: Manager) {
    let pp = PeerPods::start(m, 10);
    let cri = &pp.cri;
    let links_before = peerpods::host_links();
    let t = Instant::now();
    let pod = pp.run_remote_pod("peer");
    eprintln!("{m}: peer pod sandbox ready after {:.2} s", t.elapsed().as_secs_f64());
    let podvm = pp.service.wait_podvm(&pod.id);
    eprintln!("podvm state: {}", podvm.json);
    assert!(podvm.agent_socket().exists(), "no proxy socket {}", podvm.agent_socket().display());
    let podvm_ip = podvm.podvm_ip().unwrap_or_else(|| panic!("no podvm IP in {}", podvm.json));
    if let Some(netns) = &pod.netns {
        let links = links_in_netns(netns).unwrap_or_else(|e| panic!("{e}"));
        assert!(links.iter().any(|l| l == "vxlan0"), "no vxlan0 tunnel in the pod's network namespace: {links:?}");
        assert!(links.iter().any(|l| l == "eth0"), "no eth0 in the pod's network namespace: {links:?}");
    }

    // A configMap mounted into the container.
    let kubelet = cri.dir().join("kubelet");
    let mut config_map = ConfigMapVolume::create(&kubelet, pod.uid(), "settings", &[("key", "v0")]);
    let mut config = pp.container_config("app", &as_strs(&server_args("peer")));
    config.mounts = vec![proto::Mount {
        container_path: "/vol".into(),
        host_path: config_map.dir.display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    let t = Instant::now();
    let (c, pulled) = pp.run_container(&pod, &config);
    eprintln!(
        "{m}: PullImage {:.2} s, container running after {:.2} s",
        pulled.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    let from_podvm = pp.registry.blob_fetches_from("podvisor/busybox", &podvm_ip);
    assert!(
        from_podvm > 0,
        "the podvm ({podvm_ip}) fetched no blob of podvisor/busybox from the registry:\n{}",
        pp.registry.logs_tail(20)
    );

    // It runs in the podvm: the guest kernel, the pod IP on its eth0.
    let release = cri.exec_ok(&c, &["uname", "-r"]);
    assert_ne!(release.trim(), host_kernel_release(), "the container runs on the worker's kernel");
    let addrs = cri.exec_ok(&c, &["ip", "-4", "-o", "addr", "show"]);
    assert!(addrs.contains(&format!("inet {}/", pod.ip)), "the pod IP {} is not in the podvm:\n{addrs}", pod.ip);
    let r = cri.exec(&c, &["sh", "-c", "echo out; echo err >&2; exit 3"], 30);
    assert_eq!((r.exit_code, r.stdout.as_str(), r.stderr.as_str()), (3, "out\n", "err\n"), "{r:?}");
    let log = pod.log_path(&config);
    poll(Duration::from_secs(10), "the container's log line", || {
        let lines = cri_log_lines(&log, "stdout")?;
        lines.iter().any(|l| l == "started-peer").then_some(()).ok_or(format!("{lines:?}"))
    });

    // The pod IP from the worker and from a local kata pod on the same node.
    cri.assert_routed_via_bridge(&pod.ip);
    let answer = poll(Duration::from_secs(30), "an HTTP answer from the peer pod's IP", || http_get(&pod.ip));
    assert!(answer.contains("pong-peer"), "{answer:?}");
    let local = cri.run_pod(&cri.pod_config("local"));
    let client = cri.run_container(&local, &cri.container_config("client", SLEEPER));
    let url = format!("http://{}:8080/index.html", pod.ip);
    let got = poll(Duration::from_secs(30), "the peer pod's page from a kata pod", || {
        // No `wget -T`: busybox 1.35's wget crashes with it (SIGSEGV); ExecSync's timeout bounds it.
        let r = cri.exec(&client, &["wget", "-q", "-O", "-", &url], 30);
        (r.exit_code == 0).then(|| r.stdout.clone()).ok_or(format!("{r:?}"))
    });
    assert_eq!(got.trim(), "pong-peer");
    cri.remove_pod(&local);

    // configMap updates reach the podvm (copied with CopyFile) within 2 s.
    assert_eq!(cri.exec_ok(&c, &["cat", "/vol/key"]), "v0");
    for i in 1..=5 {
        let want = format!("v{i}");
        config_map.update(&[("key", &want)]);
        let t = Instant::now();
        loop {
            let r = cri.exec(&c, &["cat", "/vol/key"], 10);
            if r.exit_code == 0 && r.stdout == want {
                eprintln!("configMap update {i} seen after {:.3} s", t.elapsed().as_secs_f64());
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(2), "configMap update {want} not seen after 2 s: {r:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pp.remove_pod(&pod, &podvm);
    let new_links: Vec<String> =
        peerpods::host_links().into_iter().filter(|l| !links_before.contains(l) && l.starts_with("vx")).collect();
    assert!(new_links.is_empty(), "VXLAN devices left on the host: {new_links:?}");
    drop(config_map);
    fs::remove_dir_all(kubelet).unwrap();
}

/// With `PEERPODS_LIMIT_PER_NODE=2` the third peer pod fails with the limit's message (and
/// leaves no podvm); removing one lets the next start.
#[test]
fn the_podvm_limit_refuses_the_third_pod_and_frees_a_slot_on_removal() {
    let pp = PeerPods::start(Manager::Containerd, 2);
    let a = pp.run_remote_pod("limit-a");
    let a_vm = pp.service.wait_podvm(&a.id);
    let b = pp.run_remote_pod("limit-b");
    let b_vm = pp.service.wait_podvm(&b.id);
    let err = pp.try_run_remote_pod("limit-c").map(|p| p.id).expect_err("a third peer pod started past the limit");
    let want = format!("{LIMIT_MESSAGE}2 podvms already run on this node");
    assert!(err.contains(&want), "the third pod's error does not say {want:?}:\n{err}");
    assert!(err.contains("PEERPODS_LIMIT_PER_NODE in"), "the error names no fix:\n{err}");
    let vms: Vec<String> = pp.service.podvms().into_iter().map(|s| s.id).collect();
    assert_eq!(vms.len(), 2, "podvms after the refused pod: {vms:?}");
    pp.remove_pod(&a, &a_vm);
    let d = pp.run_remote_pod("limit-d");
    let d_vm = pp.service.wait_podvm(&d.id);
    pp.remove_pod(&b, &b_vm);
    pp.remove_pod(&d, &d_vm);
}

/// The podvm's QEMU SIGKILLed: the container reports exited within 5 s; the pod is then removed
/// without leftovers.
#[test]
fn a_killed_podvm_makes_the_container_exit_within_5_s() {
    let pp = PeerPods::start(Manager::Containerd, 10);
    let pod = pp.run_remote_pod("vmkill");
    let podvm = pp.service.wait_podvm(&pod.id);
    let (c, _) = pp.run_container(&pod, &pp.container_config("app", SLEEPER));
    let vmm = podvm.vmm_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(vmm as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let t = Instant::now();
    let status = pp.cri.wait_exited(&c, Duration::from_secs(5));
    eprintln!("container exited {:.2} s after the podvm was killed: {status:?}", t.elapsed().as_secs_f64());
    pp.remove_pod(&pod, &podvm);
}

/// The service restarted (SIGTERM, then a new process) while a peer pod runs: the pod keeps
/// running (exec works through the same podvm), the new service reattached it (it counts in the
/// limit of 1 and removing the pod destroys it).
/// The shim of a peer pod is SIGKILLed: the container manager runs the shim's `delete`, which
/// asks the service to stop the podvm (it would otherwise keep running, and costing, with no pod).
#[test]
fn a_killed_shims_delete_stops_its_podvm() {
    let pp = PeerPods::start(Manager::Containerd, 10);
    let pod = pp.run_remote_pod("shimkill");
    let podvm = pp.service.wait_podvm(&pod.id);
    let _ = pp.run_container(&pod, &pp.container_config("app", SLEEPER));
    let shim = podvisor_tests::faults::shim_pid(&pod.id).expect("the peer pod's shim runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let t = Instant::now();
    let left = podvisor_tests::leaks::settle(Duration::from_secs(60), || podvm.leftovers());
    assert!(
        left.is_empty(),
        "the podvm of a SIGKILLed shim still runs 60 s later:\n  {}\n{}",
        left.join("\n  "),
        pp.logs()
    );
    eprintln!("podvm of the killed shim gone {:.2} s after the SIGKILL", t.elapsed().as_secs_f64());
    remove_unless_gone(&pp, &pod);
}

/// The pod after a fault: gone from the CRI, or removed now if the manager still lists it.
fn remove_unless_gone(pp: &PeerPods, pod: &Pod) {
    if pp.cri.block_on(pp.cri.client().list_pod_sandbox()).unwrap().iter().any(|p| p.id == pod.id) {
        pp.cri.remove_pod(pod);
    } else {
        pp.cri.assert_pod_gone(pod);
    }
}

/// A registry that wants credentials: the kubelet's PullImage carries them on the node, and the
/// podvm pulls with the cluster's credentials the service put in its user data
/// (`REGISTRY_AUTH_FILE`), not anonymously.
#[test]
fn a_private_registry_is_pulled_from_with_the_services_credentials() {
    let pp = PeerPods::start_with_private_registry(Manager::Containerd);
    let pod = pp.run_remote_pod("private");
    let podvm = pp.service.wait_podvm(&pod.id);
    let podvm_ip = podvm.podvm_ip().unwrap_or_else(|| panic!("no podvm IP in {}", podvm.json));
    let (c, _) = pp.run_container(&pod, &pp.container_config("app", SLEEPER));
    assert_eq!(pp.cri.exec_ok(&c, &["echo", "pulled"]).trim(), "pulled");
    let from_podvm = pp.registry.blob_fetches_from("podvisor/busybox", &podvm_ip);
    assert!(
        from_podvm > 0,
        "the podvm ({podvm_ip}) fetched no blob of the private registry:\n{}",
        pp.registry.logs_tail(20)
    );
    pp.remove_pod(&pod, &podvm);
}

#[test]
fn a_restarted_service_reattaches_running_podvms() {
    let mut pp = PeerPods::start(Manager::Containerd, 1);
    let pod = pp.run_remote_pod("restart");
    let podvm = pp.service.wait_podvm(&pod.id);
    let (c, _) = pp.run_container(&pod, &pp.container_config("app", SLEEPER));
    let old = pp.service.pid();
    pp.service.restart().unwrap_or_else(|e| panic!("restarting the service: {e}"));
    assert_ne!(pp.service.pid(), old);
    assert_eq!(pp.cri.exec_ok(&c, &["echo", "still-here"]).trim(), "still-here");
    let after = pp.service.wait_podvm(&pod.id);
    assert_eq!(after.vmm_pid(), podvm.vmm_pid(), "the podvm was replaced: {}", after.json);
    let err = pp.try_run_remote_pod("restart-2").map(|p| p.id).expect_err("a second peer pod started past the limit");
    assert!(err.contains(&format!("{LIMIT_MESSAGE}1")), "the reattached podvm is not counted:\n{err}");
    assert!(podvisor_tests::alive(podvm.vmm_pid().unwrap()));
    assert_eq!(pp.cri.exec_ok(&c, &["echo", "after"]).trim(), "after");
    pp.remove_pod(&pod, &podvm);
}

/// The service SIGKILLed while a podvm runs, the pod removed meanwhile: the next service start
/// garbage-collects the podvm nobody claims.
#[test]
fn a_sigkilled_service_collects_orphaned_podvms_on_its_next_start() {
    let mut pp = PeerPods::start(Manager::Containerd, 10);
    let pod = pp.run_remote_pod("gc");
    let podvm = pp.service.wait_podvm(&pod.id);
    let _ = pp.run_container(&pod, &pp.container_config("app", SLEEPER));
    let problems = pp.service.stop_with(nix::sys::signal::Signal::SIGKILL);
    assert!(problems.is_empty(), "{problems:?}");
    let vmm = podvm.vmm_pid().unwrap();
    assert!(podvisor_tests::alive(vmm), "the podvm died with the service");
    for id in pp.cri.containers_of(&pod) {
        let r = pp.cri.block_on(pp.cri.client().stop_container(&id, 2));
        eprintln!("StopContainer {id} with the service down: {r:?}");
    }
    let r = pp.cri.block_on(pp.cri.client().stop_pod_sandbox(&pod.id));
    eprintln!("StopPodSandbox with the service down: {r:?}");
    let r = pp.cri.block_on(pp.cri.client().remove_pod_sandbox(&pod.id));
    eprintln!("RemovePodSandbox with the service down: {r:?}");
    pp.service.start_again().unwrap_or_else(|e| panic!("starting the service again: {e}"));
    let t = Instant::now();
    let left = podvisor_tests::leaks::settle(Duration::from_secs(30), || podvm.leftovers());
    assert!(
        left.is_empty(),
        "the orphaned podvm was not collected within 30 s:\n  {}\n{}",
        left.join("\n  "),
        pp.logs()
    );
    eprintln!("orphaned podvm collected {:.2} s after the service started", t.elapsed().as_secs_f64());
    // The pod itself: gone from the CRI (removed again now if the first removal failed).
    remove_unless_gone(&pp, &pod);
}

// ---------------------------------------------------------------------------------------------
// Wire compatibility.

/// What the hand-written server saw, in order: `hypervisor <method>` with the decoded request,
/// and `agent <method>` for each agent request passing through the test's agent proxy.
#[derive(Debug, Clone)]
enum Seen {
    CreateVm(wire::CreateVm),
    StartVm(String),
    StopVm(String),
    Version(String),
    Other(String),
    Agent(String),
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// Serves one ttrpc connection of `remote.Hypervisor` by hand: decodes each request frame,
/// records it and answers (CreateVM: `agent_socket`).
fn serve_hypervisor(mut s: UnixStream, log: Log, agent_socket: PathBuf) {
    while let Ok(Some(frame)) = wire::read_frame(&mut s) {
        if frame.kind != wire::REQUEST {
            continue;
        }
        let answer = match wire::decode_request(&frame.payload) {
            Err(e) => wire::encode_response(Err((3, &format!("bad request: {e}")))),
            Ok(req) if req.service != "remote.Hypervisor" => {
                log.lock().unwrap().push(Seen::Other(format!("{}/{}", req.service, req.method)));
                wire::encode_response(Err((12, "unknown service")))
            }
            Ok(req) => match req.method.as_str() {
                "CreateVM" => match wire::decode_create_vm(&req.payload) {
                    Ok(c) => {
                        log.lock().unwrap().push(Seen::CreateVm(c));
                        wire::encode_response(Ok(&wire::encode_string1(&agent_socket.display().to_string())))
                    }
                    Err(e) => wire::encode_response(Err((3, &e))),
                },
                "StartVM" => {
                    log.lock().unwrap().push(Seen::StartVm(wire::decode_string1(&req.payload).unwrap_or_default()));
                    wire::encode_response(Ok(&[]))
                }
                "StopVM" => {
                    log.lock().unwrap().push(Seen::StopVm(wire::decode_string1(&req.payload).unwrap_or_default()));
                    wire::encode_response(Ok(&[]))
                }
                "Version" => {
                    log.lock().unwrap().push(Seen::Version(wire::decode_string1(&req.payload).unwrap_or_default()));
                    wire::encode_response(Ok(&wire::encode_string1("hand-written-test-server 0")))
                }
                other => {
                    log.lock().unwrap().push(Seen::Other(other.into()));
                    wire::encode_response(Err((12, "unimplemented")))
                }
            },
        };
        let reply = wire::Frame { stream: frame.stream, kind: wire::RESPONSE, flags: 0, payload: answer };
        if wire::write_frame(&mut s, &reply).is_err() {
            return;
        }
    }
}

/// Proxies one connection to the agent's socket byte for byte, decoding the client's request
/// frames on the way to record the agent methods called.
fn proxy_agent(client: UnixStream, agent: PathBuf, log: Log) {
    let Ok(upstream) = UnixStream::connect(&agent) else { return };
    let (mut c_read, mut u_write) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let (mut u_read, mut c_write) = (upstream, client);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut u_read, &mut c_write);
        let _ = c_write.shutdown(std::net::Shutdown::Both);
    });
    while let Ok(Some(frame)) = wire::read_frame(&mut c_read) {
        if frame.kind == wire::REQUEST {
            if let Ok(req) = wire::decode_request(&frame.payload) {
                log.lock().unwrap().push(Seen::Agent(format!("{}/{}", req.service, req.method)));
            }
        }
        if wire::write_frame(&mut u_write, &frame).is_err() {
            break;
        }
    }
    let _ = u_write.shutdown(std::net::Shutdown::Both);
}

/// Starts the agent in test mode (`kata-agent --listen unix://<dir>/agent.sock`) in a private
/// mount namespace with its own /run and cgroup2, as agent/tests/containers.rs does.
fn start_test_agent(dir: &Path) -> std::process::Child {
    let sock = dir.join("agent.sock");
    let log = fs::File::create(dir.join("agent.log")).unwrap();
    let mut cmd = Command::new(peerpods::agent_binary());
    cmd.arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .arg("--run-dir")
        .arg(dir.join("agent-run"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: only raw syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            use nix::mount::{mount, MsFlags};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
            mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)?;
            mount(Some("none"), "/sys/fs/cgroup", Some("cgroup2"), MsFlags::empty(), None::<&str>)?;
            mount(Some("tmpfs"), "/run", Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", peerpods::agent_binary().display()));
    let logs = || fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    podvisor_tests::wait_for_socket(&mut child, &sock, "kata-agent (test mode)", Duration::from_secs(20), logs)
        .unwrap_or_else(|e| panic!("{e}"));
    child
}

/// What the wire test made on the host, removed on drop (also when the test fails half-way).
struct WireScratch {
    dir: PathBuf,
    netns: String,
    agent: Option<std::process::Child>,
}

impl Drop for WireScratch {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The shim against a remote hypervisor server written here from the protocol definition
/// (ttrpc frames and protobuf decoded by hand): a `ctr` container with the remote configuration
/// makes the shim call CreateVM (the sandbox id, Kata's sizing annotations from the
/// configuration, the network namespace given to the container), then StartVM, then dial the
/// agent at the returned socket (CreateSandbox arrives there, through the test's recording
/// proxy), and StopVM when the container is deleted.
#[test]
fn the_shim_speaks_katas_protocol_to_a_hand_written_remote_hypervisor() {
    let dir = PathBuf::from(format!("/tmp/podvisor-ppwire-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let log: Log = Arc::new(Mutex::new(Vec::new()));

    let netns_name = format!("ppwire{}", std::process::id());
    let mut scratch = WireScratch { dir: dir.clone(), netns: netns_name.clone(), agent: None };
    scratch.agent = Some(start_test_agent(&dir));
    let agent_proxy = dir.join("agent-proxy.sock");
    let proxy_listener = UnixListener::bind(&agent_proxy).unwrap();
    {
        let (log, agent) = (log.clone(), dir.join("agent.sock"));
        std::thread::spawn(move || {
            for c in proxy_listener.incoming().flatten() {
                let (log, agent) = (log.clone(), agent.clone());
                std::thread::spawn(move || proxy_agent(c, agent, log));
            }
        });
    }
    let hv_socket = dir.join("hypervisor.sock");
    let listener = UnixListener::bind(&hv_socket).unwrap();
    {
        let (log, agent_proxy) = (log.clone(), agent_proxy.clone());
        std::thread::spawn(move || {
            for c in listener.incoming().flatten() {
                let (log, agent_proxy) = (log.clone(), agent_proxy.clone());
                std::thread::spawn(move || serve_hypervisor(c, log, agent_proxy));
            }
        });
    }

    let out = Command::new("ip").args(["netns", "add", &netns_name]).output().expect("ip netns add");
    assert!(out.status.success(), "ip netns add: {}", String::from_utf8_lossy(&out.stderr));
    let netns = format!("/var/run/netns/{netns_name}");

    let config = peerpods::remote_kata_config(&hv_socket, |c| {
        let r = peerpods::remote_section(c);
        r.insert("default_vcpus".into(), 2.into());
        r.insert("default_memory".into(), 1024.into());
        r.insert("machine_type".into(), "medium".into());
        // A `ctr` container names no image to pull: its rootfs is copied into the guest.
        let rt = c.entry("runtime").or_insert_with(|| toml::Value::Table(Default::default()));
        rt.as_table_mut().unwrap().insert("experimental_force_guest_pull".into(), false.into());
    });
    let ctd = TestContainerd::start_with_kata_config(&config);
    let busybox = image::busybox().archive;
    ctd.ctr_ok(&["image", "import", &busybox.display().to_string()]);
    let id = ctd.new_id("ppwire");
    let run = ctd.ctr(&[
        "run",
        "-d",
        "--runtime",
        podvisor_tests::containerd::KATA_RUNTIME,
        "--with-ns",
        &format!("network:{netns}"),
        "--annotation",
        "io.kubernetes.cri.sandbox-name=wire-pod",
        "--annotation",
        "io.kubernetes.cri.sandbox-namespace=wire-ns",
        image::IMAGE_REF,
        &id,
        "sh",
        "-c",
        "sleep 1000",
    ]);
    eprintln!("ctr run: {}", ctd.explain(&run));
    // Whatever became of the container, the VM's life is over once it is deleted.
    let _ = ctd.ctr(&["task", "kill", "-s", "KILL", &id]);
    std::thread::sleep(Duration::from_millis(500));
    let _ = ctd.ctr(&["task", "delete", "-f", &id]);
    let _ = ctd.ctr(&["container", "delete", &id]);
    poll(Duration::from_secs(30), "StopVM from the shim", || {
        let seen = log.lock().unwrap().clone();
        seen.iter().any(|s| matches!(s, Seen::StopVm(_))).then_some(()).ok_or(format!("{seen:?}"))
    });
    ctd.assert_no_leaks(&[&id]);
    drop(ctd);
    let agent_log = fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    drop(scratch);

    let seen: Vec<Seen> = log.lock().unwrap().iter().filter(|s| !matches!(s, Seen::Version(_))).cloned().collect();
    eprintln!("calls seen: {seen:#?}");
    let Some(Seen::CreateVm(create)) = seen.first() else { panic!("the first call was not CreateVM: {seen:?}") };
    assert_eq!(create.id, id, "CreateVM id");
    assert_eq!(create.network_namespace_path, netns, "CreateVM networkNamespacePath");
    let want: BTreeMap<&str, &str> = [
        ("io.katacontainers.config.hypervisor.machine_type", "medium"),
        ("io.katacontainers.config.hypervisor.default_vcpus", "2"),
        ("io.katacontainers.config.hypervisor.default_memory", "1024"),
    ]
    .into();
    for (k, v) in want {
        assert_eq!(create.annotations.get(k).map(String::as_str), Some(v), "annotation {k}: {:?}", create.annotations);
    }
    for (k, v) in [("io.kubernetes.cri.sandbox-name", "wire-pod"), ("io.kubernetes.cri.sandbox-namespace", "wire-ns")] {
        assert_eq!(create.annotations.get(k).map(String::as_str), Some(v), "annotation {k}: {:?}", create.annotations);
    }
    assert!(
        matches!(&seen.get(1), Some(Seen::StartVm(x)) if *x == id),
        "the second call was not StartVM{{{id}}}: {seen:?}"
    );
    let first_agent = seen.iter().position(|s| matches!(s, Seen::Agent(_))).unwrap_or_else(|| {
        panic!("the shim never dialled the agent at the returned socket: {seen:?}\nagent log:\n{agent_log}")
    });
    assert!(first_agent > 1, "the agent was dialled before StartVM: {seen:?}");
    assert!(
        seen.iter().any(|s| matches!(s, Seen::Agent(m) if m == "grpc.AgentService/CreateSandbox")),
        "no CreateSandbox reached the agent: {seen:?}"
    );
    let stop = seen.iter().position(|s| matches!(s, Seen::StopVm(x) if *x == id)).expect("StopVM{id}");
    assert!(stop > first_agent, "StopVM came before the agent was used: {seen:?}");
    let others: Vec<&str> =
        seen.iter().filter_map(|s| if let Seen::Other(m) = s { Some(m.as_str()) } else { None }).collect();
    assert!(others.is_empty(), "unexpected calls: {others:?}");
    let versions: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|s| if let Seen::Version(v) = s { Some(v.clone()) } else { None })
        .collect();
    eprintln!("Version requests from the shim: {versions:?}");
}

/// Our service against a client written here the same way (frames and messages by hand):
/// Version names it; CreateVM for a pod returns `<state dir>/<id>/agent.sock` and starts nothing;
/// StopVM of it and of an unknown id succeed (idempotent) and leave no state; a request for an
/// unknown method gets an error status, not a dropped connection.
#[test]
fn the_service_answers_a_hand_written_client() {
    let service = RemoteHypervisor::start(ServiceSettings::default());
    let mut s = UnixStream::connect(service.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut stream = 1u32;
    let mut call = |method: &str, payload: Vec<u8>| -> Result<Vec<u8>, (u64, String)> {
        let req = wire::encode_request("remote.Hypervisor", method, &payload, 30_000_000_000);
        wire::write_frame(&mut s, &wire::Frame { stream, kind: wire::REQUEST, flags: 0, payload: req }).unwrap();
        let f = wire::read_frame(&mut s).unwrap().expect("a response frame");
        assert_eq!((f.stream, f.kind), (stream, wire::RESPONSE), "response frame header");
        stream += 2;
        wire::decode_response(&f.payload).unwrap()
    };
    let v = call("Version", wire::encode_string1("0.0.1")).unwrap();
    let v = wire::decode_string1(&v).unwrap();
    assert!(v.starts_with("podvisor-remote-hypervisor "), "Version: {v:?}");

    let id = "ppwire-client-0123456789abcdef";
    let create = wire::CreateVm {
        id: id.into(),
        annotations: [
            ("io.kubernetes.cri.sandbox-name".to_string(), "wire".to_string()),
            ("io.kubernetes.cri.sandbox-namespace".into(), "default".into()),
        ]
        .into(),
        network_namespace_path: String::new(),
    };
    let r = call("CreateVM", wire::encode_create_vm(&create));
    let socket =
        wire::decode_string1(&r.unwrap_or_else(|e| panic!("CreateVM: {e:?}\n{}", service.logs_tail(20)))).unwrap();
    assert_eq!(PathBuf::from(&socket), service.state_dir().join(id).join("agent.sock"), "agentSocketPath");
    assert!(
        podvisor_tests::leaks::processes().iter().all(|p| !(p.argv0.contains("qemu") && p.cmdline.contains(id))),
        "CreateVM started a VM"
    );
    call("StopVM", wire::encode_string1(id)).unwrap_or_else(|e| panic!("StopVM: {e:?}"));
    assert!(!service.state_dir().join(id).exists(), "StopVM left {}", service.state_dir().join(id).display());
    call("StopVM", wire::encode_string1("never-created")).unwrap_or_else(|e| panic!("StopVM of an unknown id: {e:?}"));
    let err = call("NoSuchMethod", vec![]).expect_err("an unknown method succeeded");
    assert_ne!(err.0, 0, "{err:?}");
    // Still serving on the same connection.
    assert!(call("Version", vec![]).is_ok());
}

/// The registry fixture alone: the busybox image pushed with skopeo comes back over plain HTTP,
/// and dropping the registry stops it and removes its storage.
#[test]
fn registry_fixture_serves_the_pushed_image() {
    let reg = TestRegistry::start();
    reg.push_busybox().unwrap_or_else(|e| panic!("{e}"));
    let (digest, manifest) = reg.manifest("podvisor/busybox", "test").unwrap_or_else(|e| panic!("{e}"));
    assert!(digest.starts_with("sha256:"), "digest {digest}");
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{manifest}");
    let layer = layers[0]["digest"].as_str().unwrap();
    let (status, _, body) = reg.get(&format!("/v2/podvisor/busybox/blobs/{layer}"), &[]).unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.len() as u64, layers[0]["size"].as_u64().unwrap());
    assert!(reg.blob_fetches_from("podvisor/busybox", "127.0.0.1") >= 1, "{}", reg.logs_tail(20));
    assert_eq!(reg.podvm_reference(), format!("172.31.250.1:{}/podvisor/busybox:test", reg.port()));
    let dir = reg.dir().to_path_buf();
    let pid = reg.pid().unwrap();
    drop(reg);
    assert!(!dir.exists());
    assert!(!podvisor_tests::alive(pid));
}

/// The shipped configuration files parse and hold the keys the tests rely on.
#[test]
fn the_kata_remote_configs_are_valid() {
    let ws = podvisor_tests::workspace();
    let read = |p: &str| fs::read_to_string(ws.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let conf: toml::Table = read("configs/configuration-remote.toml").parse().unwrap();
    let remote = &conf["hypervisor"]["remote"];
    assert_eq!(remote["remote_hypervisor_socket"].as_str(), Some("/run/peerpod/hypervisor.sock"));
    assert_eq!(remote["remote_hypervisor_timeout"].as_integer(), Some(600));
    assert_eq!(remote["shared_fs"].as_str(), Some("none"));
    assert_eq!(conf["runtime"]["experimental_force_guest_pull"].as_bool(), Some(true));
    let crio: toml::Table = read("configs/crio-50-kata-remote.conf").parse().unwrap();
    let h = &crio["crio"]["runtime"]["runtimes"][HANDLER];
    assert_eq!((h["runtime_type"].as_str(), h["runtime_pull_image"].as_bool()), (Some("vm"), Some(true)));
    assert!(h["runtime_config_path"].as_str().unwrap().ends_with("configuration-remote.toml"));
    let ctd: toml::Table = read("configs/containerd-kata-remote.toml").parse().unwrap();
    let h = &ctd["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"][HANDLER];
    assert_eq!(h["runtime_type"].as_str(), Some("io.containerd.kata.v2"));
    assert!(h["options"]["ConfigPath"].as_str().unwrap().ends_with("configuration-remote.toml"));
    let rc = read("configs/runtimeclass-kata-remote.yaml");
    assert!(rc.contains("handler: kata-remote") && rc.contains("name: kata-remote"), "{rc}");
}
