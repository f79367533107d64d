//! The podvm's QEMU command line: the shim's (`hypervisor::qemu::cmdline::VmSpec`: machine,
//! accelerator, all guest RAM as shared memfd, kernel parameters, QMP, the serial console on
//! stdio, the virtio-net NIC) without vsock, with the podvm's name, its user data as fw_cfg
//! `opt/io.podvisor/podvm` and the markers `list_instances` finds it by. Pure; golden-tested.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use hypervisor::qemu::cmdline::{NicDevice, VmSpec, VsockDevice};
use hypervisor::AccelChoice;

/// fw_cfg name of the user data (what the agent reads).
pub const FW_CFG_USER_DATA: &str = "opt/io.podvisor/podvm";
/// fw_cfg marker: the owner (the service's `podvisor.io/owner` tag).
pub const FW_CFG_OWNER: &str = "opt/io.podvisor/owner";
/// fw_cfg marker: the sandbox id.
pub const FW_CFG_SANDBOX: &str = "opt/io.podvisor/sandbox-id";
/// fw_cfg marker: the podvm's address.
pub const FW_CFG_IP: &str = "opt/io.podvisor/ip";

/// The tap's fd number in QEMU.
pub const TAP_FD: i32 = 3;

/// Everything the podvm's command line depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodvmSpec {
    /// Instance name (`-name`).
    pub name: String,
    /// The sandbox.
    pub sandbox_id: String,
    /// The owner marker.
    pub owner: String,
    /// KVM or TCG.
    pub accel: AccelChoice,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM, MiB.
    pub memory_mib: u64,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initrd.
    pub initrd: PathBuf,
    /// Registries the agent may pull from over plain HTTP (`host:port`).
    pub insecure_registries: Vec<String>,
    /// Verbose guest (`agent.log=debug` instead of `quiet`).
    pub debug: bool,
    /// The podvm's address.
    pub ip: Ipv4Addr,
    /// Its NIC's MAC.
    pub mac: String,
    /// The run directory (user data file, QMP socket).
    pub run_dir: PathBuf,
}

/// QEMU option values escape `,` by doubling it.
fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

/// The user data file in `run_dir`.
pub fn user_data_path(run_dir: &Path) -> PathBuf {
    run_dir.join("podvm.json")
}

/// The QMP socket in `run_dir`.
pub fn qmp_path(run_dir: &Path) -> PathBuf {
    run_dir.join("qmp.sock")
}

impl PodvmSpec {
    /// Kernel parameters added to the shim's: podvm mode and the insecure registries.
    pub fn extra_kernel_params(&self) -> String {
        let mut p = String::from("agent.podvm");
        if !self.insecure_registries.is_empty() {
            p.push_str(" agent.insecure_registries=");
            p.push_str(&self.insecure_registries.join(","));
        }
        p
    }

    fn vm_spec(&self) -> VmSpec {
        VmSpec {
            id: self.name.clone(),
            machine: "q35".into(),
            accel: self.accel.clone(),
            vcpus: self.vcpus,
            max_vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            max_memory_mib: self.memory_mib,
            memory_slots: 1,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            extra_kernel_params: self.extra_kernel_params(),
            debug: self.debug,
            qmp_socket: qmp_path(&self.run_dir),
            vsock: VsockDevice::None,
            virtio_fs: None,
            // Host has no /dev/vhost-net: the userspace virtio-net backend.
            nics: vec![NicDevice { fd: TAP_FD, mac: self.mac.clone(), vhost: false }],
        }
    }

    /// The argument vector (without the program).
    pub fn args(&self) -> Vec<String> {
        let mut a = self.vm_spec().args();
        if let Some(i) = a.iter().position(|x| x == "-name") {
            a[i + 1] = format!("{},debug-threads=on", esc(&self.name));
        }
        // No memory hot-plug: a podvm's size is its instance type's.
        if let Some(i) = a.iter().position(|x| x == "-m") {
            a[i + 1] = format!("{}M", self.memory_mib);
        }
        let fw = |name: &str, value: String| ["-fw_cfg".to_string(), format!("name={name},{value}")];
        a.extend(fw(FW_CFG_USER_DATA, format!("file={}", esc(&user_data_path(&self.run_dir).to_string_lossy()))));
        a.extend(fw(FW_CFG_OWNER, format!("string={}", esc(&self.owner))));
        a.extend(fw(FW_CFG_SANDBOX, format!("string={}", esc(&self.sandbox_id))));
        a.extend(fw(FW_CFG_IP, format!("string={}", self.ip)));
        a
    }
}

/// The markers of a podvm QEMU command line (`argv`), when it carries `owner`'s marker:
/// `(name, sandbox id, ip, user data file)`.
pub fn parse_markers(argv: &[String], owner: &str) -> Option<(String, String, Ipv4Addr, PathBuf)> {
    let fw: Vec<&str> = argv.windows(2).filter(|w| w[0] == "-fw_cfg").map(|w| w[1].as_str()).collect();
    let value = |name: &str, kind: &str| -> Option<String> {
        let prefix = format!("name={name},{kind}=");
        fw.iter().find_map(|v| v.strip_prefix(prefix.as_str())).map(|v| v.replace(",,", ","))
    };
    if value(FW_CFG_OWNER, "string")? != owner {
        return None;
    }
    let name_arg = argv.windows(2).find(|w| w[0] == "-name")?[1].clone();
    let name = name_arg.strip_suffix(",debug-threads=on").unwrap_or(&name_arg).replace(",,", ",");
    Some((
        name,
        value(FW_CFG_SANDBOX, "string")?,
        value(FW_CFG_IP, "string")?.parse().ok()?,
        PathBuf::from(value(FW_CFG_USER_DATA, "file")?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::qemu::cmdline::BASE_KERNEL_PARAMS;

    fn spec() -> PodvmSpec {
        PodvmSpec {
            name: "podvm-web-0123abcd".into(),
            sandbox_id: "0123abcd99".into(),
            owner: "node-a".into(),
            accel: AccelChoice::Tcg { reason: "test".into() },
            vcpus: 2,
            memory_mib: 1024,
            kernel: "/k/vmlinux".into(),
            initrd: "/k/initrd.img".into(),
            insecure_registries: vec!["172.31.250.1:5000".into(), "reg.local:80".into()],
            debug: false,
            ip: Ipv4Addr::new(172, 31, 250, 2),
            mac: "52:54:00:1f:fa:02".into(),
            run_dir: "/run/peerpod/podvms/0123abcd99".into(),
        }
    }

    #[test]
    fn golden() {
        let want = format!(
            "-name podvm-web-0123abcd,debug-threads=on -nodefaults -no-user-config -nographic -no-reboot \
-machine q35,accel=tcg -smp 2,maxcpus=2 -m 1024M \
-object memory-backend-memfd,id=mem0,size=1024M,share=on -numa node,memdev=mem0 \
-kernel /k/vmlinux -initrd /k/initrd.img \
-append {BASE_KERNEL_PARAMS} quiet agent.podvm agent.insecure_registries=172.31.250.1:5000,reg.local:80 \
-qmp unix:/run/peerpod/podvms/0123abcd99/qmp.sock,server=on,wait=off \
-chardev stdio,id=console,signal=off -serial chardev:console \
-netdev tap,id=net0,fd=3,vhost=off -device virtio-net-pci,id=nic0,netdev=net0,mac=52:54:00:1f:fa:02,romfile= \
-device pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1,port=1 -device pcie-root-port,id=rp1,bus=pcie.0,chassis=2,slot=2,port=2 \
-device pcie-root-port,id=rp2,bus=pcie.0,chassis=3,slot=3,port=3 -device pcie-root-port,id=rp3,bus=pcie.0,chassis=4,slot=4,port=4 \
-fw_cfg name=opt/io.podvisor/podvm,file=/run/peerpod/podvms/0123abcd99/podvm.json \
-fw_cfg name=opt/io.podvisor/owner,string=node-a -fw_cfg name=opt/io.podvisor/sandbox-id,string=0123abcd99 \
-fw_cfg name=opt/io.podvisor/ip,string=172.31.250.2"
        );
        assert_eq!(spec().args().join(" "), want);
        assert!(!want.contains("vsock"), "no vsock device");
    }

    #[test]
    fn markers_round_trip_and_select_the_owner() {
        let mut s = spec();
        s.owner = "odd,owner".into();
        let a = s.args();
        assert!(a.contains(&"name=opt/io.podvisor/owner,string=odd,,owner".to_string()));
        let (name, sb, ip, ud) = parse_markers(&a, "odd,owner").unwrap();
        assert_eq!((name.as_str(), sb.as_str(), ip), ("podvm-web-0123abcd", "0123abcd99", s.ip));
        assert_eq!(ud, PathBuf::from("/run/peerpod/podvms/0123abcd99/podvm.json"));
        assert_eq!(parse_markers(&a, "node-b"), None, "another owner's podvm is not ours");
        assert_eq!(parse_markers(&["qemu-system-x86_64".into(), "-name".into(), "x".into()], "odd,owner"), None);
    }

    #[test]
    fn no_insecure_registries_no_param() {
        let mut s = spec();
        s.insecure_registries.clear();
        s.debug = true;
        assert_eq!(s.extra_kernel_params(), "agent.podvm");
        let a = s.args();
        let append = &a[a.iter().position(|x| x == "-append").unwrap() + 1];
        assert!(append.ends_with("agent.log=debug agent.podvm"), "{append}");
    }
}
