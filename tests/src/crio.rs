//! What the tests need to play CRI-O: its environment for `start`, a FIFO reader that opens the
//! way CRI-O does, and task-service calls sent by hand as `containerd.task.v2.Task` (the protos
//! crate's generated client speaks `v3`, containerd 2.x's name).

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// CRI-O's environment additions for `start` (its containerd 1.7 shim client).
pub const CRIO_ENV: &[(&str, &str)] = &[
    ("GOMAXPROCS", "2"),
    ("MAX_SHIM_VERSION", "2"),
    ("TTRPC_ADDRESS", ""),
    ("GRPC_ADDRESS", ""),
    ("NAMESPACE", "default"),
];

/// The shim binary run the way both container managers run it: `cwd` (the bundle), `PATH`
/// with `/usr/local/bin` (where the helper daemons are installed), `KATA_CONF_FILE`.
pub fn shim_command(shim: &Path, cwd: &Path, config: &Path) -> Command {
    let mut cmd = Command::new(shim);
    let mut path = std::env::var("PATH").unwrap_or_default();
    if !path.split(':').any(|p| p == "/usr/local/bin") {
        path = format!("/usr/local/bin:{path}");
    }
    cmd.current_dir(cwd).env("PATH", path).env("KATA_CONF_FILE", config);
    cmd
}

/// `<shim> -namespace default -address "" -publish-binary /usr/bin/crio -id <id> start` with
/// CRI-O's environment, cwd (the bundle) and stdin, stdout and stderr on one pipe read to EOF
/// (Go's CombinedOutput). Returns the one `unix:///` address it must print, after checking that
/// `<bundle>/address` holds the same.
pub fn crio_start(shim: &Path, config: &Path, bundle: &Path, id: &str) -> Result<String, String> {
    let (r, w) = crate::containerd::pipe();
    let mut cmd = shim_command(shim, bundle, config);
    cmd.args(["-namespace", "default", "-address", "", "-publish-binary", "/usr/bin/crio", "-id", id, "start"])
        .stdin(Stdio::null())
        .stdout(Stdio::from(w.try_clone().map_err(|e| format!("dup of the output pipe: {e}"))?))
        .stderr(Stdio::from(w));
    for (k, v) in CRIO_ENV {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| format!("spawning {}: {e}", shim.display()))?;
    drop(cmd);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| format!("waiting for `start`: {e}"))? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("`start` did not exit within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    nix::fcntl::fcntl(r.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
        .map_err(|e| format!("O_NONBLOCK on the output pipe: {e}"))?;
    let mut r = fs::File::from(r);
    let mut combined = Vec::new();
    let eof_deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => combined.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > eof_deadline {
                    return Err(format!(
                        "`start` exited but its stdout/stderr stay open (the daemon inherited them): CRI-O's \
                         CombinedOutput would hang; printed so far: {:?}",
                        String::from_utf8_lossy(&combined)
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("reading start's output: {e}")),
        }
    }
    let printed = String::from_utf8_lossy(&combined).into_owned();
    if !status.success() {
        return Err(format!("`start` for {id} failed ({status}): {printed}"));
    }
    let address = printed.trim().to_string();
    if !address.starts_with("unix:///") || address.contains(char::is_whitespace) {
        return Err(format!(
            "`start` must print exactly one unix:/// address (stdout and stderr together), printed {printed:?}"
        ));
    }
    let file = fs::read_to_string(bundle.join("address")).map_err(|e| format!("<bundle>/address: {e}"))?;
    if file.trim() != address {
        return Err(format!("<bundle>/address holds {file:?}, start printed {address:?}"));
    }
    Ok(address)
}

/// The task service containerd 1.6 and CRI-O 1.36 call.
pub const TASK_SERVICE: &str = "containerd.task.v2.Task";

/// Reads a FIFO the way CRI-O does (created and opened `O_RDONLY|O_NONBLOCK` before the
/// writer), in the background, until [`FifoReader::finish`].
pub struct FifoReader {
    stop: Arc<AtomicBool>,
    data: Arc<Mutex<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FifoReader {
    /// Creates the FIFO at `path` and starts reading it.
    pub fn open(path: &Path) -> FifoReader {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let data = Arc::new(Mutex::new(Vec::new()));
        let (s, d) = (stop.clone(), data.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            let mut stopped_at: Option<Instant> = None;
            loop {
                match file.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        d.lock().unwrap().extend_from_slice(&buf[..n]);
                        continue;
                    }
                    // 0: no writer (yet, or any more); WouldBlock: a writer, no data.
                    Ok(_) if s.load(Ordering::SeqCst) => break,
                    _ => {}
                }
                // Asked to stop while a writer still holds the FIFO: give up after a while.
                if s.load(Ordering::SeqCst)
                    && stopped_at.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(5)
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        FifoReader { stop, data, thread: Some(thread) }
    }

    /// What arrived so far.
    pub fn so_far(&self) -> String {
        String::from_utf8_lossy(&self.data.lock().unwrap()).into_owned()
    }

    /// Stops reading (after draining) and returns everything.
    pub fn finish(mut self) -> String {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.so_far()
    }
}

impl Drop for FifoReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// One `containerd.task.v2.Task` call. `namespaced` adds the `containerd-namespace-ttrpc:
/// default` metadata CRI-O's calls after the first Create carry; `timeout` None: no deadline
/// (a held Wait).
pub async fn task_call<Req: protobuf::Message, Resp: protobuf::Message>(
    client: &ttrpc::asynchronous::Client,
    method: &str,
    req: &Req,
    namespaced: bool,
    timeout: Option<Duration>,
) -> Result<Resp, String> {
    use ttrpc::proto::{Codec, RequestInit};
    let payload = Codec::encode(req).map_err(|e| format!("{method}: encoding: {e}"))?;
    let metadata = if namespaced {
        vec![ttrpc::proto::KeyValue {
            key: "containerd-namespace-ttrpc".into(),
            value: "default".into(),
            ..Default::default()
        }]
    } else {
        vec![]
    };
    let nanos = timeout.map_or(0, |t| t.as_nanos() as i64);
    let mut request = ttrpc::Request::init_request(TASK_SERVICE.into(), method.into(), nanos, metadata);
    request.set_payload(payload);
    let response = client.request(request).await.map_err(|e| format!("{TASK_SERVICE}/{method}: {e}"))?;
    let mut out = Resp::new();
    Codec::merge(&mut out, &response.payload).map_err(|e| format!("{method}: decoding the response: {e}"))?;
    Ok(out)
}
