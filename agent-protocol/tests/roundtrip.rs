//! Protocol round trips: build messages, encode them with rust-protobuf, decode the bytes and
//! check the result equals the original (and that the encoding is not trivially empty).

use podvisor_agent_protocol::{agent, csi, health, oci, types};
use protobuf::{Message, MessageField};

/// Encodes `msg`, decodes the bytes, and asserts equality. Returns the encoding.
fn round_trip<M: Message + PartialEq + std::fmt::Debug>(msg: &M) -> Vec<u8> {
    let bytes = msg.write_to_bytes().expect("encode");
    let back = M::parse_from_bytes(&bytes).expect("decode");
    assert_eq!(&back, msg, "round trip changed the message");
    bytes
}

fn sample_spec() -> oci::Spec {
    let process = oci::Process {
        Terminal: false,
        User: MessageField::some(oci::User {
            UID: 1000,
            GID: 1000,
            AdditionalGids: vec![10, 20],
            ..Default::default()
        }),
        Args: vec!["/bin/sh".into(), "-c".into(), "echo hello".into()],
        Env: vec!["PATH=/usr/bin:/bin".into(), "TERM=xterm".into()],
        Cwd: "/".into(),
        Capabilities: MessageField::some(oci::LinuxCapabilities {
            Bounding: vec!["CAP_CHOWN".into()],
            Effective: vec!["CAP_CHOWN".into()],
            ..Default::default()
        }),
        Rlimits: vec![oci::POSIXRlimit { Type: "RLIMIT_NOFILE".into(), Hard: 1024, Soft: 1024, ..Default::default() }],
        NoNewPrivileges: true,
        OOMScoreAdj: -998,
        ..Default::default()
    };
    let mounts = vec![
        oci::Mount {
            destination: "/proc".into(),
            source: "proc".into(),
            type_: "proc".into(),
            options: vec![],
            ..Default::default()
        },
        oci::Mount {
            destination: "/dev/shm".into(),
            source: "shm".into(),
            type_: "tmpfs".into(),
            options: vec!["nosuid".into(), "nodev".into(), "size=65536k".into()],
            ..Default::default()
        },
    ];
    let namespaces = ["pid", "ipc", "uts", "mount"]
        .iter()
        .map(|t| oci::LinuxNamespace { Type: (*t).into(), Path: String::new(), ..Default::default() })
        .chain(std::iter::once(oci::LinuxNamespace {
            Type: "network".into(),
            Path: "/var/run/netns/cni-1".into(),
            ..Default::default()
        }))
        .collect();
    let mut syscall =
        oci::LinuxSyscall { Names: vec!["ptrace".into()], Action: "SCMP_ACT_ERRNO".into(), ..Default::default() };
    syscall.set_errnoret(1);
    let linux = oci::Linux {
        Namespaces: namespaces,
        CgroupsPath: "/kubepods/pod1/ctr1".into(),
        Sysctl: [("net.ipv4.ip_forward".to_string(), "1".to_string())].into_iter().collect(),
        Resources: MessageField::some(oci::LinuxResources {
            Memory: MessageField::some(oci::LinuxMemory { Limit: 256 << 20, ..Default::default() }),
            CPU: MessageField::some(oci::LinuxCPU {
                Quota: 50_000,
                Period: 100_000,
                Cpus: "0-1".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        Seccomp: MessageField::some(oci::LinuxSeccomp {
            DefaultAction: "SCMP_ACT_ALLOW".into(),
            Syscalls: vec![syscall],
            ..Default::default()
        }),
        MaskedPaths: vec!["/proc/kcore".into()],
        ..Default::default()
    };
    oci::Spec {
        Version: "1.1.0".into(),
        Process: MessageField::some(process),
        Root: MessageField::some(oci::Root { Path: "rootfs".into(), Readonly: true, ..Default::default() }),
        Hostname: "pod".into(),
        Mounts: mounts,
        Annotations: [("io.kubernetes.cri.container-type".to_string(), "container".to_string())].into_iter().collect(),
        Linux: MessageField::some(linux),
        ..Default::default()
    }
}

#[test]
fn create_container_request_with_oci_spec() {
    let req = agent::CreateContainerRequest {
        container_id: "ctr1".into(),
        exec_id: "ctr1".into(),
        storages: vec![agent::Storage {
            driver: "virtio-fs".into(),
            source: "ctr1/rootfs".into(),
            fstype: "virtiofs".into(),
            mount_point: "/run/kata-containers/shared/containers/ctr1/rootfs".into(),
            fs_group: MessageField::some(agent::FSGroup {
                group_id: 2000,
                group_change_policy: types::FSGroupChangePolicy::OnRootMismatch.into(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        devices: vec![agent::Device {
            id: "vda".into(),
            type_: "blk".into(),
            vm_path: "/dev/vda".into(),
            ..Default::default()
        }],
        OCI: MessageField::some(sample_spec()),
        sandbox_pidns: true,
        stdout_port: 5000,
        ..Default::default()
    };
    let bytes = round_trip(&req);
    let back = agent::CreateContainerRequest::parse_from_bytes(&bytes).unwrap();
    let spec = back.OCI.as_ref().expect("spec survives");
    let process = spec.Process.as_ref().unwrap();
    assert_eq!(process.Args, ["/bin/sh", "-c", "echo hello"]);
    assert_eq!(process.Env.len(), 2);
    assert_eq!(spec.Mounts[1].options, ["nosuid", "nodev", "size=65536k"]);
    let ns = &spec.Linux.as_ref().unwrap().Namespaces;
    assert_eq!(ns.len(), 5);
    assert_eq!(ns[4].Path, "/var/run/netns/cni-1");
    assert_eq!(spec.Linux.Seccomp.Syscalls[0].errnoret(), 1);
    assert_eq!(
        back.storages[0].fs_group.group_change_policy.enum_value(),
        Ok(types::FSGroupChangePolicy::OnRootMismatch)
    );
}

#[test]
fn interface() {
    let iface = types::Interface {
        device: "eth0".into(),
        name: "eth0".into(),
        IPAddresses: vec![
            types::IPAddress {
                family: types::IPFamily::v4.into(),
                address: "10.88.0.5".into(),
                mask: "16".into(),
                ..Default::default()
            },
            types::IPAddress {
                family: types::IPFamily::v6.into(),
                address: "fd00::5".into(),
                mask: "64".into(),
                ..Default::default()
            },
        ],
        mtu: 1500,
        hwAddr: "02:42:ac:11:00:02".into(),
        devicePath: "01/02".into(),
        type_: "veth".into(),
        raw_flags: 0x1003,
        ..Default::default()
    };
    let bytes = round_trip(&iface);
    assert!(bytes.len() > 40);
    // The same interface wrapped the way UpdateInterface and ListInterfaces carry it.
    round_trip(&agent::UpdateInterfaceRequest { interface: MessageField::some(iface.clone()), ..Default::default() });
    round_trip(&agent::Interfaces { Interfaces: vec![iface.clone(), iface], ..Default::default() });
}

#[test]
fn guest_details_response() {
    let resp = agent::GuestDetailsResponse {
        mem_block_size_bytes: 128 << 20,
        agent_details: MessageField::some(agent::AgentDetails {
            version: "0.1.0".into(),
            init_daemon: true,
            device_handlers: vec!["blk".into(), "vfio".into()],
            storage_handlers: vec!["virtio-fs".into(), "ephemeral".into()],
            supports_seccomp: false,
            extra_features: vec!["agent-policy".into()],
            ..Default::default()
        }),
        support_mem_hotplug_probe: true,
        ..Default::default()
    };
    let bytes = round_trip(&resp);
    let back = agent::GuestDetailsResponse::parse_from_bytes(&bytes).unwrap();
    assert_eq!(back.agent_details.version, "0.1.0");
    assert_eq!(back.mem_block_size_bytes, 134_217_728);
}

#[test]
fn update_routes_request() {
    let route = |dest: &str, gw: &str, family: types::IPFamily| types::Route {
        dest: dest.into(),
        gateway: gw.into(),
        device: "eth0".into(),
        source: String::new(),
        scope: 0,
        family: family.into(),
        flags: 0,
        ..Default::default()
    };
    let req = agent::UpdateRoutesRequest {
        routes: MessageField::some(agent::Routes {
            Routes: vec![
                route("", "10.88.0.1", types::IPFamily::v4),
                route("10.88.0.0/16", "", types::IPFamily::v4),
                types::Route { scope: 253, flags: 4, ..route("fd00::/64", "", types::IPFamily::v6) },
            ],
            ..Default::default()
        }),
        ..Default::default()
    };
    let bytes = round_trip(&req);
    let back = agent::UpdateRoutesRequest::parse_from_bytes(&bytes).unwrap();
    assert_eq!(back.routes.Routes.len(), 3);
    assert_eq!(back.routes.Routes[2].family.enum_value(), Ok(types::IPFamily::v6));
}

#[test]
fn stats_volume_and_health_messages() {
    let mut stats = agent::StatsContainerResponse::new();
    let cg = stats.cgroup_stats.mut_or_insert_default();
    cg.memory_stats.mut_or_insert_default().stats.insert("rss".into(), 4096);
    cg.hugetlb_stats.insert("2MB".into(), agent::HugetlbStats { usage: 1, ..Default::default() });
    cg.cpu_stats.mut_or_insert_default().cpu_usage.mut_or_insert_default().percpu_usage = vec![1, 2, 3];
    stats.network_stats.push(agent::NetworkStats {
        name: "eth0".into(),
        rx_bytes: 10,
        tx_bytes: 20,
        ..Default::default()
    });
    round_trip(&stats);

    round_trip(&csi::VolumeStatsResponse {
        usage: vec![csi::VolumeUsage {
            total: 100,
            used: 40,
            available: 60,
            unit: csi::volume_usage::Unit::BYTES.into(),
            ..Default::default()
        }],
        volume_condition: MessageField::some(csi::VolumeCondition {
            abnormal: false,
            message: "ok".into(),
            ..Default::default()
        }),
        ..Default::default()
    });

    round_trip(&health::HealthCheckResponse {
        status: health::health_check_response::ServingStatus::NOT_SERVING.into(),
        ..Default::default()
    });

    let memcg = agent::MemAgentMemcgConfig { disabled: Some(false), swappiness_max: Some(50), ..Default::default() };
    let back = agent::MemAgentMemcgConfig::parse_from_bytes(&round_trip(&memcg)).unwrap();
    assert_eq!(back.disabled, Some(false), "proto3 optional keeps presence of a default value");
    assert_eq!(back.swap, None);
}
