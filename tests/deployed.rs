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

/// Publishes `n` deployments named `{tag}-{i}` and reads their results from the API
/// queue; all must have succeeded. Returns the worker of each.
fn run_deployments(mq: &Mq, api: &str, tag: &str, n: usize) -> Vec<String> {
    for i in 0..n {
        mq.publish_deployment(&format!("{tag}-{i}"), json!({}));
    }
    api_results(mq, api, n)
        .iter()
        .map(|r| {
            assert_eq!(r["success"], true, "{r}");
            r["workerId"].as_str().unwrap().to_string()
        })
        .collect()
}

/// The ids the state file at `path` remembers.
fn remembered_ids(path: &str) -> Vec<String> {
    let json: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    json["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn go_workers_that_registered_once_get_jobs_after_a_graceful_or_hard_restart() {
    let (
        Setup {
            names,
            mq,
            mut orch,
        },
        state,
    ) = Setup::remembering("dep-restart", &[]);
    let api = mq.api_result_queue();
    // Go workers register once, at their own start, and never again.
    let a = orch.worker("go-a", go_worker(Duration::from_millis(100)));
    let mut b = orch.worker("go-b", go_worker(Duration::from_millis(100)));
    assert_eq!(
        remembered_ids(&state),
        ["go-a", "go-b"],
        "remembered before the registration is acknowledged"
    );
    for signal in ["TERM", "KILL"] {
        // Nothing left unacked to be redelivered: each deployment runs once.
        mq.wait_all_acked(&names.execute);
        orch.signal(signal);
        orch.wait_exit(LONG);
        let before = [a.observed.job_count(), b.observed.job_count()];
        orch = orch.restart();
        let ran = run_deployments(&mq, &api, &format!("dep-after-{signal}"), 8);
        for (worker, was) in [(&a, before[0]), (&b, before[1])] {
            assert!(
                worker.observed.job_count() > was,
                "after SIG{signal}, {} got no job: {ran:?}",
                worker.id
            );
        }
        let log = orch.log();
        assert!(
            log.contains("worker go-a (") && log.contains("restored from the state file"),
            "{log}"
        );
        assert!(
            !log.contains("registered at"),
            "no one registered again:\n{log}"
        );
    }

    // go-b dies while no orchestrator runs: the next one restores it and sends it nothing.
    mq.wait_all_acked(&names.execute);
    orch.signal("KILL");
    orch.wait_exit(LONG);
    b.kill();
    let b_jobs = b.observed.job_count();
    orch = orch.restart();
    let ran = run_deployments(&mq, &api, "dep-dead", 6);
    assert!(ran.iter().all(|w| w == "go-a"), "{ran:?}");
    assert_eq!(b.observed.job_count(), b_jobs);
    assert_eq!(
        state_of(orch.metrics_port, "go-b").as_deref(),
        Some("unhealthy")
    );
    mq.wait_all_acked(&names.execute);
    assert_eq!(mq.depth(&api), 0, "no deployment has a second result");
    orch.assert_no_secret_logged();
}

#[test]
fn a_remembered_id_that_moved_gets_jobs_only_at_its_new_address() {
    // The state file says go-moved is at `old`; another worker listens there now, and
    // go-moved itself runs at a new address, registering once the orchestrator is up.
    let go = |id: &str| TestWorker::start(id, 0, go_worker(Duration::from_millis(100)));
    let (squatter, stays, moved) = (go("go-squatter"), go("go-stays"), go("go-moved"));
    let state = own_state_file();
    let remembered = |id: &str, port: u16| json!({"id": id, "address": format!("127.0.0.1:{port}"), "region": "", "capacity": 1});
    let contents = json!({"version": 1, "workers": [
        remembered("go-moved", squatter.port), remembered("go-stays", stays.port)]});
    std::fs::write(&state, contents.to_string()).unwrap();
    let Setup { mq, orch, .. } = Setup::with_flags("dep-moved", &["--state-file", &state]);
    let api = mq.api_result_queue();
    poll(LONG, "go-stays to answer and go-moved to stay out", || {
        let states = worker_states(orch.metrics_port);
        let of = |id: &str| states.iter().find(|(w, _)| w == id).map(|(_, s)| s.clone());
        (of("go-stays").as_deref() == Some("free")).then_some(())?;
        assert_eq!(of("go-moved").as_deref(), Some("unhealthy"), "{states:?}");
        orch.log()
            .contains("answers as worker \"go-squatter\"")
            .then_some(())
    });
    let ran = run_deployments(&mq, &api, "dep-stale", 3);
    assert!(ran.iter().all(|w| w == "go-stays"), "{ran:?}");
    assert_eq!(
        squatter.observed.job_count(),
        0,
        "the old address got nothing"
    );

    moved.register(orch.grpc_port);
    let listed = workers_json(orch.metrics_port);
    let entry = listed.iter().find(|w| w["id"] == "go-moved").unwrap();
    assert_eq!(entry["address"], format!("127.0.0.1:{}", moved.port));
    let ran = run_deployments(&mq, &api, "dep-moved", 6);
    assert!(ran.iter().any(|w| w == "go-moved"), "{ran:?}");
    assert_eq!(squatter.observed.job_count(), 0);
    let file = std::fs::read_to_string(&state).unwrap();
    assert!(
        file.contains(&format!("127.0.0.1:{}", moved.port))
            && !file.contains(&format!("127.0.0.1:{}", squatter.port)),
        "{file}"
    );
}

#[test]
fn a_corrupt_state_file_named_by_the_flag_stops_the_start_and_is_left_alone() {
    let names = Names::unique("dep-corrupt");
    let state = own_state_file();
    std::fs::write(&state, "{\"version\":1,\"workers\":[{\"id\":\"w\",").unwrap();
    let mut child = command()
        .args([
            "orchestrator",
            "--amqp-url",
            SHARED_BROKER,
            "--state-file",
            &state,
        ])
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(names.args())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = poll(LONG, "the orchestrator to exit", || {
        child.try_wait().unwrap()
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("the state file {state} is corrupt")),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        "{\"version\":1,\"workers\":[{\"id\":\"w\","
    );
}
