//! `torusctl status`: the cluster's health at a glance; [`Health`] is what
//! `status` and `wait` judge it from.

use crate::Output;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use torus_meta::cluster::{Cluster, ReplicaState, RingDoc};
use torus_types::{format_size, ExtentId, NodeId, VolumeId};

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
    pub async fn read(cluster: &Cluster) -> anyhow::Result<Health> {
        let (ring, _) = cluster.ring().await?;
        let up: HashSet<NodeId> = cluster.peers().await?.iter().map(|p| p.id).collect();
        Ok(Health::of(&ring, &up, &cluster.replica_states().await?))
    }

    /// Judged from what was read: the ring, the nodes up, every volume's replica state.
    fn of(ring: &RingDoc, up: &HashSet<NodeId>, states: &BTreeMap<VolumeId, ReplicaState>) -> Health {
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
struct Report {
    health: &'static str,
    ring_version: u64,
    ring_members: usize,
    default_replication: u32,
    nodes_up: usize,
    nodes_down: Vec<String>,
    nodes_registered_not_in_ring: usize,
    nodes_full: Vec<String>,
    extents_with_a_replica_down: u64,
    extent_copies_to_catch_up: usize,
    nodes_behind: usize,
    extents_being_written: usize,
    /// Volumes a storage node is repairing now (no client has them open).
    repairing: Vec<Repairing>,
    capacity_bytes: u64,
    used_bytes: u64,
    volumes: usize,
    provisioned_bytes: u64,
    rebalance: Rebalance,
}

#[derive(Serialize)]
struct Repairing {
    volume: String,
    copies_left: usize,
    by: String,
}

#[derive(Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Rebalance {
    None,
    Moving { extents_done: u64, extents_total: u64, bytes_copied: u64, nodes_finished: usize, nodes: usize },
    Finishing { nodes_deleting: usize },
}

pub async fn run(cluster: &Cluster, output: Output) -> anyhow::Result<()> {
    let config = cluster.config().await?;
    let (ring, _) = cluster.ring().await?;
    let peers = cluster.peers().await?;
    let volumes = cluster.volumes().await?;
    let up: HashSet<NodeId> = peers.iter().map(|p| p.id).collect();
    let members = ring.all_members();
    let down: Vec<_> = members.iter().filter(|m| !up.contains(&m.id)).collect();
    let states = cluster.replica_states().await?;
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
    for v in volumes.iter().filter(|v| states.get(&v.id).is_some_and(|s| !s.intent.is_empty() || s.missing_count() > 0))
    {
        if let Some((lock, _)) = cluster.volume_lock(v.id).await?.filter(|(l, _)| l.repair) {
            let copies_left = states.get(&v.id).map_or(0, |s| s.missing_count());
            repairing.push(Repairing { volume: v.name.clone(), copies_left, by: lock.holder });
        }
    }
    let behind: HashSet<NodeId> = states.values().flat_map(|s| s.missing.keys().copied()).collect();
    let rebalance = if ring.moving() {
        let progress = cluster.progress().await?;
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
    let r = Report {
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
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Output::Table => print_table(&r),
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!("health:      {}", r.health);
    println!(
        "ring:        version {}, {} members, default replication {}",
        r.ring_version, r.ring_members, r.default_replication
    );
    println!(
        "nodes:       {} up, {} down, {} registered but not in the ring",
        r.nodes_up,
        r.nodes_down.len(),
        r.nodes_registered_not_in_ring
    );
    for id in &r.nodes_down {
        println!("             down: {id}");
    }
    for id in &r.nodes_full {
        println!("             full: {id} (keeps what it holds; new extents go to other nodes)");
    }
    println!("extents:     {} with a replica on a down node", r.extents_with_a_replica_down);
    println!(
        "replicas:    {} extent copies to catch up (on {} node(s)); {} extents being written",
        r.extent_copies_to_catch_up, r.nodes_behind, r.extents_being_written
    );
    for rep in &r.repairing {
        println!("             repairing: volume {} ({} copies left) by {}", rep.volume, rep.copies_left, rep.by);
    }
    println!(
        "capacity:    {} used of {} ({} free)",
        format_size(r.used_bytes),
        format_size(r.capacity_bytes),
        format_size(r.capacity_bytes.saturating_sub(r.used_bytes))
    );
    println!("volumes:     {} ({} provisioned)", r.volumes, format_size(r.provisioned_bytes));
    match &r.rebalance {
        Rebalance::Moving { extents_done, extents_total, bytes_copied, nodes_finished, nodes } => println!(
            "rebalance:   {extents_done}/{extents_total} extents moved ({} copied); {nodes_finished} of {nodes} nodes finished",
            format_size(*bytes_copied)
        ),
        Rebalance::Finishing { nodes_deleting } => {
            println!("rebalance:   finishing: {nodes_deleting} node(s) deleting copies that moved away")
        }
        Rebalance::None => println!("rebalance:   none in progress"),
    }
}
