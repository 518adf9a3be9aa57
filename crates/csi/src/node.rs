//! The CSI Node service: staging (attach, then mount at the staging path),
//! publishing (bind mounts), stats and online growth on this host.
//!
//! - NodeStageVolume attaches the volume through the [`Attacher`] (for a
//!   writable attachment that takes the volume's writer lock, waiting a
//!   bounded time for a dead holder's lease to lapse: that is where
//!   single-writer exclusivity is enforced), then, for a mount volume, probes
//!   the device and formats it **only if it is blank**, and mounts it.
//! - What was staged is recorded in `<state dir>/staged/<volume>.json`, so a
//!   restarted plugin answers repeats and unstages exactly as before.
//! - Publishing bind-mounts the staged file system (or the device, for a raw
//!   block volume, onto a file) at the target path, read-only when asked.

use crate::caps::{self, Access, Capability};
use crate::pb::node_server::Node;
use crate::pb::node_service_capability::rpc::Type as NodeCap;
use crate::pb::volume_capability::access_mode::Mode;
use crate::pb::*;
use crate::{mount, need, status, TOPOLOGY_PREFIX};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use torus_attach::{AttachRequest, Attacher, Attachment};
use torus_meta::cluster::Cluster;

/// What NodeStageVolume did for one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Staged {
    volume: String,
    staging_path: PathBuf,
    /// `None` for a raw block volume.
    fs_type: Option<String>,
    mount_flags: Vec<String>,
    read_only: bool,
    device: PathBuf,
}

pub struct NodeService<A: Attacher> {
    cluster: Cluster,
    attacher: Arc<A>,
    node_id: String,
    labels: BTreeMap<String, String>,
    state_dir: PathBuf,
    /// One staging or publishing operation per volume at a time.
    busy: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn io_status(what: String) -> impl FnOnce(std::io::Error) -> Status {
    move |e| Status::internal(format!("{what}: {e}"))
}

impl<A: Attacher> NodeService<A> {
    pub fn new(
        cluster: Cluster,
        attacher: Arc<A>,
        node_id: String,
        labels: BTreeMap<String, String>,
        state_dir: PathBuf,
    ) -> Self {
        NodeService { cluster, attacher, node_id, labels, state_dir, busy: Default::default() }
    }

    fn serialise(&self, volume: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.busy.lock().expect("busy map poisoned").entry(volume.to_string()).or_default().clone()
    }

    fn record_path(&self, volume: &str) -> PathBuf {
        self.state_dir.join("staged").join(format!("{volume}.json"))
    }

    fn staged(&self, volume: &str) -> Option<Staged> {
        let path = self.record_path(volume);
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable staging record");
                None
            }
        }
    }

    fn save(&self, s: &Staged) -> Result<(), Status> {
        let path = self.record_path(&s.volume);
        let dir = path.parent().expect("record path has a parent");
        std::fs::create_dir_all(dir).map_err(io_status(format!("creating {}", dir.display())))?;
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(s).expect("records serialise"))?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        };
        write().map_err(io_status(format!("writing {}", path.display())))
    }

    async fn volume_exists(&self, volume: &str) -> Result<(), Status> {
        self.cluster.volume(volume).await.map(drop).map_err(status::cluster)
    }

    /// Mounts the attached device at the staging path, formatting it first only if blank.
    fn stage_fs(&self, s: &Staged, size: u64) -> Result<(), Status> {
        let fs_type = s.fs_type.as_deref().expect("a mount volume has a file system");
        if let Some(m) = mount::mounted_at(&s.staging_path)? {
            if Path::new(&m.source) == s.device {
                return Ok(());
            }
            return Err(Status::already_exists(format!(
                "{} is already a mount of {}, not of volume {}",
                s.staging_path.display(),
                m.source,
                s.volume
            )));
        }
        let existing = match mount::probe(&s.device, size)? {
            mount::Probe::FileSystem(t) if t == fs_type => true,
            mount::Probe::FileSystem(t) => {
                return Err(Status::failed_precondition(format!(
                    "volume {} holds a {t} file system, not {fs_type}: refusing to mount or format it",
                    s.volume
                )))
            }
            mount::Probe::Other(what) => {
                return Err(Status::failed_precondition(format!(
                    "volume {} holds {what}, not a file system: refusing to format it",
                    s.volume
                )))
            }
            mount::Probe::Blank if s.read_only => {
                return Err(Status::failed_precondition(format!(
                    "volume {} has no file system yet and is staged read-only: stage it for writing once first",
                    s.volume
                )))
            }
            mount::Probe::Blank => {
                tracing::info!(volume = %s.volume, device = %s.device.display(), fs_type, "blank volume: making a file system");
                mount::mkfs(&s.device, fs_type)?;
                false
            }
        };
        let mut options = s.mount_flags.clone();
        if s.read_only {
            options.extend(mount::read_only_options(fs_type));
        }
        mount::mount(&s.device, &s.staging_path, Some(fs_type), &options)?;
        // A volume made larger than its source (a snapshot restored into a
        // bigger claim) holds a smaller file system: it fills the volume (a
        // no-op when it does already).
        if existing && !s.read_only {
            if let Err(e) = mount::grow_fs(&s.device, &s.staging_path, fs_type) {
                // Served at its old size rather than not at all; NodeExpandVolume tries again.
                tracing::warn!(volume = %s.volume, error = %e.message(), "could not grow the file system to the volume");
            }
        }
        Ok(())
    }

    fn condition(&self, volume: &str) -> VolumeCondition {
        match self.attacher.find(volume) {
            Some(Attachment { problem: Some(p), .. }) => VolumeCondition { abnormal: true, message: p },
            Some(a) if a.device.exists() => VolumeCondition { abnormal: false, message: "attached".into() },
            Some(a) => VolumeCondition {
                abnormal: true,
                message: format!("the device {} of the attachment is gone", a.device.display()),
            },
            None => VolumeCondition {
                abnormal: true,
                message: "the process serving the volume on this host is gone: I/O fails until it is staged again"
                    .into(),
            },
        }
    }
}

/// Whether the mount `m` at `path` shows the staged volume: its file system
/// (bind mounts show the device as their source), or its device node, or a
/// read-only loop device over it.
fn publishes(path: &Path, m: &mount::MountEntry, staged: &Staged) -> bool {
    if staged.fs_type.is_some() {
        return Path::new(&m.source) == staged.device;
    }
    let (Some(at), Some(dev)) = (mount::rdev(path), mount::rdev(&staged.device)) else { return false };
    at == dev
        || torus_attach::loopdev::loop_of_rdev(at).and_then(|l| torus_attach::loopdev::backing_file(&l)).as_deref()
            == Some(staged.device.as_path())
}

/// A publish of the staged volume at another path than `target`, if any.
fn published_elsewhere(staged: &Staged, target: &Path) -> Result<Option<PathBuf>, Status> {
    let target = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
    for m in mount::mounts()? {
        if m.mount_point == staged.staging_path || m.mount_point == target {
            continue;
        }
        // A block publish is a bind of the device node (from devtmpfs); only those are worth a stat.
        let candidate = if staged.fs_type.is_some() {
            Path::new(&m.source) == staged.device
        } else {
            matches!(m.fs_type.as_str(), "devtmpfs" | "tmpfs")
        };
        if candidate && publishes(&m.mount_point, &m, staged) {
            return Ok(Some(m.mount_point));
        }
    }
    Ok(None)
}

/// The read-only loop device a block publish at `target` set up, if any.
fn read_only_loop_at(target: &Path) -> Option<PathBuf> {
    let dev = torus_attach::loopdev::loop_of_rdev(mount::rdev(target)?)?;
    let backing = torus_attach::loopdev::backing_file(&dev)?;
    // (A string prefix: as a path, "/dev/loop0" does not start with "/dev/loop".)
    backing.to_str().is_some_and(|b| b.starts_with("/dev/loop")).then_some(dev)
}

/// Read-only by its access mode, or because ControllerPublishVolume published it read-only.
fn stage_read_only(cap: &Capability, publish_context: &HashMap<String, String>) -> bool {
    cap.read_only() || publish_context.get(crate::PUBLISH_READONLY).is_some_and(|v| v == "true")
}

fn capability(cap: Option<&VolumeCapability>) -> Result<Capability, Status> {
    caps::parse(cap.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?)
}

#[tonic::async_trait]
impl<A: Attacher> Node for NodeService<A> {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = req.into_inner();
        need("volume_id", &req.volume_id)?;
        need("staging_target_path", &req.staging_target_path)?;
        let cap = capability(req.volume_capability.as_ref())?;
        let lock = self.serialise(&req.volume_id);
        let _held = lock.lock().await;
        let (fs_type, mount_flags) = match &cap.access {
            Access::Mount { fs_type, flags } => (Some(fs_type.clone()), flags.clone()),
            Access::Block => (None, Vec::new()),
        };
        let staging_path = PathBuf::from(&req.staging_target_path);
        if let Some(prev) = self.staged(&req.volume_id) {
            let same = prev.staging_path == staging_path
                && prev.fs_type == fs_type
                && prev.mount_flags == mount_flags
                && prev.read_only == stage_read_only(&cap, &req.publish_context);
            if !same {
                return Err(Status::already_exists(format!(
                    "volume {} is already staged at {} with another capability",
                    req.volume_id,
                    prev.staging_path.display()
                )));
            }
        }
        // Published read-only (ControllerPublishVolume's readonly): staged read-only too.
        let read_only = stage_read_only(&cap, &req.publish_context);
        let info = self.cluster.volume(&req.volume_id).await.map_err(status::cluster)?;
        if read_only && fs_type.is_some() {
            // A file system changing under a reader on another host reads as garbage (or worse).
            if let Some((lock, _)) = self.cluster.volume_lock(info.id).await.map_err(status::cluster)? {
                return Err(Status::failed_precondition(format!(
                    "volume {} is being written by {}: its file system cannot be mounted read-only elsewhere meanwhile",
                    req.volume_id, lock.holder
                )));
            }
        }
        let attachment = self
            .attacher
            .attach(&AttachRequest { volume: req.volume_id.clone(), read_only })
            .await
            .map_err(status::attach)?;
        let staged = Staged {
            volume: req.volume_id.clone(),
            staging_path,
            fs_type,
            mount_flags,
            read_only,
            device: attachment.device.clone(),
        };
        if staged.fs_type.is_some() {
            if let Err(e) = self.stage_fs(&staged, attachment.size) {
                tracing::warn!(volume = %req.volume_id, error = %e.message(), "staging failed; detaching");
                if self.staged(&req.volume_id).is_none() {
                    if let Err(d) = self.attacher.detach(&req.volume_id).await {
                        tracing::warn!(volume = %req.volume_id, error = %d, "could not detach after a failed stage");
                    }
                }
                return Err(e);
            }
        }
        self.save(&staged)?;
        tracing::info!(volume = %req.volume_id, device = %attachment.device.display(), path = %req.staging_target_path, "staged");
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = req.into_inner();
        need("volume_id", &req.volume_id)?;
        need("staging_target_path", &req.staging_target_path)?;
        let lock = self.serialise(&req.volume_id);
        let _held = lock.lock().await;
        let staging_path = PathBuf::from(&req.staging_target_path);
        let staged = self.staged(&req.volume_id);
        if let Some(s) = &staged {
            if s.staging_path != staging_path {
                return Err(Status::invalid_argument(format!(
                    "volume {} is staged at {}, not at {}",
                    req.volume_id,
                    s.staging_path.display(),
                    staging_path.display()
                )));
            }
        }
        if staging_path.exists() {
            mount::unmount(&staging_path)?;
        }
        self.attacher.detach(&req.volume_id).await.map_err(status::attach)?;
        if staged.is_some() {
            let p = self.record_path(&req.volume_id);
            std::fs::remove_file(&p).map_err(io_status(format!("removing {}", p.display())))?;
            tracing::info!(volume = %req.volume_id, "unstaged");
        }
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        need("volume_id", &req.volume_id)?;
        need("target_path", &req.target_path)?;
        let cap = capability(req.volume_capability.as_ref())?;
        if req.staging_target_path.is_empty() {
            return Err(Status::failed_precondition("staging_target_path is required: stage the volume first"));
        }
        let lock = self.serialise(&req.volume_id);
        let _held = lock.lock().await;
        self.volume_exists(&req.volume_id).await?;
        let staged = self.staged(&req.volume_id).ok_or_else(|| {
            Status::failed_precondition(format!("volume {} is not staged on this node", req.volume_id))
        })?;
        if staged.staging_path != Path::new(&req.staging_target_path) {
            return Err(Status::failed_precondition(format!(
                "volume {} is staged at {}, not at {}",
                req.volume_id,
                staged.staging_path.display(),
                req.staging_target_path
            )));
        }
        let read_only = req.readonly || cap.read_only();
        if !read_only && staged.read_only {
            return Err(Status::already_exists(format!(
                "volume {} is staged read-only and cannot be published for writing",
                req.volume_id
            )));
        }
        let target = PathBuf::from(&req.target_path);
        let (source, flags): (PathBuf, Vec<String>) = match (&cap.access, &staged.fs_type) {
            (Access::Block, None) => (staged.device.clone(), Vec::new()),
            (Access::Mount { flags, .. }, Some(_)) => (staged.staging_path.clone(), flags.clone()),
            _ => {
                return Err(Status::already_exists(format!(
                    "volume {} is staged as {}, which this capability does not match",
                    req.volume_id,
                    if staged.fs_type.is_some() { "a file system" } else { "a block device" }
                )))
            }
        };
        if let Some(m) = mount::mounted_at(&target)? {
            if !publishes(&target, &m, &staged) {
                return Err(Status::already_exists(format!(
                    "{} is already a mount of something else ({})",
                    target.display(),
                    m.source
                )));
            }
            let ro = m.options.split(',').any(|o| o == "ro");
            if ro != read_only {
                return Err(Status::already_exists(format!(
                    "{} is already published {}",
                    target.display(),
                    if ro { "read-only" } else { "read-write" }
                )));
            }
            return Ok(Response::new(NodePublishVolumeResponse {}));
        }
        if cap.mode == Mode::SingleNodeSingleWriter {
            // ReadWriteOncePod: one publish only (the spec's FAILED_PRECONDITION).
            if let Some(other) = published_elsewhere(&staged, &target)? {
                return Err(Status::failed_precondition(format!(
                    "volume {} is single-writer and already published at {}",
                    req.volume_id,
                    other.display()
                )));
            }
        }
        let mut source = source;
        if staged.fs_type.is_some() {
            std::fs::create_dir_all(&target).map_err(io_status(format!("creating {}", target.display())))?;
        } else {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io_status(format!("creating {}", parent.display())))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&target)
                .map_err(io_status(format!("creating {}", target.display())))?;
            if read_only && !staged.read_only {
                // A read-only bind mount does not stop writes to a device node:
                // a read-only loop device over the staged one does.
                source = torus_attach::loopdev::attach(&staged.device, true).map_err(status::attach)?;
            }
        }
        if let Err(e) = mount::bind(&source, &target, read_only, &flags) {
            if source != staged.device && staged.fs_type.is_none() {
                let _ = torus_attach::loopdev::detach(&source);
            }
            return Err(e);
        }
        tracing::info!(volume = %req.volume_id, target = %target.display(), read_only, "published");
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        need("volume_id", &req.volume_id)?;
        need("target_path", &req.target_path)?;
        let lock = self.serialise(&req.volume_id);
        let _held = lock.lock().await;
        let target = PathBuf::from(&req.target_path);
        if std::fs::symlink_metadata(&target).is_ok() {
            // A read-only block publish has its own loop device over the staged one.
            let ro_loop = read_only_loop_at(&target);
            mount::unmount(&target)?;
            if let Some(dev) = ro_loop {
                torus_attach::loopdev::detach(&dev).map_err(status::attach)?;
            }
            let md = std::fs::symlink_metadata(&target).map_err(io_status(format!("stat {}", target.display())))?;
            if md.is_dir() { std::fs::remove_dir(&target) } else { std::fs::remove_file(&target) }
                .map_err(io_status(format!("removing {}", target.display())))?;
            tracing::info!(volume = %req.volume_id, target = %target.display(), "unpublished");
        }
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = req.into_inner();
        need("volume_id", &req.volume_id)?;
        need("volume_path", &req.volume_path)?;
        let path = PathBuf::from(&req.volume_path);
        let md =
            std::fs::metadata(&path).map_err(|e| Status::not_found(format!("volume_path {}: {e}", path.display())))?;
        let staged = self
            .staged(&req.volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {} is not staged on this node", req.volume_id)))?;
        let condition = Some(self.condition(&req.volume_id));
        let mount = mount::mounted_at(&path)?;
        let usage = if md.is_dir() {
            let Some(m) = mount else {
                return Err(Status::not_found(format!(
                    "{} is not a mount of volume {}",
                    path.display(),
                    req.volume_id
                )));
            };
            if !publishes(&path, &m, &staged) {
                return Err(Status::not_found(format!(
                    "{} is not a mount of volume {}",
                    path.display(),
                    req.volume_id
                )));
            }
            let (total, avail, used, itotal, ifree, iused) = mount::usage(&path)?;
            vec![
                VolumeUsage {
                    available: avail as i64,
                    total: total as i64,
                    used: used as i64,
                    unit: volume_usage::Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: ifree as i64,
                    total: itotal as i64,
                    used: iused as i64,
                    unit: volume_usage::Unit::Inodes as i32,
                },
            ]
        } else {
            let total = mount::device_size(&staged.device)?;
            vec![VolumeUsage { available: 0, total: total as i64, used: 0, unit: volume_usage::Unit::Bytes as i32 }]
        };
        Ok(Response::new(NodeGetVolumeStatsResponse { usage, volume_condition: condition }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        need("volume_id", &req.volume_id)?;
        need("volume_path", &req.volume_path)?;
        if let Some(c) = &req.volume_capability {
            caps::parse(c)?;
        }
        let path = PathBuf::from(&req.volume_path);
        if !path.exists() {
            return Err(Status::not_found(format!("volume_path {} does not exist", path.display())));
        }
        let lock = self.serialise(&req.volume_id);
        let _held = lock.lock().await;
        let info = self.cluster.volume(&req.volume_id).await.map_err(status::cluster)?;
        let staged = self
            .staged(&req.volume_id)
            .ok_or_else(|| Status::not_found(format!("volume {} is not staged on this node", req.volume_id)))?;
        let ours =
            path == staged.staging_path || mount::mounted_at(&path)?.is_some_and(|m| publishes(&path, &m, &staged));
        if !ours {
            return Err(Status::not_found(format!(
                "{} is not where volume {} is staged or published",
                path.display(),
                req.volume_id
            )));
        }
        if staged.read_only {
            return Err(Status::failed_precondition(format!(
                "volume {} is staged read-only here: it cannot be grown through this host",
                req.volume_id
            )));
        }
        if let Some(r) = &req.capacity_range {
            if r.limit_bytes > 0 && info.size > r.limit_bytes as u64 {
                return Err(Status::out_of_range(format!(
                    "the volume has {} bytes, more than limit_bytes {}",
                    info.size, r.limit_bytes
                )));
            }
        }
        let attachment = self.attacher.grow(&req.volume_id, info.size).await.map_err(status::attach)?;
        if let Some(fs_type) = &staged.fs_type {
            mount::grow_fs(&attachment.device, &staged.staging_path, fs_type)?;
            tracing::info!(volume = %req.volume_id, size = attachment.size, fs_type, "file system grown");
        }
        Ok(Response::new(NodeExpandVolumeResponse { capacity_bytes: attachment.size as i64 }))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let caps = [
            NodeCap::StageUnstageVolume,
            NodeCap::GetVolumeStats,
            NodeCap::ExpandVolume,
            NodeCap::VolumeCondition,
            NodeCap::SingleNodeMultiWriter,
        ];
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: caps
                .iter()
                .map(|t| NodeServiceCapability {
                    r#type: Some(node_service_capability::Type::Rpc(node_service_capability::Rpc {
                        r#type: *t as i32,
                    })),
                })
                .collect(),
        }))
    }

    async fn node_get_info(&self, _req: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        let mut segments: HashMap<String, String> =
            self.labels.iter().map(|(k, v)| (format!("{TOPOLOGY_PREFIX}{k}"), v.clone())).collect();
        // A host without a zone label is its own failure domain, as torusd
        // takes it; the segment is always there (VOLUME_ACCESSIBILITY_CONSTRAINTS).
        segments.entry(format!("{TOPOLOGY_PREFIX}zone")).or_insert_with(|| self.node_id.clone());
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(Topology { segments }),
        }))
    }
}
