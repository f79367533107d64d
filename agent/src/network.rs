//! Guest networking: the pod's interfaces, routes and ARP neighbours as the shim found them in the
//! pod netns (UpdateInterface, UpdateRoutes, AddARPNeighbors), and what the guest has
//! (ListInterfaces, ListRoutes). Netlink on a blocking socket, run with `spawn_blocking`.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;

use agent_protocol::types::{ARPNeighbor, IPAddress, IPFamily, Interface, Route};
use netlink::{read, text, Netlink};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use ttrpc::Code;

/// Why a networking RPC failed; becomes a ttrpc status.
#[derive(Debug)]
pub enum NetError {
    /// A request field is malformed (INVALID_ARGUMENT).
    Invalid(String),
    /// The interface or device named does not exist in the guest (NOT_FOUND).
    NotFound(String),
    /// The kernel refused a netlink request (INTERNAL).
    Netlink {
        /// What was being done, naming the interface or route.
        what: String,
        /// The errno.
        source: io::Error,
    },
}

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetError::Invalid(m) | NetError::NotFound(m) => f.write_str(m),
            NetError::Netlink { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl NetError {
    fn code(&self) -> Code {
        match self {
            NetError::Invalid(_) => Code::INVALID_ARGUMENT,
            NetError::NotFound(_) => Code::NOT_FOUND,
            NetError::Netlink { .. } => Code::INTERNAL,
        }
    }
}

type Result<T> = std::result::Result<T, NetError>;

fn nl_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// Runs blocking netlink work off the async workers; errors become statuses prefixed by `rpc`.
pub async fn run<T: Send + 'static>(
    rpc: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> ttrpc::Result<T> {
    let status = |code, msg: String| ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg));
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(status(e.code(), format!("{rpc}: {e}"))),
        Err(e) => Err(status(Code::INTERNAL, format!("{rpc}: {e}"))),
    }
}

/// A guest link the pod's networking RPCs must never change (podvm mode's underlay NIC `pvm0`,
/// which carries the agent's own connection and the tunnel): set once at boot.
static PROTECTED_LINK: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes `name` off limits to UpdateInterface and UpdateRoutes.
pub fn protect_link(name: &str) {
    let _ = PROTECTED_LINK.set(name.to_string());
}

fn refuse_protected(name: &str, what: impl FnOnce() -> String) -> Result<()> {
    match PROTECTED_LINK.get() {
        Some(p) if p == name => Err(NetError::Invalid(format!(
            "{}: {p} is the podvm's underlay NIC (agent.podvm); the pod's networking cannot use or change it",
            what()
        ))),
        _ => Ok(()),
    }
}

/// Every link with its addresses.
pub fn list_interfaces() -> Result<Vec<Interface>> {
    let mut nl = Netlink::open().map_err(nl_err("open a netlink socket"))?;
    let (links, addrs) = dump_links_and_addresses(&mut nl)?;
    Ok(links.iter().map(|l| interface_of(l, &addrs)).collect())
}

/// Configures the guest link whose MAC is `want.hwAddr`: renamed to `want.name`, MTU, its
/// addresses replaced by `want.IPAddresses`, up. Returns the link as it is afterwards.
pub fn update_interface(want: &Interface) -> Result<Interface> {
    let mac = text::parse_mac(&want.hwAddr).map_err(NetError::Invalid)?;
    let addresses = want.IPAddresses.iter().map(parse_ip_address).collect::<Result<Vec<_>>>()?;
    let mut nl = Netlink::open().map_err(nl_err("open a netlink socket"))?;
    let (links, addrs) = dump_links_and_addresses(&mut nl)?;
    let link = links.iter().find(|l| read::link(l).mac.as_deref() == Some(mac.as_slice())).ok_or_else(|| {
        NetError::NotFound(format!("no guest interface has MAC {} (interface {:?})", want.hwAddr, want.name))
    })?;
    let index = link.header.index;
    let current = link_name(link);
    let name = if want.name.is_empty() { current.clone() } else { want.name.clone() };
    for n in [&current, &name] {
        refuse_protected(n, || format!("interface {:?} ({})", want.name, want.hwAddr))?;
    }
    let ctx = |what: &str| format!("{what} of interface {name} ({})", want.hwAddr);
    set_link(&mut nl, index, Some(false), None, None).map_err(nl_err(ctx("set down")))?;
    if name != current {
        // Another guest link may hold the name (eth0 vs. the pod's eth0): move it aside.
        if let Some(other) = links.iter().find(|l| link_name(l) == name && l.header.index != index) {
            let aside = format!("pv{}", other.header.index);
            set_link(&mut nl, other.header.index, None, Some(&aside), None)
                .map_err(nl_err(format!("rename {name} to {aside}")))?;
        }
        set_link(&mut nl, index, None, Some(&name), None)
            .map_err(nl_err(format!("rename {current} to {name} ({})", want.hwAddr)))?;
    }
    if want.mtu > 0 {
        let mtu = u32::try_from(want.mtu)
            .map_err(|_| NetError::Invalid(format!("MTU {} of {name} is too large", want.mtu)))?;
        match set_link(&mut nl, index, None, None, Some(mtu)) {
            // A tunnel (podvm mode's vxlan0) cannot carry the pod's MTU over its underlay (VXLAN
            // headroom): it keeps its own, smaller MTU. Kata's shim sends the worker-side eth0's.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && read::link(link).mtu.is_some_and(|cur| cur < mtu) => {}
            r => r.map_err(nl_err(ctx(&format!("set MTU {mtu}"))))?,
        }
    }
    for old in addrs.iter().filter(|a| a.header.index == index) {
        if let Some((ip, prefix)) = read::address(old).filter(|(ip, _)| !text::is_link_local(ip)) {
            let shown = format!("{ip}/{prefix}");
            match nl.request(RouteNetlinkMessage::DelAddress(old.clone()), 0) {
                // Setting the link down flushed it already (IPv6 without keep_addr_on_down).
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
                r => r.map(|_| ()).map_err(nl_err(ctx(&format!("delete address {shown}"))))?,
            }
        }
    }
    for (ip, prefix) in &addresses {
        nl.request(
            RouteNetlinkMessage::NewAddress(read::address_message(index, *ip, *prefix)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(nl_err(ctx(&format!("add address {ip}/{prefix}"))))?;
    }
    set_link(&mut nl, index, Some(true), None, None).map_err(nl_err(ctx("set up")))?;
    let (links, addrs) = dump_links_and_addresses(&mut nl)?;
    let link = links
        .iter()
        .find(|l| l.header.index == index)
        .ok_or_else(|| NetError::NotFound(format!("interface {name} vanished")))?;
    Ok(interface_of(link, &addrs))
}

/// The main-table unicast routes.
pub fn list_routes() -> Result<Vec<Route>> {
    let mut nl = Netlink::open().map_err(nl_err("open a netlink socket"))?;
    let names = link_names(&mut nl)?;
    Ok(nl.routes().map_err(nl_err("list routes"))?.iter().filter_map(|r| route_of(r, &names)).collect())
}

/// Makes `want` the main-table routes of the links it names: adds or replaces each (routes
/// without a gateway first, so gateways are reachable), then deletes the other routes of those
/// links. Returns the guest's routes afterwards.
pub fn update_routes(want: &[Route]) -> Result<Vec<Route>> {
    let mut nl = Netlink::open().map_err(nl_err("open a netlink socket"))?;
    let names = link_names(&mut nl)?;
    let index_of: HashMap<&str, u32> = names.iter().map(|(i, n)| (n.as_str(), *i)).collect();
    let mut messages = Vec::new();
    for r in want {
        refuse_protected(&r.device, || format!("route {}", describe_route(r)))?;
        let index = *index_of.get(r.device.as_str()).ok_or_else(|| {
            NetError::NotFound(format!("route {}: no guest interface {:?}", describe_route(r), r.device))
        })?;
        messages.push((describe_route(r), route_message(r, index)?));
    }
    messages.sort_by_key(|(_, m)| m.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_))));
    for (shown, m) in &messages {
        nl.request(RouteNetlinkMessage::NewRoute(m.clone()), NLM_F_CREATE | NLM_F_REPLACE)
            .map_err(nl_err(format!("add route {shown}")))?;
    }
    let links: Vec<u32> = messages.iter().filter_map(|(_, m)| route_oif(m)).collect();
    let keys: Vec<RouteKey> = messages.iter().map(|(_, m)| route_key(m)).collect();
    for r in nl.routes().map_err(nl_err("list routes"))? {
        let Some(shown) = route_of(&r, &names) else { continue };
        let key = route_key(&r);
        // IPv6 link-local and multicast routes belong to the guest kernel.
        let kernels = key.2.is_some_and(|ip| text::is_kernel_route_dest(&ip));
        if route_oif(&r).is_some_and(|i| links.contains(&i)) && !keys.contains(&key) && !kernels {
            nl.request(RouteNetlinkMessage::DelRoute(r), 0)
                .map_err(nl_err(format!("delete route {}", describe_route(&shown))))?;
        }
    }
    list_routes()
}

/// Adds (or replaces) each neighbour entry.
pub fn add_arp_neighbors(neighbours: &[ARPNeighbor]) -> Result<()> {
    let mut nl = Netlink::open().map_err(nl_err("open a netlink socket"))?;
    let names = link_names(&mut nl)?;
    for n in neighbours {
        let ip = n.toIPAddress.as_ref().map(|a| a.address.as_str()).unwrap_or("");
        let shown = format!("{ip} lladdr {} dev {}", n.lladdr, n.device);
        let ip: IpAddr = ip.parse().map_err(|_| NetError::Invalid(format!("ARP neighbour {shown}: bad IP address")))?;
        let mac = text::parse_mac(&n.lladdr).map_err(|e| NetError::Invalid(format!("ARP neighbour {shown}: {e}")))?;
        let index =
            names.iter().find(|(_, name)| **name == n.device).map(|(i, _)| *i).ok_or_else(|| {
                NetError::NotFound(format!("ARP neighbour {shown}: no guest interface {:?}", n.device))
            })?;
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::from(ip);
        m.header.ifindex = index;
        m.header.state = if n.state == 0 { NeighbourState::Permanent } else { NeighbourState::from(n.state as u16) };
        m.header.flags = NeighbourFlags::from_bits_retain(n.flags as u8);
        m.header.kind = RouteType::Unspec;
        m.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::from(ip)),
            NeighbourAttribute::LinkLayerAddress(mac),
        ];
        nl.request(RouteNetlinkMessage::NewNeighbour(m), NLM_F_CREATE | NLM_F_REPLACE)
            .map_err(nl_err(format!("add ARP neighbour {shown}")))?;
    }
    Ok(())
}

fn dump_links_and_addresses(nl: &mut Netlink) -> Result<(Vec<LinkMessage>, Vec<AddressMessage>)> {
    Ok((nl.links().map_err(nl_err("list links"))?, nl.addresses().map_err(nl_err("list addresses"))?))
}

fn link_names(nl: &mut Netlink) -> Result<HashMap<u32, String>> {
    Ok(nl.links().map_err(nl_err("list links"))?.iter().map(|l| (l.header.index, link_name(l))).collect())
}

/// RTM_SETLINK: up/down, name, MTU (each when given).
fn set_link(nl: &mut Netlink, index: u32, up: Option<bool>, name: Option<&str>, mtu: Option<u32>) -> io::Result<()> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    if let Some(up) = up {
        m.header.flags = if up { LinkFlags::Up } else { LinkFlags::empty() };
        m.header.change_mask = LinkFlags::Up;
    }
    if let Some(n) = name {
        m.attributes.push(LinkAttribute::IfName(n.to_string()));
    }
    if let Some(mtu) = mtu {
        m.attributes.push(LinkAttribute::Mtu(mtu));
    }
    nl.request(RouteNetlinkMessage::SetLink(m), 0).map(|_| ())
}

fn link_name(l: &LinkMessage) -> String {
    read::link(l).name
}

/// A link as Kata's `Interface` (device and name are both the link name).
fn interface_of(l: &LinkMessage, addrs: &[AddressMessage]) -> Interface {
    let fields = read::link(l);
    Interface {
        device: fields.name.clone(),
        name: fields.name,
        raw_flags: l.header.flags.bits(),
        mtu: u64::from(fields.mtu.unwrap_or(0)),
        hwAddr: fields.mac.as_deref().map(text::format_mac).unwrap_or_default(),
        type_: fields.kind.unwrap_or_default(),
        IPAddresses: addrs
            .iter()
            .filter(|a| a.header.index == l.header.index)
            .filter_map(read::address)
            .map(|(ip, p)| ip_address(ip, p))
            .collect(),
        ..Default::default()
    }
}

fn ip_address(ip: IpAddr, prefix: u8) -> IPAddress {
    IPAddress {
        family: if ip.is_ipv6() { IPFamily::v6 } else { IPFamily::v4 }.into(),
        address: ip.to_string(),
        mask: prefix.to_string(),
        ..Default::default()
    }
}

/// `IPAddress` -> (address, prefix); `mask` is a prefix length (Kata's) or, for IPv4, a dotted
/// netmask.
fn parse_ip_address(a: &IPAddress) -> Result<(IpAddr, u8)> {
    text::parse_ip_prefix(&a.address, &a.mask).map_err(NetError::Invalid)
}

/// The netlink message adding `r` via link `index`.
fn route_message(r: &Route, index: u32) -> Result<RouteMessage> {
    let gateway = if r.gateway.is_empty() {
        None
    } else {
        Some(
            r.gateway
                .parse::<IpAddr>()
                .map_err(|_| NetError::Invalid(format!("route {}: bad gateway", describe_route(r))))?,
        )
    };
    let source = if r.source.is_empty() {
        None
    } else {
        Some(
            r.source
                .parse::<IpAddr>()
                .map_err(|_| NetError::Invalid(format!("route {}: bad source", describe_route(r))))?,
        )
    };
    let ipv6 = r.family.enum_value() == Ok(IPFamily::v6) || gateway.is_some_and(|g| g.is_ipv6());
    let dest = text::parse_route_dest(&r.dest, ipv6)
        .map_err(|e| NetError::Invalid(format!("route {}: {e}", describe_route(r))))?;
    let ipv6 = dest.map_or(ipv6, |(ip, _)| ip.is_ipv6());
    let mut m = RouteMessage::default();
    m.header.address_family = if ipv6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
    m.header.destination_prefix_length = dest.map_or(0, |(_, p)| p);
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Boot;
    m.header.scope = RouteScope::from(r.scope as u8);
    m.header.kind = RouteType::Unicast;
    m.header.flags = RouteFlags::from_bits_retain(r.flags);
    if let Some((ip, _)) = dest {
        m.attributes.push(RouteAttribute::Destination(RouteAddress::from(ip)));
    }
    if let Some(g) = gateway {
        m.attributes.push(RouteAttribute::Gateway(RouteAddress::from(g)));
    }
    if let Some(s) = source {
        m.attributes.push(RouteAttribute::PrefSource(RouteAddress::from(s)));
    }
    m.attributes.push(RouteAttribute::Oif(index));
    Ok(m)
}

/// What identifies a route for replacement: family, destination, gateway, link.
type RouteKey = (AddressFamily, u8, Option<IpAddr>, Option<IpAddr>, Option<u32>);

fn route_key(r: &RouteMessage) -> RouteKey {
    let f = read::route(r);
    (r.header.address_family, r.header.destination_prefix_length, f.dest.map(|(ip, _)| ip), f.gateway, f.oif)
}

fn route_oif(r: &RouteMessage) -> Option<u32> {
    read::route(r).oif
}

/// A main-table unicast route as Kata's `Route` (default route: empty `dest`).
fn route_of(r: &RouteMessage, names: &HashMap<u32, String>) -> Option<Route> {
    let f = read::route(r);
    if !f.is_main_unicast() {
        return None;
    }
    let shown = |ip: Option<IpAddr>| ip.map(|ip| ip.to_string()).unwrap_or_default();
    Some(Route {
        dest: f.dest.map(|(ip, prefix)| format!("{ip}/{prefix}")).unwrap_or_default(),
        gateway: shown(f.gateway),
        source: shown(f.source),
        device: f.oif.and_then(|i| names.get(&i).cloned()).unwrap_or_default(),
        scope: u32::from(f.scope),
        family: if f.ipv6 { IPFamily::v6 } else { IPFamily::v4 }.into(),
        flags: f.flags,
        ..Default::default()
    })
}

/// `10.0.0.0/24 via 10.0.0.1 dev eth0` (iproute2 style) for messages.
fn describe_route(r: &Route) -> String {
    let mut s = if r.dest.is_empty() { "default".to_string() } else { r.dest.clone() };
    if !r.gateway.is_empty() {
        s.push_str(&format!(" via {}", r.gateway));
    }
    s.push_str(&format!(" dev {}", r.device));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_route(dest: &str, gw: &str, dev: &str, scope: u32) -> Route {
        Route { dest: dest.into(), gateway: gw.into(), device: dev.into(), scope, ..Default::default() }
    }

    /// Kata's `IPAddress` through the shared parser (`netlink::text`, tested there) and back.
    #[test]
    fn kata_ip_addresses() {
        let a =
            |address: &str, mask: &str| IPAddress { address: address.into(), mask: mask.into(), ..Default::default() };
        assert_eq!(parse_ip_address(&a("10.200.1.2", "255.255.255.0")).unwrap(), ("10.200.1.2".parse().unwrap(), 24));
        let e = parse_ip_address(&a("10.0.0.1", "33")).unwrap_err();
        assert!(matches!(e, NetError::Invalid(_)) && e.to_string().contains("10.0.0.1"), "{e}");
        let back = ip_address("fd00::2".parse().unwrap(), 64);
        assert_eq!((back.family.enum_value(), back.mask.as_str()), (Ok(IPFamily::v6), "64"));
    }

    #[test]
    fn route_messages_and_back() {
        let r = pb_route("10.200.1.0/24", "", "eth0", 253);
        let m = route_message(&r, 2).unwrap();
        assert_eq!((m.header.destination_prefix_length, m.header.table, m.header.scope), (24, 254, RouteScope::Link));
        let names: HashMap<u32, String> = [(2, "eth0".to_string())].into();
        let back = route_of(&m, &names).unwrap();
        assert_eq!(
            (back.dest.as_str(), back.gateway.as_str(), back.device.as_str(), back.scope),
            ("10.200.1.0/24", "", "eth0", 253)
        );

        let d = route_message(&pb_route("", "10.200.1.1", "eth0", 0), 2).unwrap();
        assert!(
            d.attributes.iter().all(|a| !matches!(a, RouteAttribute::Destination(_))),
            "default route has no RTA_DST"
        );
        let back = route_of(&d, &names).unwrap();
        assert_eq!((back.dest.as_str(), back.gateway.as_str()), ("", "10.200.1.1"));

        let v6 = route_message(&pb_route("", "fd00::1", "eth0", 0), 2).unwrap();
        assert_eq!(v6.header.address_family, AddressFamily::Inet6, "family follows the gateway");
        let e = route_message(&pb_route("10.0.0.0/8", "not-an-ip", "eth0", 0), 2).unwrap_err().to_string();
        assert!(e.contains("10.0.0.0/8 via not-an-ip dev eth0") && e.contains("gateway"), "{e}");
        let e = route_message(&pb_route("10.0.0.0/40", "", "eth0", 0), 2).unwrap_err().to_string();
        assert!(e.starts_with("route 10.0.0.0/40 dev eth0: route destination \"10.0.0.0/40\""), "{e}");
    }

    #[test]
    fn other_tables_and_kinds_are_not_listed() {
        let names: HashMap<u32, String> = [(2, "eth0".to_string())].into();
        let mut m = route_message(&pb_route("10.0.0.0/8", "", "eth0", 253), 2).unwrap();
        m.header.table = 255;
        assert!(route_of(&m, &names).is_none());
        m.header.table = 254;
        m.header.kind = RouteType::Local;
        assert!(route_of(&m, &names).is_none());
    }

    #[test]
    fn gateway_routes_sort_after_link_routes() {
        let mut v = [
            route_message(&pb_route("", "10.0.0.1", "eth0", 0), 2).unwrap(),
            route_message(&pb_route("10.0.0.0/24", "", "eth0", 253), 2).unwrap(),
        ];
        v.sort_by_key(|m| m.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_))));
        assert_eq!(v[0].header.destination_prefix_length, 24);
    }

    #[test]
    fn interface_from_link_and_addresses() {
        let mut l = LinkMessage::default();
        l.header.index = 2;
        l.header.flags = LinkFlags::Up;
        l.attributes = vec![
            LinkAttribute::IfName("eth0".into()),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 9]),
            LinkAttribute::Mtu(1400),
        ];
        let addrs = [
            read::address_message(2, "10.1.2.3".parse().unwrap(), 16),
            read::address_message(3, "10.9.9.9".parse().unwrap(), 8),
        ];
        let i = interface_of(&l, &addrs);
        assert_eq!(
            (i.name.as_str(), i.device.as_str(), i.hwAddr.as_str(), i.mtu),
            ("eth0", "eth0", "02:00:00:00:00:09", 1400)
        );
        assert_eq!(i.IPAddresses.len(), 1);
        assert_eq!((i.IPAddresses[0].address.as_str(), i.IPAddresses[0].mask.as_str()), ("10.1.2.3", "16"));
        assert_eq!(i.raw_flags, LinkFlags::Up.bits());
    }

    #[test]
    fn errors_map_to_codes() {
        assert_eq!(NetError::Invalid(String::new()).code(), Code::INVALID_ARGUMENT);
        assert_eq!(NetError::NotFound(String::new()).code(), Code::NOT_FOUND);
        let e = NetError::Netlink {
            what: "add route default via 10.0.0.1 dev eth0".into(),
            source: io::Error::from_raw_os_error(libc::ENETUNREACH),
        };
        assert_eq!(e.code(), Code::INTERNAL);
        assert!(e.to_string().starts_with("add route default via 10.0.0.1 dev eth0: "), "{e}");
    }
}

/// The RPC functions against a real kernel: in a thread that has its own network namespace
/// (gone with the thread), on a veth pair made there with `ip`.
#[cfg(test)]
mod netns_tests {
    use super::*;

    fn sh(cmd: &str) -> String {
        let out = std::process::Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn configure_a_link_its_routes_and_neighbours() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) needs root");
            sh("ip link add pvt0 address 02:00:0a:09:00:02 type veth peer name pvt1 && ip link set pvt1 up");
            let want = Interface {
                name: "eth7".into(),
                hwAddr: "02:00:0A:09:00:02".into(),
                mtu: 1400,
                IPAddresses: vec![
                    ip_address("10.9.0.2".parse().unwrap(), 24),
                    ip_address("fd09::2".parse().unwrap(), 64),
                ],
                ..Default::default()
            };
            let got = update_interface(&want).unwrap();
            assert_eq!((got.name.as_str(), got.mtu, got.hwAddr.as_str()), ("eth7", 1400, "02:00:0a:09:00:02"));
            assert!(got.IPAddresses.iter().any(|a| a.address == "10.9.0.2" && a.mask == "24"), "{got:?}");
            assert!(got.raw_flags & LinkFlags::Up.bits() != 0);
            // Again with one address less: the old one goes.
            let want2 = Interface { IPAddresses: vec![ip_address("10.9.0.3".parse().unwrap(), 24)], ..want.clone() };
            let got = update_interface(&want2).unwrap();
            let v4: Vec<&str> = got
                .IPAddresses
                .iter()
                .filter(|a| a.family.enum_value() == Ok(IPFamily::v4))
                .map(|a| a.address.as_str())
                .collect();
            assert_eq!(v4, ["10.9.0.3"]);

            let routes = [
                pb_route("", "10.9.0.1", "eth7", 0),
                pb_route("10.9.0.0/24", "", "eth7", 253),
                pb_route("10.77.0.0/16", "10.9.0.1", "eth7", 0),
            ];
            let got = update_routes(&routes).unwrap();
            assert!(got.iter().any(|r| r.dest.is_empty() && r.gateway == "10.9.0.1" && r.device == "eth7"), "{got:?}");
            // Replacing with fewer routes deletes the others of the link.
            let got = update_routes(&routes[..2]).unwrap();
            assert!(!got.iter().any(|r| r.dest == "10.77.0.0/16"), "{got:?}");
            assert_eq!(list_routes().unwrap(), got);

            let n = ARPNeighbor {
                toIPAddress: Some(ip_address("10.9.0.9".parse().unwrap(), 32)).into(),
                device: "eth7".into(),
                lladdr: "02:00:00:00:00:09".into(),
                state: 0x80,
                ..Default::default()
            };
            add_arp_neighbors(std::slice::from_ref(&n)).unwrap();
            add_arp_neighbors(&[n]).unwrap();
            assert!(sh("ip neigh show dev eth7").contains("10.9.0.9 lladdr 02:00:00:00:00:09 PERMANENT"));

            let e = update_interface(&Interface {
                hwAddr: "02:00:00:00:00:99".into(),
                name: "x".into(),
                ..Default::default()
            })
            .unwrap_err();
            assert!(matches!(e, NetError::NotFound(_)) && e.to_string().contains("02:00:00:00:00:99"), "{e}");
            let e = update_routes(&[pb_route("", "10.9.0.1", "nope0", 0)]).unwrap_err();
            assert!(e.to_string().contains("default via 10.9.0.1 dev nope0"), "{e}");
            let e = update_routes(&[pb_route("", "10.50.0.1", "eth7", 0)]).unwrap_err().to_string();
            assert!(e.contains("add route default via 10.50.0.1 dev eth7: ") && e.contains("unreachable"), "{e}");
            let names: Vec<String> = list_interfaces().unwrap().into_iter().map(|i| i.name).collect();
            assert!(names.contains(&"eth7".to_string()) && names.contains(&"lo".to_string()), "{names:?}");
        })
        .join()
        .unwrap();
    }

    fn pb_route(dest: &str, gw: &str, dev: &str, scope: u32) -> Route {
        Route { dest: dest.into(), gateway: gw.into(), device: dev.into(), scope, ..Default::default() }
    }
}
