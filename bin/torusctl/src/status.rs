//! `torusctl status`: the cluster's health at a glance (judged by
//! `torus_meta::cluster::health`, which `wait` and the nodes' console use too).

use crate::Output;
use torus_meta::cluster::{Cluster, Rebalance, StatusReport};
use torus_types::format_size;

pub async fn run(cluster: &Cluster, output: Output) -> anyhow::Result<()> {
    let r = cluster.status_report().await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Output::Table => print_table(&r),
    }
    Ok(())
}

fn print_table(r: &StatusReport) {
    println!("health:      {}", r.health);
    println!(
        "ring:        version {}, {} members, default replication {}",
        r.ring_version, r.ring_members, r.default_replication
    );
    println!(
        "nodes:       {} up, {} down, {} registered but not in the ring",
        r.nodes_up,
        r.nodes_down.len(),
        r.nodes_registered_not_in_ring
    );
    for id in &r.nodes_down {
        println!("             down: {id}");
    }
    for id in &r.nodes_full {
        println!("             full: {id} (keeps what it holds; new extents go to other nodes)");
    }
    println!("extents:     {} with a replica on a down node", r.extents_with_a_replica_down);
    println!(
        "replicas:    {} extent copies to catch up (on {} node(s)); {} extents being written",
        r.extent_copies_to_catch_up, r.nodes_behind, r.extents_being_written
    );
    for rep in &r.repairing {
        println!("             repairing: volume {} ({} copies left) by {}", rep.volume, rep.copies_left, rep.by);
    }
    println!(
        "capacity:    {} used of {} ({} free)",
        format_size(r.used_bytes),
        format_size(r.capacity_bytes),
        format_size(r.capacity_bytes.saturating_sub(r.used_bytes))
    );
    println!("volumes:     {} ({} provisioned)", r.volumes, format_size(r.provisioned_bytes));
    match &r.rebalance {
        Rebalance::Moving { extents_done, extents_total, bytes_copied, nodes_finished, nodes } => println!(
            "rebalance:   {extents_done}/{extents_total} extents moved ({} copied); {nodes_finished} of {nodes} nodes finished",
            format_size(*bytes_copied)
        ),
        Rebalance::Finishing { nodes_deleting } => {
            println!("rebalance:   finishing: {nodes_deleting} node(s) deleting copies that moved away")
        }
        Rebalance::None => println!("rebalance:   none in progress"),
    }
    if !r.queued.is_empty() {
        println!("queued:      {} ring change(s), to start together when this one ends:", r.queued.len());
        for change in &r.queued {
            println!("             {change}");
        }
    }
}
