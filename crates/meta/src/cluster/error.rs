//! Errors of the typed cluster schema.

use crate::MetaError;
use thiserror::Error;
use torus_types::VolumeId;

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("the cluster at {endpoint} is not initialised: run `torusctl init` first")]
    NotInitialized { endpoint: String },
    #[error("the cluster at {endpoint} is already initialised")]
    AlreadyInitialized { endpoint: String },
    #[error("invalid cluster configuration: {reason}")]
    InvalidConfig { reason: String },
    #[error("volume {name:?} already exists")]
    VolumeExists { name: String },
    #[error("volume {name:?} does not exist")]
    VolumeNotFound { name: String },
    #[error("invalid volume name {name:?}: {reason}")]
    InvalidVolumeName { name: String, reason: String },
    #[error("invalid volume size {size}: {reason}")]
    InvalidVolumeSize { size: u64, reason: String },
    #[error("volume {name:?} (id {volume}) is held for writing by {holder}")]
    VolumeLocked { name: String, volume: VolumeId, holder: String },
    #[error("peer {peer:?} is not known: no registered node has that address or UUID")]
    UnknownPeer { peer: String },
    #[error("volume {volume}: the writer of epoch {epoch} no longer holds its lock")]
    LockLost { volume: VolumeId, epoch: torus_types::Epoch },
    #[error("the ring changed concurrently too many times; try again")]
    Contended,
    #[error("{reason}")]
    Refused { reason: String },
    #[error("snapshot {volume}@{name} already exists")]
    SnapshotExists { volume: String, name: String },
    #[error("snapshot {volume}@{name} does not exist")]
    SnapshotNotFound { volume: String, name: String },
    #[error("invalid snapshot {name:?}: {reason}")]
    InvalidSnapshotName { name: String, reason: String },
    #[error("volume {volume:?} has snapshots ({}): delete them first", snapshots.join(", "))]
    HasSnapshots { volume: String, snapshots: Vec<String> },
    #[error("host {host:?} is not registered: no live host attaches volumes under that id")]
    UnknownHost { host: String },
    #[error("volume {volume:?} is published exclusively to live host {host:?}")]
    AttachedElsewhere { volume: String, host: String },
    #[error("volume {volume:?} is already published to host {host:?} in another mode (read-only: {read_only})")]
    AttachedIncompatibly { volume: String, host: String, read_only: bool },
}

impl ClusterError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ClusterError::Meta(e) => e.is_retryable(),
            ClusterError::Contended => true,
            _ => false,
        }
    }
}
