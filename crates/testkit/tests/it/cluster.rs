//! The cluster: data moves when nodes join and leave, while a client keeps
//! writing and verifying; afterwards every extent has exactly R copies, on
//! the nodes the ring names (checked on the nodes' disks).

use crate::{node_id, ok, ring_of, volume_id, wait_rebalanced};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use torus_testkit::{wait_until, Cluster};
use torus_types::{ExtentId, NodeId, VolumeId};

/// Overwrites bytes of extent 0 on node `i`'s disk (the node must be stopped).
fn corrupt(c: &Cluster, i: usize, vol_id: u64, offset: u64, bytes: &[u8]) {
    let (dat, base) = torus_store::data_file(&c.nodes[i].data_dir.join(format!("store/extents/{vol_id}")), 0);
    let mut f = std::fs::OpenOptions::new().write(true).open(&dat).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(base + offset)).unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
}

#[test]
fn nodes_join_and_leave_under_io_and_every_extent_ends_with_r_copies() {
    let mut c = Cluster::start(3, 2);
    c.ctl_ok(&["volume", "create-block", "data", "512MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("data");
    let data = crate::write_known(&c, &uri, 256 << 20, 0xda7a);

    // fio keeps writing and verifying the other half throughout.
    let mut fio = Command::new("fio")
        .args([
            "--name=bg",
            "--verify_state_save=0",
            "--ioengine=nbd",
            "--offset=256m",
            "--size=256m",
            "--rw=randwrite",
            "--bsrange=4k-64k",
        ])
        .args([
            "--iodepth=8",
            "--time_based",
            "--runtime=45",
            "--verify=crc32c",
            "--verify_backlog=512",
            "--verify_fatal=1",
        ])
        .arg(format!("--uri={uri}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio");
    std::thread::sleep(Duration::from_secs(2));

    // A fourth node joins.
    let n = c.add_node("1GiB");
    c.start_node(n);
    c.wait_peers(4);
    let out = c.ctl_ok(&["peer", "add", "--all-peers"]);
    assert!(out.contains("data is moving"), "{out}");
    wait_rebalanced(&c);
    // The first node leaves; its data moves away before it is emptied.
    let first = c.nodes[0].peer_addr.clone();
    c.ctl_ok(&["peer", "remove", &first]);
    wait_rebalanced(&c);
    wait_until(Duration::from_secs(60), "the removed node to delete its moved extents", || {
        c.extents_on_disk(0).is_empty()
    });

    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = fio.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "fio did not finish");
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut log = String::new();
    std::io::Read::read_to_string(fio.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(status.success(), "fio verification through the ring changes failed: {log}");

    // Everything written before reads back byte for byte.
    let back = c.dir.path().join("back.bin");
    ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    let got = std::fs::read(&back).unwrap();
    assert!(got[..256 << 20] == data[..], "data changed across the ring changes");

    // On disk: every extent on exactly the R nodes the ring names.
    let ring = ring_of(&c);
    assert_eq!(ring.len(), 3);
    let vol_id = volume_id(&c);
    let mut holders: BTreeMap<String, BTreeSet<NodeId>> = BTreeMap::new();
    for i in 0..c.nodes.len() {
        for e in c.extents_on_disk(i) {
            holders.entry(e).or_default().insert(node_id(&c, i));
        }
    }
    assert_eq!(holders.len(), 128, "512 MiB in 4 MiB extents, all written");
    for (e, nodes) in &holders {
        let (v, idx) = e.split_once('/').unwrap();
        assert_eq!(v.parse::<u64>().unwrap(), vol_id);
        let want: BTreeSet<NodeId> =
            ring.replicas(ExtentId::new(VolumeId(vol_id), idx.parse().unwrap()), 2).into_iter().collect();
        assert_eq!(nodes, &want, "extent {e} is on the wrong nodes");
    }
}

#[test]
fn membership_bad_input_is_refused() {
    let c = Cluster::start(2, 2);
    c.ctl_ok(&["volume", "create-block", "v", "8MiB"]);
    let t = |args: &[&str]| {
        let out = c.ctl(args);
        assert!(!out.status.success(), "torusctl {args:?} succeeded");
        crate::text(&out)
    };
    assert!(t(&["peer", "add", "127.0.0.1:1"]).contains("not known"));
    assert!(t(&["peer", "remove", "127.0.0.1:1"]).contains("not known"));
    assert!(t(&["peer", "remove", &c.nodes[0].peer_addr]).contains("fewer than 2 copies"));
    assert!(t(&["volume", "create-block", "big", "8MiB", "--replication", "3"]).contains("larger than the 2 node"));
    assert!(t(&["ring", "set-replication", "3"]).contains("larger than the 2 node"));
    // Forced removal works; removing the last node never does.
    c.ctl_ok(&["peer", "remove", "--force", &c.nodes[0].peer_addr]);
    wait_rebalanced(&c);
    assert!(t(&["peer", "remove", "--force", &c.nodes[1].peer_addr]).contains("last node"));
}

#[test]
fn a_second_node_with_a_registered_address_is_refused() {
    let mut c = Cluster::start(1, 1);
    c.node(0).kill9();
    // A new node (fresh data dir, so a new UUID) on the dead node's address, inside its lease TTL.
    let out = torus_testkit::run(
        c.cmd("torusd").arg("--data-dir").arg(c.dir.path().join("impostor")).args([
            "--size",
            "1GiB",
            "--peer-address",
            &c.nodes[0].peer_addr,
        ]),
        Duration::from_secs(30),
    );
    let t = crate::text(&out);
    assert!(!out.status.success(), "a duplicate address was accepted: {t}");
    assert!(t.contains("already registered by node"), "{t}");
}

#[test]
fn a_corrupt_copy_is_read_around_and_repaired_from_the_other_replica() {
    let mut c = Cluster::start(2, 2);
    c.ctl_ok(&["volume", "create-block", "rep", "8MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("rep");
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x3c 0 1M", "-c", "flush"]).arg(&uri));
    // The replica read first (ring order: loads are equal) is the one to damage.
    let ring = ring_of(&c);
    let vol_id = volume_id(&c);
    let first = ring.replicas(ExtentId::new(VolumeId(vol_id), 0), 2)[0];
    let bad = (0..2).find(|i| node_id(&c, *i) == first).unwrap();
    let good = 1 - bad;
    assert!(c.node(bad).terminate());
    corrupt(&c, bad, vol_id, 3 * 4096 + 7, &[0xee]);
    c.start_node(bad);
    c.wait_peers(2);

    // The read succeeds from the good replica and repairs the bad one.
    let out = ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x3c 0 1M"]).arg(&uri));
    assert!(!out.contains("fail"), "{out}");
    // With the good replica gone, the repaired copy alone serves the data.
    c.node(good).kill9();
    let out = ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x3c 0 1M"]).arg(&uri));
    assert!(!out.contains("fail"), "the bad copy was not repaired: {out}");
    let log = std::fs::read_to_string(c.dir.path().join(format!("node{bad}.log"))).unwrap();
    assert!(log.contains("repaired corrupt blocks"), "{log}");
}

#[test]
fn the_scrubber_finds_and_repairs_a_corrupt_block_nobody_reads() {
    let mut c = Cluster::start(2, 2);
    c.ctl_ok(&["volume", "create-block", "sc", "8MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("sc");
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5c 0 1M", "-c", "flush"]).arg(&uri));
    let vol_id = volume_id(&c);
    assert!(c.node(0).terminate());
    corrupt(&c, 0, vol_id, 200 * 4096 + 1, &[0x11, 0x22]);
    // This node scrubs every second.
    c.env.push(("TORUS_SCRUB_INTERVAL".into(), "1".into()));
    c.start_node(0);
    let log = c.dir.path().join("node0.log");
    wait_until(Duration::from_secs(60), "the scrubber to repair the block", || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("repaired corrupt blocks")
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("scrub found a corrupt block"), "{text}");
    // The repaired copy alone serves the right data.
    c.node(1).kill9();
    let out = ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x5c 0 1M"]).arg(&uri));
    assert!(!out.contains("fail"), "{out}");
}

/// A node that dies right after recording its rebalance plan (fail point
/// `rebalance::after-progress`: the process aborts there) and is started
/// again: the move finishes, every extent ends on exactly the R nodes the
/// ring names with equal copies (read from the disks), and every byte reads
/// back as written.
#[test]
fn a_node_that_dies_after_recording_its_rebalance_progress_finishes_the_move_when_back() {
    let mut c = Cluster::init(torus_testkit::Etcd::start(), 2);
    for _ in 0..3 {
        c.add_node("1GiB");
    }
    c.env.push(("FAILPOINTS".into(), "rebalance::after-progress=return".into()));
    c.start_node(0);
    c.env.pop();
    c.start_node(1);
    c.start_node(2);
    c.wait_peers(3);
    c.ctl_ok(&["peer", "add", "--all-peers"]);
    c.ctl_ok(&["volume", "create-block", "m", "128MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("m");
    let known = crate::write_known(&c, &uri, 128 << 20, 0x4eba);

    let n = c.add_node("1GiB");
    c.start_node(n);
    c.wait_peers(4);
    c.ctl_ok(&["peer", "add", "--all-peers"]);
    wait_until(Duration::from_secs(60), "node 0 to abort at the fail point", || !c.node(0).is_running());
    let log0 = c.node(0).log_text();
    assert!(!log0.contains("moved this node's share"), "node 0 moved its share before the fail point fired:\n{log0}");
    c.start_node(0);
    wait_rebalanced(&c);

    let extents = crate::node_loss::assert_replicas_agree(&c, volume_id(&c), 2);
    assert_eq!(extents, 32, "128 MiB in 4 MiB extents");
    let back = c.dir.path().join("back.bin");
    ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    let got = std::fs::read(&back).unwrap();
    let lost = got.iter().zip(&known).filter(|(a, b)| a != b).count();
    assert_eq!(lost, 0, "{lost} bytes differ after the move");
    eprintln!("rebalance with a node aborted after recording its progress, restarted: {extents} extents on their 2 nodes, 128 MiB read back, 0 bytes lost");
}
