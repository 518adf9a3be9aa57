//! An in-memory `MetadataStore` with etcd's semantics, for fast unit tests.
//!
//! Revisions, create/mod revisions, versions, leases that expire and delete
//! their keys, transactions and watches (with history, so `from` works)
//! behave as etcd's do; the conformance suite runs against both to keep it so.
//! Not durable and not shared between processes: never used in production.

use crate::store::*;
use crate::{MetaError, Result};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, (Duration, Instant)>,
    next_lease: LeaseId,
    history: Vec<(Revision, WatchEvent)>,
    watchers: Vec<(String, mpsc::UnboundedSender<Result<WatchEvent>>)>,
}

impl Inner {
    fn emit(&mut self, ev: WatchEvent) {
        self.history.push((self.revision, ev.clone()));
        self.watchers.retain(|(prefix, tx)| {
            if ev.kv.key.starts_with(prefix.as_str()) {
                tx.send(Ok(ev.clone())).is_ok()
            } else {
                !tx.is_closed()
            }
        });
    }

    /// Applies one put at the current revision (the caller bumps it).
    fn put(&mut self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<()> {
        let lease = lease.unwrap_or(0);
        if lease != 0 && !self.leases.contains_key(&lease) {
            return Err(MetaError::LeaseNotFound { lease });
        }
        let rev = self.revision;
        let kv = match self.kvs.get(key) {
            Some(old) => KeyValue { value, mod_revision: rev, version: old.version + 1, lease, ..old.clone() },
            None => {
                KeyValue { key: key.to_string(), value, create_revision: rev, mod_revision: rev, version: 1, lease }
            }
        };
        self.kvs.insert(key.to_string(), kv.clone());
        self.emit(WatchEvent { kind: WatchEventKind::Put, kv });
        Ok(())
    }

    fn delete(&mut self, key: &str) -> bool {
        match self.kvs.remove(key) {
            Some(old) => {
                let kv = KeyValue {
                    key: old.key,
                    value: Vec::new(),
                    create_revision: 0,
                    mod_revision: self.revision,
                    version: 0,
                    lease: 0,
                };
                self.emit(WatchEvent { kind: WatchEventKind::Delete, kv });
                true
            }
            None => false,
        }
    }

    /// Expires leases whose deadline has passed, deleting their keys.
    fn expire(&mut self) {
        let now = Instant::now();
        let dead: Vec<LeaseId> =
            self.leases.iter().filter(|(_, (_, deadline))| *deadline <= now).map(|(id, _)| *id).collect();
        for id in dead {
            self.revoke(id);
        }
    }

    fn revoke(&mut self, id: LeaseId) -> bool {
        if self.leases.remove(&id).is_none() {
            return false;
        }
        let keys: Vec<String> = self.kvs.values().filter(|kv| kv.lease == id).map(|kv| kv.key.clone()).collect();
        if !keys.is_empty() {
            self.revision += 1;
            for k in keys {
                self.delete(&k);
            }
        }
        true
    }

    fn holds(&self, c: &Compare) -> bool {
        let kv = self.kvs.get(&c.key);
        match &c.target {
            CompareTarget::Exists(e) => kv.is_some() == *e,
            CompareTarget::ModRevision(r) => kv.map(|kv| kv.mod_revision).unwrap_or(0) == *r,
            CompareTarget::CreateRevision(r) => kv.map(|kv| kv.create_revision).unwrap_or(0) == *r,
            CompareTarget::Value(v) => kv.map(|kv| &kv.value == v).unwrap_or(false),
        }
    }
}

impl MemStore {
    pub fn new() -> Self {
        let store = MemStore::default();
        // Expire leases in the background so that watchers see the deletions.
        let weak = Arc::downgrade(&store.inner);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let Some(inner) = weak.upgrade() else { return };
                    inner.lock().expect("mem store lock poisoned").expire();
                }
            });
        }
        store
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        let mut g = self.inner.lock().expect("mem store lock poisoned");
        g.expire();
        g
    }
}

#[async_trait]
impl MetadataStore for MemStore {
    fn endpoint(&self) -> String {
        "memory".into()
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        Ok(self.lock().kvs.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        Ok(self.list_at(prefix).await?.0)
    }

    async fn list_at(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let g = self.lock();
        let kvs = g
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok((kvs, g.revision))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        let mut g = self.lock();
        if let Some(l) = lease.filter(|l| *l != 0) {
            if !g.leases.contains_key(&l) {
                return Err(MetaError::LeaseNotFound { lease: l });
            }
        }
        g.revision += 1;
        g.put(key, value, lease)?;
        Ok(g.revision)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let mut g = self.lock();
        if !g.kvs.contains_key(key) {
            return Ok(false);
        }
        g.revision += 1;
        Ok(g.delete(key))
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let mut g = self.lock();
        let keys: Vec<String> = g
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return Ok(0);
        }
        g.revision += 1;
        for k in &keys {
            g.delete(k);
        }
        Ok(keys.len() as u64)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        let mut g = self.lock();
        let succeeded = txn.compares.iter().all(|c| g.holds(c));
        let ops = if succeeded { &txn.success } else { &txn.failure };
        // Check leases first so that a failing op leaves nothing half-applied, as in etcd.
        for op in ops {
            if let TxnOp::Put { lease: Some(l), .. } = op {
                if *l != 0 && !g.leases.contains_key(l) {
                    return Err(MetaError::LeaseNotFound { lease: *l });
                }
            }
        }
        let writes = ops.iter().any(|op| match op {
            TxnOp::Put { .. } => true,
            TxnOp::Delete { key } => g.kvs.contains_key(key),
        });
        if writes {
            g.revision += 1;
            for op in ops {
                match op {
                    TxnOp::Put { key, value, lease } => g.put(key, value.clone(), *lease)?,
                    TxnOp::Delete { key } => {
                        g.delete(key);
                    }
                }
            }
        }
        Ok(TxnOutcome { succeeded, revision: g.revision })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        let mut g = self.lock();
        g.next_lease += 1;
        let id = 0x7000_0000 + g.next_lease;
        let ttl = Duration::from_secs(ttl.as_secs().max(1));
        g.leases.insert(id, (ttl, Instant::now() + ttl));
        Ok(Lease { id, ttl })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let mut g = self.lock();
        match g.leases.get_mut(&lease) {
            Some((ttl, deadline)) => {
                *deadline = Instant::now() + *ttl;
                Ok(*ttl)
            }
            None => Err(MetaError::LeaseNotFound { lease }),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.lock().revoke(lease);
        Ok(())
    }

    async fn watch_prefix(&self, prefix: &str, from: Option<Revision>) -> Result<Watch> {
        let mut g = self.lock();
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(from) = from {
            for (rev, ev) in &g.history {
                if *rev >= from && ev.kv.key.starts_with(prefix) {
                    let _ = tx.send(Ok(ev.clone()));
                }
            }
        }
        g.watchers.push((prefix.to_string(), tx));
        Ok(rx)
    }
}
