//! The ttrpc services: `grpc.Health` and `grpc.AgentService` on vsock port 1024.
//!
//! Every RPC of Kata's agent API is registered. Those this agent implements are below; every
//! other one answers a ttrpc status UNIMPLEMENTED that names the RPC (never a fake success).

use std::collections::HashSet;
use std::sync::Arc;

use agent_protocol::{agent as pb, agent_ttrpc, health, health_ttrpc, AGENT_VSOCK_PORT};
use async_trait::async_trait;
use slog::{info, warn, Logger};
use ttrpc::asynchronous::{MethodHandler, Server, TtrpcContext};
use ttrpc::{Code, Request, Response};

use crate::container::Containers;
use crate::guest::{self, Sysfs};
use crate::VERSION;

/// AgentService RPCs implemented here; the rest answer UNIMPLEMENTED.
pub const IMPLEMENTED: &[&str] = &[
    "GetGuestDetails",
    "SetGuestDateTime",
    "OnlineCPUMem",
    "GetMetrics",
    "CreateSandbox",
    "DestroySandbox",
    "CreateContainer",
    "StartContainer",
    "RemoveContainer",
    "ExecProcess",
    "SignalProcess",
    "WaitProcess",
    "UpdateContainer",
    "StatsContainer",
    "PauseContainer",
    "ResumeContainer",
    "WriteStdin",
    "ReadStdout",
    "ReadStderr",
    "CloseStdin",
    "TtyWinResize",
    "GetOOMEvent",
    "UpdateInterface",
    "UpdateRoutes",
    "AddARPNeighbors",
    "ListInterfaces",
    "ListRoutes",
    "SetPolicy",
    "CopyFile",
];

/// Features reported in `AgentDetails.extra_features`.
const FEATURES: &[&str] = &["vsock", "hybrid-vsock", "memory-hotplug", "cpu-hotplug", "containers"];

type Empty = protobuf::well_known_types::empty::Empty;

fn status(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

struct HealthService;

#[async_trait]
impl health_ttrpc::Health for HealthService {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> ttrpc::Result<health::HealthCheckResponse> {
        let mut r = health::HealthCheckResponse::new();
        r.status = health::health_check_response::ServingStatus::SERVING.into();
        Ok(r)
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> ttrpc::Result<health::VersionCheckResponse> {
        Ok(health::VersionCheckResponse {
            grpc_version: "ttrpc".into(),
            agent_version: VERSION.into(),
            ..Default::default()
        })
    }
}

struct AgentService {
    log: Logger,
    sysfs: Sysfs,
    shutdown: Arc<tokio::sync::Notify>,
    containers: Arc<Containers>,
    policy: Arc<crate::policy::AgentPolicy>,
}

#[async_trait]
impl agent_ttrpc::AgentService for AgentService {
    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        req: pb::GuestDetailsRequest,
    ) -> ttrpc::Result<pb::GuestDetailsResponse> {
        let mut r = pb::GuestDetailsResponse::new();
        if req.mem_block_size {
            r.mem_block_size_bytes = self.sysfs.memory_block_size().map_err(|e| status(Code::INTERNAL, e.0))?;
        }
        if req.mem_hotplug_probe {
            r.support_mem_hotplug_probe = self.sysfs.memory_probe_supported();
        }
        r.agent_details = Some(pb::AgentDetails {
            version: VERSION.into(),
            init_daemon: nix::unistd::getpid().as_raw() == 1,
            extra_features: FEATURES.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .into();
        Ok(r)
    }

    async fn set_guest_date_time(
        &self,
        _ctx: &TtrpcContext,
        req: pb::SetGuestDateTimeRequest,
    ) -> ttrpc::Result<protobuf::well_known_types::empty::Empty> {
        if !(0..1_000_000).contains(&req.Usec) || req.Sec < 0 {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("SetGuestDateTime: invalid time Sec={} Usec={}", req.Sec, req.Usec),
            ));
        }
        guest::set_time(req.Sec, req.Usec).map_err(|e| status(Code::INTERNAL, e.0))?;
        Ok(Default::default())
    }

    async fn online_cpu_mem(
        &self,
        _ctx: &TtrpcContext,
        req: pb::OnlineCPUMemRequest,
    ) -> ttrpc::Result<protobuf::well_known_types::empty::Empty> {
        let sysfs = self.sysfs.clone();
        let work = move || -> Result<(u32, u32), guest::GuestError> {
            let wait = if req.wait { std::time::Duration::from_secs(5) } else { std::time::Duration::ZERO };
            let cpus = if req.nb_cpus > 0 { sysfs.online_cpus_waiting(req.nb_cpus, wait)? } else { 0 };
            let blocks = if req.cpu_only { 0 } else { sysfs.online_memory()? };
            Ok((cpus, blocks))
        };
        let (cpus, blocks) = tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| status(Code::INTERNAL, format!("OnlineCPUMem: {e}")))?
            .map_err(|e| status(Code::INTERNAL, format!("OnlineCPUMem: {}", e.0)))?;
        info!(self.log, "onlined hot-added resources"; "cpus" => cpus, "memory_blocks" => blocks, "requested_cpus" => req.nb_cpus);
        if req.nb_cpus > 0 && cpus < req.nb_cpus {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!(
                    "OnlineCPUMem: only {cpus} of {} requested CPUs were offline to online; hot-add them first",
                    req.nb_cpus
                ),
            ));
        }
        Ok(Default::default())
    }

    async fn get_metrics(&self, _ctx: &TtrpcContext, _req: pb::GetMetricsRequest) -> ttrpc::Result<pb::Metrics> {
        let gathered = tokio::task::spawn_blocking(crate::metrics::gather)
            .await
            .map_err(|e| status(Code::INTERNAL, format!("GetMetrics: {e}")))?
            .map_err(|e| status(Code::INTERNAL, format!("GetMetrics: {e}")))?;
        if !gathered.skipped.is_empty() {
            warn!(self.log, "GetMetrics: some sources could not be read"; "skipped" => gathered.skipped.join("; "));
        }
        Ok(pb::Metrics { metrics: gathered.text, ..Default::default() })
    }

    async fn destroy_sandbox(&self, _ctx: &TtrpcContext, _req: pb::DestroySandboxRequest) -> ttrpc::Result<Empty> {
        info!(self.log, "DestroySandbox: stopping containers and shutting the guest down");
        let c = self.containers.clone();
        detached(async move {
            c.destroy_sandbox().await;
            Ok(())
        })
        .await?;
        self.shutdown.notify_one();
        Ok(Default::default())
    }

    async fn create_sandbox(&self, _ctx: &TtrpcContext, req: pb::CreateSandboxRequest) -> ttrpc::Result<Empty> {
        self.containers.create_sandbox(&req)?;
        Ok(Default::default())
    }

    async fn create_container(&self, _ctx: &TtrpcContext, req: pb::CreateContainerRequest) -> ttrpc::Result<Empty> {
        let c = self.containers.clone();
        detached(async move { c.create_container(&req).await }).await?;
        Ok(Default::default())
    }

    async fn start_container(&self, _ctx: &TtrpcContext, req: pb::StartContainerRequest) -> ttrpc::Result<Empty> {
        let c = self.containers.clone();
        detached(async move { c.start_container(&req.container_id).await }).await?;
        Ok(Default::default())
    }

    async fn remove_container(&self, _ctx: &TtrpcContext, req: pb::RemoveContainerRequest) -> ttrpc::Result<Empty> {
        let timeout = std::time::Duration::from_secs(req.timeout.into());
        let c = self.containers.clone();
        detached(async move { c.remove_container(&req.container_id, timeout).await }).await?;
        Ok(Default::default())
    }

    async fn exec_process(&self, _ctx: &TtrpcContext, req: pb::ExecProcessRequest) -> ttrpc::Result<Empty> {
        let c = self.containers.clone();
        detached(async move { c.exec_process(&req).await }).await?;
        Ok(Default::default())
    }

    async fn signal_process(&self, _ctx: &TtrpcContext, req: pb::SignalProcessRequest) -> ttrpc::Result<Empty> {
        self.containers.signal_process(&req.container_id, &req.exec_id, req.signal)?;
        Ok(Default::default())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WaitProcessRequest,
    ) -> ttrpc::Result<pb::WaitProcessResponse> {
        let status = self.containers.wait_process(&req.container_id, &req.exec_id).await?;
        Ok(pb::WaitProcessResponse { status, ..Default::default() })
    }

    async fn update_container(&self, _ctx: &TtrpcContext, req: pb::UpdateContainerRequest) -> ttrpc::Result<Empty> {
        let resources = req.resources.clone().unwrap_or_default();
        self.containers.update(&req.container_id, &resources)?;
        Ok(Default::default())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::StatsContainerRequest,
    ) -> ttrpc::Result<pb::StatsContainerResponse> {
        Ok(self.containers.stats(&req.container_id)?)
    }

    async fn pause_container(&self, _ctx: &TtrpcContext, req: pb::PauseContainerRequest) -> ttrpc::Result<Empty> {
        let c = self.containers.clone();
        detached(async move { c.pause_container(&req.container_id).await }).await?;
        Ok(Default::default())
    }

    async fn resume_container(&self, _ctx: &TtrpcContext, req: pb::ResumeContainerRequest) -> ttrpc::Result<Empty> {
        let c = self.containers.clone();
        detached(async move { c.resume_container(&req.container_id).await }).await?;
        Ok(Default::default())
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WriteStreamRequest,
    ) -> ttrpc::Result<pb::WriteStreamResponse> {
        let len = self.containers.write_stdin(&req.container_id, &req.exec_id, &req.data).await?;
        Ok(pb::WriteStreamResponse { len, ..Default::default() })
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        let data = self.containers.read_stream(&req.container_id, &req.exec_id, false, req.len).await?;
        Ok(pb::ReadStreamResponse { data, ..Default::default() })
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        let data = self.containers.read_stream(&req.container_id, &req.exec_id, true, req.len).await?;
        Ok(pb::ReadStreamResponse { data, ..Default::default() })
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: pb::CloseStdinRequest) -> ttrpc::Result<Empty> {
        self.containers.close_stdin(&req.container_id, &req.exec_id).await?;
        Ok(Default::default())
    }

    async fn tty_win_resize(&self, _ctx: &TtrpcContext, req: pb::TtyWinResizeRequest) -> ttrpc::Result<Empty> {
        self.containers.resize_tty(&req.container_id, &req.exec_id, req.row, req.column)?;
        Ok(Default::default())
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: pb::GetOOMEventRequest) -> ttrpc::Result<pb::OOMEvent> {
        let container_id = self.containers.next_oom().await?;
        Ok(pb::OOMEvent { container_id, ..Default::default() })
    }

    // --- networking ---
    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateInterfaceRequest,
    ) -> ttrpc::Result<agent_protocol::types::Interface> {
        let want = req
            .interface
            .into_option()
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, "UpdateInterface: no interface given"))?;
        let ifc = crate::network::run("UpdateInterface", move || crate::network::update_interface(&want)).await?;
        let addrs: Vec<String> = ifc.IPAddresses.iter().map(|a| format!("{}/{}", a.address, a.mask)).collect();
        info!(self.log, "interface configured"; "name" => &ifc.name, "mac" => &ifc.hwAddr, "mtu" => ifc.mtu, "addresses" => addrs.join(","));
        Ok(ifc)
    }

    async fn update_routes(&self, _ctx: &TtrpcContext, req: pb::UpdateRoutesRequest) -> ttrpc::Result<pb::Routes> {
        let want = req.routes.into_option().map(|r| r.Routes).unwrap_or_default();
        let routes = crate::network::run("UpdateRoutes", move || crate::network::update_routes(&want)).await?;
        info!(self.log, "routes updated"; "count" => routes.len());
        Ok(pb::Routes { Routes: routes, ..Default::default() })
    }

    async fn add_arp_neighbors(&self, _ctx: &TtrpcContext, req: pb::AddARPNeighborsRequest) -> ttrpc::Result<Empty> {
        let want = req.neighbors.into_option().map(|n| n.ARPNeighbors).unwrap_or_default();
        crate::network::run("AddARPNeighbors", move || crate::network::add_arp_neighbors(&want)).await?;
        Ok(Default::default())
    }

    async fn list_interfaces(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::ListInterfacesRequest,
    ) -> ttrpc::Result<pb::Interfaces> {
        let interfaces = crate::network::run("ListInterfaces", crate::network::list_interfaces).await?;
        Ok(pb::Interfaces { Interfaces: interfaces, ..Default::default() })
    }

    async fn list_routes(&self, _ctx: &TtrpcContext, _req: pb::ListRoutesRequest) -> ttrpc::Result<pb::Routes> {
        let routes = crate::network::run("ListRoutes", crate::network::list_routes).await?;
        Ok(pb::Routes { Routes: routes, ..Default::default() })
    }

    // --- files into a guest without a shared file system (peer pods) ---
    async fn copy_file(&self, _ctx: &TtrpcContext, req: pb::CopyFileRequest) -> ttrpc::Result<Empty> {
        let base = std::path::Path::new(crate::copy_file::BASE);
        tokio::task::spawn_blocking(move || crate::copy_file::copy_file(&req, base))
            .await
            .map_err(|e| status(Code::INTERNAL, format!("CopyFile: {e}")))?
            .map_err(|e| status(Code::INVALID_ARGUMENT, format!("CopyFile: {e}")))?;
        Ok(Default::default())
    }

    // --- agent policy (checked by the policy gate first once a policy is set) ---
    async fn set_policy(&self, _ctx: &TtrpcContext, req: pb::SetPolicyRequest) -> ttrpc::Result<Empty> {
        self.policy.set(&req.policy).map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        Ok(Default::default())
    }
}

/// Runs a state-changing container operation to its end even if the caller goes away (ttrpc
/// cancels a handler when its connection closes or its deadline passes): a container created
/// half-way and then forgotten would leak.
async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = crate::container::Result<T>> + Send + 'static,
) -> ttrpc::Result<T> {
    match tokio::spawn(f).await {
        Ok(r) => r.map_err(Into::into),
        Err(e) => Err(status(Code::INTERNAL, format!("container operation failed: {e}"))),
    }
}

/// The handler registered for every RPC this agent does not implement.
struct Unimplemented {
    rpc: String,
}

#[async_trait]
impl MethodHandler for Unimplemented {
    async fn handler(&self, _ctx: TtrpcContext, _req: Request) -> ttrpc::Result<Response> {
        let s = ttrpc::get_status(
            Code::UNIMPLEMENTED,
            format!("{} is not implemented by the podvisor agent {VERSION}", self.rpc),
        );
        Ok(<Response as ttrpc::proto::ResponseInit>::init_status(s))
    }
}

/// Kernel command-line parameter for fault-injection tests (`tests/tests/faults.rs`):
/// `podvisor.test_panic=<AgentService method>[:<n>]` makes the agent panic when that RPC arrives
/// (the `n`th time, by default the first), `podvisor.test_panic=boot` before it listens. A panic in PID 1 prints its cause and powers the
/// guest off (`main.rs`), which is what the host sees of any agent crash. Only a test sets it
/// (through the `kernel_params` annotation, which `enable_annotations` must allow).
pub const TEST_PANIC_PARAM: &str = "podvisor.test_panic=";

/// Where `cmdline` (the kernel's) asks the agent to panic, see [`TEST_PANIC_PARAM`].
pub fn test_panic_point(cmdline: &str) -> Option<&str> {
    cmdline.split_whitespace().find_map(|w| w.strip_prefix(TEST_PANIC_PARAM))
}

/// The method and the call number (from 1) of a [`TEST_PANIC_PARAM`] value.
fn parse_panic_point(point: &str) -> (&str, u32) {
    match point.split_once(':') {
        Some((method, n)) => (method, n.parse().unwrap_or(1).max(1)),
        None => (point, 1),
    }
}

/// Passes calls to `inner` until the `at`th, on which it panics.
struct PanicOn {
    rpc: String,
    at: u32,
    calls: std::sync::atomic::AtomicU32,
    inner: Box<dyn MethodHandler + Send + Sync>,
}

#[async_trait]
impl MethodHandler for PanicOn {
    async fn handler(&self, ctx: TtrpcContext, req: Request) -> ttrpc::Result<Response> {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n == self.at {
            panic!("{TEST_PANIC_PARAM}{}:{n}: fault injected by a test", self.rpc);
        }
        self.inner.handler(ctx, req).await
    }
}

/// The services with every unimplemented AgentService RPC answering UNIMPLEMENTED, and every
/// AgentService RPC behind the agent policy (`policy.rs`; no policy until SetPolicy).
pub fn services(
    log: Logger,
    shutdown: Arc<tokio::sync::Notify>,
    containers: Arc<Containers>,
) -> std::collections::HashMap<String, ttrpc::asynchronous::Service> {
    let policy = Arc::new(crate::policy::AgentPolicy::new(log.new(slog::o!("subsystem" => "policy"))));
    let agent = AgentService {
        log: log.new(slog::o!("subsystem" => "rpc")),
        sysfs: Sysfs::default(),
        shutdown,
        containers,
        policy: policy.clone(),
    };
    let mut services = agent_ttrpc::create_agent_service(Arc::new(agent));
    let implemented: HashSet<&str> = IMPLEMENTED.iter().copied().collect();
    for (name, service) in services.iter_mut() {
        let names: Vec<String> = service.methods.keys().cloned().collect();
        for method in names.into_iter().filter(|m| !implemented.contains(m.as_str())) {
            let rpc = format!("{name}/{method}");
            service.methods.insert(method, Box::new(Unimplemented { rpc }));
        }
    }
    crate::policy::guard(&mut services, &policy);
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some((method, at)) = test_panic_point(&cmdline).map(parse_panic_point) {
        for service in services.values_mut() {
            if let Some(inner) = service.methods.remove(method) {
                warn!(log, "fault injection: this agent panics on a request"; "rpc" => method, "call" => at);
                let calls = std::sync::atomic::AtomicU32::new(0);
                let panic_on = PanicOn { rpc: method.to_string(), at, calls, inner };
                service.methods.insert(method.to_string(), Box::new(panic_on));
            }
        }
    }
    services.extend(health_ttrpc::create_health(Arc::new(HealthService)));
    services
}

/// A ttrpc server listening on `addr` (`vsock://-1:1024` in the guest, any CID; `unix://...`
/// in test mode).
pub fn server(
    log: Logger,
    addr: &str,
    shutdown: Arc<tokio::sync::Notify>,
    containers: Arc<Containers>,
) -> Result<Server, String> {
    if let Some(path) = addr.strip_prefix("unix://") {
        let _ = std::fs::remove_file(path);
    }
    let server = Server::new().bind(addr).map_err(|e| format!("listen on {addr}: {e}"))?;
    if addr.starts_with("vsock://") && !std::path::Path::new("/dev/vsock").exists() {
        warn!(log, "/dev/vsock is missing; is the vsock transport module loaded?");
    }
    Ok(server.register_service(services(log, shutdown, containers)))
}

/// The guest's listening address.
pub fn vsock_addr() -> String {
    format!("vsock://-1:{AGENT_VSOCK_PORT}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_protocol::agent_ttrpc::AgentServiceClient;
    use agent_protocol::health_ttrpc::HealthClient;

    fn ctx() -> ttrpc::context::Context {
        ttrpc::context::with_timeout(5_000_000_000)
    }

    #[test]
    fn test_panic_point_is_read_from_the_kernel_command_line() {
        assert_eq!(
            test_panic_point("console=ttyS0 podvisor.test_panic=CreateContainer quiet"),
            Some("CreateContainer")
        );
        assert_eq!(test_panic_point("console=ttyS0 quiet"), None);
        assert_eq!(test_panic_point("xpodvisor.test_panic=boot"), None);
        assert_eq!(parse_panic_point("CreateContainer:2"), ("CreateContainer", 2));
        assert_eq!(parse_panic_point("SignalProcess"), ("SignalProcess", 1));
    }

    /// Serves the real services on a unix socket and calls them with the generated clients.
    #[tokio::test]
    async fn implemented_and_unimplemented_rpcs_over_ttrpc() {
        let dir = std::env::temp_dir().join(format!("podvisor-agent-rpc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let _ = std::fs::remove_file(&sock);
        let log = Logger::root(slog::Discard, slog::o!());
        let shutdown = Arc::new(tokio::sync::Notify::new());
        let containers =
            Arc::new(Containers::new(log.clone(), crate::container::reaper::Reaper::new(), dir.join("run"), false));
        let mut server = Server::new().bind(&format!("unix://{}", sock.display())).unwrap().register_service(services(
            log,
            shutdown.clone(),
            containers,
        ));
        server.start().await.unwrap();

        let client = ttrpc::asynchronous::Client::connect(&format!("unix://{}", sock.display())).await.unwrap();
        let health = HealthClient::new(client.clone());
        let agent = AgentServiceClient::new(client);

        let r = health.check(ctx(), &health::CheckRequest::new()).await.unwrap();
        assert_eq!(r.status.enum_value(), Ok(health::health_check_response::ServingStatus::SERVING));
        assert_eq!(health.version(ctx(), &health::CheckRequest::new()).await.unwrap().agent_version, VERSION);

        let err = agent.get_ip_tables(ctx(), &pb::GetIPTablesRequest::new()).await.unwrap_err();
        match err {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), Code::UNIMPLEMENTED);
                assert!(s.message().contains("grpc.AgentService/GetIPTables"), "{}", s.message());
            }
            other => panic!("expected an RPC status, got {other:?}"),
        }

        // Container RPCs answer with statuses naming the id.
        let req = pb::StartContainerRequest { container_id: "nope".into(), ..Default::default() };
        let err = agent.start_container(ctx(), &req).await.unwrap_err();
        assert!(
            matches!(&err, ttrpc::Error::RpcStatus(s) if s.code() == Code::NOT_FOUND && s.message().contains("nope")),
            "{err:?}"
        );
        let req = pb::CreateContainerRequest { container_id: "../x".into(), ..Default::default() };
        let err = agent.create_container(ctx(), &req).await.unwrap_err();
        assert!(
            matches!(&err, ttrpc::Error::RpcStatus(s) if s.code() == Code::INVALID_ARGUMENT && s.message().contains("container_id")),
            "{err:?}"
        );

        let bad = pb::SetGuestDateTimeRequest { Sec: 1, Usec: 2_000_000, ..Default::default() };
        let err = agent.set_guest_date_time(ctx(), &bad).await.unwrap_err();
        assert!(matches!(&err, ttrpc::Error::RpcStatus(s) if s.code() == Code::INVALID_ARGUMENT), "{err:?}");

        agent.destroy_sandbox(ctx(), &pb::DestroySandboxRequest::new()).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(2), shutdown.notified()).await.expect("shutdown signalled");
        server.shutdown().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_implemented_name_is_a_real_rpc() {
        for name in IMPLEMENTED {
            assert!(agent_protocol::AGENT_SERVICE_RPCS.contains(name), "{name} is not an AgentService RPC");
        }
    }
}
