//! Our errors as gRPC statuses: the one place that decides which code a
//! caller sees (docs/csi.md has the table).

use tonic::Status;
use torus_attach::AttachError;
use torus_meta::cluster::ClusterError;
use torus_meta::MetaError;

pub fn cluster(e: ClusterError) -> Status {
    let msg = e.to_string();
    match e {
        ClusterError::VolumeNotFound { .. }
        | ClusterError::UnknownHost { .. }
        | ClusterError::SnapshotNotFound { .. } => Status::not_found(msg),
        ClusterError::VolumeExists { .. }
        | ClusterError::AttachedIncompatibly { .. }
        | ClusterError::SnapshotExists { .. } => Status::already_exists(msg),
        ClusterError::InvalidVolumeName { .. }
        | ClusterError::InvalidSnapshotName { .. }
        | ClusterError::InvalidVolumeSize { .. }
        | ClusterError::InvalidConfig { .. } => Status::invalid_argument(msg),
        ClusterError::VolumeLocked { .. }
        | ClusterError::AttachedElsewhere { .. }
        | ClusterError::NotInitialized { .. }
        | ClusterError::AlreadyInitialized { .. }
        | ClusterError::LockLost { .. }
        | ClusterError::HasSnapshots { .. } => Status::failed_precondition(msg),
        ClusterError::Refused { .. } => Status::resource_exhausted(msg),
        ClusterError::Contended => Status::aborted(msg),
        ClusterError::UnknownPeer { .. } => Status::internal(msg),
        ClusterError::Meta(m) => meta(m),
    }
}

pub fn meta(e: MetaError) -> Status {
    if e.is_retryable() {
        Status::unavailable(e.to_string())
    } else {
        Status::internal(e.to_string())
    }
}

pub fn attach(e: AttachError) -> Status {
    let msg = e.to_string();
    match e {
        AttachError::VolumeNotFound { .. } => Status::not_found(msg),
        AttachError::InUse { .. } | AttachError::DeviceBusy { .. } => Status::failed_precondition(msg),
        AttachError::Unavailable { .. } => Status::unavailable(msg),
        AttachError::Incompatible { .. } => Status::already_exists(msg),
        AttachError::Failed { .. } | AttachError::Io { .. } | AttachError::Command { .. } => Status::internal(msg),
    }
}
