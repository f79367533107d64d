//! `/init` of the bare-boot benchmark initrd: powers the guest off at once. The time from
//! spawning QEMU to its exit with this init is the baseline `make bench` compares the full
//! start-to-agent-ready path against.

fn main() {
    // SAFETY: plain syscalls without pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    std::process::exit(1);
}
