//! podvisor's fuzz targets: every place that decodes input from another party must not panic,
//! whatever the bytes. See `fuzz/README.md`.
//!
//! | target | input | code under test |
//! | --- | --- | --- |
//! | `agent_request` | a byte picking an AgentService request type, then protobuf bytes | decoding, `convert::spec_from_grpc` / `spec_to_grpc` of the carried OCI spec, process and resources |
//! | `agent_request_gen` | as above, the message generated field by field | the same, reaching deep fields |
//! | `oci_spec_gen` | a generated `oci::Spec` | `spec_from_grpc`, then `spec_to_grpc` and back (must give the same spec) |
//! | `oci_json` | a bundle's `config.json` text | `oci_spec` parsing, `spec_to_grpc`, then back (must convert) |
//! | `config_text` | `configuration.toml` text | `podvisor_shim::config::parse` (and `QemuConfig::from_table`) |
//! | `config_gen` | a generated TOML document of the known keys | the same, plus the documented ranges when it loads |
//! | `annotations` | a generated config and annotation map | `annotations::apply`, `decode_agent_policy`, `container_type` |
//! | `qmp_stream` | everything QEMU writes on the QMP socket | `Qmp::from_stream`, its reader task, `execute`, `parse_message` |
//! | `hvsock_reply` | the vsock daemon's answer to `CONNECT <port>` | `vsock::read_connect_reply` |
//! | `agent_answer` | the agent's ttrpc answer to one shim RPC (framed, raw, or generated) | ttrpc's client, `KataAgent`'s methods, `metrics::encode` of stats |
//! | `shim_strings` | single strings from the spec and the configuration | `host_cgroup::relative_path`, `expand_slice`, `mounts::split_options`, `InternetworkingModel::parse`, `decode_agent_policy` |
//! | `stats_metrics` | a `StatsContainerResponse` (protobuf bytes or generated) | `metrics::to_v1`, `to_v2`, `encode` |
//! | `guest_metrics` | the guest's `GetMetrics` text | `monitor::guest::accept`, `to_text`; what passes re-parses with nothing dropped |
//!
//! The agent's own targets (request → policy input, request → guest spec) live in
//! `agent/src/fuzz_targets.rs`, which includes [`driver`] and [`proto_gen`] by path.

pub mod driver;
pub mod proto_gen;
pub mod samples;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_protocol::{agent as pb, convert, oci};
use arbitrary::Unstructured;
use protobuf::reflect::MessageDescriptor;
use protobuf::{Message, MessageDyn, MessageFull};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use driver::{Config, Report};

/// One fuzz target.
pub struct Target {
    /// Name: also the corpus directory `fuzz/corpus/<name>`.
    pub name: &'static str,
    /// Mutants tried by the short pass (`cargo test`).
    pub short_iters: u64,
    /// Tokens the mutator inserts.
    pub dict: &'static [&'static [u8]],
    /// Builds the target (once per run: runtimes and descriptors are set up here).
    pub make: fn() -> Box<dyn FnMut(&[u8])>,
}

/// `fuzz/corpus/<name>`.
pub fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(name)
}

/// Runs `target` with `cfg`.
pub fn run(target: &Target, cfg: &Config) -> Report {
    driver::fuzz(target.name, &corpus_dir(target.name), target.dict, cfg, (target.make)())
}

/// Runs the target called `name` with the short pass's configuration.
pub fn run_short(name: &str) -> Report {
    let t = targets().into_iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no fuzz target {name}"));
    run(&t, &Config::short(t.short_iters))
}

/// Every target, in a fixed order.
pub fn targets() -> Vec<Target> {
    vec![
        Target { name: "agent_request", short_iters: 1500, dict: PROTO_DICT, make: || Box::new(agent_request) },
        Target {
            name: "agent_request_gen",
            short_iters: 1500,
            dict: &[],
            make: || {
                let types = request_types();
                Box::new(move |data| agent_request_gen(&types, data))
            },
        },
        Target { name: "oci_spec_gen", short_iters: 1000, dict: &[], make: || Box::new(oci_spec_gen) },
        Target { name: "oci_json", short_iters: 800, dict: JSON_DICT, make: || Box::new(oci_json) },
        Target { name: "config_text", short_iters: 1500, dict: TOML_DICT, make: || Box::new(config_text) },
        Target { name: "config_gen", short_iters: 1500, dict: &[], make: || Box::new(config_gen) },
        Target { name: "annotations", short_iters: 1500, dict: &[], make: || Box::new(annotations) },
        Target {
            name: "qmp_stream",
            short_iters: 400,
            dict: JSON_DICT,
            make: || {
                let rt = current_thread();
                Box::new(move |data| qmp_stream(&rt, data))
            },
        },
        Target {
            name: "hvsock_reply",
            short_iters: 2000,
            dict: &[b"OK ", b"\n", b"1024", b"CONNECT "],
            make: || {
                let rt = current_thread();
                Box::new(move |data| hvsock_reply(&rt, data))
            },
        },
        Target {
            name: "agent_answer",
            short_iters: 300,
            dict: PROTO_DICT,
            make: || {
                let rt = current_thread();
                Box::new(move |data| agent_answer(&rt, data))
            },
        },
        Target { name: "stats_metrics", short_iters: 1500, dict: PROTO_DICT, make: || Box::new(stats_metrics) },
        Target { name: "shim_strings", short_iters: 2000, dict: STRING_DICT, make: || Box::new(shim_strings) },
        Target { name: "guest_metrics", short_iters: 1500, dict: METRICS_DICT, make: || Box::new(guest_metrics) },
    ]
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

/// Protobuf-ish tokens: varints, tags of small fields, length prefixes.
const PROTO_DICT: &[&[u8]] = &[
    b"\x0a\x00",
    b"\x0a\x7f",
    b"\x12\x02",
    b"\x08\xff\xff\xff\xff\x0f",
    b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x1a\x80\x80\x80\x80\x10",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x0a\x03pid",
    b"\x0a\x07network",
    b"\x0a\x0dCAP_SYS_ADMIN",
];

const JSON_DICT: &[&[u8]] = &[
    b"{}",
    b"[]",
    b"null",
    b"true",
    b"-1",
    b"18446744073709551615",
    b"1e999",
    b"\"\\u0000\"",
    b"{\"return\": {}, \"id\": 1}\n",
    b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}, \"id\": 2}\n",
    b"{\"event\": \"STOP\"}\n",
    b"\"linux\":",
    b"\"process\":",
    b"\"resources\":",
    b"\"cgroupsPath\": \"kubepods-burstable-pod1.slice:cri-containerd:c1\"",
    b"\"cgroupsPath\": \"/../x\"",
    b"-.slice",
    b"\"quota\": 9223372036854775807",
    b"\"period\": 1",
    b"\"limit\": -1",
];

const TOML_DICT: &[&[u8]] = &[
    b"[hypervisor.qemu]\n",
    b"[agent.kata]\n",
    b"[runtime]\n",
    b"default_vcpus = ",
    b"default_maxvcpus = ",
    b"default_memory = ",
    b"default_maxmemory = ",
    b"memory_slots = ",
    b"dial_timeout = ",
    b"enable_annotations = [\".*\"]\n",
    b"machine_type = \"pc\"\n",
    b"9223372036854775807",
    b"-9223372036854775808",
    b"\"\"\"",
    b"[[",
    b"inf",
    b"1979-05-27T07:32:00Z",
];

/// Words the OCI conversion, the agent and the metrics code match on.
pub const OCI_WORDS: &[&str] = &[
    "",
    "pid",
    "network",
    "net",
    "mount",
    "mnt",
    "ipc",
    "uts",
    "user",
    "cgroup",
    "time",
    "a",
    "b",
    "c",
    "u",
    "p",
    "CAP_SYS_ADMIN",
    "CAP_NET_RAW",
    "SYS_ADMIN",
    "CAP_",
    "RLIMIT_NOFILE",
    "RLIMIT_",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_ALLOW",
    "SCMP_ARCH_X86_64",
    "SCMP_CMP_MASKED_EQ",
    "SCMP_CMP_EQ",
    "SECCOMP_FILTER_FLAG_LOG",
    "rw",
    "rwm",
    "bind",
    "rbind",
    "rshared",
    "slave",
    "private",
    "/",
    "/proc",
    "/dev/null",
    "..",
    "/run/kata-containers/shared/containers/x/rootfs",
    "net.ipv4.ip_forward",
    "kernel.shm_rmid_forced",
    "PATH=/bin",
    "HOME=/root",
    "read",
    "Write",
    "kernel",
    "kernel_stack",
    "slab",
    "anon",
    "file",
    "workingset_refault_anon",
    "workingset_refault_file",
    "workingset_activate_anon",
    "workingset_activate_file",
    "2MB",
    "1GB",
    "eth0",
    "\u{0}",
    "é",
];

// ---------------------------------------------------------------------------------------------
// Agent requests and the OCI conversion.

/// Request message of every AgentService RPC, in declaration order.
pub fn request_types() -> Vec<MessageDescriptor> {
    let file = pb::file_descriptor();
    file.services()
        .filter(|s| s.proto().name() == "AgentService")
        .flat_map(|s| s.methods().map(|m| m.input_type()).collect::<Vec<_>>())
        .collect()
}

/// `spec_from_grpc`; when it converts, `spec_to_grpc` of the result must convert back to the
/// same spec (the documented zero → `None` rules are applied by the first conversion already).
pub fn spec_round_trip(spec: &oci::Spec) {
    let Ok(first) = convert::spec_from_grpc(spec) else { return };
    let again = convert::spec_to_grpc(&first);
    let second = convert::spec_from_grpc(&again)
        .unwrap_or_else(|e| panic!("spec_to_grpc output does not convert back: {e}\nspec: {first:?}"));
    assert!(first == second, "spec changed in a round trip:\n{first:?}\n{second:?}");
    let _ = again.write_to_bytes();
}

/// What the agent converts out of a request.
pub fn check_request(m: &dyn MessageDyn) {
    let bytes = m.write_to_bytes_dyn().expect("a decoded message encodes");
    let d = m.descriptor_dyn();
    let back = d.parse_from_bytes(&bytes).expect("an encoded message decodes");
    assert!(d.eq(m, &*back), "{} changed in an encode/decode round trip", d.name());
    if let Some(r) = m.downcast_ref::<pb::CreateContainerRequest>() {
        if let Some(spec) = r.OCI.as_ref() {
            spec_round_trip(spec);
        }
    }
    if let Some(r) = m.downcast_ref::<pb::ExecProcessRequest>() {
        if let Some(p) = r.process.as_ref() {
            spec_round_trip(&oci::Spec { Process: Some(p.clone()).into(), ..Default::default() });
        }
    }
    if let Some(r) = m.downcast_ref::<pb::UpdateContainerRequest>() {
        if let Some(res) = r.resources.as_ref() {
            let linux = oci::Linux { Resources: Some(res.clone()).into(), ..Default::default() };
            spec_round_trip(&oci::Spec { Linux: Some(linux).into(), ..Default::default() });
        }
    }
}

fn agent_request(data: &[u8]) {
    let types = request_types();
    let Some((&which, bytes)) = data.split_first() else { return };
    let d = &types[which as usize % types.len()];
    if let Ok(m) = d.parse_from_bytes(bytes) {
        check_request(&*m);
    }
}

/// A realistic request of type `d` to mutate (the default message for most types).
fn base_request(d: &MessageDescriptor) -> Box<dyn MessageDyn> {
    match d.name() {
        "CreateContainerRequest" => Box::new(samples::create_request()),
        "ExecProcessRequest" => Box::new(samples::exec_request()),
        "UpdateContainerRequest" => Box::new(samples::update_request()),
        _ => d.new_instance(),
    }
}

/// Byte 0: the request type (index in `AGENT_SERVICE_RPCS`); bit 7 set: a realistic request
/// mutated field by field, else a request generated from scratch.
fn agent_request_gen(types: &[MessageDescriptor], data: &[u8]) {
    let Some((&which, bytes)) = data.split_first() else { return };
    let d = &types[(which & 0x7f) as usize % types.len()];
    let m = if which & 0x80 != 0 {
        proto_gen::mutated(bytes, &*base_request(d), OCI_WORDS, 6)
    } else {
        proto_gen::from_bytes(bytes, d, OCI_WORDS, 6)
    };
    check_request(&*m);
}

/// Byte 0 odd: a CRI container's spec mutated field by field; even: a generated spec.
fn oci_spec_gen(data: &[u8]) {
    let Some((&mode, bytes)) = data.split_first() else { return };
    let spec = if mode % 2 == 1 {
        proto_gen::mutated(bytes, &samples::guest_spec(), OCI_WORDS, 6)
    } else {
        proto_gen::from_bytes(bytes, &oci::Spec::descriptor(), OCI_WORDS, 6)
    };
    spec_round_trip(spec.downcast_ref::<oci::Spec>().expect("an oci::Spec"));
}

/// What the shim reads out of a bundle's spec besides converting it: the VM growth a
/// container's limits ask for, the host cgroup of `linux.cgroupsPath`, mount options.
fn shim_spec_reads(spec: &oci_spec::runtime::Spec) {
    use podvisor_shim::{host_cgroup, limits::Limits, mounts};
    let linux = spec.linux().as_ref();
    let limits = Limits::of(linux.and_then(|l| l.resources().as_ref()));
    let _ = (Limits::default().growth_to(&limits), limits.max(&Limits::default()), limits.growth_to(&limits));
    if let Some(path) = linux.and_then(|l| l.cgroups_path().as_ref()) {
        if let Ok(Some(rel)) = host_cgroup::relative_path(&path.to_string_lossy()) {
            assert!(
                rel.components().all(|c| matches!(c, std::path::Component::Normal(_))),
                "cgroup path {rel:?} leaves the cgroup root"
            );
        }
    }
    for m in spec.mounts().iter().flatten() {
        let _ = mounts::split_options(m.options().as_deref().unwrap_or_default());
    }
}

fn oci_json(data: &[u8]) {
    let Ok(spec) = serde_json::from_slice::<oci_spec::runtime::Spec>(data) else { return };
    shim_spec_reads(&spec);
    let g = convert::spec_to_grpc(&spec);
    if let Err(e) = convert::spec_from_grpc(&g) {
        panic!("spec_to_grpc output of a parsed config.json does not convert back: {e}");
    }
    spec_round_trip(&g);
}

// ---------------------------------------------------------------------------------------------
// configuration.toml and annotations.

/// Checks what a loaded configuration promises.
fn check_config(c: &podvisor_shim::config::Config) {
    let h = &c.hypervisor;
    assert!((1..=240).contains(&h.default_vcpus), "default_vcpus {}", h.default_vcpus);
    assert!(h.default_maxvcpus == 0 || h.default_maxvcpus >= h.default_vcpus);
    assert!((128..=1 << 22).contains(&h.default_memory), "default_memory {}", h.default_memory);
    assert!(h.default_maxmemory == 0 || h.default_maxmemory >= h.default_memory);
    assert!(hypervisor::config::MACHINE_TYPES.contains(&h.machine_type.as_str()));
    assert!((1..=3600).contains(&c.agent.dial_timeout.as_secs()));
    let _ = (h.max_vcpus(u32::MAX), h.max_memory(u64::MAX), h.max_vcpus(0), h.max_memory(0));
}

fn config_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = podvisor_shim::config::parse(&text, Path::new("/fuzz/configuration.toml")) {
        check_config(&c);
    }
}

const AGENT_KEYS: &[&str] = &["dial_timeout", "enable_debug", "kernel_modules", "debug_console_enabled", "x"];
const RUNTIME_KEYS: &[&str] = &["enable_debug", "sandbox_cgroup_only", "internetworking_model", "sandbox_bind_mounts"];
const CONFIG_WORDS: &[&str] = &[
    "",
    "q35",
    "pc",
    "virt",
    "auto",
    "kvm",
    "tcg",
    "never",
    "always",
    "metadata",
    "tcfilter",
    "none",
    "macvtap",
    "/usr/bin/qemu-system-x86_64",
    ".*",
    "default_.*",
    "(",
    "[",
    "agent.policy",
    "\u{0}",
];

fn toml_value(u: &mut Unstructured, depth: u32) -> arbitrary::Result<toml::Value> {
    use toml::Value;
    Ok(match u.int_in_range(0..=6u8)? {
        0 | 1 => Value::Integer(if u.ratio(3, 4)? {
            *u.choose(&[
                0i64,
                1,
                -1,
                7,
                127,
                128,
                240,
                241,
                255,
                256,
                3600,
                3601,
                1 << 22,
                (1 << 22) + 1,
                1 << 24,
                i64::MAX,
                i64::MIN,
            ])?
        } else {
            u.arbitrary()?
        }),
        2 => Value::Boolean(u.arbitrary()?),
        3 => Value::String(proto_gen::string(u, CONFIG_WORDS)?),
        4 => Value::Float(u.arbitrary()?),
        5 => {
            let n = u.int_in_range(0..=3u8)?;
            let mut items = Vec::new();
            for _ in 0..n {
                items.push(if depth > 0 && u.ratio(1, 4)? {
                    toml_value(u, depth - 1)?
                } else {
                    Value::String(proto_gen::string(u, CONFIG_WORDS)?)
                });
            }
            Value::Array(items)
        }
        _ if depth > 0 => Value::Table(toml_table(u, &[], depth - 1)?),
        _ => Value::String(String::new()),
    })
}

fn toml_table(u: &mut Unstructured, keys: &[&str], depth: u32) -> arbitrary::Result<toml::Table> {
    let mut t = toml::Table::new();
    let n = u.int_in_range(0..=8u8)?;
    for _ in 0..n {
        let key = if !keys.is_empty() && u.ratio(7, 8)? { u.choose(keys)?.to_string() } else { u.arbitrary()? };
        t.insert(key, toml_value(u, depth)?);
    }
    Ok(t)
}

fn toml_doc(u: &mut Unstructured) -> arbitrary::Result<toml::Table> {
    use toml::Value;
    let mut doc = toml::Table::new();
    let mut hv = toml::Table::new();
    if u.ratio(7, 8)? {
        hv.insert("qemu".into(), Value::Table(toml_table(u, hypervisor::config::KNOWN_KEYS, 1)?));
    } else {
        hv.insert("qemu".into(), toml_value(u, 1)?);
    }
    if u.ratio(1, 8)? {
        hv.insert("clh".into(), Value::Table(toml::Table::new()));
    }
    doc.insert("hypervisor".into(), Value::Table(hv));
    let mut agent = toml::Table::new();
    agent.insert("kata".into(), Value::Table(toml_table(u, AGENT_KEYS, 1)?));
    doc.insert("agent".into(), Value::Table(agent));
    doc.insert("runtime".into(), Value::Table(toml_table(u, RUNTIME_KEYS, 1)?));
    if u.ratio(1, 8)? {
        let name: String = u.arbitrary()?;
        doc.insert(name, toml_value(u, 1)?);
    }
    Ok(doc)
}

fn config_gen(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(doc) = toml_doc(&mut u) else { return };
    let mut warnings = Vec::new();
    if let Some(toml::Value::Table(q)) = doc.get("hypervisor").and_then(|h| h.get("qemu")) {
        let _ = hypervisor::QemuConfig::from_table(q, Path::new("/fuzz.toml"), &mut warnings);
    }
    let Ok(text) = toml::to_string(&doc) else { return };
    if let Ok(c) = podvisor_shim::config::parse(&text, Path::new("/fuzz/configuration.toml")) {
        check_config(&c);
    }
}

const ANNOTATION_KEYS: &[&str] = &[
    "io.katacontainers.config.hypervisor.default_memory",
    "io.katacontainers.config.hypervisor.default_vcpus",
    "io.katacontainers.config.hypervisor.machine_type",
    "io.katacontainers.config.hypervisor.kernel_params",
    "io.katacontainers.config.agent.policy",
    "io.katacontainers.config.hypervisor.block_device_driver",
    "io.katacontainers.config.",
    "io.katacontainers.config.hypervisor.",
    "io.kubernetes.cri.sandbox-memory",
    "io.kubernetes.cri.sandbox-cpu-quota",
    "io.kubernetes.cri.sandbox-cpu-period",
    "io.kubernetes.cri.sandbox-cpu-shares",
    "io.kubernetes.cri.container-type",
    "io.kubernetes.cri-o.ContainerType",
];
const ANNOTATION_VALUES: &[&str] = &[
    "",
    "0",
    "1",
    "-1",
    "2",
    "128",
    "240",
    "241",
    " 512 ",
    "4194304",
    "4194305",
    "100000",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "1e3",
    "q35",
    "pc",
    "sandbox",
    "container",
    "cGFja2FnZSBhZ2VudF9wb2xpY3kK",
    "aGk=",
    "//8=",
    "a",
];
const ANNOTATION_PATTERNS: &[&str] =
    &[".*", "default_.*", "default_memory", "default_vcpus", "machine_type", "kernel_params", "agent.policy", "(", "["];

/// A number as text: boundary values of the integer types (and their neighbours), or any
/// `u64`/`i64`, sometimes padded or signed.
fn number_text(u: &mut Unstructured) -> arbitrary::Result<String> {
    let n: i128 = match u.int_in_range(0..=9u8)? {
        0..=4 => u.int_in_range(-1..=3i128)?,
        5..=7 => {
            let base = *u.choose(&[
                128i128,
                240,
                1 << 20,
                1 << 22,
                u32::MAX as i128,
                i32::MAX as i128,
                i64::MAX as i128,
                u64::MAX as i128,
                i64::MIN as i128,
            ])?;
            base + if u.ratio(1, 2)? { 0 } else { u.int_in_range(-2..=2i128)? }
        }
        8 => u.arbitrary::<u64>()? as i128,
        _ => u.arbitrary::<i64>()? as i128,
    };
    Ok(match u.int_in_range(0..=7u8)? {
        0 => format!(" {n} "),
        1 => format!("+{n}"),
        _ => n.to_string(),
    })
}

const SIZING_KEYS: &[&str] = &[
    "io.kubernetes.cri.sandbox-memory",
    "io.kubernetes.cri.sandbox-cpu-quota",
    "io.kubernetes.cri.sandbox-cpu-period",
    "io.kubernetes.cri.sandbox-cpu-shares",
];
const KATA_KEYS: &[&str] = &[
    "io.katacontainers.config.hypervisor.default_memory",
    "io.katacontainers.config.hypervisor.default_vcpus",
    "io.katacontainers.config.hypervisor.machine_type",
    "io.katacontainers.config.hypervisor.kernel_params",
    "io.katacontainers.config.agent.policy",
];

fn annotations(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let gen = |u: &mut Unstructured| -> arbitrary::Result<(hypervisor::QemuConfig, HashMap<String, String>)> {
        // A configuration as `config::parse` can produce it (its documented ranges).
        let mut c = hypervisor::QemuConfig {
            default_vcpus: u.int_in_range(1..=240)?,
            default_memory: *u.choose(&[128u64, 2048, 1 << 22])?,
            ..Default::default()
        };
        c.default_maxvcpus = if u.arbitrary()? { 0 } else { u.int_in_range(c.default_vcpus..=240)? };
        c.default_maxmemory = if u.arbitrary()? { 0 } else { u.int_in_range(c.default_memory..=1 << 24)? };
        for _ in 0..u.int_in_range(0..=2u8)? {
            c.enable_annotations.push(proto_gen::string(u, ANNOTATION_PATTERNS)?);
        }
        let mut a = HashMap::new();
        // The sizing annotations and Kata's overrides, each present or not, with numbers (or
        // the dictionary's values); now and then any other key.
        let kata = u.ratio(1, 2)?;
        for key in SIZING_KEYS.iter().chain(KATA_KEYS.iter().filter(|_| kata)) {
            if u.ratio(1, 2)? {
                let v = if u.ratio(3, 4)? { number_text(u)? } else { proto_gen::string(u, ANNOTATION_VALUES)? };
                a.insert(key.to_string(), v);
            }
        }
        if u.ratio(1, 8)? {
            a.insert(proto_gen::string(u, ANNOTATION_KEYS)?, proto_gen::string(u, ANNOTATION_VALUES)?);
        }
        Ok((c, a))
    };
    let Ok((mut c, a)) = gen(&mut u) else { return };
    let _ = podvisor_shim::annotations::container_type(&a);
    for v in a.values() {
        let _ = podvisor_shim::annotations::decode_agent_policy(v);
    }
    if podvisor_shim::annotations::apply(&a, &mut c).is_ok() {
        assert!(c.default_maxvcpus == 0 || c.default_vcpus <= c.default_maxvcpus);
        assert!(c.default_maxmemory == 0 || c.default_memory <= c.default_maxmemory);
    }
}

// ---------------------------------------------------------------------------------------------
// QEMU's QMP socket and the vsock daemon's handshake.

/// Fails the input (as a crash) when `f` does not finish in time: a hang is a finding too.
fn bounded<F: std::future::Future>(rt: &tokio::runtime::Runtime, what: &str, f: F) -> F::Output {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), f).await })
        .unwrap_or_else(|_| panic!("{what}: no result within 5 s (hang)"))
}

fn qmp_stream(rt: &tokio::runtime::Runtime, data: &[u8]) {
    for line in data.split(|b| *b == b'\n') {
        let _ = hypervisor::qmp::parse_message(&String::from_utf8_lossy(line));
    }
    let data = data.to_vec();
    bounded(rt, "QMP session", async move {
        let (ours, mut qemu) = tokio::net::UnixStream::pair().expect("socket pair");
        let fake = tokio::spawn(async move {
            let _ = qemu.write_all(&data).await;
            let _ = qemu.shutdown().await;
            let mut sink = Vec::new();
            let _ = qemu.read_to_end(&mut sink).await;
        });
        if let Ok(qmp) = hypervisor::qmp::Qmp::from_stream(ours, Duration::from_secs(2)).await {
            let mut events = qmp.subscribe();
            let _ = qmp.execute("query-status", None).await;
            let _ = qmp.execute("device_add", Some(serde_json::json!({"driver": "pc-dimm"}))).await;
            while let Ok(e) = events.try_recv() {
                let _ = e.data.to_string();
            }
        }
        let _ = fake.await;
    });
}

fn hvsock_reply(rt: &tokio::runtime::Runtime, data: &[u8]) {
    let mut reader: &[u8] = data;
    let result = bounded(rt, "hybrid vsock handshake", hypervisor::vsock::read_connect_reply(&mut reader, 1024));
    // What the function promises: success exactly for an `OK ` line of at most 64 bytes, and
    // nothing read past its newline.
    let line_end = data.iter().position(|b| *b == b'\n');
    let ok = matches!(line_end, Some(n) if n <= 64 && data.starts_with(b"OK "));
    assert_eq!(result.is_ok(), ok, "{result:?}");
    if ok {
        assert_eq!(reader, &data[line_end.unwrap() + 1..], "bytes after the reply were consumed");
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's answers, as the shim reads them.

/// The shim RPCs `agent_answer` drives, with the answer type each expects.
const SHIM_RPCS: usize = 14;

fn answer_type(rpc: usize) -> MessageDescriptor {
    use agent_protocol::{health, types};
    match rpc {
        0 => health::HealthCheckResponse::descriptor(),
        1 => health::VersionCheckResponse::descriptor(),
        2 => pb::GuestDetailsResponse::descriptor(),
        3 => pb::Metrics::descriptor(),
        4 => pb::WaitProcessResponse::descriptor(),
        5 => pb::ReadStreamResponse::descriptor(),
        6 => pb::WriteStreamResponse::descriptor(),
        7 => pb::StatsContainerResponse::descriptor(),
        8 => pb::OOMEvent::descriptor(),
        9 => types::Interface::descriptor(),
        10 | 12 => pb::Routes::descriptor(),
        11 => pb::Interfaces::descriptor(),
        _ => protobuf::well_known_types::empty::Empty::descriptor(),
    }
}

async fn call_shim_rpc(agent: &podvisor_shim::agent::KataAgent, rpc: usize) {
    use podvisor_shim::agent::Agent;
    match rpc {
        0 => drop(agent.check().await),
        1 => drop(agent.version().await),
        2 => drop(agent.guest_details().await),
        3 => drop(agent.metrics().await),
        4 => drop(agent.wait_process("c", "e").await),
        5 => drop(agent.read_stream("c", "e", false).await),
        6 => drop(agent.write_stdin("c", "e", b"x".to_vec()).await),
        7 => {
            if let Ok(stats) = agent.stats_container("c").await {
                check_stats(&stats);
            }
        }
        8 => drop(agent.get_oom_event().await),
        9 => drop(agent.update_interface(Default::default()).await),
        10 => drop(agent.update_routes(vec![Default::default()]).await),
        11 => drop(agent.list_interfaces().await),
        12 => drop(agent.list_routes().await),
        _ => drop(agent.start_container("c").await),
    }
}

/// A ttrpc response frame: 10-byte header (length, stream id, type 2, flags), then `body`.
pub fn ttrpc_frame(stream_id: u32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(10 + body.len());
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(&stream_id.to_be_bytes());
    f.extend_from_slice(&[2, 0]);
    f.extend_from_slice(body);
    f
}

/// Input: byte 0 picks the RPC, byte 1 the mode: 0 the rest is the answer's payload in a
/// well-formed frame; 1 the rest is everything the agent writes (raw frames); 2 the answer is
/// generated from the rest; 3 a status (code from byte 2) with the rest as its message.
fn agent_answer(rt: &tokio::runtime::Runtime, data: &[u8]) {
    let [rpc, mode, rest @ ..] = data else { return };
    let rpc = *rpc as usize % SHIM_RPCS;
    let mode = *mode % 4;
    let rest = rest.to_vec();
    bounded(rt, "agent RPC", async move {
        let (ours, mut guest) = tokio::net::UnixStream::pair().expect("socket pair");
        let fd: std::os::fd::OwnedFd = ours.into_std().expect("std socket").into();
        let agent = podvisor_shim::agent::KataAgent::from_fd(fd).expect("client");
        let fake = async move {
            let mut header = [0u8; 10];
            if guest.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
            let stream_id = u32::from_be_bytes(header[4..8].try_into().unwrap());
            let mut request = vec![0u8; len.min(1 << 20)];
            let _ = guest.read_exact(&mut request).await;
            let out = match mode {
                0 => {
                    let r = ttrpc::Response { payload: rest, ..Default::default() };
                    ttrpc_frame(stream_id, &r.write_to_bytes().unwrap())
                }
                1 => rest,
                2 => {
                    let m = proto_gen::from_bytes(&rest, &answer_type(rpc), STATS_WORDS, 5);
                    let r = ttrpc::Response { payload: m.write_to_bytes_dyn().unwrap(), ..Default::default() };
                    ttrpc_frame(stream_id, &r.write_to_bytes().unwrap())
                }
                _ => {
                    let (code, msg) = rest.split_first().map(|(c, m)| (*c as i32, m)).unwrap_or((2, &[]));
                    let mut status = ttrpc::Status::new();
                    status.code = protobuf::EnumOrUnknown::from_i32(code);
                    status.message = String::from_utf8_lossy(msg).into_owned();
                    let r = ttrpc::Response { status: Some(status).into(), ..Default::default() };
                    ttrpc_frame(stream_id, &r.write_to_bytes().unwrap())
                }
            };
            let _ = guest.write_all(&out).await;
            let _ = guest.shutdown().await;
            // Keep our end open until the client is done with it.
            let mut sink = Vec::new();
            let _ = guest.read_to_end(&mut sink).await;
        };
        let call = async move {
            call_shim_rpc(&agent, rpc).await;
            drop(agent);
        };
        tokio::join!(fake, call);
    });
}

/// Words the metrics conversion matches on (`memory.stat` keys, block I/O ops, page sizes).
const STATS_WORDS: &[&str] = &[
    "",
    "kernel",
    "kernel_stack",
    "slab",
    "anon",
    "file",
    "sock",
    "workingset_refault",
    "workingset_refault_anon",
    "workingset_refault_file",
    "workingset_activate",
    "workingset_activate_anon",
    "workingset_activate_file",
    "read",
    "Write",
    "2MB",
    "eth0",
    "0.1.0",
];

/// The conversions `Task.Stats` runs on the agent's statistics.
pub fn check_stats(stats: &pb::StatsContainerResponse) {
    use podvisor_shim::metrics;
    let _ = metrics::to_v1(stats);
    let _ = metrics::to_v2(stats);
    metrics::encode(stats, metrics::Flavor::V1).expect("v1 metrics encode");
    metrics::encode(stats, metrics::Flavor::V2).expect("v2 metrics encode");
}

/// Byte 0 mod 3: 0 the rest is protobuf bytes; 1 the answer is generated from the rest; 2 a
/// busy container's statistics mutated field by field.
fn stats_metrics(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    let m = match mode % 3 {
        0 => match pb::StatsContainerResponse::parse_from_bytes(rest) {
            Ok(s) => Box::new(s),
            Err(_) => return,
        },
        1 => proto_gen::from_bytes(rest, &pb::StatsContainerResponse::descriptor(), STATS_WORDS, 6),
        _ => proto_gen::mutated(rest, &samples::stats(), STATS_WORDS, 6),
    };
    check_stats(m.downcast_ref::<pb::StatsContainerResponse>().expect("StatsContainerResponse"));
}

const METRICS_DICT: &[&[u8]] = &[
    b"# HELP ",
    b"# TYPE ",
    b" counter\n",
    b" gauge\n",
    b" histogram\n",
    b" summary\n",
    b"kata_guest_meminfo",
    b"kata_agent_",
    b"{item=\"",
    b"\"}",
    b",",
    b"=\"",
    b"\\\"",
    b" NaN",
    b" +Inf",
    b" -1e308",
    b"_bucket{le=\"",
    b"\n",
];

/// The guest's metrics text: whatever passes the filter re-encodes to text that passes again
/// whole (the shim never forwards what it could not parse back).
fn guest_metrics(data: &[u8]) {
    use podvisor_shim::monitor::guest;
    let text = String::from_utf8_lossy(data);
    let Ok(first) = guest::accept(&text) else { return };
    let encoded = guest::to_text(&first.families);
    let again = guest::accept(&encoded).expect("re-encoded text is within the size limit");
    assert_eq!(again.dropped, 0, "re-encoded text dropped samples:\n{encoded}");
    assert_eq!(again.families.len(), first.families.len(), "families lost in:\n{encoded}");
    for f in &first.families {
        assert!(f.name().starts_with("kata_agent_") || f.name().starts_with("kata_guest_"), "{}", f.name());
    }
}

const STRING_DICT: &[&[u8]] = &[
    b":",
    b".slice",
    b"-.slice",
    b"kubepods-burstable-pod1.slice",
    b"cri-containerd",
    b"/",
    b"..",
    b"-",
    b",",
    b"rbind",
    b"ro",
    b"tcfilter",
    b"=",
];

/// Strings the shim takes apart: `linux.cgroupsPath` (both forms), mount options, the
/// internetworking model, the policy annotation. A cgroup path that parses stays below the root.
fn shim_strings(data: &[u8]) {
    use podvisor_shim::{annotations, host_cgroup, mounts};
    let text = String::from_utf8_lossy(data);
    if let Ok(Some(rel)) = host_cgroup::relative_path(&text) {
        assert!(rel.is_relative(), "{rel:?}");
        assert!(rel.components().all(|c| matches!(c, std::path::Component::Normal(_))), "{rel:?}");
    }
    if let Ok(p) = host_cgroup::expand_slice(&text) {
        assert!(p.components().all(|c| matches!(c, std::path::Component::Normal(_))), "{p:?}");
    }
    let options: Vec<String> = text.split(',').map(str::to_string).collect();
    let _ = mounts::split_options(&options);
    let _ = hypervisor::InternetworkingModel::parse(&text);
    let _ = annotations::decode_agent_policy(&text);
}
