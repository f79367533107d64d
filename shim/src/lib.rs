//! podvisor's shim library: configuration loading, the agent client, the sandbox layer that
//! puts a VM and its agent together, and the containerd task service on top of it. The
//! `containerd-shim-kata-v2` binary is a thin front end.

#![deny(missing_docs)]

pub mod agent;
pub mod annotations;
pub mod bootstrap;
pub mod cleanup;
pub mod config;
pub mod copy;
pub mod events;
pub mod host_cgroup;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod mounts;
pub mod pod;
pub mod process;
pub mod sandbox;
pub mod service;
pub mod spec;

/// podvisor's version, reported by `--version` and by the agent.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
