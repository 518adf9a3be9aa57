//! The `MetadataStore` trait and the plain data types it speaks.
//!
//! Keys are relative strings (`volumes/by-name/db`); each backend places them
//! under its own prefix. Revisions are the store's global, monotonically
//! increasing modification counter (etcd's revision).

use crate::Result;
use async_trait::async_trait;
use std::time::Duration;
use tokio::sync::mpsc;

pub type Revision = u64;
pub type LeaseId = i64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// Relative key (prefix stripped).
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the key's creation (since it last did not exist).
    pub create_revision: Revision,
    /// Revision of the key's last modification.
    pub mod_revision: Revision,
    /// Number of modifications since creation (1 after the first put).
    pub version: u64,
    /// The lease the key is attached to, 0 for none.
    pub lease: LeaseId,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl: Duration,
}

/// One condition of a transaction; all must hold for the success branch.
#[derive(Clone, Debug)]
pub struct Compare {
    pub key: String,
    pub target: CompareTarget,
}

#[derive(Clone, Debug)]
pub enum CompareTarget {
    /// The key exists (true) or does not (false).
    Exists(bool),
    /// The key's mod revision equals this value.
    ModRevision(Revision),
    /// The key's create revision equals this value.
    CreateRevision(Revision),
    /// The key exists and holds exactly this value.
    Value(Vec<u8>),
}

impl Compare {
    pub fn exists(key: impl Into<String>, exists: bool) -> Self {
        Compare { key: key.into(), target: CompareTarget::Exists(exists) }
    }
    pub fn mod_revision(key: impl Into<String>, rev: Revision) -> Self {
        Compare { key: key.into(), target: CompareTarget::ModRevision(rev) }
    }
    pub fn create_revision(key: impl Into<String>, rev: Revision) -> Self {
        Compare { key: key.into(), target: CompareTarget::CreateRevision(rev) }
    }
    pub fn value(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Compare { key: key.into(), target: CompareTarget::Value(value.into()) }
    }
}

#[derive(Clone, Debug)]
pub enum TxnOp {
    Put { key: String, value: Vec<u8>, lease: Option<LeaseId> },
    Delete { key: String },
}

impl TxnOp {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        TxnOp::Put { key: key.into(), value: value.into(), lease: None }
    }
    pub fn put_leased(key: impl Into<String>, value: impl Into<Vec<u8>>, lease: LeaseId) -> Self {
        TxnOp::Put { key: key.into(), value: value.into(), lease: Some(lease) }
    }
    pub fn delete(key: impl Into<String>) -> Self {
        TxnOp::Delete { key: key.into() }
    }
}

/// A compare-and-swap transaction: if every compare holds, apply `success`,
/// else apply `failure`; atomically either way.
#[derive(Clone, Debug, Default)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

impl Txn {
    pub fn when(compares: Vec<Compare>) -> Self {
        Txn { compares, ..Default::default() }
    }
    pub fn and_then(mut self, ops: Vec<TxnOp>) -> Self {
        self.success = ops;
        self
    }
    pub fn or_else(mut self, ops: Vec<TxnOp>) -> Self {
        self.failure = ops;
        self
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxnOutcome {
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: Revision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchEventKind {
    Put,
    Delete,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: WatchEventKind,
    /// For a delete, the value is empty and the revisions are the deletion's.
    pub kv: KeyValue,
}

/// A stream of events under a prefix, in revision order. An `Err` item ends it
/// (the store went away or the watch was cancelled); callers re-list and watch again.
pub type Watch = mpsc::UnboundedReceiver<Result<WatchEvent>>;

/// The metadata store: what Torus needs from etcd and nothing more.
#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// A human description of where the store is (for error messages).
    fn endpoint(&self) -> String;

    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Every key starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>>;
    /// The same, with the store revision the list was read at (a watch from
    /// the next revision then misses nothing and repeats nothing).
    async fn list_at(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)>;
    /// Puts a value, optionally attached to a lease; returns the new revision.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision>;
    /// Deletes one key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool>;
    /// Deletes every key under `prefix`; returns how many.
    async fn delete_prefix(&self, prefix: &str) -> Result<u64>;
    async fn txn(&self, txn: Txn) -> Result<TxnOutcome>;

    /// Grants a lease that expires `ttl` after its last keep-alive (whole seconds, at least 1).
    async fn grant_lease(&self, ttl: Duration) -> Result<Lease>;
    /// Refreshes a lease; returns its TTL. `LeaseNotFound` once it has expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration>;
    /// Revokes a lease, deleting the keys attached to it.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Watches keys under `prefix`, from `from` (inclusive) or from now.
    async fn watch_prefix(&self, prefix: &str, from: Option<Revision>) -> Result<Watch>;
}
