//! Healing without a client (issue 12's scenario at full length): a node is
//! killed while the volume is written, the writer is killed, nobody opens
//! the volume again; the node comes back and the storage nodes repair its
//! stale copies by themselves. Then reads with each node down in turn all
//! succeed and return what was written, and the copies agree on the disks.

use crate::node_loss::assert_replicas_agree;
use crate::{ok, volume_id, write_known};
use std::process::Command;
use std::time::{Duration, Instant};
use torus_testkit::{wait_until, Cluster};

#[test]
fn stale_copies_are_repaired_by_the_nodes_with_no_client_attached() {
    let mut c = Cluster::start(3, 2);
    c.ctl_ok(&["volume", "create-block", "h", "256MiB"]);
    let vol = volume_id(&c);
    let mut blk = c.start_blk(&[]);
    let uri = blk.uri("h");
    write_known(&c, &uri, 256 << 20, 0x4ea1);

    // Node 0 dies; the whole volume is rewritten without it, so every copy it holds is stale.
    c.node(0).kill9();
    let known = write_known(&c, &uri, 256 << 20, 0x4ea2);
    // The writer dies right after (its write intent still lists what it wrote last); nobody reopens the volume.
    blk.proc.kill9();
    let status = c.ctl_ok(&["status"]);
    assert!(!status.contains(" 0 extent copies to catch up"), "node 0 missed no write? {status}");

    // Node 0 returns: the nodes repair its copies with no client attached.
    c.start_node(0);
    let back = Instant::now();
    let mut seen_repairing = false;
    let logs = |c: &Cluster| -> String {
        (0..3).map(|i| std::fs::read_to_string(&c.nodes[i].log).unwrap_or_default()).collect()
    };
    wait_until(Duration::from_secs(30), "node 0's copies to be repaired with no client", || {
        let s = c.ctl_ok(&["status"]);
        seen_repairing |= s.contains("repairing: volume h");
        s.contains(" 0 extent copies to catch up") && s.contains("; 0 extents being written")
    });
    let repaired_in = back.elapsed();
    // The repair (not some client) did it: a node logs a repair that ended whole once it closed the
    // volume (another node may have tried first, while node 0 was still down, and logged Stuck).
    wait_until(Duration::from_secs(10), "a node to log a repair that ended whole (outcome=Whole)", || {
        logs(&c).contains("outcome=Whole")
    });
    let extents = assert_replicas_agree(&c, vol, 2);

    // Every node down in turn: the other copies serve every byte, as written.
    for down in 0..3 {
        c.node(down).kill9();
        let reader = c.start_blk(&["--read-only"]);
        let out = c.dir.path().join(format!("read-without-{down}.bin"));
        ok(Command::new("nbdcopy").arg(reader.uri("h")).arg(&out));
        let got = std::fs::read(&out).unwrap();
        let lost = got.iter().zip(&known).filter(|(a, b)| a != b).count();
        assert_eq!(lost, 0, "with node {down} down, {lost} bytes read back differ");
        std::fs::remove_file(&out).unwrap();
        drop(reader);
        c.start_node(down);
        c.wait_peers(3);
    }
    eprintln!(
        "healing without a client: 256 MiB rewritten with node 0 down, writer killed; node 0's copies repaired \
         {:.1} s after it returned (status showed the repair: {seen_repairing}); {extents} extents whose 2 copies \
         agree on disk; 3 x 256 MiB read back with each node down in turn, 0 bytes lost",
        repaired_in.as_secs_f64()
    );
}
