//! Loop devices, through util-linux's `losetup`: bind a file with direct I/O,
//! refresh its size, detach, and find which device a file is bound to.

use crate::AttachError;
use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) fn run(cmd: &mut Command) -> Result<String, AttachError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(AttachError::io(format!("running {shown}")))?;
    if !out.status.success() {
        let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if output.is_empty() {
            output = format!("exit status {}", out.status);
        }
        return Err(AttachError::Command { command: shown, output });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Binds `file` to a free loop device with direct I/O (no second page cache).
pub fn attach(file: &Path, read_only: bool) -> Result<PathBuf, AttachError> {
    let mut cmd = Command::new("losetup");
    cmd.args(["--direct-io=on", "--find", "--show"]);
    if read_only {
        cmd.arg("--read-only");
    }
    cmd.arg(file);
    Ok(PathBuf::from(run(&mut cmd)?))
}

/// Makes the device take the backing file's current size.
pub fn refresh_size(dev: &Path) -> Result<(), AttachError> {
    run(Command::new("losetup").arg("--set-capacity").arg(dev)).map(drop)
}

/// The device's size in bytes, as the block layer holds it (sysfs, in 512-byte sectors).
pub fn size(dev: &Path) -> Result<u64, AttachError> {
    let name = dev.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let path = format!("/sys/block/{name}/size");
    let s = std::fs::read_to_string(&path).map_err(AttachError::io(format!("reading {path}")))?;
    s.trim()
        .parse::<u64>()
        .map(|sectors| sectors * 512)
        .map_err(|e| AttachError::io(format!("parsing {path}"))(std::io::Error::other(e)))
}

/// Detaches the device (idempotent: a device bound to nothing is fine).
pub fn detach(dev: &Path) -> Result<(), AttachError> {
    if backing_file(dev).is_none() {
        return Ok(());
    }
    run(Command::new("losetup").arg("--detach").arg(dev)).map(drop)
}

/// The file a loop device is bound to, from sysfs.
pub fn backing_file(dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?.to_str()?;
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n')))
}

/// The loop devices bound to `file`, by the path sysfs keeps (no stat of the
/// file: it may sit on a FUSE mount whose server is gone).
pub fn devices_of(file: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let dev = PathBuf::from(format!("/dev/{name}"));
        if backing_file(&dev).as_deref() == Some(file) {
            out.push(dev);
        }
    }
    out
}

/// The loop device `/dev/loopN` whose device number is `rdev`, if it is one.
pub fn loop_of_rdev(rdev: u64) -> Option<PathBuf> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let link = std::fs::read_link(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    let name = link.file_name()?.to_str()?.to_string();
    name.starts_with("loop").then(|| PathBuf::from(format!("/dev/{name}")))
}
