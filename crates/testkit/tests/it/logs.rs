//! JSON logs (`--log-format json`, here through `TORUS_LOG_FORMAT`): every
//! line every process writes parses as one JSON object with a level and a
//! message; and the readiness endpoints (`/readyz`) of torusd, torusblk and
//! the CSI plugin follow etcd: ready while it answers, not ready once it is gone.

use crate::{http_get, qemu_io};
use std::time::Duration;
use torus_testkit::{free_port, wait_until, Cluster, Etcd};

fn status_of(port: u16, path: &str) -> u16 {
    let whole = http_get(port, path);
    whole.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Every line of `text` is a JSON log record; returns how many.
fn json_lines(what: &str, text: &str) -> usize {
    let mut n = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{what}: not a JSON line ({e}): {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{what}: no level or timestamp: {line}");
        assert!(v["fields"].is_object(), "{what}: no fields: {line}");
        n += 1;
    }
    n
}

#[test]
fn json_logs_parse_line_by_line_and_readiness_follows_etcd() {
    let mut c = Cluster::init(Etcd::start_private(), 2);
    c.env.push(("TORUS_LOG_FORMAT".into(), "json".into()));
    for _ in 0..2 {
        c.add_node("1GiB");
    }
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "v", "8MiB"]);
    let http = free_port();
    let blk = c.start_blk(&["--http", &format!("127.0.0.1:{http}")]);
    qemu_io(&blk.uri("v"), &["write -P 0x42 0 1M", "flush", "read -P 0x42 0 1M"]);
    c.ctl_ok(&["volume", "snapshot", "create", "v@s"]);
    let csi_http = free_port();
    let plugin = c.start_csi("host-l", "controller", &["--http", &format!("127.0.0.1:{csi_http}")]);

    for n in &c.nodes {
        wait_until(Duration::from_secs(15), "a node to be ready", || status_of(n.http_port, "/readyz") == 200);
        assert_eq!(status_of(n.http_port, "/healthz"), 200);
    }
    assert_eq!(status_of(http, "/readyz"), 200, "torusblk is ready while etcd answers");
    assert_eq!(status_of(csi_http, "/readyz"), 200, "the CSI plugin is ready while etcd answers");
    let metrics = http_get(csi_http, "/metrics");
    assert!(metrics.contains("torus_etcd_requests_total{op=\"get\"}"), "the plugin's etcd figures: {metrics}");
    assert!(metrics.contains("torus_process_resident_memory_bytes"), "{metrics}");
    // Every CSI call is counted by method and gRPC code, and timed.
    crate::csi::runtime().block_on(async {
        use torus_csi::pb::volume_capability::access_mode::Mode;
        let mut csi = crate::csi::connect(&plugin.socket).await;
        let cap = crate::csi::block_cap(Mode::SingleNodeWriter);
        crate::csi::ok(csi.identity.probe(torus_csi::pb::ProbeRequest {}).await, "Probe");
        crate::csi::ok(csi.controller.create_volume(crate::csi::create_req("m", 8 << 20, cap.clone())).await, "create");
        let unnamed = csi.controller.create_volume(crate::csi::create_req("", 8 << 20, cap)).await;
        assert_eq!(crate::csi::code(unnamed), tonic::Code::InvalidArgument);
    });
    let metrics = http_get(csi_http, "/metrics");
    for series in [
        r#"torus_csi_requests_total{method="Probe",code="OK"} 1"#,
        r#"torus_csi_requests_total{method="CreateVolume",code="OK"} 1"#,
        r#"torus_csi_requests_total{method="CreateVolume",code="INVALID_ARGUMENT"} 1"#,
        r#"torus_csi_request_seconds_count{method="CreateVolume"} 2"#,
    ] {
        assert!(metrics.contains(series), "{series} in the plugin's figures: {metrics}");
    }

    // etcd goes: the nodes' leases cannot be confirmed, torusblk's probe gets no answer.
    c.etcd.stop();
    for n in &c.nodes {
        wait_until(Duration::from_secs(20), "a node cut off from etcd to be not ready", || {
            status_of(n.http_port, "/readyz") == 503
        });
        assert_eq!(status_of(n.http_port, "/healthz"), 200, "alive all the same");
    }
    wait_until(Duration::from_secs(30), "torusblk to be not ready without etcd", || status_of(http, "/readyz") == 503);
    wait_until(Duration::from_secs(30), "the CSI plugin to be not ready without etcd", || {
        status_of(csi_http, "/readyz") == 503
    });
    c.etcd.restart();
    for n in &c.nodes {
        wait_until(Duration::from_secs(30), "a node to be ready again", || status_of(n.http_port, "/readyz") == 200);
    }

    let mut lines = 0;
    for (i, n) in c.nodes.iter().enumerate() {
        lines += json_lines(&format!("torusd {i}"), &std::fs::read_to_string(&n.log).expect("the node's log"));
    }
    lines += json_lines("torusblk", &blk.proc.log_text());
    lines += json_lines("the CSI plugin", &plugin.log_text());
    let ctl = c.cmd("torusctl").args(["--log-format", "json", "-C", "127.0.0.1:1", "status"]).output().expect("run");
    assert!(!ctl.status.success());
    lines += json_lines("torusctl", &String::from_utf8_lossy(&ctl.stderr));
    assert!(lines > 10, "the processes logged ({lines} lines)");
}

/// INFO lines count state changes, never I/O: a connection of 2048 writes adds
/// as many as one of 64. At DEBUG every request is a span: the export
/// (volume), the op and, in the volume layer, the extent.
#[test]
fn io_logs_nothing_at_info_and_each_request_is_a_span_at_debug() {
    let mut c = Cluster::init(Etcd::start(), 2);
    c.env.push(("TORUS_LOG_FORMAT".into(), "json".into()));
    for _ in 0..2 {
        c.add_node("1GiB");
    }
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "v", "64MiB"]);
    let blk = c.start_blk(&[]);
    let fio = |writes: usize| {
        crate::ok(std::process::Command::new("fio").args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={}", blk.uri("v")),
            "--rw=randwrite",
            "--bs=4k",
            "--size=32m",
            &format!("--io_size={}k", 4 * writes),
            "--iodepth=8",
        ]))
    };
    let info_lines = || {
        let mut texts = vec![blk.proc.log_text()];
        texts.extend(c.nodes.iter().map(|n| std::fs::read_to_string(&n.log).expect("a node's log")));
        texts.iter().flat_map(|t| t.lines()).filter(|l| l.contains(r#""level":"INFO""#)).count()
    };
    fio(16); // the first open's one-time lines
    std::thread::sleep(Duration::from_secs(1));
    let before = info_lines();
    fio(64);
    std::thread::sleep(Duration::from_secs(1));
    let small = info_lines() - before;
    fio(2048);
    std::thread::sleep(Duration::from_secs(1));
    let large = info_lines() - before - small;
    assert_eq!(large, small, "INFO lines of a connection with 2048 writes vs one with 64");
    drop(blk);

    c.env.push(("RUST_LOG".into(), "info,torus_nbd=debug,torus_volume=debug".into()));
    let debug = c.start_blk(&[]);
    qemu_io(&debug.uri("v"), &["write -P 0x17 4M 4k", "read -P 0x17 4M 4k"]);
    let id = crate::volume_id(&c);
    let lines: Vec<serde_json::Value> =
        debug.proc.log_text().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let in_spans = |op: &str, event: &str| {
        lines.iter().any(|l| {
            let spans = l["spans"].as_array().cloned().unwrap_or_default();
            let named = |n: &str| spans.iter().find(|s| s["name"] == n).cloned().unwrap_or_default();
            l["fields"]["message"] == event
                && named("nbd")["export"] == "v"
                && named("request")["op"] == op
                && named("extent")["extent"] == format!("{id}/1").as_str()
        })
    };
    assert!(in_spans("write", "replicated"), "a write's span chain: {lines:#?}");
    assert!(in_spans("read", "read"), "a read's span chain");
    println!("INFO lines per connection: {small} with 64 writes, {large} with 2048");
}
