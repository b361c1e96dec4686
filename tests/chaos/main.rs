//! Fault injection (issue 6): jobs flow from RabbitMQ through an orchestrator to real
//! `blacktree worker` processes while the test SIGKILLs and freezes workers, closes every
//! broker connection, stops and starts the broker app, and SIGKILLs and SIGTERMs the
//! orchestrator while long builds run.
//! Everything runs on a private broker node, since the test stops its app.
//!
//! At the end it checks what must hold under faults:
//! * no job is lost: every jobId gets a status;
//! * duplicates (at-least-once) stay within what the faults can explain, and each one
//!   is attributed to a fault by its timing;
//! * no worker incarnation (worker id + agent pid) ever ran more steps than its capacity;
//! * outcomes are `succeeded`, or `worker_lost` on a worker that was killed or frozen;
//! * a build runs once unless its worker died (or the test published the job twice):
//!   builds that outlive their orchestrator, or its broker connection, are adopted by
//!   whichever orchestrator gets the redelivery, and so are the answers of builds that
//!   finished before their status was confirmed (workers keep them for a while), and a
//!   redelivered build whose worker is frozen when its new orchestrator starts waits for
//!   that worker (each orchestrator keeps its state file across its restarts, as a
//!   deployment does, so it knows the workers at once);
//! * the orchestrator's RSS comes back near its idle baseline.
//!
//! `chaos_on_a_cluster` runs the same workload and checks (issue 15) through two
//! orchestrators on a three-node RabbitMQ cluster with quorum queues, each given every
//! node's URL (starting with a different node), with workers registered with both: the
//! node the first orchestrator uses is stopped and started again, the second
//! orchestrator is SIGKILLed and restarted, every connection is closed.
//!
//! `CHAOS_JOBS` sets the number of jobs (300 by default, 1,000 on the cluster;
//! `scripts/chaos.sh` runs 2,000) and `CHAOS_SEED` replays a run's fault schedule (the
//! seed is printed first): the kinds of fault, their order, the gaps and durations.
//! Which worker a worker fault hits also depends on which workers are running a step
//! at that moment.

#[path = "../common/mod.rs"]
mod common;

mod cluster;
mod publisher;
mod report;
mod steps;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::build_env::TempDir;
use crate::common::{rss_kib, Rng};

use cluster::*;
use publisher::*;
use report::*;
use steps::*;

/// Jobs of the short form that CI runs, on one node and on the cluster; `CHAOS_JOBS`
/// overrides.
pub const DEFAULT_JOBS: usize = 300;
pub const CLUSTER_JOBS: usize = 1000;
/// Workers, and the steps each runs at once.
pub const WORKERS: usize = 4;
pub const CAPACITY: usize = 2;
/// The orchestrator's dispatch threads and prefetch (they bound the duplicates).
pub const DISPATCH_THREADS: usize = 16;
pub const PREFETCH: usize = 16;
/// Jobs per confirmed batch of the test's publisher.
pub const BATCH: usize = 10;
/// Publishing is spread over at least this long, at most `MAX_RATE` jobs a second, so
/// that every fault hits a flowing workload.
pub const MIN_PUBLISHING: Duration = Duration::from_secs(20);
pub const MAX_RATE: f64 = 50.0;
/// Share of the workers' slots the jobs keep busy on average: the mean step time is
/// chosen from it, so that steps are running whenever a fault hits, in the short form
/// (300 jobs over 20 s: ≈300 ms steps) as in the long one (2,000 over 40 s: ≈100 ms),
/// with room left for the backlog a fault leaves behind.
pub const UTILISATION: f64 = 0.6;
/// Ranges (ms) of the gap between two faults, of how long a worker stays frozen, of how
/// long the broker app stays stopped, and of how long a killed process stays down.
pub const FAULT_GAP: (u64, u64) = (500, 2000);
pub const FREEZE: (u64, u64) = (1500, 3000);
pub const BROKER_DOWN: (u64, u64) = (500, 2000);
pub const DOWNTIME: (u64, u64) = (0, 1000);
/// Every `LONG_EVERY`-th job is a long build of `LONG_STEP_MS` ms; an orchestrator
/// restart waits up to `LONG_BUILD_WAIT` for one to run, so that builds outlive their
/// orchestrator and must be adopted (within `ADOPT_WAIT`), not run again.
pub const LONG_EVERY: usize = 100;
pub const LONG_STEP_MS: u64 = 4000;
pub const LONG_BUILD_WAIT: Duration = Duration::from_secs(10);
pub const ADOPT_WAIT: &str = "2s";
/// How long after a fault an orchestrator may still adopt a build: its adopt wait, and
/// a worker check-in or two.
pub const ADOPTION_DELAY: Duration = Duration::from_secs(3);
/// Deadline of any single wait (a process to start, the broker to come back).
pub const LONG: Duration = Duration::from_secs(60);
/// Deadline for every job to have its status once publishing and faults are over.
pub const SETTLE: Duration = Duration::from_secs(180);
/// How far from a fault an effect may show and still be attributed to it: a status
/// published on a connection that the fault cut was finished shortly before; a job
/// on a killed or frozen worker ends within two missed pings (≈1 s) of the fault, or
/// when a call to the restarted worker fails while gRPC still reconnects.
pub const ATTRIBUTION_SLACK: Duration = Duration::from_secs(5);
/// The orchestrator's memory is bounded by the prefetch, the dispatch threads and the
/// workers (ARCHITECTURE.md, "Memory"); what it keeps per job is the dedupe window's
/// jobId (≈100 bytes, well under 1 MiB for 2,000 jobs). 16 MiB over the idle baseline
/// leaves room for the allocator keeping freed pages in its per-thread arenas, while a
/// leak of 8 KiB per job (a kept delivery, log or status) would exceed it at 2,000.
pub const RSS_TOLERANCE_KIB: u64 = 16 * 1024;

/// The two tests take turns: each loads the machine on its own.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn chaos() {
    run(Shape::SINGLE, DEFAULT_JOBS);
}

#[test]
fn chaos_on_a_cluster() {
    run(Shape::CLUSTER, CLUSTER_JOBS);
}

fn run(shape: Shape, default_jobs: usize) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let wall = Instant::now();
    let settings = Settings::from_env(default_jobs);
    let step_ms = step_millis(settings.jobs);
    println!(
        "chaos: {} jobs over {:?} on {shape:?}, steps of {step_ms} ms on average, seed {} \
         (replay with CHAOS_SEED={})",
        settings.jobs,
        publishing_time(settings.jobs),
        settings.seed,
        settings.seed
    );
    let mut rng = Rng::new(settings.seed);
    let dir = TempDir::new("chaos");
    let mut cluster = Cluster::start(shape, &dir.0, step_ms);
    let ids: Vec<String> = (0..settings.jobs).map(|i| format!("chaos-{i}")).collect();

    let publisher = spawn_publisher(
        cluster.nodes.last().unwrap().url(),
        cluster.names.exchange.clone(),
        ids.clone(),
        publishing_time(ids.len()),
    );
    let faults = run_faults(&mut cluster, &mut rng, &publisher);
    let published = publisher.join().expect("the publisher thread");
    // Kept to the end: dropping it deletes the queues the orchestrator consumes.
    let reader = cluster.reader();
    let statuses = collect_statuses(&reader, cluster.nodes.last().unwrap(), &ids);
    let rss_end: Vec<u64> = cluster
        .orchestrators
        .iter()
        .map(|o| rss_kib(o.process.process.pid()))
        .collect();

    let report = Report::new(&ids, &statuses, &faults, &published, &cluster);
    report.print(&cluster, &rss_end, wall.elapsed());
    report.check(&cluster, &rss_end);
}

/// What the environment asks for.
struct Settings {
    jobs: usize,
    seed: u64,
}

impl Settings {
    fn from_env(default_jobs: usize) -> Settings {
        let var = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
            })
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        Settings {
            jobs: var("CHAOS_JOBS").map_or(default_jobs, |n| n as usize),
            seed: var("CHAOS_SEED")
                .unwrap_or(now.as_nanos() as u64 ^ u64::from(std::process::id())),
        }
    }
}

/// How long publishing is spread over.
fn publishing_time(jobs: usize) -> Duration {
    MIN_PUBLISHING.max(Duration::from_secs_f64(jobs as f64 / MAX_RATE))
}

/// The mean step time (ms) that keeps `UTILISATION` of the slots busy.
fn step_millis(jobs: usize) -> u64 {
    let slots = (WORKERS * CAPACITY) as f64;
    let ms = UTILISATION * slots * publishing_time(jobs).as_secs_f64() * 1000.0 / jobs as f64;
    (ms as u64).clamp(20, 500)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
