//! The volume layer's errors; the NBD server maps each to an errno.

use thiserror::Error;
use torus_meta::cluster::ClusterError;
use torus_types::ExtentId;

#[derive(Debug, Error)]
pub enum VolumeError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("range {offset}+{len} is outside the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the volume is open read-only")]
    ReadOnly,
    #[error("no storage node is in the ring: add nodes with `torusctl peer add --all-peers`")]
    NoNodes,
    #[error("extent {extent}: no replica could serve the request: {reason}")]
    Unavailable { extent: ExtentId, reason: String },
    #[error("extent {extent}: node refused the write: {reason}")]
    Refused { extent: ExtentId, reason: String },
    #[error("no space left on a node holding extent {extent}: {reason}")]
    NoSpace { extent: ExtentId, reason: String },
    #[error("this writer was fenced: a newer writer holds the volume ({reason})")]
    Fenced { reason: String },
    #[error("the writer's lease was lost; the volume refuses writes until reopened")]
    LeaseLost,
    #[error("cannot take the snapshot: {reason}")]
    Snapshot { reason: String },
    #[error(transparent)]
    Key(#[from] crate::crypt::KeyError),
}

impl VolumeError {
    /// The Linux errno a local block-device front end (FUSE) answers with.
    pub fn errno(&self) -> i32 {
        match self {
            VolumeError::OutOfRange { .. } => libc_errno::EINVAL,
            VolumeError::ReadOnly => libc_errno::EROFS,
            VolumeError::NoSpace { .. } => libc_errno::ENOSPC,
            _ => libc_errno::EIO,
        }
    }
}

/// The few Linux errno values used above (the crate does not link libc).
mod libc_errno {
    pub const EIO: i32 = 5;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
}
