//! A container's cgroup v2 directory: its processes, statistics, limits, OOM kills and removal.
//!
//! Statistics are read from the files directly (not libcgroups' `stats()`, which fails as a
//! whole when one controller is not enabled): a missing file reads as zero.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::os::fd::{AsFd, AsRawFd, RawFd};

use agent_protocol::agent as pb;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Where the guest's cgroup2 hierarchy is mounted (by `init.rs`).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// One container cgroup: `rel` is the path below the cgroup2 mount (`/podvisor/<sb>/<id>`).
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub root: PathBuf,
    pub rel: PathBuf,
}

impl Cgroup {
    pub fn new(root: impl Into<PathBuf>, rel: impl Into<PathBuf>) -> Self {
        Self { root: root.into(), rel: rel.into() }
    }

    pub fn dir(&self) -> PathBuf {
        self.root.join(self.rel.strip_prefix("/").unwrap_or(&self.rel))
    }

    fn read(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.dir().join(file)).ok()
    }

    /// Every process in the cgroup and its descendants, sorted.
    pub fn procs(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in subtree(&self.dir()) {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs everything in the cgroup (`cgroup.kill`, Linux 5.14+; else one by one).
    pub fn kill_all(&self) {
        let dir = self.dir();
        if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.procs() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// The `oom_kill` count of `memory.events` (None without the memory controller).
    pub fn oom_kills(&self) -> Option<u64> {
        parse_keyed(&self.read("memory.events")?).get("oom_kill").copied()
    }

    /// Its `memory.events` file (absent without the memory controller).
    pub fn memory_events(&self) -> PathBuf {
        self.dir().join("memory.events")
    }

    /// Removes the cgroup and its descendants (deepest first); they must be empty of
    /// processes. Retries briefly while the kernel finishes tearing down exited tasks.
    pub fn remove(&self) -> Result<(), String> {
        let mut dirs = subtree(&self.dir());
        dirs.reverse();
        for dir in dirs {
            let mut last = None;
            for _ in 0..20 {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Some(e) = last {
                return Err(format!("remove cgroup {}: {e}", dir.display()));
            }
        }
        Ok(())
    }

    /// Applies memory/CPU/pids/... limits with libcgroups' v2 controllers.
    pub fn update(&self, resources: &libcontainer::oci_spec::runtime::LinuxResources) -> Result<(), String> {
        use libcgroups::common::{CgroupManager, ControllerOpt};
        let manager = libcgroups::v2::manager::Manager::new(self.root.clone(), self.rel.clone())
            .map_err(|e| format!("cgroup {}: {e}", self.rel.display()))?;
        let opt = ControllerOpt { resources, disable_oom_killer: false, oom_score_adj: None, freezer_state: None };
        manager.apply(&opt).map_err(|e| format!("cgroup {}: {}", self.rel.display(), error_chain(&e)))
    }

    /// The cgroup's statistics in Kata's message.
    pub fn stats(&self) -> pb::CgroupStats {
        let num = |f: &str| self.read(f).and_then(|t| parse_value(&t));
        let keyed = |f: &str| self.read(f).map(|t| parse_keyed(&t)).unwrap_or_default();
        let cpu = keyed("cpu.stat");
        let get = |m: &HashMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        let mut stats = pb::CgroupStats::new();
        stats.cpu_stats = Some(pb::CpuStats {
            cpu_usage: Some(pb::CpuUsage {
                total_usage: get(&cpu, "usage_usec") * 1000,
                usage_in_usermode: get(&cpu, "user_usec") * 1000,
                usage_in_kernelmode: get(&cpu, "system_usec") * 1000,
                ..Default::default()
            })
            .into(),
            throttling_data: Some(pb::ThrottlingData {
                periods: get(&cpu, "nr_periods"),
                throttled_periods: get(&cpu, "nr_throttled"),
                throttled_time: get(&cpu, "throttled_usec") * 1000,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
        .into();

        let mstat = keyed("memory.stat");
        let mevents = keyed("memory.events");
        stats.memory_stats = Some(pb::MemoryStats {
            cache: get(&mstat, "file"),
            usage: Some(pb::MemoryData {
                usage: num("memory.current").unwrap_or(0),
                max_usage: num("memory.peak").unwrap_or(0),
                failcnt: get(&mevents, "max"),
                limit: num("memory.max").unwrap_or(u64::MAX),
                ..Default::default()
            })
            .into(),
            swap_usage: Some(pb::MemoryData {
                usage: num("memory.swap.current").unwrap_or(0),
                limit: num("memory.swap.max").unwrap_or(u64::MAX),
                ..Default::default()
            })
            .into(),
            kernel_usage: Some(pb::MemoryData { usage: get(&mstat, "kernel"), ..Default::default() }).into(),
            use_hierarchy: true,
            stats: mstat,
            ..Default::default()
        })
        .into();

        stats.pids_stats = Some(pb::PidsStats {
            current: num("pids.current").unwrap_or(0),
            // "max" (no limit) is 0, as runc reports it
            limit: num("pids.max").unwrap_or(0),
            ..Default::default()
        })
        .into();

        let mut blkio = pb::BlkioStats::new();
        for (major, minor, values) in self.read("io.stat").map(|t| parse_io_stat(&t)).unwrap_or_default() {
            let entry =
                |op: &str, value: u64| pb::BlkioStatsEntry { major, minor, op: op.into(), value, ..Default::default() };
            blkio.io_service_bytes_recursive.push(entry("Read", get(&values, "rbytes")));
            blkio.io_service_bytes_recursive.push(entry("Write", get(&values, "wbytes")));
            blkio.io_serviced_recursive.push(entry("Read", get(&values, "rios")));
            blkio.io_serviced_recursive.push(entry("Write", get(&values, "wios")));
        }
        stats.blkio_stats = Some(blkio).into();

        for size in hugetlb_sizes(&self.dir()) {
            let usage = num(&format!("hugetlb.{size}.current")).unwrap_or(0);
            let failcnt = get(&keyed(&format!("hugetlb.{size}.events")), "max");
            stats.hugetlb_stats.insert(size, pb::HugetlbStats { usage, failcnt, ..Default::default() });
        }
        stats
    }
}

/// `dir` and every cgroup below it, parents before children.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if !d.is_dir() {
            continue;
        }
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        out.push(d);
    }
    // A stack walk is not breadth-first; sort by depth so parents come first.
    out.sort_by_key(|p| p.components().count());
    out
}

fn hugetlb_sizes(dir: &Path) -> Vec<String> {
    let mut sizes: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix("hugetlb.")?.strip_suffix(".current").map(str::to_string)
        })
        .collect();
    sizes.sort();
    sizes
}

/// Removes `rel`'s ancestors up to and including `/podvisor` when they are empty (cgroups that
/// the agent created). Busy or missing directories are left alone.
pub fn remove_empty_parents(root: &Path, rel: &Path) {
    let mut cur = rel.parent();
    while let Some(p) = cur {
        if p == Path::new("/") || p.as_os_str().is_empty() {
            break;
        }
        if std::fs::remove_dir(root.join(p.strip_prefix("/").unwrap_or(p))).is_err() {
            break;
        }
        cur = p.parent();
    }
}

/// A single-value cgroup file: a number, or "max" (None).
pub fn parse_value(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// A flat keyed file (`cpu.stat`, `memory.stat`, `memory.events`): `key value` lines.
pub fn parse_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (k, v) = (it.next()?, it.next()?);
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// `io.stat`: `MAJ:MIN key=value ...` lines.
pub fn parse_io_stat(text: &str) -> Vec<(u64, u64, HashMap<String, u64>)> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (maj, min) = it.next()?.split_once(':')?;
            let values = it
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect();
            Some((maj.parse().ok()?, min.parse().ok()?, values))
        })
        .collect()
}

/// A process list as `ps` would print it: `json` (an array of pids) or `table` (PID and command).
pub fn format_processes(pids: &[i32], format: &str, comm: &dyn Fn(i32) -> String) -> Result<Vec<u8>, String> {
    match format {
        "json" => Ok(serde_json::to_vec(pids).unwrap_or_default()),
        "table" | "" => {
            let mut out = String::from("    PID CMD\n");
            for pid in pids {
                out.push_str(&format!("{pid:>7} {}\n", comm(*pid)));
            }
            Ok(out.into_bytes())
        }
        other => Err(format!("format: {other:?} is not \"json\" or \"table\"")),
    }
}

/// `/proc/<pid>/comm`, or `?`.
pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
}

/// An error and its sources, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let text = src.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = src.source();
    }
    s
}

/// Waits for changes of cgroups' `memory.events` files, without polling: the kernel raises a
/// file-modified event (inotify `IN_MODIFY`) on every change of that file (cgroup v2). Events
/// are coalesced: one wake-up may stand for many changes.
pub struct EventsWatch {
    ready: AsyncFd<InotifyFd>,
}

/// The inotify instance, by its fd for the reactor.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl EventsWatch {
    pub fn new() -> std::io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: the AsyncFd owns the Inotify, so the fd stays open (and the same file) for as
        // long as it is registered.
        let ready = unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self { ready })
    }

    /// Watches `cgroup`'s `memory.events` (again: a no-op). `false` when the file does not
    /// exist (no memory controller, or the cgroup is gone).
    pub fn add(&self, cgroup: &Cgroup) -> std::io::Result<bool> {
        match self.ready.get_ref().0.add_watch(&cgroup.memory_events(), AddWatchFlags::IN_MODIFY) {
            Ok(_) => Ok(true),
            Err(nix::errno::Errno::ENOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until a watched file changed (or one was removed) since the last call.
    pub async fn changed(&self) -> std::io::Result<()> {
        loop {
            let mut guard = self.ready.readable().await?;
            match self.ready.get_ref().0.read_events() {
                Ok(events) if !events.is_empty() => return Ok(()),
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str, files: &[(&str, &str)]) -> (PathBuf, Cgroup) {
        let root = std::env::temp_dir().join(format!("podvisor-cg-{}-{name}", std::process::id()));
        let cg = Cgroup::new(&root, "/podvisor/sb/c1");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(cg.dir()).unwrap();
        for (name, text) in files {
            std::fs::write(cg.dir().join(name), text).unwrap();
        }
        (root, cg)
    }

    #[test]
    fn stats_from_v2_files() {
        let (root, cg) = fixture("stats", &[
            ("cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\nnr_throttled 1\nthrottled_usec 20\n"),
            ("memory.current", "4096\n"),
            ("memory.max", "max\n"),
            ("memory.peak", "8192\n"),
            ("memory.stat", "anon 100\nfile 200\nkernel 300\n"),
            ("memory.events", "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n"),
            ("pids.current", "3\n"),
            ("pids.max", "64\n"),
            ("io.stat", "254:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n"),
            ("hugetlb.2MB.current", "0\n"),
            ("hugetlb.2MB.events", "max 5\n"),
        ]);
        let s = cg.stats();
        let cpu = s.cpu_stats.cpu_usage.as_ref().unwrap();
        assert_eq!((cpu.total_usage, cpu.usage_in_usermode, cpu.usage_in_kernelmode), (1_500_000, 1_000_000, 500_000));
        assert_eq!(s.cpu_stats.throttling_data.throttled_time, 20_000);
        let m = &s.memory_stats;
        assert_eq!((m.usage.usage, m.usage.max_usage, m.usage.limit, m.usage.failcnt), (4096, 8192, u64::MAX, 2));
        assert_eq!((m.cache, m.kernel_usage.usage, m.stats["anon"]), (200, 300, 100));
        assert_eq!((s.pids_stats.current, s.pids_stats.limit), (3, 64));
        let b = &s.blkio_stats.io_service_bytes_recursive;
        assert_eq!((b[0].major, b[0].minor, b[0].op.as_str(), b[0].value), (254, 0, "Read", 10));
        assert_eq!((b[1].op.as_str(), b[1].value), ("Write", 20));
        assert_eq!(s.blkio_stats.io_serviced_recursive[1].value, 2);
        assert_eq!(s.hugetlb_stats["2MB"].failcnt, 5);
        assert_eq!(cg.oom_kills(), Some(1));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn missing_controllers_read_as_zero() {
        let (root, cg) = fixture("missing", &[("cpu.stat", "usage_usec 7\nuser_usec 5\nsystem_usec 2\n")]);
        let s = cg.stats();
        assert_eq!(s.cpu_stats.cpu_usage.total_usage, 7000);
        assert_eq!(s.memory_stats.usage.usage, 0);
        assert_eq!(s.pids_stats.limit, 0);
        assert!(s.blkio_stats.io_service_bytes_recursive.is_empty());
        assert_eq!(cg.oom_kills(), None);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn procs_include_sub_cgroups_and_removal_goes_deepest_first() {
        let (root, cg) = fixture("procs", &[("cgroup.procs", "12\n10\n")]);
        std::fs::create_dir_all(cg.dir().join("sub/deeper")).unwrap();
        std::fs::write(cg.dir().join("sub/cgroup.procs"), "11\n").unwrap();
        assert_eq!(cg.procs(), vec![10, 11, 12]);
        // On a real cgroupfs the interface files vanish with rmdir; here, remove them first.
        for f in ["cgroup.procs", "sub/cgroup.procs"] {
            std::fs::remove_file(cg.dir().join(f)).unwrap();
        }
        cg.remove().unwrap();
        assert!(!cg.dir().exists());
        remove_empty_parents(&root, &cg.rel);
        assert!(!root.join("podvisor").exists());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn events_watch_wakes_on_a_change_of_memory_events_only() {
        let (root, cg) = fixture("watch", &[("memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")]);
        let other = Cgroup::new(&root, "/podvisor/sb/c2");
        std::fs::create_dir_all(other.dir()).unwrap();
        let watch = EventsWatch::new().unwrap();
        assert!(watch.add(&cg).unwrap());
        assert!(watch.add(&cg).unwrap(), "adding twice is harmless");
        assert!(!watch.add(&other).unwrap(), "no memory.events: nothing to watch");
        // Another file of the cgroup changing is no reason to wake.
        std::fs::write(cg.dir().join("memory.current"), "4096\n").unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(200), watch.changed()).await.is_err());
        let path = cg.memory_events();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            std::fs::write(path, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n").unwrap();
        });
        tokio::time::timeout(Duration::from_secs(10), watch.changed())
            .await
            .expect("no wake-up 10 s after memory.events changed")
            .unwrap();
        writer.await.unwrap();
        assert_eq!(cg.oom_kills(), Some(1));
        // Consumed: quiet again until the next change.
        assert!(tokio::time::timeout(Duration::from_millis(200), watch.changed()).await.is_err());
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn process_list_formats() {
        let comm = |pid: i32| format!("p{pid}");
        assert_eq!(format_processes(&[1, 7], "json", &comm).unwrap(), b"[1,7]");
        let table = String::from_utf8(format_processes(&[1, 7], "table", &comm).unwrap()).unwrap();
        assert_eq!(table, "    PID CMD\n      1 p1\n      7 p7\n");
        assert!(format_processes(&[], "yaml", &comm).unwrap_err().contains("yaml"));
    }

    #[test]
    fn io_stat_and_values() {
        assert_eq!(parse_value("max\n"), None);
        assert_eq!(parse_value("42\n"), Some(42));
        let io = parse_io_stat("8:0 rbytes=1 wbytes=2\nbogus\n");
        assert_eq!(io.len(), 1);
        assert_eq!((io[0].0, io[0].1, io[0].2["wbytes"]), (8, 0, 2));
    }
}
