//! The Kata Containers agent API, as spoken between podvisor's host shim
//! (`containerd-shim-kata-v2`) and its in-guest agent.
//!
//! The schema lives in `protos/` and is wire-compatible with Kata Containers' agent protocol:
//! the same protobuf packages (`grpc`, and `types` for network types), service and method
//! names, message names, field names, numbers and types. Because ttrpc method paths are built
//! from the package and service names, a Kata runtime can talk to podvisor's agent and
//! podvisor's shim to a Kata agent, e.g. `/grpc.AgentService/CreateContainer` and
//! `/grpc.Health/Check`.
//!
//! The Rust code is generated at build time by `build.rs` with `ttrpc-codegen` (rust-protobuf
//! messages plus async ttrpc clients and servers) using the pure-Rust `.proto` parser, so no
//! `protoc` binary is needed. Modules:
//!
//! | module | from | contents |
//! | --- | --- | --- |
//! | [`agent`] | `agent.proto` | requests/responses of `grpc.AgentService` |
//! | [`agent_ttrpc`] | `agent.proto` | [`agent_ttrpc::AgentServiceClient`], the [`agent_ttrpc::AgentService`] server trait, [`agent_ttrpc::create_agent_service`] |
//! | [`health`] | `health.proto` | `grpc.Health` messages, e.g. [`health::HealthCheckResponse`] and [`health::health_check_response::ServingStatus`] |
//! | [`health_ttrpc`] | `health.proto` | [`health_ttrpc::HealthClient`], the [`health_ttrpc::Health`] trait, [`health_ttrpc::create_health`] |
//! | [`oci`] | `oci.proto` | the OCI runtime spec carried in requests ([`oci::Spec`], ...) |
//! | [`types`] | `types.proto` | network types ([`types::Interface`], [`types::Route`], ...) |
//! | [`csi`] | `csi.proto` | volume statistics ([`csi::VolumeStatsResponse`]) |
//! | [`hypervisor`] | `hypervisor.proto` | Kata's remote hypervisor API, package `remote` ([`hypervisor::CreateVMRequest`], ...) |
//! | [`hypervisor_ttrpc`] | `hypervisor.proto` | [`hypervisor_ttrpc::HypervisorClient`], the [`hypervisor_ttrpc::Hypervisor`] server trait, [`hypervisor_ttrpc::create_hypervisor`] |
//!
//! `google.protobuf.Empty` maps to [`protobuf::well_known_types::empty::Empty`].
//!
//! Every method of a generated server trait has a default body that fails with a ttrpc status
//! `NOT_FOUND` (`"/grpc.AgentService/<Method> is not supported"`), so a server implements only
//! what it supports.

/// Allows for lints that generated code trips. Applied to every generated module below; the
/// build script strips the generator's own inner `#![allow(..)]` attributes, which `include!`
/// cannot take inside a `mod` block.
macro_rules! generated_module {
    ($(#[$doc:meta])* $name:ident, $file:literal) => {
        $(#[$doc])*
        #[allow(
            dead_code,
            missing_docs,
            non_camel_case_types,
            non_snake_case,
            non_upper_case_globals,
            trivial_casts,
            unused_imports,
            unused_mut,
            unused_results,
            unknown_lints,
            clippy::all
        )]
        #[rustfmt::skip]
        pub mod $name {
            include!(concat!(env!("OUT_DIR"), "/", $file));
        }
    };
}

generated_module!(
    /// Messages of `agent.proto` (package `grpc`).
    agent, "agent.rs"
);
generated_module!(
    /// Async ttrpc client and server for `grpc.AgentService`.
    agent_ttrpc, "agent_ttrpc.rs"
);
generated_module!(
    /// Messages of `health.proto` (package `grpc`).
    health, "health.rs"
);
generated_module!(
    /// Async ttrpc client and server for `grpc.Health`.
    health_ttrpc, "health_ttrpc.rs"
);
generated_module!(
    /// The OCI runtime spec messages of `oci.proto` (package `grpc`).
    oci, "oci.rs"
);
generated_module!(
    /// Network and ownership types of `types.proto` (package `types`).
    types, "types.rs"
);
generated_module!(
    /// Volume statistics messages of `csi.proto` (package `grpc`).
    csi, "csi.rs"
);

generated_module!(
    /// Messages of `hypervisor.proto` (package `remote`): Kata's remote hypervisor API.
    hypervisor, "hypervisor.rs"
);
generated_module!(
    /// Async ttrpc client and server for `remote.Hypervisor`.
    hypervisor_ttrpc, "hypervisor_ttrpc.rs"
);

/// The ttrpc service name of the remote hypervisor API (package `remote`).
pub const REMOTE_HYPERVISOR_SERVICE: &str = "remote.Hypervisor";

/// Conversions between `oci_spec::runtime::Spec` and the protobuf [`oci::Spec`], lossless up to
/// the documented zero → `None` rules.
pub mod convert;

/// The vsock port the agent listens on inside the guest (Kata's default agent port).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The ttrpc service name of the agent API (package `grpc`).
pub const AGENT_SERVICE: &str = "grpc.AgentService";

/// The ttrpc service name of the health API (package `grpc`).
pub const HEALTH_SERVICE: &str = "grpc.Health";

/// The `.proto` source of the agent API, as compiled into this crate.
pub const AGENT_PROTO: &str = include_str!("../protos/agent.proto");

/// Every RPC of `grpc.AgentService`, in declaration order. A test checks it against
/// `protos/agent.proto`.
pub const AGENT_SERVICE_RPCS: &[&str] = &[
    // containers and processes
    "CreateContainer",
    "StartContainer",
    "RemoveContainer",
    "ExecProcess",
    "SignalProcess",
    "WaitProcess",
    "UpdateContainer",
    "UpdateEphemeralMounts",
    "StatsContainer",
    "PauseContainer",
    "ResumeContainer",
    "RemoveStaleVirtiofsShareMounts",
    // stdio
    "WriteStdin",
    "ReadStdout",
    "ReadStderr",
    "CloseStdin",
    "TtyWinResize",
    // networking
    "UpdateInterface",
    "UpdateRoutes",
    "ListInterfaces",
    "ListRoutes",
    "AddARPNeighbors",
    "GetIPTables",
    "SetIPTables",
    // metrics
    "GetMetrics",
    // memory reclaim agent
    "MemAgentMemcgSet",
    "MemAgentCompactSet",
    // sandbox and guest
    "CreateSandbox",
    "DestroySandbox",
    "OnlineCPUMem",
    "ReseedRandomDev",
    "GetGuestDetails",
    "MemHotplugByProbe",
    "SetGuestDateTime",
    "CopyFile",
    "GetOOMEvent",
    "AddSwap",
    "GetVolumeStats",
    "ResizeVolume",
    "SetPolicy",
];

/// The full ttrpc method path of an AgentService RPC, e.g. `/grpc.AgentService/CreateContainer`.
pub fn agent_method_path(rpc: &str) -> String {
    format!("/{AGENT_SERVICE}/{rpc}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `rpc Name(` declarations inside `service <service> { .. }` of a proto source, in
    /// order. Comments are removed first so commented-out RPCs do not count.
    fn declared_rpcs(proto: &str, service: &str) -> Vec<String> {
        let without_comments: String = proto
            .lines()
            .map(|line| match line.find("//") {
                Some(i) => &line[..i],
                None => line,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let header = format!("service {service}");
        let start = without_comments.find(&header).unwrap_or_else(|| panic!("no `{header}` in proto"));
        let body_start = start + without_comments[start..].find('{').expect("service has a body") + 1;
        let body_len = without_comments[body_start..].find('}').expect("service body is closed");
        let body = &without_comments[body_start..body_start + body_len];
        body.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "rpc")
            .map(|w| w[1].split('(').next().unwrap().to_string())
            .collect()
    }

    #[test]
    fn rpc_list_matches_agent_proto() {
        let declared = declared_rpcs(AGENT_PROTO, "AgentService");
        assert_eq!(declared.len(), 40, "Kata's AgentService declares 40 RPCs");
        assert_eq!(AGENT_SERVICE_RPCS, declared.as_slice());
    }

    #[test]
    fn rpc_list_matches_generated_descriptor() {
        // The compiled descriptor is what the generated server registers; it must agree too.
        let fd = agent::file_descriptor();
        let service =
            fd.proto().service.iter().find(|s| s.name() == "AgentService").expect("AgentService in descriptor");
        let names: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
        assert_eq!(AGENT_SERVICE_RPCS, names.as_slice());
        assert_eq!(fd.proto().package(), "grpc");
    }

    #[test]
    fn rpc_list_has_no_duplicates() {
        let mut sorted = AGENT_SERVICE_RPCS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), AGENT_SERVICE_RPCS.len());
    }

    #[test]
    fn health_service_declares_check_and_version() {
        let proto = include_str!("../protos/health.proto");
        assert_eq!(declared_rpcs(proto, "Health"), ["Check", "Version"]);
    }

    #[test]
    fn remote_hypervisor_service_is_katas() {
        let fd = hypervisor::file_descriptor();
        assert_eq!(fd.proto().package(), "remote");
        let service = fd.proto().service.iter().find(|s| s.name() == "Hypervisor").expect("service Hypervisor");
        let names: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
        assert_eq!(names, ["CreateVM", "StartVM", "StopVM", "Version"]);
        let create = fd.proto().message_type.iter().find(|m| m.name() == "CreateVMRequest").unwrap();
        let fields: Vec<(&str, i32)> = create.field.iter().map(|f| (f.name(), f.number())).collect();
        assert_eq!(fields, [("id", 1), ("annotations", 2), ("networkNamespacePath", 3)]);
        let mut req = hypervisor::CreateVMRequest::new();
        req.id = "x".into();
        req.networkNamespacePath = "/var/run/netns/n".into();
        let _ = req.annotations.insert("k".into(), "v".into());
        // Field 1 (string), then the map entry as field 2, then field 3: Kata's encoding.
        let bytes = protobuf::Message::write_to_bytes(&req).unwrap();
        assert_eq!(&bytes[..3], &[0x0a, 0x01, b'x']);
        assert_eq!(bytes[3], 0x12);
    }

    #[test]
    fn method_path_uses_kata_package() {
        assert_eq!(agent_method_path("CreateContainer"), "/grpc.AgentService/CreateContainer");
    }
}
