//! The `[hypervisor.qemu]` section of a Kata-style `configuration.toml`: parsing and validation.
//!
//! Keys keep Kata's names and meanings. Keys that Kata knows but podvisor does not use yet are
//! accepted with a warning; unknown keys are accepted with a different warning; a bad value is an
//! error naming the key and the file.

use std::path::{Path, PathBuf};

use toml::Value;

/// A configuration error; it names the file, the key and what would be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: [{section}] {key}: {message}")]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// The section, e.g. `hypervisor.qemu`.
    pub section: String,
    /// The offending key.
    pub key: String,
    /// What is wrong and what would be accepted.
    pub message: String,
}

/// Which accelerator QEMU uses (podvisor key `accelerator`; not in upstream Kata).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    /// KVM when the host can run a stock guest kernel under it, otherwise TCG (logged).
    Auto,
    /// KVM only: starting fails with the reason when KVM is unusable.
    Kvm,
    /// TCG (software emulation) always.
    Tcg,
}

/// Machine types the driver knows how to build.
pub const MACHINE_TYPES: &[&str] = &["q35", "pc"];

/// Settings of the QEMU driver, from `[hypervisor.qemu]`.
#[derive(Debug, Clone, PartialEq)]
pub struct QemuConfig {
    /// `path`: the QEMU binary.
    pub path: PathBuf,
    /// `kernel`: guest kernel (an uncompressed `vmlinux` boots through PVH; a bzImage works too).
    pub kernel: PathBuf,
    /// `initrd`: guest initrd holding the agent as `/init`.
    pub initrd: PathBuf,
    /// `machine_type`: `q35` (default) or `pc`.
    pub machine_type: String,
    /// `kernel_params`: appended to the built-in kernel command line.
    pub kernel_params: String,
    /// `default_vcpus`: vCPUs at boot.
    pub default_vcpus: u32,
    /// `default_maxvcpus`: upper bound for vCPU hotplug (0 in the file: the host's CPU count).
    pub default_maxvcpus: u32,
    /// `default_memory`: guest RAM at boot, MiB.
    pub default_memory: u64,
    /// `memory_slots`: hotplug slots for memory.
    pub memory_slots: u32,
    /// `default_maxmemory`: upper bound for memory hotplug, MiB (0 in the file: host RAM).
    pub default_maxmemory: u64,
    /// `enable_debug`: verbose guest kernel and agent logs.
    pub enable_debug: bool,
    /// `accelerator` (podvisor): `auto`, `kvm` or `tcg`.
    pub accelerator: Accelerator,
    /// `vhost_user_vsock_daemon` (podvisor): the `vhost-device-vsock` binary used when the host
    /// has no `/dev/vhost-vsock`. A bare name is looked up on `PATH`.
    pub vhost_user_vsock_daemon: PathBuf,
    /// `virtio_fs_daemon`: the virtiofsd binary.
    pub virtio_fs_daemon: PathBuf,
    /// `virtio_fs_cache`: virtiofsd cache mode (`auto`, `always`, `never`, `metadata`).
    pub virtio_fs_cache: String,
    /// `virtio_fs_extra_args`: extra virtiofsd arguments.
    pub virtio_fs_extra_args: Vec<String>,
    /// `enable_annotations`: which `io.katacontainers.config.hypervisor.*` annotations may
    /// override these values (regular expressions, as in Kata).
    pub enable_annotations: Vec<String>,
    /// `valid_hypervisor_paths`: globs the `path` must match when set by annotation.
    pub valid_hypervisor_paths: Vec<String>,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            path: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            kernel: PathBuf::from("/usr/share/kata-containers/vmlinux.container"),
            initrd: PathBuf::from("/usr/share/kata-containers/kata-containers-initrd.img"),
            machine_type: "q35".into(),
            kernel_params: String::new(),
            default_vcpus: 1,
            default_maxvcpus: 0,
            default_memory: 2048,
            memory_slots: 10,
            default_maxmemory: 0,
            enable_debug: false,
            accelerator: Accelerator::Auto,
            vhost_user_vsock_daemon: PathBuf::from("vhost-device-vsock"),
            virtio_fs_daemon: PathBuf::from("/usr/local/bin/virtiofsd"),
            virtio_fs_cache: "auto".into(),
            virtio_fs_extra_args: Vec::new(),
            enable_annotations: Vec::new(),
            valid_hypervisor_paths: Vec::new(),
        }
    }
}

/// Keys of Kata's `[hypervisor.qemu]` that podvisor accepts but does not act on (yet).
const KATA_KEYS_IGNORED: &[&str] = &[
    "firmware",
    "firmware_volume",
    "machine_accelerators",
    "seccompsandbox",
    "cpu_features",
    "default_bridges",
    "memory_offset",
    "enable_virtio_mem",
    "disable_block_device_use",
    "shared_fs",
    "valid_virtio_fs_daemon_paths",
    "virtio_fs_cache_size",
    "virtio_fs_queue_size",
    "block_device_driver",
    "block_device_aio",
    "block_device_cache_set",
    "block_device_cache_direct",
    "block_device_cache_noflush",
    "enable_iothreads",
    "indep_iothreads",
    "enable_mem_prealloc",
    "enable_hugepages",
    "enable_vhost_user_store",
    "vhost_user_store_path",
    "vhost_user_reconnect_timeout_sec",
    "enable_iommu",
    "enable_iommu_platform",
    "valid_vhost_user_store_paths",
    "file_mem_backend",
    "valid_file_mem_backends",
    "pflashes",
    "extra_monitor_socket",
    "disable_nesting_checks",
    "msize_9p",
    "disable_image_nvdimm",
    "hotplug_vfio_on_root_bus",
    "hot_plug_vfio",
    "cold_plug_vfio",
    "pcie_root_port",
    "pcie_switch_port",
    "disable_vhost_net",
    "entropy_source",
    "valid_entropy_sources",
    "guest_hook_path",
    "rx_rate_limiter_max_rate",
    "tx_rate_limiter_max_rate",
    "guest_memory_dump_path",
    "guest_memory_dump_paging",
    "enable_guest_swap",
    "use_legacy_serial",
    "disable_selinux",
    "disable_guest_selinux",
    "confidential_guest",
    "sev_snp_guest",
    "rootless",
    "valid_kernel_params",
    "valid_kernel_paths",
    "valid_initrd_paths",
    "valid_image_paths",
    "default_numa_nodes",
    "reclaim_guest_freed_memory",
    "tdx_quote_generation_service_socket_port",
];

struct Reader<'a> {
    table: &'a toml::Table,
    file: &'a Path,
}

impl Reader<'_> {
    fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            section: "hypervisor.qemu".into(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(key, format!("expected a string, found {}", v.type_str()))),
        }
    }

    fn path(&self, key: &str) -> Result<Option<PathBuf>, ConfigError> {
        match self.string(key)? {
            Some(s) if s.trim().is_empty() => Err(self.err(key, "must not be empty")),
            Some(s) => Ok(Some(PathBuf::from(s))),
            None => Ok(None),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected true or false, found {}", v.type_str()))),
        }
    }

    fn int(&self, key: &str, min: i64, max: i64) -> Result<Option<i64>, ConfigError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(Value::Integer(i)) if (min..=max).contains(i) => Ok(Some(*i)),
            Some(Value::Integer(i)) => {
                Err(self.err(key, format!("{i} is out of range; use a value from {min} to {max}")))
            }
            Some(v) => Err(self.err(key, format!("expected an integer, found {}", v.type_str()))),
        }
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        match self.table.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(self.err(key, format!("expected strings, found {}", v.type_str()))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.err(key, format!("expected an array of strings, found {}", v.type_str()))),
        }
    }
}

impl QemuConfig {
    /// Parses the `[hypervisor.qemu]` table of `file`. Warnings about ignored or unknown keys
    /// are appended to `warnings`; the first bad value is returned as an error.
    pub fn from_table(table: &toml::Table, file: &Path, warnings: &mut Vec<String>) -> Result<QemuConfig, ConfigError> {
        let r = Reader { table, file };
        let mut c = QemuConfig::default();
        for key in table.keys() {
            if KNOWN_KEYS.contains(&key.as_str()) {
                continue;
            }
            if KATA_KEYS_IGNORED.contains(&key.as_str()) {
                warnings.push(format!(
                    "{}: [hypervisor.qemu] {key}: Kata key not used by podvisor; ignored",
                    file.display()
                ));
            } else {
                warnings.push(format!(
                    "{}: [hypervisor.qemu] {key}: unknown key; ignored (check the spelling)",
                    file.display()
                ));
            }
        }
        if let Some(image) = r.string("image")? {
            if !image.is_empty() {
                return Err(r.err("image", "podvisor boots an initrd only; remove `image` and set `initrd`"));
            }
        }
        if let Some(p) = r.path("path")? {
            c.path = p;
        }
        if let Some(p) = r.path("kernel")? {
            c.kernel = p;
        }
        if let Some(p) = r.path("initrd")? {
            c.initrd = p;
        }
        if let Some(m) = r.string("machine_type")? {
            if !MACHINE_TYPES.contains(&m.as_str()) {
                return Err(r.err(
                    "machine_type",
                    format!("\"{m}\" is not supported; use one of {}", MACHINE_TYPES.join(", ")),
                ));
            }
            c.machine_type = m;
        }
        if let Some(p) = r.string("kernel_params")? {
            c.kernel_params = p;
        }
        if let Some(v) = r.int("default_vcpus", 1, 240)? {
            c.default_vcpus = v as u32;
        }
        if let Some(v) = r.int("default_maxvcpus", 0, 240)? {
            c.default_maxvcpus = v as u32;
        }
        if c.default_maxvcpus != 0 && c.default_maxvcpus < c.default_vcpus {
            return Err(r.err(
                "default_maxvcpus",
                format!(
                    "{} is below default_vcpus ({}); raise it or set 0 for the host's CPU count",
                    c.default_maxvcpus, c.default_vcpus
                ),
            ));
        }
        if let Some(v) = r.int("default_memory", 128, 1 << 22)? {
            c.default_memory = v as u64;
        }
        if let Some(v) = r.int("memory_slots", 1, 255)? {
            c.memory_slots = v as u32;
        }
        if let Some(v) = r.int("default_maxmemory", 0, 1 << 24)? {
            c.default_maxmemory = v as u64;
        }
        if c.default_maxmemory != 0 && c.default_maxmemory < c.default_memory {
            return Err(r.err(
                "default_maxmemory",
                format!(
                    "{} MiB is below default_memory ({} MiB); raise it or set 0 for the host's RAM",
                    c.default_maxmemory, c.default_memory
                ),
            ));
        }
        if let Some(v) = r.bool("enable_debug")? {
            c.enable_debug = v;
        }
        if let Some(a) = r.string("accelerator")? {
            c.accelerator = match a.as_str() {
                "auto" => Accelerator::Auto,
                "kvm" => Accelerator::Kvm,
                "tcg" => Accelerator::Tcg,
                other => {
                    return Err(
                        r.err("accelerator", format!("\"{other}\" is not valid; use \"auto\", \"kvm\" or \"tcg\""))
                    )
                }
            };
        }
        if let Some(p) = r.path("vhost_user_vsock_daemon")? {
            c.vhost_user_vsock_daemon = p;
        }
        if let Some(p) = r.path("virtio_fs_daemon")? {
            c.virtio_fs_daemon = p;
        }
        if let Some(m) = r.string("virtio_fs_cache")? {
            if !["auto", "always", "never", "metadata"].contains(&m.as_str()) {
                return Err(r.err(
                    "virtio_fs_cache",
                    format!("\"{m}\" is not valid; use \"auto\", \"always\", \"never\" or \"metadata\""),
                ));
            }
            c.virtio_fs_cache = m;
        }
        if let Some(v) = r.strings("virtio_fs_extra_args")? {
            c.virtio_fs_extra_args = v;
        }
        if let Some(v) = r.strings("enable_annotations")? {
            c.enable_annotations = v;
        }
        if let Some(v) = r.strings("valid_hypervisor_paths")? {
            c.valid_hypervisor_paths = v;
        }
        Ok(c)
    }

    /// `default_maxvcpus` resolved against the host (0 means the host's CPU count).
    pub fn max_vcpus(&self, host_cpus: u32) -> u32 {
        let max = if self.default_maxvcpus == 0 { host_cpus } else { self.default_maxvcpus };
        max.max(self.default_vcpus)
    }

    /// `default_maxmemory` resolved against the host (0 means the host's RAM).
    pub fn max_memory(&self, host_mib: u64) -> u64 {
        let max = if self.default_maxmemory == 0 { host_mib } else { self.default_maxmemory };
        max.max(self.default_memory)
    }
}

/// Keys this driver reads (any other key under `[hypervisor.qemu]` gets a warning naming it).
pub const KNOWN_KEYS: &[&str] = &[
    "path",
    "kernel",
    "initrd",
    "image",
    "machine_type",
    "kernel_params",
    "default_vcpus",
    "default_maxvcpus",
    "default_memory",
    "memory_slots",
    "default_maxmemory",
    "enable_debug",
    "accelerator",
    "vhost_user_vsock_daemon",
    "virtio_fs_daemon",
    "virtio_fs_cache",
    "virtio_fs_extra_args",
    "enable_annotations",
    "valid_hypervisor_paths",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Result<QemuConfig, ConfigError>, Vec<String>) {
        let table: toml::Table = toml::from_str(text).unwrap();
        let mut warnings = Vec::new();
        (QemuConfig::from_table(&table, Path::new("/etc/test.toml"), &mut warnings), warnings)
    }

    #[test]
    fn empty_table_gives_defaults() {
        let (c, w) = parse("");
        assert_eq!(c.unwrap(), QemuConfig::default());
        assert!(w.is_empty());
    }

    #[test]
    fn values_are_read() {
        let (c, w) = parse(
            r#"path = "/opt/qemu"
kernel = "/k"
initrd = "/i"
machine_type = "pc"
kernel_params = "foo=bar"
default_vcpus = 2
default_maxvcpus = 4
default_memory = 512
memory_slots = 4
default_maxmemory = 4096
enable_debug = true
accelerator = "tcg"
"#,
        );
        let c = c.unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(c.path, PathBuf::from("/opt/qemu"));
        assert_eq!(c.machine_type, "pc");
        assert_eq!((c.default_vcpus, c.default_maxvcpus), (2, 4));
        assert_eq!((c.default_memory, c.memory_slots, c.default_maxmemory), (512, 4, 4096));
        assert!(c.enable_debug);
        assert_eq!(c.accelerator, Accelerator::Tcg);
    }

    #[test]
    fn bad_values_name_key_and_file() {
        let cases = [
            ("default_memory = \"lots\"", "default_memory", "expected an integer, found string"),
            ("default_memory = 10", "default_memory", "out of range"),
            ("default_vcpus = 0", "default_vcpus", "out of range"),
            ("machine_type = \"virt\"", "machine_type", "use one of q35, pc"),
            ("accelerator = \"hvf\"", "accelerator", "use \"auto\", \"kvm\" or \"tcg\""),
            ("enable_debug = 1", "enable_debug", "expected true or false"),
            ("path = \"\"", "path", "must not be empty"),
            ("default_vcpus = 4\ndefault_maxvcpus = 2", "default_maxvcpus", "below default_vcpus"),
            ("default_memory = 2048\ndefault_maxmemory = 1024", "default_maxmemory", "below default_memory"),
            ("image = \"/x.img\"", "image", "initrd only"),
            ("virtio_fs_cache = \"sometimes\"", "virtio_fs_cache", "not valid"),
        ];
        for (text, key, fragment) in cases {
            let err = parse(text).0.unwrap_err();
            assert_eq!(err.key, key, "{text}");
            let shown = err.to_string();
            assert!(shown.starts_with("/etc/test.toml: [hypervisor.qemu] "), "{shown}");
            assert!(shown.contains(fragment), "{text}: {shown}");
        }
    }

    #[test]
    fn unknown_and_ignored_keys_warn() {
        let (c, w) = parse("default_memroy = 1\nfirmware = \"\"");
        assert!(c.is_ok());
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().any(|m| m.contains("default_memroy: unknown key")));
        assert!(w.iter().any(|m| m.contains("firmware: Kata key not used by podvisor")));
    }

    #[test]
    fn zero_limits_resolve_against_host() {
        let c = QemuConfig { default_vcpus: 1, default_maxvcpus: 0, ..Default::default() };
        assert_eq!(c.max_vcpus(8), 8);
        let c = QemuConfig { default_memory: 2048, default_maxmemory: 0, ..Default::default() };
        assert_eq!(c.max_memory(24000), 24000);
        assert_eq!(c.max_memory(1000), 2048);
    }
}
