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
}

impl NodeMetrics {
    pub fn inc(c: &AtomicU64, by: u64) {
        c.fetch_add(by, Ordering::Relaxed);
    }

    pub fn render(&self, used: u64, capacity: u64) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        };
        counter("torus_node_reads_total", "Read requests served.", &self.reads);
        counter("torus_node_writes_total", "Write requests served.", &self.writes);
        counter("torus_node_zero_total", "Trim and write-zeroes requests served.", &self.zeroes);
        counter("torus_node_flushes_total", "Flush requests served.", &self.flushes);
        counter("torus_node_read_bytes_total", "Bytes read.", &self.read_bytes);
        counter("torus_node_written_bytes_total", "Bytes written.", &self.written_bytes);
        counter(
            "torus_store_checksum_errors_total",
            "Blocks whose data did not match its checksum on read.",
            &self.checksum_errors,
        );
        counter("torus_node_fenced_writes_total", "Writes refused for carrying a stale epoch.", &self.fenced_writes);
        counter("torus_node_errors_total", "Requests that failed.", &self.errors);
        counter(
            "torus_store_repaired_blocks_total",
            "Corrupt blocks replaced with a replica's copy.",
            &self.repaired_blocks,
        );
        counter("torus_scrub_verified_blocks_total", "Blocks the scrubber read and verified.", &self.scrubbed_blocks);
        counter("torus_rebalance_copied_bytes_total", "Bytes this node copied to new replicas.", &self.rebalance_bytes);
        let mut gauge = |name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", v.load(Ordering::Relaxed));
        };
        gauge(
            "torus_rebalance_extents_total",
            "Extents this node must copy in the current rebalance.",
            &self.rebalance_extents_total,
        );
        gauge(
            "torus_rebalance_extents_done",
            "Extents this node has copied in the current rebalance.",
            &self.rebalance_extents_done,
        );
        let _ = writeln!(out, "# HELP torus_store_used_bytes Bytes of data stored.\n# TYPE torus_store_used_bytes gauge\ntorus_store_used_bytes {used}");
        let _ = writeln!(out, "# HELP torus_store_capacity_bytes Bytes offered.\n# TYPE torus_store_capacity_bytes gauge\ntorus_store_capacity_bytes {capacity}");
        out
    }
}
