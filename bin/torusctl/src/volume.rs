//! `torusctl volume create-block | list | resize | delete | import | export | snapshot | clone`.

use crate::Output;
use anyhow::{bail, Context};
use clap::Subcommand;
use std::time::Duration;
use torus_cli::parse_size;
use torus_meta::cluster::{Cluster, ClusterError};
use torus_proto::PeerClient;
use torus_types::format_size;
use torus_volume::{BlockDevice, ManagerOptions, VolumeError, VolumeManager};

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a block volume.
    #[command(alias = "create")]
    CreateBlock {
        name: String,
        /// Size, e.g. 10GiB (a multiple of 512 bytes).
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Copies of each extent (default: the cluster's).
        #[arg(long)]
        replication: Option<u32>,
        /// Encrypt its data (AES-256-XTS) under a new volume key, wrapped by
        /// the cluster key of --key-file: clients need that key to read or write it.
        #[arg(long)]
        encrypt: bool,
    },
    /// List volumes.
    #[command(alias = "ls")]
    List {
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Grow a volume (online: an open torusblk serves the new size to new
    /// connections), or shrink it with --allow-shrink while nobody has it open.
    Resize {
        name: String,
        /// New size, e.g. 20GiB (a multiple of 512 bytes).
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Allow a smaller size: the data past the new end is zeroed, then dropped.
        #[arg(long = "allow-shrink")]
        allow_shrink: bool,
    },
    /// Delete a volume and its data on every node.
    #[command(alias = "rm")]
    Delete { name: String },
    /// Create a volume from a file, or from standard input (-) with --size,
    /// storing only what is not zero (holes and zero blocks are skipped).
    Import {
        /// A file, or - for standard input.
        source: String,
        name: String,
        /// The volume's size (default: the file's, rounded up to 512 bytes).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Copies of each extent (default: the cluster's).
        #[arg(long)]
        replication: Option<u32>,
        /// Create the volume encrypted (see create-block --encrypt).
        #[arg(long)]
        encrypt: bool,
    },
    /// Write a volume or a snapshot to a file (holes stay holes) or to
    /// standard output (-), reading only what holds data; works while the
    /// volume is in use.
    Export {
        /// VOL or VOL@SNAP.
        volume: String,
        /// A file, or - for standard output.
        dest: String,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Snapshots: instant, copy-on-write, taken while the volume is in use.
    #[command(subcommand)]
    Snapshot(crate::snapshot::SnapshotCmd),
    /// Create a writable volume sharing a snapshot's data until written (instant).
    Clone {
        /// VOL@SNAP
        snapshot: String,
        /// The new volume's name.
        name: String,
    },
    /// Rotate the cluster key: wrap the key of every encrypted volume and
    /// snapshot that --key-file wraps with the key of --new-key-file instead
    /// (data is not re-encrypted; give clients the new key afterwards).
    Rekey {
        #[arg(long = "new-key-file")]
        new_key_file: std::path::PathBuf,
    },
}

/// The key for `--encrypt`.
fn encryption(key: &torus_cli::KeyArgs, encrypt: bool) -> anyhow::Result<Option<torus_meta::cluster::Encryption>> {
    if !encrypt {
        return Ok(None);
    }
    let Some(key) = key.load()? else {
        bail!("--encrypt needs the cluster key: --key-file FILE (make one with `head -c 32 /dev/urandom > FILE`)")
    };
    Ok(Some(key.new_volume_key()?))
}

pub async fn run(cluster: &Cluster, key: &torus_cli::KeyArgs, cmd: VolumeCmd) -> anyhow::Result<()> {
    match cmd {
        VolumeCmd::CreateBlock { name, size, replication, encrypt } => {
            let v = cluster.create_volume_with(&name, size, replication, encryption(key, encrypt)?).await?;
            let enc = match &v.encryption {
                Some(e) => format!(", encrypted under cluster key {}", e.key_id),
                None => String::new(),
            };
            println!("created volume {} ({}, replication {}{enc})", v.name, format_size(v.size), v.replication);
        }
        VolumeCmd::List { output } => {
            let vols = cluster.volumes().await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&vols)?),
                Output::Table => {
                    println!("{:<32} {:>6} {:>12} {:>5} {}", "NAME", "ID", "SIZE", "REPL", "WRITER");
                    for v in vols {
                        let writer = match cluster.volume_lock(v.id).await? {
                            Some((lock, epoch)) => format!("{} (epoch {epoch})", lock.holder),
                            None => "-".into(),
                        };
                        println!(
                            "{:<32} {:>6} {:>12} {:>5} {}",
                            v.name,
                            v.id.0,
                            format_size(v.size),
                            v.replication,
                            writer
                        );
                    }
                }
            }
        }
        VolumeCmd::Resize { name, size, allow_shrink } => resize(cluster, &name, size, allow_shrink).await?,
        VolumeCmd::Delete { name } => {
            let unreached = delete(cluster, &name).await?;
            println!("deleted volume {name}");
            if !unreached.is_empty() {
                eprintln!(
                    "warning: could not free its data on: {}; those nodes keep the space until it is deleted again",
                    unreached.join(", ")
                );
            }
        }
        VolumeCmd::Import { source, name, size, replication, encrypt } => {
            let enc = encryption(key, encrypt)?;
            crate::transfer::import(cluster, key, &source, &name, size, replication, enc).await?
        }
        VolumeCmd::Export { volume, dest, force } => {
            crate::transfer::export(cluster, key, &volume, &dest, force).await?
        }
        VolumeCmd::Rekey { new_key_file } => rekey(cluster, key, &new_key_file).await?,
        VolumeCmd::Snapshot(cmd) => crate::snapshot::run(cluster, cmd).await?,
        VolumeCmd::Clone { snapshot, name } => crate::snapshot::clone(cluster, &snapshot, &name).await?,
    }
    Ok(())
}

/// Wraps every volume key the old cluster key wraps with the new one.
async fn rekey(cluster: &Cluster, key: &torus_cli::KeyArgs, new: &std::path::Path) -> anyhow::Result<()> {
    let Some(old) = key.load()? else { bail!("rekey needs the current cluster key: --key-file FILE") };
    let new = torus_volume::crypt::ClusterKey::load(new)?;
    let changed = cluster
        .rewrap_keys(|record, enc| {
            if enc.key_id == new.id() {
                return Ok(None);
            }
            old.rewrap(record, enc, &new).map(Some)
        })
        .await
        .context("nothing after the first error was changed; run rekey again once it is mended")?;
    let snapshots = changed.iter().filter(|k| k.starts_with("snapshots/")).count();
    println!(
        "rewrapped {} volume key(s) and {snapshots} snapshot key(s): cluster key {} -> {}; \
         give clients (torusblk, the CSI plugin) the new key file",
        changed.len() - snapshots,
        old.id(),
        new.id()
    );
    Ok(())
}

/// Deletes a volume, then the data only it used on every live node (the
/// layers its clones read through stay); returns the nodes that could not
/// be reached (their collectors delete it later).
pub async fn delete(cluster: &Cluster, name: &str) -> anyhow::Result<Vec<String>> {
    let v = cluster.delete_volume(name).await?;
    // The name is gone (ids are never reused); now free the space on every live node.
    let (_, used) = cluster.referenced_layers().await?;
    let unused: Vec<_> = v.chain().into_iter().filter(|l| !used.contains(l)).collect();
    let mut unreached = Vec::new();
    for p in cluster.peers().await? {
        let res = match PeerClient::connect(&p.address, Duration::from_secs(10)).await {
            Ok(c) => {
                let mut res = Ok(());
                for l in &unused {
                    res = res.and(c.delete_volume(*l).await);
                }
                res
            }
            Err(e) => Err(e),
        };
        if let Err(e) = res {
            unreached.push(format!("{} ({e})", p.address));
        }
    }
    Ok(unreached)
}

async fn resize(cluster: &Cluster, name: &str, size: u64, allow_shrink: bool) -> anyhow::Result<()> {
    let v = cluster.volume(name).await?;
    if size == v.size {
        println!("volume {name} is {} already", format_size(size));
        return Ok(());
    }
    if size > v.size {
        let g = cluster.grow_volume(name, size).await?;
        println!(
            "grew volume {name} from {} to {} (NBD clients see it on their next connection; \
             a CSI volume's file system grows with NodeExpandVolume)",
            format_size(v.size),
            format_size(g.size)
        );
        return Ok(());
    }
    if !allow_shrink {
        bail!(
            "shrinking volume {name} from {} to {} drops the data past {}: refused without --allow-shrink",
            format_size(v.size),
            format_size(size),
            format_size(size)
        );
    }
    if size == 0 || size % 512 != 0 {
        bail!("size {size} must be a positive multiple of 512 bytes");
    }
    // Take the volume as its writer: that proves nobody has it open, and only
    // the writer may zero its tail and then shrink it.
    let manager = VolumeManager::new(cluster.clone(), ManagerOptions::default());
    let vol = match manager.open(name, true).await {
        Ok(vol) => vol,
        Err(VolumeError::Cluster(ClusterError::VolumeLocked { holder, .. })) => {
            bail!("volume {name} is open for writing by {holder}: shrinking is refused while it is in use")
        }
        Err(e) => return Err(e).context("opening the volume to shrink it"),
    };
    let result = async {
        // Zeroed (holes punched) before the size drops, so a later growth reads zeroes there.
        vol.zero(size, v.size - size, true).await.context("zeroing the data past the new end")?;
        vol.flush().await.context("flushing")?;
        cluster.shrink_volume(name, size, vol.epoch()).await.context("recording the new size")
    }
    .await;
    vol.release().await;
    drop(vol);
    manager.close_all().await;
    let s = result?;
    println!("shrank volume {name} from {} to {}", format_size(v.size), format_size(s.size));
    Ok(())
}
