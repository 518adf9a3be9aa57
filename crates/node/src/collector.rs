//! Returning the space of what was deleted: every so often, each node
//! deletes the layers it stores that no volume or snapshot uses any more
//! (deleted volumes and snapshots, a restored volume's old layers), also
//! those deleted while the node was down. An id at or above the id counter
//! read *before* the list of layers in use may be a layer just made: kept.
//! The counter only grows and every transaction that makes or drops a layer
//! keeps it listed throughout, so a layer in use is never taken for garbage.
//!
//! A pass reads etcd only if something that lists layers changed since the
//! last one (the cluster view's layer generation: a volume or snapshot
//! record, or the id counter; or the view was read anew) or this node now
//! stores a layer it did not at the last pass — an idle cluster's collectors
//! cost etcd nothing.

use crate::error::NodeError;
use std::sync::Arc;
use std::time::Duration;
use torus_meta::cluster::Cluster;
use torus_store::Store;
use torus_types::VolumeId;

pub struct Collector {
    pub cluster: Cluster,
    pub store: Arc<Store>,
    pub interval: Duration,
}

impl Collector {
    pub async fn run(self) {
        let view = self.cluster.view();
        // The view's generation and the layers stored here at the last good pass.
        let mut done: Option<(u64, Vec<VolumeId>)> = None;
        loop {
            tokio::time::sleep(self.interval).await;
            let now = match (view.read(|s| s.layers_generation).await, self.store.volumes()) {
                (Ok(g), Ok(local)) => (g, local),
                (Err(e), _) => {
                    tracing::debug!(error = %e, "cannot collect deleted layers now");
                    continue;
                }
                (_, Err(e)) => {
                    tracing::debug!(error = %e, "cannot list the layers stored here");
                    continue;
                }
            };
            if done.as_ref().is_some_and(|(g, local)| *g == now.0 && now.1.iter().all(|l| local.contains(l))) {
                continue;
            }
            match self.collect().await {
                Ok(_) => done = Some(now),
                Err(e) => tracing::debug!(error = %e, "cannot collect deleted layers now"),
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
