//! The agent's OOM watch (GetOOMEvent waits for changes of the container cgroup's
//! `memory.events`, no polling): a process of a container killed by the OOM killer while the
//! container's init keeps running makes exactly one containerd `/tasks/oom` event, before the
//! container exits (so it cannot come from the WaitProcess path, which reports OOM kills when
//! a container's process is waited for).
//!
//! Prerequisites (a missing one is a failure): `scripts/deps.sh`, `make guest-image`,
//! `cargo build -p podvisor-shim`. Run:
//! `cargo test -p podvisor-tests --test oom_watch -- --test-threads=1`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use podvisor_tests::containerd::{require_kata, TestContainerd, CTR};
use podvisor_tests::image;

const STATE_TIMEOUT: Duration = Duration::from_secs(90);

/// `ctr events`, its lines sent to a channel; killed and reaped on drop.
struct Events {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Events {
    fn start(ctd: &TestContainerd) -> Events {
        let mut child = Command::new(CTR)
            .arg("--address")
            .arg(ctd.socket())
            .arg("events")
            .env_remove("CONTAINERD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{CTR} events: {e}; install containerd (scripts/deps.sh)"));
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Events { child, lines }
    }

    /// Lines mentioning `/tasks/oom` and `id` within `wait` (returns at the first one when
    /// `first_only`).
    fn oom_events(&self, id: &str, wait: Duration, first_only: bool) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut found = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains("/tasks/oom") && l.contains(id) => {
                    found.push(l);
                    if first_only {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        found
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_child_killed_by_the_oom_killer_makes_one_oom_event_while_init_runs() {
    require_kata("the guest agent's OOM watch");
    let ctd = TestContainerd::start();
    let id = ctd.new_id("oomchild");
    let events = Events::start(&ctd);
    // The child shell doubles a string up to 64 MiB (96 MiB live) under a 64 MiB limit; the
    // container's init (the outer shell, a few hundred KiB) survives and sleeps.
    let script = r#"sh -c 'x=0123456789abcdef; i=0; while [ $i -lt 22 ]; do x="$x$x"; i=$((i+1)); done; echo survived'; echo child-ended; sleep 1000"#;
    let rootfs = image::busybox_rootfs().display().to_string();
    ctd.ctr_ok(&[
        "run",
        "-d",
        "--memory-limit",
        "67108864",
        "--runtime",
        ctd.runtime(),
        "--rootfs",
        &rootfs,
        &id,
        "sh",
        "-c",
        script,
    ]);
    ctd.wait_for_status(&id, "RUNNING", STATE_TIMEOUT);
    let first = events.oom_events(&id, Duration::from_secs(60), true);
    assert!(!first.is_empty(), "no /tasks/oom event for {id} within 60 s\n{}", ctd.logs_tail(40));
    // Exactly one: wait a little longer for a duplicate.
    let more = events.oom_events(&id, Duration::from_secs(5), false);
    assert_eq!(first.len() + more.len(), 1, "OOM events: {first:?} {more:?}");
    let ps = ctd.ctr_ok(&["task", "ls"]);
    let line = ps.lines().find(|l| l.starts_with(&id)).unwrap_or_default().to_string();
    assert!(line.contains("RUNNING"), "the container's init should still run after the child's OOM kill: {ps}");
    ctd.ctr_ok(&["task", "kill", "-s", "KILL", &id]);
    ctd.wait_for_status(&id, "STOPPED", STATE_TIMEOUT);
    ctd.ctr_ok(&["task", "rm", &id]);
    ctd.ctr_ok(&["container", "rm", &id]);
    drop(events);
    ctd.assert_no_leaks(&[&id]);
}
