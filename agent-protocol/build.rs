//! Generates the agent API (messages + async ttrpc client/server) from `protos/` at build time,
//! with the pure-Rust protobuf parser: no `protoc` binary is needed.
//!
//! The generated files open with inner attributes (`#![allow(..)]`) and `//!` docs, which are not
//! allowed in a file pulled in with `include!` inside a `mod { }` block. They are stripped here;
//! `src/lib.rs` puts the equivalent `#[allow(..)]` on each module instead.

use std::fs;
use std::path::Path;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

/// Proto files compiled, relative to `protos/`.
const PROTOS: &[&str] = &["agent.proto", "health.proto", "oci.proto", "types.proto", "csi.proto", "hypervisor.proto"];

/// Files the code generators write for `PROTOS` (rust-protobuf: `<name>.rs`; ttrpc: `<name>_ttrpc.rs`
/// for files that declare a service).
const GENERATED: &[&str] =
    &["agent.rs", "agent_ttrpc.rs", "health.rs", "health_ttrpc.rs", "oci.rs", "types.rs", "csi.rs", "hypervisor.rs", "hypervisor_ttrpc.rs"];

fn main() {
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=protos");
    let inputs: Vec<String> = PROTOS.iter().map(|p| format!("protos/{p}")).collect();
    for input in &inputs {
        println!("cargo:rerun-if-changed={input}");
    }

    Codegen::new()
        .out_dir(&out_dir)
        .inputs(&inputs)
        .include("protos")
        .rust_protobuf()
        .customize(Customize { async_all: true, ..Default::default() })
        // Modules are declared by hand in src/lib.rs (one `include!` per file).
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating the agent API from protos/ failed");

    for name in GENERATED {
        let path = Path::new(&out_dir).join(name);
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read generated {}: {e}", path.display()));
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                let t = line.trim_start();
                !(t.starts_with("#![") || t.starts_with("//!"))
            })
            .collect();
        fs::write(&path, kept.join("\n") + "\n").unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}
