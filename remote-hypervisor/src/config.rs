//! Settings: an environment file shaped like the manual's `peer-pods-cm` ConfigMap (`KEY=value`
//! lines, `#` comments, optional quotes), then command-line flags.
//!
//! Parsing ([`parse_env`]) is kept apart from validation ([`Config::from_env`]); both name the key
//! (and the line) and say what to write instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Default env file.
pub const DEFAULT_CONFIG: &str = "/etc/podvisor/peer-pods-cm.env";
/// Default service socket.
pub const DEFAULT_SOCKET: &str = "/run/peerpod/hypervisor.sock";
/// Default per-podvm state directory.
pub const DEFAULT_STATE_DIR: &str = "/run/peerpod/podvms";
/// `ROOT_VOLUME_SIZE`'s default and minimum (GB).
pub const MIN_ROOT_VOLUME_GB: u32 = 6;
/// `PEERPODS_LIMIT_PER_NODE`'s default.
pub const DEFAULT_LIMIT: u32 = 10;
/// `VXLAN_PORT`'s default.
pub const DEFAULT_VXLAN_PORT: u16 = 4789;

/// Every key the service reads; others are reported as warnings and ignored.
pub const KNOWN_KEYS: &[&str] = &[
    "CLOUD_PROVIDER",
    "PEERPODS_LIMIT_PER_NODE",
    "PODVM_INSTANCE_TYPE",
    "PODVM_INSTANCE_TYPES",
    "ROOT_VOLUME_SIZE",
    "TAGS",
    "VXLAN_PORT",
    "TUNNEL_TYPE",
    "REGISTRY_AUTH_FILE",
    "QEMU_PODVM_KERNEL",
    "QEMU_PODVM_INITRD",
    "QEMU_BRIDGE",
    "QEMU_BRIDGE_CIDR",
    "QEMU_ACCEL",
    "QEMU_PATH",
    "QEMU_DEBUG",
    "INSECURE_REGISTRIES",
];

/// The keys handed to the provider as written (it validates them): the qemu provider's.
pub const PROVIDER_KEYS: &[&str] = &[
    "QEMU_PODVM_KERNEL",
    "QEMU_PODVM_INITRD",
    "QEMU_BRIDGE",
    "QEMU_BRIDGE_CIDR",
    "QEMU_ACCEL",
    "QEMU_PATH",
    "QEMU_DEBUG",
    "INSECURE_REGISTRIES",
];

/// A bad env file or flag.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the settings file {path}: {error}; pass an existing file with --config FILE")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: String,
    },
    /// A line is not `KEY=value`.
    #[error("{path} line {line}: {problem}; write KEY=value (a `#` starts a comment)")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        problem: String,
    },
    /// A value is out of range or malformed.
    #[error("{key}={value:?} in {path}: {fix}")]
    Value {
        /// The key.
        key: String,
        /// Its value.
        value: String,
        /// The file (or `the command line`).
        path: PathBuf,
        /// The fix.
        fix: String,
    },
    /// A bad command-line flag.
    #[error("{0}")]
    Flag(String),
}

/// One `KEY=value` with the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvValue {
    /// The (unquoted) value.
    pub value: String,
    /// 1-based line number; 0 for values from the process environment.
    pub line: usize,
}

/// Parses an env file's text: `KEY=value`, optional `export `, `#` comments (whole lines, or
/// after whitespace in an unquoted value), values in `"..."` or `'...'` taken literally.
pub fn parse_env(path: &Path, text: &str) -> Result<BTreeMap<String, EnvValue>, ConfigError> {
    let mut out = BTreeMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let syntax = |problem: String| ConfigError::Syntax { path: path.to_owned(), line, problem };
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let l = l.strip_prefix("export ").map(str::trim_start).unwrap_or(l);
        let Some((key, rest)) = l.split_once('=') else {
            return Err(syntax(format!("{l:?} has no `=`")));
        };
        let key = key.trim();
        let valid_key = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_key {
            return Err(syntax(format!("{key:?} is not a key (letters, digits and `_`)")));
        }
        let rest = rest.trim();
        let value = if let Some(q) = rest.chars().next().filter(|c| *c == '"' || *c == '\'') {
            let inner = &rest[1..];
            let Some(end) = inner.find(q) else {
                return Err(syntax(format!("the value of {key} has no closing {q}")));
            };
            let after = inner[end + 1..].trim();
            if !after.is_empty() && !after.starts_with('#') {
                return Err(syntax(format!("text {after:?} after the quoted value of {key}")));
            }
            inner[..end].to_owned()
        } else {
            match rest.find(" #").or_else(|| rest.find("\t#")) {
                Some(p) => rest[..p].trim_end().to_owned(),
                None => rest.to_owned(),
            }
        };
        if out.insert(key.to_owned(), EnvValue { value, line }).is_some() {
            return Err(syntax(format!("{key} is set twice; keep one line")));
        }
    }
    Ok(out)
}

/// Largest registry auth file accepted (it travels in the podvm's user data, at most 64 KiB).
pub const MAX_REGISTRY_AUTH: u64 = 32 << 10;

/// Reads and checks `REGISTRY_AUTH_FILE`: a containers `auth.json` / docker config (`{"auths":
/// {...}}`), the credentials every podvm's agent pulls images with (the cluster's pull secret:
/// the container managers do not pass a pod's pull secret on to the runtime).
pub fn read_registry_auth(file: &Path) -> Result<serde_json::Value, String> {
    let meta = std::fs::metadata(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    if meta.len() > MAX_REGISTRY_AUTH {
        return Err(format!(
            "{} is {} bytes; at most {MAX_REGISTRY_AUTH} fit in a podvm's user data",
            file.display(),
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", file.display()))?;
    if !v.get("auths").is_some_and(serde_json::Value::is_object) {
        return Err(format!(
            "{} has no \"auths\" object; write a containers auth.json / docker config.json ({{\"auths\": {{\"registry:port\": {{\"auth\": \"<base64 user:password>\"}}}}}})",
            file.display()
        ));
    }
    Ok(v)
}

/// The service's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the settings came from (named in errors).
    pub config_file: PathBuf,
    /// `CLOUD_PROVIDER`: `qemu`.
    pub cloud_provider: String,
    /// `PEERPODS_LIMIT_PER_NODE`.
    pub limit_per_node: u32,
    /// `PODVM_INSTANCE_TYPE`; `None` = the provider's first allowed type.
    pub instance_type: Option<String>,
    /// `PODVM_INSTANCE_TYPES`; empty = all the provider offers.
    pub instance_types: Vec<String>,
    /// `ROOT_VOLUME_SIZE` in GB.
    pub root_volume_gb: u32,
    /// `TAGS`.
    pub tags: BTreeMap<String, String>,
    /// `VXLAN_PORT`.
    pub vxlan_port: u16,
    /// `REGISTRY_AUTH_FILE`'s content, read and checked at start: registry credentials put in
    /// every podvm's user data.
    pub registry_auth: Option<serde_json::Value>,
    /// `TUNNEL_TYPE`: `vxlan`.
    pub tunnel_type: String,
    /// Provider keys ([`PROVIDER_KEYS`]) as written; the provider validates them.
    pub provider_settings: BTreeMap<String, String>,
    /// `--socket`.
    pub socket: PathBuf,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// `--log-level`.
    pub log_level: slog::Level,
    /// Unknown keys and similar non-fatal findings, to log at start.
    pub warnings: Vec<String>,
}

impl Config {
    /// Validates parsed env values (from `path`). Flags are applied afterwards by the caller.
    pub fn from_env(path: &Path, env: &BTreeMap<String, EnvValue>) -> Result<Config, ConfigError> {
        let bad = |key: &str, value: &str, fix: String| ConfigError::Value {
            key: key.to_owned(),
            value: value.to_owned(),
            path: path.to_owned(),
            fix,
        };
        let get = |k: &str| env.get(k).map(|v| v.value.trim()).filter(|v| !v.is_empty());
        let mut warnings = Vec::new();
        for (k, v) in env {
            if !KNOWN_KEYS.contains(&k.as_str()) {
                warnings.push(format!(
                    "{} line {}: unknown key {k}, ignored (known keys: {})",
                    path.display(),
                    v.line,
                    KNOWN_KEYS.join(", ")
                ));
            }
        }
        let cloud_provider = get("CLOUD_PROVIDER").unwrap_or("qemu").to_owned();
        if cloud_provider != "qemu" {
            return Err(bad(
                "CLOUD_PROVIDER",
                &cloud_provider,
                "this build has the provider qemu only; write CLOUD_PROVIDER=qemu".into(),
            ));
        }
        let limit_per_node = match get("PEERPODS_LIMIT_PER_NODE") {
            None => DEFAULT_LIMIT,
            Some(v) => v.parse::<u32>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                bad(
                    "PEERPODS_LIMIT_PER_NODE",
                    v,
                    format!("write a whole number of at least 1 (default {DEFAULT_LIMIT})"),
                )
            })?,
        };
        let root_volume_gb = match get("ROOT_VOLUME_SIZE") {
            None => MIN_ROOT_VOLUME_GB,
            Some(v) => {
                let n = v.parse::<u32>().map_err(|_| {
                    bad("ROOT_VOLUME_SIZE", v, format!("write a whole number of GB, at least {MIN_ROOT_VOLUME_GB}"))
                })?;
                if n < MIN_ROOT_VOLUME_GB {
                    return Err(bad(
                        "ROOT_VOLUME_SIZE",
                        v,
                        format!("the minimum is {MIN_ROOT_VOLUME_GB} GB; write ROOT_VOLUME_SIZE={MIN_ROOT_VOLUME_GB} or more"),
                    ));
                }
                n
            }
        };
        let mut tags = BTreeMap::new();
        if let Some(v) = get("TAGS") {
            for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (k, val) = item.split_once('=').ok_or_else(|| {
                    bad("TAGS", v, format!("{item:?} is not key=value; write TAGS=key1=value1,key2=value2"))
                })?;
                let k = k.trim();
                if k.is_empty() {
                    return Err(bad(
                        "TAGS",
                        v,
                        format!("{item:?} has an empty key; write TAGS=key1=value1,key2=value2"),
                    ));
                }
                if k.starts_with("podvisor.io/") {
                    return Err(bad("TAGS", v, format!("the key {k} is reserved for the service; choose another key")));
                }
                tags.insert(k.to_owned(), val.trim().to_owned());
            }
        }
        let vxlan_port = match get("VXLAN_PORT") {
            None => DEFAULT_VXLAN_PORT,
            Some(v) => v.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                bad("VXLAN_PORT", v, format!("write a UDP port from 1 to 65535 (default {DEFAULT_VXLAN_PORT})"))
            })?,
        };
        let tunnel_type = get("TUNNEL_TYPE").unwrap_or("vxlan").to_owned();
        if tunnel_type != "vxlan" {
            return Err(bad("TUNNEL_TYPE", &tunnel_type, "only vxlan is supported; write TUNNEL_TYPE=vxlan".into()));
        }
        let registry_auth = match get("REGISTRY_AUTH_FILE") {
            None => None,
            Some(v) => Some(read_registry_auth(Path::new(v)).map_err(|e| {
                bad("REGISTRY_AUTH_FILE", v, format!("{e}; or remove REGISTRY_AUTH_FILE for anonymous pulls"))
            })?),
        };
        let instance_types: Vec<String> = get("PODVM_INSTANCE_TYPES")
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        let instance_type = get("PODVM_INSTANCE_TYPE").map(str::to_owned);
        let provider_settings = env
            .iter()
            .filter(|(k, _)| PROVIDER_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect();
        Ok(Config {
            config_file: path.to_owned(),
            cloud_provider,
            limit_per_node,
            instance_type,
            instance_types,
            root_volume_gb,
            tags,
            vxlan_port,
            tunnel_type,
            registry_auth,
            provider_settings,
            socket: PathBuf::from(DEFAULT_SOCKET),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            log_level: slog::Level::Info,
            warnings,
        })
    }

    /// Reads `path`. When `explicit` is false and the file does not exist, the known keys are
    /// taken from the process environment instead (so the defaults apply when nothing is set).
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_env(path, &parse_env(path, &text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                let env = KNOWN_KEYS
                    .iter()
                    .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), EnvValue { value: v, line: 0 })))
                    .collect();
                Config::from_env(Path::new("the process environment"), &env)
            }
            Err(e) => Err(ConfigError::Read { path: path.to_owned(), error: e.to_string() }),
        }
    }

    /// Checks the instance-type keys against what the provider offers; returns the allowed
    /// types, in the provider's order, and the default type.
    pub fn allowed_types(
        &self,
        offered: &[crate::provider::InstanceType],
    ) -> Result<(Vec<crate::provider::InstanceType>, crate::provider::InstanceType), ConfigError> {
        let names =
            |ts: &[crate::provider::InstanceType]| ts.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ");
        let bad = |key: &str, value: &str, fix: String| ConfigError::Value {
            key: key.to_owned(),
            value: value.to_owned(),
            path: self.config_file.clone(),
            fix,
        };
        for n in &self.instance_types {
            if !offered.iter().any(|t| &t.name == n) {
                return Err(bad(
                    "PODVM_INSTANCE_TYPES",
                    &self.instance_types.join(","),
                    format!(
                        "{n} is not an instance type of provider {}; choose from: {}",
                        self.cloud_provider,
                        names(offered)
                    ),
                ));
            }
        }
        let allowed: Vec<_> = offered
            .iter()
            .filter(|t| self.instance_types.is_empty() || self.instance_types.contains(&t.name))
            .cloned()
            .collect();
        if allowed.is_empty() {
            return Err(bad(
                "PODVM_INSTANCE_TYPES",
                "",
                format!("provider {} offers no instance type", self.cloud_provider),
            ));
        }
        let default = match &self.instance_type {
            None => allowed[0].clone(),
            Some(n) => allowed.iter().find(|t| &t.name == n).cloned().ok_or_else(|| {
                bad("PODVM_INSTANCE_TYPE", n, format!("choose one of the allowed instance types: {}", names(&allowed)))
            })?,
        };
        Ok((allowed, default))
    }
}

/// Parsed `serve` flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeFlags {
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--socket PATH`.
    pub socket: Option<PathBuf>,
    /// `--state-dir DIR`.
    pub state_dir: Option<PathBuf>,
    /// `--log-level LEVEL`.
    pub log_level: Option<slog::Level>,
}

/// Parses `serve`'s flags (`--flag value` or `--flag=value`).
pub fn parse_serve_flags(args: &[String]) -> Result<ServeFlags, ConfigError> {
    let mut f = ServeFlags::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
            _ => (a.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| ConfigError::Flag(format!("{name} needs a value")))
        };
        match name {
            "--config" => f.config = Some(PathBuf::from(value()?)),
            "--socket" => f.socket = Some(PathBuf::from(value()?)),
            "--state-dir" => f.state_dir = Some(PathBuf::from(value()?)),
            "--log-level" => {
                let v = value()?;
                let level = match v.to_ascii_lowercase().as_str() {
                    "error" => slog::Level::Error,
                    "warn" | "warning" => slog::Level::Warning,
                    "info" => slog::Level::Info,
                    "debug" => slog::Level::Debug,
                    "trace" => slog::Level::Trace,
                    _ => {
                        return Err(ConfigError::Flag(format!(
                            "--log-level {v:?}: use error, warn, info, debug or trace"
                        )))
                    }
                };
                f.log_level = Some(level);
            }
            other => {
                return Err(ConfigError::Flag(format!(
                "unknown flag {other:?}; serve takes --config FILE, --socket PATH, --state-dir DIR, --log-level LEVEL"
            )))
            }
        }
    }
    Ok(f)
}

impl ServeFlags {
    /// Loads the env file and applies the flags over it.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let path = self.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
        let mut c = Config::load(&path, self.config.is_some())?;
        if let Some(s) = &self.socket {
            c.socket = s.clone();
        }
        if let Some(s) = &self.state_dir {
            c.state_dir = s.clone();
        }
        if let Some(l) = self.log_level {
            c.log_level = l;
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::InstanceType;

    fn cfg(text: &str) -> Result<Config, ConfigError> {
        let p = Path::new("/etc/podvisor/peer-pods-cm.env");
        Config::from_env(p, &parse_env(p, text)?)
    }

    fn qemu_types() -> Vec<InstanceType> {
        [("small", 1, 512), ("medium", 2, 1024), ("large", 4, 2048)]
            .iter()
            .map(|(n, c, m)| InstanceType { name: n.to_string(), vcpus: *c, memory_mib: *m })
            .collect()
    }

    #[test]
    fn defaults_from_an_empty_file() {
        let c = cfg("# nothing\n\n").unwrap();
        assert_eq!(c.cloud_provider, "qemu");
        assert_eq!(c.limit_per_node, 10);
        assert_eq!(c.root_volume_gb, 6);
        assert_eq!(c.vxlan_port, 4789);
        assert_eq!(c.tunnel_type, "vxlan");
        assert!(c.tags.is_empty() && c.instance_types.is_empty() && c.instance_type.is_none());
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn parses_quotes_comments_and_tags() {
        let c = cfg(concat!(
            "CLOUD_PROVIDER=\"qemu\"\n",
            "export PEERPODS_LIMIT_PER_NODE=2   # two\n",
            "PODVM_INSTANCE_TYPES='small, large'\n",
            "PODVM_INSTANCE_TYPE=large\n",
            "TAGS=team=a b,env=test\n",
            "ROOT_VOLUME_SIZE=20\n",
            "QEMU_BRIDGE=br-test\n",
            "AWS_REGION=us-east-1\n",
        ))
        .unwrap();
        assert_eq!(c.limit_per_node, 2);
        assert_eq!(c.instance_types, vec!["small", "large"]);
        assert_eq!(c.root_volume_gb, 20);
        assert_eq!(c.tags.get("team").map(String::as_str), Some("a b"));
        assert_eq!(c.tags.get("env").map(String::as_str), Some("test"));
        assert_eq!(c.provider_settings.get("QEMU_BRIDGE").map(String::as_str), Some("br-test"));
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("line 8: unknown key AWS_REGION"), "{}", c.warnings[0]);
        let (allowed, default) = c.allowed_types(&qemu_types()).unwrap();
        assert_eq!(allowed.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["small", "large"]);
        assert_eq!(default.name, "large");
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let cases: &[(&str, &[&str])] = &[
            ("ROOT_VOLUME_SIZE=5", &["ROOT_VOLUME_SIZE=\"5\"", "minimum is 6 GB"]),
            ("ROOT_VOLUME_SIZE=big", &["ROOT_VOLUME_SIZE", "at least 6"]),
            ("PEERPODS_LIMIT_PER_NODE=0", &["PEERPODS_LIMIT_PER_NODE", "at least 1"]),
            ("PEERPODS_LIMIT_PER_NODE=-3", &["PEERPODS_LIMIT_PER_NODE", "whole number"]),
            ("VXLAN_PORT=70000", &["VXLAN_PORT", "1 to 65535"]),
            ("TUNNEL_TYPE=geneve", &["TUNNEL_TYPE", "only vxlan"]),
            ("CLOUD_PROVIDER=aws", &["CLOUD_PROVIDER", "qemu"]),
            ("TAGS=a=1,oops", &["TAGS", "\"oops\" is not key=value"]),
            ("TAGS=podvisor.io/owner=x", &["reserved"]),
            ("JUST TEXT", &["line 1", "has no `=`"]),
            ("A=1\nA=2", &["line 2", "A is set twice"]),
            ("TAGS=\"a=1", &["line 1", "no closing \""]),
            ("9X=1", &["not a key"]),
        ];
        for (text, wants) in cases {
            let e = cfg(text).unwrap_err().to_string();
            for w in *wants {
                assert!(e.contains(w), "{text:?}: {e:?} lacks {w:?}");
            }
            assert!(e.contains("peer-pods-cm.env"), "{text:?}: {e} names no file");
        }
    }

    #[test]
    fn the_registry_auth_file_is_read_and_checked_at_start() {
        let dir = std::env::temp_dir().join(format!("podvisor-rh-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("auth.json");
        std::fs::write(&good, r#"{"auths":{"reg:5000":{"auth":"dTpw"}}}"#).unwrap();
        let c = cfg(&format!("REGISTRY_AUTH_FILE={}", good.display())).unwrap();
        assert_eq!(c.registry_auth.unwrap()["auths"]["reg:5000"]["auth"], "dTpw");
        assert_eq!(cfg("").unwrap().registry_auth, None);
        let bad = dir.join("bad.json");
        std::fs::write(&bad, r#"{"credHelpers":{}}"#).unwrap();
        for (file, want) in [(bad, "has no \"auths\" object"), (dir.join("missing.json"), "cannot read")] {
            let e = cfg(&format!("REGISTRY_AUTH_FILE={}", file.display())).unwrap_err().to_string();
            assert!(e.contains("REGISTRY_AUTH_FILE") && e.contains(want) && e.contains("anonymous"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn instance_type_keys_are_checked_against_the_provider() {
        let e = cfg("PODVM_INSTANCE_TYPES=small,huge").unwrap().allowed_types(&qemu_types()).unwrap_err();
        assert!(
            e.to_string().contains("huge is not an instance type of provider qemu; choose from: small, medium, large"),
            "{e}"
        );
        let e = cfg("PODVM_INSTANCE_TYPES=small\nPODVM_INSTANCE_TYPE=large")
            .unwrap()
            .allowed_types(&qemu_types())
            .unwrap_err();
        assert!(
            e.to_string().contains("PODVM_INSTANCE_TYPE=\"large\"")
                && e.to_string().contains("allowed instance types: small"),
            "{e}"
        );
        let (_, d) = cfg("").unwrap().allowed_types(&qemu_types()).unwrap();
        assert_eq!(d.name, "small");
    }

    #[test]
    fn the_shipped_file_holds_the_defaults() {
        let shipped = cfg(include_str!("../../configs/peer-pods-cm.env")).unwrap();
        let mut empty = cfg("").unwrap();
        empty.provider_settings = shipped.provider_settings.clone();
        assert_eq!(shipped, empty, "configs/peer-pods-cm.env documents the defaults");
        assert_eq!(shipped.provider_settings.len(), 5, "{:?}", shipped.provider_settings);
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cm.env");
        std::fs::write(&file, "PEERPODS_LIMIT_PER_NODE=3\n").unwrap();
        let args: Vec<String> = [
            "--config",
            file.to_str().unwrap(),
            "--socket=/tmp/x.sock",
            "--state-dir",
            "/tmp/st",
            "--log-level",
            "debug",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let c = parse_serve_flags(&args).unwrap().load().unwrap();
        assert_eq!(c.limit_per_node, 3);
        assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(c.state_dir, PathBuf::from("/tmp/st"));
        assert_eq!(c.log_level, slog::Level::Debug);
        let missing = dir.path().join("missing.env");
        let e = parse_serve_flags(&["--config".into(), missing.to_str().unwrap().into()]).unwrap().load().unwrap_err();
        assert!(
            e.to_string().contains("cannot read the settings file") && e.to_string().contains("missing.env"),
            "{e}"
        );
        let e = parse_serve_flags(&["--bogus".into()]).unwrap_err();
        assert!(e.to_string().contains("unknown flag \"--bogus\""), "{e}");
        let e = parse_serve_flags(&["--log-level".into(), "loud".into()]).unwrap_err();
        assert!(e.to_string().contains("use error, warn, info, debug or trace"), "{e}");
        let e = parse_serve_flags(&["--socket".into()]).unwrap_err();
        assert!(e.to_string().contains("--socket needs a value"), "{e}");
    }
}
