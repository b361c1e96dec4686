//! Throughput: N jobs through the orchestrator to 64 no-op gRPC workers, beside a raw
//! amiquip loop doing the broker's part of the same work (consume, publish a status with
//! publisher confirms, ack after the confirm) with the same in-flight window, in one
//! run; and beside the same loop making a bare asynchronous `RunJob` call to the no-op
//! workers for each message before publishing its status (the broker's part plus the
//! gRPC part, with no thread of its own between them: the floor for all of Blacktree's
//! work on this machine). Each drains a queue filled beforehand; each rate is measured
//! from the first status to the last. A fourth run gives the orchestrator `BENCH_WIDE`
//! no-op workers (default 1,000) and as many dispatch threads and prefetched jobs, to
//! compare its CPU per job with that many jobs running at once against 64. A fifth and a
//! sixth run are DESIGN.md's threads doing nothing but their hand-offs
//! ([`support::skeleton`]), with 64 and with `BENCH_WIDE` workers, so that the
//! orchestrator's CPU splits into what its threads cost and what its own work costs.
//! `BENCH_JOBS` sets N (default 20,000); the six alternate for `BENCH_ROUNDS` rounds
//! (default 3), and each figure is the median over the rounds (a ratio is taken within
//! each round). `BENCH_AB=A,B` compares two `blacktree` binaries instead (see [`ab`]).
//! CPU is read per process, and per kind of thread for the orchestrator, the floor loop
//! and the skeleton (their own threads, apart from the no-op workers and the status
//! reader sharing the bench's process); the sleeps per job count the hand-offs between
//! threads. Run by scripts/bench.sh.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::*;
use support::raw::{fill, raw_loop, status_rate, throughput_flags, Run, WORKERS};
use support::{
    broker_pid, env_number, median_and_range, process_threads, serve_noop_workers, static_workers,
    threads_cpu_seconds, CpuMeter, NoopWorker, ThreadUse, NOOP_THREADS,
};

fn main() {
    let jobs = env_number("BENCH_JOBS", 20_000);
    let rounds = env_number("BENCH_ROUNDS", 3).max(1);
    let wide = env_number("BENCH_WIDE", 1_000);
    let broker = broker_pid();
    if let Ok(binaries) = std::env::var("BENCH_AB") {
        return ab(&binaries, jobs, rounds, broker);
    }
    // Rounds alternate the six so that a slow spell of the machine hits all of them;
    // each ratio is taken within a round, then the median is reported.
    let mut results: Vec<[Run; 6]> = Vec::new();
    for _ in 0..rounds {
        results.push([
            raw(jobs, broker, false),
            raw(jobs, broker, true),
            orchestrator(jobs, broker, WORKERS),
            orchestrator(jobs, broker, wide),
            skeleton(jobs, broker, WORKERS),
            skeleton(jobs, broker, wide),
        ]);
    }
    println!("throughput.jobs {jobs}");
    println!("throughput.rounds {rounds}");
    println!("throughput.wide {wide}");
    let names = [
        "raw",
        "raw_grpc",
        "blacktree",
        "blacktree_wide",
        "skeleton",
        "skeleton_wide",
    ];
    for (i, name) in names.iter().enumerate() {
        let rates = median_and_range(results.iter().map(|r| r[i].rate));
        println!("throughput.{name}_per_s {:.0}", rates.0);
        println!(
            "throughput.{name}_per_s_range {:.0}–{:.0}",
            rates.1, rates.2
        );
        let per_job = |used: ThreadUse| used.sleeps as f64 / jobs as f64;
        let sleeps = median_and_range(
            results
                .iter()
                .map(|r| per_job(ThreadUse::total(&r[i].threads))),
        );
        println!("throughput.{name}.sleeps_per_job {:.1}", sleeps.0);
        // By kind of thread: sleeps per job, CPU ms per 1,000 jobs.
        for kind in results[0][i].threads.keys() {
            let of_kind = |r: &[Run; 6]| r[i].threads.get(kind).copied().unwrap_or_default();
            let sleeps = median_and_range(results.iter().map(|r| per_job(of_kind(r))));
            println!("throughput.{name}.sleeps_per_job.{kind} {:.2}", sleeps.0);
            let cpu = median_and_range(results.iter().map(|r| of_kind(r).cpu * 1e6 / jobs as f64));
            println!(
                "throughput.{name}.cpu_ms_per_1000.thread.{kind} {:.1}",
                cpu.0
            );
        }
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
    // The orchestrator's CPU per job against the floor loop's own (its thread, gRPC
    // client and AMQP I/O threads; not the no-op workers), within each round.
    // Against the floor loop's own CPU; and with `wide` jobs running at once against 64;
    // and the design's threads alone against the floor loop, the orchestrator against them.
    let cpu_ratios = [
        ("cpu_ratio", (2, "orchestrator"), (1, "floor_loop")),
        ("cpu_wide_ratio", (3, "orchestrator"), (2, "orchestrator")),
        ("cpu_skeleton_ratio", (4, "skeleton"), (1, "floor_loop")),
        ("cpu_over_skeleton", (2, "orchestrator"), (4, "skeleton")),
        ("cpu_skeleton_wide_ratio", (5, "skeleton"), (4, "skeleton")),
    ];
    for (name, (run, process), (base_run, base_process)) in cpu_ratios {
        let ratios = median_and_range(
            results
                .iter()
                .map(|r| cpu_of(&r[run], process) / cpu_of(&r[base_run], base_process)),
        );
        println!("throughput.{name} {:.2}", ratios.0);
        println!("throughput.{name}_range {:.2}–{:.2}", ratios.1, ratios.2);
    }
    let rate_ratios = [
        ("ratio", (2, 0)),
        ("ratio_grpc", (2, 1)),
        ("skeleton_ratio_grpc", (4, 1)),
        ("ratio_skeleton", (2, 4)),
    ];
    for (name, (run, baseline)) in rate_ratios {
        let ratios = median_and_range(results.iter().map(|r| r[run].rate / r[baseline].rate));
        println!("throughput.{name} {:.3}", ratios.0);
        println!("throughput.{name}_range {:.2}–{:.2}", ratios.1, ratios.2);
    }
}

/// `BENCH_AB=A,B` (two `blacktree` binaries): the orchestrator with 64 workers only,
/// the two builds one after the other in each of `rounds` pairs (which goes first
/// alternates), so that a change's effect on the CPU per job shows above this machine's
/// drift: each build's CPU per 1,000 jobs, sleeps per job and rate (medians), and B's
/// CPU over A's taken within each pair (median and range).
fn ab(binaries: &str, jobs: usize, rounds: usize, broker: u32) {
    let (a, b) = binaries
        .split_once(',')
        .expect("BENCH_AB names two binaries: A,B");
    let run = |binary: &str| {
        // Read by `Orchestrator::start`; nothing else runs meanwhile.
        std::env::set_var("BLACKTREE_BIN", binary);
        let run = orchestrator(jobs, broker, WORKERS);
        let cpu = cpu_of(&run, "orchestrator") * 1e6 / jobs as f64;
        let sleeps = ThreadUse::total(&run.threads).sleeps as f64 / jobs as f64;
        [cpu, sleeps, run.rate]
    };
    let pairs: Vec<[[f64; 3]; 2]> = (0..rounds)
        .map(|i| {
            if i % 2 == 0 {
                let first = run(a);
                [first, run(b)]
            } else {
                let second = run(b);
                [run(a), second]
            }
        })
        .collect();
    for (side, name) in ["a", "b"].iter().enumerate() {
        for (k, figure) in ["cpu_ms_per_1000", "sleeps_per_job", "per_s"]
            .iter()
            .enumerate()
        {
            let (median, low, high) = median_and_range(pairs.iter().map(|p| p[side][k]));
            println!("throughput.ab.{name}.{figure} {median:.2} ({low:.2}–{high:.2})");
        }
    }
    let ratios = median_and_range(pairs.iter().map(|p| p[1][0] / p[0][0]));
    let lower = pairs.iter().filter(|p| p[1][0] < p[0][0]).count();
    println!(
        "throughput.ab.cpu_b_over_a {:.3} ({:.2}–{:.2}); B used less in {lower} of {rounds} pairs",
        ratios.0, ratios.1, ratios.2
    );
}

/// The CPU seconds `run` measured for `process` (NaN if it measured none).
fn cpu_of(run: &Run, process: &str) -> f64 {
    run.cpu
        .iter()
        .find(|(name, _)| *name == process)
        .map_or(f64::NAN, |(_, seconds)| *seconds)
}

/// The orchestrator with `workers` no-op workers of one slot each, as many dispatch
/// threads and as many deliveries prefetched (jobs running at once).
fn orchestrator(jobs: usize, broker: u32, workers: usize) -> Run {
    let names = Names::unique("bench");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let (_workers, ports) = serve_noop_workers(NoopWorker::default(), workers, 1);
    fill(&mq, jobs, "bench");
    let window = u16::try_from(workers).expect("at most 65535 workers");
    let flags = throughput_flags(&static_workers("bench-w", &ports), window);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let orch = Orchestrator::start(SHARED_BROKER, &names, &flags);
    // From the moment it is connected: a few jobs may go before (milliseconds).
    let meter = CpuMeter::start(&[orch.process.pid(), broker]);
    let noop_before = threads_cpu_seconds(NOOP_THREADS);
    let before = process_threads(orch.process.pid());
    let rate = status_rate(&mq, jobs);
    let (cpu, _) = meter.read();
    let threads = process_threads(orch.process.pid())
        .into_iter()
        .map(|(kind, after)| {
            let used = after - before.get(&kind).copied().unwrap_or_default();
            (kind, used)
        })
        .collect();
    Run {
        threads,
        rate,
        cpu: vec![
            ("orchestrator", cpu[0]),
            ("broker", cpu[1]),
            (
                "noop_workers",
                threads_cpu_seconds(NOOP_THREADS) - noop_before,
            ),
        ],
    }
}

/// DESIGN.md's threads alone, with `workers` no-op workers and as many dispatch
/// threads, on the shared broker, on queues of their own.
fn skeleton(jobs: usize, broker: u32, workers: usize) -> Run {
    let names = Names::unique("skel");
    let mq = Mq::connect(SHARED_BROKER, &names);
    support::skeleton::skeleton(SHARED_BROKER, &mq, jobs, workers, &[("broker", broker)])
}

/// The raw loop on the shared broker, on queues of its own.
fn raw(jobs: usize, broker: u32, grpc: bool) -> Run {
    let names = Names::unique(if grpc { "rawgrpc" } else { "raw" });
    let mq = Mq::connect(SHARED_BROKER, &names);
    raw_loop(SHARED_BROKER, &mq, jobs, &[("broker", broker)], grpc)
}
