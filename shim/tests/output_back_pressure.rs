//! Container output back pressure on the shim side: the stdout pump asks the agent for the
//! next chunk only after the previous one was written to containerd's FIFO, so a host reader
//! that stops reading stops the `ReadStdout` calls (the agent then keeps at most its 4 MiB
//! buffer and makes the container's writes wait): the shim holds at most one chunk per stream.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use podvisor_shim::agent::{Agent, AgentError, GuestDetails};
use podvisor_shim::process::{Process, Stdio};

use agent_protocol::{agent as pb, types};

/// Chunk the fake agent answers per read: the most the shim accepts.
const CHUNK: usize = 64 * 1024;

/// An agent whose container writes `total` bytes to stdout as fast as it is read.
struct Flood {
    reads: AtomicU64,
    total: u64,
}

fn unused(rpc: &'static str) -> AgentError {
    AgentError::Rpc { rpc, message: "not used by this test".into() }
}

#[async_trait]
impl Agent for Flood {
    async fn read_stream(&self, _: &str, _: &str, stderr: bool) -> Result<Vec<u8>, AgentError> {
        assert!(!stderr, "a terminal has no stderr stream");
        let n = self.reads.fetch_add(1, Ordering::SeqCst);
        if (n * CHUNK as u64) >= self.total {
            return Ok(Vec::new());
        }
        Ok(vec![b'o'; CHUNK])
    }
    async fn check(&self) -> Result<(), AgentError> {
        Err(unused("Health.Check"))
    }
    async fn version(&self) -> Result<String, AgentError> {
        Err(unused("Health.Version"))
    }
    async fn guest_details(&self) -> Result<GuestDetails, AgentError> {
        Err(unused("GetGuestDetails"))
    }
    async fn online_cpu_mem(&self, _: u32, _: bool) -> Result<(), AgentError> {
        Err(unused("OnlineCPUMem"))
    }
    async fn set_guest_time(&self, _: SystemTime) -> Result<(), AgentError> {
        Err(unused("SetGuestDateTime"))
    }
    async fn metrics(&self) -> Result<String, AgentError> {
        Err(unused("GetMetrics"))
    }
    async fn destroy_sandbox(&self) -> Result<(), AgentError> {
        Err(unused("DestroySandbox"))
    }
    async fn create_sandbox(&self, _: pb::CreateSandboxRequest) -> Result<(), AgentError> {
        Err(unused("CreateSandbox"))
    }
    async fn create_container(&self, _: pb::CreateContainerRequest) -> Result<(), AgentError> {
        Err(unused("CreateContainer"))
    }
    async fn start_container(&self, _: &str) -> Result<(), AgentError> {
        Err(unused("StartContainer"))
    }
    async fn remove_container(&self, _: &str) -> Result<(), AgentError> {
        Err(unused("RemoveContainer"))
    }
    async fn exec_process(&self, _: pb::ExecProcessRequest) -> Result<(), AgentError> {
        Err(unused("ExecProcess"))
    }
    async fn signal_process(&self, _: &str, _: &str, _: u32) -> Result<(), AgentError> {
        Err(unused("SignalProcess"))
    }
    async fn wait_process(&self, _: &str, _: &str) -> Result<i32, AgentError> {
        Err(unused("WaitProcess"))
    }
    async fn write_stdin(&self, _: &str, _: &str, _: Vec<u8>) -> Result<u32, AgentError> {
        Err(unused("WriteStdin"))
    }
    async fn close_stdin(&self, _: &str, _: &str) -> Result<(), AgentError> {
        Err(unused("CloseStdin"))
    }
    async fn tty_win_resize(&self, _: &str, _: &str, _: u32, _: u32) -> Result<(), AgentError> {
        Err(unused("TtyWinResize"))
    }
    async fn pause_container(&self, _: &str) -> Result<(), AgentError> {
        Err(unused("PauseContainer"))
    }
    async fn resume_container(&self, _: &str) -> Result<(), AgentError> {
        Err(unused("ResumeContainer"))
    }
    async fn stats_container(&self, _: &str) -> Result<pb::StatsContainerResponse, AgentError> {
        Err(unused("StatsContainer"))
    }
    async fn update_container(&self, _: pb::UpdateContainerRequest) -> Result<(), AgentError> {
        Err(unused("UpdateContainer"))
    }
    async fn get_oom_event(&self) -> Result<String, AgentError> {
        Err(unused("GetOOMEvent"))
    }
    async fn update_interface(&self, _: types::Interface) -> Result<types::Interface, AgentError> {
        Err(unused("UpdateInterface"))
    }
    async fn update_routes(&self, _: Vec<types::Route>) -> Result<Vec<types::Route>, AgentError> {
        Err(unused("UpdateRoutes"))
    }
    async fn add_arp_neighbors(&self, _: Vec<types::ARPNeighbor>) -> Result<(), AgentError> {
        Err(unused("AddARPNeighbors"))
    }
    async fn list_interfaces(&self) -> Result<Vec<types::Interface>, AgentError> {
        Err(unused("ListInterfaces"))
    }
    async fn list_routes(&self) -> Result<Vec<types::Route>, AgentError> {
        Err(unused("ListRoutes"))
    }
    async fn set_policy(&self, _: &str) -> Result<(), AgentError> {
        Err(unused("SetPolicy"))
    }
}

/// The FIFO's capacity in bytes (F_GETPIPE_SZ on an end of it).
fn pipe_size(fd: &impl std::os::fd::AsRawFd) -> u64 {
    // SAFETY: F_GETPIPE_SZ takes no argument and only reads the pipe's state.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    assert!(n > 0, "F_GETPIPE_SZ: {}", std::io::Error::last_os_error());
    n as u64
}

#[tokio::test]
async fn a_host_reader_that_stops_reading_stops_the_reads_from_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("stdout");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let total = 64u64 << 20;
    let agent = Arc::new(Flood { reads: AtomicU64::new(0), total });
    let stdio = Stdio { stdout: fifo.display().to_string(), terminal: true, ..Default::default() };
    let p = Process::new("c", "", stdio);
    let log = slog::Logger::root(slog::Discard, slog::o!());
    p.start_io(agent.clone(), &log).await.unwrap();

    // The host reader opens the FIFO and reads nothing for a while.
    let mut reader = tokio::net::unix::pipe::OpenOptions::new().open_receiver(&fifo).unwrap();
    let capacity = pipe_size(&reader);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stalled = agent.reads.load(Ordering::SeqCst);
    // What fits in the FIFO, plus the chunk whose write waits, plus the next call's start.
    let bound = capacity / CHUNK as u64 + 2;
    eprintln!("reader stalled: {stalled} reads of 64 KiB from the agent (FIFO {capacity} bytes)");
    assert!(stalled <= bound, "{stalled} reads while nobody reads the FIFO; at most {bound} expected");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(agent.reads.load(Ordering::SeqCst), stalled, "reads went on while the FIFO was full");

    // Reading everything resumes the flow and loses nothing.
    use tokio::io::AsyncReadExt;
    let mut got = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    while got < total {
        let n = tokio::time::timeout(Duration::from_secs(20), reader.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0);
        assert!(buf[..n].iter().all(|&b| b == b'o'));
        got += n as u64;
    }
    tokio::time::timeout(Duration::from_secs(10), p.drain_output()).await.unwrap();
    assert_eq!(got, total);
    assert_eq!(agent.reads.load(Ordering::SeqCst), total / CHUNK as u64 + 1, "one final read sees the end");
}
