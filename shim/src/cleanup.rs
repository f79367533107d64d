//! `delete` after a shim is gone: containerd runs `<shim> -id <id> -bundle <bundle> delete`
//! after every task shutdown, and after a shim crash. When the pod's daemon no longer answers,
//! whatever it owned is torn down here: the VM and its helper processes, the host cgroup, the
//! shared directory with every bind mount in it, the rootfs mount in the bundle, the run
//! directory.

use std::path::Path;
use std::time::SystemTime;

use containerd_shim_protos::api::DeleteResponse;
use protobuf::MessageField;
use slog::{info, warn, Logger};

use crate::mounts::{self, SharedDir};

/// Cleans up after task `id` of pod `group` and returns the answer for containerd. With a live
/// daemon nothing is touched (it cleans up on `Delete`).
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
        let shared = SharedDir::new(group);
        match crate::host_cgroup::remove_recorded(shared.sandbox_dir()) {
            Ok(removed) if !removed.is_empty() => {
                info!(log, "removed the host cgroup a dead shim left"; "sandbox" => group, "dirs" => removed.len())
            }
            Ok(_) => {}
            Err(e) => warn!(log, "cleanup of the host cgroup failed"; "sandbox" => group, "error" => %e),
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
