//! Drop-in for the deployed Blacktree (issue 12): its control plane's `deploymentId`
//! jobs and its Go workers' answers, against the real broker, the real orchestrator and
//! real gRPC workers that answer as the Go workers do.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

/// A worker that answers as the deployed Go worker does.
fn go_worker(run_time: Duration) -> Behaviour {
    Behaviour {
        run_time,
        go: true,
        ..Behaviour::default()
    }
}

/// Reads `n` results from the control plane's own queue, as it reads them.
fn api_results(mq: &Mq, queue: &str, n: usize) -> Vec<Value> {
    let results: Vec<Value> = mq
        .read_until(queue, LONG, |m| m.len() >= n)
        .into_iter()
        .map(|(body, _)| serde_json::from_slice(&body).expect("a result is JSON"))
        .collect();
    assert_eq!(results.len(), n, "{results:?}");
    results
}

#[test]
fn deployments_run_on_go_workers_and_each_result_reaches_the_api_queue_once() {
    let Setup { mq, orch, .. } = Setup::new("dep-flow");
    let api = mq.api_result_queue();
    let workers: Vec<TestWorker> = (0..2)
        .map(|i| orch.worker(&format!("go-w{i}"), go_worker(Duration::from_millis(30))))
        .collect();
    let ids: Vec<String> = (0..20).map(|i| format!("dep-{i}")).collect();
    for id in &ids {
        mq.publish_deployment(id, json!({}));
    }
    let results = api_results(&mq, &api, ids.len());
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for result in &results {
        let id = result["deploymentId"].as_str().expect("deploymentId");
        assert_eq!(result["jobId"], id, "{result}");
        assert_eq!(result["success"], true, "{result}");
        assert!(
            !result["logs"].as_str().unwrap().contains(TOKEN),
            "{result}"
        );
        *seen.entry(id).or_default() += 1;
    }
    assert!(
        ids.iter().all(|id| seen.get(id.as_str()) == Some(&1)),
        "{seen:?}"
    );
    // The status queue of our own dialect gets them too, and nothing more.
    assert_eq!(mq.statuses(ids.len(), LONG).len(), ids.len());
    mq.assert_no_more_statuses();
    for worker in &workers {
        assert!(worker.observed.max_in_flight.load(Ordering::SeqCst) <= 1);
        for request in worker.observed.requests.lock().unwrap().iter() {
            assert_eq!(request.imageName, format!("blacktree/{}", request.jobId));
            assert_eq!(request.githubToken, TOKEN);
            assert_eq!(request.repoUrl, "acme/app");
            assert_eq!(request.dockerfilePath, "docker/Dockerfile");
            assert_eq!(request.branch, "main");
        }
    }
    let ran: usize = workers.iter().map(|w| w.observed.job_count()).sum();
    assert_eq!(ran, ids.len(), "each deployment ran once");
    orch.assert_no_secret_logged();
}

#[test]
fn a_failed_go_build_is_reported_with_its_message_and_a_busy_go_worker_is_passed_over() {
    let Setup { mq, orch, .. } =
        Setup::with_flags("dep-go", &["--derived-image-prefix", "registry.test/"]);
    let api = mq.api_result_queue();
    let busy = orch.worker(
        "go-busy",
        Behaviour {
            refuse: true,
            ..go_worker(Duration::from_millis(10))
        },
    );
    mq.publish_deployment("dep-busy", json!({}));
    poll(LONG, "the busy worker to refuse the deployment", || {
        (busy.observed.refused.load(Ordering::SeqCst) >= 1).then_some(())
    });
    let free = orch.worker("go-free", go_worker(Duration::from_millis(10)));
    let result = &api_results(&mq, &api, 1)[0];
    assert_eq!(
        (result["deploymentId"].as_str(), result["success"].as_bool()),
        (Some("dep-busy"), Some(true)),
        "{result}"
    );
    assert_eq!(
        result["workerId"], "go-free",
        "never published as a failure: {result}"
    );
    let request = free.observed.requests.lock().unwrap()[0].clone();
    assert_eq!(request.imageName, "registry.test/dep-busy");
    free.behaviour.lock().unwrap().fail_with = Some(format!(
        "Failed to build Docker image: exit status 1 ({TOKEN})"
    ));
    mq.publish_deployment("dep-fail", json!({"imageName": "acme/app:7"}));
    let result = &api_results(&mq, &api, 1)[0];
    assert_eq!(result["success"], false, "{result}");
    assert_eq!(result["outcome"], "failed", "{result}");
    let request = free
        .observed
        .requests
        .lock()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        request.imageName, "acme/app:7",
        "imageName wins over the derived name"
    );
    let error = result["error"].as_str().unwrap();
    assert!(
        error.contains("Failed to build Docker image: exit status 1") && !error.contains(TOKEN),
        "the worker's message, redacted: {error}"
    );
    orch.assert_no_secret_logged();
}

#[test]
fn deployment_cancels_and_rejections_speak_the_deployments_dialect_and_keep_no_token() {
    let Setup { names, mq, orch } = Setup::new("dep-edge");
    let api = mq.api_result_queue();
    let _w = orch.worker("go-edge", go_worker(Duration::from_millis(10)));
    mq.publish_cancel_deployment("dep-cancel");
    orch.wait_for_log("job dep-cancel: cancel requested before it arrived", LONG);
    mq.publish_deployment("dep-cancel", json!({}));
    mq.publish_deployment("dep-both", json!({"jobId": "another"}));
    let results = api_results(&mq, &api, 2);
    let by_id = |id: &str| {
        results
            .iter()
            .find(|r| r["deploymentId"] == id)
            .unwrap_or_else(|| panic!("no result for {id}: {results:?}"))
    };
    assert_eq!(by_id("dep-cancel")["outcome"], "cancelled");
    let rejected = by_id("dep-both");
    assert_eq!(rejected["outcome"], "rejected");
    assert!(
        rejected["error"]
            .as_str()
            .unwrap()
            .contains("`jobId` and `deploymentId` differ"),
        "{rejected}"
    );
    let copies = mq.read_until(&names.rejected, LONG, |m| !m.is_empty());
    let copy = String::from_utf8_lossy(&copies[0].0).into_owned();
    assert!(copy.contains("dep-both") && !copy.contains(TOKEN), "{copy}");
    orch.assert_no_secret_logged();
}
