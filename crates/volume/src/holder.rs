//! Who holds a volume's lock, as a process: the tag a writer records in its
//! lock, and whether a recorded tag names a process of this host that is
//! gone, so that a successor (torusblk restarted after a crash) can take the
//! lock over at once instead of waiting for the dead holder's lease to lapse.
//!
//! A tag is judged only when host, boot and PID namespace all match ours;
//! anything else (another host, another container's namespace, an older
//! record without a tag) is "unknown", never "dead".

use torus_meta::cluster::ProcessTag;

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// Start time of a process in clock ticks after boot (`/proc/<pid>/stat` field 22).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything: count after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This machine's host name (the default host of a tag).
pub fn hostname() -> String {
    read_trimmed("/proc/sys/kernel/hostname").unwrap_or_default()
}

/// This process's tag on `host` (a host name, or a CSI node id), if /proc tells enough.
pub fn current(host: &str) -> Option<ProcessTag> {
    let pid = std::process::id();
    Some(ProcessTag {
        host: host.to_string(),
        boot_id: read_trimmed("/proc/sys/kernel/random/boot_id")?,
        pid_ns: std::fs::read_link("/proc/self/ns/pid").ok()?.to_string_lossy().into_owned(),
        pid,
        start_ticks: start_ticks(pid)?,
    })
}

/// Whether `tag` names a process of this host (`me`: our own tag), boot and PID namespace.
pub fn is_here(tag: &ProcessTag, me: &ProcessTag) -> bool {
    (&tag.host, &tag.boot_id, &tag.pid_ns) == (&me.host, &me.boot_id, &me.pid_ns)
}

/// Whether `tag` names a process here (see `is_here`) that no longer runs.
pub fn is_dead_here(tag: &ProcessTag, me: &ProcessTag) -> bool {
    is_here(tag, me) && start_ticks(tag.pid) != Some(tag.start_ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_gone_one_is_dead() {
        let me = current(&hostname()).expect("a tag from /proc");
        assert!(!is_dead_here(&me, &me));
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        let ticks = loop {
            if let Some(t) = start_ticks(pid) {
                break t;
            }
        };
        child.wait().expect("wait");
        let gone = ProcessTag { pid, start_ticks: ticks, ..me.clone() };
        assert!(is_dead_here(&gone, &me), "an exited process is dead");
        let reused = ProcessTag { start_ticks: me.start_ticks + 1, ..me.clone() };
        assert!(is_dead_here(&reused, &me), "same pid, other start: another process");
        let elsewhere = ProcessTag { host: format!("{}-other", me.host), pid, ..me.clone() };
        assert!(!is_dead_here(&elsewhere, &me), "another host is never judged");
        let other_ns = ProcessTag { pid_ns: "pid:[1]".into(), pid, ..me.clone() };
        assert!(!is_dead_here(&other_ns, &me), "another PID namespace is never judged");
    }
}
