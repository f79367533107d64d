//! Pulling an image's manifest, config and layers with oras-project's `oci-client`, checking
//! every blob against its descriptor (sha256 digest and size) and bounding what is fetched and
//! unpacked; layers are unpacked into the per-podvm cache (see [`super::unpack`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use futures::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::auth::Credentials;
use super::unpack::{self, Compression};
use super::Settings;

/// Bounds of what is read into memory.
const MAX_MANIFEST: usize = 4 << 20;
const MAX_CONFIG: u64 = 8 << 20;

const ACCEPTED: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

#[derive(serde::Deserialize)]
struct Versioned {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<IndexEntry>>,
    #[serde(default)]
    config: Option<OciDescriptor>,
    #[serde(default)]
    layers: Option<Vec<OciDescriptor>>,
}

#[derive(serde::Deserialize)]
struct IndexEntry {
    #[serde(flatten)]
    descriptor: OciDescriptor,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(serde::Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

#[derive(serde::Deserialize)]
struct ImageConfig {
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(serde::Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// What a pull may still write (downloaded blobs and unpacked bytes).
#[derive(Debug)]
pub struct Budget {
    left: Mutex<u64>,
    pub limit: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget { left: Mutex::new(limit), limit })
    }

    /// Takes `n` bytes, or fails naming the limit.
    pub fn take(&self, n: u64) -> Result<(), String> {
        let mut left = self.left.lock().unwrap();
        if n > *left {
            return Err(format!(
                "the image needs more than {} bytes (the pull's limit: agent.image_max_size or the free space of the image store)",
                self.limit
            ));
        }
        *left -= n;
        Ok(())
    }
}

/// The hex of a `sha256:<64 hex>` digest; other algorithms and malformed digests are errors.
pub fn sha256_hex(digest: &str) -> Result<&str, String> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest {digest:?}: only sha256 digests are supported"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return Err(format!("digest {digest:?} is not sha256:<64 lowercase hex digits>"));
    }
    Ok(hex)
}

pub fn sha256_of(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// The client for `settings`: HTTPS with Mozilla's roots only (the guest has no system CA
/// store: merging them with the platform's fails, and oci-client's fallback
/// `reqwest::Client::default()` then panics, which powers the podvm off), plain HTTP only for
/// the listed registries. A client that cannot be built is an error, never a panic.
fn client(settings: &Settings) -> Result<Client, String> {
    ensure_system_roots();
    // reqwest uses the process's rustls provider: ring (as the rest of the agent and the podvm
    // TLS; rustls 0.23.48 deprecates it for lacking post-quantum key exchange).
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let roots = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .map(|c| Certificate { encoding: CertificateEncoding::Der, data: c.as_ref().to_vec() })
        .collect();
    Client::try_from(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(settings.insecure_registries.clone()),
        tls_certs_only: roots,
        platform_resolver: None,
        connect_timeout: Some(std::time::Duration::from_secs(30)),
        read_timeout: Some(std::time::Duration::from_secs(60)),
        user_agent: concat!("podvisor-agent/", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    })
    .map_err(|e| format!("cannot make the registry client: {e}"))
}

/// Where rustls-native-certs (behind reqwest's platform verifier) looks first for the system's
/// CA bundle.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// oci-client builds a default reqwest client besides the configured one (`..Default::default()`
/// in its `TryFrom<ClientConfig>`), and reqwest's `Client::default()` panics when the system has
/// no CA certificate, as the guest has none: give it Mozilla's roots (PEM) where it looks, once,
/// unless a bundle is already there (a host in test mode keeps its own).
fn ensure_system_roots() {
    use base64::Engine;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let path = Path::new(SYSTEM_CA_BUNDLE);
        if path.exists() {
            return;
        }
        let mut pem = String::new();
        for der in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
            let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
            pem.push_str("-----BEGIN CERTIFICATE-----\n");
            for line in b64.as_bytes().chunks(64) {
                pem.push_str(std::str::from_utf8(line).unwrap_or_default());
                pem.push('\n');
            }
            pem.push_str("-----END CERTIFICATE-----\n");
        }
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(path, pem);
    });
}

/// Describes a registry error; authentication failures say which credentials were used.
fn describe(e: OciDistributionError, registry: &str, creds: Option<&Credentials>) -> String {
    let text = e.to_string();
    let auth_failed =
        matches!(e, OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_))
            || text.contains("UNAUTHORIZED")
            || text.contains("DENIED");
    if auth_failed {
        let used = match creds {
            Some(c) => format!("user {:?}", c.username),
            None => "anonymous (no credentials for this registry)".to_string(),
        };
        return format!(
            "registry {registry}: authentication failed with {used}: {text}; give the pull secret in the storage metadata key {}, the file of agent.image_registry_auth, or (peer pods) the remote hypervisor service's REGISTRY_AUTH_FILE",
            super::AUTH_METADATA_KEY
        );
    }
    format!("registry {registry}: {text}")
}

/// Pulls `image` (linux/amd64) into the layer cache under `store`; returns the unpacked layer
/// directories, bottom first.
pub async fn pull(
    store: &Path,
    settings: &Settings,
    image: &str,
    creds: Option<Credentials>,
) -> Result<Vec<PathBuf>, String> {
    let reference: Reference = image.parse().map_err(|e| format!("{image:?} is not an image reference: {e}"))?;
    let registry = reference.resolve_registry().to_string();
    let client = client(settings)?;
    let auth = Credentials::registry_auth(creds.as_ref());
    let err = |e: OciDistributionError| describe(e, &registry, creds.as_ref());

    let (bytes, _) = client.pull_manifest_raw(&reference, &auth, ACCEPTED).await.map_err(err)?;
    check_manifest(&bytes, reference.digest(), None, image)?;
    let mut manifest: Versioned =
        serde_json::from_slice(&bytes).map_err(|e| format!("manifest of {image}: not a manifest or index: {e}"))?;
    let mut manifest_ref = reference.clone();
    if let Some(entries) = manifest.manifests.take() {
        let chosen = entries
            .into_iter()
            .find(|m| m.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
            .ok_or_else(|| format!("{image}: the image index has no linux/amd64 manifest"))?;
        manifest_ref = reference.clone_with_digest(chosen.descriptor.digest.clone());
        let (bytes, _) = client.pull_manifest_raw(&manifest_ref, &auth, ACCEPTED).await.map_err(err)?;
        check_manifest(&bytes, Some(&chosen.descriptor.digest), Some(chosen.descriptor.size), image)?;
        manifest = serde_json::from_slice(&bytes)
            .map_err(|e| format!("manifest {} of {image}: not an image manifest: {e}", chosen.descriptor.digest))?;
    }
    let kind = manifest.media_type.clone().unwrap_or_default();
    let (Some(config), Some(layers)) = (manifest.config, manifest.layers) else {
        return Err(format!("{image}: the manifest ({kind}) has no config or layers"));
    };

    std::fs::create_dir_all(store.join("layers/sha256")).map_err(|e| format!("create {}: {e}", store.display()))?;
    let free = free_bytes(store)?;
    let budget = Budget::new(settings.max_size.map_or(free, |m| m.min(free)));

    let mut config_bytes = Vec::new();
    fetch_blob(&client, &manifest_ref, &config, MAX_CONFIG, &budget, &mut config_bytes, &err).await?;
    let image_config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| format!("config {} of {image}: not an image config: {e}", config.digest))?;
    let diff_ids = image_config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != layers.len() {
        return Err(format!("{image}: the config lists {} diff_ids for {} layers", diff_ids.len(), layers.len()));
    }
    let mut dirs = Vec::new();
    for (layer, diff_id) in layers.iter().zip(&diff_ids) {
        dirs.push(ensure_layer(&client, &manifest_ref, store, layer, diff_id, &budget, settings, &err).await?);
    }
    Ok(dirs)
}

/// Checks a manifest's size bound, and its digest/size against what named it.
fn check_manifest(bytes: &[u8], digest: Option<&str>, size: Option<i64>, image: &str) -> Result<(), String> {
    if bytes.len() > MAX_MANIFEST {
        return Err(format!("{image}: manifest of {} bytes, more than {MAX_MANIFEST}", bytes.len()));
    }
    if let Some(d) = digest {
        sha256_hex(d)?;
        let actual = sha256_of(bytes);
        if actual != d {
            return Err(format!("{image}: manifest digest mismatch: expected {d}, got {actual}"));
        }
    }
    if let Some(s) = size {
        if s != bytes.len() as i64 {
            return Err(format!(
                "{image}: manifest {}: size {} but the index says {s}",
                digest.unwrap_or("?"),
                bytes.len()
            ));
        }
    }
    Ok(())
}

/// Free bytes of the file system holding `dir`.
fn free_bytes(dir: &Path) -> Result<u64, String> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(|e| format!("statvfs {}: {e}", dir.display()))?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

/// Streams blob `desc` into `out`, checking its size (never more than `desc.size`, at most
/// `max`) and sha256 digest; the bytes are taken from `budget`.
async fn fetch_blob<W: tokio::io::AsyncWrite + Unpin>(
    client: &Client,
    image: &Reference,
    desc: &OciDescriptor,
    max: u64,
    budget: &Budget,
    out: &mut W,
    err: &(dyn Fn(OciDistributionError) -> String + Sync),
) -> Result<(), String> {
    sha256_hex(&desc.digest)?;
    let size = u64::try_from(desc.size).map_err(|_| format!("blob {}: negative size {}", desc.digest, desc.size))?;
    if size > max {
        return Err(format!("blob {}: {size} bytes, more than the {max} allowed", desc.digest));
    }
    budget.take(size).map_err(|e| format!("blob {}: {e}", desc.digest))?;
    let mut stream = client.pull_blob_stream(image, desc).await.map_err(err)?;
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    while let Some(chunk) = stream.stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            // oci-client's own digest check fails the stream at its end: report it as ours.
            Err(e) if e.to_string().contains("igest") => break,
            Err(e) => return Err(format!("blob {}: {e}", desc.digest)),
        };
        got += chunk.len() as u64;
        if got > size {
            return Err(format!("blob {}: the registry sent more than its {size} bytes", desc.digest));
        }
        hasher.update(&chunk);
        out.write_all(&chunk).await.map_err(|e| format!("blob {}: write: {e}", desc.digest))?;
    }
    out.flush().await.map_err(|e| format!("blob {}: write: {e}", desc.digest))?;
    if got != size {
        return Err(format!("blob {}: got {got} bytes, the descriptor says {size}", desc.digest));
    }
    let actual = format!("sha256:{:x}", hasher.finalize());
    if actual != desc.digest {
        return Err(format!("blob {}: digest mismatch: the content's digest is {actual}", desc.digest));
    }
    Ok(())
}

/// Per-digest locks: two containers needing the same layer unpack it once.
fn layer_lock(digest: &str) -> Arc<tokio::sync::Mutex<()>> {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS.get_or_init(Default::default).lock().unwrap();
    locks.entry(digest.to_string()).or_default().clone()
}

/// The cached, unpacked layer `desc`: reused when present, else downloaded (to a file, checked)
/// and unpacked into a temporary directory renamed into place.
#[allow(clippy::too_many_arguments)]
async fn ensure_layer(
    client: &Client,
    image: &Reference,
    store: &Path,
    desc: &OciDescriptor,
    diff_id: &str,
    budget: &Arc<Budget>,
    settings: &Settings,
    err: &(dyn Fn(OciDistributionError) -> String + Sync),
) -> Result<PathBuf, String> {
    let hex = sha256_hex(&desc.digest)?.to_string();
    sha256_hex(diff_id).map_err(|e| format!("layer {}: diff_id: {e}", desc.digest))?;
    let compression = Compression::from_media_type(&desc.media_type).ok_or_else(|| {
        format!("layer {}: media type {:?} is not a tar layer (plain, gzip or zstd)", desc.digest, desc.media_type)
    })?;
    let dir = store.join("layers/sha256").join(&hex);
    let lock = layer_lock(&desc.digest);
    let _held = lock.lock().await;
    if dir.is_dir() {
        return Ok(dir);
    }
    let tmp = store.join("layers").join(format!("tmp-{hex}"));
    let blob = store.join("layers").join(format!("blob-{hex}"));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = async {
        let mut file = tokio::fs::File::create(&blob).await.map_err(|e| format!("create {}: {e}", blob.display()))?;
        fetch_blob(client, image, desc, u64::MAX, budget, &mut file, err).await?;
        drop(file);
        let (blob2, tmp2, budget2, diff_id2) = (blob.clone(), tmp.clone(), budget.clone(), diff_id.to_string());
        let deadline = std::time::Instant::now() + settings.timeout;
        tokio::task::spawn_blocking(move || {
            unpack::unpack_layer(&blob2, compression, &tmp2, &diff_id2, &budget2, deadline)
        })
        .await
        .map_err(|e| format!("unpack task: {e}"))?
        .map_err(|e| format!("layer {}: {e}", desc.digest))?;
        std::fs::rename(&tmp, &dir).map_err(|e| format!("rename {} to {}: {e}", tmp.display(), dir.display()))
    }
    .await;
    let _ = std::fs::remove_file(&blob);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.map(|_| dir)
}
