//! A block device that records each request's figures — op, bytes, how long
//! it took, whether it failed — labelled by volume (`torus_volume_*` in a
//! client such as torusblk). Series are kept while the volume is open in
//! the process: the last handle's drop forgets them.

use crate::device::{BlockDevice, Run};
use crate::VolumeError;
use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use std::sync::Arc;
use std::time::Instant;
use torus_metrics::ops::{OpHandles, OpStats};

/// The labels of a client's request figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeOp {
    pub volume: String,
    pub op: &'static str,
}

/// Ops by index; TRIM and WRITE_ZEROES both count as "zero".
const OPS: [&str; 5] = ["read", "write", "flush", "zero", "block_status"];

/// The figures of every volume a process serves.
pub struct VolumeStats {
    pub ops: OpStats<VolumeOp>,
}

impl VolumeStats {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Arc<VolumeStats> {
        let ops = OpStats::register(registry, "torus_volume", "client requests (NBD, FUSE)");
        Arc::new(VolumeStats { ops })
    }

    /// Wraps a device of volume `name`.
    pub fn measure<D: BlockDevice>(self: &Arc<Self>, name: &str, inner: Arc<D>) -> Measured<D> {
        let ops = OPS.map(|op| self.ops.handles(&VolumeOp { volume: name.to_string(), op }));
        Measured { inner, ops }
    }
}

pub struct Measured<D> {
    inner: Arc<D>,
    /// The series of each op of `OPS`.
    ops: [OpHandles; 5],
}

impl<D> Measured<D> {
    fn record<T>(&self, op: usize, bytes: u64, started: Instant, res: &Result<T, VolumeError>) {
        self.ops[op].record(bytes, started.elapsed(), res.is_ok());
    }
}

impl<D: BlockDevice> BlockDevice for Measured<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn flush_covers_all_handles(&self) -> bool {
        self.inner.flush_covers_all_handles()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, VolumeError> {
        let t = Instant::now();
        let r = self.inner.read(offset, len).await;
        self.record(0, len as u64, t, &r);
        r
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
        let (t, n) = (Instant::now(), data.len() as u64);
        let r = self.inner.write(offset, data, fua).await;
        self.record(1, n, t, &r);
        r
    }
    async fn flush(&self) -> Result<(), VolumeError> {
        let t = Instant::now();
        let r = self.inner.flush().await;
        self.record(2, 0, t, &r);
        r
    }
    async fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        let t = Instant::now();
        let r = self.inner.zero(offset, len, fua).await;
        self.record(3, len, t, &r);
        r
    }
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Run>, VolumeError> {
        let t = Instant::now();
        let r = self.inner.allocation(offset, len).await;
        self.record(4, 0, t, &r);
        r
    }
}
