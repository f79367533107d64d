//! podvisor's guest agent. It runs as PID 1 of the initrd: sets up the guest (file systems,
//! kernel modules, loopback), reaps orphans, and serves Kata's agent API over ttrpc on vsock port
//! 1024. A fatal error prints its cause on the console and powers the guest off.
//!
//! Other invocations (checked before anything else):
//! * as `modprobe` (argv[0]'s file name; the initrd's `/sbin/modprobe` links to `/init`): the
//!   kernel's usermode helper for on-demand module loading (`modprobe`).
//! * as `pause` (argv[0]'s file name; the guest-pull sandbox container's `/pause` is the agent
//!   bound read-only): the pause program (`image::pause`).
//! * `kata-agent __runtime <request>`: the single-threaded libcontainer helper
//!   (`container::helper`), started by the agent itself.
//! * `kata-agent --listen unix:///path [--run-dir DIR]`: test mode on a host: no PID-1 setup,
//!   serves on the given address, becomes a child subreaper (so container processes are
//!   re-parented to it) and exits 0 after DestroySandbox.
//!
//! With `agent.podvm` on the kernel command line (peer pods, `podvm`), PID 1 configures its
//! network from fw_cfg user data and serves on a unix socket behind a mutual-TLS TCP listener
//! instead of vsock.

mod container;
mod copy_file;
mod debug_console;
#[cfg(test)]
mod fuzz_targets;
mod guest;
mod image;
mod init;
mod logging;
mod metrics;
mod modprobe;
mod network;
mod podvm;
mod policy;
mod rpc;
mod sandbox;

use std::path::PathBuf;
use std::sync::Arc;

use slog::{error, info};

/// The agent's version (the workspace version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The agent's tmpfs directory in the guest (container state, bundles, console sockets).
const RUN_DIR: &str = "/run/podvisor";

/// How the agent was asked to serve.
#[derive(Debug)]
struct Mode {
    /// `vsock://...` in the guest, `unix://...` in test mode.
    listen: String,
    run_dir: PathBuf,
    test: bool,
}

fn parse_args(args: &[String]) -> Result<Mode, String> {
    let mut mode = Mode { listen: rpc::vsock_addr(), run_dir: PathBuf::from(RUN_DIR), test: false };
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => {
                mode.listen = it.next().ok_or("--listen needs an address (unix:///path)")?.clone();
                mode.test = true;
            }
            "--run-dir" => mode.run_dir = PathBuf::from(it.next().ok_or("--run-dir needs a directory")?),
            other => {
                return Err(format!(
                    "unknown argument {other:?} (usage: kata-agent [--listen unix:///path] [--run-dir DIR])"
                ))
            }
        }
    }
    if mode.test && !mode.listen.starts_with("unix://") {
        return Err(format!("--listen {}: only unix:// addresses are supported in test mode", mode.listen));
    }
    Ok(mode)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if image::pause::invoked_as_pause(args.first().map(String::as_str)) {
        image::pause::run();
    }
    if modprobe::invoked_as_modprobe(args.first().map(String::as_str)) {
        std::process::exit(modprobe::main(&args));
    }
    if args.get(1).map(String::as_str) == Some(container::runtime::HELPER_ARG) {
        container::helper::main(&args);
    }
    let pid1 = nix::unistd::getpid().as_raw() == 1;
    let mut mode = if pid1 {
        Mode { listen: rpc::vsock_addr(), run_dir: PathBuf::from(RUN_DIR), test: false }
    } else {
        match parse_args(&args) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("kata-agent: {e}");
                std::process::exit(2);
            }
        }
    };
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
    let mut podvm_user_data = None;
    if pid1 {
        let started = std::time::Instant::now();
        let modules = std::path::Path::new("/lib/modules").join(&release);
        match init::module_load_order(&modules).and_then(|order| init::load_modules(&order)) {
            Ok(n) => {
                info!(log, "kernel modules loaded"; "count" => n, "elapsed_ms" => started.elapsed().as_millis() as u64)
            }
            Err(e) => {
                error!(log, "loading kernel modules failed"; "error" => &e.0);
                init::fatal(&e.0);
            }
        }
        if let Err(e) = init::loopback_up() {
            error!(log, "bringing up lo failed"; "error" => &e.0);
            init::fatal(&e.0);
        }
        init::load_deferred_modules(&modules, log.clone());
        if podvm::enabled(&cmdline) {
            match podvm::setup(&log, &modules) {
                Ok(user_data) => {
                    mode.listen = podvm::listen_addr();
                    podvm_user_data = Some(user_data);
                }
                Err(e) => {
                    error!(log, "podvm setup failed"; "error" => &e);
                    init::fatal(&format!("podvm ({}): {e}", podvm::CMDLINE_FLAG));
                }
            }
        }
        if rpc::test_panic_point(&cmdline) == Some("boot") {
            panic!("{}boot: fault injected by a test", rpc::TEST_PANIC_PARAM);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => init::fatal(&format!("tokio runtime: {e}")),
    };
    let debug = matches!(logging::level_from_cmdline(&cmdline), slog::Level::Debug | slog::Level::Trace);
    let result = runtime.block_on(serve(log.clone(), &mode, debug, &cmdline, podvm_user_data));
    match result {
        Ok(()) if mode.test => {
            info!(log, "agent shutting down (test mode)");
            std::process::exit(0);
        }
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
async fn serve(
    log: slog::Logger,
    mode: &Mode,
    debug: bool,
    cmdline: &str,
    podvm: Option<podvm::config::UserData>,
) -> Result<(), String> {
    if mode.test {
        // Not PID 1: make container processes (re-parented when their helper exits) come to us.
        nix::sys::prctl::set_child_subreaper(true).map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
    }
    // The one reaper: every child (helpers, container processes, orphans) is reaped here.
    let reaper = container::reaper::Reaper::new();
    reaper.start(log.new(slog::o!("subsystem" => "reaper")))?;
    if !mode.test {
        // Off unless the kernel command line asks for it; a failure is logged, never fatal.
        match debug_console::port_from_cmdline(cmdline) {
            Ok(None) => {}
            Ok(Some(port)) => {
                let console_log = log.new(slog::o!("subsystem" => "debug-console"));
                if let Err(e) = debug_console::start(console_log, reaper.clone(), port) {
                    error!(log, "debug console not started"; "error" => e);
                }
            }
            Err(e) => error!(log, "debug console not started"; "error" => e),
        }
    }
    let containers = Arc::new(container::Containers::new(
        log.new(slog::o!("subsystem" => "containers")),
        reaper,
        mode.run_dir.clone(),
        debug,
    ));
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let mut server = rpc::server(log.clone(), &mode.listen, shutdown.clone(), containers)?;
    server.start().await.map_err(|e| format!("start ttrpc server on {}: {e}", mode.listen))?;
    info!(log, "agent listening"; "address" => &mode.listen);
    if let Some(user_data) = podvm {
        podvm::start_forwarder(log.new(slog::o!("subsystem" => "podvm-forwarder")), &user_data).await?;
    }
    shutdown.notified().await;
    // Let the DestroySandbox reply leave before the guest powers off: the graceful shutdown
    // waits for in-flight requests (long polls such as GetOOMEvent end at DestroySandbox).
    let started = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let graceful = tokio::time::timeout(std::time::Duration::from_secs(1), server.shutdown()).await.is_ok();
    info!(log, "ttrpc server stopped"; "graceful" => graceful, "elapsed_ms" => started.elapsed().as_millis() as u64);
    if let Some(path) = mode.listen.strip_prefix("unix://") {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        std::iter::once("kata-agent").chain(a.iter().copied()).map(String::from).collect()
    }

    #[test]
    fn test_mode_arguments() {
        let m = parse_args(&args(&["--listen", "unix:///tmp/a.sock", "--run-dir", "/tmp/r"])).unwrap();
        assert!(m.test);
        assert_eq!((m.listen.as_str(), m.run_dir.to_str().unwrap()), ("unix:///tmp/a.sock", "/tmp/r"));
        let m = parse_args(&args(&[])).unwrap();
        assert!(!m.test && m.listen.starts_with("vsock://"));
        assert!(parse_args(&args(&["--listen", "vsock://-1:1024"])).is_err());
        assert!(parse_args(&args(&["--bogus"])).unwrap_err().contains("--bogus"));
    }
}
