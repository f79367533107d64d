//! Resolving a request into the modules to load, in libkmod's order, and loading them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::index::{module_name, normalize, Index, Target};
use super::ModprobeError;

/// One module to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Its normalised name.
    pub name: String,
    /// Its file.
    pub path: PathBuf,
    /// Whether a failure fails the request (false for soft dependencies and what they pull in).
    pub required: bool,
    /// Built into the kernel (a soft dependency can name one): nothing to load, no path.
    pub builtin: bool,
}
impl Index {
    /// The path of a module file as listed in modules.dep, made absolute.
    fn module_path(&self, listed: &str) -> PathBuf {
        let p = Path::new(listed);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    /// The modules to load for module `name`, in libkmod's order: its dependencies (each after
    /// its own), its soft pre-dependencies, itself, its soft post-dependencies.
    pub fn plan(&self, name: &str) -> Result<Vec<Step>, ModprobeError> {
        let mut steps = Vec::new();
        let mut seen = HashMap::new();
        self.plan_into(&normalize(name), true, &mut steps, &mut seen)?;
        Ok(steps)
    }

    fn plan_into(
        &self,
        name: &str,
        required: bool,
        steps: &mut Vec<Step>,
        seen: &mut HashMap<String, Option<usize>>,
    ) -> Result<(), ModprobeError> {
        if let Some(at) = seen.get(name) {
            // Already planned (or being planned, None): a hard need upgrades a soft one.
            if let (true, Some(i)) = (required, at) {
                steps[*i].required = true;
            }
            return Ok(());
        }
        seen.insert(name.to_string(), None);
        let entry = self
            .modules
            .get(name)
            .ok_or_else(|| ModprobeError::NotFound { name: name.to_string(), dir: self.dir.clone() })?;
        for dep in entry.deps.iter().rev() {
            let dep_name = module_name(dep);
            if !self.modules.contains_key(&dep_name) {
                return Err(ModprobeError::MissingDependency {
                    module: name.to_string(),
                    dependency: dep.clone(),
                    file: self.dir.join("modules.dep"),
                });
            }
            self.plan_into(&dep_name, required, steps, seen)?;
        }
        let soft = self.softdeps.get(name).cloned().unwrap_or_default();
        self.plan_soft(&soft.pre, steps, seen);
        seen.insert(name.to_string(), Some(steps.len()));
        steps.push(Step { name: name.to_string(), path: self.module_path(&entry.path), required, builtin: false });
        self.plan_soft(&soft.post, steps, seen);
        Ok(())
    }

    /// Soft dependencies: every module they name, none required (built-in ones are listed as
    /// such, unknown names skipped).
    fn plan_soft(&self, names: &[String], steps: &mut Vec<Step>, seen: &mut HashMap<String, Option<usize>>) {
        for n in names {
            for t in self.lookup(n) {
                match t {
                    Target::Module(m) => {
                        let _ = self.plan_into(&m, false, steps, seen);
                    }
                    Target::Builtin(b) if !seen.contains_key(&b) => {
                        seen.insert(b.clone(), Some(steps.len()));
                        steps.push(Step { name: b, path: PathBuf::new(), required: false, builtin: true });
                    }
                    Target::Builtin(_) => {}
                }
            }
        }
    }
}

/// The result of one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Built into the kernel.
    Builtin(String),
    /// These modules were loaded now (empty: all were loaded already).
    Loaded(Vec<String>),
}

/// Whether module `name` is loaded (or loading): `/sys/module/<name>/initstate` exists.
fn is_loaded(name: &str) -> bool {
    Path::new("/sys/module").join(name).join("initstate").exists()
}

/// Loads one module file with `finit_module` and `params`; already loaded counts as success.
/// Returns whether it was loaded now.
pub fn load_file(name: &str, path: &Path, params: &str) -> Result<bool, ModprobeError> {
    let load_err = |error: String| ModprobeError::Load { module: name.to_string(), file: path.to_path_buf(), error };
    if is_loaded(name) {
        return Ok(false);
    }
    let file = std::fs::File::open(path).map_err(|e| load_err(format!("open: {e}")))?;
    let params = std::ffi::CString::new(params).map_err(|_| load_err("a parameter contains a NUL byte".into()))?;
    match nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EEXIST) => Ok(false),
        Err(e) => Err(load_err(format!("finit_module: {e}"))),
    }
}

/// Loads what `request` names: every matching module with what it needs (see the module
/// documentation); `params` go to the module named by the request itself.
pub fn probe(index: &Index, request: &str, params: &str) -> Result<Outcome, ModprobeError> {
    probe_with(index, request, params, &mut |step, p| load_file(&step.name, &step.path, p))
}

/// [`probe`] with another loader (for tests).
pub fn probe_with(
    index: &Index,
    request: &str,
    params: &str,
    load: &mut dyn FnMut(&Step, &str) -> Result<bool, ModprobeError>,
) -> Result<Outcome, ModprobeError> {
    let targets = index.lookup(request);
    if targets.is_empty() {
        return Err(ModprobeError::NotFound { name: request.to_string(), dir: index.dir.clone() });
    }
    if let Some(Target::Builtin(b)) = targets.iter().find(|t| matches!(t, Target::Builtin(_))) {
        return Ok(Outcome::Builtin(b.clone()));
    }
    let mut loaded = Vec::new();
    let mut first_error = None;
    let mut any_ok = false;
    for t in &targets {
        let Target::Module(m) = t else { continue };
        let result = index.plan(m).and_then(|steps| {
            for step in steps.iter().filter(|s| !s.builtin) {
                let p = if &step.name == m { params } else { "" };
                match load(step, p) {
                    Ok(true) => loaded.push(step.name.clone()),
                    Ok(false) => {}
                    Err(e) if step.required => return Err(e),
                    Err(_) => {} // a soft dependency: libkmod ignores its failure too
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => any_ok = true,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match (any_ok, first_error) {
        (true, _) | (false, None) => Ok(Outcome::Loaded(loaded)),
        (false, Some(e)) => Err(e),
    }
}

/// libkmod's `--show-depends` lines for `request`.
pub fn show_depends(index: &Index, request: &str, params: &str) -> Result<Vec<String>, ModprobeError> {
    let targets = index.lookup(request);
    if targets.is_empty() {
        return Err(ModprobeError::NotFound { name: request.to_string(), dir: index.dir.clone() });
    }
    let mut lines = Vec::new();
    for t in targets {
        match t {
            Target::Builtin(b) => lines.push(format!("builtin {b}")),
            Target::Module(m) => {
                for s in index.plan(&m)? {
                    if s.builtin {
                        lines.push(format!("builtin {}", s.name));
                        continue;
                    }
                    let p = if s.name == m { params } else { "" };
                    lines.push(format!("insmod {} {p}", s.path.display()));
                }
            }
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modprobe::fixtures::index;

    fn names(steps: &[Step]) -> Vec<&str> {
        steps.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn dependencies_load_first_in_modules_dep_order() {
        let i = index();
        assert_eq!(names(&i.plan("br_netfilter").unwrap()), ["llc", "stp", "bridge", "br_netfilter"]);
        assert_eq!(names(&i.plan("8021q").unwrap()), ["llc", "mrp", "stp", "garp", "8021q"]);
        let plan = i.plan("bridge").unwrap();
        assert_eq!(plan[2].path, Path::new("/lib/modules/6.1.0-56-amd64/kernel/net/bridge/bridge.ko"));
        assert!(plan.iter().all(|s| s.required));
    }

    #[test]
    fn soft_dependencies_are_optional_and_ordered_as_libkmod_does() {
        let i = index();
        // The module's own dependencies, then its soft pre-dependencies, then itself.
        assert_eq!(names(&i.plan("xt_LOG").unwrap()), ["x_tables", "nf_log_syslog", "xt_LOG"]);
        // A soft dependency may be built in: listed, never loaded.
        let plan = i.plan("act_mpls").unwrap();
        assert_eq!(names(&plan), ["act_mpls", "mpls_gso"]);
        assert!(plan[1].builtin && !plan[1].required);
        let plan = i.plan("xt_REDIRECT").unwrap();
        assert_eq!(
            names(&plan),
            [
                "x_tables",
                "crc32c_intel",
                "crc32c_generic",
                "libcrc32c",
                "nf_defrag_ipv4",
                "nf_defrag_ipv6",
                "nf_conntrack",
                "nf_nat",
                "xt_REDIRECT"
            ]
        );
        let required: Vec<bool> = plan.iter().map(|s| s.required).collect();
        assert_eq!(required, [true, false, false, true, true, true, true, true, true]);
    }

    #[test]
    fn a_missing_dependency_names_module_and_file() {
        let i = Index::from_texts(Path::new("/m"), "kernel/a.ko: kernel/b.ko\n", "", "", "", b"");
        let e = i.plan("a").unwrap_err().to_string();
        assert!(e.contains("module a") && e.contains("kernel/b.ko") && e.contains("/m/modules.dep"), "{e}");
    }

    #[test]
    fn probe_loads_in_order_and_skips_failed_soft_dependencies() {
        let i = index();
        let mut attempts = Vec::new();
        let outcome = probe_with(&i, "ipt_REDIRECT", "", &mut |s, _| {
            attempts.push(s.name.clone());
            if s.name == "crc32c_intel" {
                // qemu64 has no SSE4.2: crc32c-intel's init fails with ENODEV.
                return Err(ModprobeError::Load {
                    module: s.name.clone(),
                    file: s.path.clone(),
                    error: "ENODEV".into(),
                });
            }
            Ok(s.name != "x_tables") // pretend x_tables was loaded already
        })
        .unwrap();
        assert_eq!(attempts.len(), 9);
        let Outcome::Loaded(loaded) = outcome else { panic!("{outcome:?}") };
        assert_eq!(loaded.first().map(String::as_str), Some("crc32c_generic"));
        assert_eq!(loaded.last().map(String::as_str), Some("xt_REDIRECT"));
        assert!(!loaded.contains(&"x_tables".to_string()) && !loaded.contains(&"crc32c_intel".to_string()));
    }

    #[test]
    fn alias_with_several_modules_succeeds_if_one_loads() {
        let i = index();
        let out = probe_with(&i, "crypto-crc32c", "", &mut |s, _| {
            if s.name == "crc32c_intel" {
                Err(ModprobeError::Load { module: s.name.clone(), file: s.path.clone(), error: "ENODEV".into() })
            } else {
                Ok(true)
            }
        });
        assert_eq!(out.unwrap(), Outcome::Loaded(vec!["crc32c_generic".into()]));
        let e = probe_with(&i, "crypto-crc32c", "", &mut |s, _| {
            Err(ModprobeError::Load { module: s.name.clone(), file: s.path.clone(), error: "ENODEV".into() })
        })
        .unwrap_err();
        assert!(e.to_string().contains("crc32c_intel") && e.to_string().contains("crc32c-intel.ko"), "{e}");
    }

    #[test]
    fn a_failed_hard_dependency_fails_the_request_and_stops() {
        let i = index();
        let mut attempts = 0;
        let e = probe_with(&i, "rtnl-link-bridge", "", &mut |s, _| {
            attempts += 1;
            if s.name == "stp" {
                Err(ModprobeError::Load { module: s.name.clone(), file: s.path.clone(), error: "EINVAL".into() })
            } else {
                Ok(true)
            }
        })
        .unwrap_err();
        assert_eq!(attempts, 2, "bridge must not be tried after stp failed");
        assert!(e.to_string().contains("module stp") && e.to_string().contains("kernel/net/802/stp.ko"), "{e}");
    }

    #[test]
    fn builtin_and_unknown_requests() {
        let i = index();
        let mut never = |_: &Step, _: &str| -> Result<bool, ModprobeError> { panic!("nothing to load") };
        assert_eq!(probe_with(&i, "net-pf-1", "", &mut never).unwrap(), Outcome::Builtin("unix".into()));
        let e = probe_with(&i, "net-pf-42", "", &mut never).unwrap_err();
        assert!(matches!(e, ModprobeError::NotFound { .. }));
        assert!(e.to_string().contains("net-pf-42") && e.to_string().contains("/lib/modules/6.1.0-56-amd64"), "{e}");
    }

    #[test]
    fn params_go_to_the_requested_module_only() {
        let i = index();
        let mut seen = Vec::new();
        probe_with(&i, "bridge", "a=1 b=2", &mut |s, p| {
            seen.push(format!("{}[{p}]", s.name));
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, ["llc[]", "stp[]", "bridge[a=1 b=2]"]);
    }

    #[test]
    fn show_depends_prints_libkmod_lines() {
        let i = index();
        assert_eq!(
            show_depends(&i, "rtnl-link-bridge", "").unwrap(),
            [
                "insmod /lib/modules/6.1.0-56-amd64/kernel/net/llc/llc.ko ",
                "insmod /lib/modules/6.1.0-56-amd64/kernel/net/802/stp.ko ",
                "insmod /lib/modules/6.1.0-56-amd64/kernel/net/bridge/bridge.ko ",
            ]
        );
        assert_eq!(show_depends(&i, "net-pf-10", "").unwrap(), ["builtin ipv6"]);
        assert_eq!(
            show_depends(&i, "act_mpls", "").unwrap(),
            ["insmod /lib/modules/6.1.0-56-amd64/kernel/net/sched/act_mpls.ko ", "builtin mpls_gso"]
        );
    }
}
