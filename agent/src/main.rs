//! podvisor's guest agent. It runs as PID 1 of the initrd: sets up the guest (file systems,
//! kernel modules, loopback), reaps orphans, and serves Kata's agent API over ttrpc on vsock port
//! 1024. A fatal error prints its cause on the console and powers the guest off.

mod guest;
mod init;
mod logging;
mod rpc;

use std::sync::Arc;

use slog::{error, info};

/// The agent's version (the workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn main() {
    let pid1 = nix::unistd::getpid().as_raw() == 1;
    if pid1 {
        // A panic in PID 1 would make the kernel panic ("Attempted to kill init"); print the
        // cause on the console and power off instead.
        std::panic::set_hook(Box::new(|info| init::fatal(&format!("panic: {info}"))));
        if let Err(e) = init::setup_console() {
            init::fatal(&e.0);
        }
        if let Err(e) = init::mount_filesystems() {
            init::fatal(&e.0);
        }
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let log = logging::console_logger(logging::level_from_cmdline(&cmdline));
    let release = init::kernel_release();
    info!(log, "kata-agent starting"; "version" => VERSION, "kernel_release" => &release, "pid1" => pid1);
    if pid1 {
        let started = std::time::Instant::now();
        let modules = std::path::Path::new("/lib/modules").join(&release);
        match init::module_load_order(&modules).and_then(|order| init::load_modules(&order)) {
            Ok(n) => info!(log, "kernel modules loaded"; "count" => n, "elapsed_ms" => started.elapsed().as_millis() as u64),
            Err(e) => {
                error!(log, "loading kernel modules failed"; "error" => &e.0);
                init::fatal(&e.0);
            }
        }
        if let Err(e) = init::loopback_up() {
            error!(log, "bringing up lo failed"; "error" => &e.0);
            init::fatal(&e.0);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => init::fatal(&format!("tokio runtime: {e}")),
    };
    let result = runtime.block_on(serve(log.clone(), pid1));
    match result {
        Ok(()) => {
            info!(log, "agent shutting down; powering off");
            init::power_off();
        }
        Err(e) => {
            error!(log, "agent failed"; "error" => &e);
            init::fatal(&e);
        }
    }
}

/// Serves the agent API until DestroySandbox.
async fn serve(log: slog::Logger, pid1: bool) -> Result<(), String> {
    if pid1 {
        tokio::spawn(reap_orphans(log.clone()));
    }
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let mut server = rpc::server(log.clone(), shutdown.clone())?;
    server.start().await.map_err(|e| format!("start ttrpc server on vsock port {}: {e}", agent_protocol::AGENT_VSOCK_PORT))?;
    info!(log, "agent listening"; "vsock_port" => agent_protocol::AGENT_VSOCK_PORT);
    shutdown.notified().await;
    // Let the DestroySandbox reply leave before the guest powers off.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), server.shutdown()).await;
    Ok(())
}

/// PID 1 inherits every orphan; reap them on SIGCHLD.
async fn reap_orphans(log: slog::Logger) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let Ok(mut sigchld) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) else {
        error!(log, "cannot watch SIGCHLD; orphans will not be reaped");
        return;
    };
    loop {
        sigchld.recv().await;
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => slog::debug!(log, "reaped"; "status" => format!("{status:?}")),
            }
        }
    }
}
