//! Turning the spec the host sent into one libcontainer can run in the guest.
//!
//! The spec arrives as protobuf (`oci::Spec`), is converted by `agent_protocol::convert`, and is
//! then adjusted here as JSON (the `config.json` of the bundle):
//!
//! * `linux.cgroupsPath` is the host's (`/default/<id>`, `kubepods-...:cri-containerd:<id>`):
//!   it is replaced by [`cgroup_path`], an absolute path under `/podvisor/<sandbox>/`.
//! * namespaces ([`Join`]): the `network` namespace is removed altogether, so containers share
//!   the guest's network (the pod network lives in the VM, as with Kata). `ipc` and `uts` join
//!   the pod's shared namespaces (entries added when missing) once CreateSandbox made them.
//!   A `pid` entry joins the sandbox container's pid namespace when the pod shares one, else it
//!   is a new namespace (host paths mean nothing here). Other namespace paths that do not exist
//!   in the guest are dropped (a new namespace is created). A `cgroup` namespace is added when
//!   missing (cgroup v2's default: the container sees its own cgroup on /sys/fs/cgroup).
//! * `net.*` sysctls are taken out of the spec (libcontainer refuses them without a network
//!   namespace of the container's own) and returned in [`Facts`]: the agent applies them to the
//!   guest's network namespace, which is the pod's (as Kata does).
//! * OCI hooks are host programs (Kata runs them on the host): removed.
//! * `noNewPrivileges: false` is removed (libcontainer 0.7 would skip seccomp with it);
//!   AppArmor and SELinux labels are removed (the guest has neither).
//! * `PATH` (containerd's default) and `HOME` (from the rootfs's `/etc/passwd`, else `/`) are set
//!   when missing; `cwd` defaults to `/`.
//! * v1-only memory and realtime CPU settings that cgroup v2 rejects are removed.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

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

/// What normalisation learned about the spec.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The container has its own pid namespace (killing init kills everything in it).
    pub own_pid_ns: bool,
    pub terminal: bool,
    /// Changes worth a log line (dropped namespace paths, hooks, ...).
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

/// Adjusts a runtime spec (as JSON) for libcontainer in the guest; see the module docs.
/// `exists` answers whether a guest path exists (a parameter for tests). Errors name the field.
pub fn normalize(
    spec: &mut Value,
    cgroups_path: &Path,
    join: &Join,
    exists: &dyn Fn(&Path) -> bool,
) -> Result<Facts, String> {
    let mut facts = Facts::default();
    let obj = spec.as_object_mut().ok_or("OCI: not an object")?;
    if obj.get("ociVersion").and_then(Value::as_str).unwrap_or("").is_empty() {
        obj.insert("ociVersion".into(), json!("1.0.2"));
    }
    let root = obj.get("root").and_then(|r| r.get("path")).and_then(Value::as_str).unwrap_or("").to_string();
    if root.is_empty() {
        return Err("OCI.Root.Path: missing".into());
    }
    if !root.starts_with('/') {
        return Err(format!("OCI.Root.Path: {root:?} is not an absolute guest path"));
    }
    if !exists(Path::new(&root)) {
        return Err(format!("OCI.Root.Path: {root} does not exist in the guest (is the rootfs shared?)"));
    }
    if obj.remove("hooks").is_some_and(|h| !h.is_null()) {
        facts.notes.push("OCI hooks removed: they are host programs".into());
    }
    for (i, m) in obj.get("mounts").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let opts: Vec<&str> =
            m.get("options").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        let is_bind =
            m.get("type").and_then(Value::as_str) == Some("bind") || opts.iter().any(|o| *o == "bind" || *o == "rbind");
        let src = m.get("source").and_then(Value::as_str).unwrap_or("");
        if is_bind && !exists(Path::new(src)) {
            let dst = m.get("destination").and_then(Value::as_str).unwrap_or("");
            return Err(format!("OCI.Mounts[{i}].source: bind source {src:?} (for {dst}) does not exist in the guest"));
        }
        let propagates = opts.iter().any(|o| matches!(*o, "rshared" | "shared" | "rslave" | "slave"));
        if is_bind && propagates && !facts.propagated_sources.iter().any(|p| p == Path::new(src)) {
            facts.propagated_sources.push(PathBuf::from(src));
        }
    }
    let process = obj.get_mut("process").ok_or("OCI.Process: missing")?;
    facts.terminal = normalize_process(process, Path::new(&root), "OCI.Process")?;

    let linux = obj.entry("linux").or_insert_with(|| json!({}));
    let linux = linux.as_object_mut().ok_or("OCI.Linux: not an object")?;
    linux.insert("cgroupsPath".into(), json!(cgroups_path.to_string_lossy()));
    // runc's `rshared`/`rslave`/`rprivate`/`runbindable` (what CRI sets for propagated mounts);
    // libcontainer 0.7 knows them without the `r` and applies them recursively anyway.
    if let Some(p) = linux.get("rootfsPropagation").and_then(Value::as_str).map(str::to_string) {
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
        if plain.is_empty() {
            linux.remove("rootfsPropagation");
        } else {
            linux.insert("rootfsPropagation".into(), json!(plain));
        }
    }
    for key in ["mountLabel", "intelRdt"] {
        linux.remove(key);
    }
    let ns = linux.entry("namespaces").or_insert_with(|| json!([]));
    if !ns.is_array() {
        return Err("OCI.Linux.Namespaces: not a list".into());
    }
    let ns = ns.as_array_mut().unwrap();
    let mut kept = Vec::new();
    for mut n in ns.drain(..) {
        let kind = n.get("type").and_then(Value::as_str).unwrap_or("").to_string();
        let host_path = n.get("path").and_then(Value::as_str).filter(|p| !p.is_empty()).map(str::to_string);
        let Some(o) = n.as_object_mut() else { return Err("OCI.Linux.Namespaces: an entry is not an object".into()) };
        let shared = match kind.as_str() {
            "network" => {
                facts.notes.push("network namespace removed: containers use the guest's network".into());
                continue;
            }
            "ipc" => Some(&join.ipc),
            "uts" => Some(&join.uts),
            "pid" => Some(&join.pid),
            _ => None,
        };
        match shared {
            Some(path) => {
                o.remove("path");
                if let Some(p) = path {
                    o.insert("path".into(), json!(p.to_string_lossy()));
                } else if let Some(p) = &host_path {
                    facts.notes.push(format!("{kind} namespace path {p} is the host's: a new namespace is created"));
                }
            }
            None => {
                if let Some(p) = host_path.filter(|p| !exists(Path::new(p))) {
                    facts.notes.push(format!(
                        "{kind} namespace path {p} does not exist in the guest: a new namespace is created"
                    ));
                    o.remove("path");
                }
            }
        }
        if kind == "pid" {
            facts.own_pid_ns = o.get("path").is_none();
        }
        kept.push(n);
    }
    for (kind, path) in [("ipc", &join.ipc), ("uts", &join.uts)] {
        let listed = kept.iter().any(|k| k.get("type").and_then(Value::as_str) == Some(kind));
        if let (false, Some(p)) = (listed, path) {
            facts.notes.push(format!("{kind} namespace added: the container joins the pod's"));
            kept.push(json!({"type": kind, "path": p.to_string_lossy()}));
        }
    }
    if !kept.iter().any(|k| k.get("type").and_then(Value::as_str) == Some("cgroup")) {
        // The guest is cgroup v2 only, where a private cgroup namespace is the default
        // (containerd and Docker on v2 hosts): the container sees its own cgroup (memory.max,
        // cpu.max) on /sys/fs/cgroup, not the guest's tree. A v1 host's spec has no entry.
        facts.notes.push("cgroup namespace added: the container sees its own cgroup".into());
        kept.push(json!({"type": "cgroup"}));
    }
    *ns = kept;
    if let Some(sysctl) = linux.get_mut("sysctl").and_then(Value::as_object_mut) {
        let net: Vec<String> =
            sysctl.keys().filter(|k| k.starts_with("net.") || k.starts_with("net/")).cloned().collect();
        for key in net {
            let value = sysctl.remove(&key).unwrap_or_default();
            let value = value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
            facts.net_sysctls.push((key, value));
        }
    }
    if let Some(res) = linux.get_mut("resources").and_then(Value::as_object_mut) {
        if let Some(mem) = res.get_mut("memory").and_then(Value::as_object_mut) {
            for key in ["kernel", "kernelTCP", "swappiness"] {
                mem.remove(key);
            }
        }
        if let Some(cpu) = res.get_mut("cpu").and_then(Value::as_object_mut) {
            for key in ["realtimeRuntime", "realtimePeriod"] {
                if cpu.get(key).and_then(Value::as_i64) == Some(0) {
                    cpu.remove(key);
                }
            }
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

/// The PATH a process gets when its spec has none (containerd's and Docker's default).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Adjusts a process (of the spec or of an exec); returns whether it wants a terminal.
/// `field` prefixes error messages (`OCI.Process`, `ExecProcessRequest.process`).
pub fn normalize_process(process: &mut Value, rootfs: &Path, field: &str) -> Result<bool, String> {
    let p = process.as_object_mut().ok_or(format!("{field}: not an object"))?;
    if p.get("args").and_then(Value::as_array).is_none_or(|a| a.is_empty()) {
        return Err(format!("{field}.Args: empty: nothing to run"));
    }
    let cwd = p.get("cwd").and_then(Value::as_str).unwrap_or("").to_string();
    if cwd.is_empty() {
        p.insert("cwd".into(), json!("/"));
    } else if !cwd.starts_with('/') {
        return Err(format!("{field}.Cwd: {cwd:?} is not absolute"));
    }
    if p.get("noNewPrivileges") == Some(&json!(false)) {
        p.remove("noNewPrivileges");
    }
    for key in ["apparmorProfile", "selinuxLabel"] {
        p.remove(key);
    }
    let uid = p.get("user").and_then(|u| u.get("uid")).and_then(Value::as_u64).unwrap_or(0) as u32;
    let env = p.entry("env").or_insert_with(|| json!([]));
    if let Some(env) = env.as_array_mut() {
        let has = |env: &Vec<Value>, key: &str| env.iter().any(|e| e.as_str().is_some_and(|s| s.starts_with(key)));
        if !has(env, "PATH=") {
            // libcontainer needs PATH to find a bare command (`ctr run --rootfs` sets no env).
            env.push(json!(DEFAULT_PATH));
        }
        if !has(env, "HOME=") {
            env.push(json!(format!("HOME={}", home_dir(rootfs, uid))));
        }
    }
    Ok(p.get("terminal").and_then(Value::as_bool).unwrap_or(false))
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

    fn base() -> Value {
        json!({
            "ociVersion": "1.1.0",
            "root": {"path": "/run/kata-containers/shared/containers/c1/rootfs"},
            "process": {"args": ["sh"], "cwd": "", "noNewPrivileges": false,
                        "apparmorProfile": "cri-containerd.apparmor.d", "user": {"uid": 0, "gid": 0}},
            "hooks": {"prestart": [{"path": "/usr/bin/host-hook"}]},
            "mounts": [{"destination": "/etc/hosts", "type": "bind",
                        "source": "/run/kata-containers/shared/containers/c1-hosts", "options": ["rbind", "ro"]}],
            "linux": {
                "cgroupsPath": "kubepods-besteffort-pod1.slice:cri-containerd:c1",
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"},
                               {"type": "ipc", "path": "/proc/4242/ns/ipc"}, {"type": "mount"}],
                "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"},
                "resources": {"memory": {"limit": 1000000, "swappiness": 0, "kernel": 5},
                              "cpu": {"realtimeRuntime": 0, "shares": 2}}
            }
        })
    }

    fn guest(p: &Path) -> bool {
        p.starts_with("/run/kata-containers/shared")
    }

    #[test]
    fn rewrites_cgroup_path_under_podvisor() {
        assert_eq!(cgroup_path("sb1", "c1"), PathBuf::from("/podvisor/sb1/c1"));
        assert_eq!(cgroup_path("", "c1"), PathBuf::from("/podvisor/sandbox/c1"));
        assert_eq!(cgroup_path("../x", "c1"), PathBuf::from("/podvisor/sandbox/c1"));
        let mut s = base();
        normalize(&mut s, &cgroup_path("sb1", "c1"), &Join::default(), &guest).unwrap();
        assert_eq!(s["linux"]["cgroupsPath"], "/podvisor/sb1/c1");
    }

    #[test]
    fn normalizes_for_the_guest() {
        let mut s = base();
        let facts = normalize(&mut s, Path::new("/podvisor/s/c1"), &Join::default(), &guest).unwrap();
        assert!(facts.own_pid_ns && !facts.terminal);
        assert!(s.get("hooks").is_none());
        let p = &s["process"];
        assert!(p.get("noNewPrivileges").is_none());
        assert!(p.get("apparmorProfile").is_none());
        assert_eq!(p["cwd"], "/");
        assert_eq!(p["env"], json!([DEFAULT_PATH, "HOME=/"]));
        let ns = s["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(
            ns,
            &vec![json!({"type": "pid"}), json!({"type": "ipc"}), json!({"type": "mount"}), json!({"type": "cgroup"})]
        );
        assert_eq!(s["linux"]["resources"]["memory"], json!({"limit": 1000000}));
        assert_eq!(s["linux"]["resources"]["cpu"], json!({"shares": 2}));
        assert!(facts.notes.iter().any(|n| n.contains("/proc/4242/ns/ipc")), "{:?}", facts.notes);
    }

    /// CRI's propagation (`rootfsPropagation` rshared/rslave, mount options) in libcontainer's
    /// words, and the propagated sources listed once.
    #[test]
    fn mount_propagation_is_kept_in_libcontainers_words() {
        let prop = "/run/kata-containers/shared/containers/propagated/ab-vol";
        for (cri, libcontainer) in [("rshared", "shared"), ("rslave", "slave"), ("rprivate", "private")] {
            let mut s = base();
            s["linux"]["rootfsPropagation"] = json!(cri);
            s["mounts"] = json!([
                {"destination": "/a", "type": "bind", "source": prop, "options": ["rbind", "rshared", "rw"]},
                {"destination": "/b", "type": "bind", "source": prop, "options": ["rbind", "rslave", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": "/run/kata-containers/shared/containers/h",
                 "options": ["rbind", "rprivate", "ro"]}
            ]);
            let facts = normalize(&mut s, Path::new("/podvisor/s/c1"), &Join::default(), &guest).unwrap();
            assert_eq!(s["linux"]["rootfsPropagation"], libcontainer);
            assert_eq!(facts.propagated_sources, vec![PathBuf::from(prop)], "once, and not the private one");
        }
        let mut s = base();
        s["linux"]["rootfsPropagation"] = json!("sideways");
        let e = normalize(&mut s, Path::new("/podvisor/s/c1"), &Join::default(), &guest).unwrap_err();
        assert!(e.contains("RootfsPropagation") && e.contains("sideways"), "{e}");
    }

    #[test]
    fn keeps_true_no_new_privileges_and_existing_home() {
        let mut s = base();
        s["process"]["noNewPrivileges"] = json!(true);
        s["process"]["env"] = json!(["PATH=/bin", "HOME=/data"]);
        normalize(&mut s, Path::new("/podvisor/s/c1"), &Join::default(), &guest).unwrap();
        assert_eq!(s["process"]["noNewPrivileges"], true);
        assert_eq!(s["process"]["env"], json!(["PATH=/bin", "HOME=/data"]));
    }

    #[test]
    fn errors_name_the_field() {
        let mut s = base();
        s["root"]["path"] = json!("/nope");
        assert!(normalize(&mut s, Path::new("/x"), &Join::default(), &guest).unwrap_err().starts_with("OCI.Root.Path"));
        let mut s = base();
        s["process"]["args"] = json!([]);
        assert!(normalize(&mut s, Path::new("/x"), &Join::default(), &guest)
            .unwrap_err()
            .starts_with("OCI.Process.Args"));
        let mut s = base();
        s["mounts"][0]["source"] = json!("/host/only");
        let e = normalize(&mut s, Path::new("/x"), &Join::default(), &guest).unwrap_err();
        assert!(e.starts_with("OCI.Mounts[0].source") && e.contains("/etc/hosts"), "{e}");
        let mut s = base();
        s["process"]["cwd"] = json!("relative");
        assert!(normalize(&mut s, Path::new("/x"), &Join::default(), &guest)
            .unwrap_err()
            .starts_with("OCI.Process.Cwd"));
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
        // A host path for pid (containerd's /proc/<pause>/ns/pid) means nothing in the guest,
        // even if such a file happens to exist there.
        let mut s = base();
        s["linux"]["namespaces"] = json!([{"type": "pid", "path": "/run/kata-containers/shared/pidns"}]);
        let f = normalize(&mut s, Path::new("/x"), &Join::default(), &guest).unwrap();
        assert!(f.own_pid_ns);
        assert_eq!(s["linux"]["namespaces"][0], json!({"type": "pid"}));
        let mut s = base();
        s["linux"]["namespaces"] = json!([{"type": "pid"}]);
        let join = Join { pid: Some("/proc/77/ns/pid".into()), ..Join::default() };
        assert!(!normalize(&mut s, Path::new("/x"), &join, &guest).unwrap().own_pid_ns);
        assert_eq!(s["linux"]["namespaces"][0], json!({"type": "pid", "path": "/proc/77/ns/pid"}));
        // No pid entry: the guest's pid namespace (as before), never a joined one.
        let mut s = base();
        s["linux"]["namespaces"] = json!([{"type": "mount"}]);
        assert!(!normalize(&mut s, Path::new("/x"), &join, &guest).unwrap().own_pid_ns);
        assert!(!s["linux"]["namespaces"].as_array().unwrap().iter().any(|n| n["type"] == "pid"));
    }

    #[test]
    fn pod_ipc_and_uts_are_joined_and_added_when_missing() {
        let mut s = base();
        s["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "ipc", "path": "/var/run/ipcns/abc"}, {"type": "uts"},
                                           {"type": "network", "path": "/var/run/netns/x"}, {"type": "mount"}]);
        normalize(&mut s, Path::new("/x"), &pod(), &guest).unwrap();
        assert_eq!(
            s["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "ipc", "path": "/run/kata-containers/sharedns/ipc"},
                   {"type": "uts", "path": "/run/kata-containers/sharedns/uts"}, {"type": "mount"}, {"type": "cgroup"}])
        );
        let mut s = base();
        s["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "cgroup"}]);
        normalize(&mut s, Path::new("/x"), &pod(), &guest).unwrap();
        assert_eq!(
            s["linux"]["namespaces"],
            json!([{"type": "mount"}, {"type": "cgroup"}, {"type": "ipc", "path": "/run/kata-containers/sharedns/ipc"},
                   {"type": "uts", "path": "/run/kata-containers/sharedns/uts"}])
        );
    }

    #[test]
    fn net_sysctls_are_taken_out_for_the_guest() {
        let mut s = base();
        s["linux"]["sysctl"] = json!({"net.ipv4.ip_unprivileged_port_start": "0", "net.ipv4.ping_group_range": "0 2147483647",
                                       "kernel.shm_rmid_forced": "1"});
        let f = normalize(&mut s, Path::new("/x"), &pod(), &guest).unwrap();
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
        let mut s = base();
        s["process"]["oomScoreAdj"] = json!(-998);
        normalize(&mut s, Path::new("/x"), &pod(), &guest).unwrap();
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
