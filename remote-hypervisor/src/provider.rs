//! Providers: where podvms come from. The service core (`service`) knows only this trait; `qemu`
//! runs podvms as local QEMU processes. `docs/peer-pods.md` shows what cloud providers would call.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// A podvm size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceType {
    /// The provider's name for it (`small`, `t3.medium`, `Standard_D2as_v5`).
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
}

/// What the podvm learns at boot (cloud user data): its network, the agent's TLS material, the
/// pod tunnel. Serialized as JSON by the provider in whatever way it delivers user data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserData {
    /// Format version: 1.
    pub version: u32,
    /// The underlay NIC; filled in by providers that assign addresses themselves (qemu).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<UnderlayNetwork>,
    /// TCP port of the agent's TLS listener: 15150.
    pub listen_port: u16,
    /// The agent's TLS server material.
    pub tls: AgentTls,
    /// The pod network tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Tunnel>,
    /// Registry credentials for the agent's image pulls (a containers `auth.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_auth: Option<serde_json::Value>,
}

/// The podvm's own NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderlayNetwork {
    /// MAC of the virtio-net NIC.
    pub mac: String,
    /// Address with prefix, e.g. `172.31.250.10/24`.
    pub address: String,
    /// The worker's address on that subnet.
    pub gateway: String,
}

/// PEM material for the agent's mutual-TLS listener.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentTls {
    /// The per-podvm CA that signs both ends.
    pub ca_cert: String,
    /// The agent's certificate (SAN = podvm IP).
    pub server_cert: String,
    /// Its PKCS#8 key.
    pub server_key: String,
}

impl std::fmt::Debug for AgentTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentTls { .. }")
    }
}

/// The VXLAN tunnel between the pod's netns on the worker and the podvm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tunnel {
    /// `vxlan`.
    #[serde(rename = "type")]
    pub kind: String,
    /// VXLAN network identifier, unique per podvm on the node.
    pub vni: u32,
    /// The worker's underlay address.
    pub remote: String,
    /// UDP port (4789).
    pub port: u16,
    /// MAC of the pod's `eth0` on the worker, which the podvm's tunnel device takes.
    pub pod_mac: String,
    /// MTU of the tunnel device.
    pub mtu: u32,
}

/// One podvm to create.
#[derive(Debug, Clone)]
pub struct InstanceRequest {
    /// The sandbox the podvm serves.
    pub sandbox_id: String,
    /// `podvm-<pod name>-<first 8 of the id>`.
    pub name: String,
    /// Its size.
    pub instance_type: InstanceType,
    /// Root volume in GB (at least 6).
    pub root_volume_gb: u32,
    /// Cloud tags: `TAGS` plus `podvisor.io/sandbox-id` and `podvisor.io/owner`.
    pub tags: BTreeMap<String, String>,
    /// User data.
    pub user_data: UserData,
    /// `/run/peerpod/podvms/<id>`: the provider may keep files there.
    pub run_dir: PathBuf,
}

/// A running podvm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The provider's instance id.
    pub id: String,
    /// The sandbox it serves.
    pub sandbox_id: String,
    /// Where the agent's TLS listener is reached.
    pub ip: IpAddr,
    /// The local VMM process (local providers only).
    pub vmm_pid: Option<u32>,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field 22), so a recycled
    /// pid is never taken for it.
    pub vmm_start_time: Option<u64>,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
}

/// A provider failure; the text names what failed and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProviderError(pub String);

/// A place podvms come from.
#[async_trait]
pub trait Provider: Send + Sync {
    /// `qemu`, `aws`, ...
    fn name(&self) -> &'static str;
    /// The sizes it offers.
    fn instance_types(&self) -> Vec<InstanceType>;
    /// The address podvms reach the worker at (tunnel remote, registry host).
    fn worker_address(&self) -> IpAddr;
    /// Creates and boots a podvm; returns once it runs (the agent may not answer yet).
    async fn create_instance(&self, req: InstanceRequest) -> Result<Instance, ProviderError>;
    /// Deletes a podvm and everything the provider made for it; idempotent.
    async fn delete_instance(&self, instance: &Instance) -> Result<(), ProviderError>;
    /// The podvms this node's service owns (by tag), for garbage collection.
    async fn list_instances(&self) -> Result<Vec<Instance>, ProviderError>;
}
