//! The CSI Controller service: volumes in the cluster's metadata.
//!
//! - A CSI volume id is the Torus volume name (CreateVolume's `name`), so
//!   every call is idempotent by its natural key.
//! - CreateVolume rounds the size up to the extent size (or, when the limit
//!   forbids that, to 4 KiB); StorageClass parameters: `replication`,
//!   `encrypted` ("true": a new volume key wrapped by the plugin's cluster
//!   key, `--key-file`; copies keep their source's), and
//!   `csi.storage.k8s.io/fstype` (checked; the file system itself arrives in
//!   the volume capability at staging). Other `csi.storage.k8s.io/*` keys
//!   (PVC name and namespace from --extra-create-metadata) are accepted.
//! - ControllerPublishVolume records which host may attach the volume
//!   (`attachments/<volume>` in etcd); single-node modes are exclusive
//!   among live hosts, and a publish waits up to the holder's registration
//!   TTL + 2 s for a dead holder to lapse. The data itself is guarded by the writer lock taken
//!   when a host attaches (NodeStageVolume), not by this record.

use crate::pb::controller_server::Controller;
use crate::pb::controller_service_capability::rpc::Type as CtlCap;
use crate::pb::*;
use crate::{caps, need, snapshots, status};
use std::collections::HashMap;
use std::time::Duration;
use tonic::{Request, Response, Status};
use torus_meta::cluster::{AttachMode, Cluster, ClusterError, ReplicaState, VolumeInfo};
use torus_types::NodeId;

/// Size of a volume created without a capacity range.
pub const DEFAULT_SIZE: u64 = 1 << 30;
pub const PARAM_REPLICATION: &str = "replication";
pub const PARAM_ENCRYPTED: &str = "encrypted";
pub const PARAM_FSTYPE: &str = "csi.storage.k8s.io/fstype";
/// Prefix of the parameters Kubernetes adds (accepted, not used).
const K8S_PARAM_PREFIX: &str = "csi.storage.k8s.io/";
/// List tokens (ListVolumes, ListSnapshots): this prefix and the last id returned.
pub(crate) const TOKEN_PREFIX: &str = "after:";

/// Checks a list request's paging: the id to list after, if any.
pub(crate) fn page_start<'a>(max_entries: i32, token: &'a str, rpc: &str) -> Result<Option<&'a str>, Status> {
    if max_entries < 0 {
        return Err(Status::invalid_argument("max_entries must not be negative"));
    }
    if token.is_empty() {
        return Ok(None);
    }
    match token.strip_prefix(TOKEN_PREFIX) {
        Some(after) => Ok(Some(after)),
        None => Err(Status::aborted(format!("starting_token {token:?} was not returned by {rpc}"))),
    }
}

pub struct ControllerService {
    cluster: Cluster,
    /// Wraps the keys of volumes created with `encrypted: "true"`.
    key: Option<std::sync::Arc<torus_volume::crypt::ClusterKey>>,
}

impl ControllerService {
    pub fn new(cluster: Cluster, key: Option<std::sync::Arc<torus_volume::crypt::ClusterKey>>) -> Self {
        ControllerService { cluster, key }
    }

    /// What a volume's condition is judged from, read once for any number of volumes.
    async fn health(&self) -> Result<Health, Status> {
        let (ring, _) = self.cluster.ring().await.map_err(status::cluster)?;
        let peers = self.cluster.peers().await.map_err(status::cluster)?;
        let up: Vec<NodeId> = peers.iter().map(|p| p.id).collect();
        let down = ring.members.iter().filter(|m| !up.contains(&m.id)).count();
        Ok(Health { members: ring.members.len(), down })
    }

    async fn published_hosts(&self, name: &str) -> Result<Vec<String>, Status> {
        Ok(self.cluster.attachments(name).await.map_err(status::cluster)?.hosts.into_keys().collect())
    }
}

/// The ring's state as far as volume conditions go.
struct Health {
    members: usize,
    /// Ring members that are not registered (down).
    down: usize,
}

/// Abnormal while copies must be caught up, or ring members are down
/// (extents placed there have fewer than R live copies), or the ring has
/// fewer nodes than the volume's replication.
fn condition(info: &VolumeInfo, state: Option<&ReplicaState>, health: &Health) -> VolumeCondition {
    let mut problems = Vec::new();
    if let Some(state) = state {
        let missing: usize = state.missing.values().map(|s| s.len()).sum();
        if missing > 0 {
            problems.push(format!("{missing} extent copies on {} node(s) are to be caught up", state.missing.len()));
        }
    }
    if health.down > 0 {
        problems.push(format!("{} storage node(s) holding its data are down", health.down));
    }
    if health.members < info.replication as usize {
        problems.push(format!(
            "under-replicated: replication {} but {} node(s) in the ring",
            info.replication, health.members
        ));
    }
    if problems.is_empty() {
        VolumeCondition { abnormal: false, message: format!("healthy: {} copies of every extent", info.replication) }
    } else {
        VolumeCondition { abnormal: true, message: problems.join("; ") }
    }
}

fn volume_message(info: &VolumeInfo) -> Volume {
    Volume {
        capacity_bytes: info.size as i64,
        volume_id: info.name.clone(),
        volume_context: HashMap::from([
            (PARAM_REPLICATION.to_string(), info.replication.to_string()),
            (PARAM_ENCRYPTED.to_string(), info.encryption.is_some().to_string()),
        ]),
        content_source: None,
        accessible_topology: Vec::new(),
    }
}

/// The size to create for a capacity range, or why none fits.
pub fn size_for(range: Option<&CapacityRange>, extent_size: u64) -> Result<u64, Status> {
    let (required, limit) = range.map(|r| (r.required_bytes, r.limit_bytes)).unwrap_or((0, 0));
    if required < 0 || limit < 0 {
        return Err(Status::invalid_argument("capacity_range: bytes must not be negative"));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && required > limit {
        return Err(Status::out_of_range(format!("required_bytes {required} is larger than limit_bytes {limit}")));
    }
    let wanted = if required == 0 { DEFAULT_SIZE.min(if limit > 0 { limit } else { u64::MAX }) } else { required };
    let round = |to: u64| wanted.div_ceil(to).checked_mul(to);
    for step in [extent_size, 4096] {
        if let Some(size) = round(step) {
            if limit == 0 || size <= limit {
                if size > torus_meta::cluster::MAX_VOLUME_SIZE {
                    break;
                }
                return Ok(size);
            }
        }
    }
    Err(Status::out_of_range(format!(
        "no size of whole 4 KiB blocks between {required} and {} bytes (at most 1 EiB)",
        if limit > 0 { limit.to_string() } else { "unlimited".into() }
    )))
}

/// The StorageClass parameters a volume is made with.
#[derive(Debug, PartialEq, Eq)]
struct Params {
    replication: Option<u32>,
    encrypted: bool,
}

fn parse_params(params: &HashMap<String, String>) -> Result<Params, Status> {
    for (k, v) in params {
        match k.as_str() {
            PARAM_REPLICATION | PARAM_ENCRYPTED => {}
            PARAM_FSTYPE => {
                if !caps::FS_TYPES.contains(&v.as_str()) {
                    return Err(Status::invalid_argument(format!(
                        "parameter {PARAM_FSTYPE}={v:?}: use one of {}",
                        caps::FS_TYPES.join(", ")
                    )));
                }
            }
            _ if k.starts_with(K8S_PARAM_PREFIX) => {}
            _ => {
                return Err(Status::invalid_argument(format!(
                    "unknown parameter {k:?} (known: {PARAM_REPLICATION}, {PARAM_ENCRYPTED}, {PARAM_FSTYPE})"
                )))
            }
        }
    }
    let replication = match params.get(PARAM_REPLICATION) {
        None => None,
        Some(v) => match v.parse::<u32>() {
            Ok(r) if (1..=16).contains(&r) => Some(r),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "parameter {PARAM_REPLICATION}={v:?}: a number from 1 to 16"
                )))
            }
        },
    };
    let encrypted = match params.get(PARAM_ENCRYPTED).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => return Err(Status::invalid_argument(format!("parameter {PARAM_ENCRYPTED}={v:?}: true or false"))),
    };
    Ok(Params { replication, encrypted })
}

fn capabilities(list: &[CtlCap]) -> Vec<ControllerServiceCapability> {
    list.iter()
        .map(|t| ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc {
                r#type: *t as i32,
            })),
        })
        .collect()
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        need("name", &req.name)?;
        caps::parse_all(&req.volume_capabilities)?;
        let Params { replication, encrypted } = parse_params(&req.parameters)?;
        let config = self.cluster.config().await.map_err(status::cluster)?;
        let size = size_for(req.capacity_range.as_ref(), config.extent_size)?;
        let encryption = match (encrypted, &self.key, &req.volume_content_source) {
            (false, _, _) | (true, _, Some(_)) => None,
            (true, None, None) => {
                return Err(Status::invalid_argument(format!(
                    "parameter {PARAM_ENCRYPTED}=true, but this plugin has no cluster key (--key-file)"
                )))
            }
            (true, Some(key), None) => {
                Some(key.new_volume_key().map_err(|e| Status::internal(format!("making the volume key: {e}")))?)
            }
        };
        if let Some(source) = &req.volume_content_source {
            let Some(kind) = &source.r#type else {
                return Err(Status::invalid_argument("volume_content_source: a snapshot or a volume is required"));
            };
            if replication.is_some() {
                tracing::debug!("replication parameter ignored: a volume made from a source keeps the source's");
            }
            // The requested size only bounds it: a copy is never smaller than its source.
            let requested = req.capacity_range.as_ref().map(|r| r.required_bytes.max(0) as u64).unwrap_or(0);
            let limit = req.capacity_range.as_ref().map(|r| r.limit_bytes.max(0) as u64).unwrap_or(0);
            let info =
                snapshots::create_volume_from(&self.cluster, &req.name, requested, limit, kind, encrypted).await?;
            let mut volume = volume_message(&info);
            volume.content_source = Some(source.clone());
            return Ok(Response::new(CreateVolumeResponse { volume: Some(volume) }));
        }
        let info = match self.cluster.create_volume_with(&req.name, size, replication, encryption).await {
            Ok(info) => info,
            Err(ClusterError::VolumeExists { .. }) => {
                let info = self.cluster.volume(&req.name).await.map_err(status::cluster)?;
                let (required, limit) = req
                    .capacity_range
                    .as_ref()
                    .map(|r| (r.required_bytes as u64, r.limit_bytes as u64))
                    .unwrap_or((0, 0));
                let fits = info.size >= required && (limit == 0 || info.size <= limit);
                if !fits || replication.is_some_and(|r| r != info.replication) || encrypted != info.encryption.is_some()
                {
                    return Err(Status::already_exists(format!(
                        "volume {:?} exists with {} bytes, replication {} and encrypted={}, \
                         which this request does not accept",
                        info.name,
                        info.size,
                        info.replication,
                        info.encryption.is_some()
                    )));
                }
                info
            }
            Err(e) => return Err(status::cluster(e)),
        };
        tracing::info!(
            volume = %info.name,
            size = info.size,
            replication = info.replication,
            encrypted = info.encryption.is_some(),
            "volume created"
        );
        // Every Torus volume is reachable from every host, whatever the
        // requirements: no accessible_topology means exactly that, and pins no
        // PersistentVolume to the zones (or nodes) that existed when it was made.
        Ok(Response::new(CreateVolumeResponse { volume: Some(volume_message(&info)) }))
    }

    async fn delete_volume(&self, req: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = req.into_inner();
        need("volume_id", &req.volume_id)?;
        match self.cluster.delete_volume(&req.volume_id).await {
            Ok(_) => tracing::info!(volume = %req.volume_id, "volume deleted"),
            Err(ClusterError::VolumeNotFound { .. }) => {}
            Err(e) => return Err(status::cluster(e)),
        }
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let req = req.into_inner();
        need("volume_id", &req.volume_id)?;
        need("node_id", &req.node_id)?;
        let cap = caps::parse(
            req.volume_capability.as_ref().ok_or_else(|| Status::invalid_argument("volume_capability is required"))?,
        )?;
        let mode = AttachMode { read_only: req.readonly || cap.read_only(), exclusive: cap.single_node() };
        // Another live host has it: wait (bounded) for that host's registration
        // to lapse, as NodeStageVolume waits for a writer lease, so a dead
        // host's volume moves on without the caller having to retry.
        let mut deadline = None;
        loop {
            match self.cluster.publish(&req.volume_id, &req.node_id, mode).await {
                Ok(()) => break,
                Err(ClusterError::AttachedElsewhere { volume, host }) => {
                    let until = match deadline {
                        Some(d) => d,
                        None => {
                            let ttl =
                                self.cluster.host(&host).await.map_err(status::cluster)?.map_or(0, |h| h.lease_ttl);
                            *deadline.insert(tokio::time::Instant::now() + Duration::from_secs(ttl + 2))
                        }
                    };
                    if tokio::time::Instant::now() >= until {
                        return Err(status::cluster(ClusterError::AttachedElsewhere { volume, host }));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(status::cluster(e)),
            }
        }
        // The node stages a read-only publish read-only (PUBLISH_READONLY).
        let publish_context = if mode.read_only {
            HashMap::from([(crate::PUBLISH_READONLY.to_string(), "true".to_string())])
        } else {
            HashMap::new()
        };
        Ok(Response::new(ControllerPublishVolumeResponse { publish_context }))
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        need("volume_id", &req.volume_id)?;
        let hosts = if req.node_id.is_empty() {
            self.published_hosts(&req.volume_id).await?
        } else {
            vec![req.node_id.clone()]
        };
        for h in hosts {
            self.cluster.unpublish(&req.volume_id, &h).await.map_err(status::cluster)?;
        }
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        need("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        let info = self.cluster.volume(&req.volume_id).await.map_err(status::cluster)?;
        if let Err(e) = caps::parse_all(&req.volume_capabilities) {
            return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.message().to_string(),
            }));
        }
        if let Err(e) = parse_params(&req.parameters) {
            return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.message().to_string(),
            }));
        }
        let context = volume_message(&info).volume_context;
        if req.volume_context.iter().any(|(k, v)| context.get(k) != Some(v)) {
            return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: "volume_context does not match the volume's".into(),
            }));
        }
        Ok(Response::new(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        }))
    }

    async fn list_volumes(&self, req: Request<ListVolumesRequest>) -> Result<Response<ListVolumesResponse>, Status> {
        let req = req.into_inner();
        let after = page_start(req.max_entries, &req.starting_token, "ListVolumes")?;
        let volumes = self.cluster.volumes().await.map_err(status::cluster)?;
        let rest: Vec<&VolumeInfo> = volumes.iter().filter(|v| after.is_none_or(|a| v.name.as_str() > a)).collect();
        let take = if req.max_entries == 0 { rest.len() } else { (req.max_entries as usize).min(rest.len()) };
        // Everything the entries need, read once (not per volume).
        let health = self.health().await?;
        let states = self.cluster.replica_states().await.map_err(status::cluster)?;
        let mut published = self.cluster.all_attachments().await.map_err(status::cluster)?;
        let mut entries = Vec::with_capacity(take);
        for info in &rest[..take] {
            entries.push(list_volumes_response::Entry {
                volume: Some(volume_message(info)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: published
                        .remove(&info.name)
                        .map(|a| a.hosts.into_keys().collect())
                        .unwrap_or_default(),
                    volume_condition: Some(condition(info, states.get(&info.id), &health)),
                }),
            });
        }
        let next_token =
            if take < rest.len() { format!("{TOKEN_PREFIX}{}", rest[take - 1].name) } else { String::new() };
        Ok(Response::new(ListVolumesResponse { entries, next_token }))
    }

    async fn get_capacity(&self, req: Request<GetCapacityRequest>) -> Result<Response<GetCapacityResponse>, Status> {
        let req = req.into_inner();
        if !req.volume_capabilities.is_empty() {
            caps::parse_all(&req.volume_capabilities)?;
        }
        let replication = parse_params(&req.parameters)?.replication;
        let config = self.cluster.config().await.map_err(status::cluster)?;
        let r = replication.unwrap_or(config.replication).max(1) as u64;
        let (ring, _) = self.cluster.ring().await.map_err(status::cluster)?;
        let peers = self.cluster.peers().await.map_err(status::cluster)?;
        // Free space of live ring members that take new data, divided by the copies each byte needs.
        let free: u64 = ring
            .members
            .iter()
            .filter(|m| !m.full)
            .filter_map(|m| peers.iter().find(|p| p.id == m.id))
            .map(|p| p.capacity.saturating_sub(p.used))
            .sum();
        let available = free / r;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: available.min(i64::MAX as u64) as i64,
            maximum_volume_size: Some(torus_meta::cluster::MAX_VOLUME_SIZE as i64),
            minimum_volume_size: Some(4096),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: capabilities(&[
                CtlCap::CreateDeleteVolume,
                CtlCap::PublishUnpublishVolume,
                CtlCap::ListVolumes,
                CtlCap::GetCapacity,
                CtlCap::ExpandVolume,
                CtlCap::ListVolumesPublishedNodes,
                CtlCap::VolumeCondition,
                CtlCap::GetVolume,
                CtlCap::PublishReadonly,
                CtlCap::SingleNodeMultiWriter,
                CtlCap::CreateDeleteSnapshot,
                CtlCap::ListSnapshots,
                CtlCap::CloneVolume,
            ]),
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = req.into_inner();
        let s = snapshots::create(&self.cluster, &req.name, &req.source_volume_id).await?;
        Ok(Response::new(CreateSnapshotResponse { snapshot: Some(snapshots::snapshot_message(&s)) }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        snapshots::delete(&self.cluster, &req.into_inner().snapshot_id).await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Ok(Response::new(snapshots::list(&self.cluster, &req.into_inner()).await?))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        need("volume_id", &req.volume_id)?;
        let range = req.capacity_range.ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        if let Some(cap) = &req.volume_capability {
            caps::parse(cap)?;
        }
        if range.required_bytes < 0 || range.limit_bytes < 0 {
            return Err(Status::invalid_argument("capacity_range: bytes must not be negative"));
        }
        let (required, limit) = (range.required_bytes as u64, range.limit_bytes as u64);
        let current = self.cluster.volume(&req.volume_id).await.map_err(status::cluster)?;
        if limit > 0 && current.size > limit {
            return Err(Status::out_of_range(format!(
                "the volume has {} bytes already, more than limit_bytes {limit}; volumes never shrink",
                current.size
            )));
        }
        // Whole 4 KiB blocks, as CreateVolume makes them (the devices use 4 KiB blocks).
        let size = required.div_ceil(4096) * 4096;
        if limit > 0 && size > limit {
            return Err(Status::out_of_range(format!("{size} bytes (whole 4 KiB blocks) exceeds limit_bytes {limit}")));
        }
        let info = self.cluster.grow_volume(&req.volume_id, size).await.map_err(status::cluster)?;
        if info.size > current.size {
            tracing::info!(volume = %info.name, from = current.size, to = info.size, "volume grown");
        }
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: info.size as i64,
            // The attached device and the file system on it grow on the host.
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let req = req.into_inner();
        need("volume_id", &req.volume_id)?;
        let info = self.cluster.volume(&req.volume_id).await.map_err(status::cluster)?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(volume_message(&info)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: self.published_hosts(&info.name).await?,
                volume_condition: Some(condition(
                    &info,
                    Some(&self.cluster.replica_state(info.id).await.map_err(status::cluster)?),
                    &self.health().await?,
                )),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _req: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("modifying volumes is not supported"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> CapacityRange {
        CapacityRange { required_bytes: required, limit_bytes: limit }
    }

    #[test]
    fn sizes_round_up_to_the_extent_then_to_4k_within_the_limit() {
        let es = 4 << 20;
        assert_eq!(size_for(None, es).expect("default"), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&range(1, 0)), es).expect("tiny"), es);
        assert_eq!(size_for(Some(&range(10 << 30, 0)), es).expect("10 GiB"), 10 << 30);
        assert_eq!(size_for(Some(&range(5 << 20, 0)), es).expect("5 MiB"), 8 << 20);
        assert_eq!(size_for(Some(&range(5 << 20, 6 << 20)), es).expect("limited"), 5 << 20);
        assert_eq!(size_for(Some(&range(0, 1 << 20)), es).expect("limit only"), 1 << 20);
        assert_eq!(size_for(Some(&range(10, 100)), es).expect_err("too small").code(), tonic::Code::OutOfRange);
        assert_eq!(size_for(Some(&range(200, 100)), es).expect_err("inverted").code(), tonic::Code::OutOfRange);
        assert_eq!(size_for(Some(&range(-1, 0)), es).expect_err("negative").code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn parameters() {
        let p = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(parse_params(&p(&[])).expect("none"), Params { replication: None, encrypted: false });
        assert_eq!(
            parse_params(&p(&[("replication", "3"), (PARAM_FSTYPE, "xfs"), ("encrypted", "true")])).expect("ok"),
            Params { replication: Some(3), encrypted: true }
        );
        assert!(parse_params(&p(&[("csi.storage.k8s.io/pvc/name", "data")])).is_ok());
        for bad in [
            &[("replication", "0")][..],
            &[("replication", "x")],
            &[("colour", "red")],
            &[(PARAM_FSTYPE, "zfs")],
            &[("encrypted", "yes")],
        ] {
            assert_eq!(parse_params(&p(bad)).expect_err("bad").code(), tonic::Code::InvalidArgument);
        }
    }
}
