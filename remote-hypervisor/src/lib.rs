//! podvisor's remote hypervisor service: serves Kata's `remote.Hypervisor` API on a unix socket
//! and runs each peer pod's VM (a "podvm") through a [`provider::Provider`].
//!
//! - [`config`]: the `peer-pods-cm` env file and flags.
//! - [`service`]: the core (state machine, limit, instance types, GC) and its ttrpc face.
//! - [`proxy`]: the per-pod proxy process (`agent.sock` → mutual TLS to the podvm's agent).
//! - [`state`]: `state.json` and process identity.
//! - [`interfaces`]: the TLS issuer and pod tunnel the core needs besides the provider.
//! - [`wiring`]: which provider, TLS issuer and tunnel a `CLOUD_PROVIDER` selects.

#![deny(missing_docs)]

pub mod config;
pub mod interfaces;
pub mod net;
pub mod provider;
pub mod proxy;
pub mod qemu;
pub mod service;
pub mod state;
pub mod tls;
pub mod tlsclient;
pub mod wiring;
