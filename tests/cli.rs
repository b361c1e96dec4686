//! The operator's command line end to end: submit, watch, cancel, workers, healthcheck
//! and the single-instance lock, against the real broker and orchestrator.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::time::Duration;

use common::build_env::{TempDir, WorkerProcess};
use common::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

#[test]
fn submit_is_seen_by_watch_without_taking_it_from_the_control_plane() {
    let Setup { names, mq, orch } = Setup::new("cli-submit");
    let w = orch.worker("cli-w", Behaviour::default());

    let watch = Watch::start(&[
        "watch",
        "--amqp-url",
        SHARED_BROKER,
        "--exchange",
        &names.exchange,
        "--count",
        "1",
        "--idle",
        "60s",
    ]);

    let dir = TempDir::new("cli-token");
    let token_file = dir.0.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let out = blacktree(&[
        "submit",
        "--amqp-url",
        SHARED_BROKER,
        "--exchange",
        &names.exchange,
        "--repo",
        "acme/app",
        "--image",
        "acme/app:2",
        "--token-file",
        token_file.to_str().unwrap(),
        "--timeout",
        "60",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job_id = text(&out.stdout).trim().to_string();
    assert_eq!(job_id.len(), 36, "a generated UUID: {job_id}");

    let (code, shown, rest) = watch.finish();
    assert_eq!(code, Some(0));
    assert!(
        shown.starts_with(&format!("{job_id} succeeded worker=cli-w ")),
        "{shown}"
    );
    assert!(
        rest.contains("summary: 1 jobs") && rest.contains("1 succeeded"),
        "{rest}"
    );
    // The control plane's own queue still has the status.
    let statuses = mq.statuses(1, LONG);
    assert_eq!(statuses[0]["jobId"], job_id.as_str());
    assert_eq!(w.observed.jobs.lock().unwrap()[0], job_id);
    orch.assert_no_secret_logged();

    // A misspelt field is refused with the nearest one, and nothing is queued.
    let dir = TempDir::new("cli-typo");
    let typo = dir.0.join("job.json");
    std::fs::write(&typo, r#"{"jobId":"cli-typo","repoURL":"acme/app"}"#).unwrap();
    let exchange = ["--amqp-url", SHARED_BROKER, "--exchange", &names.exchange];
    let out = blacktree(&[&["submit", "--json", typo.to_str().unwrap()][..], &exchange].concat());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(r#"unknown field "repoURL": did you mean "repoUrl"?"#),
        "{}",
        text(&out.stderr)
    );

    // A job from JSON on stdin keeps its own id.
    let mut submit = command()
        .args([
            "submit",
            "--amqp-url",
            SHARED_BROKER,
            "--exchange",
            &names.exchange,
            "--json",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let job = json!({"jobId": "cli-json-1", "repoUrl": "acme/app", "imageName": "acme/app:3"});
    std::io::Write::write_all(
        &mut submit.stdin.take().unwrap(),
        job.to_string().as_bytes(),
    )
    .unwrap();
    let out = submit.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout).trim(), "cli-json-1");
    assert_eq!(mq.statuses(1, LONG)[0]["jobId"], "cli-json-1");
}

#[test]
fn cancel_workers_and_healthcheck_talk_to_the_running_orchestrator() {
    let Setup { names, mq, orch } = Setup::new("cli-ops");
    let hold = Behaviour {
        run_time: Duration::from_secs(30),
        capacity: 2,
        ..Behaviour::default()
    };
    let w = orch.worker("ops-w", hold);
    mq.publish_job("ops-1", json!({}));
    poll(LONG, "the job to run", || {
        (w.observed.job_count() == 1).then_some(())
    });

    let addr = format!("127.0.0.1:{}", orch.grpc_port);
    let out = blacktree(&["workers", "--orchestrator", &addr, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let worker = &listed[0];
    assert_eq!(worker["id"], "ops-w");
    assert_eq!(worker["address"], format!("127.0.0.1:{}", w.port).as_str());
    assert_eq!(
        (worker["capacity"].as_i64(), worker["inFlight"].as_i64()),
        (Some(2), Some(1))
    );
    assert_eq!(worker["state"], "free", "one of two slots is free");
    let table = text(&blacktree(&["workers", "--orchestrator", &addr]).stdout);
    assert!(
        table.lines().nth(1).unwrap().starts_with("ops-w"),
        "{table}"
    );

    let out = blacktree(&[
        "cancel",
        "--amqp-url",
        SHARED_BROKER,
        "--exchange",
        &names.exchange,
        "ops-1",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(mq.statuses(1, LONG)[0]["outcome"], "cancelled");

    let out = blacktree(&["healthcheck", "--orchestrator", &addr]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dead = "127.0.0.1:1".to_string();
    let out = blacktree(&["healthcheck", "--worker", &dead]);
    assert_eq!(out.status.code(), Some(4), "unreachable");
    let reason = text(&out.stderr);
    assert_eq!(reason.lines().count(), 1, "{reason}");
    assert!(
        reason.contains(&dead) && reason.contains("cannot reach"),
        "{reason}"
    );
}

#[test]
fn unreachable_broker_or_orchestrator_give_a_clear_error_and_exit_code_4() {
    let out = blacktree(&[
        "submit",
        "--amqp-url",
        "amqp://guest:s3cret@127.0.0.1:1/%2f",
        "--repo",
        "a/b",
        "--image",
        "a/b:1",
    ]);
    assert_eq!(out.status.code(), Some(4));
    let message = text(&out.stderr);
    assert!(
        message.contains("127.0.0.1:1") && message.contains("MQ_URL"),
        "{message}"
    );
    assert!(!message.contains("s3cret"), "{message}");
    let out = blacktree(&["workers", "--orchestrator", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(text(&out.stderr).contains("cannot reach the orchestrator"));
    let out = blacktree(&["submit", "--json", "/nonexistent/job.json"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_second_instance_is_refused_and_a_restart_after_sigkill_is_not() {
    let names = Names::unique("cli-lock");
    let _mq = Mq::connect(SHARED_BROKER, &names);
    let dir = TempDir::new("lock");
    let lock = dir.0.join("orchestrator.lock");
    let lock = lock.to_str().unwrap();
    let mut first = Orchestrator::start(SHARED_BROKER, &names, &["--lock-file", lock]);

    let second = command()
        .args([
            "orchestrator",
            "--amqp-url",
            SHARED_BROKER,
            "--grpc-listen",
            "127.0.0.1:0",
            "--lock-file",
            lock,
        ])
        .args(names.args())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(3));
    assert!(
        text(&second.stderr).contains("already running"),
        "{}",
        text(&second.stderr)
    );
    let addr = format!("127.0.0.1:{}", first.grpc_port);
    assert!(
        blacktree(&["healthcheck", "--orchestrator", &addr])
            .status
            .success(),
        "the first one is undisturbed"
    );

    first.signal("KILL");
    first.wait_exit(LONG);
    let again = Orchestrator::start(SHARED_BROKER, &names, &["--lock-file", lock]);
    let addr = format!("127.0.0.1:{}", again.grpc_port);
    assert!(blacktree(&["healthcheck", "--orchestrator", &addr])
        .status
        .success());
}

#[test]
fn metrics_are_scraped_during_a_run_and_healthz_follows_the_broker() {
    let broker = common::PrivateBroker::start();
    let Setup { mq, orch, .. } = Setup::on(&broker, "metrics", &[]);
    let _w = orch.worker("metrics-w", Behaviour::default());
    for i in 0..5 {
        mq.publish_job(&format!("metrics-{i}"), json!({}));
    }
    mq.publish_raw(b"not json");
    mq.statuses(5, LONG);
    let port = orch.metrics_port;
    let metrics = poll(LONG, "the metrics to count every job", || {
        let (code, body) = http(port, "/metrics");
        assert_eq!(code, "200");
        (sample(
            &body,
            "blacktree_jobs_finished_total{outcome=\"succeeded\"}",
        ) == 5.0)
            .then_some(body)
    });
    assert_eq!(sample(&metrics, "blacktree_jobs_received_total"), 5.0);
    assert_eq!(sample(&metrics, "blacktree_jobs_dispatched_total"), 5.0);
    assert_eq!(sample(&metrics, "blacktree_jobs_rejected_total"), 1.0);
    assert_eq!(sample(&metrics, "blacktree_jobs_in_flight"), 0.0);
    assert_eq!(sample(&metrics, "blacktree_workers{state=\"free\"}"), 1.0);
    assert_eq!(
        sample(&metrics, "blacktree_dispatch_latency_seconds_count"),
        5.0
    );
    assert_eq!(
        sample(&metrics, "blacktree_job_duration_seconds_count"),
        5.0
    );
    assert_eq!(sample(&metrics, "blacktree_broker_connected"), 1.0);
    assert_eq!(workers_json(port)[0]["id"], "metrics-w");
    assert_eq!(http(port, "/healthz").0, "200");
    let healthz = format!("http://127.0.0.1:{port}/healthz");
    assert!(blacktree(&["healthcheck", "--metrics", &healthz])
        .status
        .success());

    // `mq`'s connection is cut below; it stays in scope so its queues stay too.
    broker.ctl(&["stop_app"]);
    poll(LONG, "/healthz to fail without the broker", || {
        (http(port, "/healthz").0 == "503").then_some(())
    });
    let out = blacktree(&["healthcheck", "--metrics", &healthz]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("503"), "{}", text(&out.stderr));
    broker.ctl(&["start_app"]);
    poll(LONG, "/healthz to recover", || {
        (http(port, "/healthz").0 == "200").then_some(())
    });
    let (_, metrics) = http(port, "/metrics");
    assert!(sample(&metrics, "blacktree_broker_reconnects_total") >= 1.0);
}

#[test]
fn with_a_registration_token_only_workers_that_send_it_may_register() {
    let dir = TempDir::new("regtoken");
    let token_file = dir.0.join("token");
    std::fs::write(&token_file, "reg-S3CRET-77\n").unwrap();
    let token_file = token_file.to_str().unwrap();
    let Setup { mq, orch, .. } =
        Setup::with_flags("cli-token", &["--registration-token-file", token_file]);

    let intruder = TestWorker::start("intruder-w", 0, Behaviour::default());
    for token in [None, Some("wrong-token")] {
        match intruder.try_register(orch.grpc_port, token) {
            Err(grpcio::Error::RpcFailure(s)) => {
                assert_eq!(s.code(), grpcio::RpcStatusCode::UNAUTHENTICATED)
            }
            other => panic!("registration without the token: {other:?}"),
        }
    }
    let worker = common::build_env::WorkerProcess::start(
        "trusted-w",
        orch.grpc_port,
        &[
            "--executor",
            "exec",
            "--exec-command",
            "true",
            "--registration-token-file",
            token_file,
        ],
    );
    orch.wait_for_log("worker trusted-w registered", LONG);
    mq.publish_job("token-1", json!({"repoUrl": ""}));
    let statuses = mq.statuses(1, LONG);
    assert_eq!(statuses[0]["workerId"], "trusted-w", "{statuses:?}");

    let addr = format!("127.0.0.1:{}", orch.grpc_port);
    let refused = blacktree(&["workers", "--orchestrator", &addr]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused.stderr).contains("registration-token-file"));
    let listed = blacktree(&[
        "workers",
        "--orchestrator",
        &addr,
        "--json",
        "--registration-token-file",
        token_file,
    ]);
    assert!(text(&listed.stdout).contains("trusted-w"));
    assert!(!text(&listed.stdout).contains("intruder-w"));
    for log in [orch.log(), worker.log(), text(&listed.stdout)] {
        assert!(!log.contains("reg-S3CRET-77"), "token leaked: {log}");
    }
    assert!(orch.log().contains("missing or wrong registration token"));
}

#[test]
fn the_log_lines_of_a_process_that_exits_at_once_reach_stderr_before_its_last_word() {
    // Lines that come together are written together: those of a process that ends
    // right after them must still all be there, in order, before the error it exits with.
    let dir = TempDir::new("cli-exit-log");
    let out = command()
        .args(["orchestrator", "--registration-token-file"])
        .arg(dir.0.join("no-such-token"))
        .arg("--lock-file")
        .arg(dir.0.join("orchestrator.lock"))
        .env("RUST_LOG", "info")
        .output()
        .expect("running blacktree");
    assert!(!out.status.success(), "a missing token file is an error");
    let err = text(&out.stderr);
    let position = |needle: &str| {
        err.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} is not in stderr: {err}"))
    };
    let starting = position("orchestrator starting");
    let logged_error = position("ERROR");
    let last_word = position("blacktree: ");
    assert!(
        starting < logged_error && logged_error < last_word,
        "the lines are out of order: {err}"
    );
}

#[test]
fn without_a_registration_token_the_orchestrator_warns_at_start() {
    let Setup { orch, .. } = Setup::new("cli-notoken");
    orch.wait_for_log("no --registration-token-file", LONG);
}

#[test]
fn grpc_runs_over_mutual_tls_and_refuses_peers_without_a_trusted_certificate() {
    use common::build_env::{Pki, WorkerProcess};
    let pki = Pki::new("bt");
    let stranger = Pki::new("stranger");
    let orch_tls = pki.issue("orchestrator");
    let flags: Vec<&str> = orch_tls.iter().map(String::as_str).collect();
    let Setup { mq, orch, .. } = Setup::with_flags("cli-tls", &flags);
    let addr = format!("127.0.0.1:{}", orch.grpc_port);

    let worker_tls = pki.issue("worker");
    let mut args = vec!["--executor", "exec", "--exec-command", "echo over tls"];
    args.extend(worker_tls.iter().map(String::as_str));
    let worker = WorkerProcess::start("tls-w", orch.grpc_port, &args);
    orch.wait_for_log("worker tls-w registered", LONG);
    mq.publish_job("tls-1", json!({"repoUrl": ""}));
    let statuses = mq.statuses(1, LONG);
    assert_eq!(statuses[0]["outcome"], "succeeded", "{statuses:?}");
    assert!(statuses[0]["logs"].as_str().unwrap().contains("over tls"));

    let cli_tls = pki.issue("operator");
    let mut check = vec!["healthcheck", "--orchestrator", addr.as_str()];
    check.extend(cli_tls.iter().map(String::as_str));
    assert!(blacktree(&check).status.success(), "healthcheck over TLS");
    let worker_addr = format!("127.0.0.1:{}", worker.port);
    let mut check_worker = vec!["healthcheck", "--worker", worker_addr.as_str()];
    check_worker.extend(cli_tls.iter().map(String::as_str));
    assert!(
        blacktree(&check_worker).status.success(),
        "the worker serves TLS too"
    );
    assert_eq!(
        blacktree(&["healthcheck", "--orchestrator", &addr])
            .status
            .code(),
        Some(4),
        "plaintext is refused: no connection"
    );

    let untrusted = stranger.issue("untrusted");
    let mut args = vec!["--executor", "exec", "--exec-command", "true"];
    args.extend(untrusted.iter().map(String::as_str));
    let intruder = WorkerProcess::start("untrusted-w", orch.grpc_port, &args);
    poll(LONG, "the untrusted worker to fail registering", || {
        intruder.log().contains("cannot register").then_some(())
    });
    let plain = TestWorker::start("plain-w", 0, Behaviour::default());
    assert!(
        plain.try_register(orch.grpc_port, None).is_err(),
        "plaintext registration is refused"
    );
    let mut list = vec!["workers", "--json", "--orchestrator", addr.as_str()];
    list.extend(cli_tls.iter().map(String::as_str));
    let listed = text(&blacktree(&list).stdout);
    assert!(
        listed.contains("tls-w") && !listed.contains("untrusted-w") && !listed.contains("plain-w"),
        "{listed}"
    );
}

#[test]
fn the_orchestrator_talks_to_rabbitmq_over_amqps() {
    use common::build_env::Pki;
    let pki = Pki::new("amqps");
    let files = pki.issue("broker");
    let (cert, key) = (files[1].clone(), files[3].clone());
    let broker = common::PrivateBroker::start_with_tls(Some((pki.ca(), cert, key)));
    let names = Names::unique("amqps");
    let mq = Mq::connect(&broker.url(), &names);
    // A bundle whose first certificate is another CA: every one of them is trusted.
    let other = Pki::new("other");
    let bundle = pki.dir.0.join("bundle.pem");
    let pems = [other.ca(), pki.ca()].map(|f| std::fs::read_to_string(f).unwrap());
    std::fs::write(&bundle, pems.concat()).unwrap();
    let amqps = format!(
        "amqps://guest:guest@127.0.0.1:{}/%2f?cacertfile={}",
        broker.tls_port,
        bundle.display()
    );
    poll(LONG, "the TLS listener", || {
        std::net::TcpStream::connect(("127.0.0.1", broker.tls_port)).ok()
    });
    let orch = Orchestrator::start(&amqps, &names, &[]);
    let _w = orch.worker("amqps-w", Behaviour::default());
    mq.publish_job("amqps-1", json!({}));
    assert_eq!(mq.statuses(1, LONG)[0]["outcome"], "succeeded");
    assert!(orch.log().contains(&format!(
        "connected to amqps://guest:***@127.0.0.1:{}",
        broker.tls_port
    )));

    // Without the CA the broker's certificate is not trusted.
    let untrusted = format!("amqps://guest:guest@127.0.0.1:{}/%2f", broker.tls_port);
    let out = blacktree(&[
        "cancel",
        "--amqp-url",
        &untrusted,
        "--exchange",
        &names.exchange,
        "x",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
}

#[test]
fn healthcheck_and_workers_tell_the_roles_apart_and_a_worker_serves_once_registered() {
    let check = |args: &[&str]| {
        let out = blacktree(args);
        (out.status.code(), text(&out.stderr))
    };
    // A worker whose orchestrator is not there yet answers NOT_SERVING (1), not 4.
    let orchestrator_port = free_port();
    let worker = WorkerProcess::start(
        "health-w",
        orchestrator_port,
        &["--executor", "exec", "--exec-command", "true"],
    );
    let worker_addr = format!("127.0.0.1:{}", worker.port);
    let (code, why) = check(&["healthcheck", "--worker", &worker_addr]);
    assert_eq!(code, Some(1), "{why}");
    assert!(why.contains("NOT_SERVING"), "{why}");

    let names = Names::unique("cli-health");
    let _mq = Mq::connect(SHARED_BROKER, &names);
    let orch_addr = format!("127.0.0.1:{orchestrator_port}");
    let _orch = Orchestrator::start(SHARED_BROKER, &names, &["--grpc-listen", &orch_addr]);
    poll(LONG, "the worker to serve once registered", || {
        (check(&["healthcheck", "--worker", &worker_addr]).0 == Some(0)).then_some(())
    });
    assert_eq!(
        check(&["healthcheck", "--orchestrator", &orch_addr]).0,
        Some(0)
    );
    // Each role has its named service, so a probe pointed at the other role says so.
    let (code, why) = check(&["healthcheck", "--orchestrator", &worker_addr]);
    assert_eq!(code, Some(1));
    assert!(
        why.contains("is a worker of Blacktree's, not an orchestrator"),
        "{why}"
    );
    let (code, why) = check(&["healthcheck", "--worker", &orch_addr]);
    assert_eq!(code, Some(1));
    assert!(
        why.contains("is an orchestrator of Blacktree's, not a worker"),
        "{why}"
    );
    for service in ["", "blacktree.Worker"] {
        let args = [
            "healthcheck",
            "--worker",
            &worker_addr,
            "--service",
            service,
        ];
        assert_eq!(check(&args).0, Some(0), "service {service:?}");
    }
    let (code, why) = check(&["healthcheck", "--worker", &worker_addr, "--service", "nope"]);
    assert_eq!(code, Some(1));
    assert!(why.contains("no health service \"nope\""), "{why}");
    // A worker's address where an orchestrator is expected: said so, by the CLI and by
    // a worker told to register there.
    let (code, why) = check(&["workers", "--orchestrator", &worker_addr]);
    assert_eq!(code, Some(1), "{why}");
    assert!(why.contains("is not a Blacktree orchestrator"), "{why}");
    let misdirected = WorkerProcess::start(
        "misdirected-w",
        worker.port,
        &["--executor", "exec", "--exec-command", "true"],
    );
    misdirected.wait_for_log("is not a Blacktree orchestrator", LONG);
}

#[test]
fn submit_wait_and_watch_job_exit_by_the_outcome_and_submit_refuses_an_unroutable_job() {
    let ok = Setup::new("cli-wait");
    let _w = ok.worker("wait-w", Behaviour::default());
    let failing = Setup::new("cli-wait-fail");
    let broken = Behaviour {
        fail_with: Some("the build broke".into()),
        ..Behaviour::default()
    };
    let _f = failing.worker("wait-f", broken);
    let submit = |setup: &Setup, extra: &[&str]| {
        let exchange = setup.mq.names.exchange.as_str();
        let base = [
            "submit",
            "--amqp-url",
            SHARED_BROKER,
            "--exchange",
            exchange,
            "--repo",
            "acme/app",
            "--image",
            "acme/app:1",
        ];
        blacktree(&[&base[..], extra].concat())
    };
    // Succeeded: exit 0, the status line on stdout.
    let out = submit(&ok, &["--wait", "--job-id", "wait-ok", "--timeout", "1m"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.starts_with("wait-ok succeeded worker=wait-w "),
        "{shown}"
    );
    // `--output json`: the status as JSON.
    let out = submit(
        &ok,
        &["--wait", "--job-id", "wait-json", "--output", "json"],
    );
    let status: Value = serde_json::from_slice(&out.stdout).expect("one JSON status");
    assert_eq!(status["outcome"], "succeeded");
    assert_eq!(ok.mq.statuses(2, LONG).len(), 2);

    // A failed job: exit 1; `watch --job` for it (started before it ends) too.
    let exchange = failing.mq.names.exchange.as_str();
    let watch = Watch::start(&[
        "watch",
        "--amqp-url",
        SHARED_BROKER,
        "--exchange",
        exchange,
        "--job",
        "wait-fail",
        "--json",
    ]);
    let out = submit(&failing, &["--wait", "--job-id", "wait-fail"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.starts_with("wait-fail failed "), "{shown}");
    assert!(text(&out.stderr).contains("job wait-fail ended failed"));
    let (code, watched, _) = watch.finish();
    assert_eq!(code, Some(1));
    let line: Value = serde_json::from_str(watched.trim()).expect("one JSON line");
    assert_eq!(line["type"], "status");
    assert_eq!(line["jobId"], "wait-fail");

    // A routing key no queue is bound to: an error naming it, no jobId printed.
    let out = submit(&ok, &["--execute-key", "worker.exceute"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).is_empty());
    let why = text(&out.stderr);
    assert!(
        why.contains("no queue is bound")
            && why.contains("worker.exceute")
            && why.contains("--execute-key"),
        "{why}"
    );
    // An exchange that does not exist: said so.
    let out = blacktree(&[
        "submit",
        "--amqp-url",
        SHARED_BROKER,
        "--exchange",
        "bt.nowhere.x",
        "--repo",
        "a/b",
        "--image",
        "a:b",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let why = text(&out.stderr);
    assert!(
        why.contains("the exchange bt.nowhere.x does not exist"),
        "{why}"
    );
    ok.mq.assert_no_more_statuses();
}

/// A `blacktree watch` running beside the test, started once it listens.
struct Watch {
    child: std::process::Child,
    stderr: BufReader<std::process::ChildStderr>,
}

impl Watch {
    /// Starts `blacktree args…` and waits for its `watching …` line.
    fn start(args: &[&str]) -> Watch {
        let mut child = command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        stderr.read_line(&mut first).unwrap();
        assert!(first.starts_with("watching"), "{first}");
        Watch { child, stderr }
    }

    /// Waits for it to end: its exit code, standard output and the rest of its stderr.
    fn finish(mut self) -> (Option<i32>, String, String) {
        let mut stdout = String::new();
        let mut out = self.child.stdout.take().unwrap();
        out.read_to_string(&mut stdout).unwrap();
        let mut rest = String::new();
        self.stderr.read_to_string(&mut rest).unwrap();
        (self.child.wait().unwrap().code(), stdout, rest)
    }
}

#[test]
fn json_logs_are_one_object_per_line_with_the_ids_and_without_timestamps_when_asked() {
    let flags = [
        "--log-format",
        "json",
        "--log-timestamps",
        "never",
        "--instance-id",
        "orch-json",
    ];
    let setup = Setup::with_flags("cli-jsonlog", &flags);
    let _w = setup.worker("jsonlog-w", Behaviour::default());
    setup.mq.publish_job("jsonlog-1", json!({}));
    assert_eq!(setup.mq.statuses(1, LONG)[0]["outcome"], "succeeded");
    // Written by whichever thread writes logs then: maybe just after the status.
    setup.orch.wait_for_log("succeeded on worker", LONG);
    let log = setup.orch.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(|l| l.get("time").is_none()), "{log}");
    let finished = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap()
                .contains("succeeded on worker")
        })
        .unwrap_or_else(|| panic!("no line of the job's end (lowercase outcome): {log}"));
    assert_eq!(finished["jobId"], "jsonlog-1");
    assert_eq!(finished["workerId"], "jsonlog-w");
    assert_eq!(finished["orchestratorId"], "orch-json");
    assert_eq!(finished["level"], "INFO");
}
