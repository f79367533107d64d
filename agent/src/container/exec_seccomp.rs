//! Exec'd processes get their container's seccomp filter, as runc gives them.
//!
//! libcontainer 0.7's tenant builder (`exec`) rebuilds the spec's `linux` section with the
//! namespaces and cgroup only, so the filter of the container's `config.json` would be lost. The
//! helper therefore hands the tenant builder a copy of the process that may still use
//! CAP_SYS_ADMIN and CAP_SETPCAP, plus [`SeccompExecutor`], which runs in the exec'd process
//! right before `execve`: it installs the filter (CAP_SYS_ADMIN is what an unprivileged filter
//! needs without no_new_privs), then drops to the process's own capabilities exactly as
//! libcontainer does (bounding, effective, permitted, inheritable, ambient), then execs.

use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::{Capability, LinuxCapabilities, LinuxSeccomp, Process, Spec};
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};

/// Capabilities the executor needs until the filter is installed and the real ones are set.
const RAISED: [Capability; 2] = [Capability::SysAdmin, Capability::Setpcap];

/// Installs a seccomp filter, then drops to the process's capabilities, then execs.
#[derive(Clone)]
pub struct SeccompExecutor {
    seccomp: LinuxSeccomp,
    /// The process's own capabilities, when they had to be raised for the install.
    drop_to: Option<LinuxCapabilities>,
}

/// The seccomp filter of a container's bundle (`config.json`), if it has one.
pub fn container_filter(bundle: &Path) -> Result<Option<LinuxSeccomp>, String> {
    let path = bundle.join("config.json");
    let spec = Spec::load(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(spec.linux().as_ref().and_then(|l| l.seccomp().clone()))
}

/// Writes `<process>.seccomp.json`, the process the tenant builder should run (capabilities
/// raised by [`RAISED`] when installing the filter needs them), and returns it with the
/// executor.
pub fn prepare(process_path: &Path, seccomp: LinuxSeccomp) -> Result<(PathBuf, SeccompExecutor), String> {
    let text = std::fs::read(process_path).map_err(|e| format!("{}: {e}", process_path.display()))?;
    let mut process: Process = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", process_path.display()))?;
    let (raised, drop_to) = raise(&process);
    if let Some(caps) = raised {
        process.set_capabilities(Some(caps));
    }
    let out = raised_copy(process_path);
    let json = serde_json::to_vec(&process).map_err(|e| format!("process with raised capabilities: {e}"))?;
    std::fs::write(&out, json).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok((out, SeccompExecutor { seccomp, drop_to }))
}

/// Where [`prepare`] writes the process it hands the tenant builder (the agent removes it with
/// the process.json once the exec started).
pub fn raised_copy(process_path: &Path) -> PathBuf {
    process_path.with_extension("seccomp.json")
}

/// The raised capabilities to run with and the real ones to drop to afterwards; none when the
/// filter can be installed without them (no_new_privs, or no capability list: libcontainer then
/// keeps every capability).
fn raise(process: &Process) -> (Option<LinuxCapabilities>, Option<LinuxCapabilities>) {
    let Some(want) = process.capabilities().clone() else { return (None, None) };
    if process.no_new_privileges() == Some(true) {
        return (None, None);
    }
    let mut raised = want.clone();
    let add = |set: Option<&std::collections::HashSet<Capability>>| {
        let mut set = set.cloned().unwrap_or_default();
        set.extend(RAISED);
        Some(set)
    };
    raised.set_bounding(add(want.bounding().as_ref()));
    raised.set_effective(add(want.effective().as_ref()));
    raised.set_permitted(add(want.permitted().as_ref()));
    (Some(raised), Some(want))
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        match libcontainer::seccomp::initialize_seccomp(&self.seccomp) {
            Ok(None) => {}
            Ok(Some(_)) => {
                return Err(ExecutorError::Other(
                    "the container's seccomp profile asks for a notify listener (SCMP_ACT_NOTIFY), which exec'd processes do not support".into(),
                ))
            }
            Err(e) => return Err(ExecutorError::Other(format!("installing the container's seccomp filter for the exec'd process: {e}"))),
        }
        if let Some(caps) = &self.drop_to {
            let syscall = libcontainer::syscall::syscall::create_syscall();
            libcontainer::capabilities::drop_privileges(caps, syscall.as_ref())
                .map_err(|e| ExecutorError::Other(format!("dropping to the exec'd process's capabilities: {e}")))?;
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libcontainer::oci_spec::runtime::{LinuxCapabilitiesBuilder, ProcessBuilder};
    use std::collections::HashSet;

    fn process(nnp: Option<bool>, caps: Option<&[Capability]>) -> Process {
        let mut p = ProcessBuilder::default().args(vec!["true".to_string()]).build().unwrap();
        p.set_no_new_privileges(nnp);
        p.set_capabilities(caps.map(|c| {
            let set: HashSet<Capability> = c.iter().copied().collect();
            LinuxCapabilitiesBuilder::default()
                .bounding(set.clone())
                .effective(set.clone())
                .permitted(set.clone())
                .inheritable(HashSet::new())
                .ambient(HashSet::new())
                .build()
                .unwrap()
        }));
        p
    }

    #[test]
    fn capabilities_are_raised_only_when_the_install_needs_them() {
        let want = [Capability::Chown, Capability::NetBindService];
        let (raised, drop_to) = raise(&process(Some(false), Some(&want)));
        let raised = raised.expect("raised without no_new_privs");
        for set in [raised.bounding(), raised.effective(), raised.permitted()] {
            let set = set.as_ref().unwrap();
            assert!(RAISED.iter().chain(&want).all(|c| set.contains(c)), "{set:?}");
        }
        assert!(raised.inheritable().as_ref().unwrap().is_empty(), "inheritable is never raised");
        let drop_to = drop_to.unwrap();
        assert_eq!(drop_to.effective().as_ref().unwrap(), &want.into_iter().collect::<HashSet<_>>());

        assert_eq!(raise(&process(Some(true), Some(&want))), (None, None), "no_new_privs installs unprivileged");
        assert_eq!(raise(&process(Some(false), None)), (None, None), "no capability list: every capability is kept");
    }

    #[test]
    fn prepared_process_keeps_everything_but_the_capabilities() {
        let dir = std::env::temp_dir().join(format!("podvisor-exec-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("process.json");
        let p = process(Some(false), Some(&[Capability::Kill]));
        std::fs::write(&path, serde_json::to_vec(&p).unwrap()).unwrap();
        let seccomp = serde_json::from_str::<LinuxSeccomp>(r#"{"defaultAction":"SCMP_ACT_ALLOW"}"#).unwrap();
        let (out, exec) = prepare(&path, seccomp).unwrap();
        let written: Process = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(written.args(), p.args());
        assert!(written.capabilities().as_ref().unwrap().effective().as_ref().unwrap().contains(&Capability::SysAdmin));
        assert_eq!(exec.drop_to.as_ref(), p.capabilities().as_ref());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
