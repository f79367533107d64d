//! Host mounts the shim owns: the container rootfs from `CreateTaskRequest.rootfs`, and the
//! per-sandbox directory exported to the guest over virtio-fs, into which each container's
//! rootfs and bind-mount sources are bind-mounted.
//!
//! Layout: `/run/kata-containers/shared/sandboxes/<sandbox>/shared/` is exported (tag
//! `kataShared`) and mounted in the guest at `/run/kata-containers/shared/containers/`; it is a
//! self bind mount made `shared`, so mounts added after virtiofsd started (which lives in its own
//! mount namespace) still reach it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use slog::{info, warn, Logger};

pub use crate::spec::ReadOnly;

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

/// Makes the mount at `target` and every mount below it read-only (`mount_setattr` with
/// `AT_RECURSIVE`, Linux 5.12+), as runc does for `rro`.
fn set_recursive_readonly(target: &Path) -> Result<(), MountError> {
    let what = || format!("make {} and the mounts below it read-only (mount_setattr)", target.display());
    let c_path = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).map_err(|_| MountError {
        what: what(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"),
    })?;
    let attr = libc::mount_attr { attr_set: libc::MOUNT_ATTR_RDONLY, attr_clr: 0, propagation: 0, userns_fd: 0 };
    // SAFETY: mount_setattr reads a NUL-terminated path and a mount_attr of the given size, both
    // alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if rc != 0 {
        return Err(MountError { what: what(), source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Whether the mount at `path` is read-only.
fn is_read_only(path: &Path) -> bool {
    nix::sys::statvfs::statvfs(path).is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
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
///
/// What [`SharedDir::create`] made is removed when the value is dropped without a successful
/// [`SharedDir::destroy`] (an owner that was cancelled or failed half-way): the mounts are
/// detached and the directories removed, failures are logged. A value that never created the
/// directory (the `delete` of a dead shim) removes nothing on drop.
#[derive(Debug)]
pub struct SharedDir {
    sandbox_dir: PathBuf,
    root: PathBuf,
    /// `create` ran and no `destroy` has succeeded since: drop cleans up.
    owned: AtomicBool,
    log: Option<Logger>,
}

impl SharedDir {
    /// The shared directory of `sandbox` (nothing is created yet).
    pub fn new(sandbox: &str) -> SharedDir {
        let sandbox_dir = Path::new(SHARED_ROOT).join(sandbox);
        SharedDir { root: sandbox_dir.join("shared"), sandbox_dir, owned: AtomicBool::new(false), log: None }
    }

    /// Logs what a drop had to clean up (and its failures) to `log` instead of stderr.
    pub fn with_log(mut self, log: Logger) -> SharedDir {
        self.log = Some(log);
        self
    }

    /// The exported directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sandbox's host state directory (`<SHARED_ROOT>/<sandbox>/`, parent of the export):
    /// records the shim keeps for the `delete` of a dead shim live here, outside the export.
    pub fn sandbox_dir(&self) -> &Path {
        &self.sandbox_dir
    }

    /// Creates the directory as a shared self bind mount.
    pub fn create(&self) -> Result<(), MountError> {
        // From here on a drop removes whatever of it exists, even after a failure below.
        self.owned.store(true, Ordering::SeqCst);
        std::fs::create_dir_all(&self.root).map_err(io_err(format!("create {}", self.root.display())))?;
        if !is_mount_point(&self.root) {
            mount(Some(&self.root), &self.root, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(err(format!("bind {} onto itself", self.root.display())))?;
        }
        mount(None::<&str>, &self.root, None::<&str>, MsFlags::MS_SHARED, None::<&str>)
            .map_err(err(format!("make {} a shared mount", self.root.display())))?;
        Ok(())
    }

    /// Bind-mounts `source` (a directory or a file) at `<root>/<name>` with the mounts below it
    /// (`rbind`), read-only as asked, and returns the path the guest sees. `ro` makes the bind
    /// itself read-only and leaves the mounts below it as they are; `rro` makes them read-only
    /// too. The host enforces it: virtiofsd's writes fail with EROFS, whatever the guest does.
    pub fn share(&self, name: &str, source: &Path, read_only: ReadOnly) -> Result<String, MountError> {
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
        let made_read_only = match read_only {
            ReadOnly::No => Ok(()),
            ReadOnly::Top => remount_readonly(&target, true),
            ReadOnly::Recursive => set_recursive_readonly(&target),
        };
        if let Err(e) = made_read_only {
            let _ = umount2(&target, MntFlags::MNT_DETACH);
            return Err(e);
        }
        Ok(format!("{GUEST_SHARED}/{name}"))
    }

    /// [`Self::share`] for a source whose mounts propagate (CRI Bidirectional / HostToContainer):
    /// one entry per host source for the whole pod, `propagated/<hash>-<name>`, so that the
    /// pod's containers all bind the same guest mount and see each other's mounts. It is
    /// read-only on the host only while every container using it asked for read-only (the VM is
    /// one trust domain: a writable use anywhere makes it writable); it stays until the VM stops.
    pub fn share_for_pod(&self, source: &Path, read_only: ReadOnly) -> Result<String, MountError> {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(source.as_os_str().as_encoded_bytes());
        let hex: String = hash.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let base = source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into());
        let name = format!("propagated/{hex}-{base}");
        let target = self.root.join(&name);
        if !is_mount_point(&target) {
            return self.share(&name, source, read_only);
        }
        if read_only == ReadOnly::No && is_read_only(&target) {
            mount(None::<&str>, &target, None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_BIND, None::<&str>)
                .map_err(err(format!("remount {} writable", target.display())))?;
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
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("remove {}", self.sandbox_dir.display()))(e)),
        }
        self.owned.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        if !*self.owned.get_mut() {
            return;
        }
        let dir = self.sandbox_dir.display().to_string();
        match (self.destroy(), &self.log) {
            (Ok(()), Some(log)) => {
                info!(log, "removed the shared directory of a pod dropped without destroy"; "dir" => dir)
            }
            (Ok(()), None) => {}
            (Err(e), Some(log)) => {
                warn!(log, "cannot remove the shared directory of a dropped pod"; "dir" => dir, "error" => %e)
            }
            (Err(e), None) => eprintln!("cannot remove the shared directory {dir} of a dropped pod: {e}"),
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

    /// A read-only share of a directory with a writable tmpfs below it: `ro` leaves the tmpfs
    /// writable, `rro` does not; a propagated source is shared once for the pod and becomes
    /// writable when one use of it is.
    #[test]
    fn ro_is_not_recursive_and_rro_is() {
        let id = format!("podvisor-unit-rro-{}", std::process::id());
        let src = std::env::temp_dir().join(format!("{id}-src"));
        std::fs::create_dir_all(src.join("sub")).unwrap();
        mount(Some("tmpfs"), &src.join("sub"), Some("tmpfs"), MsFlags::empty(), None::<&str>).unwrap();
        let shared = SharedDir::new(&id);
        shared.create().unwrap();
        shared.share("c/ro", &src, ReadOnly::Top).unwrap();
        shared.share("c/rro", &src, ReadOnly::Recursive).unwrap();
        let write = |p: &str| std::fs::write(shared.root().join(p), b"x");
        let ro_top = write("c/ro/top");
        let ro_sub = write("c/ro/sub/from-ro");
        let rro_sub = write("c/rro/sub/from-rro");
        let first = shared.share_for_pod(&src, ReadOnly::Top).unwrap();
        let ro_before = is_read_only(&shared.root().join(first.trim_start_matches(&format!("{GUEST_SHARED}/"))));
        let second = shared.share_for_pod(&src, ReadOnly::No).unwrap();
        let rel = second.trim_start_matches(&format!("{GUEST_SHARED}/")).to_string();
        let ro_after = is_read_only(&shared.root().join(&rel));
        shared.destroy().unwrap();
        umount2(&src.join("sub"), MntFlags::MNT_DETACH).unwrap();
        std::fs::remove_dir_all(&src).unwrap();
        assert!(ro_top.is_err(), "ro: the bind itself is read-only");
        assert!(ro_sub.is_ok(), "ro: the tmpfs below it stays writable: {ro_sub:?}");
        assert_eq!(rro_sub.unwrap_err().raw_os_error(), Some(libc::EROFS), "rro: the tmpfs below it too");
        assert_eq!(first, second, "one guest path per source for the pod");
        assert!(rel.starts_with("propagated/"), "{rel}");
        assert!(ro_before && !ro_after, "read-only until a writable use");
    }

    /// Records of a logger, for tests.
    struct Collect(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl slog::Drain for Collect {
        type Ok = ();
        type Err = slog::Never;
        fn log(&self, r: &slog::Record, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
            self.0.lock().unwrap().push(format!("{} {}", r.level().as_short_str(), r.msg()));
            Ok(())
        }
    }

    fn collecting_log() -> (Logger, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let records = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        (Logger::root(Collect(records.clone()), slog::o!()), records)
    }

    fn mounted_under(dir: &Path) -> Vec<PathBuf> {
        mount_points_under(dir)
    }

    /// An owner dropped without destroy (a cancelled create) leaves no mount and no directory.
    #[test]
    fn drop_without_destroy_removes_mounts_and_directories() {
        let id = format!("podvisor-unit-drop-{}", std::process::id());
        let src = std::env::temp_dir().join(format!("{id}-src"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("f"), b"x").unwrap();
        let sandbox_dir = Path::new(SHARED_ROOT).join(&id);
        let (log, records) = collecting_log();
        let shared = SharedDir::new(&id).with_log(log);
        shared.create().unwrap();
        shared.share("c1/rootfs", &src, ReadOnly::No).unwrap();
        let before = mounted_under(&sandbox_dir);
        drop(shared);
        let after = mounted_under(&sandbox_dir);
        let left = sandbox_dir.exists();
        let src_intact = std::fs::read(src.join("f"));
        std::fs::remove_dir_all(&src).unwrap();
        assert_eq!(before.len(), 2, "the export and the share were mounted: {before:?}");
        assert!(after.is_empty(), "mounts left after drop: {after:?}");
        assert!(!left, "{} left after drop", sandbox_dir.display());
        assert_eq!(src_intact.unwrap(), b"x", "the bind source is untouched");
        let records = records.lock().unwrap();
        assert!(records.iter().any(|r| r.starts_with("INFO removed the shared directory")), "{records:?}");
    }

    /// destroy then drop: one clean removal, no second attempt and no error; a value that
    /// never created the directory (dead-shim cleanup) removes nothing on drop, and an old
    /// destroyed value does not remove a newer pod's directory of the same id.
    #[test]
    fn destroy_then_drop_and_unowned_values_do_nothing_more() {
        let id = format!("podvisor-unit-destroy-drop-{}", std::process::id());
        let sandbox_dir = Path::new(SHARED_ROOT).join(&id);
        let (log, records) = collecting_log();
        let old = SharedDir::new(&id).with_log(log.clone());
        old.create().unwrap();
        old.destroy().unwrap();
        assert!(!sandbox_dir.exists());
        let newer = SharedDir::new(&id).with_log(log.clone());
        newer.create().unwrap();
        drop(old);
        let newer_kept = sandbox_dir.exists() && is_mount_point(newer.root());
        let unowned = SharedDir::new(&id).with_log(log);
        drop(unowned);
        let unowned_kept = sandbox_dir.exists();
        newer.destroy().unwrap();
        drop(newer);
        assert!(newer_kept, "a destroyed value's drop removed a newer directory");
        assert!(unowned_kept, "a value that never created the directory removed it");
        assert!(!sandbox_dir.exists() && mounted_under(&sandbox_dir).is_empty());
        assert!(records.lock().unwrap().is_empty(), "drops after destroy did something: {:?}", records.lock().unwrap());
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
        let guest = shared.share("c1/rootfs", &src.join("d"), ReadOnly::No).unwrap();
        assert_eq!(guest, format!("{GUEST_SHARED}/c1/rootfs"));
        shared.share("c1-mounts/0-f", &src.join("f"), ReadOnly::Top).unwrap();
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
