//! The metadata conformance suite, run against the in-memory backend and a
//! real etcd server (TORUS_TEST_ETCD, or a private one the test starts).

mod cluster;

use std::time::{Duration, Instant};
use torus_meta::{conformance, EtcdStore, MemStore, MetaError, MetadataStore};
use torus_testkit::{unique_prefix, Etcd};

async fn on_mem(check: &str) {
    conformance::run(check, &MemStore::new()).await;
}

async fn on_etcd(check: &str) {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(&etcd.endpoint, &unique_prefix()).await.expect("connect to etcd");
    conformance::run(check, &store).await;
    let _ = store.delete_prefix("").await;
}

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {
        mod mem { $( #[tokio::test] async fn $name() { super::on_mem(stringify!($name)).await } )* }
        mod etcd { $( #[tokio::test] async fn $name() { super::on_etcd(stringify!($name)).await } )* }
    };
}

conformance_tests!(
    get_put_delete,
    list_is_prefix_ranged_and_ordered,
    revisions,
    txn_compare_and_swap,
    leases_expire_and_delete_keys,
    keep_alive_extends_and_revoke_deletes,
    watch_sees_puts_and_deletes,
    watch_from_revision_replays,
    list_at_then_watch_misses_nothing,
);

#[test]
fn every_check_has_a_test() {
    // The macro list above must name every check of the suite.
    let src = include_str!("main.rs");
    for check in conformance::CHECKS {
        assert!(src.contains(&format!("    {check},")), "conformance check {check} is not run");
    }
}

#[tokio::test]
async fn unreachable_etcd_fails_fast_naming_the_endpoint() {
    let port = torus_testkit::free_port();
    let endpoint = format!("127.0.0.1:{port}");
    let start = Instant::now();
    let err = match EtcdStore::connect(&endpoint, "/torus").await {
        Ok(_) => panic!("connected to nothing"),
        Err(e) => e,
    };
    assert!(start.elapsed() < Duration::from_secs(15), "took {:?}", start.elapsed());
    assert!(matches!(err, MetaError::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains(&endpoint), "error does not name the endpoint: {err}");
}
