//! The monitor against fake shims: real HTTP/1.1 servers on unix sockets that follow the shim
//! monitor socket's contract (`GET /metrics`, `GET /agent-url`, 404 otherwise), some of them
//! dead, hung or hostile, and the monitor's own HTTP server on a loopback port.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const SHIM_METRICS: &str = "# HELP kata_hypervisor_fds Open FDs for hypervisor.
# TYPE kata_hypervisor_fds gauge
kata_hypervisor_fds 42
# HELP kata_shim_agent_rpc_durations_histogram_milliseconds RPC latency distributions.
# TYPE kata_shim_agent_rpc_durations_histogram_milliseconds histogram
kata_shim_agent_rpc_durations_histogram_milliseconds_bucket{action=\"get_metrics\",le=\"1\"} 1
kata_shim_agent_rpc_durations_histogram_milliseconds_bucket{action=\"get_metrics\",le=\"+Inf\"} 2
kata_shim_agent_rpc_durations_histogram_milliseconds_sum{action=\"get_metrics\"} 3.5
kata_shim_agent_rpc_durations_histogram_milliseconds_count{action=\"get_metrics\"} 2
# TYPE process_open_fds gauge
process_open_fds 9
";

#[derive(Clone)]
enum Fake {
    /// Answers the contract: `/metrics` with `SHIM_METRICS`, `/agent-url` with a URL for `id`.
    Shim,
    /// Accepts and reads the request, never answers.
    Hung,
    /// Answers 200 with text that is not the exposition format.
    Garbage,
    /// Answers 200 with `n` bytes.
    Huge(usize),
}

/// A temporary sandboxes directory; removed on drop.
struct Sbs(PathBuf);

impl Sbs {
    fn new(name: &str) -> Sbs {
        let dir = std::env::temp_dir().join(format!("kata-monitor-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Sbs(dir)
    }

    fn socket(&self, id: &str) -> PathBuf {
        let dir = self.0.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(shim::MONITOR_SOCKET)
    }

    /// Starts a fake shim for sandbox `id` (served until the test's runtime ends).
    fn fake(&self, id: &str, fake: Fake) {
        let listener = tokio::net::UnixListener::bind(self.socket(id)).unwrap();
        let id = id.to_string();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else { return };
                let (fake, id) = (fake.clone(), id.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&req).lines().next().unwrap_or("").to_string();
                    let (status, body) = match (fake, line.split(' ').nth(1).unwrap_or("")) {
                        (Fake::Hung, _) => {
                            std::future::pending::<()>().await;
                            unreachable!()
                        }
                        (Fake::Garbage, _) => ("200 OK", "<html>not metrics{{{</html>\n".to_string()),
                        (Fake::Huge(n), _) => ("200 OK", format!("# {}\n", "x".repeat(n))),
                        (Fake::Shim, "/metrics") => ("200 OK", SHIM_METRICS.to_string()),
                        (Fake::Shim, "/agent-url") => ("200 OK", format!("hvsock:///run/vc/vm/{id}/kata.hvsock:1024")),
                        (Fake::Shim, _) => ("404 Not Found", String::new()),
                    };
                    let head = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(body.as_bytes()).await;
                });
            }
        });
    }

    /// A socket whose shim died: the file is there, nobody listens.
    fn dead(&self, id: &str) {
        drop(std::os::unix::net::UnixListener::bind(self.socket(id)).unwrap());
    }
}

impl Drop for Sbs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn monitor(sbs: &Path, timeout: Duration) -> Arc<Monitor> {
    // No container manager in unit tests: the CRI labels stay empty (tests/tests/monitor.rs
    // checks them against a real containerd).
    monitor_with_cri(sbs, &sbs.join("no-cri.sock"), timeout)
}

fn monitor_with_cri(sbs: &Path, cri: &Path, timeout: Duration) -> Arc<Monitor> {
    let config = Config {
        sandboxes_dir: sbs.to_path_buf(),
        runtime_endpoint: cri.to_path_buf(),
        shim_timeout: timeout,
        max_shim_response: 64 << 10,
    };
    Monitor::new(config, Logger::root(slog::Discard, slog::o!())).unwrap()
}

/// The monitor's HTTP server on a loopback port.
async fn server(m: Arc<Monitor>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, m));
    addr
}

use std::net::SocketAddr;

/// `GET path` on the monitor: status, headers, body bytes.
async fn get(addr: SocketAddr, path: &str, gzip: bool) -> (StatusCode, hyper::HeaderMap, Vec<u8>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::get(path).header(hyper::header::HOST, "monitor");
    if gzip {
        req = req.header(ACCEPT_ENCODING, "deflate, gzip;q=0.8");
    }
    let resp = sender.send_request(req.body(Empty::new()).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    (parts.status, parts.headers, body.collect().await.unwrap().to_bytes().to_vec())
}

fn gunzip(data: &[u8]) -> String {
    let mut out = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(data), &mut out).unwrap();
    out
}

/// The value of the sample line starting with `prefix` (a name and label set).
fn value(text: &str, prefix: &str) -> f64 {
    let line = text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn scrape_merges_shims_with_sandbox_labels_and_own_metrics() {
    let sbs = Sbs::new("merge");
    sbs.fake("aaa", Fake::Shim);
    sbs.fake("bbb", Fake::Shim);
    let m = monitor(&sbs.0, Duration::from_secs(10));
    let (text, report) = m.scrape().await;
    assert_eq!((report.shims, report.scraped, report.failed.len()), (2, 2, 0), "{report:?}");
    assert!(report.cri_error.as_deref().unwrap_or("").contains("no-cri.sock"), "{report:?}");
    for id in ["aaa", "bbb"] {
        let labels = format!("sandbox_id=\"{id}\",cri_uid=\"\",cri_name=\"\",cri_namespace=\"\"}}");
        assert_eq!(value(&text, &format!("kata_hypervisor_fds{{{labels}")), 42.0);
        assert_eq!(
            value(
                &text,
                &format!("kata_shim_agent_rpc_durations_histogram_milliseconds_count{{action=\"get_metrics\",{labels}")
            ),
            2.0
        );
        // Kata's renaming of a client library's process_* families.
        assert_eq!(value(&text, &format!("kata_shim_process_open_fds{{{labels}")), 9.0);
    }
    assert_eq!(text.matches("# TYPE kata_hypervisor_fds gauge\n").count(), 1);
    assert_eq!(value(&text, "kata_monitor_running_shim_count "), 2.0);
    assert_eq!(value(&text, "kata_monitor_scrape_count "), 1.0);
    assert_eq!(value(&text, "kata_monitor_scrape_failed_count "), 0.0);
    assert_eq!(value(&text, "kata_monitor_scrape_durations_histogram_milliseconds_count "), 1.0);
    assert!(value(&text, "kata_monitor_process_resident_memory_bytes ") > 0.0);
    assert!(value(&text, "kata_monitor_process_open_fds ") > 0.0);
    // The merged output is a valid exposition (families contiguous, one TYPE each).
    exposition::parse(&text, &[]).unwrap();
}

#[tokio::test]
async fn dead_hung_garbage_and_oversized_shims_are_skipped_and_counted() {
    let sbs = Sbs::new("faults");
    sbs.fake("good", Fake::Shim);
    sbs.dead("dead");
    sbs.fake("hung", Fake::Hung);
    sbs.fake("garbage", Fake::Garbage);
    sbs.fake("huge", Fake::Huge(100 << 10));
    let m = monitor(&sbs.0, Duration::from_secs(1));
    // The hung shim never answers: the scrape can only end through the per-shim timeout.
    let (text, report) = tokio::time::timeout(Duration::from_secs(60), m.scrape()).await.expect("the scrape hung");
    assert_eq!((report.shims, report.scraped), (5, 1), "{report:?}");
    let reason = |id: &str| report.failed.iter().find(|f| f.0 == id).map(|f| f.1.clone()).unwrap_or_default();
    assert!(reason("dead").contains("connecting"), "{report:?}");
    assert!(reason("hung").contains("no answer within 1s"), "{report:?}");
    assert!(reason("garbage").contains("line 1"), "{report:?}");
    assert!(reason("huge").contains("at most 65536 bytes"), "{report:?}");
    assert_eq!(value(&text, "kata_monitor_scrape_failed_count "), 4.0);
    assert_eq!(value(&text, "kata_monitor_running_shim_count "), 5.0);
    assert!(text.contains("sandbox_id=\"good\""));
    for id in ["dead", "hung", "garbage", "huge"] {
        assert!(!text.contains(&format!("sandbox_id=\"{id}\"")), "{id} leaked into\n{text}");
    }
}

#[tokio::test]
async fn a_cri_socket_that_never_answers_costs_the_labels_not_the_scrape() {
    let sbs = Sbs::new("hungcri");
    sbs.fake("pod1", Fake::Shim);
    // Accepts connections and never speaks HTTP/2.
    let cri = sbs.0.join("cri.sock");
    let listener = tokio::net::UnixListener::bind(&cri).unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let m = monitor_with_cri(&sbs.0, &cri, Duration::from_secs(1));
    let (text, report) = tokio::time::timeout(Duration::from_secs(60), m.scrape()).await.expect("the scrape hung");
    // Our bound or tonic's (the gRPC deadline sent with the call), whichever fires first.
    let cri_error = report.cri_error.as_deref().unwrap_or("");
    assert!(cri_error.contains("within 1s") || cri_error.contains("Timeout expired"), "{report:?}");
    assert_eq!((report.scraped, report.failed.len()), (1, 0), "{report:?}");
    assert!(
        text.contains("kata_hypervisor_fds{sandbox_id=\"pod1\",cri_uid=\"\",cri_name=\"\",cri_namespace=\"\"} 42\n")
    );
}

#[tokio::test]
async fn http_endpoints_gzip_sandboxes_and_agent_url() {
    let sbs = Sbs::new("http");
    sbs.fake("pod1", Fake::Shim);
    sbs.fake("pod2", Fake::Shim);
    sbs.dead("gone");
    let addr = server(monitor(&sbs.0, Duration::from_secs(10))).await;

    let (status, headers, plain) = get(addr, "/metrics", false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[CONTENT_TYPE], TEXT_FORMAT);
    assert!(headers.get(CONTENT_ENCODING).is_none());
    let plain = String::from_utf8(plain).unwrap();
    assert!(plain.contains("kata_hypervisor_fds{sandbox_id=\"pod1\""), "{plain}");

    let (status, headers, zipped) = get(addr, "/metrics", true).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[CONTENT_ENCODING], "gzip");
    assert_eq!(headers[hyper::header::VARY], "accept-encoding");
    assert_eq!(headers[CONTENT_TYPE], TEXT_FORMAT);
    let unzipped = gunzip(&zipped);
    assert!(zipped.len() < unzipped.len());
    assert!(unzipped.contains("kata_hypervisor_fds{sandbox_id=\"pod2\""), "{unzipped}");
    assert_eq!(value(&unzipped, "kata_monitor_scrape_count "), 2.0);
    assert_eq!(value(&unzipped, "kata_monitor_scrape_failed_count "), 2.0, "the dead shim, once per scrape");

    let (status, _, body) = get(addr, "/sandboxes", false).await;
    assert_eq!((status, String::from_utf8(body).unwrap().as_str()), (StatusCode::OK, "gone\npod1\npod2\n"));

    let (status, _, body) = get(addr, "/agent-url?sandbox=pod2", false).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(String::from_utf8(body).unwrap(), "hvsock:///run/vc/vm/pod2/kata.hvsock:1024\n");

    for (path, want_status, want) in [
        ("/agent-url", StatusCode::BAD_REQUEST, "missing sandbox"),
        ("/agent-url?sandbox=", StatusCode::BAD_REQUEST, "missing sandbox"),
        ("/agent-url?sandbox=..%2Fetc", StatusCode::BAD_REQUEST, "not a sandbox id"),
        ("/agent-url?sandbox=nope", StatusCode::NOT_FOUND, "sandbox nope is not running"),
        ("/agent-url?sandbox=gone", StatusCode::BAD_GATEWAY, "the shim of sandbox gone"),
        ("/nothing", StatusCode::NOT_FOUND, "not found"),
    ] {
        let (status, _, body) = get(addr, path, false).await;
        let body = String::from_utf8(body).unwrap();
        assert_eq!(status, want_status, "{path}: {body}");
        assert!(body.contains(want), "{path}: {body}");
    }
}

#[test]
fn accept_encoding_and_query() {
    let req = |v: &str| Request::get("/").header(ACCEPT_ENCODING, v).body(()).unwrap();
    assert!(accepts_gzip(&req("gzip")));
    assert!(accepts_gzip(&req("br, GZIP;q=0.5")));
    assert!(accepts_gzip(&req("*")));
    assert!(!accepts_gzip(&req("gzip;q=0")));
    assert!(!accepts_gzip(&req("identity, deflate")));
    assert!(!accepts_gzip(&Request::get("/").body(()).unwrap()));
    assert_eq!(query_param("a=1&sandbox=ab%63", "sandbox").as_deref(), Some("abc"));
    assert_eq!(query_param("sandbox", "sandbox").as_deref(), Some(""));
    assert_eq!(query_param("x=1", "sandbox"), None);
}
