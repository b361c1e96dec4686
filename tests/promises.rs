//! README promises of the orchestrator and the worker that the other test files leave
//! untested: the metrics of worker health, health rounds and the broker connection,
//! `/healthz` before the first broker connection, the drain (`--drain-timeout` expiry,
//! SIGINT, a second signal, gRPC health while draining), de-duplication within and after
//! `--dedupe-window`, `--cancel-ttl`, `--job-timeout`, `--max-log-bytes` end to end, the
//! registration token on the worker's check-ins, and `--forget-after`.

mod common;

use std::time::{Duration, Instant};

use common::build_env::{TempDir, WorkerProcess};
use common::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

/// The orchestrator's `/metrics` text.
fn metrics(port: u16) -> String {
    let (code, body) = http(port, "/metrics");
    assert_eq!(code, "200", "{body}");
    body
}

const BUSY: &str = r#"blacktree_workers{state="busy"}"#;
const FREE: &str = r#"blacktree_workers{state="free"}"#;
const UNHEALTHY: &str = r#"blacktree_workers{state="unhealthy"}"#;
const PING_FAILURES: &str = "blacktree_ping_failures_total";
const HEALTH_ROUND: &str = "blacktree_health_round_seconds";
const CONNECTED: &str = "blacktree_broker_connected";

fn the_status<'a>(statuses: &'a [Value], job_id: &str) -> &'a Value {
    statuses
        .iter()
        .find(|s| s["jobId"] == job_id)
        .unwrap_or_else(|| panic!("no status for {job_id} in {statuses:?}"))
}

#[test]
fn worker_states_ping_failures_and_health_rounds_show_in_the_metrics() {
    let setup = Setup::new("p-metrics");
    let port = setup.orch.metrics_port;
    let busy = Behaviour {
        busy: true,
        ..Behaviour::default()
    };
    let _busy = setup.worker("pm-busy", busy);
    let _free = setup.worker("pm-free", Behaviour::default());
    let mut victim = setup.worker("pm-victim", Behaviour::default());

    let before = poll(LONG, "the worker answering BUSY to count as busy", || {
        let m = metrics(port);
        (sample(&m, BUSY) == 1.0 && sample(&m, FREE) == 2.0).then_some(m)
    });
    assert_eq!(sample(&before, UNHEALTHY), 0.0, "{before}");
    // The gauge is set by every round: positive (three workers were pinged) and changing.
    let round = sample(&before, HEALTH_ROUND);
    assert!(round > 0.0 && round < 5.0, "health round took {round} s");
    poll(LONG, "another health round to be recorded", || {
        (sample(&metrics(port), HEALTH_ROUND) != round).then_some(())
    });

    let failures_before = sample(&metrics(port), PING_FAILURES);
    victim.kill();
    // The counter grows when the round ends, after the worker was marked unhealthy:
    // at least the 2 failed pings (--unhealthy-after) that took it out.
    let after = poll(LONG, "the killed worker to count as unhealthy", || {
        let m = metrics(port);
        (sample(&m, UNHEALTHY) == 1.0 && sample(&m, PING_FAILURES) >= failures_before + 2.0)
            .then_some(m)
    });
    let failures = sample(&after, PING_FAILURES);
    assert_eq!(
        (sample(&after, BUSY), sample(&after, FREE)),
        (1.0, 1.0),
        "{after}"
    );
    // It is still pinged every round, and still fails.
    poll(LONG, "ping failures to keep growing", || {
        (sample(&metrics(port), PING_FAILURES) > failures).then_some(())
    });
}

#[test]
fn healthz_grpc_health_and_broker_connected_follow_the_broker_from_before_the_first_connection() {
    let broker = PrivateBroker::start();
    broker.ctl(&["stop_app"]);
    let names = Names::unique("p-nobroker");
    // Not `Orchestrator::start`: it waits for the broker connection.
    let mut args: Vec<String> = vec!["orchestrator".into(), "--amqp-url".into(), broker.url()];
    args.extend(names.args());
    args.extend(
        [
            "--grpc-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ]
        .map(String::from),
    );
    let (orch, ports) = LoggedChild::spawn(
        &args,
        &[
            "gRPC server listening on port ",
            "metrics listening on port ",
        ],
    );
    let port = ports[1];
    // The gRPC health (`healthcheck --orchestrator`, grpc_health_probe) tells the same.
    let grpc = format!("127.0.0.1:{}", ports[0]);
    let grpc_health = |expected: i32| {
        let out = blacktree(&["healthcheck", "--orchestrator", &grpc]);
        (out.status.code() == Some(expected)).then_some(text(&out.stderr))
    };
    orch.wait_for_log("broker: reconnecting in", LONG);
    assert!(!orch.log().contains("broker: connected"), "{}", orch.log());
    let (code, body) = http(port, "/healthz");
    assert_eq!(code, "503", "no broker connection yet: {body}");
    assert_eq!(sample(&metrics(port), CONNECTED), 0.0);
    let why = grpc_health(1).expect("NOT_SERVING without a broker connection");
    assert!(why.contains("NOT_SERVING"), "{why}");

    broker.ctl(&["start_app"]);
    poll(LONG, "/healthz to say 200 once connected", || {
        (http(port, "/healthz").0 == "200").then_some(())
    });
    poll(LONG, "the gRPC health to say SERVING", || grpc_health(0));
    let m = metrics(port);
    assert_eq!(sample(&m, CONNECTED), 1.0);
    assert_eq!(
        sample(&m, "blacktree_broker_reconnects_total"),
        0.0,
        "the first connection is no reconnect"
    );
    orch.wait_for_log("broker: connected", LONG);

    // An outage after the first connection.
    broker.ctl(&["stop_app"]);
    poll(
        LONG,
        "broker_connected 0 and /healthz 503 in the outage",
        || {
            (sample(&metrics(port), CONNECTED) == 0.0 && http(port, "/healthz").0 == "503")
                .then_some(())
        },
    );
    poll(
        LONG,
        "the gRPC health to say NOT_SERVING in the outage",
        || grpc_health(1),
    );
    broker.ctl(&["start_app"]);
    let m = poll(LONG, "broker_connected 1 after the outage", || {
        let m = metrics(port);
        (sample(&m, CONNECTED) == 1.0).then_some(m)
    });
    assert_eq!(http(port, "/healthz").0, "200");
    poll(LONG, "SERVING after the outage", || grpc_health(0));
    assert!(
        sample(&m, "blacktree_broker_reconnects_total") >= 1.0,
        "{m}"
    );
}

#[test]
fn a_job_outlasting_the_drain_timeout_is_left_to_the_broker_and_the_process_exits_0_on_time() {
    let drain = Duration::from_secs(8);
    let mut setup = Setup::with_flags("p-draintimeout", &["--drain-timeout", "8s"]);
    let slow = Behaviour {
        run_time: Duration::from_secs(120),
        ..Behaviour::default()
    };
    let w = setup.worker("pdt-w", slow);
    setup.mq.publish_job("pdt-1", json!({}));
    poll(LONG, "the job to run", || {
        (w.observed.job_count() == 1).then_some(())
    });
    let addr = format!("127.0.0.1:{}", setup.orch.grpc_port);
    let signalled = Instant::now();
    setup.orch.signal("TERM");
    setup.orch.wait_for_log("draining:", LONG);
    // While it drains, grpc.health.v1 says NOT_SERVING (an answer, not a lost connection).
    let out = blacktree(&["healthcheck", "--orchestrator", &addr]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("NOT_SERVING"),
        "{}",
        text(&out.stderr)
    );
    // `/healthz` follows the broker connection, which the drain keeps for its statuses.
    assert_eq!(http(setup.orch.metrics_port, "/healthz").0, "200");

    assert_eq!(setup.orch.wait_exit(LONG), Some(0));
    let took = signalled.elapsed();
    assert!(
        took >= drain - Duration::from_millis(100) && took < drain + Duration::from_secs(20),
        "exited {took:?} after SIGTERM with --drain-timeout {drain:?}"
    );
    assert_eq!(w.observed.job_count(), 1);
    // Not lost: its delivery was never acked, so the broker has it again.
    poll(LONG, "the job to be back in the execute queue", || {
        (setup.mq.counts(&setup.names.execute) == (1, 0)).then_some(())
    });
    assert_eq!(setup.mq.depth(&setup.names.status), 0, "it has no status");

    let next = Orchestrator::start(SHARED_BROKER, &setup.names, &[]);
    let fresh = TestWorker::start("pdt-w2", 0, Behaviour::default());
    fresh.register(next.grpc_port);
    let statuses = setup.mq.statuses(1, LONG);
    let status = the_status(&statuses, "pdt-1");
    assert_eq!(status["outcome"], "succeeded", "{status}");
    assert_eq!(status["workerId"], "pdt-w2");
}

#[test]
fn sigint_drains_like_sigterm() {
    let mut setup = Setup::with_flags("p-sigint", &["--drain-timeout", "60s"]);
    let w = setup.worker(
        "psi-w",
        Behaviour {
            run_time: Duration::from_secs(2),
            ..Behaviour::default()
        },
    );
    for i in 0..3 {
        setup.mq.publish_job(&format!("psi-{i}"), json!({}));
    }
    poll(LONG, "a job to start", || {
        (w.observed.job_count() == 1).then_some(())
    });
    setup.orch.signal("INT");
    assert_eq!(setup.orch.wait_exit(LONG), Some(0));
    assert!(setup.orch.log().contains("signal received: draining"));

    let running = w.observed.jobs.lock().unwrap()[0].clone();
    let statuses = setup.mq.statuses(1, LONG);
    assert_eq!(
        the_status(&statuses, &running)["outcome"],
        "succeeded",
        "the running job finished"
    );
    poll(LONG, "the two waiting jobs to be back in the queue", || {
        (setup.mq.counts(&setup.names.execute) == (2, 0)).then_some(())
    });
    assert_eq!(setup.mq.depth(&setup.names.status), 0, "only one status");
    assert_eq!(w.observed.job_count(), 1);
}

#[test]
fn a_second_signal_exits_at_once_and_the_running_job_is_not_lost() {
    let mut setup = Setup::with_flags("p-second", &["--drain-timeout", "120s"]);
    let w = setup.worker(
        "pss-w",
        Behaviour {
            run_time: Duration::from_secs(300),
            ..Behaviour::default()
        },
    );
    setup.mq.publish_job("pss-1", json!({}));
    poll(LONG, "the job to run", || {
        (w.observed.job_count() == 1).then_some(())
    });
    setup.orch.signal("TERM");
    setup.orch.wait_for_log("draining:", LONG);
    let second = Instant::now();
    setup.orch.signal("TERM");
    // Exits by itself (a code, not death by the signal), long before the drain timeout
    // or the job's end.
    let code = setup.orch.wait_exit(Duration::from_secs(20));
    assert!(
        code.is_some(),
        "killed by the second signal instead of exiting"
    );
    assert!(second.elapsed() < Duration::from_secs(20));
    assert!(
        setup.orch.log().contains("second signal"),
        "{}",
        setup.orch.log()
    );
    poll(LONG, "the running job to be back in the queue", || {
        (setup.mq.counts(&setup.names.execute) == (1, 0)).then_some(())
    });
    assert_eq!(setup.mq.depth(&setup.names.status), 0, "it has no status");
}

#[test]
fn a_job_id_published_again_runs_once_while_in_flight_and_not_again_after_its_status() {
    let setup = Setup::new("p-dedupe");
    // Two slots: a duplicate that slipped through could run beside the first.
    let w = setup.worker(
        "pd-w",
        Behaviour {
            run_time: Duration::from_secs(2),
            capacity: 2,
            ..Behaviour::default()
        },
    );
    setup.mq.publish_job("pd-1", json!({}));
    poll(LONG, "the job to run", || {
        (w.observed.job_count() == 1).then_some(())
    });
    setup.mq.publish_job("pd-1", json!({}));
    setup
        .orch
        .wait_for_log("job pd-1: delivered again while running here", LONG);
    let statuses = setup.mq.statuses(1, LONG);
    assert_eq!(the_status(&statuses, "pd-1")["outcome"], "succeeded");
    // Both deliveries acked, and no second status.
    setup.mq.assert_no_more_statuses();
    assert_eq!(w.observed.job_count(), 1);

    // Again after its status, within --dedupe-window (10 minutes by default).
    setup.mq.publish_job("pd-1", json!({}));
    setup.orch.wait_for_log(
        "job pd-1: delivered again after its status was confirmed",
        LONG,
    );
    setup.mq.assert_no_more_statuses();
    assert_eq!(w.observed.job_count(), 1, "not run again");
}

#[test]
fn after_a_short_dedupe_window_the_same_job_id_runs_again() {
    let setup = Setup::with_flags("p-window", &["--dedupe-window", "1s"]);
    let w = setup.worker("pw-w", Behaviour::default());
    setup.mq.publish_job("pw-1", json!({}));
    assert_eq!(setup.mq.statuses(1, LONG)[0]["outcome"], "succeeded");
    // Acked only once the status is confirmed, which is when the window starts.
    setup.mq.wait_all_acked(&setup.names.execute);
    // Waiting out the 1 s window is the point of the test.
    std::thread::sleep(Duration::from_secs(2));
    setup.mq.publish_job("pw-1", json!({}));
    let statuses = setup.mq.statuses(1, LONG);
    assert_eq!(the_status(&statuses, "pw-1")["outcome"], "succeeded");
    assert_eq!(w.observed.job_count(), 2, "run again after the window");
    assert!(!setup.orch.log().contains("delivered again"));
}

#[test]
fn an_early_cancel_is_remembered_for_the_cancel_ttl_and_then_forgotten() {
    let setup = Setup::with_flags("p-ttl", &["--cancel-ttl", "5s"]);
    let w = setup.worker("pt-w", Behaviour::default());

    // Within the TTL: the job is not run.
    setup.mq.publish_cancel("pt-1");
    setup.orch.wait_for_log(
        "job pt-1: cancel requested before it arrived; remembered for 5s",
        LONG,
    );
    setup.mq.publish_job("pt-1", json!({}));
    let statuses = setup.mq.statuses(1, LONG);
    assert_eq!(the_status(&statuses, "pt-1")["outcome"], "cancelled");

    // Past the TTL: forgotten, the job runs.
    setup.mq.publish_cancel("pt-2");
    setup.orch.wait_for_log(
        "job pt-2: cancel requested before it arrived; remembered for 5s",
        LONG,
    );
    // Waiting out the 5 s TTL is the point of the test.
    std::thread::sleep(Duration::from_secs(6));
    setup.mq.publish_job("pt-2", json!({}));
    let statuses = setup.mq.statuses(1, LONG);
    assert_eq!(the_status(&statuses, "pt-2")["outcome"], "succeeded");
    assert_eq!(*w.observed.jobs.lock().unwrap(), vec!["pt-2".to_string()]);
}

#[test]
fn the_job_timeout_flag_is_the_deadline_of_jobs_without_timeout_seconds() {
    let setup = Setup::with_flags("p-jobtimeout", &["--job-timeout", "2s"]);
    let w = setup.worker(
        "pj-w",
        Behaviour {
            run_time: Duration::from_secs(60),
            cancel_job: true,
            ..Behaviour::default()
        },
    );
    // `publish_job` sets no timeoutSeconds.
    setup.mq.publish_job("pj-1", json!({}));
    let statuses = setup.mq.statuses(1, LONG);
    let status = the_status(&statuses, "pj-1");
    assert_eq!(status["outcome"], "timed_out", "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("within 2s"),
        "{status}"
    );
    let took = status["durationMs"].as_u64().unwrap();
    assert!((1900..10_000).contains(&took), "duration {took} ms");
    poll(LONG, "the worker to be told to stop the job", || {
        w.observed
            .cancels
            .lock()
            .unwrap()
            .contains(&"pj-1".to_string())
            .then_some(())
    });

    // A job's own timeoutSeconds wins over the flag.
    setup.mq.publish_job("pj-2", json!({"timeoutSeconds": 4}));
    let statuses = setup.mq.statuses(1, LONG);
    let status = the_status(&statuses, "pj-2");
    assert_eq!(status["outcome"], "timed_out", "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("within 4s"),
        "{status}"
    );
    assert!(status["durationMs"].as_u64().unwrap() >= 3900, "{status}");
}

#[test]
fn a_worker_s_logs_keep_the_last_max_log_bytes_of_the_output() {
    let setup = Setup::new("p-logs");
    let lines = 3000;
    let command = format!("seq -f 'output line %g' 1 {lines}; echo THE-END");
    let _worker = WorkerProcess::start(
        "pl-w",
        setup.orch.grpc_port,
        &[
            "--executor",
            "exec",
            "--exec-command",
            &command,
            "--max-log-bytes",
            "1000",
        ],
    );
    setup.orch.wait_for_log("worker pl-w registered", LONG);
    setup.mq.publish_job("pl-1", json!({"repoUrl": ""}));
    let statuses = setup.mq.statuses(1, LONG);
    let status = the_status(&statuses, "pl-1");
    assert_eq!(status["outcome"], "succeeded", "{status}");
    let logs = status["logs"].as_str().unwrap();

    let mut output: String = (1..=lines).map(|i| format!("output line {i}\n")).collect();
    output.push_str("THE-END\n");
    assert!(output.len() > 30 * 1000);
    let tail = &output[output.len() - 1000..];
    assert!(
        logs.ends_with(tail),
        "the last 1000 bytes of the output are kept: {logs:?}"
    );
    // Before them at most a one-line marker, nothing of the earlier output.
    let head = &logs[..logs.len() - 1000];
    assert!(
        head.len() < 100 && head.matches('\n').count() <= 1 && !head.contains("output line"),
        "more than the limit kept: {head:?}"
    );
}

#[test]
fn a_worker_with_the_registration_token_checks_in_and_registers_again_one_without_never_registers()
{
    let names = Names::unique("p-token");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let dir = TempDir::new("p-token");
    let token_file = dir.0.join("token");
    std::fs::write(&token_file, "reg-P-T0KEN-314\n").unwrap();
    let token_file = token_file.to_str().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let flags = [
        "--grpc-listen",
        &listen,
        "--registration-token-file",
        token_file,
    ];
    let mut first = Orchestrator::start(SHARED_BROKER, &names, &flags);
    let worker = WorkerProcess::start(
        "ptok-w",
        first.grpc_port,
        &[
            "--executor",
            "exec",
            "--exec-command",
            "echo ran $BLACKTREE_JOB_ID",
            "--registration-token-file",
            token_file,
        ],
    );
    // The worker's own word that it got the answer, not only the orchestrator's log line.
    worker.wait_for_log("registered with the orchestrator", LONG);
    first.signal("KILL");
    first.wait_exit(LONG);

    let second = Orchestrator::start(SHARED_BROKER, &names, &flags);
    second.wait_for_log("worker ptok-w registered", LONG);
    // The worker registers again only when a check-in Ping was accepted and answered
    // "unknown worker"; a refused Ping (no token) is only retried.
    assert!(
        worker.log().contains("registering again"),
        "{}",
        worker.log()
    );
    for log in [first.log(), second.log()] {
        assert!(
            !log.contains("missing or wrong registration token"),
            "a call of the worker was refused: {log}"
        );
    }
    mq.publish_job("ptok-1", json!({"repoUrl": ""}));
    let statuses = mq.statuses(1, LONG);
    let status = the_status(&statuses, "ptok-1");
    assert_eq!(status["outcome"], "succeeded", "{status}");
    assert_eq!(status["workerId"], "ptok-w");

    // Without the token: refused, again and again.
    let stranger = WorkerProcess::start(
        "pnotok-w",
        second.grpc_port,
        &["--executor", "exec", "--exec-command", "true"],
    );
    poll(LONG, "two refused registrations", || {
        (second
            .log()
            .matches("missing or wrong registration token")
            .count()
            >= 2)
            .then_some(())
    });
    poll(LONG, "the stranger to log the refusal", || {
        stranger.log().contains("cannot register").then_some(())
    });
    assert!(!second.log().contains("worker pnotok-w registered"));
    let listed: Vec<String> = worker_states(second.metrics_port)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(listed, ["ptok-w"]);
    for log in [first.log(), second.log(), worker.log(), stranger.log()] {
        assert!(!log.contains("reg-P-T0KEN-314"), "token leaked: {log}");
    }
}

#[test]
fn an_unhealthy_registered_worker_is_forgotten_after_forget_after_a_static_one_never() {
    let mut fixed = TestWorker::start("pf-static", 0, Behaviour::default());
    let flag = format!("pf-static=127.0.0.1:{}", fixed.port);
    let setup = Setup::with_flags("p-forget", &["--forget-after", "2s", "--worker", &flag]);
    let mut registered = setup.worker("pf-reg", Behaviour::default());
    let port = setup.orch.metrics_port;
    poll(LONG, "both workers to be free", || {
        let states = worker_states(port);
        (states.len() == 2 && states.iter().all(|(_, s)| s == "free")).then_some(())
    });

    fixed.kill();
    registered.kill();
    poll(LONG, "both workers to be unhealthy", || {
        (state_of(port, "pf-static").as_deref() == Some("unhealthy")
            && state_of(port, "pf-reg").as_deref() == Some("unhealthy"))
        .then_some(())
    });
    poll(LONG, "the registered worker to be forgotten", || {
        state_of(port, "pf-reg").is_none().then_some(())
    });
    let forgotten = |id: &str| {
        setup
            .orch
            .log()
            .lines()
            .any(|l| l.contains(&format!("worker {id} (")) && l.contains("forgotten after 2s"))
    };
    poll(LONG, "the log line saying it was forgotten", || {
        forgotten("pf-reg").then_some(())
    });
    // Waiting out another --forget-after is the point: the static worker, unhealthy
    // since about when the other one was, stays.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(state_of(port, "pf-static").as_deref(), Some("unhealthy"));
    assert_eq!(sample(&metrics(port), UNHEALTHY), 1.0);
    assert!(!forgotten("pf-static"), "{}", setup.orch.log());
}
