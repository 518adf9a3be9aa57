//! Opening volumes by name.
//!
//! A writable open takes the volume's lock in the metadata store on a fresh
//! lease (its create revision is the writer's epoch), announces the epoch to
//! the ring's nodes, and keeps the lease alive in the background. Every
//! connection of this process that opens the same volume shares one
//! `Volume`; when the last one closes, the lease is revoked and the lock
//! released. If the lease is lost (expired, revoked, or unconfirmed for a
//! whole TTL), the volume refuses writes from then on: a newer writer may
//! exist.

use crate::crypt::{ClusterKey, Crypt};
use crate::lease::{Closing, LeaseState, LockGuard};
use crate::pool::PeerPool;
use crate::tracker::Tracker;
use crate::volume::Placement;
use crate::{Volume, VolumeError};
use futures_util::future::join_all;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use torus_meta::cluster::{
    Cluster, ClusterError, PeerInfo, ProcessTag, ReplicaState, RingDoc, SnapshotInfo, VolumeInfo, VolumeLock,
};
use torus_meta::{LeaseId, MetaError};
use torus_proto::Transport;
use torus_types::Epoch;

#[derive(Clone, Debug)]
pub struct ManagerOptions {
    /// TTL of the writer's lease: how long after a crash the lock is released.
    pub lease_ttl: Duration,
    /// Who we are, as shown to a second writer that is refused.
    pub holder: String,
    pub conns_per_node: usize,
    /// How long a node may take to answer one request.
    pub request_timeout: Duration,
    /// How long writes are held while the lease cannot be confirmed before they fail.
    pub io_hold: Duration,
    /// How long a writable open waits for a lock held elsewhere (a repairer
    /// yields it; a dead holder's lease lapses). A live holder on this host is
    /// refused at once, a dead one on this host is taken over at once.
    pub lock_wait: Duration,
    /// This host, as recorded in locks: a lock of a dead process of the same
    /// host (and boot, and PID namespace) is taken over at once.
    pub host: String,
    /// Opens are a storage node's repair: recorded in the lock, and the
    /// volume is handed over to any client that waits for it.
    pub repair: bool,
    /// How nodes are reached: TCP, or in-memory nodes in tests.
    pub transport: Arc<dyn Transport>,
    /// The cluster key (`--key-file`): reads and writes of encrypted volumes
    /// need it; without it they can still be repaired and snapshotted.
    pub key: Option<Arc<ClusterKey>>,
    /// Encrypted volumes may be opened without the key, to take snapshots
    /// (their reads and writes fail). Repairs may always.
    pub without_key: bool,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            lease_ttl: Duration::from_secs(10),
            holder: format!("pid {}", std::process::id()),
            conns_per_node: 2,
            request_timeout: Duration::from_secs(10),
            io_hold: Duration::from_secs(60),
            lock_wait: Duration::ZERO,
            host: crate::holder::hostname(),
            repair: false,
            transport: Arc::new(torus_proto::Tcp),
            key: None,
            without_key: false,
        }
    }
}

pub struct VolumeManager {
    cluster: Cluster,
    pool: Arc<PeerPool>,
    opts: ManagerOptions,
    open: tokio::sync::Mutex<HashMap<(String, bool), Weak<Volume>>>,
    /// One open in progress per (name, writable): a second waits for it and
    /// shares its volume, while opens of other volumes go ahead.
    opening: std::sync::Mutex<HashMap<(String, bool), Arc<tokio::sync::Mutex<()>>>>,
    closing: Closing,
}

/// Builds the placement from the ring document.
pub fn placement_of(doc: &RingDoc) -> Placement {
    Placement::new(doc.version, doc.placement(), doc.previous_placement())
}

impl VolumeManager {
    pub fn new(cluster: Cluster, opts: ManagerOptions) -> Self {
        let pool = Arc::new(PeerPool::new(opts.conns_per_node, opts.request_timeout, opts.transport.clone()));
        VolumeManager {
            cluster,
            pool,
            opts,
            open: tokio::sync::Mutex::new(HashMap::new()),
            opening: Default::default(),
            closing: Closing::default(),
        }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub(crate) fn pool(&self) -> &PeerPool {
        &self.pool
    }

    /// Flushes every open volume and releases writers' locks (for a clean stop).
    pub async fn close_all(&self) {
        let open: Vec<Arc<Volume>> = self.open.lock().await.drain().filter_map(|(_, w)| w.upgrade()).collect();
        for v in open {
            if let Err(e) = crate::BlockDevice::flush(&*v).await {
                tracing::error!(volume = %v.info().name, error = %e, "final flush failed");
            }
            v.release().await;
        }
        let pending: Vec<_> = self.closing.lock().expect("closing list poisoned").drain(..).collect();
        for task in pending {
            let _ = tokio::time::timeout(Duration::from_secs(6), task).await;
        }
    }

    pub async fn list(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        Ok(self.cluster.volumes().await?)
    }

    /// Opens a volume, sharing an already open one of this process.
    pub async fn open(&self, name: &str, writable: bool) -> Result<Arc<Volume>, VolumeError> {
        let key = (name.to_string(), writable);
        let turn = self.opening.lock().expect("opening map poisoned").entry(key.clone()).or_default().clone();
        let _turn = turn.lock().await;
        if let Some(v) = self.open.lock().await.get(&key).and_then(Weak::upgrade) {
            return Ok(v);
        }
        // The map is not held while opening: a writable open may wait for a lock.
        let v = self.open_new(name, writable).await;
        self.opening.lock().expect("opening map poisoned").retain(|_, t| Arc::strong_count(t) > 1);
        let v = v?;
        let mut open = self.open.lock().await;
        open.retain(|_, w| w.strong_count() > 0);
        open.insert(key, Arc::downgrade(&v));
        Ok(v)
    }

    /// Whether this process has the volume open (for writing if `writable`).
    pub async fn is_open(&self, name: &str, writable: bool) -> bool {
        self.open.lock().await.get(&(name.to_string(), writable)).is_some_and(|w| w.strong_count() > 0)
    }

    /// Takes the volume's writer lock on `lease` (granted by a request sent at
    /// `granted_at`), as `ManagerOptions::lock_wait` says; keeps the lease alive
    /// while it waits. Returns the epoch and when the lease was last confirmed.
    async fn take_lock(
        &self,
        info: &VolumeInfo,
        lease: LeaseId,
        granted_at: Instant,
        ring_version: u64,
    ) -> Result<(Epoch, Instant), VolumeError> {
        let mut confirmed = granted_at;
        let lock = VolumeLock {
            holder: self.opts.holder.clone(),
            lease,
            ring_version,
            process: crate::holder::current(&self.opts.host),
            repair: self.opts.repair,
        };
        let deadline = Instant::now() + self.opts.lock_wait;
        let mut waiting = false;
        loop {
            let err = match self.cluster.lock_volume(info, &lock).await {
                Ok(epoch) => {
                    if waiting {
                        if let Err(e) = self.cluster.unwant_volume(info.id).await {
                            tracing::debug!(error = %e, "could not clear the wanted mark; it goes with the lease");
                        }
                    }
                    return Ok((epoch, confirmed));
                }
                Err(e @ ClusterError::VolumeLocked { .. }) => e,
                Err(e) => return Err(e.into()),
            };
            let Some((held, epoch)) = self.cluster.volume_lock(info.id).await? else { continue };
            let me = lock.process.as_ref();
            let here =
                |f: fn(&ProcessTag, &ProcessTag) -> bool| held.process.as_ref().zip(me).is_some_and(|(h, m)| f(h, m));
            if here(crate::holder::is_dead_here) {
                if self.cluster.break_lock(info.id, epoch, held.lease).await? {
                    tracing::warn!(volume = %info.name, holder = %held.holder, %epoch,
                        "the lock's holder on this host is dead: taking over (its epoch is fenced)");
                }
                continue;
            }
            // A live holder here is no dead one whose lease lapses: refuse at once.
            let alive_here = here(crate::holder::is_here);
            if self.opts.repair || (alive_here && !held.repair) || Instant::now() >= deadline {
                return Err(err.into());
            }
            if !waiting {
                tracing::info!(volume = %info.name, holder = %held.holder, wait = ?self.opts.lock_wait,
                    "volume held elsewhere: waiting for it");
                self.cluster.want_volume(info.id, &self.opts.holder, lease).await?;
                waiting = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if confirmed.elapsed() >= self.opts.lease_ttl / 3 {
                let sent = Instant::now();
                self.cluster.store().keep_alive(lease).await.map_err(ClusterError::from)?;
                confirmed = sent;
            }
        }
    }

    pub(crate) async fn refresh_peers(&self) -> Result<RingDoc, VolumeError> {
        let (doc, _) = self.cluster.ring().await?;
        let peers: Vec<PeerInfo> = self.cluster.peers().await?;
        self.pool.set_addresses(peers.into_iter().map(|p| (p.id, p.address)).collect());
        if doc.members.is_empty() {
            return Err(VolumeError::NoNodes);
        }
        Ok(doc)
    }

    /// How I/O of volume `name` is encrypted, with this process's key.
    fn crypt(&self, name: &str, enc: Option<&torus_meta::cluster::Encryption>) -> Result<Crypt, VolumeError> {
        match Crypt::for_volume(name, enc, self.opts.key.as_deref())? {
            Crypt::Sealed(s) if !(self.opts.repair || self.opts.without_key) => Err(s.error().into()),
            c => Ok(c),
        }
    }

    async fn open_new(&self, name: &str, writable: bool) -> Result<Arc<Volume>, VolumeError> {
        if name.contains('@') {
            return self.open_snapshot(name, writable).await;
        }
        let info = self.cluster.volume(name).await?;
        // A wrong key fails here, before any lock is taken.
        let crypt = self.crypt(name, info.encryption.as_ref())?;
        let doc = self.refresh_peers().await?;
        if !writable {
            let none = Arc::new(LeaseState::none());
            let state = self.cluster.replica_state(info.id).await?;
            let tracker = Arc::new(Tracker::new(self.cluster.clone(), info.id, state, none.clone()));
            let p = placement_of(&doc);
            return Ok(Arc::new(
                Volume::new(
                    self.cluster.clone(),
                    info,
                    Default::default(),
                    p,
                    self.pool.clone(),
                    true,
                    none,
                    tracker,
                    None,
                    false,
                )
                .with_crypt(crypt),
            ));
        }
        let store = self.cluster.store();
        let granted_at = Instant::now();
        let lease = store.grant_lease(self.opts.lease_ttl).await.map_err(torus_meta::cluster::ClusterError::from)?;
        let (epoch, granted_at) = match self.take_lock(&info, lease.id, granted_at, doc.version).await {
            Ok(e) => e,
            Err(e) => {
                let _ = store.revoke_lease(lease.id).await;
                return Err(e);
            }
        };
        // The ring may have changed before our lock existed, while nodes checked
        // which writers they must wait for: read it again now that we are visible.
        let doc = match self.refresh_peers().await {
            Ok(d) => d,
            Err(e) => {
                let _ = store.revoke_lease(lease.id).await;
                return Err(e);
            }
        };
        self.cluster.set_lock_ring_version(info.id, lease.id, doc.version).await?;
        tracing::info!(volume = %info.name, id = %info.id, %epoch, ring = doc.version, "volume locked for writing");
        // Tell the nodes about the new epoch now, so a stale writer is refused
        // even on nodes this writer has not written to yet.
        let fences = join_all(doc.all_members().into_iter().map(|m| {
            let pool = self.pool.clone();
            let (id, vol) = (m.id, info.top());
            async move {
                match pool.get(id).await {
                    Ok(c) => c.fence(vol, epoch).await.map(drop).map_err(|e| (id, e)),
                    Err(e) => Err((id, e)),
                }
            }
        }))
        .await;
        for r in fences {
            if let Err((node, e)) = r {
                tracing::warn!(%node, error = %e, "could not announce the writer's epoch to a node");
            }
        }
        let state = Arc::new(LeaseState::new(granted_at, self.opts.lease_ttl, self.opts.io_hold));
        let keeper = tokio::spawn(keep_alive(self.cluster.clone(), lease.id, self.opts.lease_ttl, state.clone()));
        let guard = LockGuard::new(self.cluster.clone(), lease.id, keeper, self.closing.clone());
        // What the previous writer left: extents it may have been writing, copies to catch up.
        let previous = self.cluster.replica_state(info.id).await?;
        let mine = ReplicaState { epoch, ..previous.clone() };
        let tracker = Arc::new(Tracker::new(self.cluster.clone(), info.id, mine, state.clone()));
        tokio::spawn(Tracker::run_commits(Arc::downgrade(&tracker)));
        let p = placement_of(&doc);
        let v = Arc::new(
            Volume::new(
                self.cluster.clone(),
                info,
                epoch,
                p,
                self.pool.clone(),
                false,
                state,
                tracker,
                Some(guard),
                false,
            )
            .with_crypt(crypt),
        );
        if let Err(e) = v.recover(&previous).await {
            // The dead writer's intent must outlive this failed open: no clean close.
            v.abandon().await;
            return Err(e);
        }
        // A repair catches up by itself, step by step (so that it can hand over): no second catch-up loop.
        if !self.opts.repair {
            tokio::spawn(Volume::catch_up(Arc::downgrade(&v)));
            tokio::spawn(Volume::serve_snapshot_requests(Arc::downgrade(&v)));
        }
        Ok(v)
    }

    /// Opens `VOLUME@SNAPSHOT`: read-only, frozen layers, at the snapshot's size.
    async fn open_snapshot(&self, name: &str, writable: bool) -> Result<Arc<Volume>, VolumeError> {
        let (vol, snap) = torus_meta::cluster::parse_snapshot_ref(name)?;
        if writable {
            return Err(VolumeError::ReadOnly);
        }
        let s = self.cluster.snapshot(&vol, &snap).await?;
        let doc = self.refresh_peers().await?;
        let info = VolumeInfo {
            id: s.layers[0],
            name: name.to_string(),
            size: s.size,
            extent_size: s.extent_size,
            replication: s.replication,
            created: s.created,
            layers: s.layers.clone(),
            encryption: s.encryption.clone(),
        };
        let crypt = self.crypt(name, info.encryption.as_ref())?;
        let none = Arc::new(LeaseState::none());
        // Frozen layers have no copies missing writes: nothing to follow.
        let tracker = Arc::new(Tracker::new(self.cluster.clone(), info.id, ReplicaState::default(), none.clone()));
        Ok(Arc::new(
            Volume::new(
                self.cluster.clone(),
                info,
                Default::default(),
                placement_of(&doc),
                self.pool.clone(),
                true,
                none,
                tracker,
                None,
                true,
            )
            .with_crypt(crypt),
        ))
    }

    /// Takes a snapshot of a volume, whoever has it open: this process's
    /// writer if it has one; else, if a client holds it, that client's
    /// writer (asked through the metadata store; waits up to `wait`); else
    /// a writer opened for the purpose.
    pub async fn snapshot(&self, volume: &str, name: &str, wait: Duration) -> Result<SnapshotInfo, VolumeError> {
        torus_meta::cluster::validate_snapshot_name(name)?;
        let info = self.cluster.volume(volume).await?;
        let held = self.cluster.volume_lock(info.id).await?;
        if held.is_none() || held.as_ref().is_some_and(|(l, _)| l.repair) || self.is_open(volume, true).await {
            let v = self.open(volume, true).await?;
            let snap = v.take_snapshot(name).await;
            if Arc::strong_count(&v) == 1 {
                v.release().await;
            }
            return snap;
        }
        if self.cluster.snapshot(volume, name).await.is_ok() {
            return Err(ClusterError::SnapshotExists { volume: volume.into(), name: name.into() }.into());
        }
        let lease = self.cluster.store().grant_lease(self.opts.lease_ttl).await.map_err(ClusterError::from)?;
        let res = self.ask_writer(&info, name, lease.id, wait).await;
        let _ = self.cluster.withdraw_snapshot_request(info.id, name).await;
        let _ = self.cluster.store().revoke_lease(lease.id).await;
        res
    }

    async fn ask_writer(
        &self,
        info: &VolumeInfo,
        name: &str,
        lease: LeaseId,
        wait: Duration,
    ) -> Result<SnapshotInfo, VolumeError> {
        self.cluster.request_snapshot(info.id, name, &self.opts.holder, lease).await?;
        let deadline = Instant::now() + wait;
        let mut confirmed = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match self.cluster.snapshot(&info.name, name).await {
                Ok(s) => return Ok(s),
                Err(ClusterError::SnapshotNotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(req) = self.cluster.snapshot_request(info.id, name).await? {
                if let Some(reason) = req.error {
                    return Err(VolumeError::Snapshot { reason: format!("the volume's writer refused: {reason}") });
                }
            }
            if self.cluster.volume_lock(info.id).await?.is_none() {
                return Err(VolumeError::Snapshot {
                    reason: "the volume's writer closed it before taking the snapshot; try again".into(),
                });
            }
            if Instant::now() >= deadline {
                return Err(VolumeError::Snapshot {
                    reason: format!("the volume's writer did not take it within {wait:?} (an older torusblk?)"),
                });
            }
            if confirmed.elapsed() >= self.opts.lease_ttl / 3 {
                let sent = Instant::now();
                self.cluster.store().keep_alive(lease).await.map_err(ClusterError::from)?;
                confirmed = sent;
            }
        }
    }

    /// Follows ring changes: every open volume switches to the new placement
    /// (after its in-flight requests finish), then its writer records the new
    /// ring version in its lock, which tells nodes they may move data.
    pub async fn follow_ring(self: Arc<Self>) {
        // Without a change, the loop runs this often (the cluster view wakes it on every change).
        const QUIET: Duration = Duration::from_secs(2);
        // How soon failed steps are retried.
        const SOON: Duration = Duration::from_millis(300);
        let mut seen = 0;
        let mut view = self.cluster.view();
        let mut soon = true;
        loop {
            view.changed(if soon { SOON } else { QUIET }).await;
            soon = true;
            // Everything below comes from the view: no etcd reads while nothing changes.
            let (doc, peers) = match view.read(|s| (s.ring.clone(), s.peers.clone())).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the ring");
                    continue;
                }
            };
            let open: Vec<Arc<Volume>> = self.open.lock().await.values().filter_map(Weak::upgrade).collect();
            // Readers follow the writer's record of copies that missed writes.
            for v in open.iter().filter(|v| v.lease().is_none() && !v.is_snapshot()) {
                let id = v.info().id;
                let Ok((state, info)) = view
                    .read(|s| (s.states.get(&id).cloned().unwrap_or_default(), s.volumes.get(&v.info().name).cloned()))
                    .await
                else {
                    continue;
                };
                v.tracker.follow(state);
                // And its layers: a snapshot or a restore puts a new one in front.
                if let Some(info) = info.filter(|i| i.id == id) {
                    v.follow_chain(info.chain()).await;
                }
            }
            // Peers come and go (a node whose lease lapsed registers again).
            self.pool.set_addresses(peers.into_values().map(|p| (p.id, p.address)).collect());
            // A volume that finished opening after this ring was taken holds
            // the placement (and lock) of the one it opened with: take it too.
            let mut behind = false;
            for v in &open {
                behind |= v.placement_version().await < doc.version;
            }
            if doc.version == seen && !behind {
                soon = false;
                continue;
            }
            let mut ok = true;
            for v in open {
                if v.placement_version().await < doc.version {
                    v.set_placement(placement_of(&doc)).await;
                }
                if let Some(lease) = v.lease() {
                    if let Err(e) = self.cluster.set_lock_ring_version(v.info().id, lease, doc.version).await {
                        tracing::warn!(error = %e, "could not record the ring version in the volume lock");
                        ok = false;
                    }
                }
            }
            if ok {
                tracing::info!(version = doc.version, moving = doc.moving(), "using a new ring");
                seen = doc.version;
                soon = false;
            }
        }
    }
}

/// Keeps the writer's lease alive: each success extends how long writes may
/// go ahead; an expired lease is lost for good (see `lease`).
async fn keep_alive(cluster: Cluster, lease: LeaseId, ttl: Duration, state: Arc<LeaseState>) {
    let mut failing = false;
    loop {
        tokio::time::sleep(ttl / 3).await;
        let sent = Instant::now();
        match cluster.store().keep_alive(lease).await {
            Ok(_) => {
                state.confirmed(sent, ttl);
                if failing {
                    tracing::info!("the volume's lease is confirmed again");
                    failing = false;
                }
            }
            Err(MetaError::LeaseNotFound { .. }) => {
                tracing::error!(lease, "the volume's lease expired; refusing further writes");
                state.lose();
                return;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "could not renew the volume's lease; retrying");
                    failing = true;
                }
            }
        }
        if state.is_lost() {
            return;
        }
    }
}
