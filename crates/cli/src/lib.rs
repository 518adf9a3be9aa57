//! torus-cli: the flags and start-up steps that `torusd`, `torusctl` and
//! `torusblk` share, so that they behave alike: `-C/--etcd` (env
//! `TORUS_ETCD`), `--etcd-prefix` (env `TORUS_ETCD_PREFIX`), logging through
//! `tracing` (level from `RUST_LOG`, default info), and sizes.

use anyhow::Context;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;
use torus_meta::cluster::Cluster;
use torus_meta::{EtcdSecurity, EtcdStore, MetadataStore};
use torus_proto::tls::{ServerKind, ServerTls};

#[derive(Args, Clone, Debug)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (host:port or http://host:port).
    #[arg(short = 'C', long = "etcd", env = "TORUS_ETCD", default_value = torus_meta::DEFAULT_ENDPOINT, global = true)]
    pub etcd: String,
    /// Key prefix under which Torus keeps its metadata in etcd.
    #[arg(long = "etcd-prefix", env = "TORUS_ETCD_PREFIX", default_value = torus_meta::DEFAULT_PREFIX, global = true)]
    pub prefix: String,
    /// CA certificate (PEM) that signed etcd's: connect to etcd over TLS
    /// (endpoints without a scheme become https://).
    #[arg(long = "etcd-cacert", env = "TORUS_ETCD_CACERT", global = true)]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM) to present to etcd (with --etcd-key).
    #[arg(long = "etcd-cert", env = "TORUS_ETCD_CERT", global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long = "etcd-key", env = "TORUS_ETCD_KEY", global = true, requires = "cert")]
    pub key: Option<PathBuf>,
    /// etcd user, as USER or USER:PASSWORD (the password may come from TORUS_ETCD_PASSWORD instead).
    #[arg(long = "etcd-user", env = "TORUS_ETCD_USER", global = true)]
    pub user: Option<String>,
}

impl EtcdArgs {
    /// Connects to etcd, failing within seconds (naming the endpoint) if it does not answer.
    pub async fn connect(&self) -> anyhow::Result<Cluster> {
        let security = self.security()?;
        let store = EtcdStore::connect_with(&self.etcd, &self.prefix, &security)
            .await
            .with_context(|| format!("connecting to etcd at {}", self.etcd))?;
        Ok(Cluster::new(Arc::new(store) as Arc<dyn MetadataStore>))
    }

    /// The same flags, for a child process (the CSI plugin's keepers).
    pub fn child_args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> =
            vec!["-C".into(), self.etcd.clone().into(), "--etcd-prefix".into(), self.prefix.clone().into()];
        for (flag, path) in [("--etcd-cacert", &self.cacert), ("--etcd-cert", &self.cert), ("--etcd-key", &self.key)] {
            if let Some(p) = path {
                args.extend([flag.into(), p.clone().into_os_string()]);
            }
        }
        if let Some(u) = &self.user {
            args.extend(["--etcd-user".into(), u.clone().into()]);
        }
        args
    }

    /// TLS files and user from the flags, read now (a missing file is an error naming it).
    pub fn security(&self) -> anyhow::Result<EtcdSecurity> {
        let read =
            |p: &PathBuf, what: &str| std::fs::read(p).with_context(|| format!("reading {what} {}", p.display()));
        let ca = self.cacert.as_ref().map(|p| read(p, "the etcd CA certificate")).transpose()?;
        let identity = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((read(c, "the etcd client certificate")?, read(k, "the etcd client key")?)),
            _ => None,
        };
        let user = match &self.user {
            None => None,
            Some(u) => match u.split_once(':') {
                Some((name, password)) => Some((name.to_string(), password.to_string())),
                None => {
                    let password = std::env::var("TORUS_ETCD_PASSWORD").with_context(|| {
                        format!("--etcd-user {u}: no password (USER:PASSWORD or TORUS_ETCD_PASSWORD)")
                    })?;
                    Some((u.clone(), password))
                }
            },
        };
        Ok(EtcdSecurity { ca, identity, user })
    }
}

/// How log lines are written.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One line per event, for people.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, fields, spans), for log collectors.
    Json,
}

#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long = "log-format", value_enum, default_value_t, env = "TORUS_LOG_FORMAT", global = true)]
    pub log_format: LogFormat,
}

#[derive(Args, Clone, Debug)]
pub struct TlsArgs {
    /// A TLS directory (`torusctl certs issue`): connect to storage nodes
    /// with mutual TLS (and, for torusd, serve only clients the cluster CA
    /// signed). SIGHUP reads it again: new connections use the new files.
    #[arg(long = "tls-dir", env = "TORUS_TLS_DIR", global = true)]
    pub tls_dir: Option<std::path::PathBuf>,
    /// Serve the HTTP endpoints (/metrics, /status, /healthz, /readyz) over
    /// HTTPS with the server certificate of --tls-dir (no client certificate asked).
    #[arg(long = "http-tls", env = "TORUS_HTTP_TLS", global = true, requires = "tls_dir")]
    pub http_tls: bool,
}

impl TlsArgs {
    /// Makes every connection to a storage node of this process use TLS, if a directory was given.
    pub fn install_client(&self) -> anyhow::Result<()> {
        if let Some(dir) = &self.tls_dir {
            torus_proto::tls::use_client(torus_proto::tls::client_config(dir)?);
        }
        Ok(())
    }

    /// For long-running processes: reads the directory again on each SIGHUP.
    pub fn reload_on_sighup(&self) {
        if let Some(dir) = &self.tls_dir {
            tokio::spawn(reload_on_sighup(dir.clone()));
        }
    }

    /// The configuration a node (or an NBD server) serves with, if TLS is on.
    pub fn server(&self) -> anyhow::Result<Option<ServerTls>> {
        match &self.tls_dir {
            Some(dir) => Ok(Some(ServerTls::load(dir, ServerKind::Mutual)?)),
            None => Ok(None),
        }
    }

    /// The configuration HTTP endpoints serve with, with --http-tls.
    pub fn http(&self) -> anyhow::Result<Option<ServerTls>> {
        match (&self.tls_dir, self.http_tls) {
            (Some(dir), true) => Ok(Some(ServerTls::load(dir, ServerKind::Http)?)),
            _ => Ok(None),
        }
    }
}

/// Certificate rotation: on each SIGHUP, every TLS configuration of the
/// process is read again from `dir` (all or none; open connections go on).
async fn reload_on_sighup(dir: std::path::PathBuf) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot catch SIGHUP: certificates are read at start only");
        return;
    };
    while hup.recv().await.is_some() {
        match torus_proto::tls::reload(&dir) {
            Ok(()) => tracing::info!(dir = %dir.display(), "SIGHUP: TLS certificates reloaded"),
            Err(e) => tracing::error!(error = %e, "SIGHUP: TLS certificates not reloaded; the old ones stay in use"),
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct KeyArgs {
    /// The cluster key (32 bytes, or 64 hex digits): encrypted volumes are
    /// read and written with it, and `--encrypt` creates them under it.
    #[arg(long = "key-file", env = "TORUS_KEY_FILE", global = true)]
    pub key_file: Option<std::path::PathBuf>,
}

impl KeyArgs {
    /// The key, if a file was given.
    pub fn load(&self) -> anyhow::Result<Option<Arc<torus_volume::crypt::ClusterKey>>> {
        match &self.key_file {
            Some(p) => Ok(Some(Arc::new(torus_volume::crypt::ClusterKey::load(p)?))),
            None => Ok(None),
        }
    }
}

/// The format chosen at start-up (fatal errors are written in it too).
static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Logs to stderr in `format`; `RUST_LOG` overrides the default level.
/// Keeps the I/O buffers of a server process in the heap, reused: glibc
/// would otherwise hand out every buffer of 128 KiB or more (a 1 MiB request)
/// as a fresh mapping, or give the arena's top back to the kernel as soon as
/// 2 MiB are free, and each request would pay page faults and page clearing
/// for it (9% of all CPU under 1 MiB sequential reads, bench/README.md).
/// Freed memory up to 32 MiB per arena is kept; buffers of 32 MiB and more
/// are still mapped. A no-op where the C library is not glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before the runtime starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

pub fn init_logging(default: &str, format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    match format {
        LogFormat::Text => fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
        LogFormat::Json => fmt.json().with_current_span(false).with_span_list(true).init(),
    }
}

/// A clap value parser for human sizes (512MiB, 10GiB, 1T, 4096).
pub fn parse_size(s: &str) -> Result<u64, String> {
    torus_types::parse_size(s).map_err(|e| e.to_string())
}

/// Parses `KEY=VALUE` labels (failure domains: `zone=a`); empty items are skipped.
pub fn parse_labels(raw: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    raw.iter()
        .filter(|s| !s.is_empty())
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => anyhow::bail!("label {s:?} is not KEY=VALUE"),
        })
        .collect()
}

/// Formats an error chain on one line: `connecting to etcd at X: unreachable: ...`.
pub fn one_line(e: &anyhow::Error) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

/// Runs a binary's async main on a tokio runtime; on error prints
/// `<name>: <error chain on one line>` to stderr and exits with status 1.
pub fn run_main<F>(name: &str, multi_thread: bool, main: F)
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = if multi_thread {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    }
    .expect("tokio runtime starts");
    if let Err(e) = rt.block_on(main) {
        match FORMAT.get() {
            Some(LogFormat::Json) => tracing::error!("{name}: {}", one_line(&e)),
            _ => eprintln!("{name}: {}", one_line(&e)),
        }
        std::process::exit(1);
    }
}
