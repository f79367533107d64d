//! `podvisor-demo [demo]` (what `make demo` runs): a private containerd (own root, state, socket
//! and configuration under /tmp) runs a busybox container in a podvisor VM with
//! `ctr run --rm --runtime io.containerd.kata.v2 --rootfs <busybox rootfs> demo uname -r`,
//! prints the guest kernel next to the host's, then tears everything down and checks that
//! nothing is left. `PODVISOR_TEST_RUNTIME` selects another runtime (the harness's runc check).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use podvisor_tests::containerd::{kata_test_config, shim_binary, test_runtime, TestContainerd, KATA_RUNTIME};
use podvisor_tests::{image, leaks};

const ID: &str = "demo";

fn demo() -> Result<()> {
    let runtime = test_runtime();
    let shim = shim_binary();
    let img = image::busybox();
    println!("shim:                 {}", shim.display());
    println!("busybox rootfs:       {}", img.rootfs.display());

    let t = Instant::now();
    let ctd = TestContainerd::try_start(&kata_test_config(|_| {}))
        .map_err(anyhow::Error::msg)
        .context("starting containerd")?;
    println!(
        "containerd:           pid {} in {} (ready after {:.2} s)",
        ctd.pid(),
        ctd.dir().display(),
        t.elapsed().as_secs_f64()
    );

    let rootfs = img.rootfs.display().to_string();
    let mut args = vec!["run", "--rm", "--runtime", runtime.as_str()];
    if runtime != KATA_RUNTIME {
        // runc finds bare commands only through PATH, which `--rootfs` containers lack.
        args.push("--env=PATH=/usr/sbin:/usr/bin:/sbin:/bin");
    }
    args.extend(["--rootfs", rootfs.as_str(), ID, "uname", "-r"]);
    println!("running:              ctr {}", args.join(" "));
    let t = Instant::now();
    let out = ctd.ctr(&args);
    let took = t.elapsed().as_secs_f64();
    let guest = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let host = nix::sys::utsname::uname()?.release().to_string_lossy().into_owned();
    if !out.status.success() {
        let explained = ctd.explain(&out);
        let teardown = ctd.stop();
        let left = if teardown.leftovers.is_empty() {
            String::new()
        } else {
            format!("\ncleaned up after it:\n  {}", teardown.leftovers.join("\n  "))
        };
        bail!("ctr run failed: {explained}{left}");
    }
    let label = if runtime == KATA_RUNTIME { "guest kernel:    " } else { "container kernel:" };
    println!("{label}     {guest}   (uname -r in the container, {took:.2} s for ctr run)");
    println!("host kernel:          {host}");

    let dir = ctd.dir().to_path_buf();
    let leaks_before_stop = leaks::settle(leaks::GRACE, || ctd.find_leaks(&[ID]));
    let teardown = ctd.stop();
    let after = leaks::find_leaks(&[ID], Some(&dir));
    let mut problems: Vec<String> = leaks_before_stop.into_iter().chain(teardown.leftovers).chain(after).collect();
    if dir.exists() {
        problems.push(format!("{} still exists", dir.display()));
    }
    if !problems.is_empty() {
        bail!("left behind:\n  {}", problems.join("\n  "));
    }
    println!(
        "teardown:             containerd stopped in {:.2} s, {} removed; nothing left behind",
        teardown.took.as_secs_f64(),
        dir.display()
    );
    if runtime == KATA_RUNTIME && guest == host {
        bail!("the container reported the host's kernel: it did not run in a VM");
    }
    Ok(())
}

/// `bench`: `ctr run --rm <id> true` through the shim against the same VM booted and stopped
/// without containerd (the sandbox layer directly), median of `runs`; and the shim daemon's
/// memory while a container runs.
fn bench(runs: usize) -> Result<()> {
    use podvisor_tests::{median, pss_kib};
    let img = image::busybox();
    let config_text = kata_test_config(|_| {});
    let ctd = TestContainerd::try_start(&config_text).map_err(anyhow::Error::msg).context("starting containerd")?;
    let rootfs = img.rootfs.display().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let qemu_config = podvisor_shim::config::parse(&config_text, std::path::Path::new("bench.toml"))
        .map_err(anyhow::Error::msg)?
        .hypervisor;
    let (mut ctr_runs, mut bare_runs) = (Vec::new(), Vec::new());
    println!("podvisor containerd benchmark: {runs} runs each");
    for i in 0..runs {
        let id = ctd.new_id("bench");
        let t = Instant::now();
        let out = ctd.ctr(&["run", "--rm", "--runtime", KATA_RUNTIME, "--rootfs", &rootfs, &id, "true"]);
        let c = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("ctr run failed: {}", ctd.explain(&out));
        }
        let vm_id = podvisor_tests::unique_id("benchvm");
        let t = Instant::now();
        rt.block_on(async {
            let log = slog::Logger::root(slog::Discard, slog::o!());
            let vm: std::sync::Arc<dyn hypervisor::Hypervisor> =
                std::sync::Arc::new(hypervisor::Qemu::new(&vm_id, qemu_config.clone(), log.clone()));
            let sb = podvisor_shim::sandbox::Sandbox::boot_with(&vm_id, vm, std::time::Duration::from_secs(60), &log)
                .await?;
            sb.shutdown().await?;
            Ok::<_, anyhow::Error>(())
        })?;
        let b = t.elapsed().as_secs_f64();
        println!("  run {}: ctr run --rm true {c:.3} s   bare VM start+agent+stop {b:.3} s", i + 1);
        ctr_runs.push(c);
        bare_runs.push(b);
    }
    let (c, b) = (median(&mut ctr_runs), median(&mut bare_runs));
    println!();
    println!("median ctr run --rm true (containerd + shim + VM + container): {c:.3} s");
    println!("median the same VM booted and stopped bare (no containerd):   {b:.3} s");
    println!("ratio: {:.3}", c / b);

    let id = ctd.new_id("benchrss");
    ctd.ctr_ok(&["run", "-d", "--runtime", KATA_RUNTIME, "--rootfs", &rootfs, &id, "sleep", "1000"]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let shim = ctd.shim_pids(&id).first().copied().context("no shim process for the running task")?;
    let rss = std::fs::read_to_string(format!("/proc/{shim}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    println!();
    println!("shim daemon (pid {shim}) with one running container: RSS {rss}, PSS {} KiB", pss_kib(shim).unwrap_or(0));
    ctd.ctr(&["task", "kill", "-s", "KILL", &id]);
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    while ctd.task_status(&id).as_deref() != Some("STOPPED") && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ctd.ctr(&["task", "rm", &id]);
    ctd.ctr(&["container", "rm", &id]);
    let teardown = ctd.stop();
    if !teardown.leftovers.is_empty() {
        bail!("left behind:\n  {}", teardown.leftovers.join("\n  "));
    }
    Ok(())
}

fn main() -> Result<()> {
    // `make demo` builds the release shim: use it even when a debug build is newer.
    let release = podvisor_tests::workspace().join("target/release/containerd-shim-kata-v2");
    if std::env::var_os("PODVISOR_SHIM").is_none() && release.is_file() {
        std::env::set_var("PODVISOR_SHIM", &release);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] | ["demo"] => demo(),
        ["bench"] => bench(5),
        ["bench", "--runs", n] => bench(n.parse().context("--runs takes a number")?),
        _ => bail!("usage: podvisor-demo [demo] | bench [--runs N]"),
    }
}
