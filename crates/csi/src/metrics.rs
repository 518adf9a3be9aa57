//! Per-RPC figures of the CSI services: how many calls of each method ended
//! with each gRPC code, and how long each method takes — a tower layer
//! around the whole gRPC router, so every service and every answer
//! (including errors returned before a handler runs) is counted once.
//!
//! `torus_csi_requests_total{method,code}` and
//! `torus_csi_request_seconds{method}`. The method label takes only the CSI
//! method names (anything else is `other`), so a client cannot grow the
//! series by calling made-up paths.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::codegen::http;

/// The methods of the CSI v1 Identity, Controller and Node services.
const METHODS: &[&str] = &[
    "GetPluginInfo",
    "GetPluginCapabilities",
    "Probe",
    "CreateVolume",
    "DeleteVolume",
    "ControllerPublishVolume",
    "ControllerUnpublishVolume",
    "ValidateVolumeCapabilities",
    "ListVolumes",
    "GetCapacity",
    "ControllerGetCapabilities",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ListSnapshots",
    "ControllerExpandVolume",
    "ControllerGetVolume",
    "ControllerModifyVolume",
    "NodeStageVolume",
    "NodeUnstageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
    "NodeExpandVolume",
    "NodeGetCapabilities",
    "NodeGetInfo",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Call {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    method: &'static str,
}

/// The CSI services' figures.
#[derive(Clone)]
pub struct CsiMetrics {
    calls: Family<Call, Counter>,
    seconds: Family<Method, Histogram>,
}

/// 1 ms to about 65 s, doubling: a CSI call formats a filesystem or waits
/// for a lease at worst.
fn buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl CsiMetrics {
    /// Registers the figures in `registry`.
    pub fn register(registry: &mut Registry) -> CsiMetrics {
        let m = CsiMetrics { calls: Family::default(), seconds: Family::new_with_constructor(buckets) };
        registry.register("torus_csi_requests", "CSI calls answered, by method and gRPC code", m.calls.clone());
        registry.register(
            "torus_csi_request_seconds",
            "Time from receiving a CSI call to answering it, by method",
            m.seconds.clone(),
        );
        m
    }

    fn record(&self, path: &str, code: tonic::Code, took: Duration) {
        let name = path.rsplit('/').next().unwrap_or_default();
        let method = METHODS.iter().copied().find(|m| *m == name).unwrap_or("other");
        self.calls.get_or_create(&Call { method, code: code_name(code) }).inc();
        self.seconds.get_or_create(&Method { method }).observe(took.as_secs_f64());
    }

    /// The layer that counts every call through a router.
    pub fn layer(self: &Arc<Self>) -> MetricsLayer {
        MetricsLayer(self.clone())
    }
}

/// gRPC's names for its codes (as in the gRPC specification's status code table).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The code of an answer: a unary call that fails is answered with its
/// status in the headers (trailers-only); one that succeeds has none there.
fn code_of<B>(response: &http::Response<B>) -> tonic::Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from)
}

/// A tower layer recording every call into [`CsiMetrics`].
#[derive(Clone)]
pub struct MetricsLayer(Arc<CsiMetrics>);

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Metered<S>;
    fn layer(&self, inner: S) -> Metered<S> {
        Metered { inner, metrics: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: Arc<CsiMetrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        // The service that was polled ready serves this call; a clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let answer = inner.call(request).await;
            let code = answer.as_ref().map_or(tonic::Code::Unknown, code_of);
            metrics.record(&path, code, started.elapsed());
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_methods_are_bounded_and_named_as_grpc_names_them() {
        let mut registry = Registry::default();
        let m = CsiMetrics::register(&mut registry);
        m.record("/csi.v1.Controller/CreateVolume", tonic::Code::Ok, Duration::from_millis(3));
        m.record("/csi.v1.Controller/CreateVolume", tonic::Code::InvalidArgument, Duration::from_millis(1));
        m.record("/made.up/Path", tonic::Code::Unimplemented, Duration::from_millis(1));
        let page = torus_metrics::encode(&registry);
        assert!(page.contains(r#"torus_csi_requests_total{method="CreateVolume",code="OK"} 1"#), "{page}");
        assert!(page.contains(r#"torus_csi_requests_total{method="CreateVolume",code="INVALID_ARGUMENT"} 1"#));
        assert!(page.contains(r#"torus_csi_requests_total{method="other",code="UNIMPLEMENTED"} 1"#));
        assert!(page.contains(r#"torus_csi_request_seconds_count{method="CreateVolume"} 2"#), "{page}");
        let response = http::Response::builder().header("grpc-status", "5").body(()).unwrap();
        assert_eq!(code_of(&response), tonic::Code::NotFound);
        assert_eq!(code_of(&http::Response::new(())), tonic::Code::Ok);
    }
}
