//! A real KVM probe: open `/dev/kvm`, create a VM with one vCPU and 4 KiB of guest memory, run a
//! few real-mode instructions (`add ax, bx; add al, '0'; mov dx, 0x3f8; out dx, al; hlt`) and
//! check the exits (an I/O write of `'5'` to port 0x3f8, then HLT) and the registers afterwards.
//! The run happens on its own thread under a time bound, so a KVM_RUN that never returns does not
//! hang the caller (the thread is left behind; callers are short-lived commands).
//!
//! A passing probe shows that KVM runs guest code; it does not prove that a stock Linux guest
//! boots (a PVM host passes it and still fails a real boot, see [`crate::host::HostFacts`]).

use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

/// Guest physical address where the code is loaded (and the size of the memory slot).
const GUEST_ADDR: u64 = 0x1000;
const MEM_SIZE: usize = 0x1000;
/// Port the guest writes to (COM1's data register).
const PORT: u16 = 0x3f8;
/// The guest code (16-bit real mode); with ax=2 and bx=3 it writes `'5'` to [`PORT`] and halts.
const CODE: [u8; 9] = [
    0x01, 0xd8, // add ax, bx
    0x04, b'0', // add al, '0'
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xee, // out dx, al
    0xf4, // hlt
];
/// Exits the probe follows at most before it gives up.
const MAX_EXITS: usize = 16;

/// The default time bound for [`probe`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmProbe {
    /// `KVM_GET_API_VERSION`, when `/dev/kvm` could be opened.
    pub api_version: Option<i32>,
    /// `KVM_CAP_MAX_VCPUS` (KVM's recommended per-VM vCPU limit when the capability is missing).
    pub max_vcpus: Option<u32>,
    /// The exits seen while running the guest code, in words (`io-out port=0x3f8 data=0x35`, `hlt`).
    pub exits: Vec<String>,
    /// `Ok(())` when the guest code ran as expected, otherwise the step that failed and why.
    pub result: Result<(), String>,
    /// Wall time of the whole probe.
    pub elapsed: Duration,
}

impl KvmProbe {
    /// `true` when the guest code ran and left the expected results.
    pub fn passed(&self) -> bool {
        self.result.is_ok()
    }
}

/// Opens `/dev/kvm` and reads `KVM_CAP_MAX_VCPUS` only (no VM); `None` when KVM cannot be opened.
pub fn max_vcpus() -> Option<u32> {
    Kvm::new().ok().map(|k| k.get_max_vcpus() as u32)
}

/// Runs the probe with a time bound of `timeout`.
pub fn probe(timeout: Duration) -> KvmProbe {
    bounded(timeout, run)
}

/// Runs `step` on its own thread and waits at most `timeout` for it; what it reported before a
/// timeout (API version, vCPU limit) is kept.
fn bounded(
    timeout: Duration,
    step: fn(&mut KvmProbe, &std::sync::mpsc::Sender<Progress>) -> Result<(), String>,
) -> KvmProbe {
    let start = Instant::now();
    let empty =
        || KvmProbe { api_version: None, max_vcpus: None, exits: Vec::new(), result: Ok(()), elapsed: Duration::ZERO };
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("kvm-probe".into()).spawn(move || {
        let mut partial = empty();
        partial.result = step(&mut partial, &tx);
        let _ = tx.send(Progress::Done(partial));
    });
    if let Err(e) = spawned {
        return KvmProbe {
            result: Err(format!("cannot start the probe thread: {e}")),
            elapsed: start.elapsed(),
            ..empty()
        };
    }
    // The thread reports what it learns as it goes, so a timeout still shows how far it got.
    let mut seen = empty();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(Progress::Api(v)) => seen.api_version = Some(v),
            Ok(Progress::MaxVcpus(n)) => seen.max_vcpus = Some(n),
            Ok(Progress::Done(mut done)) => {
                done.elapsed = start.elapsed();
                return done;
            }
            Err(_) => {
                seen.result = Err(format!("KVM_RUN did not return within {} ms (the vCPU hangs)", timeout.as_millis()));
                seen.elapsed = start.elapsed();
                return seen;
            }
        }
    }
}

enum Progress {
    Api(i32),
    MaxVcpus(u32),
    Done(KvmProbe),
}

/// Guest memory: an anonymous private mapping, unmapped on drop (after the VM that uses it).
struct GuestMem(*mut libc::c_void);

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: the pointer came from a successful mmap of MEM_SIZE bytes.
        unsafe { libc::munmap(self.0, MEM_SIZE) };
    }
}

fn run(p: &mut KvmProbe, tx: &std::sync::mpsc::Sender<Progress>) -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
    let api = kvm.get_api_version();
    p.api_version = Some(api);
    let _ = tx.send(Progress::Api(api));
    if api != 12 {
        return Err(format!("KVM_GET_API_VERSION is {api}, expected 12"));
    }
    let max = kvm.get_max_vcpus() as u32;
    p.max_vcpus = Some(max);
    let _ = tx.send(Progress::MaxVcpus(max));
    // SAFETY: a fresh anonymous mapping; checked for MAP_FAILED below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(format!("mmap of guest memory: {}", std::io::Error::last_os_error()));
    }
    let mem = GuestMem(addr);
    // SAFETY: the mapping is MEM_SIZE bytes, writable, and CODE is shorter.
    unsafe { std::ptr::copy_nonoverlapping(CODE.as_ptr(), mem.0 as *mut u8, CODE.len()) };
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: GUEST_ADDR,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.0 as u64,
        flags: 0,
    };
    // SAFETY: the region is valid for the life of `vm` (`mem` is dropped after it).
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let mut sregs = vcpu.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = GUEST_ADDR;
    regs.rax = 2;
    regs.rbx = 3;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))?;

    let mut wrote = None;
    for _ in 0..MAX_EXITS {
        let exit = vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))?;
        match exit {
            VcpuExit::IoOut(port, data) => {
                p.exits.push(format!("io-out port={port:#x} data={data:02x?}"));
                wrote = Some((port, data.to_vec()));
            }
            VcpuExit::Hlt => {
                p.exits.push("hlt".into());
                break;
            }
            VcpuExit::InternalError => {
                p.exits.push("internal-error".into());
                return Err("KVM_RUN exited with KVM_EXIT_INTERNAL_ERROR (KVM could not run the guest code)".into());
            }
            VcpuExit::FailEntry(reason, cpu) => {
                p.exits.push(format!("fail-entry reason={reason:#x} cpu={cpu}"));
                return Err(format!("KVM_RUN failed to enter the guest (hardware entry failure {reason:#x})"));
            }
            other => {
                let text = format!("{other:?}");
                p.exits.push(text.clone());
                return Err(format!("unexpected exit {text}; expected an I/O write to {PORT:#x}, then HLT"));
            }
        }
    }
    if p.exits.last().map(String::as_str) != Some("hlt") {
        return Err(format!("the guest did not halt within {MAX_EXITS} exits"));
    }
    match wrote {
        Some((PORT, data)) if data == [b'5'] => {}
        Some((port, data)) => {
            return Err(format!("the guest wrote {data:02x?} to port {port:#x}, expected [35] to {PORT:#x}"))
        }
        None => return Err(format!("the guest halted without writing to port {PORT:#x}")),
    }
    let after = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    let want_rip = GUEST_ADDR + CODE.len() as u64;
    if after.rax & 0xffff != u64::from(b'5') || after.rip != want_rip || after.rdx & 0xffff != u64::from(PORT) {
        return Err(format!(
            "registers after HLT are wrong: rax={:#x} rdx={:#x} rip={:#x} (expected rax=0x35 rdx={PORT:#x} rip={want_rip:#x})",
            after.rax, after.rdx, after.rip
        ));
    }
    drop(vcpu);
    drop(vm);
    drop(mem);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step that never finishes (as a hung KVM_RUN) is cut off at the bound, keeping what it
    /// reported before.
    #[test]
    fn a_hung_run_is_cut_off_at_the_bound() {
        fn hangs(_: &mut KvmProbe, tx: &std::sync::mpsc::Sender<Progress>) -> Result<(), String> {
            let _ = tx.send(Progress::Api(12));
            let _ = tx.send(Progress::MaxVcpus(7));
            loop {
                std::thread::park();
            }
        }
        let started = Instant::now();
        let p = bounded(Duration::from_millis(100), hangs);
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert!(p.result.unwrap_err().contains("did not return within 100 ms"));
        assert_eq!((p.api_version, p.max_vcpus), (Some(12), Some(7)));
    }

    #[test]
    fn code_is_what_the_comment_says() {
        // add ax,bx (01 d8), add al,imm8 (04 ib), mov dx,imm16 (ba iw), out dx,al (ee), hlt (f4).
        assert_eq!(CODE[0..2], [0x01, 0xd8]);
        assert_eq!(CODE[2..4], [0x04, 0x30]);
        assert_eq!(u16::from_le_bytes([CODE[5], CODE[6]]), PORT);
        assert_eq!(CODE[7..], [0xee, 0xf4]);
    }

    /// Runs the real probe where `/dev/kvm` can be opened; where it cannot, the probe must say
    /// so at the first step (this is a statement about the host either way, never skipped).
    #[test]
    fn probe_reports_each_step() {
        let p = probe(DEFAULT_TIMEOUT);
        let openable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        if !openable {
            assert!(p.result.as_ref().unwrap_err().starts_with("open /dev/kvm"), "{p:?}");
            assert_eq!(p.api_version, None);
            return;
        }
        assert_eq!(p.api_version, Some(12), "{p:?}");
        assert!(p.max_vcpus.unwrap_or(0) >= 1, "{p:?}");
        if p.passed() {
            assert_eq!(p.exits, vec!["io-out port=0x3f8 data=[35]".to_string(), "hlt".to_string()]);
        } else {
            assert!(!p.result.as_ref().unwrap_err().is_empty());
        }
        assert!(p.elapsed <= DEFAULT_TIMEOUT + Duration::from_secs(1));
    }
}
