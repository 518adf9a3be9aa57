//! The keeper: the process that holds one attachment. It opens the volume
//! (taking the writer lock for a writable attachment, waiting up to
//! `lock_wait` for a dead holder's lease to lapse), serves it as a local block
//! device, records itself in `keeper.json`, and then waits:
//!
//! - SIGHUP: the volume was grown; take the new size from the metadata and
//!   show it on the device (the FUSE file's size, `losetup --set-capacity`,
//!   then a check that the device shows it).
//! - SIGTERM / SIGINT: detach — unless the device is still open (mounted):
//!   then it refuses and keeps serving, since stopping would fail the I/O of
//!   whoever holds it. Detach = loop device off, flush, FUSE unmounted, the
//!   writer lock released, the record removed.
//!
//! The keeper is its own process so that the node plugin can restart or be
//! upgraded without ending it: the plugin finds it again through the record.
//!
//! Two ways to make the device ([`Backend`]): a FUSE file bound to a loop
//! device (any host with /dev/fuse), or the kernel NBD driver fed through
//! socket pairs (hosts with the nbd module; see `nbd_kernel`).

use crate::fuse::{DiskFs, DISK};
use crate::record::{KeeperRecord, RECORD};
use crate::{loopdev, nbd_kernel, AttachError};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use torus_meta::cluster::{Cluster, ClusterError};
use torus_volume::{BlockDevice, ManagerOptions, VolumeError, VolumeManager};

/// How the keeper makes the volume a local block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A FUSE file bound to a loop device with direct I/O.
    Fuse,
    /// The kernel NBD driver, configured through netlink, fed over socket pairs.
    KernelNbd,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Fuse => "fuse",
            Backend::KernelNbd => "nbd",
        }
    }
}

/// Connections the kernel NBD driver gets to one keeper.
const NBD_CONNECTIONS: usize = 2;
/// Seconds the kernel NBD driver waits for new sockets when a connection dies.
const NBD_DEAD_CONN_TIMEOUT: u64 = 30;

#[derive(Clone, Debug)]
pub struct KeeperOptions {
    pub backend: Backend,
    pub volume: String,
    /// The attachment's directory (`<state dir>/attach/<volume>`).
    pub dir: PathBuf,
    pub read_only: bool,
    /// The volume's opens; its `lock_wait` is how long to wait for another holder's lock.
    pub manager: ManagerOptions,
}

/// The exit status a keeper reports when it could not attach, so the plugin
/// can tell "in use elsewhere", "no such volume" and "cluster unreachable"
/// from other failures (sysexits-style numbers, apart from clap's 2 for usage).
pub fn exit_code(e: &AttachError) -> i32 {
    match e {
        AttachError::InUse { .. } => EXIT_IN_USE,
        AttachError::VolumeNotFound { .. } => EXIT_NOT_FOUND,
        AttachError::Unavailable { .. } => EXIT_UNAVAILABLE,
        _ => 1,
    }
}

pub const EXIT_NOT_FOUND: i32 = 66;
pub const EXIT_UNAVAILABLE: i32 = 69;
pub const EXIT_IN_USE: i32 = 75;

/// Opens the volume; the manager waits up to its `lock_wait` while another writer holds it
/// (a dead holder's lease lapses, a repair hands it over).
async fn open(manager: &VolumeManager, opts: &KeeperOptions) -> Result<Arc<torus_volume::Volume>, AttachError> {
    match manager.open(&opts.volume, !opts.read_only).await {
        Ok(v) => Ok(v),
        Err(VolumeError::Cluster(ClusterError::VolumeLocked { holder, .. })) => {
            Err(AttachError::InUse { volume: opts.volume.clone(), holder })
        }
        Err(VolumeError::Cluster(ClusterError::VolumeNotFound { .. })) => {
            Err(AttachError::VolumeNotFound { volume: opts.volume.clone() })
        }
        Err(VolumeError::Cluster(e)) if e.is_retryable() => {
            Err(AttachError::Unavailable { volume: opts.volume.clone(), reason: e.to_string() })
        }
        Err(e) => Err(AttachError::Failed { volume: opts.volume.clone(), reason: e.to_string() }),
    }
}

/// Whether someone has the device open: a mount or an exclusive opener (an
/// exclusive open fails then), or any process with a descriptor on it
/// (found in /proc, by device number: a block volume is opened through the
/// device file bound at the pod's target path). When in doubt, busy; a
/// device that no longer exists is not.
pub(crate) fn device_busy(dev: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(dev) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return false,
        Err(_) => return true,
    }
    let Ok(md) = std::fs::metadata(dev) else { return false };
    let rdev = md.rdev();
    let Ok(procs) = std::fs::read_dir("/proc") else { return true };
    for p in procs.flatten() {
        if !p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        for fd in std::fs::read_dir(p.path().join("fd")).into_iter().flatten().flatten() {
            if let Ok(m) = std::fs::metadata(fd.path()) {
                if m.file_type().is_block_device() && m.rdev() == rdev {
                    return true;
                }
            }
        }
    }
    false
}

/// Unmounts a FUSE mount left by an earlier keeper of this attachment that died.
pub fn unmount_stale(fuse_dir: &Path) {
    let _ = std::process::Command::new("fusermount3")
        .args(["-u", "-z", "-q"])
        .arg(fuse_dir)
        .stderr(std::process::Stdio::null())
        .status();
}

/// Runs a keeper until it is told to detach. Returns once it has detached.
pub async fn run(cluster: Cluster, opts: KeeperOptions) -> Result<(), AttachError> {
    let mut term = signal(SignalKind::terminate()).map_err(AttachError::io("installing SIGTERM handler"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(AttachError::io("installing SIGINT handler"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(AttachError::io("installing SIGHUP handler"))?;
    std::fs::create_dir_all(&opts.dir).map_err(AttachError::io(format!("creating {}", opts.dir.display())))?;
    // Held until this process ends: it is how others know this keeper lives.
    let _alive = crate::record::hold_lock(&opts.dir)?;
    let manager = Arc::new(VolumeManager::new(cluster.clone(), opts.manager.clone()));
    let vol = open(&manager, &opts).await?;
    let follower = tokio::spawn(manager.clone().follow_ring());

    let served = match opts.backend {
        Backend::Fuse => serve_fuse(&opts, vol.clone()).await,
        Backend::KernelNbd => serve_nbd(vol.clone()).await,
    };
    let mut served = match served {
        Ok(s) => s,
        Err(e) => {
            vol.release().await;
            drop(vol);
            manager.close_all().await;
            return Err(e);
        }
    };
    let device = served.device();
    let me = std::process::id();
    let mut record = KeeperRecord {
        volume: opts.volume.clone(),
        pid: me,
        device: device.clone(),
        size: vol.size(),
        read_only: opts.read_only,
        backend: opts.backend.name().into(),
        epoch: vol.epoch().0,
        problem: None,
    };
    if let Err(e) = record.store(&opts.dir) {
        // Nobody would find this attachment: take it down again.
        let _ = served.stop_device().await;
        vol.release().await;
        drop(vol);
        served.finish().await;
        manager.close_all().await;
        return Err(e);
    }
    tracing::info!(volume = %opts.volume, device = %device.display(), size = record.size, epoch = record.epoch, "attached");

    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = check.tick() => {
                if vol.lease_lost() && record.problem.is_none() {
                    tracing::error!(volume = %opts.volume, "the writer's lease is lost: writes fail until the volume is staged again");
                    record.problem = Some("the writer's lease was lost (etcd unreachable past --io-hold, or the lease expired): writes fail until the volume is staged again".into());
                    if let Err(e) = record.store(&opts.dir) {
                        tracing::warn!(error = %e, "could not record the lost lease");
                    }
                }
            }
            _ = hup.recv() => {
                match grow(&cluster, &vol, &served, &mut record, &opts.dir).await {
                    Ok(()) => tracing::info!(volume = %opts.volume, size = record.size, "device grown"),
                    Err(e) => tracing::error!(volume = %opts.volume, error = %e, "could not grow the device"),
                }
            }
            _ = term.recv() => if stop_allowed(&device) { break },
            _ = int.recv() => if stop_allowed(&device) { break },
        }
    }

    // Detach, in order: the device, the data, the lock, the FUSE mount.
    served.stop_device().await?;
    follower.abort();
    if let Err(e) = vol.flush().await {
        tracing::error!(volume = %opts.volume, error = %e, "final flush failed");
    }
    // Release the lock now: the FUSE session thread holds the volume until it ends.
    vol.release().await;
    drop(vol);
    served.finish().await;
    manager.close_all().await;
    let _ = std::fs::remove_file(opts.dir.join(RECORD));
    tracing::info!(volume = %opts.volume, "detached");
    Ok(())
}

/// A device being served.
enum Served {
    Fuse { session: fuser::BackgroundSession, file: PathBuf, device: PathBuf },
    Nbd { index: u32, tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>> },
}

impl Served {
    fn device(&self) -> PathBuf {
        match self {
            Served::Fuse { device, .. } => device.clone(),
            Served::Nbd { index, .. } => PathBuf::from(format!("/dev/nbd{index}")),
        }
    }

    /// Takes the device away (the loop device detached; the NBD device disconnected).
    async fn stop_device(&mut self) -> Result<(), AttachError> {
        match self {
            Served::Fuse { device, .. } => loopdev::detach(device),
            Served::Nbd { index, tasks } => {
                let index = *index;
                tokio::task::spawn_blocking(move || nbd_kernel::disconnect(index))
                    .await
                    .map_err(|e| AttachError::Failed { volume: String::new(), reason: e.to_string() })?
                    .map_err(AttachError::io(format!("disconnecting /dev/nbd{index}")))?;
                // The kernel sends NBD_CMD_DISC on each socket: the transmission loops end.
                for t in tasks.drain(..) {
                    let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
                }
                Ok(())
            }
        }
    }

    /// Ends what is left once the volume is released (the FUSE mount).
    async fn finish(self) {
        if let Served::Fuse { session, .. } = self {
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || session.umount_and_join()).await {
                tracing::warn!(error = %e, "unmounting the FUSE file");
            }
        }
    }
}

async fn serve_fuse(opts: &KeeperOptions, vol: Arc<torus_volume::Volume>) -> Result<Served, AttachError> {
    let fuse_dir = opts.dir.join("fuse");
    unmount_stale(&fuse_dir);
    std::fs::create_dir_all(&fuse_dir).map_err(AttachError::io(format!("creating {}", fuse_dir.display())))?;
    let read_only = opts.read_only;
    let fs = DiskFs::new(vol, tokio::runtime::Handle::current());
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("torus:{}", opts.volume)),
        fuser::MountOption::Subtype("torus".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    let mount_at = fuse_dir.clone();
    let session = tokio::task::spawn_blocking(move || fuser::Session::new(fs, &mount_at, &config)?.spawn())
        .await
        .map_err(|e| AttachError::Failed { volume: opts.volume.clone(), reason: format!("FUSE mount task: {e}") })?
        .map_err(AttachError::io(format!("mounting FUSE at {}", fuse_dir.display())))?;
    let file = fuse_dir.join(DISK);
    match loopdev::attach(&file, read_only) {
        Ok(device) => Ok(Served::Fuse { session, file, device }),
        Err(e) => {
            drop(session);
            Err(e)
        }
    }
}

async fn serve_nbd(vol: Arc<torus_volume::Volume>) -> Result<Served, AttachError> {
    use std::os::fd::AsRawFd;
    let mut kernel_ends = Vec::new();
    let mut tasks = Vec::new();
    let budget = torus_nbd::transmission::Budget::default();
    for _ in 0..NBD_CONNECTIONS {
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().map_err(AttachError::io("creating a socket pair"))?;
        ours.set_nonblocking(true).map_err(AttachError::io("setting a socket non-blocking"))?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(AttachError::io("registering a socket"))?;
        // The kernel's NBD client negotiates nothing: simple replies.
        let features = torus_nbd::handshake::Features::default();
        tasks.push(tokio::spawn(torus_nbd::transmission::serve(stream, vol.clone(), budget.clone(), features)));
        kernel_ends.push(theirs);
    }
    let connect = nbd_kernel::Connect {
        backend: format!("torus:{}", vol.info().name),
        size: vol.size(),
        block_size: 4096,
        flags: torus_nbd::handshake::transmission_flags(&*vol) as u64,
        timeout: 0,
        dead_conn_timeout: NBD_DEAD_CONN_TIMEOUT,
    };
    let fds: Vec<i32> = kernel_ends.iter().map(|s| s.as_raw_fd()).collect();
    let index = tokio::task::spawn_blocking(move || nbd_kernel::connect(&connect, &fds))
        .await
        .map_err(|e| AttachError::Failed { volume: String::new(), reason: e.to_string() })?;
    // The kernel holds its own references to the sockets it was given.
    drop(kernel_ends);
    match index {
        Ok(index) => Ok(Served::Nbd { index, tasks }),
        Err(e) => {
            for t in tasks {
                t.abort();
            }
            Err(AttachError::io("connecting the kernel NBD device (netlink)")(e))
        }
    }
}

fn stop_allowed(device: &Path) -> bool {
    if device_busy(device) {
        tracing::error!(device = %device.display(), "asked to detach while the device is in use (mounted or open): still serving it");
        return false;
    }
    true
}

/// Makes the kernel's size of the FUSE file `size` before the loop device is
/// refreshed. The loop driver asks the file system for the size, but the FUSE
/// inode's own size, which bounds direct reads, is only taken from a getattr
/// no write raced with: a refresh under I/O could leave the device larger
/// than the file, and reads of the new end fail with EIO (seen in CI). A
/// truncate to the same size sets it unconditionally; `lseek(SEEK_END)`
/// reports what the kernel holds, and is checked.
fn fuse_file_size(file: &Path, size: u64, read_only: bool) -> Result<(), AttachError> {
    use std::io::{Seek, SeekFrom};
    let io = |what: &str| AttachError::io(format!("{what} {}", file.display()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if !read_only {
            let f = std::fs::OpenOptions::new().write(true).open(file).map_err(io("opening"))?;
            f.set_len(size).map_err(io("setting the size of"))?;
        }
        // A fresh open and seek: the kernel fetches the attributes again (TTL 0).
        let mut f = std::fs::File::open(file).map_err(io("opening"))?;
        let seen = f.seek(SeekFrom::End(0)).map_err(io("seeking to the end of"))?;
        if seen == size {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(AttachError::Failed {
                volume: file.display().to_string(),
                reason: format!("the kernel still shows {seen} bytes, not {size}"),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

async fn grow(
    cluster: &Cluster,
    vol: &torus_volume::Volume,
    served: &Served,
    record: &mut KeeperRecord,
    dir: &Path,
) -> Result<(), AttachError> {
    let info = cluster
        .volume(&record.volume)
        .await
        .map_err(|e| AttachError::Failed { volume: record.volume.clone(), reason: e.to_string() })?;
    vol.grow(info.size);
    match served {
        Served::Fuse { file, device, .. } => {
            fuse_file_size(file, vol.size(), vol.read_only())?;
            loopdev::refresh_size(device)?;
            let shown = loopdev::size(device)?;
            if shown != vol.size() {
                return Err(AttachError::Failed {
                    volume: record.volume.clone(),
                    reason: format!("{} shows {shown} bytes after the refresh, not {}", device.display(), vol.size()),
                });
            }
        }
        Served::Nbd { index, .. } => {
            nbd_kernel::resize(*index, vol.size()).map_err(AttachError::io(format!("resizing /dev/nbd{index}")))?
        }
    }
    record.size = vol.size();
    record.store(dir)
}
