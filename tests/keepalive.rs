//! HTTP/2 keepalive on the worker connections, against a real Go gRPC server (issue 19):
//! the orchestrator's keepalive PINGs during a long `RunJob` are accepted by grpc-go's
//! DEFAULT keepalive enforcement (MinTime 5 minutes, no pings without a call, GOAWAY
//! ENHANCE_YOUR_CALM "too_many_pings" after more than 2 strikes), which is what the
//! deployed Go workers run. The worker is `tests/fixtures/go-worker` (Debian's grpc-go),
//! the orchestrator the real binary, the broker the machine's.

mod common;

use std::time::{Duration, Instant};

use common::go_worker::GoWorker;
use common::*;
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);

/// What gRPC C-core's `http_keepalive` tracer logs (INFO, with the peer's address) each
/// time the transport sends a keepalive PING (chttp2_transport.cc,
/// start_keepalive_ping_locked). grpcio does not redirect C-core's log: it goes to the
/// orchestrator's stderr, which the harness collects.
const KEEPALIVE_PING_SENT: &str = "Start keepalive ping";

/// Keepalive PINGs the orchestrator's log says it sent to `127.0.0.1:port`.
fn keepalive_pings_to(log: &str, port: u16) -> usize {
    let peer = format!("127.0.0.1:{port}:");
    log.lines()
        .filter(|line| line.contains(KEEPALIVE_PING_SENT) && line.contains(&peer))
        .count()
}

#[test]
fn keepalive_pings_during_a_long_run_job_are_accepted_by_a_go_server_with_its_default_policy() {
    let run_time = Duration::from_secs(8);
    let worker = GoWorker::start("go-ka", run_time);
    let names = Names::unique("keepalive");
    let mq = Mq::connect(SHARED_BROKER, &names);
    let static_worker = worker.static_worker();
    // Keepalive after a second without a byte received (a third of --lost-after).
    // Health rounds every 3 s, further apart than that: C-core restarts its keepalive
    // timer whenever it reads from the connection, so answers more often leave no
    // keepalive PING to send (with the harness's 200 ms rounds this test sees none).
    // C-core also sends at most 2 PINGs (http2 max_pings_without_data) until it sends
    // data again, which each health Ping does: about 2 keepalive PINGs per round, ~5
    // during the 8 s call (measured: 5). On the Go side each health answer (headers and
    // data it writes) clears the strikes, and the PINGs between two answers (BDP PINGs
    // included) make at most 2 strikes, not the 3 that make it send GOAWAY, as long as
    // it answers a health Ping within a second.
    let orch = Orchestrator::start_with_env(
        SHARED_BROKER,
        &names,
        &[
            "--lost-after",
            "3s",
            "--health-interval",
            "3s",
            "--health-timeout",
            "1s",
            "--worker",
            &static_worker,
        ],
        &[
            ("GRPC_TRACE", "http_keepalive"),
            ("GRPC_VERBOSITY", "DEBUG"),
        ],
    );
    poll(LONG, "the Go worker to answer a health ping", || {
        (state_of(orch.metrics_port, &worker.id).as_deref() == Some("free")).then_some(())
    });

    mq.publish_job("ka-1", json!({}));
    orch.wait_for_log("job ka-1: dispatched to worker go-ka", LONG);
    let dispatched = Instant::now();
    let pings_before = keepalive_pings_to(&orch.log(), worker.port);
    let status = mq.statuses(1, LONG).remove(0);
    let call_time = dispatched.elapsed();
    let orch_log = orch.log();
    let pings_during = keepalive_pings_to(&orch_log, worker.port) - pings_before;

    // A GOAWAY too_many_pings would have failed the call: worker_lost.
    assert_eq!(
        (&status["outcome"], &status["workerId"]),
        (&json!("succeeded"), &json!("go-ka")),
        "{status}\norchestrator log:\n{orch_log}\nGo worker log:\n{}",
        worker.log()
    );
    worker.wait_for_log("job ka-1: finished", LONG);
    assert!(
        call_time >= run_time - Duration::from_millis(500),
        "the call took {call_time:?}, not the worker's {run_time:?}"
    );
    let go_log = worker.log();
    for needle in ["too many pings", "too_many_pings", "enhance_your_calm"] {
        assert!(
            !go_log.to_lowercase().contains(needle),
            "the Go server objected to the PINGs ({needle}):\n{go_log}"
        );
    }
    assert!(
        !orch_log.contains("too_many_pings"),
        "the orchestrator got a GOAWAY too_many_pings:\n{orch_log}"
    );
    // Keepalive did run during the call (not just the health pings).
    assert!(
        pings_during >= 3,
        "{pings_during} keepalive PINGs during the {call_time:?} call, expected at least 3:\n{orch_log}"
    );
    eprintln!("{pings_during} keepalive PINGs during the {call_time:?} call");
}
