//! In-memory storage nodes and the network between them and the client: a
//! `Transport` whose links call a node's real request `Handler` (and so its
//! real `Store`, on a temporary directory) with no sockets, and where the
//! test injects faults:
//!
//! - `Fault::Reset`: the node refuses connections and breaks links at once;
//! - `Fault::Blackhole`: requests are never answered (the client times out);
//! - `crash` / `restart`: the node's store is dropped and opened again from
//!   its directory (crash recovery runs); replies of requests in flight
//!   are lost, whether or not the store applied them;
//! - `delay`: replies come after a random delay, so they overtake each other;
//! - `disk`: the node's store runs on a `FaultyDisk`, which the test makes
//!   fail (EIO, ENOSPC, torn writes, failed fdatasync) and heals.
//!
//! A crash here loses no written data (the page cache of this machine
//! survives it); losing unflushed writes is tested with real processes
//! (`writer_crash`, `faults`).

use bytes::Bytes;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use torus_node::metrics::NodeMetrics;
use torus_node::server::Handler;
use torus_proto::transport::BoxFuture;
use torus_proto::{Link, PeerClient, PeerError, RequestHeader, Status, Transport};
use torus_store::io::FaultyDisk;
use torus_store::{LocalDisk, Store, StoreOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Reset,
    Blackhole,
}

struct NodeState {
    handler: Option<Arc<Handler>>,
    fault: Option<Fault>,
    /// Upper bound of a reply's random delay, in microseconds (0: none).
    delay_us: u64,
}

pub struct SimNode {
    pub dir: PathBuf,
    /// The disk under the node's store: faults are injected here.
    pub disk: FaultyDisk,
    state: Mutex<NodeState>,
    /// Bumped by every crash and every reset: links made before are dead.
    incarnation: AtomicU64,
}

impl SimNode {
    fn open(dir: PathBuf, disk: &FaultyDisk) -> Arc<Handler> {
        let opts = StoreOptions { disk: Arc::new(disk.clone()), ..Default::default() };
        let store = Store::open(&dir, opts).expect("open a simulated node's store");
        Handler::new(Arc::new(store), Arc::new(NodeMetrics::default()))
    }

    /// The node's store, if it is running.
    pub fn store(&self) -> Option<Arc<Store>> {
        self.state.lock().unwrap().handler.as_ref().map(|h| h.store().clone())
    }

    fn unreachable(&self, addr: &str, connect: bool) -> PeerError {
        let reason = "simulated fault".to_string();
        if connect {
            PeerError::Connect { addr: addr.to_string(), reason }
        } else {
            PeerError::Disconnected { addr: addr.to_string(), reason }
        }
    }
}

/// The simulated network: nodes by address, and a seeded source of delays.
pub struct SimNet {
    nodes: Mutex<HashMap<String, Arc<SimNode>>>,
    draws: Arc<Draws>,
}

/// Random delays: a hash of (seed, draw number).
struct Draws {
    seed: u64,
    n: AtomicU64,
}

impl Draws {
    fn below(&self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        let mut z = self.seed ^ self.n.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % bound
    }
}

impl std::fmt::Debug for SimNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNet").field("seed", &self.draws.seed).finish()
    }
}

impl SimNet {
    pub fn new(seed: u64) -> Arc<SimNet> {
        Arc::new(SimNet { nodes: Mutex::default(), draws: Arc::new(Draws { seed, n: AtomicU64::new(0) }) })
    }

    pub fn add_node(&self, addr: &str, dir: PathBuf) {
        std::fs::create_dir_all(&dir).expect("node directory");
        let disk = FaultyDisk::new(Arc::new(LocalDisk));
        let handler = SimNode::open(dir.clone(), &disk);
        let node = SimNode {
            dir,
            disk,
            state: Mutex::new(NodeState { handler: Some(handler), fault: None, delay_us: 0 }),
            incarnation: AtomicU64::new(0),
        };
        self.nodes.lock().unwrap().insert(addr.to_string(), Arc::new(node));
    }

    pub fn node(&self, addr: &str) -> Arc<SimNode> {
        self.nodes.lock().unwrap().get(addr).expect("simulated node").clone()
    }

    /// Cuts a node off (or, with `None`, heals it).
    pub fn set_fault(&self, addr: &str, fault: Option<Fault>) {
        let n = self.node(addr);
        n.state.lock().unwrap().fault = fault;
        if fault == Some(Fault::Reset) {
            n.incarnation.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn set_delay(&self, addr: &str, max: Duration) {
        self.node(addr).state.lock().unwrap().delay_us = max.as_micros() as u64;
    }

    /// Stops a node: its store is dropped, its links break.
    pub fn crash(&self, addr: &str) {
        let n = self.node(addr);
        n.incarnation.fetch_add(1, Ordering::SeqCst);
        n.state.lock().unwrap().handler = None;
    }

    /// Starts a crashed node again from its directory.
    pub fn restart(&self, addr: &str) {
        let n = self.node(addr);
        let handler = SimNode::open(n.dir.clone(), &n.disk);
        n.state.lock().unwrap().handler = Some(handler);
    }
}

impl Transport for SimNet {
    fn connect<'a>(&'a self, addr: &'a str, timeout: Duration) -> BoxFuture<'a, Result<PeerClient, PeerError>> {
        Box::pin(async move {
            let node = self.nodes.lock().unwrap().get(addr).cloned();
            let Some(node) = node else {
                return Err(PeerError::Connect { addr: addr.to_string(), reason: "no such node".into() });
            };
            let (up, fault) = {
                let s = node.state.lock().unwrap();
                (s.handler.is_some(), s.fault)
            };
            match fault {
                Some(Fault::Blackhole) => {
                    // A connect that is never answered.
                    tokio::time::sleep(timeout.min(Duration::from_secs(5))).await;
                    return Err(PeerError::Connect { addr: addr.to_string(), reason: "connection timed out".into() });
                }
                Some(Fault::Reset) => return Err(node.unreachable(addr, true)),
                None if !up => return Err(node.unreachable(addr, true)),
                None => {}
            }
            let link = SimLink {
                addr: addr.to_string(),
                incarnation: node.incarnation.load(Ordering::SeqCst),
                node,
                draws: self.draws.clone(),
                in_flight: AtomicUsize::new(0),
            };
            Ok(PeerClient::over(addr, Box::new(link), timeout, false))
        })
    }
}

struct SimLink {
    addr: String,
    node: Arc<SimNode>,
    incarnation: u64,
    draws: Arc<Draws>,
    in_flight: AtomicUsize,
}

impl SimLink {
    fn broken(&self) -> bool {
        self.node.incarnation.load(Ordering::SeqCst) != self.incarnation
    }
}

impl Link for SimLink {
    fn exchange(
        &self,
        h: RequestHeader,
        payload: Option<Bytes>,
    ) -> BoxFuture<'_, Result<(Status, Vec<u8>), PeerError>> {
        Box::pin(async move {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            let res = self.exchange_inner(h, payload).await;
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            res
        })
    }

    fn is_dead(&self) -> bool {
        self.broken()
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

impl SimLink {
    async fn exchange_inner(&self, h: RequestHeader, payload: Option<Bytes>) -> Result<(Status, Vec<u8>), PeerError> {
        let (handler, fault, delay_us) = {
            let s = self.node.state.lock().unwrap();
            (s.handler.clone(), s.fault, s.delay_us)
        };
        if self.broken() {
            return Err(self.node.unreachable(&self.addr, false));
        }
        match (fault, handler) {
            (Some(Fault::Blackhole), _) => std::future::pending().await,
            (Some(Fault::Reset), _) | (None, None) => Err(self.node.unreachable(&self.addr, false)),
            (None, Some(handler)) => {
                let (status, body) = handler.execute(h, payload.map(|p| p.to_vec()).unwrap_or_default()).await;
                let delay = self.draws.below(delay_us);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_micros(delay)).await;
                }
                // The node crashed or was cut off meanwhile: the reply is lost.
                if self.broken() {
                    return Err(self.node.unreachable(&self.addr, false));
                }
                if self.node.state.lock().unwrap().fault == Some(Fault::Blackhole) {
                    return std::future::pending().await;
                }
                Ok((status, body.to_vec()))
            }
        }
    }
}
