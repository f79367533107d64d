//! A private OCI registry for the peer pod tests ([`TestRegistry`]): Debian's
//! `docker-registry` (distribution 2.8) with its storage in `/tmp/podvisor-registry-<pid>-<n>/`,
//! listening on `0.0.0.0:<free port>` over plain HTTP, so that a podvm reaches it through the
//! worker's bridge address (`172.31.250.1:<port>`, [`TestRegistry::podvm_reference`]) and the
//! worker itself through any of its addresses. [`TestRegistry::push_busybox`] copies the busybox
//! test image ([`crate::image`]) into it with `skopeo`. Dropping it kills the registry and
//! removes its directory.
//!
//! A missing `docker-registry` or `skopeo` is a failure naming the Debian package
//! (`scripts/deps.sh` installs both).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::leaks;

/// Debian's `docker-registry` binary.
pub const DOCKER_REGISTRY: &str = "/usr/bin/docker-registry";
/// Debian's `skopeo` binary.
pub const SKOPEO: &str = "/usr/bin/skopeo";
/// The prefix of every private registry directory.
pub const DIR_PREFIX: &str = "/tmp/podvisor-registry-";
/// The worker's address on the podvm bridge (`QEMU_BRIDGE_CIDR`'s default `172.31.250.1/24`):
/// where podvms reach the registry.
pub const BRIDGE_ADDRESS: &str = "172.31.250.1";
/// The repository and tag the busybox test image is pushed as.
pub const BUSYBOX_PATH: &str = "podvisor/busybox:test";

/// The user of a registry started with [`TestRegistry::try_start_with_auth`].
pub const AUTH_USER: &str = "podvisor";
/// Its password.
pub const AUTH_PASSWORD: &str = "s3cret";
/// htpasswd line of [`AUTH_USER`] with [`AUTH_PASSWORD`] (bcrypt, as distribution requires).
const HTPASSWD: &str = "podvisor:$2b$12$93MbcGCggH6HlybLQCGKtODyGKGtB5UuJ/3L7jWxIUKMCE3CwYr5q\n";

/// A running private registry (see the module documentation).
pub struct TestRegistry {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    /// Basic auth ([`AUTH_USER`], [`AUTH_PASSWORD`]) is required.
    auth: bool,
}

/// The registry configuration: filesystem storage under `dir`, plain HTTP on `0.0.0.0:port`,
/// deletes allowed; basic auth from `htpasswd` when given.
pub fn registry_config(dir: &Path, port: u16, htpasswd: Option<&Path>) -> String {
    let auth = htpasswd
        .map(|p| format!("auth:\n  htpasswd:\n    realm: podvisor-test\n    path: {}\n", p.display()))
        .unwrap_or_default();
    auth + &format!(
        r#"# Private registry of podvisor-tests (registry.rs).
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {}
  delete:
    enabled: true
http:
  addr: 0.0.0.0:{port}
"#,
        dir.join("data").display()
    )
}

/// A TCP port that was free a moment ago on every address.
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("0.0.0.0:0").map_err(|e| format!("binding a free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

/// Fails naming the package when a binary is missing.
fn require(path: &str, package: &str) -> Result<(), String> {
    if Path::new(path).is_file() {
        Ok(())
    } else {
        Err(format!("{path} is missing: install Debian's {package} (scripts/deps.sh does)"))
    }
}

impl TestRegistry {
    /// Starts one (panics with the reason, naming a missing package).
    pub fn start() -> Self {
        Self::try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts one and waits until `GET /v2/` answers 200.
    pub fn try_start() -> Result<Self, String> {
        Self::try_start_inner(false)
    }

    /// Starts one that requires basic auth ([`AUTH_USER`], [`AUTH_PASSWORD`]) for every request.
    pub fn try_start_with_auth() -> Result<Self, String> {
        Self::try_start_inner(true)
    }

    /// `{"auths": {...}}` for this registry as podvms name it (a containers auth.json).
    pub fn auth_json(&self) -> String {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{AUTH_USER}:{AUTH_PASSWORD}"));
        serde_json::json!({ "auths": { self.podvm_host(): { "auth": token } } }).to_string()
    }

    fn try_start_inner(auth: bool) -> Result<Self, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        require(DOCKER_REGISTRY, "docker-registry")?;
        leaks::reap_stale_dirs(DIR_PREFIX, |p| p.argv0.ends_with("docker-registry"));
        let dir = PathBuf::from(format!("{DIR_PREFIX}{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data")).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut me = TestRegistry { dir, port: 0, child: None, auth };
        let htpasswd = me.dir.join("htpasswd");
        if auth {
            fs::write(&htpasswd, HTPASSWD).map_err(|e| format!("{}: {e}", htpasswd.display()))?;
        }
        // The port is free when chosen; another process may take it before the registry binds
        // it: then the registry exits and another port is tried.
        let mut last = String::new();
        for _ in 0..5 {
            me.port = free_port()?;
            let config = me.dir.join("config.yml");
            fs::write(&config, registry_config(&me.dir, me.port, auth.then_some(htpasswd.as_path()))).map_err(|e| format!("{}: {e}", config.display()))?;
            let mut child = me.spawn(&config)?;
            match me.wait_ready(&mut child) {
                Ok(()) => {
                    me.child = Some(child);
                    return Ok(me);
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn spawn(&self, config: &Path) -> Result<Child, String> {
        let log = self.log_file();
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(DOCKER_REGISTRY);
        cmd.arg("serve")
            .arg(config)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; the registry goes when the thread that started it
        // does (a crashed test).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.spawn().map_err(|e| format!("{DOCKER_REGISTRY}: {e}: install Debian's docker-registry (scripts/deps.sh)"))
    }

    fn wait_ready(&self, child: &mut Child) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.get("/v2/", &[]) {
                Ok((200, _, _)) => return Ok(()),
                Ok((401, _, _)) if self.auth => return Ok(()),
                _ => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("docker-registry exited during startup ({status}):\n{}", self.logs_tail(20)));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "docker-registry did not answer GET /v2/ on port {} within 30 s:\n{}",
                    self.port,
                    self.logs_tail(20)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port it listens on (every address).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its private directory (configuration, storage, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The registry's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Its log file.
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("registry.log")
    }

    /// The last `n` lines of its log.
    pub fn logs_tail(&self, n: usize) -> String {
        crate::containerd::log_tail(&self.log_file(), n)
    }

    /// `127.0.0.1:<port>`, the address the worker pushes to.
    pub fn local_host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `172.31.250.1:<port>`: the registry as podvms (and, for the peer pod tests, the worker's
    /// container managers) name it.
    pub fn podvm_host(&self) -> String {
        format!("{BRIDGE_ADDRESS}:{}", self.port)
    }

    /// The busybox test image as podvms pull it: `172.31.250.1:<port>/podvisor/busybox:test`.
    pub fn podvm_reference(&self) -> String {
        format!("{}/{BUSYBOX_PATH}", self.podvm_host())
    }

    /// Pushes the busybox test image as `podvisor/busybox:test`:
    /// `skopeo copy --dest-tls-verify=false oci-archive:<archive> docker://127.0.0.1:<port>/...`.
    pub fn push_busybox(&self) -> Result<(), String> {
        self.push_archive(&crate::image::busybox().archive, BUSYBOX_PATH)
    }

    /// Pushes an OCI archive as `<repository>:<tag>`.
    pub fn push_archive(&self, archive: &Path, repository_tag: &str) -> Result<(), String> {
        require(SKOPEO, "skopeo")?;
        let dest = format!("docker://{}/{repository_tag}", self.local_host());
        let mut cmd = Command::new(SKOPEO);
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if self.auth {
            cmd.arg(format!("--dest-creds={AUTH_USER}:{AUTH_PASSWORD}"));
        }
        cmd
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(&dest)
            .stdin(Stdio::null());
        let out = crate::containerd::run_with_timeout(&mut cmd, None, Duration::from_secs(120))?;
        if !out.status.success() {
            return Err(format!(
                "skopeo copy {} -> {dest} failed ({}): {}\n{}",
                archive.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.logs_tail(10)
            ));
        }
        Ok(())
    }

    /// `GET http://127.0.0.1:<port><path>` with extra headers: (status, headers as
    /// `name: value` lines lower-cased names, body).
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<(u16, Vec<(String, String)>, Vec<u8>), String> {
        let url = format!("http://{}{path}", self.local_host());
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut req = agent.get(&url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut resp = req.call().map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status().as_u16();
        let hdrs = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_ascii_lowercase(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = resp.body_mut().read_to_vec().map_err(|e| format!("GET {url}: body: {e}"))?;
        Ok((status, hdrs, body))
    }

    /// The manifest of `<repository>:<tag>` as the registry serves it (OCI or Docker schema 2
    /// accepted): its digest (`Docker-Content-Digest`) and JSON.
    pub fn manifest(&self, repository: &str, tag: &str) -> Result<(String, serde_json::Value), String> {
        let accept = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
        let (status, headers, body) = self.get(&format!("/v2/{repository}/manifests/{tag}"), &[("Accept", accept)])?;
        if status != 200 {
            return Err(format!("GET manifest {repository}:{tag}: HTTP {status}: {}", String::from_utf8_lossy(&body)));
        }
        let digest = headers
            .iter()
            .find(|(k, _)| k == "docker-content-digest")
            .map(|(_, v)| v.clone())
            .ok_or("the manifest answer has no Docker-Content-Digest")?;
        let json = serde_json::from_slice(&body).map_err(|e| format!("manifest {repository}:{tag}: {e}"))?;
        Ok((digest, json))
    }

    /// How many blob and manifest GETs the registry's access log shows for `repository`
    /// (`GET /v2/<repository>/blobs/...` lines): proves that a pull happened.
    pub fn blob_fetches(&self, repository: &str) -> usize {
        let needle = format!("\"GET /v2/{repository}/blobs/");
        fs::read_to_string(self.log_file()).unwrap_or_default().lines().filter(|l| l.contains(&needle)).count()
    }

    /// How many blob GETs of `repository` came from `client` (the access log's first field is
    /// the client address): proves who pulled.
    pub fn blob_fetches_from(&self, repository: &str, client: &str) -> usize {
        let needle = format!("\"GET /v2/{repository}/blobs/");
        let prefix = format!("{client} ");
        fs::read_to_string(self.log_file())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&prefix) && l.contains(&needle))
            .count()
    }

    /// Kills the registry (SIGKILL: it has nothing to flush) and removes its directory; returns
    /// what went wrong.
    pub fn stop(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(mut child) = self.child.take() {
            if let Ok(Some(status)) = child.try_wait() {
                problems.push(format!("docker-registry had exited by itself ({status}):\n{}", self.logs_tail(20)));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = leaks::remove_tree(&self.dir) {
            if self.dir.exists() {
                problems.push(format!("removing {}: {e}", self.dir.display()));
            }
        }
        problems
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let problems = self.stop();
        if !problems.is_empty() && !std::thread::panicking() {
            panic!("private registry: {}", problems.join("\n"));
        }
    }
}
