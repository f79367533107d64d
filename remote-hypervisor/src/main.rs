//! `podvisor-remote-hypervisor`: the remote hypervisor service.

fn main() {
    eprintln!("podvisor-remote-hypervisor: not built yet");
    std::process::exit(2);
}
