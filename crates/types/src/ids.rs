//! Identifiers. Newtypes so that a volume id is never passed where an extent
//! index or an epoch was meant.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A volume's id: allocated once from a counter in the metadata store and
/// never reused, so stale data of a deleted volume can never appear in a new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VolumeId(pub u64);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One fixed-size extent of a volume: the unit of placement and replication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExtentId {
    pub volume: VolumeId,
    pub index: u64,
}

impl ExtentId {
    pub fn new(volume: VolumeId, index: u64) -> Self {
        ExtentId { volume, index }
    }

    /// A stable 64-bit key for placement hashing.
    pub fn placement_key(&self) -> u64 {
        // splitmix64 of the two halves: cheap and well mixed.
        splitmix64(self.volume.0 ^ splitmix64(self.index))
    }
}

impl fmt::Display for ExtentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.volume.0, self.index)
    }
}

/// splitmix64 finaliser, used for placement hashing.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A storage node's identity: a UUID kept in its data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub uuid::Uuid);

impl NodeId {
    pub fn random() -> Self {
        NodeId(uuid::Uuid::new_v4())
    }

    pub fn parse(s: &str) -> Option<Self> {
        uuid::Uuid::parse_str(s.trim()).ok().map(NodeId)
    }

    pub fn as_u128(&self) -> u128 {
        self.0.as_u128()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A writer's epoch for one volume: the metadata-store revision at which its
/// lock was granted. Strictly increasing across successive holders, so a node
/// can refuse a write carrying an epoch older than one it has already seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
