//! Writer epochs per volume: the newest epoch this node has seen, kept on disk.
//!
//! A write carrying an older epoch is refused. Writes hold the volume's fence
//! for reading while they run; raising it takes it for writing, so no write
//! of the old epoch can land after the first write of the new one.

use crate::{Result, StoreError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use torus_types::{Epoch, VolumeId};

pub(crate) struct Fences {
    dir: PathBuf,
    map: Mutex<HashMap<VolumeId, Arc<RwLock<Epoch>>>>,
}

impl Fences {
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::io("create", &dir, e))?;
        Ok(Fences { dir, map: Mutex::new(HashMap::new()) })
    }

    fn path(&self, vol: VolumeId) -> PathBuf {
        self.dir.join(vol.to_string())
    }

    pub fn get(&self, vol: VolumeId) -> Result<Arc<RwLock<Epoch>>> {
        let mut map = self.map.lock().expect("fence map poisoned");
        if let Some(f) = map.get(&vol) {
            return Ok(f.clone());
        }
        let path = self.path(vol);
        let epoch = match std::fs::read_to_string(&path) {
            Ok(s) => Epoch(s.trim().parse().map_err(|_| {
                StoreError::io(
                    "parse",
                    &path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "epoch file is not a number"),
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Epoch(0),
            Err(e) => return Err(StoreError::io("read", &path, e)),
        };
        let f = Arc::new(RwLock::new(epoch));
        map.insert(vol, f.clone());
        Ok(f)
    }

    /// Raises the volume's epoch to `epoch` (durably) if it is newer.
    pub fn raise(&self, vol: VolumeId, epoch: Epoch) -> Result<Epoch> {
        let f = self.get(vol)?;
        let mut cur = f.write().expect("fence poisoned");
        if epoch > *cur {
            write_durably(&self.dir, &self.path(vol), epoch.0.to_string().as_bytes())?;
            *cur = epoch;
        }
        Ok(*cur)
    }

    pub fn forget(&self, vol: VolumeId) {
        self.map.lock().expect("fence map poisoned").remove(&vol);
        let _ = std::fs::remove_file(self.path(vol));
    }
}

/// Writes a small file atomically and durably: temp file, fsync, rename, fsync the directory.
pub(crate) fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| StoreError::io("create", &tmp, e))?;
    f.write_all(bytes).map_err(|e| StoreError::io("write", &tmp, e))?;
    f.sync_all().map_err(|e| StoreError::io("fsync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| StoreError::io("rename", path, e))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StoreError::io("fsync", dir, e))
}
