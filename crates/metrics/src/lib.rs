//! torus-metrics: what every Torus process exports for Prometheus.
//!
//! - [`ops`]: requests, bytes, errors and a latency histogram per op, with
//!   the labels a process chooses (`{op}` on a node, `{volume, op}` in a
//!   client such as torusblk).
//! - [`process`]: the process's resident memory, CPU time, open files and
//!   threads, read from /proc when scraped.
//! - [`http`]: a small read-only HTTP endpoint (`/metrics`, `/healthz`, and
//!   whatever else its owner answers).
//!
//! Metrics are kept with `prometheus-client` and exposed in the OpenMetrics
//! text format, which Prometheus scrapes. Names follow
//! `torus_<subsystem>_<name>_<unit>`; no label has per-extent values.

pub mod http;
pub mod ops;
pub mod process;

pub use prometheus_client;
use prometheus_client::registry::Registry;

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry's metrics in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "could not encode the metrics");
    }
    out
}
