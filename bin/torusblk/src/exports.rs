//! The NBD exports: every block volume, by name, and every snapshot as
//! `VOLUME@SNAPSHOT` (always read-only), opened through the volume manager.

use std::sync::Arc;
use torus_meta::cluster::ClusterError;
use torus_nbd::{ExportError, ExportInfo, Exports};
use torus_volume::measured::{Measured, VolumeStats};
use torus_volume::{Volume, VolumeError, VolumeManager};

pub struct VolumeExports {
    pub manager: Arc<VolumeManager>,
    pub read_only: bool,
    /// Each connection's requests are counted and timed, by volume.
    pub stats: Arc<VolumeStats>,
}

fn export_error(e: VolumeError) -> ExportError {
    match e {
        VolumeError::Cluster(
            ClusterError::VolumeNotFound { .. }
            | ClusterError::SnapshotNotFound { .. }
            | ClusterError::InvalidSnapshotName { .. },
        ) => ExportError::NotFound(e.to_string()),
        VolumeError::Cluster(ClusterError::VolumeLocked { .. }) => ExportError::Busy(e.to_string()),
        e => ExportError::Unavailable(e.to_string()),
    }
}

impl Exports for VolumeExports {
    type Device = Measured<Volume>;

    async fn list(&self) -> Result<Vec<String>, ExportError> {
        let vols = self.manager.list().await.map_err(export_error)?;
        let snaps = self.manager.cluster().snapshots(None).await.map_err(|e| export_error(e.into()))?;
        // A snapshot of a volume deleted and created again under its name is not reachable by name.
        let live: std::collections::HashMap<_, _> = vols.iter().map(|v| (v.id, v.name.clone())).collect();
        let snaps = snaps.into_iter().filter(|s| live.get(&s.volume) == Some(&s.volume_name)).map(|s| s.full_name());
        Ok(vols.iter().map(|v| v.name.clone()).chain(snaps).collect())
    }

    async fn describe(&self, name: &str) -> Result<ExportInfo, ExportError> {
        if let Some((vol, snap)) = name.split_once('@') {
            let s = self.manager.cluster().snapshot(vol, snap).await.map_err(|e| export_error(e.into()))?;
            return Ok(ExportInfo { size: s.size, read_only: true });
        }
        let v = self.manager.cluster().volume(name).await.map_err(|e| export_error(e.into()))?;
        Ok(ExportInfo { size: v.size, read_only: self.read_only })
    }

    async fn open(&self, name: &str) -> Result<Arc<Measured<Volume>>, ExportError> {
        if name.contains('@') {
            let v = self.manager.open(name, false).await.map_err(export_error)?;
            return Ok(Arc::new(self.stats.measure(name, v)));
        }
        let v = self.manager.open(name, !self.read_only).await.map_err(|e| {
            tracing::warn!(export = name, error = %e, "open refused");
            export_error(e)
        })?;
        // The volume may have grown since this process opened it (`torusctl
        // volume resize`): a new connection gets the size it has now.
        let info = self.manager.cluster().volume(name).await.map_err(|e| export_error(e.into()))?;
        v.grow(info.size);
        Ok(Arc::new(self.stats.measure(name, v)))
    }
}
