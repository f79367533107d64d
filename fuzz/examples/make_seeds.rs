//! Writes the generated part of the seed corpus (`fuzz/corpus/<target>/seed-*`): realistic
//! encoded requests, answers and specs that the mutator starts from. Hand-written seeds (TOML,
//! QMP transcripts) sit next to them. Run: `cargo run -p podvisor-fuzz --example make_seeds`.

use std::path::Path;

use agent_protocol::{agent as pb, health, types};
use protobuf::{Message, MessageField};

/// A CRI-like `config.json` (containerd's default spec plus the usual CRI additions).
const CONFIG_JSON: &str = r#"{
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

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn tagged(tag: &[u8], m: &dyn protobuf::MessageDyn) -> Vec<u8> {
    let mut v = tag.to_vec();
    v.extend(m.write_to_bytes_dyn().unwrap());
    v
}

/// A deterministic byte pattern, for the generated (structured) targets.
fn pattern(n: usize, mul: u32) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(mul).wrapping_add(i >> 3) % 251) as u8).collect()
}

fn main() {
    let spec: oci_spec::runtime::Spec = serde_json::from_str(CONFIG_JSON).unwrap();
    let g = agent_protocol::convert::spec_to_grpc(&spec);
    let idx = |rpc: &str| agent_protocol::AGENT_SERVICE_RPCS.iter().position(|r| *r == rpc).unwrap() as u8;

    // agent_request: [request type index] + encoded request.
    let create = pb::CreateContainerRequest {
        container_id: "ctr1".into(),
        exec_id: "ctr1".into(),
        OCI: MessageField::some(g.clone()),
        storages: vec![pb::Storage {
            driver: "virtio-fs".into(),
            source: "kataShared".into(),
            fstype: "virtiofs".into(),
            mount_point: "/run/kata-containers/shared/containers".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    write("agent_request", "seed-create-container", &tagged(&[idx("CreateContainer")], &create));
    let exec = pb::ExecProcessRequest {
        container_id: "ctr1".into(),
        exec_id: "exec1".into(),
        process: g.Process.clone(),
        ..Default::default()
    };
    write("agent_request", "seed-exec-process", &tagged(&[idx("ExecProcess")], &exec));
    let update = pb::UpdateContainerRequest {
        container_id: "ctr1".into(),
        resources: g.Linux.as_ref().unwrap().Resources.clone(),
        ..Default::default()
    };
    write("agent_request", "seed-update-container", &tagged(&[idx("UpdateContainer")], &update));
    let signal = pb::SignalProcessRequest { container_id: "ctr1".into(), signal: 9, ..Default::default() };
    write("agent_request", "seed-signal-process", &tagged(&[idx("SignalProcess")], &signal));
    let sandbox = pb::CreateSandboxRequest {
        hostname: "pod".into(),
        sandbox_id: "sb1".into(),
        sandbox_pidns: true,
        ..Default::default()
    };
    write("agent_request", "seed-create-sandbox", &tagged(&[idx("CreateSandbox")], &sandbox));
    let ifc = types::Interface {
        name: "eth0".into(),
        hwAddr: "02:00:00:00:00:01".into(),
        mtu: 1500,
        IPAddresses: vec![types::IPAddress { address: "10.0.0.2".into(), mask: "24".into(), ..Default::default() }],
        ..Default::default()
    };
    let upd_ifc = pb::UpdateInterfaceRequest { interface: MessageField::some(ifc.clone()), ..Default::default() };
    write("agent_request", "seed-update-interface", &tagged(&[idx("UpdateInterface")], &upd_ifc));
    let policy = pb::SetPolicyRequest {
        policy: "package agent_policy\ndefault AllowAll := true\n".into(),
        ..Default::default()
    };
    write("agent_request", "seed-set-policy", &tagged(&[idx("SetPolicy")], &policy));

    // Structured targets: byte patterns (the first byte picks the message type where it applies).
    for (target, n) in [("agent_request_gen", 3), ("oci_spec_gen", 3), ("config_gen", 3), ("annotations", 3)] {
        for i in 0..n {
            let mut p = pattern(512 + 256 * i, 31 + 7 * i as u32);
            if target == "agent_request_gen" {
                p[0] = [idx("CreateContainer"), idx("ExecProcess"), idx("UpdateContainer")][i];
            }
            write(target, &format!("seed-pattern-{i}"), &p);
        }
    }

    // oci_json: the CRI-like config.json and the default spec.
    write("oci_json", "seed-cri-config.json", CONFIG_JSON.as_bytes());
    let default = serde_json::to_vec_pretty(&oci_spec::runtime::Spec::default()).unwrap();
    write("oci_json", "seed-default-spec.json", &default);

    // agent_answer: [rpc, mode] + payload (mode 0: the answer message; 1: raw frames;
    // 2: generated; 3: status code + message). RPC numbers as in fuzz/src/lib.rs.
    let serving = health::HealthCheckResponse {
        status: health::health_check_response::ServingStatus::SERVING.into(),
        ..Default::default()
    };
    write("agent_answer", "seed-check", &tagged(&[0, 0], &serving));
    let version = health::VersionCheckResponse { agent_version: "0.1.0".into(), ..Default::default() };
    write("agent_answer", "seed-version", &tagged(&[1, 0], &version));
    let details = pb::GuestDetailsResponse {
        mem_block_size_bytes: 128 << 20,
        agent_details: MessageField::some(pb::AgentDetails { version: "0.1.0".into(), ..Default::default() }),
        support_mem_hotplug_probe: true,
        ..Default::default()
    };
    write("agent_answer", "seed-guest-details", &tagged(&[2, 0], &details));
    let read = pb::ReadStreamResponse { data: b"hello\n".to_vec(), ..Default::default() };
    write("agent_answer", "seed-read-stream", &tagged(&[5, 0], &read));
    let stats = sample_stats();
    write("agent_answer", "seed-stats", &tagged(&[7, 0], &stats));
    write("agent_answer", "seed-update-interface", &tagged(&[9, 0], &ifc));
    let routes = pb::Routes {
        Routes: vec![types::Route {
            dest: "0.0.0.0/0".into(),
            gateway: "10.0.0.1".into(),
            device: "eth0".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    write("agent_answer", "seed-routes", &tagged(&[12, 0], &routes));
    let mut raw = vec![0u8, 1];
    let resp = ttrpc::Response { payload: serving.write_to_bytes().unwrap(), ..Default::default() };
    raw.extend(podvisor_fuzz::ttrpc_frame(1, &resp.write_to_bytes().unwrap()));
    write("agent_answer", "seed-raw-frame", &raw);
    write("agent_answer", "seed-generated-stats", &[&[7u8, 2][..], &pattern(400, 13)].concat());
    write("agent_answer", "seed-status", b"\x0d\x03\x05container ctr1 not found");

    // stats_metrics: [0] + encoded answer, [1] + generator bytes.
    write("stats_metrics", "seed-sample", &tagged(&[0], &stats));
    write("stats_metrics", "seed-pattern", &[&[1u8][..], &pattern(600, 17)].concat());
}

fn sample_stats() -> pb::StatsContainerResponse {
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
