//! The worker side of the pod tunnel on real netlink, without a VM: a "node" netns routes to a
//! "pod" netns over a veth (`eth0` in the pod, as CNI makes it); a "podvm" netns sits on a test
//! bridge with its own `vxlan0` that carries the pod's MAC and IP. With the tunnel up, the node's
//! pings of the pod IP are answered by the podvm netns; teardown leaves `eth0` alone and nothing
//! else behind. Needs root (netns, links); the scaffolding uses `ip`, the code under test netlink.

use std::path::PathBuf;
use std::process::Command;

use podvisor_remote_hypervisor::net::{bridge, tunnel};

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// ICMP echo (there is no `ping` binary on the test host): `count` requests from netns `ns`,
/// returns how many were answered.
const PING: &str = r#"
import socket, struct, sys, time
dst, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(3)
def csum(b):
    b += b"\0" * (len(b) % 2)
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xffff); t += t >> 16
    return ~t & 0xffff
ok = 0
for seq in range(count):
    body = struct.pack("!BBHHH", 8, 0, 0, 0x5056, seq) + b"podvisor"
    s.sendto(struct.pack("!BBHHH", 8, 0, csum(body), 0x5056, seq) + b"podvisor", (dst, 0))
    end = time.time() + 3
    while time.time() < end:
        try:
            pkt, addr = s.recvfrom(2048)
        except socket.timeout:
            break
        ihl = (pkt[0] & 15) * 4
        t, _, _, ident, sq = struct.unpack("!BBHHH", pkt[ihl:ihl + 8])
        if addr[0] == dst and t == 0 and ident == 0x5056 and sq == seq:
            ok += 1
            break
print(ok)
"#;

fn ping(ns: &str, dst: &str, count: u32) -> u32 {
    sh(&["ip", "netns", "exec", ns, "python3", "-c", PING, dst, &count.to_string()]).trim().parse().unwrap()
}

fn sh_ok(args: &[&str]) -> bool {
    Command::new(args[0]).args(&args[1..]).output().is_ok_and(|o| o.status.success())
}

/// Everything the test makes; removed on drop, also when the test fails.
struct Scaffold {
    tag: String,
    bridge: String,
}

impl Scaffold {
    fn ns(&self, which: &str) -> String {
        format!("pvt-{which}-{}", self.tag)
    }
}

impl Drop for Scaffold {
    fn drop(&mut self) {
        for which in ["pod", "vm", "node"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(which)]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &format!("pvt{}h", self.tag)]).output();
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
    }
}

#[test]
fn pod_ip_is_answered_by_the_podvm_through_the_tunnel() {
    assert!(nix::unistd::geteuid().is_root(), "this test needs root (network namespaces, links, tc)");
    assert!(sh_ok(&["ip", "-V"]), "this test needs iproute2's `ip` for its scaffolding");
    assert!(sh_ok(&["python3", "-V"]), "this test needs python3 (its ICMP echo client)");
    let tag = format!("{}", std::process::id() % 100000);
    let s = Scaffold { tag: tag.clone(), bridge: format!("pvtbr{tag}") };
    let (pod, vm, node) = (s.ns("pod"), s.ns("vm"), s.ns("node"));
    for n in [&pod, &vm, &node] {
        sh(&["ip", "netns", "add", n]);
        sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
    }
    // node <-> pod: the CNI's veth; the pod's end is eth0 with the pod IP.
    sh(&["ip", "-n", &node, "link", "add", "nveth", "type", "veth", "peer", "name", "eth0", "netns", &pod]);
    sh(&["ip", "-n", &node, "addr", "add", "10.99.7.1/24", "dev", "nveth"]);
    sh(&["ip", "-n", &node, "link", "set", "nveth", "up"]);
    sh(&["ip", "-n", &pod, "addr", "add", "10.99.7.2/24", "dev", "eth0"]);
    sh(&["ip", "-n", &pod, "link", "set", "eth0", "up"]);

    // The bridge, made by the code under test, and the podvm on it.
    let b = bridge::Bridge::parse(&s.bridge, "172.31.249.1/24").unwrap();
    bridge::ensure_bridge(&b).unwrap();
    bridge::ensure_bridge(&b).expect("idempotent");
    let host_veth = format!("pvt{tag}h");
    sh(&["ip", "link", "add", &host_veth, "type", "veth", "peer", "name", "pvm0", "netns", &vm]);
    sh(&["ip", "link", "set", &host_veth, "master", &s.bridge, "up"]);
    sh(&["ip", "-n", &vm, "addr", "add", "172.31.249.10/24", "dev", "pvm0"]);
    sh(&["ip", "-n", &vm, "link", "set", "pvm0", "up"]);

    let vni = 900_000 + std::process::id() % 50_000;
    let plan = tunnel::TunnelPlan {
        vni,
        remote: "172.31.249.10".parse().unwrap(),
        port: 4789,
        underlay: s.bridge.clone(),
        mtu: 1450,
    };
    let pod_path = PathBuf::from(format!("/run/netns/{pod}"));
    let before = tunnel::pod_interface(&pod_path).unwrap();
    let t = tunnel::setup(&pod_path, &plan).unwrap();
    assert_eq!(before, t);
    let eth0_mac = sh(&["ip", "netns", "exec", &pod, "cat", "/sys/class/net/eth0/address"]);
    assert_eq!(t.pod_mac, eth0_mac.trim());
    assert_eq!(t.pod_mtu, 1500);
    let e = tunnel::setup(&pod_path, &plan).unwrap_err().to_string();
    assert!(e.contains("vxlan0") && e.contains("exists"), "a second setup is refused: {e}");

    // The podvm's end, as the agent makes it: vxlan0 with the pod's MAC and IP.
    let vnis = vni.to_string();
    sh(&[
        "ip",
        "-n",
        &vm,
        "link",
        "add",
        "vxlan0",
        "type",
        "vxlan",
        "id",
        &vnis,
        "remote",
        "172.31.249.1",
        "dstport",
        "4789",
        "dev",
        "pvm0",
    ]);
    sh(&["ip", "-n", &vm, "link", "set", "vxlan0", "address", &t.pod_mac, "mtu", "1450", "up"]);
    sh(&["ip", "-n", &vm, "addr", "add", "10.99.7.2/24", "dev", "vxlan0"]);

    assert_eq!(ping(&node, "10.99.7.2", 3), 3, "the pod IP answers through the tunnel");
    let rx: u64 =
        sh(&["ip", "netns", "exec", &vm, "cat", "/sys/class/net/vxlan0/statistics/rx_packets"]).trim().parse().unwrap();
    assert!(rx >= 3, "the podvm's vxlan0 received the pings (rx_packets = {rx})");

    tunnel::teardown(&pod_path).unwrap();
    tunnel::teardown(&pod_path).expect("idempotent");
    let links = sh(&["ip", "-n", &pod, "-o", "link"]);
    assert!(links.contains("eth0@") && !links.contains("vxlan0"), "{links}");
    let qdiscs = sh(&["ip", "netns", "exec", &pod, "tc", "qdisc", "show", "dev", "eth0", "ingress"]);
    assert!(qdiscs.trim().is_empty(), "{qdiscs}");
    let host_links = sh(&["ip", "-o", "link"]);
    assert!(!host_links.contains(&format!("vx{vni}")), "no VXLAN device is left in the worker's netns");
    // Without the tunnel the node no longer reaches the podvm: the pod netns answers itself again.
    let rx_before: u64 =
        sh(&["ip", "netns", "exec", &vm, "cat", "/sys/class/net/vxlan0/statistics/rx_packets"]).trim().parse().unwrap();
    assert_eq!(ping(&node, "10.99.7.2", 1), 1);
    let rx_after: u64 =
        sh(&["ip", "netns", "exec", &vm, "cat", "/sys/class/net/vxlan0/statistics/rx_packets"]).trim().parse().unwrap();
    assert_eq!(rx_after, rx_before, "nothing reaches the podvm after teardown");
    drop(s);
    assert!(!sh(&["ip", "-o", "link"]).contains(&format!("pvtbr{tag}")));
}
