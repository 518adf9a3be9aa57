//! `torusctl status`: the cluster's health at a glance; [`Health`] is what
//! `status` and `wait` judge it from.

use std::collections::HashSet;
use torus_meta::cluster::Cluster;
use torus_ring::Ring;
use torus_types::{format_size, ExtentId, NodeId};

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
        let down = ring.all_members().iter().filter(|m| !up.contains(&m.id)).map(|m| m.id).collect();
        let to_catch_up = cluster.replica_states().await?.values().map(|s| s.missing_count()).sum();
        Ok(Health {
            down,
            to_catch_up,
            moving: ring.moving(),
            collecting: ring.collecting.len(),
            empty: ring.members.is_empty(),
        })
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

pub async fn run(cluster: &Cluster) -> anyhow::Result<()> {
    let config = cluster.config().await?;
    let (ring, _) = cluster.ring().await?;
    let peers = cluster.peers().await?;
    let volumes = cluster.volumes().await?;
    let up: HashSet<NodeId> = peers.iter().map(|p| p.id).collect();
    let members = ring.all_members();
    let down: Vec<_> = members.iter().filter(|m| !up.contains(&m.id)).collect();
    let states = cluster.replica_states().await?;
    let to_catch_up: usize = states.values().map(|s| s.missing_count()).sum();
    let (cap, used) =
        peers.iter().filter(|p| ring.contains(p.id)).fold((0u64, 0u64), |(c, u), p| (c + p.capacity, u + p.used));
    let health = Health {
        down: down.iter().map(|m| m.id).collect(),
        to_catch_up,
        moving: ring.moving(),
        collecting: ring.collecting.len(),
        empty: ring.members.is_empty(),
    }
    .word();
    println!("health:      {health}");
    println!(
        "ring:        version {}, {} members, default replication {}",
        ring.version,
        ring.members.len(),
        config.replication
    );
    println!(
        "nodes:       {} up, {} down, {} registered but not in the ring",
        members.len() - down.len(),
        down.len(),
        peers.iter().filter(|p| !ring.contains(p.id) && !members.iter().any(|m| m.id == p.id)).count()
    );
    for m in &down {
        println!("             down: {}", m.id);
    }
    for m in ring.members.iter().filter(|m| m.full) {
        println!("             full: {} (keeps what it holds; new extents go to other nodes)", m.id);
    }
    // Extents (of the volumes' whole address space) with a replica on a down node.
    let degraded = if down.is_empty() {
        0
    } else {
        let now = Ring::from_labeled(ring.version, ring.members.iter().map(|m| (m.id, m.weight, &m.labels, m.full)));
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
    println!("extents:     {degraded} with a replica on a down node");
    let behind: HashSet<NodeId> = states.values().flat_map(|s| s.missing.keys().copied()).collect();
    let active: usize = states.values().map(|s| s.intent.len()).sum();
    println!(
        "replicas:    {to_catch_up} extent copies to catch up (on {} node(s)); {active} extents being written",
        behind.len()
    );
    println!(
        "capacity:    {} used of {} ({} free)",
        format_size(used),
        format_size(cap),
        format_size(cap.saturating_sub(used))
    );
    println!("volumes:     {} ({} provisioned)", volumes.len(), format_size(volumes.iter().map(|v| v.size).sum()));
    if ring.moving() {
        let progress = cluster.progress().await?;
        let current: Vec<_> = progress.iter().filter(|(_, p)| p.ring_version == ring.version).collect();
        let (done, total, bytes) = current
            .iter()
            .fold((0, 0, 0), |(d, t, b), (_, p)| (d + p.extents_done, t + p.extents_total, b + p.bytes_copied));
        let finished = current.iter().filter(|(_, p)| p.done).count();
        println!(
            "rebalance:   {done}/{total} extents moved ({} copied); {finished} of {} nodes finished",
            format_size(bytes),
            members.len()
        );
    } else if !ring.collecting.is_empty() {
        println!("rebalance:   finishing: {} node(s) deleting copies that moved away", ring.collecting.len());
    } else {
        println!("rebalance:   none in progress");
    }
    Ok(())
}
