//! Host capability checks shared by the shim (at VM start) and `check` commands: is KVM usable
//! for a stock guest kernel, which vsock path exists, are QEMU and the helper daemons present.

use std::path::{Path, PathBuf};

use crate::config::{Accelerator, QemuConfig};

/// Facts about the host that the accelerator choice depends on. Read from the real host by
/// [`HostFacts::probe`]; built by hand in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// `/dev/kvm` can be opened read-write by us.
    pub dev_kvm_openable: bool,
    /// `/sys/module/kvm_pvm` exists (a PVM host: KVM runs only PVM-enabled guest kernels).
    pub kvm_pvm: bool,
    /// `/proc/cpuinfo` lists `vmx` or `svm`.
    pub hw_virt_flags: bool,
    /// `/dev/vhost-vsock` exists.
    pub vhost_vsock: bool,
}

impl HostFacts {
    /// Reads the facts from this host.
    pub fn probe() -> HostFacts {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw_virt_flags =
            cpuinfo.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        let dev_kvm = Path::new("/dev/kvm").exists();
        let dev_kvm_openable = dev_kvm && std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        HostFacts {
            dev_kvm,
            dev_kvm_openable,
            kvm_pvm: Path::new("/sys/module/kvm_pvm").exists(),
            hw_virt_flags,
            vhost_vsock: Path::new("/dev/vhost-vsock").exists(),
        }
    }

    /// `Ok(())` when KVM can run a stock guest kernel, otherwise the reason it cannot.
    pub fn kvm_usable(&self) -> Result<(), String> {
        if !self.dev_kvm {
            return Err("/dev/kvm does not exist (no KVM on this host)".into());
        }
        if !self.dev_kvm_openable {
            return Err("/dev/kvm cannot be opened read-write (permissions)".into());
        }
        if self.kvm_pvm {
            return Err("/sys/module/kvm_pvm is present: this is a PVM host, where a stock guest \
                        kernel crawls and then dies with a KVM internal error"
                .into());
        }
        if !self.hw_virt_flags {
            return Err("/proc/cpuinfo has no vmx or svm flag (no hardware virtualization)".into());
        }
        Ok(())
    }
}

/// The accelerator chosen for a VM and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccelChoice {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation, with the reason KVM was not used.
    Tcg {
        /// Why not KVM.
        reason: String,
    },
}

impl AccelChoice {
    /// Chooses per the `accelerator` setting. `Err` carries a message naming the key and fix.
    pub fn choose(setting: Accelerator, facts: &HostFacts) -> Result<AccelChoice, String> {
        match (setting, facts.kvm_usable()) {
            (Accelerator::Tcg, _) => {
                Ok(AccelChoice::Tcg { reason: "accelerator = \"tcg\" in the configuration".into() })
            }
            (_, Ok(())) => Ok(AccelChoice::Kvm),
            (Accelerator::Auto, Err(why)) => Ok(AccelChoice::Tcg { reason: why }),
            (Accelerator::Kvm, Err(why)) => Err(format!(
                "KVM is required (accelerator = \"kvm\") but unusable: {why}; set accelerator = \
                 \"auto\" or \"tcg\" in [hypervisor.qemu] to allow software emulation"
            )),
        }
    }
}

/// One line of a host check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckItem {
    /// What was checked.
    pub name: String,
    /// `true` when this item does not prevent running VMs.
    pub ok: bool,
    /// The finding, in words.
    pub detail: String,
}

/// The result of checking the host against a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCheck {
    /// One entry per item, in a stable order.
    pub items: Vec<CheckItem>,
}

impl HostCheck {
    /// Checks the real host for `config`.
    pub fn run(config: &QemuConfig) -> HostCheck {
        let facts = HostFacts::probe();
        let mut items = Vec::new();
        let kvm = facts.kvm_usable();
        items.push(CheckItem {
            name: "kvm".into(),
            ok: true,
            detail: match &kvm {
                Ok(()) => "usable".into(),
                Err(why) => format!("unusable: {why}"),
            },
        });
        items.push(match AccelChoice::choose(config.accelerator, &facts) {
            Ok(AccelChoice::Kvm) => CheckItem { name: "accelerator".into(), ok: true, detail: "kvm".into() },
            Ok(AccelChoice::Tcg { reason }) => CheckItem {
                name: "accelerator".into(),
                ok: true,
                detail: format!("tcg (software emulation): {reason}"),
            },
            Err(e) => CheckItem { name: "accelerator".into(), ok: false, detail: e },
        });
        items.push(if facts.vhost_vsock {
            CheckItem { name: "vsock".into(), ok: true, detail: "vhost-vsock (/dev/vhost-vsock)".into() }
        } else {
            match find_program(&config.vhost_user_vsock_daemon) {
                Some(p) => CheckItem {
                    name: "vsock".into(),
                    ok: true,
                    detail: format!("hybrid vsock via vhost-user-vsock-pci and {} (no /dev/vhost-vsock)", p.display()),
                },
                None => CheckItem {
                    name: "vsock".into(),
                    ok: false,
                    detail: format!(
                        "no /dev/vhost-vsock and vhost_user_vsock_daemon {:?} not found; install it \
                         with `cargo install --locked vhost-device-vsock` or load vhost_vsock",
                        config.vhost_user_vsock_daemon
                    ),
                },
            }
        });
        items.push(match qemu_version(&config.path) {
            Ok(v) => CheckItem { name: "qemu".into(), ok: true, detail: format!("{} ({v})", config.path.display()) },
            Err(e) => CheckItem { name: "qemu".into(), ok: false, detail: e },
        });
        for (name, path) in [("kernel", &config.kernel), ("initrd", &config.initrd)] {
            items.push(CheckItem {
                name: name.into(),
                ok: path.is_file(),
                detail: if path.is_file() {
                    path.display().to_string()
                } else {
                    format!("{} not found; run `make install` or fix `{name}` in [hypervisor.qemu]", path.display())
                },
            });
        }
        items.push(match find_program(&config.virtio_fs_daemon) {
            Some(p) => CheckItem { name: "virtiofsd".into(), ok: true, detail: p.display().to_string() },
            None => CheckItem {
                name: "virtiofsd".into(),
                ok: false,
                detail: format!(
                    "{} not found; install it with `cargo install --locked --root /usr/local virtiofsd` \
                     or fix virtio_fs_daemon",
                    config.virtio_fs_daemon.display()
                ),
            },
        });
        HostCheck { items }
    }

    /// `true` when every item is fine.
    pub fn passed(&self) -> bool {
        self.items.iter().all(|i| i.ok)
    }
}

impl std::fmt::Display for HostCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for item in &self.items {
            writeln!(f, "{:<4} {:<12} {}", if item.ok { "ok" } else { "FAIL" }, item.name, item.detail)?;
        }
        write!(
            f,
            "verdict: {}",
            if self.passed() { "this host can run podvisor VMs" } else { "cannot run VMs (see FAIL lines)" }
        )
    }
}

/// Resolves a program: a path with a `/` is used as is, a bare name is looked up on `PATH`.
pub fn find_program(program: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &Path| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false);
    if program.components().count() > 1 || program.is_absolute() {
        return executable(program).then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| executable(p))
}

/// Runs `<qemu> --version` and returns its first line.
pub fn qemu_version(path: &Path) -> Result<String, String> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .output()
        .map_err(|e| format!("{}: {e}; install qemu-system-x86 or fix `path` in [hypervisor.qemu]", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .filter(|l| out.status.success() && l.contains("QEMU"))
        .map(|l| l.trim().to_string())
        .ok_or_else(|| format!("{} --version did not identify QEMU ({})", path.display(), out.status))
}

/// Host CPU count.
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

/// Host RAM in MiB (from `/proc/meminfo`).
pub fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(2048)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts { dev_kvm: true, dev_kvm_openable: true, kvm_pvm: false, hw_virt_flags: true, vhost_vsock: true }
    }

    #[test]
    fn kvm_host_uses_kvm() {
        assert_eq!(AccelChoice::choose(Accelerator::Auto, &facts()), Ok(AccelChoice::Kvm));
        assert_eq!(AccelChoice::choose(Accelerator::Kvm, &facts()), Ok(AccelChoice::Kvm));
    }

    #[test]
    fn pvm_host_falls_back_to_tcg_with_reason() {
        let f = HostFacts { kvm_pvm: true, hw_virt_flags: false, ..facts() };
        match AccelChoice::choose(Accelerator::Auto, &f).unwrap() {
            AccelChoice::Tcg { reason } => assert!(reason.contains("kvm_pvm"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let err = AccelChoice::choose(Accelerator::Kvm, &f).unwrap_err();
        assert!(err.contains("accelerator = \"auto\""), "{err}");
    }

    #[test]
    fn each_kvm_problem_has_its_reason() {
        let cases = [
            (HostFacts { dev_kvm: false, dev_kvm_openable: false, ..facts() }, "does not exist"),
            (HostFacts { dev_kvm_openable: false, ..facts() }, "cannot be opened"),
            (HostFacts { hw_virt_flags: false, ..facts() }, "no vmx or svm"),
        ];
        for (f, fragment) in cases {
            assert!(f.kvm_usable().unwrap_err().contains(fragment));
        }
    }

    #[test]
    fn forced_tcg_says_so() {
        match AccelChoice::choose(Accelerator::Tcg, &facts()).unwrap() {
            AccelChoice::Tcg { reason } => assert!(reason.contains("accelerator = \"tcg\"")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn find_program_uses_path_for_bare_names() {
        assert!(find_program(Path::new("sh")).is_some());
        assert!(find_program(Path::new("/nonexistent/qemu")).is_none());
        assert!(find_program(Path::new("no-such-program-podvisor")).is_none());
    }
}
