//! A client of the agent's debug console (vsock port 1026 when the guest kernel command line holds
//! `agent.debug_console`): over hybrid vsock it connects to vhost-device-vsock's unix socket,
//! writes `CONNECT <port>\n`, reads `OK <n>\n`, then talks to a shell on a pty.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hypervisor::AgentChannel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Kata's debug console port.
pub const PORT: u32 = 1026;

/// Output bytes read at most (the guest is untrusted).
const MAX_OUTPUT: usize = 1 << 20;

/// Connects to `port` through vhost-device-vsock's unix socket `uds`: the `CONNECT` handshake,
/// then a stream whose bytes are the guest's. A port nobody listens on in the guest ends in an
/// error naming "connection closed after CONNECT".
pub async fn connect_hybrid(uds: &Path, port: u32) -> Result<UnixStream> {
    let mut s = UnixStream::connect(uds).await.with_context(|| format!("connect {}", uds.display()))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    let mut reply = Vec::new();
    loop {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .with_context(|| format!("no answer to CONNECT {port} within 10s"))??;
        if n == 0 {
            bail!("connection closed after CONNECT {port} (nothing listens on that port in the guest)");
        }
        if b[0] == b'\n' {
            break;
        }
        reply.push(b[0]);
        if reply.len() > 64 {
            bail!("overlong reply to CONNECT {port}");
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    if !reply.starts_with("OK ") {
        bail!("CONNECT {port} answered {reply:?}");
    }
    Ok(s)
}

/// Connects to the debug console of the VM whose agent channel is `channel`.
pub async fn connect(channel: &AgentChannel, port: u32) -> Result<UnixStream> {
    match channel {
        AgentChannel::HybridVsock { uds, .. } => connect_hybrid(uds, port).await,
        AgentChannel::Vsock { cid, .. } => {
            let ch = AgentChannel::Vsock { cid: *cid, port };
            let fd = ch.connect(Duration::from_secs(10)).await.with_context(|| format!("vsock {cid}:{port}"))?;
            // A connected stream socket: reads and writes are all this client does with it.
            Ok(UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))?)
        }
        AgentChannel::Unix { path } => bail!("{}: a podvm has no debug console port", path.display()),
    }
}

/// Runs `command` in a debug console shell and returns its output (stdout and stderr, the pty's
/// `\r\n` turned into `\n`, trimmed). The shell exits afterwards.
pub async fn run(channel: &AgentChannel, command: &str, timeout: Duration) -> Result<String> {
    let mut s = connect(channel, PORT).await?;
    // The markers are printed by printf, so the terminal's echo of this line never contains them.
    let script = format!("printf '%s%s\\n' '<<' 'begin>>'; {command}; printf '%s%s\\n' '<<' 'end>>'; exit\n");
    s.write_all(script.as_bytes()).await?;
    let mut out = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 || out.len() > MAX_OUTPUT {
                return Ok::<_, std::io::Error>(());
            }
            out.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(timeout, read_all)
        .await
        .with_context(|| format!("debug console: {command:?} did not finish within {timeout:?}"))??;
    let text = String::from_utf8_lossy(&out).replace("\r\n", "\n");
    let body = text
        .split_once("<<begin>>\n")
        .and_then(|(_, rest)| rest.split_once("<<end>>"))
        .map(|(body, _)| body.trim().to_string());
    body.with_context(|| format!("debug console: no marked output in {text:?}"))
}
