//! What a keeper leaves on disk so that a restarted (or upgraded) node plugin
//! finds its attachments again: `<state dir>/attach/<volume>/keeper.json`,
//! written atomically once the device is ready and removed when the keeper
//! has detached. A record is trusted only while the process it names is
//! alive *and* started at the recorded time (pids are reused).

use crate::AttachError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeeperRecord {
    pub volume: String,
    pub pid: u32,
    /// The process's start time in clock ticks since boot (/proc/PID/stat field 22).
    pub start_time: u64,
    /// The local block device serving the volume (`/dev/loopN`, `/dev/nbdN`).
    pub device: PathBuf,
    /// Bytes, as the device shows them.
    pub size: u64,
    pub read_only: bool,
    /// `fuse` (FUSE file + loop device) or `nbd` (kernel NBD).
    pub backend: String,
    /// The writer's epoch (0 for read-only attachments).
    pub epoch: u64,
}

pub const RECORD: &str = "keeper.json";
pub const LOG: &str = "keeper.log";

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

    /// Writes the record atomically (temporary file, fsync, rename).
    pub fn store(&self, dir: &Path) -> Result<(), AttachError> {
        use std::io::Write;
        let tmp = dir.join(format!("{RECORD}.tmp"));
        let mut f = std::fs::File::create(&tmp).map_err(AttachError::io(format!("writing {}", tmp.display())))?;
        f.write_all(&serde_json::to_vec_pretty(self).expect("records serialise"))
            .and_then(|_| f.sync_all())
            .map_err(AttachError::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, dir.join(RECORD)).map_err(AttachError::io(format!("renaming {}", tmp.display())))
    }

    /// Whether the keeper this record names is still running.
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }
}

/// A process's start time (clock ticks since boot), if it exists and is not a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // rest starts at field 3 (state); start time is field 22.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_start_time_is_read_and_stable() {
        let me = std::process::id();
        let t = start_time(me).expect("our own /proc entry");
        assert_eq!(start_time(me), Some(t));
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn a_record_round_trips_and_names_a_live_process_only_with_the_right_start_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = std::process::id();
        let rec = KeeperRecord {
            volume: "v".into(),
            pid: me,
            start_time: start_time(me).expect("start time"),
            device: "/dev/loop7".into(),
            size: 1 << 30,
            read_only: false,
            backend: "fuse".into(),
            epoch: 42,
        };
        rec.store(dir.path()).expect("store");
        let back = KeeperRecord::load(dir.path()).expect("load");
        assert_eq!(back, rec);
        assert!(back.alive());
        assert!(!KeeperRecord { start_time: rec.start_time + 1, ..rec }.alive(), "a reused pid is not our keeper");
    }
}
