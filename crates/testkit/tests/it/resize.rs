//! `torusctl volume resize`: a volume grows while torusblk serves it (new
//! NBD connections see the new size, data before and after the old end
//! reads back); shrinking is refused without --allow-shrink and while the
//! volume is open, and a shrunk volume grown again reads zeroes past the
//! old end, never the data that was there.

use crate::{ok, qemu_io, text, wait_open};
use std::process::Command;
use std::time::Duration;
use torus_testkit::Cluster;

fn nbd_size(uri: &str) -> u64 {
    ok(Command::new("nbdinfo").arg("--size").arg(uri)).trim().parse().expect("a size")
}

#[test]
fn a_volume_grows_online_and_shrinks_only_when_asked_and_unused() {
    let c = Cluster::start(3, 2);
    c.ctl_ok(&["volume", "create-block", "v", "64MiB"]);
    let blk = c.start_blk(&[]);
    let uri = blk.uri("v");
    qemu_io(&uri, &["write -P 0x11 0 64M", "flush"]);

    // Grow while served: a held connection keeps the volume open in torusblk.
    let held = wait_open(&blk.addr, "v", Duration::from_secs(30));
    let out = c.ctl_ok(&["volume", "resize", "v", "128MiB"]);
    assert!(out.contains("grew volume v from 64 MiB to 128 MiB"), "{out}");
    assert_eq!(nbd_size(&uri), 128 << 20, "a new connection sees the new size");
    let io =
        qemu_io(&uri, &["read -P 0x11 0 64M", "read -P 0 64M 64M", "write -P 0x22 96M 32M", "read -P 0x22 96M 32M"]);
    assert!(!io.contains("Pattern verification failed"), "{io}");
    assert!(c.ctl_ok(&["volume", "resize", "v", "128MiB"]).contains("already"));

    // Shrinking: refused without the flag, refused while open, then done.
    let refused = c.ctl(&["volume", "resize", "v", "32MiB"]);
    assert!(!refused.status.success() && text(&refused).contains("--allow-shrink"), "{}", text(&refused));
    let refused = c.ctl(&["volume", "resize", "v", "32MiB", "--allow-shrink"]);
    assert!(!refused.status.success() && text(&refused).contains("open for writing"), "{}", text(&refused));
    drop(held);
    let mut done = None;
    torus_testkit::wait_until(Duration::from_secs(30), "torusblk to close the volume", || {
        let out = c.ctl(&["volume", "resize", "v", "32MiB", "--allow-shrink"]);
        let t = text(&out);
        if out.status.success() {
            done = Some(t);
            return true;
        }
        assert!(t.contains("open for writing"), "{t}");
        false
    });
    assert!(done.unwrap_or_default().contains("shrank volume v from 128 MiB to 32 MiB"));
    assert_eq!(nbd_size(&uri), 32 << 20);
    let bad = c.ctl(&["volume", "resize", "v", "1000"]);
    assert!(!bad.status.success(), "a size that is not a multiple of 512 is refused: {}", text(&bad));

    // Grown again: zeroes past the shrink point, never the old data.
    c.ctl_ok(&["volume", "resize", "v", "128MiB"]);
    let io = qemu_io(&uri, &["read -P 0x11 0 32M", "read -P 0 32M 96M"]);
    assert!(!io.contains("Pattern verification failed"), "{io}");
    let missing = c.ctl(&["volume", "resize", "nope", "1GiB"]);
    assert!(!missing.status.success() && text(&missing).contains("does not exist"), "{}", text(&missing));
    eprintln!("resize: 64 MiB -> 128 MiB online, 128 -> 32 MiB with --allow-shrink when unused, 32 -> 128 MiB reads zeroes past 32 MiB");
}
