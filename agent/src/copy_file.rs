//! `CopyFile` (Kata's): the host writes files into a guest that shares no file system with it
//! (peer pods, `shared_fs = "none"`). One request is a directory (`S_IFDIR` in `file_mode`), a
//! symlink (`S_IFLNK`, the target in `data`) or one chunk of a regular file (`offset`, `data`,
//! out of `file_size`). Files are written to a temporary name and renamed into place when the
//! last chunk arrives, so a reader (a container watching a configMap) never sees half a file.
//! Only paths below `/run/kata-containers/` are written.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use agent_protocol::agent as pb;

/// Where CopyFile may write (Kata's `CONTAINER_BASE`).
pub const BASE: &str = "/run/kata-containers";
/// Largest file accepted.
pub const MAX_FILE: i64 = 256 << 20;
/// Largest chunk accepted.
pub const MAX_CHUNK: usize = 4 << 20;

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const S_IFREG: u32 = 0o100000;

/// Checks that `path` is absolute, has no `.`/`..` components and lies strictly below `base`.
pub fn checked_path(path: &str, base: &Path) -> Result<PathBuf, String> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(format!("path {path:?}: not absolute"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) || path.contains("//") {
        return Err(format!("path {path:?}: not normalized (no `.`, `..` or `//`)"));
    }
    if !p.starts_with(base) || p == base {
        return Err(format!("path {path:?}: CopyFile writes only below {}", base.display()));
    }
    Ok(p.to_path_buf())
}

/// The temporary name a file is assembled under.
fn temporary(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".copying");
    path.with_file_name(name)
}

/// Makes the parents of `path` below `base` that are missing (mode `dir_mode`). Refuses to
/// go through a symlink: the host's tree is recreated, never the guest's followed.
fn make_parents(path: &Path, base: &Path, dir_mode: u32) -> Result<(), String> {
    let Some(parent) = path.parent() else { return Ok(()) };
    let mut cur = PathBuf::from(base);
    for c in parent.strip_prefix(base).map_err(|_| "outside the base".to_string())?.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => return Err(format!("{}: exists and is not a directory", cur.display())),
            Err(_) => {
                fs::create_dir(&cur).map_err(|e| format!("create {}: {e}", cur.display()))?;
                let mode = if dir_mode == 0 { 0o755 } else { dir_mode & 0o7777 };
                fs::set_permissions(&cur, fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("chmod {}: {e}", cur.display()))?;
            }
        }
    }
    Ok(())
}

fn chown(path: &Path, uid: i32, gid: i32) -> Result<(), String> {
    let (u, g) = (u32::try_from(uid).ok(), u32::try_from(gid).ok());
    nix::unistd::fchownat(
        None,
        path,
        u.map(nix::unistd::Uid::from_raw),
        g.map(nix::unistd::Gid::from_raw),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| format!("chown {}: {e}", path.display()))
}

/// Removes whatever is at `path` unless it is a directory (a directory is never replaced).
fn remove_non_dir(path: &Path) -> Result<(), String> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(format!("{}: is a directory", path.display())),
        Ok(_) => fs::remove_file(path).map_err(|e| format!("remove {}: {e}", path.display())),
        Err(_) => Ok(()),
    }
}

/// Renames the finished `tmp` over `path`, unless `path` is a directory (never replaced).
fn put_in_place(tmp: &Path, path: &Path) -> Result<(), String> {
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        let _ = fs::remove_file(tmp);
        return Err(format!("{}: is a directory", path.display()));
    }
    fs::rename(tmp, path).map_err(|e| format!("rename to {}: {e}", path.display()))
}

/// Handles one request below `base` (`BASE` in the guest; tests use a temporary directory).
pub fn copy_file(req: &pb::CopyFileRequest, base: &Path) -> Result<(), String> {
    let path = checked_path(&req.path, base)?;
    make_parents(&path, base, req.dir_mode)?;
    let perm = req.file_mode & 0o7777;
    match req.file_mode & S_IFMT {
        S_IFDIR => {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    remove_non_dir(&path)?;
                    fs::create_dir(&path).map_err(|e| format!("create {}: {e}", path.display()))?
                }
                Err(_) => fs::create_dir(&path).map_err(|e| format!("create {}: {e}", path.display()))?,
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(perm))
                .map_err(|e| format!("chmod {}: {e}", path.display()))?;
            chown(&path, req.uid, req.gid)
        }
        S_IFLNK => {
            if req.data.is_empty() || req.data.len() > 4096 || req.data.contains(&0) {
                return Err(format!("path {:?}: a symlink target of 1 to 4096 bytes without NUL", req.path));
            }
            let target = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&req.data);
            let tmp = temporary(&path);
            let _ = fs::remove_file(&tmp);
            std::os::unix::fs::symlink(target, &tmp).map_err(|e| format!("symlink {}: {e}", tmp.display()))?;
            chown(&tmp, req.uid, req.gid)?;
            put_in_place(&tmp, &path)
        }
        S_IFREG | 0 => {
            if !(0..=MAX_FILE).contains(&req.file_size) {
                return Err(format!("path {:?}: file_size {} is not 0 to {MAX_FILE}", req.path, req.file_size));
            }
            if req.data.len() > MAX_CHUNK {
                return Err(format!("path {:?}: a chunk of more than {MAX_CHUNK} bytes", req.path));
            }
            let end = req.offset.checked_add(req.data.len() as i64).filter(|e| req.offset >= 0 && *e <= req.file_size);
            let Some(end) = end else {
                return Err(format!(
                    "path {:?}: offset {} + {} bytes is beyond file_size {}",
                    req.path,
                    req.offset,
                    req.data.len(),
                    req.file_size
                ));
            };
            let tmp = temporary(&path);
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(req.offset == 0)
                .open(&tmp)
                .map_err(|e| format!("open {}: {e}", tmp.display()))?;
            file.write_all_at(&req.data, req.offset as u64).map_err(|e| format!("write {}: {e}", tmp.display()))?;
            if end < req.file_size {
                return Ok(());
            }
            file.set_len(req.file_size as u64).map_err(|e| format!("truncate {}: {e}", tmp.display()))?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(perm))
                .map_err(|e| format!("chmod {}: {e}", tmp.display()))?;
            chown(&tmp, req.uid, req.gid)?;
            put_in_place(&tmp, &path)
        }
        other => Err(format!("path {:?}: file_mode type {other:o} is not a file, directory or symlink", req.path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("podvisor-copyfile-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn req(path: &Path, mode: u32, size: i64, offset: i64, data: &[u8]) -> pb::CopyFileRequest {
        pb::CopyFileRequest {
            path: path.display().to_string(),
            file_mode: mode,
            file_size: size,
            offset,
            data: data.to_vec(),
            uid: 0,
            gid: 0,
            dir_mode: 0o750,
            ..Default::default()
        }
    }

    #[test]
    fn files_arrive_whole_in_chunks_dirs_and_links_too() {
        let b = base("chunks");
        let f = b.join("c1-mounts/3-cm/key");
        copy_file(&req(&f, S_IFREG | 0o640, 6, 0, b"abc"), &b).unwrap();
        assert!(!f.exists(), "half a file is never visible");
        copy_file(&req(&f, S_IFREG | 0o640, 6, 3, b"def"), &b).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"abcdef");
        assert_eq!(fs::metadata(&f).unwrap().permissions().mode() & 0o7777, 0o640);
        assert_eq!(fs::metadata(b.join("c1-mounts")).unwrap().permissions().mode() & 0o7777, 0o750);
        // An update replaces it (a configMap change), shorter this time.
        copy_file(&req(&f, S_IFREG | 0o640, 2, 0, b"zz"), &b).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"zz");
        let l = b.join("c1-mounts/3-cm/..data");
        copy_file(&req(&l, S_IFLNK | 0o777, 4, 0, b"..v1"), &b).unwrap();
        copy_file(&req(&l, S_IFLNK | 0o777, 4, 0, b"..v2"), &b).unwrap();
        assert_eq!(fs::read_link(&l).unwrap(), Path::new("..v2"));
        let d = b.join("c1/rootfs/etc");
        copy_file(&req(&d, S_IFDIR | 0o755, 0, 0, b""), &b).unwrap();
        assert!(d.is_dir());
        copy_file(&req(&b.join("empty"), S_IFREG | 0o600, 0, 0, b""), &b).unwrap();
        assert_eq!(fs::read(b.join("empty")).unwrap(), b"");
        fs::remove_dir_all(&b).unwrap();
    }

    #[test]
    fn hostile_requests_are_refused_by_name() {
        let b = base("hostile");
        let cases: Vec<(pb::CopyFileRequest, &str)> = vec![
            (req(Path::new("/etc/passwd"), S_IFREG, 1, 0, b"x"), "only below"),
            (req(&b.join("a/../../x"), S_IFREG, 1, 0, b"x"), "not normalized"),
            (req(Path::new("relative"), S_IFREG, 1, 0, b"x"), "not absolute"),
            (req(&b.join("f"), S_IFREG, 2, 1, b"xx"), "beyond file_size"),
            (req(&b.join("f"), S_IFREG, MAX_FILE + 1, 0, b"x"), "file_size"),
            (req(&b.join("f"), 0o020000, 0, 0, b""), "not a file, directory or symlink"),
            (req(&b.join("l"), S_IFLNK, 0, 0, b""), "symlink target"),
        ];
        for (r, want) in cases {
            let err = copy_file(&r, &b).unwrap_err();
            assert!(err.contains(want), "{}: {err}", r.path);
        }
        // A symlink planted in the tree is not followed to make parents.
        std::os::unix::fs::symlink("/", b.join("escape")).unwrap();
        let err = copy_file(&req(&b.join("escape/tmp/x"), S_IFREG, 1, 0, b"x"), &b).unwrap_err();
        assert!(err.contains("not a directory"), "{err}");
        fs::remove_dir_all(&b).unwrap();
    }
}
