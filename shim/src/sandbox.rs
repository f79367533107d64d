//! The sandbox layer: one VM and the agent inside it. Boot is all-or-nothing: on any failure
//! the VM, its helpers, its run directory and the pod network's taps and tc filters are gone
//! before the error is returned.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use agent_protocol::types;
use async_trait::async_trait;
use hypervisor::network::{GuestNetwork, NetInterface, NetNeighbour, NetRoute};
use hypervisor::{Hypervisor, MemoryMiB, PodNetwork, Qemu};
use slog::{info, warn, Logger};

use crate::agent::{Agent, AgentError, KataAgent};
use crate::config::Config;

/// Why a sandbox could not boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The hypervisor layer failed.
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::Error),
    /// The agent did not come up.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The pod network could not be attached.
    #[error(transparent)]
    Network(#[from] hypervisor::NetworkError),
}

/// Where pods get their VMs and agent connections: QEMU and the ttrpc agent for real
/// ([`QemuBackend`]); the pod's unit tests put fakes here.
#[async_trait]
pub trait VmBackend: Send + Sync {
    /// The VM of sandbox `id` as `config` says, exporting `shared_dir` over virtio-fs, with the
    /// pod network of `netns` attached (its guest side is returned): not prepared nor started.
    /// What it attached belongs to the VM from here on: [`Hypervisor::cleanup`] removes it.
    async fn create_vm(
        &self,
        id: &str,
        config: &Config,
        shared_dir: &Path,
        netns: Option<&Path>,
        log: &Logger,
    ) -> Result<(Arc<dyn Hypervisor>, Option<GuestNetwork>), BootError>;

    /// Connects to the agent of the started `vm` within `dial_timeout`.
    async fn connect_agent(
        &self,
        vm: &dyn Hypervisor,
        dial_timeout: Duration,
        log: &Logger,
    ) -> Result<Arc<dyn Agent>, AgentError>;
}

/// The real backend: a QEMU VM per pod and Kata's ttrpc agent over (hybrid) vsock.
pub struct QemuBackend;

#[async_trait]
impl VmBackend for QemuBackend {
    async fn create_vm(
        &self,
        id: &str,
        config: &Config,
        shared_dir: &Path,
        netns: Option<&Path>,
        log: &Logger,
    ) -> Result<(Arc<dyn Hypervisor>, Option<GuestNetwork>), BootError> {
        let log = log.new(slog::o!("sandbox" => id.to_string()));
        if let Some(remote) = &config.remote {
            // A peer pod: the remote hypervisor service joins the netns to the podvm (tunnel);
            // the shim only reads what the guest must be configured with.
            let guest_network = match netns {
                Some(path) => {
                    let path = path.to_path_buf();
                    Some(
                        tokio::task::spawn_blocking(move || PodNetwork::discover(&path))
                            .await
                            .map_err(|e| hypervisor::Error::InvalidRequest(format!("pod network: {e}")))??,
                    )
                }
                None => None,
            };
            let vm = hypervisor::Remote::new(
                id,
                remote.clone(),
                &remote.pod_annotations,
                netns.map(Path::to_path_buf),
                log.clone(),
            );
            return Ok((Arc::new(vm), guest_network));
        }
        let mut vm = Qemu::new(id, config.hypervisor.clone(), log.clone()).with_shared_dir(shared_dir);
        let mut guest_network = None;
        if let Some(path) = netns {
            let path = path.to_path_buf();
            let network = tokio::task::spawn_blocking(move || PodNetwork::attach(&path))
                .await
                .map_err(|e| hypervisor::Error::InvalidRequest(format!("pod network setup: {e}")))??;
            let names: Vec<&str> = network.guest().interfaces.iter().map(|i| i.name.as_str()).collect();
            info!(log, "pod network attached"; "netns" => %network.netns_path().display(), "interfaces" => names.join(","));
            guest_network = Some(network.guest().clone());
            // From here on the VM owns the taps: any failure below tears them down with it.
            vm = vm.with_network(network);
        }
        Ok((Arc::new(vm), guest_network))
    }

    async fn connect_agent(
        &self,
        vm: &dyn Hypervisor,
        dial_timeout: Duration,
        log: &Logger,
    ) -> Result<Arc<dyn Agent>, AgentError> {
        Ok(Arc::new(KataAgent::dial(vm, dial_timeout, log).await?))
    }
}

/// A running pod VM with a connected agent.
pub struct Sandbox {
    id: String,
    vm: Arc<dyn Hypervisor>,
    agent: Arc<dyn Agent>,
    log: Logger,
}

impl Sandbox {
    /// Boots a QEMU VM for `id` as `config` says and waits for its agent.
    pub async fn boot(id: &str, config: &Config, log: &Logger) -> Result<Sandbox, BootError> {
        let log = log.new(slog::o!("sandbox" => id.to_string()));
        for w in &config.warnings {
            warn!(log, "{}", w);
        }
        let vm: Arc<dyn Hypervisor> = Arc::new(Qemu::new(id, config.hypervisor.clone(), log.clone()));
        Self::boot_with(id, vm, config.agent.dial_timeout, &log).await
    }

    /// Boots a pod VM for `id` that shares `shared_dir` with the guest over virtio-fs, and has
    /// the agent mount it at [`crate::mounts::GUEST_SHARED`] (`CreateSandbox`).
    pub async fn boot_pod(
        id: &str,
        config: &Config,
        shared_dir: &Path,
        hostname: &str,
        log: &Logger,
    ) -> Result<Sandbox, BootError> {
        Self::boot_pod_with_network(id, config, shared_dir, hostname, None, log).await
    }

    /// As [`Sandbox::boot_pod`], and with `netns` (the pod's network namespace, from the `network`
    /// namespace `path` of the sandbox container's OCI spec): one tap per pod interface joined
    /// to it by tc redirects (Kata's `tcfilter` model), QEMU running in that netns, and the guest
    /// given the interfaces' MACs, addresses, routes and ARP neighbours. `None`: no network.
    pub async fn boot_pod_with_network(
        id: &str,
        config: &Config,
        shared_dir: &Path,
        hostname: &str,
        netns: Option<&Path>,
        log: &Logger,
    ) -> Result<Sandbox, BootError> {
        let (vm, guest_network) = QemuBackend.create_vm(id, config, shared_dir, netns, log).await?;
        Self::start_pod(&QemuBackend, id, vm, guest_network, config, hostname, log).await
    }

    /// Starts `vm` (made by `backend`'s [`VmBackend::create_vm`]), connects to its agent, sends
    /// `CreateSandbox` (the shared directory, the hostname) and configures `guest_network`. On
    /// failure the VM and everything it holds on the host is gone before the error returns.
    pub async fn start_pod(
        backend: &dyn VmBackend,
        id: &str,
        vm: Arc<dyn Hypervisor>,
        guest_network: Option<GuestNetwork>,
        config: &Config,
        hostname: &str,
        log: &Logger,
    ) -> Result<Sandbox, BootError> {
        let log = log.new(slog::o!("sandbox" => id.to_string()));
        for w in &config.warnings {
            warn!(log, "{}", w);
        }
        let sandbox = Self::start_with(backend, id, vm, config.agent.dial_timeout, &log).await?;
        let storage = agent_protocol::agent::Storage {
            driver: "virtio-fs".into(),
            source: hypervisor::qemu::cmdline::VIRTIO_FS_TAG.into(),
            fstype: "virtiofs".into(),
            mount_point: format!("{}/", crate::mounts::GUEST_SHARED),
            ..Default::default()
        };
        // A podvm shares no file system with the node: files are copied in (CopyFile).
        let storages = if config.remote.is_some() { Vec::new() } else { vec![storage] };
        let req = agent_protocol::agent::CreateSandboxRequest {
            hostname: hostname.into(),
            storages,
            sandbox_id: id.into(),
            ..Default::default()
        };
        if let Err(e) = sandbox.agent.create_sandbox(req).await {
            let _ = sandbox.shutdown().await;
            return Err(e.into());
        }
        if let Some(g) = guest_network {
            if let Err(e) = sandbox.configure_network(&g).await {
                let _ = sandbox.shutdown().await;
                return Err(e.into());
            }
        }
        Ok(sandbox)
    }

    /// Gives the guest the pod's interfaces (found by MAC), then its routes and neighbours.
    async fn configure_network(&self, g: &GuestNetwork) -> Result<(), AgentError> {
        for ifc in &g.interfaces {
            self.agent.update_interface(interface_pb(ifc)).await?;
        }
        if !g.routes.is_empty() {
            self.agent.update_routes(g.routes.iter().map(route_pb).collect()).await?;
        }
        if !g.neighbours.is_empty() {
            self.agent.add_arp_neighbors(g.neighbours.iter().map(neighbour_pb).collect()).await?;
        }
        info!(self.log, "guest network configured"; "interfaces" => g.interfaces.len(), "routes" => g.routes.len(), "neighbours" => g.neighbours.len());
        Ok(())
    }

    /// Boots `vm` (not yet prepared) and connects to its agent within `dial_timeout`.
    pub async fn boot_with(
        id: &str,
        vm: Arc<dyn Hypervisor>,
        dial_timeout: Duration,
        log: &Logger,
    ) -> Result<Sandbox, BootError> {
        Self::start_with(&QemuBackend, id, vm, dial_timeout, log).await
    }

    /// [`Sandbox::boot_with`], reaching the agent through `backend`.
    async fn start_with(
        backend: &dyn VmBackend,
        id: &str,
        vm: Arc<dyn Hypervisor>,
        dial_timeout: Duration,
        log: &Logger,
    ) -> Result<Sandbox, BootError> {
        let result = async {
            vm.prepare().await?;
            vm.start().await?;
            let agent = backend.connect_agent(vm.as_ref(), dial_timeout, log).await?;
            // Every call from here on races the VM's failure and is timed for the metrics.
            let agent: Arc<dyn Agent> = Arc::new(crate::agent::VmWatchedAgent::new(agent, vm.clone()));
            if let Err(e) = agent.set_guest_time(SystemTime::now()).await {
                warn!(log, "could not set the guest clock"; "error" => %e);
            }
            Ok::<_, BootError>(agent)
        }
        .await;
        match result {
            Ok(agent) => Ok(Sandbox { id: id.to_string(), vm, agent, log: log.clone() }),
            Err(e) => {
                if let Err(c) = vm.cleanup().await {
                    warn!(log, "cleanup after failed boot failed"; "error" => %c);
                }
                Err(e)
            }
        }
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The hypervisor layer.
    pub fn vm(&self) -> &Arc<dyn Hypervisor> {
        &self.vm
    }

    /// The agent.
    pub fn agent(&self) -> &Arc<dyn Agent> {
        &self.agent
    }

    /// Grows guest memory to `total` and has the guest online it; returns the new total.
    pub async fn resize_memory(&self, total: MemoryMiB) -> Result<MemoryMiB, BootError> {
        let new = self.vm.resize_memory(total).await?;
        self.agent.online_cpu_mem(0, false).await?;
        Ok(new)
    }

    /// Grows the VM from `current` to `count` vCPUs and has the guest online the added ones;
    /// returns the new count.
    pub async fn grow_vcpus(&self, current: u32, count: u32) -> Result<u32, BootError> {
        let new = self.vm.resize_vcpus(count).await?;
        if new > current {
            self.agent.online_cpu_mem(new - current, true).await?;
        }
        Ok(new)
    }

    /// Asks the guest to shut down, then stops the VM and removes everything on the host.
    pub async fn shutdown(&self) -> Result<(), hypervisor::Error> {
        match tokio::time::timeout(Duration::from_secs(5), self.agent.destroy_sandbox()).await {
            Ok(Ok(())) => {
                // The guest powers off by itself; give it a moment before stop() forces it.
                let _ = tokio::time::timeout(Duration::from_secs(3), self.vm.wait_exit()).await;
            }
            Ok(Err(e)) => warn!(self.log, "DestroySandbox failed; stopping the VM anyway"; "error" => %e),
            Err(_) => warn!(self.log, "DestroySandbox got no answer; stopping the VM anyway"),
        }
        self.vm.cleanup().await?;
        info!(self.log, "sandbox stopped");
        Ok(())
    }
}

fn ip_family(ipv6: bool) -> protobuf::EnumOrUnknown<types::IPFamily> {
    if ipv6 { types::IPFamily::v6 } else { types::IPFamily::v4 }.into()
}

/// A pod interface as Kata's `Interface` (the agent finds the guest NIC by `hwAddr`).
fn interface_pb(i: &NetInterface) -> types::Interface {
    types::Interface {
        device: i.name.clone(),
        name: i.name.clone(),
        IPAddresses: i
            .addresses
            .iter()
            .map(|a| types::IPAddress {
                family: ip_family(a.addr.is_ipv6()),
                address: a.addr.to_string(),
                mask: a.prefix.to_string(),
                ..Default::default()
            })
            .collect(),
        mtu: u64::from(i.mtu),
        hwAddr: i.mac.clone(),
        type_: i.kind.clone(),
        ..Default::default()
    }
}

/// A pod route as Kata's `Route` (default route: empty `dest`).
fn route_pb(r: &NetRoute) -> types::Route {
    types::Route {
        dest: r.dest.map(|d| d.to_string()).unwrap_or_default(),
        gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
        device: r.device.clone(),
        source: r.source.map(|s| s.to_string()).unwrap_or_default(),
        scope: u32::from(r.scope),
        family: ip_family(r.ipv6),
        flags: r.flags,
        ..Default::default()
    }
}

/// A permanent neighbour as Kata's `ARPNeighbor`.
fn neighbour_pb(n: &NetNeighbour) -> types::ARPNeighbor {
    let prefix = if n.ip.is_ipv6() { 128 } else { 32 };
    types::ARPNeighbor {
        toIPAddress: Some(types::IPAddress {
            family: ip_family(n.ip.is_ipv6()),
            address: n.ip.to_string(),
            mask: prefix.to_string(),
            ..Default::default()
        })
        .into(),
        device: n.device.clone(),
        lladdr: n.mac.clone(),
        state: i32::from(n.state),
        flags: i32::from(n.flags),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::network::IpNet;

    #[test]
    fn pod_network_to_agent_types() {
        let i = NetInterface {
            name: "eth0".into(),
            mac: "02:42:0a:c8:01:02".into(),
            mtu: 1450,
            addresses: vec![
                IpNet { addr: "10.200.1.2".parse().unwrap(), prefix: 24 },
                IpNet { addr: "fd00::2".parse().unwrap(), prefix: 64 },
            ],
            kind: "veth".into(),
        };
        let p = interface_pb(&i);
        assert_eq!(
            (p.name.as_str(), p.device.as_str(), p.hwAddr.as_str(), p.mtu, p.type_.as_str()),
            ("eth0", "eth0", "02:42:0a:c8:01:02", 1450, "veth")
        );
        assert_eq!((p.IPAddresses[0].address.as_str(), p.IPAddresses[0].mask.as_str()), ("10.200.1.2", "24"));
        assert_eq!(p.IPAddresses[1].family.enum_value(), Ok(types::IPFamily::v6));

        let default = NetRoute {
            dest: None,
            gateway: Some("10.200.1.1".parse().unwrap()),
            source: None,
            device: "eth0".into(),
            scope: 0,
            ipv6: false,
            flags: 0,
        };
        let r = route_pb(&default);
        assert_eq!(
            (r.dest.as_str(), r.gateway.as_str(), r.device.as_str(), r.source.as_str()),
            ("", "10.200.1.1", "eth0", "")
        );
        let subnet = NetRoute {
            dest: Some(IpNet { addr: "10.200.1.0".parse().unwrap(), prefix: 24 }),
            gateway: None,
            source: Some("10.200.1.2".parse().unwrap()),
            scope: 253,
            ..default
        };
        let r = route_pb(&subnet);
        assert_eq!((r.dest.as_str(), r.source.as_str(), r.scope), ("10.200.1.0/24", "10.200.1.2", 253));

        let n = NetNeighbour {
            ip: "10.200.1.9".parse().unwrap(),
            mac: "aa:bb:cc:dd:ee:ff".into(),
            device: "eth0".into(),
            state: 0x80,
            flags: 0,
        };
        let a = neighbour_pb(&n);
        assert_eq!(
            (a.toIPAddress.address.as_str(), a.toIPAddress.mask.as_str(), a.lladdr.as_str(), a.state),
            ("10.200.1.9", "32", "aa:bb:cc:dd:ee:ff", 0x80)
        );
    }
}
