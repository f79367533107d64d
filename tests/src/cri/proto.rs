//! The CRI messages the tests use: the shared `podvisor-cri-api` crate (also used by
//! `kata-monitor`), re-exported under the old path.

pub use cri_api::*;
