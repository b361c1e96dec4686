//! Several orchestrators on a three-node RabbitMQ cluster with quorum queues (issue 15),
//! all in one run on one cluster (`BrokerCluster`, the test harness's):
//! * throughput: `BENCH_CLUSTER_JOBS` jobs (default 10,000) drained from a filled quorum
//!   queue by one orchestrator, by two (each first connected to a node of its own), and
//!   by the raw amiquip loop (consume → confirmed status → ack, window 64) on the same
//!   kind of queues, with and without a bare `RunJob` per message, alternating for
//!   `BENCH_ROUNDS` rounds (default 3; medians);
//! * node failover: an orchestrator given two of the nodes; jobs published every 5 ms
//!   (through the third) while the node it uses is stopped (`stop_app`): from the stop
//!   to the first status of a job published after the node was down (so it went
//!   through the other node); `BENCH_FAILOVER_TRIALS` (3);
//! * orchestrator failover: eight gated builds on four `blacktree worker`s registered
//!   with both orchestrators; one orchestrator is SIGKILLed and the builds are let go:
//!   from the kill to each of its jobs' statuses, published by the other.
//!
//! Every orchestrator runs at the defaults (heartbeat 10 s, health round 2 s,
//! `--adopt-wait` 6 s; workers check in every 3 s). Run by scripts/bench.sh.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::build_env::WorkerProcess;
use common::gated::Builds;
use common::*;
use serde_json::json;
use support::raw::{fill, raw_loop, status_rate, throughput_flags, WINDOW, WORKERS};
use support::{
    env_number, median_and_range, percentile, serve_noop_workers, static_workers, NoopWorker,
};

const LONG: Duration = Duration::from_secs(120);

fn main() {
    let jobs = env_number("BENCH_CLUSTER_JOBS", 10_000);
    let rounds = env_number("BENCH_ROUNDS", 3).max(1);
    let cluster = BrokerCluster::start();
    let mut results: Vec<[f64; 4]> = Vec::new();
    for _ in 0..rounds {
        results.push([
            raw(&cluster, jobs, false),
            raw(&cluster, jobs, true),
            orchestrators(&cluster, jobs, 1),
            orchestrators(&cluster, jobs, 2),
        ]);
    }
    println!("cluster.jobs {jobs}");
    println!("cluster.rounds {rounds}");
    for (i, name) in ["raw", "raw_grpc", "one", "two"].iter().enumerate() {
        let rates = median_and_range(results.iter().map(|r| r[i]));
        println!("cluster.{name}_per_s {:.0}", rates.0);
        println!("cluster.{name}_per_s_range {:.0}–{:.0}", rates.1, rates.2);
    }
    for (name, ours, baseline) in [
        ("one_vs_raw", 2, 0),
        ("one_vs_raw_grpc", 2, 1),
        ("two_vs_one", 3, 2),
    ] {
        let ratios = median_and_range(results.iter().map(|r| r[ours] / r[baseline]));
        println!("cluster.{name} {:.3}", ratios.0);
        println!("cluster.{name}_range {:.2}–{:.2}", ratios.1, ratios.2);
    }
    let trials = env_number("BENCH_FAILOVER_TRIALS", 3).max(1);
    let mut node = node_failover(&cluster, trials);
    node.sort_by(f64::total_cmp);
    println!("cluster.node_failover_trials {trials}");
    println!("cluster.node_failover_min_s {:.2}", node[0]);
    println!("cluster.node_failover_p50_s {:.2}", percentile(&node, 0.5));
    println!("cluster.node_failover_max_s {:.2}", node[node.len() - 1]);
    let (mut kill, reruns) = kill_failover(&cluster);
    kill.sort_by(f64::total_cmp);
    println!("cluster.kill_jobs {}", kill.len());
    println!("cluster.kill_p50_s {:.2}", percentile(&kill, 0.5));
    println!("cluster.kill_max_s {:.2}", kill[kill.len() - 1]);
    println!("cluster.kill_reruns {reruns}");
}

/// The raw loop on quorum queues, through the first node (with `grpc`, a bare
/// `RunJob` to no-op workers per message too).
fn raw(cluster: &BrokerCluster, jobs: usize, grpc: bool) -> f64 {
    let names = Names::unique("clraw");
    let mq = Mq::on_quorum(&cluster.nodes[0], &names);
    raw_loop(&cluster.nodes[0].url(), &mq, jobs, &[], grpc).rate
}

/// `count` orchestrators (each first connected to a node of its own) draining `jobs`
/// from a filled quorum queue to 64 no-op workers.
fn orchestrators(cluster: &BrokerCluster, jobs: usize, count: usize) -> f64 {
    let names = Names::unique("clorch");
    let mq = Mq::on_quorum(&cluster.nodes[2], &names);
    let (_workers, ports) = serve_noop_workers(NoopWorker::default(), WORKERS, 1);
    fill(&mq, jobs, "cl");
    let mut flags = throughput_flags(&static_workers("cl-w", &ports), WINDOW);
    flags.extend(["--queue-type".to_string(), "quorum".to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let _running: Vec<Orchestrator> = (0..count)
        .map(|i| Orchestrator::start(&cluster.urls_from(i), &names, &flags))
        .collect();
    status_rate(&mq, jobs)
}

/// Seconds from each `stop_app` of the node an orchestrator uses to the first status
/// of a job published once that node was down.
fn node_failover(cluster: &BrokerCluster, trials: usize) -> Vec<f64> {
    let names = Names::unique("clnode");
    let mq = Mq::on_quorum(&cluster.nodes[2], &names);
    let (_workers, ports) = serve_noop_workers(NoopWorker::default(), 8, 1);
    let flags = [
        "--queue-type",
        "quorum",
        "--worker",
        &static_workers("cn-w", &ports),
    ];
    // The first two nodes: the trials stop the one in use, and the third carries the
    // bench's own publishing and reading.
    let urls = format!("{},{}", cluster.nodes[0].url(), cluster.nodes[1].url());
    let orch = Orchestrator::start(&urls, &names, &flags);
    // Jobs every 5 ms through the third node, numbered in order.
    let next = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (url, names, next, stop) = (
            cluster.nodes[2].url(),
            names.clone(),
            next.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mq = Mq::without_declaring(&url, &names);
            while !stop.load(Ordering::SeqCst) {
                let i = next.fetch_add(1, Ordering::SeqCst);
                mq.publish_job(&format!("f-{i}"), json!({}));
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut seconds = Vec::new();
    for _ in 0..trials {
        let in_use = node_in_use(cluster, &orch);
        let stopped = SystemTime::now();
        cluster.nodes[in_use].ctl(&["stop_app"]);
        // Every job from here on was published with that node down.
        let marker = next.load(Ordering::SeqCst);
        let first = poll(LONG, "a status through another node", || {
            let waiting = mq.depth(&names.status) as usize;
            mq.statuses(waiting, LONG)
                .iter()
                .filter(|s| index(s["jobId"].as_str().unwrap()) >= marker)
                .filter_map(|s| humantime::parse_rfc3339(s["finishedAt"].as_str()?).ok())
                .min()
        });
        seconds.push(
            first
                .duration_since(stopped)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        cluster.nodes[in_use].ctl(&["start_app"]);
        cluster.nodes[in_use].wait_accepting();
    }
    stop.store(true, Ordering::SeqCst);
    publisher.join().unwrap();
    seconds
}

/// The number in a jobId `f-N`.
fn index(job_id: &str) -> usize {
    job_id.trim_start_matches("f-").parse().unwrap_or(0)
}

/// The node `orch` is connected to, as its `/healthz` names it.
fn node_in_use(cluster: &BrokerCluster, orch: &Orchestrator) -> usize {
    poll(LONG, "the orchestrator connected", || {
        let (code, body) = http(orch.metrics_port, "/healthz");
        let url = body.lines().find_map(|l| l.strip_prefix("broker: "))?;
        let node = cluster
            .nodes
            .iter()
            .position(|n| url.contains(&format!(":{}/", n.port)));
        (code == "200").then_some(node).flatten()
    })
}

/// Seconds from SIGKILL of one of two orchestrators to each of its jobs' statuses,
/// published by the other; and the builds run more than once.
fn kill_failover(cluster: &BrokerCluster) -> (Vec<f64>, usize) {
    let names = Names::unique("clkill");
    let mq = Mq::on_quorum(&cluster.nodes[2], &names);
    let quorum = ["--queue-type", "quorum"];
    let a = Orchestrator::start(&cluster.urls_from(0), &names, &quorum);
    let mut b = Orchestrator::start(&cluster.urls_from(1), &names, &quorum);
    let builds = Builds::start();
    let second = format!("127.0.0.1:{}", b.grpc_port);
    let flags = ["--orchestrator", &second, "--check-in-interval", "3s"];
    let _workers: Vec<WorkerProcess> = (0..4)
        .map(|i| builds.worker(&format!("ck{i}"), a.grpc_port, 2, &flags))
        .collect();
    for o in [&a, &b] {
        poll(LONG, "four workers registered with both", || {
            (workers_json(o.metrics_port).len() == 4).then_some(())
        });
    }
    let jobs: Vec<String> = (0..8).map(|i| format!("k-{i}")).collect();
    for job in &jobs {
        mq.publish_job(job, json!({"repoUrl": "", "imageName": "unused"}));
    }
    poll(LONG, "every build running", || {
        (builds.started() == jobs.len()).then_some(())
    });
    // A job's dispatch line may wait up to 10 ms for the orchestrator's next publish.
    let dispatched =
        |log: &str, j: &String| log.contains(&format!("job {j}: dispatched to worker"));
    let log = poll(LONG, "every dispatch logged", || {
        let (log_a, log_b) = (a.log(), b.log());
        jobs.iter()
            .all(|j| dispatched(&log_a, j) || dispatched(&log_b, j))
            .then_some(log_b)
    });
    let theirs: Vec<&String> = jobs.iter().filter(|j| dispatched(&log, j)).collect();
    assert!(!theirs.is_empty(), "the second orchestrator took no job");
    let killed = SystemTime::now();
    b.signal("KILL");
    b.wait_exit(LONG);
    for job in &jobs {
        builds.open(job);
    }
    let statuses = mq.statuses_until(LONG, |s| {
        theirs
            .iter()
            .all(|j| s.iter().any(|st| st["jobId"] == j.as_str()))
    });
    let seconds = theirs
        .iter()
        .filter_map(|j| {
            let status = statuses.iter().find(|s| s["jobId"] == j.as_str())?;
            let at = humantime::parse_rfc3339(status["finishedAt"].as_str()?).ok()?;
            Some(at.duration_since(killed).unwrap_or_default().as_secs_f64())
        })
        .collect();
    let reruns = jobs.iter().map(|j| builds.runs(j).saturating_sub(1)).sum();
    (seconds, reruns)
}
