//! The metadata layer's error type. No backend's own error type leaks out.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum MetaError {
    /// The store could not be reached or did not answer in time.
    #[error("metadata store at {endpoint} is unreachable: {reason}")]
    Unavailable { endpoint: String, reason: String },
    /// A lease expired or was revoked.
    #[error("lease {lease:x} not found (expired or revoked)")]
    LeaseNotFound { lease: i64 },
    /// A stored value could not be decoded.
    #[error("metadata key {key} holds a malformed value: {reason}")]
    Corrupt { key: String, reason: String },
    /// The backend refused the request (a bug or a misconfiguration).
    #[error("metadata store error: {reason}")]
    Backend { reason: String },
}

impl MetaError {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, MetaError::Unavailable { .. })
    }
}
