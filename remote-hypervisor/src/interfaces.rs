//! What the service core needs besides the [`crate::provider::Provider`]: TLS material per podvm
//! and the worker side of the pod tunnel. The `qemu` helper's `crate::tls` and `crate::net`
//! implement them; tests use fakes. Kept as traits so the core is tested in milliseconds.

use std::net::IpAddr;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// One podvm's TLS material (PEM): a fresh CA, the agent's server certificate and key (go into
/// the user data), and the service's client certificate and key (stay in `<run_dir>/tls`).
#[derive(Clone)]
pub struct PodvmTls {
    /// The per-podvm CA certificate.
    pub ca_cert: String,
    /// The agent's certificate, signed by the CA, for `PODVM_SERVER_NAME`.
    pub server_cert: String,
    /// Its PKCS#8 key.
    pub server_key: String,
    /// The service's (proxy's) client certificate, signed by the CA.
    pub client_cert: String,
    /// Its PKCS#8 key.
    pub client_key: String,
}

impl std::fmt::Debug for PodvmTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PodvmTls { .. }")
    }
}

/// Issues TLS material for one podvm.
pub trait TlsIssuer: Send + Sync {
    /// A new CA, a server certificate whose SAN is the DNS name
    /// [`crate::tlsclient::PODVM_SERVER_NAME`], and a client certificate; `podvm_name` goes into
    /// the subjects. The error names what failed.
    fn issue(&self, podvm_name: &str) -> Result<PodvmTls, String>;
}

/// What the worker side of a pod's tunnel is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelSpec {
    /// The pod's netns (`networkNamespacePath`), holding the CNI's `eth0`.
    pub netns: PathBuf,
    /// The VXLAN id.
    pub vni: u32,
    /// The podvm's address (the VXLAN remote).
    pub remote: IpAddr,
    /// UDP port (`VXLAN_PORT`).
    pub port: u16,
}

/// What was made for a tunnel, recorded in `state.json` so that a restarted service removes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelState {
    /// The spec it was made from.
    pub spec: TunnelSpec,
    /// Device names made (host side `vx<vni>`, pod side `vxlan0`).
    pub devices: Vec<String>,
}

/// The worker side of the pod tunnel (contract: "Worker-side tunnel").
#[async_trait]
pub trait PodTunnel: Send + Sync {
    /// MAC of `eth0` in the pod's netns (the podvm's tunnel device takes it).
    async fn pod_mac(&self, netns: &std::path::Path) -> Result<String, String>;
    /// Creates the VXLAN device, moves it into the netns as `vxlan0`, and redirects traffic
    /// between `eth0` and `vxlan0`. On error nothing of it is left.
    async fn setup(&self, spec: &TunnelSpec) -> Result<TunnelState, String>;
    /// Removes what `setup` made (never `eth0`); idempotent, also when the netns is gone.
    async fn teardown(&self, state: &TunnelState) -> Result<(), String>;
}
