//! Realistic messages the structured targets mutate and `examples/make_seeds.rs` writes as
//! seeds: a CRI container's spec, the requests carrying it, a busy container's statistics.

use agent_protocol::{agent as pb, oci};
use protobuf::MessageField;

/// A CRI-like `config.json` (containerd's default spec plus the usual CRI additions).
pub const CONFIG_JSON: &str = r#"{
  "ociVersion": "1.1.0",
  "process": {
    "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20]},
    "args": ["/bin/sh", "-c", "sleep 1000"],
    "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOSTNAME=pod"],
    "cwd": "/",
    "capabilities": {
      "bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
      "effective": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
      "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    },
    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
    "noNewPrivileges": true,
    "oomScoreAdj": 1000,
    "apparmorProfile": "cri-containerd.apparmor.d"
  },
  "root": {"path": "rootfs", "readonly": false},
  "hostname": "pod",
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/containerd/hosts", "options": ["rbind", "rprivate", "rw"]},
    {"destination": "/data", "type": "bind", "source": "/mnt/data", "options": ["rbind", "rshared", "rw"]}
  ],
  "annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "abc"},
  "linux": {
    "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
    "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"},
    "resources": {
      "devices": [{"allow": false, "access": "rwm"}, {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"}],
      "memory": {"limit": 268435456, "swap": -1, "disableOOMKiller": false},
      "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "cpus": "0-1"},
      "pids": {"limit": 100},
      "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
      "blockIO": {"weight": 100, "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}]}
    },
    "cgroupsPath": "kubepods-besteffort-pod1.slice:cri-containerd:ctr1",
    "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network", "path": "/var/run/netns/cni-1"}],
    "seccomp": {
      "defaultAction": "SCMP_ACT_ERRNO",
      "architectures": ["SCMP_ARCH_X86_64"],
      "flags": ["SECCOMP_FILTER_FLAG_LOG"],
      "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_MASKED_EQ", "valueTwo": 1}]}]
    },
    "maskedPaths": ["/proc/kcore"],
    "readonlyPaths": ["/proc/sys"]
  }
}
"#;

/// [`CONFIG_JSON`] as the shim sends it (`spec_to_grpc`), the rootfs at its guest path.
pub fn guest_spec() -> oci::Spec {
    let spec: oci_spec::runtime::Spec = serde_json::from_str(CONFIG_JSON).expect("CONFIG_JSON parses");
    let mut g = agent_protocol::convert::spec_to_grpc(&spec);
    g.Root.mut_or_insert_default().Path = "/run/kata-containers/shared/containers/ctr1/rootfs".into();
    g
}

/// A `CreateContainerRequest` for [`guest_spec`].
pub fn create_request() -> pb::CreateContainerRequest {
    pb::CreateContainerRequest {
        container_id: "ctr1".into(),
        exec_id: "ctr1".into(),
        OCI: MessageField::some(guest_spec()),
        storages: vec![pb::Storage {
            driver: "virtio-fs".into(),
            source: "kataShared".into(),
            fstype: "virtiofs".into(),
            mount_point: "/run/kata-containers/shared/containers".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// An `ExecProcessRequest` running [`guest_spec`]'s process.
pub fn exec_request() -> pb::ExecProcessRequest {
    pb::ExecProcessRequest {
        container_id: "ctr1".into(),
        exec_id: "exec1".into(),
        process: guest_spec().Process,
        ..Default::default()
    }
}

/// An `UpdateContainerRequest` with [`guest_spec`]'s resources.
pub fn update_request() -> pb::UpdateContainerRequest {
    pb::UpdateContainerRequest {
        container_id: "ctr1".into(),
        resources: guest_spec().Linux.as_ref().expect("linux").Resources.clone(),
        ..Default::default()
    }
}

/// A busy container's statistics, as the agent reports them.
pub fn stats() -> pb::StatsContainerResponse {
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
        ("kernel_stack", 1 << 16),
        ("slab", 1 << 20),
        ("workingset_refault_anon", 5),
        ("workingset_refault_file", 6),
    ] {
        mem.stats.insert(k.into(), v);
    }
    let e = |op: &str, value| pb::BlkioStatsEntry { major: 254, minor: 0, op: op.into(), value, ..Default::default() };
    let blkio = pb::BlkioStats {
        io_service_bytes_recursive: vec![e("Read", 4096), e("Write", 8192)],
        io_serviced_recursive: vec![e("Read", 1), e("Write", 2)],
        ..Default::default()
    };
    let mut c = pb::CgroupStats {
        cpu_stats: MessageField::some(pb::CpuStats {
            cpu_usage: MessageField::some(pb::CpuUsage {
                total_usage: 3_000_000,
                percpu_usage: vec![1_000_000, 2_000_000],
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
    pb::StatsContainerResponse {
        cgroup_stats: MessageField::some(c),
        network_stats: vec![pb::NetworkStats {
            name: "eth0".into(),
            rx_bytes: 100,
            tx_bytes: 200,
            ..Default::default()
        }],
        ..Default::default()
    }
}
