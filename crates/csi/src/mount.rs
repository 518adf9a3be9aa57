//! The host side of staging and publishing: what is mounted where
//! (/proc/self/mountinfo), mounting, bind mounts, probing a device for a file
//! system, making one, growing one, and usage figures. Everything is done
//! with the standard tools (mount, umount, blkid, mkfs.*, resize2fs,
//! xfs_growfs) so that behaviour matches what an operator would run by hand.
//!
//! **Never format unless blank**: [`probe`] reads the device's first and
//! last MiB itself (O_DIRECT, so an I/O error cannot hide in a cache) before
//! asking blkid; any read error or any blkid answer but "nothing found"
//! means "do not format".

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use tonic::Status;

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    pub options: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(l.get(4)?)),
                options: l.get(5)?.to_string(),
                fs_type: r.first()?.to_string(),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

pub fn mounts() -> Result<Vec<MountEntry>, Status> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Status::internal(format!("reading /proc/self/mountinfo: {e}")))?;
    Ok(parse_mountinfo(&text))
}

/// The mount at exactly `path` (the topmost one), if any.
pub fn mounted_at(path: &Path) -> Result<Option<MountEntry>, Status> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

fn run(cmd: &mut Command) -> Result<String, Status> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| Status::internal(format!("cannot run {shown}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Status::internal(format!("{shown} failed ({}): {}", out.status, err.trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `mount [-t fs] [-o opts] source target`.
pub fn mount(source: &Path, target: &Path, fs_type: Option<&str>, options: &[String]) -> Result<(), Status> {
    let mut cmd = Command::new("mount");
    if let Some(t) = fs_type {
        cmd.args(["-t", t]);
    }
    if !options.is_empty() {
        cmd.arg("-o").arg(options.join(","));
    }
    run(cmd.arg(source).arg(target)).map(drop)
}

/// Bind-mounts `source` on `target`; read-only takes a second remount (the kernel ignores `ro` on the bind itself).
pub fn bind(source: &Path, target: &Path, read_only: bool, options: &[String]) -> Result<(), Status> {
    run(Command::new("mount").arg("--bind").arg(source).arg(target))?;
    if read_only || !options.is_empty() {
        let mut opts = vec!["remount".to_string(), "bind".to_string()];
        if read_only {
            opts.push("ro".into());
        }
        opts.extend(options.iter().cloned());
        if let Err(e) = run(Command::new("mount").arg("-o").arg(opts.join(",")).arg(target)) {
            let _ = unmount(target);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts whatever is mounted at `target` (every layer); nothing mounted is fine.
pub fn unmount(target: &Path) -> Result<(), Status> {
    while mounted_at(target)?.is_some() {
        run(Command::new("umount").arg(target))?;
    }
    Ok(())
}

/// What a device holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Nothing blkid recognises, and every byte probed was readable.
    Blank,
    /// A file system of this type.
    FileSystem(String),
    /// Something else (a partition table, RAID member, ...): never formatted over.
    Other(String),
}

const PROBE_BYTES: usize = 1 << 20;

/// Reads `len` bytes at `offset` with O_DIRECT; any error fails the probe.
fn read_direct(dev: &Path, offset: u64, len: usize) -> Result<(), Status> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| Status::unavailable(format!("cannot open {} to probe it: {e}", dev.display())))?;
    // O_DIRECT needs an aligned buffer: take a 4 KiB-aligned window of a larger one.
    let mut buf = vec![0u8; len + 4096];
    let skew = buf.as_ptr().align_offset(4096);
    let window = &mut buf[skew..skew + len];
    let mut done = 0;
    while done < len {
        match f.read_at(&mut window[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "reading {} at {} failed while probing for a file system ({e}): not formatting it",
                    dev.display(),
                    offset + done as u64
                )))
            }
        }
    }
    Ok(())
}

/// Finds out what `dev` (of `size` bytes) holds, refusing to guess on any error.
pub fn probe(dev: &Path, size: u64) -> Result<Probe, Status> {
    let head = PROBE_BYTES.min(size as usize);
    read_direct(dev, 0, head)?;
    if size > PROBE_BYTES as u64 {
        read_direct(dev, size - PROBE_BYTES as u64, PROBE_BYTES)?;
    }
    let out = Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(dev)
        .output()
        .map_err(|e| Status::internal(format!("cannot run blkid: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k).map(str::to_string));
    match out.status.code() {
        Some(0) => match (field("TYPE="), field("PTTYPE=")) {
            (Some(t), _) if field("USAGE=").is_none_or(|u| u == "filesystem") => Ok(Probe::FileSystem(t)),
            (Some(t), _) => Ok(Probe::Other(t)),
            (None, Some(pt)) => Ok(Probe::Other(format!("a {pt} partition table"))),
            (None, None) => Ok(Probe::Other("an unknown signature".into())),
        },
        Some(2) => Ok(Probe::Blank),
        _ => Err(Status::unavailable(format!(
            "blkid could not probe {} ({}): {}; not formatting it",
            dev.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Makes a file system. No discard: a new Torus volume reads as zeroes already.
pub fn mkfs(dev: &Path, fs_type: &str) -> Result<(), Status> {
    let mut cmd = match fs_type {
        "ext4" => {
            let mut c = Command::new("mkfs.ext4");
            c.args(["-F", "-q", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"]);
            c
        }
        "xfs" => {
            let mut c = Command::new("mkfs.xfs");
            c.args(["-q", "-K"]);
            c
        }
        other => return Err(Status::invalid_argument(format!("cannot make a {other} file system"))),
    };
    run(cmd.arg(dev)).map(drop)
}

/// Grows the file system on `dev`, mounted at `mount_point`, to fill the device (online).
pub fn grow_fs(dev: &Path, mount_point: &Path, fs_type: &str) -> Result<(), Status> {
    match fs_type {
        "ext4" => run(Command::new("resize2fs").arg(dev)).map(drop).map_err(|e| {
            if e.message().contains("Permission denied") {
                Status::internal(format!(
                    "{} (online growth of ext4 needs CAP_SYS_RESOURCE: run the node plugin privileged)",
                    e.message()
                ))
            } else {
                e
            }
        }),
        "xfs" => run(Command::new("xfs_growfs").arg(mount_point)).map(drop),
        other => Err(Status::invalid_argument(format!("cannot grow a {other} file system"))),
    }
}

/// Mount options for a file system staged read-only: never replay a journal
/// (that would write to a device other hosts may read); xfs also ignores
/// its UUID, since another read-only mount of the same file system may exist.
pub fn read_only_options(fs_type: &str) -> Vec<String> {
    match fs_type {
        "ext4" => vec!["ro".into(), "noload".into()],
        "xfs" => vec!["ro".into(), "norecovery".into(), "nouuid".into()],
        _ => vec!["ro".into()],
    }
}

/// Bytes and inodes of the file system mounted at `path`.
pub fn usage(path: &Path) -> Result<(u64, u64, u64, u64, u64, u64), Status> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Status::invalid_argument("volume_path holds a NUL byte"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Status::internal(format!("statvfs {}: {}", path.display(), std::io::Error::last_os_error())));
    }
    let bs = st.f_frsize as u64;
    let (total, free, avail) = (st.f_blocks as u64 * bs, st.f_bfree as u64 * bs, st.f_bavail as u64 * bs);
    let (itotal, ifree) = (st.f_files as u64, st.f_ffree as u64);
    Ok((total, avail, total - free, itotal, ifree, itotal - ifree))
}

/// The device number of a block device node (following bind mounts), if `path` is one.
pub fn rdev(path: &Path) -> Option<u64> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(path).ok()?;
    md.file_type().is_block_device().then(|| md.rdev())
}

/// The size in bytes of a block device (BLKGETSIZE64).
pub fn device_size(dev: &Path) -> Result<u64, Status> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dev).map_err(|e| Status::internal(format!("opening {}: {e}", dev.display())))?;
    let mut size: u64 = 0;
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size) } != 0 {
        return Err(Status::internal(format!("size of {}: {}", dev.display(), std::io::Error::last_os_error())));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 7:3 / /var/lib/kubelet/x rw,relatime shared:9 - ext4 /dev/loop3 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[1].options, "rw,relatime");
    }

    #[test]
    fn a_missing_device_is_never_called_blank() {
        let e = probe(Path::new("/nonexistent/device"), 1 << 30).expect_err("must not probe");
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }
}
