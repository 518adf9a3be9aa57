//! Peers (storage nodes registered under their lease) and the ring document
//! (which nodes hold data, with what weight; versioned, changed by CAS).

use super::{decode, encode, Cluster, ClusterError, Result};
use crate::{Compare, LeaseId, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use torus_types::NodeId;

/// What a running `torusd` says about itself; refreshed with every heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: NodeId,
    /// Where clients and other nodes reach its peer protocol (`host:port`).
    pub address: String,
    /// Where its HTTP status and metrics are served, if anywhere.
    #[serde(default)]
    pub http_address: Option<String>,
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
    /// Unix seconds of the last heartbeat.
    pub last_seen: u64,
    pub version: String,
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

    /// Puts peers in service: adds them to the ring and starts moving their
    /// share of the data to them. Returns the new ring and the added peers.
    pub async fn add_to_ring(&self, peers: &[PeerInfo]) -> Result<(RingDoc, Vec<NodeId>)> {
        let has_volumes = !self.store.list("volumes/by-name/").await?.is_empty();
        let mut added = Vec::new();
        let ring = self
            .update_ring(|ring| {
                added.clear();
                let fresh: Vec<&PeerInfo> = peers.iter().filter(|p| !ring.contains(p.id)).collect();
                if fresh.is_empty() {
                    return Ok(false);
                }
                if let Some(reason) = ring.busy() {
                    return Err(ClusterError::Refused { reason });
                }
                let old = ring.members.clone();
                for p in fresh {
                    ring.members.push(RingMember {
                        id: p.id,
                        weight: p.weight.unwrap_or(p.capacity).max(1),
                        labels: p.labels.clone(),
                        full: false,
                    });
                    added.push(p.id);
                }
                // Data moves only if some volume may already be placed on the old ring.
                if !old.is_empty() && has_volumes {
                    ring.previous = Some(old);
                }
                Ok(true)
            })
            .await?;
        Ok((ring, added))
    }

    /// Marks a ring member full or not full. Like a membership change it is a
    /// new ring version with `previous` set, so that writers and nodes take
    /// it in two steps (extents that spilled past a full node move back when
    /// it is no longer full). Refused while another change is under way.
    pub async fn set_full(&self, id: NodeId, full: bool) -> Result<RingDoc> {
        let has_volumes = !self.store.list("volumes/by-name/").await?.is_empty();
        self.update_ring(|ring| {
            let Some(i) = ring.members.iter().position(|m| m.id == id) else {
                return Err(ClusterError::Refused { reason: format!("node {id} is not in the ring") });
            };
            if ring.members[i].full == full {
                return Ok(false);
            }
            if let Some(reason) = ring.busy() {
                return Err(ClusterError::Refused { reason });
            }
            let old = ring.members.clone();
            ring.members[i].full = full;
            if has_volumes {
                ring.previous = Some(old);
            }
            Ok(true)
        })
        .await
    }

    /// Takes a node out of the ring; its data is copied to the remaining
    /// nodes before its copies are deleted. Refuses to remove the last node,
    /// or to leave fewer nodes than a volume's replication, unless `force`.
    pub async fn remove_from_ring(&self, id: NodeId, force: bool) -> Result<RingDoc> {
        let max_r = self.volumes().await?.iter().map(|v| v.replication).max().unwrap_or(1) as usize;
        self.update_ring(|ring| {
            if !ring.contains(id) {
                return Err(ClusterError::Refused { reason: format!("node {id} is not in the ring") });
            }
            if let Some(reason) = ring.busy() {
                return Err(ClusterError::Refused { reason });
            }
            let left = ring.members.len() - 1;
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
            let old = ring.members.clone();
            ring.members.retain(|m| m.id != id);
            ring.previous = Some(old);
            Ok(true)
        })
        .await
    }

    /// Ends a rebalance of ring `version` (every node has moved its data):
    /// clears `previous`. `gone` are removed nodes that are down for good:
    /// they have nothing to clean up. Returns false if the ring moved on meanwhile.
    pub async fn finish_rebalance(&self, version: u64, gone: &[NodeId]) -> Result<bool> {
        let mut finished = false;
        self.update_ring(|ring| {
            finished = false;
            if ring.version != version || !ring.moving() {
                return Ok(false);
            }
            ring.collecting = ring.all_members().iter().map(|m| m.id).filter(|id| !gone.contains(id)).collect();
            ring.previous = None;
            finished = true;
            Ok(true)
        })
        .await?;
        Ok(finished)
    }

    /// A node has deleted its moved-away copies after a rebalance.
    pub async fn collected(&self, node: NodeId) -> Result<()> {
        self.update_ring(|ring| {
            let before = ring.collecting.len();
            ring.collecting.retain(|n| *n != node);
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
