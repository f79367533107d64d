//! Wire-compatibility pins: exact encodings that follow from Kata's field numbers and types.
//!
//! A protobuf field key is `(field_number << 3) | wire_type`, with wire type 0 = varint and
//! 2 = length-delimited. rust-protobuf writes fields in field-number order and skips proto3
//! defaults, so each expected byte string below is fully determined by the schema. If someone
//! renumbers or retypes a field, these fail.

use podvisor_agent_protocol::{agent, health, oci, types};
use protobuf::{Message, MessageField};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

fn assert_encodes<M: Message>(msg: &M, expected: &[u8]) {
    let got = msg.write_to_bytes().unwrap();
    assert_eq!(hex(&got), hex(expected), "encoding of {}", M::NAME);
    // And the other way: the Kata-shaped bytes decode to the same message.
    let decoded = M::parse_from_bytes(expected).unwrap();
    assert_eq!(hex(&decoded.write_to_bytes().unwrap()), hex(expected));
}

#[test]
fn health_check_request() {
    // CheckRequest.service = 1 (string): key 0x0a, length 1, "x".
    let req = health::CheckRequest { service: "x".into(), ..Default::default() };
    assert_encodes(&req, &[0x0a, 0x01, 0x78]);
}

#[test]
fn health_responses() {
    // HealthCheckResponse.status = 1 (enum), SERVING = 1: key 0x08, value 1.
    let resp = health::HealthCheckResponse {
        status: health::health_check_response::ServingStatus::SERVING.into(),
        ..Default::default()
    };
    assert_encodes(&resp, &[0x08, 0x01]);
    // NOT_SERVING = 2.
    assert_eq!(health::health_check_response::ServingStatus::NOT_SERVING as i32, 2);
    // VersionCheckResponse.grpc_version = 1, agent_version = 2 (strings): keys 0x0a, 0x12.
    let v = health::VersionCheckResponse { grpc_version: "g".into(), agent_version: "v".into(), ..Default::default() };
    assert_encodes(&v, &[0x0a, 0x01, b'g', 0x12, 0x01, b'v']);
}

#[test]
fn online_cpu_mem_request() {
    // wait = 1 (bool), nb_cpus = 2 (uint32), cpu_only = 3 (bool): keys 0x08, 0x10, 0x18.
    let req = agent::OnlineCPUMemRequest { wait: true, nb_cpus: 2, cpu_only: true, ..Default::default() };
    assert_encodes(&req, &[0x08, 0x01, 0x10, 0x02, 0x18, 0x01]);
}

#[test]
fn guest_details() {
    // GuestDetailsRequest: mem_block_size = 1, mem_hotplug_probe = 2 (bools).
    let req = agent::GuestDetailsRequest { mem_block_size: true, mem_hotplug_probe: true, ..Default::default() };
    assert_encodes(&req, &[0x08, 0x01, 0x10, 0x01]);

    // GuestDetailsResponse: mem_block_size_bytes = 1 (uint64), agent_details = 2 (message),
    // support_mem_hotplug_probe = 3 (bool). 128 MiB = 2^27 is the varint 80 80 80 40.
    // AgentDetails.version = 1 (string) "1.2" -> 0a 03 31 2e 32, wrapped as key 0x12 length 5.
    let resp = agent::GuestDetailsResponse {
        mem_block_size_bytes: 1 << 27,
        agent_details: MessageField::some(agent::AgentDetails { version: "1.2".into(), ..Default::default() }),
        support_mem_hotplug_probe: true,
        ..Default::default()
    };
    assert_encodes(&resp, &[0x08, 0x80, 0x80, 0x80, 0x40, 0x12, 0x05, 0x0a, 0x03, b'1', b'.', b'2', 0x18, 0x01]);
}

#[test]
fn set_guest_date_time() {
    // Sec = 1, Usec = 2 (int64): keys 0x08, 0x10. A negative int64 is a 10-byte varint.
    let req = agent::SetGuestDateTimeRequest { Sec: 1_700_000_000, Usec: 5, ..Default::default() };
    // 1_700_000_000 = 0x6553F100 -> varint 80 e2 cf aa 06.
    assert_encodes(&req, &[0x08, 0x80, 0xe2, 0xcf, 0xaa, 0x06, 0x10, 0x05]);
}

#[test]
fn field_numbers_with_gaps() {
    // ReseedRandomDevRequest.data is field 2 (bytes), not 1: key 0x12.
    let req = agent::ReseedRandomDevRequest { data: vec![0xaa, 0xbb], ..Default::default() };
    assert_encodes(&req, &[0x12, 0x02, 0xaa, 0xbb]);
    // FSGroup.group_id = 2 (uint32), group_change_policy = 3 (enum; OnRootMismatch = 1).
    let fs = agent::FSGroup {
        group_id: 5,
        group_change_policy: types::FSGroupChangePolicy::OnRootMismatch.into(),
        ..Default::default()
    };
    assert_encodes(&fs, &[0x10, 0x05, 0x18, 0x01]);
}

#[test]
fn create_container_request() {
    // container_id = 1 (string), OCI = 6 (message Spec; Spec.Version = 1), stdin_port = 9 (uint32):
    // keys 0x0a, 0x32, 0x48.
    let req = agent::CreateContainerRequest {
        container_id: "c".into(),
        OCI: MessageField::some(oci::Spec { Version: "1".into(), ..Default::default() }),
        stdin_port: 7,
        ..Default::default()
    };
    assert_encodes(&req, &[0x0a, 0x01, b'c', 0x32, 0x03, 0x0a, 0x01, b'1', 0x48, 0x07]);
}

#[test]
fn oci_process_and_namespace() {
    // Process.Args = 4 (repeated string): key 0x22 per element; Cwd = 6: key 0x32.
    let p = oci::Process { Args: vec!["a".into(), "b".into()], Cwd: "/".into(), ..Default::default() };
    assert_encodes(&p, &[0x22, 0x01, b'a', 0x22, 0x01, b'b', 0x32, 0x01, b'/']);
    // LinuxNamespace.Type = 1, Path = 2.
    let ns = oci::LinuxNamespace { Type: "pid".into(), Path: "/p".into(), ..Default::default() };
    assert_encodes(&ns, &[0x0a, 0x03, b'p', b'i', b'd', 0x12, 0x02, b'/', b'p']);
}

#[test]
fn types_route_and_interface() {
    // Route.family = 6 (enum; v6 = 1), flags = 7 (uint32): keys 0x30, 0x38.
    let r = types::Route { family: types::IPFamily::v6.into(), flags: 3, ..Default::default() };
    assert_encodes(&r, &[0x30, 0x01, 0x38, 0x03]);
    // Interface.mtu = 4 (uint64), devicePath = 6 (string), raw_flags = 8 (uint32):
    // keys 0x20, 0x32, 0x40.
    let i = types::Interface { mtu: 1500, devicePath: "p".into(), raw_flags: 1, ..Default::default() };
    // 1500 = 0x5dc -> varint dc 0b.
    assert_encodes(&i, &[0x20, 0xdc, 0x0b, 0x32, 0x01, b'p', 0x40, 0x01]);
}

#[test]
fn mem_agent_optional_fields_keep_presence() {
    // MemAgentMemcgConfig.disabled = 1 (optional bool): an explicit false is still written.
    let c = agent::MemAgentMemcgConfig { disabled: Some(false), ..Default::default() };
    assert_encodes(&c, &[0x08, 0x00]);
}

#[test]
fn message_full_names_carry_kata_packages() {
    use protobuf::MessageFull;
    assert_eq!(agent::CreateContainerRequest::descriptor().full_name(), "grpc.CreateContainerRequest");
    assert_eq!(oci::Spec::descriptor().full_name(), "grpc.Spec");
    assert_eq!(types::Interface::descriptor().full_name(), "types.Interface");
    assert_eq!(health::CheckRequest::descriptor().full_name(), "grpc.CheckRequest");
}
