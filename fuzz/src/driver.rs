//! The fuzzing driver: a seeded, corpus-based mutational fuzzer on the stable toolchain.
//!
//! A target is a closure over `&[u8]` that must not panic, whatever the bytes. [`fuzz`] runs
//! every file of the target's seed corpus as is, then `iters` mutants of them (bit flips,
//! interesting integers, dictionary tokens, insertions, deletions, splices) and some fresh
//! random inputs, all drawn from one seeded RNG: the same seed and corpus give the same inputs.
//! A panic anywhere on the fuzzing thread (also inside a task of a current-thread tokio runtime,
//! which tokio catches) is a crash: its input is shrunk, kept in the [`Report`] and, when
//! `crash_dir` is set, saved as `<crash_dir>/<target>/crash-<hash>` with the panic message next
//! to it (`.txt`).
//!
//! This file depends on `std` only, so the agent (a binary crate) includes it with `#[path]`
//! for its own targets.

#![allow(dead_code)]

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

/// How long and how hard to fuzz one target.
#[derive(Debug, Clone)]
pub struct Config {
    /// Mutated inputs to try after the corpus.
    pub iters: u64,
    /// Stop earlier when this much time has passed (the corpus always runs in full).
    pub time_limit: Option<Duration>,
    /// RNG seed.
    pub seed: u64,
    /// Longest input generated.
    pub max_len: usize,
    /// Where crashing inputs are saved (`<dir>/<target>/crash-<hash>`); `None`: not saved.
    pub crash_dir: Option<PathBuf>,
    /// An input running longer than this is reported as slow (and saved as `slow-<hash>` next
    /// to the crashes); not a failure.
    pub slow: Duration,
}

impl Config {
    /// The short, fixed-seed pass run by `cargo test`: `iters` mutants, unless the environment
    /// says otherwise (`PODVISOR_FUZZ_ITERS`, `PODVISOR_FUZZ_SECONDS`, `PODVISOR_FUZZ_SEED`,
    /// `PODVISOR_FUZZ_CRASH_DIR`; `make fuzz` sets them for the long pass).
    pub fn short(iters: u64) -> Config {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let seconds = env("PODVISOR_FUZZ_SECONDS").and_then(|v| v.parse::<u64>().ok());
        let iters = env("PODVISOR_FUZZ_ITERS").and_then(|v| v.parse().ok()).unwrap_or(if seconds.is_some() {
            u64::MAX
        } else {
            iters
        });
        Config {
            iters,
            time_limit: seconds.map(Duration::from_secs),
            seed: env("PODVISOR_FUZZ_SEED").and_then(|v| v.parse().ok()).unwrap_or(0x5eed_0f_f022),
            max_len: 4096,
            crash_dir: env("PODVISOR_FUZZ_CRASH_DIR").map(PathBuf::from),
            slow: Duration::from_secs(3),
        }
    }
}

/// One distinct crash (the first input seen for its panic message).
#[derive(Debug, Clone)]
pub struct Crash {
    /// The panic message and location.
    pub message: String,
    /// The (shrunk) input.
    pub input: Vec<u8>,
    /// Where it was saved.
    pub saved: Option<PathBuf>,
    /// How many inputs hit this crash.
    pub hits: u64,
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Report {
    /// Target name.
    pub target: String,
    /// Seed used.
    pub seed: u64,
    /// Corpus files run.
    pub corpus: usize,
    /// Inputs tried, corpus included.
    pub tried: u64,
    /// Distinct crashes.
    pub crashes: Vec<Crash>,
    /// Inputs slower than `Config::slow`: (input, time).
    pub slow: Vec<(Vec<u8>, Duration)>,
    /// Wall time.
    pub elapsed: Duration,
}

impl Report {
    /// One line: target, inputs tried, crashes, time.
    pub fn summary(&self) -> String {
        let crashes: u64 = self.crashes.iter().map(|c| c.hits).sum();
        format!(
            "{:<22} seed {:<20} corpus {:>3}  inputs {:>9}  crashes {:>3} ({} distinct)  slow {:>2}  {:>7.2}s",
            self.target,
            self.seed,
            self.corpus,
            self.tried,
            crashes,
            self.crashes.len(),
            self.slow.len(),
            self.elapsed.as_secs_f64()
        )
    }

    /// The summary plus, per crash, its message, input and file.
    pub fn details(&self) -> String {
        let mut s = self.summary();
        for c in &self.crashes {
            s.push_str(&format!(
                "\n  crash ({} inputs): {}\n    input ({} bytes): {}\n    saved: {}",
                c.hits,
                c.message,
                c.input.len(),
                escape(&c.input, 300),
                c.saved.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(not saved)".into())
            ));
        }
        for (input, t) in &self.slow {
            s.push_str(&format!("\n  slow ({t:?}): {}", escape(input, 200)));
        }
        s
    }

    /// Prints [`Report::details`] to stderr and, when `PODVISOR_FUZZ_REPORT` names a file,
    /// appends them there (`make fuzz` collects the agent's targets, whose test output libtest
    /// captures, that way).
    pub fn publish(&self) {
        let details = self.details();
        eprintln!("{details}");
        if let Some(file) = std::env::var_os("PODVISOR_FUZZ_REPORT").filter(|f| !f.is_empty()) {
            use std::io::Write;
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)
                .and_then(|mut f| writeln!(f, "{details}"));
            if let Err(e) = appended {
                eprintln!("cannot append the fuzz report to {}: {e}", PathBuf::from(file).display());
            }
        }
    }

    /// Panics with [`Report::details`] when anything crashed. Slow inputs are only reported:
    /// on a loaded machine any input can stall (a hang of an async target is a crash: it
    /// panics after 5 s).
    pub fn assert_clean(&self) {
        assert!(self.crashes.is_empty(), "{}", self.details());
    }
}

/// `bytes` as a Rust byte-string literal body, cut at `max` bytes.
pub fn escape(bytes: &[u8], max: usize) -> String {
    let mut s: String = bytes.iter().take(max).flat_map(|b| std::ascii::escape_default(*b)).map(char::from).collect();
    if bytes.len() > max {
        s.push_str("...");
    }
    s
}

thread_local! {
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that records panics of threads that are fuzzing instead of
/// printing them; other threads' panics go to the previous hook.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CAPTURING.with(Cell::get) {
                let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
                    s.to_string()
                } else if let Some(s) = info.payload().downcast_ref::<String>() {
                    s.clone()
                } else {
                    "(non-string panic payload)".to_string()
                };
                let at = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
                CAUGHT.with(|c| {
                    c.borrow_mut().get_or_insert(format!("{msg} (at {at})"));
                });
            } else {
                previous(info)
            }
        }));
    });
}

/// Runs `target` on `input`; the first panic's message and location if it panicked.
pub fn run_one(target: &mut dyn FnMut(&[u8]), input: &[u8]) -> Option<String> {
    install_hook();
    CAUGHT.with(|c| c.borrow_mut().take());
    CAPTURING.with(|c| c.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(|| target(input)));
    CAPTURING.with(|c| c.set(false));
    let caught = CAUGHT.with(|c| c.borrow_mut().take());
    match (result, caught) {
        (_, Some(msg)) => Some(msg),
        (Err(_), None) => Some("panic (no message)".into()),
        (Ok(()), None) => None,
    }
}

/// A small, fast, seeded RNG (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// Next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// True with probability 1/n.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// One random mutation of `data`, using `dict` tokens and `other` (another input) for splices.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, dict: &[&[u8]], other: &[u8], max_len: usize) {
    let len = data.len();
    match rng.below(11) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next() as u8;
        }
        2 if len > 0 => {
            // An interesting integer, little or big endian, 1/2/4/8 bytes.
            let v = INTERESTING[rng.below(INTERESTING.len())];
            let width = [1, 2, 4, 8][rng.below(4)];
            let bytes = if rng.one_in(2) { v.to_le_bytes() } else { v.to_be_bytes() };
            let bytes = if bytes[0] == 0 && width < 8 { &bytes[8 - width..] } else { &bytes[..width] };
            let i = rng.below(len);
            for (k, b) in bytes.iter().enumerate() {
                if i + k < data.len() {
                    data[i + k] = *b;
                }
            }
        }
        3 if !dict.is_empty() => {
            let tok = dict[rng.below(dict.len())];
            let i = rng.below(len + 1);
            data.splice(i..i, tok.iter().copied());
        }
        4 if !dict.is_empty() && len > 0 => {
            let tok = dict[rng.below(dict.len())];
            let i = rng.below(len);
            let end = (i + tok.len()).min(len);
            data.splice(i..end, tok.iter().copied());
        }
        5 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            data.drain(i..i + n);
        }
        6 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            data.splice(i..i, bytes);
        }
        7 if len > 0 => {
            // Duplicate a chunk (repetition: nested structures, repeated fields).
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(256));
            let chunk = data[i..i + n].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, chunk);
        }
        8 if !other.is_empty() => {
            // Splice: our head, the other's tail.
            let i = rng.below(len + 1);
            let j = rng.below(other.len());
            data.truncate(i);
            data.extend_from_slice(&other[j..]);
        }
        9 if len > 0 => {
            let i = rng.below(len);
            data.truncate(i);
        }
        _ => {
            let i = rng.below(len + 1);
            data.insert(i, [b'\n', b'"', b'{', b'}', b'[', b']', b'=', b',', b':', 0, b'\\'][rng.below(11)]);
        }
    }
    data.truncate(max_len);
}

/// The files of `dir`, sorted by name (missing directory: none).
pub fn load_corpus(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    files.sort();
    files.into_iter().filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b))).collect()
}

/// Shrinks `input` while it still crashes with the same message (bounded work).
fn shrink(target: &mut dyn FnMut(&[u8]), input: &[u8], message: &str) -> Vec<u8> {
    let mut best = input.to_vec();
    let mut chunk = (best.len() / 2).max(1);
    let mut budget = 2000;
    while chunk >= 1 && budget > 0 {
        let mut i = 0;
        let mut progressed = false;
        while i < best.len() && budget > 0 {
            budget -= 1;
            let mut candidate = best.clone();
            candidate.drain(i..(i + chunk).min(best.len()));
            if run_one(target, &candidate).as_deref() == Some(message) {
                best = candidate;
                progressed = true;
            } else {
                i += chunk;
            }
        }
        if !progressed {
            if chunk == 1 {
                break;
            }
            chunk /= 2;
        }
    }
    best
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Fuzzes `target` (named `name`) from the seed corpus in `corpus_dir`; see the module docs.
pub fn fuzz(name: &str, corpus_dir: &Path, dict: &[&[u8]], cfg: &Config, mut target: impl FnMut(&[u8])) -> Report {
    let started = Instant::now();
    let corpus = load_corpus(corpus_dir);
    let mut rng = Rng::new(cfg.seed ^ fnv(name.as_bytes()));
    let mut report = Report {
        target: name.to_string(),
        seed: cfg.seed,
        corpus: corpus.len(),
        tried: 0,
        crashes: Vec::new(),
        slow: Vec::new(),
        elapsed: Duration::ZERO,
    };
    let check = |input: &[u8], report: &mut Report, target: &mut dyn FnMut(&[u8])| {
        report.tried += 1;
        let t = Instant::now();
        let outcome = run_one(target, input);
        let took = t.elapsed();
        if took > cfg.slow && report.slow.len() < 5 {
            report.slow.push((input.to_vec(), took));
            if let Some(dir) = &cfg.crash_dir {
                let dir = dir.join(name);
                let _ = std::fs::create_dir_all(&dir);
                let _ = std::fs::write(dir.join(format!("slow-{:016x}", fnv(input))), input);
            }
        }
        let Some(message) = outcome else { return };
        if let Some(c) = report.crashes.iter_mut().find(|c| c.message == message) {
            c.hits += 1;
            return;
        }
        let small = shrink(target, input, &message);
        let saved = cfg.crash_dir.as_ref().and_then(|dir| {
            let dir = dir.join(name);
            std::fs::create_dir_all(&dir).ok()?;
            let file = dir.join(format!("crash-{:016x}", fnv(&small)));
            std::fs::write(&file, &small).ok()?;
            std::fs::write(file.with_extension("txt"), format!("{message}\n")).ok()?;
            Some(file)
        });
        report.crashes.push(Crash { message, input: small, saved, hits: 1 });
    };
    for (_, input) in &corpus {
        check(input, &mut report, &mut target);
    }
    let mut i = 0u64;
    while i < cfg.iters && report.crashes.len() < 20 {
        if cfg.time_limit.is_some_and(|l| started.elapsed() >= l) {
            break;
        }
        i += 1;
        let mut input = if corpus.is_empty() || rng.one_in(16) {
            let n = rng.below(64.min(cfg.max_len) + 1);
            (0..n).map(|_| rng.next() as u8).collect()
        } else {
            corpus[rng.below(corpus.len())].1.clone()
        };
        let other = if corpus.is_empty() { &[][..] } else { &corpus[rng.below(corpus.len())].1[..] };
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut input, dict, other, cfg.max_len);
        }
        check(&input, &mut report, &mut target);
    }
    report.elapsed = started.elapsed();
    report
}
