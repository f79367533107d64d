//! The CRI client: `runtime.v1.RuntimeService` and `ImageService` over gRPC (tonic) on
//! containerd's unix socket, with the hand-written messages of [`super::proto`].

use std::path::Path;
use std::time::Duration;

use super::proto;

/// How long one CRI call may take before the test fails (a VM boots in seconds, even under TCG,
/// but two test threads on two cores share the machine).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(180);

/// An async client of containerd's CRI services (`runtime.v1.RuntimeService`, `ImageService`)
/// on a unix socket. Cloning is cheap (one HTTP/2 connection).
#[derive(Clone)]
pub struct CriClient {
    channel: tonic::transport::Channel,
    timeout: Duration,
}

/// A CRI call's error: the method and gRPC status.
pub type CriResult<T> = Result<T, String>;

impl CriClient {
    /// Connects to the gRPC socket (must run inside a tokio runtime, which then drives the
    /// connection).
    pub async fn connect(socket: &Path) -> CriResult<Self> {
        let path = socket.to_path_buf();
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
        Ok(CriClient { channel, timeout: CALL_TIMEOUT })
    }

    /// One unary call of `path` (`/runtime.v1.RuntimeService/Version`, ...).
    pub async fn call<Req, Resp>(&self, path: &'static str, request: Req) -> CriResult<Resp>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(|e| format!("{path}: connection not ready: {e}"))?;
        let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
        let mut req = tonic::Request::new(request);
        req.set_timeout(self.timeout);
        let fut = grpc.unary(req, tonic::codegen::http::uri::PathAndQuery::from_static(path), codec);
        match tokio::time::timeout(self.timeout + Duration::from_secs(5), fut).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(format!("{path}: {:?}: {}", status.code(), status.message())),
            Err(_) => Err(format!("{path}: no answer within {:?}", self.timeout)),
        }
    }

    /// `Version`.
    pub async fn version(&self) -> CriResult<proto::VersionResponse> {
        self.call("/runtime.v1.RuntimeService/Version", proto::VersionRequest { version: "v1".into() }).await
    }

    /// `Status` (runtime and network conditions).
    pub async fn status(&self) -> CriResult<proto::StatusResponse> {
        self.call("/runtime.v1.RuntimeService/Status", proto::StatusRequest { verbose: false }).await
    }

    /// `RunPodSandbox` with `handler`; returns the sandbox id.
    pub async fn run_pod_sandbox(&self, config: &proto::PodSandboxConfig, handler: &str) -> CriResult<String> {
        let req = proto::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: handler.into() };
        let resp: proto::RunPodSandboxResponse = self.call("/runtime.v1.RuntimeService/RunPodSandbox", req).await?;
        Ok(resp.pod_sandbox_id)
    }

    /// `StopPodSandbox`.
    pub async fn stop_pod_sandbox(&self, id: &str) -> CriResult<()> {
        let req = proto::StopPodSandboxRequest { pod_sandbox_id: id.into() };
        self.call::<_, proto::StopPodSandboxResponse>("/runtime.v1.RuntimeService/StopPodSandbox", req)
            .await
            .map(|_| ())
    }

    /// `RemovePodSandbox`.
    pub async fn remove_pod_sandbox(&self, id: &str) -> CriResult<()> {
        let req = proto::RemovePodSandboxRequest { pod_sandbox_id: id.into() };
        self.call::<_, proto::RemovePodSandboxResponse>("/runtime.v1.RuntimeService/RemovePodSandbox", req)
            .await
            .map(|_| ())
    }

    /// `PodSandboxStatus` (verbose: `info["info"]` holds containerd's JSON).
    pub async fn pod_sandbox_status(&self, id: &str, verbose: bool) -> CriResult<proto::PodSandboxStatusResponse> {
        let req = proto::PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose };
        self.call("/runtime.v1.RuntimeService/PodSandboxStatus", req).await
    }

    /// `ListPodSandbox` (all).
    pub async fn list_pod_sandbox(&self) -> CriResult<Vec<proto::PodSandbox>> {
        let resp: proto::ListPodSandboxResponse =
            self.call("/runtime.v1.RuntimeService/ListPodSandbox", proto::ListPodSandboxRequest::default()).await?;
        Ok(resp.items)
    }

    /// `CreateContainer` in sandbox `pod_id`; returns the container id.
    pub async fn create_container(
        &self,
        pod_id: &str,
        config: &proto::ContainerConfig,
        sandbox_config: &proto::PodSandboxConfig,
    ) -> CriResult<String> {
        let req = proto::CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox_config.clone()),
        };
        let resp: proto::CreateContainerResponse = self.call("/runtime.v1.RuntimeService/CreateContainer", req).await?;
        Ok(resp.container_id)
    }

    /// `StartContainer`.
    pub async fn start_container(&self, id: &str) -> CriResult<()> {
        let req = proto::StartContainerRequest { container_id: id.into() };
        self.call::<_, proto::StartContainerResponse>("/runtime.v1.RuntimeService/StartContainer", req)
            .await
            .map(|_| ())
    }

    /// `StopContainer` (SIGTERM, SIGKILL after `timeout_s`; 0: SIGKILL at once).
    pub async fn stop_container(&self, id: &str, timeout_s: i64) -> CriResult<()> {
        let req = proto::StopContainerRequest { container_id: id.into(), timeout: timeout_s };
        self.call::<_, proto::StopContainerResponse>("/runtime.v1.RuntimeService/StopContainer", req).await.map(|_| ())
    }

    /// `RemoveContainer`.
    pub async fn remove_container(&self, id: &str) -> CriResult<()> {
        let req = proto::RemoveContainerRequest { container_id: id.into() };
        self.call::<_, proto::RemoveContainerResponse>("/runtime.v1.RuntimeService/RemoveContainer", req)
            .await
            .map(|_| ())
    }

    /// `ListContainers`, of one sandbox when `pod_id` is given.
    pub async fn list_containers(&self, pod_id: Option<&str>) -> CriResult<Vec<proto::Container>> {
        let filter = pod_id.map(|p| proto::ContainerFilter { pod_sandbox_id: p.into(), ..Default::default() });
        let resp: proto::ListContainersResponse =
            self.call("/runtime.v1.RuntimeService/ListContainers", proto::ListContainersRequest { filter }).await?;
        Ok(resp.containers)
    }

    /// `ContainerStatus`.
    pub async fn container_status(&self, id: &str, verbose: bool) -> CriResult<proto::ContainerStatusResponse> {
        let req = proto::ContainerStatusRequest { container_id: id.into(), verbose };
        self.call("/runtime.v1.RuntimeService/ContainerStatus", req).await
    }

    /// `ExecSync` (`timeout_s` 0: none).
    pub async fn exec_sync(&self, id: &str, cmd: &[&str], timeout_s: i64) -> CriResult<proto::ExecSyncResponse> {
        let req = proto::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_s,
        };
        self.call("/runtime.v1.RuntimeService/ExecSync", req).await
    }

    /// `Exec` (streaming): returns the URL to connect to.
    pub async fn exec_url(&self, req: proto::ExecRequest) -> CriResult<String> {
        let resp: proto::StreamUrlResponse = self.call("/runtime.v1.RuntimeService/Exec", req).await?;
        Ok(resp.url)
    }

    /// `Attach` (streaming): returns the URL to connect to.
    pub async fn attach_url(&self, req: proto::AttachRequest) -> CriResult<String> {
        let resp: proto::StreamUrlResponse = self.call("/runtime.v1.RuntimeService/Attach", req).await?;
        Ok(resp.url)
    }

    /// `ImageService/ListImages`.
    pub async fn list_images(&self) -> CriResult<Vec<proto::Image>> {
        let resp: proto::ListImagesResponse =
            self.call("/runtime.v1.ImageService/ListImages", proto::ListImagesRequest::default()).await?;
        Ok(resp.images)
    }
}
