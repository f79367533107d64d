//! Sandbox-level guest setup: storages (mounts the host asks for) and the hostname.
//!
//! Storage drivers: `virtio-fs` (the shared directory, `kataShared`, fstype `virtiofs`),
//! `local` (a tmpfs when fstype is `tmpfs`, else a plain directory, as in Kata) and
//! `ephemeral` (a tmpfs). Mount points are created (`mkdir -p`). Options are mount(8) words:
//! flags (`ro`, `nosuid`, `nodev`, `noexec`, `relatime`, ...) and the rest as data.

use std::path::PathBuf;

use agent_protocol::agent as pb;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// A storage the agent mounted (to unmount later), or only created (a `local` directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    pub mount_point: PathBuf,
    pub mounted: bool,
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
        ("virtio-fs", other) => return Err(format!("{}: {other:?} (driver virtio-fs needs virtiofs)", field("fstype"))),
        ("local", "tmpfs") | ("ephemeral", _) => "tmpfs",
        ("local", _) => return Ok(None),
        (other, _) => {
            return Err(format!("{}: driver {other:?} is not supported (virtio-fs, local, ephemeral)", field("driver")))
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
    std::fs::create_dir_all(&mount_point).map_err(|e| format!("storages[{index}]: mkdir {}: {e}", mount_point.display()))?;
    let Some(p) = plan else {
        return Ok(Mounted { mount_point, mounted: false });
    };
    let data = (!p.data.is_empty()).then_some(p.data.as_str());
    mount(Some(p.source.as_str()), &p.mount_point, p.fstype.as_deref(), p.flags, data).map_err(|e| {
        format!(
            "storages[{index}]: mount {} ({}) on {}: {e}",
            p.source,
            p.fstype.as_deref().unwrap_or("?"),
            p.mount_point.display()
        )
    })?;
    Ok(Mounted { mount_point, mounted: true })
}

/// Unmounts in reverse order (lazily: a busy mount is detached, never left behind).
pub fn unmount_all(mounted: &[Mounted]) -> Vec<String> {
    let mut errors = Vec::new();
    for m in mounted.iter().rev().filter(|m| m.mounted) {
        if let Err(e) = umount2(&m.mount_point, MntFlags::MNT_DETACH) {
            errors.push(format!("unmount {}: {e}", m.mount_point.display()));
        }
    }
    errors
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
        assert_eq!((p.source.as_str(), p.fstype.as_deref(), p.flags, p.data.as_str()), ("kataShared", Some("virtiofs"), MsFlags::empty(), ""));
    }

    #[test]
    fn local_tmpfs_and_plain_directory() {
        let p = plan(&storage("local", "tmpfs", "", "/run/x", &["nodev", "size=10m", "mode=0755"]), 0).unwrap().unwrap();
        assert_eq!((p.source.as_str(), p.flags, p.data.as_str()), ("tmpfs", MsFlags::MS_NODEV, "size=10m,mode=0755"));
        assert_eq!(plan(&storage("local", "", "", "/run/dir", &[]), 0).unwrap(), None);
    }

    #[test]
    fn errors_name_the_field() {
        assert!(plan(&storage("blk", "ext4", "/dev/vda", "/x", &[]), 2).unwrap_err().starts_with("storages[2].driver"));
        assert!(plan(&storage("virtio-fs", "virtiofs", "tag", "rel", &[]), 0).unwrap_err().starts_with("storages[0].mount_point"));
        assert!(plan(&storage("virtio-fs", "virtiofs", "", "/x", &[]), 0).unwrap_err().starts_with("storages[0].source"));
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = ["ro", "nosuid", "rw", "dax", "defaults"].iter().map(|s| s.to_string()).collect();
        let (flags, data) = parse_options(&opts);
        assert_eq!(flags, MsFlags::MS_NOSUID);
        assert_eq!(data, "dax");
    }
}
