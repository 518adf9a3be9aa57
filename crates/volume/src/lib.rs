//! torus-volume: a volume as a block device.
//!
//! - [`crypt`]: encryption at rest: cluster key, volume keys, the encrypted data path.
//! - [`device`]: the `BlockDevice` trait the NBD server (and later CSI) serves.
//! - [`pool`]: connections to storage nodes, by node id.
//! - [`volume`]: `Volume`, which maps byte ranges to extents, extents to
//!   replica nodes through the ring, and sends reads and replicated writes.
//! - [`tracker`]: the writer's write intent and the copies that missed
//!   writes, kept in etcd; [`resync`] makes replicas agree again from it.
//! - [`manager`]: opening volumes by name: metadata, the writer's lock on a
//!   lease, the epoch it yields, keep-alive, and sharing one open volume
//!   between connections of one process.
//! - [`holder`]: the process tag in a lock, and whether its process died here.
//! - [`layers`]: copy-on-write layers in the data path (snapshots, clones).
//! - [`reclaim`]: freeing what a deleted snapshot held that newer layers replaced.
//! - [`repair`]: the storage nodes' repairer, a writer with no client that
//!   catches up copies of volumes nobody has open.
//!
//! Depends on types, meta, ring and proto; knows nothing of NBD.

pub mod crypt;
pub mod device;
mod error;
pub mod holder;
mod layers;
pub mod lease;
pub mod manager;
pub mod measured;
pub mod pool;
pub mod reclaim;
pub mod repair;
mod resync;
pub mod tracker;
pub mod volume;

pub use device::BlockDevice;
pub use error::VolumeError;
pub use manager::{ManagerOptions, VolumeManager};
pub use volume::Volume;
