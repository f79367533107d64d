//! `/init` of a test initrd without the agent: it says so on the console and idles, so that the
//! shim's dial timeout (and the console lines it shows) can be tested against a real guest.

use std::io::Write;

fn main() {
    let _ = std::fs::create_dir_all("/dev");
    // SAFETY: the C strings are NUL-terminated literals; a failure only means no console.
    unsafe {
        libc::mount(c"devtmpfs".as_ptr(), c"/dev".as_ptr(), c"devtmpfs".as_ptr(), 0, std::ptr::null());
    }
    if let Ok(mut console) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        for _ in 0..3 {
            let _ = writeln!(console, "podvisor test initrd: no agent here");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
