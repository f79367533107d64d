//! End-to-end: pods that ask for the node's own namespaces (`hostNetwork`, `hostIPC`,
//! `hostPID`) cannot run in a VM, and must never touch the node: RunPodSandbox fails at once
//! with an error naming the option, on both managers (containerd removes the namespace from
//! the sandbox's spec; CRI-O pins the node's own network and IPC namespaces and passes their
//! paths). The host's addresses, routes, qdiscs and tc filters are snapshotted before and after
//! and must be identical, and a watcher checks that no host interface ever carried a `mirred`
//! redirect while the pod was being refused (before the fix the host's `eth0` was redirected
//! into the VM for about 3 s under CRI-O).
//!
//! The two tests take a lock: the snapshots must not see the other manager's CNI bridge.
//!
//! Run: `cargo test -p podvisor-tests --test host_namespaces`.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use podvisor_tests::cri::{proto, require_kata, Cri, Manager};
use podvisor_tests::on_both_managers;

/// One test at a time: each compares the whole host network before and after.
static HOST: Mutex<()> = Mutex::new(());

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host network namespace's interfaces.
fn host_links() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Addresses, routes (every table, both families), qdiscs and the tc filters of every host
/// interface, one line each, sorted.
fn host_network() -> BTreeSet<String> {
    let mut lines = BTreeSet::new();
    let mut add = |what: &str, text: String| {
        for l in text.lines().filter(|l| !l.trim().is_empty()) {
            // The kernel's own IPv6 duplicate address detection on an interface that appeared
            // just before (another pod's veth): "tentative" goes away and the link-local's
            // local route comes. Neither is anything a shim does.
            if what == "route6" && l.starts_with("local fe80::") && l.contains("proto kernel") {
                continue;
            }
            lines.insert(format!("{what}: {}", l.trim_end().replace(" tentative", "")));
        }
    };
    add("addr", run(&["ip", "-o", "addr", "show"]));
    add("route4", run(&["ip", "-4", "route", "show", "table", "all"]));
    add("route6", run(&["ip", "-6", "route", "show", "table", "all"]));
    add("qdisc", run(&["tc", "qdisc", "show"]));
    for dev in host_links() {
        for hook in ["ingress", "egress"] {
            let out = Command::new("tc").args(["filter", "show", "dev", &dev, hook]).output().unwrap();
            add(&format!("filter {dev} {hook}"), String::from_utf8_lossy(&out.stdout).into_owned());
        }
    }
    lines
}

/// Host interfaces that carry a tc `mirred` action now.
fn host_mirred() -> Vec<String> {
    host_links()
        .into_iter()
        .filter(|dev| {
            let out = Command::new("tc").args(["filter", "show", "dev", dev, "ingress"]).output();
            out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("mirred"))
        })
        .collect()
}

on_both_managers!(
    host_namespaces_are_refused_containerd,
    host_namespaces_are_refused_crio,
    host_namespaces_are_refused
);
fn host_namespaces_are_refused(m: Manager) {
    require_kata("a VM refuses the node's namespaces");
    let _one = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let before = host_network();
    let seen = Mutex::new(Vec::<String>::new());
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let found = host_mirred();
                if !found.is_empty() {
                    seen.lock().unwrap().extend(found);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let cri = Cri::start(m);
        for (option, network, ipc, pid) in [
            ("hostNetwork", proto::NAMESPACE_NODE, proto::NAMESPACE_POD, proto::NAMESPACE_CONTAINER),
            ("hostIPC", proto::NAMESPACE_POD, proto::NAMESPACE_NODE, proto::NAMESPACE_CONTAINER),
            ("hostPID", proto::NAMESPACE_POD, proto::NAMESPACE_POD, proto::NAMESPACE_NODE),
        ] {
            let mut config = cri.pod_config(&option.to_lowercase());
            let ns =
                config.linux.as_mut().unwrap().security_context.as_mut().unwrap().namespace_options.as_mut().unwrap();
            (ns.network, ns.ipc, ns.pid) = (network, ipc, pid);
            let err = cri.run_pod_failing(&config);
            eprintln!("{m} {option}: {err}");
            assert!(err.contains(option), "the error does not name {option}: {err}");
            assert!(err.contains("VM"), "the error does not say why: {err}");
        }
        drop(cri);
        done.store(true, Ordering::Relaxed);
    });
    let seen = seen.into_inner().unwrap();
    assert!(seen.is_empty(), "host interfaces carried a mirred redirect while the pods were refused: {seen:?}");
    let after = host_network();
    let gone: Vec<&String> = before.difference(&after).collect();
    let new: Vec<&String> = after.difference(&before).collect();
    assert!(gone.is_empty() && new.is_empty(), "the host's network changed:\n  gone: {gone:#?}\n  new: {new:#?}");
}
