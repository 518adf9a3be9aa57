//! The etcd v3 backend, through the `etcd-client` crate.
//!
//! Every key lives under `<prefix>/`. Every call has a deadline, so that an
//! unreachable etcd is reported (naming the endpoint) within seconds instead
//! of hanging. `etcd_client::Error` is converted here and nowhere else.
//! [`EtcdSecurity`] adds TLS (a CA to verify etcd, a client certificate to
//! present) and an etcd user.

use crate::store::*;
use crate::{MetaError, Result};
use async_trait::async_trait;
use etcd_client::{Client, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions, WatchOptions};
use std::time::Duration;
use tokio::sync::mpsc;

/// Every etcd request of this process, by op (exported by every registry that asks).
static STATS: std::sync::LazyLock<torus_metrics::ops::OpStats<EtcdOp>> =
    std::sync::LazyLock::new(torus_metrics::ops::OpStats::new);

/// The label of etcd request figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct EtcdOp {
    op: &'static str,
}

/// Exports `torus_etcd_requests_total{op}`, `torus_etcd_errors_total{op}` and
/// `torus_etcd_request_seconds{op}` (retries included) in `registry`.
pub fn register_metrics(registry: &mut prometheus_client::registry::Registry) {
    STATS.register_in(registry, "torus_etcd", "etcd requests");
}

/// How long one etcd request may take before it counts as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
    prefix: String,
}

/// How to reach a secured etcd: all optional.
#[derive(Clone, Debug, Default)]
pub struct EtcdSecurity {
    /// PEM CA certificate(s) that signed etcd's server certificate: TLS to etcd.
    pub ca: Option<Vec<u8>>,
    /// PEM certificate and key presented to etcd (`--client-cert-auth`).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// An etcd user and password (etcd authentication).
    pub user: Option<(String, String)>,
}

impl EtcdSecurity {
    fn tls(&self) -> bool {
        self.ca.is_some() || self.identity.is_some()
    }
}

/// Normalises `host:port` or `http(s)://host:port` to a URL etcd-client
/// accepts: `https://` when TLS is configured.
fn normalise(endpoint: &str, tls: bool) -> String {
    let e = endpoint.trim();
    if e.contains("://") {
        e.to_string()
    } else if tls {
        format!("https://{e}")
    } else {
        format!("http://{e}")
    }
}

/// The endpoints that accept a TCP connection within a second (asked at once).
async fn answering(endpoints: &[String]) -> Vec<String> {
    let mut probes = tokio::task::JoinSet::new();
    for (i, ep) in endpoints.iter().enumerate() {
        let rest = ep.split_once("://").map_or(ep.as_str(), |(_, r)| r);
        let addr = rest.split('/').next().unwrap_or(rest).to_string();
        probes.spawn(async move {
            let ok = matches!(
                tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
                Ok(Ok(_))
            );
            (i, ok)
        });
    }
    let mut up = vec![false; endpoints.len()];
    while let Some(Ok((i, ok))) = probes.join_next().await {
        up[i] = ok;
    }
    endpoints.iter().zip(up).filter(|(_, ok)| *ok).map(|(e, _)| e.clone()).collect()
}

impl EtcdStore {
    /// Connects and checks that etcd answers; `endpoints` is comma-separated.
    pub async fn connect(endpoints: &str, prefix: &str) -> Result<Self> {
        Self::connect_with(endpoints, prefix, &EtcdSecurity::default()).await
    }

    /// The same, with TLS and/or an etcd user.
    pub async fn connect_with(endpoints: &str, prefix: &str, security: &EtcdSecurity) -> Result<Self> {
        let tls = security.tls();
        let list: Vec<String> =
            endpoints.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|e| normalise(e, tls)).collect();
        let shown = list.join(",");
        if list.is_empty() {
            return Err(MetaError::Backend { reason: "no etcd endpoint given".into() });
        }
        let prefix = prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with('/') {
            return Err(MetaError::Backend { reason: format!("etcd prefix {prefix:?} must start with '/'") });
        }
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(3));
        if tls {
            if let Some(e) = list.iter().find(|e| e.starts_with("http://")) {
                return Err(MetaError::Backend {
                    reason: format!("endpoint {e} is plain http, but TLS to etcd is set"),
                });
            }
            let mut t = etcd_client::TlsOptions::new();
            if let Some(ca) = &security.ca {
                t = t.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &security.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(t);
        }
        if let Some((user, password)) = &security.user {
            // Simple tokens lapse (etcd's --auth-token-ttl): long-running processes get new ones.
            opts = opts.with_user(user.clone(), password.clone()).with_auto_token_refresh(true);
        }
        let unavailable = |reason: String| MetaError::Unavailable { endpoint: shown.clone(), reason };
        // The client balances requests over its endpoints and, at first, sends
        // some to members that are down (failing them): start with the members
        // that accept connections now, all of them if none does (the error then names them).
        let live = answering(&list).await;
        let use_list = if live.is_empty() { list.clone() } else { live };
        let client =
            tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), Client::connect(&use_list, Some(opts)))
                .await
                .map_err(|_| unavailable("connection timed out".into()))?
                .map_err(|e| unavailable(e.to_string()))?;
        let store = EtcdStore { client, endpoints: list, prefix };
        // The channel connects lazily: ask for something so that a dead endpoint shows now.
        store.get("cluster/config").await?;
        Ok(store)
    }

    fn full(&self, key: &str) -> String {
        format!("{}/{}", self.prefix, key)
    }

    fn strip(&self, key: &[u8]) -> Result<String> {
        let s = std::str::from_utf8(key).map_err(|_| MetaError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: "key is not UTF-8".into(),
        })?;
        Ok(s.strip_prefix(&self.prefix).and_then(|s| s.strip_prefix('/')).unwrap_or(s).to_string())
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
        Ok(KeyValue {
            key: self.strip(kv.key())?,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision() as u64,
            mod_revision: kv.mod_revision() as u64,
            version: kv.version() as u64,
            lease: kv.lease(),
        })
    }

    /// Runs one request, again (up to 4 times) while it fails to connect: the
    /// client's balancer may pick a member that is down (it does not drop it at
    /// once), and a request that never reached a server is safe to send again.
    /// Each call is counted and timed as `op` (`torus_etcd_*`, see [`register_metrics`]).
    async fn retrying<T, F, Fut>(&self, op: &'static str, mut call: F) -> std::result::Result<T, etcd_client::Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let started = std::time::Instant::now();
        let mut tries = 0;
        loop {
            match call(self.client.clone()).await {
                Err(etcd_client::Error::GRpcStatus(s))
                    if tries < 4 && format!("{:?}", s.code()) == "Unavailable" && s.message().contains("connect") =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20 * tries)).await;
                }
                r => {
                    STATS.handles(&EtcdOp { op }).record(0, started.elapsed(), r.is_ok());
                    return r;
                }
            }
        }
    }

    fn err(&self, e: etcd_client::Error) -> MetaError {
        use etcd_client::Error as E;
        match e {
            E::GRpcStatus(ref s) if s.message().contains("requested lease not found") => {
                MetaError::LeaseNotFound { lease: 0 }
            }
            E::LeaseKeepAliveError(ref s) if s.contains("lease not found") => MetaError::LeaseNotFound { lease: 0 },
            // gRPC codes other than the transient ones are the server refusing the request.
            E::GRpcStatus(ref s)
                if !matches!(
                    format!("{:?}", s.code()).as_str(),
                    "Unavailable" | "DeadlineExceeded" | "Cancelled" | "Unknown" | "Aborted"
                ) =>
            {
                MetaError::Backend { reason: s.message().to_string() }
            }
            E::InvalidArgs(s) => MetaError::Backend { reason: s },
            other => MetaError::Unavailable { endpoint: self.endpoints.join(","), reason: other.to_string() },
        }
    }

    fn op(&self, op: &TxnOp) -> etcd_client::TxnOp {
        match op {
            TxnOp::Put { key, value, lease } => {
                let opts = lease.map(|l| PutOptions::new().with_lease(l));
                etcd_client::TxnOp::put(self.full(key), value.clone(), opts)
            }
            TxnOp::Delete { key } => etcd_client::TxnOp::delete(self.full(key), None),
        }
    }
}

#[async_trait]
impl MetadataStore for EtcdStore {
    fn endpoint(&self) -> String {
        self.endpoints.join(",")
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let k = self.full(key);
        let resp = self
            .retrying("get", |mut c| {
                let k = k.clone();
                async move { c.get(k, None).await }
            })
            .await
            .map_err(|e| self.err(e))?;
        resp.kvs().first().map(|kv| self.kv(kv)).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        Ok(self.list_at(prefix).await?.0)
    }

    async fn list_at(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let k = self.full(prefix);
        let resp = self
            .retrying("list", |mut c| {
                let k = k.clone();
                async move { c.get(k, Some(GetOptions::new().with_prefix())).await }
            })
            .await
            .map_err(|e| self.err(e))?;
        let revision = resp
            .header()
            .map(|h| h.revision().max(0) as u64)
            .ok_or_else(|| MetaError::Backend { reason: "etcd answered a range request without a header".into() })?;
        Ok((resp.kvs().iter().map(|kv| self.kv(kv)).collect::<Result<_>>()?, revision))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision> {
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        let k = self.full(key);
        let put = |mut c: Client| {
            let (k, value, opts) = (k.clone(), value.clone(), opts.clone());
            async move { c.put(k, value, opts).await }
        };
        let resp = self.retrying("put", put).await.map_err(|e| match self.err(e) {
            MetaError::LeaseNotFound { .. } => MetaError::LeaseNotFound { lease: lease.unwrap_or(0) },
            other => other,
        })?;
        Ok(resp.header().map(|h| h.revision() as u64).unwrap_or(0))
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let k = self.full(key);
        let resp = self
            .retrying("delete", |mut c| {
                let k = k.clone();
                async move { c.delete(k, None).await }
            })
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.deleted() > 0)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let resp = self
            .client
            .clone()
            .delete(self.full(prefix), Some(DeleteOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err(e))?;
        Ok(resp.deleted() as u64)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        let compares: Vec<etcd_client::Compare> = txn
            .compares
            .iter()
            .map(|c| {
                let k = self.full(&c.key);
                match &c.target {
                    CompareTarget::Exists(true) => etcd_client::Compare::create_revision(k, CompareOp::Greater, 0),
                    CompareTarget::Exists(false) => etcd_client::Compare::create_revision(k, CompareOp::Equal, 0),
                    CompareTarget::ModRevision(r) => etcd_client::Compare::mod_revision(k, CompareOp::Equal, *r as i64),
                    CompareTarget::CreateRevision(r) => {
                        etcd_client::Compare::create_revision(k, CompareOp::Equal, *r as i64)
                    }
                    CompareTarget::Value(v) => etcd_client::Compare::value(k, CompareOp::Equal, v.clone()),
                }
            })
            .collect();
        let t = etcd_client::Txn::new()
            .when(compares)
            .and_then(txn.success.iter().map(|o| self.op(o)).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(|o| self.op(o)).collect::<Vec<_>>());
        let resp = self
            .retrying("txn", |mut c| {
                let t = t.clone();
                async move { c.txn(t).await }
            })
            .await
            .map_err(|e| self.err(e))?;
        Ok(TxnOutcome {
            succeeded: resp.succeeded(),
            revision: resp.header().map(|h| h.revision() as u64).unwrap_or(0),
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .retrying("lease_grant", |mut c| async move { c.lease_grant(secs, None).await })
            .await
            .map_err(|e| self.err(e))?;
        Ok(Lease { id: resp.id(), ttl: Duration::from_secs(resp.ttl().max(0) as u64) })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let not_found = MetaError::LeaseNotFound { lease };
        let call = async {
            let (mut keeper, mut stream) = self
                .retrying("lease_keep_alive", |mut c| async move { c.lease_keep_alive(lease).await })
                .await
                .map_err(|e| self.err(e))?;
            keeper.keep_alive().await.map_err(|e| self.err(e))?;
            match stream.message().await.map_err(|e| self.err(e))? {
                Some(resp) if resp.ttl() > 0 => Ok(Duration::from_secs(resp.ttl() as u64)),
                _ => Err(MetaError::LeaseNotFound { lease }),
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
            Ok(Err(MetaError::LeaseNotFound { .. })) => Err(not_found),
            Ok(r) => r,
            Err(_) => Err(MetaError::Unavailable { endpoint: self.endpoint(), reason: "keep-alive timed out".into() }),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        match self.retrying("lease_revoke", |mut c| async move { c.lease_revoke(lease).await }).await {
            Ok(_) => Ok(()),
            Err(e) => match self.err(e) {
                MetaError::LeaseNotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn watch_prefix(&self, prefix: &str, from: Option<Revision>) -> Result<Watch> {
        let mut opts = WatchOptions::new().with_prefix();
        if let Some(rev) = from {
            opts = opts.with_start_revision(rev as i64);
        }
        let mut stream = self.client.clone().watch(self.full(prefix), Some(opts)).await.map_err(|e| self.err(e))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            let _ = tx.send(Err(MetaError::Backend {
                                reason: format!("watch cancelled: {}", resp.cancel_reason()),
                            }));
                            return;
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let item = me.kv(kv).map(|kv| WatchEvent {
                                kind: match ev.event_type() {
                                    EventType::Put => WatchEventKind::Put,
                                    EventType::Delete => WatchEventKind::Delete,
                                },
                                kv,
                            });
                            if tx.send(item).is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => {
                        let _ = tx.send(Err(MetaError::Unavailable {
                            endpoint: me.endpoint(),
                            reason: "watch stream closed".into(),
                        }));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(me.err(e)));
                        return;
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(rx)
    }
}
