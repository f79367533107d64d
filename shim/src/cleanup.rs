//! `delete` after a shim is gone: containerd runs `<shim> -id <id> -bundle <bundle> delete`
//! after every task shutdown, and after a shim crash. When the pod's daemon no longer answers,
//! whatever it owned is torn down here: the VM and its helper processes, the host cgroup, the
//! shared directory with every bind mount in it, the rootfs mount in the bundle, the run
//! directory, the metrics socket's directory `/run/vc/sbs/<sandbox>`.

use std::path::Path;
use std::time::SystemTime;

use containerd_shim_protos::api::DeleteResponse;
use protobuf::MessageField;
use slog::{info, warn, Logger};

use crate::mounts::{self, SharedDir};

/// The file in the sandbox directory naming the remote hypervisor service of a peer pod, so
/// that a `delete` after a dead shim can have its podvm stopped.
pub const REMOTE_RECORD: &str = "remote-hypervisor.socket";

/// Records the remote hypervisor service socket of a peer pod in its sandbox directory.
pub fn record_remote(sandbox_dir: &Path, socket: &Path) -> std::io::Result<()> {
    std::fs::write(sandbox_dir.join(REMOTE_RECORD), socket.as_os_str().as_encoded_bytes())
}

/// A peer pod's podvm keeps running (and costing) after its shim died: ask the service that runs
/// it to stop it (`StopVM`; the service answers unknown ids with success).
fn stop_remote_podvm(group: &str, sandbox_dir: &Path, log: &Logger) {
    let Ok(socket) = std::fs::read_to_string(sandbox_dir.join(REMOTE_RECORD)) else { return };
    let socket = std::path::PathBuf::from(socket.trim());
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return warn!(log, "cannot stop the podvm a dead shim left"; "sandbox" => group, "error" => %e),
    };
    let timeout = std::time::Duration::from_secs(60);
    match rt.block_on(hypervisor::remote::stop_podvm(&socket, group, timeout)) {
        Ok(()) => info!(log, "asked the remote hypervisor service to stop the podvm a dead shim left";
            "sandbox" => group, "service" => %socket.display()),
        Err(e) => warn!(log, "cannot stop the podvm a dead shim left; the remote hypervisor service \
            removes it when it restarts (garbage collection)"; "sandbox" => group, "error" => %e),
    }
}

/// Cleans up after task `id` of pod `group` and returns the answer for containerd. With a live
/// daemon nothing is touched (it cleans up on `Delete`). The VM's helpers are killed with their
/// whole process groups, as the live shim kills them, and only while they are the processes
/// the shim recorded (pid and start time), never a process that reused a pid
/// ([`hypervisor::qemu::kill_leftovers`]).
pub fn after_shim(id: &str, group: &str, bundle: &Path, daemon_alive: bool, log: &Logger) -> DeleteResponse {
    if !daemon_alive {
        let run_dir = Path::new(hypervisor::qemu::DEFAULT_RUN_ROOT).join(group);
        match hypervisor::qemu::kill_leftovers(&run_dir) {
            Ok(killed) if !killed.is_empty() => {
                warn!(log, "the shim was gone; killed the VM it left"; "sandbox" => group, "pids" => format!("{killed:?}"))
            }
            Ok(_) => {}
            Err(e) => warn!(log, "cleanup of the VM run directory failed"; "sandbox" => group, "error" => %e),
        }
        let shared = SharedDir::new(group).with_log(log.clone());
        stop_remote_podvm(group, shared.sandbox_dir(), log);
        match crate::host_cgroup::remove_recorded(shared.sandbox_dir()) {
            Ok(removed) if !removed.is_empty() => {
                info!(log, "removed the host cgroup a dead shim left"; "sandbox" => group, "dirs" => removed.len())
            }
            Ok(_) => {}
            Err(e) => warn!(log, "cleanup of the host cgroup failed"; "sandbox" => group, "error" => %e),
        }
        if let Err(e) = crate::monitor::remove_dir(group) {
            warn!(log, "cleanup of the metrics socket directory failed"; "sandbox" => group, "error" => %e);
        }
        if let Err(e) = shared.destroy() {
            warn!(log, "cleanup of the shared directory failed"; "sandbox" => group, "error" => %e);
        }
        let rootfs = bundle.join("rootfs");
        if mounts::is_mount_point(&rootfs) {
            match mounts::unmount_all(&rootfs) {
                Ok(()) => info!(log, "unmounted the rootfs a dead shim left"; "container" => id),
                Err(e) => warn!(log, "cannot unmount the rootfs"; "container" => id, "error" => %e),
            }
        }
    }
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    DeleteResponse {
        pid: 0,
        exit_status: 128 + 9,
        exited_at: MessageField::some(protobuf::well_known_types::timestamp::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn running(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !matches!(s.rsplit_once(')').map(|(_, r)| r.trim_start().as_bytes()[0]), Some(b'Z' | b'X')))
    }

    /// The `delete` of a dead shim: the helpers it recorded die with their children and
    /// grandchildren, the run directory, the rootfs mount in the bundle, the shared directory
    /// and the metrics socket's directory go.
    #[test]
    fn dead_shim_leaves_no_process_group_mount_or_directory() {
        let group = format!("podvisor-unit-cleanup-{}", std::process::id());
        let run_dir = Path::new(hypervisor::qemu::DEFAULT_RUN_ROOT).join(&group);
        std::fs::create_dir_all(&run_dir).unwrap();
        let scratch = std::env::temp_dir().join(format!("{group}-scratch"));
        let bundle = scratch.join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        std::fs::create_dir_all(scratch.join("image")).unwrap();
        nix::mount::mount(
            Some(&scratch.join("image")),
            &bundle.join("rootfs"),
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap();
        // Two "helpers", each leading its own process group, with a child and a grandchild.
        let mut helpers = Vec::new();
        for name in ["qemu", "virtiofsd"] {
            let child = std::process::Command::new("sh")
                .args(["-c", "sh -c 'sleep 1000 & wait' & wait"])
                .process_group(0)
                .spawn()
                .unwrap();
            hypervisor::qemu::record_pid(&run_dir, name, child.id()).unwrap();
            helpers.push(child);
        }
        let members = |pgrp: u32| -> Vec<u32> {
            std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/stat")).ok().and_then(|s| {
                        s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(2)?.parse::<u32>().ok())
                    }) == Some(pgrp)
                })
                .collect()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut all = Vec::new();
        for h in &helpers {
            loop {
                let m = members(h.id());
                if m.len() == 3 {
                    all.extend(m);
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "group {} has {m:?}", h.id());
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        // The metrics socket the dead shim served.
        let monitor_dir = crate::monitor::sandbox_dir(&group);
        std::fs::create_dir_all(&monitor_dir).unwrap();
        let listener = std::os::unix::net::UnixListener::bind(crate::monitor::socket_path(&group)).unwrap();
        drop(listener);
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let resp = after_shim("c1", &group, &bundle, false, &log);
        for h in &mut helpers {
            let _ = h.wait();
        }
        let survivors: Vec<u32> = all.iter().copied().filter(|p| running(*p)).collect();
        let rootfs_mounted = mounts::is_mount_point(&bundle.join("rootfs"));
        if rootfs_mounted {
            let _ = nix::mount::umount2(&bundle.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
        }
        for p in &survivors {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p as i32), nix::sys::signal::Signal::SIGKILL);
        }
        std::fs::remove_dir_all(&scratch).unwrap();
        assert!(survivors.is_empty(), "still running after cleanup: {survivors:?} of {all:?}");
        assert!(!rootfs_mounted, "the rootfs is still mounted");
        assert!(!run_dir.exists(), "{} is left", run_dir.display());
        assert!(!monitor_dir.exists(), "{} is left", monitor_dir.display());
        assert!(!SharedDir::new(&group).sandbox_dir().exists());
        assert_eq!(resp.exit_status, 137);
    }
}
