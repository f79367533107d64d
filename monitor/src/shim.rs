//! The running podvisor shims and their monitor sockets: `<sandboxes dir>/<sandbox id>/
//! shim-monitor.sock` (Kata's path, `/run/vc/sbs`), HTTP/1.1 on a unix socket, and one bounded
//! GET on it.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;

/// The shims' sandbox directories (Kata's `/run/vc/sbs`).
pub const DEFAULT_SANDBOXES_DIR: &str = "/run/vc/sbs";
/// The monitor socket's name in a sandbox directory.
pub const MONITOR_SOCKET: &str = "shim-monitor.sock";

/// Whether `id` can be a sandbox id (containerd's and CRI-O's ids are 64 hex digits; anything
/// that could leave the sandboxes directory is refused).
pub fn valid_sandbox_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The monitor socket of sandbox `id` under `dir`, when a shim serves one there.
pub fn monitor_socket(dir: &Path, id: &str) -> Option<PathBuf> {
    if !valid_sandbox_id(id) {
        return None;
    }
    let socket = dir.join(id).join(MONITOR_SOCKET);
    let meta = fs::symlink_metadata(&socket).ok()?;
    meta.file_type().is_socket().then_some(socket)
}

/// The sandboxes under `dir` with a monitor socket, sorted by id. A missing `dir` means none
/// (no pod has run since boot).
pub fn list(dir: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("listing the sandboxes directory {}: {e}", dir.display())),
    };
    let mut shims = Vec::new();
    for entry in entries.flatten() {
        let Some(id) = entry.file_name().to_str().map(str::to_string) else { continue };
        if let Some(socket) = monitor_socket(dir, &id) {
            shims.push((id, socket));
        }
    }
    shims.sort();
    Ok(shims)
}

/// `GET path` on the shim's monitor socket; the body when the answer is 200 and at most
/// `limit` bytes. The caller bounds the time (dropping the future closes the connection).
pub async fn get(socket: &Path, path: &str, limit: usize) -> Result<Bytes, String> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| format!("connecting: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    // The connection is driven next to the request, in this future: nothing outlives it.
    let request = async {
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, "shim")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("building the request: {e}"))?;
        let resp = sender.send_request(req).await.map_err(|e| format!("GET {path}: {e}"))?;
        if resp.status() != StatusCode::OK {
            return Err(format!("GET {path}: HTTP {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| format!("GET {path}: reading the answer (at most {limit} bytes): {e}"))?;
        Ok(body.to_bytes())
    };
    tokio::pin!(request);
    let mut conn = conn;
    tokio::select! {
        result = &mut request => result,
        end = &mut conn => match end {
            // The connection closed first: the answer, if complete, is still there.
            Ok(()) => request.await,
            Err(e) => Err(format!("GET {path}: connection: {e}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids() {
        assert!(valid_sandbox_id("0123abcdef"));
        assert!(valid_sandbox_id("pod-1_a.b"));
        for bad in ["", ".", "..", "../x", "a/b", ".hidden", "a b", "a\nb"] {
            assert!(!valid_sandbox_id(bad), "{bad:?}");
        }
        assert!(!valid_sandbox_id(&"a".repeat(129)));
    }

    #[test]
    fn lists_only_directories_with_a_socket() {
        let dir = std::env::temp_dir().join(format!("kata-monitor-list-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(list(&dir).unwrap(), vec![], "a missing directory is no sandbox");
        fs::create_dir_all(dir.join("b")).unwrap();
        fs::create_dir_all(dir.join("a")).unwrap();
        fs::create_dir_all(dir.join("plainfile")).unwrap();
        fs::create_dir_all(dir.join("nosocket")).unwrap();
        fs::write(dir.join("plainfile").join(MONITOR_SOCKET), b"").unwrap();
        let _b = std::os::unix::net::UnixListener::bind(dir.join("b").join(MONITOR_SOCKET)).unwrap();
        let _a = std::os::unix::net::UnixListener::bind(dir.join("a").join(MONITOR_SOCKET)).unwrap();
        let ids: Vec<_> = list(&dir).unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["a", "b"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
