//! `containerd-shim-kata-v2`: podvisor's shim binary.
//!
//! - `--version`, `features`: the probes CRI-O makes at startup; answer and exit.
//! - `check [--config FILE]`: the host check.
//! - `-namespace .. -address .. -id .. start`: print the pod's socket address (spawning the
//!   daemon for a pod's first container).
//! - `-id .. -bundle .. delete`: clean up after a task; print a `DeleteResponse`.
//! - no action word: the daemon serving the task API on the socket inherited as fd 3.

use std::process::ExitCode;
use std::sync::Arc;

use hypervisor::HostCheck;
use podvisor_shim::bootstrap::{self, Flags};
use podvisor_shim::{cleanup, config, events, logging, monitor, pod, sandbox, service, VERSION};
use protobuf::Message;
use slog::{error, info};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["--version"] | ["-v"] | ["version"] => {
            println!("podvisor containerd shim (Rust): id: \"io.containerd.kata.v2\", version: {VERSION}");
            return ExitCode::SUCCESS;
        }
        ["features"] => {
            println!("{}", features_json());
            return ExitCode::SUCCESS;
        }
        ["check"] | ["check", "--config", _] => return check(words.get(2).copied()),
        _ => {}
    }
    let flags = match bootstrap::parse_flags(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-kata-v2: {e}\nusage: containerd-shim-kata-v2 [-namespace NS] [-address ADDR] [-id ID] [-bundle DIR] [-debug] start|delete | --version | features | check");
            return ExitCode::from(2);
        }
    };
    match flags.action.as_deref() {
        Some("start") => match bootstrap::start(&flags) {
            Ok(address) => {
                print!("{address}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                // containerd and CRI-O show this text as the start error.
                print!("containerd-shim-kata-v2 start: {e}");
                ExitCode::FAILURE
            }
        },
        Some("delete") => delete(&flags),
        None => serve(flags),
        Some(other) => {
            eprintln!("containerd-shim-kata-v2: unknown action {other:?}; use start or delete");
            ExitCode::from(2)
        }
    }
}

/// The mount options a container's spec may carry: what the guest's runtime (youki's
/// libcontainer) applies. CRI-O allows CRI `recursive_read_only` only when `rro` is listed.
const MOUNT_OPTIONS: &[&str] = &[
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "mand",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "private",
    "ratime",
    "rbind",
    "rdev",
    "rdiratime",
    "relatime",
    "remount",
    "rexec",
    "rnoatime",
    "rnodev",
    "rnodiratime",
    "rnoexec",
    "rnorelatime",
    "rnostrictatime",
    "rnosuid",
    "rnosymfollow",
    "ro",
    "rprivate",
    "rrelatime",
    "rro",
    "rrw",
    "rshared",
    "rslave",
    "rstrictatime",
    "rsuid",
    "rsymfollow",
    "runbindable",
    "rw",
    "shared",
    "slave",
    "strictatime",
    "suid",
    "sync",
    "unbindable",
];

/// The OCI runtime-features answer CRI-O asks for.
fn features_json() -> String {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "mountOptions": MOUNT_OPTIONS,
        "annotations": {"io.katacontainers.runtime": "podvisor", "io.katacontainers.version": VERSION}
    })
    .to_string()
}

fn check(config_file: Option<&str>) -> ExitCode {
    let cfg = match config::load(config_file.map(std::path::Path::new)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(remote) = &cfg.remote {
        let (ok, text) = hypervisor::remote::check(remote);
        let _ = std::io::Write::write_all(
            &mut std::io::stdout().lock(),
            format!("configuration: {}\n{text}", cfg.file.display()).as_bytes(),
        );
        return if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    let check = HostCheck::run(&cfg.hypervisor);
    // A reader that goes away (`| head`) ends the output, not the process with a panic.
    let mut text = format!("configuration: {}\n", cfg.file.display());
    for w in &cfg.warnings {
        text.push_str(&format!("warning: {w}\n"));
    }
    text.push_str(&format!("{check}\n"));
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
    if check.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn logger(flags: &Flags, sandbox: &str, bundle: &std::path::Path) -> slog::Logger {
    let debug = flags.debug
        || config::load(std::env::var(bootstrap::CONFIG_PATH_ENV).ok().as_deref().map(std::path::Path::new))
            .map(|c| c.runtime.enable_debug)
            .unwrap_or(false);
    logging::init(&logging::LogOptions {
        debug,
        sandbox: Some(sandbox.to_string()),
        fallback: Some(bundle.join("log")),
    })
}

/// `delete`: cleans up whatever a dead shim left for this task, answers a `DeleteResponse`.
fn delete(flags: &Flags) -> ExitCode {
    let bundle = flags.bundle.clone().unwrap_or_else(|| std::env::current_dir().unwrap_or_default());
    let group = bootstrap::group_of(&flags.id, &bootstrap::bundle_annotations(&bundle));
    let log = logger(flags, &group, &bundle);
    let socket = bootstrap::socket_path(&flags.address, &flags.namespace, &group);
    let alive = bootstrap::daemon_answers(&socket);
    let resp = cleanup::after_shim(&flags.id, &group, &bundle, alive, &log);
    if !alive {
        let _ = std::fs::remove_file(&socket);
    }
    match resp.write_to_bytes() {
        Ok(bytes) => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(&bytes);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cannot encode the DeleteResponse: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The daemon: serves the task API until Shutdown leaves no container.
fn serve(flags: Flags) -> ExitCode {
    let bundle = std::env::current_dir().unwrap_or_default();
    let log = logger(&flags, &flags.id, &bundle);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(log, "cannot start the tokio runtime"; "error" => %e);
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let ttrpc_address = std::env::var("TTRPC_ADDRESS").ok().filter(|a| !a.is_empty());
        let publisher = events::Publisher::new(ttrpc_address, flags.namespace.clone(), log.clone());
        let pod = Arc::new(pod::Pod::new(
            &flags.id,
            Arc::new(publisher.clone()),
            Arc::new(sandbox::QemuBackend),
            log.clone(),
            std::env::var(bootstrap::CONFIG_PATH_ENV).ok(),
        ));
        let service = service::TaskService::new(pod.clone(), log.clone());
        let service = Arc::new(service);
        // containerd 1.6 and CRI-O call `containerd.task.v2.Task`; the protos crate names the
        // same messages `containerd.task.v3.Task` (containerd 2.x). Serve both names.
        let mut services = containerd_shim_protos::shim_async::create_task(service.clone());
        let v2 = containerd_shim_protos::shim_async::create_task(service).into_values().next();
        if let Some(v2) = v2 {
            services.insert("containerd.task.v2.Task".to_string(), v2);
        }
        // fd 3 came without close-on-exec; children (QEMU, virtiofsd, ...) must not inherit
        // it, or the socket would keep accepting after this daemon died and `delete` would
        // take the pod's shim for alive.
        // SAFETY: fcntl on an fd number; no memory is involved.
        unsafe {
            let flags = libc::fcntl(3, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(3, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
        // SAFETY: fd 3 is the listening socket `start` handed over; nothing else uses it.
        let server = unsafe { ttrpc::asynchronous::Server::new().add_unix_listener(3) };
        let mut server = match server {
            Ok(s) => s.register_service(services),
            Err(e) => {
                error!(log, "fd 3 is not the listening socket (start the shim with `start`)"; "error" => %e);
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = server.start().await {
            error!(log, "cannot serve the task API"; "error" => %e);
            return ExitCode::FAILURE;
        }
        info!(log, "shim serving"; "sandbox" => &flags.id, "namespace" => &flags.namespace, "version" => VERSION);
        let view = pod.clone();
        let monitor = match monitor::start(&flags.id, Arc::new(move || view.monitor_view()), &log) {
            Ok(m) => Some(m),
            Err(e) => {
                // Metrics are not worth failing the pod: the task API still serves.
                error!(log, "no metrics endpoint"; "error" => %e);
                None
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = pod.exit.notified() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {
                info!(log, "SIGTERM: stopping the sandbox");
            }
        }
        pod.stop_vm().await;
        if let Some(m) = monitor {
            m.stop().await;
        }
        // Let the Shutdown reply leave before the socket goes.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), server.shutdown()).await;
        publisher.close().await;
        let socket = bootstrap::socket_path(&flags.address, &flags.namespace, &flags.id);
        let _ = std::fs::remove_file(socket);
        info!(log, "shim exiting");
        ExitCode::SUCCESS
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
