//! `kata-monitor`: one HTTP endpoint per node for Prometheus that gathers the metrics of every
//! running podvisor shim, as Kata's `kata-monitor` does.
//!
//! Nothing runs until it is scraped: on `GET /metrics` it lists the sandbox directories with a
//! monitor socket ([`shim::list`], `/run/vc/sbs/<id>/shim-monitor.sock`), asks every shim for its
//! `/metrics` in parallel (each bounded in time and size; a shim that fails, hangs or answers
//! garbage is skipped and counted in `kata_monitor_scrape_failed_count`) while it asks the
//! container manager's CRI `ListPodSandbox` for the pods' names, then answers its own
//! `kata_monitor_*` families followed by the shims' families, each sample labelled with
//! `sandbox_id`, `cri_uid`, `cri_name` and `cri_namespace` (empty when the manager does not know
//! the sandbox). `/sandboxes` lists the sandbox ids, `/agent-url?sandbox=ID` relays the shim's
//! agent URL.

#![deny(missing_docs)]

pub mod exposition;
pub mod shim;

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry, TextEncoder};
use slog::{debug, warn, Logger};

/// The text exposition format's content type.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Kata's default shim request timeout.
pub const DEFAULT_SHIM_TIMEOUT: Duration = Duration::from_secs(3);
/// The most one shim's `/metrics` answer may hold (Kata's answer is ~144 KB per sandbox).
pub const DEFAULT_MAX_SHIM_RESPONSE: usize = 4 << 20;
/// The most a shim's `/agent-url` answer may hold.
const MAX_AGENT_URL: usize = 4096;
/// The labels the monitor adds to every shim sample (a shim may not send them).
pub const SANDBOX_LABELS: [&str; 4] = ["sandbox_id", "cri_uid", "cri_name", "cri_namespace"];

/// What the monitor serves and how it reaches the shims and the CRI.
#[derive(Debug, Clone)]
pub struct Config {
    /// The shims' sandbox directories (`/run/vc/sbs`).
    pub sandboxes_dir: PathBuf,
    /// The container manager's CRI socket (`--runtime-endpoint`).
    pub runtime_endpoint: PathBuf,
    /// How long one shim (and the CRI call) may take.
    pub shim_timeout: Duration,
    /// The most one shim's `/metrics` answer may hold.
    pub max_shim_response: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sandboxes_dir: PathBuf::from(shim::DEFAULT_SANDBOXES_DIR),
            runtime_endpoint: PathBuf::from("/run/containerd/containerd.sock"),
            shim_timeout: DEFAULT_SHIM_TIMEOUT,
            max_shim_response: DEFAULT_MAX_SHIM_RESPONSE,
        }
    }
}

/// The CRI metadata of one sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMeta {
    /// `cri_uid`.
    pub uid: String,
    /// `cri_name`.
    pub name: String,
    /// `cri_namespace`.
    pub namespace: String,
}

/// The monitor: its configuration and its own metrics.
pub struct Monitor {
    config: Config,
    log: Logger,
    registry: Registry,
    running_shims: IntGauge,
    scrapes: IntCounter,
    failed_scrapes: IntCounter,
    durations: Histogram,
}

/// What one `/metrics` scrape found (for logs and tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrapeReport {
    /// Shims found.
    pub shims: usize,
    /// Shims whose answer was merged.
    pub scraped: usize,
    /// Shims skipped (dead, hung, refused, malformed), with the reason.
    pub failed: Vec<(String, String)>,
    /// Why the CRI labels are missing, when they are.
    pub cri_error: Option<String>,
}

impl Monitor {
    /// A monitor with its `kata_monitor_*` metrics registered.
    pub fn new(config: Config, log: Logger) -> Result<Arc<Monitor>, String> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace("kata_monitor");
        let running_shims = IntGauge::with_opts(opts("running_shim_count", "Running shim count(running sandboxes)."))
            .map_err(|e| e.to_string())?;
        let scrapes = IntCounter::with_opts(opts("scrape_count", "Scape count.")).map_err(|e| e.to_string())?;
        let failed_scrapes =
            IntCounter::with_opts(opts("scrape_failed_count", "Failed scape count.")).map_err(|e| e.to_string())?;
        let durations = Histogram::with_opts(
            HistogramOpts::new("scrape_durations_histogram_milliseconds", "Time used to scrape from shims")
                .namespace("kata_monitor")
                .buckets(prometheus::exponential_buckets(1.0, 2.0, 10).map_err(|e| e.to_string())?),
        )
        .map_err(|e| e.to_string())?;
        let process = prometheus::process_collector::ProcessCollector::new(std::process::id() as i32, "kata_monitor");
        for c in [
            Box::new(running_shims.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(scrapes.clone()),
            Box::new(failed_scrapes.clone()),
            Box::new(durations.clone()),
            Box::new(process),
        ] {
            registry.register(c).map_err(|e| format!("registering the kata_monitor metrics: {e}"))?;
        }
        Ok(Arc::new(Monitor { config, log, registry, running_shims, scrapes, failed_scrapes, durations }))
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The pods the CRI knows, by sandbox id.
    async fn cri_pods(&self) -> Result<HashMap<String, PodMeta>, String> {
        let timeout = self.config.shim_timeout;
        let channel = cri_api::grpc::connect_unix(&self.config.runtime_endpoint, timeout).await?;
        let pods = cri_api::grpc::list_pod_sandbox(&channel, timeout).await?;
        Ok(pods
            .into_iter()
            .map(|p| {
                let m = p.metadata.unwrap_or_default();
                (p.id, PodMeta { uid: m.uid, name: m.name, namespace: m.namespace })
            })
            .collect())
    }

    /// One scrape: the whole exposition text and what happened.
    pub async fn scrape(&self) -> (String, ScrapeReport) {
        let start = Instant::now();
        self.scrapes.inc();
        let mut report = ScrapeReport::default();
        let shims = match shim::list(&self.config.sandboxes_dir) {
            Ok(shims) => shims,
            Err(e) => {
                warn!(self.log, "{e}");
                Vec::new()
            }
        };
        report.shims = shims.len();
        self.running_shims.set(shims.len() as i64);

        let timeout = self.config.shim_timeout;
        let limit = self.config.max_shim_response;
        let mut tasks = tokio::task::JoinSet::new();
        for (id, socket) in shims {
            tasks.spawn(async move {
                let answer = match tokio::time::timeout(timeout, shim::get(&socket, "/metrics", limit)).await {
                    Ok(Ok(body)) => std::str::from_utf8(&body)
                        .map_err(|_| "the answer is not UTF-8".to_string())
                        .and_then(|text| exposition::parse(text, &SANDBOX_LABELS)),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                (id, answer)
            });
        }
        let pods = if tasks.is_empty() { Ok(HashMap::new()) } else { self.cri_pods().await };
        let pods = pods.unwrap_or_else(|e| {
            warn!(self.log, "no CRI labels this scrape"; "error" => &e);
            report.cri_error = Some(e);
            HashMap::new()
        });
        let mut answers = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(answer) => answers.push(answer),
                Err(e) => report.failed.push((String::new(), format!("scrape task: {e}"))),
            }
        }
        answers.sort_by(|a, b| a.0.cmp(&b.0));

        let mut merger = exposition::Merger::new();
        for (id, answer) in answers {
            let families = match answer {
                Ok(families) => families,
                Err(e) => {
                    warn!(self.log, "scraping shim failed"; "sandbox_id" => &id, "error" => &e);
                    report.failed.push((id, e));
                    continue;
                }
            };
            let meta = pods.get(&id).cloned().unwrap_or_default();
            let extra = [
                ("sandbox_id".to_string(), id.clone()),
                ("cri_uid".to_string(), meta.uid),
                ("cri_name".to_string(), meta.name),
                ("cri_namespace".to_string(), meta.namespace),
            ];
            for family in &families {
                if family.name.starts_with("kata_monitor_") {
                    debug!(self.log, "dropped a shim family in the monitor's namespace"; "sandbox_id" => &id, "family" => &family.name);
                    continue;
                }
                // Kata's rule for shims that export a client library's own families.
                let name = if family.name.starts_with("go_") || family.name.starts_with("process_") {
                    format!("kata_shim_{}", family.name)
                } else {
                    family.name.clone()
                };
                if let Err(e) = merger.add(&name, family, &extra) {
                    warn!(self.log, "dropped a shim family"; "sandbox_id" => &id, "error" => e);
                }
            }
            report.scraped += 1;
        }
        self.failed_scrapes.inc_by(report.failed.len() as u64);
        self.durations.observe(start.elapsed().as_secs_f64() * 1000.0);

        let mut out = String::new();
        let mut own = Vec::new();
        // Kata's kata_monitor_process_* are Go's process collector's, which has no `_threads`.
        let mut families = self.registry.gather();
        families.retain(|f| !f.name().ends_with("_process_threads"));
        if let Err(e) = TextEncoder::new().encode(&families, &mut own) {
            warn!(self.log, "encoding the kata_monitor metrics: {e}");
        }
        out.push_str(&String::from_utf8_lossy(&own));
        merger.write(&mut out);
        debug!(self.log, "scrape"; "shims" => report.shims, "scraped" => report.scraped, "failed" => report.failed.len(), "ms" => start.elapsed().as_millis() as u64);
        (out, report)
    }

    /// The sandbox ids with a monitor socket, one per line.
    pub fn sandboxes(&self) -> Result<String, String> {
        Ok(shim::list(&self.config.sandboxes_dir)?.into_iter().map(|(id, _)| id + "\n").collect())
    }

    /// The agent URL of sandbox `id` (the shim's `/agent-url`), or the HTTP status and message.
    pub async fn agent_url(&self, id: Option<&str>) -> Result<String, (StatusCode, String)> {
        let id = match id {
            Some(id) if !id.is_empty() => id,
            _ => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "missing sandbox: use /agent-url?sandbox=<sandbox id> (ids: /sandboxes)".into(),
                ))
            }
        };
        if !shim::valid_sandbox_id(id) {
            return Err((StatusCode::BAD_REQUEST, format!("{id:?} is not a sandbox id (ids: /sandboxes)")));
        }
        let Some(socket) = shim::monitor_socket(&self.config.sandboxes_dir, id) else {
            return Err((
                StatusCode::NOT_FOUND,
                format!(
                    "sandbox {id} is not running under podvisor here (no {}/{id}/{}; ids: /sandboxes)",
                    self.config.sandboxes_dir.display(),
                    shim::MONITOR_SOCKET
                ),
            ));
        };
        let timeout = self.config.shim_timeout;
        let body = match tokio::time::timeout(timeout, shim::get(&socket, "/agent-url", MAX_AGENT_URL)).await {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => return Err((StatusCode::BAD_GATEWAY, format!("the shim of sandbox {id}: {e}"))),
            Err(_) => {
                return Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("the shim of sandbox {id}: no answer within {timeout:?}"),
                ))
            }
        };
        match std::str::from_utf8(&body) {
            Ok(url) if !url.trim().is_empty() && !url.trim().contains(|c: char| c.is_control()) => {
                Ok(url.trim().to_string())
            }
            _ => Err((StatusCode::BAD_GATEWAY, format!("the shim of sandbox {id} answered a malformed agent URL"))),
        }
    }

    /// Serves one HTTP request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        if req.method() != Method::GET {
            let mut resp =
                text(StatusCode::METHOD_NOT_ALLOWED, format!("{} {path}: only GET is served\n", req.method()));
            resp.headers_mut().insert(hyper::header::ALLOW, HeaderValue::from_static("GET"));
            return resp;
        }
        match path.as_str() {
            "/metrics" => {
                let (body, _) = self.scrape().await;
                let mut resp = if accepts_gzip(&req) {
                    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                    match gz.write_all(body.as_bytes()).and_then(|()| gz.finish()) {
                        Ok(zipped) => {
                            let mut resp = Response::new(Full::new(Bytes::from(zipped)));
                            resp.headers_mut().insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                            resp
                        }
                        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("gzip: {e}\n")),
                    }
                } else {
                    Response::new(Full::new(Bytes::from(body)))
                };
                resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
                resp.headers_mut().insert(hyper::header::VARY, HeaderValue::from_static("accept-encoding"));
                resp
            }
            "/sandboxes" => match self.sandboxes() {
                Ok(list) => text(StatusCode::OK, list),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e + "\n"),
            },
            "/agent-url" => {
                let id = query_param(req.uri().query().unwrap_or(""), "sandbox");
                match self.agent_url(id.as_deref()).await {
                    Ok(url) => text(StatusCode::OK, url + "\n"),
                    Err((status, message)) => text(status, message + "\n"),
                }
            }
            _ => text(
                StatusCode::NOT_FOUND,
                format!("{path}: not found; served: /metrics, /sandboxes, /agent-url?sandbox=ID\n"),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// Whether the request's `Accept-Encoding` allows gzip (`gzip` or `*`, with a non-zero q).
pub fn accepts_gzip<B>(req: &Request<B>) -> bool {
    req.headers().get_all(ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).any(
        |coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or("");
            let zero = parts
                .any(|p| p.strip_prefix("q=").and_then(|q| q.trim().parse::<f32>().ok()).is_some_and(|q| q <= 0.0));
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !zero
        },
    )
}

/// The percent-decoded value of `name` in a query string.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_encoding::percent_decode_str(&v.replace('+', " ")).decode_utf8_lossy().into_owned())
    })
}

/// Serves HTTP/1.1 on `listener` until the process ends; each connection gets a task.
pub async fn serve(listener: tokio::net::TcpListener, monitor: Arc<Monitor>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(monitor.log, "accepting a connection: {e}");
                // EMFILE and the like: wait instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let monitor = monitor.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req| {
                let monitor = monitor.clone();
                async move { Ok::<_, std::convert::Infallible>(monitor.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(monitor.log, "connection ended"; "peer" => peer.to_string(), "error" => e.to_string());
            }
        });
    }
}

#[cfg(test)]
mod tests;
