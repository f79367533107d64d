//! `kata-monitor` for end-to-end tests and the benchmark: the built binary started with Kata's
//! flags (`--listen-address 127.0.0.1:<free port> --runtime-endpoint <CRI socket>`), its
//! `/metrics` scraped over HTTP (plain or gzip), its own CPU time from `/proc`; killed on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::prometheus::{free_port, http_get, HttpAnswer};

/// The built monitor: `$PODVISOR_MONITOR`, or the newer of `target/{release,debug}/kata-monitor`.
/// Panics with the build command when neither exists.
pub fn monitor_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PODVISOR_MONITOR").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "PODVISOR_MONITOR={} does not exist", p.display());
        return p;
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| crate::workspace().join("target"));
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("kata-monitor"))
        .filter_map(|p| fs::metadata(&p).and_then(|m| m.modified()).ok().map(|t| (p, t)))
        .max_by_key(|(_, t)| *t)
        .map(|(p, _)| p)
        .unwrap_or_else(|| {
            panic!(
                "{}/{{release,debug}}/kata-monitor is missing: run `cargo build -p podvisor-monitor` (or --release) first",
                target.display()
            )
        })
}

/// The CPU time (user + system) of process `pid` so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3, utime field 14, stime field 15 (proc(5)).
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// A running `kata-monitor` (see the module documentation).
pub struct KataMonitor {
    child: Option<Child>,
    address: String,
    log: PathBuf,
}

impl KataMonitor {
    /// Starts the monitor for the CRI at `runtime_endpoint`, its log in `log_dir`, and waits
    /// until `/metrics` answers 200 (30 s).
    pub fn start(runtime_endpoint: &Path, log_dir: &Path) -> Result<KataMonitor, String> {
        let binary = monitor_binary();
        let mut last = String::new();
        // The free port may be taken before the monitor binds it: retried on a new one.
        for _ in 0..3 {
            let address = format!("127.0.0.1:{}", free_port());
            let log = log_dir.join(format!("kata-monitor-{}.log", address.replace([':', '.'], "_")));
            let out = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
            let child = Command::new(&binary)
                .arg("--listen-address")
                .arg(&address)
                .arg("--runtime-endpoint")
                .arg(runtime_endpoint)
                .arg("--log-level")
                .arg("debug")
                .stdin(Stdio::null())
                .stdout(out.try_clone().map_err(|e| e.to_string())?)
                .stderr(out)
                .spawn()
                .map_err(|e| format!("starting {}: {e}", binary.display()))?;
            let mut me = KataMonitor { child: Some(child), address, log };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(st) = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    me.child = None;
                    last = format!("{} exited ({st}) before answering:\n{}", binary.display(), me.logs());
                    break;
                }
                match me.get("/metrics", false, Duration::from_secs(10)) {
                    Ok(a) if a.status == 200 => return Ok(me),
                    Ok(a) => last = format!("/metrics answered {}: {}", a.status, a.text()),
                    Err(e) => last = e,
                }
                if Instant::now() > deadline {
                    return Err(format!("kata-monitor on {} not ready within 30 s: {last}\n{}", me.address, me.logs()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Err(last)
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The monitor's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// `GET path` (with `Accept-Encoding: gzip` when `gzip`), bounded by `timeout`.
    pub fn get(&self, path: &str, gzip: bool, timeout: Duration) -> Result<HttpAnswer, String> {
        let headers: &[(&str, &str)] = if gzip { &[("Accept-Encoding", "gzip")] } else { &[] };
        http_get(&format!("http://{}{path}", self.address), &[], headers, timeout)
    }

    /// One scrape of `/metrics` as Prometheus text (must answer 200 within `timeout`).
    pub fn scrape(&self, timeout: Duration) -> Result<String, String> {
        let a = self.get("/metrics", false, timeout)?;
        if a.status != 200 {
            return Err(format!("kata-monitor /metrics answered {}: {}\n{}", a.status, a.text(), self.logs()));
        }
        Ok(a.text())
    }

    /// The monitor's log tail (40 lines).
    pub fn logs(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for KataMonitor {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !matches!(c.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
