//! The peer-protocol server: one task per connection reads requests, runs
//! them against the local store and queues replies to a writer task, so that
//! replies go out as they complete (flushes don't hold up reads).
//!
//! Memory is bounded with backpressure: before a request's payload is read,
//! it takes a slot of its connection's `SLOTS` and its bytes (the payload,
//! or the reply a read will make) from the connection's `CONNECTION_BYTES`
//! and from the process's `PROCESS_BYTES`; they are given back once its
//! reply is in the socket. A peer that does not read its replies stops being read.

use crate::liveness::Liveness;
use crate::metrics::NodeMetrics;
use bytes::Bytes;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
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
pub async fn serve(listener: TcpListener, store: Arc<Store>, metrics: Arc<NodeMetrics>, liveness: Arc<Liveness>) {
    let budget = Arc::new(Semaphore::new(PROCESS_BYTES));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let (store, metrics, liveness, budget) =
                    (store.clone(), metrics.clone(), liveness.clone(), budget.clone());
                tokio::spawn(async move {
                    if let Err(reason) = connection(stream, store, metrics, liveness, budget).await {
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

fn error_reply(id: u64, e: &StoreError, metrics: &NodeMetrics) -> Reply {
    NodeMetrics::inc(&metrics.errors, 1);
    let status = status_of(e);
    let body = match e {
        StoreError::Fenced { current, .. } => {
            NodeMetrics::inc(&metrics.fenced_writes, 1);
            tracing::warn!(error = %e, "stale writer refused");
            Bytes::copy_from_slice(&current.0.to_le_bytes())
        }
        StoreError::Checksum { .. } | StoreError::CorruptTable { .. } => {
            NodeMetrics::inc(&metrics.checksum_errors, 1);
            tracing::error!(error = %e, "corrupt data detected");
            Bytes::from(e.to_string())
        }
        _ => {
            tracing::warn!(error = %e, "request failed");
            Bytes::from(e.to_string())
        }
    };
    (ReplyHeader { status, id, len: body.len() as u32 }, body)
}

fn ok(id: u64, body: Bytes) -> Reply {
    (ReplyHeader { status: Status::Ok, id, len: body.len() as u32 }, body)
}

fn reply_of(id: u64, res: Result<Bytes, StoreError>, metrics: &NodeMetrics) -> Reply {
    match res {
        Ok(body) => ok(id, body),
        Err(e) => error_reply(id, &e, metrics),
    }
}

async fn connection(
    stream: TcpStream,
    store: Arc<Store>,
    metrics: Arc<NodeMetrics>,
    liveness: Arc<Liveness>,
    budget: Arc<Semaphore>,
) -> Result<(), String> {
    let (mut rd, wr) = stream.into_split();
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
        let reply =
            if liveness.is_isolated() && matches!(h.op, Op::Write | Op::Zero | Op::Fill | Op::Repair | Op::Fence) {
                NodeMetrics::inc(&metrics.errors, 1);
                let msg = Bytes::from_static(b"node is cut off from the metadata store; retry");
                Some(((ReplyHeader { status: Status::Isolated, id: h.id, len: msg.len() as u32 }, msg), held))
            } else {
                handle(h, payload, &store, &metrics, &tx, held)
            };
        if let Some(r) = reply {
            if tx.send(r).is_err() {
                break Err("reply writer stopped".into());
            }
        }
    };
    drop(tx);
    let _ = writer.await;
    result
}

/// Runs one request. Returns the reply now, or `None` if a spawned task will send it.
fn handle(
    h: RequestHeader,
    payload: Vec<u8>,
    store: &Arc<Store>,
    metrics: &Arc<NodeMetrics>,
    tx: &mpsc::UnboundedSender<Queued>,
    held: Held,
) -> Option<Queued> {
    let id = h.id;
    let fua = h.flags & FLAG_FUA != 0;
    let off = h.offset as u64;
    let res: Result<Bytes, StoreError> = match h.op {
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
        Op::Zero => {
            NodeMetrics::inc(&metrics.zeroes, 1);
            store.zero(h.extent, off, h.len as u64, h.epoch).map(|()| Bytes::new())
        }
        Op::Flush => {
            NodeMetrics::inc(&metrics.flushes, 1);
            return spawn_flush(id, Ok(Bytes::new()), store, metrics, tx, held);
        }
        Op::Fence => store.fence(h.extent.volume, h.epoch).map(|e| Bytes::copy_from_slice(&e.0.to_le_bytes())),
        Op::DeleteVolume => {
            tracing::info!(volume = %h.extent.volume, "deleting volume data");
            store.delete_volume(h.extent.volume).map(|_| Bytes::new())
        }
        Op::ListExtents => store.extents().map(|list| {
            let items: Vec<_> = list.into_iter().map(|s| (s.id, s.data_blocks)).collect();
            Bytes::from(frame::encode_extent_list(&items))
        }),
        Op::Ping => Ok(Bytes::new()),
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
    };
    if fua && res.is_ok() && matches!(h.op, Op::Write | Op::Zero) {
        return spawn_flush(id, res, store, metrics, tx, held);
    }
    Some((reply_of(id, res, metrics), held))
}

fn spawn_flush(
    id: u64,
    res: Result<Bytes, StoreError>,
    store: &Arc<Store>,
    metrics: &Arc<NodeMetrics>,
    tx: &mpsc::UnboundedSender<Queued>,
    held: Held,
) -> Option<Queued> {
    let (store, metrics, tx) = (store.clone(), metrics.clone(), tx.clone());
    tokio::spawn(async move {
        let res = match store.flush().await {
            Ok(()) => res,
            Err(e) => Err(e),
        };
        let _ = tx.send((reply_of(id, res, &metrics), held));
    });
    None
}
