//! What the status page costs the orchestrator: its CPU per 1,000 jobs (64 no-op
//! workers) with nobody looking, and with the page open in a real headless Chromium
//! (reloading itself every 5 s), in alternating rounds of the same run; and one page
//! render's CPU (the page fetched 200 times with 64 workers and 100 finished jobs
//! listed). Run by scripts/bench.sh.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::json;
use support::{
    cpu_seconds, env_number, http_get, median_and_range, serve_noop_workers, static_workers,
    NoopWorker,
};

const WORKERS: usize = 64;

/// Headless Chromium showing `url` until killed.
fn browser(url: &str) -> Child {
    let profile = std::env::temp_dir().join(format!("bt-bench-chromium-{}", std::process::id()));
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.display()),
            "--remote-debugging-port=0",
            url,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromium (scripts/setup.sh installs it)")
}

/// Publishes `jobs` jobs and waits for their statuses; the orchestrator's CPU seconds.
fn round(mq: &Mq, orch: &Orchestrator, tag: &str, jobs: usize) -> f64 {
    let before = cpu_seconds(orch.process.pid());
    for i in 0..jobs {
        mq.publish_job(&format!("{tag}-{i}"), json!({}));
    }
    let statuses = mq.statuses(jobs, Duration::from_secs(300));
    assert_eq!(statuses.len(), jobs, "every job of {tag} ended");
    cpu_seconds(orch.process.pid()) - before
}

fn main() {
    let jobs = env_number("BENCH_PAGE_JOBS", 5000);
    let rounds = env_number("BENCH_PAGE_ROUNDS", 3);
    let names = Names::unique("bench-page");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let (_workers, ports) = serve_noop_workers(NoopWorker::default(), WORKERS, 1);
    let workers = static_workers("page-w", &ports);
    let flags = [
        "--worker",
        workers.as_str(),
        "--dispatch-threads",
        "64",
        "--health-interval",
        "2s",
        "--health-timeout",
        "1s",
    ];
    let orch = Orchestrator::start(SHARED_BROKER, &names, &flags);
    let url = format!("http://127.0.0.1:{}/", orch.metrics_port);
    round(&mq, &orch, "warm", 1000);

    let (mut closed, mut open) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        closed.push(round(&mq, &orch, &format!("closed-{r}"), jobs) * 1e6 / jobs as f64);
        let mut chromium = browser(&url);
        // The page loaded once before the round starts.
        std::thread::sleep(Duration::from_secs(3));
        open.push(round(&mq, &orch, &format!("open-{r}"), jobs) * 1e6 / jobs as f64);
        let _ = chromium.kill();
        let _ = chromium.wait();
    }

    let before = cpu_seconds(orch.process.pid());
    let fetches = 200;
    for _ in 0..fetches {
        assert!(http_get(orch.metrics_port, "/").contains("Workers"));
    }
    let render_ms = (cpu_seconds(orch.process.pid()) - before) * 1000.0 / fetches as f64;

    let (closed_mid, closed_low, closed_high) = median_and_range(closed.iter().copied());
    let (open_mid, open_low, open_high) = median_and_range(open.iter().copied());
    println!("page.jobs {jobs}");
    println!("page.rounds {rounds}");
    println!("page.closed_cpu_ms_per_1000 {closed_mid:.0} ({closed_low:.0}–{closed_high:.0})");
    println!("page.open_cpu_ms_per_1000 {open_mid:.0} ({open_low:.0}–{open_high:.0})");
    println!("page.ratio {:.2}", open_mid / closed_mid);
    println!("page.render_cpu_ms {render_ms:.2}");
}
