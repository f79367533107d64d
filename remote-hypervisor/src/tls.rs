//! Per-podvm TLS material: a fresh CA per podvm (ECDSA P-256), a server certificate for the
//! agent's listener (SAN = the podvm IP) and a client certificate for the service, all valid one
//! year. The agent gets the CA and the server pair in its user data; the service keeps the CA and
//! the client pair under `<run dir>/tls/` and dials the podvm with [`ClientTls::client_config`]
//! (rustls, ring provider, TLS 1.3 only, the server verified against the podvm's CA for its IP,
//! client certificate presented).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::provider::AgentTls;

/// The DNS name every podvm's server certificate carries besides its IP. The CA is fresh per
/// podvm, so a certificate chained to it is that podvm's whatever the name; the fixed name lets
/// the service make the material before the podvm has an address (clouds assign it at creation,
/// after the user data is fixed): dial with [`podvm_server_name`].
pub const PODVM_SERVER_NAME: &str = "podvm.podvisor.internal";

/// How long the certificates are valid.
const VALIDITY: time::Duration = time::Duration::days(365);

/// File names under the client directory.
const CA_FILE: &str = "ca.pem";
const CLIENT_CERT_FILE: &str = "client.pem";
const CLIENT_KEY_FILE: &str = "client-key.pem";

/// A TLS material failure; the text names the file or step.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

fn err(what: impl std::fmt::Display) -> impl FnOnce(rcgen::Error) -> TlsError {
    let what = what.to_string();
    move |e| TlsError(format!("{what}: {e}"))
}

/// The whole material of one podvm (PEM; keys are PKCS#8).
#[derive(Clone, PartialEq, Eq)]
pub struct PodvmTls {
    /// The per-podvm CA certificate.
    pub ca_cert_pem: String,
    /// The agent's certificate (SAN = podvm IP).
    pub server_cert_pem: String,
    /// The agent's key.
    pub server_key_pem: String,
    /// The service's client certificate.
    pub client_cert_pem: String,
    /// The service's client key.
    pub client_key_pem: String,
}

impl std::fmt::Debug for PodvmTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PodvmTls { .. }")
    }
}

/// The service's half: what it keeps under `tls/` to dial the podvm.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The per-podvm CA certificate.
    pub ca_cert_pem: String,
    /// The service's client certificate.
    pub client_cert_pem: String,
    /// The service's client key.
    pub client_key_pem: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls { .. }")
    }
}

fn leaf_params(cn: &str, now: time::OffsetDateTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + VALIDITY;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p
}

/// Generates a fresh CA and the server and client pairs for the podvm at `podvm_ip` (server SANs:
/// that IP and [`PODVM_SERVER_NAME`]); `name` (the podvm's name) goes into the subjects.
pub fn generate(podvm_ip: IpAddr, name: &str) -> Result<PodvmTls, TlsError> {
    generate_with(Some(podvm_ip), name)
}

/// [`generate`] for a podvm whose address is not known yet: the server certificate's only SAN is
/// [`PODVM_SERVER_NAME`].
pub fn generate_unaddressed(name: &str) -> Result<PodvmTls, TlsError> {
    generate_with(None, name)
}

fn generate_with(podvm_ip: Option<IpAddr>, name: &str) -> Result<PodvmTls, TlsError> {
    let alg = &rcgen::PKCS_ECDSA_P256_SHA256;
    let now = time::OffsetDateTime::now_utc();

    let ca_key = KeyPair::generate_for(alg).map_err(err("generate the podvm CA key"))?;
    let mut ca = leaf_params(&format!("podvisor podvm CA {name}"), now);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).map_err(err("self-sign the podvm CA"))?;

    let server_key = KeyPair::generate_for(alg).map_err(err("generate the agent's key"))?;
    let mut server = leaf_params(&format!("{name} agent"), now);
    server.subject_alt_names =
        vec![SanType::DnsName(PODVM_SERVER_NAME.try_into().map_err(err(format!("server name {PODVM_SERVER_NAME}")))?)];
    server.subject_alt_names.extend(podvm_ip.map(SanType::IpAddress));
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).map_err(err("sign the agent's certificate"))?;

    let client_key = KeyPair::generate_for(alg).map_err(err("generate the service's client key"))?;
    let mut client = leaf_params("podvisor-remote-hypervisor", now);
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert =
        client.signed_by(&client_key, &ca_cert, &ca_key).map_err(err("sign the service's client certificate"))?;

    Ok(PodvmTls {
        ca_cert_pem: ca_cert.pem(),
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
    })
}

impl PodvmTls {
    /// What the agent gets in its user data.
    pub fn agent_tls(&self) -> AgentTls {
        AgentTls {
            ca_cert: self.ca_cert_pem.clone(),
            server_cert: self.server_cert_pem.clone(),
            server_key: self.server_key_pem.clone(),
        }
    }

    /// The service's half.
    pub fn client(&self) -> ClientTls {
        ClientTls {
            ca_cert_pem: self.ca_cert_pem.clone(),
            client_cert_pem: self.client_cert_pem.clone(),
            client_key_pem: self.client_key_pem.clone(),
        }
    }

    /// Writes the service's half to `dir` (created mode 0700; files mode 0600).
    pub fn write_client_dir(&self, dir: &Path) -> Result<(), TlsError> {
        self.client().write_dir(dir)
    }
}

fn write_private(path: &Path, content: &str) -> Result<(), TlsError> {
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
        f.write_all(content.as_bytes())?;
        f.sync_all()
    };
    write().map_err(|e| TlsError(format!("write {}: {e}", path.display())))
}

fn read_bounded(path: &Path) -> Result<String, TlsError> {
    const MAX: u64 = 64 * 1024;
    let meta = std::fs::metadata(path).map_err(|e| TlsError(format!("read {}: {e}", path.display())))?;
    if meta.len() > MAX {
        return Err(TlsError(format!(
            "{} is {} bytes, more than a PEM file can be ({MAX})",
            path.display(),
            meta.len()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| TlsError(format!("read {}: {e}", path.display())))
}

/// Reads what [`PodvmTls::write_client_dir`] wrote.
pub fn read_client_dir(dir: &Path) -> Result<ClientTls, TlsError> {
    Ok(ClientTls {
        ca_cert_pem: read_bounded(&dir.join(CA_FILE))?,
        client_cert_pem: read_bounded(&dir.join(CLIENT_CERT_FILE))?,
        client_key_pem: read_bounded(&dir.join(CLIENT_KEY_FILE))?,
    })
}

/// The rustls crypto provider both ends use: ring (the agent's too). rustls 0.23.48 deprecates
/// it for lacking post-quantum key exchange; both ends are ours and use X25519/P-256.
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS server name of a podvm: its IP (the server certificate's SAN).
pub fn server_name(podvm_ip: IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(podvm_ip.into())
}

/// The TLS server name that works for every podvm: [`PODVM_SERVER_NAME`].
pub fn podvm_server_name() -> ServerName<'static> {
    ServerName::try_from(PODVM_SERVER_NAME).expect("a valid DNS name")
}

/// Parses one PEM certificate.
pub fn parse_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError(format!("{what}: not a PEM certificate: {e}")))
}

/// Parses one PEM private key.
pub fn parse_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError(format!("{what}: not a PEM private key: {e}")))
}

impl ClientTls {
    /// Writes `ca.pem`, `client.pem`, `client-key.pem` to `dir` (created mode 0700, files 0600).
    pub fn write_dir(&self, dir: &Path) -> Result<(), TlsError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| TlsError(format!("create {}: {e}", dir.display())))?;
        write_private(&dir.join(CA_FILE), &self.ca_cert_pem)?;
        write_private(&dir.join(CLIENT_CERT_FILE), &self.client_cert_pem)?;
        write_private(&dir.join(CLIENT_KEY_FILE), &self.client_key_pem)
    }

    /// A TLS 1.3 client that trusts only the podvm's CA and presents the client certificate.
    /// Connect with [`server_name`] of the podvm IP, or [`podvm_server_name`].
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(parse_cert(&self.ca_cert_pem, "podvm CA")?).map_err(|e| TlsError(format!("podvm CA: {e}")))?;
        let cert = parse_cert(&self.client_cert_pem, "client certificate")?;
        let key = parse_key(&self.client_key_pem, "client key")?;
        let config = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError(format!("TLS 1.3 client: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], key)
            .map_err(|e| TlsError(format!("client certificate: {e}")))?;
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::fs::PermissionsExt;

    /// The agent's side, as the podvm agent builds it: TLS 1.3, client certificate required and
    /// chained to the CA.
    fn server_config(t: &PodvmTls) -> Arc<rustls::ServerConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(parse_cert(&t.ca_cert_pem, "ca").unwrap()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
            .build()
            .unwrap();
        Arc::new(
            rustls::ServerConfig::builder_with_provider(crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(
                    vec![parse_cert(&t.server_cert_pem, "server").unwrap()],
                    parse_key(&t.server_key_pem, "key").unwrap(),
                )
                .unwrap(),
        )
    }

    /// One connection: the server echoes 4 bytes; returns the client's result and the server's.
    fn exchange(
        server: &PodvmTls,
        client: &ClientTls,
        name: ServerName<'static>,
    ) -> (Result<[u8; 4], String>, Result<(), String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sc = server_config(server);
        let srv = std::thread::spawn(move || -> Result<(), String> {
            let (sock, _) = listener.accept().map_err(|e| e.to_string())?;
            let conn = rustls::ServerConnection::new(sc).map_err(|e| e.to_string())?;
            let mut s = rustls::StreamOwned::new(conn, sock);
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).map_err(|e| e.to_string())?;
            s.write_all(&buf).map_err(|e| e.to_string())?;
            s.flush().map_err(|e| e.to_string())
        });
        let cc = client.client_config().unwrap();
        let cli = (|| -> Result<[u8; 4], String> {
            let sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
            let conn = rustls::ClientConnection::new(cc, name).map_err(|e| e.to_string())?;
            let mut s = rustls::StreamOwned::new(conn, sock);
            s.write_all(b"ping").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).map_err(|e| e.to_string())?;
            assert_eq!(s.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
            Ok(buf)
        })();
        (cli, srv.join().unwrap())
    }

    #[test]
    fn handshake_with_the_podvm_ca_and_ip() {
        let ip: IpAddr = "172.31.250.10".parse().unwrap();
        let t = generate(ip, "podvm-test-12345678").unwrap();
        assert!(t.server_key_pem.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");
        let (c, s) = exchange(&t, &t.client(), server_name(ip));
        assert_eq!(c, Ok(*b"ping"));
        assert_eq!(s, Ok(()));
        let (c, _) = exchange(&t, &t.client(), podvm_server_name());
        assert_eq!(c, Ok(*b"ping"), "the fixed name works too");
        let u = generate_unaddressed("podvm-x").unwrap();
        let (c, _) = exchange(&u, &u.client(), podvm_server_name());
        assert_eq!(c, Ok(*b"ping"), "material made before the address is known");
    }

    #[test]
    fn a_client_of_another_ca_is_refused() {
        let ip: IpAddr = "172.31.250.10".parse().unwrap();
        let t = generate(ip, "a").unwrap();
        let other = generate(ip, "b").unwrap();
        // The other podvm's client trusts its own CA only, and presents a cert the server refuses.
        let mut foreign = other.client();
        foreign.ca_cert_pem = t.ca_cert_pem.clone();
        let (c, s) = exchange(&t, &foreign, server_name(ip));
        assert!(s.is_err(), "the server must refuse a client certificate of another CA");
        assert!(c.is_err(), "{c:?}");
        let e = s.unwrap_err();
        assert!(e.contains("certificate") || e.contains("UnknownIssuer"), "{e}");
    }

    #[test]
    fn the_server_is_checked_against_the_podvm_ip_and_ca() {
        let ip: IpAddr = "172.31.250.10".parse().unwrap();
        let t = generate(ip, "a").unwrap();
        let (c, _) = exchange(&t, &t.client(), server_name("172.31.250.11".parse().unwrap()));
        let e = c.unwrap_err();
        assert!(e.contains("not valid for name"), "another IP is refused: {e}");
        let other = generate(ip, "b").unwrap();
        let mut wrong_ca = t.client();
        wrong_ca.ca_cert_pem = other.ca_cert_pem;
        let (c, _) = exchange(&t, &wrong_ca, server_name(ip));
        let e = c.unwrap_err();
        assert!(e.contains("UnknownIssuer"), "a server of another CA is refused: {e}");
    }

    #[test]
    fn client_dir_round_trip_with_private_modes() {
        let dir = std::env::temp_dir().join(format!("podvisor-tls-{}", std::process::id()));
        let t = generate("10.0.0.5".parse().unwrap(), "x").unwrap();
        t.write_client_dir(&dir.join("tls")).unwrap();
        let back = read_client_dir(&dir.join("tls")).unwrap();
        assert_eq!(back, t.client());
        for f in [CA_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE] {
            let mode = std::fs::metadata(dir.join("tls").join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let e = read_client_dir(&dir.join("missing")).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("missing/ca.pem"), "{e}");
    }
}
