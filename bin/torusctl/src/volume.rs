//! `torusctl volume create-block | list | delete`.

use crate::Output;
use clap::Subcommand;
use std::time::Duration;
use torus_cli::parse_size;
use torus_meta::cluster::Cluster;
use torus_proto::PeerClient;
use torus_types::format_size;

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
    },
    /// List volumes.
    #[command(alias = "ls")]
    List {
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a volume and its data on every node.
    #[command(alias = "rm")]
    Delete { name: String },
}

pub async fn run(cluster: &Cluster, cmd: VolumeCmd) -> anyhow::Result<()> {
    match cmd {
        VolumeCmd::CreateBlock { name, size, replication } => {
            let v = cluster.create_volume(&name, size, replication).await?;
            println!("created volume {} ({}, replication {})", v.name, format_size(v.size), v.replication);
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
        VolumeCmd::Delete { name } => {
            let v = cluster.delete_volume(&name).await?;
            // The name is gone (the id is never reused); now free the space on every live node.
            let mut unreached = Vec::new();
            for p in cluster.peers().await? {
                let res = match PeerClient::connect(&p.address, Duration::from_secs(10)).await {
                    Ok(c) => c.delete_volume(v.id).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = res {
                    unreached.push(format!("{} ({e})", p.address));
                }
            }
            println!("deleted volume {name}");
            if !unreached.is_empty() {
                eprintln!(
                    "warning: could not free its data on: {}; those nodes keep the space until it is deleted again",
                    unreached.join(", ")
                );
            }
        }
    }
    Ok(())
}
