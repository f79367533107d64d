//! How containerd and CRI-O start and clean up a shim: the command line, `start` (print the
//! pod's socket address, spawning the long-running daemon for the first container of a pod),
//! and `delete` (clean up after a shim that is gone, answer a `DeleteResponse`).
//!
//! Both managers read `start`'s stdout and stderr combined and dial the text as is, so nothing
//! but the address may be printed.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Where pod sockets live (as with the runc shim, independent of containerd's state dir).
pub const SOCKET_DIR: &str = "/run/containerd/s";

/// Environment variable carrying `runtimeoptions.v1.Options.config_path` from `start` to the
/// daemon (containerd passes the options on `start`'s stdin only).
pub const CONFIG_PATH_ENV: &str = "PODVISOR_CONFIG_PATH";

/// Annotations naming the pod a container belongs to (containerd CRI, CRI-O).
pub const SANDBOX_ID_ANNOTATIONS: &[&str] = &["io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID"];

/// The parsed command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    /// `-namespace`.
    pub namespace: String,
    /// `-address`: containerd's socket (empty from CRI-O).
    pub address: String,
    /// `-publish-binary`.
    pub publish_binary: String,
    /// `-id`: the task (container) id.
    pub id: String,
    /// `-bundle` (delete only; defaults to the working directory).
    pub bundle: Option<PathBuf>,
    /// `-debug`.
    pub debug: bool,
    /// The action word: `start`, `delete`, or `None` for the daemon.
    pub action: Option<String>,
}

/// Parses Go-`flag`-style arguments (`-name value`, `-name=value`, `--name value`).
pub fn parse_flags(args: &[String]) -> Result<Flags, String> {
    let mut f = Flags::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(name) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            if f.action.is_some() {
                return Err(format!("unexpected argument {arg:?} after {:?}", f.action.as_deref().unwrap_or("")));
            }
            f.action = Some(arg.clone());
            continue;
        };
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (name, None),
        };
        if name == "debug" {
            f.debug = inline.map(|v| v != "false").unwrap_or(true);
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None => it.next().cloned().ok_or_else(|| format!("flag -{name} needs a value"))?,
        };
        match name {
            "namespace" => f.namespace = value,
            "address" => f.address = value,
            "publish-binary" => f.publish_binary = value,
            "id" => f.id = value,
            "bundle" => f.bundle = Some(PathBuf::from(value)),
            // containerd 1.7+/2.x flags we accept and do not need.
            "socket" | "ttrpc-address" | "grpc-address" => {}
            other => return Err(format!("unknown flag -{other}")),
        }
    }
    Ok(f)
}

/// The pod a task belongs to: its sandbox id annotation, or the task itself.
pub fn group_of(id: &str, annotations: &serde_json::Map<String, serde_json::Value>) -> String {
    SANDBOX_ID_ANNOTATIONS
        .iter()
        .find_map(|k| annotations.get(*k).and_then(|v| v.as_str()).filter(|v| !v.is_empty()))
        .unwrap_or(id)
        .to_string()
}

/// Annotations of the bundle's `config.json` (empty when absent or unreadable).
pub fn bundle_annotations(bundle: &Path) -> serde_json::Map<String, serde_json::Value> {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("annotations").and_then(|a| a.as_object()).cloned())
        .unwrap_or_default()
}

/// The socket of a pod's shim: a hash of containerd's address, the namespace and the pod id,
/// so that two containerds or namespaces never share one.
pub fn socket_path(address: &str, namespace: &str, group: &str) -> PathBuf {
    let digest = Sha256::digest(format!("{address}/{namespace}/{group}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Path::new(SOCKET_DIR).join(hex)
}

/// Whether a shim answers on `path` (a connection is accepted).
pub fn is_serving(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Whether a live shim daemon answers a task `Connect` on `path` within two seconds. A
/// connection alone is not proof: right after a daemon is killed its socket can still accept
/// for a moment, and `delete` must not take a dying daemon for a live one.
pub fn daemon_answers(path: &Path) -> bool {
    if !is_serving(path) {
        return false;
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return false };
    let address = format!("unix://{}", path.display());
    rt.block_on(async {
        let call = async {
            let client = ttrpc::asynchronous::Client::connect(&address).await.ok()?;
            let client = containerd_shim_protos::shim_async::TaskClient::new(client);
            let ctx = ttrpc::context::with_timeout(2_000_000_000);
            // Any answer (even an error status) comes from a live daemon; a dead socket gives a
            // transport error.
            match client.connect(ctx, &containerd_shim_protos::api::ConnectRequest::new()).await {
                Ok(_) | Err(ttrpc::Error::RpcStatus(_)) => Some(()),
                Err(_) => None,
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(3), call).await.ok().flatten().is_some()
    })
}

/// `config_path` from a `runtimeoptions.v1.Options` wrapped in a protobuf `Any`, as containerd
/// sends on `start`'s stdin and in `CreateTaskRequest.options`.
pub fn config_path_from_options(any: &protobuf::well_known_types::any::Any) -> Option<String> {
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    // Options { string type_url = 1; string config_path = 2; }
    let mut input = protobuf::CodedInputStream::from_bytes(&any.value);
    while let Ok(Some(tag)) = input.read_raw_tag_or_eof() {
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            return input.read_string().ok().filter(|s| !s.is_empty());
        }
        if input.skip_field(protobuf::rt::WireType::new(wire)?).is_err() {
            return None;
        }
    }
    None
}

/// Reads runtime options from stdin when it is a pipe or file with data (containerd); CRI-O and
/// plain runs give `/dev/null`.
fn config_path_from_stdin() -> Option<String> {
    use protobuf::Message;
    let mut buf = Vec::new();
    std::io::stdin().take(1 << 20).read_to_end(&mut buf).ok()?;
    if buf.is_empty() {
        return None;
    }
    let any = protobuf::well_known_types::any::Any::parse_from_bytes(&buf).ok()?;
    config_path_from_options(&any)
}

/// `start`: returns the address to print. For the first container of a pod it binds the pod's
/// socket and spawns the daemon that serves it; later containers get the running daemon's
/// address. The address is also written to `<bundle>/address`.
pub fn start(flags: &Flags) -> Result<String, String> {
    let bundle = std::env::current_dir().map_err(|e| format!("cannot read the working directory (the bundle): {e}"))?;
    let group = group_of(&flags.id, &bundle_annotations(&bundle));
    let path = socket_path(&flags.address, &flags.namespace, &group);
    let address = format!("unix://{}", path.display());
    if daemon_answers(&path) {
        write_bundle_file(&bundle, "address", &address)?;
        return Ok(address);
    }
    if group != flags.id {
        return Err(format!(
            "container {} belongs to sandbox {group}, whose shim is not running (nothing answers on {address}); \
             create the sandbox first",
            flags.id
        ));
    }
    std::fs::create_dir_all(SOCKET_DIR).map_err(|e| format!("create {SOCKET_DIR}: {e}"))?;
    let _ = std::fs::remove_file(&path); // a stale socket of a dead shim
    let listener = UnixListener::bind(&path).map_err(|e| format!("listen on {}: {e}", path.display()))?;
    let listener: OwnedFd = listener.into();
    let config_path = config_path_from_stdin();
    let pid = spawn_daemon(flags, &bundle, listener, config_path.as_deref()).inspect_err(|_| {
        let _ = std::fs::remove_file(&path);
    })?;
    write_bundle_file(&bundle, "address", &address)?;
    write_bundle_file(&bundle, "shim.pid", &pid.to_string())?;
    Ok(address)
}

fn write_bundle_file(bundle: &Path, name: &str, text: &str) -> Result<(), String> {
    std::fs::write(bundle.join(name), text).map_err(|e| format!("write {}: {e}", bundle.join(name).display()))
}

/// Spawns `<this binary> -namespace .. -id .. -address .. [-debug]` in its own session with the
/// listening socket as fd 3, the bundle as working directory, and no stdio.
fn spawn_daemon(flags: &Flags, bundle: &Path, listener: OwnedFd, config_path: Option<&str>) -> Result<u32, String> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the shim binary: {e}"))?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["-namespace", &flags.namespace, "-id", &flags.id, "-address", &flags.address]);
    if !flags.publish_binary.is_empty() {
        cmd.args(["-publish-binary", &flags.publish_binary]);
    }
    if flags.debug {
        cmd.arg("-debug");
    }
    if let Some(p) = config_path {
        cmd.env(CONFIG_PATH_ENV, p);
    }
    cmd.current_dir(bundle)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let fd = listener.as_raw_fd();
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if fd == 3 {
                // Clear close-on-exec on the fd as it is.
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("cannot start the shim daemon {}: {e}", exe.display()))?;
    Ok(child.id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn containerd_start_line() {
        let f = parse_flags(&args(&[
            "-namespace",
            "default",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "c1",
            "-debug",
            "start",
        ]))
        .unwrap();
        assert_eq!(f.namespace, "default");
        assert_eq!(f.address, "/run/containerd/containerd.sock");
        assert_eq!(f.id, "c1");
        assert!(f.debug);
        assert_eq!(f.action.as_deref(), Some("start"));
    }

    #[test]
    fn crio_start_line_with_empty_address() {
        let f = parse_flags(&args(&[
            "-namespace",
            "default",
            "-address",
            "",
            "-publish-binary",
            "/usr/bin/crio",
            "-id",
            "abc",
            "start",
        ]))
        .unwrap();
        assert_eq!(f.address, "");
        assert_eq!(f.action.as_deref(), Some("start"));
    }

    #[test]
    fn delete_line_and_daemon_line() {
        let f = parse_flags(&args(&["-namespace", "k8s.io", "-id", "c2", "-bundle=/b", "delete"])).unwrap();
        assert_eq!(f.bundle.as_deref(), Some(Path::new("/b")));
        assert_eq!(f.action.as_deref(), Some("delete"));
        let f = parse_flags(&args(&["-namespace", "k8s.io", "-id", "c2", "-address", "/s"])).unwrap();
        assert_eq!(f.action, None);
        assert!(parse_flags(&args(&["-bogus", "1"])).unwrap_err().contains("-bogus"));
        assert!(parse_flags(&args(&["-id"])).unwrap_err().contains("needs a value"));
    }

    #[test]
    fn pods_group_by_sandbox_annotation() {
        let mut a = serde_json::Map::new();
        assert_eq!(group_of("c1", &a), "c1");
        a.insert("io.kubernetes.cri-o.SandboxID".into(), "pod1".into());
        assert_eq!(group_of("c1", &a), "pod1");
        a.insert("io.kubernetes.cri.sandbox-id".into(), "pod2".into());
        assert_eq!(group_of("c1", &a), "pod2");
        let p = socket_path("/run/containerd/containerd.sock", "default", "pod2");
        assert!(p.starts_with(SOCKET_DIR) && p.as_os_str().len() < 107);
        assert_ne!(p, socket_path("", "default", "pod2"));
    }

    #[test]
    fn runtime_options_config_path() {
        // runtimeoptions.v1.Options { type_url = 1: "x", config_path = 2: "/etc/k.toml" }
        let mut value = vec![0x0a, 1, b'x', 0x12, 11];
        value.extend_from_slice(b"/etc/k.toml");
        let any = protobuf::well_known_types::any::Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert_eq!(config_path_from_options(&any).as_deref(), Some("/etc/k.toml"));
        let other = protobuf::well_known_types::any::Any { type_url: "x.Other".into(), ..Default::default() };
        assert_eq!(config_path_from_options(&other), None);
    }
}
