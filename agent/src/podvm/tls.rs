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
pub async fn start(
    log: Logger,
    tls: &Tls,
    addr: std::net::SocketAddr,
    target: PathBuf,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let acceptor = TlsAcceptor::from(server_config(tls)?);
    let listener = TcpListener::bind(addr).await.map_err(|e| format!("listen on TCP {addr}: {e}"))?;
    info!(log, "agent protocol forwarder listening (mutual TLS)"; "address" => addr.to_string(),
        "target" => target.display().to_string());
    Ok(tokio::spawn(serve(log, listener, acceptor, target)))
}

async fn serve(log: Logger, listener: TcpListener, acceptor: TlsAcceptor, target: PathBuf) {
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
            match bridge(tcp, acceptor, &target).await {
                Ok((up, down)) => debug!(log, "forwarder: connection closed"; "to_agent" => up, "from_agent" => down),
                Err(e) => warn!(log, "forwarder: connection failed"; "error" => e),
            }
        });
    }
}

async fn bridge(tcp: TcpStream, acceptor: TlsAcceptor, target: &std::path::Path) -> Result<(u64, u64), String> {
    let _ = tcp.set_nodelay(true);
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("TLS handshake: {e}")),
        Err(_) => return Err(format!("TLS handshake not finished within {HANDSHAKE_TIMEOUT:?}")),
    };
    let mut agent =
        UnixStream::connect(target).await.map_err(|e| format!("connect to the agent at {}: {e}", target.display()))?;
    tokio::io::copy_bidirectional(&mut tls, &mut agent).await.map_err(|e| format!("bridging: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::podvm::config::{parse, tests::sample};

    #[test]
    fn the_server_config_is_tls13_only_with_client_auth() {
        let u = parse(sample().to_string().as_bytes()).unwrap();
        let c = server_config(&u.tls).unwrap();
        assert!(c.verifier().offer_client_auth() && c.verifier().client_auth_mandatory());
    }
}
