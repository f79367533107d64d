//! `make soak`: create/delete cycles of a two-container pod through the CRI of containerd and
//! CRI-O (alternating), a fault injected every 10th cycle, one resident pod per manager whose
//! shim's fds and RSS are sampled (`podvisor_tests::soak`). Exits 1 when a cycle failed or
//! anything leaked.
//!
//! Usage: `podvisor-soak [--cycles N] [--fault-every N]` (defaults 200 and 10; 0: no faults).

use podvisor_tests::soak::{run, SoakOptions};

fn parse(args: &[String]) -> Result<SoakOptions, String> {
    let mut opts = SoakOptions::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<u32, String> {
            let v = it.next().ok_or(format!("{name} needs a number"))?;
            v.parse().map_err(|_| format!("{name} {v}: not a number"))
        };
        match a.as_str() {
            "--cycles" => opts.cycles = value("--cycles")?,
            "--fault-every" => opts.fault_every = value("--fault-every")?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if opts.cycles == 0 {
        return Err("--cycles must be at least 1".into());
    }
    Ok(opts)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("podvisor-soak: {e}");
            }
            eprintln!("usage: podvisor-soak [--cycles N (default 200)] [--fault-every N (default 10, 0: none)]");
            std::process::exit(2);
        }
    };
    let report = run(opts);
    print!("{}", report.text());
    std::process::exit(if report.ok() { 0 } else { 1 });
}
