//! `torusctl wait`: scripts can wait for a healthy, rebalanced or caught-up
//! cluster; a timeout fails with the reason.

use crate::{text, write_known};
use std::time::Duration;
use torus_testkit::{wait_until, Cluster};

#[test]
fn wait_returns_once_the_cluster_is_healthy_or_rebalanced_and_times_out_with_the_reason() {
    let mut c = Cluster::start(3, 2);
    let out = c.ctl_ok(&["wait", "healthy", "--timeout", "30s"]);
    assert!(out.contains("healthy: reached"), "{out}");
    c.ctl_ok(&["volume", "create-block", "v", "64MiB"]);
    let blk = c.start_blk(&[]);
    write_known(&c, &blk.uri("v"), 32 << 20, 5);
    drop(blk);

    // A node down: `wait healthy` times out and says why.
    c.node(2).kill9();
    wait_until(Duration::from_secs(30), "the node to be seen down", || c.ctl_ok(&["status"]).contains("DEGRADED"));
    let status: serde_json::Value = serde_json::from_str(&c.ctl_ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["health"], "DEGRADED");
    assert_eq!(status["nodes_down"].as_array().map(Vec::len), Some(1), "{status}");
    let out = c.ctl(&["wait", "healthy", "--timeout", "2s"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("timed out after 2s waiting for healthy") && text(&out).contains("node(s) down"),
        "{}",
        text(&out)
    );

    // Back, then a fourth node: `wait rebalanced` returns when the data has moved.
    c.start_node(2);
    c.ctl_ok(&["wait", "healthy", "--timeout", "60s"]);
    let i = c.add_node("1GiB");
    c.start_node(i);
    c.wait_peers(4);
    c.ctl_ok(&["peer", "add", "--all-peers"]);
    let out = c.ctl_ok(&["wait", "rebalanced", "--timeout", "3m"]);
    assert!(out.contains("rebalanced: reached"), "{out}");
    assert!(c.ctl_ok(&["status"]).contains("none in progress"));
    let status: serde_json::Value = serde_json::from_str(&c.ctl_ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["health"], "OK");
    assert_eq!(status["rebalance"]["state"], "none");
    assert_eq!(status["ring_members"], 4);
    assert!(c.ctl_ok(&["wait", "caught-up", "--timeout", "10s"]).contains("caught-up: reached"));

    for bad in [&["wait", "sideways"][..], &["wait", "healthy", "--timeout", "5x"]] {
        let out = c.ctl(bad);
        assert!(!out.status.success(), "{bad:?} must be refused: {}", text(&out));
    }
}
