//! `podvisor-peerpod-bench [--runs N]` (part of `make bench`): peer pods (runtime class
//! `kata-remote`: the podvm created by `podvisor-remote-hypervisor` with its `qemu` provider, the
//! image pulled inside the podvm from a private registry) next to local `kata` pods, through a
//! private containerd's CRI ([`PeerPods`]).
//!
//! 1. `N` runs (default 3) of each: `RunPodSandbox` → `PullImage` (the kubelet's; for peer pods
//!    containerd fetches the image on the worker too) → `CreateContainer` → `StartContainer`
//!    (container running), timed per call.
//! 2. The image pull's share of a peer pod's start: its first container's `CreateContainer` +
//!    `StartContainer` (containerd creates the task at StartContainer: the podvm pulls and
//!    unpacks the image then) minus a second container's in the same pod from the same image
//!    (layers cached in the podvm), plus the worker-side `PullImage`.
//! 3. Worker-side cost per peer pod while the `N` peer pods idle: RSS and PSS of the shim
//!    daemon and of the service's per-pod proxy process; the tunnel's kernel objects in the
//!    pod's network namespace (VXLAN devices, tc qdiscs, tc filters) counted. The podvm itself
//!    (QEMU) is the instance's, not the worker's: printed apart.
//! 4. Tears everything down with the harness's leak checks (every podvm gone) and prints a
//!    summary block.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use podvisor_tests::cri::{self, proto, Manager, Pod};
use podvisor_tests::peerpods::{PeerPods, PodvmState, HANDLER};
use podvisor_tests::{leaks, median};

const CONTAINER_CMD: &[&str] = &["sleep", "3600"];

fn usage() -> ! {
    eprintln!("usage: podvisor-peerpod-bench [--runs N]   (default: 3 runs)");
    std::process::exit(2);
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// `median X s (min Y, max Z)`.
fn stats(values: &[f64]) -> String {
    let mut v = values.to_vec();
    let m = median(&mut v);
    format!("median {m:.2} s (min {:.2}, max {:.2})", v[0], v[v.len() - 1])
}

fn med(values: &[f64]) -> f64 {
    median(&mut values.to_vec())
}

/// The times of one pod's start.
#[derive(Debug, Clone, Copy, Default)]
struct Timing {
    run: f64,
    pull: f64,
    create: f64,
    start: f64,
    /// A second container from the same image in the same pod (peer pods only): its
    /// CreateContainer + StartContainer (containerd creates the task, and the shim has the agent
    /// pull, at StartContainer).
    again: f64,
}

impl Timing {
    fn total(&self) -> f64 {
        self.run + self.pull + self.create + self.start
    }
}

/// One pod started as the kubelet does, timed call by call; returns the pod and its timing.
fn start(pp: &PeerPods, name: &str, remote: bool) -> Result<(Pod, Timing), String> {
    let cri = &pp.cri;
    let config = cri.pod_config(name);
    let container =
        if remote { pp.container_config("sleep", CONTAINER_CMD) } else { cri.container_config("sleep", CONTAINER_CMD) };
    let mut t = Timing::default();
    let clock = Instant::now();
    let pod = if remote {
        cri.try_run_pod_with_handler(&config, HANDLER)?
    } else {
        cri.try_run_pod_with_handler(&config, cri::KATA_HANDLER)?
    };
    t.run = secs(clock.elapsed());
    // The status call of the harness is in `run`; small next to a VM's boot.
    let clock = Instant::now();
    if remote {
        pp.pull_image(&pod, HANDLER)?;
    }
    t.pull = secs(clock.elapsed());
    cri.prepare_container(&config, &container);
    let clock = Instant::now();
    let cid = cri.block_on(cri.client().create_container(&pod.id, &container, &config))?;
    t.create = secs(clock.elapsed());
    cri.adopt_container(&pod.id, &cid);
    let clock = Instant::now();
    cri.block_on(cri.client().start_container(&cid))?;
    t.start = secs(clock.elapsed());
    let st = cri.container_status(&cid);
    if st.state != proto::CONTAINER_RUNNING {
        return Err(format!("{name}: container {cid} is not running: {st:?}"));
    }
    if remote {
        let mut second = pp.container_config("again", CONTAINER_CMD);
        second.log_path = "again/0.log".into();
        cri.prepare_container(&config, &second);
        let clock = Instant::now();
        let cid2 = cri.block_on(cri.client().create_container(&pod.id, &second, &config))?;
        cri.adopt_container(&pod.id, &cid2);
        cri.block_on(cri.client().start_container(&cid2))?;
        t.again = secs(clock.elapsed());
    }
    Ok((pod, t))
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

/// (RSS, PSS) in KiB of a process.
fn mem(pid: u32) -> (u64, u64) {
    (status_kib(pid, "VmRSS:").unwrap_or(0), podvisor_tests::pss_kib(pid).unwrap_or(0))
}

/// The shim daemon of sandbox `id` (its command line names the id; `start`/`delete` runs excluded).
fn shim_pid(id: &str) -> Option<u32> {
    leaks::find_processes("containerd-shim-kata-v2", id)
        .into_iter()
        .find(|p| !p.cmdline.ends_with(" start") && !p.cmdline.ends_with(" delete"))
        .map(|p| p.pid)
}

/// Lines of `<cmd>` run in the network namespace `netns`.
fn in_netns(netns: &std::path::Path, cmd: &[&str]) -> Vec<String> {
    Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(String::from).collect())
        .unwrap_or_default()
}

/// The tunnel's kernel objects in the pod's network namespace: VXLAN devices, qdiscs (other
/// than the default noqueue of lo), filters.
fn tunnel_objects(netns: &std::path::Path) -> (usize, usize, usize) {
    let vxlan = in_netns(netns, &["ip", "-o", "-d", "link", "show", "type", "vxlan"]).len();
    let qdiscs = in_netns(netns, &["tc", "qdisc", "show"]).iter().filter(|l| l.contains("ingress")).count();
    let mut filters = 0;
    for dev in ["eth0", "vxlan0"] {
        filters += in_netns(netns, &["tc", "filter", "show", "dev", dev, "ingress"])
            .iter()
            .filter(|l| l.contains("action order") || l.contains("mirred"))
            .count();
    }
    (vxlan, qdiscs, filters)
}

fn main() -> Result<()> {
    let release = podvisor_tests::workspace().join("target/release/containerd-shim-kata-v2");
    if std::env::var_os("PODVISOR_SHIM").is_none() && release.is_file() {
        std::env::set_var("PODVISOR_SHIM", &release);
    }
    let mut runs = 3usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().and_then(|v| v.parse().ok()).filter(|n| *n > 0).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    println!(
        "podvisor peer pod benchmark: {runs} peer pods (kata-remote) and {runs} local pods (kata), containerd CRI"
    );
    let began = Instant::now();
    let pp = PeerPods::try_start(Manager::Containerd, runs as u32 + 1).map_err(anyhow::Error::msg)?;
    println!("service:  {} ({})", podvisor_tests::peerpods::service_binary().display(), pp.service.dir().display());
    println!("shim:     {}", podvisor_tests::containerd::shim_binary().display());
    println!("registry: {} (image {})", pp.registry.podvm_host(), pp.image());
    let result = bench(&pp, runs);
    // Every pod removed through the harness (podvm leak checks included), then the node.
    let mut problems = Vec::new();
    if let Err(e) = &result {
        problems.push(format!("{e:#}"));
    }
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(pp)));
    if dropped.is_err() {
        problems.push("tearing down found leftovers (see the panic message above)".into());
    }
    println!();
    let outcome = if problems.is_empty() { "" } else { ", FAILED" };
    println!("---- podvisor peer pod benchmark summary ({:.0} s{outcome}) ----", secs(began.elapsed()));
    if let Ok(summary) = &result {
        for l in summary {
            println!("{l}");
        }
    }
    println!("---- end of summary ----");
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}

fn bench(pp: &PeerPods, runs: usize) -> Result<Vec<String>> {
    let mut summary = Vec::new();
    let mut remote = Vec::new();
    let mut local = Vec::new();
    let mut podvms: Vec<(Pod, PodvmState)> = Vec::new();
    println!();
    println!("== start: RunPodSandbox -> PullImage -> CreateContainer -> StartContainer ==");
    for i in 0..runs {
        let (pod, t) = start(pp, &format!("peer-{i}"), true).map_err(anyhow::Error::msg)?;
        let vm = pp.service.wait_podvm(&pod.id);
        println!(
            "  kata-remote #{i}: {:.2} s (RunPodSandbox {:.2}, PullImage {:.2}, CreateContainer {:.2}, StartContainer {:.2}; \
             a second container from the cached image: {:.2})",
            t.total(),
            t.run,
            t.pull,
            t.create,
            t.start,
            t.again
        );
        remote.push(t);
        podvms.push((pod, vm));
        let (lpod, t) = start(pp, &format!("local-{i}"), false).map_err(anyhow::Error::msg)?;
        println!(
            "  kata        #{i}: {:.2} s (RunPodSandbox {:.2}, CreateContainer {:.2}, StartContainer {:.2})",
            t.total(),
            t.run,
            t.create,
            t.start
        );
        local.push(t);
        pp.cri.remove_pod(&lpod);
    }
    let total = |v: &[Timing]| v.iter().map(Timing::total).collect::<Vec<_>>();
    let field = |v: &[Timing], f: fn(&Timing) -> f64| v.iter().map(f).collect::<Vec<_>>();
    let r_total = total(&remote);
    let l_total = total(&local);
    let pull_share: Vec<f64> = remote.iter().map(|t| (t.create + t.start - t.again).max(0.0) + t.pull).collect();
    summary.push(format!("peer pod start (RunPodSandbox -> container running): {}", stats(&r_total)));
    summary.push(format!("local kata pod start (same calls, image local):      {}", stats(&l_total)));
    summary.push(format!(
        "  peer / local (medians): {:.2}; peer RunPodSandbox {}",
        med(&r_total) / med(&l_total),
        stats(&field(&remote, |t| t.run))
    ));
    summary.push(format!(
        "image pull's share of a peer pod's start: {} = worker PullImage {} + podvm pull and unpack (first \
         container's CreateContainer + StartContainer {} minus a second one's from the podvm's layer cache {}); \
         {:.0} % of the median start",
        stats(&pull_share),
        stats(&field(&remote, |t| t.pull)),
        stats(&field(&remote, |t| t.create + t.start)),
        stats(&field(&remote, |t| t.again)),
        100.0 * med(&pull_share) / med(&r_total)
    ));

    // Worker-side memory while the peer pods idle.
    std::thread::sleep(Duration::from_secs(5));
    println!();
    println!("== worker side per peer pod ({} idle pods) ==", podvms.len());
    let (mut shim_rss, mut shim_pss, mut proxy_rss, mut proxy_pss, mut vmm_rss) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut objects = Vec::new();
    for (pod, vm) in &podvms {
        let shim = shim_pid(&pod.id).ok_or_else(|| anyhow::anyhow!("no shim daemon for sandbox {}", pod.id))?;
        let proxy = vm.proxy_pid().ok_or_else(|| anyhow::anyhow!("no proxy pid in {}", vm.json))?;
        let (sr, sp) = mem(shim);
        let (pr, ppss) = mem(proxy);
        let vr = vm.vmm_pid().map(|p| mem(p).0).unwrap_or(0);
        let obj = pod.netns.as_deref().map(tunnel_objects).unwrap_or((0, 0, 0));
        println!(
            "  {}: shim {sr} KiB RSS / {sp} KiB PSS; proxy {pr} KiB RSS / {ppss} KiB PSS; tunnel: {} VXLAN device(s), \
             {} ingress qdisc(s), {} redirect filter(s); (podvm QEMU {:.0} MiB RSS, on the instance's side)",
            &pod.id[..12],
            obj.0,
            obj.1,
            obj.2,
            vr as f64 / 1024.0
        );
        shim_rss.push(sr as f64 / 1024.0);
        shim_pss.push(sp as f64 / 1024.0);
        proxy_rss.push(pr as f64 / 1024.0);
        proxy_pss.push(ppss as f64 / 1024.0);
        vmm_rss.push(vr as f64 / 1024.0);
        objects.push(obj);
    }
    let m = |v: &[f64]| med(v);
    summary.push(format!(
        "worker memory per peer pod (medians): shim {:.1} MiB RSS / {:.1} MiB PSS, proxy {:.1} MiB RSS / {:.1} MiB PSS; \
         shim + proxy = {:.1} MiB PSS",
        m(&shim_rss),
        m(&shim_pss),
        m(&proxy_rss),
        m(&proxy_pss),
        m(&shim_pss) + m(&proxy_pss)
    ));
    let (vx, q, f) = objects[0];
    summary.push(format!(
        "tunnel per peer pod: {vx} VXLAN device, {q} ingress qdiscs, {f} u32 redirect filters (kernel objects, no \
         process); podvm QEMU (instance side, TCG): {:.0} MiB RSS median",
        m(&vmm_rss)
    ));
    for (pod, vm) in &podvms {
        pp.remove_pod(pod, vm);
    }
    summary.push(format!("teardown: {} peer pods removed; every podvm, proxy, tunnel and socket gone", podvms.len()));
    Ok(summary)
}
