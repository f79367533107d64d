//! The CRI client: `runtime.v1.RuntimeService` and `ImageService` over gRPC (tonic) on
//! containerd's unix socket, with the hand-written messages of [`super::proto`].

use std::path::Path;
use std::time::Duration;

use super::proto;

/// How long one CRI call may take before the test fails (a VM boots in seconds, even under TCG,
/// but two test threads on two cores share the machine).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(180);

/// An async client of a container manager's CRI services (`runtime.v1.RuntimeService`, `ImageService`)
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

    /// The same connection with another deadline per call (the gRPC timeout the server sees;
    /// CRI-O derives StopPodSandbox's grace period from it, as the kubelet's 2-minute
    /// `runtime-request-timeout` does on a node).
    pub fn with_timeout(&self, timeout: Duration) -> CriClient {
        CriClient { channel: self.channel.clone(), timeout }
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

    /// `ContainerStats`.
    pub async fn container_stats(&self, id: &str) -> CriResult<proto::ContainerStats> {
        let req = proto::ContainerStatsRequest { container_id: id.into() };
        let resp: proto::ContainerStatsResponse = self.call("/runtime.v1.RuntimeService/ContainerStats", req).await?;
        Ok(resp.stats.unwrap_or_default())
    }

    /// `ListContainerStats`, of one sandbox when `pod_id` is given.
    pub async fn list_container_stats(&self, pod_id: Option<&str>) -> CriResult<Vec<proto::ContainerStats>> {
        let filter = pod_id.map(|p| proto::ContainerStatsFilter { pod_sandbox_id: p.into(), ..Default::default() });
        let resp: proto::ListContainerStatsResponse = self
            .call("/runtime.v1.RuntimeService/ListContainerStats", proto::ListContainerStatsRequest { filter })
            .await?;
        Ok(resp.stats)
    }

    /// `PodSandboxStats`.
    pub async fn pod_sandbox_stats(&self, id: &str) -> CriResult<proto::PodSandboxStats> {
        let req = proto::PodSandboxStatsRequest { pod_sandbox_id: id.into() };
        let resp: proto::PodSandboxStatsResponse = self.call("/runtime.v1.RuntimeService/PodSandboxStats", req).await?;
        Ok(resp.stats.unwrap_or_default())
    }

    /// `ListPodSandboxStats` (all pods).
    pub async fn list_pod_sandbox_stats(&self) -> CriResult<Vec<proto::PodSandboxStats>> {
        let resp: proto::ListPodSandboxStatsResponse = self
            .call("/runtime.v1.RuntimeService/ListPodSandboxStats", proto::ListPodSandboxStatsRequest::default())
            .await?;
        Ok(resp.stats)
    }

    /// `UpdateContainerResources` (the kubelet's in-place resize).
    pub async fn update_container_resources(
        &self,
        id: &str,
        resources: proto::LinuxContainerResources,
    ) -> CriResult<()> {
        let req = proto::UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(resources),
            ..Default::default()
        };
        self.call::<_, proto::UpdateContainerResourcesResponse>(
            "/runtime.v1.RuntimeService/UpdateContainerResources",
            req,
        )
        .await
        .map(|_| ())
    }

    /// `ReopenContainerLog` (the kubelet's log rotation).
    pub async fn reopen_container_log(&self, id: &str) -> CriResult<()> {
        let req = proto::ReopenContainerLogRequest { container_id: id.into() };
        self.call::<_, proto::ReopenContainerLogResponse>("/runtime.v1.RuntimeService/ReopenContainerLog", req)
            .await
            .map(|_| ())
    }

    /// `ImageService/ListImages`.
    pub async fn list_images(&self) -> CriResult<Vec<proto::Image>> {
        let resp: proto::ListImagesResponse =
            self.call("/runtime.v1.ImageService/ListImages", proto::ListImagesRequest::default()).await?;
        Ok(resp.images)
    }
}
