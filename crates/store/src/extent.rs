//! One extent replica on disk: its file(s), its checksum table (cached in
//! memory), reads that verify, writes that keep data and table consistent,
//! zeroing by hole punching, and the recovery scan after a crash.
//!
//! An extent created now is one file (format 2: header and table, then the
//! data), so a flush costs one fdatasync; an older store's extents keep their
//! two files (format 1) and cost two. Both go through [`Files`].
//!
//! Crash safety (kill -9): before the first write after the extent was
//! marked clean, the table's header is marked dirty; the store's settle pass
//! clears it once a flush made the extent durable and it rested since.
//! An extent found dirty at open may have had writes in flight when the process died:
//! each of its blocks whose data no longer matches the table is one whose
//! unflushed write was cut between the table and the data write, and its
//! entry is re-derived from the data on disk (old or new, never unreadable).

use crate::io::{Disk, DiskFile};
use crate::layout::{self, BlockState, Entry, Format, DATA_OFFSET, ENTRY_SIZE, HEADER_SIZE};
use crate::{Result, StoreError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use torus_types::{block_checksum, ExtentId, BLOCK_SIZE};

const BS: u64 = BLOCK_SIZE as u64;

/// Where an extent's header, table and data live.
struct Files {
    format: Format,
    data: Arc<dyn DiskFile>,
    data_path: PathBuf,
    /// Offset of the extent's byte 0 in the data file.
    data_base: u64,
    /// The header and table: the data file itself in format 2.
    table: Arc<dyn DiskFile>,
    table_path: PathBuf,
}

impl Files {
    /// Opens the files of extent `index` in `dir`: the format 2 file if it
    /// exists, else format 1's pair if its table exists, else (with `create`)
    /// a new file of `new_format`. Returns whether it was created.
    fn open(
        disk: &dyn Disk,
        dir: &Path,
        index: u64,
        create: bool,
        new_format: Format,
    ) -> Result<Option<(Files, bool)>> {
        let one = dir.join(format!("{index}.extent"));
        let (dat, sum) = (dir.join(format!("{index}.dat")), dir.join(format!("{index}.sum")));
        let format = if one.exists() {
            Format::OneFile
        } else if sum.exists() {
            Format::TwoFiles
        } else if create {
            new_format
        } else {
            return Ok(None);
        };
        let existed = match format {
            Format::OneFile => one.exists(),
            Format::TwoFiles => sum.exists(),
        };
        let open = |p: &Path| -> Result<Arc<dyn DiskFile>> {
            Ok(Arc::from(disk.open(p, create).map_err(|e| StoreError::io("open", p, e))?))
        };
        let files = match format {
            Format::OneFile => {
                let f = open(&one)?;
                Files {
                    format,
                    data: f.clone(),
                    data_path: one.clone(),
                    data_base: DATA_OFFSET,
                    table: f,
                    table_path: one,
                }
            }
            Format::TwoFiles => {
                // The table first: it is what marks the extent as present.
                let table = open(&sum)?;
                Files { format, data: open(&dat)?, data_path: dat, data_base: 0, table, table_path: sum }
            }
        };
        if !existed {
            // A new extent's files must survive a power loss once flushed: sync their directory.
            disk.sync_dir(dir).map_err(|e| StoreError::io("sync", dir, e))?;
        }
        Ok(Some((files, !existed)))
    }

    /// Reads `buf.len()` bytes of the extent's data at `off`; bytes past the
    /// end of the file read as zeroes.
    fn read_data(&self, buf: &mut [u8], off: u64) -> Result<()> {
        read_full(&*self.data, &self.data_path, buf, self.data_base + off)
    }

    fn write_data(&self, buf: &[u8], off: u64) -> Result<()> {
        self.data.write_all_at(buf, self.data_base + off).map_err(|e| StoreError::io("write", &self.data_path, e))
    }

    fn punch_data(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.data.punch_hole(self.data_base + off, len)
    }

    /// The table's entries as stored, `len` being the table file's length:
    /// the whole `.sum` after its header in format 1; in format 2, the
    /// entries up to the last one ever written, read only where the file
    /// has blocks (the rest of the table region is a hole: Absent entries).
    #[allow(clippy::single_range_in_vec_init)] // a list of ranges that has one
    fn read_table_body(&self, len: u64) -> Result<Vec<u8>> {
        let stat = |e| StoreError::io("read", &self.table_path, e);
        let ranges = match self.format {
            Format::TwoFiles => vec![HEADER_SIZE..len.max(HEADER_SIZE)],
            Format::OneFile => self.table.data_ranges(HEADER_SIZE, len.min(DATA_OFFSET)).map_err(stat)?,
        };
        let end = ranges.last().map_or(HEADER_SIZE, |r| r.end.max(HEADER_SIZE));
        let mut body = vec![0u8; (end - HEADER_SIZE) as usize];
        for r in ranges {
            let (from, to) = ((r.start.max(HEADER_SIZE) - HEADER_SIZE) as usize, (r.end - HEADER_SIZE) as usize);
            read_full(&*self.table, &self.table_path, &mut body[from..to], r.start.max(HEADER_SIZE))?;
        }
        let mut used = body.len() / ENTRY_SIZE * ENTRY_SIZE;
        if self.format == Format::OneFile {
            // The region ends in whole blocks: trailing zero entries are blocks never written.
            used = body.iter().rposition(|&b| b != 0).map_or(0, |i| (i / ENTRY_SIZE + 1) * ENTRY_SIZE);
        }
        body.truncate(used);
        Ok(body)
    }

    fn write_table(&self, buf: &[u8], off: u64) -> Result<()> {
        self.table.write_all_at(buf, off).map_err(|e| StoreError::io("write", &self.table_path, e))
    }

    /// fdatasync of every file: one in format 2.
    fn sync(&self) -> Result<()> {
        self.data.sync_data().map_err(|e| StoreError::io("fdatasync", &self.data_path, e))?;
        if self.format == Format::TwoFiles {
            self.table.sync_data().map_err(|e| StoreError::io("fdatasync", &self.table_path, e))?;
        }
        Ok(())
    }
}

pub(crate) struct Extent {
    pub id: ExtentId,
    files: Files,
    state: RwLock<State>,
}

struct State {
    table: Vec<Entry>,
    /// Bumped by every change; a flush clears the dirty mark only if unchanged since its sync.
    generation: u64,
    header_dirty: bool,
}

/// Reads `buf.len()` bytes at `off`; bytes past the end of the file read as zeroes.
fn read_full(f: &dyn DiskFile, path: &Path, mut buf: &mut [u8], mut off: u64) -> Result<()> {
    while !buf.is_empty() {
        match f.read_at(buf, off) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::io("read", path, e)),
        }
    }
    Ok(())
}

impl Extent {
    /// Opens an extent's files; `create` makes them if missing (else `Ok(None)`).
    pub fn open(disk: &dyn Disk, dir: &Path, id: ExtentId, create: bool) -> Result<Option<Extent>> {
        Self::open_as(disk, dir, id, create, Format::OneFile)
    }

    /// As `open`, creating a missing extent in `new_format` (tests make format 1 extents, as older stores did).
    pub(crate) fn open_as(
        disk: &dyn Disk,
        dir: &Path,
        id: ExtentId,
        create: bool,
        new_format: Format,
    ) -> Result<Option<Extent>> {
        let Some((files, created)) = Files::open(disk, dir, id.index, create, new_format)? else {
            return Ok(None);
        };
        let corrupt = |reason: String| StoreError::CorruptTable { extent: id, reason };
        let len = files.table.len().map_err(|e| StoreError::io("stat", &files.table_path, e))?;
        let (table, dirty) = if created || len == 0 {
            // New, or created by a process that died before writing the header.
            files.write_table(&layout::encode_header(files.format, false), 0)?;
            (Vec::new(), false)
        } else {
            let mut header = vec![0u8; HEADER_SIZE as usize];
            read_full(&*files.table, &files.table_path, &mut header, 0)?;
            let dirty = layout::decode_header(&header, files.format).map_err(corrupt)?;
            let body = files.read_table_body(len)?;
            let mut table = Vec::with_capacity(body.len() / ENTRY_SIZE);
            for (i, chunk) in body.chunks_exact(ENTRY_SIZE).enumerate() {
                table.push(Entry::decode(chunk).ok_or_else(|| corrupt(format!("entry {i} is malformed")))?);
            }
            (table, dirty)
        };
        let ext = Extent { id, files, state: RwLock::new(State { table, generation: 0, header_dirty: dirty }) };
        if dirty {
            ext.recover()?;
        }
        Ok(Some(ext))
    }

    /// Re-derives the entries of blocks whose data does not match after a crash.
    fn recover(&self) -> Result<()> {
        let mut st = self.state.write().expect("extent lock poisoned");
        let mut block = vec![0u8; BLOCK_SIZE];
        let mut fixed = Vec::new();
        for (i, e) in st.table.iter().enumerate() {
            if e.state != BlockState::Data {
                continue;
            }
            self.files.read_data(&mut block, i as u64 * BS)?;
            let crc = block_checksum(&block);
            if crc != e.crc {
                fixed.push((i, Entry { crc, state: BlockState::Data }));
            }
        }
        for (i, e) in &fixed {
            st.table[*i] = *e;
            self.write_entries(*i as u64, &st.table[*i..*i + 1])?;
        }
        if !fixed.is_empty() {
            tracing::warn!(extent = %self.id, blocks = fixed.len(), "recovered blocks cut by a crash mid-write");
        }
        st.generation += 1;
        Ok(())
    }

    fn write_entries(&self, first_block: u64, entries: &[Entry]) -> Result<()> {
        let mut raw = vec![0u8; entries.len() * ENTRY_SIZE];
        for (e, out) in entries.iter().zip(raw.chunks_exact_mut(ENTRY_SIZE)) {
            e.encode(out);
        }
        self.files.write_table(&raw, HEADER_SIZE + first_block * ENTRY_SIZE as u64)
    }

    /// Writes data in pieces of at most 64 KiB. The page cache keeps a large
    /// write in large folios, and every later small write into such a folio
    /// walks all of its block buffers (ext4): 1 MiB pieces made each 4 KiB
    /// overwrite several times dearer (see bench/README.md).
    fn write_data(&self, bytes: &[u8], offset: u64) -> Result<()> {
        const PIECE: usize = 64 << 10;
        // `return` fails with EIO; `return(enospc)` as a full disk would; `return(torn)`
        // writes the first half of the data, then fails with EIO.
        fail::fail_point!("store::data-write", |arg: Option<String>| {
            let errno = if arg.as_deref() == Some("enospc") { libc::ENOSPC } else { libc::EIO };
            if arg.as_deref() == Some("torn") {
                let half = &bytes[..bytes.len() / 2];
                self.files.write_data(half, offset)?;
            }
            Err(StoreError::io("write", &self.files.data_path, std::io::Error::from_raw_os_error(errno)))
        });
        for (i, piece) in bytes.chunks(PIECE).enumerate() {
            self.files.write_data(piece, offset + (i * PIECE) as u64)?;
        }
        Ok(())
    }

    fn set_header(&self, dirty: bool) -> Result<()> {
        self.files.write_table(&layout::encode_header(self.files.format, dirty), 0)
    }

    fn entry(table: &[Entry], block: u64) -> Entry {
        table.get(block as usize).copied().unwrap_or(Entry::ABSENT)
    }

    /// Reads and verifies the aligned blocks `[first, first + out.len()/BS)` into `out`.
    fn read_blocks(&self, table: &[Entry], first: u64, out: &mut [u8]) -> Result<()> {
        let n = out.len() as u64 / BS;
        if (first..first + n).all(|b| Self::entry(table, b).state != BlockState::Data) {
            out.fill(0);
            return Ok(());
        }
        self.files.read_data(out, first * BS)?;
        for (i, chunk) in out.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            let b = first + i as u64;
            let e = Self::entry(table, b);
            match e.state {
                BlockState::Data => {
                    if block_checksum(chunk) != e.crc {
                        return Err(StoreError::Checksum { extent: self.id, block: b });
                    }
                }
                BlockState::Absent | BlockState::Zero => chunk.fill(0),
            }
        }
        Ok(())
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let st = self.state.read().expect("extent lock poisoned");
        let first = offset / BS;
        let end = (offset + buf.len() as u64).div_ceil(BS);
        if offset % BS == 0 && buf.len() as u64 % BS == 0 {
            return self.read_blocks(&st.table, first, buf);
        }
        let mut scratch = vec![0u8; ((end - first) * BS) as usize];
        self.read_blocks(&st.table, first, &mut scratch)?;
        let skip = (offset - first * BS) as usize;
        buf.copy_from_slice(&scratch[skip..skip + buf.len()]);
        Ok(())
    }

    /// Marks the table dirty (once per flush interval) and bumps the generation.
    fn begin_change(&self, st: &mut State) -> Result<()> {
        st.generation += 1;
        if !st.header_dirty {
            self.set_header(true)?;
            st.header_dirty = true;
        }
        Ok(())
    }

    /// Writes `data` at `offset`. Unaligned edges are read, verified and merged.
    /// `space` is called with the bytes newly allocated before anything is written.
    pub fn write(&self, offset: u64, data: &[u8], space: &dyn Fn(u64) -> Result<()>) -> Result<i64> {
        let mut st = self.state.write().expect("extent lock poisoned");
        let first = offset / BS;
        let end = (offset + data.len() as u64).div_ceil(BS);
        let aligned = offset % BS == 0 && data.len() as u64 % BS == 0;
        let merged;
        let bytes: &[u8] = if aligned {
            data
        } else {
            let mut buf = vec![0u8; ((end - first) * BS) as usize];
            // Only the edge blocks need their old contents.
            self.read_blocks(&st.table, first, &mut buf[..BLOCK_SIZE])?;
            if end - first > 1 {
                let last = buf.len() - BLOCK_SIZE;
                self.read_blocks(&st.table, end - 1, &mut buf[last..])?;
            }
            let skip = (offset - first * BS) as usize;
            buf[skip..skip + data.len()].copy_from_slice(data);
            merged = buf;
            &merged
        };
        let entries: Vec<Entry> =
            bytes.chunks_exact(BLOCK_SIZE).map(|c| Entry { crc: block_checksum(c), state: BlockState::Data }).collect();
        let new_blocks = (first..end).filter(|b| Self::entry(&st.table, *b).state != BlockState::Data).count() as u64;
        space(new_blocks * BS)?;
        self.begin_change(&mut st)?;
        self.write_blocks(&mut st, first, &entries, bytes)?;
        Ok((new_blocks * BS) as i64)
    }

    /// Writes the entries, then the data (the order crash recovery relies
    /// on). If either write fails, no block is left poisoned: each block of
    /// the range gets back the entry that matches what its data now is — the
    /// old one where the new data did not land, the new one where it did, a
    /// re-derived one where a block was cut — in memory and, as far as the
    /// disk lets us, in the table (which stays marked dirty, so the next open
    /// re-derives whatever could not be written).
    fn write_blocks(&self, st: &mut State, first: u64, entries: &[Entry], bytes: &[u8]) -> Result<()> {
        let (lo, hi) = (first as usize, first as usize + entries.len());
        if st.table.len() < hi {
            st.table.resize(hi, Entry::ABSENT);
        }
        let old: Vec<Entry> = st.table[lo..hi].to_vec();
        st.table[lo..hi].copy_from_slice(entries);
        let written = self.write_entries(first, entries).and_then(|()| {
            fail::fail_point!("store::crash-after-entries", |_| std::process::abort());
            self.write_data(bytes, first * BS)
        });
        let Err(e) = written else { return Ok(()) };
        let mut block = vec![0u8; BLOCK_SIZE];
        for (i, (was, new)) in old.iter().zip(entries).enumerate() {
            let b = first + i as u64;
            st.table[lo + i] = match self.files.read_data(&mut block, b * BS) {
                Ok(()) => {
                    let crc = block_checksum(&block);
                    if crc == new.crc {
                        *new
                    } else if was.state != BlockState::Data || crc == was.crc {
                        *was
                    } else {
                        Entry { crc, state: BlockState::Data }
                    }
                }
                Err(_) => *was,
            };
        }
        if let Err(e2) = self.write_entries(first, &st.table[lo..hi]) {
            tracing::error!(extent = %self.id, error = %e2, "could not restore checksum entries after a failed write; the next open re-derives them");
        }
        st.generation += 1;
        Err(e)
    }

    /// Zeroes `[offset, offset+len)`: whole blocks become holes, edges are rewritten.
    /// Returns the change in allocated bytes.
    pub fn zero(&self, offset: u64, len: u64, space: &dyn Fn(u64) -> Result<()>) -> Result<i64> {
        let end = offset + len;
        let first_full = offset.div_ceil(BS);
        let end_full = end / BS;
        let mut delta = 0i64;
        if first_full >= end_full {
            // No whole block inside: a plain write of zeroes.
            return self.write(offset, &vec![0u8; len as usize], space);
        }
        if offset < first_full * BS {
            delta += self.write(offset, &vec![0u8; (first_full * BS - offset) as usize], space)?;
        }
        if end > end_full * BS {
            delta += self.write(end_full * BS, &vec![0u8; (end - end_full * BS) as usize], space)?;
        }
        let mut st = self.state.write().expect("extent lock poisoned");
        // Every whole block becomes Zero, also never-written ones: an Absent block would
        // accept a later copy of older data (FILL), undoing this zeroing.
        let known = (st.table.len() as u64).min(end_full);
        let freed = (first_full..known).filter(|b| st.table[*b as usize].state == BlockState::Data).count() as i64;
        self.begin_change(&mut st)?;
        if st.table.len() < end_full as usize {
            st.table.resize(end_full as usize, Entry::ABSENT);
        }
        let zeros = vec![Entry::ZERO; (end_full - first_full) as usize];
        st.table[first_full as usize..end_full as usize].copy_from_slice(&zeros);
        self.write_entries(first_full, &zeros)?;
        if first_full < known {
            self.punch(first_full * BS, (known - first_full) * BS)?;
        }
        delta -= freed * BS as i64;
        Ok(delta)
    }

    /// Makes the whole blocks of `[offset, offset+len)` Absent again ("never
    /// written here"), freeing their space: a layered volume's resync, where
    /// the copy it follows has no block of its own, so reads fall through to
    /// an older layer. Edges that are not whole blocks are left alone (the
    /// caller sends whole blocks). Returns the change in allocated bytes.
    pub fn discard(&self, offset: u64, len: u64) -> Result<i64> {
        let first = offset.div_ceil(BS);
        let mut st = self.state.write().expect("extent lock poisoned");
        let end = ((offset + len) / BS).min(st.table.len() as u64);
        if first >= end {
            return Ok(0);
        }
        let freed = (first..end).filter(|b| st.table[*b as usize].state == BlockState::Data).count() as i64;
        self.begin_change(&mut st)?;
        let absent = vec![Entry::ABSENT; (end - first) as usize];
        st.table[first as usize..end as usize].copy_from_slice(&absent);
        self.write_entries(first, &absent)?;
        self.punch(first * BS, (end - first) * BS)?;
        Ok(-freed * BS as i64)
    }

    fn punch(&self, offset: u64, len: u64) -> Result<()> {
        match self.files.punch_data(offset, len) {
            // Without hole punching the entries still say "zero": reads stay correct,
            // only the space is not returned.
            Err(e) if e.kind() != std::io::ErrorKind::Unsupported => {
                Err(StoreError::io("punch hole in", &self.files.data_path, e))
            }
            _ => Ok(()),
        }
    }

    /// The generation now: pass it to `mark_clean` after syncing.
    /// Whether the header on disk says dirty (writes not yet settled, or a
    /// recovery at open).
    pub fn header_dirty(&self) -> bool {
        self.state.read().expect("extent lock poisoned").header_dirty
    }

    pub fn generation(&self) -> u64 {
        self.state.read().expect("extent lock poisoned").generation
    }

    /// fdatasync of the extent's file (both files of a format 1 extent).
    pub fn sync(&self) -> Result<()> {
        self.files.sync()
    }

    /// Clears the dirty mark if nothing changed since `generation` was read. Returns
    /// whether the extent is clean now.
    pub fn mark_clean(&self, generation: u64) -> Result<bool> {
        let mut st = self.state.write().expect("extent lock poisoned");
        if st.generation != generation {
            return Ok(false);
        }
        if st.header_dirty {
            self.set_header(false)?;
            st.header_dirty = false;
        }
        Ok(true)
    }

    /// The state of every block in the table (blocks past its end are Absent).
    pub fn states(&self) -> Vec<BlockState> {
        self.state.read().expect("extent lock poisoned").table.iter().map(|e| e.state).collect()
    }

    /// The block table, encoded as on disk.
    pub fn encoded_table(&self) -> Vec<u8> {
        let st = self.state.read().expect("extent lock poisoned");
        let mut out = vec![0u8; st.table.len() * crate::layout::ENTRY_SIZE];
        for (e, chunk) in st.table.iter().zip(out.chunks_exact_mut(crate::layout::ENTRY_SIZE)) {
            e.encode(chunk);
        }
        out
    }

    /// Copies in blocks that are Absent here, leaving every other block as it
    /// is: `data` (block-aligned) for Data, or `None` to mark them Zero. A
    /// rebalance uses this, so that a copy never overwrites a newer write.
    /// If it fails (or the process dies) part way, every block it did not
    /// finish is still Absent.
    pub fn fill_absent(
        &self,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        space: &dyn Fn(u64) -> Result<()>,
    ) -> Result<i64> {
        let mut st = self.state.write().expect("extent lock poisoned");
        let first = offset / BS;
        let n = len / BS;
        let absent: Vec<u64> =
            (first..first + n).filter(|b| Self::entry(&st.table, *b).state == BlockState::Absent).collect();
        if absent.is_empty() {
            return Ok(0);
        }
        if data.is_some() {
            space(absent.len() as u64 * BS)?;
        }
        self.begin_change(&mut st)?;
        if st.table.len() < (first + n) as usize {
            st.table.resize((first + n) as usize, Entry::ABSENT);
        }
        // Runs of consecutive absent blocks: one table write and one data write each.
        let mut i = 0;
        while i < absent.len() {
            let mut j = i + 1;
            while j < absent.len() && absent[j] == absent[j - 1] + 1 {
                j += 1;
            }
            let (b0, b1) = (absent[i], absent[j - 1] + 1);
            let entries: Vec<Entry> = match data {
                Some(d) => {
                    let bytes = &d[((b0 - first) * BS) as usize..((b1 - first) * BS) as usize];
                    let entries: Vec<Entry> = bytes
                        .chunks_exact(BLOCK_SIZE)
                        .map(|c| Entry { crc: block_checksum(c), state: BlockState::Data })
                        .collect();
                    // Data first, then the entries: until its entry lands, a block stays
                    // Absent, whatever its bytes (a crash or a failed write in between
                    // leaves it to be filled again). Entries first, as for writes, would
                    // let the recovery at open take the hole for the block's old data.
                    self.write_data(bytes, b0 * BS)?;
                    self.write_entries(b0, &entries)?;
                    entries
                }
                None => {
                    let entries = vec![Entry::ZERO; (b1 - b0) as usize];
                    self.write_entries(b0, &entries)?;
                    entries
                }
            };
            st.table[b0 as usize..b1 as usize].copy_from_slice(&entries);
            i = j;
        }
        Ok(if data.is_some() { (absent.len() as u64 * BS) as i64 } else { 0 })
    }

    /// Replaces the blocks of an aligned range whose stored data no longer
    /// matches its checksum with `data` (a good replica's copy). Blocks that
    /// verify are left alone, so a repair never undoes a newer write.
    /// Returns how many blocks were replaced.
    pub fn repair(&self, offset: u64, data: &[u8]) -> Result<u64> {
        let mut st = self.state.write().expect("extent lock poisoned");
        let first = offset / BS;
        let mut block = vec![0u8; BLOCK_SIZE];
        let mut fixed = 0;
        for (i, good) in data.chunks_exact(BLOCK_SIZE).enumerate() {
            let b = first + i as u64;
            let e = Self::entry(&st.table, b);
            if e.state != BlockState::Data {
                continue;
            }
            self.files.read_data(&mut block, b * BS)?;
            if block_checksum(&block) == e.crc {
                continue;
            }
            self.begin_change(&mut st)?;
            let entry = Entry { crc: block_checksum(good), state: BlockState::Data };
            self.write_blocks(&mut st, b, &[entry], good)?;
            fixed += 1;
        }
        Ok(fixed)
    }

    pub fn data_blocks(&self) -> u64 {
        let st = self.state.read().expect("extent lock poisoned");
        st.table.iter().filter(|e| e.state == BlockState::Data).count() as u64
    }
}

/// Allocated bytes of the data in an extent's data file (what its data
/// costs on disk): a format 2 file's header and table are left out, so that
/// this agrees with what writes account for, block by block.
pub(crate) fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else { return 0 };
    let all = meta.blocks() * 512;
    if path.extension().is_some_and(|e| e == "extent") {
        let table: u64 = std::fs::File::open(path)
            .and_then(|f| DiskFile::data_ranges(&f, 0, DATA_OFFSET))
            .map(|ranges| ranges.iter().map(|r| r.end - r.start).sum())
            .unwrap_or(0);
        return all.saturating_sub(table);
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{Fault, FaultyDisk, LocalDisk, Op, Rule, Target};
    use std::sync::Arc;
    use torus_types::VolumeId;

    fn no_limit(_: u64) -> Result<()> {
        Ok(())
    }

    fn faulty_extent() -> (tempfile::TempDir, FaultyDisk, ExtentId, Extent) {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = FaultyDisk::new(Arc::new(LocalDisk));
        let id = ExtentId::new(VolumeId(1), 0);
        let ext = Extent::open(&disk, dir.path(), id, true).expect("open").expect("created");
        (dir, disk, id, ext)
    }

    #[test]
    fn a_failed_data_write_leaves_every_block_readable_with_old_or_new_contents() {
        let (dir, disk, id, ext) = faulty_extent();
        let old = vec![0x11u8; 256 << 10];
        ext.write(0, &old, &no_limit).expect("first write");

        // 256 KiB in 64 KiB pieces: the first two land, then the disk is full.
        disk.fail(Rule::once(Op::Write, Target::Data, Fault::NoSpace).after(2));
        let new = vec![0x22u8; 256 << 10];
        assert!(ext.write(0, &new, &no_limit).is_err(), "the write fails");
        let mut back = vec![0u8; 256 << 10];
        ext.read(0, &mut back).expect("no block is poisoned: every one reads");
        assert!(back[..128 << 10].iter().all(|&b| b == 0x22), "the pieces that landed read new");
        assert!(back[128 << 10..].iter().all(|&b| b == 0x11), "the rest reads old");

        // A write that fails before any data lands leaves the old contents, also after a reopen.
        disk.fail(Rule::once(Op::Write, Target::Data, Fault::Eio));
        assert!(ext.write(192 << 10, &[0x33u8; 4096], &no_limit).is_err());
        drop(ext);
        let ext = Extent::open(&disk, dir.path(), id, false).expect("reopen").expect("exists");
        let mut block = vec![0u8; 4096];
        ext.read(192 << 10, &mut block).expect("readable after a reopen");
        assert!(block.iter().all(|&b| b == 0x11));
        // Unaligned writes (read-modify-write of the edges) too.
        disk.fail(Rule::once(Op::Write, Target::Data, Fault::Eio));
        assert!(ext.write(100, &[0x44u8; 10], &no_limit).is_err());
        ext.read(0, &mut block).expect("the edge block reads");
        assert!(block.iter().all(|&b| b == 0x22));
    }

    #[test]
    fn a_torn_data_write_leaves_each_block_old_or_new_now_and_after_a_reopen() {
        let (dir, disk, id, ext) = faulty_extent();
        ext.write(0, &[0x11u8; 64 << 10], &no_limit).expect("first write");
        // A 64 KiB write torn in the middle: blocks 0-7 new, 8-15 old.
        disk.fail(Rule::once(Op::Write, Target::Data, Fault::Torn));
        assert!(ext.write(0, &[0x22u8; 64 << 10], &no_limit).is_err());
        let check = |ext: &Extent| {
            let mut back = vec![0u8; 64 << 10];
            ext.read(0, &mut back).expect("every block reads");
            assert!(back[..32 << 10].iter().all(|&b| b == 0x22) && back[32 << 10..].iter().all(|&b| b == 0x11));
        };
        check(&ext);
        drop(ext);
        check(&Extent::open(&disk, dir.path(), id, false).expect("reopen").expect("exists"));
    }

    #[test]
    fn a_failed_checksum_write_leaves_the_old_contents() {
        let (_dir, disk, _id, ext) = faulty_extent();
        ext.write(0, &[0x11u8; 8192], &no_limit).expect("first write");
        // The header is already dirty: the next .sum write is the entries'.
        disk.fail(Rule::once(Op::Write, Target::Table, Fault::Eio));
        assert!(ext.write(0, &[0x22u8; 8192], &no_limit).is_err());
        let mut back = vec![0u8; 8192];
        ext.read(0, &mut back).expect("reads");
        assert!(back.iter().all(|&b| b == 0x11));
    }

    #[test]
    fn a_fill_that_fails_leaves_its_blocks_absent_now_and_after_a_reopen() {
        let (dir, disk, id, ext) = faulty_extent();
        ext.write(0, &[0x11u8; 4096], &no_limit).expect("a write marks the table dirty");
        disk.fail(Rule::once(Op::Write, Target::Data, Fault::Eio));
        assert!(ext.fill_absent(4096, 8192, Some(&[0x22u8; 8192]), &no_limit).is_err());
        assert_eq!(ext.states()[1..], [BlockState::Absent, BlockState::Absent]);
        drop(ext);
        // The table is dirty: the recovery scan runs, and must not take the hole for data.
        let ext = Extent::open(&disk, dir.path(), id, false).expect("reopen").expect("exists");
        let states = ext.states();
        assert!((1..3).all(|b| states.get(b).is_none_or(|s| *s == BlockState::Absent)), "{states:?}");
        ext.fill_absent(4096, 8192, Some(&[0x22u8; 8192]), &no_limit).expect("filled again");
        let mut back = vec![0u8; 8192];
        ext.read(4096, &mut back).expect("reads");
        assert!(back.iter().all(|&b| b == 0x22));
    }

    #[test]
    fn a_new_extent_syncs_its_directory_and_an_existing_one_does_not() {
        let (dir, disk, id, ext) = faulty_extent();
        assert_eq!(disk.count(Op::SyncDir), 1);
        drop(ext);
        Extent::open(&disk, dir.path(), id, false).expect("reopen").expect("exists");
        assert_eq!(disk.count(Op::SyncDir), 1);
        // A directory that cannot be synced fails the creation.
        disk.fail(Rule::always(Op::SyncDir, Target::Any, Fault::Eio));
        assert!(Extent::open(&disk, dir.path(), ExtentId::new(VolumeId(1), 1), true).is_err());
    }

    #[test]
    fn a_flush_costs_one_fdatasync_and_a_format_1_extent_two() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = FaultyDisk::new(Arc::new(LocalDisk));
        let one = Extent::open(&disk, dir.path(), ExtentId::new(VolumeId(1), 0), true).expect("open").expect("new");
        let two = Extent::open_as(&disk, dir.path(), ExtentId::new(VolumeId(1), 1), true, Format::TwoFiles)
            .expect("open")
            .expect("new");
        assert!(dir.path().join("0.extent").exists() && !dir.path().join("0.sum").exists());
        assert!(dir.path().join("1.sum").exists() && dir.path().join("1.dat").exists());
        for (ext, syncs) in [(&one, 1), (&two, 2)] {
            ext.write(8192, &[7u8; 4096], &no_limit).expect("write");
            let before = disk.count(Op::Sync);
            ext.sync().expect("sync");
            assert_eq!(disk.count(Op::Sync) - before, syncs, "fdatasyncs per flush of {}", ext.id);
        }
    }

    #[test]
    fn format_1_extents_of_an_older_store_are_read_written_and_recovered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = LocalDisk;
        let id = ExtentId::new(VolumeId(1), 0);
        let ext = Extent::open_as(&disk, dir.path(), id, true, Format::TwoFiles).expect("open").expect("new");
        ext.write(0, &[0x11u8; 16384], &no_limit).expect("write");
        let generation = ext.generation();
        ext.sync().expect("sync");
        assert!(ext.mark_clean(generation).expect("clean"));
        // A write after the flush, then the process dies with the data cut: the dirty table is re-derived.
        ext.write(4096, &[0x22u8; 4096], &no_limit).expect("write");
        drop(ext);
        std::os::unix::fs::FileExt::write_all_at(
            &std::fs::OpenOptions::new().write(true).open(dir.path().join("0.dat")).expect("dat"),
            &[0x11u8; 4096],
            4096,
        )
        .expect("put the old bytes back");
        // Opened as a store opens it (new extents in format 2): it stays format 1.
        let ext = Extent::open(&disk, dir.path(), id, false).expect("reopen").expect("exists");
        assert!(!dir.path().join("0.extent").exists(), "no format 2 file made for it");
        let mut back = vec![0u8; 16384];
        ext.read(0, &mut back).expect("every block reads");
        assert!(back.iter().all(|&b| b == 0x11));
        ext.write(100, &[0x33u8; 10], &no_limit).expect("an unaligned write");
        ext.read(0, &mut back).expect("reads");
        assert!(back[100..110].iter().all(|&b| b == 0x33) && back[110..].iter().all(|&b| b == 0x11));
    }

    #[test]
    fn a_sparse_table_reopens_with_every_entry_and_data_sits_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = ExtentId::new(VolumeId(1), 0);
        let ext = Extent::open(&LocalDisk, dir.path(), id, true).expect("open").expect("new");
        // The first block and one near the end of a 1 GiB extent: the table between is a hole.
        let far = (crate::MAX_EXTENT_SIZE - 2 * BS) / BS;
        ext.write(0, &[1u8; 4096], &no_limit).expect("write");
        ext.write(far * BS, &[2u8; 4096], &no_limit).expect("write");
        ext.zero(BS, BS, &no_limit).expect("zero");
        drop(ext);
        let path = dir.path().join("0.extent");
        let file = std::fs::File::open(&path).expect("open");
        let byte_at = |off: u64| {
            let mut b = [0u8; 4];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, off).expect("read");
            b
        };
        assert_eq!(&byte_at(0), layout::MAGIC);
        assert_eq!(byte_at(DATA_OFFSET)[0], 1, "byte 0 of the extent at DATA_OFFSET");
        assert_eq!(byte_at(DATA_OFFSET + far * BS)[0], 2);
        assert!(allocated(&path) <= 2 * BS + 8192, "only the data counts: {}", allocated(&path));
        let ext = Extent::open(&LocalDisk, dir.path(), id, false).expect("reopen").expect("exists");
        let states = ext.states();
        assert_eq!(states.len() as u64, far + 1, "the table ends at the last entry written");
        assert_eq!((states[0], states[1], states[2]), (BlockState::Data, BlockState::Zero, BlockState::Absent));
        assert_eq!(states[far as usize], BlockState::Data);
        let mut back = vec![0u8; 4096];
        ext.read(far * BS, &mut back).expect("reads");
        assert!(back.iter().all(|&b| b == 2));
    }

    #[test]
    fn a_file_created_but_never_given_a_header_opens_as_new() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("0.extent"), b"").expect("an empty file, as a crash leaves it");
        let id = ExtentId::new(VolumeId(1), 0);
        let ext = Extent::open(&LocalDisk, dir.path(), id, false).expect("open").expect("exists");
        assert!(ext.states().is_empty());
        std::fs::write(dir.path().join("1.extent"), vec![0xabu8; 8192]).expect("garbage");
        assert!(matches!(
            Extent::open(&LocalDisk, dir.path(), ExtentId::new(VolumeId(1), 1), false),
            Err(StoreError::CorruptTable { .. })
        ));
    }
}
