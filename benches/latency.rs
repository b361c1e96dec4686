//! Dispatch latency at light load (one job at a time): publish on the execute queue →
//! `RunJob` arriving at the worker, and worker answer → status delivered to a consumer,
//! beside the floor measured in the same run: a bare publish → delivery on the same
//! broker, and a bare gRPC unary call to the same worker. `BENCH_SAMPLES` sets the count
//! (default 500). Run by scripts/bench.sh.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use amiquip::{ConsumerMessage, ConsumerOptions, Publish};
use blacktree::proto::job::PingRequest;
use blacktree::proto::job_grpc::JobServiceClient;
use common::*;
use crossbeam_channel::unbounded;
use grpcio::{ChannelBuilder, EnvBuilder};
use serde_json::json;
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

    // Statuses are consumed as they come, stamped on delivery.
    let (statuses_tx, statuses) = unbounded();
    let status_queue = names.status.clone();
    let reader = Mq::connect(SHARED_BROKER, &names);
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
                let _ = statuses_tx.send(Instant::now());
            }
        }
    });

    let (mut to_worker, mut to_status) = (Vec::new(), Vec::new());
    for i in 0..samples + 20 {
        let published = Instant::now();
        mq.publish_job(&format!("lat-{i}"), json!({}));
        let arrived = arrivals
            .recv_timeout(Duration::from_secs(30))
            .expect("RunJob arrived");
        let delivered = statuses
            .recv_timeout(Duration::from_secs(30))
            .expect("status delivered");
        if i >= 20 {
            // The first ones warm connections up.
            to_worker.push(arrived - published);
            to_status.push(delivered - arrived);
        }
    }

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
        ("latency.answer_to_status", to_status),
        ("latency.bare_publish_to_delivery", bare_amqp),
        ("latency.bare_grpc_unary", bare_grpc),
    ] {
        let (p50, p99) = percentiles_ms(&values);
        println!("{name}.p50_ms {p50:.3}");
        println!("{name}.p99_ms {p99:.3}");
    }
}
