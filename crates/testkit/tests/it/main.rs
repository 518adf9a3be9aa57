//! End-to-end tests: real etcd, real `torusd` and `torusblk` processes, and
//! NBD clients none of us wrote (nbdinfo, nbdcopy, qemu-io, qemu-img, fio,
//! nbdfuse + loop + ext4).

mod bad_input;
mod cluster;
mod console;
mod csi;
mod deploy;
mod durability;
mod encryption;
mod etcd_ha;
mod failures;
mod faults;
mod filesystem;
mod full;
mod healing;
mod logs;
mod memory;
mod metrics;
mod nbd_clients;
mod node_loss;
mod partition;
mod queued;
mod resize;
mod scale;
mod snapshots;
mod sparse;
mod tls;
mod transfer;
mod wait;
mod writer_crash;

use std::process::{Command, Output};
use std::time::Duration;

/// Runs an external program (which must be installed) and asserts it succeeded.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn run(cmd: &mut Command) -> Output {
    torus_testkit::require(&cmd.get_program().to_string_lossy());
    torus_testkit::run(cmd, Duration::from_secs(300))
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Every file under `dir`, recursively (the nodes' data directories, to search or compare).
pub fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// GET `path` from a torusd's HTTP port on loopback; the whole response.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to torusd HTTP");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// Writes `len` random bytes (from `seed`) to the export at `uri` with
/// nbdcopy and a flush; returns them, to compare with what reads back.
pub fn write_known(c: &torus_testkit::Cluster, uri: &str, len: usize, seed: u64) -> Vec<u8> {
    let src = c.dir.path().join(format!("known-{seed:x}.bin"));
    let data = torus_testkit::random_bytes(len, seed);
    std::fs::write(&src, &data).unwrap();
    ok(Command::new("nbdcopy").arg("--flush").arg(&src).arg(uri));
    data
}

/// A node's id, from its data directory.
pub fn node_id(c: &torus_testkit::Cluster, i: usize) -> torus_types::NodeId {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.nodes[i].data_dir.join("node.json")).unwrap()).unwrap();
    torus_types::NodeId::parse(v["id"].as_str().unwrap()).unwrap()
}

/// The ring's placement as `torusctl ring get` reports it (weights, failure-domain labels, full marks).
pub fn ring_of(c: &torus_testkit::Cluster) -> torus_ring::Ring {
    let ring_json: serde_json::Value = serde_json::from_str(&c.ctl_ok(&["ring", "get", "-o", "json"])).unwrap();
    let doc: torus_meta::cluster::RingDoc = serde_json::from_value(ring_json["ring"].clone()).expect("a ring document");
    doc.placement()
}

/// The id of the cluster's only volume.
pub fn volume_id(c: &torus_testkit::Cluster) -> u64 {
    let vol: serde_json::Value = serde_json::from_str(&c.ctl_ok(&["volume", "list", "-o", "json"])).unwrap();
    vol[0]["id"].as_u64().unwrap()
}

/// Waits until a writer can open `volume` on the NBD server at `addr` (an
/// earlier writer's lease must lapse first); returns the open connection.
pub fn wait_open(addr: &str, volume: &str, timeout: Duration) -> torus_testkit::nbd::Raw {
    let mut w = None;
    torus_testkit::wait_until(timeout, "a new writer to open the volume", || {
        let (mut r, _) = torus_testkit::nbd::Raw::connect(addr);
        r.send(&3u32.to_be_bytes());
        if r.go(volume).is_ok() {
            w = Some(r);
            true
        } else {
            false
        }
    });
    w.expect("opened")
}

/// Waits until no rebalance is in progress (per `torusctl status`).
pub fn wait_rebalanced(c: &torus_testkit::Cluster) {
    torus_testkit::wait_until(Duration::from_secs(180), "the rebalance to finish", || {
        c.ctl_ok(&["status"]).contains("none in progress")
    });
}

/// Runs qemu-io's commands (`-c`) against an NBD URI; its output.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    ok(cmd.arg(uri))
}

/// Runs torusctl, which must fail with `needle` in its error output.
pub fn fails_with(c: &torus_testkit::Cluster, args: &[&str], needle: &str) {
    let out = c.ctl(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(needle),
        "torusctl {args:?}: want an error with {needle:?}, got {err}"
    );
}
