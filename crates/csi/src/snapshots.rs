//! CSI snapshots and clones: CreateSnapshot, DeleteSnapshot, ListSnapshots,
//! and CreateVolume from a snapshot or from a volume.
//!
//! - A CSI snapshot id is `VOLUME@SNAPSHOT`; CreateSnapshot's `name` is the
//!   Torus snapshot's name. CSI names are unique across volumes, so a name
//!   taken on another volume answers ALREADY_EXISTS.
//! - The snapshot is taken by the volume's writer between two writes after
//!   a flush (the keeper holding it, asked through the metadata store), or,
//!   if nobody has the volume open, by a writer this plugin opens for it.
//! - A volume from a snapshot is a clone of it (instant, copy-on-write). A
//!   volume from a volume is a clone of a snapshot of it named
//!   `clone-source-of-<new volume>`, deleted once the clone exists.
//! - A snapshot can be deleted while clones of it exist (they keep the data
//!   they read through); a volume with snapshots cannot (FAILED_PRECONDITION,
//!   the provisioner retries).

use crate::pb::*;
use crate::{need, status};
use std::time::Duration;
use tonic::Status;
use torus_meta::cluster::{parse_snapshot_ref, Cluster, ClusterError, SnapshotInfo, VolumeInfo};
use torus_volume::{ManagerOptions, VolumeError, VolumeManager};

/// How long CreateSnapshot waits for a volume's writer to take it.
const WRITER_WAIT: Duration = Duration::from_secs(30);
/// The snapshot a clone of a volume is made from.
const CLONE_SOURCE: &str = "clone-source-of-";

pub(crate) fn snapshot_message(s: &SnapshotInfo) -> Snapshot {
    Snapshot {
        size_bytes: s.size as i64,
        snapshot_id: s.full_name(),
        source_volume_id: s.volume_name.clone(),
        creation_time: Some(prost_types::Timestamp { seconds: s.created as i64, nanos: 0 }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

fn volume_status(e: VolumeError) -> Status {
    match e {
        VolumeError::Cluster(c) => status::cluster(c),
        e @ VolumeError::ReadOnly => Status::failed_precondition(e.to_string()),
        e @ VolumeError::NoSpace { .. } => Status::resource_exhausted(e.to_string()),
        e => Status::unavailable(e.to_string()),
    }
}

/// Opens writers for snapshots of volumes nobody has open.
pub(crate) fn manager(cluster: &Cluster) -> VolumeManager {
    VolumeManager::new(
        cluster.clone(),
        ManagerOptions {
            lock_wait: WRITER_WAIT,
            holder: format!(
                "torusblk csi controller on {} (pid {})",
                torus_volume::holder::hostname(),
                std::process::id()
            ),
            // Snapshots need no key: no data is read.
            without_key: true,
            ..Default::default()
        },
    )
}

/// Takes (or finds, if the same request came before) snapshot `name` of `volume`.
pub(crate) async fn create(cluster: &Cluster, name: &str, volume: &str) -> Result<SnapshotInfo, Status> {
    need("name", name)?;
    need("source_volume_id", volume)?;
    torus_meta::cluster::validate_snapshot_name(name).map_err(status::cluster)?;
    for s in cluster.snapshots(None).await.map_err(status::cluster)? {
        if s.name == name {
            if s.volume_name == volume {
                return Ok(s);
            }
            return Err(Status::already_exists(format!(
                "snapshot name {name:?} is taken by a snapshot of volume {:?}",
                s.volume_name
            )));
        }
    }
    let m = manager(cluster);
    let res = m.snapshot(volume, name, WRITER_WAIT).await;
    m.close_all().await;
    match res {
        Ok(s) => {
            tracing::info!(snapshot = %s.full_name(), "snapshot taken");
            Ok(s)
        }
        // The same request, taken meanwhile by a retry.
        Err(VolumeError::Cluster(ClusterError::SnapshotExists { .. })) => {
            cluster.snapshot(volume, name).await.map_err(status::cluster)
        }
        Err(e) => Err(volume_status(e)),
    }
}

/// Deletes a snapshot by id; an id that names none is deleted already.
pub(crate) async fn delete(cluster: &Cluster, id: &str) -> Result<(), Status> {
    need("snapshot_id", id)?;
    let Ok((volume, name)) = parse_snapshot_ref(id) else { return Ok(()) };
    let snap = match cluster.delete_snapshot(&volume, &name).await {
        Ok(s) => s,
        Err(ClusterError::SnapshotNotFound { .. } | ClusterError::VolumeNotFound { .. }) => return Ok(()),
        Err(e) => return Err(status::cluster(e)),
    };
    tracing::info!(snapshot = %id, "snapshot deleted");
    let m = manager(cluster);
    if let Err(e) = m.reclaim_snapshot(&snap).await {
        tracing::warn!(snapshot = %id, error = %e, "could not free the blocks only it used now");
    }
    m.close_all().await;
    Ok(())
}

pub(crate) async fn list(cluster: &Cluster, req: &ListSnapshotsRequest) -> Result<ListSnapshotsResponse, Status> {
    let after = crate::controller::page_start(req.max_entries, &req.starting_token, "ListSnapshots")?;
    let mut all: Vec<SnapshotInfo> = cluster
        .snapshots(None)
        .await
        .map_err(status::cluster)?
        .into_iter()
        .filter(|s| req.snapshot_id.is_empty() || s.full_name() == req.snapshot_id)
        .filter(|s| req.source_volume_id.is_empty() || s.volume_name == req.source_volume_id)
        .collect();
    all.sort_by_key(|s| s.full_name());
    let rest: Vec<&SnapshotInfo> = all.iter().filter(|s| after.is_none_or(|a| s.full_name().as_str() > a)).collect();
    let take = if req.max_entries == 0 { rest.len() } else { (req.max_entries as usize).min(rest.len()) };
    let entries =
        rest[..take].iter().map(|s| list_snapshots_response::Entry { snapshot: Some(snapshot_message(s)) }).collect();
    let next_token = if take < rest.len() {
        format!("{}{}", crate::controller::TOKEN_PREFIX, rest[take - 1].full_name())
    } else {
        String::new()
    };
    Ok(ListSnapshotsResponse { entries, next_token })
}

/// Creates volume `name` of `size` bytes (at least the source's) from a
/// content source; the same request again finds it.
pub(crate) async fn create_volume_from(
    cluster: &Cluster,
    name: &str,
    size: u64,
    limit: u64,
    source: &volume_content_source::Type,
    encrypted: bool,
) -> Result<VolumeInfo, Status> {
    // Checked before anything is made: a copy keeps its source's encryption.
    let plain_source = |what: &str| {
        Status::invalid_argument(format!(
            "parameter encrypted=true, but the source {what} is not encrypted (a copy keeps its source's encryption)"
        ))
    };
    let snap = match source {
        volume_content_source::Type::Snapshot(s) => {
            need("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?;
            let (vol, snap) = parse_snapshot_ref(&s.snapshot_id)
                .map_err(|_| Status::not_found(format!("snapshot {:?} does not exist", s.snapshot_id)))?;
            cluster.snapshot(&vol, &snap).await.map_err(|e| match e {
                ClusterError::VolumeNotFound { .. } | ClusterError::SnapshotNotFound { .. } => {
                    Status::not_found(format!("snapshot {:?} does not exist", s.snapshot_id))
                }
                e => status::cluster(e),
            })?
        }
        volume_content_source::Type::Volume(v) => {
            need("volume_content_source.volume.volume_id", &v.volume_id)?;
            if encrypted && cluster.volume(&v.volume_id).await.is_ok_and(|i| i.encryption.is_none()) {
                return Err(plain_source(&format!("volume {:?}", v.volume_id)));
            }
            return clone_of_volume(cluster, name, size, limit, &v.volume_id).await;
        }
    };
    if encrypted && snap.encryption.is_none() {
        return Err(plain_source(&format!("snapshot {:?}", snap.full_name())));
    }
    finish_clone(cluster, name, size, limit, &snap).await
}

/// Clones `snap` into `name`, grown to `size` if that is larger.
async fn finish_clone(
    cluster: &Cluster,
    name: &str,
    size: u64,
    limit: u64,
    snap: &SnapshotInfo,
) -> Result<VolumeInfo, Status> {
    let size = size.max(snap.size);
    if limit > 0 && size > limit {
        return Err(Status::out_of_range(format!(
            "the source holds {} bytes, more than limit_bytes {limit}",
            snap.size
        )));
    }
    let info = match cluster.clone_volume(&snap.volume_name, &snap.name, name).await {
        Ok(info) => info,
        Err(ClusterError::VolumeExists { .. }) => {
            let info = cluster.volume(name).await.map_err(status::cluster)?;
            if info.layers.get(1..) != Some(&snap.layers[..]) {
                return Err(Status::already_exists(format!(
                    "volume {name:?} exists and was not made from {}",
                    snap.full_name()
                )));
            }
            info
        }
        Err(e) => return Err(status::cluster(e)),
    };
    let info = if info.size < size { cluster.grow_volume(name, size).await.map_err(status::cluster)? } else { info };
    tracing::info!(volume = %name, source = %snap.full_name(), size = info.size, "volume created from a snapshot");
    Ok(info)
}

/// A volume from a volume: a clone of a snapshot taken for it, which goes
/// once the clone exists. The same request again finds the clone (its
/// first frozen layer is one of the source's).
async fn clone_of_volume(
    cluster: &Cluster,
    name: &str,
    size: u64,
    limit: u64,
    source: &str,
) -> Result<VolumeInfo, Status> {
    let src = cluster.volume(source).await.map_err(|e| match e {
        ClusterError::VolumeNotFound { .. } => Status::not_found(format!("volume {source:?} does not exist")),
        e => status::cluster(e),
    })?;
    if let Ok(info) = cluster.volume(name).await {
        if !info.layers.get(1).is_some_and(|l| src.chain().contains(l)) {
            return Err(Status::already_exists(format!("volume {name:?} exists and was not made from {source:?}")));
        }
        return Ok(info);
    }
    let snapshot = format!("{CLONE_SOURCE}{name}");
    let snap = create(cluster, &snapshot, source).await?;
    let res = finish_clone(cluster, name, size, limit, &snap).await;
    if let Err(e) = cluster.delete_snapshot(&snap.volume_name, &snap.name).await {
        tracing::warn!(snapshot = %snap.full_name(), error = %e, "could not delete the snapshot a clone was made from");
    }
    res
}
