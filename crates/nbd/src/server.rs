//! The NBD listener: accepts connections, runs the handshake, then the
//! transmission phase. Which exports exist, and what opening one means, is
//! the [`Exports`] implementation's business.

use crate::handshake::{negotiate, HandshakeError};
use crate::transmission;
use std::future::Future;
use std::sync::Arc;
use thiserror::Error;
use tokio::net::TcpListener;
use torus_volume::BlockDevice;

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("{0}")]
    NotFound(String),
    /// Held by another writer.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Clone, Copy, Debug)]
pub struct ExportInfo {
    pub size: u64,
    pub read_only: bool,
}

/// The set of exports a server offers.
pub trait Exports: Send + Sync + 'static {
    type Device: BlockDevice;
    fn list(&self) -> impl Future<Output = Result<Vec<String>, ExportError>> + Send;
    /// Describes an export without opening it (NBD_OPT_INFO).
    fn describe(&self, name: &str) -> impl Future<Output = Result<ExportInfo, ExportError>> + Send;
    /// Opens an export for a connection (NBD_OPT_GO, NBD_OPT_EXPORT_NAME).
    fn open(&self, name: &str) -> impl Future<Output = Result<Arc<Self::Device>, ExportError>> + Send;
}

/// Accepts NBD clients on `listener` forever; all their requests share `budget`.
pub async fn serve<E: Exports>(listener: TcpListener, exports: Arc<E>, budget: transmission::Budget) {
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (exports, budget) = (exports.clone(), budget.clone());
        tokio::spawn(async move {
            let negotiated =
                tokio::time::timeout(std::time::Duration::from_secs(60), negotiate(&mut stream, &*exports)).await;
            let n = match negotiated {
                Ok(Ok(Some(n))) => n,
                Ok(Ok(None)) => return,
                Ok(Err(HandshakeError::Io(e))) => {
                    tracing::debug!(%peer, error = %e, "client left during the handshake");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "handshake timed out");
                    return;
                }
            };
            tracing::info!(%peer, export = %n.name, "client connected");
            match transmission::serve(stream, n.device, budget).await {
                Ok(()) => tracing::info!(%peer, export = %n.name, "client disconnected"),
                Err(e) => {
                    tracing::warn!(%peer, export = %n.name, error = %e, "connection ended with an error")
                }
            }
        });
    }
}
