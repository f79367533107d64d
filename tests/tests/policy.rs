//! End-to-end: Kata's agent policy (`io.katacontainers.config.agent.policy`, a base64-encoded
//! Rego document) on a Kubernetes pod through containerd's CRI (`tests/src/cri.rs`): honoured
//! only when `enable_annotations` allows `agent.policy`, enforced by the guest agent on every
//! request (here: ExecSync), and an invalid policy fails RunPodSandbox with the Rego error and
//! leaves nothing behind.
//!
//! Prerequisites as for `tests/tests/cri.rs`: `scripts/deps.sh`, `make guest-image`,
//! `cargo build -p podvisor-shim`.
//!
//! Run: `cargo test -p podvisor-tests --test policy`.

use std::fs;

use podvisor_tests::containerd::{kata_test_config, qemu_section};
use podvisor_tests::cri::{proto, require_kata, Cri, Manager};
use podvisor_tests::on_both_managers;

const POLICY_ANNOTATION: &str = "io.katacontainers.config.agent.policy";

/// `sleep` that exits on SIGTERM.
const SLEEPER: &[&str] = &["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"];

/// Every request allowed (the request names of Kata's agent API) except ExecProcess, which is
/// allowed only for `echo hi` in the container the shim names.
const EXEC_ONLY_ECHO_HI: &str = r#"
package agent_policy

import future.keywords.if

default AddARPNeighborsRequest := true
default AddSwapRequest := true
default CloseStdinRequest := true
default CopyFileRequest := true
default CreateContainerRequest := true
default CreateSandboxRequest := true
default DestroySandboxRequest := true
default GetMetricsRequest := true
default GetOOMEventRequest := true
default GuestDetailsRequest := true
default ListInterfacesRequest := true
default ListRoutesRequest := true
default MemHotplugByProbeRequest := true
default OnlineCPUMemRequest := true
default PauseContainerRequest := true
default ReadStreamRequest := true
default RemoveContainerRequest := true
default RemoveStaleVirtiofsShareMountsRequest := true
default ReseedRandomDevRequest := true
default ResumeContainerRequest := true
default SetGuestDateTimeRequest := true
default SetPolicyRequest := true
default SignalProcessRequest := true
default StartContainerRequest := true
default StatsContainerRequest := true
default TtyWinResizeRequest := true
default UpdateContainerRequest := true
default UpdateEphemeralMountsRequest := true
default UpdateInterfaceRequest := true
default UpdateRoutesRequest := true
default WaitProcessRequest := true
default WriteStreamRequest := true

default ExecProcessRequest := false

ExecProcessRequest if {
    input.process.Args == ["echo", "hi"]
    input.container_id != ""
}
"#;

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Rewrites the harness's Kata configuration (read by the shim when a pod's VM boots), with
/// or without `enable_annotations = ["agent.policy"]`.
fn set_policy_annotations(cri: &Cri, enabled: bool) {
    let text = kata_test_config(|t| {
        if enabled {
            qemu_section(t).insert("enable_annotations".into(), toml::Value::Array(vec!["agent.policy".into()]));
        }
    });
    fs::write(cri.kata_config(), text).unwrap();
}

fn pod_with_policy(cri: &Cri, name: &str, rego: &str) -> proto::PodSandboxConfig {
    let mut config = cri.pod_config(name);
    config.annotations.insert(POLICY_ANNOTATION.into(), base64(rego.as_bytes()));
    config
}

on_both_managers!(
    agent_policy_annotation_is_enforced_by_the_guest_containerd,
    agent_policy_annotation_is_enforced_by_the_guest_crio,
    agent_policy_annotation_is_enforced_by_the_guest
);
/// The policy annotation is refused unless enabled; once enabled the guest enforces it (exec
/// of `echo hi` only); an invalid policy fails the sandbox with the Rego error.
fn agent_policy_annotation_is_enforced_by_the_guest(m: Manager) {
    require_kata("agent policies are enforced by the guest agent");
    let cri = Cri::start(m);

    // Not enabled in the configuration: RunPodSandbox fails naming the annotation.
    set_policy_annotations(&cri, false);
    let err = cri.run_pod_failing(&pod_with_policy(&cri, "policy-off", EXEC_ONLY_ECHO_HI));
    eprintln!("RunPodSandbox without enable_annotations: {err}");
    assert!(err.contains(POLICY_ANNOTATION) && err.contains("enable_annotations"), "{err}");

    set_policy_annotations(&cri, true);

    // An invalid policy: the agent's parse error, the VM stopped, nothing left.
    let bad = "package agent_policy\n\ndefault ExecProcessRequest := }\n";
    let err = cri.run_pod_failing(&pod_with_policy(&cri, "policy-bad", bad));
    eprintln!("RunPodSandbox with an invalid policy: {err}");
    assert!(err.contains(POLICY_ANNOTATION), "{err}");
    assert!(err.contains("invalid agent policy: agent-policy.rego:3:"), "the Rego error with its line: {err}");

    // Not base64: refused before any VM boots.
    let mut config = cri.pod_config("policy-notb64");
    config.annotations.insert(POLICY_ANNOTATION.into(), "package agent_policy".into());
    let err = cri.run_pod_failing(&config);
    assert!(err.contains(POLICY_ANNOTATION) && err.contains("base64"), "{err}");

    // A valid policy: containers run, ExecSync is allowed for `echo hi` only.
    let pod = cri.run_pod(&pod_with_policy(&cri, "policy-exec", EXEC_ONLY_ECHO_HI));
    let c = cri.run_container(&pod, &cri.container_config("app", SLEEPER));
    assert_eq!(cri.container_status(&c).state, proto::CONTAINER_RUNNING);
    assert_eq!(cri.exec_ok(&c, &["echo", "hi"]), "hi\n");
    let err = cri.block_on(cri.client().exec_sync(&c, &["cat", "/etc/hostname"], 30)).unwrap_err();
    eprintln!("ExecSync blocked by the policy: {err}");
    assert!(err.contains("ExecProcess is blocked by the agent policy"), "{err}");
    // The container is unaffected by the refused exec.
    assert_eq!(cri.container_status(&c).state, proto::CONTAINER_RUNNING);
    assert_eq!(cri.exec_ok(&c, &["echo", "hi"]), "hi\n");
    cri.remove_pod(&pod);
}

#[test]
fn base64_encoder_matches_rfc4648_vectors() {
    for (plain, encoded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(plain.as_bytes()), encoded);
    }
}
