//! `podvisor-demo [demo]` (what `make demo` runs): a private containerd (own root, state, socket
//! and configuration under /tmp) runs a busybox container in a podvisor VM with
//! `ctr run --rm --runtime io.containerd.kata.v2 --rootfs <busybox rootfs> demo uname -r`,
//! prints the guest kernel next to the host's, then tears everything down and checks that
//! nothing is left. `PODVISOR_TEST_RUNTIME` selects another runtime (the harness's runc check).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use podvisor_tests::containerd::{kata_test_config, shim_binary, test_runtime, TestContainerd, KATA_RUNTIME};
use podvisor_tests::{image, leaks};

const ID: &str = "demo";

fn demo() -> Result<()> {
    let runtime = test_runtime();
    let shim = shim_binary();
    let img = image::busybox();
    println!("shim:                 {}", shim.display());
    println!("busybox rootfs:       {}", img.rootfs.display());

    let t = Instant::now();
    let ctd = TestContainerd::try_start(&kata_test_config(|_| {}))
        .map_err(anyhow::Error::msg)
        .context("starting containerd")?;
    println!(
        "containerd:           pid {} in {} (ready after {:.2} s)",
        ctd.pid(),
        ctd.dir().display(),
        t.elapsed().as_secs_f64()
    );

    let rootfs = img.rootfs.display().to_string();
    let mut args = vec!["run", "--rm", "--runtime", runtime.as_str()];
    if runtime != KATA_RUNTIME {
        // runc finds bare commands only through PATH, which `--rootfs` containers lack.
        args.push("--env=PATH=/usr/sbin:/usr/bin:/sbin:/bin");
    }
    args.extend(["--rootfs", rootfs.as_str(), ID, "uname", "-r"]);
    println!("running:              ctr {}", args.join(" "));
    let t = Instant::now();
    let out = ctd.ctr(&args);
    let took = t.elapsed().as_secs_f64();
    let guest = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let host = nix::sys::utsname::uname()?.release().to_string_lossy().into_owned();
    if !out.status.success() {
        let explained = ctd.explain(&out);
        let teardown = ctd.stop();
        let left = if teardown.leftovers.is_empty() {
            String::new()
        } else {
            format!("\ncleaned up after it:\n  {}", teardown.leftovers.join("\n  "))
        };
        bail!("ctr run failed: {explained}{left}");
    }
    let label = if runtime == KATA_RUNTIME { "guest kernel:    " } else { "container kernel:" };
    println!("{label}     {guest}   (uname -r in the container, {took:.2} s for ctr run)");
    println!("host kernel:          {host}");

    let dir = ctd.dir().to_path_buf();
    let leaks_before_stop = leaks::settle(leaks::GRACE, || ctd.find_leaks(&[ID]));
    let teardown = ctd.stop();
    let after = leaks::find_leaks(&[ID], Some(&dir));
    let mut problems: Vec<String> = leaks_before_stop.into_iter().chain(teardown.leftovers).chain(after).collect();
    if dir.exists() {
        problems.push(format!("{} still exists", dir.display()));
    }
    if !problems.is_empty() {
        bail!("left behind:\n  {}", problems.join("\n  "));
    }
    println!(
        "teardown:             containerd stopped in {:.2} s, {} removed; nothing left behind",
        teardown.took.as_secs_f64(),
        dir.display()
    );
    if runtime == KATA_RUNTIME && guest == host {
        bail!("the container reported the host's kernel: it did not run in a VM");
    }
    Ok(())
}

fn main() -> Result<()> {
    // `make demo` builds the release shim: use it even when a debug build is newer.
    let release = podvisor_tests::workspace().join("target/release/containerd-shim-kata-v2");
    if std::env::var_os("PODVISOR_SHIM").is_none() && release.is_file() {
        std::env::set_var("PODVISOR_SHIM", &release);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] | ["demo"] => demo(),
        _ => bail!("usage: podvisor-demo [demo]"),
    }
}
