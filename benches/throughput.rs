//! Throughput: N jobs through the orchestrator to 64 no-op gRPC workers, beside a raw
//! amiquip loop doing the broker's part of the same work (consume, publish a status with
//! publisher confirms, ack after the confirm) with the same in-flight window, in one
//! run; and beside the same loop making a bare asynchronous `RunJob` call to the no-op
//! workers for each message before publishing its status (the broker's part plus the
//! gRPC part, with no thread of its own between them: the floor for all of Blacktree's
//! work on this machine). Each drains a queue filled beforehand; each rate is measured
//! from the first status to the last. `BENCH_JOBS` sets N (default 20,000); the three
//! alternate for `BENCH_ROUNDS` rounds (default 3), and each figure is the median over
//! the rounds (a ratio is taken within each round). Run by scripts/bench.sh.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, ConfirmSmoother, ConsumerMessage, ConsumerOptions, Publish};
use blacktree::amqp::AmqpUrl;
use blacktree::grpc;
use blacktree::job::{Outcome, Status};
use blacktree::proto::job::JobRequest;
use common::*;
use crossbeam_channel::select;
use serde_json::json;
use support::{
    broker_pid, env_number, median_and_range, serve_noop_workers, static_workers, CpuMeter,
    NoopWorker,
};

const WINDOW: u16 = 64;
const WORKERS: usize = 64;

fn main() {
    let jobs = env_number("BENCH_JOBS", 20_000);
    let rounds = env_number("BENCH_ROUNDS", 3).max(1);
    let broker = broker_pid();
    // Rounds alternate the three so that a slow spell of the machine hits all of them;
    // each ratio is taken within a round, then the median is reported.
    let mut results: Vec<[Run; 3]> = Vec::new();
    for _ in 0..rounds {
        results.push([
            raw_loop(jobs, broker, false),
            raw_loop(jobs, broker, true),
            orchestrator(jobs, broker),
        ]);
    }
    println!("throughput.jobs {jobs}");
    println!("throughput.rounds {rounds}");
    let names = ["raw", "raw_grpc", "blacktree"];
    for (i, name) in names.iter().enumerate() {
        let rates = median_and_range(results.iter().map(|r| r[i].rate));
        println!("throughput.{name}_per_s {:.0}", rates.0);
        println!(
            "throughput.{name}_per_s_range {:.0}–{:.0}",
            rates.1, rates.2
        );
        for (j, (process, _)) in results[0][i].cpu.iter().enumerate() {
            // CPU seconds for all the jobs → ms per 1,000 jobs.
            let per_1000 =
                median_and_range(results.iter().map(|r| r[i].cpu[j].1 * 1e6 / jobs as f64));
            println!(
                "throughput.{name}.cpu_ms_per_1000.{process} {:.0}",
                per_1000.0
            );
        }
    }
    for (name, baseline) in [("ratio", 0), ("ratio_grpc", 1)] {
        let ratios = median_and_range(results.iter().map(|r| r[2].rate / r[baseline].rate));
        println!("throughput.{name} {:.3}", ratios.0);
        println!("throughput.{name}_range {:.2}–{:.2}", ratios.1, ratios.2);
    }
}

/// What one side of the comparison achieved.
struct Run {
    /// Statuses per second, first to last.
    rate: f64,
    /// CPU seconds each process used during the run.
    cpu: Vec<(&'static str, f64)>,
}

/// Fills the execute queue of `names` with `jobs` jobs.
fn fill(mq: &Mq, jobs: usize, tag: &str) {
    for i in 0..jobs {
        mq.publish_job(&format!("{tag}-{i}"), json!({}));
    }
    poll(Duration::from_secs(120), "the jobs to be queued", || {
        (mq.depth(&mq.names.execute) as usize == jobs).then_some(())
    });
}

/// Rate at which `jobs` statuses arrive in the status queue, first to last.
fn status_rate(mq: &Mq, jobs: usize) -> f64 {
    let first = poll(Duration::from_secs(120), "a first status", || {
        (mq.depth(&mq.names.status) > 0).then(Instant::now)
    });
    let done = poll(Duration::from_secs(600), "every status", || {
        (mq.depth(&mq.names.status) as usize >= jobs).then(Instant::now)
    });
    (jobs - 1) as f64 / (done - first).as_secs_f64()
}

fn orchestrator(jobs: usize, broker: u32) -> Run {
    let names = Names::unique("bench");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let (_workers, ports) = serve_noop_workers(NoopWorker::default(), WORKERS, 1);
    fill(&mq, jobs, "bench");
    let window = WINDOW.to_string();
    let orch = Orchestrator::start(
        SHARED_BROKER,
        &names,
        &[
            "--worker",
            &static_workers("bench-w", &ports),
            "--dispatch-threads",
            &window,
            "--prefetch",
            &window,
            "--health-interval",
            "2s",
            "--health-timeout",
            "1s",
        ],
    );
    // From the moment it is connected: a few jobs may go before (milliseconds).
    let meter = CpuMeter::start(&[orch.process.pid(), broker, std::process::id()]);
    let rate = status_rate(&mq, jobs);
    let (cpu, _) = meter.read();
    Run {
        rate,
        cpu: vec![
            ("orchestrator", cpu[0]),
            ("broker", cpu[1]),
            ("bench_and_workers", cpu[2]),
        ],
    }
}

/// The broker's own limit for this work: one thread, consume → publish status with a
/// confirm → ack, with `WINDOW` messages in flight. With `grpc`, each message first
/// goes to one of `WORKERS` no-op workers (round-robin) as an asynchronous `RunJob`,
/// and its status is published when the answer arrives.
fn raw_loop(jobs: usize, broker: u32, grpc: bool) -> Run {
    let names = Names::unique(if grpc { "rawgrpc" } else { "raw" });
    let mq = Mq::connect(SHARED_BROKER, &names);
    let workers = grpc.then(|| serve_noop_workers(NoopWorker::default(), WORKERS, 1));
    let ports = workers
        .as_ref()
        .map_or(Vec::new(), |(_, ports)| ports.clone());
    fill(&mq, jobs, "raw");
    let execute = names.execute.clone();
    let exchange = names.exchange.clone();
    let meter = CpuMeter::start(&[broker, std::process::id()]);
    let looper = std::thread::spawn(move || {
        let env = Arc::new(grpcio::EnvBuilder::new().cq_count(1).build());
        let clients: Vec<_> = ports
            .iter()
            .map(|port| grpc::job_client(env.clone(), &format!("127.0.0.1:{port}"), None))
            .collect();
        let (answers, answered) = crossbeam_channel::unbounded::<(u64, String)>();
        let mut connection = AmqpUrl::parse(SHARED_BROKER).unwrap().connect().unwrap();
        let channel = connection.open_channel(None).unwrap();
        channel.qos(0, WINDOW, false).unwrap();
        let confirms = channel.listen_for_publisher_confirms().unwrap();
        channel.enable_publisher_confirms().unwrap();
        let consumer = channel
            .basic_consume(execute.as_str(), ConsumerOptions::default())
            .unwrap();
        let publish = |job_id: &str| {
            let status = Status::without_answer(job_id, Outcome::Succeeded, "raw", String::new());
            let properties = AmqpProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            let body = status.to_json();
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
        drop(consumer);
        let _ = connection.close();
    });
    let rate = status_rate(&mq, jobs);
    looper.join().unwrap();
    let (cpu, _) = meter.read();
    Run {
        rate,
        cpu: vec![("broker", cpu[0]), ("bench", cpu[1])],
    }
}
