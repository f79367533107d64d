//! Pod annotations that shape the VM: Kata's `io.katacontainers.config.*` overrides (honoured
//! only when `enable_annotations` in `[hypervisor.qemu]` allows them) and the container
//! managers' sandbox sizing (`io.kubernetes.cri.sandbox-memory`, `sandbox-cpu-quota`, ...).
//!
//! `enable_annotations` holds regular expressions matched against the key without the
//! `io.katacontainers.config.hypervisor.` prefix (as in Kata), e.g. `["default_memory",
//! "default_vcpus"]` or `[".*"]`; the agent policy is enabled by the entry `agent.policy`.
//! Any other `io.katacontainers.config.*` key is rejected, naming it.

use std::collections::HashMap;

use hypervisor::QemuConfig;

/// Prefix of Kata's configuration annotations.
pub const KATA_PREFIX: &str = "io.katacontainers.config.";
const HYPERVISOR_PREFIX: &str = "io.katacontainers.config.hypervisor.";

/// The annotations podvisor understands, after [`KATA_PREFIX`].
pub const SUPPORTED: &[&str] = &[
    "hypervisor.default_memory",
    "hypervisor.default_vcpus",
    "hypervisor.machine_type",
    "hypervisor.kernel_params",
    "agent.policy",
];

/// What the annotations decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// MiB added for the pod's own containers (sandbox sizing), on top of `default_memory`.
    pub sandbox_memory_mib: u64,
    /// vCPUs added for the pod (sandbox sizing).
    pub sandbox_vcpus: u32,
    /// The agent policy (Rego), if given and enabled.
    pub agent_policy: Option<String>,
    /// Whether the container manager sized the sandbox (then containers' limits are not
    /// hot-plugged one by one).
    pub sized_by_manager: bool,
}

/// Container type from containerd's CRI or CRI-O annotations: `sandbox` or `container`.
pub fn container_type(annotations: &HashMap<String, String>) -> Option<&str> {
    ["io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType"]
        .iter()
        .find_map(|k| annotations.get(*k))
        .map(String::as_str)
}

fn enabled(config: &QemuConfig, short: &str) -> Result<bool, String> {
    enabled_in(&config.enable_annotations, "hypervisor.qemu", short)
}

fn enabled_in(patterns: &[String], section: &str, short: &str) -> Result<bool, String> {
    for pattern in patterns {
        let re = regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
            format!("[{section}] enable_annotations: {pattern:?} is not a valid regular expression: {e}")
        })?;
        if re.is_match(short) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn parse_num<T>(key: &str, value: &str, min: T, max: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let v: T = value.trim().parse().map_err(|_| format!("annotation {key}={value:?}: not a number"))?;
    if v < min || v > max {
        return Err(format!("annotation {key}={value}: out of range; use {min} to {max}"));
    }
    Ok(v)
}

/// Peer pods: takes the sizing annotations (`machine_type` = the instance type,
/// `default_vcpus`, `default_memory`) out of `annotations` into `remote`, for the remote
/// hypervisor service to choose the podvm's instance type with. `enable_annotations` of
/// `[hypervisor.remote]` says which of the keys a pod may set, as for QEMU; the service decides
/// which instance types it allows (`PODVM_INSTANCE_TYPES`).
pub fn apply_remote(
    annotations: &mut HashMap<String, String>,
    remote: &mut hypervisor::RemoteConfig,
) -> Result<(), String> {
    let patterns = remote.enable_annotations.clone();
    let take = |a: &mut HashMap<String, String>, short: &str| -> Result<Option<String>, String> {
        let key = format!("{HYPERVISOR_PREFIX}{short}");
        let Some(v) = a.remove(&key).filter(|v| !v.trim().is_empty()) else { return Ok(None) };
        if !enabled_in(&patterns, "hypervisor.remote", short)? {
            return Err(format!(
                "annotation {key} is not enabled; add {short:?} to enable_annotations in [hypervisor.remote] to allow it"
            ));
        }
        Ok(Some(v))
    };
    if let Some(v) = take(annotations, "machine_type")? {
        if v.len() > 128 || !v.chars().all(|c| c.is_ascii_alphanumeric() || "._-:/".contains(c)) {
            return Err(format!("annotation {HYPERVISOR_PREFIX}machine_type={v:?}: not an instance type name"));
        }
        remote.machine_type = v;
    }
    if let Some(v) = take(annotations, "default_vcpus")? {
        let key = format!("{HYPERVISOR_PREFIX}default_vcpus");
        remote.default_vcpus = parse_num(&key, &v, 1u32, 1024)?;
    }
    if let Some(v) = take(annotations, "default_memory")? {
        let key = format!("{HYPERVISOR_PREFIX}default_memory");
        remote.default_memory = parse_num(&key, &v, 64u64, 4_194_304)?;
    }
    Ok(())
}

/// Applies the pod's annotations to `config` (the VM's configuration). Errors name the
/// annotation and the fix.
pub fn apply(annotations: &HashMap<String, String>, config: &mut QemuConfig) -> Result<Applied, String> {
    let mut applied = Applied::default();
    let mut keys: Vec<&String> = annotations.keys().filter(|k| k.starts_with(KATA_PREFIX)).collect();
    keys.sort();
    for key in keys {
        let value = &annotations[key];
        let name = &key[KATA_PREFIX.len()..];
        if !SUPPORTED.contains(&name) {
            return Err(format!(
                "annotation {key} is not supported by podvisor; supported: {}",
                SUPPORTED.iter().map(|s| format!("{KATA_PREFIX}{s}")).collect::<Vec<_>>().join(", ")
            ));
        }
        let short = key.strip_prefix(HYPERVISOR_PREFIX).unwrap_or(name);
        if !enabled(config, short)? {
            return Err(format!(
                "annotation {key} is not enabled; add {short:?} to enable_annotations in [hypervisor.qemu] to allow it"
            ));
        }
        match name {
            "hypervisor.default_memory" => config.default_memory = parse_num(key, value, 128u64, 1 << 22)?,
            "hypervisor.default_vcpus" => config.default_vcpus = parse_num(key, value, 1u32, 240)?,
            "hypervisor.machine_type" => {
                if !hypervisor::config::MACHINE_TYPES.contains(&value.as_str()) {
                    return Err(format!(
                        "annotation {key}={value:?}: use one of {}",
                        hypervisor::config::MACHINE_TYPES.join(", ")
                    ));
                }
                config.machine_type = value.clone();
            }
            "hypervisor.kernel_params" => {
                config.kernel_params = format!("{} {}", config.kernel_params, value).trim().to_string();
            }
            "agent.policy" => applied.agent_policy = Some(value.clone()),
            _ => unreachable!("checked against SUPPORTED"),
        }
    }
    let get = |k: &str| annotations.get(k).map(String::as_str).filter(|v| !v.is_empty());
    if let Some(v) = get("io.kubernetes.cri.sandbox-memory") {
        let bytes: u64 = parse_num("io.kubernetes.cri.sandbox-memory", v, 0, u64::MAX)?;
        applied.sandbox_memory_mib = bytes.div_ceil(1 << 20);
        applied.sized_by_manager = true;
    }
    let quota = get("io.kubernetes.cri.sandbox-cpu-quota")
        .map(|v| parse_num("io.kubernetes.cri.sandbox-cpu-quota", v, -1i64, i64::MAX))
        .transpose()?;
    let period = get("io.kubernetes.cri.sandbox-cpu-period")
        .map(|v| parse_num("io.kubernetes.cri.sandbox-cpu-period", v, 0u64, u64::MAX))
        .transpose()?;
    if let (Some(q), Some(p)) = (quota, period) {
        if q > 0 && p > 0 {
            let vcpus = (q as u64).div_ceil(p);
            if vcpus > 240 {
                return Err(format!(
                    "annotations io.kubernetes.cri.sandbox-cpu-quota={q} and sandbox-cpu-period={p} ask for {vcpus} vCPUs; a VM has at most 240"
                ));
            }
            applied.sandbox_vcpus = vcpus as u32;
            applied.sized_by_manager = true;
        }
    }
    if let Some(v) = get("io.kubernetes.cri.sandbox-cpu-shares") {
        parse_num::<u64>("io.kubernetes.cri.sandbox-cpu-shares", v, 0, u64::MAX)?;
    }
    config.default_memory += applied.sandbox_memory_mib;
    config.default_vcpus += applied.sandbox_vcpus;
    if config.default_maxvcpus != 0 && config.default_vcpus > config.default_maxvcpus {
        config.default_maxvcpus = config.default_vcpus;
    }
    if config.default_maxmemory != 0 && config.default_memory > config.default_maxmemory {
        return Err(format!(
            "the pod needs {} MiB of guest memory (default_memory plus sandbox sizing) but default_maxmemory is {} MiB",
            config.default_memory, config.default_maxmemory
        ));
    }
    Ok(applied)
}

/// Kata's agent policy annotation.
pub const AGENT_POLICY_ANNOTATION: &str = "io.katacontainers.config.agent.policy";

/// The Rego text of the agent policy annotation: standard base64 (whitespace ignored) of UTF-8
/// text. Errors name the annotation.
pub fn decode_agent_policy(value: &str) -> Result<String, String> {
    use base64::Engine;
    let bad = |why: String| {
        format!("annotation {AGENT_POLICY_ANNOTATION}: {why}; the value must be the base64-encoded Rego policy (e.g. `base64 -w0 policy.rego`)")
    };
    let compact: String = value.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine.decode(compact.as_bytes()).map_err(|e| bad(format!("invalid base64: {e}")))?;
    String::from_utf8(bytes).map_err(|_| bad("the decoded policy is not UTF-8 text".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn peer_pod_sizing_annotations_go_to_the_remote_service() {
        let mut a: HashMap<String, String> = [
            ("io.katacontainers.config.hypervisor.machine_type", "medium"),
            ("io.katacontainers.config.hypervisor.default_vcpus", "2"),
            ("io.katacontainers.config.hypervisor.default_memory", "1024"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut r = hypervisor::RemoteConfig::default();
        let err = apply_remote(&mut a.clone(), &mut r).unwrap_err();
        assert!(err.contains("is not enabled") && err.contains("[hypervisor.remote]"), "{err}");
        r.enable_annotations = vec!["machine_type".into(), "default_.*".into()];
        apply_remote(&mut a, &mut r).unwrap();
        assert!(a.is_empty(), "taken out of what the QEMU rules see");
        assert_eq!((r.machine_type.as_str(), r.default_vcpus, r.default_memory), ("medium", 2, 1024));
        let mut bad: HashMap<String, String> =
            [("io.katacontainers.config.hypervisor.default_vcpus".to_string(), "0".to_string())].into();
        assert!(apply_remote(&mut bad, &mut r).unwrap_err().contains("default_vcpus"));
    }

    #[test]
    fn enabled_overrides_apply() {
        let mut c =
            QemuConfig { enable_annotations: vec!["default_.*".into(), "machine_type".into()], ..Default::default() };
        let a = ann(&[
            ("io.katacontainers.config.hypervisor.default_memory", "1024"),
            ("io.katacontainers.config.hypervisor.default_vcpus", "2"),
            ("io.katacontainers.config.hypervisor.machine_type", "pc"),
        ]);
        apply(&a, &mut c).unwrap();
        assert_eq!((c.default_memory, c.default_vcpus, c.machine_type.as_str()), (1024, 2, "pc"));
    }

    #[test]
    fn not_enabled_and_unknown_keys_are_rejected_by_name() {
        let mut c = QemuConfig::default();
        let e = apply(&ann(&[("io.katacontainers.config.hypervisor.default_vcpus", "2")]), &mut c).unwrap_err();
        assert!(
            e.contains("io.katacontainers.config.hypervisor.default_vcpus is not enabled")
                && e.contains("enable_annotations"),
            "{e}"
        );
        c.enable_annotations = vec![".*".into()];
        let e = apply(&ann(&[("io.katacontainers.config.hypervisor.block_device_driver", "virtio-blk")]), &mut c)
            .unwrap_err();
        assert!(e.contains("io.katacontainers.config.hypervisor.block_device_driver is not supported"), "{e}");
        let e = apply(&ann(&[("io.katacontainers.config.hypervisor.default_vcpus", "many")]), &mut c).unwrap_err();
        assert!(e.contains("not a number"), "{e}");
        let e = apply(&ann(&[("io.katacontainers.config.hypervisor.machine_type", "virt")]), &mut c).unwrap_err();
        assert!(e.contains("use one of q35, pc"), "{e}");
    }

    #[test]
    fn agent_policy_is_base64_text() {
        let d = decode_agent_policy;
        assert_eq!(d("cGFja2FnZSBhZ2VudF9wb2xpY3kK").unwrap(), "package agent_policy\n");
        assert_eq!(d("aGk=").unwrap(), "hi");
        assert_eq!(d("aGk").unwrap(), "hi");
        assert_eq!(d("aG\nk=\n").unwrap(), "hi");
        assert_eq!(d("").unwrap(), "");
        for bad in ["package agent_policy", "aGk=x", "a", "//8="] {
            let e = d(bad).unwrap_err();
            assert!(e.starts_with("annotation io.katacontainers.config.agent.policy: "), "{e}");
        }
    }

    #[test]
    fn sandbox_sizing_adds_memory_and_vcpus() {
        let mut c = QemuConfig { default_memory: 512, default_vcpus: 1, default_maxvcpus: 2, ..Default::default() };
        let a = ann(&[
            ("io.kubernetes.cri.sandbox-memory", "268435456"),
            ("io.kubernetes.cri.sandbox-cpu-quota", "150000"),
            ("io.kubernetes.cri.sandbox-cpu-period", "100000"),
            ("io.kubernetes.cri.container-type", "sandbox"),
        ]);
        let applied = apply(&a, &mut c).unwrap();
        assert_eq!((c.default_memory, c.default_vcpus, c.default_maxvcpus), (768, 3, 3));
        assert!(applied.sized_by_manager);
        assert_eq!(container_type(&a), Some("sandbox"));
    }
}
