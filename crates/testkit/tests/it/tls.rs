//! TLS: on the peer protocol, a cluster whose every process has a TLS
//! directory from `torusctl certs` serves volumes as before; a connection
//! without a certificate, with a self-signed one, or with one from another
//! CA is refused before any request is handled, and nothing on the nodes'
//! disks changes. On NBD (STARTTLS), nbdcopy, nbdinfo and qemu-img work
//! with the same directory, and `--tls require` refuses plain clients.
//! With TLS everywhere, etcd included (client certificates required), a
//! 3-node cluster goes through a node kill under fio's verified writes.
//! Certificates rotate on SIGHUP under load. An etcd user (with tokens that
//! lapse every 2 s) runs a cluster; a wrong password gets nothing.

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
    crate::files_under(dir)
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|data| (p.display().to_string(), data)))
        .collect()
}

/// A raw NBD client without TLS: the reply type the server gives NBD_OPT_LIST.
fn plain_list_reply(addr: &str) -> u32 {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("the server's greeting");
    s.write_all(&3u32.to_be_bytes()).expect("client flags (fixed newstyle, no zeroes)");
    let mut opt = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec(); // IHAVEOPT
    opt.extend_from_slice(&3u32.to_be_bytes()); // NBD_OPT_LIST
    opt.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&opt).expect("NBD_OPT_LIST");
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).expect("the option's reply");
    u32::from_be_bytes([reply[12], reply[13], reply[14], reply[15]])
}

/// Two nodes (R=2) whose every process, torusctl included, uses the TLS directory `dir`.
fn tls_cluster(dir: &str) -> Cluster {
    let mut c = Cluster::init(Etcd::start(), 2);
    c.env.push(("TORUS_TLS_DIR".into(), dir.to_string()));
    for _ in 0..2 {
        c.add_node("1GiB");
    }
    c.start_all_in_ring();
    c
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

    let c = tls_cluster(&p("tls"));
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

/// A temporary directory with a cluster CA (`ca/`) and one process's TLS
/// directory it signed (`tls/`, for `name`, valid for 127.0.0.1).
fn cluster_ca(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("temp dir");
    let p = |dir: &str| tmp.path().join(dir).display().to_string();
    certs(&["init", &p("ca")]);
    certs(&["issue", &p("ca"), &p("tls"), "--name", name, "--san", "127.0.0.1"]);
    tmp
}

#[test]
fn nbd_clients_use_tls_with_the_cluster_certificates_and_plain_ones_are_refused_when_it_is_required() {
    let tmp = cluster_ca("torusblk");
    let p = |name: &str| tmp.path().join(name).display().to_string();
    certs(&["init", &p("other")]);
    certs(&["issue", &p("other"), &p("foreign"), "--name", "intruder", "--san", "127.0.0.1"]);
    std::fs::copy(tmp.path().join("tls/ca-cert.pem"), tmp.path().join("foreign/ca-cert.pem")).unwrap();

    // The whole cluster uses TLS (one directory for all: every process is on loopback).
    let c = tls_cluster(&p("tls"));
    c.ctl_ok(&["volume", "create-block", "v", "64MiB"]);
    let blk = c.start_blk(&["--tls", "require"]);
    let tls_uri = |dir: &str| format!("nbds://{}/v?tls-certificates={}", blk.addr, p(dir));

    // 64 MiB through nbdcopy over TLS, and back, byte for byte.
    let src = tmp.path().join("src.img");
    std::fs::write(&src, torus_testkit::random_bytes(64 << 20, 11)).unwrap();
    ok(Command::new("nbdcopy").arg(&src).arg(tls_uri("tls")));
    let back = tmp.path().join("back.img");
    ok(Command::new("nbdcopy").arg(tls_uri("tls")).arg(&back));
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(), "64 MiB round trip over TLS");
    let info = ok(Command::new("nbdinfo").arg(tls_uri("tls")));
    assert!(info.contains("export-size: 67108864"), "{info}");

    // qemu-img with the same directory.
    let qemu = ok(Command::new("qemu-img")
        .args(["info", "--object"])
        .arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", p("tls")))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=v,tls-creds=tls0",
            blk.addr.rsplit_once(':').map(|(_, port)| port).unwrap_or("")
        )));
    assert!(qemu.contains("64 MiB"), "{qemu}");

    // Plain: refused, nothing listed; at the protocol level, NBD_REP_ERR_TLS_REQD.
    let plain = crate::run(Command::new("nbdinfo").arg("--list").arg(format!("nbd://{}", blk.addr)));
    let text = crate::text(&plain);
    assert!(!plain.status.success() && !text.contains("\"v\""), "a plain client lists nothing: {text}");
    assert_eq!(plain_list_reply(&blk.addr), 0x8000_0005, "NBD_OPT_LIST before TLS gets NBD_REP_ERR_TLS_REQD");
    // Another CA's client certificate: refused.
    let foreign = crate::run(Command::new("nbdinfo").arg(tls_uri("foreign")));
    assert!(!foreign.status.success(), "another CA's client certificate: {}", crate::text(&foreign));
}

#[test]
fn with_tls_everywhere_including_etcd_a_node_killed_under_verified_writes_loses_nothing() {
    use crate::node_loss::{assert_replicas_agree, finish_fio, start_fio, wait_caught_up};
    let tmp = tempfile::tempdir().expect("temp dir");
    let p = |name: &str| tmp.path().join(name).display().to_string();
    certs(&["init", &p("ca")]);
    certs(&["issue", &p("ca"), &p("tls"), "--name", "torus", "--san", "127.0.0.1", "--san", "localhost"]);
    // etcd serves clients over TLS only, and only those with a certificate of the cluster CA.
    let etcd = Etcd::start_private_tls(&tmp.path().join("tls"));
    let env = vec![
        ("TORUS_TLS_DIR".to_string(), p("tls")),
        ("TORUS_ETCD_CACERT".to_string(), p("tls/ca-cert.pem")),
        ("TORUS_ETCD_CERT".to_string(), p("tls/client-cert.pem")),
        ("TORUS_ETCD_KEY".to_string(), p("tls/client-key.pem")),
    ];
    let mut c = Cluster::init_with_env(etcd, 2, env);
    for _ in 0..3 {
        c.add_node("1GiB");
    }
    c.start_all_in_ring();
    // Without a client certificate, or without TLS, etcd is out of reach.
    let mut no_cert = c.cmd("torusctl");
    no_cert.env_remove("TORUS_ETCD_CERT").env_remove("TORUS_ETCD_KEY").arg("status");
    let out = torus_testkit::run(&mut no_cert, Duration::from_secs(60));
    assert!(!out.status.success(), "etcd answered a client without a certificate: {}", crate::text(&out));
    let plain = c.etcd.endpoint.replace("https://", "http://");
    let out = torus_testkit::run(
        c.cmd("torusctl").env("TORUS_ETCD", &plain).env_remove("TORUS_ETCD_CACERT").arg("status"),
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "etcd answered plain HTTP: {}", crate::text(&out));

    c.ctl_ok(&["volume", "create-block", "v", "256MiB"]);
    // NBD offers TLS: nbdcopy writes and reads over it. fio's nbd engine
    // refuses URIs naming certificate files (libnbd's "local file access is
    // not allowed"), so fio alone speaks plain NBD.
    let blk = c.start_blk(&["--tls", "on"]);
    let uri = format!("nbds://{}/v?tls-certificates={}", blk.addr, p("tls"));
    let known = crate::write_known(&c, &uri, 64 << 20, 0x7151);
    let fio = start_fio(&blk.uri("v"), "64m", "192m", 25);
    std::thread::sleep(Duration::from_secs(4));
    c.node(1).kill9();
    std::thread::sleep(Duration::from_secs(6));
    c.start_node(1);
    let (ops, verified) = finish_fio(fio, "node kill with TLS everywhere");
    wait_caught_up(&c);
    let back = tmp.path().join("back.bin");
    ok(Command::new("nbdcopy").arg(&uri).arg(&back));
    let got = std::fs::read(&back).expect("read back");
    let lost = got[..64 << 20].iter().zip(&known).filter(|(a, b)| a != b).count();
    let extents = assert_replicas_agree(&c, crate::volume_id(&c), 2);
    eprintln!(
        "TLS everywhere (etcd, peers, NBD): kill -9 of 1 node of 3 (R=2) during writes: {ops} writes, \
         {verified} bytes verified by fio + 64 MiB read back, {extents} extents agree on disk, {lost} bytes lost"
    );
    assert_eq!(lost, 0, "data written before the fault changed");
}

/// The serial number of the certificate served at `addr` (HTTPS, or mutual TLS with `client` from `dir`).
fn served_serial(addr: &str, dir: &str, client: bool) -> String {
    let mut s = Command::new("openssl");
    s.args(["s_client", "-connect", addr, "-CAfile", &format!("{dir}/ca-cert.pem")]);
    if client {
        s.args(["-cert", &format!("{dir}/client-cert.pem"), "-key", &format!("{dir}/client-key.pem")]);
    }
    let out = torus_testkit::run(s.stdin(std::process::Stdio::null()), Duration::from_secs(30));
    let pem = String::from_utf8_lossy(&out.stdout);
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl x509");
    x509.stdin.take().expect("stdin").write_all(pem.as_bytes()).expect("write the certificate");
    let serial = String::from_utf8_lossy(&x509.wait_with_output().expect("openssl x509").stdout).trim().to_string();
    assert!(serial.starts_with("serial="), "no certificate served at {addr}: {pem}");
    serial
}

#[test]
fn certificates_rotate_on_sighup_under_load_without_an_io_error() {
    use crate::node_loss::{finish_fio, start_fio};
    torus_testkit::require("openssl");
    let tmp = cluster_ca("torus");
    let p = |name: &str| tmp.path().join(name).display().to_string();
    let mut c = Cluster::init(Etcd::start(), 2);
    c.env.push(("TORUS_TLS_DIR".into(), p("tls")));
    for _ in 0..2 {
        c.add_node("1GiB");
    }
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "v", "128MiB"]);
    let http = format!("127.0.0.1:{}", torus_testkit::free_port());
    let blk = c.start_blk(&["--http", &http, "--http-tls"]);
    // HTTPS with the server certificate; plain HTTP gets nothing.
    let metrics = ok(Command::new("curl")
        .args(["-sf", "--cacert", &p("tls/ca-cert.pem")])
        .arg(format!("https://{http}/metrics")));
    assert!(metrics.contains("torus_process"), "{metrics}");
    assert!(!crate::run(Command::new("curl").args(["-sf", &format!("http://{http}/metrics")])).status.success());

    let node0 = c.nodes[0].peer_addr.clone();
    let before = (served_serial(&node0, &p("tls"), true), served_serial(&http, &p("tls"), false));
    let fio = start_fio(&blk.uri("v"), "0", "128m", 20);
    std::thread::sleep(Duration::from_secs(4));
    // New certificates from the same CA replace the files; every process is told with SIGHUP.
    certs(&["issue", &p("ca"), &p("tls2"), "--name", "torus", "--san", "127.0.0.1"]);
    for f in ["server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"] {
        let tmp_file = tmp.path().join("tls").join(format!(".{f}.new"));
        std::fs::copy(tmp.path().join("tls2").join(f), &tmp_file).unwrap();
        std::fs::rename(&tmp_file, tmp.path().join("tls").join(f)).unwrap();
    }
    let pids: Vec<u32> =
        c.nodes.iter().filter_map(|n| n.proc.as_ref().and_then(|p| p.pid())).chain(blk.proc.pid()).collect();
    for pid in &pids {
        ok(Command::new("kill").args(["-HUP", &pid.to_string()]));
    }
    std::thread::sleep(Duration::from_secs(2));
    let after = (served_serial(&node0, &p("tls"), true), served_serial(&http, &p("tls"), false));
    assert_ne!(before.0, after.0, "the node serves its new certificate");
    assert_ne!(before.1, after.1, "torusblk's HTTPS serves its new certificate");
    // New connections from torusblk to a node use the new client certificate: a node restarts.
    c.node(1).kill9();
    std::thread::sleep(Duration::from_secs(2));
    c.start_node(1);
    let (ops, verified) = finish_fio(fio, "certificate rotation under load");
    for (i, n) in c.nodes.iter().enumerate() {
        let log = std::fs::read_to_string(&n.log).unwrap_or_default();
        assert!(log.contains("TLS certificates reloaded"), "node {i}: {log}");
    }
    assert!(blk.proc.log_text().contains("TLS certificates reloaded"));
    eprintln!("certificates rotated under fio: {ops} writes, {verified} bytes verified, no I/O error; serials {before:?} -> {after:?}");
}

#[test]
fn an_etcd_user_is_enough_to_run_a_cluster_and_a_wrong_password_gets_nothing() {
    torus_testkit::require("etcdctl");
    // Tokens last 2 s: the processes must renew theirs.
    let etcd = Etcd::start_private_args(&["--auth-token-ttl", "2"]);
    let etcdctl = |args: &[&str]| ok(Command::new("etcdctl").arg("--endpoints").arg(&etcd.endpoint).args(args));
    etcdctl(&["user", "add", "root:rootpw"]);
    etcdctl(&["user", "add", "torus:torus-pw"]);
    etcdctl(&["role", "add", "torus"]);
    etcdctl(&["role", "grant-permission", "torus", "--prefix=true", "readwrite", "/"]);
    etcdctl(&["user", "grant-role", "torus", "torus"]);
    etcdctl(&["auth", "enable"]);
    let env =
        vec![("TORUS_ETCD_USER".to_string(), "torus".to_string()), ("TORUS_ETCD_PASSWORD".into(), "torus-pw".into())];
    let mut c = Cluster::init_with_env(etcd, 1, env);
    c.add_node("1GiB");
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "v", "16MiB"]);
    std::thread::sleep(Duration::from_secs(5));
    let blk = c.start_blk(&[]);
    qemu_io(&blk.uri("v"), &["write -P 0x3c 0 1M", "flush", "read -P 0x3c 0 1M"]);
    for (what, user) in [("a wrong password", Some("torus:wrong")), ("no user", None)] {
        let mut cmd = c.cmd("torusctl");
        cmd.env_remove("TORUS_ETCD_USER").env_remove("TORUS_ETCD_PASSWORD");
        if let Some(u) = user {
            cmd.args(["--etcd-user", u]);
        }
        let out = torus_testkit::run(cmd.args(["volume", "list"]), Duration::from_secs(60));
        assert!(!out.status.success(), "{what}: etcd answered: {}", crate::text(&out));
    }
    assert!(c.ctl_ok(&["volume", "list"]).contains('v'));
}

/// With `--http-tls` on every node, any node's console API still gathers
/// every node's I/O figures: it asks them over HTTPS, checking their
/// certificates against the cluster CA.
#[test]
fn the_console_gathers_every_nodes_io_over_https() {
    let tmp = cluster_ca("torus");
    let p = |name: &str| tmp.path().join(name).display().to_string();
    let mut c = Cluster::init(Etcd::start(), 2);
    c.env.push(("TORUS_TLS_DIR".into(), p("tls")));
    c.env.push(("TORUS_HTTP_TLS".into(), "true".into()));
    for _ in 0..3 {
        c.add_node("1GiB");
    }
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "v", "16MiB"]);
    let blk = c.start_blk(&[]);
    crate::qemu_io(&blk.uri("v"), &["write -P 0x33 0 4M", "flush"]);
    let url = format!("https://127.0.0.1:{}/api/v1/io", c.nodes[0].http_port);
    let body = ok(Command::new("curl").args(["-sf", "--cacert", &p("tls/ca-cert.pem"), &url]));
    let nodes: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let nodes = nodes.as_array().expect("a list of nodes");
    assert_eq!(nodes.len(), 3, "{body}");
    let mut written = 0u64;
    for n in nodes {
        assert!(n["error"].is_null(), "every node answered over HTTPS: {body}");
        written += n["ops"]["write"][1].as_u64().unwrap_or(0);
    }
    assert!(written >= 2 * (4 << 20), "both copies of 4 MiB counted: {body}");
}
