//! A peer-protocol client: typed requests over one `Link` to a node.
//!
//! The link is a pipelined TCP connection (`TcpLink`) in every binary, or
//! whatever a `Transport` makes in tests (in-memory nodes). Over TCP any
//! number of requests may be in flight; a writer task batches frames into
//! the socket, a reader task matches replies to waiting callers by id. When
//! the connection breaks, every waiting caller gets `Disconnected` and the
//! client stays dead: callers (the volume layer's pool) make a new one.

use crate::frame::{
    self, Op, ReplyHeader, RequestHeader, Status, FLAG_DISCARD, FLAG_FUA, FLAG_PRESENT_ONLY, FLAG_ZERO_FILL,
    REPLY_HEADER_LEN,
};
use crate::transport::{BoxFuture, Link};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use torus_types::{Epoch, ExtentId, VolumeId};

#[derive(Debug, Error, Clone)]
pub enum PeerError {
    #[error("cannot connect to node {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connection to node {addr} lost: {reason}")]
    Disconnected { addr: String, reason: String },
    #[error("node {addr} did not answer within {secs} s")]
    Timeout { addr: String, secs: u64 },
    #[error("node {addr} refused a write of epoch {epoch}: it has seen epoch {current}")]
    Fenced { addr: String, epoch: Epoch, current: Epoch },
    #[error("node {addr} answered {status:?}: {message}")]
    Remote { addr: String, status: Status, message: String },
}

impl PeerError {
    /// Whether the node itself is unreachable (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, PeerError::Connect { .. } | PeerError::Disconnected { .. } | PeerError::Timeout { .. })
    }

    /// Whether the node's store has failed (a disk error): it takes no writes until repaired.
    pub fn is_store_failed(&self) -> bool {
        matches!(self, PeerError::Remote { status: crate::frame::Status::Failed, .. })
    }
}

type Waiter = oneshot::Sender<Result<(ReplyHeader, Vec<u8>), PeerError>>;

struct Shared {
    addr: String,
    pending: Mutex<HashMap<u64, Waiter>>,
    dead: Mutex<Option<String>>,
}

impl Shared {
    fn fail_all(&self, reason: String) {
        *self.dead.lock().expect("client lock poisoned") = Some(reason.clone());
        let waiters: Vec<Waiter> = self.pending.lock().expect("client lock poisoned").drain().map(|(_, w)| w).collect();
        for w in waiters {
            let _ = w.send(Err(PeerError::Disconnected { addr: self.addr.clone(), reason: reason.clone() }));
        }
    }
}

/// A pipelined TCP connection to one node: the link every real client uses.
struct TcpLink {
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<([u8; frame::REQUEST_HEADER_LEN], Option<Bytes>)>,
}

/// Forgets a request's waiter when its caller gives up (timed out).
struct Pending<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().expect("client lock poisoned").remove(&self.id);
    }
}

impl TcpLink {
    async fn connect(addr: &str, timeout: Duration) -> Result<(TcpLink, bool), PeerError> {
        let conn_err = |reason: String| PeerError::Connect { addr: addr.to_string(), reason };
        let stream = tokio::time::timeout(timeout.min(Duration::from_secs(5)), TcpStream::connect(addr))
            .await
            .map_err(|_| conn_err("connection timed out".into()))?
            .map_err(|e| conn_err(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let local = matches!((stream.local_addr(), stream.peer_addr()), (Ok(a), Ok(b)) if a.ip() == b.ip());
        let (mut rd, wr): (Box<dyn AsyncRead + Unpin + Send>, Box<dyn AsyncWrite + Unpin + Send>) =
            match crate::tls::client() {
                None => {
                    let (rd, wr) = stream.into_split();
                    (Box::new(rd), Box::new(wr))
                }
                Some(config) => {
                    let name = crate::tls::server_name(addr).ok_or_else(|| conn_err("not a host name or IP".into()))?;
                    let tls = tokio::time::timeout(
                        timeout.min(Duration::from_secs(5)),
                        tokio_rustls::TlsConnector::from(config).connect(name, stream),
                    )
                    .await
                    .map_err(|_| conn_err("TLS handshake timed out".into()))?
                    .map_err(|e| conn_err(format!("TLS handshake: {e}")))?;
                    let (rd, wr) = tokio::io::split(tls);
                    (Box::new(rd), Box::new(wr))
                }
            };
        let shared =
            Arc::new(Shared { addr: addr.to_string(), pending: Mutex::new(HashMap::new()), dead: Mutex::new(None) });
        let (tx, mut rx) = mpsc::unbounded_channel::<([u8; frame::REQUEST_HEADER_LEN], Option<Bytes>)>();

        let sh = shared.clone();
        tokio::spawn(async move {
            let mut w = BufWriter::with_capacity(256 << 10, wr);
            while let Some((hdr, payload)) = rx.recv().await {
                let mut next = Some((hdr, payload));
                let mut res = Ok(());
                while let Some((hdr, payload)) = next.take() {
                    res = w.write_all(&hdr).await;
                    if let (Ok(()), Some(p)) = (&res, payload) {
                        res = w.write_all(&p).await;
                    }
                    if res.is_err() {
                        break;
                    }
                    next = rx.try_recv().ok();
                }
                if res.is_ok() {
                    res = w.flush().await;
                }
                if let Err(e) = res {
                    sh.fail_all(e.to_string());
                    return;
                }
            }
        });

        let sh = shared.clone();
        tokio::spawn(async move {
            let reason = loop {
                let mut hb = [0u8; REPLY_HEADER_LEN];
                if let Err(e) = rd.read_exact(&mut hb).await {
                    break e.to_string();
                }
                let h = match ReplyHeader::decode(&hb) {
                    Ok(h) => h,
                    Err(e) => break format!("bad reply: {e}"),
                };
                // Read into spare capacity (no zeroing of the buffer first).
                let mut payload = Vec::with_capacity(h.len as usize);
                match (&mut rd).take(h.len as u64).read_to_end(&mut payload).await {
                    Ok(n) if n == h.len as usize => {}
                    Ok(_) => break "connection closed mid-reply".to_string(),
                    Err(e) => break e.to_string(),
                }
                let waiter = sh.pending.lock().expect("client lock poisoned").remove(&h.id);
                if let Some(w) = waiter {
                    let _ = w.send(Ok((h, payload)));
                }
            };
            sh.fail_all(reason);
        });
        Ok((TcpLink { shared, tx }, local))
    }
}

impl Link for TcpLink {
    fn exchange(
        &self,
        h: RequestHeader,
        payload: Option<Bytes>,
    ) -> BoxFuture<'_, Result<(Status, Vec<u8>), PeerError>> {
        Box::pin(async move {
            let addr = &self.shared.addr;
            let (wtx, wrx) = oneshot::channel();
            {
                let dead = self.shared.dead.lock().expect("client lock poisoned");
                if let Some(reason) = &*dead {
                    return Err(PeerError::Disconnected { addr: addr.clone(), reason: reason.clone() });
                }
                self.shared.pending.lock().expect("client lock poisoned").insert(h.id, wtx);
            }
            let _pending = Pending { shared: &self.shared, id: h.id };
            if self.tx.send((h.encode(), payload)).is_err() {
                return Err(PeerError::Disconnected { addr: addr.clone(), reason: "writer stopped".into() });
            }
            match wrx.await {
                Ok(r) => r.map(|(reply, body)| (reply.status, body)),
                Err(_) => Err(PeerError::Disconnected { addr: addr.clone(), reason: "reader stopped".into() }),
            }
        })
    }

    fn is_dead(&self) -> bool {
        self.shared.dead.lock().expect("client lock poisoned").is_some() || self.tx.is_closed()
    }

    fn in_flight(&self) -> usize {
        self.shared.pending.lock().expect("client lock poisoned").len()
    }
}

pub struct PeerClient {
    addr: String,
    link: Box<dyn Link>,
    next_id: AtomicU64,
    timeout: Duration,
    /// The node runs on this host (the connection's two ends share an IP address).
    local: bool,
}

impl PeerClient {
    /// Connects to a node's peer address over TCP.
    pub async fn connect(addr: &str, timeout: Duration) -> Result<PeerClient, PeerError> {
        let (link, local) = TcpLink::connect(addr, timeout).await?;
        Ok(PeerClient::over(addr, Box::new(link), timeout, local))
    }

    /// A client over any link (`Transport` implementations make these).
    pub fn over(addr: &str, link: Box<dyn Link>, timeout: Duration, local: bool) -> PeerClient {
        PeerClient { addr: addr.to_string(), link, next_id: AtomicU64::new(1), timeout, local }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether the connection has broken (make a new client).
    pub fn is_dead(&self) -> bool {
        self.link.is_dead()
    }

    /// Sends one request and waits for its reply payload.
    pub async fn call(&self, mut h: RequestHeader, payload: Option<Bytes>) -> Result<Vec<u8>, PeerError> {
        let addr = &self.addr;
        h.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (status, body) = match tokio::time::timeout(self.timeout, self.link.exchange(h, payload)).await {
            Ok(r) => r?,
            Err(_) => return Err(PeerError::Timeout { addr: addr.clone(), secs: self.timeout.as_secs() }),
        };
        match status {
            Status::Ok => Ok(body),
            Status::Fenced => {
                let current = body.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).unwrap_or(0);
                Err(PeerError::Fenced { addr: addr.clone(), epoch: h.epoch, current: Epoch(current) })
            }
            status => Err(PeerError::Remote {
                addr: addr.clone(),
                status,
                message: String::from_utf8_lossy(&body).into_owned(),
            }),
        }
    }

    /// Reads a range of an extent; with `present_only`, fails rather than
    /// read blocks the node never received as zeroes.
    pub async fn read(
        &self,
        extent: ExtentId,
        offset: u32,
        len: u32,
        present_only: bool,
    ) -> Result<Vec<u8>, PeerError> {
        let mut h = RequestHeader::new(Op::Read, extent, offset, len, Epoch(0));
        if present_only {
            h.flags |= FLAG_PRESENT_ONLY;
        }
        let data = self.call(h, None).await?;
        if data.len() != len as usize {
            return Err(PeerError::Disconnected {
                addr: self.addr.clone(),
                reason: format!("read reply of {} bytes, asked for {len}", data.len()),
            });
        }
        Ok(data)
    }

    pub async fn write(
        &self,
        extent: ExtentId,
        offset: u32,
        data: Bytes,
        epoch: Epoch,
        fua: bool,
    ) -> Result<(), PeerError> {
        let mut h = RequestHeader::new(Op::Write, extent, offset, data.len() as u32, epoch);
        if fua {
            h.flags |= FLAG_FUA;
        }
        self.call(h, Some(data)).await.map(drop)
    }

    pub async fn zero(
        &self,
        extent: ExtentId,
        offset: u32,
        len: u32,
        epoch: Epoch,
        fua: bool,
    ) -> Result<(), PeerError> {
        let mut h = RequestHeader::new(Op::Zero, extent, offset, len, epoch);
        if fua {
            h.flags |= FLAG_FUA;
        }
        self.call(h, None).await.map(drop)
    }

    /// Makes the range's whole blocks absent again (see `FLAG_DISCARD`).
    pub async fn discard(&self, extent: ExtentId, offset: u32, len: u32, epoch: Epoch) -> Result<(), PeerError> {
        let mut h = RequestHeader::new(Op::Zero, extent, offset, len, epoch);
        h.flags |= FLAG_DISCARD;
        self.call(h, None).await.map(drop)
    }

    pub async fn flush(&self) -> Result<(), PeerError> {
        self.call(RequestHeader::new(Op::Flush, ExtentId::new(VolumeId(0), 0), 0, 0, Epoch(0)), None).await.map(drop)
    }

    /// Announces a writer's epoch for a volume; returns the node's epoch after it.
    pub async fn fence(&self, volume: VolumeId, epoch: Epoch) -> Result<Epoch, PeerError> {
        let body = self.call(RequestHeader::new(Op::Fence, ExtentId::new(volume, 0), 0, 0, epoch), None).await?;
        Ok(Epoch(body.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).unwrap_or(0)))
    }

    pub async fn delete_volume(&self, volume: VolumeId) -> Result<(), PeerError> {
        self.call(RequestHeader::new(Op::DeleteVolume, ExtentId::new(volume, 0), 0, 0, Epoch(0)), None).await.map(drop)
    }

    /// Copies blocks in without overwriting any already written there; `None` zero-fills.
    pub async fn fill(&self, extent: ExtentId, offset: u32, len: u32, data: Option<Bytes>) -> Result<(), PeerError> {
        let mut h = RequestHeader::new(Op::Fill, extent, offset, len, Epoch(0));
        if data.is_none() {
            h.flags |= FLAG_ZERO_FILL;
        }
        self.call(h, data).await.map(drop)
    }

    /// The checksum table of an extent on the node: per block `(crc32c, state)`
    /// with state 0 absent, 1 data, 2 zero; empty if it holds none.
    pub async fn block_sums(&self, extent: ExtentId) -> Result<Vec<(u32, u8)>, PeerError> {
        let body = self.call(RequestHeader::new(Op::BlockSums, extent, 0, 0, Epoch(0)), None).await?;
        Ok(body.chunks_exact(8).map(|c| (u32::from_le_bytes([c[0], c[1], c[2], c[3]]), c[4])).collect())
    }

    /// Whether the node holds a copy of the extent (asked of full nodes,
    /// which are replicas only of the extents they hold).
    pub async fn holds(&self, extent: ExtentId) -> Result<bool, PeerError> {
        let body = self.call(RequestHeader::new(Op::Holds, extent, 0, 0, Epoch(0)), None).await?;
        Ok(body.first() == Some(&1))
    }

    /// Checks that the node answers.
    pub async fn ping(&self) -> Result<(), PeerError> {
        self.call(RequestHeader::new(Op::Ping, ExtentId::new(VolumeId(0), 0), 0, 0, Epoch(0)), None).await.map(drop)
    }

    pub async fn delete_extent(&self, extent: ExtentId) -> Result<(), PeerError> {
        self.call(RequestHeader::new(Op::DeleteExtent, extent, 0, 0, Epoch(0)), None).await.map(drop)
    }

    /// Sends a good copy of an aligned range; the node replaces only its corrupt blocks.
    pub async fn repair(&self, extent: ExtentId, offset: u32, data: Bytes) -> Result<u64, PeerError> {
        let h = RequestHeader::new(Op::Repair, extent, offset, data.len() as u32, Epoch(0));
        let body = self.call(h, Some(data)).await?;
        Ok(body.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).unwrap_or(0))
    }

    /// Whether the node runs on this host.
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// Requests this client is waiting for (a load signal for picking replicas).
    pub fn in_flight(&self) -> usize {
        self.link.in_flight()
    }
}
