//! The agent's fuzz targets (see `fuzz/README.md`): what the agent computes from a request
//! before anything touches the guest must not panic, whatever the host sends.
//!
//! * `agent_policy_input`: any AgentService request (raw protobuf bytes or generated field by
//!   field) → `policy::message_json` (the policy's `input`) → `AgentPolicy::check` against a
//!   policy that reads the input's fields.
//! * `agent_set_policy`: any text as `SetPolicy`'s policy → `AgentPolicy::set` (regorus parses,
//!   compiles and evaluates it), then one `check` when it loaded.
//! * `agent_spec`: a `CreateContainerRequest` / `ExecProcessRequest` → `convert::spec_from_grpc`
//!   → `spec::normalize` / `spec::normalize_process`, `device::check`, `spec::valid_id`,
//!   `spec::cgroup_path` and `spec::sysctl_file` of the sysctls taken out.
//!
//! The driver and the protobuf generator are the fuzz crate's (`fuzz/src/driver.rs`,
//! `fuzz/src/proto_gen.rs`), included by path: the agent is a binary crate. Seed corpus and
//! crash inputs: `fuzz/corpus/<target>/`. `make fuzz` runs these with a longer budget
//! (`PODVISOR_FUZZ_SECONDS`).

#[path = "../../fuzz/src/driver.rs"]
mod driver;
#[path = "../../fuzz/src/proto_gen.rs"]
mod proto_gen;

use std::path::{Path, PathBuf};

use agent_protocol::agent as pb;
use protobuf::reflect::MessageDescriptor;
use protobuf::MessageFull;

use crate::container::{device, spec};
use crate::policy::{self, AgentPolicy};

/// Words the conversion, the normalisation and the policy below match on.
const WORDS: &[&str] = &[
    "",
    "sh",
    "/",
    "/bin/sh",
    "..",
    "rootfs",
    "/run/kata-containers/shared/containers/c1/rootfs",
    "pid",
    "network",
    "ipc",
    "uts",
    "mount",
    "cgroup",
    "user",
    "/proc/1/ns/net",
    "bind",
    "rbind",
    "rshared",
    "slave",
    "proc",
    "tmpfs",
    "blk",
    "/dev/vda",
    "02/00",
    "net.ipv4.ip_forward",
    "net..x",
    "net.",
    "kernel.shm_rmid_forced",
    "PATH=/bin",
    "HOME=/root",
    "CAP_SYS_ADMIN",
    "RLIMIT_NOFILE",
    "SCMP_ACT_ERRNO",
    "SCMP_ARCH_X86_64",
    "c1",
    "c1/../x",
    "eth0",
    "\u{0}",
];

/// A policy that reads request fields of several shapes (strings, lists, numbers, maps).
const POLICY: &str = r#"package agent_policy

import future.keywords.every
import future.keywords.in

default AllowRequestsFailingPolicy := false

default CreateContainerRequest := false

CreateContainerRequest {
    regex.match("^[a-z0-9]+$", input.container_id)
    input.OCI.Root.Path != ""
    every m in input.OCI.Mounts {
        not startswith(m.source, "/etc")
    }
    count(input.OCI.Process.Args) > 0
    print("create", input.OCI.Process.Args[0])
}

default ExecProcessRequest := false

ExecProcessRequest {
    input.process.Args[0] == "sh"
    input.process.User.UID >= 0
}

default UpdateInterfaceRequest := false

UpdateInterfaceRequest {
    input.interface.mtu < 9000
    some a in input.interface.IPAddresses
    a.mask != ""
}

default SetPolicyRequest := true

default StartContainerRequest := true

CopyFileRequest {
    startswith(input.path, "/run/kata-containers/shared/containers/")
    not contains(input.path, "..")
}

UpdateRoutesRequest := {"allowed": count(input.routes.Routes) < 10}
"#;

/// AgentService request types in declaration order.
fn request_types() -> Vec<(String, MessageDescriptor)> {
    let types = policy::request_types();
    agent_protocol::AGENT_SERVICE_RPCS.iter().map(|r| (r.to_string(), types[*r].clone())).collect()
}

fn corpus(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(name)
}

/// Byte 0: the request type (index in `AGENT_SERVICE_RPCS`, bit 7 set: generated, else the
/// rest is protobuf bytes); byte 1: whether to evaluate the policy (odd) or only build its
/// input.
fn policy_input(types: &[(String, MessageDescriptor)], engine: &AgentPolicy, data: &[u8]) {
    let [kind, eval, rest @ ..] = data else { return };
    let (rpc, d) = &types[(*kind & 0x7f) as usize % types.len()];
    let m = if kind & 0x80 == 0 {
        match d.parse_from_bytes(rest) {
            Ok(m) => m,
            Err(_) => return,
        }
    } else {
        proto_gen::from_bytes(rest, d, WORDS, 6)
    };
    let json = policy::message_json(&*m);
    let _ = json.to_string();
    if eval % 2 == 1 {
        let _ = engine.check(rpc, d.name(), || Ok(json));
    }
}

/// Realistic requests to mutate: the seeds `fuzz/corpus/agent_spec/seed-create` and
/// `seed-exec` (written by `fuzz/examples/make_seeds.rs`), without their mode byte.
struct Bases {
    create: pb::CreateContainerRequest,
    exec: pb::ExecProcessRequest,
}

impl Bases {
    fn load() -> Bases {
        let seed = |name: &str| {
            let bytes = std::fs::read(corpus("agent_spec").join(name)).unwrap_or_else(|e| panic!("seed {name}: {e}"));
            bytes[1..].to_vec()
        };
        use protobuf::Message;
        Bases {
            create: pb::CreateContainerRequest::parse_from_bytes(&seed("seed-create")).expect("seed-create decodes"),
            exec: pb::ExecProcessRequest::parse_from_bytes(&seed("seed-exec")).expect("seed-exec decodes"),
        }
    }
}

/// Byte 0: bit 0 exec (else create), bit 1 generated (else protobuf bytes; bit 5 instead: a
/// realistic request mutated field by field), bits 2-4 which guest paths exist and which
/// namespaces the pod shares.
fn spec_path(bases: &Bases, data: &[u8]) {
    let [mode, rest @ ..] = data else { return };
    let generated = mode & 2 != 0;
    let mutated = mode & 0x20 != 0;
    let exists_all = mode & 4 != 0;
    let join = spec::Join {
        ipc: (mode & 8 != 0).then(|| PathBuf::from("/run/podvisor/sandbox/ns/ipc")),
        uts: (mode & 8 != 0).then(|| PathBuf::from("/run/podvisor/sandbox/ns/uts")),
        pid: (mode & 16 != 0).then(|| PathBuf::from("/proc/7/ns/pid")),
    };
    // A stand-in for the guest's file system: everything, or only some prefixes.
    let exists = move |p: &Path| exists_all || p.starts_with("/run/kata-containers") || p == Path::new("/");
    if mode & 1 == 0 {
        let req = if mutated {
            let m = proto_gen::mutated(rest, &bases.create, WORDS, 7);
            m.downcast_ref::<pb::CreateContainerRequest>().expect("CreateContainerRequest").clone()
        } else if generated {
            let m = proto_gen::from_bytes(rest, &pb::CreateContainerRequest::descriptor(), WORDS, 7);
            m.downcast_ref::<pb::CreateContainerRequest>().expect("CreateContainerRequest").clone()
        } else {
            match <pb::CreateContainerRequest as protobuf::Message>::parse_from_bytes(rest) {
                Ok(r) => r,
                Err(_) => return,
            }
        };
        let id = &req.container_id;
        let _ = spec::valid_id(id);
        let _ = spec::valid_id(&req.exec_id);
        for (i, d) in req.devices.iter().enumerate() {
            let _ = device::check(d, i);
        }
        let Some(oci) = req.OCI.as_ref() else { return };
        let Ok(converted) = agent_protocol::convert::spec_from_grpc(oci) else { return };
        let mut typed = converted;
        let cgroup = spec::cgroup_path("sb1", if spec::valid_id(id) { id } else { "c1" });
        if let Ok(facts) = spec::normalize(&mut typed, &cgroup, &join, &exists) {
            for (key, _) in &facts.net_sysctls {
                let _ = spec::sysctl_file(key);
            }
            // What the agent writes as the bundle's config.json must read back as a spec.
            let text = serde_json::to_string(&typed).expect("a normalised spec serialises");
            let back: Result<oci_spec_check::Spec, _> = serde_json::from_str(&text);
            assert!(back.is_ok(), "the normalised spec no longer parses: {:?}\n{text}", back.err());
        }
    } else {
        let req = if mutated {
            let m = proto_gen::mutated(rest, &bases.exec, WORDS, 6);
            m.downcast_ref::<pb::ExecProcessRequest>().expect("ExecProcessRequest").clone()
        } else if generated {
            let m = proto_gen::from_bytes(rest, &pb::ExecProcessRequest::descriptor(), WORDS, 6);
            m.downcast_ref::<pb::ExecProcessRequest>().expect("ExecProcessRequest").clone()
        } else {
            match <pb::ExecProcessRequest as protobuf::Message>::parse_from_bytes(rest) {
                Ok(r) => r,
                Err(_) => return,
            }
        };
        let Some(process) = req.process.as_ref() else { return };
        let wrapper = agent_protocol::oci::Spec { Process: Some(process.clone()).into(), ..Default::default() };
        let Ok(converted) = agent_protocol::convert::spec_from_grpc(&wrapper) else { return };
        let Some(mut process) = converted.process().clone() else { return };
        let _ = spec::normalize_process(&mut process, Path::new("/nonexistent/podvisor-fuzz-rootfs"), "process");
    }
}

/// The spec type libcontainer reads `config.json` with.
mod oci_spec_check {
    pub use libcontainer::oci_spec::runtime::Spec;
}

fn report(r: driver::Report) {
    r.publish();
    r.assert_clean();
    assert!(r.tried > r.corpus as u64, "{}: no mutant was tried", r.target);
}

#[test]
fn agent_policy_input() {
    let engine = AgentPolicy::new(slog::Logger::root(slog::Discard, slog::o!()));
    engine.set(POLICY).expect("the fuzz policy loads");
    let types = request_types();
    let cfg = driver::Config::short(300);
    let dict: &[&[u8]] = &[b"\x0a\x02c1", b"\x12\x00", b"\x80\x01"];
    report(driver::fuzz("agent_policy_input", &corpus("agent_policy_input"), dict, &cfg, |data| {
        policy_input(&types, &engine, data)
    }));
}

#[test]
fn agent_spec() {
    let bases = Bases::load();
    let cfg = driver::Config::short(600);
    let dict: &[&[u8]] = &[b"\x0a\x02c1", b"\x12\x00"];
    report(driver::fuzz("agent_spec", &corpus("agent_spec"), dict, &cfg, |data| spec_path(&bases, data)));
}

/// Rego tokens for `agent_set_policy`.
const REGO_DICT: &[&[u8]] = &[
    b"package agent_policy\n",
    b"import future.keywords.in\n",
    b"import future.keywords.every\n",
    b"import future.keywords.if\n",
    b"default ",
    b" := ",
    b" = ",
    b"{",
    b"}",
    b"[",
    b"]",
    b"(",
    b")",
    b"input.",
    b"data.",
    b"some x in ",
    b"every x in ",
    b"not ",
    b"count(",
    b"regex.match(",
    b"base64.decode(",
    b"sprintf(",
    b"print(",
    b"with input as ",
    b"AllowRequestsFailingPolicy",
    b"CreateContainerRequest",
    b"ExecProcessRequest",
    b"true",
    b"false",
    b"null",
    b"`",
    b"\\u0000",
    b"9223372036854775808",
    b"1e400",
    b"\n",
];

#[test]
fn agent_set_policy() {
    let cfg = driver::Config::short(300);
    let exec = pb::ExecProcessRequest { container_id: "c1".into(), ..Default::default() };
    let input = policy::message_json(&exec);
    report(driver::fuzz("agent_set_policy", &corpus("agent_set_policy"), REGO_DICT, &cfg, |data| {
        let engine = AgentPolicy::new(slog::Logger::root(slog::Discard, slog::o!()));
        if engine.set(&String::from_utf8_lossy(data)).is_ok() {
            let _ = engine.check("ExecProcess", "ExecProcessRequest", || Ok(input.clone()));
        }
    }));
}
