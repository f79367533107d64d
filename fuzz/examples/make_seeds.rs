//! Writes the generated part of the seed corpus (`fuzz/corpus/<target>/seed-*`): realistic
//! encoded requests, answers and specs that the mutator starts from. Hand-written seeds (TOML,
//! QMP transcripts) sit next to them. Run: `cargo run -p podvisor-fuzz --example make_seeds`.

use std::path::Path;

use agent_protocol::{agent as pb, health, types};
use protobuf::{Message, MessageField};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn tagged(tag: &[u8], m: &dyn protobuf::MessageDyn) -> Vec<u8> {
    let mut v = tag.to_vec();
    v.extend(m.write_to_bytes_dyn().unwrap());
    v
}

/// A deterministic byte pattern, for the generated (structured) targets.
fn pattern(n: usize, mul: u32) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(mul).wrapping_add(i >> 3) % 251) as u8).collect()
}

fn main() {
    use podvisor_fuzz::samples::{self, CONFIG_JSON};
    let idx = |rpc: &str| agent_protocol::AGENT_SERVICE_RPCS.iter().position(|r| *r == rpc).unwrap() as u8;

    // agent_request: [request type index] + encoded request.
    let create = samples::create_request();
    write("agent_request", "seed-create-container", &tagged(&[idx("CreateContainer")], &create));
    let exec = samples::exec_request();
    write("agent_request", "seed-exec-process", &tagged(&[idx("ExecProcess")], &exec));
    let update = samples::update_request();
    write("agent_request", "seed-update-container", &tagged(&[idx("UpdateContainer")], &update));
    let signal = pb::SignalProcessRequest { container_id: "ctr1".into(), signal: 9, ..Default::default() };
    write("agent_request", "seed-signal-process", &tagged(&[idx("SignalProcess")], &signal));
    let sandbox = pb::CreateSandboxRequest { hostname: "pod".into(), sandbox_pidns: true, ..Default::default() };
    write("agent_request", "seed-create-sandbox", &tagged(&[idx("CreateSandbox")], &sandbox));
    let ifc = types::Interface {
        name: "eth0".into(),
        hwAddr: "02:00:00:00:00:01".into(),
        mtu: 1500,
        IPAddresses: vec![types::IPAddress { address: "10.0.0.2".into(), mask: "24".into(), ..Default::default() }],
        ..Default::default()
    };
    let upd_ifc = pb::UpdateInterfaceRequest { interface: MessageField::some(ifc.clone()), ..Default::default() };
    write("agent_request", "seed-update-interface", &tagged(&[idx("UpdateInterface")], &upd_ifc));
    let policy = pb::SetPolicyRequest {
        policy: "package agent_policy\ndefault AllowAll := true\n".into(),
        ..Default::default()
    };
    write("agent_request", "seed-set-policy", &tagged(&[idx("SetPolicy")], &policy));

    // The agent's targets (agent/src/fuzz_targets.rs). agent_policy_input: [type, evaluate]
    // + request; agent_spec: [mode] + request (mode bit 0: exec, bits 2-4: guest paths exist,
    // shared ipc/uts, shared pid).
    for (name, tag, m) in [
        ("create-container", idx("CreateContainer"), &create as &dyn protobuf::MessageDyn),
        ("exec-process", idx("ExecProcess"), &exec),
        ("update-container", idx("UpdateContainer"), &update),
        ("update-interface", idx("UpdateInterface"), &upd_ifc),
        ("set-policy", idx("SetPolicy"), &policy),
    ] {
        write("agent_policy_input", &format!("seed-{name}"), &tagged(&[tag, 1], m));
    }
    for (i, tag) in
        [0x80 | idx("CreateContainer"), 0x80 | idx("ExecProcess"), 0x80 | idx("CopyFile")].into_iter().enumerate()
    {
        write(
            "agent_policy_input",
            &format!("seed-generated-{i}"),
            &[&[tag, 1][..], &pattern(700, 31 + 13 * i as u32)].concat(),
        );
    }
    write("agent_spec", "seed-create", &tagged(&[0], &create));
    write("agent_spec", "seed-create-shared-ns", &tagged(&[4 | 8 | 16], &create));
    write("agent_spec", "seed-exec", &tagged(&[1], &exec));
    write("agent_spec", "seed-generated-create", &[&[2u8 | 4][..], &pattern(900, 29)].concat());
    write("agent_spec", "seed-generated-exec", &[&[3u8][..], &pattern(600, 43)].concat());
    for i in 0..4u8 {
        let mode = 0x20 | (i & 1) | (i << 2);
        write("agent_spec", &format!("seed-mutated-{i}"), &[&[mode][..], &pattern(40 + 60 * i as usize, 37)].concat());
    }

    // Structured targets: byte patterns (the first byte picks the message type where it applies).
    // agent_request_gen: byte 0 the type, bit 7 mutate a realistic request; oci_spec_gen:
    // byte 0 odd mutate the CRI spec; stats_metrics: byte 0 = 2 mutate the sample.
    for target in ["agent_request_gen", "oci_spec_gen", "config_gen", "annotations"] {
        for i in 0..6 {
            let mut p = pattern(64 + 150 * i, 31 + 7 * i as u32);
            if target == "agent_request_gen" {
                let t = [idx("CreateContainer"), idx("ExecProcess"), idx("UpdateContainer")][i % 3];
                p[0] = if i < 3 { t } else { t | 0x80 };
            }
            if target == "oci_spec_gen" {
                p[0] = (i % 2) as u8;
            }
            write(target, &format!("seed-pattern-{i}"), &p);
        }
    }
    write("stats_metrics", "seed-mutated", &[&[2u8][..], &pattern(200, 11)].concat());

    // oci_json: the CRI-like config.json and the default spec.
    write("oci_json", "seed-cri-config.json", CONFIG_JSON.as_bytes());
    let default = serde_json::to_vec_pretty(&oci_spec::runtime::Spec::default()).unwrap();
    write("oci_json", "seed-default-spec.json", &default);

    // agent_answer: [rpc, mode] + payload (mode 0: the answer message; 1: raw frames;
    // 2: generated; 3: status code + message). RPC numbers as in fuzz/src/lib.rs.
    let serving = health::HealthCheckResponse {
        status: health::health_check_response::ServingStatus::SERVING.into(),
        ..Default::default()
    };
    write("agent_answer", "seed-check", &tagged(&[0, 0], &serving));
    let version = health::VersionCheckResponse { agent_version: "0.1.0".into(), ..Default::default() };
    write("agent_answer", "seed-version", &tagged(&[1, 0], &version));
    let details = pb::GuestDetailsResponse {
        mem_block_size_bytes: 128 << 20,
        agent_details: MessageField::some(pb::AgentDetails { version: "0.1.0".into(), ..Default::default() }),
        support_mem_hotplug_probe: true,
        ..Default::default()
    };
    write("agent_answer", "seed-guest-details", &tagged(&[2, 0], &details));
    let read = pb::ReadStreamResponse { data: b"hello\n".to_vec(), ..Default::default() };
    write("agent_answer", "seed-read-stream", &tagged(&[5, 0], &read));
    let stats = samples::stats();
    write("agent_answer", "seed-stats", &tagged(&[7, 0], &stats));
    write("agent_answer", "seed-update-interface", &tagged(&[9, 0], &ifc));
    let routes = pb::Routes {
        Routes: vec![types::Route {
            dest: "0.0.0.0/0".into(),
            gateway: "10.0.0.1".into(),
            device: "eth0".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    write("agent_answer", "seed-routes", &tagged(&[12, 0], &routes));
    let mut raw = vec![0u8, 1];
    let resp = ttrpc::Response { payload: serving.write_to_bytes().unwrap(), ..Default::default() };
    raw.extend(podvisor_fuzz::ttrpc_frame(1, &resp.write_to_bytes().unwrap()));
    write("agent_answer", "seed-raw-frame", &raw);
    write("agent_answer", "seed-generated-stats", &[&[7u8, 2][..], &pattern(400, 13)].concat());
    write("agent_answer", "seed-status", b"\x0d\x03\x05container ctr1 not found");

    // stats_metrics: [0] + encoded answer, [1] + generator bytes.
    write("stats_metrics", "seed-sample", &tagged(&[0], &stats));
    write("stats_metrics", "seed-pattern", &[&[1u8][..], &pattern(600, 17)].concat());
}
