//! End-to-end: Kata's `io.katacontainers.config.*` pod annotations through the CRI of containerd
//! and of CRI-O (`tests/src/cri.rs`): the VM follows `default_vcpus`, `default_memory` and `kernel_params`
//! when `enable_annotations` allows them; a key that is not enabled, a key podvisor does not
//! know, and a bad value each fail RunPodSandbox with an error naming the annotation and the
//! fix, and leave nothing behind.
//!
//! Prerequisites as for `tests/tests/cri.rs`: `scripts/deps.sh`, `make guest-image`,
//! `cargo build -p podvisor-shim`.
//!
//! Run: `cargo test -p podvisor-tests --test annotations`.

use std::fs;

use podvisor_tests::containerd::{kata_test_config, qemu_section};
use podvisor_tests::cri::{proto, require_kata, Cri, Manager};
use podvisor_tests::on_both_managers;

const HV: &str = "io.katacontainers.config.hypervisor.";

/// `sleep` that exits on SIGTERM.
const SLEEPER: &[&str] = &["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"];

fn pod(cri: &Cri, name: &str, annotations: &[(&str, &str)]) -> proto::PodSandboxConfig {
    let mut config = cri.pod_config(name);
    config.annotations.extend(annotations.iter().map(|(k, v)| (format!("{HV}{k}"), v.to_string())));
    config
}

fn meminfo_kib(text: &str, field: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/meminfo:\n{text}"))
}

on_both_managers!(
    enabled_annotations_size_the_vm_and_others_are_rejected_by_name_containerd,
    enabled_annotations_size_the_vm_and_others_are_rejected_by_name_crio,
    enabled_annotations_size_the_vm_and_others_are_rejected_by_name
);
fn enabled_annotations_size_the_vm_and_others_are_rejected_by_name(m: Manager) {
    require_kata("the annotations shape the pod's VM");
    let cri = Cri::start(m);
    let text = kata_test_config(|t| {
        let enabled = ["default_vcpus", "default_memory", "kernel_params"].map(toml::Value::from);
        qemu_section(t).insert("enable_annotations".into(), toml::Value::Array(enabled.to_vec()));
    });
    fs::write(cri.kata_config(), text).unwrap();

    // Enabled: the guest has 2 vCPUs, about 1 GiB and the extra kernel parameter.
    let config = pod(
        &cri,
        "annotated",
        &[("default_vcpus", "2"), ("default_memory", "1024"), ("kernel_params", "podvisor.test=42")],
    );
    let p = cri.run_pod(&config);
    let c = cri.run_container(&p, &cri.container_config("app", SLEEPER));
    let cpus = cri.exec_ok(&c, &["grep", "-c", "^processor", "/proc/cpuinfo"]);
    assert_eq!(cpus.trim(), "2", "vCPUs with default_vcpus=2");
    let meminfo = cri.exec_ok(&c, &["cat", "/proc/meminfo"]);
    let total_mib = meminfo_kib(&meminfo, "MemTotal") / 1024;
    // The kernel keeps some of the 1024 MiB for itself; the test configuration's 512 is far below.
    assert!((900..=1024).contains(&total_mib), "MemTotal {total_mib} MiB with default_memory=1024");
    let cmdline = cri.exec_ok(&c, &["cat", "/proc/cmdline"]);
    assert!(
        cmdline.split_whitespace().any(|w| w == "podvisor.test=42"),
        "kernel_params not on the guest's command line: {cmdline}"
    );
    cri.remove_pod(&p);

    // Known but not enabled.
    let err = cri.run_pod_failing(&pod(&cri, "not-enabled", &[("machine_type", "q35")]));
    eprintln!("machine_type not enabled: {err}");
    assert!(err.contains(&format!("{HV}machine_type")) && err.contains("enable_annotations"), "{err}");

    // Unknown to podvisor, even though `.*`-style enabling would match it.
    let err = cri.run_pod_failing(&pod(&cri, "unknown", &[("no_such_option", "1")]));
    eprintln!("unknown key: {err}");
    assert!(err.contains(&format!("{HV}no_such_option")) && err.contains("not supported"), "{err}");

    // Enabled, but not a number.
    let err = cri.run_pod_failing(&pod(&cri, "bad-value", &[("default_vcpus", "lots")]));
    eprintln!("bad value: {err}");
    assert!(err.contains(&format!("{HV}default_vcpus")) && err.contains("not a number"), "{err}");
}
