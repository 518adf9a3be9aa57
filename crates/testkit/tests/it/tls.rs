//! Mutual TLS on the peer protocol: a cluster whose every process has a TLS
//! directory from `torusctl certs` serves volumes as before; a connection
//! without a certificate, with a self-signed one, or with one from another
//! CA is refused before any request is handled, and nothing on the nodes'
//! disks changes.

use crate::{ok, qemu_io};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use torus_proto::{Op, RequestHeader};
use torus_testkit::{bin, Cluster, Etcd};
use torus_types::{Epoch, ExtentId, VolumeId};

/// Every file under `dir` with its contents (the nodes' data, to compare before and after).
fn snapshot_dir(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(data) = std::fs::read(&p) {
                out.push((p.display().to_string(), data));
            }
        }
    }
    out.sort();
    out
}

fn certs(args: &[&str]) -> String {
    ok(Command::new(bin("torusctl")).arg("certs").args(args))
}

#[test]
fn peers_speak_mutual_tls_and_refuse_connections_without_a_cluster_certificate() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let p = |name: &str| tmp.path().join(name).display().to_string();
    certs(&["init", &p("ca")]);
    let out = certs(&["issue", &p("ca"), &p("tls"), "--name", "torus", "--san", "127.0.0.1", "--san", "localhost"]);
    assert!(out.contains("--tls-dir"), "{out}");
    for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"] {
        assert!(tmp.path().join("tls").join(f).exists(), "{f} written");
    }
    // Another CA's certificates, and a self-signed client certificate (the other CA's own).
    certs(&["init", &p("other")]);
    certs(&["issue", &p("other"), &p("foreign"), "--name", "intruder", "--san", "127.0.0.1"]);
    // It trusts our CA (so the node is accepted): only the node can refuse it.
    std::fs::copy(tmp.path().join("tls/ca-cert.pem"), tmp.path().join("foreign/ca-cert.pem")).unwrap();
    std::fs::create_dir_all(p("selfsigned")).unwrap();
    std::fs::copy(tmp.path().join("tls/ca-cert.pem"), tmp.path().join("selfsigned/ca-cert.pem")).unwrap();
    std::fs::copy(tmp.path().join("other/ca-cert.pem"), tmp.path().join("selfsigned/client-cert.pem")).unwrap();
    std::fs::copy(tmp.path().join("other/ca-key.pem"), tmp.path().join("selfsigned/client-key.pem")).unwrap();
    assert!(
        !Command::new(bin("torusctl")).args(["certs", "init", &p("ca")]).status().unwrap().success(),
        "an existing CA is never overwritten"
    );

    let mut c = Cluster::init(Etcd::start(), 2);
    c.env.push(("TORUS_TLS_DIR".into(), p("tls")));
    for _ in 0..2 {
        c.add_node("1GiB");
    }
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "v", "8MiB"]);
    let blk = c.start_blk(&[]);
    qemu_io(&blk.uri("v"), &["write -P 0x5a 0 4M", "flush", "read -P 0x5a 0 4M"]);
    drop(blk);
    let vols: serde_json::Value = serde_json::from_str(&c.ctl_ok(&["volume", "list", "-o", "json"])).expect("json");
    let id = vols[0]["id"].as_u64().expect("the volume's id");
    let before: Vec<_> = c.nodes.iter().map(|n| snapshot_dir(&n.data_dir)).collect();

    // A plain TCP client sends a WRITE (with a huge epoch): the node reads no request from it.
    for n in &c.nodes {
        let mut s = std::net::TcpStream::connect(&n.peer_addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let h = RequestHeader::new(Op::Write, ExtentId::new(VolumeId(id), 0), 0, 4096, Epoch(u64::MAX - 1));
        let _ = s.write_all(&h.encode());
        let _ = s.write_all(&[0xee; 4096]);
        let mut buf = [0u8; 64];
        // A TLS alert at most, then the connection closes: never a reply to the request.
        let mut got = Vec::new();
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert!(!got.starts_with(b"TRP1"), "a plain client got a peer-protocol reply: {got:x?}");
    }
    // torusctl reading the volume without a certificate, with a foreign one, with a self-signed one: refused.
    for (what, dir) in
        [("no certificate", None), ("another CA's", Some(p("foreign"))), ("self-signed", Some(p("selfsigned")))]
    {
        let mut cmd = c.cmd("torusctl");
        cmd.env_remove("TORUS_TLS_DIR");
        if let Some(d) = &dir {
            cmd.args(["--tls-dir", d]);
        }
        let out = torus_testkit::run(
            cmd.args(["volume", "export", "v", &p(&format!("out-{what}"))]),
            Duration::from_secs(120),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("no replica could serve"), "{what}: the export must fail: {err}");
        eprintln!("{what}: {}", err.trim());
    }
    let after: Vec<_> = c.nodes.iter().map(|n| snapshot_dir(&n.data_dir)).collect();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let data =
            |v: &Vec<(String, Vec<u8>)>| v.iter().filter(|(f, _)| f.contains("/extents/")).cloned().collect::<Vec<_>>();
        assert!(data(b) == data(a), "node {i}'s extents changed after refused connections");
    }
    // With the cluster's certificates all is well.
    let img = p("image");
    c.ctl_ok(&["volume", "export", "v", &img]);
    let data = std::fs::read(&img).expect("the export");
    assert!(data[..4 << 20].iter().all(|b| *b == 0x5a), "the data read back over TLS");
}
