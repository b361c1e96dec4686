//! Dispatch latency with labels: 1,000 no-op workers (one grpcio server on 1,000 ports)
//! register with an orchestrator, each offering one of 10 label sets (`pool=p0` …
//! `pool=p9`). At light load (one job at a time), publish → `RunJob` at a worker for
//! jobs that require a pool, beside the same run for jobs without labels: a labelled
//! claim scans the registry instead of taking a hint. `BENCH_SAMPLES` sets the count
//! (default 500). Run by scripts/bench.sh.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, Instant};

use blacktree::proto::worker::WorkerInfo;
use common::*;
use crossbeam_channel::unbounded;
use serde_json::json;
use support::{env_number, percentiles_ms, serve_noop_workers, NoopWorker};

const WORKERS: usize = 1000;
const POOLS: usize = 10;

fn main() {
    let samples = env_number("BENCH_SAMPLES", 500);
    let (arrivals_tx, arrivals) = unbounded();
    let worker = NoopWorker {
        arrivals: Some(arrivals_tx),
    };
    let (_server, ports) = serve_noop_workers(worker, WORKERS, 2);
    let names = Names::unique("labels-bench");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let orch = Orchestrator::start(
        SHARED_BROKER,
        &names,
        &["--dispatch-threads", "64", "--max-workers", "2000"],
    );
    for (i, port) in ports.iter().enumerate() {
        let mut info = WorkerInfo {
            id: format!("lb-{i}"),
            ip: "127.0.0.1".into(),
            port: i32::from(*port),
            capacity: 1,
            ..WorkerInfo::default()
        };
        info.labels.insert("pool".into(), format!("p{}", i % POOLS));
        let ack = register_as(orch.grpc_port, &info, None).expect("registered");
        assert!(ack.success, "{}", ack.message);
    }

    let mut rng = Rng::new(17);
    let mut sent = 0;
    let mut run = |labelled: bool| -> Vec<Duration> {
        let mut latencies = Vec::new();
        for i in 0..samples + 20 {
            let labels = if labelled {
                json!({ "labels": { "pool": format!("p{}", rng.below(POOLS)) } })
            } else {
                json!({})
            };
            let published = Instant::now();
            sent += 1;
            mq.publish_job(&format!("lb-{sent}"), labels);
            let arrived = arrivals
                .recv_timeout(Duration::from_secs(30))
                .expect("RunJob arrived");
            if i >= 20 {
                latencies.push(arrived - published);
            }
        }
        latencies
    };
    // Alternating halves, so that neither side gets the warmer half of the run.
    let (mut plain, mut labelled) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        plain.extend(run(false));
        labelled.extend(run(true));
    }
    println!("labels.workers {WORKERS}");
    println!("labels.pools {POOLS}");
    for (name, values) in [("plain", &plain), ("labelled", &labelled)] {
        let (p50, p99) = percentiles_ms(values);
        println!("labels.{name}.p50_ms {p50:.3}");
        println!("labels.{name}.p99_ms {p99:.3}");
    }
    let ratio = percentiles_ms(&labelled).0 / percentiles_ms(&plain).0;
    println!("labels.p50_ratio {ratio:.2}");
}
