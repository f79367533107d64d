//! Processes: `Start` (a container's init or an exec), `Exec`, `Kill`, and the waiter that
//! records a process's exit only after its output reached its stdio (so `Wait` and the exit
//! event never run ahead of the output).

use std::sync::Arc;
use std::time::Duration;

use agent_protocol::agent as pb;
use slog::{info, warn};

use super::{detached, Container, Event, Pod, PodError, PodResult};
use crate::agent::Agent;
use crate::process::{Exit, Process, Status, Stdio};

/// How long the guest gets to reap an exec killed because its stdio could not be set up.
const KILLED_EXEC_REAP: Duration = Duration::from_secs(5);
const SIGKILL: u32 = 9;

impl Pod {
    /// `Start`: the init process (container) or an exec registered by `Exec`. Runs to its end
    /// even when the caller goes away, so a started process always has its waiter.
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> PodResult<u32> {
        let (pod, id, exec_id) = (self.clone(), id.to_string(), exec_id.to_string());
        detached(async move { pod.start_now(&id, &exec_id).await }).await
    }

    async fn start_now(self: &Arc<Self>, id: &str, exec_id: &str) -> PodResult<u32> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        if p.status() != Status::Created {
            return Err(PodError::FailedPrecondition(format!(
                "process {} of container {id} was already started",
                p.agent_exec_id()
            )));
        }
        let agent = self.agent()?;
        if exec_id.is_empty() {
            agent.start_container(id).await?;
        } else {
            let process = c
                .pending
                .lock()
                .unwrap()
                .remove(exec_id)
                .ok_or_else(|| PodError::NotFound(format!("exec {exec_id}")))?;
            let req = pb::ExecProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                process: Some(process).into(),
                ..Default::default()
            };
            agent.exec_process(req).await?;
            if let Err(e) = p.start_io(agent.clone(), &self.log).await {
                self.kill_unconnected_exec(agent.as_ref(), &p).await;
                return Err(PodError::InvalidArgument(e.to_string()));
            }
        }
        p.set_status(Status::Running);
        let pid = self.vmm_pid();
        self.spawn_waiter(agent, c.clone(), p.clone(), pid);
        if exec_id.is_empty() {
            self.publish(Event::TaskStart { container_id: id.into(), pid });
        } else {
            self.publish(Event::TaskExecStarted { container_id: id.into(), exec_id: exec_id.into(), pid });
        }
        Ok(pid)
    }

    /// An exec runs in the guest but its stdio could not be connected: nobody could see or
    /// feed it, so it is killed (and reaped by the guest) and recorded as exited.
    async fn kill_unconnected_exec(&self, agent: &dyn Agent, p: &Process) {
        let (cid, eid) = (p.container_id.as_str(), p.agent_exec_id());
        warn!(self.log, "the exec's stdio could not be set up; killing it in the guest"; "container" => cid, "exec" => eid);
        if let Err(e) = agent.signal_process(cid, eid, SIGKILL).await {
            warn!(self.log, "cannot kill the exec"; "container" => cid, "exec" => eid, "error" => %e);
        }
        let code = match tokio::time::timeout(KILLED_EXEC_REAP, agent.wait_process(cid, eid)).await {
            Ok(Ok(code)) => code as u32,
            _ => 128 + SIGKILL,
        };
        p.drain_output().await;
        p.set_exit(code);
    }

    /// Waits in the guest for the process to exit, delivers its output, records and publishes
    /// the exit.
    fn spawn_waiter(self: &Arc<Self>, agent: Arc<dyn Agent>, c: Arc<Container>, p: Arc<Process>, pid: u32) {
        let pod = self.clone();
        tokio::spawn(async move {
            let code = match agent.wait_process(&p.container_id, p.agent_exec_id()).await {
                Ok(s) => s as u32,
                Err(e) => {
                    warn!(pod.log, "WaitProcess failed; reporting exit 255"; "container" => &c.id, "exec" => &p.exec_id, "error" => %e);
                    255
                }
            };
            p.drain_output().await;
            let exit = p.set_exit(code);
            info!(pod.log, "process exited"; "container" => &c.id, "exec" => &p.exec_id, "exit_status" => code);
            pod.publish_exit(&c.id, &p, exit, pid);
            if p.exec_id.is_empty() && c.id == pod.sandbox_id {
                // As Kata: the sandbox container's end is the pod's, so the VM stops now, not at
                // its delete. CRI-O deletes a stopped sandbox only when it removes it, and the
                // kubelet keeps the dead sandbox of a live pod (a finished Job's) as long as the
                // pod exists: a VM kept until then would idle for hours.
                info!(pod.log, "the sandbox container exited: stopping the VM");
                pod.stop_vm().await;
            }
        });
    }

    fn publish_exit(&self, id: &str, p: &Process, exit: Exit, pid: u32) {
        self.publish(Event::TaskExit {
            container_id: id.into(),
            id: if p.exec_id.is_empty() { id.into() } else { p.exec_id.clone() },
            pid,
            exit,
        });
    }

    /// `Exec`: registers a process to start with `Start`.
    pub fn exec(&self, id: &str, exec_id: &str, stdio: Stdio, process: agent_protocol::oci::Process) -> PodResult<()> {
        if exec_id.is_empty() {
            return Err(PodError::InvalidArgument("exec id is empty".into()));
        }
        let c = self.container(id)?;
        if c.init.status() != Status::Running {
            return Err(PodError::FailedPrecondition(format!("container {id} is not running ({:?})", c.init.status())));
        }
        {
            let mut execs = c.execs.lock().unwrap();
            if execs.contains_key(exec_id) {
                return Err(PodError::AlreadyExists(format!("exec {exec_id} in container {id}")));
            }
            execs.insert(exec_id.into(), Process::new(id, exec_id, stdio));
            c.pending.lock().unwrap().insert(exec_id.into(), process);
        }
        self.publish(Event::TaskExecAdded { container_id: id.into(), exec_id: exec_id.into() });
        Ok(())
    }

    /// `Kill`: a signal to a process (`all`: the container's init takes its pid namespace down).
    /// Signal 0 asks "does it exist?", as kill(2) does: yes while it was created or runs, no
    /// (NotFound) once it exited; the guest answers for a running one.
    pub async fn kill(self: &Arc<Self>, id: &str, exec_id: &str, signal: u32) -> PodResult<()> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        let finished =
            || PodError::NotFound(format!("process {} of container {id}: process already finished", p.agent_exec_id()));
        match p.status() {
            Status::Stopped if signal == 0 => return Err(finished()),
            // CRI-O fails StopContainer on any Kill error, containerd tolerates NotFound: to
            // CRI-O a signal to a process that already exited is delivered to nobody, as runc
            // treats it.
            Status::Stopped if c.crio => return Ok(()),
            Status::Stopped => return Err(finished()),
            Status::Created if signal == 0 => return Ok(()),
            Status::Created if exec_id.is_empty() => {
                // Never started: there is nothing to signal; the container ends here (in a
                // task of its own: the guest container goes and the exit is recorded together).
                let (pod, id) = (self.clone(), id.to_string());
                return detached(async move {
                    let agent = pod.agent()?;
                    agent.remove_container(&id).await?;
                    let exit = p.set_exit(128 + signal);
                    pod.publish_exit(&id, &p, exit, pod.vmm_pid());
                    Ok(())
                })
                .await;
            }
            Status::Created => {
                return Err(PodError::FailedPrecondition(format!("exec {exec_id} of container {id} was not started")))
            }
            _ => {}
        }
        let agent = self.agent()?;
        match agent.signal_process(id, p.agent_exec_id(), signal).await {
            Ok(()) => Ok(()),
            Err(_) if p.exit().is_some() && c.crio && signal != 0 => Ok(()),
            Err(e) if p.exit().is_some() => Err(PodError::NotFound(format!("{e}: process already finished"))),
            Err(e) => Err(e.into()),
        }
    }
}
