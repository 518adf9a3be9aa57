//! Waking up when the keys under one prefix change (a writer's snapshot
//! requests): a watch with a deadline, so that whoever follows them reads
//! them as soon as they change, and otherwise only every so often (which
//! also bounds what a watch that silently stalls can cost). The shared
//! state most loops follow is in the [`super::ClusterView`] instead.

use super::Cluster;
use crate::Watch;
use std::time::Duration;

/// Follows one prefix's changes for one owner.
pub struct RingWatch {
    cluster: Cluster,
    prefix: String,
    watch: Option<Watch>,
}

impl Cluster {
    /// Follows the keys under `prefix`.
    pub(super) fn prefix_watch(&self, prefix: String) -> RingWatch {
        RingWatch { cluster: self.clone(), prefix, watch: None }
    }
}

impl RingWatch {
    /// Waits until the keys may have changed, or `max_wait`. Returns true if
    /// it may have changed: a change was seen, or the watch was (re)started
    /// (changes from before it started are not in it), or it failed.
    pub async fn wait(&mut self, max_wait: Duration) -> bool {
        let Some(w) = self.watch.as_mut() else {
            match self.cluster.store.watch_prefix(&self.prefix, None).await {
                Ok(w) => self.watch = Some(w),
                Err(_) => tokio::time::sleep(max_wait).await,
            }
            return true;
        };
        match tokio::time::timeout(max_wait, w.recv()).await {
            Err(_) => false,
            Ok(Some(Ok(_))) => {
                // Several changes in a row need one read.
                loop {
                    match w.try_recv() {
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => {
                            self.watch = None;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                true
            }
            Ok(Some(Err(_)) | None) => {
                self.watch = None;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cluster::Cluster;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_on_a_ring_change_and_not_otherwise() {
        let c = Cluster::new(Arc::new(crate::MemStore::new()));
        let mut w = c.prefix_watch("ring".into());
        assert!(w.wait(Duration::from_secs(5)).await, "a fresh watch: read the ring");
        assert!(!w.wait(Duration::from_millis(50)).await, "nothing changed");
        c.store().put("rebalance/x", b"{}".to_vec(), None).await.unwrap();
        assert!(!w.wait(Duration::from_millis(50)).await, "other keys do not wake it");
        c.update_ring(|_| Ok(true)).await.unwrap();
        c.update_ring(|_| Ok(true)).await.unwrap();
        assert!(w.wait(Duration::from_secs(5)).await, "a ring change wakes it at once");
        assert!(!w.wait(Duration::from_millis(50)).await, "both changes were taken at once");
    }
}
