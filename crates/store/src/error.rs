//! The local store's errors.

use std::path::PathBuf;
use thiserror::Error;
use torus_types::{Epoch, ExtentId, VolumeId};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("checksum mismatch in extent {extent} block {block}: stored data is corrupt")]
    Checksum { extent: ExtentId, block: u64 },
    #[error("extent {extent} metadata is corrupt: {reason}")]
    CorruptTable { extent: ExtentId, reason: String },
    #[error("no space left: {used} of {capacity} bytes used")]
    NoSpace { used: u64, capacity: u64 },
    #[error("write to volume {volume} with epoch {epoch} refused: epoch {current} has been seen")]
    Fenced { volume: VolumeId, epoch: Epoch, current: Epoch },
    #[error("range {offset}+{len} is outside an extent (at most {max} bytes)")]
    OutOfRange { offset: u64, len: u64, max: u64 },
    #[error("extent {extent} has blocks this node has not received yet")]
    Absent { extent: ExtentId },
    #[error("the store failed earlier ({reason}) and refuses writes until restarted")]
    Failed { reason: String },
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        StoreError::Io { op, path: path.to_path_buf(), source }
    }
}
