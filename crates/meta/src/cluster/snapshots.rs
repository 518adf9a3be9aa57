//! Snapshots and clones: the metadata of copy-on-write layers.
//!
//! A volume's data is a chain of **layers**, newest first
//! (`VolumeInfo::layers`); each layer is stored on the nodes like a volume
//! of its own (its id comes from the volume id counter, so it is never
//! reused). Writes go to the newest layer; a block never written there
//! reads from the next layer that has it.
//!
//! - A snapshot freezes the volume's chain: the writer (who holds the lock)
//!   records `snapshots/<volume id>/<name>` with the current chain and, in
//!   the same transaction, puts a new empty layer in front of the volume's.
//!   No data is copied; the frozen layers are never written again.
//! - A clone is a new volume whose chain is a new layer over a snapshot's.
//! - A restore gives the (closed) volume a new empty layer over a
//!   snapshot's chain; the layers it no longer uses are collected.
//!
//! A layer is kept while some volume or snapshot lists it
//! ([`Cluster::referenced_layers`]): each node deletes the others. So a
//! snapshot can be deleted while clones of it exist (they keep the layers
//! they read through); a volume with snapshots cannot be deleted.
//!
//! While a client holds the volume, `torusctl` asks its writer for a
//! snapshot with `snapreq/<volume id>/<name>` (on the asker's lease); the
//! writer takes it between two writes and deletes the request, or records
//! why not in it.

use super::keys::{lock_key, name_key, state_key};
use super::{decode, encode, validate_volume_name, Cluster, ClusterError, Result, VolumeInfo};
use crate::{Compare, LeaseId, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use torus_types::{Epoch, VolumeId};

/// A snapshot: a volume's layers frozen at one moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub volume: VolumeId,
    /// The volume's name when the snapshot was taken.
    pub volume_name: String,
    pub name: String,
    /// The frozen layers, newest first.
    pub layers: Vec<VolumeId>,
    /// The volume's size then.
    pub size: u64,
    pub extent_size: u64,
    pub replication: u32,
    /// Unix seconds.
    pub created: u64,
    /// The volume's encryption (its key reads the frozen layers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<super::Encryption>,
}

impl SnapshotInfo {
    /// `VOLUME@SNAPSHOT`.
    pub fn full_name(&self) -> String {
        format!("{}@{}", self.volume_name, self.name)
    }
}

/// A client's request to the volume's writer for a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub requester: String,
    /// Set by the writer when it could not take the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What nodes need to know about the layers that exist.
#[derive(Clone, Debug, Default)]
pub struct LayerMap {
    /// Every layer some volume or snapshot uses, with its replication.
    pub replication: HashMap<VolumeId, usize>,
    /// Each volume's written layer (where its write intent and missing copies apply).
    pub top: HashMap<VolumeId, VolumeId>,
}

fn snapshot_key(volume: VolumeId, name: &str) -> String {
    format!("snapshots/{volume}/{name}")
}

fn request_key(volume: VolumeId, name: &str) -> String {
    format!("snapreq/{volume}/{name}")
}

/// Checks a snapshot name: the rules of volume names.
pub fn validate_snapshot_name(name: &str) -> Result<()> {
    validate_volume_name(name).map_err(|e| match e {
        ClusterError::InvalidVolumeName { name, reason } => ClusterError::InvalidSnapshotName { name, reason },
        e => e,
    })
}

/// Splits `VOLUME@SNAPSHOT` and checks both names.
pub fn parse_snapshot_ref(s: &str) -> Result<(String, String)> {
    let bad = |reason: &str| Err(ClusterError::InvalidSnapshotName { name: s.to_string(), reason: reason.into() });
    let Some((vol, snap)) = s.split_once('@') else { return bad("expected VOLUME@SNAPSHOT") };
    if snap.contains('@') {
        return bad("it has more than one '@'");
    }
    validate_volume_name(vol)?;
    validate_snapshot_name(snap)?;
    Ok((vol.to_string(), snap.to_string()))
}

impl Cluster {
    /// A volume's snapshots, in name order.
    pub async fn snapshots_of(&self, volume: VolumeId) -> Result<Vec<SnapshotInfo>> {
        self.store.list(&format!("snapshots/{volume}/")).await?.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
    }

    /// Every snapshot (of one volume, by name, if given).
    pub async fn snapshots(&self, volume: Option<&str>) -> Result<Vec<SnapshotInfo>> {
        match volume {
            Some(name) => self.snapshots_of(self.volume(name).await?.id).await,
            None => self.store.list("snapshots/").await?.iter().map(|kv| decode(&kv.key, &kv.value)).collect(),
        }
    }

    async fn snapshot_kv(&self, volume: &str, name: &str) -> Result<(crate::KeyValue, SnapshotInfo)> {
        let info = self.volume(volume).await?;
        let kv = self
            .store
            .get(&snapshot_key(info.id, name))
            .await?
            .ok_or_else(|| ClusterError::SnapshotNotFound { volume: volume.into(), name: name.into() })?;
        let snap = decode(&kv.key, &kv.value)?;
        Ok((kv, snap))
    }

    pub async fn snapshot(&self, volume: &str, name: &str) -> Result<SnapshotInfo> {
        Ok(self.snapshot_kv(volume, name).await?.1)
    }

    /// Takes a snapshot, as the volume's writer of `epoch`, which must have
    /// stopped writing and flushed: the current layers are frozen and the
    /// volume gets a new empty layer. Returns the volume as it is now.
    pub async fn take_snapshot(&self, volume: &str, name: &str, epoch: Epoch) -> Result<(VolumeInfo, SnapshotInfo)> {
        validate_snapshot_name(name)?;
        for _ in 0..16 {
            let (kv, info) = self.volume_kv(volume).await?;
            let key = snapshot_key(info.id, name);
            if self.store.get(&key).await?.is_some() {
                return Err(ClusterError::SnapshotExists { volume: volume.into(), name: name.into() });
            }
            let (next, counter) = self.id_counter().await?;
            let snap = SnapshotInfo {
                volume: info.id,
                volume_name: info.name.clone(),
                name: name.to_string(),
                layers: info.chain(),
                size: info.size,
                extent_size: info.extent_size,
                replication: info.replication,
                created: torus_types::unix_now(),
                encryption: info.encryption.clone(),
            };
            let mut now = info.clone();
            now.layers = std::iter::once(VolumeId(next)).chain(info.chain()).collect();
            let txn = Txn::when(vec![
                counter,
                Compare::mod_revision(name_key(volume), kv.mod_revision),
                Compare::create_revision(lock_key(info.id), epoch.0),
                Compare::exists(key.clone(), false),
            ])
            .and_then(vec![
                TxnOp::put("volumes/next-id", (next + 1).to_string()),
                TxnOp::put(name_key(volume), encode(&now)),
                TxnOp::put(key, encode(&snap)),
            ]);
            if self.store.txn(txn).await?.succeeded {
                return Ok((now, snap));
            }
            if !matches!(self.volume_lock(info.id).await?, Some((_, e)) if e == epoch) {
                return Err(ClusterError::LockLost { volume: info.id, epoch });
            }
        }
        Err(ClusterError::Contended)
    }

    /// Deletes a snapshot's record. Its layers stay as long as a volume or
    /// another snapshot reads through them (its clones, later snapshots);
    /// the nodes delete those nobody uses any more.
    pub async fn delete_snapshot(&self, volume: &str, name: &str) -> Result<SnapshotInfo> {
        let (kv, snap) = self.snapshot_kv(volume, name).await?;
        let txn = Txn::when(vec![Compare::mod_revision(kv.key.clone(), kv.mod_revision)])
            .and_then(vec![TxnOp::delete(kv.key.clone())]);
        if self.store.txn(txn).await?.succeeded {
            return Ok(snap);
        }
        Err(ClusterError::SnapshotNotFound { volume: volume.into(), name: name.into() })
    }

    /// Makes a closed volume read like one of its snapshots: a new empty layer
    /// over the snapshot's, at the snapshot's size. Refused while a writer
    /// holds the volume. The write intent and missing copies of the layer it
    /// leaves go with it.
    pub async fn restore_snapshot(&self, volume: &str, name: &str) -> Result<VolumeInfo> {
        for _ in 0..16 {
            let (kv, info) = self.volume_kv(volume).await?;
            let (skv, snap) = self.snapshot_kv(volume, name).await?;
            if let Some((lock, _)) = self.volume_lock(info.id).await? {
                return Err(ClusterError::VolumeLocked { name: volume.into(), volume: info.id, holder: lock.holder });
            }
            let (next, counter) = self.id_counter().await?;
            let mut now = info.clone();
            now.size = snap.size;
            now.layers = std::iter::once(VolumeId(next)).chain(snap.layers.iter().copied()).collect();
            let txn = Txn::when(vec![
                counter,
                Compare::mod_revision(name_key(volume), kv.mod_revision),
                Compare::mod_revision(skv.key.clone(), skv.mod_revision),
                Compare::exists(lock_key(info.id), false),
            ])
            .and_then(vec![
                TxnOp::put("volumes/next-id", (next + 1).to_string()),
                TxnOp::put(name_key(volume), encode(&now)),
                TxnOp::delete(state_key(info.id)),
            ]);
            if self.store.txn(txn).await?.succeeded {
                return Ok(now);
            }
        }
        Err(ClusterError::Contended)
    }

    /// Creates volume `new_name` sharing a snapshot's data until written.
    pub async fn clone_volume(&self, volume: &str, name: &str, new_name: &str) -> Result<VolumeInfo> {
        validate_volume_name(new_name)?;
        for _ in 0..16 {
            if self.store.get(&name_key(new_name)).await?.is_some() {
                return Err(ClusterError::VolumeExists { name: new_name.into() });
            }
            let (skv, snap) = self.snapshot_kv(volume, name).await?;
            let (next, counter) = self.id_counter().await?;
            let info = VolumeInfo {
                id: VolumeId(next),
                name: new_name.to_string(),
                size: snap.size,
                extent_size: snap.extent_size,
                replication: snap.replication,
                created: torus_types::unix_now(),
                layers: std::iter::once(VolumeId(next)).chain(snap.layers.iter().copied()).collect(),
                encryption: snap.encryption.clone(),
            };
            let txn = Txn::when(vec![
                counter,
                Compare::exists(name_key(new_name), false),
                Compare::mod_revision(skv.key.clone(), skv.mod_revision),
            ])
            .and_then(vec![
                TxnOp::put("volumes/next-id", (next + 1).to_string()),
                TxnOp::put(name_key(new_name), encode(&info)),
            ]);
            if self.store.txn(txn).await?.succeeded {
                return Ok(info);
            }
        }
        Err(ClusterError::Contended)
    }

    /// Every layer in use, with its replication, and each volume's written layer.
    pub async fn layers(&self) -> Result<LayerMap> {
        let mut map = LayerMap::default();
        for v in self.volumes().await? {
            map.top.insert(v.id, v.top());
            for l in v.chain() {
                map.replication.insert(l, v.replication as usize);
            }
        }
        for s in self.snapshots(None).await? {
            for l in s.layers {
                map.replication.insert(l, s.replication as usize);
            }
        }
        Ok(map)
    }

    /// The layers in use, and the id counter read *before* them: a layer
    /// below it that is not listed was deleted (every transaction that makes
    /// a layer, or stops using one, keeps it listed by a volume or snapshot
    /// throughout).
    pub async fn referenced_layers(&self) -> Result<(u64, HashSet<VolumeId>)> {
        let next = self.next_volume_id().await?;
        let map = self.layers().await?;
        Ok((next, map.replication.into_keys().collect()))
    }

    /// Asks the writer holding `volume` for snapshot `name` (on `lease`: the
    /// request goes if the asker dies).
    pub async fn request_snapshot(&self, volume: VolumeId, name: &str, requester: &str, lease: LeaseId) -> Result<()> {
        let req = SnapshotRequest { requester: requester.to_string(), error: None };
        self.store.put(&request_key(volume, name), encode(&req), Some(lease)).await?;
        Ok(())
    }

    /// The snapshot requests waiting for a volume's writer (with their key's lease).
    pub async fn snapshot_requests(&self, volume: VolumeId) -> Result<Vec<(String, SnapshotRequest, LeaseId)>> {
        let prefix = format!("snapreq/{volume}/");
        let mut out = Vec::new();
        for kv in self.store.list(&prefix).await? {
            let req: SnapshotRequest = decode(&kv.key, &kv.value)?;
            out.push((kv.key[prefix.len()..].to_string(), req, kv.lease));
        }
        Ok(out)
    }

    /// One request, as it is now (`None`: withdrawn or taken).
    pub async fn snapshot_request(&self, volume: VolumeId, name: &str) -> Result<Option<SnapshotRequest>> {
        match self.store.get(&request_key(volume, name)).await? {
            Some(kv) => Ok(Some(decode(&kv.key, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// The writer's answer: done (the request goes), or why not (kept on the asker's lease).
    pub async fn answer_snapshot_request(
        &self,
        volume: VolumeId,
        name: &str,
        lease: LeaseId,
        error: Option<String>,
    ) -> Result<()> {
        let key = request_key(volume, name);
        match error {
            None => {
                self.store.delete(&key).await?;
            }
            Some(e) => {
                let Some(kv) = self.store.get(&key).await? else { return Ok(()) };
                let mut req: SnapshotRequest = decode(&kv.key, &kv.value)?;
                req.error = Some(e);
                let txn = Txn::when(vec![Compare::mod_revision(key.clone(), kv.mod_revision)])
                    .and_then(vec![TxnOp::put_leased(key, encode(&req), lease)]);
                self.store.txn(txn).await?;
            }
        }
        Ok(())
    }

    /// The asker gives up on (or has read the answer to) its request.
    pub async fn withdraw_snapshot_request(&self, volume: VolumeId, name: &str) -> Result<()> {
        self.store.delete(&request_key(volume, name)).await?;
        Ok(())
    }

    /// Wakes a writer when a snapshot request for its volume arrives.
    pub fn snapshot_request_watch(&self, volume: VolumeId) -> super::RingWatch {
        self.prefix_watch(format!("snapreq/{volume}/"))
    }
}
