//! Whether this node may accept writes: only while its own registration lease
//! is provably alive. A node cut off from etcd for longer than its lease may
//! already have been declared gone, and a new writer may have announced its
//! epoch only to the nodes it could reach; so past that point the node refuses
//! writes (ISOLATED, which clients retry) until a keep-alive succeeds again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Liveness {
    base: Instant,
    valid_until_ms: AtomicU64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness { base: Instant::now(), valid_until_ms: AtomicU64::new(0) }
    }
}

impl Liveness {
    /// A grant or keep-alive sent at `sent` succeeded for a lease of `ttl`.
    pub fn confirmed(&self, sent: Instant, ttl: Duration) {
        let until = (sent + ttl).saturating_duration_since(self.base).as_millis() as u64;
        self.valid_until_ms.fetch_max(until, Ordering::SeqCst);
    }

    /// How long the lease is known to last from now (zero: isolated).
    pub fn time_left(&self) -> Duration {
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(self.valid_until_ms.load(Ordering::SeqCst).saturating_sub(now))
    }

    pub fn is_isolated(&self) -> bool {
        (self.base.elapsed().as_millis() as u64) >= self.valid_until_ms.load(Ordering::SeqCst)
    }
}
