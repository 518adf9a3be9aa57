//! `torusctl list-peers`, `peer add`, `ring get`.

use crate::Output;
use anyhow::bail;
use clap::Subcommand;
use torus_meta::cluster::Cluster;
use torus_types::format_size;

#[derive(Subcommand, Debug)]
pub enum PeerCmd {
    /// Put nodes in service: add them to the ring.
    Add {
        /// Node addresses (HOST:PORT) or UUIDs.
        peers: Vec<String>,
        /// Add every registered node that is not in the ring yet.
        #[arg(long = "all-peers", conflicts_with = "peers")]
        all_peers: bool,
        /// Change a ring that already places volumes (their data does not move yet).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum RingCmd {
    /// Print the ring: version and members.
    Get {
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
}

fn ago(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{}s ago", now.saturating_sub(secs))
}

pub async fn list_peers(cluster: &Cluster, output: Output) -> anyhow::Result<()> {
    let peers = cluster.peers().await?;
    let (ring, _) = cluster.ring().await?;
    match output {
        Output::Json => {
            let rows: Vec<_> = peers
                .iter()
                .map(|p| serde_json::json!({"peer": p, "in_ring": ring.contains(p.id)}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table => {
            println!(
                "{:<22} {:<36} {:>10} {:>10} {:<8} {}",
                "ADDRESS", "UUID", "SIZE", "USED", "STATUS", "LAST SEEN"
            );
            for p in &peers {
                let status = if ring.contains(p.id) { "OK" } else { "Avail" };
                println!(
                    "{:<22} {:<36} {:>10} {:>10} {:<8} {}",
                    p.address,
                    p.id.to_string(),
                    format_size(p.capacity),
                    format_size(p.used),
                    status,
                    ago(p.last_seen)
                );
            }
            for m in ring
                .members
                .iter()
                .filter(|m| !peers.iter().any(|p| p.id == m.id))
            {
                println!(
                    "{:<22} {:<36} {:>10} {:>10} {:<8} {}",
                    "-",
                    m.id.to_string(),
                    format_size(m.weight),
                    "-",
                    "Down",
                    "-"
                );
            }
        }
    }
    Ok(())
}

pub async fn run(cluster: &Cluster, cmd: PeerCmd) -> anyhow::Result<()> {
    match cmd {
        PeerCmd::Add {
            peers,
            all_peers,
            force,
        } => {
            let chosen = if all_peers {
                cluster.peers().await?
            } else {
                if peers.is_empty() {
                    bail!("name the peers to add (address or UUID), or pass --all-peers");
                }
                let mut v = Vec::new();
                for p in &peers {
                    v.push(cluster.find_peer(p).await?);
                }
                v
            };
            if chosen.is_empty() {
                bail!("no registered nodes to add: start torusd on the storage nodes first");
            }
            let (ring, added) = cluster.add_to_ring(&chosen, force).await?;
            if added.is_empty() {
                println!(
                    "every named node is already in the ring (version {})",
                    ring.version
                );
            } else {
                for id in &added {
                    println!("added {id}");
                }
                println!(
                    "ring is now version {} with {} members",
                    ring.version,
                    ring.members.len()
                );
            }
            Ok(())
        }
    }
}

pub async fn run_ring(cluster: &Cluster, cmd: RingCmd) -> anyhow::Result<()> {
    match cmd {
        RingCmd::Get { output } => {
            let (ring, _) = cluster.ring().await?;
            let config = cluster.config().await?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"ring": ring, "replication": config.replication})
                    )?
                ),
                Output::Table => {
                    println!(
                        "version: {}\nreplication: {}\nmembers: {}",
                        ring.version,
                        config.replication,
                        ring.members.len()
                    );
                    for m in &ring.members {
                        println!("  {} weight {}", m.id, format_size(m.weight));
                    }
                }
            }
            Ok(())
        }
    }
}
