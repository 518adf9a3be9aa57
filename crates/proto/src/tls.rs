//! Mutual TLS for the peer protocol (rustls). A process given a TLS
//! directory (`--tls-dir`, the layout qemu, nbdkit and libnbd use:
//! `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`) serves only clients whose certificate the cluster CA
//! signed, and connects to nodes only over TLS, checking that their
//! certificate is the CA's and names the address dialled. A connection
//! that does not complete the handshake is closed before any request is read.
//!
//! Clients use the configuration installed for the whole process
//! ([`use_client`]), so every `PeerClient::connect` goes over TLS once it is set.
//!
//! Certificates rotate without downtime: [`reload`] reads the directory
//! again (on SIGHUP); connections made or accepted from then on use the new
//! files, open ones carry on. A directory that fails to load changes nothing.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
pub use rustls::{ClientConfig, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("reading {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("TLS configuration from {dir}: {reason}")]
    Config { dir: PathBuf, reason: String },
}

/// The files of a TLS directory.
pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(dir: &Path, name: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = dir.join(name);
    let read = |reason: String| TlsError::Read { path: path.clone(), reason };
    let certs: Vec<_> = CertificateDer::pem_file_iter(&path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| read(e.to_string()))?;
    if certs.is_empty() {
        return Err(read("no certificate in it".into()));
    }
    Ok(certs)
}

fn key(dir: &Path, name: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let path = dir.join(name);
    PrivateKeyDer::from_pem_file(&path).map_err(|e| TlsError::Read { path, reason: e.to_string() })
}

fn roots(dir: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(dir, CA_CERT)? {
        roots
            .add(c)
            .map_err(|e| TlsError::Config { dir: dir.to_path_buf(), reason: format!("the CA certificate: {e}") })?;
    }
    Ok(Arc::new(roots))
}

/// What a node serves with: its server certificate; clients must present one the CA signed.
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let bad = |reason: String| TlsError::Config { dir: dir.to_path_buf(), reason };
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider()).build().map_err(|e| bad(e.to_string()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(dir, SERVER_CERT)?, key(dir, SERVER_KEY)?)
        .map_err(|e| bad(e.to_string()))?;
    Ok(Arc::new(config))
}

/// What a client connects with: its client certificate; nodes must present one the CA signed.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let bad = |reason: String| TlsError::Config { dir: dir.to_path_buf(), reason };
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(certs(dir, CLIENT_CERT)?, key(dir, CLIENT_KEY)?)
        .map_err(|e| bad(e.to_string()))?;
    Ok(Arc::new(config))
}

/// The client configuration of this process, if it uses TLS (replaced on reload).
static CLIENT: OnceLock<RwLock<Arc<ClientConfig>>> = OnceLock::new();

/// Connects to nodes over TLS from now on, with `config` (a later call replaces it:
/// new connections use the new certificates).
pub fn use_client(config: Arc<ClientConfig>) {
    let slot = CLIENT.get_or_init(|| RwLock::new(config.clone()));
    *slot.write().expect("TLS config lock poisoned") = config;
}

/// The client configuration in use, if any.
pub fn client() -> Option<Arc<ClientConfig>> {
    CLIENT.get().map(|c| c.read().expect("TLS config lock poisoned").clone())
}

/// The name a node's certificate must carry for `addr` (`host:port`).
pub fn server_name(addr: &str) -> Option<ServerName<'static>> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).ok()
}

/// What a served TLS endpoint asks of its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// Peers and NBD clients: a certificate the cluster CA signed.
    Mutual,
    /// HTTP (metrics, status): no client certificate asked.
    Http,
}

/// The server side of HTTP endpoints: the server certificate only.
pub fn http_server_config(dir: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let bad = |reason: String| TlsError::Config { dir: dir.to_path_buf(), reason };
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs(dir, SERVER_CERT)?, key(dir, SERVER_KEY)?)
        .map_err(|e| bad(e.to_string()))?;
    Ok(Arc::new(config))
}

/// A served TLS configuration that [`reload`] can replace while serving:
/// each connection is accepted with the one current when it arrives.
#[derive(Clone)]
pub struct ServerTls {
    kind: ServerKind,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ServerTls {
    /// Loads `kind`'s configuration from `dir`, and registers it for [`reload`].
    pub fn load(dir: &Path, kind: ServerKind) -> Result<ServerTls, TlsError> {
        let tls = ServerTls { kind, current: Arc::new(RwLock::new(Self::build(dir, kind)?)) };
        SERVED.lock().expect("TLS registry poisoned").push(tls.clone());
        Ok(tls)
    }

    fn build(dir: &Path, kind: ServerKind) -> Result<Arc<ServerConfig>, TlsError> {
        match kind {
            ServerKind::Mutual => server_config(dir),
            ServerKind::Http => http_server_config(dir),
        }
    }

    /// An acceptor with the configuration of now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().expect("TLS config lock poisoned").clone())
    }
}

/// Every served configuration of this process (replaced together on reload).
static SERVED: std::sync::Mutex<Vec<ServerTls>> = std::sync::Mutex::new(Vec::new());

/// Reads `dir` again: the client configuration (if this process uses one)
/// and every served one are replaced, all or none.
pub fn reload(dir: &Path) -> Result<(), TlsError> {
    let served = SERVED.lock().expect("TLS registry poisoned").clone();
    let built: Vec<Arc<ServerConfig>> =
        served.iter().map(|s| ServerTls::build(dir, s.kind)).collect::<Result<_, _>>()?;
    let client = match client() {
        Some(_) => Some(client_config(dir)?),
        None => None,
    };
    for (s, config) in served.iter().zip(built) {
        *s.current.write().expect("TLS config lock poisoned") = config;
    }
    if let Some(c) = client {
        use_client(c);
    }
    Ok(())
}
