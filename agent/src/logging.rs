//! Structured logs on the console: one JSON object per line (as Kata's agent does), which the
//! shim relays as guest console lines.

use std::sync::Mutex;

use slog::{Drain, Level, Logger};

/// `agent.log=<level>` on the kernel command line (the last one wins, as with kernel parameters:
/// the shim puts `[agent.kata] enable_debug`'s before the configuration's `kernel_params`);
/// `info` otherwise.
pub fn level_from_cmdline(cmdline: &str) -> Level {
    cmdline
        .split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix("agent.log="))
        .and_then(|l| match l {
            "trace" => Some(Level::Trace),
            "debug" => Some(Level::Debug),
            "info" => Some(Level::Info),
            "warn" | "warning" => Some(Level::Warning),
            "error" => Some(Level::Error),
            "critical" => Some(Level::Critical),
            _ => None,
        })
        .unwrap_or(Level::Info)
}

/// A logger writing JSON lines to stderr (the console when running as PID 1).
pub fn console_logger(level: Level) -> Logger {
    let json = slog_json::Json::new(std::io::stderr()).add_default_keys().build();
    let drain = Mutex::new(json).map(slog::Fuse);
    let drain = slog::LevelFilter::new(drain, level).fuse();
    Logger::root(drain, slog::o!("name" => "kata-agent", "source" => "agent", "pid" => std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_comes_from_cmdline() {
        assert_eq!(level_from_cmdline("console=ttyS0 agent.log=debug quiet"), Level::Debug);
        assert_eq!(level_from_cmdline("console=ttyS0"), Level::Info);
        assert_eq!(level_from_cmdline("agent.log=bogus"), Level::Info);
        assert_eq!(level_from_cmdline("agent.log=debug agent.log=warn"), Level::Warning);
    }
}
