//! The orchestrator's Prometheus metrics. A leaf: every thread that counts something
//! imports it; it imports none of them (the HTTP endpoint that serves it is
//! `orchestrator::http`).

mod board;
mod load;
mod process;

use std::sync::{Arc, Mutex};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, TextEncoder,
};

pub use board::{Board, FinishedJob, Minute, Running, RunningView, DEFAULT_FINISHED, MINUTES};
pub use load::{Load, Slots, Waiting, WaitingJob};

/// Every metric the orchestrator keeps.
pub struct Metrics {
    registry: prometheus::Registry,
    /// Jobs waiting for a worker, slots by state, busy dispatch threads.
    pub load: Arc<Load>,
    /// Jobs running, finished and flowing, for the status page.
    pub board: Arc<Board>,
    process: process::ProcessMetrics,
    /// The `orchestrator_id` label of every sample (empty: none).
    instance_id: String,
    /// Job messages consumed (valid ones).
    pub jobs_received: IntCounter,
    /// Jobs sent to a worker.
    pub jobs_dispatched: IntCounter,
    /// Redelivered jobs taken over from the worker that runs them (or holds their answer).
    pub jobs_adopted: IntCounter,
    /// Redelivered jobs no worker reported within `--adopt-wait`, dispatched afresh.
    pub jobs_redispatched: IntCounter,
    /// Statuses published, by outcome.
    pub jobs_finished: IntCounterVec,
    /// Messages moved to the rejected queue.
    pub jobs_rejected: IntCounter,
    /// Jobs held back for their labels that ended `rejected` (`--unroutable-after`).
    pub jobs_unroutable: IntCounter,
    /// Messages of live build output published (`--logs-key`).
    pub log_messages: IntCounter,
    /// Lines of live build output dropped: by workers whose caller read slower than
    /// the build printed, or here, beyond the bytes the orchestrator holds.
    pub log_lines_dropped: IntCounter,
    /// Jobs running on workers now.
    pub jobs_in_flight: IntGauge,
    /// Seconds from a job's arrival to its dispatch.
    pub dispatch_latency: Histogram,
    /// Seconds a job ran on its worker.
    pub job_duration: Histogram,
    /// Health pings that failed.
    pub ping_failures: IntCounter,
    /// Times a worker was taken out of rotation (unhealthy: no new job).
    pub workers_unhealthy: IntCounter,
    /// Running jobs given up (`worker_lost`) because their worker was silent for
    /// `--lost-after`.
    pub jobs_given_up: IntCounter,
    /// Seconds the last health round took (every worker pinged and answered or timed out).
    pub health_round: Gauge,
    /// Connections to the broker after the first.
    pub broker_reconnects: IntCounter,
    /// 1 while connected to the broker.
    pub broker_connected: IntGauge,
    /// 1 while the broker blocks our publishing connection (a memory or disk alarm).
    pub broker_blocked: IntGauge,
    /// The broker URL in use (masked); empty while disconnected. `/healthz` names it.
    broker_in_use: Mutex<String>,
    /// Told `(connected, blocked)` whenever either changes (the gRPC health follows).
    broker_watch: std::sync::OnceLock<BrokerWatch>,
    /// Statuses the broker returned as unroutable (each is published again).
    pub statuses_unroutable: IntCounter,
    /// Statuses the broker refused as they were, sent without their logs.
    pub statuses_shrunk: IntCounter,
    workers: IntGaugeVec,
}

impl Default for Metrics {
    /// Metrics without the `orchestrator_id` label, for 64 dispatch threads (unit tests).
    fn default() -> Metrics {
        Metrics::labelled(None, 64, DEFAULT_FINISHED)
    }
}

impl Metrics {
    /// Metrics whose every sample carries `orchestrator_id="<instance_id>"`, for an
    /// orchestrator of `dispatch_threads` threads whose status page lists the last
    /// `finished_jobs` finished jobs.
    pub fn for_instance(instance_id: &str, dispatch_threads: u16, finished_jobs: usize) -> Metrics {
        let label = [("orchestrator_id".to_string(), instance_id.to_string())];
        Metrics::labelled(
            Some(label.into_iter().collect()),
            dispatch_threads,
            finished_jobs,
        )
    }

    /// The orchestrator's instance id (empty for unlabelled metrics).
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    fn labelled(
        labels: Option<std::collections::HashMap<String, String>>,
        dispatch_threads: u16,
        finished_jobs: usize,
    ) -> Metrics {
        let instance_id = labels
            .as_ref()
            .and_then(|l| l.get("orchestrator_id").cloned())
            .unwrap_or_default();
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric")
        };
        let registry =
            prometheus::Registry::new_custom(None, labels).expect("a valid orchestrator_id label");
        let build_info = IntGaugeVec::new(
            Opts::new("blacktree_build_info", "The running version (value 1)."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry
            .register(Box::new(build_info))
            .expect("metric names are unique");
        let metrics = Metrics {
            load: Arc::new(Load::new(&registry, u64::from(dispatch_threads))),
            board: Arc::new(Board::new(finished_jobs)),
            process: process::ProcessMetrics::new(&registry),
            registry,
            instance_id,
            jobs_received: counter("blacktree_jobs_received_total", "Job messages consumed."),
            jobs_dispatched: counter("blacktree_jobs_dispatched_total", "Jobs sent to a worker."),
            jobs_adopted: counter(
                "blacktree_jobs_adopted_total",
                "Redelivered jobs taken over from the worker that runs them or holds their answer.",
            ),
            jobs_redispatched: counter(
                "blacktree_jobs_redispatched_total",
                "Redelivered jobs no worker reported within --adopt-wait, dispatched afresh.",
            ),
            jobs_finished: IntCounterVec::new(
                Opts::new(
                    "blacktree_jobs_finished_total",
                    "Statuses published, by outcome.",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            jobs_rejected: counter(
                "blacktree_jobs_rejected_total",
                "Messages moved to the rejected queue.",
            ),
            jobs_unroutable: counter(
                "blacktree_jobs_unroutable_total",
                "Jobs that no registered worker had the labels of for --unroutable-after.",
            ),
            log_messages: counter(
                "blacktree_log_messages_published_total",
                "Messages of live build output published on --logs-key.",
            ),
            log_lines_dropped: counter(
                "blacktree_log_lines_dropped_total",
                "Lines of live build output dropped under back-pressure (worker or here).",
            ),
            jobs_in_flight: IntGauge::new("blacktree_jobs_in_flight", "Jobs running on workers.")
                .expect("valid metric"),
            dispatch_latency: histogram(
                "blacktree_dispatch_latency_seconds",
                "Time from a job's arrival to its dispatch.",
                prometheus::exponential_buckets(0.0005, 4.0, 10).expect("valid buckets"),
            ),
            job_duration: histogram(
                "blacktree_job_duration_seconds",
                "Time a job ran on its worker.",
                prometheus::exponential_buckets(0.01, 4.0, 12).expect("valid buckets"),
            ),
            ping_failures: counter("blacktree_ping_failures_total", "Health pings that failed."),
            workers_unhealthy: counter(
                "blacktree_workers_unhealthy_total",
                "Times a worker was taken out of rotation (failed pings or an unreachable call).",
            ),
            jobs_given_up: counter(
                "blacktree_jobs_given_up_total",
                "Running jobs ended worker_lost because their worker was silent for --lost-after.",
            ),
            health_round: Gauge::new(
                "blacktree_health_round_seconds",
                "Duration of the last health round (every worker pinged).",
            )
            .expect("valid metric"),
            broker_reconnects: counter(
                "blacktree_broker_reconnects_total",
                "Broker connections after the first.",
            ),
            broker_connected: IntGauge::new(
                "blacktree_broker_connected",
                "1 while connected to the broker.",
            )
            .expect("valid metric"),
            broker_in_use: Mutex::default(),
            broker_watch: std::sync::OnceLock::new(),
            broker_blocked: IntGauge::new(
                "blacktree_broker_blocked",
                "1 while the broker blocks publishing (memory or disk alarm).",
            )
            .expect("valid metric"),
            statuses_unroutable: counter(
                "blacktree_statuses_unroutable_total",
                "Statuses the broker returned as unroutable (published again with backoff).",
            ),
            statuses_shrunk: counter(
                "blacktree_statuses_shrunk_total",
                "Statuses the broker refused as they were, sent again without their logs.",
            ),
            workers: IntGaugeVec::new(
                Opts::new("blacktree_workers", "Workers by state."),
                &["state"],
            )
            .expect("valid metric"),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.jobs_received.clone()),
            Box::new(metrics.jobs_dispatched.clone()),
            Box::new(metrics.jobs_adopted.clone()),
            Box::new(metrics.jobs_redispatched.clone()),
            Box::new(metrics.jobs_finished.clone()),
            Box::new(metrics.jobs_rejected.clone()),
            Box::new(metrics.jobs_unroutable.clone()),
            Box::new(metrics.log_messages.clone()),
            Box::new(metrics.log_lines_dropped.clone()),
            Box::new(metrics.jobs_in_flight.clone()),
            Box::new(metrics.dispatch_latency.clone()),
            Box::new(metrics.job_duration.clone()),
            Box::new(metrics.ping_failures.clone()),
            Box::new(metrics.workers_unhealthy.clone()),
            Box::new(metrics.jobs_given_up.clone()),
            Box::new(metrics.health_round.clone()),
            Box::new(metrics.broker_reconnects.clone()),
            Box::new(metrics.broker_connected.clone()),
            Box::new(metrics.broker_blocked.clone()),
            Box::new(metrics.statuses_unroutable.clone()),
            Box::new(metrics.statuses_shrunk.clone()),
            Box::new(metrics.workers.clone()),
        ];
        register(&metrics.registry, collectors);
        metrics
    }
}

/// Registers `collectors` in `registry` (their names are unique by construction).
fn register(
    registry: &prometheus::Registry,
    collectors: impl IntoIterator<Item = Box<dyn prometheus::core::Collector>>,
) {
    for collector in collectors {
        registry
            .register(collector)
            .expect("metric names are unique");
    }
}

/// What is told of the broker connection: `(connected, blocked)`.
type BrokerWatch = Box<dyn Fn(bool, bool) + Send + Sync>;

impl Metrics {
    /// Calls `watch(connected, blocked)` whenever the broker connection changes (set
    /// once; later calls are ignored).
    pub fn watch_broker(&self, watch: impl Fn(bool, bool) + Send + Sync + 'static) {
        let _ = self.broker_watch.set(Box::new(watch));
    }

    /// Records whether the consumer is connected to the broker.
    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.set(i64::from(connected));
        self.tell_broker();
    }

    /// Records whether the broker blocks the publishing connection.
    pub fn set_broker_blocked(&self, blocked: bool) {
        self.broker_blocked.set(i64::from(blocked));
        self.tell_broker();
    }

    fn tell_broker(&self) {
        if let Some(watch) = self.broker_watch.get() {
            watch(
                self.broker_connected.get() == 1,
                self.broker_blocked.get() == 1,
            );
        }
    }

    /// Records the broker URL in use (masked; empty while disconnected).
    pub fn set_broker_in_use(&self, url: &str) {
        *self.broker_in_use.lock().expect("broker URL lock") = url.to_string();
    }

    /// The broker URL in use (masked), empty while disconnected.
    pub fn broker_in_use(&self) -> String {
        self.broker_in_use.lock().expect("broker URL lock").clone()
    }

    /// The Prometheus text of every metric, with `blacktree_workers` counted from the
    /// workers' current states (`free`, `busy`, `draining`, `unhealthy`) and
    /// `blacktree_worker_slots`
    /// from their `slots`.
    pub fn render<'a>(
        &self,
        worker_states: impl IntoIterator<Item = &'a str>,
        slots: Slots,
    ) -> String {
        self.process.update();
        self.load.update(slots);
        for state in ["free", "busy", "draining", "unhealthy"] {
            self.workers.with_label_values(&[state]).set(0);
        }
        for state in worker_states {
            self.workers.with_label_values(&[state]).inc();
        }
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .expect("encoding metrics into memory");
        String::from_utf8(text).expect("Prometheus text is UTF-8")
    }
}
