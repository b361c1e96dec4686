//! A slow worker is not a dead worker (issue 19): failed pings take a worker out of
//! rotation within seconds, but its running builds are given up only after
//! `--lost-after` of silence, or at once when their connection fails. Real gRPC workers
//! (one in this process whose pings are slow, real `blacktree worker` processes frozen,
//! killed, or cut off by iptables as a vanished host would be) and the real broker.

mod common;

use std::time::{Duration, Instant};

use common::build_env::{sh, WorkerProcess};
use common::partition::Partition;
use common::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

fn metric(port: u16, name: &str) -> f64 {
    sample(&http(port, "/metrics").1, name)
}

#[test]
fn a_worker_with_slow_pings_leaves_the_rotation_and_its_build_still_succeeds() {
    // Test orchestrator: pings every 200 ms with a 300 ms deadline; --lost-after 60 s.
    let Setup { mq, orch, .. } = Setup::new("slow-pings");
    let behaviour = Behaviour {
        run_time: Duration::from_secs(8),
        ..Behaviour::default()
    };
    let worker = orch.worker("slow-w", behaviour);
    mq.publish_job("slow-1", json!({}));
    poll(LONG, "slow-1 to start", || {
        (worker.observed.job_count() == 1).then_some(())
    });
    poll(LONG, "a ping answered", || {
        let listed = workers_json(orch.metrics_port);
        (!listed[0]["lastPingMsAgo"].is_null()).then_some(())
    });
    worker.behaviour.lock().unwrap().ping_delay = Duration::from_secs(3);
    poll(LONG, "the worker out of rotation", || {
        (state_of(orch.metrics_port, "slow-w").as_deref() == Some("unhealthy")).then_some(())
    });
    let grpc = format!("127.0.0.1:{}", orch.grpc_port);
    let listed = blacktree(&["workers", "--orchestrator", &grpc]);
    assert!(
        text(&listed.stdout).contains("unhealthy (silent "),
        "{}",
        text(&listed.stdout)
    );
    let status = mq.statuses(1, LONG).remove(0);
    assert_eq!(status["outcome"], "succeeded", "{status}");
    assert_eq!(
        metric(orch.metrics_port, "blacktree_jobs_given_up_total"),
        0.0
    );
    assert!(metric(orch.metrics_port, "blacktree_workers_unhealthy_total") >= 1.0);

    // Pings answer in time again: back in rotation, it gets the next job.
    worker.behaviour.lock().unwrap().ping_delay = Duration::ZERO;
    worker.behaviour.lock().unwrap().run_time = Duration::from_millis(10);
    poll(LONG, "the worker back in rotation", || {
        (state_of(orch.metrics_port, "slow-w").as_deref() == Some("free")).then_some(())
    });
    mq.publish_job("slow-2", json!({}));
    let status = mq.statuses(1, LONG).remove(0);
    assert_eq!(
        (&status["outcome"], &status["workerId"]),
        (&json!("succeeded"), &json!("slow-w"))
    );
}

#[test]
fn a_frozen_worker_leaves_the_rotation_in_seconds_and_its_build_is_given_up_after_lost_after() {
    let lost_after = Duration::from_secs(4);
    let Setup { mq, orch, .. } = Setup::with_flags("frozen", &["--lost-after", "4s"]);
    let worker = WorkerProcess::sleeper("frozen-w", orch.grpc_port);
    orch.wait_for_log("worker frozen-w registered", LONG);
    mq.publish_job("frozen-1", json!({"repoUrl": "", "imageName": "60"}));
    orch.wait_for_log("job frozen-1: dispatched", LONG);
    let frozen_at = Instant::now();
    sh(&format!("kill -STOP {}", worker.pid()));
    poll(LONG, "the frozen worker out of rotation", || {
        (state_of(orch.metrics_port, "frozen-w").as_deref() == Some("unhealthy")).then_some(())
    });
    // Test orchestrator: 200 ms interval, 300 ms timeout, 2 failures.
    let out_of_rotation = frozen_at.elapsed();
    let statuses = mq.statuses(1, LONG);
    let given_up = frozen_at.elapsed();
    sh(&format!("kill -CONT {}", worker.pid()));
    let status: &Value = &statuses[0];
    assert_eq!(status["outcome"], "worker_lost", "{status}");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("did not answer health pings for") && error.contains("--lost-after"),
        "{error}"
    );
    assert!(
        out_of_rotation < Duration::from_secs(5),
        "out of rotation after {out_of_rotation:?}"
    );
    // Silence counts from its last answer, at most one 200 ms round before the freeze.
    assert!(
        given_up >= lost_after - Duration::from_millis(300),
        "given up after {given_up:?}, before --lost-after"
    );
    assert!(
        given_up < lost_after + Duration::from_secs(5),
        "given up after {given_up:?}"
    );
    assert_eq!(
        metric(orch.metrics_port, "blacktree_jobs_given_up_total"),
        1.0
    );
}

#[test]
fn a_killed_worker_loses_its_build_at_once_whatever_lost_after_says() {
    // --lost-after stays 60 s: the refused connection ends the build.
    let Setup { mq, orch, .. } = Setup::new("killed-proc");
    let mut worker = WorkerProcess::sleeper("killed-w", orch.grpc_port);
    orch.wait_for_log("worker killed-w registered", LONG);
    mq.publish_job("killed-1", json!({"repoUrl": "", "imageName": "60"}));
    orch.wait_for_log("job killed-1: dispatched", LONG);
    let killed_at = Instant::now();
    worker.signal("KILL");
    let _ = worker.wait_exit(LONG);
    let status = mq.statuses(1, LONG).remove(0);
    let lost = killed_at.elapsed();
    assert_eq!(status["outcome"], "worker_lost", "{status}");
    assert!(lost < Duration::from_secs(5), "lost after {lost:?}");
    assert_eq!(
        metric(orch.metrics_port, "blacktree_jobs_given_up_total"),
        0.0
    );
}

#[test]
fn a_vanished_host_loses_its_build_after_lost_after_and_keepalive_drops_its_dead_connection() {
    // Keepalive PINGs after a third of --lost-after without a byte received; their
    // timeout (and the socket's TCP_USER_TIMEOUT) is --lost-after.
    let lost_after = Duration::from_secs(4);
    let Setup { mq, orch, .. } = Setup::with_flags("vanish", &["--lost-after", "4s"]);
    let worker = WorkerProcess::sleeper("vanish-w", orch.grpc_port);
    orch.wait_for_log("worker vanish-w registered", LONG);
    // Long enough to outlast the cut, short enough to leave the worker free after it.
    mq.publish_job("vanish-1", json!({"repoUrl": "", "imageName": "12"}));
    orch.wait_for_log("job vanish-1: dispatched", LONG);
    let connections = poll(LONG, "the orchestrator's connection to the worker", || {
        let found = Partition::established_to(worker.port);
        (!found.is_empty()).then_some(found)
    });

    let partition = Partition::cut(worker.port);
    let cut_at = Instant::now();
    let status = mq.statuses(1, LONG).remove(0);
    let lost = cut_at.elapsed();
    assert_eq!(status["outcome"], "worker_lost", "{status}");
    // Silence counts from its last answer, at most one 200 ms round before the cut.
    assert!(
        lost >= lost_after - Duration::from_millis(300),
        "given up after {lost:?}, before --lost-after"
    );
    assert!(
        lost < lost_after + Duration::from_secs(5),
        "lost after {lost:?}"
    );
    // Without keepalive the connection would stay established, retransmitting for the
    // kernel's ~15 minutes, while nothing comes back.
    poll(
        Duration::from_secs(20),
        "keepalive to close the dead connection",
        || {
            let open = Partition::established_to(worker.port);
            connections.iter().all(|c| !open.contains(c)).then_some(())
        },
    );
    drop(partition);

    // The host is back: a new connection, and the worker runs jobs again.
    mq.publish_job("vanish-2", json!({"repoUrl": "", "imageName": "0"}));
    let status = mq.statuses(1, LONG).remove(0);
    assert_eq!(status["jobId"], "vanish-2", "{status}");
    assert_eq!(status["outcome"], "succeeded", "{status}");
    assert_eq!(status["workerId"], "vanish-w", "{status}");
}
