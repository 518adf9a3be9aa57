//! The conformance suite every `MetadataStore` backend must pass.
//!
//! Each check takes a fresh, empty store (for etcd: a unique prefix) and
//! panics with a message on the first deviation from etcd's semantics. The
//! crate's integration tests run every check against `MemStore` and against a
//! real etcd server, so the in-memory backend cannot drift.

use crate::store::*;
use crate::MetaError;
use std::time::Duration;
use tokio::time::timeout;

/// Every check, by name, so that test harnesses can run them one by one.
pub const CHECKS: &[&str] = &[
    "get_put_delete",
    "list_is_prefix_ranged_and_ordered",
    "revisions",
    "txn_compare_and_swap",
    "leases_expire_and_delete_keys",
    "keep_alive_extends_and_revoke_deletes",
    "watch_sees_puts_and_deletes",
    "watch_from_revision_replays",
    "list_at_then_watch_misses_nothing",
];

/// Runs one check by name.
pub async fn run(name: &str, s: &dyn MetadataStore) {
    match name {
        "get_put_delete" => get_put_delete(s).await,
        "list_is_prefix_ranged_and_ordered" => list_is_prefix_ranged_and_ordered(s).await,
        "revisions" => revisions(s).await,
        "txn_compare_and_swap" => txn_compare_and_swap(s).await,
        "leases_expire_and_delete_keys" => leases_expire_and_delete_keys(s).await,
        "keep_alive_extends_and_revoke_deletes" => keep_alive_extends_and_revoke_deletes(s).await,
        "watch_sees_puts_and_deletes" => watch_sees_puts_and_deletes(s).await,
        "watch_from_revision_replays" => watch_from_revision_replays(s).await,
        "list_at_then_watch_misses_nothing" => list_at_then_watch_misses_nothing(s).await,
        other => panic!("no conformance check named {other}"),
    }
}

pub async fn get_put_delete(s: &dyn MetadataStore) {
    assert_eq!(s.get("a").await.expect("get"), None, "a fresh store is empty");
    s.put("a", b"1".to_vec(), None).await.expect("put");
    let kv = s.get("a").await.expect("get").expect("a exists after put");
    assert_eq!(kv.key, "a");
    assert_eq!(kv.value, b"1");
    assert_eq!(kv.version, 1);
    assert_eq!(kv.lease, 0);
    s.put("a", b"2".to_vec(), None).await.expect("put");
    let kv2 = s.get("a").await.expect("get").expect("a exists");
    assert_eq!(kv2.value, b"2");
    assert_eq!(kv2.version, 2);
    assert_eq!(kv2.create_revision, kv.create_revision, "overwrite keeps create revision");
    assert!(kv2.mod_revision > kv.mod_revision);
    assert!(s.delete("a").await.expect("delete"));
    assert!(!s.delete("a").await.expect("delete"), "deleting a missing key reports false");
    assert_eq!(s.get("a").await.expect("get"), None);
}

pub async fn list_is_prefix_ranged_and_ordered(s: &dyn MetadataStore) {
    for k in ["vol/b", "vol/a", "vol/c", "volume", "vo", "other/x"] {
        s.put(k, k.as_bytes().to_vec(), None).await.expect("put");
    }
    let keys: Vec<String> = s.list("vol/").await.expect("list").into_iter().map(|kv| kv.key).collect();
    assert_eq!(keys, ["vol/a", "vol/b", "vol/c"]);
    let keys: Vec<String> = s.list("vol").await.expect("list").into_iter().map(|kv| kv.key).collect();
    assert_eq!(keys, ["vol/a", "vol/b", "vol/c", "volume"]);
    assert_eq!(s.delete_prefix("vol/").await.expect("delete_prefix"), 3);
    assert!(s.list("vol/").await.expect("list").is_empty());
    assert_eq!(s.list("").await.expect("list").len(), 3, "the rest survives");
}

pub async fn revisions(s: &dyn MetadataStore) {
    let r1 = s.put("r", b"1".to_vec(), None).await.expect("put");
    let r2 = s.put("q", b"1".to_vec(), None).await.expect("put");
    assert!(r2 > r1, "revisions increase across keys");
    let q = s.get("q").await.expect("get").expect("q");
    assert_eq!(q.mod_revision, r2);
    assert_eq!(q.create_revision, r2);
}

pub async fn txn_compare_and_swap(s: &dyn MetadataStore) {
    // Create-if-absent.
    let t = Txn::when(vec![Compare::exists("lock", false)]).and_then(vec![TxnOp::put("lock", "me")]);
    let out = s.txn(t.clone()).await.expect("txn");
    assert!(out.succeeded);
    let kv = s.get("lock").await.expect("get").expect("lock");
    assert_eq!(kv.mod_revision, out.revision, "txn revision is the write's revision");
    assert!(!s.txn(t).await.expect("txn").succeeded, "second create-if-absent fails");
    // Failure branch runs when a compare fails.
    let t = Txn::when(vec![Compare::value("lock", "you")])
        .and_then(vec![TxnOp::delete("lock")])
        .or_else(vec![TxnOp::put("seen", "1")]);
    assert!(!s.txn(t).await.expect("txn").succeeded);
    assert!(s.get("lock").await.expect("get").is_some());
    assert!(s.get("seen").await.expect("get").is_some(), "failure ops are applied");
    // Mod-revision CAS.
    let stale =
        Txn::when(vec![Compare::mod_revision("lock", kv.mod_revision + 1000)]).and_then(vec![TxnOp::put("lock", "x")]);
    assert!(!s.txn(stale).await.expect("txn").succeeded);
    let fresh = Txn::when(vec![Compare::mod_revision("lock", kv.mod_revision), Compare::exists("seen", true)])
        .and_then(vec![TxnOp::put("lock", "y"), TxnOp::delete("seen")]);
    assert!(s.txn(fresh).await.expect("txn").succeeded);
    assert_eq!(s.get("lock").await.expect("get").expect("lock").value, b"y");
    assert!(s.get("seen").await.expect("get").is_none(), "all success ops applied together");
}

pub async fn leases_expire_and_delete_keys(s: &dyn MetadataStore) {
    let lease = s.grant_lease(Duration::from_secs(1)).await.expect("grant");
    assert!(lease.ttl >= Duration::from_secs(1));
    s.put("eph", b"x".to_vec(), Some(lease.id)).await.expect("put leased");
    assert_eq!(s.get("eph").await.expect("get").expect("eph").lease, lease.id);
    // etcd's lease expiry runs at a coarse granularity: allow several seconds.
    let gone = timeout(Duration::from_secs(10), async {
        loop {
            if s.get("eph").await.expect("get").is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "a key on an expired lease is deleted");
    let ka = s.keep_alive(lease.id).await;
    assert!(matches!(ka, Err(MetaError::LeaseNotFound { .. })), "keep-alive of an expired lease: {ka:?}");
    assert!(matches!(s.put("eph", b"y".to_vec(), Some(lease.id)).await, Err(MetaError::LeaseNotFound { .. })));
}

pub async fn keep_alive_extends_and_revoke_deletes(s: &dyn MetadataStore) {
    let lease = s.grant_lease(Duration::from_secs(2)).await.expect("grant");
    s.put("held", b"x".to_vec(), Some(lease.id)).await.expect("put");
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ttl = s.keep_alive(lease.id).await.expect("keep alive");
        assert!(ttl >= Duration::from_secs(1));
    }
    assert!(s.get("held").await.expect("get").is_some(), "kept-alive lease keeps its keys past the TTL");
    s.revoke_lease(lease.id).await.expect("revoke");
    assert!(s.get("held").await.expect("get").is_none(), "revoke deletes the keys at once");
}

async fn next(w: &mut Watch) -> WatchEvent {
    timeout(Duration::from_secs(10), w.recv())
        .await
        .expect("watch event within 10 s")
        .expect("watch still open")
        .expect("watch event is not an error")
}

pub async fn watch_sees_puts_and_deletes(s: &dyn MetadataStore) {
    let mut w = s.watch_prefix("w/", None).await.expect("watch");
    s.put("x/ignored", b"0".to_vec(), None).await.expect("put");
    let rev = s.put("w/1", b"a".to_vec(), None).await.expect("put");
    let ev = next(&mut w).await;
    assert_eq!(ev.kind, WatchEventKind::Put);
    assert_eq!(ev.kv.key, "w/1");
    assert_eq!(ev.kv.value, b"a");
    assert_eq!(ev.kv.mod_revision, rev);
    s.delete("w/1").await.expect("delete");
    let ev = next(&mut w).await;
    assert_eq!(ev.kind, WatchEventKind::Delete);
    assert_eq!(ev.kv.key, "w/1");
    // A leased key's expiry shows as a delete.
    let lease = s.grant_lease(Duration::from_secs(1)).await.expect("grant");
    s.put("w/2", b"b".to_vec(), Some(lease.id)).await.expect("put");
    assert_eq!(next(&mut w).await.kind, WatchEventKind::Put);
    s.revoke_lease(lease.id).await.expect("revoke");
    let ev = next(&mut w).await;
    assert_eq!((ev.kind, ev.kv.key.as_str()), (WatchEventKind::Delete, "w/2"));
}

pub async fn watch_from_revision_replays(s: &dyn MetadataStore) {
    let r1 = s.put("h/1", b"a".to_vec(), None).await.expect("put");
    s.put("h/2", b"b".to_vec(), None).await.expect("put");
    let mut w = s.watch_prefix("h/", Some(r1)).await.expect("watch");
    assert_eq!(next(&mut w).await.kv.key, "h/1");
    assert_eq!(next(&mut w).await.kv.key, "h/2");
    s.put("h/3", b"c".to_vec(), None).await.expect("put");
    assert_eq!(next(&mut w).await.kv.key, "h/3");
}

/// A list's revision is the store's at the read: a watch from the next one
/// starts with the first change after the list, and nothing before it.
pub async fn list_at_then_watch_misses_nothing(s: &dyn MetadataStore) {
    s.put("l/1", b"a".to_vec(), None).await.expect("put");
    let r2 = s.put("l/2", b"b".to_vec(), None).await.expect("put");
    let (kvs, rev) = s.list_at("l/").await.expect("list_at");
    assert_eq!(kvs.len(), 2);
    assert!(rev >= r2, "the list's revision {rev} is at least the last put's {r2}");
    let mut w = s.watch_prefix("l/", Some(rev + 1)).await.expect("watch");
    s.delete("l/1").await.expect("delete");
    let ev = next(&mut w).await;
    assert_eq!((ev.kind, ev.kv.key.as_str()), (WatchEventKind::Delete, "l/1"), "the first event is the delete");
}
