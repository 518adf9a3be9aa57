//! CSI node plugins under test, each in its own cgroup so that a test can
//! kill every process of a "node" at once (`cgroup.kill`: the plugin and the
//! keepers it started), or only the plugin (a restart or upgrade).
//!
//! Layout: `<cgroup v2 root>/torus-test-<pid>-<n>/{plugin,keepers}`. On drop,
//! everything is undone in order: mounts under the plugin's directory, loop
//! devices bound to files there, every process of the cgroup, FUSE mounts,
//! the cgroups.

use crate::procs::{wait_until, Cluster, Proc};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static CGROUP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Where cgroup v2 is mounted on this machine.
pub fn cgroup2_root() -> PathBuf {
    for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if Path::new(p).join("cgroup.procs").exists() && Path::new(p).join("cgroup.subtree_control").exists() {
            return PathBuf::from(p);
        }
    }
    panic!("no cgroup v2 hierarchy found (looked at /sys/fs/cgroup/unified and /sys/fs/cgroup)");
}

/// A cgroup v2 directory of ours, killed and removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new() -> Cgroup {
        let n = CGROUP_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = cgroup2_root().join(format!("torus-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", path.display()));
        Cgroup { path }
    }

    pub fn child(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", p.display()));
        p
    }

    /// Every pid in `dir` and below.
    pub fn pids(dir: &Path) -> Vec<u32> {
        let mut out: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                out.extend(Self::pids(&e.path()));
            }
        }
        out
    }

    /// Kills every process in `dir` and below at once, and waits until they are gone.
    pub fn kill(dir: &Path) {
        if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
            return;
        }
        wait_until(Duration::from_secs(30), &format!("cgroup {} to empty", dir.display()), || {
            Self::pids(dir).is_empty()
        });
    }

    fn remove(dir: &Path) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                Self::remove(&e.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
}

impl Default for Cgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        Self::kill(&self.path);
        Self::remove(&self.path);
    }
}

/// Makes `cmd`'s process join cgroup `dir` before it runs.
pub fn in_cgroup(cmd: &mut Command, dir: &Path) {
    let procs = std::ffi::CString::new(dir.join("cgroup.procs").to_string_lossy().as_bytes()).expect("no NUL");
    // SAFETY: open/write/close only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if ok {
                Ok(())
            } else {
                Err(err)
            }
        });
    }
}

/// One `torusblk csi` process ("a host"), with its own directories and cgroup.
pub struct CsiPlugin {
    pub node_id: String,
    pub mode: String,
    /// Everything of this plugin lives below: socket, state, staging and target paths.
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub extra: Vec<String>,
    pub proc: Option<Proc>,
    starts: u32,
    cmd: Command,
    // Dropped last: the cgroup, with the plugin and its keepers.
    pub cgroup: Cgroup,
}

impl Cluster {
    /// Starts `torusblk csi --mode <mode> --node-id <node_id>` in a cgroup of its own.
    pub fn start_csi(&self, node_id: &str, mode: &str, extra: &[&str]) -> CsiPlugin {
        let dir = self.dir.path().join(format!("csi-{node_id}"));
        std::fs::create_dir_all(&dir).expect("plugin dir");
        let cgroup = Cgroup::new();
        let keepers = cgroup.child("keepers");
        cgroup.child("plugin");
        let socket = dir.join("csi.sock");
        let state_dir = dir.join("state");
        let mut cmd = self.cmd("torusblk");
        cmd.arg("csi")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--node-id")
            .arg(node_id)
            .arg("--mode")
            .arg(mode)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--keeper-cgroup")
            .arg(&keepers)
            .args(extra);
        let mut p = CsiPlugin {
            node_id: node_id.to_string(),
            mode: mode.to_string(),
            dir,
            socket,
            state_dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            proc: None,
            starts: 0,
            cmd,
            cgroup,
        };
        p.start();
        p
    }
}

impl CsiPlugin {
    fn start(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let mut cmd = Command::new(self.cmd.get_program());
        cmd.args(self.cmd.get_args());
        for (k, v) in self.cmd.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        in_cgroup(&mut cmd, &self.cgroup.path.join("plugin"));
        self.starts += 1;
        let log = self.dir.join(format!("plugin-{}.log", self.starts));
        self.proc = Some(Proc::spawn(&format!("csi-{}", self.node_id), cmd, log.clone()));
        let socket = self.socket.clone();
        wait_until(Duration::from_secs(30), &format!("the CSI plugin {} to listen", self.node_id), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(!text.contains("torusblk: "), "the CSI plugin failed to start: {text}");
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
    }

    /// The plugin's current log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("plugin-{}.log", self.starts))).unwrap_or_default()
    }

    /// Every log of this plugin and its keepers, for failure messages.
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.starts {
            out += &std::fs::read_to_string(self.dir.join(format!("plugin-{i}.log"))).unwrap_or_default();
        }
        for e in std::fs::read_dir(self.state_dir.join("attach")).into_iter().flatten().flatten() {
            out += &format!("--- keeper {}\n", e.path().display());
            out += &std::fs::read_to_string(e.path().join("keeper.log")).unwrap_or_default();
        }
        out
    }

    /// A restart of the plugin alone (every process of its own cgroup killed at once, as a
    /// container restart would), then a new plugin with the same flags and state.
    pub fn restart(&mut self) {
        Cgroup::kill(&self.cgroup.path.join("plugin"));
        self.proc = None;
        self.start();
    }

    /// The death of the whole host: the plugin and every keeper killed at once.
    pub fn kill_host(&mut self) {
        Cgroup::kill(&self.cgroup.path);
        self.proc = None;
    }

    /// A path for staging or publishing under this plugin's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Unmounts the mounts below `dir` (FUSE ones only if `fuse`, others only if
/// not), deepest first, lazily: the host may be "dead".
fn unmount_below(dir: &Path, fuse: bool) {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<String> = text
        .lines()
        .filter(|l| l.split(" - ").nth(1).is_some_and(|r| r.starts_with("fuse") == fuse))
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| p.replace("\\040", " "))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(&p).stderr(Stdio::null()).status();
    }
}

/// Detaches every loop device whose backing file is below `dir`, and first
/// those stacked on them (a read-only block publish).
fn detach_loops_below(dir: &Path) {
    let loops: Vec<(String, String)> = std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            name.starts_with("loop").then(|| (name, backing.trim_end().to_string()))
        })
        .collect();
    let ours: Vec<&String> = loops.iter().filter(|(_, b)| Path::new(b).starts_with(dir)).map(|(n, _)| n).collect();
    let stacked = loops.iter().filter(|(_, b)| ours.iter().any(|n| *b == format!("/dev/{n}"))).map(|(n, _)| n);
    for name in stacked.chain(ours.iter().copied()) {
        let _ = Command::new("losetup").arg("-d").arg(format!("/dev/{name}")).stderr(Stdio::null()).status();
    }
}

impl Drop for CsiPlugin {
    fn drop(&mut self) {
        // File systems and bind mounts first, then the loop devices (while
        // their FUSE files still have their paths), then every process, then
        // the FUSE mounts.
        unmount_below(&self.dir, false);
        detach_loops_below(&self.dir);
        Cgroup::kill(&self.cgroup.path);
        self.proc = None;
        unmount_below(&self.dir, true);
    }
}
