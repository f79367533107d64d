//! A systemd journal for the duration of a test: the running journald if the host has one,
//! otherwise a private `systemd-journald` (and a `/dev/log` link to it for syslog writers such
//! as virtiofsd), stopped and removed again on drop. Used by `tests/containerd.rs` and
//! `tests/kata_runtime.rs`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The journal; dropping it stops what [`Journal::start`] started.
pub struct Journal {
    child: Option<std::process::Child>,
    created: Vec<PathBuf>,
}

impl Journal {
    /// Uses the host's journald or starts one. Panics naming what is missing.
    pub fn start() -> Journal {
        let socket = Path::new("/run/systemd/journal/socket");
        let mut j = Journal { child: None, created: Vec::new() };
        if !socket.exists() {
            let journald = Path::new("/lib/systemd/systemd-journald");
            assert!(
                journald.exists(),
                "{} is missing: install Debian's systemd package (scripts/deps.sh does)",
                journald.display()
            );
            for p in ["/run/systemd", "/run/systemd/journal", "/run/log"] {
                if !Path::new(p).exists() {
                    j.created.push(p.into());
                }
            }
            j.child = Some(
                Command::new(journald)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start systemd-journald"),
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while !socket.exists() {
                assert!(Instant::now() < deadline, "systemd-journald did not create {}", socket.display());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let dev_log = Path::new("/dev/log");
        if fs::symlink_metadata(dev_log).is_err() {
            std::os::unix::fs::symlink("/run/systemd/journal/dev-log", dev_log).expect("link /dev/log to journald");
            j.created.push(dev_log.into());
        }
        j
    }

    /// `journalctl -o cat` lines for `args`, retried for up to 10 s until `want` shows.
    pub fn lines(&self, args: &[&str], want: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("journalctl")
                .args(["--no-pager", "-o", "cat"])
                .args(args)
                .output()
                .expect("run journalctl");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains(want) || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deepest first; a journal socket left without a listener would make writers fail.
        for p in self.created.iter().rev() {
            if p.is_dir() {
                let _ = fs::remove_dir_all(p);
            } else {
                let _ = fs::remove_file(p);
            }
        }
    }
}
