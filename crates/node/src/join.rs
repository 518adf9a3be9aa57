//! `torusd --auto-join`: a node puts itself in the ring — together with the
//! other nodes that started with `--auto-join` at about the same time, so
//! that a scale-up of several nodes is one ring change (one move), not one
//! per node.
//!
//! A node not yet in the ring waits [`JOIN_WINDOW`], then adds every
//! registered node that asked to join and started less than [`JOIN_RECENT`]
//! ago (itself included) in one compare-and-swap. The first of a batch to
//! wake adds them all; the others find themselves in and do nothing. Only
//! recent starters are taken, so a node an operator removed from the ring is
//! not put back by another node's start. While a move is under way the adds
//! are queued (`RingDoc::queued`) and start together when it ends.

use std::time::Duration;
use torus_meta::cluster::{Cluster, PeerInfo};
use torus_types::unix_now;

/// How long a joining node waits for others starting at the same time.
pub const JOIN_WINDOW: Duration = Duration::from_secs(2);

/// Nodes that started this recently with `--auto-join` join with this one.
const JOIN_RECENT: u64 = 60;

/// Tries a few times (etcd may be briefly unreachable), then gives up with a
/// warning: the node serves anyway, and `torusctl peer add` still works.
pub async fn auto_join(cluster: Cluster, me: PeerInfo) {
    for attempt in 1..=5u32 {
        match join_once(&cluster, &me).await {
            Ok(Joined::Already) => return,
            Ok(Joined::Added(n)) => {
                tracing::info!(nodes = n, "joined the ring (with the nodes that started with it)");
                return;
            }
            Ok(Joined::Queued(n)) => {
                tracing::info!(nodes = n, "joining the ring: queued behind the ring change under way");
                return;
            }
            Err(e) if attempt < 5 => {
                tracing::debug!(error = %e, attempt, "could not join the ring yet; retrying");
                tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
            }
            Err(e) => tracing::warn!(error = %e, "not joining the ring; serving anyway (torusctl peer add adds it)"),
        }
    }
}

enum Joined {
    Already,
    Added(usize),
    Queued(usize),
}

async fn join_once(cluster: &Cluster, me: &PeerInfo) -> Result<Joined, torus_meta::cluster::ClusterError> {
    let (ring, _) = cluster.ring().await?;
    if ring.projected().iter().any(|m| m.id == me.id) {
        return Ok(Joined::Already);
    }
    tokio::time::sleep(JOIN_WINDOW).await;
    let now = unix_now();
    let mut batch: Vec<PeerInfo> = cluster
        .peers()
        .await?
        .into_iter()
        .filter(|p| p.id != me.id && p.auto_join_since.is_some_and(|t| t + JOIN_RECENT >= now))
        .collect();
    batch.push(me.clone());
    let (ring, added) = cluster.add_to_ring(&batch).await?;
    if !added.contains(&me.id) {
        return Ok(Joined::Already);
    }
    let queued = ring
        .queued
        .iter()
        .any(|c| matches!(c, torus_meta::cluster::QueuedChange::Add { member } if member.id == me.id));
    Ok(if queued { Joined::Queued(added.len()) } else { Joined::Added(added.len()) })
}
