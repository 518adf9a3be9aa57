//! torus-types: the vocabulary every other Torus crate shares.
//!
//! Owns: identifiers (`VolumeId`, `ExtentId`, `NodeId`, `Epoch`), byte sizes
//! and their human parsing, and the block checksum. It must not do I/O, spawn
//! tasks or depend on any other Torus crate: everything depends on it.

pub mod checksum;
pub mod ids;
pub mod size;

pub use checksum::{block_checksum, BLOCK_SIZE};
pub use ids::{Epoch, ExtentId, NodeId, VolumeId};
pub use size::{format_size, parse_size, SizeError};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
