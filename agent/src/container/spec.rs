//! Turning the spec the host sent into one libcontainer can run in the guest.
//!
//! The spec arrives as protobuf (`oci::Spec`), is converted by `agent_protocol::convert`, and is
//! then adjusted here as JSON (the `config.json` of the bundle):
//!
//! * `linux.cgroupsPath` is the host's (`/default/<id>`, `kubepods-...:cri-containerd:<id>`):
//!   it is replaced by [`cgroup_path`], an absolute path under `/podvisor/<sandbox>/`.
//! * namespace paths name host files: a path that does not exist in the guest is dropped (a new
//!   namespace is created); the `network` namespace is removed altogether, so containers share
//!   the guest's network (the pod network lives in the VM, as with Kata).
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
    pub has_seccomp: bool,
    /// The container has its own pid namespace (killing init kills everything in it).
    pub own_pid_ns: bool,
    pub terminal: bool,
    /// Changes worth a log line (dropped namespace paths, hooks, ...).
    pub notes: Vec<String>,
}

/// Adjusts a runtime spec (as JSON) for libcontainer in the guest; see the module docs.
/// `exists` answers whether a guest path exists (a parameter for tests). Errors name the field.
pub fn normalize(spec: &mut Value, cgroups_path: &Path, exists: &dyn Fn(&Path) -> bool) -> Result<Facts, String> {
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
        let is_bind = m.get("type").and_then(Value::as_str) == Some("bind") || opts.iter().any(|o| *o == "bind" || *o == "rbind");
        let src = m.get("source").and_then(Value::as_str).unwrap_or("");
        if is_bind && !exists(Path::new(src)) {
            let dst = m.get("destination").and_then(Value::as_str).unwrap_or("");
            return Err(format!("OCI.Mounts[{i}].source: bind source {src:?} (for {dst}) does not exist in the guest"));
        }
    }
    let process = obj.get_mut("process").ok_or("OCI.Process: missing")?;
    facts.terminal = normalize_process(process, Path::new(&root), "OCI.Process")?;

    let linux = obj.entry("linux").or_insert_with(|| json!({}));
    let linux = linux.as_object_mut().ok_or("OCI.Linux: not an object")?;
    linux.insert("cgroupsPath".into(), json!(cgroups_path.to_string_lossy()));
    for key in ["mountLabel", "intelRdt"] {
        linux.remove(key);
    }
    facts.has_seccomp = linux.get("seccomp").is_some_and(|s| !s.is_null());
    if let Some(ns) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
        let mut kept = Vec::new();
        for mut n in ns.drain(..) {
            let kind = n.get("type").and_then(Value::as_str).unwrap_or("").to_string();
            if kind == "network" {
                facts.notes.push("network namespace removed: containers use the guest's network".into());
                continue;
            }
            if let Some(p) = n.get("path").and_then(Value::as_str).map(str::to_string) {
                if !exists(Path::new(&p)) {
                    facts.notes.push(format!("{kind} namespace path {p} does not exist in the guest: a new namespace is created"));
                    n.as_object_mut().map(|o| o.remove("path"));
                }
            }
            if kind == "pid" {
                facts.own_pid_ns = n.get("path").is_none();
            }
            kept.push(n);
        }
        *ns = kept;
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
        normalize(&mut s, &cgroup_path("sb1", "c1"), &guest).unwrap();
        assert_eq!(s["linux"]["cgroupsPath"], "/podvisor/sb1/c1");
    }

    #[test]
    fn normalizes_for_the_guest() {
        let mut s = base();
        let facts = normalize(&mut s, Path::new("/podvisor/s/c1"), &guest).unwrap();
        assert!(facts.has_seccomp && facts.own_pid_ns && !facts.terminal);
        assert!(s.get("hooks").is_none());
        let p = &s["process"];
        assert!(p.get("noNewPrivileges").is_none());
        assert!(p.get("apparmorProfile").is_none());
        assert_eq!(p["cwd"], "/");
        assert_eq!(p["env"], json!([DEFAULT_PATH, "HOME=/"]));
        let ns = s["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(ns, &vec![json!({"type": "pid"}), json!({"type": "ipc"}), json!({"type": "mount"})]);
        assert_eq!(s["linux"]["resources"]["memory"], json!({"limit": 1000000}));
        assert_eq!(s["linux"]["resources"]["cpu"], json!({"shares": 2}));
        assert!(facts.notes.iter().any(|n| n.contains("/proc/4242/ns/ipc")), "{:?}", facts.notes);
    }

    #[test]
    fn keeps_true_no_new_privileges_and_existing_home() {
        let mut s = base();
        s["process"]["noNewPrivileges"] = json!(true);
        s["process"]["env"] = json!(["PATH=/bin", "HOME=/data"]);
        normalize(&mut s, Path::new("/podvisor/s/c1"), &guest).unwrap();
        assert_eq!(s["process"]["noNewPrivileges"], true);
        assert_eq!(s["process"]["env"], json!(["PATH=/bin", "HOME=/data"]));
    }

    #[test]
    fn errors_name_the_field() {
        let mut s = base();
        s["root"]["path"] = json!("/nope");
        assert!(normalize(&mut s, Path::new("/x"), &guest).unwrap_err().starts_with("OCI.Root.Path"));
        let mut s = base();
        s["process"]["args"] = json!([]);
        assert!(normalize(&mut s, Path::new("/x"), &guest).unwrap_err().starts_with("OCI.Process.Args"));
        let mut s = base();
        s["mounts"][0]["source"] = json!("/host/only");
        let e = normalize(&mut s, Path::new("/x"), &guest).unwrap_err();
        assert!(e.starts_with("OCI.Mounts[0].source") && e.contains("/etc/hosts"), "{e}");
        let mut s = base();
        s["process"]["cwd"] = json!("relative");
        assert!(normalize(&mut s, Path::new("/x"), &guest).unwrap_err().starts_with("OCI.Process.Cwd"));
    }

    #[test]
    fn shared_pid_namespace_is_detected() {
        let mut s = base();
        s["linux"]["namespaces"] = json!([{"type": "pid", "path": "/run/kata-containers/shared/pidns"}]);
        assert!(!normalize(&mut s, Path::new("/x"), &guest).unwrap().own_pid_ns);
        let mut s = base();
        s["linux"]["namespaces"] = json!([{"type": "mount"}]);
        assert!(!normalize(&mut s, Path::new("/x"), &guest).unwrap().own_pid_ns);
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
