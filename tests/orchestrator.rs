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
    let Setup { mq, orch, .. } = Setup::new("spread");
    let workers: Vec<TestWorker> = [1, 1, 2, 3]
        .iter()
        .enumerate()
        .map(|(i, &capacity)| {
            let behaviour = Behaviour {
                run_time: Duration::from_millis(5),
                capacity,
                ..Behaviour::default()
            };
            orch.worker(&format!("spread-w{i}"), behaviour)
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
    // Every delivery acked (a run of the oldest goes as one multiple ack: none may be
    // left out), and no second status for any job behind the ones read.
    mq.assert_no_more_statuses();
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
    orch.assert_no_secret_logged();
}

#[test]
fn a_killed_worker_reports_worker_lost_and_gets_no_job_until_it_answers_pings() {
    let Setup { mq, orch, .. } = Setup::new("killed");
    let hold = Behaviour {
        run_time: Duration::from_secs(120),
        ..Behaviour::default()
    };
    let mut victim = orch.worker("killed-victim", hold);
    mq.publish_job("killed-0", json!({}));
    poll(LONG, "the victim to start job 0", || {
        (victim.observed.job_count() == 1).then_some(())
    });

    let fast = Behaviour::default();
    let _survivor = orch.worker("killed-survivor", fast);
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
    let Setup { mq, orch, .. } = Setup::new("busy");
    let busy = orch.worker(
        "busy-b",
        Behaviour {
            busy: true,
            capacity: 4,
            ..Behaviour::default()
        },
    );
    // Two answered pings: the first one's BUSY is recorded before the second is sent.
    poll(LONG, "two pings of the busy worker", || {
        (busy.observed.pings.load(Ordering::SeqCst) >= 2).then_some(())
    });
    let _free = orch.worker("busy-f", Behaviour::default());
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
    let Setup { mq, orch, .. } = Setup::new("rereg");
    let mut first = orch.worker("rereg-w", Behaviour::default());
    mq.publish_job("rereg-0", json!({}));
    assert_eq!(outcome_of(&mq.statuses(1, LONG), "rereg-0"), "succeeded");
    assert_eq!(first.observed.job_count(), 1);

    first.kill();
    let second = orch.worker("rereg-w", Behaviour::default());
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
    let Setup { mq, orch, .. } = Setup::with_flags("deadline", &["--job-timeout", "30s"]);
    let slow = Behaviour {
        run_time: Duration::from_secs(20),
        ..Behaviour::default()
    };
    let _w = orch.worker("deadline-w", slow);
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
    let Setup { names, mq, orch } = Setup::with_flags("bad", &["--max-message-bytes", "2000"]);
    let w = orch.worker("bad-w", Behaviour::default());

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
    mq.wait_all_acked(&names.execute);
    assert_eq!(
        mq.depth(&names.rejected),
        0,
        "one copy of each in the rejected queue"
    );
    orch.assert_no_secret_logged();
}

#[test]
fn sigterm_lets_running_jobs_finish_requeues_the_rest_and_exits_0() {
    let Setup {
        names,
        mq,
        mut orch,
    } = Setup::with_flags("drain", &["--drain-timeout", "30s"]);
    let w = orch.worker(
        "drain-w",
        Behaviour {
            run_time: Duration::from_secs(2),
            ..Behaviour::default()
        },
    );
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
    assert_eq!(outcome_of(&statuses, &running), "succeeded");
    // It has exited: whatever it published is in the status queue by now.
    assert_eq!(
        mq.depth(&names.status),
        0,
        "only the running job ended: {statuses:?}"
    );
    assert_eq!(
        mq.counts(&names.execute),
        (2, 0),
        "the two waiting jobs are back in the queue, the finished one acked"
    );
    assert_eq!(w.observed.job_count(), 1);
}

#[test]
fn a_sigkilled_orchestrator_restarted_loses_no_job() {
    let Setup {
        names,
        mq,
        mut orch,
    } = Setup::new("sigkill");
    let behaviour = Behaviour {
        run_time: Duration::from_millis(30),
        capacity: 2,
        ..Behaviour::default()
    };
    let workers: Vec<TestWorker> = (0..3)
        .map(|i| orch.worker(&format!("sigkill-w{i}"), behaviour.clone()))
        .collect();
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
    let Setup { names, mq, orch } = Setup::on(&broker, "cut", &[]);
    // The jobs running when the connections are cut end only after the orchestrator
    // is back: their statuses need the new connection, and their redeliveries must
    // not run them again.
    let (open_gate, gate) = crossbeam_channel::bounded::<()>(0);
    let behaviour = Behaviour {
        run_time: Duration::from_millis(100),
        capacity: 2,
        gate: Some(gate),
        ..Behaviour::default()
    };
    let workers: Vec<TestWorker> = (0..2)
        .map(|i| orch.worker(&format!("cut-w{i}"), behaviour.clone()))
        .collect();
    let ids: Vec<String> = (0..60).map(|i| format!("cut-{i}")).collect();
    for id in &ids {
        mq.publish_job(id, json!({}));
    }
    poll(LONG, "every slot to run a job", || {
        (workers
            .iter()
            .map(|w| w.observed.job_count())
            .sum::<usize>()
            == 4)
            .then_some(())
    });
    // `mq`'s connection is cut below; it stays in scope so its queues stay too.
    broker.ctl(&["close_all_connections", "test cut"]);
    poll(LONG, "the orchestrator to reconnect", || {
        (orch.log().matches("broker: connected to").count() >= 2).then_some(())
    });
    let reconnected = std::time::SystemTime::now();
    drop(open_gate);

    let reader = Mq::on(&broker, &names);
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
    reader.assert_no_more_statuses();
    // The four jobs that ran through the cut were published on the new connection.
    let cut_jobs: Vec<String> = workers
        .iter()
        .flat_map(|w| w.observed.jobs.lock().unwrap()[..2].to_vec())
        .collect();
    let reconnected: String = humantime::format_rfc3339_millis(reconnected).to_string();
    for job in &cut_jobs {
        let status = statuses
            .iter()
            .find(|s| s["jobId"] == job.as_str())
            .unwrap();
        assert!(
            status["finishedAt"].as_str().unwrap() >= reconnected.as_str(),
            "{job} finished after the reconnect at {reconnected}: {status}"
        );
    }
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
    // Named before it runs: jobs wait until it answers a ping, none is sent to it blind.
    let port = free_port();
    let flag = format!("static-w=127.0.0.1:{port}");
    let Setup { mq, orch, .. } = Setup::with_flags("static", &["--worker", &flag]);
    for i in 0..3 {
        mq.publish_job(&format!("static-{i}"), json!({}));
    }
    orch.wait_for_log("job static-2: received", LONG);
    let w = TestWorker::start("static-w", port, Behaviour::default());
    let statuses = mq.statuses(3, LONG);
    assert!(
        statuses
            .iter()
            .all(|s| s["outcome"] == "succeeded" && s["workerId"] == "static-w"),
        "{statuses:?}"
    );
    let first_ping = *w.observed.first_ping.get().expect("it was pinged");
    let first_job = *w.observed.first_job.get().unwrap();
    assert!(first_ping < first_job, "pinged before its first job");
    orch.assert_no_secret_logged();
}

#[test]
fn load_metrics_show_waiting_jobs_slots_busy_threads_and_slots_the_threads_cannot_use() {
    let flags = ["--dispatch-threads", "2", "--prefetch", "5"];
    let setup = Setup::with_flags("load-metrics", &flags);
    let (open_gate, gate) = crossbeam_channel::bounded::<()>(0);
    let held = Behaviour {
        capacity: 3,
        gate: Some(gate),
        ..Behaviour::default()
    };
    let worker = setup.worker("load-w", held);
    for i in 0..5 {
        setup.mq.publish_job(&format!("load-{i}"), json!({}));
    }
    let port = setup.orch.metrics_port;
    // Two threads run two jobs on the worker's three slots; three jobs wait behind them.
    let metrics = poll(LONG, "two running and three waiting", || {
        let text = http(port, "/metrics").1;
        (find_sample(&text, r#"blacktree_jobs_waiting{labels=""}"#) == Some(3.0)
            && find_sample(&text, "blacktree_dispatch_threads_busy") == Some(2.0))
        .then_some(text)
    });
    assert!(sample(&metrics, "blacktree_oldest_waiting_job_age_seconds") > 0.0);
    assert_eq!(
        sample(&metrics, "blacktree_worker_slots{state=\"busy\"}"),
        2.0
    );
    assert_eq!(
        sample(&metrics, "blacktree_worker_slots{state=\"free\"}"),
        1.0
    );
    assert_eq!(
        sample(&metrics, "blacktree_slots_beyond_dispatch_threads"),
        1.0
    );
    setup
        .orch
        .wait_for_log("3 slots and there are 2 dispatch threads", LONG);
    let version = format!(
        "blacktree_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&metrics, &version), 1.0);
    assert!(sample(&metrics, "process_resident_memory_bytes") > 1e6);
    assert!(sample(&metrics, "process_open_fds") > 3.0);
    assert!(sample(&metrics, "process_start_time_seconds") > 1.7e9);
    assert!(sample(&metrics, "process_cpu_seconds_total") > 0.0);

    drop(open_gate);
    assert_eq!(setup.mq.statuses(5, LONG).len(), 5);
    poll(LONG, "nothing waiting and no thread busy", || {
        let text = http(port, "/metrics").1;
        (find_sample(&text, r#"blacktree_jobs_waiting{labels=""}"#) == Some(0.0)
            && find_sample(&text, "blacktree_dispatch_threads_busy") == Some(0.0)
            && find_sample(&text, "blacktree_oldest_waiting_job_age_seconds") == Some(0.0))
        .then_some(())
    });
    assert_eq!(worker.observed.job_count(), 5);
}

/// A child process killed when dropped.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A job's log lines are on stderr by the time its status is on the broker: the
/// orchestrator holds them back for a few milliseconds, and its publisher writes them
/// before each status (issue 20). Other lines are written at once: a registration's is
/// there when the Register call returns. Its stderr is a file here, so a line is there
/// once its write returned (a pipe's reader could lag behind the broker).
#[test]
fn a_job_s_log_lines_are_on_stderr_before_its_status_and_other_lines_at_once() {
    let names = Names::unique("logfirst");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let worker = TestWorker::start("logfirst-w", 0, Behaviour::default());
    let dir = build_env::TempDir::new("logfirst");
    let path = dir.0.join("stderr");
    let static_worker = format!("logfirst-w=127.0.0.1:{}", worker.port);
    let mut args = vec!["orchestrator", "--amqp-url", SHARED_BROKER];
    let name_args = names.args();
    args.extend(name_args.iter().map(String::as_str));
    args.extend(["--health-interval", "200ms", "--health-timeout", "300ms"]);
    args.extend([
        "--grpc-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    args.extend(["--worker", &static_worker]);
    let child = command()
        .args(&args)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&path).unwrap())
        .spawn()
        .unwrap();
    let _orchestrator = KilledOnDrop(child);
    let log = || std::fs::read_to_string(&path).unwrap();
    poll(LONG, "the orchestrator connected to the broker", || {
        log().contains("broker: connected").then_some(())
    });

    for i in 0..20 {
        let job = format!("logfirst-{i}");
        mq.publish_job(&job, json!({}));
        let status = mq.statuses(1, LONG).remove(0);
        assert_eq!(status["jobId"], job.as_str());
        let log = log();
        for line in [
            format!("job {job}: received"),
            format!("job {job}: dispatched to worker logfirst-w"),
            format!("job {job}: succeeded on worker logfirst-w"),
        ] {
            assert!(
                log.contains(&line),
                "{line:?} not on stderr when its status arrived:\n{log}"
            );
        }
    }

    let grpc_port = log()
        .split("gRPC server listening on port ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .expect("the gRPC port on stderr");
    let late = TestWorker::start("logfirst-late", 0, Behaviour::default());
    late.register(grpc_port);
    let log = log();
    assert!(
        log.contains("worker logfirst-late registered"),
        "the registration not on stderr when its call returned:\n{log}"
    );
}
