//! A network namespace joined to this one by a veth pair, for cutting links:
//! processes started inside it (`ip netns exec`) reach the host side only
//! through the pair, so taking the host end down cuts them off from
//! everything else (etcd, other nodes, clients) until it is brought back up.
//! Removed (with its pair) on drop.

use crate::procs::run;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

static SEQ: AtomicU64 = AtomicU64::new(0);

pub struct Netns {
    pub name: String,
    host_if: String,
    /// This side's address (etcd and the nodes outside listen on it).
    pub host_ip: String,
    /// The address inside the namespace.
    pub ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = run(Command::new("ip").args(args), Duration::from_secs(30));
    assert!(out.status.success(), "ip {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    pub fn new() -> Netns {
        crate::require("ip");
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{}", pid % 100_000, seq);
        let name = format!("torus-{tag}");
        let (host_if, ns_if) = (format!("tvh{tag}"), format!("tvn{tag}"));
        // A /30 per namespace, chosen from the pid and a counter.
        let (a, b) = (pid % 250, (seq * 4 % 252) as u32);
        let host_ip = format!("10.{}.{a}.{}", 200 + seq % 50, b + 1);
        let ns_ip = format!("10.{}.{a}.{}", 200 + seq % 50, b + 2);
        ip(&["netns", "add", &name]);
        let n = Netns { name: name.clone(), host_if: host_if.clone(), host_ip: host_ip.clone(), ns_ip: ns_ip.clone() };
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["netns", "exec", &name, "ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if]);
        ip(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        n
    }

    /// Cuts the link: nothing passes between the namespace and the rest.
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]);
    }

    /// Restores the link.
    pub fn heal(&self) {
        ip(&["link", "set", &self.host_if, "up"]);
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}
