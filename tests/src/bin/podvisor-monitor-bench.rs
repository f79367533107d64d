//! `podvisor-monitor-bench [--scrapes N]` (part of `make bench`): what one `kata-monitor` scrape
//! costs with 1 and with 10 running pods (a private containerd with its CRI plugin, the kata
//! handler, TCG), next to Kata's published figures, and what not being scraped costs.
//!
//! 1. One pod; `kata-monitor --runtime-endpoint <containerd's socket>`; one warm-up scrape,
//!    then `N` scrapes (default 20) of `/metrics`, plain and with `Accept-Encoding: gzip`:
//!    time (median, min, max; from the request to the last byte), response size, gzip size,
//!    families and samples; differences from Kata's name list are printed.
//! 2. Idle: the monitor's CPU time (utime + stime, `/proc/<pid>/stat`) over 10 s without a
//!    scrape must be 0 (Kata's rule: metrics are computed only when asked); the shim's CPU time
//!    over the same window (its metrics endpoint open, nobody scraping) is printed.
//! 3. Nine more pods started in parallel (one thread each), then the same scrapes with 10.
//!
//! Kata's figures are from its metrics design, `docs/design/kata-2-0-metrics.md` in
//! kata-containers, "Performance and overhead": 144K bytes (10K gzipped) per scrape with one
//! sandbox, 9K (2K) with none, 283K (17K) with two, estimated 1.35M (82K) for ten; 20 ms average
//! end to end (Prometheus to kata-monitor and back), on an i5-8500 with KVM.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use podvisor_tests::cri::{self, Cri, Pod};
use podvisor_tests::kata_monitor::{cpu_time, KataMonitor};
use podvisor_tests::prom::{self, NameList, Source};

/// The idle measurement window.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// How long one scrape may take before the benchmark gives up on it.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(30);

/// Kata's published figures (see the module documentation): (sandboxes, bytes, gzip bytes).
const KATA_SIZES: [(usize, &str, &str); 2] = [(1, "144K", "10K"), (10, "1.35M (estimated)", "82K (estimated)")];
/// Kata's published end-to-end scrape time, ms (average).
const KATA_SCRAPE_MS: f64 = 20.0;

fn usage() -> ! {
    eprintln!("usage: podvisor-monitor-bench [--scrapes N]   (default 20)");
    std::process::exit(2);
}

/// What `n` scrapes of one kind measured.
struct Scrapes {
    ms: Vec<f64>,
    bytes: usize,
    gzip_bytes: usize,
    families: usize,
    samples: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    let med = podvisor_tests::median(&mut v);
    (v[0], med, v[v.len() - 1])
}

fn kib(b: usize) -> String {
    format!("{:.1} KiB", b as f64 / 1024.0)
}

/// `n` plain and `n` gzip scrapes (alternating), after one warm-up; checks every plain text
/// against Kata's list and that each of `pods` is in it.
fn scrape(monitor: &KataMonitor, n: usize, pods: &[Pod], list: &NameList) -> Result<(Scrapes, Scrapes)> {
    monitor.scrape(SCRAPE_TIMEOUT).map_err(anyhow::Error::msg)?;
    let ids: Vec<&str> = pods.iter().map(|p| p.id.as_str()).collect();
    let mut plain = Scrapes { ms: vec![], bytes: 0, gzip_bytes: 0, families: 0, samples: 0 };
    let mut gz = Scrapes { ms: vec![], bytes: 0, gzip_bytes: 0, families: 0, samples: 0 };
    for _ in 0..n {
        let a = monitor.get("/metrics", false, SCRAPE_TIMEOUT).map_err(anyhow::Error::msg)?;
        if a.status != 200 {
            bail!("kata-monitor answered {}: {}", a.status, a.text());
        }
        let text = a.text();
        for id in &ids {
            if !text.contains(&format!("sandbox_id=\"{id}\"")) {
                bail!("sandbox {id} is missing from the scrape\n{}", monitor.logs());
            }
        }
        // The names are the observability test's business; here they are reported once.
        if plain.ms.is_empty() {
            let report = prom::check(list, &prom::only_sandboxes(&text, &ids), Source::Monitor { sandboxes: true });
            if report.is_clean() {
                println!("  the scrape matches Kata's name list (tests/data/kata-metrics.txt)");
            } else {
                println!("  the scrape differs from Kata's name list:\n{report}");
            }
        }
        let fams = prom::families(&text).map_err(|e| anyhow::anyhow!("{}", e.join("\n")))?;
        plain.ms.push(ms(a.elapsed));
        plain.bytes = a.body.len();
        plain.families = fams.len();
        plain.samples = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).count();

        let a = monitor.get("/metrics", true, SCRAPE_TIMEOUT).map_err(anyhow::Error::msg)?;
        if a.headers.get("content-encoding").map(String::as_str) != Some("gzip") {
            bail!("no gzip answer to Accept-Encoding: gzip (headers {:?})", a.headers);
        }
        let mut unzipped = Vec::new();
        flate2::read::GzDecoder::new(a.body.as_slice()).read_to_end(&mut unzipped)?;
        gz.ms.push(ms(a.elapsed));
        gz.gzip_bytes = a.body.len();
        gz.bytes = unzipped.len();
    }
    plain.gzip_bytes = gz.gzip_bytes;
    Ok((plain, gz))
}

fn print_scrapes(label: &str, sandboxes: usize, n: usize, plain: &Scrapes, gz: &Scrapes, summary: &mut Vec<String>) {
    let (pmin, pmed, pmax) = stats(&plain.ms);
    let (gmin, gmed, gmax) = stats(&gz.ms);
    let kata = KATA_SIZES
        .iter()
        .find(|k| k.0 == sandboxes)
        .map_or(String::new(), |k| format!("; Kata: {} bytes, {} gzipped, {KATA_SCRAPE_MS:.0} ms average", k.1, k.2));
    println!("  {label}: {n} scrapes each");
    println!(
        "    plain: median {pmed:.1} ms (min {pmin:.1}, max {pmax:.1}), {} ({} bytes), {} families, {} samples",
        kib(plain.bytes),
        plain.bytes,
        plain.families,
        plain.samples
    );
    println!(
        "    gzip:  median {gmed:.1} ms (min {gmin:.1}, max {gmax:.1}), {} ({} bytes; {:.1}x smaller)",
        kib(gz.gzip_bytes),
        gz.gzip_bytes,
        gz.bytes as f64 / gz.gzip_bytes.max(1) as f64
    );
    summary.push(format!(
        "kata-monitor scrape, {sandboxes} pod(s): {pmed:.1} ms median plain, {gmed:.1} ms gzip; {} plain, {} gzip{kata}",
        kib(plain.bytes),
        kib(gz.gzip_bytes)
    ));
}

/// Starts `names` pods in parallel (one thread each).
fn start_pods(cri: &Cri, names: &[String]) -> Result<Vec<Pod>> {
    let results: Vec<Result<Pod, String>> = std::thread::scope(|sc| {
        let hs: Vec<_> = names.iter().map(|n| sc.spawn(move || cri.try_run_pod(&cri.pod_config(n)))).collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("the thread panicked".into()))).collect()
    });
    let errors: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().cloned()).collect();
    if !errors.is_empty() {
        bail!("{} of {} pods failed to start:\n  {}\n{}", errors.len(), names.len(), errors.join("\n  "), cri.logs());
    }
    Ok(results.into_iter().filter_map(Result::ok).collect())
}

fn bench(cri: &Cri, n: usize, summary: &mut Vec<String>) -> Result<()> {
    let list = NameList::kata();
    let t = Instant::now();
    let mut pods = start_pods(cri, &["mon-bench-0".to_string()])?;
    println!("one pod started in {:.1} s", t.elapsed().as_secs_f64());
    let endpoint = cri.containerd().expect("containerd").socket().to_path_buf();
    let monitor = KataMonitor::start(&endpoint, cri.dir()).map_err(anyhow::Error::msg)?;
    println!(
        "kata-monitor {} (pid {}) on {}",
        podvisor_tests::kata_monitor::monitor_binary().display(),
        monitor.pid(),
        monitor.address()
    );

    println!("\n== 1 pod ==");
    let (plain, gz) = scrape(&monitor, n, &pods, &list)?;
    print_scrapes("1 pod", 1, n, &plain, &gz, summary);

    println!("\n== idle: {} s without a scrape ==", IDLE_WINDOW.as_secs());
    let shim = podvisor_tests::faults::shim_pid(&pods[0].id);
    let cpu = |pid: Option<u32>| pid.and_then(cpu_time);
    // Let the last scrape's work settle first.
    std::thread::sleep(Duration::from_secs(1));
    let (m0, s0) = (cpu(Some(monitor.pid())), cpu(shim));
    std::thread::sleep(IDLE_WINDOW);
    let (m1, s1) = (cpu(Some(monitor.pid())), cpu(shim));
    let (Some(m0), Some(m1)) = (m0, m1) else { bail!("kata-monitor's /proc/{}/stat is unreadable", monitor.pid()) };
    let monitor_idle = m1 - m0;
    println!("  kata-monitor CPU time: {} ms (utime + stime)", monitor_idle.as_millis());
    let shim_idle = match (s0, s1) {
        (Some(a), Some(b)) => format!("{} ms", (b - a).as_millis()),
        _ => "unreadable".to_string(),
    };
    println!("  shim CPU time (endpoint open, not scraped): {shim_idle}");
    summary.push(format!(
        "idle {} s: kata-monitor {} ms CPU (must be 0), one pod's shim {shim_idle}",
        IDLE_WINDOW.as_secs(),
        monitor_idle.as_millis()
    ));

    println!("\n== 10 pods (9 more started in parallel) ==");
    let t = Instant::now();
    let names: Vec<String> = (1..10).map(|i| format!("mon-bench-{i}")).collect();
    pods.extend(start_pods(cri, &names)?);
    println!("  9 pods started in {:.1} s", t.elapsed().as_secs_f64());
    let (plain, gz) = scrape(&monitor, n, &pods, &list)?;
    print_scrapes("10 pods", 10, n, &plain, &gz, summary);
    drop(monitor);
    // StopPodSandbox + RemovePodSandbox per pod, then the leak check; failures are collected
    // (the harness's drop cleans up whatever is left and says so).
    let mut errors = Vec::new();
    for p in &pods {
        let r = cri
            .block_on(cri.client().stop_pod_sandbox(&p.id))
            .and_then(|_| cri.block_on(cri.client().remove_pod_sandbox(&p.id)))
            .map_err(|e| format!("sandbox {}: {e}", p.id))
            .and_then(|_| cri.check_pod_gone(p));
        if let Err(e) = r {
            errors.push(e);
        }
    }
    if !errors.is_empty() {
        bail!("removing the pods: {}", errors.join("\n"));
    }
    if monitor_idle > Duration::ZERO {
        bail!(
            "kata-monitor used {} ms of CPU in {} s without a scrape (must be 0)",
            monitor_idle.as_millis(),
            IDLE_WINDOW.as_secs()
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    // `make bench` builds release binaries: use them even when a debug build is newer.
    let ws = podvisor_tests::workspace();
    for (var, bin) in [("PODVISOR_SHIM", "containerd-shim-kata-v2"), ("PODVISOR_MONITOR", "kata-monitor")] {
        let release = ws.join("target/release").join(bin);
        if std::env::var_os(var).is_none() && release.is_file() {
            std::env::set_var(var, &release);
        }
    }
    let mut n = 20usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--scrapes" => n = it.next().and_then(|v| v.parse().ok()).filter(|v| *v > 0).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    if cri::handler() != cri::KATA_HANDLER {
        bail!("podvisor-monitor-bench measures VMs: unset PODVISOR_CRI_HANDLER (it is {})", cri::handler());
    }
    println!("podvisor kata-monitor benchmark: {n} scrapes per point, containerd CRI, TCG");
    let started = Instant::now();
    let cri = Cri::try_start(cri::Manager::Containerd).map_err(anyhow::Error::msg)?;
    let dir = cri.dir().to_path_buf();
    let mut summary = Vec::new();
    let result = bench(&cri, n, &mut summary);
    // Dropping the harness removes pods still there and panics with what it had to clean up.
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(cri)));
    if let Err(e) = &result {
        summary.push(format!("FAILED: {e:#}"));
    }
    println!();
    println!("---- podvisor kata-monitor benchmark summary ({:.0} s) ----", started.elapsed().as_secs_f64());
    for l in &summary {
        println!("{l}");
    }
    println!(
        "Kata's figures: docs/design/kata-2-0-metrics.md (kata-containers), \"Performance and overhead\": \
         144K / 10K gzipped with 1 sandbox, 20 ms end to end (i5-8500, KVM); podvisor here runs TCG"
    );
    println!("---- end of summary ----");
    if dropped.is_err() || Path::new(&dir).exists() {
        bail!("tearing down the private containerd found leftovers (see above)");
    }
    result
}
