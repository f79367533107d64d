//! What the tests need to play CRI-O: its environment for `start`, a FIFO reader that opens the
//! way CRI-O does, and task-service calls sent by hand as `containerd.task.v2.Task` (the protos
//! crate's generated client speaks `v3`, containerd 2.x's name).

use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
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
