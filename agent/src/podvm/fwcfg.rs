//! Reading the user data from QEMU's fw_cfg (`-fw_cfg name=opt/io.podvisor/podvm,file=...`):
//! load `qemu_fw_cfg`, wait (bounded) for the entry, read at most 64 KiB, then unload the module
//! so that the entry (which holds the TLS key) is gone from sysfs.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use super::config::MAX_USER_DATA;

/// The fw_cfg entry name the service uses.
pub const FW_CFG_NAME: &str = "opt/io.podvisor/podvm";

/// Where the kernel shows it.
pub const FW_CFG_PATH: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/io.podvisor/podvm/raw";

/// The module exposing fw_cfg in sysfs.
pub const MODULE: &str = "qemu_fw_cfg";

/// Loads `qemu_fw_cfg` with the agent's modprobe (its index in `modules_dir`).
pub fn load_module(modules_dir: &Path) -> Result<(), String> {
    let index = crate::modprobe::Index::load(modules_dir)
        .map_err(|e| format!("load {MODULE}: no module index in {}: {e}", modules_dir.display()))?;
    crate::modprobe::probe(&index, MODULE, "").map(|_| ()).map_err(|e| {
        format!("load {MODULE}: {e} (the guest image must ship it: ONDEMAND_MODULES in guest-image/build.sh)")
    })
}

/// Waits up to `timeout` for `path` to appear, then reads it, refusing more than 64 KiB.
pub fn read_bounded(path: &Path, timeout: Duration) -> Result<Vec<u8>, String> {
    let started = Instant::now();
    let file = loop {
        match std::fs::File::open(path) {
            Ok(f) => break f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && started.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                    "no podvm user data: {} did not appear within {timeout:?} (QEMU needs -fw_cfg name={FW_CFG_NAME},file=...)",
                    path.display()
                ))
            }
            Err(e) => return Err(format!("open {}: {e}", path.display())),
        }
    };
    let mut buf = Vec::new();
    file.take(MAX_USER_DATA as u64 + 1).read_to_end(&mut buf).map_err(|e| format!("read {}: {e}", path.display()))?;
    if buf.len() > MAX_USER_DATA {
        return Err(format!("podvm user data {} is larger than {MAX_USER_DATA} bytes", path.display()));
    }
    Ok(buf)
}

/// Unloads `qemu_fw_cfg` (delete_module, non-blocking): the sysfs entry with the key goes away.
pub fn unload_module() -> Result<(), String> {
    nix::kmod::delete_module(c"qemu_fw_cfg", nix::kmod::DeleteModuleFlags::O_NONBLOCK)
        .map_err(|e| format!("unload {MODULE}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounded_in_size_and_time() {
        let dir = std::env::temp_dir().join(format!("podvisor-fwcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("raw");
        std::fs::write(&p, vec![b'x'; MAX_USER_DATA]).unwrap();
        assert_eq!(read_bounded(&p, Duration::ZERO).unwrap().len(), MAX_USER_DATA);
        std::fs::write(&p, vec![b'x'; MAX_USER_DATA + 1]).unwrap();
        assert!(read_bounded(&p, Duration::ZERO).unwrap_err().contains("larger than 65536"));
        let missing = dir.join("missing");
        let started = Instant::now();
        let e = read_bounded(&missing, Duration::from_millis(100)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(e.contains("did not appear") && e.contains("-fw_cfg name=opt/io.podvisor/podvm"), "{e}");
        // It appears while we wait.
        let late = dir.join("late");
        let writer = {
            let late = late.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                let tmp = late.with_extension("tmp");
                std::fs::write(&tmp, b"{}").unwrap();
                std::fs::rename(tmp, late).unwrap();
            })
        };
        assert_eq!(read_bounded(&late, Duration::from_secs(10)).unwrap(), b"{}");
        writer.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
