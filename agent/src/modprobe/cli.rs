//! `modprobe`'s command line and the program itself: options, the module directory, reporting.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::index::Index;
use super::load::{probe, probe_with, show_depends, Outcome};
use super::ModprobeError;

/// The parsed command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// `-q`: no message when the module is not found.
    pub quiet: bool,
    /// `-v`: say what is loaded.
    pub verbose: bool,
    /// `-n`: resolve but load nothing.
    pub dry_run: bool,
    /// `-D`: print the modules that would be loaded (libkmod's format) and load nothing.
    pub show_depends: bool,
    /// `-a`: every argument is a module (otherwise the first one is, the rest are parameters).
    pub all: bool,
    /// `-d DIR`: the modules are under `DIR/lib/modules/<release>`.
    pub root: Option<PathBuf>,
    /// `-S RELEASE`: another kernel release than the running one.
    pub release: Option<String>,
    /// The names or aliases to load.
    pub names: Vec<String>,
    /// Module parameters for the (single) named module.
    pub params: Vec<String>,
}

const USAGE: &str =
    "usage: modprobe [-q] [-v] [-n] [-D|--show-depends] [-a] [-d DIR] [-S RELEASE] [--] NAME [PARAM=VALUE...]";

/// Parses modprobe's arguments (`args[0]` is the program).
pub fn parse_args(args: &[String]) -> Result<Options, ModprobeError> {
    let mut o = Options::default();
    let mut rest: Vec<String> = Vec::new();
    let mut it = args.iter().skip(1);
    let usage = |m: String| ModprobeError::Usage(format!("{m}\n{USAGE}"));
    while let Some(a) = it.next() {
        if !rest.is_empty() && !o.all {
            rest.push(a.clone()); // parameters of the module: taken as they are
            continue;
        }
        let mut value = |flag: &str| it.next().cloned().ok_or_else(|| usage(format!("{flag} needs a value")));
        match a.as_str() {
            "--" => {
                rest.extend(it.by_ref().cloned());
                break;
            }
            "--quiet" => o.quiet = true,
            "--verbose" => o.verbose = true,
            "--dry-run" => o.dry_run = true,
            "--show-depends" => o.show_depends = true,
            "--all" => o.all = true,
            "--use-blacklist" | "--syslog" | "--first-time" => {}
            "--dirname" => o.root = Some(PathBuf::from(value("--dirname")?)),
            "--set-version" => o.release = Some(value("--set-version")?),
            "--remove" => return Err(removal_refused()),
            s if s.starts_with("--dirname=") => o.root = Some(PathBuf::from(&s["--dirname=".len()..])),
            s if s.starts_with("--set-version=") => o.release = Some(s["--set-version=".len()..].to_string()),
            "-h" | "--help" => return Err(ModprobeError::Usage(USAGE.to_string())),
            s if s.starts_with("--") => return Err(usage(format!("unknown option {s}"))),
            s if s.starts_with('-') && s.len() > 1 => {
                let flags: Vec<char> = s[1..].chars().collect();
                for (i, c) in flags.iter().enumerate() {
                    let last = i + 1 == flags.len();
                    match c {
                        'q' => o.quiet = true,
                        'v' => o.verbose = true,
                        'n' => o.dry_run = true,
                        'D' => o.show_depends = true,
                        'a' => o.all = true,
                        'b' | 's' => {}
                        'r' => return Err(removal_refused()),
                        'd' | 'S' => {
                            let v: String =
                                if last { value(&format!("-{c}"))? } else { flags[i + 1..].iter().collect() };
                            if *c == 'd' {
                                o.root = Some(PathBuf::from(v));
                            } else {
                                o.release = Some(v);
                            }
                            break;
                        }
                        other => return Err(usage(format!("unknown option -{other}"))),
                    }
                }
            }
            _ => rest.push(a.clone()),
        }
    }
    if rest.is_empty() {
        return Err(usage("no module name given".into()));
    }
    if o.all {
        o.names = rest;
    } else {
        o.names = vec![rest.remove(0)];
        o.params = rest;
    }
    Ok(o)
}

fn removal_refused() -> ModprobeError {
    ModprobeError::Usage("modprobe: removing modules (-r) is not supported in the podvisor guest".into())
}

/// The module directory: `[root]/lib/modules/<release>` (the running kernel's by default).
pub fn modules_dir(root: Option<&Path>, release: Option<&str>) -> PathBuf {
    let release = release.map(String::from).unwrap_or_else(|| {
        nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
    });
    root.unwrap_or(Path::new("/")).join("lib/modules").join(release)
}

/// Sends a line to the kernel log (`/dev/kmsg`, priority `level`), so that the guest console
/// shows load failures of requests nobody else sees (the kernel gives its helper no stdio).
fn kmsg(level: u8, msg: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = f.write_all(format!("<{level}>modprobe: {msg}\n").as_bytes());
    }
}

/// `modprobe` as a program: returns the exit status (0 success, 1 failure).
pub fn main(args: &[String]) -> i32 {
    let opts = match parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("modprobe: {e}");
            return 1;
        }
    };
    let dir = modules_dir(opts.root.as_deref(), opts.release.as_deref());
    let index = match Index::load(&dir) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("modprobe: {e}");
            if !opts.dry_run && !opts.show_depends {
                kmsg(3, &e.to_string());
            }
            return 1;
        }
    };
    let params = opts.params.join(" ");
    let mut status = 0;
    for name in &opts.names {
        if opts.show_depends {
            match show_depends(&index, name, &params) {
                Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
                Err(e) => {
                    eprintln!("modprobe: {e}");
                    status = 1;
                }
            }
            continue;
        }
        let result = if opts.dry_run {
            probe_with(&index, name, &params, &mut |s, _| {
                if opts.verbose {
                    println!("insmod {}", s.path.display());
                }
                Ok(false)
            })
        } else {
            probe(&index, name, &params)
        };
        match result {
            Ok(Outcome::Builtin(b)) if opts.verbose => println!("module {b} is built in"),
            Ok(Outcome::Loaded(mods)) if !mods.is_empty() => {
                if opts.verbose {
                    println!("loaded {}", mods.join(" "));
                }
                if !opts.dry_run {
                    kmsg(6, &format!("{name}: loaded {}", mods.join(" ")));
                }
            }
            Ok(_) => {}
            Err(e @ ModprobeError::NotFound { .. }) => {
                // The kernel asks for aliases nobody provides all the time (e.g. a protocol
                // family no module implements): -q keeps that silent, as libkmod does.
                if !opts.quiet {
                    eprintln!("modprobe: {e}");
                }
                if !opts.dry_run {
                    kmsg(7, &format!("{name}: not found"));
                }
                status = 1;
            }
            Err(e) => {
                eprintln!("modprobe: {e}");
                if !opts.dry_run {
                    kmsg(3, &format!("{name}: {e}"));
                }
                status = 1;
            }
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        std::iter::once("/sbin/modprobe").chain(a.iter().copied()).map(String::from).collect()
    }

    #[test]
    fn command_line_as_the_kernel_and_people_write_it() {
        let o = parse_args(&args(&["-q", "--", "rtnl-link-bridge"])).unwrap();
        assert!(o.quiet && !o.dry_run);
        assert_eq!(o.names, ["rtnl-link-bridge"]);
        let o = parse_args(&args(&["-qn", "-d", "/tmp/root", "-S6.1.0-56-amd64", "bridge", "x=1"])).unwrap();
        assert!(o.quiet && o.dry_run);
        assert_eq!((o.root.as_deref(), o.release.as_deref()), (Some(Path::new("/tmp/root")), Some("6.1.0-56-amd64")));
        assert_eq!((o.names.as_slice(), o.params.as_slice()), (&["bridge".to_string()][..], &["x=1".to_string()][..]));
        let o = parse_args(&args(&["-a", "--show-depends", "ip_tables", "ip6_tables"])).unwrap();
        assert!(o.show_depends && o.params.is_empty());
        assert_eq!(o.names, ["ip_tables", "ip6_tables"]);
        // A module name starting with '-' after "--" is a name.
        assert_eq!(parse_args(&args(&["--", "-x"])).unwrap().names, ["-x"]);
        assert!(parse_args(&args(&["-r", "bridge"])).unwrap_err().to_string().contains("not supported"));
        assert!(parse_args(&args(&["-q"])).unwrap_err().to_string().contains("no module name"));
        assert!(parse_args(&args(&["--bogus", "x"])).unwrap_err().to_string().contains("--bogus"));
    }
}
