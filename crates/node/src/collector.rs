//! Returning the space of what was deleted: every so often, each node
//! deletes the layers it stores that no volume or snapshot uses any more
//! (deleted volumes and snapshots, a restored volume's old layers), also
//! those deleted while the node was down. An id at or above the id counter
//! read *before* the list of layers in use may be a layer just made: kept.
//! The counter only grows and every transaction that makes or drops a layer
//! keeps it listed throughout, so a layer in use is never taken for garbage.

use crate::error::NodeError;
use std::sync::Arc;
use std::time::Duration;
use torus_meta::cluster::Cluster;
use torus_store::Store;

pub struct Collector {
    pub cluster: Cluster,
    pub store: Arc<Store>,
    pub interval: Duration,
}

impl Collector {
    pub async fn run(self) {
        loop {
            tokio::time::sleep(self.interval).await;
            if let Err(e) = self.collect().await {
                tracing::debug!(error = %e, "cannot collect deleted layers now");
            }
        }
    }

    /// One pass: returns the layers deleted and the bytes they held.
    pub async fn collect(&self) -> Result<(usize, u64), NodeError> {
        let (next, used) = self.cluster.referenced_layers().await?;
        let (mut layers, mut bytes) = (0, 0);
        for vol in self.store.volumes()? {
            if vol.0 >= next || used.contains(&vol) {
                continue;
            }
            let store = self.store.clone();
            let freed = tokio::task::spawn_blocking(move || store.delete_volume(vol))
                .await
                .map_err(|e| NodeError::from(format!("collector task: {e}")))??;
            tracing::info!(layer = %vol, bytes = freed, "deleted the data of a volume or snapshot nobody uses");
            layers += 1;
            bytes += freed;
        }
        Ok((layers, bytes))
    }
}
