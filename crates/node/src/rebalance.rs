//! Moving data when the ring changes (this node's part of it).
//!
//! States, per ring version seen:
//! - `Moving(v)` (the ring document has `previous`): wait until every writer
//!   uses version v (so each write goes to old and new replicas alike), then
//!   for every extent this node is the first live old replica of, copy it to
//!   the new replicas that are not old ones with FILL (which never
//!   overwrites a block a writer has written there), throttled — once its
//!   copy misses no writes (else it waits for the catch-up); flush the
//!   targets; report `done` in `rebalance/<uuid>`. When every node of the old
//!   and the new ring reports done, and no new replica of a moving extent is
//!   recorded as missing writes (else the writer or a repair catches it up
//!   first, from an old replica), any node clears `previous` (CAS).
//! - `Stable(v)` with this node in the ring's `collecting` list (right after a
//!   move): wait until every writer uses v, delete the extents that are no
//!   longer ours, and take this node off the list. The next membership change
//!   waits for the list to empty, so no node ever becomes a replica again
//!   while holding an outdated copy, and no deletion races a later move's copy.
//!
//! Throughout, readers find every block: they read the old replicas first
//! until the move is over, and old copies are deleted only after that.

use crate::error::NodeError;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_meta::cluster::{Cluster, QueuedChange, RebalanceProgress, RingDoc};
use torus_proto::{PeerClient, Transport};
use torus_ring::Ring;
use torus_store::{BlockState, Store};
use torus_types::{ExtentId, NodeId, VolumeId, BLOCK_SIZE};

pub struct Rebalancer {
    pub cluster: Cluster,
    pub store: Arc<Store>,
    pub me: NodeId,
    /// Bytes per second this node copies at most.
    pub rate: u64,
    pub metrics: Arc<crate::metrics::NodeMetrics>,
    /// The share of its capacity at which this node marks itself full.
    pub full_ratio: f64,
    /// How other nodes are reached: TCP, or in-memory nodes in tests.
    pub transport: Arc<dyn Transport>,
}

/// What a node sees of a move in progress.
struct MoveView {
    progress: HashMap<NodeId, RebalanceProgress>,
    alive: HashSet<NodeId>,
}

/// Members of the ring data moves from.
fn prev_members(doc: &RingDoc) -> Vec<NodeId> {
    doc.previous.as_deref().unwrap_or_default().iter().map(|m| m.id).collect()
}

/// How often the live members look for members down past the down-out time.
const DOWN_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Pause before work that failed is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// Largest piece copied at once.
const CHUNK_BLOCKS: usize = 256;

struct Throttle {
    rate: u64,
    start: Instant,
    bytes: u64,
}

impl Throttle {
    async fn take(&mut self, bytes: u64) {
        self.bytes += bytes;
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Where this node stands in a membership change, for the ring it sees.
#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// Not a member (never was, or taken out): delete leftover copies.
    Outside,
    /// Nothing moves: nothing to do.
    Stable,
    /// Data moves to the new members; `copied`: this node's share is done,
    /// so it watches for old replicas dying and for the move to finish.
    Moving { copied: bool },
    /// The move is over: delete the copies that moved away, then report.
    Collecting,
}

impl Phase {
    fn of(doc: &RingDoc, me: NodeId, moved: Option<u64>) -> Phase {
        if !(doc.all_members().iter().any(|m| m.id == me) || doc.collecting.contains(&me)) {
            Phase::Outside
        } else if doc.moving() {
            Phase::Moving { copied: moved == Some(doc.version) }
        } else if doc.collecting.contains(&me) {
            Phase::Collecting
        } else {
            Phase::Stable
        }
    }
}

impl Rebalancer {
    /// Runs forever (until the task is dropped).
    pub async fn run(self) {
        let mut moved: Option<u64> = None;
        let mut clients = HashMap::new();
        let mut down_since = HashMap::new();
        let mut last_down_check = Instant::now() - DOWN_CHECK_EVERY;
        // The ring, peers and progress come from the process's cluster view
        // (followed by a watch: no etcd reads while nothing changes); the
        // loop runs on every change and at least every half second (the full
        // mark, down-out, retries).
        let mut view = self.cluster.view();
        loop {
            view.changed(Duration::from_millis(500)).await;
            let doc = match view.ring().await {
                Ok((doc, _)) => doc,
                Err(e) => {
                    tracing::debug!(error = %e, "rebalancer cannot read the ring");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if Phase::of(&doc, self.me, moved) == Phase::Outside {
                if let Err(e) = self.forget_stale(&doc).await {
                    tracing::warn!(error = %e, "could not delete copies left from an earlier membership");
                }
                continue;
            }
            let full = doc.members.iter().any(|m| m.id == self.me && m.full);
            self.metrics.full.set(full as i64);
            if let Err(e) =
                crate::capacity::update_mark(&self.cluster, &self.store, self.me, &doc, self.full_ratio).await
            {
                tracing::warn!(error = %e, "could not update this node's full mark; will retry");
            }
            // Down-out works in minutes: look at the peer list every few seconds, not every loop.
            if last_down_check.elapsed() >= DOWN_CHECK_EVERY {
                last_down_check = Instant::now();
                if let Err(e) = self.down_out(&doc, &mut down_since).await {
                    tracing::warn!(error = %e, "could not take a node that is down out of the ring");
                }
            }
            let mut phase = Phase::of(&doc, self.me, moved);
            if phase == (Phase::Moving { copied: true }) {
                // One read of everyone's progress and liveness serves both questions.
                match self.view().await {
                    Ok(view) if self.must_cover_more(&doc, &view) => {
                        tracing::warn!(
                            version = doc.version,
                            "an old replica went down during the move: copying its share"
                        );
                        moved = None;
                        phase = Phase::Moving { copied: false };
                    }
                    Ok(view) => {
                        if let Err(e) = self.try_finish(&doc, &view).await {
                            tracing::warn!(error = %e, "could not finish the rebalance");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot read the rebalance progress"),
                }
            }
            if phase == (Phase::Moving { copied: false }) {
                tracing::info!(version = doc.version, "ring changed: moving data");
                match self.move_data(&doc, &mut clients).await {
                    Ok(()) => moved = Some(doc.version),
                    Err(e) => {
                        tracing::warn!(error = %e, "moving data failed; will retry");
                        // Not at once: the attempt itself changed the view (its progress record).
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                }
            } else if phase == Phase::Collecting {
                match self.collect(&doc).await {
                    Ok(n) => {
                        tracing::info!(
                            version = doc.version,
                            deleted = n,
                            "rebalance over: deleted extents that moved away"
                        );
                        if let Err(e) = self.cluster.collected(self.me).await {
                            tracing::warn!(error = %e, "could not report the clean-up; will retry");
                            tokio::time::sleep(RETRY_AFTER).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "deleting moved extents failed; will retry");
                        tokio::time::sleep(RETRY_AFTER).await;
                    }
                }
            }
        }
    }

    /// On a node outside the ring: deletes extent copies left from an earlier
    /// membership (it was taken out while down, and its extents were copied
    /// back up to R elsewhere), so that it never serves or keeps an outdated
    /// copy if it is added again.
    async fn forget_stale(&self, doc: &RingDoc) -> Result<(), NodeError> {
        if doc.version == 0 || doc.members.is_empty() {
            return Ok(());
        }
        let held = self.store.extents()?;
        if held.is_empty() {
            return Ok(());
        }
        // Only if the ring has not changed meanwhile (it could have taken this node in).
        let (now, _) = self.cluster.ring().await?;
        if now.version != doc.version {
            return Ok(());
        }
        tracing::warn!(
            extents = held.len(),
            "this node is not in the ring: deleting the copies left from when it was (they were re-replicated)"
        );
        for stat in held {
            self.store.delete_extent(stat.id)?;
        }
        Ok(())
    }

    /// Takes ring members that have been down longer than the cluster's
    /// down-out time out of the ring (their extents are then copied back up
    /// to R from the other replicas). The live member with the lowest id acts.
    async fn down_out(&self, doc: &RingDoc, down_since: &mut HashMap<NodeId, Instant>) -> Result<(), NodeError> {
        let view = self.cluster.view();
        let limit = view.config().await?.down_out_secs;
        let alive: HashSet<NodeId> = view.peers().await?.into_iter().map(|p| p.id).collect();
        // A member already on its way out (by the move or a queued change) is not taken out twice.
        down_since.retain(|n, _| doc.contains(*n) && !doc.leaving(*n) && !alive.contains(n));
        for m in &doc.members {
            if !alive.contains(&m.id) && !doc.leaving(m.id) {
                down_since.entry(m.id).or_insert_with(Instant::now);
            }
        }
        let leader = doc.members.iter().map(|m| m.id).filter(|n| alive.contains(n)).min();
        // During a move or its clean-up too: the removal is queued, or, for a
        // node that is down, drops it from the move at once (see `remove_from_ring`).
        if limit == 0 || leader != Some(self.me) {
            return Ok(());
        }
        let Some((&node, &since)) = down_since.iter().find(|(_, t)| t.elapsed() >= Duration::from_secs(limit)) else {
            return Ok(());
        };
        match self.cluster.remove_from_ring(node, false).await {
            Ok(ring) if ring.queued.iter().any(|c| *c == QueuedChange::Remove { id: node }) => {
                tracing::warn!(%node, down_secs = since.elapsed().as_secs(), version = ring.version,
                    "a node has been down past the down-out time: its removal is queued behind the change under way");
                down_since.remove(&node);
                Ok(())
            }
            Ok(ring) => {
                tracing::warn!(%node, down_secs = since.elapsed().as_secs(), version = ring.version,
                    "a node has been down past the down-out time: took it out of the ring; its extents are being re-replicated");
                down_since.remove(&node);
                Ok(())
            }
            Err(e) => {
                // Try again after another down-out period, not every half second.
                down_since.insert(node, Instant::now());
                Err(format!("node {node} is down past the down-out time but cannot be taken out: {e}").into())
            }
        }
    }

    /// Waits until every writer of every volume uses ring `version` or newer.
    async fn wait_writers(&self, version: u64) -> Result<(), NodeError> {
        // Tokio's clock: the simulation runs it paused.
        let start = tokio::time::Instant::now();
        let mut warned = 0;
        loop {
            let locks = self.cluster.locks().await?;
            let lagging: Vec<_> = locks.iter().filter(|l| l.ring_version < version).collect();
            if lagging.is_empty() {
                return Ok(());
            }
            let waited = start.elapsed().as_secs() / 10;
            if waited > warned {
                warned = waited;
                tracing::warn!(waiting_for = %lagging[0].holder, ring = lagging[0].ring_version, version,
                    "a writer has not taken the new ring yet");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn client(
        &self,
        clients: &mut HashMap<NodeId, Arc<PeerClient>>,
        addrs: &HashMap<NodeId, String>,
        id: NodeId,
    ) -> Result<Arc<PeerClient>, NodeError> {
        if let Some(c) = clients.get(&id).filter(|c| !c.is_dead()) {
            return Ok(c.clone());
        }
        let addr = addrs.get(&id).ok_or_else(|| format!("node {id} is not registered"))?;
        let c = Arc::new(self.transport.connect(addr, Duration::from_secs(30)).await?);
        clients.insert(id, c.clone());
        Ok(c)
    }

    /// Every registered node's peer address.
    async fn addresses(&self) -> Result<HashMap<NodeId, String>, NodeError> {
        let peers = self.cluster.peers().await?;
        Ok(peers.into_iter().map(|p| (p.id, p.address)).collect())
    }

    /// Each layer's replication (volumes and snapshots are stored as layers), by id.
    async fn replication_by_volume(&self) -> Result<HashMap<VolumeId, usize>, NodeError> {
        Ok(self.cluster.layers().await?.replication)
    }

    /// Each volume's replica state, by the layer it applies to (the volume's newest).
    async fn states_by_layer(&self) -> Result<HashMap<VolumeId, torus_meta::cluster::ReplicaState>, NodeError> {
        let top = self.cluster.layers().await?.top;
        let states = self.cluster.replica_states().await?;
        Ok(states.into_iter().map(|(vol, s)| (top.get(&vol).copied().unwrap_or(vol), s)).collect())
    }

    async fn move_data(&self, doc: &RingDoc, clients: &mut HashMap<NodeId, Arc<PeerClient>>) -> Result<(), NodeError> {
        self.wait_writers(doc.version).await?;
        let prev = doc.placement_of(doc.previous.as_deref().unwrap_or_default());
        let next = doc.placement();
        let volumes = self.replication_by_volume().await?;
        let addrs = self.addresses().await?;
        let states = self.states_by_layer().await?;
        let missing = |n: NodeId, e: ExtentId| states.get(&e.volume).is_some_and(|s| s.is_missing(n, e.index));
        let mut plan: Vec<(ExtentId, Vec<NodeId>)> = Vec::new();
        let mut held = HashMap::new();
        // The extents this node holds, and those it misses writes of (it may hold no file yet).
        let mut mine: std::collections::BTreeSet<ExtentId> = self.store.extents()?.into_iter().map(|s| s.id).collect();
        for (vol, state) in &states {
            if let Some(set) = state.missing.get(&self.me) {
                mine.extend(set.0.iter().map(|i| ExtentId::new(*vol, *i)));
            }
        }
        let mut waiting = Vec::new();
        for id in mine {
            let Some(r) = volumes.get(&id.volume) else { continue };
            let (old, new) = self.moving_sets(&prev, &next, id, *r, clients, &addrs, &mut held).await?;
            // One copier per extent, the same whoever asks and whenever: the first
            // old replica that is registered. (Skipping copies that miss writes here
            // made the choice depend on when each node looked: one that had looked
            // while another's copy missed writes, and one that looked after it was
            // caught up, could each leave the extent to the other.)
            let copier = old.iter().find(|n| addrs.contains_key(*n));
            tracing::debug!(extent = %id, ?old, ?new, ?copier, "who copies an extent that moves");
            let targets: Vec<NodeId> = new.into_iter().filter(|n| !old.contains(n)).collect();
            if copier != Some(&self.me) || targets.is_empty() {
                continue;
            }
            // Copies that missed writes (their writer records them) are never copied
            // from: this one waits until the writer, or a repair, catches it up.
            if missing(self.me, id) {
                waiting.push(id);
            } else {
                plan.push((id, targets));
            }
        }
        let assumed_down = prev_members(doc).into_iter().filter(|n| !addrs.contains_key(n)).collect();
        let mut progress = RebalanceProgress {
            ring_version: doc.version,
            extents_total: plan.len() as u64,
            assumed_down,
            ..Default::default()
        };
        self.cluster.put_progress(self.me, &progress).await?;
        // The node dies right after recording its plan (the test restarts it).
        fail::fail_point!("rebalance::after-progress", |_| std::process::abort());
        let mut throttle = Throttle { rate: self.rate, start: Instant::now(), bytes: 0 };
        let mut touched = HashSet::new();
        for (i, (extent, targets)) in plan.iter().enumerate() {
            let mut tc = Vec::new();
            for t in targets {
                tc.push(self.client(clients, &addrs, *t).await?);
                touched.insert(*t);
            }
            let bytes = self.copy_extent(*extent, &tc, &mut throttle).await?;
            tracing::debug!(%extent, ?targets, bytes, "copied an extent that moves");
            progress.bytes_copied += bytes;
            progress.extents_done = i as u64 + 1;
            crate::metrics::NodeMetrics::inc(&self.metrics.rebalance_bytes, bytes);
            self.metrics.rebalance_extents_done.set(progress.extents_done as i64);
            if i % 16 == 15 {
                let _ = self.cluster.put_progress(self.me, &progress).await;
                fail::fail_point!("rebalance::after-progress", |_| std::process::abort());
            }
        }
        for t in touched {
            self.client(clients, &addrs, t).await?.flush().await?;
        }
        if let Some(first) = waiting.first() {
            return Err(format!(
                "{} extent(s) to copy (first {first}) miss writes here: waiting for them to be caught up",
                waiting.len()
            )
            .into());
        }
        progress.done = true;
        self.cluster.put_progress(self.me, &progress).await?;
        tracing::info!(
            version = doc.version,
            extents = plan.len(),
            bytes = progress.bytes_copied,
            "moved this node's share"
        );
        Ok(())
    }

    /// `(old, new)` replicas of an extent this node holds, while data moves
    /// from `prev` to `next` (pass one ring twice for a stable one), asking
    /// full nodes (and those standing in for them) whether they hold it
    /// (see `torus_ring::moving_replicas`); this node holds it.
    #[allow(clippy::too_many_arguments)]
    async fn moving_sets(
        &self,
        prev: &Ring,
        next: &Ring,
        extent: ExtentId,
        r: usize,
        clients: &mut HashMap<NodeId, Arc<PeerClient>>,
        addrs: &HashMap<NodeId, String>,
        held: &mut HashMap<(NodeId, ExtentId), bool>,
    ) -> Result<(Vec<NodeId>, Vec<NodeId>), NodeError> {
        loop {
            let known = |n: NodeId| if n == self.me { Some(true) } else { held.get(&(n, extent)).copied() };
            let ask = match torus_ring::moving_replicas(prev, next, extent, r, known) {
                Ok(sets) => return Ok(sets),
                Err(n) => n,
            };
            let c = self.client(clients, addrs, ask).await?;
            let holds = c
                .holds(extent)
                .await
                .map_err(|e| format!("cannot ask node {ask} whether it holds {extent} (a full node decides): {e}"))?;
            held.insert((ask, extent), holds);
        }
    }

    /// Copies one extent's written blocks to the targets; returns bytes copied.
    async fn copy_extent(
        &self,
        extent: ExtentId,
        targets: &[Arc<PeerClient>],
        throttle: &mut Throttle,
    ) -> Result<u64, NodeError> {
        let states = self.store.block_states(extent)?.unwrap_or_default();
        let mut copied = 0;
        let mut b = 0;
        while b < states.len() {
            let state = states[b];
            let mut end = b + 1;
            while end < states.len() && states[end] == state && end - b < CHUNK_BLOCKS {
                end += 1;
            }
            let (off, len) = ((b * BLOCK_SIZE) as u32, ((end - b) * BLOCK_SIZE) as u32);
            match state {
                BlockState::Absent => {}
                BlockState::Zero => {
                    for t in targets {
                        t.fill(extent, off, len, None).await?;
                    }
                }
                BlockState::Data => {
                    let mut buf = vec![0u8; len as usize];
                    self.store.read(extent, off as u64, &mut buf)?;
                    let data = Bytes::from(buf);
                    for t in targets {
                        t.fill(extent, off, len, Some(data.clone())).await?;
                    }
                    copied += len as u64;
                    throttle.take(len as u64).await;
                }
            }
            b = end;
        }
        Ok(copied)
    }

    /// Every node's progress and which nodes are registered, as the cluster view has them.
    async fn view(&self) -> Result<MoveView, NodeError> {
        let view = self.cluster.view();
        let progress = view.progress().await?.into_iter().collect();
        let alive = view.peers().await?.into_iter().map(|p| p.id).collect();
        Ok(MoveView { progress, alive })
    }

    /// Whether an old replica this node counted on to copy its share is now
    /// down without having done so (then this node copies it too).
    fn must_cover_more(&self, doc: &RingDoc, view: &MoveView) -> bool {
        let MoveView { progress, alive } = view;
        let Some(mine) = progress.get(&self.me).filter(|p| p.ring_version == doc.version) else { return false };
        prev_members(doc).into_iter().any(|n| {
            let done = progress.get(&n).is_some_and(|p| p.ring_version == doc.version && p.done);
            !done && !alive.contains(&n) && !mine.assumed_down.contains(&n)
        })
    }

    /// Clears `previous` once every node of the old and the new ring has moved
    /// its share. A node removed from the ring while down for good is not
    /// waited for once every other node copied its share in its place.
    async fn try_finish(&self, doc: &RingDoc, view: &MoveView) -> Result<(), NodeError> {
        let MoveView { progress, alive } = view;
        let done = |n: NodeId| progress.get(&n).filter(|p| p.ring_version == doc.version && p.done);
        let mut gone = Vec::new();
        for m in doc.all_members() {
            if done(m.id).is_some() {
                continue;
            }
            let removed = !doc.contains(m.id);
            let covered = doc
                .all_members()
                .iter()
                .filter(|o| o.id != m.id && alive.contains(&o.id))
                .all(|o| done(o.id).is_some_and(|p| p.assumed_down.contains(&m.id)));
            if removed && !alive.contains(&m.id) && covered {
                gone.push(m.id);
                continue;
            }
            if !alive.contains(&m.id) {
                tracing::debug!(node = %m.id, "waiting for a node that is down to come back");
            }
            return Ok(());
        }
        if let Some((node, extent)) = self.missing_on_a_new_replica(doc).await? {
            tracing::debug!(%node, %extent, "a new replica of a moving extent misses writes: the move ends once it is caught up");
            return Ok(());
        }
        if !gone.is_empty() {
            tracing::warn!(nodes = ?gone, "finishing without removed nodes that are down: their shares were copied from the other replicas");
        }
        if self.cluster.finish_rebalance(doc.version, &gone).await? {
            tracing::info!(version = doc.version, "every node has moved its data: rebalance finished");
        }
        Ok(())
    }

    /// A copy on a new replica of an extent that moves which misses
    /// acknowledged writes (its writer recorded it). The move does not end
    /// while there is one: FILL never overwrites a block the copy holds, so
    /// an outdated block stays outdated until the writer (or a repair)
    /// catches the copy up from an old replica — and once the move ends, the
    /// old copies, maybe the only whole ones, are deleted.
    async fn missing_on_a_new_replica(&self, doc: &RingDoc) -> Result<Option<(NodeId, ExtentId)>, NodeError> {
        let prev = doc.placement_of(doc.previous.as_deref().unwrap_or_default());
        let next = doc.placement();
        let volumes = self.replication_by_volume().await?;
        for (vol, state) in self.states_by_layer().await? {
            let Some(&r) = volumes.get(&vol) else { continue };
            for (node, set) in &state.missing {
                for &index in &set.0 {
                    let extent = ExtentId::new(vol, index);
                    let new: HashSet<NodeId> = next.replicas(extent, r).into_iter().collect();
                    let old: HashSet<NodeId> = prev.replicas(extent, r).into_iter().collect();
                    if new.contains(node) && new != old {
                        return Ok(Some((*node, extent)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Deletes the extents this node no longer holds a replica of; returns how many.
    async fn collect(&self, doc: &RingDoc) -> Result<usize, NodeError> {
        self.wait_writers(doc.version).await?;
        let ring = doc.placement();
        // Every id below next-id is allocated: one not listed was deleted.
        let next_id = self.cluster.next_volume_id().await?;
        let volumes = self.replication_by_volume().await?;
        let addrs = self.addresses().await?;
        let (mut clients, mut held) = (HashMap::new(), HashMap::new());
        let mut deleted = 0;
        for stat in self.store.extents()? {
            let keep = match volumes.get(&stat.id.volume) {
                Some(r) => {
                    let sets = self.moving_sets(&ring, &ring, stat.id, *r, &mut clients, &addrs, &mut held).await?;
                    sets.1.contains(&self.me)
                }
                None => stat.id.volume.0 >= next_id,
            };
            if !keep {
                self.store.delete_extent(stat.id)?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}
