//! End-to-end: the soak (`podvisor_tests::soak`, `make soak` runs 200 cycles) with 20 cycles:
//! two-container pods created and deleted through containerd's and CRI-O's CRI (alternating), a
//! fault injected at cycles 10 and 20, a resident pod per manager used every cycle. Fails on any
//! failed cycle or leftover; prints the resident shims' fds and RSS.
//!
//! Run: `cargo test -p podvisor-tests --test soak -- --nocapture`.

use podvisor_tests::cri::require_kata;
use podvisor_tests::soak::{run, SoakOptions};

#[test]
fn soak_20_cycles() {
    require_kata("the soak");
    let report = run(SoakOptions { cycles: 20, fault_every: 10 });
    eprint!("{}", report.text());
    assert_eq!(report.cycles, 20, "the soak stopped early:\n{}", report.text());
    assert!(report.ok(), "the soak failed:\n{}", report.text());
}
