//! `kata-runtime`: podvisor's operator CLI, with Kata's command names.
//!
//! - `check` (`kata-check`): can this host run podvisor VMs (the KVM probe included)?
//! - `env [--json]`: the configuration in effect, component paths and versions, host facts.
//! - `metrics <sandbox-id>`: the pod's Prometheus metrics from its shim's monitor socket.
//! - `exec <sandbox-id>`: a shell in the guest through the agent's debug console.
//! - `collect [--sandbox ID] -o FILE.tar.gz`: a support archive (secrets redacted).

mod check;
mod collect;
mod env;
mod exec;
mod http;
mod redact;
mod sandbox;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// kata-runtime: podvisor's operator CLI (Kata's command names).
#[derive(Debug, Parser)]
#[command(name = "kata-runtime", version = podvisor_shim::VERSION, about)]
pub struct Cli {
    /// The configuration file (default: KATA_CONF_FILE, then
    /// /etc/kata-containers/configuration.toml, then
    /// /usr/share/defaults/kata-containers/configuration.toml).
    #[arg(long = "config", visible_alias = "kata-config", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Checks that this host can run podvisor VMs: KVM (a real probe), the accelerator in use,
    /// vsock, QEMU, virtiofsd, kernel and initrd.
    #[command(visible_alias = "kata-check")]
    Check {
        /// Also print the host facts behind the verdict and the KVM probe's steps.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Shows the configuration in effect, component paths and versions, and host facts
    /// (TOML, or JSON with --json).
    #[command(visible_alias = "kata-env")]
    Env {
        /// JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
    /// Prints the sandbox's metrics (Prometheus text) from its shim.
    Metrics {
        /// The sandbox id.
        sandbox_id: String,
    },
    /// Opens a shell in the sandbox's guest through the agent's debug console
    /// (`[agent.kata] debug_console_enabled = true`).
    Exec {
        /// The sandbox id.
        sandbox_id: String,
        /// The guest vsock port of the debug console.
        #[arg(short = 'p', long = "kata-debug-port", default_value_t = exec::DEFAULT_DEBUG_PORT)]
        port: u32,
    },
    /// Writes a support archive (configuration with secrets redacted, env, versions, and per
    /// pod: journal lines, metrics, QEMU command line).
    Collect {
        /// Only this sandbox (default: every sandbox on the node).
        #[arg(long)]
        sandbox: Option<String>,
        /// The archive to write (.tar.gz).
        #[arg(short, long, value_name = "FILE.tar.gz")]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    // Output piped into `head` ends quietly, as other command-line tools do.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Check { verbose } => check::run(cli.config.as_deref(), *verbose),
        Command::Env { json } => env::run(cli.config.as_deref(), *json),
        Command::Metrics { sandbox_id } => sandbox::metrics(sandbox_id),
        Command::Exec { sandbox_id, port } => exec::run(sandbox_id, *port),
        Command::Collect { sandbox, output } => collect::run(cli.config.as_deref(), sandbox.as_deref(), output),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kata-runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kata-runtime").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn check_and_its_kata_alias() {
        assert!(matches!(parse(&["check"]).unwrap().command, Command::Check { verbose: false }));
        assert!(matches!(parse(&["kata-check", "--verbose"]).unwrap().command, Command::Check { verbose: true }));
        let c = parse(&["--config", "/x.toml", "check", "-v"]).unwrap();
        assert_eq!(c.config.as_deref(), Some(std::path::Path::new("/x.toml")));
        let c = parse(&["check", "--kata-config", "/y.toml"]).unwrap();
        assert_eq!(c.config.as_deref(), Some(std::path::Path::new("/y.toml")));
    }

    #[test]
    fn env_json_flag() {
        assert!(matches!(parse(&["env"]).unwrap().command, Command::Env { json: false }));
        assert!(matches!(parse(&["env", "--json"]).unwrap().command, Command::Env { json: true }));
    }

    #[test]
    fn sandbox_commands_need_an_id() {
        for cmd in ["metrics", "exec"] {
            let e = parse(&[cmd]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument, "{cmd}");
            assert!(e.to_string().contains("SANDBOX_ID"), "{e}");
        }
        match parse(&["exec", "abc"]).unwrap().command {
            Command::Exec { sandbox_id, port } => assert_eq!((sandbox_id.as_str(), port), ("abc", 1026)),
            other => panic!("{other:?}"),
        }
        match parse(&["exec", "--kata-debug-port", "2000", "abc"]).unwrap().command {
            Command::Exec { port, .. } => assert_eq!(port, 2000),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn collect_needs_an_output() {
        let e = parse(&["collect"]).unwrap_err();
        assert!(e.to_string().contains("--output"), "{e}");
        match parse(&["collect", "--sandbox", "s1", "-o", "/tmp/a.tar.gz"]).unwrap().command {
            Command::Collect { sandbox, output } => {
                assert_eq!(sandbox.as_deref(), Some("s1"));
                assert_eq!(output, PathBuf::from("/tmp/a.tar.gz"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_command_is_refused() {
        let e = parse(&["frobnicate"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::InvalidSubcommand);
    }
}
