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
        let _ = writeln!(out, "# HELP torus_store_used_bytes Bytes of data stored.\n# TYPE torus_store_used_bytes gauge\ntorus_store_used_bytes {used}");
        let _ = writeln!(out, "# HELP torus_store_capacity_bytes Bytes offered.\n# TYPE torus_store_capacity_bytes gauge\ntorus_store_capacity_bytes {capacity}");
        out
    }
}
