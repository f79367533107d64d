//! Guest image pull (Kata's `image_guest_pull` storage driver): with no file system shared with
//! the host (peer pods), the agent pulls the container image itself and mounts its rootfs.
//!
//! The storage, as Kata's runtime builds it (see `notes-guest-pull.md`):
//! `Storage { driver: "image_guest_pull", source: <image ref>, fstype: "overlay",
//! mount_point: /run/kata-containers/<cid>/rootfs,
//! driver_options: ["image_guest_pull={\"metadata\":{<annotations>}}"] }`.
//!
//! * The image (linux/amd64 from an index) is pulled with oras-project's `oci-client`: every blob
//!   (manifest, config, layers) is checked against its digest and size, and each layer's
//!   uncompressed stream against the config's `diff_ids`.
//! * Layers (gzip, zstd or plain tar) are unpacked once per podvm into
//!   `<store>/layers/sha256/<hex>` ([`unpack`]: paths resolved inside the layer, whiteouts turned
//!   into overlayfs whiteouts), and reused by every later container naming the same digest.
//! * The rootfs is an overlay at the storage's mount point: the layers as lowerdirs and a
//!   per-container upper/work under `<store>/containers/<cid>/`, unmounted and removed with the
//!   container (`sandbox::Mounted::cleanup`).
//! * The sandbox (pause) container, source `pause` (Kata's literal): a rootfs holding `/pause`,
//!   the agent binary bound read-only (run as `/pause` it waits for SIGTERM/SIGINT and reaps), and
//!   the process args become `["/pause"]`, as Kata's agent replaces the process by its pause
//!   bundle's.
//!
//! Kernel parameters: `agent.insecure_registries=host:port[,host:port]` (the only registries
//! spoken to over plain HTTP), `agent.image_registry_auth=file:///path` (Kata's: a docker
//! config / containers auth.json), `agent.image_pull_timeout=<seconds>` (default 600) and
//! `agent.image_max_size=<bytes>` (cap of one pull's downloaded + unpacked bytes; the store's
//! free space bounds it too). Registry credentials: the metadata key [`AUTH_METADATA_KEY`]
//! (docker config JSON or `user:password`), else the auth file, else anonymous.

pub mod auth;
pub mod pause;
pub mod registry;
pub mod unpack;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_protocol::agent as pb;
use nix::mount::{mount, MsFlags};

use crate::sandbox::Mounted;

/// Kata's driver name (`KATA_VIRTUAL_VOLUME_IMAGE_GUEST_PULL`); also the driver option's key.
pub const DRIVER: &str = "image_guest_pull";
/// The source Kata's runtime gives the sandbox container's storage.
pub const PAUSE_SOURCE: &str = "pause";
/// Metadata key (podvisor's extension) carrying the registry credentials of this pull.
pub const AUTH_METADATA_KEY: &str = "io.podvisor.image-pull-auth";
/// Where pulled layers and per-container overlay directories live in the guest.
pub const STORE_DIR: &str = "/run/kata-containers/image";

const CONTAINER_TYPE_KEYS: [&str; 2] = ["io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType"];
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Kata's `ImagePullVolume`: `{"metadata": {...}}` (the container's annotations, merged by the
/// runtime).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ImagePullVolume {
    #[serde(default)]
    pub metadata: HashMap<String, String>,
}

/// Reads the `image_guest_pull=<json>` driver option. Errors name the option.
pub fn pull_volume(s: &pb::Storage) -> Result<ImagePullVolume, String> {
    let prefix = format!("{DRIVER}=");
    let Some(json) = s.driver_options.iter().find_map(|o| o.strip_prefix(&prefix)) else {
        return Err(format!(
            "driver_options: no {prefix}<JSON> option (Kata's ImagePullVolume, e.g. {prefix}{{\"metadata\":{{}}}})"
        ));
    };
    serde_json::from_str(json).map_err(|e| format!("driver_options: {prefix}: not an ImagePullVolume JSON: {e}"))
}

/// Whether the metadata says this is the pod's sandbox (pause) container.
pub fn is_sandbox(metadata: &HashMap<String, String>) -> bool {
    CONTAINER_TYPE_KEYS.iter().any(|k| metadata.get(*k).map(String::as_str) == Some("sandbox"))
}

/// Settings from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `host:port` of the registries spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Docker config / auth.json file (`agent.image_registry_auth=file://...`).
    pub auth_file: Option<PathBuf>,
    pub timeout: Duration,
    /// Cap of one pull's bytes (downloaded + unpacked); `None`: the store's free space only.
    pub max_size: Option<u64>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { insecure_registries: Vec::new(), auth_file: None, timeout: DEFAULT_TIMEOUT, max_size: None }
    }
}

/// Where podvm mode writes the registry credentials of the podvm's user data (peer pods: the
/// cluster's pull secret, as the remote hypervisor service's `REGISTRY_AUTH_FILE`).
pub const PODVM_AUTH_FILE: &str = "/run/kata-agent/registry-auth.json";

impl Settings {
    /// Parses the `agent.*` words this module reads; errors name the parameter and the fix.
    pub fn from_cmdline(cmdline: &str) -> Result<Settings, String> {
        let mut s = Settings::default();
        for w in cmdline.split_whitespace() {
            if let Some(v) = w.strip_prefix("agent.insecure_registries=") {
                s.insecure_registries = v.split(',').filter(|r| !r.is_empty()).map(str::to_string).collect();
            } else if let Some(v) = w.strip_prefix("agent.image_registry_auth=") {
                let path = v.strip_prefix("file://").ok_or_else(|| {
                    format!("agent.image_registry_auth={v}: only file:///path URIs are supported (a docker config JSON in the guest)")
                })?;
                s.auth_file = Some(PathBuf::from(path));
            } else if let Some(v) = w.strip_prefix("agent.image_pull_timeout=") {
                let secs: u64 = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("agent.image_pull_timeout={v}: not a number of seconds (> 0)"))?;
                s.timeout = Duration::from_secs(secs);
            } else if let Some(v) = w.strip_prefix("agent.image_max_size=") {
                let n: u64 = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("agent.image_max_size={v}: not a number of bytes (> 0)"))?;
                s.max_size = Some(n);
            }
        }
        Ok(s)
    }

    /// From `/proc/cmdline` (in a podvm without `agent.image_registry_auth`, the credentials of
    /// its user data, [`PODVM_AUTH_FILE`], when there are any); an agent in test mode (not
    /// PID 1) takes the words of `PODVISOR_TEST_CMDLINE` instead when it is set (the host's
    /// command line is not ours).
    fn from_proc() -> Result<Settings, String> {
        if nix::unistd::getpid().as_raw() != 1 {
            if let Ok(words) = std::env::var("PODVISOR_TEST_CMDLINE") {
                return Settings::from_cmdline(&words);
            }
        }
        let mut s = Settings::from_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())?;
        if s.auth_file.is_none() && Path::new(PODVM_AUTH_FILE).is_file() {
            s.auth_file = Some(PathBuf::from(PODVM_AUTH_FILE));
        }
        Ok(s)
    }
}

/// What mounting one guest-pull storage did.
#[derive(Debug)]
pub struct Pulled {
    pub mounted: Mounted,
    /// The sandbox container: its process must become `/pause`.
    pub pause: bool,
}

/// The guest-pull machinery: where it keeps layers, and its settings.
#[derive(Debug, Clone)]
pub struct Puller {
    pub store: PathBuf,
    pub settings: Settings,
    /// The file bound as `/pause` in the sandbox container's rootfs.
    pub pause_binary: PathBuf,
}

impl Puller {
    /// The guest's puller: [`STORE_DIR`], settings from `/proc/cmdline`.
    pub fn guest() -> Result<Puller, String> {
        Ok(Puller {
            store: PathBuf::from(STORE_DIR),
            settings: Settings::from_proc()?,
            pause_binary: PathBuf::from("/proc/self/exe"),
        })
    }

    /// Mounts storage `index` (driver [`DRIVER`]) of container `cid`. On error nothing is left
    /// mounted or created for this container (cached layers stay: they are valid).
    pub async fn mount(&self, s: &pb::Storage, index: usize, cid: &str) -> Result<Pulled, String> {
        let what = format!("storages[{index}] ({DRIVER} {:?})", s.source);
        let volume = pull_volume(s).map_err(|e| format!("{what}: {e}"))?;
        if s.mount_point.is_empty() || !s.mount_point.starts_with('/') {
            return Err(format!("{what}: mount_point {:?} is not an absolute guest path", s.mount_point));
        }
        if s.source.is_empty() {
            return Err(format!("{what}: source: the image reference is missing"));
        }
        let mount_point = PathBuf::from(&s.mount_point);
        if s.source == PAUSE_SOURCE && is_sandbox(&volume.metadata) {
            let mounted = pause::mount_rootfs(&self.pause_binary, &mount_point).map_err(|e| format!("{what}: {e}"))?;
            return Ok(Pulled { mounted, pause: true });
        }
        let auth = auth::credentials_for(&s.source, &volume.metadata, self.settings.auth_file.as_deref())
            .map_err(|e| format!("{what}: {e}"))?;
        let pull = registry::pull(&self.store, &self.settings, &s.source, auth);
        let layers = match tokio::time::timeout(self.settings.timeout, pull).await {
            Ok(r) => r.map_err(|e| format!("{what}: {e}"))?,
            Err(_) => {
                return Err(format!(
                    "{what}: the pull did not finish within {} s (raise agent.image_pull_timeout)",
                    self.settings.timeout.as_secs()
                ))
            }
        };
        let mounted = mount_overlay(&self.store, cid, &layers, &mount_point).map_err(|e| format!("{what}: {e}"))?;
        Ok(Pulled { mounted, pause: false })
    }
}

/// Mounts the overlay of `layers` (bottom first) at `mount_point` with a fresh upper/work for
/// `cid`; on error removes what it made.
pub fn mount_overlay(store: &Path, cid: &str, layers: &[PathBuf], mount_point: &Path) -> Result<Mounted, String> {
    if layers.is_empty() {
        return Err("the image has no layers".into());
    }
    let dir = store.join("containers").join(cid);
    let _ = remove_dir_if_not_mounted(&dir);
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    let made = std::fs::create_dir_all(&upper)
        .and_then(|_| std::fs::create_dir_all(&work))
        .and_then(|_| std::fs::create_dir_all(mount_point));
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(format!("create {} and {}: {e}", dir.display(), mount_point.display()));
    }
    let lower: Vec<String> = layers.iter().rev().map(|p| p.display().to_string()).collect();
    let data = format!("lowerdir={},upperdir={},workdir={}", lower.join(":"), upper.display(), work.display());
    if data.len() >= 4096 {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(format!(
            "{} layers: the overlay mount options ({} bytes) exceed the kernel's page-sized limit",
            layers.len(),
            data.len()
        ));
    }
    if let Err(e) = mount(Some("overlay"), mount_point, Some("overlay"), MsFlags::empty(), Some(data.as_str())) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(format!("mount overlay on {}: {e} (options {data})", mount_point.display()));
    }
    Ok(Mounted { mount_point: mount_point.to_path_buf(), mounted: true, cleanup: vec![dir] })
}

/// Removes `dir` unless a mount point is at or below it (a live mount is never deleted through).
pub fn remove_dir_if_not_mounted(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    let prefix = dir.display().to_string();
    let busy = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|mp| mp == prefix || mp.starts_with(&format!("{prefix}/"))));
    if busy {
        return Err(format!("{} still holds a mount; left in place", dir.display()));
    }
    std::fs::remove_dir_all(dir).map_err(|e| format!("remove {}: {e}", dir.display()))
}
