//! The sandbox (pause) container under guest pull: Kata's runtime sends source `pause` and its
//! agent unpacks a pause bundle shipped in the guest image. Ours: the rootfs holds only
//! `/pause`, the agent binary itself bound read-only; run as `/pause` (argv[0]'s file name) it
//! does what the Kubernetes pause does: waits, reaps children, exits 0 on SIGINT/SIGTERM.

use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};

use crate::sandbox::Mounted;

/// The process path in the pause rootfs.
pub const PAUSE_PATH: &str = "/pause";

/// Whether argv[0] names the pause program.
pub fn invoked_as_pause(argv0: Option<&str>) -> bool {
    argv0.is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "pause"))
}

/// Makes `mount_point` a rootfs holding `/pause` (bound from `binary`, read-only).
pub fn mount_rootfs(binary: &Path, mount_point: &Path) -> Result<Mounted, String> {
    let target = mount_point.join("pause");
    std::fs::create_dir_all(mount_point).map_err(|e| format!("create {}: {e}", mount_point.display()))?;
    let undo = || {
        let _ = std::fs::remove_file(&target);
        let _ = std::fs::remove_dir(mount_point);
    };
    if let Err(e) = std::fs::write(&target, b"") {
        undo();
        return Err(format!("create {}: {e}", target.display()));
    }
    let bind = mount(Some(binary), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>).and_then(|_| {
        mount(
            None::<&str>,
            &target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
    });
    if let Err(e) = bind {
        let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
        undo();
        return Err(format!("bind {} on {}: {e}", binary.display(), target.display()));
    }
    Ok(Mounted { mount_point: target, mounted: true, cleanup: vec![mount_point.to_path_buf()] })
}

/// The pause program: never returns.
pub fn run() -> ! {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD] {
        set.add(s);
    }
    let _ = set.thread_block();
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(s) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    if s == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            Ok(_) => std::process::exit(0),
            Err(_) => {}
        }
    }
}
