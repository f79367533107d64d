//! Kubernetes pods through a real container manager's CRI, for end-to-end tests: a private
//! containerd 1.6 with its CRI plugin, or a private CRI-O 1.36 ([`Manager`]), each with a CNI
//! bridge network of its own, a locally built pause image and the busybox test image, and a small
//! CRI (`runtime.v1`) client ([`CriClient`]) speaking gRPC to it the way the kubelet does. The
//! same [`Cri`] harness drives both, so every pod scenario runs on both managers.
//!
//! The runtime handler is `kata` (our shim) unless `PODVISOR_CRI_HANDLER=runc` selects runc,
//! which validates the harness; assertions that only make sense in a VM then fail with "needs
//! the kata handler" ([`require_kata`]), they never pass silently.
//!
//! Everything a pod leaves on the host is checked after `RemovePodSandbox`
//! ([`Cri::remove_pod`]): processes, mounts, `/run/kata-containers` entries, cgroups, the pod's
//! network namespace (and with it any tap device and tc qdisc in it), the host side veth, CNI
//! results and IPAM leases, the manager's bundles and state directories and the shim socket.
//! Dropping the [`Cri`] removes pods still there, the bridge, the pod cgroups and then the whole
//! private manager ([`TestContainerd`], [`TestCrio`]).
//!
//! The CRI client uses tonic with hand-written prost messages ([`proto`]): the subset of
//! `k8s.io/cri-api/pkg/apis/runtime/v1/api.proto` the tests use, same names, field numbers and
//! types. `k8s-cri` (the maintained crate) and `tonic-build` both need `protoc` at build time,
//! which this project's machines do not have.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::containerd::{containerd_base_config, kata_test_config, shim_binary, TestContainerd};
use crate::crio_server::{ArchiveImage, CrioSetup, TestCrio};
use crate::{image, leaks};

/// The CRI messages the tests use, written after `runtime.v1`'s `api.proto` (same field
/// numbers and types; enums as `i32`, see the constants). Fields the tests never set or read
/// are left out: prost skips unknown fields of responses.
#[allow(missing_docs)]
pub mod proto;

// ---------------------------------------------------------------------------------------------
// The runtime handler under test.

/// `PODVISOR_CRI_HANDLER` value (and CRI runtime handler name) for our shim.
pub const KATA_HANDLER: &str = "kata";
/// `PODVISOR_CRI_HANDLER` value (and CRI runtime handler name) for containerd's runc shim.
pub const RUNC_HANDLER: &str = "runc";

/// The CRI runtime handler under test: `$PODVISOR_CRI_HANDLER` (`kata` or `runc`), by default
/// [`KATA_HANDLER`]. Any other value fails the test.
pub fn handler() -> &'static str {
    match std::env::var("PODVISOR_CRI_HANDLER").ok().filter(|s| !s.is_empty()).as_deref() {
        None | Some(KATA_HANDLER) => KATA_HANDLER,
        Some(RUNC_HANDLER) => RUNC_HANDLER,
        Some(other) => panic!("PODVISOR_CRI_HANDLER={other}: use {KATA_HANDLER} (default) or {RUNC_HANDLER}"),
    }
}

/// Whether pods run through our shim.
pub fn handler_is_kata() -> bool {
    handler() == KATA_HANDLER
}

/// Fails (never skips) what only makes sense in a VM when another handler was chosen.
pub fn require_kata(what: &str) {
    assert!(
        handler_is_kata(),
        "{what} needs the kata handler; PODVISOR_CRI_HANDLER={} only validates the harness",
        handler()
    );
}

// ---------------------------------------------------------------------------------------------
// The container manager under test.

/// The container manager whose CRI the harness drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    /// Debian's containerd 1.6 with its CRI plugin (handler `kata` -> `io.containerd.kata.v2`).
    Containerd,
    /// CRI-O 1.36 (handler `kata`, `runtime_type = "vm"`), from `../shared/tools/cri-o/`.
    Crio,
}

impl Manager {
    /// Both, in the order the tests run them.
    pub const ALL: [Manager; 2] = [Manager::Containerd, Manager::Crio];

    /// `runtime_name` of the CRI `Version` answer.
    pub fn runtime_name(self) -> &'static str {
        match self {
            Manager::Containerd => "containerd",
            Manager::Crio => "cri-o",
        }
    }

    /// Whether the manager can run here: containerd always (a missing binary is a failure later,
    /// naming the package); CRI-O only where its binaries are (`Err` says so in one line).
    pub fn available(self) -> Result<(), String> {
        match self {
            Manager::Containerd => Ok(()),
            Manager::Crio => crate::crio_server::tools_dir().map(|_| ()),
        }
    }
}

impl std::fmt::Display for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Manager::Containerd => "containerd",
            Manager::Crio => "CRI-O",
        })
    }
}

/// Defines one `#[test]` per manager, each running `$body(Manager)`:
/// `on_both_managers!(name_containerd, name_crio, body);`. Where CRI-O's binaries are missing
/// (a clone outside this workspace) the CRI-O test fails, naming them and `$PODVISOR_CRIO_DIR`.
#[macro_export]
macro_rules! on_both_managers {
    ($(#[$meta:meta])* $containerd:ident, $crio:ident, $body:path) => {
        $(#[$meta])*
        #[test]
        fn $containerd() {
            $body($crate::cri::Manager::Containerd)
        }
        $(#[$meta])*
        #[test]
        fn $crio() {
            if let Err(why) = $crate::cri::Manager::Crio.available() {
                panic!("{}: {why}", stringify!($crio));
            }
            $body($crate::cri::Manager::Crio)
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Images.

/// The pause image the CRI plugin uses as `sandbox_image`.
pub const PAUSE_IMAGE: &str = "podvisor.local/pause:test";
/// The busybox test image (see [`image::IMAGE_REF`]), imported into `k8s.io`.
pub const BUSYBOX_IMAGE: &str = image::IMAGE_REF;
/// The containerd namespace of the CRI plugin.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// The pause process: busybox `sh` as PID 1 of the sandbox, exiting 0 on SIGTERM or SIGINT
/// like the real pause. busybox rather than a static pause binary: the layer is the busybox
/// test image's own (same digest), so the pause image costs one small config blob, and
/// building a static binary in a test would need the C library's static archive and a
/// compiler run on every fresh checkout.
pub const PAUSE_SCRIPT: &str = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";

/// Bumped whenever the pause image's layout changes.
const PAUSE_FORMAT: &str = "podvisor-pause-image-v1";

/// The pause image archive (`podvisor.local/pause:test`): the busybox test image's layer with
/// a config whose entrypoint is `/bin/sh -c` [`PAUSE_SCRIPT`]; built once next to the busybox
/// image under `build/test-images/`.
pub fn pause_archive() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    build_pause(&image::busybox().archive).unwrap_or_else(|e| panic!("building the pause image failed: {e}"))
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn build_pause(busybox: &Path) -> Result<PathBuf, String> {
    let bytes = fs::read(busybox).map_err(|e| format!("{}: {e}", busybox.display()))?;
    let key = sha256_hex(&[PAUSE_FORMAT.as_bytes(), PAUSE_SCRIPT.as_bytes(), &bytes].concat())[..16].to_string();
    let dir = image::cache_dir().join(format!("pause-{key}"));
    let archive = dir.join("pause-oci.tar");
    if archive.is_file() {
        return Ok(archive);
    }
    // The busybox archive's files by name.
    let mut files: HashMap<String, Vec<u8>> = HashMap::new();
    let mut ar = tar::Archive::new(bytes.as_slice());
    for entry in ar.entries().map_err(|e| format!("{}: {e}", busybox.display()))? {
        let mut entry = entry.map_err(|e| format!("{}: {e}", busybox.display()))?;
        if entry.header().entry_type().is_file() {
            let name = entry.path().map_err(|e| e.to_string())?.to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).map_err(|e| e.to_string())?;
            files.insert(name, data);
        }
    }
    let blob = |digest: &str| -> Result<&Vec<u8>, String> {
        let hex = digest.strip_prefix("sha256:").ok_or_else(|| format!("digest {digest}"))?;
        files
            .get(&format!("blobs/sha256/{hex}"))
            .ok_or_else(|| format!("blob {digest} missing in {}", busybox.display()))
    };
    let json =
        |data: &[u8]| -> Result<serde_json::Value, String> { serde_json::from_slice(data).map_err(|e| e.to_string()) };
    let index = json(files.get("index.json").ok_or("index.json missing")?)?;
    let manifest_digest = index["manifests"][0]["digest"].as_str().ok_or("index.json: no manifest")?.to_string();
    let manifest = json(blob(&manifest_digest)?)?;
    let config_digest = manifest["config"]["digest"].as_str().ok_or("manifest: no config")?.to_string();
    let mut config = json(blob(&config_digest)?)?;
    let layer_digest = manifest["layers"][0]["digest"].as_str().ok_or("manifest: no layer")?.to_string();
    let layer = blob(&layer_digest)?.clone();

    config["config"] = serde_json::json!({
        "Env": [image::IMAGE_PATH_ENV],
        "Entrypoint": ["/bin/sh", "-c", PAUSE_SCRIPT],
        "WorkingDir": "/",
    });
    config["history"] = serde_json::json!([{
        "created": "1970-01-01T00:00:00Z",
        "created_by": "podvisor-tests cri.rs (pause: busybox sh trap loop)",
    }]);
    let config = serde_json::to_vec(&config).unwrap();
    let mut new_manifest = manifest.clone();
    new_manifest["config"]["digest"] = format!("sha256:{}", sha256_hex(&config)).into();
    new_manifest["config"]["size"] = config.len().into();
    let new_manifest = serde_json::to_vec(&new_manifest).unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&new_manifest)),
            "size": new_manifest.len(),
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": PAUSE_IMAGE,
                "org.opencontainers.image.ref.name": PAUSE_IMAGE,
            },
        }],
    }))
    .unwrap();

    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8], dir: bool| -> Result<(), String> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(if dir { tar::EntryType::Directory } else { tar::EntryType::Regular });
        h.set_mode(if dir { 0o755 } else { 0o644 });
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).map_err(|e| format!("pause archive entry {name}: {e}"))
    };
    add("blobs/", b"", true)?;
    add("blobs/sha256/", b"", true)?;
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, false)?;
    add("index.json", &index, false)?;
    for data in [&new_manifest, &config, &layer] {
        add(&format!("blobs/sha256/{}", sha256_hex(data)), data, false)?;
    }
    let bytes = b.into_inner().map_err(|e| format!("pause archive: {e}"))?;
    let tmp = image::cache_dir().join(format!(".pause-{key}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| {
        fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        fs::write(tmp.join("pause-oci.tar"), &bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
        match fs::rename(&tmp, &dir) {
            Ok(()) => Ok(()),
            Err(_) if archive.is_file() => Ok(()),
            Err(e) => Err(format!("renaming {} to {}: {e}", tmp.display(), dir.display())),
        }
    })();
    let _ = fs::remove_dir_all(&tmp);
    result.map(|()| archive)
}

mod client;
mod volumes;
pub use client::*;
pub use volumes::*;

// ---------------------------------------------------------------------------------------------
// CRI log files.

/// One line of a CRI log file: `<RFC 3339 time> <stdout|stderr> <F|P> <content>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriLogLine {
    /// The timestamp as written.
    pub time: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// `P`: a partial line, continued by the next one of the same stream.
    pub partial: bool,
    /// The content (without the newline).
    pub content: String,
}

/// Parses a CRI log file's text; a malformed line is an error naming it.
pub fn parse_cri_log(text: &str) -> Result<Vec<CriLogLine>, String> {
    text.lines()
        .enumerate()
        .map(|(n, l)| {
            let mut f = l.splitn(4, ' ');
            let (Some(time), Some(stream), Some(tag)) = (f.next(), f.next(), f.next()) else {
                return Err(format!("CRI log line {}: {l:?}: fewer than 3 fields", n + 1));
            };
            if !matches!(stream, "stdout" | "stderr") || !matches!(tag, "F" | "P") || !time.contains('T') {
                return Err(format!("CRI log line {}: {l:?}: not `<time> <stdout|stderr> <F|P> <content>`", n + 1));
            }
            Ok(CriLogLine {
                time: time.into(),
                stream: stream.into(),
                partial: tag == "P",
                content: f.next().unwrap_or("").into(),
            })
        })
        .collect()
}

/// The complete lines of `stream` in a CRI log file (partial lines joined).
pub fn cri_log_lines(path: &Path, stream: &str) -> Result<Vec<String>, String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    let mut pending = String::new();
    for l in parse_cri_log(&text)?.into_iter().filter(|l| l.stream == stream) {
        pending.push_str(&l.content);
        if !l.partial {
            out.push(std::mem::take(&mut pending));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The private containerd with the CRI plugin.

/// The CNI network of one [`Cri`]: a bridge with a gateway address on the host and a
/// /24 of its own, host-local IPAM with a private data directory, then loopback.
#[derive(Debug, Clone)]
pub struct CniNetwork {
    /// The CNI network name (`podvisor-<pid>-<n>`).
    pub name: String,
    /// The bridge device (`pvcri<pid>n<n>`, at most 15 characters).
    pub bridge: String,
    /// `10.213.<x>.0/24`.
    pub subnet: String,
    /// `10.213.<x>.1`, the bridge's address.
    pub gateway: String,
    /// The configuration directory (`conf_dir`).
    pub conf_dir: PathBuf,
    /// host-local's `dataDir` (one file per leased address).
    pub ipam_dir: PathBuf,
}

/// libcni's cache of ADD results (`<network>-<container id>-<ifname>`).
pub const CNI_RESULTS_DIR: &str = "/var/lib/cni/results";

fn choose_subnet(seed: u32) -> Result<u8, String> {
    let routes = Command::new("ip").args(["-4", "-o", "route", "show", "table", "all"]).output();
    let routes = routes.map_err(|e| format!("ip route: {e}: install iproute2 (scripts/deps.sh)"))?;
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    let addrs = Command::new("ip").args(["-4", "-o", "addr", "show"]).output().map_err(|e| format!("ip addr: {e}"))?;
    let addrs = String::from_utf8_lossy(&addrs.stdout).into_owned();
    for i in 0..250u32 {
        let x = ((seed + i) % 250) as u8 + 1;
        let prefix = format!("10.213.{x}.");
        if !routes.contains(&prefix) && !addrs.contains(&prefix) && !routes.contains("10.213.0.0/16") {
            return Ok(x);
        }
    }
    Err("no free 10.213.x.0/24 for the CNI bridge".into())
}

fn cni_conflist(net: &CniNetwork) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "cniVersion": "1.0.0",
        "name": net.name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": net.bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": net.subnet, "gateway": net.gateway }]],
                    "dataDir": net.ipam_dir,
                },
            },
            { "type": "loopback" },
        ],
    }))
    .unwrap()
}

/// The containerd configuration: as the default private one (root, state, sockets under
/// `dir`), with the CRI plugin enabled. Public so that the configuration is visible in docs and
/// test output.
pub fn cri_containerd_config(dir: &Path, net: &CniNetwork, default_handler: &str) -> String {
    let d = dir.display();
    let base = containerd_base_config(dir, "Private containerd of podvisor-tests with the CRI plugin (cri.rs).", true);
    format!(
        r#"{base}
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # No CAP_SYS_RESOURCE on the test hosts: runc cannot lower oom_score_adj to -998.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{conf}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "{default_handler}"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata]
      runtime_type = "io.containerd.kata.v2"
      pod_annotations = ["io.katacontainers.*"]
      privileged_without_host_devices = true
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata.options]
        ConfigPath = "{d}/configuration.toml"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"#,
        conf = net.conf_dir.display(),
    )
}

/// Namespaces as the kubelet asks for them for a pod without host namespaces: network and IPC
/// per pod, PID per container.
fn kubelet_namespaces() -> proto::NamespaceOption {
    proto::NamespaceOption {
        network: proto::NAMESPACE_POD,
        pid: proto::NAMESPACE_CONTAINER,
        ipc: proto::NAMESPACE_POD,
        target_id: String::new(),
    }
}

/// Configuration added to a [`Cri`]'s manager (the peer pod tests' `kata-remote` handler and
/// their registry); empty strings add nothing.
#[derive(Debug, Clone, Default)]
pub struct CriExtras {
    /// Appended to containerd's `config.toml` (tables of its own, e.g. more runtime handlers).
    pub containerd_config: String,
    /// CRI-O's `conf.d/60-extras.conf`.
    pub crio_drop_in: String,
    /// Appended to CRI-O's `registries.conf`.
    pub crio_registries: String,
}

/// How long a [`Cri`] took to come up.
#[derive(Debug, Clone, Copy, Default)]
pub struct CriStartup {
    /// From spawning the manager to its socket accepting connections (for CRI-O after the
    /// images were copied into its storage).
    pub manager: Duration,
    /// From spawning the manager to the CRI `Status` reporting RuntimeReady and NetworkReady.
    pub cri_ready: Duration,
    /// Getting the pause and busybox images in (containerd: import into `k8s.io`; CRI-O: copy
    /// into its storage before it starts) until the CRI lists both.
    pub images: Duration,
}

/// A pod the harness started: its sandbox id, the configuration it was started with and what
/// the CRI said about its network.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The 64-hex sandbox id.
    pub id: String,
    /// The configuration given to `RunPodSandbox` (and to every `CreateContainer`).
    pub config: proto::PodSandboxConfig,
    /// The pod IP (`PodSandboxStatus.network.ip`).
    pub ip: String,
    /// The pod's network namespace (`/var/run/netns/cni-...`), from the sandbox's runtime spec.
    pub netns: Option<PathBuf>,
    /// The host end of the pod's veth pair on the bridge.
    pub host_veth: Option<String>,
    /// The kubelet-style pod cgroup (`/podvisor-cri-<pid>-<n>/pod<uid>`), relative to each
    /// hierarchy.
    pub cgroup_parent: String,
    /// The manager's verbose sandbox information (`info["info"]` of `PodSandboxStatus`).
    pub info: serde_json::Value,
}

impl Pod {
    /// The pod's uid.
    pub fn uid(&self) -> &str {
        self.config.metadata.as_ref().map_or("", |m| m.uid.as_str())
    }

    /// The pod's log directory.
    pub fn log_directory(&self) -> PathBuf {
        PathBuf::from(&self.config.log_directory)
    }

    /// Where the CRI writes the log of a container created with `config` in this pod.
    pub fn log_path(&self, config: &proto::ContainerConfig) -> PathBuf {
        self.log_directory().join(&config.log_path)
    }
}

/// What `ExecSync` returned.
#[derive(Debug, Clone)]
pub struct ExecResult {
    /// The exit code.
    pub exit_code: i32,
    /// stdout as text.
    pub stdout: String,
    /// stderr as text.
    pub stderr: String,
}

/// The private container manager behind a [`Cri`].
enum Backend {
    Containerd(TestContainerd),
    Crio(TestCrio),
}

/// A private container manager with its CRI, on its own CNI bridge (see the module
/// documentation).
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: CriClient,
    net: CniNetwork,
    manager: Manager,
    handler: &'static str,
    cgroup_root: String,
    startup: CriStartup,
    /// Pod sandbox id -> container ids created in it.
    tracked: Mutex<Vec<(String, Vec<String>)>>,
    // Last: dropped after `Drop::drop` removed the pods, the bridge and the cgroups.
    backend: Backend,
}

/// Records under a private containerd's directory naming host objects that outlive the
/// directory (bridge, network namespaces, cgroups, loop devices), so that the next run can
/// remove them if this test process dies without cleaning up.
const LEFTOVERS_FILE: &str = "cri-host-objects";

pub(crate) fn record_host_object(dir: &Path, kind: &str, value: &str) {
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(dir.join(LEFTOVERS_FILE)) {
        let _ = writeln!(f, "{kind} {value}");
    }
}

/// Removes a host object recorded with [`record_host_object`]; returns what it did.
fn remove_host_object(kind: &str, value: &str) -> Option<String> {
    match kind {
        "bridge" if Path::new("/sys/class/net").join(value).exists() => {
            let out = Command::new("ip").args(["link", "del", value]).output();
            Some(format!("deleted bridge {value} ({:?})", out.map(|o| o.status)))
        }
        "netns" if Path::new(value).exists() => {
            let _ = nix::mount::umount2(value, nix::mount::MntFlags::MNT_DETACH);
            let r = fs::remove_file(value);
            Some(format!("removed network namespace {value} ({r:?})"))
        }
        "cgroup" => {
            let mut done = Vec::new();
            for h in cgroup_hierarchies() {
                let p = h.join(value.trim_start_matches('/'));
                if p.is_dir() {
                    done.push(format!("{} ({:?})", p.display(), remove_cgroup_tree(&p)));
                }
            }
            (!done.is_empty()).then(|| format!("removed cgroups {}", done.join(", ")))
        }
        "loop" => {
            // `<device> <backing file>`: detach only while the device still serves our file
            // (the number may have been reused by someone else since).
            let (device, file) = value.split_once(' ')?;
            let name = Path::new(device).file_name()?.to_string_lossy().into_owned();
            let backing = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
            if !backing.trim_end().trim_end_matches(" (deleted)").eq(file) {
                return None;
            }
            let out = Command::new("losetup").arg("-d").arg(device).output();
            matches!(&out, Ok(o) if o.status.success()).then(|| format!("detached loop device {device} ({file})"))
        }
        _ => None,
    }
}

/// Removes host objects recorded by CRI harnesses whose test process died.
fn reap_stale_host_objects() {
    let Ok(entries) = fs::read_dir("/tmp") else { return };
    let prefixes =
        [crate::containerd::DIR_PREFIX, crate::crio_server::DIR_PREFIX].map(|p| p.trim_start_matches("/tmp/"));
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = prefixes.iter().find_map(|p| name.strip_prefix(p)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() || crate::alive(pid) {
            continue;
        }
        let Ok(text) = fs::read_to_string(e.path().join(LEFTOVERS_FILE)) else { continue };
        for l in text.lines() {
            if let Some((kind, value)) = l.split_once(' ') {
                if let Some(done) = remove_host_object(kind, value) {
                    eprintln!("stale CRI test objects of dead process {pid}: {done}");
                }
            }
        }
    }
}

/// Every cgroup hierarchy root (v1 controllers and the unified one).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for m in leaks::mounts() {
        if (m.fstype == "cgroup" || m.fstype == "cgroup2") && m.mount_point.starts_with("/sys/fs/cgroup") {
            out.push(m.mount_point);
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Removes a cgroup directory and its children (deepest first); fails while a process is in
/// one of them.
fn remove_cgroup_tree(p: &Path) -> std::io::Result<()> {
    for e in fs::read_dir(p)?.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_cgroup_tree(&e.path())?;
        }
    }
    fs::remove_dir(p)
}

/// The host interfaces enslaved to `bridge`.
pub fn bridge_ports(bridge: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(Path::new("/sys/class/net").join(bridge).join("brif"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Runs `ip <args>` inside network namespace `netns` (a pinned path) with `nsenter`.
pub fn ip_in_netns(netns: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("ip")
        .args(args)
        .output()
        .map_err(|e| format!("nsenter: {e}"))?;
    if !out.status.success() {
        return Err(format!("ip {args:?} in {}: {}", netns.display(), String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The links of a network namespace (`ip -o link`), by name.
pub fn links_in_netns(netns: &Path) -> Result<Vec<String>, String> {
    Ok(ip_in_netns(netns, &["-o", "link", "show"])?
        .lines()
        .filter_map(|l| l.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n).to_string()))
        .collect())
}

impl Cri {
    /// Starts `manager` with its CRI for [`handler`] (panics with the manager's log on failure).
    pub fn start(manager: Manager) -> Self {
        Self::try_start(manager).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `manager` with its CRI for [`handler`]: checks the prerequisites, writes the CNI
    /// configuration, starts the manager, waits for the CRI to be ready and for both images.
    pub fn try_start(manager: Manager) -> Result<Self, String> {
        Self::try_start_with(manager, &CriExtras::default())
    }

    /// [`Cri::try_start`] with `extras` added to the manager's configuration.
    pub fn try_start_with(manager: Manager, extras: &CriExtras) -> Result<Self, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let handler = handler();
        manager.available()?;
        for (p, pkg) in [
            ("/usr/lib/cni/bridge", "containernetworking-plugins"),
            ("/usr/lib/cni/host-local", "containernetworking-plugins"),
            ("/usr/lib/cni/loopback", "containernetworking-plugins"),
            ("/usr/bin/nsenter", "util-linux"),
            ("/usr/sbin/losetup", "util-linux"),
        ] {
            if !Path::new(p).exists() {
                return Err(format!("{p} is missing: install Debian's {pkg} (scripts/deps.sh does)"));
            }
        }
        reap_stale_host_objects();
        let pause = pause_archive();
        let busybox = image::busybox().archive;
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let x = choose_subnet(pid.wrapping_mul(7).wrapping_add(n * 13))?;
        let kata_config =
            if handler == KATA_HANDLER { kata_test_config(|_| {}) } else { "# unused: runc handler\n".into() };
        // The network's directories live in the manager's directory, which exists only once the
        // manager's harness created it: its setup closure writes them.
        let net_cell: Mutex<Option<CniNetwork>> = Mutex::new(None);
        let make_net = |dir: &Path, conf_dir: PathBuf| -> Result<CniNetwork, String> {
            let net = CniNetwork {
                name: format!("podvisor-{pid}-{n}"),
                bridge: format!("pvcri{pid}n{n}"),
                subnet: format!("10.213.{x}.0/24"),
                gateway: format!("10.213.{x}.1"),
                conf_dir,
                ipam_dir: dir.join("cni-ipam"),
            };
            assert!(net.bridge.len() <= 15, "bridge name {} is too long", net.bridge);
            let io = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
            fs::create_dir_all(&net.conf_dir).map_err(|e| io(&net.conf_dir, e))?;
            fs::create_dir_all(&net.ipam_dir).map_err(|e| io(&net.ipam_dir, e))?;
            let conf = net.conf_dir.join("10-podvisor.conflist");
            fs::write(&conf, cni_conflist(&net)).map_err(|e| io(&conf, e))?;
            record_host_object(dir, "bridge", &net.bridge);
            *net_cell.lock().unwrap() = Some(net.clone());
            Ok(net)
        };
        let started = Instant::now();
        let mut images = Duration::ZERO;
        let backend = match manager {
            Manager::Containerd => {
                let shim = if handler == KATA_HANDLER { Some(shim_binary()) } else { None };
                let make_config = |dir: &Path| -> String {
                    match make_net(dir, dir.join("cni/net.d")) {
                        Ok(net) => cri_containerd_config(dir, &net, handler) + &extras.containerd_config,
                        Err(e) => format!("# the CNI configuration could not be written: {e}\n"),
                    }
                };
                Backend::Containerd(TestContainerd::try_start_custom(&kata_config, shim.as_deref(), &make_config)?)
            }
            Manager::Crio => {
                // runc pods need no shim; the kata handler must still name an executable.
                let shim = shim_binary();
                let write_cni =
                    |conf_dir: &Path| make_net(conf_dir.parent().unwrap(), conf_dir.to_path_buf()).map(|_| ());
                let archives = [
                    ArchiveImage { archive: pause.clone(), reference: PAUSE_IMAGE.into() },
                    ArchiveImage { archive: busybox.clone(), reference: BUSYBOX_IMAGE.into() },
                ];
                let setup = CrioSetup {
                    kata_config: &kata_config,
                    shim: &shim,
                    images: &archives,
                    pause_image: PAUSE_IMAGE,
                    write_cni: &write_cni,
                    extra_drop_in: &extras.crio_drop_in,
                    registries: &extras.crio_registries,
                };
                let crio = TestCrio::try_start(&setup)?;
                images = crio.images_time();
                Backend::Crio(crio)
            }
        };
        let net = net_cell.lock().unwrap().take().ok_or("the CNI configuration was not written")?;
        let socket_up = started.elapsed();
        let cgroup_root = format!("/podvisor-cri-{pid}-{n}");
        let (dir, socket) = match &backend {
            Backend::Containerd(c) => (c.dir().to_path_buf(), c.socket().to_path_buf()),
            Backend::Crio(c) => (c.dir().to_path_buf(), c.socket().to_path_buf()),
        };
        record_host_object(&dir, "cgroup", &cgroup_root);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let client = rt.block_on(CriClient::connect(&socket))?;
        let me = Cri {
            rt,
            client,
            net,
            manager,
            handler,
            cgroup_root,
            startup: CriStartup::default(),
            tracked: Mutex::new(Vec::new()),
            backend,
        };
        // The CRI answers once it is initialized; Status says when the runtime and the network
        // (CNI configuration loaded) are ready.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = me.rt.block_on(me.client.status());
            let ready = status.as_ref().map(|s| {
                let conds = s.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
                ["RuntimeReady", "NetworkReady"].iter().all(|t| conds.iter().any(|c| c.r#type == *t && c.status))
            });
            if matches!(ready, Ok(true)) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("the CRI was not ready within 60 s: {status:?}\n{}", me.logs()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let cri_ready = started.elapsed();
        let t = Instant::now();
        if let Backend::Containerd(ctd) = &me.backend {
            for archive in [&pause, &busybox] {
                let out = ctd.ctr(&["-n", CRI_NAMESPACE, "image", "import", &archive.display().to_string()]);
                if !out.status.success() {
                    return Err(format!("importing {} into {CRI_NAMESPACE}: {}", archive.display(), ctd.explain(&out)));
                }
            }
        }
        // containerd's CRI learns about imported images from its events.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let listed = me.rt.block_on(me.client.list_images())?;
            let has = |r: &str| listed.iter().any(|i| i.repo_tags.iter().any(|t| t == r));
            if has(PAUSE_IMAGE) && has(BUSYBOX_IMAGE) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("the CRI does not list {PAUSE_IMAGE} and {BUSYBOX_IMAGE}: {listed:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        images += t.elapsed();
        let mut me = me;
        me.startup = CriStartup { manager: socket_up, cri_ready, images };
        Ok(me)
    }

    /// The container manager under test.
    pub fn manager(&self) -> Manager {
        self.manager
    }

    /// The private containerd, when that is the manager (`ctr`, its log).
    pub fn containerd(&self) -> Option<&TestContainerd> {
        match &self.backend {
            Backend::Containerd(c) => Some(c),
            Backend::Crio(_) => None,
        }
    }

    /// The private CRI-O, when that is the manager.
    pub fn crio(&self) -> Option<&TestCrio> {
        match &self.backend {
            Backend::Crio(c) => Some(c),
            Backend::Containerd(_) => None,
        }
    }

    /// Restarts the container manager in place (same root, state, socket, configuration) while
    /// the pods run on: [`TestContainerd::restart`] or [`TestCrio::restart`] with `signal`
    /// (SIGTERM as `systemctl restart` sends, or SIGKILL for a crash), then reconnects the CRI
    /// client and waits for `Status` to report RuntimeReady and NetworkReady again. Returns the
    /// time from the signal to a ready CRI.
    pub fn restart_manager(&mut self, signal: nix::sys::signal::Signal) -> Result<Duration, String> {
        let started = Instant::now();
        match &mut self.backend {
            Backend::Containerd(c) => c.restart(signal)?,
            Backend::Crio(c) => c.restart(signal)?,
        };
        let socket = match &self.backend {
            Backend::Containerd(c) => c.socket().to_path_buf(),
            Backend::Crio(c) => c.socket().to_path_buf(),
        };
        self.client = self.rt.block_on(CriClient::connect(&socket))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.rt.block_on(self.client.status());
            let ready = status.as_ref().map(|s| {
                let conds = s.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
                ["RuntimeReady", "NetworkReady"].iter().all(|t| conds.iter().any(|c| c.r#type == *t && c.status))
            });
            if matches!(ready, Ok(true)) {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the CRI was not ready within 60 s of restarting {}: {status:?}\n{}",
                    self.manager,
                    self.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The manager's private directory (scratch space for a test lives under it too).
    pub fn dir(&self) -> &Path {
        match &self.backend {
            Backend::Containerd(c) => c.dir(),
            Backend::Crio(c) => c.dir(),
        }
    }

    /// The shim configuration the `kata` handler uses (rewrite it before `RunPodSandbox` to
    /// change the next pod's VM).
    pub fn kata_config(&self) -> &Path {
        match &self.backend {
            Backend::Containerd(c) => c.kata_config(),
            Backend::Crio(c) => c.kata_config(),
        }
    }

    /// Makes the manager's teardown clean up after `id` too.
    pub fn track_id(&self, id: &str) {
        match &self.backend {
            Backend::Containerd(c) => c.track_id(id),
            Backend::Crio(c) => c.track_id(id),
        }
    }

    /// The bundle the manager gives the shim for container or sandbox `id` (`config.json`).
    pub fn bundle(&self, id: &str) -> PathBuf {
        match &self.backend {
            Backend::Containerd(c) => c.dir().join("state/io.containerd.runtime.v2.task").join(CRI_NAMESPACE).join(id),
            Backend::Crio(c) => c.bundle(id),
        }
    }

    /// The directory holding one bundle per task id.
    pub fn bundles_dir(&self) -> PathBuf {
        match &self.backend {
            Backend::Containerd(_) => self.bundle("x").parent().unwrap().to_path_buf(),
            Backend::Crio(c) => c.bundles_dir(),
        }
    }

    /// The shim socket of the pod `sandbox_id` (containerd-style, from the address the manager
    /// passes to `start`: containerd's socket and `k8s.io`, or `""` and `default` for CRI-O).
    pub fn shim_socket(&self, sandbox_id: &str) -> PathBuf {
        match &self.backend {
            Backend::Containerd(c) => leaks::shim_socket(&c.socket().to_string_lossy(), CRI_NAMESPACE, sandbox_id),
            Backend::Crio(_) => leaks::shim_socket("", "default", sandbox_id),
        }
    }

    /// The async CRI client.
    pub fn client(&self) -> &CriClient {
        &self.client
    }

    /// Runs a future (e.g. a [`CriClient`] call) on this harness's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The runtime handler pods are started with.
    pub fn handler(&self) -> &'static str {
        self.handler
    }

    /// The CNI network.
    pub fn network(&self) -> &CniNetwork {
        &self.net
    }

    /// How long startup took.
    pub fn startup(&self) -> CriStartup {
        self.startup
    }

    /// The manager's log tail for assertion messages (the shim's log is in it, unless a
    /// journal runs).
    pub fn logs(&self) -> String {
        match &self.backend {
            Backend::Containerd(c) => c.logs_tail(40),
            Backend::Crio(c) => c.logs_tail(40),
        }
    }

    fn ok<T>(&self, what: &str, r: CriResult<T>) -> T {
        r.unwrap_or_else(|e| panic!("{what}: {e}\n{}", self.logs()))
    }

    /// A kubelet-like sandbox configuration for a pod named `name`: a unique uid, hostname =
    /// name, a log directory under containerd's directory, DNS settings, labels and
    /// annotations, the pod cgroup `<root>/pod<uid>`, and namespaces as the kubelet asks for a
    /// pod without host namespaces (network and IPC per pod, PID per container).
    pub fn pod_config(&self, name: &str) -> proto::PodSandboxConfig {
        let uid = crate::unique_id(&format!("pod-{name}"));
        let namespace = "podvisor-test".to_string();
        let log_directory = self.dir().join("pods").join(format!("{namespace}_{name}_{uid}"));
        proto::PodSandboxConfig {
            metadata: Some(proto::PodSandboxMetadata { name: name.into(), uid: uid.clone(), namespace, attempt: 0 }),
            hostname: name.into(),
            log_directory: log_directory.display().to_string(),
            dns_config: Some(proto::DnsConfig {
                // Written into resolv.conf only: nothing in the tests resolves names.
                servers: vec!["127.0.0.53".into()],
                searches: vec!["podvisor-test.svc.cluster.local".into(), "svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            port_mappings: vec![],
            labels: HashMap::from([("app".into(), name.into()), ("podvisor.test/harness".into(), "cri".into())]),
            annotations: HashMap::from([("podvisor.test/pod".into(), name.into())]),
            linux: Some(proto::LinuxPodSandboxConfig {
                cgroup_parent: format!("{}/pod{uid}", self.cgroup_root),
                security_context: Some(proto::LinuxSandboxSecurityContext {
                    namespace_options: Some(kubelet_namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    /// A container configuration for the busybox image running `args` (as the command), its
    /// log at `<name>/0.log` in the pod's log directory, namespaces as the kubelet sets them.
    pub fn container_config(&self, name: &str, args: &[&str]) -> proto::ContainerConfig {
        proto::ContainerConfig {
            metadata: Some(proto::ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(proto::ImageSpec {
                image: BUSYBOX_IMAGE.into(),
                user_specified_image: BUSYBOX_IMAGE.into(),
                ..Default::default()
            }),
            command: args.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}/0.log"),
            labels: HashMap::from([("podvisor.test/container".into(), name.into())]),
            linux: Some(proto::LinuxContainerConfig {
                resources: Some(proto::LinuxContainerResources::default()),
                security_context: Some(proto::LinuxContainerSecurityContext {
                    namespace_options: Some(kubelet_namespaces()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    /// What the kubelet does before `RunPodSandbox`: the pod's log directory and, for a
    /// cgroupfs-style `cgroup_parent`, the pod cgroup in every hierarchy (a systemd slice is
    /// systemd's to make). Both go in [`Self::remove_pod`].
    pub fn prepare_pod(&self, config: &proto::PodSandboxConfig) {
        fs::create_dir_all(&config.log_directory).unwrap_or_else(|e| panic!("{}: {e}", config.log_directory));
        let parent = config.linux.as_ref().map(|l| l.cgroup_parent.as_str()).unwrap_or("");
        if parent.is_empty() || parent.ends_with(".slice") {
            return;
        }
        for h in cgroup_hierarchies() {
            let mut dir = h.clone();
            for part in Path::new(parent.trim_start_matches('/')).components() {
                let up = dir.clone();
                dir.push(part);
                if dir.is_dir() {
                    continue;
                }
                // Pods started at once share the parents: another thread may have made it.
                match fs::create_dir(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                        panic!("pod cgroup {}: {e}", dir.display())
                    }
                    _ => {}
                }
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    if let Ok(v) = fs::read_to_string(up.join(file)) {
                        let _ = fs::write(dir.join(file), v.trim());
                    }
                }
            }
        }
    }

    /// `RunPodSandbox` with the handler under test (after [`Self::prepare_pod`]); then
    /// `PodSandboxStatus` for the pod IP and the network namespace. The sandbox id is tracked
    /// for teardown.
    pub fn run_pod(&self, config: &proto::PodSandboxConfig) -> Pod {
        self.run_pod_with_handler(config, self.handler)
    }

    /// [`Self::run_pod`] with another runtime handler (`runc` next to `kata` in benchmarks).
    pub fn run_pod_with_handler(&self, config: &proto::PodSandboxConfig, handler: &str) -> Pod {
        self.try_run_pod_with_handler(config, handler).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::run_pod`] that returns errors (with the manager's log tail) instead of panicking.
    pub fn try_run_pod(&self, config: &proto::PodSandboxConfig) -> Result<Pod, String> {
        self.try_run_pod_with_handler(config, self.handler)
    }

    /// [`Self::run_pod_with_handler`] that returns errors (with the manager's log tail).
    pub fn try_run_pod_with_handler(&self, config: &proto::PodSandboxConfig, handler: &str) -> Result<Pod, String> {
        self.prepare_pod(config);
        let before = bridge_ports(&self.net.bridge);
        let started = Instant::now();
        let id = self
            .block_on(self.client.run_pod_sandbox(config, handler))
            .map_err(|e| format!("RunPodSandbox: {e}\n{}", self.logs()))?;
        eprintln!("RunPodSandbox ({handler}) took {:.2} s: {id}", started.elapsed().as_secs_f64());
        self.track_id(&id);
        self.tracked.lock().unwrap().push((id.clone(), Vec::new()));
        let st = self
            .block_on(self.client.pod_sandbox_status(&id, true))
            .map_err(|e| format!("PodSandboxStatus: {e}\n{}", self.logs()))?;
        let status = st.status.clone().unwrap_or_default();
        if status.state != proto::SANDBOX_READY {
            return Err(format!("sandbox {id} is not ready: {status:?}\n{}", self.logs()));
        }
        let ip = status.network.as_ref().map(|n| n.ip.clone()).unwrap_or_default();
        if ip.is_empty() {
            return Err(format!("PodSandboxStatus has no pod IP: {st:?}"));
        }
        let info: serde_json::Value =
            st.info.get("info").and_then(|i| serde_json::from_str(i).ok()).unwrap_or(serde_json::Value::Null);
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["type"] == "network"))
            .and_then(|n| n["path"].as_str())
            .map(PathBuf::from);
        if let Some(p) = &netns {
            record_host_object(self.dir(), "netns", &p.display().to_string());
        }
        let after = bridge_ports(&self.net.bridge);
        let host_veth = after.into_iter().find(|p| !before.contains(p));
        let cgroup_parent = config.linux.as_ref().map(|l| l.cgroup_parent.clone()).unwrap_or_default();
        Ok(Pod { id, config: config.clone(), ip, netns, host_veth, cgroup_parent, info })
    }

    /// A record of sandbox `id` whose `RunPodSandbox` (with `config`) failed or never returned,
    /// tracked for teardown, for [`Self::check_pod_gone`]: no IP, network namespace or veth is
    /// known (the leak check still covers processes, mounts, run directories, cgroups, the
    /// CRI's records, bundles, the CNI result and the pod cgroup).
    pub fn pod_record(&self, id: &str, config: &proto::PodSandboxConfig) -> Pod {
        self.track_id(id);
        {
            let mut tracked = self.tracked.lock().unwrap();
            if !tracked.iter().any(|p| p.0 == id) {
                tracked.push((id.to_string(), Vec::new()));
            }
        }
        let cgroup_parent = config.linux.as_ref().map(|l| l.cgroup_parent.clone()).unwrap_or_default();
        Pod {
            id: id.into(),
            config: config.clone(),
            ip: String::new(),
            netns: None,
            host_veth: None,
            cgroup_parent,
            info: serde_json::Value::Null,
        }
    }

    /// What the kubelet does before `CreateContainer`: the container's log directory
    /// (`<pod log dir>/<name>/`; CRI-O does not make it, containerd does).
    pub fn prepare_container(&self, pod_config: &proto::PodSandboxConfig, config: &proto::ContainerConfig) {
        let dir = Path::new(&pod_config.log_directory).join(&config.log_path);
        if let Some(dir) = dir.parent() {
            fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        }
    }

    /// `CreateContainer` in `pod` (tracked for teardown); returns the container id.
    pub fn create_container(&self, pod: &Pod, config: &proto::ContainerConfig) -> String {
        self.prepare_container(&pod.config, config);
        let id = self.ok("CreateContainer", self.block_on(self.client.create_container(&pod.id, config, &pod.config)));
        self.track_id(&id);
        if let Some(p) = self.tracked.lock().unwrap().iter_mut().find(|p| p.0 == pod.id) {
            p.1.push(id.clone());
        }
        id
    }

    /// `StartContainer`.
    pub fn start_container(&self, id: &str) {
        self.ok("StartContainer", self.block_on(self.client.start_container(id)));
    }

    /// `CreateContainer` + `StartContainer`; returns the container id.
    pub fn run_container(&self, pod: &Pod, config: &proto::ContainerConfig) -> String {
        let id = self.create_container(pod, config);
        self.start_container(&id);
        id
    }

    /// `ExecSync` (`timeout_s` 0: none).
    pub fn exec(&self, id: &str, cmd: &[&str], timeout_s: i64) -> ExecResult {
        let r = self.ok(&format!("ExecSync {cmd:?}"), self.block_on(self.client.exec_sync(id, cmd, timeout_s)));
        ExecResult {
            exit_code: r.exit_code,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        }
    }

    /// `Exec` (streaming) connected: the kubelet's `kubectl exec` path.
    pub fn exec_stream(&self, id: &str, cmd: &[&str], tty: bool, stdin: bool) -> crate::stream::Stream {
        let req = proto::ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            stdout: true,
            stderr: !tty,
        };
        let url = self.ok(&format!("Exec {cmd:?}"), self.block_on(self.client.exec_url(req)));
        crate::stream::Stream::connect(&url).unwrap_or_else(|e| panic!("Exec {cmd:?} in {id}: {e}\n{}", self.logs()))
    }

    /// `Attach` connected: the kubelet's `kubectl attach` path (`tty` must match the container's).
    pub fn attach_stream(&self, id: &str, tty: bool) -> crate::stream::Stream {
        let req = proto::AttachRequest { container_id: id.into(), stdin: true, tty, stdout: true, stderr: !tty };
        let url = self.ok("Attach", self.block_on(self.client.attach_url(req)));
        crate::stream::Stream::connect(&url).unwrap_or_else(|e| panic!("Attach to {id}: {e}\n{}", self.logs()))
    }

    /// `ExecSync` that must exit 0; returns stdout.
    pub fn exec_ok(&self, id: &str, cmd: &[&str]) -> String {
        let r = self.exec(id, cmd, 60);
        assert_eq!(r.exit_code, 0, "ExecSync {cmd:?} in {id}: {r:?}\n{}", self.logs());
        r.stdout
    }

    /// `ContainerStatus`.
    pub fn container_status(&self, id: &str) -> proto::ContainerStatus {
        let r = self.ok("ContainerStatus", self.block_on(self.client.container_status(id, false)));
        r.status.unwrap_or_default()
    }

    /// Polls `ContainerStatus` until the container exited; fails after `timeout`.
    pub fn wait_exited(&self, id: &str, timeout: Duration) -> proto::ContainerStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.container_status(id);
            if s.state == proto::CONTAINER_EXITED {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} did not exit within {timeout:?}: {s:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `StopContainer`.
    pub fn stop_container(&self, id: &str, timeout_s: i64) {
        self.ok("StopContainer", self.block_on(self.client.stop_container(id, timeout_s)));
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, id: &str) {
        self.ok("RemoveContainer", self.block_on(self.client.remove_container(id)));
    }

    /// `ListContainers` of a pod.
    pub fn list_containers(&self, pod: &Pod) -> Vec<proto::Container> {
        self.ok("ListContainers", self.block_on(self.client.list_containers(Some(&pod.id))))
    }

    /// `PodSandboxStatus` (verbose).
    pub fn pod_status(&self, pod: &Pod) -> proto::PodSandboxStatusResponse {
        self.ok("PodSandboxStatus", self.block_on(self.client.pod_sandbox_status(&pod.id, true)))
    }

    /// The OCI spec the CRI made for container or sandbox `id` (`runtimeSpec` of the verbose
    /// `ContainerStatus` / `PodSandboxStatus`): what the shim gets as `config.json` once the task
    /// is created (`StartContainer`), available as soon as `CreateContainer` returned.
    pub fn cri_spec(&self, id: &str) -> Option<serde_json::Value> {
        let info = match self.block_on(self.client.container_status(id, true)) {
            Ok(r) => r.info,
            Err(_) => self.block_on(self.client.pod_sandbox_status(id, true)).ok()?.info,
        };
        let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
        Some(v["runtimeSpec"].clone()).filter(|s| !s.is_null())
    }

    /// The OCI spec containerd wrote for task `id` (`<state>/io.containerd.runtime.v2.task/k8s.io/<id>/config.json`),
    /// i.e. exactly what the shim gets; `None` once the bundle is gone.
    pub fn bundle_spec(&self, id: &str) -> Option<serde_json::Value> {
        let p = self.bundle(id).join("config.json");
        fs::read(p).ok().and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// `RunPodSandbox` that must fail: its error, after checking that the sandbox left nothing
    /// (its id is caught from containerd's task bundles while the call runs) and that the CRI
    /// lists no such pod.
    pub fn run_pod_failing(&self, config: &proto::PodSandboxConfig) -> String {
        fn entries(dir: &Path) -> HashSet<String> {
            fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        }
        self.prepare_pod(config);
        let bundles = self.bundles_dir();
        let before = entries(&bundles);
        let done = AtomicBool::new(false);
        let seen = Mutex::new(HashSet::new());
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    // containerd renames a bundle to `.<id>` while it deletes it: not another sandbox.
                    let new = entries(&bundles).into_iter().filter(|e| !e.starts_with('.') && !before.contains(e));
                    seen.lock().unwrap().extend(new);
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            let r = self.block_on(self.client.run_pod_sandbox(config, self.handler));
            done.store(true, Ordering::Relaxed);
            r
        });
        let err = match result {
            Ok(id) => panic!("RunPodSandbox succeeded ({id}) but should have failed\n{}", self.logs()),
            Err(e) => e,
        };
        let ids: Vec<String> = seen.into_inner().unwrap().into_iter().collect();
        assert_eq!(ids.len(), 1, "sandbox bundles seen during the failed RunPodSandbox: {ids:?}");
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        leaks::assert_no_leaks(&ids, None);
        let parent = config.linux.as_ref().map(|l| l.cgroup_parent.as_str()).unwrap_or("");
        let left = remove_cgroup_parent(parent);
        assert!(left.is_empty(), "the failed pod's cgroup is busy: {left:?}");
        let name = config.metadata.as_ref().unwrap().name.clone();
        let pods = self.block_on(self.client.list_pod_sandbox()).unwrap();
        assert!(
            !pods.iter().any(|p| p.metadata.as_ref().is_some_and(|m| m.name == name)),
            "the failed pod is listed: {pods:?}"
        );
        err
    }

    /// Asserts that the host can reach `ip` only through this harness's bridge (so that test
    /// traffic to a pod never leaves the machine), else fails.
    pub fn assert_routed_via_bridge(&self, ip: &str) {
        let out = Command::new("ip").args(["-o", "-4", "route", "get", ip]).output().expect("ip route get");
        let route = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            route.contains(&format!(" dev {} ", self.net.bridge)),
            "the route to pod IP {ip} does not use the test bridge {}: {route:?}; refusing to send traffic",
            self.net.bridge
        );
    }

    /// `StopPodSandbox` (idempotent in the CRI).
    pub fn stop_pod(&self, pod: &Pod) {
        self.ok("StopPodSandbox", self.block_on(self.client.stop_pod_sandbox(&pod.id)));
    }

    /// `StopPodSandbox` + `RemovePodSandbox`, then removes the pod cgroup as the kubelet does,
    /// and asserts that nothing of the pod is left ([`Self::assert_pod_gone`]).
    pub fn remove_pod(&self, pod: &Pod) {
        // The kubelet stops each container with its grace period before the sandbox; CRI-O's
        // StopPodSandbox would otherwise wait its own timeout for a PID 1 that ignores SIGTERM.
        for id in self.containers_of(pod) {
            let running = self
                .block_on(self.client.container_status(&id, false))
                .is_ok_and(|r| r.status.is_some_and(|s| s.state == proto::CONTAINER_RUNNING));
            if running {
                self.stop_container(&id, 2);
            }
        }
        let t = Instant::now();
        self.stop_pod(pod);
        let stopped = t.elapsed();
        self.ok("RemovePodSandbox", self.block_on(self.client.remove_pod_sandbox(&pod.id)));
        eprintln!(
            "StopPodSandbox took {:.2} s, RemovePodSandbox {:.2} s",
            stopped.as_secs_f64(),
            (t.elapsed() - stopped).as_secs_f64()
        );
        self.assert_pod_gone(pod);
    }

    /// The container ids created in `pod` through this harness.
    pub fn containers_of(&self, pod: &Pod) -> Vec<String> {
        self.tracked.lock().unwrap().iter().find(|p| p.0 == pod.id).map(|p| p.1.clone()).unwrap_or_default()
    }

    /// What is left of a removed pod (see [`Self::assert_pod_gone`]).
    pub fn pod_leftovers(&self, pod: &Pod) -> Vec<String> {
        let containers = self.containers_of(pod);
        let mut ids: Vec<&str> = vec![pod.id.as_str()];
        ids.extend(containers.iter().map(String::as_str));
        let mut found = leaks::find_leaks(&ids, None);
        // The CRI and containerd.
        if let Ok(pods) = self.block_on(self.client.list_pod_sandbox()) {
            if pods.iter().any(|p| p.id == pod.id) {
                found.push(format!("the CRI still lists sandbox {}", pod.id));
            }
        }
        if let Ok(list) = self.block_on(self.client.list_containers(None)) {
            for c in list.iter().filter(|c| ids.contains(&c.id.as_str())) {
                found.push(format!("the CRI still lists container {}", c.id));
            }
        }
        match &self.backend {
            Backend::Containerd(c) => {
                let d = c.dir();
                for id in &ids {
                    for base in ["state", "root"] {
                        let bundle = d.join(base).join("io.containerd.runtime.v2.task").join(CRI_NAMESPACE).join(id);
                        if bundle.exists() {
                            found.push(format!("task bundle {}", bundle.display()));
                        }
                        for kind in ["sandboxes", "containers"] {
                            let p = d.join(base).join("io.containerd.grpc.v1.cri").join(kind).join(id);
                            if p.exists() {
                                found.push(format!("CRI directory {}", p.display()));
                            }
                        }
                    }
                }
            }
            Backend::Crio(c) => {
                for id in &ids {
                    found.extend(c.leftovers_of(id));
                }
            }
        }
        let sock = self.shim_socket(&pod.id);
        if sock.exists() {
            found.push(format!("shim socket {}", sock.display()));
        }
        // The network: namespace (taps and qdiscs of a VM live in it), veth, CNI state.
        if let Some(ns) = &pod.netns {
            if ns.exists() {
                let links = links_in_netns(ns).unwrap_or_default();
                found.push(format!("network namespace {} (links {links:?})", ns.display()));
            }
            if leaks::mounts().iter().any(|m| &m.mount_point == ns) {
                found.push(format!("mount of network namespace {}", ns.display()));
            }
        }
        if let Some(veth) = &pod.host_veth {
            if Path::new("/sys/class/net").join(veth).exists() {
                found.push(format!("host veth {veth}"));
            }
        }
        let result = Path::new(CNI_RESULTS_DIR).join(format!("{}-{}-eth0", self.net.name, pod.id));
        if result.exists() {
            found.push(format!("CNI result {}", result.display()));
        }
        let lease = self.net.ipam_dir.join(&self.net.name).join(&pod.ip);
        if !pod.ip.is_empty() && lease.exists() {
            found.push(format!("IPAM lease {}", lease.display()));
        }
        for link in fs::read_dir("/sys/class/net").into_iter().flatten().flatten() {
            let name = link.file_name().to_string_lossy().into_owned();
            if name.starts_with("tap") && name.ends_with("_kata") {
                // Taps belong in the pod's namespace; one in the host's is a leak of some pod.
                found.push(format!("tap device {name} in the host network namespace"));
            }
        }
        // Cgroups: runtime-created ones are named after the ids (find_leaks); the pod cgroup
        // is the kubelet's and removed by remove_pod.
        for h in cgroup_hierarchies() {
            let p = h.join(pod.cgroup_parent.trim_start_matches('/'));
            if !pod.cgroup_parent.is_empty() && p.exists() {
                let procs = fs::read_to_string(p.join("cgroup.procs")).unwrap_or_default();
                found.push(format!(
                    "pod cgroup {} (processes: {:?})",
                    p.display(),
                    procs.split_whitespace().collect::<Vec<_>>()
                ));
            }
        }
        found
    }

    /// Removes the pod cgroup (the kubelet's job after `RemovePodSandbox`); fails if
    /// processes are still in it.
    fn remove_pod_cgroup(&self, pod: &Pod) -> Vec<String> {
        remove_cgroup_parent(&pod.cgroup_parent)
    }
}

/// Removes a pod cgroup (`cgroup_parent`) in every hierarchy, as the kubelet does once the pod
/// is gone; what could not be removed, with the processes still in it.
fn remove_cgroup_parent(parent: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if parent.is_empty() {
        return errors;
    }
    for h in cgroup_hierarchies() {
        let p = h.join(parent.trim_start_matches('/'));
        if p.is_dir() {
            if let Err(e) = remove_cgroup_tree(&p) {
                let procs = fs::read_to_string(p.join("cgroup.procs")).unwrap_or_default();
                errors.push(format!("pod cgroup {}: {e} (processes: {})", p.display(), procs.trim()));
            }
        }
    }
    errors
}

impl Cri {
    /// Asserts (polling up to [`leaks::GRACE`]) that nothing of a removed pod is left:
    /// processes (shim, QEMU, virtiofsd, ...), mounts, `/run/kata-containers` entries and
    /// cgroups naming the sandbox or a container id; the CRI's and containerd's records, task
    /// bundles, the shim socket; the network namespace, the host veth, the CNI result and
    /// lease, tap devices in the host namespace; and the pod cgroup, which it removes first.
    /// What was found is cleaned up before the test fails.
    pub fn assert_pod_gone(&self, pod: &Pod) {
        if let Err(e) = self.check_pod_gone(pod) {
            panic!("{e}");
        }
    }

    /// [`Self::assert_pod_gone`] returning the failure instead of panicking.
    pub fn check_pod_gone(&self, pod: &Pod) -> Result<(), String> {
        let found = self.pod_leaks(pod);
        self.fail_with_cleanup(pod, found)
    }

    /// What is left of a removed pod after up to [`leaks::GRACE`] (the pod cgroup removed
    /// first once nothing runs in it), without cleaning anything up.
    pub fn pod_leaks(&self, pod: &Pod) -> Vec<String> {
        let mut found = leaks::settle(leaks::GRACE, || {
            let mut f = self.pod_leftovers(pod);
            // Remove the kubelet's pod cgroup only once the runtime's processes are gone.
            if f.iter().all(|l| l.starts_with("pod cgroup")) {
                f = self.remove_pod_cgroup(pod);
                f.extend(self.pod_leftovers(pod));
            }
            f
        });
        found.dedup();
        found
    }

    /// Cleans up what [`Self::pod_leaks`] found and says what it was; `Ok` when nothing.
    pub fn fail_with_cleanup(&self, pod: &Pod, found: Vec<String>) -> Result<(), String> {
        if !found.is_empty() {
            let containers = self.containers_of(pod);
            let mut ids: Vec<&str> = vec![pod.id.as_str()];
            ids.extend(containers.iter().map(String::as_str));
            let mut cleaned = leaks::force_cleanup(&ids, None);
            if let Some(ns) = &pod.netns {
                cleaned.extend(remove_host_object("netns", &ns.display().to_string()));
            }
            cleaned.extend(self.remove_pod_cgroup(pod));
            return Err(format!(
                "left behind by pod {} ({}) after {:?}:\n  {}\ncleaned up:\n  {}\n{}",
                pod.id,
                pod.uid(),
                leaks::GRACE,
                found.join("\n  "),
                cleaned.join("\n  "),
                self.logs()
            ));
        }
        Ok(())
    }

    /// Removes every pod still there (via the CRI), the pod cgroups, network namespaces and the
    /// bridge; returns what had to be removed.
    fn cleanup(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        match self.rt.block_on(self.client.list_pod_sandbox()) {
            Ok(pods) => {
                for p in pods {
                    left.push(format!("pod {} ({:?}) was still there", p.id, p.metadata.map(|m| m.name)));
                    if let Err(e) = self.rt.block_on(self.client.stop_pod_sandbox(&p.id)) {
                        left.push(format!("StopPodSandbox {}: {e}", p.id));
                    }
                    if let Err(e) = self.rt.block_on(self.client.remove_pod_sandbox(&p.id)) {
                        left.push(format!("RemovePodSandbox {}: {e}", p.id));
                    }
                }
            }
            Err(e) => left.push(format!("ListPodSandbox: {e}")),
        }
        let recorded = fs::read_to_string(self.dir().join(LEFTOVERS_FILE)).unwrap_or_default();
        for l in recorded.lines() {
            if let Some((kind, value)) = l.split_once(' ') {
                let done = remove_host_object(kind, value);
                // The bridge and the cgroup root are expected; the rest are leaks.
                if let Some(done) = done.filter(|_| !matches!(kind, "bridge" | "cgroup")) {
                    left.push(done);
                }
            }
        }
        left
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        let left = self.cleanup();
        if !left.is_empty() {
            let msg = format!(
                "CRI {} {} had to clean up after the test:\n  {}",
                self.manager,
                self.dir().display(),
                left.join("\n  ")
            );
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pods started through the async client directly (benchmarks start several at once).

/// The host end of a pod's veth pair according to containerd's verbose sandbox information
/// (`cniResult.Interfaces`: the bridge, the host veth and the pod's `eth0`, which alone has a
/// `Sandbox`), else libcni's cached ADD result (`/var/lib/cni/results/<network>-<id>-eth0`).
/// Unlike comparing the bridge's ports before and after `RunPodSandbox`, this is right when
/// several pods start at once.
pub fn host_veth_of(net: &CniNetwork, sandbox_id: &str, info: &serde_json::Value) -> Option<String> {
    if let Some(ifaces) = info["cniResult"]["Interfaces"].as_object() {
        let found = ifaces.iter().find(|(name, cfg)| {
            *name != &net.bridge && *name != "eth0" && *name != "lo" && cfg["Sandbox"].as_str().unwrap_or("").is_empty()
        });
        if let Some((name, _)) = found {
            return Some(name.clone());
        }
    }
    let cached = Path::new(CNI_RESULTS_DIR).join(format!("{}-{sandbox_id}-eth0", net.name));
    let v: serde_json::Value = serde_json::from_slice(&fs::read(cached).ok()?).ok()?;
    v["result"]["interfaces"].as_array()?.iter().find_map(|i| {
        let name = i["name"].as_str()?;
        let in_pod = !i["sandbox"].as_str().unwrap_or("").is_empty();
        (!in_pod && name != net.bridge).then(|| name.to_string())
    })
}

impl Cri {
    /// Records sandbox `id`, started with `config` through [`Self::client`] directly (for
    /// example by several threads at once, or to time the bare CRI calls), the way
    /// [`Self::run_pod`] records its pods: tracked for teardown and leak checks, its network
    /// namespace recorded, and the pod IP from `PodSandboxStatus`. Unlike `run_pod` it returns
    /// errors instead of panicking, and finds the host veth with [`host_veth_of`], which does not
    /// race with other pods starting at the same time. The caller creates
    /// `config.log_directory` before `RunPodSandbox`, as `run_pod` does.
    pub fn adopt_pod(&self, id: &str, config: &proto::PodSandboxConfig) -> Result<Pod, String> {
        self.track_id(id);
        {
            let mut tracked = self.tracked.lock().unwrap();
            if !tracked.iter().any(|p| p.0 == id) {
                tracked.push((id.to_string(), Vec::new()));
            }
        }
        let st =
            self.block_on(self.client.pod_sandbox_status(id, true)).map_err(|e| format!("PodSandboxStatus: {e}"))?;
        let status = st.status.clone().unwrap_or_default();
        if status.state != proto::SANDBOX_READY {
            return Err(format!("sandbox {id} is not ready: {status:?}"));
        }
        let ip = status.network.as_ref().map(|n| n.ip.clone()).unwrap_or_default();
        if ip.is_empty() {
            return Err(format!("PodSandboxStatus of {id} has no pod IP: {st:?}"));
        }
        let info: serde_json::Value =
            st.info.get("info").and_then(|i| serde_json::from_str(i).ok()).unwrap_or(serde_json::Value::Null);
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["type"] == "network"))
            .and_then(|n| n["path"].as_str())
            .map(PathBuf::from);
        if let Some(p) = &netns {
            record_host_object(self.dir(), "netns", &p.display().to_string());
        }
        let host_veth = host_veth_of(&self.net, id, &info);
        let cgroup_parent = config.linux.as_ref().map(|l| l.cgroup_parent.clone()).unwrap_or_default();
        Ok(Pod { id: id.to_string(), config: config.clone(), ip, netns, host_veth, cgroup_parent, info })
    }

    /// Records container `id`, created in sandbox `pod_id` through [`Self::client`] directly,
    /// for teardown and leak checks (as [`Self::create_container`] does).
    pub fn adopt_container(&self, pod_id: &str, id: &str) {
        self.track_id(id);
        let mut tracked = self.tracked.lock().unwrap();
        match tracked.iter_mut().find(|p| p.0 == pod_id) {
            Some(p) if !p.1.iter().any(|c| c == id) => p.1.push(id.to_string()),
            Some(_) => {}
            None => tracked.push((pod_id.to_string(), vec![id.to_string()])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn cri_log_lines_are_parsed_and_partials_joined() {
        let text = "2026-11-23T03:00:00.000000001Z stdout P hel\n\
                    2026-11-23T03:00:00.000000002Z stderr F oops\n\
                    2026-11-23T03:00:00.000000003Z stdout F lo\n\
                    2026-11-23T03:00:00.000000004Z stdout F \n";
        let lines = parse_cri_log(text).unwrap();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].partial && lines[0].stream == "stdout" && lines[0].content == "hel");
        let dir = std::env::temp_dir().join(crate::unique_id("crilog"));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("0.log");
        fs::write(&p, text).unwrap();
        assert_eq!(cri_log_lines(&p, "stdout").unwrap(), vec!["hello".to_string(), String::new()]);
        assert_eq!(cri_log_lines(&p, "stderr").unwrap(), vec!["oops".to_string()]);
        fs::remove_dir_all(&dir).unwrap();
        assert!(parse_cri_log("garbage\n").is_err());
    }

    /// Field numbers of a few messages against bytes encoded by hand from api.proto.
    #[test]
    fn messages_use_the_api_proto_field_numbers() {
        let req = proto::ExecSyncRequest { container_id: "c".into(), cmd: vec!["sh".into()], timeout: 3 };
        assert_eq!(req.encode_to_vec(), vec![0x0a, 1, b'c', 0x12, 2, b's', b'h', 0x18, 3]);
        let dev = proto::Device { container_path: "a".into(), host_path: "b".into(), permissions: "r".into() };
        assert_eq!(dev.encode_to_vec(), vec![0x0a, 1, b'a', 0x12, 1, b'b', 0x1a, 1, b'r']);
        // ContainerStatus: reason = 10 (0x52), exit_code = 7 (0x38).
        let st = proto::ContainerStatus::decode(&[0x38, 137, 1, 0x52, 3, b'O', b'O', b'M'][..]).unwrap();
        assert_eq!((st.exit_code, st.reason.as_str()), (137, "OOM"));
        // ContainerConfig.linux = 15 (0x7a), resources = 1, memory_limit_in_bytes = 4.
        let cfg = proto::ContainerConfig {
            linux: Some(proto::LinuxContainerConfig {
                resources: Some(proto::LinuxContainerResources { memory_limit_in_bytes: 1, ..Default::default() }),
                security_context: None,
            }),
            ..Default::default()
        };
        assert_eq!(cfg.encode_to_vec(), vec![0x7a, 4, 0x0a, 2, 0x20, 1]);
    }

    #[test]
    fn containerd_config_has_the_cri_runtimes() {
        let net = CniNetwork {
            name: "n".into(),
            bridge: "b".into(),
            subnet: "10.213.1.0/24".into(),
            gateway: "10.213.1.1".into(),
            conf_dir: "/c".into(),
            ipam_dir: "/i".into(),
        };
        let text = cri_containerd_config(Path::new("/tmp/x"), &net, KATA_HANDLER);
        let v: toml::Table = text.parse().unwrap();
        let disabled = |v: &toml::Table| {
            v["disabled_plugins"].as_array().unwrap().iter().any(|p| p.as_str() == Some("io.containerd.grpc.v1.cri"))
        };
        assert!(!disabled(&v), "the CRI plugin is disabled in the CRI harness's configuration");
        let default: toml::Table = crate::containerd::default_containerd_config(Path::new("/tmp/x")).parse().unwrap();
        assert!(disabled(&default), "the CRI plugin is enabled in the plain private containerd");
        assert_eq!(default["grpc"]["address"].as_str(), v["grpc"]["address"].as_str());
        let cri = &v["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(cri["sandbox_image"].as_str(), Some(PAUSE_IMAGE));
        assert_eq!(cri["restrict_oom_score_adj"].as_bool(), Some(true));
        let kata = &cri["containerd"]["runtimes"]["kata"];
        assert_eq!(kata["runtime_type"].as_str(), Some("io.containerd.kata.v2"));
        assert_eq!(kata["options"]["ConfigPath"].as_str(), Some("/tmp/x/configuration.toml"));
        assert_eq!(cri["containerd"]["runtimes"]["runc"]["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
        let conf: serde_json::Value = serde_json::from_str(&cni_conflist(&net)).unwrap();
        assert_eq!(conf["plugins"][0]["type"], "bridge");
        assert_eq!(conf["plugins"][0]["ipMasq"], false);
        assert_eq!(conf["plugins"][1]["type"], "loopback");
    }
}
