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
    /// Which parts of `[offset, offset+len)` hold data: consecutive runs from
    /// `offset`, covering at least its first byte and at most the range
    /// (fewer when looking further would cost much). The default says
    /// "data" for the whole range, which is always safe.
    fn allocation(&self, _offset: u64, len: u64) -> impl Future<Output = Result<Vec<Run>, VolumeError>> + Send {
        async move { Ok(vec![Run { len, data: true }]) }
    }
}

/// A run of bytes that all hold data, or all read as zeroes with nothing
/// stored (never written, trimmed or zeroed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub len: u64,
    pub data: bool,
}

/// Appends a run, merging it with the last one when they are alike.
pub fn push_run(runs: &mut Vec<Run>, run: Run) {
    match runs.last_mut() {
        Some(last) if last.data == run.data => last.len += run.len,
        _ if run.len > 0 => runs.push(run),
        _ => {}
    }
}

/// A device in memory, for tests of the front ends: its bytes, and which
/// 4 KiB blocks hold data (written; zeroing whole blocks makes them holes
/// again), so that `allocation` answers like a volume's.
pub struct MemDevice {
    state: std::sync::Mutex<(Vec<u8>, Vec<bool>)>,
}

impl MemDevice {
    const BLOCK: usize = 4096;

    /// `size` bytes of zeroes, nothing allocated.
    pub fn new(size: usize) -> MemDevice {
        MemDevice { state: std::sync::Mutex::new((vec![0; size], vec![false; size.div_ceil(Self::BLOCK)])) }
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, VolumeError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(VolumeError::OutOfRange { offset, len, size }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<u8>, Vec<bool>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.lock().0.len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn flush_covers_all_handles(&self) -> bool {
        true
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, VolumeError> {
        let r = self.range(offset, len as u64)?;
        Ok(Bytes::copy_from_slice(&self.lock().0[r]))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), VolumeError> {
        let r = self.range(offset, data.len() as u64)?;
        let mut st = self.lock();
        st.0[r.clone()].copy_from_slice(&data);
        for b in r.start / Self::BLOCK..r.end.div_ceil(Self::BLOCK) {
            st.1[b] = true;
        }
        Ok(())
    }
    async fn zero(&self, offset: u64, len: u64, _fua: bool) -> Result<(), VolumeError> {
        let r = self.range(offset, len)?;
        let mut st = self.lock();
        st.0[r.clone()].fill(0);
        for b in r.start.div_ceil(Self::BLOCK)..r.end / Self::BLOCK {
            st.1[b] = false;
        }
        Ok(())
    }
    async fn flush(&self) -> Result<(), VolumeError> {
        Ok(())
    }
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Run>, VolumeError> {
        let r = self.range(offset, len)?;
        let st = self.lock();
        let mut runs = Vec::new();
        let mut pos = r.start;
        while pos < r.end {
            let next = ((pos / Self::BLOCK + 1) * Self::BLOCK).min(r.end);
            push_run(&mut runs, Run { len: (next - pos) as u64, data: st.1[pos / Self::BLOCK] });
            pos = next;
        }
        Ok(runs)
    }
}
