//! What a volume's writer must remember across its own crash: which extents
//! it may have been writing (the write intent) and which replicas missed
//! writes (degraded writes, to be caught up). One key per volume,
//! `vstate/<volume id>`, rewritten only when an extent becomes active or
//! idle, or when a replica fails or catches up: never per I/O.
//!
//! Only the volume's current writer may change it: every put compares the
//! lock key's create revision (the writer's epoch) in the same transaction.

use super::keys::{lock_key, state_key};
use super::{decode, encode, Cluster, ClusterError, Result};
use crate::{Compare, Txn, TxnOp};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet};
use torus_types::{Epoch, NodeId, VolumeId};

/// A set of extent indexes, stored as `[start, end)` ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentSet(pub BTreeSet<u64>);

impl ExtentSet {
    pub fn ranges(&self) -> Vec<[u64; 2]> {
        let mut out: Vec<[u64; 2]> = Vec::new();
        for &i in &self.0 {
            match out.last_mut() {
                Some(r) if r[1] == i => r[1] = i + 1,
                _ => out.push([i, i + 1]),
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn contains(&self, i: u64) -> bool {
        self.0.contains(&i)
    }
}

impl Serialize for ExtentSet {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.ranges().serialize(s)
    }
}

impl<'de> Deserialize<'de> for ExtentSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let ranges: Vec<[u64; 2]> = Vec::deserialize(d)?;
        let mut set = BTreeSet::new();
        for [a, b] in ranges {
            if b < a || b - a > (1 << 32) {
                return Err(serde::de::Error::custom(format!("bad extent range {a}..{b}")));
            }
            set.extend(a..b);
        }
        Ok(ExtentSet(set))
    }
}

/// The replica state of one volume.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// The epoch of the writer that wrote this document.
    pub epoch: Epoch,
    /// Extents that writer may have had writes in flight to: their replicas
    /// may disagree until resynced.
    pub intent: ExtentSet,
    /// Per node, extents whose copy there lacks acknowledged writes: never
    /// read from there until caught up.
    pub missing: BTreeMap<NodeId, ExtentSet>,
}

impl ReplicaState {
    pub fn is_missing(&self, node: NodeId, extent: u64) -> bool {
        self.missing.get(&node).is_some_and(|s| s.contains(extent))
    }

    /// Extents with at least one copy to catch up.
    pub fn missing_count(&self) -> usize {
        self.missing.values().map(ExtentSet::len).sum()
    }
}

impl Cluster {
    /// A volume's replica state (empty if it never had one).
    pub async fn replica_state(&self, id: VolumeId) -> Result<ReplicaState> {
        match self.store.get(&state_key(id)).await? {
            Some(kv) => decode(&kv.key, &kv.value),
            None => Ok(ReplicaState::default()),
        }
    }

    /// Every volume's replica state, by id.
    pub async fn replica_states(&self) -> Result<BTreeMap<VolumeId, ReplicaState>> {
        let mut out = BTreeMap::new();
        for kv in self.store.list("vstate/").await? {
            let id = kv.key.rsplit('/').next().and_then(|s| s.parse().ok()).map(VolumeId);
            if let Some(id) = id {
                out.insert(id, decode(&kv.key, &kv.value)?);
            }
        }
        Ok(out)
    }

    /// Writes a volume's replica state if `epoch` still holds its lock.
    pub async fn put_replica_state(&self, id: VolumeId, state: &ReplicaState) -> Result<()> {
        let txn = Txn::when(vec![Compare::create_revision(lock_key(id), state.epoch.0)])
            .and_then(vec![TxnOp::put(state_key(id), encode(state))]);
        if self.store.txn(txn).await?.succeeded {
            Ok(())
        } else {
            Err(ClusterError::LockLost { volume: id, epoch: state.epoch })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_sets_round_trip_as_ranges() {
        let s = ExtentSet([0, 1, 2, 5, 7, 8].into_iter().collect());
        assert_eq!(s.ranges(), vec![[0, 3], [5, 6], [7, 9]]);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "[[0,3],[5,6],[7,9]]");
        assert_eq!(serde_json::from_str::<ExtentSet>(&json).unwrap(), s);
        assert!(serde_json::from_str::<ExtentSet>("[[5,3]]").is_err());
    }
}
