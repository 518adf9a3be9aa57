//! Repair by the cluster, not the client: every storage node runs a
//! [`Repairer`] that brings copies up to date in volumes nobody has open.
//!
//! Who repairs what, and when (every `interval`, default 2 s):
//! - a node listed in a volume's replica state as missing extents repairs
//!   that volume as soon as it is up again (it knows it came back);
//! - the live node with the lowest id repairs volumes left by a writer that
//!   died (a non-empty write intent) and missing copies of other live nodes.
//!
//! A repair is an ordinary writer with no client: it takes the volume's
//! lock (marked `repair`), so it can never race a client's writer; opening
//! resyncs the dead writer's intent; then it catches up the missing copies of
//! every live node, extent by extent, and closes. A volume with a writer is
//! left to it (the writer catches up by itself). A client that wants the
//! volume meanwhile marks `wanted/<id>` and waits; the repair checks the
//! mark between extents, closes cleanly and hands over: nothing is lost, and
//! the client's writer catches up whatever is left.

use crate::{ManagerOptions, Volume, VolumeError, VolumeManager};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use prometheus_client::registry::Registry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_meta::cluster::{Cluster, ClusterError, ReplicaState, VolumeInfo};
use torus_types::{NodeId, VolumeId};

/// Extents caught up between two looks at the `wanted` mark.
const STEP: usize = 4;
/// How long a volume whose repair made no progress is left alone.
const BACKOFF: Duration = Duration::from_secs(30);

pub struct Repairer {
    cluster: Cluster,
    me: NodeId,
    manager: Arc<VolumeManager>,
    interval: Duration,
    stats: RepairStats,
}

/// What a node's repairer exports (`torus_repair_*`, and the cluster's
/// missing copies it reads on each pass).
#[derive(Clone, Default)]
pub struct RepairStats {
    /// Extent copies that missed writes, over every volume (as of the last pass).
    missing: Gauge,
    /// Copies this node's repairs caught up.
    caught_up: Counter,
    /// Volumes this node is repairing now.
    active: Gauge,
}

impl RepairStats {
    /// Exports the figures in `registry`.
    pub fn register_in(&self, registry: &mut Registry) {
        registry.register(
            "torus_cluster_extent_copies_missing",
            "Extent copies that missed writes, over every volume (read by this node's repairer each pass)",
            self.missing.clone(),
        );
        registry.register(
            "torus_repair_copies_caught_up",
            "Extent copies this node's repairs caught up",
            self.caught_up.clone(),
        );
        registry.register("torus_repair_volumes_active", "Volumes this node is repairing now", self.active.clone());
    }
}

/// How one repair ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Every live node's copies are whole.
    Whole,
    /// A client asked for the volume: handed over.
    Yielded,
    /// Someone else holds the volume (a client, or another node's repair).
    Held,
    /// Copies are left that could not be caught up now.
    Stuck,
}

impl Repairer {
    /// `opts` as for a client; the repairer's opens are marked `repair` and never wait for a lock.
    pub fn new(cluster: Cluster, me: NodeId, opts: ManagerOptions, interval: Duration) -> Self {
        let opts = ManagerOptions { repair: true, lock_wait: Duration::ZERO, ..opts };
        let manager = Arc::new(VolumeManager::new(cluster.clone(), opts));
        Repairer { cluster, me, manager, interval, stats: RepairStats::default() }
    }

    /// Records into `stats` (exported by the node).
    pub fn with_stats(mut self, stats: RepairStats) -> Self {
        self.stats = stats;
        self
    }

    /// The manager of the repairer's opens: `close_all` it when stopping.
    pub fn manager(&self) -> Arc<VolumeManager> {
        self.manager.clone()
    }

    /// Repairs until the task is dropped.
    pub async fn run(self) {
        // A repair holds a writer's lock: it must follow ring changes like any writer.
        let follower = tokio::spawn(self.manager.clone().follow_ring());
        let mut backoff = HashMap::new();
        loop {
            tokio::time::sleep(self.interval).await;
            if let Err(e) = self.pass(&mut backoff).await {
                tracing::debug!(error = %e, "repair pass failed; trying again");
            }
            if follower.is_finished() {
                return;
            }
        }
    }

    /// Whether this node should repair a volume in `state`.
    fn mine(&self, state: &ReplicaState, live: &BTreeSet<NodeId>) -> bool {
        let stale_here = state.missing.get(&self.me).is_some_and(|s| !s.is_empty());
        let orphaned = !state.intent.is_empty() || state.missing.iter().any(|(n, s)| live.contains(n) && !s.is_empty());
        stale_here || (orphaned && live.first() == Some(&self.me))
    }

    async fn pass(&self, backoff: &mut HashMap<VolumeId, Instant>) -> Result<(), VolumeError> {
        // From the process's cluster view: an idle cluster costs a pass no etcd request.
        let view = self.cluster.view();
        let states = view.replica_states().await?;
        let missing: usize = states.values().map(|s| s.missing_count()).sum();
        self.stats.missing.set(missing.min(i64::MAX as usize) as i64);
        if states.values().all(|s| s.intent.is_empty() && s.missing.values().all(|m| m.is_empty())) {
            return Ok(());
        }
        let live: BTreeSet<NodeId> = view.peers().await?.into_iter().map(|p| p.id).collect();
        let mut names: Option<HashMap<VolumeId, VolumeInfo>> = None;
        for (id, state) in states {
            if !self.mine(&state, &live) || backoff.get(&id).is_some_and(|t| t.elapsed() < BACKOFF) {
                continue;
            }
            if self.cluster.volume_lock(id).await?.is_some() || self.cluster.volume_wanted(id).await? {
                continue; // its writer catches up, or a client is about to be one
            }
            if names.is_none() {
                names = Some(self.cluster.volumes().await?.into_iter().map(|v| (v.id, v)).collect());
            }
            let Some(info) = names.as_ref().and_then(|n| n.get(&id)) else { continue };
            match self.repair(info, &live).await {
                Ok(Outcome::Whole | Outcome::Yielded | Outcome::Held) => {
                    backoff.remove(&id);
                }
                Ok(Outcome::Stuck) => {
                    backoff.insert(id, Instant::now());
                }
                Err(e) => {
                    tracing::warn!(volume = %info.name, error = %e, "repair failed; trying again later");
                    backoff.insert(id, Instant::now());
                }
            }
        }
        Ok(())
    }

    /// The copies of live nodes still to catch up.
    fn left(v: &Volume, live: &BTreeSet<NodeId>) -> Vec<(NodeId, Vec<u64>)> {
        v.missing()
            .into_iter()
            .filter(|(n, s)| live.contains(n) && !s.is_empty())
            .map(|(n, s)| (n, s.0.into_iter().collect()))
            .collect()
    }

    async fn repair(&self, info: &VolumeInfo, live: &BTreeSet<NodeId>) -> Result<Outcome, VolumeError> {
        let v = match self.manager.open(&info.name, true).await {
            Ok(v) => v,
            Err(VolumeError::Cluster(ClusterError::VolumeLocked { .. })) => return Ok(Outcome::Held),
            Err(e) => return Err(e),
        };
        let start = Instant::now();
        let copies = |left: &[(NodeId, Vec<u64>)]| left.iter().map(|(_, e)| e.len()).sum::<usize>();
        let before = copies(&Self::left(&v, live));
        tracing::info!(volume = %info.name, epoch = %v.epoch(), copies = before, "repairing a volume nobody has open");
        self.stats.active.inc();
        let outcome = 'work: loop {
            let left = Self::left(&v, live);
            if left.is_empty() {
                break Outcome::Whole;
            }
            let remaining = copies(&left);
            for (node, extents) in left {
                for step in extents.chunks(STEP) {
                    if self.cluster.volume_wanted(info.id).await? {
                        break 'work Outcome::Yielded;
                    }
                    if let Err(e) = v.catch_up_extents(node, step.to_vec()).await {
                        tracing::debug!(%node, error = %e, "cannot catch up this node now");
                        break;
                    }
                }
            }
            if copies(&Self::left(&v, live)) >= remaining {
                break Outcome::Stuck;
            }
        };
        let after = copies(&Self::left(&v, live));
        self.stats.active.dec();
        self.stats.caught_up.inc_by(before.saturating_sub(after) as u64);
        if let Err(e) = crate::BlockDevice::flush(&*v).await {
            tracing::warn!(volume = %info.name, error = %e, "flush after repair failed");
        }
        v.release().await;
        tracing::info!(
            volume = %info.name,
            ?outcome,
            caught_up = before.saturating_sub(after),
            left = after,
            ms = start.elapsed().as_millis() as u64,
            "repair done"
        );
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use torus_meta::cluster::ExtentSet;

    fn node(i: u64) -> NodeId {
        NodeId(uuid::Uuid::from_u64_pair(1, i))
    }

    #[tokio::test]
    async fn who_repairs_what() {
        let cluster = Cluster::new(Arc::new(torus_meta::MemStore::new()));
        let r = |me| Repairer::new(cluster.clone(), node(me), ManagerOptions::default(), Duration::from_secs(1));
        let live: BTreeSet<NodeId> = [node(1), node(2), node(3)].into();
        let mut state = ReplicaState::default();
        assert!(!r(1).mine(&state, &live), "nothing to do");
        state.missing.insert(node(2), ExtentSet([4, 5].into()));
        assert!(r(2).mine(&state, &live), "the stale node repairs its own copies");
        assert!(r(1).mine(&state, &live), "the lowest live node repairs too");
        assert!(!r(3).mine(&state, &live), "others leave it");
        let mut dead_only = ReplicaState::default();
        dead_only.missing.insert(node(9), ExtentSet([1].into()));
        assert!(!r(1).mine(&dead_only, &live), "a dead node's copies wait for it");
        let mut crashed = ReplicaState::default();
        crashed.intent.0.insert(3);
        assert!(
            r(1).mine(&crashed, &live) && !r(2).mine(&crashed, &live),
            "a dead writer's intent: the lowest live node"
        );
    }
}
