//! The per-pod proxy (`podvisor-remote-hypervisor proxy ...`): serves `<run_dir>/agent.sock`
//! (the shim's `agentSocketPath`) and bridges each connection byte for byte to the podvm agent's
//! mutual-TLS listener. It runs in its own session so it outlives a service restart. When the
//! podvm's VMM dies it closes every connection, removes the socket and exits: the shim learns
//! from that EOF that the podvm is gone.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::UnixListener;
use tokio::sync::{watch, Semaphore};

use crate::state::ProcessRef;
use crate::tlsclient::AgentTlsClient;

/// Connections served at once; more are closed at accept.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// TCP connect + TLS handshake bound per connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `proxy` flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyArgs {
    /// `--socket`: the unix socket to serve.
    pub socket: PathBuf,
    /// `--target IP:PORT`: the agent's TLS listener.
    pub target: SocketAddr,
    /// `--tls-dir`: CA, client certificate and key, server name.
    pub tls_dir: PathBuf,
    /// `--vmm-pid`: exit when it dies.
    pub vmm_pid: Option<u32>,
    /// `--vmm-start-time`: its start time, to tell a recycled pid apart.
    pub vmm_start_time: Option<u64>,
    /// `--max-connections`.
    pub max_connections: usize,
    /// `--connect-timeout-ms`.
    pub connect_timeout: Duration,
}

/// Parses the `proxy` flags (`--flag value`).
pub fn parse_args(args: &[String]) -> Result<ProxyArgs, String> {
    let (mut socket, mut target, mut tls_dir) = (None, None, None);
    let (mut vmm_pid, mut vmm_start_time) = (None, None);
    let mut max_connections = DEFAULT_MAX_CONNECTIONS;
    let mut connect_timeout = DEFAULT_CONNECT_TIMEOUT;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |what: &str| value.parse::<u64>().map_err(|_| format!("{flag} {value:?}: {what}"));
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(value)),
            "--target" => {
                target = Some(value.parse::<SocketAddr>().map_err(|_| format!("--target {value:?}: write IP:PORT"))?)
            }
            "--tls-dir" => tls_dir = Some(PathBuf::from(value)),
            "--vmm-pid" => vmm_pid = Some(num("write a pid")? as u32),
            "--vmm-start-time" => vmm_start_time = Some(num("write clock ticks since boot")?),
            "--max-connections" => max_connections = num("write a count of at least 1")?.max(1) as usize,
            "--connect-timeout-ms" => connect_timeout = Duration::from_millis(num("write milliseconds")?.max(1)),
            other => return Err(format!("unknown proxy flag {other:?}")),
        }
    }
    fn need<T>(v: Option<T>, f: &str) -> Result<T, String> {
        v.ok_or_else(|| format!("proxy needs {f}"))
    }
    Ok(ProxyArgs {
        socket: need(socket, "--socket PATH")?,
        target: need(target, "--target IP:PORT")?,
        tls_dir: need(tls_dir, "--tls-dir DIR")?,
        vmm_pid,
        vmm_start_time,
        max_connections,
        connect_timeout,
    })
}

/// Resolves when the VMM process is gone: a pidfd becomes readable; without pidfd support,
/// `/proc` is polled every 200 ms.
async fn vmm_gone(pid: u32, start_time: Option<u64>) {
    let same = || match start_time {
        Some(t) => ProcessRef { pid, start_time: t }.alive(),
        None => ProcessRef::of(pid).is_some_and(|p| p.alive()),
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0 as libc::c_uint) };
    if fd >= 0 {
        // SAFETY: fd was just returned by pidfd_open and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // Opened after the check could race a recycled pid: check identity once the fd holds it.
        if !same() {
            return;
        }
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open as long as it is registered.
        if let Ok(afd) = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
            let _ = afd.readable().await;
            return;
        }
    }
    while same() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the proxy until the VMM dies or SIGTERM/SIGINT arrives.
pub async fn run(args: ProxyArgs) -> Result<(), String> {
    let tls = AgentTlsClient::load(&args.tls_dir)?;
    let listener = listen_then_publish(&args.socket)?;
    let result = serve(listener, &args, tls).await;
    let _ = std::fs::remove_file(&args.socket);
    result
}

async fn serve(listener: UnixListener, args: &ProxyArgs, tls: AgentTlsClient) -> Result<(), String> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(args.max_connections));
    let vmm = async {
        match args.vmm_pid {
            Some(pid) => vmm_gone(pid, args.vmm_start_time).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(vmm);
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = &mut vmm => {
                eprintln!("proxy {}: the VMM (pid {:?}) is gone; closing every connection", args.socket.display(), args.vmm_pid);
                break;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            accepted = listener.accept() => {
                let (conn, _) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("proxy {}: accept: {e}", args.socket.display());
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    eprintln!("proxy {}: {} connections already open; closing a new one", args.socket.display(), args.max_connections);
                    continue;
                };
                let (tls, target, timeout, mut stop) = (tls.clone(), args.target, args.connect_timeout, stop_rx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let mut conn = conn;
                    let bridged = async {
                        let mut agent = match tls.connect(target, timeout).await {
                            Ok(a) => a,
                            Err(e) => {
                                eprintln!("proxy: {e}");
                                return;
                            }
                        };
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut agent).await;
                    };
                    tokio::select! {
                        _ = bridged => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                });
            }
        }
    }
    let _ = stop_tx.send(true);
    drop(listener);
    // Give the connection tasks a moment to drop their streams before the process exits.
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(())
}

/// Listens on `socket`, which appears only once it accepts connections: the socket is bound
/// and listening under a temporary name first, then renamed. (Bound in place, the path exists
/// between bind(2) and listen(2), and a client that waits for it to appear, as the service and
/// the tests do, could be refused.)
fn listen_then_publish(socket: &Path) -> Result<UnixListener, String> {
    // No longer than the final name: a socket path is limited to 107 bytes, and the service's
    // paths (a 64-character sandbox id among them) come close.
    let tmp = if socket.extension().is_some_and(|e| e.len() >= 3) {
        socket.with_extension("new")
    } else {
        socket.with_file_name(".new")
    };
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| format!("cannot listen on {}: {e}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, socket) {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot move {} to {}: {e}", tmp.display(), socket.display()));
    }
    Ok(listener)
}

/// `<run_dir>/agent.sock`.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("agent.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The socket path appears already listening, and no temporary name is left; a path of the
    /// longest length a socket can have works too.
    #[tokio::test]
    async fn the_socket_appears_listening() {
        let top = tempfile::tempdir().unwrap();
        let room = 107 - socket_path(top.path()).as_os_str().len() - 1;
        let dir = top.path().join("d".repeat(room));
        std::fs::create_dir(&dir).unwrap();
        let sock = socket_path(&dir);
        assert_eq!(sock.as_os_str().len(), 107);
        std::fs::write(&sock, b"stale").unwrap();
        let listener = listen_then_publish(&sock).unwrap();
        let client = tokio::net::UnixStream::connect(&sock).await.expect("connectable as soon as it exists");
        let (_accepted, _) = listener.accept().await.unwrap();
        drop(client);
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("agent.sock")]);
    }
}
