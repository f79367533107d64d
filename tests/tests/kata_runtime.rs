//! `kata-runtime`, the operator CLI, run as a binary: `check` on this host (KVM measured by the
//! probe, TCG in use with the reason), `env --json`, and against a real pod in a private
//! containerd: `exec` through the agent's debug console (enabled by `[agent.kata]
//! debug_console_enabled = true`, refused when it is not), `metrics` from the shim's monitor
//! socket, and `collect`'s archive listing.
//!
//! Prerequisites (a missing one is a failure, never a skip): `cargo build -p podvisor-runtime -p
//! podvisor-shim`, `make guest-image`, `scripts/deps.sh`.
//!
//! Run: `cargo test -p podvisor-tests --test kata_runtime -- --test-threads=1`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use podvisor_tests::containerd::{kata_test_config, require_kata, run_with_timeout, TestContainerd, KATA_RUNTIME};
use podvisor_tests::image;
use podvisor_tests::journal::Journal;

const STATE_TIMEOUT: Duration = Duration::from_secs(90);
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The built `kata-runtime`: `$PODVISOR_KATA_RUNTIME`, or the newer of target/{release,debug}.
fn kata_runtime() -> PathBuf {
    if let Some(p) = std::env::var_os("PODVISOR_KATA_RUNTIME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| podvisor_tests::workspace().join("target"));
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("kata-runtime"))
        .filter_map(|p| std::fs::metadata(&p).and_then(|m| m.modified()).ok().map(|t| (p, t)))
        .max_by_key(|(_, t)| *t)
        .map(|(p, _)| p)
        .unwrap_or_else(|| {
            panic!(
                "{}/{{release,debug}}/kata-runtime is missing: run `cargo build -p podvisor-runtime` first",
                target.display()
            )
        })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A configuration file in a fresh directory, removed on drop (also when the test fails).
struct TempConfig(PathBuf);

impl TempConfig {
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
    }
}

fn config_file(tag: &str, config_text: &str) -> TempConfig {
    let dir = std::env::temp_dir().join(podvisor_tests::unique_id(tag));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("configuration.toml");
    std::fs::write(&f, config_text).unwrap();
    TempConfig(f)
}

fn run(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(kata_runtime());
    cmd.args(args);
    run_with_timeout(&mut cmd, stdin, CLI_TIMEOUT).unwrap_or_else(|e| panic!("kata-runtime {args:?}: {e}"))
}

#[test]
fn check_measures_kvm_and_names_the_accelerator_in_use() {
    let cfg = config_file("krt-check", &kata_test_config(|_| {}));
    let started = std::time::Instant::now();
    let out = run(&["--config", cfg.path(), "check", "--verbose"], None);
    let took = started.elapsed();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "check failed:\n{stdout}\n{}", text(&out.stderr));
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| !l.starts_with("fact ") && l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no {name} line in:\n{stdout}"))
            .to_string()
    };
    let probe = line("kvm-probe");
    let kvm = line("kvm");
    let accel = line("accelerator");
    if Path::new("/sys/module/kvm_pvm").exists() {
        // This machine: a PVM host. The probe's instructions run, but KVM is unusable for a
        // stock guest kernel, and TCG is what VMs get, with the reason.
        assert!(probe.contains("API version 12") && probe.contains("KVM_CAP_MAX_VCPUS"), "{probe}");
        assert!(kvm.contains("unusable") && kvm.contains("kvm_pvm"), "{kvm}");
        assert!(accel.contains("tcg (software emulation)") && accel.contains("PVM host"), "{accel}");
    } else {
        let facts = hypervisor::host::HostFacts::probe();
        if !facts.dev_kvm_openable {
            assert!(kvm.contains("unusable") && accel.contains("tcg"), "{kvm}\n{accel}");
        } else if kvm.ends_with("usable") && !kvm.contains("unusable") {
            assert!(probe.contains("passed") && accel.ends_with("kvm"), "{probe}\n{accel}");
        } else {
            assert!(accel.contains("tcg"), "{accel}");
        }
    }
    assert!(stdout.contains("fact kvm_pvm module"), "--verbose prints the facts:\n{stdout}");
    assert!(stdout.contains("verdict: this host can run podvisor VMs"), "{stdout}");
    eprintln!("kata-runtime check took {took:?}");
}

#[test]
fn check_without_configuration_names_the_fix() {
    let out = run(&["--config", "/nonexistent/podvisor.toml", "check"], None);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("/nonexistent/podvisor.toml"), "{err}");
}

#[test]
fn env_json_parses_and_has_kata_sections() {
    let cfg = config_file("krt-env", &kata_test_config(|_| {}));
    let out = run(&["--config", cfg.path(), "env", "--json"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("env --json is JSON");
    for section in ["Meta", "Runtime", "Hypervisor", "Image", "Kernel", "Initrd", "Agent", "Host"] {
        assert!(v.get(section).is_some(), "no {section} in {v:#}");
    }
    assert_eq!(v["Runtime"]["Config"]["Path"], cfg.path());
    assert!(v["Hypervisor"]["Version"].as_str().unwrap().contains("QEMU"), "{v:#}");
    assert!(v["Kernel"]["Version"].as_str().unwrap().starts_with("6."), "{}", v["Kernel"]);
    assert!(v["Hypervisor"]["VirtioFSDaemonVersion"].as_str().unwrap().contains("virtiofsd"), "{}", v["Hypervisor"]);
    let kvm = &v["Host"]["KVM"];
    assert_eq!(kvm["KvmPvmModule"], Path::new("/sys/module/kvm_pvm").exists());
    if kvm["KvmPvmModule"] == true {
        assert_eq!(kvm["Usable"], false);
        assert_eq!(v["Hypervisor"]["AcceleratorInUse"], "tcg");
    }
    // The TOML form parses too.
    let out = run(&["--config", cfg.path(), "env"], None);
    let t: toml::Table = text(&out.stdout).parse().expect("env is TOML");
    assert!(t.contains_key("Host"));
}

#[test]
fn sandbox_commands_name_a_missing_sandbox() {
    for cmd in ["metrics", "exec"] {
        let out = run(&[cmd, "no-such-sandbox-podvisor"], None);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("no sandbox \"no-such-sandbox-podvisor\""), "{cmd}: {err}");
    }
    let out = run(&["metrics", "../etc"], None);
    assert!(text(&out.stderr).contains("invalid sandbox id"), "{}", text(&out.stderr));
    let out = run(&["collect", "--sandbox", "no-such-sandbox-podvisor", "-o", "/tmp/x.tar.gz"], None);
    assert!(!out.status.success() && text(&out.stderr).contains("no sandbox"), "{}", text(&out.stderr));
    assert!(!Path::new("/tmp/x.tar.gz").exists());
}

/// Starts a `sleep` pod in `ctd` (its sandbox id is the container id).
fn start_pod(ctd: &TestContainerd, tag: &str) -> String {
    let id = ctd.new_id(tag);
    let rootfs = image::busybox_rootfs().display().to_string();
    ctd.ctr_ok(&["run", "-d", "--runtime", KATA_RUNTIME, "--rootfs", &rootfs, &id, "sleep", "1000"]);
    ctd.wait_for_status(&id, "RUNNING", STATE_TIMEOUT);
    id
}

fn stop_pod(ctd: &TestContainerd, id: &str) {
    ctd.ctr_ok(&["task", "kill", "-s", "KILL", id]);
    ctd.wait_for_status(id, "STOPPED", STATE_TIMEOUT);
    ctd.ctr_ok(&["task", "rm", id]);
    ctd.ctr_ok(&["container", "rm", id]);
}

/// With the console enabled: `exec` runs `uname -r` in the guest, `metrics` serves the pod's
/// families, `collect` archives the pod.
#[test]
fn exec_metrics_and_collect_on_a_pod_with_the_debug_console() {
    require_kata("kata-runtime against a pod");
    let config = kata_test_config(|c| {
        let agent = c.entry("agent").or_insert(toml::Table::new().into()).as_table_mut().unwrap();
        let kata = agent.entry("kata").or_insert(toml::Table::new().into()).as_table_mut().unwrap();
        kata.insert("debug_console_enabled".into(), true.into());
    });
    let journal = Journal::start();
    let ctd = TestContainerd::start_with_kata_config(&config);
    let id = start_pod(&ctd, "krt-exec");
    // The shim's records are in the journal before collect reads them.
    let kata = journal.lines(&["-t", "kata", &format!("SANDBOX={id}")], "Start logging virtiofsd");
    assert!(kata.contains("Start logging virtiofsd"), "journalctl -t kata SANDBOX={id}:\n{kata}");

    let out = run(&["exec", &id], Some(b"uname -r; exit\n"));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "exec failed: {}\n{stdout}", text(&out.stderr));
    let host = nix::sys::utsname::uname().unwrap().release().to_string_lossy().into_owned();
    assert!(stdout.contains("6.1.0-56-amd64") && !stdout.contains(&host), "the guest's uname -r: {stdout:?}");
    // Without `exit`, the end of input ends the session (^D to the shell).
    let out = run(&["exec", &id], Some(b"uname -r\n"));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "exec failed: {}\n{stdout}", text(&out.stderr));
    assert!(stdout.contains("6.1.0-56-amd64"), "the guest's uname -r without exit: {stdout:?}");

    let out = run(&["metrics", &id], None);
    let metrics = text(&out.stdout);
    assert!(out.status.success(), "metrics failed: {}", text(&out.stderr));
    for family in ["kata_hypervisor_fds", "kata_shim_", "kata_guest_meminfo"] {
        assert!(metrics.contains(family), "no {family} in:\n{}", &metrics[..metrics.len().min(2000)]);
    }

    let dir = std::env::temp_dir().join(podvisor_tests::unique_id("krt-collect"));
    std::fs::create_dir_all(&dir).unwrap();
    let archive = dir.join("support.tar.gz");
    let cfg = ctd.kata_config().to_str().unwrap().to_string();
    let out = run(&["--config", &cfg, "collect", "--sandbox", &id, "-o", archive.to_str().unwrap()], None);
    assert!(out.status.success(), "collect failed: {}", text(&out.stderr));
    let size = std::fs::metadata(&archive).unwrap().len();
    eprintln!("collect archive for one pod: {size} bytes");
    let mut files = std::collections::BTreeMap::new();
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(&archive).unwrap()));
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut data = String::new();
        e.read_to_string(&mut data).unwrap();
        files.insert(name, data);
    }
    let names: Vec<&String> = files.keys().collect();
    let sb = format!("kata-collect/sandboxes/{id}");
    for want in [
        "kata-collect/MANIFEST".to_string(),
        "kata-collect/env.toml".to_string(),
        "kata-collect/versions.txt".to_string(),
        "kata-collect/check.txt".to_string(),
        "kata-collect/configuration/0-configuration.toml".to_string(),
        format!("{sb}/metrics.txt"),
        format!("{sb}/qemu-cmdline.txt"),
        format!("{sb}/pids"),
    ] {
        assert!(files.contains_key(&want), "{want} missing from {names:?}");
    }
    let kata_lines =
        files.get(&format!("{sb}/journal-kata.txt")).unwrap_or_else(|| panic!("no journal-kata.txt in {names:?}"));
    assert!(kata_lines.contains(&format!("sandbox={id}")), "{kata_lines}");
    let vfs_lines = files
        .get(&format!("{sb}/journal-virtiofsd.txt"))
        .unwrap_or_else(|| panic!("no journal-virtiofsd.txt in {names:?}"));
    assert!(vfs_lines.contains("virtiofsd"), "{vfs_lines}");
    assert!(files[&format!("{sb}/qemu-cmdline.txt")].contains("qemu-system-x86_64"));
    assert!(files[&format!("{sb}/metrics.txt")].contains("kata_hypervisor_fds"));
    let manifest = &files["kata-collect/MANIFEST"];
    for name in files.keys().filter(|n| !n.ends_with("MANIFEST")) {
        assert!(manifest.contains(&format!("\t{name}\n")), "{name} not in MANIFEST:\n{manifest}");
    }
    std::fs::remove_dir_all(&dir).unwrap();

    stop_pod(&ctd, &id);
    ctd.assert_no_leaks(&[&id]);
    drop(journal);
}

/// Without `debug_console_enabled` the guest has no console and `exec` says how to enable it.
#[test]
fn exec_is_refused_when_the_console_is_disabled() {
    require_kata("kata-runtime exec against a pod");
    let ctd = TestContainerd::start();
    let id = start_pod(&ctd, "krt-noexec");
    let out = run(&["exec", &id], Some(b"uname -r; exit\n"));
    let err = text(&out.stderr);
    assert!(!out.status.success(), "exec succeeded without the console: {}", text(&out.stdout));
    assert!(err.contains("debug_console_enabled = true") && err.contains("[agent.kata]"), "{err}");
    stop_pod(&ctd, &id);
    ctd.assert_no_leaks(&[&id]);
}
