//! `blacktree worker`: the build worker agent.
//!
//! It serves `JobService` (RunJob, Ping, CancelJob: [`service`]) and grpc.health.v1,
//! and keeps itself registered with the orchestrator. Threads:
//! * grpcio's threads run the handlers, which never block: `RunJob` takes a slot and
//!   starts a job thread, or attaches to the running job of that jobId ([`jobs`]);
//! * one thread per running job ([`executor`]), plus a watchdog when the job has a
//!   deadline; a job runs on when its caller goes away, and its answer is held;
//! * one check-in thread per orchestrator (`--orchestrator a:5051,b:5051`) registers
//!   (retrying with capped backoff) and then asks `WorkerService.Ping{id}` every
//!   `--check-in-interval`, registering again when that orchestrator no longer knows it
//!   (after its restart); both carry the jobIds it runs and holds answers for, so an
//!   orchestrator adopts the builds another one started.

pub mod checks;
pub mod executor;
pub mod jobs;
pub mod live_log;
pub mod metrics;
pub mod service;
pub mod workspace;

use std::collections::HashSet;
use std::net::{ToSocketAddrs, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use grpcio::{CallOption, ChannelBuilder, EnvBuilder};
use grpcio_health::create_health;
use log::{debug, info, warn};
use protobuf::RepeatedField;

use crate::config::{read_secret_file, WorkerConfig};
use crate::grpc::serving::{Serving, WORKER_SERVICE};
use crate::grpc::{self, Tls};
use crate::job::Secret;
use crate::labels::Labels;
use crate::proto::worker::{self, WorkerInfo};
use crate::proto::worker_grpc::WorkerServiceClient;
use executor::Executor;
use jobs::JobTable;
use service::Agent;

/// Runs the worker agent until SIGINT/SIGTERM.
pub fn run(config: WorkerConfig) -> Result<(), String> {
    let id = config.id.clone().unwrap_or_else(default_id);
    let metrics = Arc::new(metrics::WorkerMetrics::default());
    let executor = Arc::new(Executor::new(&config, metrics.steps.clone())?);
    let tls = Tls::load(&config.tls)?;
    let token = read_secret_file(
        config.registration_token_file.as_deref(),
        "registration token",
    )?;
    if token.is_none() && tls.is_none() {
        warn!("neither --registration-token-file nor TLS: anyone who reaches this worker's port can run builds on it (with its registry credentials)");
    }
    let env = Arc::new(EnvBuilder::new().name_prefix("grpc").cq_count(2).build());
    let jobs = Arc::new(JobTable::new(config.capacity as usize, config.hold_results));
    let agent = Agent {
        id: id.clone(),
        jobs: jobs.clone(),
        executor,
        token: token.clone(),
        draining: Arc::default(),
        drained: Arc::default(),
        metrics: metrics.clone(),
    };
    let health = Arc::new(Serving::new(WORKER_SERVICE, &[REGISTERED]));
    let mut server = grpc::server_builder(env.clone())
        .register_service(service::job_service(agent.clone()))
        .register_service(create_health(health.service()))
        .build()
        .map_err(|e| format!("building the gRPC server: {e}"))?;
    grpc::check_listen(&config.listen, "--listen", "BLACKTREE_WORKER_LISTEN")?;
    let port = server
        .add_listening_port(
            config.listen.as_str(),
            grpc::server_credentials(tls.as_ref()),
        )
        .map_err(|e| format!("worker cannot listen on {}: {e}", config.listen))?;
    server.start();
    let advertise = match &config.advertise {
        Some(addr) => addr.clone(),
        None => format!("{}:{port}", local_ip_towards(&config.orchestrator[0])?),
    };
    info!(
        "worker {id} listening on port {port} ({}), advertised as {advertise}, capacity {}, {:?} executor",
        config.listen, config.capacity, config.executor
    );
    if !config.metrics_listen.is_empty() {
        let port = metrics.serve(&config.metrics_listen, jobs.clone())?;
        info!(
            "metrics listening on port {port} ({})",
            config.metrics_listen
        );
    }
    let info = registration_info(&config, &id, &advertise)?;
    let registrations = Arc::new(Registrations {
        with: Mutex::default(),
        serving: health.clone(),
    });
    for orchestrator in config.orchestrator.iter().filter(|o| !o.is_empty()) {
        let check_in = CheckIn {
            env: env.clone(),
            orchestrator: orchestrator.clone(),
            tls: tls.clone(),
            info: info.clone(),
            token: token.clone(),
            interval: config.check_in_interval,
            registrations: registrations.clone(),
        };
        let jobs = jobs.clone();
        std::thread::Builder::new()
            .name("check-in".into())
            .spawn(move || check_in.run(&jobs))
            .map_err(|e| format!("spawning the check-in thread: {e}"))?;
    }

    wait_and_stop(&agent, &health, config.drain_timeout)
}

/// What the worker tells the orchestrator at registration.
fn registration_info(
    config: &WorkerConfig,
    id: &str,
    advertise: &str,
) -> Result<WorkerInfo, String> {
    let (host, port) = advertise
        .rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_matches(['[', ']']).to_string(),
                p.parse::<i32>().ok()?,
            ))
        })
        .ok_or_else(|| format!("--advertise {advertise} is not IP:PORT"))?;
    Ok(WorkerInfo {
        id: id.to_string(),
        ip: host,
        port,
        region: config.region.clone(),
        capacity: config.capacity as i32,
        labels: Labels::new(config.labels.clone())
            .map_err(|e| format!("--label: {e}"))?
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..WorkerInfo::default()
    })
}

/// Waits for SIGTERM/SIGINT, then drains: grpc.health.v1 says NOT_SERVING, Ping answers
/// BUSY and RunJob RESOURCE_EXHAUSTED (nothing new starts), and the running jobs get up
/// to `drain_timeout` to finish. What still runs then, or at a second signal, is
/// stopped; the job threads get a moment to answer their calls before the process ends.
fn wait_and_stop(agent: &Agent, health: &Serving, drain_timeout: Duration) -> Result<(), String> {
    let (signal_tx, signal_rx) = bounded(2);
    ctrlc::set_handler(move || {
        let _ = signal_tx.try_send(());
    })
    .map_err(|e| format!("installing the signal handler: {e}"))?;
    let _ = signal_rx.recv();
    agent.draining.store(true, Ordering::SeqCst);
    health.set(RUNNING, false);
    let jobs = &agent.jobs;
    info!(
        "signal received: draining, {} get up to {} to finish (a second signal stops them)",
        crate::plural::count(jobs.running_count(), "running job"),
        humantime::format_duration(drain_timeout)
    );
    let deadline = Instant::now() + drain_timeout;
    let mut reason = "the drain timeout passed";
    while jobs.running_count() > 0 && Instant::now() < deadline {
        if signal_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
            reason = "a second signal";
            break;
        }
    }
    let running = jobs.running_controls();
    if !running.is_empty() {
        warn!(
            "{reason}: stopping {}",
            crate::plural::count(running.len(), "running job")
        );
    }
    for control in &running {
        control.cancel("cancelled: the worker is shutting down");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while jobs.running_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    info!("worker stopped");
    Ok(())
}

/// The hostname plus a random suffix.
fn default_id() -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}", crate::instance::host_name(), &suffix[..6])
}

/// The local address of the interface that routes to `target` (no packet is sent).
fn local_ip_towards(target: &str) -> Result<std::net::IpAddr, String> {
    let addr = target
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("cannot resolve the orchestrator address {target}"))?;
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    socket
        .connect(addr)
        .and_then(|()| socket.local_addr())
        .map(|a| a.ip())
        .map_err(|e| format!("no route to the orchestrator {target}: {e}; set --advertise"))
}

/// A health condition: registered with an orchestrator (one at least).
const REGISTERED: &str = "registered with an orchestrator";
/// A health condition: no drain started.
const RUNNING: &str = "not draining";

/// The orchestrators this worker is registered with now; its health is SERVING only
/// while there is one (and it does not drain).
struct Registrations {
    with: Mutex<HashSet<String>>,
    serving: Arc<Serving>,
}

impl Registrations {
    /// Records whether this worker is registered with `orchestrator` (a ping it failed
    /// to answer counts as not).
    fn set(&self, orchestrator: &str, registered: bool) {
        let mut with = self.with.lock().expect("registrations lock");
        if registered {
            with.insert(orchestrator.to_string());
        } else {
            with.remove(orchestrator);
        }
        self.serving.set(REGISTERED, !with.is_empty());
    }
}

/// What one check-in thread needs: the orchestrator it keeps this worker registered
/// with, and what it tells it.
struct CheckIn {
    env: Arc<grpcio::Environment>,
    orchestrator: String,
    tls: Option<Tls>,
    info: WorkerInfo,
    token: Option<Secret>,
    interval: Duration,
    registrations: Arc<Registrations>,
}

impl CheckIn {
    /// Registers (with capped backoff), then checks in every `interval`, registering
    /// again whenever the orchestrator says it no longer knows this worker.
    fn run(self, jobs: &JobTable) {
        let CheckIn {
            env,
            orchestrator,
            tls,
            info,
            token,
            interval,
            registrations,
        } = self;
        let orchestrator = orchestrator.as_str();
        let channel = grpc::connect(ChannelBuilder::new(env), orchestrator, tls.as_ref());
        let client = WorkerServiceClient::new(channel);
        let call = || {
            let options = CallOption::default().timeout(Duration::from_secs(5));
            grpc::with_token(options, token.as_ref())
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            let (running, held) = jobs.report();
            let info = WorkerInfo {
                jobIds: RepeatedField::from_vec(running),
                heldJobIds: RepeatedField::from_vec(held),
                ..info.clone()
            };
            match client.register_opt(&info, call()) {
                Ok(ack) if ack.success => {
                    info!(
                        "registered with the orchestrator at {orchestrator}: {}",
                        ack.message
                    );
                    registrations.set(orchestrator, true);
                    backoff = Duration::from_millis(200);
                    loop {
                        std::thread::sleep(interval);
                        let (running, held) = jobs.report();
                        let ping = worker::PingRequest {
                            id: info.id.clone(),
                            jobIds: RepeatedField::from_vec(running),
                            heldJobIds: RepeatedField::from_vec(held),
                            ..worker::PingRequest::default()
                        };
                        let answer = client.ping_opt(&ping, call());
                        registrations.set(orchestrator, matches!(&answer, Ok(p) if p.healthy));
                        match answer {
                            Ok(pong) if pong.healthy => {}
                            Ok(_) => {
                                info!(
                                "the orchestrator no longer knows this worker: registering again"
                            );
                                break;
                            }
                            Err(e) => debug!("orchestrator {orchestrator} unreachable: {e}"),
                        }
                    }
                    continue;
                }
                Ok(ack) => warn!(
                    "the orchestrator at {orchestrator} refused the registration: {}",
                    ack.message
                ),
                Err(grpcio::Error::RpcFailure(s))
                    if s.code() == grpcio::RpcStatusCode::UNIMPLEMENTED =>
                {
                    warn!(
                        "{orchestrator} is not a Blacktree orchestrator: it does not serve \
                         WorkerService (check --orchestrator); retrying in {}",
                        humantime::format_duration(backoff)
                    )
                }
                Err(e) => warn!(
                    "cannot register with the orchestrator at {orchestrator}: {e}; retrying in {}",
                    humantime::format_duration(backoff)
                ),
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}
