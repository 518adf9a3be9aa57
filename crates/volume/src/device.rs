//! The block-device interface that front ends (NBD now, CSI later) serve.

use crate::VolumeError;
use bytes::Bytes;
use std::future::Future;

/// A byte-addressed device with flush semantics: every write completed before
/// a `flush` is durable when it returns; a write with `fua` is durable when it returns.
pub trait BlockDevice: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Whether a flush on any handle makes writes from every handle durable
    /// (NBD's CAN_MULTI_CONN).
    fn flush_covers_all_handles(&self) -> bool;
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, VolumeError>> + Send;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<(), VolumeError>> + Send;
    /// Zeroes a range, freeing space where whole blocks are covered (TRIM and WRITE_ZEROES).
    fn zero(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = Result<(), VolumeError>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), VolumeError>> + Send;
}
