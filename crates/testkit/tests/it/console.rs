//! The web console in a real browser: headless Chromium loads `/ui` from a
//! node of a live 3-node cluster with one node killed, and the page (after
//! its scripts fetched `/api/v1/...`) shows that node down and the volume
//! degraded. A screenshot is kept as an artifact.

use crate::{http_get, node_id, ok};
use std::process::Command;
use std::time::Duration;
use torus_testkit::{wait_until, Cluster};

/// Where test artifacts go (kept after the run).
fn artifacts() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    dir
}

fn chromium(args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().expect("browser profile");
    ok(Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=6000"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url))
}

#[test]
fn the_console_in_chromium_shows_a_killed_node_down_and_its_volume_degraded() {
    torus_testkit::require("chromium");
    let mut c = Cluster::start(3, 2);
    c.ctl_ok(&["volume", "create-block", "web", "64MiB"]);
    let blk = c.start_blk(&[]);
    crate::write_known(&c, &blk.uri("web"), 8 << 20, 0xc0);
    let port = c.nodes[0].http_port;
    let api = |what: &str| http_get(port, &format!("/api/v1/{what}"));
    assert!(api("nodes").matches("\"up\":true").count() == 3, "{}", api("nodes"));
    assert!(api("volumes").contains("\"health\":\"ok\""), "{}", api("volumes"));
    // Every node's counters are gathered (the page turns them into rates).
    let io = api("io");
    assert_eq!(io.matches("\"write\":[").count(), 3, "{io}");

    let dead = node_id(&c, 2);
    c.node(2).kill9();
    wait_until(Duration::from_secs(30), "the killed node's registration to lapse", || {
        c.ctl_ok(&["status"]).contains("DEGRADED")
    });
    assert!(api("volumes").contains("\"health\":\"degraded\""), "{}", api("volumes"));

    let url = format!("http://127.0.0.1:{port}/ui");
    let dom = chromium(&["--dump-dom"], &url);
    assert!(dom.contains("data-loaded=\"yes\""), "the page's scripts did not load the API: {dom}");
    let row = format!("<tr class=\"down\" data-node=\"{dead}\">");
    let at = dom.find(&row).unwrap_or_else(|| panic!("no row showing node {dead} down in: {dom}"));
    assert!(dom[at..].split("</tr>").next().unwrap_or("").contains(">down<"), "{dom}");
    assert_eq!(dom.matches("<tr class=\"up\"").count(), 2, "two nodes up: {dom}");
    let vol = dom.find("data-volume=\"web\"").expect("the volume's row");
    assert!(dom[vol..].split("</tr>").next().unwrap_or("").contains(">degraded<"), "{dom}");
    assert!(dom.contains(">DEGRADED<"), "the cluster's health badge: {dom}");

    // The screenshot with I/O going on (the page shows rates).
    let mut fio = Command::new("fio")
        .args(["--name=console", "--ioengine=nbd", "--rw=randrw", "--bs=64k", "--size=32m", "--time_based"])
        .args(["--runtime=30", "--rate=8m,4m", "--output=/dev/null"])
        .arg(format!("--uri={}", blk.uri("web")))
        .spawn()
        .expect("start fio");
    std::thread::sleep(Duration::from_secs(3));
    let shot = artifacts().join("console-node-down.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&[&format!("--screenshot={}", shot.display()), "--window-size=1280,760"], &url);
    let _ = fio.kill();
    let _ = fio.wait();
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real screenshot");
    eprintln!("console screenshot: {} ({} bytes)", shot.display(), png.len());
}
