//! The agent client: the `Agent` trait the sandbox layer uses and its ttrpc implementation over
//! the channel the hypervisor reports (vsock or hybrid vsock).

use std::time::{Duration, SystemTime};

use agent_protocol::{agent as pb, agent_ttrpc::AgentServiceClient, health, health_ttrpc::HealthClient};
use async_trait::async_trait;
use hypervisor::{AgentChannel, Hypervisor};
use slog::{debug, info, Logger};

/// Per-RPC timeout for calls that do not say otherwise.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent never answered within the dial timeout.
    #[error("the agent did not answer on {channel} within {after:?} ({attempts} attempts; last error: {last}); \
             check that the initrd holds the podvisor agent as /init; last guest console lines:\n{console}")]
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
    /// An RPC failed.
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
}

/// The real agent, over ttrpc.
pub struct KataAgent {
    agent: AgentServiceClient,
    health: HealthClient,
}

fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(timeout.as_nanos() as i64)
}

fn rpc_err(rpc: &'static str) -> impl FnOnce(ttrpc::Error) -> AgentError {
    move |e| AgentError::Rpc {
        rpc,
        message: match e {
            ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
            other => other.to_string(),
        },
    }
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
        let attempt_loop = dial_loop(&channel, timeout, log);
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
        tokio::time::sleep(Duration::from_millis(20).min(deadline.saturating_duration_since(tokio::time::Instant::now()))).await;
    }
}

#[async_trait]
impl Agent for KataAgent {
    async fn check(&self) -> Result<(), AgentError> {
        let r = self.health.check(ctx(RPC_TIMEOUT), &health::CheckRequest::new()).await.map_err(rpc_err("Health.Check"))?;
        if r.status.enum_value() == Ok(health::health_check_response::ServingStatus::SERVING) {
            Ok(())
        } else {
            Err(AgentError::Rpc { rpc: "Health.Check", message: format!("agent status {:?}", r.status) })
        }
    }

    async fn version(&self) -> Result<String, AgentError> {
        let r = self.health.version(ctx(RPC_TIMEOUT), &health::CheckRequest::new()).await.map_err(rpc_err("Health.Version"))?;
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
        let req = pb::SetGuestDateTimeRequest { Sec: d.as_secs() as i64, Usec: d.subsec_micros() as i64, ..Default::default() };
        self.agent.set_guest_date_time(ctx(RPC_TIMEOUT), &req).await.map_err(rpc_err("SetGuestDateTime"))?;
        Ok(())
    }

    async fn metrics(&self) -> Result<String, AgentError> {
        let r = self.agent.get_metrics(ctx(RPC_TIMEOUT), &pb::GetMetricsRequest::new()).await.map_err(rpc_err("GetMetrics"))?;
        Ok(r.metrics)
    }

    async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        self.agent
            .destroy_sandbox(ctx(Duration::from_secs(10)), &pb::DestroySandboxRequest::new())
            .await
            .map_err(rpc_err("DestroySandbox"))?;
        Ok(())
    }
}
