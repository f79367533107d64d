//! End-to-end: what a node's kubelet and its container manager ask of a VM runtime beyond
//! running pods, on both managers (containerd 1.6's CRI plugin and CRI-O 1.36): container and
//! pod statistics (CRI-O converts our `Stats` answer with no nil checks), its liveness check
//! (`Kill` signal 0, before `ReopenContainerLog`), mount propagation between a pod's
//! containers, read-only versus recursively read-only binds, what containers with
//! CAP_NET_ADMIN do with the guest kernel, the pod's host cgroup, and in-place resize.
//!
//! Each test is one per manager (`<name>_containerd`, `<name>_crio`); see `tests/tests/cri.rs`
//! for the environment and prerequisites.
//!
//! Run: `cargo test -p podvisor-tests --test cri_node -- --test-threads=2`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use podvisor_tests::cri::{cri_log_lines, proto, require_kata, Cri, Manager};
use podvisor_tests::{on_both_managers, poll};

/// `sleep` that exits on SIGTERM (a PID 1 ignores signals it has no handler for).
const SLEEPER: &[&str] = &["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"];

/// Fails unless the manager's daemon still runs (a panic in CRI-O takes it down).
fn assert_manager_alive(cri: &Cri, after: &str) {
    let pid = match (cri.containerd(), cri.crio()) {
        (Some(c), _) => c.pid(),
        (_, Some(c)) => c.pid(),
        _ => 0,
    };
    assert!(pid != 0 && podvisor_tests::alive(pid), "{} died after {after} (pid {pid})\n{}", cri.manager(), cri.logs());
}

/// `crictl <args>` against the harness's manager; its stdout.
fn crictl(cri: &Cri, args: &[&str]) -> String {
    let tools = podvisor_tests::crio_server::tools_dir().unwrap_or_else(|e| panic!("crictl: {e}"));
    let endpoint = match (cri.containerd(), cri.crio()) {
        (Some(c), _) => c.socket().to_path_buf(),
        (_, Some(c)) => c.socket().to_path_buf(),
        _ => unreachable!(),
    };
    let out = Command::new(tools.join("crictl"))
        .arg("--config")
        .arg("/dev/null")
        .arg("--runtime-endpoint")
        .arg(format!("unix://{}", endpoint.display()))
        .args(["--timeout", "60s"])
        .args(args)
        .output()
        .expect("crictl");
    assert!(
        out.status.success(),
        "crictl {args:?} failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        cri.logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn value(v: &Option<proto::UInt64Value>) -> Option<u64> {
    v.as_ref().map(|v| v.value)
}

// ---------------------------------------------------------------------------------------------
// 1. Statistics.

on_both_managers!(
    stats_are_complete_and_sane_containerd,
    stats_are_complete_and_sane_crio,
    stats_are_complete_and_sane
);
/// `crictl stats`, `stats -o json`, `statsp` and the four CRI statistics calls answer for a
/// pod of two kata containers with numbers that make sense (CPU time that grows for a busy
/// container, memory below its limit, the working set within the usage), and the container
/// manager is still alive afterwards. Before the fix CRI-O died of a nil dereference in its
/// conversion of our answer.
fn stats_are_complete_and_sane(m: Manager) {
    require_kata("statistics of containers in a VM");
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("stats"));
    const LIMIT: i64 = 256 << 20;
    let mut busy = cri.container_config("busy", &["sh", "-c", "while :; do :; done"]);
    busy.linux.as_mut().unwrap().resources.as_mut().unwrap().memory_limit_in_bytes = LIMIT;
    let busy = cri.run_container(&pod, &busy);
    let idle = cri.run_container(&pod, &cri.container_config("idle", SLEEPER));

    let first = cri.block_on(cri.client().container_stats(&busy)).unwrap_or_else(|e| panic!("{e}\n{}", cri.logs()));
    assert_manager_alive(&cri, "ContainerStats");
    eprintln!("ContainerStats: {first:?}");
    let cpu = |s: &proto::ContainerStats| s.cpu.as_ref().and_then(|c| value(&c.usage_core_nano_seconds));
    let cpu1 = cpu(&first).expect("ContainerStats has CPU time");
    let mem = first.memory.as_ref().expect("ContainerStats has memory");
    let usage = value(&mem.usage_bytes).unwrap_or(0);
    let working = value(&mem.working_set_bytes).expect("working set");
    assert!(usage > 0 && usage < LIMIT as u64, "memory usage {usage} of a container limited to {LIMIT}");
    assert!(working <= usage, "working set {working} above usage {usage}");
    std::thread::sleep(Duration::from_secs(2));
    let list = cri
        .block_on(cri.client().list_container_stats(Some(&pod.id)))
        .unwrap_or_else(|e| panic!("ListContainerStats: {e}\n{}", cri.logs()));
    assert_manager_alive(&cri, "ListContainerStats");
    let ids: Vec<&str> = list.iter().filter_map(|s| s.attributes.as_ref().map(|a| a.id.as_str())).collect();
    for c in [&busy, &idle] {
        assert!(ids.contains(&c.as_str()), "ListContainerStats lacks {c}: {ids:?}");
    }
    let again = list.iter().find(|s| s.attributes.as_ref().is_some_and(|a| a.id == busy)).unwrap();
    let cpu2 = cpu(again).expect("CPU time");
    assert!(cpu2 > cpu1 + 500_000_000, "a busy loop used {} ns of CPU in 2 s", cpu2.saturating_sub(cpu1));

    let pod_stats = cri
        .block_on(cri.client().pod_sandbox_stats(&pod.id))
        .unwrap_or_else(|e| panic!("PodSandboxStats: {e}\n{}", cri.logs()));
    assert_manager_alive(&cri, "PodSandboxStats");
    eprintln!("PodSandboxStats: {pod_stats:?}");
    let linux = pod_stats.linux.as_ref().expect("PodSandboxStats.linux");
    if m == Manager::Containerd {
        // containerd reads the pod cgroup on the host, where the VM runs (see the pod cgroup test).
        let cpu = linux.cpu.as_ref().and_then(|c| value(&c.usage_core_nano_seconds)).expect("pod CPU");
        let mem = linux.memory.as_ref().and_then(|m| value(&m.working_set_bytes)).expect("pod memory");
        assert!(cpu > 0 && mem > 16 << 20, "pod CPU {cpu} ns, memory {mem} bytes: the VM is not in the pod cgroup");
    } else {
        // CRI-O lists the pod's containers with our numbers (its pod-level CPU and memory come
        // from the host cgroup through its systemd cgroup manager only).
        let ids: Vec<&str> =
            linux.containers.iter().filter_map(|s| s.attributes.as_ref().map(|a| a.id.as_str())).collect();
        assert!(ids.contains(&busy.as_str()) && ids.contains(&idle.as_str()), "pod stats containers: {ids:?}");
    }
    let all = cri.block_on(cri.client().list_pod_sandbox_stats()).unwrap_or_else(|e| panic!("{e}\n{}", cri.logs()));
    assert!(all.iter().any(|s| s.attributes.as_ref().is_some_and(|a| a.id == pod.id)), "ListPodSandboxStats: {all:?}");
    assert_manager_alive(&cri, "ListPodSandboxStats");

    // crictl, as an operator runs it.
    let table = crictl(&cri, &["stats"]);
    assert!(table.contains(&busy[..13]) && table.contains(&idle[..13]), "crictl stats:\n{table}");
    let json: serde_json::Value = serde_json::from_str(&crictl(&cri, &["stats", "-o", "json"])).expect("JSON");
    let listed = json["stats"].as_array().map(|a| a.len()).unwrap_or(0);
    assert!(listed >= 2, "crictl stats -o json: {json}");
    let pods: serde_json::Value = serde_json::from_str(&crictl(&cri, &["statsp", "-o", "json"])).expect("JSON");
    eprintln!("crictl statsp -o json: {pods}");
    let ours = pods["stats"].as_array().and_then(|a| a.iter().find(|p| p["attributes"]["id"] == pod.id.as_str()));
    let ours = ours.unwrap_or_else(|| panic!("crictl statsp lacks pod {}: {pods}", pod.id));
    // The pod's network, read in its network namespace: the VM's traffic crosses eth0.
    let rx = ours["linux"]["network"]["defaultInterface"]["rxBytes"]["value"].as_str().map(str::to_string);
    let rx =
        rx.or_else(|| ours["linux"]["network"]["defaultInterface"]["rxBytes"]["value"].as_u64().map(|v| v.to_string()));
    eprintln!("pod eth0 rx bytes: {rx:?}");
    if m == Manager::Containerd {
        let table = crictl(&cri, &["statsp"]);
        assert!(table.contains(&pod.id[..13]), "crictl statsp:\n{table}");
    }
    assert_manager_alive(&cri, "crictl stats and statsp");
    cri.remove_pod(&pod);
}

// ---------------------------------------------------------------------------------------------
// 3. Liveness and log reopening.

on_both_managers!(log_reopen_and_liveness_containerd, log_reopen_and_liveness_crio, log_reopen_and_liveness);
/// The kubelet's log rotation: the log file is renamed and `ReopenContainerLog` makes the
/// container manager write a new one, which the container's later lines reach. CRI-O first
/// asks whether the container is alive with `Kill` signal 0, which the guest refused before.
/// An exited container is refused.
fn log_reopen_and_liveness(m: Manager) {
    require_kata("the liveness check goes to the guest");
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("logs"));
    let config =
        cri.container_config("ticker", &["sh", "-c", "i=0; while :; do echo tick-$i; i=$((i+1)); sleep 0.2; done"]);
    let c = cri.run_container(&pod, &config);
    let log = pod.log_path(&config);
    poll(Duration::from_secs(20), "first lines in the log", || {
        let lines = cri_log_lines(&log, "stdout")?;
        if lines.len() >= 2 {
            Ok(())
        } else {
            Err(format!("{lines:?}"))
        }
    });
    let rotated = log.with_extension("log.1");
    fs::rename(&log, &rotated).unwrap();
    cri.block_on(cri.client().reopen_container_log(&c))
        .unwrap_or_else(|e| panic!("ReopenContainerLog: {e}\n{}", cri.logs()));
    let fresh = poll(Duration::from_secs(20), "new lines in the reopened log", || {
        let lines = cri_log_lines(&log, "stdout")?;
        if lines.len() >= 2 {
            Ok(lines)
        } else {
            Err(format!("{lines:?}"))
        }
    });
    let old = cri_log_lines(&rotated, "stdout").unwrap();
    let n = |l: &str| l.trim_start_matches("tick-").parse::<u64>().unwrap_or(0);
    assert!(n(&fresh[0]) > n(old.last().unwrap()), "the new log continues the old one: {old:?} then {fresh:?}");
    assert_eq!(cri.container_status(&c).state, proto::CONTAINER_RUNNING);

    cri.stop_container(&c, 2);
    let err =
        cri.block_on(cri.client().reopen_container_log(&c)).expect_err("ReopenContainerLog of an exited container");
    eprintln!("ReopenContainerLog after the exit: {err}");
    assert!(err.contains("not running") || err.contains("running"), "{err}");
    cri.remove_pod(&pod);
}

// ---------------------------------------------------------------------------------------------
// 4. Mount propagation.

/// A host directory made a shared mount (CRI refuses Bidirectional and HostToContainer on a
/// private one), unmounted and removed on drop.
struct SharedHostDir(PathBuf);

impl SharedHostDir {
    fn new(path: PathBuf) -> Self {
        fs::create_dir_all(&path).unwrap();
        nix::mount::mount(Some(&path), &path, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>).unwrap();
        nix::mount::mount(None::<&str>, &path, None::<&str>, nix::mount::MsFlags::MS_SHARED, None::<&str>).unwrap();
        SharedHostDir(path)
    }
}

impl Drop for SharedHostDir {
    fn drop(&mut self) {
        for m in podvisor_tests::leaks::mounts_under(&self.0).iter().rev() {
            let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir_all(&self.0);
    }
}

on_both_managers!(
    mount_propagation_in_the_pod_containerd,
    mount_propagation_in_the_pod_crio,
    mount_propagation_in_the_pod
);
/// CRI Bidirectional and HostToContainer propagation inside the VM: a privileged container
/// mounts a tmpfs below its Bidirectional volume, and the pod's other container, which has the
/// same host directory as HostToContainer, sees it; the tmpfs stays in the VM (the host never
/// sees mounts made in a VM). A mount made on the host later reaches the pod. libcontainer
/// refused the spec's `rshared` root propagation before.
fn mount_propagation_in_the_pod(m: Manager) {
    require_kata("propagation inside the guest");
    let cri = Cri::start(m);
    let dir = SharedHostDir::new(cri.dir().join("volumes/propagated"));
    fs::write(dir.0.join("from-host"), "host\n").unwrap();
    // Kubernetes allows Bidirectional only in privileged containers, which need a privileged
    // sandbox.
    let mut pod_config = cri.pod_config("propagation");
    pod_config.linux.as_mut().unwrap().security_context.as_mut().unwrap().privileged = true;
    let pod = cri.run_pod(&pod_config);
    let volume = |propagation| proto::Mount {
        container_path: "/vol".into(),
        host_path: dir.0.display().to_string(),
        propagation,
        ..Default::default()
    };
    let mut writer = cri.container_config("writer", SLEEPER);
    writer.mounts = vec![volume(proto::PROPAGATION_BIDIRECTIONAL)];
    writer.linux.as_mut().unwrap().security_context.as_mut().unwrap().privileged = true;
    let mut reader = cri.container_config("reader", SLEEPER);
    reader.mounts = vec![volume(proto::PROPAGATION_HOST_TO_CONTAINER)];
    let w = cri.run_container(&pod, &writer);
    let r = cri.run_container(&pod, &reader);
    assert_eq!(cri.exec_ok(&r, &["cat", "/vol/from-host"]), "host\n");
    cri.exec_ok(
        &w,
        &[
            "sh",
            "-c",
            "mkdir -p /vol/sub && mount -t tmpfs -o size=1m podvisor-prop /vol/sub && echo made-in-writer > /vol/sub/f",
        ],
    );
    let seen = poll(Duration::from_secs(5), "the writer's mount in the reader", || {
        let r = cri.exec(&r, &["cat", "/vol/sub/f"], 10);
        if r.exit_code == 0 {
            Ok(r.stdout)
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert_eq!(seen, "made-in-writer\n");
    let mounts = cri.exec_ok(&r, &["cat", "/proc/self/mountinfo"]);
    assert!(mounts.lines().any(|l| l.contains(" /vol/sub ") && l.contains("podvisor-prop")), "{mounts}");
    // The tmpfs lives in the VM: the host directory stays as it was.
    assert!(!dir.0.join("sub/f").exists(), "a mount in the guest reached the host");
    // A mount made on the host below the volume after the containers started reaches them: it is
    // a virtio-fs submount in the guest, mounted when the guest first looks the directory up.
    fs::create_dir_all(dir.0.join("late")).unwrap();
    nix::mount::mount(Some("tmpfs"), &dir.0.join("late"), Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=1m"))
        .unwrap();
    fs::write(dir.0.join("late/g"), "late-host-mount\n").unwrap();
    let seen = poll(Duration::from_secs(5), "a later host mount in the reader", || {
        let r = cri.exec(&r, &["cat", "/vol/late/g"], 10);
        if r.exit_code == 0 {
            Ok(r.stdout)
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert_eq!(seen, "late-host-mount\n");
    cri.remove_pod(&pod);
}

// ---------------------------------------------------------------------------------------------
// 5. Read-only binds.

on_both_managers!(
    read_only_binds_are_recursive_only_when_asked_containerd,
    read_only_binds_are_recursive_only_when_asked_crio,
    read_only_binds_are_recursive_only_when_asked
);
/// A read-only hostPath whose directory has a writable tmpfs mounted in it: with a plain
/// read-only mount the tmpfs stays writable (as with runc), with CRI `recursive_read_only`
/// (CRI-O; containerd 1.6 does not know the field) it is read-only too. Before, the guest saw
/// no submount at all.
fn read_only_binds_are_recursive_only_when_asked(m: Manager) {
    require_kata("binds shared into the guest");
    let cri = Cri::start(m);
    let dir = SharedHostDir::new(cri.dir().join("volumes/ro-with-tmpfs"));
    fs::create_dir_all(dir.0.join("scratch")).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &dir.0.join("scratch"),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    fs::write(dir.0.join("top"), "top\n").unwrap();
    let pod = cri.run_pod(&cri.pod_config("readonly"));
    let mut config = cri.container_config("app", SLEEPER);
    let bind = |path: &str, recursive| proto::Mount {
        container_path: path.into(),
        host_path: dir.0.display().to_string(),
        readonly: true,
        recursive_read_only: recursive,
        ..Default::default()
    };
    config.mounts = vec![bind("/ro", false)];
    if m == Manager::Crio {
        config.mounts.push(bind("/rro", true));
    }
    let c = cri.run_container(&pod, &config);
    assert_eq!(cri.exec_ok(&c, &["cat", "/ro/top"]), "top\n");
    let top = cri.exec(&c, &["sh", "-c", "echo x > /ro/top2"], 10);
    assert!(top.exit_code != 0 && top.stderr.contains("Read-only"), "/ro itself is read-only: {top:?}");
    let sub = cri.exec(&c, &["sh", "-c", "echo from-ro > /ro/scratch/f"], 10);
    assert_eq!(sub.exit_code, 0, "the tmpfs below a plain read-only mount stays writable: {sub:?}");
    assert_eq!(fs::read_to_string(dir.0.join("scratch/f")).unwrap(), "from-ro\n", "the write reached the host tmpfs");
    if m == Manager::Crio {
        let rec = cri.exec(&c, &["sh", "-c", "echo from-rro > /rro/scratch/g"], 10);
        assert!(rec.exit_code != 0 && rec.stderr.contains("Read-only"), "rro: the tmpfs too: {rec:?}");
        assert!(!dir.0.join("scratch/g").exists());
    }
    cri.remove_pod(&pod);
}

// ---------------------------------------------------------------------------------------------
// 6. The guest kernel.

on_both_managers!(
    net_admin_containers_make_bridges_and_veths_containerd,
    net_admin_containers_make_bridges_and_veths_crio,
    net_admin_containers_make_bridges_and_veths
);
/// A container with CAP_NET_ADMIN makes a bridge, a veth pair, a VLAN, a VXLAN and an IPIP
/// tunnel, as it can under runc: the guest kernel loads their modules on demand ("Package not
/// installed" before). (busybox's `ip` names no veth peer and has no tuntap: the peer is the
/// kernel's `vethN`.)
fn net_admin_containers_make_bridges_and_veths(m: Manager) {
    require_kata("the guest kernel's modules");
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("netadmin"));
    let mut config = cri.container_config("net", SLEEPER);
    let security = config.linux.as_mut().unwrap().security_context.as_mut().unwrap();
    security.capabilities =
        Some(proto::Capability { add_capabilities: vec!["NET_ADMIN".into()], ..Default::default() });
    let c = cri.run_container(&pod, &config);
    let script = "ip link add br-pv type bridge && ip link add veth-a type veth && ip link set veth-a master br-pv \
                  && ip link add link veth-a name veth-a.7 type vlan id 7 \
                  && ip link add vx-pv type vxlan id 42 dstport 4789 && ip tunnel add ipip-pv mode ipip remote 10.9.9.9 \
                  && ip -o link show";
    let r = cri.exec(&c, &["sh", "-c", script], 60);
    assert_eq!(r.exit_code, 0, "{r:?}");
    for want in ["br-pv", "veth-a", "veth-a.7", "vx-pv", "ipip-pv"] {
        assert!(r.stdout.contains(&format!(" {want}")), "{want} missing:\n{}", r.stdout);
    }
    assert!(r.stdout.contains("master br-pv"), "{}", r.stdout);
    cri.remove_pod(&pod);
}

// ---------------------------------------------------------------------------------------------
// 7. The pod's host cgroup.

/// The host cgroup (relative, cgroup v1 `memory`) a process is in.
fn memory_cgroup_of(pid: u32) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            (ctrl.split(',').any(|c| c == "memory") || ctrl.is_empty()).then(|| path.to_string())
        })
        .unwrap_or_default()
}

/// The pids of the pod's VM processes (QEMU, virtiofsd, the vsock daemon) and its shim.
fn vm_processes(sandbox_id: &str) -> Vec<(u32, String)> {
    podvisor_tests::leaks::processes()
        .into_iter()
        .filter(|p| podvisor_tests::leaks::mentions(&p.cmdline, sandbox_id))
        .filter(|p| {
            ["qemu-system", "virtiofsd", "vhost-device-vsock", "containerd-shim-kata-v2"]
                .iter()
                .any(|n| p.argv0.contains(n))
        })
        .map(|p| (p.pid, p.argv0))
        .collect()
}

on_both_managers!(pod_cgroup_holds_the_vm_containerd, pod_cgroup_holds_the_vm_crio, pod_cgroup_holds_the_vm);
/// QEMU, virtiofsd, the vsock daemon and the shim run in a cgroup below the pod's
/// `cgroup_parent` (the sandbox's `linux.cgroupsPath`), so the node charges the VM to the pod;
/// the cgroup goes with the pod.
fn pod_cgroup_holds_the_vm(m: Manager) {
    require_kata("the VM's host cgroup");
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("podcgroup"));
    let procs = vm_processes(&pod.id);
    assert!(procs.iter().any(|(_, n)| n.contains("qemu-system")), "no QEMU found for the pod: {procs:?}");
    for (pid, name) in &procs {
        let cg = memory_cgroup_of(*pid);
        assert!(
            cg.starts_with(&pod.cgroup_parent) && cg.len() > pod.cgroup_parent.len(),
            "{name} ({pid}) runs in {cg:?}, not below the pod cgroup {}",
            pod.cgroup_parent
        );
    }
    let memory = Path::new("/sys/fs/cgroup/memory").join(pod.cgroup_parent.trim_start_matches('/'));
    let usage: u64 = fs::read_to_string(memory.join("memory.usage_in_bytes")).unwrap().trim().parse().unwrap();
    eprintln!("pod cgroup {}: memory.usage_in_bytes {usage}", memory.display());
    assert!(usage > 32 << 20, "the pod cgroup holds {usage} bytes: the VM's memory is not charged to it");
    cri.remove_pod(&pod);
}

/// The systemd driver's path form (`<slice>:cri-containerd:<id>`, which containerd writes for a
/// `*.slice` cgroup parent): the VM runs in the expanded `….slice/…/cri-containerd-<id>.scope`.
#[test]
fn pod_cgroup_in_systemd_form_containerd() {
    require_kata("the VM's host cgroup");
    let cri = Cri::start(Manager::Containerd);
    let mut config = cri.pod_config("slice");
    let uid = config.metadata.as_ref().unwrap().uid.replace('-', "_");
    let slice = format!("podvisortest-pod{uid}.slice");
    config.linux.as_mut().unwrap().cgroup_parent = slice.clone();
    let pod = cri.run_pod(&config);
    let scope = format!("/podvisortest.slice/{slice}/cri-containerd-{}.scope", pod.id);
    for (pid, name) in vm_processes(&pod.id) {
        assert_eq!(memory_cgroup_of(pid), scope, "{name} ({pid})");
    }
    cri.remove_pod(&pod);
    for h in ["memory", "cpu", "pids"] {
        let p = Path::new("/sys/fs/cgroup").join(h).join("podvisortest.slice");
        assert!(!p.exists(), "{} is left: the shim made it and must remove it", p.display());
    }
}

// ---------------------------------------------------------------------------------------------
// 8. In-place resize.

fn meminfo_mib(cri: &Cri, c: &str) -> u64 {
    let text = cri.exec_ok(c, &["cat", "/proc/meminfo"]);
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .unwrap()
        / 1024
}

on_both_managers!(
    in_place_resize_grows_the_vm_containerd,
    in_place_resize_grows_the_vm_crio,
    in_place_resize_grows_the_vm
);
/// `UpdateContainerResources`, the kubelet's in-place pod resize: a raised memory limit
/// hot-plugs memory into the VM and the guest cgroup follows; a raised CPU limit hot-plugs a
/// vCPU; a lowered memory limit lowers the guest cgroup's.
fn in_place_resize_grows_the_vm(m: Manager) {
    require_kata("hot-plug for a resize");
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("resize"));
    let mut config = cri.container_config("app", SLEEPER);
    config.linux.as_mut().unwrap().resources.as_mut().unwrap().memory_limit_in_bytes = 64 << 20;
    let c = cri.run_container(&pod, &config);
    let before = meminfo_mib(&cri, &c);
    let online = || cri.exec_ok(&c, &["cat", "/sys/devices/system/cpu/online"]).trim().to_string();
    assert_eq!(online(), "0");
    let memory_max = || cri.exec_ok(&c, &["cat", "/sys/fs/cgroup/memory.max"]).trim().to_string();
    assert_eq!(memory_max(), (64u64 << 20).to_string());

    let resources = |memory: i64, quota: i64| proto::LinuxContainerResources {
        memory_limit_in_bytes: memory,
        cpu_quota: quota,
        cpu_period: if quota > 0 { 100_000 } else { 0 },
        cpu_shares: 1024,
        ..Default::default()
    };
    cri.block_on(cri.client().update_container_resources(&c, resources(320 << 20, 100_000)))
        .unwrap_or_else(|e| panic!("UpdateContainerResources: {e}\n{}", cri.logs()));
    let after = meminfo_mib(&cri, &c);
    eprintln!("guest MemTotal {before} MiB -> {after} MiB; CPUs online {}", online());
    assert!(after >= before + 200, "a 64 -> 320 MiB resize grew the guest from {before} to {after} MiB");
    assert_eq!(memory_max(), (320u64 << 20).to_string(), "the guest cgroup follows");
    let host_cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if host_cpus >= 2 {
        assert_eq!(online(), "0-1", "a 1-CPU limit adds a vCPU");
    }
    let quota = cri.exec_ok(&c, &["cat", "/sys/fs/cgroup/cpu.max"]);
    assert!(quota.starts_with("100000 100000"), "cpu.max {quota}");

    cri.block_on(cri.client().update_container_resources(&c, resources(96 << 20, 100_000)))
        .unwrap_or_else(|e| panic!("UpdateContainerResources (lower): {e}\n{}", cri.logs()));
    assert_eq!(memory_max(), (96u64 << 20).to_string(), "a lowered limit lowers the guest cgroup's");
    assert_eq!(meminfo_mib(&cri, &c), after, "nothing is unplugged");
    cri.remove_pod(&pod);
}
