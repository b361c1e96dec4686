//! The cost of live build logs: a real `blacktree worker` (exec executor) runs a build
//! that prints 10 MB (100,000 lines of 100 bytes, each stamped with the wall-clock time
//! it was printed) at full speed. Measured: the orchestrator's CPU for that job with
//! `--logs-key` off and on, in the same run, and with it on, the delay from a line's
//! print to its delivery from the logs queue (p50 / p99; it includes the batching of up
//! to 200 ms). Run by scripts/bench.sh.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use amiquip::{ConsumerMessage, ConsumerOptions, FieldTable, QueueDeclareOptions};
use common::build_env::WorkerProcess;
use common::*;
use serde_json::{json, Value};
use support::{cpu_seconds, percentile};

const LINES: usize = 100_000;
const LOGS_KEY: &str = "api.logs";

/// A build printing `LINES` stamped lines of 100 bytes.
fn printer() -> String {
    format!(
        "perl -MTime::HiRes=time -e '$| = 0; for (1..{LINES}) {{ printf \"t=%.6f %s\\n\", time, \"x\" x 80 }}'"
    )
}

/// Runs one printing job on an orchestrator with `flags`; returns its CPU seconds for
/// the job and, with logs on, each line's delay from print to delivery.
fn run(tag: &str, flags: &[&str]) -> (f64, Vec<f64>) {
    let names = Names::unique(tag);
    let mq = Mq::connect(SHARED_BROKER, &names);
    let logs_queue = format!("{}.logs", names.status);
    let channel = mq.channel();
    channel
        .queue_declare(
            logs_queue.as_str(),
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
        )
        .unwrap();
    channel
        .queue_bind(
            logs_queue.as_str(),
            names.exchange.as_str(),
            LOGS_KEY,
            FieldTable::new(),
        )
        .unwrap();
    let consumer = channel
        .basic_consume(
            logs_queue.as_str(),
            ConsumerOptions {
                no_ack: true,
                ..ConsumerOptions::default()
            },
        )
        .unwrap();
    let orch = Orchestrator::start(SHARED_BROKER, &names, flags);
    let command = printer();
    let _worker = WorkerProcess::start(
        &format!("{tag}-w"),
        orch.grpc_port,
        &["--executor", "exec", "--exec-command", &command],
    );
    orch.wait_for_log("registered", Duration::from_secs(30));
    let before = cpu_seconds(orch.process.pid());
    mq.publish_job(&format!("{tag}-1"), json!({ "repoUrl": "" }));
    let mut delays = Vec::new();
    if flags.contains(&"--logs-key") {
        while delays.len() < LINES {
            let Ok(ConsumerMessage::Delivery(delivery)) =
                consumer.receiver().recv_timeout(Duration::from_secs(60))
            else {
                break;
            };
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            let message: Value = serde_json::from_slice(&delivery.body).unwrap();
            for line in message["lines"].as_array().into_iter().flatten() {
                let stamp = line.as_str().unwrap_or("");
                if let Some(t) = stamp
                    .strip_prefix("t=")
                    .and_then(|s| s.split(' ').next())
                    .and_then(|s| s.parse::<f64>().ok())
                {
                    delays.push((now.as_secs_f64() - t) * 1000.0);
                }
            }
        }
    }
    let status = mq.statuses(1, Duration::from_secs(120)).remove(0);
    assert_eq!(status["outcome"], "succeeded", "{status}");
    (cpu_seconds(orch.process.pid()) - before, delays)
}

fn main() {
    let (off_cpu, _) = run("livelogs-off", &[]);
    let (on_cpu, mut delays) = run("livelogs-on", &["--logs-key", LOGS_KEY]);
    delays.sort_by(f64::total_cmp);
    println!("live_logs.lines {LINES}");
    println!("live_logs.lines_delivered {}", delays.len());
    println!("live_logs.off.cpu_ms {:.0}", off_cpu * 1000.0);
    println!("live_logs.on.cpu_ms {:.0}", on_cpu * 1000.0);
    println!("live_logs.delay_p50_ms {:.1}", percentile(&delays, 0.5));
    println!("live_logs.delay_p99_ms {:.1}", percentile(&delays, 0.99));
}
