//! What a server offers: the [`Exports`] trait that names, describes and
//! opens devices, and how it says no ([`ExportError`]). The handshake and the
//! listener both use it.

use std::future::Future;
use std::sync::Arc;
use thiserror::Error;
use torus_volume::BlockDevice;

#[derive(Debug, Error)]
pub enum ExportError {
    #[error("{0}")]
    NotFound(String),
    /// Held by another writer.
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Clone, Copy, Debug)]
pub struct ExportInfo {
    pub size: u64,
    pub read_only: bool,
}

/// The set of exports a server offers.
pub trait Exports: Send + Sync + 'static {
    type Device: BlockDevice;
    fn list(&self) -> impl Future<Output = Result<Vec<String>, ExportError>> + Send;
    /// Describes an export without opening it (NBD_OPT_INFO).
    fn describe(&self, name: &str) -> impl Future<Output = Result<ExportInfo, ExportError>> + Send;
    /// Opens an export for a connection (NBD_OPT_GO, NBD_OPT_EXPORT_NAME).
    fn open(&self, name: &str) -> impl Future<Output = Result<Arc<Self::Device>, ExportError>> + Send;
}
