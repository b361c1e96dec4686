//! The standard `process_*` metrics of a Prometheus client, read from `/proc/self` (and
//! the process's CPU clock) at each scrape: CPU seconds, resident and virtual memory,
//! open and maximum file descriptors, start time.

use prometheus::{Gauge, IntGauge};

/// The process gauges, set at each scrape.
pub struct ProcessMetrics {
    cpu_seconds: Gauge,
    resident_bytes: IntGauge,
    virtual_bytes: IntGauge,
    open_fds: IntGauge,
    max_fds: IntGauge,
    start_time: Gauge,
}

impl ProcessMetrics {
    /// The gauges, registered in `registry`.
    pub fn new(registry: &prometheus::Registry) -> ProcessMetrics {
        let gauge = |name: &str, help: &str| Gauge::new(name, help).expect("valid metric");
        let int = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        let process = ProcessMetrics {
            cpu_seconds: gauge(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
            ),
            resident_bytes: int(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            ),
            virtual_bytes: int(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
            ),
            open_fds: int("process_open_fds", "Number of open file descriptors."),
            max_fds: int(
                "process_max_fds",
                "Maximum number of open file descriptors.",
            ),
            start_time: gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            ),
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 6] = [
            Box::new(process.cpu_seconds.clone()),
            Box::new(process.resident_bytes.clone()),
            Box::new(process.virtual_bytes.clone()),
            Box::new(process.open_fds.clone()),
            Box::new(process.max_fds.clone()),
            Box::new(process.start_time.clone()),
        ];
        super::register(registry, collectors);
        process
    }

    /// Reads `/proc/self` into the gauges (a figure that cannot be read stays as it was).
    pub fn update(&self) {
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // The fields after the command name (which may hold spaces), from field 3.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
            let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
            if let Some(vsize) = field(23) {
                self.virtual_bytes.set(vsize as i64);
            }
            if let Some(rss) = field(24) {
                self.resident_bytes.set(rss as i64 * page);
            }
            if let (Some(start), Some(boot)) = (field(22), boot_time()) {
                self.start_time.set(boot + start / ticks as f64);
            }
        }
        if let Some(seconds) = cpu_seconds() {
            self.cpu_seconds.set(seconds);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            self.max_fds
                .set(i64::try_from(limit.rlim_cur).unwrap_or(i64::MAX));
        }
    }
}

/// The CPU time of all the process's threads, user and system, to the nanosecond
/// (`/proc/self/stat` counts in ticks of 10 ms: a young or idle process would read 0).
fn cpu_seconds() -> Option<f64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct it is given.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    (read == 0).then(|| now.tv_sec as f64 + now.tv_nsec as f64 / 1e9)
}

/// Seconds since the epoch at which the machine booted (`btime` of `/proc/stat`).
fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_count_less_than_a_clock_tick() {
        let metrics = ProcessMetrics::new(&prometheus::Registry::new());
        metrics.update();
        let before = metrics.cpu_seconds.get();
        // 2 ms of CPU on this thread: a fifth of a 10 ms tick of /proc/self/stat.
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(2) {
            std::hint::spin_loop();
        }
        metrics.update();
        assert!(before > 0.0, "the process has used some CPU by now");
        assert!(
            metrics.cpu_seconds.get() > before,
            "2 ms of CPU show: {before} then {}",
            metrics.cpu_seconds.get()
        );
    }
}
