//! The keeper: the process that holds one attachment. It opens the volume
//! (taking the writer lock for a writable attachment, waiting up to
//! `lock_wait` for a dead holder's lease to lapse), serves it as a local block
//! device, records itself in `keeper.json`, and then waits:
//!
//! - SIGHUP: the volume was grown; take the new size from the metadata and
//!   show it on the device (FUSE attributes, `losetup --set-capacity`).
//! - SIGTERM / SIGINT: detach — unless the device is still open (mounted):
//!   then it refuses and keeps serving, since stopping would fail the I/O of
//!   whoever holds it. Detach = loop device off, flush, FUSE unmounted, the
//!   writer lock released, the record removed.
//!
//! The keeper is its own process so that the node plugin can restart or be
//! upgraded without ending it: the plugin finds it again through the record.

use crate::fuse::{DiskFs, DISK};
use crate::record::{start_time, KeeperRecord, RECORD};
use crate::{loopdev, AttachError};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};
use torus_meta::cluster::{Cluster, ClusterError};
use torus_volume::{BlockDevice, ManagerOptions, VolumeError, VolumeManager};

#[derive(Clone, Debug)]
pub struct KeeperOptions {
    pub volume: String,
    /// The attachment's directory (`<state dir>/attach/<volume>`).
    pub dir: PathBuf,
    pub read_only: bool,
    /// How long to wait for another holder's writer lock to lapse.
    pub lock_wait: Duration,
    pub manager: ManagerOptions,
}

/// The exit status a keeper reports when it could not attach, so the plugin
/// can tell "in use elsewhere" and "no such volume" from other failures.
pub fn exit_code(e: &AttachError) -> i32 {
    match e {
        AttachError::InUse { .. } => 2,
        AttachError::VolumeNotFound { .. } => 3,
        _ => 1,
    }
}

/// Opens the volume, waiting up to `lock_wait` while another writer holds it.
async fn open(manager: &VolumeManager, opts: &KeeperOptions) -> Result<Arc<torus_volume::Volume>, AttachError> {
    let deadline = Instant::now() + opts.lock_wait;
    let mut logged = false;
    loop {
        match manager.open(&opts.volume, !opts.read_only).await {
            Ok(v) => return Ok(v),
            Err(VolumeError::Cluster(ClusterError::VolumeLocked { holder, .. })) => {
                if Instant::now() >= deadline {
                    return Err(AttachError::InUse { volume: opts.volume.clone(), holder });
                }
                if !logged {
                    tracing::info!(volume = %opts.volume, %holder, wait = ?opts.lock_wait, "volume held elsewhere; waiting for its lease");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(VolumeError::Cluster(ClusterError::VolumeNotFound { .. })) => {
                return Err(AttachError::VolumeNotFound { volume: opts.volume.clone() })
            }
            Err(e) => return Err(AttachError::Failed { volume: opts.volume.clone(), reason: e.to_string() }),
        }
    }
}

/// Whether someone (a mount, a process) has the device open: an exclusive open fails then.
pub(crate) fn device_busy(dev: &Path) -> bool {
    match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(dev) {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
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
    let manager = Arc::new(VolumeManager::new(cluster.clone(), opts.manager.clone()));
    let vol = open(&manager, &opts).await?;
    let follower = tokio::spawn(manager.clone().follow_ring());

    let fuse_dir = opts.dir.join("fuse");
    unmount_stale(&fuse_dir);
    std::fs::create_dir_all(&fuse_dir).map_err(AttachError::io(format!("creating {}", fuse_dir.display())))?;
    let fs = DiskFs::new(vol.clone(), tokio::runtime::Handle::current());
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
    let device = match loopdev::attach(&file, opts.read_only) {
        Ok(d) => d,
        Err(e) => {
            drop(session);
            manager.close_all().await;
            return Err(e);
        }
    };
    let me = std::process::id();
    let mut record = KeeperRecord {
        volume: opts.volume.clone(),
        pid: me,
        start_time: start_time(me).unwrap_or_default(),
        device: device.clone(),
        size: vol.size(),
        read_only: opts.read_only,
        backend: "fuse".into(),
        epoch: vol.epoch().0,
    };
    record.store(&opts.dir)?;
    tracing::info!(volume = %opts.volume, device = %device.display(), size = record.size, epoch = record.epoch, "attached");

    loop {
        tokio::select! {
            _ = hup.recv() => {
                match grow(&cluster, &vol, &file, &device, &mut record, &opts.dir).await {
                    Ok(()) => tracing::info!(volume = %opts.volume, size = record.size, "device grown"),
                    Err(e) => tracing::error!(volume = %opts.volume, error = %e, "could not grow the device"),
                }
            }
            _ = term.recv() => if stop_allowed(&device) { break },
            _ = int.recv() => if stop_allowed(&device) { break },
        }
    }

    // Detach, in order: the loop device, the data, the FUSE mount, the lock.
    loopdev::detach(&device)?;
    follower.abort();
    if let Err(e) = vol.flush().await {
        tracing::error!(volume = %opts.volume, error = %e, "final flush failed");
    }
    // Release the lock now: the FUSE session thread holds the volume until it ends.
    vol.release().await;
    drop(vol);
    let unmounted = tokio::task::spawn_blocking(move || session.umount_and_join()).await;
    if let Ok(Err(e)) = unmounted {
        tracing::warn!(volume = %opts.volume, error = %e, "unmounting the FUSE file");
    }
    manager.close_all().await;
    let _ = std::fs::remove_file(opts.dir.join(RECORD));
    tracing::info!(volume = %opts.volume, "detached");
    Ok(())
}

fn stop_allowed(device: &Path) -> bool {
    if device_busy(device) {
        tracing::error!(device = %device.display(), "asked to detach while the device is in use (mounted or open): still serving it");
        return false;
    }
    true
}

async fn grow(
    cluster: &Cluster,
    vol: &torus_volume::Volume,
    file: &Path,
    device: &Path,
    record: &mut KeeperRecord,
    dir: &Path,
) -> Result<(), AttachError> {
    let info = cluster
        .volume(&record.volume)
        .await
        .map_err(|e| AttachError::Failed { volume: record.volume.clone(), reason: e.to_string() })?;
    vol.grow(info.size);
    // Attributes are not cached: this stat makes the kernel take the new size.
    std::fs::metadata(file).map_err(AttachError::io(format!("stat {}", file.display())))?;
    loopdev::refresh_size(device)?;
    record.size = vol.size();
    record.store(dir)
}
