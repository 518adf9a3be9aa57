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
}

/// The ring: which nodes hold data. Every change bumps `version`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingDoc {
    pub version: u64,
    pub members: Vec<RingMember>,
}

impl RingDoc {
    pub fn contains(&self, id: NodeId) -> bool {
        self.members.iter().any(|m| m.id == id)
    }
}

fn peer_key(id: NodeId) -> String {
    format!("peers/{id}")
}

impl Cluster {
    /// Writes (or refreshes) a node's registration on its lease.
    pub async fn register_peer(&self, info: &PeerInfo, lease: LeaseId) -> Result<()> {
        self.store
            .put(&peer_key(info.id), encode(info), Some(lease))
            .await?;
        Ok(())
    }

    /// Every node whose lease is alive, in UUID order.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.store
            .list("peers/")
            .await?
            .iter()
            .map(|kv| decode(&kv.key, &kv.value))
            .collect()
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
            let cmp = if rev == 0 {
                Compare::exists("ring", false)
            } else {
                Compare::mod_revision("ring", rev)
            };
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
            .ok_or_else(|| ClusterError::UnknownPeer {
                peer: which.to_string(),
            })
    }

    /// Puts peers in service: adds them to the ring. Returns the new ring and
    /// the peers that were added (already-present ones are left as they are).
    ///
    /// Until rebalancing exists, changing a ring that already places volumes
    /// would move extents' replica sets away from where their data is, so that
    /// is refused unless `force` (for a cluster whose volumes hold no data).
    pub async fn add_to_ring(
        &self,
        peers: &[PeerInfo],
        force: bool,
    ) -> Result<(RingDoc, Vec<NodeId>)> {
        let has_volumes = !self.store.list("volumes/by-name/").await?.is_empty();
        let mut added = Vec::new();
        let ring = self
            .update_ring(|ring| {
                added.clear();
                let placing = !ring.members.is_empty() && has_volumes;
                for p in peers {
                    if !ring.contains(p.id) {
                        if placing && !force {
                            return Err(ClusterError::Refused {
                                reason: format!(
                                    "adding {} would move extents of existing volumes away from their data, and \
                                     rebalancing is not implemented yet; add nodes before creating volumes \
                                     (or pass --force if no volume holds data)",
                                    p.address
                                ),
                            });
                        }
                        ring.members.push(RingMember { id: p.id, weight: p.capacity.max(1), labels: p.labels.clone() });
                        added.push(p.id);
                    }
                }
                Ok(!added.is_empty())
            })
            .await?;
        Ok((ring, added))
    }
}
