//! In-process ttrpc round trip over a unix socket: the generated async server traits and clients
//! talk to each other through a real ttrpc server.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use podvisor_agent_protocol::{agent, agent_ttrpc, health, health_ttrpc};
use protobuf::MessageField;
use ttrpc::r#async::{Client, Server, TtrpcContext};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!("podvisor-agent-protocol-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct HealthSvc;

#[async_trait]
impl health_ttrpc::Health for HealthSvc {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        req: health::CheckRequest,
    ) -> ttrpc::Result<health::HealthCheckResponse> {
        // Echo-ish behaviour so the test can see the request arrived intact.
        let status = if req.service == "down" {
            health::health_check_response::ServingStatus::NOT_SERVING
        } else {
            health::health_check_response::ServingStatus::SERVING
        };
        Ok(health::HealthCheckResponse { status: status.into(), ..Default::default() })
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> ttrpc::Result<health::VersionCheckResponse> {
        Ok(health::VersionCheckResponse {
            grpc_version: "test-grpc".into(),
            agent_version: "9.8.7".into(),
            ..Default::default()
        })
    }
}

/// Implements only GetGuestDetails; every other RPC keeps the generated default.
struct AgentSvc {
    calls: AtomicUsize,
}

#[async_trait]
impl agent_ttrpc::AgentService for AgentSvc {
    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        req: agent::GuestDetailsRequest,
    ) -> ttrpc::Result<agent::GuestDetailsResponse> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(agent::GuestDetailsResponse {
            mem_block_size_bytes: if req.mem_block_size { 128 << 20 } else { 0 },
            support_mem_hotplug_probe: req.mem_hotplug_probe,
            agent_details: MessageField::some(agent::AgentDetails { version: "9.8.7".into(), ..Default::default() }),
            ..Default::default()
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_agent_over_unix_socket() {
    let dir = TempDir::new("ttrpc");
    let sock = dir.0.join("agent.sock");
    let addr = format!("unix://{}", sock.display());

    let agent_impl = Arc::new(AgentSvc { calls: AtomicUsize::new(0) });
    let mut services = health_ttrpc::create_health(Arc::new(HealthSvc));
    services.extend(agent_ttrpc::create_agent_service(agent_impl.clone()));
    assert!(services.contains_key("grpc.Health"));
    assert!(services.contains_key("grpc.AgentService"));

    let mut server = Server::new().bind(&addr).expect("bind").register_service(services);
    server.start().await.expect("start server");

    let client = Client::connect(&addr).await.expect("connect");
    let health_client = health_ttrpc::HealthClient::new(client.clone());
    let agent_client = agent_ttrpc::AgentServiceClient::new(client);
    let ctx = || ttrpc::context::with_duration(TIMEOUT);

    // Health.Check
    let r = health_client.check(ctx(), &health::CheckRequest::new()).await.expect("Check");
    assert_eq!(r.status.enum_value(), Ok(health::health_check_response::ServingStatus::SERVING));
    let r = health_client
        .check(ctx(), &health::CheckRequest { service: "down".into(), ..Default::default() })
        .await
        .expect("Check(down)");
    assert_eq!(r.status.enum_value(), Ok(health::health_check_response::ServingStatus::NOT_SERVING));

    // Health.Version
    let v = health_client.version(ctx(), &health::CheckRequest::new()).await.expect("Version");
    assert_eq!(v.agent_version, "9.8.7");
    assert_eq!(v.grpc_version, "test-grpc");

    // The one implemented AgentService method.
    let req = agent::GuestDetailsRequest { mem_block_size: true, mem_hotplug_probe: true, ..Default::default() };
    let d = agent_client.get_guest_details(ctx(), &req).await.expect("GetGuestDetails");
    assert_eq!(d.mem_block_size_bytes, 128 << 20);
    assert!(d.support_mem_hotplug_probe);
    assert_eq!(d.agent_details.version, "9.8.7");
    assert_eq!(agent_impl.calls.load(Ordering::SeqCst), 1);

    // An unimplemented method: the generated default returns a ttrpc status. With
    // ttrpc-compiler 0.9 that status is NOT_FOUND ("/grpc.AgentService/CreateContainer is not
    // supported"), not UNIMPLEMENTED.
    let err = agent_client
        .create_container(ctx(), &agent::CreateContainerRequest { container_id: "c".into(), ..Default::default() })
        .await
        .expect_err("CreateContainer is not implemented by this server");
    match err {
        ttrpc::Error::RpcStatus(status) => {
            assert_eq!(status.code(), ttrpc::Code::NOT_FOUND, "status: {status:?}");
            assert!(status.message().contains("/grpc.AgentService/CreateContainer"), "message: {}", status.message());
        }
        other => panic!("expected an RpcStatus error, got {other:?}"),
    }
    // A second unimplemented method, with a different response type.
    let err =
        agent_client.get_metrics(ctx(), &agent::GetMetricsRequest::new()).await.expect_err("GetMetrics unimplemented");
    assert!(matches!(err, ttrpc::Error::RpcStatus(ref s) if s.code() == ttrpc::Code::NOT_FOUND), "{err:?}");
    // The implemented method still works after errors on the same connection.
    agent_client.get_guest_details(ctx(), &req).await.expect("GetGuestDetails again");
    assert_eq!(agent_impl.calls.load(Ordering::SeqCst), 2);

    tokio::time::timeout(TIMEOUT, server.shutdown()).await.expect("shutdown in time").expect("shutdown");
    drop(dir);
    assert!(!sock.exists(), "temp dir cleaned up");
}
