//! The node's HTTP endpoint: `/status` (JSON), `/metrics` (Prometheus text),
//! `/healthz` (the process answers) and `/readyz` (it may take writes: its
//! registration lease is provably alive and its store has not failed).
//! Read-only; nothing here changes the node.

use crate::liveness::Liveness;
use crate::metrics::NodeMetrics;
use hyper::StatusCode;
use std::sync::Arc;
use tokio::net::TcpListener;
use torus_store::Store;
use torus_types::NodeId;

#[derive(Clone)]
pub struct StatusContext {
    pub id: NodeId,
    pub address: String,
    pub store: Arc<Store>,
    pub metrics: Arc<NodeMetrics>,
    pub liveness: Arc<Liveness>,
}

fn respond(ctx: &StatusContext, path: &str) -> torus_metrics::http::Answer {
    match path {
        "/metrics" => {
            (StatusCode::OK, torus_metrics::CONTENT_TYPE, ctx.metrics.render(ctx.store.used(), ctx.store.capacity()))
        }
        "/status" => {
            let v = serde_json::json!({
                "id": ctx.id,
                "address": ctx.address,
                "capacity": ctx.store.capacity(),
                "used": ctx.store.used(),
                "version": env!("CARGO_PKG_VERSION"),
            });
            (StatusCode::OK, "application/json", format!("{v}\n"))
        }
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => {
            if let Some(reason) = ctx.store.failure() {
                (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: the store failed: {reason}\n"))
            } else if ctx.liveness.is_isolated() {
                let why = "not ready: not registered, or cut off from etcd for longer than its lease\n";
                (StatusCode::SERVICE_UNAVAILABLE, "text/plain", why.to_string())
            } else {
                (StatusCode::OK, "text/plain", "ready\n".to_string())
            }
        }
        _ => {
            (StatusCode::NOT_FOUND, "text/plain", "not found: try /status, /metrics, /healthz or /readyz\n".to_string())
        }
    }
}

/// Serves HTTP on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, ctx: StatusContext, tls: Option<torus_proto::tls::ServerTls>) {
    torus_metrics::http::serve(listener, Arc::new(move |path: &str| respond(&ctx, path)), tls).await
}
