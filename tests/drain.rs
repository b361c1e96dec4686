//! Draining a worker (issue 17, item 5), end to end: `blacktree workers drain ID` through
//! one orchestrator takes a real `blacktree worker` out of rotation for every
//! orchestrator it checks in with, lets its running build finish, says when it is safe
//! to stop, and `workers resume ID` brings it back; both authenticated like
//! registration.

mod common;

use std::time::Duration;

use common::build_env::TempDir;
use common::gated::Builds;
use common::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

/// `blacktree workers …` against the orchestrator at `port`, with the token in `token`.
fn workers(port: u16, token: &str, args: &[&str]) -> std::process::Output {
    let grpc = format!("127.0.0.1:{port}");
    let base = [
        "workers",
        "--orchestrator",
        grpc.as_str(),
        "--registration-token-file",
        token,
    ];
    blacktree(&[&base[..], args].concat())
}

/// What orchestrator `port` lists for worker `id`.
fn listed(port: u16, token: &str, id: &str) -> Value {
    let out = workers(port, token, &["--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    all.into_iter()
        .find(|w| w["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed"))
}

#[test]
fn a_drained_worker_finishes_its_build_takes_nothing_new_from_anyone_and_comes_back() {
    let dir = TempDir::new("drain");
    let token_file = dir.0.join("token");
    std::fs::write(&token_file, "drain-S3CRET-4242\n").unwrap();
    let token = token_file.to_str().unwrap();
    let flags = ["--registration-token-file", token];
    let Setup { mq, orch, names } = Setup::with_flags("drain", &flags);
    // A second orchestrator on the same queues: the drain is the worker's, so it holds
    // for this one too.
    let other = Orchestrator::start(SHARED_BROKER, &names, &flags);
    // d-1 runs until the test has seen it running through the drain.
    let builds = Builds::start();
    let other_addr = format!("127.0.0.1:{}", other.grpc_port);
    let _w = builds.worker(
        "drn-w",
        orch.grpc_port,
        2,
        &[
            "--registration-token-file",
            token,
            "--orchestrator",
            &other_addr,
        ],
    );
    orch.wait_for_log("worker drn-w registered", LONG);
    other.wait_for_log("worker drn-w registered", LONG);

    mq.publish_job("d-1", json!({ "repoUrl": "", "imageName": "drain" }));
    poll(LONG, "d-1 to start", || {
        (builds.runs("d-1") == 1).then_some(())
    });
    // Without the token the orchestrator refuses, like a registration.
    let grpc = format!("127.0.0.1:{}", orch.grpc_port);
    let refused = blacktree(&["workers", "drain", "drn-w", "--orchestrator", &grpc]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("refused"),
        "{}",
        text(&refused.stderr)
    );
    let unknown = workers(orch.grpc_port, token, &["drain", "nosuch"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        text(&unknown.stderr).contains("no worker"),
        "{}",
        text(&unknown.stderr)
    );

    let drained = workers(orch.grpc_port, token, &["drain", "drn-w"]);
    assert!(drained.status.success(), "{}", text(&drained.stderr));
    assert!(
        text(&drained.stdout).contains("draining; 1 job still running"),
        "{}",
        text(&drained.stdout)
    );
    // Jobs published now wait, whichever orchestrator takes them in.
    for i in 2..6 {
        let id = format!("d-{i}");
        builds.open(&id);
        mq.publish_job(&id, json!({ "repoUrl": "", "imageName": "drain" }));
    }
    // The other orchestrator hears it from the worker's ping.
    poll(LONG, "the other orchestrator to list it draining", || {
        (listed(other.grpc_port, token, "drn-w")["state"] == "draining").then_some(())
    });
    assert_eq!(listed(orch.grpc_port, token, "drn-w")["safeToStop"], false);
    builds.open("d-1");
    let first = mq.statuses(1, LONG);
    assert_eq!(first[0]["jobId"], "d-1");
    assert_eq!(first[0]["outcome"], "succeeded");
    poll(LONG, "both orchestrators to say it is safe to stop", || {
        (listed(orch.grpc_port, token, "drn-w")["safeToStop"] == true
            && listed(other.grpc_port, token, "drn-w")["safeToStop"] == true)
            .then_some(())
    });
    let table = text(&workers(other.grpc_port, token, &[]).stdout);
    assert!(table.contains("safe to stop"), "{table}");
    let metrics = http(orch.metrics_port, "/metrics").1;
    assert_eq!(
        find_sample(&metrics, r#"blacktree_workers{state="draining"}"#),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(builds.started(), 1, "nothing new started");

    let resumed = workers(other.grpc_port, token, &["resume", "drn-w"]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    assert!(text(&resumed.stdout).contains("back in rotation"));
    let rest = mq.statuses(4, LONG);
    assert!(
        rest.iter()
            .all(|s| s["outcome"] == "succeeded" && s["workerId"] == "drn-w"),
        "{rest:?}"
    );
    assert_eq!(listed(orch.grpc_port, token, "drn-w")["state"], "free");
    mq.assert_no_more_statuses();
}
