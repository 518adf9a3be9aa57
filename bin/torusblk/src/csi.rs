//! `torusblk csi`: the CSI driver (controller, node or both) on a unix socket.

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use torus_attach::keeper::Backend;
use torus_cli::EtcdArgs;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ModeArg {
    Controller,
    Node,
    All,
}

/// How volumes become local block devices on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttachArg {
    /// FUSE + loop (the kernel NBD path is chosen only by --attach nbd until it is tested end to end).
    Auto,
    /// A FUSE file backed by the volume, bound to a loop device with direct I/O.
    Fuse,
    /// The kernel NBD driver, configured through netlink.
    Nbd,
}

#[derive(Args, Debug)]
pub struct CsiArgs {
    /// The CSI endpoint: unix:///PATH/csi.sock.
    #[arg(long)]
    endpoint: String,
    /// This host's id as the CO knows it (the Kubernetes node name). Required for --mode node and all.
    #[arg(long = "node-id", env = "NODE_ID", default_value = "")]
    node_id: String,
    /// Which services to serve.
    #[arg(long, value_enum, default_value = "all")]
    mode: ModeArg,
    /// Where the node service keeps what it staged and its attachments (must survive plugin restarts).
    #[arg(long = "state-dir", default_value = "/var/lib/torus-csi")]
    state_dir: PathBuf,
    /// This host's failure-domain labels (zone=a), reported as topology.csi.torus.io/<key>.
    #[arg(long, value_delimiter = ',')]
    label: Vec<String>,
    /// A cgroup directory the attachment keepers are moved into, so that
    /// stopping the plugin's own cgroup (a container restart) does not end them.
    #[arg(long = "keeper-cgroup")]
    keeper_cgroup: Option<PathBuf>,
    /// How volumes are attached.
    #[arg(long, value_enum, default_value = "auto")]
    attach: AttachArg,
    /// TTL in seconds of the writer lease of each attached volume, and of this host's registration.
    #[arg(long = "lease-ttl", default_value_t = 10)]
    lease_ttl: u64,
    /// Seconds NodeStageVolume waits for another holder's writer lease to lapse (default: the lease TTL + 2).
    #[arg(long = "lock-wait")]
    lock_wait: Option<u64>,
    /// Seconds a storage node may take to answer one request (passed to each keeper).
    #[arg(long = "node-timeout", default_value_t = 10)]
    node_timeout: u64,
    /// Serve /metrics (process and etcd figures), /healthz and /readyz (etcd answers) over HTTP on this address.
    #[arg(long)]
    http: Option<String>,
}

fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .with_context(|| format!("--endpoint {endpoint:?}: only unix:///PATH endpoints are served"))?;
    if !path.starts_with('/') {
        bail!("--endpoint {endpoint:?}: the socket path must be absolute (unix:///PATH)");
    }
    Ok(PathBuf::from(path))
}

/// The attach path this host uses.
fn choose(attach: AttachArg) -> anyhow::Result<Backend> {
    let kernel_nbd = torus_attach::nbd_kernel::available();
    match attach {
        AttachArg::Fuse => Ok(Backend::Fuse),
        // The kernel NBD path has not run end to end yet (no nbd module on the
        // machines that test this): `auto` does not pick it until it has.
        AttachArg::Auto => {
            if kernel_nbd {
                tracing::info!(
                    "this host has the kernel nbd driver; volumes attach through FUSE + loop unless --attach nbd"
                );
            }
            Ok(Backend::Fuse)
        }
        AttachArg::Nbd if kernel_nbd => Ok(Backend::KernelNbd),
        AttachArg::Nbd => {
            bail!("--attach nbd: the kernel nbd driver is not loaded on this host (modprobe nbd), or use --attach fuse")
        }
    }
}

pub async fn run(
    etcd: &EtcdArgs,
    tls: &torus_cli::TlsArgs,
    key: &torus_cli::KeyArgs,
    args: CsiArgs,
) -> anyhow::Result<()> {
    let socket = socket_path(&args.endpoint)?;
    let mode = match args.mode {
        ModeArg::Controller => torus_csi::Mode::Controller,
        ModeArg::Node => torus_csi::Mode::Node,
        ModeArg::All => torus_csi::Mode::All,
    };
    if mode.node() && args.node_id.is_empty() {
        bail!("--node-id is required with --mode node or all");
    }
    if !(1..=60).contains(&args.lease_ttl) {
        bail!("--lease-ttl must be between 1 and 60 seconds");
    }
    let labels = torus_cli::parse_labels(&args.label)?;
    let backend = choose(args.attach)?;
    let cluster = etcd.connect().await?;
    cluster.config().await?;
    let lock_wait = Duration::from_secs(args.lock_wait.unwrap_or(args.lease_ttl + 2));
    let exe = std::env::current_exe().context("finding the torusblk binary for keepers")?;
    let mut command: Vec<OsString> = std::iter::once(exe.into()).chain(etcd.child_args()).collect();
    // Keepers reach the storage nodes with the plugin's certificates.
    if let Some(dir) = &tls.tls_dir {
        command.extend(["--tls-dir".into(), dir.clone().into_os_string()]);
    }
    // And with its cluster key (the file's path: the key is read by each keeper).
    let cluster_key = key.load()?;
    if let Some(file) = &key.key_file {
        command.extend(["--key-file".into(), file.clone().into_os_string()]);
    }
    let keeper_args: Vec<OsString> = vec![
        "--lease-ttl".into(),
        args.lease_ttl.to_string().into(),
        "--node-timeout".into(),
        args.node_timeout.to_string().into(),
        "--host-id".into(),
        args.node_id.clone().into(),
    ];
    // Only the node service keeps state (the controller may run on a read-only root, unprivileged).
    if mode.node() {
        std::fs::create_dir_all(&args.state_dir)
            .with_context(|| format!("creating the state dir {}", args.state_dir.display()))?;
    }
    let attacher = Arc::new(torus_attach::ProcessAttacher::new(
        args.state_dir.clone(),
        command,
        keeper_args,
        args.keeper_cgroup.clone(),
        lock_wait,
        backend,
    ));
    tracing::info!(backend = backend.name(), state_dir = %args.state_dir.display(), "attach path chosen");
    // Per-RPC figures are kept whether or not --http serves them.
    let mut registry = torus_metrics::prometheus_client::registry::Registry::default();
    let metrics = Arc::new(torus_csi::metrics::CsiMetrics::register(&mut registry));
    let opts = torus_csi::Options {
        metrics,
        socket,
        mode,
        node_id: args.node_id.clone(),
        labels,
        state_dir: args.state_dir.clone(),
        attacher,
        lease_ttl: Duration::from_secs(args.lease_ttl),
        key: cluster_key,
    };
    let shutdown = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping (attached volumes stay attached)"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping (attached volumes stay attached)"),
        }
    };
    let endpoint = match &args.http {
        Some(addr) => Some(crate::http::serve(addr, registry, cluster.clone(), tls.http()?).await?),
        None => None,
    };
    torus_csi::serve(cluster, opts, shutdown).await?;
    drop(endpoint);
    Ok(())
}
