//! End-to-end: real QEMU, the built guest image, our agent over the real channel; and the
//! failure paths, each ending with a clear error and nothing left behind.

use std::sync::Arc;
use std::time::Duration;

use hypervisor::{Accelerator, Hypervisor, MemoryMiB, Qemu, QemuConfig};
use podvisor_shim::agent::AgentError;
use podvisor_shim::sandbox::{BootError, Sandbox};
use podvisor_tests::*;

const DIAL: Duration = Duration::from_secs(60);

async fn boot(id: &str, config: QemuConfig, dial: Duration) -> Result<Sandbox, BootError> {
    let log = logger();
    let vm: Arc<dyn Hypervisor> = Arc::new(Qemu::new(id, config, log.clone()));
    Sandbox::boot_with(id, vm, dial, &log).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_answers_hotplugs_memory_and_stops_clean() {
    let id = unique_id("boot");
    let sb = boot(&id, test_config(), DIAL).await.expect("boot");
    let pids = sb.vm().pids().await;
    let expected = if sb.vm().capabilities().hybrid_vsock { 2 } else { 1 };
    assert_eq!(pids.len(), expected, "QEMU, plus vhost-device-vsock on the hybrid path: {pids:?}");

    sb.agent().check().await.expect("Health.Check");
    let version = sb.agent().version().await.expect("Health.Version");
    assert_eq!(version, podvisor_shim::VERSION);
    let details = sb.agent().guest_details().await.expect("GetGuestDetails");
    assert_eq!(details.mem_block_size_bytes, 128 << 20, "x86_64 memory block size");
    assert_eq!(details.agent_version, podvisor_shim::VERSION);

    let before = guest_meminfo(&sb.agent().metrics().await.unwrap(), "mem_total").expect("mem_total metric");
    let new_total = sb.resize_memory(MemoryMiB(512 + 256)).await.expect("hotplug 256 MiB");
    assert_eq!(new_total, MemoryMiB(768));
    let after = guest_meminfo(&sb.agent().metrics().await.unwrap(), "mem_total").unwrap();
    assert_eq!(after - before, 256 << 20, "guest MemTotal grew by exactly 256 MiB ({before} -> {after})");

    // A second resize below the current size keeps what the VM has.
    assert_eq!(sb.vm().resize_memory(MemoryMiB(600)).await.unwrap(), MemoryMiB(768));

    sb.shutdown().await.expect("shutdown");
    assert_nothing_left(&id, &pids);
}

#[tokio::test]
async fn wrong_kernel_path_is_named_and_nothing_is_left() {
    let id = unique_id("kernel");
    let config = QemuConfig { kernel: "/nonexistent/vmlinux".into(), ..test_config() };
    let err = boot(&id, config, DIAL).await.err().expect("must fail").to_string();
    assert!(err.contains("guest kernel /nonexistent/vmlinux does not exist"), "{err}");
    assert!(err.contains("`kernel` in [hypervisor.qemu]"), "{err}");
    assert_nothing_left(&id, &[]);
}

#[tokio::test]
async fn missing_qemu_binary_is_named_and_nothing_is_left() {
    let id = unique_id("noqemu");
    let config = QemuConfig { path: "/nonexistent/qemu-system-x86_64".into(), ..test_config() };
    let err = boot(&id, config, DIAL).await.err().expect("must fail").to_string();
    assert!(err.contains("QEMU binary /nonexistent/qemu-system-x86_64 not found"), "{err}");
    assert!(err.contains("install qemu-system-x86"), "{err}");
    assert_nothing_left(&id, &[]);
}

#[tokio::test]
async fn qemu_rejecting_its_command_line_fails_at_once_with_its_message() {
    // A file QEMU cannot boot: QEMU exits during start, and its own words reach the error.
    let id = unique_id("badkernel");
    let bogus = std::env::temp_dir().join(format!("{id}-not-a-kernel"));
    std::fs::write(&bogus, b"not a kernel").unwrap();
    let config = QemuConfig { kernel: bogus.clone(), ..test_config() };
    let started = std::time::Instant::now();
    let err = boot(&id, config, DIAL).await.err().expect("must fail").to_string();
    std::fs::remove_file(&bogus).unwrap();
    assert!(started.elapsed() < Duration::from_secs(20), "failed only after {:?}", started.elapsed());
    assert!(err.contains("QEMU") && err.contains("exit"), "{err}");
    assert!(err.to_lowercase().contains("kernel"), "QEMU's own message about the kernel is missing: {err}");
    assert_nothing_left(&id, &[]);
}

#[tokio::test]
async fn agent_never_answering_times_out_naming_channel_and_console() {
    let id = unique_id("noagent");
    let config = QemuConfig { initrd: guest_asset("test/initrd-noagent.img"), ..test_config() };
    let err = boot(&id, config, Duration::from_secs(12)).await.err().expect("must fail");
    let text = err.to_string();
    assert!(matches!(err, BootError::Agent(AgentError::DialTimeout { .. })), "{text}");
    assert!(text.contains("hybrid vsock unix://") || text.contains("vsock://"), "channel not named: {text}");
    assert!(text.contains("podvisor test initrd: no agent here"), "console output missing: {text}");
    assert_nothing_left(&id, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_mid_run_is_reported_and_cleaned() {
    let id = unique_id("sigkill");
    let sb = boot(&id, test_config(), DIAL).await.expect("boot");
    let pids = sb.vm().pids().await;
    let qemu_pid = pids[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu_pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), sb.vm().wait_exit()).await.expect("exit reported");
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert!(exit.message.contains("killed by signal SIGKILL"), "{}", exit.message);
    let failure = sb.vm().wait_failure().await;
    assert!(failure.contains("SIGKILL"), "{failure}");
    // The agent is gone with the VM: its RPCs fail instead of hanging.
    let rpc = tokio::time::timeout(Duration::from_secs(40), sb.agent().check()).await.expect("RPC must not hang");
    assert!(rpc.is_err());
    sb.shutdown().await.expect("cleanup after a dead QEMU");
    assert_nothing_left(&id, &pids);
}

#[tokio::test]
async fn kvm_required_on_a_host_without_usable_kvm_fails_clearly() {
    let facts = hypervisor::host::HostFacts::probe();
    let Err(why) = facts.kvm_usable() else {
        // On a KVM host the KVM path is the normal one and is exercised by every other test.
        assert!(hypervisor::AccelChoice::choose(Accelerator::Kvm, &facts).is_ok());
        return;
    };
    let id = unique_id("kvm");
    let config = QemuConfig { accelerator: Accelerator::Kvm, ..test_config() };
    let err = boot(&id, config, DIAL).await.err().expect("must fail").to_string();
    assert!(err.contains("KVM is required") && err.contains(&why), "{err}");
    assert!(err.contains("accelerator = \"auto\""), "{err}");
    assert_nothing_left(&id, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcpu_hotplug_is_onlined_by_the_agent() {
    let id = unique_id("vcpu");
    let sb = boot(&id, test_config(), DIAL).await.expect("boot");
    let pids = sb.vm().pids().await;
    // /proc/stat, hence kata_guest_cpu_time, lists the online CPUs (plus `total`).
    let cpus = |m: &str| {
        Some(
            m.lines().filter(|l| l.starts_with("kata_guest_cpu_time{cpu=\"") && l.contains("item=\"user\"")).count()
                as u32
                - 1,
        )
    };
    assert_eq!(cpus(&sb.agent().metrics().await.unwrap()), Some(1));
    assert_eq!(sb.vm().resize_vcpus(2).await.expect("add a vCPU"), 2);
    sb.agent().online_cpu_mem(1, true).await.expect("OnlineCPUMem");
    assert_eq!(cpus(&sb.agent().metrics().await.unwrap()), Some(2));
    let err = sb.vm().resize_vcpus(3).await.unwrap_err().to_string();
    assert!(err.contains("use 1 to 2 (default_maxvcpus)"), "{err}");
    sb.shutdown().await.unwrap();
    assert_nothing_left(&id, &pids);
}
