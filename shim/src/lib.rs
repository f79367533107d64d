//! podvisor's shim library: configuration loading, the agent client and the sandbox layer that
//! puts a VM and its agent together. The `containerd-shim-kata-v2` binary is a thin front end.

#![deny(missing_docs)]

pub mod agent;
pub mod config;
pub mod sandbox;

/// podvisor's version, reported by `--version` and by the agent.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
