//! Shim logging: one slog drain that writes Kata-style logfmt lines to the systemd journal, or,
//! when there is no journal, to the bundle's `log` FIFO, or, when there is neither, to stderr.
//!
//! Users debug Kata with `journalctl -t kata`, so every record goes to the journal with
//! `SYSLOG_IDENTIFIER=kata` and a `MESSAGE` shaped like the one upstream's Go shim writes:
//!
//! ```text
//! time="2026-11-23T01:02:03.456789Z" level=info msg="Start logging QEMU" name=containerd-shim-v2 pid=42 qemuPid=123 sandbox=abc source=virtcontainers subsystem=qemu
//! ```
//!
//! The time, level and message come first; every other key-value of the record and its loggers
//! follows in byte order of the key (as logrus prints them), the innermost value winning when a
//! key repeats. Each key-value is also sent as its own journal field (`SANDBOX=`, `QEMUPID=`), so
//! `journalctl -t kata SANDBOX=<id>` works.
//!
//! Records go to the journal over its native protocol: one unix datagram of `KEY=value\n`
//! fields, values holding a newline in the length-prefixed binary form. A record too large for
//! one datagram is written to a sealed memfd whose descriptor is passed with `SCM_RIGHTS`, as
//! journald expects. Nothing here blocks for long or panics: a full journal socket waits at most
//! [`JOURNAL_SEND_TIMEOUT`], a full or reader-less FIFO drops the line.
//!
//! ```no_run
//! use podvisor_shim::logging::{self, keys, LogOptions};
//!
//! let log = logging::init(&LogOptions { debug: false, sandbox: Some("abc".into()), fallback: None });
//! let qemu_log = log.new(slog::o!(keys::SUBSYSTEM => "qemu"));
//! slog::info!(qemu_log, "Start logging QEMU"; keys::QEMU_PID => 123);
//! ```

use std::fmt;
use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use slog::{Drain, Level, Logger, Never, OwnedKVList, Record, KV};

/// Where journald listens for native-protocol datagrams.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// The `SYSLOG_IDENTIFIER` of every record: `journalctl -t kata` finds them.
pub const SYSLOG_IDENTIFIER: &str = "kata";
/// The `name` key of every record, as upstream's Go shim logs it.
pub const LOGGER_NAME: &str = "containerd-shim-v2";
/// The `source` key of a record whose loggers set none.
pub const DEFAULT_SOURCE: &str = "virtcontainers";
/// The longest a record may wait for room on a congested journal socket before it goes to the
/// fallback instead.
pub const JOURNAL_SEND_TIMEOUT: Duration = Duration::from_millis(50);

/// The keys the shim logs with. Put identities in as keys, not into message text.
pub mod keys {
    /// The sandbox (pod) id.
    pub const SANDBOX: &str = "sandbox";
    /// A container id.
    pub const CONTAINER: &str = "container";
    /// An exec id.
    pub const EXEC: &str = "exec";
    /// The part of the shim a child logger belongs to (`qemu`, `agent`, `service`, …).
    pub const SUBSYSTEM: &str = "subsystem";
    /// Who produced the line: `virtcontainers` (the shim) by default, `agent` for forwarded guest logs.
    pub const SOURCE: &str = "source";
    /// The QEMU process id.
    pub const QEMU_PID: &str = "qemuPid";
    /// The vhost-user vsock daemon's process id.
    pub const VSOCKD_PID: &str = "vsockdPid";
    /// A line read from the guest console.
    pub const VMCONSOLE: &str = "vmconsole";
}

/// How the shim logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Log `debug` records too (the config's `enable_debug` or `-debug` on the command line);
    /// otherwise `info` and above.
    pub debug: bool,
    /// The sandbox id, when known, added to every record as `sandbox`.
    pub sandbox: Option<String>,
    /// Where lines go when there is no journal: the bundle's `log` FIFO that containerd and
    /// CRI-O read. Without it, lines go to stderr.
    pub fallback: Option<PathBuf>,
}

/// Builds the shim's root logger: journal if `/run/systemd/journal/socket` takes datagrams,
/// else `opts.fallback`, else stderr. Every record carries `name`, `pid`, `source` and, when
/// known, `sandbox`.
pub fn init(opts: &LogOptions) -> Logger {
    init_with_journal(opts, Path::new(JOURNAL_SOCKET))
}

/// [`init`] with the journal socket at `journal_socket` (tests bind their own).
fn init_with_journal(opts: &LogOptions, journal_socket: &Path) -> Logger {
    let min_level = if opts.debug { Level::Debug } else { Level::Info };
    let sinks =
        Sinks { journal: Journal::connect(journal_socket).ok(), fallback: opts.fallback.clone().map(Fallback::new) };
    let drain = ShimDrain { min_level, sinks: Mutex::new(sinks) };
    let root = Logger::root(
        drain,
        slog::o!("name" => LOGGER_NAME, "pid" => std::process::id(), keys::SOURCE => DEFAULT_SOURCE),
    );
    match &opts.sandbox {
        Some(id) => root.new(slog::o!(keys::SANDBOX => id.clone())),
        None => root,
    }
}

/// Formats one record as a logfmt line (no trailing newline): `time`, `level` and `msg` first,
/// then `fields` sorted by key, the first of repeated keys kept. Values that are empty or hold
/// anything but `[A-Za-z0-9-._/@^+]` are double-quoted with `\"`, `\\`, `\n`, `\t`, `\r` and
/// `\xNN` escapes. Keys named `time`, `level` or `msg` become `fields.time` and so on.
pub fn logfmt_line(time: SystemTime, level: Level, msg: &str, fields: &[(String, String)]) -> String {
    let fields = normalize_fields(fields);
    format_line(time, level, msg, &fields)
}

/// Encodes one record in journald's native protocol: `PRIORITY`, `SYSLOG_IDENTIFIER=kata`,
/// `MESSAGE=<line>`, then each of `fields` under its journal name (see [`journal_field_name`]).
/// A value with a newline is written as the name, `\n`, its length as a little-endian `u64`, the
/// bytes, and `\n`.
pub fn journal_datagram(level: Level, line: &str, fields: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len() * 2 + 64);
    push_journal_field(&mut out, "PRIORITY", syslog_priority(level).to_string().as_bytes());
    push_journal_field(&mut out, "SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER.as_bytes());
    push_journal_field(&mut out, "MESSAGE", line.as_bytes());
    for (key, value) in fields {
        if let Some(name) = journal_field_name(key) {
            push_journal_field(&mut out, &name, value.as_bytes());
        }
    }
    out
}

/// The journal field name for a log key: upper-cased, every character outside `[A-Z0-9_]`
/// replaced by `_`, leading underscores dropped (those fields are journald's own), an `X`
/// put before a leading digit, cut to 64 characters. `None` when nothing is left or the name is
/// one this module sets itself (`MESSAGE`, `PRIORITY`, `SYSLOG_IDENTIFIER`).
pub fn journal_field_name(key: &str) -> Option<String> {
    let mapped: String =
        key.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    let trimmed = mapped.trim_start_matches('_');
    if trimmed.is_empty() {
        return None;
    }
    let mut name = String::with_capacity(trimmed.len() + 1);
    if trimmed.starts_with(|c: char| c.is_ascii_digit()) {
        name.push('X');
    }
    name.push_str(trimmed);
    name.truncate(64);
    match name.as_str() {
        "MESSAGE" | "PRIORITY" | "SYSLOG_IDENTIFIER" => None,
        _ => Some(name),
    }
}

/// The syslog priority journald stores for a slog level.
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::Critical => 2,
        Level::Error => 3,
        Level::Warning => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// The `level=` word for a slog level: logrus's names, and `critical` for slog's extra level.
pub fn level_name(level: Level) -> &'static str {
    match level {
        Level::Critical => "critical",
        Level::Error => "error",
        Level::Warning => "warning",
        Level::Info => "info",
        Level::Debug => "debug",
        Level::Trace => "trace",
    }
}

/// `time` as RFC 3339 in UTC with microseconds, e.g. `2026-11-23T01:02:03.456789Z`. Times before
/// 1970 print as the epoch.
pub fn rfc3339_micros(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_date(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01.
fn civil_date(days_since_epoch: u64) -> (u64, u64, u64) {
    // Count from 0000-03-01 so that the leap day ends each 4/100/400-year cycle.
    let days = days_since_epoch + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

/// Dedups `fields` keeping the first of each key (slog serializes the record's own pairs, then
/// the innermost logger's, out to the root), renames clashes with the fixed keys, sorts by key.
fn normalize_fields(fields: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::with_capacity(fields.len());
    for (key, value) in fields {
        let key = match key.as_str() {
            "time" | "level" | "msg" => format!("fields.{key}"),
            _ => key.clone(),
        };
        if !out.iter().any(|(k, _)| *k == key) {
            out.push((key, value.clone()));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// [`logfmt_line`] for fields already normalized.
fn format_line(time: SystemTime, level: Level, msg: &str, fields: &[(String, String)]) -> String {
    let mut out = String::with_capacity(64 + msg.len() + fields.len() * 24);
    out.push_str("time=");
    push_logfmt_value(&mut out, &rfc3339_micros(time));
    out.push_str(" level=");
    out.push_str(level_name(level));
    out.push_str(" msg=");
    push_logfmt_value(&mut out, msg);
    for (key, value) in fields {
        out.push(' ');
        push_logfmt_key(&mut out, key);
        out.push('=');
        push_logfmt_value(&mut out, value);
    }
    out
}

fn push_logfmt_key(out: &mut String, key: &str) {
    if key.is_empty() {
        out.push('_');
    }
    out.extend(key.chars().map(|c| if c == '=' || c == '"' || c.is_whitespace() || c.is_control() { '_' } else { c }));
}

fn push_logfmt_value(out: &mut String, value: &str) {
    let bare = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/' | '@' | '^' | '+');
    if !value.is_empty() && value.chars().all(bare) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn push_journal_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    if value.contains(&b'\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Collects a record's key-values as strings.
#[derive(Default)]
struct Collector(Vec<(String, String)>);

impl slog::Serializer for Collector {
    fn emit_arguments(&mut self, key: slog::Key, val: &fmt::Arguments) -> slog::Result {
        self.0.push((key.to_string(), val.to_string()));
        Ok(())
    }

    fn emit_str(&mut self, key: slog::Key, val: &str) -> slog::Result {
        self.0.push((key.to_string(), val.to_string()));
        Ok(())
    }
}

/// The drain behind [`init`]'s logger.
struct ShimDrain {
    min_level: Level,
    sinks: Mutex<Sinks>,
}

impl Drain for ShimDrain {
    type Ok = ();
    type Err = Never;

    fn log(&self, record: &Record, values: &OwnedKVList) -> Result<(), Never> {
        if !record.level().is_at_least(self.min_level) {
            return Ok(());
        }
        let mut collector = Collector::default();
        // A Value whose serialization fails only loses its own field.
        let _ = record.kv().serialize(record, &mut collector);
        let _ = values.serialize(record, &mut collector);
        let fields = normalize_fields(&collector.0);
        let line = format_line(SystemTime::now(), record.level(), &record.msg().to_string(), &fields);

        let mut sinks = self.sinks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(journal) = &mut sinks.journal {
            match journal.send(&journal_datagram(record.level(), &line, &fields)) {
                Ok(()) => return Ok(()),
                Err(JournalError::Gone) => sinks.journal = None,
                Err(JournalError::Busy) => {}
            }
        }
        sinks.write_line(&line);
        Ok(())
    }
}

/// Where lines go, tried in order.
struct Sinks {
    journal: Option<Journal>,
    fallback: Option<Fallback>,
}

impl Sinks {
    /// Writes a line where the journal could not take it: the fallback if configured (dropping
    /// the line if it cannot take it now), else stderr.
    fn write_line(&mut self, line: &str) {
        match &mut self.fallback {
            Some(fallback) => fallback.write_line(line),
            None => {
                let mut stderr = io::stderr().lock();
                let _ = stderr.write_all(line.as_bytes()).and_then(|()| stderr.write_all(b"\n"));
            }
        }
    }
}

/// Why a journal send failed.
enum JournalError {
    /// No journald listens any more (ENOENT, ECONNREFUSED after a reconnect): stop using it.
    Gone,
    /// This record could not be sent (congestion, a memfd failure): send it elsewhere.
    Busy,
}

/// A datagram socket connected to journald.
struct Journal {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Journal {
    fn connect(path: &Path) -> io::Result<Journal> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(path)?;
        socket.set_write_timeout(Some(JOURNAL_SEND_TIMEOUT))?;
        Ok(Journal { socket, path: path.to_path_buf() })
    }

    fn send(&mut self, datagram: &[u8]) -> Result<(), JournalError> {
        match self.send_once(datagram) {
            Ok(()) => Ok(()),
            // journald restarted: its new socket has the same path.
            Err(e) if is_gone(&e) => match Journal::connect(&self.path) {
                Ok(fresh) => {
                    *self = fresh;
                    self.send_once(datagram)
                        .map_err(|e| if is_gone(&e) { JournalError::Gone } else { JournalError::Busy })
                }
                Err(_) => Err(JournalError::Gone),
            },
            Err(_) => Err(JournalError::Busy),
        }
    }

    fn send_once(&self, datagram: &[u8]) -> io::Result<()> {
        match self.socket.send(datagram) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMSGSIZE) | Some(libc::ENOBUFS)) => {
                self.send_memfd(datagram)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends a record too large for one datagram the way journald accepts it: in a sealed
    /// memfd, passed with `SCM_RIGHTS` in an otherwise empty datagram.
    fn send_memfd(&self, datagram: &[u8]) -> io::Result<()> {
        let fd = memfd_create(c"podvisor-journal", MemFdCreateFlag::MFD_ALLOW_SEALING | MemFdCreateFlag::MFD_CLOEXEC)?;
        let mut file = File::from(fd);
        file.write_all(datagram)?;
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL;
        fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))?;
        let fds = [file.as_raw_fd()];
        let no_data: [IoSlice; 0] = [];
        sendmsg::<UnixAddr>(
            self.socket.as_raw_fd(),
            &no_data,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )?;
        Ok(())
    }
}

fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ECONNREFUSED) | Some(libc::ENOTCONN))
}

/// The bundle's `log` FIFO (or any file), opened without blocking and reopened when its
/// reader comes back.
struct Fallback {
    path: PathBuf,
    file: Option<(File, bool)>,
}

impl Fallback {
    fn new(path: PathBuf) -> Fallback {
        let mut fallback = Fallback { path, file: None };
        fallback.open();
        fallback
    }

    /// Opens the path write-only and non-blocking. On a FIFO with no reader this fails with
    /// ENXIO; the next line tries again.
    fn open(&mut self) {
        let file =
            std::fs::OpenOptions::new().append(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(&self.path);
        self.file = file.ok().map(|f| {
            let fifo = f.metadata().map(|m| m.file_type().is_fifo()).unwrap_or(false);
            (f, fifo)
        });
    }

    fn write_line(&mut self, line: &str) {
        if self.file.is_none() {
            self.open();
        }
        let Some((file, fifo)) = &mut self.file else { return };
        let mut bytes = Vec::with_capacity(line.len() + 1);
        // Writes of up to PIPE_BUF bytes to a pipe are atomic: a line either goes whole or not
        // at all, so a full FIFO never gets half a line.
        let max = if *fifo { libc::PIPE_BUF - 1 } else { usize::MAX };
        let mut end = line.len().min(max);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        bytes.extend_from_slice(&line.as_bytes()[..end]);
        bytes.push(b'\n');
        match file.write(&bytes) {
            Ok(_) => {}
            // Full: drop the line rather than block a tokio worker.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // EPIPE and the like: the reader went away; reopen on the next line.
            Err(_) => self.file = None,
        }
    }
}

/// A logger whose records ("LEVEL msg k=v …") the test can read.
#[cfg(test)]
pub(crate) fn capture_log() -> (slog::Logger, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use slog::{Drain, OwnedKVList, Record, KV};
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);
    struct Pairs(String);
    impl slog::Serializer for Pairs {
        fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments) -> slog::Result {
            self.0.push_str(&format!(" {key}={val}"));
            Ok(())
        }
    }
    impl Drain for Capture {
        type Ok = ();
        type Err = slog::Never;
        fn log(&self, record: &Record, values: &OwnedKVList) -> Result<(), slog::Never> {
            let mut pairs = Pairs(format!("{} {}", record.level().as_str(), record.msg()));
            let _ = record.kv().serialize(record, &mut pairs);
            let _ = values.serialize(record, &mut pairs);
            self.0.lock().unwrap().push(pairs.0);
            Ok(())
        }
    }
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    (slog::Logger::root(Capture(lines.clone()), slog::o!()), lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{IoSliceMut, Read};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::Instant;

    use nix::sys::socket::{recvmsg, ControlMessageOwned};
    use nix::sys::stat::Mode;
    use slog::{debug, info, o, warn};

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// 2026-11-23T01:02:03.456789Z
    fn sample_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(1_795_395_723_456_789)
    }

    /// Splits a native-protocol datagram into (name, value) pairs, both encodings.
    fn parse_journal(mut buf: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let nl = buf.iter().position(|&b| b == b'\n').expect("field ends with a newline");
            let head = &buf[..nl];
            if let Some(eq) = head.iter().position(|&b| b == b'=') {
                out.push((String::from_utf8(head[..eq].to_vec()).unwrap(), head[eq + 1..].to_vec()));
                buf = &buf[nl + 1..];
            } else {
                let len = u64::from_le_bytes(buf[nl + 1..nl + 9].try_into().unwrap()) as usize;
                let value = buf[nl + 9..nl + 9 + len].to_vec();
                assert_eq!(
                    buf[nl + 9 + len],
                    b'\n',
                    "binary field {} not closed by a newline",
                    String::from_utf8_lossy(head)
                );
                out.push((String::from_utf8(head.to_vec()).unwrap(), value));
                buf = &buf[nl + 10 + len..];
            }
        }
        out
    }

    fn field<'a>(fields: &'a [(String, Vec<u8>)], name: &str) -> &'a str {
        let (_, v) = fields.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name} field in {fields:?}"));
        std::str::from_utf8(v).unwrap()
    }

    #[test]
    fn time_is_rfc3339_utc_with_micros() {
        assert_eq!(rfc3339_micros(sample_time()), "2026-11-23T01:02:03.456789Z");
        assert_eq!(rfc3339_micros(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // 2024-02-29T23:59:59Z, a leap day, and the second after it.
        assert_eq!(rfc3339_micros(UNIX_EPOCH + Duration::from_secs(1_709_251_199)), "2024-02-29T23:59:59.000000Z");
        assert_eq!(rfc3339_micros(UNIX_EPOCH + Duration::from_secs(1_709_251_200)), "2024-03-01T00:00:00.000000Z");
        assert_eq!(rfc3339_micros(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn logfmt_matches_the_go_shim_layout() {
        let fields = kv(&[
            ("subsystem", "qemu"),
            ("qemuPid", "123"),
            ("sandbox", "5a0c"),
            ("name", LOGGER_NAME),
            ("pid", "42"),
            ("source", DEFAULT_SOURCE),
        ]);
        assert_eq!(
            logfmt_line(sample_time(), Level::Info, "Start logging QEMU", &fields),
            "time=\"2026-11-23T01:02:03.456789Z\" level=info msg=\"Start logging QEMU\" name=containerd-shim-v2 \
             pid=42 qemuPid=123 sandbox=5a0c source=virtcontainers subsystem=qemu"
        );
    }

    #[test]
    fn logfmt_quotes_and_escapes() {
        let fields = kv(&[
            ("path", "/run/vc/sbs/x.sock"),
            ("error", "no such \"file\"\tat C:\\x\nnext"),
            ("empty", ""),
            ("bell", "a\u{7}b"),
            ("utf8", "grüße"),
            ("time", "clash"),
            ("path", "ignored: the first value of a key wins"),
        ]);
        let line = logfmt_line(sample_time(), Level::Warning, "ok", &fields);
        assert_eq!(
            line,
            "time=\"2026-11-23T01:02:03.456789Z\" level=warning msg=ok bell=\"a\\x07b\" empty=\"\" \
             error=\"no such \\\"file\\\"\\tat C:\\\\x\\nnext\" fields.time=clash path=/run/vc/sbs/x.sock utf8=\"grüße\""
        );
        assert!(!line.contains('\n'), "a logfmt line must stay on one line");
    }

    #[test]
    fn journal_names_are_sanitized() {
        assert_eq!(journal_field_name("qemuPid").as_deref(), Some("QEMUPID"));
        assert_eq!(journal_field_name("sandbox").as_deref(), Some("SANDBOX"));
        assert_eq!(journal_field_name("_hostname").as_deref(), Some("HOSTNAME"));
        assert_eq!(journal_field_name("net.if-name").as_deref(), Some("NET_IF_NAME"));
        assert_eq!(journal_field_name("9p").as_deref(), Some("X9P"));
        assert_eq!(journal_field_name("__"), None);
        assert_eq!(journal_field_name("message"), None);
        assert_eq!(journal_field_name(&"k".repeat(100)).map(|n| n.len()), Some(64));
    }

    #[test]
    fn journal_encoding_uses_the_binary_form_for_newlines() {
        let fields = kv(&[("sandbox", "s1"), ("vmconsole", "line one\nline two"), ("_weird key", "v")]);
        let datagram = journal_datagram(Level::Error, "time=\"t\" level=error msg=boom", &fields);
        let mut expected =
            b"PRIORITY=3\nSYSLOG_IDENTIFIER=kata\nMESSAGE=time=\"t\" level=error msg=boom\nSANDBOX=s1\nVMCONSOLE\n"
                .to_vec();
        expected.extend_from_slice(&17u64.to_le_bytes());
        expected.extend_from_slice(b"line one\nline two\nWEIRD_KEY=v\n");
        assert_eq!(datagram, expected);

        let parsed = parse_journal(&datagram);
        assert_eq!(field(&parsed, "VMCONSOLE"), "line one\nline two");
        assert_eq!(parsed.len(), 6);
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(syslog_priority(Level::Critical), 2);
        assert_eq!(syslog_priority(Level::Warning), 4);
        assert_eq!(syslog_priority(Level::Info), 6);
        assert_eq!(syslog_priority(Level::Debug), 7);
    }

    fn opts(debug: bool, fallback: Option<PathBuf>) -> LogOptions {
        LogOptions { debug, sandbox: Some("sb-1234".to_string()), fallback }
    }

    fn bind_journal(dir: &tempfile::TempDir) -> (UnixDatagram, PathBuf) {
        let path = dir.path().join("journal.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (socket, path)
    }

    #[test]
    fn records_reach_a_journal_socket_with_kata_fields() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, path) = bind_journal(&dir);
        let log = init_with_journal(&opts(false, None), &path);
        let qemu = log.new(o!(keys::SUBSYSTEM => "qemu"));
        info!(qemu, "Start logging QEMU"; keys::QEMU_PID => 4321, keys::VMCONSOLE => "[ 0.1] a \"quoted\"\nsecond");
        debug!(qemu, "not at info level");
        warn!(log, "second record");

        let mut buf = vec![0u8; 65536];
        let n = journal.recv(&mut buf).unwrap();
        let fields = parse_journal(&buf[..n]);
        assert_eq!(field(&fields, "SYSLOG_IDENTIFIER"), "kata");
        assert_eq!(field(&fields, "PRIORITY"), "6");
        assert_eq!(field(&fields, "SANDBOX"), "sb-1234");
        assert_eq!(field(&fields, "SUBSYSTEM"), "qemu");
        assert_eq!(field(&fields, "QEMUPID"), "4321");
        assert_eq!(field(&fields, "SOURCE"), "virtcontainers");
        assert_eq!(field(&fields, "NAME"), "containerd-shim-v2");
        assert_eq!(field(&fields, "VMCONSOLE"), "[ 0.1] a \"quoted\"\nsecond");
        let message = field(&fields, "MESSAGE");
        assert!(message.starts_with("time=\""), "{message}");
        let pid = std::process::id();
        let tail = format!(
            "Z\" level=info msg=\"Start logging QEMU\" name=containerd-shim-v2 pid={pid} qemuPid=4321 sandbox=sb-1234 \
             source=virtcontainers subsystem=qemu vmconsole=\"[ 0.1] a \\\"quoted\\\"\\nsecond\""
        );
        assert!(message.ends_with(&tail), "MESSAGE was {message:?}\nwanted it to end with {tail:?}");

        // The debug record was filtered; the next datagram is the warning.
        let n = journal.recv(&mut buf).unwrap();
        let fields = parse_journal(&buf[..n]);
        assert_eq!(field(&fields, "PRIORITY"), "4");
        assert!(field(&fields, "MESSAGE").contains("level=warning msg=\"second record\""));
        assert!(fields.iter().all(|(n, _)| n != "SUBSYSTEM"), "the root logger has no subsystem");
    }

    #[test]
    fn debug_option_lets_debug_records_through() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, path) = bind_journal(&dir);
        let log = init_with_journal(&opts(true, None), &path);
        debug!(log, "details"; keys::CONTAINER => "c1", keys::EXEC => "e1");
        let mut buf = vec![0u8; 65536];
        let n = journal.recv(&mut buf).unwrap();
        let fields = parse_journal(&buf[..n]);
        assert_eq!(field(&fields, "PRIORITY"), "7");
        assert_eq!(field(&fields, "CONTAINER"), "c1");
        assert_eq!(field(&fields, "EXEC"), "e1");
    }

    #[test]
    fn oversized_records_go_through_a_sealed_memfd() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, path) = bind_journal(&dir);
        let log = init_with_journal(&opts(false, None), &path);
        let big = "x".repeat(300 * 1024);
        info!(log, "big one"; "blob" => &big);

        let mut data = [0u8; 16];
        let mut iov = [IoSliceMut::new(&mut data)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<UnixAddr>(journal.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()).unwrap();
        assert_eq!(msg.bytes, 0, "the datagram itself carries no data");
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(r) = c {
                fds.extend(r);
            }
        }
        assert_eq!(fds.len(), 1, "one descriptor passed");
        // SAFETY: the kernel just installed this descriptor for us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).unwrap();
        let want = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SEAL;
        assert_eq!(SealFlag::from_bits_truncate(seals) & want, want, "journald refuses unsealed memfds");
        let mut contents = Vec::new();
        let mut file = File::from(fd);
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut contents).unwrap();
        let fields = parse_journal(&contents);
        assert_eq!(field(&fields, "SYSLOG_IDENTIFIER"), "kata");
        assert_eq!(field(&fields, "BLOB").len(), big.len());
        assert!(field(&fields, "MESSAGE").contains("msg=\"big one\""));
    }

    fn make_fifo(dir: &tempfile::TempDir) -> PathBuf {
        let path = dir.path().join("log");
        nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o600)).unwrap();
        path
    }

    fn open_reader(path: &Path) -> File {
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).unwrap()
    }

    fn read_available(reader: &mut File) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading the FIFO: {e}"),
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn without_a_journal_lines_go_to_the_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = make_fifo(&dir);
        let mut reader = open_reader(&fifo);
        let log = init_with_journal(&opts(false, Some(fifo.clone())), &dir.path().join("no-journal.sock"));
        info!(log, "hello fifo"; keys::CONTAINER => "c 1");
        warn!(log, "second");
        let text = read_available(&mut reader);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text:?}");
        assert!(
            lines[0].contains("level=info msg=\"hello fifo\" container=\"c 1\" name=containerd-shim-v2"),
            "{}",
            lines[0]
        );
        assert!(lines[0].ends_with("sandbox=sb-1234 source=virtcontainers"), "{}", lines[0]);
        assert!(lines[1].contains("level=warning msg=second"), "{}", lines[1]);
    }

    #[test]
    fn a_fifo_without_reader_never_blocks_and_recovers_when_one_comes() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = make_fifo(&dir);
        let log = init_with_journal(&opts(false, Some(fifo.clone())), &dir.path().join("no-journal.sock"));
        let started = Instant::now();
        for i in 0..1000 {
            info!(log, "nobody reads this"; "i" => i);
        }
        assert!(started.elapsed() < Duration::from_secs(2), "logging without a reader took {:?}", started.elapsed());

        let mut reader = open_reader(&fifo);
        info!(log, "now somebody does");
        let text = read_available(&mut reader);
        assert_eq!(text.lines().count(), 1, "{text:?}");
        assert!(text.contains("msg=\"now somebody does\""));

        // The reader leaves again (EPIPE) and a later one still gets whole lines.
        drop(reader);
        info!(log, "lost");
        let mut reader = open_reader(&fifo);
        info!(log, "found");
        assert!(read_available(&mut reader).contains("msg=found"));
    }

    #[test]
    fn a_full_fifo_drops_whole_lines_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = make_fifo(&dir);
        let mut reader = open_reader(&fifo);
        let log = init_with_journal(&opts(false, Some(fifo.clone())), &dir.path().join("no-journal.sock"));
        let filler = "y".repeat(3000);
        let started = Instant::now();
        // 200 lines of ~3 KB are far beyond the 64 KiB a pipe holds by default.
        for i in 0..200 {
            info!(log, "filling"; "i" => i, "filler" => &filler);
        }
        assert!(started.elapsed() < Duration::from_secs(2), "a full FIFO blocked for {:?}", started.elapsed());
        let text = read_available(&mut reader);
        let lines: Vec<&str> = text.lines().collect();
        assert!(!lines.is_empty() && lines.len() < 200, "{} lines arrived", lines.len());
        for line in &lines {
            assert!(line.starts_with("time=") && line.ends_with("source=virtcontainers"), "torn line: {line:.80}…");
        }
    }

    #[test]
    fn a_dead_journal_falls_back_to_the_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = make_fifo(&dir);
        let mut reader = open_reader(&fifo);
        let (journal, path) = bind_journal(&dir);
        let log = init_with_journal(&opts(false, Some(fifo.clone())), &path);
        info!(log, "to the journal");
        let mut buf = vec![0u8; 65536];
        assert!(journal.recv(&mut buf).is_ok());
        // journald stops, leaving its socket file behind: ECONNREFUSED.
        drop(journal);
        info!(log, "to the fifo");
        let text = read_available(&mut reader);
        assert!(text.contains("msg=\"to the fifo\""), "{text:?}");
        assert!(!text.contains("to the journal"));
    }

    #[test]
    fn logging_from_many_threads_keeps_lines_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, path) = bind_journal(&dir);
        let log = init_with_journal(&opts(false, None), &path);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.new(o!(keys::EXEC => format!("t{t}")));
                std::thread::spawn(move || {
                    for i in 0..25 {
                        info!(log, "from a thread"; "i" => i);
                    }
                })
            })
            .collect();
        let mut buf = vec![0u8; 65536];
        for _ in 0..100 {
            let n = journal.recv(&mut buf).unwrap();
            let fields = parse_journal(&buf[..n]);
            assert!(field(&fields, "EXEC").starts_with('t'));
        }
        for t in threads {
            t.join().unwrap();
        }
    }
}
