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
}

/// What the handshake ended with.
pub struct Negotiated<D> {
    pub name: String,
    pub device: Arc<D>,
}

pub fn transmission_flags<D: BlockDevice>(d: &D) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    if d.read_only() {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
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

/// Runs the handshake; `Ok(None)` when the client ended it cleanly without an export.
pub async fn negotiate<S, E>(s: &mut S, exports: &E) -> Result<Option<Negotiated<E::Device>>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    E: Exports,
{
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
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;

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
                return Ok(Some(Negotiated { name, device }));
            }
            OPT_ABORT => {
                let _ = reply(s, option, REP_ACK, &[]).await;
                return Ok(None);
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
                        Ok(info) => {
                            let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
                            flags |= if info.read_only {
                                TFLAG_READ_ONLY
                            } else {
                                TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
                            };
                            (None, info.size, flags)
                        }
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
                    return Ok(Some(Negotiated { name, device }));
                }
            }
            OPT_STARTTLS => error_reply(s, option, REP_ERR_UNSUP, "TLS is not supported by this server").await?,
            OPT_STRUCTURED_REPLY => {
                error_reply(s, option, REP_ERR_UNSUP, "structured replies are not supported").await?
            }
            _ => error_reply(s, option, REP_ERR_UNSUP, "unsupported option").await?,
        }
    }
}
