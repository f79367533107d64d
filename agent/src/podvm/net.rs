//! The podvm's own networking: the underlay NIC (renamed `pvm0`, its address, the subnet route
//! only: no default route) and the pod tunnel `vxlan0` (MAC = the pod's, MTU, up, no address;
//! the shim's UpdateInterface later names it `eth0` and gives it the pod IP).

use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use netlink::{read, Netlink};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;

use super::config::{Tunnel, Underlay};

/// The underlay NIC's name in the podvm.
pub const UNDERLAY: &str = "pvm0";

/// The tunnel device's name.
pub const TUNNEL: &str = "vxlan0";

fn nl(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> String {
    move |e| format!("{what}: {e}")
}

fn find_by_mac(nl: &mut Netlink, mac: &[u8]) -> Result<Option<LinkMessage>, String> {
    let links = nl.links().map_err(self::nl("list links"))?;
    Ok(links.into_iter().find(|l| read::link(l).mac.as_deref() == Some(mac)))
}

fn set_link(nl: &mut Netlink, index: u32, up: Option<bool>, name: Option<&str>) -> io::Result<()> {
    let mut m = LinkMessage::default();
    m.header.index = index;
    if let Some(up) = up {
        m.header.flags = if up { LinkFlags::Up } else { LinkFlags::empty() };
        m.header.change_mask = LinkFlags::Up;
    }
    if let Some(n) = name {
        m.attributes.push(LinkAttribute::IfName(n.to_string()));
    }
    nl.request(RouteNetlinkMessage::SetLink(m), 0).map(|_| ())
}

/// Finds the NIC with `net.mac` (waiting up to `timeout`: virtio-net may still be probing),
/// renames it `pvm0`, adds the address (the kernel adds the subnet route with it) and sets it up.
/// Returns its interface index.
pub fn setup_underlay(net: &Underlay, timeout: Duration) -> Result<u32, String> {
    let mut nl = Netlink::open().map_err(self::nl("open a netlink socket"))?;
    let shown_mac = netlink::text::format_mac(&net.mac);
    let started = Instant::now();
    let link = loop {
        if let Some(l) = find_by_mac(&mut nl, &net.mac)? {
            break l;
        }
        if started.elapsed() >= timeout {
            let names: Vec<String> = nl.links().unwrap_or_default().iter().map(|l| read::link(l).name).collect();
            return Err(format!(
                "no guest NIC has network.mac {shown_mac} after {timeout:?} (links: {}); the VM needs a virtio-net NIC with that MAC",
                names.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let index = link.header.index;
    let current = read::link(&link).name;
    if current != UNDERLAY {
        set_link(&mut nl, index, Some(false), None).map_err(self::nl(format!("set {current} down")))?;
        set_link(&mut nl, index, None, Some(UNDERLAY)).map_err(self::nl(format!("rename {current} to {UNDERLAY}")))?;
    }
    let shown = format!("{}/{}", net.address, net.prefix);
    nl.request(
        RouteNetlinkMessage::NewAddress(read::address_message(index, net.address, net.prefix)),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map_err(self::nl(format!("add address {shown} to {UNDERLAY}")))?;
    set_link(&mut nl, index, Some(true), None).map_err(self::nl(format!("set {UNDERLAY} up")))?;
    Ok(index)
}

/// Creates `vxlan0` (`id <vni> remote <remote> dstport <port> dev pvm0`) with the pod's MAC and
/// MTU, and sets it up. Needs the `vxlan` module (loaded by the caller, or on demand).
pub fn setup_tunnel(t: &Tunnel, underlay_index: u32) -> Result<(), String> {
    let mut nl = Netlink::open().map_err(self::nl("open a netlink socket"))?;
    let mut data = vec![InfoVxlan::Id(t.vni), InfoVxlan::Link(underlay_index), InfoVxlan::Port(t.port)];
    match t.remote {
        IpAddr::V4(a) => data.push(InfoVxlan::Group(a)),
        IpAddr::V6(a) => data.push(InfoVxlan::Group6(a)),
    }
    let mut m = LinkMessage::default();
    m.attributes = vec![
        LinkAttribute::IfName(TUNNEL.into()),
        LinkAttribute::Address(t.pod_mac.clone()),
        LinkAttribute::Mtu(t.mtu),
        LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Vxlan), LinkInfo::Data(InfoData::Vxlan(data))]),
    ];
    let shown = format!(
        "create {TUNNEL} (vxlan id {} remote {} dstport {} dev {UNDERLAY} address {} mtu {})",
        t.vni,
        t.remote,
        t.port,
        netlink::text::format_mac(&t.pod_mac),
        t.mtu
    );
    nl.request(RouteNetlinkMessage::NewLink(m), NLM_F_CREATE | NLM_F_EXCL).map_err(self::nl(shown))?;
    let link = find_by_mac(&mut nl, &t.pod_mac)?.ok_or_else(|| format!("{TUNNEL} vanished after creation"))?;
    set_link(&mut nl, link.header.index, Some(true), None).map_err(self::nl(format!("set {TUNNEL} up")))
}

/// Against a real kernel, in a thread with its own network namespace (gone with the thread).
#[cfg(test)]
mod netns_tests {
    use super::*;

    fn sh(cmd: &str) -> String {
        let out = std::process::Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn underlay_and_tunnel_come_up_and_the_pod_calls_leave_pvm0_alone() {
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) needs root");
            sh("ip link add pvu0 address 52:54:00:0a:0b:0c type veth peer name pvu1 && ip link set pvu1 up");
            let net = Underlay {
                mac: vec![0x52, 0x54, 0, 0x0a, 0x0b, 0x0c],
                address: "172.31.251.10".parse().unwrap(),
                prefix: 24,
                gateway: "172.31.251.1".parse().unwrap(),
            };
            let e =
                setup_underlay(&Underlay { mac: vec![2, 0, 0, 0, 0, 9], ..net.clone() }, Duration::from_millis(100))
                    .unwrap_err();
            assert!(e.contains("no guest NIC has network.mac 02:00:00:00:00:09") && e.contains("pvu0"), "{e}");
            let index = setup_underlay(&net, Duration::from_secs(1)).unwrap();
            let shown = sh("ip -o addr show dev pvm0");
            assert!(shown.contains("inet 172.31.251.10/24"), "{shown}");
            let routes = sh("ip route show");
            assert_eq!(
                routes.trim(),
                "172.31.251.0/24 dev pvm0 proto kernel scope link src 172.31.251.10",
                "only the subnet"
            );
            // Again (idempotent: an agent restart in the same VM is not a case, but a rerun must not fail).
            assert_eq!(setup_underlay(&net, Duration::from_secs(1)).unwrap(), index);

            let t = Tunnel {
                vni: 555001,
                remote: "172.31.251.1".parse().unwrap(),
                port: 4789,
                pod_mac: vec![0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xf0],
                mtu: 1450,
            };
            match setup_tunnel(&t, index) {
                Ok(()) => {}
                // The host kernel may lack VXLAN (no modules on the build host).
                Err(e) if e.contains("Operation not supported") => {
                    panic!("the host kernel has no VXLAN support; this test needs it: {e}")
                }
                Err(e) => panic!("{e}"),
            }
            let d = sh("ip -d link show vxlan0");
            assert!(d.contains("aa:bb:cc:dd:ee:f0") && d.contains("mtu 1450"), "{d}");
            assert!(d.contains("vxlan id 555001 remote 172.31.251.1 dev pvm0") && d.contains("dstport 4789"), "{d}");
            assert!(d.contains(",UP"), "{d}");

            // The shim's calls: UpdateInterface by the pod MAC, then the pod's routes.
            crate::network::protect_link(UNDERLAY);
            use agent_protocol::types::{IPAddress, Interface, Route};
            let eth0 = Interface {
                name: "eth0".into(),
                hwAddr: "aa:bb:cc:dd:ee:f0".into(),
                mtu: 1450,
                IPAddresses: vec![IPAddress { address: "10.88.0.5".into(), mask: "16".into(), ..Default::default() }],
                ..Default::default()
            };
            let got = crate::network::update_interface(&eth0).unwrap();
            assert_eq!((got.name.as_str(), got.mtu), ("eth0", 1450));
            let r = |dest: &str, gw: &str, dev: &str, scope| Route {
                dest: dest.into(),
                gateway: gw.into(),
                device: dev.into(),
                scope,
                ..Default::default()
            };
            let got =
                crate::network::update_routes(&[r("", "10.88.0.1", "eth0", 0), r("10.88.0.0/16", "", "eth0", 253)])
                    .unwrap();
            assert!(
                got.iter().any(|x| x.dest == "172.31.251.0/24" && x.device == "pvm0"),
                "pvm0's route stays: {got:?}"
            );
            assert!(got.iter().any(|x| x.dest.is_empty() && x.device == "eth0"), "{got:?}");
            // The underlay is not the pod's to change.
            let e = crate::network::update_interface(&Interface {
                name: "eth1".into(),
                hwAddr: "52:54:00:0a:0b:0c".into(),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(e.contains("pvm0"), "{e}");
            let e = crate::network::update_interface(&Interface { name: "pvm0".into(), ..eth0.clone() })
                .unwrap_err()
                .to_string();
            assert!(e.contains("pvm0"), "{e}");
            let e =
                crate::network::update_routes(&[r("10.0.0.0/8", "172.31.251.1", "pvm0", 0)]).unwrap_err().to_string();
            assert!(e.contains("pvm0"), "{e}");
            assert!(sh("ip -o addr show dev pvm0").contains("172.31.251.10/24"));
        })
        .join()
        .unwrap();
    }
}
