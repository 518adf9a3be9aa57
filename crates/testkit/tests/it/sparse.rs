//! Sparse-aware NBD: structured replies and NBD_CMD_BLOCK_STATUS with the
//! `base:allocation` context, checked with clients none of us wrote
//! (nbdinfo --map, qemu-img map, nbdcopy).

use crate::{http_get, ok};
use std::process::Command;
use torus_testkit::Cluster;

const MIB: u64 = 1 << 20;

/// Appends a range, merging it with the last one when they touch.
fn push_range(out: &mut Vec<(u64, u64)>, off: u64, len: u64) {
    match out.last_mut() {
        Some(last) if last.0 + last.1 == off => last.1 += len,
        _ => out.push((off, len)),
    }
}

/// `(offset, length)` of the data ranges in `nbdinfo --map --json` output.
fn nbdinfo_data(json: &str) -> Vec<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(json).expect("nbdinfo --map --json output");
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("an array of extents") {
        let (off, len, kind) = (e["offset"].as_u64(), e["length"].as_u64(), e["type"].as_u64());
        let (Some(off), Some(len), Some(kind)) = (off, len, kind) else { panic!("malformed extent {e} in {json}") };
        if kind & 1 == 0 {
            push_range(&mut out, off, len);
        }
    }
    out
}

#[test]
fn nbdinfo_and_qemu_img_map_list_exactly_the_written_ranges_as_data() {
    let c = Cluster::start(2, 2);
    c.ctl_ok(&["volume", "create-block", "map", "64MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("map");
    ok(Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(["-c", "write -P 0x11 4M 4M", "-c", "write -P 0x22 20M 64k", "-c", "write -P 0x33 40M 8k"])
        // Written, then zeroed with holes allowed (-u): a hole again.
        .args(["-c", "write -P 0x44 50M 1M", "-c", "write -z -u 50M 1M", "-c", "flush"])
        .arg(&uri));
    let want = vec![(4 * MIB, 4 * MIB), (20 * MIB, 64 << 10), (40 * MIB, 8 << 10)];

    let info = ok(Command::new("nbdinfo").arg("--json").arg(&uri));
    let v: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo --json output");
    let e = &v["exports"][0];
    assert_eq!(e["can_fast_zero"], true, "{info}");
    assert!(e["contexts"].as_array().is_some_and(|c| c.iter().any(|c| c == "base:allocation")), "{info}");

    let map = ok(Command::new("nbdinfo").arg("--map").arg("--json").arg(&uri));
    assert_eq!(nbdinfo_data(&map), want, "nbdinfo --map: {map}");
    let extents: serde_json::Value = serde_json::from_str(&map).expect("json");
    let total: u64 = extents.as_array().expect("array").iter().map(|e| e["length"].as_u64().unwrap_or(0)).sum();
    assert_eq!(total, 64 * MIB, "the map covers the volume: {map}");

    let qemu = ok(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw"]).arg(&uri));
    let v: serde_json::Value = serde_json::from_str(&qemu).expect("qemu-img map --output=json");
    let mut data: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("an array") {
        if e["data"] == true {
            push_range(&mut data, e["start"].as_u64().unwrap_or(0), e["length"].as_u64().unwrap_or(0));
        }
    }
    assert_eq!(data, want, "qemu-img map: {qemu}");
    eprintln!("nbdinfo --map and qemu-img map: data exactly at {want:?} of 64 MiB");
}

fn node_read_bytes(c: &Cluster) -> u64 {
    let metrics = http_get(c.nodes[0].http_port, "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("torus_node_read_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the node's read bytes metric")
}

#[test]
fn nbdcopy_of_a_4gib_volume_holding_64mib_reads_only_the_64mib() {
    let c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "big", "4GiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("big");
    // 16 × 4 MiB of data, 256 MiB apart.
    let mut io = Command::new("qemu-io");
    io.args(["-f", "raw"]);
    for i in 0..16u64 {
        io.args(["-c", &format!("write -P {} {}M 4M", 0x10 + i, i * 256)]);
    }
    ok(io.args(["-c", "flush"]).arg(&uri));

    let before = node_read_bytes(&c);
    let out = c.dir.path().join("big.img");
    ok(Command::new("nbdcopy").arg(&uri).arg(&out));
    let read = node_read_bytes(&c) - before;
    assert!((64 * MIB..=66 * MIB).contains(&read), "nbdcopy made the node read {read} bytes for 64 MiB of data");

    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&out).expect("the copy");
    assert_eq!(meta.len(), 4 << 30);
    assert!(meta.blocks() * 512 <= 80 * MIB, "the copy is sparse: {} bytes allocated", meta.blocks() * 512);
    let f = std::fs::File::open(&out).expect("open the copy");
    for i in 0..16u64 {
        let mut buf = vec![0u8; 4 * MIB as usize];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, i * 256 * MIB).expect("read the copy");
        assert!(buf.iter().all(|&b| b == 0x10 + i as u8), "chunk {i} copied");
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf[..4096], i * 256 * MIB + 4 * MIB).expect("read");
        assert!(buf[..4096].iter().all(|&b| b == 0), "the hole after chunk {i} reads as zeroes");
    }
    eprintln!(
        "nbdcopy of a 4 GiB volume holding 64 MiB: the node read {} MiB; the copy has {} MiB allocated",
        read >> 20,
        meta.blocks() * 512 >> 20
    );
}
