//! A sandbox on this node: its shim's monitor socket (`/run/vc/sbs/<id>/shim-monitor.sock`) and
//! its VM's run directory (`/run/kata-containers/vm/<id>`, with the `pids` records).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where shims put their monitor sockets (Kata's Go runtime's path).
pub const SBS_ROOT: &str = "/run/vc/sbs";
/// The monitor socket's name in the sandbox's directory.
pub const MONITOR_SOCKET: &str = "shim-monitor.sock";

/// Refuses ids that are not a plain name (they become path components).
pub fn validate_id(id: &str) -> Result<(), String> {
    // Kata's rule: ^[a-zA-Z0-9][a-zA-Z0-9_.-]+$ (so never `.`, `..` or a path).
    let ok = id.len() >= 2
        && id.len() <= 256
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid sandbox id {id:?}: use the id containerd or CRI-O shows (letters, digits, '-', '_', '.')"))
    }
}

/// The sandbox's monitor socket under `root`.
pub fn monitor_socket(root: &Path, id: &str) -> PathBuf {
    root.join(id).join(MONITOR_SOCKET)
}

/// The sandbox's monitor socket, or an error naming what is missing.
pub fn existing_monitor_socket(root: &Path, id: &str) -> Result<PathBuf, String> {
    validate_id(id)?;
    let dir = root.join(id);
    if !dir.is_dir() {
        return Err(format!(
            "no sandbox {id:?} on this node ({} does not exist); list sandboxes with `crictl pods` or `ls {}`",
            dir.display(),
            root.display()
        ));
    }
    let sock = monitor_socket(root, id);
    if !sock.exists() {
        return Err(format!("sandbox {id:?} has no monitor socket {} (its shim is not running)", sock.display()));
    }
    Ok(sock)
}

/// `GET path` from the sandbox's shim; the body of a 200 answer.
pub fn shim_get(root: &Path, id: &str, path: &str) -> Result<Vec<u8>, String> {
    let sock = existing_monitor_socket(root, id)?;
    let r = crate::http::get(&sock, path).map_err(|e| format!("sandbox {id:?}: {e}"))?;
    if r.status != 200 {
        return Err(format!(
            "sandbox {id:?}: GET {path} answered {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body[..r.body.len().min(500)]).trim()
        ));
    }
    Ok(r.body)
}

/// `kata-runtime metrics <id>`.
pub fn metrics(id: &str) -> Result<ExitCode, String> {
    use std::io::Write;
    let body = shim_get(Path::new(SBS_ROOT), id, "/metrics")?;
    std::io::stdout().write_all(&body).map_err(|e| format!("write to stdout: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

/// Sandboxes with a directory under `root`, sorted.
pub fn list(root: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|id| validate_id(id).is_ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// A helper process of the sandbox's VM from `<run_dir>/pids` (`<name> <pid> <start> <session>`),
/// when it still runs as the same process (its start time matches).
pub fn helper_pid(run_dir: &Path, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(run_dir.join("pids")).ok()?;
    text.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.first() != Some(&name) {
            return None;
        }
        let pid: u32 = f.get(1)?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        match f.get(2) {
            Some(start) if fields.get(19) != Some(start) => None,
            _ => Some(pid),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_are_paths_are_refused() {
        for bad in ["", "a", ".", "..", ".x", "-x", "a/b", "../etc", "a b", "x\0"] {
            assert!(validate_id(bad).unwrap_err().contains("invalid sandbox id"), "{bad:?}");
        }
        for good in ["abc", "0123456789abcdef", "pod_1.x-y"] {
            validate_id(good).unwrap();
        }
    }

    #[test]
    fn missing_sandbox_and_missing_socket_are_named() {
        let root = std::env::temp_dir().join(format!("kata-runtime-sbs-{}", std::process::id()));
        std::fs::create_dir_all(root.join("sb1")).unwrap();
        let e = existing_monitor_socket(&root, "nope").unwrap_err();
        assert!(e.contains("no sandbox \"nope\"") && e.contains("does not exist"), "{e}");
        let e = existing_monitor_socket(&root, "sb1").unwrap_err();
        assert!(e.contains("no monitor socket") && e.contains("shim-monitor.sock"), "{e}");
        assert_eq!(list(&root), vec!["sb1".to_string()]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn helper_pid_checks_the_start_time() {
        let dir = std::env::temp_dir().join(format!("kata-runtime-pids-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let me = std::process::id();
        let stat = std::fs::read_to_string(format!("/proc/{me}/stat")).unwrap();
        let start = stat.rsplit_once(')').unwrap().1.split_whitespace().nth(19).unwrap().to_string();
        std::fs::write(dir.join("pids"), format!("qemu {me} {start} 1\nvirtiofsd {me} 1 1\n")).unwrap();
        assert_eq!(helper_pid(&dir, "qemu"), Some(me));
        assert_eq!(helper_pid(&dir, "virtiofsd"), None, "a reused pid is not the helper");
        assert_eq!(helper_pid(&dir, "vhost-device-vsock"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
