//! A private containerd for end-to-end tests and the demo: Debian's `/usr/bin/containerd` with
//! its own root, state, socket, configuration and log under `/tmp/podvisor-ctd-<pid>-<n>/`, the
//! CRI plugin disabled, and `PATH` starting with a directory whose `containerd-shim-kata-v2` is a
//! symlink to the built shim. `KATA_CONF_FILE` points at a configuration written from
//! `configs/configuration-qemu.toml` with the built guest image.
//!
//! Tests drive it through the real `ctr` CLI ([`TestContainerd::ctr`] and friends), each call
//! with a timeout that kills `ctr`. Dropping it removes every task and container still there,
//! stops containerd (SIGTERM, then SIGKILL), unmounts whatever is left under its directory and
//! removes the directory; a test that left something behind fails.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::leaks;

/// The runtime the tests are about.
pub const KATA_RUNTIME: &str = "io.containerd.kata.v2";
/// containerd's own runc runtime, used to validate the harness (`PODVISOR_TEST_RUNTIME`).
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The containerd binary (Debian's `containerd` package).
pub const CONTAINERD: &str = "/usr/bin/containerd";
/// The `ctr` binary (same package).
pub const CTR: &str = "/usr/bin/ctr";
/// The namespace `ctr` uses by default.
pub const NAMESPACE: &str = "default";
/// Default limit for one `ctr` call; a call still running then is killed and fails the test.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(120);

/// The runtime under test: `$PODVISOR_TEST_RUNTIME`, by default [`KATA_RUNTIME`].
pub fn test_runtime() -> String {
    std::env::var("PODVISOR_TEST_RUNTIME").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| KATA_RUNTIME.to_string())
}

/// Whether the runtime under test is ours.
pub fn runtime_is_kata() -> bool {
    test_runtime() == KATA_RUNTIME
}

/// Fails (never skips) a test that only makes sense with our shim when another runtime was chosen.
pub fn require_kata(what: &str) {
    assert!(
        runtime_is_kata(),
        "{what} needs {KATA_RUNTIME}; PODVISOR_TEST_RUNTIME={} only validates the harness",
        test_runtime()
    );
}

/// The built shim: `$PODVISOR_SHIM`, or the newer of `target/release/containerd-shim-kata-v2`
/// and `target/debug/containerd-shim-kata-v2` (release when both have the same age: a stale
/// release binary must not shadow a fresh debug build). Panics with the build command when
/// neither exists, or when the chosen one is older than the shim's sources (`cargo test` does not
/// rebuild another package's binary).
pub fn shim_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PODVISOR_SHIM").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "PODVISOR_SHIM={} does not exist", p.display());
        return p;
    }
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| crate::workspace().join("target"));
    let candidates: Vec<(PathBuf, std::time::SystemTime)> = ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("containerd-shim-kata-v2"))
        .filter_map(|p| fs::metadata(&p).and_then(|m| m.modified()).ok().map(|t| (p, t)))
        .collect();
    let (binary, built) = match candidates.as_slice() {
        [(release, rt), (debug, dt)] => if dt > rt { (debug.clone(), *dt) } else { (release.clone(), *rt) },
        [(only, t)] => (only.clone(), *t),
        _ => panic!(
            "the shim binary {}/{{release,debug}}/containerd-shim-kata-v2 is missing: run `cargo build -p podvisor-shim` \
             (or `cargo build --release -p podvisor-shim`) first",
            target.display()
        ),
    };
    if let Some((source, changed)) = newest_shim_source() {
        assert!(
            changed <= built,
            "the shim binary {} is older than {}: run `cargo build -p podvisor-shim` (or --release) again",
            binary.display(),
            source.display()
        );
    }
    binary
}

/// The most recently modified source file of the shim and the crates it is built from.
fn newest_shim_source() -> Option<(PathBuf, std::time::SystemTime)> {
    let ws = crate::workspace();
    let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
    let mut stack: Vec<PathBuf> = ["shim", "hypervisor", "agent-protocol"].iter().map(|c| ws.join(c)).collect();
    while let Some(p) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else { continue };
        if meta.is_dir() {
            stack.extend(fs::read_dir(&p).into_iter().flatten().flatten().map(|e| e.path()));
        } else if meta.is_file() {
            let relevant = p.extension().is_some_and(|e| e == "rs" || e == "proto" || e == "toml");
            if let (true, Ok(t)) = (relevant, meta.modified()) {
                if !matches!(&newest, Some((_, n)) if *n >= t) {
                    newest = Some((p, t));
                }
            }
        }
    }
    newest
}

/// The `[hypervisor.qemu]` table of a configuration (created when missing).
pub fn qemu_section(config: &mut toml::Table) -> &mut toml::Table {
    let hv = config.entry("hypervisor").or_insert_with(|| toml::Value::Table(Default::default()));
    let hv = hv.as_table_mut().expect("[hypervisor] is a table");
    let q = hv.entry("qemu").or_insert_with(|| toml::Value::Table(Default::default()));
    q.as_table_mut().expect("[hypervisor.qemu] is a table")
}

/// The test configuration text: `configs/configuration-qemu.toml` with `kernel` and `initrd` set
/// to the built guest image and `default_memory = 512`, then changed by `edit`.
pub fn kata_test_config(edit: impl FnOnce(&mut toml::Table)) -> String {
    let src = crate::workspace().join("configs/configuration-qemu.toml");
    let text = fs::read_to_string(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let mut config: toml::Table = text.parse().unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let q = qemu_section(&mut config);
    q.insert("kernel".into(), crate::guest_asset("vmlinux.container").display().to_string().into());
    q.insert("initrd".into(), crate::guest_asset("kata-containers-initrd.img").display().to_string().into());
    q.insert("default_memory".into(), 512.into());
    edit(&mut config);
    format!(
        "# Written by podvisor-tests from {}\n{}",
        src.display(),
        toml::to_string(&config).expect("serialize config")
    )
}

/// Sets `FD_CLOEXEC`, so that processes other tests spawn meanwhile do not inherit the fd.
fn cloexec(fd: &OwnedFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// A pipe whose ends are close-on-exec.
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2");
    (r, w)
}

/// Runs `cmd` to completion with `stdin` (or /dev/null), capturing stdout and stderr; kills it
/// after `timeout` and returns an error carrying what it printed so far.
pub fn run_with_timeout(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Result<Output, String> {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"))?;
    let writer = stdin.map(|data| {
        let mut pipe = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output { status, stdout, stderr }),
        None => Err(format!(
            "{cmd:?} did not finish within {timeout:?} and was killed\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        )),
    }
}

/// What a command run on a pseudo-terminal printed.
#[derive(Debug)]
pub struct TtyOutput {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything written to the terminal (stdout and stderr; `\r\n` line ends).
    pub output: String,
}

/// Runs `cmd` with stdin, stdout and stderr on a new pseudo-terminal (80x24, its controlling
/// terminal), reading the terminal until the command exits; kills it after `timeout`.
/// `ctr run -t` and `ctr task exec -t` need this: they panic ("provided file is not a console")
/// unless one of their standard streams is a terminal.
pub fn run_in_pty(mut cmd: Command, timeout: Duration) -> Result<TtyOutput, String> {
    let ws = nix::pty::Winsize { ws_row: 24, ws_col: 80, ws_xpixel: 0, ws_ypixel: 0 };
    let pty = nix::pty::openpty(Some(&ws), None).map_err(|e| format!("openpty: {e}"))?;
    cloexec(&pty.master);
    cloexec(&pty.slave);
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("dup: {e}"));
    cmd.stdin(Stdio::from(dup(&pty.slave)?))
        .stdout(Stdio::from(dup(&pty.slave)?))
        .stderr(Stdio::from(dup(&pty.slave)?));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let spawned = cmd.spawn().map_err(|e| format!("{cmd:?}: {e}"));
    drop(cmd);
    drop(pty.slave);
    let mut child = spawned?;
    nix::fcntl::fcntl(pty.master.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
        .map_err(|e| format!("fcntl: {e}"))?;
    let mut master = fs::File::from(pty.master);
    let mut output = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut exited: Option<(ExitStatus, Instant)> = None;
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                output.extend_from_slice(&buf[..n]);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break, // EIO: every slave end is closed
        }
        if exited.is_none() {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some((status, Instant::now()));
            }
        }
        match exited {
            // Something else holds the terminal: stop reading shortly after the exit.
            Some((_, at)) if at.elapsed() > Duration::from_millis(500) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "command on a terminal did not finish within {timeout:?} and was killed; it printed: {}",
                    String::from_utf8_lossy(&output)
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    let status = match exited {
        Some((s, _)) => s,
        None => child.wait().map_err(|e| format!("wait: {e}"))?,
    };
    Ok(TtyOutput { status, output: String::from_utf8_lossy(&output).into_owned() })
}

/// A `ctr` process running in the background (e.g. an attached `ctr run`), killed when dropped.
pub struct CtrChild {
    child: Option<Child>,
    out: Option<std::thread::JoinHandle<Vec<u8>>>,
    err: Option<std::thread::JoinHandle<Vec<u8>>>,
    args: Vec<String>,
}

impl CtrChild {
    /// The pid of `ctr`.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether `ctr` is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits for `ctr` to exit (killing it after `timeout`, which fails).
    pub fn wait(mut self, timeout: Duration) -> Result<Output, String> {
        let mut child = self.child.take().expect("waited twice");
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let stdout = self.out.take().and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr = self.err.take().and_then(|h| h.join().ok()).unwrap_or_default();
        match status {
            Some(status) => Ok(Output { status, stdout, stderr }),
            None => Err(format!(
                "ctr {:?} did not finish within {timeout:?} and was killed\nstdout: {}\nstderr: {}",
                self.args,
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            )),
        }
    }
}

impl Drop for CtrChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A task as `ctr task ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// Task (container) id.
    pub id: String,
    /// Its pid as the shim reports it.
    pub pid: u32,
    /// `CREATED`, `RUNNING`, `PAUSED`, `STOPPED`, ...
    pub status: String,
}

/// How a [`TestContainerd`] ended.
#[derive(Debug, Default)]
pub struct Teardown {
    /// What had to be cleaned up by force (tasks, containers, processes, mounts): each is a leak.
    pub leftovers: Vec<String>,
    /// From the first cleanup step to the directory's removal.
    pub took: Duration,
    /// From SIGTERM to containerd's exit.
    pub containerd_stop: Duration,
}

/// A private containerd (see the module documentation).
pub struct TestContainerd {
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    kata_config: PathBuf,
    runtime: String,
    child: Option<Child>,
    startup: Duration,
    done: bool,
    ids: std::sync::Mutex<Vec<String>>,
}

/// The prefix of every private containerd directory.
pub const DIR_PREFIX: &str = "/tmp/podvisor-ctd-";

impl TestContainerd {
    /// Starts one with the default test configuration ([`kata_test_config`] unchanged).
    pub fn start() -> Self {
        Self::start_with_kata_config(&kata_test_config(|_| {}))
    }

    /// Starts one whose `KATA_CONF_FILE` holds `config_text`.
    pub fn start_with_kata_config(config_text: &str) -> Self {
        Self::try_start(config_text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts one whose `KATA_CONF_FILE` holds `config_text`, or says why it could not.
    pub fn try_start(config_text: &str) -> Result<Self, String> {
        Self::try_start_custom(config_text, Some(&shim_binary()), &default_containerd_config)
    }

    /// Starts one whose `KATA_CONF_FILE` holds `config_text` and whose containerd configuration
    /// is `containerd_config(<its private directory>)` (which must put root, state, the gRPC and
    /// ttrpc sockets and the opt plugin under that directory, as the default one does); `shim`
    /// is linked as `bin/containerd-shim-kata-v2` (`None`: no link, for tests that only use other
    /// runtimes). Used by the CRI harness (`cri.rs`).
    pub fn try_start_custom(
        config_text: &str,
        shim: Option<&Path>,
        containerd_config: &dyn Fn(&Path) -> String,
    ) -> Result<Self, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        leaks::reap_stale_dirs(DIR_PREFIX, |_| false);
        let dir = PathBuf::from(format!("{DIR_PREFIX}{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let _ = fs::remove_dir_all(&dir);
        let mut me = TestContainerd {
            socket: dir.join("containerd.sock"),
            log: dir.join("containerd.log"),
            kata_config: dir.join("configuration.toml"),
            dir,
            runtime: test_runtime(),
            child: None,
            startup: Duration::ZERO,
            done: false,
            ids: Default::default(),
        };
        let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
        let bin = me.dir.join("bin");
        fs::create_dir_all(&bin).map_err(|e| io(&bin, e))?;
        if let Some(shim) = shim {
            let link = bin.join("containerd-shim-kata-v2");
            symlink(shim, &link).map_err(|e| io(&link, e))?;
        }
        fs::write(&me.kata_config, config_text).map_err(|e| io(&me.kata_config, e))?;
        let config = me.dir.join("config.toml");
        fs::write(&config, containerd_config(&me.dir)).map_err(|e| io(&config, e))?;
        let started = Instant::now();
        me.child = Some(me.spawn()?);
        me.wait_listening()?;
        me.startup = started.elapsed();
        let v = me.ctr(&["version"]);
        if !v.status.success() {
            return Err(format!("`ctr version` failed against the new containerd: {}", me.explain(&v)));
        }
        Ok(me)
    }

    /// Spawns containerd on this directory's configuration (its log appended to).
    fn spawn(&self) -> Result<Child, String> {
        let io = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
        let bin = self.dir.join("bin");
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log).map_err(|e| io(&self.log, e))?;
        let log2 = log.try_clone().map_err(|e| io(&self.log, e))?;

        let mut path = std::env::var("PATH").unwrap_or_default();
        for d in ["/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
            if !path.split(':').any(|p| p == d) {
                path.push(':');
                path.push_str(d);
            }
        }
        let mut cmd = Command::new(CONTAINERD);
        cmd.arg("--config")
            .arg(self.dir.join("config.toml"))
            .current_dir(&self.dir)
            .env("PATH", format!("{}:{path}", bin.display()))
            .env("KATA_CONF_FILE", &self.kata_config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0);
        // SAFETY: prctl is async-signal-safe. containerd goes when the thread that started it
        // does (a crashed test); the harness itself always stops it first.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        cmd.spawn().map_err(|e| format!("{CONTAINERD}: {e}: install Debian's containerd (scripts/deps.sh)"))
    }

    /// Waits until the running containerd listens on its socket.
    fn wait_listening(&mut self) -> Result<(), String> {
        let (child, socket) = (self.child.as_mut().unwrap(), self.socket.clone());
        let log_file = self.log.clone();
        crate::wait_for_socket(child, &socket, "containerd", Duration::from_secs(30), || log_tail(&log_file, 30))
    }

    /// Restarts containerd on the same root, state, sockets and configuration while shims and
    /// their VMs run on, as `systemctl restart containerd` does (containerd.service has
    /// `KillMode=process`: only containerd gets the signal). `signal` is SIGTERM for a clean
    /// restart or SIGKILL for a crash; a containerd that ignores SIGTERM for 10 s is killed and
    /// that is an error. Returns how long the new one took to listen.
    pub fn restart(&mut self, signal: nix::sys::signal::Signal) -> Result<Duration, String> {
        let mut child = self.child.take().ok_or("containerd is not running")?;
        if !matches!(child.try_wait(), Ok(None)) {
            return Err(format!("containerd had exited before the restart:\n{}", self.logs_tail(30)));
        }
        let error = crate::signal_daemon(&mut child, "containerd", signal, || self.logs_tail(30)).into_iter().next();
        let started = Instant::now();
        self.child = Some(self.spawn()?);
        self.wait_listening()?;
        match error {
            Some(e) => Err(e),
            None => Ok(started.elapsed()),
        }
    }

    /// A new container id ([`crate::unique_id`]) that teardown will also clean up after: if a
    /// test fails half-way, processes, mounts and run directories naming it are removed.
    pub fn new_id(&self, tag: &str) -> String {
        let id = crate::unique_id(tag);
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).push(id.clone());
        id
    }

    /// Makes teardown clean up after `id` too (an id chosen by someone else, e.g. the CRI
    /// plugin's 64-hex sandbox and container ids), as for ids from [`Self::new_id`].
    pub fn track_id(&self, id: &str) {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if !ids.iter().any(|i| i == id) {
            ids.push(id.to_string());
        }
    }

    /// Its private directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its gRPC socket (`ctr --address`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The configuration file `KATA_CONF_FILE` names.
    pub fn kata_config(&self) -> &Path {
        &self.kata_config
    }

    /// The runtime to pass to `ctr run --runtime` (see [`test_runtime`]).
    pub fn runtime(&self) -> &str {
        &self.runtime
    }

    /// containerd's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// From spawning containerd to its socket accepting connections.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// containerd's log file (shim logs included: containerd copies each shim's log FIFO to it).
    pub fn log_file(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of containerd's log, for assertion messages, preceded by its last
    /// warnings and errors (a debug log buries them quickly).
    pub fn logs_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(CTR);
        cmd.arg("--address").arg(&self.socket).args(args);
        cmd.env_remove("CONTAINERD_NAMESPACE").env_remove("CONTAINERD_ADDRESS");
        cmd
    }

    /// Runs `ctr --address <socket> <args>` with stdin /dev/null and [`CTR_TIMEOUT`].
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_timeout(args, CTR_TIMEOUT)
    }

    /// [`Self::ctr`] with another timeout (a timeout fails the test with containerd's log).
    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        run_with_timeout(&mut self.ctr_command(args), None, timeout)
            .unwrap_or_else(|e| panic!("ctr {args:?}: {e}\n{}", self.logs_tail(40)))
    }

    /// Runs `ctr` with `input` on its stdin (closed after it), e.g. `echo hi | ctr task exec ...`.
    /// containerd 1.6's `ctr task exec` has no `-i`: it always forwards its stdin.
    pub fn ctr_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        run_with_timeout(&mut self.ctr_command(args), Some(input), CTR_TIMEOUT)
            .unwrap_or_else(|e| panic!("ctr {args:?}: {e}\n{}", self.logs_tail(40)))
    }

    /// Runs `ctr` on a pseudo-terminal (for `-t`/`--tty`), see [`run_in_pty`].
    pub fn ctr_tty(&self, args: &[&str]) -> TtyOutput {
        run_in_pty(self.ctr_command(args), CTR_TIMEOUT)
            .unwrap_or_else(|e| panic!("ctr {args:?}: {e}\n{}", self.logs_tail(40)))
    }

    /// Runs `ctr` and asserts that it succeeded; returns its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(out.status.success(), "ctr {args:?} failed: {}", self.explain(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `ctr` in the background (stdin /dev/null, output captured), e.g. an attached
    /// `ctr run` that another `ctr` call will signal.
    pub fn spawn_ctr(&self, args: &[&str]) -> CtrChild {
        let mut cmd = self.ctr_command(args);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning ctr {args:?}: {e}"));
        let reader = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                buf
            })
        };
        let out = Some(reader(Box::new(child.stdout.take().unwrap())));
        let err = Some(reader(Box::new(child.stderr.take().unwrap())));
        CtrChild { child: Some(child), out, err, args: args.iter().map(|s| s.to_string()).collect() }
    }

    /// A description of a finished `ctr` call for assertion messages: exit status, stdout,
    /// stderr, and the tail of containerd's log.
    pub fn explain(&self, out: &Output) -> String {
        format!(
            "{}\nstdout: {}\nstderr: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs_tail(40)
        )
    }

    /// The tasks `ctr task ls` lists.
    pub fn tasks(&self) -> Vec<TaskInfo> {
        self.ctr_ok(&["task", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some(TaskInfo {
                    id: f.first()?.to_string(),
                    pid: f.get(1)?.parse().ok()?,
                    status: f.get(2)?.to_string(),
                })
            })
            .collect()
    }

    /// The status of task `id` (`RUNNING`, `PAUSED`, `STOPPED`, ...), if `ctr task ls` lists it.
    pub fn task_status(&self, id: &str) -> Option<String> {
        self.tasks().into_iter().find(|t| t.id == id).map(|t| t.status)
    }

    /// Polls `ctr task ls` until task `id` has `status`; fails the test after `timeout`.
    pub fn wait_for_status(&self, id: &str, status: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.task_status(id);
            if now.as_deref() == Some(status) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} did not reach {status} within {timeout:?} (now {now:?})\n{}",
                self.logs_tail(40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The container ids `ctr container ls -q` lists.
    pub fn containers(&self) -> Vec<String> {
        self.ctr_ok(&["container", "ls", "-q"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// Pids of the shim processes (any `containerd-shim-*`) serving `id` for this containerd.
    pub fn shim_pids(&self, id: &str) -> Vec<u32> {
        let dir = self.dir.to_string_lossy();
        leaks::processes()
            .into_iter()
            .filter(|p| {
                p.argv0.contains("containerd-shim-")
                    && leaks::mentions(&p.cmdline, id)
                    && leaks::mentions(&p.cmdline, &dir)
            })
            .map(|p| p.pid)
            .collect()
    }

    /// The shim socket a containerd-style shim uses for `id`: `/run/containerd/s/<sha256 of
    /// "<address>/<ns>/<id>">` (what the runc shim and Kata's Go shim do).
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        leaks::shim_socket(&self.socket.to_string_lossy(), NAMESPACE, id)
    }

    /// Removes the shim sockets of `ids` that are still there (a killed shim leaves its socket).
    fn remove_shim_sockets(&self, ids: &[&str]) -> Vec<String> {
        let mut done = Vec::new();
        for id in ids {
            let sock = self.shim_socket(id);
            if sock.exists() {
                let r = fs::remove_file(&sock);
                done.push(format!("removed shim socket {} ({r:?})", sock.display()));
            }
        }
        done
    }

    /// What still names `ids`: everything [`leaks::find_leaks`] reports (with this containerd's
    /// directory), plus containers and tasks containerd still lists, task bundles left in its
    /// state and root directories, and shim sockets in `/run/containerd/s/`.
    pub fn find_leaks(&self, ids: &[&str]) -> Vec<String> {
        let mut found = leaks::find_leaks(ids, Some(&self.dir));
        if self.child.is_some() {
            let containers = self.ctr(&["container", "ls", "-q"]);
            let tasks = self.ctr(&["task", "ls", "-q"]);
            for id in ids {
                if String::from_utf8_lossy(&containers.stdout).lines().any(|l| l.trim() == *id) {
                    found.push(format!("containerd still lists container {id}"));
                }
                if String::from_utf8_lossy(&tasks.stdout).lines().any(|l| l.trim() == *id) {
                    found.push(format!("containerd still lists task {id}"));
                }
            }
        }
        for id in ids {
            for base in ["state", "root"] {
                let bundle = self.dir.join(base).join("io.containerd.runtime.v2.task").join(NAMESPACE).join(id);
                if bundle.exists() {
                    found.push(format!("task bundle {} (the shim's `delete` failed or was not run)", bundle.display()));
                }
            }
            let sock = self.shim_socket(id);
            if sock.exists() {
                found.push(format!("shim socket {}", sock.display()));
            }
        }
        found
    }

    /// Asserts (polling up to [`leaks::GRACE`], teardown is asynchronous) that nothing of
    /// `ids` is left: see [`Self::find_leaks`].
    pub fn assert_no_leaks(&self, ids: &[&str]) {
        let found = leaks::settle(leaks::GRACE, || self.find_leaks(ids));
        if !found.is_empty() {
            let mut cleaned = leaks::force_cleanup(ids, None);
            cleaned.extend(self.remove_shim_sockets(ids));
            panic!(
                "left behind by {ids:?} after {:?}:\n  {}\ncleaned up:\n  {}\n{}",
                leaks::GRACE,
                found.join("\n  "),
                cleaned.join("\n  "),
                self.logs_tail(40)
            );
        }
    }

    /// Removes every task and container, stops containerd, unmounts what is left under its
    /// directory and removes it; reports what had to be cleaned up by force.
    pub fn stop(mut self) -> Teardown {
        self.teardown()
    }

    fn teardown(&mut self) -> Teardown {
        let started = Instant::now();
        let mut t = Teardown::default();
        if self.done {
            return t;
        }
        self.done = true;
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                self.child = Some(child);
                t.leftovers.extend(self.remove_everything());
                child = self.child.take().unwrap();
            }
            let term = Instant::now();
            t.leftovers.extend(crate::stop_daemon(&mut child, "containerd", || self.logs_tail(20)));
            t.containerd_stop = term.elapsed();
        }
        // Shims, VMs and daemons started for this containerd or its ids that outlived it.
        let ids = self.ids.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let grace = if t.leftovers.is_empty() { Duration::from_secs(2) } else { leaks::GRACE };
        let remaining = leaks::settle(grace, || leaks::find_leaks(&ids, Some(&self.dir)));
        if !remaining.is_empty() {
            t.leftovers.extend(remaining);
            t.leftovers.extend(leaks::force_cleanup(&ids, Some(&self.dir)));
        }
        t.leftovers.extend(self.remove_shim_sockets(&ids));
        for m in leaks::unmount_under(&self.dir) {
            t.leftovers.push(format!("mount under {}: {m}", self.dir.display()));
        }
        if let Err(e) = leaks::remove_tree(&self.dir) {
            if self.dir.exists() {
                t.leftovers.push(format!("could not remove {}: {e}", self.dir.display()));
            }
        }
        t.took = started.elapsed();
        t
    }

    /// Deletes every task (`ctr task rm -f`) and container of every namespace; returns them.
    fn remove_everything(&self) -> Vec<String> {
        let mut left = Vec::new();
        let quiet = |args: &[&str]| run_with_timeout(&mut self.ctr_command(args), None, Duration::from_secs(60));
        let list = |args: &[&str]| -> Vec<String> {
            quiet(args)
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default()
        };
        for ns in list(&["namespaces", "ls", "-q"]) {
            for task in list(&["-n", &ns, "task", "ls", "-q"]) {
                left.push(format!("task {ns}/{task} (removed with `ctr task rm -f`)"));
                let _ = quiet(&["-n", &ns, "task", "rm", "-f", &task]);
            }
            for c in list(&["-n", &ns, "container", "ls", "-q"]) {
                left.push(format!("container {ns}/{c} (removed)"));
                let _ = quiet(&["-n", &ns, "container", "rm", &c]);
            }
        }
        left
    }
}

impl Drop for TestContainerd {
    fn drop(&mut self) {
        let t = self.teardown();
        if !t.leftovers.is_empty() {
            let msg = format!(
                "private containerd {} had to clean up after the test:\n  {}",
                self.dir.display(),
                t.leftovers.join("\n  ")
            );
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

/// The last `n` lines of a container manager's log file, for assertion messages, preceded by its
/// last warnings and errors (a debug log buries them quickly); long lines are clipped.
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_else(|e| format!("({}: {e})", log.display()));
    let clip = |l: &str| {
        let mut end = l.len().min(2000);
        while !l.is_char_boundary(end) {
            end -= 1;
        }
        if end < l.len() {
            format!("{}...", &l[..end])
        } else {
            l.to_string()
        }
    };
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let important: Vec<String> = lines[..start]
        .iter()
        .filter(|l| {
            ["level=warning", "level=error", "level=fatal", "level=panic", "panic:"].iter().any(|k| l.contains(k))
        })
        .map(|l| clip(l))
        .collect();
    let important = &important[important.len().saturating_sub(15)..];
    let tail: Vec<String> = lines[start..].iter().map(|l| clip(l)).collect();
    let mut out = String::new();
    if !important.is_empty() {
        out += &format!("--- last warnings and errors in {} ---\n{}\n", log.display(), important.join("\n"));
    }
    out + &format!("--- last {} lines of {} ---\n{}\n---", tail.len(), log.display(), tail.join("\n"))
}

/// The default configuration of a private containerd in `dir`: root, state, sockets and the
/// opt plugin under it, the CRI plugin disabled, debug log level.
pub fn default_containerd_config(dir: &Path) -> String {
    containerd_base_config(dir, "Private containerd of podvisor-tests.", false)
}

/// What every private containerd of the tests shares: root, state, sockets and the opt plugin
/// under `dir`, debug log level, unused snapshotters off, and the CRI plugin off unless `cri`.
pub fn containerd_base_config(dir: &Path, comment: &str, cri: bool) -> String {
    let d = dir.display();
    let cri_off = if cri { "" } else { "  \"io.containerd.grpc.v1.cri\",\n" };
    format!(
        r#"# {comment}
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
{cri_off}  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
    )
}
