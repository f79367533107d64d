//! One host process's `/proc` as Kata's per-process families (`<ns>_fds`, `<ns>_threads`,
//! `<ns>_proc_stat`, `<ns>_proc_status`, `<ns>_io_stat`, `<ns>_netdev`), read with `procfs` at
//! the moment of the scrape. Items and units follow Kata's Go runtime: `proc_status` sizes in
//! bytes, `proc_stat` times in clock ticks, `io_stat` and `netdev` as the kernel counts them.

use procfs::process::Process;
use prometheus::{Gauge, GaugeVec, Opts, Registry};

/// Which families to read for a process.
#[derive(Debug, Clone, Copy)]
pub struct Families {
    /// `fds` and `threads` of this process.
    pub counts: bool,
    /// `proc_stat`, `proc_status`, `io_stat`.
    pub usage: bool,
    /// `netdev` (the network namespace the process sees).
    pub netdev: bool,
}

fn gauge(registry: &Registry, ns: &str, name: &str, help: &str) -> prometheus::Result<Gauge> {
    let g = Gauge::with_opts(Opts::new(name, help).namespace(ns))?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge_vec(registry: &Registry, ns: &str, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<GaugeVec> {
    let g = GaugeVec::new(Opts::new(name, help).namespace(ns), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

/// Registers the families of process `pid` under namespace `ns` (e.g. `kata_hypervisor`),
/// with `what` naming the process in the help texts. A family whose `/proc` file cannot be
/// read (the process just exited, no permission) is left out; the others still come.
pub fn register(
    registry: &Registry,
    ns: &str,
    what: &str,
    main: &Process,
    worker: &Process,
    families: Families,
) -> prometheus::Result<()> {
    if families.counts {
        if let Ok(n) = main.fd_count() {
            gauge(registry, ns, "fds", &format!("Open FDs for {what}."))?.set(n as f64);
        }
        if let Ok(stat) = main.stat() {
            gauge(registry, ns, "threads", &format!("{what} process threads."))?.set(stat.num_threads as f64);
        }
    }
    if families.usage {
        if let Ok(stat) = worker.stat() {
            let v = gauge_vec(registry, ns, "proc_stat", &format!("{what} process statistics."), &["item"])?;
            for (item, value) in [
                ("utime", stat.utime as i64),
                ("stime", stat.stime as i64),
                ("cutime", stat.cutime),
                ("cstime", stat.cstime),
            ] {
                v.with_label_values(&[item]).set(value as f64);
            }
        }
        if let Ok(s) = worker.status() {
            let v = gauge_vec(registry, ns, "proc_status", &format!("{what} process status."), &["item"])?;
            let kib = [
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
            ];
            for (item, value) in kib {
                v.with_label_values(&[item]).set(value.unwrap_or(0) as f64 * 1024.0);
            }
            v.with_label_values(&["voluntary_ctxt_switches"]).set(s.voluntary_ctxt_switches.unwrap_or(0) as f64);
            v.with_label_values(&["nonvoluntary_ctxt_switches"]).set(s.nonvoluntary_ctxt_switches.unwrap_or(0) as f64);
        }
        if let Ok(io) = worker.io() {
            let v = gauge_vec(registry, ns, "io_stat", &format!("{what} process IO statistics."), &["item"])?;
            for (item, value) in [
                ("rchar", io.rchar),
                ("wchar", io.wchar),
                ("syscr", io.syscr),
                ("syscw", io.syscw),
                ("readbytes", io.read_bytes),
                ("writebytes", io.write_bytes),
                ("cancelledwritebytes", io.cancelled_write_bytes),
            ] {
                v.with_label_values(&[item]).set(value as f64);
            }
        }
    }
    if families.netdev {
        if let Ok(devs) = main.dev_status() {
            let v = gauge_vec(
                registry,
                ns,
                "netdev",
                &format!("{what} network devices statistics."),
                &["interface", "item"],
            )?;
            for (name, d) in devs {
                for (item, value) in [
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
                    v.with_label_values(&[&name, item]).set(value as f64);
                }
            }
        }
    }
    Ok(())
}

/// virtiofsd forks a worker that does the file work; its usage is the worker's (as Kata reads
/// it), its fds and threads the supervisor's. Without a child the process is its own worker.
pub fn worker_of(pid: i32) -> Option<Process> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    let child = children.split_whitespace().next()?.parse::<i32>().ok()?;
    Process::new(child).ok()
}

/// CPU time (user + system, seconds) and resident memory (bytes) of `pid`, and its age in
/// seconds: the host side of the pod overhead.
pub fn usage(pid: i32) -> Option<(f64, f64, f64)> {
    use procfs::Current;
    let p = Process::new(pid).ok()?;
    let stat = p.stat().ok()?;
    let tps = procfs::ticks_per_second() as f64;
    let cpu = (stat.utime + stat.stime) as f64 / tps;
    let rss = p.status().ok()?.vmrss.unwrap_or(0) as f64 * 1024.0;
    let uptime = procfs::Uptime::current().ok()?.uptime;
    // At least one tick: a process started within the current tick has age 0 (or, rounded,
    // slightly less).
    let age = (uptime - stat.starttime as f64 / tps).max(1.0 / tps);
    Some((cpu, rss, age))
}
