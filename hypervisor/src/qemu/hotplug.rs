//! Hotplug over QMP: memory as shared-memfd pc-dimms, vCPUs from `query-hotpluggable-cpus`, block
//! devices as virtio-blk on reserved PCIe root ports (q35) or the root bus (pc).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use slog::{info, Logger};

use super::cmdline::{VmSpec, HOTPLUG_ROOT_PORTS};
use crate::qmp::Qmp;
use crate::{Device, DeviceAddress, Error, MemoryMiB, Result};

/// Guest memory block size on x86_64 Linux: hot-added memory is rounded up to it so that every
/// byte can be onlined.
pub const MEMORY_GRANULE_MIB: u64 = 128;

/// What has been hot-plugged so far.
#[derive(Debug, Default)]
pub(super) struct State {
    memory_mib: u64,
    max_memory_mib: u64,
    memory_slots: u32,
    dimms: Vec<String>,
    next_dimm: u32,
    vcpus: u32,
    max_vcpus: u32,
    hot_cpus: Vec<String>,
    /// Device id → root port it occupies (None on `pc`).
    devices: BTreeMap<String, Option<String>>,
    free_ports: Vec<String>,
    machine: String,
}

/// Rounds a memory increase up to the granule.
pub fn round_up_mib(mib: u64) -> u64 {
    mib.div_ceil(MEMORY_GRANULE_MIB) * MEMORY_GRANULE_MIB
}

impl State {
    pub(super) fn new(spec: &VmSpec) -> State {
        State {
            memory_mib: spec.memory_mib,
            max_memory_mib: spec.max_memory_mib,
            memory_slots: spec.memory_slots,
            vcpus: spec.vcpus,
            max_vcpus: spec.max_vcpus,
            free_ports: if spec.machine == "q35" {
                (0..HOTPLUG_ROOT_PORTS).rev().map(|i| format!("rp{i}")).collect()
            } else {
                Vec::new()
            },
            machine: spec.machine.clone(),
            ..Default::default()
        }
    }

    pub(super) async fn resize_memory(&mut self, qmp: &Qmp, total: MemoryMiB, log: &Logger) -> Result<MemoryMiB> {
        if total.0 <= self.memory_mib {
            // Shrinking would need the guest to offline movable memory first; keep what we have.
            return Ok(MemoryMiB(self.memory_mib));
        }
        let delta = round_up_mib(total.0 - self.memory_mib);
        if self.memory_mib + delta > self.max_memory_mib {
            return Err(Error::InvalidRequest(format!(
                "cannot grow guest memory to {} MiB: the limit is {} MiB (default_maxmemory)",
                self.memory_mib + delta,
                self.max_memory_mib
            )));
        }
        if self.dimms.len() as u32 >= self.memory_slots {
            return Err(Error::InvalidRequest(format!(
                "all {} memory hotplug slots are used; raise memory_slots in [hypervisor.qemu]",
                self.memory_slots
            )));
        }
        let n = self.next_dimm;
        self.next_dimm += 1;
        let (mem, dimm) = (format!("hpmem{n}"), format!("dimm{n}"));
        qmp.execute(
            "object-add",
            Some(json!({"qom-type": "memory-backend-memfd", "id": mem, "size": delta << 20, "share": true})),
        )
        .await?;
        let mut events = qmp.subscribe();
        if let Err(e) = qmp.execute("device_add", Some(json!({"driver": "pc-dimm", "id": dimm, "memdev": mem}))).await {
            let _ = qmp.execute("object-del", Some(json!({"id": mem}))).await;
            return Err(e.into());
        }
        // QEMU has the DIMM from here on, whatever the guest says (or a cancelled caller).
        self.dimms.push(dimm.clone());
        self.memory_mib += delta;
        // The guest has created the memory blocks once its ACPI handler reports back.
        wait_for_ost(&mut events, &dimm).await?;
        info!(log, "hot-added memory"; "added_mib" => delta, "total_mib" => self.memory_mib);
        Ok(MemoryMiB(self.memory_mib))
    }

    pub(super) async fn resize_vcpus(&mut self, qmp: &Qmp, count: u32) -> Result<u32> {
        if count == 0 || count > self.max_vcpus {
            return Err(Error::InvalidRequest(format!(
                "cannot set {count} vCPUs: use 1 to {} (default_maxvcpus)",
                self.max_vcpus
            )));
        }
        while self.vcpus > count {
            let Some(id) = self.hot_cpus.pop() else { break };
            qmp.execute("device_del", Some(json!({"id": id}))).await?;
            self.vcpus -= 1;
        }
        if self.vcpus < count {
            let slots = qmp.execute("query-hotpluggable-cpus", None).await?;
            let free: Vec<&Value> = slots
                .as_array()
                .map(|a| a.iter().filter(|s| s.get("qom-path").is_none()).collect())
                .unwrap_or_default();
            // QEMU lists the highest slot first; fill from the lowest.
            for slot in free.iter().rev().take((count - self.vcpus) as usize) {
                let id = format!("cpu-{}", self.vcpus);
                let mut args = json!({"driver": slot["type"], "id": id});
                if let Some(props) = slot["props"].as_object() {
                    for (k, v) in props {
                        args[k] = v.clone();
                    }
                }
                let mut events = qmp.subscribe();
                qmp.execute("device_add", Some(args)).await?;
                self.hot_cpus.push(id.clone());
                self.vcpus += 1;
                wait_for_ost(&mut events, &id).await?;
            }
        }
        Ok(self.vcpus)
    }

    pub(super) async fn add_device(&mut self, qmp: &Qmp, device: Device) -> Result<DeviceAddress> {
        let Device::Block { id, path, read_only } = device;
        if self.devices.contains_key(&id) {
            return Err(Error::InvalidRequest(format!("device id {id} is already in use")));
        }
        let meta = std::fs::metadata(&path).map_err(crate::io_err(format!("block device {}", path.display())))?;
        // The port is taken only once QEMU has the device on it (hot-plugs run one at a time).
        let port = if self.machine == "q35" {
            Some(self.free_ports.last().cloned().ok_or_else(|| {
                Error::InvalidRequest(format!("all {HOTPLUG_ROOT_PORTS} hotplug root ports are in use"))
            })?)
        } else {
            None
        };
        let node = format!("drive-{id}");
        let driver =
            if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) { "host_device" } else { "file" };
        qmp.execute(
            "blockdev-add",
            Some(json!({"driver": "raw", "node-name": node, "read-only": read_only,
                        "file": {"driver": driver, "filename": path.to_string_lossy()}})),
        )
        .await?;
        let mut args = json!({"driver": "virtio-blk-pci", "id": id, "drive": node});
        args["bus"] = json!(port.clone().unwrap_or_else(|| "pci.0".into()));
        if let Err(e) = qmp.execute("device_add", Some(args)).await {
            let _ = qmp.execute("blockdev-del", Some(json!({"node-name": node}))).await;
            return Err(Error::from(e));
        }
        // QEMU has the device on the port: recorded now, so that remove_device can take it out
        // even if the lookup below fails or the caller gives up.
        if port.is_some() {
            self.free_ports.pop();
        }
        self.devices.insert(id.clone(), port);
        pci_path(qmp, &id).await
    }

    pub(super) async fn remove_device(&mut self, qmp: &Qmp, id: &str) -> Result<()> {
        let Some(port) = self.devices.get(id).cloned() else {
            return Err(Error::InvalidRequest(format!("no hot-plugged device with id {id}")));
        };
        let mut events = qmp.subscribe();
        qmp.execute("device_del", Some(json!({"id": id}))).await?;
        let deleted = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.recv().await {
                    Ok(ev) if ev.name == "DEVICE_DELETED" && ev.data["device"] == id => return true,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
                }
            }
        })
        .await;
        match deleted {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::VmFailed(format!("QMP closed while waiting for the guest to release device {id}")))
            }
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("the guest to release device {id}"),
                    after: Duration::from_secs(10),
                })
            }
        }
        qmp.execute("blockdev-del", Some(json!({"node-name": format!("drive-{id}")}))).await?;
        self.devices.remove(id);
        if let Some(p) = port {
            self.free_ports.push(p);
        }
        Ok(())
    }
}

/// How long the guest may take to acknowledge an ACPI hotplug.
const OST_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits for the guest's `_OST` acknowledgement of an ACPI hotplug of `id` (QMP event
/// `ACPI_DEVICE_OST`); after it the new memory blocks or CPU exist in the guest's sysfs.
async fn wait_for_ost(events: &mut tokio::sync::broadcast::Receiver<crate::qmp::Event>, id: &str) -> Result<()> {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(ev) if ev.name == "ACPI_DEVICE_OST" && ev.data["info"]["device"] == id => {
                    return Ok(ev.data["info"]["status"].as_u64().unwrap_or(0));
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Err(Error::VmFailed(format!("QMP closed while waiting for the guest to accept {id}")))
                }
            }
        }
    };
    match tokio::time::timeout(OST_TIMEOUT, wait).await {
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(status)) => {
            Err(Error::VmFailed(format!("the guest rejected hot-plugged {id} (ACPI _OST status {status})")))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Timeout {
            what: format!("the guest to acknowledge hot-plugged {id} (ACPI_DEVICE_OST)"),
            after: OST_TIMEOUT,
        }),
    }
}

/// Finds a device in `query-pci` and returns its path in Kata's `bridge/device` notation.
async fn pci_path(qmp: &Qmp, id: &str) -> Result<DeviceAddress> {
    let buses = qmp.execute("query-pci", None).await?;
    find_pci_path(&buses, id)
        .map(|pci_path| DeviceAddress { pci_path })
        .ok_or_else(|| Error::InvalidRequest(format!("device {id} was added but query-pci does not list it")))
}

/// Pure part of [`pci_path`].
pub fn find_pci_path(buses: &Value, id: &str) -> Option<String> {
    let root = buses.as_array()?.iter().find(|b| b["bus"] == 0)?;
    for dev in root["devices"].as_array()? {
        let slot = dev["slot"].as_u64()?;
        if dev["qdev_id"] == id {
            return Some(format!("{slot:02x}"));
        }
        if let Some(children) = dev["pci_bridge"]["devices"].as_array() {
            if let Some(child) = children.iter().find(|c| c["qdev_id"] == id) {
                return Some(format!("{slot:02x}/{:02x}", child["slot"].as_u64()?));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_rounds_to_guest_blocks() {
        assert_eq!(round_up_mib(1), 128);
        assert_eq!(round_up_mib(128), 128);
        assert_eq!(round_up_mib(256), 256);
        assert_eq!(round_up_mib(300), 384);
    }

    #[test]
    fn pci_path_on_root_port_and_root_bus() {
        let buses = json!([{"bus": 0, "devices": [
            {"slot": 0, "qdev_id": ""},
            {"slot": 3, "qdev_id": "rp0", "pci_bridge": {"devices": [{"slot": 0, "qdev_id": "blk1"}]}},
            {"slot": 5, "qdev_id": "blk2"}
        ]}]);
        assert_eq!(find_pci_path(&buses, "blk1").as_deref(), Some("03/00"));
        assert_eq!(find_pci_path(&buses, "blk2").as_deref(), Some("05"));
        assert_eq!(find_pci_path(&buses, "nope"), None);
    }
}
