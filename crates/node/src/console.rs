//! The web console: a static page (`/ui`) over a read-only JSON API
//! (`/api/v1/...`) that any node answers for the whole cluster, from etcd
//! and the nodes' own figures.
//!
//! - `/api/v1/status`: the cluster's health (what `torusctl status -o json` prints).
//! - `/api/v1/nodes`: every ring member and registered node: up or down, zone and labels, usage, full mark.
//! - `/api/v1/volumes`: every volume: size, replication, encryption, writer, missing copies, health.
//! - `/api/v1/io`: every node's request and byte counters (the page turns them into rates),
//!   asked of each node's own `/api/v1/local` (over HTTPS, with the cluster CA, where a node serves it).

use crate::metrics::NodeMetrics;
use hyper::StatusCode;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use torus_meta::cluster::{Cluster, ClusterError};
use torus_metrics::http::Answer;
use torus_proto::Op;
use torus_types::{ExtentId, NodeId};

/// The page: plain HTML and JavaScript, no build step.
pub const PAGE: &str = include_str!("console/index.html");

/// The ops whose counters the console shows.
const IO_OPS: [(Op, &str); 4] = [(Op::Read, "read"), (Op::Write, "write"), (Op::Flush, "flush"), (Op::Zero, "zero")];

#[derive(Serialize)]
struct NodeView {
    id: NodeId,
    address: Option<String>,
    http_address: Option<String>,
    /// Registered with a live lease.
    up: bool,
    in_ring: bool,
    /// In the ring being left (a move in progress).
    leaving: bool,
    full: bool,
    zone: Option<String>,
    labels: BTreeMap<String, String>,
    capacity: u64,
    used: u64,
    last_seen: u64,
}

#[derive(Serialize)]
struct VolumeView {
    name: String,
    id: u64,
    size: u64,
    replication: u32,
    encrypted: bool,
    writer: Option<String>,
    epoch: Option<u64>,
    /// Extent copies that missed writes.
    missing_copies: usize,
    /// Extents with a replica on a down node.
    extents_with_a_replica_down: u64,
    /// ok, catching-up or degraded.
    health: &'static str,
    snapshots: usize,
}

fn json<T: Serialize>(v: &T) -> Answer {
    match serde_json::to_string(v) {
        Ok(body) => (StatusCode::OK, "application/json", body),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")),
    }
}

fn unavailable(e: ClusterError) -> Answer {
    (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("cannot read the cluster's state: {e}\n"))
}

/// This node's counters per op: `{"read": [requests, bytes], ...}`.
pub fn local(metrics: &NodeMetrics) -> Answer {
    let v: BTreeMap<&str, (u64, u64)> = IO_OPS.iter().map(|(op, name)| (*name, metrics.op(*op).totals())).collect();
    json(&v)
}

/// Answers `/api/v1/<what>`.
pub async fn api(cluster: &Cluster, what: &str) -> Answer {
    let res = match what {
        "status" => cluster.status_report().await.map(|r| json(&r)),
        "nodes" => nodes(cluster).await.map(|n| json(&n)),
        "volumes" => volumes(cluster).await.map(|v| json(&v)),
        "io" => io(cluster).await.map(|v| json(&v)),
        _ => {
            let known = "try /api/v1/status, /api/v1/nodes, /api/v1/volumes, /api/v1/io\n";
            return (StatusCode::NOT_FOUND, "text/plain", format!("not found: {known}"));
        }
    };
    res.unwrap_or_else(unavailable)
}

async fn nodes(cluster: &Cluster) -> Result<Vec<NodeView>, ClusterError> {
    let (ring, _) = cluster.ring().await?;
    let peers = cluster.peers().await?;
    let mut out: Vec<NodeView> = peers
        .iter()
        .map(|p| {
            let member = ring.members.iter().find(|m| m.id == p.id);
            NodeView {
                id: p.id,
                address: Some(p.address.clone()),
                http_address: p.http_address.clone(),
                up: true,
                in_ring: member.is_some(),
                leaving: member.is_none() && ring.all_members().iter().any(|m| m.id == p.id),
                full: member.is_some_and(|m| m.full),
                zone: p.labels.get("zone").cloned(),
                labels: p.labels.clone(),
                capacity: p.capacity,
                used: p.used,
                last_seen: p.last_seen,
            }
        })
        .collect();
    let up: HashSet<NodeId> = peers.iter().map(|p| p.id).collect();
    for m in ring.all_members().into_iter().filter(|m| !up.contains(&m.id)) {
        let in_ring = ring.members.iter().any(|r| r.id == m.id);
        out.push(NodeView {
            id: m.id,
            address: None,
            http_address: None,
            up: false,
            in_ring,
            leaving: !in_ring,
            full: m.full,
            zone: m.labels.get("zone").cloned(),
            labels: m.labels.clone(),
            capacity: 0,
            used: 0,
            last_seen: 0,
        });
    }
    out.sort_by_key(|n| n.id);
    Ok(out)
}

async fn volumes(cluster: &Cluster) -> Result<Vec<VolumeView>, ClusterError> {
    let (ring, _) = cluster.ring().await?;
    let up: HashSet<NodeId> = cluster.peers().await?.iter().map(|p| p.id).collect();
    let states = cluster.replica_states().await?;
    let snapshots = cluster.snapshots(None).await?;
    let placement = ring.placement();
    let mut out = Vec::new();
    for v in cluster.volumes().await? {
        let lock = cluster.volume_lock(v.id).await?;
        let missing = states.get(&v.id).map_or(0, |s| s.missing_count());
        let down = if ring.all_members().iter().all(|m| up.contains(&m.id)) {
            0
        } else {
            (0..v.extent_count())
                .filter(|i| {
                    let reps = placement.replicas(ExtentId::new(v.top(), *i), v.replication as usize);
                    reps.iter().any(|r| !up.contains(r))
                })
                .count() as u64
        };
        let health = if down > 0 {
            "degraded"
        } else if missing > 0 {
            "catching-up"
        } else {
            "ok"
        };
        out.push(VolumeView {
            name: v.name.clone(),
            id: v.id.0,
            size: v.size,
            replication: v.replication,
            encrypted: v.encryption.is_some(),
            writer: lock.as_ref().map(|(l, _)| l.holder.clone()),
            epoch: lock.map(|(_, e)| e.0),
            missing_copies: missing,
            extents_with_a_replica_down: down,
            health,
            snapshots: snapshots.iter().filter(|s| s.volume == v.id).count(),
        });
    }
    Ok(out)
}

#[derive(Serialize)]
struct NodeIo {
    id: NodeId,
    /// Per op: [requests, bytes] since the node started.
    ops: Option<BTreeMap<String, (u64, u64)>>,
    /// Why the node's figures are missing.
    error: Option<String>,
}

async fn io(cluster: &Cluster) -> Result<Vec<NodeIo>, ClusterError> {
    let peers = cluster.peers().await?;
    let asks = peers.iter().map(|p| async move {
        let (ops, error) = match &p.http_address {
            None => (None, Some("serves no HTTP".to_string())),
            Some(addr) => match get(addr, "/api/v1/local", p.http_tls).await {
                Ok(body) => match serde_json::from_str(&body) {
                    Ok(ops) => (Some(ops), None),
                    Err(e) => (None, Some(format!("unreadable answer: {e}"))),
                },
                Err(e) => (None, Some(e)),
            },
        };
        NodeIo { id: p.id, ops, error }
    });
    Ok(futures_util::future::join_all(asks).await)
}

/// An HTTP/1.0 GET with a 2 s deadline — over HTTPS (checked against the
/// cluster CA of this node's `--tls-dir`) if the node serves it so; the
/// body of a 200 answer.
async fn get(addr: &str, path: &str, tls: bool) -> Result<String, String> {
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        let answer = if tls {
            let config = torus_proto::tls::client().ok_or("it serves HTTPS and this node has no --tls-dir")?;
            let name = torus_proto::tls::server_name(addr).ok_or("not a host name or IP")?;
            let mut s = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            exchange(&mut s, &request).await?
        } else {
            let mut s = tcp;
            exchange(&mut s, &request).await?
        };
        let text = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            return Err(head.lines().next().unwrap_or("").to_string());
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), fetch).await.map_err(|_| "timed out".to_string())?
}

/// Sends a request and reads the answer until the server closes (a TLS
/// server that closes without close_notify ends the answer all the same).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, request: &str) -> Result<Vec<u8>, String> {
    s.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf).await {
        Ok(_) => Ok(buf),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => Ok(buf),
        Err(e) => Err(e.to_string()),
    }
}
