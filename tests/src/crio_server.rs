//! A private CRI-O for end-to-end tests ([`TestCrio`]): the CRI-O 1.36 binaries of
//! `../shared/tools/cri-o/` (or `$PODVISOR_CRIO_DIR`), run with everything under one directory
//! `/tmp/podvisor-crio-<pid>-<n>/` (storage root and runroot, socket, pinned namespaces, exit
//! files, the CNI configuration), the project's `configs/crio-50-kata.conf` as its drop-in with
//! only the paths changed for the test (shim binary, configuration, runtime root), and the test
//! images copied into its storage with `skopeo` before it starts (CRI-O has no image import).
//!
//! CRI-O's default runtime must be valid at start-up even when only `kata` is used: Debian's
//! `runc`, through a wrapper that clamps the infra container's `process.oomScoreAdj` (CRI-O
//! hard-codes -998, which needs CAP_SYS_RESOURCE this machine does not have).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::leaks;

/// The prefix of every private CRI-O directory.
pub const DIR_PREFIX: &str = "/tmp/podvisor-crio-";

/// The environment variable naming the directory with `crio`, `pinns` and `crictl`.
pub const CRIO_DIR_ENV: &str = "PODVISOR_CRIO_DIR";

/// conmon (Debian `conmon`): CRI-O refuses to start without it, though VM runtimes never use it.
pub const CONMON: &str = "/usr/bin/conmon";

/// Debian's runc, CRI-O's default runtime here.
pub const RUNC: &str = "/usr/bin/runc";

/// skopeo (Debian `skopeo`) copies the test images into CRI-O's storage.
pub const SKOPEO: &str = "/usr/bin/skopeo";

/// The directory holding CRI-O 1.36 (`crio`, `pinns`, `crictl`): `$PODVISOR_CRIO_DIR`, else
/// `<workspace>/../shared/tools/cri-o`. `Err` says what is missing, in one line.
pub fn tools_dir() -> Result<PathBuf, String> {
    let (dir, how) = match std::env::var_os(CRIO_DIR_ENV).filter(|v| !v.is_empty()) {
        Some(d) => (PathBuf::from(d), format!("${CRIO_DIR_ENV}")),
        None => (crate::workspace().join("../shared/tools/cri-o"), "the workspace's ../shared/tools/cri-o".to_string()),
    };
    for bin in ["crio", "pinns", "crictl"] {
        if !dir.join(bin).is_file() {
            return Err(format!(
                "CRI-O is not available: {}/{bin} ({how}) is missing; set {CRIO_DIR_ENV} to a directory with CRI-O \
                 1.36's crio, pinns and crictl",
                dir.display()
            ));
        }
    }
    Ok(dir.canonicalize().unwrap_or(dir))
}

/// An image to copy into CRI-O's storage: an OCI archive and the reference to store it under.
#[derive(Debug, Clone)]
pub struct ArchiveImage {
    /// The OCI archive (`oci-layout`, `index.json`, `blobs/`).
    pub archive: PathBuf,
    /// The name CRI-O lists it under (`podvisor.local/pause:test`).
    pub reference: String,
}

/// What a private CRI-O is started with.
pub struct CrioSetup<'a> {
    /// The shim's `configuration.toml` text.
    pub kata_config: &'a str,
    /// The shim binary (the `kata` handler's `runtime_path`).
    pub shim: &'a Path,
    /// Images to copy into the storage before CRI-O starts.
    pub images: &'a [ArchiveImage],
    /// The pause image (`[crio.image] pause_image`).
    pub pause_image: &'a str,
    /// Writes the CNI configuration into the given directory (`[crio.network] network_dir`)
    /// once the private directory exists.
    pub write_cni: &'a dyn Fn(&Path) -> Result<(), String>,
    /// A further drop-in (`conf.d/60-extras.conf`; empty: none), e.g. the peer pod tests'
    /// `kata-remote` handler.
    pub extra_drop_in: &'a str,
    /// Appended to `registries.conf` (e.g. an insecure `[[registry]]`).
    pub registries: &'a str,
}

/// A private CRI-O (see the module documentation).
pub struct TestCrio {
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    kata_config: PathBuf,
    tools: PathBuf,
    child: Option<Child>,
    startup: Duration,
    images: Duration,
    ids: std::sync::Mutex<Vec<String>>,
    done: bool,
}

/// The CRI-O main configuration for a private instance in `dir` (see the module documentation
/// and `../shared/tools/cri-o/README.md`).
pub fn crio_config(dir: &Path, tools: &Path, pause_image: &str) -> String {
    let d = dir.display();
    let t = tools.display();
    format!(
        r#"# Private CRI-O of podvisor-tests (crio_server.rs).
[crio]
root = "{d}/root"
runroot = "{d}/runroot"
log_dir = "{d}/logs"
version_file = "{d}/version"
version_file_persist = "{d}/version-persist"
clean_shutdown_file = "{d}/clean.shutdown"
storage_driver = "overlay"

[crio.api]
listen = "{d}/crio.sock"
stream_address = "127.0.0.1"
stream_port = "0"

[crio.runtime]
default_runtime = "runc"
pinns_path = "{t}/pinns"
namespaces_dir = "{d}/ns"
container_exits_dir = "{d}/exits"
container_attach_socket_dir = "{d}/attach"
cgroup_manager = "cgroupfs"
conmon_cgroup = "pod"
conmon = "{CONMON}"
log_level = "debug"

[crio.runtime.runtimes.runc]
runtime_path = "{d}/runc-wrapper"
runtime_type = "oci"
runtime_root = "{d}/runc"

[crio.image]
pause_image = "{pause_image}"
# The test pause image runs its own entrypoint (busybox sh), not /pause.
pause_command = ""
signature_policy = "{d}/policy.json"

[crio.network]
network_dir = "{d}/cni"
plugin_dirs = ["/usr/lib/cni"]

[crio.metrics]
enable_metrics = false

[crio.nri]
enable_nri = false
"#
    )
}

/// The project's `configs/crio-50-kata.conf` with the `kata` handler's `runtime_path`,
/// `runtime_config_path` and `runtime_root` pointed at the test's shim, configuration and
/// directory; every other key stays as shipped (a drop-in that only overrode the paths would
/// reset the handler's other keys: CRI-O replaces a runtime table as a whole).
pub fn kata_drop_in(shipped: &str, shim: &Path, kata_config: &Path, runtime_root: &Path) -> Result<String, String> {
    let mut t: toml::Table = shipped.parse().map_err(|e| format!("configs/crio-50-kata.conf: {e}"))?;
    let kata = t
        .get_mut("crio")
        .and_then(|v| v.get_mut("runtime"))
        .and_then(|v| v.get_mut("runtimes"))
        .and_then(|v| v.get_mut("kata"))
        .and_then(|v| v.as_table_mut())
        .ok_or("configs/crio-50-kata.conf has no [crio.runtime.runtimes.kata]")?;
    kata.insert("runtime_path".into(), shim.display().to_string().into());
    kata.insert("runtime_config_path".into(), kata_config.display().to_string().into());
    kata.insert("runtime_root".into(), runtime_root.display().to_string().into());
    Ok(format!(
        "# configs/crio-50-kata.conf with the test's paths (podvisor-tests crio_server.rs)\n{}",
        toml::to_string(&t).map_err(|e| e.to_string())?
    ))
}

/// The runc wrapper: clamps a negative `process.oomScoreAdj` in the bundle's `config.json` to 0
/// before `runc create` (no CAP_SYS_RESOURCE here), then runs runc.
const RUNC_WRAPPER: &str = r#"#!/bin/sh
# podvisor-tests: CRI-O gives infra containers oomScoreAdj -998, which needs CAP_SYS_RESOURCE.
prev=""
for a in "$@"; do
  if [ "$prev" = "--bundle" ] || [ "$prev" = "-b" ]; then
    sed -i -E 's/"oomScoreAdj": *-[0-9]+/"oomScoreAdj":0/' "$a/config.json"
  fi
  prev=$a
done
exec /usr/bin/runc "$@"
"#;

impl TestCrio {
    /// Starts one (see the module documentation); the error says what failed, with CRI-O's log.
    pub fn try_start(setup: &CrioSetup) -> Result<TestCrio, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let tools = tools_dir()?;
        for (p, pkg) in [(CONMON, "conmon"), (RUNC, "runc"), (SKOPEO, "skopeo")] {
            if !Path::new(p).exists() {
                return Err(format!("{p} is missing: install Debian's {pkg} (scripts/deps.sh does)"));
            }
        }
        leaks::reap_stale_dirs(DIR_PREFIX, |p| p.argv0.ends_with("/crio"));
        let dir = PathBuf::from(format!("{DIR_PREFIX}{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = fs::remove_dir_all(&dir);
        let mut me = TestCrio {
            socket: dir.join("crio.sock"),
            log: dir.join("crio.log"),
            kata_config: dir.join("configuration.toml"),
            tools: tools.clone(),
            dir,
            child: None,
            startup: Duration::ZERO,
            images: Duration::ZERO,
            ids: Default::default(),
            done: false,
        };
        let d = me.dir.clone();
        let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
        for sub in ["root", "runroot", "logs", "ns", "exits", "attach", "cni", "conf.d", "vc", "runc"] {
            fs::create_dir_all(d.join(sub)).map_err(|e| io(&d.join(sub), e))?;
        }
        let write = |p: PathBuf, text: &str| fs::write(&p, text).map_err(|e| io(&p, e));
        write(me.kata_config.clone(), setup.kata_config)?;
        write(d.join("crio.conf"), &crio_config(&d, &tools, setup.pause_image))?;
        let shipped_path = crate::workspace().join("configs/crio-50-kata.conf");
        let shipped = fs::read_to_string(&shipped_path).map_err(|e| io(&shipped_path, e))?;
        write(d.join("conf.d/50-kata.conf"), &kata_drop_in(&shipped, setup.shim, &me.kata_config, &d.join("vc"))?)?;
        write(d.join("policy.json"), r#"{"default":[{"type":"insecureAcceptAnything"}]}"#)?;
        if !setup.extra_drop_in.is_empty() {
            write(d.join("conf.d/60-extras.conf"), setup.extra_drop_in)?;
        }
        write(d.join("registries.conf"), &format!("unqualified-search-registries = []\n{}", setup.registries))?;
        write(d.join("runc-wrapper"), RUNC_WRAPPER)?;
        fs::set_permissions(d.join("runc-wrapper"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| io(&d.join("runc-wrapper"), e))?;
        (setup.write_cni)(&d.join("cni"))?;
        let t = Instant::now();
        for image in setup.images {
            me.copy_image(image)?;
        }
        me.images = t.elapsed();

        let started = Instant::now();
        me.child = Some(me.spawn()?);
        let (child, socket) = (me.child.as_mut().unwrap(), me.socket.clone());
        let log_file = me.log.clone();
        let logs = || crate::containerd::log_tail(&log_file, 30);
        crate::wait_for_socket(child, &socket, "CRI-O", Duration::from_secs(60), logs)?;
        me.startup = started.elapsed();
        Ok(me)
    }

    /// Restarts CRI-O on the same root, runroot, socket and configuration while shims and their
    /// VMs run on: only the crio process gets the signal, as in a node's `systemctl restart
    /// crio` that leaves the pods running (the shims are in their own sessions and cgroups).
    /// `signal` is SIGTERM for a clean restart or SIGKILL for a crash; a CRI-O that ignores
    /// SIGTERM for 10 s is killed and that is an error. Returns how long the new one took to
    /// listen.
    pub fn restart(&mut self, signal: nix::sys::signal::Signal) -> Result<Duration, String> {
        let mut child = self.child.take().ok_or("CRI-O is not running")?;
        if !matches!(child.try_wait(), Ok(None)) {
            return Err(format!("CRI-O had exited before the restart:\n{}", self.logs_tail(30)));
        }
        let error = crate::signal_daemon(&mut child, "CRI-O", signal, || self.logs_tail(30)).into_iter().next();
        // The old socket file stays until the new CRI-O replaces it: connecting to it fails.
        let started = Instant::now();
        self.child = Some(self.spawn()?);
        let (child, socket) = (self.child.as_mut().unwrap(), self.socket.clone());
        let log_file = self.log.clone();
        let logs = || crate::containerd::log_tail(&log_file, 30);
        crate::wait_for_socket(child, &socket, "CRI-O", Duration::from_secs(60), logs)?;
        match error {
            Some(e) => Err(e),
            None => Ok(started.elapsed()),
        }
    }

    /// How long copying the images into the storage took.
    pub fn images_time(&self) -> Duration {
        self.images
    }

    /// Spawns `crio` on this directory's configuration, its output appended to the log, in its
    /// own process group, sent SIGTERM when the thread that started it dies.
    fn spawn(&self) -> Result<Child, String> {
        let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log).map_err(|e| io(&self.log, e))?;
        let log2 = log.try_clone().map_err(|e| io(&self.log, e))?;
        let mut path = std::env::var("PATH").unwrap_or_default();
        for p in ["/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
            if !path.split(':').any(|x| x == p) {
                path = format!("{p}:{path}");
            }
        }
        let crio = self.tools.join("crio");
        let mut cmd = Command::new(&crio);
        cmd.arg("--config")
            .arg(self.dir.join("crio.conf"))
            .arg("--config-dir")
            .arg(self.dir.join("conf.d"))
            .arg("--registries-conf")
            .arg(self.dir.join("registries.conf"))
            .current_dir(&self.dir)
            .env("PATH", path)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("KATA_CONF_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0);
        // SAFETY: prctl is async-signal-safe. CRI-O goes when the thread that started it does
        // (a crashed test); the harness itself always stops it first.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        cmd.spawn().map_err(|e| format!("{}: {e}", crio.display()))
    }

    /// `skopeo copy oci-archive:<archive> containers-storage:[overlay@<root>+<runroot>]<ref>`.
    fn copy_image(&self, image: &ArchiveImage) -> Result<(), String> {
        let dest = format!(
            "containers-storage:[overlay@{}+{}]{}",
            self.dir.join("root").display(),
            self.dir.join("runroot").display(),
            image.reference
        );
        let out = Command::new(SKOPEO)
            .args(["copy", "--quiet"])
            .arg(format!("oci-archive:{}", image.archive.display()))
            .arg(&dest)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{SKOPEO}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "skopeo copy {} -> {dest} failed ({}): {}",
                image.archive.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Its private directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its CRI socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The shim configuration the `kata` handler's `runtime_config_path` names.
    pub fn kata_config(&self) -> &Path {
        &self.kata_config
    }

    /// CRI-O's pid (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// From spawning CRI-O to its socket accepting connections.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The directory with `crio`, `pinns` and `crictl`.
    pub fn tools(&self) -> &Path {
        &self.tools
    }

    /// CRI-O's log (the shim's log FIFO is copied into it too).
    pub fn log_file(&self) -> &Path {
        &self.log
    }

    /// The bundle CRI-O makes for container or sandbox `id` (`config.json`, `address`, `log`).
    pub fn bundle(&self, id: &str) -> PathBuf {
        self.dir.join("runroot/overlay-containers").join(id).join("userdata")
    }

    /// Where CRI-O's bundles live (one directory per container id).
    pub fn bundles_dir(&self) -> PathBuf {
        self.dir.join("runroot/overlay-containers")
    }

    /// Makes teardown clean up after `id` too (processes, mounts, run directories naming it).
    pub fn track_id(&self, id: &str) {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if !ids.iter().any(|i| i == id) {
            ids.push(id.to_string());
        }
    }

    /// The last `n` lines of CRI-O's log, preceded by its last warnings and errors.
    pub fn logs_tail(&self, n: usize) -> String {
        crate::containerd::log_tail(&self.log, n)
    }

    /// What is left of container or sandbox `id` in CRI-O's own state: its bundle and storage
    /// directory, exit file, attach socket directory, and the shim socket.
    pub fn leftovers_of(&self, id: &str) -> Vec<String> {
        let mut found = Vec::new();
        for p in [
            self.bundle(id).parent().unwrap().to_path_buf(),
            self.dir.join("root/overlay-containers").join(id),
            self.dir.join("exits").join(id),
            self.dir.join("attach").join(id),
        ] {
            if p.exists() {
                found.push(format!("CRI-O state {}", p.display()));
            }
        }
        let sock = leaks::shim_socket("", "default", id);
        if sock.exists() {
            found.push(format!("shim socket {}", sock.display()));
        }
        found
    }

    /// Namespaces CRI-O pinned (`<dir>/ns/<kind>ns/<uuid>`) that are still there.
    pub fn pinned_namespaces(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for kind in fs::read_dir(self.dir.join("ns")).into_iter().flatten().flatten() {
            out.extend(fs::read_dir(kind.path()).into_iter().flatten().flatten().map(|e| e.path()));
        }
        out
    }

    /// Stops CRI-O, then removes what its tracked ids left (processes, mounts), unmounts what is
    /// left under its directory and removes it; returns what had to be cleaned up by force.
    pub fn stop(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        if self.done {
            return left;
        }
        self.done = true;
        if let Some(mut child) = self.child.take() {
            left.extend(crate::stop_daemon(&mut child, "CRI-O", || self.logs_tail(30)));
        }
        let ids = self.ids.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let remaining = leaks::settle(Duration::from_secs(2), || leaks::find_leaks(&ids, Some(&self.dir)));
        if !remaining.is_empty() {
            left.extend(remaining);
            left.extend(leaks::force_cleanup(&ids, Some(&self.dir)));
        }
        for id in &ids {
            let sock = leaks::shim_socket("", "default", id);
            if sock.exists() {
                let r = fs::remove_file(&sock);
                left.push(format!("removed shim socket {} ({r:?})", sock.display()));
            }
        }
        // containers/storage keeps its overlay directory bind-mounted on itself: expected.
        for m in leaks::unmount_under(&self.dir) {
            if !m.contains("root/overlay ") && !m.ends_with("root/overlay") {
                left.push(format!("mount under {}: {m}", self.dir.display()));
            }
        }
        if let Err(e) = leaks::remove_tree(&self.dir) {
            if self.dir.exists() {
                left.push(format!("could not remove {}: {e}", self.dir.display()));
            }
        }
        left
    }
}

impl Drop for TestCrio {
    fn drop(&mut self) {
        let left = self.stop();
        if !left.is_empty() {
            let msg = format!(
                "private CRI-O {} had to clean up after the test:\n  {}",
                self.dir.display(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_in_keeps_the_shipped_keys_and_changes_the_paths() {
        let shipped = fs::read_to_string(crate::workspace().join("configs/crio-50-kata.conf")).unwrap();
        let text = kata_drop_in(&shipped, Path::new("/s/shim"), Path::new("/c/config.toml"), Path::new("/r")).unwrap();
        let t: toml::Table = text.parse().unwrap();
        let kata = &t["crio"]["runtime"]["runtimes"]["kata"];
        assert_eq!(kata["runtime_type"].as_str(), Some("vm"));
        assert_eq!(kata["privileged_without_host_devices"].as_bool(), Some(true));
        assert_eq!(kata["runtime_path"].as_str(), Some("/s/shim"));
        assert_eq!(kata["runtime_config_path"].as_str(), Some("/c/config.toml"));
        assert_eq!(kata["runtime_root"].as_str(), Some("/r"));
        let main: toml::Table = crio_config(Path::new("/d"), Path::new("/t"), "p:1").parse().unwrap();
        assert_eq!(main["crio"]["api"]["listen"].as_str(), Some("/d/crio.sock"));
        assert_eq!(main["crio"]["runtime"]["pinns_path"].as_str(), Some("/t/pinns"));
    }
}
