//! Dispatch latency at light load (one job at a time): publish on the execute queue →
//! `RunJob` arriving at the worker, and worker answer → status delivered to a consumer,
//! beside the floor measured in the same run: a bare publish → delivery on the same
//! broker, and a bare gRPC unary call to the same worker; and publish → `RunJob` through
//! DESIGN.md's threads doing nothing else ([`support::skeleton`]). `BENCH_SAMPLES` sets
//! the count (default 500). Run by scripts/bench.sh.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{ConsumerMessage, ConsumerOptions, Publish};
use blacktree::proto::job::PingRequest;
use blacktree::proto::job_grpc::JobServiceClient;
use common::*;
use crossbeam_channel::{unbounded, Receiver};
use grpcio::{ChannelBuilder, EnvBuilder};
use serde_json::json;
use support::skeleton::Skeleton;
use support::{env_number, percentiles_ms, serve_noop_workers, NoopWorker};

fn main() {
    let samples = env_number("BENCH_SAMPLES", 500);
    let (arrivals_tx, arrivals) = unbounded();
    let worker = NoopWorker {
        arrivals: Some(arrivals_tx),
    };
    let (_server, ports) = serve_noop_workers(worker, 1, 1);
    let port = ports[0];

    let names = Names::unique("latency");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let worker = format!("lat-w=127.0.0.1:{port}");
    let orch = Orchestrator::start(SHARED_BROKER, &names, &["--worker", &worker]);
    orch.wait_for_log("lat-w", Duration::from_secs(30));

    let statuses = status_stamps(&names);
    let (to_worker, to_status) = one_at_a_time(&mq, &arrivals, &statuses, samples);
    drop(orch);

    // DESIGN.md's threads with nothing else, to the same worker.
    let skeleton_names = Names::unique("latskel");
    let skeleton_mq = Mq::connect(SHARED_BROKER, &skeleton_names);
    let statuses = status_stamps(&skeleton_names);
    let skeleton = Skeleton::start(
        SHARED_BROKER,
        &skeleton_names,
        &[port],
        DISPATCH_THREADS,
        samples + WARM_UP,
    );
    let (skeleton_to_worker, _) = one_at_a_time(&skeleton_mq, &arrivals, &statuses, samples);
    skeleton.finish();

    // Floors: a bare publish → delivery on the same broker, a bare unary gRPC call.
    let consumer = mq
        .channel()
        .basic_consume(
            names.rejected.as_str(),
            ConsumerOptions {
                no_ack: true,
                ..ConsumerOptions::default()
            },
        )
        .unwrap();
    let mut bare_amqp = Vec::new();
    for _ in 0..samples {
        let sent = Instant::now();
        mq.channel()
            .basic_publish("", Publish::new(b"x", names.rejected.as_str()))
            .unwrap();
        let Ok(ConsumerMessage::Delivery(_)) = consumer.receiver().recv() else {
            panic!("no delivery")
        };
        bare_amqp.push(sent.elapsed());
    }
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let client =
        JobServiceClient::new(ChannelBuilder::new(env).connect(&format!("127.0.0.1:{port}")));
    let mut bare_grpc = Vec::new();
    for _ in 0..samples + 20 {
        let sent = Instant::now();
        client.ping(&PingRequest::default()).unwrap();
        bare_grpc.push(sent.elapsed());
    }
    bare_grpc.drain(..20);

    for (name, values) in [
        ("latency.publish_to_runjob", to_worker),
        ("latency.skeleton_publish_to_runjob", skeleton_to_worker),
        ("latency.answer_to_status", to_status),
        ("latency.bare_publish_to_delivery", bare_amqp),
        ("latency.bare_grpc_unary", bare_grpc),
    ] {
        let (p50, p99) = percentiles_ms(&values);
        println!("{name}.p50_ms {p50:.3}");
        println!("{name}.p99_ms {p99:.3}");
    }
}

/// The orchestrator's default `--dispatch-threads`, for the skeleton.
const DISPATCH_THREADS: u16 = 64;

/// Jobs published one at a time that start warm: the first ones are not counted.
const WARM_UP: usize = 20;

/// The times statuses are delivered from the status queue of `names`, as they come.
fn status_stamps(names: &Names) -> Receiver<Instant> {
    let (stamps, stamped) = unbounded();
    let status_queue = names.status.clone();
    let reader = Mq::connect(SHARED_BROKER, names);
    std::thread::spawn(move || {
        let options = ConsumerOptions {
            no_ack: true,
            ..ConsumerOptions::default()
        };
        let consumer = reader
            .channel()
            .basic_consume(status_queue.as_str(), options)
            .unwrap();
        for message in consumer.receiver().iter() {
            if let ConsumerMessage::Delivery(_) = message {
                let _ = stamps.send(Instant::now());
            }
        }
    });
    stamped
}

/// Publishes `samples` jobs (after [`WARM_UP`] more) one at a time, each once the last
/// one's status was delivered; returns the times from publish to `RunJob` at the worker
/// (reported on `arrivals`), and from there to the status's delivery.
fn one_at_a_time(
    mq: &Mq,
    arrivals: &Receiver<Instant>,
    statuses: &Receiver<Instant>,
    samples: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut to_worker, mut to_status) = (Vec::new(), Vec::new());
    for i in 0..samples + WARM_UP {
        let published = Instant::now();
        mq.publish_job(&format!("lat-{i}"), json!({}));
        let arrived = arrivals
            .recv_timeout(Duration::from_secs(30))
            .expect("RunJob arrived");
        let delivered = statuses
            .recv_timeout(Duration::from_secs(30))
            .expect("status delivered");
        if i >= WARM_UP {
            to_worker.push(arrived - published);
            to_status.push(delivered - arrived);
        }
    }
    (to_worker, to_status)
}
