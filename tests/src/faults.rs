//! Fault injection through a container manager's CRI ([`Cri`]): a process of a pod's VM
//! (QEMU, virtiofsd, vhost-device-vsock) SIGKILLed, the guest agent made to panic, or the shim
//! SIGKILLed, at a chosen stage of the pod's life ([`Stage`]), and what the node must then see
//! ([`run_case`]): the failed call's error naming what died and how (SIGKILL, the panic), or the
//! container exited and the sandbox NOTREADY within [`EVENT_WITHIN`], and StopPodSandbox +
//! RemovePodSandbox leaving nothing. Used by `tests/tests/faults.rs` and the soak
//! (`soak.rs`).
//!
//! The agent panics through its test-only hook: the kernel parameter
//! `podvisor.test_panic=<RPC>[:<n>]` (or `boot`), passed as the pod annotation
//! `io.katacontainers.config.hypervisor.kernel_params`, which [`enable_kernel_params`] allows in
//! the harness's configuration. A panic in the agent (PID 1) prints its cause on the console
//! and powers the guest off, so the host sees QEMU exit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::cri::{proto, Cri, Pod};
use crate::leaks;

/// How soon after a fault the node must see it: the exit of the pod's containers (and the
/// sandbox NOTREADY), or the failed call's error.
pub const EVENT_WITHIN: Duration = Duration::from_secs(5);

/// How long a shim killed under a running pod may take to be noticed (containerd sees the closed
/// connection; CRI-O its pending `Wait` failing).
pub const SHIM_EVENT_WITHIN: Duration = Duration::from_secs(10);

/// How long setting up a stage may take (a VM boot under TCG on a loaded machine).
const SETUP_TIMEOUT: Duration = Duration::from_secs(180);

/// The pod annotation that adds kernel parameters (allowed by [`enable_kernel_params`]).
pub const KERNEL_PARAMS_ANNOTATION: &str = "io.katacontainers.config.hypervisor.kernel_params";

/// What fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// `qemu-system-*` SIGKILLed.
    Qemu,
    /// The pod's virtiofsd SIGKILLed.
    Virtiofsd,
    /// The pod's vhost-device-vsock (hybrid vsock daemon) SIGKILLed.
    VsockDaemon,
    /// The guest agent panics (its test hook).
    Agent,
    /// The pod's shim daemon SIGKILLed.
    Shim,
}

impl Target {
    /// The VM's processes and the agent: the faults every [`Stage`] is tested with.
    pub const VM_SIDE: [Target; 4] = [Target::Qemu, Target::Virtiofsd, Target::VsockDaemon, Target::Agent];

    /// The program (argv[0] contains it) SIGKILLed; `None` for the agent.
    pub fn program(self) -> Option<&'static str> {
        match self {
            Target::Qemu => Some("qemu-system"),
            Target::Virtiofsd => Some("virtiofsd"),
            Target::VsockDaemon => Some("vhost-device-vsock"),
            Target::Shim => Some("containerd-shim-kata-v2"),
            Target::Agent => None,
        }
    }

    /// Words of which one must appear in an error caused by this fault (what died).
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Target::Qemu => &["QEMU", "qemu"],
            Target::Virtiofsd => &["virtiofsd"],
            Target::VsockDaemon => &["vhost-device-vsock"],
            Target::Shim => &["shim"],
            Target::Agent => &["panic"],
        }
    }

    /// How the error must say it died.
    pub fn how(self) -> &'static str {
        match self {
            Target::Agent => "test_panic",
            _ => "SIGKILL",
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Target::Qemu => "QEMU",
            Target::Virtiofsd => "virtiofsd",
            Target::VsockDaemon => "vhost-device-vsock",
            Target::Agent => "agent panic",
            Target::Shim => "shim",
        })
    }
}

/// When it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// During `RunPodSandbox` (the VM boots).
    Booting,
    /// While a container is being created (containerd: its task at `StartContainer`; CRI-O:
    /// `CreateContainer`).
    Creating,
    /// A container runs.
    Running,
    /// An `ExecSync` runs in the container.
    Exec,
    /// `StopContainer` waits for a container that takes its time after SIGTERM.
    Stopping,
}

impl Stage {
    /// Every stage, in pod life order.
    pub const ALL: [Stage; 5] = [Stage::Booting, Stage::Creating, Stage::Running, Stage::Exec, Stage::Stopping];

    /// The agent's `podvisor.test_panic` point for this stage: `boot`; the second
    /// `CreateContainer` (the first is the pause container's); the first `ExecProcess` for
    /// stopping; otherwise `StatsContainer`: the test triggers them with the CRI `ExecSync` or
    /// `ContainerStats` at the moment it chooses.
    pub fn agent_panic_point(self) -> &'static str {
        match self {
            Stage::Booting => "boot",
            Stage::Creating => "CreateContainer:2",
            Stage::Running | Stage::Exec => "StatsContainer",
            // CRI-O serializes ContainerStats behind a running StopContainer: an ExecSync
            // (the pod's first exec) is the trigger.
            Stage::Stopping => "ExecProcess",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Booting => "booting",
            Stage::Creating => "container creating",
            Stage::Running => "running",
            Stage::Exec => "exec running",
            Stage::Stopping => "stopping",
        })
    }
}

/// Allows the `kernel_params` annotation in the harness's shim configuration (the agent's
/// panic hook is a kernel parameter); takes effect for the next pod.
pub fn enable_kernel_params(cri: &Cri) {
    let text = crate::containerd::kata_test_config(|c| {
        crate::containerd::qemu_section(c).insert("enable_annotations".into(), vec!["kernel_params"].into());
    });
    std::fs::write(cri.kata_config(), text).unwrap_or_else(|e| panic!("{}: {e}", cri.kata_config().display()));
}

/// What one case saw.
#[derive(Debug, Clone, Default)]
pub struct CaseReport {
    /// From the fault to the node seeing it (the call's error, or the container exited and the
    /// sandbox NOTREADY).
    pub detected: Duration,
    /// The error the interrupted call returned, if one did.
    pub error: Option<String>,
    /// The whole case, setup and teardown included.
    pub took: Duration,
}

/// A container running until SIGTERM, which it answers by printing `stopping` and taking 60 s
/// more (the "stopping" stage). It prints `trapped` once the handler is installed (a SIGTERM
/// before that is ignored: the shell is PID 1 of its namespace). The test reads both from the
/// container's log: an exec would be an agent request of its own.
pub const SLOW_STOPPER: &[&str] =
    &["sh", "-c", "trap 'echo stopping; sleep 60; exit 0' TERM; echo trapped; while :; do sleep 1 & wait $!; done"];

/// Pids of `program` serving sandbox `id` (its command line names the id).
pub fn pids_of(program: &str, id: &str) -> Vec<u32> {
    leaks::find_processes(program, id).into_iter().map(|p| p.pid).collect()
}

/// SIGKILLs the `target` process of sandbox `id`; its pid.
pub fn kill(target: Target, id: &str) -> Result<u32, String> {
    let program = target.program().ok_or_else(|| format!("{target} is not a process to kill"))?;
    // virtiofsd forks a sandboxed child: kill the top one, whose parent is not a virtiofsd.
    let pids = pids_of(program, id);
    let top: Vec<u32> = pids.iter().copied().filter(|p| !parent(*p).is_some_and(|pp| pids.contains(&pp))).collect();
    let [pid] = top[..] else {
        return Err(format!("expected one {program} process of sandbox {id}, found {pids:?}"));
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("kill -9 {pid} ({program}): {e}"))?;
    Ok(pid)
}

/// The parent pid of `pid`.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()
}

fn call<T>(cri: &Cri, f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    cri.block_on(f)
}

/// The sandbox's CRI state and its containers' states (by id).
pub fn states(cri: &Cri, pod_id: &str) -> Result<(i32, HashMap<String, i32>), String> {
    let st = call(cri, cri.client().pod_sandbox_status(pod_id, false))?;
    let state = st.status.map(|s| s.state).unwrap_or(-1);
    let list = call(cri, cri.client().list_containers(Some(pod_id)))?;
    Ok((state, list.into_iter().map(|c| (c.id, c.state)).collect()))
}

fn state_name(s: i32) -> &'static str {
    match s {
        proto::CONTAINER_CREATED => "CREATED",
        proto::CONTAINER_RUNNING => "RUNNING",
        proto::CONTAINER_EXITED => "EXITED",
        _ => "UNKNOWN",
    }
}

/// Polls until the sandbox is NOTREADY and none of its containers is running or unknown
/// (created-and-never-started counts as down); the time it took from `since`, or an error
/// with the last states after `within`.
pub fn wait_pod_down(cri: &Cri, pod_id: &str, since: Instant, within: Duration) -> Result<Duration, String> {
    let deadline = since + within;
    loop {
        let last = states(cri, pod_id);
        if let Ok((sandbox, containers)) = &last {
            let down = containers.values().all(|s| *s == proto::CONTAINER_EXITED || *s == proto::CONTAINER_CREATED);
            if *sandbox == proto::SANDBOX_NOTREADY && down {
                return Ok(since.elapsed());
            }
        }
        if Instant::now() > deadline {
            let desc = match last {
                Ok((s, c)) => format!(
                    "sandbox {}, containers {:?}",
                    if s == proto::SANDBOX_READY { "READY" } else { "NOTREADY" },
                    c.iter()
                        .map(|(id, s)| format!("{}: {}", &id[..12.min(id.len())], state_name(*s)))
                        .collect::<Vec<_>>()
                ),
                Err(e) => e,
            };
            return Err(format!(
                "the pod was not reported down (sandbox NOTREADY, containers exited) within {within:?}: {desc}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks that `error` names what died and how.
pub fn check_error_names(target: Target, error: &str) -> Result<(), String> {
    let named = target.names().iter().any(|n| error.contains(n));
    if !named || !error.contains(target.how()) {
        return Err(format!(
            "the error does not say that {target} died ({:?} and {:?} expected): {error}",
            target.names(),
            target.how()
        ));
    }
    Ok(())
}

/// StopPodSandbox + RemovePodSandbox (stopping still-running containers first, as the kubelet
/// does), each bounded, then everything of the pod gone ([`Cri::check_pod_gone`]).
pub fn teardown(cri: &Cri, pod: &Pod) -> Result<(), String> {
    let client = cri.client().with_timeout(Duration::from_secs(60));
    for id in cri.containers_of(pod) {
        let running = call(cri, client.container_status(&id, false))
            .is_ok_and(|r| r.status.is_some_and(|s| s.state == proto::CONTAINER_RUNNING));
        if running {
            call(cri, client.stop_container(&id, 2)).map_err(|e| format!("StopContainer {id}: {e}"))?;
        }
    }
    call(cri, client.stop_pod_sandbox(&pod.id)).map_err(|e| format!("StopPodSandbox after the fault: {e}"))?;
    call(cri, client.remove_pod_sandbox(&pod.id)).map_err(|e| format!("RemovePodSandbox after the fault: {e}"))?;
    cri.check_pod_gone(pod)
}

/// A pod config whose agent panics at `stage` when `target` is the agent.
fn pod_config_for(cri: &Cri, name: &str, target: Target, stage: Stage) -> proto::PodSandboxConfig {
    let mut config = cri.pod_config(name);
    if target == Target::Agent {
        config
            .annotations
            .insert(KERNEL_PARAMS_ANNOTATION.into(), format!("podvisor.test_panic={}", stage.agent_panic_point()));
    }
    config
}

/// Waits for a new entry in the manager's bundle directory (not in `before`); its name.
fn wait_new_bundle(cri: &Cri, before: &[String], timeout: Duration, done: &dyn Fn() -> bool) -> Option<String> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && !done() {
        if let Some(n) = bundle_entries(cri).into_iter().find(|e| !e.starts_with('.') && !before.contains(e)) {
            return Some(n);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn bundle_entries(cri: &Cri) -> Vec<String> {
    std::fs::read_dir(cri.bundles_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Waits for `program` serving `id` to exist.
fn wait_process(program: &str, id: &str, timeout: Duration, done: &dyn Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && !done() {
        if !pids_of(program, id).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// Injects `target` at `stage` into a new pod of `cri` and checks what the node sees (see the
/// module documentation); the pod is always torn down and checked for leftovers.
pub fn run_case(cri: &Cri, target: Target, stage: Stage) -> Result<CaseReport, String> {
    let started = Instant::now();
    let name = format!("fault-{}-{}", format!("{target:?}").to_lowercase(), format!("{stage:?}").to_lowercase());
    let mut report = match stage {
        Stage::Booting => booting(cri, &name, target)?,
        _ => after_boot(cri, &name, target, stage)?,
    };
    report.took = started.elapsed();
    Ok(report)
}

fn booting(cri: &Cri, name: &str, target: Target) -> Result<CaseReport, String> {
    let config = pod_config_for(cri, name, target, Stage::Booting);
    cri.prepare_pod(&config);
    let before = bundle_entries(cri);
    let done = std::sync::atomic::AtomicBool::new(false);
    let is_done = || done.load(std::sync::atomic::Ordering::SeqCst);
    let (result, sandbox, killed) = std::thread::scope(|s| {
        let runner = s.spawn(|| {
            let r = call(cri, cri.client().run_pod_sandbox(&config, cri.handler()));
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            (r, Instant::now())
        });
        let sandbox = wait_new_bundle(cri, &before, SETUP_TIMEOUT, &is_done);
        let killed = match (&sandbox, target.program()) {
            (Some(id), Some(program)) => {
                cri.track_id(id);
                if wait_process(program, id, SETUP_TIMEOUT, &is_done) {
                    kill(target, id).map(|pid| Some((pid, Instant::now())))
                } else {
                    Err(format!("no {program} process of sandbox {id} appeared while RunPodSandbox ran"))
                }
            }
            (Some(id), None) => {
                cri.track_id(id);
                Ok(None)
            }
            (None, _) => Err("no sandbox bundle appeared while RunPodSandbox ran".to_string()),
        };
        (runner.join().unwrap(), sandbox, killed)
    });
    let ((result, returned), killed) = (result, killed);
    let sandbox = sandbox.ok_or("no sandbox bundle appeared while RunPodSandbox ran")?;
    let pod = cri.pod_record(&sandbox, &config);
    let outcome = (|| -> Result<CaseReport, String> {
        let killed = killed?;
        let error = match result {
            Ok(id) => return Err(format!("RunPodSandbox succeeded ({id}) although {target} failed during the boot")),
            Err(e) => e,
        };
        check_error_names(target, &error)?;
        // The agent's panic has no outside moment: time the error from the bundle's appearance
        // would include the boot; only a kill has a start.
        let detected = killed.map(|(_, at)| returned.saturating_duration_since(at)).unwrap_or_default();
        if killed.is_some() && detected > EVENT_WITHIN {
            return Err(format!("RunPodSandbox failed only {detected:?} after {target} was killed: {error}"));
        }
        Ok(CaseReport { detected, error: Some(error), took: Duration::ZERO })
    })();
    // A failed RunPodSandbox leaves no pod (or one NOTREADY that stop/remove must take).
    let listed = call(cri, cri.client().list_pod_sandbox())?;
    let mut cleanup = Ok(());
    if let Some(p) = listed.iter().find(|p| p.id == sandbox) {
        if p.state == proto::SANDBOX_READY {
            cleanup = Err(format!("the CRI lists the failed sandbox {sandbox} as READY"));
        }
    }
    let gone = teardown_failed(cri, &pod, listed.iter().any(|p| p.id == sandbox));
    let report = outcome?;
    cleanup?;
    gone?;
    Ok(report)
}

/// Stop + remove of a sandbox the CRI may still list, then the leak check.
fn teardown_failed(cri: &Cri, pod: &Pod, listed: bool) -> Result<(), String> {
    if listed {
        let client = cri.client().with_timeout(Duration::from_secs(60));
        call(cri, client.stop_pod_sandbox(&pod.id)).map_err(|e| format!("StopPodSandbox: {e}"))?;
        call(cri, client.remove_pod_sandbox(&pod.id)).map_err(|e| format!("RemovePodSandbox: {e}"))?;
    }
    cri.check_pod_gone(pod)
}

fn after_boot(cri: &Cri, name: &str, target: Target, stage: Stage) -> Result<CaseReport, String> {
    let config = pod_config_for(cri, name, target, stage);
    let pod = cri.try_run_pod(&config)?;
    let outcome = after_boot_fault(cri, &pod, target, stage);
    let down = teardown(cri, &pod);
    match (outcome, down) {
        (Ok(report), Ok(())) => Ok(report),
        (Err(e), Ok(())) => Err(format!("{e}\n(then stop and remove left nothing)")),
        (Ok(_), Err(d)) => Err(d),
        (Err(e), Err(d)) => Err(format!("{e}\nand then: {d}")),
    }
}

/// Triggers the agent's `StatsContainer` panic with the CRI `ContainerStats` of `id`.
fn trigger_agent_panic(cri: &Cri, id: &str) -> Instant {
    let at = Instant::now();
    let client = cri.client().with_timeout(Duration::from_secs(20));
    let _ = call(cri, client.container_stats(id));
    at
}

/// When the agent of sandbox `id` died: QEMU's exit (the panic powers the guest off), which
/// follows the trigger unless a manager holds the triggering request back.
fn agent_died(id: &str, since: Instant) -> Result<Instant, String> {
    let deadline = since + Duration::from_secs(120);
    while !pids_of("qemu-system", id).is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "the agent did not panic within {:?} of the trigger (QEMU still runs)",
                deadline - since
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Instant::now())
}

fn inject(cri: &Cri, pod: &Pod, target: Target, container: &str) -> Result<Instant, String> {
    if target == Target::Agent {
        let triggered = trigger_agent_panic(cri, container);
        agent_died(&pod.id, triggered)
    } else {
        kill(target, &pod.id)?;
        Ok(Instant::now())
    }
}

fn after_boot_fault(cri: &Cri, pod: &Pod, target: Target, stage: Stage) -> Result<CaseReport, String> {
    let within = if target == Target::Shim { SHIM_EVENT_WITHIN } else { EVENT_WITHIN };
    match stage {
        Stage::Booting => unreachable!(),
        Stage::Creating => {
            let c = cri.container_config("app", &["sleep", "3600"]);
            cri.prepare_container(&pod.config, &c);
            let before = bundle_entries(cri);
            let done = std::sync::atomic::AtomicBool::new(false);
            let is_done = || done.load(std::sync::atomic::Ordering::SeqCst);
            let (result, fault) = std::thread::scope(|s| {
                let runner = s.spawn(|| {
                    let r = (|| {
                        let id = call(cri, cri.client().create_container(&pod.id, &c, &pod.config))
                            .map_err(|e| (None, format!("CreateContainer: {e}")))?;
                        cri.adopt_container(&pod.id, &id);
                        call(cri, cri.client().start_container(&id))
                            .map(|_| id.clone())
                            .map_err(|e| (Some(id), format!("StartContainer: {e}")))
                    })();
                    done.store(true, std::sync::atomic::Ordering::SeqCst);
                    (r, Instant::now())
                });
                let fault = if target == Target::Agent {
                    Ok(Instant::now())
                } else {
                    match wait_new_bundle(cri, &before, SETUP_TIMEOUT, &is_done) {
                        Some(_) => kill(target, &pod.id).map(|_| Instant::now()),
                        None => Err("no container bundle appeared while the container was created".to_string()),
                    }
                };
                (runner.join().unwrap(), fault)
            });
            let at = fault?;
            let ((r, returned), at) = (result, at);
            let error = match r {
                Ok(id) => {
                    // The create won the race: the container must then be reported exited.
                    eprintln!("{target} at {}: the container {id} was created before the fault", Stage::Creating);
                    None
                }
                Err((_, e)) => {
                    check_error_names(target, &e)?;
                    Some(e)
                }
            };
            // The agent's panic point is inside the call: time it from the call's return.
            let since = if target == Target::Agent { returned } else { at };
            let detected = wait_pod_down(cri, &pod.id, since, within)?;
            Ok(CaseReport { detected, error, took: Duration::ZERO })
        }
        Stage::Running => {
            let id = start_container(cri, pod, &["sleep", "3600"])?;
            let at = inject(cri, pod, target, &id)?;
            let detected = wait_pod_down(cri, &pod.id, at, within)?;
            Ok(CaseReport { detected, error: None, took: Duration::ZERO })
        }
        Stage::Exec => {
            let id = start_container(cri, pod, &["sleep", "3600"])?;
            let (result, at) = std::thread::scope(|s| {
                let exec = s.spawn(|| {
                    let client = cri.client().with_timeout(Duration::from_secs(120));
                    let r = call(cri, client.exec_sync(&id, &["sh", "-c", "touch /tmp/exec-started; sleep 60"], 90));
                    (r, Instant::now())
                });
                let started = poll_exec(cri, &id, "/tmp/exec-started");
                let at = started.and_then(|()| inject(cri, pod, target, &id));
                (exec.join().unwrap(), at)
            });
            let at = at?;
            let (r, returned) = result;
            let error = match r {
                Ok(resp) if resp.exit_code == 0 => {
                    return Err(format!("the exec completed with status 0 although {target} failed under it"))
                }
                Ok(resp) => format!("exit status {}", resp.exit_code),
                Err(e) => e,
            };
            let exec_after = returned.saturating_duration_since(at);
            if exec_after > within {
                return Err(format!("ExecSync returned only {exec_after:?} after the fault ({error})"));
            }
            let detected = wait_pod_down(cri, &pod.id, at, within)?;
            Ok(CaseReport { detected, error: Some(error), took: Duration::ZERO })
        }
        Stage::Stopping => {
            let id = start_container(cri, pod, SLOW_STOPPER)?;
            let log = pod.log_path(&cri.container_config("app", SLOW_STOPPER));
            poll_log(&log, "trapped")?;
            let (result, at) = std::thread::scope(|s| {
                let stop = s.spawn(|| {
                    let client = cri.client().with_timeout(Duration::from_secs(120));
                    let r = call(cri, client.stop_container(&id, 90));
                    (r, Instant::now())
                });
                let at = poll_log(&log, "stopping").and_then(|()| {
                    if target == Target::Agent {
                        let triggered = Instant::now();
                        let client = cri.client().with_timeout(Duration::from_secs(20));
                        let _ = call(cri, client.exec_sync(&id, &["true"], 10));
                        agent_died(&pod.id, triggered)
                    } else {
                        inject(cri, pod, target, &id)
                    }
                });
                (stop.join().unwrap(), at)
            });
            let at = at?;
            let (r, returned) = result;
            let stop_after = returned.saturating_duration_since(at);
            if stop_after > within {
                return Err(format!("StopContainer returned only {stop_after:?} after the fault ({r:?})"));
            }
            let detected = wait_pod_down(cri, &pod.id, at, within)?;
            Ok(CaseReport { detected, error: r.err(), took: Duration::ZERO })
        }
    }
}

fn start_container(cri: &Cri, pod: &Pod, args: &[&str]) -> Result<String, String> {
    let c = cri.container_config("app", args);
    cri.prepare_container(&pod.config, &c);
    let id = call(cri, cri.client().create_container(&pod.id, &c, &pod.config))
        .map_err(|e| format!("CreateContainer: {e}"))?;
    cri.adopt_container(&pod.id, &id);
    call(cri, cri.client().start_container(&id)).map_err(|e| format!("StartContainer: {e}"))?;
    Ok(id)
}

/// Polls the container's CRI log until a stdout line is `line`.
fn poll_log(log: &std::path::Path, line: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = crate::cri::cri_log_lines(log, "stdout").unwrap_or_default();
        if lines.iter().any(|l| l == line) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{line:?} did not appear in {} within 60 s: {lines:?}", log.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls (with ExecSync `test -e`) until `marker` exists in container `id`.
fn poll_exec(cri: &Cri, id: &str, marker: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let client = cri.client().with_timeout(Duration::from_secs(30));
        match call(cri, client.exec_sync(id, &["test", "-e", marker], 20)) {
            Ok(r) if r.exit_code == 0 => return Ok(()),
            Ok(_) => {}
            Err(e) if Instant::now() > deadline => return Err(format!("waiting for {marker}: {e}")),
            Err(_) => {}
        }
        if Instant::now() > deadline {
            return Err(format!("{marker} did not appear in container {id} within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `cases` on `cri` one after the other, each caught separately (a failed case does not
/// stop the others); prints one line per case and returns the failures.
pub fn run_cases(cri: &Cri, cases: &[(Target, Stage)]) -> Vec<String> {
    let mut failures = Vec::new();
    for &(target, stage) in cases {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(cri, target, stage)));
        let r = r.unwrap_or_else(|p| {
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or(p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default())
        });
        match r {
            Ok(rep) => eprintln!(
                "FAULT {} {target} at {stage}: ok, seen after {:.2} s (case {:.1} s){}",
                cri.manager(),
                rep.detected.as_secs_f64(),
                rep.took.as_secs_f64(),
                rep.error.map(|e| format!("; error: {}", first_line(&e))).unwrap_or_default()
            ),
            Err(e) => {
                eprintln!("FAULT {} {target} at {stage}: FAILED: {e}", cri.manager());
                failures.push(format!("{target} at {stage}: {e}\n{}", cri.logs()));
            }
        }
    }
    failures
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("");
    if l.len() > 300 {
        format!("{}...", &l[..l.char_indices().nth(300).map_or(l.len(), |(i, _)| i)])
    } else {
        l.to_string()
    }
}

/// The shim's pid for sandbox `id`.
pub fn shim_pid(id: &str) -> Option<u32> {
    pids_of("containerd-shim-kata-v2", id).into_iter().next()
}

/// Open fds and resident set size (KiB) of process `pid`.
pub fn fds_and_rss(pid: u32) -> Option<(usize, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some((fds, rss))
}
