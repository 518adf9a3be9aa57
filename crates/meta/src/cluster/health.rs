//! The cluster's health at a glance, from etcd alone: what `torusctl
//! status` and `wait` show and judge, and what a node's console API
//! (`/api/v1/status`) answers.

use super::{Cluster, ReplicaState, Result, RingDoc};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use torus_types::{ExtentId, NodeId, VolumeId};

/// What the cluster's health is judged from, read once.
pub struct Health {
    pub down: Vec<NodeId>,
    /// Extent copies that missed writes, over every volume.
    pub to_catch_up: usize,
    /// Data moves between nodes (a ring change in progress).
    pub moving: bool,
    /// Nodes still deleting copies that moved away.
    pub collecting: usize,
    pub empty: bool,
}

impl Health {
    pub async fn read(cluster: &Cluster) -> Result<Health> {
        let (ring, _) = cluster.ring().await?;
        let up: HashSet<NodeId> = cluster.peers().await?.iter().map(|p| p.id).collect();
        Ok(Health::of(&ring, &up, &cluster.replica_states().await?))
    }

    /// Judged from what was read: the ring, the nodes up, every volume's replica state.
    pub fn of(ring: &RingDoc, up: &HashSet<NodeId>, states: &BTreeMap<VolumeId, ReplicaState>) -> Health {
        Health {
            down: ring.all_members().iter().filter(|m| !up.contains(&m.id)).map(|m| m.id).collect(),
            to_catch_up: states.values().map(|s| s.missing_count()).sum(),
            moving: ring.moving(),
            collecting: ring.collecting.len(),
            empty: ring.members.is_empty(),
        }
    }

    pub fn word(&self) -> &'static str {
        if !self.down.is_empty() {
            "DEGRADED"
        } else if self.to_catch_up > 0 {
            "CATCHING UP"
        } else if self.moving || self.collecting > 0 {
            "REBALANCING"
        } else if self.empty {
            "EMPTY"
        } else {
            "OK"
        }
    }

    /// Why the cluster is not healthy, or `None` if it is.
    pub fn unhealthy(&self) -> Option<String> {
        let mut why = Vec::new();
        if !self.down.is_empty() {
            let ids: Vec<String> = self.down.iter().map(|n| n.to_string()).collect();
            why.push(format!("{} node(s) down: {}", self.down.len(), ids.join(", ")));
        }
        if self.to_catch_up > 0 {
            why.push(format!("{} extent copies to catch up", self.to_catch_up));
        }
        why.extend(self.moving_reason());
        if self.empty {
            why.push("no node in the ring".into());
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// Why data is still moving, or `None` if it is not.
    pub fn moving_reason(&self) -> Option<String> {
        if self.moving {
            Some("data is moving between nodes".into())
        } else if self.collecting > 0 {
            Some(format!("{} node(s) still deleting copies that moved away", self.collecting))
        } else {
            None
        }
    }
}

/// Everything `status` shows, as `-o json` prints it.
#[derive(Serialize)]
pub struct StatusReport {
    pub health: &'static str,
    pub ring_version: u64,
    pub ring_members: usize,
    pub default_replication: u32,
    pub nodes_up: usize,
    pub nodes_down: Vec<String>,
    pub nodes_registered_not_in_ring: usize,
    pub nodes_full: Vec<String>,
    pub extents_with_a_replica_down: u64,
    pub extent_copies_to_catch_up: usize,
    pub nodes_behind: usize,
    pub extents_being_written: usize,
    /// Volumes a storage node is repairing now (no client has them open).
    pub repairing: Vec<Repairing>,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub volumes: usize,
    pub provisioned_bytes: u64,
    pub rebalance: Rebalance,
    /// Ring changes waiting for the one under way, in order ("add <uuid>",
    /// "remove <uuid>", "mark <uuid> full", "clear the full mark of <uuid>").
    pub queued: Vec<String>,
}

#[derive(Serialize)]
pub struct Repairing {
    pub volume: String,
    pub copies_left: usize,
    pub by: String,
}

#[derive(Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Rebalance {
    None,
    Moving { extents_done: u64, extents_total: u64, bytes_copied: u64, nodes_finished: usize, nodes: usize },
    Finishing { nodes_deleting: usize },
}

impl Cluster {
    /// Everything `torusctl status` shows, read now.
    pub async fn status_report(&self) -> Result<StatusReport> {
        let config = self.config().await?;
        let (ring, _) = self.ring().await?;
        let peers = self.peers().await?;
        let volumes = self.volumes().await?;
        let up: HashSet<NodeId> = peers.iter().map(|p| p.id).collect();
        let members = ring.all_members();
        let down: Vec<_> = members.iter().filter(|m| !up.contains(&m.id)).collect();
        let states = self.replica_states().await?;
        let health = Health::of(&ring, &up, &states);
        let (cap, used) =
            peers.iter().filter(|p| ring.contains(p.id)).fold((0u64, 0u64), |(c, u), p| (c + p.capacity, u + p.used));
        // Extents (of the volumes' whole address space) with a replica on a down node.
        let degraded = if down.is_empty() {
            0
        } else {
            let now = ring.placement();
            let mut n = 0u64;
            for v in &volumes {
                for i in 0..v.extent_count() {
                    let reps = now.replicas(ExtentId::new(v.id, i), v.replication as usize);
                    if reps.iter().any(|r| !up.contains(r)) {
                        n += 1;
                    }
                }
            }
            n
        };
        // Only volumes with something to repair can be under repair: look at their locks.
        let mut repairing = Vec::new();
        for v in
            volumes.iter().filter(|v| states.get(&v.id).is_some_and(|s| !s.intent.is_empty() || s.missing_count() > 0))
        {
            if let Some((lock, _)) = self.volume_lock(v.id).await?.filter(|(l, _)| l.repair) {
                let copies_left = states.get(&v.id).map_or(0, |s| s.missing_count());
                repairing.push(Repairing { volume: v.name.clone(), copies_left, by: lock.holder });
            }
        }
        let behind: HashSet<NodeId> = states.values().flat_map(|s| s.missing.keys().copied()).collect();
        let rebalance = if ring.moving() {
            let progress = self.progress().await?;
            let current: Vec<_> = progress.iter().filter(|(_, p)| p.ring_version == ring.version).collect();
            let (extents_done, extents_total, bytes_copied) = current
                .iter()
                .fold((0, 0, 0), |(d, t, b), (_, p)| (d + p.extents_done, t + p.extents_total, b + p.bytes_copied));
            let nodes_finished = current.iter().filter(|(_, p)| p.done).count();
            Rebalance::Moving { extents_done, extents_total, bytes_copied, nodes_finished, nodes: members.len() }
        } else if !ring.collecting.is_empty() {
            Rebalance::Finishing { nodes_deleting: ring.collecting.len() }
        } else {
            Rebalance::None
        };
        Ok(StatusReport {
            health: health.word(),
            ring_version: ring.version,
            ring_members: ring.members.len(),
            default_replication: config.replication,
            nodes_up: members.len() - down.len(),
            nodes_down: down.iter().map(|m| m.id.to_string()).collect(),
            nodes_registered_not_in_ring: peers
                .iter()
                .filter(|p| !ring.contains(p.id) && !members.iter().any(|m| m.id == p.id))
                .count(),
            nodes_full: ring.members.iter().filter(|m| m.full).map(|m| m.id.to_string()).collect(),
            extents_with_a_replica_down: degraded,
            extent_copies_to_catch_up: health.to_catch_up,
            nodes_behind: behind.len(),
            extents_being_written: states.values().map(|s| s.intent.len()).sum(),
            repairing,
            capacity_bytes: cap,
            used_bytes: used,
            volumes: volumes.len(),
            provisioned_bytes: volumes.iter().map(|v| v.size).sum(),
            rebalance,
            queued: ring.queued.iter().map(|c| c.to_string()).collect(),
        })
    }
}
