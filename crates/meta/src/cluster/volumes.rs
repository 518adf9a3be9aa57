//! Volumes (name -> id, size, extent size, replication) and their writer locks.
//!
//! A volume's id comes from a counter and is never reused. A writer holds
//! `locks/<id>` on its own lease; the lock key's create revision is the
//! writer's epoch, which only grows from one holder to the next.

use super::keys::{attachments_key, lock_key, name_key, state_key};
use super::{decode, encode, Cluster, ClusterError, Result};
use crate::{Compare, LeaseId, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use torus_types::{Epoch, VolumeId};

/// Largest volume size accepted: 1 EiB.
pub const MAX_VOLUME_SIZE: u64 = 1 << 60;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    /// Bytes; a multiple of 512.
    pub size: u64,
    pub extent_size: u64,
    pub replication: u32,
    /// Unix seconds.
    pub created: u64,
    /// The volume's data layers, newest first (see `snapshots`): writes go
    /// to the first; a block never written there reads from the next that
    /// has it. Empty: a single layer stored under the volume's own id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<VolumeId>,
    /// Set when the volume's data is encrypted (see [`Encryption`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// How a volume's data is encrypted: the cipher, and the volume's own key
/// wrapped by a cluster key (which is never stored). The nodes store and
/// check ciphertext; only clients given the cluster key read plaintext.
/// Snapshots and clones keep the key of the volume they come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// `aes-256-xts` (512-byte sectors, tweak = the sector's number in the volume).
    pub cipher: String,
    /// Which cluster key wraps it: the first bytes of the key's SHA-256, in hex.
    pub key_id: String,
    /// The volume key, sealed by the cluster key (base64 of nonce, ciphertext and tag).
    pub wrapped_key: String,
}

/// Why [`Cluster::rewrap_keys`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum RewrapError<E> {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("{0}")]
    Rewrap(E),
}

impl<E> From<crate::MetaError> for RewrapError<E> {
    fn from(e: crate::MetaError) -> Self {
        RewrapError::Cluster(e.into())
    }
}

impl VolumeInfo {
    pub fn extent_count(&self) -> u64 {
        self.size.div_ceil(self.extent_size)
    }

    /// The data layers, newest (written) first; never empty.
    pub fn chain(&self) -> Vec<VolumeId> {
        if self.layers.is_empty() {
            vec![self.id]
        } else {
            self.layers.clone()
        }
    }

    /// The layer writes go to.
    pub fn top(&self) -> VolumeId {
        self.layers.first().copied().unwrap_or(self.id)
    }
}

/// Who holds a volume for writing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeLock {
    /// A human description: `torusblk@host pid 1234`.
    pub holder: String,
    pub lease: LeaseId,
    /// The ring version the writer is using; nodes wait for every writer to
    /// reach a new version before they move data.
    #[serde(default)]
    pub ring_version: u64,
    /// The process holding it, so that a successor on the same host can tell
    /// that it died and take over at once (older records have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessTag>,
    /// Held by a storage node's repairer (no client): it yields the volume to
    /// any client that asks for it (`wanted/<id>`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub repair: bool,
}

/// Names one process on one host, across PID reuse and container PID
/// namespaces: a process is the same only if all five fields match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessTag {
    pub host: String,
    /// `/proc/sys/kernel/random/boot_id`: a reboot ends every process.
    pub boot_id: String,
    /// The PID namespace (`/proc/self/ns/pid`): PIDs mean something only within it.
    pub pid_ns: String,
    pub pid: u32,
    /// Start time in clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
}

/// Checks a volume name: 1-128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
pub fn validate_volume_name(name: &str) -> Result<()> {
    let bad =
        |reason: &str| Err(ClusterError::InvalidVolumeName { name: name.to_string(), reason: reason.to_string() });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 128 {
        return bad("it is longer than 128 characters");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("it must not start with '.' or '-'");
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return bad(&format!("character {c:?} is not allowed (use letters, digits, '.', '_' and '-')"));
    }
    Ok(())
}

fn wanted_key(id: VolumeId) -> String {
    format!("wanted/{id}")
}

impl Cluster {
    /// Creates a block volume. The name must be new; the size a positive multiple of 512.
    pub async fn create_volume(&self, name: &str, size: u64, replication: Option<u32>) -> Result<VolumeInfo> {
        self.create_volume_with(name, size, replication, None).await
    }

    /// Creates a block volume, encrypted if `encryption` is given.
    pub async fn create_volume_with(
        &self,
        name: &str,
        size: u64,
        replication: Option<u32>,
        encryption: Option<Encryption>,
    ) -> Result<VolumeInfo> {
        validate_volume_name(name)?;
        if size == 0 || size % 512 != 0 {
            return Err(ClusterError::InvalidVolumeSize {
                size,
                reason: "it must be a positive multiple of 512 bytes".into(),
            });
        }
        if size > MAX_VOLUME_SIZE {
            return Err(ClusterError::InvalidVolumeSize { size, reason: "it is larger than 1 EiB".into() });
        }
        let config = self.config().await?;
        let replication = replication.unwrap_or(config.replication);
        if !(1..=16).contains(&replication) {
            return Err(ClusterError::InvalidConfig {
                reason: format!("replication {replication} must be between 1 and 16"),
            });
        }
        let (ring, _) = self.ring().await?;
        if !ring.members.is_empty() && replication as usize > ring.members.len() {
            return Err(ClusterError::Refused {
                reason: format!(
                    "replication {replication} is larger than the {} node(s) in the ring",
                    ring.members.len()
                ),
            });
        }
        for _ in 0..16 {
            if self.store.get(&name_key(name)).await?.is_some() {
                return Err(ClusterError::VolumeExists { name: name.to_string() });
            }
            let (next, cmp) = self.id_counter().await?;
            let info = VolumeInfo {
                id: VolumeId(next),
                name: name.to_string(),
                size,
                extent_size: config.extent_size,
                replication,
                created: torus_types::unix_now(),
                layers: Vec::new(),
                encryption: encryption.clone(),
            };
            let txn = Txn::when(vec![cmp, Compare::exists(name_key(name), false)]).and_then(vec![
                TxnOp::put("volumes/next-id", (next + 1).to_string()),
                TxnOp::put(name_key(name), encode(&info)),
            ]);
            if self.store.txn(txn).await?.succeeded {
                return Ok(info);
            }
        }
        Err(ClusterError::Contended)
    }

    /// Cluster key rotation: gives every encrypted volume and snapshot the
    /// encryption `rewrap` returns for its current one (`Ok(None)`: leave it
    /// as it is). A record is replaced only if unchanged since it was read
    /// (else it is read again), so nothing else it holds is lost. Returns the
    /// keys of the records changed; stops at the first error of `rewrap`.
    pub async fn rewrap_keys<E>(
        &self,
        rewrap: impl Fn(&str, &Encryption) -> std::result::Result<Option<Encryption>, E>,
    ) -> std::result::Result<Vec<String>, RewrapError<E>> {
        let mut changed = Vec::new();
        for prefix in ["volumes/by-name/", "snapshots/"] {
            for listed in self.store.list(prefix).await? {
                let mut kv = Some(listed);
                for _ in 0..16 {
                    let Some(cur) = kv.take() else { break };
                    let mut record: serde_json::Value = decode(&cur.key, &cur.value)?;
                    let Some(enc) = record.get("encryption").filter(|e| !e.is_null()) else { break };
                    let enc: Encryption = serde_json::from_value(enc.clone()).map_err(|e| {
                        ClusterError::Meta(crate::MetaError::Corrupt { key: cur.key.clone(), reason: e.to_string() })
                    })?;
                    let Some(new) = rewrap(&cur.key, &enc).map_err(RewrapError::Rewrap)? else { break };
                    record["encryption"] = serde_json::to_value(&new).expect("encryption serialises");
                    let txn = Txn::when(vec![Compare::mod_revision(cur.key.clone(), cur.mod_revision)])
                        .and_then(vec![TxnOp::put(cur.key.clone(), encode(&record))]);
                    if self.store.txn(txn).await?.succeeded {
                        changed.push(cur.key.clone());
                        break;
                    }
                    kv = self.store.get(&cur.key).await?;
                }
            }
        }
        Ok(changed)
    }

    /// The next id to allocate, and the comparison that makes a transaction
    /// allocating it fail if another took it meanwhile. Volumes and layers
    /// share this counter: an id is never reused.
    pub(super) async fn id_counter(&self) -> Result<(u64, Compare)> {
        Ok(match self.store.get("volumes/next-id").await? {
            Some(kv) => {
                let n: u64 = std::str::from_utf8(&kv.value).ok().and_then(|s| s.parse().ok()).ok_or_else(|| {
                    ClusterError::Meta(crate::MetaError::Corrupt { key: kv.key.clone(), reason: "not a number".into() })
                })?;
                (n, Compare::mod_revision("volumes/next-id", kv.mod_revision))
            }
            None => (1, Compare::exists("volumes/next-id", false)),
        })
    }

    /// Grows a volume to `new_size` bytes (a multiple of 512). A size at or
    /// below the current one changes nothing and returns the volume as it is:
    /// volumes never shrink (data past the end would be lost).
    pub async fn grow_volume(&self, name: &str, new_size: u64) -> Result<VolumeInfo> {
        if new_size % 512 != 0 || new_size > MAX_VOLUME_SIZE {
            return Err(ClusterError::InvalidVolumeSize {
                size: new_size,
                reason: "it must be a multiple of 512 bytes and at most 1 EiB".into(),
            });
        }
        for _ in 0..16 {
            let (kv, mut info) = self.volume_kv(name).await?;
            if new_size <= info.size {
                return Ok(info);
            }
            info.size = new_size;
            let txn = Txn::when(vec![Compare::mod_revision(name_key(name), kv.mod_revision)])
                .and_then(vec![TxnOp::put(name_key(name), encode(&info))]);
            if self.store.txn(txn).await?.succeeded {
                return Ok(info);
            }
        }
        Err(ClusterError::Contended)
    }

    /// Shrinks a volume to `new_size` bytes (a positive multiple of 512).
    /// Only the writer holding the lock with `epoch` may: it must have zeroed
    /// everything past the new end first, so that a later growth shows
    /// zeroes there, never old data.
    pub async fn shrink_volume(&self, name: &str, new_size: u64, epoch: Epoch) -> Result<VolumeInfo> {
        if new_size == 0 || new_size % 512 != 0 {
            return Err(ClusterError::InvalidVolumeSize {
                size: new_size,
                reason: "it must be a positive multiple of 512 bytes".into(),
            });
        }
        let (kv, mut info) = self.volume_kv(name).await?;
        if new_size >= info.size {
            return Ok(info);
        }
        info.size = new_size;
        let txn = Txn::when(vec![
            Compare::mod_revision(name_key(name), kv.mod_revision),
            Compare::create_revision(lock_key(info.id), epoch.0),
        ])
        .and_then(vec![TxnOp::put(name_key(name), encode(&info))]);
        if self.store.txn(txn).await?.succeeded {
            return Ok(info);
        }
        Err(ClusterError::LockLost { volume: info.id, epoch })
    }

    pub async fn volume(&self, name: &str) -> Result<VolumeInfo> {
        Ok(self.volume_kv(name).await?.1)
    }

    /// A volume's record and its key's revisions (for compare-and-swap).
    pub(super) async fn volume_kv(&self, name: &str) -> Result<(crate::KeyValue, VolumeInfo)> {
        let kv = self
            .store
            .get(&name_key(name))
            .await?
            .ok_or_else(|| ClusterError::VolumeNotFound { name: name.to_string() })?;
        let info = decode(&kv.key, &kv.value)?;
        Ok((kv, info))
    }

    /// Every volume, in name order.
    pub async fn volumes(&self) -> Result<Vec<VolumeInfo>> {
        self.store.list("volumes/by-name/").await?.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
    }

    /// The current writer of a volume, if any.
    pub async fn volume_lock(&self, id: VolumeId) -> Result<Option<(VolumeLock, Epoch)>> {
        match self.store.get(&lock_key(id)).await? {
            Some(kv) => Ok(Some((decode(&kv.key, &kv.value)?, Epoch(kv.create_revision)))),
            None => Ok(None),
        }
    }

    /// Deletes a volume's metadata. Refused while a writer holds it.
    /// Refused while it has snapshots (a snapshot changes the volume's record,
    /// so one taken meanwhile fails the transaction).
    pub async fn delete_volume(&self, name: &str) -> Result<VolumeInfo> {
        let (kv, info) = self.volume_kv(name).await?;
        let snapshots = self.snapshots_of(info.id).await?;
        if !snapshots.is_empty() {
            return Err(ClusterError::HasSnapshots {
                volume: name.to_string(),
                snapshots: snapshots.into_iter().map(|s| s.name).collect(),
            });
        }
        let txn = Txn::when(vec![
            Compare::mod_revision(name_key(name), kv.mod_revision),
            Compare::exists(lock_key(info.id), false),
        ])
        .and_then(vec![
            TxnOp::delete(name_key(name)),
            TxnOp::delete(state_key(info.id)),
            TxnOp::delete(attachments_key(name)),
        ]);
        if self.store.txn(txn).await?.succeeded {
            return Ok(info);
        }
        match self.volume_lock(info.id).await? {
            Some((lock, _)) => {
                Err(ClusterError::VolumeLocked { name: name.to_string(), volume: info.id, holder: lock.holder })
            }
            None => Err(ClusterError::Contended),
        }
    }

    /// Takes a volume's writer lock on `lock.lease`. Returns the writer's epoch.
    pub async fn lock_volume(&self, vol: &VolumeInfo, lock: &VolumeLock) -> Result<Epoch> {
        let txn = Txn::when(vec![Compare::exists(lock_key(vol.id), false), Compare::exists(name_key(&vol.name), true)])
            .and_then(vec![TxnOp::put_leased(lock_key(vol.id), encode(lock), lock.lease)]);
        let out = self.store.txn(txn).await?;
        if out.succeeded {
            return Ok(Epoch(out.revision));
        }
        match self.volume_lock(vol.id).await? {
            Some((l, _)) => {
                Err(ClusterError::VolumeLocked { name: vol.name.clone(), volume: vol.id, holder: l.holder })
            }
            None => Err(ClusterError::VolumeNotFound { name: vol.name.clone() }),
        }
    }

    /// Records the ring version a writer now uses (keeps the lock and its epoch).
    pub async fn set_lock_ring_version(&self, id: VolumeId, lease: LeaseId, ring_version: u64) -> Result<()> {
        let Some(kv) = self.store.get(&lock_key(id)).await? else { return Ok(()) };
        let mut lock: VolumeLock = decode(&kv.key, &kv.value)?;
        if lock.lease != lease {
            return Ok(());
        }
        lock.ring_version = ring_version;
        let txn = Txn::when(vec![Compare::mod_revision(lock_key(id), kv.mod_revision)])
            .and_then(vec![TxnOp::put_leased(lock_key(id), encode(&lock), lease)]);
        self.store.txn(txn).await?;
        Ok(())
    }

    /// Removes the lock of a holder known to be dead (its epoch, the lock's
    /// create revision `epoch`, is fenced by the next writer anyway) and
    /// revokes its lease. False if the lock changed meanwhile.
    pub async fn break_lock(&self, id: VolumeId, epoch: Epoch, lease: LeaseId) -> Result<bool> {
        let txn = Txn::when(vec![Compare::create_revision(lock_key(id), epoch.0)])
            .and_then(vec![TxnOp::delete(lock_key(id))]);
        let broken = self.store.txn(txn).await?.succeeded;
        if broken {
            // Its other keys (a `wanted` mark) go with the lease; it may have lapsed already.
            let _ = self.store.revoke_lease(lease).await;
        }
        Ok(broken)
    }

    /// Asks a repairer holding the volume to hand it over: a client waits for
    /// the lock. The mark lives on the waiter's lease.
    pub async fn want_volume(&self, id: VolumeId, holder: &str, lease: LeaseId) -> Result<()> {
        self.store.put(&wanted_key(id), holder.as_bytes().to_vec(), Some(lease)).await?;
        Ok(())
    }

    /// Whether a client waits for the volume (see `want_volume`).
    pub async fn volume_wanted(&self, id: VolumeId) -> Result<bool> {
        Ok(self.store.get(&wanted_key(id)).await?.is_some())
    }

    /// The waiter got the lock: its mark goes.
    pub async fn unwant_volume(&self, id: VolumeId) -> Result<()> {
        self.store.delete(&wanted_key(id)).await?;
        Ok(())
    }

    /// Every writer lock.
    pub async fn locks(&self) -> Result<Vec<VolumeLock>> {
        self.store.list("locks/").await?.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
    }

    /// The next volume id to be allocated: every id below it is allocated.
    pub async fn next_volume_id(&self) -> Result<u64> {
        Ok(match self.store.get("volumes/next-id").await? {
            Some(kv) => std::str::from_utf8(&kv.value).ok().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX),
            None => 1,
        })
    }

    /// Releases a volume's writer lock if `lease` still holds it.
    pub async fn unlock_volume(&self, id: VolumeId, lease: LeaseId) -> Result<()> {
        if let Some(kv) = self.store.get(&lock_key(id)).await? {
            if kv.lease == lease {
                let txn = Txn::when(vec![Compare::mod_revision(lock_key(id), kv.mod_revision)])
                    .and_then(vec![TxnOp::delete(lock_key(id))]);
                self.store.txn(txn).await?;
            }
        }
        Ok(())
    }
}
