//! etcd as users run it: three members. Killing the leader under fio with
//! verify pauses I/O for a few seconds at most, and loses nothing.

use crate::node_loss::{finish_fio_timed, start_fio};
use crate::{ok, write_known};
use std::process::Command;
use std::time::{Duration, Instant};
use torus_testkit::{Cluster, Etcd3};

#[test]
fn killing_the_etcd_leader_under_fio_verify_loses_nothing() {
    let mut etcd = Etcd3::start();
    let mut c = Cluster::init(etcd.as_etcd(), 2);
    for _ in 0..3 {
        c.add_node("1GiB");
    }
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "e", "256MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("e");
    let known = write_known(&c, &uri, 64 << 20, 0xe7cd);

    let fio = start_fio(&uri, "64m", "192m", 25);
    std::thread::sleep(Duration::from_secs(8));
    let leader = etcd.leader();
    etcd.kill9(leader);
    let killed = Instant::now();
    let finished = std::panic::catch_unwind(|| finish_fio_timed(fio, "etcd leader killed"));
    let (ops, verified, worst) = finished.unwrap_or_else(|e| {
        eprintln!("torusblk's log:\n{}", blk.proc.log_text());
        std::panic::resume_unwind(e)
    });
    let after = killed.elapsed();

    // The cluster answers through the two members left, and the data written before is intact.
    let status = c.ctl_ok(&["status"]);
    assert!(status.contains("health:"), "{status}");
    let back = c.dir.path().join("back.bin");
    ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    let got = std::fs::read(&back).unwrap();
    let lost = got[..64 << 20].iter().zip(&known).filter(|(a, b)| a != b).count();
    assert_eq!(lost, 0, "data written before the leader died changed");
    let new_leader = etcd.leader();
    assert_ne!(new_leader, leader);
    assert!(worst < Duration::from_secs(10), "I/O paused {worst:?} when the etcd leader died");
    eprintln!(
        "etcd leader (member {leader} of 3) killed with kill -9 under fio verify: {ops} writes, {verified} bytes \
         verified by fio ({:.0} s of it after the kill) + 64 MiB read back, longest write {:.2} s, 0 errors, {lost} bytes lost; \
         member {new_leader} leads now",
        after.as_secs_f64(),
        worst.as_secs_f64()
    );
}
