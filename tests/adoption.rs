//! Builds survive the orchestrator (issue 14): a build keeps running on its worker when
//! the orchestrator that started it goes away, and the next orchestrator adopts it (the
//! running build, or its held answer) instead of running it again. The real broker, the
//! real orchestrator, real `blacktree worker` processes with the exec executor whose
//! command records every run of a jobId and waits for the test to let it finish.

mod common;

use std::time::Duration;

use blacktree::proto::job::{JobRequest, PingRequest, WorkerStatus};
use common::build_env::{WorkerProcess, NO_ORCHESTRATOR};
use common::gated::Builds;
use common::*;
use grpcio::CallOption;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(90);

/// The value of counter `name` on the orchestrator's /metrics.
fn counter(orch: &Orchestrator, name: &str) -> f64 {
    sample(&http(orch.metrics_port, "/metrics").1, name)
}

/// Waits until counter `name` reaches `value`.
fn wait_counter(orch: &Orchestrator, name: &str, value: f64) {
    poll(LONG, &format!("{name} to reach {value}"), || {
        (counter(orch, name) >= value).then_some(())
    });
}

fn publish_build(mq: &Mq, job_id: &str) {
    mq.publish_job(job_id, json!({"repoUrl": "", "imageName": "unused"}));
}

/// Asserts one status per job, all succeeded, and nothing more to come.
fn assert_all_succeeded_once(mq: &Mq, jobs: &[String]) -> Vec<Value> {
    let statuses = mq.statuses(jobs.len(), LONG);
    let counts = count_by_job(&statuses);
    for job in jobs {
        assert_eq!(counts.get(job), Some(&1), "{job}: {statuses:?}");
    }
    for status in &statuses {
        assert_eq!(status["success"], true, "{status}");
    }
    mq.assert_no_more_statuses();
    statuses
}

#[test]
fn builds_running_when_the_orchestrator_is_killed_run_once_and_are_adopted_after_a_restart() {
    let (Setup { mq, mut orch, .. }, _) = Setup::remembering("adopt-kill", &[]);
    let builds = Builds::start();
    let workers = ["adopt-kill-a", "adopt-kill-b"];
    let _running: Vec<WorkerProcess> = workers
        .iter()
        .map(|id| builds.worker(id, orch.grpc_port, 2, &[]))
        .collect();
    for id in workers {
        orch.wait_for_log(&format!("worker {id} registered"), LONG);
    }
    let jobs: Vec<String> = (0..6).map(|i| format!("adopt-kill-{i}")).collect();
    for job in &jobs {
        publish_build(&mq, job);
    }
    poll(LONG, "four builds to run (every slot)", || {
        (builds.started() == 4).then_some(())
    });
    orch.signal("KILL");
    orch.wait_exit(LONG);

    orch = orch.restart();
    // New jobs, first deliveries, must wait for slots the adopted builds hold.
    let fresh: Vec<String> = (0..2).map(|i| format!("adopt-kill-new-{i}")).collect();
    for job in &fresh {
        publish_build(&mq, job);
    }
    wait_counter(&orch, "blacktree_jobs_adopted_total", 4.0);
    for job in jobs.iter().chain(&fresh) {
        builds.open(job);
    }
    let all: Vec<String> = jobs.iter().chain(&fresh).cloned().collect();
    assert_all_succeeded_once(&mq, &all);
    for job in &all {
        assert_eq!(builds.runs(job), 1, "{job} ran more than once (or never)");
    }
    for id in workers {
        assert!(
            builds.peak_load(id) <= 2,
            "{id} ran more builds than its capacity"
        );
    }
    let log = orch.log();
    assert!(
        !log.contains("is full"),
        "the new orchestrator sent a job to a worker whose slots adopted builds held:\n{log}"
    );
    assert_eq!(counter(&orch, "blacktree_jobs_adopted_total"), 4.0);
}

#[test]
fn after_a_short_drain_builds_are_handed_over_even_before_the_workers_check_in() {
    // The new orchestrator has a state file of its own (it knows no worker): it gets the
    // redeliveries at once, and the worker (checking in every 3 s) registers again with
    // what it runs a while later. The jobs wait for that (--adopt-wait) rather than run
    // again.
    // Both listen on one port: the worker finds the second where it found the first.
    let listen = format!("127.0.0.1:{}", free_port());
    let flags = [
        "--drain-timeout",
        "1s",
        "--adopt-wait",
        "20s",
        "--grpc-listen",
        listen.as_str(),
    ];
    let Setup { mq, mut orch, .. } = Setup::with_flags("adopt-term", &flags);
    let builds = Builds::start();
    let _worker = builds.worker(
        "adopt-term-w",
        orch.grpc_port,
        2,
        &["--check-in-interval", "3s"],
    );
    orch.wait_for_log("worker adopt-term-w registered", LONG);
    let jobs: Vec<String> = (0..2).map(|i| format!("adopt-term-{i}")).collect();
    for job in &jobs {
        publish_build(&mq, job);
    }
    poll(LONG, "both builds to run", || {
        (builds.started() == 2).then_some(())
    });
    orch.signal("TERM");
    assert_eq!(orch.wait_exit(LONG), Some(0));
    assert!(
        orch.log().contains("handing over 2 running jobs"),
        "{}",
        orch.log()
    );

    orch = orch.restart();
    wait_counter(&orch, "blacktree_jobs_adopted_total", 2.0);
    for job in &jobs {
        builds.open(job);
    }
    assert_all_succeeded_once(&mq, &jobs);
    for job in &jobs {
        assert_eq!(builds.runs(job), 1, "{job}");
    }
    assert_eq!(counter(&orch, "blacktree_jobs_redispatched_total"), 0.0);
}

#[test]
fn a_build_that_finished_while_no_orchestrator_ran_has_its_held_answer_published() {
    let (Setup { mq, mut orch, .. }, _) = Setup::remembering("adopt-held", &[]);
    let builds = Builds::start();
    let worker = builds.worker("adopt-held-w", orch.grpc_port, 1, &[]);
    orch.wait_for_log("worker adopt-held-w registered", LONG);
    publish_build(&mq, "adopt-held-1");
    poll(LONG, "the build to run", || {
        (builds.started() == 1).then_some(())
    });
    orch.signal("KILL");
    orch.wait_exit(LONG);
    worker.wait_for_log(
        "job adopt-held-1: the caller went away; the job keeps running",
        LONG,
    );
    builds.open("adopt-held-1");
    worker.wait_for_log("job adopt-held-1: succeeded", LONG);

    let _restarted = orch.restart();
    let statuses = assert_all_succeeded_once(&mq, &["adopt-held-1".to_string()]);
    assert!(
        statuses[0]["logs"]
            .as_str()
            .unwrap()
            .contains("built adopt-held-1"),
        "{}",
        statuses[0]
    );
    assert_eq!(builds.runs("adopt-held-1"), 1);
    worker.wait_for_log("job adopt-held-1: a call came for its held answer", LONG);
}

#[test]
fn a_build_whose_worker_is_frozen_when_the_orchestrator_restarts_is_waited_for_not_run_again() {
    let flags = ["--adopt-wait", "1s", "--lost-after", "60s"];
    let (Setup { mq, mut orch, .. }, _) = Setup::remembering("adopt-frozen", &flags);
    let builds = Builds::start();
    let frozen = builds.worker("adopt-frozen-w", orch.grpc_port, 1, &[]);
    orch.wait_for_log("worker adopt-frozen-w registered", LONG);
    publish_build(&mq, "adopt-frozen-1");
    poll(LONG, "the build to run", || {
        (builds.started() == 1).then_some(())
    });
    // A free worker the redelivered job could go to if it did not wait.
    let _spare = builds.worker("adopt-frozen-spare", orch.grpc_port, 1, &[]);
    orch.wait_for_log("worker adopt-frozen-spare registered", LONG);
    orch.signal("KILL");
    orch.wait_exit(LONG);
    // Frozen (a GC pause, a saturated host) before the new orchestrator hears from it:
    // it cannot report its build, yet it is not dead.
    frozen.signal("STOP");

    orch = orch.restart();
    orch.wait_for_log(
        "job adopt-frozen-1: redelivered and not reported yet; worker adopt-frozen-w has not \
         answered",
        LONG,
    );
    frozen.signal("CONT");
    wait_counter(&orch, "blacktree_jobs_adopted_total", 1.0);
    builds.open("adopt-frozen-1");
    assert_all_succeeded_once(&mq, &["adopt-frozen-1".to_string()]);
    assert_eq!(builds.runs("adopt-frozen-1"), 1, "the build ran again");
    assert_eq!(counter(&orch, "blacktree_jobs_redispatched_total"), 0.0);
}

#[test]
fn an_adopted_build_can_be_cancelled_and_a_build_lost_with_its_worker_runs_again_once() {
    let (Setup { mq, mut orch, .. }, _) =
        Setup::remembering("adopt-cancel", &["--adopt-wait", "2s"]);
    let builds = Builds::start();
    let keeper = builds.worker("adopt-cancel-keeper", orch.grpc_port, 1, &[]);
    let mut doomed = builds.worker("adopt-cancel-doomed", orch.grpc_port, 1, &[]);
    for id in ["adopt-cancel-keeper", "adopt-cancel-doomed"] {
        orch.wait_for_log(&format!("worker {id} registered"), LONG);
    }
    let jobs = ["adopt-cancel-1", "adopt-cancel-2"];
    for job in jobs {
        publish_build(&mq, job);
    }
    poll(LONG, "both builds to run", || {
        (builds.started() == 2).then_some(())
    });
    orch.signal("KILL");
    orch.wait_exit(LONG);
    // Which worker runs which job: from their logs.
    let on_doomed = poll(LONG, "each worker to have started its job", || {
        jobs.iter()
            .find(|job| doomed.log().contains(&format!("job {job}: started")))
            .copied()
    });
    let on_keeper = jobs.into_iter().find(|job| *job != on_doomed).unwrap();
    keeper.wait_for_log(&format!("job {on_keeper}: started"), LONG);
    // The doomed worker dies with its build; it comes back empty, under the same id.
    doomed.signal("KILL");
    doomed.wait_exit(LONG);

    orch = orch.restart();
    let _reborn = builds.worker("adopt-cancel-doomed", orch.grpc_port, 1, &[]);
    wait_counter(&orch, "blacktree_jobs_adopted_total", 1.0);
    mq.publish_cancel(on_keeper);
    builds.open(on_doomed);
    let statuses = mq.statuses(2, LONG);
    let status = |job: &str| {
        statuses
            .iter()
            .find(|s| s["jobId"] == job)
            .unwrap_or_else(|| panic!("no status for {job}: {statuses:?}"))
            .clone()
    };
    assert_eq!(status(on_keeper)["outcome"], "cancelled", "{statuses:?}");
    assert_eq!(status(on_doomed)["outcome"], "succeeded", "{statuses:?}");
    mq.assert_no_more_statuses();
    keeper.wait_for_log(&format!("job {on_keeper}: cancel requested"), LONG);
    assert_eq!(builds.runs(on_keeper), 1);
    assert_eq!(
        builds.runs(on_doomed),
        2,
        "lost with its worker: one fresh run"
    );
    assert_eq!(counter(&orch, "blacktree_jobs_redispatched_total"), 1.0);
}

#[test]
fn an_orphaned_build_still_stops_at_its_deadline_and_a_second_call_attaches_to_it() {
    // No orchestrator: the test calls the worker itself.
    let builds = Builds::start();
    let worker = builds.worker("orphan-w", NO_ORCHESTRATOR, 2, &[]);
    let client = job_client(worker.port);
    let request = |job_id: &str, timeout_seconds: u32| JobRequest {
        jobId: job_id.into(),
        timeoutSeconds: timeout_seconds,
        ..JobRequest::default()
    };
    let options = || CallOption::default().timeout(LONG);

    // A call that goes away leaves its build running; a second call attaches.
    let mut first = client
        .run_job_async_opt(&request("orphan-1", 0), options())
        .unwrap();
    poll(LONG, "the build to run", || {
        (builds.runs("orphan-1") == 1).then_some(())
    });
    first.cancel();
    worker.wait_for_log(
        "job orphan-1: the caller went away; the job keeps running",
        LONG,
    );
    let mut second = client
        .run_job_async_opt(&request("orphan-1", 0), options())
        .unwrap();
    worker.wait_for_log("job orphan-1: a call attached to the running job", LONG);
    builds.open("orphan-1");
    let (_, answer, _) = second.receive_sync().unwrap();
    assert!(answer.success, "{answer:?}");
    assert!(answer.logs.contains("built orphan-1"), "{}", answer.logs);
    assert_eq!(builds.runs("orphan-1"), 1, "attached, not run again");

    // An orphan's own deadline still stops it; its answer is held and says so.
    let mut call = client
        .run_job_async_opt(&request("orphan-2", 2), options())
        .unwrap();
    poll(LONG, "the build to run", || {
        (builds.runs("orphan-2") == 1).then_some(())
    });
    call.cancel();
    worker.wait_for_log("job orphan-2: failed", LONG);
    let answer = client
        .run_job_opt(&request("orphan-2", 2), options())
        .unwrap();
    assert!(!answer.success);
    assert!(answer.error.contains("timed out"), "{answer:?}");
    assert_eq!(
        builds.runs("orphan-2"),
        1,
        "the held answer, not a second run"
    );
    let pong = client.ping(&PingRequest::default()).unwrap();
    assert_eq!(pong.status, WorkerStatus::FREE);
}
