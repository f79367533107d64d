//! A guest that floods its console (the serial port QEMU hands to the shim) cannot grow the
//! shim's memory or its log: a container given the guest's `/dev/ttyS0` writes one multi-megabyte line and a
//! burst of short lines to the guest's `/dev/ttyS0`; the shim's peak RSS stays near where it
//! was and the console records in the log stay within the reader's rate (see
//! `hypervisor/src/console.rs`). Measured with 16 MiB and 20 000 lines: before the bounded
//! reader the shim's peak RSS went from 17.7 to 99.6 MB and 19 942 console records were
//! logged; with it, +96 KiB and 2 687 records plus 8 "suppressed" records.
//!
//! Prerequisites (a missing one is a failure): `scripts/deps.sh`, `make guest-image`,
//! `cargo build -p podvisor-shim`. Run:
//! `cargo test -p podvisor-tests --test console_flood -- --test-threads=1`.

use std::time::{Duration, Instant};

use podvisor_tests::containerd::{require_kata, TestContainerd};
use podvisor_tests::image;

const STATE_TIMEOUT: Duration = Duration::from_secs(90);
/// The long line, in bytes.
const LONG_LINE: u64 = 4 << 20;
/// The short lines.
const SHORT_LINES: u64 = 6_000;

/// The shim serving pod `id`.
fn shim_pid(id: &str) -> u32 {
    let want = format!("-id\0{id}\0");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("containerd-shim-kata-v2") && cmd.contains(&want) {
            return pid;
        }
    }
    panic!("no containerd-shim-kata-v2 process for {id}");
}

/// `VmHWM` (peak RSS) of `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

fn console_records(ctd: &TestContainerd) -> (usize, usize) {
    let log = std::fs::read_to_string(ctd.log_file()).unwrap_or_default();
    let lines = log.lines().filter(|l| l.contains("reading guest console")).count();
    let suppressed = log.lines().filter(|l| l.contains("guest console: suppressed")).count();
    (lines, suppressed)
}

#[test]
fn a_guest_flooding_its_console_grows_neither_shim_memory_nor_its_log() {
    require_kata("the guest console");
    let ctd = TestContainerd::start();
    let id = ctd.new_id("conflood");
    let rootfs = image::busybox_rootfs().display().to_string();
    ctd.ctr_ok(&[
        "run",
        "-d",
        "--device",
        "/dev/ttyS0",
        "--runtime",
        ctd.runtime(),
        "--rootfs",
        &rootfs,
        &id,
        "sleep",
        "1000",
    ]);
    ctd.wait_for_status(&id, "RUNNING", STATE_TIMEOUT);
    let shim = shim_pid(&id);
    let before_kib = peak_rss_kib(shim);
    let (before_lines, _) = console_records(&ctd);
    let script = format!(
        "stty -F /dev/ttyS0 raw -echo 2>/dev/null; \
         head -c {LONG_LINE} /dev/zero | tr '\\0' x > /dev/ttyS0; echo > /dev/ttyS0; \
         i=0; while [ $i -lt {SHORT_LINES} ]; do echo flood-line-$i; i=$((i+1)); done > /dev/ttyS0; echo flooded"
    );
    let started = Instant::now();
    let out =
        ctd.ctr_timeout(&["task", "exec", "--exec-id", "flood", &id, "sh", "-c", &script], Duration::from_secs(600));
    let took = started.elapsed();
    assert!(out.status.success(), "the flood failed: {}", ctd.explain(&out));
    // Let the shim read what QEMU still holds.
    std::thread::sleep(Duration::from_secs(3));
    let after_kib = peak_rss_kib(shim);
    let (after_lines, suppressed) = console_records(&ctd);
    let logged = after_lines - before_lines;
    eprintln!(
        "guest wrote a {LONG_LINE}-byte line and {SHORT_LINES} short lines to its console in {took:?}: \
         shim peak RSS {before_kib} -> {after_kib} KiB, {logged} console records logged, {suppressed} \
         'suppressed' records"
    );
    let grew = after_kib.saturating_sub(before_kib);
    assert!(grew < 8 * 1024, "the shim's peak RSS grew by {grew} KiB while the guest flooded its console");
    let allowed = 1000 + (took.as_secs() + 5) as usize * 200;
    assert!(logged <= allowed, "{logged} console lines logged in {took:?}; at most {allowed} expected");
    assert!(suppressed >= 1, "no 'suppressed' record after {SHORT_LINES} lines in {took:?}");
    ctd.ctr_ok(&["task", "kill", "-s", "KILL", &id]);
    ctd.wait_for_status(&id, "STOPPED", STATE_TIMEOUT);
    ctd.ctr_ok(&["task", "rm", &id]);
    ctd.ctr_ok(&["container", "rm", &id]);
    ctd.assert_no_leaks(&[&id]);
}
