//! Processes under test: etcd, torusd, torusblk, and the external programs
//! tests call. Every child is killed by PID when its handle is dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A free loopback TCP port (bound once and released), below the kernel's
/// ephemeral range (32768 and up by default): a port from that range can be
/// taken by any outgoing connection between our check and the server's bind,
/// which made tests fail with "Address already in use".
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 20);
    for _ in 0..1000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // splitmix64: spreads the seed and counter over the range.
        let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let port = 20_000 + ((z ^ (z >> 31)) % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

/// The path of one of our binaries, next to the test executable's directory.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("TORUS_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(p.is_file(), "{} not built: run `cargo build --workspace --bins` first (scripts/test does)", p.display());
    p
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Runs a command to completion with a deadline, capturing its output.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: t_out.join().unwrap_or_default(), stderr: t_err.join().unwrap_or_default() }
}

/// A long-running child process, logged to a file, killed on drop.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: sending a signal to a child we spawned and have not reaped.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

impl Proc {
    pub fn spawn(name: &str, cmd: Command, log: PathBuf) -> Proc {
        Self::spawn_with(name, cmd, log, Stdio::null())
    }

    /// Like `spawn`, with a pipe to its standard input (see `input`).
    pub fn spawn_piped(name: &str, cmd: Command, log: PathBuf) -> Proc {
        Self::spawn_with(name, cmd, log, Stdio::piped())
    }

    /// Writes a line to the standard input of a process started with `spawn_piped`.
    pub fn input(&mut self, line: &str) {
        let stdin = self.child.as_mut().and_then(|c| c.stdin.as_mut()).expect("a running process with piped stdin");
        std::io::Write::write_all(stdin, format!("{line}\n").as_bytes()).expect("write to stdin");
    }

    fn spawn_with(name: &str, mut cmd: Command, log: PathBuf, stdin: Stdio) -> Proc {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("open log file");
        let f2 = f.try_clone().expect("clone log file");
        let child = cmd
            .stdin(stdin)
            .stdout(Stdio::from(f))
            .stderr(Stdio::from(f2))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc { child: Some(child), name: name.to_string(), log }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within 15 s. Returns whether it exited by itself.
    pub fn terminate(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        signal(c.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal(c.id(), libc::SIGKILL);
        let _ = c.wait();
        false
    }

    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGSTOP);
        }
    }

    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGCONT);
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGCONT);
            signal(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

fn etcd_healthy(endpoint: &str) -> bool {
    let addr = endpoint.trim_start_matches("http://");
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// The command for one etcd member on `host` (client port `cp`, peer port `pp`).
fn etcd_member(name: &str, data: &std::path::Path, host: &str, cp: u16, pp: u16, cluster: &str) -> Command {
    let mut cmd = Command::new("etcd");
    cmd.arg("--name")
        .arg(name)
        .arg("--data-dir")
        .arg(data)
        .arg("--listen-client-urls")
        .arg(format!("http://{host}:{cp}"))
        .arg("--advertise-client-urls")
        .arg(format!("http://{host}:{cp}"))
        .arg("--listen-peer-urls")
        .arg(format!("http://{host}:{pp}"))
        .arg("--initial-advertise-peer-urls")
        .arg(format!("http://{host}:{pp}"))
        .arg("--initial-cluster")
        .arg(cluster)
        .arg("--log-level")
        .arg("warn");
    cmd
}

/// An etcd server for tests.
pub struct Etcd {
    pub endpoint: String,
    proc: Option<Proc>,
    _dir: Option<tempfile::TempDir>,
    /// How to start it again (private etcd only): data dir, host, client and peer ports.
    restart: Option<(PathBuf, String, u16, u16)>,
    /// A private etcd serving clients over TLS only: its certificate
    /// directory (`torusctl certs issue` layout; clients must present one
    /// of the same CA), and the plain port of its /health.
    tls: Option<(PathBuf, u16)>,
    /// More etcd flags (private etcd only).
    extra: Vec<String>,
}

impl Etcd {
    /// The etcd named by `TORUS_TEST_ETCD`, or a private one started now.
    pub fn start() -> Etcd {
        if let Ok(ep) = std::env::var("TORUS_TEST_ETCD") {
            if !ep.is_empty() {
                return Etcd { endpoint: ep, proc: None, _dir: None, restart: None, tls: None, extra: Vec::new() };
            }
        }
        Self::start_private()
    }

    /// A private etcd on free ports, for tests that stop and restart it.
    pub fn start_private() -> Etcd {
        Self::start_private_on("127.0.0.1")
    }

    /// A private etcd listening on `host` (an address of this machine).
    pub fn start_private_on(host: &str) -> Etcd {
        Self::start_private_with(host, None, &[])
    }

    /// A private etcd on loopback that speaks TLS only and requires client
    /// certificates: server certificate, key and CA from `dir`
    /// (`server-cert.pem`, `server-key.pem`, `ca-cert.pem`). Its endpoint is `https://…`.
    pub fn start_private_tls(dir: &std::path::Path) -> Etcd {
        Self::start_private_with("127.0.0.1", Some(dir), &[])
    }

    /// A private etcd on loopback started with more flags.
    pub fn start_private_args(extra: &[&str]) -> Etcd {
        Self::start_private_with("127.0.0.1", None, extra)
    }

    fn start_private_with(host: &str, tls: Option<&std::path::Path>, extra: &[&str]) -> Etcd {
        crate::require("etcd");
        let dir = tempfile::tempdir().expect("temp dir");
        // A port found free can be taken by another test before etcd binds it:
        // then etcd exits, and it starts again on other ports, in a fresh data dir.
        for attempt in 0..3 {
            let (cp, pp) = (free_port(), free_port());
            let data = dir.path().join(format!("attempt-{attempt}"));
            let scheme = if tls.is_some() { "https://" } else { "" };
            let mut e = Etcd {
                endpoint: format!("{scheme}{host}:{cp}"),
                proc: None,
                _dir: None,
                restart: Some((data, host.to_string(), cp, pp)),
                tls: tls.map(|d| (d.to_path_buf(), free_port())),
                extra: extra.iter().map(|a| a.to_string()).collect(),
            };
            if e.try_launch() {
                e._dir = Some(dir);
                return e;
            }
        }
        panic!("etcd did not start on three sets of ports; see the etcd.log files under {}", dir.path().display());
    }

    fn launch(&mut self) {
        assert!(self.try_launch(), "etcd exited at start: see its etcd.log");
    }

    /// Starts the private etcd and waits until it is healthy; false if it exited first.
    fn try_launch(&mut self) -> bool {
        let (data, host, cp, pp) = self.restart.clone().expect("a private etcd");
        std::fs::create_dir_all(&data).expect("etcd dir");
        let mut cmd = etcd_member("test", &data.join("data"), &host, cp, pp, &format!("test=http://{host}:{pp}"));
        cmd.args(&self.extra);
        let mut endpoint = self.endpoint.clone();
        if let Some((dir, health)) = &self.tls {
            // Later flags win: clients over TLS with certificates; /health stays plain on its own port.
            let url = format!("https://{host}:{cp}");
            cmd.args(["--listen-client-urls", &url, "--advertise-client-urls", &url, "--client-cert-auth"])
                .arg("--cert-file")
                .arg(dir.join("server-cert.pem"))
                .arg("--key-file")
                .arg(dir.join("server-key.pem"))
                .arg("--trusted-ca-file")
                .arg(dir.join("ca-cert.pem"))
                .arg("--listen-metrics-urls")
                .arg(format!("http://{host}:{health}"));
            endpoint = format!("{host}:{health}");
        }
        let mut proc = Proc::spawn("etcd", cmd, data.join("etcd.log"));
        let mut exited = false;
        wait_until(Duration::from_secs(30), "etcd to become healthy", || {
            exited = !proc.is_running();
            exited || etcd_healthy(&endpoint)
        });
        if exited {
            return false;
        }
        self.proc = Some(proc);
        true
    }

    /// Stops a private etcd (SIGTERM); `restart` brings it back with its data.
    pub fn stop(&mut self) {
        if let Some(p) = &mut self.proc {
            p.terminate();
        }
    }

    pub fn restart(&mut self) {
        self.launch();
    }

    pub fn proc(&mut self) -> Option<&mut Proc> {
        self.proc.as_mut()
    }
}

/// A three-member etcd cluster, as users run it: `endpoint` lists all three.
pub struct Etcd3 {
    pub endpoint: String,
    /// Each member's client endpoint and process (`None` once killed).
    pub members: Vec<(String, Option<Proc>)>,
    _dir: tempfile::TempDir,
}

impl Etcd3 {
    pub fn start() -> Etcd3 {
        crate::require("etcd");
        let dir = tempfile::tempdir().expect("temp dir");
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let cluster: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, pp))| format!("m{i}=http://127.0.0.1:{pp}")).collect();
        let token = format!("torus-test-{}", unique_prefix().trim_start_matches('/').replace('/', "-"));
        let mut members = Vec::new();
        for (i, (cp, pp)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let mut cmd = etcd_member(&name, &dir.path().join(&name), "127.0.0.1", *cp, *pp, &cluster.join(","));
            cmd.arg("--initial-cluster-token").arg(&token);
            let proc = Proc::spawn(&format!("etcd-m{i}"), cmd, dir.path().join(format!("m{i}.log")));
            members.push((format!("127.0.0.1:{cp}"), Some(proc)));
        }
        for (ep, _) in &members {
            wait_until(Duration::from_secs(60), &format!("etcd member {ep} to become healthy"), || etcd_healthy(ep));
        }
        let endpoint = members.iter().map(|(ep, _)| ep.clone()).collect::<Vec<_>>().join(",");
        Etcd3 { endpoint, members, _dir: dir }
    }

    /// The index of the member that is the leader now (asked with etcdctl).
    pub fn leader(&self) -> usize {
        crate::require("etcdctl");
        let out = run(
            Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg("--endpoints")
                .arg(&self.endpoint)
                .args(["endpoint", "status", "-w", "json"]),
            Duration::from_secs(30),
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("etcdctl endpoint status JSON");
        let list = v.as_array().expect("a list of endpoints");
        for e in list {
            let (member, leader) = (&e["Status"]["header"]["member_id"], &e["Status"]["leader"]);
            if member == leader {
                let ep = e["Endpoint"].as_str().expect("endpoint").trim_start_matches("http://");
                return self.members.iter().position(|(m, _)| m == ep).expect("a known member");
            }
        }
        panic!("no leader among {}", String::from_utf8_lossy(&out.stdout));
    }

    /// kill -9 of member `i`.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].1.take() {
            p.kill9();
        }
    }

    /// An `Etcd` naming all three members, for `Cluster::init`.
    pub fn as_etcd(&self) -> Etcd {
        Etcd { endpoint: self.endpoint.clone(), proc: None, _dir: None, restart: None, tls: None, extra: Vec::new() }
    }
}

static PREFIX_SEQ: AtomicU64 = AtomicU64::new(0);

/// A unique etcd key prefix for one test.
pub fn unique_prefix() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("/torus-test-{}-{}-{nanos}", std::process::id(), PREFIX_SEQ.fetch_add(1, Ordering::Relaxed))
}

/// One torusd under test.
pub struct Node {
    pub proc: Option<Proc>,
    /// The network namespace it runs in, if not this one.
    pub netns: Option<String>,
    pub data_dir: PathBuf,
    pub peer_addr: String,
    pub http_port: u16,
    pub size: String,
    /// More torusd flags.
    pub extra: Vec<String>,
    pub log: PathBuf,
}

/// One torusblk nbdserve under test.
pub struct Blk {
    pub proc: Proc,
    pub addr: String,
}

impl Blk {
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.addr)
    }
}

/// etcd + storage nodes + an NBD server, under one unique prefix.
pub struct Cluster {
    /// Extra environment for every process started from now on.
    pub env: Vec<(String, String)>,
    pub etcd: Etcd,
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts etcd (or uses the shared one), initialises the cluster and
    /// starts `n` nodes of `size` each, all in the ring.
    pub fn start(n: usize, replication: u32) -> Cluster {
        Self::start_with(Etcd::start(), n, replication, "1GiB")
    }

    pub fn start_with(etcd: Etcd, n: usize, replication: u32, size: &str) -> Cluster {
        let mut c = Self::init(etcd, replication);
        for _ in 0..n {
            c.add_node(size);
        }
        c.start_all_in_ring();
        c
    }

    /// Starts every node added so far and puts them all in the ring.
    pub fn start_all_in_ring(&mut self) {
        for i in 0..self.nodes.len() {
            self.start_node(i);
        }
        self.wait_peers(self.nodes.len());
        self.ctl_ok(&["peer", "add", "--all-peers"]);
    }

    /// An initialised cluster with no nodes yet.
    pub fn init(etcd: Etcd, replication: u32) -> Cluster {
        Self::init_with_env(etcd, replication, Vec::new())
    }

    /// The same, every process (torusctl init included) run with `env`.
    pub fn init_with_env(etcd: Etcd, replication: u32, env: Vec<(String, String)>) -> Cluster {
        let c = Cluster {
            env,
            etcd,
            prefix: unique_prefix(),
            dir: tempfile::tempdir().expect("temp dir"),
            nodes: Vec::new(),
        };
        c.ctl_ok(&["init", "--replication", &replication.to_string()]);
        c
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("TORUS_ETCD", &self.etcd.endpoint).env("TORUS_ETCD_PREFIX", &self.prefix).env("RUST_LOG", "info");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
    }

    /// A command for one of our binaries, pointed at this cluster's etcd and prefix.
    pub fn cmd(&self, binary: &str) -> Command {
        let mut cmd = Command::new(bin(binary));
        self.env(&mut cmd);
        cmd
    }

    /// The same, run inside network namespace `netns` (if any).
    pub fn cmd_in(&self, netns: Option<&str>, binary: &str) -> Command {
        let Some(ns) = netns else { return self.cmd(binary) };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(bin(binary));
        self.env(&mut cmd);
        cmd
    }

    /// Runs torusctl with `args`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        run(self.cmd("torusctl").args(args), Duration::from_secs(60))
    }

    /// Runs torusctl and asserts success; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "torusctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn add_node(&mut self, size: &str) -> usize {
        self.add_node_at(size, "127.0.0.1", None)
    }

    /// A node started with more torusd flags.
    pub fn add_node_with(&mut self, size: &str, extra: &[&str]) -> usize {
        let i = self.add_node(size);
        self.nodes[i].extra = extra.iter().map(|s| s.to_string()).collect();
        i
    }

    /// A node whose peer address is on `ip`, run inside `netns` if given.
    pub fn add_node_at(&mut self, size: &str, ip: &str, netns: Option<&str>) -> usize {
        let i = self.nodes.len();
        let data_dir = self.dir.path().join(format!("node{i}"));
        self.nodes.push(Node {
            proc: None,
            netns: netns.map(str::to_string),
            data_dir,
            peer_addr: format!("{ip}:{}", free_port()),
            http_port: free_port(),
            size: size.to_string(),
            extra: Vec::new(),
            log: self.dir.path().join(format!("node{i}.log")),
        });
        i
    }

    pub fn start_node(&mut self, i: usize) {
        // Another test process may take the HTTP port between our check and
        // torusd's bind: then start it again on another (nothing refers to it).
        for _ in 0..3 {
            match self.try_start_node(i) {
                Ok(()) => return,
                Err(text) if text.contains("listening for HTTP") && text.contains("Address already in use") => {
                    self.nodes[i].http_port = free_port();
                }
                Err(text) => panic!("torusd {i} failed to start: {text}"),
            }
        }
        panic!("torusd {i} found no free HTTP port in 3 tries");
    }

    /// Starts a node; `Err` with its log if it exited complaining.
    fn try_start_node(&mut self, i: usize) -> Result<(), String> {
        let n = &self.nodes[i];
        let mut cmd = self.cmd_in(n.netns.as_deref(), "torusd");
        cmd.arg("--data-dir")
            .arg(&n.data_dir)
            .arg("--size")
            .arg(&n.size)
            .arg("--peer-address")
            .arg(&n.peer_addr)
            .arg("--port")
            .arg(n.http_port.to_string())
            .arg("--lease-ttl")
            .arg("5")
            .args(&n.extra);
        let proc = Proc::spawn(&format!("torusd{i}"), cmd, n.log.clone());
        let addr = n.peer_addr.clone();
        self.nodes[i].proc = Some(proc);
        let log = self.nodes[i].log.clone();
        let mut failed = None;
        wait_until(Duration::from_secs(30), &format!("torusd {i} to listen on {addr}"), || {
            if TcpStream::connect(&addr).is_ok() {
                return true;
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("torusd: ") {
                failed = Some(text);
                return true;
            }
            false
        });
        match failed {
            None => Ok(()),
            Some(text) => {
                // The log is appended to by the next start: keep this one's story apart.
                let _ = std::fs::rename(&log, log.with_extension(format!("failed-{}.log", free_port())));
                Err(text)
            }
        }
    }

    pub fn node(&mut self, i: usize) -> &mut Proc {
        self.nodes[i].proc.as_mut().expect("node is running")
    }

    /// Waits until `n` nodes are registered.
    pub fn wait_peers(&self, n: usize) {
        wait_until(Duration::from_secs(30), &format!("{n} registered peers"), || {
            let out = self.ctl(&["list-peers", "-o", "json"]);
            out.status.success() && String::from_utf8_lossy(&out.stdout).matches("\"in_ring\"").count() >= n
        });
    }

    /// Starts `torusblk nbdserve` on a free port with extra flags.
    pub fn start_blk(&self, extra: &[&str]) -> Blk {
        self.start_blk_at("127.0.0.1", None, extra)
    }

    /// Starts `torusblk nbdserve` listening on `ip`, inside `netns` if given.
    pub fn start_blk_at(&self, ip: &str, netns: Option<&str>, extra: &[&str]) -> Blk {
        let addr = format!("{ip}:{}", free_port());
        let mut cmd = self.cmd_in(netns, "torusblk");
        cmd.arg("nbdserve").arg("--listen").arg(&addr).args(extra);
        let log = self.dir.path().join(format!("blk-{}.log", addr.replace(':', "_")));
        let proc = Proc::spawn("torusblk", cmd, log.clone());
        wait_until(Duration::from_secs(30), &format!("torusblk to listen on {addr}"), || {
            TcpStream::connect(&addr).is_ok()
        });
        Blk { proc, addr }
    }

    /// What extent `rel` (`<vol>/<index>`) reads as on node `i`'s disk: its
    /// data blocks from the data file, zeroes for absent or zeroed blocks
    /// (per the checksum table; see docs/format.md), `extent_size` bytes.
    pub fn extent_bytes(&self, i: usize, rel: &str, extent_size: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        const BS: usize = 4096;
        let base = self.nodes[i].data_dir.join("store/extents").join(rel);
        let (vol_dir, index) = (base.parent().expect("a volume dir"), base.file_name().expect("an index"));
        let index: u64 = index.to_string_lossy().parse().expect("an extent index");
        let (data, data_base) = torus_store::data_file(vol_dir, index);
        // The table: in the same file (format 2, before the data) or in `.sum` (format 1).
        let table_file = if data_base > 0 { data.clone() } else { base.with_extension("sum") };
        let table_len = 4096 + extent_size / BS * 8;
        let mut table = vec![0u8; table_len];
        let mut bytes = vec![0u8; extent_size];
        if let Ok(f) = std::fs::File::open(&table_file) {
            let _ = f.read_at(&mut table, 0);
        }
        if let Ok(f) = std::fs::File::open(&data) {
            let _ = f.read_at(&mut bytes, data_base);
        }
        let mut out = vec![0u8; extent_size];
        for (b, entry) in table[4096..].chunks_exact(8).enumerate() {
            let at = b * BS;
            if entry[4] == 1 && at + BS <= extent_size {
                out[at..at + BS].copy_from_slice(&bytes[at..at + BS]);
            }
        }
        out
    }

    /// Every extent held by node `i`, as relative paths (`<vol>/<index>`).
    pub fn extents_on_disk(&self, i: usize) -> Vec<String> {
        let root = self.nodes[i].data_dir.join("store/extents");
        let mut out = Vec::new();
        for v in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(v.path()).into_iter().flatten().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if let Some(idx) = name.strip_suffix(".extent").or_else(|| name.strip_suffix(".dat")) {
                    out.push(format!("{}/{idx}", v.file_name().to_string_lossy()));
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Stop the nodes (their Proc handles kill by PID), then drop our keys from a shared etcd.
        for n in &mut self.nodes {
            if let Some(p) = &mut n.proc {
                p.kill9();
            }
        }
        if self.etcd.proc.is_none() && !std::thread::panicking() {
            let _ = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["--endpoints", &self.etcd.endpoint, "del", "--prefix", &format!("{}/", self.prefix)])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}
