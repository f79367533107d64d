//! Unpacking one layer tar (plain, gzip or zstd) into its own directory, safely:
//!
//! * every path is resolved inside the layer directory (`openat2` with `RESOLVE_IN_ROOT`): `..`
//!   entries are refused, and symlinks (absolute ones included) met on the way resolve as if the
//!   layer were `/`, so nothing is ever written outside it;
//! * files are created with `O_NOFOLLOW | O_EXCL` (an existing entry is replaced, never written
//!   through);
//! * whiteouts become overlayfs whiteouts: `.wh.<name>` a 0:0 character device `<name>`,
//!   `.wh..wh..opq` the xattr `trusted.overlay.opaque=y` on its directory;
//! * the uncompressed stream's sha256 must equal the config's `diff_id`, and every
//!   decompressed byte is taken from the pull's [`Budget`] (decompression bombs stop there);
//! * a deadline bounds the time.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use ruzstd::decoding::{FrameDecoder, StreamingDecoder};
use sha2::{Digest, Sha256};

use super::registry::Budget;

/// A layer's compression, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn from_media_type(m: &str) -> Option<Compression> {
        match m {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
            m if m.starts_with("application/vnd.oci.image.layer.") && m.ends_with(".tar+gzip") => {
                Some(Compression::Gzip)
            }
            m if m.starts_with("application/vnd.oci.image.layer.") && m.ends_with(".tar+zstd") => {
                Some(Compression::Zstd)
            }
            "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// zstd streams of several frames (skippable frames, as zstd:chunked writes, are skipped).
struct ZstdFrames<R: BufRead> {
    frame: Option<StreamingDecoder<R, FrameDecoder>>,
    src: Option<R>,
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(d) = self.frame.as_mut() {
                let n = d.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                self.src = Some(self.frame.take().expect("frame").into_parts().0);
            }
            let mut src = self.src.take().ok_or_else(|| io::Error::other("zstd: broken stream"))?;
            let head = src.fill_buf()?;
            if head.is_empty() {
                self.src = Some(src);
                return Ok(0);
            }
            if head.len() >= 8
                && (0x184D2A50..=0x184D2A5F).contains(&u32::from_le_bytes(head[0..4].try_into().unwrap()))
            {
                let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as u64;
                let skipped = io::copy(&mut (&mut src).take(8 + len), &mut io::sink())?;
                if skipped != 8 + len {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "zstd: truncated skippable frame"));
                }
                self.src = Some(src);
                continue;
            }
            self.frame = Some(StreamingDecoder::new(src).map_err(|e| io::Error::other(format!("zstd: {e}")))?);
        }
    }
}

/// Hashes what it reads and takes it from the budget.
struct Metered<'a, R> {
    inner: R,
    hasher: Sha256,
    budget: &'a Budget,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.budget.take(n as u64).map_err(io::Error::other)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Unpacks `blob` (already checked against its digest) into the new directory `dest`, checking
/// the uncompressed stream against `diff_id`. On error `dest` may hold a partial tree (the
/// caller removes it).
pub fn unpack_layer(
    blob: &Path,
    compression: Compression,
    dest: &Path,
    diff_id: &str,
    budget: &Budget,
    deadline: Instant,
) -> Result<(), String> {
    let file = File::open(blob).map_err(|e| format!("open {}: {e}", blob.display()))?;
    let buffered = BufReader::with_capacity(1 << 16, file);
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(buffered),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(buffered)),
        Compression::Zstd => Box::new(ZstdFrames { frame: None, src: Some(buffered) }),
    };
    let mut metered = Metered { inner: reader, hasher: Sha256::new(), budget };
    std::fs::create_dir(dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
    let root = open_path(libc::AT_FDCWD, dest, libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(|e| format!("open {}: {e}", dest.display()))?;
    {
        let mut archive = tar::Archive::new(&mut metered);
        let entries = archive.entries().map_err(|e| format!("not a tar stream: {e}"))?;
        for entry in entries {
            if Instant::now() > deadline {
                return Err("unpacking did not finish before the pull's deadline (agent.image_pull_timeout)".into());
            }
            let mut entry = entry.map_err(|e| format!("tar: {e}"))?;
            let path = entry.path().map_err(|e| format!("tar entry name: {e}"))?.into_owned();
            write_entry(&root, &mut entry, &path).map_err(|e| format!("entry {:?}: {e}", path))?;
        }
    }
    // The rest of the stream (tar's end blocks and padding) counts in the diff_id.
    io::copy(&mut metered, &mut io::sink()).map_err(|e| format!("layer stream: {e}"))?;
    let actual = format!("sha256:{:x}", metered.hasher.finalize());
    if actual != diff_id {
        return Err(format!("uncompressed digest mismatch: the config's diff_id is {diff_id}, the content's {actual}"));
    }
    Ok(())
}

/// The components of an entry path, `.` and leading `/` dropped; `..` refused.
pub fn clean_components(path: &Path) -> Result<Vec<&OsStr>, String> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => return Err("a \"..\" component would escape the layer".into()),
            Component::Prefix(_) => return Err("not a unix path".into()),
        }
    }
    Ok(out)
}

fn cstr(p: &[u8]) -> io::Result<CString> {
    CString::new(p).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
}

/// `openat2(dirfd, path, flags, resolve)`; with [`libc::RESOLVE_IN_ROOT`] `dirfd` acts as `/`.
fn open_path(dirfd: RawFd, path: &Path, flags: i32, resolve: u64) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: open_how is plain data; zeroed is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = resolve;
    // SAFETY: valid C string and open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

const IN_ROOT: u64 = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;

/// Opens (creating missing directories) the directory `parts` inside `root`.
fn open_dir(root: &OwnedFd, parts: &[&OsStr], create: bool) -> io::Result<OwnedFd> {
    let rel: PathBuf = if parts.is_empty() { PathBuf::from(".") } else { parts.iter().collect() };
    match open_path(root.as_raw_fd(), &rel, libc::O_RDONLY | libc::O_DIRECTORY, IN_ROOT) {
        Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) && !parts.is_empty() => {
            let parent = open_dir(root, &parts[..parts.len() - 1], true)?;
            let name = cstr(parts[parts.len() - 1].as_bytes())?;
            // SAFETY: valid fd and C string.
            if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(e);
                }
            }
            open_path(root.as_raw_fd(), &rel, libc::O_RDONLY | libc::O_DIRECTORY, IN_ROOT)
        }
        other => other,
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes `name` in `dir` unless it is a directory (and `keep_dir`); a directory being
/// replaced by a non-directory goes with its contents.
fn remove_existing(dir: &OwnedFd, name: &CString, keep_dir: bool) -> io::Result<bool> {
    // SAFETY: plain stat buffer filled by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, C string and buffer.
    if unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Ok(false);
    }
    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
    if is_dir && keep_dir {
        return Ok(true);
    }
    if is_dir {
        let sub = open_path(
            dir.as_raw_fd(),
            Path::new(OsStr::from_bytes(name.as_bytes())),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            libc::RESOLVE_BENEATH,
        )?;
        let path = PathBuf::from(format!("/proc/self/fd/{}", sub.as_raw_fd()));
        let target = std::fs::read_link(&path)?;
        drop(sub);
        std::fs::remove_dir_all(target)?;
        return Ok(false);
    }
    // SAFETY: valid fd and C string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) })?;
    Ok(false)
}

fn write_entry<R: Read>(root: &OwnedFd, entry: &mut tar::Entry<R>, path: &Path) -> Result<(), String> {
    let parts = clean_components(path)?;
    let Some((last, parents)) = parts.split_last() else {
        return Ok(()); // the layer's root itself
    };
    let name_bytes = last.as_bytes();
    let parent = open_dir(root, parents, true).map_err(|e| format!("parent directory: {e}"))?;
    let header = entry.header().clone();
    let kind = header.entry_type();
    let default_mode = if kind == tar::EntryType::Directory { 0o755 } else { 0o644 };
    let mode = header.mode().unwrap_or(default_mode) & 0o7777;
    // An empty numeric field reads as 0, as GNU tar does.
    let (uid, gid) = (header.uid().unwrap_or(0) as libc::uid_t, header.gid().unwrap_or(0) as libc::gid_t);
    let io_err = |what: &str, e: io::Error| format!("{what}: {e}");

    // Whiteouts.
    if name_bytes == b".wh..wh..opq" {
        let key = cstr(b"trusted.overlay.opaque").unwrap();
        // SAFETY: valid fd, C string and a 1-byte value.
        return check(unsafe { libc::fsetxattr(parent.as_raw_fd(), key.as_ptr(), b"y".as_ptr().cast(), 1, 0) })
            .map_err(|e| io_err("set trusted.overlay.opaque", e));
    }
    if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
        if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/') {
            return Err("a whiteout naming nothing".into());
        }
        let name = cstr(hidden).map_err(|e| io_err("name", e))?;
        remove_existing(&parent, &name, false).map_err(|e| io_err("replace", e))?;
        // SAFETY: valid fd and C string; 0:0 character device = overlayfs whiteout.
        return check(unsafe { libc::mknodat(parent.as_raw_fd(), name.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) })
            .map_err(|e| io_err("create whiteout", e));
    }

    let name = cstr(name_bytes).map_err(|e| io_err("name", e))?;
    let pfd = parent.as_raw_fd();
    match kind {
        tar::EntryType::Directory => {
            if !remove_existing(&parent, &name, true).map_err(|e| io_err("replace", e))? {
                // SAFETY: valid fd and C string.
                check(unsafe { libc::mkdirat(pfd, name.as_ptr(), 0o700) }).map_err(|e| io_err("mkdir", e))?;
            }
            let dir = open_path(
                pfd,
                Path::new(OsStr::from_bytes(name_bytes)),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                libc::RESOLVE_BENEATH,
            )
            .map_err(|e| io_err("open directory", e))?;
            set_xattrs(&dir, entry)?;
            // SAFETY: valid fd.
            check(unsafe { libc::fchown(dir.as_raw_fd(), uid, gid) }).map_err(|e| io_err("chown", e))?;
            // SAFETY: valid fd.
            check(unsafe { libc::fchmod(dir.as_raw_fd(), mode) }).map_err(|e| io_err("chmod", e))?;
            return Ok(());
        }
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            remove_existing(&parent, &name, false).map_err(|e| io_err("replace", e))?;
            // SAFETY: valid fd and C string.
            let fd = unsafe {
                libc::openat(
                    pfd,
                    name.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0o600,
                )
            };
            if fd < 0 {
                return Err(io_err("create", io::Error::last_os_error()));
            }
            // SAFETY: a new descriptor we own.
            let mut file = unsafe { File::from_raw_fd(fd) };
            io::copy(entry, &mut file).map_err(|e| io_err("write", e))?;
            let owned: OwnedFd = file.into();
            set_xattrs(&owned, entry)?;
            // chown before chmod: chown clears set-id bits.
            // SAFETY: valid fd.
            check(unsafe { libc::fchown(owned.as_raw_fd(), uid, gid) }).map_err(|e| io_err("chown", e))?;
            // SAFETY: valid fd.
            check(unsafe { libc::fchmod(owned.as_raw_fd(), mode) }).map_err(|e| io_err("chmod", e))?;
        }
        tar::EntryType::Symlink => {
            let target = entry.link_name_bytes().ok_or("a symlink without a target")?;
            let target = cstr(&target).map_err(|e| io_err("target", e))?;
            remove_existing(&parent, &name, false).map_err(|e| io_err("replace", e))?;
            // SAFETY: valid fd and C strings. The target is stored as is: it is only ever
            // resolved inside the container (its rootfs is its `/`) or here with RESOLVE_IN_ROOT.
            check(unsafe { libc::symlinkat(target.as_ptr(), pfd, name.as_ptr()) }).map_err(|e| io_err("symlink", e))?;
            // SAFETY: valid fd and C string; does not follow the link.
            check(unsafe { libc::fchownat(pfd, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
                .map_err(|e| io_err("chown", e))?;
        }
        tar::EntryType::Link => {
            let target =
                entry.link_name().map_err(|e| format!("link target: {e}"))?.ok_or("a hard link without a target")?;
            let tparts = clean_components(&target).map_err(|e| format!("link target {target:?}: {e}"))?;
            let (tlast, tparents) = tparts.split_last().ok_or("a hard link to the layer's root")?;
            let tdir = open_dir(root, tparents, false).map_err(|e| format!("link target {target:?}: {e}"))?;
            let tname = cstr(tlast.as_bytes()).map_err(|e| io_err("target", e))?;
            remove_existing(&parent, &name, false).map_err(|e| io_err("replace", e))?;
            // SAFETY: valid fds and C strings; the target's last component is not followed.
            check(unsafe { libc::linkat(tdir.as_raw_fd(), tname.as_ptr(), pfd, name.as_ptr(), 0) })
                .map_err(|e| io_err(&format!("link to {target:?}"), e))?;
            return Ok(());
        }
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            let fmt = match kind {
                tar::EntryType::Char => libc::S_IFCHR,
                tar::EntryType::Block => libc::S_IFBLK,
                _ => libc::S_IFIFO,
            };
            let major = header.device_major().ok().flatten().unwrap_or(0);
            let minor = header.device_minor().ok().flatten().unwrap_or(0);
            remove_existing(&parent, &name, false).map_err(|e| io_err("replace", e))?;
            // SAFETY: valid fd and C string.
            check(unsafe { libc::mknodat(pfd, name.as_ptr(), fmt | mode, libc::makedev(major, minor)) })
                .map_err(|e| io_err("mknod", e))?;
            // SAFETY: valid fd and C string.
            check(unsafe { libc::fchownat(pfd, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })
                .map_err(|e| io_err("chown", e))?;
        }
        // PAX/GNU headers are consumed by the tar reader; anything else has no file to make.
        _ => return Ok(()),
    }
    if let Ok(mtime) = header.mtime() {
        let t = libc::timespec { tv_sec: mtime as libc::time_t, tv_nsec: 0 };
        let times = [t, t];
        // SAFETY: valid fd, C string and two timespecs.
        unsafe { libc::utimensat(pfd, name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    }
    Ok(())
}

/// Applies the entry's PAX `SCHILY.xattr.*` records (file capabilities, ...) to `fd`.
fn set_xattrs<R: Read>(fd: &OwnedFd, entry: &mut tar::Entry<R>) -> Result<(), String> {
    let Ok(Some(exts)) = entry.pax_extensions() else {
        return Ok(());
    };
    for ext in exts.flatten() {
        let Some(key) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else { continue };
        // The overlay's own attributes are never taken from an image.
        if key.starts_with(b"trusted.overlay.") {
            continue;
        }
        let k = cstr(key).map_err(|e| format!("xattr name: {e}"))?;
        let v = ext.value_bytes();
        // SAFETY: valid fd, C string and value buffer.
        check(unsafe { libc::fsetxattr(fd.as_raw_fd(), k.as_ptr(), v.as_ptr().cast(), v.len(), 0) })
            .map_err(|e| format!("set xattr {}: {e}", String::from_utf8_lossy(key)))?;
    }
    Ok(())
}
