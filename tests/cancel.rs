//! Cancellation, deadlines and lifecycle events end to end: the real orchestrator, the
//! real broker, the real worker agent (and an older-style worker without CancelJob).

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::build_env::*;
use common::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

fn the_status<'a>(statuses: &'a [Value], job_id: &str) -> &'a Value {
    statuses
        .iter()
        .find(|s| s["jobId"] == job_id)
        .unwrap_or_else(|| panic!("no status for {job_id} in {statuses:?}"))
}

/// The command line of a job's sleep, as `ps` would show it.
fn sleeping(seconds: u32) -> String {
    format!("sleep {seconds}")
}

#[test]
fn a_cancel_that_arrives_before_its_job_means_the_job_never_runs() {
    let Setup { mq, orch, .. } = Setup::new("early");
    let w = orch.worker("early-w", Behaviour::default());
    mq.publish_cancel("early-1");
    orch.wait_for_log("job early-1: cancel requested before it arrived", LONG);
    mq.publish_job("early-1", json!({}));
    mq.publish_job("early-2", json!({}));
    let statuses = mq.statuses(2, LONG);
    let early = the_status(&statuses, "early-1");
    assert_eq!(early["outcome"], "cancelled");
    assert_eq!(early["workerId"], "");
    assert_eq!(early["startedAt"], Value::Null);
    assert_eq!(the_status(&statuses, "early-2")["outcome"], "succeeded");
    assert_eq!(
        *w.observed.jobs.lock().unwrap(),
        vec!["early-2".to_string()]
    );
}

#[test]
fn an_acked_early_cancel_survives_graceful_and_hard_orchestrator_restarts() {
    let (
        Setup {
            names,
            mq,
            mut orch,
        },
        state,
    ) = Setup::remembering("early-restart", &[]);
    let cancelled = ["early-r-term", "early-r-kill"];
    for (signal, job) in ["TERM", "KILL"].into_iter().zip(cancelled) {
        mq.publish_cancel(job);
        orch.wait_for_log(
            &format!("job {job}: cancel requested before it arrived"),
            LONG,
        );
        // Acked: the broker will never deliver it again; only the state file has it.
        mq.wait_all_acked(&names.cancel);
        orch.signal(signal);
        orch.wait_exit(LONG);
        orch = orch.restart();
    }
    assert!(orch.log().contains("2 early cancels"), "{}", orch.log());
    let w = orch.worker("early-r-w", Behaviour::default());
    for job in cancelled.iter().chain(&["early-r-other"]) {
        mq.publish_job(job, json!({}));
    }
    let statuses = mq.statuses(3, LONG);
    for job in cancelled {
        let status = the_status(&statuses, job);
        assert_eq!(status["outcome"], "cancelled", "{status}");
        assert_eq!(status["startedAt"], Value::Null, "{status}");
    }
    assert_eq!(
        the_status(&statuses, "early-r-other")["outcome"],
        "succeeded"
    );
    assert_eq!(
        *w.observed.jobs.lock().unwrap(),
        vec!["early-r-other".to_string()]
    );
    mq.assert_no_more_statuses();
    poll(LONG, "the used cancels forgotten by the state file", || {
        let json: Value = serde_json::from_slice(&std::fs::read(&state).ok()?).ok()?;
        json.get("cancels").is_none().then_some(())
    });
}

#[test]
fn a_job_cancelled_while_it_waits_for_a_worker_is_dropped() {
    let Setup { mq, orch, .. } = Setup::new("queued");
    let hold = Behaviour {
        run_time: Duration::from_secs(3),
        ..Behaviour::default()
    };
    let w = orch.worker("queued-w", hold);
    mq.publish_job("queued-1", json!({}));
    poll(LONG, "the first job to run", || {
        (w.observed.job_count() == 1).then_some(())
    });
    mq.publish_job("queued-2", json!({}));
    orch.wait_for_log("job queued-2: received", LONG);
    let cancelled_at = Instant::now();
    mq.publish_cancel("queued-2");
    let statuses = mq.statuses(1, LONG);
    assert_eq!(the_status(&statuses, "queued-2")["outcome"], "cancelled");
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(2),
        "not after the first job ended"
    );
    let statuses = mq.statuses(1, LONG);
    assert_eq!(the_status(&statuses, "queued-1")["outcome"], "succeeded");
    assert_eq!(
        w.observed.job_count(),
        1,
        "the cancelled job never reached the worker"
    );
}

#[test]
fn a_running_job_is_stopped_on_its_worker_and_the_worker_takes_the_next_job() {
    let Setup { mq, orch, .. } = Setup::new("running");
    let worker = WorkerProcess::sleeper("running-w", orch.grpc_port);
    orch.wait_for_log("worker running-w registered", LONG);
    let seconds = 30_000 + std::process::id() % 10_000;
    mq.publish_job(
        "running-1",
        json!({"repoUrl": "", "imageName": format!("s{seconds}")}),
    );
    poll(LONG, "the job's sleep to start", || {
        worker.runs(&sleeping(seconds)).then_some(())
    });
    let cancelled_at = Instant::now();
    mq.publish_cancel("running-1");
    let statuses = mq.statuses(1, LONG);
    let status = the_status(&statuses, "running-1");
    assert_eq!(status["outcome"], "cancelled", "{status}");
    assert_eq!(status["workerId"], "running-w");
    assert!(status["startedAt"].is_string() && status["durationMs"].as_u64().is_some());
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(5),
        "took {:?}",
        cancelled_at.elapsed()
    );
    poll(Duration::from_secs(10), "the sleep to be killed", || {
        (!worker.runs(&sleeping(seconds))).then_some(())
    });
    assert!(
        worker.log().contains("job running-1: cancel requested"),
        "{}",
        worker.log()
    );
    mq.publish_job("running-2", json!({"repoUrl": "", "imageName": "s0"}));
    let statuses = mq.statuses(1, LONG);
    assert_eq!(
        the_status(&statuses, "running-2")["outcome"],
        "succeeded",
        "the slot is free again"
    );
}

#[test]
fn a_cancel_after_completion_is_harmless() {
    let Setup { names, mq, orch } = Setup::new("late");
    let _w = orch.worker("late-w", Behaviour::default());
    mq.publish_job("late-1", json!({}));
    assert_eq!(mq.statuses(1, LONG)[0]["outcome"], "succeeded");
    mq.publish_cancel("late-1");
    // Usually "after it finished"; when the cancel overtakes the status's confirm, the
    // job is still pending here, and stopping a finished job does nothing either.
    orch.wait_for_log("job late-1: cancel requested", LONG);
    mq.publish_cancel("never-seen");
    orch.wait_for_log("job never-seen: cancel requested before it arrived", LONG);
    mq.wait_all_acked(&names.cancel);
    mq.assert_no_more_statuses();
}

#[test]
fn a_deadline_stops_the_job_on_its_worker_and_reports_timed_out() {
    let Setup { mq, orch, .. } = Setup::new("timeout");
    let worker = WorkerProcess::sleeper("timeout-w", orch.grpc_port);
    orch.wait_for_log("worker timeout-w registered", LONG);
    let seconds = 20_000 + std::process::id() % 10_000;
    mq.publish_job(
        "timeout-1",
        json!({"repoUrl": "", "imageName": format!("s{seconds}"), "timeoutSeconds": 2}),
    );
    let statuses = mq.statuses(1, LONG);
    let status = the_status(&statuses, "timeout-1");
    assert_eq!(status["outcome"], "timed_out", "{status}");
    let took = status["durationMs"].as_u64().unwrap();
    assert!((1900..10_000).contains(&took), "duration {took} ms");
    poll(Duration::from_secs(10), "the sleep to be killed", || {
        (!worker.runs(&sleeping(seconds))).then_some(())
    });
}

#[test]
fn an_older_worker_without_cancel_job_has_its_slot_withheld_until_it_reports_free() {
    let Setup { mq, orch, .. } = Setup::new("oldworker");
    let old = orch.worker(
        "old-w",
        Behaviour {
            run_time: Duration::from_secs(3),
            ..Behaviour::default()
        },
    );
    mq.publish_job("old-1", json!({}));
    poll(LONG, "the job to start", || {
        (old.observed.job_count() == 1).then_some(())
    });
    mq.publish_cancel("old-1");
    let statuses = mq.statuses(1, LONG);
    assert_eq!(the_status(&statuses, "old-1")["outcome"], "cancelled");
    mq.publish_job("old-2", json!({}));
    let statuses = mq.statuses(1, LONG);
    assert_eq!(the_status(&statuses, "old-2")["outcome"], "succeeded");
    assert_eq!(
        old.observed.max_in_flight.load(Ordering::SeqCst),
        1,
        "never two at once"
    );
    assert_eq!(
        old.observed.refused.load(Ordering::SeqCst),
        0,
        "old-2 waited for FREE"
    );
    orch.wait_for_log("has no CancelJob", LONG);
    assert_eq!(*old.observed.cancels.lock().unwrap(), ["old-1"]);
}

#[test]
fn a_worker_with_cancel_job_gets_its_slot_back_as_soon_as_it_confirms_the_cancel() {
    // No health round after the first for an hour: a withheld slot would not come back.
    let Setup { mq, orch, .. } = Setup::with_flags("newworker", &["--health-interval", "1h"]);
    let worker = orch.worker(
        "new-w",
        Behaviour {
            run_time: Duration::from_secs(600),
            cancel_job: true,
            ..Behaviour::default()
        },
    );
    mq.publish_job("new-1", json!({}));
    poll(LONG, "the job to start", || {
        (worker.observed.job_count() == 1).then_some(())
    });
    mq.publish_cancel("new-1");
    let statuses = mq.statuses(1, LONG);
    assert_eq!(the_status(&statuses, "new-1")["outcome"], "cancelled");
    assert_eq!(*worker.observed.cancels.lock().unwrap(), ["new-1"]);
    worker.behaviour.lock().unwrap().run_time = Duration::from_millis(10);
    mq.publish_job("new-2", json!({}));
    let statuses = mq.statuses(1, LONG);
    assert_eq!(the_status(&statuses, "new-2")["outcome"], "succeeded");
    assert_eq!(worker.observed.max_in_flight.load(Ordering::SeqCst), 1);
    assert!(!orch.log().contains("has no CancelJob"), "{}", orch.log());
}

#[test]
fn every_job_gets_exactly_one_status_whatever_races_between_cancel_completion_and_deadline() {
    let Setup { mq, orch, .. } = Setup::new("race");
    let workers: Vec<TestWorker> = (0..3)
        .map(|i| {
            let behaviour = Behaviour {
                run_time: Duration::from_millis([5, 40, 1500][i]),
                capacity: 2,
                ..Behaviour::default()
            };
            let w = orch.worker(&format!("race-w{i}"), behaviour);
            w
        })
        .collect();
    let n = 90;
    let ids: Vec<String> = (0..n).map(|i| format!("race-{i}")).collect();
    let mut cancelled_first = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let extra = if i % 4 == 0 {
            json!({"timeoutSeconds": 1})
        } else {
            json!({})
        };
        match i % 5 {
            0 => {
                mq.publish_cancel(id);
                cancelled_first.push(id.clone());
            }
            1 => {
                mq.publish_job(id, extra);
                mq.publish_cancel(id);
                continue;
            }
            _ => {}
        }
        mq.publish_job(id, extra);
        if i % 5 == 2 {
            std::thread::sleep(Duration::from_millis(i as u64 % 30));
            mq.publish_cancel(id);
        }
    }
    let statuses = mq.statuses(n, LONG);
    // Once every job is acked, a second status for any job would be in the queue.
    mq.assert_no_more_statuses();
    let counts = count_by_job(&statuses);
    assert_eq!(counts.len(), n);
    assert!(counts.values().all(|&c| c == 1), "{counts:?}");
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for s in &statuses {
        *outcomes
            .entry(s["outcome"].as_str().unwrap().to_string())
            .or_default() += 1;
        assert!(
            ["succeeded", "cancelled", "timed_out"].contains(&s["outcome"].as_str().unwrap()),
            "{s}"
        );
    }
    let early_cancelled = cancelled_first
        .iter()
        .filter(|id| the_status(&statuses, id)["outcome"] == "cancelled")
        .count();
    assert!(early_cancelled > 0, "cancels sent first do cancel");
    // Outcomes match what the workers saw: no job ran twice, a job without `startedAt`
    // never reached a worker, and a job that succeeded did. (A call cancelled as it
    // starts may have a `startedAt` without reaching its worker.)
    let mut runs: HashMap<String, usize> = HashMap::new();
    for w in &workers {
        for job in w.observed.jobs.lock().unwrap().iter() {
            *runs.entry(job.clone()).or_default() += 1;
        }
    }
    for s in &statuses {
        let id = s["jobId"].as_str().unwrap();
        let reached = runs.get(id).copied().unwrap_or(0);
        assert!(reached <= 1, "{id} ran {reached} times: {s}");
        if s["startedAt"].is_null() {
            assert_eq!(reached, 0, "{id} has no startedAt but ran: {s}");
            assert_eq!(s["outcome"], "cancelled", "{s}");
        }
        if s["outcome"] == "succeeded" {
            assert_eq!(reached, 1, "{id} succeeded without reaching a worker: {s}");
        }
    }
    let ran: usize = runs.values().sum();
    println!(
        "races: {n} jobs, outcomes {outcomes:?}, {ran} reached a worker, {} of {} cancelled first",
        early_cancelled,
        cancelled_first.len()
    );
}

#[test]
fn lifecycle_events_arrive_in_order_and_statuses_carry_timings() {
    let flags = ["--events-key", "api.event", "--instance-id", "orch-events"];
    let Setup { mq, orch, .. } = Setup::with_flags("events", &flags);
    let _w = orch.worker("events-w", Behaviour::default());
    let ids: Vec<String> = (0..5).map(|i| format!("events-{i}")).collect();
    for id in &ids {
        mq.publish_job(id, json!({}));
    }
    let statuses = mq.statuses(ids.len(), LONG);
    let events = mq.events_until(LONG, |e| e.len() >= 3 * ids.len());
    for id in &ids {
        let mine: Vec<&str> = events
            .iter()
            .filter(|e| e["jobId"] == id.as_str())
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(
            mine,
            ["received", "dispatched", "finished"],
            "{id}: {events:?}"
        );
        let dispatched = events
            .iter()
            .find(|e| e["jobId"] == id.as_str() && e["event"] == "dispatched")
            .unwrap();
        assert_eq!(dispatched["workerId"], "events-w");
        assert!(dispatched["at"].as_str().unwrap().ends_with('Z'));
        assert!(
            events
                .iter()
                .filter(|e| e["jobId"] == id.as_str())
                .all(|e| e["orchestratorId"] == "orch-events"),
            "every event names its orchestrator: {events:?}"
        );
        let status = the_status(&statuses, id);
        assert_eq!(status["orchestratorId"], "orch-events", "{status}");
        assert!(status["startedAt"].as_str().unwrap() <= status["finishedAt"].as_str().unwrap());
        assert!(status["durationMs"].as_u64().unwrap() >= 10, "{status}");
    }
}
