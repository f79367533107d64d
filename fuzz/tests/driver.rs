//! The driver finds what it is meant to find: a planted bug is reached, its input shrunk and
//! saved; a panic inside a tokio task counts; the same seed gives the same inputs.

use std::time::Duration;

use podvisor_fuzz::driver::{fuzz, run_one, Config};

fn config(iters: u64, crash_dir: Option<std::path::PathBuf>) -> Config {
    Config { iters, time_limit: None, seed: 42, max_len: 256, crash_dir, slow: Duration::from_secs(5) }
}

#[test]
fn a_planted_bug_is_found_shrunk_and_saved() {
    let dir = std::env::temp_dir().join(format!("podvisor-fuzz-driver-{}", std::process::id()));
    let corpus = dir.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    std::fs::write(corpus.join("seed"), b"hello world").unwrap();
    let target = |data: &[u8]| {
        if data.windows(3).any(|w| w == b"BUG") {
            panic!("planted bug");
        }
    };
    let report = fuzz("planted", &corpus, &[b"BUG"], &config(5000, Some(dir.join("crashes"))), target);
    assert_eq!(report.crashes.len(), 1, "{}", report.details());
    let crash = &report.crashes[0];
    assert!(crash.message.starts_with("planted bug (at "), "{}", crash.message);
    assert_eq!(crash.input, b"BUG", "shrunk to the bug's trigger");
    let saved = crash.saved.as_ref().expect("saved");
    assert_eq!(std::fs::read(saved).unwrap(), b"BUG");
    assert!(std::fs::read_to_string(saved.with_extension("txt")).unwrap().contains("planted bug"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_panic_in_a_tokio_task_is_a_crash() {
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut target = |_: &[u8]| {
        rt.block_on(async {
            // tokio catches the panic; the JoinError is ignored, as a reader task's would be.
            let _ = tokio::spawn(async { panic!("in a task") }).await;
        })
    };
    let outcome = run_one(&mut target, b"");
    assert!(outcome.as_deref().is_some_and(|m| m.starts_with("in a task")), "{outcome:?}");
    assert_eq!(run_one(&mut |_: &[u8]| {}, b""), None);
}

#[test]
fn the_same_seed_gives_the_same_inputs() {
    let empty = std::env::temp_dir().join("podvisor-fuzz-no-corpus");
    let record = || {
        let mut seen = Vec::new();
        fuzz("same", &empty, &[b"x"], &config(200, None), |d| seen.push(d.to_vec()));
        seen
    };
    let (a, b) = (record(), record());
    assert_eq!(a.len(), 200);
    assert_eq!(a, b);
}
