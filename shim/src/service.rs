//! The containerd edge: the task service (`containerd.task.v2.Task`, all 17 RPCs) on top of
//! [`Pod`] — request decoding, error codes, and the replies containerd and CRI-O expect — and
//! the mapping of the pod's [`Event`]s to containerd's `/tasks/*` events. Nothing below this
//! file knows containerd's types.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim_protos::api;
use containerd_shim_protos::shim_async::Task;
use protobuf::well_known_types::{any::Any, empty::Empty, timestamp::Timestamp};
use protobuf::MessageField;
use slog::{info, Logger};
use ttrpc::asynchronous::TtrpcContext;

use crate::bootstrap::config_path_from_options;
use crate::events::Publisher;
use crate::mounts::MountSpec;
use crate::pod::{CreateRequest, Event, EventSink, Pod, PodError};
use crate::process::{Status, Stdio};

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32, ..Default::default() }
}

/// The Go zero time, which containerd expects as `exited_at` of a running process.
fn zero_time() -> Timestamp {
    Timestamp { seconds: -62135596800, nanos: 0, ..Default::default() }
}

/// containerd's error code (errdefs over ttrpc) for a pod error.
fn status_of(e: PodError) -> ttrpc::Error {
    let code = match &e {
        PodError::NotFound(_) => ttrpc::Code::NOT_FOUND,
        PodError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
        PodError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
        PodError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
        PodError::PermissionDenied(_) => ttrpc::Code::PERMISSION_DENIED,
        PodError::Internal(_) => ttrpc::Code::UNKNOWN,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

/// An INVALID_ARGUMENT for a request that does not decode.
fn invalid(message: String) -> ttrpc::Error {
    status_of(PodError::InvalidArgument(message))
}

/// The pod's events as containerd's, each under its own topic.
impl EventSink for Publisher {
    fn publish(&self, event: Event) {
        use containerd_shim_protos::events::task as ev;
        match event {
            Event::TaskCreate { container_id, bundle, pid } => self.publish_task(ev::TaskCreate {
                container_id,
                bundle: bundle.display().to_string(),
                pid,
                ..Default::default()
            }),
            Event::TaskStart { container_id, pid } => {
                self.publish_task(ev::TaskStart { container_id, pid, ..Default::default() })
            }
            Event::TaskExit { container_id, id, pid, exit } => self.publish_task(ev::TaskExit {
                container_id,
                id,
                pid,
                exit_status: exit.code,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            }),
            Event::TaskOom { container_id } => self.publish_task(ev::TaskOOM { container_id, ..Default::default() }),
            Event::TaskExecAdded { container_id, exec_id } => {
                self.publish_task(ev::TaskExecAdded { container_id, exec_id, ..Default::default() })
            }
            Event::TaskExecStarted { container_id, exec_id, pid } => {
                self.publish_task(ev::TaskExecStarted { container_id, exec_id, pid, ..Default::default() })
            }
            Event::TaskPaused { container_id } => {
                self.publish_task(ev::TaskPaused { container_id, ..Default::default() })
            }
            Event::TaskResumed { container_id } => {
                self.publish_task(ev::TaskResumed { container_id, ..Default::default() })
            }
            Event::TaskDelete { container_id, pid, exit } => self.publish_task(ev::TaskDelete {
                container_id,
                pid,
                exit_status: exit.code,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            }),
        }
    }
}

type R<T> = ttrpc::Result<T>;

/// The ttrpc task service.
pub struct TaskService {
    pod: Arc<Pod>,
    log: Logger,
}

impl TaskService {
    /// A service for `pod`.
    pub fn new(pod: Arc<Pod>, log: Logger) -> TaskService {
        TaskService { pod, log }
    }
}

fn proto_status(s: Status) -> api::Status {
    match s {
        Status::Created => api::Status::CREATED,
        Status::Running => api::Status::RUNNING,
        Status::Paused => api::Status::PAUSED,
        Status::Stopped => api::Status::STOPPED,
    }
}

/// Decodes the OCI process of an `Exec` (JSON in an `Any`).
fn exec_process(any: &Any) -> Result<agent_protocol::oci::Process, ttrpc::Error> {
    let mut process: oci_spec::runtime::Process = serde_json::from_slice(&any.value)
        .map_err(|e| invalid(format!("exec spec ({}) is not an OCI process: {e}", any.type_url)))?;
    crate::spec::process_for_guest(&mut process);
    let mut spec = oci_spec::runtime::Spec::default();
    spec.set_process(Some(process));
    Ok(agent_protocol::convert::spec_to_grpc(&spec).Process.take().unwrap_or_default())
}

#[async_trait::async_trait]
impl Task for TaskService {
    async fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> R<api::CreateTaskResponse> {
        let _timer = crate::monitor::time_task_rpc("create");
        info!(self.log, "Create"; "container" => &req.id, "bundle" => &req.bundle, "mounts" => req.rootfs.len());
        let config_path = req.options.as_ref().and_then(config_path_from_options);
        let creq = CreateRequest {
            id: req.id.clone(),
            bundle: req.bundle.clone().into(),
            rootfs: req
                .rootfs
                .iter()
                .map(|m| MountSpec { fstype: m.type_.clone(), source: m.source.clone(), options: m.options.clone() })
                .collect(),
            stdio: Stdio { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal },
            config_path,
        };
        let pid = self.pod.create(creq).await.map_err(status_of)?;
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> R<api::StartResponse> {
        let _timer = crate::monitor::time_task_rpc("start");
        let pid = self.pod.start(&req.id, &req.exec_id).await.map_err(status_of)?;
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> R<api::StateResponse> {
        let _timer = crate::monitor::time_task_rpc("state");
        let c = self.pod.container(&req.id).map_err(status_of)?;
        let p = c.process(&req.exec_id).map_err(status_of)?;
        let exit = p.exit();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: self.pod.vmm_pid(),
            status: proto_status(p.status()).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map(|e| e.code).unwrap_or(0),
            exited_at: MessageField::some(exit.map(|e| timestamp(e.at)).unwrap_or_else(zero_time)),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> R<api::DeleteResponse> {
        let _timer = crate::monitor::time_task_rpc("delete");
        let (pid, exit) = self.pod.delete(&req.id, &req.exec_id).await.map_err(status_of)?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.code,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> R<api::PidsResponse> {
        let _timer = crate::monitor::time_task_rpc("pids");
        // As Kata: the container's processes live in the guest; the host process that runs
        // them is the VMM (Kata's agent API has no process listing).
        self.pod.container(&req.id).map_err(status_of)?;
        let pid = self.pod.vmm_pid();
        Ok(api::PidsResponse { processes: vec![api::ProcessInfo { pid, ..Default::default() }], ..Default::default() })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> R<Empty> {
        let _timer = crate::monitor::time_task_rpc("pause");
        self.pod.set_paused(&req.id, true).await.map_err(status_of)?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> R<Empty> {
        let _timer = crate::monitor::time_task_rpc("resume");
        self.pod.set_paused(&req.id, false).await.map_err(status_of)?;
        Ok(Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, req: api::CheckpointTaskRequest) -> R<Empty> {
        let _timer = crate::monitor::time_task_rpc("checkpoint");
        Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
            ttrpc::Code::UNIMPLEMENTED,
            format!("checkpoint of container {}: a container running in a VM cannot be checkpointed with CRIU", req.id),
        )))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> R<Empty> {
        let _timer = crate::monitor::time_task_rpc("kill");
        info!(self.log, "Kill"; "container" => &req.id, "exec" => &req.exec_id, "signal" => req.signal, "all" => req.all);
        self.pod.kill(&req.id, &req.exec_id, req.signal).await.map_err(status_of)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> R<Empty> {
        let _timer = crate::monitor::time_task_rpc("exec");
        let spec = req.spec.as_ref().ok_or_else(|| invalid("exec without a process spec".into()))?;
        let process = exec_process(spec)?;
        let stdio = Stdio { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal };
        self.pod.exec(&req.id, &req.exec_id, stdio, process).map_err(status_of)?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> R<Empty> {
        let _timer = crate::monitor::time_task_rpc("resize_pty");
        let p = self.pod.process(&req.id, &req.exec_id).map_err(status_of)?;
        let agent = self.pod.agent().map_err(status_of)?;
        agent
            .tty_win_resize(&req.id, p.agent_exec_id(), req.height, req.width)
            .await
            .map_err(|e| status_of(e.into()))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> R<Empty> {
        let _timer = crate::monitor::time_task_rpc("close_io");
        let p = self.pod.process(&req.id, &req.exec_id).map_err(status_of)?;
        if req.stdin {
            p.close_stdin();
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> R<Empty> {
        let _timer = crate::monitor::time_task_rpc("update");
        let any = req.resources.as_ref().ok_or_else(|| invalid("update without resources".into()))?;
        let res: oci_spec::runtime::LinuxResources = serde_json::from_slice(&any.value)
            .map_err(|e| invalid(format!("resources ({}) are not OCI LinuxResources: {e}", any.type_url)))?;
        info!(self.log, "Update"; "container" => &req.id);
        self.pod.update(&req.id, &res).await.map_err(status_of)?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> R<api::WaitResponse> {
        let _timer = crate::monitor::time_task_rpc("wait");
        let p = self.pod.process(&req.id, &req.exec_id).map_err(status_of)?;
        let exit = p.wait().await;
        Ok(api::WaitResponse {
            exit_status: exit.code,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> R<api::StatsResponse> {
        let _timer = crate::monitor::time_task_rpc("stats");
        let stats = self.pod.stats(&req.id).await.map_err(status_of)?;
        let (type_url, value) = crate::metrics::encode(&stats, crate::metrics::Flavor::of_host())
            .map_err(|e| status_of(PodError::Internal(e)))?;
        let any = Any { type_url: type_url.into(), value, ..Default::default() };
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn connect(&self, _ctx: &TtrpcContext, _req: api::ConnectRequest) -> R<api::ConnectResponse> {
        let _timer = crate::monitor::time_task_rpc("connect");
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pod.vmm_pid(),
            version: crate::VERSION.into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> R<Empty> {
        let _timer = crate::monitor::time_task_rpc("shutdown");
        if !self.pod.is_empty() {
            info!(self.log, "Shutdown ignored: containers remain"; "id" => &req.id, "containers" => self.pod.container_ids().join(","));
            return Ok(Empty::new());
        }
        info!(self.log, "Shutdown: no container left; stopping"; "id" => &req.id);
        self.pod.stop_vm().await;
        self.pod.exit.notify_one();
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_spec_is_decoded() {
        let any = Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: br#"{"args":["sh","-c","exit 5"],"cwd":"/","env":["A=1"],"user":{"uid":0,"gid":0},"terminal":true}"#
                .to_vec(),
            ..Default::default()
        };
        let p = exec_process(&any).unwrap();
        assert_eq!(p.Args, vec!["sh", "-c", "exit 5"]);
        assert!(p.Terminal);
        let bad = Any { type_url: "x".into(), value: b"{".to_vec(), ..Default::default() };
        assert!(exec_process(&bad).unwrap_err().to_string().contains("not an OCI process"));
    }

    /// Each pod event becomes its containerd event under its topic, with its fields (the
    /// log-only publisher logs the topic and the event's text form).
    #[tokio::test]
    async fn pod_events_become_containerd_events() {
        let (log, lines) = crate::logging::capture_log();
        let publisher = Publisher::new(None, "default".into(), log);
        let at = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let exit = crate::process::Exit { code: 137, at };
        let c = || "c1".to_string();
        let events = [
            (
                Event::TaskCreate { container_id: c(), bundle: "/b/c1".into(), pid: 7 },
                "/tasks/create",
                "bundle: \"/b/c1\"",
            ),
            (Event::TaskStart { container_id: c(), pid: 7 }, "/tasks/start", "pid: 7"),
            (Event::TaskExit { container_id: c(), id: "e1".into(), pid: 7, exit }, "/tasks/exit", "exit_status: 137"),
            (Event::TaskOom { container_id: c() }, "/tasks/oom", "c1"),
            (Event::TaskExecAdded { container_id: c(), exec_id: "e1".into() }, "/tasks/exec-added", "exec_id: \"e1\""),
            (
                Event::TaskExecStarted { container_id: c(), exec_id: "e1".into(), pid: 7 },
                "/tasks/exec-started",
                "exec_id: \"e1\"",
            ),
            (Event::TaskPaused { container_id: c() }, "/tasks/paused", "c1"),
            (Event::TaskResumed { container_id: c() }, "/tasks/resumed", "c1"),
            (Event::TaskDelete { container_id: c(), pid: 7, exit }, "/tasks/delete", "seconds: 1700000000"),
        ];
        for (event, topic, field) in events {
            EventSink::publish(&publisher, event);
            let line = lines.lock().unwrap().pop().expect("no event logged");
            assert!(line.contains(&format!("topic={topic}")), "{line}");
            assert!(line.contains(field), "{field} missing: {line}");
        }
    }

    #[test]
    fn errors_map_to_containerd_codes() {
        let code = |e| match status_of(e) {
            ttrpc::Error::RpcStatus(s) => s.code(),
            _ => unreachable!(),
        };
        assert_eq!(code(PodError::NotFound("x".into())), ttrpc::Code::NOT_FOUND);
        assert_eq!(code(PodError::AlreadyExists("x".into())), ttrpc::Code::ALREADY_EXISTS);
        assert_eq!(code(PodError::FailedPrecondition("x".into())), ttrpc::Code::FAILED_PRECONDITION);
        assert_eq!(code(PodError::InvalidArgument("x".into())), ttrpc::Code::INVALID_ARGUMENT);
        assert_eq!(code(PodError::PermissionDenied("x".into())), ttrpc::Code::PERMISSION_DENIED);
        assert_eq!(code(PodError::Internal("x".into())), ttrpc::Code::UNKNOWN);
        let refused = crate::agent::AgentError::Status {
            rpc: "ExecProcess",
            code: ttrpc::Code::PERMISSION_DENIED,
            message: "blocked".into(),
        };
        assert_eq!(code(PodError::from(refused)), ttrpc::Code::PERMISSION_DENIED, "an agent policy refusal");
    }
}
