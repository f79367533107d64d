//! `GetMetrics`: Kata's agent and guest OS metrics in the Prometheus text format, computed when
//! asked (nothing is polled or cached; Kata's metrics design). Names, types and labels follow
//! Kata's `docs/design/kata-2-0-metrics.md` and what Kata's agent emits:
//!
//! * `kata_agent_*`: the agent's own `/proc/self/{stat,status,io}` (`kata_agent_io_stat`,
//!   `kata_agent_proc_stat`, `kata_agent_proc_status` by `item`), its totals
//!   (`kata_agent_total_time`, `_total_vm`, `_total_rss`, `_threads`), the standard process
//!   metrics (`kata_agent_process_*`) and `kata_agent_scrape_count`.
//! * `kata_guest_*` from the guest's `/proc`: `cpu_time` (`cpu`, `item`), `diskstat` (`disk`,
//!   `item`), `load`, `meminfo` (bytes, as procfs reports them), `netdev_stat` (`interface`,
//!   `item`), `tasks`, `vm_stat` (all by `item`).
//!
//! `/proc` is parsed by the procfs crate and the text encoded by the prometheus crate. A source
//! that cannot be read leaves its families out and is named in [`Gathered::skipped`].

use std::sync::atomic::{AtomicU64, Ordering};

use procfs::{Current, CurrentSI};
use prometheus::core::Collector;
use prometheus::{Counter, Encoder, Gauge, GaugeVec, IntCounter, Opts, Registry, TextEncoder};

/// Disks and network interfaces reported at most (a guest could create thousands of loop or
/// dummy devices; the reply must stay small).
pub const MAX_DEVICES: usize = 64;

/// GetMetrics calls answered since the agent started (`kata_agent_scrape_count`).
static SCRAPES: AtomicU64 = AtomicU64::new(0);

/// One scrape's result.
#[derive(Debug)]
pub struct Gathered {
    /// Prometheus text (format 0.0.4).
    pub text: String,
    /// Sources that could not be read, with the reason (their families are left out).
    pub skipped: Vec<String>,
}

fn gauge(name: &str, help: &str) -> Gauge {
    Gauge::new(name, help).expect("valid metric name")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("valid metric name and labels")
}

/// Collects and encodes every family.
pub fn gather() -> Result<Gathered, String> {
    let registry = Registry::new();
    let mut skipped = Vec::new();
    let add = |c: Box<dyn Collector>| registry.register(c).map_err(|e| format!("register metric: {e}"));

    let scrapes = IntCounter::new("kata_agent_scrape_count", "Metrics scrape count").expect("valid name");
    scrapes.inc_by(SCRAPES.fetch_add(1, Ordering::Relaxed) + 1);
    add(Box::new(scrapes))?;
    for c in agent_metrics(&mut skipped) {
        add(c)?;
    }
    for c in guest_metrics(&mut skipped) {
        add(c)?;
    }
    let mut buf = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut buf).map_err(|e| format!("encode metrics: {e}"))?;
    let text = String::from_utf8(buf).map_err(|e| format!("metrics text is not UTF-8: {e}"))?;
    Ok(Gathered { text, skipped })
}

/// The agent process: `/proc/self/{stat,status,io,fd,limits}`.
fn agent_metrics(skipped: &mut Vec<String>) -> Vec<Box<dyn Collector>> {
    let mut out: Vec<Box<dyn Collector>> = Vec::new();
    let me = match procfs::process::Process::myself() {
        Ok(p) => p,
        Err(e) => {
            skipped.push(format!("/proc/self: {e}"));
            return out;
        }
    };
    let tps = procfs::ticks_per_second() as f64;
    let page = procfs::page_size() as f64;
    match me.stat() {
        Ok(stat) => {
            let cpu_seconds = (stat.utime + stat.stime) as f64 / tps;
            let rss = stat.rss as f64 * page;
            for (name, help, v) in [
                ("kata_agent_threads", "Agent process threads", stat.num_threads as f64),
                ("kata_agent_total_time", "Agent process total time", cpu_seconds),
                ("kata_agent_total_vm", "Agent process total VM size", stat.vsize as f64),
                ("kata_agent_total_rss", "Agent process total RSS size", rss),
                ("kata_agent_process_resident_memory_bytes", "Resident memory size in bytes.", rss),
                ("kata_agent_process_virtual_memory_bytes", "Virtual memory size in bytes.", stat.vsize as f64),
            ] {
                let g = gauge(name, help);
                g.set(v);
                out.push(Box::new(g));
            }
            let cpu = Counter::new(
                "kata_agent_process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
            )
            .expect("valid name");
            cpu.inc_by(cpu_seconds);
            out.push(Box::new(cpu));
            match procfs::boot_time_secs() {
                Ok(boot) => {
                    let g = gauge(
                        "kata_agent_process_start_time_seconds",
                        "Start time of the process since unix epoch in seconds.",
                    );
                    g.set(boot as f64 + stat.starttime as f64 / tps);
                    out.push(Box::new(g));
                }
                Err(e) => skipped.push(format!("/proc/stat btime: {e}")),
            }
            let g = gauge_vec("kata_agent_proc_stat", "Agent process statistics.", &["item"]);
            for (item, v) in [
                ("utime", stat.utime as f64),
                ("stime", stat.stime as f64),
                ("cutime", stat.cutime as f64),
                ("cstime", stat.cstime as f64),
            ] {
                g.with_label_values(&[item]).set(v);
            }
            out.push(Box::new(g));
        }
        Err(e) => skipped.push(format!("/proc/self/stat: {e}")),
    }
    match me.status() {
        Ok(s) => {
            let g = gauge_vec("kata_agent_proc_status", "Agent process status.", &["item"]);
            for (item, v) in [
                ("vmpeak", s.vmpeak),
                ("vmsize", s.vmsize),
                ("vmlck", s.vmlck),
                ("vmpin", s.vmpin),
                ("vmhwm", s.vmhwm),
                ("vmrss", s.vmrss),
                ("rssanon", s.rssanon),
                ("rssfile", s.rssfile),
                ("rssshmem", s.rssshmem),
                ("vmdata", s.vmdata),
                ("vmstk", s.vmstk),
                ("vmexe", s.vmexe),
                ("vmlib", s.vmlib),
                ("vmpte", s.vmpte),
                ("vmswap", s.vmswap),
                ("hugetlbpages", s.hugetlbpages),
                ("voluntary_ctxt_switches", s.voluntary_ctxt_switches),
                ("nonvoluntary_ctxt_switches", s.nonvoluntary_ctxt_switches),
            ] {
                g.with_label_values(&[item]).set(v.unwrap_or(0) as f64);
            }
            out.push(Box::new(g));
        }
        Err(e) => skipped.push(format!("/proc/self/status: {e}")),
    }
    match me.io() {
        Ok(io) => {
            let g = gauge_vec("kata_agent_io_stat", "Agent process IO statistics.", &["item"]);
            for (item, v) in [
                ("rchar", io.rchar),
                ("wchar", io.wchar),
                ("syscr", io.syscr),
                ("syscw", io.syscw),
                ("read_bytes", io.read_bytes),
                ("write_bytes", io.write_bytes),
                ("cancelled_write_bytes", io.cancelled_write_bytes),
            ] {
                g.with_label_values(&[item]).set(v as f64);
            }
            out.push(Box::new(g));
        }
        Err(e) => skipped.push(format!("/proc/self/io: {e}")),
    }
    match me.fd_count() {
        Ok(n) => {
            let g = gauge("kata_agent_process_open_fds", "Number of open file descriptors.");
            g.set(n as f64);
            out.push(Box::new(g));
        }
        Err(e) => skipped.push(format!("/proc/self/fd: {e}")),
    }
    match me.limits() {
        Ok(l) => {
            let g = gauge("kata_agent_process_max_fds", "Maximum number of open file descriptors.");
            g.set(match l.max_open_files.soft_limit {
                procfs::process::LimitValue::Value(v) => v as f64,
                procfs::process::LimitValue::Unlimited => f64::INFINITY,
            });
            out.push(Box::new(g));
        }
        Err(e) => skipped.push(format!("/proc/self/limits: {e}")),
    }
    out
}

/// The guest OS: `/proc/{loadavg,diskstats,vmstat,stat,net/dev,meminfo}`.
fn guest_metrics(skipped: &mut Vec<String>) -> Vec<Box<dyn Collector>> {
    let mut out: Vec<Box<dyn Collector>> = Vec::new();
    match procfs::LoadAverage::current() {
        Ok(l) => {
            let load = gauge_vec("kata_guest_load", "Guest system load.", &["item"]);
            for (item, v) in [("load1", l.one), ("load5", l.five), ("load15", l.fifteen)] {
                load.with_label_values(&[item]).set(f64::from(v));
            }
            let tasks = gauge_vec("kata_guest_tasks", "Guest system load.", &["item"]);
            tasks.with_label_values(&["cur"]).set(f64::from(l.cur));
            tasks.with_label_values(&["max"]).set(f64::from(l.max));
            out.push(Box::new(load));
            out.push(Box::new(tasks));
        }
        Err(e) => skipped.push(format!("/proc/loadavg: {e}")),
    }
    match procfs::diskstats() {
        Ok(disks) => {
            let g = gauge_vec("kata_guest_diskstat", "Disks statistics in system.", &["disk", "item"]);
            for d in disks.iter().take(MAX_DEVICES) {
                for (item, v) in [
                    ("reads", Some(d.reads)),
                    ("merged", Some(d.merged)),
                    ("sectors_read", Some(d.sectors_read)),
                    ("time_reading", Some(d.time_reading)),
                    ("writes", Some(d.writes)),
                    ("writes_merged", Some(d.writes_merged)),
                    ("sectors_written", Some(d.sectors_written)),
                    ("time_writing", Some(d.time_writing)),
                    ("in_progress", Some(d.in_progress)),
                    ("time_in_progress", Some(d.time_in_progress)),
                    ("weighted_time_in_progress", Some(d.weighted_time_in_progress)),
                    ("discards", d.discards),
                    ("discards_merged", d.discards_merged),
                    ("sectors_discarded", d.sectors_discarded),
                    ("time_discarding", d.time_discarding),
                    ("flushes", d.flushes),
                    ("time_flushing", d.time_flushing),
                ] {
                    g.with_label_values(&[d.name.as_str(), item]).set(v.unwrap_or(0) as f64);
                }
            }
            out.push(Box::new(g));
        }
        Err(e) => skipped.push(format!("/proc/diskstats: {e}")),
    }
    match procfs::vmstat() {
        Ok(vm) => {
            let g = gauge_vec("kata_guest_vm_stat", "Guest virtual memory statistics.", &["item"]);
            for (k, v) in &vm {
                g.with_label_values(&[k.as_str()]).set(*v as f64);
            }
            out.push(Box::new(g));
        }
        Err(e) => skipped.push(format!("/proc/vmstat: {e}")),
    }
    match procfs::KernelStats::current() {
        Ok(ks) => {
            let g = gauge_vec("kata_guest_cpu_time", "Guest CPU statistics.", &["cpu", "item"]);
            cpu_time(&g, "total", &ks.total);
            for (i, t) in ks.cpu_time.iter().enumerate() {
                cpu_time(&g, &i.to_string(), t);
            }
            out.push(Box::new(g));
        }
        Err(e) => skipped.push(format!("/proc/stat: {e}")),
    }
    match procfs::net::dev_status() {
        Ok(devs) => {
            let g = gauge_vec("kata_guest_netdev_stat", "Guest net devices statistics.", &["interface", "item"]);
            let mut names: Vec<&String> = devs.keys().collect();
            names.sort();
            for d in names.into_iter().take(MAX_DEVICES).map(|n| &devs[n]) {
                for (item, v) in [
                    ("recv_bytes", d.recv_bytes),
                    ("recv_packets", d.recv_packets),
                    ("recv_errs", d.recv_errs),
                    ("recv_drop", d.recv_drop),
                    ("recv_fifo", d.recv_fifo),
                    ("recv_frame", d.recv_frame),
                    ("recv_compressed", d.recv_compressed),
                    ("recv_multicast", d.recv_multicast),
                    ("sent_bytes", d.sent_bytes),
                    ("sent_packets", d.sent_packets),
                    ("sent_errs", d.sent_errs),
                    ("sent_drop", d.sent_drop),
                    ("sent_fifo", d.sent_fifo),
                    ("sent_colls", d.sent_colls),
                    ("sent_carrier", d.sent_carrier),
                    ("sent_compressed", d.sent_compressed),
                ] {
                    g.with_label_values(&[d.name.as_str(), item]).set(v as f64);
                }
            }
            out.push(Box::new(g));
        }
        Err(e) => skipped.push(format!("/proc/net/dev: {e}")),
    }
    match procfs::Meminfo::current() {
        Ok(m) => {
            let g = gauge_vec("kata_guest_meminfo", "Statistics about memory usage in the system.", &["item"]);
            for (item, v) in meminfo_items(&m) {
                g.with_label_values(&[item]).set(v.unwrap_or(0) as f64);
            }
            out.push(Box::new(g));
        }
        Err(e) => skipped.push(format!("/proc/meminfo: {e}")),
    }
    out
}

fn cpu_time(g: &GaugeVec, cpu: &str, t: &procfs::CpuTime) {
    for (item, ms) in [
        ("user", Some(t.user_ms())),
        ("nice", Some(t.nice_ms())),
        ("system", Some(t.system_ms())),
        ("idle", Some(t.idle_ms())),
        ("iowait", t.iowait_ms()),
        ("irq", t.irq_ms()),
        ("softirq", t.softirq_ms()),
        ("steal", t.steal_ms()),
        ("guest", t.guest_ms()),
        ("guest_nice", t.guest_nice_ms()),
    ] {
        g.with_label_values(&[cpu, item]).set(ms.unwrap_or(0) as f64);
    }
}

/// `/proc/meminfo` by Kata's item names (bytes; the HugePages_* counts are page counts).
fn meminfo_items(m: &procfs::Meminfo) -> Vec<(&'static str, Option<u64>)> {
    vec![
        ("mem_total", Some(m.mem_total)),
        ("mem_free", Some(m.mem_free)),
        ("mem_available", m.mem_available),
        ("buffers", Some(m.buffers)),
        ("cached", Some(m.cached)),
        ("swap_cached", Some(m.swap_cached)),
        ("active", Some(m.active)),
        ("inactive", Some(m.inactive)),
        ("active_anon", m.active_anon),
        ("inactive_anon", m.inactive_anon),
        ("active_file", m.active_file),
        ("inactive_file", m.inactive_file),
        ("unevictable", m.unevictable),
        ("mlocked", m.mlocked),
        ("high_total", m.high_total),
        ("high_free", m.high_free),
        ("low_total", m.low_total),
        ("low_free", m.low_free),
        ("mmap_copy", m.mmap_copy),
        ("swap_total", Some(m.swap_total)),
        ("swap_free", Some(m.swap_free)),
        ("dirty", Some(m.dirty)),
        ("writeback", Some(m.writeback)),
        ("anon_pages", m.anon_pages),
        ("mapped", Some(m.mapped)),
        ("shmem", m.shmem),
        ("slab", Some(m.slab)),
        ("s_reclaimable", m.s_reclaimable),
        ("s_unreclaim", m.s_unreclaim),
        ("kernel_stack", m.kernel_stack),
        ("page_tables", m.page_tables),
        ("quicklists", m.quicklists),
        ("nfs_unstable", m.nfs_unstable),
        ("bounce", m.bounce),
        ("writeback_tmp", m.writeback_tmp),
        ("commit_limit", m.commit_limit),
        ("committed_as", Some(m.committed_as)),
        ("vmalloc_total", Some(m.vmalloc_total)),
        ("vmalloc_used", Some(m.vmalloc_used)),
        ("vmalloc_chunk", Some(m.vmalloc_chunk)),
        ("hardware_corrupted", m.hardware_corrupted),
        ("anon_hugepages", m.anon_hugepages),
        ("shmem_hugepages", m.shmem_hugepages),
        ("shmem_pmd_mapped", m.shmem_pmd_mapped),
        ("cma_total", m.cma_total),
        ("cma_free", m.cma_free),
        ("hugepages_total", m.hugepages_total),
        ("hugepages_free", m.hugepages_free),
        ("hugepages_rsvd", m.hugepages_rsvd),
        ("hugepages_surp", m.hugepages_surp),
        ("hugepagesize", m.hugepagesize),
        ("direct_map_4k", m.direct_map_4k),
        ("direct_map_4M", m.direct_map_4M),
        ("direct_map_2M", m.direct_map_2M),
        ("direct_map_1G", m.direct_map_1G),
        ("hugetlb", m.hugetlb),
        ("per_cpu", m.per_cpu),
        ("k_reclaimable", m.k_reclaimable),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Family name -> (type, label names of its samples).
    fn families(text: &str) -> BTreeMap<String, (String, BTreeSet<Vec<String>>)> {
        let mut out: BTreeMap<String, (String, BTreeSet<Vec<String>>)> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').unwrap();
                out.entry(name.to_string()).or_default().0 = ty.to_string();
            }
        }
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses");
        for s in scrape.samples {
            let mut labels: Vec<String> = s.labels.iter().map(|(k, _)| k.clone()).collect();
            labels.sort();
            let fam = out.get_mut(&s.metric).unwrap_or_else(|| panic!("sample {} has no # TYPE line", s.metric));
            fam.1.insert(labels);
        }
        out
    }

    fn strict_line_check(text: &str) {
        for line in text.lines() {
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line:?}"));
            assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "bad value in {line:?}");
            let name = series.split('{').next().unwrap();
            assert!(
                name.starts_with("kata_agent_") || name.starts_with("kata_guest_"),
                "only kata_agent_* and kata_guest_* families: {line:?}"
            );
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line:?}");
        }
    }

    #[test]
    fn every_family_is_present_with_kata_types_and_labels() {
        let g = gather().unwrap();
        assert!(g.skipped.is_empty(), "{:?}", g.skipped);
        strict_line_check(&g.text);
        let fams = families(&g.text);
        let item = BTreeSet::from([vec!["item".to_string()]]);
        let none = BTreeSet::from([vec![]]);
        let two = |a: &str| BTreeSet::from([vec![a.to_string(), "item".to_string()]]);
        let want: Vec<(&str, &str, BTreeSet<Vec<String>>)> = vec![
            ("kata_agent_scrape_count", "counter", none.clone()),
            ("kata_agent_threads", "gauge", none.clone()),
            ("kata_agent_total_time", "gauge", none.clone()),
            ("kata_agent_total_vm", "gauge", none.clone()),
            ("kata_agent_total_rss", "gauge", none.clone()),
            ("kata_agent_process_cpu_seconds_total", "counter", none.clone()),
            ("kata_agent_process_max_fds", "gauge", none.clone()),
            ("kata_agent_process_open_fds", "gauge", none.clone()),
            ("kata_agent_process_resident_memory_bytes", "gauge", none.clone()),
            ("kata_agent_process_start_time_seconds", "gauge", none.clone()),
            ("kata_agent_process_virtual_memory_bytes", "gauge", none.clone()),
            ("kata_agent_io_stat", "gauge", item.clone()),
            ("kata_agent_proc_stat", "gauge", item.clone()),
            ("kata_agent_proc_status", "gauge", item.clone()),
            ("kata_guest_cpu_time", "gauge", two("cpu")),
            ("kata_guest_diskstat", "gauge", two("disk")),
            ("kata_guest_load", "gauge", item.clone()),
            ("kata_guest_meminfo", "gauge", item.clone()),
            ("kata_guest_netdev_stat", "gauge", two("interface")),
            ("kata_guest_tasks", "gauge", item.clone()),
            ("kata_guest_vm_stat", "gauge", item.clone()),
        ];
        for (name, ty, labels) in &want {
            // A host without block devices has no diskstat samples; the encoder then drops it.
            if *name == "kata_guest_diskstat" && procfs::diskstats().map(|d| d.is_empty()).unwrap_or(true) {
                continue;
            }
            let (got_ty, got_labels) = fams.get(*name).unwrap_or_else(|| panic!("{name} missing:\n{}", g.text));
            assert_eq!((got_ty.as_str(), got_labels), (*ty, labels), "{name}");
        }
        let names: BTreeSet<&str> = want.iter().map(|(n, _, _)| *n).collect();
        let extra: Vec<&String> = fams.keys().filter(|k| !names.contains(k.as_str())).collect();
        assert!(extra.is_empty(), "families outside Kata's list: {extra:?}");
    }

    #[test]
    fn items_use_kata_names_and_units() {
        let text = gather().unwrap().text;
        let value = |series: &str| -> f64 {
            let line =
                text.lines().find(|l| l.starts_with(&format!("{series} "))).unwrap_or_else(|| panic!("{series}"));
            line.rsplit_once(' ').unwrap().1.parse().unwrap()
        };
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(value("kata_guest_meminfo{item=\"mem_total\"}"), kib * 1024.0, "bytes, as Kata reports them");
        for series in [
            "kata_guest_cpu_time{cpu=\"total\",item=\"user\"}",
            "kata_guest_cpu_time{cpu=\"0\",item=\"guest_nice\"}",
            "kata_guest_load{item=\"load15\"}",
            "kata_guest_tasks{item=\"max\"}",
            "kata_guest_netdev_stat{interface=\"lo\",item=\"sent_compressed\"}",
            "kata_agent_io_stat{item=\"cancelled_write_bytes\"}",
            "kata_agent_proc_stat{item=\"cstime\"}",
            "kata_agent_proc_status{item=\"nonvoluntary_ctxt_switches\"}",
            "kata_guest_vm_stat{item=\"pgfault\"}",
        ] {
            value(series);
        }
        assert!(value("kata_agent_threads") >= 1.0);
        assert!(value("kata_agent_total_rss") > 0.0);
        assert!(value("kata_agent_process_open_fds") >= 3.0);
    }

    #[test]
    fn scrape_count_grows_per_request() {
        let count = |t: &str| -> u64 {
            t.lines().find_map(|l| l.strip_prefix("kata_agent_scrape_count ")).unwrap().parse().unwrap()
        };
        let a = count(&gather().unwrap().text);
        let b = count(&gather().unwrap().text);
        assert!(b > a, "{a} -> {b}");
    }
}
