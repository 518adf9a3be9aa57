//! Hot-path micro-benchmarks, so that a regression shows before the fio run:
//! peer-protocol header codec, block checksum, placement lookup, and local
//! store reads and writes (page cache). Run: `cargo bench -p torus-microbench`.

use divan::{black_box, Bencher};
use torus_proto::frame::{Op, RequestHeader, REQUEST_HEADER_LEN};
use torus_ring::{Member, Ring};
use torus_store::{Store, StoreOptions};
use torus_types::{block_checksum, Epoch, ExtentId, NodeId, VolumeId};

fn main() {
    divan::main();
}

#[divan::bench]
fn peer_header_encode_decode() -> RequestHeader {
    let h = RequestHeader::new(Op::Write, ExtentId::new(VolumeId(3), 99), 4096, 4096, Epoch(42));
    let b: [u8; REQUEST_HEADER_LEN] = black_box(h.encode());
    RequestHeader::decode(&b).expect("valid header")
}

#[divan::bench(args = [4096, 65536, 1 << 20])]
fn checksum(bencher: Bencher, len: usize) {
    let data = vec![0x5au8; len];
    bencher.counter(divan::counter::BytesCount::new(len)).bench(|| {
        // One CRC32C per 4 KiB block, as the store computes them.
        data.chunks(4096).map(|c| block_checksum(black_box(c))).fold(0u32, |a, b| a ^ b)
    });
}

#[divan::bench(args = [3, 100, 1000])]
fn placement_replicas_r2(bencher: Bencher, nodes: u64) {
    let ring = Ring::new(
        1,
        (0..nodes).map(|i| Member { id: NodeId(uuid::Uuid::from_u64_pair(1, i)), weight: 1.0, domain: None }).collect(),
    );
    let mut i = 0u64;
    bencher.bench_local(|| {
        i += 1;
        ring.replicas(ExtentId::new(VolumeId(7), black_box(i)), 2)
    });
}

/// A store whose 16 extents (volume 1, 4 MiB each) are fully written.
fn filled_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), StoreOptions::default()).expect("open store");
    let data = vec![0xa5u8; 4 << 20];
    for e in 0..16 {
        store.write(ExtentId::new(VolumeId(1), e), 0, &data, Epoch(0)).expect("fill");
    }
    (dir, store)
}

#[divan::bench(args = [4096, 65536])]
fn store_write(bencher: Bencher, len: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path(), StoreOptions::default()).expect("open store");
    let data = vec![0xa5u8; len];
    let mut n = 0u64;
    bencher.counter(divan::counter::BytesCount::new(len)).bench_local(|| {
        n += 1;
        let off = (n * len as u64) % (4 << 20);
        store.write(ExtentId::new(VolumeId(1), n % 64), off, &data, Epoch(0)).expect("write")
    });
}

#[divan::bench(args = [4096, 65536])]
fn store_read_verified(bencher: Bencher, len: usize) {
    let (_dir, store) = filled_store();
    let mut buf = vec![0u8; len];
    let mut n = 0u64;
    bencher.counter(divan::counter::BytesCount::new(len)).bench_local(|| {
        n += 1;
        let off = (n * len as u64) % (4 << 20);
        store.read(ExtentId::new(VolumeId(1), n % 16), off, &mut buf).expect("read")
    });
}

#[divan::bench(args = [4096, 65536])]
fn store_overwrite(bencher: Bencher, len: usize) {
    let (_dir, store) = filled_store();
    let data = vec![0xa5u8; len];
    let mut n = 0u64;
    bencher.counter(divan::counter::BytesCount::new(len)).bench_local(|| {
        n += 1;
        let off = (n * len as u64) % (4 << 20);
        store.write(ExtentId::new(VolumeId(1), n % 16), off, &data, Epoch(0)).expect("write")
    });
}
