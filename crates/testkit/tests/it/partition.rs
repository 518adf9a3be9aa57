//! A link cut: the old writer and one storage node sit in their own network
//! namespace; the link to it is cut while the old writer is writing, a new
//! writer takes the volume outside, and after the link heals nothing the old
//! writer wrote during the cut is visible, on any replica.

use crate::node_loss::{assert_replicas_agree, wait_caught_up};
use crate::{ok, volume_id, wait_open};
use std::process::Command;
use std::time::Duration;
use std::time::Instant;
use torus_testkit::{wait_until, Cluster, Etcd, Netns, Proc};

/// Reads through `uri` with qemu-io and checks the patterns; returns qemu-io's output.
fn check_patterns(uri: &str) -> String {
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x22 0 16M", "-c", "read -P 0x11 16M 16M"]).arg(uri))
}

#[test]
fn a_writer_and_a_node_cut_off_cannot_make_anything_they_wrote_during_the_cut_visible() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test creates network namespaces and needs root (CI runs as root)");
    let ns = Netns::new();
    let mut c = Cluster::init(Etcd::start_private_on(&ns.host_ip), 2);
    // Node 0 inside the namespace, nodes 1 and 2 outside; etcd outside.
    c.add_node_at("1GiB", &ns.ns_ip, Some(&ns.name));
    c.add_node_at("1GiB", &ns.host_ip, None);
    c.add_node_at("1GiB", &ns.host_ip, None);
    for i in 0..3 {
        c.start_node(i);
    }
    c.wait_peers(3);
    c.ctl_ok(&["peer", "add", "--all-peers"]);
    c.ctl_ok(&["volume", "create-block", "v", "64MiB"]);
    let vol = volume_id(&c);

    // The old writer, and its client, inside the namespace.
    let old = c.start_blk_at(&ns.ns_ip, Some(&ns.name), &["--lease-ttl", "3", "--io-hold", "4", "--node-timeout", "2"]);
    let mut qemu = Command::new("ip");
    qemu.args(["netns", "exec", &ns.name, "stdbuf", "-oL", "qemu-io", "-f", "raw"]).arg(old.uri("v"));
    let qlog = c.dir.path().join("old-client.log");
    let mut client = Proc::spawn_piped("qemu-io", qemu, qlog.clone());
    let said = |what: &str, n: usize| std::fs::read_to_string(&qlog).unwrap_or_default().matches(what).count() >= n;
    // (One command at a time: qemu-io reads a line per wake-up.)
    client.input("write -P 0x11 0 32M");
    wait_until(Duration::from_secs(30), "the old writer's first write", || said("wrote 33554432", 1));
    client.input("flush");
    std::thread::sleep(Duration::from_millis(300));
    client.input("read -P 0x11 0 4k");
    wait_until(Duration::from_secs(30), "the old writer's first write and flush", || said("read 4096/4096", 1));

    // Cut, and at once the old writer writes again: the node beside it may take it.
    ns.cut();
    let cut_at = Instant::now();
    client.input("write -P 0xee 0 32M");
    std::thread::sleep(Duration::from_secs(4));

    // A new writer outside takes the volume once the old lease has lapsed.
    let new = c.start_blk_at(&ns.host_ip, None, &[]);
    let hold = wait_open(&new.addr, "v", Duration::from_secs(60));
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x22 0 16M", "-c", "flush"]).arg(new.uri("v")));
    check_patterns(&new.uri("v"));
    wait_until(Duration::from_secs(60), "the old writer's write during the cut to fail", || said("write failed", 1));

    // Did the stale write reach the node beside it? (It may; it must never show.)
    let on_node0 = c.extents_on_disk(0);
    let stale_landed = on_node0.iter().any(|e| c.extent_bytes(0, e, 4 << 20).chunks(4096).any(|b| b[0] == 0xee));

    ns.heal();
    let cut_for = cut_at.elapsed().as_secs();
    wait_until(Duration::from_secs(60), "node 0 to be back", || c.ctl_ok(&["status"]).contains("0 down"));
    // The old writer, back in touch, tries once more: refused.
    client.input("write -P 0xdd 0 4M");
    wait_until(Duration::from_secs(60), "the old writer's write after the heal to fail", || said("write failed", 2));
    wait_caught_up(&c);
    for _ in 0..5 {
        check_patterns(&new.uri("v"));
    }
    let extents = assert_replicas_agree(&c, vol, 2);
    for e in c.extents_on_disk(0) {
        assert!(
            !c.extent_bytes(0, &e, 4 << 20).chunks(4096).any(|b| b[0] == 0xee || b[0] == 0xdd),
            "node 0 still holds the old writer's data in extent {e}"
        );
    }
    let log = new.proc.log_text();
    eprintln!(
        "link cut: 3 writes by the old writer (1 before, 1 during, 1 after the cut), 1 by the new one; \
         1 fault (old writer + node 0 cut off for {cut_for} s); stale write reached node 0: {stale_landed}; \
         {extents} extents whose copies agree; 32 MiB verified 6 times; 0 lost; catch-up logged: {}",
        log.contains("a replica caught up")
    );
    drop(hold);
}
