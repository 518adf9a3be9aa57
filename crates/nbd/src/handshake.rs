//! The fixed newstyle handshake and option haggling.
//!
//! Every malformed input gets either an error reply (when the option stream
//! is still in sync) or a closed connection (when it is not: bad magic,
//! unknown client flags, an option longer than we accept).

use crate::consts::*;
use crate::exports::{ExportError, Exports};
use std::sync::Arc;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use torus_volume::BlockDevice;

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("client sent unknown flags {0:#x}")]
    ClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    BadMagic(u64),
    #[error("option {option} is {len} bytes, more than we accept")]
    OptionTooLong { option: u32, len: u32 },
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("export {name:?} could not be opened: {reason}")]
    OpenFailed { name: String, reason: String },
    #[error("client asked for an export with NBD_OPT_EXPORT_NAME before TLS, which this server requires")]
    TlsRequired,
}

/// What the server does about TLS during option haggling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tls {
    /// NBD_OPT_STARTTLS is accepted.
    pub offered: bool,
    /// Every option but STARTTLS and ABORT is refused (NBD_REP_ERR_TLS_REQD) until TLS is on.
    pub required: bool,
    /// The connection is already encrypted (a second STARTTLS is invalid).
    pub active: bool,
}

/// How option haggling ended.
pub enum Step<D> {
    /// An export was chosen, or (`None`) the client ended the handshake cleanly.
    Done(Option<Negotiated<D>>),
    /// The client asked for TLS and was told yes: the TLS handshake follows on
    /// this stream, then haggling starts again ([`haggle`], with `active`).
    StartTls,
}

/// What the handshake ended with.
pub struct Negotiated<D> {
    pub name: String,
    pub device: Arc<D>,
    pub features: Features,
}

/// What the client and the server agreed on for the transmission phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// NBD_OPT_STRUCTURED_REPLY: reads are answered with structured replies.
    pub structured: bool,
    /// `base:allocation` was selected for this export: NBD_CMD_BLOCK_STATUS works.
    pub allocation: bool,
}

/// The flags of a writable or read-only export (WRITE_ZEROES is fast
/// whenever holes may be made, hence FAST_ZERO).
fn flags_for(read_only: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    if read_only {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    f
}

pub fn transmission_flags<D: BlockDevice>(d: &D) -> u16 {
    let mut f = flags_for(d.read_only());
    if d.flush_covers_all_handles() {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    f
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&kind.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf).await?;
    w.flush().await
}

async fn error_reply<W: AsyncWrite + Unpin>(w: &mut W, option: u32, kind: u32, msg: &str) -> std::io::Result<()> {
    tracing::debug!(option, kind, msg, "option refused");
    reply(w, option, kind, msg.as_bytes()).await
}

fn export_error_kind(e: &ExportError) -> u32 {
    match e {
        ExportError::NotFound(_) => REP_ERR_UNKNOWN,
        ExportError::Busy(_) => REP_ERR_POLICY,
        ExportError::Unavailable(_) => REP_ERR_SHUTDOWN,
    }
}

/// Parses NBD_OPT_INFO/GO data: (name, requested info types).
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + name_len)?;
    let rest = &data[4 + name_len..];
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let reqs = rest.get(2..)?;
    if reqs.len() != n * 2 {
        return None;
    }
    let name = String::from_utf8(name.to_vec()).ok()?;
    Some((name, reqs.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

/// Parses NBD_OPT_LIST/SET_META_CONTEXT data: (export name, queries).
fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let u32_at = |d: &[u8], at: usize| Some(u32::from_be_bytes(d.get(at..at + 4)?.try_into().ok()?) as usize);
    let name_len = u32_at(data, 0)?;
    let name = String::from_utf8(data.get(4..4 + name_len)?.to_vec()).ok()?;
    let mut at = 4 + name_len;
    let n = u32_at(data, at)?;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        let len = u32_at(data, at)?;
        queries.push(String::from_utf8(data.get(at + 4..at + 4 + len)?.to_vec()).ok()?);
        at += 4 + len;
    }
    (at == data.len()).then_some((name, queries))
}

/// Whether a LIST_META_CONTEXT query names `base:allocation` (empty: all contexts).
fn lists_allocation(queries: &[String]) -> bool {
    queries.is_empty() || queries.iter().any(|q| q == "base:" || q == CONTEXT_BASE_ALLOCATION)
}

/// Runs the handshake without TLS; `Ok(None)` when the client ended it cleanly without an export.
pub async fn negotiate<S, E>(s: &mut S, exports: &E) -> Result<Option<Negotiated<E::Device>>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    E: Exports,
{
    let no_zeroes = greet(s).await?;
    match haggle(s, exports, no_zeroes, Tls::default()).await? {
        Step::Done(n) => Ok(n),
        Step::StartTls => unreachable!("STARTTLS is refused when TLS is not offered"),
    }
}

/// Sends the server's greeting and reads the client's flags; returns whether
/// the client asked for no zero padding (NBD_FLAG_C_NO_ZEROES).
pub async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<bool, HandshakeError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    s.flush().await?;

    let client_flags = s.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(HandshakeError::ClientFlags(client_flags));
    }
    Ok(client_flags & CLIENT_NO_ZEROES != 0)
}

/// Option haggling, until an export is chosen, the client leaves, or TLS starts.
pub async fn haggle<S, E>(s: &mut S, exports: &E, no_zeroes: bool, tls: Tls) -> Result<Step<E::Device>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    E: Exports,
{
    let mut structured = false;
    // The export a SET_META_CONTEXT was for, and whether it selected base:allocation.
    let mut selected: Option<(String, bool)> = None;
    let features = |name: &str, structured: bool, selected: &Option<(String, bool)>| Features {
        structured,
        allocation: structured && selected.as_ref().is_some_and(|(n, a)| n == name && *a),
    };

    loop {
        let magic = s.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadMagic(magic));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION_LEN {
            // We cannot skip this much safely; tell the client, then give up on it.
            let _ = error_reply(s, option, REP_ERR_TOO_BIG, "option data too long").await;
            return Err(HandshakeError::OptionTooLong { option, len });
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;

        if tls.required && !tls.active && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                // No error can be sent in reply to EXPORT_NAME: the spec says close the connection.
                return Err(HandshakeError::TlsRequired);
            }
            error_reply(s, option, REP_ERR_TLS_REQD, "this server requires TLS: use NBD_OPT_STARTTLS").await?;
            continue;
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                // No way to send an error here: the spec says close the connection.
                let device = match exports.open(&name).await {
                    Ok(d) => d,
                    Err(ExportError::NotFound(_)) => return Err(HandshakeError::UnknownExport(name)),
                    Err(e) => return Err(HandshakeError::OpenFailed { name, reason: e.to_string() }),
                };
                let mut buf = Vec::with_capacity(10 + 124);
                buf.extend_from_slice(&device.size().to_be_bytes());
                buf.extend_from_slice(&transmission_flags(&*device).to_be_bytes());
                if !no_zeroes {
                    buf.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&buf).await?;
                s.flush().await?;
                let features = features(&name, structured, &selected);
                return Ok(Step::Done(Some(Negotiated { name, device, features })));
            }
            OPT_ABORT => {
                let _ = reply(s, option, REP_ACK, &[]).await;
                return Ok(Step::Done(None));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    error_reply(s, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                match exports.list().await {
                    Ok(names) => {
                        for n in names {
                            let mut d = Vec::with_capacity(4 + n.len());
                            d.extend_from_slice(&(n.len() as u32).to_be_bytes());
                            d.extend_from_slice(n.as_bytes());
                            reply(s, option, REP_SERVER, &d).await?;
                        }
                        reply(s, option, REP_ACK, &[]).await?;
                    }
                    Err(e) => error_reply(s, option, export_error_kind(&e), &e.to_string()).await?,
                }
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info_request(&data) else {
                    error_reply(s, option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request").await?;
                    continue;
                };
                // INFO only describes; GO opens (and, for writers, takes the volume's lock).
                let (device, size, flags) = if option == OPT_GO {
                    match exports.open(&name).await {
                        Ok(d) => {
                            let (size, flags) = (d.size(), transmission_flags(&*d));
                            (Some(d), size, flags)
                        }
                        Err(e) => {
                            error_reply(s, option, export_error_kind(&e), &e.to_string()).await?;
                            continue;
                        }
                    }
                } else {
                    match exports.describe(&name).await {
                        Ok(info) => (None, info.size, flags_for(info.read_only) | TFLAG_CAN_MULTI_CONN),
                        Err(e) => {
                            error_reply(s, option, export_error_kind(&e), &e.to_string()).await?;
                            continue;
                        }
                    }
                };
                let mut export = Vec::with_capacity(12);
                export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                export.extend_from_slice(&size.to_be_bytes());
                export.extend_from_slice(&flags.to_be_bytes());
                reply(s, option, REP_INFO, &export).await?;
                let mut bs = Vec::with_capacity(14);
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs.extend_from_slice(&MIN_BLOCK.to_be_bytes());
                bs.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                bs.extend_from_slice(&MAX_BLOCK.to_be_bytes());
                reply(s, option, REP_INFO, &bs).await?;
                if requests.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    reply(s, option, REP_INFO, &d).await?;
                }
                if requests.contains(&INFO_DESCRIPTION) {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(format!("Torus volume {name}").as_bytes());
                    reply(s, option, REP_INFO, &d).await?;
                }
                reply(s, option, REP_ACK, &[]).await?;
                if let Some(device) = device {
                    let features = features(&name, structured, &selected);
                    return Ok(Step::Done(Some(Negotiated { name, device, features })));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !structured {
                    error_reply(s, option, REP_ERR_INVALID, "negotiate structured replies first").await?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&data) else {
                    error_reply(s, option, REP_ERR_INVALID, "malformed meta context request").await?;
                    continue;
                };
                if let Err(e) = exports.describe(&name).await {
                    error_reply(s, option, export_error_kind(&e), &e.to_string()).await?;
                    continue;
                }
                let (wanted, id) = if option == OPT_LIST_META_CONTEXT {
                    (lists_allocation(&queries), 0)
                } else {
                    let wanted = queries.iter().any(|q| q == CONTEXT_BASE_ALLOCATION);
                    selected = Some((name, wanted));
                    (wanted, CONTEXT_ID_ALLOCATION)
                };
                if wanted {
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(CONTEXT_BASE_ALLOCATION.as_bytes());
                    reply(s, option, REP_META_CONTEXT, &d).await?;
                }
                reply(s, option, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS if !tls.offered => {
                error_reply(s, option, REP_ERR_UNSUP, "TLS is not enabled on this server (torusblk --tls-dir)").await?
            }
            OPT_STARTTLS if tls.active => error_reply(s, option, REP_ERR_INVALID, "TLS is already on").await?,
            OPT_STARTTLS if !data.is_empty() => {
                error_reply(s, option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data").await?
            }
            OPT_STARTTLS => {
                reply(s, option, REP_ACK, &[]).await?;
                return Ok(Step::StartTls);
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                error_reply(s, option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data").await?
            }
            OPT_STRUCTURED_REPLY => {
                structured = true;
                reply(s, option, REP_ACK, &[]).await?;
            }
            _ => error_reply(s, option, REP_ERR_UNSUP, "unsupported option").await?,
        }
    }
}
