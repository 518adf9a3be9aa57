//! A process's live copy of the cluster state its background loops follow:
//! the config, the ring, the registered peers, the volumes, their replica
//! states and the nodes' move progress.
//!
//! One read of the whole cluster prefix when it starts, then one watch from
//! the revision of that read, applied event by event (in revision order, so
//! the copy is always the store's state at some revision); a full read again
//! only when the watch is lost. An idle cluster thus costs its followers no
//! etcd requests at all, however many nodes it has: what changes is sent
//! once to each follower, and only what changed.
//!
//! States: `Loading` (nothing read yet: readers wait), `Following(rev)`,
//! `Lost` (the watch ended: readers get [`ClusterError::Meta`] until the
//! next full read succeeds, as they would polling a store that is down).
//!
//! Only the followers' loops read here (what to move, what to repair, which
//! ring to use, who is up). Every decision that changes shared state is a
//! compare-and-swap against the store itself, so a view a few milliseconds
//! behind can delay an action, never make a wrong one take effect.

use super::{decode, ClusterConfig, ClusterError, PeerInfo, RebalanceProgress, ReplicaState, Result};
use super::{RingDoc, VolumeInfo};
use crate::{KeyValue, MetaError, MetadataStore, WatchEventKind};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use torus_types::{NodeId, VolumeId};

/// Where the view stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewPhase {
    /// Nothing read yet.
    Loading,
    /// Up to date as of this store revision.
    Following(u64),
    /// The watch ended; a full read is being retried.
    Lost,
}

/// The followed state, as of one store revision.
#[derive(Clone, Debug)]
pub struct ViewState {
    pub phase: ViewPhase,
    pub config: Option<ClusterConfig>,
    pub ring: RingDoc,
    /// The ring key's mod revision (0: no ring yet).
    pub ring_revision: u64,
    pub peers: BTreeMap<NodeId, PeerInfo>,
    /// Volumes by name.
    pub volumes: BTreeMap<String, VolumeInfo>,
    pub states: BTreeMap<VolumeId, ReplicaState>,
    pub progress: BTreeMap<NodeId, RebalanceProgress>,
    /// Bumped by every applied change to a volume or snapshot record or the volume id counter.
    pub layers_generation: u64,
}

impl Default for ViewState {
    fn default() -> Self {
        ViewState {
            phase: ViewPhase::Loading,
            config: None,
            ring: RingDoc::default(),
            ring_revision: 0,
            peers: BTreeMap::new(),
            volumes: BTreeMap::new(),
            states: BTreeMap::new(),
            progress: BTreeMap::new(),
            layers_generation: 0,
        }
    }
}

/// How long a reader waits for the first full read before it gets an error.
const LOAD_WAIT: Duration = Duration::from_secs(5);
/// Pause before a full read is tried again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// A handle on the process's view (cheap to clone; the follower stops with the last handle).
#[derive(Clone)]
pub struct ClusterView {
    rx: watch::Receiver<ViewState>,
    endpoint: String,
    _task: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One key's place in the view.
enum Entry {
    Config,
    Ring,
    Peer(NodeId),
    Volume(String),
    State(VolumeId),
    Progress(NodeId),
    /// A snapshot record or the id counter: only the layers' generation counts it.
    Layers,
}

impl Entry {
    fn of(key: &str) -> Option<Entry> {
        let node = NodeId::parse;
        Some(match key {
            "cluster/config" => Entry::Config,
            "ring" => Entry::Ring,
            "volumes/next-id" => Entry::Layers,
            _ => {
                if let Some(rest) = key.strip_prefix("peers/") {
                    Entry::Peer(node(rest)?)
                } else if let Some(name) = key.strip_prefix("volumes/by-name/") {
                    Entry::Volume(name.to_string())
                } else if let Some(rest) = key.strip_prefix("vstate/") {
                    Entry::State(VolumeId(rest.parse().ok()?))
                } else if let Some(rest) = key.strip_prefix("rebalance/") {
                    Entry::Progress(node(rest)?)
                } else if key.starts_with("snapshots/") {
                    Entry::Layers
                } else {
                    return None;
                }
            }
        })
    }
}

impl ViewState {
    /// Applies one put (`Some(kv)`) or delete (`None`) of `key`; false if the
    /// view does not hold that key. A value that does not decode is left out
    /// (logged): the store's own readers report it.
    fn apply(&mut self, key: &str, kv: Option<&KeyValue>) -> bool {
        let Some(entry) = Entry::of(key) else { return false };
        fn put<K: Ord, V: serde::de::DeserializeOwned>(map: &mut BTreeMap<K, V>, k: K, kv: Option<&KeyValue>) {
            match kv.map(|kv| decode::<V>(&kv.key, &kv.value)) {
                None => {
                    map.remove(&k);
                }
                Some(Ok(v)) => {
                    map.insert(k, v);
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the cluster view leaves out a record it cannot read");
                    map.remove(&k);
                }
            }
        }
        match entry {
            Entry::Config => self.config = kv.and_then(|kv| decode(&kv.key, &kv.value).ok()),
            Entry::Ring => match kv {
                Some(kv) => match decode(&kv.key, &kv.value) {
                    Ok(ring) => {
                        self.ring = ring;
                        self.ring_revision = kv.mod_revision;
                    }
                    Err(e) => tracing::warn!(error = %e, "the cluster view cannot read the ring"),
                },
                None => {
                    self.ring = RingDoc::default();
                    self.ring_revision = 0;
                }
            },
            Entry::Peer(id) => put(&mut self.peers, id, kv),
            Entry::Volume(name) => {
                put(&mut self.volumes, name, kv);
                self.layers_generation += 1;
            }
            Entry::State(id) => put(&mut self.states, id, kv),
            Entry::Progress(id) => put(&mut self.progress, id, kv),
            Entry::Layers => self.layers_generation += 1,
        }
        true
    }

    fn loaded(kvs: &[KeyValue], revision: u64, generation: u64) -> ViewState {
        let mut s = ViewState { layers_generation: generation + 1, ..ViewState::default() };
        for kv in kvs {
            s.apply(&kv.key, Some(kv));
        }
        s.phase = ViewPhase::Following(revision);
        s
    }
}

impl ClusterView {
    /// Starts following `store` (a task of the current runtime).
    pub fn start(store: Arc<dyn MetadataStore>) -> ClusterView {
        let (tx, rx) = watch::channel(ViewState::default());
        let endpoint = store.endpoint();
        let task = tokio::spawn(follow(store, tx));
        ClusterView { rx, endpoint, _task: Arc::new(AbortOnDrop(task)) }
    }

    /// Runs `f` on the current state once it is usable: waits for the first
    /// full read (up to a few seconds); an error while the watch is lost.
    pub async fn read<T>(&self, f: impl FnOnce(&ViewState) -> T) -> Result<T> {
        let mut rx = self.rx.clone();
        let ready = tokio::time::timeout(LOAD_WAIT, rx.wait_for(|s| s.phase != ViewPhase::Loading)).await;
        let state = match ready {
            Ok(Ok(state)) => state,
            Ok(Err(_)) | Err(_) => return Err(self.unavailable("the cluster view has not been read yet")),
        };
        if state.phase == ViewPhase::Lost {
            return Err(self.unavailable("the cluster view lost its watch"));
        }
        Ok(f(&state))
    }

    fn unavailable(&self, reason: &str) -> ClusterError {
        ClusterError::Meta(MetaError::Unavailable { endpoint: self.endpoint.clone(), reason: reason.into() })
    }

    /// Waits until the view changes, or `max_wait`; true if it changed.
    pub async fn changed(&mut self, max_wait: Duration) -> bool {
        matches!(tokio::time::timeout(max_wait, self.rx.changed()).await, Ok(Ok(())))
    }

    /// Where the view stands now.
    pub fn phase(&self) -> ViewPhase {
        self.rx.borrow().phase
    }

    pub async fn ring(&self) -> Result<(RingDoc, u64)> {
        self.read(|s| (s.ring.clone(), s.ring_revision)).await
    }

    pub async fn peers(&self) -> Result<Vec<PeerInfo>> {
        self.read(|s| s.peers.values().cloned().collect()).await
    }

    pub async fn config(&self) -> Result<ClusterConfig> {
        let endpoint = self.endpoint.clone();
        self.read(|s| s.config.clone()).await?.ok_or(ClusterError::NotInitialized { endpoint })
    }

    pub async fn replica_states(&self) -> Result<BTreeMap<VolumeId, ReplicaState>> {
        self.read(|s| s.states.clone()).await
    }

    pub async fn replica_state(&self, id: VolumeId) -> Result<ReplicaState> {
        self.read(|s| s.states.get(&id).cloned().unwrap_or_default()).await
    }

    pub async fn volumes(&self) -> Result<Vec<VolumeInfo>> {
        self.read(|s| s.volumes.values().cloned().collect()).await
    }

    pub async fn volume(&self, name: &str) -> Result<Option<VolumeInfo>> {
        self.read(|s| s.volumes.get(name).cloned()).await
    }

    pub async fn progress(&self) -> Result<Vec<(NodeId, RebalanceProgress)>> {
        self.read(|s| s.progress.iter().map(|(id, p)| (*id, p.clone())).collect()).await
    }
}

/// The follower: full read, then the watch from the next revision; again on loss.
async fn follow(store: Arc<dyn MetadataStore>, tx: watch::Sender<ViewState>) {
    let mut failing = false;
    loop {
        let generation = tx.borrow().layers_generation;
        let started = async {
            let (kvs, revision) = store.list_at("").await?;
            let watch = store.watch_prefix("", Some(revision + 1)).await?;
            Ok::<_, MetaError>((ViewState::loaded(&kvs, revision, generation), watch))
        };
        let (state, mut events) = match started.await {
            Ok(x) => x,
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read the cluster state; retrying");
                    failing = true;
                }
                tx.send_if_modified(|s| {
                    let was = s.phase;
                    if was != ViewPhase::Loading {
                        s.phase = ViewPhase::Lost;
                    }
                    s.phase != was
                });
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        if failing {
            tracing::info!("following the cluster state again");
            failing = false;
        }
        tx.send_replace(state);
        while let Some(event) = events.recv().await {
            match event {
                Ok(ev) => {
                    let rev = ev.kv.mod_revision;
                    // Followers wake only for keys the view holds (not for locks,
                    // attachments or snapshot requests), though the revision moves on.
                    tx.send_if_modified(|s| {
                        let held = match ev.kind {
                            WatchEventKind::Put => s.apply(&ev.kv.key, Some(&ev.kv)),
                            WatchEventKind::Delete => s.apply(&ev.kv.key, None),
                        };
                        s.phase = ViewPhase::Following(rev);
                        held
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the cluster watch ended; reading the state again");
                    failing = true;
                    break;
                }
            }
        }
        tx.send_modify(|s| s.phase = ViewPhase::Lost);
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::MemStore;

    #[tokio::test]
    async fn follows_puts_and_deletes_after_a_first_read() {
        let c = Cluster::new(Arc::new(MemStore::new()));
        let config = ClusterConfig { extent_size: 1 << 20, replication: 2, format: 1, down_out_secs: 0 };
        c.init(&config).await.unwrap();
        c.update_ring(|_| Ok(true)).await.unwrap();
        let mut view = c.view();
        assert_eq!(view.ring().await.unwrap().0.version, 1);
        assert_eq!(view.config().await.unwrap(), config);
        c.update_ring(|_| Ok(true)).await.unwrap();
        while view.ring().await.unwrap().0.version != 2 {
            assert!(view.changed(Duration::from_secs(5)).await, "the view follows the ring");
        }
        let lease = c.store().grant_lease(Duration::from_secs(30)).await.unwrap();
        let peer = PeerInfo::bare(NodeId::random(), "127.0.0.1:1", 1 << 30, "test");
        c.register_peer(&peer, lease.id).await.unwrap();
        while view.peers().await.unwrap().is_empty() {
            assert!(view.changed(Duration::from_secs(5)).await, "the view follows the peers");
        }
        c.store().revoke_lease(lease.id).await.unwrap();
        while !view.peers().await.unwrap().is_empty() {
            assert!(view.changed(Duration::from_secs(5)).await, "a lapsed registration leaves the view");
        }
        assert!(!view.changed(Duration::from_millis(100)).await, "nothing else changed");
    }
}
