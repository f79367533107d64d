//! `podvisor-remote-hypervisor`: the remote hypervisor service.
//!
//! - `[serve] [--config FILE] [--socket PATH] [--state-dir DIR] [--log-level LEVEL]`: serve
//!   `remote.Hypervisor` (the default).
//! - `proxy --socket PATH --target IP:PORT --tls-dir DIR [--vmm-pid PID --vmm-start-time T]`:
//!   one pod's agent proxy, spawned by `serve`.
//! - `--version`.

use std::process::ExitCode;

use podvisor_remote_hypervisor::{config, proxy, service, wiring};
use slog::{error, info, o, warn, Drain};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") | Some("version") => {
            println!("podvisor-remote-hypervisor {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("proxy") => run_proxy(&args[1..]),
        Some("serve") => serve(&args[1..]),
        _ => serve(&args),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

fn run_proxy(args: &[String]) -> ExitCode {
    let args = match proxy::parse_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("podvisor-remote-hypervisor proxy: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime().block_on(proxy::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podvisor-remote-hypervisor proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &[String]) -> ExitCode {
    let cfg = match config::parse_serve_flags(args).and_then(|f| f.load()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("podvisor-remote-hypervisor: {e}");
            return ExitCode::from(2);
        }
    };
    let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
    let drain = slog_term::FullFormat::new(decorator).build().filter_level(cfg.log_level).fuse();
    let log = slog::Logger::root(drain, o!("service" => "podvisor-remote-hypervisor"));
    for w in &cfg.warnings {
        warn!(log, "{w}");
    }
    let deps = match wiring::build(&cfg, &log) {
        Ok(d) => d,
        Err(e) => {
            error!(log, "{e}");
            return ExitCode::FAILURE;
        }
    };
    let socket = cfg.socket.clone();
    let core = match service::Core::new(cfg, deps) {
        Ok(c) => c,
        Err(e) => {
            error!(log, "{e}");
            return ExitCode::FAILURE;
        }
    };
    runtime().block_on(async move {
        let r = core.recover().await;
        info!(log, "restart recovery"; "reattached" => r.reattached.len(), "destroyed" => r.destroyed.len(), "orphans" => r.orphans.len());
        let listening = match service::listen(core, &socket).await {
            Ok(l) => l,
            Err(e) => {
                error!(log, "{e}");
                return ExitCode::FAILURE;
            }
        };
        info!(log, "serving remote.Hypervisor"; "socket" => %socket.display());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!(log, "stopping; podvms keep running and are reattached at the next start");
        listening.shutdown().await;
        ExitCode::SUCCESS
    })
}
