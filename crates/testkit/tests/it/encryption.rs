//! Encryption at rest: an encrypted volume's data is ciphertext on every
//! node's disk (known plaintext is searched for in every file), reads back
//! intact through NBD, survives snapshots, clones and a repair done by the
//! nodes without the key; a torusblk with the wrong key or none refuses to
//! serve it with a clear error; `volume rekey` rotates the cluster key.

use crate::{fails_with, files_under, ok, qemu_io};
use std::process::Command;
use std::time::Duration;
use torus_testkit::{wait_until, Cluster};

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w[0] == needle[0] && w == needle)
}

/// Which of `needles` appear in a file under the volume's extent directories on any node.
fn found_on_disk(c: &Cluster, volume_id: u64, needles: &[Vec<u8>]) -> Vec<usize> {
    let mut found = Vec::new();
    for n in &c.nodes {
        for f in files_under(&n.data_dir) {
            // Extents live under extents/<volume id>/.
            if !f.to_string_lossy().contains(&format!("/extents/{volume_id}/")) {
                continue;
            }
            let data = std::fs::read(&f).expect("read a node's file");
            for (i, needle) in needles.iter().enumerate() {
                if !found.contains(&i) && contains(&data, needle) {
                    found.push(i);
                }
            }
        }
    }
    found
}

fn volume_id(c: &Cluster, name: &str) -> u64 {
    let vols: serde_json::Value = serde_json::from_str(&c.ctl_ok(&["volume", "list", "-o", "json"])).expect("json");
    vols.as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == name))
        .and_then(|v| v["id"].as_u64())
        .expect("the volume's id")
}

fn key_id(create_output: &str) -> String {
    create_output
        .split("cluster key ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("the key id in the create output")
        .to_string()
}

/// `torusctl volume export` with `key` into a file; the file's bytes.
fn export(c: &Cluster, key: &str, spec: &str) -> Vec<u8> {
    let out = c.dir.path().join(format!("export-{}", spec.replace('@', "-")));
    let _ = std::fs::remove_file(&out);
    c.ctl_ok(&["--key-file", key, "volume", "export", spec, &out.display().to_string()]);
    std::fs::read(&out).expect("the export")
}

/// Waits for `needle` in a torusblk's log (it logs a refused open once the client asked).
fn wait_log(blk: &torus_testkit::Blk, needle: &str) {
    wait_until(Duration::from_secs(20), &format!("{needle:?} in torusblk's log"), || {
        blk.proc.log_text().contains(needle)
    });
}

#[test]
fn encrypted_volumes_keep_only_ciphertext_on_disk_and_refuse_a_wrong_key() {
    let mut c = Cluster::start(3, 2);
    let (key_a, key_b) = (c.dir.path().join("a.key"), c.dir.path().join("b.key"));
    std::fs::write(&key_a, torus_testkit::random_bytes(32, 0xa1)).unwrap();
    let hex: String = torus_testkit::random_bytes(32, 0xb3).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&key_b, hex + "\n").unwrap();
    let (a, b) = (key_a.display().to_string(), key_b.display().to_string());
    assert_ne!(torus_testkit::random_bytes(32, 0xa1), torus_testkit::random_bytes(32, 0xb3), "two keys");

    fails_with(&c, &["volume", "create-block", "x", "8MiB", "--encrypt"], "--encrypt needs the cluster key");
    let created = c.ctl_ok(&["--key-file", &a, "volume", "create-block", "sec", "64MiB", "--encrypt"]);
    let id_a = key_id(&created);
    c.ctl_ok(&["volume", "create-block", "clear", "16MiB"]);

    // 8 MiB of a recognisable text, then random data; an unaligned write and a zeroed range on top.
    let marker = b"TORUS-PLAINTEXT-MARKER:0123456789";
    let mut want: Vec<u8> = marker.iter().copied().cycle().take(8 << 20).collect();
    want.extend(torus_testkit::random_bytes(56 << 20, 7));
    let src = c.dir.path().join("src.img");
    std::fs::write(&src, &want).unwrap();
    let blk = c.start_blk(&["--key-file", &a]);
    ok(Command::new("nbdcopy").arg("--flush").arg(&src).arg(blk.uri("sec")));
    qemu_io(&blk.uri("sec"), &["write -P 0x61 1000 3000", "write -z 16384 8192", "write -P 0x62 100001 7", "flush"]);
    want[1000..4000].fill(0x61);
    want[16384..16384 + 8192].fill(0);
    want[100_001..100_008].fill(0x62);
    let marker_only: Vec<u8> = marker.iter().copied().cycle().take(8 << 20).collect();
    let clear_src = c.dir.path().join("clear.img");
    std::fs::write(&clear_src, &marker_only).unwrap();
    ok(Command::new("nbdcopy").arg("--flush").arg(&clear_src).arg(blk.uri("clear")));
    let back = c.dir.path().join("back.img");
    ok(Command::new("nbdcopy").arg(blk.uri("sec")).arg(&back));
    assert!(std::fs::read(&back).unwrap() == want, "what was written reads back through NBD");
    drop(blk);

    // On disk: no trace of the plaintext of the encrypted volume (the marker,
    // and 64-byte pieces of the random part), while the plain one shows it.
    let mut needles: Vec<Vec<u8>> = vec![marker.to_vec()];
    needles.extend((0..32).map(|i| want[(8 << 20) + i * 1_700_000..][..64].to_vec()));
    let sec_id = volume_id(&c, "sec");
    assert_eq!(found_on_disk(&c, sec_id, &needles), Vec::<usize>::new(), "plaintext of `sec` is on a node's disk");
    assert_eq!(found_on_disk(&c, volume_id(&c, "clear"), &needles[..1]), vec![0], "the search finds plain data");

    // A wrong key, and none: refused with a clear error; other volumes are served.
    let wrong = c.start_blk(&["--key-file", &b]);
    let out = crate::run(Command::new("nbdinfo").arg(wrong.uri("sec")));
    assert!(!out.status.success(), "a wrong key serves nothing: {}", crate::text(&out));
    wait_log(&wrong, &format!("encrypted with cluster key {id_a}, not with the key given"));
    drop(wrong);
    let keyless = c.start_blk(&[]);
    let out = crate::run(Command::new("nbdinfo").arg(keyless.uri("sec")));
    assert!(!out.status.success(), "no key serves nothing: {}", crate::text(&out));
    wait_log(&keyless, "give the cluster key with --key-file");
    ok(Command::new("nbdinfo").arg(keyless.uri("clear")));
    drop(keyless);
    let nowhere = c.dir.path().join("never-written").display().to_string();
    fails_with(&c, &["--key-file", &b, "volume", "export", "sec", &nowhere], "not with the key given");

    // Snapshots and clones need no key to make and read with the volume's.
    c.ctl_ok(&["volume", "snapshot", "create", "sec@s1"]);
    c.ctl_ok(&["volume", "clone", "sec@s1", "sec2"]);
    assert!(export(&c, &a, "sec@s1") == want, "the snapshot reads back");
    assert!(export(&c, &a, "sec2") == want, "the clone reads back");

    let at_s1 = want.clone();
    // A node misses writes; the nodes catch its copies up with no client and no key.
    c.node(0).kill9();
    let blk = c.start_blk(&["--key-file", &a, "--node-timeout", "2"]);
    // Four extents: with R=2 of 3 nodes, node 0 holds some of them (else nothing is missed: checked below).
    qemu_io(&blk.uri("sec"), &["write -P 0x77 32M 16M", "flush"]);
    want[32 << 20..48 << 20].fill(0x77);
    drop(blk);
    let status = c.ctl_ok(&["status", "-o", "json"]);
    let report: serde_json::Value = serde_json::from_str(&status).expect("status -o json parses");
    let missed = report["extent_copies_to_catch_up"].as_u64().expect("copies to catch up") > 0;
    c.start_node(0);
    c.ctl_ok(&["wait", "caught-up", "--timeout", "3m"]);
    // The repair shows in the nodes' figures: copies caught up, none missing any more.
    let figure = |i: usize, name: &str| -> f64 {
        let text = crate::http_get(c.nodes[i].http_port, "/metrics");
        text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0.0)
    };
    let caught_up: f64 = (0..3).map(|i| figure(i, "torus_repair_copies_caught_up_total")).sum();
    if missed {
        assert!(caught_up >= 1.0, "the nodes' repairs caught copies up: {caught_up}");
    } else {
        eprintln!("node 0 held none of the four extents written (placement is random): nothing to catch up");
    }
    wait_until(Duration::from_secs(10), "the missing-copies gauge to read 0", || {
        (0..3).all(|i| figure(i, "torus_cluster_extent_copies_missing") == 0.0)
    });
    // Read with another node down: extents it shared with node 0 come from the repaired copy.
    c.node(1).kill9();
    assert!(export(&c, &a, "sec") == want, "the repaired ciphertext decrypts to what was written");

    // Rotation: every wrapped key moves to the new cluster key; the old one no longer opens them.
    let out = c.ctl_ok(&["--key-file", &a, "volume", "rekey", "--new-key-file", &b]);
    assert!(out.contains("rewrapped 2 volume key(s) and 1 snapshot key(s)"), "{out}");
    assert!(export(&c, &b, "sec") == want, "the new key reads the volume");
    assert!(export(&c, &b, "sec@s1") == at_s1, "and the snapshot");
    fails_with(&c, &["--key-file", &a, "volume", "export", "sec2", &nowhere], "not with the key given");
}
