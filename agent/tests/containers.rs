//! Host-side integration test of the agent's container RPCs.
//!
//! Runs the real `kata-agent` binary in test mode (`--listen unix://...`: no PID-1 setup, a
//! child subreaper) in a private mount namespace with cgroup2 mounted on /sys/fs/cgroup and a
//! tmpfs on /run (the guest's layout; this works on cgroup-v1-hybrid hosts too), with a busybox rootfs from
//! Debian's `busybox-static`, and drives it with the generated ttrpc client.
//!
//! Requirements (the test fails naming the missing one): root; `apt-get download
//! busybox-static` (or PODVISOR_TEST_BUSYBOX_DEB=<path of the .deb>) and `dpkg-deb`; a kernel
//! with cgroup2 and cgroup.freeze. cgroup controllers that the host's cgroup2 hierarchy lacks
//! (memory, pids, cpu on a v1-hybrid host) are reported and the checks needing them are
//! scoped out with a printed note; the VM test covers them. PODVISOR_TEST_AGENT=<path> tests
//! another agent binary, e.g. `make agent`'s static one.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_protocol::agent as pb;
use agent_protocol::agent_ttrpc::AgentServiceClient;
use agent_protocol::convert::spec_to_grpc;
use serde_json::json;
use ttrpc::Code;

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

fn fail_prereq(what: &str) -> ! {
    panic!("prerequisite missing: {what}")
}

/// The busybox-static .deb (cached in the target directory).
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
    match out {
        Ok(o) if o.status.success() => {
            find().unwrap_or_else(|| fail_prereq("apt-get download busybox-static produced no .deb"))
        }
        Ok(o) => fail_prereq(&format!(
            "`apt-get download busybox-static` failed ({}): {}; or set PODVISOR_TEST_BUSYBOX_DEB",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => fail_prereq(&format!("apt-get: {e}; or set PODVISOR_TEST_BUSYBOX_DEB")),
    }
}

/// A busybox rootfs with the applets the test uses and an /etc/passwd.
fn make_rootfs(dir: &Path) -> PathBuf {
    let x = dir.join("deb");
    let st = Command::new("dpkg-deb").arg("-x").arg(busybox_deb()).arg(&x).status();
    if !st.as_ref().is_ok_and(|s| s.success()) {
        fail_prereq(&format!("dpkg-deb -x of busybox-static: {st:?}"));
    }
    let bb =
        ["bin/busybox", "usr/bin/busybox"].iter().map(|p| x.join(p)).find(|p| p.exists()).expect("busybox in the .deb");
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(&bb, root.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "cat", "sleep", "stty", "tty", "echo", "ls", "chmod", "id", "read", "true", "yes", "head", "hostname",
        "readlink", "tr", "stat",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::remove_dir_all(&x).unwrap();
    root
}

/// The agent under test; killed and cleaned up on drop (also when the test fails).
struct Agent {
    child: Option<Child>,
    dir: PathBuf,
    client: AgentServiceClient,
}

impl Agent {
    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// A path as seen in the agent's mount namespace.
    fn ns_path(&self, p: &str) -> PathBuf {
        self.ns_path_of(self.pid(), p)
    }

    fn ns_path_of(&self, pid: i32, p: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{pid}/root{p}"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

/// Every cgroup below `dir`, children after parents.
fn cgroup_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&d) {
            stack.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
            out.push(d);
        }
    }
    out
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A failed test must not leave container processes or cgroups on the host: they
            // would be re-parented to the host's init when the agent dies.
            // Paths through /proc/<agent>/root work only while the agent lives: clean first.
            let cgroups = cgroup_dirs(&self.ns_path_of(c.id() as i32, "/sys/fs/cgroup/podvisor"));
            for d in &cgroups {
                let _ = std::fs::write(d.join("cgroup.kill"), "1");
            }
            let deadline = Instant::now() + Duration::from_secs(3);
            for d in cgroups.iter().rev() {
                while std::fs::remove_dir(d).is_err() && d.exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("---- agent log ----\n{}", self.log());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Agent {
    /// Waits (10 s at most) for the agent to exit after DestroySandbox; it must exit 0.
    async fn wait_exit_ok(&mut self) {
        let mut child = self.child.take().expect("the agent process");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agent did not exit after DestroySandbox:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "agent exit status {status}:\n{}", self.log());
    }
}

/// The start of each test: root is required, a fresh `<tmp>/podvisor-agent-<name>-<pid>` with a
/// busybox rootfs, and the agent running in its own mount namespace there.
async fn setup(name: &str) -> (PathBuf, PathBuf, Agent) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "prerequisite missing: this test must run as root (namespaces, mounts, cgroups)"
    );
    let dir = std::env::temp_dir().join(format!("podvisor-agent-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rootfs = make_rootfs(&dir);
    let agent = start_agent(&dir).await;
    (dir, rootfs, agent)
}

async fn start_agent(dir: &Path) -> Agent {
    let sock = dir.join("agent.sock");
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    // PODVISOR_TEST_AGENT=<path> runs another build (e.g. the static release binary of `make agent`).
    let exe = std::env::var("PODVISOR_TEST_AGENT").unwrap_or_else(|_| env!("CARGO_BIN_EXE_kata-agent").to_string());
    let mut cmd = Command::new(exe);
    cmd.arg("--listen")
        .arg(format!("unix://{}", sock.display()))
        .arg("--run-dir")
        .arg(dir.join("run"))
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
            // A private /run: the agent makes /run/kata-containers/{sharedns,sandbox/shm} there,
            // as in the guest, without touching the host's.
            mount(Some("tmpfs"), "/run", Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap_or_else(|e| {
        fail_prereq(&format!("start the agent in a private mount namespace with cgroup2 on /sys/fs/cgroup: {e}"))
    });
    let mut child = child;
    let log = || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(c) = ttrpc::asynchronous::Client::connect(&format!("unix://{}", sock.display())).await {
            return Agent { child: Some(child), dir: dir.to_path_buf(), client: AgentServiceClient::new(c) };
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the agent exited ({st}) before listening:\n{}", log());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent did not listen within 20s:\n{}", log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn code(e: &ttrpc::Error) -> (Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

/// An OCI spec the way containerd writes one (runc's defaults), as the shim sends it (its
/// rules applied: no AppArmor profile, no network namespace, a cgroup namespace; see the owner
/// list in the agent's `container::spec`). `noNewPrivileges: false` arrives absent.
fn spec(rootfs: &Path, args: &[&str], terminal: bool) -> agent_protocol::oci::Spec {
    let mut s = serde_json::to_value(libcontainer::oci_spec::runtime::Spec::default()).unwrap();
    s["root"] = json!({"path": rootfs, "readonly": true});
    s["process"]["args"] = json!(args);
    s["process"]["terminal"] = json!(terminal);
    s["process"]["env"] = json!(["PATH=/bin"]);
    s["process"]["noNewPrivileges"] = json!(false);
    s["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}));
    let l = &mut s["linux"];
    l["cgroupsPath"] = json!("kubepods-besteffort-pod1.slice:cri-containerd:x");
    let namespaces = l["namespaces"].as_array_mut().unwrap();
    namespaces.retain(|n| n["type"] != "network");
    namespaces.push(json!({"type": "cgroup"}));
    l["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["chmod", "fchmodat", "fchmodat2"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]});
    let spec: libcontainer::oci_spec::runtime::Spec = serde_json::from_value(s).unwrap();
    spec_to_grpc(&spec)
}

fn process(args: &[&str], terminal: bool) -> agent_protocol::oci::Process {
    let mut p = agent_protocol::oci::Process {
        Args: args.iter().map(|s| s.to_string()).collect(),
        Env: vec!["PATH=/bin".into()],
        Cwd: "/".into(),
        Terminal: terminal,
        ..Default::default()
    };
    if terminal {
        p.ConsoleSize = Some(agent_protocol::oci::Box { Height: 30, Width: 100, ..Default::default() }).into();
    }
    p
}

async fn read_all(agent: &Agent, cid: &str, exec_id: &str, stderr: bool) -> String {
    let mut out = Vec::new();
    loop {
        let req = pb::ReadStreamRequest {
            container_id: cid.into(),
            exec_id: exec_id.into(),
            len: 32768,
            ..Default::default()
        };
        let r = if stderr {
            agent.client.read_stderr(ctx(), &req).await
        } else {
            agent.client.read_stdout(ctx(), &req).await
        };
        let data = r.unwrap_or_else(|e| panic!("read {cid}/{exec_id}: {e:?}")).data;
        if data.is_empty() {
            return String::from_utf8_lossy(&out).into_owned();
        }
        out.extend(data);
    }
}

async fn wait(agent: &Agent, cid: &str, exec_id: &str) -> i32 {
    let req = pb::WaitProcessRequest { container_id: cid.into(), exec_id: exec_id.into(), ..Default::default() };
    agent.client.wait_process(ctx(), &req).await.unwrap_or_else(|e| panic!("wait {cid}/{exec_id}: {e:?}")).status
}

async fn exec(agent: &Agent, cid: &str, exec_id: &str, p: agent_protocol::oci::Process) -> Result<(), ttrpc::Error> {
    let req = pb::ExecProcessRequest {
        container_id: cid.into(),
        exec_id: exec_id.into(),
        process: Some(p).into(),
        ..Default::default()
    };
    agent.client.exec_process(ctx(), &req).await.map(|_| ())
}

async fn create(agent: &Agent, cid: &str, spec: agent_protocol::oci::Spec) {
    let req = pb::CreateContainerRequest {
        container_id: cid.into(),
        exec_id: cid.into(),
        OCI: Some(spec).into(),
        ..Default::default()
    };
    agent.client.create_container(ctx(), &req).await.unwrap_or_else(|e| panic!("create {cid}: {e:?}"));
}

async fn start(agent: &Agent, cid: &str) {
    let req = pb::StartContainerRequest { container_id: cid.into(), ..Default::default() };
    agent.client.start_container(ctx(), &req).await.unwrap_or_else(|e| panic!("start {cid}: {e:?}"));
}

async fn remove(agent: &Agent, cid: &str) -> Result<(), ttrpc::Error> {
    let req = pb::RemoveContainerRequest { container_id: cid.into(), timeout: 10, ..Default::default() };
    agent.client.remove_container(ctx(), &req).await.map(|_| ())
}

fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let ppid =
            stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|s| s.parse::<i32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// The agents of these tests share the host's cgroup2 hierarchy (`/podvisor/...`; the agent
/// creates and removes `/podvisor` itself, and a failed test's clean-up kills everything below
/// it): one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_over_ttrpc() {
    let _serial = SERIAL.lock().await;
    let (dir, rootfs, agent) = setup("it").await;
    let sandbox_id = format!("it{}", std::process::id());

    let controllers = std::fs::read_to_string(agent.ns_path("/sys/fs/cgroup/cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    assert!(
        agent.ns_path("/sys/fs/cgroup/cgroup.procs").exists(),
        "prerequisite missing: cgroup2 is not mounted on /sys/fs/cgroup in the agent's namespace"
    );
    eprintln!("cgroup2 controllers available here: {:?} (memory/pids checks run only if present)", controllers.trim());

    // ---- CreateSandbox: a local tmpfs storage; a second call is ALREADY_EXISTS
    let shared = dir.join("shared");
    let storage = pb::Storage {
        driver: "local".into(),
        fstype: "tmpfs".into(),
        source: "tmpfs".into(),
        mount_point: shared.to_string_lossy().into(),
        options: vec!["size=1m".into()],
        ..Default::default()
    };
    let req =
        pb::CreateSandboxRequest { sandbox_id: sandbox_id.clone(), storages: vec![storage], ..Default::default() };
    agent.client.create_sandbox(ctx(), &req).await.expect("CreateSandbox");
    let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.pid())).unwrap();
    assert!(mountinfo.contains(&format!(" {} ", shared.display())), "tmpfs storage not mounted:\n{mountinfo}");
    let err = agent.client.create_sandbox(ctx(), &req).await.unwrap_err();
    assert_eq!(code(&err).0, Code::ALREADY_EXISTS, "{err:?}");

    // ---- c1: create, output buffered before start is read; exit code 3
    create(
        &agent,
        "c1",
        spec(
            &rootfs,
            &[
                "/bin/sh",
                "-c",
                "echo hello; echo HOME=$HOME; chmod 700 /tmp 2>/dev/null || echo seccomp-denied; exit 3",
            ],
            false,
        ),
    )
    .await;
    let cg1 = format!("/sys/fs/cgroup/podvisor/{sandbox_id}/c1");
    assert!(agent.ns_path(&cg1).exists(), "cgroupsPath was not rewritten to {cg1}");
    let err = exec(&agent, "c1", "early", process(&["/bin/true"], false)).await.unwrap_err();
    assert_eq!(code(&err).0, Code::FAILED_PRECONDITION, "{err:?}");
    start(&agent, "c1").await;
    let out = read_all(&agent, "c1", "", false).await;
    assert_eq!(out, "hello\nHOME=/root\nseccomp-denied\n");
    assert_eq!(read_all(&agent, "c1", "c1", true).await, "");
    assert_eq!(wait(&agent, "c1", "").await, 3);
    assert_eq!(wait(&agent, "c1", "c1").await, 3, "a second WaitProcess returns the cached status");
    let r = pb::ReadStreamRequest { container_id: "c1".into(), len: 10, ..Default::default() };
    assert!(agent.client.read_stdout(ctx(), &r).await.unwrap().data.is_empty(), "reads after EOF stay empty");
    let sig = pb::SignalProcessRequest { container_id: "c1".into(), signal: 15, ..Default::default() };
    let (c, m) = code(&agent.client.signal_process(ctx(), &sig).await.unwrap_err());
    assert_eq!((c, m.contains("process already finished")), (Code::NOT_FOUND, true), "{m}");
    // Signal 0 (kill(2)'s "does it exist?", CRI-O's liveness check): no longer.
    let alive = pb::SignalProcessRequest { container_id: "c1".into(), signal: 0, ..Default::default() };
    let (c, m) = code(&agent.client.signal_process(ctx(), &alive).await.unwrap_err());
    assert_eq!((c, m.contains("process already finished")), (Code::NOT_FOUND, true), "signal 0 to an exited init: {m}");
    remove(&agent, "c1").await.expect("remove c1");
    assert!(!agent.ns_path(&cg1).exists(), "cgroup of c1 left behind");

    // ---- c2: long-running init; execs with stdin and with a terminal
    create(&agent, "c2", spec(&rootfs, &["/bin/sh", "-c", "echo up; exec sleep 100000"], false)).await;
    start(&agent, "c2").await;
    let r = pb::ReadStreamRequest { container_id: "c2".into(), len: 100, ..Default::default() };
    assert_eq!(agent.client.read_stdout(ctx(), &r).await.unwrap().data, b"up\n");
    // Signal 0 to a running init: it exists, and nothing is delivered.
    let alive = pb::SignalProcessRequest { container_id: "c2".into(), signal: 0, ..Default::default() };
    agent.client.signal_process(ctx(), &alive).await.expect("signal 0 to a running init");

    exec(&agent, "c2", "cat", process(&["/bin/cat"], false)).await.expect("exec cat");
    let w = pb::WriteStreamRequest {
        container_id: "c2".into(),
        exec_id: "cat".into(),
        data: b"hi".to_vec(),
        ..Default::default()
    };
    assert_eq!(agent.client.write_stdin(ctx(), &w).await.unwrap().len, 2);
    let cl = pb::CloseStdinRequest { container_id: "c2".into(), exec_id: "cat".into(), ..Default::default() };
    agent.client.close_stdin(ctx(), &cl).await.unwrap();
    assert_eq!(read_all(&agent, "c2", "cat", false).await, "hi");
    assert_eq!(wait(&agent, "c2", "cat").await, 0);
    assert_eq!(wait(&agent, "c2", "cat").await, 0, "status of a finished exec stays available");
    let err = exec(&agent, "c2", "c2", process(&["/bin/true"], false)).await.unwrap_err();
    assert_eq!(code(&err).0, Code::INVALID_ARGUMENT, "{err:?}");

    // The container's seccomp filter (chmod denied) holds for exec'd processes too, which still
    // end up with exactly their own capabilities (here CAP_KILL only: bit 5), and for an exec
    // without a capability list.
    let mut limited = process(
        &["/bin/sh", "-c", "chmod 700 /tmp 2>/dev/null || echo seccomp-denied; grep CapEff /proc/self/status"],
        false,
    );
    let kill = vec!["CAP_KILL".to_string()];
    limited.Capabilities = Some(agent_protocol::oci::LinuxCapabilities {
        Bounding: kill.clone(),
        Effective: kill.clone(),
        Permitted: kill,
        ..Default::default()
    })
    .into();
    exec(&agent, "c2", "seccomp-caps", limited).await.expect("exec with CAP_KILL only");
    assert_eq!(read_all(&agent, "c2", "seccomp-caps", false).await, "seccomp-denied\nCapEff:\t0000000000000020\n");
    assert_eq!(wait(&agent, "c2", "seccomp-caps").await, 0);
    // A non-root exec gets through the same path (its capabilities end at execve, as anywhere).
    let mut nobody = process(&["/bin/sh", "-c", "id -u; grep CapEff /proc/self/status"], false);
    nobody.User = Some(agent_protocol::oci::User { UID: 65534, GID: 65534, ..Default::default() }).into();
    nobody.Capabilities = Some(agent_protocol::oci::LinuxCapabilities {
        Bounding: vec!["CAP_KILL".into()],
        Effective: vec!["CAP_KILL".into()],
        Permitted: vec!["CAP_KILL".into()],
        ..Default::default()
    })
    .into();
    exec(&agent, "c2", "nobody", nobody).await.expect("exec as nobody");
    assert_eq!(read_all(&agent, "c2", "nobody", false).await, "65534\nCapEff:\t0000000000000000\n");
    assert_eq!(wait(&agent, "c2", "nobody").await, 0);
    exec(
        &agent,
        "c2",
        "seccomp",
        process(&["/bin/sh", "-c", "chmod 700 /tmp 2>/dev/null || echo seccomp-denied"], false),
    )
    .await
    .expect("exec");
    assert_eq!(read_all(&agent, "c2", "seccomp", false).await, "seccomp-denied\n");
    assert_eq!(wait(&agent, "c2", "seccomp").await, 0);

    // consoleSize is applied as soon as the terminal arrives, which may be after the process
    // started (as with runc): check it once the process has waited for input.
    exec(&agent, "c2", "tty", process(&["/bin/sh", "-c", "read x; stty size; tty; exit 7"], true))
        .await
        .expect("exec tty");
    let w = pb::WriteStreamRequest {
        container_id: "c2".into(),
        exec_id: "tty".into(),
        data: b"one\n".to_vec(),
        ..Default::default()
    };
    agent.client.write_stdin(ctx(), &w).await.unwrap();
    let out = read_all(&agent, "c2", "tty", false).await;
    assert!(out.contains("30 100") && out.contains("/dev/pts/"), "terminal output: {out:?}");
    assert_eq!(wait(&agent, "c2", "tty").await, 7);
    exec(&agent, "c2", "tty2", process(&["/bin/sh", "-c", "read x; stty size; exit 7"], true))
        .await
        .expect("exec tty2");
    let rs = pb::TtyWinResizeRequest {
        container_id: "c2".into(),
        exec_id: "tty2".into(),
        row: 40,
        column: 120,
        ..Default::default()
    };
    agent.client.tty_win_resize(ctx(), &rs).await.expect("TtyWinResize");
    let w = pb::WriteStreamRequest {
        container_id: "c2".into(),
        exec_id: "tty2".into(),
        data: b"go\n".to_vec(),
        ..Default::default()
    };
    agent.client.write_stdin(ctx(), &w).await.unwrap();
    let out = read_all(&agent, "c2", "tty2", false).await;
    assert!(out.contains("40 120"), "terminal output after TtyWinResize: {out:?}");
    assert_eq!(read_all(&agent, "c2", "tty2", true).await, "", "a terminal has no separate stderr");
    assert_eq!(wait(&agent, "c2", "tty2").await, 7);

    // more output than the agent buffers (4 MiB): back-pressure, nothing lost
    exec(&agent, "c2", "big", process(&["/bin/sh", "-c", "yes 0123456789 | head -c 6000000"], false))
        .await
        .expect("exec big");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = read_all(&agent, "c2", "big", false).await;
    assert_eq!(out.len(), 6_000_000);
    assert!(out.starts_with("0123456789\n0123456789\n"));
    assert_eq!(wait(&agent, "c2", "big").await, 0);

    // eight execs at once, each through its own helper
    let started = Instant::now();
    let execs = (0..8).map(|i| {
        let agent = &agent;
        async move {
            let id = format!("par{i}");
            exec(agent, "c2", &id, process(&["/bin/sh", "-c", &format!("echo {id}; exit {i}")], false))
                .await
                .expect("parallel exec");
            (read_all(agent, "c2", &id, false).await, wait(agent, "c2", &id).await)
        }
    });
    let results = futures::future::join_all(execs).await;
    for (i, (out, status)) in results.into_iter().enumerate() {
        assert_eq!((out, status), (format!("par{i}\n"), i as i32));
    }
    eprintln!("8 parallel execs in {:?}", started.elapsed());

    // processes of the container (what ListProcesses would list): init is there
    let procs =
        std::fs::read_to_string(agent.ns_path(&format!("/sys/fs/cgroup/podvisor/{sandbox_id}/c2/cgroup.procs")))
            .unwrap();
    assert_eq!(procs.lines().count(), 1, "only init should be left in c2: {procs:?}");

    // ---- pause / resume (cgroup v2 freezer); exec into a paused container is refused
    let freeze = agent.ns_path(&format!("/sys/fs/cgroup/podvisor/{sandbox_id}/c2/cgroup.freeze"));
    agent
        .client
        .pause_container(ctx(), &pb::PauseContainerRequest { container_id: "c2".into(), ..Default::default() })
        .await
        .expect("pause");
    assert_eq!(std::fs::read_to_string(&freeze).unwrap().trim(), "1");
    let err = exec(&agent, "c2", "while-paused", process(&["/bin/true"], false)).await.unwrap_err();
    assert_eq!(code(&err).0, Code::FAILED_PRECONDITION, "{err:?}");
    let err = agent
        .client
        .pause_container(ctx(), &pb::PauseContainerRequest { container_id: "c2".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(code(&err).0, Code::FAILED_PRECONDITION, "{err:?}");
    agent
        .client
        .resume_container(ctx(), &pb::ResumeContainerRequest { container_id: "c2".into(), ..Default::default() })
        .await
        .expect("resume");
    assert_eq!(std::fs::read_to_string(&freeze).unwrap().trim(), "0");

    // ---- stats and update
    let stats = agent
        .client
        .stats_container(ctx(), &pb::StatsContainerRequest { container_id: "c2".into(), ..Default::default() })
        .await
        .expect("stats");
    let cg = stats.cgroup_stats.as_ref().unwrap();
    assert!(cg.cpu_stats.cpu_usage.total_usage > 0, "cpu usage from cpu.stat: {cg:?}");
    if has("pids") {
        assert!(cg.pids_stats.current >= 1, "{cg:?}");
    } else {
        eprintln!("scoped out: pids stats/limits (no pids controller in this host's cgroup2 hierarchy)");
    }
    if has("memory") {
        assert!(cg.memory_stats.usage.usage > 0, "{cg:?}");
    } else {
        eprintln!("scoped out: memory stats, OOM events (no memory controller in this host's cgroup2 hierarchy)");
    }
    let upd = pb::UpdateContainerRequest {
        container_id: "c2".into(),
        resources: Some(agent_protocol::oci::LinuxResources {
            Pids: Some(agent_protocol::oci::LinuxPids { Limit: 50, ..Default::default() }).into(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let r = agent.client.update_container(ctx(), &upd).await;
    if has("pids") {
        r.expect("update pids limit");
        let max = std::fs::read_to_string(agent.ns_path(&format!("/sys/fs/cgroup/podvisor/{sandbox_id}/c2/pids.max")))
            .unwrap();
        assert_eq!(max.trim(), "50");
    } else {
        let (c, m) = code(&r.unwrap_err());
        assert!(
            c == Code::INTERNAL && m.contains("c2"),
            "without the pids controller the update fails naming the container: {m}"
        );
    }

    // ---- SIGKILL the init: 137; everything of the container ends
    let sig =
        pb::SignalProcessRequest { container_id: "c2".into(), exec_id: "".into(), signal: 9, ..Default::default() };
    agent.client.signal_process(ctx(), &sig).await.expect("SIGKILL");
    assert_eq!(wait(&agent, "c2", "").await, 137);
    assert_eq!(read_all(&agent, "c2", "", false).await, "", "init output was read before");
    remove(&agent, "c2").await.expect("remove c2");

    // ---- unknown ids
    let (c, m) = code(&remove(&agent, "c2").await.unwrap_err());
    assert!(c == Code::NOT_FOUND && m.contains("c2"), "{m}");
    let err = exec(&agent, "nope", "e", process(&["/bin/true"], false)).await.unwrap_err();
    assert_eq!(code(&err).0, Code::NOT_FOUND);

    // ---- a paused container removed, with an exec still running
    create(&agent, "c3", spec(&rootfs, &["/bin/sleep", "100000"], false)).await;
    start(&agent, "c3").await;
    exec(&agent, "c3", "sleeper", process(&["/bin/sleep", "100000"], false)).await.expect("exec sleeper");
    agent
        .client
        .pause_container(ctx(), &pb::PauseContainerRequest { container_id: "c3".into(), ..Default::default() })
        .await
        .expect("pause c3");
    remove(&agent, "c3").await.expect("remove paused c3 with a running exec");

    // ---- nothing left: no children, no cgroups, no state
    let deadline = Instant::now() + Duration::from_secs(5);
    while !children_of(agent.pid()).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(children_of(agent.pid()), Vec::<i32>::new(), "processes left under the agent");
    // (Only this sandbox's: /podvisor itself may hold another test's agent's cgroups.)
    assert!(!agent.ns_path(&format!("/sys/fs/cgroup/podvisor/{sandbox_id}")).exists(), "cgroup parents left behind");
    let state: Vec<_> = std::fs::read_dir(dir.join("run/containers"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(state.is_empty(), "libcontainer state left: {state:?}");
    let bundles: Vec<_> = std::fs::read_dir(dir.join("run/bundles"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(bundles.is_empty(), "bundles left: {bundles:?}");

    // ---- DestroySandbox: the agent unmounts, cleans up and exits 0
    let mut agent = agent;
    agent.client.destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new()).await.expect("DestroySandbox");
    agent.wait_exit_ok().await;
    assert!(!dir.join("run").exists(), "run directory left behind");
    assert!(!dir.join("agent.sock").exists(), "socket left behind");
    assert!(!agent.log().contains("\"level\":\"ERRO\""), "errors in the agent log:\n{}", agent.log());
}

// ------------------------------------------------------------------------------------- pods

const SHARED_NS: &str = "/run/kata-containers/sharedns";
const POD_SHM: &str = "/run/kata-containers/sandbox/shm";

/// A pod container's spec as containerd's CRI writes it, after the shim's rules: `/dev/shm`
/// bound from the guest's pod tmpfs, no namespace paths (the agent joins the pod's), no network
/// namespace, a cgroup namespace; `join` = an app container, else the sandbox container (net
/// sysctls, hostname, the infra container's oomScoreAdj).
fn pod_spec(rootfs: &Path, args: &[&str], join: bool) -> agent_protocol::oci::Spec {
    let mut s = serde_json::to_value(libcontainer::oci_spec::runtime::Spec::default()).unwrap();
    s["root"] = json!({"path": rootfs, "readonly": true});
    s["process"]["args"] = json!(args);
    s["process"]["env"] = json!(["PATH=/bin"]);
    let mounts = s["mounts"].as_array_mut().unwrap();
    mounts.retain(|m| m["destination"] != "/dev/shm");
    mounts.push(
        json!({"destination": "/dev/shm", "type": "bind", "source": POD_SHM, "options": ["rbind", "rprivate", "rw"]}),
    );
    let l = &mut s["linux"];
    l["cgroupsPath"] = json!("kubepods-besteffort-pod1.slice:cri-containerd:x");
    l["namespaces"] = json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}]);
    if !join {
        // containerd 2.x (enable_unprivileged_ports/icmp) and CRI-O's infra container.
        l["sysctl"] = json!({"net.ipv4.ip_unprivileged_port_start": "0", "net.ipv4.ping_group_range": "0 2147483647"});
        s["hostname"] = json!("podhost");
        if has_cap_sys_resource() {
            s["process"]["oomScoreAdj"] = json!(-998);
        } else {
            eprintln!("scoped out: oomScoreAdj -998 of the infra container (no CAP_SYS_RESOURCE here; the guest agent has it)");
        }
    }
    let spec: libcontainer::oci_spec::runtime::Spec = serde_json::from_value(s).unwrap();
    spec_to_grpc(&spec)
}

/// Lowering oom_score_adj needs CAP_SYS_RESOURCE, which some test sandboxes drop.
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff =
        status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    eff.is_some_and(|e| e & (1 << 24) != 0) // CAP_SYS_RESOURCE
}

async fn create_in_pod(agent: &Agent, cid: &str, spec: agent_protocol::oci::Spec) -> Result<(), ttrpc::Error> {
    let req = pb::CreateContainerRequest {
        container_id: cid.into(),
        exec_id: cid.into(),
        OCI: Some(spec).into(),
        sandbox_pidns: true,
        ..Default::default()
    };
    agent.client.create_container(ctx(), &req).await.map(|_| ())
}

/// Runs `sh -c script` in a container: (stdout, exit status).
async fn run_in(agent: &Agent, cid: &str, exec_id: &str, script: &str) -> (String, i32) {
    exec(agent, cid, exec_id, process(&["/bin/sh", "-c", script], false))
        .await
        .unwrap_or_else(|e| panic!("exec {cid}/{exec_id}: {e:?}"));
    let out = read_all(agent, cid, exec_id, false).await;
    (out, wait(agent, cid, exec_id).await)
}

/// A process in the agent's mount namespace that outlives the agent, to look at what the agent
/// left behind after it exited.
struct Witness(Child);

impl Witness {
    fn start(agent: &Agent) -> Witness {
        let ns = std::fs::File::open(format!("/proc/{}/ns/mnt", agent.pid())).unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("1000").stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: only setns between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS).map_err(std::io::Error::from)
            });
        }
        Witness(cmd.spawn().expect("start a process in the agent's mount namespace"))
    }

    fn path(&self, p: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{p}", self.0.id()))
    }

    fn mountinfo(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.0.id())).unwrap()
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pids whose command line contains `needle` (NUL-separated arguments joined by spaces).
fn pids_running(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let cmd: String = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// A pod as Kubernetes drives it: CreateSandbox, the sandbox (pause) container first, then app
/// containers that share its IPC, UTS and pid namespaces and the pod's /dev/shm, created and
/// removed one by one while the pod lives; DestroySandbox leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_shares_namespaces_and_shm() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let _serial = SERIAL.lock().await;
    let (dir, rootfs, agent) = setup("pod").await;
    let witness = Witness::start(&agent);
    // The agent's mount namespace is a copy of the host's: kata mounts of the host (other tests'
    // VMs) may be listed, hidden under the private /run. Only new ones count.
    let kata_mounts = |w: &Witness| -> Vec<String> {
        let info = w.mountinfo();
        let mut v: Vec<String> = info
            .lines()
            .filter(|l| l.contains("/run/kata-containers"))
            .map(|l| l.split(" - ").next().unwrap().into())
            .collect();
        v.sort();
        v
    };
    let host_kata_mounts = kata_mounts(&witness);
    let pod = format!("pod{}", std::process::id());
    let host_hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    // Unique arguments, to find the pod's processes on the host afterwards.
    let tag = std::process::id() % 100_000 + 4_200_000;
    let (sb_sleep, a_sleep, b_sleep) = (format!("{tag}0"), format!("{tag}1"), format!("{tag}2"));

    // ---- CreateSandbox: a tmpfs storage stands in for virtio-fs; no shm storage, so the agent
    // makes the pod's /dev/shm itself.
    let storage = pb::Storage {
        driver: "local".into(),
        fstype: "tmpfs".into(),
        source: "tmpfs".into(),
        mount_point: dir.join("shared").to_string_lossy().into(),
        options: vec!["size=1m".into()],
        ..Default::default()
    };
    let req = pb::CreateSandboxRequest {
        sandbox_id: pod.clone(),
        hostname: "podhost".into(),
        storages: vec![storage],
        sandbox_pidns: false,
        ..Default::default()
    };
    agent.client.create_sandbox(ctx(), &req).await.expect("CreateSandbox");
    let mountinfo = std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.pid())).unwrap();
    for p in [format!("{SHARED_NS}/ipc"), format!("{SHARED_NS}/uts"), POD_SHM.to_string()] {
        assert!(mountinfo.contains(&format!(" {p} ")), "{p} is not mounted:\n{mountinfo}");
    }
    let shm_line = mountinfo.lines().find(|l| l.contains(&format!(" {POD_SHM} "))).unwrap();
    assert!(shm_line.contains(" - tmpfs ") && shm_line.contains("size=65536k"), "pod shm: {shm_line}");
    let mode = std::fs::metadata(agent.ns_path(POD_SHM)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o1777, "pod /dev/shm mode");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        host_hostname,
        "test mode must not rename the host"
    );
    let ns_ino = |kind: &str| std::fs::metadata(agent.ns_path(&format!("{SHARED_NS}/{kind}"))).unwrap().ino();
    let (ipc_ino, uts_ino) = (ns_ino("ipc"), ns_ino("uts"));

    // ---- the sandbox container, then two app containers joining it (pid shared)
    create_in_pod(&agent, &pod, pod_spec(&rootfs, &["/bin/sleep", &sb_sleep], false))
        .await
        .expect("create the sandbox container");
    start(&agent, &pod).await;
    create_in_pod(&agent, "a", pod_spec(&rootfs, &["/bin/sleep", &a_sleep], true)).await.expect("create a");
    create_in_pod(&agent, "b", pod_spec(&rootfs, &["/bin/sleep", &b_sleep], true)).await.expect("create b");
    start(&agent, "a").await;
    start(&agent, "b").await;

    for cid in [pod.as_str(), "a", "b"] {
        let (out, st) =
            run_in(&agent, cid, "ns", "hostname; readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts").await;
        assert_eq!((out, st), (format!("podhost\nipc:[{ipc_ino}]\nuts:[{uts_ino}]\n"), 0), "namespaces of {cid}");
    }

    // a private cgroup namespace (added by the shim): the container's cgroup is its root
    // (v1 hierarchies of a hybrid host are listed too: only the v2 line counts.)
    let (cg, _) = run_in(&agent, "a", "cg", "cat /proc/self/cgroup").await;
    assert!(cg.lines().any(|l| l == "0::/"), "a's cgroup v2 path: {cg:?}");

    // POSIX shm through the pod's /dev/shm, SysV shm through the shared IPC namespace
    assert_eq!(run_in(&agent, "a", "w", "echo x > /dev/shm/f").await, (String::new(), 0));
    assert_eq!(run_in(&agent, "b", "r", "cat /dev/shm/f").await, ("x\n".into(), 0));
    assert!(agent.ns_path(&format!("{POD_SHM}/f")).exists(), "/dev/shm of the containers is the pod tmpfs");
    const KEY: i32 = 0x5056_4953;
    let ipc_file = std::fs::File::open(agent.ns_path(&format!("{SHARED_NS}/ipc"))).unwrap();
    let mut mk = Command::new("true");
    // SAFETY: only raw syscalls between fork and exec.
    unsafe {
        mk.pre_exec(move || {
            nix::sched::setns(&ipc_file, nix::sched::CloneFlags::CLONE_NEWIPC)?;
            if libc::shmget(KEY, 1024, libc::IPC_CREAT | 0o600) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    assert!(mk.status().expect("shmget in the pod's IPC namespace").success());
    let has_key = |table: &str| table.lines().any(|l| l.split_whitespace().next() == Some(KEY.to_string().as_str()));
    let (sysv, _) = run_in(&agent, "b", "sysv", "cat /proc/sysvipc/shm").await;
    assert!(has_key(&sysv), "SysV segment not visible in b:\n{sysv}");
    let host_sysv = std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default();
    assert!(!has_key(&host_sysv), "the segment leaked into the host's IPC namespace");

    // shared pid namespace: pid 1 is the sandbox's init; b sees a
    let ps =
        "cat /proc/1/cmdline | tr '\\0' ' '; echo; for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done";
    let (out, _) = run_in(&agent, "b", "ps", ps).await;
    let mut lines = out.lines();
    assert_eq!(lines.next().unwrap().trim(), format!("/bin/sleep {sb_sleep}"), "pid 1 of b's pid namespace:\n{out}");
    assert!(
        out.contains(&format!("sleep {a_sleep}")) && out.contains(&format!("sleep {b_sleep}")),
        "b sees a's processes:\n{out}"
    );

    // ---- remove a: b, the sandbox and the shared namespaces are untouched
    remove(&agent, "a").await.expect("remove a");
    assert!(!agent.ns_path(&format!("/sys/fs/cgroup/podvisor/{pod}/a")).exists(), "cgroup of a left behind");
    assert!(agent.ns_path(&format!("/sys/fs/cgroup/podvisor/{pod}/b")).exists());
    let (out, st) =
        run_in(&agent, "b", "after", "cat /dev/shm/f; hostname; readlink /proc/self/ns/ipc; cat /proc/sysvipc/shm")
            .await;
    assert_eq!(st, 0);
    assert!(out.starts_with(&format!("x\npodhost\nipc:[{ipc_ino}]\n")) && has_key(&out), "b after removing a:\n{out}");
    let (out, _) = run_in(&agent, "b", "ps2", ps).await;
    assert!(
        !out.contains(&format!("sleep {a_sleep}")) && out.contains(&format!("sleep {sb_sleep}")),
        "a's processes are gone:\n{out}"
    );
    assert!(pids_running(&format!("sleep {a_sleep}")).is_empty());

    // ---- a new container joins the running pod; its init runs to the end on its own
    create_in_pod(&agent, "c", pod_spec(&rootfs, &["/bin/sh", "-c", "cat /dev/shm/f; hostname"], true))
        .await
        .expect("create c");
    start(&agent, "c").await;
    assert_eq!(read_all(&agent, "c", "", false).await, "x\npodhost\n");
    assert_eq!(wait(&agent, "c", "").await, 0);
    remove(&agent, "c").await.expect("remove c");
    remove(&agent, "b").await.expect("remove b");
    assert_eq!(
        run_in(&agent, &pod, "last", "hostname").await,
        ("podhost\n".into(), 0),
        "the sandbox container outlives its app containers"
    );

    // ---- DestroySandbox (with the sandbox container still running): nothing is left. The
    // shim's GetOOMEvent long poll is pending, as in every pod: DestroySandbox ends it, so the
    // server shuts down gracefully at once instead of waiting out its bound for it.
    let oom_client = agent.client.clone();
    let oom = tokio::spawn(async move { oom_client.get_oom_event(ctx(), &pb::GetOOMEventRequest::new()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut agent = agent;
    agent.client.destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new()).await.expect("DestroySandbox");
    let pending = tokio::time::timeout(Duration::from_secs(5), oom)
        .await
        .expect("GetOOMEvent still pending after DestroySandbox");
    let err = pending.unwrap().expect_err("GetOOMEvent after DestroySandbox");
    assert_eq!(code(&err).0, Code::UNAVAILABLE, "GetOOMEvent after DestroySandbox: {err:?}");
    agent.wait_exit_ok().await;
    assert_eq!(kata_mounts(&witness), host_kata_mounts, "pod mounts left behind");
    assert!(!witness.path("/run/kata-containers").exists(), "/run/kata-containers left behind");
    assert!(!witness.path(&format!("/sys/fs/cgroup/podvisor/{pod}")).exists(), "cgroups left behind");
    for arg in [&sb_sleep, &a_sleep, &b_sleep] {
        assert!(pids_running(&format!("sleep {arg}")).is_empty(), "a pod process (sleep {arg}) is still running");
    }
    assert!(!dir.join("run").exists(), "run directory left behind");
    assert!(!agent.log().contains("\"level\":\"ERRO\""), "errors in the agent log:\n{}", agent.log());
    assert!(agent.log().contains("\"graceful\":true"), "the ttrpc server did not stop gracefully:\n{}", agent.log());
}
