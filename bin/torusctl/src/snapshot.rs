//! `torusctl volume snapshot create | list | delete | restore` and `torusctl volume clone`.

use crate::Output;
use anyhow::{bail, Context};
use clap::Subcommand;
use std::time::Duration;
use torus_meta::cluster::{parse_snapshot_ref, Cluster, ClusterError};
use torus_types::format_size;
use torus_volume::{ManagerOptions, VolumeManager};

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot now (instant: no data is copied), also while the
    /// volume is open for writing: it holds every write acknowledged before it.
    Create {
        /// VOL@SNAP
        snapshot: String,
        /// How long to wait for the volume's writer (another process) to take it.
        #[arg(long, default_value = "30s", value_parser = crate::wait::parse_duration)]
        timeout: Duration,
    },
    /// List snapshots (of one volume, or all).
    #[command(alias = "ls")]
    List {
        volume: Option<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a snapshot. What only it used is freed (now, or by the nodes
    /// in the background); clones of it keep what they read through.
    #[command(alias = "rm")]
    Delete {
        /// VOL@SNAP
        snapshot: String,
    },
    /// Make the volume read as the snapshot again (and take its size). The
    /// snapshot stays. Refused while the volume is open for writing.
    Restore {
        /// VOL@SNAP
        snapshot: String,
    },
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a Unix time.
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

fn manager(cluster: &Cluster) -> VolumeManager {
    // A repairer holding the volume hands it over within seconds.
    VolumeManager::new(
        cluster.clone(),
        ManagerOptions {
            lock_wait: Duration::from_secs(30),
            holder: format!("torusctl on {} (pid {})", torus_volume::holder::hostname(), std::process::id()),
            // Snapshots need no key: no data is read.
            without_key: true,
            ..Default::default()
        },
    )
}

pub async fn run(cluster: &Cluster, cmd: SnapshotCmd) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Create { snapshot, timeout } => {
            let (vol, name) = parse_snapshot_ref(&snapshot)?;
            let m = manager(cluster);
            let res = m.snapshot(&vol, &name, timeout).await;
            m.close_all().await;
            let s = res.with_context(|| format!("taking snapshot {snapshot}"))?;
            println!("took snapshot {} ({})", s.full_name(), format_size(s.size));
        }
        SnapshotCmd::List { volume, output } => {
            let snaps = cluster.snapshots(volume.as_deref()).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&snaps)?),
                Output::Table => {
                    println!("{:<40} {:<20} {:>10}", "SNAPSHOT", "CREATED (UTC)", "SIZE");
                    for s in snaps {
                        println!("{:<40} {:<20} {:>10}", s.full_name(), utc(s.created), format_size(s.size));
                    }
                }
            }
        }
        SnapshotCmd::Delete { snapshot } => {
            let (vol, name) = parse_snapshot_ref(&snapshot)?;
            let snap = cluster.delete_snapshot(&vol, &name).await?;
            println!("deleted snapshot {snapshot}");
            // What newer layers replaced is freed now; a layer nobody reads by the nodes' collector.
            let m = manager(cluster);
            match m.reclaim_snapshot(&snap).await {
                Ok(r) if r.blocks > 0 => println!("freed {} it held on each copy", format_size(r.blocks * 4096)),
                Ok(r) => {
                    if let Some(why) = r.skipped {
                        eprintln!("note: the blocks only it used stay stored for now: {why}");
                    }
                }
                Err(e) => eprintln!("warning: could not free the blocks it held now: {e}"),
            }
            m.close_all().await;
        }
        SnapshotCmd::Restore { snapshot } => {
            let (vol, name) = parse_snapshot_ref(&snapshot)?;
            match cluster.restore_snapshot(&vol, &name).await {
                Ok(v) => println!("volume {vol} reads as snapshot {snapshot} again ({})", format_size(v.size)),
                Err(ClusterError::VolumeLocked { holder, .. }) => {
                    bail!("volume {vol} is open for writing by {holder}: restoring is refused while it is in use")
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

pub async fn clone(cluster: &Cluster, snapshot: &str, name: &str) -> anyhow::Result<()> {
    let (vol, snap) = parse_snapshot_ref(snapshot)?;
    let v = cluster.clone_volume(&vol, &snap, name).await?;
    println!("created volume {name} ({}) from snapshot {snapshot}", format_size(v.size));
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_796_300_000), "2026-12-03 12:13:20");
    }
}
