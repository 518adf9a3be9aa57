//! Bad input gets a clear error and changes nothing: malformed NBD handshakes
//! and requests, bad CLI arguments, an unreachable etcd, a second writer.

use crate::text;
use std::time::{Duration, Instant};
use torus_testkit::nbd::Raw;
use torus_testkit::{free_port, random_bytes, wait_until, Cluster};

const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

/// Opens `name` on a fresh raw connection (fixed newstyle, no zeroes).
fn open(addr: &str, name: &str) -> Raw {
    Raw::open(addr, name, "open")
}

#[test]
fn malformed_handshakes_are_refused() {
    let c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "v", "16MiB"]);
    let blk = c.start_blk(&[]);

    // Unknown client flags: the server hangs up.
    let (mut r, flags) = Raw::connect(&blk.addr);
    assert_eq!(flags & 3, 3, "server offers FIXED_NEWSTYLE and NO_ZEROES");
    r.send(&0xffff_0000u32.to_be_bytes());
    assert!(r.closed(), "unknown client flags must end the connection");

    // Wrong option magic: the server hangs up.
    let (mut r, _) = Raw::connect(&blk.addr);
    r.send(&3u32.to_be_bytes());
    r.send(&[0xde; 16]);
    assert!(r.closed(), "bad option magic must end the connection");

    // Unknown option, LIST with data, malformed INFO, unknown export: error replies, and the session goes on.
    let (mut r, _) = Raw::connect(&blk.addr);
    r.send(&3u32.to_be_bytes());
    r.option(99, b"junk");
    assert_eq!(r.option_reply().1, REP_ERR_UNSUP);
    r.option(3, b"x");
    assert_eq!(r.option_reply().1, REP_ERR_INVALID);
    r.option(6, &[0, 0, 0, 200, b'v']);
    assert_eq!(r.option_reply().1, REP_ERR_INVALID);
    match r.go("no-such-volume") {
        Err((kind, msg)) => {
            assert_eq!(kind, REP_ERR_UNKNOWN);
            assert!(msg.contains("no-such-volume"), "message names the export: {msg}");
        }
        Ok(_) => panic!("opened a volume that does not exist"),
    }
    let (size, _) = r.go("v").expect("a valid GO after errors");
    assert_eq!(size, 16 << 20);

    // An option too long to read: the server says so and hangs up.
    let (mut r, _) = Raw::connect(&blk.addr);
    r.send(&3u32.to_be_bytes());
    let mut b = torus_testkit::nbd::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&(1u32 << 30).to_be_bytes());
    r.send(&b);
    assert_eq!(r.option_reply().1, (1 << 31) + 9);
    assert!(r.closed());
}

#[test]
fn malformed_requests_get_errnos_and_change_nothing() {
    let c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "v", "16MiB"]);
    let blk = c.start_blk(&[]);
    let mut r = open(&blk.addr, "v");
    let data = random_bytes(8192, 9);
    r.request(0, 1, 1, 4096, 8192, &data);
    assert_eq!(r.reply(0).0, 0);
    let size = 16u64 << 20;

    let cases: &[(&str, u16, u64, u32, u32)] = &[
        ("read past the end", 0, size - 4096, 8192, EINVAL),
        ("read at an absurd offset", 0, u64::MAX - 10, 100, EINVAL),
        ("read longer than the maximum", 0, 0, 64 << 20, EOVERFLOW),
        ("trim past the end", 4, size, 4096, EINVAL),
        ("write-zeroes past the end", 6, size - 10, 4096, ENOSPC),
        ("unknown command", 42, 0, 0, EINVAL),
        ("block status (not negotiated)", 7, 0, 4096, EINVAL),
    ];
    for (i, (what, kind, off, len, errno)) in cases.iter().enumerate() {
        r.request(0, *kind, 100 + i as u64, *off, *len, &[]);
        let (err, cookie, _) = r.reply(0);
        assert_eq!(cookie, 100 + i as u64);
        assert_eq!(err, *errno, "{what}");
    }
    // A write past the end: its payload is consumed and refused.
    r.request(0, 1, 200, size - 100, 4096, &random_bytes(4096, 1));
    assert_eq!(r.reply(0).0, ENOSPC, "write past the end");
    // Nothing changed.
    r.request(0, 0, 300, 4096, 8192, &[]);
    let (err, _, got) = r.reply(8192);
    assert_eq!(err, 0);
    assert!(got == data, "data changed after bad requests");
    // Bad request magic: the connection ends, the server goes on.
    r.send(&[0u8; 28]);
    assert!(r.closed());
    let mut r = open(&blk.addr, "v");
    r.request(0, 0, 1, 4096, 8192, &[]);
    let (err, _, got) = r.reply(8192);
    assert_eq!(err, 0);
    assert!(got == data);
    // A write larger than the advertised maximum: EOVERFLOW and the connection ends.
    r.request(0, 1, 2, 0, 64 << 20, &[]);
    assert_eq!(r.reply(0).0, EOVERFLOW);
    assert!(r.closed());
}

#[test]
fn read_only_server_refuses_writes() {
    let c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "ro", "8MiB"]);
    let blk = c.start_blk(&["--read-only"]);
    let mut r = open(&blk.addr, "ro");
    r.request(0, 1, 1, 0, 4096, &random_bytes(4096, 3));
    assert_eq!(r.reply(0).0, EPERM);
    r.request(0, 0, 2, 0, 4096, &[]);
    let (err, _, got) = r.reply(4096);
    assert_eq!(err, 0);
    assert!(got.iter().all(|b| *b == 0));
}

#[test]
fn second_writer_is_refused_until_the_first_is_gone() {
    let c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "lk", "8MiB"]);
    let mut first = c.start_blk(&["--lease-ttl", "2"]);
    let second = c.start_blk(&["--lease-ttl", "2"]);

    let holder = open(&first.addr, "lk");
    let (mut r, _) = Raw::connect(&second.addr);
    r.send(&3u32.to_be_bytes());
    match r.go("lk") {
        Err((kind, msg)) => {
            assert_eq!(kind, REP_ERR_POLICY);
            assert!(msg.contains("held for writing by torusblk"), "clear message: {msg}");
        }
        Ok(_) => panic!("a second writer opened a held volume"),
    }
    // A second connection to the *same* server shares the volume.
    let _same = open(&first.addr, "lk");
    let list = c.ctl_ok(&["volume", "list"]);
    assert!(list.contains("epoch"), "volume list shows the writer: {list}");
    let del = c.ctl(&["volume", "delete", "lk"]);
    assert!(
        !del.status.success() && text(&del).contains("held for writing"),
        "delete of a held volume: {}",
        text(&del)
    );
    drop(holder);
    drop(_same);

    // Closing every connection releases the lock at once.
    wait_until(Duration::from_secs(10), "lock release after the last close", || {
        let (mut r, _) = Raw::connect(&second.addr);
        r.send(&3u32.to_be_bytes());
        r.go("lk").is_ok()
    });

    // The holder dies (kill -9): the lock lapses with its lease.
    let _held = open(&second.addr, "lk");
    let third = c.start_blk(&["--lease-ttl", "2"]);
    let mut second = second;
    second.proc.kill9();
    let start = Instant::now();
    wait_until(Duration::from_secs(20), "lock lapse after the holder was killed", || {
        let (mut r, _) = Raw::connect(&third.addr);
        r.send(&3u32.to_be_bytes());
        r.go("lk").is_ok()
    });
    assert!(start.elapsed() < Duration::from_secs(15), "lock held {:?} after its holder died", start.elapsed());
    first.proc.terminate();
}

#[test]
fn cli_rejects_bad_sizes_and_names_and_changes_nothing() {
    let c = Cluster::start(1, 1);
    c.ctl_ok(&["volume", "create-block", "keep", "1GiB"]);
    let before = c.ctl_ok(&["volume", "list", "-o", "json"]);
    let cases: &[(&[&str], &str)] = &[
        (&["volume", "create-block", "a", "12XB"], "unknown unit"),
        (&["volume", "create-block", "a", "abc"], "not a number"),
        (&["volume", "create-block", "--", "a", "-5G"], "not a number"),
        (&["volume", "create-block", "a", "0"], "positive multiple of 512"),
        (&["volume", "create-block", "a", "1000"], "positive multiple of 512"),
        (&["volume", "create-block", "a", "99999999999P"], "does not fit"),
        (&["volume", "create-block", "a/b", "1G"], "not allowed"),
        (&["volume", "create-block", "", "1G"], "empty"),
        (&["volume", "create-block", "keep", "1G"], "already exists"),
        (&["volume", "create-block", "r", "1G", "--replication", "0"], "between 1 and 16"),
        (&["volume", "delete", "nope"], "does not exist"),
        (&["peer", "add", "10.255.255.1:1"], "not known"),
        (&["init"], "already initialised"),
    ];
    for (args, msg) in cases {
        let out = c.ctl(args);
        let t = text(&out);
        assert!(!out.status.success(), "torusctl {args:?} succeeded: {t}");
        assert!(t.contains(msg), "torusctl {args:?}: message {t:?} lacks {msg:?}");
        assert!(t.lines().count() <= 4, "torusctl {args:?}: error is not short: {t}");
    }
    assert_eq!(c.ctl_ok(&["volume", "list", "-o", "json"]), before, "failed commands changed nothing");
}

#[test]
fn unreachable_etcd_is_reported_naming_the_endpoint() {
    let c = Cluster::start(1, 1);
    let dead = format!("127.0.0.1:{}", free_port());
    for (binary, args) in [
        ("torusctl", vec!["volume", "list"]),
        ("torusblk", vec!["nbdserve", "--listen", "127.0.0.1:0"]),
        ("torusd", vec!["--data-dir", "/tmp/torus-never-used", "--size", "1GiB", "--peer-address", "127.0.0.1:0"]),
    ] {
        let start = Instant::now();
        let out = torus_testkit::run(c.cmd(binary).arg("-C").arg(&dead).args(&args), Duration::from_secs(60));
        let t = text(&out);
        assert!(!out.status.success(), "{binary} ran without etcd");
        assert!(t.contains(&dead), "{binary}: error does not name {dead}: {t}");
        assert!(start.elapsed() < Duration::from_secs(15), "{binary} took {:?} to give up", start.elapsed());
    }
}
