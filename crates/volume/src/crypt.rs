//! Encryption at rest: the cluster key, each volume's key, and the
//! encrypted data path.
//!
//! - A **cluster key** (32 bytes, in a file given with `--key-file`) is never
//!   stored in the cluster. It wraps (AES-256-GCM) each encrypted volume's
//!   own random 64-byte key, which etcd keeps in the volume's record
//!   ([`Encryption`]); a wrong cluster key fails the wrap's tag, so a client
//!   refuses the volume instead of serving garbage.
//! - Data is encrypted by the client with **AES-256-XTS** per 512-byte
//!   sector, the tweak being the sector's number in the volume. 512 rather
//!   than 4096: volume sizes are multiples of 512 and volumes grow, so a
//!   4 KiB unit at the end would change size. Snapshots and clones share
//!   their origin's key and sector numbers, so layers need no special case.
//! - Nodes store, checksum, scrub, repair and move ciphertext without the
//!   key. A sector that reads as all zeroes (never written, trimmed, zeroed)
//!   is zeroes in plaintext too: the chance that a real ciphertext sector is
//!   all zeroes is 2^-4096.
//! - Writes that do not cover whole sectors read, decrypt, merge and
//!   re-encrypt their edge sectors under a lock per sector (striped).

use crate::VolumeError;
use aes::cipher::KeyInit;
use aes::Aes256;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use ring::aead;
use std::future::Future;
use std::path::{Path, PathBuf};
use torus_meta::cluster::Encryption;
use xts_mode::Xts128;
use zeroize::Zeroizing;

/// The only cipher: XTS over AES-256, 512-byte sectors.
pub const CIPHER: &str = "aes-256-xts";
/// The encryption unit.
pub const SECTOR: u64 = 512;
/// Bound into every wrapped key (AES-GCM associated data).
const WRAP_CONTEXT: &[u8] = b"torus volume key v1 aes-256-xts";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the cluster key {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} is not a cluster key: {reason} (make one with `head -c 32 /dev/urandom > {}`)",
        path.display()
    )]
    BadFile { path: PathBuf, reason: String },
    #[error(
        "volume {volume} is encrypted with cluster key {wanted}, not with the key given ({given}): \
         give the cluster key it was created with (--key-file)"
    )]
    WrongKey { volume: String, wanted: String, given: String },
    #[error(
        "volume {volume} is encrypted (cluster key {wanted}): give the cluster key with --key-file \
         (or TORUS_KEY_FILE)"
    )]
    KeyRequired { volume: String, wanted: String },
    #[error("volume {volume}: cipher {cipher} is not known to this version (only {CIPHER})")]
    UnknownCipher { volume: String, cipher: String },
    #[error("volume {volume}: its wrapped key is damaged: {reason}")]
    Damaged { volume: String, reason: String },
    #[error("no random numbers from the system")]
    Random,
}

/// The key that wraps volume keys.
pub struct ClusterKey {
    key: Zeroizing<[u8; 32]>,
    id: String,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterKey({})", self.id)
    }
}

impl ClusterKey {
    /// Reads a key file: 32 bytes as they are, or 64 hexadecimal digits
    /// (surrounding white space allowed). Warns if any user may read it
    /// (group read is normal for a Kubernetes Secret mounted with an fsGroup).
    pub fn load(path: &Path) -> Result<ClusterKey, KeyError> {
        let raw = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Read { path: path.into(), source })?);
        let bad = |reason: String| KeyError::BadFile { path: path.into(), reason };
        let mut key = Zeroizing::new([0u8; 32]);
        if raw.len() == 32 {
            key.copy_from_slice(&raw);
        } else {
            let text = std::str::from_utf8(&raw).map(str::trim).unwrap_or("");
            if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("it holds {} bytes; a key is 32 bytes or 64 hex digits", raw.len())));
            }
            for (i, k) in key.iter_mut().enumerate() {
                *k = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| bad(e.to_string()))?;
            }
        }
        if key.iter().all(|b| *b == 0) {
            return Err(bad("it is all zeroes".into()));
        }
        use std::os::unix::fs::PermissionsExt;
        if let Ok(md) = std::fs::metadata(path) {
            if md.permissions().mode() & 0o007 != 0 {
                tracing::warn!(path = %path.display(), "any user can read the cluster key file (chmod 600 it)");
            }
        }
        Ok(ClusterKey::from_bytes(*key))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> ClusterKey {
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let id = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        ClusterKey { key: Zeroizing::new(bytes), id }
    }

    /// The key's name: the first 8 bytes of its SHA-256, in hex (safe to show).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A new random volume key, wrapped by this key, for a volume to be created.
    pub fn new_volume_key(&self) -> Result<Encryption, KeyError> {
        let mut key = Zeroizing::new([0u8; 64]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key[..]).map_err(|_| KeyError::Random)?;
        self.wrap(&key)
    }

    fn sealing_key(&self) -> aead::LessSafeKey {
        aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &self.key[..]).expect("32-byte key"))
    }

    fn wrap(&self, volume_key: &[u8; 64]) -> Result<Encryption, KeyError> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).map_err(|_| KeyError::Random)?;
        let mut sealed = Zeroizing::new(volume_key.to_vec());
        self.sealing_key()
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(WRAP_CONTEXT),
                &mut *sealed,
            )
            .map_err(|_| KeyError::Random)?;
        let blob: Vec<u8> = nonce.iter().chain(sealed.iter()).copied().collect();
        Ok(Encryption {
            cipher: CIPHER.into(),
            key_id: self.id.clone(),
            wrapped_key: base64::engine::general_purpose::STANDARD.encode(blob),
        })
    }

    /// The volume key inside `enc`; fails if this is not the key that wrapped it.
    fn unwrap_key(&self, volume: &str, enc: &Encryption) -> Result<Zeroizing<[u8; 64]>, KeyError> {
        if enc.cipher != CIPHER {
            return Err(KeyError::UnknownCipher { volume: volume.into(), cipher: enc.cipher.clone() });
        }
        let damaged = |reason: &str| KeyError::Damaged { volume: volume.into(), reason: reason.into() };
        let blob = Zeroizing::new(
            base64::engine::general_purpose::STANDARD.decode(&enc.wrapped_key).map_err(|_| damaged("not base64"))?,
        );
        if blob.len() != aead::NONCE_LEN + 64 + aead::AES_256_GCM.tag_len() {
            return Err(damaged("wrong length"));
        }
        let nonce: [u8; aead::NONCE_LEN] = blob[..aead::NONCE_LEN].try_into().expect("length checked");
        let mut sealed = Zeroizing::new(blob[aead::NONCE_LEN..].to_vec());
        let wrong = || KeyError::WrongKey { volume: volume.into(), wanted: enc.key_id.clone(), given: self.id.clone() };
        let opened = self
            .sealing_key()
            .open_in_place(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(WRAP_CONTEXT), &mut sealed)
            .map_err(|_| wrong())?;
        let mut key = Zeroizing::new([0u8; 64]);
        key.copy_from_slice(opened);
        Ok(key)
    }

    /// The cipher of a volume (or snapshot) named `volume` encrypted as `enc`.
    pub fn open(&self, volume: &str, enc: &Encryption) -> Result<SectorCipher, KeyError> {
        Ok(SectorCipher::new(&*self.unwrap_key(volume, enc)?))
    }

    /// The same volume key wrapped by `new` instead (cluster key rotation).
    pub fn rewrap(&self, volume: &str, enc: &Encryption, new: &ClusterKey) -> Result<Encryption, KeyError> {
        new.wrap(&*self.unwrap_key(volume, enc)?)
    }
}

/// A volume's data cipher: AES-256-XTS, one 512-byte sector at a time.
pub struct SectorCipher {
    xts: Xts128<Aes256>,
}

impl SectorCipher {
    fn new(key: &[u8; 64]) -> SectorCipher {
        let k1 = Aes256::new_from_slice(&key[..32]).expect("32-byte key");
        let k2 = Aes256::new_from_slice(&key[32..]).expect("32-byte key");
        SectorCipher { xts: Xts128::new(k1, k2) }
    }

    /// Encrypts whole sectors in place, the first being sector `first`.
    pub fn encrypt(&self, buf: &mut [u8], first: u64) {
        debug_assert_eq!(buf.len() as u64 % SECTOR, 0);
        self.xts.encrypt_area(buf, SECTOR as usize, first as u128, xts_mode::get_tweak_default);
    }

    /// Decrypts whole sectors in place; all-zero sectors stay zeroes.
    pub fn decrypt(&self, buf: &mut [u8], first: u64) {
        debug_assert_eq!(buf.len() as u64 % SECTOR, 0);
        for (i, sector) in buf.chunks_mut(SECTOR as usize).enumerate() {
            if sector.iter().any(|b| *b != 0) {
                self.xts.decrypt_sector(sector, xts_mode::get_tweak_default(first as u128 + i as u128));
            }
        }
    }
}

/// The device under the cipher: reads and writes ciphertext.
pub(crate) trait RawIo: Send + Sync {
    fn raw_read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, VolumeError>> + Send;
    fn raw_write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<(), VolumeError>> + Send;
    fn raw_zero(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = Result<(), VolumeError>> + Send;
}

/// How a volume's I/O is encrypted.
pub(crate) enum Crypt {
    /// Not an encrypted volume.
    Plain,
    /// Encrypted, and this process has its key.
    Key(Box<Encrypted>),
    /// Encrypted, and this process has no key: it may move ciphertext
    /// (repair, snapshots), but reads and writes fail.
    Sealed(Sealed),
}

/// An encrypted volume opened without its key.
pub(crate) struct Sealed {
    volume: String,
    key_id: String,
}

impl Sealed {
    pub(crate) fn error(&self) -> KeyError {
        KeyError::KeyRequired { volume: self.volume.clone(), wanted: self.key_id.clone() }
    }
}

impl Crypt {
    /// For volume (or snapshot) `name` with `enc`, given `key`.
    pub(crate) fn for_volume(
        name: &str,
        enc: Option<&Encryption>,
        key: Option<&ClusterKey>,
    ) -> Result<Crypt, KeyError> {
        Ok(match (enc, key) {
            (None, _) => Crypt::Plain,
            (Some(enc), Some(key)) => Crypt::Key(Box::new(Encrypted::new(key.open(name, enc)?))),
            (Some(enc), None) => Crypt::Sealed(Sealed { volume: name.into(), key_id: enc.key_id.clone() }),
        })
    }
}

/// Locks for the edge sectors of partial writes, by sector number modulo their count.
const STRIPES: usize = 64;

pub(crate) struct Encrypted {
    cipher: SectorCipher,
    stripes: Vec<tokio::sync::Mutex<()>>,
}

fn align_down(x: u64) -> u64 {
    x / SECTOR * SECTOR
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(SECTOR) * SECTOR
}

impl Encrypted {
    pub(crate) fn new(cipher: SectorCipher) -> Encrypted {
        Encrypted { cipher, stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect() }
    }

    /// Reads the whole sectors around the range, decrypts them, and returns the range.
    pub(crate) async fn read<D: RawIo>(&self, dev: &D, offset: u64, len: u32) -> Result<Bytes, VolumeError> {
        let (start, end) = (align_down(offset), align_up(offset + len as u64));
        let mut buf = self.read_sectors(dev, start, end).await?;
        if start == offset && end == offset + len as u64 {
            return Ok(buf.freeze());
        }
        let at = (offset - start) as usize;
        Ok(buf.split_off(at).split_to(len as usize).freeze())
    }

    async fn read_sectors<D: RawIo>(&self, dev: &D, start: u64, end: u64) -> Result<BytesMut, VolumeError> {
        let n = u32::try_from(end - start).map_err(|_| VolumeError::OutOfRange {
            offset: start,
            len: end - start,
            size: u32::MAX as u64,
        })?;
        let mut buf = BytesMut::from(&dev.raw_read(start, n).await?[..]);
        self.cipher.decrypt(&mut buf, start / SECTOR);
        Ok(buf)
    }

    /// Writes `data` at `offset`; `None` writes zeroes (whole sectors become
    /// holes). Edge sectors the range covers in part are merged under their locks.
    pub(crate) async fn write<D: RawIo>(
        &self,
        dev: &D,
        offset: u64,
        len: u64,
        data: Option<Bytes>,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let end = offset + len;
        let (start, stop) = (align_down(offset), align_up(end));
        let mut edges: Vec<u64> = Vec::new();
        if offset != start {
            edges.push(start / SECTOR);
        }
        if end != stop {
            edges.push(stop / SECTOR - 1);
        }
        if data.is_none() {
            // Whole sectors inside the range become holes; only the edges are written.
            let (inner_start, inner_end) = (align_up(offset), align_down(end));
            if inner_start < inner_end {
                dev.raw_zero(inner_start, inner_end - inner_start, fua).await?;
            }
            for sector in edges.iter().copied().collect::<std::collections::BTreeSet<_>>() {
                let at = sector * SECTOR;
                let (from, to) = (offset.max(at), end.min(at + SECTOR));
                self.merge(dev, at, at + SECTOR, &[(from, to, None)], fua).await?;
            }
            return Ok(());
        }
        let data = data.expect("checked above");
        if edges.is_empty() {
            let mut buf = BytesMut::from(&data[..]);
            self.cipher.encrypt(&mut buf, offset / SECTOR);
            return dev.raw_write(offset, buf.freeze(), fua).await;
        }
        self.merge(dev, start, stop, &[(offset, end, Some(data))], fua).await
    }

    /// Locks the edge sectors of `[start, stop)`, reads it, lays each piece
    /// over it (`None`: zeroes), encrypts it and writes it back.
    async fn merge<D: RawIo>(
        &self,
        dev: &D,
        start: u64,
        stop: u64,
        pieces: &[(u64, u64, Option<Bytes>)],
        fua: bool,
    ) -> Result<(), VolumeError> {
        let mut stripes: Vec<usize> =
            [start / SECTOR, stop / SECTOR - 1].iter().map(|s| (*s % STRIPES as u64) as usize).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut held = Vec::with_capacity(stripes.len());
        for s in stripes {
            held.push(self.stripes[s].lock().await);
        }
        let mut buf = self.read_sectors(dev, start, stop).await?;
        for (from, to, data) in pieces {
            let r = (from - start) as usize..(to - start) as usize;
            match data {
                Some(d) => buf[r].copy_from_slice(d),
                None => buf[r].fill(0),
            }
        }
        self.cipher.encrypt(&mut buf, start / SECTOR);
        dev.raw_write(start, buf.freeze(), fua).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{BlockDevice, MemDevice};

    impl RawIo for MemDevice {
        async fn raw_read(&self, offset: u64, len: u32) -> Result<Bytes, VolumeError> {
            self.read(offset, len).await
        }
        async fn raw_write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
            self.write(offset, data, fua).await
        }
        async fn raw_zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
            self.zero(offset, len, fua).await
        }
    }

    fn key(b: u8) -> ClusterKey {
        ClusterKey::from_bytes([b; 32])
    }

    /// A deterministic stream of bytes that is not all zeroes anywhere.
    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8 | 1
            })
            .collect()
    }

    #[test]
    fn a_wrapped_key_opens_only_with_its_cluster_key_and_survives_rotation() {
        let (a, b) = (key(1), key(2));
        let enc = a.new_volume_key().expect("key");
        assert_eq!(enc.key_id, a.id());
        assert!(a.open("v", &enc).is_ok());
        match b.open("v", &enc) {
            Err(KeyError::WrongKey { wanted, given, .. }) => {
                assert_eq!((wanted, given), (a.id().into(), b.id().into()))
            }
            other => panic!("wrong key accepted: {:?}", other.map(|_| ())),
        }
        let rotated = a.rewrap("v", &enc, &b).expect("rewrap");
        assert_eq!(rotated.key_id, b.id());
        assert!(a.open("v", &rotated).is_err());
        // The same data key: what one wrote the other reads.
        let (c1, c2) = (a.open("v", &enc).expect("a"), b.open("v", &rotated).expect("b"));
        let mut buf = pattern(3, 4096);
        c1.encrypt(&mut buf, 77);
        c2.decrypt(&mut buf, 77);
        assert_eq!(buf, pattern(3, 4096));
        let mut tampered = enc.clone();
        tampered.wrapped_key.replace_range(0..4, "AAAA");
        assert!(a.open("v", &tampered).is_err(), "a changed wrapped key is refused");
    }

    #[test]
    fn key_files_are_32_bytes_or_64_hex_digits() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("k");
        std::fs::write(&p, [7u8; 32]).expect("write");
        let raw = ClusterKey::load(&p).expect("raw");
        std::fs::write(&p, format!("{}\n", "07".repeat(32))).expect("write");
        assert_eq!(ClusterKey::load(&p).expect("hex").id(), raw.id());
        for bad in [&b"short"[..], &[0u8; 32][..], "zz".repeat(32).as_bytes()] {
            std::fs::write(&p, bad).expect("write");
            assert!(matches!(ClusterKey::load(&p), Err(KeyError::BadFile { .. })));
        }
        assert!(matches!(ClusterKey::load(&dir.path().join("none")), Err(KeyError::Read { .. })));
    }

    #[tokio::test]
    async fn unaligned_writes_zeroes_and_reads_match_a_plain_device_and_store_no_plaintext() {
        const SIZE: usize = 64 * 1024;
        let raw = MemDevice::new(SIZE);
        let plain = MemDevice::new(SIZE);
        let enc = Encrypted::new(key(9).open("v", &key(9).new_volume_key().expect("key")).expect("open"));
        let ops: &[(u64, u64, bool)] = &[
            (0, 4096, true),
            (4096 + 7, 7, true),
            (511, 2, true),
            (1000, 9000, true),
            (20_000, 512 * 5, true),
            (3000, 600, false),
            (8192, 8192, false),
            (30_001, 1, true),
            (SIZE as u64 - 513, 513, true),
            (40_000, 3, false),
        ];
        for (i, &(off, len, write)) in ops.iter().enumerate() {
            if write {
                let d = Bytes::from(pattern(i as u64, len as usize));
                enc.write(&raw, off, len, Some(d.clone()), false).await.expect("write");
                plain.write(off, d, false).await.expect("plain write");
            } else {
                enc.write(&raw, off, len, None, false).await.expect("zero");
                plain.zero(off, len, false).await.expect("plain zero");
            }
            for (o, l) in [(0u64, SIZE as u32), (off, len as u32), (off.saturating_sub(5), 11)] {
                let want = plain.read(o, l).await.expect("plain read");
                assert_eq!(enc.read(&raw, o, l).await.expect("read"), want, "after op {i}, read {o}+{l}");
            }
        }
        let stored = raw.read(0, SIZE as u32).await.expect("raw");
        for (i, &(_, len, write)) in ops.iter().enumerate() {
            if write && len >= 16 {
                let p = pattern(i as u64, len as usize);
                assert!(!stored.windows(16).any(|w| w == &p[..16]), "plaintext of op {i} is stored");
            }
        }
        // Whole zeroed sectors are holes in ciphertext as in plaintext.
        let alloc = raw.allocation(8192, 8192).await.expect("alloc");
        assert_eq!(alloc, vec![crate::device::Run { len: 8192, data: false }]);
    }

    #[tokio::test]
    async fn concurrent_partial_writes_to_one_sector_all_land() {
        let raw = std::sync::Arc::new(MemDevice::new(4096));
        let enc = std::sync::Arc::new(Encrypted::new(
            key(4).open("v", &key(4).new_volume_key().expect("key")).expect("open"),
        ));
        let tasks: Vec<_> = (0..32u64)
            .map(|i| {
                let (raw, enc) = (raw.clone(), enc.clone());
                tokio::spawn(async move {
                    enc.write(&*raw, 100 + i * 3, 3, Some(Bytes::from(vec![i as u8 + 1; 3])), false).await
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("join").expect("write");
        }
        let got = enc.read(&*raw, 100, 96).await.expect("read");
        let want: Vec<u8> = (0..32u8).flat_map(|i| [i + 1; 3]).collect();
        assert_eq!(&got[..], &want[..]);
    }
}
