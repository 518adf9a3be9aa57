//! `torusctl certs init | issue`: a cluster CA, and for each process a TLS
//! directory in the layout qemu, nbdkit and libnbd use (`ca-cert.pem`,
//! `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`),
//! which every binary takes as `--tls-dir`.

use anyhow::{bail, Context};
use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use torus_proto::tls::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};

const CA_KEY: &str = "ca-key.pem";

#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Create a cluster CA in CA_DIR (ca-cert.pem, ca-key.pem; keep the key safe).
    Init { ca_dir: String },
    /// Write a TLS directory for one process, signed by the CA in CA_DIR.
    Issue {
        ca_dir: String,
        out_dir: String,
        /// The process's name (the certificates' common name).
        #[arg(long)]
        name: String,
        /// A host name or IP address the process is reached at (repeat for several).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
}

/// The CA's parameters: the same every time for one CA key, so that
/// certificates issued later name it as their issuer exactly as its
/// certificate does; its name carries a digest of the key, so that two
/// clusters' CAs have different names.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Torus cluster CA {:08x}", crc32c::crc32c(&key.public_key_raw())));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

/// Writes a new file (never over an existing one); keys readable by their owner only.
fn write_new(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", path.display()))
}

fn leaf(name: &str, sans: &[String], usage: ExtendedKeyUsagePurpose) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.subject_alt_names = sans
        .iter()
        .map(|s| match s.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(s.clone().try_into().with_context(|| format!("--san {s:?}"))?)),
        })
        .collect::<anyhow::Result<_>>()?;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![usage];
    Ok(p)
}

pub fn run(cmd: CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Init { ca_dir } => {
            let dir = Path::new(&ca_dir);
            std::fs::create_dir_all(dir).with_context(|| format!("creating {ca_dir}"))?;
            let key = KeyPair::generate().context("making the CA's key")?;
            let cert = ca_params(&key).self_signed(&key).context("making the CA's certificate")?;
            write_new(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
            write_new(&dir.join(CA_CERT), &cert.pem(), false)?;
            println!("created the cluster CA in {ca_dir} ({CA_CERT}; keep {CA_KEY} secret)");
        }
        CertsCmd::Issue { ca_dir, out_dir, name, sans } => {
            if sans.is_empty() {
                bail!("give at least one --san: the host names or IP addresses the process is reached at");
            }
            let ca = Path::new(&ca_dir);
            let ca_key = std::fs::read_to_string(ca.join(CA_KEY))
                .with_context(|| format!("reading {}", ca.join(CA_KEY).display()))?;
            let ca_cert = std::fs::read_to_string(ca.join(CA_CERT))
                .with_context(|| format!("reading {}", ca.join(CA_CERT).display()))?;
            let ca_key = KeyPair::from_pem(&ca_key).context("the CA's key")?;
            let issuer = Issuer::new(ca_params(&ca_key), ca_key);
            let out = Path::new(&out_dir);
            std::fs::create_dir_all(out).with_context(|| format!("creating {out_dir}"))?;
            for (usage, cert_file, key_file) in [
                (ExtendedKeyUsagePurpose::ServerAuth, SERVER_CERT, SERVER_KEY),
                (ExtendedKeyUsagePurpose::ClientAuth, CLIENT_CERT, CLIENT_KEY),
            ] {
                let key = KeyPair::generate().context("making a key")?;
                let cert = leaf(&name, &sans, usage)?.signed_by(&key, &issuer).context("signing a certificate")?;
                write_new(&out.join(key_file), &key.serialize_pem(), true)?;
                write_new(&out.join(cert_file), &cert.pem(), false)?;
            }
            write_new(&out.join(CA_CERT), &ca_cert, false)?;
            println!("wrote {out_dir} for {name} ({}): pass it as --tls-dir", sans.join(", "));
        }
    }
    Ok(())
}
