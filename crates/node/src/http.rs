//! The node's HTTP endpoint: `/status` (JSON), `/metrics` (Prometheus text),
//! `/healthz`. Read-only; nothing here changes the node.

use crate::metrics::NodeMetrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
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
}

fn respond(ctx: &StatusContext, path: &str) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match path {
        "/metrics" => {
            (StatusCode::OK, "text/plain; version=0.0.4", ctx.metrics.render(ctx.store.used(), ctx.store.capacity()))
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
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found: try /status or /metrics\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
    resp
}

/// Serves HTTP on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, ctx: StatusContext) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = respond(&ctx, req.uri().path());
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
