//! Loading Kata's `configuration.toml`: where it is found, and the `[hypervisor.qemu]`,
//! `[agent.kata]` and `[runtime]` sections. Unknown keys warn; bad values name key and file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hypervisor::QemuConfig;
use toml::Value;

/// Default locations, in search order after `config_path` and `KATA_CONF_FILE`.
pub const DEFAULT_CONFIG_PATHS: &[&str] =
    &["/etc/kata-containers/configuration.toml", "/usr/share/defaults/kata-containers/configuration.toml"];

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No file in the search path exists.
    #[error("no configuration file found; tried {}; install one with `make install` or set KATA_CONF_FILE", .tried.join(", "))]
    NotFound {
        /// Paths tried, in order.
        tried: Vec<String>,
    },
    /// The file could not be read.
    #[error("cannot read configuration {file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{file}: invalid TOML: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A value is wrong.
    #[error(transparent)]
    Value(#[from] hypervisor::ConfigError),
}

/// `[agent.kata]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// `dial_timeout` (seconds): how long to wait for the agent to answer after boot.
    pub dial_timeout: Duration,
    /// `enable_debug`: agent debug logs (`agent.log=debug` on the kernel command line).
    pub enable_debug: bool,
    /// `debug_console_enabled`: the agent's debug console, a shell in the guest on vsock port
    /// [`DEBUG_CONSOLE_VPORT`] (`agent.debug_console` on the kernel command line). Off by default.
    pub debug_console_enabled: bool,
}

/// The debug console's vsock port (Kata's).
pub const DEBUG_CONSOLE_VPORT: u32 = 1026;

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig { dial_timeout: Duration::from_secs(45), enable_debug: false, debug_console_enabled: false }
    }
}

impl AgentConfig {
    /// The kernel parameters the agent reads for this configuration (Kata's names).
    pub fn kernel_params(&self) -> String {
        let mut p = Vec::new();
        if self.enable_debug {
            p.push("agent.log=debug".to_string());
        }
        if self.debug_console_enabled {
            p.push("agent.debug_console".to_string());
            p.push(format!("agent.debug_console_vport={DEBUG_CONSOLE_VPORT}"));
        }
        p.join(" ")
    }
}

/// `[runtime]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// `enable_debug`: debug-level shim logs.
    pub enable_debug: bool,
    /// `internetworking_model`: how the VM is joined to the pod network (`tcfilter`, `none`).
    pub internetworking_model: hypervisor::InternetworkingModel,
    /// `sandbox_cgroup_only`: the shim, QEMU and its helper daemons run in a host cgroup at the
    /// sandbox's `linux.cgroupsPath`, below the pod cgroup (default true; false: they stay
    /// where the container manager started the shim, and the node does not charge them to the
    /// pod).
    pub sandbox_cgroup_only: bool,
    /// `experimental_force_guest_pull` (Kata's): container images are pulled inside the guest
    /// (by the agent) from the image name the container manager annotates, without a snapshotter
    /// that supports it. What containerd needs for peer pods; CRI-O says so per container
    /// (`runtime_pull_image`).
    pub force_guest_pull: bool,
    /// `create_container_timeout` (seconds in the file, Kata's; default 60): how long a
    /// CreateContainer may take in the guest, a pull there included.
    pub create_container_timeout: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            enable_debug: false,
            internetworking_model: Default::default(),
            sandbox_cgroup_only: true,
            force_guest_pull: false,
            create_container_timeout: Duration::from_secs(60),
        }
    }
}

/// A loaded configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from.
    pub file: PathBuf,
    /// `[hypervisor.qemu]`.
    pub hypervisor: QemuConfig,
    /// `[hypervisor.remote]`: when present, pods are peer pods whose VMs a remote hypervisor
    /// service runs, and `hypervisor` is not used.
    pub remote: Option<hypervisor::RemoteConfig>,
    /// `[agent.kata]`.
    pub agent: AgentConfig,
    /// `[runtime]`.
    pub runtime: RuntimeConfig,
    /// Ignored and unknown keys, one message each.
    pub warnings: Vec<String>,
}

/// Finds the configuration: `config_path` (runtime options), then `KATA_CONF_FILE`, then the
/// default paths. An explicitly named file must exist.
pub fn find(config_path: Option<&Path>) -> Result<PathBuf, ConfigError> {
    let env = std::env::var_os("KATA_CONF_FILE").filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = config_path.filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf).or(env) {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ConfigError::Read { file: p, source: std::io::Error::from(std::io::ErrorKind::NotFound) })
        };
    }
    DEFAULT_CONFIG_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| ConfigError::NotFound { tried: DEFAULT_CONFIG_PATHS.iter().map(|s| s.to_string()).collect() })
}

/// Finds and loads the configuration.
pub fn load(config_path: Option<&Path>) -> Result<Config, ConfigError> {
    load_file(&find(config_path)?)
}

/// Loads one file.
pub fn load_file(file: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read { file: file.into(), source })?;
    parse(&text, file)
}

/// Parses configuration text; `file` is used in messages.
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let doc: toml::Table = toml::from_str(text)
        .map_err(|e| ConfigError::Syntax { file: file.into(), message: e.to_string().trim().to_string() })?;
    let mut warnings = Vec::new();
    let value_err = |section: &str, key: &str, message: String| hypervisor::ConfigError {
        file: file.into(),
        section: section.into(),
        key: key.into(),
        message,
    };
    let empty = toml::Table::new();
    let section = |path: &[&str]| -> Result<&toml::Table, hypervisor::ConfigError> {
        let mut t = &doc;
        for (i, name) in path.iter().enumerate() {
            match t.get(*name) {
                None => return Ok(&empty),
                Some(Value::Table(inner)) => t = inner,
                Some(_) => return Err(value_err(&path[..i].join("."), name, "must be a table".into())),
            }
        }
        Ok(t)
    };
    let hv_section = section(&["hypervisor"])?;
    for name in hv_section.keys().filter(|k| *k != "qemu" && *k != "remote") {
        warnings.push(format!(
            "{}: [hypervisor.{name}] is not supported by podvisor (only qemu and remote); ignored",
            file.display()
        ));
    }
    let remote = match hv_section.get("remote") {
        Some(_) => {
            if hv_section.contains_key("qemu") {
                warnings.push(format!(
                    "{}: both [hypervisor.qemu] and [hypervisor.remote]: pods are peer pods (remote); \
                     [hypervisor.qemu] is ignored",
                    file.display()
                ));
            }
            Some(hypervisor::RemoteConfig::from_table(section(&["hypervisor", "remote"])?, file, &mut warnings)?)
        }
        None => None,
    };
    let mut hypervisor = if remote.is_some() {
        QemuConfig::default()
    } else {
        QemuConfig::from_table(section(&["hypervisor", "qemu"])?, file, &mut warnings)?
    };

    let agent_table = section(&["agent", "kata"])?;
    let mut agent = AgentConfig::default();
    for (key, value) in agent_table {
        match (key.as_str(), value) {
            ("dial_timeout", Value::Integer(s)) if (1..=3600).contains(s) => {
                agent.dial_timeout = Duration::from_secs(*s as u64)
            }
            ("dial_timeout", v) => {
                return Err(
                    value_err("agent.kata", key, format!("{v} is not valid; use whole seconds from 1 to 3600")).into()
                )
            }
            ("enable_debug", Value::Boolean(b)) => agent.enable_debug = *b,
            ("debug_console_enabled", Value::Boolean(b)) => agent.debug_console_enabled = *b,
            ("enable_debug" | "debug_console_enabled", v) => {
                return Err(value_err("agent.kata", key, format!("expected true or false, found {v}")).into())
            }
            ("kernel_modules" | "enable_tracing" | "container_pipe_size" | "mem_agent_enable", _) => {
                warnings.push(format!("{}: [agent.kata] {key}: Kata key not used by podvisor; ignored", file.display()))
            }
            _ => warnings
                .push(format!("{}: [agent.kata] {key}: unknown key; ignored (check the spelling)", file.display())),
        }
    }

    // The agent's settings reach it on the kernel command line, before the configuration's own
    // `kernel_params` (the agent takes the last `agent.log=`, so an explicit one there wins).
    let agent_params = agent.kernel_params();
    if !agent_params.is_empty() {
        hypervisor.kernel_params = format!("{agent_params} {}", hypervisor.kernel_params).trim().to_string();
    }

    let runtime_table = section(&["runtime"])?;
    let mut runtime = RuntimeConfig::default();
    for (key, value) in runtime_table {
        match (key.as_str(), value) {
            ("enable_debug", Value::Boolean(b)) => runtime.enable_debug = *b,
            ("sandbox_cgroup_only", Value::Boolean(b)) => runtime.sandbox_cgroup_only = *b,
            ("experimental_force_guest_pull", Value::Boolean(b)) => runtime.force_guest_pull = *b,
            ("create_container_timeout", Value::Integer(s)) if (1..=86_400).contains(s) => {
                runtime.create_container_timeout = Duration::from_secs(*s as u64)
            }
            ("create_container_timeout", v) => {
                return Err(
                    value_err("runtime", key, format!("{v} is not valid; use whole seconds from 1 to 86400")).into()
                )
            }
            // A podvm's size is always fixed at creation: the key says what is true anyway.
            ("static_sandbox_resource_mgmt", Value::Boolean(true)) if remote.is_some() => {}
            ("enable_debug" | "sandbox_cgroup_only" | "experimental_force_guest_pull", v) => {
                return Err(value_err("runtime", key, format!("expected true or false, found {v}")).into())
            }
            ("internetworking_model", Value::String(m)) => {
                runtime.internetworking_model =
                    hypervisor::InternetworkingModel::parse(m).map_err(|e| value_err("runtime", key, e))?
            }
            ("internetworking_model", v) => {
                return Err(value_err(
                    "runtime",
                    key,
                    format!("expected a string (\"tcfilter\" or \"none\"), found {v}"),
                )
                .into())
            }
            _ => warnings.push(format!("{}: [runtime] {key}: not used by podvisor yet; ignored", file.display())),
        }
    }
    for key in doc.keys().filter(|k| !["hypervisor", "agent", "runtime", "factory", "image"].contains(&k.as_str())) {
        warnings.push(format!("{}: [{key}]: unknown section; ignored", file.display()));
    }
    Ok(Config { file: file.into(), hypervisor, remote, agent, runtime, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configuration_loads_without_warnings() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/configuration-qemu.toml");
        let c = load_file(&file).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert_eq!(c.hypervisor.machine_type, "q35");
        assert_eq!(c.agent.dial_timeout, Duration::from_secs(45));
    }

    #[test]
    fn sections_are_read() {
        let c = parse(
            "[hypervisor.qemu]\ndefault_memory = 512\n[agent.kata]\ndial_timeout = 7\nenable_debug = true\n[runtime]\nenable_debug = true\n",
            Path::new("/c.toml"),
        )
        .unwrap();
        assert_eq!(c.hypervisor.default_memory, 512);
        assert_eq!(
            c.agent,
            AgentConfig { dial_timeout: Duration::from_secs(7), enable_debug: true, debug_console_enabled: false }
        );
        assert!(c.runtime.enable_debug);
        assert!(c.runtime.sandbox_cgroup_only, "on by default, as Kata's shipped configuration has it");
    }

    #[test]
    fn errors_name_file_section_and_key() {
        let cases = [
            ("[agent.kata]\ndial_timeout = 0", "/c.toml: [agent.kata] dial_timeout: 0 is not valid"),
            (
                "[hypervisor.qemu]\ndefault_vcpus = \"two\"",
                "/c.toml: [hypervisor.qemu] default_vcpus: expected an integer",
            ),
            ("[hypervisor]\nqemu = 3", "/c.toml: [hypervisor] qemu: must be a table"),
            ("[runtime]\nenable_debug = \"yes\"", "/c.toml: [runtime] enable_debug: expected true or false"),
            (
                "[runtime]\ninternetworking_model = \"macvtap\"",
                "/c.toml: [runtime] internetworking_model: internetworking_model = \"macvtap\" is not supported",
            ),
            ("[hypervisor.qemu\n", "/c.toml: invalid TOML"),
        ];
        for (text, want) in cases {
            let err = parse(text, Path::new("/c.toml")).unwrap_err().to_string();
            assert!(err.starts_with(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn unknown_things_warn() {
        let c = parse(
            "[hypervisor.clh]\n[agent.kata]\nfoo = 1\n[runtime]\nsandbox_bind_mounts = []\n[bogus]\n",
            Path::new("/c.toml"),
        )
        .unwrap();
        assert_eq!(c.warnings.len(), 4, "{:?}", c.warnings);
    }

    #[test]
    fn agent_settings_reach_the_kernel_command_line() {
        let params = |text: &str| parse(text, Path::new("/c.toml")).unwrap().hypervisor.kernel_params;
        assert_eq!(params(""), "");
        assert_eq!(params("[agent.kata]\nenable_debug = false\ndebug_console_enabled = false"), "");
        assert_eq!(params("[agent.kata]\nenable_debug = true"), "agent.log=debug");
        assert_eq!(
            params("[agent.kata]\ndebug_console_enabled = true"),
            "agent.debug_console agent.debug_console_vport=1026"
        );
        assert_eq!(
            params("[hypervisor.qemu]\nkernel_params = \"agent.log=warn foo=1\"\n[agent.kata]\nenable_debug = true\ndebug_console_enabled = true"),
            "agent.log=debug agent.debug_console agent.debug_console_vport=1026 agent.log=warn foo=1"
        );
        let c = parse("[agent.kata]\ndebug_console_enabled = true", Path::new("/c.toml")).unwrap();
        assert!(c.agent.debug_console_enabled && c.warnings.is_empty(), "{:?}", c.warnings);
        let err = parse("[agent.kata]\ndebug_console_enabled = \"yes\"", Path::new("/c.toml")).unwrap_err().to_string();
        assert!(err.starts_with("/c.toml: [agent.kata] debug_console_enabled: expected true or false"), "{err}");
    }

    #[test]
    fn shipped_remote_configuration_loads_without_warnings() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/configuration-remote.toml");
        let c = load_file(&file).unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let r = c.remote.expect("[hypervisor.remote]");
        assert_eq!((r.default_vcpus, r.default_memory), (0, 0), "the service's default instance type");
        assert!(c.runtime.force_guest_pull);
        assert_eq!(c.runtime.create_container_timeout, Duration::from_secs(600));
    }

    #[test]
    fn remote_section_selects_peer_pods() {
        let c = parse(
            "[hypervisor.remote]\nremote_hypervisor_socket = \"/run/x.sock\"\nremote_hypervisor_timeout = 30\n\
             default_vcpus = 2\ndefault_memory = 1024\nmachine_type = \"medium\"\nshared_fs = \"none\"\n\
             [runtime]\nexperimental_force_guest_pull = true\n",
            Path::new("/c.toml"),
        )
        .unwrap();
        let r = c.remote.unwrap();
        assert_eq!(r.socket, Path::new("/run/x.sock"));
        assert_eq!(r.timeout, Duration::from_secs(30));
        assert_eq!((r.default_vcpus, r.default_memory, r.machine_type.as_str()), (2, 1024, "medium"));
        assert!(c.runtime.force_guest_pull && c.warnings.is_empty(), "{:?}", c.warnings);
        let d = parse("[hypervisor.remote]\n", Path::new("/c.toml")).unwrap().remote.unwrap();
        assert_eq!((d.socket.to_str().unwrap(), d.timeout), ("/run/peerpod/hypervisor.sock", Duration::from_secs(600)));
        assert!(parse("[hypervisor.qemu]\n", Path::new("/c.toml")).unwrap().remote.is_none());
        for (text, want) in [
            ("[hypervisor.remote]\nremote_hypervisor_socket = \"rel\"", "[hypervisor.remote] remote_hypervisor_socket"),
            ("[hypervisor.remote]\nremote_hypervisor_timeout = 0", "[hypervisor.remote] remote_hypervisor_timeout"),
            ("[hypervisor.remote]\nshared_fs = \"virtio-fs\"", "use shared_fs = \"none\""),
        ] {
            let err = parse(text, Path::new("/c.toml")).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let err = find(Some(Path::new("/nonexistent/configuration.toml"))).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/configuration.toml"), "{err}");
    }
}
