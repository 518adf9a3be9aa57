//! The node's full mark: when its store is nearly full (of its `--size`, or
//! of what the filesystem under it can still take, if that is less), the
//! node marks itself full in the ring. It keeps the extents it holds; new extents skip it for
//! the next node in their ranking.
//!
//! The space above the mark absorbs what still arrives until every writer
//! has taken the new ring (about a second), and lets the extents it holds
//! keep filling in. The node never clears the mark itself: extents that went
//! elsewhere would move back and could fill it again mid-move. An operator
//! clears it (`torusctl peer clear-full`), which checks they fit.

use crate::error::NodeError;
use std::sync::Arc;
use torus_meta::cluster::{Cluster, RingDoc};
use torus_store::Store;
use torus_types::NodeId;

/// The share of the store's capacity at which the node marks itself full.
pub const DEFAULT_FULL_RATIO: f64 = 0.9;

/// Whether a store this full should be marked full.
pub fn is_full(used: u64, capacity: u64, ratio: f64) -> bool {
    used as f64 >= capacity.max(1) as f64 * ratio
}

/// Marks this node full if its usage crossed the mark. Waits (returns Ok)
/// while another ring change is under way.
pub async fn update_mark(
    cluster: &Cluster,
    store: &Arc<Store>,
    me: NodeId,
    doc: &RingDoc,
    ratio: f64,
) -> Result<(), NodeError> {
    if !doc.members.iter().any(|m| m.id == me && !m.full) {
        return Ok(());
    }
    let (used, capacity) = (store.used(), store.effective_capacity());
    if !is_full(used, capacity, ratio) || doc.busy().is_some() {
        return Ok(());
    }
    let ring = cluster.set_full(me, true).await?;
    tracing::warn!(
        used,
        capacity,
        version = ring.version,
        "this node is nearly full: marked full in the ring; new extents go to other nodes"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark() {
        assert!(!is_full(89, 100, 0.9));
        assert!(is_full(90, 100, 0.9));
        assert!(is_full(1, 0, 0.9), "a store with no capacity is full");
    }
}
