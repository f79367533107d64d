//! `containerd-shim-kata-v2`: podvisor's shim binary.
//!
//! For now it answers the probes CRI-O makes at startup (`--version`, `features`) and runs the
//! host check (`check`). The task service arrives with the containerd integration.

use std::process::ExitCode;

use hypervisor::HostCheck;
use podvisor_shim::{config, VERSION};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["--version"] | ["-v"] | ["version"] => {
            println!("podvisor containerd shim (Rust): id: \"io.containerd.kata.v2\", version: {VERSION}");
            ExitCode::SUCCESS
        }
        ["features"] => {
            println!("{{\"ociVersionMin\":\"1.0.0\",\"ociVersionMax\":\"1.1.0\",\"annotations\":{{\"io.katacontainers.runtime\":\"podvisor\"}}}}");
            ExitCode::SUCCESS
        }
        ["check"] | ["check", "--config", _] => {
            let path = words.get(2).map(std::path::Path::new);
            let cfg = match config::load(path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("configuration: {e}");
                    return ExitCode::FAILURE;
                }
            };
            println!("configuration: {}", cfg.file.display());
            for w in &cfg.warnings {
                println!("warning: {w}");
            }
            let check = HostCheck::run(&cfg.hypervisor);
            println!("{check}");
            if check.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        _ => {
            eprintln!(
                "usage: containerd-shim-kata-v2 --version | features | check [--config FILE]\n\
                 (the containerd task service is not built yet)"
            );
            ExitCode::from(2)
        }
    }
}
