//! The typed schema on the in-memory backend: volumes, locks and epochs, the ring.

use std::sync::Arc;
use std::time::Duration;
use torus_meta::cluster::{Cluster, ClusterConfig, ClusterError, VolumeLock};
use torus_meta::{MemStore, MetadataStore};

async fn cluster() -> Cluster {
    let c = Cluster::new(Arc::new(MemStore::new()) as Arc<dyn MetadataStore>);
    c.init(&ClusterConfig {
        extent_size: 4 << 20,
        replication: 2,
        format: 1,
        down_out_secs: torus_meta::cluster::DEFAULT_DOWN_OUT_SECS,
    })
    .await
    .unwrap();
    c
}

#[tokio::test]
async fn init_twice_is_refused() {
    let c = cluster().await;
    let again = c
        .init(&ClusterConfig {
            extent_size: 4 << 20,
            replication: 2,
            format: 1,
            down_out_secs: torus_meta::cluster::DEFAULT_DOWN_OUT_SECS,
        })
        .await;
    assert!(matches!(again, Err(ClusterError::AlreadyInitialized { .. })));
    let bad = Cluster::new(Arc::new(MemStore::new()) as Arc<dyn MetadataStore>)
        .init(&ClusterConfig {
            extent_size: 1000,
            replication: 2,
            format: 1,
            down_out_secs: torus_meta::cluster::DEFAULT_DOWN_OUT_SECS,
        })
        .await;
    assert!(matches!(bad, Err(ClusterError::InvalidConfig { .. })));
}

#[tokio::test]
async fn volumes_get_fresh_ids_and_names_are_unique() {
    let c = cluster().await;
    let a = c.create_volume("a", 1 << 30, None).await.unwrap();
    let b = c.create_volume("b", 1 << 20, Some(3)).await.unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!(b.replication, 3);
    assert!(matches!(c.create_volume("a", 1 << 20, None).await, Err(ClusterError::VolumeExists { .. })));
    c.delete_volume("a").await.unwrap();
    let a2 = c.create_volume("a", 1 << 20, None).await.unwrap();
    assert!(a2.id > b.id, "ids are never reused");
    for bad in ["", "-x", ".x", "a/b", "a b", &"x".repeat(129)] {
        assert!(
            matches!(c.create_volume(bad, 1 << 20, None).await, Err(ClusterError::InvalidVolumeName { .. })),
            "{bad:?}"
        );
    }
    for size in [0, 511, 1000] {
        assert!(matches!(c.create_volume("s", size, None).await, Err(ClusterError::InvalidVolumeSize { .. })));
    }
    assert_eq!(c.volumes().await.unwrap().len(), 2, "failed creates left nothing behind");
}

#[tokio::test]
async fn locks_are_exclusive_and_epochs_grow() {
    let c = cluster().await;
    let v = c.create_volume("v", 1 << 20, None).await.unwrap();
    let lock = |holder: &str, lease| VolumeLock {
        holder: holder.into(),
        lease,
        ring_version: 0,
        process: None,
        repair: false,
    };
    let l1 = c.store().grant_lease(Duration::from_secs(1)).await.unwrap();
    let e1 = c.lock_volume(&v, &lock("first", l1.id)).await.unwrap();
    let l2 = c.store().grant_lease(Duration::from_secs(5)).await.unwrap();
    match c.lock_volume(&v, &lock("second", l2.id)).await {
        Err(ClusterError::VolumeLocked { holder, .. }) => assert_eq!(holder, "first"),
        other => panic!("second writer got {other:?}"),
    }
    assert!(matches!(c.delete_volume("v").await, Err(ClusterError::VolumeLocked { .. })));
    // The first holder's lease lapses: the lock goes with it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let e2 = c.lock_volume(&v, &lock("second", l2.id)).await.unwrap();
    assert!(e2 > e1, "epochs grow from one writer to the next");
    c.unlock_volume(v.id, l2.id).await.unwrap();
    assert!(c.volume_lock(v.id).await.unwrap().is_none());

    // A dead holder's lock is broken by its epoch only: a later lock is left alone.
    let l3 = c.store().grant_lease(Duration::from_secs(30)).await.unwrap();
    let e3 = c.lock_volume(&v, &lock("third", l3.id)).await.unwrap();
    assert!(!c.break_lock(v.id, e2, l2.id).await.unwrap(), "an older epoch breaks nothing");
    assert!(c.break_lock(v.id, e3, l3.id).await.unwrap());
    assert!(c.volume_lock(v.id).await.unwrap().is_none());
    // The wanted mark lives on the waiter's lease.
    let l4 = c.store().grant_lease(Duration::from_secs(30)).await.unwrap();
    assert!(!c.volume_wanted(v.id).await.unwrap());
    c.want_volume(v.id, "waiter", l4.id).await.unwrap();
    assert!(c.volume_wanted(v.id).await.unwrap());
    c.store().revoke_lease(l4.id).await.unwrap();
    assert!(!c.volume_wanted(v.id).await.unwrap());
}

/// Ring changes asked for during a move queue up, start together as one move
/// when the move and its clean-up end, and are checked against the ring as it
/// will be; a node that is down leaves the move under way at once.
#[tokio::test]
async fn ring_changes_during_a_move_queue_and_start_together() {
    use torus_meta::cluster::{PeerInfo, QueuedChange};
    use torus_types::NodeId;
    let c = cluster().await;
    c.create_volume("v", 1 << 30, Some(2)).await.unwrap();
    let lease = c.store().grant_lease(Duration::from_secs(60)).await.unwrap();
    let peers: Vec<PeerInfo> =
        (0..6).map(|i| PeerInfo::bare(NodeId::random(), &format!("n{i}:1"), 1 << 30, "t")).collect();
    for p in &peers[..5] {
        c.register_peer(p, lease.id).await.unwrap();
    }
    let ids: Vec<NodeId> = peers.iter().map(|p| p.id).collect();
    // Three members, then a fourth: a move (previous = the three).
    let (ring, _) = c.add_to_ring(&peers[..3]).await.unwrap();
    assert!(!ring.moving() && ring.queued.is_empty(), "the first members move nothing");
    let (ring, added) = c.add_to_ring(&peers[3..4]).await.unwrap();
    assert_eq!(added, vec![ids[3]]);
    assert!(ring.moving() && ring.queued.is_empty());
    let moving_version = ring.version;

    // During the move: remove a live member, add another node, mark one full: all queued.
    let ring = c.remove_from_ring(ids[0], false).await.unwrap();
    assert_eq!(ring.queued, vec![QueuedChange::Remove { id: ids[0] }]);
    assert!(ring.contains(ids[0]), "a live member stays until the move ends");
    let (ring, added) = c.add_to_ring(&peers[4..5]).await.unwrap();
    assert_eq!(added, vec![ids[4]]);
    assert_eq!(ring.queued.len(), 2);
    let ring = c.set_full(ids[1], true).await.unwrap();
    assert_eq!(ring.queued.len(), 3);
    assert_eq!(ring.queued[2].to_string(), format!("mark {} full", ids[1]));
    // Asked again: nothing new (idempotent), and checked against the projected ring.
    assert_eq!(c.remove_from_ring(ids[0], false).await.unwrap().queued.len(), 3);
    assert_eq!(c.add_to_ring(&peers[4..5]).await.unwrap().1, Vec::<NodeId>::new());
    assert!(matches!(c.remove_from_ring(ids[5], false).await, Err(ClusterError::Refused { .. })));
    let projected: Vec<NodeId> = ring.projected().iter().map(|m| m.id).collect();
    assert_eq!(projected, vec![ids[1], ids[2], ids[3], ids[4]]);

    // A node that is down (no lease) leaves the move under way at once.
    let dead = &peers[5];
    let lease2 = c.store().grant_lease(Duration::from_secs(60)).await.unwrap();
    c.register_peer(dead, lease2.id).await.unwrap();
    let (ring, _) = c.add_to_ring(std::slice::from_ref(dead)).await.unwrap();
    assert_eq!(ring.queued.len(), 4, "queued while alive");
    c.store().revoke_lease(lease2.id).await.unwrap();
    let ring = c.remove_from_ring(dead.id, false).await.unwrap();
    assert!(ring.projected().iter().all(|m| m.id != dead.id), "a queued add of a dead node is undone");

    // The move ends: every member collects; the last one starts the queue as one move.
    assert!(c.finish_rebalance(ring.version, &[]).await.unwrap());
    let (ring, _) = c.ring().await.unwrap();
    assert!(!ring.moving() && ring.collecting.len() == 4 && ring.queued.len() == 5);
    for id in &ids[..4] {
        c.collected(*id).await.unwrap();
    }
    let (ring, _) = c.ring().await.unwrap();
    assert!(ring.moving() && ring.queued.is_empty() && ring.version > moving_version);
    let prev: Vec<NodeId> = ring.previous.as_ref().unwrap().iter().map(|m| m.id).collect();
    assert_eq!(prev, vec![ids[0], ids[1], ids[2], ids[3]]);
    let now: Vec<(NodeId, bool)> = ring.members.iter().map(|m| (m.id, m.full)).collect();
    assert_eq!(now, vec![(ids[1], true), (ids[2], false), (ids[3], false), (ids[4], false)]);

    // A member dies during this move: taken out of the move's target at once
    // (same previous, new version), not queued behind a move that could not end.
    c.store().revoke_lease(lease.id).await.unwrap();
    let before = ring.version;
    let ring = c.remove_from_ring(ids[4], false).await.unwrap();
    assert!(ring.queued.is_empty() && !ring.contains(ids[4]) && ring.version == before + 1);
    assert_eq!(ring.previous.as_ref().unwrap().len(), 4, "the move still starts from the same members");
    // Fewer members than the volumes' replication is refused without --force.
    let ring = c.remove_from_ring(ids[2], false).await.unwrap();
    assert!(ring.queued.is_empty() && ring.members.len() == 2, "ids[2] is down too: taken out at once");
    assert!(matches!(c.remove_from_ring(ids[3], false).await, Err(ClusterError::Refused { .. })));
}
