//! The [`Attacher`] the CSI node service calls, and [`ProcessAttacher`], its
//! implementation with one keeper process per attached volume.
//!
//! A keeper is started in its own session (`setsid`) and, when a cgroup is
//! given, in that cgroup (moved there before it runs): a restart or upgrade
//! of the node plugin ends neither. The plugin finds keepers again through
//! their directories (`record`: a lock held while the keeper lives, a record
//! once it is ready), so every call here works the same after a restart,
//! even one that came while a keeper was starting. Calls for one volume are
//! serialised; calls are idempotent.

use crate::keeper::{unmount_stale, Backend};
use crate::record::{attach_dir, keeper_state, KeeperRecord, KeeperState, LOG, RECORD};
use crate::{loopdev, AttachError};
use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachRequest {
    pub volume: String,
    pub read_only: bool,
}

/// A volume attached on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub volume: String,
    pub device: PathBuf,
    pub size: u64,
    pub read_only: bool,
    /// Why it cannot serve as it should, if it cannot (its lease was lost).
    pub problem: Option<String>,
}

impl From<KeeperRecord> for Attachment {
    fn from(r: KeeperRecord) -> Self {
        Attachment { volume: r.volume, device: r.device, size: r.size, read_only: r.read_only, problem: r.problem }
    }
}

/// Makes volumes local block devices. Every method is idempotent.
pub trait Attacher: Send + Sync + 'static {
    /// Attaches a volume, or returns its attachment if it is already attached
    /// the same way. Waits a bounded time for another holder's lease to lapse.
    fn attach(&self, req: &AttachRequest) -> impl Future<Output = Result<Attachment, AttachError>> + Send;
    /// The volume's live attachment on this host, if any.
    fn find(&self, volume: &str) -> Option<Attachment>;
    /// Detaches a volume (nothing attached: nothing to do). Refused while the device is in use.
    fn detach(&self, volume: &str) -> impl Future<Output = Result<(), AttachError>> + Send;
    /// Makes an attached volume's device show at least `size` bytes (after the volume grew).
    fn grow(&self, volume: &str, size: u64) -> impl Future<Output = Result<Attachment, AttachError>> + Send;
}

#[derive(Clone, Debug)]
pub struct ProcessAttacher {
    state_dir: PathBuf,
    /// The keeper's program and the arguments that come before `keeper`
    /// (e.g. `torusblk -C <etcd> --etcd-prefix <p>`).
    command: Vec<OsString>,
    /// Arguments appended after `keeper` (e.g. `--lease-ttl 10`).
    keeper_args: Vec<OsString>,
    cgroup: Option<PathBuf>,
    lock_wait: Duration,
    backend: Backend,
    busy: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// How long a keeper may take to open the volume, mount and bind, beyond waiting for a lock.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a keeper may take to detach (final flush included).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a device may stay open before detaching it is refused as in use.
const BUSY_GRACE: Duration = Duration::from_secs(2);

impl ProcessAttacher {
    pub fn new(
        state_dir: PathBuf,
        command: Vec<OsString>,
        keeper_args: Vec<OsString>,
        cgroup: Option<PathBuf>,
        lock_wait: Duration,
        backend: Backend,
    ) -> Self {
        ProcessAttacher { state_dir, command, keeper_args, cgroup, lock_wait, backend, busy: Default::default() }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    fn serialise(&self, volume: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.busy.lock().expect("attacher map poisoned").entry(volume.to_string()).or_default().clone()
    }

    fn live_record(&self, volume: &str) -> Option<KeeperRecord> {
        match keeper_state(&attach_dir(&self.state_dir, volume)) {
            KeeperState::Ready(r) => Some(r),
            _ => None,
        }
    }

    /// The keeper's state once it is no longer starting (waits, bounded, for one that is).
    async fn settled_state(&self, dir: &Path) -> KeeperState {
        let deadline = Instant::now() + self.lock_wait + START_TIMEOUT;
        loop {
            match keeper_state(dir) {
                KeeperState::Starting if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                state => return state,
            }
        }
    }

    /// Removes what a keeper that died left behind: its loop device, its FUSE
    /// mount, its kernel NBD device, its record.
    fn clean_stale(&self, dir: &Path) {
        if let Some(rec) = KeeperRecord::load(dir).filter(|r| r.backend == Backend::KernelNbd.name()) {
            // Only if the device still serves this volume (indexes are reused).
            let index = crate::nbd_kernel::index_of(&rec.device)
                .filter(|i| crate::nbd_kernel::backend_of(*i).as_deref() == Some(&format!("torus:{}", rec.volume)));
            if let Some(index) = index {
                if let Err(e) = crate::nbd_kernel::disconnect(index) {
                    tracing::warn!(device = %rec.device.display(), error = %e, "could not disconnect a dead keeper's NBD device");
                }
            }
        }
        let fuse_dir = dir.join("fuse");
        for dev in loopdev::devices_of(&fuse_dir.join(crate::fuse::DISK)) {
            if let Err(e) = loopdev::detach(&dev) {
                tracing::warn!(device = %dev.display(), error = %e, "could not detach a dead keeper's loop device");
            }
        }
        unmount_stale(&fuse_dir);
        let _ = std::fs::remove_file(dir.join(RECORD));
    }

    fn spawn(&self, req: &AttachRequest, dir: &Path) -> Result<std::process::Child, AttachError> {
        std::fs::create_dir_all(dir).map_err(AttachError::io(format!("creating {}", dir.display())))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(LOG))
            .map_err(AttachError::io(format!("opening {}", dir.join(LOG).display())))?;
        let log2 = log.try_clone().map_err(AttachError::io("duplicating the log file"))?;
        let (program, before) = self.command.split_first().ok_or_else(|| AttachError::Failed {
            volume: req.volume.clone(),
            reason: "no keeper command configured".into(),
        })?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(before)
            .arg("keeper")
            .arg("--volume")
            .arg(&req.volume)
            .arg("--dir")
            .arg(dir)
            .arg("--lock-wait-ms")
            .arg(self.lock_wait.as_millis().to_string())
            .arg("--backend")
            .arg(self.backend.name())
            .args(&self.keeper_args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2);
        if req.read_only {
            cmd.arg("--read-only");
        }
        let procs = match &self.cgroup {
            Some(cg) => {
                std::fs::create_dir_all(cg).map_err(AttachError::io(format!("creating cgroup {}", cg.display())))?;
                Some(CString::new(cg.join("cgroup.procs").as_os_str().as_bytes()).map_err(|_| AttachError::Failed {
                    volume: req.volume.clone(),
                    reason: "cgroup path holds a NUL byte".into(),
                })?)
            }
            None => None,
        };
        // SAFETY: only async-signal-safe calls (setsid, open, write, close) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(p) = &procs {
                    // In a container with its own cgroup namespace, a cgroup outside
                    // it cannot be entered: join the host's namespace first (with
                    // hostPID, pid 1 is the host's init). Without one, nothing changes.
                    let ns = libc::open(c"/proc/1/ns/cgroup".as_ptr(), libc::O_RDONLY);
                    if ns >= 0 {
                        libc::setns(ns, libc::CLONE_NEWCGROUP);
                        libc::close(ns);
                    }
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if !ok {
                        return Err(err);
                    }
                }
                Ok(())
            });
        }
        cmd.spawn().map_err(AttachError::io(format!("starting the keeper for {}", req.volume)))
    }
}

/// The last error line a keeper wrote to its log.
fn last_error(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join(LOG)).unwrap_or_default();
    log.lines()
        .rev()
        .find(|l| l.starts_with("torusblk") || l.contains("ERROR"))
        .or_else(|| log.lines().last())
        .unwrap_or("no output")
        .trim()
        .to_string()
}

fn pid_of(child: &std::process::Child) -> libc::pid_t {
    child.id() as libc::pid_t
}

impl Attacher for ProcessAttacher {
    async fn attach(&self, req: &AttachRequest) -> Result<Attachment, AttachError> {
        let lock = self.serialise(&req.volume);
        let _held = lock.lock().await;
        let dir = attach_dir(&self.state_dir, &req.volume);
        match self.settled_state(&dir).await {
            KeeperState::Ready(rec) => {
                if rec.read_only != req.read_only {
                    let how = if rec.read_only { "read-only" } else { "read-write" };
                    return Err(AttachError::Incompatible { volume: req.volume.clone(), how: how.into() });
                }
                return Ok(rec.into());
            }
            KeeperState::Starting => {
                return Err(AttachError::Failed {
                    volume: req.volume.clone(),
                    reason: "a keeper for it has been starting for too long".into(),
                })
            }
            KeeperState::Dead => self.clean_stale(&dir),
        }
        let mut child = self.spawn(req, &dir)?;
        let pid = pid_of(&child) as u32;
        let waited = self.lock_wait + START_TIMEOUT;
        let deadline = Instant::now() + waited;
        loop {
            if let Some(rec) = KeeperRecord::load(&dir).filter(|r| r.pid == pid) {
                // Reap the keeper whenever it ends (it is our child until we restart).
                std::thread::spawn(move || child.wait());
                return Ok(rec.into());
            }
            if let Ok(Some(status)) = child.try_wait() {
                let reason = last_error(&dir);
                self.clean_stale(&dir);
                return Err(match status.code() {
                    Some(crate::keeper::EXIT_IN_USE) => {
                        AttachError::InUse { volume: req.volume.clone(), holder: reason }
                    }
                    Some(crate::keeper::EXIT_NOT_FOUND) => AttachError::VolumeNotFound { volume: req.volume.clone() },
                    Some(crate::keeper::EXIT_UNAVAILABLE) => {
                        AttachError::Unavailable { volume: req.volume.clone(), reason }
                    }
                    _ => AttachError::Failed { volume: req.volume.clone(), reason },
                });
            }
            if Instant::now() >= deadline {
                // SAFETY: signalling our own child by pid.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                let _ = child.wait();
                self.clean_stale(&dir);
                return Err(AttachError::Failed {
                    volume: req.volume.clone(),
                    reason: format!("the keeper did not get ready within {waited:?}: {}", last_error(&dir)),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn find(&self, volume: &str) -> Option<Attachment> {
        self.live_record(volume).map(Attachment::from)
    }

    async fn detach(&self, volume: &str) -> Result<(), AttachError> {
        let lock = self.serialise(volume);
        let _held = lock.lock().await;
        let dir = attach_dir(&self.state_dir, volume);
        match self.settled_state(&dir).await {
            KeeperState::Ready(rec) => {
                // A device just unmounted may still be open for a moment (udev probes
                // it after every change): wait a little before calling it in use.
                let deadline = Instant::now() + BUSY_GRACE;
                while crate::keeper::device_busy(&rec.device) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if crate::keeper::device_busy(&rec.device) {
                    return Err(AttachError::DeviceBusy {
                        volume: volume.to_string(),
                        device: rec.device.display().to_string(),
                    });
                }
                // SAFETY: plain kill(2) of the keeper its locked record names.
                unsafe { libc::kill(rec.pid as libc::pid_t, libc::SIGTERM) };
                let deadline = Instant::now() + STOP_TIMEOUT;
                while crate::record::locked(&dir) {
                    if Instant::now() >= deadline {
                        return Err(AttachError::Failed {
                            volume: volume.to_string(),
                            reason: format!("the keeper (pid {}) did not stop: {}", rec.pid, last_error(&dir)),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            KeeperState::Starting => {
                return Err(AttachError::Failed {
                    volume: volume.to_string(),
                    reason: "a keeper for it has been starting for too long".into(),
                })
            }
            KeeperState::Dead => {}
        }
        self.clean_stale(&dir);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(AttachError::io(format!("removing {}", dir.display())))?;
        }
        Ok(())
    }

    async fn grow(&self, volume: &str, size: u64) -> Result<Attachment, AttachError> {
        let lock = self.serialise(volume);
        let _held = lock.lock().await;
        let rec = self.live_record(volume).ok_or_else(|| AttachError::Failed {
            volume: volume.to_string(),
            reason: "it is not attached on this host".into(),
        })?;
        if rec.size >= size {
            return Ok(rec.into());
        }
        // SAFETY: plain kill(2) of the keeper the live record names.
        unsafe { libc::kill(rec.pid as libc::pid_t, libc::SIGHUP) };
        let dir = attach_dir(&self.state_dir, volume);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(r) = KeeperRecord::load(&dir).filter(|r| r.size >= size) {
                return Ok(r.into());
            }
            if Instant::now() >= deadline {
                return Err(AttachError::Failed {
                    volume: volume.to_string(),
                    reason: format!("the device did not grow to {size} bytes: {}", last_error(&dir)),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
