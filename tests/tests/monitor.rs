//! `kata-monitor` (the binary) against a real container manager's CRI, once per manager: a
//! private containerd 1.6 with its CRI plugin or a private CRI-O 1.36 (`tests/src/cri.rs`) runs
//! a pod (runc handler: only its CRI record matters here), and fake shim monitor sockets in a
//! private sandboxes directory stand in for the shims (real HTTP/1.1 servers on unix sockets
//! that follow the socket contract: `/metrics`, `/agent-url`). The monitor must label the pod's
//! samples with its CRI uid, name and namespace, leave a sandbox the CRI does not know
//! unlabelled, skip and count a shim that never answers, serve gzip, `/sandboxes` and
//! `/agent-url`, and drop the labels once the pod is removed (no stale cache).
//!
//! Prerequisites (a missing one is a failure): those of `tests/cri.rs` (`scripts/deps.sh`) and
//! `cargo build -p podvisor-monitor` (the `kata-monitor` binary; `make test` builds it).
//!
//! Run: `cargo test -p podvisor-tests --test monitor -- --test-threads=1`. Where CRI-O 1.36 is
//! missing, the `_crio` test says so in one line (as in `tests/cri.rs`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podvisor_tests::cri::{Cri, Manager, RUNC_HANDLER};
use podvisor_tests::on_both_managers;

/// `target/{debug,release}/kata-monitor` (the newer one), or `$PODVISOR_MONITOR`.
fn monitor_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PODVISOR_MONITOR").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "PODVISOR_MONITOR={} does not exist", p.display());
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| podvisor_tests::workspace().join("target"));
    ["debug", "release"]
        .iter()
        .map(|p| target.join(p).join("kata-monitor"))
        .filter_map(|p| std::fs::metadata(&p).and_then(|m| m.modified()).ok().map(|t| (p, t)))
        .max_by_key(|(_, t)| *t)
        .map(|(p, _)| p)
        .unwrap_or_else(|| {
            panic!(
                "{}/{{debug,release}}/kata-monitor is missing: run `cargo build -p podvisor-monitor` first",
                target.display()
            )
        })
}

const SHIM_METRICS: &str = "# HELP kata_hypervisor_fds Open FDs for hypervisor.
# TYPE kata_hypervisor_fds gauge
kata_hypervisor_fds 42
";

/// A fake shim on `socket`: answers the contract from a thread until the process ends.
/// `hung`: accepts, reads, never answers.
fn fake_shim(socket: &Path, hung: bool) {
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let listener = UnixListener::bind(socket).unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            if hung {
                held.push(conn);
                continue;
            }
            let path = String::from_utf8_lossy(&req).split(' ').nth(1).unwrap_or("").to_string();
            let (status, body) = match path.as_str() {
                "/metrics" => ("200 OK", SHIM_METRICS.to_string()),
                "/agent-url" => ("200 OK", format!("hvsock://{}.hvsock:1024", socket.display())),
                _ => ("404 Not Found", String::new()),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The monitor process; killed and reaped on drop.
struct MonitorProcess(Child);

impl Drop for MonitorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` over HTTP/1.1: status code, headers (lowercase names) and body.
fn get(port: u16, path: &str, gzip: bool) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let enc = if gzip { "Accept-Encoding: gzip\r\n" } else { "" };
    write!(s, "GET {path} HTTP/1.1\r\nHost: monitor\r\n{enc}Connection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("no HTTP header end");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = raw[split + 4..].to_vec();
    assert!(!head.contains("transfer-encoding: chunked"), "unexpected chunked answer: {head}");
    (status, head, body)
}

fn text(body: Vec<u8>) -> String {
    String::from_utf8(body).unwrap()
}

on_both_managers!(
    monitor_labels_shims_with_cri_metadata_containerd,
    monitor_labels_shims_with_cri_metadata_crio,
    monitor_labels_shims_with_cri_metadata
);

fn monitor_labels_shims_with_cri_metadata(manager: Manager) {
    let cri = Cri::start(manager);
    let socket = match (cri.containerd(), cri.crio()) {
        (Some(c), _) => c.socket().to_path_buf(),
        (_, Some(c)) => c.socket().to_path_buf(),
        _ => unreachable!("a Cri runs containerd or CRI-O"),
    };
    let config = cri.pod_config("monitor-a");
    cri.prepare_pod(&config);
    let pod = cri.run_pod_with_handler(&config, RUNC_HANDLER);

    // Short: a 64-hex id plus the socket name leave little of sun_path's 108 bytes.
    // One directory per manager: both variants run at once in one test process.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sbs_dir = TempDir(PathBuf::from(format!("/tmp/pvm-{}-{n}", std::process::id())));
    let sbs = sbs_dir.0.clone();
    fake_shim(&sbs.join(&pod.id).join("shim-monitor.sock"), false);
    fake_shim(&sbs.join("orphan").join("shim-monitor.sock"), false);
    fake_shim(&sbs.join("stuck").join("shim-monitor.sock"), true);

    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(monitor_binary())
        .args(["--listen-address", &format!("127.0.0.1:{port}")])
        .args(["--runtime-endpoint", &format!("unix://{}", socket.display())])
        .args(["--sandboxes-dir", &sbs.display().to_string()])
        .args(["--shim-timeout-ms", "1500", "--log-level", "debug"])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawning kata-monitor");
    let _monitor = MonitorProcess(child);
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "kata-monitor does not listen on 127.0.0.1:{port}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let uid = pod.uid().to_string();
    let labelled = format!(
        "kata_hypervisor_fds{{sandbox_id=\"{}\",cri_uid=\"{uid}\",cri_name=\"monitor-a\",cri_namespace=\"podvisor-test\"}} 42\n",
        pod.id
    );
    let orphan = "kata_hypervisor_fds{sandbox_id=\"orphan\",cri_uid=\"\",cri_name=\"\",cri_namespace=\"\"} 42\n";

    let t = Instant::now();
    let (status, head, body) = get(port, "/metrics", false);
    let took = t.elapsed();
    let metrics = text(body);
    assert_eq!(status, 200, "{metrics}");
    assert!(head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"), "{head}");
    assert!(metrics.contains(&labelled), "no {labelled} in\n{metrics}");
    assert!(metrics.contains(orphan), "no {orphan} in\n{metrics}");
    assert!(!metrics.contains("sandbox_id=\"stuck\""), "{metrics}");
    assert!(metrics.contains("kata_monitor_running_shim_count 3\n"), "{metrics}");
    assert!(metrics.contains("kata_monitor_scrape_failed_count 1\n"), "the stuck shim: {metrics}");
    assert!(took < Duration::from_secs(60), "the stuck shim held the scrape {took:?}");

    let (status, head, body) = get(port, "/metrics", true);
    assert_eq!(status, 200);
    assert!(head.contains("content-encoding: gzip"), "{head}");
    let mut unzipped = String::new();
    flate2::read::GzDecoder::new(&body[..]).read_to_string(&mut unzipped).unwrap();
    assert!(unzipped.contains(&labelled), "{unzipped}");
    assert!(unzipped.contains("kata_monitor_scrape_count 2\n"), "{unzipped}");

    let (status, _, body) = get(port, "/sandboxes", false);
    let mut ids = vec![pod.id.clone(), "orphan".into(), "stuck".into()];
    ids.sort();
    assert_eq!((status, text(body)), (200, ids.iter().map(|id| format!("{id}\n")).collect::<String>()));

    let (status, _, body) = get(port, &format!("/agent-url?sandbox={}", pod.id), false);
    let want = format!("hvsock://{}.hvsock:1024\n", sbs.join(&pod.id).join("shim-monitor.sock").display());
    assert_eq!((status, text(body)), (200, want));
    let (status, _, body) = get(port, "/agent-url?sandbox=unknown", false);
    assert_eq!(status, 404, "{}", text(body));

    // The CRI is asked on every scrape: once the pod is gone, so are its labels.
    cri.remove_pod(&pod);
    let (_, _, body) = get(port, "/metrics", false);
    let metrics = text(body);
    let unlabelled =
        format!("kata_hypervisor_fds{{sandbox_id=\"{}\",cri_uid=\"\",cri_name=\"\",cri_namespace=\"\"}} 42\n", pod.id);
    assert!(metrics.contains(&unlabelled), "no {unlabelled} in\n{metrics}");
}
