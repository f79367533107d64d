//! PID 1 duties: the console, the pseudo file systems, kernel modules (the boot list, then the
//! deferred list in the background; everything else the kernel loads on demand through
//! `modprobe`), the loopback interface, and powering off (never a kernel panic loop) when
//! something fatal happens.

use std::os::fd::AsRawFd;
use std::path::Path;

use nix::mount::{mount, MsFlags};

/// An error during guest initialisation; fatal for PID 1.
#[derive(Debug)]
pub struct InitError(pub String);

impl std::fmt::Display for InitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail(what: impl std::fmt::Display, e: impl std::fmt::Display) -> InitError {
    InitError(format!("{what}: {e}"))
}

/// Mounts devtmpfs on /dev and makes /dev/console our stdin, stdout and stderr. The kernel gives
/// an initramfs init no console when the archive has no /dev/console node.
pub fn setup_console() -> Result<(), InitError> {
    mkdir("/dev")?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .map_err(|e| fail("open /dev/console", e))?;
    for fd in 0..3 {
        nix::unistd::dup2(console.as_raw_fd(), fd).map_err(|e| fail("dup2 /dev/console", e))?;
    }
    Ok(())
}

/// Mounts /proc, /sys, /run, /tmp, /dev/pts, /dev/shm and the cgroup2 hierarchy.
pub fn mount_filesystems() -> Result<(), InitError> {
    let nosuid_noexec_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    let table: &[(&str, &str, &str, MsFlags, Option<&str>)] = &[
        ("proc", "/proc", "proc", nosuid_noexec_nodev, None),
        ("sysfs", "/sys", "sysfs", nosuid_noexec_nodev, None),
        ("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755")),
        ("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        ("shm", "/dev/shm", "tmpfs", nosuid_noexec_nodev, Some("mode=1777")),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid_noexec_nodev, None),
    ];
    for (src, target, fstype, flags, data) in table {
        mkdir(target)?;
        mount_fs(src, target, fstype, *flags, *data)?;
    }
    Ok(())
}

fn mkdir(path: &str) -> Result<(), InitError> {
    std::fs::create_dir_all(path).map_err(|e| fail(format!("mkdir {path}"), e))
}

fn mount_fs(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<(), InitError> {
    mount(Some(src), target, Some(fstype), flags, data).map_err(|e| fail(format!("mount {fstype} on {target}"), e))
}

/// Reads `/lib/modules/<release>/load-order` (one path per line, relative to that directory).
pub fn module_load_order(modules_dir: &Path) -> Result<Vec<std::path::PathBuf>, InitError> {
    let list = modules_dir.join("load-order");
    let text = std::fs::read_to_string(&list).map_err(|e| fail(format!("read {}", list.display()), e))?;
    Ok(parse_load_order(&text).into_iter().map(|rel| modules_dir.join(rel)).collect())
}

/// Non-empty, non-comment lines of a load-order file.
pub fn parse_load_order(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect()
}

/// Loads each module with finit_module, in order. Already-loaded modules are fine.
pub fn load_modules(paths: &[std::path::PathBuf]) -> Result<usize, InitError> {
    for path in paths {
        let file = std::fs::File::open(path).map_err(|e| fail(format!("open module {}", path.display()), e))?;
        match nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(fail(format!("load module {}", path.display()), e)),
        }
    }
    Ok(paths.len())
}

/// Loads the modules named in `<modules_dir>/load-deferred` (one name per line, `#` comments),
/// with their dependencies as modprobe resolves them, on a background thread at nice 19, so that
/// the boot path never waits for them and they only take the CPU nobody else wants. These are the
/// modules nothing in the kernel requests on demand (iptables-legacy's `ip_tables`, which it
/// would load with its own modprobe in the container's mount namespace). Failures are logged,
/// never fatal; a missing list loads nothing.
pub fn load_deferred_modules(modules_dir: &Path, log: slog::Logger) {
    let dir = modules_dir.to_path_buf();
    let thread_log = log.clone();
    let spawned = std::thread::Builder::new().name("deferred-modules".into()).spawn(move || {
        let log = thread_log;
        // SAFETY: setpriority with PRIO_PROCESS and this thread's id changes only this thread's
        // nice value (threads are tasks on Linux); no memory is passed.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
        }
        let started = std::time::Instant::now();
        let list = dir.join("load-deferred");
        let names = match std::fs::read_to_string(&list) {
            Ok(text) => parse_load_order(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                let file = list.display().to_string();
                slog::warn!(log, "deferred kernel modules: cannot read the list"; "file" => file, "error" => %e);
                return;
            }
        };
        let index = match crate::modprobe::Index::load(&dir) {
            Ok(i) => i,
            Err(e) => {
                slog::warn!(log, "deferred kernel modules: no module index"; "error" => %e);
                return;
            }
        };
        let mut loaded = Vec::new();
        for name in &names {
            match crate::modprobe::probe(&index, name, "") {
                Ok(crate::modprobe::Outcome::Loaded(mods)) => loaded.extend(mods),
                Ok(crate::modprobe::Outcome::Builtin(_)) => {}
                Err(e) => slog::warn!(log, "deferred kernel module not loaded"; "module" => name, "error" => %e),
            }
        }
        slog::info!(log, "deferred kernel modules loaded"; "modules" => loaded.join(" "),
            "elapsed_ms" => started.elapsed().as_millis() as u64);
    });
    if let Err(e) = spawned {
        slog::warn!(log, "deferred kernel modules: cannot start a thread"; "error" => %e);
    }
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
}

/// Brings the loopback interface up.
pub fn loopback_up() -> Result<(), InitError> {
    // SAFETY: plain socket/ioctl calls on a local ifreq; the fd is closed by OwnedFd.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(fail("socket for lo", std::io::Error::last_os_error()));
        }
        let _guard: std::os::fd::OwnedFd = std::os::fd::FromRawFd::from_raw_fd(fd);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            return Err(fail("SIOCGIFFLAGS lo", std::io::Error::last_os_error()));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req) < 0 {
            return Err(fail("SIOCSIFFLAGS lo up", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Prints the cause on the console and powers the guest off. Never returns.
pub fn fatal(cause: &str) -> ! {
    eprintln!("kata-agent: FATAL: {cause}; powering off");
    power_off()
}

/// Flushes file systems and powers off (or exits when not PID 1).
pub fn power_off() -> ! {
    nix::unistd::sync();
    if nix::unistd::getpid().as_raw() == 1 {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_order_skips_blanks_and_comments() {
        let text = "# generated\nkernel/drivers/virtio/virtio_ring.ko\n\n kernel/drivers/virtio/virtio.ko \n";
        assert_eq!(
            parse_load_order(text),
            vec!["kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko"]
        );
    }

    #[test]
    fn missing_load_order_names_the_file() {
        let err = module_load_order(Path::new("/nonexistent/modules")).unwrap_err();
        assert!(err.0.contains("/nonexistent/modules/load-order"), "{err}");
    }
}
