//! torusblk's HTTP endpoint (`nbdserve --http`, `csi --http`): `/metrics`
//! (the registry given, plus process and etcd figures), `/healthz` (the
//! process answers) and `/readyz` (etcd answered within `ETCD_SILENCE`).

use anyhow::Context;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use torus_meta::cluster::Cluster;
use torus_metrics::prometheus_client::registry::Registry;

/// Seconds without an answer from etcd after which torusblk is not ready.
const ETCD_SILENCE: u64 = 15;

/// Asks etcd for the cluster's config every few seconds; records when it answered.
async fn probe_etcd(cluster: Cluster, seen: Arc<AtomicU64>) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(3), cluster.config()).await {
            seen.store(torus_types::unix_now(), Ordering::Relaxed);
        }
    }
}

/// The endpoint's tasks; dropping this stops them.
pub struct Endpoint {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Listens on `addr` and serves until the returned endpoint is dropped.
pub async fn serve(
    addr: &str,
    mut registry: Registry,
    cluster: Cluster,
    tls: Option<torus_proto::tls::ServerTls>,
) -> anyhow::Result<Endpoint> {
    let process = torus_metrics::process::ProcessStats::register(&mut registry);
    torus_meta::register_etcd_metrics(&mut registry);
    let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
    let local = l.local_addr().context("reading the HTTP address")?;
    tracing::info!(addr = %local, https = tls.is_some(), "serving /metrics, /healthz and /readyz");
    let seen = Arc::new(AtomicU64::new(torus_types::unix_now()));
    let probe = tokio::spawn(probe_etcd(cluster, seen.clone()));
    let answer = move |path: &str| match path {
        "/metrics" => {
            process.refresh();
            (hyper::StatusCode::OK, torus_metrics::CONTENT_TYPE, torus_metrics::encode(&registry))
        }
        "/healthz" => (hyper::StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => {
            let silent = torus_types::unix_now().saturating_sub(seen.load(Ordering::Relaxed));
            if silent <= ETCD_SILENCE {
                (hyper::StatusCode::OK, "text/plain", "ready\n".to_string())
            } else {
                let why = format!("not ready: etcd has not answered for {silent} s\n");
                (hyper::StatusCode::SERVICE_UNAVAILABLE, "text/plain", why)
            }
        }
        _ => (hyper::StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics, /healthz or /readyz\n".to_string()),
    };
    let server = tokio::spawn(torus_metrics::http::serve(l, torus_metrics::http::at_once(answer), tls));
    Ok(Endpoint { tasks: vec![probe, server] })
}
