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

/// Which operations fail: `op` on files whose name ends with `suffix`
/// (`".dat"`, `".sum"`, or `""` for any), once `skip` of them went through,
/// `times` times (`None`: for ever).
#[derive(Clone, Debug)]
pub struct Rule {
    pub op: Op,
    pub suffix: &'static str,
    pub fault: Fault,
    pub skip: u64,
    pub times: Option<u64>,
}

impl Rule {
    /// Every `op` on files ending with `suffix` fails with `fault` from now on.
    pub fn always(op: Op, suffix: &'static str, fault: Fault) -> Rule {
        Rule { op, suffix, fault, skip: 0, times: None }
    }

    /// The next `op` on files ending with `suffix` fails once.
    pub fn once(op: Op, suffix: &'static str, fault: Fault) -> Rule {
        Rule { op, suffix, fault, skip: 0, times: Some(1) }
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
    fn check(&self, op: Op, path: &Path) -> Option<Fault> {
        *self.counts.lock().expect("fault counts poisoned").entry(op).or_default() += 1;
        let name = path.to_string_lossy();
        let mut rules = self.rules.lock().expect("fault rules poisoned");
        let i = rules.iter().position(|r| r.op == op && name.ends_with(r.suffix))?;
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
        if let Some(f) = self.faults.check(Op::Open, path) {
            return Err(error(f));
        }
        let inner = self.inner.open(path, create)?;
        Ok(Box::new(FaultyFile { inner, path: path.to_path_buf(), faults: self.faults.clone() }))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        match self.faults.check(Op::SyncDir, dir) {
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
    fn check(&self, op: Op) -> io::Result<()> {
        match self.faults.check(op, &self.path) {
            Some(f) => Err(error(f)),
            None => Ok(()),
        }
    }
}

impl DiskFile for FaultyFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        self.check(Op::Read)?;
        self.inner.read_at(buf, off)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        match self.faults.check(Op::Write, &self.path) {
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
        self.check(Op::Sync)?;
        self.inner.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.check(Op::Punch)?;
        self.inner.punch_hole(off, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_skip_then_fail_the_given_number_of_times() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = FaultyDisk::new(Arc::new(LocalDisk));
        disk.fail(Rule { times: Some(2), ..Rule::once(Op::Write, ".dat", Fault::NoSpace).after(1) });
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
        disk.fail(Rule::once(Op::Write, "", Fault::Torn));
        assert!(f.write_all_at(&[2u8; 12288], 0).is_err());
        let mut back = [0u8; 12288];
        assert_eq!(f.read_at(&mut back, 0).expect("read"), 12288);
        assert!(back[..4096].iter().all(|&b| b == 2) && back[4096..].iter().all(|&b| b == 1));
    }
}
