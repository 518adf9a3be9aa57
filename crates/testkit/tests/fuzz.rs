//! Hostile input, fuzzed on stable Rust: a small mutation fuzzer (bit flips,
//! byte and length-field rewrites, inserts, deletes, splices) over the
//! corpus in `fuzz/corpus/<target>/`, run against
//!
//! - `nbd_handshake`: the NBD option haggling, as a client's bytes;
//! - `nbd_requests`: the NBD transmission phase (request headers and payloads);
//! - `peer_frames`: the peer protocol's request and reply headers and extent lists;
//! - `store_table`: an extent's checksum table on disk, opened and read by a store.
//!
//! Every input must be answered or refused — never a panic, never a hang
//! (2 s per input). Each target runs for `TORUS_FUZZ_SECS` seconds (default
//! 3) from a seed printed at the start; `TORUS_FUZZ_SEED` replays one. A
//! failing input is printed in hex, to be added to the corpus once fixed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use torus_nbd::{ExportError, ExportInfo, Exports};
use torus_testkit::Rng;
use torus_volume::device::MemDevice;

/// Values that make parsers take their edge paths.
const INTERESTING: [u32; 10] = [0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 32 << 20];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 if len >= 4 => {
                // A length or magic field: a big-endian u32 at any position.
                let i = rng.below(len - 3);
                input[i..i + 4].copy_from_slice(&INTERESTING[rng.below(INTERESTING.len())].to_be_bytes());
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(i..i, bytes);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                input.drain(i..i + n);
            }
            5 if !corpus.is_empty() => {
                // Splice: our head, another input's tail.
                let other = &corpus[rng.below(corpus.len())];
                let (cut, from) = (rng.below(len + 1), rng.below(other.len() + 1));
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            _ => input.truncate(rng.below(len + 1)),
        }
    }
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading the corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    let inputs: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).expect("corpus file")).collect();
    assert!(!inputs.is_empty(), "the corpus {} is empty", dir.display());
    inputs
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `target` on the corpus and on mutations of it for the time budget.
fn fuzz(name: &str, target: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    let secs: u64 = std::env::var("TORUS_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let seed: u64 = std::env::var("TORUS_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let corpus = corpus(name);
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut runs = 0u64;
    let mut next: Vec<Vec<u8>> = corpus.clone();
    while !next.is_empty() || Instant::now() < deadline {
        let input = next.pop().unwrap_or_else(|| {
            let mut i = corpus[rng.below(corpus.len())].clone();
            mutate(&mut rng, &mut i, &corpus);
            i
        });
        if std::panic::catch_unwind(|| target(&input)).is_err() {
            panic!("fuzz target {name} failed (TORUS_FUZZ_SEED={seed}, after {runs} runs) on input {}", hex(&input));
        }
        runs += 1;
    }
    eprintln!("fuzz {name}: {runs} inputs in {secs} s, seed {seed} (TORUS_FUZZ_SEED={seed} replays), no failure");
}

struct OneExport(Arc<MemDevice>);

impl Exports for OneExport {
    type Device = MemDevice;
    async fn list(&self) -> Result<Vec<String>, ExportError> {
        Ok(vec!["x".into()])
    }
    async fn describe(&self, name: &str) -> Result<ExportInfo, ExportError> {
        match name {
            "x" => Ok(ExportInfo { size: 1 << 20, read_only: false }),
            _ => Err(ExportError::NotFound(format!("no export {name:?}"))),
        }
    }
    async fn open(&self, name: &str) -> Result<Arc<MemDevice>, ExportError> {
        match name {
            "x" => Ok(self.0.clone()),
            _ => Err(ExportError::NotFound(format!("no export {name:?}"))),
        }
    }
}

/// Feeds `input` as a client's bytes to `server` (which gets the other end), reading everything it answers.
fn as_client<F, Fut>(rt: &tokio::runtime::Runtime, input: &[u8], server: F)
where
    F: FnOnce(tokio::io::DuplexStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (mut client, theirs) = tokio::io::duplex(1 << 20);
    let input = input.to_vec();
    rt.block_on(async move {
        let serving = tokio::spawn(server(theirs));
        let talk = async {
            let (mut rd, mut wr) = tokio::io::split(&mut client);
            let send = async {
                let _ = wr.write_all(&input).await;
                let _ = wr.shutdown().await;
            };
            let mut sink = Vec::new();
            let _ = tokio::join!(send, rd.read_to_end(&mut sink));
        };
        tokio::time::timeout(Duration::from_secs(2), async {
            talk.await;
            serving.await.expect("the server task panicked");
        })
        .await
        .expect("the server hung on this input");
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn nbd_handshake() {
    let rt = runtime();
    let dev = Arc::new(MemDevice::new(1 << 20));
    fuzz("nbd_handshake", |input| {
        let exports = OneExport(dev.clone());
        as_client(&rt, input, |mut s| async move {
            let _ = torus_nbd::handshake::negotiate(&mut s, &exports).await;
        });
    });
}

#[test]
fn nbd_requests() {
    let rt = runtime();
    let dev = Arc::new(MemDevice::new(1 << 20));
    fuzz("nbd_requests", |input| {
        let dev = dev.clone();
        // Half the inputs run with structured replies and base:allocation negotiated.
        let on = input.len() % 2 == 0;
        let features = torus_nbd::handshake::Features { structured: on, allocation: on };
        as_client(&rt, input, |s| async move {
            let budget = torus_nbd::transmission::Budget::default();
            let _ = torus_nbd::transmission::serve(s, dev, budget, features).await;
        });
    });
}

#[test]
fn peer_frames() {
    use torus_proto::frame::{decode_extent_list, ReplyHeader, RequestHeader, REPLY_HEADER_LEN, REQUEST_HEADER_LEN};
    fuzz("peer_frames", |input| {
        let mut req = [0u8; REQUEST_HEADER_LEN];
        let n = input.len().min(REQUEST_HEADER_LEN);
        req[..n].copy_from_slice(&input[..n]);
        if let Ok(h) = RequestHeader::decode(&req) {
            let _ = h.payload_len();
        }
        let mut rep = [0u8; REPLY_HEADER_LEN];
        let n = input.len().min(REPLY_HEADER_LEN);
        rep[..n].copy_from_slice(&input[..n]);
        let _ = ReplyHeader::decode(&rep);
        let _ = decode_extent_list(input);
    });
}

#[test]
fn store_table() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicU64::new(0);
    fuzz("store_table", |input| {
        // A store holding extents (volume 1) whose header and table are `input`, data 64 KiB
        // of 0x5a: index 0 in format 1 (`.sum` + `.dat`), index 1 in format 2 (one `.extent`).
        let root = dir.path().join(n.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_string());
        let ext = root.join("extents/1");
        std::fs::create_dir_all(&ext).unwrap();
        std::fs::write(ext.join("0.sum"), input).unwrap();
        std::fs::write(ext.join("0.dat"), vec![0x5au8; 64 << 10]).unwrap();
        let one = std::fs::File::create(ext.join("1.extent")).unwrap();
        let table = &input[..input.len().min(torus_store::DATA_OFFSET as usize)];
        std::os::unix::fs::FileExt::write_all_at(&one, table, 0).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&one, &[0x5au8; 64 << 10], torus_store::DATA_OFFSET).unwrap();
        if let Ok(store) = torus_store::Store::open(&root, Default::default()) {
            for index in [0, 1] {
                let id = torus_types::ExtentId::new(torus_types::VolumeId(1), index);
                let mut buf = vec![0u8; 64 << 10];
                let _ = store.read(id, 0, &mut buf);
                let _ = store.block_sums(id);
            }
            let _ = store.extents();
        }
        std::fs::remove_dir_all(&root).unwrap();
    });
}
