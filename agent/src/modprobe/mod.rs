//! `/sbin/modprobe` of the guest: the kernel's usermode helper for on-demand module loading.
//!
//! When the kernel needs a module it does not have (`ip link add type bridge` asks for
//! `rtnl-link-bridge`, `mount -t overlay` for `fs-overlay`, opening `/dev/net/tun` for
//! `char-major-10-200`, iptables for `ipt_REDIRECT`...), `request_module()` runs
//! `/sbin/modprobe -q -- <name or alias>` (CONFIG_MODPROBE_PATH, `/proc/sys/kernel/modprobe`) as
//! root in the guest's initial namespaces and waits for it. The initrd links `/sbin/modprobe` to
//! `/init`, and `main` dispatches here when argv[0]'s file name is `modprobe`.
//!
//! This is a small static modprobe over the depmod indexes that `guest-image/build.sh` puts into
//! `/lib/modules/<release>/` (text forms only; the `.bin` files are there for other tools):
//!
//! * `modules.dep`: `path: dep...`, every module's full dependency list (the last one loads first);
//! * `modules.alias` and `modules.symbols`: `alias <shell glob> <module>`;
//! * `modules.softdep`: `softdep <module> pre: <names...> post: <names...>` (e.g. libcrc32c pre crc32c);
//! * `modules.builtin` (paths) and `modules.builtin.modinfo` (`<module>.alias=<glob>`, NUL-separated):
//!   a request for a built-in module or one of its aliases succeeds without loading anything.
//!
//! A request is looked up as libkmod does: a module name first, then aliases (`symbol:` ones
//! included), then built-in names and aliases. `-` and `_` are the same in names and aliases
//! (outside `[...]`). Every module an alias matches is tried (e.g. `crc32c` names both
//! `crc32c-intel`, which needs SSE4.2, and `crc32c_generic`); the request succeeds when one of
//! them loads. Each module is loaded after its dependencies and its soft pre-dependencies (the
//! order libkmod uses), with `finit_module(2)`; modules already in `/sys/module` and `EEXIST`
//! count as loaded. Soft dependencies that fail are ignored (as libkmod does). There is no
//! modprobe.d configuration, no blacklist, and no removal (`-r` is refused). Loads and failures
//! go to the kernel log (`/dev/kmsg`): the kernel gives its helper no stdio.
//!
//! For tests and debugging on a host: `-n` (resolve without loading), `-D`/`--show-depends`
//! (libkmod's output format: `insmod <path> ` and `builtin <name>` lines), `-d DIR` (modules under
//! `DIR/lib/modules/<release>`) and `-S RELEASE`.
//!
//! * [`index`]: parsing the depmod index files, name normalisation and glob matching; lookups.
//! * [`load`]: resolving a request into modules to load, in order, and loading them.
//! * [`cli`]: the command line and the program.

mod cli;
#[cfg(test)]
mod fixtures;
mod index;
mod load;

use std::fmt;
use std::path::{Path, PathBuf};

pub use cli::main;
pub use index::Index;
pub use load::{probe, Outcome};

/// Whether the program was started as `modprobe` (argv[0]'s file name), i.e. by the kernel
/// through the `/sbin/modprobe` → `/init` link.
pub fn invoked_as_modprobe(argv0: Option<&str>) -> bool {
    argv0.map(Path::new).and_then(Path::file_name).is_some_and(|n| n == "modprobe")
}

/// An error of modprobe; the message names the module and the file concerned.
#[derive(Debug)]
pub enum ModprobeError {
    /// Bad command line.
    Usage(String),
    /// An index file could not be read.
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A line of an index file makes no sense.
    Parse {
        /// The file.
        file: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// Nothing in the indexes (module names, aliases, built-ins) matches the request.
    NotFound {
        /// The requested name or alias.
        name: String,
        /// The module directory searched.
        dir: PathBuf,
    },
    /// A dependency listed in `modules.dep` has no line of its own there.
    MissingDependency {
        /// The module that needs it.
        module: String,
        /// The dependency's path as listed.
        dependency: String,
        /// The index (`modules.dep`).
        file: PathBuf,
    },
    /// `finit_module` (or opening the file) failed.
    Load {
        /// The module.
        module: String,
        /// Its file.
        file: PathBuf,
        /// The error.
        error: String,
    },
}

impl fmt::Display for ModprobeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Usage(m) => f.write_str(m),
            Self::Read { file, error } => write!(f, "read {}: {error}", file.display()),
            Self::Parse { file, line, what } => write!(f, "{}:{line}: {what}", file.display()),
            Self::NotFound { name, dir } => write!(
                f,
                "module {name} not found in {} (no module, alias or built-in of that name in modules.dep, \
                 modules.alias, modules.symbols, modules.builtin, modules.builtin.modinfo)",
                dir.display()
            ),
            Self::MissingDependency { module, dependency, file } => write!(
                f,
                "module {module} depends on {dependency}, which has no entry of its own in {}",
                file.display()
            ),
            Self::Load { module, file, error } => {
                write!(f, "could not load module {module} ({}): {error}", file.display())
            }
        }
    }
}

impl std::error::Error for ModprobeError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invoked_by_argv0_file_name() {
        assert!(invoked_as_modprobe(Some("/sbin/modprobe")));
        assert!(invoked_as_modprobe(Some("modprobe")));
        assert!(!invoked_as_modprobe(Some("/init")));
        assert!(!invoked_as_modprobe(Some("/sbin/modprobe.d")));
        assert!(!invoked_as_modprobe(None));
    }
}
