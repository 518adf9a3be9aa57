//! Metrics after real I/O on 3 nodes: every process's `/metrics` parsed by
//! the Prometheus project's own OpenMetrics parser (python3-prometheus-client),
//! the named series present, histogram buckets monotone, counters grown by
//! the I/O done, and every metric contrib/grafana/torus.json queries exported.

use crate::ok;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::process::{Command, Stdio};
use torus_testkit::{free_port, Cluster};

/// A sample: (name, labels, value).
type Sample = (String, HashMap<String, String>, f64);

/// The body of an HTTP GET on loopback.
fn get(port: u16, path: &str) -> String {
    let whole = crate::http_get(port, path);
    match whole.split_once("\r\n\r\n") {
        Some((head, body)) => {
            assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "GET {path}: {head}");
            body.to_string()
        }
        None => panic!("GET {path}: no HTTP response: {whole}"),
    }
}

/// Families by name (without `_total`), each with its type and samples, as the parser sees them.
fn parse(text: &str) -> HashMap<String, (String, Vec<Sample>)> {
    const SCRIPT: &str = "import sys, json\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families\n\
        fams = text_string_to_metric_families(sys.stdin.read())\n\
        print(json.dumps({f.name: [f.type, [[s.name, s.labels, s.value] for s in f.samples]] for f in fams}))\n";
    // Debian's python3-prometheus-client lives with the system's python3.
    let python = if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let mut child = Command::new(python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), text.as_bytes()).expect("feed the parser");
    let out = child.wait_with_output().expect("the parser");
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the parser's JSON");
    let mut fams = HashMap::new();
    for (name, f) in v.as_object().expect("an object") {
        let kind = f[0].as_str().unwrap_or_default().to_string();
        let samples = f[1]
            .as_array()
            .expect("samples")
            .iter()
            .map(|s| {
                let labels = s[1]
                    .as_object()
                    .expect("labels")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect();
                (s[0].as_str().unwrap_or_default().to_string(), labels, s[2].as_f64().unwrap_or(f64::NAN))
            })
            .collect();
        fams.insert(name.clone(), (kind, samples));
    }
    fams
}

/// The value of `sample` with labels including `want`.
fn value(fams: &HashMap<String, (String, Vec<Sample>)>, family: &str, sample: &str, want: &[(&str, &str)]) -> f64 {
    let (_, samples) = fams.get(family).unwrap_or_else(|| panic!("no family {family}"));
    samples
        .iter()
        .find(|(n, l, _)| n == sample && want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.2)
        .unwrap_or_else(|| panic!("no sample {sample}{want:?} in {family}: {samples:?}"))
}

/// Every histogram's buckets grow with `le` and end at its count.
fn check_histograms(fams: &HashMap<String, (String, Vec<Sample>)>, who: &str) -> usize {
    let mut checked = 0;
    for (name, (kind, samples)) in fams {
        if kind != "histogram" {
            continue;
        }
        let mut series: HashMap<Vec<(String, String)>, Vec<(f64, f64)>> = HashMap::new();
        let mut counts = HashMap::new();
        for (n, labels, v) in samples {
            let mut key: Vec<(String, String)> =
                labels.iter().filter(|(k, _)| *k != "le").map(|(k, v)| (k.clone(), v.clone())).collect();
            key.sort();
            if n.ends_with("_bucket") {
                let le = labels.get("le").map_or(f64::NAN, |s| {
                    if s == "+Inf" {
                        f64::INFINITY
                    } else {
                        s.parse().unwrap_or(f64::NAN)
                    }
                });
                series.entry(key).or_default().push((le, *v));
            } else if n.ends_with("_count") {
                counts.insert(key, *v);
            }
        }
        for (key, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{who}: {name}{key:?} buckets not monotone: {buckets:?}"
            );
            let last = buckets.last().expect("a bucket");
            assert!(
                last.0.is_infinite() && Some(&last.1) == counts.get(&key),
                "{who}: {name}{key:?}: +Inf bucket != count"
            );
            checked += 1;
        }
    }
    checked
}

/// The names of every sample of `fams` (`_total`, `_bucket`, `_sum`, `_count` included).
fn sample_names(fams: &HashMap<String, (String, Vec<Sample>)>) -> HashSet<String> {
    fams.values().flat_map(|(_, samples)| samples.iter().map(|s| s.0.clone())).collect()
}

/// Every string under an `expr` (a panel's query) or `query` (a variable's) key in `v`.
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match v.as_str() {
                    Some(s) if k == "expr" || k == "query" => out.push(s.to_string()),
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// The `torus_` metric names a PromQL expression reads: identifiers outside
/// `{...}` and quotes, so label names and values are not taken for metrics
/// (functions, `by (le)` and Grafana's `$variables` never start with `torus_`).
fn metric_names(expr: &str) -> Vec<String> {
    let (mut names, mut word, mut depth, mut quoted) = (Vec::new(), String::new(), 0usize, false);
    for c in expr.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if depth == 0 && !quoted && word.starts_with("torus_") {
            names.push(word.clone());
        }
        word.clear();
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => depth += 1,
            '}' if !quoted => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    names
}

/// Every `torus_` name the Grafana dashboard queries is a sample some
/// process exported; returns how many names it queries.
fn check_dashboard(exported: &HashSet<String>) -> usize {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../contrib/grafana/torus.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {path}: {e}"));
    let mut exprs = Vec::new();
    queries(&dashboard, &mut exprs);
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(missing.is_empty(), "{path} queries metrics no process exports: {missing:?}");
    assert!(used.len() >= 10, "{path} queries only {} torus_ metrics: {used:?}", used.len());
    used.len()
}

#[test]
fn metric_names_skip_labels_functions_and_variables() {
    let expr = r#"histogram_quantile(0.9, sum by (le) (rate(torus_a_bucket{op!="torus_x", i=~"$i"}[5m]))) / torus_b"#;
    assert_eq!(metric_names(expr), ["torus_a_bucket", "torus_b"]);
    assert_eq!(metric_names("label_values(torus_volume_requests_total, volume)"), ["torus_volume_requests_total"]);
}

#[test]
fn every_process_exports_parseable_metrics_that_count_the_io_done() {
    let c = Cluster::start(3, 2);
    c.ctl_ok(&["volume", "create-block", "m", "64MiB"]);
    let port = free_port();
    let http = format!("127.0.0.1:{port}");
    let blk = c.start_blk(&["--http", &http]);
    let uri = blk.uri("m");
    ok(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 8M", "-c", "read -P 0x5a 0 8M", "-c", "flush"])
        .args(["-c", "discard 4M 1M"])
        .arg(&uri));
    ok(Command::new("nbdinfo").arg("--map").arg(&uri));

    let fams = parse(&get(port, "/metrics"));
    let mut exported = sample_names(&fams);
    let vol = [("volume", "m")];
    let writes = value(&fams, "torus_volume_requests", "torus_volume_requests_total", &[vol[0], ("op", "write")]);
    let reads = value(&fams, "torus_volume_requests", "torus_volume_requests_total", &[vol[0], ("op", "read")]);
    assert!(writes >= 1.0 && reads >= 1.0, "writes {writes}, reads {reads}");
    let written = value(&fams, "torus_volume_bytes", "torus_volume_bytes_total", &[vol[0], ("op", "write")]);
    let read = value(&fams, "torus_volume_bytes", "torus_volume_bytes_total", &[vol[0], ("op", "read")]);
    assert_eq!((written, read), (8.0 * 1048576.0, 8.0 * 1048576.0), "bytes counted exactly");
    for op in ["flush", "zero", "block_status"] {
        assert!(
            value(&fams, "torus_volume_requests", "torus_volume_requests_total", &[vol[0], ("op", op)]) >= 1.0,
            "{op}"
        );
    }
    let count =
        value(&fams, "torus_volume_request_seconds", "torus_volume_request_seconds_count", &[vol[0], ("op", "write")]);
    assert_eq!(count, writes, "one latency per write");
    assert!(value(&fams, "torus_process_resident_memory_bytes", "torus_process_resident_memory_bytes", &[]) > 1e6);
    let blk_histograms = check_histograms(&fams, "torusblk");
    // The writer's lock is a transaction, the volume's record a get: etcd requests are counted and timed.
    let txns = value(&fams, "torus_etcd_requests", "torus_etcd_requests_total", &[("op", "txn")]);
    assert!(txns >= 1.0, "torusblk's etcd transactions: {txns}");
    assert_eq!(value(&fams, "torus_etcd_request_seconds", "torus_etcd_request_seconds_count", &[("op", "txn")]), txns);

    let mut node_written = 0.0;
    let mut node_histograms = 0;
    for (i, n) in c.nodes.iter().enumerate() {
        let fams = parse(&get(n.http_port, "/metrics"));
        exported.extend(sample_names(&fams));
        node_written += value(&fams, "torus_node_written_bytes", "torus_node_written_bytes_total", &[]);
        let w = fams["torus_node_requests"]
            .1
            .iter()
            .filter(|s| s.1.get("op").map(String::as_str) == Some("write"))
            .map(|s| s.2)
            .sum::<f64>();
        let timed = fams["torus_node_request_seconds"]
            .1
            .iter()
            .filter(|s| s.0.ends_with("_count") && s.1.get("op").map(String::as_str) == Some("write"))
            .map(|s| s.2)
            .sum::<f64>();
        assert_eq!(w, timed, "node {i}: one latency per write");
        for name in [
            "torus_store_used_bytes",
            "torus_store_capacity_bytes",
            "torus_process_cpu_seconds",
            "torus_node_full",
            "torus_node_peer_connections",
            "torus_node_requests_in_flight",
        ] {
            assert!(fams.contains_key(name), "node {i} exports {name}");
        }
        let gets = value(&fams, "torus_etcd_requests", "torus_etcd_requests_total", &[("op", "get")]);
        assert!(gets >= 1.0, "node {i} counts its etcd reads: {gets}");
        // Its lease is alive (it answers), with time left; torusblk's connections are open.
        assert_eq!(value(&fams, "torus_node_lease_valid", "torus_node_lease_valid", &[]), 1.0, "node {i}");
        assert!(value(&fams, "torus_node_lease_remaining_seconds", "torus_node_lease_remaining_seconds", &[]) > 0.0);
        assert!(value(&fams, "torus_node_peer_connections", "torus_node_peer_connections", &[]) >= 1.0, "node {i}");
        node_histograms += check_histograms(&fams, &format!("node {i}"));
    }
    assert!(node_written >= 2.0 * 8.0 * 1048576.0, "both replicas of 8 MiB written: {node_written}");
    // The CSI plugin: every call counted by method and code, and timed.
    let csi_port = free_port();
    let plugin = c.start_csi("host-m", "controller", &["--http", &format!("127.0.0.1:{csi_port}")]);
    crate::csi::runtime().block_on(async {
        use torus_csi::pb::volume_capability::access_mode::Mode;
        let mut csi = crate::csi::connect(&plugin.socket).await;
        let cap = crate::csi::mount_cap(Mode::SingleNodeWriter, "ext4");
        crate::csi::ok(csi.controller.create_volume(crate::csi::create_req("csi-m", 8 << 20, cap)).await, "create");
        let missing = torus_csi::pb::DeleteVolumeRequest { volume_id: String::new(), ..Default::default() };
        assert_eq!(crate::csi::code(csi.controller.delete_volume(missing).await), tonic::Code::InvalidArgument);
    });
    let fams = parse(&get(csi_port, "/metrics"));
    exported.extend(sample_names(&fams));
    let created = [("method", "CreateVolume"), ("code", "OK")];
    assert_eq!(value(&fams, "torus_csi_requests", "torus_csi_requests_total", &created), 1.0);
    let refused = [("method", "DeleteVolume"), ("code", "INVALID_ARGUMENT")];
    assert_eq!(value(&fams, "torus_csi_requests", "torus_csi_requests_total", &refused), 1.0);
    let csi_histograms = check_histograms(&fams, "the CSI plugin");
    let dashboard = check_dashboard(&exported);
    eprintln!(
        "metrics: torusblk counted {writes} writes and {reads} reads (8 MiB each way), {blk_histograms} latency histograms; \
         3 nodes wrote {} MiB, {node_histograms} histograms, the CSI plugin {csi_histograms}, all parsed by the OpenMetrics parser; \
         the Grafana dashboard's {dashboard} torus_ metrics all exported",
        node_written as u64 >> 20
    );
}
