//! The worker's Prometheus metrics, served on `--metrics-listen` when set (off by
//! default): slots free and busy, jobs by outcome, how long each kind of step took
//! (clone, build, login, push, exec), and live output lines callers missed.

use std::sync::Arc;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, TextEncoder,
};

use super::jobs::JobTable;
use crate::web::{Reply, PROMETHEUS_TEXT};

/// Every metric the worker keeps.
pub struct WorkerMetrics {
    registry: prometheus::Registry,
    slots: IntGaugeVec,
    jobs: IntCounterVec,
    /// Seconds each step took, by step (`clone`, `build`, `login`, `push`, `exec`).
    pub steps: HistogramVec,
    log_lines_dropped: IntCounter,
}

impl Default for WorkerMetrics {
    fn default() -> WorkerMetrics {
        let registry = prometheus::Registry::new();
        let metrics = WorkerMetrics {
            slots: IntGaugeVec::new(
                Opts::new("blacktree_worker_slots", "This worker's slots by state."),
                &["state"],
            )
            .expect("valid metric"),
            jobs: IntCounterVec::new(
                Opts::new(
                    "blacktree_worker_jobs_total",
                    "Jobs this worker ran, by outcome.",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            steps: HistogramVec::new(
                HistogramOpts::new(
                    "blacktree_worker_step_duration_seconds",
                    "How long a job's step took, by step.",
                )
                .buckets(prometheus::exponential_buckets(0.05, 3.0, 10).expect("valid buckets")),
                &["step"],
            )
            .expect("valid metric"),
            log_lines_dropped: IntCounter::new(
                "blacktree_worker_log_lines_dropped_total",
                "Lines of live build output a caller missed: the build printed faster than \
                 it read.",
            )
            .expect("valid metric"),
            registry,
        };
        for collector in [
            Box::new(metrics.slots.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.jobs.clone()),
            Box::new(metrics.steps.clone()),
            Box::new(metrics.log_lines_dropped.clone()),
        ] {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }
}

impl WorkerMetrics {
    /// Counts lines of live output a streaming caller missed.
    pub fn log_lines_dropped(&self, lines: u64) {
        self.log_lines_dropped.inc_by(lines);
    }

    /// Counts a job that ended: `succeeded`, or why not (`cancelled`, `timed_out`,
    /// `failed`) from the reason it was stopped, if it was.
    pub fn job_ended(&self, success: bool, stopped: Option<&str>) {
        let outcome = match (success, stopped) {
            (true, _) => "succeeded",
            (false, Some(reason)) if reason.starts_with("timed out") => "timed_out",
            (false, Some(_)) => "cancelled",
            (false, None) => "failed",
        };
        self.jobs.with_label_values(&[outcome]).inc();
    }

    /// The Prometheus text, with the slots of `jobs` as they are now.
    pub fn render(&self, jobs: &JobTable) -> String {
        let free = jobs.free_slots();
        self.slots.with_label_values(&["free"]).set(free as i64);
        self.slots
            .with_label_values(&["busy"])
            .set(jobs.running_count() as i64);
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .expect("encoding metrics into memory");
        String::from_utf8(text).expect("Prometheus text is UTF-8")
    }

    /// Serves `/metrics` on `listen` from a thread of its own; returns the bound port.
    pub fn serve(self: Arc<Self>, listen: &str, jobs: Arc<JobTable>) -> Result<u16, String> {
        crate::web::serve(
            listen,
            "BLACKTREE_WORKER_METRICS_LISTEN",
            move |request| match request.path {
                "/metrics" => Reply::new(200, PROMETHEUS_TEXT, self.render(&jobs)),
                _ => Reply::not_found(),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn jobs_are_counted_by_outcome_and_slots_read_from_the_table() {
        let metrics = WorkerMetrics::default();
        metrics.job_ended(true, None);
        metrics.job_ended(false, Some("timed out after 5s"));
        metrics.job_ended(false, Some("cancelled"));
        metrics.job_ended(false, None);
        let table = JobTable::new(3, Duration::from_secs(60));
        let text = metrics.render(&table);
        for line in [
            "blacktree_worker_jobs_total{outcome=\"succeeded\"} 1",
            "blacktree_worker_jobs_total{outcome=\"timed_out\"} 1",
            "blacktree_worker_jobs_total{outcome=\"cancelled\"} 1",
            "blacktree_worker_jobs_total{outcome=\"failed\"} 1",
            "blacktree_worker_slots{state=\"free\"} 3",
            "blacktree_worker_slots{state=\"busy\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
