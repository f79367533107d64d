//! podvisor's remote hypervisor service: serves Kata's `remote.Hypervisor` API on a unix socket
//! and runs each peer pod's VM (a "podvm") through a [`provider::Provider`].

#![deny(missing_docs)]

pub mod provider;
pub mod tls;
pub mod net;
pub mod qemu;
