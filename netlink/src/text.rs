//! Addresses as text, the way Kata's agent API carries them: MACs `aa:bb:cc:dd:ee:ff`, an IP
//! address with a prefix length or (IPv4) a dotted netmask, route destinations in CIDR form.
//! Errors are messages naming the value; callers add what it belonged to.

use std::net::{IpAddr, Ipv4Addr};

/// `aa:bb:cc:dd:ee:ff` (lower case).
pub fn format_mac(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case): six two-digit hex bytes.
pub fn parse_mac(s: &str) -> Result<Vec<u8>, String> {
    let bytes: Vec<u8> =
        s.split(':').filter_map(|p| if p.len() == 2 { u8::from_str_radix(p, 16).ok() } else { None }).collect();
    if bytes.len() != 6 || s.split(':').count() != 6 {
        return Err(format!("MAC address {s:?} is not of the form aa:bb:cc:dd:ee:ff"));
    }
    Ok(bytes)
}

/// An address and its mask → (address, prefix length). `mask` is a prefix length (Kata's), a
/// dotted netmask (IPv4 only), or empty for a host address (/32, /128).
pub fn parse_ip_prefix(address: &str, mask: &str) -> Result<(IpAddr, u8), String> {
    let bad = |why: &str| format!("address {address:?}/{mask:?}: {why}");
    let ip: IpAddr = address.parse().map_err(|_| bad("not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = if mask.is_empty() {
        max
    } else if let Ok(p) = mask.parse::<u8>() {
        p
    } else if let (true, Ok(m)) = (ip.is_ipv4(), mask.parse::<Ipv4Addr>()) {
        let bits = u32::from(m);
        if bits.leading_ones() + bits.trailing_zeros() != 32 {
            return Err(bad("netmask is not contiguous"));
        }
        bits.leading_ones() as u8
    } else {
        return Err(bad("mask is not a prefix length"));
    };
    if prefix > max {
        return Err(bad("prefix length too large"));
    }
    Ok((ip, prefix))
}

/// A route destination: `""` or `"default"` is the default route (`None`); else an address
/// with an optional `/prefix`. With a prefix, its family must be the route's (`ipv6`).
pub fn parse_route_dest(dest: &str, ipv6: bool) -> Result<Option<(IpAddr, u8)>, String> {
    if dest.is_empty() || dest == "default" {
        return Ok(None);
    }
    let (ip, prefix) = dest.split_once('/').unwrap_or((dest, ""));
    let parsed =
        parse_ip_prefix(ip, prefix).map_err(|_| format!("route destination {dest:?} is not an address or CIDR"))?;
    if parsed.0.is_ipv6() != ipv6 && !prefix.is_empty() {
        return Err(format!("route destination {dest:?} does not match the route's family"));
    }
    Ok(Some(parsed))
}

/// IPv4 `169.254/16`, IPv6 `fe80::/10`: addresses the guest kernel makes on its own.
pub fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Link-local or IPv6 multicast (`ff00::/8`): routes the guest kernel keeps on its own.
pub fn is_kernel_route_dest(ip: &IpAddr) -> bool {
    is_link_local(ip) || matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xff00 == 0xff00)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(parse_mac("02:42:AC:11:00:02").unwrap(), [2, 0x42, 0xac, 0x11, 0, 2]);
        assert_eq!(format_mac(&[2, 0x42, 0xac, 0x11, 0, 2]), "02:42:ac:11:00:02");
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "zz:42:ac:11:00:02",
            "2:42:ac:11:00:02",
            "02:42:ac:11:00:002",
        ] {
            let e = parse_mac(bad).unwrap_err();
            assert!(e.contains("aa:bb:cc:dd:ee:ff") && e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn ip_addresses_with_prefix_or_netmask() {
        assert_eq!(parse_ip_prefix("10.200.1.2", "24").unwrap(), ("10.200.1.2".parse().unwrap(), 24));
        assert_eq!(parse_ip_prefix("10.200.1.2", "255.255.255.0").unwrap().1, 24);
        assert_eq!(parse_ip_prefix("10.200.1.2", "0.0.0.0").unwrap().1, 0);
        assert_eq!(parse_ip_prefix("fd00::2", "64").unwrap(), ("fd00::2".parse().unwrap(), 64));
        assert_eq!(parse_ip_prefix("10.0.0.1", "").unwrap().1, 32);
        assert_eq!(parse_ip_prefix("fd00::1", "").unwrap().1, 128);
        for (addr, mask, why) in [
            ("10.0.0.1", "33", "too large"),
            ("fd00::1", "129", "too large"),
            ("nope", "24", "not an IP address"),
            ("10.0.0.1", "255.0.255.0", "not contiguous"),
            ("fd00::1", "ffff::", "not a prefix length"),
            ("fd00::1", "255.255.0.0", "not a prefix length"),
        ] {
            let e = parse_ip_prefix(addr, mask).unwrap_err();
            assert!(e.contains(addr) && e.contains(why), "{e}");
        }
    }

    #[test]
    fn route_destinations() {
        assert_eq!(parse_route_dest("", false).unwrap(), None);
        assert_eq!(parse_route_dest("default", true).unwrap(), None);
        assert_eq!(parse_route_dest("10.200.1.0/24", false).unwrap(), Some(("10.200.1.0".parse().unwrap(), 24)));
        assert_eq!(parse_route_dest("10.200.1.7", false).unwrap(), Some(("10.200.1.7".parse().unwrap(), 32)));
        assert_eq!(parse_route_dest("fd00::/8", true).unwrap(), Some(("fd00::".parse().unwrap(), 8)));
        assert!(parse_route_dest("10.0.0.0/40", false).unwrap_err().contains("10.0.0.0/40"));
        assert!(parse_route_dest("fd00::/8", false).unwrap_err().contains("family"));
        assert!(parse_route_dest("fd00::1", false).is_ok(), "a host route's family follows its address");
    }

    #[test]
    fn kernel_owned_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(is_link_local(&ip("fe80::1")) && is_link_local(&ip("169.254.3.4")));
        assert!(!is_link_local(&ip("ff02::1")) && !is_link_local(&ip("fd00::1")) && !is_link_local(&ip("10.0.0.1")));
        assert!(is_kernel_route_dest(&ip("ff00::")) && is_kernel_route_dest(&ip("fe80::")));
        assert!(!is_kernel_route_dest(&ip("fd00::")) && !is_kernel_route_dest(&ip("224.0.0.0")));
    }
}
