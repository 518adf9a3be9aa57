//! torus-node: what a storage node runs.
//!
//! - [`error`]: `NodeError`, what the background work fails with.
//! - [`identity`]: the node's UUID, kept in its data directory.
//! - [`server`]: the peer-protocol server in front of the local store.
//! - [`registration`]: the node's entry in the metadata store, on a lease,
//!   refreshed by heartbeats.
//! - [`liveness`]: writes are accepted only while the node's own lease is provably alive.
//! - [`join`]: `--auto-join`: nodes starting together join the ring in one change.
//! - [`capacity`]: the node marks itself full in the ring when nearly full.
//! - [`rebalance`]: this node's part in moving data when the ring changes.
//! - [`collector`]: deletes the layers no volume or snapshot uses any more.
//! - [`scrub`]: the background verification of every stored block, with repair from replicas.
//! - [`http`] and [`metrics`]: `/status` (JSON) and `/metrics` (Prometheus text).
//! - [`console`]: the web console, `/ui` over the cluster-wide JSON API `/api/v1/...`.
//!
//! Depends on types, meta, store and proto. Never on volume or nbd: a node
//! serves extents and knows nothing of volumes' layout or of clients' protocols.

pub mod capacity;
pub mod collector;
pub mod console;
pub mod error;
pub mod http;
pub mod identity;
pub mod join;
pub mod liveness;
pub mod metrics;
pub mod rebalance;
pub mod registration;
pub mod scrub;
pub mod server;
