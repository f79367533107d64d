//! Shared helpers of podvisor's end-to-end tests, demo and benchmarks: where the built guest
//! image is, a test configuration, a logger, and leak checks.

#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use hypervisor::QemuConfig;

pub mod containerd;
pub mod cri;
pub mod crio;
pub mod crio_server;
pub mod debug_console;
pub mod faults;
pub mod image;
pub mod journal;
pub mod kata_monitor;
pub mod leaks;
pub mod peerpods;
pub mod prom;
pub mod prometheus;
pub mod registry;
pub mod soak;
pub mod stream;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The guest image directory: `$PODVISOR_GUEST_DIR` or `<workspace>/build/guest`.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("PODVISOR_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("build/guest"))
}

/// A built guest asset; panics with the command that builds it when it is missing (a missing
/// prerequisite is a test failure, never a skip).
pub fn guest_asset(name: &str) -> PathBuf {
    let p = guest_dir().join(name);
    assert!(p.exists(), "guest asset {} is missing: run `make guest-image` first", p.display());
    p
}

/// A configuration for test VMs: the built image, 512 MiB, room to hot-plug, TCG or KVM as the
/// host allows.
pub fn test_config() -> QemuConfig {
    QemuConfig {
        kernel: guest_asset("vmlinux.container"),
        initrd: guest_asset("kata-containers-initrd.img"),
        default_memory: 512,
        default_maxmemory: 2048,
        memory_slots: 4,
        default_maxvcpus: 2,
        ..QemuConfig::default()
    }
}

/// A sandbox id unique to this process and call.
pub fn unique_id(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("podvisor-test-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

struct TestWriter;

impl std::io::Write for TestWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // eprint! is captured by the test harness; raw stderr writes are not.
        eprint!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A logger whose output the test harness captures (shown for failing tests).
pub fn logger() -> slog::Logger {
    use slog::Drain;
    let decorator = slog_term::PlainSyncDecorator::new(TestWriter);
    let drain = slog_term::FullFormat::new(decorator).build().fuse();
    slog::Logger::root(drain, slog::o!())
}

/// Whether a process is still alive (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && alive(pid) {
                found.push(format!("{pid}: {cmd}"));
            }
        }
    }
    found
}

/// Asserts that nothing of VM `id` remains: no process naming it, none of `pids`, no run
/// directory.
pub fn assert_nothing_left(id: &str, pids: &[u32]) {
    let run_dir = Path::new(hypervisor::qemu::DEFAULT_RUN_ROOT).join(id);
    assert!(!run_dir.exists(), "run directory {} was left behind", run_dir.display());
    for pid in pids {
        assert!(!alive(*pid), "process {pid} of VM {id} is still alive");
    }
    let procs = processes_mentioning(id);
    assert!(procs.is_empty(), "processes of VM {id} left behind: {procs:?}");
}

/// Proportional set size of a process in KiB (from smaps_rollup).
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines().find(|l| l.starts_with("Pss:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// `kata_guest_meminfo{item="<item>"}` from the agent's metrics text (Kata's item names, e.g.
/// `mem_total`), in bytes.
pub fn guest_meminfo(metrics: &str, item: &str) -> Option<u64> {
    let prefix = format!("kata_guest_meminfo{{item=\"{item}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse::<f64>().ok()).map(|v| v as u64)
}

/// Median of a non-empty list.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_metric_is_parsed() {
        let m = "# HELP x\nkata_guest_meminfo{item=\"mem_free\"} 5\nkata_guest_meminfo{item=\"mem_total\"} 536870912\n";
        assert_eq!(guest_meminfo(m, "mem_total"), Some(536870912));
        assert_eq!(guest_meminfo(m, "Nope"), None);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}

/// Polls `check` every 100 ms until it returns `Ok`, failing the test with `what` and the last
/// error after `timeout`.
pub fn poll<T>(timeout: std::time::Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if std::time::Instant::now() > deadline => panic!("{what} within {timeout:?}: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// Waits until a daemon listens on `socket`; fails early when it exits, naming `what` and
/// giving `logs()` (its log tail).
pub fn wait_for_socket(
    child: &mut std::process::Child,
    socket: &Path,
    what: &str,
    timeout: std::time::Duration,
    logs: impl Fn() -> String,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited during startup ({status}):\n{}", logs()));
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("{what} did not listen on {} within {timeout:?}:\n{}", socket.display(), logs()));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Stops a daemon: SIGTERM, up to 10 s, then SIGKILL; reaped. Returns what went wrong
/// (ignoring SIGTERM, or having exited before), naming `what`, with `logs()` for the latter.
pub fn stop_daemon(child: &mut std::process::Child, what: &str, logs: impl Fn() -> String) -> Vec<String> {
    signal_daemon(child, what, nix::sys::signal::Signal::SIGTERM, logs)
}

/// Sends `signal` to a daemon, waits up to 10 s for it to exit, then SIGKILLs it; reaped.
/// Returns what went wrong (ignoring the signal, or having exited before), naming `what`, with
/// `logs()` for the latter.
pub fn signal_daemon(
    child: &mut std::process::Child,
    what: &str,
    signal: nix::sys::signal::Signal,
    logs: impl Fn() -> String,
) -> Vec<String> {
    let mut left = Vec::new();
    if !matches!(child.try_wait(), Ok(None)) {
        left.push(format!("{what} had exited by itself:\n{}", logs()));
        return left;
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if matches!(child.try_wait(), Ok(None)) {
        left.push(format!("{what} ignored {signal} for 10 s and was killed"));
        let _ = child.kill();
    }
    let _ = child.wait();
    left
}
