//! The binary's command line: bad settings and flags stop it with a message naming the fix.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_podvisor-remote-hypervisor")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_and_bad_settings() {
    let (code, out, _) = run(&["--version"]);
    assert_eq!((code, out.trim()), (0, format!("podvisor-remote-hypervisor {}", env!("CARGO_PKG_VERSION")).as_str()));
    let dir = tempfile::tempdir().unwrap();
    let cm = dir.path().join("cm.env");
    std::fs::write(&cm, "ROOT_VOLUME_SIZE=5\n").unwrap();
    let (code, _, err) =
        run(&["serve", "--config", cm.to_str().unwrap(), "--socket", dir.path().join("s").to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("ROOT_VOLUME_SIZE=\"5\"") && err.contains("the minimum is 6 GB"), "{err}");
    let (code, _, err) = run(&["--config", dir.path().join("none.env").to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read the settings file") && err.contains("none.env"), "{err}");
    let (code, _, err) = run(&["proxy", "--socket", "/tmp/x.sock"]);
    assert_eq!(code, 2);
    assert!(err.contains("proxy needs --target IP:PORT"), "{err}");
    let (code, _, err) = run(&["proxy", "--socket", "/tmp/x.sock", "--target", "1.2.3.4", "--tls-dir", "/tmp"]);
    assert_eq!(code, 2);
    assert!(err.contains("--target \"1.2.3.4\": write IP:PORT"), "{err}");
    assert!(!dir.path().join("s").exists(), "no socket made on a settings error");
}
