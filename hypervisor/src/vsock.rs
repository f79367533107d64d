//! The agent channel: kernel vsock (`vhost-vsock-pci`) or hybrid vsock (`vhost-user-vsock-pci`
//! behind vhost-device-vsock: a unix socket plus a `CONNECT <port>` handshake).

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How to reach a port inside the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentChannel {
    /// AF_VSOCK to the guest's context id.
    Vsock {
        /// Guest CID.
        cid: u32,
        /// Port the agent listens on.
        port: u32,
    },
    /// A unix socket served by vhost-device-vsock; `CONNECT <port>\n` is answered `OK <n>\n`.
    HybridVsock {
        /// The daemon's `--uds-path`.
        uds: PathBuf,
        /// Port the agent listens on.
        port: u32,
    },
    /// A plain unix socket that reaches the agent (Kata's `remote://` scheme: the remote
    /// hypervisor service proxies it to a podvm).
    Unix {
        /// The socket path.
        path: PathBuf,
    },
}

impl std::fmt::Display for AgentChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentChannel::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            AgentChannel::HybridVsock { uds, port } => {
                write!(f, "hybrid vsock unix://{} (CONNECT {port})", uds.display())
            }
            AgentChannel::Unix { path } => write!(f, "remote://{}", path.display()),
        }
    }
}

impl AgentChannel {
    /// One connection attempt, bounded by `timeout`. Returns a connected, non-blocking socket
    /// whose next bytes are the guest's.
    pub async fn connect(&self, timeout: Duration) -> std::io::Result<OwnedFd> {
        match tokio::time::timeout(timeout, self.connect_inner()).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {timeout:?}"))),
        }
    }

    async fn connect_inner(&self) -> std::io::Result<OwnedFd> {
        match self {
            AgentChannel::HybridVsock { uds, port } => {
                let mut s = UnixStream::connect(uds).await?;
                s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
                read_connect_reply(&mut s, *port).await?;
                Ok(s.into_std()?.into())
            }
            AgentChannel::Unix { path } => Ok(UnixStream::connect(path).await?.into_std()?.into()),
            AgentChannel::Vsock { cid, port } => {
                let (cid, port) = (*cid, *port);
                tokio::task::spawn_blocking(move || {
                    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
                    let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
                    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &VsockAddr::new(cid, port))?;
                    let flags = nix::fcntl::fcntl(std::os::fd::AsRawFd::as_raw_fd(&fd), nix::fcntl::FcntlArg::F_GETFL)?;
                    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
                    nix::fcntl::fcntl(std::os::fd::AsRawFd::as_raw_fd(&fd), nix::fcntl::FcntlArg::F_SETFL(flags))?;
                    Ok::<_, nix::Error>(fd)
                })
                .await
                .map_err(std::io::Error::other)?
                .map_err(std::io::Error::from)
            }
        }
    }
}

/// Reads the daemon's answer to `CONNECT <port>\n`: one line (at most 64 bytes) starting with
/// `OK `. Reads byte by byte so that no guest byte after the newline is consumed. Public for the
/// fuzz tests.
pub async fn read_connect_reply<R: tokio::io::AsyncRead + Unpin>(s: &mut R, port: u32) -> std::io::Result<()> {
    let mut reply = Vec::new();
    loop {
        let b = s.read_u8().await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("connection closed after CONNECT {port} (guest not listening yet?)"))
        })?;
        if b == b'\n' {
            break;
        }
        reply.push(b);
        if reply.len() > 64 {
            return Err(std::io::Error::other("overlong reply to CONNECT"));
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    if !reply.starts_with("OK ") {
        return Err(std::io::Error::other(format!("CONNECT {port} answered {reply:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    async fn fake_daemon(reply: &'static [u8]) -> (PathBuf, tokio::task::JoinHandle<String>) {
        let dir = std::env::temp_dir().join(format!("podvisor-hv-{}-{}", std::process::id(), reply.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hvsock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(reply).await.unwrap();
            s.write_all(b"guest-bytes").await.unwrap();
            String::from_utf8_lossy(&buf).into_owned()
        });
        (path, h)
    }

    #[tokio::test]
    async fn hybrid_handshake_leaves_guest_bytes_unread() {
        let (path, h) = fake_daemon(b"OK 1024\n").await;
        let ch = AgentChannel::HybridVsock { uds: path.clone(), port: 1024 };
        let fd = ch.connect(Duration::from_secs(5)).await.unwrap();
        assert_eq!(h.await.unwrap(), "CONNECT 1024\n");
        let mut s = UnixStream::from_std(std::os::unix::net::UnixStream::from(fd)).unwrap();
        let mut rest = vec![0u8; 11];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, b"guest-bytes");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn hybrid_refusal_is_an_error() {
        let (path, h) = fake_daemon(b"NO 1024\n").await;
        let ch = AgentChannel::HybridVsock { uds: path.clone(), port: 1024 };
        let err = ch.connect(Duration::from_secs(5)).await.unwrap_err();
        assert!(err.to_string().contains("answered \"NO 1024\""), "{err}");
        h.await.unwrap();
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn display_names_the_channel() {
        let ch = AgentChannel::HybridVsock { uds: "/run/x/hvsock".into(), port: 1024 };
        assert_eq!(ch.to_string(), "hybrid vsock unix:///run/x/hvsock (CONNECT 1024)");
        assert_eq!(AgentChannel::Vsock { cid: 3, port: 1024 }.to_string(), "vsock://3:1024");
    }
}
