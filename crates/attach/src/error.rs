//! The attach layer's errors. The CSI node service maps each to a gRPC code.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AttachError {
    #[error("volume {volume:?} does not exist")]
    VolumeNotFound { volume: String },
    #[error("volume {volume:?} is in use elsewhere: {holder}")]
    InUse { volume: String, holder: String },
    #[error("volume {volume:?} is already attached here {how}")]
    Incompatible { volume: String, how: String },
    #[error("{device} of volume {volume:?} is still in use (mounted or open): not detaching it")]
    DeviceBusy { volume: String, device: String },
    #[error("volume {volume:?}: the cluster cannot be reached: {reason}")]
    Unavailable { volume: String, reason: String },
    #[error("attaching volume {volume:?} failed: {reason}")]
    Failed { volume: String, reason: String },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("`{command}` failed: {output}")]
    Command { command: String, output: String },
}

impl AttachError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AttachError {
        let what = what.into();
        move |source| AttachError::Io { what, source }
    }
}
