//! Bounded reading of text the host does not control: the guest console (QEMU's stdout) and the
//! helper daemons' stderr (QEMU, virtiofsd, vhost-device-vsock; a compromised guest can make
//! them print). Memory, log volume and time per line are bounded whatever the writer sends:
//!
//! - the stream is read in fixed chunks ([`CHUNK`]); a line longer than [`Limits::max_line`]
//!   keeps its first `max_line` bytes and notes how many were cut, the rest is skipped without
//!   being stored;
//! - lines are logged at most at a token-bucket rate (`burst`, then `per_sec`); the lines over
//!   the rate are counted and reported by one "suppressed N lines" record per `interval`;
//! - every line (cut, logged or not) goes to the [`Tail`] kept for error messages, which is
//!   bounded in lines and bytes.

use std::time::Duration;

use slog::{info, warn, Logger};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::process::Tail;

/// Bytes read from the stream at a time.
pub const CHUNK: usize = 8 * 1024;

/// How much of a stream is kept and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest line kept, in bytes; the rest of a longer line is cut.
    pub max_line: usize,
    /// Lines logged at once before the rate applies.
    pub burst: u32,
    /// Lines logged per second after the burst.
    pub per_sec: u32,
    /// At most one "suppressed" record per this interval.
    pub interval: Duration,
}

/// The guest console: the kernel's boot messages and the agent's log lines.
pub const CONSOLE_LIMITS: Limits =
    Limits { max_line: 4096, burst: 1000, per_sec: 200, interval: Duration::from_secs(1) };

/// A helper daemon's stderr.
pub const STDERR_LIMITS: Limits = Limits { max_line: 4096, burst: 200, per_sec: 50, interval: Duration::from_secs(1) };

/// What the reader reports for each line (or batch of dropped lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// A line within the rate (at most `max_line` bytes plus a "cut" note).
    Line(&'a str),
    /// This many lines were over the rate since the last such record.
    Suppressed(u64),
}

/// Token bucket over whole lines, plus the count of lines it refused.
struct RateLimit {
    limits: Limits,
    tokens: f64,
    last: Instant,
    suppressed: u64,
    /// When the pending "suppressed" record is due (set at the first refused line).
    report_at: Option<Instant>,
}

impl RateLimit {
    fn new(limits: Limits) -> Self {
        RateLimit { limits, tokens: limits.burst as f64, last: Instant::now(), suppressed: 0, report_at: None }
    }

    /// Whether a line arriving now may be logged; if not, it is counted.
    fn admit(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.limits.per_sec as f64;
        self.tokens = (self.tokens + refill).min(self.limits.burst as f64);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            self.report_at.get_or_insert(now + self.limits.interval);
            false
        }
    }

    /// The suppressed count if its record is due at `now` (or `force`d at end of stream).
    fn take_due(&mut self, now: Instant, force: bool) -> Option<u64> {
        match self.report_at {
            Some(at) if force || now >= at => {
                self.report_at = None;
                Some(std::mem::take(&mut self.suppressed))
            }
            _ => None,
        }
    }
}

/// One line being assembled: its first `max_line` bytes and the count of bytes cut.
struct LineBuf {
    kept: Vec<u8>,
    cut: u64,
    max: usize,
}

impl LineBuf {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.max - self.kept.len();
        let take = room.min(bytes.len());
        self.kept.extend_from_slice(&bytes[..take]);
        self.cut += (bytes.len() - take) as u64;
    }

    fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.cut == 0
    }

    /// The finished line (trailing `\r` removed, invalid UTF-8 replaced); resets the buffer.
    fn finish(&mut self) -> String {
        if self.kept.last() == Some(&b'\r') && self.cut == 0 {
            self.kept.pop();
        }
        let mut line = String::from_utf8_lossy(&self.kept).into_owned();
        if self.cut > 0 {
            line.push_str(&format!(" [line cut: {} more bytes]", self.cut));
        }
        self.kept.clear();
        self.cut = 0;
        line
    }
}

/// Reads `reader` to its end (or first error), keeping every line in `tail` and passing the
/// lines within the rate, and the counts of those over it, to `emit`.
pub async fn read_lines<R, F>(mut reader: R, limits: Limits, tail: &Tail, mut emit: F)
where
    R: AsyncRead + Unpin,
    F: FnMut(Record<'_>),
{
    let mut chunk = vec![0u8; CHUNK];
    let mut line = LineBuf { kept: Vec::with_capacity(limits.max_line), cut: 0, max: limits.max_line };
    let mut rate = RateLimit::new(limits);
    loop {
        let n = match rate.report_at {
            Some(at) => tokio::select! {
                r = reader.read(&mut chunk) => r,
                _ = tokio::time::sleep_until(at) => {
                    if let Some(n) = rate.take_due(Instant::now(), false) {
                        emit(Record::Suppressed(n));
                    }
                    continue;
                }
            },
            None => reader.read(&mut chunk).await,
        };
        let n = match n {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut rest = &chunk[..n];
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            line.push(&rest[..i]);
            rest = &rest[i + 1..];
            finish_line(&mut line, &mut rate, tail, &mut emit);
        }
        line.push(rest);
    }
    if !line.is_empty() {
        finish_line(&mut line, &mut rate, tail, &mut emit);
    }
    if let Some(n) = rate.take_due(Instant::now(), true) {
        emit(Record::Suppressed(n));
    }
}

fn finish_line<F: FnMut(Record<'_>)>(line: &mut LineBuf, rate: &mut RateLimit, tail: &Tail, emit: &mut F) {
    let text = line.finish();
    let now = Instant::now();
    if let Some(n) = rate.take_due(now, false) {
        emit(Record::Suppressed(n));
    }
    if rate.admit(now) {
        emit(Record::Line(&text));
    }
    tail.push(text);
}

/// Starts the task that logs the guest console (QEMU's stdout, the serial port) and keeps its
/// last lines in `tail`.
pub fn spawn_console_reader<R>(reader: R, tail: Tail, log: Logger)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        read_lines(reader, CONSOLE_LIMITS, &tail, |r| match r {
            Record::Line(line) => info!(log, "reading guest console"; "vmconsole" => line),
            Record::Suppressed(n) => {
                warn!(log, "guest console: suppressed {} lines (more than {} lines/s)", n, CONSOLE_LIMITS.per_sec)
            }
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{TAIL_BYTES, TAIL_LINES};
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use tokio::io::AsyncWriteExt;

    /// Counts the bytes live on each thread, so a test can see what one reader holds at most.
    struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn account(delta: isize) {
        let _ = LIVE.try_with(|live| {
            let v = live.get() + delta;
            live.set(v);
            let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
        });
    }

    // SAFETY: forwards to the system allocator; the accounting only touches const-initialised
    // thread-locals (no allocation, no destructor).
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let p = System.alloc(l);
            if !p.is_null() {
                account(l.size() as isize);
            }
            p
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            System.dealloc(p, l);
            account(-(l.size() as isize));
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            let q = System.realloc(p, l, new);
            if !q.is_null() {
                account(new as isize - l.size() as isize);
            }
            q
        }
    }

    #[global_allocator]
    static ALLOC: Counting = Counting;

    /// Starts measuring: the peak from now on, relative to what is live now.
    fn measure() -> impl Fn() -> usize {
        let base = LIVE.with(|l| l.get());
        PEAK.with(|p| p.set(base));
        move || (PEAK.with(|p| p.get()) - base).max(0) as usize
    }

    #[derive(Default, Debug)]
    struct Seen {
        lines: u64,
        suppressed_records: u64,
        suppressed_lines: u64,
        longest: usize,
        last: String,
    }

    /// Writes `total` bytes made of `pattern` repeated, then closes.
    async fn feed(mut w: tokio::io::DuplexStream, pattern: &'static [u8], total: u64) {
        let mut left = total;
        while left > 0 {
            let n = left.min(pattern.len() as u64) as usize;
            if w.write_all(&pattern[..n]).await.is_err() {
                return;
            }
            left -= n as u64;
        }
    }

    async fn run(pattern: &'static [u8], total: u64, limits: Limits, tail: &Tail) -> (Seen, usize, Duration) {
        let (r, w) = tokio::io::duplex(64 * 1024);
        let peak = measure();
        let started = std::time::Instant::now();
        let mut seen = Seen::default();
        tokio::join!(feed(w, pattern, total), async {
            read_lines(r, limits, tail, |rec| match rec {
                Record::Line(l) => {
                    seen.lines += 1;
                    seen.longest = seen.longest.max(l.len());
                    seen.last.clear();
                    seen.last.push_str(&l[..l.len().min(200)]);
                }
                Record::Suppressed(n) => {
                    seen.suppressed_records += 1;
                    seen.suppressed_lines += n;
                }
            })
            .await
        });
        (seen, peak(), started.elapsed())
    }

    fn pattern_of(line: &[u8], size: usize) -> &'static [u8] {
        let mut v = Vec::with_capacity(size);
        while v.len() + line.len() <= size {
            v.extend_from_slice(line);
        }
        Vec::leak(v)
    }

    #[tokio::test]
    async fn a_100_mb_line_is_cut_and_never_held() {
        let pattern = pattern_of(b"x", 64 * 1024);
        let tail = Tail::default();
        let mut data = 100u64 << 20;
        data -= data % pattern.len() as u64;
        let (seen, peak, elapsed) = run(pattern, data, CONSOLE_LIMITS, &tail).await;
        eprintln!("100 MiB line: peak {peak} bytes held, {elapsed:?}, {seen:?}");
        assert_eq!(seen.lines, 1, "{seen:?}");
        assert!(seen.last.starts_with("xxxx"), "{seen:?}");
        let lines = tail.lines();
        assert_eq!(lines.len(), 1);
        let expected_note = format!(" [line cut: {} more bytes]", data - 4096);
        assert_eq!(lines[0].len(), 4096 + expected_note.len());
        assert!(lines[0].ends_with(&expected_note), "{}", &lines[0][4000..]);
        assert!(peak < 512 * 1024, "the reader held {peak} bytes for a 100 MiB line");
    }

    #[tokio::test]
    async fn a_gigabyte_flood_keeps_memory_logs_and_tail_bounded() {
        // 1 GiB of 1 MiB lines: every line cut, 1024 lines over a burst of 100.
        let line: &'static [u8] = {
            let mut v = vec![b'y'; (1 << 20) - 1];
            v.push(b'\n');
            Vec::leak(v)
        };
        let limits = Limits { max_line: 4096, burst: 100, per_sec: 10, interval: Duration::from_millis(200) };
        let tail = Tail::default();
        let (seen, peak, elapsed) = run(line, 1 << 30, limits, &tail).await;
        eprintln!("1 GiB flood: peak {peak} bytes held, {elapsed:?}, {seen:?}, tail {} bytes", tail.bytes());
        assert_eq!(seen.lines + seen.suppressed_lines, 1024, "every line is logged or counted: {seen:?}");
        let allowed = 100 + (elapsed.as_secs_f64() * 10.0).ceil() as u64 + 1;
        assert!(seen.lines <= allowed, "{} lines logged in {elapsed:?}, at most {allowed} allowed", seen.lines);
        assert!(seen.suppressed_records >= 1, "{seen:?}");
        let max_records = (elapsed.as_secs_f64() / 0.2).ceil() as u64 + 1;
        assert!(seen.suppressed_records <= max_records, "{seen:?} in {elapsed:?}");
        assert!(seen.longest <= 4096 + 40, "{seen:?}");
        assert!(tail.bytes() <= TAIL_BYTES && tail.lines().len() <= TAIL_LINES, "tail {} bytes", tail.bytes());
        assert!(peak < 512 * 1024, "the reader held {peak} bytes");
    }

    #[tokio::test]
    async fn short_line_flood_is_rate_limited_with_one_suppressed_record_per_interval() {
        // 20 MB of 20-byte lines, about 1M lines, as fast as the pipe goes.
        let pattern = pattern_of(b"guest says: flood!\n", 64 * 1024);
        let total_lines = 1_000_000u64;
        let limits = Limits { max_line: 4096, burst: 50, per_sec: 100, interval: Duration::from_millis(100) };
        let tail = Tail::default();
        let bytes = total_lines * 19;
        let (seen, peak, elapsed) = run(pattern, bytes, limits, &tail).await;
        eprintln!("1M short lines: peak {peak} bytes held, {elapsed:?}, {seen:?}");
        assert_eq!(seen.lines + seen.suppressed_lines, total_lines, "{seen:?}");
        let allowed = 50 + (elapsed.as_secs_f64() * 100.0).ceil() as u64 + 1;
        assert!(seen.lines <= allowed, "{} lines logged in {elapsed:?}, at most {allowed}", seen.lines);
        assert!(seen.suppressed_records >= 1);
        let max_records = (elapsed.as_secs_f64() / 0.1).ceil() as u64 + 1;
        assert!(seen.suppressed_records <= max_records, "{seen:?} in {elapsed:?}");
        assert_eq!(tail.lines().len(), TAIL_LINES);
        assert!(peak < 512 * 1024, "the reader held {peak} bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn the_suppressed_record_comes_after_the_interval_even_when_the_stream_goes_quiet() {
        let (r, mut w) = tokio::io::duplex(4096);
        let limits = Limits { max_line: 64, burst: 2, per_sec: 1, interval: Duration::from_secs(1) };
        let tail = Tail::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let t = tail.clone();
        let reader = tokio::spawn(async move {
            read_lines(r, limits, &t, |rec| {
                let _ = tx.send(match rec {
                    Record::Line(l) => format!("line {l}"),
                    Record::Suppressed(n) => format!("suppressed {n}"),
                });
            })
            .await
        });
        w.write_all(b"a\r\nb\nc\nd\ne\n").await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), "line a");
        assert_eq!(rx.recv().await.unwrap(), "line b");
        // c, d, e are over the rate; the writer stays open and silent.
        let before = Instant::now();
        assert_eq!(rx.recv().await.unwrap(), "suppressed 3");
        assert!(Instant::now() - before >= Duration::from_millis(990));
        assert_eq!(tail.lines(), ["a", "b", "c", "d", "e"]);
        drop(w);
        reader.await.unwrap();
        assert!(rx.recv().await.is_none(), "nothing more after the end");
    }

    #[tokio::test]
    async fn a_last_line_without_newline_and_invalid_utf8_are_kept() {
        let (r, mut w) = tokio::io::duplex(4096);
        w.write_all(b"ok\n\xff\xfe tail").await.unwrap();
        drop(w);
        let tail = Tail::default();
        let mut got = Vec::new();
        read_lines(r, CONSOLE_LIMITS, &tail, |rec| got.push(format!("{rec:?}"))).await;
        assert_eq!(got, [r#"Line("ok")"#, "Line(\"\u{fffd}\u{fffd} tail\")"]);
        assert_eq!(tail.lines(), ["ok", "\u{fffd}\u{fffd} tail"]);
    }
}
