//! `kata-runtime env`: the configuration in effect, the components' paths and versions, and the
//! host facts (the KVM probe included), in the sections of Kata's `kata-runtime env` (Meta,
//! Runtime, Hypervisor, Image, Kernel, Initrd, Agent, Host). TOML, or JSON with `--json`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use hypervisor::host::{self, AccelChoice};
use hypervisor::HostCheck;
use serde::Serialize;

/// The format version of this output (bumped when fields change meaning).
pub const FORMAT_VERSION: &str = "1";
/// How long a component's `--version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// The whole output.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Env {
    pub meta: Meta,
    pub runtime: Runtime,
    pub hypervisor: Hypervisor,
    pub image: Image,
    pub kernel: Kernel,
    pub initrd: Initrd,
    pub agent: Agent,
    pub host: Host,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Meta {
    pub version: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Runtime {
    pub path: String,
    pub version: String,
    pub debug: bool,
    pub sandbox_cgroup_only: bool,
    pub internetworking_model: String,
    pub config: ConfigInfo,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ConfigInfo {
    pub path: String,
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Hypervisor {
    pub path: String,
    pub version: String,
    pub machine_type: String,
    pub accelerator: String,
    pub accelerator_in_use: String,
    pub accelerator_reason: String,
    #[serde(rename = "DefaultVCPUs")]
    pub default_vcpus: u32,
    #[serde(rename = "DefaultMaxVCPUs")]
    pub default_max_vcpus: u32,
    #[serde(rename = "MaxVCPUsInEffect")]
    pub max_vcpus_in_effect: u32,
    pub default_memory_mib: u64,
    pub memory_slots: u32,
    pub default_max_memory_mib: u64,
    #[serde(rename = "SharedFS")]
    pub shared_fs: String,
    #[serde(rename = "VirtioFSDaemon")]
    pub virtio_fs_daemon: String,
    #[serde(rename = "VirtioFSDaemonVersion")]
    pub virtio_fs_daemon_version: String,
    #[serde(rename = "VirtioFSCache")]
    pub virtio_fs_cache: String,
    pub vsock: String,
    pub vsock_daemon: String,
    pub vsock_daemon_version: String,
    pub debug: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Image {
    /// podvisor boots an initrd; there is no rootfs image.
    pub path: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Kernel {
    pub path: String,
    pub version: String,
    pub parameters: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Initrd {
    pub path: String,
    pub size_bytes: u64,
    pub compression: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Agent {
    pub debug: bool,
    pub debug_console_enabled: bool,
    pub dial_timeout_seconds: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Host {
    pub kernel: String,
    pub architecture: String,
    #[serde(rename = "VMContainerCapable")]
    pub vm_container_capable: bool,
    pub support_vsocks: bool,
    pub distro: Distro,
    #[serde(rename = "CPU")]
    pub cpu: Cpu,
    pub memory: Memory,
    #[serde(rename = "KVM")]
    pub kvm: Kvm,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Distro {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Cpu {
    pub vendor: String,
    pub model: String,
    #[serde(rename = "CPUs")]
    pub cpus: u32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Memory {
    pub total_kib: u64,
    pub free_kib: u64,
    pub available_kib: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Kvm {
    pub dev_kvm: bool,
    pub dev_kvm_openable: bool,
    pub kvm_pvm_module: bool,
    pub hardware_virtualization_flags: bool,
    pub usable: bool,
    pub reason: String,
    pub probe: Probe,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Probe {
    pub ran: bool,
    pub passed: bool,
    pub result: String,
    pub api_version: i64,
    #[serde(rename = "MaxVCPUs")]
    pub max_vcpus: u32,
    pub exits: Vec<String>,
    pub elapsed_ms: f64,
}

/// Collects the environment for the configuration `config` (default search path when `None`).
pub fn collect(config: Option<&Path>) -> Result<Env, String> {
    let cfg = crate::check::load_config(config)?;
    let q = &cfg.hypervisor;
    let check = HostCheck::run(q);
    let facts = &check.facts;
    let accel = AccelChoice::choose(q.accelerator, facts);
    let (in_use, reason) = match &accel {
        Ok(AccelChoice::Kvm) => ("kvm".to_string(), String::new()),
        Ok(AccelChoice::Tcg { reason }) => ("tcg".to_string(), reason.clone()),
        Err(e) => ("none".to_string(), e.clone()),
    };
    let wanted = q.max_vcpus(host::host_cpus());
    let max_in_effect = match &accel {
        Ok(a) => host::clamp_max_vcpus(wanted, a, facts.kvm_max_vcpus).0.max(q.default_vcpus),
        Err(_) => wanted,
    };
    let vsock_daemon = host::find_program(&q.vhost_user_vsock_daemon);
    let virtiofsd = host::find_program(&q.virtio_fs_daemon);
    let probe = match &check.kvm_probe {
        None => Probe {
            ran: false,
            passed: false,
            result: "not run: /dev/kvm cannot be opened".into(),
            api_version: 0,
            max_vcpus: 0,
            exits: Vec::new(),
            elapsed_ms: 0.0,
        },
        Some(p) => Probe {
            ran: true,
            passed: p.passed(),
            result: match &p.result {
                Ok(()) => "passed".into(),
                Err(e) => format!("failed: {e}"),
            },
            api_version: p.api_version.map_or(0, i64::from),
            max_vcpus: p.max_vcpus.unwrap_or(0),
            exits: p.exits.clone(),
            elapsed_ms: (p.elapsed.as_secs_f64() * 1e6).round() / 1e3,
        },
    };
    let kvm_usable = facts.kvm_usable();
    let uts = nix::sys::utsname::uname().map_err(|e| format!("uname: {e}"))?;
    let (distro_name, distro_version) = os_release();
    let (vendor, model) = cpu_model();
    let meminfo = |key: &str| meminfo_kib(key).unwrap_or(0);
    Ok(Env {
        meta: Meta { version: FORMAT_VERSION.into() },
        runtime: Runtime {
            path: std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
            version: podvisor_shim::VERSION.into(),
            debug: cfg.runtime.enable_debug,
            sandbox_cgroup_only: cfg.runtime.sandbox_cgroup_only,
            internetworking_model: format!("{:?}", cfg.runtime.internetworking_model).to_lowercase(),
            config: ConfigInfo { path: cfg.file.display().to_string(), warnings: cfg.warnings.clone() },
        },
        hypervisor: Hypervisor {
            path: q.path.display().to_string(),
            version: host::qemu_version(&q.path).unwrap_or_else(|e| format!("unknown: {e}")),
            machine_type: q.machine_type.clone(),
            accelerator: format!("{:?}", q.accelerator).to_lowercase(),
            accelerator_in_use: in_use,
            accelerator_reason: reason,
            default_vcpus: q.default_vcpus,
            default_max_vcpus: q.default_maxvcpus,
            max_vcpus_in_effect: max_in_effect,
            default_memory_mib: q.default_memory,
            memory_slots: q.memory_slots,
            default_max_memory_mib: q.default_maxmemory,
            shared_fs: "virtio-fs".into(),
            virtio_fs_daemon: path_or_missing(&q.virtio_fs_daemon, virtiofsd.as_deref()),
            virtio_fs_daemon_version: virtiofsd.as_deref().map_or("not found".into(), program_version),
            virtio_fs_cache: q.virtio_fs_cache.clone(),
            vsock: if facts.vhost_vsock { "vhost-vsock".into() } else { "hybrid vsock (vhost-user)".into() },
            vsock_daemon: path_or_missing(&q.vhost_user_vsock_daemon, vsock_daemon.as_deref()),
            vsock_daemon_version: vsock_daemon.as_deref().map_or("not found".into(), program_version),
            debug: q.enable_debug,
        },
        image: Image { path: String::new() },
        kernel: Kernel {
            path: q.kernel.display().to_string(),
            version: kernel_version(&q.kernel).unwrap_or_else(|e| format!("unknown: {e}")),
            parameters: q.kernel_params.clone(),
        },
        initrd: Initrd {
            path: q.initrd.display().to_string(),
            size_bytes: std::fs::metadata(&q.initrd).map(|m| m.len()).unwrap_or(0),
            compression: initrd_compression(&q.initrd),
        },
        agent: Agent {
            debug: cfg.agent.enable_debug,
            debug_console_enabled: debug_console_enabled(&cfg.file),
            dial_timeout_seconds: cfg.agent.dial_timeout.as_secs(),
        },
        host: Host {
            kernel: uts.release().to_string_lossy().into_owned(),
            architecture: uts.machine().to_string_lossy().into_owned(),
            vm_container_capable: check.passed(),
            support_vsocks: facts.vhost_vsock || vsock_daemon.is_some(),
            distro: Distro { name: distro_name, version: distro_version },
            cpu: Cpu { vendor, model, cpus: host::host_cpus() },
            memory: Memory {
                total_kib: meminfo("MemTotal"),
                free_kib: meminfo("MemFree"),
                available_kib: meminfo("MemAvailable"),
            },
            kvm: Kvm {
                dev_kvm: facts.dev_kvm,
                dev_kvm_openable: facts.dev_kvm_openable,
                kvm_pvm_module: facts.kvm_pvm,
                hardware_virtualization_flags: facts.hw_virt_flags,
                usable: kvm_usable.is_ok(),
                reason: kvm_usable.err().unwrap_or_default(),
                probe,
            },
        },
    })
}

/// Renders `env` as TOML or JSON.
pub fn render(env: &Env, json: bool) -> Result<String, String> {
    if json {
        serde_json::to_string_pretty(env).map_err(|e| e.to_string())
    } else {
        toml::to_string(env).map_err(|e| e.to_string())
    }
}

/// `kata-runtime env`.
pub fn run(config: Option<&Path>, json: bool) -> Result<ExitCode, String> {
    println!("{}", render(&collect(config)?, json)?);
    Ok(ExitCode::SUCCESS)
}

fn path_or_missing(configured: &Path, found: Option<&Path>) -> String {
    match found {
        Some(p) => p.display().to_string(),
        None => format!("{} (not found)", configured.display()),
    }
}

/// `[agent.kata] debug_console_enabled` read from the file itself.
pub fn debug_console_enabled(file: &Path) -> bool {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|d| d.get("agent")?.get("kata")?.get("debug_console_enabled")?.as_bool())
        .unwrap_or(false)
}

/// The first line of `<program> --version` (bounded in time), or why there is none.
pub fn program_version(program: &Path) -> String {
    let mut child = match Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return format!("unknown: {}: {e}", program.display()),
    };
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() < VERSION_TIMEOUT => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return format!("unknown: {} --version did not finish in {VERSION_TIMEOUT:?}", program.display());
            }
        }
    }
    match child.wait_with_output() {
        Ok(out) => {
            let text =
                String::from_utf8_lossy(if out.stdout.is_empty() { &out.stderr } else { &out.stdout }).to_string();
            text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("unknown: no output").to_string()
        }
        Err(e) => format!("unknown: {e}"),
    }
}

/// The kernel's version string: from a bzImage's setup header, or the `Linux version ...`
/// banner inside an uncompressed vmlinux.
pub fn kernel_version(path: &Path) -> Result<String, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if data.get(0x202..0x206) == Some(b"HdrS") {
        let ptr = u16::from_le_bytes([data[0x20e], data[0x20f]]) as usize + 0x200;
        let tail = data.get(ptr..).ok_or("bad setup header")?;
        let end = tail.iter().take(256).position(|&b| b == 0).unwrap_or(tail.len().min(256));
        return Ok(String::from_utf8_lossy(&tail[..end]).trim().to_string());
    }
    let at = memchr::memmem::find(&data, b"Linux version ").ok_or("no Linux version banner in the file")?;
    let tail = &data[at + "Linux version ".len()..];
    let end = tail.iter().take(256).position(|&b| b == 0 || b == b'\n').unwrap_or(tail.len().min(256));
    Ok(String::from_utf8_lossy(&tail[..end]).trim().to_string())
}

/// The initrd's compression from its magic bytes.
pub fn initrd_compression(path: &Path) -> String {
    use std::io::Read;
    let mut head = [0u8; 6];
    let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).unwrap_or(0);
    match &head[..n] {
        [0x1f, 0x8b, ..] => "gzip",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        [0x02, 0x21, 0x4c, 0x18, ..] => "lz4",
        [0xfd, b'7', b'z', b'X', b'Z', 0] => "xz",
        [b'0', b'7', b'0', b'7', b'0', ..] => "none (cpio)",
        [] => "unknown (unreadable)",
        _ => "unknown",
    }
    .to_string()
}

fn os_release() -> (String, String) {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    (get("NAME"), get("VERSION_ID"))
}

fn cpu_model() -> (String, String) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let get = |k: &str| {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    (get("vendor_id"), get("model name"))
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.split_whitespace().next()?.parse().ok())
}

/// The paths `env` names (for `collect`'s versions file).
pub fn component_paths(env: &Env) -> Vec<(&'static str, PathBuf)> {
    vec![
        ("qemu", PathBuf::from(&env.hypervisor.path)),
        ("virtiofsd", PathBuf::from(&env.hypervisor.virtio_fs_daemon)),
        ("vhost-device-vsock", PathBuf::from(&env.hypervisor.vsock_daemon)),
        ("kernel", PathBuf::from(&env.kernel.path)),
        ("initrd", PathBuf::from(&env.initrd.path)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bzimage_header_version() {
        let mut img = vec![0u8; 0x400];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        let v = b"6.1.0-56-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        img[0x300..0x300 + v.len()].copy_from_slice(v);
        let f = std::env::temp_dir().join(format!("kata-runtime-bz-{}", std::process::id()));
        std::fs::write(&f, &img).unwrap();
        assert!(kernel_version(&f).unwrap().starts_with("6.1.0-56-amd64 "));
        std::fs::write(&f, b"\x7fELF....Linux version 6.1.192 (gcc) #1\n\0rest").unwrap();
        assert_eq!(kernel_version(&f).unwrap(), "6.1.192 (gcc) #1");
        std::fs::write(&f, b"nothing").unwrap();
        assert!(kernel_version(&f).is_err());
        std::fs::write(&f, [0x1f, 0x8b, 8, 0]).unwrap();
        assert_eq!(initrd_compression(&f), "gzip");
        std::fs::remove_file(&f).unwrap();
        assert_eq!(initrd_compression(&f), "unknown (unreadable)");
    }

    #[test]
    fn version_of_a_program() {
        let v = program_version(Path::new("/bin/sh"));
        assert!(!v.is_empty());
        assert!(program_version(Path::new("/nonexistent/x")).starts_with("unknown: /nonexistent/x"));
    }

    #[test]
    fn console_setting_is_read_from_the_file() {
        let f = std::env::temp_dir().join(format!("kata-runtime-cfg-{}.toml", std::process::id()));
        std::fs::write(&f, "[agent.kata]\ndebug_console_enabled = true\n").unwrap();
        assert!(debug_console_enabled(&f));
        std::fs::write(&f, "[agent.kata]\nenable_debug = true\n").unwrap();
        assert!(!debug_console_enabled(&f));
        std::fs::remove_file(&f).unwrap();
    }
}
