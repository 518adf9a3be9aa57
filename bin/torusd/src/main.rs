//! torusd: the storage node. Parses flags, opens the local store, registers
//! in etcd, serves the peer protocol (and HTTP status if asked), and on
//! SIGTERM/SIGINT flushes everything before it exits.

use anyhow::{bail, Context};
use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use torus_cli::{parse_size, EtcdArgs};
use torus_meta::cluster::PeerInfo;
use torus_node::{http, identity, metrics::NodeMetrics, registration::Registration, server};
use torus_store::{Store, StoreOptions};

#[derive(Parser, Debug)]
#[command(name = "torusd", version, about = "Torus storage node: offers a directory's disk space to the cluster")]
struct Args {
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    log: torus_cli::LogArgs,
    #[command(flatten)]
    tls: torus_cli::TlsArgs,
    /// Directory holding this node's data (created if missing).
    #[arg(long = "data-dir")]
    data_dir: PathBuf,
    /// Storage offered to the cluster (e.g. 10GiB).
    #[arg(long, value_parser = parse_size)]
    size: u64,
    /// Share of data relative to other nodes when it joins the ring (default:
    /// --size). A node whose weight overstates what it can hold fills up
    /// first; it is then marked full and new extents go elsewhere.
    #[arg(long, value_parser = parse_size)]
    weight: Option<u64>,
    /// Mark this node full in the ring (it keeps its extents; new ones go to
    /// other nodes) once this share of --size is used.
    #[arg(long = "full-ratio", default_value_t = torus_node::capacity::DEFAULT_FULL_RATIO, value_parser = parse_ratio)]
    full_ratio: f64,
    /// Address the peer protocol listens on and is advertised at (HOST:PORT).
    #[arg(long = "peer-address", default_value = "127.0.0.1:40000")]
    peer_address: String,
    /// Serve HTTP status and metrics on this host (with --port).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Serve HTTP status and metrics on this port (0 or absent: no HTTP).
    #[arg(long)]
    port: Option<u16>,
    /// Failure-domain labels, e.g. zone=a,rack=r1.
    #[arg(long, value_delimiter = ',')]
    label: Vec<String>,
    /// Join the ring by itself (otherwise: `torusctl peer add`).
    #[arg(long = "auto-join")]
    auto_join: bool,
    /// Most bytes per second this node copies when data moves between nodes.
    #[arg(long = "rebalance-rate", value_parser = parse_size, default_value = "128MiB")]
    rebalance_rate: u64,
    /// Most bytes per second the background scrubber reads (0 turns it off).
    #[arg(long = "scrub-rate", value_parser = parse_size, default_value = "16MiB", env = "TORUS_SCRUB_RATE")]
    scrub_rate: u64,
    /// Seconds between scrub passes.
    #[arg(long = "scrub-interval", default_value_t = 3600, env = "TORUS_SCRUB_INTERVAL")]
    scrub_interval: u64,
    /// Seconds of silence after which etcd forgets this node.
    #[arg(long = "lease-ttl", default_value_t = 10)]
    lease_ttl: u64,
    /// Seconds between looks for copies to repair in volumes nobody has open (0 turns repair off).
    #[arg(long = "repair-interval", default_value_t = 2, env = "TORUS_REPAIR_INTERVAL")]
    repair_interval: u64,
    /// Seconds between looks for the data of deleted volumes and snapshots to delete (0 turns it off).
    #[arg(long = "collect-interval", default_value_t = 10, env = "TORUS_COLLECT_INTERVAL")]
    collect_interval: u64,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1.0 => Ok(r),
        _ => Err(format!("{s:?} is not a ratio between 0 and 1 (e.g. 0.9)")),
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Peers (clients, other nodes) only with a certificate the cluster CA signed, if given a TLS directory.
    args.tls.install_client()?;
    args.tls.reload_on_sighup();
    let tls = args.tls.server()?;
    let http_tls = args.tls.http()?;
    if args.size < 1 << 20 {
        bail!("--size {} is too small: offer at least 1 MiB", args.size);
    }
    if args.weight == Some(0) {
        bail!("--weight must be more than 0");
    }
    if !(1..=3600).contains(&args.lease_ttl) {
        bail!("--lease-ttl must be between 1 and 3600 seconds");
    }
    let labels = torus_cli::parse_labels(&args.label)?;
    let cluster = args.etcd.connect().await?;
    cluster.config().await?;
    let id = identity::load_or_create(&args.data_dir)
        .with_context(|| format!("reading the node identity in {}", args.data_dir.display()))?;
    let store = Arc::new(
        Store::open(&args.data_dir.join("store"), StoreOptions { capacity: args.size, ..Default::default() })
            .with_context(|| format!("opening the store in {}", args.data_dir.display()))?,
    );
    let listener = tokio::net::TcpListener::bind(&args.peer_address)
        .await
        .with_context(|| format!("listening on peer address {}", args.peer_address))?;
    let address = listener.local_addr().context("reading the peer address")?.to_string();
    let repair_stats = torus_volume::repair::RepairStats::default();
    let metrics = Arc::new(NodeMetrics::new_with(|r| repair_stats.register_in(r)));
    if let Some(other) = cluster.peers().await?.into_iter().find(|p| p.address == address && p.id != id) {
        bail!(
            "peer address {address} is already registered by node {} (alive, or dead less than a lease TTL ago); \
             give this node another address or wait",
            other.id
        );
    }

    let liveness = Arc::new(torus_node::liveness::Liveness::default());
    let mut http_address = None;
    if let Some(port) = args.port.filter(|p| *p != 0) {
        let l = tokio::net::TcpListener::bind((args.host.as_str(), port))
            .await
            .with_context(|| format!("listening for HTTP on {}:{port}", args.host))?;
        http_address = Some(l.local_addr().context("reading the HTTP address")?.to_string());
        let ctx = http::StatusContext {
            id,
            address: address.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            liveness: liveness.clone(),
            cluster: cluster.clone(),
        };
        tokio::spawn(http::serve(l, ctx, http_tls));
    }

    let info = PeerInfo {
        id,
        address: address.clone(),
        http_tls: http_address.is_some() && args.tls.http_tls,
        http_address,
        capacity: args.size,
        weight: args.weight,
        used: store.used(),
        labels,
        last_seen: 0,
        version: env!("CARGO_PKG_VERSION").to_string(),
        auto_join_since: args.auto_join.then(torus_types::unix_now),
    };
    if args.auto_join {
        tokio::spawn(torus_node::join::auto_join(cluster.clone(), info.clone()));
    }
    tracing::info!(node = %id, %address, capacity = args.size, used = store.used(), "torusd serving");
    let rebalancer = torus_node::rebalance::Rebalancer {
        cluster: cluster.clone(),
        store: store.clone(),
        me: id,
        rate: args.rebalance_rate,
        metrics: metrics.clone(),
        full_ratio: args.full_ratio,
        transport: Arc::new(torus_proto::Tcp),
    };
    let reb_task = tokio::spawn(rebalancer.run());
    let scrubber = torus_node::scrub::Scrubber {
        cluster: cluster.clone(),
        store: store.clone(),
        me: id,
        rate: args.scrub_rate,
        interval: Duration::from_secs(args.scrub_interval.max(1)),
        metrics: metrics.clone(),
        transport: Arc::new(torus_proto::Tcp),
    };
    let scrub_task = tokio::spawn(scrubber.run());
    let collect_task = (args.collect_interval > 0).then(|| {
        let collector = torus_node::collector::Collector {
            cluster: cluster.clone(),
            store: store.clone(),
            interval: Duration::from_secs(args.collect_interval),
        };
        tokio::spawn(collector.run())
    });
    let repair = (args.repair_interval > 0).then(|| {
        let host = torus_volume::holder::hostname();
        let opts = torus_volume::ManagerOptions {
            lease_ttl: Duration::from_secs(args.lease_ttl.min(60)),
            holder: format!("torusd {id} repair on {host} (pid {})", std::process::id()),
            ..Default::default()
        };
        let repairer =
            torus_volume::repair::Repairer::new(cluster.clone(), id, opts, Duration::from_secs(args.repair_interval))
                .with_stats(repair_stats);
        (repairer.manager(), tokio::spawn(repairer.run()))
    });
    let reg = Registration {
        liveness: liveness.clone(),
        cluster,
        info,
        store: store.clone(),
        ttl: Duration::from_secs(args.lease_ttl),
    };
    let reg_task = tokio::spawn(reg.run());
    let settle_task = tokio::spawn(store.clone().settle_every(Duration::from_secs(1)));
    let srv_task = tokio::spawn(server::serve(listener, server::Handler::new(store.clone(), metrics), liveness, tls));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: flushing and stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: flushing and stopping"),
    }
    srv_task.abort();
    reg_task.abort();
    reb_task.abort();
    scrub_task.abort();
    if let Some(t) = collect_task {
        t.abort();
    }
    if let Some((manager, task)) = repair {
        task.abort();
        manager.close_all().await;
    }
    settle_task.abort();
    store.close().await.context("final flush")?;
    Ok(())
}

fn main() {
    let args = Args::parse();
    torus_cli::tune_allocator();
    torus_cli::init_logging("info", args.log.log_format);
    torus_store::failpoints_from_env();
    torus_cli::run_main("torusd", true, run(args));
}
