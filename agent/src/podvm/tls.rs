//! The agent protocol forwarder (the role of cloud-api-adaptor's agent-protocol-forwarder, built
//! in): a mutual-TLS listener on the underlay address whose connections are bridged byte for
//! byte to the agent's own ttrpc server on a unix socket. TLS 1.3 only, rustls with the ring
//! provider; a client certificate chained to the user data's CA is required.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use slog::{debug, info, warn, Logger};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::config::Tls;

/// A client must finish the TLS handshake within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;

/// ring, not aws-lc (no C/cmake build for the static guest binary). rustls 0.23.48 deprecates
/// ring's provider for lacking post-quantum key exchange; the peer (our service) uses the same.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls server configuration: TLS 1.3, the server chain and key, client certificates
/// verified against the CA. Errors name the user data field at fault.
pub fn server_config(tls: &Tls) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut roots = RootCertStore::empty();
    for c in &tls.ca {
        roots.add(c.clone()).map_err(|e| format!("user data field tls.ca_cert: not a usable CA certificate: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| format!("user data field tls.ca_cert: cannot verify client certificates with it: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS 1.3 with the ring provider: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.server_chain.clone(), tls.server_key.clone_key())
        .map_err(|e| {
            format!("user data fields tls.server_cert / tls.server_key: not a usable certificate and key pair: {e}")
        })?;
    Ok(Arc::new(config))
}

/// Binds `addr` and serves until the runtime ends; each connection is bridged to `target` (the
/// agent's unix socket). Bind errors are returned; per-connection errors are logged.
/// Returns the bound address.
pub async fn start(
    log: Logger,
    tls: &Tls,
    addr: std::net::SocketAddr,
    target: PathBuf,
) -> Result<std::net::SocketAddr, String> {
    start_with(log, tls, addr, target, HANDSHAKE_TIMEOUT).await
}

async fn start_with(
    log: Logger,
    tls: &Tls,
    addr: std::net::SocketAddr,
    target: PathBuf,
    handshake_timeout: Duration,
) -> Result<std::net::SocketAddr, String> {
    let acceptor = TlsAcceptor::from(server_config(tls)?);
    let listener = TcpListener::bind(addr).await.map_err(|e| format!("listen on TCP {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| format!("listen on TCP {addr}: {e}"))?;
    info!(log, "agent protocol forwarder listening (mutual TLS)"; "address" => bound.to_string(),
        "target" => target.display().to_string());
    tokio::spawn(serve(log, listener, acceptor, target, handshake_timeout));
    Ok(bound)
}

async fn serve(
    log: Logger,
    listener: TcpListener,
    acceptor: TlsAcceptor,
    target: PathBuf,
    handshake_timeout: Duration,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                warn!(log, "forwarder: accept failed"; "error" => %e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(log, "forwarder: connection refused: too many connections"; "peer" => peer.to_string(),
                "max" => MAX_CONNECTIONS);
            continue;
        };
        let log = log.new(slog::o!("peer" => peer.to_string()));
        let acceptor = acceptor.clone();
        let target = target.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match bridge(tcp, acceptor, &target, handshake_timeout).await {
                Ok((up, down)) => debug!(log, "forwarder: connection closed"; "to_agent" => up, "from_agent" => down),
                Err(e) => warn!(log, "forwarder: connection failed"; "error" => e),
            }
        });
    }
}

async fn bridge(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    target: &std::path::Path,
    handshake_timeout: Duration,
) -> Result<(u64, u64), String> {
    let _ = tcp.set_nodelay(true);
    let mut tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("TLS handshake: {e}")),
        Err(_) => return Err(format!("TLS handshake not finished within {handshake_timeout:?}")),
    };
    let mut agent =
        UnixStream::connect(target).await.map_err(|e| format!("connect to the agent at {}: {e}", target.display()))?;
    tokio::io::copy_bidirectional(&mut tls, &mut agent).await.map_err(|e| format!("bridging: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::podvm::config::{parse, tests::sample};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const CLIENT_CERT: &str = include_str!("testdata/client.pem");
    const CLIENT_KEY: &str = include_str!("testdata/client.key");
    const OTHER_CERT: &str = include_str!("testdata/other.pem");
    const OTHER_KEY: &str = include_str!("testdata/other.key");

    fn client(cert: Option<(&str, &str)>) -> tokio_rustls::TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(crate::podvm::config::tests::CA.as_bytes()).unwrap()).unwrap();
        let b = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
        let c = match cert {
            Some((c, k)) => b
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(c.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(k.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        tokio_rustls::TlsConnector::from(Arc::new(c))
    }

    /// Connects, writes a line and reads the echo; any failure is the error.
    async fn round_trip(addr: std::net::SocketAddr, cert: Option<(&str, &str)>) -> Result<Vec<u8>, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut s = client(cert).connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))?;
        s.write_all(b"ping\n").await.map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        Ok(buf.to_vec())
    }

    #[tokio::test]
    async fn only_clients_of_the_ca_reach_the_agent_socket() {
        let dir = std::env::temp_dir().join(format!("podvisor-forwarder-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("agent.sock");
        let _ = std::fs::remove_file(&sock);
        // The "agent": an echo server on the unix socket.
        let agent = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = agent.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = c.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let u = parse(sample().to_string().as_bytes()).unwrap();
        let log = Logger::root(slog::Discard, slog::o!());
        let handshake = Duration::from_secs(2);
        let addr = start_with(log, &u.tls, "127.0.0.1:0".parse().unwrap(), sock.clone(), handshake).await.unwrap();

        assert_eq!(round_trip(addr, Some((CLIENT_CERT, CLIENT_KEY))).await.unwrap(), b"ping\n");
        // TLS 1.3 reports the server's rejection of the client certificate after the client's
        // handshake finished: on the first read at the latest.
        let e = round_trip(addr, None).await.unwrap_err();
        assert!(e.contains("CertificateRequired"), "no client cert: {e}");
        let e = round_trip(addr, Some((OTHER_CERT, OTHER_KEY))).await.unwrap_err();
        assert!(e.contains("UnknownCA") || e.contains("BadCertificate"), "foreign CA: {e}");
        // Still serving after the refusals.
        assert_eq!(round_trip(addr, Some((CLIENT_CERT, CLIENT_KEY))).await.unwrap(), b"ping\n");
        // Clients that never handshake hold a slot (until HANDSHAKE_TIMEOUT); the connection
        // over MAX_CONNECTIONS is closed at accept.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Even a valid client gets no slot while they hold them all (well within the timeout:
        // local connects take microseconds).
        let e = round_trip(addr, Some((CLIENT_CERT, CLIENT_KEY))).await.unwrap_err();
        assert!(e.starts_with("handshake"), "the connection over the limit is closed at accept: {e}");
        let mut b = [0u8; 1];
        // The silent clients are dropped at the handshake timeout, freeing their slots.
        for c in &mut idle {
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await.expect("closed at the timeout");
            assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        }
        // (A task closes its socket just before it releases its slot: allow for that gap.)
        let mut last = Err(String::new());
        for _ in 0..40 {
            last = round_trip(addr, Some((CLIENT_CERT, CLIENT_KEY))).await;
            if last.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(last.unwrap(), b"ping\n", "slots are free again after the handshake timeout");
        drop(idle);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
