//! ext4 on a Torus volume: nbdfuse exposes the export as a file, a loop
//! device (direct I/O) makes it a block device; mkfs, mount, write, e2fsck,
//! restart every Torus process, and find every file intact.

use crate::{ok, run, text};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use torus_testkit::{random_bytes, wait_until, Cluster, Proc};

/// An attached export: nbdfuse + loop device + mount point, torn down in order on drop.
pub(crate) struct Attached {
    pub fuse: Option<Proc>,
    fuse_dir: PathBuf,
    loopdev: Option<String>,
    pub mnt: PathBuf,
    mounted: bool,
}

impl Attached {
    pub fn new(uri: &str, dir: &Path, tag: &str) -> Attached {
        let fuse_dir = dir.join(format!("fuse-{tag}"));
        let mnt = dir.join(format!("mnt-{tag}"));
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let mut cmd = Command::new("nbdfuse");
        cmd.arg(&fuse_dir).arg(uri);
        let fuse = Proc::spawn("nbdfuse", cmd, dir.join(format!("nbdfuse-{tag}.log")));
        let mut a = Attached { fuse: Some(fuse), fuse_dir: fuse_dir.clone(), loopdev: None, mnt, mounted: false };
        let file = fuse_dir.join("nbd");
        wait_until(Duration::from_secs(30), "nbdfuse to expose the export", || {
            std::fs::metadata(&file).map(|m| m.len() > 0).unwrap_or(false)
        });
        let dev = ok(Command::new("losetup").args(["-f", "--show", "--direct-io=on"]).arg(&file));
        a.loopdev = Some(dev.trim().to_string());
        a
    }

    pub fn dev(&self) -> &str {
        self.loopdev.as_deref().expect("attached")
    }

    pub fn mount(&mut self) {
        ok(Command::new("mount").arg(self.dev()).arg(&self.mnt));
        self.mounted = true;
    }

    pub fn umount(&mut self) {
        if self.mounted {
            ok(Command::new("umount").arg(&self.mnt));
            self.mounted = false;
        }
    }

    pub fn detach(&mut self) {
        self.umount();
        if let Some(dev) = self.loopdev.take() {
            ok(Command::new("losetup").arg("-d").arg(&dev));
        }
        if let Some(mut f) = self.fuse.take() {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.fuse_dir).status();
            // nbdfuse exits once unmounted; make sure.
            wait_until(Duration::from_secs(10), "nbdfuse to exit", || !f.is_running());
            f.kill9();
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if let Some(dev) = self.loopdev.take() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
        if self.fuse.is_some() {
            let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(&self.fuse_dir).status();
        }
    }
}

fn files() -> Vec<(String, Vec<u8>)> {
    let sizes = [0usize, 1, 511, 4096, 4097, 65536, 1 << 20, 3 << 20, 7 << 20 | 123];
    let mut out = Vec::new();
    for (i, s) in sizes.iter().enumerate() {
        out.push((format!("f{i}.bin"), random_bytes(*s, 1000 + i as u64)));
        out.push((format!("dir{}/sub/g{i}.bin", i % 3), random_bytes(*s / 2 + 7, 2000 + i as u64)));
    }
    out
}

#[test]
fn ext4_survives_restart_of_every_process() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a filesystem and needs root (CI runs as root)");
    let mut c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "fs", "512MiB"]);
    let mut blk = c.start_blk(&[]);
    let dir = c.dir.path().to_path_buf();

    let mut a = Attached::new(&blk.uri("fs"), &dir, "1");
    ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(a.dev()));
    a.mount();
    for (name, data) in files() {
        let p = a.mnt.join(&name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &data).unwrap();
    }
    ok(&mut Command::new("sync"));
    a.umount();
    let fsck = run(Command::new("e2fsck").arg("-fn").arg(a.dev()));
    assert!(fsck.status.success(), "e2fsck after writing: {}", text(&fsck));
    a.detach();

    // Restart the node and the NBD server.
    assert!(blk.proc.terminate(), "torusblk stops cleanly on SIGTERM");
    assert!(c.node(0).terminate(), "torusd stops cleanly on SIGTERM");
    c.start_node(0);
    blk = c.start_blk(&[]);

    let mut a = Attached::new(&blk.uri("fs"), &dir, "2");
    let fsck = run(Command::new("e2fsck").arg("-fn").arg(a.dev()));
    assert!(fsck.status.success(), "e2fsck after restart: {}", text(&fsck));
    a.mount();
    for (name, data) in files() {
        let got = std::fs::read(a.mnt.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(got == data, "{name} differs after restart");
    }
    a.detach();
}
