//! Turning the host's OCI spec (`<bundle>/config.json`) into the spec the guest runs, on typed
//! `oci-spec` values: the shim decides everything about the guest spec that does not need the
//! guest; the agent adds only what the guest alone knows.
//!
//! # Who owns which rule
//!
//! Every rule that turns a host's OCI spec into the spec run in the guest has exactly one
//! owner. The same list is in the docs of the agent's `container::spec` module.
//!
//! Shim (this module: [`for_guest`], [`process_for_guest`], [`take_block_devices`]):
//! * `root.path` → the rootfs's path on the virtio-fs share; bind sources → their share paths;
//!   the mounts below a plain `ro` bind → binds of their own with their own flag;
//! * the pod's `/dev/shm` → the guest's pod tmpfs ([`GUEST_SHM`]); memory-backed emptyDirs →
//!   guest tmpfs ([`GUEST_EPHEMERAL`]);
//! * block devices (`linux.devices` of type `b`) taken out: they are hot-plugged;
//! * namespaces: host paths dropped (they mean nothing in the guest), the `network` entry
//!   removed (the pod network is the VM's: containers share it), a `cgroup` entry added when
//!   missing (cgroup v2's default: the container sees its own cgroup on /sys/fs/cgroup);
//! * OCI hooks removed (host programs); AppArmor profile, SELinux labels and Intel RDT removed
//!   (the VM has none of them);
//! * an empty `ociVersion` becomes `1.0.2` (libcontainer runs 1.x specs only);
//! * cgroup-v1-only memory settings (`kernel`, `kernelTCP`, `swappiness`) removed: the guest is
//!   cgroup v2;
//! * process (of the spec and of every exec): `PATH` ([`DEFAULT_PATH`]) set when missing, empty
//!   `cwd` → `/`.
//!
//! `agent_protocol::convert` (the protobuf has no presence): `noNewPrivileges: false` and
//! zero realtime CPU settings arrive as absent (libcontainer 0.7 would skip seccomp with an
//! explicit `false`).
//!
//! Agent (guest-local facts): `linux.cgroupsPath` in the guest's tree; joining the pod's
//! `ipc`/`uts` namespaces (entries added when missing) and the sandbox container's `pid`
//! namespace; `rootfsPropagation` in libcontainer's words; `net.*` sysctls applied to the
//! guest's network namespace; propagated bind sources made shared mounts; `HOME` from the
//! guest rootfs's `/etc/passwd`; the hot-plugged block devices' guest nodes and allow rules.
//! The agent also rejects what it cannot run (missing rootfs or bind source in the guest,
//! empty args, relative cwd, a namespace path from the host, unknown propagation).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Mount, Spec};

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
    serde_json::from_slice(&text)
        .map_err(|e| SpecError::Load { file, message: format!("not a valid OCI runtime spec: {e}") })
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

/// How read-only a shared bind mount is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOnly {
    /// Writable.
    No,
    /// `ro`: the mount itself; mounts below it keep their own flags (as runc does).
    Top,
    /// `rro` (CRI `recursive_read_only`): the mount and every mount below it.
    Recursive,
}

/// A bind mount's propagation, from its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// `rprivate` or nothing.
    Private,
    /// `rslave` (CRI HostToContainer): mounts made on the host below the source appear.
    HostToContainer,
    /// `rshared` (CRI Bidirectional): also mounts made in the container reach the pod's other
    /// containers and the guest; they stay in the VM (the host never sees them).
    Bidirectional,
}

/// A host path a mount needs shared into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// Index in `mounts`.
    pub index: usize,
    /// Host source.
    pub source: PathBuf,
    /// Read-only, and how far down.
    pub read_only: ReadOnly,
    /// Mount propagation (CRI Bidirectional / HostToContainer): the pod's containers must see
    /// one guest mount of this source, so it is shared once per pod.
    pub propagation: Propagation,
    /// Mounts below the source on the host (relative path, read-only): for a plain `ro` bind
    /// they become mounts of their own in the container, keeping their own flag (see
    /// [`for_guest`]).
    pub submounts: Vec<(PathBuf, bool)>,
}

/// The mounts below `source` on the host, parents first, with whether each is read-only.
fn submounts_of(source: &Path) -> Vec<(PathBuf, bool)> {
    let mut below: Vec<PathBuf> =
        crate::mounts::mount_points_under(source).into_iter().filter(|p| p != source).collect();
    below.sort_by_key(|p| p.components().count());
    below
        .into_iter()
        .filter_map(|p| {
            let ro =
                nix::sys::statvfs::statvfs(&p).is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
            Some((p.strip_prefix(source).ok()?.to_path_buf(), ro))
        })
        .collect()
}

/// Where the guest keeps the pod's `/dev/shm` (a tmpfs the agent makes at `CreateSandbox`).
pub const GUEST_SHM: &str = "/run/kata-containers/sandbox/shm";

/// The spec's annotations as a map.
pub fn annotations(spec: &Spec) -> std::collections::HashMap<String, String> {
    spec.annotations().clone().unwrap_or_default()
}

fn namespace_path(spec: &Spec, typ: oci_spec::runtime::LinuxNamespaceType) -> Option<PathBuf> {
    spec.linux().as_ref()?.namespaces().as_ref()?.iter().find(|n| n.typ() == typ)?.path().clone()
}

/// The pod's network namespace (the `network` entry's path), if the pod has one.
pub fn netns_path(spec: &Spec) -> Option<PathBuf> {
    namespace_path(spec, oci_spec::runtime::LinuxNamespaceType::Network)
}

/// A namespace of the node that a sandbox spec asks to share, by its Kubernetes pod option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNamespace {
    /// `hostNetwork`, `hostIPC` or `hostPID`.
    pub option: &'static str,
    /// How the spec says so.
    pub evidence: String,
}

/// The node's namespaces a sandbox spec asks to share: a `network`, `ipc` or `pid` entry that
/// is missing (containerd removes it for hostNetwork / hostIPC / hostPID, CRI-O for hostPID), or
/// whose path is the same namespace as this process's (CRI-O pins the host's own namespace and
/// passes its path), compared by identity (device and inode), never by name; and CRI-O's
/// `io.kubernetes.cri-o.HostNetwork` annotation. A VM has its own kernel: it can share none of
/// them.
pub fn host_namespaces(spec: &Spec) -> Vec<HostNamespace> {
    use oci_spec::runtime::LinuxNamespaceType as T;
    let entries: Vec<oci_spec::runtime::LinuxNamespace> =
        spec.linux().as_ref().and_then(|l| l.namespaces().clone()).unwrap_or_default();
    let identity = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
    };
    let mut out = Vec::new();
    for (typ, option, own) in
        [(T::Network, "hostNetwork", "net"), (T::Ipc, "hostIPC", "ipc"), (T::Pid, "hostPID", "pid")]
    {
        let kind = own;
        match entries.iter().find(|n| n.typ() == typ) {
            None => out.push(HostNamespace {
                option,
                evidence: format!("the sandbox's OCI spec has no {kind} namespace, so it would run in the node's"),
            }),
            Some(n) => {
                let Some(path) = n.path() else { continue };
                let mine = identity(&Path::new("/proc/self/ns").join(own));
                if mine.is_some() && identity(path) == mine {
                    out.push(HostNamespace {
                        option,
                        evidence: format!("the sandbox's {kind} namespace {} is the node's own", path.display()),
                    });
                }
            }
        }
    }
    let crio_host_network = annotations(spec).get("io.kubernetes.cri-o.HostNetwork").is_some_and(|v| v == "true");
    if crio_host_network && !out.iter().any(|h| h.option == "hostNetwork") {
        out.push(HostNamespace {
            option: "hostNetwork",
            evidence: "the annotation io.kubernetes.cri-o.HostNetwork is \"true\"".into(),
        });
    }
    out
}

/// Whether the container joins an existing PID namespace (the pod shares one).
pub fn joins_pid_namespace(spec: &Spec) -> bool {
    namespace_path(spec, oci_spec::runtime::LinuxNamespaceType::Pid).is_some()
}

/// The pod's `/dev/shm` bind mount (containerd CRI's sandbox shm, CRI-O's `shm/`), which
/// becomes the guest's per-pod tmpfs instead of a host path.
fn is_pod_shm(m: &Mount) -> bool {
    m.destination() == Path::new("/dev/shm") && is_bind(m)
}

/// Where emptyDir volumes with medium Memory live in the guest (a tmpfs per volume, shared by
/// the pod's containers).
pub const GUEST_EPHEMERAL: &str = "/run/kata-containers/sandbox/ephemeral";

/// The guest path of a memory-backed emptyDir bind mount: kubelet puts such volumes at
/// `…/volumes/kubernetes.io~empty-dir/<name>` on a host tmpfs. They become a guest tmpfs
/// instead of a host tmpfs shared over virtio-fs (faster, and the memory is the pod's).
pub fn ephemeral_target(m: &Mount) -> Option<String> {
    if !is_bind(m) {
        return None;
    }
    let source = m.source().as_ref()?;
    let name = source.file_name()?.to_str()?;
    let parent = source.parent()?;
    if parent.file_name()? != "kubernetes.io~empty-dir" {
        return None;
    }
    let on_tmpfs =
        nix::sys::statfs::statfs(source).map(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC).unwrap_or(false);
    on_tmpfs.then(|| format!("{GUEST_EPHEMERAL}/{name}"))
}

/// A host block device the container asks for (`linux.devices` of type `b`), to hot-plug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// Path inside the container.
    pub container_path: PathBuf,
    /// Host device node (found by major:minor).
    pub host_path: PathBuf,
    /// Major number.
    pub major: i64,
    /// Minor number.
    pub minor: i64,
}

/// Takes the block devices out of `linux.devices` (they are hot-plugged into the VM and the
/// agent adds the guest's own device node instead). The host node is found through
/// `/sys/dev/block/<major>:<minor>/uevent`.
pub fn take_block_devices(spec: &mut Spec) -> Result<Vec<BlockDevice>, SpecError> {
    let Some(devices) = spec.linux_mut().as_mut().and_then(|l| l.devices_mut().as_mut()) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    let mut keep = Vec::new();
    for (i, d) in devices.drain(..).enumerate() {
        if d.typ() != oci_spec::runtime::LinuxDeviceType::B {
            keep.push(d);
            continue;
        }
        let uevent = format!("/sys/dev/block/{}:{}/uevent", d.major(), d.minor());
        let name = std::fs::read_to_string(&uevent)
            .ok()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string)))
            .ok_or_else(|| SpecError::Field {
                field: format!("linux.devices[{i}]"),
                message: format!(
                    "block device {} ({}:{}) does not exist on the host ({uevent} unreadable)",
                    d.path().display(),
                    d.major(),
                    d.minor()
                ),
            })?;
        out.push(BlockDevice {
            container_path: d.path().clone(),
            host_path: Path::new("/dev").join(name),
            major: d.major(),
            minor: d.minor(),
        });
    }
    *devices = keep;
    Ok(out)
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
        if !is_bind(m) || is_pod_shm(m) || ephemeral_target(m).is_some() {
            continue;
        }
        let source = m.source().clone().ok_or_else(|| SpecError::Field {
            field: format!("mounts[{index}].source"),
            message: format!("bind mount on {} has no source", m.destination().display()),
        })?;
        if !source.exists() {
            return Err(SpecError::Field {
                field: format!("mounts[{index}].source"),
                message: format!(
                    "{} (mounted on {}) does not exist on the host",
                    source.display(),
                    m.destination().display()
                ),
            });
        }
        let has = |opt: &str| m.options().as_ref().is_some_and(|o| o.iter().any(|x| x == opt));
        let read_only = if has("rro") {
            ReadOnly::Recursive
        } else if has("ro") {
            ReadOnly::Top
        } else {
            ReadOnly::No
        };
        let propagation = if has("rshared") || has("shared") {
            Propagation::Bidirectional
        } else if has("rslave") || has("slave") {
            Propagation::HostToContainer
        } else {
            Propagation::Private
        };
        let submounts = if read_only == ReadOnly::Top && source.is_dir() { submounts_of(&source) } else { Vec::new() };
        out.push(HostBind { index, source, read_only, propagation, submounts });
    }
    Ok(out)
}

/// Applies the shim's rules (see the module docs) to `spec`: `guest_root` as rootfs,
/// `guest_sources[i]` as the source of `binds[i]`, and the rest of the list. Returns warnings
/// for what was dropped that a user may have meant (namespace paths, hooks).
pub fn for_guest(
    mut spec: Spec,
    guest_root: &str,
    binds: &[HostBind],
    guest_sources: &[String],
) -> (Spec, Vec<String>) {
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
        // A plain read-only bind leaves the mounts below it as they are (runc's `ro`). In the
        // guest those are virtio-fs submounts, mounted on first access, and a mount made that
        // way takes the flags of the mount it appears in: read-only. So each becomes a bind of
        // its own, after its parent, with its own flag.
        for (b, src) in binds.iter().zip(guest_sources).rev() {
            let Some(parent) = mounts.get(b.index).cloned() else { continue };
            let extra: Vec<Mount> = b
                .submounts
                .iter()
                .map(|(rel, ro)| {
                    let mut options: Vec<String> = parent
                        .options()
                        .clone()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|o| !matches!(o.as_str(), "ro" | "rw" | "bind" | "rbind"))
                        .collect();
                    options.push("rbind".into());
                    options.push(if *ro { "ro" } else { "rw" }.into());
                    let mut m = parent.clone();
                    m.set_destination(parent.destination().join(rel));
                    m.set_source(Some(Path::new(src).join(rel)));
                    m.set_options(Some(options));
                    m
                })
                .collect();
            for (k, m) in extra.into_iter().enumerate() {
                mounts.insert(b.index + 1 + k, m);
            }
        }
        for m in mounts.iter_mut() {
            if is_pod_shm(m) {
                m.set_source(Some(PathBuf::from(GUEST_SHM)));
            } else if let Some(guest) = ephemeral_target(m) {
                m.set_source(Some(PathBuf::from(guest)));
            }
        }
    }
    if spec.version().is_empty() {
        spec.set_version("1.0.2".into());
    }
    if let Some(linux) = spec.linux_mut() {
        if let Some(nss) = linux.namespaces_mut() {
            // The pod's network lives in the VM: containers share the guest's.
            nss.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
            for ns in nss.iter_mut() {
                if let Some(p) = ns.path() {
                    warnings.push(format!(
                        "namespace {:?} path {} is a host path: dropped (in the guest the container joins \
                         the pod's namespaces or gets new ones)",
                        ns.typ(),
                        p.display()
                    ));
                    ns.set_path(None);
                }
            }
        }
        let nss = linux.namespaces_mut().get_or_insert_with(Vec::new);
        if !nss.iter().any(|ns| ns.typ() == LinuxNamespaceType::Cgroup) {
            // The guest is cgroup v2 only, where a private cgroup namespace is the default
            // (containerd and Docker on v2 hosts); a v1 host's spec has no entry.
            let mut ns = LinuxNamespace::default();
            ns.set_typ(LinuxNamespaceType::Cgroup);
            nss.push(ns);
        }
        linux.set_mount_label(None).set_intel_rdt(None);
        if let Some(memory) = linux.resources_mut().as_mut().and_then(|r| r.memory_mut().as_mut()) {
            memory.set_kernel(None).set_kernel_tcp(None).set_swappiness(None);
        }
    }
    if let Some(p) = spec.process_mut() {
        process_for_guest(p);
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

/// The shim's rules for a process, of the spec or of an exec (see the module docs):
/// [`DEFAULT_PATH`] when the environment has no `PATH`, `/` for an empty `cwd`, no AppArmor
/// profile or SELinux label.
pub fn process_for_guest(p: &mut oci_spec::runtime::Process) {
    let mut env = p.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_string());
        p.set_env(Some(env));
    }
    if p.cwd().as_os_str().is_empty() {
        p.set_cwd(PathBuf::from("/"));
    }
    p.set_apparmor_profile(None).set_selinux_label(None);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn binds_are_found_and_rewritten() {
        // A directory of its own: under /tmp itself other tests' mounts come and go, and a
        // read-only bind carries the mounts below it as separate binds.
        let dir = std::env::temp_dir().join(format!("podvisor-binds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": dir, "options": ["rbind", "ro"]},
                {"destination": "/etc/x", "source": dir, "options": ["bind"]},
                {"destination": "/rro", "type": "bind", "source": dir, "options": ["rbind", "rro"]},
                {"destination": "/prop", "type": "bind", "source": dir, "options": ["rbind", "rshared", "rw"]}
            ],
            "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/x"}, {"type": "pid"}]},
            "hooks": {"prestart": [{"path": "/bin/true"}]}
        }));
        let binds = host_binds(&s).unwrap();
        assert_eq!(binds.len(), 4);
        assert_eq!((binds[2].read_only, binds[2].propagation), (ReadOnly::Recursive, Propagation::Private));
        assert_eq!((binds[3].read_only, binds[3].propagation), (ReadOnly::No, Propagation::Bidirectional));
        assert_eq!(
            (binds[0].index, binds[0].read_only, binds[0].propagation),
            (1, ReadOnly::Top, Propagation::Private)
        );
        assert_eq!((binds[1].index, binds[1].read_only), (2, ReadOnly::No));
        let sources = ["/run/g/m1", "/run/g/m2", "/run/g/m3", "/run/g/m4"].map(String::from);
        let (g, warnings) = for_guest(s, "/run/g/c1/rootfs", &binds, &sources);
        assert_eq!(g.root().as_ref().unwrap().path(), Path::new("/run/g/c1/rootfs"));
        let m = g.mounts().as_ref().unwrap();
        assert_eq!(m[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(m[1].source().as_deref(), Some(Path::new("/run/g/m1")));
        assert_eq!(m[2].source().as_deref(), Some(Path::new("/run/g/m2")));
        assert!(g.hooks().is_none());
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        std::fs::remove_dir(&dir).unwrap();
    }

    /// Every rule of the shim that does not touch mounts, on one spec as containerd's CRI
    /// writes it for an app container on a cgroup v1 host with AppArmor and SELinux.
    #[test]
    fn host_only_settings_are_dropped_and_defaults_set() {
        let s = spec(serde_json::json!({
            "ociVersion": "",
            "process": {"args": ["sh"], "cwd": "", "env": ["A=1"], "user": {"uid": 0, "gid": 0},
                        "apparmorProfile": "cri-containerd.apparmor.d", "selinuxLabel": "system_u:system_r:container_t:s0",
                        "noNewPrivileges": true},
            "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
            "linux": {
                "namespaces": [{"type": "pid", "path": "/proc/7/ns/pid"}, {"type": "network", "path": "/var/run/netns/cni-1"},
                               {"type": "ipc", "path": "/proc/7/ns/ipc"}, {"type": "mount"}],
                "mountLabel": "system_u:object_r:container_file_t:s0",
                "intelRdt": {"l3CacheSchema": "L3:0=ffff0"},
                "resources": {"memory": {"limit": 1000000, "swappiness": 60, "kernel": 5, "kernelTCP": 6},
                              "cpu": {"shares": 2}}
            }
        }));
        let (g, warnings) = for_guest(s, "/r", &[], &[]);
        let g = serde_json::to_value(&g).unwrap();
        assert_eq!(g["ociVersion"], "1.0.2");
        assert!(g.get("hooks").is_none());
        assert_eq!(
            g["linux"]["namespaces"],
            serde_json::json!([{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}, {"type": "cgroup"}]),
            "host paths dropped, no network namespace, a cgroup namespace"
        );
        for gone in ["mountLabel", "intelRdt"] {
            assert!(g["linux"].get(gone).is_none(), "{gone}: {g}");
        }
        assert_eq!(g["linux"]["resources"], serde_json::json!({"memory": {"limit": 1000000}, "cpu": {"shares": 2}}));
        let p = &g["process"];
        assert_eq!(p["env"], serde_json::json!(["A=1", DEFAULT_PATH]));
        assert_eq!(p["cwd"], "/");
        assert!(p.get("apparmorProfile").is_none() && p.get("selinuxLabel").is_none(), "{p}");
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(warnings.len(), 3, "two namespace paths and the hooks: {warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("/proc/7/ns/ipc")), "{warnings:?}");

        // A spec that has its own PATH, cwd and cgroup namespace keeps them.
        let s = spec(serde_json::json!({
            "ociVersion": "1.1.0",
            "process": {"args": ["sh"], "cwd": "/srv", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
            "linux": {"namespaces": [{"type": "cgroup"}, {"type": "mount"}]}
        }));
        let (g, warnings) = for_guest(s, "/r", &[], &[]);
        let g = serde_json::to_value(&g).unwrap();
        assert_eq!(g["ociVersion"], "1.1.0");
        assert_eq!(g["process"]["env"], serde_json::json!(["PATH=/bin"]));
        assert_eq!(g["process"]["cwd"], "/srv");
        assert_eq!(g["linux"]["namespaces"], serde_json::json!([{"type": "cgroup"}, {"type": "mount"}]));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    /// An exec's process gets the same process rules as the spec's.
    #[test]
    fn exec_processes_get_the_process_rules() {
        let mut p: oci_spec::runtime::Process = serde_json::from_value(serde_json::json!({
            "args": ["ls"], "cwd": "", "user": {"uid": 0, "gid": 0}, "apparmorProfile": "cri-containerd.apparmor.d",
            "selinuxLabel": "system_u:system_r:container_t:s0"
        }))
        .unwrap();
        process_for_guest(&mut p);
        assert_eq!(p.env().as_deref(), Some(&[DEFAULT_PATH.to_string()][..]));
        assert_eq!(p.cwd(), Path::new("/"));
        assert!(p.apparmor_profile().is_none() && p.selinux_label().is_none());
    }

    /// A plain read-only bind with a writable tmpfs below it on the host: the tmpfs becomes a
    /// writable bind of its own right after it; a recursive one gets nothing extra.
    #[test]
    fn mounts_below_a_read_only_bind_keep_their_own_flag() {
        let dir = std::env::temp_dir().join(format!("podvisor-submounts-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("scratch")).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &dir.join("scratch"),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/ro", "type": "bind", "source": dir, "options": ["rbind", "ro", "nosuid"]},
                {"destination": "/rro", "type": "bind", "source": dir, "options": ["rbind", "rro"]},
                {"destination": "/proc", "type": "proc", "source": "proc"}
            ]
        }));
        let binds = host_binds(&s);
        nix::mount::umount(&dir.join("scratch")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let binds = binds.unwrap();
        assert_eq!(binds[0].submounts, vec![(PathBuf::from("scratch"), false)]);
        assert!(binds[1].submounts.is_empty(), "rro makes everything below read-only anyway");
        let (g, _) = for_guest(s, "/r", &binds, &["/g/ro".into(), "/g/rro".into()]);
        let m = g.mounts().as_ref().unwrap();
        let dests: Vec<&Path> = m.iter().map(|m| m.destination().as_path()).collect();
        assert_eq!(dests, [Path::new("/ro"), Path::new("/ro/scratch"), Path::new("/rro"), Path::new("/proc")]);
        assert_eq!(m[1].source().as_deref(), Some(Path::new("/g/ro/scratch")));
        assert_eq!(m[1].options().as_ref().unwrap(), &["nosuid", "rbind", "rw"]);
    }

    #[test]
    fn pod_fields_are_read() {
        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "annotations": {"io.kubernetes.cri.container-type": "container"},
            "mounts": [{"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/x/shm", "options": ["rbind", "rw"]}],
            "linux": {
                "namespaces": [{"type": "network", "path": "/var/run/netns/cni-1"}, {"type": "pid", "path": "/proc/7/ns/pid"}],
                "devices": [{"path": "/dev/null2", "type": "c", "major": 1, "minor": 3}]
            }
        }));
        assert_eq!(netns_path(&s), Some(PathBuf::from("/var/run/netns/cni-1")));
        assert!(joins_pid_namespace(&s));
        assert_eq!(crate::annotations::container_type(&annotations(&s)), Some("container"));
        assert!(host_binds(&s).unwrap().is_empty(), "the pod's /dev/shm is not shared from the host");
        assert!(take_block_devices(&mut s).unwrap().is_empty(), "character devices stay");
        assert_eq!(s.linux().as_ref().unwrap().devices().as_ref().unwrap().len(), 1);
        let (g, _) = for_guest(s, "/r", &[], &[]);
        assert_eq!(g.mounts().as_ref().unwrap()[0].source().as_deref(), Some(Path::new(GUEST_SHM)));
    }

    #[test]
    fn host_namespaces_are_found_missing_or_by_identity() {
        let dir = std::env::temp_dir().join(format!("podvisor-hostns-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A pinned bind of our own (the node's) IPC namespace, as CRI-O makes for hostIPC.
        let pinned = dir.join("ipcns");
        std::fs::write(&pinned, b"").unwrap();
        nix::mount::mount(Some("/proc/self/ns/ipc"), &pinned, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)
            .unwrap();
        let own_pod = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}]}
        }));
        let host = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "annotations": {"io.kubernetes.cri-o.HostNetwork": "true"},
            "linux": {"namespaces": [{"type": "ipc", "path": pinned}, {"type": "network", "path": "/proc/self/ns/net"}]}
        }));
        let found = host_namespaces(&host);
        nix::mount::umount(&pinned).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(host_namespaces(&own_pod).is_empty());
        let options: Vec<&str> = found.iter().map(|h| h.option).collect();
        assert_eq!(options, ["hostNetwork", "hostIPC", "hostPID"], "{found:?}");
        assert!(found[1].evidence.contains("ipcns") && found[1].evidence.contains("node's own"), "{found:?}");
        assert!(found[2].evidence.contains("no pid namespace"), "{found:?}");
    }

    #[test]
    fn memory_empty_dirs_become_guest_tmpfs() {
        let root = std::env::temp_dir().join(format!("podvisor-ed-{}", std::process::id()));
        let vol = root.join("volumes/kubernetes.io~empty-dir/cache");
        let disk = root.join("volumes/kubernetes.io~empty-dir/disk");
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::create_dir_all(&disk).unwrap();
        nix::mount::mount(Some("tmpfs"), &vol, Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>).unwrap();
        let s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "mounts": [
                {"destination": "/cache", "type": "bind", "source": vol, "options": ["rbind"]},
                {"destination": "/disk", "type": "bind", "source": disk, "options": ["rbind"]}
            ]
        }));
        let m = s.mounts().as_ref().unwrap();
        let found = (ephemeral_target(&m[0]), ephemeral_target(&m[1]));
        let binds = host_binds(&s).unwrap();
        nix::mount::umount(&vol).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, (Some(format!("{GUEST_EPHEMERAL}/cache")), None), "only the tmpfs-backed emptyDir");
        assert_eq!(binds.len(), 1, "the disk-backed emptyDir is shared over virtio-fs");
        assert_eq!(binds[0].index, 1);
    }

    #[test]
    fn missing_block_device_is_named() {
        let mut s = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"devices": [{"path": "/dev/xvda", "type": "b", "major": 4095, "minor": 4095}]}
        }));
        let e = take_block_devices(&mut s).unwrap_err().to_string();
        assert!(e.contains("linux.devices[0]") && e.contains("/dev/xvda") && e.contains("4095:4095"), "{e}");
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
