//! `torusctl volume import` and `volume export`: sparse-aware both ways,
//! byte for byte, from and to files and pipes, and every bad input refused
//! with nothing left half-done.

use crate::{fails_with, http_get};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::process::{Command, Stdio};
use torus_testkit::{random_bytes, Cluster};

const MIB: u64 = 1 << 20;

fn written_bytes(c: &Cluster) -> u64 {
    (0..c.nodes.len())
        .map(|i| {
            http_get(c.nodes[i].http_port, "/metrics")
                .lines()
                .find_map(|l| l.strip_prefix("torus_node_written_bytes_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .expect("the node's written bytes metric")
        })
        .sum()
}

fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("run torusctl");
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn import_and_export_skip_holes_and_zeroes_and_round_trip_byte_for_byte() {
    let c = Cluster::start(2, 2);
    let dir = c.dir.path();
    // 256 MiB, sparse: 8 MiB of data at 16 MiB, 4 KiB at 100 MiB, and 8 MiB of
    // written (allocated) zeroes at 200 MiB.
    let src = dir.join("src.img");
    let f = std::fs::File::create(&src).expect("create the source");
    f.set_len(256 * MIB).expect("size it");
    let data = random_bytes(8 * MIB as usize, 7);
    f.write_all_at(&data, 16 * MIB).expect("write");
    f.write_all_at(&random_bytes(4096, 8), 100 * MIB).expect("write");
    f.write_all_at(&vec![0u8; 8 * MIB as usize], 200 * MIB).expect("write zeroes");
    drop(f);
    let source = std::fs::read(&src).expect("read the source back");

    let before = written_bytes(&c);
    let out = c.ctl_ok(&["volume", "import", src.to_str().expect("utf-8"), "v"]);
    let stored = written_bytes(&c) - before;
    assert_eq!(stored, 2 * (8 * MIB + 4096), "only the data was sent, to both replicas: {out}");
    let vols: serde_json::Value = serde_json::from_str(&c.ctl_ok(&["volume", "list", "-o", "json"])).expect("json");
    assert_eq!(vols[0]["size"], 256 * MIB, "the volume has the file's size: {vols}");

    // To a file: the same bytes, and holes where the volume has no data.
    let back = dir.join("back.img");
    c.ctl_ok(&["volume", "export", "v", back.to_str().expect("utf-8")]);
    assert!(std::fs::read(&back).expect("the export") == source, "exported file differs from the source");
    let allocated = std::fs::metadata(&back).expect("stat").blocks() * 512;
    assert!(allocated <= 9 * MIB, "the export is sparse: {allocated} bytes allocated");
    assert!(!dir.join("back.img.partial").exists());

    // To a pipe.
    let piped = run_ok(c.cmd("torusctl").args(["volume", "export", "v", "-"]));
    assert!(piped.stdout == source, "exported stream differs from the source");

    // From a pipe, with --size.
    let mut child = c
        .cmd("torusctl")
        .args(["volume", "import", "-", "w", "--size", "256MiB"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start torusctl");
    let mut stdin = child.stdin.take().expect("stdin");
    let feed = {
        let source = source.clone();
        std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &source))
    };
    let out = child.wait_with_output().expect("torusctl");
    feed.join().expect("feeder").expect("fed the pipe");
    assert!(out.status.success(), "import from a pipe: {}", String::from_utf8_lossy(&out.stderr));
    let piped = run_ok(c.cmd("torusctl").args(["volume", "export", "w", "-"]));
    assert!(piped.stdout == source, "a volume imported from a pipe differs from its source");

    // Bad input: each refused with a clear message, nothing left behind.
    let srcs = src.to_str().expect("utf-8");
    fails_with(&c, &["volume", "import", srcs, "v"], "exists already");
    fails_with(&c, &["volume", "import", "/nonexistent/file", "x"], "opening /nonexistent/file");
    fails_with(&c, &["volume", "import", "-", "x"], "needs --size");
    fails_with(&c, &["volume", "import", srcs, "x", "--size", "1MiB"], "more than --size");
    fails_with(&c, &["volume", "export", "v", back.to_str().expect("utf-8")], "without --force");
    fails_with(&c, &["volume", "export", "v@s1", back.to_str().expect("utf-8")], "snapshot v@s1 does not exist");
    fails_with(&c, &["volume", "export", "nope", "-"], "nope");
    // Longer than --size on a pipe: refused, and the volume it created is deleted.
    let out = c
        .cmd("torusctl")
        .args(["volume", "import", "-", "short", "--size", "1MiB"])
        .stdin(std::fs::File::open(&src).expect("open"))
        .output()
        .expect("torusctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("longer than") && err.contains("deleted"), "{err}");
    let list = c.ctl_ok(&["volume", "list"]);
    assert!(!list.contains("short") && !list.contains(" x "), "no volume left from failed imports: {list}");
    eprintln!(
        "import of a 256 MiB file holding 8 MiB + 4 KiB of data (and 8 MiB of zeroes) stored {} bytes on 2 replicas; \
         export sparse ({allocated} bytes allocated) and byte for byte, to a file and a pipe",
        stored
    );
}
