//! Ring changes asked for during a move are queued, not refused (issue 16):
//! a node added, then another removed and a third added while the first move
//! runs — all accepted, run as one more move when the first ends, with fio
//! verifying the data throughout; and nodes started together with
//! `--auto-join` join in one ring change.

use crate::full::fio;
use crate::node_loss::assert_replicas_agree;
use crate::{node_id, run, text, wait_rebalanced};
use std::time::Duration;
use torus_testkit::{wait_until, Cluster, Etcd};

fn ring_json(c: &Cluster) -> serde_json::Value {
    serde_json::from_str(&c.ctl_ok(&["ring", "get", "-o", "json"])).unwrap()
}

fn ids_in(v: &serde_json::Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

#[test]
fn ring_changes_during_a_move_are_queued_and_the_data_stays_whole() {
    let mut c = Cluster::init(Etcd::start(), 2);
    // Slow moves, so that the changes below arrive while one is under way.
    let slow = ["--rebalance-rate", "3MiB"];
    for _ in 0..3 {
        c.add_node_with("1GiB", &slow);
    }
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "a", "96MiB"]);
    c.ctl_ok(&["volume", "create-block", "b", "32MiB"]);
    let blk = c.start_blk(&[]);
    crate::ok(&mut fio(&blk.uri("a"), "96m", "0", false));
    let (n3, n4) = (c.add_node_with("1GiB", &slow), c.add_node_with("1GiB", &slow));
    c.start_node(n3);
    c.start_node(n4);
    c.wait_peers(5);

    let out = c.ctl_ok(&["peer", "add", &c.nodes[n3].peer_addr]);
    assert!(out.contains("added") && out.contains("data is moving"), "{out}");
    let out = c.ctl_ok(&["peer", "remove", &c.nodes[0].peer_addr]);
    assert!(out.contains("queued: remove"), "removing a node during a move is queued: {out}");
    let out = c.ctl_ok(&["peer", "add", &c.nodes[n4].peer_addr]);
    assert!(out.contains("queued: add"), "adding a node during a move is queued: {out}");
    let status = c.ctl_ok(&["status"]);
    assert!(status.contains("queued:      2 ring change(s)"), "{status}");
    let json: serde_json::Value = serde_json::from_str(&c.ctl_ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(json["queued"].as_array().unwrap().len(), 2, "{json}");
    // Asking again changes nothing.
    let out = c.ctl_ok(&["peer", "remove", &c.nodes[0].peer_addr]);
    assert!(out.contains("queued: remove"), "{out}");
    assert_eq!(ring_json(&c)["ring"]["queued"].as_array().unwrap().len(), 2);

    // While the moves run: b is written and verified, a read and verified, again and again.
    crate::ok(&mut fio(&blk.uri("b"), "32m", "8m", false));
    let reader = c.start_blk(&["--read-only"]);
    let mut passes = 0;
    let mut versions = std::collections::BTreeSet::new();
    loop {
        let ring = ring_json(&c);
        versions.insert(ring["ring"]["version"].as_u64().unwrap());
        let out = run(&mut fio(&reader.uri("a"), "96m", "0", true));
        assert!(out.status.success(), "a read wrong data during the moves: {}", text(&out));
        passes += 1;
        if c.ctl_ok(&["status"]).contains("none in progress") {
            break;
        }
    }
    wait_rebalanced(&c);
    let ring = ring_json(&c);
    let mut members = ids_in(&ring["ring"]["members"]);
    let mut want: Vec<String> = [1, 2, n3, n4].iter().map(|i| node_id(&c, *i).to_string()).collect();
    members.sort();
    want.sort();
    assert_eq!(members, want, "every queued change was applied");
    assert!(ring["ring"]["queued"].as_array().is_none_or(|q| q.is_empty()));
    // Node 0 holds nothing any more; the rest hold exactly what placement names.
    wait_until(Duration::from_secs(60), "node 0 to delete the copies that moved away", || {
        c.extents_on_disk(0).is_empty()
    });
    let ids = crate::full::volume_ids(&c);
    assert_eq!(assert_replicas_agree(&c, ids["a"], 2), 24);
    assert_eq!(assert_replicas_agree(&c, ids["b"], 2), 8);
    let out = run(&mut fio(&blk.uri("a"), "96m", "0", true));
    assert!(out.status.success(), "a changed across the moves: {}", text(&out));
    let out = run(&mut fio(&blk.uri("b"), "32m", "0", true));
    assert!(out.status.success(), "b changed across the moves: {}", text(&out));
    println!("queued ring changes: {passes} full reads of a during the moves; ring versions seen {versions:?}");
}

#[test]
fn nodes_started_together_with_auto_join_join_in_one_change() {
    let mut c = Cluster::init(Etcd::start(), 2);
    for _ in 0..2 {
        c.add_node("1GiB");
    }
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "v", "16MiB"]);
    let before = ids_in(&ring_json(&c)["ring"]["members"]);
    let joiners: Vec<usize> =
        (0..3).map(|_| c.add_node_with("1GiB", &["--auto-join", "--rebalance-rate", "1MiB"])).collect();
    for &i in &joiners {
        c.start_node(i);
    }
    let want: Vec<String> = joiners.iter().map(|i| node_id(&c, *i).to_string()).collect();
    wait_until(Duration::from_secs(30), "the nodes to join", || {
        let members = ids_in(&ring_json(&c)["ring"]["members"]);
        want.iter().all(|id| members.contains(id))
    });
    // One change: one of them added all three; the others found themselves in.
    let logs: Vec<String> = joiners.iter().map(|i| std::fs::read_to_string(&c.nodes[*i].log).unwrap()).collect();
    let joined: Vec<&String> = logs.iter().filter(|l| l.contains("joined the ring")).collect();
    assert_eq!(joined.len(), 1, "{logs:#?}");
    assert!(joined[0].contains("nodes=3"), "{}", joined[0]);
    assert!(logs.iter().all(|l| !l.contains("queued behind")), "{logs:#?}");
    wait_rebalanced(&c);
    let members = ids_in(&ring_json(&c)["ring"]["members"]);
    assert_eq!(members.len(), before.len() + 3);
}
