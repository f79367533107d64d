//! End-to-end: Kubernetes pods through a real container manager's CRI, on both managers: a
//! private containerd 1.6 with its CRI plugin and a private CRI-O 1.36 per test
//! (`tests/src/cri.rs`, `tests/src/crio_server.rs`), driven with a CRI client the way the kubelet
//! drives them: a pod sandbox and its busybox containers, networking over a CNI bridge, volumes
//! (hostPath, configMap, raw block device), exec, logs, OOM. Each scenario is one test per manager
//! (`<name>_containerd`, `<name>_crio`). Every pod ends with StopPodSandbox and RemovePodSandbox
//! and a check that nothing of it is left on the host.
//!
//! Environment:
//! - `PODVISOR_CRI_HANDLER` (default `kata`): the CRI runtime handler. `runc` validates the
//!   harness with runc; tests and assertions that only make sense in a VM then FAIL with "needs
//!   the kata handler", they never pass silently.
//! - `PODVISOR_SHIM`: the shim binary to test instead of `target/{release,debug}/containerd-shim-kata-v2`.
//! - `PODVISOR_CRIO_DIR`: CRI-O 1.36's `crio`, `pinns` and `crictl` (default: the workspace's
//!   `../shared/tools/cri-o`). Where they are missing, each `_crio` test says so in one line.
//!
//! Prerequisites (a missing one is a failure, never a skip): `scripts/deps.sh` (containerd,
//! runc, conmon, skopeo, busybox-static, containernetworking-plugins, iproute2, util-linux), and
//! for `kata` `make guest-image` and `cargo build -p podvisor-shim`.
//!
//! Run: `cargo test -p podvisor-tests --test cri -- --test-threads=2`.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use podvisor_tests::cri::{
    cri_log_lines, handler_is_kata, links_in_netns, proto, require_kata, ConfigMapVolume, Cri, LoopDevice, Manager,
    BUSYBOX_IMAGE, PAUSE_IMAGE, PAUSE_SCRIPT,
};
use podvisor_tests::image::sysv_shm_helper;
use podvisor_tests::leaks;
use podvisor_tests::{on_both_managers, poll};

/// How long a container may take to exit or an update to show.
const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

fn host_kernel() -> String {
    nix::sys::utsname::uname().unwrap().release().to_string_lossy().into_owned()
}

/// Kernel checks that fit the handler: a VM's own kernel under kata, the host's under runc.
fn assert_kernel(cri: &Cri, container: &str) {
    let guest = cri.exec_ok(container, &["uname", "-r"]).trim().to_string();
    if handler_is_kata() {
        assert_ne!(guest, host_kernel(), "the container saw the host's kernel: it does not run in a VM");
    } else {
        assert_eq!(guest, host_kernel(), "runc containers share the host kernel");
    }
}

/// `sleep` that exits on SIGTERM (a PID 1 ignores signals it has no handler for).
const SLEEPER: &[&str] = &["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"];

/// What a shim gets from containerd's CRI, for the test log: annotations, namespaces, mounts,
/// cgroups path, devices, resources, process.
fn describe_spec(what: &str, spec: &serde_json::Value) {
    let mounts: Vec<String> = spec["mounts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    format!(
                        "{} <- {} ({}) {}",
                        m["destination"].as_str().unwrap_or(""),
                        m["source"].as_str().unwrap_or(""),
                        m["type"].as_str().unwrap_or(""),
                        m["options"]
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "--- {what}: config.json as the shim gets it ---\nannotations: {}\nprocess.args: {}\nprocess.oomScoreAdj: {}\n\
         root: {}\nhostname: {}\nlinux.namespaces: {}\nlinux.cgroupsPath: {}\nlinux.devices: {}\nlinux.resources: {}\nmounts:\n  {}",
        serde_json::to_string_pretty(&spec["annotations"]).unwrap(),
        spec["process"]["args"],
        spec["process"]["oomScoreAdj"],
        spec["root"],
        spec["hostname"],
        spec["linux"]["namespaces"],
        spec["linux"]["cgroupsPath"],
        spec["linux"]["devices"],
        spec["linux"]["resources"],
        mounts.join("\n  ")
    );
}

fn print_startup(cri: &Cri) {
    let s = cri.startup();
    eprintln!(
        "CRI {} ({} handler): socket after {:.3} s, CRI ready after {:.3} s, images in {:.3} s",
        cri.manager(),
        cri.handler(),
        s.manager.as_secs_f64(),
        s.cri_ready.as_secs_f64(),
        s.images.as_secs_f64()
    );
}

on_both_managers!(
    cri_plugin_starts_and_lists_the_local_images_containerd,
    cri_plugin_starts_and_lists_the_local_images_crio,
    cri_plugin_starts_and_lists_the_local_images
);
/// The CRI plugin runs with this host's limits (cgroup v1 hybrid, no systemd, no
/// CAP_SYS_RESOURCE), reports ready, and sees both imported images.
fn cri_plugin_starts_and_lists_the_local_images(m: Manager) {
    let cri = Cri::start(m);
    print_startup(&cri);
    let v = cri.block_on(cri.client().version()).unwrap();
    assert_eq!(v.runtime_name, m.runtime_name(), "{v:?}");
    assert_eq!(v.runtime_api_version, "v1", "{v:?}");
    let images = cri.block_on(cri.client().list_images()).unwrap();
    for want in [PAUSE_IMAGE, BUSYBOX_IMAGE] {
        assert!(images.iter().any(|i| i.repo_tags.iter().any(|t| t == want)), "{want} not listed: {images:?}");
    }
}

/// The shipped containerd and CRI-O snippets are valid TOML with the handler's keys.
#[test]
fn shipped_runtime_configs_are_valid_toml_with_the_kata_handler() {
    let dir = podvisor_tests::workspace().join("configs");
    let read = |name: &str| -> toml::Table {
        let p = dir.join(name);
        let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        text.parse().unwrap_or_else(|e| panic!("{} is not valid TOML: {e}", p.display()))
    };
    let crio = read("crio-50-kata.conf");
    let kata = &crio["crio"]["runtime"]["runtimes"]["kata"];
    for (key, want) in [
        ("runtime_path", "/usr/local/bin/containerd-shim-kata-v2"),
        ("runtime_type", "vm"),
        ("runtime_root", "/run/vc"),
        ("runtime_config_path", "/usr/share/defaults/kata-containers/configuration.toml"),
    ] {
        assert_eq!(kata[key].as_str(), Some(want), "crio-50-kata.conf: {key}");
    }
    assert_eq!(kata["privileged_without_host_devices"].as_bool(), Some(true));
    assert!(
        kata.get("allowed_annotations").is_none(),
        "CRI-O 1.36 rejects allowed_annotations = [\"io.katacontainers.*\"]"
    );

    let ctd = read("containerd-kata.toml");
    let kata = &ctd["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["kata"];
    assert_eq!(kata["runtime_type"].as_str(), Some("io.containerd.kata.v2"));
    assert_eq!(kata["pod_annotations"].as_array().map(|a| a.len()), Some(1));
    assert_eq!(kata["pod_annotations"][0].as_str(), Some("io.katacontainers.*"));
    assert_eq!(kata["privileged_without_host_devices"].as_bool(), Some(true));
    assert_eq!(kata["options"]["ConfigPath"].as_str(), Some("/usr/share/defaults/kata-containers/configuration.toml"));
}

on_both_managers!(
    pod_containers_share_localhost_and_ipc_and_the_pod_ip_answers_containerd,
    pod_containers_share_localhost_and_ipc_and_the_pod_ip_answers_crio,
    pod_containers_share_localhost_and_ipc_and_the_pod_ip_answers
);
/// Two containers of one pod share its network (B reaches A's server on localhost) and IPC
/// (a /dev/shm file written in A is visible in B, same IPC namespace); the pod IP answers ping
/// and TCP from the host; hostname, DNS settings and /etc/hosts reach the containers.
fn pod_containers_share_localhost_and_ipc_and_the_pod_ip_answers(m: Manager) {
    let cri = Cri::start(m);
    print_startup(&cri);
    let pod = cri.run_pod(&cri.pod_config("net"));
    eprintln!("pod {} ip {} netns {:?} host veth {:?}", pod.id, pod.ip, pod.netns, pod.host_veth);
    if let Some(spec) = cri.bundle_spec(&pod.id) {
        describe_spec("sandbox", &spec);
        assert_eq!(
            spec["process"]["args"],
            serde_json::json!(["/bin/sh", "-c", PAUSE_SCRIPT]),
            "the pause image's entrypoint"
        );
    }
    let server = cri.container_config(
        "server",
        &[
            "sh",
            "-c",
            "mkdir -p /tmp/www && echo pong-A > /tmp/www/index.html && echo shm-from-A > /dev/shm/podvisor-shm \
             && exec httpd -f -p 8080 -h /tmp/www",
        ],
    );
    // SysV shared memory needs a tool busybox lacks: a static helper, bind-mounted read-only.
    let helper = proto::Mount {
        container_path: "/usr/local/bin/sysv-shm".into(),
        host_path: sysv_shm_helper().display().to_string(),
        readonly: true,
        ..Default::default()
    };
    let mut server = server;
    server.mounts.push(helper.clone());
    let mut client = cri.container_config("client", SLEEPER);
    client.mounts.push(helper);
    let a = cri.run_container(&pod, &server);
    let b = cri.run_container(&pod, &client);
    if let Some(spec) = cri.bundle_spec(&a) {
        describe_spec("container", &spec);
    }
    assert_kernel(&cri, &b);

    // localhost: B fetches from A's server (A may still be starting). No `wget -T`: busybox
    // 1.35's wget crashes with it (SIGSEGV, exit 139); ExecSync's timeout bounds the call.
    let body = poll(Duration::from_secs(30), "B reaching A on 127.0.0.1:8080", || {
        let r = cri.exec(&b, &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/index.html"], 30);
        if r.exit_code == 0 {
            Ok(r.stdout)
        } else {
            Err(format!("{r:?}"))
        }
    });
    assert_eq!(body, "pong-A\n");

    // IPC: same namespace, same /dev/shm.
    assert_eq!(cri.exec_ok(&b, &["cat", "/dev/shm/podvisor-shm"]), "shm-from-A\n");
    let ns = |c: &str, kind: &str| cri.exec_ok(c, &["readlink", &format!("/proc/self/ns/{kind}")]);
    assert_eq!(ns(&a, "ipc"), ns(&b, "ipc"), "the containers are in different IPC namespaces");
    assert_eq!(ns(&a, "net"), ns(&b, "net"), "the containers are in different network namespaces");
    assert_ne!(ns(&a, "pid"), ns(&b, "pid"), "PID namespace mode CONTAINER: each container has its own");
    // SysV: a segment A creates is B's to read.
    cri.exec_ok(&a, &["sysv-shm", "write", "5059", "sysv-from-A"]);
    assert_eq!(cri.exec_ok(&b, &["sysv-shm", "read", "5059"]), "sysv-from-A");
    let sysv = cri.exec_ok(&b, &["cat", "/proc/sysvipc/shm"]);
    assert!(
        sysv.lines()
            .skip(1)
            .any(|l| l.split_whitespace().next() == Some(&i32::from_str_radix("5059", 16).unwrap().to_string())),
        "key 0x5059 not in B's /proc/sysvipc/shm:\n{sysv}"
    );

    // The pod's own settings.
    assert_eq!(cri.exec_ok(&b, &["hostname"]).trim(), "net");
    let resolv = cri.exec_ok(&b, &["cat", "/etc/resolv.conf"]);
    for want in ["nameserver 127.0.0.53", "search podvisor-test.svc.cluster.local svc.cluster.local", "options ndots:5"]
    {
        assert!(resolv.contains(want), "/etc/resolv.conf lacks {want:?}:\n{resolv}");
    }
    let hosts = cri.exec_ok(&b, &["cat", "/etc/hosts"]);
    assert!(hosts.contains("localhost"), "/etc/hosts:\n{hosts}");
    let addrs = cri.exec_ok(&b, &["ip", "-4", "-o", "addr", "show"]);
    assert!(
        addrs.contains(&format!("inet {}/", pod.ip)),
        "the pod IP {} is not on an interface in the pod:\n{addrs}",
        pod.ip
    );

    if let Some(netns) = &pod.netns {
        let links = links_in_netns(netns).unwrap_or_else(|e| panic!("{e}"));
        let qdiscs = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["tc", "qdisc", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        eprintln!("pod network namespace {}: links {links:?}\nqdiscs:\n{qdiscs}", netns.display());
        assert!(links.iter().any(|l| l == "eth0"), "no eth0 in the pod's network namespace: {links:?}");
    }

    // The host reaches the pod IP (through the test bridge only).
    cri.assert_routed_via_bridge(&pod.ip);
    poll(Duration::from_secs(20), "ping from the host to the pod IP", || {
        let out = Command::new("/bin/busybox").args(["ping", "-c", "1", "-W", "2", &pod.ip]).output();
        match out {
            Ok(o) if o.status.success() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let addr: SocketAddr = format!("{}:8080", pod.ip).parse().unwrap();
    let response = poll(Duration::from_secs(20), "an HTTP answer from the pod IP", || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
        let mut text = String::new();
        s.read_to_string(&mut text).map_err(|e| e.to_string())?;
        Ok(text)
    });
    assert!(response.contains("pong-A"), "HTTP response from {addr}: {response:?}");

    cri.remove_pod(&pod);
}

on_both_managers!(
    host_path_volumes_read_write_and_read_only_containerd,
    host_path_volumes_read_write_and_read_only_crio,
    host_path_volumes_read_write_and_read_only
);
/// hostPath volumes: read-write (the container's write shows on the host, the host's in the
/// container) and read-only (writes fail).
fn host_path_volumes_read_write_and_read_only(m: Manager) {
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("hostpath"));
    let rw = cri.dir().join("volumes/hostpath-rw");
    let ro = cri.dir().join("volumes/hostpath-ro");
    for (d, text) in [(&rw, "host-rw\n"), (&ro, "host-ro\n")] {
        fs::create_dir_all(d).unwrap();
        fs::write(d.join("from-host"), text).unwrap();
    }
    let mut config = cri.container_config("app", SLEEPER);
    config.mounts = vec![
        proto::Mount { container_path: "/rw".into(), host_path: rw.display().to_string(), ..Default::default() },
        proto::Mount {
            container_path: "/ro".into(),
            host_path: ro.display().to_string(),
            readonly: true,
            ..Default::default()
        },
    ];
    let c = cri.run_container(&pod, &config);
    if let Some(spec) = cri.bundle_spec(&c) {
        describe_spec("container with hostPath volumes", &spec);
    }
    assert_eq!(cri.exec_ok(&c, &["cat", "/rw/from-host"]), "host-rw\n");
    assert_eq!(cri.exec_ok(&c, &["cat", "/ro/from-host"]), "host-ro\n");

    cri.exec_ok(&c, &["sh", "-c", "echo guest-rw > /rw/from-guest"]);
    assert_eq!(
        fs::read_to_string(rw.join("from-guest")).unwrap(),
        "guest-rw\n",
        "the container's write is not on the host"
    );

    let r = cri.exec(&c, &["sh", "-c", "echo guest-ro > /ro/from-guest"], 30);
    assert_ne!(r.exit_code, 0, "writing to a read-only hostPath volume succeeded: {r:?}");
    assert!(r.stderr.contains("Read-only file system"), "unexpected error writing to the read-only volume: {r:?}");
    assert!(!ro.join("from-guest").exists(), "a write to the read-only volume reached the host");

    fs::write(rw.join("later"), "host-later\n").unwrap();
    poll(Duration::from_secs(2), "a later host write visible in the container", || {
        let r = cri.exec(&c, &["cat", "/rw/later"], 30);
        if r.stdout == "host-later\n" {
            Ok(())
        } else {
            Err(format!("{r:?}"))
        }
    });
    cri.remove_pod(&pod);
    fs::remove_dir_all(cri.dir().join("volumes")).unwrap();
}

on_both_managers!(
    memory_empty_dir_is_a_guest_tmpfs_shared_by_the_pod_containerd,
    memory_empty_dir_is_a_guest_tmpfs_shared_by_the_pod_crio,
    memory_empty_dir_is_a_guest_tmpfs_shared_by_the_pod
);
/// An emptyDir with medium Memory (kubelet: a host tmpfs at `…/volumes/kubernetes.io~empty-dir/
/// <name>`) is a tmpfs in the guest, shared by the pod's containers, not a host directory over
/// virtio-fs.
fn memory_empty_dir_is_a_guest_tmpfs_shared_by_the_pod(m: Manager) {
    require_kata("the memory emptyDir test");
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("emptydir"));
    let vol = cri.dir().join(format!("kubelet/pods/{}/volumes/kubernetes.io~empty-dir/cache", pod.uid()));
    fs::create_dir_all(&vol).unwrap();
    nix::mount::mount(Some("tmpfs"), &vol, Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>)
        .expect("mount the host tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _guard = Unmount(vol.clone());
    let mount =
        proto::Mount { container_path: "/cache".into(), host_path: vol.display().to_string(), ..Default::default() };
    let mut a = cri.container_config("a", SLEEPER);
    a.mounts = vec![mount.clone()];
    let mut b = cri.container_config("b", SLEEPER);
    b.mounts = vec![mount];
    let a = cri.run_container(&pod, &a);
    let b = cri.run_container(&pod, &b);
    let mounts = cri.exec_ok(&a, &["cat", "/proc/mounts"]);
    let line = mounts.lines().find(|l| l.split_whitespace().nth(1) == Some("/cache")).unwrap_or_default().to_string();
    assert!(line.contains(" tmpfs "), "/cache is not a guest tmpfs: {line:?}\n{mounts}");
    cri.exec_ok(&a, &["sh", "-c", "echo from-a > /cache/f"]);
    assert_eq!(cri.exec_ok(&b, &["cat", "/cache/f"]), "from-a\n", "the pod's containers do not share the emptyDir");
    assert!(!vol.join("f").exists(), "the guest tmpfs write reached the host tmpfs");
    cri.remove_pod(&pod);
}

on_both_managers!(
    config_map_updates_are_visible_within_two_seconds_containerd,
    config_map_updates_are_visible_within_two_seconds_crio,
    config_map_updates_are_visible_within_two_seconds
);
/// A configMap volume updated the way the kubelet does (new timestamped directory, `..data`
/// symlink renamed over): 20 updates in a row, each visible in the container within 2 s; the
/// same for a secret (that layout on a tmpfs of its own).
fn config_map_updates_are_visible_within_two_seconds(m: Manager) {
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("configmap"));
    let kubelet = cri.dir().join("kubelet");
    let config_map = ConfigMapVolume::create(&kubelet, pod.uid(), "settings", &[("key", "v0")]);
    // A secret: the same atomic writer on a tmpfs of its own.
    let secret = ConfigMapVolume::create_secret(&kubelet, pod.uid(), "token", &[("key", "v0")]);
    let mut config = cri.container_config("app", SLEEPER);
    let mount = |path: &str, vol: &ConfigMapVolume| proto::Mount {
        container_path: path.into(),
        host_path: vol.dir.display().to_string(),
        readonly: true,
        ..Default::default()
    };
    config.mounts = vec![mount("/vol", &config_map), mount("/secret", &secret)];
    let c = cri.run_container(&pod, &config);
    let mut vols = [("configMap", "/vol/key", config_map), ("secret", "/secret/key", secret)];
    for (_, path, _) in &vols {
        assert_eq!(cri.exec_ok(&c, &["cat", path]), "v0");
    }
    let listing = cri.exec_ok(&c, &["ls", "-la", "/vol"]);
    eprintln!("/vol in the container:\n{listing}");

    for (what, path, vol) in &mut vols {
        let mut latencies = Vec::new();
        for i in 1..=20 {
            let want = format!("v{i}");
            vol.update(&[("key", &want)]);
            let t = Instant::now();
            loop {
                let r = cri.exec(&c, &["cat", path], 10);
                if r.exit_code == 0 && r.stdout == want {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(2),
                    "update {i} of the {what} ({want}) not visible in the container after {:?}; it still reads {r:?}",
                    t.elapsed()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            latencies.push(t.elapsed());
        }
        let max = latencies.iter().max().unwrap();
        let mean = latencies.iter().sum::<Duration>() / latencies.len() as u32;
        eprintln!(
            "{what} update visible after: max {:.3} s, mean {:.3} s (each poll is one ExecSync)",
            max.as_secs_f64(),
            mean.as_secs_f64()
        );
    }
    cri.remove_pod(&pod);
    drop(vols);
    fs::remove_dir_all(kubelet).unwrap();
}

on_both_managers!(
    exec_sync_output_and_exit_code_and_complete_container_logs_containerd,
    exec_sync_output_and_exit_code_and_complete_container_logs_crio,
    exec_sync_output_and_exit_code_and_complete_container_logs
);
/// ExecSync returns stdout, stderr and the exit code; a container's CRI log file has all its
/// lines, in order, partial lines of long output included.
fn exec_sync_output_and_exit_code_and_complete_container_logs(m: Manager) {
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("exec"));
    let c = cri.run_container(&pod, &cri.container_config("app", SLEEPER));

    let r = cri.exec(&c, &["sh", "-c", "echo out; echo err >&2; exit 3"], 30);
    assert_eq!((r.exit_code, r.stdout.as_str(), r.stderr.as_str()), (3, "out\n", "err\n"), "{r:?}");
    let r = cri.exec(&c, &["true"], 30);
    assert_eq!(r.exit_code, 0, "{r:?}");
    // A container's seccomp profile holds for what is exec'd in it, as with runc: chmod is
    // refused in the confined container, allowed in the other.
    let profile = cri.dir().join("seccomp-no-chmod.json");
    let rules = r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["chmod","fchmodat","fchmodat2"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#;
    fs::write(&profile, rules).unwrap();
    let mut confined = cri.container_config("confined", SLEEPER);
    let security = confined.linux.as_mut().and_then(|l| l.security_context.as_mut()).expect("security context");
    security.seccomp_profile_path = format!("localhost/{}", profile.display());
    security.seccomp = Some(proto::SecurityProfile {
        profile_type: proto::PROFILE_LOCALHOST,
        localhost_ref: profile.display().to_string(),
    });
    let confined = cri.run_container(&pod, &confined);
    let chmod = ["sh", "-c", "chmod 700 /tmp && echo allowed || echo refused"];
    assert_eq!(cri.exec_ok(&confined, &chmod), "refused\n", "chmod in a container whose profile refuses it");
    assert_eq!(cri.exec_ok(&c, &chmod), "allowed\n", "chmod in a container without a profile");
    // ExecSync's timeout: the call fails after it and the process is killed in the guest.
    // containerd answers DeadlineExceeded; CRI-O answers exit code -1, "command timed out".
    let t = Instant::now();
    let answer = cri.block_on(cri.client().exec_sync(&c, &["sleep", "4711"], 2));
    let took = t.elapsed();
    eprintln!("ExecSync timeout after {:.2} s: {answer:?}", took.as_secs_f64());
    match (m, answer) {
        (Manager::Containerd, Err(e)) => assert!(e.contains("timeout") && e.contains("exceeded"), "{e}"),
        (Manager::Crio, Ok(r)) => {
            assert_eq!(r.exit_code, -1, "{r:?}");
            assert_eq!(String::from_utf8_lossy(&r.stderr), "command timed out", "{r:?}");
        }
        (m, other) => panic!("ExecSync of sleep 4711 with timeout 2 through {m}: {other:?}"),
    }
    assert!(took < Duration::from_secs(20), "ExecSync with timeout 2 s took {took:?}");
    poll(Duration::from_secs(10), "the timed-out exec killed in the guest", || {
        let ps = cri.exec_ok(&c, &["ps", "-o", "args"]);
        if ps.contains("sleep 4711") {
            Err(ps)
        } else {
            Ok(())
        }
    });
    let big = cri.exec(&c, &["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' b"], 30);
    assert_eq!(
        (big.exit_code, big.stdout.len()),
        (0, 200000),
        "ExecSync of 200000 bytes: exit {} stderr {:?}",
        big.exit_code,
        big.stderr
    );

    const N: usize = 2000;
    let long = "x".repeat(20000);
    let script = format!(
        "i=1; while [ $i -le {N} ]; do echo line-$i; i=$((i+1)); done; echo to-stderr >&2; head -c 20000 /dev/zero | tr '\\0' x; echo"
    );
    let logger = cri.container_config("logger", &["sh", "-c", &script]);
    let l = cri.run_container(&pod, &logger);
    let status = cri.wait_exited(&l, EXIT_TIMEOUT);
    assert_eq!((status.exit_code, status.reason.as_str()), (0, "Completed"), "{status:?}");
    let path = pod.log_path(&logger);
    assert_eq!(Path::new(&status.log_path), path, "ContainerStatus.log_path");
    let expected: Vec<String> = (1..=N).map(|i| format!("line-{i}")).chain([long]).collect();
    let lines = poll(Duration::from_secs(10), "the complete CRI log", || {
        let lines = cri_log_lines(&path, "stdout")?;
        if lines.len() >= expected.len() {
            Ok(lines)
        } else {
            Err(format!("{} of {} lines", lines.len(), expected.len()))
        }
    });
    assert_eq!(lines.len(), expected.len(), "lines in {}", path.display());
    for (i, (got, want)) in lines.iter().zip(&expected).enumerate() {
        assert_eq!(got, want, "line {} of {}", i + 1, path.display());
    }
    assert_eq!(cri_log_lines(&path, "stderr").unwrap(), vec!["to-stderr".to_string()]);

    // Short output of a quick exec is never lost. CRI-O closes its FIFOs as soon as Wait
    // returns, without waiting for its readers, so the shim must hold the exit until the output
    // was read (an empty stdout with exit 0 was seen in CI). Two execs run at a time, so that
    // the readers compete for the CPU.
    let lost: Vec<String> = std::thread::scope(|s| {
        let run = |k: usize| {
            let cri = &cri;
            let c = &c;
            s.spawn(move || {
                let mut lost = Vec::new();
                for i in 0..EXEC_ROUNDS {
                    let script = format!("echo out-{k}-{i}; echo err-{k}-{i} >&2");
                    let r = cri.exec(c, &["sh", "-c", &script], 30);
                    if (r.exit_code, r.stdout.as_str(), r.stderr.as_str())
                        != (0, format!("out-{k}-{i}\n").as_str(), format!("err-{k}-{i}\n").as_str())
                    {
                        lost.push(format!("{k}-{i}: {r:?}"));
                    }
                }
                lost
            })
        };
        let (a, b) = (run(0), run(1));
        a.join().unwrap().into_iter().chain(b.join().unwrap()).collect()
    });
    assert!(lost.is_empty(), "{} of {} ExecSyncs lost output: {lost:#?}", lost.len(), 2 * EXEC_ROUNDS);
    cri.remove_pod(&pod);
}

/// Rounds of the concurrent short ExecSyncs, per thread.
const EXEC_ROUNDS: usize = 25;

on_both_managers!(
    pod_sharing_its_pid_namespace_lets_containers_see_each_other_containerd,
    pod_sharing_its_pid_namespace_lets_containers_see_each_other_crio,
    pod_sharing_its_pid_namespace_lets_containers_see_each_other
);
/// `shareProcessNamespace: true`: the kubelet asks for PID namespace POD for the sandbox and
/// every container; in the guest they then see each other's processes, while a container that
/// asks for its own PID namespace in the same pod does not.
fn pod_sharing_its_pid_namespace_lets_containers_see_each_other(m: Manager) {
    let cri = Cri::start(m);
    let set_pid = |ns: Option<&mut proto::NamespaceOption>, mode| ns.expect("namespace options").pid = mode;
    let mut config = cri.pod_config("pidns");
    set_pid(
        config.linux.as_mut().and_then(|l| l.security_context.as_mut()).and_then(|s| s.namespace_options.as_mut()),
        proto::NAMESPACE_POD,
    );
    let pod = cri.run_pod(&config);
    let shared = |name: &str, args: &[&str]| {
        let mut c = cri.container_config(name, args);
        set_pid(
            c.linux.as_mut().and_then(|l| l.security_context.as_mut()).and_then(|s| s.namespace_options.as_mut()),
            proto::NAMESPACE_POD,
        );
        c
    };
    let _a = cri.run_container(&pod, &shared("a", &["sleep", "4242"]));
    let b = cri.run_container(&pod, &shared("b", SLEEPER));
    let own = cri.run_container(&pod, &cri.container_config("own", SLEEPER));

    let seen_by_b = cri.exec_ok(&b, &["ps", "-o", "pid,args"]);
    assert!(
        seen_by_b.contains("sleep 4242"),
        "b shares the pod's PID namespace but does not see a's process:\n{seen_by_b}"
    );
    let init = cri.exec_ok(&b, &["cat", "/proc/1/cmdline"]);
    assert!(init.contains(PAUSE_SCRIPT), "PID 1 of a shared namespace is the pause process: {init:?}");
    let seen_by_own = cri.exec_ok(&own, &["ps", "-o", "pid,args"]);
    assert!(
        !seen_by_own.contains("sleep 4242"),
        "a container with its own PID namespace sees a's process:\n{seen_by_own}"
    );
    cri.remove_pod(&pod);
}

on_both_managers!(
    streaming_exec_with_tty_and_resize_and_attach_containerd,
    streaming_exec_with_tty_and_resize_and_attach_crio,
    streaming_exec_with_tty_and_resize_and_attach
);
/// CRI streaming the way `kubectl exec -it` and `kubectl attach` reach a pod (containerd's
/// streaming server, WebSocket `v4.channel.k8s.io`): an interactive TTY exec follows a resize
/// and reports its exit code; a non-TTY exec keeps stdout and stderr apart; attaching to a TTY
/// container and to a stdin-reading container reaches their own stdio, and what they print
/// while attached is also in the CRI log; detaching leaves the container running.
fn streaming_exec_with_tty_and_resize_and_attach(m: Manager) {
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("stream"));
    let mut console = cri.container_config("console", &["sh"]);
    (console.stdin, console.tty) = (true, true);
    let console_id = cri.run_container(&pod, &console);
    let echo = "while read l; do echo \"got $l\"; echo \"err $l\" >&2; done";
    let mut reader = cri.container_config("reader", &["sh", "-c", echo]);
    reader.stdin = true;
    let reader_id = cri.run_container(&pod, &reader);
    let t = Duration::from_secs(30);

    // kubectl exec -it: the shell sees the size the client asked for, then its exit code.
    let mut sh = cri.exec_stream(&console_id, &["sh"], true, true);
    // The resize and the keystrokes travel separately to the shim: ask until the size shows.
    let resized = (0..20).any(|_| {
        sh.resize(123, 45).unwrap();
        sh.stdin(b"stty size\n").unwrap();
        sh.read_until(Duration::from_secs(1), "stty size", |s| s.stdout_text().contains("45 123")).is_ok()
    });
    assert!(resized, "the exec TTY never reported 45 rows 123 columns: {:?}\n{}", sh.stdout_text(), cri.logs());
    sh.stdin(b"exit 3\n").unwrap();
    assert_eq!(sh.wait(t), Ok(3), "exit code of the TTY exec; output {:?}", sh.stdout_text());

    // kubectl exec -i (no TTY): stdin in, stdout and stderr apart, exit code.
    let mut plain = cri.exec_stream(&reader_id, &["sh", "-c", "head -c 4; echo; echo oops >&2; exit 7"], false, true);
    plain.stdin(b"ping").unwrap();
    assert_eq!(plain.wait(t), Ok(7), "exit code; stdout {:?} stderr {:?}", plain.stdout_text(), plain.stderr_text());
    assert_eq!((plain.stdout_text().as_str(), plain.stderr_text().as_str()), ("ping\n", "oops\n"));

    // kubectl attach -it to the TTY container: its own shell answers and follows a resize.
    let mut attached = cri.attach_stream(&console_id, true);
    attached.stdin(b"echo $((6*7))\n").unwrap();
    attached.read_until(t, "42 from the attached shell", |s| s.stdout_text().contains("42")).unwrap();
    let resized = (0..20).any(|_| {
        attached.resize(100, 30).unwrap();
        attached.stdin(b"stty size\n").unwrap();
        attached.read_until(Duration::from_secs(1), "stty size", |s| s.stdout_text().contains("30 100")).is_ok()
    });
    assert!(resized, "the attached TTY never reported 30 rows 100 columns: {:?}", attached.stdout_text());
    attached.close();

    // kubectl attach -i to a container reading stdin: both streams come back, and the log has them.
    let mut fed = cri.attach_stream(&reader_id, false);
    fed.stdin(b"hello\n").unwrap();
    fed.read_until(t, "the reader's answer on stdout and stderr", |s| {
        s.stdout_text().contains("got hello") && s.stderr_text().contains("err hello")
    })
    .unwrap();
    fed.close();
    let log = pod.log_path(&reader);
    poll(Duration::from_secs(10), "the attached input's answers in the CRI log", || {
        let out = cri_log_lines(&log, "stdout")?;
        let err = cri_log_lines(&log, "stderr")?;
        if out == ["got hello"] && err == ["err hello"] {
            Ok(())
        } else {
            Err(format!("stdout {out:?} stderr {err:?}"))
        }
    });

    for id in [&console_id, &reader_id] {
        let state = cri.container_status(id).state;
        assert_eq!(state, proto::CONTAINER_RUNNING, "{id} after its streams closed");
    }
    cri.remove_pod(&pod);
}

on_both_managers!(
    cpu_limits_hot_plug_vcpus_up_to_the_ceiling_containerd,
    cpu_limits_hot_plug_vcpus_up_to_the_ceiling_crio,
    cpu_limits_hot_plug_vcpus_up_to_the_ceiling
);
/// A container's CPU limit hot-plugs vCPUs into the pod's VM (quota / period rounded up, as
/// Kata does) up to `default_maxvcpus` (0: the host's CPU count); a limit beyond that ceiling
/// starts the container anyway. The guest's online CPUs are read from a container.
fn cpu_limits_hot_plug_vcpus_up_to_the_ceiling(m: Manager) {
    require_kata("vCPU hot-plug");
    let host_cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("cpus"));
    let online = |c: &str| cri.exec_ok(c, &["cat", "/sys/devices/system/cpu/online"]).trim().to_string();
    let range = |n: usize| if n == 1 { "0".to_string() } else { format!("0-{}", n - 1) };
    let plain = cri.run_container(&pod, &cri.container_config("plain", SLEEPER));
    assert_eq!(online(&plain), "0", "default_vcpus = 1 before any CPU limit");
    let limited = |name: &str, quota: i64| {
        let mut c = cri.container_config(name, SLEEPER);
        let r = c.linux.as_mut().and_then(|l| l.resources.as_mut()).expect("resources");
        (r.cpu_quota, r.cpu_period) = (quota, 100_000);
        cri.run_container(&pod, &c)
    };
    let one = limited("one-cpu", 100_000);
    assert_eq!(online(&one), range(2.min(host_cpus)), "1 + 1 vCPU for a 1-CPU limit");
    assert_eq!(online(&plain), online(&one), "the pod's containers share the VM's CPUs");
    // 1.5 CPUs round up to 2; the total is capped at the host's CPUs.
    let more = limited("more-cpus", 150_000);
    assert_eq!(cri.container_status(&more).state, proto::CONTAINER_RUNNING);
    assert_eq!(online(&more), range(4.min(host_cpus)), "vCPUs after limits of 1 and 1.5 CPUs on {host_cpus} host CPUs");
    cri.remove_pod(&pod);
}

on_both_managers!(
    container_over_its_memory_limit_is_oom_killed_containerd,
    container_over_its_memory_limit_is_oom_killed_crio,
    container_over_its_memory_limit_is_oom_killed
);
/// A container over its memory limit is OOM-killed: ContainerStatus says OOMKilled, exit 137.
/// The same allocation without a limit succeeds in the same pod (so it is the container's
/// limit that kills, not a small VM).
fn container_over_its_memory_limit_is_oom_killed(m: Manager) {
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("oom"));
    const LIMIT: i64 = 64 << 20;
    // The shell itself (the container's init) doubles a string up to 64 MiB (96 MiB live at
    // the last step); first it prints the limit its cgroup shows (v1 under runc; a guest's
    // cgroup v2 file when the container sees its own cgroup).
    let script =
        "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null; echo allocating; \
                  x=0123456789abcdef; i=0; while [ $i -lt 22 ]; do x=\"$x$x\"; i=$((i+1)); done; echo survived ${#x}";
    let control = cri.container_config("control", &["sh", "-c", script]);
    let mut config = cri.container_config("hog", &["sh", "-c", script]);
    let res = config.linux.as_mut().unwrap().resources.as_mut().unwrap();
    res.memory_limit_in_bytes = LIMIT;
    res.memory_swap_limit_in_bytes = LIMIT;

    let ctl = cri.run_container(&pod, &control);
    let status = cri.wait_exited(&ctl, EXIT_TIMEOUT);
    let log = cri_log_lines(&pod.log_path(&control), "stdout").unwrap_or_default();
    assert_eq!(status.exit_code, 0, "the allocation without a limit failed: {status:?} {log:?}");
    assert!(log.iter().any(|l| l == "survived 67108864"), "control container output: {log:?}");

    let c = cri.create_container(&pod, &config);
    let spec = cri.cri_spec(&c);
    if let Some(spec) = &spec {
        describe_spec("container with a memory limit", spec);
        assert_eq!(
            spec["linux"]["resources"]["memory"]["limit"].as_i64(),
            Some(LIMIT),
            "the CRI's spec lacks the limit"
        );
    }
    cri.start_container(&c);
    let status = cri.wait_exited(&c, EXIT_TIMEOUT);
    let log = cri_log_lines(&pod.log_path(&config), "stdout").unwrap_or_default();
    eprintln!(
        "hog: {status:?}
log: {log:?}"
    );
    if !log.iter().any(|l| l == &LIMIT.to_string()) {
        eprintln!("note: the container does not show its {LIMIT}-byte limit in /sys/fs/cgroup (log {log:?})");
    }
    assert!(!log.iter().any(|l| l.starts_with("survived")), "64 MiB under a 64 MiB limit: the shell survived: {log:?}");
    assert_eq!(
        (status.reason.as_str(), status.exit_code),
        ("OOMKilled", 137),
        "ContainerStatus of a container killed by the OOM killer: {status:?}\n{}",
        cri.logs()
    );
    cri.remove_pod(&pod);
}

on_both_managers!(
    raw_block_device_volume_is_written_through_containerd,
    raw_block_device_volume_is_written_through_crio,
    raw_block_device_volume_is_written_through
);
/// A raw block volume: a loop device passed as a CRI device is a block device in the
/// container; a marker written there is in the backing file once the pod is gone.
fn raw_block_device_volume_is_written_through(m: Manager) {
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("block"));
    let mut dev = LoopDevice::attach(&cri.dir().join("block.img"), 16 << 20, Some(cri.dir()));
    eprintln!("loop device {} over {}", dev.device.display(), dev.file.display());
    let mut config = cri.container_config("app", SLEEPER);
    config.devices = vec![proto::Device {
        container_path: "/dev/xvda".into(),
        host_path: dev.device.display().to_string(),
        permissions: "rwm".into(),
    }];
    let c = cri.create_container(&pod, &config);
    if let Some(spec) = cri.cri_spec(&c) {
        describe_spec("container with a block device", &spec);
        // The host path is not in the spec: only the device's type and major:minor.
        let dev = &spec["linux"]["devices"][0];
        assert_eq!((dev["path"].as_str(), dev["type"].as_str()), (Some("/dev/xvda"), Some("b")), "{dev}");
    }
    cri.start_container(&c);
    assert_eq!(
        cri.exec_ok(&c, &["sh", "-c", "test -b /dev/xvda && echo block"]),
        "block\n",
        "/dev/xvda is not a block device"
    );
    assert_eq!(cri.exec_ok(&c, &["blockdev", "--getsize64", "/dev/xvda"]).trim(), (16u64 << 20).to_string());
    let marker = format!("marker-{}", pod.uid());
    cri.exec_ok(&c, &["sh", "-c", &format!("echo {marker} | dd of=/dev/xvda conv=fsync 2>&1")]);
    cri.remove_pod(&pod);
    let mut head = vec![0u8; marker.len()];
    fs::File::open(&dev.file).unwrap().read_exact(&mut head).unwrap();
    assert_eq!(String::from_utf8_lossy(&head), marker, "the marker is not in the loop device's file");
    dev.detach();
    assert!(!dev.is_attached(), "{} is still attached", dev.device.display());
}

on_both_managers!(
    stop_and_remove_pod_with_running_containers_leave_nothing_containerd,
    stop_and_remove_pod_with_running_containers_leave_nothing_crio,
    stop_and_remove_pod_with_running_containers_leave_nothing
);
/// StopPodSandbox with running containers stops them (and is idempotent); RemovePodSandbox
/// removes them; nothing is left (processes, mounts, network namespace, veth, CNI state,
/// cgroups, run directories, bundles, shim socket).
fn stop_and_remove_pod_with_running_containers_leave_nothing(m: Manager) {
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("teardown"));
    let a = cri.run_container(&pod, &cri.container_config("a", SLEEPER));
    let b = cri.run_container(&pod, &cri.container_config("b", &["sleep", "100000"]));
    cri.exec_ok(&a, &["true"]);
    for c in [&a, &b] {
        assert_eq!(cri.container_status(c).state, proto::CONTAINER_RUNNING);
    }
    // CRI-O sends SIGTERM and waits the call's deadline less a second before SIGKILL (`sleep`
    // as PID 1 ignores SIGTERM); containerd kills at once.
    let t = Instant::now();
    let quick = cri.client().with_timeout(Duration::from_secs(15));
    cri.block_on(quick.stop_pod_sandbox(&pod.id)).unwrap_or_else(|e| panic!("StopPodSandbox: {e}\n{}", cri.logs()));
    eprintln!("StopPodSandbox with two running containers took {:.2} s", t.elapsed().as_secs_f64());
    for c in cri.list_containers(&pod) {
        assert_eq!(c.state, proto::CONTAINER_EXITED, "container {} after StopPodSandbox: {c:?}", c.id);
    }
    let st = cri.pod_status(&pod).status.unwrap();
    assert_eq!(st.state, proto::SANDBOX_NOTREADY, "{st:?}");
    cri.stop_pod(&pod); // idempotent, as the kubelet relies on
    if let Some(ns) = &pod.netns {
        assert!(!ns.exists(), "StopPodSandbox left the network namespace {}", ns.display());
    }
    cri.remove_pod(&pod);
    assert!(cri.list_containers(&pod).is_empty());
}

on_both_managers!(
    pod_sandbox_and_containers_run_in_one_vm_containerd,
    pod_sandbox_and_containers_run_in_one_vm_crio,
    pod_sandbox_and_containers_run_in_one_vm
);
/// Only with the kata handler: the sandbox and both containers run in one VM (one QEMU
/// process for the sandbox id, none for the containers), served by one shim.
fn pod_sandbox_and_containers_run_in_one_vm(m: Manager) {
    require_kata("one VM per pod");
    let cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("onevm"));
    let a = cri.run_container(&pod, &cri.container_config("a", SLEEPER));
    let b = cri.run_container(&pod, &cri.container_config("b", SLEEPER));
    let qemu = leaks::find_processes("qemu-system", &pod.id);
    assert_eq!(qemu.len(), 1, "QEMU processes for sandbox {}: {qemu:?}", pod.id);
    for c in [&a, &b] {
        let q = leaks::find_processes("qemu-system", c);
        assert!(q.is_empty(), "container {c} has a QEMU of its own: {q:?}");
    }
    let shims = leaks::find_processes("containerd-shim-kata-v2", &pod.id);
    assert_eq!(shims.len(), 1, "shim daemons for sandbox {}: {shims:?}", pod.id);
    let kernel_a = cri.exec_ok(&a, &["cat", "/proc/version"]);
    assert_eq!(kernel_a, cri.exec_ok(&b, &["cat", "/proc/version"]));
    assert_kernel(&cri, &a);
    // The same guest: both containers see the same boot id.
    let boot = |c: &str| cri.exec_ok(c, &["cat", "/proc/sys/kernel/random/boot_id"]);
    assert_eq!(boot(&a), boot(&b), "the containers run in different kernels");
    let host_boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_ne!(boot(&a), host_boot, "the containers run in the host's kernel");

    // One container stopped and removed while the pod lives: the VM and the other stay.
    let guest_boot = boot(&b);
    let while_running = leaks::find_leaks(&[a.as_str()], None);
    eprintln!("host resources naming container a while it runs: {while_running:#?}");
    assert!(!while_running.is_empty(), "the leak check sees nothing of a running container: it could not fail");
    cri.stop_container(&a, 10);
    let st = cri.container_status(&a);
    assert_eq!(
        (st.state, st.exit_code),
        (proto::CONTAINER_EXITED, 0),
        "a after StopContainer (it exits on SIGTERM): {st:?}"
    );
    assert_eq!(cri.container_status(&b).state, proto::CONTAINER_RUNNING, "b after a was stopped");
    cri.remove_container(&a);
    assert!(!cri.list_containers(&pod).iter().any(|c| c.id == a), "a is still listed after RemoveContainer");
    assert!(!cri.bundle(&a).exists(), "a's task bundle is left after RemoveContainer");
    let left = leaks::settle(Duration::from_secs(5), || leaks::find_leaks(&[a.as_str()], None));
    assert!(left.is_empty(), "container a left, while its pod lives: {left:#?}");
    let pids = |procs: Vec<leaks::Proc>| procs.iter().map(|p| p.pid).collect::<Vec<_>>();
    assert_eq!(pids(leaks::find_processes("qemu-system", &pod.id)), pids(qemu), "the VM changed when a container went");
    // A container added afterwards joins the same VM.
    let c = cri.run_container(&pod, &cri.container_config("c", SLEEPER));
    assert_eq!(boot(&c), guest_boot, "a later container runs in another kernel");
    assert_eq!(boot(&b), guest_boot);
    cri.remove_pod(&pod);
}
