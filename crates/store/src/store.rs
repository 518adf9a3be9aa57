//! The store: extent lookup and caching, capacity accounting, fencing, and
//! group-committed flushes.
//!
//! Directory layout under the store root:
//! `extents/<volume id>/<extent index>.{dat,sum}` and `fences/<volume id>`.

use crate::extent::{allocated, Extent};
use crate::fence::Fences;
use crate::io::{Disk, LocalDisk};
use crate::{Result, StoreError, MAX_EXTENT_SIZE};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use torus_types::{Epoch, ExtentId, VolumeId};

#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Bytes this node offers; writes that would allocate past it fail with `NoSpace`.
    pub capacity: u64,
    /// Extent files kept open at once (dirty ones are never closed before their flush).
    pub max_open_extents: usize,
    /// Where the extents' bytes go: the local filesystem, or a disk that fails on purpose in tests.
    pub disk: Arc<dyn Disk>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { capacity: u64::MAX, max_open_extents: 1024, disk: Arc::new(LocalDisk) }
    }
}

/// What a node holds of one extent (for listings and placement checks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentStat {
    pub id: ExtentId,
    pub data_blocks: u64,
}

pub struct Store {
    root: PathBuf,
    opts: StoreOptions,
    open: Mutex<HashMap<ExtentId, Arc<Extent>>>,
    /// Extents being opened, a gate each: a second open of the same extent
    /// waits for the first, opens of other extents go ahead (opening verifies
    /// a dirty extent block by block, which takes a while).
    opening: Mutex<HashMap<ExtentId, Arc<Mutex<()>>>>,
    /// Bumped by every deletion: an open that raced one opens again.
    deletions: AtomicU64,
    dirty: Mutex<HashMap<ExtentId, Arc<Extent>>>,
    /// Extents a flush made durable whose header still says dirty: cleared by
    /// `settle` once they have rested (see there).
    resting: Mutex<HashMap<ExtentId, Resting>>,
    /// Bumped by every `settle`.
    settles: AtomicU64,
    used: AtomicU64,
    fences: Fences,
    flush_lock: tokio::sync::Mutex<()>,
    flush_requests: AtomicU64,
    flushed_upto: AtomicU64,
    failed: Mutex<Option<String>>,
}

/// An extent made durable by a flush, its dirty mark not yet cleared.
struct Resting {
    ext: Arc<Extent>,
    /// Its generation when the flush synced it.
    generation: u64,
    /// `settles` then.
    since: u64,
}

/// What an open at an extent's gate found.
enum Opened {
    /// The extent (`None`: it does not exist and was not to be created).
    Here(Option<Arc<Extent>>),
    /// A deletion ran meanwhile (the files opened may be gone): open again.
    Raced,
}

impl Store {
    /// Opens (creating if needed) the store under `root`.
    pub fn open(root: &Path, opts: StoreOptions) -> Result<Store> {
        let ext_dir = root.join("extents");
        std::fs::create_dir_all(&ext_dir).map_err(|e| StoreError::io("create", &ext_dir, e))?;
        let fences = Fences::open(root.join("fences"))?;
        let store = Store {
            root: root.to_path_buf(),
            opts,
            open: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            deletions: AtomicU64::new(0),
            dirty: Mutex::new(HashMap::new()),
            resting: Mutex::new(HashMap::new()),
            settles: AtomicU64::new(0),
            used: AtomicU64::new(0),
            fences,
            flush_lock: tokio::sync::Mutex::new(()),
            flush_requests: AtomicU64::new(0),
            flushed_upto: AtomicU64::new(0),
            failed: Mutex::new(None),
        };
        let used = store.walk()?.iter().map(|(_, dat)| allocated(dat)).sum();
        store.used.store(used, Ordering::Relaxed);
        Ok(store)
    }

    pub fn capacity(&self) -> u64 {
        self.opts.capacity
    }

    /// Bytes of data stored (allocated blocks).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// What this store can really hold: its capacity, or less if the
    /// filesystem under it (shared with others, or smaller than offered)
    /// has less free space than the capacity leaves.
    pub fn effective_capacity(&self) -> u64 {
        let used = self.used();
        match disk_available(&self.root) {
            Some(free) => self.opts.capacity.min(used.saturating_add(free)),
            None => self.opts.capacity,
        }
    }

    fn vol_dir(&self, vol: VolumeId) -> PathBuf {
        self.root.join("extents").join(vol.to_string())
    }

    /// Every extent on disk: (id, the file holding its data).
    fn walk(&self) -> Result<Vec<(ExtentId, PathBuf)>> {
        let mut out = Vec::new();
        let ext_dir = self.root.join("extents");
        let vols = std::fs::read_dir(&ext_dir).map_err(|e| StoreError::io("list", &ext_dir, e))?;
        for v in vols.flatten() {
            let Some(vol) = v.file_name().to_str().and_then(|s| s.parse().ok()).map(VolumeId) else {
                continue;
            };
            let files = std::fs::read_dir(v.path()).map_err(|e| StoreError::io("list", &v.path(), e))?;
            for f in files.flatten() {
                let name = f.file_name();
                // `.extent` (format 2) or `.dat` (format 1, with its `.sum`).
                let stem = name.to_str().and_then(|s| s.strip_suffix(".extent").or_else(|| s.strip_suffix(".dat")));
                let Some(idx) = stem.and_then(|s| s.parse().ok()) else {
                    continue;
                };
                out.push((ExtentId::new(vol, idx), f.path()));
            }
        }
        out.sort();
        out.dedup_by(|a, b| a.0 == b.0);
        Ok(out)
    }

    /// The volumes (layers) this node stores anything of.
    pub fn volumes(&self) -> Result<Vec<VolumeId>> {
        let mut out: Vec<VolumeId> = self.walk()?.into_iter().map(|(id, _)| id.volume).collect();
        out.dedup();
        Ok(out)
    }

    /// Lists the extents this node holds, with their count of data blocks.
    pub fn extents(&self) -> Result<Vec<ExtentStat>> {
        let mut out = Vec::new();
        for (id, _) in self.walk()? {
            if let Some(ext) = self.extent(id, false)? {
                out.push(ExtentStat { id, data_blocks: ext.data_blocks() });
            }
        }
        Ok(out)
    }

    /// A write that failed with an I/O error (not a full disk) leaves the
    /// disk in doubt: the store refuses further writes and flushes, as after a
    /// failed flush (reads, each verified against its checksum, go on),
    /// so that clients write around it and its copies are caught up later.
    fn fail_on_io_error<T>(&self, res: Result<T>) -> Result<T> {
        if let Err(e @ StoreError::Io { source, .. }) = &res {
            if source.kind() != std::io::ErrorKind::StorageFull {
                tracing::error!(error = %e, "a data write failed; the store refuses further I/O");
                let reason = e.to_string();
                *self.failed.lock().expect("failed flag poisoned") = Some(reason.clone());
                // Answered as a failed store, so that the writer writes around this node.
                return Err(StoreError::Failed { reason });
            }
        }
        res
    }

    /// Why the store failed (it then answers FAILED to everything), if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().expect("failed flag poisoned").clone()
    }

    fn check_failed(&self) -> Result<()> {
        match &*self.failed.lock().expect("failed flag poisoned") {
            Some(reason) => Err(StoreError::Failed { reason: reason.clone() }),
            None => Ok(()),
        }
    }

    /// The open extent `id`, opened (or with `create`, created) if needed.
    /// No store-wide lock is held while an extent is opened.
    fn extent(&self, id: ExtentId, create: bool) -> Result<Option<Arc<Extent>>> {
        loop {
            let gate = {
                let open = self.open.lock().expect("extent map poisoned");
                if let Some(e) = open.get(&id) {
                    return Ok(Some(e.clone()));
                }
                self.opening.lock().expect("opening map poisoned").entry(id).or_default().clone()
            };
            let _gate = gate.lock().expect("extent gate poisoned");
            let res = self.open_at_gate(id, create);
            // The gate goes when nobody else waits at it (clones are made only
            // under this lock: the map's and ours are the last two).
            let mut opening = self.opening.lock().expect("opening map poisoned");
            if Arc::strong_count(&gate) == 2 && opening.get(&id).is_some_and(|g| Arc::ptr_eq(g, &gate)) {
                opening.remove(&id);
            }
            match res? {
                Opened::Here(ext) => return Ok(ext),
                Opened::Raced => continue,
            }
        }
    }

    /// Opens an extent while holding its gate.
    fn open_at_gate(&self, id: ExtentId, create: bool) -> Result<Opened> {
        let seen = self.deletions.load(Ordering::SeqCst);
        if let Some(e) = self.open.lock().expect("extent map poisoned").get(&id) {
            return Ok(Opened::Here(Some(e.clone())));
        }
        let Some(ext) = self.open_extent(id, create)? else {
            return Ok(Opened::Here(None));
        };
        let mut open = self.open.lock().expect("extent map poisoned");
        if self.deletions.load(Ordering::SeqCst) != seen {
            return Ok(Opened::Raced);
        }
        if open.len() >= self.opts.max_open_extents {
            let dirty = self.dirty.lock().expect("dirty map poisoned");
            open.retain(|k, v| dirty.contains_key(k) || Arc::strong_count(v) > 1);
        }
        open.insert(id, ext.clone());
        Ok(Opened::Here(Some(ext)))
    }

    fn open_extent(&self, id: ExtentId, create: bool) -> Result<Option<Arc<Extent>>> {
        let dir = self.vol_dir(id.volume);
        if create && !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| StoreError::io("create", &dir, e))?;
            // The volume's directory must survive a power loss too: sync its parent.
            if let Some(parent) = dir.parent() {
                self.opts.disk.sync_dir(parent).map_err(|e| StoreError::io("sync", parent, e))?;
            }
        }
        let ext = Extent::open(&*self.opts.disk, &dir, id, create)?.map(Arc::new);
        if let Some(ext) = ext.as_ref().filter(|e| e.header_dirty()) {
            // Found dirty (recovered after a crash): the next flush and settle mark it
            // clean, else every start would verify it again.
            self.mark_dirty(id, ext);
        }
        Ok(ext)
    }

    /// The extent a change of `new_bytes` goes to, created if missing. An
    /// extent that would not fit is not created: a node that refuses it for
    /// lack of space must not appear to hold it (placement asks full nodes
    /// which extents they hold).
    fn extent_for(&self, id: ExtentId, new_bytes: u64) -> Result<Arc<Extent>> {
        if let Some(ext) = self.extent(id, false)? {
            return Ok(ext);
        }
        self.reserve(new_bytes)?;
        Ok(self.extent(id, true)?.expect("extent created on demand"))
    }

    /// Registers a changed extent for the next flush. Called after the change
    /// (even a failed one may have written part of it): the flush that removes
    /// it checks the extent's generation under this map's lock.
    fn mark_dirty(&self, id: ExtentId, ext: &Arc<Extent>) {
        self.dirty.lock().expect("dirty map poisoned").insert(id, ext.clone());
    }

    fn check_range(offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= MAX_EXTENT_SIZE => Ok(()),
            _ => Err(StoreError::OutOfRange { offset, len, max: MAX_EXTENT_SIZE }),
        }
    }

    /// Reads `buf.len()` bytes at `offset` within the extent; unwritten bytes read as zeroes.
    pub fn read(&self, id: ExtentId, offset: u64, buf: &mut [u8]) -> Result<()> {
        Self::check_range(offset, buf.len() as u64)?;
        match self.extent(id, false)? {
            Some(ext) => ext.read(offset, buf),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Like `read`, but fails with `Absent` if any block in the range was never
    /// written here: a replica that is still receiving its copy must not
    /// answer zeroes for data it has not got yet.
    pub fn read_present(&self, id: ExtentId, offset: u64, buf: &mut [u8]) -> Result<()> {
        Self::check_range(offset, buf.len() as u64)?;
        let absent = || StoreError::Absent { extent: id };
        let ext = self.extent(id, false)?.ok_or_else(absent)?;
        let states = ext.states();
        let bs = torus_types::BLOCK_SIZE as u64;
        let (first, end) = (offset / bs, (offset + buf.len() as u64).div_ceil(bs));
        if (first..end).any(|b| states.get(b as usize).is_none_or(|s| *s == crate::BlockState::Absent)) {
            return Err(absent());
        }
        ext.read(offset, buf)
    }

    fn reserve(&self, bytes: u64) -> Result<()> {
        let used = self.used.load(Ordering::Relaxed);
        if bytes > 0 && used.saturating_add(bytes) > self.opts.capacity {
            return Err(StoreError::NoSpace { used, capacity: self.opts.capacity });
        }
        Ok(())
    }

    fn account(&self, delta: i64) {
        if delta >= 0 {
            self.used.fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            let _ = self
                .used
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub((-delta) as u64)));
        }
    }

    /// Runs a mutation of one extent under the volume's fence.
    fn mutate(&self, id: ExtentId, epoch: Epoch, new_bytes: u64, f: impl Fn(&Extent) -> Result<i64>) -> Result<()> {
        self.check_failed()?;
        loop {
            let fence = self.fences.get(id.volume)?;
            let current = *fence.read().expect("fence poisoned");
            if epoch < current {
                return Err(StoreError::Fenced { volume: id.volume, epoch, current });
            }
            if epoch > current {
                self.fences.raise(id.volume, epoch)?;
                continue;
            }
            let guard = fence.read().expect("fence poisoned");
            if *guard != epoch {
                continue;
            }
            let ext = self.extent_for(id, new_bytes)?;
            let res = self.fail_on_io_error(f(&ext));
            self.mark_dirty(id, &ext);
            self.account(res?);
            return Ok(());
        }
    }

    /// Writes `data` at `offset` within the extent, for a writer of `epoch`.
    pub fn write(&self, id: ExtentId, offset: u64, data: &[u8], epoch: Epoch) -> Result<()> {
        Self::check_range(offset, data.len() as u64)?;
        let bs = torus_types::BLOCK_SIZE as u64;
        let span = (offset + data.len() as u64).div_ceil(bs) * bs - offset / bs * bs;
        self.mutate(id, epoch, span, |ext| ext.write(offset, data, &|b| self.reserve(b)))
    }

    /// Zeroes a range (TRIM and WRITE_ZEROES both land here), freeing whole blocks.
    pub fn zero(&self, id: ExtentId, offset: u64, len: u64, epoch: Epoch) -> Result<()> {
        Self::check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.mutate(id, epoch, 0, |ext| ext.zero(offset, len, &|b| self.reserve(b)))
    }

    /// Makes whole blocks of a range Absent (see `Extent::discard`), for a writer of `epoch`.
    pub fn discard(&self, id: ExtentId, offset: u64, len: u64, epoch: Epoch) -> Result<()> {
        Self::check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.mutate(id, epoch, 0, |ext| ext.discard(offset, len))
    }

    /// The state of each block of an extent, or `None` if this node holds none of it.
    pub fn block_states(&self, id: ExtentId) -> Result<Option<Vec<crate::BlockState>>> {
        Ok(self.extent(id, false)?.map(|e| e.states()))
    }

    /// Whether this node holds a copy of the extent.
    pub fn holds(&self, id: ExtentId) -> Result<bool> {
        Ok(self.extent(id, false)?.is_some())
    }

    /// The checksum table of an extent as stored (8 bytes per block, see
    /// `layout::Entry`), or `None` if this node holds none of it.
    pub fn block_sums(&self, id: ExtentId) -> Result<Option<Vec<u8>>> {
        Ok(self.extent(id, false)?.map(|e| e.encoded_table()))
    }

    /// Copies blocks in from another replica without overwriting any block
    /// written here (rebalance and repair). `offset` and the length must be
    /// block-aligned; `data: None` marks the range's absent blocks as zero.
    pub fn fill(&self, id: ExtentId, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        Self::check_range(offset, len)?;
        let bs = torus_types::BLOCK_SIZE as u64;
        if offset % bs != 0 || len % bs != 0 || data.is_some_and(|d| d.len() as u64 != len) {
            return Err(StoreError::OutOfRange { offset, len, max: MAX_EXTENT_SIZE });
        }
        self.check_failed()?;
        let ext = self.extent_for(id, data.map_or(0, |d| d.len() as u64))?;
        let res = self.fail_on_io_error(ext.fill_absent(offset, len, data, &|b| self.reserve(b)));
        self.mark_dirty(id, &ext);
        self.account(res?);
        Ok(())
    }

    /// Replaces corrupt blocks of an aligned range with a good replica's copy;
    /// returns how many blocks were replaced (see `Extent::repair`).
    pub fn repair(&self, id: ExtentId, offset: u64, data: &[u8]) -> Result<u64> {
        Self::check_range(offset, data.len() as u64)?;
        let bs = torus_types::BLOCK_SIZE as u64;
        if offset % bs != 0 || data.len() as u64 % bs != 0 {
            return Err(StoreError::OutOfRange { offset, len: data.len() as u64, max: MAX_EXTENT_SIZE });
        }
        self.check_failed()?;
        let Some(ext) = self.extent(id, false)? else { return Ok(0) };
        let fixed = self.fail_on_io_error(ext.repair(offset, data));
        self.mark_dirty(id, &ext);
        let fixed = fixed?;
        if fixed > 0 {
            tracing::warn!(extent = %id, blocks = fixed, "repaired corrupt blocks from a replica");
        }
        Ok(fixed)
    }

    /// Deletes one extent replica (it has moved elsewhere).
    pub fn delete_extent(&self, id: ExtentId) -> Result<()> {
        {
            let mut open = self.open.lock().expect("extent map poisoned");
            let mut dirty = self.dirty.lock().expect("dirty map poisoned");
            self.deletions.fetch_add(1, Ordering::SeqCst);
            open.remove(&id);
            dirty.remove(&id);
            self.resting.lock().expect("resting map poisoned").remove(&id);
        }
        let dir = self.vol_dir(id.volume);
        let (data, _) = crate::layout::data_file(&dir, id.index);
        let freed = allocated(&data);
        // Format 1's table first: it is what marks such an extent as present.
        let files = ["sum", "dat", "extent"].map(|ext| dir.join(format!("{}.{ext}", id.index)));
        for p in files {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io("remove", &p, e)),
            }
        }
        self.account(-(freed as i64));
        Ok(())
    }

    /// The newest epoch seen for a volume.
    pub fn epoch(&self, vol: VolumeId) -> Result<Epoch> {
        Ok(*self.fences.get(vol)?.read().expect("fence poisoned"))
    }

    /// Announces a writer's epoch: later writes with older epochs are refused.
    pub fn fence(&self, vol: VolumeId, epoch: Epoch) -> Result<Epoch> {
        self.fences.raise(vol, epoch)
    }

    /// Makes every write completed before this call durable. Concurrent callers
    /// share one round of fdatasyncs (group commit).
    pub async fn flush(self: &Arc<Self>) -> Result<()> {
        self.check_failed()?;
        let ticket = self.flush_requests.fetch_add(1, Ordering::SeqCst) + 1;
        let _round = self.flush_lock.lock().await;
        if self.flushed_upto.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        self.check_failed()?;
        let covers = self.flush_requests.load(Ordering::SeqCst);
        let batch: Vec<Arc<Extent>> = self.dirty.lock().expect("dirty map poisoned").values().cloned().collect();
        let me = self.clone();
        let res = tokio::task::spawn_blocking(move || me.sync_batch(batch))
            .await
            .unwrap_or_else(|e| Err(StoreError::Failed { reason: format!("flush task died: {e}") }));
        if let Err(e) = &res {
            // fsyncgate: after a failed fdatasync the page cache may have dropped the
            // data; never pretend a later flush could make it durable.
            tracing::error!(error = %e, "flush failed; the store refuses further I/O");
            *self.failed.lock().expect("failed flag poisoned") = Some(e.to_string());
            return res;
        }
        self.flushed_upto.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }

    fn sync_batch(&self, batch: Vec<Arc<Extent>>) -> Result<()> {
        for ext in batch {
            let generation = ext.generation();
            ext.sync()?;
            let mut dirty = self.dirty.lock().expect("dirty map poisoned");
            // Only drop it if no write came in between (such a write bumped the
            // generation, and re-inserts the same Arc after its change).
            if ext.generation() == generation {
                dirty.remove(&ext.id);
                let since = self.settles.load(Ordering::SeqCst);
                self.resting.lock().expect("resting map poisoned").insert(ext.id, Resting { ext, generation, since });
            }
        }
        Ok(())
    }

    /// Clears the dirty mark of every extent that a flush made durable before
    /// the previous call and that nothing changed since. Called every second
    /// or so (`settle_every`): an extent written again within that time keeps
    /// its mark, so a run of small synced writes costs no header writes
    /// (otherwise two per flush, and a third page for each fdatasync); the
    /// price is that a crash makes the next open verify the extents written
    /// in the last second or two (the recovery scan), as it does for extents
    /// with writes in flight.
    pub fn settle(&self) -> Result<()> {
        let now = self.settles.fetch_add(1, Ordering::SeqCst);
        let ready: Vec<Resting> = {
            let mut resting = self.resting.lock().expect("resting map poisoned");
            let ids: Vec<ExtentId> = resting.iter().filter(|(_, r)| r.since < now).map(|(id, _)| *id).collect();
            ids.iter().filter_map(|id| resting.remove(id)).collect()
        };
        for r in ready {
            // False if it was written since: it is dirty again and rests after its next flush.
            self.fail_on_io_error(r.ext.mark_clean(r.generation))?;
        }
        Ok(())
    }

    /// Runs `settle` every `period`, for ever (a node's background task).
    pub async fn settle_every(self: Arc<Self>, period: std::time::Duration) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.settle()).await {
                Ok(Ok(())) => {}
                // A failed header write failed the store (logged there); nothing more to do.
                Ok(Err(_)) => return,
                Err(e) => {
                    tracing::error!(error = %e, "the settle task died");
                    return;
                }
            }
        }
    }

    /// Flushes, then clears the dirty mark of every extent that is durable
    /// (at a clean shutdown: the next start has nothing to verify).
    pub async fn close(self: &Arc<Self>) -> Result<()> {
        self.flush().await?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            me.settle()?;
            me.settle()
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Failed { reason: format!("close task died: {e}") }))
    }

    /// Deletes every extent of a volume and its fence.
    pub fn delete_volume(&self, vol: VolumeId) -> Result<u64> {
        let dir = self.vol_dir(vol);
        let mut freed = 0;
        {
            let mut open = self.open.lock().expect("extent map poisoned");
            let mut dirty = self.dirty.lock().expect("dirty map poisoned");
            self.deletions.fetch_add(1, Ordering::SeqCst);
            open.retain(|k, _| k.volume != vol);
            dirty.retain(|k, _| k.volume != vol);
            self.resting.lock().expect("resting map poisoned").retain(|k, _| k.volume != vol);
        }
        for (id, dat) in self.walk()? {
            if id.volume == vol {
                freed += allocated(&dat);
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("remove", &dir, e)),
        }
        self.fences.forget(vol);
        self.account(-(freed as i64));
        Ok(freed)
    }
}

/// Bytes the filesystem holding `path` still has for unprivileged use.
fn disk_available(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the right type.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    const V: VolumeId = VolumeId(7);
    const E0: ExtentId = ExtentId { volume: V, index: 0 };

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// A store under `dir` on `disk` (a fault-injecting one).
    fn open_on(dir: &Path, disk: &crate::io::FaultyDisk) -> Arc<Store> {
        Arc::new(Store::open(dir, StoreOptions { disk: Arc::new(disk.clone()), ..Default::default() }).unwrap())
    }

    fn open(dir: &Path) -> Arc<Store> {
        Arc::new(Store::open(dir, StoreOptions::default()).expect("open store"))
    }

    #[tokio::test]
    async fn aligned_and_unaligned_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let mut buf = vec![1u8; 8192];
        s.read(E0, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "unwritten reads as zero");
        let data = pattern(16384, 1);
        s.write(E0, 4096, &data, Epoch(0)).unwrap();
        let small = pattern(100, 9);
        s.write(E0, 4096 + 4000, &small, Epoch(0)).unwrap();
        let mut expect = vec![0u8; 4096];
        expect.extend_from_slice(&data);
        expect[8096..8196].copy_from_slice(&small);
        let mut got = vec![0u8; expect.len()];
        s.read(E0, 0, &mut got).unwrap();
        assert_eq!(got, expect);
        let mut part = vec![0u8; 333];
        s.read(E0, 8000, &mut part).unwrap();
        assert_eq!(part, expect[8000..8333]);
        s.flush().await.unwrap();
        drop(s);
        let s = open(dir.path());
        s.read(E0, 0, &mut got).unwrap();
        assert_eq!(got, expect, "data survives reopen");
        assert_eq!(s.used(), 16384);
    }

    #[tokio::test]
    async fn zero_frees_whole_blocks_and_keeps_edges() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let data = pattern(65536, 3);
        s.write(E0, 0, &data, Epoch(0)).unwrap();
        s.zero(E0, 100, 20000, Epoch(0)).unwrap();
        let mut got = vec![0u8; 65536];
        s.read(E0, 0, &mut got).unwrap();
        let mut expect = data.clone();
        expect[100..20100].fill(0);
        assert_eq!(got, expect);
        // Blocks 1..4 (4096..20480) were wholly inside and are freed.
        assert!(s.used() <= 65536 - 3 * 4096);
        s.flush().await.unwrap();
        let (file, _) = crate::layout::data_file(&dir.path().join("extents/7"), 0);
        assert!(allocated(&file) < 65536, "hole punched");
    }

    #[tokio::test]
    async fn corruption_is_detected_never_returned() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.write(E0, 0, &pattern(8192, 5), Epoch(0)).unwrap();
        // A clean shutdown: a crash would make the next open take a changed block for a cut write.
        s.close().await.unwrap();
        drop(s);
        let (file, base) = crate::layout::data_file(&dir.path().join("extents/7"), 0);
        assert_eq!(base, crate::DATA_OFFSET, "a new extent is one file");
        let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        f.seek(SeekFrom::Start(base + 4096 + 17)).unwrap();
        f.write_all(&[0xff]).unwrap();
        drop(f);
        let s = open(dir.path());
        let mut buf = vec![0u8; 4096];
        s.read(E0, 0, &mut buf).expect("the intact block reads");
        match s.read(E0, 4096, &mut buf) {
            Err(StoreError::Checksum { block: 1, .. }) => {}
            other => panic!("expected a checksum error, got {other:?}"),
        }
        // An unaligned write that needs the corrupt block's old bytes fails too.
        assert!(matches!(s.write(E0, 4096 + 10, &[1, 2, 3], Epoch(0)), Err(StoreError::Checksum { .. })));
        // A good replica's copy repairs only the corrupt block.
        let good = pattern(8192, 5);
        assert_eq!(s.repair(E0, 0, &good).unwrap(), 1);
        s.read(E0, 4096, &mut buf).unwrap();
        assert_eq!(buf, good[4096..]);
        // A whole-block overwrite heals it too.
        s.write(E0, 4096, &pattern(4096, 6), Epoch(0)).unwrap();
        s.read(E0, 4096, &mut buf).unwrap();
        assert_eq!(buf, pattern(4096, 6));
    }

    #[tokio::test]
    async fn crash_between_table_and_data_leaves_old_data_readable() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let old = pattern(4096, 1);
        s.write(E0, 0, &old, Epoch(0)).unwrap();
        s.flush().await.unwrap();
        // A second write whose table entry landed but whose data write did not:
        // simulate by writing, then putting the old bytes back under it.
        s.write(E0, 0, &pattern(4096, 2), Epoch(0)).unwrap();
        drop(s);
        let (file, base) = crate::layout::data_file(&dir.path().join("extents/7"), 0);
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new().write(true).open(file).unwrap(),
            &old,
            base,
        )
        .unwrap();
        let s = open(dir.path());
        let mut buf = vec![0u8; 4096];
        s.read(E0, 0, &mut buf).expect("a block cut mid-write reads (old or new), not as corrupt");
        assert_eq!(buf, old);
    }

    #[tokio::test]
    async fn stale_epochs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.write(E0, 0, &pattern(4096, 1), Epoch(5)).unwrap();
        assert!(matches!(s.write(E0, 0, &pattern(4096, 2), Epoch(4)), Err(StoreError::Fenced { .. })));
        s.fence(V, Epoch(9)).unwrap();
        assert!(matches!(s.zero(E0, 0, 4096, Epoch(5)), Err(StoreError::Fenced { .. })));
        drop(s);
        let s = open(dir.path());
        assert_eq!(s.epoch(V).unwrap(), Epoch(9), "epochs survive restart");
        assert!(matches!(s.write(E0, 0, &pattern(4096, 2), Epoch(8)), Err(StoreError::Fenced { .. })));
        s.write(E0, 0, &pattern(4096, 2), Epoch(9)).unwrap();
    }

    #[tokio::test]
    async fn capacity_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Store::open(dir.path(), StoreOptions { capacity: 8192, ..Default::default() }).unwrap());
        s.write(E0, 0, &pattern(8192, 1), Epoch(0)).unwrap();
        s.write(E0, 0, &pattern(8192, 2), Epoch(0)).expect("overwrites need no new space");
        assert!(matches!(s.write(E0, 8192, &pattern(4096, 1), Epoch(0)), Err(StoreError::NoSpace { .. })));
        s.zero(E0, 0, 4096, Epoch(0)).unwrap();
        s.write(E0, 8192, &pattern(4096, 1), Epoch(0)).expect("space freed by zeroing is reusable");
        // A refused new extent is not created: the node must not look like it holds it.
        let e1 = ExtentId::new(E0.volume, 1);
        assert!(matches!(s.write(e1, 0, &pattern(4096, 1), Epoch(0)), Err(StoreError::NoSpace { .. })));
        assert!(matches!(s.fill(e1, 0, 4096, Some(&pattern(4096, 1))), Err(StoreError::NoSpace { .. })));
        assert!(!s.holds(e1).unwrap());
        assert!(s.holds(E0).unwrap());
        // The filesystem under a temp dir has more than 8 KiB free.
        assert_eq!(s.effective_capacity(), 8192);
        let big = Store::open(dir.path(), StoreOptions { capacity: u64::MAX / 2, ..Default::default() }).unwrap();
        assert!(big.effective_capacity() < u64::MAX / 2, "bounded by the filesystem's free space");
    }

    #[tokio::test]
    async fn fill_never_overwrites_written_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let newer = pattern(4096, 9);
        s.write(E0, 4096, &newer, Epoch(0)).unwrap();
        s.zero(E0, 12288, 4096, Epoch(0)).unwrap();
        // A copy of an older version of blocks 0..4 arrives afterwards.
        let older = pattern(16384, 1);
        s.fill(E0, 0, 16384, Some(&older)).unwrap();
        let mut got = vec![0u8; 16384];
        s.read(E0, 0, &mut got).unwrap();
        assert_eq!(got[..4096], older[..4096], "absent block filled");
        assert_eq!(got[4096..8192], newer[..], "written block kept");
        assert_eq!(got[8192..12288], older[8192..12288], "absent block filled");
        assert!(got[12288..].iter().all(|b| *b == 0), "zeroed block kept");
        s.fill(E0, 16384, 8192, None).unwrap();
        let states = s.block_states(E0).unwrap().unwrap();
        assert_eq!(states[4..6], [crate::BlockState::Zero, crate::BlockState::Zero]);
        assert!(s.fill(E0, 100, 4096, None).is_err(), "unaligned fills are refused");
        s.delete_extent(E0).unwrap();
        assert_eq!(s.block_states(E0).unwrap(), None);
    }

    #[tokio::test]
    async fn delete_volume_and_listing() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.write(E0, 0, &pattern(4096, 1), Epoch(0)).unwrap();
        s.write(ExtentId::new(V, 3), 0, &pattern(8192, 1), Epoch(0)).unwrap();
        let list = s.extents().unwrap();
        assert_eq!(
            list,
            vec![ExtentStat { id: E0, data_blocks: 1 }, ExtentStat { id: ExtentId::new(V, 3), data_blocks: 2 }]
        );
        s.delete_volume(V).unwrap();
        assert!(s.extents().unwrap().is_empty());
        let mut buf = vec![1u8; 4096];
        s.read(E0, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
    }

    #[test]
    fn concurrent_first_writes_and_deletes_leave_every_extent_whole() {
        // Threads write to the same new extents at once (each extent is opened
        // once, outside any store-wide lock) while another deletes some.
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let ids: Vec<ExtentId> = (0..16).map(|i| ExtentId::new(VolumeId(7), i)).collect();
        std::thread::scope(|scope| {
            for t in 0..8u8 {
                let (s, ids) = (&s, &ids);
                scope.spawn(move || {
                    for id in ids {
                        s.write(*id, t as u64 * 4096, &pattern(4096, t), Epoch(0)).unwrap();
                    }
                });
            }
            scope.spawn(|| {
                for id in ids.iter().step_by(4) {
                    s.delete_extent(*id).unwrap();
                }
            });
        });
        for id in &ids {
            let mut buf = vec![0u8; 8 * 4096];
            s.read(*id, 0, &mut buf).unwrap();
            for t in 0..8u8 {
                let block = &buf[t as usize * 4096..(t as usize + 1) * 4096];
                // A block is the write's, or zero if a deletion came after it.
                assert!(block == pattern(4096, t) || block.iter().all(|b| *b == 0), "extent {id} block {t}");
            }
        }
    }

    #[tokio::test]
    async fn synced_writes_to_a_busy_extent_write_no_header_and_a_rested_one_is_marked_clean() {
        use crate::io::{FaultyDisk, Op};
        let dir = tempfile::tempdir().unwrap();
        let disk = FaultyDisk::new(Arc::new(LocalDisk));
        let s = open_on(dir.path(), &disk);
        let dirty_on_disk = || {
            let (file, _) = crate::layout::data_file(&dir.path().join("extents/7"), 0);
            let header = std::fs::read(file).unwrap();
            crate::layout::decode_header(&header[..4096], crate::layout::Format::OneFile).unwrap()
        };
        s.write(E0, 0, &pattern(4096, 1), Epoch(0)).unwrap();
        s.flush().await.unwrap();
        // A run of synced 4 KiB writes: each is one table entry and one data write, one fdatasync.
        let (writes, syncs) = (disk.count(Op::Write), disk.count(Op::Sync));
        for i in 0..10u8 {
            s.write(E0, 4096 * (i as u64 % 4), &pattern(4096, i), Epoch(0)).unwrap();
            s.flush().await.unwrap();
        }
        assert_eq!((disk.count(Op::Write) - writes, disk.count(Op::Sync) - syncs), (20, 10));
        assert!(dirty_on_disk(), "a busy extent keeps its dirty mark");
        // Settles: the first after the flush leaves it, the next clears the mark.
        s.settle().unwrap();
        assert!(dirty_on_disk());
        s.settle().unwrap();
        assert!(!dirty_on_disk(), "a rested extent is marked clean");
        // A write after its flush keeps the mark: the extent is not durable.
        s.write(E0, 0, &pattern(4096, 9), Epoch(0)).unwrap();
        s.flush().await.unwrap();
        s.write(E0, 0, &pattern(4096, 8), Epoch(0)).unwrap();
        s.settle().unwrap();
        s.settle().unwrap();
        assert!(dirty_on_disk(), "written since its flush: still dirty");
        // A clean shutdown leaves nothing to verify at the next start.
        s.close().await.unwrap();
        assert!(!dirty_on_disk());
        // An extent found dirty after a crash is marked clean by the next flush and settles.
        s.write(E0, 0, &pattern(4096, 8), Epoch(0)).unwrap();
        drop(s);
        let s = open_on(dir.path(), &disk);
        assert!(s.holds(E0).unwrap() && dirty_on_disk(), "opened dirty, as the crash left it");
        s.close().await.unwrap();
        assert!(!dirty_on_disk(), "a recovered extent does not stay dirty");
        drop(s);
        let s = open(dir.path());
        let mut buf = vec![0u8; 4096];
        s.read(E0, 0, &mut buf).unwrap();
        assert_eq!(buf, pattern(4096, 8));
    }

    #[tokio::test]
    async fn a_disk_that_fails_a_write_fails_the_store_and_a_full_one_does_not() {
        use crate::io::{Fault, FaultyDisk, Op, Rule, Target};
        let dir = tempfile::tempdir().unwrap();
        let disk = FaultyDisk::new(Arc::new(LocalDisk));
        let s = open_on(dir.path(), &disk);
        let old = pattern(8192, 1);
        s.write(E0, 0, &old, Epoch(0)).unwrap();
        s.flush().await.unwrap();

        // A full filesystem refuses the write; the store goes on.
        disk.fail(Rule::once(Op::Write, Target::Data, Fault::NoSpace));
        let e = s.write(E0, 0, &pattern(8192, 2), Epoch(0)).expect_err("ENOSPC");
        assert!(matches!(e, StoreError::Io { .. }), "{e}");
        let mut got = vec![0u8; 8192];
        s.read(E0, 0, &mut got).unwrap();
        assert_eq!(got, old);

        // EIO: the write fails, and so does every write after it until a restart;
        // reads (each verified) are still served, with the old contents.
        disk.fail(Rule::once(Op::Write, Target::Data, Fault::Eio));
        assert!(matches!(s.write(E0, 0, &pattern(8192, 3), Epoch(0)), Err(StoreError::Failed { .. })));
        assert!(matches!(s.write(E0, 0, &pattern(8192, 3), Epoch(0)), Err(StoreError::Failed { .. })));
        assert!(matches!(s.flush().await, Err(StoreError::Failed { .. })));
        s.read(E0, 0, &mut got).unwrap();
        assert_eq!(got, old);
        drop(s);
        let s = open_on(dir.path(), &disk);
        s.read(E0, 0, &mut got).expect("after a restart every block reads");
        assert_eq!(got, old);

        // A failed fdatasync fails the flush and the store.
        s.write(E0, 0, &pattern(8192, 4), Epoch(0)).unwrap();
        disk.fail(Rule::once(Op::Sync, Target::Any, Fault::Eio));
        assert!(s.flush().await.is_err());
        assert!(matches!(s.write(E0, 0, &old, Epoch(0)), Err(StoreError::Failed { .. })));
        assert_eq!(disk.injected(), 3);
    }
}
