//! The node's error type: what its background work (rebalance, scrub,
//! capacity marks) can fail with. Each loop logs it once, where it retries.

use thiserror::Error;
use torus_meta::cluster::ClusterError;
use torus_proto::PeerError;
use torus_store::StoreError;

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// A step that cannot go on for a reason of its own (named in the text).
    #[error("{0}")]
    Blocked(String),
}

impl From<&str> for NodeError {
    fn from(reason: &str) -> Self {
        NodeError::Blocked(reason.to_string())
    }
}

impl From<String> for NodeError {
    fn from(reason: String) -> Self {
        NodeError::Blocked(reason)
    }
}
