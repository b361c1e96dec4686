//! The orchestrator end to end: the real `blacktree` binary, the real RabbitMQ, and real
//! grpcio workers. Every test has its own exchange and queues.

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

fn outcome_of<'a>(statuses: &'a [Value], job_id: &str) -> &'a str {
    statuses
        .iter()
        .find(|s| s["jobId"] == job_id)
        .and_then(|s| s["outcome"].as_str())
        .unwrap_or_else(|| panic!("no status for {job_id} in {statuses:?}"))
}

#[test]
fn jobs_spread_over_workers_each_status_once_within_capacity() {
    let names = Names::unique("spread");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let orch = Orchestrator::start(SHARED_BROKER, &names, &[]);
    let workers: Vec<TestWorker> = [1, 1, 2, 3]
        .iter()
        .enumerate()
        .map(|(i, &capacity)| {
            let behaviour = Behaviour {
                run_time: Duration::from_millis(5),
                capacity,
                ..Behaviour::default()
            };
            let w = TestWorker::start(&format!("spread-w{i}"), 0, behaviour);
            w.register(orch.grpc_port);
            w
        })
        .collect();

    let ids: Vec<String> = (0..200).map(|i| format!("spread-{i}")).collect();
    for id in &ids {
        mq.publish_job(id, json!({}));
    }
    let statuses = mq.statuses(ids.len(), LONG);

    let counts = count_by_job(&statuses);
    assert_eq!(counts.len(), ids.len(), "every job has a status");
    assert!(
        counts.values().all(|&n| n == 1),
        "exactly one status per job"
    );
    for status in &statuses {
        assert_eq!(status["outcome"], "succeeded", "{status}");
        assert_eq!(status["success"], true);
        let logs = status["logs"].as_str().unwrap();
        assert!(
            logs.contains("with token ***") && !logs.contains(TOKEN),
            "token redacted: {logs}"
        );
    }
    let mut total = 0;
    for (w, capacity) in workers.iter().zip([1, 1, 2, 3]) {
        let max = w.observed.max_in_flight.load(Ordering::SeqCst);
        assert!(
            max <= capacity,
            "{} ran {max} jobs at once, capacity {capacity}",
            w.id
        );
        assert_eq!(
            w.observed.refused.load(Ordering::SeqCst),
            0,
            "{} never had to refuse",
            w.id
        );
        assert!(w.observed.job_count() > 0, "{} got jobs", w.id);
        total += w.observed.job_count();
    }
    assert_eq!(total, ids.len(), "no job ran twice");
    assert_eq!(mq.depth(&names.execute), 0);
    // Acks of runs of the oldest deliveries go as one multiple ack: none is left out.
    poll(LONG, "every delivery acked", || {
        (unacked_on_shared_broker(&names.execute) == 0).then_some(())
    });
    orch.assert_no_secret_logged();
}

#[test]
fn a_killed_worker_reports_worker_lost_and_gets_no_job_until_it_answers_pings() {
    let names = Names::unique("killed");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let orch = Orchestrator::start(SHARED_BROKER, &names, &[]);
    let hold = Behaviour {
        run_time: Duration::from_secs(120),
        ..Behaviour::default()
    };
    let mut victim = TestWorker::start("killed-victim", 0, hold);
    victim.register(orch.grpc_port);
    mq.publish_job("killed-0", json!({}));
    poll(LONG, "the victim to start job 0", || {
        (victim.observed.job_count() == 1).then_some(())
    });

    let fast = Behaviour::default();
    let survivor = TestWorker::start("killed-survivor", 0, fast);
    survivor.register(orch.grpc_port);
    victim.kill();
    let statuses = mq.statuses(1, LONG);
    assert_eq!(outcome_of(&statuses, "killed-0"), "worker_lost");
    assert_eq!(statuses[0]["workerId"], "killed-victim");
    assert_eq!(statuses[0]["success"], false);

    for i in 1..=10 {
        mq.publish_job(&format!("killed-{i}"), json!({}));
    }
    let statuses = mq.statuses(10, LONG);
    assert!(statuses
        .iter()
        .all(|s| s["outcome"] == "succeeded" && s["workerId"] == "killed-survivor"));

    // Back on the same port, answering pings: it gets jobs again without re-registering.
    victim.behaviour.lock().unwrap().run_time = Duration::from_millis(200);
    victim.restart();
    let before = victim.observed.job_count();
    let mut n = 11;
    poll(LONG, "the restarted worker to get a job", || {
        mq.publish_job(&format!("killed-{n}"), json!({}));
        n += 1;
        mq.statuses(1, LONG);
        (victim.observed.job_count() > before).then_some(())
    });
    orch.assert_no_secret_logged();
}

#[test]
fn a_busy_worker_is_skipped() {
    let names = Names::unique("busy");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let orch = Orchestrator::start(SHARED_BROKER, &names, &[]);
    let busy = TestWorker::start(
        "busy-b",
        0,
        Behaviour {
            busy: true,
            capacity: 4,
            ..Behaviour::default()
        },
    );
    busy.register(orch.grpc_port);
    // Two answered pings: the first one's BUSY is recorded before the second is sent.
    poll(LONG, "two pings of the busy worker", || {
        (busy.observed.pings.load(Ordering::SeqCst) >= 2).then_some(())
    });
    let free = TestWorker::start("busy-f", 0, Behaviour::default());
    free.register(orch.grpc_port);
    for i in 0..10 {
        mq.publish_job(&format!("busy-{i}"), json!({}));
    }
    let statuses = mq.statuses(10, LONG);
    assert!(
        statuses.iter().all(|s| s["workerId"] == "busy-f"),
        "{statuses:?}"
    );
    assert_eq!(busy.observed.job_count(), 0);
}

#[test]
fn a_worker_registering_again_under_its_id_gets_jobs_at_its_new_address() {
    let names = Names::unique("rereg");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let orch = Orchestrator::start(SHARED_BROKER, &names, &[]);
    let mut first = TestWorker::start("rereg-w", 0, Behaviour::default());
    first.register(orch.grpc_port);
    mq.publish_job("rereg-0", json!({}));
    assert_eq!(outcome_of(&mq.statuses(1, LONG), "rereg-0"), "succeeded");
    assert_eq!(first.observed.job_count(), 1);

    first.kill();
    let second = TestWorker::start("rereg-w", 0, Behaviour::default());
    second.register(orch.grpc_port);
    for i in 1..=5 {
        mq.publish_job(&format!("rereg-{i}"), json!({}));
    }
    let statuses = mq.statuses(5, LONG);
    assert!(
        statuses.iter().all(|s| s["outcome"] == "succeeded"),
        "{statuses:?}"
    );
    assert_eq!(second.observed.job_count(), 5);
}

#[test]
fn a_job_past_its_deadline_is_timed_out() {
    let names = Names::unique("deadline");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let orch = Orchestrator::start(SHARED_BROKER, &names, &["--job-timeout", "30s"]);
    let slow = Behaviour {
        run_time: Duration::from_secs(20),
        ..Behaviour::default()
    };
    let w = TestWorker::start("deadline-w", 0, slow);
    w.register(orch.grpc_port);
    mq.publish_job("deadline-0", json!({"timeoutSeconds": 1}));
    let statuses = mq.statuses(1, LONG);
    assert_eq!(outcome_of(&statuses, "deadline-0"), "timed_out");
    assert!(
        statuses[0]["error"].as_str().unwrap().contains("within 1s"),
        "{statuses:?}"
    );
}

#[test]
fn bad_messages_go_to_the_rejected_queue_and_good_jobs_still_run() {
    let names = Names::unique("bad");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let orch = Orchestrator::start(SHARED_BROKER, &names, &["--max-message-bytes", "2000"]);
    let w = TestWorker::start("bad-w", 0, Behaviour::default());
    w.register(orch.grpc_port);

    mq.publish_raw(b"this is not json");
    mq.publish_raw(br#"{"repoUrl":"acme/app","githubToken":"ghp_TESTSECRET0123456789"}"#);
    mq.publish_job("bad-big", json!({"padding": "x".repeat(3000)}));
    mq.publish_job("bad-good", json!({}));

    let statuses = mq.statuses(2, LONG);
    assert_eq!(outcome_of(&statuses, "bad-big"), "rejected");
    assert_eq!(outcome_of(&statuses, "bad-good"), "succeeded");
    let big = statuses.iter().find(|s| s["jobId"] == "bad-big").unwrap();
    assert!(
        big["error"]
            .as_str()
            .unwrap()
            .contains("above the limit of 2000"),
        "{big}"
    );

    let rejected = mq.read_until(&names.rejected, LONG, |m| m.len() >= 3);
    assert_eq!(rejected.len(), 3);
    let reasons: Vec<String> = rejected
        .iter()
        .map(
            |(_, headers)| match headers.get("x-blacktree-reject-reason") {
                Some(amiquip::AmqpValue::LongString(r)) => r.clone(),
                other => panic!("no reason header: {other:?}"),
            },
        )
        .collect();
    assert!(reasons[0].starts_with("not JSON"), "{reasons:?}");
    assert_eq!(reasons[1], "`jobId` is missing");
    assert!(reasons[2].contains("above the limit"), "{reasons:?}");
    assert_eq!(
        rejected[0].0, b"this is not json",
        "the body is kept unchanged"
    );
    assert_eq!(w.observed.job_count(), 1);
    assert_eq!(mq.depth(&names.execute), 0, "bad messages were acked");
    orch.assert_no_secret_logged();
}

#[test]
fn sigterm_lets_running_jobs_finish_requeues_the_rest_and_exits_0() {
    let names = Names::unique("drain");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let mut orch = Orchestrator::start(SHARED_BROKER, &names, &["--drain-timeout", "30s"]);
    let w = TestWorker::start(
        "drain-w",
        0,
        Behaviour {
            run_time: Duration::from_secs(2),
            ..Behaviour::default()
        },
    );
    w.register(orch.grpc_port);
    for i in 0..3 {
        mq.publish_job(&format!("drain-{i}"), json!({}));
    }
    poll(LONG, "a job to start", || {
        (w.observed.job_count() == 1).then_some(())
    });
    orch.signal("TERM");
    assert_eq!(orch.wait_exit(LONG), Some(0));

    let statuses = mq.statuses(1, LONG);
    let running = w.observed.jobs.lock().unwrap()[0].clone();
    assert_eq!(
        statuses.len(),
        1,
        "only the running job ended: {statuses:?}"
    );
    assert_eq!(outcome_of(&statuses, &running), "succeeded");
    assert_eq!(
        mq.depth(&names.execute),
        2,
        "the two waiting jobs are back in the queue"
    );
    assert_eq!(w.observed.job_count(), 1);
}

#[test]
fn a_sigkilled_orchestrator_restarted_loses_no_job() {
    let names = Names::unique("sigkill");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let mut orch = Orchestrator::start(SHARED_BROKER, &names, &[]);
    let behaviour = Behaviour {
        run_time: Duration::from_millis(30),
        capacity: 2,
        ..Behaviour::default()
    };
    let workers: Vec<TestWorker> = (0..3)
        .map(|i| TestWorker::start(&format!("sigkill-w{i}"), 0, behaviour.clone()))
        .collect();
    for w in &workers {
        w.register(orch.grpc_port);
    }
    let ids: Vec<String> = (0..150).map(|i| format!("sigkill-{i}")).collect();
    for id in &ids {
        mq.publish_job(id, json!({}));
    }
    let mut seen = mq.statuses(20, LONG);
    orch.signal("KILL");
    orch.wait_exit(LONG);

    let orch = Orchestrator::start(SHARED_BROKER, &names, &[]);
    for w in &workers {
        w.register(orch.grpc_port);
    }
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut have: HashSet<String> = count_by_job(&seen).into_keys().collect();
    let rest = mq.statuses_until(LONG, |s| {
        have.extend(s.iter().map(|v| v["jobId"].as_str().unwrap().to_string()));
        wanted.iter().all(|id| have.contains(*id))
    });
    seen.extend(rest);
    let counts = count_by_job(&seen);
    let missing: Vec<&&str> = wanted
        .iter()
        .filter(|id| !counts.contains_key(**id))
        .collect();
    assert!(missing.is_empty(), "jobs without a status: {missing:?}");
    let duplicates: usize = counts.values().map(|n| n - 1).sum();
    println!(
        "sigkill restart: {} jobs, {} statuses, {duplicates} duplicates",
        ids.len(),
        seen.len()
    );
    assert!(seen.iter().all(|s| s["outcome"] == "succeeded"), "{seen:?}");
    orch.assert_no_secret_logged();
}

#[test]
fn broker_connections_closed_mid_run_every_job_still_gets_its_status() {
    let broker = PrivateBroker::start();
    let url = broker.url();
    let names = Names::unique("cut");
    let mq = Mq::connect(&url, &names);
    let orch = Orchestrator::start(&url, &names, &[]);
    let behaviour = Behaviour {
        run_time: Duration::from_millis(100),
        capacity: 2,
        ..Behaviour::default()
    };
    let workers: Vec<TestWorker> = (0..2)
        .map(|i| TestWorker::start(&format!("cut-w{i}"), 0, behaviour.clone()))
        .collect();
    for w in &workers {
        w.register(orch.grpc_port);
    }
    let ids: Vec<String> = (0..60).map(|i| format!("cut-{i}")).collect();
    for id in &ids {
        mq.publish_job(id, json!({}));
    }
    poll(LONG, "some jobs to run", || {
        (workers
            .iter()
            .map(|w| w.observed.job_count())
            .sum::<usize>()
            >= 8)
            .then_some(())
    });
    // `mq`'s connection is cut below; it stays in scope so its queues stay too.
    broker.ctl(&["close_all_connections", "test cut"]);
    orch.wait_for_log("broker: connected to", LONG);
    poll(LONG, "the orchestrator to reconnect", || {
        (orch.log().matches("broker: connected to").count() >= 2).then_some(())
    });

    let reader = Mq::connect(&url, &names);
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let statuses = reader.statuses_until(LONG, |s| {
        let have: HashSet<&str> = s.iter().filter_map(|v| v["jobId"].as_str()).collect();
        wanted.iter().all(|id| have.contains(id))
    });
    let counts = count_by_job(&statuses);
    let missing: Vec<&&str> = wanted
        .iter()
        .filter(|id| !counts.contains_key(**id))
        .collect();
    assert!(missing.is_empty(), "jobs without a status: {missing:?}");
    assert!(
        statuses.iter().all(|s| s["outcome"] == "succeeded"),
        "{statuses:?}"
    );
    let ran: usize = workers.iter().map(|w| w.observed.job_count()).sum();
    println!(
        "connections cut: {} jobs, {} statuses, {} runs",
        ids.len(),
        statuses.len(),
        ran
    );
    assert_eq!(ran, ids.len(), "no job ran twice across the reconnect");
    orch.assert_no_secret_logged();
}

#[test]
fn a_static_worker_named_on_the_command_line_runs_jobs_once_it_answers_pings() {
    let names = Names::unique("static");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let w = TestWorker::start("static-w", 0, Behaviour::default());
    let flag = format!("static-w=127.0.0.1:{}", w.port);
    let orch = Orchestrator::start(SHARED_BROKER, &names, &["--worker", &flag]);
    for i in 0..3 {
        mq.publish_job(&format!("static-{i}"), json!({}));
    }
    let statuses = mq.statuses(3, LONG);
    assert!(statuses
        .iter()
        .all(|s| s["outcome"] == "succeeded" && s["workerId"] == "static-w"));
    assert!(
        w.observed.pings.load(Ordering::SeqCst) >= 1,
        "pinged before its first job"
    );
    orch.assert_no_secret_logged();
}
