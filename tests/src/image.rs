//! The test image: a busybox root file system built from Debian's `busybox-static`, as a
//! directory (for `ctr run --rootfs <dir>`) and as an OCI image archive (for
//! `ctr image import`), both built once and cached under `<workspace>/build/test-images/`.
//! A second image, [`netadmin`], adds the host's own network tools (Debian's iptables, iproute2
//! and ipvsadm binaries with their shared libraries) for the guest kernel tests.
//!
//! The cache key is a hash of the busybox binary and of this module's format version, so a new
//! busybox or a change of layout here builds a fresh copy; builds go to a temporary name and are
//! renamed into place, so parallel tests and test binaries never see a half-built image.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Where `busybox-static` installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// The name the OCI archive imports as (`ctr image import`, then `ctr run <IMAGE_REF> ...`).
pub const IMAGE_REF: &str = "docker.io/podvisor/busybox:test";

/// `PATH` of the image configuration (containerd puts it into the container's environment).
pub const IMAGE_PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Bumped whenever the layout below changes, so that cached copies are rebuilt.
const FORMAT: &str = "podvisor-busybox-image-v1";

/// The built test image.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// The root file system directory, for `ctr run --rootfs <rootfs>`.
    pub rootfs: PathBuf,
    /// The OCI image archive (`oci-layout`, `index.json`, `blobs/sha256/...`).
    pub archive: PathBuf,
    /// The image name the archive carries: [`IMAGE_REF`].
    pub reference: &'static str,
}

/// One entry of the root file system.
enum Entry {
    Dir(u32),
    File(Vec<u8>, u32),
    Symlink(String),
}

/// The cache directory: `<workspace>/build/test-images`.
pub fn cache_dir() -> PathBuf {
    crate::workspace().join("build/test-images")
}

/// The busybox test image, built on first use (panics with the fix when busybox is missing:
/// a missing prerequisite is a test failure, never a skip).
pub fn busybox() -> TestImage {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    build(&cache_dir()).unwrap_or_else(|e| panic!("building the busybox test image failed: {e}"))
}

/// The rootfs directory of the busybox test image (see [`busybox`]).
pub fn busybox_rootfs() -> PathBuf {
    busybox().rootfs
}

/// The OCI archive of the busybox test image (see [`busybox`]).
pub fn busybox_archive() -> PathBuf {
    busybox().archive
}

/// A static `sysv-shm` binary (source `tests/helpers/sysv-shm.rs`) that runs in the busybox
/// image, built once with the `rustc` that builds the tests and cached by the source's hash.
pub fn sysv_shm_helper() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let src = crate::workspace().join("tests/helpers/sysv-shm.rs");
    let text = fs::read(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let out = cache_dir().join(format!("sysv-shm-{}", &sha256_hex(&text)[..16]));
    if out.is_file() {
        return out;
    }
    fs::create_dir_all(cache_dir()).unwrap();
    let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    // Static (glibc, static-pie) as the agent is built: the busybox image has no libc.
    let status = Command::new(&rustc)
        .args([
            "--edition",
            "2021",
            "-O",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-C",
            "target-feature=+crt-static",
            "-o",
        ])
        .arg(&tmp)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("{rustc}: {e}: the Rust toolchain that builds the tests is needed"));
    assert!(status.success(), "{rustc} {}: {status}", src.display());
    fs::rename(&tmp, &out).unwrap_or_else(|e| panic!("{} -> {}: {e}", tmp.display(), out.display()));
    out
}

fn build(cache: &Path) -> Result<TestImage, String> {
    let binary = fs::read(BUSYBOX)
        .map_err(|e| format!("{BUSYBOX}: {e}: install Debian's busybox-static (scripts/deps.sh does, as root)"))?;
    let mut key = Sha256::new();
    key.update(FORMAT.as_bytes());
    key.update(&binary);
    let key = hex(&key.finalize())[..16].to_string();
    let dir = cache.join(format!("busybox-{key}"));
    let image = TestImage { rootfs: dir.join("rootfs"), archive: dir.join("busybox-oci.tar"), reference: IMAGE_REF };
    if image.rootfs.join("bin/busybox").is_file() && image.archive.is_file() {
        return Ok(image);
    }

    let entries = layout(binary)?;
    fs::create_dir_all(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let tmp = cache.join(format!(".busybox-{key}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| {
        fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        write_rootfs(&tmp.join("rootfs"), &entries)?;
        write_archive(&tmp.join("busybox-oci.tar"), &entries, IMAGE_REF, BUSYBOX_CREATED_BY)?;
        match fs::rename(&tmp, &dir) {
            Ok(()) => Ok(()),
            // Another process finished first: use its copy.
            Err(_) if image.rootfs.join("bin/busybox").is_file() && image.archive.is_file() => Ok(()),
            Err(e) => Err(format!("renaming {} to {}: {e}", tmp.display(), dir.display())),
        }
    })();
    let _ = fs::remove_dir_all(&tmp);
    result.map(|()| image)
}

/// The root file system: `/bin/busybox`, a symlink per applet in `/bin` (`/bin/sh` among them),
/// users root and nobody, and the usual empty directories and files.
fn layout(binary: Vec<u8>) -> Result<BTreeMap<String, Entry>, String> {
    let out = Command::new(BUSYBOX).arg("--list").output().map_err(|e| format!("{BUSYBOX} --list: {e}"))?;
    if !out.status.success() {
        return Err(format!("{BUSYBOX} --list failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let mut e = BTreeMap::new();
    for d in ["bin", "dev", "etc", "proc", "root", "run", "sys", "usr", "usr/bin", "usr/sbin", "sbin", "var", "var/run"]
    {
        e.insert(d.to_string(), Entry::Dir(0o755));
    }
    e.insert("root".into(), Entry::Dir(0o700));
    e.insert("tmp".into(), Entry::Dir(0o1777));
    e.insert("var/tmp".into(), Entry::Dir(0o1777));
    for applet in String::from_utf8_lossy(&out.stdout).lines().map(str::trim) {
        // `busybox` itself is in the list: linking it would replace the binary by a loop.
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        e.insert(format!("bin/{applet}"), Entry::Symlink("busybox".into()));
    }
    e.insert("bin/busybox".into(), Entry::File(binary, 0o755));
    if !e.contains_key("bin/sh") {
        return Err(format!("{BUSYBOX} has no sh applet"));
    }
    let text = |s: &str| Entry::File(s.as_bytes().to_vec(), 0o644);
    e.insert(
        "etc/passwd".into(),
        text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
    );
    e.insert("etc/group".into(), text("root:x:0:\nnobody:x:65534:\n"));
    e.insert("etc/hostname".into(), text(""));
    e.insert("etc/hosts".into(), text("127.0.0.1\tlocalhost\n::1\tlocalhost\n"));
    e.insert("etc/resolv.conf".into(), text(""));
    Ok(e)
}

fn write_rootfs(root: &Path, entries: &BTreeMap<String, Entry>) -> Result<(), String> {
    fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
    // BTreeMap order puts every directory before what it contains.
    for (path, entry) in entries {
        let p = root.join(path);
        let r = match entry {
            Entry::Dir(mode) => {
                fs::create_dir_all(&p).and_then(|()| fs::set_permissions(&p, fs::Permissions::from_mode(*mode)))
            }
            Entry::File(data, mode) => {
                fs::write(&p, data).and_then(|()| fs::set_permissions(&p, fs::Permissions::from_mode(*mode)))
            }
            Entry::Symlink(target) => symlink(target, &p),
        };
        r.map_err(|e| format!("{}: {e}", p.display()))?;
    }
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).map_err(|e| format!("{}: {e}", root.display()))
}

/// The uncompressed layer: a deterministic tar (uid 0, mtime 0) of the entries.
fn layer_tar(entries: &BTreeMap<String, Entry>) -> Result<Vec<u8>, String> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, entry) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let r = match entry {
            Entry::Dir(mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())
            }
            Entry::File(data, mode) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())
            }
            Entry::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, target)
            }
        };
        r.map_err(|e| format!("layer tar entry {path}: {e}"))?;
    }
    b.into_inner().map_err(|e| format!("layer tar: {e}"))
}

fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The history entry of the busybox image's configuration.
const BUSYBOX_CREATED_BY: &str = "podvisor-tests image.rs (busybox-static)";

/// An OCI image layout in a tar: `oci-layout`, `index.json` (named `reference`, e.g.
/// [`IMAGE_REF`], through both `org.opencontainers.image.ref.name` and containerd's
/// `io.containerd.image.name`), and the manifest, config and gzip layer blobs.
fn write_archive(
    path: &Path,
    entries: &BTreeMap<String, Entry>,
    reference: &str,
    created_by: &str,
) -> Result<(), String> {
    let layer = layer_tar(entries)?;
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&layer).map_err(|e| format!("gzip: {e}"))?;
    let layer_gz = gz.finish().map_err(|e| format!("gzip: {e}"))?;

    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": [IMAGE_PATH_ENV],
            "Cmd": ["sh"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": created_by }],
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&config)),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{}", sha256_hex(&layer_gz)),
            "size": layer_gz.len(),
        }],
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&manifest)),
            "size": manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": reference,
                "org.opencontainers.image.ref.name": reference,
            },
        }],
    }))
    .unwrap();

    let mut files: Vec<(String, &[u8])> =
        vec![("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#), ("index.json".into(), &index)];
    for blob in [&manifest, &config, &layer_gz] {
        files.push((format!("blobs/sha256/{}", sha256_hex(blob)), blob.as_slice()));
    }
    let mut b = tar::Builder::new(Vec::new());
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(0);
        h.set_size(0);
        b.append_data(&mut h, dir, std::io::empty()).map_err(|e| format!("archive: {e}"))?;
    }
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, &name, data).map_err(|e| format!("archive entry {name}: {e}"))?;
    }
    let bytes = b.into_inner().map_err(|e| format!("archive: {e}"))?;
    fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// The name the [`netadmin`] image imports as.
pub const NETADMIN_REF: &str = "docker.io/podvisor/netadmin:test";

/// Bumped whenever the netadmin layout below changes.
const NETADMIN_FORMAT: &str = "podvisor-netadmin-image-v1";

/// Host programs the [`netadmin`] image carries: (host path, path in the image, Debian package).
pub const NETADMIN_PROGRAMS: &[(&str, &str, &str)] = &[
    ("/usr/sbin/xtables-legacy-multi", "usr/sbin/xtables-legacy-multi", "iptables"),
    ("/usr/sbin/xtables-nft-multi", "usr/sbin/xtables-nft-multi", "iptables"),
    // iproute2's ip (busybox's cannot create vxlan devices) and tc; /usr/sbin precedes /bin in
    // the image's PATH, so they shadow busybox's applets.
    ("/bin/ip", "usr/sbin/ip", "iproute2"),
    ("/sbin/tc", "usr/sbin/tc", "iproute2"),
    ("/usr/sbin/ipvsadm", "usr/sbin/ipvsadm", "ipvsadm"),
];

/// iptables' extensions (dlopen()ed by libxtables from its compiled-in directory).
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";

/// The names Debian's iptables package links to its two multi-call binaries.
const XTABLES_LINKS: &[(&str, &str)] = &[
    ("iptables-legacy", "xtables-legacy-multi"),
    ("iptables-legacy-save", "xtables-legacy-multi"),
    ("iptables-legacy-restore", "xtables-legacy-multi"),
    ("ip6tables-legacy", "xtables-legacy-multi"),
    ("ip6tables-legacy-save", "xtables-legacy-multi"),
    ("ip6tables-legacy-restore", "xtables-legacy-multi"),
    ("iptables-nft", "xtables-nft-multi"),
    ("iptables-nft-save", "xtables-nft-multi"),
    ("iptables-nft-restore", "xtables-nft-multi"),
    ("ip6tables-nft", "xtables-nft-multi"),
    ("ip6tables-nft-save", "xtables-nft-multi"),
    ("ip6tables-nft-restore", "xtables-nft-multi"),
];

/// The busybox image plus real network administration tools copied from the host: Debian's
/// `iptables` (xtables-legacy-multi, xtables-nft-multi, their `iptables-legacy`/`iptables-nft`
/// names and extensions), iproute2's `ip` and `tc`, and `ipvsadm`, each with the shared libraries
/// `ldd` lists (the dynamic loader included) at the same paths. Built on first use and cached as
/// [`busybox`] is; a missing program fails with the package to install.
pub fn netadmin() -> TestImage {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    build_netadmin(&cache_dir()).unwrap_or_else(|e| panic!("building the netadmin test image failed: {e}"))
}

fn build_netadmin(cache: &Path) -> Result<TestImage, String> {
    let busybox = fs::read(BUSYBOX)
        .map_err(|e| format!("{BUSYBOX}: {e}: install Debian's busybox-static (scripts/deps.sh does, as root)"))?;
    let mut entries = layout(busybox)?;
    let mut elf_files: Vec<PathBuf> = Vec::new();
    for (host, inside, package) in NETADMIN_PROGRAMS {
        let data = fs::read(host)
            .map_err(|e| format!("{host}: {e}: install Debian's {package} (scripts/deps.sh does, as root)"))?;
        add_file(&mut entries, inside, data, 0o755);
        elf_files.push(PathBuf::from(host));
    }
    for (name, target) in XTABLES_LINKS {
        entries.insert(format!("usr/sbin/{name}"), Entry::Symlink((*target).to_string()));
    }
    let plugins = fs::read_dir(XTABLES_DIR)
        .map_err(|e| format!("{XTABLES_DIR}: {e}: install Debian's iptables (scripts/deps.sh does, as root)"))?;
    for p in plugins.flatten().map(|e| e.path()) {
        if p.extension().is_some_and(|x| x == "so") {
            let data = fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            add_file(&mut entries, p.to_str().unwrap().trim_start_matches('/'), data, 0o644);
            elf_files.push(p);
        }
    }
    let mut libs = std::collections::BTreeSet::new();
    for f in &elf_files {
        libs.extend(shared_libraries(f)?);
    }
    for lib in libs {
        let data = fs::read(&lib).map_err(|e| format!("{lib}: {e}"))?;
        add_file(&mut entries, lib.trim_start_matches('/'), data, 0o755);
    }

    let mut key = Sha256::new();
    key.update(NETADMIN_FORMAT.as_bytes());
    for (path, entry) in &entries {
        key.update(path.as_bytes());
        match entry {
            Entry::Dir(m) => key.update(format!("d{m}")),
            Entry::File(data, m) => {
                key.update(format!("f{m}"));
                key.update(data);
            }
            Entry::Symlink(t) => key.update(format!("l{t}")),
        }
        key.update([0u8]);
    }
    let key = hex(&key.finalize())[..16].to_string();
    let dir = cache.join(format!("netadmin-{key}"));
    let image =
        TestImage { rootfs: dir.join("rootfs"), archive: dir.join("netadmin-oci.tar"), reference: NETADMIN_REF };
    let ready = || image.rootfs.join("usr/sbin/xtables-nft-multi").is_file() && image.archive.is_file();
    if ready() {
        return Ok(image);
    }
    fs::create_dir_all(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let tmp = cache.join(format!(".netadmin-{key}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| {
        fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        write_rootfs(&tmp.join("rootfs"), &entries)?;
        let created_by = "podvisor-tests image.rs (busybox-static + host iptables, iproute2, ipvsadm)";
        write_archive(&tmp.join("netadmin-oci.tar"), &entries, NETADMIN_REF, created_by)?;
        match fs::rename(&tmp, &dir) {
            Ok(()) => Ok(()),
            Err(_) if ready() => Ok(()),
            Err(e) => Err(format!("renaming {} to {}: {e}", tmp.display(), dir.display())),
        }
    })();
    let _ = fs::remove_dir_all(&tmp);
    result.map(|()| image)
}

/// Adds a file and every missing parent directory (0755) to `entries`.
fn add_file(entries: &mut BTreeMap<String, Entry>, path: &str, data: Vec<u8>, mode: u32) {
    let mut parent = Path::new(path).parent();
    while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
        entries.entry(p.to_string_lossy().into_owned()).or_insert(Entry::Dir(0o755));
        parent = p.parent();
    }
    entries.insert(path.to_string(), Entry::File(data, mode));
}

/// The shared libraries (absolute paths, the dynamic loader included) `ldd` lists for `elf`.
fn shared_libraries(elf: &Path) -> Result<Vec<String>, String> {
    let out = Command::new("ldd").arg(elf).output().map_err(|e| format!("ldd {}: {e}", elf.display()))?;
    if !out.status.success() {
        return Err(format!("ldd {}: {}", elf.display(), String::from_utf8_lossy(&out.stderr)));
    }
    parse_ldd(&String::from_utf8_lossy(&out.stdout)).map_err(|e| format!("ldd {}: {e}", elf.display()))
}

/// Library paths of `ldd` output (`name => /path (addr)` and `/path (addr)` lines; the vDSO has
/// no file).
fn parse_ldd(text: &str) -> Result<Vec<String>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let p = rest.split_whitespace().next().unwrap_or("");
                if p == "not" || !p.starts_with('/') {
                    return Err(format!("{} is not found", name.trim()));
                }
                p
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(path.to_string());
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_is_deterministic_and_has_busybox_links() {
        let entries = layout(b"not really busybox".to_vec()).unwrap();
        assert!(matches!(entries.get("bin/sh"), Some(Entry::Symlink(t)) if t == "busybox"));
        assert!(matches!(entries.get("bin/busybox"), Some(Entry::File(..))));
        let a = layer_tar(&entries).unwrap();
        let b = layer_tar(&entries).unwrap();
        assert_eq!(sha256_hex(&a), sha256_hex(&b));
        let mut ar = tar::Archive::new(a.as_slice());
        let names: Vec<String> =
            ar.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect();
        let pos = |n: &str| names.iter().position(|x| x.trim_end_matches('/') == n).unwrap();
        assert!(pos("bin") < pos("bin/sh"), "directories come before their contents");
        assert!(names.iter().any(|n| n == "etc/passwd"));
    }

    #[test]
    fn ldd_output_gives_library_paths() {
        let text =
            "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibxtables.so.12 => /lib/x86_64-linux-gnu/libxtables.so.12 (0x7f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libxtables.so.12",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err().contains("libfoo.so.1"));
    }

    #[test]
    fn added_files_get_their_parent_directories() {
        let mut e = BTreeMap::new();
        add_file(&mut e, "usr/lib/x86_64-linux-gnu/xtables/libxt_REDIRECT.so", b"x".to_vec(), 0o644);
        for d in ["usr", "usr/lib", "usr/lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu/xtables"] {
            assert!(matches!(e.get(d), Some(Entry::Dir(0o755))), "{d}");
        }
    }
}
