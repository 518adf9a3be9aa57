//! The scrubber: walks this node's extents at a throttled rate, verifying
//! every written block against its checksum, and repairs a bad block from
//! another replica (REPAIR semantics: only blocks that still fail their
//! checksum are replaced, so a scrub never undoes a newer write). Its
//! store reads run on the blocking pool, never on the async workers.

use crate::error::NodeError;
use crate::metrics::NodeMetrics;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_meta::cluster::Cluster;
use torus_proto::Transport;
use torus_store::{BlockState, Store, StoreError};
use torus_types::{ExtentId, NodeId, BLOCK_SIZE};

pub struct Scrubber {
    pub cluster: Cluster,
    pub store: Arc<Store>,
    pub me: NodeId,
    /// Bytes per second read at most (0: the scrubber does not run).
    pub rate: u64,
    /// Pause between the end of one pass and the start of the next.
    pub interval: Duration,
    pub metrics: Arc<NodeMetrics>,
    /// How other nodes are reached: TCP, or in-memory nodes in tests.
    pub transport: Arc<dyn Transport>,
}

const CHUNK_BLOCKS: usize = 64;

impl Scrubber {
    pub async fn run(self) {
        if self.rate == 0 {
            return;
        }
        loop {
            tokio::time::sleep(self.interval).await;
            let start = Instant::now();
            match self.pass().await {
                Ok((blocks, bad)) => {
                    tracing::info!(blocks, bad, secs = start.elapsed().as_secs(), "scrub pass done")
                }
                Err(e) => tracing::warn!(error = %e, "scrub pass stopped"),
            }
        }
    }

    /// Runs `f` on the store on the blocking pool.
    async fn on_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .unwrap_or_else(|e| Err(StoreError::Failed { reason: format!("a scrub task died: {e}") }))
    }

    /// One pass over every extent; returns (blocks verified, bad blocks found).
    pub async fn pass(&self) -> Result<(u64, u64), NodeError> {
        let (mut verified, mut bad) = (0, 0);
        let start = Instant::now();
        for id in self.on_store(|s| s.extents()).await?.into_iter().map(|stat| stat.id) {
            let states = self.on_store(move |s| s.block_states(id)).await?.unwrap_or_default();
            let mut b = 0;
            while b < states.len() {
                if states[b] != BlockState::Data {
                    b += 1;
                    continue;
                }
                let mut end = b + 1;
                while end < states.len() && states[end] == BlockState::Data && end - b < CHUNK_BLOCKS {
                    end += 1;
                }
                let (off, len) = ((b * BLOCK_SIZE) as u64, (end - b) * BLOCK_SIZE);
                match self.on_store(move |s| s.read(id, off, &mut vec![0u8; len])).await {
                    Ok(()) => {
                        verified += (end - b) as u64;
                        NodeMetrics::inc(&self.metrics.scrubbed_blocks, (end - b) as u64);
                        b = end;
                    }
                    Err(StoreError::Checksum { block, .. }) => {
                        // The blocks before it in this chunk verified (they are checked in order).
                        let good = (block as usize).saturating_sub(b) as u64;
                        verified += good;
                        NodeMetrics::inc(&self.metrics.scrubbed_blocks, good);
                        bad += 1;
                        NodeMetrics::inc(&self.metrics.checksum_errors, 1);
                        tracing::error!(extent = %id, block, "scrub found a corrupt block");
                        if let Err(e) = self.repair(id, block).await {
                            tracing::error!(extent = %id, block, error = %e, "could not repair the block");
                        }
                        b = block as usize + 1;
                    }
                    Err(e) => return Err(e.into()),
                }
                // Throttle: never faster than `rate` bytes per second.
                let due = Duration::from_secs_f64((verified * BLOCK_SIZE as u64) as f64 / self.rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Ok((verified, bad))
    }

    /// Fetches a good copy of one block from another replica and repairs ours with it.
    async fn repair(&self, extent: ExtentId, block: u64) -> Result<(), NodeError> {
        let (doc, _) = self.cluster.ring().await?;
        // The layer's replication (a volume's, or a snapshot's).
        let r = *self.cluster.layers().await?.replication.get(&extent.volume).ok_or("the volume no longer exists")?;
        let addrs: HashMap<NodeId, String> =
            self.cluster.peers().await?.into_iter().map(|p| (p.id, p.address)).collect();
        let mut candidates = Vec::new();
        for members in std::iter::once(&doc.members).chain(doc.previous.iter()) {
            let ring = doc.placement_of(members);
            // Every node that may hold it (full nodes keep what they hold; others stand in for them).
            for n in ring.candidates(extent, r) {
                if n != self.me && !candidates.contains(&n) {
                    candidates.push(n);
                }
            }
        }
        let off = (block * BLOCK_SIZE as u64) as u32;
        for n in candidates {
            let Some(addr) = addrs.get(&n) else { continue };
            let Ok(c) = self.transport.connect(addr, Duration::from_secs(10)).await else { continue };
            // Present blocks only: a replica that never got this block must not hand us zeroes.
            match c.read(extent, off, BLOCK_SIZE as u32, true).await {
                Ok(good) => {
                    let fixed = self.on_store(move |s| s.repair(extent, off as u64, &good)).await?;
                    NodeMetrics::inc(&self.metrics.repaired_blocks, fixed);
                    return Ok(());
                }
                Err(e) => tracing::warn!(node = %n, error = %e, "replica could not provide a good copy"),
            }
        }
        Err("no replica had a good copy".into())
    }
}
