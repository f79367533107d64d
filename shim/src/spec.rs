//! Turning the host's OCI spec (`<bundle>/config.json`) into the spec the guest runs: the
//! rootfs and every host bind-mount source are replaced by their paths on the virtio-fs share,
//! host namespace paths are dropped (they mean nothing in the guest), and host hooks are dropped.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Mount, Spec};

/// Why a spec cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// config.json could not be read or parsed.
    #[error("{file}: {message}")]
    Load {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A field has a value the shim cannot honour.
    #[error("OCI spec field {field}: {message}")]
    Field {
        /// The field, e.g. `mounts[3].source`.
        field: String,
        /// What is wrong and what would work.
        message: String,
    },
}

/// Reads `<bundle>/config.json`.
pub fn load(bundle: &Path) -> Result<Spec, SpecError> {
    let file = bundle.join("config.json");
    let text = std::fs::read(&file).map_err(|e| SpecError::Load { file: file.clone(), message: e.to_string() })?;
    serde_json::from_slice(&text).map_err(|e| SpecError::Load { file, message: format!("not a valid OCI runtime spec: {e}") })
}

/// The host rootfs directory of a container: containerd's mounts go to `<bundle>/rootfs`;
/// otherwise `root.path` (absolute, as CRI-O and `ctr run --rootfs` send it, or relative to the
/// bundle).
pub fn host_rootfs(spec: &Spec, bundle: &Path, has_mounts: bool) -> Result<PathBuf, SpecError> {
    if has_mounts {
        return Ok(bundle.join("rootfs"));
    }
    let root = spec.root().as_ref().ok_or_else(|| SpecError::Field {
        field: "root".into(),
        message: "missing, and no rootfs mounts were given; set root.path".into(),
    })?;
    let path = if root.path().is_absolute() { root.path().clone() } else { bundle.join(root.path()) };
    if !path.is_dir() {
        return Err(SpecError::Field {
            field: "root.path".into(),
            message: format!("rootfs {} does not exist or is not a directory", path.display()),
        });
    }
    Ok(path)
}

/// A host path a mount needs shared into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// Index in `mounts`.
    pub index: usize,
    /// Host source.
    pub source: PathBuf,
    /// Read-only.
    pub read_only: bool,
}

/// Whether a mount is a bind mount of a host path.
pub fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options().as_ref().is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"))
}

/// The bind mounts whose host sources must be shared with the guest.
pub fn host_binds(spec: &Spec) -> Result<Vec<HostBind>, SpecError> {
    let mut out = Vec::new();
    for (index, m) in spec.mounts().iter().flatten().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let source = m.source().clone().ok_or_else(|| SpecError::Field {
            field: format!("mounts[{index}].source"),
            message: format!("bind mount on {} has no source", m.destination().display()),
        })?;
        if !source.exists() {
            return Err(SpecError::Field {
                field: format!("mounts[{index}].source"),
                message: format!("{} (mounted on {}) does not exist on the host", source.display(), m.destination().display()),
            });
        }
        let read_only = m.options().as_ref().is_some_and(|o| o.iter().any(|x| x == "ro"));
        out.push(HostBind { index, source, read_only });
    }
    Ok(out)
}

/// Rewrites `spec` for the guest: `guest_root` as rootfs, `guest_sources[i]` as the source of
/// `binds[i]`, no namespace paths, no hooks. Returns warnings for what was dropped.
pub fn for_guest(mut spec: Spec, guest_root: &str, binds: &[HostBind], guest_sources: &[String]) -> (Spec, Vec<String>) {
    let mut warnings = Vec::new();
    if let Some(root) = spec.root_mut() {
        root.set_path(PathBuf::from(guest_root));
    }
    if let Some(mounts) = spec.mounts_mut() {
        for (b, src) in binds.iter().zip(guest_sources) {
            if let Some(m) = mounts.get_mut(b.index) {
                m.set_source(Some(PathBuf::from(src)));
            }
        }
    }
    if let Some(linux) = spec.linux_mut() {
        if let Some(nss) = linux.namespaces_mut() {
            for ns in nss.iter_mut() {
                if let Some(p) = ns.path() {
                    warnings.push(format!("namespace {:?} path {} is a host path; the guest creates its own", ns.typ(), p.display()));
                    ns.set_path(None);
                }
            }
        }
    }
    if let Some(p) = spec.process_mut() {
        ensure_path(p);
    }
    if spec.hooks().is_some() {
        warnings.push("OCI hooks are not run (they are host programs and the container runs in a VM)".into());
        spec.set_hooks(None);
    }
    (spec, warnings)
}

/// runc's default `PATH`, used when the process environment has none (e.g. `ctr run
/// --rootfs`), so that a bare command is found as `execvp` would.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Adds [`DEFAULT_PATH`] to a process environment without `PATH`.
pub fn ensure_path(p: &mut oci_spec::runtime::Process) {
    let mut env = p.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_string());
        p.set_env(Some(env));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn binds_are_found_and_rewritten() {
        let dir = std::env::temp_dir();
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": dir, "options": ["rbind", "ro"]},
                {"destination": "/etc/x", "source": dir, "options": ["bind"]}
            ],
            "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/x"}, {"type": "pid"}]},
            "hooks": {"prestart": [{"path": "/bin/true"}]}
        }));
        let binds = host_binds(&s).unwrap();
        assert_eq!(binds.len(), 2);
        assert_eq!((binds[0].index, binds[0].read_only), (1, true));
        assert_eq!((binds[1].index, binds[1].read_only), (2, false));
        let (g, warnings) = for_guest(s, "/run/g/c1/rootfs", &binds, &["/run/g/m1".into(), "/run/g/m2".into()]);
        assert_eq!(g.root().as_ref().unwrap().path(), Path::new("/run/g/c1/rootfs"));
        let m = g.mounts().as_ref().unwrap();
        assert_eq!(m[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(m[1].source().as_deref(), Some(Path::new("/run/g/m1")));
        assert_eq!(m[2].source().as_deref(), Some(Path::new("/run/g/m2")));
        assert!(g.linux().as_ref().unwrap().namespaces().as_ref().unwrap().iter().all(|n| n.path().is_none()));
        assert!(g.hooks().is_none());
        assert!(g.process().as_ref().unwrap().env().as_ref().unwrap().contains(&DEFAULT_PATH.to_string()));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
    }

    #[test]
    fn missing_bind_source_and_rootfs_are_named() {
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "/nonexistent/rootfs"},
            "mounts": [{"destination": "/data", "type": "bind", "source": "/nonexistent/data", "options": ["rbind"]}]
        }));
        let e = host_binds(&s).unwrap_err().to_string();
        assert!(e.contains("mounts[0].source") && e.contains("/nonexistent/data"), "{e}");
        let e = host_rootfs(&s, Path::new("/b"), false).unwrap_err().to_string();
        assert!(e.contains("root.path") && e.contains("/nonexistent/rootfs does not exist"), "{e}");
        assert_eq!(host_rootfs(&s, Path::new("/b"), true).unwrap(), Path::new("/b/rootfs"));
    }
}
