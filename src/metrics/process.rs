//! The standard `process_*` metrics of a Prometheus client, read from `/proc/self` at
//! each scrape: CPU seconds, resident and virtual memory, open and maximum file
//! descriptors, start time.

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
            if let (Some(user), Some(system)) = (field(14), field(15)) {
                self.cpu_seconds.set((user + system) / ticks as f64);
            }
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

/// Seconds since the epoch at which the machine booted (`btime` of `/proc/stat`).
fn boot_time() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())
}
