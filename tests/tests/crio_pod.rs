//! End-to-end: a two-container pod driven exactly as CRI-O 1.36 drives a `runtime_type = "vm"`
//! handler (shared `docs/client-behaviour.md` §2, §3.4, §4): `start` once per container with
//! CRI-O's argv (`-address ""`), environment and cwd, stdout and stderr read together; then
//! ttrpc `containerd.task.v2.Task` calls on whatever address each `start` printed, no events,
//! no `delete` binary call. The infra container and the app containers carry CRI-O's
//! annotations (`io.kubernetes.cri-o.SandboxID`, `...ContainerType`, `io.container.manager`),
//! an already mounted absolute overlay `root.path`, and namespaces pinned by path (network,
//! IPC, UTS) as `pinns` makes them.
//!
//! With our shim (`PODVISOR_CRI_HANDLER` unset or `kata`): every `start` returns the same
//! address, one shim daemon and one QEMU serve the pod, the app container's output arrives, and
//! an app container killed by the OOM killer (memory limit in its spec) makes the shim write
//! `<app bundle>/oom`. With `PODVISOR_CRI_HANDLER=runc` the same calls go to containerd's runc
//! shim to validate the harness; the pod assertions then FAIL with "needs the kata handler".
//!
//! Run: `cargo test -p podvisor-tests --test crio_pod`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use containerd_shim_protos::api;
use podvisor_tests::containerd::{kata_test_config, shim_binary};
use podvisor_tests::cri::{handler, handler_is_kata, PAUSE_SCRIPT};
use podvisor_tests::crio::{crio_start, task_call, FifoReader};
use podvisor_tests::{image, leaks, unique_id};

/// containerd's runc shim, for `PODVISOR_CRI_HANDLER=runc`.
const RUNC_SHIM: &str = "/usr/bin/containerd-shim-runc-v2";

const LIMIT: u64 = 64 << 20;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn hex_id(seed: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(seed.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything the test set up on the host, removed whatever happens: processes naming the
/// ids (a failed test leaves them), shim sockets, our own mounts (overlay rootfs, shm tmpfs,
/// pinned namespaces), the cgroup parent and the directory.
struct CrioPod {
    dir: PathBuf,
    ids: Vec<String>,
    cgroup_parent: String,
    our_mounts: Mutex<Vec<PathBuf>>,
}

impl CrioPod {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: nix::mount::MsFlags,
        data: Option<&str>,
    ) {
        nix::mount::mount(source, target, fstype, flags, data)
            .unwrap_or_else(|e| panic!("mount {target:?} ({fstype:?} {data:?}): {e}"));
        self.our_mounts.lock().unwrap().push(target.to_path_buf());
    }

    /// Unmounts what this test mounted (what CRI-O unmounts after the containers are gone).
    fn unmount_ours(&self) {
        let mut mounts = self.our_mounts.lock().unwrap();
        while let Some(m) = mounts.pop() {
            if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("unmounting {}: {e}", m.display());
            }
        }
    }

    fn remove_cgroups(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for m in leaks::mounts() {
            if !(m.fstype == "cgroup" || m.fstype == "cgroup2") || !m.mount_point.starts_with("/sys/fs/cgroup") {
                continue;
            }
            let p = m.mount_point.join(self.cgroup_parent.trim_start_matches('/'));
            if p.is_dir() {
                let children: Vec<PathBuf> =
                    fs::read_dir(&p).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
                for c in children {
                    if let Err(e) = fs::remove_dir(&c) {
                        errors.push(format!("cgroup {}: {e}", c.display()));
                    }
                }
                if let Err(e) = fs::remove_dir(&p) {
                    errors.push(format!("cgroup {}: {e}", p.display()));
                }
            }
        }
        errors
    }
}

impl Drop for CrioPod {
    fn drop(&mut self) {
        let ids: Vec<&str> = self.ids.iter().map(String::as_str).collect();
        let killed = leaks::force_cleanup(&ids, Some(&self.dir));
        if !killed.is_empty() {
            eprintln!("cleaned up after the CRI-O pod test: {killed:?}");
        }
        for id in &ids {
            let sock = leaks::shim_socket("", "default", id);
            if sock.exists() {
                eprintln!("removing the shim socket {} left behind", sock.display());
                let _ = fs::remove_file(sock);
            }
        }
        self.unmount_ours();
        leaks::unmount_under(&self.dir);
        let _ = self.remove_cgroups();
        if let Err(e) = leaks::remove_tree(&self.dir) {
            eprintln!("{}: {e}", self.dir.display());
        }
    }
}

/// One container as CRI-O sets it up: bundle (`<dir>/overlay-containers/<id>/userdata`), an
/// overlay rootfs already mounted, stdio FIFOs, the log FIFO.
struct Ctr {
    id: String,
    bundle: PathBuf,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    stdout: Option<FifoReader>,
    stderr: Option<FifoReader>,
    log: Option<FifoReader>,
}

impl Ctr {
    fn new(pod: &CrioPod, id: &str, n: usize) -> Ctr {
        let bundle = pod.dir.join("overlay-containers").join(id).join("userdata");
        let layer = pod.dir.join("overlay").join(id);
        let merged = layer.join("merged");
        for d in [&bundle, &layer.join("diff"), &layer.join("work"), &merged] {
            fs::create_dir_all(d).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            image::busybox_rootfs().display(),
            layer.join("diff").display(),
            layer.join("work").display()
        );
        pod.mount(Some(Path::new("overlay")), &merged, Some("overlay"), nix::mount::MsFlags::empty(), Some(&opts));
        let io = pod.dir.join("crio/fifo/io").join(n.to_string());
        fs::create_dir_all(&io).unwrap();
        let stdout_path = io.join(format!("{id}-stdout"));
        let stderr_path = io.join(format!("{id}-stderr"));
        Ctr {
            id: id.into(),
            log: Some(FifoReader::open(&bundle.join("log"))),
            stdout: Some(FifoReader::open(&stdout_path)),
            stderr: Some(FifoReader::open(&stderr_path)),
            bundle,
            stdout_path,
            stderr_path,
        }
    }

    fn rootfs(&self, pod: &CrioPod) -> PathBuf {
        pod.dir.join("overlay").join(&self.id).join("merged")
    }
}

/// CRI-O's spec for a container of the pod: containerd's default spec (`ctr oci spec`) with the
/// process, the absolute overlay root, the pinned namespaces, /dev/shm, /etc/hostname and
/// /etc/resolv.conf from the infra bundle, the cgroup, and CRI-O's annotations.
#[allow(clippy::too_many_arguments)]
fn crio_spec(
    pod: &CrioPod,
    ctr: &Ctr,
    infra: &Ctr,
    sandbox_id: &str,
    kind: &str,
    name: &str,
    args: &[&str],
    memory_limit: Option<u64>,
) -> serde_json::Value {
    let out = Command::new(podvisor_tests::containerd::CTR).args(["oci", "spec"]).output().expect("ctr oci spec");
    assert!(out.status.success(), "ctr oci spec: {out:?}");
    let mut spec: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ctr oci spec prints JSON");
    spec["process"]["args"] = serde_json::json!(args);
    spec["process"]["env"] = serde_json::json!([image::IMAGE_PATH_ENV, "HOSTNAME=crio-pod"]);
    spec["process"]["terminal"] = serde_json::json!(false);
    if kind == "sandbox" && handler_is_kata() {
        // CRI-O hard-codes -998 for infra containers; a VM shim must apply it in the guest
        // only (runc cannot lower it on hosts without CAP_SYS_RESOURCE).
        spec["process"]["oomScoreAdj"] = serde_json::json!(-998);
    }
    spec["root"] = serde_json::json!({ "path": ctr.rootfs(pod), "readonly": kind == "sandbox" });
    spec["hostname"] = serde_json::json!("crio-pod");
    spec["linux"]["cgroupsPath"] = serde_json::json!(format!("{}/crio-{}", pod.cgroup_parent, ctr.id));
    let nsdir = pod.dir.join("ns");
    spec["linux"]["namespaces"] = serde_json::json!([
        { "type": "pid" },
        { "type": "network", "path": nsdir.join("netns") },
        { "type": "ipc", "path": nsdir.join("ipcns") },
        { "type": "uts", "path": nsdir.join("utsns") },
        { "type": "mount" },
    ]);
    if let Some(limit) = memory_limit {
        spec["linux"]["resources"]["memory"] = serde_json::json!({ "limit": limit, "swap": limit });
    }
    let mounts = spec["mounts"].as_array_mut().unwrap();
    mounts.retain(|m| m["destination"] != "/dev/shm" && m["destination"] != "/run");
    for (dest, src, ro) in [
        ("/dev/shm", infra.bundle.join("shm"), false),
        ("/etc/hostname", infra.bundle.join("hostname"), kind == "sandbox"),
        ("/etc/resolv.conf", infra.bundle.join("resolv.conf"), kind == "sandbox"),
    ] {
        let mut options = vec!["rbind", "nosuid", "nodev", "noexec"];
        options.push(if ro { "ro" } else { "rw" });
        mounts.push(serde_json::json!({ "destination": dest, "type": "bind", "source": src, "options": options }));
    }
    // No io.katacontainers.* pod annotation: the shim refuses those not listed in the
    // configuration's enable_annotations, as Kata does (not what this test is about).
    let mut annotations: HashMap<&str, String> = HashMap::from([
        ("io.container.manager", "cri-o".to_string()),
        ("io.kubernetes.cri-o.ContainerType", kind.to_string()),
        ("io.kubernetes.cri-o.SandboxID", sandbox_id.to_string()),
        ("io.kubernetes.cri-o.ContainerID", ctr.id.clone()),
        ("io.kubernetes.cri-o.SandboxName", "k8s_crio-pod_podvisor-test_uid-1_0".to_string()),
        ("io.kubernetes.cri-o.Name", format!("k8s_{name}_crio-pod_podvisor-test_uid-1_0")),
        ("io.kubernetes.cri-o.MountPoint", ctr.rootfs(pod).display().to_string()),
        ("io.kubernetes.cri-o.Created", "2026-11-23T00:00:00.000000000Z".to_string()),
        ("io.kubernetes.cri-o.ResolvPath", infra.bundle.join("resolv.conf").display().to_string()),
    ]);
    if kind == "sandbox" {
        annotations.extend([
            ("io.kubernetes.cri-o.ContainerName", "k8s_POD_crio-pod_podvisor-test_uid-1_0".to_string()),
            ("io.kubernetes.cri-o.HostName", "crio-pod".to_string()),
            ("io.kubernetes.cri-o.HostNetwork", "false".to_string()),
            ("io.kubernetes.cri-o.ShmPath", infra.bundle.join("shm").display().to_string()),
            ("io.kubernetes.cri-o.CgroupParent", pod.cgroup_parent.clone()),
            ("io.kubernetes.cri-o.RuntimeHandler", "kata".to_string()),
            ("io.kubernetes.pod.name", "crio-pod".to_string()),
            ("io.kubernetes.pod.namespace", "podvisor-test".to_string()),
            ("io.kubernetes.pod.uid", "uid-1".to_string()),
        ]);
    } else {
        annotations.extend([
            ("io.kubernetes.cri-o.Image", image::IMAGE_REF.to_string()),
            ("io.kubernetes.cri-o.ImageName", image::IMAGE_REF.to_string()),
            ("io.kubernetes.cri-o.LogPath", pod.dir.join(format!("logs/{name}/0.log")).display().to_string()),
            ("io.kubernetes.cri-o.TTY", "false".to_string()),
            ("io.kubernetes.cri-o.Stdin", "false".to_string()),
        ]);
    }
    spec["annotations"] = serde_json::json!(annotations);
    spec
}

const CALL: Option<Duration> = Some(Duration::from_secs(120));

async fn create_and_start(client: &ttrpc::asynchronous::Client, ctr: &Ctr) -> Result<u32, String> {
    let mut create = api::CreateTaskRequest::new();
    create.id = ctr.id.clone();
    create.bundle = ctr.bundle.display().to_string();
    create.stdout = ctr.stdout_path.display().to_string();
    create.stderr = ctr.stderr_path.display().to_string();
    let created: api::CreateTaskResponse = task_call(client, "Create", &create, false, CALL).await?;
    let mut state = api::StateRequest::new();
    state.id = ctr.id.clone();
    let st: api::StateResponse = task_call(client, "State", &state, true, CALL).await?;
    if st.status.enum_value() != Ok(api::Status::CREATED) {
        return Err(format!("State of {} after Create: {:?}", ctr.id, st.status));
    }
    let mut start = api::StartRequest::new();
    start.id = ctr.id.clone();
    let started: api::StartResponse = task_call(client, "Start", &start, true, CALL).await?;
    if started.pid != created.pid {
        return Err(format!("Start returned pid {} but Create {}", started.pid, created.pid));
    }
    Ok(started.pid)
}

async fn wait(client: &ttrpc::asynchronous::Client, id: &str) -> Result<u32, String> {
    let mut w = api::WaitRequest::new();
    w.id = id.into();
    let waited: api::WaitResponse = task_call(client, "Wait", &w, true, None).await?;
    Ok(waited.exit_status)
}

async fn delete_and_shutdown(client: &ttrpc::asynchronous::Client, id: &str) -> Result<u32, String> {
    let mut state = api::StateRequest::new();
    state.id = id.into();
    let _: api::StateResponse = task_call(client, "State", &state, true, CALL).await?;
    let mut delete = api::DeleteRequest::new();
    delete.id = id.into();
    let deleted: api::DeleteResponse = task_call(client, "Delete", &delete, true, CALL).await?;
    let mut shutdown = api::ShutdownRequest::new();
    shutdown.id = id.into();
    match task_call::<_, api::Empty>(client, "Shutdown", &shutdown, true, CALL).await {
        Ok(_) => {}
        // The shim may exit before its answer leaves: CRI-O tolerates that.
        Err(e) if e.contains("closed") || e.contains("eof") || e.contains("socket") => {}
        Err(e) => return Err(e),
    }
    Ok(deleted.exit_status)
}

fn shim_daemons(id: &str) -> Vec<u32> {
    leaks::processes()
        .into_iter()
        .filter(|p| {
            p.argv0.contains("containerd-shim") && leaks::mentions(&p.cmdline, id) && !p.cmdline.ends_with(" start")
        })
        .map(|p| p.pid)
        .collect()
}

#[test]
fn crio_pod_infra_and_app_containers_share_one_shim_and_vm() {
    let kata = handler_is_kata();
    let shim = if kata { shim_binary() } else { PathBuf::from(RUNC_SHIM) };
    assert!(shim.exists(), "{} is missing", shim.display());
    let tag = unique_id("criopod");
    let pod_id = hex_id(&format!("{tag}-infra"));
    let app_id = hex_id(&format!("{tag}-app"));
    let oom_id = hex_id(&format!("{tag}-oom"));
    let pod = CrioPod {
        dir: std::env::temp_dir().join(&tag),
        ids: vec![pod_id.clone(), app_id.clone(), oom_id.clone()],
        cgroup_parent: format!("/podvisor-crio-{}", &pod_id[..12]),
        our_mounts: Mutex::new(Vec::new()),
    };
    fs::create_dir_all(pod.dir.join("ns")).unwrap();
    let config = pod.dir.join("configuration.toml");
    fs::write(&config, if kata { kata_test_config(|_| {}) } else { "# runc\n".into() }).unwrap();

    // pinns: network, IPC and UTS namespaces pinned at paths (bind mounts of nsfs files; the
    // network namespace holds only lo: this test is about the shim, not CNI).
    let ns: Vec<PathBuf> = ["netns", "ipcns", "utsns"].iter().map(|n| pod.dir.join("ns").join(n)).collect();
    for f in &ns {
        fs::write(f, "").unwrap();
    }
    let out = Command::new("unshare")
        .arg(format!("--net={}", ns[0].display()))
        .arg(format!("--ipc={}", ns[1].display()))
        .arg(format!("--uts={}", ns[2].display()))
        .arg("true")
        .output()
        .expect("unshare");
    assert!(out.status.success(), "unshare --net --ipc --uts: {}", text(&out.stderr));
    pod.our_mounts.lock().unwrap().extend(ns.iter().cloned());

    let infra = Ctr::new(&pod, &pod_id, 1);
    fs::write(infra.bundle.join("hostname"), "crio-pod\n").unwrap();
    fs::write(infra.bundle.join("resolv.conf"), "nameserver 127.0.0.53\nsearch podvisor-test.svc.cluster.local\n")
        .unwrap();
    fs::create_dir_all(infra.bundle.join("shm")).unwrap();
    pod.mount(
        Some(Path::new("shm")),
        &infra.bundle.join("shm"),
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    );
    let mut app = Ctr::new(&pod, &app_id, 2);
    let mut hog = Ctr::new(&pod, &oom_id, 3);
    let specs = [
        (&infra, crio_spec(&pod, &infra, &infra, &pod_id, "sandbox", "POD", &["/bin/sh", "-c", PAUSE_SCRIPT], None)),
        (
            &app,
            crio_spec(&pod, &app, &infra, &pod_id, "container", "app", &["sh", "-c", "echo app-ok $(hostname); cat /etc/resolv.conf; echo shm > /dev/shm/crio-shm"], None),
        ),
        (
            &hog,
            crio_spec(
                &pod,
                &hog,
                &infra,
                &pod_id,
                "container",
                "hog",
                &["sh", "-c", "echo allocating; x=0123456789abcdef; i=0; while [ $i -lt 25 ]; do x=\"$x$x\"; i=$((i+1)); done; echo survived"],
                Some(LIMIT),
            ),
        ),
    ];
    for (c, spec) in &specs {
        fs::write(c.bundle.join("config.json"), serde_json::to_vec_pretty(spec).unwrap()).unwrap();
    }

    let mut kata_only: Vec<String> = Vec::new();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let result: Result<(), String> = rt.block_on(async {
        // Infra: start, Create, State, Start, a held Wait.
        let infra_addr = crio_start(&shim, &config, &infra.bundle, &infra.id)?;
        let infra_client = ttrpc::asynchronous::Client::connect(&infra_addr)
            .await
            .map_err(|e| format!("connect {infra_addr}: {e}"))?;
        create_and_start(&infra_client, &infra).await.map_err(|e| format!("infra: {e}"))?;
        let held = {
            let c = infra_client.clone();
            let id = pod_id.clone();
            tokio::spawn(async move { wait(&c, &id).await })
        };

        // App: its own start (and connection, as CRI-O does), output, exit 0.
        let app_addr = crio_start(&shim, &config, &app.bundle, &app.id)?;
        if app_addr != infra_addr {
            kata_only
                .push(format!("app `start` printed {app_addr}, infra's printed {infra_addr}: not one shim per pod"));
        }
        let app_client =
            ttrpc::asynchronous::Client::connect(&app_addr).await.map_err(|e| format!("connect {app_addr}: {e}"))?;
        create_and_start(&app_client, &app).await.map_err(|e| format!("app: {e}"))?;
        let app_exit = wait(&app_client, &app_id).await?;
        if app_exit != 0 {
            return Err(format!("app container exited {app_exit}"));
        }

        // One shim daemon, one VM.
        let daemons: Vec<u32> = [&pod_id, &app_id]
            .iter()
            .flat_map(|id| shim_daemons(id))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if daemons.len() != 1 {
            kata_only.push(format!("{} shim daemons serve the pod ({daemons:?}), not one", daemons.len()));
        }
        let qemu = leaks::find_processes("qemu-system", &pod_id);
        if qemu.len() != 1 {
            kata_only.push(format!("{} QEMU processes for sandbox {pod_id}, not one", qemu.len()));
        }
        if !leaks::find_processes("qemu-system", &app_id).is_empty() {
            kata_only.push("the app container has a QEMU of its own".into());
        }

        // The OOM-killed app container: exit 137 and <bundle>/oom.
        let hog_addr = crio_start(&shim, &config, &hog.bundle, &hog.id)?;
        if hog_addr != infra_addr {
            kata_only.push(format!("hog `start` printed {hog_addr}, infra's printed {infra_addr}"));
        }
        let hog_client =
            ttrpc::asynchronous::Client::connect(&hog_addr).await.map_err(|e| format!("connect {hog_addr}: {e}"))?;
        create_and_start(&hog_client, &hog).await.map_err(|e| format!("hog: {e}"))?;
        let hog_exit = wait(&hog_client, &oom_id).await?;
        if hog_exit != 137 {
            return Err(format!(
                "the container over its {LIMIT}-byte memory limit exited {hog_exit}, not 137 (OOM kill)"
            ));
        }
        let oom_file = hog.bundle.join("oom");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !oom_file.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !oom_file.exists() {
            kata_only.push(format!("no {} after the OOM kill (CRI-O's only OOM signal)", oom_file.display()));
        }

        // Stop: app containers first (the shim stays up for the pod), then the infra.
        delete_and_shutdown(&app_client, &app_id).await.map_err(|e| format!("app: {e}"))?;
        delete_and_shutdown(&hog_client, &oom_id).await.map_err(|e| format!("hog: {e}"))?;
        let mut state = api::StateRequest::new();
        state.id = pod_id.clone();
        let st: api::StateResponse = task_call(&infra_client, "State", &state, true, CALL)
            .await
            .map_err(|e| format!("the infra after its app containers were shut down: {e}"))?;
        if st.status.enum_value() != Ok(api::Status::RUNNING) {
            return Err(format!("the infra is {:?} after its app containers were shut down", st.status));
        }
        let mut kill = api::KillRequest::new();
        kill.id = pod_id.clone();
        kill.signal = 15;
        let _: api::Empty = task_call(&infra_client, "Kill", &kill, true, CALL).await?;
        let infra_exit = tokio::time::timeout(Duration::from_secs(60), held)
            .await
            .map_err(|_| "the held Wait of the infra did not return within 60 s of SIGTERM".to_string())?
            .map_err(|e| format!("held Wait: {e}"))??;
        if infra_exit != 0 {
            return Err(format!("the infra exited {infra_exit} on SIGTERM, not 0"));
        }
        delete_and_shutdown(&infra_client, &pod_id).await.map_err(|e| format!("infra: {e}"))?;
        Ok(())
    });
    drop(rt);
    let app_out = app.stdout.take().unwrap().finish();
    let app_err = app.stderr.take().unwrap().finish();
    let hog_out = hog.stdout.take().unwrap().finish();
    let _ = hog.stderr.take().map(FifoReader::finish);
    let logs: Vec<String> = [&infra, &app, &hog]
        .into_iter()
        .map(|c| {
            format!(
                "--- shim log ({}) ---\n{}",
                &c.id[..12],
                c.log.as_ref().map(FifoReader::so_far).unwrap_or_default()
            )
        })
        .collect();
    if let Err(e) = result {
        panic!("{e}\napp stdout: {app_out:?} stderr: {app_err:?}\nhog stdout: {hog_out:?}\n{}", logs.join("\n"));
    }
    assert!(app_out.starts_with("app-ok crio-pod\n"), "the app container's output: {app_out:?} (stderr {app_err:?})");
    assert!(app_out.contains("nameserver 127.0.0.53"), "resolv.conf from the infra bundle: {app_out:?}");
    assert!(hog_out.starts_with("allocating\n") && !hog_out.contains("survived"), "hog output: {hog_out:?}");

    // Nothing left: daemons, VM, mounts, run directories, sockets; then what CRI-O removes
    // itself (its mounts, the pinned namespaces, the cgroup parent).
    let ids: Vec<&str> = pod.ids.iter().map(String::as_str).collect();
    let gone =
        leaks::settle(leaks::GRACE, || ids.iter().flat_map(|id| shim_daemons(id)).map(|p| p.to_string()).collect());
    assert!(gone.is_empty(), "shim daemons still running after Shutdown: {gone:?}\n{}", logs.join("\n"));
    pod.unmount_ours();
    let found = leaks::settle(leaks::GRACE, || {
        let mut f = leaks::find_leaks(&ids, Some(&pod.dir));
        for id in &ids {
            let sock = leaks::shim_socket("", "default", id);
            if sock.exists() {
                f.push(format!("shim socket {}", sock.display()));
            }
        }
        f
    });
    assert!(found.is_empty(), "left behind by the CRI-O pod: {found:?}\n{}", logs.join("\n"));
    let errors = pod.remove_cgroups();
    assert!(errors.is_empty(), "the pod's cgroups could not be removed (processes left?): {errors:?}");

    assert!(
        kata_only.is_empty(),
        "the CRI-O pod {}:\n  {}",
        if kata {
            "fails with the kata handler".to_string()
        } else {
            format!("needs the kata handler (PODVISOR_CRI_HANDLER={} only validates the harness)", handler())
        },
        kata_only.join("\n  ")
    );
}
