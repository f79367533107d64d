//! `kata-runtime check`: the host check of the hypervisor crate (the KVM probe included), for the
//! configuration in effect. `containerd-shim-kata-v2 check` prints the same check.

use std::path::Path;
use std::process::ExitCode;

use hypervisor::HostCheck;

/// Loads the configuration (`--config`, `KATA_CONF_FILE`, default paths).
pub fn load_config(config: Option<&Path>) -> Result<podvisor_shim::config::Config, String> {
    podvisor_shim::config::load(config).map_err(|e| format!("configuration: {e}"))
}

/// Runs the check and prints it; exit status 1 when the host cannot run VMs.
pub fn run(config: Option<&Path>, verbose: bool) -> Result<ExitCode, String> {
    let cfg = load_config(config)?;
    println!("configuration: {}", cfg.file.display());
    for w in &cfg.warnings {
        println!("warning: {w}");
    }
    if let Some(remote) = &cfg.remote {
        return Ok(check_remote(remote));
    }
    let check = HostCheck::run(&cfg.hypervisor);
    if verbose {
        print!("{}", facts_text(&check));
    }
    println!("{check}");
    Ok(if check.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Peer pods: prints [`hypervisor::remote::check`]; exit status 1 when the service does not answer.
pub fn check_remote(remote: &hypervisor::RemoteConfig) -> ExitCode {
    let (ok, text) = hypervisor::remote::check(remote);
    print!("{text}");
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The facts behind the verdict, one `fact` line each.
pub fn facts_text(check: &HostCheck) -> String {
    let f = &check.facts;
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("fact {k:<18} {v}\n"));
    line(
        "/dev/kvm",
        if !f.dev_kvm {
            "absent".into()
        } else if f.dev_kvm_openable {
            "read-write".into()
        } else {
            "not openable".into()
        },
    );
    line("kvm_pvm module", if f.kvm_pvm { "present (/sys/module/kvm_pvm)".into() } else { "absent".into() });
    line("vmx/svm flags", if f.hw_virt_flags { "present".into() } else { "absent from /proc/cpuinfo".into() });
    line("/dev/vhost-vsock", if f.vhost_vsock { "present".into() } else { "absent".into() });
    match &check.kvm_probe {
        None => line("kvm probe", "not run".into()),
        Some(p) => {
            line("kvm api version", p.api_version.map_or("-".into(), |v| v.to_string()));
            line("KVM_CAP_MAX_VCPUS", p.max_vcpus.map_or("-".into(), |v| v.to_string()));
            line("kvm probe exits", if p.exits.is_empty() { "none".into() } else { p.exits.join(", ") });
            line(
                "kvm probe result",
                match &p.result {
                    Ok(()) => "passed".into(),
                    Err(e) => format!("failed: {e}"),
                },
            );
            line("kvm probe time", format!("{:.2} ms", p.elapsed.as_secs_f64() * 1000.0));
        }
    }
    s
}
