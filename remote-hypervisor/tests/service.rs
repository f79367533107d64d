//! The service core against fakes: lifecycle, limit, failures, cancellation, restart/GC. The
//! proxies are the real binary's `proxy` subcommand; the "agent" is a mutual-TLS echo server.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use podvisor_remote_hypervisor::service::{
    Error, ANNO_MACHINE_TYPE, ANNO_SANDBOX_NAME, ANNO_VCPUS, TAG_OWNER, TAG_SANDBOX_ID,
};
use podvisor_remote_hypervisor::state::{self, Phase};

const T: Duration = Duration::from_secs(30);
const NETNS: &str = "/var/run/netns/fake";

fn id(n: u32) -> String {
    format!("{n:08x}{}", "ab".repeat(28))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_start_stop_lifecycle() {
    let h = Harness::new("TAGS=team=peer,env=test\nROOT_VOLUME_SIZE=8\nPODVM_INSTANCE_TYPE=medium\n");
    let core = h.core();
    let sid = id(1);
    let sock = core.create_vm(&sid, annotations(&[(ANNO_SANDBOX_NAME, "nginx")]), NETNS).unwrap();
    let dir = h.state_dir().join(&sid);
    assert_eq!(sock, dir.join("agent.sock"));
    assert_eq!(state::read(&dir).unwrap().phase, Phase::Created);
    assert_eq!(h.provider.count(), 0, "CreateVM runs nothing");

    core.start_vm(&sid, T).await.unwrap();
    let st = state::read(&dir).unwrap();
    assert_eq!(st.phase, Phase::Running);
    let proxy = st.proxy.expect("proxy recorded");
    assert!(proxy.alive());
    ping(&sock).await.unwrap();
    // What the provider was asked for.
    let req = h.provider.requests.lock().unwrap()[0].clone();
    assert_eq!(req.name, "podvm-nginx-00000001");
    assert_eq!(req.instance_type.name, "medium");
    assert_eq!(req.root_volume_gb, 8);
    assert_eq!(req.tags.get("team").map(String::as_str), Some("peer"));
    assert_eq!(req.tags.get(TAG_SANDBOX_ID), Some(&sid));
    assert_eq!(req.tags.get(TAG_OWNER).map(String::as_str), Some("test-node"));
    let tun = req.user_data.tunnel.clone().unwrap();
    assert_eq!((tun.kind.as_str(), tun.vni, tun.remote.as_str(), tun.port), ("vxlan", 555001, "172.31.250.1", 4789));
    assert_eq!(tun.pod_mac, "aa:bb:cc:dd:ee:01");
    assert_eq!(req.user_data.listen_port, h.provider.agent_port);
    let json = serde_json::to_value(&req.user_data).unwrap();
    assert!(json["tls"]["server_key"].as_str().unwrap().contains("PRIVATE KEY"));
    // The tunnel points at the podvm.
    let setups = h.tunnel.setups.lock().unwrap().clone();
    assert_eq!(setups.len(), 1);
    assert_eq!(Some(setups[0].remote), st.instance.as_ref().map(|i| i.ip));
    // The client key stays private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("tls/client-key.pem")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "client key mode {mode:o}");
    // StartVM again is fine.
    core.start_vm(&sid, T).await.unwrap();
    let vmm = h.provider.vmm_of(&sid).unwrap();

    core.stop_vm(&sid).await.unwrap();
    assert!(!dir.exists(), "state dir removed");
    assert!(!proxy.alive(), "proxy gone");
    assert!(!vmm.alive(), "VMM gone");
    assert_eq!(h.tunnel.live(), 0);
    assert_eq!(core.count(), 0);
    assert_eq!(processes_mentioning(&h.state_dir()), Vec::<u32>::new(), "processes left");
    // Idempotent: again, and for an id never seen.
    core.stop_vm(&sid).await.unwrap();
    core.stop_vm(&id(77)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_unknown_and_bad_requests() {
    let h = Harness::new("");
    let core = h.core();
    let e = core.start_vm("nope", T).await.unwrap_err();
    assert_eq!(e, Error::NotFound("no podvm for sandbox nope: call CreateVM first".into()));
    let e = core.create_vm("../x", annotations(&[]), "").unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("sandbox id \"../x\" is not valid")), "{e:?}");
    let e = core.create_vm("a", annotations(&[(ANNO_MACHINE_TYPE, "huge")]), "").unwrap_err();
    assert!(e.to_string().contains("use one of: small, medium, large"), "{e}");
    let e = core.create_vm("a", annotations(&[]), "relative/netns").unwrap_err();
    assert!(e.to_string().contains("not an absolute path"), "{e}");
    assert_eq!(core.count(), 0);
    assert!(!h.state_dir().join("a").exists());
    core.create_vm("a", annotations(&[(ANNO_VCPUS, "3")]), "").unwrap();
    let e = core.create_vm("a", annotations(&[]), "").unwrap_err();
    assert!(e.to_string().contains("already has a podvm"), "{e}");
    assert_eq!(state::read(&h.state_dir().join("a")).unwrap().instance_type.name, "large");
    core.stop_vm("a").await.unwrap();
    assert!(!h.state_dir().join("a").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_of_two() {
    let h = Harness::new("PEERPODS_LIMIT_PER_NODE=2\n");
    let core = h.core();
    for n in 1..=2 {
        core.create_vm(&id(n), annotations(&[]), NETNS).unwrap();
        core.start_vm(&id(n), T).await.unwrap();
    }
    let e = core.create_vm(&id(3), annotations(&[]), NETNS).unwrap_err();
    let want = format!(
        "peer pod limit reached: PEERPODS_LIMIT_PER_NODE=2 podvms already run on this node; delete a peer pod or raise PEERPODS_LIMIT_PER_NODE in {}",
        h.config_file().display()
    );
    assert_eq!(e, Error::LimitReached(want));
    assert!(!h.state_dir().join(id(3)).exists());
    core.stop_vm(&id(1)).await.unwrap();
    core.create_vm(&id(3), annotations(&[]), NETNS).unwrap();
    core.start_vm(&id(3), T).await.unwrap();
    // VNIs are unique among live podvms; the freed one is reused.
    let vnis: Vec<u32> = [2, 3].iter().map(|n| state::read(&h.state_dir().join(id(*n))).unwrap().vni).collect();
    assert_eq!(vnis, vec![555002, 555001]);
    for n in [2, 3] {
        core.stop_vm(&id(n)).await.unwrap();
    }
    assert_eq!(h.provider.count(), 0);
}

/// Checks that nothing of `sid` is left: state dir, VMM, proxy, tunnel, slot.
fn assert_nothing_left(h: &Harness, core: &podvisor_remote_hypervisor::service::Core, sid: &str) {
    assert!(!h.state_dir().join(sid).exists(), "state dir of {sid} left");
    assert_eq!(h.provider.count(), 0, "podvm left");
    assert_eq!(h.tunnel.live(), 0, "tunnel left");
    assert_eq!(core.count(), 0, "slot left");
    assert_eq!(core.phase(sid), None);
    assert_eq!(processes_mentioning(&h.state_dir().join(sid)), Vec::<u32>::new(), "processes of {sid} left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_start_leaves_nothing() {
    let h = Harness::new("");
    let core = h.core();
    // 1. The provider fails.
    h.provider.fail_create.store(true, Ordering::SeqCst);
    core.create_vm("p1", annotations(&[]), NETNS).unwrap();
    let e = core.start_vm("p1", T).await.unwrap_err();
    assert!(e.to_string().contains("provider fake cannot create podvm podvm-p1: fake: out of capacity"), "{e}");
    assert_nothing_left(&h, &core, "p1");
    h.provider.fail_create.store(false, Ordering::SeqCst);
    // 2. The tunnel fails after the podvm exists.
    h.tunnel.fail_setup.store(true, Ordering::SeqCst);
    core.create_vm("p2", annotations(&[]), NETNS).unwrap();
    let e = core.start_vm("p2", T).await.unwrap_err();
    assert!(e.to_string().contains("cannot set up the pod tunnel"), "{e}");
    assert_eq!(h.provider.deleted.lock().unwrap().as_slice(), ["fake-p2"]);
    assert_nothing_left(&h, &core, "p2");
    h.tunnel.fail_setup.store(false, Ordering::SeqCst);
    // 3. The agent never answers: bounded by the StartVM timeout.
    h.provider.no_agent.store(true, Ordering::SeqCst);
    core.create_vm("p3", annotations(&[]), NETNS).unwrap();
    let e = core.start_vm("p3", Duration::from_millis(800)).await.unwrap_err();
    assert!(e.to_string().contains("the agent did not answer TLS on"), "{e}");
    assert_nothing_left(&h, &core, "p3");
    // 4. The VMM dies while the agent is awaited.
    core.create_vm("p4", annotations(&[]), NETNS).unwrap();
    let (c, p) = (core.clone(), h.provider.clone());
    let killer = tokio::spawn(async move {
        while p.vmm_of("p4").is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        p.crash("p4");
    });
    let e = c.start_vm("p4", T).await.unwrap_err();
    killer.await.unwrap();
    assert!(e.to_string().contains("exited before its agent answered"), "{e}");
    assert!(!h.state_dir().join("p4").exists());
    assert_eq!(core.count(), 0);
    // No proxy ran for any of them, and a later pod still starts.
    h.provider.no_agent.store(false, Ordering::SeqCst);
    core.create_vm("p5", annotations(&[]), NETNS).unwrap();
    core.start_vm("p5", T).await.unwrap();
    core.stop_vm("p5").await.unwrap();
    assert_eq!(processes_mentioning(&h.state_dir()), Vec::<u32>::new(), "processes left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_start_blocks_no_other_pod_and_stop_cancels_it() {
    let h = Harness::new("");
    let core = h.core();
    let gate = Arc::new(tokio::sync::Notify::new());
    *h.provider.gate.lock().unwrap() = Some(gate.clone());
    core.create_vm("slow", annotations(&[]), NETNS).unwrap();
    let c = core.clone();
    let slow = tokio::spawn(async move { c.start_vm("slow", T).await });
    while h.provider.requests.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(core.phase("slow"), Some(Phase::Starting));
    // Another pod: create, start (its create passes the gate once notified below), stop.
    *h.provider.gate.lock().unwrap() = None;
    core.create_vm("fast", annotations(&[]), NETNS).unwrap();
    core.start_vm("fast", T).await.unwrap();
    core.stop_vm("fast").await.unwrap();
    assert_eq!(core.phase("slow"), Some(Phase::Starting), "the slow start is still blocked");
    // StopVM on the blocked pod cancels it: once the provider returns, the start undoes itself.
    let c = core.clone();
    let stop = tokio::spawn(async move { c.stop_vm("slow").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!stop.is_finished(), "StopVM waits for the pod's own start");
    gate.notify_one();
    stop.await.unwrap().unwrap();
    let e = slow.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("StopVM arrived while StartVM ran"), "{e}");
    assert_nothing_left(&h, &core, "slow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_death_closes_connections_and_removes_the_socket() {
    let h = Harness::new("");
    let core = h.core();
    let sock = core.create_vm("d1", annotations(&[]), NETNS).unwrap();
    core.start_vm("d1", T).await.unwrap();
    let mut conn = tokio::net::UnixStream::connect(&sock).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).await.unwrap();
    let proxy = state::read(&h.state_dir().join("d1")).unwrap().proxy.unwrap();
    h.provider.crash("d1");
    let n =
        tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await.expect("EOF within 10 s").unwrap_or(0);
    assert_eq!(n, 0, "the proxied connection ends");
    eventually("agent.sock removed", || !sock.exists()).await;
    eventually("proxy exited", || !proxy.alive()).await;
    core.stop_vm("d1").await.unwrap();
    assert!(!h.state_dir().join("d1").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reattaches_claimed_pods_and_collects_the_rest() {
    let h = Harness::new("PEERPODS_LIMIT_PER_NODE=3\n");
    let old = h.core();
    for p in ["keep", "unclaimed", "dead"] {
        old.create_vm(p, annotations(&[]), NETNS).unwrap();
        old.start_vm(p, T).await.unwrap();
    }
    old.create_vm("created-claimed", annotations(&[]), NETNS).unwrap_err(); // the limit holds 3
    let _keep = h.claim("keep");
    let _dead = h.claim("dead");
    h.provider.crash("dead");
    let proxies: Vec<_> = ["keep", "unclaimed", "dead"]
        .iter()
        .map(|p| state::read(&h.state_dir().join(p)).unwrap().proxy.unwrap())
        .collect();
    // An orphan podvm without a state dir (the service died between create and state write).
    let orphan = {
        use podvisor_remote_hypervisor::provider::Provider;
        let req = h.provider.requests.lock().unwrap()[0].clone();
        let mut req = req;
        req.sandbox_id = "orphan".into();
        h.provider.create_instance(req).await.unwrap()
    };
    // A dir whose state.json is unreadable (and no podvm).
    std::fs::create_dir_all(h.state_dir().join("corrupt")).unwrap();
    std::fs::write(h.state_dir().join("corrupt/state.json"), "{").unwrap();
    drop(old); // the service "restarts": proxies and VMMs run on
    let new = h.core();
    let mut r = new.recover().await;
    r.destroyed.sort();
    assert_eq!(r.reattached, vec!["keep".to_string()]);
    assert_eq!(r.destroyed, vec!["corrupt".to_string(), "dead".to_string(), "unclaimed".to_string()]);
    assert_eq!(r.orphans, vec![orphan.id.clone()]);
    assert_eq!(new.count(), 1, "the reattached pod counts");
    assert_eq!(new.phase("keep"), Some(Phase::Running));
    ping(&h.state_dir().join("keep/agent.sock")).await.unwrap();
    assert!(proxies[0].alive());
    assert!(!proxies[1].alive() && !proxies[2].alive());
    assert!(!h.state_dir().join("unclaimed").exists() && !h.state_dir().join("dead").exists());
    assert_eq!(h.provider.count(), 1);
    assert_eq!(h.tunnel.live(), 1);
    // The kept pod is managed as before.
    new.stop_vm("keep").await.unwrap();
    assert!(!proxies[0].alive());
    assert_eq!(h.provider.count(), 0);
    assert_eq!(h.tunnel.live(), 0);
    assert!(std::fs::read_dir(h.state_dir()).unwrap().next().is_none());
    assert_eq!(processes_mentioning(&h.state_dir()), Vec::<u32>::new(), "processes left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_claimed_created_pods_and_destroys_interrupted_starts() {
    let h = Harness::new("PEERPODS_LIMIT_PER_NODE=2\n");
    let old = h.core();
    old.create_vm("created", annotations(&[]), NETNS).unwrap();
    old.create_vm("interrupted", annotations(&[]), NETNS).unwrap();
    old.start_vm("interrupted", T).await.unwrap();
    // The service died mid-start: state says starting, the podvm and proxy exist.
    let dir = h.state_dir().join("interrupted");
    let mut st = state::read(&dir).unwrap();
    let proxy = st.proxy.unwrap();
    st.phase = Phase::Starting;
    state::write(&dir, &st).unwrap();
    let _c1 = h.claim("created");
    let _c2 = h.claim("interrupted");
    drop(old);
    let new = h.core();
    let r = new.recover().await;
    assert_eq!(r.reattached, vec!["created".to_string()]);
    assert_eq!(r.destroyed, vec!["interrupted".to_string()]);
    assert!(r.orphans.is_empty(), "{r:?}");
    assert!(!dir.exists());
    eventually("interrupted proxy gone", || !proxy.alive()).await;
    assert_eq!(h.provider.count(), 0);
    assert_eq!(h.tunnel.live(), 0);
    // The reattached created pod counts and still starts.
    assert_eq!(new.count(), 1);
    new.create_vm("other", annotations(&[]), NETNS).unwrap();
    let e = new.create_vm("third", annotations(&[]), NETNS).unwrap_err();
    assert!(e.to_string().starts_with("peer pod limit reached: PEERPODS_LIMIT_PER_NODE=2"), "{e}");
    new.start_vm("created", T).await.unwrap();
    ping(&h.state_dir().join("created/agent.sock")).await.unwrap();
    for p in ["created", "other"] {
        new.stop_vm(p).await.unwrap();
    }
    assert_eq!(processes_mentioning(&h.state_dir()), Vec::<u32>::new(), "processes left");
}
