//! Peer pods harness (placeholder while it is written).
