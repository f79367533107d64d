//! Peer pods (issue 12).

use podvisor_tests::registry::TestRegistry;

/// The registry fixture alone: the busybox image pushed with skopeo comes back over plain HTTP.
#[test]
fn registry_fixture_serves_the_pushed_image() {
    let reg = TestRegistry::start();
    reg.push_busybox().unwrap_or_else(|e| panic!("{e}"));
    let (digest, manifest) = reg.manifest("podvisor/busybox", "test").unwrap_or_else(|e| panic!("{e}"));
    assert!(digest.starts_with("sha256:"), "digest {digest}");
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "{manifest}");
    let layer = layers[0]["digest"].as_str().unwrap();
    let (status, _, body) = reg.get(&format!("/v2/podvisor/busybox/blobs/{layer}"), &[]).unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.len() as u64, layers[0]["size"].as_u64().unwrap());
    assert!(reg.blob_fetches("podvisor/busybox") >= 1, "{}", reg.logs_tail(20));
    let dir = reg.dir().to_path_buf();
    let pid = reg.pid().unwrap();
    drop(reg);
    assert!(!dir.exists());
    assert!(!podvisor_tests::alive(pid));
}
