//! Injected faults on a storage node (fail points, `FAILPOINTS`; the test
//! binaries are built with them, see scripts/test): a data write that fails
//! with EIO, and a crash between a write's checksum entries and its data.
//! Each time the writer goes on with the other replica, the faulty node's
//! copy is caught up once it is back, and then that copy alone serves every
//! byte as written (read with the other node down: its checksums are verified
//! on every read, so no block is left unreadable).

use crate::node_loss::{assert_replicas_agree, wait_caught_up};
use crate::{ok, volume_id, write_known};
use std::process::Command;
use std::time::Duration;
use torus_testkit::{wait_until, Cluster};

/// Two nodes, R=2; node 0 runs with `failpoints`.
fn cluster_with_faulty_node(failpoints: &str) -> Cluster {
    let mut c = Cluster::init(torus_testkit::Etcd::start(), 2);
    c.add_node("1GiB");
    c.add_node("1GiB");
    c.env.push(("FAILPOINTS".into(), failpoints.into()));
    c.start_node(0);
    c.env.pop();
    c.start_node(1);
    c.wait_peers(2);
    c.ctl_ok(&["peer", "add", "--all-peers"]);
    c
}

/// Restarts node 0 without faults, waits for its copies to be caught up, then
/// reads the whole volume from node 0 alone; returns how many bytes differ.
fn node0_alone_reads_back(c: &mut Cluster, known: &[u8]) -> usize {
    c.node(0).kill9();
    c.start_node(0);
    wait_caught_up(c);
    let extents = assert_replicas_agree(c, volume_id(c), 2);
    assert!(extents > 0);
    c.node(1).kill9();
    let reader = c.start_blk(&["--read-only"]);
    let out = c.dir.path().join("node0-alone.bin");
    ok(Command::new("nbdcopy").arg(reader.uri("f")).arg(&out));
    let got = std::fs::read(&out).unwrap();
    got.iter().zip(known).filter(|(a, b)| a != b).count()
}

#[test]
fn a_failed_data_write_marks_the_copy_missing_and_poisons_no_block() {
    // The 41st data write on node 0 and every later one fail with EIO.
    let mut c = cluster_with_faulty_node("store::data-write=40*off->return");
    c.ctl_ok(&["volume", "create-block", "f", "64MiB"]);
    let blk = c.start_blk(&[]);
    let known = write_known(&c, &blk.uri("f"), 64 << 20, 0xfa17);
    let log0 = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    assert!(log0.contains("the store refuses further I/O"), "the fault did not fire:\n{log0}");
    let status = c.ctl_ok(&["status"]);
    assert!(!status.contains(" 0 extent copies to catch up"), "node 0's copies were not marked missing: {status}");
    let blk_log = blk.proc.log_text();
    assert!(blk_log.contains("writing on without it"), "{blk_log}");
    let lost = node0_alone_reads_back(&mut c, &known);
    assert_eq!(lost, 0, "node 0's copy, caught up after the EIO, differs in {lost} bytes");
    eprintln!(
        "injected EIO on node 0's data writes (from the 41st): every write acknowledged, node 0's copies marked \
         missing, caught up after a restart, then 64 MiB read from node 0 alone: {lost} bytes differ"
    );
}

#[test]
fn a_crash_between_checksums_and_data_recovers_every_block_as_old_or_new() {
    // Node 0 aborts in its 31st write, after the checksum entries and before the data.
    let mut c = cluster_with_faulty_node("store::crash-after-entries=30*off->return");
    c.ctl_ok(&["volume", "create-block", "f", "64MiB"]);
    let blk = c.start_blk(&[]);
    let known = write_known(&c, &blk.uri("f"), 64 << 20, 0xc4a5);
    wait_until(Duration::from_secs(10), "node 0 to have crashed", || !c.node(0).is_running());
    let blk_log = blk.proc.log_text();
    assert!(blk_log.contains("writing on without it"), "{blk_log}");
    let lost = node0_alone_reads_back(&mut c, &known);
    let log0 = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    assert!(log0.contains("recovered blocks cut by a crash mid-write"), "no recovery at restart:\n{log0}");
    assert_eq!(lost, 0, "node 0's copy, recovered and caught up, differs in {lost} bytes");
    eprintln!(
        "injected crash on node 0 between a write's checksums and its data: writes went on, node 0 recovered the \
         cut blocks at restart and was caught up; 64 MiB read from node 0 alone: {lost} bytes differ"
    );
}
