//! The proxy process on its own: mutual TLS with the per-podvm CA only, the connection bound,
//! and exit on VMM death.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::*;
use podvisor_remote_hypervisor::interfaces::{PodvmTls, TlsIssuer};
use podvisor_remote_hypervisor::provider::AgentTls;
use podvisor_remote_hypervisor::state::ProcessRef;
use podvisor_remote_hypervisor::tlsclient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn write_tls_dir(dir: &Path, tls: &PodvmTls, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(tlsclient::CA_FILE), &tls.ca_cert).unwrap();
    std::fs::write(dir.join(tlsclient::CLIENT_CERT_FILE), &tls.client_cert).unwrap();
    std::fs::write(dir.join(tlsclient::CLIENT_KEY_FILE), &tls.client_key).unwrap();
    std::fs::write(dir.join(tlsclient::SERVER_NAME_FILE), name).unwrap();
}

/// A child killed and reaped on drop (also when the test fails).
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_proxy(sock: &Path, target: SocketAddr, tls_dir: &Path, vmm: &ProcessRef, extra: &[&str]) -> Proxy {
    let child = Command::new(env!("CARGO_BIN_EXE_podvisor-remote-hypervisor"))
        .arg("proxy")
        .arg("--socket")
        .arg(sock)
        .arg("--target")
        .arg(target.to_string())
        .arg("--tls-dir")
        .arg(tls_dir)
        .arg("--vmm-pid")
        .arg(vmm.pid.to_string())
        .arg("--vmm-start-time")
        .arg(vmm.start_time.to_string())
        .args(extra)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    Proxy(child)
}

/// Reads until EOF or 10 s; returns the bytes read (EOF expected).
async fn read_to_eof(s: &mut tokio::net::UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.expect("EOF within 10 s").ok();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_bounds_verifies_and_follows_the_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let name = tlsclient::PODVM_SERVER_NAME;
    let tls = RcgenIssuer.issue("podvm-proxytest").unwrap();
    let target = SocketAddr::new(next_ip(), free_port());
    let listener = tokio::net::TcpListener::bind(target).await.unwrap();
    let agent = tokio::spawn(echo_agent(
        listener,
        AgentTls {
            ca_cert: tls.ca_cert.clone(),
            server_cert: tls.server_cert.clone(),
            server_key: tls.server_key.clone(),
        },
    ));
    let mut vmm_child = Proxy(
        Command::new("sleep")
            .arg("1000")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let vmm = ProcessRef::of(vmm_child.0.id()).unwrap();

    // A proxy holding another podvm's CA must not reach this agent.
    let other = RcgenIssuer.issue("podvm-other").unwrap();
    write_tls_dir(&dir.path().join("other-tls"), &other, name);
    let wrong_sock = dir.path().join("wrong.sock");
    let _wrong = spawn_proxy(&wrong_sock, target, &dir.path().join("other-tls"), &vmm, &[]);
    eventually("wrong.sock", || wrong_sock.exists()).await;
    let mut c = tokio::net::UnixStream::connect(&wrong_sock).await.unwrap();
    let _ = c.write_all(b"ping").await;
    assert_eq!(read_to_eof(&mut c).await, b"", "no bytes through a proxy that does not trust the agent");

    // The right material, one connection at most.
    write_tls_dir(&dir.path().join("tls"), &tls, name);
    let sock = dir.path().join("agent.sock");
    let proxy = spawn_proxy(&sock, target, &dir.path().join("tls"), &vmm, &["--max-connections", "1"]);
    let proxy_ref = ProcessRef::of(proxy.0.id()).unwrap();
    eventually("agent.sock", || sock.exists()).await;
    let mut first = tokio::net::UnixStream::connect(&sock).await.unwrap();
    first.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    let mut second = tokio::net::UnixStream::connect(&sock).await.unwrap();
    assert_eq!(read_to_eof(&mut second).await, b"", "a connection over the bound is closed");
    drop(first);
    // The slot frees once the first connection ends (the proxy sees its EOF a moment later).
    let mut held = None;
    for _ in 0..100 {
        let mut c = tokio::net::UnixStream::connect(&sock).await.unwrap();
        if c.write_all(b"ping").await.is_ok() && c.read_exact(&mut buf).await.is_ok() {
            held = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut held = held.expect("the slot of a closed connection is reused");

    // VMM death: every connection closes, the socket goes, the proxy exits.
    vmm_child.0.kill().unwrap();
    vmm_child.0.wait().unwrap();
    assert_eq!(read_to_eof(&mut held).await, b"");
    eventually("agent.sock removed", || !sock.exists()).await;
    eventually("proxy exited", || !proxy_ref.alive()).await;
    eventually("wrong.sock removed", || !wrong_sock.exists()).await;
    agent.abort();
}
