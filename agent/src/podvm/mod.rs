//! Podvm mode (peer pods), selected by `agent.podvm` on the kernel command line: the VM has no
//! vsock and is reached over the network. At boot the agent reads its user data from fw_cfg
//! ([`fwcfg`], validated by [`config`]), configures the underlay NIC `pvm0` and the pod tunnel
//! `vxlan0` ([`net`]), serves ttrpc on [`AGENT_SOCKET`] instead of vsock, and forwards mutual-TLS
//! connections on the user data's `listen_port` (15150) to it ([`tls`]). The TLS key stays in
//! memory only; `qemu_fw_cfg` is unloaded after the read so the sysfs entry holding it is gone.

pub mod config;
pub mod fwcfg;
pub mod net;
pub mod tls;

use std::path::Path;
use std::time::{Duration, Instant};

use slog::{info, warn, Logger};

/// The kernel parameter selecting podvm mode.
pub const CMDLINE_FLAG: &str = "agent.podvm";

/// The ttrpc server's socket in podvm mode.
pub const AGENT_SOCKET: &str = "/run/kata-agent/agent.sock";

/// How long the user data and the underlay NIC may take to appear.
const WAIT: Duration = Duration::from_secs(10);

/// Whether the kernel command line selects podvm mode.
pub fn enabled(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == CMDLINE_FLAG)
}

/// The ttrpc listen address in podvm mode.
pub fn listen_addr() -> String {
    format!("unix://{AGENT_SOCKET}")
}

/// Boot-time setup (blocking; PID 1 before the runtime serves): reads and validates the user
/// data, configures `pvm0` and `vxlan0`, and prepares the agent socket's directory. Any error is
/// fatal for the caller: a podvm nobody can reach is useless.
pub fn setup(log: &Logger, modules_dir: &Path) -> Result<config::UserData, String> {
    let started = Instant::now();
    fwcfg::load_module(modules_dir)?;
    let bytes = fwcfg::read_bounded(Path::new(fwcfg::FW_CFG_PATH), WAIT);
    // The key material is kept in memory only: unload the module so the sysfs entry is gone,
    // whether the read worked or not.
    match fwcfg::unload_module() {
        Ok(()) => info!(log, "podvm: qemu_fw_cfg unloaded; the user data is gone from sysfs"),
        Err(e) => warn!(log, "podvm: the user data stays readable in sysfs"; "error" => e),
    }
    let user_data = config::parse(&bytes?)?;
    let underlay = net::setup_underlay(&user_data.network, WAIT)?;
    crate::network::protect_link(net::UNDERLAY);
    if let Some(t) = &user_data.tunnel {
        // Load vxlan (and udp_tunnel, ip6_udp_tunnel) before creating the link; the kernel's
        // on-demand request would do it too, but this way a failure names the module.
        let index = crate::modprobe::Index::load(modules_dir).map_err(|e| format!("module index: {e}"))?;
        crate::modprobe::probe(&index, "vxlan", "").map_err(|e| format!("load vxlan: {e}"))?;
        net::setup_tunnel(t, underlay)?;
    }
    let dir = Path::new(AGENT_SOCKET).parent().expect("the socket has a directory");
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    if let Some(auth) = &user_data.registry_auth {
        // Where the image pull takes its default credentials from (`image::PODVM_AUTH_FILE`),
        // readable by root only, in a directory no container sees.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = Path::new(crate::image::PODVM_AUTH_FILE);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut f| f.write_all(auth.as_bytes()))
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    info!(log, "podvm configured";
        "underlay" => format!("{} {}/{}", net::UNDERLAY, user_data.network.address, user_data.network.prefix),
        "tunnel" => user_data.tunnel.as_ref().map(|t| format!("{} vni {} remote {}", net::TUNNEL, t.vni, t.remote)),
        "listen_port" => user_data.listen_port,
        "elapsed_ms" => started.elapsed().as_millis() as u64);
    Ok(user_data)
}

/// Starts the mutual-TLS forwarder on the underlay address (not on the pod's interface).
pub async fn start_forwarder(log: Logger, user_data: &config::UserData) -> Result<(), String> {
    let addr = std::net::SocketAddr::new(user_data.network.address, user_data.listen_port);
    tls::start(log, &user_data.tls, addr, AGENT_SOCKET.into()).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podvm_mode_comes_from_the_kernel_command_line() {
        assert!(enabled("console=ttyS0 agent.podvm quiet"));
        assert!(!enabled("console=ttyS0 quiet"));
        assert!(!enabled("agent.podvmx agent.podvm=0 xagent.podvm"));
        assert_eq!(listen_addr(), "unix:///run/kata-agent/agent.sock");
    }
}
