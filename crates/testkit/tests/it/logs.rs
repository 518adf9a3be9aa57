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
