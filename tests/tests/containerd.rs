//! End-to-end: a real containerd 1.6.20 (Debian's, private to each test) runs busybox containers
//! through `containerd-shim-kata-v2`, driven with the real `ctr` CLI; and the shim driven exactly
//! as CRI-O 1.36 drives it (`start` with CRI-O's argv and environment, then ttrpc). Every test
//! ends by checking that nothing of its own ids is left: processes (shim, QEMU, virtiofsd,
//! vhost-device-vsock), mounts, `/run/kata-containers/` entries, cgroups, bundles, sockets.
//!
//! Environment:
//! - `PODVISOR_TEST_RUNTIME` (default `io.containerd.kata.v2`): the runtime `ctr run --runtime`
//!   uses. `io.containerd.runc.v2` validates the harness with containerd's own runc shim; the
//!   tests that only make sense with our shim (kata configuration errors, CRI-O's calls) then
//!   FAIL with "needs io.containerd.kata.v2", they never pass silently. Under runc the kernel is
//!   the host's, and `--rootfs` containers get `--env PATH=...` (see [`run_args`]).
//! - `PODVISOR_SHIM`: the shim binary to test instead of `target/{release,debug}/containerd-shim-kata-v2`.
//!
//! Prerequisites (a missing one is a failure, never a skip): `scripts/deps.sh` (containerd,
//! runc, busybox-static), `make guest-image`, `cargo build -p podvisor-shim`.
//!
//! Run: `cargo test -p podvisor-tests --test containerd -- --test-threads=2`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use podvisor_tests::containerd::{
    kata_test_config, qemu_section, require_kata, run_with_timeout, runtime_is_kata, shim_binary, TestContainerd,
    KATA_RUNTIME,
};
use podvisor_tests::crio::{crio_start, shim_command, task_call, FifoReader};
use podvisor_tests::journal::Journal;
use podvisor_tests::{image, leaks, unique_id};

/// How long a task may take to reach a state (a VM boots in a few seconds even under TCG).
const STATE_TIMEOUT: Duration = Duration::from_secs(90);

fn host_kernel() -> String {
    nix::sys::utsname::uname().unwrap().release().to_string_lossy().into_owned()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `ctr run <flags> --runtime <runtime> --rootfs <busybox rootfs> <id> <cmd...>`.
///
/// `ctr run --rootfs` sends a spec without `process.env`. runc resolves `argv[0]` with Go's
/// `exec.LookPath` on that empty `PATH` and fails ("executable file not found in $PATH"), so
/// under runc we add `--env PATH=...`. Under kata we send exactly what the issue says: the agent
/// must resolve a bare command without `PATH` the way `execvp` does (`/bin:/usr/bin`), as Kata's
/// agent does.
fn run_args(ctd: &TestContainerd, flags: &[&str], id: &str, cmd: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["run".into()];
    a.extend(flags.iter().map(|s| s.to_string()));
    a.extend(["--runtime".into(), ctd.runtime().to_string()]);
    if !runtime_is_kata() {
        a.extend(["--env".into(), "PATH=/usr/sbin:/usr/bin:/sbin:/bin".into()]);
    }
    a.extend(["--rootfs".into(), image::busybox_rootfs().display().to_string(), id.to_string()]);
    a.extend(cmd.iter().map(|s| s.to_string()));
    a
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Starts `sleep 1000` detached and waits until it runs.
fn start_sleeper(ctd: &TestContainerd, id: &str) {
    ctd.ctr_ok(&strs(&run_args(ctd, &["-d"], id, &["sleep", "1000"])));
    ctd.wait_for_status(id, "RUNNING", STATE_TIMEOUT);
}

/// SIGKILLs task `id`, waits for STOPPED, removes task and container.
fn kill_and_remove(ctd: &TestContainerd, id: &str) {
    ctd.ctr_ok(&["task", "kill", "-s", "KILL", id]);
    ctd.wait_for_status(id, "STOPPED", STATE_TIMEOUT);
    ctd.ctr_ok(&["task", "rm", id]);
    ctd.ctr_ok(&["container", "rm", id]);
}

fn assert_guest_kernel(ctd: &TestContainerd, out: &std::process::Output) {
    assert!(out.status.success(), "ctr run failed: {}", ctd.explain(out));
    let guest = text(&out.stdout).trim().to_string();
    assert!(!guest.is_empty() && !guest.contains(char::is_whitespace), "uname -r printed {guest:?}");
    if runtime_is_kata() {
        assert_ne!(guest, host_kernel(), "the container saw the host's kernel: it did not run in a VM");
    } else {
        assert_eq!(guest, host_kernel(), "runc containers share the host kernel");
    }
}

#[test]
fn run_with_rootfs_prints_the_guest_kernel() {
    let ctd = TestContainerd::start();
    let id = ctd.new_id("uname");
    let out = ctd.ctr(&strs(&run_args(&ctd, &["--rm"], &id, &["uname", "-r"])));
    assert_guest_kernel(&ctd, &out);
    ctd.assert_no_leaks(&[&id]);
}

#[test]
fn run_imported_image_prints_the_guest_kernel() {
    let ctd = TestContainerd::start();
    let img = image::busybox();
    let imported = ctd.ctr_ok(&["image", "import", &img.archive.display().to_string()]);
    let listed = ctd.ctr_ok(&["image", "ls", "-q"]);
    assert!(listed.lines().any(|l| l.trim() == img.reference), "{} not imported: {imported}\n{listed}", img.reference);
    let id = ctd.new_id("image");
    let out = ctd.ctr(&["run", "--rm", "--runtime", ctd.runtime(), img.reference, &id, "uname", "-r"]);
    assert_guest_kernel(&ctd, &out);
    // The image's own command (`sh`) and environment (PATH) reach the container.
    let id2 = ctd.new_id("image-env");
    let out = ctd.ctr(&["run", "--rm", "--runtime", ctd.runtime(), img.reference, &id2, "sh", "-c", "echo $PATH"]);
    assert!(out.status.success(), "{}", ctd.explain(&out));
    assert_eq!(text(&out.stdout).trim(), image::IMAGE_PATH_ENV.trim_start_matches("PATH="));
    ctd.assert_no_leaks(&[&id, &id2]);
}

#[test]
fn exit_code_of_the_container_is_ctrs() {
    let ctd = TestContainerd::start();
    let id = ctd.new_id("exit3");
    let out = ctd.ctr(&strs(&run_args(&ctd, &["--rm"], &id, &["sh", "-c", "exit 3"])));
    assert_eq!(out.status.code(), Some(3), "{}", ctd.explain(&out));
    ctd.assert_no_leaks(&[&id]);
}

/// The container's init is PID 1 of its PID namespace, which the kernel protects from signals
/// it sends itself (`sh -c 'kill -9 $$'` just exits 0 there, under runc as in a guest). So the
/// init is killed from outside (`ctr task kill -s KILL`) while `ctr run` waits attached; an exec
/// killing itself is in `exec_output_exit_code_stdin_tty_and_signals`.
#[test]
fn init_killed_by_sigkill_exits_137() {
    let ctd = TestContainerd::start();
    let id = ctd.new_id("kill9");
    let mut attached = ctd.spawn_ctr(&strs(&run_args(&ctd, &["--rm"], &id, &["sleep", "1000"])));
    let deadline = Instant::now() + STATE_TIMEOUT;
    while ctd.task_status(&id).as_deref() != Some("RUNNING") {
        if !attached.running() {
            let out = attached.wait(Duration::from_secs(1)).unwrap();
            panic!("ctr run ended before its task ran: {}", ctd.explain(&out));
        }
        assert!(Instant::now() < deadline, "task {id} not RUNNING after {STATE_TIMEOUT:?}\n{}", ctd.logs_tail(40));
        std::thread::sleep(Duration::from_millis(100));
    }
    ctd.ctr_ok(&["task", "kill", "-s", "KILL", &id]);
    let out = attached.wait(STATE_TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", ctd.logs_tail(40)));
    assert_eq!(out.status.code(), Some(137), "{}", ctd.explain(&out));
    ctd.assert_no_leaks(&[&id]);
}

/// `ctr run -d`, `ctr task kill -s TERM`, the task stops (STOPPED in `ctr task ls`; its exit
/// status 143 shows in `ctr task rm`'s warning), then `ctr task rm` and `ctr container rm`.
/// A PID 1 without a handler ignores SIGTERM, so the init traps it.
#[test]
fn detached_task_stops_on_sigterm_and_is_removed() {
    let ctd = TestContainerd::start();
    let id = ctd.new_id("term");
    ctd.ctr_ok(&strs(&run_args(&ctd, &["-d"], &id, &["sh", "-c", "trap 'exit 143' TERM; sleep 1000 & wait"])));
    ctd.wait_for_status(&id, "RUNNING", STATE_TIMEOUT);
    let pid = ctd.tasks().into_iter().find(|t| t.id == id).unwrap().pid;
    assert!(pid > 0, "the task has no pid");
    // The shell may not have installed its trap yet when the task turns RUNNING (a slow TCG
    // guest): a PID 1 ignores SIGTERM until then, so repeat the signal until the task stops.
    let deadline = Instant::now() + STATE_TIMEOUT;
    while ctd.task_status(&id).as_deref() != Some("STOPPED") {
        assert!(
            Instant::now() < deadline,
            "task {id} did not stop on SIGTERM within {STATE_TIMEOUT:?}\n{}",
            ctd.logs_tail(40)
        );
        let kill = ctd.ctr(&["task", "kill", "-s", "TERM", &id]);
        assert!(kill.status.success() || ctd.task_status(&id).as_deref() == Some("STOPPED"), "{}", ctd.explain(&kill));
        std::thread::sleep(Duration::from_secs(1));
    }
    let rm = ctd.ctr(&["task", "rm", &id]);
    assert!(rm.status.success(), "{}", ctd.explain(&rm));
    assert!(text(&rm.stderr).contains("exit code 143"), "exit status of the task: {}", ctd.explain(&rm));
    ctd.ctr_ok(&["container", "rm", &id]);
    assert!(!ctd.containers().contains(&id));
    ctd.assert_no_leaks(&[&id]);
}

#[test]
fn exec_output_exit_code_stdin_tty_and_signals() {
    let ctd = TestContainerd::start();
    let id = ctd.new_id("exec");
    start_sleeper(&ctd, &id);

    let out = ctd.ctr(&["task", "exec", "--exec-id", "e1", &id, "sh", "-c", "echo out; echo err >&2; exit 5"]);
    assert_eq!(out.status.code(), Some(5), "{}", ctd.explain(&out));
    assert_eq!(text(&out.stdout), "out\n", "{}", ctd.explain(&out));
    assert!(text(&out.stderr).contains("err\n"), "{}", ctd.explain(&out));

    // containerd 1.6's `ctr task exec` has no -i: it always forwards its stdin.
    let out = ctd.ctr_stdin(&["task", "exec", "--exec-id", "e2", &id, "cat"], b"hi\n");
    assert!(out.status.success(), "{}", ctd.explain(&out));
    assert_eq!(text(&out.stdout), "hi\n", "{}", ctd.explain(&out));

    let tty = ctd.ctr_tty(&["task", "exec", "-t", "--exec-id", "e3", &id, "tty"]);
    assert!(tty.status.success(), "ctr task exec -t: {}: {}\n{}", tty.status, tty.output, ctd.logs_tail(40));
    assert!(tty.output.contains("/dev/pts/"), "tty printed {:?}", tty.output);

    let out = ctd.ctr(&["task", "exec", "--exec-id", "e4", &id, "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "an exec killed by SIGKILL: {}", ctd.explain(&out));

    // Exec ids are released: the same id again works.
    let out = ctd.ctr(&["task", "exec", "--exec-id", "e1", &id, "true"]);
    assert!(out.status.success(), "{}", ctd.explain(&out));

    kill_and_remove(&ctd, &id);
    ctd.assert_no_leaks(&[&id]);
}

#[test]
fn pause_resume_ps_and_metrics() {
    let ctd = TestContainerd::start();
    let id = ctd.new_id("pause");
    start_sleeper(&ctd, &id);

    ctd.ctr_ok(&["task", "pause", &id]);
    assert_eq!(ctd.task_status(&id).as_deref(), Some("PAUSED"));
    ctd.ctr_ok(&["task", "resume", &id]);
    assert_eq!(ctd.task_status(&id).as_deref(), Some("RUNNING"));

    let ps = ctd.ctr_ok(&["task", "ps", &id]);
    let pids: Vec<u32> = ps.lines().skip(1).filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
    assert!(!pids.is_empty() && pids.iter().all(|p| *p > 0), "ctr task ps listed no pid:\n{ps}");

    // cgroup v1 metrics print memory.usage_in_bytes, cgroup v2 metrics memory.usage.
    let metrics = ctd.ctr_ok(&["task", "metrics", &id]);
    let usage = metrics
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            matches!(f.next(), Some("memory.usage_in_bytes" | "memory.usage"))
                .then(|| f.next()?.parse::<u64>().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no memory usage in ctr task metrics:\n{metrics}"));
    assert!(usage > 0, "memory usage is 0:\n{metrics}");

    kill_and_remove(&ctd, &id);
    ctd.assert_no_leaks(&[&id]);
}

#[test]
fn output_written_just_before_exit_arrives_complete() {
    let ctd = TestContainerd::start();
    let id = ctd.new_id("output");
    let out = ctd.ctr(&strs(&run_args(
        &ctd,
        &["--rm"],
        &id,
        &["sh", "-c", r#"head -c 102400 /dev/zero | tr "\0" a; exit 0"#],
    )));
    assert!(out.status.success(), "{}", ctd.explain(&out));
    assert_eq!(out.stdout.len(), 102400, "bytes of output (stderr: {})", text(&out.stderr));
    assert!(out.stdout.iter().all(|b| *b == b'a'), "output corrupted");
    ctd.assert_no_leaks(&[&id]);
}

/// A configuration error reaches `ctr` (stderr) naming each of `expect` (and, with
/// `names_file`, the configuration file's path); nothing is left.
fn assert_config_error(edit: impl FnOnce(&mut toml::Table), expect: &[&str], names_file: bool, tag: &str) {
    require_kata("a configuration error of our shim");
    let ctd = TestContainerd::start_with_kata_config(&kata_test_config(edit));
    let id = ctd.new_id(tag);
    let out = ctd.ctr(&strs(&run_args(&ctd, &["--rm"], &id, &["true"])));
    assert!(!out.status.success(), "ctr run succeeded with a broken configuration: {}", ctd.explain(&out));
    let err = text(&out.stderr);
    let file = ctd.kata_config().display().to_string();
    for e in expect.iter().copied().chain(names_file.then_some(file.as_str())) {
        assert!(err.contains(e), "the error does not name {e:?}: {}", ctd.explain(&out));
    }
    assert!(!ctd.containers().contains(&id), "ctr run --rm left container {id}");
    ctd.assert_no_leaks(&[&id]);
}

#[test]
fn invalid_config_value_is_named_with_its_file() {
    assert_config_error(
        |c| {
            qemu_section(c).insert("default_memory".into(), "lots".into());
        },
        &["default_memory"],
        true,
        "badmem",
    );
}

#[test]
fn missing_guest_kernel_is_named() {
    let missing = format!("/nonexistent/podvisor-test-{}/vmlinux.container", std::process::id());
    let m = missing.clone();
    assert_config_error(
        move |c| {
            qemu_section(c).insert("kernel".into(), m.into());
        },
        &[&missing],
        false,
        "nokernel",
    );
}

#[test]
fn missing_rootfs_fails_and_leaves_nothing() {
    let ctd = TestContainerd::start();
    let id = ctd.new_id("norootfs");
    let missing = format!("/nonexistent/podvisor-rootfs-{id}");
    let mut args = vec!["run", "--rm", "--runtime", ctd.runtime(), "--rootfs", &missing, &id, "true"];
    if !runtime_is_kata() {
        args.insert(4, "--env=PATH=/bin");
    }
    let out = ctd.ctr(&args);
    assert!(!out.status.success(), "ctr run succeeded without a rootfs: {}", ctd.explain(&out));
    assert!(text(&out.stderr).contains(&missing), "the error does not name the rootfs: {}", ctd.explain(&out));
    assert!(!ctd.containers().contains(&id), "ctr run --rm left container {id}");
    ctd.assert_no_leaks(&[&id]);
}

/// The shim dies (SIGKILL) under a running task: containerd runs `<shim> ... delete`, which must
/// stop what the dead shim left (for our shim: the VM); `ctr task rm -f` and `ctr container rm`
/// then leave nothing.
#[test]
fn killed_shim_is_cleaned_up_by_delete() {
    let ctd = TestContainerd::start();
    let id = ctd.new_id("shimkill");
    // ctr's FIFOs go to the private directory: `ctr task rm` removes them only when it finds the
    // task, and containerd may have deleted it already (after the shim's `delete`).
    let fifo_dir = format!("--fifo-dir={}", ctd.dir().join("fifo").display());
    ctd.ctr_ok(&strs(&run_args(&ctd, &["-d", &fifo_dir], &id, &["sleep", "1000"])));
    ctd.wait_for_status(&id, "RUNNING", STATE_TIMEOUT);
    let shims = ctd.shim_pids(&id);
    assert_eq!(shims.len(), 1, "one shim process serves {id}: {shims:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shims[0] as i32), nix::sys::signal::Signal::SIGKILL).unwrap();

    // containerd notices the closed connection and cleans up by itself (running `<shim> delete`);
    // `task rm -f` then finds the task gone, or finishes the job if containerd has not yet.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctd.task_status(&id).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let rm = ctd.ctr(&["task", "rm", "-f", &id]);
    let err = text(&rm.stderr);
    assert!(rm.status.success() || err.contains("not found"), "ctr task rm -f: {}", ctd.explain(&rm));
    ctd.ctr_ok(&["container", "rm", &id]);
    if !runtime_is_kata() {
        // containerd 1.6's runc shim leaves a killed daemon's socket until the id is reused (its
        // `delete` does not remove it); ours must remove it.
        let sock = ctd.shim_socket(&id);
        eprintln!("runc shim: removing the killed daemon's socket {} (known runc-shim 1.6 behaviour)", sock.display());
        let _ = fs::remove_file(sock);
    }
    ctd.assert_no_leaks(&[&id]);
}

// ---------------------------------------------------------------------------------------------
// CRI-O: the shim as CRI-O 1.36 calls it (docs: shared client-behaviour.md §2).

#[test]
fn crio_version_and_features_probes_answer_and_exit() {
    require_kata("CRI-O's probes of our shim");
    let shim = shim_binary();
    let dir = std::env::temp_dir();
    let config = dir.join(format!("{}.toml", unique_id("probe")));
    fs::write(&config, kata_test_config(|_| {})).unwrap();

    let started = Instant::now();
    let v = run_with_timeout(shim_command(&shim, &dir, &config).arg("--version"), None, Duration::from_secs(10));
    let f = run_with_timeout(shim_command(&shim, &dir, &config).arg("features"), None, Duration::from_secs(10));
    fs::remove_file(&config).unwrap();
    let v = v.unwrap_or_else(|e| panic!("--version: {e}"));
    let f = f.unwrap_or_else(|e| panic!("features: {e}"));
    assert!(v.status.success(), "--version: {v:?}");
    let version = text(&v.stdout) + &text(&v.stderr);
    assert!(version.contains(KATA_RUNTIME), "--version does not name {KATA_RUNTIME}: {version}");
    assert!(f.status.success(), "features: {f:?}");
    let features: serde_json::Value =
        serde_json::from_slice(&f.stdout).unwrap_or_else(|e| panic!("features is not JSON ({e}): {}", text(&f.stdout)));
    assert!(features.is_object(), "features: {features}");
    // CRI-O refuses a CRI recursive_read_only mount unless the handler lists `rro`.
    let options = features["mountOptions"].as_array().unwrap_or_else(|| panic!("no mountOptions: {features}"));
    for want in ["rro", "rbind", "ro", "rshared", "rslave"] {
        assert!(options.iter().any(|o| o == want), "mountOptions lacks {want}: {features}");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "the probes took {:?}", started.elapsed());
}

/// Cleans up after the CRI-O test whatever happens: kills the processes (shim, VM, daemons)
/// that still name the id (a failed test leaves them), unmounts what names it, and removes the
/// test's directory.
struct CrioDir(PathBuf, String);

impl Drop for CrioDir {
    fn drop(&mut self) {
        leaks::force_cleanup(&[&self.1], None);
        let sock = leaks::shim_socket("", "default", &self.1);
        if sock.exists() {
            eprintln!("removing the shim socket {} left behind", sock.display());
            let _ = fs::remove_file(sock);
        }
        leaks::unmount_under(&self.0);
        if let Err(e) = leaks::remove_tree(&self.0) {
            eprintln!("{}: {e}", self.0.display());
        }
    }
}

/// An OCI spec as CRI-O would pass for an infra container: `ctr oci spec` (containerd's default
/// spec) with our process, an absolute, already mounted `root.path`, and CRI-O's annotations.
fn crio_spec(id: &str, rootfs: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(podvisor_tests::containerd::CTR).args(["oci", "spec"]).output().expect("ctr oci spec");
    assert!(out.status.success(), "ctr oci spec: {out:?}");
    let mut spec: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ctr oci spec prints JSON");
    spec["process"]["args"] = serde_json::json!(args);
    spec["process"]["env"] = serde_json::json!([image::IMAGE_PATH_ENV]);
    spec["process"]["terminal"] = serde_json::json!(false);
    spec["root"] = serde_json::json!({ "path": rootfs, "readonly": true });
    spec["hostname"] = serde_json::json!("crio-test");
    spec["linux"]["cgroupsPath"] = serde_json::json!(format!("/crio-{id}"));
    spec["annotations"] = serde_json::json!({
        "io.kubernetes.cri-o.SandboxID": id,
        "io.kubernetes.cri-o.ContainerID": id,
        "io.kubernetes.cri-o.ContainerType": "sandbox",
        "io.kubernetes.cri-o.SandboxName": "k8s_POD_podvisor-test_default_0",
        "io.container.manager": "cri-o",
    });
    spec
}

#[test]
fn crio_start_create_wait_state_delete_shutdown() {
    require_kata("driving our shim as CRI-O does");
    let shim = shim_binary();
    let tag = unique_id("crio");
    let id: String = {
        use sha2::Digest;
        sha2::Sha256::digest(tag.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    };
    let work = CrioDir(std::env::temp_dir().join(&tag), id.clone());
    let rootfs = work.0.join("rootfs");
    let bundle = work.0.join("bundle");
    let io = work.0.join("io");
    for d in [&rootfs, &bundle, &io] {
        fs::create_dir_all(d).unwrap();
    }
    // CRI-O hands over a rootfs it has already mounted (overlay); a bind mount stands for it.
    nix::mount::mount(
        Some(&image::busybox_rootfs()),
        &rootfs,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind mount of the busybox rootfs");
    let config = work.0.join("configuration.toml");
    fs::write(&config, kata_test_config(|_| {})).unwrap();
    let spec = crio_spec(&id, &rootfs, &["sh", "-c", "echo crio-ok; exit 7"]);
    fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    fs::write(bundle.join("hostname"), "crio-test\n").unwrap();
    let log = FifoReader::open(&bundle.join("log"));
    let stdout = FifoReader::open(&io.join(format!("{id}-stdout")));
    let stderr = FifoReader::open(&io.join(format!("{id}-stderr")));

    // start: CRI-O's argv (note the empty -address), environment, cwd and stdin; stdout and
    // stderr on one pipe, read to EOF (Go's CombinedOutput); one address, also in the bundle.
    let address = crio_start(&shim, &config, &bundle, &id).unwrap_or_else(|e| panic!("{e}\nlog: {}", log.so_far()));
    let daemons: Vec<u32> = leaks::processes()
        .into_iter()
        .filter(|p| p.argv0.contains("containerd-shim") && leaks::mentions(&p.cmdline, &id))
        .map(|p| p.pid)
        .collect();
    assert!(!daemons.is_empty(), "no shim daemon names {id} after start");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let result: Result<(), String> = rt.block_on(async {
        use containerd_shim_protos::api;
        let client =
            ttrpc::asynchronous::Client::connect(&address).await.map_err(|e| format!("connect {address}: {e}"))?;

        let mut create = api::CreateTaskRequest::new();
        create.id = id.clone();
        create.bundle = bundle.display().to_string();
        create.stdout = io.join(format!("{id}-stdout")).display().to_string();
        create.stderr = io.join(format!("{id}-stderr")).display().to_string();
        let created: api::CreateTaskResponse =
            task_call(&client, "Create", &create, false, Some(Duration::from_secs(120))).await?;

        let mut start = api::StartRequest::new();
        start.id = id.clone();
        let started: api::StartResponse =
            task_call(&client, "Start", &start, false, Some(Duration::from_secs(120))).await?;
        if started.pid != created.pid {
            return Err(format!("Start returned pid {} but Create {}", started.pid, created.pid));
        }

        let mut wait = api::WaitRequest::new();
        wait.id = id.clone();
        let waited: api::WaitResponse =
            task_call(&client, "Wait", &wait, false, Some(Duration::from_secs(120))).await?;
        if waited.exit_status != 7 {
            return Err(format!("Wait: exit_status {} instead of 7", waited.exit_status));
        }
        if waited.exited_at.seconds <= 0 {
            return Err(format!("Wait: exited_at {:?}", waited.exited_at));
        }

        let mut state = api::StateRequest::new();
        state.id = id.clone();
        let st: api::StateResponse = task_call(&client, "State", &state, false, Some(Duration::from_secs(120))).await?;
        if st.status.enum_value() != Ok(api::Status::STOPPED) || st.exit_status != 7 {
            return Err(format!("State: {:?} exit_status {} instead of STOPPED 7", st.status, st.exit_status));
        }

        let mut delete = api::DeleteRequest::new();
        delete.id = id.clone();
        let deleted: api::DeleteResponse =
            task_call(&client, "Delete", &delete, false, Some(Duration::from_secs(120))).await?;
        if deleted.exit_status != 7 {
            return Err(format!("Delete: exit_status {} instead of 7", deleted.exit_status));
        }

        let mut shutdown = api::ShutdownRequest::new();
        shutdown.id = id.clone();
        match task_call::<_, api::Empty>(&client, "Shutdown", &shutdown, false, Some(Duration::from_secs(120))).await {
            Ok(_) => {}
            // The shim may exit before its answer leaves: containerd and CRI-O tolerate that.
            Err(e) if e.contains("closed") || e.contains("eof") || e.contains("socket") => {}
            Err(e) => return Err(e),
        }
        Ok(())
    });
    drop(rt);
    let out = stdout.finish();
    let err = stderr.finish();
    let gone = leaks::settle(leaks::GRACE, || {
        daemons.iter().filter(|p| podvisor_tests::alive(**p)).map(|p| p.to_string()).collect()
    });
    let shim_log = log.finish();
    if let Err(e) = result {
        panic!("{e}\ncontainer stdout: {out:?}\nstderr: {err:?}\nshim log:\n{shim_log}");
    }
    assert_eq!(out, "crio-ok\n", "container stdout (stderr: {err:?})");
    assert!(gone.is_empty(), "the shim daemon did not exit after Shutdown: {gone:?}\nshim log:\n{shim_log}");
    leaks::unmount_under(&work.0);
    leaks::assert_no_leaks(&[&id], Some(&work.0));
    let sock = leaks::shim_socket("", "default", &id);
    assert!(!sock.exists(), "the shim left its socket {}", sock.display());
}

/// The shim logs to the journal as `kata` with Kata's fields, relays QEMU's stderr between
/// `Start logging QEMU (qemuPid=N)` and `Stop logging QEMU (qemuPid=N)`, logs guest console
/// lines as `reading guest console`; virtiofsd logs as `virtiofsd`.
#[test]
fn logs_reach_the_journal_as_kata_and_virtiofsd() {
    require_kata("the journal test");
    let journal = Journal::start();
    let since = format!("@{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs());
    let ctd = TestContainerd::start();
    let id = ctd.new_id("journal");
    let out = ctd.ctr(&strs(&run_args(&ctd, &["--rm"], &id, &["true"])));
    assert!(out.status.success(), "{}", ctd.explain(&out));
    let sandbox = format!("SANDBOX={id}");
    let kata = journal.lines(&["-t", "kata", &sandbox], "Stop logging QEMU");
    let qemu_pid = kata
        .lines()
        .find_map(|l| l.split("Start logging QEMU (qemuPid=").nth(1)?.split(')').next()?.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no `Start logging QEMU (qemuPid=N)` in journalctl -t kata {sandbox}:\n{kata}"));
    assert!(kata.contains(&format!("Stop logging QEMU (qemuPid={qemu_pid})")), "{kata}");
    for want in
        ["name=containerd-shim-v2", &format!("sandbox={id}"), "subsystem=qemu", "reading guest console", "level=info"]
    {
        assert!(kata.contains(want), "journalctl -t kata {sandbox} lacks {want:?}:\n{kata}");
    }
    let vfs_pid = kata
        .lines()
        .find_map(|l| l.split("Start logging virtiofsd (virtiofsdPid=").nth(1)?.split(')').next()?.parse::<u32>().ok())
        .unwrap_or_else(|| {
            panic!("no `Start logging virtiofsd (virtiofsdPid=N)` in journalctl -t kata {sandbox}:\n{kata}")
        });
    let pid_match = format!("_PID={vfs_pid}");
    let vfs = journal.lines(&["-t", "virtiofsd", &pid_match], "\n");
    assert!(!vfs.trim().is_empty(), "journalctl -t virtiofsd {pid_match} shows nothing");
    // Every record the shim wrote since the test began carries its sandbox as a field, so
    // `journalctl -t kata SANDBOX=<id>` finds all of a pod's records (other tests' shims may
    // write at the same time: they carry theirs).
    let json = journal.lines(&["-t", "kata", "--since", &since, "-o", "json"], &format!("\"SANDBOX\":\"{id}\""));
    let mut ours = 0;
    for line in json.lines().filter(|l| !l.trim().is_empty()) {
        let rec: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("journal JSON {line:?}: {e}"));
        let sandbox = rec["SANDBOX"].as_str().unwrap_or_else(|| panic!("a kata record without SANDBOX: {line}"));
        assert!(!sandbox.is_empty(), "a kata record with an empty SANDBOX: {line}");
        ours += usize::from(sandbox == id);
    }
    assert!(ours >= 5, "only {ours} records with SANDBOX={id}:\n{json}");
    ctd.assert_no_leaks(&[&id]);
}
