//! End-to-end: the container manager restarted while pods run, through containerd's CRI and
//! CRI-O's. The manager is stopped (SIGTERM, as `systemctl restart` does, then SIGKILL, a crash)
//! and started again on the same root, state and socket (`Cri::restart_manager`); the pod's
//! shim and VM live on. After each restart the manager must have reconnected to the shim: the
//! pod is listed READY and its container RUNNING (`crictl pods` / `crictl ps`), exec works,
//! output still reaches the container's log, statistics answer, a new container starts in the
//! pod; and StopPodSandbox + RemovePodSandbox then leave nothing (`Cri::remove_pod`).
//!
//! Run: `cargo test -p podvisor-tests --test restart -- --test-threads=1`.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use podvisor_tests::cri::{cri_log_lines, proto, require_kata, Cri, Manager, Pod};
use podvisor_tests::faults::{fds_and_rss, shim_pid};
use podvisor_tests::{on_both_managers, poll};

/// Prints a line, then runs until SIGTERM.
const APP: &[&str] = &["sh", "-c", "echo started; trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"];

/// Everything a node does with a running pod, after a restart (`round` names it in messages).
fn check_pod_works(cri: &Cri, pod: &Pod, app: &str, log: &std::path::Path, round: &str) {
    let pods = cri.block_on(cri.client().list_pod_sandbox()).unwrap_or_else(|e| panic!("{round}: ListPodSandbox: {e}"));
    let listed = pods.iter().find(|p| p.id == pod.id);
    assert!(
        listed.is_some_and(|p| p.state == proto::SANDBOX_READY),
        "{round}: the pod is not listed READY: {listed:?}\n{}",
        cri.logs()
    );
    let containers = cri.list_containers(pod);
    let c = containers.iter().find(|c| c.id == app);
    assert!(
        c.is_some_and(|c| c.state == proto::CONTAINER_RUNNING),
        "{round}: the container is not listed RUNNING: {c:?}\n{}",
        cri.logs()
    );
    let st = cri.pod_status(pod);
    assert_eq!(st.status.as_ref().map(|s| s.state), Some(proto::SANDBOX_READY), "{round}: PodSandboxStatus: {st:?}");
    assert_eq!(cri.container_status(app).state, proto::CONTAINER_RUNNING, "{round}: ContainerStatus");

    let out = cri.exec_ok(app, &["echo", round]);
    assert_eq!(out.trim(), round, "{round}: ExecSync output");

    // Output of the running container still reaches its log (the stdio pump and the manager's
    // log writer were reconnected).
    let marker = format!("log-{round}");
    cri.exec_ok(app, &["sh", "-c", &format!("echo {marker} > /proc/1/fd/1")]);
    poll(Duration::from_secs(20), &format!("{round}: {marker} in the container log"), || {
        let lines = cri_log_lines(log, "stdout")?;
        lines.iter().any(|l| l == &marker).then_some(()).ok_or_else(|| format!("log lines: {lines:?}"))
    });

    let stats = cri
        .block_on(cri.client().container_stats(app))
        .unwrap_or_else(|e| panic!("{round}: ContainerStats: {e}\n{}", cri.logs()));
    let mem = stats.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref()).map_or(0, |v| v.value);
    assert!(mem > 0, "{round}: ContainerStats has no memory working set: {stats:?}");
}

fn restart(m: Manager) {
    require_kata("a restart under VM pods");
    let mut cri = Cri::start(m);
    let pod = cri.run_pod(&cri.pod_config("restart"));
    let config = cri.container_config("app", APP);
    let app = cri.run_container(&pod, &config);
    let log = pod.log_path(&config);
    poll(Duration::from_secs(20), "the first line in the container log", || {
        let lines = cri_log_lines(&log, "stdout")?;
        lines.iter().any(|l| l == "started").then_some(()).ok_or_else(|| format!("log lines: {lines:?}"))
    });
    let shim = shim_pid(&pod.id).expect("the pod's shim process");
    let before = fds_and_rss(shim);

    for (round, signal) in [("sigterm", Signal::SIGTERM), ("sigkill", Signal::SIGKILL)] {
        let t = Instant::now();
        let ready = cri.restart_manager(signal).unwrap_or_else(|e| panic!("restart of {m} with {signal}: {e}"));
        eprintln!("{m} restarted with {signal}: CRI ready after {:.2} s", ready.as_secs_f64());
        check_pod_works(&cri, &pod, &app, &log, round);
        eprintln!("{m} after {signal}: pod checked in {:.2} s", t.elapsed().as_secs_f64());
        assert_eq!(shim_pid(&pod.id), Some(shim), "{round}: the pod's shim changed (the manager started another)");
    }

    // A new container in the pod, through the reconnected shim.
    let second = cri.run_container(&pod, &cri.container_config("second", APP));
    assert_eq!(cri.exec_ok(&second, &["echo", "second"]).trim(), "second", "exec in a container made after restarts");
    eprintln!("shim {shim} fds and RSS (KiB): before {before:?}, after {:?}", fds_and_rss(shim));

    cri.remove_pod(&pod);
}

on_both_managers!(restart_containerd, restart_crio, restart);
