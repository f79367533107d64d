//! The podvm user data (JSON, delivered by the remote hypervisor service through QEMU's fw_cfg or
//! a cloud's user data): parsed strictly, every error naming the field and what it wants.
//! The schema is fixed in `/work/issue12-contract.md` ("Podvm user data").

use std::net::IpAddr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// The largest user data accepted (the read is bounded to this).
pub const MAX_USER_DATA: usize = 64 * 1024;

/// The schema version this agent understands.
pub const VERSION: u32 = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUserData {
    version: u32,
    network: RawNetwork,
    listen_port: u32,
    tls: RawTls,
    #[serde(default)]
    tunnel: Option<RawTunnel>,
    #[serde(default)]
    registry_auth: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    mac: String,
    address: String,
    gateway: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca_cert: String,
    server_cert: String,
    server_key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    #[serde(rename = "type")]
    kind: String,
    vni: u32,
    remote: String,
    port: u32,
    pod_mac: String,
    mtu: u32,
}

/// The underlay NIC (virtio-net on the worker's bridge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// The NIC's MAC (how the agent finds it).
    pub mac: Vec<u8>,
    /// Its address and prefix length.
    pub address: IpAddr,
    /// Prefix length of `address`.
    pub prefix: u8,
    /// The worker side of the subnet (the VXLAN remote and the registry live there).
    pub gateway: IpAddr,
}

/// The pod network tunnel to the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    /// VXLAN network identifier (24 bits).
    pub vni: u32,
    /// The worker's underlay address.
    pub remote: IpAddr,
    /// UDP destination port.
    pub port: u16,
    /// The pod's MAC (the worker's eth0 in the pod netns); the shim's UpdateInterface finds
    /// the device by it.
    pub pod_mac: Vec<u8>,
    /// Device MTU.
    pub mtu: u32,
}

/// The TLS material, in memory only.
pub struct Tls {
    /// Roots for client certificates.
    pub ca: Vec<CertificateDer<'static>>,
    /// The server chain (leaf first).
    pub server_chain: Vec<CertificateDer<'static>>,
    /// The server key (PKCS#8).
    pub server_key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Tls")
            .field("ca", &self.ca.len())
            .field("server_chain", &self.server_chain.len())
            .finish_non_exhaustive()
    }
}

/// The validated user data.
#[derive(Debug)]
pub struct UserData {
    /// The underlay NIC.
    pub network: Underlay,
    /// TCP port of the mutual-TLS listener.
    pub listen_port: u16,
    /// TLS material.
    pub tls: Tls,
    /// The pod network tunnel, when the service sets one up.
    pub tunnel: Option<Tunnel>,
    /// Registry credentials for image pulls (a containers `auth.json`, as JSON text).
    pub registry_auth: Option<String>,
}

/// Parses and validates user data; errors name the field (`network.mac`, `tls.ca_cert`, ...).
pub fn parse(bytes: &[u8]) -> Result<UserData, String> {
    if bytes.len() > MAX_USER_DATA {
        return Err(format!("user data is {} bytes; at most {MAX_USER_DATA} are accepted", bytes.len()));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let raw: RawUserData = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            format!("user data: {}", e.inner())
        } else {
            format!("user data field {path}: {}", e.inner())
        }
    })?;
    if raw.version != VERSION {
        return Err(format!(
            "user data field version: {} is not supported (this agent reads version {VERSION})",
            raw.version
        ));
    }
    let network = underlay(&raw.network)?;
    let listen_port = port("listen_port", raw.listen_port)?;
    let tls = tls(&raw.tls)?;
    let tunnel = raw.tunnel.as_ref().map(|t| tunnel(t, &network)).transpose()?;
    let registry_auth = match &raw.registry_auth {
        None => None,
        Some(v) if v.get("auths").is_some_and(serde_json::Value::is_object) => Some(v.to_string()),
        Some(_) => {
            return Err("user data field registry_auth: not a containers auth.json (an object with \"auths\")".into())
        }
    };
    Ok(UserData { network, listen_port, tls, tunnel, registry_auth })
}

fn field_err(field: &str, value: &str, want: &str) -> String {
    format!("user data field {field}: {value:?} is not {want}")
}

fn mac(field: &str, s: &str) -> Result<Vec<u8>, String> {
    let m = netlink::text::parse_mac(s).map_err(|_| field_err(field, s, "a MAC address (like 52:54:00:12:34:56)"))?;
    if m.len() != 6 || m[0] & 1 == 1 || m.iter().all(|b| *b == 0) {
        return Err(field_err(field, s, "a unicast Ethernet MAC address (like 52:54:00:12:34:56)"));
    }
    Ok(m)
}

fn port(field: &str, p: u32) -> Result<u16, String> {
    match u16::try_from(p) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("user data field {field}: {p} is not a port (1 to 65535)")),
    }
}

fn ip(field: &str, s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| field_err(field, s, "an IP address (like 172.31.250.1)"))
}

/// Whether `a` lies in `net/prefix`.
fn in_subnet(a: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (a, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

fn underlay(n: &RawNetwork) -> Result<Underlay, String> {
    let mac = mac("network.mac", &n.mac)?;
    let want = "an address with a prefix length (like 172.31.250.10/24)";
    let (addr, len) = n.address.split_once('/').ok_or_else(|| field_err("network.address", &n.address, want))?;
    let address: IpAddr = addr.parse().map_err(|_| field_err("network.address", &n.address, want))?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix = match len.parse::<u8>() {
        Ok(p) if p > 0 && p <= max => p,
        _ => return Err(field_err("network.address", &n.address, want)),
    };
    if address.is_unspecified() || address.is_multicast() || address.is_loopback() {
        return Err(field_err("network.address", &n.address, "a unicast host address"));
    }
    let gateway = ip("network.gateway", &n.gateway)?;
    if !in_subnet(gateway, address, prefix) || gateway == address {
        return Err(format!(
            "user data field network.gateway: {} is not another address in network.address's subnet {}",
            n.gateway, n.address
        ));
    }
    Ok(Underlay { mac, address, prefix, gateway })
}

fn tunnel(t: &RawTunnel, net: &Underlay) -> Result<Tunnel, String> {
    if t.kind != "vxlan" {
        return Err(field_err("tunnel.type", &t.kind, "a supported tunnel type (\"vxlan\")"));
    }
    if t.vni == 0 || t.vni >= 1 << 24 {
        return Err(format!("user data field tunnel.vni: {} is not a VXLAN network identifier (1 to 16777215)", t.vni));
    }
    let remote = ip("tunnel.remote", &t.remote)?;
    if !in_subnet(remote, net.address, net.prefix) || remote == net.address {
        return Err(format!(
            "user data field tunnel.remote: {} is not reachable on the underlay subnet {}/{} (network.address)",
            t.remote, net.address, net.prefix
        ));
    }
    let port = port("tunnel.port", t.port)?;
    let pod_mac = mac("tunnel.pod_mac", &t.pod_mac)?;
    if pod_mac == net.mac {
        return Err(format!(
            "user data field tunnel.pod_mac: {} is also network.mac; the pod needs its own MAC",
            t.pod_mac
        ));
    }
    if !(68..=65535).contains(&t.mtu) {
        return Err(format!("user data field tunnel.mtu: {} is not an MTU (68 to 65535)", t.mtu));
    }
    Ok(Tunnel { vni: t.vni, remote, port, pod_mac, mtu: t.mtu })
}

fn certs(field: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("user data field {field}: not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("user data field {field}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

fn tls(t: &RawTls) -> Result<Tls, String> {
    let ca = certs("tls.ca_cert", &t.ca_cert)?;
    let server_chain = certs("tls.server_cert", &t.server_cert)?;
    let key = PrivateKeyDer::from_pem_slice(t.server_key.as_bytes())
        .map_err(|e| format!("user data field tls.server_key: not a PEM private key (PKCS#8 wanted): {e}"))?;
    let tls = Tls { ca, server_chain, server_key: Arc::new(key) };
    // Build the server configuration once, so that a key that does not match the certificate
    // or a CA rustls cannot use is reported here, naming the field.
    super::tls::server_config(&tls)?;
    Ok(tls)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A self-signed CA, a server certificate (SAN 172.31.251.10 and 127.0.0.1) and a client
    /// certificate it signed, a client certificate of another CA (other.*), generated once with
    /// openssl for these tests (P-256, valid for 100 years).
    pub(crate) const CA: &str = include_str!("testdata/ca.pem");
    pub(crate) const SERVER_CERT: &str = include_str!("testdata/server.pem");
    pub(crate) const SERVER_KEY: &str = include_str!("testdata/server.key");
    const OTHER_KEY: &str = include_str!("testdata/other.key");

    pub(crate) fn sample() -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "network": { "mac": "52:54:00:12:34:56", "address": "172.31.251.10/24", "gateway": "172.31.251.1" },
            "listen_port": 15150,
            "tls": { "ca_cert": CA, "server_cert": SERVER_CERT, "server_key": SERVER_KEY },
            "tunnel": { "type": "vxlan", "vni": 555001, "remote": "172.31.251.1", "port": 4789,
                        "pod_mac": "aa:bb:cc:dd:ee:f0", "mtu": 1450 }
        })
    }

    fn err_with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v = sample();
        edit(&mut v);
        parse(v.to_string().as_bytes()).unwrap_err()
    }

    #[test]
    fn a_complete_user_data_parses() {
        let u = parse(sample().to_string().as_bytes()).unwrap();
        assert_eq!(u.network.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!((u.network.address.to_string(), u.network.prefix), ("172.31.251.10".into(), 24));
        assert_eq!(u.listen_port, 15150);
        let t = u.tunnel.unwrap();
        assert_eq!((t.vni, t.port, t.mtu, t.remote.to_string()), (555001, 4789, 1450, "172.31.251.1".into()));
        assert_eq!(t.pod_mac, [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xf0]);
        assert_eq!((u.tls.ca.len(), u.tls.server_chain.len()), (1, 1));
        assert!(!format!("{:?}", u.tls).contains("PRIVATE"), "the key is never printed");
    }

    #[test]
    fn registry_credentials_are_taken_when_they_look_like_an_auth_json() {
        assert_eq!(parse(sample().to_string().as_bytes()).unwrap().registry_auth, None);
        let mut v = sample();
        v["registry_auth"] = serde_json::json!({"auths": {"reg:5000": {"auth": "dTpw"}}});
        let auth = parse(v.to_string().as_bytes()).unwrap().registry_auth.unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&auth).unwrap()["auths"]["reg:5000"]["auth"], "dTpw");
        v["registry_auth"] = serde_json::json!({"credHelpers": {}});
        let e = parse(v.to_string().as_bytes()).unwrap_err();
        assert!(e.contains("registry_auth"), "{e}");
    }

    #[test]
    fn the_tunnel_is_optional() {
        let mut v = sample();
        v.as_object_mut().unwrap().remove("tunnel");
        assert!(parse(v.to_string().as_bytes()).unwrap().tunnel.is_none());
    }

    #[test]
    fn errors_name_the_field() {
        type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|v| v["version"] = 2.into()), "field version: 2 is not supported"),
            (Box::new(|v| v["network"]["mac"] = "zz".into()), "field network.mac: \"zz\" is not a MAC"),
            (
                Box::new(|v| v["network"]["mac"] = "01:00:5e:00:00:01".into()),
                "network.mac: \"01:00:5e:00:00:01\" is not a unicast",
            ),
            (
                Box::new(|v| v["network"]["address"] = "172.31.251.10".into()),
                "network.address: \"172.31.251.10\" is not an address with a prefix",
            ),
            (Box::new(|v| v["network"]["address"] = "172.31.251.10/33".into()), "network.address"),
            (
                Box::new(|v| v["network"]["gateway"] = "10.0.0.1".into()),
                "network.gateway: 10.0.0.1 is not another address",
            ),
            (Box::new(|v| v["listen_port"] = 70000.into()), "field listen_port: 70000 is not a port"),
            (Box::new(|v| v["listen_port"] = 0.into()), "field listen_port: 0 is not a port"),
            (Box::new(|v| v["listen_port"] = "15150".into()), "field listen_port: invalid type"),
            (Box::new(|v| v["tls"]["ca_cert"] = "nope".into()), "field tls.ca_cert: holds no PEM certificate"),
            (Box::new(|v| v["tls"]["server_cert"] = "".into()), "field tls.server_cert: holds no PEM certificate"),
            (Box::new(|v| v["tls"]["server_key"] = "x".into()), "field tls.server_key: not a PEM private key"),
            (Box::new(|v| v["tls"]["server_key"] = OTHER_KEY.into()), "tls.server_key"),
            (Box::new(|v| v["tunnel"]["type"] = "geneve".into()), "field tunnel.type: \"geneve\" is not a supported"),
            (Box::new(|v| v["tunnel"]["vni"] = (1 << 24).into()), "field tunnel.vni: 16777216"),
            (Box::new(|v| v["tunnel"]["vni"] = 0.into()), "field tunnel.vni: 0"),
            (Box::new(|v| v["tunnel"]["remote"] = "10.1.1.1".into()), "field tunnel.remote: 10.1.1.1 is not reachable"),
            (Box::new(|v| v["tunnel"]["port"] = 0.into()), "field tunnel.port: 0"),
            (
                Box::new(|v| v["tunnel"]["pod_mac"] = "52:54:00:12:34:56".into()),
                "tunnel.pod_mac: 52:54:00:12:34:56 is also network.mac",
            ),
            (Box::new(|v| v["tunnel"]["mtu"] = 10.into()), "field tunnel.mtu: 10 is not an MTU"),
            (Box::new(|v| v["tunnel"]["extra"] = 1.into()), "field tunnel.extra: unknown field `extra`"),
            (Box::new(|v| v["bogus"] = 1.into()), "field bogus: unknown field `bogus`"),
            (
                Box::new(|v| {
                    v["network"].as_object_mut().unwrap().remove("mac");
                }),
                "field network: missing field `mac`",
            ),
            (
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("tls");
                }),
                "missing field `tls`",
            ),
        ];
        for (edit, want) in cases {
            let e = err_with(edit);
            assert!(e.contains(want), "want {want:?} in: {e}");
        }
        assert!(parse(b"{not json").unwrap_err().starts_with("user data"), "syntax errors are named too");
        let big = vec![b' '; MAX_USER_DATA + 1];
        assert!(parse(&big).unwrap_err().contains("at most 65536"));
    }
}
