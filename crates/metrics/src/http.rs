//! A small read-only HTTP endpoint: each GET path is answered by the
//! owner's function (`/metrics`, `/healthz`, ...), over TLS if given one
//! (HTTPS, no client certificate asked). Nothing here changes anything.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::net::TcpListener;

/// An answer: status, content type, body.
pub type Answer = (StatusCode, &'static str, String);

/// What answers a GET of a path (the path and query).
pub type Handler =
    Arc<dyn Fn(String) -> std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>> + Send + Sync>;

/// A handler that answers at once.
pub fn at_once(answer: impl Fn(&str) -> Answer + Send + Sync + 'static) -> Handler {
    Arc::new(move |path: String| {
        let a = answer(&path);
        Box::pin(async move { a })
    })
}

/// How long a client may take for the TLS handshake.
const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `answer(path)` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, answer: Handler, tls: Option<torus_proto::tls::ServerTls>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let answer = answer.clone();
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let answering = answer(req.uri().path().to_string());
                async move {
                    let (status, ctype, body) = answering.await;
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = status;
                    let ctype = hyper::header::HeaderValue::from_static(ctype);
                    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, ctype);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let http = hyper::server::conn::http1::Builder::new();
            match acceptor {
                None => {
                    let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                }
                Some(a) => match tokio::time::timeout(TLS_HANDSHAKE, a.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "HTTPS handshake refused"),
                    Err(_) => tracing::debug!("HTTPS handshake timed out"),
                },
            }
        });
    }
}
