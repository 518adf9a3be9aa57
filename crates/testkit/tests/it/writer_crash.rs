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

/// Writes `data` at offset 0 and flushes, each acknowledged.
fn write_and_flush(w: &mut Raw, data: &[u8]) {
    w.request(0, 1, 1, 0, data.len() as u32, data);
    assert_eq!(w.reply(0).0, 0);
    w.request(0, 3, 2, 0, 0, &[]);
    assert_eq!(w.reply(0).0, 0);
}

#[test]
fn a_write_that_reached_one_replica_before_the_writer_died_is_resynced_at_the_next_open() {
    // The nodes' own repair would resync the dead writer's extents first: this test is about the next writer.
    let mut c = Cluster::init(torus_testkit::Etcd::start(), 2);
    c.env.push(("TORUS_REPAIR_INTERVAL".into(), "0".into()));
    c.add_node("1GiB");
    c.add_node("1GiB");
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "w", "16MiB"]);
    let vol = volume_id(&c);
    let old = c.start_blk(&["--lease-ttl", "2"]);
    let a = random_bytes(64 << 10, 0x10);
    let b = random_bytes(64 << 10, 0x20);
    let mut w = Raw::open(&old.addr, "w", "first writer opens");
    write_and_flush(&mut w, &a);
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

#[test]
fn a_torusblk_restarted_on_the_same_host_serves_its_dead_predecessors_volume_at_once() {
    let c = Cluster::start(2, 2);
    c.ctl_ok(&["volume", "create-block", "rs", "16MiB"]);
    let mut old = c.start_blk(&[]);
    let data = random_bytes(1 << 20, 0x7e57);
    let mut w = Raw::open(&old.addr, "rs", "first writer opens");
    write_and_flush(&mut w, &data);
    // kill -9: the lock stays in etcd until its 10 s lease lapses, unless the successor takes it over.
    old.proc.kill9();
    let killed = std::time::Instant::now();
    let new = c.start_blk(&[]);
    let listening = killed.elapsed();
    let mut r = Raw::open(&new.addr, "rs", "the successor opens the volume for writing");
    r.request(0, 0, 3, 0, data.len() as u32, &[]);
    let (err, _, got) = r.reply(data.len());
    let served = killed.elapsed();
    assert_eq!(err, 0);
    assert!(got == data, "the flushed write did not read back");
    let log = new.proc.log_text();
    assert!(log.contains("taking over"), "{log}");
    assert!(
        served - listening < Duration::from_secs(2),
        "served {served:?} after the kill ({listening:?} of it starting the process): no faster than waiting for the lease"
    );
    eprintln!(
        "torusblk kill -9 and restart on the same host: served again {:.2} s after the kill ({:.2} s of it starting \
         the new process; lease TTL 10 s), 1 MiB read back, 0 lost",
        served.as_secs_f64(),
        listening.as_secs_f64()
    );
}

#[test]
fn a_client_waits_in_the_handshake_while_a_dead_holders_lease_lapses() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test makes a UTS namespace and needs root (CI runs as root)");
    let c = Cluster::start(2, 2);
    c.ctl_ok(&["volume", "create-block", "lw", "16MiB"]);
    // The first writer runs as another host (its own UTS namespace): a successor here cannot tell it died.
    let base = c.cmd("torusblk");
    let addr = format!("127.0.0.1:{}", torus_testkit::free_port());
    let mut cmd = Command::new("unshare");
    cmd.args(["--uts", "sh", "-c", "hostname torus-elsewhere && exec \"$0\" \"$@\""]).arg(base.get_program()).args([
        "nbdserve",
        "--lease-ttl",
        "3",
        "--listen",
        &addr,
    ]);
    for (k, v) in base.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    let mut old = Proc::spawn("torusblk-elsewhere", cmd, c.dir.path().join("blk-elsewhere.log"));
    torus_testkit::wait_until(Duration::from_secs(30), "the first torusblk to listen", || {
        std::net::TcpStream::connect(&addr).is_ok()
    });
    let _w = Raw::open(&addr, "lw", "first writer opens");
    old.kill9();
    let killed = std::time::Instant::now();

    let new = c.start_blk(&["--lease-ttl", "3"]);
    let _r = Raw::open(&new.addr, "lw", "the client waited for the dead holder's lease instead of being refused");
    let waited = killed.elapsed();
    let log = new.proc.log_text();
    assert!(log.contains("volume held elsewhere: waiting for it"), "{log}");
    assert!(!log.contains("taking over"), "another host's holder must not be judged dead: {log}");
    eprintln!(
        "client waited in the handshake {:.1} s for a dead holder's 3 s lease, then was served",
        waited.as_secs_f64()
    );
}
