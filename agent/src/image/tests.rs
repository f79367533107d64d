//! Guest pull against a real registry: Debian's `docker-registry` (distribution 2.8) on
//! 127.0.0.1:<free port> with a private storage directory, images pushed over its HTTP API by
//! the test (layers built here: gzip, zstd, plain; whiteouts, opaque directories, escapes).
//! Needs root (overlay mounts, mknod, trusted.* xattrs) and /usr/bin/docker-registry.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agent_protocol::agent as pb;
use base64::Engine;

use super::registry::sha256_of;
use super::*;
use crate::sandbox;

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// bcrypt of "s3cret" (htpasswd user `podvisor`).
const HTPASSWD: &str = "podvisor:$2b$12$93MbcGCggH6HlybLQCGKtODyGKGtB5UuJ/3L7jWxIUKMCE3CwYr5q\n";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A scratch directory with a tmpfs mounted on `store` (the guest's /run is a tmpfs).
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "podvisor-pull-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("store")).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &dir.join("store"),
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            Some("size=256m"),
        )
        .expect("mount a tmpfs for the image store (run the tests as root)");
        Scratch { dir }
    }

    fn store(&self) -> PathBuf {
        self.dir.join("store")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = self.dir.display().to_string();
        let mut mps: Vec<&str> =
            info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with(&prefix)).collect();
        mps.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mps {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private docker-registry process.
struct Registry {
    child: Child,
    addr: String,
    data: PathBuf,
    auth: Option<String>,
    _dir: Scratch,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Registry {
    fn start(with_auth: bool) -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: install Debian's docker-registry package (scripts/deps.sh does)"
        );
        let dir = Scratch::new("registry");
        let data = dir.dir.join("data");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            data.display()
        );
        if with_auth {
            std::fs::write(dir.dir.join("htpasswd"), HTPASSWD).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: podvisor-test\n    path: {}\n",
                dir.dir.join("htpasswd").display()
            ));
        }
        std::fs::write(dir.dir.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.dir.join("registry.log")).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(dir.dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let auth = with_auth.then(|| base64::engine::general_purpose::STANDARD.encode("podvisor:s3cret"));
        let reg = Registry { child, addr, data, auth, _dir: dir };
        let start = Instant::now();
        loop {
            if let Ok((code, _, _)) = reg.try_http("GET", "/v2/", &[], &[]) {
                if code == 200 || code == 401 {
                    return reg;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(20), "docker-registry did not answer on {}", reg.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> std::io::Result<(u16, HashMap<String, String>, Vec<u8>)> {
        let mut s = TcpStream::connect(&self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        if let Some(a) = &self.auth {
            req.push_str(&format!("Authorization: Basic {a}\r\n"));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        s.write_all(body)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)?;
        let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(resp.len());
        let head = String::from_utf8_lossy(&resp[..split]).to_string();
        let mut lines = head.lines();
        let code = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).unwrap_or(0);
        let hdrs = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok((code, hdrs, resp.get(split + 4..).unwrap_or_default().to_vec()))
    }

    fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> (u16, HashMap<String, String>) {
        let (code, h, b) = self.try_http(method, path, headers, body).expect("registry request");
        assert!((200..300).contains(&code), "{method} {path}: {code} {}", String::from_utf8_lossy(&b));
        (code, h)
    }

    fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256_of(data);
        let (_, h) = self.http("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], &[]);
        let loc = h.get("location").expect("upload location").clone();
        let loc = loc.split_once(&self.addr).map(|(_, p)| p.to_string()).unwrap_or(loc);
        let sep = if loc.contains('?') { '&' } else { '?' };
        self.http(
            "PUT",
            &format!("{loc}{sep}digest={digest}"),
            &[("Content-Type", "application/octet-stream".into())],
            data,
        );
        digest
    }

    fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> String {
        self.http("PUT", &format!("/v2/{repo}/manifests/{reference}"), &[("Content-Type", media_type.into())], body);
        sha256_of(body)
    }

    /// The file the registry serves blob `digest` from.
    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.data.join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

/// One tar entry of a test layer.
enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    FileMode(&'a str, &'a [u8], u32, u64),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    /// A name written raw into the header (the tar crate refuses `..` otherwise).
    Raw(&'a [u8], &'a [u8]),
}

fn tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        match e {
            E::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::File(p, d) => {
                h.set_mode(0o644);
                h.set_size(d.len() as u64);
                b.append_data(&mut h, p, *d).unwrap();
            }
            E::FileMode(p, d, mode, owner) => {
                h.set_mode(*mode);
                h.set_uid(*owner);
                h.set_gid(*owner);
                h.set_size(d.len() as u64);
                b.append_data(&mut h, p, *d).unwrap();
            }
            E::Symlink(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::Hardlink(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
            E::Raw(name, d) => {
                h.set_mode(0o644);
                h.set_size(d.len() as u64);
                h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
                h.set_cksum();
                b.append(&h, *d).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

struct Layer {
    media_type: &'static str,
    blob: Vec<u8>,
    diff_id: String,
}

fn gzip_layer(t: Vec<u8>) -> Layer {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&t).unwrap();
    Layer {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        blob: enc.finish().unwrap(),
        diff_id: sha256_of(&t),
    }
}

/// Two zstd frames with a skippable frame between them (as zstd:chunked writes).
fn zstd_layer(t: Vec<u8>) -> Layer {
    let (a, b) = t.split_at(t.len() / 2);
    let mut blob = Vec::new();
    ruzstd::encoding::compress(a, &mut blob, ruzstd::encoding::CompressionLevel::Fastest);
    blob.extend_from_slice(&0x184D2A50u32.to_le_bytes());
    blob.extend_from_slice(&5u32.to_le_bytes());
    blob.extend_from_slice(b"skip!");
    let mut second = Vec::new();
    ruzstd::encoding::compress(b, &mut second, ruzstd::encoding::CompressionLevel::Fastest);
    blob.extend_from_slice(&second);
    Layer { media_type: "application/vnd.oci.image.layer.v1.tar+zstd", blob, diff_id: sha256_of(&t) }
}

fn plain_layer(t: Vec<u8>) -> Layer {
    Layer { media_type: "application/vnd.oci.image.layer.v1.tar", diff_id: sha256_of(&t), blob: t }
}

/// Pushes the layers, config and manifest; returns (manifest digest, manifest size).
fn push_image(reg: &Registry, repo: &str, tag: Option<&str>, layers: &[Layer]) -> (String, usize) {
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    .to_string();
    let config_digest = reg.push_blob(repo, config.as_bytes());
    let descs: Vec<_> = layers
        .iter()
        .map(|l| {
            let d = reg.push_blob(repo, &l.blob);
            serde_json::json!({"mediaType": l.media_type, "digest": d, "size": l.blob.len()})
        })
        .collect();
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs})
    .to_string();
    let reference = tag.map(str::to_string).unwrap_or_else(|| sha256_of(manifest.as_bytes()));
    let digest = reg.push_manifest(repo, &reference, "application/vnd.oci.image.manifest.v1+json", manifest.as_bytes());
    (digest, manifest.len())
}

fn settings(reg: &Registry) -> Settings {
    Settings { insecure_registries: vec![reg.addr.clone()], ..Settings::default() }
}

fn puller(scratch: &Scratch, settings: Settings) -> Puller {
    Puller { store: scratch.store(), settings, pause_binary: PathBuf::from("/proc/self/exe") }
}

fn storage(image: &str, mount_point: &Path, metadata: serde_json::Value) -> pb::Storage {
    pb::Storage {
        driver: DRIVER.into(),
        driver_options: vec![format!("{DRIVER}={}", serde_json::json!({ "metadata": metadata }))],
        source: image.into(),
        fstype: "overlay".into(),
        mount_point: mount_point.display().to_string(),
        ..Default::default()
    }
}

fn is_mounted(p: &Path) -> bool {
    let p = p.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(&p))
}

fn cached_layers(store: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store.join("layers/sha256"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// No temporary download or unpack directory left in the layer store.
fn assert_no_temporaries(store: &Path) {
    let left: Vec<_> = std::fs::read_dir(store.join("layers"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().to_string()).filter(|n| n != "sha256").collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "temporaries left in the layer store: {left:?}");
}

fn base_layers() -> Vec<Layer> {
    let l1 = gzip_layer(tar(&[
        E::Dir("etc"),
        E::File("etc/conf", b"layer1"),
        E::Hardlink("etc/conf-hardlink", "etc/conf"),
        E::Symlink("link", "/etc/conf"),
        E::Dir("data"),
        E::File("data/a", b"a"),
        E::File("data/b", b"b"),
        E::Dir("opq"),
        E::File("opq/old1", b"old"),
        E::Dir("opq/sub"),
        E::File("opq/sub/old2", b"old"),
        E::FileMode("bin/setuid-tool", b"#!", 0o4755, 1000),
    ]));
    let l2 = zstd_layer(tar(&[
        E::File("data/.wh.a", b""),
        E::File("opq/.wh..wh..opq", b""),
        E::File("opq/new", b"new"),
        E::File("etc/conf", b"layer2"),
    ]));
    let l3 = plain_layer(tar(&[E::File("added", b"plain tar layer")]));
    vec![l1, l2, l3]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_an_index_with_gzip_zstd_and_plain_layers_whiteouts_and_opaque_dirs() {
    let reg = Registry::start(false);
    let scratch = Scratch::new("pull");
    let (amd64, amd64_size) = push_image(&reg, "test/img", None, &base_layers());
    let (arm64, arm64_size) =
        push_image(&reg, "test/img", None, &[gzip_layer(tar(&[E::File("wrong-platform", b"arm64")]))]);
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": arm64, "size": arm64_size, "platform": {"os": "linux", "architecture": "arm64"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": amd64, "size": amd64_size, "platform": {"os": "linux", "architecture": "amd64"}}]})
    .to_string();
    reg.push_manifest("test/img", "v1", "application/vnd.oci.image.index.v1+json", index.as_bytes());

    let p = puller(&scratch, settings(&reg));
    let rootfs = scratch.dir.join("c1/rootfs");
    let image = format!("{}/test/img:v1", reg.addr);
    let started = Instant::now();
    let pulled = p.mount(&storage(&image, &rootfs, serde_json::json!({})), 0, "c1").await.unwrap();
    eprintln!("pull of 3 layers took {:?}", started.elapsed());
    assert!(!pulled.pause);
    assert!(is_mounted(&rootfs));
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).ok();
    assert_eq!(read("etc/conf").as_deref(), Some("layer2"), "the upper layer's file wins");
    assert_eq!(read("etc/conf-hardlink").as_deref(), Some("layer1"), "the hard link kept layer 1's content");
    assert_eq!(std::fs::read_link(rootfs.join("link")).unwrap(), Path::new("/etc/conf"));
    assert!(!rootfs.join("data/a").exists(), "whiteout .wh.a must hide data/a");
    assert_eq!(read("data/b").as_deref(), Some("b"));
    assert!(
        !rootfs.join("opq/old1").exists() && !rootfs.join("opq/sub").exists(),
        "opaque dir hides the lower content"
    );
    assert_eq!(read("opq/new").as_deref(), Some("new"));
    assert_eq!(read("added").as_deref(), Some("plain tar layer"));
    assert!(!rootfs.join("wrong-platform").exists(), "the arm64 manifest was pulled");
    let tool = std::fs::metadata(rootfs.join("bin/setuid-tool")).unwrap();
    assert_eq!((tool.permissions().mode() & 0o7777, tool.uid(), tool.gid()), (0o4755, 1000, 1000));
    assert_eq!(cached_layers(&scratch.store()).len(), 3);
    assert_no_temporaries(&scratch.store());

    // Writes go to the container's upper directory; removal takes upper/work away.
    std::fs::write(rootfs.join("written"), b"x").unwrap();
    let upper = scratch.store().join("containers/c1/upper");
    assert!(upper.join("written").exists());
    let errors = sandbox::unmount_all(&[pulled.mounted]);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!is_mounted(&rootfs));
    assert!(!scratch.store().join("containers/c1").exists(), "upper/work of c1 left behind");
    assert_eq!(cached_layers(&scratch.store()).len(), 3, "cached layers stay for the next container");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_container_reuses_the_cached_layers() {
    let reg = Registry::start(false);
    let scratch = Scratch::new("cache");
    let layers = base_layers();
    push_image(&reg, "test/cache", Some("v1"), &layers);
    let p = puller(&scratch, settings(&reg));
    let image = format!("{}/test/cache:v1", reg.addr);
    let r1 = scratch.dir.join("c1/rootfs");
    let first = p.mount(&storage(&image, &r1, serde_json::json!({})), 0, "c1").await.unwrap();
    // Mark the cached bottom layer: a reused layer shows the mark, a re-pulled one would not.
    let hex = layers[0].blob.as_slice();
    let bottom = scratch.store().join("layers/sha256").join(&sha256_of(hex)[7..]);
    std::fs::write(bottom.join("cache-mark"), b"reused").unwrap();
    // Make the registry unable to serve layer blobs: only the manifest and config are fetched.
    for l in &layers {
        std::fs::remove_file(reg.blob_file(&sha256_of(&l.blob))).unwrap();
    }
    let r2 = scratch.dir.join("c2/rootfs");
    let second = p.mount(&storage(&image, &r2, serde_json::json!({})), 1, "c2").await.unwrap();
    assert_eq!(std::fs::read_to_string(r2.join("cache-mark")).unwrap(), "reused");
    assert_eq!(std::fs::read_to_string(r2.join("etc/conf")).unwrap(), "layer2");
    assert!(sandbox::unmount_all(&[first.mounted, second.mounted]).is_empty());
    assert!(!scratch.store().join("containers/c1").exists() && !scratch.store().join("containers/c2").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_blob_fails_naming_its_digest_and_leaves_nothing() {
    let reg = Registry::start(false);
    let scratch = Scratch::new("tamper");
    let layers = base_layers();
    push_image(&reg, "test/tamper", Some("v1"), &layers);
    let victim = sha256_of(&layers[1].blob);
    let file = reg.blob_file(&victim);
    let mut data = std::fs::read(&file).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff; // same size, other content
    std::fs::write(&file, &data).unwrap();
    let p = puller(&scratch, settings(&reg));
    let rootfs = scratch.dir.join("c1/rootfs");
    let e = p
        .mount(&storage(&format!("{}/test/tamper:v1", reg.addr), &rootfs, serde_json::json!({})), 3, "c1")
        .await
        .unwrap_err();
    assert!(e.contains(&victim) && e.contains("digest mismatch"), "{e}");
    assert!(e.starts_with("storages[3] (image_guest_pull"), "{e}");
    assert!(!is_mounted(&rootfs));
    assert!(!scratch.store().join("containers/c1").exists());
    assert!(!cached_layers(&scratch.store()).contains(&victim[7..].to_string()), "the tampered layer was cached");
    assert_no_temporaries(&scratch.store());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_escapes_are_refused_or_kept_inside_the_layer() {
    let reg = Registry::start(false);
    let scratch = Scratch::new("escape");
    let outside = scratch.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let p = puller(&scratch, settings(&reg));

    // `..` in an entry name.
    push_image(
        &reg,
        "test/dotdot",
        Some("v1"),
        &[plain_layer(tar(&[E::Raw(b"../../../../../../../../tmp/podvisor-dotdot", b"x")]))],
    );
    let e = p
        .mount(
            &storage(&format!("{}/test/dotdot:v1", reg.addr), &scratch.dir.join("c1/rootfs"), serde_json::json!({})),
            0,
            "c1",
        )
        .await
        .unwrap_err();
    assert!(e.contains("escape the layer"), "{e}");
    assert!(!Path::new("/tmp/podvisor-dotdot").exists());
    assert_no_temporaries(&scratch.store());

    // An absolute symlink to a host directory, then a file "through" it and a symlink-chain.
    let target = outside.display().to_string();
    push_image(
        &reg,
        "test/symlink",
        Some("v1"),
        &[gzip_layer(tar(&[
            E::Symlink("escape", &target),
            E::Dir(&target[1..]),
            E::File("escape/pwned", b"x"),
            E::Symlink("up", "../../../../../../.."),
            E::File("up/tmp/podvisor-up-pwned", b"x"),
        ]))],
    );
    let rootfs = scratch.dir.join("c2/rootfs");
    let r = p.mount(&storage(&format!("{}/test/symlink:v1", reg.addr), &rootfs, serde_json::json!({})), 0, "c2").await;
    assert!(!outside.join("pwned").exists(), "a layer wrote through an absolute symlink to the host");
    assert!(!Path::new("/tmp/podvisor-up-pwned").exists(), "a layer wrote through a relative symlink out of its root");
    // Resolved inside the layer instead: the files land under the layer's own tree.
    let pulled = r.unwrap();
    assert!(rootfs.join(&target[1..]).join("pwned").exists());
    assert!(rootfs.join("tmp/podvisor-up-pwned").exists());
    assert!(sandbox::unmount_all(&[pulled.mounted]).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_auth_uses_the_pull_secret_and_explains_failures() {
    let reg = Registry::start(true);
    let scratch = Scratch::new("auth");
    push_image(&reg, "test/private", Some("v1"), &[plain_layer(tar(&[E::File("secret-image", b"yes")]))]);
    let image = format!("{}/test/private:v1", reg.addr);
    let p = puller(&scratch, settings(&reg));

    let e = p.mount(&storage(&image, &scratch.dir.join("a/rootfs"), serde_json::json!({})), 0, "a").await.unwrap_err();
    assert!(e.contains("authentication failed") && e.contains("anonymous") && e.contains(AUTH_METADATA_KEY), "{e}");

    let wrong = serde_json::json!({ AUTH_METADATA_KEY: "podvisor:wrong" });
    let e = p.mount(&storage(&image, &scratch.dir.join("b/rootfs"), wrong), 0, "b").await.unwrap_err();
    assert!(e.contains("authentication failed") && e.contains("user \"podvisor\""), "{e}");
    assert!(!e.contains("wrong"), "the password leaked into the error: {e}");

    let config = serde_json::json!({"auths": {reg.addr.clone(): {"auth": base64::engine::general_purpose::STANDARD.encode("podvisor:s3cret")}}});
    let good = serde_json::json!({ AUTH_METADATA_KEY: config.to_string() });
    let rootfs = scratch.dir.join("c/rootfs");
    let pulled = p.mount(&storage(&image, &rootfs, good), 0, "c").await.unwrap();
    assert_eq!(std::fs::read_to_string(rootfs.join("secret-image")).unwrap(), "yes");
    assert!(sandbox::unmount_all(&[pulled.mounted]).is_empty());

    // The guest's auth file (agent.image_registry_auth=file://...).
    let file = scratch.dir.join("auth.json");
    std::fs::write(
        &file,
        serde_json::json!({"auths": {reg.addr.clone(): {"username": "podvisor", "password": "s3cret"}}}).to_string(),
    )
    .unwrap();
    let p = puller(&scratch, Settings { auth_file: Some(file), ..settings(&reg) });
    let rootfs = scratch.dir.join("d/rootfs");
    let pulled = p.mount(&storage(&image, &rootfs, serde_json::json!({})), 0, "d").await.unwrap();
    assert!(rootfs.join("secret-image").exists());
    assert!(sandbox::unmount_all(&[pulled.mounted]).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_only_for_listed_registries_and_size_is_bounded() {
    let reg = Registry::start(false);
    let scratch = Scratch::new("bounds");
    push_image(&reg, "test/bounded", Some("v1"), &base_layers());
    let image = format!("{}/test/bounded:v1", reg.addr);
    // Not listed as insecure: spoken to over HTTPS, which a plain-HTTP registry cannot answer.
    let p = puller(&scratch, Settings::default());
    let e = p.mount(&storage(&image, &scratch.dir.join("a/rootfs"), serde_json::json!({})), 0, "a").await.unwrap_err();
    assert!(e.contains(&format!("registry {}", reg.addr)), "{e}");
    // A cap smaller than the image.
    let p = puller(&scratch, Settings { max_size: Some(600), ..settings(&reg) });
    let e = p.mount(&storage(&image, &scratch.dir.join("b/rootfs"), serde_json::json!({})), 0, "b").await.unwrap_err();
    assert!(e.contains("agent.image_max_size") && e.contains("600"), "{e}");
    assert!(!scratch.store().join("containers/b").exists());
    assert_no_temporaries(&scratch.store());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_container_gets_the_pause_rootfs() {
    let scratch = Scratch::new("pause");
    let p = puller(&scratch, Settings::default());
    let rootfs = scratch.dir.join("sandbox/rootfs");
    let meta = serde_json::json!({"io.kubernetes.cri.container-type": "sandbox"});
    let pulled = p.mount(&storage(PAUSE_SOURCE, &rootfs, meta), 0, "sandbox").await.unwrap();
    assert!(pulled.pause);
    let pause = rootfs.join("pause");
    assert_eq!(std::fs::metadata(&pause).unwrap().len(), std::fs::metadata("/proc/self/exe").unwrap().len());
    assert!(std::fs::OpenOptions::new().write(true).open(&pause).is_err(), "/pause must be read-only");
    assert!(sandbox::unmount_all(&[pulled.mounted]).is_empty());
    assert!(!rootfs.exists());
    assert!(pause::invoked_as_pause(Some("/pause")) && !pause::invoked_as_pause(Some("/init")));
}

#[test]
fn settings_come_from_the_kernel_command_line() {
    let s = Settings::from_cmdline(
        "quiet agent.insecure_registries=172.31.250.1:5000,reg:80 agent.image_registry_auth=file:///etc/auth.json agent.image_pull_timeout=30 agent.image_max_size=1000",
    )
    .unwrap();
    assert_eq!(s.insecure_registries, ["172.31.250.1:5000", "reg:80"]);
    assert_eq!(s.auth_file.as_deref(), Some(Path::new("/etc/auth.json")));
    assert_eq!((s.timeout, s.max_size), (Duration::from_secs(30), Some(1000)));
    assert_eq!(Settings::from_cmdline("").unwrap(), Settings::default());
    assert!(Settings::from_cmdline("agent.image_registry_auth=kbs:///default/credential/test")
        .unwrap_err()
        .contains("file:///"));
    assert!(Settings::from_cmdline("agent.image_pull_timeout=soon")
        .unwrap_err()
        .contains("agent.image_pull_timeout=soon"));
}

#[test]
fn the_storage_option_is_katas_image_pull_volume() {
    let mut s = storage(
        "r/i:t",
        Path::new("/run/kata-containers/c/rootfs"),
        serde_json::json!({"io.kubernetes.cri.container-type": "sandbox"}),
    );
    let v = pull_volume(&s).unwrap();
    assert!(is_sandbox(&v.metadata));
    s.driver_options = vec![format!("{DRIVER}={{}}")];
    assert!(pull_volume(&s).unwrap().metadata.is_empty());
    s.driver_options = vec!["other=1".into()];
    assert!(pull_volume(&s).unwrap_err().contains("image_guest_pull=<JSON>"));
    s.driver_options = vec![format!("{DRIVER}=not json")];
    assert!(pull_volume(&s).unwrap_err().contains("ImagePullVolume"));
    assert!(!is_sandbox(&HashMap::from([("io.kubernetes.cri-o.ContainerType".to_string(), "container".to_string())])));
}

#[test]
fn credentials_from_docker_configs() {
    let enc = base64::engine::general_purpose::STANDARD.encode("u:p:with:colons");
    let cfg = format!(
        r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{enc}"}},"reg:5000":{{"username":"a","password":"b"}}}}}}"#
    );
    let c = auth::from_docker_config(&cfg, "docker.io", "t").unwrap().unwrap();
    assert_eq!((c.username.as_str(), c.password.as_str()), ("u", "p:with:colons"));
    let c = auth::from_docker_config(&cfg, "reg:5000", "t").unwrap().unwrap();
    assert_eq!((c.username.as_str(), c.password.as_str()), ("a", "b"));
    assert!(auth::from_docker_config(&cfg, "other", "t").unwrap().is_none());
    assert!(auth::from_docker_config("\"x\"", "x", "t").unwrap_err().contains("docker config"));
    let meta = HashMap::from([(AUTH_METADATA_KEY.to_string(), "user:pw".to_string())]);
    let c = auth::credentials_for("reg:5000/a/b:c", &meta, None).unwrap().unwrap();
    assert_eq!(format!("{c:?}"), "Credentials(user, <password>)");
    assert!(auth::credentials_for("reg:5000/a/b:c", &HashMap::new(), None).unwrap().is_none());
}

#[test]
fn layer_paths_and_media_types() {
    assert!(unpack::clean_components(Path::new("a/../b")).unwrap_err().contains("escape"));
    assert_eq!(unpack::clean_components(Path::new("/./a/b/")).unwrap(), ["a", "b"]);
    use unpack::Compression as C;
    assert_eq!(C::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"), Some(C::Zstd));
    assert_eq!(C::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"), Some(C::Gzip));
    assert_eq!(C::from_media_type("application/vnd.oci.image.layer.v1.tar"), Some(C::None));
    assert_eq!(C::from_media_type("application/vnd.oci.image.config.v1+json"), None);
    assert!(registry::sha256_hex("sha512:ab").unwrap_err().contains("sha256"));
}
