//! Worker networking of the qemu provider: the podvm bridge, podvm addresses, taps
//! ([`bridge`]), and the pod tunnel between a pod's netns and its podvm ([`tunnel`]).
//!
//! Netlink, not `ip`/`tc` binaries, as the shim's pod network code (`hypervisor::network`) does:
//! the tc messages and the tap ioctl are that module's. Every call is blocking (a few netlink
//! round trips): call them from `spawn_blocking`.

pub mod bridge;
pub mod tunnel;

use std::io;

/// A worker network failure; the text names the device, the step and the fix where one exists.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NetError(pub String);

impl NetError {
    fn op(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> NetError {
        let what = what.to_string();
        move |e| NetError(format!("{what}: {e}"))
    }
}

/// `errno` values that mean "already gone" for a delete.
fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL))
}
