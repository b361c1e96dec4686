//! Command-line and environment configuration of the orchestrator.
//!
//! Every flag has an environment fallback (`BLACKTREE_*`, and `MQ_URL` for the broker
//! URL, as existing deployments set it). [`OrchestratorConfig`]'s `Display` prints the
//! effective configuration with secrets masked; it is logged at start.

use std::fmt;
use std::time::Duration;

use clap::Args;

/// Parses a human duration such as `500ms`, `2s`, `5m` or `1h 30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration like 500ms, 2s or 5m: {e}"))
}

/// Checks a `HOST:PORT` address (an IPv6 host in brackets): no scheme, a host, a port.
pub fn parse_host_port(text: &str) -> Result<String, String> {
    let expected =
        || format!("`{text}` is not an address: expected HOST:PORT, like 127.0.0.1:5051");
    if text.contains("://") || text.contains('/') {
        return Err(expected());
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(expected)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(expected());
    }
    Ok(text.to_string())
}

/// [`parse_host_port`], or empty (off).
pub fn parse_optional_host_port(text: &str) -> Result<String, String> {
    match text {
        "" => Ok(String::new()),
        _ => parse_host_port(text),
    }
}

/// A worker named on the command line (`--worker ID=HOST:PORT`), known before it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticWorker {
    /// The worker's id, as it reports it in `PingResponse.workerId`.
    pub id: String,
    /// `HOST:PORT` of its `JobService`.
    pub addr: String,
}

/// Parses `ID=HOST:PORT`.
pub fn parse_static_worker(text: &str) -> Result<StaticWorker, String> {
    let (id, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not ID=HOST:PORT"))?;
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("`{addr}` in `{text}` has no :PORT"))?;
    if id.is_empty() || host.is_empty() {
        return Err(format!("`{text}` is not ID=HOST:PORT"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("`{port}` in `{text}` is not a port number"))?;
    Ok(StaticWorker {
        id: id.to_string(),
        addr: addr.to_string(),
    })
}

/// Reads a secret from a file (surrounding whitespace trimmed); `None` without a file.
pub fn read_secret_file(
    file: Option<&std::path::Path>,
    what: &str,
) -> Result<Option<crate::job::Secret>, String> {
    let Some(file) = file else { return Ok(None) };
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("reading the {what} file {}: {e}", file.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("the {what} file {} is empty", file.display()));
    }
    Ok(Some(crate::job::Secret::new(secret.to_string())))
}

/// Returns `url` (or a comma-separated list of URLs) with passwords replaced by `***`,
/// for logs and error texts.
pub fn mask_url(url: &str) -> String {
    if url.contains(',') {
        let masked: Vec<String> = url.split(',').map(|u| mask_url(u.trim())).collect();
        return masked.join(",");
    }
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Setting a password only fails for URLs that cannot have one.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "<unparsable URL>".to_string(),
    }
}

/// Mutual TLS for gRPC: this process's certificate and key, and the CA its peers'
/// certificates must be signed by. All three or none; without them gRPC is plaintext.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate this process presents, as server and as client.
    #[arg(long, env = "BLACKTREE_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Its PEM private key.
    #[arg(long, env = "BLACKTREE_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM CA certificate that peers' certificates must be signed by.
    #[arg(long, env = "BLACKTREE_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<std::path::PathBuf>,
}

/// Names of the RabbitMQ exchange, queues and routing keys the orchestrator uses.
#[derive(Args, Debug, Clone)]
pub struct Topology {
    /// Durable direct exchange that jobs and statuses go through.
    #[arg(long, env = "BLACKTREE_EXCHANGE", default_value = "blacktree.direct")]
    pub exchange: String,
    /// Durable queue the orchestrator consumes jobs from.
    #[arg(long, env = "BLACKTREE_EXECUTE_QUEUE", default_value = "execute.queue")]
    pub execute_queue: String,
    /// Routing key binding the execute queue to the exchange.
    #[arg(long, env = "BLACKTREE_EXECUTE_KEY", default_value = "worker.execute")]
    pub execute_key: String,
    /// Durable queue statuses are routed to.
    #[arg(long, env = "BLACKTREE_STATUS_QUEUE", default_value = "status.queue")]
    pub status_queue: String,
    /// Routing key statuses are published with.
    #[arg(long, env = "BLACKTREE_STATUS_KEY", default_value = "api.result")]
    pub status_key: String,
    /// Durable queue that receives messages that are not valid jobs, with the reason.
    #[arg(
        long,
        env = "BLACKTREE_REJECTED_QUEUE",
        default_value = "execute.rejected"
    )]
    pub rejected_queue: String,
    /// Durable queue the orchestrator consumes cancel requests (`{"jobId"}`) from.
    #[arg(long, env = "BLACKTREE_CANCEL_QUEUE", default_value = "cancel.queue")]
    pub cancel_queue: String,
    /// Routing key binding the cancel queue to the exchange.
    #[arg(long, env = "BLACKTREE_CANCEL_KEY", default_value = "worker.cancel")]
    pub cancel_key: String,
    /// Routing key of lifecycle events (received, dispatched, finished); empty: no events.
    #[arg(long, env = "BLACKTREE_EVENTS_KEY", default_value = "")]
    pub events_key: String,
    /// Routing key of live build output (`{"jobId", "deploymentId", "seq", "lines"}`,
    /// non-persistent, on the exchange; a control plane binds its own queue); empty: off.
    #[arg(long, env = "BLACKTREE_LOGS_KEY", default_value = "")]
    pub logs_key: String,
    /// Durable queue bound to the events key, when events are on.
    #[arg(long, env = "BLACKTREE_EVENTS_QUEUE", default_value = "events.queue")]
    pub events_queue: String,
    /// Type of the queues declared: `classic` (as existing deployments have them) or
    /// `quorum` (replicated over a RabbitMQ cluster). It must match queues that exist.
    #[arg(long, env = "BLACKTREE_QUEUE_TYPE", value_enum, default_value_t = QueueType::Classic)]
    pub queue_type: QueueType,
}

/// The type of the queues Blacktree declares (`--queue-type`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// Classic queues, as existing deployments have them.
    Classic,
    /// Quorum queues (`x-queue-type: quorum`), replicated over a RabbitMQ cluster.
    Quorum,
}

impl QueueType {
    /// As `--queue-type` and RabbitMQ's `x-queue-type` spell it.
    pub fn name(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl Topology {
    /// Whether lifecycle events are published (`--events-key` is set).
    pub fn events_on(&self) -> bool {
        !self.events_key.is_empty()
    }

    /// Whether live build output is published (`--logs-key` is set).
    pub fn logs_on(&self) -> bool {
        !self.logs_key.is_empty()
    }
}

/// The broker's URL, as every command that talks to RabbitMQ takes it.
#[derive(Args, Debug, Clone)]
pub struct BrokerUrl {
    /// RabbitMQ URL (`amqp://` or `amqps://`), or a cluster's nodes as comma-separated
    /// URLs: the first that answers is used, the others in turn when it is lost. Query
    /// parameters: `heartbeat` (s) and `connection_timeout` (ms), 10 s each by default,
    /// and `cacertfile` for `amqps://`.
    #[arg(
        long,
        env = "MQ_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,
}

/// Configuration of `blacktree orchestrator`.
#[derive(Args, Debug, Clone)]
pub struct OrchestratorConfig {
    #[command(flatten)]
    pub broker: BrokerUrl,

    #[command(flatten)]
    pub topology: Topology,

    #[command(flatten)]
    pub tls: TlsArgs,

    /// Address the gRPC server (WorkerService, grpc.health.v1) listens on.
    #[arg(long, env = "BLACKTREE_GRPC_LISTEN", default_value = "0.0.0.0:5051",
          value_parser = parse_host_port)]
    pub grpc_listen: String,

    /// This orchestrator's name among several on the same queues: in its log lines, the
    /// `orchestrator_id` label of its metrics, `/healthz`, and the `orchestratorId` of its
    /// events and statuses (default: the host name and the gRPC port, `HOST:PORT`).
    #[arg(long, env = "BLACKTREE_INSTANCE_ID", value_parser = crate::instance::parse_id)]
    pub instance_id: Option<String>,

    /// Number of dispatch threads, the most jobs running at once.
    #[arg(long, env = "BLACKTREE_DISPATCH_THREADS", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub dispatch_threads: u16,

    /// Unacknowledged jobs the broker may hand us at once (default: dispatch threads).
    #[arg(long, env = "BLACKTREE_PREFETCH",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: Option<u16>,

    /// A job that requires labels no healthy worker has waits (without a dispatch
    /// thread) until one has them; after this long it ends `rejected` (default: it
    /// waits as long as it takes).
    #[arg(long, env = "BLACKTREE_UNROUTABLE_AFTER", value_parser = parse_duration)]
    pub unroutable_after: Option<Duration>,

    /// The most jobs held back for their labels outside the prefetch window; beyond
    /// them, such jobs take room in the window like any other (memory stays bounded).
    #[arg(long, env = "BLACKTREE_MAX_PARKED_JOBS", default_value_t = 1000)]
    pub max_parked_jobs: usize,

    /// Deadline of a job that carries no `timeoutSeconds`.
    #[arg(long, env = "BLACKTREE_JOB_TIMEOUT", default_value = "3600s", value_parser = parse_duration)]
    pub job_timeout: Duration,

    /// Time between two health rounds.
    #[arg(long, env = "BLACKTREE_HEALTH_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub health_interval: Duration,

    /// Deadline of one health ping.
    #[arg(long, env = "BLACKTREE_HEALTH_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub health_timeout: Duration,

    /// Consecutive failed pings that make a worker unhealthy.
    #[arg(long, env = "BLACKTREE_UNHEALTHY_AFTER", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub unhealthy_after: u32,

    /// A worker that has not answered pings this long has its running jobs given up
    /// (`worker_lost`); before that, an unhealthy worker only gets no new job. A
    /// connection refused or reset ends them at once.
    #[arg(long, env = "BLACKTREE_LOST_AFTER", default_value = "60s", value_parser = parse_duration)]
    pub lost_after: Duration,

    /// A registered worker unhealthy this long is forgotten.
    #[arg(long, env = "BLACKTREE_FORGET_AFTER", default_value = "600s", value_parser = parse_duration)]
    pub forget_after: Duration,

    /// On SIGTERM/SIGINT, how long running jobs may take to finish before exiting.
    #[arg(long, env = "BLACKTREE_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// How long after its delivery a redelivered job waits for a worker to report it (a
    /// build that outlived the orchestrator that started it) before it is dispatched
    /// afresh; twice the workers' default `--check-in-interval`. First deliveries never
    /// wait.
    #[arg(long, env = "BLACKTREE_ADOPT_WAIT", default_value = "6s", value_parser = parse_duration)]
    pub adopt_wait: Duration,

    /// A job whose status was confirmed this recently is not run again when redelivered.
    #[arg(long, env = "BLACKTREE_DEDUPE_WINDOW", default_value = "10m", value_parser = parse_duration)]
    pub dedupe_window: Duration,

    /// A cancel for a job not consumed yet is remembered this long.
    #[arg(long, env = "BLACKTREE_CANCEL_TTL", default_value = "1h", value_parser = parse_duration)]
    pub cancel_ttl: Duration,

    /// Larger job messages are rejected.
    #[arg(long, env = "BLACKTREE_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Image name of a deployment (`deploymentId` job) without `imageName`: this prefix
    /// and the deployment's id, as the deployed Go orchestrator named them.
    #[arg(
        long,
        env = "BLACKTREE_DERIVED_IMAGE_PREFIX",
        default_value = "blacktree/"
    )]
    pub derived_image_prefix: String,

    /// File holding the shared token workers must send (`authorization: Bearer …`) to
    /// register and check in; without one, any worker may register.
    #[arg(long, env = "BLACKTREE_REGISTRATION_TOKEN_FILE")]
    pub registration_token_file: Option<std::path::PathBuf>,

    /// Address of the HTTP endpoint (`/metrics`, `/healthz`, `/workers`); empty: off.
    #[arg(
        long,
        env = "BLACKTREE_METRICS_LISTEN",
        default_value = "127.0.0.1:9464",
        value_parser = parse_optional_host_port
    )]
    pub metrics_listen: String,

    /// File holding the token the HTTP endpoint asks for: `Authorization: Bearer TOKEN`,
    /// or basic auth with any user name and the token as password; `/healthz` stays
    /// open. Without one, the status page and `/api/` answer on a loopback address only.
    #[arg(long, env = "BLACKTREE_HTTP_AUTH_FILE")]
    pub http_auth_file: Option<std::path::PathBuf>,

    /// Finished jobs the status page and `/api/jobs` keep, newest first.
    #[arg(long, env = "BLACKTREE_FINISHED_JOBS", default_value_t = crate::metrics::DEFAULT_FINISHED,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=10_000))]
    pub finished_jobs: usize,

    /// Single-instance lock file (default: `/run/blacktree-orchestrator-PORT.lock` as root;
    /// none when listening on port 0).
    #[arg(long, env = "BLACKTREE_LOCK_FILE")]
    pub lock_file: Option<std::path::PathBuf>,

    /// The largest status published: a larger one loses the start of its logs (a line
    /// says how much). Keep it below the broker's `max_message_size`.
    #[arg(long, env = "BLACKTREE_MAX_STATUS_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(4096..))]
    pub max_status_bytes: usize,

    /// The largest capacity a worker may register with; larger ones are refused.
    #[arg(long, env = "BLACKTREE_MAX_WORKER_CAPACITY", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_worker_capacity: u32,

    /// The most workers that may be registered at once; further ids are refused
    /// (RESOURCE_EXHAUSTED). Workers named with `--worker` always count.
    #[arg(long, env = "BLACKTREE_MAX_WORKERS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_workers: u32,

    /// File where registered workers are remembered across restarts (default:
    /// `/var/lib/blacktree-orchestrator/registry.json`, kept only if usable; empty: off).
    #[arg(long, env = "BLACKTREE_STATE_FILE")]
    pub state_file: Option<std::path::PathBuf>,

    /// A statically known worker, `ID=HOST:PORT` (repeatable). It is never forgotten.
    #[arg(long = "worker", env = "BLACKTREE_WORKERS", value_delimiter = ',',
          value_parser = parse_static_worker)]
    pub workers: Vec<StaticWorker>,
}

impl OrchestratorConfig {
    /// The effective prefetch: `--prefetch`, or the number of dispatch threads.
    pub fn prefetch(&self) -> u16 {
        self.prefetch.unwrap_or(self.dispatch_threads)
    }
}

impl fmt::Display for OrchestratorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.topology;
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let workers: Vec<String> = self
            .workers
            .iter()
            .map(|w| format!("{}={}", w.id, w.addr))
            .collect();
        write!(
            f,
            "amqp-url={} exchange={} execute-queue={} execute-key={} status-queue={} \
             status-key={} rejected-queue={} cancel-queue={} cancel-key={} events-key={} logs-key={} \
             events-queue={} queue-type={} grpc-listen={} instance-id={} dispatch-threads={} prefetch={} \
             unroutable-after={} max-parked-jobs={} job-timeout={} \
             health-interval={} health-timeout={} unhealthy-after={} lost-after={} forget-after={} \
             drain-timeout={} adopt-wait={} dedupe-window={} cancel-ttl={} max-message-bytes={} \
             derived-image-prefix={} max-status-bytes={} max-worker-capacity={} max-workers={} \
             state-file={} \
             workers=[{}]",
            mask_url(&self.broker.amqp_url),
            t.exchange,
            t.execute_queue,
            t.execute_key,
            t.status_queue,
            t.status_key,
            t.rejected_queue,
            t.cancel_queue,
            t.cancel_key,
            t.events_key,
            t.logs_key,
            t.events_queue,
            t.queue_type.name(),
            self.grpc_listen,
            self.instance_id.as_deref().unwrap_or("(host:port)"),
            self.dispatch_threads,
            self.prefetch(),
            self.unroutable_after.map_or("off".to_string(), d),
            self.max_parked_jobs,
            d(self.job_timeout),
            d(self.health_interval),
            d(self.health_timeout),
            self.unhealthy_after,
            d(self.lost_after),
            d(self.forget_after),
            d(self.drain_timeout),
            d(self.adopt_wait),
            d(self.dedupe_window),
            d(self.cancel_ttl),
            self.max_message_bytes,
            self.derived_image_prefix,
            self.max_status_bytes,
            self.max_worker_capacity,
            self.max_workers,
            self.state_file
                .as_deref()
                .map_or("(default)".into(), |p| p.display().to_string()),
            workers.join(","),
        )
    }
}

mod worker;

pub use worker::{ExecutorKind, WorkerConfig};

#[cfg(test)]
mod tests;
