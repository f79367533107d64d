//! Host mounts the shim owns: the container rootfs from `CreateTaskRequest.rootfs`, and the
//! per-sandbox directory exported to the guest over virtio-fs, into which each container's
//! rootfs and bind-mount sources are bind-mounted.
//!
//! Layout: `/run/kata-containers/shared/sandboxes/<sandbox>/shared/` is exported (tag
//! `kataShared`) and mounted in the guest at `/run/kata-containers/shared/containers/`; it is a
//! self bind mount made `shared`, so mounts added after virtiofsd started (which lives in its own
//! mount namespace) still reach it.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Parent of the per-sandbox shared directories.
pub const SHARED_ROOT: &str = "/run/kata-containers/shared/sandboxes";

/// Where the guest mounts the shared directory.
pub const GUEST_SHARED: &str = "/run/kata-containers/shared/containers";

/// A mount operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct MountError {
    /// What was being done, with paths.
    pub what: String,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

fn err(what: impl Into<String>) -> impl FnOnce(nix::Error) -> MountError {
    let what = what.into();
    move |e| MountError { what, source: e.into() }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MountError {
    let what = what.into();
    move |source| MountError { what, source }
}

/// One mount as containerd sends it in `CreateTaskRequest.rootfs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// File system type (`overlay`, `bind`, ...).
    pub fstype: String,
    /// Source.
    pub source: String,
    /// Options (`ro`, `rbind`, `lowerdir=...`).
    pub options: Vec<String>,
}

/// Splits mount options into flags and the data string the file system gets.
pub fn split_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            other => data.push(other.to_string()),
        }
    }
    (flags, data.join(","))
}

/// Mounts containerd's rootfs mounts on `target` in order.
pub fn mount_rootfs(mounts: &[MountSpec], target: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(target).map_err(io_err(format!("create rootfs directory {}", target.display())))?;
    for m in mounts {
        let (flags, data) = split_options(&m.options);
        let fstype = if m.fstype == "bind" { None } else { Some(m.fstype.as_str()) };
        let flags = if m.fstype == "bind" { flags | MsFlags::MS_BIND } else { flags };
        mount(
            Some(m.source.as_str()),
            target,
            fstype,
            flags - MsFlags::MS_RDONLY,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(err(format!("mount {} ({}) on {}", m.source, m.fstype, target.display())))?;
        if flags.contains(MsFlags::MS_RDONLY) {
            remount_readonly(target, flags.contains(MsFlags::MS_BIND))?;
        }
    }
    Ok(())
}

fn remount_readonly(target: &Path, bind: bool) -> Result<(), MountError> {
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if bind {
        flags |= MsFlags::MS_BIND;
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(err(format!("remount {} read-only", target.display())))
}

/// Whether `path` is a mount point (listed in /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    mount_points_under(path).iter().any(|p| p == path)
}

/// Mount points at or below `dir`, deepest first (so they can be unmounted in order).
pub fn mount_points_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything at or below `dir` (deepest first, detaching busy mounts).
pub fn unmount_all(dir: &Path) -> Result<(), MountError> {
    for p in mount_points_under(dir) {
        match umount2(&p, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(err(format!("unmount {}", p.display()))(e)),
        }
    }
    Ok(())
}

/// The per-sandbox directory shared with the guest.
#[derive(Debug, Clone)]
pub struct SharedDir {
    sandbox_dir: PathBuf,
    root: PathBuf,
}

impl SharedDir {
    /// The shared directory of `sandbox` (nothing is created yet).
    pub fn new(sandbox: &str) -> SharedDir {
        let sandbox_dir = Path::new(SHARED_ROOT).join(sandbox);
        SharedDir { root: sandbox_dir.join("shared"), sandbox_dir }
    }

    /// The exported directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the directory as a shared self bind mount.
    pub fn create(&self) -> Result<(), MountError> {
        std::fs::create_dir_all(&self.root).map_err(io_err(format!("create {}", self.root.display())))?;
        if !is_mount_point(&self.root) {
            mount(Some(&self.root), &self.root, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(err(format!("bind {} onto itself", self.root.display())))?;
        }
        mount(None::<&str>, &self.root, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
            .map_err(err(format!("make {} a shared mount", self.root.display())))?;
        Ok(())
    }

    /// Bind-mounts `source` (a directory or a file) at `<root>/<name>`, read-only if asked, and
    /// returns the path the guest sees.
    pub fn share(&self, name: &str, source: &Path, read_only: bool) -> Result<String, MountError> {
        let target = self.root.join(name);
        let meta = std::fs::metadata(source).map_err(io_err(format!("bind source {}", source.display())))?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(format!("create {}", parent.display())))?;
        }
        if meta.is_dir() {
            std::fs::create_dir_all(&target).map_err(io_err(format!("create {}", target.display())))?;
        } else if !target.exists() {
            std::fs::File::create(&target).map_err(io_err(format!("create {}", target.display())))?;
        }
        mount(Some(source), &target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .map_err(err(format!("bind {} on {}", source.display(), target.display())))?;
        if read_only {
            remount_readonly(&target, true)?;
        }
        Ok(format!("{GUEST_SHARED}/{name}"))
    }

    /// Removes what [`SharedDir::share`] made below `<root>/<prefix>`.
    pub fn unshare(&self, prefix: &str) -> Result<(), MountError> {
        let dir = self.root.join(prefix);
        unmount_all(&dir)?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("remove {}", dir.display()))(e)),
        }
    }

    /// Unmounts everything and removes the sandbox's directories; idempotent.
    pub fn destroy(&self) -> Result<(), MountError> {
        unmount_all(&self.sandbox_dir)?;
        match std::fs::remove_dir_all(&self.sandbox_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("remove {}", self.sandbox_dir.display()))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let (f, d) = split_options(&["ro".into(), "rbind".into(), "lowerdir=/a:/b".into(), "index=off".into()]);
        assert!(f.contains(MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC));
        assert_eq!(d, "lowerdir=/a:/b,index=off");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    /// Real mounts (the tests run as root): share a directory and a file read-only, see that
    /// they are visible and read-only, then remove everything.
    #[test]
    fn share_and_destroy_leave_nothing() {
        let id = format!("podvisor-unit-{}", std::process::id());
        let src = std::env::temp_dir().join(format!("{id}-src"));
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("f"), b"x").unwrap();
        let shared = SharedDir::new(&id);
        shared.create().unwrap();
        let guest = shared.share("c1/rootfs", &src.join("d"), false).unwrap();
        assert_eq!(guest, format!("{GUEST_SHARED}/c1/rootfs"));
        shared.share("c1-mounts/0-f", &src.join("f"), true).unwrap();
        assert_eq!(std::fs::read(shared.root().join("c1-mounts/0-f")).unwrap(), b"x");
        assert!(std::fs::write(shared.root().join("c1-mounts/0-f"), b"y").is_err(), "read-only bind");
        std::fs::write(shared.root().join("c1/rootfs/new"), b"z").unwrap();
        assert_eq!(std::fs::read(src.join("d/new")).unwrap(), b"z");
        shared.unshare("c1-mounts").unwrap();
        assert!(!shared.root().join("c1-mounts").exists());
        shared.destroy().unwrap();
        assert!(mount_points_under(Path::new(SHARED_ROOT).join(&id).as_path()).is_empty());
        assert!(!Path::new(SHARED_ROOT).join(&id).exists());
        std::fs::remove_dir_all(&src).unwrap();
    }
}
