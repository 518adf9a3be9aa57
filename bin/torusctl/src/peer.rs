//! `torusctl list-peers`, `peer add`, `ring get`.

use crate::Output;
use anyhow::bail;
use clap::Subcommand;
use std::collections::HashMap;
use torus_meta::cluster::{Cluster, QueuedChange, RebalanceProgress, RingDoc};
use torus_types::format_size;
use torus_types::NodeId;

#[derive(Subcommand, Debug)]
pub enum PeerCmd {
    /// Put nodes in service: add them to the ring.
    Add {
        /// Node addresses (HOST:PORT) or UUIDs.
        peers: Vec<String>,
        /// Add every registered node that is not in the ring yet.
        #[arg(long = "all-peers", conflicts_with = "peers")]
        all_peers: bool,
    },
    /// Take a node out of the ring: its data moves to the others first.
    Remove {
        /// Node address (HOST:PORT) or UUID.
        peer: String,
        /// Remove it even if fewer nodes than a volume's replication would remain.
        #[arg(long)]
        force: bool,
    },
    /// Clear a node's full mark (set by the node when nearly full): the
    /// extents that went to other nodes meanwhile move back to it.
    ClearFull {
        /// Node address (HOST:PORT) or UUID.
        peer: String,
        /// Clear it even if its share of every volume, fully written, would not fit.
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
    /// Set the default replication of new volumes.
    SetReplication { replication: u32 },
    /// Set how long a node may be down before it is taken out of the ring and
    /// its extents are copied back up to R (e.g. 600, 10m, 1h; 0 = never).
    SetDownOut { duration: String },
}

/// Parses `600`, `90s`, `10m` or `1h` into seconds.
fn parse_duration(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        _ => (s, 1),
    };
    let n: u64 =
        num.parse().map_err(|_| anyhow::anyhow!("invalid duration {s:?}: use seconds, or a number with s, m or h"))?;
    n.checked_mul(mult)
        .filter(|v| *v <= 30 * 24 * 3600)
        .ok_or_else(|| anyhow::anyhow!("duration {s:?} is longer than 30 days"))
}

fn ago(secs: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{}s ago", now.saturating_sub(secs))
}

/// A node's place in the ring, with its share of a rebalance in progress.
fn peer_status(ring: &RingDoc, progress: &HashMap<NodeId, RebalanceProgress>, id: NodeId) -> String {
    let was = ring.previous.as_ref().is_some_and(|p| p.iter().any(|m| m.id == id));
    let full = ring.members.iter().any(|m| m.id == id && m.full);
    let base = match (ring.contains(id), ring.moving(), was) {
        (true, true, false) => "Joining",
        (true, _, _) if full => "Full",
        (true, _, _) => "OK",
        (false, _, true) => "Draining",
        (false, _, false) => "Avail",
    };
    match progress.get(&id).filter(|p| ring.moving() && p.ring_version == ring.version) {
        Some(p) if p.done => format!("{base}(moved)"),
        Some(p) => format!("{base}({}/{})", p.extents_done, p.extents_total),
        None => base.to_string(),
    }
}

pub async fn list_peers(cluster: &Cluster, output: Output) -> anyhow::Result<()> {
    let peers = cluster.peers().await?;
    let (ring, _) = cluster.ring().await?;
    let progress: HashMap<_, _> = cluster.progress().await?.into_iter().collect();
    match output {
        Output::Json => {
            let rows: Vec<_> = peers
                .iter()
                .map(|p| serde_json::json!({"peer": p, "in_ring": ring.contains(p.id), "status": peer_status(&ring, &progress, p.id)}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&rows)?);
        }
        Output::Table => {
            println!("{:<22} {:<36} {:>10} {:>10} {:<16} {}", "ADDRESS", "UUID", "SIZE", "USED", "STATUS", "UPDATED");
            for p in &peers {
                let status = peer_status(&ring, &progress, p.id);
                println!(
                    "{:<22} {:<36} {:>10} {:>10} {:<16} {}",
                    p.address,
                    p.id.to_string(),
                    format_size(p.capacity),
                    format_size(p.used),
                    status,
                    ago(p.last_seen)
                );
            }
            for m in ring.members.iter().filter(|m| !peers.iter().any(|p| p.id == m.id)) {
                println!(
                    "{:<22} {:<36} {:>10} {:>10} {:<16} {}",
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
        PeerCmd::Add { peers, all_peers } => {
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
            let (ring, added) = cluster.add_to_ring(&chosen).await?;
            if added.is_empty() {
                println!("every named node is already in the ring or queued to join (version {})", ring.version);
            } else if !ring.queued.is_empty() {
                for id in &added {
                    println!("queued: add {id}");
                }
                println!("{}", queued_note(&ring));
            } else {
                for id in &added {
                    println!("added {id}");
                }
                println!("ring is now version {} with {} members", ring.version, ring.members.len());
                if ring.moving() {
                    println!("data is moving to the new members: follow it with `torusctl status`");
                }
            }
            Ok(())
        }
        PeerCmd::Remove { peer, force } => {
            let id = match torus_types::NodeId::parse(&peer) {
                Some(id) => id,
                None => cluster.find_peer(&peer).await?.id,
            };
            let ring = cluster.remove_from_ring(id, force).await?;
            if ring.queued.contains(&QueuedChange::Remove { id }) {
                println!("queued: remove {id}");
                println!("{}", queued_note(&ring));
            } else {
                println!("removed {id} from the ring (now version {}, {} members)", ring.version, ring.members.len());
                println!("its data is moving to the other nodes: follow it with `torusctl status`");
            }
            Ok(())
        }
        PeerCmd::ClearFull { peer, force } => {
            let p = cluster.find_peer(&peer).await?;
            let (ring, _) = cluster.ring().await?;
            if !ring.projected().iter().any(|m| m.id == p.id && m.full) {
                bail!("node {} is not marked full", p.id);
            }
            // Its share of every volume as if fully written: an upper bound of what it would hold.
            let placement = torus_ring::Ring::from_labeled(
                ring.version,
                ring.members.iter().map(|m| (m.id, m.weight, &m.labels, false)),
            );
            let mut share = 0u64;
            for v in cluster.volumes().await? {
                for i in 0..v.extent_count() {
                    if placement.replicas(torus_types::ExtentId::new(v.id, i), v.replication as usize).contains(&p.id) {
                        share += v.extent_size;
                    }
                }
            }
            if share > p.capacity && !force {
                bail!(
                    "node {} would be a replica of up to {} of data (every volume fully written) but offers {}: \
                     the extents moving back could fill it mid-move. Add nodes or free space first, \
                     or pass --force",
                    p.id,
                    format_size(share),
                    format_size(p.capacity)
                );
            }
            let ring = cluster.set_full(p.id, false).await?;
            if ring.queued.contains(&QueuedChange::SetFull { id: p.id, full: false }) {
                println!("queued: clear the full mark of {}", p.id);
                println!("{}", queued_note(&ring));
                return Ok(());
            }
            println!("cleared the full mark of {} (ring version {})", p.id, ring.version);
            if ring.moving() {
                println!(
                    "extents placed elsewhere while it was full are moving back: follow it with `torusctl status`"
                );
            }
            Ok(())
        }
    }
}

/// What an operator is told when a change waits for the one under way.
fn queued_note(ring: &RingDoc) -> String {
    format!(
        "a ring change is under way (version {}): the {} queued change(s) start together, as one move, \
         when it ends (torusctl status shows the queue; torusctl wait rebalanced waits for all of it)",
        ring.version,
        ring.queued.len()
    )
}

pub async fn run_ring(cluster: &Cluster, cmd: RingCmd) -> anyhow::Result<()> {
    match cmd {
        RingCmd::SetReplication { replication } => {
            let (ring, _) = cluster.ring().await?;
            if !ring.members.is_empty() && replication as usize > ring.members.len() {
                bail!("replication {replication} is larger than the {} node(s) in the ring", ring.members.len());
            }
            cluster.set_replication(replication).await?;
            println!("new volumes get replication {replication} (existing volumes keep theirs)");
            Ok(())
        }
        RingCmd::SetDownOut { duration } => {
            let secs = parse_duration(&duration)?;
            cluster.set_down_out(secs).await?;
            if secs == 0 {
                println!("nodes that are down stay in the ring until `torusctl peer remove`");
            } else {
                println!("a node down for {secs} s is taken out of the ring and its extents are copied back up to R");
            }
            Ok(())
        }
        RingCmd::Get { output } => {
            let (ring, _) = cluster.ring().await?;
            let config = cluster.config().await?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"ring": ring, "replication": config.replication, "down_out_secs": config.down_out_secs})
                    )?
                ),
                Output::Table => {
                    println!(
                        "version: {}\nreplication: {}\ndown-out: {}\nmembers: {}",
                        ring.version,
                        config.replication,
                        match config.down_out_secs {
                            0 => "never".to_string(),
                            s => format!("after {s} s down"),
                        },
                        ring.members.len()
                    );
                    for m in &ring.members {
                        let full = if m.full { " FULL (keeps what it holds; new extents go elsewhere)" } else { "" };
                        println!("  {} weight {}{full}", m.id, format_size(m.weight));
                    }
                }
            }
            Ok(())
        }
    }
}
