//! The NBD listener: accepts connections, runs the handshake (with TLS when
//! the client asks for it with NBD_OPT_STARTTLS, or must), then the
//! transmission phase. Which exports exist, and what opening one means, is
//! the [`Exports`] implementation's business.

use crate::exports::Exports;
use crate::handshake::{greet, haggle, HandshakeError, Negotiated, Step, Tls};
use crate::transmission;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tracing::Instrument;

/// TLS for NBD clients: the server's certificate and the clients' CA.
#[derive(Clone)]
pub struct NbdTls {
    /// Read at each STARTTLS (certificates may have been reloaded).
    pub config: torus_proto::tls::ServerTls,
    /// Every option but STARTTLS is refused until TLS is on.
    pub required: bool,
}

/// How long a client may take for the whole handshake (TLS included).
const HANDSHAKE: Duration = Duration::from_secs(60);

/// Accepts NBD clients on `listener` forever; all their requests share `budget`.
pub async fn serve<E: Exports>(
    listener: TcpListener,
    exports: Arc<E>,
    budget: transmission::Budget,
    tls: Option<NbdTls>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (exports, budget, tls) = (exports.clone(), budget.clone(), tls.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE, connection(stream, &*exports, budget, tls, peer)).await {
                Ok(Ok(())) => {}
                Ok(Err(HandshakeError::Io(e))) => {
                    tracing::debug!(%peer, error = %e, "client left during the handshake")
                }
                Ok(Err(e)) => tracing::warn!(%peer, error = %e, "handshake failed"),
                Err(_) => tracing::warn!(%peer, "handshake timed out"),
            }
        });
    }
}

/// One client: handshake (upgraded to TLS if asked), then its requests until it leaves.
async fn connection<E: Exports>(
    mut stream: tokio::net::TcpStream,
    exports: &E,
    budget: transmission::Budget,
    tls: Option<NbdTls>,
    peer: std::net::SocketAddr,
) -> Result<(), HandshakeError> {
    let no_zeroes = greet(&mut stream).await?;
    let plain = Tls { offered: tls.is_some(), required: tls.as_ref().is_some_and(|t| t.required), active: false };
    match haggle(&mut stream, exports, no_zeroes, plain).await? {
        Step::Done(None) => Ok(()),
        Step::Done(Some(n)) => {
            tokio::spawn(transmit(stream, n, budget, peer, false));
            Ok(())
        }
        Step::StartTls => {
            let Some(tls) = tls else { return Ok(()) };
            let mut stream = tls.config.acceptor().accept(stream).await.map_err(HandshakeError::Io)?;
            let encrypted = Tls { offered: true, required: true, active: true };
            match haggle(&mut stream, exports, no_zeroes, encrypted).await? {
                Step::Done(Some(n)) => {
                    tokio::spawn(transmit(stream, n, budget, peer, true));
                    Ok(())
                }
                Step::Done(None) | Step::StartTls => Ok(()),
            }
        }
    }
}

/// The transmission phase (not bounded by the handshake's timeout).
async fn transmit<S, D>(
    stream: S,
    n: Negotiated<D>,
    budget: transmission::Budget,
    peer: std::net::SocketAddr,
    tls: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: torus_volume::BlockDevice,
{
    tracing::info!(%peer, export = %n.name, tls, "client connected");
    let span = tracing::debug_span!("nbd", export = %n.name, %peer);
    match transmission::serve(stream, n.device, budget, n.features).instrument(span).await {
        Ok(()) => tracing::info!(%peer, export = %n.name, "client disconnected"),
        Err(e) => tracing::warn!(%peer, export = %n.name, error = %e, "connection ended with an error"),
    }
}
