//! The pod state machine driven with a fake VM and agent: every test runs in milliseconds and
//! ends by checking that nothing is held (no VMM child, run directory, shared directory, mount,
//! in-flight agent call or task still holding the pod).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fakes::{FakeBackend, Hold, RecordingSink};
use super::{CreateRequest, Event, Pod, PodError};
use crate::mounts::{SharedDir, SHARED_ROOT};
use crate::process::{Status, Stdio};

/// A fast call must answer within this while a slow one is blocked forever.
const FAST: Duration = Duration::from_millis(100);
/// Longest any awaited step of these tests may take before the test fails.
const STEP: Duration = Duration::from_secs(3);

struct Env {
    dir: tempfile::TempDir,
    sandbox: String,
    backend: Arc<FakeBackend>,
    sink: Arc<RecordingSink>,
    pod: Arc<Pod>,
}

impl Env {
    fn new() -> Env {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the pod tests make real bind mounts under {SHARED_ROOT}: run them as root"
        );
        static N: AtomicUsize = AtomicUsize::new(0);
        let sandbox = format!("podvisor-unit-pod-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("configuration.toml");
        std::fs::write(&config, "[runtime]\nsandbox_cgroup_only = false\n").unwrap();
        let backend = Arc::new(FakeBackend::new(dir.path()));
        let sink = Arc::new(RecordingSink::default());
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let pod = Arc::new(Pod::new(&sandbox, sink.clone(), backend.clone(), log, Some(config.display().to_string())));
        Env { dir, sandbox, backend, sink, pod }
    }

    /// A bundle for container `id` (CRI `kind` "sandbox" or "container", or none), with its
    /// rootfs directory and a stdout file; `linux` is merged into the spec's `linux`.
    fn request(&self, id: &str, kind: Option<&str>, resources: Option<serde_json::Value>) -> CreateRequest {
        let bundle = self.dir.path().join("bundles").join(id);
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let mut annotations = serde_json::Map::new();
        if let Some(kind) = kind {
            annotations.insert("io.kubernetes.cri.container-type".into(), kind.into());
            annotations.insert("io.kubernetes.cri.sandbox-id".into(), self.sandbox.clone().into());
        }
        let mut linux = serde_json::json!({
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "network"}, {"type": "mount"}]
        });
        if let Some(r) = resources {
            linux["resources"] = r;
        }
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "hostname": "fake",
            "annotations": annotations,
            "linux": linux,
        });
        std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
        let stdout = bundle.join("stdout").display().to_string();
        CreateRequest {
            id: id.into(),
            bundle,
            rootfs: Vec::new(),
            stdio: Stdio { stdout, ..Default::default() },
            config_path: None,
        }
    }

    fn stdout_of(&self, id: &str) -> PathBuf {
        self.dir.path().join("bundles").join(id).join("stdout")
    }

    fn events(&self) -> Vec<Event> {
        self.sink.events.lock().unwrap().clone()
    }

    /// Creates and starts container `id` (a plain container: boots the VM if none runs).
    async fn run(&self, id: &str) {
        step(self.pod.create(self.request(id, None, None))).await.unwrap();
        step(self.pod.start(id, "")).await.unwrap();
    }

    /// Nothing is held: every VM stopped (its VMM reaped, its run directory gone), the shared
    /// directory and its mounts gone, no agent call under way, no task holding the pod.
    async fn assert_nothing_held(&self) {
        let deadline = Instant::now() + STEP;
        loop {
            let busy: usize = self.backend.agents.lock().unwrap().iter().map(|a| a.in_flight()).sum();
            if Arc::strong_count(&self.pod) == 1 && busy == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still held after {STEP:?}: {} references to the pod, {busy} agent calls under way",
                Arc::strong_count(&self.pod)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!self.pod.vm_exists(), "the pod still has a VM");
        for vm in self.backend.vms.lock().unwrap().iter() {
            assert_eq!(vm.holds_anything(), None);
            if let Some(pid) = *vm.vmm_pid.lock().unwrap() {
                assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the fake VMM {pid} is still a process");
            }
        }
        let shared = Path::new(SHARED_ROOT).join(&self.sandbox);
        assert!(!shared.exists(), "{} is left", shared.display());
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let dir = self.dir.path().display().to_string();
        let left: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&self.sandbox) || l.contains(&dir)).collect();
        assert!(left.is_empty(), "mounts left: {left:#?}");
    }
}

impl Drop for Env {
    /// A failed test must not leave mounts or processes behind for the next ones.
    fn drop(&mut self) {
        for vm in self.backend.vms.lock().unwrap().iter() {
            vm.kill();
        }
        let _ = SharedDir::new(&self.sandbox).destroy();
    }
}

/// `f`, or a failure naming the step that hung.
async fn step<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f).await.expect("a step did not finish in time")
}

/// `f` answers within [`FAST`].
async fn fast<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    match tokio::time::timeout(FAST, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not answer within {FAST:?} (waited {:?})", started.elapsed()),
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {STEP:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn exit_code(events: &[Event], id: &str) -> Option<u32> {
    events.iter().find_map(|e| match e {
        Event::TaskExit { id: i, exit, .. } if i == id => Some(exit.code),
        _ => None,
    })
}

fn oci_process() -> agent_protocol::oci::Process {
    agent_protocol::oci::Process { Args: vec!["true".into()], ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_start_exec_kill_wait_delete() {
    let env = Env::new();
    let pod = &env.pod;
    step(pod.create(env.request("c1", None, None))).await.unwrap();
    let vmm = env.backend.vm().vmm_pid.lock().unwrap().expect("the VM started");
    assert_eq!(pod.vmm_pid(), vmm, "the task pid is the VMM's");
    assert_eq!(pod.process("c1", "").unwrap().status(), Status::Created);
    step(pod.kill("c1", "", 0)).await.expect("signal 0 to a created process: it exists");
    assert_eq!(
        step(pod.create(env.request("c1", None, None))).await.unwrap_err(),
        PodError::AlreadyExists("container c1".into())
    );
    step(pod.start("c1", "")).await.unwrap();
    assert!(matches!(step(pod.start("c1", "")).await, Err(PodError::FailedPrecondition(_))), "started twice");
    let agent = env.backend.agent();
    step(pod.kill("c1", "", 0)).await.expect("signal 0 to a running process");
    assert!(agent.called("SignalProcess c1 c1 0"), "the guest answers for a running process");

    // An exec: registered, started, its output delivered, killed, waited for, deleted.
    let exec_out = env.dir.path().join("exec.out");
    let stdio = Stdio { stdout: exec_out.display().to_string(), ..Default::default() };
    pod.exec("c1", "e1", stdio.clone(), oci_process()).unwrap();
    assert_eq!(
        pod.exec("c1", "e1", stdio, oci_process()).unwrap_err(),
        PodError::AlreadyExists("exec e1 in container c1".into())
    );
    step(pod.start("c1", "e1")).await.unwrap();
    agent.output("c1", "e1", b"from the exec\n");
    step(pod.kill("c1", "e1", 9)).await.unwrap();
    let exit = step(pod.process("c1", "e1").unwrap().wait()).await;
    assert_eq!(exit.code, 137);
    assert_eq!(std::fs::read(&exec_out).unwrap(), b"from the exec\n");
    assert!(step(pod.kill("c1", "e1", 0)).await.unwrap_err().to_string().contains("already finished"));
    let (pid, exit) = step(pod.delete("c1", "e1")).await.unwrap();
    assert_eq!((pid, exit.code), (vmm, 137));
    assert!(matches!(pod.process("c1", "e1"), Err(PodError::NotFound(_))));

    // The container: still running, so no delete; killed; deleted; the VM goes with it.
    assert!(matches!(step(pod.delete("c1", "")).await, Err(PodError::FailedPrecondition(_))));
    step(pod.kill("c1", "", 15)).await.unwrap();
    assert_eq!(step(pod.process("c1", "").unwrap().wait()).await.code, 143);
    let (_, exit) = step(pod.delete("c1", "")).await.unwrap();
    assert_eq!(exit.code, 143);
    assert!(pod.is_empty());
    assert!(agent.called("DestroySandbox"), "the last delete stops the VM");

    let kinds: Vec<String> =
        env.events().iter().map(|e| format!("{e:?}").split([' ', '{']).next().unwrap().to_string()).collect();
    assert_eq!(
        kinds,
        ["TaskCreate", "TaskStart", "TaskExecAdded", "TaskExecStarted", "TaskExit", "TaskExit", "TaskDelete"],
        "{:#?}",
        env.events()
    );
    assert_eq!(exit_code(&env.events(), "e1"), Some(137));
    assert_eq!(exit_code(&env.events(), "c1"), Some(143));
    env.assert_nothing_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_is_delivered_before_the_exit_is_published_or_waited_for() {
    let env = Env::new();
    env.run("c1").await;
    let agent = env.backend.agent();
    // Each chunk reaches the shim 40 ms after it is asked for: the exit comes first in the guest.
    *agent.output_delay.lock().unwrap() = Duration::from_millis(40);
    let stdout = env.stdout_of("c1");
    let all: Vec<u8> = (0..5).flat_map(|i| format!("line {i}\n").into_bytes()).collect();
    let seen_at_exit = Arc::new(std::sync::Mutex::new(None));
    {
        let (stdout, seen) = (stdout.clone(), seen_at_exit.clone());
        *env.sink.on_event.lock().unwrap() = Some(Box::new(move |e| {
            if matches!(e, Event::TaskExit { .. }) {
                *seen.lock().unwrap() = Some(std::fs::read(&stdout).unwrap());
            }
        }));
    }
    for i in 0..5 {
        agent.output("c1", "c1", format!("line {i}\n").as_bytes());
    }
    agent.exit("c1", "c1", 3);
    let exit = step(env.pod.process("c1", "").unwrap().wait()).await;
    assert_eq!(exit.code, 3);
    assert_eq!(std::fs::read(&stdout).unwrap(), all, "Wait returned before the output was delivered");
    wait_until("the exit event", || exit_code(&env.events(), "c1").is_some()).await;
    assert_eq!(seen_at_exit.lock().unwrap().as_deref(), Some(&all[..]), "the exit event ran ahead of the output");
    step(env.pod.delete("c1", "")).await.unwrap();
    env.assert_nothing_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_kills_are_published_and_written_for_cri_o() {
    let env = Env::new();
    let mut req = env.request("c1", None, None);
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(req.bundle.join("config.json")).unwrap()).unwrap();
    spec["annotations"]["io.container.manager"] = "cri-o".into();
    std::fs::write(req.bundle.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
    req.stdio = Stdio::default();
    step(env.pod.create(req)).await.unwrap();
    step(env.pod.start("c1", "")).await.unwrap();
    let agent = env.backend.agent();
    agent.oom("c1");
    wait_until("the OOM event", || {
        env.events().iter().any(|e| matches!(e, Event::TaskOom { container_id } if container_id == "c1"))
    })
    .await;
    assert!(env.dir.path().join("bundles/c1/oom").exists(), "CRI-O reads OOM kills from <bundle>/oom");
    agent.exit("c1", "c1", 137);
    step(env.pod.process("c1", "").unwrap().wait()).await;
    // CRI-O: a signal to a process that already exited is delivered to nobody, not an error.
    step(env.pod.kill("c1", "", 9)).await.unwrap();
    assert!(step(env.pod.kill("c1", "", 0)).await.is_err(), "signal 0: it no longer exists");
    step(env.pod.delete("c1", "")).await.unwrap();
    env.assert_nothing_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_answers_from_a_hostile_guest_are_bounded() {
    let env = Env::new();
    step(env.pod.create(env.request("c1", None, None))).await.unwrap();
    step(env.pod.start("c1", "")).await.unwrap();
    let agent = env.backend.agent();
    for _ in 0..40 {
        agent.oom("no-such-container");
    }
    for _ in 0..1000 {
        agent.oom("c1");
    }
    let started = std::time::Instant::now();
    wait_until("an OOM event for c1", || {
        env.events().iter().any(|e| matches!(e, Event::TaskOom { container_id } if container_id == "c1"))
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let ooms: Vec<_> = env.events().into_iter().filter(|e| matches!(e, Event::TaskOom { .. })).collect();
    assert!(
        ooms.iter().all(|e| matches!(e, Event::TaskOom { container_id } if container_id == "c1")),
        "an id the pod does not have was published: {ooms:?}"
    );
    let allowed = (started.elapsed().as_millis() / super::vm::OOM_EVENT_INTERVAL.as_millis()) as usize + 1;
    assert!(ooms.len() <= allowed, "{} OOM events in {:?}: not rate-bounded", ooms.len(), started.elapsed());
    agent.exit("c1", "c1", 137);
    step(env.pod.process("c1", "").unwrap().wait()).await;
    step(env.pod.delete("c1", "")).await.unwrap();
    env.assert_nothing_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_before_start_ends_there() {
    let env = Env::new();
    step(env.pod.create(env.request("c1", None, None))).await.unwrap();
    step(env.pod.kill("c1", "", 9)).await.unwrap();
    assert_eq!(step(env.pod.process("c1", "").unwrap().wait()).await.code, 137);
    assert!(env.backend.agent().called("RemoveContainer c1"));
    assert_eq!(exit_code(&env.events(), "c1"), Some(137));
    step(env.pod.delete("c1", "")).await.unwrap();
    env.assert_nothing_held().await;
}

/// Boot steps that fail: the create fails with the cause, and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_boot_failure_leaves_nothing() {
    for (what, vm_step, rpc) in [
        ("prepare", Some("prepare"), None),
        ("start", Some("start"), None),
        ("CreateSandbox", None, Some("CreateSandbox")),
        ("CreateContainer", None, Some("CreateContainer")),
    ] {
        let env = Env::new();
        {
            let mut script = env.backend.script.lock().unwrap();
            script.vm_fails.extend(vm_step);
            script.agent_fails.extend(rpc);
        }
        let err = step(env.pod.create(env.request("c1", None, None))).await.unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{what}: {err}");
        assert!(env.pod.is_empty(), "{what}");
        assert!(env.events().is_empty(), "{what}: {:?}", env.events());
        env.assert_nothing_held().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_fails_in_a_running_pod_leaves_the_pod_as_it_was() {
    let env = Env::new();
    step(env.pod.create(env.request("sandbox", Some("sandbox"), None))).await.unwrap();
    step(env.pod.start("sandbox", "")).await.unwrap();
    env.backend.script.lock().unwrap().agent_fails.insert("CreateContainer");
    let err = step(env.pod.create(env.request("c2", Some("container"), None))).await.unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(env.backend.vm().running(), "the pod's VM stays");
    let shared = Path::new(SHARED_ROOT).join(&env.sandbox).join("shared");
    assert!(
        shared.join("sandbox").exists() && !shared.join("c2").exists(),
        "c2's files left the share, the sandbox's stay"
    );
    assert_eq!(env.pod.container_ids(), ["sandbox"]);
    env.backend.agent().exit("sandbox", "sandbox", 0);
    step(env.pod.process("sandbox", "").unwrap().wait()).await;
    step(env.pod.delete("sandbox", "")).await.unwrap();
    env.assert_nothing_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_or_exec_can_be_deleted() {
    let env = Env::new();
    env.backend.script.lock().unwrap().agent_fails.insert("StartContainer");
    step(env.pod.create(env.request("c1", None, None))).await.unwrap();
    assert!(step(env.pod.start("c1", "")).await.unwrap_err().to_string().contains("StartContainer"));
    assert_eq!(env.pod.process("c1", "").unwrap().status(), Status::Created);
    env.backend.script.lock().unwrap().agent_fails.clear();
    step(env.pod.start("c1", "")).await.unwrap();

    env.backend.script.lock().unwrap().agent_fails.insert("ExecProcess");
    env.pod.exec("c1", "e1", Stdio::default(), oci_process()).unwrap();
    assert!(step(env.pod.start("c1", "e1")).await.unwrap_err().to_string().contains("ExecProcess"));
    step(env.pod.delete("c1", "e1")).await.expect("an exec that never ran is deleted");

    env.backend.agent().exit("c1", "c1", 0);
    step(env.pod.process("c1", "").unwrap().wait()).await;
    step(env.pod.delete("c1", "")).await.unwrap();
    env.assert_nothing_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_whose_stdio_fails_is_killed_in_the_guest() {
    let env = Env::new();
    env.run("c1").await;
    let nowhere = env.dir.path().join("missing-dir/out").display().to_string();
    env.pod.exec("c1", "e1", Stdio { stdout: nowhere, ..Default::default() }, oci_process()).unwrap();
    let err = step(env.pod.start("c1", "e1")).await.unwrap_err();
    assert!(err.to_string().contains("missing-dir"), "{err}");
    let agent = env.backend.agent();
    assert!(
        agent.called("SignalProcess c1 e1 9"),
        "the exec keeps running in the guest: {:?}",
        agent.calls.lock().unwrap()
    );
    let p = env.pod.process("c1", "e1").unwrap();
    assert_eq!((p.status(), p.exit().map(|e| e.code)), (Status::Stopped, Some(137)));
    step(env.pod.delete("c1", "e1")).await.unwrap();
    step(env.pod.kill("c1", "", 9)).await.unwrap();
    step(env.pod.process("c1", "").unwrap().wait()).await;
    step(env.pod.delete("c1", "")).await.unwrap();
    env.assert_nothing_held().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_dies_mid_run_ends_every_process() {
    let env = Env::new();
    env.run("c1").await;
    env.pod.exec("c1", "e1", Stdio::default(), oci_process()).unwrap();
    step(env.pod.start("c1", "e1")).await.unwrap();
    env.backend.agent().die();
    assert_eq!(step(env.pod.process("c1", "e1").unwrap().wait()).await.code, 255);
    assert_eq!(step(env.pod.process("c1", "").unwrap().wait()).await.code, 255);
    assert!(step(env.pod.stats("c1")).await.is_ok(), "an exited container has empty statistics");
    step(env.pod.delete("c1", "e1")).await.unwrap();
    step(env.pod.delete("c1", "")).await.expect("delete works without an agent");
    env.assert_nothing_held().await;
}

/// While the VM boots forever, the fast calls answer; a stop cancels the boot and cleans up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_calls_answer_while_the_vm_boots_and_a_stop_cancels_the_boot() {
    let env = Env::new();
    env.backend.script.lock().unwrap().vm_blocks.insert("start");
    let create = tokio::spawn({
        let (pod, req) = (env.pod.clone(), env.request("c1", None, None));
        async move { pod.create(req).await }
    });
    wait_until("the boot under way", || env.backend.vms.lock().unwrap().first().is_some_and(|vm| vm.running())).await;
    fast("Connect's task pid", async { env.pod.vmm_pid() }).await;
    assert!(matches!(fast("State", async { env.pod.process("c1", "") }).await, Err(PodError::NotFound(_))));
    assert!(matches!(fast("Stats", env.pod.stats("c1")).await, Err(PodError::NotFound(_))));
    assert!(matches!(fast("Kill 0", env.pod.kill("c1", "", 0)).await, Err(PodError::NotFound(_))));
    assert!(!create.is_finished(), "the boot was to block");
    step(env.pod.stop_vm()).await;
    let err = step(create).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    env.assert_nothing_held().await;
}

/// While a hot-plug waits forever, the fast calls on the running container answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_calls_answer_while_a_hot_plug_waits() {
    let env = Env::new();
    step(env.pod.create(env.request("sandbox", Some("sandbox"), None))).await.unwrap();
    step(env.pod.start("sandbox", "")).await.unwrap();
    env.backend.script.lock().unwrap().vm_blocks.insert("resize_memory");
    let create = tokio::spawn({
        let limits = serde_json::json!({"memory": {"limit": 256u64 << 20}});
        let (pod, req) = (env.pod.clone(), env.request("c2", Some("container"), Some(limits)));
        async move { pod.create(req).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!create.is_finished(), "the hot-plug was to block");
    let vmm = env.backend.vm().vmm_pid.lock().unwrap().unwrap();
    assert_eq!(fast("Connect / Pids", async { env.pod.vmm_pid() }).await, vmm);
    let p = fast("State", async { env.pod.process("sandbox", "") }).await.unwrap();
    assert_eq!(p.status(), Status::Running);
    fast("Stats", env.pod.stats("sandbox")).await.unwrap();
    fast("Kill 0", env.pod.kill("sandbox", "", 0)).await.unwrap();
    fast("Pause", env.pod.set_paused("sandbox", true)).await.unwrap();
    fast("Resume", env.pod.set_paused("sandbox", false)).await.unwrap();
    let events = env.events();
    assert!(events.contains(&Event::TaskPaused { container_id: "sandbox".into() }), "{events:?}");
    assert!(events.contains(&Event::TaskResumed { container_id: "sandbox".into() }), "{events:?}");
    // The pod stops (Shutdown, SIGTERM): the hot-plug fails with the VM, and the create cleans up.
    step(env.pod.stop_vm()).await;
    let err = step(create).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("hot-plug"), "{err}");
    assert_eq!(env.pod.container_ids(), ["sandbox"]);
    step(env.pod.process("sandbox", "").unwrap().wait()).await;
    step(env.pod.delete("sandbox", "")).await.unwrap();
    env.assert_nothing_held().await;
}

/// A container's limits grow the VM by what they add; an in-place resize adds only what goes
/// beyond the highest so far, and the guest cgroup always takes the new limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_grow_the_vm_and_a_resize_adds_only_the_difference() {
    let env = Env::new();
    step(env.pod.create(env.request("sandbox", Some("sandbox"), None))).await.unwrap();
    step(env.pod.start("sandbox", "")).await.unwrap();
    let limits = serde_json::json!({"memory": {"limit": 128u64 << 20}, "cpu": {"quota": 150000, "period": 100000}});
    step(env.pod.create(env.request("c2", Some("container"), Some(limits)))).await.unwrap();
    let vm = env.backend.vm();
    let boot = crate::config::load(Some(&env.dir.path().join("configuration.toml"))).unwrap().hypervisor;
    let (mem, cpus) = (boot.default_memory, boot.default_vcpus);
    let max = boot.max_vcpus(hypervisor::host::host_cpus());
    let want_cpus = (cpus + 2).min(max);
    let mut expected = Vec::new();
    if want_cpus > cpus {
        expected.push(format!("cpus {want_cpus}"));
    }
    expected.push(format!("mem {}", mem + 128));
    assert_eq!(*vm.resizes.lock().unwrap(), expected);

    let raised: oci_spec::runtime::LinuxResources =
        serde_json::from_value(serde_json::json!({"memory": {"limit": 256u64 << 20}})).unwrap();
    step(env.pod.update("c2", &raised)).await.unwrap();
    assert_eq!(vm.resizes.lock().unwrap().last().unwrap(), &format!("mem {}", mem + 256), "128 MiB more");
    let lowered: oci_spec::runtime::LinuxResources =
        serde_json::from_value(serde_json::json!({"memory": {"limit": 64u64 << 20}})).unwrap();
    let before = vm.resizes.lock().unwrap().len();
    step(env.pod.update("c2", &lowered)).await.unwrap();
    assert_eq!(vm.resizes.lock().unwrap().len(), before, "lowering unplugs nothing");
    let updates =
        env.backend.agent().calls.lock().unwrap().iter().filter(|c| c.starts_with("UpdateContainer c2")).count();
    assert_eq!(updates, 2, "the guest cgroup takes both new limits");

    step(env.pod.stop_vm()).await;
    step(env.pod.delete("c2", "")).await.unwrap();
    assert_eq!(step(env.pod.process("sandbox", "").unwrap().wait()).await.code, 255, "ended with its VM");
    step(env.pod.delete("sandbox", "")).await.unwrap();
    env.assert_nothing_held().await;
}

/// A create whose caller went away (client timeout) still finishes, cleanup included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_create_still_cleans_up() {
    let env = Env::new();
    env.backend.hold("CreateContainer");
    let gone = tokio::time::timeout(Duration::from_millis(50), env.pod.create(env.request("c1", None, None))).await;
    assert!(gone.is_err(), "the create was to be held");
    wait_until("the held CreateContainer", || {
        env.backend.agents.lock().unwrap().first().is_some_and(|a| a.in_flight() > 0)
    })
    .await;
    env.backend.release("CreateContainer", Hold::Fail);
    env.assert_nothing_held().await;
    assert!(env.pod.is_empty());

    // Let through instead: the container exists although nobody heard the answer.
    let env = Env::new();
    env.backend.hold("CreateContainer");
    let gone = tokio::time::timeout(Duration::from_millis(50), env.pod.create(env.request("c1", None, None))).await;
    assert!(gone.is_err());
    env.backend.release("CreateContainer", Hold::Pass);
    wait_until("the container", || env.pod.container("c1").is_ok()).await;
    step(env.pod.delete("c1", "")).await.unwrap();
    env.assert_nothing_held().await;
}

/// A delete whose caller went away still removes the container and stops the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_delete_still_cleans_up() {
    let env = Env::new();
    step(env.pod.create(env.request("c1", None, None))).await.unwrap();
    env.backend.hold("RemoveContainer");
    let gone = tokio::time::timeout(Duration::from_millis(50), env.pod.delete("c1", "")).await;
    assert!(gone.is_err(), "the delete was to be held");
    env.backend.release("RemoveContainer", Hold::Pass);
    env.assert_nothing_held().await;
    assert!(env.pod.is_empty());
    assert!(env.events().iter().any(|e| matches!(e, Event::TaskDelete { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_container_needs_its_sandbox() {
    let env = Env::new();
    let err = step(env.pod.create(env.request("c2", Some("container"), None))).await.unwrap_err();
    assert!(matches!(err, PodError::FailedPrecondition(_)), "{err}");
    assert!(env.backend.vms.lock().unwrap().is_empty(), "no VM is booted for a container of a pod");
    env.assert_nothing_held().await;
}

/// The sandbox container's exit stops the VM at once (CRI-O deletes a stopped sandbox only when
/// it removes it): the app container is reported exited, the VM and its metrics socket go, and
/// the deletes that follow work without a VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_containers_exit_stops_the_vm() {
    let env = Env::new();
    let pod = &env.pod;
    let sb = env.sandbox.clone();
    step(pod.create(env.request(&sb, Some("sandbox"), None))).await.unwrap();
    step(pod.start(&sb, "")).await.unwrap();
    step(pod.create(env.request("app", Some("container"), None))).await.unwrap();
    step(pod.start("app", "")).await.unwrap();
    let metrics_dir = crate::monitor::sandbox_dir(&sb);
    std::fs::create_dir_all(&metrics_dir).unwrap();
    /// Removes the directory even when the test fails.
    struct RemoveDir(String);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = crate::monitor::remove_dir(&self.0);
        }
    }
    let _remove = RemoveDir(sb.clone());
    let agent = env.backend.agent();
    agent.exit("app", "app", 0);
    step(pod.process("app", "").unwrap().wait()).await;
    assert!(!agent.called("DestroySandbox"), "an app container's exit leaves the VM running");
    agent.exit(&sb, &sb, 0);
    step(pod.process(&sb, "").unwrap().wait()).await;
    wait_until("the VM stops", || agent.called("DestroySandbox")).await;
    wait_until("the metrics socket's directory goes", || !metrics_dir.exists()).await;
    assert_eq!(pod.vmm_pid(), 0, "no VM left");
    step(pod.delete("app", "")).await.unwrap();
    step(pod.delete(&sb, "")).await.unwrap();
    assert!(pod.is_empty());
    env.assert_nothing_held().await;
}

/// Peer pods (`[hypervisor.remote]`, no shared file system): files reach the guest by CopyFile,
/// a changed volume is copied again, CRI-O's guest pull becomes Kata's `image_guest_pull`
/// storage, and nothing keeps copying after the container is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_pod_files_are_copied_updated_and_pulled() {
    use base64::Engine;
    let env = Env::new();
    std::fs::write(
        env.dir.path().join("configuration.toml"),
        "[hypervisor.remote]\nremote_hypervisor_socket = \"/nonexistent/hypervisor.sock\"\n\
         [runtime]\nsandbox_cgroup_only = false\n",
    )
    .unwrap();
    let cm = env.dir.path().join("cm");
    std::fs::create_dir(&cm).unwrap();
    std::fs::write(cm.join("key"), "one").unwrap();
    let req = env.request("c1", None, None);
    let config = req.bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    spec["mounts"] = serde_json::json!([
        {"destination": "/etc/cm", "type": "bind", "source": cm.display().to_string(), "options": ["rbind", "ro"]}
    ]);
    std::fs::write(&config, serde_json::to_vec(&spec).unwrap()).unwrap();
    std::fs::write(req.bundle.join("rootfs/hello"), "rootfs file").unwrap();
    step(env.pod.create(req)).await.unwrap();
    let agent = env.backend.agent();
    let shared = crate::mounts::GUEST_SHARED;
    assert!(agent.called(&format!("CopyFile {shared}/c1/rootfs/hello 100644 rootfs file")), "{:#?}", agent.calls);
    assert!(agent.called(&format!("CopyFile {shared}/c1-mounts/0-cm/key 100644 one")), "{:#?}", agent.calls);
    assert!(!agent.called("CreateSandbox") || !agent.calls.lock().unwrap().iter().any(|c| c.contains("virtio")));

    // The node updates the volume: the guest gets the new content within two seconds.
    std::fs::write(cm.join("key"), "two").unwrap();
    let updated = format!("CopyFile {shared}/c1-mounts/0-cm/key 100644 two");
    wait_until("the update is copied", || agent.called(&updated)).await;

    // CRI-O's runtime_pull_image: a virtual volume in the rootfs mounts.
    let mut req = env.request("c2", None, None);
    let config = req.bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    spec["annotations"]["io.kubernetes.cri-o.ContainerType"] = "container".into();
    spec["annotations"]["io.kubernetes.cri-o.ImageName"] = "registry:5000/busybox:test".into();
    std::fs::write(&config, serde_json::to_vec(&spec).unwrap()).unwrap();
    let volume =
        r#"{"volume_type":"image_guest_pull","source":"registry:5000/busybox:test","image_pull":{"metadata":{}}}"#;
    req.rootfs = vec![crate::mounts::MountSpec {
        fstype: "fuse.nydus-overlayfs".into(),
        source: String::new(),
        options: vec![format!("io.katacontainers.volume={}", base64::engine::general_purpose::STANDARD.encode(volume))],
    }];
    step(env.pod.create(req)).await.unwrap();
    let storages = agent.storages.lock().unwrap().clone();
    assert!(
        storages.contains(&"c2 image_guest_pull registry:5000/busybox:test /run/kata-containers/c2/rootfs".to_string()),
        "{storages:#?}"
    );
    assert!(!agent.called(&format!("CopyFile {shared}/c2/rootfs")), "a pulled rootfs is not copied");

    // Hot-plug requests of a podvm are skipped (sized by its instance type): no resize call.
    for id in ["c2", "c1"] {
        step(env.pod.kill(id, "", 9)).await.ok();
        step(env.pod.process(id, "").unwrap().wait()).await;
        step(env.pod.delete(id, "")).await.unwrap();
    }
    let copies = agent.calls.lock().unwrap().iter().filter(|c| c.starts_with("CopyFile")).count();
    std::fs::write(cm.join("key"), "three").unwrap();
    tokio::time::sleep(super::remote::SYNC_INTERVAL * 2).await;
    assert_eq!(
        agent.calls.lock().unwrap().iter().filter(|c| c.starts_with("CopyFile")).count(),
        copies,
        "nothing is copied once the container is gone"
    );
    env.assert_nothing_held().await;
}
