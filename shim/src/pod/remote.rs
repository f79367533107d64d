//! A container's files in a peer pod (`shared_fs = "none"`): the podvm shares no file system
//! with the node, so the rootfs is pulled by the agent inside the podvm (guest pull) when the
//! image is known, and copied otherwise (the pause container); bind sources (configMaps,
//! secrets, hosts, resolv.conf) are copied with `CopyFile` and copied again within two seconds
//! of a change on the node.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agent_protocol::agent as pb;
use slog::{info, warn, Logger};

use super::{Pod, PodError, PodResult};
use crate::agent::Agent;
use crate::copy::{self, Fingerprint};
use crate::mounts::GUEST_SHARED;
use crate::spec;

/// How often copied bind sources are compared with the node's.
pub(super) const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Kata's storage driver for an image the agent pulls.
pub const GUEST_PULL_DRIVER: &str = "image_guest_pull";

/// containerd's CRI annotation with the container's image name.
pub const CRI_IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
/// CRI-O's annotation with the container's image name.
pub const CRIO_IMAGE_NAME: &str = "io.kubernetes.cri-o.ImageName";

/// What a container gets in a peer pod.
pub(super) struct RemoteFiles {
    /// The rootfs path in the guest.
    pub guest_root: String,
    /// The guest path of each bind's source, in `binds` order.
    pub sources: Vec<String>,
    /// Storages for CreateContainer (the guest pull).
    pub storages: Vec<pb::Storage>,
    /// The task that copies changed bind sources again; aborted with the container.
    pub sync: Option<tokio::task::AbortHandle>,
}

/// The option prefix of a Kata virtual volume on a rootfs mount.
pub const VIRTUAL_VOLUME_PREFIX: &str = "io.katacontainers.volume=";

/// A Kata virtual volume asking for a guest pull (CRI-O's `runtime_pull_image`, or a
/// nydus-snapshotter in proxy mode): `{"volume_type":"image_guest_pull","source":..,
/// "image_pull":{"metadata":{..}}}`, base64 in a rootfs mount option.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VirtualVolume {
    /// The image the host side named.
    pub source: String,
    /// `image_pull.metadata`.
    pub metadata: HashMap<String, String>,
}

/// Removes the rootfs mounts that carry a Kata virtual volume (they are not mounted on the node)
/// and returns the guest-pull one. Other volume types are refused with their name.
pub fn take_virtual_volume(rootfs: &mut Vec<crate::mounts::MountSpec>) -> Result<Option<VirtualVolume>, String> {
    use base64::Engine;
    let mut found = None;
    let mut err = None;
    rootfs.retain(|m| {
        let Some(encoded) = m.options.iter().find_map(|o| o.strip_prefix(VIRTUAL_VOLUME_PREFIX)) else {
            return true;
        };
        if encoded.len() > 1 << 20 {
            err = Some(format!("rootfs mount option {VIRTUAL_VOLUME_PREFIX}: more than 1 MiB"));
            return false;
        }
        let parsed = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string()));
        match parsed {
            Err(e) => {
                err = Some(format!("rootfs mount option {VIRTUAL_VOLUME_PREFIX}: not base64 of a JSON object: {e}"))
            }
            Ok(v) => match v["volume_type"].as_str() {
                Some(GUEST_PULL_DRIVER) => {
                    let metadata = v["image_pull"]["metadata"]
                        .as_object()
                        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
                        .unwrap_or_default();
                    found = Some(VirtualVolume { source: v["source"].as_str().unwrap_or_default().into(), metadata });
                }
                other => {
                    err = Some(format!(
                        "rootfs mount option {VIRTUAL_VOLUME_PREFIX}: volume_type {other:?} is not supported \
                         (podvisor supports {GUEST_PULL_DRIVER})"
                    ))
                }
            },
        }
        false
    });
    match err {
        Some(e) => Err(e),
        None => Ok(found),
    }
}

/// Whether the container is the pod's sandbox (pause) container, by CRI's or CRI-O's annotation.
fn is_sandbox(annotations: &HashMap<String, String>) -> bool {
    ["io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType"]
        .iter()
        .any(|k| annotations.get(*k).is_some_and(|v| v == "sandbox"))
}

/// What the agent pulls for a container, as Kata's runtime decides it: nothing unless a virtual
/// volume asks or `experimental_force_guest_pull` is on; then `pause` (the agent's own) for the
/// sandbox container, else the image named by the manager's annotation. Returns the image and the
/// metadata (the volume's, overridden by the container's annotations).
pub(super) fn guest_pull_image(
    annotations: &HashMap<String, String>,
    volume: Option<&VirtualVolume>,
    force: bool,
) -> Result<Option<(String, HashMap<String, String>)>, String> {
    if volume.is_none() && !force {
        return Ok(None);
    }
    let mut metadata = volume.map(|v| v.metadata.clone()).unwrap_or_default();
    metadata.extend(annotations.iter().map(|(k, v)| (k.clone(), v.clone())));
    if is_sandbox(annotations) {
        return Ok(Some(("pause".into(), metadata)));
    }
    let key = if annotations.contains_key("io.kubernetes.cri-o.ContainerType")
        && !annotations.contains_key("io.kubernetes.cri.container-type")
    {
        CRIO_IMAGE_NAME
    } else {
        CRI_IMAGE_NAME
    };
    match annotations.get(key).filter(|s| !s.is_empty()) {
        Some(image) => Ok(Some((image.clone(), metadata))),
        None => Err(format!(
            "the image is to be pulled in the guest, but the container has no {key} annotation naming it; \
             run it through containerd's CRI plugin or CRI-O, or turn off [runtime] experimental_force_guest_pull"
        )),
    }
}

/// Kata's guest-pull storage for container `id` pulling `image`; `metadata` is the container's
/// annotations (Kata's `ImagePullVolume { metadata }`).
pub fn guest_pull_storage(id: &str, image: &str, metadata: &HashMap<String, String>) -> pb::Storage {
    let volume = serde_json::json!({ "metadata": metadata });
    pb::Storage {
        driver: GUEST_PULL_DRIVER.into(),
        driver_options: vec![format!("{GUEST_PULL_DRIVER}={volume}")],
        source: image.into(),
        fstype: "overlay".into(),
        mount_point: guest_pull_root(id),
        ..Default::default()
    }
}

/// Where the agent assembles a pulled image's rootfs for container `id`.
pub fn guest_pull_root(id: &str) -> String {
    format!("/run/kata-containers/{id}/rootfs")
}

/// Copies `host` to `guest` with `CopyFile`.
pub(super) async fn copy_tree(agent: &Arc<dyn Agent>, host: &Path, guest: &str) -> PodResult<usize> {
    let host_owned = host.to_path_buf();
    let guest_owned = guest.to_string();
    let entries = tokio::task::spawn_blocking(move || copy::plan(&host_owned, &guest_owned))
        .await
        .map_err(|e| PodError::Internal(format!("copy plan: {e}")))?
        .map_err(|e| PodError::InvalidArgument(e.to_string()))?;
    let n = entries.len();
    for entry in entries {
        let reqs = copy::requests(&entry).map_err(|e| PodError::InvalidArgument(e.to_string()))?;
        for req in reqs {
            agent.copy_file(req).await.map_err(|e| {
                PodError::Internal(format!("cannot copy {} into the podvm ({}): {e}", host.display(), entry.guest))
            })?;
        }
    }
    Ok(n)
}

impl Pod {
    /// The container's files for a peer pod (see the module docs). `virtual_volume` is the guest
    /// pull CRI-O asked for; `host_root` is needed only when nothing is pulled.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn remote_files(
        self: &Arc<Self>,
        agent: &Arc<dyn Agent>,
        id: &str,
        annotations: &HashMap<String, String>,
        virtual_volume: Option<&VirtualVolume>,
        force_guest_pull: bool,
        host_root: Result<PathBuf, spec::SpecError>,
        binds: &[spec::HostBind],
    ) -> PodResult<RemoteFiles> {
        let mut storages = Vec::new();
        let pull =
            guest_pull_image(annotations, virtual_volume, force_guest_pull).map_err(PodError::InvalidArgument)?;
        let guest_root = match pull {
            Some((image, metadata)) => {
                info!(self.log, "the image is pulled in the podvm"; "container" => id, "image" => &image);
                storages.push(guest_pull_storage(id, &image, &metadata));
                guest_pull_root(id)
            }
            None => {
                let host_root = host_root.map_err(|e| PodError::InvalidArgument(e.to_string()))?;
                let guest = format!("{GUEST_SHARED}/{id}/rootfs");
                let n = copy_tree(agent, &host_root, &guest).await?;
                info!(self.log, "rootfs copied into the podvm"; "container" => id, "entries" => n);
                guest
            }
        };
        let mut sources = Vec::new();
        let mut synced = Vec::new();
        for b in binds {
            let base = b.source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into());
            let guest = format!("{GUEST_SHARED}/{id}-mounts/{}-{base}", b.index);
            // Taken before the copy: a change made while it runs is copied again later.
            let h = b.source.clone();
            let print = tokio::task::spawn_blocking(move || Fingerprint::of(&h)).await.unwrap_or_default();
            copy_tree(agent, &b.source, &guest).await?;
            synced.push((b.source.clone(), guest.clone(), print));
            sources.push(guest);
        }
        let sync = (!synced.is_empty()).then(|| spawn_sync(agent.clone(), id.to_string(), synced, self.log.clone()));
        Ok(RemoteFiles { guest_root, sources, storages, sync })
    }
}

/// Copies each `(host, guest, fingerprint when last copied)` tree again whenever its fingerprint
/// changes. Ends when a copy fails because the podvm is gone, or when aborted.
fn spawn_sync(
    agent: Arc<dyn Agent>,
    id: String,
    trees: Vec<(PathBuf, String, Fingerprint)>,
    log: Logger,
) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        let (trees, mut prints): (Vec<_>, Vec<_>) = trees.into_iter().map(|(h, g, p)| ((h, g), p)).unzip();
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(SYNC_INTERVAL).await;
            for (i, (host, guest)) in trees.iter().enumerate() {
                let h = host.clone();
                let now = tokio::task::spawn_blocking(move || Fingerprint::of(&h)).await.unwrap_or_default();
                if now == prints[i] {
                    continue;
                }
                match copy_tree(&agent, host, guest).await {
                    Ok(n) => {
                        prints[i] = now;
                        failures = 0;
                        info!(log, "volume updated in the podvm"; "container" => &id, "host_path" => %host.display(), "entries" => n);
                    }
                    Err(e) => {
                        failures += 1;
                        warn!(log, "cannot update a volume in the podvm"; "container" => &id, "host_path" => %host.display(), "error" => %e);
                        if failures >= 5 {
                            return;
                        }
                    }
                }
            }
        }
    })
    .abort_handle()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_pull_follows_katas_rules() {
        let mut a = HashMap::new();
        a.insert("io.kubernetes.cri.container-type".to_string(), "container".to_string());
        a.insert(CRI_IMAGE_NAME.to_string(), "reg:5000/busybox:test".to_string());
        assert_eq!(guest_pull_image(&a, None, false).unwrap(), None);
        let (image, meta) = guest_pull_image(&a, None, true).unwrap().unwrap();
        assert_eq!((image.as_str(), meta[CRI_IMAGE_NAME].as_str()), ("reg:5000/busybox:test", "reg:5000/busybox:test"));
        let mut sandbox = HashMap::new();
        sandbox.insert("io.kubernetes.cri-o.ContainerType".to_string(), "sandbox".to_string());
        assert_eq!(guest_pull_image(&sandbox, None, true).unwrap().unwrap().0, "pause");
        let mut crio = HashMap::new();
        crio.insert("io.kubernetes.cri-o.ContainerType".to_string(), "container".to_string());
        crio.insert(CRIO_IMAGE_NAME.to_string(), "reg/x:1".to_string());
        let vv = VirtualVolume { source: "ignored".into(), metadata: [("k".to_string(), "v".to_string())].into() };
        let (image, meta) = guest_pull_image(&crio, Some(&vv), false).unwrap().unwrap();
        assert_eq!((image.as_str(), meta["k"].as_str()), ("reg/x:1", "v"));
        crio.remove(CRIO_IMAGE_NAME);
        assert!(guest_pull_image(&crio, Some(&vv), false).unwrap_err().contains(CRIO_IMAGE_NAME));
        let s = guest_pull_storage("c1", "reg:5000/busybox:test", &a);
        assert_eq!((s.driver.as_str(), s.fstype.as_str()), ("image_guest_pull", "overlay"));
        assert_eq!(s.mount_point, "/run/kata-containers/c1/rootfs");
        let opt = s.driver_options[0].strip_prefix("image_guest_pull=").unwrap();
        let v: serde_json::Value = serde_json::from_str(opt).unwrap();
        assert_eq!(v["metadata"][CRI_IMAGE_NAME], "reg:5000/busybox:test");
    }

    #[test]
    fn crio_virtual_volumes_are_taken_out_of_the_rootfs_mounts() {
        use base64::Engine;
        let json = r#"{"volume_type":"image_guest_pull","source":"r/i:t","fs_type":"overlay_fs","image_pull":{"metadata":{"a":"b"}}}"#;
        let opt = format!("{VIRTUAL_VOLUME_PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(json));
        let mount = |fstype: &str, options: Vec<String>| crate::mounts::MountSpec {
            fstype: fstype.into(),
            source: String::new(),
            options,
        };
        let mut rootfs = vec![mount("overlay", vec!["lowerdir=/l".into()]), mount("fuse.nydus-overlayfs", vec![opt])];
        let vv = take_virtual_volume(&mut rootfs).unwrap().unwrap();
        assert_eq!((vv.source.as_str(), vv.metadata["a"].as_str()), ("r/i:t", "b"));
        assert_eq!(rootfs.len(), 1);
        let bad = format!(
            "{VIRTUAL_VOLUME_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(r#"{"volume_type":"direct_block"}"#)
        );
        let err = take_virtual_volume(&mut vec![mount("fuse.nydus-overlayfs", vec![bad])]).unwrap_err();
        assert!(err.contains("direct_block"), "{err}");
        assert!(take_virtual_volume(&mut vec![mount("x", vec![format!("{VIRTUAL_VOLUME_PREFIX}!!")])]).is_err());
    }
}
