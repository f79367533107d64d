//! Leak checks scoped to one test: processes, mounts, run directories, FIFOs and cgroups that
//! name one of the test's own ids (or its private directory). Tests run in parallel, so nothing
//! here ever looks at "any QEMU on the machine".

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Programs that must not outlive a test's containers (argv[0] contains one of these).
pub const TRACKED_PROGRAMS: &[&str] = &[
    "containerd-shim-kata-v2",
    "qemu-system",
    "virtiofsd",
    "vhost-device-vsock",
    // runc's shim and runc itself: the harness is validated with io.containerd.runc.v2.
    "containerd-shim-runc-v2",
    "runc",
];

/// Where the shim keeps per-sandbox state (`vm/<id>/`, `shared/sandboxes/<id>/`).
pub const KATA_RUN_DIR: &str = "/run/kata-containers";

/// Where `ctr` creates its stdio FIFOs (`<random>/<id>-stdout`).
pub const CTR_FIFO_DIR: &str = "/run/containerd/fifo";

/// How long teardown may take before a leftover counts as a leak.
pub const GRACE: Duration = Duration::from_secs(10);

/// Where containerd-style shims put their socket: `/run/containerd/s/<sha256 of
/// "<address>/<namespace>/<id>">` (containerd's runc shim, Kata's Go shim and ours; `address` is
/// containerd's socket, or "" when CRI-O starts the shim).
pub fn shim_socket(address: &str, namespace: &str, id: &str) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{address}/{namespace}/{id}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Path::new("/run/containerd/s").join(hex)
}

/// Whether `hay` mentions `needle` as a whole word: the characters around it are not
/// alphanumeric, so `run-1-1` is not found in `run-1-10`.
pub fn mentions(hay: &str, needle: &str) -> bool {
    if needle.is_empty() {
        return false;
    }
    let mut start = 0;
    while let Some(pos) = hay[start..].find(needle) {
        let at = start + pos;
        let end = at + needle.len();
        let before_ok = !matches!(hay[..at].chars().next_back(), Some(c) if c.is_ascii_alphanumeric());
        let after_ok = !matches!(hay[end..].chars().next(), Some(c) if c.is_ascii_alphanumeric());
        if before_ok && after_ok {
            return true;
        }
        start = at + needle.chars().next().map_or(1, char::len_utf8);
    }
    false
}

/// A live (non-zombie) process other than this one.
#[derive(Debug, Clone)]
pub struct Proc {
    /// Its pid.
    pub pid: u32,
    /// Its command line, arguments joined by spaces.
    pub cmdline: String,
    /// argv[0].
    pub argv0: String,
    /// The content of `/proc/<pid>/cgroup`.
    pub cgroup: String,
}

/// Every live process but this one (zombies count as gone).
pub fn processes() -> Vec<Proc> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == me || !crate::alive(pid) {
            continue;
        }
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<String> =
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        found.push(Proc { pid, argv0: args.first().cloned().unwrap_or_default(), cmdline: args.join(" "), cgroup });
    }
    found
}

/// Processes running `program` (argv[0] contains it) whose command line mentions `needle`.
pub fn find_processes(program: &str, needle: &str) -> Vec<Proc> {
    processes().into_iter().filter(|p| p.argv0.contains(program) && mentions(&p.cmdline, needle)).collect()
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct Mount {
    /// Mount point (unescaped).
    pub mount_point: PathBuf,
    /// Root of the mount within its file system.
    pub root: String,
    /// File system type.
    pub fstype: String,
    /// Mount source.
    pub source: String,
    /// Super block options.
    pub options: String,
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mounts of this process's mount namespace.
pub fn mounts() -> Vec<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                root: unescape(f.get(3)?),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                fstype: r.first()?.to_string(),
                source: unescape(r.get(1).unwrap_or(&"")),
                options: r.get(2).map(|s| unescape(s)).unwrap_or_default(),
            })
        })
        .collect()
}

/// Mounts at or under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<Mount> {
    mounts().into_iter().filter(|m| m.mount_point.starts_with(dir)).collect()
}

/// Unmounts (lazily, deepest first) everything at or under `dir`; returns what it unmounted.
pub fn unmount_under(dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    for _ in 0..8 {
        let mut found = mounts_under(dir);
        if found.is_empty() {
            break;
        }
        found.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
        for m in found {
            let r = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
            done.push(format!(
                "{} ({}) {}",
                m.mount_point.display(),
                m.fstype,
                if r.is_ok() { "unmounted" } else { "unmount failed" }
            ));
        }
    }
    done
}

/// `remove_dir_all` that refuses to run while anything is mounted at or under `path` (it would
/// delete through the mount: a bind-mounted rootfs, or worse).
pub fn remove_tree(path: &Path) -> std::io::Result<()> {
    let mounted = mounts_under(path);
    if !mounted.is_empty() {
        let list: Vec<String> = mounted.iter().map(|m| m.mount_point.display().to_string()).collect();
        return Err(std::io::Error::other(format!("still mounted under it: {}", list.join(", "))));
    }
    std::fs::remove_dir_all(path)
}

/// Entries below `root` (at most `depth` levels, symlinks not followed) whose name mentions one
/// of `ids`.
pub fn entries_named(root: &Path, ids: &[&str], depth: usize) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, level)) = stack.pop() {
        if level >= depth {
            continue;
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if ids.iter().any(|id| mentions(&name, id)) {
                found.push(path.clone());
            }
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push((path, level + 1));
            }
        }
    }
    found
}

/// Cgroup directories named after one of `ids` (any controller, up to three levels deep).
pub fn cgroups_named(ids: &[&str]) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut found = Vec::new();
    // cgroup v1 hybrid: one hierarchy per controller directory; cgroup v2: the root itself.
    let mut hierarchies = vec![root.to_path_buf()];
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            hierarchies.push(e.path());
        }
    }
    for h in hierarchies {
        found.extend(entries_named(&h, ids, 3).into_iter().filter(|p| p.is_dir()));
    }
    found.sort();
    found.dedup();
    found
}

/// Everything that still names one of `ids` or lies under `private_dir`: tracked processes
/// (see [`TRACKED_PROGRAMS`]) whose command line mentions an id or the directory, any process
/// in a cgroup named after an id, mounts, entries under `/run/kata-containers` (depth 4) and
/// `ctr` FIFOs, and cgroup directories.
pub fn find_leaks(ids: &[&str], private_dir: Option<&Path>) -> Vec<String> {
    let mut leaks = Vec::new();
    let dir_str = private_dir.map(|d| d.to_string_lossy().into_owned());
    let names_us = |s: &str| ids.iter().any(|id| mentions(s, id)) || dir_str.as_deref().is_some_and(|d| mentions(s, d));
    for p in processes() {
        let tracked = TRACKED_PROGRAMS.iter().any(|t| p.argv0.contains(t));
        if tracked && names_us(&p.cmdline) {
            leaks.push(format!("process {}: {}", p.pid, p.cmdline));
        } else if p.cgroup.lines().any(|l| ids.iter().any(|id| mentions(l, id))) {
            leaks.push(format!(
                "process {} in a cgroup of the test: {} ({})",
                p.pid,
                p.cmdline,
                p.cgroup.lines().next().unwrap_or("")
            ));
        }
    }
    for m in mounts() {
        let under = private_dir.is_some_and(|d| m.mount_point.starts_with(d));
        let mp = m.mount_point.to_string_lossy();
        if under || names_us(&mp) || names_us(&m.root) || names_us(&m.source) || names_us(&m.options) {
            leaks.push(format!("mount {} ({} from {})", mp, m.fstype, m.source));
        }
    }
    for p in entries_named(Path::new(KATA_RUN_DIR), ids, 4) {
        leaks.push(format!("run directory entry {}", p.display()));
    }
    for p in entries_named(Path::new(CTR_FIFO_DIR), ids, 2) {
        leaks.push(format!("ctr FIFO {}", p.display()));
    }
    for p in cgroups_named(ids) {
        leaks.push(format!("cgroup {}", p.display()));
    }
    leaks
}

/// Removes what [`find_leaks`] would report, so that one failed test does not spoil the machine
/// for the next: SIGKILLs tracked processes naming `ids` or `private_dir`, unmounts mounts naming
/// them, and deletes `/run/kata-containers` entries and cgroups named after an id. Returns what
/// it did.
pub fn force_cleanup(ids: &[&str], private_dir: Option<&Path>) -> Vec<String> {
    let mut done = Vec::new();
    let dir_str = private_dir.map(|d| d.to_string_lossy().into_owned());
    let names_us = |s: &str| ids.iter().any(|id| mentions(s, id)) || dir_str.as_deref().is_some_and(|d| mentions(s, d));
    for p in processes() {
        let tracked = TRACKED_PROGRAMS.iter().any(|t| p.argv0.contains(t));
        if (tracked && names_us(&p.cmdline)) || p.cgroup.lines().any(|l| ids.iter().any(|id| mentions(l, id))) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), nix::sys::signal::Signal::SIGKILL);
            done.push(format!("killed {} {}", p.pid, p.cmdline));
        }
    }
    if !done.is_empty() {
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut ours: Vec<Mount> = mounts()
        .into_iter()
        .filter(|m| {
            private_dir.is_some_and(|d| m.mount_point.starts_with(d)) || names_us(&m.mount_point.to_string_lossy())
        })
        .collect();
    ours.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
    for m in ours {
        let r = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
        done.push(format!("unmounted {} ({r:?})", m.mount_point.display()));
    }
    let mut entries = entries_named(Path::new(KATA_RUN_DIR), ids, 4);
    entries.extend(entries_named(Path::new(CTR_FIFO_DIR), ids, 2));
    for p in entries {
        let r = if p.is_dir() { remove_tree(&p) } else { std::fs::remove_file(&p) };
        done.push(format!("removed {} ({r:?})", p.display()));
    }
    let mut cgroups = cgroups_named(ids);
    cgroups.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in cgroups {
        let r = std::fs::remove_dir(&p);
        done.push(format!("removed cgroup {} ({r:?})", p.display()));
    }
    done
}

/// Removes the private directories `/tmp/<prefix><pid>-<n>` of test processes that died
/// without cleaning up: kills the tracked processes (and those `also` accepts) that name such a
/// directory, unmounts what is below it and deletes it.
pub fn reap_stale_dirs(prefix: &str, also: impl Fn(&Proc) -> bool) {
    let Ok(entries) = std::fs::read_dir("/tmp") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix.trim_start_matches("/tmp/")) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() || crate::alive(pid) {
            continue;
        }
        let dir = e.path();
        let d = dir.to_string_lossy().into_owned();
        for p in processes() {
            let ours = TRACKED_PROGRAMS.iter().any(|n| p.argv0.contains(n)) || also(&p);
            if ours && mentions(&p.cmdline, &d) {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
        }
        unmount_under(&dir);
        let _ = remove_tree(&dir);
    }
}

/// Polls `check` until it finds nothing or `grace` passes (teardown is asynchronous); returns
/// the last findings.
pub fn settle(grace: Duration, mut check: impl FnMut() -> Vec<String>) -> Vec<String> {
    let deadline = Instant::now() + grace;
    loop {
        let found = check();
        if found.is_empty() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts (after up to [`GRACE`]) that nothing names `ids` or lies under `private_dir`.
/// What was found is then removed ([`force_cleanup`]) before the test fails.
pub fn assert_no_leaks(ids: &[&str], private_dir: Option<&Path>) {
    let found = settle(GRACE, || find_leaks(ids, private_dir));
    if !found.is_empty() {
        let cleaned = force_cleanup(ids, private_dir);
        panic!(
            "left behind by {ids:?} after {GRACE:?}:\n  {}\ncleaned up:\n  {}",
            found.join("\n  "),
            cleaned.join("\n  ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_whole_words_only() {
        assert!(mentions("/run/kata-containers/vm/podvisor-test-a-1-1/qmp.sock", "podvisor-test-a-1-1"));
        assert!(mentions("-name sandbox-podvisor-test-a-1-1,debug", "podvisor-test-a-1-1"));
        assert!(mentions("podvisor-test-a-1-1", "podvisor-test-a-1-1"));
        assert!(!mentions("podvisor-test-a-1-10", "podvisor-test-a-1-1"));
        assert!(!mentions("/tmp/podvisor-ctd-5-12/x", "/tmp/podvisor-ctd-5-1"));
        assert!(mentions("-address /tmp/podvisor-ctd-5-1/containerd.sock", "/tmp/podvisor-ctd-5-1"));
        assert!(!mentions("anything", ""));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape(r"/plain"), "/plain");
    }
}
