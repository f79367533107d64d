//! Hot-plugged block devices (`CreateContainerRequest.devices`, type `blk`).
//!
//! The host hot-plugs a virtio-blk disk over QMP and names it by its PCI path as the hypervisor
//! reports it, in Kata's notation: hex slots from the root bus down, separated by `/` —
//! `05` is device 05 on the root bus, `03/00` device 00 behind the bridge (PCIe root port) at
//! root-bus slot 03. Function 0 is implied. The agent waits for the disk in sysfs:
//!
//! ```text
//! /sys/bus/pci/devices/0000:00:03.0/pci_bus/0000:01     the bridge's secondary bus
//! /sys/bus/pci/devices/0000:01:00.0/virtio2/block/vda/dev   "254:0"
//! ```
//!
//! and adds a `linux.devices` node (`b`, major, minor, 0660, uid/gid 0) at the container path and a
//! `linux.resources.devices` allow rule for it. (cgroup v2 enforces device rules only through
//! BPF, which the agent's libcontainer build leaves out: the rule keeps the spec correct.)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_protocol::agent as pb;
use libcontainer::oci_spec::runtime::{
    LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxResources, Spec,
};

/// How long a hot-plugged disk may take to appear.
pub const WAIT: Duration = Duration::from_secs(10);
/// After this long without the device, ask the kernel to rescan the PCI buses once.
const RESCAN_AFTER: Duration = Duration::from_secs(2);

/// A block device found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// Kernel name (`vda`).
    pub name: String,
    pub major: u64,
    pub minor: u64,
}

/// The guest's `/sys` (or a fake tree in tests).
#[derive(Debug, Clone)]
pub struct PciSysfs {
    root: PathBuf,
}

impl Default for PciSysfs {
    fn default() -> Self {
        Self { root: PathBuf::from("/sys") }
    }
}

/// Parses a PCI path (`03/00`, `05`): one to 32 hops of hex slots 00..1f.
pub fn parse_pci_path(s: &str) -> Result<Vec<u8>, String> {
    let hops: Vec<&str> = s.split('/').collect();
    if s.is_empty() || hops.len() > 32 {
        return Err(format!("{s:?} is not a PCI path (hex slots from the root bus, e.g. \"03/00\")"));
    }
    hops.iter()
        .map(|h| match u8::from_str_radix(h, 16) {
            Ok(slot) if !h.is_empty() && h.len() <= 2 && slot < 32 => Ok(slot),
            _ => Err(format!("{s:?} is not a PCI path: {h:?} is not a slot (hex 00..1f)")),
        })
        .collect()
}

impl PciSysfs {
    /// A sysfs rooted elsewhere (tests).
    #[cfg(test)]
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn device_dir(&self, address: &str) -> PathBuf {
        self.root.join("bus/pci/devices").join(address)
    }

    /// Walks `slots` from the root bus to the virtio block disk; the error says what is missing.
    pub fn find_block_device(&self, slots: &[u8]) -> Result<BlockDevice, String> {
        let mut bus = "0000:00".to_string();
        let mut dir = PathBuf::new();
        for (i, slot) in slots.iter().enumerate() {
            let address = format!("{bus}:{slot:02x}.0");
            dir = self.device_dir(&address);
            if !dir.exists() {
                return Err(format!("no PCI device {address} ({})", dir.display()));
            }
            if i + 1 < slots.len() {
                bus = secondary_bus(&dir).ok_or_else(|| {
                    format!(
                        "PCI device {address} has no secondary bus ({}/pci_bus/ is empty: not a bridge?)",
                        dir.display()
                    )
                })?;
            }
        }
        disk_under(&dir)
    }

    /// Waits up to `wait` for the disk at `pci_path`, polling; `what` names the device in errors.
    pub async fn wait_block_device(&self, pci_path: &str, wait: Duration, what: &str) -> Result<BlockDevice, String> {
        let slots = parse_pci_path(pci_path).map_err(|e| format!("{what}: vm_path {e}"))?;
        let started = Instant::now();
        let mut rescanned = false;
        loop {
            let err = match self.find_block_device(&slots) {
                Ok(d) => return Ok(d),
                Err(e) => e,
            };
            if started.elapsed() >= wait {
                return Err(format!("{what} (PCI path {pci_path}): {err} after {}s", wait.as_secs()));
            }
            if !rescanned && started.elapsed() >= RESCAN_AFTER {
                // The hot-plug notification may have been missed: ask for a rescan, once.
                let _ = std::fs::write(self.root.join("bus/pci/rescan"), "1");
                rescanned = true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The bus behind a bridge: the name of the entry of `<dev>/pci_bus/` (`0000:01`).
fn secondary_bus(dev: &Path) -> Option<String> {
    let mut buses: Vec<String> = std::fs::read_dir(dev.join("pci_bus"))
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    buses.sort();
    buses.into_iter().next()
}

/// The virtio block disk of a PCI device: `<dev>/virtio*/block/<name>/dev`.
fn disk_under(dev: &Path) -> Result<BlockDevice, String> {
    let missing =
        || format!("no virtio block disk under {} (virtio*/block/*/dev): is virtio_blk loaded?", dev.display());
    let rd = std::fs::read_dir(dev).map_err(|_| missing())?;
    let mut virtio: Vec<PathBuf> =
        rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("virtio")).map(|e| e.path()).collect();
    virtio.sort();
    for v in virtio {
        let Ok(disks) = std::fs::read_dir(v.join("block")) else { continue };
        let mut disks: Vec<PathBuf> = disks.flatten().map(|e| e.path()).collect();
        disks.sort();
        for d in disks {
            let file = d.join("dev");
            let Ok(text) = std::fs::read_to_string(&file) else { continue };
            let (major, minor) =
                parse_dev(&text).ok_or_else(|| format!("{}: {text:?} is not major:minor", file.display()))?;
            let name = d.file_name().unwrap_or_default().to_string_lossy().into_owned();
            return Ok(BlockDevice { name, major, minor });
        }
    }
    Err(missing())
}

fn parse_dev(text: &str) -> Option<(u64, u64)> {
    let (a, b) = text.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Checks a request device; returns its PCI path and container path. Errors name the device.
pub fn check(d: &pb::Device, index: usize) -> Result<(), String> {
    let what = format!("devices[{index}] (id {:?})", d.id);
    if d.type_ != "blk" {
        return Err(format!("{what}: type {:?} is not supported (blk)", d.type_));
    }
    if d.vm_path.is_empty() {
        return Err(format!("{what}: vm_path (the PCI path) is missing"));
    }
    parse_pci_path(&d.vm_path).map_err(|e| format!("{what}: vm_path {e}"))?;
    if !Path::new(&d.container_path).starts_with("/dev") {
        // libcontainer 0.7 creates device nodes only below /dev.
        return Err(format!("{what}: container_path {:?} is not below /dev", d.container_path));
    }
    Ok(())
}

/// Adds the block device node (the guest's major:minor) and its allow rule to the spec. An
/// existing `linux.devices` entry for the same container path is replaced. (An agent rule; see
/// the owner list in [`super::spec`].)
pub fn add_to_spec(spec: &mut Spec, container_path: &str, dev: &BlockDevice) -> Result<(), String> {
    let linux = spec.linux_mut().as_mut().ok_or("OCI.Linux: missing")?;
    let (major, minor) = (dev.major as i64, dev.minor as i64);
    let node = LinuxDeviceBuilder::default()
        .path(container_path)
        .typ(LinuxDeviceType::B)
        .major(major)
        .minor(minor)
        .file_mode(0o660u32)
        .uid(0u32)
        .gid(0u32)
        .build()
        .map_err(|e| format!("device node {container_path}: {e}"))?;
    let devices = linux.devices_mut().get_or_insert_with(Vec::new);
    devices.retain(|d| d.path() != Path::new(container_path));
    devices.push(node);
    let rule = LinuxDeviceCgroupBuilder::default()
        .allow(true)
        .typ(LinuxDeviceType::B)
        .major(major)
        .minor(minor)
        .access("rwm")
        .build()
        .map_err(|e| format!("device rule {container_path}: {e}"))?;
    let resources = linux.resources_mut().get_or_insert_with(LinuxResources::default);
    resources.devices_mut().get_or_insert_with(Vec::new).push(rule);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sysfs like a q35 guest's: root ports at 00:03.0 (disk behind it on bus 01) and 00:04.0
    /// (empty, bus 02), a disk on the root bus at 00:05.0, a NIC at 00:06.0; `bus/pci/devices`
    /// entries are symlinks into `devices/`, as in the real tree.
    fn fake() -> (PathBuf, PciSysfs) {
        let root = std::env::temp_dir().join(format!(
            "podvisor-agent-pci-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let top = root.join("devices/pci0000:00");
        let links = root.join("bus/pci/devices");
        std::fs::create_dir_all(&links).unwrap();
        let add = |rel: &str| {
            let dir = top.join(rel);
            std::fs::create_dir_all(&dir).unwrap();
            let name = rel.rsplit('/').next().unwrap();
            std::os::unix::fs::symlink(&dir, links.join(name)).unwrap();
            dir
        };
        let rp0 = add("0000:00:03.0");
        std::fs::create_dir_all(rp0.join("pci_bus/0000:01")).unwrap();
        let disk = add("0000:00:03.0/0000:01:00.0");
        std::fs::create_dir_all(disk.join("virtio2/block/vda")).unwrap();
        std::fs::write(disk.join("virtio2/block/vda/dev"), "254:0\n").unwrap();
        let rp1 = add("0000:00:04.0");
        std::fs::create_dir_all(rp1.join("pci_bus/0000:02")).unwrap();
        let root_disk = add("0000:00:05.0");
        std::fs::create_dir_all(root_disk.join("virtio3/block/vdb")).unwrap();
        std::fs::write(root_disk.join("virtio3/block/vdb/dev"), "254:16\n").unwrap();
        let nic = add("0000:00:06.0");
        std::fs::create_dir_all(nic.join("virtio1/net/eth0")).unwrap();
        (root.clone(), PciSysfs::at(root))
    }

    #[test]
    fn pci_paths_parse() {
        assert_eq!(parse_pci_path("03/00").unwrap(), vec![3, 0]);
        assert_eq!(parse_pci_path("05").unwrap(), vec![5]);
        assert_eq!(parse_pci_path("1f/1/0a").unwrap(), vec![0x1f, 1, 0xa]);
        for bad in ["", "/", "03/", "20", "003", "xx", "03//00"] {
            assert!(parse_pci_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn walks_root_ports_and_the_root_bus() {
        let (root, s) = fake();
        assert_eq!(s.find_block_device(&[3, 0]).unwrap(), BlockDevice { name: "vda".into(), major: 254, minor: 0 });
        assert_eq!(s.find_block_device(&[5]).unwrap(), BlockDevice { name: "vdb".into(), major: 254, minor: 16 });
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn errors_say_what_is_missing() {
        let (root, s) = fake();
        let e = s.find_block_device(&[7]).unwrap_err();
        assert!(e.contains("no PCI device 0000:00:07.0"), "{e}");
        let e = s.find_block_device(&[4, 0]).unwrap_err();
        assert!(e.contains("no PCI device 0000:02:00.0"), "{e}");
        let e = s.find_block_device(&[5, 0]).unwrap_err();
        assert!(e.contains("0000:00:05.0 has no secondary bus"), "{e}");
        let e = s.find_block_device(&[6]).unwrap_err();
        assert!(e.contains("no virtio block disk under") && e.contains("0000:00:06.0"), "{e}");
        std::fs::write(root.join("devices/pci0000:00/0000:00:05.0/virtio3/block/vdb/dev"), "junk").unwrap();
        assert!(s.find_block_device(&[5]).unwrap_err().contains("not major:minor"));
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn waits_for_a_late_disk_and_times_out_naming_the_device() {
        let (root, s) = fake();
        let dir = root.join("devices/pci0000:00/0000:00:04.0/0000:02:00.0");
        let (link, late) = (root.join("bus/pci/devices/0000:02:00.0"), dir.clone());
        let plug = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            std::fs::create_dir_all(late.join("virtio4/block/vdc")).unwrap();
            std::fs::write(late.join("virtio4/block/vdc/dev"), "254:32").unwrap();
            std::os::unix::fs::symlink(&late, link).unwrap();
        });
        let d = s.wait_block_device("04/00", Duration::from_secs(5), "device d1").await.unwrap();
        plug.await.unwrap();
        assert_eq!((d.name.as_str(), d.major, d.minor), ("vdc", 254, 32));
        let e = s.wait_block_device("04/01", Duration::from_millis(100), "device d2").await.unwrap_err();
        assert!(e.starts_with("device d2 (PCI path 04/01): no PCI device 0000:02:01.0"), "{e}");
        let e = s.wait_block_device("zz", Duration::from_millis(100), "device d3").await.unwrap_err();
        assert!(e.starts_with("device d3: vm_path"), "{e}");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn request_devices_are_checked() {
        let d = |t: &str, vm: &str, cp: &str| pb::Device {
            id: "d1".into(),
            type_: t.into(),
            vm_path: vm.into(),
            container_path: cp.into(),
            ..Default::default()
        };
        assert!(check(&d("blk", "03/00", "/dev/xvda"), 0).is_ok());
        assert!(check(&d("vfio", "03/00", "/dev/x"), 1).unwrap_err().starts_with("devices[1] (id \"d1\"): type"));
        assert!(check(&d("blk", "", "/dev/x"), 0).unwrap_err().contains("vm_path"));
        assert!(check(&d("blk", "03/00", "dev/x"), 0).unwrap_err().contains("container_path"));
        assert!(check(&d("blk", "03/00", "/data/disk"), 0).unwrap_err().contains("not below /dev"));
    }

    #[test]
    fn spec_gets_the_node_and_an_allow_rule() {
        use serde_json::json;
        let typed = |v: serde_json::Value| -> Spec { serde_json::from_value(v).unwrap() };
        let mut spec = typed(json!({"ociVersion": "1.0.2", "linux": {
            "devices": [{"path": "/dev/xvda", "type": "b", "major": 8, "minor": 0}, {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
            "resources": {"devices": [{"allow": false, "access": "rwm"}]}
        }}));
        add_to_spec(&mut spec, "/dev/xvda", &BlockDevice { name: "vda".into(), major: 254, minor: 16 }).unwrap();
        let v = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            v["linux"]["devices"],
            json!([{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
                   {"path": "/dev/xvda", "type": "b", "major": 254, "minor": 16, "fileMode": 0o660, "uid": 0, "gid": 0}])
        );
        assert_eq!(
            v["linux"]["resources"]["devices"],
            json!([{"allow": false, "access": "rwm"}, {"allow": true, "type": "b", "major": 254, "minor": 16, "access": "rwm"}])
        );
        let mut bare = typed(json!({"ociVersion": "1.0.2", "linux": {}}));
        add_to_spec(&mut bare, "/dev/b", &BlockDevice { name: "vdb".into(), major: 254, minor: 0 }).unwrap();
        let v = serde_json::to_value(&bare).unwrap();
        assert_eq!(v["linux"]["devices"][0]["path"], "/dev/b");
        assert_eq!(v["linux"]["resources"]["devices"][0]["allow"], true);
        let mut none = typed(json!({"ociVersion": "1.0.2"}));
        let e = add_to_spec(&mut none, "/dev/c", &BlockDevice { name: "vdc".into(), major: 254, minor: 32 });
        assert_eq!(e, Err("OCI.Linux: missing".to_string()));
    }
}
