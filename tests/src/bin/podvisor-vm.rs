//! `podvisor-vm demo | bench [--runs N]`: boots VMs from the built guest image without any
//! container manager. `demo` shows the agent's version and the guest kernel; `bench` measures
//! boot times and host memory (see `make bench`).

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hypervisor::host::HostFacts;
use hypervisor::qemu::cmdline::{VmSpec, VsockDevice};
use hypervisor::{AccelChoice, Hypervisor, Qemu, QemuConfig};
use podvisor_shim::sandbox::Sandbox;
use podvisor_tests::{guest_asset, guest_meminfo, median, pss_kib, unique_id};

const DIAL: Duration = Duration::from_secs(60);

fn quiet_logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn config() -> QemuConfig {
    QemuConfig {
        kernel: guest_asset("vmlinux.container"),
        initrd: guest_asset("kata-containers-initrd.img"),
        default_memory: 2048,
        ..QemuConfig::default()
    }
}

async fn boot(config: QemuConfig, log: &slog::Logger) -> Result<Sandbox> {
    let id = unique_id("vm");
    let vm: Arc<dyn Hypervisor> = Arc::new(Qemu::new(&id, config, log.clone()));
    Ok(Sandbox::boot_with(&id, vm, DIAL, log).await?)
}

async fn demo() -> Result<()> {
    let check = hypervisor::HostCheck::run(&config());
    let accel = check.items.iter().find(|i| i.name == "accelerator").map(|i| i.detail.clone()).unwrap_or_default();
    println!("accelerator:          {accel}");
    let started = Instant::now();
    // The debug console (agent.debug_console) runs `uname -r` in the guest.
    let sb = boot(QemuConfig { kernel_params: "agent.debug_console".into(), ..config() }, &quiet_logger()).await?;
    println!("agent answered after  {:.2} s on {}", started.elapsed().as_secs_f64(), sb.vm().agent_channel());
    let version = sb.agent().version().await?;
    let guest_kernel =
        podvisor_tests::debug_console::run(&sb.vm().agent_channel(), "uname -r", Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| format!("(unknown: {e:#})"));
    let host_kernel = nix::sys::utsname::uname()?.release().to_string_lossy().into_owned();
    println!("agent version:        {version}");
    println!("guest kernel:         {guest_kernel}   (uname -r inside the VM)");
    println!("host kernel:          {host_kernel}");
    sb.shutdown().await?;
    println!("VM stopped; nothing left behind.");
    if guest_kernel == host_kernel || guest_kernel.starts_with("(unknown") {
        bail!("the guest kernel was not reported correctly ({guest_kernel})");
    }
    Ok(())
}

/// Seconds from spawning QEMU with the poweroff initrd to QEMU's exit.
async fn bare_boot(config: &QemuConfig, accel: &AccelChoice) -> Result<f64> {
    let dir = std::env::temp_dir().join(unique_id("bare"));
    std::fs::create_dir_all(&dir)?;
    let mut cfg = config.clone();
    cfg.initrd = guest_asset("test/initrd-poweroff.img");
    let spec = VmSpec::from_config("bench-bare", &cfg, accel.clone(), VsockDevice::None, dir.join("qmp.sock"));
    let started = Instant::now();
    let status = tokio::process::Command::new(&cfg.path)
        .args(spec.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(Duration::from_secs(120), status).await.context("bare boot timed out")??;
    let elapsed = started.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&dir)?;
    if !status.success() {
        bail!("bare QEMU exited with {status}");
    }
    Ok(elapsed)
}

async fn bench(runs: usize) -> Result<()> {
    let cfg = config();
    let accel = AccelChoice::choose(cfg.accelerator, &HostFacts::probe()).map_err(anyhow::Error::msg)?;
    println!("podvisor VM benchmark: {runs} runs each, {} MiB guest, accelerator {accel:?}", cfg.default_memory);
    let initrd_size = std::fs::metadata(&cfg.initrd).with_context(|| cfg.initrd.display().to_string())?.len();
    println!("initrd: {} ({initrd_size} bytes, {:.2} MiB)", cfg.initrd.display(), initrd_size as f64 / 1048576.0);
    let log = quiet_logger();
    let (mut bare, mut ready, mut stop, mut total) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let a = bare_boot(&cfg, &accel).await?;
        let t0 = Instant::now();
        let sb = boot(cfg.clone(), &log).await?;
        let r = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        sb.shutdown().await?;
        let s = t1.elapsed().as_secs_f64();
        println!(
            "  run {}: (a) bare boot to exit {a:.3} s   (b) start to Health.Check {r:.3} s + stop {s:.3} s",
            i + 1
        );
        bare.push(a);
        ready.push(r);
        stop.push(s);
        total.push(r + s);
    }
    let (a, r, s, b) = (median(&mut bare), median(&mut ready), median(&mut stop), median(&mut total));
    println!();
    println!("median (a) QEMU + our kernel + poweroff initrd, spawn to exit:  {a:.3} s");
    println!("median (b) start to agent Health.Check:                         {r:.3} s");
    println!("median     stop (DestroySandbox + cleanup):                     {s:.3} s");
    println!("median (b) start to Health.Check plus stop:                     {b:.3} s");
    println!("ratio b/a: {:.3}   (target <= 1.30 now, project goal <= 1.10)", b / a);

    let sb = boot(cfg.clone(), &log).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pids = sb.vm().pids().await;
    let names = ["QEMU", "vhost-device-vsock"];
    println!();
    println!("host memory of an idle VM ({} MiB guest RAM, lazily allocated):", cfg.default_memory);
    let mut sum = 0;
    for (pid, name) in pids.iter().zip(names) {
        let pss = pss_kib(*pid).unwrap_or(0);
        sum += pss;
        println!("  {name:<20} pid {pid:<8} PSS {:>8.1} MiB", pss as f64 / 1024.0);
    }
    println!("  {:<20} {:<12} PSS {:>8.1} MiB", "total", "", sum as f64 / 1024.0);
    // The initramfs is the guest's root (tmpfs): its files stay in guest RAM as Shmem.
    let metrics = sb.agent().metrics().await?;
    let mib = |item: &str| guest_meminfo(&metrics, item).map_or(f64::NAN, |b| b as f64 / 1048576.0);
    println!("guest memory of an idle VM (/proc/meminfo in the guest):");
    println!("  MemTotal {:.1} MiB   MemAvailable {:.1} MiB", mib("mem_total"), mib("mem_available"));
    println!(
        "  used (MemTotal - MemAvailable) {:.1} MiB   Shmem (the initramfs, a tmpfs) {:.1} MiB",
        mib("mem_total") - mib("mem_available"),
        mib("shmem")
    );
    sb.shutdown().await?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["demo"] => demo().await,
        ["bench"] => bench(5).await,
        ["bench", "--runs", n] => bench(n.parse().context("--runs takes a number")?).await,
        _ => bail!("usage: podvisor-vm demo | bench [--runs N]"),
    }
}
