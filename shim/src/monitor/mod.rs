//! The shim's per-sandbox metrics endpoint (Kata's shim monitor socket): HTTP/1.1 on
//! `/run/vc/sbs/<sandbox-id>/shim-monitor.sock`, serving `GET /metrics` (Prometheus text) and
//! `GET /agent-url`. Metrics are computed when asked and never kept: nothing runs while
//! nobody scrapes. Names, types, units and labels follow Kata's metrics design:
//!
//! - `kata_shim_*`: this process (`fds`, `threads`, `proc_stat`, `proc_status`, `io_stat`,
//!   `process_*`), `pod_overhead_cpu` / `pod_overhead_memory_in_bytes`, and
//!   `agent_rpc_durations_histogram_milliseconds` by `action` (recorded around every agent
//!   call, `crate::agent::VmWatchedAgent`), `rpc_durations_histogram_milliseconds` by task API
//!   `action` (`crate::service`);
//! - `kata_hypervisor_*`: QEMU's process; `kata_virtiofsd_*`: virtiofsd's;
//! - `kata_agent_*` / `kata_guest_*`: the guest's `GetMetrics` answer, untrusted
//!   ([`guest`]: size, time and names bounded). A failing guest never fails the scrape.
//!
//! - `process.rs`: one process's `/proc` families; `guest.rs`: the guest text filter;
//!   `server.rs`: the HTTP server and its limits.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use hypervisor::{AgentChannel, Hypervisor};
use prometheus::{Encoder, Gauge, HistogramOpts, HistogramVec, Opts, Registry, TextEncoder};
use slog::{debug, warn, Logger};

use crate::agent::Agent;

pub mod guest;
pub mod process;
mod server;

#[cfg(test)]
mod tests;

pub use server::MonitorHandle;

/// Where the monitor sockets live (Kata Go runtime's path).
pub const MONITOR_ROOT: &str = "/run/vc/sbs";

/// The socket's name in the sandbox's directory.
pub const SOCKET_NAME: &str = "shim-monitor.sock";

/// How long the guest may take to answer for one scrape (GetMetrics and the containers' stats
/// together).
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// The directory of sandbox `id`'s monitor socket.
pub fn sandbox_dir(id: &str) -> PathBuf {
    Path::new(MONITOR_ROOT).join(id)
}

/// The monitor socket of sandbox `id`.
pub fn socket_path(id: &str) -> PathBuf {
    sandbox_dir(id).join(SOCKET_NAME)
}

/// Removes sandbox `id`'s monitor directory (the shim at exit, `delete` after a dead shim).
pub fn remove_dir(id: &str) -> std::io::Result<()> {
    if id.is_empty() || id == "." || id == ".." || id.contains('/') {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{id:?} is not a sandbox id")));
    }
    match std::fs::remove_dir_all(sandbox_dir(id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// What one scrape needs of a running sandbox, taken without holding any pod lock.
#[derive(Clone)]
pub struct VmView {
    /// The VM.
    pub vm: Arc<dyn Hypervisor>,
    /// Its agent.
    pub agent: Arc<dyn Agent>,
    /// The pod's containers (for the guest side of the pod overhead).
    pub containers: Vec<String>,
}

/// Gives the running sandbox, or `None` while no VM runs; must not block.
pub type Source = Arc<dyn Fn() -> Option<VmView> + Send + Sync>;

/// Agent RPC durations by Kata's action name (`grpc.<Request type>`), for the whole process.
static AGENT_RPC_DURATIONS: LazyLock<HistogramVec> = LazyLock::new(|| {
    HistogramVec::new(
        HistogramOpts::new("agent_rpc_durations_histogram_milliseconds", "RPC latency distributions.")
            .namespace("kata_shim")
            .buckets(prometheus::exponential_buckets(1.0, 2.0, 10).expect("valid buckets")),
        &["action"],
    )
    .expect("valid histogram")
});

/// Task API durations by Kata's action name (`create`, `state`, `wait`, ...).
static TASK_RPC_DURATIONS: LazyLock<HistogramVec> = LazyLock::new(|| {
    HistogramVec::new(
        HistogramOpts::new("rpc_durations_histogram_milliseconds", "RPC latency distributions.")
            .namespace("kata_shim")
            .buckets(prometheus::exponential_buckets(1.0, 2.0, 10).expect("valid buckets")),
        &["action"],
    )
    .expect("valid histogram")
});

/// Times one task API call; the duration is recorded when the timer is dropped.
pub struct RpcTimer {
    action: &'static str,
    started: Instant,
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        TASK_RPC_DURATIONS.with_label_values(&[self.action]).observe(self.started.elapsed().as_secs_f64() * 1000.0);
    }
}

/// Starts timing task API call `action` (the method's name, as Kata labels it).
pub fn time_task_rpc(action: &'static str) -> RpcTimer {
    RpcTimer { action, started: Instant::now() }
}

/// Records one agent call of Kata action `action` (e.g. `grpc.CreateContainerRequest`).
pub fn observe_agent_rpc(action: &str, took: Duration) {
    AGENT_RPC_DURATIONS.with_label_values(&[action]).observe(took.as_secs_f64() * 1000.0);
}

/// The number of agent calls recorded for `action` so far.
pub fn agent_rpc_count(action: &str) -> u64 {
    AGENT_RPC_DURATIONS.with_label_values(&[action]).get_sample_count()
}

/// Guest answers that failed or were refused, for the log.
static GUEST_FAILURES: AtomicU64 = AtomicU64::new(0);

/// What one scrape produced, besides its text.
#[derive(Debug, Default)]
pub struct ScrapeInfo {
    /// Whether the guest's families are in the text.
    pub guest: bool,
    /// Guest samples dropped by the filter.
    pub dropped: usize,
}

/// The `/agent-url` answer: where the shim reaches the agent.
pub fn agent_url(channel: &AgentChannel) -> String {
    match channel {
        AgentChannel::HybridVsock { uds, port } => format!("hvsock://{}:{port}", uds.display()),
        AgentChannel::Vsock { cid, port } => format!("vsock://{cid}:{port}"),
        AgentChannel::Unix { path } => format!("remote://{}", path.display()),
    }
}

/// Computes the whole text of one scrape.
pub async fn scrape(source: &Source, log: &Logger) -> (String, ScrapeInfo) {
    let view = source();
    let registry = Registry::new();
    if let Err(e) = host_families(&registry, view.as_ref()) {
        warn!(log, "metrics: cannot build a host family"; "error" => %e);
    }
    let mut info = ScrapeInfo::default();
    let mut guest_families = Vec::new();
    if let Some(view) = &view {
        let started = Instant::now();
        let (text, overhead) = guest_side(view).await;
        if let Some((cpu, mem)) = overhead {
            let _ = set_overhead(&registry, cpu, mem);
        }
        let failure = match text.and_then(|t| guest::accept(&t)) {
            Ok(g) => {
                info.guest = true;
                info.dropped = g.dropped;
                guest_families = g.families;
                None
            }
            Err(e) => Some(e),
        };
        if let Some(why) = failure {
            let n = GUEST_FAILURES.fetch_add(1, Ordering::Relaxed) + 1;
            // Warnings at the 1st, 2nd, 4th, 8th... failure: a guest without GetMetrics fails
            // every scrape.
            if n.is_power_of_two() {
                warn!(log, "metrics: the guest's families are left out"; "error" => %why, "failures" => n);
            } else {
                debug!(log, "metrics: the guest's families are left out"; "error" => %why, "failures" => n);
            }
        }
        if info.dropped > 0 {
            debug!(log, "metrics: guest samples dropped"; "dropped" => info.dropped, "took_ms" => started.elapsed().as_millis() as u64);
        }
    }
    let mut families = registry.gather();
    // The process collector's `_threads` is not one of Kata's (Go's collector has none);
    // `kata_shim_threads` says the same.
    families.retain(|f| !f.name().ends_with("_process_threads"));
    families.extend(guest_families);
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        warn!(log, "metrics: cannot encode"; "error" => %e);
    }
    (String::from_utf8(out).unwrap_or_default(), info)
}

/// The shim's, QEMU's and virtiofsd's `/proc` families and the agent RPC histogram.
fn host_families(registry: &Registry, view: Option<&VmView>) -> prometheus::Result<()> {
    let all = process::Families { counts: true, usage: true, netdev: true };
    // No `kata_shim_netdev` (Kata's Go shim has none either): the shim runs in the node's
    // network namespace, whose every interface (a tap per pod) would be repeated by every pod.
    if let Ok(me) = procfs::process::Process::myself() {
        let fams = process::Families { netdev: false, ..all };
        process::register(registry, "kata_shim", "Kata containerd shim v2", &me, &me, fams)?;
    }
    registry.register(Box::new(prometheus::process_collector::ProcessCollector::new(
        std::process::id() as i32,
        "kata_shim",
    )))?;
    registry.register(Box::new(AGENT_RPC_DURATIONS.clone()))?;
    registry.register(Box::new(TASK_RPC_DURATIONS.clone()))?;
    let Some(view) = view else { return Ok(()) };
    let pids = view.vm.helper_pids();
    if let Some(p) = pids.vmm.and_then(|p| procfs::process::Process::new(p as i32).ok()) {
        process::register(registry, "kata_hypervisor", "Hypervisor", &p, &p, all)?;
    }
    if let Some(pid) = pids.virtiofsd {
        if let Ok(p) = procfs::process::Process::new(pid as i32) {
            let worker = process::worker_of(pid as i32);
            let fams = process::Families { netdev: false, ..all };
            process::register(registry, "kata_virtiofsd", "Virtiofsd", &p, worker.as_ref().unwrap_or(&p), fams)?;
        }
    }
    Ok(())
}

fn set_overhead(registry: &Registry, cpu: f64, mem: f64) -> prometheus::Result<()> {
    let g = Gauge::with_opts(
        Opts::new("pod_overhead_cpu", "Kata Pod overhead for CPU resources(percent).").namespace("kata_shim"),
    )?;
    g.set(cpu);
    registry.register(Box::new(g))?;
    let g = Gauge::with_opts(
        Opts::new("pod_overhead_memory_in_bytes", "Kata Pod overhead for memory resources(bytes).")
            .namespace("kata_shim"),
    )?;
    g.set(mem);
    registry.register(Box::new(g))?;
    Ok(())
}

/// The guest's text and the pod overhead (cpu percent, memory bytes), asked concurrently and
/// each given up at [`GUEST_TIMEOUT`] (one slow answer does not lose the other).
async fn guest_side(view: &VmView) -> (Result<String, String>, Option<(f64, f64)>) {
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    let text = async {
        match tokio::time::timeout_at(deadline, view.agent.metrics()).await {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(e)) => Err(format!("GetMetrics: {e}")),
            Err(_) => Err(format!("the guest did not answer GetMetrics within {GUEST_TIMEOUT:?}")),
        }
    };
    let overhead = async { tokio::time::timeout_at(deadline, overhead(view)).await.ok().flatten() };
    tokio::join!(text, overhead)
}

/// Kata's pod overhead: what the VM's host processes use beyond what the guest's containers
/// use. Kata samples twice a second apart after a scrape and serves the result on the next;
/// nothing is kept here, so CPU is averaged over the VM's life instead: (host CPU seconds of
/// QEMU, virtiofsd and the vsock daemon - the containers' CPU seconds) / VM age * 100. Memory:
/// those processes' resident bytes - the containers' memory usage.
async fn overhead(view: &VmView) -> Option<(f64, f64)> {
    let pids = view.vm.helper_pids();
    let vmm = pids.vmm? as i32;
    let (mut host_cpu, mut host_mem, age) = process::usage(vmm)?;
    for pid in [pids.virtiofsd, pids.vsockd].into_iter().flatten() {
        if let Some((cpu, mem, _)) = process::usage(pid as i32) {
            host_cpu += cpu;
            host_mem += mem;
        }
        if let Some(worker) = process::worker_of(pid as i32) {
            if let Some((cpu, mem, _)) = process::usage(worker.pid) {
                host_cpu += cpu;
                host_mem += mem;
            }
        }
    }
    let (mut guest_cpu, mut guest_mem) = (0.0, 0.0);
    for c in &view.containers {
        let s = view.agent.stats_container(c).await.ok()?;
        let cg = s.cgroup_stats.as_ref()?;
        guest_cpu += cg.cpu_stats.cpu_usage.total_usage as f64 / 1e9;
        guest_mem += cg.memory_stats.usage.usage as f64;
    }
    Some(((host_cpu - guest_cpu) / age * 100.0, host_mem - guest_mem))
}

/// Starts the endpoint of sandbox `id`: creates `/run/vc/sbs/<id>/` (mode 0700) and serves
/// its socket until the handle is stopped or dropped, which removes the directory.
pub fn start(id: &str, source: Source, log: &Logger) -> std::io::Result<MonitorHandle> {
    server::start(sandbox_dir(id), source, log.clone())
}
