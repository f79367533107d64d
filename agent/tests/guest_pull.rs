//! Guest pull through the agent's RPCs (host-side, as `containers.rs`): the real `kata-agent`
//! in test mode in a private mount namespace (cgroup2, a tmpfs on /run: the guest's layout),
//! Debian's `docker-registry` on 127.0.0.1:<free port> holding a busybox image pushed by the
//! test; CreateContainer with Kata's `image_guest_pull` storages (the sandbox container's
//! `pause` and a workload pulling the image), the workload runs from the pulled rootfs, and
//! RemoveContainer takes the overlay and its upper/work away while the layer cache stays.
//!
//! Requirements (the test fails naming the missing one): root, /usr/bin/docker-registry,
//! busybox-static's .deb (as containers.rs) and dpkg-deb. The pause container is started only
//! when the agent binary is static (PODVISOR_TEST_AGENT=<make agent's binary>): a dynamic debug
//! build cannot run in a rootfs holding nothing but itself; it is created and removed either way.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_protocol::agent as pb;
use agent_protocol::agent_ttrpc::AgentServiceClient;
use agent_protocol::convert::spec_to_grpc;
use serde_json::json;
use sha2::{Digest, Sha256};

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(120_000_000_000)
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// The busybox-static .deb (the cache containers.rs fills).
fn busybox_deb() -> PathBuf {
    if let Ok(p) = std::env::var("PODVISOR_TEST_BUSYBOX_DEB") {
        return PathBuf::from(p);
    }
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("busybox-static");
    std::fs::create_dir_all(&cache).unwrap();
    let find = || {
        std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
    };
    if let Some(p) = find() {
        return p;
    }
    let out = Command::new("apt-get").args(["download", "busybox-static"]).current_dir(&cache).output();
    assert!(
        out.as_ref().is_ok_and(|o| o.status.success()),
        "prerequisite missing: apt-get download busybox-static: {out:?}"
    );
    find().expect("prerequisite missing: busybox-static .deb")
}

/// A gzip layer of busybox + /hello, and its diff_id.
fn busybox_layer(dir: &Path) -> (Vec<u8>, String) {
    let x = dir.join("deb");
    let st = Command::new("dpkg-deb").arg("-x").arg(busybox_deb()).arg(&x).status();
    assert!(st.as_ref().is_ok_and(|s| s.success()), "prerequisite missing: dpkg-deb -x busybox-static: {st:?}");
    let bb = ["bin/busybox", "usr/bin/busybox"].iter().map(|p| x.join(p)).find(|p| p.exists()).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let dir_header = |name: &str, b: &mut tar::Builder<Vec<u8>>| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, name, &[][..]).unwrap();
    };
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        dir_header(d, &mut b);
    }
    let data = std::fs::read(&bb).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, "bin/busybox", data.as_slice()).unwrap();
    for applet in ["sh", "cat", "ls", "echo"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox").unwrap();
    }
    let hello = b"pulled in the guest\n";
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(hello.len() as u64);
    b.append_data(&mut h, "hello", &hello[..]).unwrap();
    let t = b.into_inner().unwrap();
    std::fs::remove_dir_all(&x).unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&t).unwrap();
    (enc.finish().unwrap(), sha256(&t))
}

struct Registry {
    child: Child,
    addr: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let bin = "/usr/bin/docker-registry";
        assert!(Path::new(bin).exists(), "prerequisite missing: {bin} (Debian's docker-registry; scripts/deps.sh)");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("registry").display()
        );
        std::fs::write(dir.join("registry.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(dir.join("registry.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let r = Registry { child, addr };
        let start = Instant::now();
        while r.http("GET", "/v2/", "", &[]).0 != 200 {
            assert!(start.elapsed() < Duration::from_secs(20), "docker-registry did not answer on {}", r.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn http(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, HashMap<String, String>) {
        let Ok(mut s) = TcpStream::connect(&self.addr) else { return (0, HashMap::new()) };
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\nContent-Type: {content_type}\r\n\r\n",
            self.addr,
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let head = String::from_utf8_lossy(&resp).split("\r\n\r\n").next().unwrap_or_default().to_string();
        let mut lines = head.lines();
        let code = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
        let h =
            lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()));
        (code, h.collect())
    }

    fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let (code, h) = self.http("POST", &format!("/v2/{repo}/blobs/uploads/"), "", &[]);
        assert_eq!(code, 202);
        let loc = h["location"].split_once(&self.addr).map(|(_, p)| p.to_string()).unwrap_or(h["location"].clone());
        let sep = if loc.contains('?') { '&' } else { '?' };
        assert_eq!(self.http("PUT", &format!("{loc}{sep}digest={digest}"), "application/octet-stream", data).0, 201);
        digest
    }

    fn push_image(&self, repo: &str, tag: &str, layer: &[u8], diff_id: &str) {
        let config =
            json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
                .to_string();
        let cd = self.push_blob(repo, config.as_bytes());
        let ld = self.push_blob(repo, layer);
        let m = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": layer.len()}]})
        .to_string();
        let code = self
            .http(
                "PUT",
                &format!("/v2/{repo}/manifests/{tag}"),
                "application/vnd.oci.image.manifest.v1+json",
                m.as_bytes(),
            )
            .0;
        assert_eq!(code, 201);
    }
}

struct Agent {
    child: Child,
    client: AgentServiceClient,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let pid = self.child.id();
        // Container processes and cgroups first (paths through /proc/<agent>/root).
        let root = PathBuf::from(format!("/proc/{pid}/root/sys/fs/cgroup/podvisor"));
        let mut dirs = vec![];
        let mut stack = vec![root];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                stack.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
                dirs.push(d);
            }
        }
        for d in &dirs {
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for d in dirs.iter().rev() {
            while std::fs::remove_dir(d).is_err() && d.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

async fn start_agent(dir: &Path, registry: &str) -> Agent {
    let sock = dir.join("agent.sock");
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let exe = std::env::var("PODVISOR_TEST_AGENT").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kata-agent").to_string());
    let mut cmd = Command::new(exe);
    cmd.arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .env("PODVISOR_TEST_CMDLINE", format!("agent.insecure_registries={registry}"))
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
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start the agent in a private mount namespace");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(c) = ttrpc::asynchronous::Client::connect(&format!("unix://{}", sock.display())).await {
            return Agent { child, client: AgentServiceClient::new(c), log: log_path };
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the agent exited ({st}):\n{}", std::fs::read_to_string(&log_path).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "the agent did not listen within 20s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spec(rootfs: &str, args: &[&str], annotations: serde_json::Value) -> agent_protocol::oci::Spec {
    let mut s = serde_json::to_value(libcontainer::oci_spec::runtime::Spec::default()).unwrap();
    s["root"] = json!({"path": rootfs, "readonly": false});
    s["process"]["args"] = json!(args);
    s["process"]["terminal"] = json!(false);
    s["process"]["env"] = json!(["PATH=/bin"]);
    s["annotations"] = annotations;
    let l = &mut s["linux"];
    l["cgroupsPath"] = json!("kubepods-besteffort-pod1.slice:cri-containerd:x");
    l["namespaces"].as_array_mut().unwrap().retain(|n| n["type"] != "network");
    let spec: libcontainer::oci_spec::runtime::Spec = serde_json::from_value(s).unwrap();
    spec_to_grpc(&spec)
}

/// Kata's guest-pull storage for container `cid` (what the runtime sends).
fn pull_storage(cid: &str, source: &str, metadata: &serde_json::Value) -> pb::Storage {
    pb::Storage {
        driver: "image_guest_pull".into(),
        driver_options: vec![format!("image_guest_pull={}", json!({ "metadata": metadata }))],
        source: source.into(),
        fstype: "overlay".into(),
        mount_point: format!("/run/kata-containers/{cid}/rootfs"),
        ..Default::default()
    }
}

async fn create(
    agent: &Agent,
    cid: &str,
    storage: pb::Storage,
    spec: agent_protocol::oci::Spec,
) -> Result<(), ttrpc::Error> {
    let req = pb::CreateContainerRequest {
        container_id: cid.into(),
        exec_id: cid.into(),
        storages: vec![storage],
        OCI: Some(spec).into(),
        ..Default::default()
    };
    agent.client.create_container(ctx(), &req).await.map(|_| ())
}

fn agent_mounts(agent: &Agent) -> String {
    std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.child.id())).unwrap()
}

/// Whether an ELF64 executable has no PT_INTERP program header (no dynamic loader).
fn is_static(exe: &str) -> bool {
    let data = std::fs::read(exe).unwrap_or_default();
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(data[0x20..0x28].try_into().unwrap()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    !(0..count).any(|i| u32::from_le_bytes(data[phoff + i * size..phoff + i * size + 4].try_into().unwrap()) == 3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_pull_through_create_container() {
    assert!(nix::unistd::geteuid().is_root(), "prerequisite missing: this test must run as root");
    let dir = std::env::temp_dir().join(format!("podvisor-agent-guest-pull-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let registry = Registry::start(&dir);
    let (layer, diff_id) = busybox_layer(&dir);
    registry.push_image("podvisor/busybox", "test", &layer, &diff_id);
    let agent = start_agent(&dir, &registry.addr).await;
    let image = format!("{}/podvisor/busybox:test", registry.addr);

    // The sandbox container: source "pause" (Kata's literal), process replaced by /pause.
    let sb_meta = json!({"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": "sb"});
    let sb_spec = spec("/run/kata-containers/sb/rootfs", &["/ignored-by-guest-pull"], sb_meta.clone());
    create(&agent, "sb", pull_storage("sb", "pause", &sb_meta), sb_spec).await.expect("create the pause container");
    assert!(agent_mounts(&agent).contains(" /run/kata-containers/sb/rootfs/pause "), "the pause binary is not bound");
    let exe = std::env::var("PODVISOR_TEST_AGENT").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kata-agent").to_string());
    if is_static(&exe) {
        let req = pb::StartContainerRequest { container_id: "sb".into(), ..Default::default() };
        agent.client.start_container(ctx(), &req).await.expect("start the pause container");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let sig = pb::SignalProcessRequest { container_id: "sb".into(), signal: 15, ..Default::default() };
        agent.client.signal_process(ctx(), &sig).await.expect("SIGTERM the pause");
        let w = pb::WaitProcessRequest { container_id: "sb".into(), ..Default::default() };
        let st = tokio::time::timeout(Duration::from_secs(10), agent.client.wait_process(ctx(), &w)).await;
        assert_eq!(st.expect("pause did not exit on SIGTERM").unwrap().status, 0, "pause exits 0 on SIGTERM");
    } else {
        eprintln!("note: {exe} is dynamically linked: the pause container is created but not started (set PODVISOR_TEST_AGENT to make agent's static binary)");
    }

    // A workload pulled from the registry, twice (the second reuses the cached layer).
    for cid in ["w1", "w2"] {
        let meta = json!({"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.image-name": image});
        let rootfs = format!("/run/kata-containers/{cid}/rootfs");
        let started = Instant::now();
        create(
            &agent,
            cid,
            pull_storage(cid, &image, &meta),
            spec(&rootfs, &["/bin/sh", "-c", "cat /hello; echo x > /written; ls /"], meta.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("create {cid}: {e:?}"));
        eprintln!("{cid}: CreateContainer with the pull took {:?}", started.elapsed());
        let req = pb::StartContainerRequest { container_id: cid.into(), ..Default::default() };
        agent.client.start_container(ctx(), &req).await.expect("start");
        let mut out = Vec::new();
        loop {
            let r = pb::ReadStreamRequest { container_id: cid.into(), len: 4096, ..Default::default() };
            let data = agent.client.read_stdout(ctx(), &r).await.expect("read stdout").data;
            if data.is_empty() {
                break;
            }
            out.extend(data);
        }
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("pulled in the guest\n") && out.contains("written"), "{cid}: {out}");
        let upper = format!("/proc/{}/root/run/kata-containers/image/containers/{cid}/upper/written", agent.child.id());
        assert!(Path::new(&upper).exists(), "{cid}: the write did not land in its upper directory");
        let req = pb::RemoveContainerRequest { container_id: cid.into(), timeout: 10, ..Default::default() };
        agent.client.remove_container(ctx(), &req).await.expect("remove");
        assert!(!agent_mounts(&agent).contains(&format!(" {rootfs} ")), "{cid}: rootfs still mounted");
        assert!(!Path::new(&upper).exists(), "{cid}: upper/work left behind");
    }
    let cached = format!("/proc/{}/root/run/kata-containers/image/layers/sha256", agent.child.id());
    assert_eq!(std::fs::read_dir(&cached).unwrap().count(), 1, "one cached layer");

    // A bad reference fails CreateContainer naming the storage and leaves nothing.
    let meta = json!({});
    let bad = format!("{}/podvisor/missing:nope", registry.addr);
    let e = create(
        &agent,
        "w3",
        pull_storage("w3", &bad, &meta),
        spec("/run/kata-containers/w3/rootfs", &["/bin/sh"], meta.clone()),
    )
    .await
    .unwrap_err();
    let text = format!("{e:?}");
    assert!(text.contains("storages[0] (image_guest_pull") && text.contains("missing"), "{text}");
    assert!(!agent_mounts(&agent).contains("/run/kata-containers/w3/"), "w3 left a mount");

    let req = pb::RemoveContainerRequest { container_id: "sb".into(), timeout: 10, ..Default::default() };
    agent.client.remove_container(ctx(), &req).await.expect("remove the pause container");
    assert!(!agent_mounts(&agent).contains("/run/kata-containers/sb/"), "the pause rootfs is still mounted");
    drop(agent);
    drop(registry);
    let _ = std::fs::remove_dir_all(&dir);
}
