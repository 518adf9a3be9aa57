//! torus-testkit: starts real processes for tests and always cleans them up.
//!
//! - [`Etcd`]: the etcd named by `TORUS_TEST_ETCD` (CI starts one), or a
//!   private one on free ports.
//! - [`Cluster`]: etcd + N `torusd` + optional `torusblk`, each on free
//!   loopback ports with its own temp dir, under a unique etcd prefix so that
//!   tests run in parallel against one etcd. Processes are killed by PID when
//!   the cluster is dropped.
//! - [`Netns`]: a network namespace on a veth pair, to cut links.
//! - [`csi`]: CSI plugins under test, each host in its own cgroup.
//! - [`nbd`]: a raw NBD client for sending malformed input on purpose.
//!
//! A dev-dependency only: nothing in the product depends on it.

pub mod csi;
pub mod nbd;
mod netns;
mod procs;

pub use netns::Netns;
pub use procs::{bin, free_port, run, unique_prefix, wait_until, Blk, Cluster, Etcd, Etcd3, Node, Proc};

/// splitmix64: a small, seedable generator (no dependency), for the fuzzer
/// and the seeded simulation.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 if `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Fails the test with a clear message if a required program is missing.
pub fn require(program: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file())).unwrap_or(false);
    assert!(found, "{program} is not installed: run .ci/run or scripts/test (they install the test dependencies)");
}
