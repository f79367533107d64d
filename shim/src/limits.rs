//! A container's CPU and memory limits as the VM must hold them: what its OCI resources ask
//! for, and how much a new set of resources (an in-place resize) adds to what the VM was already
//! grown by. Hot-plugged vCPUs and memory are never taken back (as in Kata), so a lowered limit
//! only lowers the guest cgroup's, and a later raise adds what goes beyond the highest so far.

use oci_spec::runtime::LinuxResources;

/// The CPUs and bytes of memory a container's limits ask the VM for (None: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// ceil(CFS quota / period).
    pub cpus: Option<u32>,
    /// The memory limit in bytes.
    pub memory: Option<u64>,
}

/// The CPUs a CFS limit allows, rounded up (`quota / period`); none when unlimited.
pub fn cpu_limit(quota: Option<i64>, period: Option<u64>) -> Option<u32> {
    match (quota, period) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some((q as u64).div_ceil(p).min(u32::MAX as u64) as u32),
        _ => None,
    }
}

impl Limits {
    /// The limits in OCI resources (`linux.resources` of a spec, or an `Update`).
    pub fn of(resources: Option<&LinuxResources>) -> Limits {
        let cpus = resources.and_then(|r| r.cpu().as_ref()).and_then(|c| cpu_limit(c.quota(), c.period()));
        let memory =
            resources.and_then(|r| r.memory().as_ref()).and_then(|m| m.limit()).filter(|l| *l > 0).map(|l| l as u64);
        Limits { cpus, memory }
    }

    /// What going from `self` (what the VM was grown by so far) to `new` adds: (vCPUs, bytes).
    pub fn growth_to(&self, new: &Limits) -> (u32, u64) {
        let cpus = new.cpus.unwrap_or(0).saturating_sub(self.cpus.unwrap_or(0));
        let memory = new.memory.unwrap_or(0).saturating_sub(self.memory.unwrap_or(0));
        (cpus, memory)
    }

    /// The higher of each (what the VM holds after a resize: nothing is unplugged).
    pub fn max(&self, other: &Limits) -> Limits {
        let pick = |a: Option<u64>, b: Option<u64>| a.max(b);
        Limits {
            cpus: pick(self.cpus.map(u64::from), other.cpus.map(u64::from)).map(|c| c as u32),
            memory: pick(self.memory, other.memory),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_limits_round_up_and_unlimited_is_none() {
        assert_eq!(cpu_limit(Some(100_000), Some(100_000)), Some(1));
        assert_eq!(cpu_limit(Some(150_000), Some(100_000)), Some(2));
        assert_eq!(cpu_limit(Some(10_000), Some(100_000)), Some(1), "any limit needs one CPU");
        assert_eq!(cpu_limit(Some(-1), Some(100_000)), None, "-1: unlimited");
        assert_eq!(cpu_limit(Some(100_000), Some(0)), None);
        assert_eq!(cpu_limit(None, Some(100_000)), None);
    }

    #[test]
    fn resources_are_read() {
        let r: LinuxResources = serde_json::from_value(serde_json::json!({
            "cpu": {"quota": 150000, "period": 100000},
            "memory": {"limit": 134217728}
        }))
        .unwrap();
        assert_eq!(Limits::of(Some(&r)), Limits { cpus: Some(2), memory: Some(128 << 20) });
        assert_eq!(Limits::of(None), Limits::default());
        let unlimited: LinuxResources = serde_json::from_value(serde_json::json!({"memory": {"limit": -1}})).unwrap();
        assert_eq!(Limits::of(Some(&unlimited)).memory, None);
    }

    #[test]
    fn a_resize_adds_only_what_goes_beyond_the_highest_so_far() {
        let mib = |m: u64| Some(m << 20);
        let first = Limits { cpus: Some(1), memory: mib(128) };
        assert_eq!(Limits::default().growth_to(&first), (1, 128 << 20));
        let lower = Limits { cpus: Some(1), memory: mib(64) };
        assert_eq!(first.growth_to(&lower), (0, 0), "lowering unplugs nothing");
        let held = first.max(&lower);
        assert_eq!(held, first);
        let higher = Limits { cpus: Some(2), memory: mib(256) };
        assert_eq!(held.growth_to(&higher), (1, 128 << 20));
        assert_eq!(first.growth_to(&Limits::default()), (0, 0), "unlimited adds nothing");
    }
}
