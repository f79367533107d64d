//! The agent client: the `Agent` trait the sandbox layer uses and its ttrpc implementation over
//! the channel the hypervisor reports (vsock or hybrid vsock).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agent_protocol::{agent as pb, agent_ttrpc::AgentServiceClient, health, health_ttrpc::HealthClient, types};
use async_trait::async_trait;
use hypervisor::{AgentChannel, Hypervisor};
use slog::{debug, info, Logger};

/// What the podvisor agent prints on the console once it listens (see `agent/src/main.rs`).
pub const AGENT_READY_MARKER: &str = "\"msg\":\"agent listening\"";

/// Per-RPC timeout for calls that do not say otherwise.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent never answered within the dial timeout.
    #[error(
        "the agent did not answer on {channel} within {after:?} ({attempts} attempts; last error: {last}); \
             check that the initrd holds the podvisor agent as /init; last guest console lines:\n{console}"
    )]
    DialTimeout {
        /// The channel tried.
        channel: String,
        /// The timeout.
        after: Duration,
        /// Connection attempts made.
        attempts: u32,
        /// The last error seen.
        last: String,
        /// The guest's last console lines.
        console: String,
    },
    /// The VM died while we waited for the agent.
    #[error("the VM failed before the agent answered: {0}")]
    VmFailed(String),
    /// The agent answered an RPC with an error status.
    #[error("agent {rpc}: {message}")]
    Status {
        /// RPC name.
        rpc: &'static str,
        /// ttrpc status code.
        code: ttrpc::Code,
        /// The agent's message.
        message: String,
    },
    /// The VM failed (QEMU exited, a helper died, the guest stopped) while an RPC was pending.
    #[error("agent {rpc}: the VM failed: {why}")]
    VmGone {
        /// RPC name.
        rpc: &'static str,
        /// What the hypervisor layer says happened.
        why: String,
    },
    /// An RPC failed in transport (connection lost, timeout).
    #[error("agent {rpc}: {message}")]
    Rpc {
        /// RPC name.
        rpc: &'static str,
        /// ttrpc status or transport error.
        message: String,
    },
}

/// Guest facts from `GetGuestDetails`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDetails {
    /// Memory hotplug granule in bytes.
    pub mem_block_size_bytes: u64,
    /// Agent version.
    pub agent_version: String,
    /// Whether the memory `probe` interface exists.
    pub mem_hotplug_probe: bool,
}

/// What the sandbox layer needs from the agent.
#[async_trait]
pub trait Agent: Send + Sync {
    /// `Health.Check`.
    async fn check(&self) -> Result<(), AgentError>;
    /// `Health.Version`: the agent's version.
    async fn version(&self) -> Result<String, AgentError>;
    /// `GetGuestDetails`.
    async fn guest_details(&self) -> Result<GuestDetails, AgentError>;
    /// `OnlineCPUMem`: online hot-added memory and up to `nb_cpus` CPUs.
    async fn online_cpu_mem(&self, nb_cpus: u32, cpu_only: bool) -> Result<(), AgentError>;
    /// `SetGuestDateTime`.
    async fn set_guest_time(&self, now: SystemTime) -> Result<(), AgentError>;
    /// `GetMetrics`: Prometheus text from the guest.
    async fn metrics(&self) -> Result<String, AgentError>;
    /// `DestroySandbox`: the guest shuts down cleanly.
    async fn destroy_sandbox(&self) -> Result<(), AgentError>;
    /// `CreateSandbox`: mount the shared storages, set the hostname.
    async fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> Result<(), AgentError>;
    /// `CreateContainer`: create (not start) a container from an OCI spec.
    async fn create_container(&self, req: pb::CreateContainerRequest) -> Result<(), AgentError>;
    /// `StartContainer`.
    async fn start_container(&self, container_id: &str) -> Result<(), AgentError>;
    /// `RemoveContainer`.
    async fn remove_container(&self, container_id: &str) -> Result<(), AgentError>;
    /// `ExecProcess`: start a process in a container.
    async fn exec_process(&self, req: pb::ExecProcessRequest) -> Result<(), AgentError>;
    /// `SignalProcess`.
    async fn signal_process(&self, container_id: &str, exec_id: &str, signal: u32) -> Result<(), AgentError>;
    /// `WaitProcess`: blocks until the process exits; its exit status.
    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<i32, AgentError>;
    /// `ReadStdout` / `ReadStderr`: blocks for data; empty at end of stream.
    async fn read_stream(&self, container_id: &str, exec_id: &str, stderr: bool) -> Result<Vec<u8>, AgentError>;
    /// `WriteStdin`: bytes accepted.
    async fn write_stdin(&self, container_id: &str, exec_id: &str, data: Vec<u8>) -> Result<u32, AgentError>;
    /// `CloseStdin`.
    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError>;
    /// `TtyWinResize`.
    async fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), AgentError>;
    /// `PauseContainer`.
    async fn pause_container(&self, container_id: &str) -> Result<(), AgentError>;
    /// `ResumeContainer`.
    async fn resume_container(&self, container_id: &str) -> Result<(), AgentError>;
    /// `StatsContainer`.
    async fn stats_container(&self, container_id: &str) -> Result<pb::StatsContainerResponse, AgentError>;
    /// `UpdateContainer`.
    async fn update_container(&self, req: pb::UpdateContainerRequest) -> Result<(), AgentError>;
    /// `GetOOMEvent`: blocks until a container is OOM-killed; its id.
    async fn get_oom_event(&self) -> Result<String, AgentError>;
    /// `UpdateInterface`: configure the guest NIC with this MAC; the resulting interface.
    async fn update_interface(&self, interface: types::Interface) -> Result<types::Interface, AgentError>;
    /// `UpdateRoutes`: the routes of the given links; the resulting routes.
    async fn update_routes(&self, routes: Vec<types::Route>) -> Result<Vec<types::Route>, AgentError>;
    /// `AddARPNeighbors`.
    async fn add_arp_neighbors(&self, neighbours: Vec<types::ARPNeighbor>) -> Result<(), AgentError>;
    /// `ListInterfaces`.
    async fn list_interfaces(&self) -> Result<Vec<types::Interface>, AgentError>;
    /// `ListRoutes`.
    async fn list_routes(&self) -> Result<Vec<types::Route>, AgentError>;
    /// `SetPolicy`: the agent policy (Rego, package `agent_policy`) the guest enforces from
    /// now on; an invalid policy is INVALID_ARGUMENT with the parse error.
    async fn set_policy(&self, policy: &str) -> Result<(), AgentError>;
}

/// Largest chunk asked for per `ReadStdout`/`ReadStderr` call.
const READ_CHUNK: u32 = 64 * 1024;

/// The real agent, over ttrpc.
pub struct KataAgent {
    agent: AgentServiceClient,
    health: HealthClient,
}

fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(timeout.as_nanos() as i64)
}

fn rpc_err(rpc: &'static str) -> impl FnOnce(ttrpc::Error) -> AgentError {
    move |e| match e {
        ttrpc::Error::RpcStatus(s) => AgentError::Status { rpc, code: s.code(), message: s.message().to_string() },
        other => AgentError::Rpc { rpc, message: other.to_string() },
    }
}

/// No deadline: for calls that block until something happens in the guest.
fn no_deadline() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(0)
}

impl KataAgent {
    /// Wraps a connected socket.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<KataAgent> {
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        std_stream.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(std_stream)?;
        let client = ttrpc::asynchronous::Client::new(ttrpc::asynchronous::transport::Socket::new(stream));
        Ok(KataAgent { agent: AgentServiceClient::new(client.clone()), health: HealthClient::new(client) })
    }

    /// Connects to the agent of `vm`, retrying until it answers `Health.Check`, for at most
    /// `timeout`. Fails at once when the VM dies meanwhile.
    pub async fn dial(vm: &dyn Hypervisor, timeout: Duration, log: &Logger) -> Result<KataAgent, AgentError> {
        let channel = vm.agent_channel();
        let started = tokio::time::Instant::now();
        let attempt_loop = async {
            // Connecting before the guest's vsock driver is up only queues requests in the
            // vhost-user daemon (and, seen under load, can wedge vhost-device-vsock 0.3): wait
            // for the agent's "listening" line on the console, for at most half the budget.
            let grace = (timeout / 2).min(Duration::from_secs(20));
            let hint = async {
                while !vm.console_tail().iter().any(|l| l.contains(AGENT_READY_MARKER)) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            let _ = tokio::time::timeout(grace, hint).await;
            dial_loop(&channel, timeout.saturating_sub(started.elapsed()), log).await
        };
        tokio::select! {
            r = attempt_loop => match r {
                Ok(agent) => {
                    info!(log, "agent answered"; "channel" => %channel, "elapsed_ms" => started.elapsed().as_millis() as u64);
                    Ok(agent)
                }
                Err((attempts, last)) => Err(AgentError::DialTimeout {
                    channel: channel.to_string(),
                    after: timeout,
                    attempts,
                    last,
                    console: tail_text(vm.console_tail()),
                }),
            },
            why = vm.wait_failure() => Err(AgentError::VmFailed(why)),
        }
    }
}

fn tail_text(lines: Vec<String>) -> String {
    if lines.is_empty() {
        "(no console output)".into()
    } else {
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

async fn dial_loop(channel: &AgentChannel, timeout: Duration, log: &Logger) -> Result<KataAgent, (u32, String)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut attempts = 0;
    let mut last = String::from("no attempt made");
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err((attempts, last));
        }
        let budget = (deadline - now).min(Duration::from_secs(3));
        attempts += 1;
        match channel.connect(budget).await {
            Ok(fd) => match KataAgent::from_fd(fd) {
                Ok(agent) => match tokio::time::timeout(budget, agent.check()).await {
                    Ok(Ok(())) => return Ok(agent),
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => last = format!("Health.Check got no answer within {budget:?}"),
                },
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        debug!(log, "agent not ready"; "attempt" => attempts, "error" => &last);
        tokio::time::sleep(
            Duration::from_millis(20).min(deadline.saturating_duration_since(tokio::time::Instant::now())),
        )
        .await;
    }
}

#[async_trait]
impl Agent for KataAgent {
    async fn check(&self) -> Result<(), AgentError> {
        let r =
            self.health.check(ctx(RPC_TIMEOUT), &health::CheckRequest::new()).await.map_err(rpc_err("Health.Check"))?;
        if r.status.enum_value() == Ok(health::health_check_response::ServingStatus::SERVING) {
            Ok(())
        } else {
            Err(AgentError::Rpc { rpc: "Health.Check", message: format!("agent status {:?}", r.status) })
        }
    }

    async fn version(&self) -> Result<String, AgentError> {
        let r = self
            .health
            .version(ctx(RPC_TIMEOUT), &health::CheckRequest::new())
            .await
            .map_err(rpc_err("Health.Version"))?;
        Ok(r.agent_version)
    }

    async fn guest_details(&self) -> Result<GuestDetails, AgentError> {
        let req = pb::GuestDetailsRequest { mem_block_size: true, mem_hotplug_probe: true, ..Default::default() };
        let r = self.agent.get_guest_details(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("GetGuestDetails"))?;
        Ok(GuestDetails {
            mem_block_size_bytes: r.mem_block_size_bytes,
            agent_version: r.agent_details.as_ref().map(|d| d.version.clone()).unwrap_or_default(),
            mem_hotplug_probe: r.support_mem_hotplug_probe,
        })
    }

    async fn online_cpu_mem(&self, nb_cpus: u32, cpu_only: bool) -> Result<(), AgentError> {
        let req = pb::OnlineCPUMemRequest { wait: true, nb_cpus, cpu_only, ..Default::default() };
        self.agent.online_cpu_mem(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("OnlineCPUMem"))?;
        Ok(())
    }

    async fn set_guest_time(&self, now: SystemTime) -> Result<(), AgentError> {
        let d = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let req = pb::SetGuestDateTimeRequest {
            Sec: d.as_secs() as i64,
            Usec: d.subsec_micros() as i64,
            ..Default::default()
        };
        self.agent.set_guest_date_time(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("SetGuestDateTime"))?;
        Ok(())
    }

    async fn metrics(&self) -> Result<String, AgentError> {
        let r = self
            .agent
            .get_metrics(ctx(RPC_TIMEOUT), &pb::GetMetricsRequest::new())
            .await
            .map_err(rpc_err("GetMetrics"))?;
        Ok(r.metrics)
    }

    async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        self.agent
            .destroy_sandbox(ctx(Duration::from_secs(10)), &pb::DestroySandboxRequest::new())
            .await
            .map_err(rpc_err("DestroySandbox"))?;
        Ok(())
    }

    async fn set_policy(&self, policy: &str) -> Result<(), AgentError> {
        let req = pb::SetPolicyRequest { policy: policy.into(), ..Default::default() };
        self.agent.set_policy(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("SetPolicy"))?;
        Ok(())
    }

    async fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> Result<(), AgentError> {
        self.agent.create_sandbox(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("CreateSandbox"))?;
        Ok(())
    }

    async fn create_container(&self, req: pb::CreateContainerRequest) -> Result<(), AgentError> {
        self.agent.create_container(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("CreateContainer"))?;
        Ok(())
    }

    async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = pb::StartContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.agent.start_container(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("StartContainer"))?;
        Ok(())
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = pb::RemoveContainerRequest { container_id: container_id.into(), timeout: 10, ..Default::default() };
        self.agent.remove_container(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("RemoveContainer"))?;
        Ok(())
    }

    async fn exec_process(&self, req: pb::ExecProcessRequest) -> Result<(), AgentError> {
        self.agent.exec_process(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("ExecProcess"))?;
        Ok(())
    }

    async fn signal_process(&self, container_id: &str, exec_id: &str, signal: u32) -> Result<(), AgentError> {
        let req = pb::SignalProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            signal,
            ..Default::default()
        };
        self.agent.signal_process(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("SignalProcess"))?;
        Ok(())
    }

    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<i32, AgentError> {
        let req =
            pb::WaitProcessRequest { container_id: container_id.into(), exec_id: exec_id.into(), ..Default::default() };
        let r = self.agent.wait_process(no_deadline(), &req).await.map_err(rpc_err("WaitProcess"))?;
        Ok(r.status)
    }

    async fn read_stream(&self, container_id: &str, exec_id: &str, stderr: bool) -> Result<Vec<u8>, AgentError> {
        let req = pb::ReadStreamRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            len: READ_CHUNK,
            ..Default::default()
        };
        let r = if stderr {
            self.agent.read_stderr(no_deadline(), &req).await.map_err(rpc_err("ReadStderr"))?
        } else {
            self.agent.read_stdout(no_deadline(), &req).await.map_err(rpc_err("ReadStdout"))?
        };
        Ok(r.data)
    }

    async fn write_stdin(&self, container_id: &str, exec_id: &str, data: Vec<u8>) -> Result<u32, AgentError> {
        let req = pb::WriteStreamRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            data,
            ..Default::default()
        };
        let r = self.agent.write_stdin(no_deadline(), &req).await.map_err(rpc_err("WriteStdin"))?;
        Ok(r.len)
    }

    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req =
            pb::CloseStdinRequest { container_id: container_id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.agent.close_stdin(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("CloseStdin"))?;
        Ok(())
    }

    async fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), AgentError> {
        let req = pb::TtyWinResizeRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            row: rows,
            column: columns,
            ..Default::default()
        };
        self.agent.tty_win_resize(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("TtyWinResize"))?;
        Ok(())
    }

    async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = pb::PauseContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.agent.pause_container(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("PauseContainer"))?;
        Ok(())
    }

    async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = pb::ResumeContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.agent.resume_container(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("ResumeContainer"))?;
        Ok(())
    }

    async fn stats_container(&self, container_id: &str) -> Result<pb::StatsContainerResponse, AgentError> {
        let req = pb::StatsContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.agent.stats_container(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("StatsContainer"))
    }

    async fn update_container(&self, req: pb::UpdateContainerRequest) -> Result<(), AgentError> {
        self.agent.update_container(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("UpdateContainer"))?;
        Ok(())
    }

    async fn get_oom_event(&self) -> Result<String, AgentError> {
        let r = self
            .agent
            .get_oom_event(no_deadline(), &pb::GetOOMEventRequest::new())
            .await
            .map_err(rpc_err("GetOOMEvent"))?;
        Ok(r.container_id)
    }

    async fn update_interface(&self, interface: types::Interface) -> Result<types::Interface, AgentError> {
        let req = pb::UpdateInterfaceRequest { interface: Some(interface).into(), ..Default::default() };
        self.agent.update_interface(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("UpdateInterface"))
    }

    async fn update_routes(&self, routes: Vec<types::Route>) -> Result<Vec<types::Route>, AgentError> {
        let routes = pb::Routes { Routes: routes, ..Default::default() };
        let req = pb::UpdateRoutesRequest { routes: Some(routes).into(), ..Default::default() };
        let r = self.agent.update_routes(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("UpdateRoutes"))?;
        Ok(r.Routes)
    }

    async fn add_arp_neighbors(&self, neighbours: Vec<types::ARPNeighbor>) -> Result<(), AgentError> {
        let n = pb::ARPNeighbors { ARPNeighbors: neighbours, ..Default::default() };
        let req = pb::AddARPNeighborsRequest { neighbors: Some(n).into(), ..Default::default() };
        self.agent.add_arp_neighbors(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("AddARPNeighbors"))?;
        Ok(())
    }

    async fn list_interfaces(&self) -> Result<Vec<types::Interface>, AgentError> {
        let r = self.agent.list_interfaces(ctx(RPC_TIMEOUT), &pb::ListInterfacesRequest::new()).await;
        Ok(r.map_err(rpc_err("ListInterfaces"))?.Interfaces)
    }

    async fn list_routes(&self) -> Result<Vec<types::Route>, AgentError> {
        let r = self.agent.list_routes(ctx(RPC_TIMEOUT), &pb::ListRoutesRequest::new()).await;
        Ok(r.map_err(rpc_err("ListRoutes"))?.Routes)
    }
}

/// The agent of a running VM whose calls fail as soon as the VM does: every RPC races the
/// hypervisor's failure signal (QEMU's exit, a helper's death, the guest stopped or panicked),
/// and a transport error is explained by it when the VM failed. Without it a call waits on a
/// vsock connection nobody will answer: hybrid vsock keeps the shim's side open while
/// virtiofsd or vhost-device-vsock is dead, so WaitProcess never returns and the node never
/// sees the pod's containers exit.
pub struct VmWatchedAgent {
    inner: Arc<dyn Agent>,
    vm: Arc<dyn Hypervisor>,
}

impl VmWatchedAgent {
    /// Watches `vm` for calls to `inner`.
    pub fn new(inner: Arc<dyn Agent>, vm: Arc<dyn Hypervisor>) -> VmWatchedAgent {
        VmWatchedAgent { inner, vm }
    }

    async fn guard<T>(
        &self,
        rpc: &'static str,
        call: impl std::future::Future<Output = Result<T, AgentError>>,
    ) -> Result<T, AgentError> {
        tokio::select! {
            biased;
            r = call => match r {
                Err(AgentError::Rpc { rpc, message }) => {
                    // The connection broke: if the VM failed (its exit is published a moment
                    // after the socket closes), say that instead.
                    match tokio::time::timeout(Duration::from_secs(1), self.vm.wait_failure()).await {
                        Ok(why) => Err(AgentError::VmGone { rpc, why }),
                        Err(_) => Err(AgentError::Rpc { rpc, message }),
                    }
                }
                other => other,
            },
            why = self.vm.wait_failure() => Err(AgentError::VmGone { rpc, why }),
        }
    }
}

#[async_trait]
impl Agent for VmWatchedAgent {
    async fn check(&self) -> Result<(), AgentError> {
        self.guard("check", self.inner.check()).await
    }

    async fn version(&self) -> Result<String, AgentError> {
        self.guard("version", self.inner.version()).await
    }

    async fn guest_details(&self) -> Result<GuestDetails, AgentError> {
        self.guard("guest_details", self.inner.guest_details()).await
    }

    async fn online_cpu_mem(&self, nb_cpus: u32, cpu_only: bool) -> Result<(), AgentError> {
        self.guard("online_cpu_mem", self.inner.online_cpu_mem(nb_cpus, cpu_only)).await
    }

    async fn set_guest_time(&self, now: SystemTime) -> Result<(), AgentError> {
        self.guard("set_guest_time", self.inner.set_guest_time(now)).await
    }

    async fn metrics(&self) -> Result<String, AgentError> {
        self.guard("metrics", self.inner.metrics()).await
    }

    async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        self.guard("destroy_sandbox", self.inner.destroy_sandbox()).await
    }

    async fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> Result<(), AgentError> {
        self.guard("create_sandbox", self.inner.create_sandbox(req)).await
    }

    async fn create_container(&self, req: pb::CreateContainerRequest) -> Result<(), AgentError> {
        self.guard("create_container", self.inner.create_container(req)).await
    }

    async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        self.guard("start_container", self.inner.start_container(container_id)).await
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), AgentError> {
        self.guard("remove_container", self.inner.remove_container(container_id)).await
    }

    async fn exec_process(&self, req: pb::ExecProcessRequest) -> Result<(), AgentError> {
        self.guard("exec_process", self.inner.exec_process(req)).await
    }

    async fn signal_process(&self, container_id: &str, exec_id: &str, signal: u32) -> Result<(), AgentError> {
        self.guard("signal_process", self.inner.signal_process(container_id, exec_id, signal)).await
    }

    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<i32, AgentError> {
        self.guard("wait_process", self.inner.wait_process(container_id, exec_id)).await
    }

    async fn read_stream(&self, container_id: &str, exec_id: &str, stderr: bool) -> Result<Vec<u8>, AgentError> {
        self.guard("read_stream", self.inner.read_stream(container_id, exec_id, stderr)).await
    }

    async fn write_stdin(&self, container_id: &str, exec_id: &str, data: Vec<u8>) -> Result<u32, AgentError> {
        self.guard("write_stdin", self.inner.write_stdin(container_id, exec_id, data)).await
    }

    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        self.guard("close_stdin", self.inner.close_stdin(container_id, exec_id)).await
    }

    async fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), AgentError> {
        self.guard("tty_win_resize", self.inner.tty_win_resize(container_id, exec_id, rows, columns)).await
    }

    async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        self.guard("pause_container", self.inner.pause_container(container_id)).await
    }

    async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        self.guard("resume_container", self.inner.resume_container(container_id)).await
    }

    async fn stats_container(&self, container_id: &str) -> Result<pb::StatsContainerResponse, AgentError> {
        self.guard("stats_container", self.inner.stats_container(container_id)).await
    }

    async fn update_container(&self, req: pb::UpdateContainerRequest) -> Result<(), AgentError> {
        self.guard("update_container", self.inner.update_container(req)).await
    }

    async fn get_oom_event(&self) -> Result<String, AgentError> {
        self.guard("get_oom_event", self.inner.get_oom_event()).await
    }

    async fn update_interface(&self, interface: types::Interface) -> Result<types::Interface, AgentError> {
        self.guard("update_interface", self.inner.update_interface(interface)).await
    }

    async fn update_routes(&self, routes: Vec<types::Route>) -> Result<Vec<types::Route>, AgentError> {
        self.guard("update_routes", self.inner.update_routes(routes)).await
    }

    async fn add_arp_neighbors(&self, neighbours: Vec<types::ARPNeighbor>) -> Result<(), AgentError> {
        self.guard("add_arp_neighbors", self.inner.add_arp_neighbors(neighbours)).await
    }

    async fn list_interfaces(&self) -> Result<Vec<types::Interface>, AgentError> {
        self.guard("list_interfaces", self.inner.list_interfaces()).await
    }

    async fn list_routes(&self) -> Result<Vec<types::Route>, AgentError> {
        self.guard("list_routes", self.inner.list_routes()).await
    }

    async fn set_policy(&self, policy: &str) -> Result<(), AgentError> {
        self.guard("set_policy", self.inner.set_policy(policy)).await
    }
}
