//! The process's own figures, read from /proc at each scrape.

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Default)]
pub struct ProcessStats {
    resident: Gauge,
    cpu: Gauge<f64, AtomicU64>,
    open_fds: Gauge,
    threads: Gauge,
}

impl ProcessStats {
    pub fn register(registry: &mut Registry) -> Self {
        let s = ProcessStats::default();
        registry.register("torus_process_resident_memory_bytes", "Resident memory (RSS)", s.resident.clone());
        registry.register("torus_process_cpu_seconds", "User and system CPU time used", s.cpu.clone());
        registry.register("torus_process_open_fds", "Open file descriptors (sockets included)", s.open_fds.clone());
        registry.register("torus_process_threads", "Threads", s.threads.clone());
        s
    }

    /// Reads /proc/self now (call before encoding).
    pub fn refresh(&self) {
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next()?.parse::<i64>().ok())
            };
            if let Some(kib) = field("VmRSS:") {
                self.resident.set(kib * 1024);
            }
            if let Some(n) = field("Threads:") {
                self.threads.set(n);
            }
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
            if let (Some(u), Some(s)) =
                (f.get(11).and_then(|v| v.parse::<f64>().ok()), f.get(12).and_then(|v| v.parse::<f64>().ok()))
            {
                self.cpu.set((u + s) / hz);
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
    }
}
