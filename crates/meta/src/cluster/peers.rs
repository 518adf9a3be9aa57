//! Peers (storage nodes registered under their lease) and the ring document
//! (which nodes hold data, with what weight; versioned, changed by CAS).

use super::{decode, encode, Cluster, ClusterError, Result};
use crate::{Compare, LeaseId, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use torus_types::NodeId;

/// What a running `torusd` says about itself; written when it registers and
/// again when it changed (its lease is kept alive without rewriting it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: NodeId,
    /// Where clients and other nodes reach its peer protocol (`host:port`).
    pub address: String,
    /// Where its HTTP status and metrics are served, if anywhere.
    #[serde(default)]
    pub http_address: Option<String>,
    /// Whether that HTTP address speaks HTTPS (`--http-tls`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub http_tls: bool,
    /// Bytes of storage offered.
    pub capacity: u64,
    /// Its share of data relative to other nodes when it joins the ring
    /// (default: its capacity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u64>,
    /// Bytes of storage in use.
    pub used: u64,
    /// Failure-domain labels (`zone=a`, `rack=r1`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Unix seconds when the node last wrote this record (at registration,
    /// and when its usage changed: see torusd's registration).
    pub last_seen: u64,
    pub version: String,
    /// Started with `--auto-join`: Unix seconds when the process started.
    /// Nodes that start within a short window of each other join in one ring
    /// change (see torusd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_join_since: Option<u64>,
}

impl PeerInfo {
    /// A record with no HTTP address, weight, usage or labels (tests, simulations).
    pub fn bare(id: NodeId, address: &str, capacity: u64, version: &str) -> PeerInfo {
        PeerInfo {
            id,
            address: address.into(),
            http_address: None,
            http_tls: false,
            capacity,
            weight: None,
            used: 0,
            labels: BTreeMap::new(),
            last_seen: 0,
            version: version.into(),
            auto_join_since: None,
        }
    }
}

/// One node's place in the ring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingMember {
    pub id: NodeId,
    /// Relative share of data (the node's capacity in bytes at the time it joined).
    pub weight: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Full: the node keeps the extents it holds but takes no new ones (they
    /// go to the next node in their ranking). Set by the node itself when
    /// nearly full; cleared by an operator (`torusctl peer clear-full`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full: bool,
}

/// The ring: which nodes hold data. Every change bumps `version`.
///
/// A membership change happens in two steps. First the new member list is
/// written with `previous` set to the old one: writers write to the replicas
/// of both, readers read the old ones first, and nodes copy extents to their
/// new owners. When every node has finished, `previous` is cleared (another
/// version): everyone uses the new members alone and old copies are deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingDoc {
    pub version: u64,
    pub members: Vec<RingMember>,
    /// While data moves: the members it moves from.
    #[serde(default)]
    pub previous: Option<Vec<RingMember>>,
    /// After a move: the nodes still deleting the copies that moved away. The
    /// next change waits for them, so that no node ever becomes a replica
    /// again while it still holds an outdated copy.
    #[serde(default)]
    pub collecting: Vec<NodeId>,
    /// Membership changes asked for while a move (or its clean-up) was under
    /// way, in order. They start together, as one move, in the same write
    /// that ends the clean-up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queued: Vec<QueuedChange>,
}

/// A membership change waiting for the one under way to end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum QueuedChange {
    Add { member: RingMember },
    Remove { id: NodeId },
    SetFull { id: NodeId, full: bool },
}

impl QueuedChange {
    fn apply(&self, members: &mut Vec<RingMember>) {
        match self {
            QueuedChange::Add { member } => {
                if !members.iter().any(|m| m.id == member.id) {
                    members.push(member.clone());
                }
            }
            QueuedChange::Remove { id } => members.retain(|m| m.id != *id),
            QueuedChange::SetFull { id, full } => {
                if let Some(m) = members.iter_mut().find(|m| m.id == *id) {
                    m.full = *full;
                }
            }
        }
    }
}

impl std::fmt::Display for QueuedChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueuedChange::Add { member } => write!(f, "add {}", member.id),
            QueuedChange::Remove { id } => write!(f, "remove {id}"),
            QueuedChange::SetFull { id, full: true } => write!(f, "mark {id} full"),
            QueuedChange::SetFull { id, full: false } => write!(f, "clear the full mark of {id}"),
        }
    }
}

impl RingDoc {
    pub fn contains(&self, id: NodeId) -> bool {
        self.members.iter().any(|m| m.id == id)
    }

    /// Whether a rebalance is under way.
    pub fn moving(&self) -> bool {
        self.previous.is_some()
    }

    /// Why a membership change must wait, if it must.
    pub fn busy(&self) -> Option<String> {
        if self.moving() {
            return Some("a rebalance is in progress; wait for it to finish (torusctl status)".into());
        }
        if !self.collecting.is_empty() {
            let ids: Vec<String> = self.collecting.iter().map(|n| n.to_string()).collect();
            return Some(format!(
                "the last rebalance is still deleting moved copies on {}; wait for it (torusctl status)",
                ids.join(", ")
            ));
        }
        None
    }

    /// The members once every queued change has started.
    pub fn projected(&self) -> Vec<RingMember> {
        let mut members = self.members.clone();
        for change in &self.queued {
            change.apply(&mut members);
        }
        members
    }

    /// Whether `id` is being taken out: by the move under way or by a queued change.
    pub fn leaving(&self, id: NodeId) -> bool {
        self.all_members().iter().any(|m| m.id == id) && !self.projected().iter().any(|m| m.id == id)
    }

    /// Starts the queued changes, all at once as one move, if nothing is under
    /// way. Data moves only if some volume may already be placed on the old
    /// members. Returns whether it started anything.
    fn start_queued(&mut self, has_volumes: bool) -> bool {
        if self.queued.is_empty() || self.busy().is_some() {
            return false;
        }
        let old = self.members.clone();
        self.members = self.projected();
        self.queued.clear();
        if old != self.members && !old.is_empty() && has_volumes {
            self.previous = Some(old);
        }
        true
    }

    /// The placement of `members` at this version (the one place a ring is built from members).
    pub fn placement_of(&self, members: &[RingMember]) -> torus_ring::Ring {
        torus_ring::Ring::from_labeled(self.version, members.iter().map(|m| (m.id, m.weight, &m.labels, m.full)))
    }

    /// The placement of the current members.
    pub fn placement(&self) -> torus_ring::Ring {
        self.placement_of(&self.members)
    }

    /// While data moves: the placement it moves from.
    pub fn previous_placement(&self) -> Option<torus_ring::Ring> {
        self.previous.as_deref().map(|p| self.placement_of(p))
    }

    /// Every node that is in the ring or being drained out of it.
    pub fn all_members(&self) -> Vec<&RingMember> {
        let mut v: Vec<&RingMember> = self.members.iter().collect();
        for m in self.previous.iter().flatten() {
            if !v.iter().any(|x| x.id == m.id) {
                v.push(m);
            }
        }
        v
    }
}

/// A node's progress in moving data for one ring version (`rebalance/<node uuid>`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebalanceProgress {
    pub ring_version: u64,
    pub extents_total: u64,
    pub extents_done: u64,
    pub bytes_copied: u64,
    pub done: bool,
    /// Old replicas that were down when this node planned its share: it
    /// copied what they would have.
    #[serde(default)]
    pub assumed_down: Vec<NodeId>,
}

fn peer_key(id: NodeId) -> String {
    format!("peers/{id}")
}

impl Cluster {
    /// Writes (or refreshes) a node's registration on its lease.
    pub async fn register_peer(&self, info: &PeerInfo, lease: LeaseId) -> Result<()> {
        self.store.put(&peer_key(info.id), encode(info), Some(lease)).await?;
        Ok(())
    }

    /// Every node whose lease is alive, in UUID order.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.store.list("peers/").await?.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
    }

    /// The ring and the store revision it was read at (0 if there is none yet).
    pub async fn ring(&self) -> Result<(RingDoc, u64)> {
        match self.store.get("ring").await? {
            Some(kv) => Ok((decode(&kv.key, &kv.value)?, kv.mod_revision)),
            None => Ok((RingDoc::default(), 0)),
        }
    }

    /// Applies `change` to the ring with compare-and-swap, retrying on races.
    /// `change` returns Ok(false) for "nothing to do".
    pub async fn update_ring<F>(&self, mut change: F) -> Result<RingDoc>
    where
        F: FnMut(&mut RingDoc) -> Result<bool>,
    {
        for _ in 0..16 {
            let (mut ring, rev) = self.ring().await?;
            if !change(&mut ring)? {
                return Ok(ring);
            }
            ring.version += 1;
            let cmp = if rev == 0 { Compare::exists("ring", false) } else { Compare::mod_revision("ring", rev) };
            let txn = Txn::when(vec![cmp]).and_then(vec![TxnOp::put("ring", encode(&ring))]);
            if self.store.txn(txn).await?.succeeded {
                return Ok(ring);
            }
        }
        Err(ClusterError::Contended)
    }

    /// Finds a registered peer by UUID or by address.
    pub async fn find_peer(&self, which: &str) -> Result<PeerInfo> {
        let which = which.trim();
        self.peers()
            .await?
            .into_iter()
            .find(|p| p.address == which || p.id.to_string() == which)
            .ok_or_else(|| ClusterError::UnknownPeer { peer: which.to_string() })
    }

    /// Whether some volume may already have data placed on the ring (if not,
    /// a membership change moves nothing).
    async fn has_volumes(&self) -> Result<bool> {
        Ok(!self.store.list("volumes/by-name/").await?.is_empty())
    }

    /// Puts peers in service: adds them to the ring and starts moving their
    /// share of the data to them — or, while another change is under way,
    /// queues them (`RingDoc::queued`): they start, together with whatever
    /// else was queued, as one move when it ends. Returns the new ring and
    /// the peers added or queued.
    pub async fn add_to_ring(&self, peers: &[PeerInfo]) -> Result<(RingDoc, Vec<NodeId>)> {
        let has_volumes = self.has_volumes().await?;
        let mut added = Vec::new();
        let ring = self
            .update_ring(|ring| {
                added.clear();
                let projected = ring.projected();
                let fresh: Vec<&PeerInfo> = peers.iter().filter(|p| !projected.iter().any(|m| m.id == p.id)).collect();
                if fresh.is_empty() {
                    return Ok(false);
                }
                for p in fresh {
                    let member = RingMember {
                        id: p.id,
                        weight: p.weight.unwrap_or(p.capacity).max(1),
                        labels: p.labels.clone(),
                        full: false,
                    };
                    ring.queued.push(QueuedChange::Add { member });
                    added.push(p.id);
                }
                ring.start_queued(has_volumes);
                Ok(true)
            })
            .await?;
        Ok((ring, added))
    }

    /// Marks a ring member full or not full. Like a membership change it is a
    /// new ring version with `previous` set, so that writers and nodes take
    /// it in two steps (extents that spilled past a full node move back when
    /// it is no longer full). Queued while another change is under way.
    pub async fn set_full(&self, id: NodeId, full: bool) -> Result<RingDoc> {
        let has_volumes = self.has_volumes().await?;
        self.update_ring(|ring| {
            let Some(member) = ring.projected().into_iter().find(|m| m.id == id) else {
                return Err(ClusterError::Refused { reason: format!("node {id} is not in the ring") });
            };
            if member.full == full {
                return Ok(false);
            }
            ring.queued.push(QueuedChange::SetFull { id, full });
            ring.start_queued(has_volumes);
            Ok(true)
        })
        .await
    }

    /// Takes a node out of the ring; its data is copied to the remaining
    /// nodes before its copies are deleted. Refuses to remove the last node,
    /// or to leave fewer nodes than a volume's replication, unless `force`
    /// (counted on the ring as it will be once the queued changes have run).
    ///
    /// While another change is under way the removal is queued, except for a
    /// node that is down (no lease): a move (or clean-up) could never finish
    /// waiting for it. A move drops it from its target at once: a new ring
    /// version with the same `previous`, which every node plans again (the
    /// down node's share is copied from the other replicas, as for any old
    /// replica that went down); a clean-up stops waiting for it (it deletes
    /// its leftover copies when it comes back, being outside the ring). A
    /// target only ever loses a node that way, so no node becomes a replica
    /// again, within one move, of an extent it stopped receiving writes for.
    pub async fn remove_from_ring(&self, id: NodeId, force: bool) -> Result<RingDoc> {
        let max_r = self.volumes().await?.iter().map(|v| v.replication).max().unwrap_or(1) as usize;
        // Its registration lives on its lease: gone means down.
        let down = self.store.get(&peer_key(id)).await?.is_none();
        self.update_ring(|ring| {
            if ring.leaving(id) {
                return Ok(false);
            }
            let projected = ring.projected();
            if !projected.iter().any(|m| m.id == id) {
                return Err(ClusterError::Refused { reason: format!("node {id} is not in the ring") });
            }
            let left = projected.len() - 1;
            if left == 0 {
                return Err(ClusterError::Refused { reason: "refusing to remove the last node of the ring".into() });
            }
            if left < max_r && !force {
                return Err(ClusterError::Refused {
                    reason: format!(
                        "removing it would leave {left} node(s) for volumes with replication {max_r}: \
                         their extents would have fewer than {max_r} copies (pass --force to do it anyway)"
                    ),
                });
            }
            if down && ring.moving() && ring.contains(id) {
                ring.members.retain(|m| m.id != id);
                return Ok(true);
            }
            if down {
                ring.collecting.retain(|n| *n != id);
            }
            ring.queued.push(QueuedChange::Remove { id });
            // A removal moves the node's data even if no volume exists yet (as it always has).
            ring.start_queued(true);
            Ok(true)
        })
        .await
    }

    /// Ends a rebalance of ring `version` (every node has moved its data):
    /// clears `previous`. `gone` are removed nodes that are down for good:
    /// they have nothing to clean up. Returns false if the ring moved on meanwhile.
    pub async fn finish_rebalance(&self, version: u64, gone: &[NodeId]) -> Result<bool> {
        let has_volumes = self.has_volumes().await?;
        let mut finished = false;
        self.update_ring(|ring| {
            finished = false;
            if ring.version != version || !ring.moving() {
                return Ok(false);
            }
            ring.collecting = ring.all_members().iter().map(|m| m.id).filter(|id| !gone.contains(id)).collect();
            ring.previous = None;
            ring.start_queued(has_volumes);
            finished = true;
            Ok(true)
        })
        .await?;
        Ok(finished)
    }

    /// A node has deleted its moved-away copies after a rebalance. The last
    /// one starts the queued changes, if any, in the same write.
    pub async fn collected(&self, node: NodeId) -> Result<()> {
        let has_volumes = self.has_volumes().await?;
        self.update_ring(|ring| {
            let before = ring.collecting.len();
            ring.collecting.retain(|n| *n != node);
            ring.start_queued(has_volumes);
            Ok(ring.collecting.len() != before)
        })
        .await?;
        Ok(())
    }

    pub async fn put_progress(&self, node: NodeId, p: &RebalanceProgress) -> Result<()> {
        self.store.put(&format!("rebalance/{node}"), encode(p), None).await?;
        Ok(())
    }

    /// Every node's rebalance progress, by node id.
    pub async fn progress(&self) -> Result<Vec<(NodeId, RebalanceProgress)>> {
        let mut out = Vec::new();
        for kv in self.store.list("rebalance/").await? {
            let Some(id) = kv.key.strip_prefix("rebalance/").and_then(NodeId::parse) else { continue };
            out.push((id, decode(&kv.key, &kv.value)?));
        }
        Ok(out)
    }
}
