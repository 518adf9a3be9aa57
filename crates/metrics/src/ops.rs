//! Requests, bytes, errors and latency per op.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

/// Latency buckets: 25 µs to about 13 s, doubling.
fn buckets() -> Histogram {
    Histogram::new(exponential_buckets(25e-6, 2.0, 20))
}

/// One set of op figures, labelled by `L`.
pub struct OpStats<L: Clone + Debug + Hash + Eq + EncodeLabelSet + Send + Sync + 'static> {
    requests: Family<L, Counter>,
    bytes: Family<L, Counter>,
    errors: Family<L, Counter>,
    seconds: Family<L, Histogram>,
}

impl<L: Clone + Debug + Hash + Eq + EncodeLabelSet + Send + Sync + 'static> OpStats<L> {
    /// Registers `<prefix>_requests_total`, `<prefix>_bytes_total`,
    /// `<prefix>_errors_total` and `<prefix>_request_seconds` (a histogram);
    /// `what` says what a request is, for the help texts.
    pub fn register(registry: &mut Registry, prefix: &str, what: &str) -> Self {
        let stats = Self::new();
        stats.register_in(registry, prefix, what);
        stats
    }

    /// Figures not yet in any registry.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        OpStats {
            requests: Family::default(),
            bytes: Family::default(),
            errors: Family::default(),
            seconds: Family::new_with_constructor(buckets as fn() -> Histogram),
        }
    }

    /// Exports these figures (the same series) in one more registry.
    pub fn register_in(&self, registry: &mut Registry, prefix: &str, what: &str) {
        registry.register(format!("{prefix}_requests"), format!("{what} completed, by op"), self.requests.clone());
        registry.register(format!("{prefix}_bytes"), format!("Bytes moved by {what}, by op"), self.bytes.clone());
        registry.register(format!("{prefix}_errors"), format!("{what} that failed, by op"), self.errors.clone());
        registry.register(
            format!("{prefix}_request_seconds"),
            format!("Time from receiving to answering one of the {what}, by op"),
            self.seconds.clone(),
        );
    }

    /// The series of one label set, to record into without looking them up
    /// again (a request's hot path touches no map).
    pub fn handles(&self, labels: &L) -> OpHandles {
        OpHandles {
            requests: self.requests.get_or_create(labels).clone(),
            bytes: self.bytes.get_or_create(labels).clone(),
            errors: self.errors.get_or_create(labels).clone(),
            seconds: self.seconds.get_or_create(labels).clone(),
        }
    }
}

/// The series of one label set of an [`OpStats`].
#[derive(Clone)]
pub struct OpHandles {
    requests: Counter,
    bytes: Counter,
    errors: Counter,
    seconds: Histogram,
}

impl OpHandles {
    /// Requests and bytes counted so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.requests.get(), self.bytes.get())
    }

    /// Records one request: its bytes, how long it took, whether it failed.
    pub fn record(&self, bytes: u64, took: Duration, ok: bool) {
        self.requests.inc();
        if bytes > 0 {
            self.bytes.inc_by(bytes);
        }
        if !ok {
            self.errors.inc();
        }
        self.seconds.observe(took.as_secs_f64());
    }
}
