//! The writer's memory of replica state (see `torus_meta::cluster::ReplicaState`):
//!
//! - write intent: before the first write to an extent that is not active,
//!   the extent is added to the volume's intent set in etcd; it leaves the set
//!   once no write to it has been in flight for `idle`. After a writer crash,
//!   the next writer resyncs exactly these extents (DRBD's activity log).
//! - missing copies: when a replica cannot be reached, the write goes on to
//!   the others, and the (node, extent) pair is recorded before the write is
//!   acknowledged; reads skip such copies until they are caught up.
//! - per-extent exclusion: writes share an extent, a resync holds it alone.
//!
//! Changes are committed by one background task, batched: many writers
//! waiting for the same commit cost one etcd transaction.

use crate::lease::LeaseState;
use crate::VolumeError;
use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use torus_meta::cluster::{Cluster, ClusterError, ExtentSet, ReplicaState};
use torus_types::{NodeId, VolumeId};

/// How long an extent stays in the intent set after its last write.
pub const INTENT_IDLE: Duration = Duration::from_secs(5);

pub struct Tracker {
    cluster: Cluster,
    volume: VolumeId,
    inner: Mutex<Inner>,
    /// Whether any copy is missing (a fast path for reads).
    any_missing: AtomicBool,
    /// The sequence number of the last committed state.
    committed: watch::Sender<u64>,
    kick: Notify,
    lease: Arc<LeaseState>,
}

struct Inner {
    wanted: ReplicaState,
    /// Bumped on every change of `wanted`.
    seq: u64,
    slots: HashMap<u64, Slot>,
    /// Why commits stopped for good (the lock is gone).
    failed: Option<String>,
}

struct Slot {
    rw: Arc<RwLock<()>>,
    users: u32,
    last: Instant,
    /// The sequence at which this extent entered the intent set, if it is in it.
    intent_seq: Option<u64>,
}

/// Held while writing one extent: keeps it in the intent set and out of a resync.
pub struct WriteGuard<'a> {
    tracker: &'a Tracker,
    index: u64,
    _shared: Option<OwnedRwLockReadGuard<()>>,
}

/// Held while resyncing one extent: no write to it runs meanwhile.
pub struct ExclusiveGuard<'a> {
    tracker: &'a Tracker,
    index: u64,
    _alone: Option<OwnedRwLockWriteGuard<()>>,
}

impl Tracker {
    /// A tracker starting from `state` (already committed, or for a read-only open, never committed).
    pub fn new(cluster: Cluster, volume: VolumeId, state: ReplicaState, lease: Arc<LeaseState>) -> Self {
        let any = state.missing.values().any(|s| !s.is_empty());
        // Extents already in the intent set stay there until idle like any other.
        let slots = state
            .intent
            .0
            .iter()
            .map(|i| (*i, Slot { rw: Arc::new(RwLock::new(())), users: 0, last: Instant::now(), intent_seq: Some(0) }))
            .collect();
        Tracker {
            cluster,
            volume,
            inner: Mutex::new(Inner { wanted: state, seq: 0, slots, failed: None }),
            any_missing: AtomicBool::new(any),
            committed: watch::channel(0).0,
            kick: Notify::new(),
            lease,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("tracker lock poisoned")
    }

    fn slot(inner: &mut Inner, index: u64) -> &mut Slot {
        inner.slots.entry(index).or_insert_with(|| Slot {
            rw: Arc::new(RwLock::new(())),
            users: 0,
            last: Instant::now(),
            intent_seq: None,
        })
    }

    /// Enters a write to extent `index`: records the intent (waiting for the
    /// commit if the extent was idle) and waits out any resync of it.
    pub async fn begin_write(&self, index: u64) -> Result<WriteGuard<'_>, VolumeError> {
        let (rw, seq) = {
            let mut g = self.lock();
            let inner = &mut *g;
            let slot = Self::slot(inner, index);
            slot.users += 1;
            let rw = slot.rw.clone();
            let seq = match slot.intent_seq {
                Some(s) => s,
                None => {
                    inner.seq += 1;
                    let s = inner.seq;
                    Self::slot(inner, index).intent_seq = Some(s);
                    inner.wanted.intent.0.insert(index);
                    self.kick.notify_one();
                    s
                }
            };
            (rw, seq)
        };
        let mut guard = WriteGuard { tracker: self, index, _shared: None };
        self.wait_committed(seq).await?;
        guard._shared = Some(rw.read_owned().await);
        Ok(guard)
    }

    /// Takes extent `index` alone (for a resync): waits for its writes to finish.
    pub async fn exclusive(&self, index: u64) -> ExclusiveGuard<'_> {
        let rw = {
            let mut g = self.lock();
            let slot = Self::slot(&mut g, index);
            slot.users += 1;
            slot.rw.clone()
        };
        let mut guard = ExclusiveGuard { tracker: self, index, _alone: None };
        guard._alone = Some(rw.write_owned().await);
        guard
    }

    fn leave(&self, index: u64) {
        let mut g = self.lock();
        if let Some(slot) = g.slots.get_mut(&index) {
            slot.users -= 1;
            slot.last = Instant::now();
            if slot.users == 0 && slot.intent_seq.is_none() {
                g.slots.remove(&index);
            }
        }
    }

    /// Whether node's copy of extent `index` lacks writes.
    pub fn is_missing(&self, node: NodeId, index: u64) -> bool {
        self.any_missing.load(Ordering::Acquire) && self.lock().wanted.is_missing(node, index)
    }

    /// Records copies that missed writes; returns once that is durable.
    pub async fn mark_missing(&self, marks: &[(NodeId, u64)]) -> Result<(), VolumeError> {
        let seq = {
            let mut g = self.lock();
            let mut changed = false;
            for (n, i) in marks {
                changed |= g.wanted.missing.entry(*n).or_default().0.insert(*i);
            }
            if changed {
                g.seq += 1;
                self.any_missing.store(true, Ordering::Release);
                self.kick.notify_one();
            }
            g.seq
        };
        self.wait_committed(seq).await
    }

    /// Records that node's copy of extent `index` is whole again (committed lazily:
    /// if that is lost, the next writer only copies it again).
    pub fn caught_up(&self, node: NodeId, index: u64) {
        let mut g = self.lock();
        let inner = &mut *g;
        if let Some(set) = inner.wanted.missing.get_mut(&node) {
            if set.0.remove(&index) {
                if set.is_empty() {
                    inner.wanted.missing.remove(&node);
                }
                inner.seq += 1;
                self.kick.notify_one();
            }
        }
        self.any_missing.store(!inner.wanted.missing.is_empty(), Ordering::Release);
    }

    /// The copies to catch up, per node.
    pub fn missing(&self) -> BTreeMap<NodeId, ExtentSet> {
        self.lock().wanted.missing.clone()
    }

    /// Replaces the missing copies with the writer's latest (read-only opens follow it this way).
    pub fn follow(&self, state: ReplicaState) {
        let mut g = self.lock();
        self.any_missing.store(state.missing.values().any(|s| !s.is_empty()), Ordering::Release);
        g.wanted.missing = state.missing;
    }

    async fn wait_committed(&self, seq: u64) -> Result<(), VolumeError> {
        let mut rx = self.committed.subscribe();
        let deadline = tokio::time::Instant::now() + self.lease.hold();
        loop {
            if *rx.borrow_and_update() >= seq {
                return Ok(());
            }
            if let Some(reason) = &self.lock().failed {
                return Err(VolumeError::Unavailable {
                    extent: torus_types::ExtentId::new(self.volume, 0),
                    reason: format!("cannot record the replica state: {reason}"),
                });
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    return Err(VolumeError::Unavailable {
                        extent: torus_types::ExtentId::new(self.volume, 0),
                        reason: "the replica state could not be recorded in etcd in time".into(),
                    })
                }
            }
        }
    }

    /// Drops idle extents from the intent set; true if anything changed.
    fn expire_idle(&self, idle: Duration) -> bool {
        let mut g = self.lock();
        let inner = &mut *g;
        let idle_now: Vec<u64> = inner
            .slots
            .iter()
            .filter(|(_, s)| s.users == 0 && s.intent_seq.is_some() && s.last.elapsed() >= idle)
            .map(|(i, _)| *i)
            .collect();
        for i in &idle_now {
            inner.slots.remove(i);
            inner.wanted.intent.0.remove(i);
        }
        if !idle_now.is_empty() {
            inner.seq += 1;
        }
        !idle_now.is_empty()
    }

    /// Ends the intent of every extent not being written (a clean close) and waits for the commit.
    pub async fn settle(&self) -> Result<(), VolumeError> {
        self.expire_idle(Duration::ZERO);
        let seq = self.lock().seq;
        self.kick.notify_one();
        self.wait_committed(seq).await
    }

    /// Commits changes until the tracker is dropped or the writer's lock is lost.
    pub async fn run_commits(weak: Weak<Self>) {
        let mut done = 0;
        loop {
            let Some(t) = weak.upgrade() else { return };
            let _ = tokio::time::timeout(Duration::from_secs(1), t.kick.notified()).await;
            if t.commit_once(&mut done).await.is_break() {
                return;
            }
        }
    }

    async fn commit_once(&self, done: &mut u64) -> ControlFlow<()> {
        self.expire_idle(INTENT_IDLE);
        let (state, seq) = {
            let g = self.lock();
            (g.wanted.clone(), g.seq)
        };
        if self.lease.is_lost() {
            self.lock().failed = Some("the writer's lease was lost".into());
            self.committed.send_modify(|_| {});
            return ControlFlow::Break(());
        }
        if seq == *done {
            return ControlFlow::Continue(());
        }
        match self.cluster.put_replica_state(self.volume, &state).await {
            Ok(()) => {
                *done = seq;
                self.committed.send_replace(seq);
            }
            Err(e @ ClusterError::LockLost { .. }) => {
                tracing::error!(error = %e, "the volume lock is gone; refusing further writes");
                self.lease.lose();
                self.lock().failed = Some(e.to_string());
                self.committed.send_modify(|_| {});
                return ControlFlow::Break(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not record the replica state; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.kick.notify_one();
            }
        }
        ControlFlow::Continue(())
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self._shared = None;
        self.tracker.leave(self.index);
    }
}

impl Drop for ExclusiveGuard<'_> {
    fn drop(&mut self) {
        self._alone = None;
        self.tracker.leave(self.index);
    }
}
