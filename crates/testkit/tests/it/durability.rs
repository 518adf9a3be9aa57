//! What a node promises on its own: flushed writes survive kill -9, a crash
//! mid-write leaves every block readable, and a corrupted block is detected
//! and reported, never returned as data.

use crate::{http_get, ok, run, text};
use std::io::{Seek, SeekFrom, Write};
use std::process::Command;
use torus_testkit::Cluster;

#[test]
fn flushed_writes_survive_kill_9_and_a_crash_mid_write_leaves_blocks_readable() {
    let mut c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "d", "32MiB"]);
    let blk = c.start_blk(&[]);
    let data = crate::write_known(&c, &blk.uri("d"), 32 << 20, 42);
    c.node(0).kill9();
    c.start_node(0);
    let out = c.dir.path().join("back.bin");
    ok(Command::new("nbdcopy").arg(blk.uri("d")).arg(&out));
    assert!(std::fs::read(&out).unwrap() == data, "flushed data lost after kill -9");

    // Unflushed random writes, killed mid-way: afterwards every block reads (old or new).
    let mut fio = Command::new("fio");
    fio.args([
        "--name=crash",
        "--ioengine=nbd",
        "--rw=randwrite",
        "--bsrange=4k-256k",
        "--iodepth=32",
        "--size=32m",
        "--time_based=1",
        "--runtime=30",
    ])
    .arg(format!("--uri={}", blk.uri("d")));
    let mut fio = torus_testkit::Proc::spawn("fio", fio, c.dir.path().join("fio.log"));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    c.node(0).kill9();
    fio.kill9();
    c.start_node(0);
    std::fs::remove_file(&out).unwrap();
    let copy = run(Command::new("nbdcopy").arg(blk.uri("d")).arg(&out));
    assert!(copy.status.success(), "reading back after the crash: {}\n{}", text(&copy), blk.proc.log_text());
    let node_log = std::fs::read_to_string(c.dir.path().join("node0.log")).unwrap_or_default();
    assert!(!node_log.contains("checksum mismatch"), "a crash mid-write left an unreadable block:\n{node_log}");
}

#[test]
fn corrupted_block_is_detected_and_never_returned() {
    let mut c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "cz", "8MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("cz");
    ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "flush"]).arg(&uri));
    assert!(c.node(0).terminate());
    let extents = c.extents_on_disk(0);
    assert_eq!(extents.len(), 1, "one extent written: {extents:?}");
    let (vol, index) = extents[0].split_once('/').unwrap();
    let (dat, base) =
        torus_store::data_file(&c.nodes[0].data_dir.join("store/extents").join(vol), index.parse().unwrap());
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&dat).unwrap();
    f.seek(SeekFrom::Start(base + 5 * 4096 + 10)).unwrap();
    f.write_all(&[0x00]).unwrap();
    drop(f);
    c.start_node(0);

    let good = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x77 0 20k", "-c", "read -P 0x77 24k 1000k"])
        .arg(&uri));
    assert!(good.status.success() && !text(&good).contains("fail"), "intact blocks read: {}", text(&good));
    let bad = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x77 20k 4k"]).arg(&uri));
    let t = text(&bad);
    assert!(t.contains("Input/output error") || !bad.status.success(), "corrupt block was returned as data: {t}");
    assert!(!t.contains("read 4096/4096"), "corrupt block was returned as data: {t}");
    let log = std::fs::read_to_string(c.dir.path().join("node0.log")).unwrap();
    assert!(log.contains("checksum mismatch"), "the node reports the corruption: {log}");
    let metrics = http_get(c.nodes[0].http_port, "/metrics");
    let count: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("torus_store_checksum_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("checksum error metric");
    assert!(count >= 1, "metric counts the corruption: {metrics}");
}
