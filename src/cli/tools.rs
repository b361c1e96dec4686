//! The operator's commands: `submit`, `cancel`, `watch`, `workers`, `healthcheck`.
//! Each fails with a [`CliError`] that names what it tried to reach and a hint, and an
//! exit code scripts can test.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, Channel, Confirm, Connection, ConsumerMessage, ConsumerOptions, FieldTable,
    Publish, QueueDeclareOptions,
};
use clap::Args;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder};
use grpcio_health::proto::HealthCheckRequest;
use grpcio_health::{HealthClient, ServingStatus};
use serde_json::{json, Value};

use crate::amqp::{declare_exchange, Brokers};
use crate::config::{parse_duration, read_secret_file, BrokerUrl, TlsArgs, Topology};
use crate::grpc::{self, Tls};
use crate::job::{Dialect, Job, Secret};
use crate::orchestrator::registry::WorkerView;
use crate::proto::worker::ListWorkersRequest;
use crate::proto::worker_grpc::WorkerServiceClient;

/// Exit code: something failed.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: another instance holds the lock.
pub const EXIT_ALREADY_RUNNING: u8 = 3;
/// Exit code: the broker or the orchestrator could not be reached.
pub const EXIT_UNREACHABLE: u8 = 4;

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    /// Process exit code.
    pub code: u8,
    /// One-line message (address tried, hint).
    pub message: String,
}

impl CliError {
    fn failed(message: impl Into<String>) -> CliError {
        CliError {
            code: EXIT_FAILURE,
            message: message.into(),
        }
    }
}

/// How to reach the broker, and the exchange and routing keys: the orchestrator's own
/// flags, with the same defaults and environment variables.
#[derive(Args, Debug, Clone)]
pub struct BrokerArgs {
    #[command(flatten)]
    pub broker: BrokerUrl,
    #[command(flatten)]
    pub topology: Topology,
}

impl BrokerArgs {
    fn connect(&self) -> Result<(Connection, Channel), CliError> {
        let brokers = Brokers::parse(&self.broker.amqp_url).map_err(CliError::failed)?;
        let unreachable = |e: String| CliError {
            code: EXIT_UNREACHABLE,
            message: format!("{e} (is RabbitMQ running there? set --amqp-url or MQ_URL)"),
        };
        // The first node that answers; the others when one is down.
        let (mut connection, node) = brokers.connect_from(0).map_err(unreachable)?;
        let url = brokers.url(node).masked();
        let channel = connection
            .open_channel(None)
            .map_err(|e| unreachable(format!("opening a channel on {url}: {e}")))?;
        Ok((connection, channel))
    }

    /// Publishes `body` with `routing_key` and waits for the broker's confirm.
    fn publish_confirmed(
        &self,
        routing_key: &str,
        body: &[u8],
        message_id: &str,
    ) -> Result<(), CliError> {
        let (connection, channel) = self.connect()?;
        let exchange = &self.topology.exchange;
        let amqp = |e: amiquip::Error| CliError::failed(format!("publishing to {exchange}: {e}"));
        let confirms = channel.listen_for_publisher_confirms().map_err(amqp)?;
        channel.enable_publisher_confirms().map_err(amqp)?;
        let properties = AmqpProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(message_id.to_string());
        channel
            .basic_publish(
                exchange.as_str(),
                Publish::with_properties(body, routing_key, properties),
            )
            .map_err(amqp)?;
        let confirm = confirms.recv_timeout(Duration::from_secs(10));
        let _ = connection.close();
        match confirm {
            Ok(Confirm::Ack(_)) => Ok(()),
            Ok(Confirm::Nack(_)) => Err(CliError::failed("the broker refused the message")),
            Err(_) => Err(CliError::failed(
                "the broker did not confirm the message within 10 s",
            )),
        }
    }
}

/// `blacktree submit`.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// A whole job message (JSON) from a file, or `-` for standard input.
    #[arg(long, conflicts_with_all = ["repo", "image"])]
    json: Option<String>,
    /// Repository: `owner/name`, a URL or a path.
    #[arg(long, required_unless_present = "json")]
    repo: Option<String>,
    /// Branch to build.
    #[arg(long, default_value = "main")]
    branch: String,
    /// Image name (and tag) to build.
    #[arg(long, required_unless_present = "json")]
    image: Option<String>,
    /// Dockerfile, relative to the context.
    #[arg(long, default_value = "Dockerfile")]
    dockerfile: String,
    /// Build context, relative to the repository.
    #[arg(long, default_value = ".")]
    context: String,
    /// File holding the token for a private repository.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The job's deadline in seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// The job's id (default: a new UUID).
    #[arg(long)]
    job_id: Option<String>,
}

/// Publishes a job; prints its jobId.
pub fn submit(args: SubmitArgs) -> Result<(), CliError> {
    let mut message = match &args.json {
        Some(source) => {
            let mut text = String::new();
            let read = if source == "-" {
                std::io::stdin().read_to_string(&mut text).map(|_| ())
            } else {
                std::fs::read_to_string(source).map(|t| text = t)
            };
            read.map_err(|e| CliError::failed(format!("reading the job from {source}: {e}")))?;
            serde_json::from_str::<Value>(&text).map_err(|e| {
                CliError::failed(format!(
                    "the job in {source} is not JSON: line {} column {}",
                    e.line(),
                    e.column()
                ))
            })?
        }
        None => {
            let token = read_secret_file(args.token_file.as_deref(), "token")
                .map_err(CliError::failed)?
                .unwrap_or_else(|| Secret::new(String::new()));
            let job = Job {
                job_id: String::new(),
                repo_url: args.repo.clone().unwrap_or_default(),
                branch: args.branch.clone(),
                dockerfile_path: args.dockerfile.clone(),
                context_dir: args.context.clone(),
                image_name: args.image.clone().unwrap_or_default(),
                github_token: token,
                timeout_seconds: args.timeout,
                dialect: Dialect::Blacktree,
            };
            job.to_json()
        }
    };
    let Value::Object(fields) = &mut message else {
        return Err(CliError::failed("a job must be a JSON object"));
    };
    let missing_id = fields
        .get("jobId")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty);
    if let Some(id) = &args.job_id {
        fields.insert("jobId".into(), json!(id));
    } else if missing_id {
        fields.insert("jobId".into(), json!(uuid::Uuid::new_v4().to_string()));
    }
    let body = serde_json::to_vec(&message).expect("JSON serialises");
    let job = Job::decode(&body, usize::MAX)
        .map_err(|r| CliError::failed(format!("not a valid job: {}", r.reason)))?;
    let key = &args.broker.topology.execute_key;
    args.broker.publish_confirmed(key, &body, &job.job_id)?;
    println!("{}", job.job_id);
    Ok(())
}

/// `blacktree cancel`.
#[derive(Args, Debug)]
pub struct CancelArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    /// The job to cancel.
    job_id: String,
}

/// Publishes a cancel request.
pub fn cancel(args: CancelArgs) -> Result<(), CliError> {
    let body = serde_json::to_vec(&json!({ "jobId": args.job_id })).expect("JSON serialises");
    let key = &args.broker.topology.cancel_key;
    args.broker.publish_confirmed(key, &body, &args.job_id)?;
    println!("cancel requested for {}", args.job_id);
    Ok(())
}

/// `blacktree watch`.
#[derive(Args, Debug)]
pub struct WatchArgs {
    /// The broker and the routing keys; with `--events-key`, events are shown too.
    #[command(flatten)]
    broker: BrokerArgs,
    /// Print each message as JSON.
    #[arg(long)]
    json: bool,
    /// Keep watching until interrupted.
    #[arg(long)]
    follow: bool,
    /// Stop after this many statuses.
    #[arg(long)]
    count: Option<usize>,
    /// Without --follow: stop after this long without a message.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    idle: Duration,
}

/// Prints statuses (and events) from a queue of its own, so it never takes messages
/// from the control plane.
pub fn watch(args: WatchArgs) -> Result<(), CliError> {
    let (connection, channel) = args.broker.connect()?;
    let topology = &args.broker.topology;
    let consumer = own_queue(&channel, topology)?;
    eprintln!(
        "watching {} (statuses{})",
        topology.exchange,
        if topology.events_key.is_empty() {
            ""
        } else {
            " and events"
        }
    );
    let started = Instant::now();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut statuses = 0;
    while args.count.is_none_or(|n| statuses < n) {
        let message = if args.follow {
            consumer.receiver().recv().ok()
        } else {
            consumer.receiver().recv_timeout(args.idle).ok()
        };
        let Some(ConsumerMessage::Delivery(delivery)) = message else {
            break;
        };
        let value: Value = serde_json::from_slice(&delivery.body).unwrap_or(Value::Null);
        let is_status = delivery.routing_key == topology.status_key;
        if args.json {
            println!("{value}");
        } else {
            println!("{}", watch_line(&value, is_status));
        }
        if is_status {
            statuses += 1;
            let outcome = value["outcome"].as_str().unwrap_or("").to_string();
            *outcomes.entry(outcome).or_default() += 1;
            if args.follow && statuses % 10 == 0 {
                eprintln!("{}", summary(statuses, &outcomes, started.elapsed()));
            }
        }
    }
    let _ = connection.close();
    eprintln!("{}", summary(statuses, &outcomes, started.elapsed()));
    Ok(())
}

/// Consumes an exclusive, auto-deleted queue of its own bound to the status (and
/// events) key, so `watch` never takes a message from the control plane's queues.
fn own_queue<'a>(
    channel: &'a Channel,
    topology: &Topology,
) -> Result<amiquip::Consumer<'a>, CliError> {
    let amqp = |e: amiquip::Error| CliError::failed(format!("watching {}: {e}", topology.exchange));
    declare_exchange(channel, &topology.exchange).map_err(amqp)?;
    let queue = channel
        .queue_declare(
            "",
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
        )
        .map_err(amqp)?;
    let keys = [&topology.status_key, &topology.events_key];
    for key in keys.iter().filter(|k| !k.is_empty()) {
        channel
            .queue_bind(
                queue.name(),
                topology.exchange.as_str(),
                key.as_str(),
                FieldTable::new(),
            )
            .map_err(amqp)?;
    }
    channel
        .basic_consume(
            queue.name(),
            ConsumerOptions {
                no_ack: true,
                ..ConsumerOptions::default()
            },
        )
        .map_err(amqp)
}

/// One line of `watch`: `jobId outcome worker=ID NNNms [error=…]` for a status,
/// `jobId event worker=ID` for an event.
fn watch_line(value: &Value, is_status: bool) -> String {
    let text = |key: &str| value[key].as_str().unwrap_or("");
    if !is_status {
        return format!(
            "{} {} worker={}",
            text("jobId"),
            text("event"),
            text("workerId")
        );
    }
    let error = text("error");
    format!(
        "{} {} worker={} {}ms{}",
        text("jobId"),
        text("outcome"),
        text("workerId"),
        value["durationMs"].as_u64().unwrap_or(0),
        if error.is_empty() {
            String::new()
        } else {
            format!(" error={error}")
        }
    )
}

fn summary(statuses: usize, outcomes: &BTreeMap<String, usize>, elapsed: Duration) -> String {
    let parts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{n} {o}")).collect();
    format!(
        "summary: {statuses} jobs in {:.1}s ({})",
        elapsed.as_secs_f64(),
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    )
}

/// `blacktree workers`.
#[derive(Args, Debug)]
pub struct WorkersArgs {
    #[command(flatten)]
    tls: TlsArgs,
    /// The orchestrator's gRPC address.
    #[arg(long, env = "BLACKTREE_ORCHESTRATOR", default_value = "127.0.0.1:5051")]
    orchestrator: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// File holding the orchestrator's registration token, when it requires one.
    #[arg(long, env = "BLACKTREE_REGISTRATION_TOKEN_FILE")]
    registration_token_file: Option<PathBuf>,
}

/// Lists the orchestrator's workers.
pub fn workers(args: WorkersArgs) -> Result<(), CliError> {
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let tls = Tls::load(&args.tls).map_err(CliError::failed)?;
    let channel = grpc::connect(ChannelBuilder::new(env), &args.orchestrator, tls.as_ref());
    let client = WorkerServiceClient::new(channel);
    let token = read_secret_file(
        args.registration_token_file.as_deref(),
        "registration token",
    )
    .map_err(CliError::failed)?;
    let options = grpc::with_token(
        CallOption::default().timeout(Duration::from_secs(5)),
        token.as_ref(),
    );
    let answer = client
        .list_workers_opt(&ListWorkersRequest::default(), options)
        .map_err(|e| orchestrator_error(&args.orchestrator, e))?;
    let views: Vec<WorkerView> = answer.workers.iter().map(WorkerView::from_proto).collect();
    if args.json {
        println!(
            "{}",
            Value::Array(views.iter().map(WorkerView::to_json).collect())
        );
        return Ok(());
    }
    println!(
        "{:<24} {:<22} {:<10} {:>8} {:>9} {:>10}",
        "ID", "ADDRESS", "STATE", "CAPACITY", "IN FLIGHT", "LAST PING"
    );
    for w in &views {
        let last = w
            .last_ping
            .map_or("never".to_string(), |d| format!("{}ms ago", d.as_millis()));
        println!(
            "{:<24} {:<22} {:<10} {:>8} {:>9} {:>10}",
            w.id, w.addr, w.state, w.capacity, w.in_flight, last
        );
    }
    Ok(())
}

/// A failed call to the orchestrator: refused (wrong token) or unreachable.
fn orchestrator_error(addr: &str, e: grpcio::Error) -> CliError {
    match e {
        grpcio::Error::RpcFailure(s) if s.code() == grpcio::RpcStatusCode::UNAUTHENTICATED => {
            CliError::failed(format!(
                "the orchestrator at {addr} refused the call: {} (set --registration-token-file)",
                s.message()
            ))
        }
        e => CliError {
            code: EXIT_UNREACHABLE,
            message: format!(
                "cannot reach the orchestrator at {addr}: {e} (is it running? set --orchestrator or BLACKTREE_ORCHESTRATOR)"
            ),
        },
    }
}

/// `blacktree healthcheck`.
#[derive(Args, Debug)]
pub struct HealthcheckArgs {
    #[command(flatten)]
    target: HealthTarget,
    #[command(flatten)]
    tls: TlsArgs,
}

/// What `healthcheck` checks: exactly one target.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct HealthTarget {
    /// Check an orchestrator's gRPC health service (`HOST:PORT`).
    #[arg(long)]
    orchestrator: Option<String>,
    /// Check a worker's gRPC health service (`HOST:PORT`).
    #[arg(long)]
    worker: Option<String>,
    /// Check an orchestrator's HTTP health URL (e.g. `http://127.0.0.1:9464/healthz`).
    #[arg(long)]
    metrics: Option<String>,
}

/// Exits 0 when the target reports SERVING; otherwise prints one line saying why.
pub fn healthcheck(args: HealthcheckArgs) -> Result<(), CliError> {
    let target = &args.target;
    let (role, addr) = match (&target.orchestrator, &target.worker, &target.metrics) {
        (Some(addr), _, _) => ("orchestrator", addr),
        (None, Some(addr), _) => ("worker", addr),
        (None, None, Some(url)) => return http_health(url),
        (None, None, None) => unreachable!("clap requires one target"),
    };
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let tls = Tls::load(&args.tls).map_err(CliError::failed)?;
    let client = HealthClient::new(grpc::connect(ChannelBuilder::new(env), addr, tls.as_ref()));
    let answer = client
        .check_opt(
            &HealthCheckRequest::default(),
            CallOption::default().timeout(Duration::from_secs(3)),
        )
        .map_err(|e| CliError::failed(format!("{role} at {addr} is unhealthy: {e}")))?;
    if answer.status == ServingStatus::Serving {
        println!("{role} at {addr} is healthy");
        Ok(())
    } else {
        Err(CliError::failed(format!(
            "{role} at {addr} is unhealthy: {:?}",
            answer.status
        )))
    }
}

/// `GET url` over plain HTTP/1.0: healthy when the answer is 200.
fn http_health(url: &str) -> Result<(), CliError> {
    let unhealthy = |why: String| CliError::failed(format!("{url} is unhealthy: {why}"));
    let parsed =
        url::Url::parse(url).map_err(|e| CliError::failed(format!("{url} is not a URL: {e}")))?;
    if parsed.scheme() != "http" {
        return Err(CliError::failed(format!(
            "{url}: only http:// is supported"
        )));
    }
    let host = parsed.host_str().unwrap_or("127.0.0.1");
    let addr = (host, parsed.port_or_known_default().unwrap_or(80))
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| unhealthy("cannot resolve the host".into()))?;
    let timeout = Duration::from_secs(3);
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| unhealthy(e.to_string()))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let request = format!("GET {} HTTP/1.0\r\nHost: {host}\r\n\r\n", parsed.path());
    stream
        .write_all(request.as_bytes())
        .map_err(|e| unhealthy(e.to_string()))?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status_line = answer.lines().next().unwrap_or("no answer");
    if status_line.split_whitespace().nth(1) == Some("200") {
        println!("{url} is healthy");
        Ok(())
    } else {
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        Err(unhealthy(format!("{status_line} {body}")))
    }
}
