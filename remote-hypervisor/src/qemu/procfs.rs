//! `/proc` reading: process state and start time, command lines.

/// What `/proc/<pid>/stat` tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: `R`, `S`, `Z`, ...
    pub state: char,
    /// Field 22: start time in clock ticks after boot.
    pub start_time: u64,
}

/// Parses a `/proc/<pid>/stat` line (the command name may hold spaces and parentheses).
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    Some(Stat { state: f.first()?.chars().next()?, start_time: f.get(22 - 3)?.parse().ok()? })
}

/// The stat of `pid`, if it exists.
pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The argv of `pid` (at most 256 KiB read).
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(format!("/proc/{pid}/cmdline")).ok()?.take(256 * 1024).read_to_end(&mut buf).ok()?;
    if buf.is_empty() {
        return None;
    }
    Some(buf.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
}

/// `(pid, argv)` of every process whose argv mentions fw_cfg (QEMU candidates).
pub fn cmdlines() -> Vec<(u32, Vec<String>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, cmdline(pid)?)))
        .filter(|(_, a)| a.iter().any(|x| x == "-fw_cfg"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        let line = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 987654 123 45";
        assert_eq!(parse_stat(line), Some(Stat { state: 'S', start_time: 987654 }));
        assert_eq!(parse_stat("garbage"), None);
        let me = stat(std::process::id()).unwrap();
        assert!(me.start_time > 0, "{me:?}");
    }
}
