//! SysV shared memory from the command line, for the CRI IPC test (busybox has no `ipcmk`).
//! Built by `podvisor_tests::image::sysv_shm_helper` as a static binary that runs in the
//! busybox test image.
//!
//! `sysv-shm write KEY TEXT` creates segment KEY (hex) and stores TEXT in it;
//! `sysv-shm read KEY` prints what segment KEY holds. Exit 1 with the errno on failure.

use std::ffi::{c_int, c_void};
use std::io::Write;
use std::process::exit;

extern "C" {
    fn shmget(key: c_int, size: usize, flags: c_int) -> c_int;
    fn shmat(id: c_int, addr: *const c_void, flags: c_int) -> *mut c_void;
    fn shmdt(addr: *const c_void) -> c_int;
}

const IPC_CREAT: c_int = 0o1000;
const SIZE: usize = 4096;

fn fail(what: &str) -> ! {
    eprintln!("sysv-shm: {what}: {}", std::io::Error::last_os_error());
    exit(1)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = || -> ! {
        eprintln!("usage: sysv-shm write KEY TEXT | sysv-shm read KEY (KEY in hex)");
        exit(2)
    };
    let (write, text) = match (args.get(1).map(String::as_str), args.len()) {
        (Some("write"), 4) => (true, args[3].as_bytes()),
        (Some("read"), 3) => (false, &[][..]),
        _ => usage(),
    };
    let key = c_int::from_str_radix(args[2].trim_start_matches("0x"), 16).unwrap_or_else(|_| usage());
    if text.len() >= SIZE {
        usage();
    }
    // SAFETY: plain SysV calls; the segment is SIZE bytes and only SIZE bytes are touched.
    unsafe {
        let id = shmget(key, SIZE, if write { IPC_CREAT | 0o600 } else { 0 });
        if id < 0 {
            fail(&format!("shmget {key:#x}"));
        }
        let at = shmat(id, std::ptr::null(), 0);
        if at as isize == -1 {
            fail(&format!("shmat {id}"));
        }
        let mem = std::slice::from_raw_parts_mut(at.cast::<u8>(), SIZE);
        if write {
            mem[..text.len()].copy_from_slice(text);
            mem[text.len()] = 0;
        } else {
            let end = mem.iter().position(|&b| b == 0).unwrap_or(SIZE);
            std::io::stdout().write_all(&mem[..end]).unwrap();
        }
        shmdt(at);
    }
}
