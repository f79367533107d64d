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
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// DestroySandbox waits at most this long (the guest powers off right after answering).
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest ttrpc message accepted from the agent: ttrpc's own limit. ttrpc 0.10 allocates a
/// declared length up to this before reading it, and skips (reads and drops in 4 KiB pages) a
/// longer one; [`FrameGuard`] refuses the longer one at its header instead.
pub const MAX_MESSAGE: usize = ttrpc::proto::MESSAGE_LENGTH_MAX;

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
    /// `CreateContainer` allowed `timeout` (`[runtime] create_container_timeout`: a pull in the
    /// guest takes longer than other calls). Clients with one fixed deadline keep theirs.
    async fn create_container_within(
        &self,
        req: pb::CreateContainerRequest,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let _ = timeout;
        self.create_container(req).await
    }
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
    /// `CopyFile`: writes one file, directory or symlink (or one chunk of a file) into the
    /// guest under `/run/kata-containers` (`shared_fs = "none"`: peer pods).
    async fn copy_file(&self, req: pb::CopyFileRequest) -> Result<(), AgentError> {
        let _ = req;
        Err(AgentError::Rpc { rpc: "CopyFile", message: "not supported by this agent client".into() })
    }
}

/// Longest container id accepted from the agent (containerd's ids have at most 76 bytes).
const MAX_CONTAINER_ID: usize = 255;

/// Largest chunk asked for per `ReadStdout`/`ReadStderr` call.
const READ_CHUNK: u32 = 64 * 1024;

/// The real agent, over ttrpc.
pub struct KataAgent {
    agent: AgentServiceClient,
    health: HealthClient,
    /// Deadline of every call that does not block by design.
    timeout: Duration,
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

/// Runs one RPC. With `timeout`, fails after it whatever the agent does (ttrpc's own deadline
/// only covers waiting for the answer, not queueing the request on a connection the guest has
/// stopped reading). Without, the call waits as long as the connection lives: WaitProcess,
/// ReadStdout/ReadStderr, WriteStdin and GetOOMEvent block until something happens in the guest.
async fn call<T>(
    rpc: &'static str,
    timeout: Option<Duration>,
    fut: impl std::future::Future<Output = ttrpc::Result<T>>,
) -> Result<T, AgentError> {
    let r = match timeout {
        Some(t) => match tokio::time::timeout(t, fut).await {
            Ok(r) => r,
            Err(_) => return Err(no_answer(rpc, t)),
        },
        None => fut.await,
    };
    r.map_err(|e| match e {
        ttrpc::Error::Others(m) if m == "Request deadline elapsed" => no_answer(rpc, timeout.unwrap_or_default()),
        e => rpc_err(rpc)(e),
    })
}

fn no_answer(rpc: &'static str, after: Duration) -> AgentError {
    AgentError::Rpc {
        rpc,
        message: format!("no answer within {after:?}; the guest is hung, overloaded or misbehaving"),
    }
}

impl KataAgent {
    /// Wraps a connected socket. Frames from the agent are checked by [`FrameGuard`]; calls
    /// time out after [`RPC_TIMEOUT`].
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<KataAgent> {
        Self::from_fd_with_timeout(fd, RPC_TIMEOUT)
    }

    /// [`KataAgent::from_fd`] with another per-call timeout.
    pub fn from_fd_with_timeout(fd: std::os::fd::OwnedFd, timeout: Duration) -> std::io::Result<KataAgent> {
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        std_stream.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(std_stream)?;
        let client =
            ttrpc::asynchronous::Client::new(ttrpc::asynchronous::transport::Socket::new(FrameGuard::new(stream)));
        Ok(KataAgent { agent: AgentServiceClient::new(client.clone()), health: HealthClient::new(client), timeout })
    }

    async fn call<T>(
        &self,
        rpc: &'static str,
        fut: impl std::future::Future<Output = ttrpc::Result<T>>,
    ) -> Result<T, AgentError> {
        call(rpc, Some(self.timeout), fut).await
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
            // A remote hypervisor's podvm has no console here and StartVM returned once its
            // agent answered: dial at once.
            let grace = if matches!(channel, AgentChannel::Unix { .. }) {
                Duration::ZERO
            } else {
                (timeout / 2).min(Duration::from_secs(20))
            };
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
                    Ok(Ok(())) => {
                        // The check that answered counts as an agent call (the failed
                        // attempts before it were a guest still booting).
                        crate::monitor::observe_agent_rpc(kata_action("check"), now.elapsed());
                        return Ok(agent);
                    }
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

/// Checks the frames the agent sends before ttrpc reads them: a header that is not a response
/// or data frame, has unknown flags, or declares more than [`MAX_MESSAGE`] bytes fails the
/// read, so ttrpc drops the connection and fails every pending call with this error (ttrpc
/// alone would skip an oversized body page by page, as long as the guest keeps sending, and
/// ignore frames of unknown type, leaving blocking calls waiting forever).
pub struct FrameGuard<S> {
    inner: S,
    header: [u8; ttrpc::proto::MESSAGE_HEADER_LENGTH],
    /// Header bytes seen of the current frame.
    have: usize,
    /// Body bytes still to come of the current frame.
    body: u64,
    broken: Option<String>,
}

impl<S> FrameGuard<S> {
    /// Wraps a connected stream.
    pub fn new(inner: S) -> Self {
        FrameGuard { inner, header: [0; ttrpc::proto::MESSAGE_HEADER_LENGTH], have: 0, body: 0, broken: None }
    }

    /// Walks bytes just read; the first violation is kept and returned.
    fn check(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        while !bytes.is_empty() {
            if self.body > 0 {
                let n = self.body.min(bytes.len() as u64);
                self.body -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            let n = (self.header.len() - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == self.header.len() {
                self.have = 0;
                let h = &self.header;
                let length = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                let stream = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                let (type_, flags) = (h[8], h[9]);
                let known_flags =
                    ttrpc::proto::FLAG_REMOTE_CLOSED | ttrpc::proto::FLAG_REMOTE_OPEN | ttrpc::proto::FLAG_NO_DATA;
                let mut wrong = Vec::new();
                if type_ != ttrpc::proto::MESSAGE_TYPE_RESPONSE && type_ != ttrpc::proto::MESSAGE_TYPE_DATA {
                    wrong.push(format!("type {type_:#x} (a response is 0x2, data 0x3)"));
                }
                if flags & !known_flags != 0 {
                    wrong.push(format!("flags {flags:#x}"));
                }
                if length as usize > MAX_MESSAGE {
                    wrong.push(format!("length {length} bytes (at most {MAX_MESSAGE})"));
                }
                if !wrong.is_empty() {
                    let e = format!(
                        "the agent sent a malformed ttrpc frame for stream {stream}: {}; the guest is misbehaving, \
                         the connection is closed",
                        wrong.join(", ")
                    );
                    self.broken = Some(e.clone());
                    return Err(e);
                }
                self.body = length as u64;
            }
        }
        Ok(())
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FrameGuard<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        if let Some(e) = &self.broken {
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e.clone())));
        }
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = buf.filled()[before..].to_vec();
                match self.check(&new) {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(e) => Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e))),
                }
            }
            other => other,
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FrameGuard<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Agent for KataAgent {
    async fn check(&self) -> Result<(), AgentError> {
        let r = self.call("Health.Check", self.health.check(ctx(self.timeout), &health::CheckRequest::new())).await?;
        if r.status.enum_value() == Ok(health::health_check_response::ServingStatus::SERVING) {
            Ok(())
        } else {
            Err(AgentError::Rpc { rpc: "Health.Check", message: format!("agent status {:?}", r.status) })
        }
    }

    async fn version(&self) -> Result<String, AgentError> {
        let r =
            self.call("Health.Version", self.health.version(ctx(self.timeout), &health::CheckRequest::new())).await?;
        Ok(r.agent_version)
    }

    async fn guest_details(&self) -> Result<GuestDetails, AgentError> {
        let req = pb::GuestDetailsRequest { mem_block_size: true, mem_hotplug_probe: true, ..Default::default() };
        let r = self.call("GetGuestDetails", self.agent.get_guest_details(ctx(self.timeout), &req)).await?;
        Ok(GuestDetails {
            mem_block_size_bytes: r.mem_block_size_bytes,
            agent_version: r.agent_details.as_ref().map(|d| d.version.clone()).unwrap_or_default(),
            mem_hotplug_probe: r.support_mem_hotplug_probe,
        })
    }

    async fn online_cpu_mem(&self, nb_cpus: u32, cpu_only: bool) -> Result<(), AgentError> {
        let req = pb::OnlineCPUMemRequest { wait: true, nb_cpus, cpu_only, ..Default::default() };
        self.call("OnlineCPUMem", self.agent.online_cpu_mem(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn set_guest_time(&self, now: SystemTime) -> Result<(), AgentError> {
        let d = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let req = pb::SetGuestDateTimeRequest {
            Sec: d.as_secs() as i64,
            Usec: d.subsec_micros() as i64,
            ..Default::default()
        };
        self.call("SetGuestDateTime", self.agent.set_guest_date_time(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn metrics(&self) -> Result<String, AgentError> {
        let r =
            self.call("GetMetrics", self.agent.get_metrics(ctx(self.timeout), &pb::GetMetricsRequest::new())).await?;
        Ok(r.metrics)
    }

    async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        call(
            "DestroySandbox",
            Some(self.timeout.min(DESTROY_TIMEOUT)),
            self.agent.destroy_sandbox(ctx(self.timeout.min(DESTROY_TIMEOUT)), &pb::DestroySandboxRequest::new()),
        )
        .await?;
        Ok(())
    }

    async fn set_policy(&self, policy: &str) -> Result<(), AgentError> {
        let req = pb::SetPolicyRequest { policy: policy.into(), ..Default::default() };
        self.call("SetPolicy", self.agent.set_policy(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn copy_file(&self, req: pb::CopyFileRequest) -> Result<(), AgentError> {
        self.call("CopyFile", self.agent.copy_file(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> Result<(), AgentError> {
        self.call("CreateSandbox", self.agent.create_sandbox(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn create_container(&self, req: pb::CreateContainerRequest) -> Result<(), AgentError> {
        self.call("CreateContainer", self.agent.create_container(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn create_container_within(
        &self,
        req: pb::CreateContainerRequest,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let t = timeout.max(self.timeout);
        self.call("CreateContainer", self.agent.create_container(ctx(t), &req)).await?;
        Ok(())
    }

    async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = pb::StartContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.call("StartContainer", self.agent.start_container(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = pb::RemoveContainerRequest { container_id: container_id.into(), timeout: 10, ..Default::default() };
        self.call("RemoveContainer", self.agent.remove_container(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn exec_process(&self, req: pb::ExecProcessRequest) -> Result<(), AgentError> {
        self.call("ExecProcess", self.agent.exec_process(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn signal_process(&self, container_id: &str, exec_id: &str, signal: u32) -> Result<(), AgentError> {
        let req = pb::SignalProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            signal,
            ..Default::default()
        };
        self.call("SignalProcess", self.agent.signal_process(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<i32, AgentError> {
        let req =
            pb::WaitProcessRequest { container_id: container_id.into(), exec_id: exec_id.into(), ..Default::default() };
        let r = call("WaitProcess", None, self.agent.wait_process(no_deadline(), &req)).await?;
        Ok(r.status)
    }

    async fn read_stream(&self, container_id: &str, exec_id: &str, stderr: bool) -> Result<Vec<u8>, AgentError> {
        let req = pb::ReadStreamRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            len: READ_CHUNK,
            ..Default::default()
        };
        let rpc = if stderr { "ReadStderr" } else { "ReadStdout" };
        let r = if stderr {
            call(rpc, None, self.agent.read_stderr(no_deadline(), &req)).await?
        } else {
            call(rpc, None, self.agent.read_stdout(no_deadline(), &req)).await?
        };
        if r.data.len() > READ_CHUNK as usize {
            return Err(AgentError::Rpc {
                rpc,
                message: format!(
                    "the agent answered {} bytes to a read of at most {READ_CHUNK}; the guest is misbehaving",
                    r.data.len()
                ),
            });
        }
        Ok(r.data)
    }

    async fn write_stdin(&self, container_id: &str, exec_id: &str, data: Vec<u8>) -> Result<u32, AgentError> {
        let sent = data.len();
        let req = pb::WriteStreamRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            data,
            ..Default::default()
        };
        let r = call("WriteStdin", None, self.agent.write_stdin(no_deadline(), &req)).await?;
        if r.len as usize > sent {
            return Err(AgentError::Rpc {
                rpc: "WriteStdin",
                message: format!("the agent claims {} bytes written of {sent} sent; the guest is misbehaving", r.len),
            });
        }
        Ok(r.len)
    }

    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req =
            pb::CloseStdinRequest { container_id: container_id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.call("CloseStdin", self.agent.close_stdin(ctx(self.timeout), &req)).await?;
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
        self.call("TtyWinResize", self.agent.tty_win_resize(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = pb::PauseContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.call("PauseContainer", self.agent.pause_container(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = pb::ResumeContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.call("ResumeContainer", self.agent.resume_container(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn stats_container(&self, container_id: &str) -> Result<pb::StatsContainerResponse, AgentError> {
        let req = pb::StatsContainerRequest { container_id: container_id.into(), ..Default::default() };
        self.call("StatsContainer", self.agent.stats_container(ctx(self.timeout), &req)).await
    }

    async fn update_container(&self, req: pb::UpdateContainerRequest) -> Result<(), AgentError> {
        self.call("UpdateContainer", self.agent.update_container(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn get_oom_event(&self) -> Result<String, AgentError> {
        let r =
            call("GetOOMEvent", None, self.agent.get_oom_event(no_deadline(), &pb::GetOOMEventRequest::new())).await?;
        // The id is logged and published as an event: no more than an id's worth of bytes.
        if r.container_id.len() > MAX_CONTAINER_ID {
            return Err(AgentError::Rpc {
                rpc: "GetOOMEvent",
                message: format!(
                    "the agent answered a {}-byte container id (at most {MAX_CONTAINER_ID}); the guest is misbehaving",
                    r.container_id.len()
                ),
            });
        }
        Ok(r.container_id)
    }

    async fn update_interface(&self, interface: types::Interface) -> Result<types::Interface, AgentError> {
        let req = pb::UpdateInterfaceRequest { interface: Some(interface).into(), ..Default::default() };
        self.call("UpdateInterface", self.agent.update_interface(ctx(self.timeout), &req)).await
    }

    async fn update_routes(&self, routes: Vec<types::Route>) -> Result<Vec<types::Route>, AgentError> {
        let routes = pb::Routes { Routes: routes, ..Default::default() };
        let req = pb::UpdateRoutesRequest { routes: Some(routes).into(), ..Default::default() };
        let r = self.call("UpdateRoutes", self.agent.update_routes(ctx(self.timeout), &req)).await?;
        Ok(r.Routes)
    }

    async fn add_arp_neighbors(&self, neighbours: Vec<types::ARPNeighbor>) -> Result<(), AgentError> {
        let n = pb::ARPNeighbors { ARPNeighbors: neighbours, ..Default::default() };
        let req = pb::AddARPNeighborsRequest { neighbors: Some(n).into(), ..Default::default() };
        self.call("AddARPNeighbors", self.agent.add_arp_neighbors(ctx(self.timeout), &req)).await?;
        Ok(())
    }

    async fn list_interfaces(&self) -> Result<Vec<types::Interface>, AgentError> {
        let req = pb::ListInterfacesRequest::new();
        Ok(self.call("ListInterfaces", self.agent.list_interfaces(ctx(self.timeout), &req)).await?.Interfaces)
    }

    async fn list_routes(&self) -> Result<Vec<types::Route>, AgentError> {
        let req = pb::ListRoutesRequest::new();
        Ok(self.call("ListRoutes", self.agent.list_routes(ctx(self.timeout), &req)).await?.Routes)
    }
}

#[cfg(test)]
mod tests {
    //! A fake agent on a socket pair that misbehaves on purpose: the client must fail the call
    //! with an error naming it and what was wrong, and leave no task or socket behind.

    use super::*;
    use protobuf::Message as _;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use ttrpc::proto::{GenMessage, MessageHeader};

    #[derive(Clone, Copy)]
    enum Fake {
        /// Bytes that are not ttrpc.
        Garbage,
        /// A response header declaring 5 MiB, then nothing.
        Oversized,
        /// Reads requests, never answers.
        Silent,
        /// A valid response of this payload size (the body sent in small pieces).
        Answer(usize),
    }

    const LONG: Duration = Duration::from_secs(20);

    fn alive_tasks() -> usize {
        tokio::runtime::Handle::current().metrics().num_alive_tasks()
    }

    /// A client with per-call `timeout`, and the fake agent's task (which ends once it sees the
    /// client's socket closed: the proof that nothing holds it any more).
    fn start(fake: Fake, timeout: Duration) -> (KataAgent, tokio::task::JoinHandle<()>) {
        let (client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let agent = KataAgent::from_fd_with_timeout(client.into(), timeout).unwrap();
        server.set_nonblocking(true).unwrap();
        let mut server = tokio::net::UnixStream::from_std(server).unwrap();
        let task = tokio::spawn(async move {
            while let Ok(req) = GenMessage::read_from(&mut server).await {
                let stream = req.header.stream_id;
                match fake {
                    Fake::Garbage => server.write_all(b"this is not a ttrpc message\n").await.unwrap(),
                    Fake::Oversized => {
                        MessageHeader::new_response(stream, 5 << 20).write_to(&mut server).await.unwrap()
                    }
                    Fake::Silent => {}
                    Fake::Answer(size) => {
                        let body = pb::Metrics { metrics: "m".repeat(size), ..Default::default() };
                        let resp =
                            ttrpc::proto::Response { payload: body.write_to_bytes().unwrap(), ..Default::default() };
                        let payload = resp.write_to_bytes().unwrap();
                        MessageHeader::new_response(stream, payload.len() as u32).write_to(&mut server).await.unwrap();
                        for piece in payload.chunks(1000) {
                            server.write_all(piece).await.unwrap();
                        }
                    }
                }
            }
            // The client closed its end (or broke the framing): wait for the close itself.
            let mut rest = Vec::new();
            let _ = server.read_to_end(&mut rest).await;
        });
        (agent, task)
    }

    /// Drops the client and checks that its socket gets closed and no task of it is left.
    async fn assert_nothing_left(agent: KataAgent, fake: tokio::task::JoinHandle<()>, baseline: usize) {
        drop(agent);
        tokio::time::timeout(Duration::from_secs(5), fake)
            .await
            .expect("the client's socket is still open 5 s after the client was dropped")
            .unwrap();
        for _ in 0..500 {
            if alive_tasks() <= baseline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(alive_tasks(), baseline, "tasks left behind by the client");
    }

    #[tokio::test]
    async fn garbage_from_the_agent_fails_the_call_at_once() {
        let baseline = alive_tasks();
        let (agent, fake) = start(Fake::Garbage, LONG);
        let started = Instant::now();
        let err = agent.check().await.unwrap_err().to_string();
        assert!(started.elapsed() < LONG / 2, "{:?}", started.elapsed());
        assert!(err.starts_with("agent Health.Check:") && err.contains("malformed ttrpc frame"), "{err}");
        assert!(err.contains("type 0x6e") && err.contains("length 1952999795 bytes (at most 4194304)"), "{err}");
        // Later calls fail too (the connection is closed), blocking ones included.
        let err = agent.wait_process("c", "").await.unwrap_err().to_string();
        assert!(err.starts_with("agent WaitProcess:"), "{err}");
        assert_nothing_left(agent, fake, baseline).await;
    }

    #[tokio::test]
    async fn an_oversized_answer_fails_even_a_call_without_deadline() {
        let baseline = alive_tasks();
        let (agent, fake) = start(Fake::Oversized, LONG);
        // ReadStdout has no deadline: only the frame check can end it.
        let err = tokio::time::timeout(LONG, agent.read_stream("c", "", false))
            .await
            .expect("ReadStdout still waiting after an oversized answer")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("agent ReadStdout:"), "{err}");
        assert!(err.contains("length 5242880 bytes (at most 4194304)"), "{err}");
        assert_nothing_left(agent, fake, baseline).await;
    }

    #[tokio::test]
    async fn an_agent_that_never_answers_fails_the_call_after_its_timeout() {
        let baseline = alive_tasks();
        let timeout = Duration::from_millis(300);
        let (agent, fake) = start(Fake::Silent, timeout);
        let started = Instant::now();
        let err = agent.metrics().await.unwrap_err().to_string();
        let took = started.elapsed();
        assert_eq!(err, "agent GetMetrics: no answer within 300ms; the guest is hung, overloaded or misbehaving");
        assert!(took >= timeout && took < Duration::from_secs(10), "{took:?}");
        // The connection stays usable for the next call (which times out the same way).
        let err = agent.start_container("c").await.unwrap_err().to_string();
        assert!(err.starts_with("agent StartContainer: no answer within 300ms"), "{err}");
        assert_nothing_left(agent, fake, baseline).await;
    }

    #[tokio::test]
    async fn answers_up_to_the_limit_pass_the_frame_check() {
        let (agent, fake) = start(Fake::Answer(3 << 20), LONG);
        assert_eq!(agent.metrics().await.unwrap().len(), 3 << 20);
        assert_eq!(agent.metrics().await.unwrap().len(), 3 << 20);
        drop(agent);
        tokio::time::timeout(Duration::from_secs(5), fake).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_read_answer_larger_than_asked_is_refused() {
        // Metrics and ReadStdout answers share the field number and type of their payload
        // (1: string / bytes), so a Metrics answer stands in for a 100 KiB ReadStdout answer.
        let (agent, fake) = start(Fake::Answer(100 << 10), LONG);
        let err = agent.read_stream("c", "", true).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "agent ReadStderr: the agent answered 102400 bytes to a read of at most 65536; the guest is misbehaving"
        );
        drop(agent);
        tokio::time::timeout(Duration::from_secs(5), fake).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_oom_event_with_an_overlong_container_id_is_refused() {
        // OOMEvent's container_id has Metrics' field number and type (1: string).
        let (agent, fake) = start(Fake::Answer(1000), LONG);
        let err = agent.get_oom_event().await.unwrap_err().to_string();
        assert_eq!(
            err,
            "agent GetOOMEvent: the agent answered a 1000-byte container id (at most 255); the guest is misbehaving"
        );
        drop(agent);
        tokio::time::timeout(Duration::from_secs(5), fake).await.unwrap().unwrap();
    }

    #[test]
    fn frame_check_follows_frames_across_reads() {
        let mut g = FrameGuard::new(());
        let mut frames = Vec::new();
        for (len, type_) in [(3u32, 2u8), (0, 3), (5, 2)] {
            frames.extend_from_slice(&len.to_be_bytes());
            frames.extend_from_slice(&1u32.to_be_bytes());
            frames.extend_from_slice(&[type_, 0]);
            frames.extend(std::iter::repeat(b'x').take(len as usize));
        }
        for b in frames.chunks(1) {
            g.check(b).unwrap();
        }
        // A request frame (type 1) is not something the agent may send us.
        let mut bad = 0u32.to_be_bytes().to_vec();
        bad.extend_from_slice(&7u32.to_be_bytes());
        bad.extend_from_slice(&[1, 0x80]);
        let err = g.check(&bad).unwrap_err();
        assert!(err.contains("stream 7: type 0x1 (a response is 0x2, data 0x3), flags 0x80"), "{err}");
        assert_eq!(g.check(b"").unwrap_err(), err, "the first violation sticks");
    }
}

/// Kata's name of an agent call in `kata_shim_agent_rpc_durations_histogram_milliseconds`
/// (label `action`): the request's type in the `grpc` package.
pub fn kata_action(rpc: &str) -> &'static str {
    match rpc {
        "check" | "version" => "grpc.CheckRequest",
        "guest_details" => "grpc.GuestDetailsRequest",
        "online_cpu_mem" => "grpc.OnlineCPUMemRequest",
        "set_guest_time" => "grpc.SetGuestDateTimeRequest",
        "metrics" => "grpc.GetMetricsRequest",
        "destroy_sandbox" => "grpc.DestroySandboxRequest",
        "create_sandbox" => "grpc.CreateSandboxRequest",
        "copy_file" => "grpc.CopyFileRequest",
        "create_container" => "grpc.CreateContainerRequest",
        "start_container" => "grpc.StartContainerRequest",
        "remove_container" => "grpc.RemoveContainerRequest",
        "exec_process" => "grpc.ExecProcessRequest",
        "signal_process" => "grpc.SignalProcessRequest",
        "wait_process" => "grpc.WaitProcessRequest",
        "read_stream" => "grpc.ReadStreamRequest",
        "write_stdin" => "grpc.WriteStreamRequest",
        "close_stdin" => "grpc.CloseStdinRequest",
        "tty_win_resize" => "grpc.TtyWinResizeRequest",
        "pause_container" => "grpc.PauseContainerRequest",
        "resume_container" => "grpc.ResumeContainerRequest",
        "stats_container" => "grpc.StatsContainerRequest",
        "update_container" => "grpc.UpdateContainerRequest",
        "get_oom_event" => "grpc.GetOOMEventRequest",
        "update_interface" => "grpc.UpdateInterfaceRequest",
        "update_routes" => "grpc.UpdateRoutesRequest",
        "add_arp_neighbors" => "grpc.AddARPNeighborsRequest",
        "list_interfaces" => "grpc.ListInterfacesRequest",
        "list_routes" => "grpc.ListRoutesRequest",
        "set_policy" => "grpc.SetPolicyRequest",
        _ => "grpc.UnknownRequest",
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
        let started = std::time::Instant::now();
        let r = self.watch(rpc, call).await;
        crate::monitor::observe_agent_rpc(kata_action(rpc), started.elapsed());
        r
    }

    async fn watch<T>(
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

    async fn create_container_within(
        &self,
        req: pb::CreateContainerRequest,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        self.guard("create_container", self.inner.create_container_within(req, timeout)).await
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

    async fn copy_file(&self, req: pb::CopyFileRequest) -> Result<(), AgentError> {
        self.guard("copy_file", self.inner.copy_file(req)).await
    }
}
