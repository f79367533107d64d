//! `kata-monitor`: Kata's flags (`--listen-address`, `--runtime-endpoint`, `--log-level`; Go
//! style `-flag value` and `-flag=value` are accepted too), plus `--sandboxes-dir` and
//! `--shim-timeout-ms` for tests and unusual hosts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use podvisor_monitor::{Config, Monitor};
use slog::{info, o, Drain, Level};

const USAGE: &str = "usage: kata-monitor [--listen-address ADDR] [--runtime-endpoint SOCKET] [--log-level LEVEL]
                    [--sandboxes-dir DIR] [--shim-timeout-ms MS]
       kata-monitor --version

  --listen-address ADDR      where to serve /metrics, /sandboxes, /agent-url (default 127.0.0.1:8090;
                             \":8090\" means every address)
  --runtime-endpoint SOCKET  the CRI socket of containerd or CRI-O, a path or unix://PATH
                             (default /run/containerd/containerd.sock; CRI-O: /var/run/crio/crio.sock)
  --log-level LEVEL          trace, debug, info (default), warn, error, fatal or panic
  --sandboxes-dir DIR        where the shims' monitor sockets are (default /run/vc/sbs)
  --shim-timeout-ms MS       how long one shim (and the CRI) may take per scrape (default 3000)";

struct Args {
    listen: SocketAddr,
    level: Level,
    level_name: String,
    config: Config,
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    // Go's ":8090" is every address.
    let full = if s.starts_with(':') { format!("0.0.0.0{s}") } else { s.to_string() };
    full.parse().map_err(|_| format!("--listen-address {s:?}: not HOST:PORT with a numeric host (e.g. 127.0.0.1:8090)"))
}

fn parse_level(s: &str) -> Result<Level, String> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "trace" => Level::Trace,
        "debug" => Level::Debug,
        "info" => Level::Info,
        "warn" | "warning" => Level::Warning,
        "error" => Level::Error,
        "fatal" | "panic" => Level::Critical,
        _ => return Err(format!("--log-level {s:?}: use trace, debug, info, warn, error, fatal or panic")),
    })
}

fn parse_endpoint(s: &str) -> Result<PathBuf, String> {
    let path = match s.split_once("://") {
        None => s,
        Some(("unix", path)) => path,
        Some((scheme, _)) => {
            return Err(format!(
                "--runtime-endpoint {s:?}: {scheme}:// is not supported, only a unix socket (unix:///path)"
            ))
        }
    };
    if !path.starts_with('/') {
        return Err(format!(
            "--runtime-endpoint {s:?}: needs an absolute socket path (unix:///run/containerd/containerd.sock)"
        ));
    }
    Ok(PathBuf::from(path))
}

fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut out = Args {
        listen: "127.0.0.1:8090".parse().unwrap(),
        level: Level::Info,
        level_name: "info".into(),
        config: Config::default(),
    };
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let flag = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .ok_or_else(|| format!("unexpected argument {arg:?}"))?;
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        let mut value = || -> Result<String, String> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            i += 1;
            args.get(i).cloned().ok_or_else(|| format!("--{name} needs a value"))
        };
        match name {
            "listen-address" => out.listen = parse_listen(&value()?)?,
            "runtime-endpoint" => out.config.runtime_endpoint = parse_endpoint(&value()?)?,
            "log-level" => {
                let v = value()?;
                out.level = parse_level(&v)?;
                out.level_name = v;
            }
            "sandboxes-dir" => out.config.sandboxes_dir = PathBuf::from(value()?),
            "shim-timeout-ms" => {
                let v = value()?;
                let ms: u64 = v
                    .parse()
                    .ok()
                    .filter(|ms| (1..=600_000).contains(ms))
                    .ok_or_else(|| format!("--shim-timeout-ms {v:?}: a number of milliseconds, 1 to 600000"))?;
                out.config.shim_timeout = Duration::from_millis(ms);
            }
            _ => return Err(format!("unknown flag {arg:?}")),
        }
        i += 1;
    }
    Ok(out)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.as_slice(), [a] if a == "--version" || a == "version" || a == "-version") {
        println!("kata-monitor (podvisor)\n Version:\t{}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| matches!(a.as_str(), "-h" | "--help" | "-help")) {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match parse_args(&args) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("kata-monitor: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let decorator = slog_term::PlainSyncDecorator::new(std::io::stderr());
    let drain = slog_term::FullFormat::new(decorator).build().filter_level(args.level).fuse();
    let log = slog::Logger::root(drain, o!("name" => "kata-monitor", "pid" => std::process::id()));

    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kata-monitor: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("kata-monitor: listening on {}: {e} (choose another --listen-address)", args.listen);
                return ExitCode::FAILURE;
            }
        };
        info!(log, "announce"; "app" => "kata-monitor", "version" => env!("CARGO_PKG_VERSION"),
            "listen-address" => listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "runtime-endpoint" => args.config.runtime_endpoint.display().to_string(),
            "sandboxes-dir" => args.config.sandboxes_dir.display().to_string(),
            "log-level" => &args.level_name);
        let monitor = match Monitor::new(args.config, log.clone()) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("kata-monitor: {e}");
                return ExitCode::FAILURE;
            }
        };
        podvisor_monitor::serve(listener, monitor).await;
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Args, String> {
        parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn kata_flags_and_defaults() {
        let a = args(&[]).unwrap();
        assert_eq!(a.listen.to_string(), "127.0.0.1:8090");
        assert_eq!(a.config.runtime_endpoint, PathBuf::from("/run/containerd/containerd.sock"));
        assert_eq!(a.config.sandboxes_dir, PathBuf::from("/run/vc/sbs"));
        let a = args(&[
            "--listen-address",
            ":9000",
            "-runtime-endpoint=unix:///var/run/crio/crio.sock",
            "--log-level=debug",
            "--shim-timeout-ms",
            "250",
        ])
        .unwrap();
        assert_eq!(a.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(a.config.runtime_endpoint, PathBuf::from("/var/run/crio/crio.sock"));
        assert_eq!(a.level, Level::Debug);
        assert_eq!(a.config.shim_timeout, Duration::from_millis(250));
    }

    #[test]
    fn the_shipped_systemd_unit_runs_with_valid_flags() {
        let unit =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/kata-monitor.service")).unwrap();
        let joined = unit.replace("\\\n", " ");
        let exec = joined.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("no ExecStart");
        let mut words = exec.split_whitespace();
        assert_eq!(words.next(), Some("/usr/local/bin/kata-monitor"), "the path make install uses");
        let a = args(&words.collect::<Vec<_>>()).unwrap();
        assert_eq!(a.listen.to_string(), "127.0.0.1:8090");
        assert_eq!(a.config.runtime_endpoint, PathBuf::from("/run/containerd/containerd.sock"));
    }

    #[test]
    fn bad_flags_are_named() {
        for (argv, want) in [
            (&["--listen-address", "localhost"][..], "--listen-address"),
            (&["--runtime-endpoint", "tcp://1.2.3.4:1"][..], "only a unix socket"),
            (&["--runtime-endpoint", "crio.sock"][..], "absolute"),
            (&["--log-level", "loud"][..], "--log-level"),
            (&["--shim-timeout-ms", "0"][..], "--shim-timeout-ms"),
            (&["--log-level"][..], "needs a value"),
            (&["--frobnicate"][..], "unknown flag"),
            (&["stray"][..], "unexpected argument"),
        ] {
            let err = args(argv).err().unwrap();
            assert!(err.contains(want), "{argv:?}: {err}");
        }
    }
}
