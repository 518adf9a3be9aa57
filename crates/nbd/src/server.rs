//! The NBD listener: accepts connections, runs the handshake, then the
//! transmission phase. Which exports exist, and what opening one means, is
//! the [`Exports`] implementation's business.

use crate::exports::Exports;
use crate::handshake::{negotiate, HandshakeError};
use crate::transmission;
use std::sync::Arc;
use tokio::net::TcpListener;

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
            match transmission::serve(stream, n.device, budget, n.features).await {
                Ok(()) => tracing::info!(%peer, export = %n.name, "client disconnected"),
                Err(e) => {
                    tracing::warn!(%peer, export = %n.name, error = %e, "connection ended with an error")
                }
            }
        });
    }
}
