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
