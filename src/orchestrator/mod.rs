//! `blacktree orchestrator`: starts every thread of the service, wires their channels,
//! and turns SIGINT/SIGTERM into a drain.
//!
//! ```text
//!  AMQP consumer ──jobs (bounded)──▶ dispatch pool ──RunJob──▶ workers
//!      ▲  inbox: Confirmed / Requeue / Drain      │  ▲ hints
//!      │                                          ▼  │
//!  status publisher ◀──publications──────── registry ◀── health ticker ──Ping──▶ workers
//!                                                  ▲
//!                              gRPC server: Register / Ping (workers → us)
//! ```

pub mod dispatch;
pub mod health;
pub mod http;
pub mod page;
pub mod registration;
pub mod registry;
pub mod state_file;

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
use grpcio::{EnvBuilder, Environment};
use log::{info, warn};

use crate::amqp::consumer::{self, ConsumerConfig, ConsumerLinks};
use crate::amqp::ledger::LedgerConfig;
use crate::amqp::publisher::{self, PublisherConfig};
use crate::amqp::Brokers;
use crate::config::{read_secret_file, OrchestratorConfig, StaticWorker};
use crate::grpc::Tls;
use crate::job::Secret;
use crate::labels::Labels;
use crate::metrics::Metrics;
use crate::pipeline::{ConsumerMsg, LogBudget};
use crate::web::HttpAuth;

/// The bytes of live build output the orchestrator holds at once, between the dispatch
/// threads and the broker's confirms (`--logs-key`); lines beyond them are dropped.
const LOG_BUDGET_BYTES: usize = 8 << 20;
use dispatch::{DispatchLinks, DispatchSettings};
use registry::{Hint, Origin, Registry, RegistrySettings};
use state_file::{EarlyCancel, Remembered, Remembrance, StateFile};

/// The state file, if any, and the early cancels it remembered at start.
struct Memory {
    file: Option<Arc<StateFile>>,
    cancels: Vec<EarlyCancel>,
}

/// Runs the orchestrator until a signal's drain has finished.
pub fn run(config: OrchestratorConfig) -> Result<(), String> {
    if let Some(id) = &config.instance_id {
        crate::instance::show_in_logs(id);
    }
    info!("orchestrator starting: {config}");
    let brokers = Brokers::parse(&config.broker.amqp_url)?;
    // One completion-queue thread serves every call (measured: as fast as two, one
    // thread fewer).
    let env = Arc::new(EnvBuilder::new().name_prefix("grpc").cq_count(1).build());
    let tls = Tls::load(&config.tls)?;
    let token = read_secret_file(
        config.registration_token_file.as_deref(),
        "registration token",
    )?;
    if token.is_none() {
        warn!("no --registration-token-file: any client that reaches the gRPC port can register as a worker");
    }
    let (hints_tx, hints_rx) = unbounded();
    let registry = Registry::new(
        env.clone(),
        hints_tx,
        RegistrySettings {
            unhealthy_after: config.unhealthy_after,
            lost_after: config.lost_after,
            keepalive: crate::grpc::Keepalive::for_lost_after(config.lost_after),
            forget_after: config.forget_after,
            tls: tls.clone(),
            token: token.clone(),
            max_workers: config.max_workers as usize,
        },
    );
    let (state_file, remembered) = match state_file::open(config.state_file.as_deref())? {
        Some((file, remembered)) => (Some(Arc::new(file)), remembered),
        None => (None, Remembrance::default()),
    };
    restore(&registry, &remembered.workers, &config.workers);
    for worker in &config.workers {
        registry.register(
            &worker.id,
            &worker.addr,
            "",
            &Labels::default(),
            1,
            Origin::Static,
        );
    }
    // Attached once the start's registrations are in: one write for all of them.
    let registry = Arc::new(match &state_file {
        Some(file) => registry.remembered_in(file.clone()),
        None => registry,
    });
    let (server, metrics) = serve(&config, env, &registry, token, tls.as_ref())?;
    let memory = Memory {
        file: state_file,
        cancels: remembered.cancels,
    };
    let pipeline = spawn_threads(&config, brokers, registry, metrics, hints_rx, memory);
    wait_and_drain(&config, &server, pipeline)?;
    info!("orchestrator stopped");
    Ok(())
}

/// Brings back the registered workers a state file remembers. Static ones come from
/// `--worker` alone: one that the flag no longer names was removed by the operator.
fn restore(registry: &Registry, remembered: &[Remembered], named: &[StaticWorker]) {
    for worker in remembered {
        if worker.is_static {
            if !named.iter().any(|w| w.id == worker.id) {
                info!(
                    "worker {} ({}) was named by --worker and no longer is: not restored",
                    worker.id, worker.address
                );
            }
            continue;
        }
        info!(
            "worker {} ({}) restored from the state file: no jobs until it answers a ping",
            worker.id, worker.address
        );
        registry.register(
            &worker.id,
            &worker.address,
            &worker.region,
            &worker.labels,
            worker.capacity,
            Origin::Restored,
        );
    }
}

/// Starts the gRPC server and, named by the instance id (the bound port is its default),
/// the metrics and the HTTP endpoint.
fn serve(
    config: &OrchestratorConfig,
    env: Arc<Environment>,
    registry: &Arc<Registry>,
    token: Option<Secret>,
    tls: Option<&Tls>,
) -> Result<(registration::OrchestratorServer, Arc<Metrics>), String> {
    let policy = registration::Policy {
        token,
        max_capacity: config.max_worker_capacity,
        ping_timeout: config.health_timeout,
    };
    let server = registration::serve(env, &config.grpc_listen, registry.clone(), policy, tls)?;
    let id = config
        .instance_id
        .clone()
        .unwrap_or_else(|| crate::instance::default_id(server.port));
    crate::instance::show_in_logs(&id);
    info!("instance id {id}");
    let metrics = Arc::new(Metrics::for_instance(
        &id,
        config.dispatch_threads,
        config.finished_jobs,
    ));
    let health = server.health.clone();
    metrics.watch_broker(move |connected, blocked| {
        health.set(registration::CONNECTED, connected);
        health.set(registration::UNBLOCKED, !blocked);
    });
    if !config.metrics_listen.is_empty() {
        let auth = read_secret_file(config.http_auth_file.as_deref(), "HTTP auth token")?;
        let sources = page::Sources {
            metrics: metrics.clone(),
            registry: registry.clone(),
            instance_id: id.clone(),
        };
        let port = http::serve(&config.metrics_listen, sources, auth.map(HttpAuth::new))?;
        info!(
            "metrics listening on port {port} ({})",
            config.metrics_listen
        );
    }
    info!(
        "gRPC server listening on port {} ({})",
        server.port, config.grpc_listen
    );
    Ok((server, metrics))
}

/// What the main thread keeps of the running threads to drain them.
struct Pipeline {
    /// The consumer thread; it ends when the drain has finished.
    consumer: JoinHandle<()>,
    /// Its inbox, to send `Drain`.
    inbox: Sender<ConsumerMsg>,
    /// Dropped to tell the dispatch threads that the drain started.
    shutdown: Sender<()>,
}

/// Starts the publisher, the consumer, the dispatch pool and the health ticker, wired
/// as ARCHITECTURE.md draws them.
fn spawn_threads(
    config: &OrchestratorConfig,
    brokers: Brokers,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    hints: Receiver<Hint>,
    memory: Memory,
) -> Pipeline {
    let events = config.topology.events_on();
    let (inbox_tx, inbox_rx) = unbounded();
    // Bounded by the prefetch: a job waits here for a free dispatch thread without
    // a hand-off per job; the consumer takes back what no thread has taken.
    let (jobs_tx, jobs_rx) = bounded(usize::from(config.prefetch().max(1)));
    let (publications_tx, publications_rx) = unbounded();
    let (connections_tx, connections_rx) = unbounded();
    let (shutdown_tx, shutdown_rx) = bounded::<()>(0);

    let log_budget = Arc::new(LogBudget::new(LOG_BUDGET_BYTES));
    publisher::spawn(
        PublisherConfig {
            topology: config.topology.clone(),
            instance_id: metrics.instance_id().to_string(),
            max_status_bytes: config.max_status_bytes,
        },
        publications_rx,
        connections_rx,
        inbox_tx.clone(),
        metrics.clone(),
        log_budget.clone(),
    );
    // Log lines now wait for the publisher's next message (it writes them first) or a
    // few milliseconds: the lines of several jobs go out in one write.
    crate::log_sink::defer();
    let consumer = consumer::spawn(
        ConsumerConfig {
            brokers,
            topology: config.topology.clone(),
            instance_id: metrics.instance_id().to_string(),
            prefetch: config.prefetch(),
            max_parked: config.max_parked_jobs,
            ledger: LedgerConfig {
                max_message_bytes: config.max_message_bytes,
                dedupe_window: config.dedupe_window,
                drain_timeout: config.drain_timeout,
                cancel_ttl: config.cancel_ttl,
                events,
                derived_image_prefix: config.derived_image_prefix.clone(),
                unroutable_after: config.unroutable_after,
            },
            remembered_cancels: memory.cancels,
        },
        ConsumerLinks {
            inbox: inbox_rx,
            jobs: jobs_tx,
            unstarted: jobs_rx.clone(),
            publications: publications_tx.clone(),
            connections: connections_tx,
            metrics: metrics.clone(),
            state_file: memory.file,
            routing: registry.routing_changes(),
            router: registry.clone(),
        },
    );
    dispatch::spawn_pool(
        DispatchSettings {
            threads: config.dispatch_threads,
            job_timeout: config.job_timeout,
            adopt_wait: config.adopt_wait,
            events,
            logs: config.topology.logs_on(),
        },
        DispatchLinks {
            jobs: jobs_rx,
            hints,
            shutdown: shutdown_rx,
            publications: publications_tx,
            consumer: inbox_tx.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            log_budget,
        },
    );
    health::spawn(
        registry,
        metrics,
        config.health_interval,
        config.health_timeout,
    );
    Pipeline {
        consumer,
        inbox: inbox_tx,
        shutdown: shutdown_tx,
    }
}

/// Waits for SIGTERM/SIGINT, then drains: grpc.health.v1 says NOT_SERVING, dispatch
/// threads waiting for a slot give their job back, the consumer requeues what did not
/// start and ends once running jobs are confirmed. A second signal exits at once.
fn wait_and_drain(
    config: &OrchestratorConfig,
    server: &registration::OrchestratorServer,
    pipeline: Pipeline,
) -> Result<(), String> {
    let (signals_tx, signals) = unbounded();
    ctrlc::set_handler(move || {
        let _ = signals_tx.send(());
    })
    .map_err(|e| format!("installing the signal handler: {e}"))?;
    signals
        .recv()
        .map_err(|_| "the signal handler stopped".to_string())?;
    info!(
        "signal received: draining (up to {}); a second signal exits at once",
        humantime::format_duration(config.drain_timeout)
    );
    server.health.set(registration::RUNNING, false);
    std::thread::spawn(move || {
        if signals.recv().is_ok() {
            warn!("second signal: exiting without waiting for running jobs");
            crate::log_sink::flush();
            std::process::exit(1);
        }
    });
    drop(pipeline.shutdown);
    pipeline
        .inbox
        .send(ConsumerMsg::Drain)
        .map_err(|_| "the AMQP consumer thread has stopped".to_string())?;
    pipeline
        .consumer
        .join()
        .map_err(|_| "the AMQP consumer thread panicked".to_string())
}
