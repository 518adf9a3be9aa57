//! Serving the CSI services on a unix socket, and keeping this host
//! registered in the metadata (node mode) so ControllerPublishVolume knows
//! it is alive.

use crate::controller::ControllerService;
use crate::identity::IdentityService;
use crate::node::NodeService;
use crate::pb::{controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use torus_attach::Attacher;
use torus_meta::cluster::{Cluster, HostInfo};
use torus_meta::MetaError;

/// Which services a process serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Controller,
    Node,
    All,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("serving CSI on {socket}: {source}")]
    Transport { socket: String, source: tonic::transport::Error },
}

impl Mode {
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }
    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

pub struct Options<A: Attacher> {
    /// Where every call is counted (`torus_csi_*`).
    pub metrics: Arc<crate::metrics::CsiMetrics>,
    pub socket: PathBuf,
    pub mode: Mode,
    pub node_id: String,
    pub labels: BTreeMap<String, String>,
    pub state_dir: PathBuf,
    pub attacher: Arc<A>,
    /// TTL of this host's registration.
    pub lease_ttl: Duration,
    /// The cluster key (`--key-file`): encrypted volumes are created with it.
    pub key: Option<Arc<torus_volume::crypt::ClusterKey>>,
}

/// Binds the socket (replacing a stale one), serves until `shutdown` resolves.
pub async fn serve<A: Attacher>(
    cluster: Cluster,
    opts: Options<A>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let listener = bind(&opts.socket)?;
    let registration = if opts.mode.node() {
        let host = HostInfo {
            id: opts.node_id.clone(),
            labels: opts.labels.clone(),
            registered: torus_types::unix_now(),
            lease_ttl: opts.lease_ttl.as_secs(),
        };
        let (registered, first) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(keep_registered(cluster.clone(), host, opts.lease_ttl, registered));
        // ControllerPublishVolume to this host needs its registration: have it
        // before serving, if etcd answers soon (else serve anyway; it retries).
        if tokio::time::timeout(Duration::from_secs(10), first).await.is_err() {
            tracing::warn!("serving before this host could register; publishes to it fail until it does");
        }
        Some(task)
    } else {
        None
    };
    let identity =
        IdentityServer::new(IdentityService { cluster: cluster.clone(), controller: opts.mode.controller() });
    let mut router = tonic::transport::Server::builder().layer(opts.metrics.layer()).add_service(identity);
    if opts.mode.controller() {
        router = router.add_service(ControllerServer::new(ControllerService::new(cluster.clone(), opts.key.clone())));
    }
    if opts.mode.node() {
        router = router.add_service(NodeServer::new(NodeService::new(
            cluster.clone(),
            opts.attacher.clone(),
            opts.node_id.clone(),
            opts.labels.clone(),
            opts.state_dir.clone(),
        )));
    }
    tracing::info!(socket = %opts.socket.display(), mode = ?opts.mode, node = %opts.node_id, "serving CSI");
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let result = router.serve_with_incoming_shutdown(incoming, shutdown).await;
    if let Some(r) = registration {
        r.abort();
    }
    let _ = std::fs::remove_file(&opts.socket);
    result.map_err(|source| ServeError::Transport { socket: opts.socket.display().to_string(), source })
}

fn bind(socket: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|source| ServeError::Io { what: format!("creating {}", dir.display()), source })?;
    }
    // A socket left by a previous run (a crash, an upgrade) is replaced.
    if std::fs::symlink_metadata(socket).is_ok() {
        std::fs::remove_file(socket).map_err(|source| ServeError::Io {
            what: format!("removing the stale socket {}", socket.display()),
            source,
        })?;
    }
    tokio::net::UnixListener::bind(socket)
        .map_err(|source| ServeError::Io { what: format!("listening on {}", socket.display()), source })
}

/// Registers the host on a lease and keeps it alive; a lost lease is replaced.
async fn keep_registered(
    cluster: Cluster,
    host: HostInfo,
    ttl: Duration,
    registered: tokio::sync::oneshot::Sender<()>,
) {
    let mut registered = Some(registered);
    loop {
        let lease = match cluster.store().grant_lease(ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register this host; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = cluster.register_host(&host, lease.id).await {
            tracing::warn!(error = %e, "cannot register this host; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        tracing::info!(host = %host.id, "host registered");
        if let Some(tx) = registered.take() {
            let _ = tx.send(());
        }
        loop {
            tokio::time::sleep(ttl / 3).await;
            match cluster.store().keep_alive(lease.id).await {
                Ok(_) => {}
                Err(MetaError::LeaseNotFound { .. }) => {
                    tracing::warn!(host = %host.id, "registration lease expired; registering again");
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew this host's registration; retrying"),
            }
        }
    }
}
