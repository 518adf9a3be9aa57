//! Returning the space a deleted snapshot held: its newest layer `L` stays
//! in the chains of the volume and of later snapshots (they read through
//! it), but a block of `L` that every layer directly above it holds is
//! read by nobody any more, and is made Absent (hole punched) on `L`'s
//! copies.
//!
//! "Holds" must be true for good: the block is present on *every* copy of
//! the layer above, after every node flushed. A block present on every copy
//! cannot become absent again (a resync copies from a copy that has it;
//! zeroing makes blocks Zero, not Absent), so no read can fall through to
//! `L` for it. Copies that cannot be asked, and extents while data moves,
//! are left as they are (a later delete or the next release reclaims them).
//! The layers above only gain blocks meanwhile, so the answer can only be
//! too cautious, never wrong.

use crate::manager::placement_of;
use crate::pool::PeerPool;
use crate::{VolumeError, VolumeManager};
use std::collections::HashSet;
use torus_meta::cluster::SnapshotInfo;
use torus_proto::BLOCK_DATA;
use torus_types::{Epoch, ExtentId, NodeId, VolumeId, BLOCK_SIZE};

/// What a reclaim did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reclaimed {
    /// Blocks made absent on the deleted snapshot's layer (on each of its copies).
    pub blocks: u64,
    /// Why nothing could be done now, if so.
    pub skipped: Option<String>,
}

impl VolumeManager {
    /// Frees the blocks of deleted snapshot `snap`'s newest layer that every
    /// layer above it holds (see the module's text). Call after its record
    /// is deleted. A layer nobody uses any more is left to the collector.
    pub async fn reclaim_snapshot(&self, snap: &SnapshotInfo) -> Result<Reclaimed, VolumeError> {
        let Some(&layer) = snap.layers.first() else { return Ok(Reclaimed::default()) };
        let cluster = self.cluster();
        let doc = self.refresh_peers().await?;
        if doc.moving() || !doc.collecting.is_empty() {
            return Ok(Reclaimed { skipped: Some("data is moving between nodes".into()), ..Default::default() });
        }
        // The layers directly above `layer` in every chain that has it.
        let chains = cluster
            .volumes()
            .await?
            .into_iter()
            .map(|v| v.chain())
            .chain(cluster.snapshots(None).await?.into_iter().map(|s| s.layers));
        let mut above: HashSet<VolumeId> = HashSet::new();
        for chain in chains {
            if let Some(p) = chain.iter().position(|l| *l == layer) {
                if p > 0 {
                    above.insert(chain[p - 1]);
                }
            }
        }
        if above.is_empty() {
            return Ok(Reclaimed::default()); // nobody reads it: the collector deletes it
        }
        let placement = placement_of(&doc);
        let pool = self.pool();
        let r = snap.replication as usize;
        // Every acknowledged write to the layers above is durable from here on.
        for m in doc.members.iter() {
            if let Ok(c) = pool.get(m.id).await {
                let _ = c.flush().await;
            }
        }
        let mut blocks = 0;
        for index in 0..snap.size.div_ceil(snap.extent_size) {
            let extent = ExtentId::new(layer, index);
            let _ = placement.learn(extent, r, pool, true).await;
            let copies: Vec<NodeId> = placement.read_order(extent, r).into_iter().map(|(n, _)| n).collect();
            let Some(mine) = table_of_any(pool, extent, &copies).await else { continue };
            let mut free: Vec<bool> = mine.iter().map(|(_, s)| *s == BLOCK_DATA).collect();
            if !free.iter().any(|f| *f) {
                continue;
            }
            for child in &above {
                let e = ExtentId::new(*child, index);
                let _ = placement.learn(e, r, pool, true).await;
                for (n, _) in placement.read_order(e, r) {
                    let table = match pool.get(n).await {
                        Ok(c) => c.block_sums(e).await.ok(),
                        Err(_) => None,
                    };
                    let Some(table) = table else {
                        free.fill(false);
                        break;
                    };
                    for (b, f) in free.iter_mut().enumerate() {
                        *f &= table.get(b).is_some_and(|(_, s)| *s != 0);
                    }
                }
            }
            blocks += discard(pool, extent, &copies, &free).await;
        }
        tracing::info!(snapshot = %snap.full_name(), %layer, blocks, "freed the blocks of a deleted snapshot that newer layers replaced");
        Ok(Reclaimed { blocks, skipped: None })
    }
}

async fn table_of_any(pool: &PeerPool, extent: ExtentId, nodes: &[NodeId]) -> Option<Vec<(u32, u8)>> {
    for n in nodes {
        if let Ok(c) = pool.get(*n).await {
            if let Ok(t) = c.block_sums(extent).await {
                return Some(t);
            }
        }
    }
    None
}

/// Makes the `free` blocks absent on every copy; returns how many there were.
async fn discard(pool: &PeerPool, extent: ExtentId, copies: &[NodeId], free: &[bool]) -> u64 {
    let mut ranges = Vec::new();
    let mut b = 0;
    while b < free.len() {
        if !free[b] {
            b += 1;
            continue;
        }
        let start = b;
        while b < free.len() && free[b] {
            b += 1;
        }
        ranges.push((start, b));
    }
    for n in copies {
        let Ok(c) = pool.get(*n).await else { continue };
        for (s, e) in &ranges {
            let (off, len) = ((s * BLOCK_SIZE) as u32, ((e - s) * BLOCK_SIZE) as u32);
            // A frozen layer is sealed at the largest epoch: only that passes.
            if let Err(err) = c.discard(extent, off, len, Epoch(u64::MAX)).await {
                tracing::warn!(%extent, node = %n, error = %err, "could not free blocks of a deleted snapshot there");
                break;
            }
        }
    }
    ranges.iter().map(|(s, e)| (e - s) as u64).sum()
}
