//! Labels and routing (issue 17, items 1–4), end to end with the real broker and real
//! `blacktree worker` processes (exec executor): a job that requires labels runs only on
//! a worker that has them all; jobs no worker can take wait without holding dispatch
//! threads or the prefetch window, across a broker restart; `--unroutable-after` ends
//! them `rejected`; `blacktree_jobs_waiting{labels}` counts them.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::build_env::{TempDir, WorkerProcess};
use common::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);

/// An exec worker with `labels` that appends each job's id to `runs` (a file of its
/// own), so that a job run twice shows twice.
fn worker(
    id: &str,
    orch: &Orchestrator,
    capacity: &str,
    labels: &[&str],
    runs: &str,
) -> WorkerProcess {
    let command = format!("echo \"$BLACKTREE_JOB_ID\" >> {runs}");
    let mut args = vec![
        "--executor",
        "exec",
        "--exec-command",
        command.as_str(),
        "--capacity",
        capacity,
    ];
    for label in labels {
        args.extend(["--label", label]);
    }
    WorkerProcess::start(id, orch.grpc_port, &args)
}

/// A job (no repository: the exec command alone runs) that requires `labels`.
fn publish(mq: &Mq, job_id: &str, labels: Value) {
    let mut extra = json!({ "repoUrl": "" });
    if !labels.is_null() {
        extra["labels"] = labels;
    }
    mq.publish_job(job_id, extra);
}

/// The jobIds in a runs file, with how often each ran.
fn runs(path: &str) -> HashMap<String, usize> {
    let mut runs = HashMap::new();
    for id in std::fs::read_to_string(path).unwrap_or_default().lines() {
        *runs.entry(id.to_string()).or_default() += 1;
    }
    runs
}

/// `blacktree_jobs_waiting{labels="…"}` on the orchestrator's `/metrics`.
fn waiting(orch: &Orchestrator, labels: &str) -> f64 {
    let metrics = http(orch.metrics_port, "/metrics").1;
    find_sample(
        &metrics,
        &format!("blacktree_jobs_waiting{{labels=\"{labels}\"}}"),
    )
    .unwrap_or(0.0)
}

fn by_id(statuses: &[Value]) -> HashMap<String, Value> {
    statuses
        .iter()
        .map(|s| (s["jobId"].as_str().unwrap().to_string(), s.clone()))
        .collect()
}

#[test]
fn jobs_no_worker_can_take_wait_apart_while_the_others_run_even_across_a_broker_restart() {
    no_head_of_line_blocking(false);
}

/// The same on quorum queues: the consumer consumes afresh there too, and the held
/// jobs' deliveries are acked on the channel after their consumer was cancelled.
#[test]
fn on_quorum_queues_too_jobs_no_worker_can_take_do_not_block_the_others() {
    no_head_of_line_blocking(true);
}

fn no_head_of_line_blocking(quorum: bool) {
    let broker = PrivateBroker::start();
    let names = Names::unique(if quorum {
        "labels-hol-qq"
    } else {
        "labels-hol"
    });
    let first_mq = if quorum {
        Mq::on_quorum(&broker, &names)
    } else {
        Mq::on(&broker, &names)
    };
    // Four dispatch threads and a prefetch of four: sixty jobs held anywhere in either
    // would block every job behind them.
    let queue_type = if quorum { "quorum" } else { "classic" };
    let flags = ["--dispatch-threads", "4", "--queue-type", queue_type];
    let orch = Orchestrator::start(&broker.url(), &names, &flags);
    let mq = &first_mq;
    let dir = TempDir::new("labels-runs");
    let amd_runs = format!("{}/amd", dir.0.display());
    let amd = worker("hol-amd", &orch, "2", &["arch=amd64"], &amd_runs);
    orch.wait_for_log("worker hol-amd registered", LONG);

    let arm: Vec<String> = (0..60).map(|i| format!("arm-{i}")).collect();
    for id in &arm {
        publish(mq, id, json!({ "arch": "arm64" }));
    }
    for i in 0..10 {
        publish(mq, &format!("plain-{i}"), Value::Null);
    }
    let first = mq.statuses(10, LONG);
    let first = by_id(&first);
    for i in 0..10 {
        let status = &first[&format!("plain-{i}")];
        assert_eq!(status["outcome"], "succeeded", "{status}");
        assert_eq!(status["workerId"], "hol-amd");
    }
    poll(LONG, "the 60 arm64 jobs to be counted as waiting", || {
        (waiting(&orch, "arch=arm64") == 60.0).then_some(())
    });
    assert!(
        runs(&amd_runs).keys().all(|id| id.starts_with("plain-")),
        "an arm64 job ran on the amd64 worker: {:?}",
        runs(&amd_runs)
    );

    // A broker restart drops the held jobs with their connection; the broker
    // redelivers them and they are held again, while new plain jobs still run.
    broker.ctl(&["stop_app"]);
    broker.ctl(&["start_app"]);
    broker.wait_accepting();
    poll(LONG, "the orchestrator to reconnect", || {
        orch.log().contains("(connection 2)").then_some(())
    });
    // The test's own connection died too (`first_mq` stays, and so do the queues).
    let mq = &if quorum {
        Mq::on_quorum(&broker, &names)
    } else {
        Mq::on(&broker, &names)
    };
    for i in 10..15 {
        publish(mq, &format!("plain-{i}"), Value::Null);
    }
    let after_restart = by_id(&mq.statuses(5, LONG));
    for i in 10..15 {
        assert_eq!(after_restart[&format!("plain-{i}")]["outcome"], "succeeded");
    }
    poll(
        LONG,
        "the 60 arm64 jobs to wait again after the restart",
        || (waiting(&orch, "arch=arm64") == 60.0).then_some(()),
    );

    // An arm64 worker registers: the sixty run there, each once.
    let arm_runs = format!("{}/arm", dir.0.display());
    let _arm_worker = worker(
        "hol-arm",
        &orch,
        "4",
        &["arch=arm64", "os=linux"],
        &arm_runs,
    );
    let statuses = by_id(&mq.statuses(60, LONG));
    for id in &arm {
        let status = &statuses[id];
        assert_eq!(status["outcome"], "succeeded", "{status}");
        assert_eq!(status["workerId"], "hol-arm", "{status}");
    }
    let ran = runs(&arm_runs);
    assert_eq!(ran.len(), 60, "{ran:?}");
    assert!(ran.values().all(|n| *n == 1), "a job ran twice: {ran:?}");
    assert!(runs(&amd_runs).values().all(|n| *n == 1));
    assert_eq!(runs(&amd_runs).len(), 15);
    mq.assert_no_more_statuses();
    assert_eq!(waiting(&orch, "arch=arm64"), 0.0);
    drop(amd);
}

#[test]
fn a_job_whose_labels_no_worker_has_ends_rejected_after_unroutable_after() {
    let Setup { mq, orch, .. } =
        Setup::with_flags("labels-unroutable", &["--unroutable-after", "2s"]);
    let mq = &mq;
    let dir = TempDir::new("labels-unroutable");
    let runs_file = format!("{}/runs", dir.0.display());
    let w = worker("unr-w", &orch, "1", &["arch=amd64"], &runs_file);
    orch.wait_for_log("worker unr-w registered", LONG);
    publish(mq, "gpu-1", json!({ "gpu": "a100" }));
    // The deployed control plane's dialect carries labels too.
    mq.publish_deployment("gpu-2", json!({ "labels": { "gpu": "a100" } }));
    // Labels the worker has: it runs (its region is a label too).
    publish(mq, "amd-1", json!({ "arch": "amd64" }));
    let statuses = by_id(&mq.statuses(3, LONG));
    for id in ["gpu-1", "gpu-2"] {
        let status = &statuses[id];
        assert_eq!(status["outcome"], "rejected", "{status}");
        let error = status["error"].as_str().unwrap();
        assert!(error.contains("gpu=a100"), "{error}");
        assert_eq!(status["workerId"], "");
    }
    assert_eq!(statuses["gpu-2"]["deploymentId"], "gpu-2");
    assert_eq!(statuses["amd-1"]["outcome"], "succeeded");
    assert_eq!(runs(&runs_file).keys().collect::<Vec<_>>(), ["amd-1"]);
    let metrics = http(orch.metrics_port, "/metrics").1;
    assert_eq!(sample(&metrics, "blacktree_jobs_unroutable_total"), 2.0);
    mq.assert_no_more_statuses();
    drop(w);
}

#[test]
fn workers_show_their_labels_and_bad_labels_are_refused() {
    let Setup { mq, orch, .. } = Setup::new("labels-show");
    let mq = &mq;
    let dir = TempDir::new("labels-show");
    let runs_file = format!("{}/runs", dir.0.display());
    let _w = WorkerProcess::start(
        "show-w",
        orch.grpc_port,
        &[
            "--executor",
            "exec",
            "--exec-command",
            &format!("echo \"$BLACKTREE_JOB_ID\" >> {runs_file}"),
            "--label",
            "arch=arm64",
            "--region",
            "eu-west-1",
        ],
    );
    orch.wait_for_log("worker show-w registered", LONG);
    let listed = workers_json(orch.metrics_port);
    let shown = listed.iter().find(|w| w["id"] == "show-w").expect("listed");
    assert_eq!(
        shown["labels"],
        json!({ "arch": "arm64", "region": "eu-west-1" })
    );
    let grpc = format!("127.0.0.1:{}", orch.grpc_port);
    let table = blacktree(&["workers", "--orchestrator", &grpc]);
    assert!(
        text(&table.stdout).contains("arch=arm64,region=eu-west-1"),
        "{}",
        text(&table.stdout)
    );
    // A region is a label: a job may require it.
    publish(mq, "eu-1", json!({ "region": "eu-west-1" }));
    // A job with malformed labels is rejected with a reason that does not quote them.
    publish(mq, "bad-1", json!({ "arch": 64 }));
    let statuses = by_id(&mq.statuses(2, LONG));
    assert_eq!(statuses["eu-1"]["outcome"], "succeeded");
    let bad = &statuses["bad-1"];
    assert_eq!(bad["outcome"], "rejected");
    assert!(
        bad["error"].as_str().unwrap().contains("`labels` must be"),
        "{bad}"
    );
    // A worker with a malformed label does not start.
    let out = blacktree(&["worker", "--label", "arch", "--orchestrator", &grpc]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("KEY=VALUE"),
        "{}",
        text(&out.stderr)
    );
    mq.assert_no_more_statuses();
}

#[test]
fn jobs_whose_last_worker_died_leave_the_dispatch_threads_for_the_others() {
    // Two dispatch threads and a prefetch of six: the arm64 jobs taken in while their
    // worker lived reach the threads, and must give them up once it is gone.
    let Setup { mq, orch, .. } = Setup::with_flags(
        "labels-lost",
        &["--dispatch-threads", "2", "--prefetch", "6"],
    );
    let mq = &mq;
    let dir = TempDir::new("labels-lost");
    let amd_runs = format!("{}/amd", dir.0.display());
    let _amd = worker("lost-amd", &orch, "2", &["arch=amd64"], &amd_runs);
    // The arm64 worker's jobs sleep: one runs, the others wait for its one slot.
    let arm_runs = format!("{}/arm", dir.0.display());
    let arm = worker(
        "lost-arm",
        &orch,
        "1",
        &["arch=arm64"],
        &format!("{arm_runs}; sleep 60"),
    );
    orch.wait_for_log("worker lost-amd registered", LONG);
    orch.wait_for_log("worker lost-arm registered", LONG);
    for i in 0..6 {
        publish(mq, &format!("arm-{i}"), json!({ "arch": "arm64" }));
    }
    poll(LONG, "an arm64 job to run", || {
        (!runs(&arm_runs).is_empty()).then_some(())
    });
    arm.signal("KILL");
    let lost = mq.statuses(1, LONG);
    assert_eq!(lost[0]["outcome"], "worker_lost", "{lost:?}");
    orch.wait_for_log("; held back", LONG);
    for i in 0..5 {
        publish(mq, &format!("plain-{i}"), Value::Null);
    }
    let plain = by_id(&mq.statuses(5, LONG));
    for i in 0..5 {
        assert_eq!(plain[&format!("plain-{i}")]["outcome"], "succeeded");
    }
    poll(LONG, "the 5 other arm64 jobs to wait", || {
        (waiting(&orch, "arch=arm64") == 5.0).then_some(())
    });
    let _again = worker("lost-arm2", &orch, "5", &["arch=arm64"], &arm_runs);
    let rest = by_id(&mq.statuses(5, LONG));
    assert!(
        rest.values()
            .all(|s| s["outcome"] == "succeeded" && s["workerId"] == "lost-arm2"),
        "{rest:?}"
    );
    mq.assert_no_more_statuses();
}

#[test]
fn a_small_pool_with_a_long_queue_leaves_the_dispatch_threads_to_the_other_jobs() {
    // Four dispatch threads; one arm64 slot whose jobs take 2 s each, and ten of them
    // queued: without a bound, three would wait in threads for that slot, the fourth
    // thread would run the arm64 job, and nothing else would move for 20 s.
    let Setup { mq, orch, .. } = Setup::with_flags("labels-pool", &["--dispatch-threads", "4"]);
    let mq = &mq;
    let dir = TempDir::new("labels-pool");
    let arm_runs = format!("{}/arm", dir.0.display());
    let amd_runs = format!("{}/amd", dir.0.display());
    let _arm = worker(
        "pool-arm",
        &orch,
        "1",
        &["arch=arm64"],
        &format!("{arm_runs}; sleep 2"),
    );
    let _amd = worker("pool-amd", &orch, "2", &["arch=amd64"], &amd_runs);
    orch.wait_for_log("worker pool-arm registered", LONG);
    orch.wait_for_log("worker pool-amd registered", LONG);
    for i in 0..10 {
        publish(mq, &format!("arm-{i}"), json!({ "arch": "arm64" }));
    }
    for i in 0..10 {
        publish(mq, &format!("plain-{i}"), Value::Null);
    }
    let mut seen = Vec::new();
    let statuses = mq.statuses_until(LONG, |s| {
        seen = s
            .iter()
            .map(|s| s["jobId"].as_str().unwrap().to_string())
            .collect();
        seen.iter().filter(|id| id.starts_with("plain-")).count() == 10
    });
    let arm_done = seen.iter().filter(|id| id.starts_with("arm-")).count();
    assert!(
        arm_done <= 3,
        "the plain jobs waited behind the arm64 queue: {seen:?}"
    );
    let rest = mq.statuses(10 - arm_done, LONG);
    let all: Vec<&Value> = statuses.iter().chain(&rest).collect();
    assert_eq!(all.len(), 20);
    assert!(all.iter().all(|s| s["outcome"] == "succeeded"), "{all:?}");
    assert!(runs(&arm_runs).values().all(|n| *n == 1));
    assert_eq!(runs(&arm_runs).len(), 10);
    mq.assert_no_more_statuses();
}
