//! Hostile and careless peers (issue 13), against the real orchestrator, the real
//! `blacktree worker` and real gRPC: calls without the token, ids taken over, absurd
//! registrations, secrets too short to be real.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use blacktree::proto::job::{CancelJobRequest, JobRequest, PingRequest};
use blacktree::proto::worker::WorkerInfo;
use common::build_env::{TempDir, WorkerProcess};
use common::*;
use grpcio::{CallOption, RpcStatusCode};
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);

/// The gRPC status code of a failed call; panics when the call succeeded.
fn code_of<T: std::fmt::Debug>(result: grpcio::Result<T>) -> RpcStatusCode {
    match result {
        Err(grpcio::Error::RpcFailure(status)) => status.code(),
        other => panic!("the call was not refused: {other:?}"),
    }
}

/// A token file in `dir`.
fn token_file(dir: &TempDir, token: &str) -> String {
    let path = dir.0.join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_worker_with_a_token_serves_only_calls_that_carry_it_and_the_orchestrator_sends_it() {
    let dir = TempDir::new("worker-token");
    let secret = "wrk-T0KEN-8812";
    let token = token_file(&dir, secret);
    let Setup { mq, orch, .. } =
        Setup::with_flags("h-wtoken", &["--registration-token-file", &token]);
    let exec = ["--executor", "exec", "--exec-command", "echo built"];
    let worker = WorkerProcess::start(
        "tok-w",
        orch.grpc_port,
        &[&exec[..], &["--registration-token-file", &token]].concat(),
    );
    orch.wait_for_log("worker tok-w registered", LONG);

    // A plain client, with no token or a wrong one: nothing runs, nothing answers.
    let client = job_client(worker.port);
    let job = JobRequest {
        jobId: "stolen-1".into(),
        imageName: "acme/app:prod".into(),
        ..JobRequest::default()
    };
    for wrong in [
        None,
        Some("wrong"),
        Some("wrk-T0KEN-881"),
        Some("wrk-T0KEN-88123"),
    ] {
        let wrong = wrong.map(|t| blacktree::job::Secret::new(t.into()));
        let options =
            || blacktree::grpc::with_token(CallOption::default().timeout(LONG), wrong.as_ref());
        assert_eq!(
            code_of(client.run_job_opt(&job, options())),
            RpcStatusCode::UNAUTHENTICATED
        );
        assert_eq!(
            code_of(client.ping_opt(&PingRequest::default(), options())),
            RpcStatusCode::UNAUTHENTICATED
        );
        let cancel = CancelJobRequest {
            jobId: "stolen-1".into(),
            ..CancelJobRequest::default()
        };
        assert_eq!(
            code_of(client.cancel_job_opt(&cancel, options())),
            RpcStatusCode::UNAUTHENTICATED
        );
    }
    assert!(!worker.log().contains("job stolen-1"), "{}", worker.log());
    worker.wait_for_log("refused a /job.JobService/RunJob call", LONG);

    // The orchestrator's calls carry the token: pings keep it healthy, jobs run.
    mq.publish_job("token-job-1", json!({"repoUrl": ""}));
    let status = &mq.statuses(1, LONG)[0];
    assert_eq!(status["outcome"], "succeeded", "{status}");
    assert_eq!(status["workerId"], "tok-w");
    for log in [orch.log(), worker.log()] {
        assert!(!log.contains(secret), "the token leaked: {log}");
    }

    let open = WorkerProcess::start("open-w", orch.grpc_port, &exec);
    assert!(
        open.log()
            .contains("neither --registration-token-file nor TLS"),
        "{}",
        open.log()
    );
}

#[test]
fn a_live_workers_id_cannot_be_taken_over_but_a_dead_ones_can() {
    let Setup { mq, orch, .. } = Setup::new("h-takeover");
    let mut victim = orch.worker("victim-w", Behaviour::default());
    let thief = TestWorker::start("victim-w", 0, Behaviour::default());
    assert_eq!(
        code_of(thief.try_register(orch.grpc_port, None)),
        RpcStatusCode::ALREADY_EXISTS
    );
    orch.wait_for_log("still answers as victim-w", LONG);
    // The worker itself registering again from its own address is always welcome.
    assert!(victim.try_register(orch.grpc_port, None).unwrap().success);
    mq.publish_job("takeover-1", json!({}));
    let status = &mq.statuses(1, LONG)[0];
    assert_eq!(status["outcome"], "succeeded", "{status}");
    assert_eq!(
        (victim.observed.job_count(), thief.observed.job_count()),
        (1, 0)
    );

    // Once the address no longer answers, the id may move.
    victim.kill();
    assert!(thief.try_register(orch.grpc_port, None).unwrap().success);
    let listed = workers_json(orch.metrics_port);
    assert_eq!(listed[0]["address"], format!("127.0.0.1:{}", thief.port));
    mq.publish_job("takeover-2", json!({}));
    let status = &mq.statuses(1, LONG)[0];
    assert_eq!(status["outcome"], "succeeded", "{status}");
    assert_eq!(thief.observed.job_count(), 1);

    // An address where another worker now answers does not hold the id either.
    let mut thief = thief;
    thief.kill();
    let _other = TestWorker::start("someone-else", thief.port, Behaviour::default());
    let third = TestWorker::start("victim-w", 0, Behaviour::default());
    assert!(third.try_register(orch.grpc_port, None).unwrap().success);
}

#[test]
fn absurd_capacities_oversized_fields_and_too_many_workers_are_refused() {
    let Setup { orch, .. } = Setup::with_flags("h-bounds", &["--max-workers", "2"]);
    let info = |id: &str, capacity: i32| WorkerInfo {
        id: id.into(),
        ip: "127.0.0.1".into(),
        port: 1,
        capacity,
        ..WorkerInfo::default()
    };
    let ack = register_as(orch.grpc_port, &info("huge-w", 50_000_000), None).unwrap();
    assert!(
        !ack.success && ack.message.contains("--max-worker-capacity 64"),
        "{ack:?}"
    );
    let region = WorkerInfo {
        region: "r".repeat(2_000_000),
        ..info("region-w", 1)
    };
    let ack = register_as(orch.grpc_port, &region, None).unwrap();
    assert!(!ack.success && ack.message.contains("region"), "{ack:?}");
    let hostile_ip = WorkerInfo {
        ip: "10.0.0.1\n2026-12-02 INFO worker admin registered".into(),
        ..info("ip-w", 1)
    };
    assert!(
        !register_as(orch.grpc_port, &hostile_ip, None)
            .unwrap()
            .success
    );
    let long_id = info(&"i".repeat(256), 1);
    assert!(!register_as(orch.grpc_port, &long_id, None).unwrap().success);

    assert!(
        register_as(orch.grpc_port, &info("one-w", 64), None)
            .unwrap()
            .success
    );
    assert!(
        register_as(orch.grpc_port, &info("two-w", 1), None)
            .unwrap()
            .success
    );
    assert_eq!(
        code_of(register_as(orch.grpc_port, &info("three-w", 1), None)),
        RpcStatusCode::RESOURCE_EXHAUSTED
    );
    // A known id may register again when the registry is full.
    assert!(
        register_as(orch.grpc_port, &info("two-w", 2), None)
            .unwrap()
            .success
    );
    let ids: Vec<String> = worker_states(orch.metrics_port)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, ["one-w", "two-w"]);
    let log = orch.log();
    assert!(
        !log.contains("rrrrrrrr") && !log.contains("admin registered"),
        "{log}"
    );
}

#[test]
fn a_token_too_short_to_be_real_does_not_mangle_image_urls_or_logs() {
    let Setup { mq, orch, .. } = Setup::new("h-short");
    let worker = orch.worker("short-w", Behaviour::default());
    mq.publish_job(
        "short-1",
        json!({"githubToken": "t", "imageName": "acme/test:1"}),
    );
    let status = &mq.statuses(1, LONG)[0];
    assert_eq!(status["imageUrl"], "registry.test/acme/test:1", "{status}");
    assert_eq!(status["logs"], "built short-1 on short-w with token t");
    assert_eq!(worker.observed.jobs.lock().unwrap().len(), 1);
    orch.wait_for_log("too short to be a real secret", LONG);
    assert_eq!(worker.observed.max_in_flight.load(Ordering::SeqCst), 1);
}

#[test]
fn a_job_a_worker_already_runs_goes_to_it_and_is_attached_to_not_failed_or_run_twice() {
    let Setup { mq, orch, .. } = Setup::new("h-exists");
    let exec = ["--executor", "exec", "--exec-command", "sleep 1; echo ran"];
    let args = [&exec[..], &["--capacity", "2"]].concat();
    let worker = WorkerProcess::start("dup-w", orch.grpc_port, &args);
    let other = WorkerProcess::start("dup-other", orch.grpc_port, &args);
    for id in ["dup-w", "dup-other"] {
        orch.wait_for_log(&format!("worker {id} registered"), LONG);
    }
    // Someone else's call runs dup-1 on dup-w when the job is published.
    let client = job_client(worker.port);
    let job = JobRequest {
        jobId: "dup-1".into(),
        ..JobRequest::default()
    };
    let first = client
        .run_job_async_opt(&job, CallOption::default().timeout(LONG))
        .unwrap();
    poll(LONG, "dup-w to report dup-1 to the orchestrator", || {
        workers_json(orch.metrics_port)
            .iter()
            .any(|w| w["id"] == "dup-w" && w["inFlight"] == 1)
            .then_some(())
    });
    mq.publish_job("dup-1", json!({"repoUrl": ""}));
    orch.wait_for_log("job dup-1: adopted from worker dup-w", LONG);
    worker.wait_for_log("job dup-1: a call attached to the running job", LONG);
    assert!(common::futures_block_on(first).unwrap().success);
    let status = &mq.statuses(1, LONG)[0];
    assert_eq!(status["outcome"], "succeeded", "not failed: {status}");
    assert_eq!(status["workerId"], "dup-w", "{status}");
    mq.assert_no_more_statuses();
    assert_eq!(
        worker.log().matches("job dup-1: started").count(),
        1,
        "run once: {}",
        worker.log()
    );
    assert!(!other.log().contains("job dup-1"), "{}", other.log());
}

/// A worker whose every answer carries `bytes` of logs ending in `THE END`.
fn verbose(bytes: usize) -> Behaviour {
    Behaviour {
        log_bytes: bytes,
        ..Behaviour::default()
    }
}

#[test]
fn a_status_too_large_for_the_broker_is_cut_or_sent_without_logs_and_others_keep_flowing() {
    let broker = PrivateBroker::start_with_conf("max_message_size = 1048576");
    // At the default --max-status-bytes (1 MiB) the logs lose their start.
    let Setup { mq, orch, .. } = Setup::on(&broker, "h-cap", &[]);
    let _w = orch.worker("cap-w", verbose(1_500_000));
    mq.publish_job("cap-1", json!({}));
    let status = &mq.statuses(1, LONG)[0];
    let logs = status["logs"].as_str().unwrap();
    assert!(
        logs.starts_with("[... ") && logs.ends_with("THE END") && logs.len() < 1_048_576,
        "{:.200}",
        logs
    );
    assert_eq!(status["outcome"], "succeeded");
    mq.assert_no_more_statuses();
    drop(orch);

    // Set above what the broker takes: it refuses the status (closing the channel) until
    // the status goes without its logs; the statuses after it are not held up.
    let Setup { mq, orch, .. } =
        Setup::on(&broker, "h-refused", &["--max-status-bytes", "4000000"]);
    let worker = orch.worker("big-w", verbose(1_500_000));
    mq.publish_job("big-1", json!({}));
    orch.wait_for_log("sending it without its logs", LONG);
    let status = &mq.statuses(1, LONG)[0];
    assert_eq!(
        (status["jobId"].as_str(), status["logs"].as_str()),
        (Some("big-1"), Some("")),
        "{status}"
    );
    assert!(
        status["error"].as_str().unwrap().contains("refused"),
        "{status}"
    );
    worker.behaviour.lock().unwrap().log_bytes = 0;
    mq.publish_job("big-2", json!({}));
    assert_eq!(mq.statuses(1, LONG)[0]["jobId"], "big-2");
    mq.assert_no_more_statuses();
    let metrics = http(orch.metrics_port, "/metrics").1;
    assert_eq!(sample(&metrics, "blacktree_statuses_shrunk_total"), 1.0);
}

#[test]
fn a_status_with_nowhere_to_go_keeps_its_job_unacked_until_it_can_be_routed() {
    let Setup { names, mq, orch } = Setup::new("h-mandatory");
    let _w = orch.worker("route-w", Behaviour::default());
    mq.bind_status_queue(false);
    mq.publish_job("route-1", json!({}));
    orch.wait_for_log("returned it as unroutable", LONG);
    let metrics = http(orch.metrics_port, "/metrics").1;
    assert!(sample(&metrics, "blacktree_statuses_unroutable_total") >= 1.0);
    assert_eq!(
        mq.counts(&names.execute),
        (0, 1),
        "the job is still unacked"
    );
    mq.bind_status_queue(true);
    let status = &mq.statuses(1, LONG)[0];
    assert_eq!(status["jobId"], "route-1");
    mq.wait_all_acked(&names.execute);
    mq.assert_no_more_statuses();
}

#[test]
fn jobs_interleaved_with_unknown_and_malformed_cancels_each_end_once_without_channel_errors() {
    // Answers at once, so statuses and rejected copies are confirmed in the same
    // batches while deliveries of both queues are still arriving.
    let Setup { names, mq, orch } = Setup::new("h-interleave");
    let worker = Behaviour {
        capacity: 16,
        run_time: Duration::ZERO,
        ..Behaviour::default()
    };
    let _w = orch.worker("mix-w", worker);
    let ids: Vec<String> = (0..300).map(|i| format!("mix-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        mq.publish_job(id, json!({}));
        mq.publish_cancel(&format!("unknown-{i}"));
        mq.publish_raw_cancel(b"{not json");
    }
    let statuses = mq.statuses(ids.len(), LONG);
    let mut seen: Vec<&str> = statuses
        .iter()
        .map(|s| s["jobId"].as_str().unwrap())
        .collect();
    seen.sort_unstable();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(seen, expected, "one status per job");
    assert!(statuses.iter().all(|s| s["outcome"] == "succeeded"));
    mq.assert_no_more_statuses();
    mq.wait_all_acked(&names.cancel);
    let log = orch.log();
    assert!(!log.contains("connection 1 lost"), "{log}");
    assert!(
        log.contains("broker: connected") && !log.contains("connection 2)"),
        "{log}"
    );
}

#[test]
fn a_job_cancelled_while_it_waits_for_a_dispatch_thread_ends_cancelled_on_a_drain() {
    let (release, gate) = crossbeam_channel::bounded::<()>(0);
    let Setup {
        names,
        mq,
        mut orch,
    } = Setup::with_flags(
        "h-cancel-drain",
        &["--dispatch-threads", "1", "--prefetch", "4"],
    );
    let held = Behaviour {
        gate: Some(gate),
        ..Behaviour::default()
    };
    let worker = orch.worker("held-w", held);
    mq.publish_job("held-1", json!({}));
    poll(LONG, "held-1 to run", || {
        (worker.observed.job_count() == 1).then_some(())
    });
    // The one dispatch thread is busy: waiting-1 waits in the jobs channel.
    mq.publish_job("waiting-1", json!({}));
    orch.wait_for_log("job waiting-1: received", LONG);
    mq.publish_cancel("waiting-1");
    orch.wait_for_log("job waiting-1: cancel requested", LONG);
    orch.signal("TERM");
    orch.wait_for_log("draining:", LONG);
    drop(release);
    let statuses = mq.statuses(2, LONG);
    let outcome = |id: &str| {
        let status = statuses.iter().find(|s| s["jobId"] == id);
        status.map(|s| s["outcome"].as_str().unwrap().to_string())
    };
    assert_eq!(
        outcome("waiting-1").as_deref(),
        Some("cancelled"),
        "{statuses:?}"
    );
    assert_eq!(
        outcome("held-1").as_deref(),
        Some("succeeded"),
        "{statuses:?}"
    );
    assert_eq!(orch.wait_exit(LONG), Some(0));
    assert_eq!(
        mq.counts(&names.execute),
        (0, 0),
        "nothing went back to the queue"
    );
    assert_eq!(worker.observed.job_count(), 1, "waiting-1 never ran");
}

#[test]
fn under_a_broker_alarm_the_orchestrator_says_so_drains_on_time_and_loses_nothing() {
    let broker = PrivateBroker::start();
    let (release, gate) = crossbeam_channel::bounded::<()>(0);
    let Setup {
        names,
        mq,
        mut orch,
    } = Setup::on(&broker, "h-alarm", &["--drain-timeout", "3s"]);
    let held = Behaviour {
        gate: Some(gate),
        ..Behaviour::default()
    };
    let worker = orch.worker("alarm-w", held);
    mq.publish_job("alarm-1", json!({}));
    poll(LONG, "alarm-1 to run", || {
        (worker.observed.job_count() == 1).then_some(())
    });
    // A disk alarm blocks every connection that publishes: the status waits.
    broker.ctl(&["set_disk_free_limit", "1000GB"]);
    drop(release);
    let port = orch.metrics_port;
    poll(LONG, "/healthz to say the broker blocks us", || {
        let (code, body) = http(port, "/healthz");
        (code == "503" && body.contains("blocks publishing")).then_some(())
    });
    let metrics = http(port, "/metrics").1;
    assert_eq!(sample(&metrics, "blacktree_broker_blocked"), 1.0);
    // The drain cannot confirm the status; it gives up at --drain-timeout.
    orch.signal("TERM");
    assert_eq!(
        orch.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        orch.log()
    );
    broker.ctl(&["set_disk_free_limit", "50MB"]);
    // Nothing lost: the job is still on the queue for the next orchestrator.
    let next = Orchestrator::start(&broker.url(), &names, &[]);
    let _w = next.worker("alarm-w2", Behaviour::default());
    let statuses = mq.statuses_until(LONG, |s| s.iter().any(|s| s["jobId"] == "alarm-1"));
    assert!(
        statuses
            .iter()
            .any(|s| s["jobId"] == "alarm-1" && s["outcome"] == "succeeded"),
        "{statuses:?}"
    );
}

/// The SETTINGS_MAX_CONCURRENT_STREAMS (0x3) a plaintext HTTP/2 server on
/// `127.0.0.1:port` advertises in its first SETTINGS frame, if any: the client preface
/// and an empty SETTINGS frame are sent, frames are read until the server's SETTINGS.
fn advertised_max_streams(port: u16) -> Option<u32> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(LONG)).unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .unwrap();
    // length 0, type SETTINGS (4), no flags, stream 0.
    stream.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    loop {
        let mut header = [0u8; 9];
        stream.read_exact(&mut header).unwrap();
        let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0; length];
        stream.read_exact(&mut payload).unwrap();
        let (kind, ack) = (header[3], header[4] & 1 == 1);
        if kind == 4 && !ack {
            return payload
                .chunks_exact(6)
                .find(|s| u16::from_be_bytes([s[0], s[1]]) == 3)
                .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
        }
    }
}

#[test]
fn both_grpc_servers_bound_the_concurrent_streams_of_a_connection() {
    // HTTP/2 rapid reset (CVE-2023-44487) costs the server per stream a peer opens: each
    // server advertises (and the gRPC core enforces) at most 256 at once per connection.
    let Setup { orch, .. } = Setup::new("streams");
    let worker = WorkerProcess::start("streams-w", orch.grpc_port, &[]);
    orch.wait_for_log("worker streams-w registered", LONG);
    for (server, port) in [("orchestrator", orch.grpc_port), ("worker", worker.port)] {
        assert_eq!(
            advertised_max_streams(port),
            Some(256),
            "the {server}'s gRPC server does not bound concurrent streams"
        );
    }
}
