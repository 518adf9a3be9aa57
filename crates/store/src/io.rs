//! The store's I/O backend: every byte of an extent's files, and every
//! directory sync that makes a new file durable, goes through [`Disk`].
//!
//! [`LocalDisk`] is the real one (positioned reads and writes, fdatasync,
//! hole punching on the local filesystem). [`FaultyDisk`] wraps another disk
//! and fails chosen operations as a broken or full disk would — EIO, ENOSPC,
//! or a torn write that lands only its first part — so that tests inject
//! disk faults in-process, without root, tmpfs or a device mapper. It also
//! counts operations, so a test can check that a directory was synced.
//!
//! Listing, deleting and sizing files stay plain `std::fs`: they are not on
//! the data path and have no partial outcome worth simulating.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Opens files and syncs directories.
pub trait Disk: Send + Sync + fmt::Debug {
    /// Opens `path` for reading and writing; `create` makes it if missing.
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>>;
    /// Makes the directory's entries (files just created in it) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// One open file.
pub trait DiskFile: Send + Sync {
    /// Reads up to `buf.len()` bytes at `off` (0 at the end of the file).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Deallocates `[off, off+len)`, keeping the size; `Unsupported` where the
    /// filesystem cannot (the bytes then stay allocated).
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()>;
    /// The parts of `[start, end)` that may hold data, in order (the rest are
    /// holes: they read as zeroes). By default, all of it.
    #[allow(clippy::single_range_in_vec_init)] // a list of ranges that has one
    fn data_ranges(&self, start: u64, end: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
        Ok(if start < end { vec![start..end] } else { Vec::new() })
    }
}

/// The local filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalDisk;

impl Disk for LocalDisk {
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        let f = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)?;
        Ok(Box::new(f))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

impl DiskFile for File {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, off)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, off)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on an open descriptor with in-range arguments.
        let rc = unsafe {
            libc::fallocate(
                self.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, err));
        }
        Err(err)
    }

    #[allow(clippy::single_range_in_vec_init)] // a list of ranges that has one
    fn data_ranges(&self, start: u64, end: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
        // SEEK_DATA / SEEK_HOLE: only the descriptor's offset moves, and the
        // store reads and writes at explicit offsets, never at that one.
        let seek = |off: u64, whence| -> io::Result<Option<u64>> {
            // SAFETY: lseek on an open descriptor.
            let r = unsafe { libc::lseek(self.as_raw_fd(), off as libc::off_t, whence) };
            if r >= 0 {
                return Ok(Some(r as u64));
            }
            match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None), // no data at or after `off`
                e if e.raw_os_error() == Some(libc::EINVAL) => Err(io::Error::new(io::ErrorKind::Unsupported, e)),
                e => Err(e),
            }
        };
        let mut out = Vec::new();
        let mut at = start;
        while at < end {
            let data = match seek(at, libc::SEEK_DATA) {
                Ok(Some(d)) => d,
                Ok(None) => break,
                // A filesystem without SEEK_DATA: treat it all as data.
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    out.push(at..end);
                    return Ok(out);
                }
                Err(e) => return Err(e),
            };
            if data >= end {
                break;
            }
            let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
            out.push(data..hole);
            at = hole;
        }
        Ok(out)
    }
}

/// An operation a [`FaultyDisk`] can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Open,
    Read,
    Write,
    Sync,
    SyncDir,
    Punch,
}

/// How an operation fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// EIO: the disk is broken.
    Eio,
    /// ENOSPC: the filesystem under the store is full.
    NoSpace,
    /// A write that lands only its first half (rounded down to whole 4 KiB
    /// blocks, the unit a disk writes atomically), then fails with EIO; any
    /// other operation fails with EIO.
    Torn,
}

/// What part of an extent's files an operation touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Any file, any offset (and directory syncs).
    Any,
    /// An extent's data: a format 2 `.extent` file from `DATA_OFFSET`, or a
    /// format 1 `.dat` file.
    Data,
    /// An extent's header and table: a format 2 `.extent` file before
    /// `DATA_OFFSET`, or a format 1 `.sum` file.
    Table,
}

impl Target {
    /// Whether an operation on `path` at `offset` (`None`: the whole file,
    /// as an fdatasync) touches this target.
    fn matches(self, path: &str, offset: Option<u64>) -> bool {
        let data_part = |d: bool| offset.is_none_or(|o| (o >= crate::layout::DATA_OFFSET) == d);
        match self {
            Target::Any => true,
            Target::Data => path.ends_with(".dat") || (path.ends_with(".extent") && data_part(true)),
            Target::Table => path.ends_with(".sum") || (path.ends_with(".extent") && data_part(false)),
        }
    }
}

/// Which operations fail: `op` on `target`, once `skip` of them went
/// through, `times` times (`None`: for ever).
#[derive(Clone, Debug)]
pub struct Rule {
    pub op: Op,
    pub target: Target,
    pub fault: Fault,
    pub skip: u64,
    pub times: Option<u64>,
}

impl Rule {
    /// Every `op` on `target` fails with `fault` from now on.
    pub fn always(op: Op, target: Target, fault: Fault) -> Rule {
        Rule { op, target, fault, skip: 0, times: None }
    }

    /// The next `op` on `target` fails once.
    pub fn once(op: Op, target: Target, fault: Fault) -> Rule {
        Rule { op, target, fault, skip: 0, times: Some(1) }
    }

    /// Lets `n` matching operations through first.
    pub fn after(mut self, n: u64) -> Rule {
        self.skip = n;
        self
    }
}

#[derive(Debug, Default)]
struct Faults {
    rules: Mutex<Vec<Rule>>,
    counts: Mutex<std::collections::HashMap<Op, u64>>,
    injected: AtomicU64,
}

impl Faults {
    /// The fault this operation meets, if any (and counts it).
    fn check(&self, op: Op, path: &Path, offset: Option<u64>) -> Option<Fault> {
        *self.counts.lock().expect("fault counts poisoned").entry(op).or_default() += 1;
        let name = path.to_string_lossy();
        let mut rules = self.rules.lock().expect("fault rules poisoned");
        let i = rules.iter().position(|r| r.op == op && r.target.matches(&name, offset))?;
        let rule = &mut rules[i];
        if rule.skip > 0 {
            rule.skip -= 1;
            return None;
        }
        let fault = rule.fault;
        if let Some(t) = &mut rule.times {
            *t -= 1;
            if *t == 0 {
                rules.remove(i);
            }
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        Some(fault)
    }
}

fn error(fault: Fault) -> io::Error {
    io::Error::from_raw_os_error(if fault == Fault::NoSpace { libc::ENOSPC } else { libc::EIO })
}

/// A disk that fails operations by the rules it is given (see the module
/// comment). Clones share their rules and counts.
#[derive(Clone, Debug)]
pub struct FaultyDisk {
    inner: Arc<dyn Disk>,
    faults: Arc<Faults>,
}

impl FaultyDisk {
    pub fn new(inner: Arc<dyn Disk>) -> FaultyDisk {
        FaultyDisk { inner, faults: Arc::default() }
    }

    /// Adds a rule (the first matching rule applies).
    pub fn fail(&self, rule: Rule) {
        self.faults.rules.lock().expect("fault rules poisoned").push(rule);
    }

    /// Removes every rule: the disk works again.
    pub fn heal(&self) {
        self.faults.rules.lock().expect("fault rules poisoned").clear();
    }

    /// How many operations of this kind were attempted.
    pub fn count(&self, op: Op) -> u64 {
        self.faults.counts.lock().expect("fault counts poisoned").get(&op).copied().unwrap_or(0)
    }

    /// How many faults were injected.
    pub fn injected(&self) -> u64 {
        self.faults.injected.load(Ordering::Relaxed)
    }
}

impl Disk for FaultyDisk {
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn DiskFile>> {
        if let Some(f) = self.faults.check(Op::Open, path, None) {
            return Err(error(f));
        }
        let inner = self.inner.open(path, create)?;
        Ok(Box::new(FaultyFile { inner, path: path.to_path_buf(), faults: self.faults.clone() }))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        match self.faults.check(Op::SyncDir, dir, None) {
            Some(f) => Err(error(f)),
            None => self.inner.sync_dir(dir),
        }
    }
}

struct FaultyFile {
    inner: Box<dyn DiskFile>,
    path: std::path::PathBuf,
    faults: Arc<Faults>,
}

impl FaultyFile {
    fn check(&self, op: Op, offset: Option<u64>) -> io::Result<()> {
        match self.faults.check(op, &self.path, offset) {
            Some(f) => Err(error(f)),
            None => Ok(()),
        }
    }
}

impl DiskFile for FaultyFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.check(Op::Read, Some(off))?;
        self.inner.read_at(buf, off)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        match self.faults.check(Op::Write, &self.path, Some(off)) {
            None => self.inner.write_all_at(buf, off),
            Some(Fault::Torn) => {
                let landed = buf.len() / 2 / 4096 * 4096;
                self.inner.write_all_at(&buf[..landed], off)?;
                Err(error(Fault::Torn))
            }
            Some(f) => Err(error(f)),
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.check(Op::Sync, None)?;
        self.inner.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.check(Op::Punch, Some(off))?;
        self.inner.punch_hole(off, len)
    }

    fn data_ranges(&self, start: u64, end: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
        self.check(Op::Read, Some(start))?;
        self.inner.data_ranges(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_skip_then_fail_the_given_number_of_times() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = FaultyDisk::new(Arc::new(LocalDisk));
        disk.fail(Rule { times: Some(2), ..Rule::once(Op::Write, Target::Data, Fault::NoSpace).after(1) });
        let dat = disk.open(&dir.path().join("0.dat"), true).expect("open");
        let sum = disk.open(&dir.path().join("0.sum"), true).expect("open");
        sum.write_all_at(b"x", 0).expect("other files are not matched");
        dat.write_all_at(b"a", 0).expect("the first write is let through");
        for _ in 0..2 {
            let e = dat.write_all_at(b"b", 0).expect_err("then two fail");
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        }
        dat.write_all_at(b"c", 0).expect("and then none");
        assert_eq!((disk.count(Op::Write), disk.injected()), (5, 2));
    }

    #[test]
    fn a_torn_write_lands_its_first_half() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = FaultyDisk::new(Arc::new(LocalDisk));
        let f = disk.open(&dir.path().join("t.dat"), true).expect("open");
        f.write_all_at(&[1u8; 12288], 0).expect("write");
        disk.fail(Rule::once(Op::Write, Target::Any, Fault::Torn));
        assert!(f.write_all_at(&[2u8; 12288], 0).is_err());
        let mut back = [0u8; 12288];
        assert_eq!(f.read_at(&mut back, 0).expect("read"), 12288);
        assert!(back[..4096].iter().all(|&b| b == 2) && back[4096..].iter().all(|&b| b == 1));
    }
}
