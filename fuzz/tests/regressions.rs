//! Every crash the fuzzers found, as a readable test of the fixed behaviour. The crashing
//! inputs themselves are in the seed corpus (`fuzz/corpus/<target>/regress-*`), so every fuzz
//! run replays them too; `replayed_crash_inputs_do_not_panic` runs them here directly.

use std::collections::HashMap;

use agent_protocol::agent as pb;
use podvisor_shim::{annotations, metrics};
use protobuf::MessageField;

fn stats_with_memory(kv: &[(&str, u64)]) -> pb::StatsContainerResponse {
    let mut mem = pb::MemoryStats::new();
    for (k, v) in kv {
        mem.stats.insert(k.to_string(), *v);
    }
    let c = pb::CgroupStats { memory_stats: MessageField::some(mem), ..Default::default() };
    pb::StatsContainerResponse { cgroup_stats: MessageField::some(c), ..Default::default() }
}

/// fuzz `stats_metrics` (and `agent_answer`, the same conversion behind `StatsContainer`):
/// `memory.stat` `kernel_stack` + `slab` overflowed (metrics.rs:98) when the guest reported
/// no `kernel` key and huge values. Now it saturates.
#[test]
fn guest_kernel_memory_saturates() {
    let s = stats_with_memory(&[("kernel_stack", u64::MAX), ("slab", 1)]);
    let v1 = metrics::to_v1(&s);
    assert_eq!(v1.memory.kernel.usage, u64::MAX);
    metrics::encode(&s, metrics::Flavor::V1).unwrap();
}

/// fuzz `stats_metrics`, `agent_answer`: `workingset_{refault,activate}_anon` + `_file`
/// overflowed (metrics.rs:296, 298).
#[test]
fn guest_workingset_counters_saturate() {
    let s = stats_with_memory(&[
        ("workingset_refault_anon", u64::MAX),
        ("workingset_refault_file", 2),
        ("workingset_activate_anon", 5),
        ("workingset_activate_file", u64::MAX - 1),
    ]);
    let v2 = metrics::to_v2(&s);
    assert_eq!(v2.memory.workingset_refault, u64::MAX);
    assert_eq!(v2.memory.workingset_activate, u64::MAX);
    metrics::encode(&s, metrics::Flavor::V2).unwrap();
}

/// fuzz `stats_metrics`: per-device block I/O sums overflowed (metrics.rs:119) when the guest
/// listed one device and op twice with huge values.
#[test]
fn guest_block_io_sums_saturate() {
    let e = |op: &str, value| pb::BlkioStatsEntry { major: 8, minor: 0, op: op.into(), value, ..Default::default() };
    let blkio = pb::BlkioStats {
        io_service_bytes_recursive: vec![e("Read", u64::MAX), e("read", 7), e("Write", 1)],
        io_serviced_recursive: vec![e("Write", u64::MAX), e("Write", u64::MAX)],
        ..Default::default()
    };
    let c = pb::CgroupStats { blkio_stats: MessageField::some(blkio), ..Default::default() };
    let s = pb::StatsContainerResponse { cgroup_stats: MessageField::some(c), ..Default::default() };
    let io = metrics::to_v2(&s).io.usage.clone();
    assert_eq!(io.len(), 1);
    assert_eq!((io[0].rbytes, io[0].wbytes, io[0].wios), (u64::MAX, 1, u64::MAX));
}

fn ann(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// fuzz `annotations`: a sandbox CPU quota/period asking for more than 2^32 vCPUs was
/// truncated to `u32` and then overflowed `default_vcpus` (annotations.rs:134); other ratios
/// truncated silently (2^32 + 1 vCPUs became 1). Now more than 240 vCPUs is an error naming
/// the annotations.
#[test]
fn sandbox_cpu_quota_beyond_a_vm_is_an_error() {
    let quota = "io.kubernetes.cri.sandbox-cpu-quota";
    let period = "io.kubernetes.cri.sandbox-cpu-period";
    for (q, p) in [("9223372036854775807", "1"), ("4294967295", "1"), ("4294967297", "1"), ("24100000", "100000")] {
        let mut c = hypervisor::QemuConfig { default_vcpus: 2, ..Default::default() };
        let e = annotations::apply(&ann(&[(quota, q), (period, p)]), &mut c).unwrap_err();
        assert!(e.contains("io.kubernetes.cri.sandbox-cpu-quota") && e.contains("at most 240"), "{e}");
        assert_eq!(c.default_vcpus, 2, "the configuration is untouched");
    }
    let mut c = hypervisor::QemuConfig { default_vcpus: 2, ..Default::default() };
    annotations::apply(&ann(&[(quota, "24000000"), (period, "100000")]), &mut c).unwrap();
    assert_eq!(c.default_vcpus, 242, "240 vCPUs for the pod are still accepted");
}

#[test]
fn replayed_crash_inputs_do_not_panic() {
    let mut replayed = 0;
    for t in podvisor_fuzz::targets() {
        let mut target = (t.make)();
        for (path, input) in podvisor_fuzz::driver::load_corpus(&podvisor_fuzz::corpus_dir(t.name)) {
            if !path.file_name().unwrap().to_string_lossy().starts_with("regress-") {
                continue;
            }
            replayed += 1;
            let outcome = podvisor_fuzz::driver::run_one(&mut *target, &input);
            assert!(outcome.is_none(), "{}: {outcome:?}", path.display());
        }
    }
    assert!(replayed >= 5, "the regress-* inputs are missing from fuzz/corpus");
}
