//! `blacktree worker`: the build worker agent.
//!
//! It serves `JobService` (RunJob, Ping, CancelJob) and grpc.health.v1, and keeps itself
//! registered with the orchestrator. Threads:
//! * grpcio's threads run the handlers, which never block: `RunJob` takes a slot and
//!   moves the call's sink to a job thread of its own;
//! * one thread per running job ([`executor`]), plus a watchdog when the job has a
//!   deadline;
//! * the check-in thread registers (retrying with capped backoff) and then asks
//!   `WorkerService.Ping{id}` every `--check-in-interval`, registering again when the
//!   orchestrator no longer knows it (after an orchestrator restart).

pub mod checks;
pub mod executor;
pub mod workspace;

use std::collections::HashMap;
use std::net::{ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError};
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Poll, Waker};

use futures_sink::Sink;
use grpcio::{
    CallOption, ChannelBuilder, EnvBuilder, Marshaller, Method, MethodType, RpcContext, RpcStatus,
    RpcStatusCode, ServerStreamingSink, ServiceBuilder, UnarySink, WriteFlags,
};
use grpcio_health::{create_health, HealthService, ServingStatus};
use log::{debug, info, warn};

use crate::config::{read_secret_file, WorkerConfig};
use crate::grpc::{self, Tls};
use crate::job::Secret;
use crate::proto::job::{
    CancelJobRequest, CancelJobResponse, JobRequest, JobResponse, PingRequest, PingResponse,
    WorkerStatus,
};
use crate::proto::worker::{self, WorkerInfo};
use crate::proto::worker_grpc::WorkerServiceClient;
use executor::{Executor, JobControl};

/// Runs the worker agent until SIGINT/SIGTERM.
pub fn run(config: WorkerConfig) -> Result<(), String> {
    let id = config.id.clone().unwrap_or_else(default_id);
    let executor = Arc::new(Executor::new(&config)?);
    let tls = Tls::load(&config.tls)?;
    let token = read_secret_file(
        config.registration_token_file.as_deref(),
        "registration token",
    )?;
    if token.is_none() && tls.is_none() {
        warn!("neither --registration-token-file nor TLS: anyone who reaches this worker's port can run builds on it (with its registry credentials)");
    }
    let env = Arc::new(EnvBuilder::new().name_prefix("grpc").cq_count(2).build());
    let agent = Agent {
        id: id.clone(),
        capacity: config.capacity as usize,
        running: Arc::new(Mutex::new(HashMap::new())),
        executor,
        token: token.clone(),
        draining: Arc::default(),
    };
    let health = HealthService::default();
    health.set_serving_status("", ServingStatus::Serving);
    let mut server = grpc::server_builder(env.clone())
        .register_service(job_service(agent.clone()))
        .register_service(create_health(health.clone()))
        .build()
        .map_err(|e| format!("building the gRPC server: {e}"))?;
    let port = server
        .add_listening_port(
            config.listen.as_str(),
            grpc::server_credentials(tls.as_ref()),
        )
        .map_err(|e| format!("worker cannot listen on {}: {e}", config.listen))?;
    server.start();
    let advertise = match &config.advertise {
        Some(addr) => addr.clone(),
        None => format!("{}:{port}", local_ip_towards(&config.orchestrator)?),
    };
    info!(
        "worker {id} listening on port {port} ({}), advertised as {advertise}, capacity {}, {:?} executor",
        config.listen, config.capacity, config.executor
    );
    let info = registration_info(&config, &id, &advertise)?;
    let orchestrator = config.orchestrator.clone();
    let interval = config.check_in_interval;
    std::thread::Builder::new()
        .name("check-in".into())
        .spawn(move || check_in(env, &orchestrator, tls, info, token, interval))
        .map_err(|e| format!("spawning the check-in thread: {e}"))?;

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
        ..WorkerInfo::default()
    })
}

/// Waits for SIGTERM/SIGINT, then drains: grpc.health.v1 says NOT_SERVING, Ping answers
/// BUSY and RunJob RESOURCE_EXHAUSTED (nothing new starts), and the running jobs get up
/// to `drain_timeout` to finish. What still runs then, or at a second signal, is
/// stopped; the job threads get a moment to answer their calls before the process ends.
fn wait_and_stop(
    agent: &Agent,
    health: &HealthService,
    drain_timeout: Duration,
) -> Result<(), String> {
    let (signal_tx, signal_rx) = bounded(2);
    ctrlc::set_handler(move || {
        let _ = signal_tx.try_send(());
    })
    .map_err(|e| format!("installing the signal handler: {e}"))?;
    let _ = signal_rx.recv();
    agent.draining.store(true, Ordering::SeqCst);
    health.set_serving_status("", ServingStatus::NotServing);
    info!(
        "signal received: draining, {} running job(s) get up to {} to finish (a second signal stops them)",
        agent.running_count(),
        humantime::format_duration(drain_timeout)
    );
    let deadline = Instant::now() + drain_timeout;
    let mut reason = "the drain timeout passed";
    while agent.running_count() > 0 && Instant::now() < deadline {
        if signal_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
            reason = "a second signal";
            break;
        }
    }
    let running: Vec<Arc<JobControl>> = agent
        .running
        .lock()
        .expect("slots lock")
        .values()
        .cloned()
        .collect();
    if !running.is_empty() {
        warn!("{reason}: stopping {} running job(s)", running.len());
    }
    for control in &running {
        control.cancel("cancelled: the worker is shutting down");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.running_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    info!("worker stopped");
    Ok(())
}

/// The hostname plus a random suffix.
fn default_id() -> String {
    let host =
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "worker".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}", host.trim(), &suffix[..6])
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

/// Registers (with capped backoff), then checks in every `interval`, registering
/// again whenever the orchestrator says it no longer knows this worker.
fn check_in(
    env: Arc<grpcio::Environment>,
    orchestrator: &str,
    tls: Option<Tls>,
    info: WorkerInfo,
    token: Option<Secret>,
    interval: Duration,
) {
    let channel = grpc::connect(ChannelBuilder::new(env), orchestrator, tls.as_ref());
    let client = WorkerServiceClient::new(channel);
    let call = || {
        let options = CallOption::default().timeout(Duration::from_secs(5));
        grpc::with_token(options, token.as_ref())
    };
    let ping = worker::PingRequest {
        id: info.id.clone(),
        ..worker::PingRequest::default()
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        match client.register_opt(&info, call()) {
            Ok(ack) if ack.success => {
                info!(
                    "registered with the orchestrator at {orchestrator}: {}",
                    ack.message
                );
                backoff = Duration::from_millis(200);
                loop {
                    std::thread::sleep(interval);
                    match client.ping_opt(&ping, call()) {
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
            Err(e) => warn!(
                "cannot register with the orchestrator at {orchestrator}: {e}; retrying in {}",
                humantime::format_duration(backoff)
            ),
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// The `JobService` of the worker.
#[derive(Clone)]
struct Agent {
    id: String,
    capacity: usize,
    /// Running jobs → their control (to cancel them).
    running: Arc<Mutex<HashMap<String, Arc<JobControl>>>>,
    executor: Arc<Executor>,
    /// The registration token every call must carry, if one is configured.
    token: Option<Secret>,
    /// Set at SIGTERM: nothing new starts.
    draining: Arc<AtomicBool>,
}

/// `RunJob` served as a server-streaming method that sends exactly one message: on the
/// wire that is a unary answer, and unlike a unary sink, a streaming sink shows when the
/// caller cancelled the call (or its connection died), so the job can be stopped.
const RUN_JOB: Method<JobRequest, JobResponse> =
    pb_method(MethodType::ServerStreaming, "/job.JobService/RunJob");
const PING: Method<PingRequest, PingResponse> =
    pb_method(MethodType::Unary, "/job.JobService/Ping");
const CANCEL_JOB: Method<CancelJobRequest, CancelJobResponse> =
    pb_method(MethodType::Unary, "/job.JobService/CancelJob");

/// A method of `proto/job.proto` with protobuf (de)serialisation.
const fn pb_method<Req: protobuf::Message, Resp: protobuf::Message>(
    ty: MethodType,
    name: &'static str,
) -> Method<Req, Resp> {
    Method {
        ty,
        name,
        req_mar: Marshaller {
            ser: grpcio::pb_ser,
            de: grpcio::pb_de,
        },
        resp_mar: Marshaller {
            ser: grpcio::pb_ser,
            de: grpcio::pb_de,
        },
    }
}

/// The worker's `JobService` (the contract of `proto/job.proto`).
fn job_service(agent: Agent) -> grpcio::Service {
    let (run, ping, cancel) = (agent.clone(), agent.clone(), agent);
    ServiceBuilder::new()
        .add_server_streaming_handler(&RUN_JOB, move |ctx, job, sink| run.run_job(ctx, job, sink))
        .add_unary_handler(&PING, move |ctx, _req, sink| ping.ping(ctx, sink))
        .add_unary_handler(&CANCEL_JOB, move |ctx, req, sink| {
            cancel.cancel_job(ctx, req, sink)
        })
        .build()
}

/// Answers a `RunJob` call with an error status: nothing was started.
fn refuse(ctx: &RpcContext, sink: ServerStreamingSink<JobResponse>, status: RpcStatus) {
    ctx.spawn(async move {
        if let Err(e) = sink.fail(status).await {
            debug!("could not answer a call: {e}");
        }
    });
}

/// Where a job thread leaves its answer for the call's future.
#[derive(Default)]
struct AnswerSlot {
    answer: Option<JobResponse>,
    waker: Option<Waker>,
}

impl Agent {
    /// Jobs running now.
    fn running_count(&self) -> usize {
        self.running.lock().expect("slots lock").len()
    }

    fn run_job(&self, ctx: RpcContext, job: JobRequest, sink: ServerStreamingSink<JobResponse>) {
        let refusal = match &self.token {
            Some(token) if !grpc::authorized(&ctx, token) => Some(grpc::unauthenticated(&ctx)),
            _ => checks::job_id(&job.jobId)
                .err()
                .map(|e| RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, e)),
        };
        if let Some(status) = refusal {
            return refuse(&ctx, sink, status);
        }
        let control = Arc::new(JobControl::default());
        {
            let mut running = self.running.lock().expect("slots lock");
            let refusal = if self.draining.load(Ordering::SeqCst) {
                Some((
                    RpcStatusCode::RESOURCE_EXHAUSTED,
                    "the worker is shutting down",
                ))
            } else if running.len() >= self.capacity {
                Some((RpcStatusCode::RESOURCE_EXHAUSTED, "no free slot"))
            } else if running.contains_key(&job.jobId) {
                Some((
                    RpcStatusCode::ALREADY_EXISTS,
                    "this job is already running here",
                ))
            } else {
                None
            };
            if let Some((code, message)) = refusal {
                return refuse(
                    &ctx,
                    sink,
                    RpcStatus::with_message(code, message.to_string()),
                );
            }
            running.insert(job.jobId.clone(), control.clone());
        }
        let slot = Arc::new(Mutex::new(AnswerSlot::default()));
        let job_id = job.jobId.clone();
        let (agent, thread_slot, thread_control) = (self.clone(), slot.clone(), control.clone());
        let spawned = std::thread::Builder::new()
            .name(format!(
                "job-{}",
                job.jobId.chars().take(24).collect::<String>()
            ))
            .spawn(move || agent.run(job, thread_control, thread_slot));
        if let Err(e) = spawned {
            warn!("job {job_id}: could not start a job thread: {e}");
            self.running.lock().expect("slots lock").remove(&job_id);
            let status = RpcStatus::with_message(
                RpcStatusCode::RESOURCE_EXHAUSTED,
                "the worker could not start a job thread".to_string(),
            );
            return refuse(&ctx, sink, status);
        }
        let mut sink = sink;
        // Waits on grpcio's thread (without blocking it) for the answer or the caller
        // going away, whichever comes first, then sends the one answer.
        ctx.spawn(async move {
            let answer = poll_fn(|cx| {
                let mut slot = slot.lock().expect("answer slot lock");
                if let Some(answer) = slot.answer.take() {
                    return Poll::Ready(Some(answer));
                }
                slot.waker = Some(cx.waker().clone());
                drop(slot);
                match Pin::new(&mut sink).poll_flush(cx) {
                    Poll::Ready(Err(_)) => Poll::Ready(None),
                    _ => Poll::Pending,
                }
            })
            .await;
            let Some(answer) = answer else {
                if control.cancel("cancelled: the caller went away") {
                    info!("job {job_id}: the caller cancelled the call; stopping the job");
                }
                return;
            };
            let sent = async {
                poll_fn(|cx| Pin::new(&mut sink).poll_ready(cx)).await?;
                Pin::new(&mut sink).start_send((answer, WriteFlags::default()))?;
                poll_fn(|cx| Pin::new(&mut sink).poll_close(cx)).await
            };
            if let Err(e) = sent.await {
                warn!("job {job_id}: the answer could not be sent (the caller is gone): {e}");
            }
        });
    }

    fn ping(&self, ctx: RpcContext, sink: UnarySink<PingResponse>) {
        let Some(sink) = grpc::admit(&ctx, sink, self.token.as_ref()) else {
            return;
        };
        let busy = self.draining.load(Ordering::SeqCst) || self.running_count() >= self.capacity;
        let pong = PingResponse {
            workerId: self.id.clone(),
            status: if busy {
                WorkerStatus::BUSY
            } else {
                WorkerStatus::FREE
            },
            ..PingResponse::default()
        };
        grpc::reply(&ctx, sink, pong);
    }

    fn cancel_job(
        &self,
        ctx: RpcContext,
        req: CancelJobRequest,
        sink: UnarySink<CancelJobResponse>,
    ) {
        let Some(sink) = grpc::admit(&ctx, sink, self.token.as_ref()) else {
            return;
        };
        let control = self
            .running
            .lock()
            .expect("slots lock")
            .get(&req.jobId)
            .cloned();
        let mut answer = CancelJobResponse::default();
        match control {
            Some(control) => {
                answer.cancelled = control.cancel("cancelled");
                answer.message = "stopping the job".to_string();
                info!("job {}: cancel requested", req.jobId);
            }
            None => answer.message = "no such job is running here".to_string(),
        }
        grpc::reply(&ctx, sink, answer);
    }

    /// Runs one job on its own thread and answers its call.
    fn run(self, job: JobRequest, control: Arc<JobControl>, slot: Arc<Mutex<AnswerSlot>>) {
        let job_id = job.jobId.clone();
        info!("job {job_id}: started");
        let started = std::time::Instant::now();
        // The watchdog stops the job at its deadline; the job's end closes `done`.
        let (done, finished) = bounded::<()>(0);
        if job.timeoutSeconds > 0 {
            let control = control.clone();
            let timeout = Duration::from_secs(job.timeoutSeconds.into());
            std::thread::spawn(move || {
                if finished.recv_timeout(timeout) == Err(RecvTimeoutError::Timeout) {
                    control.cancel(&format!(
                        "timed out after {}",
                        humantime::format_duration(timeout)
                    ));
                }
            });
        }
        let answer = self.executor.run(&job, &control);
        drop(done);
        self.running.lock().expect("slots lock").remove(&job_id);
        info!(
            "job {job_id}: {} after {} ms{}",
            if answer.success {
                "succeeded"
            } else {
                "failed"
            },
            started.elapsed().as_millis(),
            if answer.error.is_empty() {
                String::new()
            } else {
                format!(": {}", answer.error)
            }
        );
        let mut slot = slot.lock().expect("answer slot lock");
        slot.answer = Some(answer);
        if let Some(waker) = slot.waker.take() {
            waker.wake();
        }
    }
}
