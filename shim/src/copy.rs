//! Files into a guest that shares no file system with the node (`shared_fs = "none"`, peer
//! pods): a host tree is planned into `CopyFile` requests (Kata's format: directories and
//! symlinks by their mode bits, regular files in chunks with `offset` and `file_size`), bounded
//! in size and count, and a [`Fingerprint`] tells when a source changed (configMap and secret
//! updates) so that it is copied again.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agent_protocol::agent as pb;

/// Largest `data` of one request (the agent's frames are bounded at 4 MiB).
pub const CHUNK: usize = 1 << 20;
/// Most bytes one copied tree may hold.
pub const MAX_TREE_BYTES: u64 = 64 << 20;
/// Most entries one copied tree may hold.
pub const MAX_TREE_ENTRIES: usize = 20_000;

/// Why a tree cannot be copied.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The host tree could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The host path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Too big to copy.
    #[error(
        "{path}: {what} exceeds what a pod without a shared file system copies into its VM ({limit}); \
         with peer pods, container images are pulled in the podvm (CRI-O `runtime_pull_image = true`, \
         containerd `[runtime] experimental_force_guest_pull = true`), and volumes this large need a \
         block device or a network file system"
    )]
    TooBig {
        /// The host path.
        path: PathBuf,
        /// What overflowed.
        what: &'static str,
        /// The limit.
        limit: String,
    },
}

/// One thing to create in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A directory.
    Dir,
    /// A regular file, read when copied.
    File {
        /// The host file.
        source: PathBuf,
        /// Its size when planned.
        size: u64,
    },
    /// A symbolic link with this target.
    Symlink(String),
}

/// One entry of a plan: where, what, and its owner and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Absolute guest path.
    pub guest: String,
    /// What it is.
    pub item: Item,
    /// Permission bits (with setuid/setgid/sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// The entries that recreate `host` (a file, directory or symlink, not followed) at `guest`,
/// parents first. Errors when the tree exceeds [`MAX_TREE_BYTES`] or [`MAX_TREE_ENTRIES`].
pub fn plan(host: &Path, guest: &str) -> Result<Vec<Entry>, CopyError> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    walk(host, guest.trim_end_matches('/').to_string(), host, &mut out, &mut bytes)?;
    Ok(out)
}

fn walk(path: &Path, guest: String, top: &Path, out: &mut Vec<Entry>, bytes: &mut u64) -> Result<(), CopyError> {
    let read = |source| CopyError::Read { path: path.to_path_buf(), source };
    let meta = std::fs::symlink_metadata(path).map_err(read)?;
    if out.len() >= MAX_TREE_ENTRIES {
        return Err(CopyError::TooBig {
            path: top.to_path_buf(),
            what: "the number of files",
            limit: format!("{MAX_TREE_ENTRIES} entries"),
        });
    }
    let (mode, uid, gid) = (meta.permissions().mode() & 0o7777, meta.uid(), meta.gid());
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(path).map_err(read)?;
        out.push(Entry { guest, item: Item::Symlink(target.to_string_lossy().into_owned()), mode, uid, gid });
    } else if ft.is_dir() {
        out.push(Entry { guest: guest.clone(), item: Item::Dir, mode, uid, gid });
        let mut names: Vec<_> = std::fs::read_dir(path)
            .map_err(read)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(read)?;
        names.sort();
        for name in names {
            let child_guest = format!("{guest}/{}", name.to_string_lossy());
            walk(&path.join(&name), child_guest, top, out, bytes)?;
        }
    } else if ft.is_file() {
        *bytes += meta.len();
        if *bytes > MAX_TREE_BYTES {
            return Err(CopyError::TooBig {
                path: top.to_path_buf(),
                what: "the size",
                limit: format!("{} MiB", MAX_TREE_BYTES >> 20),
            });
        }
        out.push(Entry { guest, item: Item::File { source: path.to_path_buf(), size: meta.len() }, mode, uid, gid });
    }
    // Sockets, FIFOs and device nodes are not copied: a container's mounts never need them
    // from a volume, and device nodes come from the guest's own /dev.
    Ok(())
}

/// `S_IFDIR` / `S_IFLNK` / `S_IFREG` of the mode bits, as Kata's agent reads `file_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const S_IFREG: u32 = 0o100000;

/// The requests for one entry (a file of more than [`CHUNK`] bytes takes several). Reads the
/// host file now; a file that changed size since planning is sent as it is now.
pub fn requests(entry: &Entry) -> Result<Vec<pb::CopyFileRequest>, CopyError> {
    let base = pb::CopyFileRequest {
        path: entry.guest.clone(),
        dir_mode: 0o755,
        uid: entry.uid as i32,
        gid: entry.gid as i32,
        ..Default::default()
    };
    Ok(match &entry.item {
        Item::Dir => vec![pb::CopyFileRequest { file_mode: S_IFDIR | entry.mode, ..base }],
        Item::Symlink(target) => vec![pb::CopyFileRequest {
            file_mode: S_IFLNK | 0o777,
            file_size: target.len() as i64,
            data: target.as_bytes().to_vec(),
            ..base
        }],
        Item::File { source, .. } => {
            let data = std::fs::read(source).map_err(|e| CopyError::Read { path: source.clone(), source: e })?;
            if data.len() as u64 > MAX_TREE_BYTES {
                return Err(CopyError::TooBig {
                    path: source.clone(),
                    what: "the size",
                    limit: format!("{} MiB", MAX_TREE_BYTES >> 20),
                });
            }
            let size = data.len() as i64;
            let mut reqs: Vec<_> = data
                .chunks(CHUNK)
                .enumerate()
                .map(|(i, chunk)| pb::CopyFileRequest {
                    file_mode: S_IFREG | entry.mode,
                    file_size: size,
                    offset: (i * CHUNK) as i64,
                    data: chunk.to_vec(),
                    ..base.clone()
                })
                .collect();
            if reqs.is_empty() {
                reqs.push(pb::CopyFileRequest { file_mode: S_IFREG | entry.mode, ..base });
            }
            reqs
        }
    })
}

/// What a copied tree looked like: names, kinds, sizes, mtimes and link targets, in order.
/// Equal fingerprints mean nothing to copy again.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fingerprint(Vec<(PathBuf, u32, u64, i64, i64, String)>);

impl Fingerprint {
    /// The fingerprint of `host` now (bounded like [`plan`]; an unreadable tree gives an empty
    /// one, which differs from any earlier one only if that was not empty too).
    pub fn of(host: &Path) -> Fingerprint {
        let mut v = Vec::new();
        fp_walk(host, &mut v);
        Fingerprint(v)
    }
}

fn fp_walk(path: &Path, out: &mut Vec<(PathBuf, u32, u64, i64, i64, String)>) {
    if out.len() >= MAX_TREE_ENTRIES {
        return;
    }
    let Ok(meta) = std::fs::symlink_metadata(path) else { return };
    let link = if meta.file_type().is_symlink() {
        std::fs::read_link(path).map(|t| t.to_string_lossy().into_owned()).unwrap_or_default()
    } else {
        String::new()
    };
    out.push((path.to_path_buf(), meta.mode(), meta.len(), meta.mtime(), meta.mtime_nsec(), link));
    if meta.is_dir() {
        if let Ok(rd) = std::fs::read_dir(path) {
            let mut names: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect();
            names.sort();
            for n in names {
                fp_walk(&path.join(n), out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("podvisor-copy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_configmap_tree_becomes_dirs_files_and_links_parents_first() {
        let d = tmp("cm");
        std::fs::create_dir(d.join("..2026_12_05")).unwrap();
        std::fs::write(d.join("..2026_12_05/key"), b"value").unwrap();
        std::os::unix::fs::symlink("..2026_12_05", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/key", d.join("key")).unwrap();
        let p = plan(&d, "/run/kata-containers/shared/containers/c-mounts/3-cm/").unwrap();
        let g: Vec<(&str, &Item)> = p.iter().map(|e| (e.guest.as_str(), &e.item)).collect();
        let root = "/run/kata-containers/shared/containers/c-mounts/3-cm";
        assert_eq!(g[0], (root, &Item::Dir));
        assert_eq!(g[1].0, format!("{root}/..2026_12_05"));
        assert_eq!(g[2].0, format!("{root}/..2026_12_05/key"));
        assert_eq!(g[3], (format!("{root}/..data").as_str(), &Item::Symlink("..2026_12_05".into())));
        assert_eq!(g[4], (format!("{root}/key").as_str(), &Item::Symlink("..data/key".into())));
        let file = requests(&p[2]).unwrap();
        assert_eq!(file.len(), 1);
        assert_eq!((file[0].file_mode & 0o170000, file[0].file_size, &file[0].data[..]), (S_IFREG, 5, &b"value"[..]));
        let link = requests(&p[3]).unwrap();
        assert_eq!((link[0].file_mode & 0o170000, &link[0].data[..]), (S_IFLNK, &b"..2026_12_05"[..]));
        assert_eq!(requests(&p[0]).unwrap()[0].file_mode & 0o170000, S_IFDIR);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn big_files_go_in_chunks_with_offsets() {
        let d = tmp("chunks");
        std::fs::write(d.join("f"), vec![7u8; CHUNK * 2 + 10]).unwrap();
        let p = plan(&d.join("f"), "/run/kata-containers/x").unwrap();
        let r = requests(&p[0]).unwrap();
        assert_eq!(
            r.iter().map(|r| (r.offset, r.data.len())).collect::<Vec<_>>(),
            [(0, CHUNK), (CHUNK as i64, CHUNK), (2 * CHUNK as i64, 10)]
        );
        assert!(r.iter().all(|r| r.file_size == (CHUNK * 2 + 10) as i64));
        std::fs::write(d.join("empty"), b"").unwrap();
        assert_eq!(requests(&plan(&d.join("empty"), "/run/kata-containers/e").unwrap()[0]).unwrap().len(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn trees_beyond_the_bounds_are_refused_with_the_fix() {
        let d = tmp("big");
        let f = std::fs::File::create(d.join("sparse")).unwrap();
        f.set_len(MAX_TREE_BYTES + 1).unwrap();
        let err = plan(&d, "/run/kata-containers/x").unwrap_err().to_string();
        assert!(err.contains("64 MiB") && err.contains("runtime_pull_image"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_fingerprint_changes_when_a_configmap_is_updated() {
        let d = tmp("fp");
        std::fs::write(d.join("key"), b"one").unwrap();
        let before = Fingerprint::of(&d);
        assert_eq!(before, Fingerprint::of(&d));
        std::fs::write(d.join("key"), b"two!").unwrap();
        assert_ne!(before, Fingerprint::of(&d));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
