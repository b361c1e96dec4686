//! Prometheus metrics and the orchestrator's small HTTP endpoint (`tiny_http`, one
//! thread): `/metrics` (Prometheus text), `/healthz` (200 only while the broker is
//! connected; the gRPC server is up whenever the process serves this), `/workers` (JSON).

use std::sync::Arc;
use std::thread::JoinHandle;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, TextEncoder,
};
use serde_json::Value;

use crate::workers::Registry;

/// Every metric the orchestrator keeps.
pub struct Metrics {
    registry: prometheus::Registry,
    /// Job messages consumed (valid ones).
    pub jobs_received: IntCounter,
    /// Jobs sent to a worker.
    pub jobs_dispatched: IntCounter,
    /// Statuses published, by outcome.
    pub jobs_finished: IntCounterVec,
    /// Messages moved to the rejected queue.
    pub jobs_rejected: IntCounter,
    /// Jobs running on workers now.
    pub jobs_in_flight: IntGauge,
    /// Seconds from a job's arrival to its dispatch.
    pub dispatch_latency: Histogram,
    /// Seconds a job ran on its worker.
    pub job_duration: Histogram,
    /// Health pings that failed.
    pub ping_failures: IntCounter,
    /// Seconds the last health round took (every worker pinged and answered or timed out).
    pub health_round: Gauge,
    /// Connections to the broker after the first.
    pub broker_reconnects: IntCounter,
    /// 1 while connected to the broker.
    pub broker_connected: IntGauge,
    workers: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric")
        };
        let metrics = Metrics {
            registry: prometheus::Registry::new(),
            jobs_received: counter("blacktree_jobs_received_total", "Job messages consumed."),
            jobs_dispatched: counter("blacktree_jobs_dispatched_total", "Jobs sent to a worker."),
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
            workers: IntGaugeVec::new(
                Opts::new("blacktree_workers", "Workers by state."),
                &["state"],
            )
            .expect("valid metric"),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.jobs_received.clone()),
            Box::new(metrics.jobs_dispatched.clone()),
            Box::new(metrics.jobs_finished.clone()),
            Box::new(metrics.jobs_rejected.clone()),
            Box::new(metrics.jobs_in_flight.clone()),
            Box::new(metrics.dispatch_latency.clone()),
            Box::new(metrics.job_duration.clone()),
            Box::new(metrics.ping_failures.clone()),
            Box::new(metrics.health_round.clone()),
            Box::new(metrics.broker_reconnects.clone()),
            Box::new(metrics.broker_connected.clone()),
            Box::new(metrics.workers.clone()),
        ];
        for collector in collectors {
            metrics
                .registry
                .register(collector)
                .expect("metric names are unique");
        }
        metrics
    }
}

impl Metrics {
    /// The Prometheus text of every metric, with the workers' states counted now.
    fn render(&self, workers: &Registry) -> String {
        for state in ["free", "busy", "unhealthy"] {
            self.workers.with_label_values(&[state]).set(0);
        }
        for worker in workers.list() {
            self.workers
                .with_label_values(&[worker.state.as_str()])
                .inc();
        }
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .expect("encoding metrics into memory");
        String::from_utf8(text).expect("Prometheus text is UTF-8")
    }
}

/// Starts the HTTP endpoint on `listen`; returns the bound port.
pub fn serve(
    listen: &str,
    metrics: Arc<Metrics>,
    workers: Arc<Registry>,
) -> Result<(u16, JoinHandle<()>), String> {
    let server = tiny_http::Server::http(listen)
        .map_err(|e| format!("metrics endpoint cannot listen on {listen}: {e}"))?;
    let port = server.server_addr().to_ip().map_or(0, |a| a.port());
    let thread = std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let (status, content_type, body) = match request.url() {
                    "/metrics" => (200, "text/plain; version=0.0.4", metrics.render(&workers)),
                    "/healthz" if metrics.broker_connected.get() == 1 => {
                        (200, "text/plain", "ok\n".to_string())
                    }
                    "/healthz" => (
                        503,
                        "text/plain",
                        "not connected to the broker\n".to_string(),
                    ),
                    "/workers" => {
                        let list: Vec<Value> = workers.list().iter().map(|w| w.to_json()).collect();
                        (200, "application/json", Value::Array(list).to_string())
                    }
                    _ => (404, "text/plain", "not found\n".to_string()),
                };
                let header = tiny_http::Header::from_bytes("Content-Type", content_type)
                    .expect("valid header");
                let response = tiny_http::Response::from_string(body)
                    .with_status_code(status)
                    .with_header(header);
                // A client that went away is its own problem.
                let _ = request.respond(response);
            }
        })
        .map_err(|e| format!("spawning the metrics thread: {e}"))?;
    Ok((port, thread))
}
