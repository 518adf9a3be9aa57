//! torus-meta: everything Torus keeps in its metadata store.
//!
//! Two layers:
//! - [`MetadataStore`], a narrow key-value trait (ranged get/put/delete under
//!   a prefix, compare-and-swap transactions, leases with keep-alive, watches)
//!   with an etcd v3 backend ([`EtcdStore`]) and an in-memory one
//!   ([`MemStore`]); [`conformance`] is one test suite both must pass.
//! - [`cluster`], the typed schema on top: cluster config, peers, the ring
//!   document, volumes and their writer locks.
//!
//! Depends on torus-types only. Knows nothing of the data path: no block I/O
//! ever goes through here, and nothing here is called per I/O.

pub mod cluster;
pub mod conformance;
mod error;
mod etcd;
mod mem;
mod store;

pub use error::MetaError;
pub use etcd::{register_metrics as register_etcd_metrics, EtcdSecurity, EtcdStore};
pub use mem::MemStore;
pub use store::{
    Compare, CompareTarget, KeyValue, Lease, LeaseId, MetadataStore, Revision, Txn, TxnOp, TxnOutcome, Watch,
    WatchEvent, WatchEventKind,
};

pub type Result<T, E = MetaError> = std::result::Result<T, E>;

/// Default key prefix in etcd.
pub const DEFAULT_PREFIX: &str = "/torus";
/// Default etcd endpoint.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:2379";
