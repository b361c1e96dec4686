//! Failure detection at the default health settings (a round every 2 s, 1 s deadline,
//! unhealthy after 2 failed pings): four real `blacktree worker` processes; in each of
//! `BENCH_TRIALS` trials (default 10) one of them is frozen with SIGSTOP, and the time
//! until `/workers` shows it unhealthy (out of the free pool) is measured, then it is
//! thawed with SIGCONT and the time until it is free again. Throughout, every other
//! worker must stay free: a healthy worker removed is a false removal. Target:
//! detection ≤ interval × unhealthy-after + timeout = 5 s (the orchestrator pings a
//! worker whose ping failed again at once, so its own worst case is interval +
//! unhealthy-after × timeout = 4 s).
//!
//! Then, with builds running (default `--lost-after` 60 s): a worker frozen mid-build
//! (out of rotation, then its build given up after `--lost-after`), a worker killed
//! mid-build (its build lost at once), and a worker whose build saturates both cores
//! (its build must succeed: a false give-up otherwise). Run by scripts/bench.sh.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::build_env::WorkerProcess;
use common::*;
use serde_json::Value;
use support::{env_number, http_get, percentile};

const WORKERS: usize = 4;
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// The bound the defaults promise: interval × unhealthy-after + timeout.
const BOUND: Duration = Duration::from_secs(5);

fn main() {
    let trials = env_number("BENCH_TRIALS", 10);
    let names = Names::unique("detect");
    let orch = Orchestrator::start(
        SHARED_BROKER,
        &names,
        &["--health-interval", "2s", "--health-timeout", "1s"],
    );
    let workers: Vec<WorkerProcess> = (0..WORKERS)
        .map(|i| {
            WorkerProcess::start(
                &format!("detect-w{i}"),
                orch.grpc_port,
                &["--executor", "exec", "--exec-command", "true"],
            )
        })
        .collect();
    let mut watch = Watch {
        port: orch.metrics_port,
        false_removals: BTreeSet::new(),
    };
    let all_free = |states: &[(String, String)]| {
        states.len() == WORKERS && states.iter().all(|(_, state)| state == "free")
    };
    watch.wait(None, "every worker free", all_free);

    let (mut detect, mut recover) = (Vec::new(), Vec::new());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut rng = Rng::new(seed);
    for trial in 0..trials {
        let worker = &workers[trial % WORKERS];
        let id = Some(worker.id.as_str());
        // Freeze at a random moment of the health interval: right after a thaw the
        // rounds are in step with the trial loop.
        std::thread::sleep(rng.millis((0, HEALTH_INTERVAL.as_millis() as u64)));
        signal(worker.pid(), libc::SIGSTOP);
        let frozen = Instant::now();
        watch.wait(id, "the frozen worker out", |states| {
            states
                .iter()
                .any(|(w, state)| w == &worker.id && state == "unhealthy")
        });
        detect.push(frozen.elapsed().as_secs_f64());
        signal(worker.pid(), libc::SIGCONT);
        let thawed = Instant::now();
        watch.wait(id, "every worker free", all_free);
        recover.push(thawed.elapsed().as_secs_f64());
    }
    detect.sort_by(f64::total_cmp);
    recover.sort_by(f64::total_cmp);
    let within = detect.iter().filter(|&&d| d <= BOUND.as_secs_f64()).count();
    println!("detection.trials {trials}");
    println!("detection.min_s {:.2}", detect[0]);
    println!("detection.p50_s {:.2}", percentile(&detect, 0.5));
    println!("detection.max_s {:.2}", detect[trials - 1]);
    println!("detection.bound_s {:.1}", BOUND.as_secs_f64());
    println!("detection.within_bound {within}");
    println!("detection.recovery_p50_s {:.2}", percentile(&recover, 0.5));
    println!("detection.false_removals {}", watch.false_removals.len());
    give_up_times(&orch, &names);
}

/// A worker whose builds sleep `imageName` seconds (`burn`: while both cores spin),
/// with the label `bench=<id>`, so that the jobs labelled so run there only.
fn build_host(orch: &Orchestrator, id: &str, burn: bool) -> WorkerProcess {
    let command = if burn {
        // `$!`, not `jobs -p`: dash prints no jobs in a command substitution.
        "pids=; for i in 1 2; do (while :; do :; done) & pids=\"$pids $!\"; done; \
         sleep $BLACKTREE_IMAGE_NAME; kill $pids; exit 0"
    } else {
        "sleep $BLACKTREE_IMAGE_NAME"
    };
    let label = format!("bench={id}");
    let args = [
        "--executor",
        "exec",
        "--exec-command",
        command,
        "--label",
        &label,
    ];
    let worker = WorkerProcess::start(id, orch.grpc_port, &args);
    orch.wait_for_log(&format!("worker {id} registered"), Duration::from_secs(30));
    worker
}

/// Runs a `seconds` build on worker `id`, then `fault()`: the time until the worker
/// is out of rotation (`None` when it never is: `fault` did nothing), and until the
/// build's status, which must say `outcome`.
fn timed_fault(
    orch: &Orchestrator,
    mq: &Mq,
    id: &str,
    seconds: u32,
    outcome: &str,
    fault: impl FnOnce(),
) -> (Option<f64>, f64) {
    let labels = serde_json::json!({"bench": id});
    let job = format!("{id}-1");
    let extra =
        serde_json::json!({"repoUrl": "", "imageName": seconds.to_string(), "labels": labels});
    mq.publish_job(&job, extra);
    orch.wait_for_log(&format!("job {job}: dispatched"), Duration::from_secs(30));
    fault();
    let at = Instant::now();
    let mut out = None;
    let status = poll(Duration::from_secs(180), "the build's status", || {
        if out.is_none() && state_of(orch.metrics_port, id).as_deref() == Some("unhealthy") {
            out = Some(at.elapsed().as_secs_f64());
        }
        mq.statuses_until(Duration::from_millis(100), |s| !s.is_empty())
            .pop()
    });
    let ended = at.elapsed().as_secs_f64();
    assert_eq!(status["outcome"], outcome, "{status}");
    (out, ended)
}

/// Out-of-rotation and give-up times of a frozen and a killed worker with a build
/// running (default `--lost-after`), and whether a busy but alive one lost its build.
fn give_up_times(orch: &Orchestrator, names: &Names) {
    let mq = Mq::connect(SHARED_BROKER, names);
    let frozen = build_host(orch, "detect-frozen", false);
    let (out, lost) = timed_fault(orch, &mq, "detect-frozen", 300, "worker_lost", || {
        signal(frozen.pid(), libc::SIGSTOP)
    });
    signal(frozen.pid(), libc::SIGCONT);
    println!("detection.frozen_out_s {:.2}", out.unwrap_or(f64::NAN));
    println!("detection.frozen_given_up_s {lost:.2}");
    let killed = build_host(orch, "detect-killed", false);
    let (out, lost) = timed_fault(orch, &mq, "detect-killed", 300, "worker_lost", || {
        signal(killed.pid(), libc::SIGKILL)
    });
    println!("detection.killed_out_s {:.2}", out.unwrap_or(f64::NAN));
    println!("detection.killed_lost_s {lost:.2}");
    let _busy = build_host(orch, "detect-busy", true);
    let (out, _) = timed_fault(orch, &mq, "detect-busy", 20, "succeeded", || {});
    let metrics = http_get(orch.metrics_port, "/metrics");
    println!("detection.busy_out_of_rotation {}", u8::from(out.is_some()));
    println!(
        "detection.false_give_ups {}",
        sample(&metrics, "blacktree_jobs_given_up_total") - 1.0
    );
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    let sent = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(sent, 0, "kill({pid}, {signal})");
}

/// Reads `/workers` every few milliseconds and notes false removals: a worker out of
/// the free pool while it is not the frozen one.
struct Watch {
    port: u16,
    /// "worker state" of each false removal seen.
    false_removals: BTreeSet<String>,
}

impl Watch {
    /// `(id, state)` of every worker.
    fn states(&self) -> Option<Vec<(String, String)>> {
        let workers: Value = serde_json::from_str(&http_get(self.port, "/workers")).ok()?;
        let states = workers
            .as_array()?
            .iter()
            .map(|w| {
                (
                    w["id"].as_str().unwrap_or("").to_string(),
                    w["state"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        Some(states)
    }

    /// Polls until `done(states)`, noting any worker but `frozen` seen out of the pool.
    fn wait(
        &mut self,
        frozen: Option<&str>,
        what: &str,
        done: impl Fn(&[(String, String)]) -> bool,
    ) {
        poll(Duration::from_secs(30), what, || {
            let states = self.states()?;
            for (id, state) in &states {
                if state != "free" && Some(id.as_str()) != frozen {
                    self.false_removals.insert(format!("{id} {state}"));
                }
            }
            done(&states).then_some(())
        });
    }
}
