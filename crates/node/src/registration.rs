//! The node's registration in the metadata store: `peers/<uuid>` on a lease,
//! kept alive by keep-alives alone; the record itself is written again only
//! when what it says changed enough to matter (usage: see [`worth_writing`]),
//! so an idle node costs etcd one small request every TTL/3 and its
//! followers nothing.
//!
//! A small state machine: `Granting` a lease -> `Registered` (keep-alive every
//! TTL/3) -> back to `Granting` when the lease is lost; while the store is
//! unreachable it retries every second and logs each transition once.

use std::sync::Arc;
use std::time::Duration;
use torus_meta::cluster::{Cluster, PeerInfo};
use torus_meta::{LeaseId, MetaError};
use torus_store::Store;

pub struct Registration {
    pub liveness: Arc<crate::liveness::Liveness>,
    pub cluster: Cluster,
    pub info: PeerInfo,
    pub store: Arc<Store>,
    pub ttl: Duration,
}

enum State {
    Granting,
    /// On this lease, with this record written.
    Registered(LeaseId, PeerInfo),
}

/// Usage is written again once it moved by this much (or by 1% of the
/// capacity, if more), or at all after [`USAGE_QUIET`].
const USAGE_STEP: u64 = 64 << 20;
/// The longest a changed usage waits to be written.
const USAGE_QUIET: u64 = 60;

/// Whether `now` differs from the record `written` enough to write it again.
fn worth_writing(written: &PeerInfo, now: &PeerInfo) -> bool {
    let step = USAGE_STEP.max(now.capacity / 100);
    let same_but_usage = PeerInfo { used: now.used, last_seen: now.last_seen, ..written.clone() } == *now;
    !same_but_usage
        || written.used.abs_diff(now.used) >= step
        || (written.used != now.used && now.last_seen.saturating_sub(written.last_seen) >= USAGE_QUIET)
}

impl Registration {
    fn current(&self) -> PeerInfo {
        PeerInfo { used: self.store.used(), last_seen: torus_types::unix_now(), ..self.info.clone() }
    }

    /// Runs forever (until the task is dropped).
    pub async fn run(self) {
        let mut state = State::Granting;
        let mut unreachable = false;
        loop {
            let sent = std::time::Instant::now();
            let step = match &state {
                State::Granting => match self.cluster.store().grant_lease(self.ttl).await {
                    Ok(lease) => {
                        let record = self.current();
                        match self.cluster.register_peer(&record, lease.id).await {
                            Ok(()) => {
                                // Conservative: the grant was sent before the registration that just succeeded.
                                self.liveness.confirmed(sent, self.ttl);
                                tracing::info!(node = %self.info.id, address = %self.info.address, "registered in the metadata store");
                                Ok(State::Registered(lease.id, record))
                            }
                            Err(e) => Err(e.to_string()),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                },
                State::Registered(lease, written) => {
                    let lease = *lease;
                    tokio::time::sleep(self.ttl / 3).await;
                    let sent = std::time::Instant::now();
                    match self.cluster.store().keep_alive(lease).await {
                        Ok(_) => {
                            self.liveness.confirmed(sent, self.ttl);
                            let now = self.current();
                            if worth_writing(written, &now) {
                                match self.cluster.register_peer(&now, lease).await {
                                    Ok(()) => Ok(State::Registered(lease, now)),
                                    Err(e) => Err(e.to_string()),
                                }
                            } else {
                                Ok(State::Registered(lease, written.clone()))
                            }
                        }
                        Err(MetaError::LeaseNotFound { .. }) => {
                            tracing::warn!("registration lease expired; registering again");
                            Ok(State::Granting)
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
            };
            match step {
                Ok(next) => {
                    if unreachable {
                        tracing::info!("metadata store reachable again");
                        unreachable = false;
                    }
                    state = next;
                }
                Err(reason) => {
                    if !unreachable {
                        tracing::warn!(%reason, "heartbeat failed; retrying");
                        unreachable = true;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_that_matter_are_written() {
        let gib = 1 << 30;
        let written = PeerInfo {
            used: gib,
            last_seen: 1000,
            ..PeerInfo::bare(torus_types::NodeId::random(), "10.0.0.1:4000", 100 * gib, "test")
        };
        let at = |used: u64, secs: u64| PeerInfo { used, last_seen: 1000 + secs, ..written.clone() };
        assert!(!worth_writing(&written, &at(gib, 3600)), "idle: nothing to write, however long");
        assert!(!worth_writing(&written, &at(gib + (1 << 20), 10)), "a small change waits");
        assert!(worth_writing(&written, &at(gib + (1 << 20), USAGE_QUIET)), "but not for ever");
        assert!(worth_writing(&written, &at(2 * gib, 1)), "1% of the capacity is written at once");
        let moved = PeerInfo { address: "10.0.0.9:4000".into(), ..written.clone() };
        assert!(worth_writing(&written, &moved), "any other change is written at once");
    }
}
