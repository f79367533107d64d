//! The containerd task service (`containerd.task.v2.Task`, all 17 RPCs) on top of [`Pod`]:
//! request decoding, error codes, and the replies containerd and CRI-O expect.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim_protos::api;
use containerd_shim_protos::shim_async::Task;
use protobuf::well_known_types::{any::Any, empty::Empty, timestamp::Timestamp};
use protobuf::MessageField;
use slog::{info, Logger};
use ttrpc::asynchronous::TtrpcContext;

use crate::bootstrap::config_path_from_options;
use crate::mounts::MountSpec;
use crate::pod::{CreateRequest, Pod, TaskError};
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

fn status_of(e: TaskError) -> ttrpc::Error {
    let code = match &e {
        TaskError::NotFound(_) => ttrpc::Code::NOT_FOUND,
        TaskError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
        TaskError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
        TaskError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
        TaskError::NotImplemented(_) => ttrpc::Code::UNIMPLEMENTED,
        TaskError::PermissionDenied(_) => ttrpc::Code::PERMISSION_DENIED,
        TaskError::Internal(_) => ttrpc::Code::UNKNOWN,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
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
fn exec_process(any: &Any) -> Result<agent_protocol::oci::Process, TaskError> {
    let mut process: oci_spec::runtime::Process = serde_json::from_slice(&any.value)
        .map_err(|e| TaskError::InvalidArgument(format!("exec spec ({}) is not an OCI process: {e}", any.type_url)))?;
    crate::spec::process_for_guest(&mut process);
    let mut spec = oci_spec::runtime::Spec::default();
    spec.set_process(Some(process));
    Ok(agent_protocol::convert::spec_to_grpc(&spec).Process.take().unwrap_or_default())
}

#[async_trait::async_trait]
impl Task for TaskService {
    async fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> R<api::CreateTaskResponse> {
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
        let pid = self.pod.start(&req.id, &req.exec_id).await.map_err(status_of)?;
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> R<api::StateResponse> {
        let c = self.pod.container(&req.id).map_err(status_of)?;
        let p = c.process(&req.exec_id).map_err(status_of)?;
        let exit = p.exit();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.display().to_string(),
            pid: self.pod.vmm_pid().await,
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
        let (pid, exit) = self.pod.delete(&req.id, &req.exec_id).await.map_err(status_of)?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.code,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> R<api::PidsResponse> {
        // As Kata: the container's processes live in the guest; the host process that runs
        // them is the VMM (Kata's agent API has no process listing).
        self.pod.container(&req.id).map_err(status_of)?;
        let pid = self.pod.vmm_pid().await;
        Ok(api::PidsResponse { processes: vec![api::ProcessInfo { pid, ..Default::default() }], ..Default::default() })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> R<Empty> {
        self.pod.set_paused(&req.id, true).await.map_err(status_of)?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> R<Empty> {
        self.pod.set_paused(&req.id, false).await.map_err(status_of)?;
        Ok(Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, req: api::CheckpointTaskRequest) -> R<Empty> {
        Err(status_of(TaskError::NotImplemented(format!(
            "checkpoint of container {}: a container running in a VM cannot be checkpointed with CRIU",
            req.id
        ))))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> R<Empty> {
        info!(self.log, "Kill"; "container" => &req.id, "exec" => &req.exec_id, "signal" => req.signal, "all" => req.all);
        self.pod.kill(&req.id, &req.exec_id, req.signal).await.map_err(status_of)?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> R<Empty> {
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| status_of(TaskError::InvalidArgument("exec without a process spec".into())))?;
        let process = exec_process(spec).map_err(status_of)?;
        let stdio = Stdio { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal };
        self.pod.exec(&req.id, &req.exec_id, stdio, process).map_err(status_of)?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> R<Empty> {
        let p = self.pod.process(&req.id, &req.exec_id).map_err(status_of)?;
        let agent = self.pod.agent().await.map_err(status_of)?;
        agent
            .tty_win_resize(&req.id, p.agent_exec_id(), req.height, req.width)
            .await
            .map_err(|e| status_of(e.into()))?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> R<Empty> {
        let p = self.pod.process(&req.id, &req.exec_id).map_err(status_of)?;
        if req.stdin {
            p.close_stdin();
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> R<Empty> {
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| status_of(TaskError::InvalidArgument("update without resources".into())))?;
        let res: oci_spec::runtime::LinuxResources = serde_json::from_slice(&any.value).map_err(|e| {
            status_of(TaskError::InvalidArgument(format!(
                "resources ({}) are not OCI LinuxResources: {e}",
                any.type_url
            )))
        })?;
        info!(self.log, "Update"; "container" => &req.id);
        self.pod.update(&req.id, &res).await.map_err(status_of)?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> R<api::WaitResponse> {
        let p = self.pod.process(&req.id, &req.exec_id).map_err(status_of)?;
        let exit = p.wait().await;
        Ok(api::WaitResponse {
            exit_status: exit.code,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> R<api::StatsResponse> {
        let stats = self.pod.stats(&req.id).await.map_err(status_of)?;
        let (type_url, value) = crate::metrics::encode(&stats, crate::metrics::Flavor::of_host())
            .map_err(|e| status_of(TaskError::Internal(e)))?;
        let any = Any { type_url: type_url.into(), value, ..Default::default() };
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn connect(&self, _ctx: &TtrpcContext, _req: api::ConnectRequest) -> R<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.pod.vmm_pid().await,
            version: crate::VERSION.into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> R<Empty> {
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

    #[test]
    fn errors_map_to_containerd_codes() {
        let code = |e| match status_of(e) {
            ttrpc::Error::RpcStatus(s) => s.code(),
            _ => unreachable!(),
        };
        assert_eq!(code(TaskError::NotFound("x".into())), ttrpc::Code::NOT_FOUND);
        assert_eq!(code(TaskError::AlreadyExists("x".into())), ttrpc::Code::ALREADY_EXISTS);
        assert_eq!(code(TaskError::FailedPrecondition("x".into())), ttrpc::Code::FAILED_PRECONDITION);
        assert_eq!(code(TaskError::InvalidArgument("x".into())), ttrpc::Code::INVALID_ARGUMENT);
        assert_eq!(code(TaskError::NotImplemented("x".into())), ttrpc::Code::UNIMPLEMENTED);
        assert_eq!(code(TaskError::PermissionDenied("x".into())), ttrpc::Code::PERMISSION_DENIED);
        let refused = crate::agent::AgentError::Status {
            rpc: "ExecProcess",
            code: ttrpc::Code::PERMISSION_DENIED,
            message: "blocked".into(),
        };
        assert_eq!(code(TaskError::from(refused)), ttrpc::Code::PERMISSION_DENIED, "an agent policy refusal");
    }
}
