//! The agent's debug console and GetMetrics in a real guest (real QEMU, the built guest image,
//! the shim's agent client):
//!
//! * `debug_console_runs_a_shell_in_the_guest`: `[agent.kata] debug_console_enabled = true`'s
//!   kernel parameters; `CONNECT 1026` through vhost-device-vsock gives a busybox shell whose
//!   `uname -r` is the guest kernel's release (guest-image/kernel.pin); at most four shells at
//!   once; a closed connection (or an exited shell) ends its session and frees its pty;
//!   GetMetrics in that guest
//!   holds every kata_agent_* / kata_guest_* family, and its size and time are printed.
//! * `debug_console_is_off_by_default`: without the parameter nothing listens on port 1026 (the
//!   connection is closed after `CONNECT 1026`), while the agent's port 1024 answers.
//!
//! Prerequisites (a missing one is a failure): `make guest-image`.
//! Run: `cargo test -p podvisor-tests --test debug_console -- --test-threads=1 --nocapture`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::{AgentChannel, Hypervisor, Qemu, QemuConfig};
use podvisor_shim::config::AgentConfig;
use podvisor_shim::sandbox::Sandbox;
use podvisor_tests::debug_console;
use podvisor_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DIAL: Duration = Duration::from_secs(60);

async fn boot(id: &str, config: QemuConfig) -> Sandbox {
    let log = logger();
    let vm: Arc<dyn Hypervisor> = Arc::new(Qemu::new(id, config, log.clone()));
    Sandbox::boot_with(id, vm, DIAL, &log).await.expect("boot")
}

/// KERNEL_RELEASE from guest-image/kernel.pin: what `uname -r` must say in the guest.
fn pinned_kernel_release() -> String {
    let pin = std::fs::read_to_string(workspace().join("guest-image/kernel.pin")).expect("guest-image/kernel.pin");
    pin.lines()
        .find_map(|l| l.strip_prefix("KERNEL_RELEASE="))
        .expect("KERNEL_RELEASE in kernel.pin")
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_console_runs_a_shell_in_the_guest() {
    let id = unique_id("dbgcon");
    let agent = AgentConfig { debug_console_enabled: true, ..AgentConfig::default() };
    let params = agent.kernel_params();
    assert_eq!(params, "agent.debug_console agent.debug_console_vport=1026");
    let sb = boot(&id, QemuConfig { kernel_params: params, ..test_config() }).await;
    let pids = sb.vm().pids().await;
    let channel = sb.vm().agent_channel();

    let release = debug_console::run(&channel, "uname -r", Duration::from_secs(30)).await.expect("uname -r");
    assert_eq!(release, pinned_kernel_release(), "the shell runs in the guest");
    let host = nix::sys::utsname::uname().unwrap().release().to_string_lossy().into_owned();
    assert_ne!(release, host);
    // The shell's terminal is a pty and it leads its own session.
    let tty = debug_console::run(&channel, "tty; cat /proc/self/stat", Duration::from_secs(30)).await.unwrap();
    assert!(tty.starts_with("/dev/pts/"), "{tty}");

    let pts = |out: &str| out.split_whitespace().filter(|e| *e != "ptmx").count();
    // `want` ptys (the checking session's own included) within 30 s.
    let ptys_become = |want: usize| {
        let channel = channel.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match debug_console::run(&channel, "ls /dev/pts", Duration::from_secs(30)).await {
                    Ok(out) if pts(&out) == want => return,
                    other if Instant::now() > deadline => panic!("expected {want} ptys: {other:?}"),
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
    };

    // The peer closing the connection ends the session: the shell is killed, its pty freed.
    let mut s = debug_console::connect(&channel, debug_console::PORT).await.expect("connect");
    let mut b = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await.expect("a prompt").unwrap();
    assert!(n > 0, "the shell answered");
    drop(s);
    ptys_become(1).await;

    // Bounded: four shells at once; a fifth connection is told so and closed.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = debug_console::connect(&channel, debug_console::PORT).await.expect("connect");
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await.expect("a prompt").unwrap();
        assert!(n > 0, "the shell answered");
        held.push(s);
    }
    let mut fifth = debug_console::connect(&channel, debug_console::PORT).await.expect("connect");
    let mut refused = String::new();
    tokio::time::timeout(Duration::from_secs(30), fifth.read_to_string(&mut refused)).await.expect("closed").unwrap();
    assert!(refused.contains("4 sessions already open"), "{refused:?}");
    // Their shells exiting ends them and frees the slots. (Closing several connections from the
    // host instead is not reliable: vhost-device-vsock 0.3.0 drops some of the closes when more
    // than one connection is open, and those shells stay until the VM stops; see README.)
    for s in &mut held {
        s.write_all(b"exit\n").await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest)).await.expect("session ends").unwrap();
    }
    drop(held);
    ptys_become(1).await;

    // GetMetrics through the shim's agent client, in this guest.
    let mut times = Vec::new();
    let mut text = String::new();
    for _ in 0..5 {
        let started = Instant::now();
        text = sb.agent().metrics().await.expect("GetMetrics");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    for family in [
        "kata_agent_scrape_count",
        "kata_agent_threads",
        "kata_agent_total_time",
        "kata_agent_total_vm",
        "kata_agent_total_rss",
        "kata_agent_io_stat",
        "kata_agent_proc_stat",
        "kata_agent_proc_status",
        "kata_agent_process_cpu_seconds_total",
        "kata_agent_process_open_fds",
        "kata_guest_cpu_time",
        "kata_guest_load",
        "kata_guest_meminfo",
        "kata_guest_netdev_stat",
        "kata_guest_tasks",
        "kata_guest_vm_stat",
    ] {
        assert!(text.contains(&format!("# TYPE {family} ")), "{family} missing from the guest's metrics:\n{text}");
    }
    assert!(text.contains("kata_guest_netdev_stat{interface=\"lo\",item=\"recv_bytes\"}"), "{text}");
    assert!(guest_meminfo(&text, "mem_total").unwrap() > 400 << 20, "{text}");
    let cpus =
        text.lines().filter(|l| l.starts_with("kata_guest_cpu_time{cpu=\"") && l.contains("item=\"user\"")).count();
    assert_eq!(cpus, 2, "cpu 0 and total");
    let series = text.lines().filter(|l| !l.starts_with('#')).count();
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap().len()
    };
    eprintln!(
        "GetMetrics in the guest: {} bytes ({gz} gzipped), {series} series, {} families; times {:?} ms (median {:.1} ms)",
        text.len(),
        text.lines().filter(|l| l.starts_with("# TYPE ")).count(),
        times.iter().map(|t| (t * 10.0).round() / 10.0).collect::<Vec<_>>(),
        median(&mut times)
    );

    sb.shutdown().await.unwrap();
    assert_nothing_left(&id, &pids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_console_is_off_by_default() {
    let id = unique_id("nocon");
    assert_eq!(AgentConfig::default().kernel_params(), "");
    let sb = boot(&id, test_config()).await;
    let pids = sb.vm().pids().await;
    let channel = sb.vm().agent_channel();
    let AgentChannel::HybridVsock { uds, .. } = &channel else {
        panic!("this test needs the hybrid vsock path (vhost-device-vsock); the VM uses {channel}");
    };
    // The same path reaches the agent's own port...
    debug_console::connect_hybrid(uds, 1024).await.expect("CONNECT 1024 (the agent) answers OK");
    // ...but nothing listens on the debug console's.
    let err = debug_console::connect_hybrid(uds, debug_console::PORT).await.expect_err("no debug console").to_string();
    assert!(err.contains("connection closed after CONNECT 1026"), "{err}");
    sb.agent().check().await.expect("the agent still answers");
    sb.shutdown().await.unwrap();
    assert_nothing_left(&id, &pids);
}
