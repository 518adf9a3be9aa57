//! The node's HTTP endpoint: `/status` (JSON), `/metrics` (Prometheus text),
//! `/healthz` (the process answers), `/readyz` (it may take writes: its
//! registration lease is provably alive and its store has not failed), and
//! the web console: `/ui` and `/api/v1/...` (see `console`).
//! Read-only; nothing here changes the node or the cluster.

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
    /// The console's API reads the whole cluster from here.
    pub cluster: torus_meta::cluster::Cluster,
}

async fn respond(ctx: &StatusContext, path: &str) -> torus_metrics::http::Answer {
    if let Some(what) = path.strip_prefix("/api/v1/") {
        return match what {
            "local" => crate::console::local(&ctx.metrics),
            _ => crate::console::api(&ctx.cluster, what).await,
        };
    }
    match path {
        "/ui" | "/ui/" | "/" => (StatusCode::OK, "text/html; charset=utf-8", crate::console::PAGE.to_string()),
        "/metrics" => (
            StatusCode::OK,
            torus_metrics::CONTENT_TYPE,
            ctx.metrics.render(ctx.store.used(), ctx.store.capacity(), ctx.liveness.time_left()),
        ),
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
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /ui, /api/v1/status, /status, /metrics, /healthz or /readyz\n".to_string(),
        ),
    }
}

/// Serves HTTP on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, ctx: StatusContext, tls: Option<torus_proto::tls::ServerTls>) {
    let ctx = Arc::new(ctx);
    let handler: torus_metrics::http::Handler = Arc::new(move |path: String| {
        let ctx = ctx.clone();
        Box::pin(async move { respond(&ctx, &path).await })
    });
    torus_metrics::http::serve(listener, handler, tls).await
}
