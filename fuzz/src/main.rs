//! `podvisor-fuzz`: the long fuzzing pass (`make fuzz`). Runs each target from its seed corpus
//! for a time or input budget and prints, per target, the inputs tried and the crashes found;
//! crashing inputs are saved under `--crash-dir` (default `fuzz/crashes`).
//!
//! ```text
//! podvisor-fuzz [--seconds N] [--iters N] [--seed N] [--crash-dir DIR] [--list] [TARGET...]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use podvisor_fuzz::{run, targets, Config};

fn usage() -> String {
    "usage: podvisor-fuzz [--seconds N] [--iters N] [--seed N] [--crash-dir DIR] [--list] [TARGET...]".into()
}

fn main() -> ExitCode {
    let mut seconds = 20u64;
    let mut iters = u64::MAX;
    let mut seed = None;
    let mut crash_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/crashes"));
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> Result<u64, String> {
            args.next().and_then(|v| v.parse().ok()).ok_or_else(|| format!("{what} needs a number; {}", usage()))
        };
        let parsed = match a.as_str() {
            "--seconds" => num("--seconds").map(|v| seconds = v),
            "--iters" => num("--iters").map(|v| iters = v),
            "--seed" => num("--seed").map(|v| seed = Some(v)),
            "--crash-dir" => match args.next() {
                Some(d) => {
                    crash_dir = PathBuf::from(d);
                    Ok(())
                }
                None => Err(format!("--crash-dir needs a directory; {}", usage())),
            },
            "--list" => {
                for t in targets() {
                    println!("{}", t.name);
                }
                return ExitCode::SUCCESS;
            }
            "-h" | "--help" => {
                println!("{}", usage());
                return ExitCode::SUCCESS;
            }
            other if other.starts_with('-') => Err(format!("unknown option {other}; {}", usage())),
            other => {
                names.push(other.to_string());
                Ok(())
            }
        };
        if let Err(e) = parsed {
            eprintln!("podvisor-fuzz: {e}");
            return ExitCode::from(2);
        }
    }
    let all = targets();
    for n in &names {
        if !all.iter().any(|t| &t.name == n) {
            let known: Vec<&str> = all.iter().map(|t| t.name).collect();
            eprintln!("podvisor-fuzz: no target {n:?}; targets: {}", known.join(", "));
            return ExitCode::from(2);
        }
    }
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    println!("podvisor-fuzz: seed {seed}, {seconds} s per target, crashes saved under {}", crash_dir.display());
    let mut crashed = 0;
    for t in all.iter().filter(|t| names.is_empty() || names.iter().any(|n| n == t.name)) {
        let cfg = Config {
            iters,
            time_limit: Some(Duration::from_secs(seconds)),
            seed,
            max_len: 4096,
            crash_dir: Some(crash_dir.clone()),
            slow: Duration::from_secs(3),
        };
        let report = run(t, &cfg);
        println!("{}", report.details());
        crashed += report.crashes.len();
    }
    if crashed > 0 {
        println!("podvisor-fuzz: {crashed} finding(s); each becomes a regression test in fuzz/tests/regressions.rs");
        ExitCode::FAILURE
    } else {
        println!("podvisor-fuzz: no crashes");
        ExitCode::SUCCESS
    }
}
