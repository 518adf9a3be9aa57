//! The typed cluster schema: what Torus keeps in the metadata store, and the
//! operations on it. Every key is relative to the store's prefix:
//!
//! | key                    | value (JSON)   | lifetime                          |
//! |------------------------|----------------|-----------------------------------|
//! | `cluster/config`       | [`ClusterConfig`] | written once by `torusctl init` |
//! | `peers/<node uuid>`    | [`PeerInfo`]   | on the node's lease (heartbeats)   |
//! | `ring`                 | [`RingDoc`]    | versioned, changed by CAS          |
//! | `volumes/next-id`      | decimal u64    | counter, CAS-incremented           |
//! | `volumes/by-name/<n>`  | [`VolumeInfo`] | until `volume delete`              |
//! | `locks/<volume id>`    | [`VolumeLock`] | on the writer's lease              |
//! | `wanted/<volume id>`   | the waiter's name | on a waiting client's lease: a repairer holding the lock yields |
//! | `rebalance/<node uuid>`| [`RebalanceProgress`] | rewritten per ring version  |
//! | `vstate/<volume id>`   | [`ReplicaState`] | by the writer: write intent, copies to catch up |
//! | `hosts/<host id>`      | [`HostInfo`]   | on the host's lease (a CSI node plugin) |
//! | `attachments/<volume name>` | [`Attachments`] | hosts a volume is published to |
//! | `snapshots/<volume id>/<name>` | [`SnapshotInfo`] | until `snapshot delete` |
//! | `snapreq/<volume id>/<name>` | [`SnapshotRequest`] | on the asker's lease, until the writer answers |
//!
//! Nothing here is per extent or per I/O: metadata grows with nodes and volumes
//! only (`vstate` holds extent ranges, but only those recently written or missed).

mod attachments;
mod error;
mod health;
mod keys;
mod peers;
mod replicas;
mod ring_watch;
mod snapshots;
mod view;
mod volumes;

pub use attachments::{AttachMode, Attachments, HostInfo};
pub use error::ClusterError;
pub use health::{Health, Rebalance, Repairing, StatusReport};
pub use peers::{PeerInfo, QueuedChange, RebalanceProgress, RingDoc, RingMember};
pub use replicas::{ExtentSet, ReplicaState};
pub use ring_watch::RingWatch;
pub use snapshots::{parse_snapshot_ref, validate_snapshot_name, LayerMap, SnapshotInfo, SnapshotRequest};
pub use view::{ClusterView, ViewPhase, ViewState};
pub use volumes::{validate_volume_name, Encryption, ProcessTag, RewrapError, VolumeInfo, VolumeLock, MAX_VOLUME_SIZE};

use crate::{MetaError, MetadataStore};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::sync::Arc;

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

pub const DEFAULT_EXTENT_SIZE: u64 = 4 << 20;
pub const DEFAULT_REPLICATION: u32 = 2;

/// Cluster-wide settings, written by `torusctl init`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Bytes per extent (the unit of placement); a power of two, at least 64 KiB.
    pub extent_size: u64,
    /// Default number of copies of each extent.
    pub replication: u32,
    /// Format version of the metadata layout.
    pub format: u32,
    /// Seconds a ring member may be down before it is taken out of the ring
    /// and its extents are copied back up to R from the other replicas (0: never).
    #[serde(default = "default_down_out")]
    pub down_out_secs: u64,
}

pub const DEFAULT_DOWN_OUT_SECS: u64 = 600;

fn default_down_out() -> u64 {
    DEFAULT_DOWN_OUT_SECS
}

impl ClusterConfig {
    pub fn validate(&self) -> Result<()> {
        if !self.extent_size.is_power_of_two() || self.extent_size < (64 << 10) || self.extent_size > (1 << 30) {
            return Err(ClusterError::InvalidConfig {
                reason: format!("extent size {} must be a power of two from 64 KiB to 1 GiB", self.extent_size),
            });
        }
        if !(1..=16).contains(&self.replication) {
            return Err(ClusterError::InvalidConfig {
                reason: format!("replication {} must be between 1 and 16", self.replication),
            });
        }
        Ok(())
    }
}

/// Typed access to the cluster's metadata.
#[derive(Clone)]
pub struct Cluster {
    store: Arc<dyn MetadataStore>,
    /// This process's followed copy of the shared state, started on first use.
    view: Arc<std::sync::OnceLock<ClusterView>>,
}

pub(crate) fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value)
        .map_err(|e| ClusterError::Meta(MetaError::Corrupt { key: key.to_string(), reason: e.to_string() }))
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("metadata types serialise to JSON")
}

impl Cluster {
    pub fn new(store: Arc<dyn MetadataStore>) -> Self {
        Cluster { store, view: Arc::default() }
    }

    /// The process's live view of the shared state (started by the first
    /// caller, shared by every clone of this `Cluster`): what background
    /// loops follow instead of reading the store again and again.
    pub fn view(&self) -> ClusterView {
        self.view.get_or_init(|| ClusterView::start(self.store.clone())).clone()
    }

    pub fn store(&self) -> &Arc<dyn MetadataStore> {
        &self.store
    }

    /// Formats the cluster's metadata. Refuses if it is already initialised.
    pub async fn init(&self, config: &ClusterConfig) -> Result<()> {
        config.validate()?;
        let txn = crate::Txn::when(vec![crate::Compare::exists("cluster/config", false)])
            .and_then(vec![crate::TxnOp::put("cluster/config", encode(config))]);
        if !self.store.txn(txn).await?.succeeded {
            return Err(ClusterError::AlreadyInitialized { endpoint: self.store.endpoint() });
        }
        Ok(())
    }

    /// Sets the default replication of new volumes.
    pub async fn set_replication(&self, replication: u32) -> Result<ClusterConfig> {
        self.update_config(|c| c.replication = replication).await
    }

    /// Sets how long a ring member may be down before it is taken out (0: never).
    pub async fn set_down_out(&self, secs: u64) -> Result<ClusterConfig> {
        self.update_config(|c| c.down_out_secs = secs).await
    }

    async fn update_config(&self, change: impl Fn(&mut ClusterConfig)) -> Result<ClusterConfig> {
        loop {
            let kv = self
                .store
                .get("cluster/config")
                .await?
                .ok_or_else(|| ClusterError::NotInitialized { endpoint: self.store.endpoint() })?;
            let mut config: ClusterConfig = decode(&kv.key, &kv.value)?;
            change(&mut config);
            config.validate()?;
            let txn = crate::Txn::when(vec![crate::Compare::mod_revision("cluster/config", kv.mod_revision)])
                .and_then(vec![crate::TxnOp::put("cluster/config", encode(&config))]);
            if self.store.txn(txn).await?.succeeded {
                return Ok(config);
            }
        }
    }

    pub async fn config(&self) -> Result<ClusterConfig> {
        match self.store.get("cluster/config").await? {
            Some(kv) => decode(&kv.key, &kv.value),
            None => Err(ClusterError::NotInitialized { endpoint: self.store.endpoint() }),
        }
    }
}
