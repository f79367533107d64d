//! The pod tunnel, worker side: a VXLAN device `vxlan0` in the pod's netns whose underlay is the
//! worker's own netns (UDP to the podvm over the bridge), joined to the pod's `eth0` with tc
//! ingress qdiscs and `u32 match u8 0 0 action mirred egress redirect` filters both ways, as
//! Kata (and the shim, `hypervisor::network`) joins a veth and a tap. What CNI configured on
//! `eth0` (IP, routes) then answers from the podvm, whose `vxlan0` takes `eth0`'s MAC and IP.
//!
//! The device is created in one netlink request from the worker's netns with `IFLA_NET_NS_FD`
//! naming the pod netns (`ip link add vxlan0 netns <pod> type vxlan id <vni> remote <podvm>
//! dstport <port> dev <bridge>`): the kernel resolves the underlay (`dev`, the UDP socket) in the
//! sender's netns and puts the device in the pod's, so no `vx<vni>` is ever left in the worker's
//! netns if a later step fails. Teardown deletes `vxlan0` and the two ingress qdiscs, never `eth0`.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use hypervisor::network::{ingress_qdisc, redirect_filter};
use netlink::{Netlink, RouteNetlinkMessage, NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};

use super::{is_gone, NetError};

/// The pod's interface the tunnel is joined to.
pub const POD_INTERFACE: &str = "eth0";
/// The tunnel device in the pod netns.
pub const TUNNEL_DEVICE: &str = "vxlan0";

/// What the tunnel is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelPlan {
    /// VXLAN network identifier (unique per podvm on the worker).
    pub vni: u32,
    /// The podvm's underlay address.
    pub remote: IpAddr,
    /// UDP port (`VXLAN_PORT`, 4789).
    pub port: u16,
    /// The underlay device in the worker's netns (the podvm bridge).
    pub underlay: String,
    /// MTU of `vxlan0`.
    pub mtu: u32,
}

/// The tunnel as made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodTunnel {
    /// MAC of the pod's `eth0`: the podvm's `vxlan0` takes it (user data `tunnel.pod_mac`).
    pub pod_mac: String,
    /// MTU of the pod's `eth0`.
    pub pod_mtu: u32,
}

/// The `RTM_NEWLINK` request that creates `vxlan0` in the netns of `netns_fd` with its underlay
/// `underlay_index` in the sender's netns.
pub fn vxlan_link_message(plan: &TunnelPlan, underlay_index: u32, netns_fd: RawFd) -> Result<LinkMessage, NetError> {
    let IpAddr::V4(remote) = plan.remote else {
        return Err(NetError(format!("tunnel remote {}: only IPv4 podvm addresses are supported", plan.remote)));
    };
    if plan.vni == 0 || plan.vni >= 1 << 24 {
        return Err(NetError(format!("VXLAN id {} is out of range (1 to 16777215)", plan.vni)));
    }
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(TUNNEL_DEVICE.into()));
    m.attributes.push(LinkAttribute::NetNsFd(netns_fd));
    m.attributes.push(LinkAttribute::Mtu(plan.mtu));
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Vxlan),
        LinkInfo::Data(InfoData::Vxlan(vec![
            InfoVxlan::Id(plan.vni),
            InfoVxlan::Group(remote), // `remote` is IFLA_VXLAN_GROUP holding a unicast address
            InfoVxlan::Link(underlay_index),
            InfoVxlan::Port(plan.port),
        ])),
    ]));
    Ok(m)
}

/// `(device, inode)` of a namespace file.
fn ns_identity(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

fn open_pod_netns(path: &Path) -> Result<File, NetError> {
    let f = File::open(path).map_err(|e| {
        NetError(format!("pod network namespace {}: open: {e}; does the sandbox's netns still exist?", path.display()))
    })?;
    refuse_host_netns(&f, path)?;
    Ok(f)
}

/// Refuses the worker's own netns (compared by identity, never by name).
fn refuse_host_netns(f: &File, path: &Path) -> Result<(), NetError> {
    let target = f.metadata().map_err(NetError::op(format!("fstat {}", path.display())))?;
    for own in ["/proc/self/ns/net", "/proc/1/ns/net"] {
        if std::fs::metadata(own).is_ok_and(|m| ns_identity(&m) == ns_identity(&target)) {
            return Err(NetError(format!(
                "pod network namespace {} is the node's own network namespace: a hostNetwork pod cannot have a \
                 peer pod tunnel; nothing was changed",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Runs `f` with a netlink socket in `netns`, in a fresh OS thread (never a tokio worker).
fn in_netns<T: Send>(
    netns: &File,
    path: &Path,
    f: impl FnOnce(&mut Netlink) -> Result<T, NetError> + Send,
) -> Result<T, NetError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetError(format!("pod network namespace {}: setns: {e}", path.display())))?;
            let mut nl = Netlink::open().map_err(NetError::op("open a netlink socket in the pod netns"))?;
            f(&mut nl)
        })
        .join()
        .unwrap_or_else(|_| Err(NetError("pod tunnel thread panicked".into())))
    })
}

fn find(nl: &mut Netlink, name: &str) -> Result<Option<(u32, netlink::read::Link)>, NetError> {
    let links = nl.links().map_err(NetError::op("list links"))?;
    Ok(links.iter().map(|l| (l.header.index, netlink::read::link(l))).find(|(_, l)| l.name == name))
}

fn read_eth0(netns: &File, netns_path: &Path) -> Result<(u32, PodTunnel), NetError> {
    let ns = netns_path.display().to_string();
    let (index, eth0) = in_netns(netns, netns_path, |nl| {
        find(nl, POD_INTERFACE)?.ok_or_else(|| {
            NetError(format!("pod network namespace {ns} has no {POD_INTERFACE}: did the CNI plugin run?"))
        })
    })?;
    let pod_mac = match eth0.mac.as_deref() {
        Some(m) if m.len() == 6 => netlink::text::format_mac(m),
        _ => return Err(NetError(format!("{POD_INTERFACE} in {ns} has no Ethernet MAC address"))),
    };
    Ok((index, PodTunnel { pod_mac, pod_mtu: eth0.mtu.unwrap_or(0) }))
}

/// The MAC and MTU of the pod's `eth0` in the netns at `netns_path`, before any tunnel exists:
/// the podvm's user data needs `pod_mac` before the podvm (and so the tunnel's remote) exists.
pub fn pod_interface(netns_path: &Path) -> Result<PodTunnel, NetError> {
    let netns = open_pod_netns(netns_path)?;
    Ok(read_eth0(&netns, netns_path)?.1)
}

/// Sets up the tunnel for the pod netns at `netns_path`; all-or-nothing. Blocking.
pub fn setup(netns_path: &Path, plan: &TunnelPlan) -> Result<PodTunnel, NetError> {
    let netns = open_pod_netns(netns_path)?;
    let ns = netns_path.display().to_string();
    // Read eth0 first: a netns without it gets nothing.
    let (eth0_index, pod) = read_eth0(&netns, netns_path)?;

    let mut host = Netlink::open().map_err(NetError::op("open a netlink socket"))?;
    let underlay = find(&mut host, &plan.underlay)?
        .ok_or_else(|| NetError(format!("tunnel underlay {} does not exist in the worker's netns", plan.underlay)))?
        .0;
    let msg = vxlan_link_message(plan, underlay, netns.as_raw_fd())?;
    host.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL).map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EEXIST) {
            "; a VXLAN device with this id and port already exists in the worker's netns, or the pod already has a vxlan0"
        } else {
            ""
        };
        NetError(format!(
            "create {TUNNEL_DEVICE} in {ns} (ip link add {TUNNEL_DEVICE} netns {ns} type vxlan id {} remote {} dstport {} dev {}): {e}{hint}",
            plan.vni, plan.remote, plan.port, plan.underlay
        ))
    })?;

    in_netns(&netns, netns_path, |nl| {
        let joined = (|| {
            let (vx, _) =
                find(nl, TUNNEL_DEVICE)?.ok_or_else(|| NetError(format!("{TUNNEL_DEVICE} vanished from {ns}")))?;
            let mut up = LinkMessage::default();
            up.header.index = vx;
            up.header.flags = LinkFlags::Up;
            up.header.change_mask = LinkFlags::Up;
            nl.request(RouteNetlinkMessage::SetLink(up), 0).map_err(NetError::op(format!("set {TUNNEL_DEVICE} up")))?;
            for (dev, index) in [(POD_INTERFACE, eth0_index), (TUNNEL_DEVICE, vx)] {
                nl.request(RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(index)), NLM_F_CREATE | NLM_F_EXCL)
                    .map_err(NetError::op(format!(
                        "add ingress qdisc on {dev} in {ns} (tc qdisc add dev {dev} ingress)"
                    )))?;
            }
            for (from, fi, to, ti) in
                [(POD_INTERFACE, eth0_index, TUNNEL_DEVICE, vx), (TUNNEL_DEVICE, vx, POD_INTERFACE, eth0_index)]
            {
                nl.request(RouteNetlinkMessage::NewTrafficFilter(redirect_filter(fi, ti)), NLM_F_CREATE | NLM_F_EXCL)
                    .map_err(NetError::op(format!(
                        "add redirect filter {from} -> {to} in {ns} (tc filter add dev {from} parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev {to})"
                    )))?;
            }
            Ok(())
        })();
        if joined.is_err() {
            let _ = remove(nl);
        }
        joined
    })?;
    Ok(pod)
}

/// Deletes the two ingress qdiscs (their filters go with them) and `vxlan0`; what is missing is
/// fine.
fn remove(nl: &mut Netlink) -> Result<(), NetError> {
    let mut first = None;
    for dev in [POD_INTERFACE, TUNNEL_DEVICE] {
        let Some((index, _)) = find(nl, dev)? else { continue };
        if let Err(e) = nl.request(RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)), 0) {
            if !is_gone(&e) {
                first.get_or_insert(NetError(format!("delete the ingress qdisc on {dev}: {e}")));
            }
        }
    }
    if let Some((index, l)) = find(nl, TUNNEL_DEVICE)? {
        if l.kind.as_deref() == Some("vxlan") {
            let mut m = LinkMessage::default();
            m.header.index = index;
            if let Err(e) = nl.request(RouteNetlinkMessage::DelLink(m), 0) {
                if !is_gone(&e) {
                    first.get_or_insert(NetError(format!("delete {TUNNEL_DEVICE}: {e}")));
                }
            }
        }
    }
    first.map_or(Ok(()), Err)
}

/// Undoes [`setup`]. Idempotent: a netns that is gone took the tunnel with it.
pub fn teardown(netns_path: &Path) -> Result<(), NetError> {
    let netns = match File::open(netns_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(NetError(format!("pod network namespace {}: open: {e}", netns_path.display()))),
    };
    refuse_host_netns(&netns, netns_path)?;
    // A bind mount target whose netns is gone is an empty file: setns fails with EINVAL.
    match in_netns(&netns, netns_path, remove) {
        Err(e) if e.0.contains("setns") => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};

    fn plan() -> TunnelPlan {
        TunnelPlan {
            vni: 555001,
            remote: "172.31.250.10".parse().unwrap(),
            port: 4789,
            underlay: "pp0".into(),
            mtu: 1450,
        }
    }

    /// The request is `ip link add vxlan0 netns <fd> mtu 1450 type vxlan id 555001 remote
    /// 172.31.250.10 dstport 4789 dev <7>`, and serializes as the kernel will read it.
    #[test]
    fn vxlan_request_plan() {
        let m = vxlan_link_message(&plan(), 7, 42).unwrap();
        assert_eq!(
            m.attributes[..3],
            [LinkAttribute::IfName("vxlan0".into()), LinkAttribute::NetNsFd(42), LinkAttribute::Mtu(1450)]
        );
        let LinkAttribute::LinkInfo(info) = &m.attributes[3] else { panic!("{m:?}") };
        assert_eq!(info[0], LinkInfo::Kind(InfoKind::Vxlan));
        assert_eq!(
            info[1],
            LinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::Id(555001),
                InfoVxlan::Group("172.31.250.10".parse().unwrap()),
                InfoVxlan::Link(7),
                InfoVxlan::Port(4789),
            ]))
        );
        let mut nl = NetlinkMessage::from(RouteNetlinkMessage::NewLink(m.clone()));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).unwrap();
        assert_eq!(back.payload, NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)));
        // IFLA_VXLAN_PORT is big-endian on the wire.
        let port = 4789u16.to_be_bytes();
        assert!(buf.windows(2).any(|w| w == port));
    }

    #[test]
    fn bad_plans_are_named() {
        let mut p = plan();
        p.vni = 1 << 24;
        assert!(vxlan_link_message(&p, 1, 3).unwrap_err().0.contains("VXLAN id 16777216"));
        let mut p = plan();
        p.remote = "fd00::1".parse().unwrap();
        assert!(vxlan_link_message(&p, 1, 3).unwrap_err().0.contains("IPv4"));
    }

    #[test]
    fn the_hosts_netns_and_missing_ones_are_handled() {
        let e = setup(Path::new("/proc/self/ns/net"), &plan()).unwrap_err().0;
        assert!(e.contains("node's own network namespace"), "{e}");
        let e = setup(Path::new("/nonexistent/ns"), &plan()).unwrap_err().0;
        assert!(e.contains("/nonexistent/ns") && e.contains("open"), "{e}");
        teardown(Path::new("/nonexistent/ns")).unwrap();
        let e = teardown(Path::new("/proc/self/ns/net")).unwrap_err().0;
        assert!(e.contains("node's own network namespace"), "teardown never touches the host's eth0: {e}");
    }
}
