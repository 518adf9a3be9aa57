//! torusctl: administration. One module per noun; this file parses and dispatches.

mod certs;
mod peer;
mod snapshot;
mod status;
mod transfer;
mod volume;
mod wait;

use clap::{Parser, Subcommand, ValueEnum};
use torus_cli::{parse_size, EtcdArgs};
use torus_meta::cluster::{ClusterConfig, DEFAULT_EXTENT_SIZE, DEFAULT_REPLICATION};

#[derive(Parser, Debug)]
#[command(name = "torusctl", version, about = "Administer a Torus cluster")]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    log: torus_cli::LogArgs,
    #[command(flatten)]
    tls: torus_cli::TlsArgs,
    #[command(flatten)]
    key: torus_cli::KeyArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Format the cluster's metadata in etcd.
    Init {
        /// Bytes per extent, the unit of placement (power of two, 64KiB to 1GiB).
        #[arg(long = "extent-size", value_parser = parse_size, default_value_t = DEFAULT_EXTENT_SIZE)]
        extent_size: u64,
        /// Default number of copies of each extent.
        #[arg(long, default_value_t = DEFAULT_REPLICATION)]
        replication: u32,
    },
    /// List the storage nodes registered in etcd, and whether they are in the ring.
    ListPeers {
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Manage ring membership.
    #[command(subcommand)]
    Peer(peer::PeerCmd),
    /// Show the ring.
    #[command(subcommand)]
    Ring(peer::RingCmd),
    /// Cluster health at a glance: nodes up and down, capacity, rebalance progress.
    Status {
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Manage volumes.
    #[command(subcommand)]
    Volume(volume::VolumeCmd),
    /// Make the cluster CA and the processes' TLS directories (no etcd needed).
    #[command(subcommand)]
    Certs(certs::CertsCmd),
    /// Wait until the cluster is healthy, rebalanced or caught up (exit 0), or time out (non-zero, with the reason).
    Wait {
        #[arg(value_enum)]
        condition: wait::Condition,
        /// How long to wait: 90 (seconds), 30s, 5m, 2h.
        #[arg(long, default_value = "5m", value_parser = wait::parse_duration)]
        timeout: std::time::Duration,
    },
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::Certs(c) = cli.cmd {
        return certs::run(c);
    }
    cli.tls.install_client()?;
    let cluster = cli.etcd.connect().await?;
    match cli.cmd {
        Cmd::Init { extent_size, replication } => {
            let config = ClusterConfig {
                extent_size,
                replication,
                format: 1,
                down_out_secs: torus_meta::cluster::DEFAULT_DOWN_OUT_SECS,
            };
            cluster.init(&config).await?;
            println!(
                "initialised the cluster at {} (extent size {}, replication {replication})",
                cli.etcd.etcd,
                torus_types::format_size(extent_size)
            );
            Ok(())
        }
        Cmd::ListPeers { output } => peer::list_peers(&cluster, output).await,
        Cmd::Peer(c) => peer::run(&cluster, c).await,
        Cmd::Ring(c) => peer::run_ring(&cluster, c).await,
        Cmd::Volume(c) => volume::run(&cluster, &cli.key, c).await,
        Cmd::Status { output } => status::run(&cluster, output).await,
        Cmd::Wait { condition, timeout } => wait::run(&cluster, condition, timeout).await,
        Cmd::Certs(_) => unreachable!("handled before connecting"),
    }
}

fn main() {
    let cli = Cli::parse();
    torus_cli::init_logging("warn", cli.log.log_format);
    torus_cli::run_main("torusctl", false, run(cli));
}
