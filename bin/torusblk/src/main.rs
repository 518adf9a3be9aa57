//! torusblk: the client side. `nbdserve` serves every block volume over NBD,
//! the export name being the volume name; `csi` is the CSI driver; `keeper`
//! holds one volume attached on this host (started by `csi`).

mod csi;
mod exports;
mod http;
mod keeper;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::sync::Arc;
use std::time::Duration;
use torus_cli::EtcdArgs;
use torus_volume::{ManagerOptions, VolumeManager};

#[derive(Parser, Debug)]
#[command(name = "torusblk", version, about = "Serve Torus volumes as block devices")]
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

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve every block volume over NBD (export name = volume name).
    Nbdserve {
        /// Address to listen on.
        #[arg(long, short = 'l', default_value = "127.0.0.1:10809")]
        listen: String,
        /// Serve read-only: no writer lock is taken, writes are refused.
        #[arg(long = "read-only")]
        read_only: bool,
        /// TTL in seconds of the writer's lease: how long after a crash the volume stays locked.
        #[arg(long = "lease-ttl", default_value_t = 10)]
        lease_ttl: u64,
        /// Seconds writes are held while the writer's lease cannot be confirmed (etcd away) before they fail.
        #[arg(long = "io-hold", default_value_t = 60)]
        io_hold: u64,
        /// Connections to each storage node.
        #[arg(long = "node-connections", default_value_t = 2)]
        node_connections: usize,
        /// Seconds a storage node may take to answer one request before it
        /// counts as unreachable (writes then go on without it; it catches up later).
        #[arg(long = "node-timeout", default_value_t = 10)]
        node_timeout: u64,
        /// Seconds a client's open waits while another writer holds the volume
        /// (a storage node's repair hands it over; a dead holder's lease lapses).
        /// A live holder on this host is refused at once; a dead one on this host
        /// is taken over at once. Default: the lease TTL + 2.
        #[arg(long = "lock-wait")]
        lock_wait: Option<u64>,
        /// Serve /metrics (Prometheus), /healthz and /readyz (etcd answers) over HTTP on this address, e.g. 127.0.0.1:9560.
        #[arg(long)]
        http: Option<String>,
        /// NBD over TLS (NBD_OPT_STARTTLS) with the certificates of --tls-dir:
        /// off, on (clients may ask), require (every other option is refused
        /// with NBD_REP_ERR_TLS_REQD until TLS is on). Default: on with --tls-dir, else off.
        #[arg(long, value_enum)]
        tls: Option<NbdTlsMode>,
    },
    /// Serve the CSI driver (Identity, Controller, Node) on a unix socket.
    Csi(csi::CsiArgs),
    /// Hold one volume attached as a local block device (started by `torusblk csi`).
    #[command(hide = true)]
    Keeper(keeper::KeeperArgs),
}

/// `torusblk nbdserve --tls`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum NbdTlsMode {
    Off,
    On,
    Require,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    cli.tls.install_client()?;
    cli.tls.reload_on_sighup();
    match cli.cmd {
        Cmd::Csi(args) => csi::run(&cli.etcd, &cli.tls, &cli.key, args).await,
        Cmd::Keeper(args) => keeper::run(&cli.etcd, &cli.key, args).await,
        Cmd::Nbdserve {
            listen,
            read_only,
            lease_ttl,
            io_hold,
            node_connections,
            node_timeout,
            lock_wait,
            http,
            tls,
        } => {
            let mode = tls.unwrap_or(if cli.tls.tls_dir.is_some() { NbdTlsMode::On } else { NbdTlsMode::Off });
            let nbd_tls = match (mode, &cli.tls.tls_dir) {
                (NbdTlsMode::Off, _) => None,
                (_, None) => bail!("--tls {mode:?} needs --tls-dir (the server's certificate and the clients' CA)"),
                (_, Some(dir)) => Some(torus_nbd::server::NbdTls {
                    config: torus_proto::tls::ServerTls::load(dir, torus_proto::tls::ServerKind::Mutual)?,
                    required: mode == NbdTlsMode::Require,
                }),
            };
            if !(1..=60).contains(&lease_ttl) {
                bail!("--lease-ttl must be between 1 and 60 seconds");
            }
            if !(1..=600).contains(&node_timeout) {
                bail!("--node-timeout must be between 1 and 600 seconds");
            }
            if lock_wait.is_some_and(|w| w > 3600) {
                bail!("--lock-wait must be at most 3600 seconds");
            }
            if !(1..=64).contains(&node_connections) {
                bail!("--node-connections must be between 1 and 64");
            }
            let cluster = cli.etcd.connect().await?;
            cluster.config().await?;
            let listener =
                tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("listening on {listen}"))?;
            let addr = listener.local_addr().context("reading the listen address")?;
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let opts = ManagerOptions {
                lease_ttl: Duration::from_secs(lease_ttl),
                holder: format!("torusblk on {} (pid {}, nbd://{addr})", host.trim(), std::process::id()),
                conns_per_node: node_connections,
                io_hold: Duration::from_secs(io_hold),
                request_timeout: Duration::from_secs(node_timeout),
                lock_wait: Duration::from_secs(lock_wait.unwrap_or(lease_ttl + 2)),
                key: cli.key.load()?,
                ..Default::default()
            };
            let mut registry = torus_metrics::prometheus_client::registry::Registry::default();
            let stats = torus_volume::measured::VolumeStats::register(&mut registry);
            let endpoint = match http {
                Some(addr) => Some(http::serve(&addr, registry, cluster.clone(), cli.tls.http()?).await?),
                None => None,
            };
            let manager = Arc::new(VolumeManager::new(cluster, opts));
            let exports = Arc::new(exports::VolumeExports { manager: manager.clone(), read_only, stats });
            tracing::info!(%addr, read_only, tls = ?mode, "serving volumes over NBD (export name = volume name)");
            let server =
                tokio::spawn(torus_nbd::serve(listener, exports, torus_nbd::transmission::Budget::default(), nbd_tls));
            let follower = tokio::spawn(manager.clone().follow_ring());
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing SIGTERM handler")?;
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
                r = server => r.context("NBD server task")?,
            }
            follower.abort();
            drop(endpoint);
            manager.close_all().await;
            Ok(())
        }
    }
}

fn main() {
    let cli = Cli::parse();
    torus_cli::tune_allocator();
    torus_cli::init_logging("info", cli.log.log_format);
    torus_cli::run_main("torusblk", true, run(cli));
}
