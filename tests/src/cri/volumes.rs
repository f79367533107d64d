//! Volumes as the kubelet makes them: a loop device for raw block volumes and a
//! configMap-style directory whose `..data` symlink is swapped atomically.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::record_host_object;
use crate::containerd::run_with_timeout;

/// A loop device over a file, detached (and the file removed) on drop.
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// The backing file.
    pub file: PathBuf,
    attached: bool,
}

impl LoopDevice {
    /// Creates `file` (`size` bytes of zeros) and attaches it with `losetup -f --show`; the
    /// device is recorded in `record_dir` (a private containerd's directory) so that a later
    /// run detaches it if this process dies.
    pub fn attach(file: &Path, size: u64, record_dir: Option<&Path>) -> Self {
        let f = fs::File::create(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        f.set_len(size).unwrap();
        drop(f);
        let out =
            run_with_timeout(Command::new("losetup").args(["-f", "--show"]).arg(file), None, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("losetup: {e}"));
        assert!(out.status.success(), "losetup -f --show {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
        let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(printed.starts_with("/dev/loop"), "losetup -f --show printed {printed:?}");
        if let Some(d) = record_dir {
            record_host_object(d, "loop", &format!("{printed} {}", file.display()));
        }
        LoopDevice { device: PathBuf::from(printed), file: file.to_path_buf(), attached: true }
    }

    /// Detaches the device (`losetup -d`); fails the test if that fails.
    pub fn detach(&mut self) {
        if self.attached {
            let out = Command::new("losetup").arg("-d").arg(&self.device).output().expect("losetup -d");
            assert!(
                out.status.success(),
                "losetup -d {}: {}",
                self.device.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            self.attached = false;
        }
    }

    /// Whether `losetup` still lists the device for its file.
    pub fn is_attached(&self) -> bool {
        let out = Command::new("losetup").arg("-j").arg(&self.file).output();
        matches!(out, Ok(o) if !o.stdout.is_empty())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.attached {
            let _ = Command::new("losetup").arg("-d").arg(&self.device).output();
        }
        let _ = fs::remove_file(&self.file);
    }
}

/// A configMap volume directory laid out as the kubelet's atomic writer does:
/// `..<timestamp>/` holds the data, `..data -> ..<timestamp>`, and every key is a symlink
/// `<key> -> ..data/<key>`. An update writes a new timestamped directory, points a
/// `..data_tmp` symlink at it and renames that over `..data` (one atomic step), then removes
/// the old directory.
pub struct ConfigMapVolume {
    /// The volume directory (what the CRI mount's `host_path` names):
    /// `<root>/pods/<uid>/volumes/kubernetes.io~configmap/<name>`.
    pub dir: PathBuf,
    generation: u32,
    current: Option<PathBuf>,
    /// A secret: `dir` is a tmpfs of its own (unmounted on drop).
    tmpfs: bool,
}

impl ConfigMapVolume {
    /// Creates the volume under `root` with `data` (key, value pairs).
    pub fn create(root: &Path, pod_uid: &str, name: &str, data: &[(&str, &str)]) -> Self {
        Self::make(root, pod_uid, "kubernetes.io~configmap", name, data, false)
    }

    /// A secret volume: the same layout on a tmpfs mounted at
    /// `<root>/pods/<uid>/volumes/kubernetes.io~secret/<name>`, as the kubelet makes it.
    pub fn create_secret(root: &Path, pod_uid: &str, name: &str, data: &[(&str, &str)]) -> Self {
        Self::make(root, pod_uid, "kubernetes.io~secret", name, data, true)
    }

    fn make(root: &Path, pod_uid: &str, plugin: &str, name: &str, data: &[(&str, &str)], tmpfs: bool) -> Self {
        let dir = root.join("pods").join(pod_uid).join("volumes").join(plugin).join(name);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        if tmpfs {
            nix::mount::mount(
                Some("tmpfs"),
                &dir,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some("mode=0755,size=1m"),
            )
            .unwrap_or_else(|e| panic!("mount a tmpfs on {}: {e}", dir.display()));
        }
        let mut v = ConfigMapVolume { dir, generation: 0, current: None, tmpfs };
        v.update(data);
        for (key, _) in data {
            symlink(format!("..data/{key}"), v.dir.join(key)).unwrap();
        }
        v
    }

    /// Replaces the data atomically (see the type's documentation).
    pub fn update(&mut self, data: &[(&str, &str)]) {
        self.generation += 1;
        let ts = self.dir.join(format!("..2026_11_23_00_00_{:02}.{}", self.generation % 60, 100000 + self.generation));
        fs::create_dir(&ts).unwrap_or_else(|e| panic!("{}: {e}", ts.display()));
        for (key, value) in data {
            fs::write(ts.join(key), value).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = fs::remove_file(&tmp);
        symlink(ts.file_name().unwrap(), &tmp).unwrap();
        fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if let Some(old) = self.current.replace(ts) {
            fs::remove_dir_all(&old).unwrap();
        }
    }
}

impl Drop for ConfigMapVolume {
    fn drop(&mut self) {
        if self.tmpfs {
            let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
