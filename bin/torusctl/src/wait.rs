//! `torusctl wait healthy|rebalanced|caught-up [--timeout 5m]`: for scripts.
//! Exits 0 once the condition holds; on timeout, non-zero with the reason.

use anyhow::bail;
use clap::ValueEnum;
use std::time::{Duration, Instant};
use torus_meta::cluster::Cluster;
use torus_meta::cluster::Health;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Condition {
    /// Every ring member up, no copies to catch up, no data moving.
    Healthy,
    /// No data moving between nodes, and moved copies deleted.
    Rebalanced,
    /// No extent copies left to catch up.
    CaughtUp,
}

/// A duration: `90` (seconds), `30s`, `5m`, `2h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 5m, 2h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m or h)")),
    };
    Ok(Duration::from_secs(secs))
}

fn unmet(h: &Health, c: Condition) -> Option<String> {
    match c {
        Condition::Healthy => h.unhealthy(),
        Condition::Rebalanced => h.moving_reason(),
        Condition::CaughtUp => (h.to_catch_up > 0).then(|| format!("{} extent copies to catch up", h.to_catch_up)),
    }
}

pub async fn run(cluster: &Cluster, condition: Condition, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut said = String::new();
    loop {
        let why = match Health::read(cluster).await {
            Ok(h) => unmet(&h, condition),
            Err(e) => Some(format!("cannot read the cluster's state: {e:#}")),
        };
        let Some(why) = why else {
            println!("{}: reached after {:.1} s", condition_name(condition), started.elapsed().as_secs_f64());
            return Ok(());
        };
        if started.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {}: {why}", condition_name(condition));
        }
        if why != said {
            eprintln!("waiting for {}: {why}", condition_name(condition));
            said = why;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn condition_name(c: Condition) -> &'static str {
    match c {
        Condition::Healthy => "healthy",
        Condition::Rebalanced => "rebalanced",
        Condition::CaughtUp => "caught-up",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
    }
}
