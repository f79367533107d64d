//! Which provider, TLS issuer and pod tunnel serve a `CLOUD_PROVIDER`.

use crate::config::Config;
use crate::service::Deps;

/// Builds the service's dependencies for `cfg.cloud_provider`.
///
/// The `qemu` provider (`crate::qemu`), its TLS issuer (`crate::tls`) and the worker tunnel
/// (`crate::net`) are written separately; until they are wired in here, `serve` stops with this
/// error instead of serving requests it cannot carry out.
pub fn build(cfg: &Config, _log: &slog::Logger) -> Result<Deps, String> {
    Err(format!(
        "CLOUD_PROVIDER={}: this build of podvisor-remote-hypervisor has no {} provider wired in (see src/wiring.rs)",
        cfg.cloud_provider, cfg.cloud_provider
    ))
}
