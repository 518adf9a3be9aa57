//! Making replicas agree again, as the volume's writer:
//!
//! - [`Volume::recover`] at open: the extents the previous writer may have
//!   been writing (its write intent) are resynced from one replica to the
//!   others before the volume is served, so reads never flip between old and
//!   new data depending on which replica answers.
//! - [`Volume::catch_up`] in the background: copies that missed writes while
//!   their node was unreachable are brought up to date once it answers again.
//!
//! Both compare checksum tables and copy only the blocks that differ, with
//! the writer's epoch (so a stale writer cannot do it), under the extent's
//! exclusive lock (so no write to it runs meanwhile).

use crate::{Volume, VolumeError};
use bytes::Bytes;
use std::sync::{Arc, Weak};
use std::time::Duration;
use torus_meta::cluster::ReplicaState;
use torus_proto::{PeerClient, PeerError, BLOCK_DATA};
use torus_types::{ExtentId, NodeId, BLOCK_SIZE};

/// Largest piece copied in one request.
const CHUNK: usize = 1 << 20;

/// What a block of a copy is, as far as reading it goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Zero,
    /// Never written in this layer: in a layered volume, reads fall through
    /// to an older layer (in a volume of one layer, it reads as zeroes: `Zero`).
    Absent,
}

fn kind(e: Option<&(u32, u8)>, layered: bool) -> Kind {
    match e.map_or(0, |e| e.1) {
        BLOCK_DATA => Kind::Data,
        0 if layered => Kind::Absent,
        _ => Kind::Zero,
    }
}

/// Whether two checksum-table entries read the same: equal data, or the same kind of nothing.
fn same(a: Option<&(u32, u8)>, b: Option<&(u32, u8)>, layered: bool) -> bool {
    match (kind(a, layered), kind(b, layered)) {
        (Kind::Data, Kind::Data) => a.map(|e| e.0) == b.map(|e| e.0),
        (x, y) => x == y,
    }
}

/// Makes `target`'s copy of an extent read like `source`'s; returns bytes copied.
#[allow(clippy::too_many_arguments)]
async fn copy_differing(
    layered: bool,
    extent: ExtentId,
    extent_size: u64,
    epoch: torus_types::Epoch,
    source: &PeerClient,
    src: &[(u32, u8)],
    target: &PeerClient,
) -> Result<u64, PeerError> {
    let dst = target.block_sums(extent).await?;
    let blocks = (extent_size as usize).div_ceil(BLOCK_SIZE);
    let mut copied = 0;
    let mut b = 0;
    while b < blocks {
        if same(src.get(b), dst.get(b), layered) {
            b += 1;
            continue;
        }
        let what = kind(src.get(b), layered);
        let mut end = b + 1;
        while end < blocks
            && !same(src.get(end), dst.get(end), layered)
            && kind(src.get(end), layered) == what
            && (end - b) * BLOCK_SIZE < CHUNK
        {
            end += 1;
        }
        let (off, len) = ((b * BLOCK_SIZE) as u32, ((end - b) * BLOCK_SIZE) as u32);
        match what {
            Kind::Data => {
                let bytes = source.read(extent, off, len, false).await?;
                target.write(extent, off, Bytes::from(bytes), epoch, false).await?;
                copied += len as u64;
            }
            Kind::Zero => target.zero(extent, off, len, epoch, false).await?,
            Kind::Absent => target.discard(extent, off, len, epoch).await?,
        }
        b = end;
    }
    Ok(copied)
}

impl Volume {
    /// Copies extent `index` from `source` to `targets`; the caller holds the extent alone.
    async fn resync_one(&self, index: u64, source: NodeId, targets: &[NodeId]) -> Result<u64, PeerError> {
        let extent = ExtentId::new(self.top(), index);
        let layered = self.info.layers.len() > 1 || self.top() != self.info.id;
        let src = self.pool.get(source).await?;
        let sums = src.block_sums(extent).await?;
        let mut copied = 0;
        for t in targets {
            let dst = self.pool.get(*t).await?;
            copied += copy_differing(layered, extent, self.info.extent_size, self.epoch, &src, &sums, &dst).await?;
        }
        self.note_written(targets, index);
        Ok(copied)
    }

    /// Resyncs the extents the previous writer may have left half-written,
    /// then records this writer's clean start. Called once at open, before
    /// the volume is served. Replicas that cannot be reached are recorded as
    /// missing those extents, to be caught up later.
    pub(crate) async fn recover(&self, previous: &ReplicaState) -> Result<(), VolumeError> {
        let placement = self.placement.read().await.clone();
        let mut marks = Vec::new();
        let (mut extents, mut bytes) = (0u64, 0u64);
        // Whether each node answers, asked once per node.
        let mut answers: std::collections::HashMap<NodeId, bool> = std::collections::HashMap::new();
        for &index in &previous.intent.0 {
            if index >= self.info.extent_count() {
                continue;
            }
            let extent = ExtentId::new(self.top(), index);
            let _alone = self.tracker.exclusive(index).await;
            let mut reachable = Vec::new();
            let _ = placement.learn(extent, self.r(), &self.pool, false).await;
            // Old replicas first: while data moves, a new replica may not hold every block yet.
            for (n, filling) in placement.read_order(extent, self.r()) {
                if previous.is_missing(n, index) {
                    continue;
                }
                let up = match answers.get(&n) {
                    Some(up) => *up,
                    None => {
                        let up = match self.pool.get(n).await {
                            Ok(c) => c.ping().await.is_ok(),
                            Err(_) => false,
                        };
                        *answers.entry(n).or_insert(up)
                    }
                };
                if up {
                    reachable.push((n, filling));
                } else {
                    marks.push((n, index));
                }
            }
            let Some(&(source, false)) = reachable.first() else {
                return Err(VolumeError::Unavailable {
                    extent,
                    reason: "no complete replica is reachable to resync what the previous writer left".into(),
                });
            };
            let targets: Vec<NodeId> = reachable[1..].iter().map(|(n, _)| *n).collect();
            match self.resync_one(index, source, &targets).await {
                Ok(n) => bytes += n,
                Err(e) => return Err(VolumeError::Unavailable { extent, reason: format!("resync failed: {e}") }),
            }
            extents += 1;
        }
        if !previous.intent.is_empty() {
            tracing::warn!(
                volume = %self.info.name,
                previous_epoch = %previous.epoch,
                extents,
                bytes,
                unreachable = marks.len(),
                "the previous writer did not close cleanly: resynced the extents it was writing"
            );
        }
        self.tracker.mark_missing(&marks).await?;
        self.tracker.settle().await?;
        crate::BlockDevice::flush(self).await
    }

    /// Catches up copies that missed writes, whenever their node answers,
    /// until the volume is closed.
    pub(crate) async fn catch_up(weak: Weak<Volume>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Some(v) = weak.upgrade() else { return };
            if v.lease.is_lost() {
                return;
            }
            for (node, extents) in v.missing() {
                if let Err(e) = v.catch_up_node(node, extents.0.into_iter().collect()).await {
                    tracing::debug!(%node, error = %e, "cannot catch up this node yet");
                }
            }
        }
    }

    /// Catches up `node`'s copies of `extents` now (a repairer's step; see `repair`).
    pub async fn catch_up_extents(self: &Arc<Self>, node: NodeId, extents: Vec<u64>) -> Result<(), PeerError> {
        self.catch_up_node(node, extents).await
    }

    async fn catch_up_node(self: &Arc<Self>, node: NodeId, extents: Vec<u64>) -> Result<(), PeerError> {
        // Copies on a node that is no longer a replica (removed from the ring) are simply forgotten.
        let placement = self.placement.read().await.clone();
        let mut todo = Vec::new();
        for index in extents {
            let extent = ExtentId::new(self.top(), index);
            if placement.learn(extent, self.r(), &self.pool, false).await.is_err() {
                continue;
            }
            if placement.read_order(extent, self.r()).iter().any(|(n, _)| *n == node) {
                todo.push(index);
            } else {
                self.tracker.caught_up(node, index);
            }
        }
        if todo.is_empty() {
            return Ok(());
        }
        // Tell it about this writer first: a stale writer that reaches it now is refused.
        self.pool.get(node).await?.fence(self.top(), self.epoch).await?;
        let (mut done, mut bytes) = (0usize, 0u64);
        for index in &todo {
            if self.lease.is_lost() {
                break; // released (handed to a client) or lost: a newer writer takes over
            }
            // Held until the copy is done, as a write holds it: the ring does
            // not switch under it (after a move, the nodes delete the copies
            // that moved away once every writer uses the new ring; a copy
            // made from the old placement after that would outlive it).
            let placement = self.placement.read().await;
            let extent = ExtentId::new(self.top(), *index);
            let _alone = self.tracker.exclusive(*index).await;
            let order = placement.read_order(extent, self.r());
            if !order.iter().any(|(n, _)| *n == node) {
                self.tracker.caught_up(node, *index);
                continue;
            }
            let source =
                order.iter().find(|(n, filling)| *n != node && !filling && !self.tracker.is_missing(*n, *index));
            let Some(&(source, _)) = source else { continue };
            bytes += self.resync_one(*index, source, &[node]).await?;
            self.tracker.caught_up(node, *index);
            done += 1;
        }
        if done > 0 {
            tracing::info!(%node, extents = done, bytes, left = todo.len() - done, "a replica caught up");
        }
        Ok(())
    }
}
