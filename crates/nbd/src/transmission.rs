//! The transmission phase: requests are read in order, run concurrently, and
//! answered as each completes (out of order): simple replies, or — once the
//! client negotiated structured replies — one structured chunk for a READ
//! (its data, or an error) and for a BLOCK_STATUS (`base:allocation`: holes
//! and zeroes from the store's block tables, through
//! `BlockDevice::allocation`).
//!
//! A request we cannot parse (bad magic) or whose payload we will not read
//! (a write longer than the advertised maximum) ends the connection, after an
//! error reply where the spec allows one; everything else gets an errno.
//!
//! Memory is bounded with backpressure: before a request's payload is read
//! (or a read is started), it takes a slot of the connection's 256, and its
//! bytes from the connection's budget (`CONNECTION_BYTES`) and from the
//! process's (`Budget`, shared by every connection); all three are given
//! back only once its reply is written to the socket. A client that sends
//! without reading its replies therefore stops being read, and holds at most
//! its connection's budget. The process budget has two parts, so that small
//! requests (up to 1 MiB) never queue behind large ones.

use crate::consts::*;
use crate::handshake::Features;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use torus_volume::{BlockDevice, VolumeError};
use tracing::Instrument;

/// How many requests of one connection may run at once.
const MAX_IN_FLIGHT: usize = 256;
/// Bytes of payloads and replies one connection may hold (two of the largest requests).
pub const CONNECTION_BYTES: usize = 2 * MAX_BLOCK as usize;
/// Bytes of payloads and replies of large requests all connections of a process may hold.
pub const PROCESS_LARGE_BYTES: usize = 1 << 30;
/// The same for small requests (up to `SMALL`).
pub const PROCESS_SMALL_BYTES: usize = 256 << 20;
/// The largest request that counts as small.
pub const SMALL: u32 = 1 << 20;

/// The process-wide budget of request bytes, shared by its connections. Each
/// part is FIFO: a waiting request is not overtaken by a later one of its size class.
#[derive(Clone)]
pub struct Budget {
    small: Arc<Semaphore>,
    large: Arc<Semaphore>,
}

impl Budget {
    async fn take(&self, bytes: u32) -> OwnedSemaphorePermit {
        let part = if bytes <= SMALL { &self.small } else { &self.large };
        part.clone().acquire_many_owned(bytes).await.expect("semaphore never closed")
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            small: Arc::new(Semaphore::new(PROCESS_SMALL_BYTES)),
            large: Arc::new(Semaphore::new(PROCESS_LARGE_BYTES)),
        }
    }
}

/// What a request holds until its reply is written.
struct Held {
    _slot: OwnedSemaphorePermit,
    _conn: OwnedSemaphorePermit,
    _process: OwnedSemaphorePermit,
}

/// How a reply goes on the wire.
#[derive(Clone, Copy)]
enum Form {
    /// A simple reply (with a read's data when it succeeded).
    Simple,
    /// A structured reply to a READ: one OFFSET_DATA chunk, or an ERROR chunk.
    Read { offset: u64 },
    /// A structured reply to a BLOCK_STATUS: one chunk of descriptors (in
    /// `data`) for `base:allocation`, or an ERROR chunk.
    Status,
}

struct Reply {
    cookie: u64,
    error: u32,
    data: Bytes,
    form: Form,
    held: Option<Held>,
}

/// A structured reply chunk's header (always the last chunk: DONE).
fn chunk_header(kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..20].copy_from_slice(&len.to_be_bytes());
    h
}

/// Writes one reply.
async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, r: &Reply) -> std::io::Result<()> {
    match r.form {
        Form::Simple => {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            h[4..8].copy_from_slice(&r.error.to_be_bytes());
            h[8..16].copy_from_slice(&r.cookie.to_be_bytes());
            w.write_all(&h).await?;
            if r.error == 0 {
                w.write_all(&r.data).await?;
            }
        }
        _ if r.error != 0 => {
            // error, then a message length of 0 (the errno says it all).
            w.write_all(&chunk_header(REPLY_TYPE_ERROR, r.cookie, 6)).await?;
            w.write_all(&r.error.to_be_bytes()).await?;
            w.write_all(&0u16.to_be_bytes()).await?;
        }
        Form::Read { .. } if r.data.is_empty() => w.write_all(&chunk_header(0, r.cookie, 0)).await?,
        Form::Read { offset } => {
            w.write_all(&chunk_header(REPLY_TYPE_OFFSET_DATA, r.cookie, 8 + r.data.len() as u32)).await?;
            w.write_all(&offset.to_be_bytes()).await?;
            w.write_all(&r.data).await?;
        }
        Form::Status => {
            w.write_all(&chunk_header(REPLY_TYPE_BLOCK_STATUS, r.cookie, 4 + r.data.len() as u32)).await?;
            w.write_all(&CONTEXT_ID_ALLOCATION.to_be_bytes()).await?;
            w.write_all(&r.data).await?;
        }
    }
    Ok(())
}

/// Maps the volume layer's errors to NBD errnos.
pub fn errno(e: &VolumeError) -> u32 {
    match e {
        VolumeError::OutOfRange { .. } => EINVAL,
        VolumeError::ReadOnly => EPERM,
        VolumeError::NoSpace { .. } => ENOSPC,
        VolumeError::Fenced { .. } | VolumeError::LeaseLost => EIO,
        _ => EIO,
    }
}

struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// Checks a request against the export before running it; an errno if it must be refused.
fn validate<D: BlockDevice>(d: &D, r: &Request, features: Features) -> Option<u32> {
    let end = r.offset.checked_add(r.len as u64);
    let in_range = end.is_some_and(|e| e <= d.size());
    if r.flags & CMD_FLAG_FAST_ZERO != 0 {
        if r.kind != CMD_WRITE_ZEROES {
            return Some(EINVAL);
        }
        // Zeroes that must stay allocated are written out: not fast.
        if r.flags & CMD_FLAG_NO_HOLE != 0 && !d.read_only() {
            return Some(ENOTSUP);
        }
    }
    match r.kind {
        CMD_BLOCK_STATUS => {
            if !features.allocation || r.len == 0 || !in_range {
                Some(EINVAL)
            } else {
                None
            }
        }
        CMD_READ => {
            if r.len > MAX_BLOCK {
                Some(EOVERFLOW)
            } else if !in_range {
                Some(EINVAL)
            } else {
                None
            }
        }
        CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM => {
            if d.read_only() {
                Some(EPERM)
            } else if r.kind == CMD_WRITE && r.len > MAX_BLOCK {
                Some(EOVERFLOW)
            } else if !in_range {
                Some(if r.kind == CMD_TRIM { EINVAL } else { ENOSPC })
            } else {
                None
            }
        }
        CMD_FLUSH => None,
        _ => Some(EINVAL),
    }
}

/// Serves requests until the client disconnects; waits for in-flight requests.
pub async fn serve<S, D>(stream: S, device: Arc<D>, budget: Budget, features: Features) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    D: BlockDevice,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 << 10, wr);
        while let Some(first) = rx.recv().await {
            // What the batch's requests hold is given back once the batch is in the socket.
            let mut written = Vec::new();
            let mut next = Some(first);
            while let Some(r) = next.take() {
                write_reply(&mut w, &r).await?;
                written.push(r.held);
                next = rx.try_recv().ok();
            }
            w.flush().await?;
            drop(written);
        }
        Ok::<(), std::io::Error>(())
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let conn_bytes = Arc::new(Semaphore::new(CONNECTION_BYTES));
    let result = loop {
        let mut h = [0u8; 28];
        match rd.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
        let r = Request {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            cookie: u64::from_be_bytes(h[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(h[16..24].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(h[24..28].try_into().expect("4 bytes")),
        };
        if magic != REQUEST_MAGIC {
            tracing::warn!(magic = format!("{magic:#x}"), "bad request magic; closing the connection");
            break Ok(());
        }
        if r.kind == CMD_DISC {
            break Ok(());
        }
        let refused = validate(&*device, &r, features);
        let form = match r.kind {
            CMD_READ if features.structured => Form::Read { offset: r.offset },
            CMD_BLOCK_STATUS if features.structured => Form::Status,
            _ => Form::Simple,
        };
        if r.kind == CMD_WRITE && r.len > MAX_BLOCK {
            let _ = tx.send(Reply { cookie: r.cookie, error: EOVERFLOW, data: Bytes::new(), form, held: None });
            tracing::warn!(len = r.len, "write larger than the advertised maximum; closing the connection");
            break Ok(());
        }
        // Backpressure: a slot and the request's bytes are taken before its payload is read.
        let bytes = match r.kind {
            CMD_WRITE => r.len,
            CMD_READ if refused.is_none() => r.len,
            _ => 0,
        };
        let held = Held {
            _slot: slots.clone().acquire_owned().await.expect("semaphore never closed"),
            _conn: conn_bytes.clone().acquire_many_owned(bytes).await.expect("semaphore never closed"),
            _process: budget.take(bytes).await,
        };
        // A write's payload follows its header whatever we answer.
        let payload = if r.kind == CMD_WRITE {
            match read_payload(&mut rd, r.len as usize).await {
                Ok(buf) => buf.freeze(),
                Err(e) => break Err(e),
            }
        } else {
            Bytes::new()
        };
        if let Some(error) = refused {
            let _ = tx.send(Reply { cookie: r.cookie, error, data: Bytes::new(), form, held: Some(held) });
            continue;
        }
        let (device, tx) = (device.clone(), tx.clone());
        // One span per request (DEBUG), inside the connection's span (export and peer).
        let span = tracing::debug_span!("request", op = cmd_name(r.kind), offset = r.offset, len = r.len);
        tokio::spawn(
            async move {
                let mut reply = run(&*device, &r, payload, form).await;
                tracing::debug!(error = reply.error, "answered");
                reply.held = Some(held);
                let _ = tx.send(reply);
            }
            .instrument(span),
        );
    };
    drop(tx);
    // In-flight requests hold senders: the writer ends after their replies are out.
    match writer.await {
        Ok(Ok(())) => result,
        Ok(Err(e)) => Err(e),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }
}

/// The spec's name of a command, for logs.
fn cmd_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_WRITE_ZEROES => "write_zeroes",
        CMD_BLOCK_STATUS => "block_status",
        _ => "other",
    }
}

async fn run<D: BlockDevice>(d: &D, r: &Request, payload: Bytes, form: Form) -> Reply {
    let fua = r.flags & CMD_FLAG_FUA != 0;
    let res: Result<Bytes, VolumeError> = match r.kind {
        CMD_READ => d.read(r.offset, r.len).await,
        CMD_WRITE => d.write(r.offset, payload, fua).await.map(|()| Bytes::new()),
        CMD_FLUSH => d.flush().await.map(|()| Bytes::new()),
        CMD_TRIM => d.zero(r.offset, r.len as u64, fua).await.map(|()| Bytes::new()),
        CMD_WRITE_ZEROES if r.flags & CMD_FLAG_NO_HOLE != 0 => {
            write_zeroes_allocated(d, r.offset, r.len as u64, fua).await
        }
        CMD_WRITE_ZEROES => d.zero(r.offset, r.len as u64, fua).await.map(|()| Bytes::new()),
        CMD_BLOCK_STATUS => d
            .allocation(r.offset, r.len as u64)
            .await
            .map(|runs| descriptors(&runs, r.len, r.flags & CMD_FLAG_REQ_ONE != 0)),
        _ => unreachable!("validate() refuses other commands"),
    };
    match res {
        Ok(data) => Reply { cookie: r.cookie, error: 0, data, form, held: None },
        Err(e) => {
            tracing::warn!(cookie = r.cookie, kind = r.kind, offset = r.offset, len = r.len, error = %e, "request failed");
            Reply { cookie: r.cookie, error: errno(&e), data: Bytes::new(), form, held: None }
        }
    }
}

/// `base:allocation` descriptors (length, flags) of `runs`, at most `len`
/// bytes in all, at least one; just one with `one`.
fn descriptors(runs: &[torus_volume::device::Run], len: u32, one: bool) -> Bytes {
    let mut out = Vec::with_capacity(8 * runs.len().max(1));
    let mut left = len as u64;
    for run in runs {
        let n = run.len.min(left);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&(n as u32).to_be_bytes());
        out.extend_from_slice(&(if run.data { 0 } else { STATE_HOLE | STATE_ZERO }).to_be_bytes());
        left -= n;
        if one {
            break;
        }
    }
    if out.is_empty() {
        // A device that described nothing: say "data" for the whole range (always safe).
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
    }
    Bytes::from(out)
}

/// WRITE_ZEROES with NO_HOLE: the client wants the space kept allocated, so write real zeroes.
async fn write_zeroes_allocated<D: BlockDevice>(d: &D, offset: u64, len: u64, fua: bool) -> Result<Bytes, VolumeError> {
    const CHUNK: u64 = 1 << 20;
    let zeros = Bytes::from(vec![0u8; CHUNK.min(len) as usize]);
    let mut pos = offset;
    while pos < offset + len {
        let n = CHUNK.min(offset + len - pos);
        d.write(pos, zeros.slice(..n as usize), fua).await?;
        pos += n;
    }
    Ok(Bytes::new())
}

/// Reads exactly `len` bytes into a new buffer, straight into its spare
/// capacity (no zeroing of up to 32 MiB first).
async fn read_payload<R: tokio::io::AsyncRead + Unpin>(rd: &mut R, len: usize) -> std::io::Result<BytesMut> {
    let mut buf = BytesMut::with_capacity(len);
    let mut rest = rd.take(len as u64);
    while buf.len() < len {
        if rest.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed mid-request"));
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;
    use torus_volume::device::MemDevice;

    async fn request(c: &mut DuplexStream, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
        h.extend_from_slice(&flags.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        c.write_all(&h).await.expect("send");
    }

    /// A structured chunk: (flags, type, cookie, payload).
    async fn chunk(c: &mut DuplexStream) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(c.read_u32().await.expect("magic"), STRUCTURED_REPLY_MAGIC);
        let (flags, kind, cookie, len) = (
            c.read_u16().await.expect("flags"),
            c.read_u16().await.expect("type"),
            c.read_u64().await.expect("cookie"),
            c.read_u32().await.expect("length"),
        );
        let mut payload = vec![0u8; len as usize];
        c.read_exact(&mut payload).await.expect("payload");
        (flags, kind, cookie, payload)
    }

    /// A server of 1 MiB whose first 64 KiB hold 0x5a and the rest was never written.
    async fn start(features: Features) -> DuplexStream {
        let (client, server) = tokio::io::duplex(1 << 22);
        let dev = Arc::new(MemDevice::new(1 << 20));
        dev.write(0, Bytes::from(vec![0x5a; 64 << 10]), false).await.expect("write");
        tokio::spawn(serve(server, dev, Budget::default(), features));
        client
    }

    #[tokio::test]
    async fn block_status_answers_base_allocation_and_reads_come_in_one_data_chunk() {
        let mut c = start(Features { structured: true, allocation: true }).await;
        request(&mut c, 0, CMD_BLOCK_STATUS, 1, 0, 1 << 20).await;
        let (flags, kind, cookie, p) = chunk(&mut c).await;
        assert_eq!((flags, kind, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 1));
        let words: Vec<u32> = p.chunks_exact(4).map(|w| u32::from_be_bytes(w.try_into().expect("4"))).collect();
        assert_eq!(words, [CONTEXT_ID_ALLOCATION, 64 << 10, 0, (1 << 20) - (64 << 10), STATE_HOLE | STATE_ZERO]);
        // REQ_ONE: one descriptor.
        request(&mut c, CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 2, 0, 1 << 20).await;
        assert_eq!(chunk(&mut c).await.3.len(), 4 + 8);
        // Past the end: an error chunk with EINVAL.
        request(&mut c, 0, CMD_BLOCK_STATUS, 3, 1 << 20, 4096).await;
        let (_, kind, _, p) = chunk(&mut c).await;
        assert_eq!((kind, &p[..4]), (REPLY_TYPE_ERROR, &EINVAL.to_be_bytes()[..]));
        // A read: one OFFSET_DATA chunk.
        request(&mut c, 0, CMD_READ, 4, 4096, 512).await;
        let (flags, kind, cookie, p) = chunk(&mut c).await;
        assert_eq!((flags, kind, cookie, p.len()), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 4, 8 + 512));
        assert_eq!(u64::from_be_bytes(p[..8].try_into().expect("8")), 4096);
        assert!(p[8..].iter().all(|&b| b == 0x5a));
    }

    async fn simple(c: &mut DuplexStream) -> (u32, u64) {
        assert_eq!(c.read_u32().await.expect("magic"), SIMPLE_REPLY_MAGIC);
        (c.read_u32().await.expect("error"), c.read_u64().await.expect("cookie"))
    }

    #[tokio::test]
    async fn fast_zero_is_refused_where_it_would_be_slow_and_block_status_needs_a_context() {
        let mut c = start(Features::default()).await;
        request(&mut c, CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 1, 0, 65536).await;
        assert_eq!(simple(&mut c).await, (0, 1), "fast zeroing with holes allowed");
        request(&mut c, CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 2, 0, 65536).await;
        assert_eq!(simple(&mut c).await, (ENOTSUP, 2), "zeroes kept allocated are not fast");
        request(&mut c, CMD_FLAG_FAST_ZERO, CMD_TRIM, 3, 0, 4096).await;
        assert_eq!(simple(&mut c).await, (EINVAL, 3), "FAST_ZERO only goes with WRITE_ZEROES");
        request(&mut c, 0, CMD_BLOCK_STATUS, 4, 0, 4096).await;
        assert_eq!(simple(&mut c).await, (EINVAL, 4), "no metadata context was negotiated");
    }
}
