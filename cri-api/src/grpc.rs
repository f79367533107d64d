//! A gRPC channel to a container manager's CRI socket (a unix socket, as the kubelet dials it)
//! and one unary call with a deadline.

use std::path::Path;
use std::time::Duration;

/// A CRI call's error: what was called or dialed, and why it failed.
pub type CriResult<T> = Result<T, String>;

/// Connects to the gRPC server on the unix socket `socket` (inside a tokio runtime, which then
/// drives the connection). Fails within `timeout` when nothing answers.
pub async fn connect_unix(socket: &Path, timeout: Duration) -> CriResult<tonic::transport::Channel> {
    let path = socket.to_path_buf();
    let endpoint = tonic::transport::Endpoint::from_static("http://localhost").connect_timeout(timeout);
    let connect = endpoint.connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    }));
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(format!("connecting to the CRI socket {}: {e}", socket.display())),
        Err(_) => Err(format!("connecting to the CRI socket {}: no answer within {timeout:?}", socket.display())),
    }
}

/// One unary call of `path` (`/runtime.v1.RuntimeService/ListPodSandbox`, ...) on `channel`,
/// given up after `timeout` (also sent to the server as the gRPC deadline).
pub async fn unary<Req, Resp>(
    channel: &tonic::transport::Channel,
    path: &'static str,
    request: Req,
    timeout: Duration,
) -> CriResult<Resp>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let call = async {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.map_err(|e| format!("{path}: connection not ready: {e}"))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let mut req = tonic::Request::new(request);
        req.set_timeout(timeout);
        grpc.unary(req, tonic::codegen::http::uri::PathAndQuery::from_static(path), codec)
            .await
            .map(|resp| resp.into_inner())
            .map_err(|status| format!("{path}: {:?}: {}", status.code(), status.message()))
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(format!("{path}: no answer within {timeout:?}")),
    }
}

/// `RuntimeService/ListPodSandbox` without a filter: every sandbox the manager knows.
pub async fn list_pod_sandbox(
    channel: &tonic::transport::Channel,
    timeout: Duration,
) -> CriResult<Vec<crate::PodSandbox>> {
    let resp: crate::ListPodSandboxResponse =
        unary(channel, "/runtime.v1.RuntimeService/ListPodSandbox", crate::ListPodSandboxRequest::default(), timeout)
            .await?;
    Ok(resp.items)
}
