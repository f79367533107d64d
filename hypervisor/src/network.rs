//! Pod networking in Kata's `tcfilter` model: the pod's interfaces (veths made by CNI) are read
//! from its network namespace, one tap per interface is created there, and tc ingress + u32 +
//! mirred redirects join each veth and its tap in both directions. QEMU runs inside the netns
//! with the taps' fds; the guest NIC gets the veth's MAC, and the agent gives it the veth's
//! addresses, routes and neighbours ([`GuestNetwork`]).
//!
//! Netlink, not `ip`/`tc` binaries: every step (dumps, tap, qdiscs, filters) happens in one
//! short-lived OS thread that `setns`es into the pod netns, with a blocking netlink socket. It
//! needs no helper binaries, no output parsing, and errors carry the kernel's errno. The tc
//! messages are the ones `tc filter add dev A parent ffff: protocol all u32 match u8 0 0 action
//! mirred egress redirect dev B` sends (the host kernel has u32 and mirred, not matchall/flower).
//! A tokio worker thread never changes namespace.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use netlink::text::{format_mac, is_kernel_route_dest, is_link_local};
use netlink::{read, Netlink};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourMessage, NeighbourState};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32, TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;

/// How the pod's network reaches the guest (Kata's `internetworking_model`, `[runtime]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InternetworkingModel {
    /// One tap per pod interface, joined to the veth by tc mirred redirects (Kata's default).
    #[default]
    TcFilter,
    /// The VM gets no network, whatever the pod's netns holds.
    None,
}

impl InternetworkingModel {
    /// Parses a configuration value; the error names the key and the accepted values.
    pub fn parse(value: &str) -> Result<InternetworkingModel, String> {
        match value {
            "tcfilter" => Ok(InternetworkingModel::TcFilter),
            "none" => Ok(InternetworkingModel::None),
            other => Err(format!(
                "internetworking_model = {other:?} is not supported; podvisor supports \"tcfilter\" (the default) and \"none\""
            )),
        }
    }
}

/// Errors of pod network setup and teardown; each names the netns path and what was done.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The netns path could not be opened or entered.
    #[error("pod network namespace {path}: {what}: {source}; is it the `network` namespace path of the sandbox's OCI spec, and does it still exist?")]
    Netns {
        /// The netns path.
        path: PathBuf,
        /// `open` or `setns`.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The path names the node's own network namespace (a `hostNetwork` pod): its interfaces
    /// must never be redirected into a VM.
    #[error(
        "pod network namespace {path} is the node's own network namespace ({what}): a VM cannot be attached \
         to the host's interfaces (a hostNetwork pod cannot run in a VM); nothing was changed"
    )]
    HostNamespace {
        /// The netns path.
        path: PathBuf,
        /// Which namespace it is the same as.
        what: &'static str,
    },
    /// A netlink request (or tap ioctl) failed.
    #[error("{what} in network namespace {path}: {source}")]
    Op {
        /// The netns path.
        path: PathBuf,
        /// What was being done, naming the interface.
        what: String,
        /// The OS error (netlink errno).
        #[source]
        source: io::Error,
    },
}

/// An IP address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One pod interface as the guest must see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetInterface {
    /// Interface name in the pod netns (the guest NIC is renamed to it).
    pub name: String,
    /// MAC address, `aa:bb:cc:dd:ee:ff` (also the guest NIC's).
    pub mac: String,
    /// MTU.
    pub mtu: u32,
    /// Addresses (IPv6 link-local ones left out: the guest makes its own).
    pub addresses: Vec<IpNet>,
    /// Netlink link kind (`veth`, ...), empty when the kernel reports none.
    pub kind: String,
}

/// A main-table route over one of the pod interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetRoute {
    /// Destination; `None` is the default route.
    pub dest: Option<IpNet>,
    /// Gateway, if any.
    pub gateway: Option<IpAddr>,
    /// Preferred source address, if any.
    pub source: Option<IpAddr>,
    /// Interface name.
    pub device: String,
    /// Kernel route scope (`RT_SCOPE_*`: 0 universe, 253 link, ...).
    pub scope: u8,
    /// IPv6 (else IPv4).
    pub ipv6: bool,
    /// Kernel route flags (`RTNH_F_*`).
    pub flags: u32,
}

/// A permanent ARP/NDP entry on one of the pod interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNeighbour {
    /// The neighbour's IP address.
    pub ip: IpAddr,
    /// Its MAC address.
    pub mac: String,
    /// Interface name.
    pub device: String,
    /// `NUD_*` state.
    pub state: u16,
    /// `NTF_*` flags.
    pub flags: u8,
}

/// What the guest must be configured with (converted to the agent's types by the shim).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestNetwork {
    /// Interfaces, in the order of their taps (`tap0_kata`, ...).
    pub interfaces: Vec<NetInterface>,
    /// Routes over those interfaces.
    pub routes: Vec<NetRoute>,
    /// Permanent neighbours on those interfaces.
    pub neighbours: Vec<NetNeighbour>,
}

/// One veth joined to its tap.
struct Attached {
    veth: String,
    veth_index: u32,
    tap: String,
    tap_index: u32,
    fd: OwnedFd,
}

/// The taps and tc redirects of one pod, and what the guest needs. Dropping it tears it down.
pub struct PodNetwork {
    path: PathBuf,
    netns: File,
    guest: GuestNetwork,
    links: Mutex<Vec<Attached>>,
}

impl std::fmt::Debug for PodNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodNetwork").field("netns", &self.path).field("guest", &self.guest).finish()
    }
}

/// Name of the tap for the pod interface at `position` (Kata's).
pub fn tap_name(position: usize) -> String {
    format!("tap{position}_kata")
}

impl PodNetwork {
    /// Reads the interfaces of the netns at `netns_path`, creates a tap for each and joins the
    /// two with tc. Blocking (a few netlink round trips); all-or-nothing.
    pub fn attach(netns_path: &Path) -> Result<PodNetwork, NetworkError> {
        let path = netns_path.to_path_buf();
        let netns =
            File::open(&path).map_err(|source| NetworkError::Netns { path: path.clone(), what: "open", source })?;
        let (guest, links) = in_netns(&netns, &path, |ops| {
            let guest = discover(ops)?;
            let mut links = Vec::new();
            for (i, ifc) in guest.interfaces.iter().enumerate() {
                match join(ops, ifc, &tap_name(i)) {
                    Ok(a) => links.push(a),
                    Err(e) => {
                        let _ = detach(ops, std::mem::take(&mut links));
                        return Err(e);
                    }
                }
            }
            Ok((guest, links))
        })?;
        Ok(PodNetwork { path, netns, guest, links: Mutex::new(links) })
    }

    /// Reads the interfaces, routes and neighbours of the netns at `netns_path` and changes
    /// nothing (peer pods: the remote hypervisor service joins the netns to the podvm).
    pub fn discover(netns_path: &Path) -> Result<GuestNetwork, NetworkError> {
        let netns = File::open(netns_path).map_err(|source| NetworkError::Netns {
            path: netns_path.to_path_buf(),
            what: "open",
            source,
        })?;
        in_netns(&netns, netns_path, discover)
    }

    /// The netns path.
    pub fn netns_path(&self) -> &Path {
        &self.path
    }

    /// What the guest must be configured with.
    pub fn guest(&self) -> &GuestNetwork {
        &self.guest
    }

    /// The netns fd (QEMU `setns`es into it between fork and exec).
    pub(crate) fn netns_fd(&self) -> RawFd {
        self.netns.as_raw_fd()
    }

    /// `(tap fd, guest MAC)` per interface, in tap order; empty after teardown.
    pub(crate) fn taps(&self) -> Vec<(RawFd, String)> {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links.iter().zip(&self.guest.interfaces).map(|(a, i)| (a.fd.as_raw_fd(), i.mac.clone())).collect()
    }

    /// Removes the tc qdiscs (with their filters) and closes the taps, which makes them
    /// disappear once QEMU (holding a copy) is gone. Idempotent; blocking.
    pub fn teardown(&self) -> Result<(), NetworkError> {
        let links = std::mem::take(&mut *self.links.lock().unwrap_or_else(|e| e.into_inner()));
        if links.is_empty() {
            return Ok(());
        }
        // The fds close when `links` is dropped, after the qdiscs are gone.
        in_netns(&self.netns, &self.path, move |ops| detach(ops, links))
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

/// A netlink socket in the pod netns plus the netns path for error messages.
struct Ops {
    nl: Netlink,
    path: PathBuf,
}

impl Ops {
    fn err(&self, what: impl Into<String>) -> impl FnOnce(io::Error) -> NetworkError {
        let (path, what) = (self.path.clone(), what.into());
        move |source| NetworkError::Op { path, what, source }
    }
}

/// `(device, inode)` of a namespace file: what makes two namespaces the same one.
fn ns_identity(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// Refuses the node's own network namespace: the one this process runs in (the container
/// manager's, which is the host's) or, when readable, PID 1's. Compared by identity, never by
/// name: CRI-O hands a hostNetwork pod a pinned bind mount of the host's namespace.
fn refuse_host_netns(netns: &File, path: &Path) -> Result<(), NetworkError> {
    let target =
        netns.metadata().map_err(|source| NetworkError::Netns { path: path.to_path_buf(), what: "fstat", source })?;
    for (own, what) in [("/proc/self/ns/net", "the shim's"), ("/proc/1/ns/net", "PID 1's")] {
        if let Ok(meta) = std::fs::metadata(own) {
            if ns_identity(&meta) == ns_identity(&target) {
                return Err(NetworkError::HostNamespace { path: path.to_path_buf(), what });
            }
        }
    }
    Ok(())
}

/// Runs `f` in a new OS thread that has entered `netns` (never in a tokio worker); never in the
/// node's own network namespace.
fn in_netns<T: Send>(
    netns: &File,
    path: &Path,
    f: impl FnOnce(&mut Ops) -> Result<T, NetworkError> + Send,
) -> Result<T, NetworkError> {
    refuse_host_netns(netns, path)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                NetworkError::Netns { path: path.to_path_buf(), what: "setns", source: io::Error::from(e) }
            })?;
            let nl = Netlink::open().map_err(|source| NetworkError::Op {
                path: path.to_path_buf(),
                what: "open a netlink socket".into(),
                source,
            })?;
            f(&mut Ops { nl, path: path.to_path_buf() })
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetworkError::Op {
                path: path.to_path_buf(),
                what: "network thread".into(),
                source: io::Error::other("panicked"),
            })
        })
    })
}

fn discover(ops: &mut Ops) -> Result<GuestNetwork, NetworkError> {
    let links = ops.nl.links().map_err(ops.err("list links"))?;
    let addrs = ops.nl.addresses().map_err(ops.err("list addresses"))?;
    let routes = ops.nl.routes().map_err(ops.err("list routes"))?;
    let neighs = ops.nl.neighbours().map_err(ops.err("list neighbours"))?;
    Ok(guest_network(&links, &addrs, &routes, &neighs))
}

/// The pod interfaces and their routes and neighbours, from netlink dumps. Left out: `lo`, links
/// without an Ethernet MAC, links without any address (unconfigured or base tunnel devices such
/// as `tunl0`, as Kata does), and our own taps.
fn guest_network(
    links: &[LinkMessage],
    addrs: &[AddressMessage],
    routes: &[RouteMessage],
    neighs: &[NeighbourMessage],
) -> GuestNetwork {
    let mut interfaces = Vec::new();
    let mut names = std::collections::HashMap::new();
    for link in links {
        if link.header.flags.contains(LinkFlags::Loopback) {
            continue;
        }
        let fields = read::link(link);
        let mac = fields.mac.filter(|m| m.len() == 6 && m.iter().any(|b| *b != 0));
        let ifc = NetInterface {
            name: fields.name,
            mac: mac.as_deref().map(format_mac).unwrap_or_default(),
            mtu: fields.mtu.unwrap_or(0),
            addresses: addrs.iter().filter(|a| a.header.index == link.header.index).filter_map(address_of).collect(),
            kind: fields.kind.unwrap_or_default(),
        };
        if ifc.name == "lo" || ifc.mac.is_empty() || ifc.addresses.is_empty() || ifc.name.ends_with("_kata") {
            continue;
        }
        names.insert(link.header.index, ifc.name.clone());
        interfaces.push(ifc);
    }
    let routes = routes.iter().filter_map(|r| route_of(r, &names)).collect();
    let neighbours = neighs.iter().filter_map(|n| neighbour_of(n, &names)).collect();
    GuestNetwork { interfaces, routes, neighbours }
}

/// An address of a pod interface; IPv6 link-local ones are left out (the guest makes its own).
fn address_of(a: &AddressMessage) -> Option<IpNet> {
    let (addr, prefix) = read::address(a)?;
    (addr.is_ipv4() || !is_link_local(&addr)).then_some(IpNet { addr, prefix })
}

/// A main-table unicast route over a pod interface; IPv6 link-local and multicast routes are
/// the guest kernel's own business.
fn route_of(r: &RouteMessage, names: &std::collections::HashMap<u32, String>) -> Option<NetRoute> {
    let f = read::route(r);
    if !f.is_main_unicast() || f.dest.is_some_and(|(ip, _)| ip.is_ipv6() && is_kernel_route_dest(&ip)) {
        return None;
    }
    let device = names.get(&f.oif?)?.clone();
    let dest = f.dest.map(|(addr, prefix)| IpNet { addr, prefix });
    Some(NetRoute { dest, gateway: f.gateway, source: f.source, device, scope: f.scope, ipv6: f.ipv6, flags: f.flags })
}

/// A permanent neighbour entry on a pod interface.
fn neighbour_of(n: &NeighbourMessage, names: &std::collections::HashMap<u32, String>) -> Option<NetNeighbour> {
    if n.header.state != NeighbourState::Permanent {
        return None;
    }
    let device = names.get(&n.header.ifindex)?.clone();
    let (ip, mac) = read::neighbour(n).filter(|(_, mac)| mac.len() == 6)?;
    Some(NetNeighbour { ip, mac: format_mac(&mac), device, state: n.header.state.into(), flags: n.header.flags.bits() })
}

/// Creates the tap for `ifc`, brings it up with the veth's MTU, and adds the two redirects.
fn join(ops: &mut Ops, ifc: &NetInterface, tap: &str) -> Result<Attached, NetworkError> {
    let veth_index = nix::net::if_::if_nametoindex(ifc.name.as_str())
        .map_err(|e| (ops.err(format!("find interface {}", ifc.name)))(e.into()))?;
    let fd = open_tap(tap).map_err(ops.err(format!("create tap {tap} (TUNSETIFF on /dev/net/tun)")))?;
    let tap_index = nix::net::if_::if_nametoindex(tap).map_err(|e| (ops.err(format!("find tap {tap}")))(e.into()))?;
    let a = Attached { veth: ifc.name.clone(), veth_index, tap: tap.to_string(), tap_index, fd };
    let result = (|| {
        let mut up = LinkMessage::default();
        up.header.index = tap_index;
        up.header.flags = LinkFlags::Up;
        up.header.change_mask = LinkFlags::Up;
        up.attributes.push(LinkAttribute::Mtu(ifc.mtu));
        ops.nl
            .request(RouteNetlinkMessage::SetLink(up), 0)
            .map_err(ops.err(format!("set {tap} up with MTU {}", ifc.mtu)))?;
        for (dev, index) in [(&a.veth, veth_index), (&a.tap, tap_index)] {
            ops.nl
                .request(RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(index)), NLM_F_CREATE | NLM_F_EXCL)
                .map_err(
                    ops.err(format!("add ingress qdisc on {dev} (tc qdisc add dev {dev} handle ffff: ingress)")),
                )?;
        }
        for (from, from_index, to, to_index) in
            [(&a.veth, veth_index, &a.tap, tap_index), (&a.tap, tap_index, &a.veth, veth_index)]
        {
            ops.nl.request(RouteNetlinkMessage::NewTrafficFilter(redirect_filter(from_index, to_index)), NLM_F_CREATE | NLM_F_EXCL).map_err(
                ops.err(format!(
                    "add redirect filter {from} -> {to} (tc filter add dev {from} parent ffff: protocol all u32 match u8 0 0 \
                     action mirred egress redirect dev {to})"
                )),
            )?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(a),
        Err(e) => {
            let _ = detach(ops, vec![a]);
            Err(e)
        }
    }
}

/// Deletes the ingress qdiscs (their filters go with them); missing ones are fine. The taps
/// close when `links` is dropped.
fn detach(ops: &mut Ops, links: Vec<Attached>) -> Result<(), NetworkError> {
    let mut first = None;
    for a in &links {
        for (dev, index) in [(&a.veth, a.veth_index), (&a.tap, a.tap_index)] {
            match ops.nl.request(RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)), 0) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)) => {}
                Err(e) => {
                    first.get_or_insert_with(|| (ops.err(format!("delete ingress qdisc on {dev}")))(e));
                }
            }
        }
    }
    drop(links);
    first.map_or(Ok(()), Err)
}

/// `tc qdisc add dev <index> handle ffff: ingress`.
pub fn ingress_qdisc(index: u32) -> TcMessage {
    let mut m = TcMessage::with_index(index as i32);
    m.header.parent = TcHandle::INGRESS;
    m.header.handle = TcHandle { major: 0xffff, minor: 0 };
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    m
}

/// `ETH_P_ALL` in network byte order, as tc's `protocol all` sends it.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();

/// `tc filter add dev <from> parent ffff: protocol all u32 match u8 0 0 action mirred egress
/// redirect dev <to>`.
pub fn redirect_filter(from: u32, to: u32) -> TcMessage {
    let mut m = TcMessage::with_index(from as i32);
    m.header.parent = TcHandle { major: 0xffff, minor: 0 };
    m.header.info = u32::from(PROTOCOL_ALL); // priority 0: the kernel picks one
    let mut sel = TcU32Selector::default();
    sel.flags = TcU32SelectorFlags::Terminal;
    sel.nkeys = 1;
    sel.keys = vec![TcU32Key::default()]; // match u8 0 0 at offset 0: every packet
    let mut mirror = TcMirror::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(mirror))]),
    ];
    m.attributes.push(TcAttribute::Kind(TcFilterU32::KIND.to_string()));
    m.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(sel)),
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
    ]));
    m
}

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens `/dev/net/tun` and creates tap `name` on it in the calling thread's netns
/// (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, not persistent: it goes when its last fd closes).
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("interface name {name} is too long")));
    }
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes, the size of IfReq), which
    // lives across the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::address::AddressAttribute;
    use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags};
    use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteScope, RouteType};
    use netlink_packet_route::AddressFamily;
    use std::collections::HashMap;

    fn link(index: u32, name: &str, mac: &[u8], loopback: bool) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.header.index = index;
        if loopback {
            l.header.flags = LinkFlags::Loopback;
        }
        l.attributes =
            vec![LinkAttribute::IfName(name.into()), LinkAttribute::Address(mac.to_vec()), LinkAttribute::Mtu(1450)];
        l
    }

    fn addr(index: u32, ip: &str, prefix: u8) -> AddressMessage {
        let mut a = AddressMessage::default();
        a.header.index = index;
        a.header.prefix_len = prefix;
        a.attributes = vec![AddressAttribute::Address(ip.parse().unwrap())];
        a
    }

    fn route(oif: u32, dest: Option<(&str, u8)>, gw: Option<&str>, table: u8) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.table = table;
        r.header.kind = RouteType::Unicast;
        r.header.address_family = AddressFamily::Inet;
        r.attributes.push(RouteAttribute::Oif(oif));
        if let Some((d, p)) = dest {
            r.header.destination_prefix_length = p;
            r.header.scope = RouteScope::Link;
            r.attributes.push(RouteAttribute::Destination(RouteAddress::from(d.parse::<IpAddr>().unwrap())));
        }
        if let Some(g) = gw {
            r.attributes.push(RouteAttribute::Gateway(RouteAddress::from(g.parse::<IpAddr>().unwrap())));
        }
        r
    }

    #[test]
    fn pod_interfaces_routes_and_neighbours_are_selected() {
        let mac = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];
        let links = [
            link(1, "lo", &[0; 6], true),
            link(2, "tunl0", &[], false),
            link(3, "eth0", &mac, false),
            link(4, "down0", &mac, false),
        ];
        let addrs = [
            addr(1, "127.0.0.1", 8),
            addr(3, "10.200.1.2", 24),
            addr(3, "fe80::42:acff:fe11:2", 64),
            addr(3, "fd00::2", 64),
        ];
        let routes = [
            route(3, None, Some("10.200.1.1"), 254),
            route(3, Some(("10.200.1.0", 24)), None, 254),
            route(3, Some(("10.9.0.0", 16)), None, 255),
            route(1, Some(("127.0.0.0", 8)), None, 254),
        ];
        let mut n = NeighbourMessage::default();
        n.header.ifindex = 3;
        n.header.state = NeighbourState::Permanent;
        n.header.flags = NeighbourFlags::empty();
        n.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet("10.200.1.9".parse().unwrap())),
            NeighbourAttribute::LinkLayerAddress(vec![0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]),
        ];
        let mut stale = n.clone();
        stale.header.state = NeighbourState::Stale;
        let g = guest_network(&links, &addrs, &routes, &[n, stale]);
        assert_eq!(g.interfaces.len(), 1, "{g:?}");
        let eth0 = &g.interfaces[0];
        assert_eq!((eth0.name.as_str(), eth0.mac.as_str(), eth0.mtu), ("eth0", "02:42:ac:11:00:02", 1450));
        let shown: Vec<String> = eth0.addresses.iter().map(|a| a.to_string()).collect();
        assert_eq!(shown, ["10.200.1.2/24", "fd00::2/64"], "IPv6 link-local is left out");
        assert_eq!(g.routes.len(), 2, "main table, pod interfaces only: {:?}", g.routes);
        assert_eq!(g.routes[0].dest, None);
        assert_eq!(g.routes[0].gateway, Some("10.200.1.1".parse().unwrap()));
        assert_eq!(g.routes[1].dest.unwrap().to_string(), "10.200.1.0/24");
        assert_eq!((g.routes[1].scope, g.routes[1].device.as_str()), (253, "eth0"));
        assert_eq!(g.neighbours.len(), 1, "permanent entries only");
        assert_eq!((g.neighbours[0].mac.as_str(), g.neighbours[0].state), ("aa:bb:cc:dd:ee:ff", 0x80));
    }

    #[test]
    fn ipv6_link_local_and_multicast_routes_are_left_out() {
        let names: HashMap<u32, String> = [(3, "eth0".to_string())].into();
        let mut r = route(3, None, None, 254);
        r.header.address_family = AddressFamily::Inet6;
        r.header.destination_prefix_length = 64;
        r.attributes.push(RouteAttribute::Destination(RouteAddress::Inet6("fe80::".parse().unwrap())));
        assert_eq!(route_of(&r, &names), None);
        let mut big_table = route(3, None, Some("10.0.0.1"), 0);
        big_table.attributes.push(RouteAttribute::Table(254));
        assert!(route_of(&big_table, &names).is_some(), "RTA_TABLE overrides the header's table");
    }

    /// The filter message is byte-for-byte what iproute2's `tc filter add dev X parent ffff:
    /// protocol all u32 match u8 0 0 action mirred egress redirect dev Y` sends (the fields that
    /// matter: header, kind, selector and mirred parameters).
    #[test]
    fn redirect_filter_is_tc_u32_mirred() {
        let m = redirect_filter(3, 7);
        assert_eq!(m.header.index, 3);
        assert_eq!(u32::from(m.header.parent), 0xffff_0000);
        assert_eq!(m.header.info, 0x0000_0300, "priority 0, protocol htons(ETH_P_ALL)");
        // It serializes and parses back into the same message (what the kernel will read).
        let mut nl = NetlinkMessage::from(RouteNetlinkMessage::NewTrafficFilter(m.clone()));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf).unwrap();
        assert_eq!(back.payload, NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m.clone())));
        let TcAttribute::Options(opts) = &m.attributes[1] else { panic!("{m:?}") };
        let TcOption::U32(TcFilterU32Option::Selector(sel)) = &opts[0] else { panic!("{opts:?}") };
        assert_eq!((sel.nkeys, sel.keys[0].mask, sel.keys[0].val, sel.flags), (1, 0, 0, TcU32SelectorFlags::Terminal));
        let TcOption::U32(TcFilterU32Option::Action(acts)) = &opts[1] else { panic!("{opts:?}") };
        let TcActionAttribute::Options(o) = &acts[0].attributes[1] else { panic!() };
        let TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) = &o[0] else { panic!() };
        assert_eq!(
            (p.ifindex, p.eaction, p.generic.action),
            (7, TcMirrorActionType::EgressRedir, TcActionType::Stolen)
        );
    }

    #[test]
    fn ingress_qdisc_message() {
        let m = ingress_qdisc(5);
        assert_eq!(
            (m.header.index, u32::from(m.header.parent), u32::from(m.header.handle)),
            (5, 0xffff_fff1, 0xffff_0000)
        );
        assert_eq!(m.attributes, vec![TcAttribute::Kind("ingress".into())]);
    }

    #[test]
    fn model_values() {
        assert_eq!(InternetworkingModel::parse("tcfilter"), Ok(InternetworkingModel::TcFilter));
        assert_eq!(InternetworkingModel::parse("none"), Ok(InternetworkingModel::None));
        let e = InternetworkingModel::parse("macvtap").unwrap_err();
        assert!(e.contains("internetworking_model") && e.contains("macvtap") && e.contains("tcfilter"), "{e}");
        assert_eq!(tap_name(1), "tap1_kata");
    }

    #[test]
    fn the_hosts_own_netns_is_refused_by_identity() {
        // A bind mount of our own netns, as CRI-O pins the host's for a hostNetwork pod.
        let dir = std::env::temp_dir().join(format!("podvisor-hostns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pinned = dir.join("netns");
        std::fs::write(&pinned, b"").unwrap();
        nix::mount::mount(Some("/proc/self/ns/net"), &pinned, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)
            .unwrap();
        let result = PodNetwork::attach(&pinned);
        nix::mount::umount(&pinned).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let e = result.unwrap_err().to_string();
        assert!(e.contains("node's own network namespace") && e.contains(&pinned.display().to_string()), "{e}");
    }

    #[test]
    fn missing_netns_is_named() {
        let e = PodNetwork::attach(Path::new("/nonexistent/netns/x")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/netns/x") && e.contains("open"), "{e}");
    }

    #[test]
    fn a_file_that_is_no_netns_is_named() {
        let e = PodNetwork::attach(Path::new("/proc/self/status")).unwrap_err().to_string();
        assert!(e.contains("/proc/self/status") && e.contains("setns"), "{e}");
    }

    /// Discovery in a fresh netns (the test's own is the host's, which is refused): lo is never
    /// a pod interface.
    #[test]
    fn discovery_skips_lo() {
        let netns = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            File::open("/proc/thread-self/ns/net").unwrap()
        })
        .join()
        .unwrap();
        let g = in_netns(&netns, Path::new("/proc/thread-self/ns/net"), discover).unwrap();
        assert!(g.interfaces.iter().all(|i| i.name != "lo"), "{g:?}");
    }
}
