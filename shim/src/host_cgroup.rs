//! The pod's cgroup on the host (what Kata calls `sandbox_cgroup_only`): the shim, and with it
//! every process it starts (QEMU, virtiofsd, the vsock daemon), runs in a cgroup at the sandbox
//! container's `linux.cgroupsPath`, below the pod cgroup the kubelet made (`cgroup_parent`). The
//! node then charges the VM to the pod (RuntimeClass overhead plus the containers' requests), and
//! the container managers' pod-level statistics read real numbers from it.
//!
//! Both path forms are understood: cgroupfs (`/kubepods/burstable/pod<uid>/<id>`) and systemd
//! (`kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`, expanded as systemd does to
//! `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`).
//! The directories are made in every mounted hierarchy (each cgroup v1 controller, the v1 named
//! ones and the unified one); the sandbox's own are recorded (for the `delete` of a dead shim)
//! and removed after the VM stopped and the shim moved back, with the parents a shim made (and
//! marked) once they are empty.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A cgroup operation that failed, naming the path.
#[derive(Debug, thiserror::Error)]
#[error("host cgroup {path}: {what}: {source}")]
pub struct CgroupError {
    /// The cgroup directory or file.
    pub path: PathBuf,
    /// What was being done.
    pub what: &'static str,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

/// Why a `linux.cgroupsPath` cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("linux.cgroupsPath {value:?}: {message}")]
pub struct PathError {
    /// The value from the spec.
    pub value: String,
    /// What is wrong.
    pub message: String,
}

/// The cgroup directory (relative to each hierarchy's root) that `linux.cgroupsPath` names:
/// a cgroupfs path as it is, a systemd `slice:prefix:name` expanded. Empty: none.
pub fn relative_path(cgroups_path: &str) -> Result<Option<PathBuf>, PathError> {
    let err = |message: String| PathError { value: cgroups_path.into(), message };
    if cgroups_path.is_empty() {
        return Ok(None);
    }
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    let rel = match parts.as_slice() {
        [path] => PathBuf::from(path.trim_start_matches('/')),
        [slice, prefix, name] => {
            if name.is_empty() {
                return Err(err("the systemd form slice:prefix:name has an empty name".into()));
            }
            let unit = if name.ends_with(".slice") {
                name.to_string()
            } else if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            expand_slice(if slice.is_empty() { "system.slice" } else { slice }).map_err(err)?.join(unit)
        }
        _ => return Err(err("neither a cgroupfs path nor systemd's slice:prefix:name".into())),
    };
    let bad = rel.components().any(|c| !matches!(c, std::path::Component::Normal(_)));
    if bad || rel.as_os_str().is_empty() {
        return Err(err("not a plain path below the cgroup root (no `..`)".into()));
    }
    Ok(Some(rel))
}

/// systemd's slice expansion: `a-b-c.slice` lives at `a.slice/a-b.slice/a-b-c.slice`;
/// `-.slice` is the root.
pub fn expand_slice(slice: &str) -> Result<PathBuf, String> {
    let name = slice.strip_suffix(".slice").ok_or_else(|| format!("{slice:?} is not a systemd slice (*.slice)"))?;
    if name == "-" {
        return Ok(PathBuf::new());
    }
    if name.is_empty() || name.contains('/') || name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err(format!("{slice:?} is not a valid systemd slice name"));
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Ok(path)
}

/// One mounted cgroup hierarchy: its mount point and, from `/proc/self/cgroup`, where this
/// process is in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    root: PathBuf,
    /// v1 controllers or `name=` of the mount (empty for cgroup2).
    controllers: Vec<String>,
    /// This process's cgroup in it (relative).
    current: PathBuf,
}

/// The cgroup hierarchies mounted in this mount namespace, with this process's place in each.
fn hierarchies() -> Vec<Hierarchy> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    // `/proc/cgroups`: the kernel's v1 controllers (`#subsys_name hierarchy num_cgroups enabled`).
    let subsystems = std::fs::read_to_string("/proc/cgroups").unwrap_or_default();
    let known: Vec<&str> =
        subsystems.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_whitespace().next()).collect();
    parse_hierarchies(&mountinfo, &own, &known)
}

/// Hierarchies from `/proc/self/mountinfo` text; `own` is `/proc/self/cgroup`, `known` the v1
/// controller names (a v1 mount's other options, `xattr` and the like, are not controllers).
fn parse_hierarchies(mountinfo: &str, own: &str, known: &[&str]) -> Vec<Hierarchy> {
    // `/proc/self/cgroup`: `id:controllers:path` (cgroup2: `0::path`).
    let mine: Vec<(Vec<String>, PathBuf)> = own
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            let ctrl = if ctrl.is_empty() { Vec::new() } else { ctrl.split(',').map(str::to_string).collect() };
            Some((ctrl, PathBuf::from(path.trim_start_matches('/'))))
        })
        .collect();
    let mut out = Vec::new();
    for l in mountinfo.lines() {
        let Some((left, right)) = l.split_once(" - ") else { continue };
        let mut r = right.split_whitespace();
        let (fstype, _source, options) = (r.next().unwrap_or(""), r.next(), r.next().unwrap_or(""));
        let Some(mount_point) = left.split_whitespace().nth(4) else { continue };
        let controllers: Vec<String> = match fstype {
            "cgroup2" => Vec::new(),
            "cgroup" => {
                options.split(',').filter(|o| o.starts_with("name=") || known.contains(o)).map(str::to_string).collect()
            }
            _ => continue,
        };
        let current = mine
            .iter()
            .find(|(c, _)| {
                let mut a = c.clone();
                let mut b = controllers.clone();
                a.sort();
                b.sort();
                a == b
            })
            .map(|(_, p)| p.clone())
            .unwrap_or_default();
        let root = PathBuf::from(mount_point);
        if !out.iter().any(|h: &Hierarchy| h.root == root) {
            out.push(Hierarchy { root, controllers, current });
        }
    }
    out
}

/// The record a live shim keeps of its cgroup directories, for the `delete` of a dead shim.
const RECORD: &str = "host-cgroup";

/// Where shims mark the parent cgroups they made (a file per directory, named by the SHA-256
/// of its path): parents can be shared by several pods (`/default` of `ctr run`), so whichever
/// pod goes last removes an empty marked parent. Parents without a mark (the kubelet's pod
/// cgroup) are never removed.
pub const PARENT_MARKS: &str = "/run/kata-containers/host-cgroup-parents";

fn mark_of(dir: &Path) -> PathBuf {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    Path::new(PARENT_MARKS).join(hash.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// The sandbox's cgroup in every hierarchy (see the module documentation).
#[derive(Debug)]
pub struct SandboxCgroup {
    rel: PathBuf,
    hierarchies: Vec<Hierarchy>,
    /// The sandbox's own directories (one per hierarchy) made so far.
    leaves: Vec<PathBuf>,
    record: PathBuf,
    entered: bool,
}

impl SandboxCgroup {
    /// Makes `rel` (and any missing parent, marked) in every hierarchy and records its
    /// directories in `<state_dir>/host-cgroup`. Nothing is left behind on failure.
    pub fn create(rel: &Path, state_dir: &Path) -> Result<SandboxCgroup, CgroupError> {
        let mut me = SandboxCgroup {
            rel: rel.to_path_buf(),
            hierarchies: hierarchies(),
            leaves: Vec::new(),
            record: state_dir.join(RECORD),
            entered: false,
        };
        for h in me.hierarchies.clone() {
            // A parent another pod made may vanish between two of our mkdirs: start again.
            let mut attempt = 0;
            let made = loop {
                match me.make_in(&h) {
                    Err(e) if e.source.kind() == std::io::ErrorKind::NotFound && attempt < 5 => attempt += 1,
                    other => break other,
                }
            };
            if let Err(e) = made {
                let _ = me.remove_dirs();
                return Err(e);
            }
        }
        Ok(me)
    }

    fn make_in(&mut self, h: &Hierarchy) -> Result<(), CgroupError> {
        let mut dir = h.root.clone();
        let count = self.rel.components().count();
        for (i, part) in self.rel.components().enumerate() {
            let parent = dir.clone();
            dir.push(part);
            let leaf = i + 1 == count;
            if !dir.is_dir() {
                if !leaf {
                    // Marked before it exists: a concurrent last pod never leaves it unmarked.
                    let mark = mark_of(&dir);
                    std::fs::create_dir_all(PARENT_MARKS)
                        .and_then(|()| std::fs::write(&mark, dir.as_os_str().as_encoded_bytes()))
                        .map_err(|source| CgroupError { path: mark, what: "mark a parent cgroup", source })?;
                }
                match std::fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(CgroupError { path: dir.clone(), what: "mkdir", source }),
                }
                // A new cpuset cgroup has no CPUs or memory nodes: tasks cannot join it until
                // they are copied from the parent (cgroup v1; v2 inherits).
                if h.controllers.iter().any(|c| c == "cpuset") {
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        let value = std::fs::read_to_string(parent.join(file)).unwrap_or_default();
                        std::fs::write(dir.join(file), value.trim()).map_err(|source| CgroupError {
                            path: dir.join(file),
                            what: "copy from the parent",
                            source,
                        })?;
                    }
                }
            }
            if leaf && !self.leaves.contains(&dir) {
                self.leaves.push(dir.clone());
                self.write_record()?;
            }
        }
        Ok(())
    }

    fn write_record(&self) -> Result<(), CgroupError> {
        let text: String = self.leaves.iter().map(|p| format!("{}\n", p.display())).collect();
        std::fs::write(&self.record, text).map_err(|source| CgroupError {
            path: self.record.clone(),
            what: "write the record",
            source,
        })
    }

    /// The directory in each hierarchy.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.hierarchies.iter().map(|h| h.root.join(&self.rel)).collect()
    }

    /// Moves this process (all its threads) into the cgroup; its later children start there.
    pub fn enter(&mut self) -> Result<(), CgroupError> {
        let pid = std::process::id().to_string();
        for dir in self.dirs() {
            let procs = dir.join("cgroup.procs");
            if let Err(source) = std::fs::write(&procs, &pid) {
                self.leave();
                return Err(CgroupError { path: procs, what: "move the shim in", source });
            }
            self.entered = true;
        }
        Ok(())
    }

    /// Moves this process back where it was before [`Self::enter`].
    fn leave(&mut self) {
        if !self.entered {
            return;
        }
        let pid = std::process::id().to_string();
        for h in &self.hierarchies {
            let _ = std::fs::write(h.root.join(&h.current).join("cgroup.procs"), &pid);
        }
        self.entered = false;
    }

    /// Moves the shim back and removes the sandbox's directories and the marked parents left
    /// empty (after the VM's processes are gone; a cgroup with a process in it cannot be
    /// removed: retried for up to 2 s).
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.leave();
        self.remove_dirs()
    }

    fn remove_dirs(&mut self) -> Result<(), CgroupError> {
        let result = remove_leaves(&self.leaves);
        if result.is_ok() {
            let _ = std::fs::remove_file(&self.record);
        }
        self.leaves.clear();
        result
    }
}

impl Drop for SandboxCgroup {
    fn drop(&mut self) {
        self.leave();
        let _ = self.remove_dirs();
    }
}

/// Removes the sandbox's directories (retrying while their last tasks exit), then each marked
/// parent that is empty, walking up.
fn remove_leaves(leaves: &[PathBuf]) -> Result<(), CgroupError> {
    let mut first_error = None;
    for leaf in leaves {
        let deadline = Instant::now() + Duration::from_secs(2);
        let removed = loop {
            match std::fs::remove_dir(leaf) {
                Ok(()) => break true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break true,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(source) => {
                    first_error.get_or_insert(CgroupError { path: leaf.clone(), what: "rmdir", source });
                    break false;
                }
            }
        };
        let mut parent = leaf.parent();
        while let (true, Some(dir)) = (removed, parent) {
            let mark = mark_of(dir);
            if !mark.exists() {
                break;
            }
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Another pod's cgroup is still in it: that pod removes it.
                Err(_) => break,
            }
            let _ = std::fs::remove_file(&mark);
            // Empty: nothing else is marked (a concurrent marker then retries its mkdirs).
            let _ = std::fs::remove_dir(PARENT_MARKS);
            parent = dir.parent();
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// For the `delete` of a dead shim: kills what is still in the recorded cgroups and removes
/// them with their marked empty parents. Returns what it removed.
pub fn remove_recorded(state_dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let record = state_dir.join(RECORD);
    let text = match std::fs::read_to_string(&record) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CgroupError { path: record, what: "read the record", source }),
    };
    let leaves: Vec<PathBuf> = text.lines().filter(|l| !l.is_empty()).map(PathBuf::from).collect();
    for dir in &leaves {
        for pid in std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    remove_leaves(&leaves)?;
    let _ = std::fs::remove_file(&record);
    Ok(leaves)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_and_systemd_paths() {
        let p = |s: &str| relative_path(s).unwrap().map(|p| p.display().to_string());
        assert_eq!(p("/kubepods/burstable/pod123/abc").as_deref(), Some("kubepods/burstable/pod123/abc"));
        assert_eq!(p("crio-abc").as_deref(), Some("crio-abc"), "CRI-O without a parent: relative");
        assert_eq!(
            p("kubepods-burstable-pod123.slice:cri-containerd:abc").as_deref(),
            Some("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod123.slice/cri-containerd-abc.scope")
        );
        assert_eq!(p("kubepods-pod1.slice:crio:x").as_deref(), Some("kubepods.slice/kubepods-pod1.slice/crio-x.scope"));
        assert_eq!(p(":crio:x").as_deref(), Some("system.slice/crio-x.scope"));
        assert_eq!(p(""), None);
        for bad in ["/a/../b", "a:b", "noslice:crio:x", "-.x.slice:p:n", "a--b.slice:p:n"] {
            assert!(relative_path(bad).is_err(), "{bad}");
        }
        assert_eq!(expand_slice("-.slice").unwrap(), PathBuf::new());
    }

    /// Two sandboxes below one parent the first one made: the parent goes with the last of
    /// them, in every hierarchy; a parent someone else made (the kubelet's) stays.
    #[test]
    fn a_shared_parent_goes_with_the_last_pod_and_a_foreign_one_stays() {
        let top = format!("podvisor-unit-cg-{}", std::process::id());
        let state = std::env::temp_dir().join(&top);
        std::fs::create_dir_all(state.join("a")).unwrap();
        std::fs::create_dir_all(state.join("b")).unwrap();
        let a = SandboxCgroup::create(&Path::new(&top).join("default/a"), &state.join("a")).unwrap();
        let b = SandboxCgroup::create(&Path::new(&top).join("default/b"), &state.join("b")).unwrap();
        let roots: Vec<PathBuf> = hierarchies().into_iter().map(|h| h.root).collect();
        assert!(!roots.is_empty());
        let exists = |rel: &str| roots.iter().all(|r| r.join(&top).join(rel).is_dir());
        let gone = |rel: &str| roots.iter().all(|r| !r.join(&top).join(rel).exists());
        assert!(exists("default/a") && exists("default/b"));
        assert_eq!(std::fs::read_to_string(state.join("a").join(RECORD)).unwrap().lines().count(), roots.len());
        a.remove().unwrap();
        assert!(gone("default/a") && exists("default"), "b still uses the parent");
        b.remove().unwrap();
        assert!(gone(""), "the parents a made went with the last pod");
        assert!(!state.join("b").join(RECORD).exists());
        // The kubelet's pod cgroup: made before, not marked, left alone.
        for r in &roots {
            std::fs::create_dir_all(r.join(&top).join("kubepods")).unwrap();
        }
        let c = SandboxCgroup::create(&Path::new(&top).join("kubepods/c"), &state.join("a")).unwrap();
        drop(c);
        assert!(gone("kubepods/c") && exists("kubepods"));
        for r in &roots {
            std::fs::remove_dir(r.join(&top).join("kubepods")).unwrap();
            std::fs::remove_dir(r.join(&top)).unwrap();
        }
        std::fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn hierarchies_and_own_places_are_read() {
        let mountinfo = "30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                         31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                         32 25 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n\
                         33 25 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n\
                         34 25 0:30 / /tmp rw - tmpfs tmpfs rw\n";
        let own = "4:memory:/process_api/x\n1:cpu:/\n9:name=systemd:/\n0::/\n";
        let h = parse_hierarchies(mountinfo, own, &["cpu", "cpuacct", "memory"]);
        assert_eq!(h.len(), 4);
        assert_eq!(h[1].root, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(h[1].current, Path::new("process_api/x"));
        assert_eq!(h[2].controllers, ["name=systemd"], "xattr is a mount option");
        assert_eq!(h[3].current, Path::new(""));
        assert!(h[3].controllers.is_empty());
    }
}
