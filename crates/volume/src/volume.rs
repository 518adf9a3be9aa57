//! `Volume`: a volume's byte range cut into extents, each extent placed on R
//! nodes by the ring; writes go to every replica and succeed only when all
//! answered; reads go to the first replica that answers.
//!
//! Data path for one NBD write of `len` bytes at `offset`:
//! split at extent boundaries -> for each piece, `ring.replicas(extent, R)`
//! -> one peer-protocol WRITE (carrying the writer's epoch) to each replica,
//! all in parallel -> acknowledged when every replica acknowledged.

use crate::crypt::{Crypt, KeyError, RawIo};
use crate::device::{push_run, BlockDevice, Run};
use crate::layers::Layers;
use crate::pool::PeerPool;
use crate::tracker::Tracker;
use crate::VolumeError;
use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use torus_meta::cluster::{Cluster, SnapshotInfo, VolumeInfo};
use torus_proto::PeerError;
use torus_ring::Ring;
use torus_types::{Epoch, ExtentId, NodeId, VolumeId};
use tracing::Instrument;

/// Where a volume's extents live: the ring, and while data moves, the ring it moves from.
pub struct Placement {
    pub version: u64,
    pub ring: Ring,
    pub previous: Option<Ring>,
    /// What full members answered when asked whether they hold an extent.
    /// Stable for this placement: a full member is sent no extent it does
    /// not hold, so none appears on it.
    held: Mutex<HashMap<(NodeId, ExtentId), bool>>,
    /// Replica sets already computed for this placement, by extent (with the R asked for):
    /// they change only when a full member's answer about the extent is
    /// learnt (then its entry goes). Ranking every member per I/O costs
    /// O(nodes) hashes (~15 µs at 1000 nodes); a hit costs a lookup.
    cached: Mutex<HashMap<ExtentId, (usize, Sets)>>,
}

/// `(old, new)` replicas of one extent.
type Sets = (Vec<NodeId>, Vec<NodeId>);

/// Entries the set cache keeps at most (~100 B each); when full it starts
/// again (the sets are recomputed as they are used).
const CACHED_SETS: usize = 16 * 1024;

impl Placement {
    pub fn new(version: u64, ring: Ring, previous: Option<Ring>) -> Placement {
        Placement { version, ring, previous, held: Mutex::new(HashMap::new()), cached: Mutex::new(HashMap::new()) }
    }

    /// Records full members' answers: whether they hold an extent.
    fn remember(&self, answers: impl IntoIterator<Item = ((NodeId, ExtentId), bool)>) {
        let mut held = self.held.lock().expect("held map poisoned");
        let mut cached = self.cached.lock().expect("placement cache poisoned");
        for ((node, extent), holds) in answers {
            held.insert((node, extent), holds);
            cached.remove(&extent);
        }
    }

    fn has_full(&self) -> bool {
        self.ring.has_full() || self.previous.as_ref().is_some_and(Ring::has_full)
    }

    /// `(old, new)` replicas; `old` is empty unless data moves. `None` from
    /// `holds` (a full member not asked yet) comes back as `Err(node)`.
    fn sets(
        &self,
        extent: ExtentId,
        r: usize,
        holds: impl Fn(NodeId) -> Option<bool>,
    ) -> Result<(Vec<NodeId>, Vec<NodeId>), NodeId> {
        match &self.previous {
            Some(prev) => torus_ring::moving_replicas(prev, &self.ring, extent, r, holds),
            None => Ok((Vec::new(), self.ring.replicas_held(extent, r, holds)?)),
        }
    }

    /// The sets from what full members answered; one that could not be asked
    /// is taken to hold the extent (a write never relies on that: see `learn`).
    fn known_sets(&self, extent: ExtentId, r: usize) -> Sets {
        if let Some((_, sets)) =
            self.cached.lock().expect("placement cache poisoned").get(&extent).filter(|(n, _)| *n == r)
        {
            return sets.clone();
        }
        let sets = self.computed_sets(extent, r);
        let mut cached = self.cached.lock().expect("placement cache poisoned");
        if cached.len() >= CACHED_SETS {
            cached.clear();
        }
        cached.insert(extent, (r, sets.clone()));
        sets
    }

    /// What [`Self::known_sets`] caches, computed.
    fn computed_sets(&self, extent: ExtentId, r: usize) -> Sets {
        if !self.has_full() {
            return self.sets(extent, r, |_| None).expect("nothing to ask while no member is full");
        }
        let held = self.held.lock().expect("held map poisoned");
        self.sets(extent, r, |n| Some(held.get(&(n, extent)).copied().unwrap_or(true)))
            .expect("every question answered")
    }

    /// Asks the full members that decide where `extent` lives whether they
    /// hold it. Nothing to do while no member is full. A writer asks once per
    /// placement: no extent appears on a full member once the writer uses it.
    /// A reader in another process asks `fresh` every time: during the move
    /// that marks a member full, the writer may still create extents there.
    pub async fn learn(&self, extent: ExtentId, r: usize, pool: &PeerPool, fresh: bool) -> Result<(), PeerError> {
        if !self.has_full() {
            return Ok(());
        }
        let mut asked: HashMap<NodeId, bool> = HashMap::new();
        loop {
            let ask = {
                let held = self.held.lock().expect("held map poisoned");
                let known = |n: NodeId| match asked.get(&n) {
                    Some(h) => Some(*h),
                    None if fresh => None,
                    None => held.get(&(n, extent)).copied(),
                };
                match self.sets(extent, r, known) {
                    Ok(_) => break,
                    Err(n) => n,
                }
            };
            let holds = pool.get(ask).await?.holds(extent).await?;
            asked.insert(ask, holds);
        }
        self.remember(asked.into_iter().map(|(n, h)| ((n, extent), h)));
        Ok(())
    }

    /// The extent's replicas in the current ring.
    pub fn replicas(&self, extent: ExtentId, r: usize) -> Vec<NodeId> {
        self.known_sets(extent, r).1
    }

    /// Nodes a write must reach: the replicas in the new ring and, while data moves, in the old one.
    pub fn write_set(&self, extent: ExtentId, r: usize) -> Vec<NodeId> {
        let (old, mut nodes) = self.known_sets(extent, r);
        for n in old {
            if !nodes.contains(&n) {
                nodes.push(n);
            }
        }
        nodes
    }

    /// Nodes to read from, in order, each with whether it may lack data it
    /// should have: while data moves, the old replicas (they have every block)
    /// come first, then the new ones, which are asked for present blocks only.
    pub fn read_order(&self, extent: ExtentId, r: usize) -> Vec<(NodeId, bool)> {
        let (old, new) = self.known_sets(extent, r);
        let moving = self.previous.is_some();
        let mut nodes: Vec<(NodeId, bool)> = old.into_iter().map(|n| (n, false)).collect();
        for n in new {
            if !nodes.iter().any(|(m, _)| *m == n) {
                nodes.push((n, moving));
            }
        }
        nodes
    }
}

pub struct Volume {
    pub(crate) info: VolumeInfo,
    /// Bytes; starts at `info.size` and only grows (`grow`).
    size: AtomicU64,
    pub(crate) epoch: Epoch,
    /// Held for reading by every request; swapped (after in-flight requests drain) on ring changes.
    pub(crate) placement: tokio::sync::RwLock<Arc<Placement>>,
    pub(crate) pool: Arc<PeerPool>,
    pub(crate) read_only: bool,
    /// Set when the writer's lease is gone: writes are refused from then on.
    pub(crate) lease: Arc<crate::lease::LeaseState>,
    /// Write intent, copies that missed writes, per-extent exclusion.
    pub(crate) tracker: Arc<Tracker>,
    /// Per node: extents written there since its last flush, and a counter bumped per write.
    dirty: Mutex<HashMap<NodeId, Dirty>>,
    writes: AtomicU64,
    /// The writer's lock, released when the volume is dropped or closed.
    guard: Option<crate::lease::LockGuard>,
    /// The data layers (see `layers`): I/O holds them for reading, a
    /// snapshot for writing (so it falls between two writes).
    layers: tokio::sync::RwLock<Arc<Layers>>,
    /// The newest layer's id (where writes, resync and catch-up go).
    top: AtomicU64,
    /// Partial writes of blocks the newest layer does not hold yet, one at a time.
    pub(crate) edges: tokio::sync::Mutex<()>,
    /// Opened as `VOLUME@SNAPSHOT`: frozen layers, read-only.
    snapshot: bool,
    /// Whether reads and writes are encrypted, and with what key (see `crypt`).
    crypt: Crypt,
    pub(crate) cluster: Cluster,
}

#[derive(Default)]
struct Dirty {
    generation: u64,
    extents: HashSet<u64>,
}

/// A piece of a request that falls in one extent.
pub(crate) struct Piece {
    pub(crate) extent: ExtentId,
    pub(crate) within: u32,
    /// Offset of this piece in the request.
    pub(crate) at: usize,
    pub(crate) len: u32,
}

impl Volume {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cluster: Cluster,
        info: VolumeInfo,
        epoch: Epoch,
        placement: Placement,
        pool: Arc<PeerPool>,
        read_only: bool,
        lease: Arc<crate::lease::LeaseState>,
        tracker: Arc<Tracker>,
        guard: Option<crate::lease::LockGuard>,
        snapshot: bool,
    ) -> Self {
        // A reader of a live volume cannot keep what its newest layer holds: the writer changes it.
        let layers = Layers::new(info.chain(), !read_only || snapshot);
        Volume {
            top: AtomicU64::new(layers.top().0),
            layers: tokio::sync::RwLock::new(Arc::new(layers)),
            edges: tokio::sync::Mutex::new(()),
            snapshot,
            crypt: Crypt::Plain,
            cluster,
            size: AtomicU64::new(info.size),
            info,
            epoch,
            placement: tokio::sync::RwLock::new(Arc::new(placement)),
            pool,
            read_only,
            lease,
            tracker,
            dirty: Mutex::new(HashMap::new()),
            writes: AtomicU64::new(0),
            guard,
        }
    }

    /// Sets how client I/O is encrypted (before the volume is shared).
    pub(crate) fn with_crypt(mut self, crypt: Crypt) -> Self {
        self.crypt = crypt;
        self
    }

    /// Why client reads and writes would fail, if this process lacks the
    /// volume's key (it can still take snapshots and catch copies up).
    pub fn sealed(&self) -> Option<KeyError> {
        match &self.crypt {
            Crypt::Sealed(e) => Some(e.error()),
            _ => None,
        }
    }

    pub fn info(&self) -> &VolumeInfo {
        &self.info
    }

    /// The layer written now (the volume's own id until its first snapshot).
    pub fn top(&self) -> VolumeId {
        VolumeId(self.top.load(Ordering::Acquire))
    }

    /// Opened as `VOLUME@SNAPSHOT`.
    pub fn is_snapshot(&self) -> bool {
        self.snapshot
    }

    /// The layers read now, newest first.
    pub async fn chain(&self) -> Vec<VolumeId> {
        self.layers.read().await.chain.clone()
    }

    /// A reader of a live volume follows its chain as the metadata has it
    /// now (the writer took a snapshot, or the volume was restored).
    pub async fn follow_chain(&self, chain: Vec<VolumeId>) {
        if self.guard.is_some() || self.snapshot || chain.is_empty() {
            return;
        }
        let mut layers = self.layers.write().await;
        if layers.chain != chain {
            tracing::info!(volume = %self.info.name, ?chain, "the volume's layers changed: reading through the new ones");
            self.top.store(chain[0].0, Ordering::Release);
            *layers = Arc::new(layers.with_chain(chain));
        }
    }

    /// Takes snapshot `name` between two writes: waits for the writes in
    /// flight, flushes (so the snapshot holds every acknowledged write),
    /// then freezes the layers and writes to a new one from then on.
    /// Refused while some copy misses writes (its replicas must agree:
    /// frozen layers are never caught up).
    pub async fn take_snapshot(&self, name: &str) -> Result<SnapshotInfo, VolumeError> {
        let Some(guard) = &self.guard else { return Err(VolumeError::ReadOnly) };
        torus_meta::cluster::validate_snapshot_name(name)?;
        let mut layers = self.layers.write().await;
        self.check_writable().await?;
        BlockDevice::flush(self).await?;
        let missing = self.tracker.missing();
        if let Some((node, extents)) = missing.iter().next() {
            return Err(VolumeError::Snapshot {
                reason: format!(
                    "node {node} misses writes to {} extent(s) of this volume; a snapshot can be taken once it has caught up (or has been removed)",
                    extents.len()
                ),
            });
        }
        let (now, snap) = self.cluster.take_snapshot(&self.info.name, name, self.epoch).await?;
        let frozen = layers.top();
        *layers = Arc::new(layers.with_chain(now.chain()));
        self.top.store(now.top().0, Ordering::Release);
        drop(layers);
        tracing::info!(volume = %self.info.name, snapshot = %name, %frozen, new_layer = %now.top(), "snapshot taken");
        // Seal the frozen layer on every node: no writer, however old, changes it again.
        let members: HashSet<NodeId> = {
            let p = self.placement.read().await;
            p.ring.members().chain(p.previous.iter().flat_map(|r| r.members())).map(|m| m.id).collect()
        };
        for n in members {
            let res = match self.pool.get(n).await {
                Ok(c) => c.fence(frozen, Epoch(u64::MAX)).await.map(drop),
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                tracing::debug!(node = %n, error = %e, "could not seal a frozen layer there (its writer's epoch fences it)");
            }
        }
        let _ = guard;
        Ok(snap)
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Takes a larger size recorded in the metadata (the volume was grown
    /// while open); a smaller one is ignored: volumes never shrink.
    pub fn grow(&self, new_size: u64) -> u64 {
        self.size.fetch_max(new_size, Ordering::AcqRel).max(new_size)
    }

    /// Switches to a new placement once the requests using the old one have finished.
    pub async fn set_placement(&self, p: Placement) {
        *self.placement.write().await = Arc::new(p);
    }

    pub async fn placement_version(&self) -> u64 {
        self.placement.read().await.version
    }

    /// The writer's lease, if this is a writable open.
    pub fn lease(&self) -> Option<torus_meta::LeaseId> {
        self.guard.as_ref().map(|g| g.lease)
    }

    /// A writable open whose lease is gone: it refuses writes for good.
    pub fn lease_lost(&self) -> bool {
        self.guard.is_some() && self.lease.is_lost()
    }

    /// Copies on some node that lack writes, per node (empty when every copy is whole).
    pub fn missing(&self) -> std::collections::BTreeMap<NodeId, torus_meta::cluster::ExtentSet> {
        self.tracker.missing()
    }

    /// Stops writing and releases the writer's lock now (before the last handle is dropped).
    pub async fn release(&self) {
        if self.guard.is_some() && !self.lease.is_lost() {
            if let Err(e) = self.tracker.settle().await {
                tracing::warn!(error = %e, "could not record a clean close; the next writer will resync");
            }
        }
        self.lease.lose();
        if let Some(g) = &self.guard {
            g.release().await;
        }
    }

    /// Gives the lock up without recording a clean close (an open whose
    /// resync failed): the write intent it took over stays for the next writer.
    pub(crate) async fn abandon(&self) {
        self.lease.lose();
        if let Some(g) = &self.guard {
            g.release().await;
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(VolumeError::OutOfRange { offset, len, size: self.size() }),
        }
    }

    /// Refuses writes on a read-only open; holds them while the lease is unconfirmed.
    async fn check_writable(&self) -> Result<(), VolumeError> {
        if self.read_only {
            return Err(VolumeError::ReadOnly);
        }
        self.lease.wait_valid().await
    }

    fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let es = self.info.extent_size;
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let index = pos / es;
            let within = pos % es;
            let n = (es - within).min(end - pos);
            out.push(Piece {
                extent: ExtentId::new(self.top(), index),
                within: within as u32,
                at: (pos - offset) as usize,
                len: n as u32,
            });
            pos += n;
        }
        out
    }

    /// Repairs the corrupt copies of a range on `bad` nodes with the blocks of
    /// node `good` (whole 4 KiB blocks; the nodes replace only blocks that fail
    /// their checksum, so this never undoes a newer write).
    async fn repair(&self, extent: ExtentId, within: u32, len: u32, good: NodeId, bad: &[NodeId]) {
        let bs = torus_types::BLOCK_SIZE as u32;
        let start = within / bs * bs;
        let end = (within + len).div_ceil(bs) * bs;
        let data = match self.pool.get(good).await {
            Ok(c) => match c.read(extent, start, end - start, false).await {
                Ok(d) => Bytes::from(d),
                Err(e) => return tracing::warn!(%extent, error = %e, "could not read a good copy for repair"),
            },
            Err(e) => return tracing::warn!(%extent, error = %e, "could not reach a good copy for repair"),
        };
        for n in bad {
            let res = match self.pool.get(*n).await {
                Ok(c) => c.repair(extent, start, data.clone()).await,
                Err(e) => Err(e),
            };
            match res {
                Ok(blocks) => tracing::warn!(%extent, node = %n, blocks, "repaired a corrupt copy from a good replica"),
                Err(e) => tracing::error!(%extent, node = %n, error = %e, "repairing a corrupt copy failed"),
            }
        }
    }

    /// Reads a range of one extent from the first replica that serves it
    /// (copies that miss writes are skipped if `tracked`: those of the
    /// newest layer of a volume), repairing corrupt copies it met on the way.
    pub(crate) async fn read_extent(
        &self,
        placement: &Placement,
        extent: ExtentId,
        within: u32,
        len: u32,
        tracked: bool,
    ) -> Result<Vec<u8>, VolumeError> {
        let span = tracing::debug_span!("extent", %extent);
        let res = async {
            // A full node that cannot be asked is taken to hold the extent; the read falls through to another copy.
            let _ = placement.learn(extent, self.r(), &self.pool, self.read_only).await;
            let mut nodes = placement.read_order(extent, self.r());
            if nodes.is_empty() {
                return Err(VolumeError::NoNodes);
            }
            // A copy that missed writes is never read before it caught up.
            if tracked {
                nodes.retain(|(n, _)| !self.tracker.is_missing(*n, extent.index));
            }
            if placement.previous.is_none() {
                // Stable ring: any replica will do; prefer one on this host, then the least busy.
                nodes.sort_by_key(|(n, _)| self.pool.read_rank(*n));
            }
            let mut last = String::from("every copy lacks acknowledged writes (waiting for a node to catch up)");
            let mut corrupt = Vec::new();
            for (n, present_only) in nodes {
                let res = match self.pool.get(n).await {
                    Ok(c) => c.read(extent, within, len, present_only).await,
                    Err(e) => Err(e),
                };
                match res {
                    Ok(data) => {
                        if !corrupt.is_empty() {
                            self.repair(extent, within, len, n, &corrupt).await;
                        }
                        return Ok(data);
                    }
                    Err(e) => {
                        tracing::warn!(%extent, node = %n, error = %e, "read failed; trying the next replica");
                        if matches!(e, PeerError::Remote { status: torus_proto::Status::Checksum, .. }) {
                            corrupt.push(n);
                        }
                        last = e.to_string();
                    }
                }
            }
            Err(VolumeError::Unavailable { extent, reason: last })
        }
        .instrument(span.clone())
        .await;
        span.in_scope(|| tracing::debug!(ok = res.is_ok(), within, len, "read"));
        res
    }

    pub(crate) fn r(&self) -> usize {
        self.info.replication as usize
    }

    fn write_error(extent: ExtentId, e: PeerError) -> VolumeError {
        match e {
            PeerError::Fenced { .. } => VolumeError::Fenced { reason: e.to_string() },
            PeerError::Remote { status: torus_proto::Status::NoSpace, .. } => {
                VolumeError::NoSpace { extent, reason: e.to_string() }
            }
            e if e.is_unreachable() => VolumeError::Unavailable { extent, reason: e.to_string() },
            e => VolumeError::Refused { extent, reason: e.to_string() },
        }
    }

    /// Notes that `extent` was written on `nodes` (flush must reach them).
    pub(crate) fn note_written(&self, nodes: &[NodeId], extent: u64) {
        let gen = self.writes.fetch_add(1, Ordering::Relaxed) + 1;
        let mut dirty = self.dirty.lock().expect("dirty lock poisoned");
        for n in nodes {
            let d = dirty.entry(*n).or_default();
            d.generation = gen;
            d.extents.insert(extent);
        }
    }

    /// What to mark missing when `node` fails: `extent`, and every extent
    /// written there since its last flush (a node that restarted may have
    /// lost those).
    fn failure_marks(&self, node: NodeId, extent: Option<u64>) -> Vec<(NodeId, u64)> {
        let mut dirty = self.dirty.lock().expect("dirty lock poisoned");
        let mut marks: Vec<(NodeId, u64)> = extent.into_iter().map(|e| (node, e)).collect();
        if let Some(d) = dirty.remove(&node) {
            marks.extend(d.extents.into_iter().map(|e| (node, e)));
        }
        marks
    }

    /// Sends one mutation to every replica of a piece. Replicas that cannot be
    /// reached are recorded as missing the extent (durably, before this
    /// returns) and the write succeeds on the others; if none took it, it fails.
    pub(crate) async fn replicate<F, Fut>(&self, p: &Placement, extent: ExtentId, op: F) -> Result<(), VolumeError>
    where
        F: Fn(Arc<torus_proto::PeerClient>) -> Fut,
        Fut: std::future::Future<Output = Result<(), PeerError>>,
    {
        let span = tracing::debug_span!("extent", %extent);
        let res = async {
            let _writing = self.tracker.begin_write(extent.index).await?;
            // Where a full node decides where the extent lives, its answer is needed: never guess for a write.
            if let Err(e) = p.learn(extent, self.r(), &self.pool, false).await {
                return Err(VolumeError::Unavailable {
                    extent,
                    reason: format!("cannot tell whether a full node holds this extent: {e}"),
                });
            }
            let all = p.write_set(extent, self.r());
            if all.is_empty() {
                return Err(VolumeError::NoNodes);
            }
            if p.ring.has_full() {
                let placed = p.replicas(extent, self.r()).len();
                if placed < self.r().min(p.ring.len()) {
                    return Err(VolumeError::NoSpace {
                        extent,
                        reason: format!(
                            "only {placed} node(s) with room for a new extent, replication is {}: add nodes or free space",
                            self.r()
                        ),
                    });
                }
            }
            let nodes: Vec<NodeId> = all.iter().copied().filter(|n| !self.tracker.is_missing(*n, extent.index)).collect();
            if nodes.is_empty() {
                return Err(VolumeError::Unavailable {
                    extent,
                    reason: "no replica holds every acknowledged write (waiting for a node to catch up)".into(),
                });
            }
            let results = join_all(nodes.iter().map(|n| {
                let op = &op;
                async move {
                    // A node cut off from etcd refuses writes until it is back: hold and retry.
                    let deadline = std::time::Instant::now() + self.lease.hold();
                    loop {
                        let client = self.pool.get(*n).await?;
                        match op(client).await {
                            Err(PeerError::Remote { status: torus_proto::Status::Isolated, .. })
                                if std::time::Instant::now() < deadline && !self.lease.is_lost() =>
                            {
                                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            }
                            r => return r,
                        }
                    }
                }
            }))
            .await;
            let mut ok = Vec::new();
            let mut unreachable = Vec::new();
            // Replicas that answered with an error (a full disk, a corrupt edge block): the write fails.
            let mut refused = Vec::new();
            let mut fenced = None;
            for (n, r) in nodes.iter().zip(results) {
                match r {
                    Ok(()) => ok.push(*n),
                    // A failed store is written around like an unreachable node: its copy is marked missing.
                    Err(e) if e.is_unreachable() || e.is_store_failed() => unreachable.push((*n, e)),
                    // A newer writer exists: this one marks nothing and stops.
                    Err(e @ PeerError::Fenced { .. }) => fenced = Some(Self::write_error(extent, e)),
                    Err(e) => refused.push((*n, e)),
                }
            }
            self.note_written(&ok, extent.index);
            if let Some(e) = fenced {
                return Err(e);
            }
            if ok.is_empty() {
                let (_, e) = refused.into_iter().chain(unreachable).next().expect("some replica was asked");
                return Err(Self::write_error(extent, e));
            }
            if unreachable.is_empty() && refused.is_empty() {
                return Ok(());
            }
            let filling: HashSet<NodeId> =
                p.read_order(extent, self.r()).into_iter().filter(|(_, f)| *f).map(|(n, _)| n).collect();
            if ok.iter().all(|n| filling.contains(n)) {
                // While data moves, only replicas still being filled took it: none holds the
                // whole extent with this write, and the old ones, which the move copies from,
                // must stay whole. The write fails; the copies that took it are marked missing,
                // so that they are caught up (their blocks made equal again) from an old replica.
                let marks: Vec<(NodeId, u64)> = ok.iter().map(|n| (*n, extent.index)).collect();
                self.tracker.mark_missing(&marks).await?;
                let (_, e) = refused.into_iter().chain(unreachable).next().expect("some replica failed");
                return Err(VolumeError::Unavailable {
                    extent,
                    reason: format!("no replica holding the whole extent took the write (data is moving): {e}"),
                });
            }
            // Some replicas took the write and others did not: those are stale now
            // and must be marked missing (durably, before the answer), whether the
            // write is acknowledged (they were unreachable) or fails (one refused
            // it) — else the copies would disagree with nobody knowing.
            let mut marks = Vec::new();
            for (n, e) in &unreachable {
                tracing::warn!(%extent, node = %n, error = %e, "a replica is unreachable: writing on without it; it will catch up");
                marks.extend(self.failure_marks(*n, Some(extent.index)));
            }
            for (n, e) in &refused {
                tracing::warn!(%extent, node = %n, error = %e, "a replica refused a write the others took: it will catch up");
                marks.push((*n, extent.index));
            }
            let down: HashSet<NodeId> = unreachable.iter().map(|(n, _)| *n).collect();
            let marks = self.spare_sole_copies(p, extent.index, marks, &down);
            self.tracker.mark_missing(&marks).await?;
            if let Some((_, e)) = refused.into_iter().next() {
                return Err(Self::write_error(extent, e));
            }
            // The writer fails (or dies) after recording the missing copy, before its ack.
            fail::fail_point!("volume::after-mark-missing", |_| Err(VolumeError::Unavailable {
                extent,
                reason: "fail point volume::after-mark-missing".into(),
            }));
            Ok(())
        }
        .instrument(span.clone())
        .await;
        span.in_scope(|| tracing::debug!(ok = res.is_ok(), "replicated"));
        res
    }

    /// Whether a replica of `extent` outside `down` holds every acknowledged
    /// write, and every block (while data moves, a new replica may lack some).
    fn whole_copy_outside(&self, p: &Placement, extent: ExtentId, down: &HashSet<NodeId>) -> bool {
        p.read_order(extent, self.r())
            .into_iter()
            .any(|(m, filling)| !filling && !down.contains(&m) && !self.tracker.is_missing(m, extent.index))
    }

    /// Of the marks for nodes that went `down` while writing `written`, drops
    /// those for other extents (marked only because the node may have lost
    /// unflushed writes) whose every other copy is already missing: that node
    /// holds the only copy with every acknowledged write, and marking it would
    /// leave the extent with none to catch up from. Such an extent stays
    /// dirty on the node, so the next flush must reach it (or fail).
    fn spare_sole_copies(
        &self,
        p: &Placement,
        written: u64,
        marks: Vec<(NodeId, u64)>,
        down: &HashSet<NodeId>,
    ) -> Vec<(NodeId, u64)> {
        let mut keep = Vec::with_capacity(marks.len());
        for (n, index) in marks {
            let extent = ExtentId::new(self.top(), index);
            if index == written || self.whole_copy_outside(p, extent, down) {
                keep.push((n, index));
            } else {
                tracing::warn!(%extent, node = %n,
                    "an unreachable node holds the only copy with every write: not marked missing; the next flush must reach it");
                self.note_written(&[n], index);
            }
        }
        keep
    }
}

impl Drop for Volume {
    /// The last handle is gone (its last connection closed): end the write
    /// intent, so that the next writer has nothing to resync, then release the lock.
    fn drop(&mut self) {
        let Some(guard) = self.guard.take() else { return };
        if self.lease.is_lost() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let tracker = self.tracker.clone();
        let closing = guard.closing.clone();
        let task = rt.spawn(async move {
            match tokio::time::timeout(std::time::Duration::from_secs(5), tracker.settle()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not record a clean close; the next writer will resync"),
                Err(_) => tracing::warn!("recording a clean close timed out; the next writer will resync"),
            }
            guard.release().await;
        });
        let mut tasks = closing.lock().expect("closing list poisoned");
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn flush_covers_all_handles(&self) -> bool {
        // Every connection of this process shares this Volume, and a flush
        // flushes every node written through it.
        true
    }

    /// From the block tables of one whole copy of each extent in the range
    /// (at most `ALLOCATION_EXTENTS` extents per call): Data blocks are data,
    /// Absent and Zero blocks read as zeroes with nothing stored.
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Run>, VolumeError> {
        const ALLOCATION_EXTENTS: u64 = 64;
        self.check(offset, len)?;
        let es = self.info.extent_size;
        let len = len.min((offset / es + ALLOCATION_EXTENTS) * es - offset);
        let layers = self.layers.read().await.clone();
        let pieces = self.pieces(offset, len);
        let placement = self.placement.read().await;
        // Per extent, each block's state in the first layer that holds it.
        let tables = join_all(pieces.iter().map(|p| async {
            let mut merged: Vec<(u32, u8)> = Vec::new();
            for (k, layer) in layers.chain.iter().enumerate() {
                let extent = ExtentId::new(*layer, p.extent.index);
                let table = self.whole_copy_table(&placement, extent, k == 0 && !self.snapshot).await?;
                if merged.len() < table.len() {
                    merged.resize(table.len(), (0, 0));
                }
                for (m, t) in merged.iter_mut().zip(table) {
                    if m.1 == 0 {
                        *m = t;
                    }
                }
            }
            Ok::<_, VolumeError>(merged)
        }))
        .await;
        let bs = torus_types::BLOCK_SIZE as u64;
        let mut runs = Vec::new();
        for (p, table) in pieces.iter().zip(tables) {
            let table = table?;
            let (start, end) = (p.within as u64, p.within as u64 + p.len as u64);
            let mut pos = start;
            while pos < end {
                let block = pos / bs;
                let next = ((block + 1) * bs).min(end);
                let data = table.get(block as usize).is_some_and(|(_, state)| *state == torus_proto::BLOCK_DATA);
                push_run(&mut runs, Run { len: next - pos, data });
                pos = next;
            }
        }
        Ok(runs)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, VolumeError> {
        match &self.crypt {
            Crypt::Plain => self.raw_read(offset, len).await,
            Crypt::Key(c) => {
                self.check(offset, len as u64)?;
                c.read(self, offset, len).await
            }
            Crypt::Sealed(e) => Err(e.error().into()),
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
        match &self.crypt {
            Crypt::Plain => self.raw_write(offset, data, fua).await,
            Crypt::Key(c) => {
                self.check(offset, data.len() as u64)?;
                self.check_writable().await?;
                c.write(self, offset, data.len() as u64, Some(data), fua).await
            }
            Crypt::Sealed(e) => Err(e.error().into()),
        }
    }

    async fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        match &self.crypt {
            Crypt::Plain => self.raw_zero(offset, len, fua).await,
            Crypt::Key(c) => {
                self.check(offset, len)?;
                self.check_writable().await?;
                c.write(self, offset, len, None, fua).await
            }
            Crypt::Sealed(e) => Err(e.error().into()),
        }
    }

    /// Flushes every node written since its last flush. A node that cannot be
    /// reached is recorded as missing what it was sent, provided another
    /// replica of each of those extents flushed; otherwise the flush fails.
    async fn flush(&self) -> Result<(), VolumeError> {
        let snapshot: Vec<(NodeId, u64)> =
            self.dirty.lock().expect("dirty lock poisoned").iter().map(|(n, d)| (*n, d.generation)).collect();
        let results = join_all(snapshot.iter().map(|(n, _)| async move {
            let c = self.pool.get(*n).await?;
            c.flush().await
        }))
        .await;
        let mut failed = Vec::new();
        for ((n, _), r) in snapshot.iter().zip(results) {
            match r {
                Ok(()) => {}
                Err(e) if (e.is_unreachable() || e.is_store_failed()) && !self.read_only => failed.push((*n, e)),
                Err(e) => {
                    return Err(VolumeError::Unavailable {
                        extent: ExtentId::new(self.top(), 0),
                        reason: format!("flush on node {n} failed: {e}"),
                    })
                }
            }
        }
        if !failed.is_empty() {
            let down: HashSet<NodeId> = failed.iter().map(|(n, _)| *n).collect();
            let placement = self.placement.read().await.clone();
            let mut marks = Vec::new();
            for (n, e) in &failed {
                tracing::warn!(node = %n, error = %e, "flush could not reach a replica; it will catch up");
                marks.extend(self.failure_marks(*n, None));
            }
            for (_, index) in &marks {
                let extent = ExtentId::new(self.top(), *index);
                if !self.whole_copy_outside(&placement, extent, &down) {
                    return Err(VolumeError::Unavailable {
                        extent,
                        reason: "flush reached no replica that holds every write".into(),
                    });
                }
            }
            self.tracker.mark_missing(&marks).await?;
        }
        let mut dirty = self.dirty.lock().expect("dirty lock poisoned");
        for (n, g) in snapshot {
            if dirty.get(&n).is_some_and(|d| d.generation == g) {
                dirty.remove(&n);
            }
        }
        Ok(())
    }
}

/// The volume's ciphertext (or its plain data, for a volume not
/// encrypted): what the nodes store, through the layers.
impl RawIo for Volume {
    async fn raw_read(&self, offset: u64, len: u32) -> Result<Bytes, VolumeError> {
        self.check(offset, len as u64)?;
        let layers = self.layers.read().await.clone();
        let pieces = self.pieces(offset, len as u64);
        let placement = self.placement.read().await;
        let reads = join_all(pieces.iter().map(|p| async {
            if layers.layered() {
                self.read_layered(&placement, &layers, p.extent.index, p.within, p.len).await
            } else {
                self.read_extent(&placement, p.extent, p.within, p.len, !self.snapshot).await
            }
        }))
        .await;
        if pieces.len() == 1 {
            return reads.into_iter().next().expect("one piece").map(Bytes::from);
        }
        let mut out = BytesMut::zeroed(len as usize);
        for (p, r) in pieces.iter().zip(reads) {
            out[p.at..p.at + p.len as usize].copy_from_slice(&r?);
        }
        Ok(out.freeze())
    }

    async fn raw_write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
        self.check(offset, data.len() as u64)?;
        self.check_writable().await?;
        // Held until the write is done: a snapshot waits for it.
        let held = self.layers.read().await;
        let layers: &Layers = &held;
        let pieces = self.pieces(offset, data.len() as u64);
        let epoch = self.epoch;
        let placement = self.placement.read().await;
        let results = join_all(pieces.iter().map(|p| {
            let chunk = data.slice(p.at..p.at + p.len as usize);
            let placement = &placement;
            async move {
                if layers.layered() {
                    return self.write_layered(placement, layers, p, Some(chunk), fua).await;
                }
                self.replicate(placement, p.extent, move |c| {
                    let chunk = chunk.clone();
                    async move { c.write(p.extent, p.within, chunk, epoch, fua).await }
                })
                .await
            }
        }))
        .await;
        results.into_iter().collect()
    }

    async fn raw_zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.check(offset, len)?;
        self.check_writable().await?;
        // Held until the write is done: a snapshot waits for it.
        let held = self.layers.read().await;
        let layers: &Layers = &held;
        let pieces = self.pieces(offset, len);
        let epoch = self.epoch;
        let placement = self.placement.read().await;
        let results = join_all(pieces.iter().map(|p| {
            let placement = &placement;
            async move {
                if layers.layered() {
                    return self.write_layered(placement, layers, p, None, fua).await;
                }
                self.replicate(placement, p.extent, move |c| async move {
                    c.zero(p.extent, p.within, p.len, epoch, fua).await
                })
                .await
            }
        }))
        .await;
        results.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use torus_ring::Member;
    use torus_types::VolumeId;

    fn ring(ids: &[u64]) -> Ring {
        Ring::new(1, ids.iter().map(|i| Member { id: NodeId(uuid_from(*i)), weight: 1.0, domain: None }).collect())
    }

    fn uuid_from(i: u64) -> uuid::Uuid {
        uuid::Uuid::from_u64_pair(7, i)
    }

    #[test]
    fn moving_placement_writes_both_sets_and_reads_old_first() {
        let p = Placement::new(2, ring(&[1, 2, 3, 4]), Some(ring(&[1, 2, 3])));
        for i in 0..200 {
            let e = ExtentId::new(VolumeId(1), i);
            let old = p.previous.as_ref().unwrap().replicas(e, 2);
            let new = p.ring.replicas(e, 2);
            let w = p.write_set(e, 2);
            assert!(old.iter().chain(&new).all(|n| w.contains(n)), "writes reach old and new replicas");
            let r = p.read_order(e, 2);
            assert_eq!(
                r.iter().take(2).map(|(n, strict)| (*n, *strict)).collect::<Vec<_>>(),
                old.iter().map(|n| (*n, false)).collect::<Vec<_>>()
            );
            for (n, strict) in &r[2..] {
                assert!(*strict && new.contains(n) && !old.contains(n), "new replicas only serve what they have");
            }
        }
        let stable = Placement::new(3, ring(&[1, 2, 3, 4]), None);
        let e = ExtentId::new(VolumeId(1), 5);
        assert_eq!(stable.write_set(e, 2), stable.ring.replicas(e, 2));
        assert!(stable.read_order(e, 2).iter().all(|(_, strict)| !strict));
    }

    #[test]
    fn full_members_get_no_new_extents_from_writes() {
        let full = NodeId(uuid_from(2));
        let plain = ring(&[1, 2, 3, 4, 5]);
        let stable = Placement::new(3, ring(&[1, 2, 3, 4, 5]).with_full([full]), None);
        // Marked full during a move: writes meant for the old replicas must not reach it either.
        let moving = Placement::new(3, ring(&[1, 2, 3, 4, 5]).with_full([full]), Some(plain.clone()));
        let mut checked = 0;
        for i in 0..300 {
            let e = ExtentId::new(VolumeId(1), i);
            let natural = plain.replicas(e, 2);
            if !natural.contains(&full) {
                assert_eq!(stable.write_set(e, 2), natural);
                continue;
            }
            for p in [&stable, &moving] {
                p.remember([((full, e), false)]);
                let w = p.write_set(e, 2);
                assert!(!w.contains(&full) && w.len() == 2, "{w:?}");
                assert!(p.read_order(e, 2).iter().all(|(n, _)| *n != full));
                p.remember([((full, e), true)]);
                assert_eq!(p.write_set(e, 2), natural, "a full node stays a replica of what it holds");
            }
            checked += 1;
        }
        assert!(checked > 50);
    }

    /// The cached placement answers what the uncached function answers, for
    /// random rings (weights, zones, full members, moves) and random orders
    /// of lookups and learnt answers; and it stays bounded.
    #[test]
    fn cached_sets_match_the_uncached_function() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n.max(1)
        };
        for case in 0..200 {
            let size = 3 + next(40);
            let member = |i: u64, zones: u64| Member {
                id: NodeId(uuid_from(i)),
                weight: 1.0 + (i * 7 % 5) as f64,
                domain: (zones > 0).then(|| format!("z{}", i % zones)),
            };
            let zones = next(4);
            let full: Vec<NodeId> = (0..size).filter(|_| next(5) == 0).map(|i| NodeId(uuid_from(i))).collect();
            let ring = Ring::new(2, (0..size).map(|i| member(i, zones)).collect()).with_full(full.clone());
            let previous =
                (next(2) == 0).then(|| Ring::new(1, (0..size - 1 + next(3)).map(|i| member(i, zones)).collect()));
            let p = Placement::new(2, ring, previous);
            let r = 1 + next(3) as usize;
            for _ in 0..300 {
                let e = ExtentId::new(VolumeId(1 + next(2)), next(64));
                if !full.is_empty() && next(4) == 0 {
                    let n = full[next(full.len() as u64) as usize];
                    p.remember([((n, e), next(2) == 0)]);
                }
                let cached = p.known_sets(e, r);
                assert_eq!(cached, p.computed_sets(e, r), "case {case}: extent {e}, R={r}");
            }
            assert!(p.cached.lock().unwrap().len() <= CACHED_SETS);
        }
    }
}
