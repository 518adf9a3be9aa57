//! A node that fills up: it marks itself full, keeps the extents it holds,
//! and new extents go to the next node in their ranking, while a client keeps
//! writing without an error. Clearing the mark moves those extents back.
//! Placement and contents are checked on the nodes' disks.

use crate::node_loss::assert_replicas_agree;
use crate::{node_id, ok, ring_of, run, text, wait_rebalanced};
use std::process::Command;
use std::time::Duration;
use torus_testkit::{wait_until, Cluster, Etcd};
use torus_types::{ExtentId, VolumeId};

/// fio writing `size` sequentially at `rate` through NBD, then reading it
/// back and checking every block (or, with `verify_only`, just checking).
pub(crate) fn fio(uri: &str, size: &str, rate: &str, verify_only: bool) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args(["--name=fill", "--ioengine=nbd", "--rw=write", "--bs=1m", "--iodepth=4", "--verify=crc32c"])
        .args([format!("--size={size}"), format!("--rate={rate}"), format!("--uri={uri}")])
        .args(["--verify_fatal=1", "--verify_state_save=0"]);
    if verify_only {
        cmd.arg("--verify_only");
    }
    cmd
}

pub(crate) fn volume_ids(c: &Cluster) -> std::collections::BTreeMap<String, u64> {
    let v: serde_json::Value = serde_json::from_str(&c.ctl_ok(&["volume", "list", "-o", "json"])).unwrap();
    v.as_array().unwrap().iter().map(|v| (v["name"].as_str().unwrap().to_string(), v["id"].as_u64().unwrap())).collect()
}

fn is_full(c: &Cluster, i: usize) -> bool {
    let ring: serde_json::Value = serde_json::from_str(&c.ctl_ok(&["ring", "get", "-o", "json"])).unwrap();
    let id = node_id(c, i).to_string();
    ring["ring"]["members"].as_array().unwrap().iter().any(|m| m["id"] == id.as_str() && m["full"] == true)
}

#[test]
fn a_full_node_keeps_its_extents_and_new_ones_go_elsewhere() {
    let mut c = Cluster::init(Etcd::start(), 2);
    // Moves are slowed down so that reads run while one is under way.
    let slow = ["--rebalance-rate", "2MiB"];
    for _ in 0..3 {
        c.add_node_with("1GiB", &slow);
    }
    // Node 3 claims as large a share as the others but can hold only 96 MiB;
    // it marks itself full at 60% (57.6 MiB), leaving room for what arrives
    // while the writer takes the new ring.
    let small = c.add_node_with("96MiB", &["--weight", "1GiB", "--full-ratio", "0.6", slow[0], slow[1]]);
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "b", "256MiB"]);
    c.ctl_ok(&["volume", "create-block", "a", "64MiB"]);
    let blk = c.start_blk(&[]);

    // Node 3's share of b alone (about 128 MiB) is more than it can hold:
    // every write must still succeed.
    ok(&mut fio(&blk.uri("b"), "256m", "24m", false));
    assert!(is_full(&c, small), "node 3 did not mark itself full");
    // a is written after: every extent whose ranking starts at node 3 goes elsewhere.
    ok(&mut fio(&blk.uri("a"), "64m", "24m", false));
    wait_rebalanced(&c);

    let status = c.ctl_ok(&["status"]);
    assert!(status.contains("full:"), "{status}");
    let peers = c.ctl_ok(&["list-peers"]);
    assert!(peers.contains("Full"), "{peers}");
    let ids = volume_ids(&c);
    let metrics = crate::http_get(c.nodes[small].http_port, "/metrics");
    assert!(metrics.contains("torus_node_full 1"), "{metrics}");
    let ring = ring_of(&c);
    let small_id = node_id(&c, small);
    let on_small = c.extents_on_disk(small);
    // Where node 3 is a natural replica of an extent of a but does not hold it, the extent spilled.
    let spilled = (0..16)
        .filter(|i| {
            let e = ExtentId::new(VolumeId(ids["a"]), *i);
            ring.replicas(e, 2).contains(&small_id) && !on_small.contains(&format!("{}/{i}", ids["a"]))
        })
        .count();
    assert!(spilled > 0, "no extent of a went past the full node");
    assert!(!on_small.is_empty(), "the full node should keep what it held");
    let used = c.ctl_ok(&["list-peers", "-o", "json"]);
    // Every extent: exactly R copies, on the nodes placement names, with equal bytes.
    let b_extents = assert_replicas_agree(&c, ids["b"], 2);
    let a_extents = assert_replicas_agree(&c, ids["a"], 2);
    assert_eq!((b_extents, a_extents), (64, 16), "every extent written, {used}");

    // Clearing the mark is refused while its share could not fit...
    let out = c.ctl(&["peer", "clear-full", &c.nodes[small].peer_addr]);
    assert!(!out.status.success() && text(&out).contains("could fill it"), "{}", text(&out));
    // ...and allowed once b is gone: a's extents move back to node 3.
    c.ctl_ok(&["volume", "delete", "b"]);
    let out = c.ctl_ok(&["peer", "clear-full", &c.nodes[small].peer_addr]);
    assert!(out.contains("moving back"), "{out}");
    // While they move (node 3 holding part of each), a reader in another
    // process checks every block of a, again and again.
    let reader = c.start_blk(&["--read-only"]);
    let mut passes = 0;
    loop {
        let moving = !c.ctl_ok(&["status"]).contains("none in progress");
        let out = run(&mut fio(&reader.uri("a"), "64m", "0", true));
        assert!(out.status.success(), "a read wrong data while its extents moved back: {}", text(&out));
        passes += 1;
        if !moving {
            break;
        }
    }
    assert!(passes >= 2, "the move was over before the first read");
    wait_rebalanced(&c);
    wait_until(Duration::from_secs(60), "the stand-ins to delete the extents that moved back", || {
        (0..4).map(|i| c.extents_on_disk(i).len()).sum::<usize>() == 32
    });
    assert!(!is_full(&c, small));
    assert_eq!(assert_replicas_agree(&c, ids["a"], 2), 16);
    let on_small = c.extents_on_disk(small);
    let ring = ring_of(&c);
    for i in 0..16u64 {
        if ring.replicas(ExtentId::new(VolumeId(ids["a"]), i), 2).contains(&small_id) {
            assert!(on_small.contains(&format!("{}/{i}", ids["a"])), "extent {i} did not move back");
        }
    }
    let out = run(&mut fio(&blk.uri("a"), "64m", "0", true));
    assert!(out.status.success(), "a's data changed across the moves: {}", text(&out));
    println!(
        "full node: {spilled} extents of a spilled past it and moved back ({passes} full reads during the move); \
         64+16 extents verified on disk"
    );
}

#[test]
fn with_fewer_than_r_nodes_with_room_a_new_extent_is_refused_with_enospc() {
    let mut c = Cluster::init(Etcd::start(), 2);
    c.add_node("1GiB");
    let small = c.add_node_with("16MiB", &["--weight", "1GiB", "--full-ratio", "0.5"]);
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "v", "64MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("v");
    // Two extents fill node 1 past its mark.
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 0 8M", "-c", "flush"]).arg(&uri));
    wait_until(Duration::from_secs(30), "node 1 to mark itself full", || is_full(&c, small));
    wait_rebalanced(&c);
    // A third extent has one node with room for replication 2: refused, and nothing written anywhere.
    let out = run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x22 32M 1M"]).arg(&uri));
    let said = text(&out);
    assert!(said.contains("No space left on device"), "{said}");
    let vol = crate::volume_id(&c);
    for i in 0..2 {
        assert!(!c.extents_on_disk(i).contains(&format!("{vol}/8")), "node {i} got part of a refused write");
    }
    // What the full node holds can still be rewritten, and reads back.
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x33 0 1M", "-c", "flush"]).arg(&uri));
    let back = ok(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x33 0 1M", "-c", "read -P 0x11 1M 7M"])
        .arg(&uri));
    assert!(!back.contains("fail"), "{back}");
    let log = std::fs::read_to_string(c.dir.path().join(format!("blk-{}.log", blk.addr.replace(':', "_")))).unwrap();
    assert!(log.contains("with room for a new extent"), "torusblk should say why: {log}");
}

/// A tmpfs mounted on a directory for the length of a test (lazily unmounted on drop).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        ok(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir));
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_node_whose_disk_is_smaller_than_offered_marks_itself_full_in_time() {
    let mut c = Cluster::init(Etcd::start(), 2);
    c.add_node("1GiB");
    c.add_node("1GiB");
    // Node 2 offers 1 GiB, but its filesystem holds 64 MiB: marked full at half of that.
    let small = c.add_node_with("1GiB", &["--full-ratio", "0.5"]);
    let _disk = Tmpfs::mount(&c.nodes[small].data_dir, "64m");
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "v", "128MiB"]);
    let blk = c.start_blk(&[]);
    // Its share is about 85 MiB: without the mark, the filesystem would run out under fio.
    ok(&mut fio(&blk.uri("v"), "128m", "16m", false));
    assert!(is_full(&c, small), "node 2 did not mark itself full");
    wait_rebalanced(&c);
    assert_eq!(assert_replicas_agree(&c, crate::volume_id(&c), 2), 32);
    let log = std::fs::read_to_string(&c.nodes[small].log).unwrap();
    assert!(log.contains("marked full"), "{log}");
}
