//! Scale and cost per job. 1,000 no-op workers (one grpcio server listening on 1,000
//! ports) are registered as static workers of an orchestrator at the default health
//! settings (a round every 2 s, 1 s deadline); beside it, in the same run, a bare grpcio
//! client process holds the same 1,000 channels and pings them all asynchronously on the
//! same schedule. For each: resident memory, threads, the time of one health round and
//! idle CPU. Then the orchestrator's CPU time per 1,000 jobs with 10, 100 and 1,000
//! workers (net of its idle CPU), which should stay flat. `BENCH_SCALE_JOBS` sets the
//! jobs per size (default 5,000). Run by scripts/bench.sh.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blacktree::grpc;
use blacktree::proto::job::PingRequest;
use common::*;
use grpcio::{CallOption, EnvBuilder};
use serde_json::json;
use support::*;

/// Environment variable that turns this program into the bare client (ports, comma-separated).
const BARE_CLIENT: &str = "BLACKTREE_BENCH_BARE_CLIENT_PORTS";
const WORKERS: usize = 1000;
const SIZES: [usize; 3] = [10, 100, 1000];
/// The orchestrator's defaults.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Health rounds watched for the idle figures.
const ROUNDS: usize = 5;
/// The orchestrator's default dispatch pool.
const DISPATCH_THREADS: usize = 64;

fn main() {
    if let Ok(ports) = std::env::var(BARE_CLIENT) {
        return bare_client(&ports);
    }
    let jobs = env_number("BENCH_SCALE_JOBS", 5_000);
    let (_workers, ports) = serve_noop_workers(NoopWorker::default(), WORKERS, 2);
    let bare = bare_idle(&ports);
    print_idle("bare", &bare);
    for size in SIZES {
        let figures = orchestrator(&ports[..size], jobs);
        print_idle(&format!("w{size}"), &figures.idle);
        println!(
            "scale.w{size}.cpu_ms_per_1000_jobs {:.0}",
            figures.cpu_ms_per_1000_jobs
        );
    }
    println!("scale.workers {WORKERS}");
    println!("scale.jobs {jobs}");
}

/// A process at rest: only health rounds.
struct Idle {
    rss_mib: f64,
    threads: u64,
    /// Threads by name.
    thread_names: String,
    /// Median time of one round, in ms.
    round_ms: f64,
    /// Percent of one core.
    cpu_pct: f64,
}

impl Idle {
    /// `pid`'s figures now, its CPU over `meter`'s window, and the rounds' times (ms).
    fn read(pid: u32, meter: &CpuMeter, rounds: Vec<f64>) -> Idle {
        let (cpu, wall) = meter.read();
        Idle {
            rss_mib: rss_mib(pid),
            threads: threads(pid),
            thread_names: thread_names(pid),
            round_ms: median_and_range(rounds).0,
            cpu_pct: cpu[0] / wall * 100.0,
        }
    }
}

fn print_idle(name: &str, idle: &Idle) {
    println!("scale.{name}.rss_mib {:.1}", idle.rss_mib);
    println!("scale.{name}.threads {}", idle.threads);
    println!("scale.{name}.thread_names {}", idle.thread_names);
    println!("scale.{name}.round_ms {:.1}", idle.round_ms);
    println!("scale.{name}.idle_cpu_pct {:.2}", idle.cpu_pct);
}

/// Runs this program as the bare client and measures it over `ROUNDS` rounds.
fn bare_idle(ports: &[u16]) -> Idle {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut child = Command::new(std::env::current_exe().expect("this program"))
        .env(BARE_CLIENT, ports.join(","))
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the bare client");
    let pid = child.id();
    let mut rounds = BufReader::new(child.stdout.take().expect("piped stdout"))
        .lines()
        .map(|line| line.expect("a round").parse::<f64>().expect("round ms"));
    // The first round connects every channel.
    rounds.next().expect("a first round");
    let meter = CpuMeter::start(&[pid]);
    let times: Vec<f64> = rounds.by_ref().take(ROUNDS).collect();
    let idle = Idle::read(pid, &meter, times);
    let _ = child.kill();
    let _ = child.wait();
    idle
}

/// The bare client: the same channels as the orchestrator's registry (same builder),
/// pinged all at once every interval with the same deadline; prints each round's ms.
fn bare_client(ports: &str) {
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let clients: Vec<_> = ports
        .split(',')
        .map(|port| support::worker_client(&env, port.parse().expect("a port number")))
        .collect();
    let request = PingRequest::new();
    let mut out = std::io::stdout();
    loop {
        let started = Instant::now();
        let calls: Vec<_> = clients
            .iter()
            .map(|c| c.ping_async_opt(&request, CallOption::default().timeout(HEALTH_TIMEOUT)))
            .collect();
        for call in calls {
            let _ = call.map(|mut c| grpc::cancel::wait(&mut c, None));
        }
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if writeln!(out, "{ms:.3}").and_then(|_| out.flush()).is_err() {
            return;
        }
        std::thread::sleep(HEALTH_INTERVAL.saturating_sub(started.elapsed()));
    }
}

/// What one orchestrator size measured.
struct SizeFigures {
    idle: Idle,
    cpu_ms_per_1000_jobs: f64,
}

/// An orchestrator with the workers on `ports`: idle figures, then `jobs` jobs.
fn orchestrator(ports: &[u16], jobs: usize) -> SizeFigures {
    let size = ports.len();
    let names = Names::unique(&format!("scale{size}"));
    let mq = Mq::connect(SHARED_BROKER, &names);
    let orch = Orchestrator::start(
        SHARED_BROKER,
        &names,
        &[
            "--worker",
            &static_workers("scale-w", ports),
            "--dispatch-threads",
            &DISPATCH_THREADS.to_string(),
            "--health-interval",
            "2s",
            "--health-timeout",
            "1s",
        ],
    );
    let pid = orch.process.pid();
    let metrics = || http_get(orch.metrics_port, "/metrics");
    poll(
        Duration::from_secs(60),
        "every worker to answer pings",
        || {
            let free = find_sample(&metrics(), r#"blacktree_workers{state="free"}"#)?;
            (free as usize == size).then_some(())
        },
    );
    let meter = CpuMeter::start(&[pid]);
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        std::thread::sleep(HEALTH_INTERVAL);
        rounds.push(
            find_sample(&metrics(), "blacktree_health_round_seconds").expect("a round") * 1000.0,
        );
    }
    let idle = Idle::read(pid, &meter, rounds);

    let meter = CpuMeter::start(&[pid]);
    for i in 0..jobs {
        mq.publish_job(&format!("scale{size}-{i}"), json!({}));
    }
    poll(Duration::from_secs(300), "every status", || {
        (mq.depth(&names.status) as usize >= jobs).then_some(())
    });
    let (cpu, wall) = meter.read();
    let net = cpu[0] - idle.cpu_pct / 100.0 * wall;
    SizeFigures {
        idle,
        cpu_ms_per_1000_jobs: net * 1000.0 / jobs as f64 * 1000.0,
    }
}
