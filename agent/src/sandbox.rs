//! Sandbox-level guest setup: storages (mounts the host asks for), the hostname, and what the
//! containers of a pod share: IPC and UTS namespaces and the `/dev/shm` tmpfs.
//!
//! * Shared namespaces: a short-lived thread `unshare`s CLONE_NEWIPC | CLONE_NEWUTS (allowed in a
//!   multi-threaded process: they are per task), sets the pod hostname in the new UTS namespace
//!   and bind-mounts its `/proc/<pid>/task/<tid>/ns/{ipc,uts}` on `SHARED_NS_DIR/{ipc,uts}`,
//!   which keeps the namespaces alive after the thread ends. Containers join them by path.
//! * `/dev/shm`: a tmpfs at [`SANDBOX_SHM`] (mode 1777, 64 MiB unless the host sent its own
//!   storage for that mount point); the shim rewrites each container's `/dev/shm` bind mount to
//!   it.
//!
//! Storage drivers: `virtio-fs` (the shared directory, `kataShared`, fstype `virtiofs`),
//! `local` (a tmpfs when fstype is `tmpfs`, else a plain directory, as in Kata) and
//! `ephemeral` (a tmpfs). Mount points are created (`mkdir -p`). Options are mount(8) words:
//! flags (`ro`, `nosuid`, `nodev`, `noexec`, `relatime`, ...) and the rest as data.

use std::path::{Path, PathBuf};

use agent_protocol::agent as pb;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A storage the agent mounted (to unmount later), or only created (a `local` directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    pub mount_point: PathBuf,
    pub mounted: bool,
    /// Directories removed after the unmount (a guest-pull rootfs's upper/work).
    pub cleanup: Vec<PathBuf>,
}

/// What to call `mount(2)` with for one storage.
#[derive(Debug, PartialEq, Eq)]
pub struct MountPlan {
    pub source: String,
    pub fstype: Option<String>,
    pub flags: MsFlags,
    pub data: String,
    pub mount_point: PathBuf,
}

/// Checks a storage and works out its mount; `Ok(None)` for a plain `local` directory.
/// Errors name the field.
pub fn plan(s: &pb::Storage, index: usize) -> Result<Option<MountPlan>, String> {
    let field = |f: &str| format!("storages[{index}].{f}");
    if s.mount_point.is_empty() || !s.mount_point.starts_with('/') {
        return Err(format!("{}: {:?} is not an absolute guest path", field("mount_point"), s.mount_point));
    }
    let (flags, data) = parse_options(&s.options);
    let fstype = match (s.driver.as_str(), s.fstype.as_str()) {
        ("virtio-fs", "virtiofs" | "") => "virtiofs",
        ("virtio-fs", other) => {
            return Err(format!("{}: {other:?} (driver virtio-fs needs virtiofs)", field("fstype")))
        }
        ("local", "tmpfs") | ("ephemeral", _) => "tmpfs",
        ("local", _) => return Ok(None),
        (other, _) => {
            return Err(format!(
                "{}: driver {other:?} is not supported here (virtio-fs, local, ephemeral; {} only at CreateContainer)",
                field("driver"),
                crate::image::DRIVER
            ))
        }
    };
    let source = match (fstype, s.source.as_str()) {
        ("virtiofs", "") => return Err(format!("{}: the virtio-fs tag is missing", field("source"))),
        ("tmpfs", "") => "tmpfs".to_string(),
        (_, src) => src.to_string(),
    };
    Ok(Some(MountPlan { source, fstype: Some(fstype.into()), flags, data, mount_point: PathBuf::from(&s.mount_point) }))
}

/// Splits mount(8) options into flags and file-system data.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    (flags, data.join(","))
}

/// Mounts the storages in order; on failure, unmounts what this call mounted.
pub fn mount_storages(storages: &[pb::Storage]) -> Result<Vec<Mounted>, String> {
    let mut done = Vec::new();
    for (i, s) in storages.iter().enumerate() {
        match mount_one(s, i) {
            Ok(m) => done.push(m),
            Err(e) => {
                unmount_all(&done);
                return Err(e);
            }
        }
    }
    Ok(done)
}

fn mount_one(s: &pb::Storage, index: usize) -> Result<Mounted, String> {
    let plan = plan(s, index)?;
    let mount_point = PathBuf::from(&s.mount_point);
    std::fs::create_dir_all(&mount_point)
        .map_err(|e| format!("storages[{index}]: mkdir {}: {e}", mount_point.display()))?;
    let Some(p) = plan else {
        return Ok(Mounted { mount_point, mounted: false, cleanup: Vec::new() });
    };
    // `ephemeral` storages (emptyDir volumes with medium Memory) belong to the pod: the first
    // container mounts the tmpfs, later ones share it, and removing a container never unmounts
    // it (it goes with the VM).
    let pod_lifetime = s.driver == "ephemeral" && mount_point.starts_with(POD_EPHEMERAL_DIR);
    if pod_lifetime && is_mount_point(&mount_point) {
        return Ok(Mounted { mount_point, mounted: false, cleanup: Vec::new() });
    }
    let data = (!p.data.is_empty()).then_some(p.data.as_str());
    mount(Some(p.source.as_str()), &p.mount_point, p.fstype.as_deref(), p.flags, data).map_err(|e| {
        format!(
            "storages[{index}]: mount {} ({}) on {}: {e}",
            p.source,
            p.fstype.as_deref().unwrap_or("?"),
            p.mount_point.display()
        )
    })?;
    Ok(Mounted { mount_point, mounted: !pod_lifetime, cleanup: Vec::new() })
}

/// Unmounts in reverse order (lazily: a busy mount is detached, never left behind).
pub fn unmount_all(mounted: &[Mounted]) -> Vec<String> {
    let mut errors = Vec::new();
    for m in mounted.iter().rev() {
        if m.mounted {
            if let Err(e) = umount2(&m.mount_point, MntFlags::MNT_DETACH) {
                errors.push(format!("unmount {}: {e}", m.mount_point.display()));
                continue;
            }
        }
        for dir in &m.cleanup {
            if let Err(e) = crate::image::remove_dir_if_not_mounted(dir) {
                errors.push(e);
            }
        }
    }
    errors
}

/// [`mount_storages`] for CreateContainer: the guest-pull storages (driver
/// [`crate::image::DRIVER`]) are left out, they are mounted by [`crate::image`] first.
pub fn mount_storages_except_pulled(storages: &[pb::Storage]) -> Result<Vec<Mounted>, String> {
    let mut done = Vec::new();
    for (i, s) in storages.iter().enumerate().filter(|(_, s)| s.driver != crate::image::DRIVER) {
        match mount_one(s, i) {
            Ok(m) => done.push(m),
            Err(e) => {
                unmount_all(&done);
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Makes `path` a shared mount, bound onto itself first when it is not a mount point yet (a
/// virtio-fs submount of the share is mounted on first access, which the `stat` makes happen):
/// mounts made below it in one container (CRI Bidirectional) then reach the guest and the pod's
/// other containers bound to it (Bidirectional or HostToContainer).
pub fn make_shared_mount(path: &Path) -> Result<(), String> {
    std::fs::metadata(path).map_err(|e| format!("propagated mount source {}: {e}", path.display()))?;
    let listed = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*path.to_string_lossy()));
    if !listed {
        mount(Some(path), path, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .map_err(|e| format!("bind {} onto itself: {e}", path.display()))?;
    }
    mount(None::<&str>, path, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
        .map_err(|e| format!("make {} a shared mount: {e}", path.display()))
}

/// Whether `path` is a mount point (its device differs from its parent's).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), path.parent().map(std::fs::metadata)) {
        (Ok(m), Some(Ok(parent))) => m.dev() != parent.dev(),
        _ => false,
    }
}

/// Where container storages of driver `ephemeral` (memory-backed emptyDir volumes) live: they
/// belong to the pod, are shared by its containers, and go at DestroySandbox.
pub const POD_EPHEMERAL_DIR: &str = "/run/kata-containers/sandbox/ephemeral";

/// Unmounts the pod's ephemeral volumes and removes their directory.
pub fn remove_pod_ephemeral() -> Vec<String> {
    let mut errors = Vec::new();
    let dir = Path::new(POD_EPHEMERAL_DIR);
    let Ok(entries) = std::fs::read_dir(dir) else { return errors };
    for e in entries.flatten() {
        let p = e.path();
        if is_mount_point(&p) {
            if let Err(err) = umount2(&p, MntFlags::MNT_DETACH) {
                errors.push(format!("unmount {}: {err}", p.display()));
            }
        }
        let _ = std::fs::remove_dir(&p);
    }
    remove_empty_dirs(dir, Path::new("/run"));
    errors
}

/// Where the pod's shared namespaces are pinned (`ipc`, `uts`).
pub const SHARED_NS_DIR: &str = "/run/kata-containers/sharedns";
/// The pod's `/dev/shm` in the guest (the shim points every container's `/dev/shm` here).
pub const SANDBOX_SHM: &str = "/run/kata-containers/sandbox/shm";
/// Size of the pod's `/dev/shm` when the host sends none (Kata's and Docker's 64 MiB default).
pub const SANDBOX_SHM_SIZE: u64 = 64 << 20;

/// The namespaces every container of the pod joins: bind mounts of nsfs files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedNamespaces {
    pub ipc: PathBuf,
    pub uts: PathBuf,
}

impl SharedNamespaces {
    fn files(&self) -> [(&'static str, &Path); 2] {
        [("ipc", &self.ipc), ("uts", &self.uts)]
    }
}

/// Creates the pod's IPC and UTS namespaces, pinned on `dir/ipc` and `dir/uts`, with
/// `hostname` (if not empty) set in the new UTS namespace. All or nothing.
pub fn create_shared_namespaces(dir: &Path, hostname: &str) -> Result<SharedNamespaces, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let ns = SharedNamespaces { ipc: dir.join("ipc"), uts: dir.join("uts") };
    for (_, f) in ns.files() {
        std::fs::File::create(f).map_err(|e| format!("create {}: {e}", f.display()))?;
    }
    let (targets, name) = (ns.clone(), hostname.to_string());
    // A thread of its own: unshare changes only the calling task, which ends right after.
    let result = std::thread::Builder::new()
        .name("pod-namespaces".into())
        .spawn(move || -> Result<(), String> {
            use nix::sched::{unshare, CloneFlags};
            unshare(CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
                .map_err(|e| format!("unshare(CLONE_NEWIPC|CLONE_NEWUTS): {e}"))?;
            if !name.is_empty() {
                nix::unistd::sethostname(&name)
                    .map_err(|e| format!("sethostname {name:?} in the pod's UTS namespace: {e}"))?;
            }
            let task = format!("/proc/{}/task/{}/ns", std::process::id(), nix::unistd::gettid());
            for (kind, target) in targets.files() {
                let src = format!("{task}/{kind}");
                mount(Some(src.as_str()), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                    .map_err(|e| format!("bind-mount {src} on {}: {e}", target.display()))?;
            }
            Ok(())
        })
        .map_err(|e| format!("spawn the namespace thread: {e}"))
        .and_then(|t| t.join().unwrap_or_else(|_| Err("the namespace thread panicked".into())));
    if let Err(e) = result {
        remove_shared_namespaces(&ns);
        return Err(e);
    }
    Ok(ns)
}

/// Unmounts and removes the namespace files and their directory (if empty). Returns errors
/// worth a log line; a file that is not mounted is fine.
pub fn remove_shared_namespaces(ns: &SharedNamespaces) -> Vec<String> {
    let mut errors = Vec::new();
    for (_, f) in ns.files() {
        match umount2(f, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => errors.push(format!("unmount {}: {e}", f.display())),
        }
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("remove {}: {e}", f.display())),
        }
    }
    if let Some(dir) = ns.ipc.parent() {
        let _ = std::fs::remove_dir(dir);
    }
    errors
}

/// Whether one of the storages is the pod's `/dev/shm`.
pub fn has_shm_storage(storages: &[pb::Storage]) -> bool {
    storages.iter().any(|s| Path::new(&s.mount_point) == Path::new(SANDBOX_SHM))
}

/// The storage the agent mounts for the pod's `/dev/shm` when the host sent none.
pub fn default_shm_storage() -> pb::Storage {
    pb::Storage {
        driver: "ephemeral".into(),
        fstype: "tmpfs".into(),
        source: "shm".into(),
        mount_point: SANDBOX_SHM.into(),
        options: ["nosuid", "nodev", "noexec", "mode=1777"]
            .iter()
            .map(|s| s.to_string())
            .chain([format!("size={SANDBOX_SHM_SIZE}")])
            .collect(),
        ..Default::default()
    }
}

/// Removes `dir` and then its parents up to (not including) `stop`, while they are empty.
pub fn remove_empty_dirs(dir: &Path, stop: &Path) {
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d == stop || !d.starts_with(stop) || std::fs::remove_dir(d).is_err() {
            break;
        }
        cur = d.parent();
    }
}

/// Sets the guest's hostname (empty: leave it).
pub fn set_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Ok(());
    }
    nix::unistd::sethostname(name).map_err(|e| format!("hostname: sethostname {name:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(driver: &str, fstype: &str, source: &str, mp: &str, opts: &[&str]) -> pb::Storage {
        pb::Storage {
            driver: driver.into(),
            fstype: fstype.into(),
            source: source.into(),
            mount_point: mp.into(),
            options: opts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn virtio_fs_share_plan() {
        let s = storage("virtio-fs", "virtiofs", "kataShared", "/run/kata-containers/shared/containers/", &[]);
        let p = plan(&s, 0).unwrap().unwrap();
        assert_eq!(
            (p.source.as_str(), p.fstype.as_deref(), p.flags, p.data.as_str()),
            ("kataShared", Some("virtiofs"), MsFlags::empty(), "")
        );
    }

    #[test]
    fn local_tmpfs_and_plain_directory() {
        let p =
            plan(&storage("local", "tmpfs", "", "/run/x", &["nodev", "size=10m", "mode=0755"]), 0).unwrap().unwrap();
        assert_eq!((p.source.as_str(), p.flags, p.data.as_str()), ("tmpfs", MsFlags::MS_NODEV, "size=10m,mode=0755"));
        assert_eq!(plan(&storage("local", "", "", "/run/dir", &[]), 0).unwrap(), None);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(plan(&storage("blk", "ext4", "/dev/vda", "/x", &[]), 2).unwrap_err().starts_with("storages[2].driver"));
        assert!(plan(&storage("virtio-fs", "virtiofs", "tag", "rel", &[]), 0)
            .unwrap_err()
            .starts_with("storages[0].mount_point"));
        assert!(plan(&storage("virtio-fs", "virtiofs", "", "/x", &[]), 0)
            .unwrap_err()
            .starts_with("storages[0].source"));
    }

    #[test]
    fn default_shm_is_a_64m_world_writable_tmpfs() {
        let s = default_shm_storage();
        assert!(has_shm_storage(std::slice::from_ref(&s)));
        assert!(!has_shm_storage(&[storage("local", "tmpfs", "", "/run/x", &[])]));
        let p = plan(&s, 0).unwrap().unwrap();
        assert_eq!(p.mount_point, Path::new(SANDBOX_SHM));
        assert_eq!(p.fstype.as_deref(), Some("tmpfs"));
        assert_eq!(p.flags, MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
        assert_eq!(p.data, "mode=1777,size=67108864");
    }

    #[test]
    fn empty_directories_are_removed_up_to_the_stop() {
        let root = std::env::temp_dir().join(format!("podvisor-agent-rmdirs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::create_dir_all(root.join("a/keep")).unwrap();
        remove_empty_dirs(&root.join("a/b/c"), &root);
        assert!(!root.join("a/b").exists() && root.join("a/keep").exists());
        remove_empty_dirs(&root.join("a/keep"), &root);
        assert!(!root.join("a").exists() && root.exists());
        std::fs::remove_dir(&root).unwrap();
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = ["ro", "nosuid", "rw", "dax", "defaults"].iter().map(|s| s.to_string()).collect();
        let (flags, data) = parse_options(&opts);
        assert_eq!(flags, MsFlags::MS_NOSUID);
        assert_eq!(data, "dax");
    }
}
