//! Real grpcio `JobService` workers in the test process, whose behaviour the test sets
//! and which record what they saw.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use blacktree::proto::job::{
    CancelJobRequest, CancelJobResponse, JobRequest, JobResponse, PingRequest, PingResponse,
    WorkerStatus,
};
use blacktree::proto::job_grpc::{create_job_service, JobService};
use blacktree::proto::worker::WorkerInfo;
use blacktree::proto::worker_grpc::WorkerServiceClient;
use crossbeam_channel::{Receiver, Sender};
use grpcio::{
    ChannelBuilder, Environment, RpcContext, RpcStatus, RpcStatusCode, Server, ServerBuilder,
    ServerCredentials, UnarySink,
};

/// How a test worker behaves.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// How long a job takes.
    pub run_time: Duration,
    /// Answer pings with BUSY.
    pub busy: bool,
    /// Jobs at once; more are refused with RESOURCE_EXHAUSTED.
    pub capacity: u32,
    /// Serves `CancelJob` (stops the job, answers `cancelled`), like Blacktree's own
    /// worker; otherwise answers it UNIMPLEMENTED, like older workers.
    pub cancel_job: bool,
    /// Jobs do not end before this gate opens (the test drops the sending side), and
    /// end at once if it opens after their run time.
    pub gate: Option<Receiver<()>>,
    /// Answers like the deployed Go workers: a full worker says UNKNOWN "worker is
    /// currently busy" (not RESOURCE_EXHAUSTED).
    pub go: bool,
    /// Refuses every job as full (while its pings say FREE).
    pub refuse: bool,
    /// Fails every job with UNKNOWN and this message, as a Go worker's failed build.
    pub fail_with: Option<String>,
    /// Answers with this many bytes of logs (0: one short line), ending in `THE END`.
    pub log_bytes: usize,
    /// Answers pings this late (a busy host: its pings time out, its jobs go on).
    pub ping_delay: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            run_time: Duration::from_millis(10),
            busy: false,
            capacity: 1,
            cancel_job: false,
            gate: None,
            go: false,
            refuse: false,
            fail_with: None,
            log_bytes: 0,
            ping_delay: Duration::ZERO,
        }
    }
}

/// What a test worker observed.
#[derive(Default)]
pub struct Observed {
    pub in_flight: AtomicU32,
    /// The most `RunJob` calls it had at once, counting a call it then refused: above
    /// the capacity means the orchestrator sent a job to a full worker.
    pub max_in_flight: AtomicU32,
    pub refused: AtomicU32,
    pub pings: AtomicU64,
    /// When the first ping arrived.
    pub first_ping: OnceLock<Instant>,
    /// When the first job arrived.
    pub first_job: OnceLock<Instant>,
    /// Jobs it ran, in the order they arrived.
    pub jobs: Mutex<Vec<String>>,
    /// JobIds of the `CancelJob` calls it received.
    pub cancels: Mutex<Vec<String>>,
    /// Every request it ran, as it received it.
    pub requests: Mutex<Vec<JobRequest>>,
}

impl Observed {
    pub fn job_count(&self) -> usize {
        self.jobs.lock().unwrap().len()
    }
}

#[derive(Clone)]
struct TestJobService {
    id: String,
    behaviour: Arc<Mutex<Behaviour>>,
    observed: Arc<Observed>,
    /// Closed when the worker is killed, so held jobs stop.
    killed: Receiver<()>,
    /// Running jobs that `CancelJob` can stop: jobId → the job thread's stop signal,
    /// which carries where to say that the job's slot is free again.
    running: Arc<Mutex<HashMap<String, Sender<Sender<()>>>>>,
}

impl JobService for TestJobService {
    fn run_job(&mut self, ctx: RpcContext, req: JobRequest, sink: UnarySink<JobResponse>) {
        let behaviour = self.behaviour.lock().unwrap().clone();
        let obs = self.observed.clone();
        let now = obs.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        // Recorded before the refusal below: a call beyond the capacity shows here.
        obs.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if now > behaviour.capacity || behaviour.refuse {
            obs.in_flight.fetch_sub(1, Ordering::SeqCst);
            obs.refused.fetch_add(1, Ordering::SeqCst);
            let status = if behaviour.go {
                RpcStatus::with_message(RpcStatusCode::UNKNOWN, "worker is currently busy".into())
            } else {
                RpcStatus::with_message(RpcStatusCode::RESOURCE_EXHAUSTED, "no free slot".into())
            };
            ctx.spawn(async move {
                let _ = sink.fail(status).await;
            });
            return;
        }
        obs.first_job.get_or_init(Instant::now);
        obs.jobs.lock().unwrap().push(req.jobId.clone());
        obs.requests.lock().unwrap().push(req.clone());
        if let Some(message) = behaviour.fail_with.clone() {
            obs.in_flight.fetch_sub(1, Ordering::SeqCst);
            let status = RpcStatus::with_message(RpcStatusCode::UNKNOWN, message);
            ctx.spawn(async move {
                let _ = sink.fail(status).await;
            });
            return;
        }
        let id = self.id.clone();
        let log_bytes = behaviour.log_bytes;
        let answer = move |req: JobRequest| JobResponse {
            logs: match log_bytes {
                0 => format!("built {} on {id} with token {}", req.jobId, req.githubToken),
                n => format!("{}THE END", "L".repeat(n.saturating_sub(7))),
            },
            imageUrl: format!("registry.test/{}", req.imageName),
            jobId: req.jobId,
            success: true,
            ..Default::default()
        };
        if behaviour.run_time.is_zero() {
            // A no-op worker answers on grpcio's thread at once (benchmarks).
            obs.in_flight.fetch_sub(1, Ordering::SeqCst);
            ctx.spawn(async move {
                let _ = sink.success(answer(req)).await;
            });
            return;
        }
        let killed = self.killed.clone();
        let (stop, stopped) = crossbeam_channel::bounded(1);
        let running = self.running.clone();
        running.lock().unwrap().insert(req.jobId.clone(), stop);
        std::thread::spawn(move || {
            // Simulated build time (and the gate); ends early if the worker is killed or
            // the job cancelled.
            let run_until = Instant::now() + behaviour.run_time;
            let mut gate = behaviour.gate;
            let cancelled = loop {
                let (closed, done) = match &gate {
                    Some(gate) => (gate.clone(), crossbeam_channel::never()),
                    None => (crossbeam_channel::never(), crossbeam_channel::at(run_until)),
                };
                crossbeam_channel::select! {
                    recv(killed) -> _ => break None,
                    recv(stopped) -> freed => break freed.ok(),
                    recv(closed) -> _ => gate = None,
                    recv(done) -> _ => break None,
                }
            };
            running.lock().unwrap().remove(&req.jobId);
            obs.in_flight.fetch_sub(1, Ordering::SeqCst);
            // Like Blacktree's worker, the slot is free before CancelJob is answered.
            let cancelled = cancelled.map(|freed| freed.send(())).is_some();
            let response = if cancelled {
                JobResponse {
                    jobId: req.jobId.clone(),
                    error: "cancelled".into(),
                    ..Default::default()
                }
            } else {
                answer(req)
            };
            let _ = futures_block_on(sink.success(response));
        });
    }

    fn ping(&mut self, ctx: RpcContext, _req: PingRequest, sink: UnarySink<PingResponse>) {
        self.observed.first_ping.get_or_init(Instant::now);
        self.observed.pings.fetch_add(1, Ordering::SeqCst);
        let behaviour = self.behaviour.lock().unwrap().clone();
        let full = self.observed.in_flight.load(Ordering::SeqCst) >= behaviour.capacity;
        let busy = behaviour.busy || full;
        let resp = PingResponse {
            workerId: self.id.clone(),
            status: if busy {
                WorkerStatus::BUSY
            } else {
                WorkerStatus::FREE
            },
            ..Default::default()
        };
        if behaviour.ping_delay.is_zero() {
            ctx.spawn(async move {
                let _ = sink.success(resp).await;
            });
        } else {
            std::thread::spawn(move || {
                std::thread::sleep(behaviour.ping_delay);
                let _ = futures_block_on(sink.success(resp));
            });
        }
    }

    fn cancel_job(
        &mut self,
        ctx: RpcContext,
        req: CancelJobRequest,
        sink: UnarySink<CancelJobResponse>,
    ) {
        self.observed
            .cancels
            .lock()
            .unwrap()
            .push(req.jobId.clone());
        if !self.behaviour.lock().unwrap().cancel_job {
            ctx.spawn(async move {
                let _ = sink
                    .fail(RpcStatus::new(RpcStatusCode::UNIMPLEMENTED))
                    .await;
            });
            return;
        }
        let stop = self.running.lock().unwrap().remove(&req.jobId);
        // Answered from a thread of its own: it waits for the job to give its slot up.
        std::thread::spawn(move || {
            let (freed, slot_free) = crossbeam_channel::bounded(1);
            let cancelled =
                stop.is_some_and(|stop| stop.send(freed).is_ok()) && slot_free.recv().is_ok();
            let resp = CancelJobResponse {
                cancelled,
                ..Default::default()
            };
            let _ = futures_block_on(sink.success(resp));
        });
    }
}

/// A real grpcio `JobService` server on 127.0.0.1, in the test process.
pub struct TestWorker {
    pub id: String,
    pub port: u16,
    pub observed: Arc<Observed>,
    pub behaviour: Arc<Mutex<Behaviour>>,
    server: Option<Server>,
    kill: Option<Sender<()>>,
    env: Arc<Environment>,
}

impl TestWorker {
    /// Starts a worker on `port` (0 = any free port).
    pub fn start(id: &str, port: u16, behaviour: Behaviour) -> TestWorker {
        Self::start_with(
            id,
            port,
            Arc::new(Mutex::new(behaviour)),
            Arc::new(Observed::default()),
        )
    }

    fn start_with(
        id: &str,
        port: u16,
        behaviour: Arc<Mutex<Behaviour>>,
        observed: Arc<Observed>,
    ) -> TestWorker {
        let env = Arc::new(Environment::new(1));
        let (kill, killed) = crossbeam_channel::bounded(0);
        let service = TestJobService {
            id: id.to_string(),
            behaviour: behaviour.clone(),
            observed: observed.clone(),
            killed,
            running: Arc::default(),
        };
        let mut server = ServerBuilder::new(env.clone())
            .register_service(create_job_service(service))
            .build()
            .unwrap();
        let port = server
            .add_listening_port(format!("127.0.0.1:{port}"), ServerCredentials::insecure())
            .unwrap();
        server.start();
        TestWorker {
            id: id.to_string(),
            port,
            observed,
            behaviour,
            server: Some(server),
            kill: Some(kill),
            env,
        }
    }

    /// Registers with the orchestrator's WorkerService at `127.0.0.1:orchestrator_port`.
    pub fn register(&self, orchestrator_port: u16) {
        let ack = self
            .try_register(orchestrator_port, None)
            .expect("Register call");
        assert!(ack.success, "registration refused: {}", ack.message);
    }

    /// Calls Register, with `authorization: Bearer <token>` when given.
    pub fn try_register(
        &self,
        orchestrator_port: u16,
        token: Option<&str>,
    ) -> grpcio::Result<blacktree::proto::worker::RegisterAck> {
        let info = WorkerInfo {
            id: self.id.clone(),
            ip: "127.0.0.1".into(),
            port: self.port as i32,
            capacity: self.behaviour.lock().unwrap().capacity as i32,
            ..Default::default()
        };
        register_as(orchestrator_port, &info, token)
    }

    /// Kills the worker: its server stops, its port closes, running jobs are cut off.
    pub fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.cancel_all_calls();
            let _ = futures_block_on(server.shutdown());
        }
        self.kill.take();
    }

    /// Starts the same worker again (same id, port, behaviour and observations).
    pub fn restart(&mut self) {
        assert!(self.server.is_none(), "kill it first");
        *self = Self::start_with(
            &self.id,
            self.port,
            self.behaviour.clone(),
            self.observed.clone(),
        );
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain client (no token, no TLS) of the JobService at `127.0.0.1:port`.
pub fn job_client(port: u16) -> blacktree::proto::job_grpc::JobServiceClient {
    let env = Arc::new(Environment::new(1));
    let channel = ChannelBuilder::new(env).connect(&format!("127.0.0.1:{port}"));
    blacktree::proto::job_grpc::JobServiceClient::new(channel)
}

/// Calls Register at `127.0.0.1:orchestrator_port` with `info` as it is (any fields a
/// peer could send), with `authorization: Bearer <token>` when given.
pub fn register_as(
    orchestrator_port: u16,
    info: &WorkerInfo,
    token: Option<&str>,
) -> grpcio::Result<blacktree::proto::worker::RegisterAck> {
    let env = Arc::new(Environment::new(1));
    let ch = ChannelBuilder::new(env).connect(&format!("127.0.0.1:{orchestrator_port}"));
    let client = WorkerServiceClient::new(ch);
    let token = token.map(|t| blacktree::job::Secret::new(t.to_string()));
    let options = blacktree::grpc::with_token(grpcio::CallOption::default(), token.as_ref());
    client.register_opt(info, options)
}

/// Waits for a grpcio future without an async runtime.
pub fn futures_block_on<F: std::future::Future>(future: F) -> F::Output {
    blacktree::grpc::cancel::block_on(future, None).expect("no cancel token")
}
