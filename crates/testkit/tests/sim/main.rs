//! The seeded simulation: a writer (the real `VolumeManager` and `Volume`:
//! tracker, catch-up, resync) against in-memory storage nodes (the real
//! request `Handler` and `Store`, see `net`) and in-memory metadata
//! (`MemStore`), on a paused tokio clock, with no processes and no sockets.
//!
//! Each schedule draws from its seed: the replication (2 or 3 of 4 nodes),
//! then 60 steps, each one of: a few concurrent writes or zeroes of random
//! block ranges, a flush, a read, a node cut off (connections reset, or
//! requests never answered), crashed (store dropped, reopened from disk
//! later), its disk failing (EIO or ENOSPC on data writes, a torn write,
//! a failed fdatasync; healed by a restart on a working disk), healed, or slowed (replies delayed and reordered); in one
//! schedule in four, the fail point `volume::after-mark-missing` makes every
//! write that marks a copy missing fail before its ack. Every block
//! written carries its write's tag, so a read tells which write it returns.
//!
//! What it asserts:
//! - a read returns, for every block, a value it may hold: the last
//!   acknowledged write's, or — after writes that failed — one of those;
//!   never an older one, never a mix within a block;
//! - while no fault is active, every request succeeds;
//! - after every node is healed, every copy is caught up within 60 s
//!   (simulated) — by the writer, or in one schedule in three by the nodes'
//!   repairers (`torus_volume::repair`) after the writer died with nobody
//!   reopening; then every replica of every extent, read straight from
//!   its node's store (checksums verified), agrees with the others and with
//!   what the volume returns;
//! - in one schedule in two, a snapshot taken by the writer from some step on
//!   (under the same faults; refused while a copy misses writes) reads, at the
//!   end, what the volume could have read when it was taken; the volume then
//!   writes through a second layer, and every copy of each layer agrees
//!   (block states too: Absent and Zero differ in a layered volume).
//!
//! `TORUS_SIM_SCHEDULES` sets how many schedules each test runs (default
//! 250: four tests, 1,000 schedules), `TORUS_SIM_SEED` runs the one schedule
//! of that seed (printed when one fails), `TORUS_SIM_LOG` (a tracing filter,
//! e.g. `info`) prints the nodes' and the writer's logs. Replay repeats the same steps and
//! faults; the interleaving of concurrent requests inside a step may differ.

mod net;

use bytes::Bytes;
use futures_util::future::join_all;
use net::{Fault, SimNet};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use torus_meta::cluster::{Cluster, ClusterConfig, PeerInfo};
use torus_meta::{MemStore, MetadataStore};
use torus_node::metrics::NodeMetrics;
use torus_node::rebalance::Rebalancer;
use torus_node::scrub::Scrubber;
use torus_store::io::{Fault as DiskFault, Op, Rule, Target};
use torus_testkit::Rng;
use torus_types::{ExtentId, NodeId};
use torus_volume::repair::Repairer;
use torus_volume::{BlockDevice, ManagerOptions, VolumeManager};

const BLOCK: u64 = 4096;
const EXTENT: u64 = 64 << 10;
const EXTENTS: u64 = 8;
const SIZE: u64 = EXTENT * EXTENTS;
const BLOCKS: usize = (SIZE / BLOCK) as usize;
/// Nodes in the ring at the start; one more is registered, to be added by a ring change.
const MEMBERS: usize = 4;
const NODES: usize = MEMBERS + 1;
const STEPS: usize = 60;

/// A block's contents: its tag in every 8 bytes (tag 0 is zeroes).
fn block_of(tag: u64) -> Vec<u8> {
    tag.to_le_bytes().repeat((BLOCK / 8) as usize)
}

/// The tag a block holds, or `None` if it is not one write's block (torn, mixed, garbage).
fn tag_of(block: &[u8]) -> Option<u64> {
    let first = u64::from_le_bytes(block[..8].try_into().ok()?);
    block.chunks_exact(8).all(|w| w == first.to_le_bytes()).then_some(first)
}

/// What each block may hold.
#[derive(Clone)]
struct Model {
    blocks: Vec<Vec<u64>>,
}

impl Model {
    fn new() -> Self {
        Model { blocks: vec![vec![0]; BLOCKS] }
    }

    fn wrote(&mut self, first: usize, tags: &[u64], ok: bool) {
        for (i, t) in tags.iter().enumerate() {
            let b = &mut self.blocks[first + i];
            if ok {
                *b = vec![*t];
            } else if !b.contains(t) {
                b.push(*t);
            }
        }
    }

    fn check(&self, first: usize, data: &[u8], what: &str) -> Result<(), String> {
        for (i, block) in data.chunks_exact(BLOCK as usize).enumerate() {
            let b = first + i;
            match tag_of(block) {
                Some(t) if self.blocks[b].contains(&t) => {}
                Some(t) => {
                    return Err(format!("{what}: block {b} holds write {t:#x}, may hold only {:x?}", self.blocks[b]))
                }
                None => return Err(format!("{what}: block {b} is not one write's block (torn or mixed)")),
            }
        }
        Ok(())
    }
}

struct Sim {
    net: Arc<SimNet>,
    cluster: Cluster,
    addrs: Vec<String>,
    ids: Vec<NodeId>,
    faults: BTreeMap<usize, &'static str>,
    /// Each running node's rebalancer (the real one, over the simulated network).
    rebalancers: Vec<Option<tokio::task::JoinHandle<()>>>,
}

impl Sim {
    fn start_rebalancer(&mut self, n: usize) {
        let Some(store) = self.net.node(&self.addrs[n]).store() else { return };
        let rebalancer = Rebalancer {
            cluster: self.cluster.clone(),
            store,
            me: self.ids[n],
            rate: 0,
            metrics: Arc::new(NodeMetrics::default()),
            full_ratio: 0.9,
            transport: self.net.clone(),
        };
        self.rebalancers[n] = Some(tokio::spawn(rebalancer.run()));
    }

    fn crash(&mut self, n: usize) {
        self.net.crash(&self.addrs[n]);
        if let Some(task) = self.rebalancers[n].take() {
            task.abort();
        }
    }

    fn restart(&mut self, n: usize) {
        self.net.restart(&self.addrs[n]);
        self.start_rebalancer(n);
    }

    fn heal(&mut self, n: usize) {
        match self.faults.remove(&n) {
            Some("crash") => self.restart(n),
            Some("disk") => {
                // The disk is replaced by a working one holding the same bytes; the node restarts.
                self.net.node(&self.addrs[n]).disk.heal();
                self.crash(n);
                self.restart(n);
            }
            Some(_) => self.net.set_fault(&self.addrs[n], None),
            None => {}
        }
    }
}

/// A failure at `step`, with the steps that led to it.
fn at(step: usize, log: &[String], what: String) -> String {
    format!("step {step}: {what}\n  steps: {}", log.join("; "))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// A simulated cluster: in-memory metadata, `NODES` registered nodes (the
/// first `MEMBERS` in the ring, replication `r`), and a volume "v".
struct Setup {
    _tmp: tempfile::TempDir,
    net: Arc<SimNet>,
    meta: Arc<dyn MetadataStore>,
    cluster: Cluster,
    peers: Vec<PeerInfo>,
    addrs: Vec<String>,
}

async fn setup(seed: u64, r: usize) -> Result<Setup, String> {
    let tmp =
        if std::path::Path::new("/dev/shm").is_dir() { tempfile::tempdir_in("/dev/shm") } else { tempfile::tempdir() }
            .map_err(|e| e.to_string())?;
    let net = SimNet::new(seed);
    let meta: Arc<dyn MetadataStore> = Arc::new(MemStore::new());
    let cluster = Cluster::new(meta.clone());
    let config = ClusterConfig { extent_size: EXTENT, replication: r as u32, format: 1, down_out_secs: 0 };
    cluster.init(&config).await.map_err(|e| e.to_string())?;
    let lease = meta.grant_lease(Duration::from_secs(1 << 30)).await.map_err(|e| e.to_string())?;
    let mut peers = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..NODES {
        let addr = format!("sim-{i}");
        net.add_node(&addr, tmp.path().join(&addr));
        let info = PeerInfo::bare(NodeId(uuid::Uuid::from_u64_pair(seed, i as u64)), &addr, 1 << 30, "sim");
        cluster.register_peer(&info, lease.id).await.map_err(|e| e.to_string())?;
        peers.push(info);
        addrs.push(addr);
    }
    cluster.add_to_ring(&peers[..MEMBERS]).await.map_err(|e| e.to_string())?;
    cluster.create_volume("v", SIZE, None).await.map_err(|e| e.to_string())?;
    Ok(Setup { _tmp: tmp, net, meta, cluster, peers, addrs })
}

/// Runs one schedule; `Err` says what went wrong, at which step.
async fn schedule(seed: u64) -> Result<String, String> {
    let mut rng = Rng(seed);
    let r = 2 + rng.below(2);
    let Setup { _tmp, net, meta, cluster, peers, addrs } = setup(seed, r).await?;
    let opts = ManagerOptions {
        lease_ttl: Duration::from_secs(10),
        request_timeout: Duration::from_secs(1),
        io_hold: Duration::from_secs(5),
        transport: net.clone(),
        ..Default::default()
    };
    let mut manager = Arc::new(VolumeManager::new(cluster.clone(), opts.clone()));
    let mut follower = tokio::spawn(manager.clone().follow_ring());
    let mut vol = manager.open("v", true).await.map_err(|e| e.to_string())?;
    // Some schedules may take every replica of an extent down at once.
    let most_faults = if rng.below(5) == 0 { r } else { r - 1 };
    let mut writers = 1;
    // In one schedule in four, a write that marks a copy missing fails before its ack.
    let fail_after_mark = rng.below(4) == 0;
    if fail_after_mark {
        fail::cfg("volume::after-mark-missing", "return").map_err(|e| e.to_string())?;
    } else {
        fail::remove("volume::after-mark-missing");
    }

    let ids: Vec<NodeId> = peers.iter().map(|p| p.id).collect();
    let mut sim = Sim {
        net: net.clone(),
        cluster: cluster.clone(),
        addrs: addrs.clone(),
        ids: ids.clone(),
        faults: BTreeMap::new(),
        rebalancers: (0..NODES).map(|_| None).collect(),
    };
    for n in 0..NODES {
        sim.start_rebalancer(n);
    }
    // In one schedule in three, the ring changes at some step: the fifth node
    // joins, or a member leaves, and the nodes' rebalancers move data meanwhile.
    let ring_change = (rng.below(3) == 0).then(|| rng.below(STEPS));
    // In one schedule in two, a snapshot is taken from some step on (retried
    // while refused: a copy misses writes); it must read, at the end, what the
    // volume could have read when it was taken.
    let snapshot_from = (rng.below(2) == 0).then(|| rng.below(STEPS));
    let mut snapshot: Option<Model> = None;
    let mut model = Model::new();
    let mut next_tag = seed << 16;
    let mut log = Vec::new();
    let (mut writes, mut failed, mut faults, mut most_missing) = (0, 0, 0, 0);
    for step in 0..STEPS {
        if ring_change == Some(step) {
            let members = cluster.ring().await.map_err(|e| e.to_string())?.0.members.len();
            if members == MEMBERS && rng.below(2) == 0 {
                log.push(format!("node {MEMBERS} joins the ring"));
                cluster.add_to_ring(&peers[MEMBERS..]).await.map_err(|e| at(step, &log, e.to_string()))?;
            } else {
                let n = rng.below(MEMBERS);
                log.push(format!("node {n} leaves the ring"));
                cluster.remove_from_ring(ids[n], false).await.map_err(|e| at(step, &log, e.to_string()))?;
            }
        }
        let faulty = !sim.faults.is_empty();
        if snapshot.is_none() && snapshot_from.is_some_and(|s| step >= s) {
            match vol.take_snapshot("s").await {
                Ok(_) => {
                    log.push("snapshot".into());
                    snapshot = Some(model.clone());
                }
                Err(e) if faulty || !vol.missing().is_empty() || vol.lease_lost() => {
                    log.push(format!("snapshot refused: {e}"));
                }
                Err(e) => return Err(at(step, &log, format!("a snapshot failed with no fault active: {e}"))),
            }
        }
        match rng.below(100) {
            0..=44 => {
                // Concurrent writes (or zeroes) of disjoint ranges.
                let n = 1 + rng.below(3);
                let mut ranges = Vec::new();
                for _ in 0..n {
                    let first = rng.below(BLOCKS);
                    let len = 1 + rng.below(24.min(BLOCKS - first));
                    if ranges.iter().all(|&(f, l, _): &(usize, usize, bool)| first + len <= f || f + l <= first) {
                        ranges.push((first, len, rng.below(8) == 0));
                    }
                }
                // Now and then the writer dies (its lease is revoked) while these writes run.
                let crash = rng.below(12) == 0;
                log.push(format!("write {ranges:?}{}", if crash { " while the writer dies" } else { "" }));
                let ops = ranges.iter().map(|&(first, len, zero)| {
                    let tags: Vec<u64> = if zero {
                        vec![0; len]
                    } else {
                        (0..len as u64).map(|i| next_tag + first as u64 + i + 1).collect()
                    };
                    let vol = vol.clone();
                    async move {
                        let off = first as u64 * BLOCK;
                        let res = if zero {
                            vol.zero(off, len as u64 * BLOCK, false).await
                        } else {
                            let data: Vec<u8> = tags.iter().flat_map(|t| block_of(*t)).collect();
                            vol.write(off, Bytes::from(data), false).await
                        };
                        (first, tags, res)
                    }
                });
                let die = async {
                    if crash {
                        tokio::time::sleep(Duration::from_micros(rng.below(2000) as u64)).await;
                        if let Some(lease) = vol.lease() {
                            let _ = meta.revoke_lease(lease).await;
                        }
                    }
                };
                let (done, ()) = tokio::join!(join_all(ops), die);
                for (first, tags, res) in done {
                    writes += 1;
                    if let Err(e) = &res {
                        failed += 1;
                        if !faulty && !crash {
                            return Err(at(step, &log, format!("a write failed with no fault active: {e}")));
                        }
                    }
                    model.wrote(first, &tags, res.is_ok());
                }
                next_tag += 1 << 8;
                if crash {
                    // The next writer takes over: it resyncs the dead one's write intent.
                    drop(vol);
                    follower.abort();
                    manager = Arc::new(VolumeManager::new(cluster.clone(), opts.clone()));
                    follower = tokio::spawn(manager.clone().follow_ring());
                    vol = match manager.open("v", true).await {
                        Ok(v) => v,
                        // It cannot resync while no whole copy of some extent is reachable:
                        // legitimate under faults. Heal them, and it must open.
                        Err(e) if faulty => {
                            log.push(format!("reopen failed ({e}); heal all"));
                            for n in 0..NODES {
                                sim.heal(n);
                            }
                            manager.open("v", true).await.map_err(|e| at(step, &log, format!("reopen: {e}")))?
                        }
                        Err(e) => return Err(at(step, &log, format!("reopen with no fault active: {e}"))),
                    };
                    writers += 1;
                }
            }
            45..=54 => {
                log.push("flush".into());
                if let Err(e) = vol.flush().await {
                    if !faulty {
                        return Err(at(step, &log, format!("a flush failed with no fault active: {e}")));
                    }
                }
            }
            55..=69 => {
                let first = rng.below(BLOCKS);
                let len = 1 + rng.below(32.min(BLOCKS - first));
                log.push(format!("read {first}+{len}"));
                match vol.read(first as u64 * BLOCK, (len as u64 * BLOCK) as u32).await {
                    Ok(data) => model.check(first, &data, "read").map_err(|e| at(step, &log, e))?,
                    Err(e) if !faulty => {
                        return Err(at(step, &log, format!("a read failed with no fault active: {e}")))
                    }
                    Err(_) => {}
                }
            }
            70..=81 => {
                let n = rng.below(NODES);
                if sim.faults.len() < most_faults && !sim.faults.contains_key(&n) {
                    let kind = ["reset", "blackhole", "crash", "disk"][rng.below(4)];
                    match kind {
                        "reset" => net.set_fault(&addrs[n], Some(Fault::Reset)),
                        "blackhole" => net.set_fault(&addrs[n], Some(Fault::Blackhole)),
                        "crash" => sim.crash(n),
                        _ => {
                            let rule = match rng.below(4) {
                                0 => Rule::always(Op::Write, Target::Data, DiskFault::Eio),
                                1 => Rule::always(Op::Write, Target::Data, DiskFault::NoSpace),
                                2 => Rule::once(Op::Write, Target::Data, DiskFault::Torn),
                                _ => Rule::always(Op::Sync, Target::Any, DiskFault::Eio),
                            };
                            log.push(format!("node {n}'s disk fails: {rule:?}"));
                            net.node(&addrs[n]).disk.fail(rule);
                        }
                    }
                    log.push(format!("{kind} node {n}"));
                    sim.faults.insert(n, kind);
                    faults += 1;
                }
            }
            82..=93 => {
                if let Some(&n) = sim.faults.keys().nth(rng.below(sim.faults.len())) {
                    log.push(format!("heal node {n}"));
                    sim.heal(n);
                }
            }
            _ => {
                let n = rng.below(NODES);
                let max = Duration::from_micros(rng.below(3000) as u64);
                log.push(format!("delay node {n} up to {max:?}"));
                net.set_delay(&addrs[n], max);
            }
        }
        most_missing = most_missing.max(vol.missing().values().map(|s| s.len()).sum::<usize>());
        // Simulated time moves on a little between steps (catch-up runs every second).
        tokio::time::sleep(Duration::from_millis(rng.below(1500) as u64)).await;
    }

    // Heal everything; every copy must be caught up: by the writer, or — in
    // one schedule in three — by the nodes' repairers after the writer died.
    for n in 0..NODES {
        sim.heal(n);
    }
    let healed = tokio::time::Instant::now();
    let by_repair = rng.below(3) == 0;
    if by_repair {
        let id = vol.info().id;
        if let Some(lease) = vol.lease() {
            let _ = meta.revoke_lease(lease).await;
        }
        drop(vol);
        follower.abort();
        drop(manager);
        let repairers: Vec<_> = peers
            .iter()
            .map(|p| {
                let opts = ManagerOptions { holder: format!("repair on {}", p.address), ..opts.clone() };
                let repairer = Repairer::new(cluster.clone(), p.id, opts, Duration::from_secs(2));
                (repairer.manager(), tokio::spawn(repairer.run()))
            })
            .collect();
        loop {
            let state = cluster.replica_state(id).await.map_err(|e| e.to_string())?;
            let clean = state.intent.is_empty() && state.missing.values().all(|m| m.is_empty());
            if clean && cluster.volume_lock(id).await.map_err(|e| e.to_string())?.is_none() {
                break;
            }
            if healed.elapsed() > Duration::from_secs(60) {
                return Err(at(STEPS, &log, format!("the repairers left {state:?} 60 s after every node was healed")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for (m, task) in repairers {
            task.abort();
            m.close_all().await;
        }
        manager = Arc::new(VolumeManager::new(cluster.clone(), opts.clone()));
        follower = tokio::spawn(manager.clone().follow_ring());
        vol = manager.open("v", true).await.map_err(|e| format!("open after the repair: {e}"))?;
    }
    while !vol.missing().is_empty() {
        if healed.elapsed() > Duration::from_secs(60) {
            let what = format!("copies still missing 60 s after every node was healed: {:?}", vol.missing());
            return Err(at(STEPS, &log, what));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    vol.flush().await.map_err(|e| format!("the final flush failed: {e}"))?;
    let whole = vol.read(0, SIZE as u32).await.map_err(|e| format!("the final read failed: {e}"))?;
    model.check(0, &whole, "final read")?;

    // A ring change is over (data moved, old copies deleted) within 60 s of healing.
    let doc = loop {
        let (doc, _) = cluster.ring().await.map_err(|e| e.to_string())?;
        if !doc.moving() && doc.collecting.is_empty() {
            break doc;
        }
        if healed.elapsed() > Duration::from_secs(60) {
            let what = format!("the ring change is not over 60 s after every node was healed: {doc:?}");
            return Err(at(STEPS, &log, what));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let whole = if ring_change.is_some() {
        let after = vol.read(0, SIZE as u32).await.map_err(|e| format!("the read after the move failed: {e}"))?;
        model.check(0, &after, "read after the move")?;
        after
    } else {
        whole
    };

    // The snapshot reads what the volume could have read when it was taken.
    if let Some(snap) = &snapshot {
        let s = manager.open("v@s", false).await.map_err(|e| format!("opening the snapshot: {e}"))?;
        let data = s.read(0, SIZE as u32).await.map_err(|e| format!("reading the snapshot: {e}"))?;
        snap.check(0, &data, "snapshot").map_err(|e| at(STEPS, &log, e))?;
    }

    // Every replica of every layer, read from its node's store, agrees with
    // the others (and, with one layer, with the volume); no other node keeps a copy.
    let ring = doc.placement();
    let chain = vol.chain().await;
    for (k, layer) in chain.iter().enumerate() {
        for e in 0..EXTENTS {
            let extent = ExtentId::new(*layer, e);
            let want = &whole[(e * EXTENT) as usize..((e + 1) * EXTENT) as usize];
            let replicas = ring.replicas(extent, r);
            let mut first: Option<(usize, Vec<u8>, Option<Vec<torus_store::BlockState>>)> = None;
            for (i, id) in ids.iter().enumerate() {
                let store = net.node(&addrs[i]).store().ok_or("a node still down")?;
                if !replicas.contains(id) {
                    if store.holds(extent).map_err(|e| e.to_string())? {
                        return Err(at(
                            STEPS,
                            &log,
                            format!("layer {k} extent {e}: node {i}, no replica, still holds a copy"),
                        ));
                    }
                    continue;
                }
                let mut got = vec![0u8; EXTENT as usize];
                store.read(extent, 0, &mut got).map_err(|err| format!("layer {k} extent {e} on node {i}: {err}"))?;
                let states = store.block_states(extent).map_err(|e| e.to_string())?;
                if chain.len() == 1 && got != want {
                    return Err(at(STEPS, &log, differs(&net, &addrs, extent, i, &got, want)));
                }
                match &first {
                    None => first = Some((i, got, states)),
                    Some((j, other, other_states)) => {
                        // Absent and Zero read alike, but not in a layer above another: compare the states too.
                        let trimmed = |s: &Option<Vec<torus_store::BlockState>>| {
                            let mut v = s.clone().unwrap_or_default();
                            while v.last() == Some(&torus_store::BlockState::Absent) {
                                v.pop();
                            }
                            v
                        };
                        // (The bottom layer was resynced while it was the only one: there
                        // both read as zeroes and may differ, harmlessly.)
                        let above_another = k + 1 < chain.len();
                        if &got != other || (above_another && trimmed(&states) != trimmed(other_states)) {
                            let what = format!(
                                "layer {k} extent {e}: nodes {j} and {i} hold different copies: {}",
                                differs(&net, &addrs, extent, i, &got, other)
                            );
                            return Err(at(STEPS, &log, what));
                        }
                    }
                }
            }
        }
    }
    follower.abort();
    for task in sim.rebalancers.iter_mut().filter_map(Option::take) {
        task.abort();
    }
    manager.close_all().await;
    Ok(format!(
        "R={r}, {} steps{}, {writes} writes ({failed} failed during faults), {faults} faults ({most_faults} allowed \
         at once), {writers} writer(s), up to {most_missing} copies missing at once, all caught up{}{}{}",
        log.len(),
        if fail_after_mark { " (writes fail after marking a copy missing)" } else { "" },
        if by_repair { " by the nodes' repairers (the writer died)" } else { "" },
        if ring_change.is_some() { ", data moved for a ring change" } else { "" },
        if snapshot.is_some() { ", a snapshot read back" } else { "" }
    ))
}

/// Where node `i`'s copy of `extent` (`got`) differs from `want`, with the block's state on every node.
fn differs(net: &SimNet, addrs: &[String], extent: ExtentId, i: usize, got: &[u8], want: &[u8]) -> String {
    let bad = got.chunks(BLOCK as usize).zip(want.chunks(BLOCK as usize)).position(|(a, b)| a != b);
    let tags = bad.map(|b| {
        let at = b * BLOCK as usize..(b + 1) * BLOCK as usize;
        (tag_of(&got[at.clone()]), tag_of(&want[at]))
    });
    let states: Vec<_> = (0..NODES)
        .map(|j| {
            let st = net.node(&addrs[j]).store()?.block_states(extent).ok()??;
            Some(st.get(bad?).copied())
        })
        .collect();
    format!(
        "{extent}: node {i}'s copy differs (block {bad:?}: (holds, should) {tags:x?}; the block's state on each node: {states:?})"
    )
}

/// Runs `count` schedules from seeds derived from `base` (or the one in `TORUS_SIM_SEED`).
fn run_schedules(base: u64) {
    let one = env_u64("TORUS_SIM_SEED");
    if let Ok(filter) = std::env::var("TORUS_SIM_LOG") {
        // Logs of the nodes and the writer, in simulated time order (e.g. TORUS_SIM_LOG=info).
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
    let count = if one.is_some() { 1 } else { env_u64("TORUS_SIM_SCHEDULES").unwrap_or(250) };
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    for i in 0..count {
        let seed = one.unwrap_or_else(|| Rng((base << 32) ^ i).next());
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("a runtime");
        match rt.block_on(schedule(seed)) {
            Ok(summary) if one.is_some() => eprintln!("seed {seed}: {summary}"),
            Ok(_) => {}
            Err(e) => {
                eprintln!("seed {seed} FAILED: {e}\n  replay: TORUS_SIM_SEED={seed} cargo nextest run -p torus-testkit --test sim");
                failures.push(seed);
            }
        }
    }
    eprintln!("{count} schedules in {:.1} s, {} failed", started.elapsed().as_secs_f64(), failures.len());
    assert!(failures.is_empty(), "schedules failed: seeds {failures:?}");
}

/// The scrubber (the real one, over the simulated network) finds a block
/// whose bytes rotted on one node and repairs it from another replica.
#[test]
fn the_scrubber_repairs_a_rotten_block_from_another_replica() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("a runtime");
    rt.block_on(async {
        let Setup { _tmp, net, cluster, peers, addrs, .. } = setup(7, 2).await.expect("a simulated cluster");
        let opts = ManagerOptions { transport: net.clone(), ..Default::default() };
        let manager = VolumeManager::new(cluster.clone(), opts);
        let vol = manager.open("v", true).await.expect("open");
        let data: Vec<u8> = (0..EXTENT).map(|i| (i % 251) as u8).collect();
        vol.write(0, Bytes::from(data.clone()), false).await.expect("write");
        vol.flush().await.expect("flush");
        let extent = ExtentId::new(vol.info().id, 0);
        drop(vol);
        manager.close_all().await;

        let (doc, _) = cluster.ring().await.expect("ring");
        let victim = doc.placement().replicas(extent, 2)[0];
        let n = peers.iter().position(|p| p.id == victim).expect("a node");
        let node = net.node(&addrs[n]);
        let (dat, base) = torus_store::data_file(&node.dir.join(format!("extents/{}", extent.volume.0)), 0);
        let f = std::fs::OpenOptions::new().write(true).open(&dat).expect("the extent's data file");
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xffu8; 100], base + 5 * BLOCK + 10).expect("rot a block");
        let store = node.store().expect("the node runs");
        let mut got = vec![0u8; EXTENT as usize];
        assert!(store.read(extent, 0, &mut got).is_err(), "the rotten block fails its checksum");

        let scrubber = Scrubber {
            cluster: cluster.clone(),
            store: store.clone(),
            me: victim,
            rate: 1 << 30,
            interval: Duration::from_secs(1),
            metrics: Arc::new(NodeMetrics::default()),
            transport: net.clone(),
        };
        let (blocks, bad) = scrubber.pass().await.expect("a scrub pass");
        assert_eq!((blocks, bad), (EXTENT / BLOCK - 1, 1), "every other block verified, one bad");
        store.read(extent, 0, &mut got).expect("repaired: every block reads");
        assert_eq!(got, data);
        assert_eq!(scrubber.pass().await.expect("a second pass"), (EXTENT / BLOCK, 0));
    });
}

#[test]
fn schedules_a() {
    run_schedules(0xa);
}

#[test]
fn schedules_b() {
    run_schedules(0xb);
}

#[test]
fn schedules_c() {
    run_schedules(0xc);
}

#[test]
fn schedules_d() {
    run_schedules(0xd);
}
