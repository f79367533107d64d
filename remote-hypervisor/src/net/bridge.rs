//! The podvm bridge (`QEMU_BRIDGE`, default `podvisor-pp0`, address `QEMU_BRIDGE_CIDR`, default
//! `172.31.250.1/24`), podvm addresses on its subnet, and one tap `ppt<N>` per podvm attached to
//! it (N = the podvm address's host number, so names never collide while addresses do not).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;

use netlink::{Netlink, RouteNetlinkMessage, NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};

use super::{is_gone, NetError};

/// Default bridge name.
pub const DEFAULT_BRIDGE: &str = "podvisor-pp0";
/// Default bridge address and subnet.
pub const DEFAULT_BRIDGE_CIDR: &str = "172.31.250.1/24";
/// Tap name prefix.
pub const TAP_PREFIX: &str = "ppt";

/// The bridge: its name, the worker's address on it and the subnet's prefix length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    /// Interface name.
    pub name: String,
    /// The worker's address (podvms' gateway, tunnel remote, registry host).
    pub address: Ipv4Addr,
    /// Prefix length of the podvm subnet.
    pub prefix: u8,
}

impl Bridge {
    /// Parses `QEMU_BRIDGE` and `QEMU_BRIDGE_CIDR` values; errors name the key and the fix.
    pub fn parse(name: &str, cidr: &str) -> Result<Bridge, NetError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', ':']) {
            return Err(NetError(format!(
                "QEMU_BRIDGE={name:?} is not a valid interface name (1-15 characters, no '/', ':' or space)"
            )));
        }
        let bad = || {
            NetError(format!(
                "QEMU_BRIDGE_CIDR={cidr:?} is not an IPv4 address with a prefix length of 8 to 30, e.g. {DEFAULT_BRIDGE_CIDR}"
            ))
        };
        let (ip, prefix) = cidr.split_once('/').ok_or_else(bad)?;
        let address: Ipv4Addr = ip.trim().parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.trim().parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        let b = Bridge { name: name.to_string(), address, prefix };
        if address == b.network() || address == b.broadcast() {
            return Err(NetError(format!(
                "QEMU_BRIDGE_CIDR={cidr:?}: {address} is the subnet's network or broadcast address; use a host address such as {}",
                Ipv4Addr::from(u32::from(b.network()) + 1)
            )));
        }
        Ok(b)
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    /// The subnet's network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) & self.mask())
    }

    /// The subnet's broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) | !self.mask())
    }

    /// `true` when `ip` is a host address of the subnet other than the worker's.
    pub fn is_podvm_address(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
            && ip != self.network()
            && ip != self.broadcast()
            && ip != self.address
    }

    /// The lowest free podvm address (host numbers from 2 up), given every address in use.
    /// Pure: the caller gathers `used` (live podvms, creations in flight).
    pub fn allocate(&self, used: &BTreeSet<IpAddr>) -> Result<Ipv4Addr, NetError> {
        let first = u32::from(self.network()) + 2;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| self.is_podvm_address(*ip) && !used.contains(&IpAddr::V4(*ip)))
            .ok_or_else(|| {
                NetError(format!(
                    "no free podvm address on {} ({}/{}): all {} are in use; delete a peer pod or widen QEMU_BRIDGE_CIDR",
                    self.name,
                    self.network(),
                    self.prefix,
                    used.len()
                ))
            })
    }

    /// The tap of the podvm at `ip`: `ppt<host number>`.
    pub fn tap_name(&self, ip: Ipv4Addr) -> String {
        format!("{TAP_PREFIX}{}", u32::from(ip) & !self.mask())
    }

    /// The `address/prefix` a podvm at `ip` is configured with.
    pub fn podvm_cidr(&self, ip: Ipv4Addr) -> String {
        format!("{ip}/{}", self.prefix)
    }
}

/// The MAC of the podvm at `ip`: QEMU's OUI `52:54:00` and the address's last three bytes
/// (unique on a subnet of at most /8).
pub fn podvm_mac(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
}

fn link_index(nl: &mut Netlink, name: &str) -> Result<Option<u32>, NetError> {
    let links = nl.links().map_err(NetError::op("list links"))?;
    Ok(links.iter().find(|l| netlink::read::link(l).name == name).map(|l| l.header.index))
}

fn set_up(nl: &mut Netlink, index: u32, controller: Option<u32>, what: &str) -> Result<(), NetError> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags = LinkFlags::Up;
    m.header.change_mask = LinkFlags::Up;
    if let Some(c) = controller {
        m.attributes.push(LinkAttribute::Controller(c));
    }
    nl.request(RouteNetlinkMessage::SetLink(m), 0).map(|_| ()).map_err(NetError::op(what))
}

/// Creates the bridge if it is missing, gives it its address if it lacks it, and sets it up.
/// Returns its index. Idempotent.
pub fn ensure_bridge(b: &Bridge) -> Result<u32, NetError> {
    let mut nl = Netlink::open().map_err(NetError::op("open a netlink socket"))?;
    let index = match link_index(&mut nl, &b.name)? {
        Some(i) => i,
        None => {
            let mut m = LinkMessage::default();
            m.attributes.push(LinkAttribute::IfName(b.name.clone()));
            m.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Bridge)]));
            match nl.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {} // created concurrently
                Err(e) => {
                    return Err(NetError(format!(
                        "create bridge {} (ip link add {} type bridge): {e}; the service needs CAP_NET_ADMIN",
                        b.name, b.name
                    )))
                }
            }
            link_index(&mut nl, &b.name)?
                .ok_or_else(|| NetError(format!("bridge {} vanished after creation", b.name)))?
        }
    };
    let addrs = nl.addresses().map_err(NetError::op("list addresses"))?;
    let has = addrs
        .iter()
        .filter(|a| a.header.index == index)
        .filter_map(netlink::read::address)
        .any(|(ip, p)| ip == IpAddr::V4(b.address) && p == b.prefix);
    if !has {
        let m = netlink::read::address_message(index, IpAddr::V4(b.address), b.prefix);
        match nl.request(RouteNetlinkMessage::NewAddress(m), NLM_F_CREATE | NLM_F_EXCL) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                return Err(NetError(format!(
                    "add {}/{} to bridge {}: {e}; is the subnet of QEMU_BRIDGE_CIDR already used on another interface?",
                    b.address, b.prefix, b.name
                )))
            }
        }
    }
    set_up(&mut nl, index, None, &format!("set bridge {} up", b.name))?;
    Ok(index)
}

/// Creates tap `name` (not persistent, no multi-queue: it goes when its last fd closes, i.e. with
/// QEMU), attaches it to the bridge and sets it up. The returned fd is QEMU's `-netdev tap,fd=`.
pub fn create_tap(b: &Bridge, name: &str) -> Result<OwnedFd, NetError> {
    let fd = hypervisor::network::open_tap(name)
        .map_err(NetError::op(format!("create tap {name} (TUNSETIFF on /dev/net/tun)")))?;
    let attach = || -> Result<(), NetError> {
        let mut nl = Netlink::open().map_err(NetError::op("open a netlink socket"))?;
        let bridge = link_index(&mut nl, &b.name)?
            .ok_or_else(|| NetError(format!("bridge {} does not exist (ensure_bridge first)", b.name)))?;
        let tap = link_index(&mut nl, name)?.ok_or_else(|| NetError(format!("tap {name} vanished")))?;
        set_up(&mut nl, tap, Some(bridge), &format!("attach tap {name} to {} and set it up", b.name))
    };
    attach()?; // on error `fd` drops and the tap is gone
    Ok(fd)
}

/// Deletes link `name` if it exists (a tap left persistent by someone, a stale device).
pub fn delete_link(name: &str) -> Result<(), NetError> {
    let mut nl = Netlink::open().map_err(NetError::op("open a netlink socket"))?;
    let Some(index) = link_index(&mut nl, name)? else { return Ok(()) };
    let mut m = LinkMessage::default();
    m.header.index = index;
    match nl.request(RouteNetlinkMessage::DelLink(m), 0) {
        Ok(_) => Ok(()),
        Err(e) if is_gone(&e) => Ok(()),
        Err(e) => Err(NetError(format!("delete link {name}: {e}"))),
    }
}

/// `true` when link `name` exists in this netns.
pub fn link_exists(name: &str) -> Result<bool, NetError> {
    let mut nl = Netlink::open().map_err(NetError::op("open a netlink socket"))?;
    Ok(link_index(&mut nl, name)?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allocation_is_the_lowest_free_host_address() {
        let b = Bridge::parse(DEFAULT_BRIDGE, DEFAULT_BRIDGE_CIDR).unwrap();
        assert_eq!(b.allocate(&BTreeSet::new()).unwrap(), Ipv4Addr::new(172, 31, 250, 2));
        let used: BTreeSet<IpAddr> = [ip("172.31.250.2"), ip("172.31.250.3"), ip("10.0.0.4")].into();
        assert_eq!(b.allocate(&used).unwrap(), Ipv4Addr::new(172, 31, 250, 4));
        // The worker's own address is never handed out, wherever it is in the subnet.
        let mid = Bridge::parse("br", "10.9.0.2/29").unwrap();
        let got: Vec<_> = (0..5)
            .scan(BTreeSet::new(), |used, _| {
                let a = mid.allocate(used).ok()?;
                used.insert(IpAddr::V4(a));
                Some(a.to_string())
            })
            .collect();
        assert_eq!(got, ["10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"], "/29: .1 is skipped too (start at .2)");
        let full: BTreeSet<IpAddr> = got.iter().map(|s| ip(s)).collect();
        let e = mid.allocate(&full).unwrap_err().to_string();
        assert!(e.contains("no free podvm address") && e.contains("QEMU_BRIDGE_CIDR"), "{e}");
    }

    #[test]
    fn names_and_macs() {
        let b = Bridge::parse("pp0", "172.31.250.1/24").unwrap();
        let a = Ipv4Addr::new(172, 31, 250, 17);
        assert_eq!(b.tap_name(a), "ppt17");
        assert_eq!(b.podvm_cidr(a), "172.31.250.17/24");
        assert_eq!(podvm_mac(a), "52:54:00:1f:fa:11");
        let wide = Bridge::parse("pp0", "10.20.0.1/16").unwrap();
        assert_eq!(wide.tap_name(Ipv4Addr::new(10, 20, 3, 4)), "ppt772");
    }

    #[test]
    fn bad_settings_are_named() {
        for (n, c, want) in [
            ("", "172.31.250.1/24", "QEMU_BRIDGE="),
            ("a-very-long-bridge-name", "172.31.250.1/24", "QEMU_BRIDGE="),
            ("pp0", "172.31.250.1", "QEMU_BRIDGE_CIDR="),
            ("pp0", "172.31.250.1/31", "QEMU_BRIDGE_CIDR="),
            ("pp0", "fd00::1/64", "QEMU_BRIDGE_CIDR="),
            ("pp0", "172.31.250.0/24", "network or broadcast"),
        ] {
            let e = Bridge::parse(n, c).unwrap_err().to_string();
            assert!(e.contains(want), "{n} {c}: {e}");
        }
    }
}
