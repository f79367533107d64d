//! The soak (`make soak`, `podvisor-soak`; 20 cycles in `tests/tests/soak.rs`): create/delete
//! cycles of a two-container pod through the CRI, alternating between containerd and CRI-O,
//! with one fault ([`crate::faults`]) injected every `fault_every`th cycle (QEMU, virtiofsd,
//! vhost-device-vsock, agent panic, shim in turn; the faults alternate between the managers, the
//! shim's runs on containerd only: CRI-O 1.36 cannot stop a pod whose shim died), counting
//! failures and what the cycles left behind (processes, mounts, taps, cgroups, run directories).
//!
//! The long-lived shim: each manager also runs one pod for the whole soak (a container that
//! sleeps), and every cycle on that manager uses it too (an `ExecSync` and a `ContainerStats`
//! through its shim, and a short-lived container created, started, stopped and removed in it).
//! With one shim per pod, a pod's shim lives only as long as the pod, so a leak per request or
//! per container (fds, memory) shows only in such a resident pod's shim; its open fds and RSS are
//! sampled at cycle 1, every 100th cycle, half-way and at the end.

use std::time::{Duration, Instant};

use crate::cri::{Cri, Manager, Pod};
use crate::faults::{self, Stage, Target};

/// The soak's settings.
#[derive(Debug, Clone, Copy)]
pub struct SoakOptions {
    /// Create/delete cycles (default 200).
    pub cycles: u32,
    /// Every `fault_every`th cycle injects a fault instead (default 10; 0: never).
    pub fault_every: u32,
}

impl Default for SoakOptions {
    fn default() -> Self {
        SoakOptions { cycles: 200, fault_every: 10 }
    }
}

/// The faults the soak cycles through, each in a running pod.
pub const FAULTS: [Target; 5] = [Target::Qemu, Target::Virtiofsd, Target::VsockDaemon, Target::Agent, Target::Shim];

/// Leftovers by kind, summed over the cycles (each found after the cycle's pod was removed and
/// the grace period passed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeakCounts {
    /// Shims, QEMU, virtiofsd, vhost-device-vsock processes (or any in the pod's cgroups).
    pub processes: usize,
    /// Mounts naming the pod or a container.
    pub mounts: usize,
    /// Tap devices in the host's network namespace.
    pub taps: usize,
    /// Cgroups (the runtime's and the pod cgroup).
    pub cgroups: usize,
    /// Entries under `/run/kata-containers`.
    pub run_dirs: usize,
    /// Anything else (the manager's records, bundles, veths, CNI results, sockets).
    pub other: usize,
}

impl LeakCounts {
    /// The sum.
    pub fn total(&self) -> usize {
        self.processes + self.mounts + self.taps + self.cgroups + self.run_dirs + self.other
    }

    /// Counts the items of a leak list (lines as [`crate::leaks::find_leaks`] and
    /// [`Cri::pod_leftovers`] write them).
    pub fn add(&mut self, items: &[String]) {
        for l in items {
            let l = l.trim_start();
            if l.starts_with("process") {
                self.processes += 1;
            } else if l.starts_with("mount") {
                self.mounts += 1;
            } else if l.starts_with("tap device") {
                self.taps += 1;
            } else if l.starts_with("cgroup") || l.starts_with("pod cgroup") {
                self.cgroups += 1;
            } else if l.starts_with("run directory") {
                self.run_dirs += 1;
            } else {
                self.other += 1;
            }
        }
    }
}

/// The long-lived shim's open fds and RSS at a cycle.
#[derive(Debug, Clone)]
pub struct ShimSample {
    /// After this cycle.
    pub cycle: u32,
    /// Whose shim.
    pub manager: Manager,
    /// Open file descriptors.
    pub fds: usize,
    /// Resident set size in KiB.
    pub rss_kib: u64,
}

/// What the soak saw.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// Cycles run.
    pub cycles: u32,
    /// Of which with a fault.
    pub faults: u32,
    /// Failed cycles, each with its reason.
    pub failures: Vec<String>,
    /// Leftovers.
    pub leaks: LeakCounts,
    /// The long-lived shims over time.
    pub shim_samples: Vec<ShimSample>,
    /// Managers not run, with the reason.
    pub skipped: Vec<String>,
    /// Wall time.
    pub took: Duration,
}

impl SoakReport {
    /// No failure and no leak.
    pub fn ok(&self) -> bool {
        self.failures.is_empty() && self.leaks.total() == 0
    }

    /// The report as text.
    pub fn text(&self) -> String {
        let l = &self.leaks;
        let mut out = format!(
            "soak: {} cycles ({} with a fault) in {:.0} s\nfailures: {}\nleaked: processes {} mounts {} taps {} cgroups {} \
             run directories {} other {}\n",
            self.cycles,
            self.faults,
            self.took.as_secs_f64(),
            self.failures.len(),
            l.processes,
            l.mounts,
            l.taps,
            l.cgroups,
            l.run_dirs,
            l.other
        );
        for s in &self.skipped {
            out += &format!("not run: {s}\n");
        }
        out += "long-lived shim (one resident pod per manager):\n";
        for s in &self.shim_samples {
            out += &format!(
                "  {:<10} cycle {:>4}: fds {:>4}  RSS {:>7} KiB\n",
                s.manager.to_string(),
                s.cycle,
                s.fds,
                s.rss_kib
            );
        }
        for f in &self.failures {
            out += &format!("FAILED {f}\n");
        }
        out
    }
}

/// A manager with its resident pod.
struct Node {
    cri: Cri,
    resident: Pod,
    resident_container: String,
    shim: u32,
}

/// Sleeps until SIGTERM.
const SLEEPER: &[&str] = &["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"];

fn start_node(m: Manager) -> Result<Node, String> {
    let cri = Cri::try_start(m)?;
    faults::enable_kernel_params(&cri);
    let resident = cri.try_run_pod(&cri.pod_config("soak-resident"))?;
    let config = cri.container_config("resident", SLEEPER);
    cri.prepare_container(&resident.config, &config);
    let id = cri
        .block_on(cri.client().create_container(&resident.id, &config, &resident.config))
        .map_err(|e| format!("resident CreateContainer: {e}"))?;
    cri.adopt_container(&resident.id, &id);
    cri.block_on(cri.client().start_container(&id)).map_err(|e| format!("resident StartContainer: {e}"))?;
    let shim = faults::shim_pid(&resident.id).ok_or("no shim process for the resident pod")?;
    Ok(Node { cri, resident, resident_container: id, shim })
}

fn err_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or(p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// One ordinary cycle: a two-container pod (one container execs), stopped and removed; the
/// resident pod used; the leftovers of the cycle's pod.
fn cycle(node: &Node, n: u32) -> Result<Vec<String>, String> {
    let cri = &node.cri;
    let pod = cri.try_run_pod(&cri.pod_config(&format!("soak-{n}")))?;
    let work = (|| -> Result<(), String> {
        let mut ids = Vec::new();
        for name in ["first", "second"] {
            let config = cri.container_config(name, SLEEPER);
            cri.prepare_container(&pod.config, &config);
            let id = cri
                .block_on(cri.client().create_container(&pod.id, &config, &pod.config))
                .map_err(|e| format!("CreateContainer {name}: {e}"))?;
            cri.adopt_container(&pod.id, &id);
            cri.block_on(cri.client().start_container(&id)).map_err(|e| format!("StartContainer {name}: {e}"))?;
            ids.push(id);
        }
        let r = cri
            .block_on(cri.client().exec_sync(&ids[0], &["echo", "soak"], 30))
            .map_err(|e| format!("ExecSync: {e}"))?;
        if r.exit_code != 0 || String::from_utf8_lossy(&r.stdout).trim() != "soak" {
            return Err(format!("ExecSync echo: {r:?}"));
        }
        for id in &ids {
            cri.block_on(cri.client().stop_container(id, 5)).map_err(|e| format!("StopContainer: {e}"))?;
        }
        Ok(())
    })();
    let resident = use_resident(node, n);
    let client = cri.client().with_timeout(Duration::from_secs(60));
    let stop = cri.block_on(client.stop_pod_sandbox(&pod.id)).map_err(|e| format!("StopPodSandbox: {e}"));
    let remove = cri.block_on(client.remove_pod_sandbox(&pod.id)).map_err(|e| format!("RemovePodSandbox: {e}"));
    let left = cri.pod_leaks(&pod);
    let cleaned = cri.fail_with_cleanup(&pod, left.clone());
    work?;
    resident?;
    stop?;
    remove?;
    if let Err(e) = cleaned {
        eprintln!("soak cycle {n}: {e}");
    }
    Ok(left)
}

/// An exec, the statistics and a short-lived container in the resident pod.
fn use_resident(node: &Node, n: u32) -> Result<(), String> {
    let cri = &node.cri;
    let c = &node.resident_container;
    let r = cri
        .block_on(cri.client().exec_sync(c, &["echo", "resident"], 30))
        .map_err(|e| format!("resident ExecSync: {e}"))?;
    if r.exit_code != 0 {
        return Err(format!("resident ExecSync: {r:?}"));
    }
    cri.block_on(cri.client().container_stats(c)).map_err(|e| format!("resident ContainerStats: {e}"))?;
    let config = cri.container_config(&format!("visitor-{n}"), &["true"]);
    cri.prepare_container(&node.resident.config, &config);
    let id = cri
        .block_on(cri.client().create_container(&node.resident.id, &config, &node.resident.config))
        .map_err(|e| format!("visitor CreateContainer: {e}"))?;
    cri.adopt_container(&node.resident.id, &id);
    cri.block_on(cri.client().start_container(&id)).map_err(|e| format!("visitor StartContainer: {e}"))?;
    crate::poll(Duration::from_secs(60), "the visitor container exits", || {
        let s = cri.block_on(cri.client().container_status(&id, false))?;
        (s.status.map(|s| s.state) == Some(crate::cri::proto::CONTAINER_EXITED))
            .then_some(())
            .ok_or("running".to_string())
    });
    cri.block_on(cri.client().remove_container(&id)).map_err(|e| format!("visitor RemoveContainer: {e}"))?;
    Ok(())
}

fn sample_at(cycle: u32, cycles: u32) -> bool {
    cycle == 1 || cycle % 100 == 0 || cycle == cycles || cycle == cycles / 2
}

/// Runs the soak (see the module documentation).
pub fn run(opts: SoakOptions) -> SoakReport {
    let started = Instant::now();
    let mut report = SoakReport::default();
    let mut nodes = Vec::new();
    for m in Manager::ALL {
        if let Err(why) = m.available() {
            eprintln!("soak: {m} not run: {why}");
            report.skipped.push(format!("{m}: {why}"));
            report.failures.push(format!("{m} could not run: {why}"));
            continue;
        }
        match start_node(m) {
            Ok(n) => nodes.push(n),
            Err(e) => report.failures.push(format!("starting {m} with its resident pod: {e}")),
        }
    }
    if nodes.is_empty() {
        report.failures.push("no container manager could run".into());
        report.took = started.elapsed();
        return report;
    }
    for n in 1..=opts.cycles {
        let fault = (opts.fault_every > 0 && n % opts.fault_every == 0)
            .then(|| FAULTS[((n / opts.fault_every - 1) as usize) % FAULTS.len()]);
        // Ordinary cycles alternate; faults alternate on their own count (every 10th cycle is
        // even), except the shim's, which runs where the manager can recover from it
        // (containerd: CRI-O 1.36 cannot stop a pod whose shim died, see faults.rs).
        let index = match fault {
            Some(Target::Shim) => nodes.iter().position(|n| n.cri.manager() == Manager::Containerd),
            Some(_) => Some((n / opts.fault_every) as usize % nodes.len()),
            None => Some((n as usize - 1) % nodes.len()),
        };
        let Some(index) = index else {
            eprintln!("soak cycle {n}/{}: shim fault skipped: containerd does not run", opts.cycles);
            report.cycles = n;
            continue;
        };
        let node = &nodes[index];
        let m = node.cri.manager();
        let t = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match fault {
            Some(target) => {
                report.faults += 1;
                let r = faults::run_case(&node.cri, target, Stage::Running).map(|_| Vec::new());
                use_resident(node, n).and(r)
            }
            None => cycle(node, n),
        }))
        .unwrap_or_else(|p| Err(err_text(p)));
        let what = fault.map(|f| format!(" ({f} killed)")).unwrap_or_default();
        match r {
            Ok(left) => {
                report.leaks.add(&left);
                eprintln!(
                    "soak cycle {n}/{} {m}{what}: ok in {:.1} s{}",
                    opts.cycles,
                    t.elapsed().as_secs_f64(),
                    if left.is_empty() { String::new() } else { format!("; LEFT: {left:?}") }
                );
            }
            Err(e) => {
                // A fault case's leftovers are in its error (it cleaned them up).
                let items: Vec<String> = e
                    .lines()
                    .skip_while(|l| !l.starts_with("left behind by"))
                    .skip(1)
                    .take_while(|l| l.starts_with("  "))
                    .map(String::from)
                    .collect();
                report.leaks.add(&items);
                eprintln!(
                    "soak cycle {n}/{} {m}{what}: FAILED in {:.1} s: {e}",
                    opts.cycles,
                    t.elapsed().as_secs_f64()
                );
                report
                    .failures
                    .push(format!("cycle {n} ({m}{what}): {}", e.lines().take(6).collect::<Vec<_>>().join(" | ")));
            }
        }
        report.cycles = n;
        if sample_at(n, opts.cycles) {
            for node in &nodes {
                match faults::fds_and_rss(node.shim) {
                    Some((fds, rss_kib)) => {
                        eprintln!(
                            "soak cycle {n}: resident shim of {}: fds {fds}, RSS {rss_kib} KiB",
                            node.cri.manager()
                        );
                        report.shim_samples.push(ShimSample { cycle: n, manager: node.cri.manager(), fds, rss_kib })
                    }
                    None => report.failures.push(format!(
                        "cycle {n}: the resident pod's shim ({}, pid {}) is gone",
                        node.cri.manager(),
                        node.shim
                    )),
                }
            }
        }
    }
    for node in nodes {
        let cri = &node.cri;
        let client = cri.client().with_timeout(Duration::from_secs(60));
        let _ = cri.block_on(client.stop_container(&node.resident_container, 5));
        let stop = cri.block_on(client.stop_pod_sandbox(&node.resident.id));
        let remove = cri.block_on(client.remove_pod_sandbox(&node.resident.id));
        if let Err(e) = stop.and(remove) {
            report.failures.push(format!("removing the resident pod ({}): {e}", cri.manager()));
        }
        let left = cri.pod_leaks(&node.resident);
        report.leaks.add(&left);
        if let Err(e) = cri.fail_with_cleanup(&node.resident, left) {
            report.failures.push(format!("the resident pod ({}): {}", cri.manager(), e.lines().next().unwrap_or("")));
        }
    }
    report.took = started.elapsed();
    report
}
