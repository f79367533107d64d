//! Guest facts and resources in sysfs/procfs: memory block size, onlining hot-added memory and
//! CPUs, the clock (metrics: metrics.rs). The sysfs root is a parameter so tests run on a fake tree.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors touching guest resources.
#[derive(Debug)]
pub struct GuestError(pub String);

impl std::fmt::Display for GuestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> GuestError {
    move |e| GuestError(format!("{what}: {e}"))
}

/// The guest's `/sys` (or a fake one).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs { root: PathBuf::from("/sys") }
    }
}

impl Sysfs {
    /// A sysfs rooted elsewhere (tests).
    #[cfg(test)]
    pub fn at(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs { root: root.into() }
    }

    fn memory_dir(&self) -> PathBuf {
        self.root.join("devices/system/memory")
    }

    fn cpu_dir(&self) -> PathBuf {
        self.root.join("devices/system/cpu")
    }

    /// `block_size_bytes` (hex in sysfs).
    pub fn memory_block_size(&self) -> Result<u64, GuestError> {
        let p = self.memory_dir().join("block_size_bytes");
        let text = std::fs::read_to_string(&p).map_err(io(p.display()))?;
        u64::from_str_radix(text.trim().trim_start_matches("0x"), 16)
            .map_err(|e| GuestError(format!("{}: {e}: {text:?}", p.display())))
    }

    /// Whether the kernel offers the memory `probe` interface.
    pub fn memory_probe_supported(&self) -> bool {
        self.memory_dir().join("probe").exists()
    }

    /// Onlines every offline memory block; returns how many were onlined.
    pub fn online_memory(&self) -> Result<u32, GuestError> {
        let mut n = 0;
        for dir in entries_with_prefix(&self.memory_dir(), "memory")? {
            let state = dir.join("state");
            let Ok(s) = std::fs::read_to_string(&state) else { continue };
            if s.trim() == "offline" {
                // Movable first, so that the memory can be unplugged again; the kernel refuses
                // it for blocks that must stay in ZONE_NORMAL, and then plain online is used.
                if std::fs::write(&state, "online_movable").is_err() {
                    std::fs::write(&state, "online").map_err(io(format!("online {}", state.display())))?;
                }
                n += 1;
            }
        }
        Ok(n)
    }

    /// Onlines offline CPUs until `wanted` more are online or none is left; returns how many.
    pub fn online_cpus(&self, wanted: u32) -> Result<u32, GuestError> {
        let mut n = 0;
        for dir in entries_with_prefix(&self.cpu_dir(), "cpu")? {
            if wanted != 0 && n >= wanted {
                break;
            }
            let online = dir.join("online");
            let Ok(s) = std::fs::read_to_string(&online) else { continue };
            if s.trim() == "0" {
                std::fs::write(&online, "1").map_err(io(format!("online {}", online.display())))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Onlines CPUs, retrying for up to `wait` until `wanted` came online (hot-added CPUs appear
    /// in sysfs a moment after QEMU's `device_add` returns).
    pub fn online_cpus_waiting(&self, wanted: u32, wait: Duration) -> Result<u32, GuestError> {
        let deadline = std::time::Instant::now() + wait;
        let mut total = 0;
        loop {
            total += self.online_cpus(wanted.saturating_sub(total))?;
            if total >= wanted || std::time::Instant::now() >= deadline {
                return Ok(total);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Subdirectories `<prefix><number>` of `dir`, sorted by number.
fn entries_with_prefix(dir: &Path, prefix: &str) -> Result<Vec<PathBuf>, GuestError> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io(dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix(prefix)?.parse::<u64>().ok()?;
            Some((n, e.path()))
        })
        .collect();
    v.sort();
    Ok(v.into_iter().map(|(_, p)| p).collect())
}

/// Sets the realtime clock.
pub fn set_time(sec: i64, usec: i64) -> Result<(), GuestError> {
    let ts = nix::sys::time::TimeSpec::new(sec, usec * 1000);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| GuestError(format!("clock_settime({sec}, {usec}us): {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs() -> (PathBuf, Sysfs) {
        let root = std::env::temp_dir().join(format!(
            "podvisor-agent-sysfs-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let mem = root.join("devices/system/memory");
        for (i, state) in [(0, "online"), (1, "offline"), (10, "offline")] {
            std::fs::create_dir_all(mem.join(format!("memory{i}"))).unwrap();
            std::fs::write(mem.join(format!("memory{i}/state")), format!("{state}\n")).unwrap();
        }
        std::fs::write(mem.join("block_size_bytes"), "8000000\n").unwrap();
        let cpu = root.join("devices/system/cpu");
        std::fs::create_dir_all(cpu.join("cpu0")).unwrap();
        for (i, on) in [(1, "0"), (2, "0"), (3, "1")] {
            std::fs::create_dir_all(cpu.join(format!("cpu{i}"))).unwrap();
            std::fs::write(cpu.join(format!("cpu{i}/online")), on).unwrap();
        }
        std::fs::create_dir_all(cpu.join("cpufreq")).unwrap();
        (root.clone(), Sysfs::at(root))
    }

    #[test]
    fn block_size_is_hex() {
        let (root, s) = fake_sysfs();
        assert_eq!(s.memory_block_size().unwrap(), 128 << 20);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn onlines_offline_memory_and_cpus() {
        let (root, s) = fake_sysfs();
        assert_eq!(s.online_memory().unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(root.join("devices/system/memory/memory10/state")).unwrap(),
            "online_movable"
        );
        assert_eq!(s.online_memory().unwrap(), 0);
        assert_eq!(s.online_cpus(1).unwrap(), 1);
        assert_eq!(std::fs::read_to_string(root.join("devices/system/cpu/cpu1/online")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(root.join("devices/system/cpu/cpu2/online")).unwrap(), "0");
        assert_eq!(s.online_cpus(0).unwrap(), 1);
        std::fs::remove_dir_all(root).unwrap();
    }
}
