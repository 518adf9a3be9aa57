//! Bounded memory under a hostile NBD client: 64 connections send 32 MiB
//! writes as fast as they can and never read a reply. torusblk stops reading
//! them once their budget is held, its RSS stays under the stated cap, and
//! another client's 4 KiB reads are still served.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use torus_testkit::nbd::{Raw, REQUEST_MAGIC};
use torus_testkit::Cluster;

/// The cap README states: the process budget (1 GiB for large requests, 256 MiB
/// for small ones) plus 512 MiB for the process itself.
const RSS_CAP: u64 = (1 << 30) + (256 << 20) + (512 << 20);
const CONNECTIONS: usize = 64;
const WRITE: u32 = 32 << 20;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib << 10)
}

#[test]
fn clients_that_never_read_their_replies_cannot_grow_the_servers_memory() {
    let c = Cluster::start(2, 2);
    c.ctl_ok(&["volume", "create-block", "m", "1GiB"]);
    let blk = c.start_blk(&[]);
    let pid = blk.proc.pid().expect("torusblk runs");
    let mut good = Raw::open(&blk.addr, "m", "open the volume");
    let baseline = rss_bytes(pid);

    let payload = Arc::new(vec![0x5au8; WRITE as usize]);
    let sent = Arc::new(AtomicU64::new(0));
    // The flood goes on for 12 s and until more than the cap was sent (a loaded machine drains it slower), 60 s at most.
    let start = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Each client writes blocking: a client the server stops reading waits, connected and holding what it sent,
    // until the server reads on or the test shuts its socket down at the end. (A write timeout would make a
    // client give up for good while the server holds its budget, and on a loaded machine all of them would.)
    let mut sockets = Vec::new();
    let hostile: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let mut r = Raw::open(&blk.addr, "m", "open the volume");
            sockets.push(r.s.try_clone().expect("clone a client socket"));
            let (payload, sent, stop) = (payload.clone(), sent.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let offset = ((i as u64 * 7 + n) % 32) * WRITE as u64;
                    let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
                    h.extend_from_slice(&0u16.to_be_bytes());
                    h.extend_from_slice(&1u16.to_be_bytes()); // WRITE
                    h.extend_from_slice(&n.to_be_bytes());
                    h.extend_from_slice(&offset.to_be_bytes());
                    h.extend_from_slice(&WRITE.to_be_bytes());
                    if r.s.write_all(&h).and_then(|()| r.s.write_all(&payload)).is_err() {
                        break; // shut down by the test
                    }
                    sent.fetch_add(WRITE as u64, Ordering::Relaxed);
                    n += 1;
                }
            })
        })
        .collect();

    // Meanwhile: RSS sampled, and a well-behaved client's 4 KiB reads.
    let (mut peak, mut reads, mut slowest) = (0u64, 0u32, Duration::ZERO);
    while start.elapsed() < Duration::from_secs(60)
        && (start.elapsed() < Duration::from_secs(12) || sent.load(Ordering::Relaxed) <= RSS_CAP)
    {
        peak = peak.max(rss_bytes(pid));
        let t = Instant::now();
        good.request(0, 0, u64::from(reads), u64::from(reads % 1000) * 4096, 4096, &[]);
        let (err, cookie, data) = good.reply(4096);
        assert_eq!((err, cookie, data.len()), (0, u64::from(reads), 4096), "a 4 KiB read of the good client failed");
        slowest = slowest.max(t.elapsed());
        reads += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    peak = peak.max(rss_bytes(pid));
    for s in &sockets {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    for h in hostile {
        h.join().expect("hostile client thread");
    }
    let sent = sent.load(Ordering::Relaxed);
    assert!(reads > 0);
    assert!(sent > RSS_CAP, "the hostile clients sent only {sent} bytes: not enough to test the cap");
    assert!(
        peak < RSS_CAP,
        "torusblk's RSS reached {} MiB (cap {} MiB) with {CONNECTIONS} clients that never read replies",
        peak >> 20,
        RSS_CAP >> 20
    );
    eprintln!(
        "hostile clients: {CONNECTIONS} connections sent {} MiB of 32 MiB writes without reading a reply; torusblk RSS \
         {} MiB before, peak {} MiB (cap {} MiB); another client's {reads} 4 KiB reads all served, slowest {} ms",
        sent >> 20,
        baseline >> 20,
        peak >> 20,
        RSS_CAP >> 20,
        slowest.as_millis()
    );
}
