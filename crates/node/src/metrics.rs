//! The node's counters, rendered in the Prometheus text exposition format.
//! Names follow `torus_<subsystem>_<name>_<unit>`; no per-extent labels.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct NodeMetrics {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub zeroes: AtomicU64,
    pub flushes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub checksum_errors: AtomicU64,
    pub fenced_writes: AtomicU64,
    pub errors: AtomicU64,
    pub repaired_blocks: AtomicU64,
    pub scrubbed_blocks: AtomicU64,
    pub rebalance_extents_total: AtomicU64,
    pub rebalance_extents_done: AtomicU64,
    pub rebalance_bytes: AtomicU64,
    /// 1 while the ring marks this node full.
    pub full: AtomicU64,
}

impl NodeMetrics {
    pub fn inc(c: &AtomicU64, by: u64) {
        c.fetch_add(by, Ordering::Relaxed);
    }

    pub fn render(&self, used: u64, capacity: u64) -> String {
        let mut out = String::new();
        let mut put = |kind: &str, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        put("counter", "torus_node_reads_total", "Read requests served.", load(&self.reads));
        put("counter", "torus_node_writes_total", "Write requests served.", load(&self.writes));
        put("counter", "torus_node_zero_total", "Trim and write-zeroes requests served.", load(&self.zeroes));
        put("counter", "torus_node_flushes_total", "Flush requests served.", load(&self.flushes));
        put("counter", "torus_node_read_bytes_total", "Bytes read.", load(&self.read_bytes));
        put("counter", "torus_node_written_bytes_total", "Bytes written.", load(&self.written_bytes));
        put(
            "counter",
            "torus_store_checksum_errors_total",
            "Blocks whose data did not match its checksum on read.",
            load(&self.checksum_errors),
        );
        put(
            "counter",
            "torus_node_fenced_writes_total",
            "Writes refused for carrying a stale epoch.",
            load(&self.fenced_writes),
        );
        put("counter", "torus_node_errors_total", "Requests that failed.", load(&self.errors));
        put(
            "counter",
            "torus_store_repaired_blocks_total",
            "Corrupt blocks replaced with a replica's copy.",
            load(&self.repaired_blocks),
        );
        put(
            "counter",
            "torus_scrub_verified_blocks_total",
            "Blocks the scrubber read and verified.",
            load(&self.scrubbed_blocks),
        );
        put(
            "counter",
            "torus_rebalance_copied_bytes_total",
            "Bytes this node copied to new replicas.",
            load(&self.rebalance_bytes),
        );
        put(
            "gauge",
            "torus_rebalance_extents_total",
            "Extents this node must copy in the current rebalance.",
            load(&self.rebalance_extents_total),
        );
        put(
            "gauge",
            "torus_rebalance_extents_done",
            "Extents this node has copied in the current rebalance.",
            load(&self.rebalance_extents_done),
        );
        put(
            "gauge",
            "torus_node_full",
            "1 while the ring marks this node full (it takes no new extents).",
            load(&self.full),
        );
        put("gauge", "torus_store_used_bytes", "Bytes of data stored.", used);
        put("gauge", "torus_store_capacity_bytes", "Bytes offered.", capacity);
        out
    }
}
