//! Failures: etcd going away under an open volume, and a stale writer.
//! Each scenario reports what it did: operations, faults, bytes verified, data lost.

use crate::text;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use torus_testkit::nbd::Raw;
use torus_testkit::{random_bytes, wait_until, Cluster, Etcd};

fn fio_json(out: &std::process::Output) -> serde_json::Value {
    let s = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&s[s.find('{').unwrap_or(0)..]).unwrap_or(serde_json::Value::Null)
}

#[test]
fn etcd_stopped_for_20s_during_writes_holds_io_and_loses_nothing() {
    let mut c = Cluster::start_with(Etcd::start_private(), 3, 2, "1GiB");
    c.ctl_ok(&["volume", "create-block", "e", "256MiB"]);
    let blk = c.start_blk(&[]);
    let fio = Command::new("fio")
        .args([
            "--name=outage",
            "--verify_state_save=0",
            "--ioengine=nbd",
            "--size=128m",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=8",
        ])
        .args(["--time_based", "--runtime=40", "--verify=crc32c", "--verify_backlog=256", "--verify_fatal=1"])
        .args(["--output-format=json"])
        .arg(format!("--uri={}", blk.uri("e")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fio");
    std::thread::sleep(Duration::from_secs(5));
    c.etcd.stop();
    let outage = Instant::now();
    // Metadata operations fail clearly meanwhile.
    let out = c.ctl(&["volume", "list"]);
    assert!(!out.status.success() && text(&out).contains(&c.etcd.endpoint), "{}", text(&out));
    std::thread::sleep(Duration::from_secs(20).saturating_sub(outage.elapsed()));
    c.etcd.restart();
    let out = fio.wait_with_output().expect("fio");
    let v = fio_json(&out);
    let job = &v["jobs"][0];
    let ops = job["write"]["total_ios"].as_u64().unwrap_or(0);
    let verified = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    eprintln!("etcd outage: {ops} writes, 1 fault (etcd down 20 s), {verified} bytes verified, error {}", job["error"]);
    assert!(out.status.success(), "fio saw an error across the etcd outage: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(job["error"], 0);
    assert!(ops > 0 && verified > 0);
    // The fault took effect: writes were held (by the writer's lease or by isolated nodes), not failed.
    let max_ms = job["write"]["clat_ns"]["max"].as_u64().unwrap_or(0) / 1_000_000;
    eprintln!("longest write: {max_ms} ms");
    assert!(max_ms >= 3000, "no write waited across the outage (max {max_ms} ms): was etcd really gone?");
    let log = blk.proc.log_text();
    assert!(log.contains("lease is confirmed again"), "the writer never lost and regained etcd: {log}");
    // And metadata works again.
    wait_until(Duration::from_secs(30), "torusctl to work after etcd returns", || {
        c.ctl(&["volume", "list"]).status.success()
    });
}

#[test]
fn a_paused_writer_whose_lease_expired_cannot_write_anything_that_lands() {
    let c = Cluster::start(2, 2);
    c.ctl_ok(&["volume", "create-block", "f", "8MiB"]);
    let old = c.start_blk(&["--lease-ttl", "2", "--io-hold", "5"]);
    let new = c.start_blk(&["--lease-ttl", "2"]);
    let a = random_bytes(4096, 1);
    let b = random_bytes(4096, 2);
    let stale = random_bytes(4096, 3);

    let mut w1 = Raw::connect(&old.addr).0;
    w1.send(&3u32.to_be_bytes());
    w1.go("f").expect("first writer opens");
    w1.request(0, 1, 1, 0, 4096, &a);
    assert_eq!(w1.reply(0).0, 0);
    w1.request(0, 3, 2, 0, 0, &[]);
    assert_eq!(w1.reply(0).0, 0);

    old.proc.pause();
    let start = Instant::now();
    let mut w2 = crate::wait_open(&new.addr, "f", Duration::from_secs(30));
    eprintln!("second writer took the volume {:?} after the first was paused", start.elapsed());
    w2.request(0, 1, 3, 0, 4096, &b);
    assert_eq!(w2.reply(0).0, 0);
    w2.request(0, 3, 4, 0, 0, &[]);
    assert_eq!(w2.reply(0).0, 0);

    old.proc.resume();
    // The old writer tries to write: refused (its lease is gone, and the nodes know a newer epoch).
    w1.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    w1.request(0, 1, 5, 0, 4096, &stale);
    let (err, _, _) = w1.reply(0);
    assert_ne!(err, 0, "a stale writer's write was acknowledged");
    w2.request(0, 0, 6, 0, 4096, &[]);
    let (err, _, got) = w2.reply(4096);
    assert_eq!(err, 0);
    assert!(got == b, "the stale writer's data landed");
    eprintln!(
        "stale writer: 2 writes by the new writer, 1 fault (SIGSTOP past the lease), 4096 bytes verified, 0 lost"
    );
}
