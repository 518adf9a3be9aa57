//! torus-nbd: the NBD protocol, server side, to the published specification
//! (NetworkBlockDevice/nbd doc/proto.md).
//!
//! - [`consts`]: magics, options, replies, commands, flags, errnos.
//! - [`handshake`]: the fixed newstyle handshake and option haggling
//!   (EXPORT_NAME, GO, INFO, LIST, ABORT, STRUCTURED_REPLY,
//!   LIST/SET_META_CONTEXT with `base:allocation`, STARTTLS; others answered ERR_UNSUP).
//! - [`transmission`]: pipelined requests with out-of-order replies, simple
//!   or structured: READ, WRITE (FUA), FLUSH, TRIM, WRITE_ZEROES (NO_HOLE,
//!   FUA, FAST_ZERO), BLOCK_STATUS, DISC.
//! - [`exports`]: the [`Exports`] trait that names and opens devices.
//! - [`server`]: the listener, and TLS (x509, mutual) when a client asks or must.
//!
//! Depends on torus-volume only for the `BlockDevice` trait and its error
//! type; knows nothing of etcd, placement or peers.

pub mod consts;
pub mod exports;
pub mod handshake;
pub mod server;
pub mod transmission;

pub use exports::{ExportError, ExportInfo, Exports};
pub use server::serve;
