//! Node loss under I/O: a node killed with kill -9 while fio writes and
//! verifies through NBD (I/O goes on; the node comes back and catches up),
//! and a node lost for good (removed; its extents are copied back up to R).
//! Afterwards the replicas of every extent agree byte for byte, read from
//! the nodes' disks, and the data written before the fault reads back.
//! Each scenario reports operations, faults, bytes verified and data lost.

use crate::{node_id, ok, ring_of, volume_id, wait_rebalanced};
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use torus_testkit::{wait_until, Cluster};
use torus_types::{ExtentId, NodeId, VolumeId};

const EXTENT: usize = 4 << 20;

/// fio writing and verifying (crc32c) `size` at `offset` for `secs` seconds.
pub fn start_fio(uri: &str, offset: &str, size: &str, secs: u32) -> Child {
    Command::new("fio")
        .args(["--name=faults", "--verify_state_save=0", "--ioengine=nbd", "--rw=randwrite", "--bsrange=4k-64k"])
        .arg(format!("--offset={offset}"))
        .arg(format!("--size={size}"))
        .args(["--iodepth=8", "--time_based", "--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1"])
        .arg(format!("--runtime={secs}"))
        .args(["--output-format=json"])
        .arg(format!("--uri={uri}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio")
}

/// Waits for fio, asserts it saw no error; returns (writes, bytes verified).
pub fn finish_fio(fio: Child, what: &str) -> (u64, u64) {
    let (ops, verified, _) = finish_fio_timed(fio, what);
    (ops, verified)
}

/// Like `finish_fio`, also returning the longest write's latency (how long I/O paused at worst).
pub fn finish_fio_timed(fio: Child, what: &str) -> (u64, u64, Duration) {
    let out = fio.wait_with_output().expect("fio");
    let s = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&s[s.find('{').unwrap_or(0)..]).unwrap_or_default();
    let job = &v["jobs"][0];
    assert!(
        out.status.success() && job["error"] == 0,
        "{what}: fio saw an I/O or verify error: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ops = job["write"]["total_ios"].as_u64().unwrap_or(0);
    let verified = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    assert!(ops > 0 && verified > 0, "{what}: fio did nothing");
    let worst = Duration::from_nanos(job["write"]["lat_ns"]["max"].as_f64().unwrap_or(0.0) as u64);
    (ops, verified, worst)
}

/// Waits until no copy is left to catch up (per `torusctl status`).
pub fn wait_caught_up(c: &Cluster) {
    wait_until(Duration::from_secs(120), "every copy to catch up", || {
        c.ctl_ok(&["status"]).contains(" 0 extent copies to catch up")
    });
}

/// Asserts every extent of the volume is held by exactly the R nodes the
/// ring names, all with the same bytes (read from their disks). Returns
/// how many extents were compared.
pub fn assert_replicas_agree(c: &Cluster, vol_id: u64, r: usize) -> usize {
    let ring = ring_of(c);
    let ids: Vec<NodeId> = (0..c.nodes.len()).map(|i| node_id(c, i)).collect();
    let mut holders: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for i in 0..c.nodes.len() {
        if c.nodes[i].proc.is_none() {
            continue;
        }
        for e in c.extents_on_disk(i) {
            holders.entry(e).or_default().insert(i);
        }
    }
    holders.retain(|e, _| e.split_once('/').is_some_and(|(v, _)| v.parse::<u64>().ok() == Some(vol_id)));
    for (e, nodes) in &holders {
        let idx = e.split_once('/').unwrap().1;
        let have: BTreeSet<NodeId> = nodes.iter().map(|i| ids[*i]).collect();
        // A full node is a replica only where it holds the extent (it takes no new ones).
        let want: BTreeSet<NodeId> = ring
            .replicas_held(ExtentId::new(VolumeId(vol_id), idx.parse().unwrap()), r, |n| Some(have.contains(&n)))
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(have, want, "extent {e} is not on exactly the nodes the ring names");
        let mut copies = nodes.iter().map(|i| (*i, c.extent_bytes(*i, e, EXTENT)));
        let (first, a) = copies.next().unwrap();
        for (other, b) in copies {
            if a != b {
                let at = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
                panic!("extent {e}: node {first} and node {other} disagree from byte {at}");
            }
        }
    }
    holders.len()
}

/// `nodes` nodes with replication `r`; the nodes in `kill` are killed with
/// kill -9 one after the other during writes, then restarted.
fn node_killed_and_restarted(nodes: usize, r: u32, kill: &[usize]) {
    let mut c = Cluster::start(nodes, r);
    c.ctl_ok(&["volume", "create-block", "v", "256MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("v");
    // Known data in the first 64 MiB, written before any fault.
    let known = crate::write_known(&c, &uri, 64 << 20, 0x10_55);

    let fio = start_fio(&uri, "64m", "192m", 30);
    std::thread::sleep(Duration::from_secs(4));
    for &k in kill {
        c.node(k).kill9();
        std::thread::sleep(Duration::from_secs(3));
    }
    // Writes went on without them; now they come back.
    std::thread::sleep(Duration::from_secs(5));
    let status = c.ctl_ok(&["status"]);
    assert!(status.contains("CATCHING UP") || status.contains("DEGRADED"), "{status}");
    assert!(!status.contains(" 0 extent copies to catch up"), "no write was recorded as missed: {status}");
    for &k in kill {
        c.start_node(k);
    }
    let (ops, verified) = finish_fio(fio, "node loss");
    wait_caught_up(&c);
    let blk_log = blk.proc.log_text();
    assert!(blk_log.contains("writing on without it"), "no write went on without a replica: {blk_log}");
    assert!(blk_log.contains("a replica caught up"), "{blk_log}");

    let back = c.dir.path().join("back.bin");
    ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    let got = std::fs::read(&back).unwrap();
    let lost = got[..64 << 20].iter().zip(&known).filter(|(a, b)| a != b).count();
    let extents = assert_replicas_agree(&c, volume_id(&c), r as usize);
    eprintln!(
        "kill -9 of {} node(s) of {nodes} (R={r}) during writes: {ops} writes, {} fault(s) (kill -9), {} bytes verified \
         by fio + 64 MiB read back, {extents} extents whose {r} copies agree on disk, {lost} bytes lost",
        kill.len(),
        kill.len(),
        verified
    );
    assert_eq!(lost, 0, "data written before the fault changed");
}

#[test]
fn a_node_killed_during_writes_is_written_around_then_catches_up() {
    node_killed_and_restarted(3, 2, &[1]);
}

#[test]
fn with_r3_two_nodes_killed_during_writes_are_written_around_then_catch_up() {
    node_killed_and_restarted(3, 3, &[1, 2]);
}

#[test]
fn a_node_lost_for_good_is_removed_and_its_extents_are_copied_back_to_r() {
    let mut c = Cluster::start(4, 2);
    c.ctl_ok(&["volume", "create-block", "v", "256MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("v");
    let known = crate::write_known(&c, &uri, 128 << 20, 0x1057);
    let lost_node = 3;
    let lost_id = node_id(&c, lost_node);
    let held = c.extents_on_disk(lost_node).len();
    assert!(held > 0, "the node to lose holds no extents");

    let fio = start_fio(&uri, "128m", "128m", 25);
    std::thread::sleep(Duration::from_secs(4));
    c.node(lost_node).kill9();
    c.nodes[lost_node].proc = None;
    std::thread::sleep(Duration::from_secs(2));
    // The operator declares it lost (by UUID: it no longer answers at its address).
    let started = Instant::now();
    c.ctl_ok(&["peer", "remove", &lost_id.to_string()]);
    wait_rebalanced(&c);
    let took = started.elapsed();
    let (ops, verified) = finish_fio(fio, "node lost for good");
    wait_caught_up(&c);

    let back = c.dir.path().join("back.bin");
    ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    let got = std::fs::read(&back).unwrap();
    let lost = got[..128 << 20].iter().zip(&known).filter(|(a, b)| a != b).count();
    let extents = assert_replicas_agree(&c, volume_id(&c), 2);
    assert_eq!(extents, 64, "256 MiB in 4 MiB extents, all written, each with 2 copies on the 3 nodes left");
    eprintln!(
        "node lost for good (4 nodes, R=2): {ops} writes, 1 fault (kill -9, then peer remove), {held} extents \
         re-replicated in {:.1} s, {} bytes verified by fio + 128 MiB read back, {lost} bytes lost",
        took.as_secs_f64(),
        verified
    );
    assert_eq!(lost, 0, "data written before the loss changed");
}

#[test]
fn a_node_down_past_the_down_out_time_is_replaced_automatically_and_may_return_empty() {
    let mut c = Cluster::start(3, 2);
    c.ctl_ok(&["ring", "set-down-out", "3s"]);
    assert!(c.ctl_ok(&["ring", "get"]).contains("down-out: after 3 s down"));
    c.ctl_ok(&["volume", "create-block", "v", "128MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("v");
    let known = crate::write_known(&c, &uri, 128 << 20, 0xd0);

    let fio = start_fio(&uri, "0", "64m", 20);
    std::thread::sleep(Duration::from_secs(3));
    c.node(2).kill9();
    c.nodes[2].proc = None;
    let started = Instant::now();
    wait_until(Duration::from_secs(120), "the dead node to be taken out and its extents re-replicated", || {
        let ring = c.ctl_ok(&["ring", "get"]);
        ring.contains("members: 2") && c.ctl_ok(&["status"]).contains("none in progress")
    });
    let took = started.elapsed();
    let (ops, verified) = finish_fio(fio, "down-out");
    wait_caught_up(&c);
    assert_eq!(assert_replicas_agree(&c, volume_id(&c), 2), 32);
    let log: String = (0..2).map(|i| std::fs::read_to_string(&c.nodes[i].log).unwrap_or_default()).collect();
    assert!(log.contains("down past the down-out time: took it out"), "{log}");

    // It comes back with its old copies: it deletes them before anything else, and joins again empty.
    assert!(!c.extents_on_disk(2).is_empty());
    c.start_node(2);
    wait_until(Duration::from_secs(60), "the returning node to delete its outdated copies", || {
        c.extents_on_disk(2).is_empty()
    });
    c.wait_peers(3);
    c.ctl_ok(&["peer", "add", "--all-peers"]);
    wait_rebalanced(&c);
    assert_eq!(assert_replicas_agree(&c, volume_id(&c), 2), 32);
    let back = c.dir.path().join("back.bin");
    ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    let got = std::fs::read(&back).unwrap();
    let lost = got[64 << 20..].iter().zip(&known[64 << 20..]).filter(|(a, b)| a != b).count();
    eprintln!(
        "down-out (3 nodes, R=2, down-out 3 s): {ops} writes, 1 fault (kill -9 for good), taken out and \
         re-replicated in {:.1} s, rejoined empty; {verified} bytes verified by fio + 64 MiB read back; {lost} bytes lost",
        took.as_secs_f64()
    );
    assert_eq!(lost, 0);
}
