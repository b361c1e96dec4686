//! Test harness: the real broker (shared or a private node), real gRPC test workers,
//! and the real `blacktree` binary as a child process.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod build_env;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, Channel, Connection, ExchangeDeclareOptions, ExchangeType, FieldTable, Publish,
    QueueDeclareOptions, QueueDeleteOptions,
};
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
use serde_json::Value;

/// The machine's shared broker.
pub const SHARED_BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// A token that must never show up in logs or statuses.
pub const TOKEN: &str = "ghp_TESTSECRET0123456789";

/// Polls `check` until it returns `Some` or `timeout` passes.
pub fn poll<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET http://127.0.0.1:port/path` with curl: (status code, body).
pub fn http(port: u16, path: &str) -> (String, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", &url])
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.to_string(), body.to_string())
}

/// The value of the Prometheus sample `name` (a full `name{labels}` prefix) in `metrics`.
pub fn find_sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// [`find_sample`], which must be there.
pub fn sample(metrics: &str, name: &str) -> f64 {
    find_sample(metrics, name).unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Per-test names for the exchange and queues, so tests never see each other's messages.
#[derive(Debug, Clone)]
pub struct Names {
    pub exchange: String,
    pub execute: String,
    pub status: String,
    pub rejected: String,
    pub cancel: String,
    pub events: String,
}

impl Names {
    pub fn unique(test: &str) -> Names {
        let tag = format!(
            "{test}.{}.{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        Names {
            exchange: format!("bt.{tag}.direct"),
            execute: format!("bt.{tag}.execute"),
            status: format!("bt.{tag}.status"),
            rejected: format!("bt.{tag}.rejected"),
            cancel: format!("bt.{tag}.cancel"),
            events: format!("bt.{tag}.events"),
        }
    }

    /// The orchestrator flags that select these names.
    pub fn args(&self) -> Vec<String> {
        [
            ("--exchange", &self.exchange),
            ("--execute-queue", &self.execute),
            ("--status-queue", &self.status),
            ("--rejected-queue", &self.rejected),
            ("--cancel-queue", &self.cancel),
            ("--events-queue", &self.events),
        ]
        .iter()
        .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
        .collect()
    }
}

/// A test's own AMQP connection: declares the topology, publishes jobs, reads statuses.
pub struct Mq {
    pub names: Names,
    /// The broker node (`rabbitmqctl -n`), `None` for the machine's shared broker.
    node: Option<String>,
    connection: Option<Connection>,
    channel: Channel,
}

impl Mq {
    /// Connects to the machine's shared broker at `url` (or another URL of it).
    pub fn connect(url: &str, names: &Names) -> Mq {
        Self::connect_node(url, None, names)
    }

    /// Connects to a private broker node.
    pub fn on(broker: &PrivateBroker, names: &Names) -> Mq {
        Self::connect_node(&broker.url(), Some(broker.node.clone()), names)
    }

    fn connect_node(url: &str, node: Option<String>, names: &Names) -> Mq {
        // Through blacktree's own connect: TCP_NODELAY, so a lone publish is not delayed.
        let mut connection = blacktree::amqp::AmqpUrl::parse(url)
            .and_then(|u| u.connect())
            .expect("test connection to RabbitMQ");
        let channel = connection.open_channel(None).unwrap();
        channel
            .exchange_declare(
                ExchangeType::Direct,
                names.exchange.as_str(),
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
            )
            .unwrap();
        for (queue, key) in [
            (&names.execute, Some("worker.execute")),
            (&names.status, Some("api.result")),
            (&names.cancel, Some("worker.cancel")),
            (&names.events, Some("api.event")),
            (&names.rejected, None),
        ] {
            let opts = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            channel.queue_declare(queue.as_str(), opts).unwrap();
            if let Some(key) = key {
                channel
                    .queue_bind(
                        queue.as_str(),
                        names.exchange.as_str(),
                        key,
                        FieldTable::new(),
                    )
                    .unwrap();
            }
        }
        Mq {
            names: names.clone(),
            node,
            connection: Some(connection),
            channel,
        }
    }

    /// The test's channel, for benchmarks that consume directly.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes a raw body on the execute routing key.
    pub fn publish_raw(&self, body: &[u8]) {
        let props = AmqpProperties::default().with_delivery_mode(2);
        self.channel
            .basic_publish(
                self.names.exchange.as_str(),
                Publish::with_properties(body, "worker.execute", props),
            )
            .unwrap();
    }

    /// Publishes a cancel request for `job_id`.
    pub fn publish_cancel(&self, job_id: &str) {
        let body = serde_json::to_vec(&serde_json::json!({ "jobId": job_id })).unwrap();
        self.channel
            .basic_publish(
                self.names.exchange.as_str(),
                Publish::new(&body, "worker.cancel"),
            )
            .unwrap();
    }

    /// Reads lifecycle events until `done` or `timeout`.
    pub fn events_until(
        &self,
        timeout: Duration,
        done: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        self.read_until(&self.names.events, timeout, done)
            .into_iter()
            .map(|(body, _)| serde_json::from_slice(&body).expect("event is JSON"))
            .collect()
    }

    /// Publishes a job with the test token.
    pub fn publish_job(&self, job_id: &str, extra: Value) {
        let mut job = serde_json::json!({
            "jobId": job_id, "repoUrl": "acme/app", "branch": "main",
            "dockerfilePath": "Dockerfile", "contextDir": ".", "imageName": "acme/app:1",
            "githubToken": TOKEN,
        });
        if let Value::Object(extra) = extra {
            job.as_object_mut().unwrap().extend(extra);
        }
        self.publish_raw(&serde_json::to_vec(&job).unwrap());
    }

    /// Reads statuses until `done` says so or `timeout` passes; returns them all.
    pub fn statuses_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        self.read_until(&self.names.status, timeout, |msgs| done(msgs))
            .into_iter()
            .map(|(body, _)| serde_json::from_slice(&body).expect("status is JSON"))
            .collect()
    }

    /// Reads `n` statuses (asserting they arrive within `timeout`).
    pub fn statuses(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let statuses = self.statuses_until(timeout, |s| s.len() >= n);
        assert!(
            statuses.len() >= n,
            "only {} of {n} statuses arrived: {statuses:?}",
            statuses.len()
        );
        statuses
    }

    /// Reads messages (body, headers) from `queue` until `done` or `timeout`.
    pub fn read_until(
        &self,
        queue: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Value]) -> bool,
    ) -> Vec<(Vec<u8>, FieldTable)> {
        // basic.get takes exactly one message at a time: nothing read ahead is lost
        // when the test stops reading.
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut parsed = Vec::new();
        while !done(&parsed) && Instant::now() < deadline {
            match self.channel.basic_get(queue, true).expect("basic.get") {
                Some(get) => {
                    let d = get.delivery;
                    parsed.push(serde_json::from_slice(&d.body).unwrap_or(Value::Null));
                    out.push((d.body, d.properties.headers().clone().unwrap_or_default()));
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        out
    }

    /// Messages waiting in `queue`.
    pub fn depth(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare_passive(queue)
            .unwrap()
            .declared_message_count()
            .unwrap_or(0)
    }
}

/// Messages of `queue` on broker `node` (`None`: the shared broker) that are ready and
/// that are delivered but not acked yet. AMQP cannot ask the second (a passive declare
/// counts ready messages only); `rabbitmqctl list_queues` can.
pub fn queue_counts(node: Option<&str>, queue: &str) -> (u64, u64) {
    let mut ctl = Command::new("rabbitmqctl");
    if let Some(node) = node {
        ctl.args(["-n", node]);
    }
    let out = ctl
        .args(["list_queues", "-q", "--no-table-headers"])
        .args(["name", "messages_ready", "messages_unacknowledged"])
        .output()
        .expect("running rabbitmqctl");
    let listing = String::from_utf8_lossy(&out.stdout);
    listing
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == queue)
                .then(|| Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?)))?
        })
        .unwrap_or_else(|| panic!("rabbitmqctl does not list {queue}: {listing}"))
}

impl Mq {
    /// `(ready, unacked)` messages of `queue`, see [`queue_counts`].
    pub fn counts(&self, queue: &str) -> (u64, u64) {
        queue_counts(self.node.as_deref(), queue)
    }

    /// Waits until `queue` holds no message, ready or unacked: every delivery was acked.
    pub fn wait_all_acked(&self, queue: &str) {
        poll(SETTLE, &format!("every message of {queue} acked"), || {
            (self.counts(queue) == (0, 0)).then_some(())
        });
    }

    /// Asserts that no job has a status the test has not read: waits until every job
    /// was acked (a job is acked only after its status was confirmed, so every status
    /// is in the status queue by then, and nothing can be redelivered), then asserts
    /// that the status queue is empty.
    pub fn assert_no_more_statuses(&self) {
        self.wait_all_acked(&self.names.execute);
        let left = self.depth(&self.names.status) as usize;
        if left > 0 {
            let extra = self.statuses_until(SETTLE, |s| s.len() >= left);
            panic!("{left} statuses beyond one per job: {extra:?}");
        }
    }
}

/// How long a test waits for the broker to settle (every delivery acked).
pub const SETTLE: Duration = Duration::from_secs(60);

/// Deletes the test's queues and exchange, also when the test failed.
impl Drop for Mq {
    fn drop(&mut self) {
        let n = &self.names;
        for q in [&n.execute, &n.status, &n.rejected, &n.cancel, &n.events] {
            let _ = self
                .channel
                .queue_delete(q.as_str(), QueueDeleteOptions::default());
        }
        let _ = self.channel.exchange_delete(n.exchange.as_str(), false);
        if let Some(connection) = self.connection.take() {
            let _ = connection.close();
        }
    }
}

/// Counts statuses per jobId.
pub fn count_by_job(statuses: &[Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for s in statuses {
        *counts
            .entry(s["jobId"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

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
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            run_time: Duration::from_millis(10),
            busy: false,
            capacity: 1,
            cancel_job: false,
            gate: None,
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
        if now > behaviour.capacity {
            obs.in_flight.fetch_sub(1, Ordering::SeqCst);
            obs.refused.fetch_add(1, Ordering::SeqCst);
            let status =
                RpcStatus::with_message(RpcStatusCode::RESOURCE_EXHAUSTED, "no free slot".into());
            ctx.spawn(async move {
                let _ = sink.fail(status).await;
            });
            return;
        }
        obs.first_job.get_or_init(Instant::now);
        obs.jobs.lock().unwrap().push(req.jobId.clone());
        let id = self.id.clone();
        let answer = move |req: JobRequest| JobResponse {
            logs: format!("built {} on {id} with token {}", req.jobId, req.githubToken),
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
        ctx.spawn(async move {
            let _ = sink.success(resp).await;
        });
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
        let capacity = self.behaviour.lock().unwrap().capacity as i32;
        let ch = ChannelBuilder::new(self.env.clone())
            .connect(&format!("127.0.0.1:{orchestrator_port}"));
        let client = WorkerServiceClient::new(ch);
        let info = WorkerInfo {
            id: self.id.clone(),
            ip: "127.0.0.1".into(),
            port: self.port as i32,
            capacity,
            ..Default::default()
        };
        let token = token.map(|t| blacktree::job::Secret::new(t.to_string()));
        let options = blacktree::grpc::with_token(grpcio::CallOption::default(), token.as_ref());
        client.register_opt(&info, options)
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

/// Waits for a grpcio future without an async runtime.
pub fn futures_block_on<F: std::future::Future>(future: F) -> F::Output {
    blacktree::grpc::cancel::block_on(future, None).expect("no cancel token")
}

/// xorshift64*: a tiny seeded generator, so that a run's fault schedule can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Multiplying by an odd constant is a bijection; only the zero state is unusable.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A duration in the `(low, high)` range of milliseconds.
    pub fn millis(&mut self, (low, high): (u64, u64)) -> Duration {
        Duration::from_millis(low + self.next_u64() % (high - low + 1))
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

/// A number field of `/proc/PID/status` (`VmRSS` in KiB, `Threads`, …).
pub fn proc_status(pid: u32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} for process {pid}"))
}

/// The resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS")
}

/// A `blacktree` child process whose stderr is collected; killed on drop.
pub struct LoggedChild {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl LoggedChild {
    /// Spawns `blacktree args…` and waits until it has logged each of `announces`
    /// (lines like "… listening on port N"); returns the announced ports in that order.
    pub fn spawn(args: &[String], announces: &[&'static str]) -> (LoggedChild, Vec<u16>) {
        Self::spawn_with_env(args, &[], announces)
    }

    /// [`LoggedChild::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        args: &[String],
        env: &[(String, String)],
        announces: &[&'static str],
    ) -> (LoggedChild, Vec<u16>) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_blacktree"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting blacktree");
        let log = Arc::new(Mutex::new(String::new()));
        let (port_tx, port_rx) = crossbeam_channel::unbounded();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        let wanted = announces.to_vec();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                for (i, announce) in wanted.iter().enumerate() {
                    if let Some(rest) = line.split(announce).nth(1) {
                        let port: u16 = rest.split_whitespace().next().unwrap().parse().unwrap();
                        let _ = port_tx.send((i, port));
                    }
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut ports = vec![0u16; announces.len()];
        for _ in announces {
            let (i, port) = port_rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("blacktree {args:?} did not announce {announces:?}"));
            ports[i] = port;
        }
        (LoggedChild { child, log }, ports)
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until its log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) {
        poll(timeout, &format!("log line {text:?}"), || {
            self.log().contains(text).then_some(())
        });
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let status = poll(timeout, "process exit", || self.child.try_wait().unwrap());
        status.code()
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `blacktree orchestrator` binary running as a child process.
pub struct Orchestrator {
    pub process: LoggedChild,
    pub grpc_port: u16,
    pub metrics_port: u16,
}

impl Orchestrator {
    /// Starts an orchestrator for `names` on `url` with fast health settings and `extra`
    /// flags; waits until its gRPC server listens and it is connected to the broker.
    pub fn start(url: &str, names: &Names, extra: &[&str]) -> Orchestrator {
        let mut args = vec!["orchestrator".to_string(), "--amqp-url".into(), url.into()];
        args.extend(names.args());
        // Fast health settings and ephemeral ports, unless the test sets them itself.
        let defaults = [
            ("--health-interval", "200ms"),
            ("--health-timeout", "300ms"),
            ("--dispatch-threads", "16"),
            ("--grpc-listen", "127.0.0.1:0"),
            ("--metrics-listen", "127.0.0.1:0"),
        ];
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let announces = [
            "gRPC server listening on port ",
            "metrics listening on port ",
        ];
        let (process, ports) = LoggedChild::spawn(&args, &announces);
        let orchestrator = Orchestrator {
            process,
            grpc_port: ports[0],
            metrics_port: ports[1],
        };
        orchestrator.wait_for_log("broker: connected", Duration::from_secs(30));
        orchestrator
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits until its log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) {
        self.process.wait_for_log(text, timeout)
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: &str) {
        self.process.signal(signal)
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        self.process.wait_exit(timeout)
    }

    /// Starts a test worker and registers it here.
    pub fn worker(&self, id: &str, behaviour: Behaviour) -> TestWorker {
        let worker = TestWorker::start(id, 0, behaviour);
        worker.register(self.grpc_port);
        worker
    }

    /// Asserts that the test token never reached its log.
    pub fn assert_no_secret_logged(&self) {
        let log = self.log();
        assert!(
            !log.contains(TOKEN),
            "the token reached the orchestrator's log:\n{log}"
        );
    }
}

/// What most end-to-end tests start with: their own queue names, their own connection
/// to the broker, and an orchestrator for those queues. Fields drop in order: the
/// orchestrator is stopped before the queues are deleted.
pub struct Setup {
    pub orch: Orchestrator,
    pub mq: Mq,
    pub names: Names,
}

impl Setup {
    /// On the shared broker with the test orchestrator's defaults.
    pub fn new(test: &str) -> Setup {
        Self::with_flags(test, &[])
    }

    /// On the shared broker, with `extra` orchestrator flags.
    pub fn with_flags(test: &str, extra: &[&str]) -> Setup {
        let names = Names::unique(test);
        let mq = Mq::connect(SHARED_BROKER, &names);
        let orch = Orchestrator::start(SHARED_BROKER, &names, extra);
        Setup { orch, mq, names }
    }

    /// On a private broker node, with `extra` orchestrator flags.
    pub fn on(broker: &PrivateBroker, test: &str, extra: &[&str]) -> Setup {
        let names = Names::unique(test);
        let mq = Mq::on(broker, &names);
        let orch = Orchestrator::start(&broker.url(), &names, extra);
        Setup { orch, mq, names }
    }

    /// Starts a test worker and registers it with the orchestrator.
    pub fn worker(&self, id: &str, behaviour: Behaviour) -> TestWorker {
        self.orch.worker(id, behaviour)
    }
}

/// A RabbitMQ node of a test's own, for tests that cut off or stop the broker.
pub struct PrivateBroker {
    pub node: String,
    pub port: u16,
    /// The `amqps://` port, when started with TLS.
    pub tls_port: u16,
    dir: std::path::PathBuf,
}

impl PrivateBroker {
    pub fn start() -> PrivateBroker {
        Self::start_with_tls(None)
    }

    /// With `tls = Some((ca, cert, key))` PEM files, also listens for `amqps://` on
    /// `tls_port`. A node that does not come up (several starting at once on a loaded
    /// machine can time out, or lose a port to another process) is stopped, its log
    /// printed, and one more is started on fresh ports.
    pub fn start_with_tls(tls: Option<(String, String, String)>) -> PrivateBroker {
        match Self::try_start(tls.as_ref()) {
            Ok(broker) => broker,
            Err(failed) => {
                eprintln!(
                    "private broker {} did not start; trying once more on fresh ports. Its log:\n{}",
                    failed.node,
                    failed.log()
                );
                drop(failed);
                Self::try_start(tls.as_ref()).unwrap_or_else(|failed| {
                    panic!(
                        "private broker {} did not start either. Its log:\n{}",
                        failed.node,
                        failed.log()
                    )
                })
            }
        }
    }

    /// The node's log files, for a failure message.
    fn log(&self) -> String {
        let logs = std::fs::read_dir(self.dir.join("log"))
            .into_iter()
            .flatten();
        logs.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts a node and waits until it accepts AMQP; the node that did not is `Err`.
    fn try_start(tls: Option<&(String, String, String)>) -> Result<PrivateBroker, PrivateBroker> {
        let port = free_port();
        let tls_port = free_port();
        let dist_port = free_port();
        let node = format!("bttest{}x{port}@localhost", std::process::id());
        let dir = std::env::temp_dir().join(format!("bt-broker-{port}"));
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // Our own config file: the machine's may pin the listener to 5672.
        let config = dir.join("rabbitmq.conf");
        let mut conf = format!("listeners.tcp.local = 127.0.0.1:{port}\n");
        if let Some((ca, cert, key)) = tls {
            for (name, file) in [("ca.pem", ca), ("server.pem", cert), ("server.key", key)] {
                std::fs::copy(file, dir.join(name)).unwrap();
            }
            let d = dir.display();
            conf.push_str(&format!(
                "listeners.ssl.local = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {d}/ca.pem\nssl_options.certfile = {d}/server.pem\n\
                 ssl_options.keyfile = {d}/server.key\nssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n"
            ));
        }
        std::fs::write(&config, conf).unwrap();
        let status = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "chown of the private broker directory");
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_CONFIG_FILE", &config)
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("plugins"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", dir.join("ff"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmq-server");
        let broker = PrivateBroker {
            node,
            port,
            tls_port,
            dir,
        };
        if !status.success() {
            return Err(broker);
        }
        let url = broker.url();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Ok(connection) = Connection::insecure_open(&url) {
                let _ = connection.close();
                return Ok(broker);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(broker)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Runs `rabbitmqctl -n NODE args…`.
    pub fn ctl(&self, args: &[&str]) {
        let out = Command::new("rabbitmqctl")
            .args(["-n", &self.node])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
