//! What the agent applies to the spec the shim sent before libcontainer runs it: only facts
//! the guest alone knows, on the typed [`Spec`] that `agent_protocol::convert` makes (no JSON
//! editing, one conversion).
//!
//! # Who owns which rule
//!
//! Every rule that turns a host's OCI spec into the spec run in the guest has exactly one
//! owner. The same list is in the docs of the shim's `spec` module.
//!
//! Shim (`shim/src/spec.rs`, `for_guest` / `process_for_guest`, on the host's typed spec):
//! * `root.path` → the rootfs's path on the virtio-fs share; bind sources → their share paths;
//!   the mounts below a plain `ro` bind → binds of their own with their own flag;
//! * the pod's `/dev/shm` → the guest's pod tmpfs; memory-backed emptyDirs → guest tmpfs;
//! * block devices (`linux.devices` of type `b`) taken out: they are hot-plugged;
//! * namespaces: host paths dropped, the `network` entry removed (the pod network is the VM's),
//!   a `cgroup` entry added when missing (cgroup v2's default);
//! * OCI hooks removed (host programs); AppArmor profile, SELinux labels and Intel RDT removed
//!   (the VM has none of them);
//! * an empty `ociVersion` becomes `1.0.2` (libcontainer runs 1.x specs only);
//! * cgroup-v1-only memory settings (`kernel`, `kernelTCP`, `swappiness`) removed: the guest is
//!   cgroup v2;
//! * process (of the spec and of every exec): `PATH` set when missing, empty `cwd` → `/`.
//!
//! `agent_protocol::convert` (the protobuf has no presence): `noNewPrivileges: false` and
//! zero realtime CPU settings arrive as absent (libcontainer 0.7 would skip seccomp with an
//! explicit `false`).
//!
//! Agent (this module; guest-local facts):
//! * `linux.cgroupsPath` → [`cgroup_path`], `/podvisor/<sandbox>/<id>` in the guest's tree;
//! * `ipc` and `uts` join the pod's namespaces made by CreateSandbox (entries added when
//!   missing); a `pid` entry joins the sandbox container's pid namespace when the pod shares
//!   one ([`Join`]), else it is new ([`Facts::own_pid_ns`]);
//! * `rootfsPropagation` in libcontainer 0.7's words (`rshared` → `shared`, ...);
//! * `net.*` sysctls taken out (libcontainer refuses them without a network namespace of the
//!   container's own) and returned in [`Facts`]: the agent writes them to the guest's network
//!   namespace, which is the pod's (as Kata does);
//! * bind sources with shared or slave propagation listed in [`Facts::propagated_sources`]
//!   (made shared mounts in the guest);
//! * `HOME` from the guest rootfs's `/etc/passwd` (else `/`) when missing, for the spec's
//!   process and every exec;
//! * hot-plugged block devices: the guest's node (its own major:minor) and an allow rule
//!   (`device::add_to_spec`).
//!
//! Checks the agent keeps (sane rejection, errors name the field): `root.path` absolute and
//! present in the guest, bind sources present in the guest, `process.args` not empty, `cwd`
//! absolute, `linux` present, no namespace path from the host (the shim drops them; the agent
//! joins only the pod's), `rootfsPropagation` a known mode, sysctl keys inside `/proc/sys`,
//! ids safe as file names.

use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Process, Spec};

/// The guest cgroup (relative to the cgroup2 mount) of a container: `/podvisor/<sandbox>/<id>`.
pub fn cgroup_path(sandbox_id: &str, container_id: &str) -> PathBuf {
    let sandbox = if valid_id(sandbox_id) { sandbox_id } else { "sandbox" };
    PathBuf::from("/podvisor").join(sandbox).join(container_id)
}

/// Container and exec ids become file and cgroup names: `[A-Za-z0-9_.-]`, at most 256 bytes,
/// not `.` or `..`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id != "."
        && id != ".."
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// What the agent learned about the spec while applying its rules.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The container has its own pid namespace (killing init kills everything in it).
    pub own_pid_ns: bool,
    pub terminal: bool,
    /// Changes worth a log line (namespaces joined, ...).
    pub notes: Vec<String>,
    /// `net.*` sysctls taken out of the spec, for the guest's network namespace.
    pub net_sysctls: Vec<(String, String)>,
    /// Guest sources of bind mounts with shared or slave propagation: they must be shared
    /// mounts in the guest, so that the pod's containers bound to one see each other's mounts.
    pub propagated_sources: Vec<PathBuf>,
}

/// The namespaces a container joins instead of creating them (guest paths).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Join {
    /// The pod's IPC namespace (None: before CreateSandbox, a new one).
    pub ipc: Option<PathBuf>,
    /// The pod's UTS namespace.
    pub uts: Option<PathBuf>,
    /// The pid namespace to join (the sandbox container's) when the spec has a `pid` entry.
    pub pid: Option<PathBuf>,
}

fn is_bind(typ: Option<&str>, options: &[String]) -> bool {
    typ == Some("bind") || options.iter().any(|o| o == "bind" || o == "rbind")
}

/// Applies the agent's rules (see the module docs) to the spec the shim sent.
/// `exists` answers whether a guest path exists (a parameter for tests). Errors name the field.
pub fn normalize(
    spec: &mut Spec,
    cgroups_path: &Path,
    join: &Join,
    exists: &dyn Fn(&Path) -> bool,
) -> Result<Facts, String> {
    let mut facts = Facts::default();
    let root = spec.root().as_ref().map(|r| r.path().clone()).unwrap_or_default();
    if root.as_os_str().is_empty() {
        return Err("OCI.Root.Path: missing".into());
    }
    if !root.is_absolute() {
        return Err(format!("OCI.Root.Path: {root:?} is not an absolute guest path"));
    }
    if !exists(&root) {
        return Err(format!("OCI.Root.Path: {} does not exist in the guest (is the rootfs shared?)", root.display()));
    }
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let opts = m.options().clone().unwrap_or_default();
        if !is_bind(m.typ().as_deref(), &opts) {
            continue;
        }
        let src = m.source().clone().unwrap_or_default();
        if !exists(&src) {
            return Err(format!(
                "OCI.Mounts[{i}].source: bind source {src:?} (for {}) does not exist in the guest",
                m.destination().display()
            ));
        }
        let propagates = opts.iter().any(|o| matches!(o.as_str(), "rshared" | "shared" | "rslave" | "slave"));
        if propagates && !facts.propagated_sources.contains(&src) {
            facts.propagated_sources.push(src);
        }
    }
    let process = spec.process_mut().as_mut().ok_or("OCI.Process: missing")?;
    facts.terminal = normalize_process(process, &root, "OCI.Process")?;

    let linux = spec.linux_mut().as_mut().ok_or("OCI.Linux: missing")?;
    linux.set_cgroups_path(Some(cgroups_path.to_path_buf()));
    // runc's `rshared`/`rslave`/`rprivate`/`runbindable` (what CRI sets for propagated mounts);
    // libcontainer 0.7 knows them without the `r` and applies them recursively anyway.
    if let Some(p) = linux.rootfs_propagation().clone() {
        let plain = match p.as_str() {
            "rshared" | "shared" => "shared",
            "rslave" | "slave" => "slave",
            "rprivate" | "private" => "private",
            "runbindable" | "unbindable" => "unbindable",
            "" => "",
            other => {
                return Err(format!(
                    "OCI.Linux.RootfsPropagation: {other:?} is not one of shared, slave, private, unbindable \
                     (with or without the leading r)"
                ))
            }
        };
        linux.set_rootfs_propagation((!plain.is_empty()).then(|| plain.to_string()));
    }
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    for (i, n) in namespaces.iter_mut().enumerate() {
        if let Some(p) = n.path() {
            return Err(format!(
                "OCI.Linux.Namespaces[{i}].Path: {} is not a namespace of this guest: the guest joins only the \
                 pod's ipc, uts and pid namespaces (the shim drops the host's paths)",
                p.display()
            ));
        }
        let path = match n.typ() {
            LinuxNamespaceType::Ipc => &join.ipc,
            LinuxNamespaceType::Uts => &join.uts,
            LinuxNamespaceType::Pid => &join.pid,
            _ => continue,
        };
        n.set_path(path.clone());
        if n.typ() == LinuxNamespaceType::Pid {
            facts.own_pid_ns = path.is_none();
        }
    }
    for (typ, path) in [(LinuxNamespaceType::Ipc, &join.ipc), (LinuxNamespaceType::Uts, &join.uts)] {
        if let (false, Some(p)) = (namespaces.iter().any(|n| n.typ() == typ), path) {
            facts.notes.push(format!("{typ:?} namespace added: the container joins the pod's"));
            let mut n = LinuxNamespace::default();
            n.set_typ(typ).set_path(Some(p.clone()));
            namespaces.push(n);
        }
    }
    linux.set_namespaces(Some(namespaces));
    if let Some(sysctl) = linux.sysctl_mut().as_mut() {
        let net: Vec<String> =
            sysctl.keys().filter(|k| k.starts_with("net.") || k.starts_with("net/")).cloned().collect();
        for key in net {
            let value = sysctl.remove(&key).unwrap_or_default();
            facts.net_sysctls.push((key, value));
        }
    }
    Ok(facts)
}

/// The `/proc/sys` file of a sysctl key (`net.ipv4.ping_group_range` →
/// `net/ipv4/ping_group_range`, as runc does). Keys that would leave `/proc/sys` are refused.
pub fn sysctl_file(key: &str) -> Result<PathBuf, String> {
    let rel = key.replace('.', "/");
    if rel.is_empty() || rel.split('/').any(|c| c.is_empty() || c == "..") {
        return Err(format!("sysctl {key:?} is not a valid key"));
    }
    Ok(Path::new("/proc/sys").join(rel))
}

/// Applies the agent's process rules (of the spec or of an exec) and checks the process;
/// returns whether it wants a terminal. `field` prefixes error messages (`OCI.Process`,
/// `process`).
pub fn normalize_process(p: &mut Process, rootfs: &Path, field: &str) -> Result<bool, String> {
    if p.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(format!("{field}.Args: empty: nothing to run"));
    }
    if !p.cwd().is_absolute() {
        return Err(format!("{field}.Cwd: {:?} is not absolute", p.cwd()));
    }
    let mut env = p.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", home_dir(rootfs, p.user().uid())));
        p.set_env(Some(env));
    }
    Ok(p.terminal().unwrap_or(false))
}

/// The home directory of `uid` from `<rootfs>/etc/passwd`, or `/` (runc's rule).
pub fn home_dir(rootfs: &Path, uid: u32) -> String {
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    home_from_passwd(&passwd, uid).unwrap_or_else(|| "/".into())
}

fn home_from_passwd(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 6 && f[2].parse() == Ok(uid) && !f[5].is_empty()).then(|| f[5].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// A spec as the shim sends it (its rules applied), before the agent's.
    fn base() -> Value {
        json!({
            "ociVersion": "1.1.0",
            "root": {"path": "/run/kata-containers/shared/containers/c1/rootfs"},
            "process": {"args": ["sh"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
            "mounts": [{"destination": "/etc/hosts", "type": "bind",
                        "source": "/run/kata-containers/shared/containers/c1-hosts", "options": ["rbind", "ro"]}],
            "linux": {
                "cgroupsPath": "kubepods-besteffort-pod1.slice:cri-containerd:c1",
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}, {"type": "cgroup"}],
                "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"},
                "resources": {"memory": {"limit": 1000000}, "cpu": {"shares": 2}}
            }
        })
    }

    fn typed(v: Value) -> Spec {
        serde_json::from_value(v).unwrap()
    }

    fn guest(p: &Path) -> bool {
        p.starts_with("/run/kata-containers/shared")
    }

    /// Runs the agent's rules on `v`; the result as JSON, for comparisons.
    fn run(v: Value, join: &Join) -> Result<(Value, Facts), String> {
        let mut s = typed(v);
        let facts = normalize(&mut s, Path::new("/podvisor/s/c1"), join, &guest)?;
        Ok((serde_json::to_value(&s).unwrap(), facts))
    }

    fn namespaces(v: &Value) -> Value {
        v["linux"]["namespaces"].clone()
    }

    #[test]
    fn rewrites_cgroup_path_under_podvisor() {
        assert_eq!(cgroup_path("sb1", "c1"), PathBuf::from("/podvisor/sb1/c1"));
        assert_eq!(cgroup_path("", "c1"), PathBuf::from("/podvisor/sandbox/c1"));
        assert_eq!(cgroup_path("../x", "c1"), PathBuf::from("/podvisor/sandbox/c1"));
        let mut s = typed(base());
        normalize(&mut s, &cgroup_path("sb1", "c1"), &Join::default(), &guest).unwrap();
        assert_eq!(s.linux().as_ref().unwrap().cgroups_path().as_deref(), Some(Path::new("/podvisor/sb1/c1")));
    }

    #[test]
    fn applies_only_guest_facts() {
        let (s, facts) = run(base(), &Join::default()).unwrap();
        assert!(facts.own_pid_ns && !facts.terminal);
        assert_eq!(s["process"]["env"], json!(["PATH=/bin", "HOME=/"]));
        assert_eq!(s["process"]["cwd"], "/");
        assert_eq!(namespaces(&s), json!([{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}, {"type": "cgroup"}]));
        assert_eq!(s["linux"]["resources"], json!({"memory": {"limit": 1000000}, "cpu": {"shares": 2}}));
        assert_eq!(s["root"], base()["root"], "the rootfs path is the shim's");
        assert_eq!(s["mounts"], base()["mounts"], "mount sources are the shim's");
        assert!(facts.notes.is_empty(), "{:?}", facts.notes);
    }

    /// CRI's propagation (`rootfsPropagation` rshared/rslave, mount options) in libcontainer's
    /// words, and the propagated sources listed once.
    #[test]
    fn mount_propagation_is_kept_in_libcontainers_words() {
        let prop = "/run/kata-containers/shared/containers/propagated/ab-vol";
        for (cri, libcontainer) in [("rshared", "shared"), ("rslave", "slave"), ("rprivate", "private")] {
            let mut v = base();
            v["linux"]["rootfsPropagation"] = json!(cri);
            v["mounts"] = json!([
                {"destination": "/a", "type": "bind", "source": prop, "options": ["rbind", "rshared", "rw"]},
                {"destination": "/b", "type": "bind", "source": prop, "options": ["rbind", "rslave", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": "/run/kata-containers/shared/containers/h",
                 "options": ["rbind", "rprivate", "ro"]}
            ]);
            let (s, facts) = run(v, &Join::default()).unwrap();
            assert_eq!(s["linux"]["rootfsPropagation"], libcontainer);
            assert_eq!(facts.propagated_sources, vec![PathBuf::from(prop)], "once, and not the private one");
        }
        let mut v = base();
        v["linux"]["rootfsPropagation"] = json!("sideways");
        let e = run(v, &Join::default()).unwrap_err();
        assert!(e.contains("RootfsPropagation") && e.contains("sideways"), "{e}");
    }

    #[test]
    fn keeps_an_existing_home() {
        let mut v = base();
        v["process"]["env"] = json!(["PATH=/bin", "HOME=/data"]);
        let (s, _) = run(v, &Join::default()).unwrap();
        assert_eq!(s["process"]["env"], json!(["PATH=/bin", "HOME=/data"]));
    }

    #[test]
    fn home_comes_from_the_rootfs() {
        let root = std::env::temp_dir().join(format!("podvisor-agent-home-{}", std::process::id()));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33::/var/www:/bin/false\n")
            .unwrap();
        let mut p: Process =
            serde_json::from_value(json!({"args": ["id"], "cwd": "/", "user": {"uid": 33, "gid": 33}})).unwrap();
        let terminal = normalize_process(&mut p, &root, "process");
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(terminal, Ok(false));
        assert_eq!(p.env().as_deref(), Some(&["HOME=/var/www".to_string()][..]));
    }

    #[test]
    fn errors_name_the_field() {
        let cases: [(&str, Value, &str); 7] = [
            ("/root/path", json!("/nope"), "OCI.Root.Path"),
            ("/root/path", json!("relative"), "OCI.Root.Path"),
            ("/process/args", json!([]), "OCI.Process.Args"),
            ("/mounts/0/source", json!("/host/only"), "OCI.Mounts[0].source"),
            ("/process/cwd", json!("relative"), "OCI.Process.Cwd"),
            ("/process/cwd", json!(""), "OCI.Process.Cwd"),
            ("/linux/namespaces/2", json!({"type": "mount", "path": "/proc/1/ns/mnt"}), "OCI.Linux.Namespaces[2].Path"),
        ];
        for (pointer, value, field) in cases {
            let mut v = base();
            *v.pointer_mut(pointer).unwrap() = value;
            let e = run(v, &Join::default()).unwrap_err();
            assert!(e.starts_with(field), "{pointer}: {e}");
        }
        let mut v = base();
        v["mounts"][0]["source"] = json!("/host/only");
        assert!(run(v, &Join::default()).unwrap_err().contains("/etc/hosts"));
        let mut v = base();
        v.as_object_mut().unwrap().remove("linux");
        assert!(run(v, &Join::default()).unwrap_err().starts_with("OCI.Linux: missing"));
    }

    fn pod() -> Join {
        Join {
            ipc: Some("/run/kata-containers/sharedns/ipc".into()),
            uts: Some("/run/kata-containers/sharedns/uts".into()),
            pid: None,
        }
    }

    #[test]
    fn shared_pid_namespace_is_joined_only_when_given() {
        let mut v = base();
        v["linux"]["namespaces"] = json!([{"type": "pid"}]);
        let (s, f) = run(v.clone(), &Join::default()).unwrap();
        assert!(f.own_pid_ns);
        assert_eq!(namespaces(&s), json!([{"type": "pid"}]));
        let join = Join { pid: Some("/proc/77/ns/pid".into()), ..Join::default() };
        let (s, f) = run(v, &join).unwrap();
        assert!(!f.own_pid_ns);
        assert_eq!(namespaces(&s), json!([{"type": "pid", "path": "/proc/77/ns/pid"}]));
        // No pid entry: the guest's pid namespace (as before), never a joined one.
        let mut v = base();
        v["linux"]["namespaces"] = json!([{"type": "mount"}]);
        let (s, f) = run(v, &join).unwrap();
        assert!(!f.own_pid_ns);
        assert_eq!(namespaces(&s), json!([{"type": "mount"}]));
    }

    #[test]
    fn pod_ipc_and_uts_are_joined_and_added_when_missing() {
        let mut v = base();
        v["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]);
        let (s, _) = run(v, &pod()).unwrap();
        assert_eq!(
            namespaces(&s),
            json!([{"type": "pid"}, {"type": "ipc", "path": "/run/kata-containers/sharedns/ipc"},
                   {"type": "uts", "path": "/run/kata-containers/sharedns/uts"}, {"type": "mount"}])
        );
        let mut v = base();
        v["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "cgroup"}]);
        let (s, f) = run(v, &pod()).unwrap();
        assert_eq!(
            namespaces(&s),
            json!([{"type": "mount"}, {"type": "cgroup"}, {"type": "ipc", "path": "/run/kata-containers/sharedns/ipc"},
                   {"type": "uts", "path": "/run/kata-containers/sharedns/uts"}])
        );
        assert_eq!(f.notes.len(), 2, "{:?}", f.notes);
    }

    #[test]
    fn net_sysctls_are_taken_out_for_the_guest() {
        let mut v = base();
        v["linux"]["sysctl"] = json!({"net.ipv4.ip_unprivileged_port_start": "0", "net.ipv4.ping_group_range": "0 2147483647",
                                       "kernel.shm_rmid_forced": "1"});
        let (s, f) = run(v, &pod()).unwrap();
        assert_eq!(s["linux"]["sysctl"], json!({"kernel.shm_rmid_forced": "1"}));
        let mut net = f.net_sysctls.clone();
        net.sort();
        assert_eq!(
            net,
            vec![
                ("net.ipv4.ip_unprivileged_port_start".into(), "0".into()),
                ("net.ipv4.ping_group_range".into(), "0 2147483647".into())
            ]
        );
        assert_eq!(sysctl_file("net.ipv4.ping_group_range").unwrap(), Path::new("/proc/sys/net/ipv4/ping_group_range"));
        assert_eq!(
            sysctl_file("net/ipv4/conf/all/forwarding").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/all/forwarding")
        );
        assert!(sysctl_file("net...x").is_err() && sysctl_file("").is_err() && sysctl_file("net/../x").is_err());
    }

    #[test]
    fn infra_oom_score_adj_is_kept() {
        // CRI-O's infra container: process.oomScoreAdj = -998 is fine inside the guest.
        let mut v = base();
        v["process"]["oomScoreAdj"] = json!(-998);
        let (s, _) = run(v, &pod()).unwrap();
        assert_eq!(s["process"]["oomScoreAdj"], -998);
    }

    #[test]
    fn home_comes_from_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33::/var/www:/bin/false\nnohome:x:5:5:::\n";
        assert_eq!(home_from_passwd(passwd, 0).as_deref(), Some("/root"));
        assert_eq!(home_from_passwd(passwd, 33).as_deref(), Some("/var/www"));
        assert_eq!(home_from_passwd(passwd, 5), None);
        assert_eq!(home_from_passwd(passwd, 1000), None);
    }

    #[test]
    fn ids_are_safe_file_names() {
        assert!(valid_id("0123abc_DEF-1.2"));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(257)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
