//! Wire compatibility: the service's ttrpc socket against a client written here from the
//! protocol definition alone — protobuf messages and ttrpc frames encoded by hand, no generated
//! code and no ttrpc crate on the client side.
//!
//! ttrpc frame: 10-byte header (u32 BE payload length, u32 BE stream id, u8 type: 1 request,
//! 2 response; u8 flags), then the payload. A request's payload is ttrpc's
//! `Request{service=1, method=2, payload=3, timeout_nano=4, metadata=5}`; a response's is
//! `Response{status=1 (Status{code=1, message=2}), payload=2}`.

mod common;

use std::path::Path;

use common::*;
use podvisor_remote_hypervisor::service;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(num: u64, b: &[u8], out: &mut Vec<u8>) {
    varint((num << 3) | 2, out);
    varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

fn varint_field(num: u64, v: u64, out: &mut Vec<u8>) {
    varint(num << 3, out);
    varint(v, out);
}

#[derive(Debug)]
enum Value {
    Varint(u64),
    Bytes(Vec<u8>),
}

fn read_varint(b: &[u8], i: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let byte = b[*i];
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

fn decode(b: &[u8]) -> Vec<(u64, Value)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = read_varint(b, &mut i);
        match key & 7 {
            0 => out.push((key >> 3, Value::Varint(read_varint(b, &mut i)))),
            2 => {
                let n = read_varint(b, &mut i) as usize;
                out.push((key >> 3, Value::Bytes(b[i..i + n].to_vec())));
                i += n;
            }
            t => panic!("unexpected wire type {t}"),
        }
    }
    out
}

fn bytes_of(fields: &[(u64, Value)], num: u64) -> Option<Vec<u8>> {
    fields.iter().find_map(|(n, v)| match v {
        Value::Bytes(b) if *n == num => Some(b.clone()),
        _ => None,
    })
}

/// One call: returns (status code, status message, response payload).
async fn call(conn: &mut UnixStream, stream: u32, method: &str, payload: &[u8]) -> (u64, String, Vec<u8>) {
    let mut req = Vec::new();
    bytes_field(1, b"remote.Hypervisor", &mut req);
    bytes_field(2, method.as_bytes(), &mut req);
    bytes_field(3, payload, &mut req);
    varint_field(4, 30_000_000_000, &mut req);
    let mut frame = Vec::new();
    frame.extend_from_slice(&(req.len() as u32).to_be_bytes());
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.push(1);
    frame.push(0);
    frame.extend_from_slice(&req);
    conn.write_all(&frame).await.unwrap();
    let mut header = [0u8; 10];
    conn.read_exact(&mut header).await.unwrap();
    let len = u32::from_be_bytes(header[0..4].try_into().unwrap()) as usize;
    assert_eq!(u32::from_be_bytes(header[4..8].try_into().unwrap()), stream, "stream id echoed");
    assert_eq!(header[8], 2, "a response frame");
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).await.unwrap();
    let fields = decode(&body);
    let (code, message) = match bytes_of(&fields, 1) {
        None => (0, String::new()),
        Some(status) => {
            let s = decode(&status);
            let code = s.iter().find_map(|(n, v)| {
                matches!(v, Value::Varint(_) if *n == 1).then(|| match v {
                    Value::Varint(c) => *c,
                    _ => 0,
                })
            });
            (code.unwrap_or(0), String::from_utf8(bytes_of(&s, 2).unwrap_or_default()).unwrap())
        }
    };
    (code, message, bytes_of(&fields, 2).unwrap_or_default())
}

fn create_vm_request(id: &str, annotations: &[(&str, &str)], netns: &str) -> Vec<u8> {
    let mut m = Vec::new();
    bytes_field(1, id.as_bytes(), &mut m);
    for (k, v) in annotations {
        let mut entry = Vec::new();
        bytes_field(1, k.as_bytes(), &mut entry);
        bytes_field(2, v.as_bytes(), &mut entry);
        bytes_field(2, &entry, &mut m);
    }
    bytes_field(3, netns.as_bytes(), &mut m);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_client_against_the_service_socket() {
    let h = Harness::new("PEERPODS_LIMIT_PER_NODE=1\n");
    let core = h.core();
    let socket = h.dir.path().join("hypervisor.sock");
    let listening = service::listen(core.clone(), &socket).await.unwrap();
    let mut conn = UnixStream::connect(&socket).await.unwrap();

    // Version
    let mut v = Vec::new();
    bytes_field(1, b"0.0.1", &mut v);
    let (code, msg, payload) = call(&mut conn, 1, "Version", &v).await;
    assert_eq!((code, msg.as_str()), (0, ""));
    let version = String::from_utf8(bytes_of(&decode(&payload), 1).unwrap()).unwrap();
    assert_eq!(version, format!("podvisor-remote-hypervisor {}", env!("CARGO_PKG_VERSION")));

    // CreateVM with annotations (a protobuf map: repeated entries {key=1, value=2})
    let id = "0123456789abcdef";
    let req = create_vm_request(
        id,
        &[("io.kubernetes.cri.sandbox-name", "wire"), ("io.katacontainers.config.hypervisor.machine_type", "large")],
        "/var/run/netns/wire",
    );
    let (code, msg, payload) = call(&mut conn, 3, "CreateVM", &req).await;
    assert_eq!((code, msg.as_str()), (0, ""));
    let path = String::from_utf8(bytes_of(&decode(&payload), 1).unwrap()).unwrap();
    assert_eq!(Path::new(&path), h.state_dir().join(id).join("agent.sock"));
    let st = podvisor_remote_hypervisor::state::read(&h.state_dir().join(id)).unwrap();
    assert_eq!(
        (st.instance_type.name.as_str(), st.name.as_str(), st.netns.as_str()),
        ("large", "podvm-wire-01234567", "/var/run/netns/wire")
    );

    // The limit (1) as a ttrpc status: RESOURCE_EXHAUSTED (8) with the message.
    let (code, msg, _) = call(&mut conn, 5, "CreateVM", &create_vm_request("second", &[], "")).await;
    assert_eq!(code, 8, "{msg}");
    assert!(
        msg.starts_with("peer pod limit reached: PEERPODS_LIMIT_PER_NODE=1 podvms already run on this node"),
        "{msg}"
    );

    // StartVM of an unknown id: NOT_FOUND (5).
    let mut s = Vec::new();
    bytes_field(1, b"unknown", &mut s);
    let (code, msg, _) = call(&mut conn, 7, "StartVM", &s).await;
    assert_eq!((code, msg.as_str()), (5, "no podvm for sandbox unknown: call CreateVM first"));

    // StopVM (empty response), twice: idempotent.
    let mut s = Vec::new();
    bytes_field(1, id.as_bytes(), &mut s);
    for stream in [9, 11] {
        let (code, msg, payload) = call(&mut conn, stream, "StopVM", &s).await;
        assert_eq!((code, msg.as_str(), payload.len()), (0, "", 0));
    }
    assert!(!h.state_dir().join(id).exists());
    drop(conn);
    listening.shutdown().await;
    assert!(!socket.exists());
}
