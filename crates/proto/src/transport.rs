//! How a client reaches a node: the seam between the data path's logic and
//! the wire. `Tcp` is what every binary uses; tests plug in other
//! transports (in-memory nodes with injected drops, delays, partitions and
//! crashes) so that the volume, tracker, resync, repair and rebalancer run
//! without processes or sockets.

use crate::client::{PeerClient, PeerError};
use crate::frame::{RequestHeader, Status};
use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One open link to a node: carries a request and brings back its reply's
/// status and body. `PeerClient` adds ids, timeouts and typed requests.
pub trait Link: Send + Sync {
    fn exchange(&self, h: RequestHeader, payload: Option<Bytes>)
        -> BoxFuture<'_, Result<(Status, Vec<u8>), PeerError>>;
    /// The link has broken for good: the caller makes a new one.
    fn is_dead(&self) -> bool;
    /// Requests waiting for their replies (a load signal for picking replicas).
    fn in_flight(&self) -> usize;
}

/// Opens links to nodes by their registered address.
pub trait Transport: Send + Sync + std::fmt::Debug {
    fn connect<'a>(&'a self, addr: &'a str, timeout: Duration) -> BoxFuture<'a, Result<PeerClient, PeerError>>;
}

/// The peer protocol over TCP.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tcp;

impl Transport for Tcp {
    fn connect<'a>(&'a self, addr: &'a str, timeout: Duration) -> BoxFuture<'a, Result<PeerClient, PeerError>> {
        Box::pin(PeerClient::connect(addr, timeout))
    }
}
