//! The node's metrics: counters of what it served and did, gauges of its
//! store and rebalance, a latency histogram per request op, and the
//! process's own figures; exposed in the OpenMetrics text format
//! (`torus-metrics`). Names follow `torus_<subsystem>_<name>_<unit>`; no
//! per-extent labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use torus_metrics::ops::{OpHandles, OpStats};
use torus_metrics::process::ProcessStats;
use torus_proto::Op;

/// The label of a node request's figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeOp {
    pub op: &'static str,
}

/// Every op, in the order of `NodeMetrics::by_op`.
const OPS: [Op; 13] = [
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Zero,
    Op::Fence,
    Op::DeleteVolume,
    Op::ListExtents,
    Op::Ping,
    Op::Fill,
    Op::BlockSums,
    Op::DeleteExtent,
    Op::Repair,
    Op::Holds,
];

impl NodeOp {
    pub fn of(op: Op) -> NodeOp {
        let op = match op {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Zero => "zero",
            Op::Fence => "fence",
            Op::DeleteVolume => "delete_volume",
            Op::ListExtents => "list_extents",
            Op::Ping => "ping",
            Op::Fill => "fill",
            Op::BlockSums => "block_sums",
            Op::DeleteExtent => "delete_extent",
            Op::Repair => "repair",
            Op::Holds => "holds",
        };
        NodeOp { op }
    }
}

pub struct NodeMetrics {
    registry: Registry,
    /// Request figures by op (`OPS` order), looked up once.
    by_op: [OpHandles; 13],
    process: ProcessStats,
    pub reads: Counter,
    pub writes: Counter,
    pub zeroes: Counter,
    pub flushes: Counter,
    pub read_bytes: Counter,
    pub written_bytes: Counter,
    pub checksum_errors: Counter,
    pub fenced_writes: Counter,
    pub repaired_blocks: Counter,
    pub scrubbed_blocks: Counter,
    pub rebalance_extents_total: Gauge,
    pub rebalance_extents_done: Gauge,
    pub rebalance_bytes: Counter,
    /// 1 while the ring marks this node full.
    pub full: Gauge,
    /// Peer connections open now (clients and other nodes).
    pub connections: Gauge,
    /// Requests received and not yet answered.
    pub in_flight: Gauge,
    lease_valid: Gauge,
    lease_left: Gauge<f64, std::sync::atomic::AtomicU64>,
    used: Gauge,
    capacity: Gauge,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new_with(|_| {})
    }
}

impl NodeMetrics {
    /// The node's figures, and whatever `more` registers (the repairer's, from the volume layer).
    pub fn new_with(more: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::default();
        more(&mut registry);
        let ops: OpStats<NodeOp> = OpStats::register(&mut registry, "torus_node", "peer requests");
        let by_op = OPS.map(|op| ops.handles(&NodeOp::of(op)));
        let process = ProcessStats::register(&mut registry);
        torus_meta::register_etcd_metrics(&mut registry);
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let r = &mut registry;
        NodeMetrics {
            reads: counter(r, "torus_node_reads", "Read requests served"),
            writes: counter(r, "torus_node_writes", "Write requests served"),
            zeroes: counter(r, "torus_node_zero", "Trim and write-zeroes requests served"),
            flushes: counter(r, "torus_node_flushes", "Flush requests served"),
            read_bytes: counter(r, "torus_node_read_bytes", "Bytes read"),
            written_bytes: counter(r, "torus_node_written_bytes", "Bytes written"),
            checksum_errors: counter(
                r,
                "torus_store_checksum_errors",
                "Blocks whose data did not match its checksum on read",
            ),
            fenced_writes: counter(r, "torus_node_fenced_writes", "Writes refused for carrying a stale epoch"),
            repaired_blocks: counter(r, "torus_store_repaired_blocks", "Corrupt blocks replaced with a replica's copy"),
            scrubbed_blocks: counter(r, "torus_scrub_verified_blocks", "Blocks the scrubber read and verified"),
            rebalance_bytes: counter(r, "torus_rebalance_copied_bytes", "Bytes this node copied to new replicas"),
            rebalance_extents_total: gauge(
                r,
                "torus_rebalance_extents_planned",
                "Extents this node must copy in the current rebalance",
            ),
            rebalance_extents_done: gauge(
                r,
                "torus_rebalance_extents_done",
                "Extents this node has copied in the current rebalance",
            ),
            full: gauge(r, "torus_node_full", "1 while the ring marks this node full (it takes no new extents)"),
            connections: gauge(r, "torus_node_peer_connections", "Peer connections open now (clients and nodes)"),
            in_flight: gauge(r, "torus_node_requests_in_flight", "Peer requests received and not yet answered"),
            lease_valid: gauge(
                r,
                "torus_node_lease_valid",
                "1 while this node's registration lease is provably alive (it accepts writes)",
            ),
            lease_left: {
                let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
                r.register(
                    "torus_node_lease_remaining_seconds",
                    "How long this node's lease is known to last without another keep-alive",
                    g.clone(),
                );
                g
            },
            used: gauge(r, "torus_store_used_bytes", "Bytes of data stored"),
            capacity: gauge(r, "torus_store_capacity_bytes", "Bytes offered"),
            by_op,
            process,
            registry,
        }
    }

    pub fn inc(c: &Counter, by: u64) {
        c.inc_by(by);
    }

    /// The figures of requests of `op`.
    pub fn op(&self, op: Op) -> &OpHandles {
        let i = OPS.iter().position(|o| *o == op).unwrap_or(0);
        &self.by_op[i]
    }

    /// Everything, in the OpenMetrics text format (`torus_metrics::CONTENT_TYPE`).
    pub fn render(&self, used: u64, capacity: u64, lease_left: std::time::Duration) -> String {
        self.lease_valid.set(i64::from(!lease_left.is_zero()));
        self.lease_left.set(lease_left.as_secs_f64());
        self.used.set(used.min(i64::MAX as u64) as i64);
        self.capacity.set(capacity.min(i64::MAX as u64) as i64);
        self.process.refresh();
        torus_metrics::encode(&self.registry)
    }
}
