//! The HTTP/1.1 server on the monitor socket (hyper). The socket's directory is root-only,
//! and the server is still bounded: at most [`MAX_CONNECTIONS`] connections, one request each
//! (no keep-alive), request heads of at most [`MAX_HEAD`] bytes read within [`HEAD_TIMEOUT`],
//! and every connection closed after [`CONNECTION_TIMEOUT`]. Stopping (or dropping) the handle ends the accept loop and every
//! connection and removes the directory.

use std::convert::Infallible;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use slog::{info, warn, Logger};
use tokio::net::UnixListener;
use tokio::task::JoinSet;

use super::{Source, SOCKET_NAME};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 8;
/// Largest request head (hyper's smallest buffer).
const MAX_HEAD: usize = 8192;
/// Time for a client to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Prometheus text format 0.0.4.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The running endpoint; stopping or dropping it ends the server and removes its directory.
pub struct MonitorHandle {
    dir: PathBuf,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MonitorHandle {
    /// The socket served.
    pub fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET_NAME)
    }

    /// Ends the server and its connections and removes the directory.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) fn start(dir: PathBuf, source: Source, log: Logger) -> std::io::Result<MonitorHandle> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let path = dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display())));
        }
    };
    info!(log, "metrics endpoint listening"; "socket" => %path.display());
    let task = tokio::spawn(serve(listener, source, log));
    Ok(MonitorHandle { dir, task: Some(task) })
}

async fn serve(listener: UnixListener, source: Source, log: Logger) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS {
            connections.join_next().await;
            continue;
        }
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(log, "metrics endpoint: accept failed"; "error" => %e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = source.clone();
        let log = log.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let source = source.clone();
                let log = log.clone();
                async move { Ok::<_, Infallible>(handle(req, &source, &log).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                // One request per connection: an idle kept-alive client never holds a slot,
                // and the connection's time limit never cuts a later request short.
                .keep_alive(false)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

async fn handle(req: Request<Incoming>, source: &Source, log: &Logger) -> Response<Full<Bytes>> {
    let plain = "text/plain; charset=utf-8";
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, plain, "only GET is served\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let (body, _) = super::scrape(source, log).await;
            text(StatusCode::OK, TEXT_FORMAT, body)
        }
        "/agent-url" => match source() {
            Some(view) => text(StatusCode::OK, plain, super::agent_url(&view.vm.agent_channel())),
            None => text(StatusCode::SERVICE_UNAVAILABLE, plain, "the sandbox VM is not running\n".into()),
        },
        other => text(StatusCode::NOT_FOUND, plain, format!("{other}: not found; try /metrics or /agent-url\n")),
    }
}
