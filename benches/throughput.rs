//! Throughput: N jobs through the orchestrator to 64 no-op gRPC workers, beside a raw
//! amiquip loop doing the broker's part of the same work (consume, publish a status with
//! publisher confirms, ack after the confirm) with the same in-flight window, in one
//! run. Both drain a queue filled beforehand; each rate is measured from the first
//! status to the last. `BENCH_JOBS` sets N (default 20,000). Run by scripts/bench.sh.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use std::sync::Arc;

use amiquip::{AmqpProperties, ConfirmSmoother, ConsumerMessage, ConsumerOptions, Publish};
use blacktree::amqp::AmqpUrl;
use blacktree::job::{Outcome, Status};
use blacktree::proto::job::{
    CancelJobRequest, CancelJobResponse, JobRequest, JobResponse, PingRequest, PingResponse,
};
use blacktree::proto::job_grpc::{create_job_service, JobService};
use common::*;
use crossbeam_channel::select;
use grpcio::{Environment, RpcContext, ServerBuilder, ServerCredentials, UnarySink};
use serde_json::json;

const WINDOW: u16 = 64;
const WORKERS: usize = 64;

fn main() {
    let jobs: usize = std::env::var("BENCH_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let raw = raw_loop(jobs);
    let blacktree = orchestrator(jobs);
    println!("throughput.jobs {jobs}");
    println!("throughput.raw_msgs_per_s {raw:.0}");
    println!("throughput.blacktree_jobs_per_s {blacktree:.0}");
    println!("throughput.ratio {:.3}", blacktree / raw);
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

/// No-op workers: one grpcio server (one environment) listening on `WORKERS` ports,
/// each port registered as a worker of its own; RunJob is answered at once.
#[derive(Clone)]
struct NoopWorker;

impl JobService for NoopWorker {
    fn run_job(&mut self, ctx: RpcContext, req: JobRequest, sink: UnarySink<JobResponse>) {
        let answer = JobResponse {
            jobId: req.jobId,
            success: true,
            ..JobResponse::default()
        };
        blacktree::rpc::reply(&ctx, sink, answer);
    }

    fn ping(&mut self, ctx: RpcContext, _req: PingRequest, sink: UnarySink<PingResponse>) {
        blacktree::rpc::reply(&ctx, sink, PingResponse::default());
    }

    fn cancel_job(
        &mut self,
        ctx: RpcContext,
        _req: CancelJobRequest,
        sink: UnarySink<CancelJobResponse>,
    ) {
        blacktree::rpc::reply(&ctx, sink, CancelJobResponse::default());
    }
}

fn orchestrator(jobs: usize) -> f64 {
    let names = Names::unique("bench");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let env = Arc::new(Environment::new(1));
    let mut server = ServerBuilder::new(env)
        .register_service(create_job_service(NoopWorker))
        .build()
        .unwrap();
    let ports: Vec<u16> = (0..WORKERS)
        .map(|_| {
            server
                .add_listening_port("127.0.0.1:0", ServerCredentials::insecure())
                .unwrap()
        })
        .collect();
    server.start();
    fill(&mq, jobs, "bench");
    let statics: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| format!("bench-w{i}=127.0.0.1:{port}"))
        .collect();
    let statics = statics.join(",");
    let window = WINDOW.to_string();
    let _orch = Orchestrator::start(
        SHARED_BROKER,
        &names,
        &[
            "--worker",
            &statics,
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
    status_rate(&mq, jobs)
}

/// The broker's own limit for this work: one thread, consume → publish status with a
/// confirm → ack, with `WINDOW` messages in flight.
fn raw_loop(jobs: usize) -> f64 {
    let names = Names::unique("raw");
    let mq = Mq::connect(SHARED_BROKER, &names);
    fill(&mq, jobs, "raw");
    let execute = names.execute.clone();
    let exchange = names.exchange.clone();
    let looper = std::thread::spawn(move || {
        let mut connection = AmqpUrl::parse(SHARED_BROKER).unwrap().connect().unwrap();
        let channel = connection.open_channel(None).unwrap();
        channel.qos(0, WINDOW, false).unwrap();
        let confirms = channel.listen_for_publisher_confirms().unwrap();
        channel.enable_publisher_confirms().unwrap();
        let consumer = channel
            .basic_consume(execute.as_str(), ConsumerOptions::default())
            .unwrap();
        let mut smoother = ConfirmSmoother::new();
        let mut waiting = VecDeque::new();
        let mut acked = 0;
        while acked < jobs {
            select! {
                recv(consumer.receiver()) -> message => {
                    let Ok(ConsumerMessage::Delivery(delivery)) = message else { panic!("raw consumer ended") };
                    let job: serde_json::Value = serde_json::from_slice(&delivery.body).unwrap();
                    let status = Status::without_answer(job["jobId"].as_str().unwrap(), Outcome::Succeeded, "raw", String::new());
                    let properties = AmqpProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
                    channel.basic_publish(exchange.as_str(), Publish::with_properties(&status.to_json(), "api.result", properties)).unwrap();
                    waiting.push_back(delivery);
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
    rate
}
