//! The node's registration in the metadata store: `peers/<uuid>` on a lease,
//! refreshed (with current usage) by heartbeats.
//!
//! A small state machine: `Granting` a lease -> `Registered` (heartbeat every
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
    Registered(LeaseId),
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
            let step = match state {
                State::Granting => match self.cluster.store().grant_lease(self.ttl).await {
                    Ok(lease) => match self.cluster.register_peer(&self.current(), lease.id).await {
                        Ok(()) => {
                            // Conservative: the grant was sent before the registration that just succeeded.
                            self.liveness.confirmed(sent, self.ttl);
                            tracing::info!(node = %self.info.id, address = %self.info.address, "registered in the metadata store");
                            Ok(State::Registered(lease.id))
                        }
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                },
                State::Registered(lease) => {
                    tokio::time::sleep(self.ttl / 3).await;
                    let sent = std::time::Instant::now();
                    match self.cluster.store().keep_alive(lease).await {
                        Ok(_) => match self.cluster.register_peer(&self.current(), lease).await {
                            Ok(()) => {
                                self.liveness.confirmed(sent, self.ttl);
                                Ok(State::Registered(lease))
                            }
                            Err(e) => Err(e.to_string()),
                        },
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
