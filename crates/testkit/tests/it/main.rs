//! End-to-end tests: real etcd, real `torusd` and `torusblk` processes, and
//! NBD clients none of us wrote (nbdinfo, nbdcopy, qemu-io, qemu-img, fio,
//! nbdfuse + loop + ext4).

mod bad_input;
mod cluster;
mod durability;
mod failures;
mod filesystem;
mod nbd_clients;
mod node_loss;
mod partition;
mod writer_crash;

use std::process::{Command, Output};
use std::time::Duration;

/// Runs an external program (which must be installed) and asserts it succeeded.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn run(cmd: &mut Command) -> Output {
    torus_testkit::require(&cmd.get_program().to_string_lossy());
    torus_testkit::run(cmd, Duration::from_secs(300))
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}
