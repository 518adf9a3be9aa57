//! The writer's lease as the data path sees it, and the lock held on it
//! ([`LockGuard`]: dropping it revokes the lease).
//!
//! A lease granted or kept alive by a request sent at `t` is valid until at
//! least `t + TTL` (etcd cannot expire it sooner), so writes go ahead until
//! then, less a safety margin. Past that, because etcd did not answer, writes
//! are held, not failed: they resume as soon as a keep-alive succeeds again
//! (etcd back, lease still ours), and fail with `LeaseLost` once the hold
//! time has passed or etcd says the lease is gone. A lost lease is never
//! regained: a newer writer may exist.

use crate::VolumeError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use torus_meta::cluster::Cluster;
use torus_meta::LeaseId;

/// Margin kept from the lease's earliest possible expiry (clock drift, scheduling).
const MARGIN: Duration = Duration::from_secs(1);

pub struct LeaseState {
    base: Instant,
    lost: AtomicBool,
    /// Milliseconds after `base` until which the lease is provably ours.
    valid_until_ms: AtomicU64,
    hold: Duration,
}

impl LeaseState {
    /// A lease granted by a request sent at `sent`.
    pub fn new(sent: Instant, ttl: Duration, hold: Duration) -> Self {
        let s = LeaseState { base: sent, lost: AtomicBool::new(false), valid_until_ms: AtomicU64::new(0), hold };
        s.confirmed(sent, ttl);
        s
    }

    /// For read-only opens: there is no lease, and writes are refused before it matters.
    pub fn none() -> Self {
        LeaseState {
            base: Instant::now(),
            lost: AtomicBool::new(true),
            valid_until_ms: AtomicU64::new(0),
            hold: Duration::ZERO,
        }
    }

    /// A keep-alive sent at `sent` succeeded.
    pub fn confirmed(&self, sent: Instant, ttl: Duration) {
        let until = (sent + ttl.saturating_sub(MARGIN)).saturating_duration_since(self.base).as_millis() as u64;
        self.valid_until_ms.fetch_max(until, Ordering::SeqCst);
    }

    pub fn lose(&self) {
        self.lost.store(true, Ordering::SeqCst);
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    pub fn hold(&self) -> Duration {
        self.hold
    }

    fn valid_now(&self) -> bool {
        (self.base.elapsed().as_millis() as u64) < self.valid_until_ms.load(Ordering::SeqCst)
    }

    /// Returns once the lease is provably valid; holds the caller while etcd
    /// cannot confirm it, up to the hold time.
    pub async fn wait_valid(&self) -> Result<(), VolumeError> {
        let start = Instant::now();
        let mut warned = false;
        loop {
            if self.is_lost() {
                return Err(VolumeError::LeaseLost);
            }
            if self.valid_now() {
                if warned {
                    tracing::info!(
                        held_ms = start.elapsed().as_millis() as u64,
                        "lease confirmed again; writes resume"
                    );
                }
                return Ok(());
            }
            if start.elapsed() >= self.hold {
                tracing::error!(
                    hold_secs = self.hold.as_secs(),
                    "lease unconfirmed past the hold time; refusing writes for good"
                );
                self.lose();
                return Err(VolumeError::LeaseLost);
            }
            if !warned {
                tracing::warn!("lease not confirmed (metadata store unreachable?): holding writes");
                warned = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Clean-close tasks still running (a volume's last handle was dropped):
/// `close_all` waits for them, so that a stopping process still releases its locks.
pub(crate) type Closing = std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>;

/// Holds the writer's lock: dropping it stops the keep-alive and revokes the lease.
pub(crate) struct LockGuard {
    cluster: Cluster,
    pub(crate) lease: LeaseId,
    keeper: tokio::task::JoinHandle<()>,
    pub(crate) closing: Closing,
    released: std::sync::atomic::AtomicBool,
}

impl LockGuard {
    /// The lock held on `lease`, kept alive by `keeper` (stopped when released).
    pub(crate) fn new(cluster: Cluster, lease: LeaseId, keeper: tokio::task::JoinHandle<()>, closing: Closing) -> Self {
        LockGuard { cluster, lease, keeper, closing, released: Default::default() }
    }

    /// Revokes the lease now (the lock goes with it).
    pub(crate) async fn release(&self) {
        self.keeper.abort();
        if self.released.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.cluster.store().revoke_lease(self.lease).await {
            tracing::warn!(error = %e, "could not release the volume lock; it lapses with its lease");
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.keeper.abort();
        if self.released.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let (cluster, lease) = (self.cluster.clone(), self.lease);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = cluster.store().revoke_lease(lease).await {
                    tracing::warn!(error = %e, "could not release the volume lock; it lapses with its lease");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_then_resumes_or_gives_up() {
        let s = LeaseState::new(Instant::now(), Duration::from_millis(1300), Duration::from_millis(600));
        s.wait_valid().await.expect("valid right after grant");
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Unconfirmed: held; a confirmation while held releases it.
        let confirm = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            s.confirmed(Instant::now(), Duration::from_millis(1300));
        };
        let (r, ()) = tokio::join!(s.wait_valid(), confirm);
        r.expect("resumed after confirmation");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(matches!(s.wait_valid().await, Err(VolumeError::LeaseLost)), "gives up after the hold");
        s.confirmed(Instant::now(), Duration::from_secs(10));
        assert!(s.wait_valid().await.is_err(), "a lost lease is never regained");
    }
}
