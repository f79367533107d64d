//! Which provider, TLS issuer and pod tunnel serve a `CLOUD_PROVIDER`.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::Config;
use crate::interfaces::{PodTunnel, PodvmTls, TlsIssuer, TunnelSpec, TunnelState};
use crate::service::{self, Deps};

/// Per-podvm TLS material from [`crate::tls`].
struct RcgenTls;

impl TlsIssuer for RcgenTls {
    fn issue(&self, name: &str) -> Result<PodvmTls, String> {
        let t = crate::tls::generate_unaddressed(name).map_err(|e| e.0)?;
        Ok(PodvmTls {
            ca_cert: t.ca_cert_pem,
            server_cert: t.server_cert_pem,
            server_key: t.server_key_pem,
            client_cert: t.client_cert_pem,
            client_key: t.client_key_pem,
        })
    }
}

/// The VXLAN tunnel of [`crate::net::tunnel`], with `underlay` as the worker's device.
struct VxlanTunnel {
    underlay: String,
}

#[async_trait]
impl PodTunnel for VxlanTunnel {
    async fn pod_mac(&self, netns: &Path) -> Result<String, String> {
        let p = netns.to_owned();
        tokio::task::spawn_blocking(move || crate::net::tunnel::pod_interface(&p))
            .await
            .map_err(|e| e.to_string())?
            .map(|t| t.pod_mac)
            .map_err(|e| e.0)
    }

    async fn setup(&self, s: &TunnelSpec) -> Result<TunnelState, String> {
        let plan = crate::net::tunnel::TunnelPlan {
            vni: s.vni,
            remote: s.remote,
            port: s.port,
            underlay: self.underlay.clone(),
            mtu: service::TUNNEL_MTU,
        };
        let ns = s.netns.clone();
        tokio::task::spawn_blocking(move || crate::net::tunnel::setup(&ns, &plan))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.0)?;
        Ok(TunnelState { spec: s.clone(), devices: vec!["vxlan0".into()] })
    }

    async fn teardown(&self, st: &TunnelState) -> Result<(), String> {
        let ns = st.spec.netns.clone();
        tokio::task::spawn_blocking(move || crate::net::tunnel::teardown(&ns))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.0)
    }
}

/// Builds the service's dependencies for `cfg.cloud_provider` (only `qemu` is built; the others
/// are described in `docs/peer-pods.md`). Must run inside a tokio runtime.
pub fn build(cfg: &Config, log: &slog::Logger) -> Result<Deps, String> {
    match cfg.cloud_provider.as_str() {
        "qemu" => {
            let owner = service::default_owner();
            let settings =
                crate::qemu::QemuSettings::from_env(&cfg.provider_settings, cfg.state_dir.clone(), owner.clone())
                    .map_err(|e| e.0)?;
            let underlay = settings.bridge.name.clone();
            let provider = Arc::new(crate::qemu::QemuProvider::new(settings).map_err(|e| e.0)?);
            Ok(Deps {
                provider,
                tls: Arc::new(RcgenTls),
                tunnel: Arc::new(VxlanTunnel { underlay }),
                proxy_exe: std::env::current_exe()
                    .map_err(|e| format!("cannot find this binary for the proxy: {e}"))?,
                sbs_dir: "/run/vc/sbs".into(),
                agent_port: service::AGENT_PORT,
                owner,
                log: log.clone(),
            })
        }
        other => Err(format!(
            "CLOUD_PROVIDER={other}: this build of podvisor-remote-hypervisor has the qemu provider only \
             (docs/peer-pods.md shows what aws, azure, gcp and libvirt providers would call); set CLOUD_PROVIDER=qemu"
        )),
    }
}
