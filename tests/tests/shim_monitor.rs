//! End-to-end: the shim's per-sandbox metrics endpoint (Kata's shim monitor socket,
//! `/run/vc/sbs/<sandbox-id>/shim-monitor.sock`) under a private containerd 1.6 running a
//! busybox container in a VM: `GET /metrics` holds the shim's, QEMU's and virtiofsd's
//! families with Kata's names, `GET /agent-url` names the hybrid vsock socket, and the
//! directory is gone after the pod stops and after `delete` of a SIGKILLed shim.
//!
//! Prerequisites (a missing one is a failure): `scripts/deps.sh`, `make guest-image`,
//! `cargo build -p podvisor-shim`. Run:
//! `cargo test -p podvisor-tests --test shim_monitor -- --test-threads=1`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podvisor_tests::containerd::{require_kata, TestContainerd};
use podvisor_tests::image;

const STATE_TIMEOUT: Duration = Duration::from_secs(90);

fn monitor_dir(id: &str) -> PathBuf {
    Path::new("/run/vc/sbs").join(id)
}

/// One `GET path` on the socket: (status line, headers, body).
fn get(socket: &Path, path: &str) -> (String, String, String) {
    let mut s = UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).expect("the answer is UTF-8");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {raw:?}"));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_ascii_lowercase(), body.to_string())
}

fn proc_status(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s.rsplit_once(')').unwrap().1.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The value of the sample `line_start` (name and labels), which must be present.
fn sample(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {line_start} in:\n{text}"))
}

fn start_sleeper(ctd: &TestContainerd, id: &str, fifo_dir: &str) {
    let rootfs = image::busybox_rootfs().display().to_string();
    ctd.ctr_ok(&["run", "-d", fifo_dir, "--runtime", ctd.runtime(), "--rootfs", &rootfs, id, "sleep", "1000"]);
    ctd.wait_for_status(id, "RUNNING", STATE_TIMEOUT);
}

#[test]
fn metrics_and_agent_url_of_a_running_pod_and_nothing_left_after_it() {
    require_kata("the shim's metrics endpoint");
    let ctd = TestContainerd::start();
    let id = ctd.new_id("monitor");
    let fifo_dir = format!("--fifo-dir={}", ctd.dir().join("fifo").display());
    start_sleeper(&ctd, &id, &fifo_dir);
    let shims = ctd.shim_pids(&id);
    assert_eq!(shims.len(), 1, "one shim serves {id}: {shims:?}");
    let shim = shims[0];
    // Idle: the endpoint exists and nobody scrapes; the shim should use no CPU.
    let rss_idle = proc_status(shim, "VmRSS:");
    let ticks = cpu_ticks(shim);
    std::thread::sleep(Duration::from_secs(3));
    let idle_ticks = cpu_ticks(shim) - ticks;
    eprintln!("shim {shim}: VmRSS {rss_idle} kB before any scrape; {idle_ticks} CPU ticks in 3 s idle");

    let dir = monitor_dir(&id);
    let socket = dir.join("shim-monitor.sock");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{} must be root-only", dir.display());

    let mut took = Vec::new();
    let mut text = String::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (status, headers, body) = get(&socket, "/metrics");
        took.push(t.elapsed());
        assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
        assert!(headers.contains("content-type: text/plain; version=0.0.4; charset=utf-8"), "{headers}");
        text = body;
    }
    took.sort();
    let guest = text.contains("kata_guest_meminfo");
    eprintln!(
        "/metrics: {} bytes, {} lines, median {:?} (min {:?}, max {:?}) over 5 scrapes; guest families: {guest}; shim VmRSS after: {} kB",
        text.len(),
        text.lines().filter(|l| !l.starts_with('#')).count(),
        took[2],
        took[0],
        took[4],
        proc_status(shim, "VmRSS:")
    );
    let guest_bytes: usize = text
        .lines()
        .filter(|l| ["kata_guest_", "kata_agent_"].iter().any(|p| l.contains(p) && !l.contains("GetMetricsRequest")))
        .map(|l| l.len() + 1)
        .sum();
    let rpc = "kata_shim_agent_rpc_durations_histogram_milliseconds";
    let get_metrics = "{action=\"grpc.GetMetricsRequest\"}";
    let guest_ms =
        sample(&text, &format!("{rpc}_sum{get_metrics}")) / sample(&text, &format!("{rpc}_count{get_metrics}"));
    eprintln!(
        "/metrics without the guest's families: {} bytes; GetMetrics round trip: {guest_ms:.1} ms on average",
        text.len() - guest_bytes
    );
    if let Ok(path) = std::env::var("PODVISOR_MONITOR_DUMP") {
        std::fs::write(path, &text).unwrap();
    }
    for family in [
        "# TYPE kata_hypervisor_fds gauge",
        "# TYPE kata_hypervisor_threads gauge",
        "# TYPE kata_hypervisor_proc_status gauge",
        "# TYPE kata_hypervisor_proc_stat gauge",
        "# TYPE kata_hypervisor_io_stat gauge",
        "# TYPE kata_hypervisor_netdev gauge",
        "# TYPE kata_virtiofsd_fds gauge",
        "# TYPE kata_virtiofsd_threads gauge",
        "# TYPE kata_virtiofsd_proc_status gauge",
        "# TYPE kata_virtiofsd_io_stat gauge",
        "# TYPE kata_shim_fds gauge",
        "# TYPE kata_shim_threads gauge",
        "# TYPE kata_shim_proc_status gauge",
        "# TYPE kata_shim_process_resident_memory_bytes gauge",
        "# TYPE kata_shim_pod_overhead_cpu gauge",
        "# TYPE kata_shim_pod_overhead_memory_in_bytes gauge",
        "# TYPE kata_shim_agent_rpc_durations_histogram_milliseconds histogram",
        "# TYPE kata_shim_rpc_durations_histogram_milliseconds histogram",
    ] {
        assert!(text.contains(family), "no `{family}` in:\n{text}");
    }
    assert!(!text.contains("sandbox_id"), "kata-monitor adds sandbox_id, the shim does not");
    assert!(sample(&text, "kata_hypervisor_fds") >= 10.0, "QEMU has more fds than that");
    assert!(sample(&text, "kata_hypervisor_threads") >= 2.0);
    assert!(sample(&text, "kata_hypervisor_proc_status{item=\"vmrss\"}") > 64.0 * 1024.0 * 1024.0);
    let created = "kata_shim_agent_rpc_durations_histogram_milliseconds_count{action=\"grpc.CreateContainerRequest\"}";
    assert_eq!(sample(&text, created), 1.0);
    for (action, n) in [("CheckRequest", 1.0), ("SetGuestDateTimeRequest", 1.0), ("CreateSandboxRequest", 1.0)] {
        let line = format!("kata_shim_agent_rpc_durations_histogram_milliseconds_count{{action=\"grpc.{action}\"}}");
        assert_eq!(sample(&text, &line), n, "{line}");
    }
    assert_eq!(sample(&text, "kata_shim_rpc_durations_histogram_milliseconds_count{action=\"create\"}"), 1.0);
    assert!(
        sample(&text, "kata_shim_agent_rpc_durations_histogram_milliseconds_count{action=\"grpc.GetMetricsRequest\"}")
            >= 4.0
    );
    // Every line is a comment or a sample of a kata_ family.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        assert!(l.starts_with("kata_"), "foreign line {l:?}");
    }

    let (status, _, url) = get(&socket, "/agent-url");
    assert_eq!(status, "HTTP/1.1 200 OK", "{url}");
    let uds = url
        .strip_prefix("hvsock://")
        .and_then(|u| u.strip_suffix(":1024"))
        .unwrap_or_else(|| panic!("/agent-url answered {url:?}"));
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(uds).map(|m| m.file_type().is_socket()).unwrap_or(false), "{uds} is not a socket");
    let (status, _, _) = get(&socket, "/nope");
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    ctd.ctr_ok(&["task", "kill", "-s", "KILL", &id]);
    ctd.wait_for_status(&id, "STOPPED", STATE_TIMEOUT);
    ctd.ctr_ok(&["task", "rm", &id]);
    ctd.ctr_ok(&["container", "rm", &id]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!dir.exists(), "{} is left after the pod stopped", dir.display());
    ctd.assert_no_leaks(&[&id]);
}

#[test]
fn a_killed_shims_monitor_directory_is_removed_by_delete() {
    require_kata("the shim's metrics endpoint");
    let ctd = TestContainerd::start();
    let id = ctd.new_id("monkill");
    let fifo_dir = format!("--fifo-dir={}", ctd.dir().join("fifo").display());
    start_sleeper(&ctd, &id, &fifo_dir);
    let dir = monitor_dir(&id);
    assert!(dir.join("shim-monitor.sock").exists(), "no monitor socket in {}", dir.display());
    let shims = ctd.shim_pids(&id);
    assert_eq!(shims.len(), 1, "one shim serves {id}: {shims:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shims[0] as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    // containerd runs `<shim> delete` when the connection closes; `task rm -f` finishes the job.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctd.task_status(&id).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let rm = ctd.ctr(&["task", "rm", "-f", &id]);
    let err = String::from_utf8_lossy(&rm.stderr);
    assert!(rm.status.success() || err.contains("not found"), "ctr task rm -f: {}", ctd.explain(&rm));
    ctd.ctr_ok(&["container", "rm", &id]);
    // containerd runs `delete` in the background of the task's removal: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!dir.exists(), "{} is left after delete of the killed shim", dir.display());
    ctd.assert_no_leaks(&[&id]);
}
