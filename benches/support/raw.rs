//! The broker's own limit for the orchestrator's work, measured beside it: a raw amiquip
//! loop (consume → publish a status with a confirm → ack, a window of messages in
//! flight), optionally with a bare asynchronous `RunJob` to no-op workers per message;
//! and the queue filling and status counting every throughput comparison shares.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, ConfirmSmoother, ConsumerMessage, ConsumerOptions, Publish};
use blacktree::amqp::AmqpUrl;
use blacktree::job::{Outcome, Status};
use blacktree::proto::job::JobRequest;
use crossbeam_channel::select;
use serde_json::json;

use super::{
    own_threads, serve_noop_workers, threads_cpu_seconds, tids_named, CpuMeter, NoopWorker,
    ThreadUse, NOOP_THREADS,
};
use crate::common::{poll, Mq};

/// What one side of the comparison achieved.
pub struct Run {
    /// Statuses per second, first to last.
    pub rate: f64,
    /// CPU seconds each process used during the run.
    pub cpu: Vec<(&'static str, f64)>,
    /// What the measured threads (the orchestrator's, or the loop's own) used during
    /// the run, by kind of thread.
    pub threads: BTreeMap<String, ThreadUse>,
}

/// Fills the execute queue of `names` with `jobs` jobs.
pub fn fill(mq: &Mq, jobs: usize, tag: &str) {
    for i in 0..jobs {
        mq.publish_job(&format!("{tag}-{i}"), json!({}));
    }
    poll(Duration::from_secs(120), "the jobs to be queued", || {
        (mq.depth(&mq.names.execute) as usize == jobs).then_some(())
    });
}

/// Rate at which `jobs` statuses arrive in the status queue, first to last.
pub fn status_rate(mq: &Mq, jobs: usize) -> f64 {
    let first = poll(Duration::from_secs(120), "a first status", || {
        (mq.depth(&mq.names.status) > 0).then(Instant::now)
    });
    let done = poll(Duration::from_secs(600), "every status", || {
        (mq.depth(&mq.names.status) as usize >= jobs).then(Instant::now)
    });
    (jobs - 1) as f64 / (done - first).as_secs_f64()
}

/// Messages in flight in the raw loop (the orchestrator's prefetch in the comparison).
pub const WINDOW: u16 = 64;
/// No-op workers the gRPC variant calls, round-robin.
pub const WORKERS: usize = 64;

/// The flags of an orchestrator in a throughput comparison: the no-op `workers`
/// (`--worker` value), `window` dispatch threads and prefetch, the default health round.
pub fn throughput_flags(workers: &str, window: u16) -> Vec<String> {
    let window = window.to_string();
    [
        "--worker",
        workers,
        "--dispatch-threads",
        &window,
        "--prefetch",
        &window,
        "--health-interval",
        "2s",
        "--health-timeout",
        "1s",
    ]
    .iter()
    .map(|flag| flag.to_string())
    .collect()
}

/// The broker's own limit for this work: one thread, consume → publish status with a
/// confirm → ack, with `WINDOW` messages in flight. With `grpc`, each message first
/// goes to one of `WORKERS` no-op workers (round-robin) as an asynchronous `RunJob`,
/// and its status is published when the answer arrives.
///
/// `url` is the broker node the loop uses, `mq` the test connection that declared its
/// queues, and `measured` the processes (name, pid) whose CPU it reports beside its own
/// (`bench`).
pub fn raw_loop(
    url: &str,
    mq: &Mq,
    jobs: usize,
    measured: &[(&'static str, u32)],
    grpc: bool,
) -> Run {
    let names = &mq.names;
    let workers = grpc.then(|| serve_noop_workers(NoopWorker::default(), WORKERS, 1));
    let ports = workers
        .as_ref()
        .map_or(Vec::new(), |(_, ports)| ports.clone());
    fill(mq, jobs, "raw");
    let execute = names.execute.clone();
    let exchange = names.exchange.clone();
    let pids: Vec<u32> = measured.iter().map(|(_, pid)| *pid).collect();
    let meter = CpuMeter::start(&pids);
    let noop_before = threads_cpu_seconds(NOOP_THREADS);
    let url = url.to_string();
    // Returns what the loop's own threads used, by kind: its thread, its gRPC client's
    // completion-queue thread and its connection's amiquip I/O thread, apart from the
    // no-op workers and the bench's status reader in the same process.
    let looper = std::thread::Builder::new().name("floor-loop".into()).spawn(move || {
        // SAFETY: gettid has no preconditions.
        let own = unsafe { libc::gettid() } as u32;
        let io_before = tids_named(AMIQUIP_IO);
        let env = Arc::new(
            grpcio::EnvBuilder::new()
                .cq_count(1)
                .name_prefix(FLOOR_GRPC)
                .build(),
        );
        let clients: Vec<_> = ports
            .iter()
            .map(|&port| super::worker_client(&env, port))
            .collect();
        let (answers, answered) = crossbeam_channel::unbounded::<(u64, String)>();
        let mut connection = AmqpUrl::parse(&url).unwrap().connect().unwrap();
        let io: Vec<u32> = tids_named(AMIQUIP_IO)
            .into_iter()
            .filter(|tid| !io_before.contains(tid))
            .collect();
        assert_eq!(io.len(), 1, "one I/O thread for the loop's connection");
        let channel = connection.open_channel(None).unwrap();
        channel.qos(0, WINDOW, false).unwrap();
        let confirms = channel.listen_for_publisher_confirms().unwrap();
        channel.enable_publisher_confirms().unwrap();
        let consumer = channel
            .basic_consume(execute.as_str(), ConsumerOptions::default())
            .unwrap();
        let publish = |job_id: &str| {
            let (body, properties) = status_message(job_id);
            let message = Publish::with_properties(&body, "api.result", properties);
            channel.basic_publish(exchange.as_str(), message).unwrap();
        };
        let mut smoother = ConfirmSmoother::new();
        let mut calls = HashMap::new();
        let mut next_call = 0;
        let mut waiting = VecDeque::new();
        let mut acked = 0;
        while acked < jobs {
            select! {
                recv(consumer.receiver()) -> message => {
                    let Ok(ConsumerMessage::Delivery(delivery)) = message else { panic!("raw consumer ended") };
                    let job: serde_json::Value = serde_json::from_slice(&delivery.body).unwrap();
                    let job_id = job["jobId"].as_str().unwrap().to_string();
                    if clients.is_empty() {
                        publish(&job_id);
                        waiting.push_back(delivery);
                        continue;
                    }
                    let client = &clients[next_call as usize % clients.len()];
                    let request = JobRequest { jobId: job_id, ..JobRequest::default() };
                    let call = client.run_job_async(&request).unwrap();
                    let answers = answers.clone();
                    client.spawn(async move {
                        let answer = call.await.expect("a no-op worker answers");
                        let _ = answers.send((next_call, answer.jobId));
                    });
                    calls.insert(next_call, delivery);
                    next_call += 1;
                }
                recv(answered) -> answer => {
                    let (call, job_id) = answer.unwrap();
                    publish(&job_id);
                    waiting.push_back(calls.remove(&call).unwrap());
                }
                recv(confirms) -> confirm => {
                    for _ in smoother.process(confirm.unwrap()) {
                        waiting.pop_front().unwrap().ack(&channel).unwrap();
                        acked += 1;
                    }
                }
            }
        }
        let threads: Vec<u32> = [own, io[0]]
            .into_iter()
            .chain(tids_named(FLOOR_GRPC))
            .collect();
        let used = own_threads(&threads);
        drop(consumer);
        let _ = connection.close();
        used
    });
    let rate = status_rate(mq, jobs);
    let threads = looper.unwrap().join().unwrap();
    let (cpu, _) = meter.read();
    let noop_workers = threads_cpu_seconds(NOOP_THREADS) - noop_before;
    let names = measured.iter().map(|(name, _)| *name);
    let mut cpu: Vec<(&'static str, f64)> = names.zip(cpu).collect();
    cpu.push(("floor_loop", ThreadUse::total(&threads).cpu));
    if grpc {
        cpu.push(("noop_workers", noop_workers));
    }
    Run { rate, cpu, threads }
}

/// A job's status as the orchestrator publishes it (a success with no logs): its body
/// and properties.
pub fn status_message(job_id: &str) -> (Vec<u8>, AmqpProperties) {
    let status = Status::without_answer(job_id, Outcome::Succeeded, "raw", String::new());
    let properties = AmqpProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    (status.to_json(), properties)
}

/// The name of amiquip's I/O thread (one per connection).
pub const AMIQUIP_IO: &str = "amiquip-io";

/// The name prefix of the raw loop's gRPC client threads.
const FLOOR_GRPC: &str = "floor-grpc";
