//! Live build logs (issue 17, items 6 and 7), end to end: a real `blacktree worker`
//! streams a build's output while it runs, the orchestrator publishes it on
//! `--logs-key` in gap-free numbered batches (secrets redacted, non-persistent), and
//! `blacktree watch --logs JOBID` prints it live and ends with the status; a build
//! printing 50 MB at full speed grows neither process's memory past a bound, and other
//! jobs' statuses keep flowing meanwhile.

mod common;

use std::time::{Duration, Instant};

use amiquip::{FieldTable, QueueDeclareOptions, QueueDeleteOptions};
use common::build_env::{TempDir, WorkerProcess};
use common::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);
const LOGS_KEY: &str = "api.logs";

/// A queue of the test's own bound to the logs key; deleted when dropped.
struct LogsQueue<'a> {
    mq: &'a Mq,
    name: String,
}

impl<'a> LogsQueue<'a> {
    fn bind(mq: &'a Mq, names: &Names) -> LogsQueue<'a> {
        let name = format!("{}.logs", names.status);
        let channel = mq.channel();
        channel
            .queue_declare(name.as_str(), QueueDeclareOptions::default())
            .unwrap();
        channel
            .queue_bind(
                name.as_str(),
                names.exchange.as_str(),
                LOGS_KEY,
                FieldTable::new(),
            )
            .unwrap();
        LogsQueue { mq, name }
    }

    /// The next message, if one waits: its body and whether it is persistent.
    fn next(&self) -> Option<(Value, bool)> {
        let get = self
            .mq
            .channel()
            .basic_get(self.name.as_str(), true)
            .unwrap()?;
        let persistent = get.delivery.properties.delivery_mode() == &Some(2);
        Some((
            serde_json::from_slice(&get.delivery.body).unwrap(),
            persistent,
        ))
    }
}

impl Drop for LogsQueue<'_> {
    fn drop(&mut self) {
        let _ = self
            .mq
            .channel()
            .queue_delete(self.name.as_str(), QueueDeleteOptions::default());
    }
}

#[test]
fn a_builds_output_is_published_while_it_runs_and_watch_logs_prints_it() {
    let Setup { mq, orch, names } = Setup::with_flags("logs-live", &["--logs-key", LOGS_KEY]);
    let logs = LogsQueue::bind(&mq, &names);
    // Three lines a second apart, then one with the job's token in it.
    let script = "for i in 1 2 3; do echo line-$i; sleep 1; done; \
                   echo \"token $BLACKTREE_GITHUB_TOKEN\"";
    let _w = WorkerProcess::start(
        "logs-w",
        orch.grpc_port,
        &["--executor", "exec", "--exec-command", script],
    );
    orch.wait_for_log("worker logs-w registered", LONG);
    let dir = TempDir::new("logs-watch");
    let (out_path, err_path) = (dir.0.join("out"), dir.0.join("err"));
    let mut watch = command()
        .args([
            "watch",
            "--amqp-url",
            SHARED_BROKER,
            "--exchange",
            &names.exchange,
        ])
        .args([
            "--logs-key",
            LOGS_KEY,
            "--logs",
            "live-1",
            "--timeout",
            "60s",
        ])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
    poll(LONG, "watch --logs to listen", || {
        read(&err_path)
            .contains("for the output of job")
            .then_some(())
    });
    mq.publish_deployment("live-1", json!({ "repository": "", "token": TOKEN }));

    // The first line is published while the job still runs (its status is 3 s away).
    let mut messages = Vec::new();
    let first = poll(LONG, "the first line to be published", || {
        let next = logs.next();
        if let Some(message) = &next {
            messages.push(message.clone());
        }
        messages
            .iter()
            .any(|(m, _)| m["lines"].to_string().contains("line-1"))
            .then_some(Instant::now())
    });
    assert_eq!(mq.depth(&names.status), 0, "line-1 came before the status");
    let status = mq.statuses(1, LONG).remove(0);
    assert_eq!(status["outcome"], "succeeded", "{status}");
    assert!(
        first.elapsed() >= Duration::from_millis(1500),
        "it came live, not at the end"
    );
    while let Some(message) = logs.next() {
        messages.push(message);
    }
    let mut lines = Vec::new();
    for (seq, (message, persistent)) in messages.iter().enumerate() {
        assert_eq!(message["seq"], seq as u64, "gap-free from 0: {messages:?}");
        assert_eq!(message["jobId"], "live-1");
        assert_eq!(message["deploymentId"], "live-1");
        assert!(!persistent, "logs are a view: not persistent");
        lines.extend(
            message["lines"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_str().unwrap().to_string()),
        );
    }
    assert_eq!(
        lines,
        ["$ exec command", "line-1", "line-2", "line-3", "token ***"],
        "{messages:?}"
    );
    let exit = poll(LONG, "watch to end", || watch.try_wait().unwrap());
    let (printed, errors) = (read(&out_path), read(&err_path));
    assert!(exit.success(), "{errors}");
    let at = |needle: &str| {
        printed
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} in {printed}"))
    };
    assert!(
        at("line-1") < at("line-2")
            && at("line-2") < at("line-3")
            && at("line-3") < at("token ***")
    );
    assert!(printed.contains("live-1 succeeded"), "{printed}");
    assert!(!printed.contains(TOKEN) && !errors.contains(TOKEN));
    orch.assert_no_secret_logged();
    mq.assert_no_more_statuses();
}

#[test]
fn a_flood_of_output_keeps_memory_bounded_and_other_statuses_flowing() {
    let Setup { mq, orch, names } = Setup::with_flags("logs-flood", &["--logs-key", LOGS_KEY]);
    let logs = LogsQueue::bind(&mq, &names);
    // 50 MB of 100-byte lines at full speed on one worker; short jobs on another.
    let flood = "head -c 50000000 /dev/zero | tr '\\0' x | fold -w 99";
    let flooding = WorkerProcess::start(
        "flood-w",
        orch.grpc_port,
        &[
            "--executor",
            "exec",
            "--exec-command",
            flood,
            "--label",
            "role=flood",
        ],
    );
    let _quick = WorkerProcess::start(
        "quick-w",
        orch.grpc_port,
        &[
            "--executor",
            "exec",
            "--exec-command",
            "echo quick",
            "--label",
            "role=quick",
        ],
    );
    orch.wait_for_log("worker flood-w registered", LONG);
    orch.wait_for_log("worker quick-w registered", LONG);
    mq.publish_job(
        "flood-1",
        json!({ "repoUrl": "", "labels": { "role": "flood" } }),
    );
    poll(LONG, "the flood to be published", || {
        (mq.depth(&logs.name) > 0).then_some(())
    });
    for i in 0..20 {
        mq.publish_job(
            &format!("quick-{i}"),
            json!({ "repoUrl": "", "labels": { "role": "quick" } }),
        );
    }
    // The quick jobs finish while the flood still runs.
    let statuses = mq.statuses(20, LONG);
    assert!(
        statuses
            .iter()
            .all(|s| s["jobId"].as_str().unwrap().starts_with("quick-")),
        "{statuses:?}"
    );
    let flood_status = mq.statuses(1, LONG).remove(0);
    assert_eq!(flood_status["outcome"], "succeeded", "{flood_status}");
    // Peak memory (VmHWM) of both processes, against a fixed bound far below the output.
    let bound_kib = 120 * 1024;
    let worker_peak = proc_status(flooding.pid(), "VmHWM");
    let orch_peak = proc_status(orch.process.pid(), "VmHWM");
    assert!(worker_peak < bound_kib, "worker peak RSS {worker_peak} KiB");
    assert!(
        orch_peak < bound_kib,
        "orchestrator peak RSS {orch_peak} KiB"
    );
    // Every line is accounted for: published, or dropped and said so, in messages
    // numbered without a gap. "$ exec command", 505,050 lines of 99 x and one of 50.
    // The status sits in another queue: read on until the logs queue has all of them
    // (once, the status was read while the last ~20 messages were not in it yet).
    let expected = 1 + 505_051;
    let (mut lines, mut dropped, mut seq) = (0, 0, 0);
    let deadline = Instant::now() + LONG;
    while lines + dropped < expected && Instant::now() < deadline {
        let Some((message, _)) = logs.next() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        if message["jobId"] != "flood-1" {
            continue;
        }
        assert_eq!(message["seq"], seq);
        seq += 1;
        lines += message["lines"].as_array().unwrap().len() as u64;
        dropped += message["dropped"].as_u64().unwrap_or(0);
    }
    assert_eq!(
        lines + dropped,
        expected,
        "{lines} lines, {dropped} dropped"
    );
    let metrics = http(orch.metrics_port, "/metrics").1;
    let published = sample(&metrics, "blacktree_log_messages_published_total");
    assert!(published >= 1.0, "{metrics}");
    eprintln!(
        "flood: worker peak {worker_peak} KiB, orchestrator peak {orch_peak} KiB, {published} messages, {} lines dropped",
        sample(&metrics, "blacktree_log_lines_dropped_total")
    );
    mq.assert_no_more_statuses();
}
