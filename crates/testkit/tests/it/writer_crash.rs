//! The NBD server (the volume's writer) crashing mid-write: the next writer
//! resyncs the extents the crashed one was writing before it serves the
//! volume, so every replica of every extent agrees byte for byte (checked on
//! the nodes' disks) and a filesystem on it passes e2fsck.

use crate::filesystem::Attached;
use crate::node_loss::assert_replicas_agree;
use crate::{ok, run, text, volume_id, wait_open};
use bytes::Bytes;
use std::process::Command;
use std::time::Duration;
use torus_proto::PeerClient;
use torus_testkit::nbd::Raw;
use torus_testkit::{random_bytes, Cluster, Proc};
use torus_types::{Epoch, ExtentId, VolumeId};

#[test]
fn a_write_that_reached_one_replica_before_the_writer_died_is_resynced_at_the_next_open() {
    let c = Cluster::start(2, 2);
    c.ctl_ok(&["volume", "create-block", "w", "16MiB"]);
    let vol = volume_id(&c);
    let old = c.start_blk(&["--lease-ttl", "2"]);
    let a = random_bytes(64 << 10, 0x10);
    let b = random_bytes(64 << 10, 0x20);
    let mut w = Raw::connect(&old.addr).0;
    w.send(&3u32.to_be_bytes());
    w.go("w").expect("first writer opens");
    w.request(0, 1, 1, 0, a.len() as u32, &a);
    assert_eq!(w.reply(0).0, 0);
    w.request(0, 3, 2, 0, 0, &[]);
    assert_eq!(w.reply(0).0, 0);
    let mut old = old;
    old.proc.kill9();

    // What a crash between the two replicas' writes leaves: the next write
    // reached node 0 only (sent with the dead writer's epoch, which node 0 accepts).
    let epoch: u64 = std::fs::read_to_string(c.nodes[0].data_dir.join(format!("store/fences/{vol}")))
        .expect("node 0 knows the writer's epoch")
        .trim()
        .parse()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let n0 = PeerClient::connect(&c.nodes[0].peer_addr, Duration::from_secs(10)).await.unwrap();
        let e0 = ExtentId::new(VolumeId(vol), 0);
        n0.write(e0, 0, Bytes::from(b.clone()), Epoch(epoch), true).await.unwrap();
    });
    let rel = format!("{vol}/0");
    assert!(c.extent_bytes(0, &rel, 4 << 20) != c.extent_bytes(1, &rel, 4 << 20), "the replicas should disagree now");

    // The next writer opens the volume: the replicas agree before it serves anything.
    let new = c.start_blk(&[]);
    let mut w2 = wait_open(&new.addr, "w", Duration::from_secs(60));
    assert_replicas_agree(&c, vol, 2);
    let log = new.proc.log_text();
    assert!(log.contains("did not close cleanly: resynced"), "{log}");
    // Reads return one version, whichever replica answers (both A and B are allowed: the write was never acknowledged).
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..20 {
        w2.request(0, 0, 10 + i, 0, a.len() as u32, &[]);
        let (err, _, got) = w2.reply(a.len());
        assert_eq!(err, 0);
        assert!(got == a || got == b, "read returned neither the old nor the new data");
        seen.insert(got == b);
    }
    assert_eq!(seen.len(), 1, "reads flipped between old and new data");
    eprintln!(
        "writer crash, deterministic: 1 write, 1 fault (kill -9 between replicas), 1 extent resynced, \
         {} bytes verified, 0 lost",
        20 * a.len()
    );
}

#[test]
fn ext4_after_the_nbd_server_is_killed_mid_write_passes_e2fsck_and_replicas_agree() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a filesystem and needs root (CI runs as root)");
    let c = Cluster::start(3, 2);
    c.ctl_ok(&["volume", "create-block", "fs", "256MiB"]);
    let vol = volume_id(&c);
    let mut blk = c.start_blk(&["--lease-ttl", "3"]);
    let dir = c.dir.path().to_path_buf();
    let keep = random_bytes(3 << 20, 0x4ee9);

    let mut a = Attached::new(&blk.uri("fs"), &dir, "1");
    ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(a.dev()));
    a.mount();
    std::fs::write(a.mnt.join("keep.bin"), &keep).unwrap();
    ok(&mut Command::new("sync"));
    // A writer that keeps the filesystem busy: files rewritten and fsynced in a loop.
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(format!(
        "i=0; while :; do dd if=/dev/urandom of={}/f$((i % 8)) bs=64k count=32 conv=fsync 2>/dev/null; i=$((i+1)); done",
        a.mnt.display()
    ));
    let mut busy = Proc::spawn("writer", sh, dir.join("writer.log"));
    std::thread::sleep(Duration::from_secs(4));
    blk.proc.kill9();
    busy.kill9();
    // The client side is gone with the server: tear it down (the mount is lazily detached).
    drop(a);
    blk = c.start_blk(&["--lease-ttl", "3"]);
    drop(wait_open(&blk.addr, "fs", Duration::from_secs(60)));
    let extents = assert_replicas_agree(&c, vol, 2);
    let log = blk.proc.log_text();
    let resynced = log.contains("did not close cleanly: resynced");

    let mut a = Attached::new(&blk.uri("fs"), &dir, "2");
    // Mounting replays the journal, as after any crash; then the check must find nothing.
    a.mount();
    let got = std::fs::read(a.mnt.join("keep.bin")).unwrap();
    a.umount();
    let fsck = run(Command::new("e2fsck").arg("-fn").arg(a.dev()));
    assert!(fsck.status.success(), "e2fsck after the crash: {}", text(&fsck));
    a.detach();
    assert!(got == keep, "a file synced before the crash changed");
    eprintln!(
        "writer crash under ext4: 1 fault (kill -9 of torusblk mid-write), resync at open: {resynced}, \
         {extents} extents whose copies agree on disk, e2fsck clean, {} bytes verified, 0 lost",
        keep.len()
    );
}
