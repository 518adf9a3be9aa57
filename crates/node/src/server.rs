//! The peer-protocol server: one task per connection reads requests, hands
//! them to the `Handler` (store I/O on the blocking pool) and queues replies
//! to a writer task, so that replies go out as they complete (flushes don't
//! hold up reads).
//!
//! Memory is bounded with backpressure: before a request's payload is read,
//! it takes a slot of its connection's `SLOTS` and its bytes (the payload,
//! or the reply a read will make) from the connection's `CONNECTION_BYTES`
//! and from the process's `PROCESS_BYTES`; they are given back once its
//! reply is in the socket. A peer that does not read its replies stops being read.

use crate::liveness::Liveness;
use crate::metrics::NodeMetrics;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use torus_proto::frame::{self, Op, ReplyHeader, RequestHeader, Status, FLAG_FUA, REQUEST_HEADER_LEN};
use torus_store::{Store, StoreError};

type Reply = (ReplyHeader, Bytes);

/// Requests of one connection in flight at once.
const SLOTS: usize = 256;
/// Bytes of payloads and replies one connection may hold (two of the largest requests).
const CONNECTION_BYTES: usize = 2 * frame::MAX_PAYLOAD as usize;
/// Bytes of payloads and replies all connections may hold.
const PROCESS_BYTES: usize = 1 << 30;

/// What a request holds until its reply is in the socket.
struct Held {
    _slot: OwnedSemaphorePermit,
    _conn: OwnedSemaphorePermit,
    _process: OwnedSemaphorePermit,
}

type Queued = (Reply, Held);

/// Serves the peer protocol on `listener` until the task is dropped.
/// Serves peers on `listener`; with `tls`, only those whose certificate the
/// cluster CA signed (a connection is read from only once its handshake is done).
pub async fn serve(
    listener: TcpListener,
    handler: Arc<Handler>,
    liveness: Arc<Liveness>,
    tls: Option<torus_proto::tls::ServerTls>,
) {
    let budget = Arc::new(Semaphore::new(PROCESS_BYTES));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let (handler, liveness, budget) = (handler.clone(), liveness.clone(), budget.clone());
                // The certificates of now (they may have been reloaded).
                let acceptor = tls.as_ref().map(|t| t.acceptor());
                tokio::spawn(async move {
                    let connections = handler.metrics.connections.clone();
                    connections.inc();
                    let result = match acceptor {
                        None => {
                            let (rd, wr) = stream.into_split();
                            connection(rd, wr, handler, liveness, budget).await
                        }
                        Some(acceptor) => {
                            let handshake = tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream)).await;
                            match handshake {
                                Ok(Ok(tls)) => {
                                    let (rd, wr) = tokio::io::split(tls);
                                    connection(rd, wr, handler, liveness, budget).await
                                }
                                Ok(Err(e)) => Err(format!("TLS handshake refused: {e}")),
                                Err(_) => Err("TLS handshake timed out".into()),
                            }
                        }
                    };
                    connections.dec();
                    if let Err(reason) = result {
                        tracing::debug!(%peer, %reason, "peer connection closed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// How long a peer has to complete the TLS handshake.
const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

fn status_of(e: &StoreError) -> Status {
    match e {
        // The filesystem under the store ran out of space: say so, not "I/O error".
        StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => Status::NoSpace,
        StoreError::Io { .. } => Status::Io,
        StoreError::Checksum { .. } | StoreError::CorruptTable { .. } => Status::Checksum,
        StoreError::NoSpace { .. } => Status::NoSpace,
        StoreError::Fenced { .. } => Status::Fenced,
        StoreError::OutOfRange { .. } => Status::OutOfRange,
        StoreError::Failed { .. } => Status::Failed,
        StoreError::Absent { .. } => Status::Absent,
    }
}

/// Runs requests against the local store: the node's side of the protocol,
/// shared by the TCP server and by in-memory nodes in tests.
///
/// Store I/O blocks (pread, pwrite, opening and verifying an extent), so it
/// never runs on the async workers: requests wait in the node's queue, which
/// up to `DRAINERS` threads of the blocking pool empty. Under load a drainer
/// runs request after request with no hand-off between threads (one hand-off
/// per request costs a third of 4 KiB random-read throughput here); idle, a
/// request costs one. A slow disk holds up requests of this store, never the
/// tasks that read requests, write replies and keep the node's lease.
/// FLUSH (and FUA's flush) runs as the store's group commit, itself on the
/// blocking pool.
pub struct Handler {
    store: Arc<Store>,
    metrics: Arc<NodeMetrics>,
    queue: Mutex<Queue>,
}

/// Threads of the blocking pool running one node's store requests at most
/// (more cost throughput on small machines: bench/results/CHECK-20261203b.md).
const DRAINERS: usize = 1;

/// Where a request's reply goes.
pub type Done = Box<dyn FnOnce(Status, Bytes) + Send>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<(RequestHeader, Vec<u8>, Done)>,
    drainers: usize,
}

impl Handler {
    pub fn new(store: Arc<Store>, metrics: Arc<NodeMetrics>) -> Arc<Handler> {
        Arc::new(Handler { store, metrics, queue: Mutex::default() })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Runs one request; returns the reply's status and body.
    pub async fn execute(self: &Arc<Self>, h: RequestHeader, payload: Vec<u8>) -> (Status, Bytes) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(h, payload, Box::new(move |status, body| drop(tx.send((status, body)))));
        rx.await.unwrap_or_else(|_| (Status::Failed, Bytes::from_static(b"the node is stopping")))
    }

    /// Queues one request; `done` gets its reply (on some thread, soon or later).
    pub fn submit(self: &Arc<Self>, h: RequestHeader, payload: Vec<u8>, done: Done) {
        // Its latency, from here (queueing included) to its reply.
        let (started, metrics) = (std::time::Instant::now(), self.metrics.clone());
        let bytes = if matches!(h.op, Op::Read | Op::Write | Op::Fill | Op::Repair) { h.len as u64 } else { 0 };
        let op = h.op;
        metrics.in_flight.inc();
        let done: Done = Box::new(move |status, body| {
            metrics.in_flight.dec();
            metrics.op(op).record(bytes, started.elapsed(), status == Status::Ok);
            done(status, body)
        });
        match h.op {
            Op::Flush => {
                NodeMetrics::inc(&self.metrics.flushes, 1);
                let me = self.clone();
                tokio::spawn(async move {
                    let res = me.store.flush().await.map(|()| Bytes::new());
                    me.finish(res, done);
                });
            }
            Op::Ping => done(Status::Ok, Bytes::new()),
            _ => {
                let mut q = self.queue.lock().expect("request queue poisoned");
                q.jobs.push_back((h, payload, done));
                if q.drainers < DRAINERS && q.drainers < q.jobs.len() {
                    q.drainers += 1;
                    let me = self.clone();
                    tokio::task::spawn_blocking(move || me.drain());
                }
            }
        }
    }

    /// Runs queued requests until the queue is empty (on a blocking thread).
    fn drain(self: Arc<Self>) {
        loop {
            let (h, payload, done) = {
                let mut q = self.queue.lock().expect("request queue poisoned");
                match q.jobs.pop_front() {
                    Some(job) => job,
                    None => {
                        q.drainers -= 1;
                        return;
                    }
                }
            };
            // One span per request (DEBUG): op, extent (volume/index), range.
            let span = tracing::debug_span!("request", op = ?h.op, extent = %h.extent, offset = h.offset, len = h.len);
            let _entered = span.enter();
            let res = self.run(h, payload);
            tracing::debug!(ok = res.is_ok(), "answered");
            if h.flags & FLAG_FUA != 0 && res.is_ok() && matches!(h.op, Op::Write | Op::Zero) {
                let me = self.clone();
                tokio::runtime::Handle::current().spawn(async move {
                    let res = me.store.flush().await.and(res);
                    me.finish(res, done);
                });
            } else {
                self.finish(res, done);
            }
        }
    }

    fn finish(&self, res: Result<Bytes, StoreError>, done: Done) {
        match res {
            Ok(body) => done(Status::Ok, body),
            Err(e) => {
                let (status, body) = self.error_reply(&e);
                done(status, body)
            }
        }
    }

    /// The reply to a failed request. Logged once, where it is handled: the
    /// client decides what a failure means (write around, read elsewhere,
    /// EIO) and says so; the store already logged, once, a disk error that
    /// failed it. Only corruption is logged here: only the node sees it.
    fn error_reply(&self, e: &StoreError) -> (Status, Bytes) {
        let metrics = &self.metrics;
        let status = status_of(e);
        let body = match e {
            StoreError::Fenced { current, .. } => {
                NodeMetrics::inc(&metrics.fenced_writes, 1);
                tracing::debug!(error = %e, "stale writer refused");
                Bytes::copy_from_slice(&current.0.to_le_bytes())
            }
            StoreError::Checksum { .. } | StoreError::CorruptTable { .. } => {
                NodeMetrics::inc(&metrics.checksum_errors, 1);
                tracing::error!(error = %e, "corrupt data detected");
                Bytes::from(e.to_string())
            }
            _ => {
                tracing::debug!(error = %e, "request failed");
                Bytes::from(e.to_string())
            }
        };
        (status, body)
    }

    /// Runs a request's store I/O (on a blocking thread).
    fn run(&self, h: RequestHeader, payload: Vec<u8>) -> Result<Bytes, StoreError> {
        let (store, metrics) = (&self.store, &self.metrics);
        let off = h.offset as u64;
        match h.op {
            Op::Read => {
                NodeMetrics::inc(&metrics.reads, 1);
                NodeMetrics::inc(&metrics.read_bytes, h.len as u64);
                let mut buf = vec![0u8; h.len as usize];
                let res = if h.flags & frame::FLAG_PRESENT_ONLY != 0 {
                    store.read_present(h.extent, off, &mut buf)
                } else {
                    store.read(h.extent, off, &mut buf)
                };
                res.map(|()| Bytes::from(buf))
            }
            Op::Write => {
                NodeMetrics::inc(&metrics.writes, 1);
                NodeMetrics::inc(&metrics.written_bytes, h.len as u64);
                store.write(h.extent, off, &payload, h.epoch).map(|()| Bytes::new())
            }
            Op::Zero if h.flags & torus_proto::FLAG_DISCARD != 0 => {
                store.discard(h.extent, off, h.len as u64, h.epoch).map(|()| Bytes::new())
            }
            Op::Zero => {
                NodeMetrics::inc(&metrics.zeroes, 1);
                store.zero(h.extent, off, h.len as u64, h.epoch).map(|()| Bytes::new())
            }
            Op::Flush | Op::Ping => Ok(Bytes::new()),
            Op::Fence => store.fence(h.extent.volume, h.epoch).map(|e| Bytes::copy_from_slice(&e.0.to_le_bytes())),
            Op::DeleteVolume => {
                tracing::info!(volume = %h.extent.volume, "deleting volume data");
                store.delete_volume(h.extent.volume).map(|_| Bytes::new())
            }
            Op::ListExtents => store.extents().map(|list| {
                let items: Vec<_> = list.into_iter().map(|s| (s.id, s.data_blocks)).collect();
                Bytes::from(frame::encode_extent_list(&items))
            }),
            Op::Fill => {
                let data = (h.flags & frame::FLAG_ZERO_FILL == 0).then_some(&payload[..]);
                store.fill(h.extent, off, h.len as u64, data).map(|()| Bytes::new())
            }
            Op::BlockSums => store.block_sums(h.extent).map(|t| Bytes::from(t.unwrap_or_default())),
            Op::Holds => store.holds(h.extent).map(|held| Bytes::copy_from_slice(&[held as u8])),
            Op::DeleteExtent => store.delete_extent(h.extent).map(|()| Bytes::new()),
            Op::Repair => store.repair(h.extent, off, &payload).map(|n| {
                NodeMetrics::inc(&metrics.repaired_blocks, n);
                Bytes::copy_from_slice(&n.to_le_bytes())
            }),
        }
    }
}

async fn connection<R, W>(
    mut rd: R,
    wr: W,
    handler: Arc<Handler>,
    liveness: Arc<Liveness>,
    budget: Arc<Semaphore>,
) -> Result<(), String>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 << 10, wr);
        while let Some(first) = rx.recv().await {
            // What the batch's requests hold is given back once the batch is in the socket.
            let mut written = Vec::new();
            let mut next = Some(first);
            while let Some(((h, body), held)) = next.take() {
                w.write_all(&h.encode()).await?;
                w.write_all(&body).await?;
                written.push(held);
                next = rx.try_recv().ok();
            }
            w.flush().await?;
            drop(written);
        }
        Ok::<(), std::io::Error>(())
    });
    let slots = Arc::new(Semaphore::new(SLOTS));
    let conn_bytes = Arc::new(Semaphore::new(CONNECTION_BYTES));
    let result = loop {
        let mut hb = [0u8; REQUEST_HEADER_LEN];
        if let Err(e) = rd.read_exact(&mut hb).await {
            break if e.kind() == std::io::ErrorKind::UnexpectedEof { Ok(()) } else { Err(e.to_string()) };
        }
        let h = match RequestHeader::decode(&hb) {
            Ok(h) => h,
            // The stream cannot be resynchronised after a bad header: drop the connection.
            Err(e) => break Err(format!("bad request: {e}")),
        };
        let bytes = if h.op == Op::Read { h.len } else { h.payload_len() as u32 };
        let held = Held {
            _slot: slots.clone().acquire_owned().await.expect("semaphore never closed"),
            _conn: conn_bytes.clone().acquire_many_owned(bytes).await.expect("semaphore never closed"),
            _process: budget.clone().acquire_many_owned(bytes).await.expect("semaphore never closed"),
        };
        // Read into spare capacity (no zeroing of the buffer first).
        let mut payload = Vec::with_capacity(h.payload_len());
        match (&mut rd).take(h.payload_len() as u64).read_to_end(&mut payload).await {
            Ok(n) if n == h.payload_len() => {}
            Ok(_) => break Err("connection closed mid-request".to_string()),
            Err(e) => break Err(e.to_string()),
        }
        let id = h.id;
        if liveness.is_isolated() && matches!(h.op, Op::Write | Op::Zero | Op::Fill | Op::Repair | Op::Fence) {
            // Refused at once: an error, answered without delay.
            handler.metrics.op(h.op).record(0, std::time::Duration::ZERO, false);
            let msg = Bytes::from_static(b"node is cut off from the metadata store; retry");
            if tx.send(((ReplyHeader { status: Status::Isolated, id, len: msg.len() as u32 }, msg), held)).is_err() {
                break Err("reply writer stopped".into());
            }
            continue;
        }
        let tx = tx.clone();
        handler.submit(
            h,
            payload,
            Box::new(move |status, body| {
                let _ = tx.send(((ReplyHeader { status, id, len: body.len() as u32 }, body), held));
            }),
        );
    };
    drop(tx);
    let _ = writer.await;
    result
}
