//! Snapshots, clones and restore, end to end: taken while a client writes
//! over NBD, read back with clients none of us wrote (nbdcopy, qemu-io),
//! on 3 nodes with R=2, while a node joins and after one is killed; the
//! space of what is deleted comes back on every node.

use crate::{fails_with, ok, qemu_io, wait_rebalanced};
use std::process::Command;
use std::time::Duration;
use torus_testkit::{wait_until, Cluster};

const MIB: usize = 1 << 20;

/// The whole export, through nbdcopy into a file.
fn image(c: &Cluster, uri: &str) -> Vec<u8> {
    let path = c.dir.path().join(format!("img-{}", torus_testkit::free_port()));
    ok(Command::new("nbdcopy").arg(uri).arg(&path));
    let data = std::fs::read(&path).expect("read the copy");
    let _ = std::fs::remove_file(&path);
    data
}

/// Where two images differ first, if they do.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn assert_image(c: &Cluster, uri: &str, want: &[u8], when: &str) {
    let got = image(c, uri);
    if let Some(at) = first_difference(&got, want) {
        panic!(
            "{uri} {when}: differs at byte {at} (got {:#x}, want {:#x})",
            got.get(at).copied().unwrap_or(0),
            want.get(at).copied().unwrap_or(0)
        );
    }
}

#[test]
fn a_snapshot_keeps_what_was_written_before_it_while_the_volume_moves_on() {
    let mut c = Cluster::start(3, 2);
    c.ctl_ok(&["volume", "create-block", "v", "32MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("v");
    // Pattern A everywhere, then a snapshot taken while torusblk holds the volume for writing.
    qemu_io(&uri, &["write -P 0xaa 0 32M", "flush"]);
    let out = c.ctl_ok(&["volume", "snapshot", "create", "v@a"]);
    assert!(out.contains("took snapshot v@a"), "{out}");
    // Pattern B over part of it: whole extents, part of one, and single bytes inside blocks.
    qemu_io(
        &uri,
        &["write -P 0xbb 4M 4M", "write -P 0xbb 9M 100k", "write -P 0xbb 10001 7", "write -z 20M 64k", "flush"],
    );
    let a = vec![0xaau8; 32 * MIB];
    let mut b = a.clone();
    b[4 * MIB..8 * MIB].fill(0xbb);
    b[9 * MIB..9 * MIB + (100 << 10)].fill(0xbb);
    b[10001..10008].fill(0xbb);
    b[20 * MIB..20 * MIB + (64 << 10)].fill(0);
    assert_image(&c, &blk.uri("v@a"), &a, "after writes to the volume");
    assert_image(&c, &uri, &b, "after writes over the snapshot");

    // A second snapshot, then more writes: both snapshots keep their state.
    c.ctl_ok(&["volume", "snapshot", "create", "v@b"]);
    qemu_io(&uri, &["write -P 0xcc 0 1M", "write -P 0xcc 6M 64k", "flush"]);
    let mut now = b.clone();
    now[..MIB].fill(0xcc);
    now[6 * MIB..6 * MIB + (64 << 10)].fill(0xcc);

    // A node joins: data moves (snapshot layers too) while we read.
    let n = c.add_node("1GiB");
    c.start_node(n);
    c.wait_peers(4);
    c.ctl_ok(&["peer", "add", "--all-peers"]);
    assert_image(&c, &blk.uri("v@a"), &a, "while a node joins");
    assert_image(&c, &uri, &now, "while a node joins");
    wait_rebalanced(&c);
    assert_image(&c, &blk.uri("v@a"), &a, "after the move");
    assert_image(&c, &blk.uri("v@b"), &b, "after the move");
    assert_image(&c, &uri, &now, "after the move");

    // A node is killed and restarted: every copy still reads the same.
    c.node(1).kill9();
    assert_image(&c, &blk.uri("v@a"), &a, "with a node down");
    assert_image(&c, &uri, &now, "with a node down");
    c.start_node(1);
    c.wait_peers(4);
    assert_image(&c, &blk.uri("v@b"), &b, "after a node came back");
    assert_image(&c, &uri, &now, "after a node came back");

    let list = c.ctl_ok(&["volume", "snapshot", "list", "v", "-o", "json"]);
    let snaps: serde_json::Value = serde_json::from_str(&list).expect("json");
    let names: Vec<&str> = snaps.as_array().expect("array").iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["a", "b"], "{list}");
    let exports = ok(Command::new("nbdinfo").arg("--list").arg("--json").arg(format!("nbd://{}", blk.addr)));
    assert!(exports.contains("\"v@a\"") && exports.contains("\"v@b\""), "snapshots are listed as exports: {exports}");
}

#[test]
fn clones_and_their_origin_do_not_see_each_others_writes_and_restore_brings_a_snapshot_back() {
    let c = Cluster::start(2, 2);
    c.ctl_ok(&["volume", "create-block", "o", "16MiB"]);
    let blk = c.start_blk(&[]);
    qemu_io(&blk.uri("o"), &["write -P 0x11 0 16M", "flush"]);
    c.ctl_ok(&["volume", "snapshot", "create", "o@s"]);
    let out = c.ctl_ok(&["volume", "clone", "o@s", "k"]);
    assert!(out.contains("created volume k"), "{out}");
    qemu_io(&blk.uri("o"), &["write -P 0x22 0 1M", "flush"]);
    qemu_io(&blk.uri("k"), &["write -P 0x33 1M 1M", "write -P 0x33 5000 10", "flush"]);
    let mut origin = vec![0x11u8; 16 * MIB];
    origin[..MIB].fill(0x22);
    let mut clone = vec![0x11u8; 16 * MIB];
    clone[MIB..2 * MIB].fill(0x33);
    clone[5000..5010].fill(0x33);
    assert_image(&c, &blk.uri("o"), &origin, "origin after both wrote");
    assert_image(&c, &blk.uri("k"), &clone, "clone after both wrote");
    assert_image(&c, &blk.uri("o@s"), &vec![0x11u8; 16 * MIB], "snapshot after both wrote");

    // The origin cannot go while it has snapshots.
    fails_with(&c, &["volume", "delete", "o"], "has snapshots (s)");

    // Restore is refused while the volume is open for writing (an NBD client
    // stays connected), and works once it is closed.
    let mut client = Command::new("qemu-io")
        .args(["-f", "raw", &blk.uri("o")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start qemu-io");
    wait_until(Duration::from_secs(30), "the client to open the volume", || {
        c.ctl_ok(&["volume", "list"]).contains("epoch")
    });
    fails_with(&c, &["volume", "snapshot", "restore", "o@s"], "open for writing");
    drop(client.stdin.take());
    client.wait().expect("qemu-io ends with its input");
    let mut blk = blk;
    assert!(blk.proc.terminate(), "torusblk stops cleanly");
    wait_until(Duration::from_secs(30), "the restore to be taken once torusblk let go", || {
        c.ctl(&["volume", "snapshot", "restore", "o@s"]).status.success()
    });
    let blk = c.start_blk(&[]);
    assert_image(&c, &blk.uri("o"), &vec![0x11u8; 16 * MIB], "origin after restore");
    assert_image(&c, &blk.uri("k"), &clone, "clone after the origin's restore");

    // The snapshot can go while the clone reads through it, then the origin:
    // the clone keeps the data it reads, on every node, after their collectors ran.
    c.ctl_ok(&["volume", "snapshot", "delete", "o@s"]);
    c.ctl_ok(&["volume", "delete", "o"]);
    std::thread::sleep(Duration::from_secs(12));
    assert_image(&c, &blk.uri("k"), &clone, "clone after its snapshot and origin were deleted");
}

#[test]
fn snapshot_commands_refuse_bad_input_with_clear_errors() {
    let c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "v", "1MiB"]);
    fails_with(&c, &["volume", "snapshot", "create", "nope@s"], "volume \"nope\" does not exist");
    fails_with(&c, &["volume", "snapshot", "create", "a@b@c"], "more than one '@'");
    fails_with(&c, &["volume", "snapshot", "create", "v@"], "it is empty");
    fails_with(&c, &["volume", "snapshot", "create", "v"], "expected VOLUME@SNAPSHOT");
    let long = format!("v@{}", "x".repeat(129));
    fails_with(&c, &["volume", "snapshot", "create", &long], "longer than 128");
    fails_with(&c, &["volume", "snapshot", "create", "v@a\u{7}b"], "is not allowed");
    c.ctl_ok(&["volume", "snapshot", "create", "v@s"]);
    fails_with(&c, &["volume", "snapshot", "create", "v@s"], "snapshot v@s already exists");
    fails_with(&c, &["volume", "snapshot", "delete", "v@t"], "snapshot v@t does not exist");
    c.ctl_ok(&["volume", "create-block", "w", "1MiB"]);
    fails_with(&c, &["volume", "clone", "v@s", "w"], "volume \"w\" already exists");
    fails_with(&c, &["volume", "clone", "v@s", "bad/name"], "is not allowed");
    fails_with(&c, &["volume", "resize", "v", "512KiB"], "--allow-shrink");
    // Nothing half-made: one snapshot, two volumes.
    let snaps = c.ctl_ok(&["volume", "snapshot", "list", "-o", "json"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&snaps).expect("json").as_array().map(|a| a.len()), Some(1));
    let vols = c.ctl_ok(&["volume", "list", "-o", "json"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&vols).expect("json").as_array().map(|a| a.len()), Some(2));
}

/// `e2fsck -fn` of an image file: its exit code and output.
fn fsck(path: &std::path::Path) -> (i32, String) {
    let out = crate::run(Command::new("e2fsck").arg("-fn").arg(path));
    (out.status.code().unwrap_or(-1), crate::text(&out))
}

#[test]
fn snapshots_taken_while_fio_writes_to_ext4_hold_a_consistent_file_system() {
    let c = Cluster::start(2, 2);
    c.ctl_ok(&["volume", "create-block", "fs", "256MiB"]);
    let blk = c.start_blk(&[]);
    let mut a = crate::filesystem::Attached::new(&blk.uri("fs"), c.dir.path(), "snap");
    ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(a.dev()));
    a.mount();
    let fio = Command::new("fio")
        .args(["--name=w", "--rw=randwrite", "--bs=4k", "--size=24M", "--numjobs=2", "--fsync=8"])
        .args(["--verify=crc32c", "--verify_fatal=1", "--time_based", "--runtime=8", "--group_reporting"])
        .arg(format!("--directory={}", a.mnt.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start fio");
    std::thread::sleep(Duration::from_secs(2));
    // Crash-consistent: taken under the writes, as a power cut would leave the disk.
    let out = c.ctl_ok(&["volume", "snapshot", "create", "fs@crash"]);
    assert!(out.contains("took snapshot"), "{out}");
    // Application-consistent: the file system frozen (what a pre-snapshot hook does).
    ok(Command::new("fsfreeze").arg("-f").arg(&a.mnt));
    let frozen = c.ctl(&["volume", "snapshot", "create", "fs@frozen"]);
    ok(Command::new("fsfreeze").arg("-u").arg(&a.mnt));
    assert!(frozen.status.success(), "{}", String::from_utf8_lossy(&frozen.stderr));
    assert!(blk.proc.log_text().contains("snapshot taken"), "torusblk, which has the volume open, took them");
    let fio = fio.wait_with_output().expect("fio");
    assert!(fio.status.success(), "fio verify failed: {}", String::from_utf8_lossy(&fio.stderr));
    a.detach();

    // The frozen snapshot is clean as it is.
    let img = c.dir.path().join("frozen.img");
    c.ctl_ok(&["volume", "export", "fs@frozen", img.to_str().expect("utf-8")]);
    let (code, text) = fsck(&img);
    assert_eq!(code, 0, "e2fsck -fn of the frozen snapshot: {text}");
    // The crash-consistent one is clean once its journal is replayed, like after a power cut.
    let img = c.dir.path().join("crash.img");
    c.ctl_ok(&["volume", "export", "fs@crash", img.to_str().expect("utf-8")]);
    let replay = crate::run(Command::new("e2fsck").arg("-fy").arg(&img));
    assert!(matches!(replay.status.code(), Some(0 | 1)), "journal replay: {}", crate::text(&replay));
    let (code, text) = fsck(&img);
    assert_eq!(code, 0, "e2fsck -fn of the crash-consistent snapshot after journal replay: {text}");

    // The ext4 made on the origin mounts from a clone, with fio's files in it.
    c.ctl_ok(&["volume", "clone", "fs@frozen", "fs-clone"]);
    let mut k = crate::filesystem::Attached::new(&blk.uri("fs-clone"), c.dir.path(), "clone");
    k.mount();
    let files: Vec<String> = std::fs::read_dir(&k.mnt)
        .expect("list the clone")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.iter().any(|f| f.starts_with("w.")), "fio's files are in the clone: {files:?}");
    k.detach();
}

/// Bytes allocated on disk under node `i`'s data directory (sparse files count their data only).
fn disk_usage(c: &Cluster, i: usize) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fn walk(p: &std::path::Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(p) else { return 0 };
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.blocks() * 512,
                Err(_) => 0,
            })
            .sum()
    }
    walk(&c.nodes[i].data_dir)
}

fn usage(c: &Cluster) -> Vec<u64> {
    (0..c.nodes.len()).map(|i| disk_usage(c, i)).collect()
}

/// Waits until every node's usage is at most `most` bytes above `base`.
fn wait_usage(c: &Cluster, base: &[u64], most: u64, what: &str) {
    let mut last = Vec::new();
    let ok = (0..600).any(|_| {
        last = usage(c);
        let done = last.iter().zip(base).all(|(now, b)| *now <= b + most);
        if !done {
            std::thread::sleep(Duration::from_millis(100));
        }
        done
    });
    assert!(ok, "{what}: node usage {last:?}, wanted at most {most} above {base:?}");
}

#[test]
fn space_comes_back_after_trim_snapshot_deletion_and_volume_deletion_also_on_a_node_that_was_down() {
    let mut c = Cluster::start(2, 2);
    let base = usage(&c);
    c.ctl_ok(&["volume", "create-block", "v", "256MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("v");
    qemu_io(&uri, &["write -P 0x5a 0 256M", "flush"]);
    let full = usage(&c);
    assert!(full.iter().zip(&base).all(|(f, b)| f - b >= 256 * MIB as u64), "256 MiB stored on each node: {full:?}");

    // TRIM of the whole volume: the holes are punched on both copies.
    qemu_io(&uri, &["discard 0 256M", "flush"]);
    wait_usage(&c, &base, 8 * MIB as u64, "after TRIM of 256 MiB");

    // 64 MiB, a snapshot, the same 64 MiB overwritten: 128 MiB per node; deleting the snapshot frees 64.
    qemu_io(&uri, &["write -P 0x01 0 64M", "flush"]);
    c.ctl_ok(&["volume", "snapshot", "create", "v@s"]);
    qemu_io(&uri, &["write -P 0x02 0 64M", "flush"]);
    let two = usage(&c);
    assert!(two.iter().zip(&base).all(|(t, b)| t - b >= 128 * MIB as u64), "both versions stored: {two:?}");
    let out = c.ctl_ok(&["volume", "snapshot", "delete", "v@s"]);
    assert!(out.contains("freed 64 MiB"), "{out}");
    wait_usage(&c, &base, 72 * MIB as u64, "after deleting a snapshot whose data was overwritten");
    assert_eq!(image(&c, &uri)[..64 * MIB].iter().filter(|b| **b != 2).count(), 0, "the volume still reads its data");

    // A volume deleted while a node is down: the node frees it when back.
    c.ctl_ok(&["volume", "create-block", "w", "64MiB"]);
    qemu_io(&blk.uri("w"), &["write -P 0x03 0 64M", "flush"]);
    drop(blk);
    c.node(1).kill9();
    let out = c.ctl_ok(&["volume", "delete", "w"]);
    assert!(out.contains("deleted volume w"), "{out}");
    c.ctl_ok(&["volume", "delete", "v"]);
    c.start_node(1);
    wait_usage(&c, &base, 2 * MIB as u64, "after deleting the volumes, one while a node was down");
}

#[test]
fn a_reader_of_a_live_volume_follows_the_writers_snapshots() {
    let c = Cluster::start(2, 2);
    c.ctl_ok(&["volume", "create-block", "live", "16MiB"]);
    let writer = c.start_blk(&[]);
    let reader = c.start_blk(&["--read-only"]);
    // The writer's torusblk keeps the volume open (nbdfuse + loop) for the whole test.
    let a = crate::filesystem::Attached::new(&writer.uri("live"), c.dir.path(), "live");
    let put = |byte: u8| {
        let f = c.dir.path().join(format!("pattern-{byte}"));
        std::fs::write(&f, vec![byte; MIB]).expect("pattern file");
        ok(Command::new("dd").arg(format!("if={}", f.display())).arg(format!("of={}", a.dev())).args([
            "bs=1M",
            "count=1",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ]));
    };
    put(0x11);
    // A client of the reader stays connected: its torusblk keeps the volume open across the snapshot.
    let mut idle = Command::new("qemu-io")
        .args(["-r", "-f", "raw", &reader.uri("live")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start qemu-io");
    let read_only = |uri: &str, cmds: &[&str]| {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-r", "-f", "raw"]);
        for c in cmds {
            cmd.args(["-c", c]);
        }
        ok(cmd.arg(uri))
    };
    read_only(&reader.uri("live"), &["read -P 0x11 0 1M"]);
    let out = c.ctl_ok(&["volume", "snapshot", "create", "live@one"]);
    assert!(out.contains("took snapshot"), "{out}");
    put(0x22);
    // The reader (another process) reads through the new layer within its follow period.
    wait_until(Duration::from_secs(10), "the reader to see the write made after the snapshot", || {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-r", "-f", "raw", "-c", "read -P 0x22 0 1M", &reader.uri("live")]);
        let out = crate::run(&mut cmd);
        out.status.success() && !crate::text(&out).contains("Pattern verification failed")
    });
    read_only(&reader.uri("live@one"), &["read -P 0x11 0 1M", "read -P 0 1M 15M"]);
    assert!(reader.proc.log_text().contains("the volume's layers changed"), "the open reader followed the chain");
    drop(idle.stdin.take());
    idle.wait().expect("qemu-io ends with its input");
    drop(a);
}
