//! `podvisor-cri-bench [--runs N] [--pods M]` (part of `make bench`): Kubernetes pods through
//! the CRI of a private containerd (CRI plugin) and of a private CRI-O, with
//! `containerd-shim-kata-v2` ([`Cri`], kata handler, the default test configuration).
//!
//! 1. Per manager, one pod at a time, `N` runs (default 5): the time of `RunPodSandbox` +
//!    `CreateContainer` + `StartContainer` (busybox `sleep`), then of `StopPodSandbox` and
//!    `RemovePodSandbox`: CRI-O's latency next to containerd's.
//! 2. containerd: `M` pods (default 10) started in parallel, one thread each: all must succeed; per-pod
//!    latency (min / median / max, spread = max - min) and the wall time for all of them.
//! 3. While the `M` pods idle (after 5 s): host memory per pod from `/proc/<pid>/smaps` of the
//!    processes serving it (shim daemon, QEMU, both virtiofsd processes, vhost-device-vsock;
//!    found by the sandbox id in their command lines), guest RAM (the `memory-backend-memfd`
//!    mappings, which virtiofsd and the vsock daemon map too) reported apart; and their CPU time
//!    over a 10 s idle window.
//! 4. Per manager, the kubelet's statistics round trip: `ListContainerStats` for a pod of 10
//!    running kata containers, next to the same for 10 runc containers.
//! 5. Tears everything down with the harness's leak checks and prints a summary block.
//!
//! PSS divides each shared page among the processes mapping it, so the sum of PSS over every
//! process of every pod counts a page shared by several pods (the shim's and QEMU's text, the
//! libraries) once: that sum divided by `M` is the host memory one more pod costs on average.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use podvisor_tests::cri::{self, proto, Cri, Pod};
use podvisor_tests::leaks;

/// How long the pods idle before memory is measured.
const IDLE_BEFORE_MEMORY: Duration = Duration::from_secs(5);
/// The CPU measurement window.
const CPU_WINDOW: Duration = Duration::from_secs(10);
/// The container every pod runs.
const CONTAINER_CMD: &[&str] = &["sleep", "3600"];

fn usage() -> ! {
    eprintln!("usage: podvisor-cri-bench [--runs N] [--pods M]   (defaults: 5 runs, 10 pods)");
    std::process::exit(2);
}

// ---------------------------------------------------------------------------------------------
// Statistics.

#[derive(Debug, Clone, Copy)]
struct Stats {
    min: f64,
    median: f64,
    max: f64,
}

impl Stats {
    fn of(values: &[f64]) -> Stats {
        assert!(!values.is_empty());
        let mut v = values.to_vec();
        let median = podvisor_tests::median(&mut v);
        Stats { min: v[0], median, max: v[v.len() - 1] }
    }

    fn spread(&self) -> f64 {
        self.max - self.min
    }

    /// `median X s (min Y, max Z)`.
    fn secs(&self) -> String {
        format!("median {:.2} s (min {:.2}, max {:.2})", self.median, self.min, self.max)
    }
}

fn s(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// Starting and removing pods through the bare CRI calls.

/// A pod started by [`start_pod`], with the time of each CRI call.
struct Started {
    pod: Pod,
    run: Duration,
    create: Duration,
    start: Duration,
    /// When `RunPodSandbox` was sent and `StartContainer` returned.
    began: Instant,
    ended: Instant,
}

impl Started {
    fn total(&self) -> Duration {
        self.ended - self.began
    }
}

/// `RunPodSandbox` + `CreateContainer` + `StartContainer` (busybox `sleep 3600`), timed as the
/// bare CRI calls; the harness's bookkeeping (tracking, `PodSandboxStatus`) and a check that
/// the container runs come after the clock stopped. Ids go to `ids` as soon as they exist.
fn start_pod(cri: &Cri, name: &str, ids: &Mutex<Vec<String>>, barrier: Option<&Barrier>) -> Result<Started, String> {
    let client = cri.client();
    let config = cri.pod_config(name);
    cri.prepare_pod(&config);
    let container_config = cri.container_config("sleep", CONTAINER_CMD);
    cri.prepare_container(&config, &container_config);
    if let Some(b) = barrier {
        b.wait();
    }
    let began = Instant::now();
    let id = cri.block_on(client.run_pod_sandbox(&config, cri.handler())).map_err(|e| format!("pod {name}: {e}"))?;
    let run = began.elapsed();
    ids.lock().unwrap().push(id.clone());
    cri.track_id(&id);
    let t = Instant::now();
    let cid = cri
        .block_on(client.create_container(&id, &container_config, &config))
        .map_err(|e| format!("pod {name} (sandbox {id}): {e}"))?;
    let create = t.elapsed();
    ids.lock().unwrap().push(cid.clone());
    cri.adopt_container(&id, &cid);
    let t = Instant::now();
    cri.block_on(client.start_container(&cid))
        .map_err(|e| format!("pod {name} (sandbox {id}, container {cid}): {e}"))?;
    let ended = Instant::now();
    let start = ended - t;
    let pod = cri.adopt_pod(&id, &config).map_err(|e| format!("pod {name}: {e}"))?;
    let st = cri
        .block_on(client.container_status(&cid, false))
        .map_err(|e| format!("pod {name}: container {cid}: {e}"))?
        .status
        .unwrap_or_default();
    if st.state != proto::CONTAINER_RUNNING {
        return Err(format!("pod {name}: container {cid} is not running after StartContainer: {st:?}"));
    }
    Ok(Started { pod, run, create, start, began, ended })
}

/// `StopPodSandbox` and `RemovePodSandbox`, timed apart.
/// As the kubelet deletes a pod with `--grace-period=0`: `StopContainer` (timeout 0: SIGKILL)
/// for each container, then `StopPodSandbox` and `RemovePodSandbox`, the latter two timed apart.
/// (The busybox `sleep` is PID 1 and ignores SIGTERM: with a grace period CRI-O would wait it
/// out, as it does for runc.)
fn remove_pod(cri: &Cri, pod: &Pod) -> Result<(Duration, Duration), String> {
    for c in cri.containers_of(pod) {
        cri.block_on(cri.client().stop_container(&c, 0)).map_err(|e| format!("container {c}: {e}"))?;
    }
    let t = Instant::now();
    cri.block_on(cri.client().stop_pod_sandbox(&pod.id)).map_err(|e| format!("sandbox {}: {e}", pod.id))?;
    let stop = t.elapsed();
    let t = Instant::now();
    cri.block_on(cri.client().remove_pod_sandbox(&pod.id)).map_err(|e| format!("sandbox {}: {e}", pod.id))?;
    Ok((stop, t.elapsed()))
}

// ---------------------------------------------------------------------------------------------
// The host processes of a pod: memory and CPU.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Component {
    Shim,
    Qemu,
    Virtiofsd,
    Vsockd,
}

const COMPONENTS: [Component; 4] = [Component::Shim, Component::Qemu, Component::Virtiofsd, Component::Vsockd];

impl Component {
    fn of(argv0: &str) -> Option<Component> {
        if argv0.contains("containerd-shim-kata-v2") {
            Some(Component::Shim)
        } else if argv0.contains("qemu-system") {
            Some(Component::Qemu)
        } else if argv0.contains("virtiofsd") {
            Some(Component::Virtiofsd)
        } else if argv0.contains("vhost-device-vsock") {
            Some(Component::Vsockd)
        } else {
            None
        }
    }

    fn label(self) -> &'static str {
        match self {
            Component::Shim => "shim daemon",
            Component::Qemu => "QEMU (non-guest)",
            Component::Virtiofsd => "virtiofsd",
            Component::Vsockd => "vhost-device-vsock",
        }
    }

    /// How many processes of this kind serve one pod.
    fn expected(self) -> usize {
        match self {
            Component::Virtiofsd => 2,
            _ => 1,
        }
    }
}

/// Memory of one process from `/proc/<pid>/smaps`, in KiB, with the guest RAM mappings
/// (`/memfd:memory-backend-memfd`, hot-plugged `/memfd:hpmem*`) apart.
#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    /// PSS without guest RAM.
    pss: u64,
    /// PSS of guest RAM mappings.
    guest_pss: u64,
    /// RSS without guest RAM (shared pages counted in full).
    rss: u64,
    /// RSS of guest RAM mappings.
    guest_rss: u64,
    /// Private_Clean + Private_Dirty without guest RAM.
    uss: u64,
}

impl std::ops::AddAssign for Mem {
    fn add_assign(&mut self, o: Mem) {
        self.pss += o.pss;
        self.guest_pss += o.guest_pss;
        self.rss += o.rss;
        self.guest_rss += o.guest_rss;
        self.uss += o.uss;
    }
}

fn is_guest_ram(mapping: &str) -> bool {
    mapping.starts_with("/memfd:memory-backend-memfd") || mapping.starts_with("/memfd:hpmem")
}

/// Whether an smaps line starts a mapping (`<start>-<end> perms offset dev inode [path]`):
/// its permissions and path.
fn mapping_header(line: &str) -> Option<(String, String)> {
    let mut f = line.split_whitespace();
    let (a, b) = f.next()?.split_once('-')?;
    u64::from_str_radix(a, 16).ok()?;
    u64::from_str_radix(b, 16).ok()?;
    let perms = f.next()?.to_string();
    let rest: Vec<&str> = f.skip(3).collect();
    Some((perms, rest.join(" ")))
}

/// What a non-guest mapping is, for the breakdown of QEMU's memory.
fn mapping_kind(perms: &str, path: &str) -> &'static str {
    if path.is_empty() || path.starts_with("[anon") {
        if perms.contains('x') {
            // TCG's code_gen_buffer: the translated guest code (absent under KVM).
            "anonymous executable (TCG translation buffer)"
        } else {
            "anonymous (malloc arenas, thread stacks, device state)"
        }
    } else if path == "[heap]" {
        "heap"
    } else if path.starts_with("/memfd:") {
        "other memfd"
    } else if path.starts_with('/') {
        "files (the binary, libraries, firmware)"
    } else {
        "other ([stack], [vdso], ...)"
    }
}

/// PSS (KiB) of a process's non-guest mappings by [`mapping_kind`].
type Breakdown = BTreeMap<&'static str, u64>;

/// PSS (KiB) of a process's file mappings by path.
type Files = BTreeMap<String, u64>;

fn smaps(pid: u32) -> Result<(Mem, Breakdown, Files), String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).map_err(|e| format!("/proc/{pid}/smaps: {e}"))?;
    let mut m = Mem::default();
    let mut by_kind = Breakdown::new();
    let mut files = Files::new();
    let mut guest = false;
    let mut kind = "";
    let mut path = String::new();
    for line in text.lines() {
        if let Some((perms, p)) = mapping_header(line) {
            guest = is_guest_ram(&p);
            kind = mapping_kind(&perms, &p);
            path = p;
            continue;
        }
        let Some((key, value)) = line.split_once(':') else { continue };
        let kib = || value.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match (key, guest) {
            ("Pss", false) => {
                m.pss += kib();
                *by_kind.entry(kind).or_default() += kib();
                if path.starts_with('/') && !path.starts_with("/memfd:") {
                    *files.entry(path.clone()).or_default() += kib();
                }
            }
            ("Pss", true) => m.guest_pss += kib(),
            ("Rss", false) => m.rss += kib(),
            ("Rss", true) => m.guest_rss += kib(),
            ("Private_Clean" | "Private_Dirty", false) => m.uss += kib(),
            _ => {}
        }
    }
    Ok((m, by_kind, files))
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("").split_whitespace().collect();
    // After the command: state (field 3) ... utime (14), stime (15).
    let get =
        |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| format!("/proc/{pid}/stat: {stat:?}"));
    Ok(get(11)? + get(12)?)
}

/// One process serving a pod.
#[derive(Debug, Clone)]
struct PodProc {
    component: Component,
    pid: u32,
    cmdline: String,
}

/// The shim daemon, QEMU, virtiofsd and vhost-device-vsock processes whose command line
/// names sandbox `id` (as the leak checks find them).
fn pod_processes(id: &str) -> Vec<PodProc> {
    let mut v: Vec<PodProc> = leaks::processes()
        .into_iter()
        .filter(|p| leaks::mentions(&p.cmdline, id))
        .filter_map(|p| Component::of(&p.argv0).map(|component| PodProc { component, pid: p.pid, cmdline: p.cmdline }))
        .collect();
    v.sort_by_key(|p| (p.component, p.pid));
    v
}

/// A value of the QEMU command line: what follows `flag`.
fn qemu_arg<'a>(cmdline: &'a str, flag: &str) -> Option<&'a str> {
    let mut it = cmdline.split(' ');
    it.find(|a| *a == flag)?;
    it.next()
}

/// Memory and CPU of every pod of the parallel set.
struct Measured {
    /// Per pod: memory per component.
    mem: Vec<BTreeMap<Component, Mem>>,
    /// Per pod: CPU % of one CPU over the window, per component.
    cpu: Vec<BTreeMap<Component, f64>>,
    /// Sum over all processes of all pods.
    total: Mem,
    /// Processes per pod (all pods alike).
    per_pod_counts: BTreeMap<Component, usize>,
    /// From QEMU's command line of the first pod.
    accel: String,
    guest_memory: String,
    example: Vec<PodProc>,
    example_id: String,
    /// Per pod: QEMU's non-guest PSS by kind of mapping.
    qemu_kinds: Vec<Breakdown>,
    /// QEMU's file mappings of the first pod.
    qemu_files: Files,
}

fn measure(pods: &[Started]) -> Result<Measured> {
    let mut procs = Vec::new();
    for p in pods {
        let ps = pod_processes(&p.pod.id);
        for c in COMPONENTS {
            let n = ps.iter().filter(|x| x.component == c).count();
            if n != c.expected() {
                bail!("pod {} has {n} {} process(es), expected {}: {:#?}", p.pod.id, c.label(), c.expected(), ps);
            }
        }
        procs.push(ps);
    }
    let qemu = procs[0].iter().find(|p| p.component == Component::Qemu).map(|p| p.cmdline.clone()).unwrap_or_default();
    let accel = qemu_arg(&qemu, "-machine")
        .and_then(|m| m.split(',').find_map(|o| o.strip_prefix("accel=")))
        .unwrap_or("?")
        .to_string();
    let guest_memory = qemu_arg(&qemu, "-m").and_then(|m| m.split(',').next()).unwrap_or("?").to_string();
    let per_pod_counts = COMPONENTS.iter().map(|c| (*c, c.expected())).collect();

    // Memory: one pass over every process (a consistent snapshot as far as /proc allows).
    let mut mem = Vec::new();
    let mut qemu_kinds = Vec::new();
    let mut qemu_files = Files::new();
    let mut total = Mem::default();
    for ps in &procs {
        let mut m: BTreeMap<Component, Mem> = BTreeMap::new();
        for p in ps {
            let (x, kinds, files) = smaps(p.pid).map_err(anyhow::Error::msg)?;
            *m.entry(p.component).or_default() += x;
            total += x;
            if p.component == Component::Qemu {
                if qemu_kinds.is_empty() {
                    qemu_files = files;
                }
                qemu_kinds.push(kinds);
            }
        }
        mem.push(m);
    }

    // CPU: utime + stime over the window.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let read_all = || -> Result<Vec<Vec<u64>>> {
        procs.iter().map(|ps| ps.iter().map(|p| cpu_ticks(p.pid).map_err(anyhow::Error::msg)).collect()).collect()
    };
    let before = read_all()?;
    let t = Instant::now();
    std::thread::sleep(CPU_WINDOW);
    let after = read_all().context("a pod process exited during the CPU window")?;
    let window = s(t.elapsed());
    let mut cpu = Vec::new();
    for (i, ps) in procs.iter().enumerate() {
        let mut c: BTreeMap<Component, f64> = BTreeMap::new();
        for (j, p) in ps.iter().enumerate() {
            let ticks = after[i][j].saturating_sub(before[i][j]) as f64;
            *c.entry(p.component).or_default() += ticks / tck / window * 100.0;
        }
        cpu.push(c);
    }
    Ok(Measured {
        mem,
        cpu,
        total,
        per_pod_counts,
        accel,
        guest_memory,
        example: procs[0].clone(),
        example_id: pods[0].pod.id.clone(),
        qemu_kinds,
        qemu_files,
    })
}

// ---------------------------------------------------------------------------------------------
// The benchmark.

#[derive(Default)]
struct Report {
    /// Lines of the final summary block.
    summary: Vec<String>,
}

impl Report {
    fn add(&mut self, line: String) {
        self.summary.push(line);
    }
}

fn sequential(cri: &Cri, runs: usize, ids: &Mutex<Vec<String>>, report: &mut Report) -> Result<()> {
    println!("== one pod at a time: {runs} runs ==");
    let (mut totals, mut runs_t, mut creates, mut starts, mut stops, mut removes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let p = start_pod(cri, &format!("bench-seq-{i}"), ids, None).map_err(anyhow::Error::msg)?;
        let (stop, remove) = remove_pod(cri, &p.pod).map_err(anyhow::Error::msg)?;
        // Panics (after cleaning up) with what a removed pod left behind.
        cri.assert_pod_gone(&p.pod);
        println!(
            "  run {}: RunPodSandbox {:.2} s + CreateContainer {:.2} s + StartContainer {:.2} s = {:.2} s   \
             | StopPodSandbox {:.2} s, RemovePodSandbox {:.2} s   (sandbox {})",
            i + 1,
            s(p.run),
            s(p.create),
            s(p.start),
            s(p.total()),
            s(stop),
            s(remove),
            &p.pod.id[..12]
        );
        totals.push(s(p.total()));
        runs_t.push(s(p.run));
        creates.push(s(p.create));
        starts.push(s(p.start));
        stops.push(s(stop));
        removes.push(s(remove));
    }
    let total = Stats::of(&totals);
    let (r, c, st) = (Stats::of(&runs_t), Stats::of(&creates), Stats::of(&starts));
    let (stop, rm) = (Stats::of(&stops), Stats::of(&removes));
    println!("  RunPodSandbox+CreateContainer+StartContainer: {}", total.secs());
    println!("    of which RunPodSandbox {}, CreateContainer {}, StartContainer {}", r.secs(), c.secs(), st.secs());
    println!("  StopPodSandbox {}; RemovePodSandbox {}", stop.secs(), rm.secs());
    println!("  every pod removed without leftovers");
    report.add(format!("one pod through {}, {runs} runs: Run+Create+Start {}", cri.manager(), total.secs()));
    report.add(format!(
        "  medians: RunPodSandbox {:.2} s, CreateContainer {:.2} s, StartContainer {:.2} s",
        r.median, c.median, st.median
    ));
    report.add(format!("  teardown: StopPodSandbox {}, RemovePodSandbox {}", stop.secs(), rm.secs()));
    Ok(())
}

fn parallel(cri: &Cri, m: usize, ids: &Mutex<Vec<String>>, report: &mut Report) -> Result<()> {
    println!();
    println!("== {m} pods started in parallel (one thread each) ==");
    let barrier = Barrier::new(m);
    let results: Vec<Result<Started, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..m)
            .map(|i| {
                let barrier = &barrier;
                sc.spawn(move || start_pod(cri, &format!("bench-par-{i}"), ids, Some(barrier)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("the thread panicked".into()))).collect()
    });
    let errors: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().cloned()).collect();
    let pods: Vec<Started> = results.into_iter().filter_map(Result::ok).collect();
    if !errors.is_empty() {
        bail!("{} of {m} pods started in parallel failed:\n  {}\n{}", errors.len(), errors.join("\n  "), cri.logs());
    }
    let first = pods.iter().map(|p| p.began).min().unwrap();
    let last = pods.iter().map(|p| p.ended).max().unwrap();
    let wall = last - first;
    for (i, p) in pods.iter().enumerate() {
        println!(
            "  pod {:>2}: {:.2} s (RunPodSandbox {:.2} + CreateContainer {:.2} + StartContainer {:.2}), ready at +{:.2} s   (sandbox {})",
            i,
            s(p.total()),
            s(p.run),
            s(p.create),
            s(p.start),
            s(p.ended - first),
            &p.pod.id[..12]
        );
    }
    let lat = Stats::of(&pods.iter().map(|p| s(p.total())).collect::<Vec<_>>());
    println!(
        "  all {m} succeeded; per-pod latency min {:.2} s / median {:.2} s / max {:.2} s, spread {:.2} s; wall time {:.2} s",
        lat.min,
        lat.median,
        lat.max,
        lat.spread(),
        s(wall)
    );
    report.add(format!(
        "{m} pods in parallel: all {m} succeeded; per-pod Run+Create+Start min {:.2} s / median {:.2} s / max {:.2} s, \
         spread {:.2} s; wall {:.2} s for all {m}",
        lat.min,
        lat.median,
        lat.max,
        lat.spread(),
        s(wall)
    ));

    println!();
    println!(
        "== host memory and idle CPU of the {m} pods (after {} s idle; CPU over {} s) ==",
        IDLE_BEFORE_MEMORY.as_secs(),
        CPU_WINDOW.as_secs()
    );
    std::thread::sleep(IDLE_BEFORE_MEMORY);
    // On failure the pods are still removed (below) before the error is returned.
    let measured = measure(&pods).map(|meas| print_measured(&meas, m, report));

    // Tear the pods down in parallel, then check each (the harness's leak checks).
    println!();
    println!("== removing the {m} pods in parallel ==");
    let t = Instant::now();
    let removed: Vec<Result<(Duration, Duration), String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = pods.iter().map(|p| sc.spawn(move || remove_pod(cri, &p.pod))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("the thread panicked".into()))).collect()
    });
    let wall = t.elapsed();
    let errors: Vec<String> = removed.iter().filter_map(|r| r.as_ref().err().cloned()).collect();
    if !errors.is_empty() {
        bail!("removing the pods failed:\n  {}\n{}", errors.join("\n  "), cri.logs());
    }
    for p in &pods {
        cri.assert_pod_gone(&p.pod);
    }
    let stops = Stats::of(&removed.iter().map(|r| s(r.as_ref().unwrap().0)).collect::<Vec<_>>());
    let rms = Stats::of(&removed.iter().map(|r| s(r.as_ref().unwrap().1)).collect::<Vec<_>>());
    println!(
        "  StopPodSandbox {}; RemovePodSandbox {}; wall {:.2} s; every pod removed without leftovers",
        stops.secs(),
        rms.secs(),
        s(wall)
    );
    report.add(format!(
        "  teardown of the {m}: wall {:.2} s (StopPodSandbox median {:.2} s, RemovePodSandbox median {:.2} s)",
        s(wall),
        stops.median,
        rms.median
    ));
    measured
}

fn print_measured(meas: &Measured, m: usize, report: &mut Report) {
    println!("  processes of one pod (sandbox {}):", meas.example_id);
    for p in &meas.example {
        let cmd: String = p.cmdline.chars().take(150).collect();
        println!(
            "    {:<18} pid {:>7}  {cmd}{}",
            p.component.label(),
            p.pid,
            if p.cmdline.len() > 150 { " ..." } else { "" }
        );
    }
    println!("  accelerator {} (QEMU -machine), guest memory {} (QEMU -m)", meas.accel, meas.guest_memory);
    let per_pod = |f: &dyn Fn(&BTreeMap<Component, Mem>) -> u64| -> Stats {
        Stats::of(&meas.mem.iter().map(|x| mib(f(x))).collect::<Vec<_>>())
    };
    println!();
    println!(
        "  {:<34} {:>5} {:>10} {:>10} {:>10} {:>10} {:>11}",
        "component (per pod)", "procs", "PSS MiB", "min", "max", "RSS MiB", "idle CPU %"
    );
    let mut table = Vec::new();
    for c in COMPONENTS {
        let pss = per_pod(&|x| x.get(&c).map_or(0, |v| v.pss));
        let rss = per_pod(&|x| x.get(&c).map_or(0, |v| v.rss));
        let cpu = Stats::of(&meas.cpu.iter().map(|x| x.get(&c).copied().unwrap_or(0.0)).collect::<Vec<_>>());
        let row = format!(
            "  {:<34} {:>5} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>11.2}",
            c.label(),
            meas.per_pod_counts[&c],
            pss.median,
            pss.min,
            pss.max,
            rss.median,
            cpu.median
        );
        println!("{row}");
        table.push(row);
    }
    let sum = |x: &BTreeMap<Component, Mem>| x.values().map(|v| v.pss).sum::<u64>();
    let pod_pss = per_pod(&sum);
    let pod_rss = per_pod(&|x| x.values().map(|v| v.rss).sum::<u64>());
    let pod_cpu = Stats::of(&meas.cpu.iter().map(|x| x.values().sum::<f64>()).collect::<Vec<_>>());
    let row = format!(
        "  {:<34} {:>5} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>11.2}",
        "all of the pod (non-guest)",
        meas.per_pod_counts.values().sum::<usize>(),
        pod_pss.median,
        pod_pss.min,
        pod_pss.max,
        pod_rss.median,
        pod_cpu.median
    );
    println!("{row}");
    table.push(row);
    let guest = per_pod(&|x| x.values().map(|v| v.guest_pss).sum::<u64>());
    let qemu_guest_rss = per_pod(&|x| x.get(&Component::Qemu).map_or(0, |v| v.guest_rss));
    let row = format!(
        "  {:<34} {:>5} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>11}",
        "guest RAM touched (memfd, apart)", "", guest.median, guest.min, guest.max, qemu_guest_rss.median, ""
    );
    println!("{row}");
    table.push(row);
    println!("  (PSS: shared pages divided among the processes mapping them; RSS counts them in full. Guest RAM:");
    println!("   PSS of the memory-backend-memfd mappings summed over QEMU, virtiofsd and the vsock daemon, which");
    println!("   all map it; its RSS column is QEMU's mapping alone.)");

    // What QEMU's non-guest memory is (medians over the pods).
    let mut kinds: Vec<&'static str> = meas.qemu_kinds.iter().flat_map(|k| k.keys().copied()).collect();
    kinds.sort();
    kinds.dedup();
    let mut qemu_rows: Vec<(f64, &'static str)> = kinds
        .iter()
        .map(|k| {
            (
                Stats::of(&meas.qemu_kinds.iter().map(|x| mib(x.get(k).copied().unwrap_or(0))).collect::<Vec<_>>())
                    .median,
                *k,
            )
        })
        .collect();
    qemu_rows.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
    let qemu_line = qemu_rows.iter().map(|(v, k)| format!("{k} {v:.1}")).collect::<Vec<_>>().join(", ");
    println!();
    println!("  QEMU non-guest PSS by mapping (median MiB): {qemu_line}");
    let mut files: Vec<(&String, &u64)> = meas.qemu_files.iter().collect();
    files.sort_by(|a, b| b.1.cmp(a.1));
    let files_line = files.iter().take(4).map(|(p, k)| format!("{p} {:.1}", mib(**k))).collect::<Vec<_>>().join(", ");
    println!("  QEMU's largest file mappings (PSS MiB, first pod): {files_line}");

    let total_per_pod = mib(meas.total.pss) / m as f64;
    let uss = mib(meas.total.uss) / m as f64;
    println!();
    println!(
        "  all {m} pods: {:.1} MiB PSS without guest RAM (shared pages counted once) = {:.1} MiB per pod; \
         median per-pod PSS {:.1} MiB; private (USS) {:.1} MiB per pod",
        mib(meas.total.pss),
        total_per_pod,
        pod_pss.median,
        uss
    );
    println!(
        "  guest RAM touched: {:.1} MiB for all {m} pods, {:.1} MiB per pod (of {} each)",
        mib(meas.total.guest_pss),
        mib(meas.total.guest_pss) / m as f64,
        meas.guest_memory
    );
    println!(
        "  idle CPU: median {:.2} % of one CPU per pod, {:.1} % for all {m} (over {} s)",
        pod_cpu.median,
        meas.cpu.iter().map(|x| x.values().sum::<f64>()).sum::<f64>(),
        CPU_WINDOW.as_secs()
    );

    report.add(format!(
        "host memory per pod (shim + QEMU + virtiofsd x2 + vhost-device-vsock, guest RAM excluded, shared pages counted once): \
         {total_per_pod:.1} MiB (= {:.1} MiB PSS of all {m} pods / {m}); median per-pod PSS {:.1} MiB; USS {uss:.1} MiB per pod",
        mib(meas.total.pss),
        pod_pss.median
    ));
    report.add(format!(
        "  guest RAM touched (apart): median {:.1} MiB per pod of {} (accelerator {})",
        guest.median, meas.guest_memory, meas.accel
    ));
    report.add(format!(
        "  idle CPU per pod: median {:.2} % of one CPU (min {:.2}, max {:.2}) over {} s",
        pod_cpu.median,
        pod_cpu.min,
        pod_cpu.max,
        CPU_WINDOW.as_secs()
    ));
    report.add(format!(
        "  {:<34} {:>5} {:>10} {:>10} {:>10} {:>10} {:>11}",
        "component (per pod)", "procs", "PSS MiB", "min", "max", "RSS MiB", "idle CPU %"
    ));
    for row in table {
        report.add(row);
    }
    report.add(format!("  QEMU non-guest PSS by mapping (median MiB): {qemu_line}"));
    report.add(format!("  QEMU's largest file mappings (PSS MiB): {files_line}"));
}

/// The configuration the shim runs with, and the host.
fn describe(cri: &Cri, report: &mut Report) {
    let config_path = cri.kata_config().to_path_buf();
    let text = std::fs::read_to_string(&config_path).unwrap_or_default();
    println!("{}:   {} (handler {})", cri.manager(), cri.dir().display(), cri.handler());
    let st = cri.startup();
    println!(
        "startup:      manager {:.2} s, CRI ready {:.2} s, images {:.2} s",
        s(st.manager),
        s(st.cri_ready),
        s(st.images)
    );
    println!("shim:         {}", podvisor_tests::containerd::shim_binary().display());
    println!("configuration {} (KATA_CONF_FILE / ConfigPath):", config_path.display());
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        println!("    {l}");
    }
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let host = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let table: toml::Table = toml::from_str(&text).unwrap_or_default();
    let q = table.get("hypervisor").and_then(|h| h.get("qemu"));
    let key = |k: &str| q.and_then(|q| q.get(k)).map(|v| v.to_string()).unwrap_or_else(|| "?".into());
    let qemu_path = q.and_then(|q| q.get("path")).and_then(|p| p.as_str()).unwrap_or("qemu-system-x86_64");
    let qemu = std::process::Command::new(qemu_path)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
        .unwrap_or_default();
    println!("host:         {cpus} CPUs, kernel {host}, {qemu}");
    report.add(format!("host: {cpus} CPUs, kernel {host}, {qemu}"));
    report.add(format!(
        "config: {} (repository configuration, built guest image): default_memory = {} MiB, default_vcpus = {}, \
         accelerator = {}, virtio_fs_cache = {}",
        config_path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        key("default_memory"),
        key("default_vcpus"),
        key("accelerator"),
        key("virtio_fs_cache")
    ));
}

/// Containers per pod for the statistics round trip.
const STATS_CONTAINERS: usize = 10;
/// `ListContainerStats` calls timed per handler.
const STATS_CALLS: usize = 20;

/// A container for the stats round trip that ends on SIGTERM (the harness stops containers with
/// a grace period).
const STATS_CONTAINER_CMD: &[&str] = &["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"];

/// The kubelet's statistics round trip: one `ListContainerStats` for a pod of
/// [`STATS_CONTAINERS`] running containers under `handler` (every container answered with CPU
/// and memory), [`STATS_CALLS`] times after one warm-up call.
fn stats_round_trip(cri: &Cri, handler: &str, report: &mut Report) -> Result<Stats> {
    let config = cri.pod_config(&format!("stats-{handler}"));
    let pod = cri.run_pod_with_handler(&config, handler);
    for i in 0..STATS_CONTAINERS {
        cri.run_container(&pod, &cri.container_config(&format!("c{i}"), STATS_CONTAINER_CMD));
    }
    let call = || -> Result<Duration> {
        let t = Instant::now();
        let stats = cri.block_on(cri.client().list_container_stats(Some(&pod.id))).map_err(anyhow::Error::msg)?;
        let took = t.elapsed();
        let complete = stats.iter().filter(|s| s.cpu.is_some() && s.memory.is_some()).count();
        if complete != STATS_CONTAINERS {
            bail!("ListContainerStats ({handler}) answered {complete} of {STATS_CONTAINERS} containers: {stats:?}");
        }
        Ok(took)
    };
    let result = call().and_then(|_| (0..STATS_CALLS).map(|_| call().map(s)).collect::<Result<Vec<f64>>>());
    cri.remove_pod(&pod);
    let times = Stats::of(&result?);
    let ms = |v: f64| v * 1000.0;
    let line = format!(
        "  {} ListContainerStats, {STATS_CONTAINERS} {handler} containers: median {:.1} ms (min {:.1}, max {:.1}), \
         {STATS_CALLS} calls",
        cri.manager(),
        ms(times.median),
        ms(times.min),
        ms(times.max)
    );
    println!("{line}");
    report.add(line);
    Ok(times)
}

fn bench(cri: &Cri, runs: usize, pods: usize, ids: &Mutex<Vec<String>>, report: &mut Report) -> Result<()> {
    describe(cri, report);
    println!();
    if runs > 0 {
        sequential(cri, runs, ids, report)?;
    }
    if pods > 0 && cri.manager() == cri::Manager::Containerd {
        parallel(cri, pods, ids, report)?;
    }
    println!();
    println!("== the kubelet's stats round trip ({}) ==", cri.manager());
    let kata = stats_round_trip(cri, cri::KATA_HANDLER, report)?;
    let runc = stats_round_trip(cri, cri::RUNC_HANDLER, report)?;
    report.add(format!("  kata / runc (medians): {:.2}", kata.median / runc.median));
    Ok(())
}

/// What is left anywhere of the benchmark once its containerd is gone.
fn final_leaks(ids: &[String], dir: &Path, bridge: &str, netns: &[PathBuf]) -> Vec<String> {
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut found = leaks::settle(leaks::GRACE, || leaks::find_leaks(&ids, Some(dir)));
    if dir.exists() {
        found.push(format!("{} still exists", dir.display()));
    }
    if Path::new("/sys/class/net").join(bridge).exists() {
        found.push(format!("bridge {bridge}"));
    }
    for ns in netns.iter().filter(|n| n.exists()) {
        found.push(format!("network namespace {}", ns.display()));
    }
    found
}

fn main() -> Result<()> {
    // `make bench` builds the release shim: use it even when a debug build is newer.
    let release = podvisor_tests::workspace().join("target/release/containerd-shim-kata-v2");
    if std::env::var_os("PODVISOR_SHIM").is_none() && release.is_file() {
        std::env::set_var("PODVISOR_SHIM", &release);
    }
    let (mut runs, mut pods) = (5usize, 10usize);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse::<usize>().ok()).unwrap_or_else(|| usage());
        match a.as_str() {
            "--runs" => runs = num(),
            "--pods" => pods = num(),
            _ => usage(),
        }
    }
    if cri::handler() != cri::KATA_HANDLER {
        bail!("podvisor-cri-bench measures VMs: unset PODVISOR_CRI_HANDLER (it is {})", cri::handler());
    }
    println!("podvisor CRI benchmark: {runs} runs of one pod per manager, {pods} pods in parallel (containerd)");
    let started = Instant::now();
    let mut report = Report::default();
    let mut problems = Vec::new();
    for manager in cri::Manager::ALL {
        if let Err(why) = manager.available() {
            println!("\n{manager}: not measured: {why}");
            report.add(format!("{manager}: not measured: {why}"));
            continue;
        }
        println!("\n======== {manager} ========");
        problems.extend(run_manager(manager, runs, pods, &mut report));
    }
    println!();
    let outcome = if problems.is_empty() { "" } else { ", FAILED: partial" };
    println!("---- podvisor CRI benchmark summary ({:.0} s{outcome}) ----", s(started.elapsed()));
    for l in &report.summary {
        println!("{l}");
    }
    println!("---- end of summary ----");
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}

/// Everything measured through one manager, then its teardown and leak checks; the problems.
fn run_manager(manager: cri::Manager, runs: usize, pods: usize, report: &mut Report) -> Vec<String> {
    let cri = match Cri::try_start(manager) {
        Ok(c) => c,
        Err(e) => return vec![format!("starting {manager}: {e}")],
    };
    let dir = cri.dir().to_path_buf();
    let bridge = cri.network().bridge.clone();
    let ids = Mutex::new(Vec::new());
    let result = bench(&cri, runs, pods, &ids, report);
    if result.is_err() {
        // Remove what the failure left (the harness's Drop would call it a leak otherwise).
        if let Ok(list) = cri.block_on(cri.client().list_pod_sandbox()) {
            for p in list {
                let _ = cri.block_on(cri.client().stop_pod_sandbox(&p.id));
                let _ = cri.block_on(cri.client().remove_pod_sandbox(&p.id));
            }
        }
    }
    // The network namespaces of every pod, from the harness's records, for the last check.
    let netns: Vec<PathBuf> = std::fs::read_to_string(dir.join("cri-host-objects"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("netns ").map(PathBuf::from))
        .collect();
    // Dropping the harness removes pods still there, the bridge, the pod cgroups and the private
    // manager, and panics with what it had to clean up.
    let t = Instant::now();
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(cri)));
    let teardown = t.elapsed();
    let ids = ids.into_inner().unwrap();
    let left = final_leaks(&ids, &dir, &bridge, &netns);
    let cleaned = if left.is_empty() {
        Vec::new()
    } else {
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        leaks::force_cleanup(&refs, Some(&dir))
    };
    let mut problems = Vec::new();
    if let Err(e) = &result {
        problems.push(format!("{manager}: {e:#}"));
    }
    if dropped.is_err() {
        problems.push(format!("tearing down {manager} found leftovers (see the panic message above)"));
    }
    if !left.is_empty() {
        problems.push(format!("left behind:\n  {}\ncleaned up:\n  {}", left.join("\n  "), cleaned.join("\n  ")));
    }
    if problems.is_empty() {
        report.add(format!(
            "teardown: {manager} stopped and {} removed in {:.2} s; nothing left behind ({} sandbox and container ids \
             checked: processes, mounts, /run/kata-containers, cgroups, netns, veths, bridge)",
            dir.display(),
            s(teardown),
            ids.len()
        ));
        println!("\nteardown: {manager} and its bridge stopped in {:.2} s; nothing left behind", s(teardown));
    }
    problems
}
