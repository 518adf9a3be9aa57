//! What a keeper leaves on disk so that a restarted (or upgraded) node plugin
//! finds its attachments again: `<state dir>/attach/<volume>/keeper.json`,
//! written atomically once the device is ready and removed when the keeper
//! has detached.
//!
//! Whether a keeper is alive is told by `keeper.lock`: the keeper holds an
//! exclusive `flock` on it from its first step to its exit (the kernel drops
//! it when the process dies, however it dies). A locked file with no record is
//! a keeper still starting; an unlocked one, whatever the record says, a dead
//! keeper whose leftovers may be cleaned up.

use crate::AttachError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeeperRecord {
    pub volume: String,
    pub pid: u32,
    /// The local block device serving the volume (`/dev/loopN`, `/dev/nbdN`).
    pub device: PathBuf,
    /// Bytes, as the device shows them.
    pub size: u64,
    pub read_only: bool,
    /// `fuse` (FUSE file + loop device) or `nbd` (kernel NBD).
    pub backend: String,
    /// The writer's epoch (0 for read-only attachments).
    pub epoch: u64,
    /// Set when the attachment can no longer serve as it should (the
    /// writer's lease was lost: writes fail until the volume is staged again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

pub const RECORD: &str = "keeper.json";
pub const LOG: &str = "keeper.log";
pub const LOCK: &str = "keeper.lock";

/// What is known of a volume's keeper from its directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeeperState {
    /// Alive and serving: its record.
    Ready(KeeperRecord),
    /// Alive, not ready yet (opening the volume, waiting for a lock, mounting).
    Starting,
    /// No keeper runs for it (never started, detached, or dead).
    Dead,
}

/// Takes the keeper lock of `dir` (blocking until a momentary holder lets go); held while the file lives.
pub fn hold_lock(dir: &Path) -> Result<std::fs::File, AttachError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK))
        .map_err(AttachError::io(format!("opening {}", dir.join(LOCK).display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(AttachError::io(format!("locking {}", dir.join(LOCK).display()))(std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// Whether a keeper holds `dir`'s lock now.
pub fn locked(dir: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = std::fs::OpenOptions::new().write(true).open(dir.join(LOCK)) else { return false };
    // SAFETY: flock on a descriptor we own; released again at once (and when f closes).
    let got = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if got {
        // SAFETY: as above.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
    }
    !got
}

/// The state of the keeper of `dir`.
pub fn keeper_state(dir: &Path) -> KeeperState {
    if !locked(dir) {
        return KeeperState::Dead;
    }
    match KeeperRecord::load(dir) {
        Some(r) => KeeperState::Ready(r),
        None => KeeperState::Starting,
    }
}

/// The directory of one volume's attachment.
pub fn attach_dir(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir.join("attach").join(volume)
}

impl KeeperRecord {
    pub fn load(dir: &Path) -> Option<KeeperRecord> {
        let bytes = std::fs::read(dir.join(RECORD)).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "ignoring an unreadable keeper record");
                None
            }
        }
    }

    /// Writes the record atomically (temporary file, fsync, rename, fsync of the directory).
    pub fn store(&self, dir: &Path) -> Result<(), AttachError> {
        use std::io::Write;
        let tmp = dir.join(format!("{RECORD}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(AttachError::io(format!("writing {}", tmp.display())))?;
        f.write_all(&serde_json::to_vec_pretty(self).expect("records serialise"))
            .and_then(|_| f.sync_all())
            .map_err(AttachError::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, dir.join(RECORD)).map_err(AttachError::io(format!("renaming {}", tmp.display())))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(AttachError::io(format!("syncing {}", dir.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(read_only: bool) -> KeeperRecord {
        KeeperRecord {
            volume: "v".into(),
            pid: std::process::id(),
            device: "/dev/loop7".into(),
            size: 1 << 30,
            read_only,
            backend: "fuse".into(),
            epoch: if read_only { 0 } else { 42 },
            problem: None,
        }
    }

    #[test]
    fn a_record_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rec = record(false);
        rec.store(dir.path()).expect("store");
        assert_eq!(KeeperRecord::load(dir.path()).expect("load"), rec);
    }

    #[test]
    fn the_lock_tells_a_live_keeper_a_starting_one_and_a_dead_one_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(keeper_state(dir.path()), KeeperState::Dead, "no lock file");
        let held = hold_lock(dir.path()).expect("lock");
        assert!(locked(dir.path()));
        assert_eq!(keeper_state(dir.path()), KeeperState::Starting, "locked, no record yet");
        let rec = record(true);
        rec.store(dir.path()).expect("store");
        assert_eq!(keeper_state(dir.path()), KeeperState::Ready(rec.clone()));
        drop(held);
        assert_eq!(keeper_state(dir.path()), KeeperState::Dead, "a record without its lock is a dead keeper's");
    }
}
