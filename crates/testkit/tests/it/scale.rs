//! What a cluster costs etcd as it grows (issue 16): an idle node's etcd
//! requests must not grow with the number of nodes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use torus_testkit::{Cluster, Etcd};

/// The sum of every sample of the metric families named, from a Prometheus text page.
fn sum_of(page: &str, names: &[&str]) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            names.contains(&name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

fn etcd_port(etcd: &Etcd) -> u16 {
    let endpoint = etcd.endpoint.split(',').next().unwrap_or_default();
    endpoint.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).expect("etcd endpoint has a port")
}

/// Counters at one moment: each node's own count of its etcd requests, and etcd's.
struct Sample {
    at: Instant,
    node_requests: f64,
    /// etcd's ranges, puts, txns, deletes; lease keep-alives; bytes sent to clients.
    etcd: BTreeMap<&'static str, f64>,
}

fn sample(c: &Cluster) -> Sample {
    let node_requests = (0..c.nodes.len())
        .map(|i| sum_of(&crate::http_get(c.nodes[i].http_port, "/metrics"), &["torus_etcd_requests_total"]))
        .sum();
    let page = crate::http_get(etcd_port(&c.etcd), "/metrics");
    let grpc_keepalives = page
        .lines()
        .filter(|l| l.starts_with("grpc_server_msg_received_total") && l.contains("grpc_method=\"LeaseKeepAlive\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    let etcd = BTreeMap::from([
        ("reads", sum_of(&page, &["etcd_mvcc_range_total"])),
        ("writes", sum_of(&page, &["etcd_mvcc_put_total", "etcd_mvcc_txn_total", "etcd_mvcc_delete_total"])),
        ("keepalives", grpc_keepalives),
        ("bytes_sent", sum_of(&page, &["etcd_network_client_grpc_sent_bytes_total"])),
    ]);
    Sample { at: Instant::now(), node_requests, etcd }
}

/// Per node and second between two samples: (torus requests, etcd's figures).
fn rates(a: &Sample, b: &Sample, nodes: usize) -> (f64, BTreeMap<&'static str, f64>) {
    let per = |x: f64| x / b.at.duration_since(a.at).as_secs_f64() / nodes as f64;
    let etcd = b.etcd.iter().map(|(k, v)| (*k, per(v - a.etcd[k]))).collect();
    (per(b.node_requests - a.node_requests), etcd)
}

fn idle_rates(c: &Cluster, secs: u64) -> (f64, BTreeMap<&'static str, f64>) {
    // Let the last join settle (registrations, collectors' first passes) before counting.
    std::thread::sleep(Duration::from_secs(12));
    let a = sample(c);
    std::thread::sleep(Duration::from_secs(secs));
    let b = sample(c);
    rates(&a, &b, c.nodes.len())
}

#[test]
fn an_idle_nodes_etcd_requests_do_not_grow_with_the_node_count() {
    // A private etcd: its own counters then count this cluster only.
    let mut c = Cluster::init(Etcd::start_private(), 2);
    for _ in 0..10 {
        c.add_node("256MiB");
    }
    c.start_all_in_ring();
    c.ctl_ok(&["volume", "create-block", "idle", "1GiB"]);
    c.ctl_ok(&["wait", "rebalanced", "--timeout", "2m"]);
    let (torus10, etcd10) = idle_rates(&c, 30);
    for _ in 10..30 {
        let i = c.add_node("256MiB");
        c.start_node(i);
    }
    c.wait_peers(30);
    // What a move costs (reported, not asserted: it depends on how long the move takes).
    let before = sample(&c);
    c.ctl_ok(&["peer", "add", "--all-peers"]);
    c.ctl_ok(&["wait", "rebalanced", "--timeout", "3m"]);
    let after = sample(&c);
    let (torus_move, etcd_move) = rates(&before, &after, c.nodes.len());
    let (torus30, etcd30) = idle_rates(&c, 30);
    eprintln!(
        "per node and second: idle at 10 nodes: {torus10:.3} requests {etcd10:?}; idle at 30 nodes: {torus30:.3} requests {etcd30:?}; \
         while 20 nodes joined ({:.1} s): {torus_move:.3} requests {etcd_move:?}",
        after.at.duration_since(before.at).as_secs_f64()
    );
    // A keep-alive every TTL/3 (the tests' TTL is 5 s) and nothing else.
    assert!(torus10 > 0.0 && torus10 < 1.0, "10 idle nodes send {torus10:.3} requests/s each (keep-alives only)");
    let bound = |at10: f64| at10 * 1.25 + 0.05;
    assert!(torus30 <= bound(torus10), "per idle node, {torus30:.3} requests/s at 30 nodes vs {torus10:.3} at 10");
    for what in ["reads", "writes", "keepalives", "bytes_sent"] {
        let (a, b) = (etcd10[what], etcd30[what]);
        let slack = if what == "bytes_sent" { 200.0 } else { 0.05 };
        assert!(b <= a * 1.25 + slack, "etcd's {what} per idle node and second: {b:.3} at 30 nodes vs {a:.3} at 10");
    }
    assert!(etcd30["reads"] < 0.05, "idle nodes read nothing from etcd: {:.3} ranges/s each", etcd30["reads"]);
}

/// Resident memory of a process, in MiB (from /proc).
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// The 100-node scenario (issue 16): `TORUS_SCALE_NODES` torusd (default
/// 100) on this machine in three zones, R=3; 1 GiB written and verified
/// through NBD; 10 nodes added and 10 removed back to back (queued behind
/// each other); every extent's copies on the nodes placement names; 3 nodes
/// of one zone killed; everything read back. Prints what it measured; run by
/// `bench/scale`, which keeps the figures in bench/results/SCALE.md (too long
/// for CI, whose short form is the 30-node test above).
#[test]
#[ignore = "long: run by bench/scale"]
fn a_hundred_nodes_take_data_moves_and_deaths() {
    let n: usize = std::env::var("TORUS_SCALE_NODES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let gib = std::env::var("TORUS_SCALE_DATA").unwrap_or_else(|_| "1024m".into());
    let mut c = Cluster::init(Etcd::start_private(), 3);
    let zone = |i: usize| format!("zone={}", ["a", "b", "c"][i % 3]);
    let started = Instant::now();
    for i in 0..n {
        let label = zone(i);
        let k = c.add_node_with("2GiB", &["--label", &label]);
        c.start_node(k);
    }
    c.wait_peers(n);
    let start_secs = started.elapsed().as_secs_f64();
    c.ctl_ok(&["peer", "add", "--all-peers"]);
    c.ctl_ok(&["volume", "create-block", "v", "1GiB"]);
    let (idle_torus, idle_etcd) = idle_rates(&c, 30);
    let rss: Vec<f64> = (0..n).filter_map(|i| c.nodes[i].proc.as_ref()?.pid()).map(rss_mib).collect();
    let blk = c.start_blk(&[]);
    let t = Instant::now();
    crate::ok(&mut crate::full::fio(&blk.uri("v"), &gib, "0", false));
    let write_secs = t.elapsed().as_secs_f64();

    // 10 nodes join, one `peer add` each, then 10 of the first leave: the
    // first add starts a move, everything after it queues.
    let t = Instant::now();
    let fresh: Vec<usize> = (0..10)
        .map(|j| {
            let label = zone(j);
            c.add_node_with("2GiB", &["--label", &label])
        })
        .collect();
    for &k in &fresh {
        c.start_node(k);
    }
    c.wait_peers(n + 10);
    let before = sample(&c);
    let mut queued = 0;
    for &k in &fresh {
        queued += c.ctl_ok(&["peer", "add", &c.nodes[k].peer_addr]).contains("queued") as usize;
    }
    for k in 0..10 {
        queued += c.ctl_ok(&["peer", "remove", &c.nodes[k].peer_addr]).contains("queued") as usize;
    }
    c.ctl_ok(&["wait", "rebalanced", "--timeout", "20m"]);
    let after = sample(&c);
    let move_secs = t.elapsed().as_secs_f64();
    let (move_torus, move_etcd) = rates(&before, &after, c.nodes.len());
    let vol = crate::full::volume_ids(&c)["v"];
    let extents = crate::node_loss::assert_replicas_agree(&c, vol, 3);
    for k in 0..10 {
        assert!(c.extents_on_disk(k).is_empty(), "removed node {k} still holds extents");
        c.node(k).terminate();
    }

    // Three nodes of one zone die: every extent keeps two copies.
    for k in [12, 15, 18] {
        c.node(k).kill9();
    }
    let t = Instant::now();
    let out = crate::run(&mut crate::full::fio(&blk.uri("v"), &gib, "0", true));
    assert!(out.status.success(), "the volume did not read back whole: {}", crate::text(&out));
    let read_secs = t.elapsed().as_secs_f64();
    let max = rss.iter().cloned().fold(0.0, f64::max);
    let mean = rss.iter().sum::<f64>() / rss.len().max(1) as f64;
    eprintln!(
        "SCALE nodes={n} data={gib} R=3 zones=3\n\
         start: {n} torusd registered in {start_secs:.1} s\n\
         idle: {idle_torus:.3} torus etcd requests/s per node; etcd per node/s {idle_etcd:?}\n\
         rss per idle node: mean {mean:.1} MiB, max {max:.1} MiB\n\
         write {gib} through NBD with fio verify: {write_secs:.1} s\n\
         10 added + 10 removed ({queued} of 20 queued): {move_secs:.1} s until rebalanced; \
         {move_torus:.3} torus etcd requests/s per node; etcd per node/s {move_etcd:?}\n\
         placement: {extents} extents, each on exactly the 3 nodes the ring names, copies equal\n\
         3 nodes of zone a killed: {gib} read back and verified in {read_secs:.1} s"
    );
}
