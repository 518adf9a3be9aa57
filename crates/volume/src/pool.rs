//! Connections to storage nodes, keyed by node id. A few connections per node
//! are used round-robin so that a node serves one volume on several tasks;
//! a broken connection is replaced on next use. Connections are made by the
//! pool's `Transport` (TCP, or in-memory nodes in tests).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use torus_proto::{PeerClient, PeerError, Transport};
use torus_types::NodeId;

pub struct PeerPool {
    transport: Arc<dyn Transport>,
    addrs: Mutex<HashMap<NodeId, String>>,
    conns: Mutex<HashMap<NodeId, Vec<Option<Arc<PeerClient>>>>>,
    per_node: usize,
    next: AtomicUsize,
    timeout: Duration,
    /// When a slow connect to a node last failed: for a moment after, callers
    /// fail at once instead of each waiting for its own connect to time out.
    failed: Mutex<HashMap<NodeId, (std::time::Instant, PeerError)>>,
}

/// How long a failed connect is remembered.
const RETRY_AFTER: Duration = Duration::from_millis(500);
/// A connect that fails after this long is one worth remembering.
const SLOW_CONNECT: Duration = Duration::from_millis(200);

impl PeerPool {
    pub fn new(per_node: usize, timeout: Duration, transport: Arc<dyn Transport>) -> Self {
        PeerPool {
            transport,
            addrs: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            per_node: per_node.max(1),
            next: AtomicUsize::new(0),
            timeout,
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// Sets where each node is reached (from the registered peers).
    pub fn set_addresses(&self, addrs: HashMap<NodeId, String>) {
        let mut cur = self.addrs.lock().expect("pool lock poisoned");
        let mut conns = self.conns.lock().expect("pool lock poisoned");
        for (id, addr) in &addrs {
            if cur.get(id) != Some(addr) {
                conns.remove(id);
            }
        }
        *cur = addrs;
    }

    pub fn address(&self, node: NodeId) -> Option<String> {
        self.addrs.lock().expect("pool lock poisoned").get(&node).cloned()
    }

    /// How to rank `node` for a read: (not on this host, requests in flight).
    /// Lower is better; a node never connected to ranks as remote and idle.
    pub fn read_rank(&self, node: NodeId) -> (bool, usize) {
        let conns = self.conns.lock().expect("pool lock poisoned");
        match conns.get(&node) {
            Some(v) => {
                let local = v.iter().flatten().any(|c| c.is_local());
                (!local, v.iter().flatten().map(|c| c.in_flight()).sum())
            }
            None => (true, 0),
        }
    }

    /// A live connection to `node`, connecting if needed.
    pub async fn get(&self, node: NodeId) -> Result<Arc<PeerClient>, PeerError> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.per_node;
        {
            let conns = self.conns.lock().expect("pool lock poisoned");
            if let Some(Some(c)) = conns.get(&node).and_then(|v| v.get(slot)) {
                if !c.is_dead() {
                    return Ok(c.clone());
                }
            }
        }
        let addr = self.address(node).ok_or_else(|| PeerError::Connect {
            addr: node.to_string(),
            reason: "node is not registered (down, or its lease expired)".into(),
        })?;
        if let Some((at, e)) = self.failed.lock().expect("pool lock poisoned").get(&node) {
            if at.elapsed() < RETRY_AFTER {
                return Err(e.clone());
            }
        }
        let started = std::time::Instant::now();
        let client = match self.transport.connect(&addr, self.timeout).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                // Only slow failures (no answer at all) are remembered: a refused
                // connection costs nothing to retry, and the node may be back already.
                if started.elapsed() >= SLOW_CONNECT {
                    self.failed
                        .lock()
                        .expect("pool lock poisoned")
                        .insert(node, (std::time::Instant::now(), e.clone()));
                }
                return Err(e);
            }
        };
        self.failed.lock().expect("pool lock poisoned").remove(&node);
        let mut conns = self.conns.lock().expect("pool lock poisoned");
        let v = conns.entry(node).or_insert_with(|| vec![None; self.per_node]);
        v[slot] = Some(client.clone());
        Ok(client)
    }
}
