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
    /// The outcome of the KVM probe ([`crate::kvm_probe`]) when it was run: `Err` names the
    /// step that failed. `None`: not run (only the cheap facts above were read).
    pub kvm_probe: Option<Result<(), String>>,
    /// `KVM_CAP_MAX_VCPUS`, when `/dev/kvm` could be opened and it was asked.
    pub kvm_max_vcpus: Option<u32>,
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
            kvm_probe: None,
            kvm_max_vcpus: None,
        }
    }

    /// [`HostFacts::probe`] plus the KVM probe (a one-vCPU VM running a few instructions, bounded
    /// by `timeout`) when `/dev/kvm` can be opened. Returns the probe's details too.
    pub fn probe_with_kvm(timeout: std::time::Duration) -> (HostFacts, Option<crate::kvm_probe::KvmProbe>) {
        let mut facts = HostFacts::probe();
        if !facts.dev_kvm_openable {
            return (facts, None);
        }
        let p = crate::kvm_probe::probe(timeout);
        facts.kvm_probe = Some(p.result.clone());
        facts.kvm_max_vcpus = p.max_vcpus;
        (facts, Some(p))
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
        if let Some(Err(why)) = &self.kvm_probe {
            return Err(format!("the KVM probe (one vCPU running a few instructions) failed: {why}"));
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
    /// The facts the check was made from (the KVM probe's outcome included).
    pub facts: HostFacts,
    /// The KVM probe's details, when `/dev/kvm` could be opened.
    pub kvm_probe: Option<crate::kvm_probe::KvmProbe>,
}

impl HostCheck {
    /// Checks the real host for `config`, running the KVM probe (bounded by
    /// [`crate::kvm_probe::DEFAULT_TIMEOUT`]) when `/dev/kvm` can be opened.
    pub fn run(config: &QemuConfig) -> HostCheck {
        let (facts, kvm_probe) = HostFacts::probe_with_kvm(crate::kvm_probe::DEFAULT_TIMEOUT);
        let mut items = Vec::new();
        items.push(CheckItem {
            name: "kvm-probe".into(),
            ok: true,
            detail: match &kvm_probe {
                None => "not run: /dev/kvm cannot be opened".into(),
                Some(p) => describe_probe(p),
            },
        });
        let kvm = facts.kvm_usable();
        items.push(CheckItem {
            name: "kvm".into(),
            ok: true,
            detail: match (&kvm, &facts.kvm_probe) {
                (Ok(()), _) => "usable".into(),
                (Err(why), Some(Ok(()))) => format!(
                    "unusable: {why} (the probe's few real-mode instructions do run: they are not a kernel boot)"
                ),
                (Err(why), _) => format!("unusable: {why}"),
            },
        });
        let accel = AccelChoice::choose(config.accelerator, &facts);
        items.push(match &accel {
            Ok(AccelChoice::Kvm) => CheckItem { name: "accelerator".into(), ok: true, detail: "kvm".into() },
            Ok(AccelChoice::Tcg { reason }) => CheckItem {
                name: "accelerator".into(),
                ok: true,
                detail: format!("tcg (software emulation): {reason}"),
            },
            Err(e) => CheckItem { name: "accelerator".into(), ok: false, detail: e.clone() },
        });
        let wanted = config.max_vcpus(host_cpus());
        items.push(CheckItem {
            name: "max-vcpus".into(),
            ok: true,
            detail: match (&accel, facts.kvm_max_vcpus) {
                (Ok(AccelChoice::Kvm), Some(cap)) if wanted > cap => format!(
                    "default_maxvcpus resolves to {wanted}, above KVM_CAP_MAX_VCPUS {cap}: VMs get maxcpus={cap}"
                ),
                (Ok(AccelChoice::Kvm), Some(cap)) => format!("{wanted} (KVM_CAP_MAX_VCPUS {cap})"),
                (_, Some(cap)) => format!("{wanted} (TCG; KVM_CAP_MAX_VCPUS {cap} does not apply)"),
                (_, None) => format!("{wanted}"),
            },
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
        HostCheck { items, facts, kvm_probe }
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

/// The probe in one line: what ran, the exits, the time, and the verdict.
pub fn describe_probe(p: &crate::kvm_probe::KvmProbe) -> String {
    let mut s = match &p.result {
        Ok(()) => "passed".to_string(),
        Err(why) => format!("failed: {why}"),
    };
    if let Some(v) = p.api_version {
        s.push_str(&format!("; API version {v}"));
    }
    if let Some(n) = p.max_vcpus {
        s.push_str(&format!("; KVM_CAP_MAX_VCPUS {n}"));
    }
    if !p.exits.is_empty() {
        s.push_str(&format!("; exits: {}", p.exits.join(", ")));
    }
    s.push_str(&format!("; {:.1} ms", p.elapsed.as_secs_f64() * 1000.0));
    s
}

/// `max` bounded by `KVM_CAP_MAX_VCPUS` when KVM is the accelerator: the clamped value and, when
/// it had to be lowered, a warning naming the key.
pub fn clamp_max_vcpus(max: u32, accel: &AccelChoice, kvm_max_vcpus: Option<u32>) -> (u32, Option<String>) {
    match (accel, kvm_max_vcpus) {
        (AccelChoice::Kvm, Some(cap)) if cap > 0 && max > cap => (
            cap,
            Some(format!(
                "default_maxvcpus resolves to {max} vCPUs but KVM_CAP_MAX_VCPUS is {cap}; using maxcpus={cap} \
                 (lower default_maxvcpus in [hypervisor.qemu] to silence this)"
            )),
        ),
        _ => (max, None),
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
        HostFacts {
            dev_kvm: true,
            dev_kvm_openable: true,
            kvm_pvm: false,
            hw_virt_flags: true,
            vhost_vsock: true,
            kvm_probe: None,
            kvm_max_vcpus: None,
        }
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
            (HostFacts { kvm_probe: Some(Err("KVM_RUN: EIO".into())), ..facts() }, "probe"),
        ];
        for (f, fragment) in cases {
            assert!(f.kvm_usable().unwrap_err().contains(fragment));
        }
    }

    #[test]
    fn max_vcpus_is_clamped_only_under_kvm() {
        assert_eq!(clamp_max_vcpus(8, &AccelChoice::Kvm, Some(4)).0, 4);
        assert!(clamp_max_vcpus(8, &AccelChoice::Kvm, Some(4)).1.unwrap().contains("default_maxvcpus"));
        assert_eq!(clamp_max_vcpus(4, &AccelChoice::Kvm, Some(4)), (4, None));
        assert_eq!(clamp_max_vcpus(8, &AccelChoice::Kvm, None), (8, None));
        assert_eq!(clamp_max_vcpus(8, &AccelChoice::Tcg { reason: "x".into() }, Some(4)), (8, None));
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
