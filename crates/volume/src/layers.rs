//! Copy-on-write layers in the data path (snapshots and clones; the
//! metadata side is `torus_meta::cluster::snapshots`).
//!
//! A volume reads through its chain of layers, newest first: each block
//! comes from the first layer where it is present (Data or Zero; Absent
//! means "never written here"), or reads as zeroes. Only the newest layer
//! is written. What each layer holds is learnt per extent from a whole
//! copy's block table (BLOCK_SUMS, one request per extent and layer) and
//! kept in memory as a presence map: for good for frozen layers, and for
//! the written layer by its writer, which updates it as its writes land.
//!
//! Writes of part of a block that the newest layer does not hold yet
//! would otherwise merge with zeroes on the node: the writer first reads
//! the block through the chain and writes it whole (under one lock, so two
//! such writes to one block cannot lose each other's bytes). Zeroing makes
//! blocks Zero, never Absent, so a trimmed block never shows older data.
//!
//! A volume with one layer takes none of these paths.

use crate::volume::{Piece, Placement};
use crate::{Volume, VolumeError};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use torus_types::{ExtentId, NodeId, VolumeId, BLOCK_SIZE};

/// Which blocks of one extent a layer holds.
type Presence = Arc<Vec<bool>>;

/// One (layer, extent)'s map once learnt; its lock is held while it is learnt.
type Slot = Arc<tokio::sync::Mutex<Option<Presence>>>;

/// Presence maps kept at most for this many (layer, extent) pairs (1 KiB
/// each with 4 MiB extents); past it the cache starts again.
const MAX_MAPS: usize = 65_536;

/// A volume's layers as one open uses them.
pub struct Layers {
    /// Newest first; never empty.
    pub chain: Vec<VolumeId>,
    /// Whether the newest layer's map may be kept: only its writer sees
    /// every change (a reader of a live volume asks each time).
    cache_top: bool,
    maps: Mutex<HashMap<(VolumeId, u64), Slot>>,
}

impl Layers {
    pub fn new(chain: Vec<VolumeId>, cache_top: bool) -> Layers {
        assert!(!chain.is_empty(), "a volume has a layer");
        Layers { chain, cache_top, maps: Mutex::new(HashMap::new()) }
    }

    /// The same maps under another chain (a snapshot put a new empty layer in
    /// front, or the volume was restored): frozen layers' maps stay true.
    pub fn with_chain(&self, chain: Vec<VolumeId>) -> Layers {
        let maps = self.maps.lock().expect("layer maps poisoned").clone();
        Layers { chain, cache_top: self.cache_top, maps: Mutex::new(maps) }
    }

    pub fn top(&self) -> VolumeId {
        self.chain[0]
    }

    pub fn layered(&self) -> bool {
        self.chain.len() > 1
    }

    /// Drops what is known of one (layer, extent): it is learnt again when next needed.
    fn forget(&self, layer: VolumeId, index: u64) {
        self.maps.lock().expect("layer maps poisoned").remove(&(layer, index));
    }

    fn slot(&self, layer: VolumeId, index: u64) -> Slot {
        let mut maps = self.maps.lock().expect("layer maps poisoned");
        if maps.len() >= MAX_MAPS && !maps.contains_key(&(layer, index)) {
            maps.clear();
        }
        maps.entry((layer, index)).or_default().clone()
    }
}

fn block(offset: u32) -> usize {
    offset as usize / BLOCK_SIZE
}

impl Volume {
    /// Which blocks of extent `index` layer `k` holds, from a whole copy.
    async fn presence(&self, p: &Placement, layers: &Layers, k: usize, index: u64) -> Result<Presence, VolumeError> {
        let layer = layers.chain[k];
        // Only the newest layer of a volume has copies that may miss writes.
        let tracked = k == 0 && !self.is_snapshot();
        if k == 0 && !layers.cache_top {
            return self.fetch_presence(p, ExtentId::new(layer, index), tracked).await;
        }
        let slot = layers.slot(layer, index);
        let mut held = slot.lock().await;
        if let Some(m) = held.as_ref() {
            return Ok(m.clone());
        }
        let m = self.fetch_presence(p, ExtentId::new(layer, index), tracked).await?;
        *held = Some(m.clone());
        Ok(m)
    }

    async fn fetch_presence(&self, p: &Placement, extent: ExtentId, tracked: bool) -> Result<Presence, VolumeError> {
        let table = self.whole_copy_table(p, extent, tracked).await?;
        Ok(Arc::new(table.iter().map(|(_, state)| *state != 0).collect()))
    }

    /// The block table of one copy of `extent` that holds every block (and,
    /// if `tracked`, every acknowledged write).
    pub(crate) async fn whole_copy_table(
        &self,
        p: &Placement,
        extent: ExtentId,
        tracked: bool,
    ) -> Result<Vec<(u32, u8)>, VolumeError> {
        let _ = p.learn(extent, self.r(), &self.pool, self.read_only).await;
        let mut nodes: Vec<NodeId> = p
            .read_order(extent, self.r())
            .into_iter()
            .filter(|(n, filling)| !(*filling || tracked && self.tracker.is_missing(*n, extent.index)))
            .map(|(n, _)| n)
            .collect();
        nodes.sort_by_key(|n| self.pool.read_rank(*n));
        let mut last = String::from("no copy holds every acknowledged write (waiting for a node to catch up)");
        for n in nodes {
            let res = match self.pool.get(n).await {
                Ok(c) => c.block_sums(extent).await,
                Err(e) => Err(e),
            };
            match res {
                Ok(table) => return Ok(table),
                Err(e) => last = e.to_string(),
            }
        }
        Err(VolumeError::Unavailable { extent, reason: last })
    }

    /// Records that the newest layer now holds blocks `[first, end)` of extent `index`.
    async fn mark_present(&self, layers: &Layers, index: u64, first: usize, end: usize) {
        if !layers.cache_top || first >= end {
            return;
        }
        let slot = layers.slot(layers.top(), index);
        let mut held = slot.lock().await;
        // Not learnt yet: whoever learns it later asks after this write landed.
        if let Some(m) = held.as_mut() {
            if m.len() < end || m[first..end].iter().any(|p| !p) {
                let mut v = m.to_vec();
                if v.len() < end {
                    v.resize(end, false);
                }
                v[first..end].fill(true);
                *m = Arc::new(v);
            }
        }
    }

    /// Reads a piece of extent `index` through the layers.
    pub(crate) async fn read_layered(
        &self,
        p: &Placement,
        layers: &Layers,
        index: u64,
        within: u32,
        len: u32,
    ) -> Result<Vec<u8>, VolumeError> {
        let (first, end) = (block(within), (within + len).div_ceil(BLOCK_SIZE as u32) as usize);
        let mut source: Vec<Option<usize>> = vec![None; end - first];
        let mut unknown = source.len();
        for k in 0..layers.chain.len() {
            if unknown == 0 {
                break;
            }
            let map = self.presence(p, layers, k, index).await?;
            for (b, s) in (first..end).zip(source.iter_mut()) {
                if s.is_none() && map.get(b).copied().unwrap_or(false) {
                    *s = Some(k);
                    unknown -= 1;
                }
            }
        }
        let mut out = vec![0u8; len as usize];
        let mut b = first;
        while b < end {
            let src = source[b - first];
            let mut e = b + 1;
            while e < end && source[e - first] == src {
                e += 1;
            }
            if let Some(k) = src {
                let from = ((b * BLOCK_SIZE) as u32).max(within);
                let to = ((e * BLOCK_SIZE) as u32).min(within + len);
                let extent = ExtentId::new(layers.chain[k], index);
                let tracked = k == 0 && !self.is_snapshot();
                let data = self.read_extent(p, extent, from, to - from, tracked).await?;
                out[(from - within) as usize..(to - within) as usize].copy_from_slice(&data);
            }
            b = e;
        }
        Ok(out)
    }

    /// Writes (`data`) or zeroes (`None`) a piece of the newest layer of a
    /// layered volume: edge blocks the layer does not hold yet are written
    /// whole, with the rest of the block read through the chain.
    pub(crate) async fn write_layered(
        &self,
        p: &Placement,
        layers: &Layers,
        piece: &Piece,
        data: Option<Bytes>,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let res = async {
            let bs = BLOCK_SIZE as u32;
            let (start, end) = (piece.within, piece.within + piece.len);
            let index = piece.extent.index;
            // Up to three segments: a partial head block, whole blocks, a partial tail block.
            let head_end = if start % bs == 0 { start } else { ((start / bs + 1) * bs).min(end) };
            let tail_start = if end % bs == 0 || end <= head_end { end } else { (end / bs * bs).max(head_end) };
            let slice =
                |from: u32, to: u32| data.as_ref().map(|d| d.slice((from - start) as usize..(to - start) as usize));
            if head_end < tail_start {
                self.send(p, piece.extent, head_end, tail_start - head_end, slice(head_end, tail_start), fua).await?;
                self.mark_present(layers, index, block(head_end), block(tail_start)).await;
            }
            for (from, to) in [(start, head_end), (tail_start, end)] {
                if from < to {
                    self.write_edge(p, layers, piece.extent, from, to, slice(from, to), fua).await?;
                }
            }
            Ok(())
        }
        .await;
        // A failed write may have landed on every copy, unknown to the map: learn it again.
        if res.is_err() {
            layers.forget(layers.top(), piece.extent.index);
        }
        res
    }

    /// Part of one block: sent as it is if the newest layer holds the block,
    /// else the whole block as the chain reads it, with the part replaced.
    #[allow(clippy::too_many_arguments)]
    async fn write_edge(
        &self,
        p: &Placement,
        layers: &Layers,
        extent: ExtentId,
        from: u32,
        to: u32,
        data: Option<Bytes>,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let b = block(from);
        let held = |m: &Presence| m.get(b).copied().unwrap_or(false);
        if held(&self.presence(p, layers, 0, extent.index).await?) {
            return self.send(p, extent, from, to - from, data, fua).await;
        }
        let _edges = self.edges.lock().await;
        if held(&self.presence(p, layers, 0, extent.index).await?) {
            return self.send(p, extent, from, to - from, data, fua).await;
        }
        let bs = BLOCK_SIZE as u32;
        let at = b as u32 * bs;
        let mut whole = BytesMut::from(&self.read_layered(p, layers, extent.index, at, bs).await?[..]);
        let part = &mut whole[(from - at) as usize..(to - at) as usize];
        match &data {
            Some(d) => part.copy_from_slice(d),
            None => part.fill(0),
        }
        self.send(p, extent, at, bs, Some(whole.freeze()), fua).await?;
        self.mark_present(layers, extent.index, b, b + 1).await;
        Ok(())
    }

    /// One replicated WRITE (or ZERO) to the newest layer.
    async fn send(
        &self,
        p: &Placement,
        extent: ExtentId,
        within: u32,
        len: u32,
        data: Option<Bytes>,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let epoch = self.epoch();
        match data {
            Some(d) => {
                self.replicate(p, extent, move |c| {
                    let d = d.clone();
                    async move { c.write(extent, within, d, epoch, fua).await }
                })
                .await
            }
            None => {
                self.replicate(p, extent, move |c| async move { c.zero(extent, within, len, epoch, fua).await }).await
            }
        }
    }
}

impl Volume {
    /// Takes the snapshots other processes ask this writer for
    /// (`torusctl volume snapshot create` while a client has the volume),
    /// until the volume is closed: woken by a watch, and every half minute
    /// in case the watch stalled.
    pub(crate) async fn serve_snapshot_requests(weak: std::sync::Weak<Volume>) {
        let Some(v) = weak.upgrade() else { return };
        let mut watch = v.cluster.snapshot_request_watch(v.info().id);
        drop(v);
        loop {
            watch.wait(std::time::Duration::from_secs(30)).await;
            let Some(v) = weak.upgrade() else { return };
            if v.lease.is_lost() {
                return;
            }
            let requests = match v.cluster.snapshot_requests(v.info().id).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read snapshot requests");
                    continue;
                }
            };
            for (name, req, lease) in requests {
                if req.error.is_some() {
                    continue; // answered already; the asker reads it
                }
                let error = match v.take_snapshot(&name).await {
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(volume = %v.info().name, snapshot = %name, requester = %req.requester, error = %e,
                            "could not take a snapshot asked for");
                        Some(e.to_string())
                    }
                };
                if let Err(e) = v.cluster.answer_snapshot_request(v.info().id, &name, lease, error).await {
                    tracing::warn!(error = %e, "could not answer a snapshot request");
                }
            }
        }
    }
}
