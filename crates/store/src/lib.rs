//! torus-store: one node's local block store.
//!
//! Owns the bytes on this node's disk: each extent replica is one sparse file
//! holding a table of per-block (4 KiB) CRC32C checksums and states, then the
//! data (`docs/format.md` has the byte layout; extents of older stores keep
//! the table in a second file). Every read is verified against its
//! checksum; flushes are group-committed with fdatasync; TRIM and
//! WRITE_ZEROES punch holes; a crash (kill -9) mid-write leaves each block
//! either old or new, never unreadable. It also keeps the newest writer epoch
//! seen per volume, so that a stale writer's requests are refused. Its file
//! I/O goes through a `Disk` (`io`), which tests replace with one that fails.
//!
//! Depends on torus-types only: it knows nothing of the network, of etcd or
//! of other nodes.

mod error;
mod extent;
mod fence;
pub mod io;
mod layout;
mod store;

pub use error::StoreError;
pub use io::{Disk, LocalDisk};
pub use layout::{data_file, BlockState, DATA_OFFSET};
pub use store::{ExtentStat, Store, StoreOptions};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Turns on the fail points named in `FAILPOINTS` (e.g.
/// `store::data-write=5*off->return`), when built with the `failpoints`
/// feature; does nothing otherwise. The points:
/// - `store::data-write`: a data write fails with EIO (`return`), ENOSPC
///   (`return(enospc)`), or writes half its data first (`return(torn)`);
/// - `store::crash-after-entries`: the process aborts between a write's
///   checksum entries and its data;
/// - `rebalance::after-progress` (torus-node): the process aborts right
///   after a node records its rebalance progress;
/// - `volume::after-mark-missing` (torus-volume): a write fails after its
///   unreachable replicas were recorded missing, before it is acknowledged.
pub fn failpoints_from_env() {
    if cfg!(feature = "failpoints") {
        // Configured for the life of the process.
        std::mem::forget(fail::FailScenario::setup());
    }
}

/// Largest extent a store accepts (offsets within an extent travel as u32).
pub const MAX_EXTENT_SIZE: u64 = 1 << 30;
