//! The service's side of the mutual TLS to a podvm's agent (port 15150): the client config built
//! from `<run_dir>/tls/` and a bounded connect. Used by StartVM's readiness wait and the proxy.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The CA that signs both ends (one per podvm).
pub const CA_FILE: &str = "ca.pem";
/// The service's client certificate.
pub const CLIENT_CERT_FILE: &str = "client.pem";
/// Its PKCS#8 key (mode 0600).
pub const CLIENT_KEY_FILE: &str = "client-key.pem";
/// The DNS name in the agent's server certificate.
pub const SERVER_NAME_FILE: &str = "server-name";

/// A ready client: config plus the name the agent's certificate must carry.
#[derive(Clone)]
pub struct AgentTlsClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl AgentTlsClient {
    /// Loads `tls_dir`: trusts only its CA, presents its client certificate, speaks TLS 1.3.
    pub fn load(tls_dir: &Path) -> Result<AgentTlsClient, String> {
        let read = |f: &str| {
            let p = tls_dir.join(f);
            std::fs::read(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let ca = read(CA_FILE)?;
        let cert = read(CLIENT_CERT_FILE)?;
        let key = read(CLIENT_KEY_FILE)?;
        let name = String::from_utf8(read(SERVER_NAME_FILE)?).map_err(|_| "server-name is not UTF-8".to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca) {
            let c = c.map_err(|e| format!("{}/{CA_FILE}: {e}", tls_dir.display()))?;
            roots.add(c).map_err(|e| format!("{}/{CA_FILE}: {e}", tls_dir.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{}/{CA_FILE} holds no certificate", tls_dir.display()));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}/{CLIENT_CERT_FILE}: {e}", tls_dir.display()))?;
        let key =
            PrivateKeyDer::from_pem_slice(&key).map_err(|e| format!("{}/{CLIENT_KEY_FILE}: {e}", tls_dir.display()))?;
        // The ring provider, as the contract fixes for both ends (the podvm agent has no aws-lc);
        // rustls 0.23.48 deprecates it only for its lack of post-quantum key exchange.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| format!("{}: client certificate: {e}", tls_dir.display()))?;
        let server_name = ServerName::try_from(name.trim().to_owned())
            .map_err(|e| format!("{}/{SERVER_NAME_FILE}: {e}", tls_dir.display()))?;
        Ok(AgentTlsClient { connector: TlsConnector::from(Arc::new(config)), server_name })
    }

    /// Dials `addr` and completes the TLS handshake within `timeout`.
    pub async fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TlsStream<TcpStream>, String> {
        let work = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            self.connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| format!("TLS handshake with {addr}: {e}"))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("connect {addr}: no TLS handshake within {timeout:?}"))?
    }
}

/// The DNS name in every podvm's server certificate (the qemu helper's `tls::PODVM_SERVER_NAME`).
/// The podvm's address is not known when its certificate is made (providers assign it at
/// creation, after the user data is fixed); the CA is fresh per podvm, so a certificate chained
/// to it is that podvm's whatever the name.
pub const PODVM_SERVER_NAME: &str = "podvm.podvisor.internal";
