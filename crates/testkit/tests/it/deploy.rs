//! What ships besides the binaries: the Kubernetes manifests render and
//! validate against the Kubernetes schemas, and torusd runs from the
//! container image (built here from Debian's packages, run with podman).
//! Both run the scripts a user or CI would run by hand.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn last_line(text: &str) -> &str {
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

#[test]
fn the_kubernetes_manifests_render_and_validate_against_the_schemas() {
    let out = torus_testkit::run(&mut Command::new(repo().join("scripts/check-manifests")), Duration::from_secs(600));
    let text = crate::text(&out);
    assert!(out.status.success(), "scripts/check-manifests failed:\n{text}");
    let summary = text.lines().find(|l| l.starts_with("manifests: ")).unwrap_or("");
    assert!(summary.contains("objects valid"), "{text}");
    eprintln!("{summary}");
}

#[test]
fn torusd_runs_from_the_container_image_with_podman() {
    let bins = torus_testkit::bin("torusd").parent().expect("bin dir").to_path_buf();
    let etcd = torus_testkit::Etcd::start();
    let mut cmd = Command::new(repo().join("scripts/test-image"));
    cmd.arg("--binaries").arg(&bins).env("TORUS_TEST_ETCD", &etcd.endpoint);
    let out = torus_testkit::run(&mut cmd, Duration::from_secs(900));
    let text = crate::text(&out);
    assert!(out.status.success(), "scripts/test-image failed:\n{text}");
    if let Some(skip) = text.lines().find(|l| l.starts_with("SKIP:")) {
        eprintln!("container image test skipped on this machine: {skip}");
        return;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(last_line(&stdout), "image: 1 passed, 0 failed", "{text}");
    eprintln!("{text}");
}
