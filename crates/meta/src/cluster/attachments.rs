//! Which hosts may attach a volume, and the hosts that attach volumes.
//!
//! A *host* is a machine that attaches volumes as local block devices (a CSI
//! node plugin); it registers `hosts/<host id>` on its own lease, so a host
//! whose processes died disappears from here within its lease TTL.
//! `attachments/<volume name>` lists the hosts a volume is published to
//! (CSI ControllerPublishVolume), each with the mode it was published in.
//!
//! Publishing is exclusive for single-host modes: a volume published
//! exclusively to a live host is refused to every other host. A host that is
//! no longer registered (dead) loses its claim, so a volume moves on as soon
//! as the dead host's lease lapses. This record says who *may* attach; the
//! data itself is guarded by the writer lock and its epoch (see `volumes`).

use super::keys::{attachments_key, name_key};
use super::{decode, encode, Cluster, ClusterError, Result};
use crate::{Compare, LeaseId, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A host that attaches volumes, as registered on its lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub id: String,
    /// Failure-domain labels (zone, rack, ...).
    pub labels: BTreeMap<String, String>,
    /// Unix seconds.
    pub registered: u64,
    /// TTL of the host's registration lease, in seconds: how long after its
    /// death it still counts as live.
    #[serde(default = "default_host_ttl")]
    pub lease_ttl: u64,
}

fn default_host_ttl() -> u64 {
    10
}

/// How a volume is published to one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachMode {
    pub read_only: bool,
    /// No other host may have the volume published at the same time.
    pub exclusive: bool,
}

/// The hosts a volume is published to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachments {
    pub hosts: BTreeMap<String, AttachMode>,
}

fn host_key(id: &str) -> String {
    format!("hosts/{id}")
}

impl Cluster {
    /// Registers (or refreshes) a host on `lease`.
    pub async fn register_host(&self, host: &HostInfo, lease: LeaseId) -> Result<()> {
        self.store.put(&host_key(&host.id), encode(host), Some(lease)).await?;
        Ok(())
    }

    /// A registered host, if its lease is alive.
    pub async fn host(&self, id: &str) -> Result<Option<HostInfo>> {
        match self.store.get(&host_key(id)).await? {
            Some(kv) => Ok(Some(decode(&kv.key, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// The hosts a volume is published to.
    pub async fn attachments(&self, volume: &str) -> Result<Attachments> {
        match self.store.get(&attachments_key(volume)).await? {
            Some(kv) => decode(&kv.key, &kv.value),
            None => Ok(Attachments::default()),
        }
    }

    /// Every volume's attachments, by volume name (volumes published nowhere are absent).
    pub async fn all_attachments(&self) -> Result<BTreeMap<String, Attachments>> {
        let mut out = BTreeMap::new();
        for kv in self.store.list("attachments/").await? {
            if let Some(name) = kv.key.strip_prefix("attachments/") {
                out.insert(name.to_string(), decode(&kv.key, &kv.value)?);
            }
        }
        Ok(out)
    }

    /// Publishes `volume` to `host` in `mode`. Idempotent: publishing again
    /// in the same mode succeeds. Refused when the host is not registered,
    /// when it already has the volume in another mode, or when another live
    /// host holds it exclusively (or this mode is exclusive and another live
    /// host has it). Claims of hosts that are no longer registered are dropped.
    pub async fn publish(&self, volume: &str, host: &str, mode: AttachMode) -> Result<()> {
        for _ in 0..16 {
            // Compared in the transaction: a publish racing a delete must not
            // leave a claim that a later volume of the same name inherits.
            let (vol_kv, _) = self.volume_kv(volume).await?;
            if self.host(host).await?.is_none() {
                return Err(ClusterError::UnknownHost { host: host.to_string() });
            }
            let kv = self.store.get(&attachments_key(volume)).await?;
            let mut doc: Attachments = match &kv {
                Some(kv) => decode(&kv.key, &kv.value)?,
                None => Attachments::default(),
            };
            match doc.hosts.get(host) {
                Some(m) if *m == mode => return Ok(()),
                Some(m) => {
                    return Err(ClusterError::AttachedIncompatibly {
                        volume: volume.to_string(),
                        host: host.to_string(),
                        read_only: m.read_only,
                    })
                }
                None => {}
            }
            let mut dead = Vec::new();
            for (other, m) in &doc.hosts {
                if !(m.exclusive || mode.exclusive) {
                    continue;
                }
                if self.host(other).await?.is_some() {
                    return Err(ClusterError::AttachedElsewhere { volume: volume.to_string(), host: other.clone() });
                }
                dead.push(other.clone());
            }
            for d in dead {
                tracing::info!(volume, host = %d, "dropping the claim of a host that is no longer registered");
                doc.hosts.remove(&d);
            }
            doc.hosts.insert(host.to_string(), mode);
            let cmp = match &kv {
                Some(kv) => Compare::mod_revision(attachments_key(volume), kv.mod_revision),
                None => Compare::exists(attachments_key(volume), false),
            };
            let txn = Txn::when(vec![cmp, Compare::mod_revision(name_key(volume), vol_kv.mod_revision)])
                .and_then(vec![TxnOp::put(attachments_key(volume), encode(&doc))]);
            if self.store.txn(txn).await?.succeeded {
                return Ok(());
            }
        }
        Err(ClusterError::Contended)
    }

    /// Unpublishes `volume` from `host`. Idempotent: a volume or host not
    /// published (or not existing) is already unpublished.
    pub async fn unpublish(&self, volume: &str, host: &str) -> Result<()> {
        for _ in 0..16 {
            let Some(kv) = self.store.get(&attachments_key(volume)).await? else { return Ok(()) };
            let mut doc: Attachments = decode(&kv.key, &kv.value)?;
            if doc.hosts.remove(host).is_none() {
                return Ok(());
            }
            let op = if doc.hosts.is_empty() {
                TxnOp::delete(attachments_key(volume))
            } else {
                TxnOp::put(attachments_key(volume), encode(&doc))
            };
            let txn =
                Txn::when(vec![Compare::mod_revision(attachments_key(volume), kv.mod_revision)]).and_then(vec![op]);
            if self.store.txn(txn).await?.succeeded {
                return Ok(());
            }
        }
        Err(ClusterError::Contended)
    }
}
