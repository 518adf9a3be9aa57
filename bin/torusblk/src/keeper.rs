//! `torusblk keeper`: holds one attachment (started by `torusblk csi`, not by hand).

use clap::Args;
use std::path::PathBuf;
use std::time::Duration;
use torus_attach::keeper::{self, Backend, KeeperOptions};
use torus_cli::EtcdArgs;
use torus_volume::ManagerOptions;

#[derive(Args, Debug)]
pub struct KeeperArgs {
    #[arg(long)]
    volume: String,
    /// The attachment's directory.
    #[arg(long)]
    dir: PathBuf,
    #[arg(long = "read-only")]
    read_only: bool,
    #[arg(long = "lock-wait-ms", default_value_t = 12_000)]
    lock_wait_ms: u64,
    /// This host in lock records (the CSI node id): a lock of a dead keeper of
    /// the same host is taken over at once.
    #[arg(long = "host-id")]
    host_id: Option<String>,
    #[arg(long = "lease-ttl", default_value_t = 10)]
    lease_ttl: u64,
    #[arg(long = "node-timeout", default_value_t = 10)]
    node_timeout: u64,
    #[arg(long = "io-hold", default_value_t = 60)]
    io_hold: u64,
    /// fuse (FUSE file + loop device) or nbd (the kernel NBD driver).
    #[arg(long, default_value = "fuse", value_parser = ["fuse", "nbd"])]
    backend: String,
}

/// Runs the keeper; exits with the status `keeper::exit_code` gives on failure.
pub async fn run(etcd: &EtcdArgs, key: &torus_cli::KeyArgs, args: KeeperArgs) -> anyhow::Result<()> {
    let cluster = etcd.connect().await?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let opts = KeeperOptions {
        backend: if args.backend == "nbd" { Backend::KernelNbd } else { Backend::Fuse },
        volume: args.volume.clone(),
        dir: args.dir,
        read_only: args.read_only,
        manager: ManagerOptions {
            lease_ttl: Duration::from_secs(args.lease_ttl),
            holder: format!("torusblk keeper on {} (pid {})", host.trim(), std::process::id()),
            conns_per_node: 2,
            request_timeout: Duration::from_secs(args.node_timeout),
            io_hold: Duration::from_secs(args.io_hold),
            lock_wait: Duration::from_millis(args.lock_wait_ms),
            host: args.host_id.unwrap_or_else(torus_volume::holder::hostname),
            key: key.load()?,
            ..Default::default()
        },
    };
    if let Err(e) = keeper::run(cluster, opts).await {
        eprintln!("torusblk: keeper for {}: {e}", args.volume);
        std::process::exit(keeper::exit_code(&e));
    }
    Ok(())
}
