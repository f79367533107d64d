//! The endpoint on the pod fakes: the text parses and holds Kata's families, the agent RPC
//! histogram counts calls, a hostile guest answer (huge, slow, garbage, foreign names) is
//! bounded and dropped while the host families still come, and the HTTP server answers,
//! refuses what it must and leaves nothing behind.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::agent::VmWatchedAgent;
use crate::pod::fakes::{FakeAgent, FakeBackend, FakeHypervisor};
use crate::sandbox::VmBackend;

fn log() -> Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

/// A started fake VM (its VMM is a `sleep`) and its agent, wrapped as the pod wraps it.
struct Fake {
    _dir: tempfile::TempDir,
    vm: Arc<FakeHypervisor>,
    agent: Arc<FakeAgent>,
    source: Source,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.vm.kill();
    }
}

async fn fake() -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let backend = FakeBackend::new(dir.path());
    let cfg = crate::config::parse("", Path::new("test.toml")).unwrap();
    let (vm, _) = backend.create_vm("monitor-unit", &cfg, Path::new("/nonexistent"), None, &log()).await.unwrap();
    vm.prepare().await.unwrap();
    vm.start().await.unwrap();
    let agent = backend.connect_agent(vm.as_ref(), Duration::from_secs(1), &log()).await.unwrap();
    let watched: Arc<dyn Agent> = Arc::new(VmWatchedAgent::new(agent, vm.clone()));
    let view = VmView { vm: vm.clone(), agent: watched, containers: vec![] };
    let source: Source = Arc::new(move || Some(view.clone()));
    Fake { _dir: dir, vm: backend.vm(), agent: backend.agent(), source }
}

/// Family name -> type, from the text (which must parse as Prometheus text).
fn families(text: &str) -> HashMap<String, String> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert!(!scrape.samples.is_empty(), "no samples in:\n{text}");
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (n, t) = l.split_once(' ').unwrap();
            (n.to_string(), t.to_string())
        })
        .collect()
}

const SHIM: [(&str, &str); 6] = [
    ("kata_shim_fds", "gauge"),
    ("kata_shim_threads", "gauge"),
    ("kata_shim_proc_stat", "gauge"),
    ("kata_shim_proc_status", "gauge"),
    ("kata_shim_io_stat", "gauge"),
    ("kata_shim_process_open_fds", "gauge"),
];

const GUEST: &str = "# HELP kata_guest_meminfo Statistics about memory usage in the guest.
# TYPE kata_guest_meminfo gauge
kata_guest_meminfo{item=\"mem_total\"} 2048000
kata_guest_meminfo{item=\"mem_free\"} 1024000
# HELP kata_agent_scrape_count Metrics scrape count
# TYPE kata_agent_scrape_count counter
kata_agent_scrape_count 7
";

#[tokio::test]
async fn without_a_vm_the_shim_families_come_alone() {
    let source: Source = Arc::new(|| None);
    let (text, info) = scrape(&source, &log()).await;
    let f = families(&text);
    for (name, kind) in SHIM {
        assert_eq!(f.get(name).map(String::as_str), Some(kind), "{name} in:\n{text}");
    }
    assert!(!info.guest);
    assert!(f.keys().all(|n| n.starts_with("kata_shim_")), "{f:?}");
    assert!(text.contains("kata_shim_proc_status{item=\"vmrss\"}"), "{text}");
    assert!(text.contains("kata_shim_io_stat{item=\"cancelledwritebytes\"}"), "{text}");
    assert!(!text.contains("kata_shim_netdev"), "the node's interfaces are not the pod's:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vm_adds_hypervisor_guest_and_overhead_families() {
    let fake = fake().await;
    *fake.agent.metrics_answer.lock().unwrap() = (GUEST.to_string(), Duration::ZERO);
    let (text, info) = scrape(&fake.source, &log()).await;
    let f = families(&text);
    for (name, kind) in SHIM.into_iter().chain([
        ("kata_hypervisor_fds", "gauge"),
        ("kata_hypervisor_threads", "gauge"),
        ("kata_hypervisor_proc_stat", "gauge"),
        ("kata_hypervisor_proc_status", "gauge"),
        ("kata_hypervisor_io_stat", "gauge"),
        ("kata_hypervisor_netdev", "gauge"),
        ("kata_shim_pod_overhead_cpu", "gauge"),
        ("kata_shim_pod_overhead_memory_in_bytes", "gauge"),
        ("kata_shim_agent_rpc_durations_histogram_milliseconds", "histogram"),
        ("kata_guest_meminfo", "gauge"),
        ("kata_agent_scrape_count", "counter"),
    ]) {
        assert_eq!(f.get(name).map(String::as_str), Some(kind), "{name} in:\n{text}");
    }
    assert!(info.guest);
    assert_eq!(info.dropped, 0);
    assert!(text.contains("kata_guest_meminfo{item=\"mem_total\"} 2048000"), "{text}");
    assert!(!text.contains("kata_virtiofsd_"), "the fake VM has no virtiofsd:\n{text}");
    // The fake VMM is `sleep`: one thread.
    assert!(text.contains("kata_hypervisor_threads 1\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_histogram_counts_every_agent_call_by_kata_action() {
    let fake = fake().await;
    let view = (fake.source)().unwrap();
    let before = agent_rpc_count("grpc.PauseContainerRequest");
    for _ in 0..3 {
        // The fake has no such container: a failed call is a call too.
        let _ = view.agent.pause_container("c1").await;
    }
    assert_eq!(agent_rpc_count("grpc.PauseContainerRequest"), before + 3);
    let (text, _) = scrape(&fake.source, &log()).await;
    let line = format!(
        "kata_shim_agent_rpc_durations_histogram_milliseconds_count{{action=\"grpc.PauseContainerRequest\"}} {}",
        agent_rpc_count("grpc.PauseContainerRequest")
    );
    assert!(text.contains(&line), "{line} not in:\n{text}");
    assert!(
        text.contains(
            "kata_shim_agent_rpc_durations_histogram_milliseconds_bucket{action=\"grpc.GetMetricsRequest\",le=\"512\"}"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn task_api_calls_are_timed_by_kata_action() {
    drop(time_task_rpc("checkpoint"));
    let source: Source = Arc::new(|| None);
    let (text, _) = scrape(&source, &log()).await;
    assert!(families(&text).get("kata_shim_rpc_durations_histogram_milliseconds").is_some_and(|t| t == "histogram"));
    let count = "kata_shim_rpc_durations_histogram_milliseconds_count{action=\"checkpoint\"} ";
    let n: u64 = text.lines().find_map(|l| l.strip_prefix(count)?.parse().ok()).unwrap_or_else(|| panic!("{text}"));
    assert!(n >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_answer_is_refused_and_the_host_families_still_come() {
    let fake = fake().await;
    let line = "kata_guest_meminfo{item=\"x\"} 1\n";
    let huge = line.repeat(guest::MAX_TEXT / line.len() + 1);
    *fake.agent.metrics_answer.lock().unwrap() = (huge, Duration::ZERO);
    let (text, info) = scrape(&fake.source, &log()).await;
    assert!(!info.guest);
    let f = families(&text);
    assert!(f.contains_key("kata_hypervisor_fds"), "{text}");
    assert!(!f.contains_key("kata_guest_meminfo"), "{text}");
    assert!(text.len() < 64 * 1024, "{} bytes", text.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_answers_is_cut_at_the_time_limit() {
    let fake = fake().await;
    // An hour is forever here: the scrape can only end through the limit.
    *fake.agent.metrics_answer.lock().unwrap() = (GUEST.to_string(), Duration::from_secs(3600));
    let started = std::time::Instant::now();
    let (text, info) = scrape(&fake.source, &log()).await;
    assert!(!info.guest);
    assert!(started.elapsed() < GUEST_TIMEOUT + Duration::from_secs(5));
    assert!(families(&text).contains_key("kata_hypervisor_fds"), "{text}");
    assert!(!text.contains("kata_guest_"), "{text}");
    assert!(text.contains("kata_shim_pod_overhead_cpu "), "the overhead does not wait for GetMetrics:\n{text}");
    // The abandoned call is gone with the scrape.
    assert_eq!(fake.agent.in_flight(), 0);
}

#[test]
fn garbage_and_foreign_families_are_dropped() {
    let text = "\
# TYPE go_goroutines gauge
go_goroutines 12
process_open_fds 3
kata_shim_fds 999
kata_hypervisor_threads 1
# TYPE kata_guest_load gauge
kata_guest_load{item=\"load1\"} 0.5
kata_guest_load{item=\"load5\"} notanumber
kata_guest_load{item=\"load15\"} 0.25 1700000000000
\u{0}\u{1}\u{ff}garbage {{{{ }}}} \"
kata_guest_tasks{__name__=\"evil\"} 1
kata_guest_näme 1
# TYPE kata_guest_lat histogram
kata_guest_lat_bucket{le=\"1\"} 1
kata_guest_lat_bucket{le=\"+Inf\"} 1
# TYPE kata_agent_x counter
kata_agent_x{a=\"quote\\\" and \\\\ back\"} 2
# HELP kata_agent_y help with \\n newline
kata_agent_y 3
";
    let out = guest::accept(text).unwrap();
    let names: HashSet<&str> = out.families.iter().map(|f| f.name()).collect();
    assert_eq!(names, HashSet::from(["kata_guest_load", "kata_agent_x", "kata_agent_y"]), "{:?}", out.families);
    assert!(out.dropped >= 6, "dropped {}", out.dropped);
    let mut encoded = Vec::new();
    TextEncoder::new().encode(&out.families, &mut encoded).unwrap();
    let encoded = String::from_utf8(encoded).unwrap();
    let again = guest::accept(&encoded).unwrap();
    assert_eq!(again.dropped, 0, "re-encoded text must be clean:\n{encoded}");
    assert_eq!(again.families.len(), 3);
    assert!(encoded.contains("kata_guest_load{item=\"load1\"} 0.5"), "{encoded}");
    assert!(!encoded.contains("load5"), "{encoded}");
}

#[test]
fn an_oversized_text_is_refused_whole() {
    let err = guest::accept(&"x".repeat(guest::MAX_TEXT + 1)).unwrap_err();
    assert!(err.contains("over the 1048576-byte limit"), "{err}");
}

/// One HTTP exchange on the socket: the raw answer, or what ended the connection.
async fn get(socket: &Path, request: &[u8]) -> String {
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await.expect("the server hung");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_refuses_and_leaves_nothing() {
    let fake = fake().await;
    *fake.agent.metrics_answer.lock().unwrap() = (GUEST.to_string(), Duration::ZERO);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sbs").join("pod1");
    let handle = server::start(dir.clone(), fake.source.clone(), log()).unwrap();
    let socket = handle.socket();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);

    let metrics = get(&socket, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("content-type: text/plain; version=0.0.4; charset=utf-8"), "{metrics}");
    assert!(metrics.contains("kata_hypervisor_fds "), "{metrics}");
    assert!(metrics.contains("kata_guest_meminfo{"), "{metrics}");

    let url = get(&socket, b"GET /agent-url HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(url.starts_with("HTTP/1.1 200") && url.ends_with("\r\n\r\nvsock://3:1024"), "{url}");

    // A client asking for keep-alive still gets one answer and the end of the connection.
    let kept = get(&socket, b"GET /agent-url HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(kept.starts_with("HTTP/1.1 200") && kept.contains("connection: close"), "{kept}");

    let missing = get(&socket, b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let post =
        get(&socket, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");

    // A head over the limit is refused (431) or cut, never buffered.
    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(vec![b'a'; 64 * 1024]);
    big.extend_from_slice(b"\r\n\r\n");
    let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let _ = s.write_all(&big).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await.expect("the server hung");
    let out = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out}");

    // A client that sends nothing is dropped after the head timeout.
    let mut idle = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), idle.read_to_end(&mut buf))
        .await
        .expect("an idle client is never dropped")
        .unwrap();

    handle.stop().await;
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(tokio::net::UnixStream::connect(&socket).await.is_err());
}

#[tokio::test]
async fn agent_url_is_katas_hybrid_vsock_form() {
    let ch = AgentChannel::HybridVsock { uds: "/run/kata-containers/vm/p/vm.vsock".into(), port: 1024 };
    assert_eq!(agent_url(&ch), "hvsock:///run/kata-containers/vm/p/vm.vsock:1024");
}
