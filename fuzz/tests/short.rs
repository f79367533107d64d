//! The short, fixed-seed fuzzing pass of `cargo test`: each target runs its seed corpus and a
//! fixed number of mutants (`Target::short_iters`) and must not crash. `make fuzz` runs the
//! long pass (`src/main.rs`); the environment variables of `driver::Config::short` lengthen
//! this one.

use podvisor_fuzz::{run_short, targets};

fn short(name: &str) {
    let report = run_short(name);
    report.publish();
    report.assert_clean();
    assert!(report.tried > report.corpus as u64, "{name}: no mutant was tried");
}

#[test]
fn every_target_has_a_test_and_a_seed_corpus() {
    let this = include_str!("short.rs");
    for t in targets() {
        assert!(this.contains(&format!("fn {}()", t.name)), "no short-pass test for target {}", t.name);
        let corpus = podvisor_fuzz::driver::load_corpus(&podvisor_fuzz::corpus_dir(t.name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{} is empty: add seed inputs", t.name);
    }
}

#[test]
fn agent_request() {
    short("agent_request");
}

#[test]
fn agent_request_gen() {
    short("agent_request_gen");
}

#[test]
fn oci_spec_gen() {
    short("oci_spec_gen");
}

#[test]
fn oci_json() {
    short("oci_json");
}

#[test]
fn config_text() {
    short("config_text");
}

#[test]
fn config_gen() {
    short("config_gen");
}

#[test]
fn annotations() {
    short("annotations");
}

#[test]
fn qmp_stream() {
    short("qmp_stream");
}

#[test]
fn hvsock_reply() {
    short("hvsock_reply");
}

#[test]
fn agent_answer() {
    short("agent_answer");
}

#[test]
fn stats_metrics() {
    short("stats_metrics");
}

#[test]
fn shim_strings() {
    short("shim_strings");
}

#[test]
fn guest_metrics() {
    short("guest_metrics");
}
