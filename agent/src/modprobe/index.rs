//! The depmod index files of a module directory: parsing them, normalising names, matching alias globs.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::ModprobeError;

/// Normalises a module name or alias as libkmod does: `-` becomes `_`, except inside `[...]`.
pub fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_bracket = false;
    for c in name.chars() {
        match c {
            '[' => in_bracket = true,
            ']' => in_bracket = false,
            '-' if !in_bracket => {
                out.push('_');
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

/// The module name of a module file path: its file name without `.ko` (and a compression
/// suffix), normalised (`kernel/arch/x86/crypto/crc32c-intel.ko` → `crc32c_intel`).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"].iter().find_map(|s| file.strip_suffix(s)).unwrap_or(file);
    normalize(stem)
}

/// Shell glob match as fnmatch(3) with no flags: `*`, `?`, `[...]` (with `!` or `^` negation and
/// ranges) and `\` escapes; `/` is an ordinary character.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, text index it matched up to).
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        let step = if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi + 1, ti));
                    pi += 1;
                    continue;
                }
                '?' => Some(pi + 1),
                '[' => match bracket(&p, pi, t[ti]) {
                    Some((true, next)) => Some(next),
                    Some((false, _)) => None,
                    // An unterminated `[` is a literal.
                    None => (t[ti] == '[').then_some(pi + 1),
                },
                '\\' if pi + 1 < p.len() => (t[ti] == p[pi + 1]).then_some(pi + 2),
                c => (t[ti] == c).then_some(pi + 1),
            }
        } else {
            None
        };
        match step {
            Some(next) => {
                pi = next;
                ti += 1;
            }
            None => match star {
                Some((sp, st)) => {
                    pi = sp;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Matches `c` against the bracket expression at `p[start]` (`[`); returns whether it matched
/// and the index after the closing `]`, or None when there is no closing `]`.
fn bracket(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        let lo = p[i];
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if lo <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if lo == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

/// One module of `modules.dep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// Its path as listed (relative to the module directory, or absolute).
    pub path: String,
    /// Its dependencies' paths as listed: all of them, the one to load first last.
    pub deps: Vec<String>,
}

/// `alias <glob> <module>` (from modules.alias, modules.symbols or built-in modinfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    /// The normalised glob.
    pub pattern: String,
    /// The normalised module name.
    pub module: String,
}

/// Soft dependencies of one module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SoftDeps {
    /// Names or aliases to load before it.
    pub pre: Vec<String>,
    /// Names or aliases to load after it.
    pub post: Vec<String>,
}

fn parse_err(file: &Path, line: usize, what: impl Into<String>) -> ModprobeError {
    ModprobeError::Parse { file: file.to_path_buf(), line, what: what.into() }
}

fn content_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// Parses `modules.dep` (`file` names it in errors) into module name → entry.
pub fn parse_dep(text: &str, file: &Path) -> Result<HashMap<String, ModuleEntry>, ModprobeError> {
    let mut map = HashMap::new();
    for (n, line) in content_lines(text) {
        let (path, deps) = line.split_once(':').ok_or_else(|| parse_err(file, n, format!("no ':' in {line:?}")))?;
        let path = path.trim();
        if path.is_empty() {
            return Err(parse_err(file, n, "empty module path"));
        }
        let deps = deps.split_whitespace().map(String::from).collect();
        map.insert(module_name(path), ModuleEntry { path: path.to_string(), deps });
    }
    Ok(map)
}

/// Parses `modules.alias` or `modules.symbols` (`alias <glob> <module>` lines).
pub fn parse_aliases(text: &str, file: &Path) -> Result<Vec<Alias>, ModprobeError> {
    let mut out = Vec::new();
    for (n, line) in content_lines(text) {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["alias", pattern, module] => out.push(Alias { pattern: normalize(pattern), module: normalize(module) }),
            _ => return Err(parse_err(file, n, format!("expected 'alias <pattern> <module>', got {line:?}"))),
        }
    }
    Ok(out)
}

/// Parses `modules.softdep` (`softdep <module> pre: <names> post: <names>`).
pub fn parse_softdep(text: &str, file: &Path) -> Result<HashMap<String, SoftDeps>, ModprobeError> {
    let mut map: HashMap<String, SoftDeps> = HashMap::new();
    for (n, line) in content_lines(text) {
        let mut words = line.split_whitespace();
        let (Some("softdep"), Some(module)) = (words.next(), words.next()) else {
            return Err(parse_err(file, n, format!("expected 'softdep <module> pre: ... post: ...', got {line:?}")));
        };
        let entry = map.entry(normalize(module)).or_default();
        let mut post = false;
        for w in words {
            match w {
                "pre:" => post = false,
                "post:" => post = true,
                name if post => entry.post.push(name.to_string()),
                name => entry.pre.push(name.to_string()),
            }
        }
    }
    Ok(map)
}

/// Module names of `modules.builtin` (one path per line).
pub fn parse_builtin(text: &str) -> HashSet<String> {
    content_lines(text).map(|(_, l)| module_name(l)).collect()
}

/// Aliases of built-in modules from `modules.builtin.modinfo` (`<module>.<key>=<value>` strings,
/// NUL-separated; only `alias` keys matter).
pub fn parse_builtin_modinfo(data: &[u8]) -> Vec<Alias> {
    data.split(|b| *b == 0)
        .filter_map(|rec| {
            let rec = std::str::from_utf8(rec).ok()?;
            let (key, value) = rec.split_once('=')?;
            let (module, field) = key.split_once('.')?;
            (field == "alias").then(|| Alias { pattern: normalize(value), module: normalize(module) })
        })
        .collect()
}

/// What a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A loadable module (normalised name).
    Module(String),
    /// A module built into the kernel: nothing to load.
    Builtin(String),
}

/// The depmod indexes of one module directory (`/lib/modules/<release>`).
#[derive(Debug, Default)]
pub struct Index {
    /// The module directory.
    pub dir: PathBuf,
    /// `modules.dep`: module name → entry (read by [`super::load`]'s planning).
    pub(super) modules: HashMap<String, ModuleEntry>,
    aliases: Vec<Alias>,
    /// `modules.softdep`: module name → soft dependencies (read by [`super::load`]'s planning).
    pub(super) softdeps: HashMap<String, SoftDeps>,
    builtin: HashSet<String>,
    builtin_aliases: Vec<Alias>,
}

impl Index {
    /// Reads the indexes in `dir`. `modules.dep` and `modules.alias` are required; the others are
    /// optional (a missing one is empty).
    pub fn load(dir: &Path) -> Result<Index, ModprobeError> {
        let read = |name: &str, required: bool| -> Result<(PathBuf, Vec<u8>), ModprobeError> {
            let file = dir.join(name);
            match std::fs::read(&file) {
                Ok(data) => Ok((file, data)),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok((file, Vec::new())),
                Err(error) => Err(ModprobeError::Read { file, error }),
            }
        };
        let text = |(file, data): (PathBuf, Vec<u8>)| (file, String::from_utf8_lossy(&data).into_owned());
        let (dep_file, dep) = text(read("modules.dep", true)?);
        let (alias_file, alias) = text(read("modules.alias", true)?);
        let (symbols_file, symbols) = text(read("modules.symbols", false)?);
        let (softdep_file, softdep) = text(read("modules.softdep", false)?);
        let (_, builtin) = text(read("modules.builtin", false)?);
        let (_, modinfo) = read("modules.builtin.modinfo", false)?;
        let mut aliases = parse_aliases(&alias, &alias_file)?;
        aliases.extend(parse_aliases(&symbols, &symbols_file)?);
        Ok(Index {
            dir: dir.to_path_buf(),
            modules: parse_dep(&dep, &dep_file)?,
            aliases,
            softdeps: parse_softdep(&softdep, &softdep_file)?,
            builtin: parse_builtin(&builtin),
            builtin_aliases: parse_builtin_modinfo(&modinfo),
        })
    }

    /// Builds an index from the texts of the files (for tests).
    #[cfg(test)]
    pub fn from_texts(dir: &Path, dep: &str, alias: &str, softdep: &str, builtin: &str, modinfo: &[u8]) -> Self {
        let f = |n: &str| dir.join(n);
        Index {
            dir: dir.to_path_buf(),
            modules: parse_dep(dep, &f("modules.dep")).expect("modules.dep fixture"),
            aliases: parse_aliases(alias, &f("modules.alias")).expect("modules.alias fixture"),
            softdeps: parse_softdep(softdep, &f("modules.softdep")).expect("modules.softdep fixture"),
            builtin: parse_builtin(builtin),
            builtin_aliases: parse_builtin_modinfo(modinfo),
        }
    }

    /// What `request` (a module name or an alias) names, in libkmod's order: a module name, else
    /// every module whose alias matches, else a built-in module or alias. Empty: not found.
    pub fn lookup(&self, request: &str) -> Vec<Target> {
        let name = normalize(request);
        if self.modules.contains_key(&name) {
            return vec![Target::Module(name)];
        }
        let mut found: Vec<Target> = Vec::new();
        for a in &self.aliases {
            let t = Target::Module(a.module.clone());
            if glob_match(&a.pattern, &name) && !found.contains(&t) {
                found.push(t);
            }
        }
        if !found.is_empty() {
            return found;
        }
        if self.builtin.contains(&name) {
            return vec![Target::Builtin(name)];
        }
        self.builtin_aliases
            .iter()
            .find(|a| glob_match(&a.pattern, &name))
            .map(|a| vec![Target::Builtin(a.module.clone())])
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modprobe::fixtures::{index, BUILTIN, MODINFO};

    #[test]
    fn names_are_normalised_outside_brackets() {
        assert_eq!(normalize("char-major-10-200"), "char_major_10_200");
        assert_eq!(normalize("foo-[a-c]-bar"), "foo_[a-c]_bar");
        assert_eq!(module_name("kernel/arch/x86/crypto/crc32c-intel.ko"), "crc32c_intel");
        assert_eq!(module_name("/x/kernel/net/8021q/8021q.ko.xz"), "8021q");
    }

    #[test]
    fn globs_match_like_fnmatch() {
        assert!(glob_match(
            "pci:v00001AF4d00001000sv*sd*bc*sc*i*",
            "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"
        ));
        assert!(!glob_match("pci:v00001AF4d00001000sv*", "pci:v00001AF4d00001001sv0"));
        assert!(glob_match("a?c", "abc") && !glob_match("a?c", "ac"));
        assert!(glob_match("x[0-9]y", "x5y") && !glob_match("x[0-9]y", "xay"));
        assert!(glob_match("x[!0-9]y", "xay") && !glob_match("x[!0-9]y", "x5y"));
        assert!(glob_match("x[]]y", "x]y"));
        assert!(glob_match("*", "") && glob_match("a*", "a") && glob_match("*b*", "abc"));
        assert!(glob_match("a*b*c", "aXbYbZc") && !glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match(r"a\*", "a*") && !glob_match(r"a\*", "ab"));
        assert!(glob_match("net_pf_10", "net_pf_10") && !glob_match("net_pf_1", "net_pf_10"));
        assert!(glob_match("x[a", "x[a"), "an unterminated bracket is literal");
    }

    #[test]
    fn aliases_resolve_with_dashes_or_underscores() {
        let i = index();
        assert_eq!(i.lookup("rtnl-link-bridge"), vec![Target::Module("bridge".into())]);
        assert_eq!(i.lookup("rtnl_link_bridge"), vec![Target::Module("bridge".into())]);
        assert_eq!(i.lookup("char-major-10-200"), vec![Target::Module("tun".into())]);
        assert_eq!(i.lookup("fs-overlay"), vec![Target::Module("overlay".into())]);
        assert_eq!(i.lookup("ipt_REDIRECT"), vec![Target::Module("xt_REDIRECT".into())]);
        assert_eq!(i.lookup("symbol:nf_nat_setup_info"), vec![Target::Module("nf_nat".into())]);
        assert_eq!(
            i.lookup("crc32c"),
            vec![Target::Module("crc32c_intel".into()), Target::Module("crc32c_generic".into())]
        );
        // Module names win over aliases; dashes in a module name are underscores.
        assert_eq!(i.lookup("crc32c-intel"), vec![Target::Module("crc32c_intel".into())]);
        assert_eq!(i.lookup("net-pf-10"), vec![Target::Builtin("ipv6".into())]);
        assert_eq!(i.lookup("unix"), vec![Target::Builtin("unix".into())]);
        assert!(i.lookup("net-pf-42").is_empty());
        assert!(i.lookup("rtnl-link-bridge2").is_empty());
    }

    #[test]
    fn bad_lines_name_the_file_and_line() {
        let e = parse_dep("kernel/a.ko: \nno colon here\n", Path::new("/m/modules.dep")).unwrap_err().to_string();
        assert!(e.starts_with("/m/modules.dep:2:"), "{e}");
        let e = parse_aliases("alias only-two\n", Path::new("/m/modules.alias")).unwrap_err().to_string();
        assert!(e.starts_with("/m/modules.alias:1:"), "{e}");
    }

    #[test]
    fn softdep_and_builtin_files_parse() {
        let s =
            parse_softdep("softdep a pre: b c post: d\nsoftdep e post: f\n", Path::new("/m/modules.softdep")).unwrap();
        assert_eq!(s["a"], SoftDeps { pre: vec!["b".into(), "c".into()], post: vec!["d".into()] });
        assert_eq!(s["e"], SoftDeps { pre: vec![], post: vec!["f".into()] });
        assert!(parse_builtin(BUILTIN).contains("af_packet"));
        let b = parse_builtin_modinfo(MODINFO);
        assert_eq!(b.len(), 3);
        assert_eq!(b[0], Alias { pattern: "net_pf_1".into(), module: "unix".into() });
    }

    #[test]
    fn missing_index_names_the_file() {
        let e = Index::load(Path::new("/nonexistent/lib/modules/x")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/lib/modules/x/modules.dep"), "{e}");
    }
}
