//! End-to-end: operators see inside (issue 11). A real Prometheus (Debian's 2.42, private
//! configuration and data, loopback only; `podvisor_tests::prometheus`) scrapes `kata-monitor`
//! (one per CRI runtime endpoint, Kata's flags) while two pods run, one through containerd's CRI
//! plugin and one through CRI-O: PromQL through Prometheus's HTTP API finds
//! `kata_hypervisor_fds`, `kata_guest_meminfo` and
//! `kata_shim_agent_rpc_durations_histogram_milliseconds_count` for both sandboxes with their
//! pod names (`cri_name`), uids and namespaces; the monitors' text passes the check against
//! Kata's name list (`tests/data/kata-metrics.txt`, `podvisor_tests::prom`). A shim that hangs
//! (SIGSTOP) or is SIGKILLed in the middle of a scrape is counted in
//! `kata_monitor_scrape_failed_count` and the scrape still answers, without that sandbox, within
//! [`SCRAPE_BOUND`]; a pod that stops is gone from the next scrape and from Prometheus's
//! instant queries. Nothing is left: pods, monitors, Prometheus and their directories.
//!
//! Run: `cargo build -p podvisor-shim -p podvisor-monitor && cargo test -p podvisor-tests
//! --test observability -- --test-threads=1`.

use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use podvisor_tests::cri::{require_kata, Cri, Manager, Pod};
use podvisor_tests::faults::{shim_pid, teardown};
use podvisor_tests::kata_monitor::KataMonitor;
use podvisor_tests::prom::{self, NameList, Source};
use podvisor_tests::prometheus::{Prometheus, VectorSample, SELF};

/// How long one kata-monitor scrape may take while a shim hangs or dies: the monitor's
/// per-shim timeout plus slack for TCG pods on a loaded machine. The hung shim never answers,
/// so a monitor that waits for it cannot pass by luck.
const SCRAPE_BOUND: Duration = Duration::from_secs(10);

/// How long to wait for Prometheus to complete fresh healthy scrapes of every target.
const FRESH_SCRAPE: Duration = Duration::from_secs(60);

/// The namespace `Cri::pod_config` gives pods.
const POD_NAMESPACE: &str = "podvisor-test";

#[test]
fn prometheus_harness_scrapes_itself() {
    // Prometheus scraping its own /metrics proves the harness: start, generated configuration,
    // targets API, PromQL, error answers, cleanup on drop.
    let p = Prometheus::start(&[SELF.to_string()], "/metrics").unwrap_or_else(|e| panic!("{e}"));
    let me = p.url().trim_start_matches("http://").to_string();
    let (dir, pid) = (p.dir().to_path_buf(), p.pid().unwrap());
    let targets = p.wait_fresh_scrape(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(targets.len(), 1, "{targets:?}");
    assert_eq!(targets[0]["health"], "up", "{targets:?}");
    let up = p.query_vector("up").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0].labels["instance"], me);
    assert_eq!(up[0].value, 1.0);
    let scrapes = p.query_vector("prometheus_target_scrapes_sample_out_of_order_total").unwrap();
    assert_eq!(scrapes.len(), 1, "{scrapes:?}");
    let heads = p.query_vector("prometheus_tsdb_head_series").unwrap_or_else(|e| panic!("{e}"));
    assert!(heads.first().is_some_and(|s| s.value > 0.0), "{heads:?}");
    // A bad query is an error carrying Prometheus's message.
    let err = p.query("rate(up[").unwrap_err();
    assert!(err.contains("bad_data"), "{err}");
    drop(p);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(!podvisor_tests::alive(pid), "prometheus {pid} left running");
}

#[test]
fn prometheus_missing_target_is_reported_down() {
    // The fresh-scrape wait fails (naming the target and its error) when the target is down.
    let dead = format!("127.0.0.1:{}", podvisor_tests::prometheus::free_port());
    let p = Prometheus::start(&[dead.clone()], "/metrics").unwrap_or_else(|e| panic!("{e}"));
    let err = p.wait_fresh_scrape(Duration::from_secs(20)).unwrap_err();
    assert!(err.contains(&dead) && err.contains("down"), "{err}");
}

/// The samples of `family` naming sandbox `pod` (by id) in a vector.
fn of_pod<'a>(v: &'a [VectorSample], pod: &Pod) -> Vec<&'a VectorSample> {
    v.iter().filter(|s| s.labels.get("sandbox_id") == Some(&pod.id)).collect()
}

/// Asserts the CRI labels kata-monitor put on the samples of `pod`.
fn assert_pod_labels(what: &str, samples: &[&VectorSample], pod: &Pod) {
    assert!(!samples.is_empty(), "{what}: no sample for sandbox {}", pod.id);
    let meta = pod.config.metadata.as_ref().unwrap();
    for s in samples {
        let l = &s.labels;
        assert_eq!(l.get("cri_name"), Some(&meta.name), "{what}: {l:?}");
        assert_eq!(l.get("cri_uid"), Some(&meta.uid), "{what}: {l:?}");
        assert_eq!(l.get("cri_namespace").map(String::as_str), Some(POD_NAMESPACE), "{what}: {l:?}");
    }
}

/// `kata_monitor_scrape_failed_count` in one scrape's text.
fn failed_count(text: &str) -> f64 {
    let s = prom::parse(text).unwrap_or_else(|e| panic!("{e}"));
    prom::value(&s, "kata_monitor_scrape_failed_count", &[])
        .unwrap_or_else(|| panic!("no kata_monitor_scrape_failed_count in:\n{text}"))
}

/// Whether one scrape's text has any sample of sandbox `id`.
fn mentions(text: &str, id: &str) -> bool {
    text.contains(&format!("sandbox_id=\"{id}\""))
}

/// The families with samples of sandbox `id` in one scrape's text (for failure messages).
fn families_of(text: &str, id: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && mentions(l, id))
        .filter_map(|l| l.split(['{', ' ']).next().map(str::to_string))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// The CRI socket of a harness.
fn endpoint(cri: &Cri) -> std::path::PathBuf {
    match cri.manager() {
        Manager::Containerd => cri.containerd().unwrap().socket().to_path_buf(),
        Manager::Crio => cri.crio().unwrap().socket().to_path_buf(),
    }
}

/// A pod the test started, with its monitor.
struct Side {
    // Dropped in this order: the monitor before the manager that removes the pod.
    monitor: KataMonitor,
    pod: Pod,
    cri: Cri,
}

/// SIGCONT on drop, so that a failing assertion never leaves a shim stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0 as i32), Signal::SIGCONT);
    }
}

#[test]
fn kata_monitor_two_pods_promql_faults_stop() {
    require_kata("kata-monitor's metrics");
    let list = NameList::kata();
    if let Err(why) = Manager::Crio.available() {
        panic!("the CRI-O half: {why}");
    }
    let managers = [Manager::Containerd, Manager::Crio];
    let mut sides: Vec<Side> = Vec::new();
    for m in managers {
        let cri = Cri::start(m);
        let name = format!("obs-{}", if m == Manager::Containerd { "ctd" } else { "crio" });
        let pod = cri.run_pod(&cri.pod_config(&name));
        let monitor = KataMonitor::start(&endpoint(&cri), cri.dir()).unwrap_or_else(|e| panic!("{e}"));
        sides.push(Side { monitor, pod, cri });
    }
    let ids: Vec<String> = sides.iter().map(|s| s.pod.id.clone()).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();

    // Each monitor's own text: its pod is there and everything matches Kata's list (other
    // pods of this machine are left out of the check).
    for s in &sides {
        let text = s.monitor.scrape(SCRAPE_BOUND).unwrap_or_else(|e| panic!("{e}"));
        assert!(mentions(&text, &s.pod.id), "{}: no sample of its pod {}:\n{text}", s.cri.manager(), s.pod.id);
        let report = prom::check(&list, &prom::only_sandboxes(&text, &id_refs), Source::Monitor { sandboxes: true });
        assert!(report.is_clean(), "{} monitor's text against Kata's list:\n{report}", s.cri.manager());
        let gz = s.monitor.get("/metrics", true, SCRAPE_BOUND).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(gz.headers.get("content-encoding").map(String::as_str), Some("gzip"), "{:?}", gz.headers);
        assert!(gz.body.starts_with(&[0x1f, 0x8b]), "gzip answer does not start with the gzip magic");
    }

    // Prometheus scrapes both monitors.
    let targets: Vec<String> = sides.iter().map(|s| s.monitor.address().to_string()).collect();
    let prometheus = Prometheus::start(&targets, "/metrics").unwrap_or_else(|e| panic!("{e}"));
    prometheus.wait_fresh_scrape(FRESH_SCRAPE).unwrap_or_else(|e| panic!("{e}"));
    let selector = format!("sandbox_id=~\"{}\"", id_refs.join("|"));
    for family in
        ["kata_hypervisor_fds", "kata_guest_meminfo", "kata_shim_agent_rpc_durations_histogram_milliseconds_count"]
    {
        let v = prometheus.query_vector(&format!("{family}{{{selector}}}")).unwrap_or_else(|e| panic!("{e}"));
        for s in &sides {
            // Every monitor scrapes every shim of the node; the pod's labels come from the
            // monitor whose CRI runs it (another manager's monitor leaves them empty).
            let addr = s.monitor.address().to_string();
            let mine: Vec<&VectorSample> =
                of_pod(&v, &s.pod).into_iter().filter(|x| x.labels.get("instance") == Some(&addr)).collect();
            assert!(
                !mine.is_empty(),
                "{family}: sandbox {} not scraped through {}'s monitor: {:?}",
                s.pod.id,
                s.cri.manager(),
                of_pod(&v, &s.pod)
            );
            assert_pod_labels(family, &mine, &s.pod);
            // Open fds and RPC counts are positive; meminfo items may be 0 (checked below).
            if family != "kata_guest_meminfo" {
                assert!(mine.iter().all(|x| x.value > 0.0), "{family}: {mine:?}");
            }
        }
    }
    for s in &sides {
        let total = prometheus
            .query_vector(&format!("kata_guest_meminfo{{sandbox_id=\"{}\",item=\"mem_total\"}}", s.pod.id))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(total.iter().any(|x| x.value > 0.0), "mem_total of {}: {total:?}", s.pod.id);
    }

    // A hung shim (SIGSTOP) of the containerd pod: the scrape answers within the bound,
    // without that sandbox, and the failure is counted.
    let ctd = &sides[0];
    let shim = shim_pid(&ctd.pod.id).unwrap_or_else(|| panic!("no shim process for {}", ctd.pod.id));
    let before = failed_count(&ctd.monitor.scrape(SCRAPE_BOUND).unwrap_or_else(|e| panic!("{e}")));
    {
        kill(Pid::from_raw(shim as i32), Signal::SIGSTOP).unwrap();
        let _resume = Resume(shim);
        let t = Instant::now();
        let text = ctd.monitor.scrape(SCRAPE_BOUND + Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e}"));
        let took = t.elapsed();
        assert!(took < SCRAPE_BOUND, "a scrape with a hung shim took {took:?}\n{}", ctd.monitor.logs());
        assert!(!mentions(&text, &ctd.pod.id), "the hung shim's sandbox is in the scrape");
    }
    let after = failed_count(&ctd.monitor.scrape(SCRAPE_BOUND).unwrap_or_else(|e| panic!("{e}")));
    assert!(after >= before + 1.0, "kata_monitor_scrape_failed_count {before} -> {after} with a hung shim");
    let text = ctd.monitor.scrape(SCRAPE_BOUND).unwrap_or_else(|e| panic!("{e}"));
    assert!(mentions(&text, &ctd.pod.id), "the resumed shim's sandbox is not back in the scrape");

    // SIGKILL in the middle of a scrape: the shim is stopped so that the scrape is surely
    // waiting on it, then killed; the scrape answers within the bound and counts the failure.
    let before = after;
    kill(Pid::from_raw(shim as i32), Signal::SIGSTOP).unwrap();
    let resume = Resume(shim);
    let (answer, took) = thread::scope(|scope| {
        let h = scope.spawn(|| {
            let t = Instant::now();
            (ctd.monitor.scrape(SCRAPE_BOUND + Duration::from_secs(5)), t.elapsed())
        });
        thread::sleep(Duration::from_millis(300));
        kill(Pid::from_raw(shim as i32), Signal::SIGKILL).unwrap();
        h.join().unwrap()
    });
    drop(resume);
    let text = answer.unwrap_or_else(|e| panic!("scrape while the shim was SIGKILLed: {e}"));
    assert!(took < SCRAPE_BOUND, "a scrape with a SIGKILLed shim took {took:?}\n{}", ctd.monitor.logs());
    assert!(!mentions(&text, &ctd.pod.id), "the killed shim's sandbox is in the scrape");
    let after = failed_count(&ctd.monitor.scrape(SCRAPE_BOUND).unwrap_or_else(|e| panic!("{e}")));
    assert!(after >= before + 1.0, "kata_monitor_scrape_failed_count {before} -> {after} with a SIGKILLed shim");
    teardown(&ctd.cri, &ctd.pod).unwrap_or_else(|e| panic!("cleaning up after the SIGKILLed shim: {e}"));
    // Gone from Prometheus once it scraped again (the series went stale).
    prometheus.wait_fresh_scrape(FRESH_SCRAPE).unwrap_or_else(|e| panic!("{e}"));
    let left = prometheus.query_vector(&format!("kata_hypervisor_fds{{sandbox_id=\"{}\"}}", ctd.pod.id)).unwrap();
    assert!(left.is_empty(), "the killed pod's series are still current: {left:?}");

    // A pod that stops is gone from the very next scrape, then from Prometheus, on both
    // managers: containerd's StopPodSandbox deletes the sandbox task; CRI-O 1.36's only kills
    // the infra container (the delete comes with RemovePodSandbox), and the shim stops the VM
    // when the sandbox container exits, as Kata does.
    let ctd_stop = ctd.cri.run_pod(&ctd.cri.pod_config("obs-ctd-stop"));
    let gone = |side: &Side, id: &str, what: &str| {
        let text = side.monitor.scrape(SCRAPE_BOUND).unwrap_or_else(|e| panic!("{e}"));
        assert!(!mentions(&text, id), "the {what} pod {id} is still in the scrape: {:?}", families_of(&text, id));
        prometheus.wait_fresh_scrape(FRESH_SCRAPE).unwrap_or_else(|e| panic!("{e}"));
        let left = prometheus.query_vector(&format!("kata_hypervisor_fds{{sandbox_id=\"{id}\"}}")).unwrap();
        assert!(left.is_empty(), "the {what} pod's series are still current: {left:?}");
    };
    let text = ctd.monitor.scrape(SCRAPE_BOUND).unwrap_or_else(|e| panic!("{e}"));
    assert!(mentions(&text, &ctd_stop.id), "the new pod {} is not in the scrape", ctd_stop.id);
    ctd.cri.stop_pod(&ctd_stop);
    gone(ctd, &ctd_stop.id, "stopped");
    ctd.cri.remove_pod(&ctd_stop);
    if let Some(crio) = sides.iter().find(|s| s.cri.manager() == Manager::Crio) {
        crio.cri.stop_pod(&crio.pod);
        gone(crio, &crio.pod.id, "stopped");
        crio.cri.remove_pod(&crio.pod);
    }

    // Nothing left: monitors and Prometheus stopped, their files gone with the harnesses.
    let pids: Vec<u32> = sides.iter().map(|s| s.monitor.pid()).chain(prometheus.pid()).collect();
    let prom_dir = prometheus.dir().to_path_buf();
    drop(prometheus);
    drop(sides);
    for pid in pids {
        assert!(!podvisor_tests::alive(pid), "process {pid} left running");
    }
    assert!(!prom_dir.exists(), "{} left behind", prom_dir.display());
}
