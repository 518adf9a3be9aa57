//! Real NBD clients against `torusblk nbdserve` backed by a real `torusd` and etcd.

use crate::{ok, run, text};
use std::process::Command;
use torus_testkit::{random_bytes, Cluster};

#[test]
fn nbdinfo_reports_size_and_flags() {
    let c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "info", "256MiB"]);
    let blk = c.start_blk(&[]);
    let json = ok(Command::new("nbdinfo").arg("--json").arg(blk.uri("info")));
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo --json output");
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 268435456u64);
    for (flag, want) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_multi_conn", true),
    ] {
        assert_eq!(e[flag], want, "{flag} in {json}");
    }
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    let list = ok(Command::new("nbdinfo").arg("--list").arg("--json").arg(format!("nbd://{}", blk.addr)));
    assert!(list.contains("\"export-name\": \"info\""), "{list}");
}

#[test]
fn nbdcopy_64mib_round_trip_byte_for_byte() {
    let c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "copy", "64MiB"]);
    let blk = c.start_blk(&[]);
    let dst = c.dir.path().join("out.bin");
    let data = crate::write_known(&c, &blk.uri("copy"), 64 << 20, 0x5eed);
    ok(Command::new("nbdcopy").arg(blk.uri("copy")).arg(&dst));
    let back = std::fs::read(&dst).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "data read back differs from data written");
    // And a second, multi-connection copy back in the other direction agrees too.
    std::fs::remove_file(&dst).unwrap();
    ok(Command::new("nbdcopy").arg("--connections=4").arg(blk.uri("copy")).arg(&dst));
    assert!(std::fs::read(&dst).unwrap() == data);
}

#[test]
fn qemu_io_and_qemu_img() {
    let c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "q", "32MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("q");
    let out = ok(Command::new("qemu-io")
        .args(["-f", "raw"])
        .args([
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0xa5 3M 64k",
            "-c",
            "write -P 0x11 5000 300",
            "-c",
            "flush",
            "-c",
            "read -P 0x5a 0 4096",
            "-c",
            "read -P 0x11 5000 300",
            "-c",
            "read -P 0x5a 5300 1000",
            "-c",
            "read -P 0xa5 3M 64k",
            "-c",
            "write -z 0 64k",
            "-c",
            "read -P 0 0 64k",
            "-c",
            "discard 3M 64k",
            "-c",
            "read -P 0 3M 64k",
            "-c",
            "write -f -P 0x33 8M 128k",
            "-c",
            "read -P 0x33 8M 128k",
        ])
        .arg(&uri));
    assert!(!out.contains("verification failed") && !out.contains("failed:"), "qemu-io: {out}");
    let info = ok(Command::new("qemu-img").args(["info", "--output=json"]).arg(&uri));
    assert!(info.contains("\"virtual-size\": 33554432"), "{info}");
    // qemu-img convert in and compare.
    let src = c.dir.path().join("img.raw");
    std::fs::write(&src, random_bytes(32 << 20, 77)).unwrap();
    ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&uri));
    let cmp = run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&uri));
    assert!(cmp.status.success(), "qemu-img compare: {}", text(&cmp));
}

#[test]
fn fio_nbd_engine_verifies_crc32c() {
    let c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "fio", "128MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("fio");
    for extra in [
        vec!["--rw=randwrite", "--bs=4k", "--iodepth=32"],
        vec!["--rw=write", "--bsrange=512-256k", "--iodepth=8"],
        vec!["--rw=randwrite", "--bs=64k", "--iodepth=16", "--fsync=8"],
    ] {
        let out = ok(Command::new("fio")
            .args([
                "--name=verify",
                "--verify_state_save=0",
                "--ioengine=nbd",
                "--size=48m",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
            ])
            .arg(format!("--uri={uri}"))
            .args(&extra)
            .arg("--output-format=json"));
        let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap_or(0)..]).expect("fio json");
        assert_eq!(v["jobs"][0]["error"], 0, "fio {extra:?}: {out}");
        assert!(v["jobs"][0]["write"]["io_bytes"].as_u64().unwrap_or(0) > 0);
        assert!(v["jobs"][0]["read"]["io_bytes"].as_u64().unwrap_or(0) > 0, "fio verified nothing");
    }
}
