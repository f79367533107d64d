//! The fields of route-netlink messages that both the shim (reading the pod netns) and the
//! agent (reading and configuring the guest) use, taken out of their attribute lists once.

use std::net::IpAddr;

use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType};
use netlink_packet_route::AddressFamily;

/// A link's name, MAC, MTU and kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    /// `IFLA_IFNAME`, empty when missing.
    pub name: String,
    /// `IFLA_ADDRESS`, as the kernel gives it (6 bytes for Ethernet).
    pub mac: Option<Vec<u8>>,
    /// `IFLA_MTU`.
    pub mtu: Option<u32>,
    /// `IFLA_INFO_KIND` (`veth`, ...).
    pub kind: Option<String>,
}

/// The fields of a link message.
pub fn link(l: &LinkMessage) -> Link {
    let mut out = Link::default();
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => out.name = n.clone(),
            LinkAttribute::Address(m) => out.mac = Some(m.clone()),
            LinkAttribute::Mtu(m) => out.mtu = Some(*m),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        out.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// An address message's address and prefix length: `IFA_LOCAL` (the interface's own address;
/// `IFA_ADDRESS` is the peer's on point-to-point links), else `IFA_ADDRESS`.
pub fn address(a: &AddressMessage) -> Option<(IpAddr, u8)> {
    let local = a.attributes.iter().find_map(|x| if let AddressAttribute::Local(ip) = x { Some(*ip) } else { None });
    let addr = a.attributes.iter().find_map(|x| if let AddressAttribute::Address(ip) = x { Some(*ip) } else { None });
    Some((local.or(addr)?, a.header.prefix_len))
}

/// An address message for `ip/prefix` on link `index`, as iproute2 sends it: on IPv4,
/// `IFA_LOCAL` and `IFA_ADDRESS` both hold the address (non-point-to-point links).
pub fn address_message(index: u32, ip: IpAddr, prefix: u8) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::from(ip);
    m.header.prefix_len = prefix;
    m.header.index = index;
    if ip.is_ipv4() {
        m.attributes.push(AddressAttribute::Local(ip));
    }
    m.attributes.push(AddressAttribute::Address(ip));
    m
}

/// An IPv4 or IPv6 route address.
pub fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The fields of a route message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Routing table: `RTA_TABLE` when present (tables above 255), else the header's.
    pub table: u32,
    /// Destination and prefix length; `None` is a default route.
    pub dest: Option<(IpAddr, u8)>,
    /// `RTA_GATEWAY`.
    pub gateway: Option<IpAddr>,
    /// `RTA_PREFSRC`.
    pub source: Option<IpAddr>,
    /// `RTA_OIF`.
    pub oif: Option<u32>,
    /// IPv6 (else IPv4).
    pub ipv6: bool,
    /// Kernel scope (`RT_SCOPE_*`).
    pub scope: u8,
    /// `RTM_F_*` / `RTNH_F_*` flags.
    pub flags: u32,
    /// A unicast route (not local, broadcast, multicast, ...).
    pub unicast: bool,
}

impl Route {
    /// A unicast route of the main table: the routes a pod's and the guest's network consist of.
    pub fn is_main_unicast(&self) -> bool {
        self.unicast && self.table == u32::from(RouteHeader::RT_TABLE_MAIN)
    }
}

/// The fields of a route message.
pub fn route(r: &RouteMessage) -> Route {
    let mut out = Route {
        table: u32::from(r.header.table),
        dest: None,
        gateway: None,
        source: None,
        oif: None,
        ipv6: r.header.address_family == AddressFamily::Inet6,
        scope: r.header.scope.into(),
        flags: r.header.flags.bits(),
        unicast: r.header.kind == RouteType::Unicast,
    };
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => out.table = *t,
            RouteAttribute::Destination(d) => out.dest = route_ip(d).map(|ip| (ip, r.header.destination_prefix_length)),
            RouteAttribute::Gateway(g) => out.gateway = route_ip(g),
            RouteAttribute::PrefSource(s) => out.source = route_ip(s),
            RouteAttribute::Oif(i) => out.oif = Some(*i),
            _ => {}
        }
    }
    out
}

/// A neighbour message's IP address and link-layer address (when it has both).
pub fn neighbour(n: &NeighbourMessage) -> Option<(IpAddr, Vec<u8>)> {
    let (mut ip, mut mac) = (None, None);
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => ip = Some(IpAddr::V6(*v6)),
            NeighbourAttribute::LinkLayerAddress(m) => mac = Some(m.clone()),
            _ => {}
        }
    }
    Some((ip?, mac?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::InfoKind;
    use netlink_packet_route::route::RouteScope;

    #[test]
    fn links() {
        let mut l = LinkMessage::default();
        l.attributes = vec![
            LinkAttribute::IfName("eth0".into()),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 9]),
            LinkAttribute::Mtu(1400),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
        ];
        let got = link(&l);
        assert_eq!(
            got,
            Link { name: "eth0".into(), mac: Some(vec![2, 0, 0, 0, 0, 9]), mtu: Some(1400), kind: Some("veth".into()) }
        );
        assert_eq!(link(&LinkMessage::default()), Link::default());
    }

    #[test]
    fn addresses_prefer_ifa_local_and_round_trip() {
        let m = address_message(3, "10.1.2.3".parse().unwrap(), 16);
        assert_eq!((m.header.index, m.header.family), (3, AddressFamily::Inet));
        assert_eq!(m.attributes.len(), 2, "IFA_LOCAL and IFA_ADDRESS on IPv4");
        assert_eq!(address(&m), Some(("10.1.2.3".parse().unwrap(), 16)));
        let v6 = address_message(3, "fd00::2".parse().unwrap(), 64);
        assert_eq!((v6.header.family, v6.attributes.len()), (AddressFamily::Inet6, 1));
        assert_eq!(address(&v6), Some(("fd00::2".parse().unwrap(), 64)));
        let mut p2p = AddressMessage::default();
        p2p.header.prefix_len = 32;
        p2p.attributes = vec![
            AddressAttribute::Address("10.0.0.2".parse().unwrap()),
            AddressAttribute::Local("10.0.0.1".parse().unwrap()),
        ];
        assert_eq!(address(&p2p), Some(("10.0.0.1".parse().unwrap(), 32)), "the local end, not the peer");
        assert_eq!(address(&AddressMessage::default()), None);
    }

    #[test]
    fn routes() {
        let mut r = RouteMessage::default();
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        r.header.kind = RouteType::Unicast;
        r.header.scope = RouteScope::Link;
        r.header.destination_prefix_length = 24;
        r.attributes = vec![
            RouteAttribute::Destination(RouteAddress::from("10.200.1.0".parse::<IpAddr>().unwrap())),
            RouteAttribute::Gateway(RouteAddress::from("10.200.1.1".parse::<IpAddr>().unwrap())),
            RouteAttribute::PrefSource(RouteAddress::from("10.200.1.2".parse::<IpAddr>().unwrap())),
            RouteAttribute::Oif(3),
        ];
        let got = route(&r);
        assert_eq!(got.dest, Some(("10.200.1.0".parse().unwrap(), 24)));
        assert_eq!(got.gateway, Some("10.200.1.1".parse().unwrap()));
        assert_eq!(got.source, Some("10.200.1.2".parse().unwrap()));
        assert_eq!((got.oif, got.scope, got.ipv6), (Some(3), 253, false));
        assert!(got.is_main_unicast());
        r.header.table = 0;
        r.attributes.push(RouteAttribute::Table(254));
        assert!(route(&r).is_main_unicast(), "RTA_TABLE overrides the header's table");
        r.attributes.pop();
        r.header.table = 255;
        assert!(!route(&r).is_main_unicast());
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        r.header.kind = RouteType::Local;
        assert!(!route(&r).is_main_unicast());
        let default = route(&RouteMessage::default());
        assert_eq!((default.dest, default.gateway, default.oif), (None, None, None));
    }

    #[test]
    fn neighbours() {
        let mut n = NeighbourMessage::default();
        n.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::from("fd00::9".parse::<IpAddr>().unwrap())),
            NeighbourAttribute::LinkLayerAddress(vec![0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]),
        ];
        assert_eq!(neighbour(&n), Some(("fd00::9".parse().unwrap(), vec![0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff])));
        n.attributes.pop();
        assert_eq!(neighbour(&n), None, "no link-layer address");
    }
}
