//! Builds in flight during an orchestrator SIGKILL + restart (issue 14), at the
//! production defaults (health round 2 s, workers checking in every 3 s, `--adopt-wait`
//! 6 s). `BENCH_ADOPT_BUILDS` (default 8) gated builds run on four `blacktree worker`s of
//! capacity 2; the orchestrator is SIGKILLed while every build runs; half of the builds
//! end while no orchestrator runs (their answers are held), the other half are let go
//! once the new orchestrator is up (they end while it adopts them or after). Twice: with
//! the orchestrator's state file kept (the default), and with a fresh one (it must wait
//! for the workers to register again). Measured: builds run more than once (target 0),
//! and each status's extra delay: from the later of its build's end and the new
//! orchestrator's start to the status in the queue (target ≤ adopt-wait + one check-in
//! = 9 s). Run by scripts/bench.sh.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, SystemTime};

use common::build_env::WorkerProcess;
use common::gated::Builds;
use common::*;
use support::{env_number, percentile};

const WORKERS: usize = 4;
const CAPACITY: u32 = 2;
/// adopt-wait + one check-in at the defaults.
const TARGET: Duration = Duration::from_secs(9);
const LONG: Duration = Duration::from_secs(120);

fn main() {
    let jobs = env_number("BENCH_ADOPT_BUILDS", 8);
    println!("adoption.builds {jobs}");
    println!("adoption.target_s {}", TARGET.as_secs());
    // With the state file (the default), the new orchestrator knows the workers and its
    // first health round brings their reports; without one, it waits for each worker
    // to register again at its next check-in.
    for (mode, remembered) in [("remembered", true), ("forgotten", false)] {
        let figures = restart_during_builds(jobs, remembered);
        println!("adoption.{mode}.reruns {}", figures.reruns);
        println!("adoption.{mode}.adopted {}", figures.adopted);
        println!("adoption.{mode}.delay_p50_s {:.3}", figures.p50);
        println!("adoption.{mode}.delay_max_s {:.3}", figures.max);
    }
}

/// What one restart cost.
struct Figures {
    reruns: usize,
    adopted: f64,
    p50: f64,
    max: f64,
}

/// Runs `jobs` gated builds, SIGKILLs the orchestrator while they run, lets half end
/// while none runs, restarts it (with its state file, or with a fresh one when not
/// `remembered`) and lets the others go.
fn restart_during_builds(jobs: usize, remembered: bool) -> Figures {
    let defaults = ["--health-interval", "2s", "--health-timeout", "1s"];
    // One gRPC port for both orchestrators: the workers find the second where the first
    // was.
    let listen = format!("127.0.0.1:{}", free_port());
    let flags = [&defaults[..], &["--grpc-listen", listen.as_str()]].concat();
    let (Setup { mq, mut orch, .. }, _) = if remembered {
        Setup::remembering("bench-adopt", &flags)
    } else {
        (Setup::with_flags("bench-adopt", &flags), String::new())
    };
    let builds = Builds::start();
    let _workers: Vec<WorkerProcess> = (0..WORKERS)
        .map(|i| {
            let id = format!("bench-adopt-w{i}");
            let worker = builds.worker(
                &id,
                orch.grpc_port,
                CAPACITY,
                &["--check-in-interval", "3s"],
            );
            orch.wait_for_log(&format!("worker {id} registered"), LONG);
            worker
        })
        .collect();
    let ids: Vec<String> = (0..jobs).map(|i| format!("bench-adopt-{i}")).collect();
    for id in &ids {
        mq.publish_job(
            id,
            serde_json::json!({"repoUrl": "", "imageName": "unused"}),
        );
    }
    let slots = WORKERS * CAPACITY as usize;
    poll(LONG, "every slot to run a build", || {
        (builds.started() >= jobs.min(slots)).then_some(())
    });
    orch.signal("KILL");
    orch.wait_exit(LONG);
    let (during, after) = ids.split_at(jobs / 2);
    for id in during {
        builds.open(id);
    }
    poll(LONG, "the builds let go to end", || {
        during
            .iter()
            .all(|id| builds.ended(id).is_some())
            .then_some(())
    });
    let restarted = SystemTime::now();
    orch = orch.restart();
    for id in after {
        builds.open(id);
    }
    // Each status with when it was read (basic.get every 10 ms at most).
    let mut arrivals: Vec<(String, SystemTime)> = Vec::new();
    mq.statuses_until(LONG, |statuses| {
        for status in &statuses[arrivals.len()..] {
            let id = status["jobId"].as_str().unwrap_or_default().to_string();
            arrivals.push((id, SystemTime::now()));
        }
        arrivals.len() >= jobs
    });
    assert_eq!(arrivals.len(), jobs, "a status is missing");
    let mut delays: Vec<f64> = arrivals
        .iter()
        .map(|(id, at)| {
            let ended = builds.ended(id).expect("a build with a status ended");
            let from = ended.max(restarted);
            at.duration_since(from).unwrap_or_default().as_secs_f64()
        })
        .collect();
    delays.sort_by(f64::total_cmp);
    let metrics = http(orch.metrics_port, "/metrics").1;
    Figures {
        reruns: ids.iter().map(|id| builds.runs(id).saturating_sub(1)).sum(),
        adopted: sample(&metrics, "blacktree_jobs_adopted_total"),
        p50: percentile(&delays, 0.5),
        max: delays.last().copied().unwrap_or(0.0),
    }
}
