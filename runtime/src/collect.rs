//! `kata-runtime collect`: one `.tar.gz` with what support needs for one pod or the node:
//! the configuration (secrets redacted), `env`, `check`, versions, and per sandbox its journal
//! lines (`journalctl -t kata SANDBOX=<id>`, `-t virtiofsd`), its metrics, the QEMU command line
//! and the helper records. What cannot be had becomes a `.note` file saying why; a MANIFEST
//! lists every file. Secrets and tokens are never included: configuration files are
//! re-serialized with secret-looking keys redacted, and all text is filtered with
//! [`crate::redact::redact_text`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::redact::{redact_text, redact_toml};
use crate::sandbox;

/// Where the shim's VM run directories are (pids records).
pub const VM_ROOT: &str = hypervisor::qemu::DEFAULT_RUN_ROOT;
/// The archive's top directory.
pub const TOP: &str = "kata-collect";
/// How long one `journalctl` may take.
const JOURNAL_TIMEOUT: Duration = Duration::from_secs(20);
/// The most read from one command.
const MAX_COMMAND_OUTPUT: usize = 32 << 20;

/// Where sandboxes are found.
#[derive(Debug, Clone)]
pub struct Roots {
    /// Monitor sockets: `<sbs>/<id>/shim-monitor.sock`.
    pub sbs: PathBuf,
    /// VM run directories: `<vm>/<id>/pids`.
    pub vm: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots { sbs: PathBuf::from(sandbox::SBS_ROOT), vm: PathBuf::from(VM_ROOT) }
    }
}

/// One file of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path inside [`TOP`].
    pub name: String,
    /// Content.
    pub data: Vec<u8>,
}

fn entry(name: impl Into<String>, data: impl Into<Vec<u8>>) -> Entry {
    Entry { name: name.into(), data: data.into() }
}

/// The sandboxes to collect: `only` (which must exist under a root), or all of them.
pub fn sandboxes(roots: &Roots, only: Option<&str>) -> Result<Vec<String>, String> {
    if let Some(id) = only {
        sandbox::validate_id(id)?;
        if !roots.sbs.join(id).is_dir() && !roots.vm.join(id).is_dir() {
            return Err(format!(
                "no sandbox {id:?} on this node (neither {} nor {} exists)",
                roots.sbs.join(id).display(),
                roots.vm.join(id).display()
            ));
        }
        return Ok(vec![id.to_string()]);
    }
    let mut all = sandbox::list(&roots.sbs);
    all.extend(sandbox::list(&roots.vm));
    all.sort();
    all.dedup();
    Ok(all)
}

/// Everything the archive holds except the MANIFEST.
pub fn gather(config: Option<&Path>, ids: &[String], roots: &Roots) -> Vec<Entry> {
    let mut out = Vec::new();
    // Configuration: the file in effect and the other default locations that exist.
    let in_effect = podvisor_shim::config::find(config).ok();
    let mut files: Vec<PathBuf> = in_effect.iter().cloned().collect();
    for p in podvisor_shim::config::DEFAULT_CONFIG_PATHS.iter().map(PathBuf::from) {
        if p.is_file() && !files.iter().any(|f| same_file(f, &p)) {
            files.push(p);
        }
    }
    if files.is_empty() {
        out.push(entry("configuration/none.note", "no configuration file was found\n"));
    }
    for (i, f) in files.iter().enumerate() {
        let base = format!("configuration/{i}-{}", f.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
        match std::fs::read_to_string(f).map_err(|e| e.to_string()).and_then(|t| redact_toml(&t)) {
            Ok(t) => out.push(entry(base.clone(), format!("# {} (secrets redacted)\n{t}", f.display()))),
            Err(e) => out.push(entry(format!("{base}.note"), format!("{}: {e}\n", f.display()))),
        }
    }
    match crate::env::collect(config).and_then(|e| crate::env::render(&e, false).map(|t| (e, t))) {
        Ok((env, text)) => {
            out.push(entry("env.toml", redact_text(&text)));
            out.push(entry("versions.txt", versions(&env)));
        }
        Err(e) => out.push(entry("env.note", format!("kata-runtime env failed: {e}\n"))),
    }
    if let Ok(cfg) = crate::check::load_config(config) {
        let check = hypervisor::HostCheck::run(&cfg.hypervisor);
        out.push(entry("check.txt", format!("{}{check}\n", crate::check::facts_text(&check))));
    }
    for id in ids {
        out.extend(gather_sandbox(id, roots));
    }
    out
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn versions(env: &crate::env::Env) -> String {
    let mut s = format!("kata-runtime {}\n", podvisor_shim::VERSION);
    s.push_str(&format!("qemu: {}\n", env.hypervisor.version));
    s.push_str(&format!("virtiofsd: {}\n", env.hypervisor.virtio_fs_daemon_version));
    s.push_str(&format!("vhost-device-vsock: {}\n", env.hypervisor.vsock_daemon_version));
    s.push_str(&format!("guest kernel: {}\n", env.kernel.version));
    s.push_str(&format!("initrd: {} bytes, {}\n", env.initrd.size_bytes, env.initrd.compression));
    s.push_str(&format!("host kernel: {} {}\n", env.host.kernel, env.host.architecture));
    s.push_str(&format!("distro: {} {}\n", env.host.distro.name, env.host.distro.version));
    for (name, path) in crate::env::component_paths(env) {
        s.push_str(&format!("path {name}: {}\n", path.display()));
    }
    s
}

fn gather_sandbox(id: &str, roots: &Roots) -> Vec<Entry> {
    let dir = format!("sandboxes/{id}");
    let mut out = Vec::new();
    let mut text_or_note = |name: &str, r: Result<String, String>| match r {
        Ok(t) => out.push(entry(format!("{dir}/{name}"), redact_text(&t))),
        Err(e) => out.push(entry(format!("{dir}/{name}.note"), format!("{e}\n"))),
    };
    text_or_note("journal-kata.txt", journal(&["-t", "kata", &format!("SANDBOX={id}")]));
    let run_dir = roots.vm.join(id);
    match sandbox::helper_pid(&run_dir, "virtiofsd") {
        Some(pid) => text_or_note("journal-virtiofsd.txt", journal(&["-t", "virtiofsd", &format!("_PID={pid}")])),
        None => text_or_note(
            "journal-virtiofsd.txt",
            Err(format!(
                "no running virtiofsd recorded in {}/pids, so its journal lines (`journalctl -t virtiofsd _PID=<pid>`) \
                 cannot be told from other pods'",
                run_dir.display()
            )),
        ),
    }
    text_or_note(
        "metrics.txt",
        sandbox::shim_get(&roots.sbs, id, "/metrics").map(|b| String::from_utf8_lossy(&b).into_owned()),
    );
    text_or_note("qemu-cmdline.txt", qemu_cmdline(&run_dir));
    text_or_note(
        "pids",
        std::fs::read_to_string(run_dir.join("pids")).map_err(|e| format!("{}/pids: {e}", run_dir.display())),
    );
    out
}

fn qemu_cmdline(run_dir: &Path) -> Result<String, String> {
    let pid = sandbox::helper_pid(run_dir, "qemu")
        .ok_or_else(|| format!("no running QEMU recorded in {}/pids", run_dir.display()))?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).map_err(|e| format!("/proc/{pid}/cmdline: {e}"))?;
    let args: Vec<String> =
        raw.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    Ok(format!("# pid {pid}\n{}\n", args.join(" ")))
}

/// `journalctl --no-pager -o short-iso-precise <args>`, bounded in time and size. A missing
/// `journalctl` or journal is an error (it becomes a note).
fn journal(args: &[&str]) -> Result<String, String> {
    let socket = Path::new(podvisor_shim::logging::JOURNAL_SOCKET);
    let journal_dirs = [Path::new("/run/log/journal"), Path::new("/var/log/journal")];
    if !socket.exists() && !journal_dirs.iter().any(|d| d.is_dir()) {
        return Err(format!(
            "no systemd journal on this host (neither {} nor {} exists): the shim logged to the bundle's \
             log FIFO, which the container manager copies into its own log",
            socket.display(),
            journal_dirs.map(|d| d.display().to_string()).join(" nor ")
        ));
    }
    let mut cmd = Command::new("journalctl");
    cmd.args(["--no-pager", "-q", "-o", "short-iso-precise"]).args(args);
    let what = format!("journalctl {}", args.join(" "));
    let (status, stdout, stderr) = run_bounded(cmd, JOURNAL_TIMEOUT).map_err(|e| format!("{what}: {e}"))?;
    if !status {
        return Err(format!("{what} failed: {}", stderr.trim()));
    }
    if stdout.trim().is_empty() {
        return Err(format!(
            "{what}: no lines{}",
            if stderr.trim().is_empty() { String::new() } else { format!(" ({})", stderr.trim()) }
        ));
    }
    Ok(stdout)
}

/// Runs `cmd` with stdout/stderr captured (at most [`MAX_COMMAND_OUTPUT`] bytes each), killing it
/// after `timeout`.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<(bool, String, String), String> {
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = (&mut out).take(MAX_COMMAND_OUTPUT as u64).read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = (&mut err).take(1 << 20).read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("did not finish within {timeout:?}"));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    Ok((status.success(), String::from_utf8_lossy(&stdout).into_owned(), String::from_utf8_lossy(&stderr).into_owned()))
}

/// The MANIFEST: what the archive holds, one `<bytes>\t<path>` line per file.
pub fn manifest(entries: &[Entry], ids: &[String]) -> String {
    let mut s = String::from("# kata-runtime collect: support archive (secrets and tokens redacted)\n");
    s.push_str(&format!("# kata-runtime {}\n", podvisor_shim::VERSION));
    s.push_str(&format!("# sandboxes: {}\n", if ids.is_empty() { "none".to_string() } else { ids.join(" ") }));
    s.push_str("# files ending in .note say why something could not be collected\n");
    for e in entries {
        s.push_str(&format!("{}\t{TOP}/{}\n", e.data.len(), e.name));
    }
    s
}

/// Writes MANIFEST and `entries` as a gzipped tar to `output` (through a temporary file next to
/// it, removed on any failure). Returns the archive's size.
pub fn write_archive(output: &Path, entries: &[Entry], ids: &[String]) -> Result<u64, String> {
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(format!("cannot write {}: directory {} does not exist", output.display(), parent.display()));
    }
    let name = output.file_name().ok_or_else(|| format!("{} names no file", output.display()))?;
    let tmp = parent.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let mut add = |name: &str, data: &[u8]| -> std::io::Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_mtime(now);
            h.set_cksum();
            tar.append_data(&mut h, format!("{TOP}/{name}"), data)
        };
        add("MANIFEST", manifest(entries, ids).as_bytes())?;
        for e in entries {
            add(&e.name, &e.data)?;
        }
        let gz = tar.into_inner()?;
        gz.finish()?.sync_all()
    })();
    if let Err(e) = result.and_then(|()| std::fs::rename(&tmp, output)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", output.display()));
    }
    std::fs::metadata(output).map(|m| m.len()).map_err(|e| e.to_string())
}

/// `kata-runtime collect`.
pub fn run(config: Option<&Path>, only: Option<&str>, output: &Path) -> Result<ExitCode, String> {
    let roots = Roots::default();
    let ids = sandboxes(&roots, only)?;
    let entries = gather(config, &ids, &roots);
    let size = write_archive(output, &entries, &ids)?;
    println!(
        "wrote {} ({size} bytes): {} files for {} sandbox(es); see {TOP}/MANIFEST",
        output.display(),
        entries.len() + 1,
        ids.len()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kata-runtime-collect-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn listing(archive: &Path) -> Vec<(String, Vec<u8>)> {
        let f = std::fs::File::open(archive).unwrap();
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(f));
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().display().to_string();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, data)
            })
            .collect()
    }

    #[test]
    fn archive_lists_manifest_first_and_every_entry() {
        let d = tmpdir("list");
        let entries = vec![entry("env.toml", "a = 1\n"), entry("sandboxes/s1/metrics.note", "no socket\n")];
        let out = d.join("x.tar.gz");
        let size = write_archive(&out, &entries, &["s1".to_string()]).unwrap();
        assert_eq!(size, std::fs::metadata(&out).unwrap().len());
        let l = listing(&out);
        let names: Vec<&str> = l.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["kata-collect/MANIFEST", "kata-collect/env.toml", "kata-collect/sandboxes/s1/metrics.note"]);
        let m = String::from_utf8(l[0].1.clone()).unwrap();
        assert!(m.contains("6\tkata-collect/env.toml\n") && m.contains("# sandboxes: s1\n"), "{m}");
        // Nothing else is left next to the archive, and a missing directory is named.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        let e = write_archive(&d.join("no/such/x.tar.gz"), &entries, &[]).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_sandbox_without_shim_gets_notes_and_its_config_is_redacted() {
        let d = tmpdir("sb");
        let roots = Roots { sbs: d.join("sbs"), vm: d.join("vm") };
        std::fs::create_dir_all(roots.vm.join("pod1")).unwrap();
        std::fs::write(roots.vm.join("pod1/pids"), "qemu 999999999 1 1\n").unwrap();
        assert_eq!(sandboxes(&roots, None).unwrap(), vec!["pod1".to_string()]);
        assert!(sandboxes(&roots, Some("pod2")).unwrap_err().contains("no sandbox \"pod2\""));
        assert!(sandboxes(&roots, Some("../x")).unwrap_err().contains("invalid sandbox id"));
        let cfg = d.join("configuration.toml");
        std::fs::write(
            &cfg,
            "[hypervisor.qemu]\nkernel_params = \"agent.log=debug agent.token=TOPSECRET\"\n[runtime]\nenable_debug = true\n",
        )
        .unwrap();
        let ids = vec!["pod1".to_string()];
        let entries = gather(Some(&cfg), &ids, &roots);
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        for want in [
            "configuration/0-configuration.toml",
            "env.toml",
            "versions.txt",
            "check.txt",
            "sandboxes/pod1/metrics.txt.note",
            "sandboxes/pod1/qemu-cmdline.txt.note",
            "sandboxes/pod1/journal-virtiofsd.txt.note",
            "sandboxes/pod1/pids",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(names.iter().any(|n| n.starts_with("sandboxes/pod1/journal-kata.txt")), "{names:?}");
        for e in &entries {
            let t = String::from_utf8_lossy(&e.data);
            assert!(!t.contains("TOPSECRET"), "{} leaks the token:\n{t}", e.name);
        }
        let conf = entries.iter().find(|e| e.name == "configuration/0-configuration.toml").unwrap();
        assert!(String::from_utf8_lossy(&conf.data).contains("agent.token=<redacted>"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
