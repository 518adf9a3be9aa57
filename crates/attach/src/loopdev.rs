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

/// The loop devices bound to `file`.
pub fn devices_of(file: &Path) -> Vec<PathBuf> {
    let Ok(out) = run(Command::new("losetup").args(["--noheadings", "--output", "NAME", "--associated"]).arg(file))
    else {
        return Vec::new();
    };
    out.lines().map(|l| PathBuf::from(l.trim())).filter(|p| !p.as_os_str().is_empty()).collect()
}
