//! A container's guest cgroup statistics (the agent's `StatsContainerResponse`, read from the
//! guest's cgroup v2 files) as the `Metrics` message `Task.Stats` answers with.
//!
//! Both managers decode either type, but CRI-O 1.36 interprets the numbers by the *host's*
//! cgroup mode (`node.CgroupIsV2()`: `total_rss`/`total_inactive_file` on v1 hosts, `anon`/
//! `inactive_file` on v2 hosts), so, as Kata does, the answer is containerd's v1 `Metrics` on a
//! cgroup v1 (or hybrid) host and v2 `Metrics` on a unified one. Every submessage either reader
//! dereferences without a nil check (v1: cpu.usage, cpu.throttling, memory.usage/swap/kernel/
//! kernel_tcp, pids; v2: cpu, memory, pids) is always present: a missing one crashes CRI-O.
//! An unlimited memory or swap limit is `u64::MAX` (CRI-O subtracts from it).

use agent_protocol::agent as pb;
use containerd_shim_protos::cgroups::metrics as v1;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use protobuf::{Message, MessageField};

/// The `Any` type URL of containerd's cgroup v1 metrics.
pub const V1_TYPE_URL: &str = "io.containerd.cgroups.v1.Metrics";
/// The `Any` type URL of containerd's cgroup v2 metrics.
pub const V2_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// Which `Metrics` message to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `io.containerd.cgroups.v1.Metrics` (cgroup v1 or hybrid host).
    V1,
    /// `io.containerd.cgroups.v2.Metrics` (unified cgroup v2 host).
    V2,
}

impl Flavor {
    /// The flavor for this host: v2 when `/sys/fs/cgroup` is a cgroup2 file system.
    pub fn of_host() -> Flavor {
        match nix::sys::statfs::statfs("/sys/fs/cgroup") {
            Ok(s) if s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => Flavor::V2,
            _ => Flavor::V1,
        }
    }
}

/// `stats` encoded as the `Any` `Task.Stats` returns: (type URL, protobuf bytes).
pub fn encode(stats: &pb::StatsContainerResponse, flavor: Flavor) -> Result<(&'static str, Vec<u8>), String> {
    let bytes = match flavor {
        Flavor::V1 => to_v1(stats).write_to_bytes(),
        Flavor::V2 => to_v2(stats).write_to_bytes(),
    };
    let url = if flavor == Flavor::V1 { V1_TYPE_URL } else { V2_TYPE_URL };
    bytes.map(|b| (url, b)).map_err(|e| format!("encoding {url}: {e}"))
}

/// The parts of the agent's answer both conversions read (absent messages read as empty).
struct Guest<'a> {
    cpu: pb::CpuStats,
    memory: &'a pb::MemoryStats,
    pids: pb::PidsStats,
    blkio: pb::BlkioStats,
    hugetlb: Vec<(&'a String, &'a pb::HugetlbStats)>,
}

fn guest(stats: &pb::StatsContainerResponse) -> Guest<'_> {
    static EMPTY_MEMORY: std::sync::OnceLock<pb::MemoryStats> = std::sync::OnceLock::new();
    let c = stats.cgroup_stats.as_ref();
    let mut hugetlb: Vec<_> = c.map(|c| c.hugetlb_stats.iter().collect()).unwrap_or_default();
    hugetlb.sort_by(|a, b| a.0.cmp(b.0));
    Guest {
        cpu: c.and_then(|c| c.cpu_stats.clone().into_option()).unwrap_or_default(),
        memory: c.and_then(|c| c.memory_stats.as_ref()).unwrap_or_else(|| EMPTY_MEMORY.get_or_init(Default::default)),
        pids: c.and_then(|c| c.pids_stats.clone().into_option()).unwrap_or_default(),
        blkio: c.and_then(|c| c.blkio_stats.clone().into_option()).unwrap_or_default(),
        hugetlb,
    }
}

impl Guest<'_> {
    /// A `memory.stat` key (0 when the guest did not report it).
    fn mem(&self, key: &str) -> u64 {
        self.memory.stats.get(key).copied().unwrap_or(0)
    }

    fn usage(&self) -> pb::MemoryData {
        self.memory.usage.clone().into_option().unwrap_or_default()
    }

    fn swap(&self) -> pb::MemoryData {
        self.memory.swap_usage.clone().into_option().unwrap_or_default()
    }

    /// (usage, limit) of memory, the limit `u64::MAX` when the guest reported none.
    fn memory_usage_limit(&self) -> (u64, u64) {
        let u = self.usage();
        (u.usage, if u.limit == 0 { u64::MAX } else { u.limit })
    }

    /// Kernel memory: `memory.stat` `kernel` (Linux 5.18+), else stack + slab.
    fn kernel(&self) -> u64 {
        match self.memory.stats.get("kernel") {
            Some(k) => *k,
            None => self.mem("kernel_stack").saturating_add(self.mem("slab")),
        }
    }

    /// Block I/O per device (`io.stat` lines), from the agent's v1-style per-op entries.
    fn io(&self) -> Vec<v2::IOEntry> {
        let mut out: Vec<v2::IOEntry> = Vec::new();
        let lists = [(&self.blkio.io_service_bytes_recursive, true), (&self.blkio.io_serviced_recursive, false)];
        for (entries, bytes) in lists {
            for e in entries.iter() {
                let i = match out.iter().position(|o| o.major == e.major && o.minor == e.minor) {
                    Some(i) => i,
                    None => {
                        out.push(v2::IOEntry { major: e.major, minor: e.minor, ..Default::default() });
                        out.len() - 1
                    }
                };
                let o = &mut out[i];
                match (e.op.to_ascii_lowercase().as_str(), bytes) {
                    ("read", true) => o.rbytes = o.rbytes.saturating_add(e.value),
                    ("write", true) => o.wbytes = o.wbytes.saturating_add(e.value),
                    ("read", false) => o.rios = o.rios.saturating_add(e.value),
                    ("write", false) => o.wios = o.wios.saturating_add(e.value),
                    _ => {}
                }
            }
        }
        out
    }
}

/// The guest's interface counters as containerd's v1 or v2 `NetworkStat` (same field names).
macro_rules! network_stats {
    ($m:ident::$t:ident, $stats:expr) => {
        $stats
            .network_stats
            .iter()
            .map(|n| $m::$t {
                name: n.name.clone(),
                rx_bytes: n.rx_bytes,
                rx_packets: n.rx_packets,
                rx_errors: n.rx_errors,
                rx_dropped: n.rx_dropped,
                tx_bytes: n.tx_bytes,
                tx_packets: n.tx_packets,
                tx_errors: n.tx_errors,
                tx_dropped: n.tx_dropped,
                ..Default::default()
            })
            .collect()
    };
}

/// containerd's cgroup v1 `Metrics` from the guest's v2 numbers. v1's `memory.memsw` counts
/// memory plus swap, so `swap.usage` is usage + swap (and its limit memory + swap limit).
pub fn to_v1(stats: &pb::StatsContainerResponse) -> v1::Metrics {
    let g = guest(stats);
    let cpu_usage = g.cpu.cpu_usage.clone().into_option().unwrap_or_default();
    let throttling = g.cpu.throttling_data.clone().into_option().unwrap_or_default();
    let (usage, limit) = g.memory_usage_limit();
    let u = g.usage();
    let s = g.swap();
    let swap_limit =
        if s.limit == 0 || s.limit == u64::MAX || limit == u64::MAX { u64::MAX } else { limit.saturating_add(s.limit) };
    let entry = |usage: u64, max: u64, limit: u64, failcnt: u64| {
        MessageField::some(v1::MemoryEntry { usage, max, limit, failcnt, ..Default::default() })
    };
    let m = |k: &str| g.mem(k);
    let memory = v1::MemoryStat {
        cache: m("file"),
        rss: m("anon"),
        rss_huge: m("anon_thp"),
        mapped_file: m("file_mapped"),
        dirty: m("file_dirty"),
        writeback: m("file_writeback"),
        pg_fault: m("pgfault"),
        pg_maj_fault: m("pgmajfault"),
        inactive_anon: m("inactive_anon"),
        active_anon: m("active_anon"),
        inactive_file: m("inactive_file"),
        active_file: m("active_file"),
        unevictable: m("unevictable"),
        hierarchical_memory_limit: limit,
        hierarchical_swap_limit: swap_limit,
        // The guest cgroup has no children of its own: totals are the cgroup's values.
        total_cache: m("file"),
        total_rss: m("anon"),
        total_rss_huge: m("anon_thp"),
        total_mapped_file: m("file_mapped"),
        total_dirty: m("file_dirty"),
        total_writeback: m("file_writeback"),
        total_pg_fault: m("pgfault"),
        total_pg_maj_fault: m("pgmajfault"),
        total_inactive_anon: m("inactive_anon"),
        total_active_anon: m("active_anon"),
        total_inactive_file: m("inactive_file"),
        total_active_file: m("active_file"),
        total_unevictable: m("unevictable"),
        usage: entry(usage, u.max_usage, limit, u.failcnt),
        swap: entry(usage.saturating_add(s.usage), u.max_usage.saturating_add(s.max_usage), swap_limit, s.failcnt),
        kernel: entry(g.kernel(), 0, u64::MAX, 0),
        kernel_tcp: entry(m("sock"), 0, u64::MAX, 0),
        ..Default::default()
    };
    let blk = |entries: &[pb::BlkioStatsEntry]| -> Vec<v1::BlkIOEntry> {
        entries
            .iter()
            .map(|e| v1::BlkIOEntry {
                op: e.op.clone(),
                major: e.major,
                minor: e.minor,
                value: e.value,
                ..Default::default()
            })
            .collect()
    };
    v1::Metrics {
        hugetlb: g
            .hugetlb
            .iter()
            .map(|(size, h)| v1::HugetlbStat {
                usage: h.usage,
                max: h.max_usage,
                failcnt: h.failcnt,
                pagesize: size.to_string(),
                ..Default::default()
            })
            .collect(),
        pids: MessageField::some(v1::PidsStat { current: g.pids.current, limit: g.pids.limit, ..Default::default() }),
        cpu: MessageField::some(v1::CPUStat {
            usage: MessageField::some(v1::CPUUsage {
                total: cpu_usage.total_usage,
                kernel: cpu_usage.usage_in_kernelmode,
                user: cpu_usage.usage_in_usermode,
                per_cpu: cpu_usage.percpu_usage.clone(),
                ..Default::default()
            }),
            throttling: MessageField::some(v1::Throttle {
                periods: throttling.periods,
                throttled_periods: throttling.throttled_periods,
                throttled_time: throttling.throttled_time,
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(memory),
        blkio: MessageField::some(v1::BlkIOStat {
            io_service_bytes_recursive: blk(&g.blkio.io_service_bytes_recursive),
            io_serviced_recursive: blk(&g.blkio.io_serviced_recursive),
            ..Default::default()
        }),
        network: network_stats!(v1::NetworkStat, stats),
        ..Default::default()
    }
}

/// containerd's cgroup v2 `Metrics` from the guest's v2 numbers (swap counts swap only, as the
/// cgroup v2 files do).
pub fn to_v2(stats: &pb::StatsContainerResponse) -> v2::Metrics {
    let g = guest(stats);
    let cpu_usage = g.cpu.cpu_usage.clone().into_option().unwrap_or_default();
    let throttling = g.cpu.throttling_data.clone().into_option().unwrap_or_default();
    let (usage, limit) = g.memory_usage_limit();
    let u = g.usage();
    let s = g.swap();
    let m = |k: &str| g.mem(k);
    let memory = v2::MemoryStat {
        anon: m("anon"),
        file: m("file"),
        kernel_stack: m("kernel_stack"),
        slab: m("slab"),
        sock: m("sock"),
        shmem: m("shmem"),
        file_mapped: m("file_mapped"),
        file_dirty: m("file_dirty"),
        file_writeback: m("file_writeback"),
        anon_thp: m("anon_thp"),
        inactive_anon: m("inactive_anon"),
        active_anon: m("active_anon"),
        inactive_file: m("inactive_file"),
        active_file: m("active_file"),
        unevictable: m("unevictable"),
        slab_reclaimable: m("slab_reclaimable"),
        slab_unreclaimable: m("slab_unreclaimable"),
        pgfault: m("pgfault"),
        pgmajfault: m("pgmajfault"),
        workingset_refault: m("workingset_refault")
            .max(m("workingset_refault_anon").saturating_add(m("workingset_refault_file"))),
        workingset_activate: m("workingset_activate")
            .max(m("workingset_activate_anon").saturating_add(m("workingset_activate_file"))),
        workingset_nodereclaim: m("workingset_nodereclaim"),
        pgrefill: m("pgrefill"),
        pgscan: m("pgscan"),
        pgsteal: m("pgsteal"),
        pgactivate: m("pgactivate"),
        pgdeactivate: m("pgdeactivate"),
        pglazyfree: m("pglazyfree"),
        pglazyfreed: m("pglazyfreed"),
        thp_fault_alloc: m("thp_fault_alloc"),
        thp_collapse_alloc: m("thp_collapse_alloc"),
        usage,
        usage_limit: limit,
        swap_usage: s.usage,
        swap_limit: if s.limit == 0 { u64::MAX } else { s.limit },
        max_usage: u.max_usage,
        swap_max_usage: s.max_usage,
        ..Default::default()
    };
    v2::Metrics {
        pids: MessageField::some(v2::PidsStat { current: g.pids.current, limit: g.pids.limit, ..Default::default() }),
        cpu: MessageField::some(v2::CPUStat {
            usage_usec: cpu_usage.total_usage / 1000,
            user_usec: cpu_usage.usage_in_usermode / 1000,
            system_usec: cpu_usage.usage_in_kernelmode / 1000,
            nr_periods: throttling.periods,
            nr_throttled: throttling.throttled_periods,
            throttled_usec: throttling.throttled_time / 1000,
            ..Default::default()
        }),
        memory: MessageField::some(memory),
        io: MessageField::some(v2::IOStat { usage: g.io(), ..Default::default() }),
        hugetlb: g
            .hugetlb
            .iter()
            .map(|(size, h)| v2::HugeTlbStat {
                current: h.usage,
                max: h.max_usage,
                failcnt: h.failcnt,
                pagesize: size.to_string(),
                ..Default::default()
            })
            .collect(),
        network: network_stats!(v2::NetworkStat, stats),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent answer as the guest gives it for a busy container with a 64 MiB limit.
    fn sample() -> pb::StatsContainerResponse {
        let mut mem = pb::MemoryStats::new();
        mem.usage = MessageField::some(pb::MemoryData {
            usage: 40 << 20,
            max_usage: 50 << 20,
            limit: 64 << 20,
            failcnt: 3,
            ..Default::default()
        });
        mem.swap_usage = MessageField::some(pb::MemoryData { usage: 0, limit: u64::MAX, ..Default::default() });
        for (k, v) in [
            ("anon", 30u64 << 20),
            ("file", 8 << 20),
            ("inactive_file", 6 << 20),
            ("file_mapped", 1 << 20),
            ("pgfault", 1000),
            ("pgmajfault", 7),
            ("kernel", 2 << 20),
            ("sock", 4096),
        ] {
            mem.stats.insert(k.into(), v);
        }
        let mut blkio = pb::BlkioStats::new();
        let e = |major, op: &str, value| pb::BlkioStatsEntry {
            major,
            minor: 0,
            op: op.into(),
            value,
            ..Default::default()
        };
        blkio.io_service_bytes_recursive = vec![e(254, "Read", 4096), e(254, "Write", 8192), e(253, "Read", 1)];
        blkio.io_serviced_recursive = vec![e(254, "Read", 1), e(254, "Write", 2)];
        let mut c = pb::CgroupStats {
            cpu_stats: MessageField::some(pb::CpuStats {
                cpu_usage: MessageField::some(pb::CpuUsage {
                    total_usage: 3_000_000,
                    usage_in_usermode: 2_000_000,
                    usage_in_kernelmode: 1_000_000,
                    ..Default::default()
                }),
                throttling_data: MessageField::some(pb::ThrottlingData {
                    periods: 10,
                    throttled_periods: 4,
                    throttled_time: 5_000_000,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            memory_stats: MessageField::some(mem),
            pids_stats: MessageField::some(pb::PidsStats { current: 2, limit: 10, ..Default::default() }),
            blkio_stats: MessageField::some(blkio),
            ..Default::default()
        };
        c.hugetlb_stats.insert("2MB".into(), pb::HugetlbStats { usage: 2 << 20, failcnt: 1, ..Default::default() });
        let eth0 = pb::NetworkStats {
            name: "eth0".into(),
            rx_bytes: 1,
            rx_packets: 2,
            rx_errors: 3,
            rx_dropped: 4,
            tx_bytes: 5,
            tx_packets: 6,
            tx_errors: 7,
            tx_dropped: 8,
            ..Default::default()
        };
        pb::StatsContainerResponse {
            cgroup_stats: MessageField::some(c),
            network_stats: vec![eth0],
            ..Default::default()
        }
    }

    #[test]
    fn interface_counters_keep_their_names_in_both_flavors() {
        let s = sample();
        let v1 = &to_v1(&s).network[0];
        let v2 = &to_v2(&s).network[0];
        let v1 = (
            &*v1.name,
            v1.rx_bytes,
            v1.rx_packets,
            v1.rx_errors,
            v1.rx_dropped,
            v1.tx_bytes,
            v1.tx_packets,
            v1.tx_errors,
            v1.tx_dropped,
        );
        let v2 = (
            &*v2.name,
            v2.rx_bytes,
            v2.rx_packets,
            v2.rx_errors,
            v2.rx_dropped,
            v2.tx_bytes,
            v2.tx_packets,
            v2.tx_errors,
            v2.tx_dropped,
        );
        assert_eq!(v1, ("eth0", 1, 2, 3, 4, 5, 6, 7, 8));
        assert_eq!(v2, v1);
    }

    #[test]
    fn v1_has_every_message_crio_dereferences_and_the_numbers() {
        let m = to_v1(&sample());
        let cpu = m.cpu.as_ref().unwrap();
        assert_eq!((cpu.usage.total, cpu.usage.user, cpu.usage.kernel), (3_000_000, 2_000_000, 1_000_000));
        assert_eq!((cpu.throttling.periods, cpu.throttling.throttled_periods), (10, 4));
        assert_eq!(cpu.throttling.throttled_time, 5_000_000);
        let mem = m.memory.as_ref().unwrap();
        assert_eq!(
            (mem.usage.usage, mem.usage.max, mem.usage.limit, mem.usage.failcnt),
            (40 << 20, 50 << 20, 64 << 20, 3)
        );
        // What CRI-O reads on a v1 host: total_rss and total_inactive_file.
        assert_eq!((mem.total_rss, mem.total_inactive_file, mem.rss), (30 << 20, 6 << 20, 30 << 20));
        assert_eq!((mem.cache, mem.mapped_file, mem.pg_fault, mem.pg_maj_fault), (8 << 20, 1 << 20, 1000, 7));
        assert_eq!(mem.swap.usage, 40 << 20, "memsw: memory plus swap");
        assert_eq!(mem.swap.limit, u64::MAX);
        assert_eq!((mem.kernel.usage, mem.kernel_tcp.usage), (2 << 20, 4096));
        assert_eq!((m.pids.current, m.pids.limit), (2, 10));
        assert_eq!(m.hugetlb[0].pagesize, "2MB");
        assert_eq!(m.blkio.io_service_bytes_recursive.len(), 3);
    }

    #[test]
    fn v2_has_every_message_and_groups_io_by_device() {
        let m = to_v2(&sample());
        let cpu = m.cpu.as_ref().unwrap();
        assert_eq!((cpu.usage_usec, cpu.user_usec, cpu.system_usec), (3000, 2000, 1000));
        assert_eq!((cpu.nr_periods, cpu.nr_throttled, cpu.throttled_usec), (10, 4, 5000));
        let mem = m.memory.as_ref().unwrap();
        assert_eq!((mem.usage, mem.usage_limit, mem.max_usage), (40 << 20, 64 << 20, 50 << 20));
        assert_eq!((mem.anon, mem.inactive_file, mem.pgfault, mem.pgmajfault), (30 << 20, 6 << 20, 1000, 7));
        assert_eq!((mem.swap_usage, mem.swap_limit), (0, u64::MAX));
        assert_eq!((m.pids.current, m.pids.limit), (2, 10));
        let io = &m.io.usage;
        assert_eq!(io.len(), 2, "{io:?}");
        let sda = io.iter().find(|e| e.major == 254).unwrap();
        assert_eq!((sda.rbytes, sda.wbytes, sda.rios, sda.wios), (4096, 8192, 1, 2));
        assert_eq!((m.hugetlb[0].current, m.hugetlb[0].failcnt), (2 << 20, 1));
    }

    /// An agent that answered nothing useful still gives complete messages (never a nil for
    /// CRI-O to dereference), with "no limit" as u64::MAX.
    #[test]
    fn an_empty_answer_gives_complete_messages() {
        let empty = pb::StatsContainerResponse::new();
        let m = to_v1(&empty);
        assert!(m.cpu.is_some() && m.cpu.usage.is_some() && m.cpu.throttling.is_some());
        let mem = m.memory.as_ref().unwrap();
        assert!(mem.usage.is_some() && mem.swap.is_some() && mem.kernel.is_some() && mem.kernel_tcp.is_some());
        assert_eq!(mem.usage.limit, u64::MAX);
        assert!(m.pids.is_some());
        let m = to_v2(&empty);
        assert!(m.cpu.is_some() && m.memory.is_some() && m.pids.is_some());
        assert_eq!(m.memory.usage_limit, u64::MAX);
    }

    #[test]
    fn encoded_answers_decode_as_containerds_types() {
        for flavor in [Flavor::V1, Flavor::V2] {
            let (url, bytes) = encode(&sample(), flavor).unwrap();
            match flavor {
                Flavor::V1 => {
                    assert_eq!(url, "io.containerd.cgroups.v1.Metrics");
                    assert_eq!(v1::Metrics::parse_from_bytes(&bytes).unwrap().memory.usage.usage, 40 << 20);
                }
                Flavor::V2 => {
                    assert_eq!(url, "io.containerd.cgroups.v2.Metrics");
                    assert_eq!(v2::Metrics::parse_from_bytes(&bytes).unwrap().memory.usage, 40 << 20);
                }
            }
        }
    }
}
